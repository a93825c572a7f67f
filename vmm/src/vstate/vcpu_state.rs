// SPDX-License-Identifier: Apache-2.0
//! Saving and restoring everything KVM holds for one x86_64 vCPU: CPUID,
//! registers, FPU/XSAVE, XCRs, MSRs, LAPIC, pending events, MP state, debug
//! registers and the TSC frequency.
//!
//! The vCPU must not be running (paused, with any exit completed) while it is
//! saved or restored.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Why a vCPU's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused one MSR on restore.
    #[error("KVM_SET_MSRS refused MSR {index:#x} ({set} of {total} were set)")]
    MsrRefused {
        /// The first MSR KVM did not accept.
        index: u32,
        /// How many were set before it.
        set: usize,
        /// How many were to be set.
        total: usize,
    },
    /// A list is longer than KVM's limit.
    #[error("Too many {what}: {found} (KVM takes at most {max})")]
    TooMany {
        /// CPUID entries or MSRs.
        what: &'static str,
        /// Count in the state.
        found: usize,
        /// KVM's limit.
        max: usize,
    },
    /// The saved XSAVE area does not fit this host's.
    #[error(
        "Saved XSAVE area is {found} bytes with state beyond the {host} bytes this host's KVM takes"
    )]
    XsaveTooLarge {
        /// Bytes saved.
        found: usize,
        /// Bytes the host takes.
        host: usize,
    },
    /// The TSC frequency differs and this host cannot scale it.
    #[error("Snapshot TSC runs at {saved} kHz, this vCPU at {host} kHz, and KVM cannot scale it: {source}")]
    TscFrequency {
        /// Frequency in the snapshot.
        saved: u32,
        /// Frequency of the new vCPU.
        host: u32,
        /// The KVM_SET_TSC_KHZ error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, VcpuStateError>;

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { what, source }
}

/// MSR numbers used below.
pub mod msr {
    /// Time-stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// Local APIC base.
    pub const IA32_APIC_BASE: u32 = 0x1b;
    /// TSC adjust.
    pub const IA32_TSC_ADJUST: u32 = 0x3b;
    /// Miscellaneous enables.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// Page attribute table.
    pub const IA32_PAT: u32 = 0x277;
    /// MTRR default type.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// LAPIC timer deadline (TSC-relative).
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// kvmclock, legacy numbers.
    pub const KVM_WALL_CLOCK: u32 = 0x11;
    /// kvmclock, legacy numbers.
    pub const KVM_SYSTEM_TIME: u32 = 0x12;
    /// First of the kvmclock/paravirt MSRs (wall clock, system time, async
    /// PF, steal time, PV EOI, poll control, async PF int/ack).
    pub const KVM_PV_FIRST: u32 = 0x4b56_4d00;
    /// Last of them.
    pub const KVM_PV_LAST: u32 = 0x4b56_4d07;
}

/// What saving and restoring needs to know about this host's KVM; probe it
/// once per VM with [`VcpuStateContext::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStateContext {
    /// MSRs to save: `KVM_GET_MSR_INDEX_LIST`, the feature MSRs, and the TSC,
    /// APIC-base, MTRR, PAT and kvmclock MSRs, without duplicates. Indices a
    /// vCPU cannot read are dropped at save time.
    pub msr_indices: Vec<u32>,
    /// Size in bytes of the XSAVE area (`KVM_CAP_XSAVE2`, at least 4096).
    pub xsave_size: usize,
}

impl VcpuStateContext {
    /// Probes `kvm` and `vm_fd`.
    pub fn new(kvm: &Kvm, vm_fd: &VmFd) -> Result<Self> {
        Ok(Self {
            msr_indices: msrs_to_save(kvm)?,
            xsave_size: xsave_size(vm_fd),
        })
    }
}

/// The XSAVE area size of this VM: `KVM_CAP_XSAVE2` when present, else the
/// 4096-byte legacy `kvm_xsave`.
pub fn xsave_size(vm_fd: &VmFd) -> usize {
    let legacy = std::mem::size_of::<kvm_xsave>();
    usize::try_from(vm_fd.check_extension_int(Cap::Xsave2))
        .unwrap_or(0)
        .max(legacy)
}

/// The MSRs a snapshot saves (see [`VcpuStateContext::msr_indices`]).
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>> {
    let mut list: Vec<u32> = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    // Feature MSRs are optional (older kernels lack the ioctl).
    if let Ok(features) = kvm.get_msr_feature_index_list() {
        list.extend_from_slice(features.as_slice());
    }
    list.extend_from_slice(&[
        msr::IA32_TSC,
        msr::IA32_APIC_BASE,
        msr::IA32_TSC_ADJUST,
        msr::IA32_MISC_ENABLE,
        msr::IA32_PAT,
        msr::MTRR_DEF_TYPE,
        msr::IA32_TSC_DEADLINE,
        msr::KVM_WALL_CLOCK,
        msr::KVM_SYSTEM_TIME,
    ]);
    list.extend(msr::KVM_PV_FIRST..=msr::KVM_PV_LAST);
    // Variable and fixed-range MTRRs.
    list.extend(0x200..0x210);
    list.extend([0x250, 0x258, 0x259]);
    list.extend(0x268..0x270);
    let mut seen = std::collections::HashSet::new();
    list.retain(|i| seen.insert(*i));
    Ok(list)
}

/// x87/SSE state as `KVM_GET_FPU` returns it (a serialisable copy of
/// `kvm_fpu`). Redundant with XSAVE, kept for hosts without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table set on the vCPU (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency in kHz (`KVM_GET_TSC_KHZ`), if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// The XSAVE area as 32-bit words (`KVM_GET_XSAVE2`, or `KVM_GET_XSAVE`).
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// MSR values, in save order.
    pub msrs: Vec<kvm_msr_entry>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMI, SMI, interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
}

fn get_xsave(fd: &VcpuFd, size: usize) -> Result<Vec<u32>> {
    let legacy = std::mem::size_of::<kvm_xsave>();
    if size <= legacy {
        let x = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        return Ok(x.region.to_vec());
    }
    let extra = (size - legacy).div_ceil(4);
    let mut x = Xsave::new(extra).map_err(|_| VcpuStateError::TooMany {
        what: "XSAVE words",
        found: extra,
        max: u32::MAX as usize,
    })?;
    // SAFETY: `x` holds `size` bytes, the size KVM_CAP_XSAVE2 reported for
    // this VM, so KVM does not write past it.
    unsafe { fd.get_xsave2(&mut x) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
    let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(x.as_slice());
    Ok(words)
}

fn set_xsave(fd: &VcpuFd, words: &[u32], size: usize) -> Result<()> {
    let legacy_words = std::mem::size_of::<kvm_xsave>() / 4;
    let host_words = size.div_ceil(4).max(legacy_words);
    if words[host_words.min(words.len())..].iter().any(|&w| w != 0) {
        return Err(VcpuStateError::XsaveTooLarge {
            found: words.len() * 4,
            host: size,
        });
    }
    // Pad (or cut zeros) to exactly what this host's KVM reads.
    let mut x = Xsave::new(host_words - legacy_words).map_err(|_| VcpuStateError::TooMany {
        what: "XSAVE words",
        found: host_words,
        max: u32::MAX as usize,
    })?;
    let n = words.len().min(legacy_words);
    // SAFETY: only the fixed `region` is written; the FAM length field,
    // which the wrapper's invariants depend on, is left alone.
    unsafe { x.as_mut_fam_struct() }.xsave.region[..n].copy_from_slice(&words[..n]);
    for (d, s) in x
        .as_mut_slice()
        .iter_mut()
        .zip(words.iter().skip(legacy_words))
    {
        *d = *s;
    }
    // SAFETY: `x` is `host_words` words, at least the XSAVE size KVM reported
    // for this VM (or the legacy 4096 bytes), so KVM reads only our buffer.
    unsafe { fd.set_xsave2(&x) }.map_err(ioctl("KVM_SET_XSAVE"))
}

/// Reads the MSRs in `indices`, dropping those this vCPU refuses to read.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            what: "MSRs",
            found: entries.len(),
            max: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one.
        rest = &rest[(n + 1).min(rest.len())..];
        if n < chunk.len() {
            log::debug!("MSR {:#x} is not readable; not saved", chunk[n]);
        }
    }
    Ok(out)
}

/// Saves the state of vCPU `fd`.
pub fn save(fd: &VcpuFd, ctx: &VcpuStateContext) -> Result<VcpuState> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    // Events first and MP state early: they are what a racing kick could
    // change, and reading is side-effect free anyway.
    let vcpu_events = fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?);
    let xsave = get_xsave(fd, ctx.xsave_size)?;
    let xcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let msrs = get_msrs(fd, &ctx.msr_indices)?;
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        cpuid,
        tsc_khz,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        msrs,
        mp_state,
        lapic,
        vcpu_events,
    })
}

/// The MSRs in restore order: the TSC deadline after the TSC, since KVM
/// interprets the deadline against the guest TSC as set at that moment.
fn msr_restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let (late, mut out): (Vec<_>, Vec<_>) =
        msrs.iter().partition(|e| e.index == msr::IA32_TSC_DEADLINE);
    out.extend(late);
    out
}

fn set_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<()> {
    let ordered = msr_restore_order(msrs);
    for chunk in ordered.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let list = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooMany {
            what: "MSRs",
            found: chunk.len(),
            max: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        })?;
        let n = fd.set_msrs(&list).map_err(ioctl("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(VcpuStateError::MsrRefused {
                index: chunk[n].index,
                set: n,
                total: chunk.len(),
            });
        }
    }
    Ok(())
}

/// Restores `state` into the fresh vCPU `fd` (created in a VM whose irqchip
/// exists). The order matters:
///
/// 1. CPUID: KVM derives from it which MSRs, XSAVE features and XCR0 bits
///    are valid, the guest's MAXPHYADDR, and kvmclock support.
/// 2. TSC frequency: before the TSC MSR, so the value is scaled right.
/// 3. sregs, then regs: control registers and EFER set the mode the rest is
///    interpreted in; sregs also sets the APIC base.
/// 4. FPU, XSAVE (after CPUID, which bounds XCR0), XCRs, debug registers.
/// 5. MSRs, with the TSC deadline after the TSC.
/// 6. MP state, then LAPIC: after the APIC base (sregs and MSR), because a
///    change of APIC mode resets the LAPIC registers.
/// 7. vCPU events last: setting registers clears a pending exception, so
///    anything pending must be put back at the very end.
pub fn restore(fd: &VcpuFd, state: &VcpuState, ctx: &VcpuStateContext) -> Result<()> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::TooMany {
        what: "CPUID entries",
        found: state.cpuid.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    if let Some(saved) = state.tsc_khz {
        let host = fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?;
        if host != saved {
            fd.set_tsc_khz(saved)
                .map_err(|source| VcpuStateError::TscFrequency {
                    saved,
                    host,
                    source,
                })?;
        }
    }
    fd.set_sregs(&state.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(ioctl("KVM_SET_FPU"))?;
    set_xsave(fd, &state.xsave, ctx.xsave_size)?;
    fd.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    set_msrs(fd, &state.msrs)?;
    fd.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    fd.set_lapic(&state.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    struct TestVm {
        _vm: VmFd,
        vcpu: VcpuFd,
        ctx: VcpuStateContext,
    }

    fn new_vcpu(kvm: &Kvm) -> TestVm {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let ctx = VcpuStateContext::new(kvm, &vm).unwrap();
        TestVm { _vm: vm, vcpu, ctx }
    }

    fn kvm() -> Option<Kvm> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is missing");
            return None;
        }
        Some(Kvm::new().unwrap())
    }

    /// Puts recognisable, non-default values in every part of the state.
    fn dirty_vcpu(kvm: &Kvm, fd: &VcpuFd) {
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cr0 = 0x8005_0033;
        sregs.cr3 = 0x9000;
        sregs.cr4 = 0x20 | 0x200 | 0x400;
        sregs.efer = 0xd01;
        sregs.cs.l = 1;
        sregs.cs.db = 0;
        sregs.cs.selector = 0x8;
        sregs.gdt.base = 0x500;
        sregs.gdt.limit = 0x1f;
        fd.set_sregs(&sregs).unwrap();
        let regs = kvm_regs {
            rax: 0x1111,
            rbx: 0x2222,
            rsp: 0x8ff0,
            r15: 0xf15,
            rip: 0x10_0000,
            rflags: 0x246,
            ..Default::default()
        };
        fd.set_regs(&regs).unwrap();
        let mut fpu = fd.get_fpu().unwrap();
        fpu.fcw = 0x37f;
        fpu.mxcsr = 0x1f80;
        fpu.xmm[3] = [7; 16];
        fd.set_fpu(&fpu).unwrap();
        let dregs = kvm_debugregs {
            db: [0x1000, 0x2000, 0, 0],
            dr7: 0x401,
            ..fd.get_debug_regs().unwrap()
        };
        fd.set_debug_regs(&dregs).unwrap();
        let entries = [
            kvm_msr_entry {
                index: 0xc000_0102, // KERNEL_GS_BASE
                data: 0xdead_b000,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0x174, // SYSENTER_CS
                data: 0x10,
                ..Default::default()
            },
            kvm_msr_entry {
                index: msr::IA32_PAT,
                data: 0x0007_0406_0007_0406,
                ..Default::default()
            },
        ];
        assert_eq!(
            fd.set_msrs(&Msrs::from_entries(&entries).unwrap()).unwrap(),
            3
        );
        let mut lapic = fd.get_lapic().unwrap();
        // LINT0 = ExtINT, LINT1 = NMI, as the boot code sets them.
        lapic.regs[0x350..0x354].copy_from_slice(&[0, 7, 0, 0]);
        lapic.regs[0x360..0x364].copy_from_slice(&[0, 4, 0, 0]);
        fd.set_lapic(&lapic).unwrap();
    }

    fn msr(state: &VcpuState, index: u32) -> Option<u64> {
        state.msrs.iter().find(|e| e.index == index).map(|e| e.data)
    }

    #[test]
    fn test_vcpu_state_round_trip_into_fresh_vm() {
        let Some(kvm) = kvm() else { return };
        let src = new_vcpu(&kvm);
        dirty_vcpu(&kvm, &src.vcpu);
        let saved = save(&src.vcpu, &src.ctx).unwrap();
        assert_eq!(saved.regs.rax, 0x1111);
        assert_eq!(msr(&saved, 0xc000_0102), Some(0xdead_b000));
        assert!(saved.xsave.len() * 4 >= 4096);
        eprintln!(
            "saved {} MSRs, {} XSAVE bytes",
            saved.msrs.len(),
            saved.xsave.len() * 4
        );
        assert!(saved.msrs.len() >= 40, "{} MSRs", saved.msrs.len());
        // Through the encoding, as a snapshot would.
        let bytes = postcard::to_stdvec(&saved).unwrap();
        let decoded: VcpuState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, saved);

        let dst = new_vcpu(&kvm);
        restore(&dst.vcpu, &decoded, &dst.ctx).unwrap();
        let again = save(&dst.vcpu, &dst.ctx).unwrap();
        assert_eq!(again.cpuid, saved.cpuid);
        assert_eq!(again.tsc_khz, saved.tsc_khz);
        assert_eq!(again.regs, saved.regs);
        assert_eq!(again.sregs, saved.sregs);
        assert_eq!(again.fpu, saved.fpu);
        assert_eq!(again.xsave, saved.xsave);
        assert_eq!(again.xcrs, saved.xcrs);
        assert_eq!(again.debug_regs, saved.debug_regs);
        assert_eq!(again.mp_state, saved.mp_state);
        assert_eq!(again.lapic, saved.lapic);
        assert_eq!(again.vcpu_events, saved.vcpu_events);
        // Every MSR but the running TSC comes back exactly.
        let strip = |s: &VcpuState| -> Vec<kvm_msr_entry> {
            s.msrs
                .iter()
                .filter(|e| e.index != msr::IA32_TSC)
                .copied()
                .collect()
        };
        assert_eq!(strip(&again), strip(&saved));
        let (t0, t1) = (
            msr(&saved, msr::IA32_TSC).unwrap(),
            msr(&again, msr::IA32_TSC).unwrap(),
        );
        assert!(t1 >= t0, "TSC went back: {t0} -> {t1}");
    }

    #[test]
    fn test_vcpu_state_restore_refuses_oversized_xsave() {
        let Some(kvm) = kvm() else { return };
        let src = new_vcpu(&kvm);
        dirty_vcpu(&kvm, &src.vcpu);
        let mut saved = save(&src.vcpu, &src.ctx).unwrap();
        // Zeros beyond the host's size are fine (padding), state is not.
        saved.xsave.resize(src.ctx.xsave_size / 4 + 16, 0);
        let dst = new_vcpu(&kvm);
        restore(&dst.vcpu, &saved, &dst.ctx).unwrap();
        *saved.xsave.last_mut().unwrap() = 1;
        assert!(matches!(
            restore(&dst.vcpu, &saved, &dst.ctx),
            Err(VcpuStateError::XsaveTooLarge { .. })
        ));
    }

    #[test]
    fn test_vcpu_state_msr_restore_order_puts_deadline_after_tsc() {
        let e = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let order: Vec<u32> =
            msr_restore_order(&[e(msr::IA32_TSC_DEADLINE), e(0x174), e(msr::IA32_TSC)])
                .iter()
                .map(|e| e.index)
                .collect();
        assert_eq!(order, [0x174, msr::IA32_TSC, msr::IA32_TSC_DEADLINE]);
    }

    #[test]
    fn test_vcpu_state_unknown_msr_is_dropped_on_save() {
        let Some(kvm) = kvm() else { return };
        let mut t = new_vcpu(&kvm);
        t.ctx.msr_indices = vec![0x174, 0xdead_0000, 0xc000_0102];
        let s = save(&t.vcpu, &t.ctx).unwrap();
        let idx: Vec<u32> = s.msrs.iter().map(|e| e.index).collect();
        assert_eq!(idx, [0x174, 0xc000_0102]);
    }
}
