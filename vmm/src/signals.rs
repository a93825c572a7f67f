// SPDX-License-Identifier: Apache-2.0
//! SIGINT/SIGTERM/SIGHUP become an event in the VMM's event loop, so the VM is
//! stopped and the terminal restored in one place.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(num: libc::c_int) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` outlives the call and the
        // fd is an eventfd kept open for the process's life.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Routes SIGINT, SIGTERM and SIGHUP to the returned eventfd.
pub fn install() -> std::io::Result<EventFd> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let keep = evt.try_clone()?;
    SIGNAL_FD.store(keep.as_raw_fd(), Ordering::SeqCst);
    std::mem::forget(keep);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only does async-signal-safe work.
        let r = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if r == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(evt)
}

/// The last signal received (0 if none).
pub fn last_signal() -> i32 {
    LAST_SIGNAL.load(Ordering::SeqCst)
}

/// A signal's name for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
