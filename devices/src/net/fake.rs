// SPDX-License-Identifier: Apache-2.0
//! A TAP stand-in over a `SOCK_SEQPACKET` socketpair, for tests, fuzzing and
//! benchmarks that must run without privileges. Each message is one frame with
//! its virtio-net header, exactly as on a real TAP.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::tap::{FrameIov, GuestIovMut, Tap, TapError};

/// The device end of the pair; implements [`Tap`].
#[derive(Debug)]
pub struct FakeTap {
    fd: OwnedFd,
    name: String,
    offload: Arc<AtomicU32>,
}

/// The test's end of the pair: what it sends the device receives, and vice versa.
#[derive(Debug)]
pub struct FakeTapPeer {
    fd: OwnedFd,
    offload: Arc<AtomicU32>,
}

fn set_buf_sizes(fd: RawFd, bytes: libc::c_int) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: `bytes` is a valid c_int for the duration of the call; failure
        // only leaves the default buffer size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl FakeTap {
    /// A connected (device, peer) pair; both ends are non-blocking.
    pub fn pair(name: &str) -> io::Result<(FakeTap, FakeTapPeer)> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair() writes.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        set_buf_sizes(a.as_raw_fd(), 4 << 20);
        set_buf_sizes(b.as_raw_fd(), 4 << 20);
        let offload = Arc::new(AtomicU32::new(0));
        Ok((
            FakeTap {
                fd: a,
                name: name.to_string(),
                offload: offload.clone(),
            },
            FakeTapPeer { fd: b, offload },
        ))
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Tap for FakeTap {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.fd.as_raw_fd(), buf)
    }

    fn read_frame_iov(&mut self, iov: &GuestIovMut<'_>) -> io::Result<usize> {
        iov.readv(self.fd.as_raw_fd())
    }

    fn write_frame(&mut self, frame: &FrameIov<'_>) -> io::Result<usize> {
        frame.writev(self.fd.as_raw_fd())
    }

    fn set_offload(&mut self, flags: u32) -> Result<(), TapError> {
        self.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let ret = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

impl FakeTapPeer {
    /// Queues one frame (header included) for the device to read.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let mut iov = FrameIov::new();
        iov.push_bytes(frame);
        iov.writev(self.fd.as_raw_fd()).map(|_| ())
    }

    /// The next frame the device wrote, or `None` if there is none.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 128 * 1024];
        let n = recv(self.fd.as_raw_fd(), &mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    /// The offload flags the device last set.
    pub fn offload(&self) -> u32 {
        self.offload.load(Ordering::SeqCst)
    }
}

impl AsRawFd for FakeTapPeer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_boundaries() {
        let (mut tap, peer) = FakeTap::pair("fake0").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.send(b"one").unwrap();
        peer.send(b"three").unwrap();
        assert_eq!(tap.read_frame(&mut buf).unwrap(), 3);
        assert_eq!(tap.read_frame(&mut buf).unwrap(), 5);
        let mut iov = FrameIov::new();
        iov.push_bytes(b"ab");
        iov.push_bytes(b"cd");
        tap.write_frame(&iov).unwrap();
        assert_eq!(peer.recv().unwrap(), b"abcd");
        assert!(peer.recv().is_none());
        tap.set_offload(3).unwrap();
        assert_eq!(peer.offload(), 3);
        assert_eq!(tap.name(), "fake0");
    }
}
