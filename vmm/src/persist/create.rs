// SPDX-License-Identifier: Apache-2.0
//! Creating and loading a snapshot as a *pair* of files that are either the
//! old pair or the new pair, never silently a mix.
//!
//! Create, step by step (each `-- name` is a fault-injection point, see
//! [`FAULT_ENV`]):
//!
//! 1. check both paths (regular file or new path, not the same file) and,
//!    for a Diff, that the memory file holds the expected base; remove stale
//!    temporaries from both directories `-- cleaned`
//! 2. create the memory temporary (0600, locked) `-- mem-created`, write
//!    guest RAM (or copy the base and apply the diff) and the trailer with a
//!    new binding `-- mem-written`, fsync `-- mem-synced`
//! 3. write the state temporary holding the same binding `-- state-written`,
//!    fsync `-- state-synced`
//! 4. rename the memory file into place `-- mem-renamed`, fsync its
//!    directory `-- mem-dir-synced`
//! 5. rename the state file into place `-- state-renamed`, fsync its
//!    directory `-- state-dir-synced`; only now is success reported.
//!
//! A crash up to step 3 leaves the old pair (and temporaries, removed by the
//! next create). Between the two renames the memory file is new and the
//! state file old: two files cannot be replaced at once, so this window
//! exists; the binding makes restore refuse that mix, naming both files. The
//! state file goes last so a new state file never names an old memory file.
//! After step 5 the new pair is in place.

use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::binding::{MemoryBinding, SnapshotFile, Trailer, TrailerState};
use super::dump::{open_base, write_diff_copy, write_full};
use super::files::{
    check_target, clean_stale_temps, open_regular, parent_dir, same_file, sync_dir, FileError,
    TempFile,
};
use super::format::{encode_state, read_state_file, FormatError};
use super::memory::{map_file, DumpStats, MemoryFileError, MemoryLayout};

/// Environment variable naming a create step after which the process kills
/// itself with SIGKILL (debug builds only; used by `tests/snapshot.rs`):
/// `<step>` for the first create of the process, `<step>@<n>` for the n-th.
pub const FAULT_ENV: &str = "WISP_FAULT_SNAPSHOT";

/// The fault-injection points of a create, in order.
pub const FAULT_STEPS: &[&str] = &[
    "cleaned",
    "mem-created",
    "mem-written",
    "mem-synced",
    "state-written",
    "state-synced",
    "mem-renamed",
    "mem-dir-synced",
    "state-renamed",
    "state-dir-synced",
];

/// Why a snapshot could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The request cannot be honoured as asked (a client error).
    #[error("{0}")]
    Refused(String),
    /// A path is not one a snapshot may be written to or read from.
    #[error(transparent)]
    File(#[from] FileError),
    /// The memory file could not be written or read.
    #[error("Memory file: {0}")]
    Memory(#[from] MemoryFileError),
    /// The state file could not be written or read.
    #[error("State file: {0}")]
    State(#[from] FormatError),
    /// The VMM failed (saving device state, flushing disks, KVM).
    #[error("{0}")]
    Vmm(String),
    /// The state file and the memory file are from different snapshots.
    #[error(
        "State file {state} and memory file {memory} are not one snapshot: the state file needs the memory of {expected}, but the memory file holds {found}. A snapshot create was interrupted between replacing the two files, or the files come from different snapshots; they cannot be restored together"
    )]
    Mismatch {
        /// The state file.
        state: PathBuf,
        /// The memory file.
        memory: PathBuf,
        /// The binding in the state file.
        expected: Box<MemoryBinding>,
        /// The binding in the memory file.
        found: Box<MemoryBinding>,
    },
    /// The memory file was replaced, the state file could not be.
    #[error(
        "The memory file {memory} was replaced but the state file {state} could not be ({source}); this pair is unusable: take a new snapshot"
    )]
    Torn {
        /// The state file.
        state: PathBuf,
        /// The memory file.
        memory: PathBuf,
        /// Why.
        #[source]
        source: FileError,
    },
    /// The fault-injection variable names no step.
    #[error("{FAULT_ENV}={0} names no snapshot step (steps: {steps})", steps = FAULT_STEPS.join(", "))]
    BadFault(String),
}

impl SnapshotError {
    /// Whether the request is at fault (HTTP 400) rather than the host (500).
    pub fn is_client_error(&self) -> bool {
        match self {
            Self::Refused(_) | Self::Mismatch { .. } => true,
            Self::File(e) => e.is_client_error(),
            Self::Memory(MemoryFileError::File(e)) | Self::State(FormatError::File(e)) => {
                e.is_client_error()
            }
            Self::Memory(MemoryFileError::Mismatch { .. } | MemoryFileError::Unfinished { .. }) => {
                true
            }
            _ => false,
        }
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, SnapshotError>;

/// What kind of memory file a create writes.
#[derive(Debug, Clone, Copy)]
pub enum Kind<'a> {
    /// All of guest RAM.
    Full,
    /// The pages in `dirty` applied to a copy of the memory file at the
    /// destination path, which must hold `base`.
    Diff {
        /// One dirty bitmap per region.
        dirty: &'a [Vec<u64>],
        /// The binding the existing memory file must hold.
        base: &'a MemoryBinding,
    },
}

/// The fault-injection plan of this process: (step, which create).
#[cfg(debug_assertions)]
fn fault_plan() -> Result<Option<(String, u32)>> {
    let Ok(v) = std::env::var(FAULT_ENV) else {
        return Ok(None);
    };
    let (step, nth) = match v.split_once('@') {
        Some((s, n)) => match n.parse::<u32>() {
            Ok(n) if n >= 1 => (s.to_string(), n),
            _ => return Err(SnapshotError::BadFault(v)),
        },
        None => (v.clone(), 1),
    };
    if !FAULT_STEPS.contains(&step.as_str()) {
        return Err(SnapshotError::BadFault(v));
    }
    Ok(Some((step, nth)))
}

#[cfg(not(debug_assertions))]
fn fault_plan() -> Result<Option<(String, u32)>> {
    if std::env::var_os(FAULT_ENV).is_some() {
        log::warn!("{FAULT_ENV} is set but ignored: fault injection exists only in debug builds");
    }
    Ok(None)
}

/// Kills the process at one step of one create, if asked to.
struct Faults {
    plan: Option<(String, u32)>,
    create: u32,
}

impl Faults {
    fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static CREATES: AtomicU32 = AtomicU32::new(0);
        let plan = fault_plan()?;
        Ok(Self {
            plan,
            create: CREATES.fetch_add(1, Ordering::SeqCst) + 1,
        })
    }

    fn point(&self, step: &str) {
        if let Some((s, n)) = &self.plan {
            if s == step && *n == self.create {
                eprintln!("{FAULT_ENV}: killing wisp after snapshot step {step}");
                // SAFETY: sends SIGKILL to this process; no memory involved.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
    }
}

/// Checks the two destination paths of a create (400 if refused).
pub fn check_targets(state_path: &Path, mem_path: &Path) -> Result<()> {
    check_target(state_path)?;
    check_target(mem_path)?;
    if same_file(state_path, mem_path) {
        return Err(SnapshotError::Refused(format!(
            "The snapshot file and the memory file must be two files, {} was given for both",
            state_path.display()
        )));
    }
    Ok(())
}

fn open_diff_base(mem_path: &Path, base: &MemoryBinding) -> Result<std::fs::File> {
    open_base(mem_path, base, false).map_err(|e| {
        SnapshotError::Refused(format!(
            "A Diff snapshot applies to the memory file of this microVM's last snapshot, and {} is not that file ({e}): take a Full snapshot first",
            mem_path.display()
        ))
    })
}

/// Checks that the memory file at `mem_path` holds `base`, complete (a
/// Diff's base).
pub fn check_diff_base(mem_path: &Path, base: &MemoryBinding) -> Result<()> {
    open_diff_base(mem_path, base).map(drop)
}

/// Writes `state` and guest memory `mem` (paused) as the snapshot pair
/// (`state_path`, `mem_path`), in the order described in the module docs.
/// Returns the new pair's binding once it is durable.
pub fn create_snapshot<T: Serialize>(
    state_path: &Path,
    mem_path: &Path,
    mem: &GuestMemoryMmap,
    state: &T,
    kind: Kind<'_>,
) -> Result<(MemoryBinding, DumpStats)> {
    let faults = Faults::new()?;
    check_targets(state_path, mem_path)?;
    let ram_len = MemoryLayout::of(mem).file_size();
    let base = match kind {
        Kind::Full => None,
        Kind::Diff { base, .. } => Some(open_diff_base(mem_path, base)?),
    };
    let (mem_dir, state_dir) = (parent_dir(mem_path), parent_dir(state_path));
    clean_stale_temps(mem_dir);
    if !same_file(mem_dir, state_dir) {
        clean_stale_temps(state_dir);
    }
    faults.point("cleaned");

    let binding = match kind {
        Kind::Full => MemoryBinding::new(ram_len),
        Kind::Diff { base, .. } => base.successor(),
    };
    let mut mem_tmp = TempFile::create(mem_path)?;
    faults.point("mem-created");
    let stats = match (kind, &base) {
        (Kind::Diff { dirty, .. }, Some(src)) => {
            write_diff_copy(src, mem_path, &mem_tmp.file, &mem_tmp.path, mem, dirty)?
        }
        _ => write_full(&mem_tmp.file, &mem_tmp.path, mem)?,
    };
    let trailer = Trailer {
        binding,
        state: TrailerState::Complete,
    };
    trailer.write(&mem_tmp.file, &mem_tmp.path)?;
    faults.point("mem-written");
    mem_tmp.sync()?;
    faults.point("mem-synced");

    let image = encode_state(&SnapshotFile {
        memory: binding,
        state,
    })?;
    let mut state_tmp = TempFile::create(state_path)?;
    {
        use std::io::Write;
        state_tmp
            .file
            .write_all(&image)
            .map_err(super::files::io_err("write", &state_tmp.path))?;
    }
    faults.point("state-written");
    state_tmp.sync()?;
    faults.point("state-synced");

    mem_tmp.rename_to(mem_path)?;
    faults.point("mem-renamed");
    let torn = |source| SnapshotError::Torn {
        state: state_path.to_path_buf(),
        memory: mem_path.to_path_buf(),
        source,
    };
    sync_dir(mem_dir).map_err(torn)?;
    faults.point("mem-dir-synced");
    state_tmp.rename_to(state_path).map_err(torn)?;
    faults.point("state-renamed");
    sync_dir(state_dir)?;
    faults.point("state-dir-synced");
    Ok((binding, stats))
}

/// Reads the state file at `state_path`, checks that the memory file at
/// `mem_path` is the one it was written with (trailer id, generation,
/// length; guest RAM itself is not checksummed, so restore stays a mapping),
/// and maps the memory with the layout `layout(&state)` gives.
pub fn load_snapshot<T, F>(
    state_path: &Path,
    mem_path: &Path,
    layout: F,
) -> Result<(T, MemoryBinding, GuestMemoryMmap)>
where
    T: DeserializeOwned,
    F: FnOnce(&T) -> &MemoryLayout,
{
    let file: SnapshotFile<T> = read_state_file(state_path)?;
    let expected = file.memory;
    let layout = layout(&file.state);
    layout.validate()?;
    if layout.file_size() != expected.ram_len {
        return Err(SnapshotError::State(FormatError::Decode {
            path: state_path.to_path_buf(),
            detail: format!(
                "its memory layout holds {} bytes but it binds a memory file of {} bytes",
                layout.file_size(),
                expected.ram_len
            ),
        }));
    }
    let mem = open_regular(mem_path, false)?;
    let t = Trailer::read(&mem, mem_path, expected.ram_len)?;
    if t.binding != expected {
        return Err(SnapshotError::Mismatch {
            state: state_path.to_path_buf(),
            memory: mem_path.to_path_buf(),
            expected: Box::new(expected),
            found: Box::new(t.binding),
        });
    }
    if t.state != TrailerState::Complete {
        return Err(MemoryFileError::Unfinished {
            path: mem_path.to_path_buf(),
            found: t.binding,
        }
        .into());
    }
    let guest = map_file(mem, mem_path, layout)?;
    Ok((file.state, expected, guest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::memory::test_util::*;
    use serde::Deserialize;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct St {
        layout: MemoryLayout,
        tick: u64,
    }

    fn st(mem: &GuestMemoryMmap, tick: u64) -> St {
        St {
            layout: MemoryLayout::of(mem),
            tick,
        }
    }

    fn load(s: &Path, m: &Path) -> Result<(St, MemoryBinding, GuestMemoryMmap)> {
        load_snapshot(s, m, |st: &St| &st.layout)
    }

    #[test]
    fn test_create_pair_loads_and_a_mixed_pair_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let (s, m) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
        let mem = test_memory();
        fill(&mem, TOUCHED, 0x11);
        let (b1, _) = create_snapshot(&s, &m, &mem, &st(&mem, 1), Kind::Full).unwrap();
        for p in [&s, &m] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", p.display());
        }
        let old_state = std::fs::read(&s).unwrap();
        let (got, b, guest) = load(&s, &m).unwrap();
        assert_eq!((got.tick, b), (1, b1));
        assert_same(&guest, &mem);

        fill(&mem, &[0x3000], 0x22);
        let (b2, _) = create_snapshot(&s, &m, &mem, &st(&mem, 2), Kind::Full).unwrap();
        assert_ne!(b1.id, b2.id);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // What a crash between the two renames leaves: old state, new memory.
        std::fs::write(&s, &old_state).unwrap();
        let err = load(&s, &m).unwrap_err();
        assert!(matches!(err, SnapshotError::Mismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("vm.snap") && msg.contains("vm.mem"), "{msg}");
        assert!(
            msg.contains(&b1.id_hex()) && msg.contains(&b2.id_hex()),
            "{msg}"
        );
        assert!(err.is_client_error());
    }

    #[test]
    fn test_create_diff_copies_base_and_refuses_a_foreign_base() {
        let dir = tempfile::tempdir().unwrap();
        let (s, m) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
        let mem = test_memory();
        fill(&mem, TOUCHED, 0x11);
        let (b1, _) = create_snapshot(&s, &m, &mem, &st(&mem, 1), Kind::Full).unwrap();
        fill(&mem, &[0x3000], 0x22);
        let dirty = bitmaps_for(&mem, &[0x3000]);
        let diff = Kind::Diff {
            dirty: &dirty,
            base: &b1,
        };
        let (b2, stats) = create_snapshot(&s, &m, &mem, &st(&mem, 2), diff).unwrap();
        assert_eq!((b2.generation, stats.pages_written), (1, 1));
        let (got, _, guest) = load(&s, &m).unwrap();
        assert_eq!(got.tick, 2);
        assert_same(&guest, &mem);
        // b1 is no longer what the file holds: a Diff on it is refused.
        let again = Kind::Diff {
            dirty: &dirty,
            base: &b1,
        };
        let err = create_snapshot(&s, &m, &mem, &st(&mem, 3), again).unwrap_err();
        assert!(err.to_string().contains("take a Full snapshot"), "{err}");
        assert!(err.is_client_error());
        assert_eq!(load(&s, &m).unwrap().0.tick, 2);
    }

    #[test]
    fn test_create_refuses_bad_targets_before_writing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let (s, m) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
        let mem = test_memory();
        let state = st(&mem, 0);
        let err = create_snapshot(&s, &s, &mem, &state, Kind::Full).unwrap_err();
        assert!(err.to_string().contains("must be two files"), "{err}");
        // Two names of one file (a hard link) are one file too.
        let (f, l) = (dir.path().join("f"), dir.path().join("l"));
        std::fs::write(&f, b"keep").unwrap();
        std::fs::hard_link(&f, &l).unwrap();
        let err = create_snapshot(&f, &l, &mem, &state, Kind::Full).unwrap_err();
        assert!(err.to_string().contains("must be two files"), "{err}");
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        std::fs::remove_file(&f).unwrap();
        std::fs::remove_file(&l).unwrap();
        for bad in [dir.path(), Path::new("/dev/full")] {
            let err = create_snapshot(&s, bad, &mem, &state, Kind::Full).unwrap_err();
            assert!(err.is_client_error(), "{err}");
            assert!(err.to_string().contains(bad.to_str().unwrap()), "{err}");
            let err = create_snapshot(bad, &m, &mem, &state, Kind::Full).unwrap_err();
            assert!(err.is_client_error(), "{err}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn test_create_removes_stale_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let (s, m) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
        let stale = dir.path().join("vm.mem.wisp-tmp.4194999.0123456789abcdef");
        std::fs::write(&stale, b"left by a crash").unwrap();
        let mem = test_memory();
        create_snapshot(&s, &m, &mem, &st(&mem, 0), Kind::Full).unwrap();
        assert!(!stale.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
