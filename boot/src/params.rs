// SPDX-License-Identifier: Apache-2.0
//! Boot parameters: the Linux zero page (e820 map, command line, initrd) and the
//! PVH `hvm_start_info` page (memory map, command line, modules, RSDP).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::{
    memory_map, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::loader::LoadedInitrd;
use crate::BootError;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

fn write_err(what: &'static str) -> impl Fn(linux_loader::configurator::Error) -> BootError {
    move |e| BootError::GuestWrite {
        what,
        detail: e.to_string(),
    }
}

/// Writes the Linux zero page for a 64-bit boot.
pub fn write_linux_params<M: GuestMemoryBackend>(
    mem: &M,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = memory_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(write_err("boot parameters"))
}

/// Writes the PVH start_info page, module list and memory map.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
    rsdp: u64,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(mem_size)
        .iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind as u32,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(i) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        modules.push(hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        });
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(write_err("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn test_pvh_start_info_has_magic_and_memmap() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        write_pvh_start_info(&mem, None, 32 << 20, 0xe0000).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24))
            .unwrap();
        assert_eq!(last.addr + last.size, 32 << 20);
    }

    #[test]
    fn test_linux_params_e820_and_initrd() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let initrd = LoadedInitrd {
            addr: 0x100_0000,
            size: 0x1000,
        };
        write_linux_params(&mem, None, 12, Some(initrd), 32 << 20).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.hdr.ramdisk_image }, 0x100_0000);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
    }
}
