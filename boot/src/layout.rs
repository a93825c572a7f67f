// SPDX-License-Identifier: Apache-2.0
//! The guest physical memory layout wisp presents.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT (0x520)
//! 0x0000_6000  PVH start_info, module list (0x6040), memory map (0x6080)
//! 0x0000_7000  Linux boot_params (zero page)
//! 0x0000_8ff0  initial stack pointer for 64-bit entry
//! 0x0000_9000  identity page tables (PML4, PDPT, 4 x PD) for 64-bit entry
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP table          (reserved in the e820 map)
//! 0x000e_0000  ACPI tables (RSDP first) (reserved in the e820 map)
//! 0x0010_0000  kernel, then RAM; the initrd goes at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio devices at 0xd000_0000,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

/// GDT address.
pub const GDT_START: u64 = 0x500;
/// IDT address (an empty IDT; the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` address.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd) address.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map address.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Most memory-map entries wisp writes.
pub const MAX_MEMMAP_ENTRIES: usize = 32;
/// Linux `boot_params` (zero page) address.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPT_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages, identity map of 4 GiB).
pub const PD_START: u64 = 0xb000;
/// Kernel command line address.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables; the RSDP sits at the start.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area (exclusive).
pub const ACPI_END: u64 = 0x100000;
/// Start of high memory, where kernels load.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (exclusive): 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC MMIO address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// Address KVM uses for the TSS on Intel hosts (3 pages below the IOAPIC region end).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Address KVM uses for the EPT identity map on Intel hosts.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// First GSI handed to devices (0-4 are the PIT, keyboard, cascade and COM1).
pub const IRQ_BASE: u32 = 5;
/// Last GSI handed to virtio devices (the IOAPIC has 24 pins; the last is the GED's).
pub const IRQ_MAX: u32 = 22;
/// GSI of the ACPI Generic Event Device (power button).
pub const GED_IRQ: u32 = 23;
/// I/O port of the GED event register.
pub const GED_PORT: u16 = 0x3c4;
/// COM1 I/O port base and GSI.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data/command ports.
pub const I8042_PORT: u16 = 0x60;
/// i8042 interrupt line (keyboard).
pub const I8042_IRQ: u32 = 1;
/// ACPI sleep control/status and reset register port (hardware-reduced ACPI).
pub const ACPI_PM_PORT: u16 = 0x3c0;
/// Value written to [`ACPI_PM_PORT`] to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP of the S5 (soft off) state advertised in the DSDT.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// Smallest guest memory wisp accepts.
pub const MIN_MEM_SIZE: u64 = 16 << 20;

/// The guest RAM ranges `(start, length)` for `mem_size` bytes of memory:
/// everything below the MMIO hole, the rest from 4 GiB up.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// The kind of an e820 / PVH memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemType {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (firmware tables, EBDA).
    Reserved = 2,
}

/// The memory map the guest sees: RAM split around the EBDA/BIOS area and the
/// MMIO hole, with the areas holding the MP and ACPI tables reserved.
pub fn memory_map(mem_size: u64) -> Vec<(u64, u64, MemType)> {
    let mut map = vec![
        (0, EBDA_START, MemType::Ram),
        (EBDA_START, HIMEM_START - EBDA_START, MemType::Reserved),
    ];
    for (start, len) in ram_ranges(mem_size) {
        let (start, len) = if start == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start, len)
        };
        map.push((start, len, MemType::Ram));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ram_ranges_split_around_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn test_memory_map_ram_total_matches_size_minus_low_reserved() {
        for size in [128u64 << 20, 4 << 30, 6 << 30] {
            let ram: u64 = memory_map(size)
                .iter()
                .filter(|e| e.2 == MemType::Ram)
                .map(|e| e.1)
                .sum();
            assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        }
    }
}
