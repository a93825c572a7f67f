// SPDX-License-Identifier: Apache-2.0
//! The state directory: one subdirectory per defined VM holding its definition
//! (`config.json`), its lock, and the files of its running VMM (API and
//! console sockets, logs, managed save). Running VMMs register in the runtime
//! directory like any `wisp run --name`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vmm::registry::{self, Listed};

use super::definition::{write_atomic, Definition};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/wisp";

/// Where definitions and running VMMs live.
#[derive(Debug, Clone)]
pub struct Store {
    /// Definitions and per-VM files.
    pub state_dir: PathBuf,
    /// Where VMMs register (`wisp list`).
    pub runtime_dir: PathBuf,
}

/// What state a VM is in, as `virsh list` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// The VMM runs and the vCPUs run.
    Running,
    /// The VMM runs, vCPUs paused.
    Paused,
    /// The VMM serves its API but has not booted a VM yet.
    NotStarted,
    /// No VMM (a defined VM).
    ShutOff,
    /// The VMM died without unregistering.
    Crashed,
}

impl VmState {
    /// The name `wisp list` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::NotStarted => "not started",
            Self::ShutOff => "shut off",
            Self::Crashed => "crashed",
        }
    }

    /// From a registry entry.
    pub fn of(l: Option<&Listed>) -> Self {
        match l {
            None => Self::ShutOff,
            Some(l) if !l.alive => Self::Crashed,
            Some(l) => match l.entry.state.as_str() {
                "Paused" => Self::Paused,
                "Not started" => Self::NotStarted,
                _ => Self::Running,
            },
        }
    }

    /// Whether a VMM process runs.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::NotStarted)
    }
}

/// An exclusive lock on one VM's lifecycle, released on drop.
#[derive(Debug)]
pub struct VmLock {
    _file: std::fs::File,
}

/// Checks a name given on the command line.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if !registry::valid_name(name) {
        bail!("Invalid VM name '{name}': use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with '.', no '..')");
    }
    Ok(())
}

impl Store {
    /// From the command line, else `WISP_STATE_DIR` / `WISP_RUNTIME_DIR`, else the defaults.
    pub fn new(state_dir: Option<PathBuf>, runtime_dir: Option<PathBuf>) -> Self {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        // Absolute, so the sockets recorded in the registry work from anywhere.
        let absolute = |p: PathBuf| match std::env::current_dir() {
            Ok(cwd) if p.is_relative() => cwd.join(p),
            _ => p,
        };
        Self {
            state_dir: absolute(
                state_dir
                    .or_else(|| env("WISP_STATE_DIR"))
                    .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            ),
            runtime_dir: absolute(
                runtime_dir
                    .or_else(|| env("WISP_RUNTIME_DIR"))
                    .unwrap_or_else(|| registry::DEFAULT_RUNTIME_DIR.into()),
            ),
        }
    }

    /// The directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    /// A file in the directory of VM `name`.
    pub fn file(&self, name: &str, file: &str) -> PathBuf {
        self.vm_dir(name).join(file)
    }

    /// The definition file of `name`.
    pub fn config_path(&self, name: &str) -> PathBuf {
        self.file(name, "config.json")
    }

    /// Whether `name` is defined.
    pub fn is_defined(&self, name: &str) -> bool {
        registry::valid_name(name) && self.config_path(name).is_file()
    }

    /// Reads the definition of `name`.
    pub fn load(&self, name: &str) -> anyhow::Result<Definition> {
        check_name(name)?;
        if !self.is_defined(name) {
            bail!(
                "No VM named '{name}' is defined (in {})",
                self.state_dir.display()
            );
        }
        let def = Definition::read(&self.config_path(name))?;
        if def.name != name {
            bail!(
                "{} names the VM '{}', not '{name}'",
                self.config_path(name).display(),
                def.name
            );
        }
        Ok(def)
    }

    /// Writes (creates or replaces) a definition.
    pub fn save(&self, def: &Definition) -> anyhow::Result<()> {
        let dir = self.vm_dir(&def.name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("Cannot create {}", dir.display()))?;
        let path = self.config_path(&def.name);
        write_atomic(&path, def.to_json().as_bytes())
            .with_context(|| format!("Cannot write {}", path.display()))
    }

    /// Every defined VM's name, sorted.
    pub fn defined(&self) -> anyhow::Result<Vec<String>> {
        let rd = match std::fs::read_dir(&self.state_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("Cannot read {}", self.state_dir.display()))
            }
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| self.is_defined(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The registry entry of `name`, if any.
    pub fn entry(&self, name: &str) -> Option<Listed> {
        registry::lookup(&self.runtime_dir, name)
    }

    /// The state of `name`.
    pub fn state(&self, name: &str) -> VmState {
        VmState::of(self.entry(name).as_ref())
    }

    /// The live registry entry of `name`, or an error saying it is not running.
    pub fn running(&self, name: &str) -> anyhow::Result<Listed> {
        match self.entry(name) {
            Some(l) if l.alive => Ok(l),
            Some(_) => bail!(
                "VM '{name}' is not running (its VMM crashed; `wisp start {name}` starts it again)"
            ),
            None => bail!("VM '{name}' is not running"),
        }
    }

    /// The API socket of running VM `name`.
    pub fn api_sock(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.running(name)?
            .entry
            .api_sock
            .ok_or_else(|| anyhow::anyhow!("VM '{name}' runs without an API socket"))
    }

    /// Takes the lifecycle lock of `name` (its directory must exist); fails at
    /// once if another wisp command holds it.
    pub fn lock(&self, name: &str) -> anyhow::Result<VmLock> {
        check_name(name)?;
        let path = self.file(name, "lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("Cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor this File owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!("Another wisp command is working on VM '{name}' (it holds {}); try again when it is done", path.display());
            }
            return Err(e).with_context(|| format!("Cannot lock {}", path.display()));
        }
        Ok(VmLock { _file: file })
    }

    /// The managed save of `name`: (state file, memory file), if complete.
    pub fn managed_save(&self, name: &str) -> Option<(PathBuf, PathBuf)> {
        let (s, m) = self.save_paths(name);
        (s.is_file() && m.is_file()).then_some((s, m))
    }

    /// Where the managed save of `name` goes.
    pub fn save_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.file(name, "save.state"), self.file(name, "save.mem"))
    }

    /// Removes the managed save of `name`.
    pub fn remove_managed_save(&self, name: &str) {
        let (s, m) = self.save_paths(name);
        let _ = std::fs::remove_file(s);
        let _ = std::fs::remove_file(m);
        let _ = std::fs::remove_file(self.file(name, "save.json"));
    }
}

/// The last `lines` lines of a log file (for error messages).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lock_is_exclusive() {
        let dir = std::env::temp_dir().join(format!("wisp-store-{}", std::process::id()));
        let store = Store::new(Some(dir.clone()), Some(dir.join("run")));
        std::fs::create_dir_all(store.vm_dir("a")).unwrap();
        let l = store.lock("a").unwrap();
        let e = store.lock("a").unwrap_err().to_string();
        assert!(e.contains("Another wisp command"), "{e}");
        drop(l);
        store.lock("a").unwrap();
        assert!(store.lock("../a").is_err());
        assert_eq!(store.state("a"), VmState::ShutOff);
        assert!(store.defined().unwrap().is_empty());
        let rel = Store::new(Some("st".into()), Some("rt".into()));
        assert!(rel.state_dir.is_absolute() && rel.runtime_dir.is_absolute());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
