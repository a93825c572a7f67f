// SPDX-License-Identifier: Apache-2.0
//! Opening images: file checks, locking, format probing and backing chains.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::probe::probe_file;
use super::qcow2::{self, Qcow2Disk};
use super::vmdk::VmdkDisk;
use super::{DiskBackend, DiskError, DiskOptions, ImageFormat, RawDisk, MAX_BACKING_DEPTH};

/// Opens the image `opts` describes, locked against other writers.
///
/// Without a declared format the header is probed; a probed qcow2 image that
/// names a backing file is refused, since a guest could have written that
/// header into a raw disk to make the host read any file.
pub fn open_disk(opts: &DiskOptions) -> Result<Box<dyn DiskBackend>, DiskError> {
    open_chain(opts, &mut Vec::new())
}

/// The format an image's header announces: qcow2 or vmdk by their magic, raw
/// when no known format matches. Formats wisp recognises but cannot read (vdi,
/// vhdx, vpc, qed, luks, ...) are refused by name.
pub fn probe_format(path: &Path) -> Result<ImageFormat, DiskError> {
    let file = open_file(path, true)?;
    probe_file(&file, path)
}

/// The format `open_disk` would use for `opts`, and whether it was probed
/// (so callers can log "probed qcow2 for disk X").
pub fn resolve_format(opts: &DiskOptions) -> Result<(ImageFormat, bool), DiskError> {
    match opts.format {
        Some(f) => Ok((f, false)),
        None => probe_format(&opts.path).map(|f| (f, true)),
    }
}

/// Opens a qcow2 image for metadata work (check, resize): its backing file is
/// not opened, so unallocated clusters read as zeros.
pub fn open_qcow2_metadata(path: &Path, read_only: bool) -> Result<Qcow2Disk, DiskError> {
    let file = open_file(path, read_only)?;
    Qcow2Disk::open_with(file, path, read_only, |_| Ok(Box::new(NoBacking)))
}

/// Opens a qcow2 image for `check -r`: writable even when its refcounts are
/// inconsistent or it is marked corrupt (writes are refcount repairs only).
pub fn open_qcow2_for_repair(path: &Path) -> Result<Qcow2Disk, DiskError> {
    let file = open_file(path, false)?;
    Qcow2Disk::open_mode(file, path, qcow2::OpenMode::Repair, |_| {
        Ok(Box::new(NoBacking))
    })
}

/// Grows the image at `path` to `new_size` bytes.
pub fn resize_image(
    path: &Path,
    format: Option<ImageFormat>,
    new_size: u64,
) -> Result<(), DiskError> {
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    let io_err = |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Whole sectors, as qemu-img creates them (a guest sees no partial sector).
    let new_size = new_size
        .checked_next_multiple_of(qcow2::create::SECTOR)
        .ok_or_else(|| DiskError::InvalidOptions(format!("new size {new_size} is too large")))?;
    match format {
        ImageFormat::Raw => {
            let file = open_file(path, false)?;
            let old = super::raw::file_size(&file).map_err(io_err)?;
            if new_size < old {
                return Err(DiskError::InvalidOptions(format!(
                    "new size {new_size} is smaller than the current size {old}; shrinking is not supported"
                )));
            }
            file.set_len(new_size).map_err(io_err)?;
            file.sync_all().map_err(io_err)
        }
        ImageFormat::Qcow2 => {
            let mut disk = open_qcow2_metadata(path, false)?;
            let old = disk.size();
            if new_size < old {
                return Err(DiskError::InvalidOptions(format!(
                    "new size {new_size} is smaller than the current size {old}; shrinking is not supported"
                )));
            }
            disk.resize(new_size).map_err(io_err)
        }
        ImageFormat::Vmdk => Err(DiskError::InvalidOptions(
            "VMDK images are read-only in wisp; convert to qcow2 first".into(),
        )),
    }
}

/// Opens the VMDK at `path` read-only, following its descriptor's extents
/// (the caller named the file, so it counts as declared).
pub fn open_vmdk(path: &Path) -> Result<VmdkDisk, DiskError> {
    let file = open_file(path, true)?;
    VmdkDisk::open(file, path, true).map_err(|source| DiskError::Vmdk {
        path: path.to_path_buf(),
        source,
    })
}

/// Stands in for a backing file that is deliberately not opened.
struct NoBacking;

impl DiskBackend for NoBacking {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::check_range(0, offset, buf.len() as u64)
    }
    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
}

/// Opens one image of a chain; `chain` holds the canonical paths of the images above it.
pub(crate) fn open_chain(
    opts: &DiskOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskBackend>, DiskError> {
    let path = &opts.path;
    if opts.format == Some(ImageFormat::Vmdk) && !opts.read_only {
        return Err(DiskError::VmdkReadOnly { path: path.clone() });
    }
    let file = open_file(path, opts.read_only)?;
    let (format, probed) = match opts.format {
        Some(f) => (f, false),
        None => (probe_file(&file, path)?, true),
    };
    match format {
        ImageFormat::Raw => {
            let disk = RawDisk::new(file, opts.read_only).map_err(|source| DiskError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(Box::new(disk))
        }
        ImageFormat::Vmdk => {
            if !opts.read_only {
                return Err(DiskError::VmdkReadOnly { path: path.clone() });
            }
            let disk = VmdkDisk::open(file, path, !probed).map_err(|source| DiskError::Vmdk {
                path: path.clone(),
                source,
            })?;
            Ok(Box::new(disk))
        }
        ImageFormat::Qcow2 => {
            let canonical = path.canonicalize().map_err(|source| DiskError::Io {
                path: path.clone(),
                source,
            })?;
            if chain.len() > MAX_BACKING_DEPTH {
                return Err(DiskError::BackingTooDeep {
                    path: chain.first().cloned().unwrap_or_else(|| path.clone()),
                });
            }
            if let Some(top) = chain.iter().find(|p| **p == canonical) {
                return Err(DiskError::BackingCycle {
                    path: top.clone(),
                    backing: canonical,
                });
            }
            chain.push(canonical);
            let disk = Qcow2Disk::open_with(file, path, opts.read_only, |backing| {
                if probed {
                    return Err(DiskError::ProbedBacking { path: path.clone() });
                }
                let sub = DiskOptions {
                    path: backing.path.clone(),
                    read_only: true,
                    format: backing.format,
                };
                open_chain(&sub, chain).map_err(|e| match e {
                    e @ (DiskError::BackingTooDeep { .. } | DiskError::BackingCycle { .. }) => e,
                    e => DiskError::Backing {
                        path: path.clone(),
                        source: Box::new(e),
                    },
                })
            })?;
            Ok(Box::new(disk))
        }
    }
}

/// Opens `path` for reading (and writing unless `read_only`) and locks it.
pub(crate) fn open_file(path: &Path, read_only: bool) -> Result<File, DiskError> {
    let owned = || path.to_path_buf();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiskError::NotFound { path: owned() })
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(DiskError::PermissionDenied { path: owned() })
        }
        Err(source) => {
            return Err(DiskError::Io {
                path: owned(),
                source,
            })
        }
        Ok(m) if m.is_dir() => return Err(DiskError::IsDirectory { path: owned() }),
        Ok(_) => {}
    }
    let file = match File::options().read(true).write(!read_only).open(path) {
        Ok(f) => f,
        Err(e) => {
            let denied = e.kind() == io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(libc::EROFS);
            if denied && !read_only && File::open(path).is_ok() {
                return Err(DiskError::ReadOnlyFile { path: owned() });
            }
            if denied {
                return Err(DiskError::PermissionDenied { path: owned() });
            }
            return Err(DiskError::Io {
                path: owned(),
                source: e,
            });
        }
    };
    lock(&file, path, read_only)?;
    Ok(file)
}

fn lock(file: &File, path: &Path, shared: bool) -> Result<(), DiskError> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock takes no pointers and only acts on the descriptor `file` owns.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(DiskError::Locked {
            path: path.to_path_buf(),
        });
    }
    Err(DiskError::Io {
        path: path.to_path_buf(),
        source: err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::testutil::TempDir;

    fn raw_file(dir: &TempDir, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn test_open_disk_missing_file_is_not_found() {
        let dir = TempDir::new();
        let err = open_disk(&DiskOptions::new(dir.join("nope")))
            .err()
            .unwrap();
        assert!(matches!(err, DiskError::NotFound { .. }));
        assert!(err.to_string().starts_with("Image "));
    }

    #[test]
    fn test_open_disk_directory_is_refused() {
        let dir = TempDir::new();
        let err = open_disk(&DiskOptions::new(dir.path())).err().unwrap();
        assert!(matches!(err, DiskError::IsDirectory { .. }));
    }

    #[test]
    fn test_open_disk_second_writer_is_locked() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 4096);
        let _first = open_disk(&DiskOptions::new(&p)).unwrap();
        let err = open_disk(&DiskOptions::new(&p)).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!("Image {} is locked by another process", p.display())
        );
    }

    #[test]
    fn test_open_disk_two_readers_share_the_lock() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 4096);
        let mut opts = DiskOptions::new(&p);
        opts.read_only = true;
        let _a = open_disk(&opts).unwrap();
        let b = open_disk(&opts).unwrap();
        assert!(b.read_only());
    }

    #[test]
    fn test_open_disk_writer_after_reader_is_locked() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 4096);
        let mut opts = DiskOptions::new(&p);
        opts.read_only = true;
        let _a = open_disk(&opts).unwrap();
        let err = open_disk(&DiskOptions::new(&p)).err().unwrap();
        assert!(matches!(err, DiskError::Locked { .. }));
    }

    #[test]
    fn test_open_disk_read_only_file_needs_readonly() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("skipped: root ignores file modes");
            return;
        }
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 4096);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = open_disk(&DiskOptions::new(&p)).err().unwrap();
        assert!(matches!(err, DiskError::ReadOnlyFile { .. }));
    }

    #[test]
    fn test_open_disk_unreadable_file_is_permission_denied() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("skipped: root ignores file modes");
            return;
        }
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 4096);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
        let err = open_disk(&DiskOptions::new(&p)).err().unwrap();
        assert!(matches!(err, DiskError::PermissionDenied { .. }));
    }

    #[test]
    fn test_probe_format_plain_file_is_raw() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 4096);
        assert_eq!(probe_format(&p).unwrap(), ImageFormat::Raw);
    }

    #[test]
    fn test_probe_format_empty_file_is_raw() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 0);
        assert_eq!(probe_format(&p).unwrap(), ImageFormat::Raw);
    }

    #[test]
    fn test_resolve_format_declared_is_not_probed() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "a.raw", 4096);
        let mut opts = DiskOptions::new(&p);
        assert_eq!(resolve_format(&opts).unwrap(), (ImageFormat::Raw, true));
        opts.format = Some(ImageFormat::Qcow2);
        assert_eq!(resolve_format(&opts).unwrap(), (ImageFormat::Qcow2, false));
    }

    #[test]
    fn test_image_format_parse_unknown_is_error() {
        let err = "vdi".parse::<ImageFormat>().unwrap_err();
        assert!(err.to_string().contains("vdi"));
    }
}
