// SPDX-License-Identifier: Apache-2.0
//! Disk image backends behind one trait, so virtio-blk never knows the format.
//!
//! [`open_disk`] opens an image ([`DiskOptions`]: path, read-only, declared or
//! probed [`ImageFormat`]), takes an `flock` on it (exclusive for read-write,
//! shared for read-only) and returns a [`RawDisk`], a [`qcow2::Qcow2Disk`]
//! (with its backing chain) or a read-only [`vmdk::VmdkDisk`] as a `Box<dyn DiskBackend>`. Every failure is a
//! one-line [`DiskError`] naming the image.

use std::io;

/// A virtual disk: a byte-addressed store of `size()` bytes.
///
/// Offsets and lengths come from the guest: implementations check them against
/// `size()` and return `InvalidInput` for anything outside the disk, never
/// touching the host file outside the image.
pub trait DiskBackend: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Tells the backend the range is no longer needed (reads then return zeros).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes the range; with `unmap` the backend may deallocate it.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Drops the image's lock (the image stays open), so that another process
    /// can take the image over: the receiver of a live migration on this host.
    fn release_lock(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Takes the lock back after [`DiskBackend::release_lock`]; fails if
    /// another process holds it now.
    fn reacquire_lock(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sets (`Some(shared)`) or drops (`None`) the non-blocking `flock` on `file`.
pub(crate) fn set_flock(file: &std::fs::File, lock: Option<bool>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let op = match lock {
        None => libc::LOCK_UN,
        Some(true) => libc::LOCK_SH | libc::LOCK_NB,
        Some(false) => libc::LOCK_EX | libc::LOCK_NB,
    };
    // SAFETY: flock takes no pointers and only acts on the descriptor `file` owns.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset:#x}+{len:#x} is outside the disk ({size} bytes)"),
        )),
    }
}

/// Refuses writes to a disk opened read-only.
pub(crate) fn check_writable(read_only: bool) -> io::Result<()> {
    if read_only {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "disk is read-only",
        ));
    }
    Ok(())
}

mod open;
pub mod probe;
pub mod qcow2;
mod raw;
pub mod status;
#[cfg(test)]
pub(crate) mod testutil;
pub mod vmdk;

use std::path::PathBuf;

pub use open::{
    open_disk, open_qcow2_for_repair, open_qcow2_metadata, open_vmdk, probe_format, resize_image,
    resolve_format,
};
pub use raw::RawDisk;

/// On-disk image formats wisp understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A flat file: byte N of the disk is byte N of the file.
    Raw,
    /// QEMU copy-on-write image, versions 2 and 3.
    Qcow2,
    /// VMware disk (sparse, stream-optimized or flat extents); read-only.
    Vmdk,
}

impl ImageFormat {
    /// The lowercase name used on command lines and in qcow2 headers.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = DiskError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            "vmdk" => Ok(ImageFormat::Vmdk),
            _ => Err(DiskError::UnknownFormat(s.to_string())),
        }
    }
}

/// What to open and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// Image path.
    pub path: PathBuf,
    /// Open read-only (shared lock) instead of read-write (exclusive lock).
    pub read_only: bool,
    /// Declared format; `None` probes the header.
    pub format: Option<ImageFormat>,
}

impl DiskOptions {
    /// Read-write options with a probed format.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskOptions {
            path: path.into(),
            read_only: false,
            format: None,
        }
    }
}

/// Why an image could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image file does not exist.
    #[error("Image {} does not exist", path.display())]
    NotFound { path: PathBuf },
    /// The path names a directory.
    #[error("Image {} is a directory", path.display())]
    IsDirectory { path: PathBuf },
    /// The process may not open the file.
    #[error("Permission denied opening image {}", path.display())]
    PermissionDenied { path: PathBuf },
    /// The file can only be opened read-only but read-write was asked.
    #[error("Image {} is read-only; open it with readonly=on", path.display())]
    ReadOnlyFile { path: PathBuf },
    /// Another process holds a conflicting lock.
    #[error("Image {} is locked by another process", path.display())]
    Locked { path: PathBuf },
    /// Any other error opening or reading the file.
    #[error("Cannot access image {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A format name that wisp does not know.
    #[error("Unknown image format '{0}' (expected raw, qcow2 or vmdk)")]
    UnknownFormat(String),
    /// A qcow2 image found by probing names a backing file.
    #[error(
        "Image {} was probed as qcow2 and has a backing file; declare format=qcow2 to use it",
        path.display()
    )]
    ProbedBacking { path: PathBuf },
    /// The qcow2 image is invalid or unsupported.
    #[error("Invalid qcow2 image {}", path.display())]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: qcow2::Qcow2Error,
    },
    /// The VMDK image is invalid or unsupported.
    #[error("Cannot read VMDK image {}", path.display())]
    Vmdk {
        path: PathBuf,
        #[source]
        source: vmdk::VmdkError,
    },
    /// A VMDK was to be opened read-write.
    #[error(
        "Image {} is a VMDK, which wisp opens read-only: use readonly=on, or convert it with \
         `wisp image convert -O qcow2`",
        path.display()
    )]
    VmdkReadOnly { path: PathBuf },
    /// A format wisp recognises but cannot read.
    #[error(
        "Image {} is a {format} image, which wisp cannot read; convert it to qcow2 or raw \
         (e.g. qemu-img convert -O qcow2), or declare format=raw to use its bytes as they are",
        path.display()
    )]
    UnsupportedFormat { path: PathBuf, format: &'static str },
    /// Options that cannot work together.
    #[error("Invalid image options: {0}")]
    InvalidOptions(String),
    /// The backing chain is longer than [`MAX_BACKING_DEPTH`].
    #[error("Backing chain of {} is deeper than {MAX_BACKING_DEPTH} images", path.display())]
    BackingTooDeep { path: PathBuf },
    /// An image appears twice in its own backing chain.
    #[error("Backing chain of {} loops back to {}", path.display(), backing.display())]
    BackingCycle { path: PathBuf, backing: PathBuf },
    /// The backing file of an image could not be opened.
    #[error("Cannot open backing file of {}", path.display())]
    Backing {
        path: PathBuf,
        #[source]
        source: Box<DiskError>,
    },
}

/// How many images a backing chain may hold below the top one.
pub const MAX_BACKING_DEPTH: usize = 16;
