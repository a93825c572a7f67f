// SPDX-License-Identifier: Apache-2.0
//! Guest RAM: anonymous mappings laid out around the MMIO hole, each at a
//! 2 MiB-aligned host address and marked for transparent huge pages.
//!
//! KVM can back guest memory with a huge page only where the host address and
//! the guest address agree modulo 2 MiB; guest regions start 2 MiB-aligned, so
//! their host mappings must too. `mmap` alone gives no such alignment (older
//! kernels place anonymous mappings on any page), and vm-memory only unmaps on
//! drop what it mapped itself, so [`map_aligned`] steers vm-memory's own
//! `mmap` into an aligned hole (see there) instead of mapping behind its back.

use devices::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

/// Host alignment of every guest RAM region: one (x86-64 PMD) huge page.
pub const HOST_ALIGN: usize = 2 << 20;

/// Placement attempts before settling for an unaligned mapping.
const ALIGN_ATTEMPTS: usize = 8;

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("Cannot allocate {size} bytes of guest memory: {detail}")]
    Alloc {
        /// Requested size.
        size: u64,
        /// What vm-memory said.
        detail: String,
    },
}

/// An inaccessible reservation of address space, unmapped on drop.
struct Reservation {
    addr: usize,
    len: usize,
}

impl Reservation {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a new PROT_NONE anonymous mapping at an address the kernel
        // chooses (no MAP_FIXED): it cannot alias any existing memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr as usize,
            len,
        })
    }

    /// Gives `[start, start + len)` (inside the reservation) back to the
    /// kernel and keeps the rest reserved.
    fn release(self, start: usize, len: usize) -> std::io::Result<(Self, Self)> {
        debug_assert!(start >= self.addr && start + len <= self.addr + self.len);
        let below = Self {
            addr: self.addr,
            len: start - self.addr,
        };
        let above = Self {
            addr: start + len,
            len: self.addr + self.len - (start + len),
        };
        std::mem::forget(self);
        // SAFETY: the range lies inside a PROT_NONE mapping this process made
        // and nothing else uses; `below` and `above` now own the remainder.
        if unsafe { libc::munmap(start as *mut libc::c_void, len) } != 0 {
            let e = std::io::Error::last_os_error();
            // Still ours: drop() of a piece covering it unmaps it.
            drop(Self { addr: start, len });
            return Err(e);
        }
        Ok((below, above))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the range is a PROT_NONE reservation this struct owns
        // exclusively; no Rust object points into it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn map(
    file: Option<&FileOffset>,
    size: usize,
    prot: i32,
    flags: i32,
) -> Result<MmapRegion<AtomicBitmap>, String> {
    MmapRegion::<AtomicBitmap>::build(file.cloned(), size, prot, flags).map_err(|e| e.to_string())
}

/// Maps `size` bytes with vm-memory (anonymous, or `file` with `flags`) at a
/// [`HOST_ALIGN`]-aligned host address, owned by the returned region (which
/// unmaps exactly that range on drop).
///
/// The kernel puts a mapping without an address hint in the highest (or, in
/// the legacy layout, lowest) free gap it fits. So: reserve `size + 2 MiB`
/// `PROT_NONE`, free the aligned `size` bytes inside it, let vm-memory map
/// into that hole, then free the slack around it. A concurrent `mmap` from
/// another thread, or another gap that fits `size` but not the reservation,
/// can take the hole first; that mapping is then kept as a plug (so the next
/// attempt goes elsewhere) and dropped at the end. If all attempts fail the
/// last mapping is used unaligned, with a warning: slower, never unsafe.
pub(crate) fn map_aligned(
    file: Option<&FileOffset>,
    size: usize,
    prot: i32,
    flags: i32,
) -> Result<MmapRegion<AtomicBitmap>, String> {
    let total = size
        .checked_add(HOST_ALIGN)
        .ok_or_else(|| "size does not fit the host address space".to_string())?;
    let mut plugs = Vec::new();
    for _ in 0..ALIGN_ATTEMPTS {
        let resv = Reservation::new(total).map_err(|e| e.to_string())?;
        let hole = resv.addr.next_multiple_of(HOST_ALIGN);
        let (below, above) = resv.release(hole, size).map_err(|e| e.to_string())?;
        let region = map(file, size, prot, flags);
        drop((below, above));
        let region = region?;
        if region.as_ptr() as usize == hole {
            return Ok(region);
        }
        plugs.push(region);
    }
    let last = plugs.pop();
    drop(plugs);
    log::warn!(
        "could not place {size} bytes of guest memory at a 2 MiB-aligned host address; \
         KVM may not use huge pages for it"
    );
    match last {
        Some(region) => Ok(region),
        None => map(file, size, prot, flags),
    }
}

/// Asks for transparent huge pages on `region` (`MADV_HUGEPAGE`). Only a
/// hint: a kernel without THP refuses it, which is logged and ignored.
pub(crate) fn advise_huge_pages(region: &MmapRegion<AtomicBitmap>) {
    // SAFETY: madvise with MADV_HUGEPAGE on a mapping the region owns only
    // sets a flag on those pages' VMA; it changes no contents.
    let ret = unsafe { libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_HUGEPAGE) };
    if ret != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Allocates `size` bytes of guest RAM (lazily backed: pages are taken from the
/// host only when the guest touches them), each region 2 MiB-aligned on the
/// host and marked for transparent huge pages.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let err = |detail: String| MemoryError::Alloc { size, detail };
    let mut regions = Vec::new();
    for (start, len) in boot::layout::ram_ranges(size) {
        let len = usize::try_from(len)
            .map_err(|_| err("size does not fit the host address space".into()))?;
        let mapping = map_aligned(
            None,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(err)?;
        advise_huge_pages(&mapping);
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| err(format!("region at {start:#x} wraps the address space")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
}

/// The host's physical RAM in bytes (0 if unknown).
pub fn host_ram() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page <= 0 {
        return 0;
    }
    (pages as u64).saturating_mul(page as u64)
}

#[cfg(test)]
mod tests;
