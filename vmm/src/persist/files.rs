// SPDX-License-Identifier: Apache-2.0
//! File safety for snapshot files: what a destination path may be, private
//! (0600) temporary files next to it, removal of temporaries a crashed
//! create left behind, and opening a snapshot file for reading.
//!
//! Policy (see `docs/snapshot-format.md`, "File safety"):
//!
//! - wisp writes a snapshot file only over a **regular file** or at a **new
//!   path** in an existing directory. A directory, device node, FIFO or socket
//!   is refused before anything is written.
//! - A **symbolic link** as the last component is refused: a snapshot
//!   replaces its files by `rename`, which would replace the link itself, not
//!   what it points to. Links in the directory part of the path are followed.
//! - Files are created `0600` (`O_CREAT | O_EXCL` with the mode, never a
//!   `chmod` afterwards), so guest RAM is never readable by other users, not
//!   even for an instant.
//! - A temporary is named `<target>.wisp-tmp.<pid>.<16 hex digits>` and held
//!   under an exclusive `flock` while it is written. A later create removes a
//!   temporary only if it has that name, is a regular file owned by the same
//!   user, nobody holds its lock, and its PID is dead (or is ours): a crashed
//!   writer's lock is gone, a live writer's is not.

use std::fs::{File, FileType, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// What every temporary's name holds between the target's name and the PID.
pub const TEMP_TAG: &str = ".wisp-tmp.";

/// Why a snapshot file cannot be written or read where asked.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path names something other than a regular file.
    #[error("{path} {kind}: {why}")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is ("is a directory", ...).
        kind: &'static str,
        /// Why that is refused.
        why: &'static str,
    },
    /// The path is a symbolic link.
    #[error(
        "{path} is a symbolic link: a snapshot replaces its files by rename, which would replace the link and not its target; give the path of the file itself"
    )]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// The directory that would hold a new file is missing or not a directory.
    #[error("Cannot create {path}: {dir} {problem}")]
    BadDirectory {
        /// The path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// "does not exist" or "is not a directory".
        problem: &'static str,
    },
    /// A system call failed.
    #[error("Cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// Whether the request (the path given) is at fault rather than the host.
    pub fn is_client_error(&self) -> bool {
        match self {
            Self::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(
                    libc::ENOENT
                        | libc::ENOTDIR
                        | libc::EISDIR
                        | libc::EACCES
                        | libc::EPERM
                        | libc::ENAMETOOLONG
                        | libc::ELOOP
                        | libc::EROFS
                )
            ),
            _ => true,
        }
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, FileError>;

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// "is a directory", "is a FIFO", ... for a file that is not regular.
fn kind_name(t: FileType) -> &'static str {
    if t.is_dir() {
        "is a directory"
    } else if t.is_char_device() {
        "is a character device"
    } else if t.is_block_device() {
        "is a block device"
    } else if t.is_fifo() {
        "is a FIFO"
    } else if t.is_socket() {
        "is a socket"
    } else if t.is_symlink() {
        "is a symbolic link"
    } else {
        "is not a regular file"
    }
}

const WRITE_WHY: &str =
    "wisp writes a snapshot only over a regular file or at a new path, never into or over anything else";
const READ_WHY: &str = "a snapshot is read only from a regular file";

/// The directory holding `path` ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks that `path` may receive a snapshot file: a regular file (to be
/// replaced) or a new name in an existing directory. Never follows a
/// symbolic link as the last component (`lstat`).
pub fn check_target(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_file() => Ok(()),
        Ok(md) if md.file_type().is_symlink() => Err(FileError::Symlink {
            path: path.to_path_buf(),
        }),
        Ok(md) => Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_name(md.file_type()),
            why: WRITE_WHY,
        }),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            let dir = parent_dir(path);
            let bad = |problem| FileError::BadDirectory {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
                problem,
            };
            match std::fs::metadata(dir) {
                Ok(md) if md.is_dir() => Ok(()),
                Ok(_) => Err(bad("is not a directory")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad("does not exist")),
                Err(e) => Err(io_err("inspect directory", dir)(e)),
            }
        }
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

/// Whether `a` and `b` name the same file: the same path, or (both existing)
/// the same inode.
pub fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Opens `path` for reading, refusing anything but a regular file. Opens
/// non-blocking, so a FIFO given by mistake is refused instead of hanging.
pub fn open_regular(path: &Path, write: bool) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("open", path))?;
    let md = file.metadata().map_err(io_err("stat", path))?;
    if !md.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_name(md.file_type()),
            why: READ_WHY,
        });
    }
    Ok(file)
}

/// `n` random bytes from the kernel (`getrandom`).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most `N - filled` bytes into `buf[filled..]`, which
        // we own and which is that long.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // getrandom(2) cannot fail otherwise on Linux >= 3.17; fall back
            // to the clock and PID so ids still differ between creates.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let seed = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
            for (i, b) in buf.iter_mut().enumerate().skip(filled) {
                *b = seed[i % seed.len()] ^ (i as u8);
            }
            break;
        }
    }
    buf
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A private temporary file next to a target, locked while it is written and
/// removed on drop unless renamed into place.
#[derive(Debug)]
pub struct TempFile {
    /// The open file (read-write, mode 0600).
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    renamed: bool,
}

impl TempFile {
    /// Creates `<target>.wisp-tmp.<pid>.<random>` in `target`'s directory,
    /// mode 0600, exclusively (`O_EXCL | O_NOFOLLOW`), under an exclusive
    /// `flock`.
    pub fn create(target: &Path) -> Result<Self> {
        let mut name = target
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(format!(
            "{TEMP_TAG}{}.{}",
            std::process::id(),
            hex(&random_bytes::<8>())
        ));
        let path = target.with_file_name(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let tmp = Self {
            file,
            path,
            renamed: false,
        };
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(tmp.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io_err("lock", &tmp.path)(std::io::Error::last_os_error()));
        }
        Ok(tmp)
    }

    /// fsyncs the file's data and metadata.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(io_err("fsync", &self.path))
    }

    /// Renames the file over `target` (not yet durable: fsync the directory).
    pub fn rename_to(&mut self, target: &Path) -> Result<()> {
        std::fs::rename(&self.path, target).map_err(io_err("rename into place", target))?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            // Best effort: an error path; the name may already be gone.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// fsyncs directory `dir` so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// The PID in a temporary's file name, if the name is one of ours.
pub fn temp_pid(name: &str) -> Option<u32> {
    let at = name.rfind(TEMP_TAG)?;
    if at == 0 {
        return None;
    }
    let (pid, rand) = name[at + TEMP_TAG.len()..].split_once('.')?;
    let ok = !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && rand.len() == 16
        && rand.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        pid.parse().ok()
    } else {
        None
    }
}

fn pid_is_dead(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Whether the temporary at `path` (named for `pid`) was left by a writer
/// that is gone; if so it is removed. See the module docs for the rules.
fn remove_if_stale(path: &Path, pid: u32) -> bool {
    if pid != std::process::id() && !pid_is_dead(pid) {
        return false;
    }
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return false;
    };
    let Ok(md) = file.metadata() else {
        return false;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !md.file_type().is_file() || md.uid() != uid {
        return false;
    }
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return false; // someone is writing it
    }
    // Still the same file under that name (not swapped since we looked)?
    match std::fs::symlink_metadata(path) {
        Ok(now) if now.dev() == md.dev() && now.ino() == md.ino() => {}
        _ => return false,
    }
    std::fs::remove_file(path).is_ok()
}

/// Removes the stale temporaries (see the module docs) in `dir`; returns
/// their names. Best effort: a directory that cannot be listed is skipped.
pub fn clean_stale_temps(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = temp_pid(name) else { continue };
        if remove_if_stale(&e.path(), pid) {
            log::info!(
                "removed {}, a temporary file left by an interrupted snapshot (PID {pid})",
                e.path().display()
            );
            removed.push(name.to_string());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn test_check_target_accepts_only_regular_files_and_new_paths() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        check_target(&file).unwrap();
        check_target(&dir.path().join("new")).unwrap();
        let err = check_target(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let err = check_target(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("/dev/null is a character device"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            check_target(&link),
            Err(FileError::Symlink { .. })
        ));
        let err = check_target(&dir.path().join("missing/x")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = check_target(&file.join("x")).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert!(err.is_client_error());
    }

    #[test]
    fn test_temp_file_is_private_and_removed_unless_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vm.mem");
        let tmp = TempFile::create(&target).unwrap();
        let mode = tmp.file.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let name = tmp.path.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(temp_pid(&name), Some(std::process::id()));
        // Locked while held: a cleaner leaves it alone even for our PID.
        assert!(clean_stale_temps(dir.path()).is_empty());
        drop(tmp);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut tmp = TempFile::create(&target).unwrap();
        tmp.rename_to(&target).unwrap();
        drop(tmp);
        let md = std::fs::metadata(&target).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn test_stale_temps_are_removed_only_when_provably_ours_and_dead() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // A PID that cannot be alive (above the kernel's pid_max limit).
        let dead = "vm.mem.wisp-tmp.4194999.0123456789abcdef";
        std::fs::write(p(dead), b"stale").unwrap();
        // Alive PID (1): kept.
        let alive = "vm.mem.wisp-tmp.1.0123456789abcdef";
        std::fs::write(p(alive), b"x").unwrap();
        // Not our pattern: kept.
        for other in [
            "vm.mem.tmp.4194999",
            "vm.mem.wisp-tmp.4194999.xyz",
            ".wisp-tmp.4194999.0123456789abcdef",
        ] {
            std::fs::write(p(other), b"x").unwrap();
        }
        // A directory with our pattern: kept.
        std::fs::create_dir(p("d.wisp-tmp.4194999.0123456789abcdef")).unwrap();
        let removed = clean_stale_temps(dir.path());
        assert_eq!(removed, vec![dead.to_string()]);
        assert!(!p(dead).exists());
        assert!(p(alive).exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5);
    }

    #[test]
    fn test_open_regular_refuses_fifo_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_regular(&fifo, false).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        assert_eq!(random_bytes::<16>().len(), 16);
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }
}
