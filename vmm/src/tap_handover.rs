// SPDX-License-Identifier: Apache-2.0
//! Handing TAPs over between two wisp processes on one host (live migration).
//!
//! A single-queue TAP can be open in one process only, so a receiver on the
//! source's host cannot open the VM's TAP by name. Instead the source offers
//! its TAP fds (its pid and fd numbers) together with the identity of its host
//! and namespaces; a receiver in the same host and namespaces takes duplicates
//! with `pidfd_getfd(2)`. The TAP, its bridge port and the frames queued
//! while the guest is paused all carry over; if the migration fails the source
//! simply keeps its fd. A receiver anywhere else opens its own TAPs by name.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use devices::net::TapDevice;
use serde::{Deserialize, Serialize};

/// Which host, network namespace and PID namespace a process runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// Inode of `/proc/self/ns/net`.
    pub net_ns: u64,
    /// Inode of `/proc/self/ns/pid`.
    pub pid_ns: u64,
}

impl HostIdentity {
    /// This process's identity, or `None` if `/proc` does not tell.
    pub fn current() -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let ns = |n: &str| std::fs::metadata(format!("/proc/self/ns/{n}")).map(|m| m.ino());
        Some(Self {
            boot_id: boot_id.trim().to_string(),
            net_ns: ns("net").ok()?,
            pid_ns: ns("pid").ok()?,
        })
    }
}

/// One TAP a source offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedTap {
    /// Interface name.
    pub name: String,
    /// Its fd number in the source process.
    pub fd: RawFd,
    /// Whether wisp created the interface.
    pub created: bool,
}

/// The TAPs a migrating VM leaves behind for a receiver on the same host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapOffer {
    /// Where the source runs (`None`: unknown, never taken).
    pub host: Option<HostIdentity>,
    /// The source's pid.
    pub pid: u32,
    /// The TAPs.
    pub taps: Vec<OfferedTap>,
}

/// The TAPs taken over, by interface name.
pub type AdoptedTaps = HashMap<String, TapDevice>;

impl TapOffer {
    /// An offer of `taps` (name, fd, created) from this process.
    pub fn new(taps: impl IntoIterator<Item = (String, RawFd, bool)>) -> Self {
        Self {
            host: HostIdentity::current(),
            pid: std::process::id(),
            taps: taps
                .into_iter()
                .map(|(name, fd, created)| OfferedTap { name, fd, created })
                .collect(),
        }
    }

    /// Whether the offer comes from this host and these namespaces (so its
    /// pid and TAP names mean the same here).
    pub fn is_local(&self) -> bool {
        self.host.is_some() && self.host == HostIdentity::current()
    }

    /// Takes duplicates of the offered TAPs if the source runs on this host,
    /// or nothing if it runs elsewhere (the receiver then opens its TAPs by
    /// name).
    pub fn take(&self) -> Result<AdoptedTaps, String> {
        let mut adopted = AdoptedTaps::new();
        if self.taps.is_empty() || !self.is_local() {
            return Ok(adopted);
        }
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| format!("Invalid source pid {} in the TAP hand-over", self.pid))?;
        let pidfd = pidfd_open(pid).map_err(|e| {
            format!(
                "Cannot take over the TAPs of the source wisp (pid {pid}) on this host: pidfd_open: {e}"
            )
        })?;
        for t in &self.taps {
            let fd = pidfd_getfd(&pidfd, t.fd).map_err(|e| {
                format!(
                    "Cannot take over TAP {} from the source wisp (pid {pid}, fd {}): pidfd_getfd: {e}{}",
                    t.name,
                    t.fd,
                    if e.raw_os_error() == Some(libc::EPERM) {
                        " (needs the same user and ptrace permission, e.g. CAP_SYS_PTRACE)"
                    } else {
                        ""
                    }
                )
            })?;
            let tap = TapDevice::adopt(fd, &t.name, t.created)
                .map_err(|e| format!("The source's fd {} is not TAP {}: {e}", t.fd, t.name))?;
            adopted.insert(t.name.clone(), tap);
        }
        Ok(adopted)
    }
}

fn pidfd_open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd
    // or -1; it touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target_fd: RawFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes two fds and flags by value and returns a new
    // fd or -1; it touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd (a duplicate in this process)
    // that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_identity_is_stable_and_local() {
        let a = HostIdentity::current().expect("/proc is mounted");
        assert_eq!(Some(a.clone()), HostIdentity::current());
        assert!(!a.boot_id.is_empty());
        let offer = TapOffer::new([]);
        assert!(offer.is_local());
        assert!(offer.take().unwrap().is_empty());
    }

    #[test]
    fn test_offer_from_another_host_takes_nothing() {
        let mut offer = TapOffer::new([("tap0".to_string(), 3, true)]);
        offer.host.as_mut().unwrap().boot_id = "another-host".into();
        assert!(!offer.is_local());
        assert!(offer.take().unwrap().is_empty());
        offer.host = None;
        assert!(offer.take().unwrap().is_empty());
    }

    #[test]
    fn test_offer_of_a_non_tap_fd_is_refused() {
        // This process's stdin/any open file is not a TAP: adoption checks.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        use std::os::fd::AsRawFd;
        let offer = TapOffer::new([("tap0".to_string(), f.as_raw_fd(), false)]);
        let e = offer.take().unwrap_err();
        assert!(e.contains("is not TAP tap0"), "{e}");
    }

    #[test]
    fn test_offer_from_a_dead_process_fails_clearly() {
        let mut offer = TapOffer::new([("tap0".to_string(), 3, false)]);
        // Pid 0x3fff_fff0 is above pid_max: no such process.
        offer.pid = 0x3fff_fff0;
        let e = offer.take().unwrap_err();
        assert!(e.contains("pidfd_open"), "{e}");
    }
}
