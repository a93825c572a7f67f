// SPDX-License-Identifier: Apache-2.0
//! The microVM state tree: everything a snapshot (and a migration) carries
//! besides guest memory. One typed tree for both, so the compiler checks it.

use devices::legacy::{AcpiPmState, GedState, I8042State, SerialDeviceState};
use devices::virtio::block::BlockState;
use devices::virtio::mmio::MmioTransportState;
use devices::virtio::net::NetState;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

/// A virtio device's own state and its transport's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioState<T> {
    /// The device.
    pub device: T,
    /// Its virtio-mmio transport (features, status, queues).
    pub transport: MmioTransportState,
}

/// Every device's state, in attach order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The ACPI sleep/reset register.
    pub acpi_pm: AcpiPmState,
    /// The ACPI Generic Event Device.
    pub ged: GedState,
    /// virtio-blk devices, root first (as attached).
    pub blocks: Vec<VirtioState<BlockState>>,
    /// virtio-net devices, as attached.
    pub nets: Vec<VirtioState<NetState>>,
}

/// A whole microVM, minus guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicrovmState {
    /// What the VM was built from (disks and TAPs are re-opened by path/name).
    pub config: VmConfig,
    /// Irqchip, PIT, clock and the guest memory layout.
    pub vm: VmState,
    /// One per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DeviceStates,
    /// The CPUID the source host's KVM supported, which bounds the features
    /// the guest was offered; a restoring host must support all of them.
    pub host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

/// CPUID feature words a guest may depend on: (leaf, subleaf, register index
/// 0=eax..3=edx, name of the word).
const FEATURE_WORDS: &[(u32, u32, usize, &str)] = &[
    (1, 0, 2, "CPUID.1:ECX"),
    (1, 0, 3, "CPUID.1:EDX"),
    (7, 0, 1, "CPUID.7.0:EBX"),
    (7, 0, 2, "CPUID.7.0:ECX"),
    (7, 0, 3, "CPUID.7.0:EDX"),
    (0x8000_0001, 0, 2, "CPUID.80000001:ECX"),
    (0x8000_0001, 0, 3, "CPUID.80000001:EDX"),
];

/// Bits this wisp sets in CPUID itself (hypervisor, topology), never missing.
const VMM_OWNED: &[(u32, usize, u32)] = &[(1, 2, 1 << 31), (1, 3, 1 << 28)];

fn word(entries: &[kvm_bindings::kvm_cpuid_entry2], leaf: u32, sub: u32, reg: usize) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == sub)
        .map(|e| [e.eax, e.ebx, e.ecx, e.edx][reg])
        .unwrap_or(0)
}

/// The CPU features the snapshot's guest was given that `host` (KVM's
/// supported CPUID) lacks, as "WORD bit N" strings; empty when compatible.
pub fn missing_cpu_features(
    guest: &[kvm_bindings::kvm_cpuid_entry2],
    host: &[kvm_bindings::kvm_cpuid_entry2],
) -> Vec<String> {
    let mut missing = Vec::new();
    for &(leaf, sub, reg, name) in FEATURE_WORDS {
        let mut need = word(guest, leaf, sub, reg) & !word(host, leaf, sub, reg);
        for &(l, r, mask) in VMM_OWNED {
            if l == leaf && r == reg {
                need &= !mask;
            }
        }
        for bit in 0..32 {
            if need & (1 << bit) != 0 {
                missing.push(format!("{name} bit {bit}"));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn e(function: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn test_missing_cpu_features_lists_only_absent_bits() {
        let host = [e(1, 0b0110, 0)];
        assert!(missing_cpu_features(&[e(1, 0b0100 | (1 << 31), 1 << 28)], &host).is_empty());
        assert_eq!(
            missing_cpu_features(&[e(1, 0b1001, 0)], &host),
            vec![
                "CPUID.1:ECX bit 0".to_string(),
                "CPUID.1:ECX bit 3".to_string()
            ]
        );
    }
}
