// SPDX-License-Identifier: Apache-2.0
//! Binding a Unix socket that only its owner can reach, from its first instant.
//!
//! `bind(2)` creates the socket file with mode `0777 & ~umask`, so binding and
//! then `chmod`-ing leaves a window in which any local user may connect (under
//! umask 000 a process running as `nobody` reached the root API that way).
//! Tightening the umask around `bind` would close it, but the umask belongs
//! to the whole process: another thread creating a file at the same moment (a
//! log, a snapshot, a disk image) would get our mask, or we theirs. So no
//! process-wide state is touched:
//!
//! 1. a fresh directory is made next to the final path with mode 0700 (the
//!    umask can only remove bits from that), so nobody else can reach
//!    anything inside it;
//! 2. the socket is bound inside it and `chmod`-ed to 0600 there;
//! 3. it is hard-linked to the final path, which is atomic and never replaces
//!    an existing file: when the path appears it is already 0600;
//! 4. the private name and directory are removed (the listener keeps working:
//!    Unix sockets are found by inode, and the link is the same inode).

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest socket path the kernel accepts (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Binds a listening Unix socket at `path`, mode 0600, never reachable by
/// another user even for an instant. Fails if `path` exists (remove a stale
/// socket first). The private name is `path`'s directory plus about 16
/// bytes, and must fit in [`MAX_SOCKET_PATH`].
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if path.file_name().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path names no file",
        ));
    }
    let dir = private_dir(parent)?;
    let private = dir.join("s");
    let result = bind_in(&private, path);
    // Best effort: a leftover empty 0700 directory harms nobody.
    let _ = std::fs::remove_file(&private);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn bind_in(private: &Path, path: &Path) -> io::Result<UnixListener> {
    if private.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the socket path's directory is too long: binding privately in it needs \
                 {} bytes, more than the {MAX_SOCKET_PATH} a Unix socket path may have",
                private.as_os_str().len()
            ),
        ));
    }
    let listener = UnixListener::bind(private)?;
    std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o600))?;
    std::fs::hard_link(private, path)?;
    Ok(listener)
}

/// Creates `parent/.wNNNN` with mode 0700 (never wider, whatever the umask).
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".w{:x}.{n:x}", std::process::id()));
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            // Left over by a crashed process with a recycled pid: next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < u32::MAX => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn test_bound_socket_is_0600_connectable_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let l = bind_owner_only(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let _c = UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
    }

    #[test]
    fn test_existing_path_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::write(&path, b"data").unwrap();
        let e = bind_owner_only(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn test_too_long_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("d".repeat(100));
        std::fs::create_dir(&long).unwrap();
        let e = bind_owner_only(&long.join("s")).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
        assert_eq!(std::fs::read_dir(&long).unwrap().count(), 0);
    }
}
