// SPDX-License-Identifier: Apache-2.0
//! The guest memory file: all RAM regions back to back in one sparse file
//! followed by a one-page trailer (`binding.rs`); writing pages into it (the
//! whole files are written by `dump.rs`), dirty-page tracking through KVM,
//! and restore by mapping the file `MAP_PRIVATE`.
//!
//! Every function that reads guest memory expects the VM to be paused (no
//! vCPU running, no device thread writing); otherwise the dump is not a
//! consistent image.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::binding::{MemoryBinding, Trailer, TRAILER_LEN};
use super::files::{open_regular, FileError};

/// Page size of the memory file and of the dirty bitmaps.
pub const PAGE_SIZE: u64 = 4096;

/// Largest run of pages written with one `pwrite`.
const MAX_RUN_PAGES: u64 = 256;

/// Where one guest RAM region lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionLayout {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
    /// Offset of the region's first byte in the memory file.
    pub file_offset: u64,
}

/// The guest-visible RAM layout and its placement in the memory file. Regions
/// are sorted by guest address and stored back to back in the file: region
/// `i` starts at the sum of the sizes of regions `0..i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// The regions, in guest-address (and file) order.
    pub regions: Vec<MemoryRegionLayout>,
}

/// Why a memory file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// A file-system operation failed.
    #[error("Cannot {what} memory file {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The path cannot be written or read (not a regular file, ...).
    #[error(transparent)]
    File(#[from] FileError),
    /// The trailer after guest RAM is missing or damaged.
    #[error("Memory file {path} is not usable: {detail}")]
    BadTrailer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The file holds another snapshot's memory than the one expected.
    #[error("Memory file {path} holds the memory of {found}, not of {expected}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The binding asked for (from a state file, or a VM's last snapshot).
        expected: MemoryBinding,
        /// The binding in the file's trailer.
        found: MemoryBinding,
    },
    /// An in-place Diff into the file started and did not finish.
    #[error(
        "Memory file {path} is half-written: an in-place Diff snapshot ({found}) started writing pages into it and did not finish, so it matches no state file"
    )]
    Unfinished {
        /// The file.
        path: PathBuf,
        /// The binding the unfinished Diff was writing.
        found: MemoryBinding,
    },
    /// The layout is not one this module writes (unsorted, misaligned, gaps).
    #[error("Invalid memory layout: {0}")]
    BadLayout(String),
    /// The file's size does not match the layout.
    #[error(
        "Memory file {path} is {found} bytes, the snapshot needs {expected} (guest RAM and a {TRAILER_LEN}-byte trailer)"
    )]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// Size from the layout.
        expected: u64,
        /// Size on disk.
        found: u64,
    },
    /// The dirty bitmaps do not match the memory.
    #[error("Dirty bitmap for region {region} has {found} words, {expected} needed")]
    BitmapSize {
        /// Region index.
        region: usize,
        /// Words needed.
        expected: usize,
        /// Words given.
        found: usize,
    },
    /// Mapping the file failed.
    #[error("Cannot map region {region} of memory file {path}: {detail}")]
    Map {
        /// Region index.
        region: usize,
        /// The file.
        path: PathBuf,
        /// What vm-memory said.
        detail: String,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what} on memory slot {slot} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The slot.
        slot: u32,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, MemoryFileError>;

/// What a dump did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Bytes written to the file (data only, not holes).
    pub bytes_written: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Pages skipped: all-zero (left as holes) or, for diffs, not dirty.
    pub pages_skipped: u64,
    /// Wall time of the whole dump, including fsync.
    pub elapsed: Duration,
}

impl DumpStats {
    /// Guest memory covered per second, in MB (10^6 bytes), counting skipped
    /// pages too: how fast a VM of this size is dumped.
    pub fn memory_mb_per_s(&self) -> f64 {
        let bytes = (self.pages_written + self.pages_skipped) * PAGE_SIZE;
        bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Data written per second, in MB (10^6 bytes).
    pub fn write_mb_per_s(&self) -> f64 {
        self.bytes_written as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Maps an I/O error on `path` while doing `what`.
pub(super) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MemoryFileError + 'a {
    move |source| MemoryFileError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl MemoryLayout {
    /// The layout of `mem`, with regions packed back to back in file order.
    pub fn of(mem: &GuestMemoryMmap) -> Self {
        let mut offset = 0;
        let regions = mem
            .iter()
            .map(|r| {
                let l = MemoryRegionLayout {
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                    file_offset: offset,
                };
                offset += r.len();
                l
            })
            .collect();
        Self { regions }
    }

    /// Total guest RAM, which is also the offset of the memory file's
    /// trailer (the file is [`TRAILER_LEN`] bytes longer).
    pub fn file_size(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.size))
    }

    /// Checks the layout is what [`MemoryLayout::of`] produces: non-empty,
    /// page-aligned, sorted, non-overlapping, packed in file order.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(MemoryFileError::BadLayout(m));
        if self.regions.is_empty() {
            return bad("no regions".into());
        }
        let mut offset = 0u64;
        let mut next_addr = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_addr % PAGE_SIZE != 0 {
                return bad(format!(
                    "region {i} at {:#x} size {:#x} is not page-aligned and non-empty",
                    r.guest_addr, r.size
                ));
            }
            if r.file_offset != offset {
                return bad(format!(
                    "region {i} is at file offset {:#x}, expected {offset:#x}",
                    r.file_offset
                ));
            }
            if i > 0 && r.guest_addr < next_addr {
                return bad(format!(
                    "region {i} at {:#x} overlaps or precedes the previous one",
                    r.guest_addr
                ));
            }
            let Some(end) = r.guest_addr.checked_add(r.size) else {
                return bad(format!("region {i} ends beyond 2^64"));
            };
            if usize::try_from(r.size).is_err() {
                return bad(format!("region {i} does not fit the host address space"));
            }
            next_addr = end;
            offset += r.size;
        }
        Ok(())
    }
}

/// A view of a region's host mapping as bytes.
pub(crate) fn region_bytes(region: &GuestRegionMmap<AtomicBitmap>) -> &[u8] {
    // SAFETY: the mapping is `len()` bytes, valid and readable for as long as
    // the region is borrowed. Other threads may write guest memory through
    // raw pointers (vCPUs); callers keep the VM paused while dumping, and a
    // racing write can only make the dump stale, since every byte value is a
    // valid `u8`.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// Per-page "may hold data" flags of an anonymous region, from
/// /proc/self/pagemap: a page neither present nor swapped was never touched
/// and reads as zero. `None` if pagemap is unavailable.
pub(crate) fn touched_pages(region: &GuestRegionMmap<AtomicBitmap>) -> Option<Vec<bool>> {
    if MmapRegion::file_offset(region).is_some() {
        // Untouched pages of a file mapping read the file, not zeros.
        return None;
    }
    let pages = (region.len() / PAGE_SIZE) as usize;
    let mut f = File::open("/proc/self/pagemap").ok()?;
    let first = region.as_ptr() as u64 / PAGE_SIZE;
    f.seek(SeekFrom::Start(first * 8)).ok()?;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact(&mut raw).ok()?;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    Some(
        raw.chunks_exact(8)
            .map(|c| {
                let e = u64::from_ne_bytes(c.try_into().unwrap_or([0xff; 8]));
                e & (PRESENT | SWAPPED) != 0
            })
            .collect(),
    )
}

/// One bitmap per region (bit set: the page may hold data) of the pages ever
/// touched, for anonymous memory; `None` if any region is file-backed or
/// pagemap is unavailable. A live-migration sender skips the other pages (the
/// receiver's fresh memory is zero there) instead of faulting each one in.
pub fn touched_bitmaps(mem: &GuestMemoryMmap) -> Option<Vec<Vec<u64>>> {
    mem.iter()
        .map(|r| {
            let touched = touched_pages(r)?;
            let mut words = vec![0u64; touched.len().div_ceil(64)];
            for (p, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
                words[p / 64] |= 1 << (p % 64);
            }
            Some(words)
        })
        .collect()
}

/// How often (in pages: 1 GiB) a long dump logs its progress.
const PROGRESS_PAGES: usize = 1 << 18;

/// Writes the pages of `bytes` (a region at `file_offset`) selected by
/// `want(page)`, coalescing runs; all-zero pages become holes (if `punch`,
/// existing data under them is punched out or zeroed).
pub(crate) fn write_pages(
    file: &File,
    path: &Path,
    bytes: &[u8],
    file_offset: u64,
    want: impl Fn(usize) -> bool,
    punch: bool,
    stats: &mut DumpStats,
) -> Result<()> {
    let page = PAGE_SIZE as usize;
    let pages = bytes.len() / page;
    let mut run_start: Option<usize> = None;
    let flush = |start: usize, end: usize, stats: &mut DumpStats| -> Result<()> {
        let data = &bytes[start * page..end * page];
        file.write_all_at(data, file_offset + (start * page) as u64)
            .map_err(io_err("write", path))?;
        stats.bytes_written += data.len() as u64;
        stats.pages_written += (end - start) as u64;
        Ok(())
    };
    let started = Instant::now();
    for p in 0..pages {
        if p > 0 && p % PROGRESS_PAGES == 0 {
            let done = (p * page) as f64;
            log::info!(
                "memory file {}: {} MiB of this region scanned, {} MiB written so far, {:.0} MB/s",
                path.display(),
                (p * page) >> 20,
                stats.bytes_written >> 20,
                done / started.elapsed().as_secs_f64().max(1e-9) / 1e6
            );
        }
        let data = want(p) && !is_zero(&bytes[p * page..(p + 1) * page]);
        if !data {
            if let Some(s) = run_start.take() {
                flush(s, p, stats)?;
            }
            if punch && want(p) {
                punch_page(file, path, file_offset + (p * page) as u64)?;
                stats.pages_written += 1;
            } else {
                stats.pages_skipped += 1;
            }
            continue;
        }
        match run_start {
            Some(s) if (p - s) as u64 >= MAX_RUN_PAGES => {
                flush(s, p, stats)?;
                run_start = Some(p);
            }
            None => run_start = Some(p),
            _ => {}
        }
    }
    if let Some(s) = run_start {
        flush(s, pages, stats)?;
    }
    Ok(())
}

/// Makes the page at `offset` read as zeros: a hole if the file system can
/// punch one, else written zeros.
fn punch_page(file: &File, path: &Path, offset: u64) -> Result<()> {
    // SAFETY: fallocate on an fd we own, with a range inside the file; it does
    // not touch our memory.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            PAGE_SIZE as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    file.write_all_at(&[0u8; PAGE_SIZE as usize], offset)
        .map_err(io_err("write", path))
}

pub(crate) fn check_bitmaps(mem: &GuestMemoryMmap, dirty: &[Vec<u64>]) -> Result<()> {
    for (i, region) in mem.iter().enumerate() {
        let expected = (region.len() / PAGE_SIZE).div_ceil(64) as usize;
        let found = dirty.get(i).map_or(0, Vec::len);
        if found < expected {
            return Err(MemoryFileError::BitmapSize {
                region: i,
                expected,
                found,
            });
        }
    }
    Ok(())
}

pub(crate) fn bit(words: &[u64], p: usize) -> bool {
    words.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
}

/// Copies `src` to the empty `dst`: FICLONE if possible, else the data
/// extents only (SEEK_DATA/SEEK_HOLE), so holes stay holes.
pub(crate) fn clone_sparse(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    size: u64,
) -> Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument and touches no
    // memory of ours.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    dst.set_len(size).map_err(io_err("size", dst_path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let (data, hole) = (data as u64, if hole < 0 { size } else { hole as u64 });
        let mut off = data;
        while off < hole {
            let n = (hole - off).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], off)
                .map_err(io_err("read", src_path))?;
            dst.write_all_at(&buf[..n], off)
                .map_err(io_err("write", dst_path))?;
            off += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// Maps `file` (the memory file at `path`, whose trailer the caller checked)
/// as guest memory with `layout`, each region `MAP_PRIVATE` at its file
/// offset: pages are read from the file on first access and guest writes
/// stay private, so restore time does not depend on memory size and the file
/// is never modified.
pub fn map_file(file: File, path: &Path, layout: &MemoryLayout) -> Result<GuestMemoryMmap> {
    layout.validate()?;
    let file = Arc::new(file);
    let mut regions = Vec::with_capacity(layout.regions.len());
    for (i, l) in layout.regions.iter().enumerate() {
        let map_err = |detail: String| MemoryFileError::Map {
            region: i,
            path: path.to_path_buf(),
            detail,
        };
        // validate() checked the size fits usize.
        let size = usize::try_from(l.size).map_err(|e| map_err(e.to_string()))?;
        // 2 MiB-aligned like fresh guest RAM. No MADV_HUGEPAGE: pages of a
        // private file mapping are page cache or 4 KiB copy-on-write copies,
        // never transparent huge pages, so the hint would change nothing.
        let mapping = crate::vstate::memory::map_aligned(
            Some(&FileOffset::from_arc(Arc::clone(&file), l.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(map_err)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(l.guest_addr))
            .ok_or_else(|| map_err("region wraps the address space".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::BadLayout(e.to_string()))
}

/// Opens the memory file at `path` (a regular file), checks its trailer holds
/// `expected` and is complete, and maps it with `layout` ([`map_file`]).
/// Only the trailer page is read: no checksum over guest RAM.
pub fn map_memory_file(
    path: &Path,
    layout: &MemoryLayout,
    expected: &MemoryBinding,
) -> Result<GuestMemoryMmap> {
    layout.validate()?;
    if expected.ram_len != layout.file_size() {
        return Err(MemoryFileError::BadLayout(format!(
            "the memory layout holds {} bytes of RAM, the memory file binding {}",
            layout.file_size(),
            expected.ram_len
        )));
    }
    let file = open_regular(path, false)?;
    Trailer::check(&file, path, expected)?;
    map_file(file, path, layout)
}

fn slot_region(
    slot: u32,
    region: &GuestRegionMmap<AtomicBitmap>,
    flags: u32,
) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    }
}

/// Turns KVM dirty-page logging on or off for every RAM slot. Slots are
/// numbered as `Vm::register_memory` does: slot `i` is region `i` of `mem`.
/// Turning it on also clears wisp's own (device-write) bitmaps, so both
/// sources start from the same moment.
pub fn set_dirty_logging(vm_fd: &VmFd, mem: &GuestMemoryMmap, enable: bool) -> Result<()> {
    let flags = if enable { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    for (i, region) in mem.iter().enumerate() {
        let slot = i as u32;
        // SAFETY: the same host mapping `mem` already registered for this
        // slot; only the flags change, and the mapping outlives the VM.
        unsafe { vm_fd.set_user_memory_region(slot_region(slot, region, flags)) }.map_err(
            |source| MemoryFileError::Kvm {
                what: "KVM_SET_USER_MEMORY_REGION",
                slot,
                source,
            },
        )?;
        if enable {
            MmapRegion::bitmap(region).reset();
        }
    }
    Ok(())
}

/// Pages written since the last call (or since logging was enabled), per
/// region: KVM's dirty log (guest writes) OR'd with vm-memory's bitmap (VMM
/// and device writes). Both sources are cleared. Dirty logging must be on.
pub fn dirty_bitmaps(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>> {
    mem.iter()
        .enumerate()
        .map(|(i, region)| {
            let slot = i as u32;
            let mut words = vm_fd
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| MemoryFileError::Kvm {
                    what: "KVM_GET_DIRTY_LOG",
                    slot,
                    source,
                })?;
            let ours = MmapRegion::bitmap(region).get_and_reset();
            for (w, o) in words.iter_mut().zip(ours) {
                *w |= o;
            }
            Ok(words)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Guest memory helpers shared by the memory file tests.
    use super::*;
    use vm_memory::Bytes;

    pub(crate) const MIB: usize = 1 << 20;

    pub(crate) fn test_memory() -> GuestMemoryMmap {
        // Two regions with a gap, like RAM split around the MMIO hole.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 * MIB),
            (GuestAddress(0x1000_0000), 24 * MIB),
        ])
        .unwrap()
    }

    pub(crate) fn fill(mem: &GuestMemoryMmap, addrs: &[u64], byte: u8) {
        for &a in addrs {
            mem.write_slice(&[byte; 4096], GuestAddress(a)).unwrap();
        }
    }

    pub(crate) fn assert_same(file_mem: &GuestMemoryMmap, mem: &GuestMemoryMmap) {
        for (a, b) in file_mem.iter().zip(mem.iter()) {
            assert_eq!(a.start_addr(), b.start_addr());
            assert!(
                region_bytes(a) == region_bytes(b),
                "region {:?}",
                a.start_addr()
            );
        }
    }

    pub(crate) const TOUCHED: &[u64] =
        &[0, 0x5000, 0x7f_f000, 0x1000_0000, 0x1000_3000, 0x117f_f000];

    pub(crate) fn bitmaps_for(mem: &GuestMemoryMmap, addrs: &[u64]) -> Vec<Vec<u64>> {
        let mut maps: Vec<Vec<u64>> = mem
            .iter()
            .map(|r| vec![0; (r.len() / PAGE_SIZE).div_ceil(64) as usize])
            .collect();
        for &a in addrs {
            let (i, r) = mem
                .iter()
                .enumerate()
                .find(|(_, r)| r.start_addr().0 <= a && a < r.start_addr().0 + r.len())
                .unwrap();
            let p = ((a - r.start_addr().0) / PAGE_SIZE) as usize;
            maps[i][p / 64] |= 1 << (p % 64);
        }
        maps
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn test_memory_layout_is_packed_and_validated() {
        let layout = MemoryLayout::of(&test_memory());
        assert_eq!(layout.regions[1].file_offset, 8 * MIB as u64);
        assert_eq!(layout.file_size(), 32 * MIB as u64);
        layout.validate().unwrap();
        let mut bad = layout.clone();
        bad.regions[1].file_offset += 4096;
        assert!(matches!(bad.validate(), Err(MemoryFileError::BadLayout(_))));
        let mut bad = layout.clone();
        bad.regions[1].guest_addr = 0x1000;
        assert!(bad.validate().is_err());
        let mut bad = layout;
        bad.regions[0].size = 100;
        assert!(bad.validate().is_err());
        assert!(MemoryLayout { regions: vec![] }.validate().is_err());
    }

    #[test]
    fn test_restored_memory_regions_are_2mib_aligned_on_the_host() {
        use crate::vstate::memory::HOST_ALIGN;
        use vm_memory::Bytes;
        // Sizes that are not 2 MiB multiples: kernels that align large
        // anonymous and file mappings by themselves do so only for those.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 6 * MIB + 12 * 1024),
            (GuestAddress(0x1000_0000), 3 * MIB + 4096),
        ])
        .unwrap();
        fill(&mem, &[0x1000, 0x60_2000, 0x1000_0000, 0x1030_0000], 0x5a);
        let layout = MemoryLayout::of(&mem);
        let mut bytes = vec![0u8; layout.file_size() as usize];
        for (r, l) in mem.iter().zip(&layout.regions) {
            let at = l.file_offset as usize;
            mem.read_slice(&mut bytes[at..at + l.size as usize], r.start_addr())
                .unwrap();
        }
        let file = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).unwrap();
        for _ in 0..3 {
            let restored = map_file(file.try_clone().unwrap(), Path::new("mem"), &layout).unwrap();
            for r in restored.iter() {
                assert_eq!(r.as_ptr() as usize % HOST_ALIGN, 0, "{:?}", r.start_addr());
            }
            assert_same(&restored, &mem);
        }
    }

    fn kvm_vm() -> Option<(kvm_ioctls::Kvm, VmFd)> {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is missing");
            return None;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        Some((kvm, vm))
    }

    #[test]
    fn test_memory_dirty_bitmaps_include_device_writes() {
        let Some((_kvm, vm)) = kvm_vm() else { return };
        let mem = test_memory();
        for (i, r) in mem.iter().enumerate() {
            // SAFETY: `mem` outlives `vm` in this test.
            unsafe { vm.set_user_memory_region(slot_region(i as u32, r, 0)) }.unwrap();
        }
        fill(&mem, &[0x4000], 1); // before logging: not reported
        set_dirty_logging(&vm, &mem, true).unwrap();
        fill(&mem, &[0x1000, 0x1000_2000], 2); // "device" writes via vm-memory
        let maps = dirty_bitmaps(&vm, &mem).unwrap();
        assert_eq!(maps, bitmaps_for(&mem, &[0x1000, 0x1000_2000]));
        // Each call reports what happened since the previous one.
        let maps = dirty_bitmaps(&vm, &mem).unwrap();
        assert_eq!(maps, bitmaps_for(&mem, &[]));
        set_dirty_logging(&vm, &mem, false).unwrap();
        assert!(dirty_bitmaps(&vm, &mem).is_err());
    }
}
