// SPDX-License-Identifier: Apache-2.0
//! The KVM VM: guest memory slots, the in-kernel irqchip and PIT, irqfds and
//! ioeventfds.

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Why the VM could not be created or configured.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("Cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("Unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// A capability wisp needs is missing.
    #[error("KVM lacks a capability wisp needs: {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// A KVM VM with its memory registered.
#[derive(Debug)]
pub struct Vm {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// The VM fd (shared with a migration thread reading the dirty log).
    pub fd: std::sync::Arc<VmFd>,
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// The host's KVM flavour.
    pub host: crate::host_quirks::HostKvm,
}

/// Opens /dev/kvm and checks what wisp relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    use kvm_ioctls::Cap;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the VM, registers `memory`, and sets up the irqchip and PIT.
    pub fn new(kvm: Kvm, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(boot::layout::KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(boot::layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let vm = Self {
            kvm,
            fd: std::sync::Arc::new(fd),
            memory,
            host: crate::host_quirks::detect(),
        };
        vm.register_memory(0)?;
        vm.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(vm)
    }

    /// Registers every memory region with KVM, with `flags` (e.g. dirty logging).
    pub fn register_memory(&self, flags: u32) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's mapping lives as long as `self.memory`, which
            // the VM owns, so KVM never sees a dangling host address.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}
