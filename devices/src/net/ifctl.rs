// SPDX-License-Identifier: Apache-2.0
//! Thin, checked wrappers over the network interface ioctls wisp needs
//! (`SIOC*`, bridge port add/remove). They act in the calling thread's network
//! namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SIOCBRADDIF`: add a port to a bridge (not exported by libc for Linux).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
/// `SIOCBRDELIF`: remove a port from a bridge.
const SIOCBRDELIF: libc::c_ulong = 0x89a3;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Why an interface name is unusable, or `None` if it is fine.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are reserved")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("it contains '/', ':', whitespace or a control character")
    } else {
        None
    }
}

/// An `ifreq` carrying `name` (which must have passed [`name_problem`]).
pub fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (arrays, integers, a union of those and a
    // raw pointer); all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(MAX_IFNAME_LEN))
    {
        *dst = src as libc::c_char;
    }
    req
}

/// The interface name an ioctl wrote into `req` (up to its first NUL).
pub fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A datagram socket to issue interface ioctls on.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues `request` with `req` on a control socket.
fn ifreq_ioctl(request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    let sock = ctl_socket()?;
    // SAFETY: every request used here reads and/or writes one `struct ifreq`,
    // which `req` points to and which outlives the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interface index of `name`, or `None` if no such interface exists.
pub fn if_index(name: &str) -> io::Result<Option<u32>> {
    let mut req = ifreq(name);
    match ifreq_ioctl(libc::SIOCGIFINDEX, &mut req) {
        // SAFETY: SIOCGIFINDEX filled in the `ifru_ifindex` member.
        Ok(()) => Ok(Some(unsafe { req.ifr_ifru.ifru_ifindex } as u32)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The interface flags (`IFF_*`) of `name`.
pub fn flags(name: &str) -> io::Result<libc::c_int> {
    let mut req = ifreq(name);
    ifreq_ioctl(libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled in the `ifru_flags` member.
    Ok(libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff)
}

/// Sets or clears `IFF_UP` on `name`.
pub fn set_up(name: &str, up: bool) -> io::Result<()> {
    let current = flags(name)?;
    let wanted = if up {
        current | libc::IFF_UP
    } else {
        current & !libc::IFF_UP
    };
    if wanted == current {
        return Ok(());
    }
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_flags = wanted as libc::c_short;
    ifreq_ioctl(libc::SIOCSIFFLAGS, &mut req)
}

/// Sets the MTU of `name`.
pub fn set_mtu(name: &str, mtu: u16) -> io::Result<()> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    ifreq_ioctl(libc::SIOCSIFMTU, &mut req)
}

/// The MTU of `name`.
pub fn mtu(name: &str) -> io::Result<u32> {
    let mut req = ifreq(name);
    ifreq_ioctl(libc::SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU filled in the `ifru_mtu` member.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Sets the Ethernet hardware address of `name`.
pub fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut req = ifreq(name);
    // SAFETY: writing plain integers into the `ifru_hwaddr` member of a
    // zeroed union; SIOCSIFHWADDR reads exactly that member.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
    }
    ifreq_ioctl(libc::SIOCSIFHWADDR, &mut req)
}

/// The Ethernet hardware address of `name`.
pub fn mac(name: &str) -> io::Result<[u8; 6]> {
    let mut req = ifreq(name);
    ifreq_ioctl(libc::SIOCGIFHWADDR, &mut req)?;
    let mut mac = [0u8; 6];
    // SAFETY: SIOCGIFHWADDR filled in the `ifru_hwaddr` member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    for (dst, src) in mac.iter_mut().zip(data) {
        *dst = src as u8;
    }
    Ok(mac)
}

/// Adds (`add`) or removes the interface with index `port` to/from `bridge`.
pub fn bridge_port(bridge: &str, port: u32, add: bool) -> io::Result<()> {
    let mut req = ifreq(bridge);
    req.ifr_ifru.ifru_ifindex = port as libc::c_int;
    ifreq_ioctl(if add { SIOCBRADDIF } else { SIOCBRDELIF }, &mut req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name_problem("tap0").is_none());
        assert!(name_problem("wisp-tap-123456").is_none());
        assert!(name_problem("").is_some());
        assert!(name_problem("wisp-tap-1234567").is_some());
        assert!(name_problem("a/b").is_some());
        assert!(name_problem("a b").is_some());
        assert!(name_problem("a\tb").is_some());
        assert!(name_problem("..").is_some());
        let req = ifreq("tap0");
        assert_eq!(
            req.ifr_name[..5],
            [b't' as _, b'a' as _, b'p' as _, b'0' as _, 0]
        );
    }
}
