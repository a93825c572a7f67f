// SPDX-License-Identifier: Apache-2.0
//! Adjustments for hosts whose KVM cannot run some guest instructions.
//!
//! PVM (`kvm_pvm`, a paravirtual KVM used for nested guests) runs guest ring-0
//! code through KVM's instruction emulator, which cannot emulate
//! `lock cmpxchg16b`. Linux uses it in ring 0 whenever CPUID advertises CX16,
//! so on such hosts wisp hides CX16 (PVM honours that bit). Nothing changes on
//! VMX/SVM hosts.

use std::path::Path;

use kvm_bindings::kvm_cpuid_entry2;

const CPUID_1_ECX_CX16: u32 = 1 << 13;

/// The host KVM flavours wisp distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// Hardware virtualisation (VMX or SVM).
    Hardware,
    /// PVM: ring-0 guest code is emulated.
    Pvm,
}

/// Detects the host's KVM flavour.
pub fn detect() -> HostKvm {
    detect_in(Path::new("/sys/module"))
}

fn detect_in(sys_module: &Path) -> HostKvm {
    if sys_module.join("kvm_pvm").exists() {
        HostKvm::Pvm
    } else {
        HostKvm::Hardware
    }
}

/// Applies the host's CPUID adjustments to a vCPU's CPUID entries.
pub fn adjust_cpuid(host: HostKvm, entries: &mut [kvm_cpuid_entry2]) {
    if host != HostKvm::Pvm {
        return;
    }
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx &= !CPUID_1_ECX_CX16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cx16_hidden_only_on_pvm() {
        let mut e = [kvm_cpuid_entry2 {
            function: 1,
            ecx: CPUID_1_ECX_CX16 | 1,
            ..Default::default()
        }];
        adjust_cpuid(HostKvm::Hardware, &mut e);
        assert_eq!(e[0].ecx, CPUID_1_ECX_CX16 | 1);
        adjust_cpuid(HostKvm::Pvm, &mut e);
        assert_eq!(e[0].ecx, 1);
    }

    #[test]
    fn test_detect_from_sysfs() {
        let d = std::env::temp_dir().join(format!("wisp-quirk-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(detect_in(&d), HostKvm::Hardware);
        std::fs::create_dir_all(d.join("kvm_pvm")).unwrap();
        assert_eq!(detect_in(&d), HostKvm::Pvm);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
