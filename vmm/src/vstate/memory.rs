// SPDX-License-Identifier: Apache-2.0
//! Guest RAM: anonymous mappings laid out around the MMIO hole.

use devices::GuestMemoryMmap;
use vm_memory::GuestAddress;

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

/// Allocates `size` bytes of guest RAM (lazily backed: pages are taken from the
/// host only when the guest touches them).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = boot::layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|l| (GuestAddress(start), l))
                .map_err(|_| MemoryError::Alloc {
                    size,
                    detail: "size does not fit the host address space".into(),
                })
        })
        .collect::<Result<_, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Alloc {
        size,
        detail: e.to_string(),
    })
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
