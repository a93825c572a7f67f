// SPDX-License-Identifier: Apache-2.0
//! TAP devices carrying frames prefixed by a 12-byte virtio-net header.
//!
//! [`Tap`] is what the virtio-net device needs from its backend; [`TapDevice`]
//! implements it over `/dev/net/tun`, and [`super::fake::FakeTap`] over a
//! socketpair for tests without privileges.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, BitmapSlice, BS};
use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::VolatileSlice;

use super::ifctl;

/// Size of the virtio-net header exchanged with the TAP (virtio 1.x layout,
/// including `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Why a TAP could not be opened or configured. Every variant names the TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("Invalid TAP name '{name}': {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("Cannot open /dev/net/tun for TAP {name}: {source}")]
    OpenTun {
        /// The TAP.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process has the (single-queue) TAP open.
    #[error("TAP {name} is in use by another process")]
    Busy {
        /// The TAP.
        name: String,
    },
    /// Creating or attaching to the TAP is not allowed.
    #[error("No permission to create or open TAP {name} (needs CAP_NET_ADMIN, or a persistent TAP owned by this user)")]
    Permission {
        /// The TAP.
        name: String,
    },
    /// An interface of that name exists but is not a TAP usable by wisp.
    #[error("Interface {name} exists but is not a single-queue TAP device")]
    NotTap {
        /// The interface.
        name: String,
    },
    /// A configuration ioctl failed.
    #[error("TAP {name}: {op} failed: {source}")]
    Ioctl {
        /// The TAP.
        name: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A frame to send, as a list of buffers (virtio-net header first) that may
/// point into guest memory. Built from bounds-checked [`VolatileSlice`]s, so the
/// memory stays valid for `'a`.
#[derive(Debug, Default)]
pub struct FrameIov<'a> {
    iovs: Vec<libc::iovec>,
    guards: Vec<PtrGuard>,
    len: usize,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> FrameIov<'a> {
    /// An empty frame.
    pub fn new() -> Self {
        Self {
            iovs: Vec::new(),
            guards: Vec::new(),
            len: 0,
            _mem: PhantomData,
        }
    }

    /// Appends a region of guest memory.
    pub fn push_slice<B: BitmapSlice>(&mut self, slice: &VolatileSlice<'a, B>) {
        let guard = slice.ptr_guard();
        self.iovs.push(libc::iovec {
            iov_base: guard.as_ptr() as *mut libc::c_void,
            iov_len: guard.len(),
        });
        self.len += guard.len();
        self.guards.push(guard);
    }

    /// Appends ordinary memory.
    pub fn push_bytes(&mut self, bytes: &'a [u8]) {
        self.iovs.push(libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        });
        self.len += bytes.len();
    }

    /// Total bytes, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes were added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the whole frame to `fd` with a single `writev`.
    pub fn writev(&self, fd: RawFd) -> io::Result<usize> {
        let count = libc::c_int::try_from(self.iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points to memory valid for reads for `'a` (guest
        // memory checked by `VolatileSlice`, or a borrowed byte slice), and `self`
        // borrows it for at least the duration of this call.
        let ret = unsafe { libc::writev(fd, self.iovs.as_ptr(), count) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }
}

/// A slice of wisp guest memory (see [`crate::GuestMemoryMmap`]).
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// Buffers kept inline in [`GuestIovMut`] before it allocates.
const INLINE_IOVS: usize = 4;

const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// Guest buffers a frame is read into directly (`readv`). After a read,
/// [`GuestIovMut::mark_dirty`] records the written bytes in the dirty bitmap.
/// Up to four buffers need no allocation.
#[derive(Debug)]
pub struct GuestIovMut<'a> {
    inline_iovs: [libc::iovec; INLINE_IOVS],
    inline_bufs: [Option<(GuestSlice<'a>, PtrGuardMut)>; INLINE_IOVS],
    spill_iovs: Vec<libc::iovec>,
    spill_bufs: Vec<(GuestSlice<'a>, PtrGuardMut)>,
    count: usize,
    len: usize,
}

impl Default for GuestIovMut<'_> {
    fn default() -> Self {
        Self {
            inline_iovs: [EMPTY_IOV; INLINE_IOVS],
            inline_bufs: Default::default(),
            spill_iovs: Vec::new(),
            spill_bufs: Vec::new(),
            count: 0,
            len: 0,
        }
    }
}

impl<'a> GuestIovMut<'a> {
    /// No buffers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a bounds-checked region of guest memory.
    pub fn push_slice(&mut self, slice: GuestSlice<'a>) {
        let guard = slice.ptr_guard_mut();
        let iov = libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: guard.len(),
        };
        self.len += guard.len();
        if self.count < INLINE_IOVS {
            self.inline_iovs[self.count] = iov;
            self.inline_bufs[self.count] = Some((slice, guard));
        } else {
            if self.count == INLINE_IOVS {
                self.spill_iovs.extend_from_slice(&self.inline_iovs);
            }
            self.spill_iovs.push(iov);
            self.spill_bufs.push((slice, guard));
        }
        self.count += 1;
    }

    fn iovs(&self) -> &[libc::iovec] {
        if self.count <= INLINE_IOVS {
            &self.inline_iovs[..self.count]
        } else {
            &self.spill_iovs
        }
    }

    /// Total capacity in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no capacity.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads one datagram/frame from `fd` into the buffers with one `readv`.
    pub fn readv(&self, fd: RawFd) -> io::Result<usize> {
        let iovs = self.iovs();
        let count = libc::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points to guest memory checked by `VolatileSlice`
        // and valid for writes for `'a`, which `self` borrows (with its guard).
        let ret = unsafe { libc::readv(fd, iovs.as_ptr(), count) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }

    /// Marks the first `n` bytes as written in the guest dirty bitmap.
    pub fn mark_dirty(&self, n: usize) {
        let mut left = n;
        let bufs = self
            .inline_bufs
            .iter()
            .flatten()
            .chain(self.spill_bufs.iter());
        for (slice, _) in bufs {
            if left == 0 {
                break;
            }
            let len = left.min(slice.len());
            slice.bitmap().mark_dirty(0, len);
            left -= len;
        }
    }
}

/// What the virtio-net device needs from a TAP-like backend. Frames always
/// carry a [`VNET_HDR_LEN`]-byte virtio-net header. The fd must be
/// non-blocking: reads return `WouldBlock` when no frame is queued.
pub trait Tap: AsRawFd + Send {
    /// The interface name (for errors and state).
    fn name(&self) -> &str;
    /// Reads one frame (header included) into `buf`, returning its length.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Reads one frame (header included) straight into guest buffers. The
    /// buffers must be able to hold any frame (the rest would be lost).
    fn read_frame_iov(&mut self, iov: &GuestIovMut<'_>) -> io::Result<usize>;
    /// Writes one frame (header included) in one operation.
    fn write_frame(&mut self, frame: &FrameIov<'_>) -> io::Result<usize>;
    /// Tells the backend which offloads (`TUN_F_*`) the guest accepts on RX.
    fn set_offload(&mut self, flags: u32) -> Result<(), TapError>;
}

/// A TAP opened through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
///
/// If the interface did not exist it is created non-persistent, so the kernel
/// deletes it (and removes it from any bridge) when this fd is closed — also
/// when the process dies from SIGKILL. A pre-existing persistent TAP is left in
/// place.
#[derive(Debug)]
pub struct TapDevice {
    file: File,
    name: String,
    created: bool,
}

impl TapDevice {
    /// Opens the TAP `name`, creating it if it does not exist, with a 12-byte
    /// virtio-net header, no offloads and a non-blocking fd.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if let Some(reason) = ifctl::name_problem(name) {
            return Err(TapError::InvalidName {
                name: name.to_string(),
                reason,
            });
        }
        let ioctl_err = |op, source| TapError::Ioctl {
            name: name.to_string(),
            op,
            source,
        };
        let existed = ifctl::if_index(name)
            .map_err(|e| ioctl_err("looking up the interface", e))?
            .is_some();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
                    name: name.to_string(),
                },
                _ => TapError::OpenTun {
                    name: name.to_string(),
                    source,
                },
            })?;
        let mut req = ifctl::ifreq(name);
        // No IFF_TUN_EXCL: an existing persistent TAP must be usable.
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is;
        // the fd is a valid /dev/net/tun file.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name },
                Some(libc::EINVAL) if existed => TapError::NotTap { name },
                _ => TapError::Ioctl {
                    name,
                    op: "TUNSETIFF",
                    source,
                },
            });
        }
        let mut tap = TapDevice {
            file,
            name: name.to_string(),
            created: !existed,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
        let ret =
            unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        if ret < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Adopts `fd`, an open TAP handed over by another process (live
    /// migration on one host): checks that it is the TAP `name` with a
    /// virtio-net header and makes it non-blocking. `created` says whether
    /// wisp created the interface (see [`TapDevice::created`]).
    pub fn adopt(fd: std::os::fd::OwnedFd, name: &str, created: bool) -> Result<Self, TapError> {
        let file = File::from(fd);
        let ioctl_err = |op, source| TapError::Ioctl {
            name: name.to_string(),
            op,
            source,
        };
        let mut req = ifctl::ifreq("");
        // SAFETY: TUNGETIFF writes one `struct ifreq`, which `req` is; an fd
        // that is not a TUN file fails with an error and writes nothing.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF as _, &mut req) };
        if ret < 0 {
            return Err(ioctl_err("TUNGETIFF", io::Error::last_os_error()));
        }
        let found = ifctl::ifreq_name(&req);
        // SAFETY: TUNGETIFF filled in `ifru_flags`.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if found != name || flags & wanted != wanted || flags & libc::IFF_TUN != 0 {
            return Err(TapError::NotTap {
                name: name.to_string(),
            });
        }
        // SAFETY: F_GETFL/F_SETFL on a valid fd take and return plain ints.
        let ret = unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if ret < 0 {
            return Err(ioctl_err(
                "making it non-blocking",
                io::Error::last_os_error(),
            ));
        }
        Ok(TapDevice {
            file,
            name: name.to_string(),
            created,
        })
    }

    /// Whether this open created the interface (it disappears when closed).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        ifctl::set_mtu(&self.name, mtu).map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            op: "setting the MTU",
            source,
        })
    }

    /// Sets the interface's (host-side) MAC address.
    pub fn set_mac(&self, mac: super::MacAddr) -> Result<(), TapError> {
        ifctl::set_mac(&self.name, mac.bytes()).map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            op: "setting the MAC address",
            source,
        })
    }

    /// Brings the interface up (or down).
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        ifctl::set_up(&self.name, up).map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            op: if up {
                "bringing it up"
            } else {
                "bringing it down"
            },
            source,
        })
    }

    /// The interface index.
    pub fn if_index(&self) -> Result<u32, TapError> {
        let err = |source| TapError::Ioctl {
            name: self.name.clone(),
            op: "looking up the interface index",
            source,
        };
        ifctl::if_index(&self.name)
            .map_err(err)?
            .ok_or_else(|| err(io::Error::from_raw_os_error(libc::ENODEV)))
    }
}

impl AsRawFd for TapDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Tap for TapDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn read_frame_iov(&mut self, iov: &GuestIovMut<'_>) -> io::Result<usize> {
        iov.readv(self.file.as_raw_fd())
    }

    fn write_frame(&mut self, frame: &FrameIov<'_>) -> io::Result<usize> {
        frame.writev(self.file.as_raw_fd())
    }

    fn set_offload(&mut self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a TAP.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_rejected_before_any_syscall() {
        for bad in ["", "way-too-long-name", "a/b", "a b", "tab\t"] {
            let err = TapDevice::open(bad).unwrap_err();
            assert!(matches!(err, TapError::InvalidName { .. }), "{bad}: {err}");
            assert!(err.to_string().starts_with("Invalid TAP name"));
        }
    }

    #[test]
    fn frame_iov_writev() {
        let (a, b) = (b"hello ".as_slice(), b"world".as_slice());
        let mut iov = FrameIov::new();
        assert!(iov.is_empty());
        iov.push_bytes(a);
        iov.push_bytes(b);
        assert_eq!(iov.len(), 11);
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert_eq!(iov.writev(fds[1]).unwrap(), 11);
        let mut out = [0u8; 16];
        // SAFETY: `out` is valid for 16 bytes of writes.
        let n = unsafe { libc::read(fds[0], out.as_mut_ptr().cast(), out.len()) };
        assert_eq!(&out[..n as usize], b"hello world");
        // SAFETY: closing the descriptors this test created.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
