// SPDX-License-Identifier: Apache-2.0
//! Initial CPU state: GDT, identity page tables, and the register, segment,
//! FPU, MSR and LAPIC values a boot vCPU starts with.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDPT_START, PD_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::loader::EntryPoint;
use crate::BootError;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Packs a GDT entry from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Unpacks a GDT entry into the segment KVM expects, with `index` as selector index.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)) as u32;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The boot GDT: null, code, data, TSS. The code segment is 64-bit for the Linux
/// 64-bit entry and 32-bit for PVH.
pub fn boot_gdt(entry: EntryPoint) -> [u64; 4] {
    let code = match entry {
        EntryPoint::Linux64(_) => gdt_entry(0xa09b, 0, 0xfffff),
        EntryPoint::Pvh(_) => gdt_entry(0xc09b, 0, 0xffff_ffff),
    };
    [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn guest_write<M: GuestMemoryBackend, T: vm_memory::ByteValued>(
    mem: &M,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            what,
            detail: e.to_string(),
        })
}

/// Writes the GDT and an empty IDT, and fills `sregs` for `entry`'s mode:
/// long mode with paging on the identity tables, or flat 32-bit with paging off
/// (PVH).
pub fn setup_segments_and_paging<M: GuestMemoryBackend>(
    mem: &M,
    entry: EntryPoint,
    sregs: &mut kvm_sregs,
) -> Result<(), BootError> {
    let gdt = boot_gdt(entry);
    for (i, e) in gdt.iter().enumerate() {
        guest_write(mem, *e, GDT_START + (i as u64) * 8, "GDT")?;
    }
    guest_write(mem, 0u64, IDT_START, "IDT")?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        EntryPoint::Linux64(_) => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
pub fn setup_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootError> {
    guest_write(mem, PDPT_START | 0x03, PML4_START, "page tables")?;
    for pd in 0..4u64 {
        let pd_addr = PD_START + pd * 0x1000;
        guest_write(mem, pd_addr | 0x03, PDPT_START + pd * 8, "page tables")?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((pd * 512 + i) << 21) | 0x83).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd_addr))
            .map_err(|e| BootError::GuestWrite {
                what: "page tables",
                detail: e.to_string(),
            })?;
    }
    Ok(())
}

/// The general-purpose registers at entry.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.addr(),
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64(_) => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryPoint::Pvh(_) => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// The FPU state at entry: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indexes and values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    // MTRRs enabled, default type write-back.
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .iter()
    .map(|(index, data)| kvm_msr_entry {
        index: *index,
        data: *data,
        ..Default::default()
    })
    .collect()
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC register page, as a PC's
/// firmware leaves them.
pub fn set_lapic_lints(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, v) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *v as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn test_gdt_entry_roundtrip_to_segment() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        let seg = kvm_segment_from_gdt(code, 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.present, 1);
    }

    #[test]
    fn test_long_mode_setup_maps_4g_identity() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_segments_and_paging(&mem, EntryPoint::Linux64(0x100000), &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let last: u64 = mem
            .read_obj(GuestAddress(PD_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, (2047u64 << 21) | 0x83);
    }

    #[test]
    fn test_pvh_setup_is_32bit_flat_without_paging() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_segments_and_paging(&mem, EntryPoint::Pvh(0x100000), &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(boot_regs(EntryPoint::Pvh(0x100000)).rbx, PVH_INFO_START);
    }

    #[test]
    fn test_set_lapic_lints_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_lints(&mut l);
        assert_eq!(l.regs[0x351] as u8 & 0x7, 0x7);
        assert_eq!(l.regs[0x361] as u8 & 0x7, 0x4);
    }
}
