// SPDX-License-Identifier: Apache-2.0
//! Each filter, installed in a forked child: allowed calls work, others kill.

use super::*;

/// Forks; the child installs `kind`'s filter, runs `f` (raw system calls
/// only: the child of a threaded process) and exits 0. Returns the child's
/// wait status.
fn in_child(filters: &Filters, kind: ThreadKind, f: fn()) -> i32 {
    // SAFETY: the child only makes system calls (installing a filter
    // allocates nothing) on memory prepared before the fork, then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        if filters.install(kind).is_err() {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(100) };
        }
        f();
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

fn killed_by_sigsys(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

fn exited_ok(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

fn open_a_socket() {
    // SAFETY: plain system call.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

/// Exits 3 unless a read-only open fails with EACCES.
fn open_is_refused() {
    // SAFETY: a valid C string.
    let fd = unsafe { libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY) };
    // SAFETY: reads this thread's errno.
    if fd != -1 || unsafe { *libc::__errno_location() } != libc::EACCES {
        // SAFETY: ends the child.
        unsafe { libc::_exit(3) };
    }
}

/// Exits 3 unless a read-only open works.
fn read_only_open_works() {
    // SAFETY: a valid C string.
    let fd = unsafe { libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        // SAFETY: ends the child.
        unsafe { libc::_exit(3) };
    }
}

fn create_a_file() {
    // SAFETY: a valid C string; had it been allowed, a file in /tmp.
    unsafe {
        libc::open(
            c"/tmp/wisp-seccomp-test".as_ptr(),
            libc::O_WRONLY | libc::O_CREAT,
            0o600,
        )
    };
}

fn spawn_a_process() {
    // SAFETY: plain system call; fork's number, argument-less.
    unsafe { libc::syscall(libc::SYS_fork) };
}

fn kvm_run() {
    // SAFETY: an ioctl on an invalid descriptor, had it been allowed.
    unsafe { libc::ioctl(-1, 0xae80, 0) };
}

fn everyday_calls() {
    let word = 0u32;
    // SAFETY: a 0-byte write to stderr, a futex wake on a local word and
    // getpid: valid arguments, nothing written.
    unsafe {
        libc::write(2, (&word as *const u32).cast(), 0);
        libc::syscall(libc::SYS_futex, &word as *const u32, libc::FUTEX_WAKE, 1);
        libc::getpid();
    }
}

fn dirty_log_ioctl() {
    // SAFETY: KVM_GET_DIRTY_LOG on an invalid descriptor: EBADF, not death.
    unsafe { libc::ioctl(-1, 0x4010_ae42, 0) };
}

#[test]
fn test_every_thread_kind_has_a_filter_and_it_allows_everyday_calls() {
    let filters = Filters::embedded().unwrap();
    for kind in ThreadKind::ALL {
        let st = in_child(&filters, kind, everyday_calls);
        assert!(exited_ok(st), "{kind:?}: status {st:#x}");
    }
    let st = in_child(&filters, ThreadKind::MigrationSender, dirty_log_ioctl);
    assert!(exited_ok(st), "sender dirty-log ioctl: status {st:#x}");
}

#[test]
fn test_forbidden_calls_kill_in_every_thread_kind() {
    let filters = Filters::embedded().unwrap();
    for kind in ThreadKind::ALL {
        for (what, f) in [
            ("socket", open_a_socket as fn()),
            ("fork", spawn_a_process),
            ("KVM_RUN", kvm_run),
        ] {
            let st = in_child(&filters, kind, f);
            assert!(killed_by_sigsys(st), "{kind:?} {what}: status {st:#x}");
        }
    }
    // Opening files: refused (EACCES, glibc copes) where no file is needed;
    // the sender may only open read-only, never create.
    for kind in [ThreadKind::Api, ThreadKind::MigrationReceiver] {
        for f in [open_is_refused as fn(), create_a_file] {
            let st = in_child(&filters, kind, f);
            assert!(exited_ok(st), "{kind:?}: status {st:#x}");
        }
    }
    let st = in_child(&filters, ThreadKind::MigrationSender, read_only_open_works);
    assert!(exited_ok(st), "sender pagemap: status {st:#x}");
    let st = in_child(&filters, ThreadKind::MigrationSender, create_a_file);
    assert!(killed_by_sigsys(st), "sender create: status {st:#x}");
    assert!(!std::path::Path::new("/tmp/wisp-seccomp-test").exists());
}

#[test]
fn test_policy_errors_are_clear() {
    let e = Filters::compile("{not json").unwrap_err();
    assert!(matches!(e, SeccompError::Compile(_)), "{e}");
    let e = Filters::compile(
        r#"{"api": {"mismatch_action": "kill_process", "match_action": "allow", "filter": []}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("migration_receiver"), "{e}");
}
