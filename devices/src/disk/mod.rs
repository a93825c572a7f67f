// SPDX-License-Identifier: Apache-2.0
//! Disk image backends behind one trait, so virtio-blk never knows the format.

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
