// SPDX-License-Identifier: Apache-2.0
//! Saving and restoring VM-wide KVM state: the in-kernel PICs and IOAPIC,
//! the PIT, the KVM clock, and the guest RAM layout.

use devices::GuestMemoryMmap;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::persist::memory::MemoryLayout;

/// Why VM state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which ioctl (and chip).
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved irqchip has the wrong chip id.
    #[error("Saved irqchip {found} is in the slot for chip {expected}")]
    ChipId {
        /// Id the slot needs.
        expected: u32,
        /// Id in the state.
        found: u32,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, VmStateError>;

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Ioctl { what, source }
}

/// One in-kernel interrupt controller (`KVM_GET_IRQCHIP`), with the
/// comparison and debug output `kvm_irqchip` lacks.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IrqchipState(pub kvm_irqchip);

impl IrqchipState {
    fn bytes(&self) -> Vec<u8> {
        // kvm-bindings serialises kvm_irqchip as its raw bytes; encoding to
        // a Vec cannot fail.
        postcard::to_stdvec(&self.0).unwrap_or_default()
    }
}

impl PartialEq for IrqchipState {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState")
            .field("chip_id", &self.0.chip_id)
            .finish_non_exhaustive()
    }
}

/// VM-wide KVM state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259 PIC.
    pub pic_master: IrqchipState,
    /// Slave 8259 PIC.
    pub pic_slave: IrqchipState,
    /// IOAPIC.
    pub ioapic: IrqchipState,
    /// 8254 PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
    /// KVM clock (`KVM_GET_CLOCK`); flags are cleared on restore.
    pub clock: kvm_clock_data,
    /// Guest RAM: guest-physical regions and their place in the memory file.
    pub memory: MemoryLayout,
}

fn get_chip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<IrqchipState> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(ioctl(what))?;
    Ok(IrqchipState(chip))
}

fn set_chip(fd: &VmFd, chip: &IrqchipState, expected: u32, what: &'static str) -> Result<()> {
    if chip.0.chip_id != expected {
        return Err(VmStateError::ChipId {
            expected,
            found: chip.0.chip_id,
        });
    }
    fd.set_irqchip(&chip.0).map_err(ioctl(what))
}

/// Saves the VM-wide state of `fd`, whose RAM is `memory`.
pub fn save(fd: &VmFd, memory: &GuestMemoryMmap) -> Result<VmState> {
    Ok(VmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        memory: MemoryLayout::of(memory),
    })
}

/// Restores `state` into `fd`, a new VM that already has its irqchip and PIT
/// created and its memory registered. Restore the VM before its vCPUs: the
/// LAPICs deliver into the IOAPIC/PIC state set here.
///
/// The clock is set with all flags cleared: `KVM_CLOCK_TSC_STABLE` is
/// output-only information, and without `KVM_CLOCK_REALTIME` the guest's
/// kvmclock resumes from the saved value rather than jumping by the time the
/// VM was stopped (the guest's NTP, or a later wall-clock update, corrects
/// wall time).
pub fn restore(fd: &VmFd, state: &VmState) -> Result<()> {
    set_chip(
        fd,
        &state.pic_master,
        KVM_IRQCHIP_PIC_MASTER,
        "KVM_SET_IRQCHIP (PIC master)",
    )?;
    set_chip(
        fd,
        &state.pic_slave,
        KVM_IRQCHIP_PIC_SLAVE,
        "KVM_SET_IRQCHIP (PIC slave)",
    )?;
    set_chip(
        fd,
        &state.ioapic,
        KVM_IRQCHIP_IOAPIC,
        "KVM_SET_IRQCHIP (IOAPIC)",
    )?;
    fd.set_pit2(&state.pit).map_err(ioctl("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        flags: 0,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_pit_config;
    use kvm_ioctls::Kvm;
    use vm_memory::GuestAddress;

    fn new_vm(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config::default()).unwrap();
        vm
    }

    #[test]
    fn test_vm_state_round_trip() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is missing");
            return;
        }
        let kvm = Kvm::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let src = new_vm(&kvm);
        // Non-default state: an IOAPIC redirection entry, PIC masks, a PIT
        // channel count, and a clock far from zero.
        let mut ioapic = get_chip(&src, KVM_IRQCHIP_IOAPIC, "get").unwrap();
        // SAFETY: chip_id 2 selects the ioapic member of the union.
        unsafe {
            ioapic.0.chip.ioapic.redirtbl[5].bits = 0x30;
            ioapic.0.chip.ioapic.id = 0;
        }
        src.set_irqchip(&ioapic.0).unwrap();
        let mut pic = get_chip(&src, KVM_IRQCHIP_PIC_MASTER, "get").unwrap();
        // chip_id 0 selects the pic member of the union.
        pic.0.chip.pic.imr = 0xfa;
        src.set_irqchip(&pic.0).unwrap();
        let mut pit = src.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        src.set_pit2(&pit).unwrap();
        src.set_clock(&kvm_clock_data {
            clock: 5_000_000_000,
            ..Default::default()
        })
        .unwrap();

        let saved = save(&src, &mem).unwrap();
        let bytes = postcard::to_stdvec(&saved).unwrap();
        let decoded: VmState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, saved);

        let dst = new_vm(&kvm);
        restore(&dst, &decoded).unwrap();
        let again = save(&dst, &mem).unwrap();
        assert_eq!(again.pic_master, saved.pic_master);
        assert_eq!(again.pic_slave, saved.pic_slave);
        assert_eq!(again.ioapic, saved.ioapic);
        assert_eq!(again.memory, saved.memory);
        assert_eq!(again.pit.channels[0].mode, 2);
        assert_eq!(again.pit.channels[0].count, 0x1234);
        // The clock runs on from the saved value.
        let dt = again.clock.clock.wrapping_sub(saved.clock.clock);
        assert!(dt < 5_000_000_000, "clock moved by {dt} ns");
        // A chip in the wrong slot is refused.
        let mut bad = saved.clone();
        bad.pic_slave = saved.ioapic;
        assert!(matches!(
            restore(&dst, &bad),
            Err(VmStateError::ChipId {
                expected: 1,
                found: 2
            })
        ));
    }
}
