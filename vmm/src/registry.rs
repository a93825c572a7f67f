// SPDX-License-Identifier: Apache-2.0
//! The runtime directory where each VMM registers itself (`NAME.json`, and its
//! API socket `NAME.sock` when not given elsewhere), so `wisp list` can show
//! the microVMs on this host. Entries are removed on exit; entries left by a
//! killed VMM are detected as stale.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The default runtime directory.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/wisp";

/// One registered VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// VM name.
    pub name: String,
    /// VMM process id.
    pub pid: u32,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// API socket, if any.
    pub api_sock: Option<PathBuf>,
    /// The VMM's start time (field 22 of `/proc/PID/stat`, clock ticks since
    /// boot), so a reused pid is not taken for the VMM. Filled in by
    /// [`Registration::register`]; absent in entries written by older wisps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The name is unusable as a file name.
    #[error("Invalid VM name '{0}': use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// Another live VMM uses the name.
    #[error("A VM named '{name}' is already running (pid {pid})")]
    InUse {
        /// The name.
        name: String,
        /// Its VMM.
        pid: u32,
    },
    /// The directory or file could not be written.
    #[error("Cannot register in {dir}: {source}")]
    Io {
        /// The runtime directory.
        dir: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks a VM name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Fields 3.. of `/proc/PID/stat` (state, ppid, ...).
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`).
pub fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// Whether the VMM an entry describes still runs: its pid exists, is not a
/// zombie and, when the entry recorded one, has the same start time (pids
/// are reused).
pub fn entry_alive(e: &Entry) -> bool {
    if !pid_alive(e.pid) {
        return false;
    }
    match proc_stat_fields(e.pid) {
        Some(f) => {
            f.first().is_none_or(|s| s != "Z")
                && e.start_time
                    .is_none_or(|t| f.get(22 - 3).and_then(|v| v.parse().ok()) == Some(t))
        }
        // No /proc: trust kill(0).
        None => e.start_time.is_none(),
    }
}

/// A registration, removed on drop.
#[derive(Debug)]
pub struct Registration {
    dir: PathBuf,
    entry: Entry,
}

impl Registration {
    /// Registers `entry` in `dir` (created if needed), replacing a stale entry.
    pub fn register(dir: &Path, mut entry: Entry) -> Result<Self, RegistryError> {
        if entry.start_time.is_none() {
            entry.start_time = proc_start_time(entry.pid);
        }
        if !valid_name(&entry.name) {
            return Err(RegistryError::BadName(entry.name));
        }
        let io = |source| RegistryError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        if let Some(old) = read_entry(&dir.join(format!("{}.json", entry.name))) {
            if old.pid != entry.pid && entry_alive(&old) {
                return Err(RegistryError::InUse {
                    name: entry.name,
                    pid: old.pid,
                });
            }
        }
        let reg = Self {
            dir: dir.to_path_buf(),
            entry,
        };
        reg.write().map_err(io)?;
        Ok(reg)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.entry.name))
    }

    fn write(&self) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{}.json.tmp", self.entry.name));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string(&self.entry)?.as_bytes())?;
        std::fs::rename(&tmp, self.path())
    }

    /// Records a new state.
    pub fn set_state(&mut self, state: &str) {
        if self.entry.state != state {
            self.entry.state = state.to_string();
            if let Err(e) = self.write() {
                log::warn!("Cannot update {}: {e}", self.path().display());
            }
        }
    }

    /// Records the machine size once known.
    pub fn set_size(&mut self, vcpus: u8, mem_mib: u64) {
        self.entry.vcpus = vcpus;
        self.entry.mem_mib = mem_mib;
        if let Err(e) = self.write() {
            log::warn!("Cannot update {}: {e}", self.path().display());
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path());
    }
}

fn read_entry(path: &Path) -> Option<Entry> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// A listed VM and whether its VMM is still alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    /// The registration.
    #[serde(flatten)]
    pub entry: Entry,
    /// False when the VMM died without cleaning up.
    pub alive: bool,
}

/// Every VM registered in `dir`, by name.
pub fn list(dir: &Path) -> std::io::Result<Vec<Listed>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<Listed> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter_map(|p| read_entry(&p))
        .map(|entry| Listed {
            alive: entry_alive(&entry),
            entry,
        })
        .collect();
    out.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
    Ok(out)
}

/// The entry of VM `name` in `dir`, if registered.
pub fn lookup(dir: &Path, name: &str) -> Option<Listed> {
    if !valid_name(name) {
        return None;
    }
    let entry = read_entry(&dir.join(format!("{name}.json")))?;
    Some(Listed {
        alive: entry_alive(&entry),
        entry,
    })
}

/// Removes the entry of a VMM that is gone (and its API socket when that is
/// in `dir`). Refuses, returning false, while the VMM still runs.
pub fn prune(dir: &Path, name: &str) -> bool {
    let Some(l) = lookup(dir, name) else {
        return true;
    };
    if l.alive {
        return false;
    }
    if let Some(sock) = &l.entry.api_sock {
        if sock.parent() == Some(dir) {
            let _ = std::fs::remove_file(sock);
        }
    }
    let _ = std::fs::remove_file(dir.join(format!("{name}.json")));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, pid: u32) -> Entry {
        Entry {
            name: name.into(),
            pid,
            state: "Running".into(),
            vcpus: 2,
            mem_mib: 128,
            api_sock: None,
            start_time: None,
        }
    }

    #[test]
    fn test_start_time_guards_against_pid_reuse() {
        let me = std::process::id();
        let t = proc_start_time(me).unwrap();
        let mut e = entry("x", me);
        assert!(entry_alive(&e));
        e.start_time = Some(t);
        assert!(entry_alive(&e));
        e.start_time = Some(t + 1);
        assert!(!entry_alive(&e), "same pid, other start time: not our VMM");
        assert!(!valid_name("a..b") && !valid_name("a/b") && valid_name("a.b"));
    }

    #[test]
    fn test_prune_removes_only_dead_entries() {
        let dir = std::env::temp_dir().join(format!("wisp-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut dead = entry("dead", 999_999_999);
        dead.api_sock = Some(dir.join("dead.sock"));
        std::fs::write(dir.join("dead.sock"), "").unwrap();
        std::fs::write(dir.join("dead.json"), serde_json::to_string(&dead).unwrap()).unwrap();
        let reg = Registration::register(&dir, entry("live", std::process::id())).unwrap();
        assert!(!prune(&dir, "live"));
        assert!(lookup(&dir, "live").unwrap().alive);
        assert!(prune(&dir, "dead"));
        assert!(!dir.join("dead.json").exists() && !dir.join("dead.sock").exists());
        assert!(lookup(&dir, "dead").is_none());
        drop(reg);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_register_list_stale_and_cleanup() {
        let dir = std::env::temp_dir().join(format!("wisp-reg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let me = std::process::id();
        let mut reg = Registration::register(&dir, entry("a", me)).unwrap();
        reg.set_state("Paused");
        // A live owner keeps the name.
        assert!(matches!(
            Registration::register(&dir, entry("a", me + 1)),
            Err(RegistryError::InUse { .. })
        ));
        // A stale entry (dead pid) is listed as such and can be replaced.
        std::fs::write(
            dir.join("b.json"),
            serde_json::to_string(&entry("b", 999_999_999)).unwrap(),
        )
        .unwrap();
        let l = list(&dir).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l[0].alive && l[0].entry.state == "Paused");
        assert!(!l[1].alive);
        let _b = Registration::register(&dir, entry("b", me)).unwrap();
        drop(reg);
        assert!(!dir.join("a.json").exists());
        assert!(matches!(
            Registration::register(&dir, entry("../x", me)),
            Err(RegistryError::BadName(_))
        ));
        drop(_b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
