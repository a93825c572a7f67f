// SPDX-License-Identifier: Apache-2.0
//! The VM description exchanged before any memory moves, and the receiver's
//! compatibility check against its own configuration and host CPU.

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

/// One guest RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// One device, by kind (`block`, `net`, `serial`, …) and id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// Device kind.
    pub kind: String,
    /// Device id (unique per kind).
    pub id: String,
}

/// The CPUID words that decide whether a guest can run on a host: the vendor
/// (leaf 0) and the feature flags of leaf 1 (ECX, EDX) and leaf 7 subleaf 0
/// (EBX, ECX, EDX).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// Vendor string, e.g. `GenuineIntel`.
    pub vendor: String,
    /// Leaf 1 ECX.
    pub leaf1_ecx: u32,
    /// Leaf 1 EDX.
    pub leaf1_edx: u32,
    /// Leaf 7.0 EBX.
    pub leaf7_ebx: u32,
    /// Leaf 7.0 ECX.
    pub leaf7_ecx: u32,
    /// Leaf 7.0 EDX.
    pub leaf7_edx: u32,
}

/// Bits the guest OS or KVM toggle at run time, ignored in the comparison:
/// leaf 1 ECX OSXSAVE (27) and HYPERVISOR (31), leaf 7 ECX OSPKE (4).
const LEAF1_ECX_DYNAMIC: u32 = (1 << 27) | (1 << 31);
const LEAF7_ECX_DYNAMIC: u32 = 1 << 4;

impl CpuFeatures {
    /// Extracts the summary from a CPUID table: the guest's (on the source)
    /// or `KVM_GET_SUPPORTED_CPUID` (on the receiver's host).
    pub fn from_cpuid(cpuid: &CpuId) -> Self {
        let mut f = CpuFeatures::default();
        for e in cpuid.as_slice() {
            match (e.function, e.index) {
                (0, _) => {
                    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
                        .iter()
                        .flat_map(|w| w.to_le_bytes())
                        .collect();
                    f.vendor = String::from_utf8_lossy(&bytes).into_owned();
                }
                (1, _) => {
                    f.leaf1_ecx = e.ecx;
                    f.leaf1_edx = e.edx;
                }
                (7, 0) => {
                    f.leaf7_ebx = e.ebx;
                    f.leaf7_ecx = e.ecx;
                    f.leaf7_edx = e.edx;
                }
                _ => {}
            }
        }
        f
    }

    /// What the guest uses that `host` lacks, one entry per word, e.g.
    /// `CPUID.7.0.EBX bits 0x20 missing`. Empty when the guest fits.
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<String> {
        let words = [
            (
                "CPUID.1.ECX",
                self.leaf1_ecx & !LEAF1_ECX_DYNAMIC,
                host.leaf1_ecx,
            ),
            ("CPUID.1.EDX", self.leaf1_edx, host.leaf1_edx),
            ("CPUID.7.0.EBX", self.leaf7_ebx, host.leaf7_ebx),
            (
                "CPUID.7.0.ECX",
                self.leaf7_ecx & !LEAF7_ECX_DYNAMIC,
                host.leaf7_ecx,
            ),
            ("CPUID.7.0.EDX", self.leaf7_edx, host.leaf7_edx),
        ];
        let mut out = Vec::new();
        if self.vendor != host.vendor {
            out.push(format!(
                "CPU vendor {:?} differs from host {:?}",
                self.vendor, host.vendor
            ));
        }
        for (name, guest, host) in words {
            let missing = guest & !host;
            if missing != 0 {
                out.push(format!("{name} bits {missing:#x} missing on this host"));
            }
        }
        out
    }
}

/// What the sender describes and the receiver checks before accepting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// Guest RAM regions in guest-address order.
    pub memory: Vec<RegionSpec>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Devices, in any order.
    pub devices: Vec<DeviceSummary>,
    /// The guest's CPU features.
    pub cpu: CpuFeatures,
}

impl MigrationConfig {
    /// The memory layout of `mem` as region specs.
    pub fn memory_of(mem: &devices::GuestMemoryMmap) -> Vec<RegionSpec> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        mem.iter()
            .map(|r| RegionSpec {
                guest_addr: r.start_addr().0,
                size: r.len(),
            })
            .collect()
    }

    /// Every way the incoming (`self`, the source's) configuration does not
    /// fit this receiver (`local`, on a host with `host_cpu`). Empty when it
    /// fits.
    pub fn differences(&self, local: &MigrationConfig, host_cpu: &CpuFeatures) -> Vec<String> {
        let mut out = Vec::new();
        if self.memory != local.memory {
            let show = |m: &[RegionSpec]| {
                m.iter()
                    .map(|r| format!("{:#x}+{} MiB", r.guest_addr, r.size >> 20))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push(format!(
                "memory layout [{}] differs from local [{}]",
                show(&self.memory),
                show(&local.memory)
            ));
        }
        if self.vcpus != local.vcpus {
            out.push(format!(
                "vCPU count {} differs from local {}",
                self.vcpus, local.vcpus
            ));
        }
        let mut theirs = self.devices.clone();
        let mut ours = local.devices.clone();
        theirs.sort();
        ours.sort();
        let name = |d: &DeviceSummary| format!("{}:{}", d.kind, d.id);
        let only_theirs: Vec<_> = theirs
            .iter()
            .filter(|d| !ours.contains(d))
            .map(name)
            .collect();
        let only_ours: Vec<_> = ours
            .iter()
            .filter(|d| !theirs.contains(d))
            .map(name)
            .collect();
        if !only_theirs.is_empty() {
            out.push(format!("devices missing here: {}", only_theirs.join(", ")));
        }
        if !only_ours.is_empty() {
            out.push(format!(
                "devices not on the source: {}",
                only_ours.join(", ")
            ));
        }
        out.extend(self.cpu.missing_on(host_cpu));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    pub(crate) fn sample() -> MigrationConfig {
        MigrationConfig {
            memory: vec![RegionSpec {
                guest_addr: 0,
                size: 64 << 20,
            }],
            vcpus: 2,
            devices: vec![
                DeviceSummary {
                    kind: "block".into(),
                    id: "rootfs".into(),
                },
                DeviceSummary {
                    kind: "serial".into(),
                    id: "com1".into(),
                },
            ],
            cpu: CpuFeatures {
                vendor: "GenuineIntel".into(),
                leaf1_ecx: 0x1234,
                leaf1_edx: 0xffff,
                leaf7_ebx: 0x29,
                leaf7_ecx: 0,
                leaf7_edx: 0,
            },
        }
    }

    #[test]
    fn test_config_same_has_no_differences() {
        let c = sample();
        let mut reordered = c.clone();
        reordered.devices.reverse();
        assert!(c.differences(&reordered, &c.cpu).is_empty());
        // Dynamic bits do not count.
        let mut g = c.clone();
        g.cpu.leaf1_ecx |= 1 << 27;
        g.cpu.leaf7_ecx |= 1 << 4;
        assert!(g.differences(&c, &c.cpu).is_empty());
    }

    #[test]
    fn test_config_mismatches_are_listed() {
        let c = sample();
        let mut local = c.clone();
        local.memory[0].size = 128 << 20;
        local.vcpus = 4;
        local.devices.pop();
        local.devices.push(DeviceSummary {
            kind: "net".into(),
            id: "eth0".into(),
        });
        let mut host = c.cpu.clone();
        host.leaf7_ebx = 0x9;
        host.vendor = "AuthenticAMD".into();
        let d = c.differences(&local, &host).join("; ");
        for want in [
            "memory layout",
            "vCPU count 2 differs from local 4",
            "devices missing here: serial:com1",
            "devices not on the source: net:eth0",
            "CPU vendor",
            "CPUID.7.0.EBX bits 0x20 missing",
        ] {
            assert!(d.contains(want), "{want:?} not in {d:?}");
        }
    }

    #[test]
    fn test_config_cpu_features_from_cpuid() {
        let entry = |function, index, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let cpuid = CpuId::from_entries(&[
            // "GenuineIntel" = EBX "Genu", EDX "ineI", ECX "ntel".
            entry(0, 0, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0, 0xaa, 0xbb),
            entry(7, 0, 0x11, 0x22, 0x33),
            entry(7, 1, 0xff, 0xff, 0xff),
        ])
        .unwrap();
        let f = CpuFeatures::from_cpuid(&cpuid);
        assert_eq!(f.vendor, "GenuineIntel");
        assert_eq!((f.leaf1_ecx, f.leaf1_edx), (0xaa, 0xbb));
        assert_eq!((f.leaf7_ebx, f.leaf7_ecx, f.leaf7_edx), (0x11, 0x22, 0x33));
    }

    #[test]
    fn test_config_host_cpu_supports_guest_cpu() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let host = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let f = CpuFeatures::from_cpuid(&host);
        assert!(!f.vendor.is_empty());
        assert!(f.missing_on(&f).is_empty());
    }
}
