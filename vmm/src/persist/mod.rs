// SPDX-License-Identifier: Apache-2.0
//! Snapshot persistence: the versioned state file and the guest memory file.

pub mod binding;
pub mod create;
pub mod dump;
pub mod files;
pub mod format;
pub mod memory;
pub mod snapshot;

pub use binding::{MemoryBinding, SnapshotFile};
pub use create::{create_snapshot, load_snapshot, Kind, SnapshotError};
pub use dump::{dump_memory, dump_memory_diff, dump_memory_diff_atomic};
pub use format::{read_state_file, write_state_file, FormatError};
pub use memory::{
    dirty_bitmaps, map_memory_file, set_dirty_logging, DumpStats, MemoryFileError, MemoryLayout,
    MemoryRegionLayout,
};

#[cfg(test)]
mod tests {
    //! End to end: run a guest, snapshot it, restore into a new VM from the
    //! files, and check it continues where it stopped.

    use std::path::Path;

    use boot::loader::EntryPoint;
    use devices::GuestMemoryMmap;
    use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
    use serde::{Deserialize, Serialize};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::vstate::{vcpu_state, vm_state};

    const CODE: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    /// loop: mov [DATA], rax; out 0x10, al; inc rax; jmp loop
    const GUEST: [u8; 15] = [
        0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0xe6, 0x10, 0x48, 0xff, 0xc0, 0xeb, 0xf1,
    ];

    #[derive(Serialize, Deserialize)]
    struct Snapshot {
        vm: vm_state::VmState,
        vcpu: vcpu_state::VcpuState,
    }

    fn new_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(boot::layout::KVM_TSS_ADDRESS as usize)
            .unwrap();
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
            };
            // SAFETY: `mem` outlives the VM in these tests.
            unsafe { vm.set_user_memory_region(region) }.unwrap();
        }
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config::default()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        (vm, vcpu)
    }

    /// Runs until the guest's next `out 0x10`, returning the byte.
    fn next_out(vcpu: &mut VcpuFd) -> u8 {
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(0x10, data) => return data[0],
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    /// Completes an exit in flight (upstream KVM moves RIP past the `out` only
    /// on the next KVM_RUN), as the VMM must before saving.
    fn complete_exit(vcpu: &mut VcpuFd) {
        vcpu.set_kvm_immediate_exit(1);
        let r = vcpu.run();
        assert!(matches!(r, Err(e) if e.errno() == libc::EINTR), "{r:?}");
        vcpu.set_kvm_immediate_exit(0);
    }

    #[test]
    fn test_snapshot_end_to_end_resumes_guest() {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is missing");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (state_path, mem_path) = (dir.path().join("vm.state"), dir.path().join("vm.mem"));
        let kvm = Kvm::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        mem.write_slice(&GUEST, GuestAddress(CODE)).unwrap();
        let (vm, mut vcpu) = new_vm(&kvm, &mem);
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        let entry = EntryPoint::Linux64(CODE);
        boot::cpu::setup_segments_and_paging(&mem, entry, &mut sregs).unwrap();
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&boot::cpu::boot_regs(entry)).unwrap();
        let ctx = vcpu_state::VcpuStateContext::new(&kvm, &vm).unwrap();

        assert_eq!(next_out(&mut vcpu), 0);
        set_dirty_logging(&vm, &mem, true).unwrap();
        assert_eq!(next_out(&mut vcpu), 1);
        complete_exit(&mut vcpu);
        let dirty = dirty_bitmaps(&vm, &mem).unwrap();
        let page = (DATA / memory::PAGE_SIZE) as usize;
        assert_ne!(
            dirty[0][page / 64] & (1 << (page % 64)),
            0,
            "guest write not logged"
        );

        // Save.
        let snap = Snapshot {
            vm: vm_state::save(&vm, &mem).unwrap(),
            vcpu: vcpu_state::save(&vcpu, &ctx).unwrap(),
        };
        let (binding, stats) =
            create_snapshot(&state_path, &mem_path, &mem, &snap, Kind::Full).unwrap();
        assert!(stats.pages_written < 16, "{stats:?}");

        // Restore into a brand-new VM from the files.
        let (snap, _, mem2): (Snapshot, _, _) =
            load_snapshot(&state_path, &mem_path, |s: &Snapshot| &s.vm.memory).unwrap();
        // The guest's own write (not the VMM's) made it into the file.
        assert_eq!(mem2.read_obj::<u64>(GuestAddress(DATA)).unwrap(), 1);
        let (vm2, mut vcpu2) = new_vm(&kvm, &mem2);
        vm_state::restore(&vm2, &snap.vm).unwrap();
        let ctx2 = vcpu_state::VcpuStateContext::new(&kvm, &vm2).unwrap();
        vcpu_state::restore(&vcpu2, &snap.vcpu, &ctx2).unwrap();
        assert_eq!(next_out(&mut vcpu2), 2);
        assert_eq!(next_out(&mut vcpu2), 3);
        assert_eq!(mem2.read_obj::<u64>(GuestAddress(DATA)).unwrap(), 3);

        // The original goes on too; a diff of its dirty pages brings the
        // memory file up to date with it.
        assert_eq!(next_out(&mut vcpu), 2);
        complete_exit(&mut vcpu);
        let dirty = dirty_bitmaps(&vm, &mem).unwrap();
        let (next, stats) = dump_memory_diff(&mem_path, &mem, &dirty, &binding).unwrap();
        assert!(
            stats.pages_written >= 1 && stats.pages_written < 8,
            "{stats:?}"
        );
        let mem3 = map_memory_file(&mem_path, &snap.vm.memory, &next).unwrap();
        assert_eq!(mem3.read_obj::<u64>(GuestAddress(DATA)).unwrap(), 2);
    }

    /// Re-frames `payload` with a valid header, so mutations reach postcard.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut img = format::encode_state(&()).unwrap();
        img.truncate(format::HEADER_LEN);
        img[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        img[28..32].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn test_decode_never_panics_on_mutated_payloads() {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is missing");
            return;
        }
        let kvm = Kvm::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (vm, vcpu) = new_vm(&kvm, &mem);
        let ctx = vcpu_state::VcpuStateContext::new(&kvm, &vm).unwrap();
        let snap = Snapshot {
            vm: vm_state::save(&vm, &mem).unwrap(),
            vcpu: vcpu_state::save(&vcpu, &ctx).unwrap(),
        };
        let img = format::encode_state(&snap).unwrap();
        let payload = &img[format::HEADER_LEN..];
        let p = Path::new("m.state");
        assert!(format::decode_state::<Snapshot>(&framed(payload), p).is_ok());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut m = payload.to_vec();
            match next() % 3 {
                0 => {
                    let i = (next() as usize) % m.len();
                    m[i] = next() as u8;
                }
                1 => m.truncate((next() as usize) % m.len()),
                _ => {
                    let i = (next() as usize) % m.len();
                    m.splice(i..i, [0xff; 9]);
                }
            }
            let _ = format::decode_state::<Snapshot>(&framed(&m), p);
        }
    }
}
