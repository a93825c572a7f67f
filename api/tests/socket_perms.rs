// SPDX-License-Identifier: Apache-2.0
//! The API socket is never reachable by another user, even when the process
//! runs under umask 000. Its own test binary: it sets the process's umask.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use api::ApiServer;

const NOBODY: u32 = 65534;

/// Connects to `path` from a forked child running as `nobody`; returns the
/// child's `connect` errno (0 if it connected).
fn connect_as_nobody(path: &Path) -> i32 {
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the child only makes raw system calls (async-signal-safe) on
    // memory prepared before the fork, then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: raw syscalls on this (the only) thread; `addr` is valid.
        unsafe {
            if libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) != 0
                || libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) != 0
            {
                libc::_exit(200);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let r = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
            let code = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::_exit(code.clamp(0, 199));
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status), "child died: {status}");
    let code = libc::WEXITSTATUS(status);
    assert_ne!(code, 200, "cannot become nobody");
    code
}

#[test]
fn test_api_socket_under_umask_000_is_0600_and_refuses_nobody() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: needs root to connect as nobody");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A directory anyone may traverse, as a shared runtime directory would be.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // SAFETY: umask has no preconditions; this binary has no other test.
    let old = unsafe { libc::umask(0) };
    // Control: with umask 000 a plainly bound socket is open to nobody, so
    // the check below can tell.
    let control = dir.path().join("control.sock");
    let _l = UnixListener::bind(&control).unwrap();
    assert_eq!(
        connect_as_nobody(&control),
        0,
        "the control is not reachable"
    );
    for i in 0..20 {
        let path = dir.path().join(format!("api{i}.sock"));
        let (handle, _rx) = ApiServer::start(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(connect_as_nobody(&path), libc::EACCES);
        handle.shutdown();
    }
    // Only the control is left: no private directory stays behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
}
