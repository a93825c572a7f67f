// SPDX-License-Identifier: Apache-2.0
//! Watching a socket appear: is it ever reachable by another user? Used by
//! `tests/api.rs` and `tests/migration.rs`; needs root (to become `nobody`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `nobody` user and group.
pub const NOBODY: u32 = 65534;
/// A prober's exit status when it connected.
pub const CONNECTED: i32 = 0;
/// A prober's exit status when it never saw the socket.
const PROBE_TIMED_OUT: i32 = 201;

/// Whether this process may become `nobody` (is root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn sockaddr(path: &Path) -> libc::sockaddr_un {
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    addr
}

/// Forks a child that becomes `nobody` and tries to connect to `path`: once
/// if `spin_for` is `None` (exit status: 0 or `connect`'s errno), or else
/// again and again while the path does not exist or nobody listens, for up to
/// `spin_for` (exit status 0 as soon as it connects, `EACCES` as soon as it
/// is refused for lack of permission).
pub fn fork_nobody_prober(path: &Path, spin_for: Option<Duration>) -> libc::pid_t {
    let addr = sockaddr(path);
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let budget_ns = spin_for.map(|d| d.as_nanos() as i64);
    // SAFETY: the child makes only raw system calls (async-signal-safe) on
    // memory prepared before the fork, and ends with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid != 0 {
        return pid;
    }
    // SAFETY: as above; this is the child's only thread.
    unsafe {
        if libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) != 0
            || libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) != 0
        {
            libc::_exit(200);
        }
        let now = || {
            let mut t: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t);
            t.tv_sec * 1_000_000_000 + t.tv_nsec
        };
        let start = now();
        loop {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let r = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
            let errno = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::close(fd);
            let Some(budget) = budget_ns else {
                libc::_exit(errno.clamp(0, 199));
            };
            if errno == 0 || errno == libc::EACCES {
                libc::_exit(errno);
            }
            if now() - start > budget {
                libc::_exit(PROBE_TIMED_OUT);
            }
        }
    }
}

/// Waits for a prober; returns its exit status.
pub fn reap(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status), "prober died: {status}");
    let code = libc::WEXITSTATUS(status);
    assert_ne!(code, 200, "cannot become nobody");
    assert_ne!(code, PROBE_TIMED_OUT, "the prober never saw the socket");
    code
}

/// `connect` as `nobody`, once: 0 or the errno.
pub fn connect_as_nobody(path: &Path) -> i32 {
    reap(fork_nobody_prober(path, None))
}

/// Spawns `wisp` with `args` under umask 000, dying with the test.
pub fn spawn_umask_000(args: &[&str]) -> Child {
    let mut cmd = Command::new(crate::harness::wisp());
    // SAFETY: umask is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    crate::harness::die_with_test(&mut cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wisp")
}

/// Watches a directory with inotify and records the mode of every entry the
/// moment it is created, moved in or has its attributes changed.
pub struct ModeWatch {
    fd: libc::c_int,
    dir: PathBuf,
    /// Every (name, mode) seen, in order.
    pub seen: Vec<(String, u32)>,
}

impl ModeWatch {
    /// Starts watching `dir`.
    pub fn new(dir: &Path) -> Self {
        // SAFETY: plain syscall; the fd is owned by the returned value.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB;
        // SAFETY: `c` is a valid C string for the call.
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Self {
            fd,
            dir: dir.to_path_buf(),
            seen: Vec::new(),
        }
    }

    /// Records events until `name` has been seen (20 s at most).
    pub fn until(&mut self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.seen.iter().any(|(n, _)| n == name) {
            assert!(
                Instant::now() < deadline,
                "{name} never appeared: {:?}",
                self.seen
            );
            self.poll(Duration::from_millis(50));
        }
    }

    fn poll(&mut self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a buffer of the given length.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        let head = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0usize;
        while at + head <= n as usize {
            // SAFETY: the kernel wrote a whole event at `at`; read unaligned.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
            let name_bytes = &buf[at + head..at + head + ev.len as usize];
            let name = String::from_utf8_lossy(name_bytes)
                .trim_end_matches('\0')
                .to_string();
            at += head + ev.len as usize;
            if name.is_empty() {
                continue;
            }
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::symlink_metadata(self.dir.join(&name)) {
                self.seen.push((name, m.permissions().mode() & 0o7777));
            }
        }
    }

    /// Entries ever seen with any group or other permission bit.
    pub fn exposed(&self) -> Vec<(String, u32)> {
        self.seen
            .iter()
            .filter(|(_, m)| m & 0o077 != 0)
            .cloned()
            .collect()
    }
}

impl Drop for ModeWatch {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

/// A world-traversable directory (mode 0777, like a shared runtime directory)
/// with a control socket in it that `nobody` can reach: proves the probes
/// would notice an exposed socket.
pub fn shared_dir(dir: &crate::harness::TempDir) -> std::os::unix::net::UnixListener {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let control = dir.path("control.sock");
    let l = std::os::unix::net::UnixListener::bind(&control).unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(
        connect_as_nobody(&control),
        CONNECTED,
        "control unreachable"
    );
    l
}
