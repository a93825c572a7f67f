// SPDX-License-Identifier: Apache-2.0
//! Raw images: the disk is the file, byte for byte.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::{check_range, DiskBackend};

/// Largest buffer of zeros written at once when the kernel cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// A raw image over an open (and already locked) file.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    /// Wraps `file`; its current length is the disk size.
    pub fn new(file: File, read_only: bool) -> io::Result<Self> {
        let size = file_size(&file)?;
        Ok(RawDisk {
            file,
            size,
            read_only,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_writable(&self) -> io::Result<()> {
        super::check_writable(self.read_only)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only acts on the file descriptor we own; it takes no pointers.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(&self.file, offset, len)
    }
}

/// Size of a regular file or block device.
pub(crate) fn file_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// Writes `len` zero bytes at `offset` of `file` with plain writes.
pub(crate) fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let chunk = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK) as usize;
        file.write_all_at(&chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Whether an fallocate error means "this file system cannot", so a fallback applies.
fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

impl DiskBackend for RawDisk {
    fn release_lock(&mut self) -> io::Result<()> {
        super::set_flock(&self.file, None)
    }

    fn reacquire_lock(&mut self) -> io::Result<()> {
        super::set_flock(&self.file, Some(self.read_only))
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // The file shrank under us: what is past its end reads as zeros.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => self.write_zero_buffers(offset, len),
            other => other,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            return self.discard(offset, len);
        }
        self.check_writable()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => self.write_zero_buffers(offset, len),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::testutil::TempDir;
    use std::os::unix::fs::MetadataExt;

    fn raw(dir: &TempDir, size: u64) -> RawDisk {
        let path = dir.join("disk.raw");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        RawDisk::new(file, false).unwrap()
    }

    #[test]
    fn test_raw_write_then_read_returns_data() {
        let dir = TempDir::new();
        let mut d = raw(&dir, 1 << 20);
        d.write_at(b"hello", 4096).unwrap();
        let mut buf = [0u8; 5];
        d.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn test_raw_read_past_end_is_invalid_input() {
        let dir = TempDir::new();
        let mut d = raw(&dir, 4096);
        let mut buf = [0u8; 2];
        let err = d.read_at(&mut buf, 4095).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn test_raw_write_offset_overflow_is_invalid_input() {
        let dir = TempDir::new();
        let mut d = raw(&dir, 4096);
        let err = d.write_at(b"x", u64::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn test_raw_read_only_write_is_refused() {
        let dir = TempDir::new();
        let d = raw(&dir, 4096);
        let mut ro = RawDisk::new(d.file.try_clone().unwrap(), true).unwrap();
        let err = ro.write_at(b"x", 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn test_raw_discard_reads_zero_and_frees_blocks() {
        let dir = TempDir::new();
        let mut d = raw(&dir, 1 << 20);
        d.write_at(&vec![0xaa; 1 << 20], 0).unwrap();
        d.flush().unwrap();
        d.discard(0, 1 << 20).unwrap();
        let mut buf = vec![1u8; 1 << 20];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(d.file.metadata().unwrap().blocks() < 2048);
    }

    #[test]
    fn test_raw_write_zeroes_partial_range_keeps_neighbours() {
        let dir = TempDir::new();
        let mut d = raw(&dir, 8192);
        d.write_at(&[0xbb; 8192], 0).unwrap();
        d.write_zeroes(100, 200, false).unwrap();
        let mut buf = vec![0u8; 8192];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[99], 0xbb);
        assert!(buf[100..300].iter().all(|&b| b == 0));
        assert_eq!(buf[300], 0xbb);
    }

    #[test]
    fn test_raw_write_zeros_helper_writes_across_chunks() {
        let dir = TempDir::new();
        let d = raw(&dir, 3 << 20);
        d.file.write_all_at(&vec![7u8; 3 << 20], 0).unwrap();
        write_zeros(&d.file, 1, (2 << 20) + 5).unwrap();
        let mut buf = vec![0u8; 3 << 20];
        d.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], 7);
        assert!(buf[1..(2 << 20) + 6].iter().all(|&b| b == 0));
        assert_eq!(buf[(2 << 20) + 6], 7);
    }
}
