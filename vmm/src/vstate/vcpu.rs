// SPDX-License-Identifier: Apache-2.0
//! vCPUs: initial configuration, one thread each running `KVM_RUN`, exit
//! dispatch to the buses, and pause/resume/stop through a command channel plus
//! a kick signal that makes `KVM_RUN` return.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use boot::loader::EntryPoint;
use devices::bus::Bus;
use kvm_bindings::{
    kvm_run, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use super::vcpu_state::{self, VcpuState, VcpuStateContext};
use super::vm::Vm;
use crate::metrics;

/// Why configuring a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: KVM {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        id: u8,
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Building the boot state failed.
    #[error("vCPU {id}: {source}")]
    Boot {
        /// vCPU index.
        id: u8,
        /// The error.
        #[source]
        source: boot::BootError,
    },
    /// The vCPU thread could not be started or signalled.
    #[error("vCPU {id}: {what}: {source}")]
    Thread {
        /// vCPU index.
        id: u8,
        /// What failed.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread did not answer a command in time.
    #[error("vCPU {0} did not respond")]
    Unresponsive(u8),
}

/// How the VM ended, as seen by a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    Poweroff,
    /// The guest asked for a reset (reboot).
    Reset,
    /// The vCPU failed; the message says how.
    Error(String),
}

/// Commands to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCmd {
    /// Stop running guest code (completing any exit in flight) and wait.
    Pause,
    /// Run again after a pause.
    Resume,
    /// Leave the thread.
    Stop,
    /// Report the vCPU's KVM state (only while paused).
    Save,
}

/// Answers from a vCPU thread.
#[derive(Debug)]
pub enum VcpuResp {
    /// Now paused.
    Paused,
    /// Now running.
    Resumed,
    /// The state asked for with [`VcpuCmd::Save`].
    Saved(Box<Result<VcpuState, String>>),
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set before
            // the first KVM_RUN and cleared before the VcpuFd is dropped; a single
            // byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal handler (once per process).
pub fn register_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What a vCPU thread shares with the rest of the VMM.
#[derive(Debug)]
pub struct VcpuLinks {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// How the thread reports the end of the VM.
    pub exit_tx: Sender<(u8, VmExit)>,
    /// Signalled with `exit_tx`.
    pub exit_evt: EventFd,
    /// For saving the vCPU's state.
    pub ctx: Arc<VcpuStateContext>,
    /// Throttle percentage (auto-converge).
    pub throttle: Arc<AtomicU8>,
}

/// A vCPU before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

fn ioctl(id: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { id, what, source }
}

impl Vcpu {
    /// Creates vCPU `id`.
    pub fn new(vm: &Vm, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl(id, "KVM_CREATE_VCPU"))?;
        Ok(Self { id, fd })
    }

    /// Its index (= APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets CPUID, MSRs and LAPIC for vCPU `id` of `count`; the boot vCPU also
    /// gets registers, segments, paging and FPU for `entry`.
    pub fn configure(
        &mut self,
        vm: &Vm,
        supported_cpuid: &CpuId,
        count: u8,
        entry: EntryPoint,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let mut cpuid = supported_cpuid.clone();
        boot::cpuid::filter_cpuid(cpuid.as_mut_slice(), id, count);
        crate::host_quirks::adjust_cpuid(vm.host, cpuid.as_mut_slice());
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl(id, "KVM_SET_CPUID2"))?;

        let msrs = Msrs::from_entries(&boot::cpu::boot_msrs()).map_err(|_| VcpuError::Ioctl {
            id,
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = self.fd.set_msrs(&msrs).map_err(ioctl(id, "KVM_SET_MSRS"))?;
        if n != msrs.as_slice().len() {
            log::debug!(
                "vCPU {id}: KVM accepted {n} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }

        let mut lapic = self.fd.get_lapic().map_err(ioctl(id, "KVM_GET_LAPIC"))?;
        boot::cpu::set_lapic_lints(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(ioctl(id, "KVM_SET_LAPIC"))?;

        if id == 0 {
            self.fd
                .set_fpu(&boot::cpu::boot_fpu())
                .map_err(ioctl(id, "KVM_SET_FPU"))?;
            let mut sregs = self.fd.get_sregs().map_err(ioctl(id, "KVM_GET_SREGS"))?;
            boot::cpu::setup_segments_and_paging(&vm.memory, entry, &mut sregs)
                .map_err(|source| VcpuError::Boot { id, source })?;
            self.fd
                .set_sregs(&sregs)
                .map_err(ioctl(id, "KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&boot::cpu::boot_regs(entry))
                .map_err(ioctl(id, "KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Loads a saved state (a restored VM's vCPU, before its thread starts).
    pub fn restore_state(
        &self,
        state: &VcpuState,
        ctx: &VcpuStateContext,
    ) -> Result<(), vcpu_state::VcpuStateError> {
        vcpu_state::restore(&self.fd, state, ctx)
    }

    /// Starts the vCPU thread. `exit_tx`/`exit_evt` report how the VM ended.
    pub fn start(self, links: VcpuLinks, start_paused: bool) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let (cmd_tx, cmd_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let runner = Runner {
            vcpu: self,
            pio: links.pio,
            mmio: links.mmio,
            cmd_rx,
            resp_tx,
            exit_tx: links.exit_tx,
            exit_evt: links.exit_evt,
            ctx: links.ctx,
            throttle: links.throttle,
        };
        let thread = std::thread::Builder::new()
            .name(format!("wisp-vcpu{id}"))
            .spawn(move || runner.run(start_paused))
            .map_err(|source| VcpuError::Thread {
                id,
                what: "cannot spawn thread",
                source,
            })?;
        Ok(VcpuHandle {
            id,
            thread: Some(thread),
            cmd_tx,
            resp_rx,
        })
    }
}

/// The VMM's side of a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    thread: Option<JoinHandle<()>>,
    cmd_tx: Sender<VcpuCmd>,
    resp_rx: Receiver<VcpuResp>,
}

const CMD_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    /// Sends `cmd` and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, cmd: VcpuCmd) -> Result<(), VcpuError> {
        if self.cmd_tx.send(cmd).is_err() {
            // The thread has already left; nothing to command.
            return Ok(());
        }
        self.kick()
    }

    /// The thread's pthread id, while it has not been joined.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        self.thread.as_ref().map(|t| t.as_pthread_t())
    }

    /// Interrupts `KVM_RUN` on this vCPU.
    pub fn kick(&self) -> Result<(), VcpuError> {
        if let Some(t) = &self.thread {
            // SAFETY: pthread_kill on a thread we own and have not joined; the
            // handler only stores one byte.
            let r = unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            if r != 0 && r != libc::ESRCH {
                return Err(VcpuError::Thread {
                    id: self.id,
                    what: "cannot signal vCPU thread",
                    source: std::io::Error::from_raw_os_error(r),
                });
            }
        }
        Ok(())
    }

    /// Waits for the thread's answer to a command.
    pub fn wait(&self, want: VcpuResp) -> Result<(), VcpuError> {
        loop {
            match self.resp_rx.recv_timeout(CMD_TIMEOUT) {
                Ok(r) if std::mem::discriminant(&r) == std::mem::discriminant(&want) => {
                    return Ok(())
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return Err(VcpuError::Unresponsive(self.id)),
                // The thread exited (the VM is ending): treat as done.
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// The vCPU's state; the vCPU must be paused.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        if self.cmd_tx.send(VcpuCmd::Save).is_err() {
            return Err(VcpuError::Unresponsive(self.id));
        }
        loop {
            match self.resp_rx.recv_timeout(CMD_TIMEOUT) {
                Ok(VcpuResp::Saved(r)) => {
                    return (*r).map_err(|e| VcpuError::Thread {
                        id: self.id,
                        what: "cannot save state",
                        source: std::io::Error::other(e),
                    })
                }
                Ok(_) => continue,
                Err(_) => return Err(VcpuError::Unresponsive(self.id)),
            }
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(VcpuCmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Runner {
    vcpu: Vcpu,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    cmd_rx: Receiver<VcpuCmd>,
    resp_tx: Sender<VcpuResp>,
    exit_tx: Sender<(u8, VmExit)>,
    exit_evt: EventFd,
    ctx: Arc<VcpuStateContext>,
    throttle: Arc<AtomicU8>,
}

/// The period of CPU throttling: a throttled vCPU is kicked once per slice
/// and then sleeps its throttle percentage of it.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

enum Step {
    Continue,
    Interrupted,
    Exit(VmExit),
}

impl Runner {
    fn run(mut self, start_paused: bool) {
        let run_ptr: *mut kvm_run = self.vcpu.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        let mut paused = start_paused;
        if paused {
            let _ = self.resp_tx.send(VcpuResp::Paused);
        }
        let exit = loop {
            if paused {
                match self.cmd_rx.recv() {
                    Ok(cmd) => {
                        if self.handle(cmd, &mut paused) {
                            break None;
                        }
                    }
                    Err(_) => break None,
                }
                continue;
            }
            match self.step() {
                Step::Continue => {}
                Step::Interrupted => {
                    self.vcpu.fd.set_kvm_immediate_exit(0);
                    let mut stop = false;
                    while let Ok(cmd) = self.cmd_rx.try_recv() {
                        stop |= self.handle(cmd, &mut paused);
                    }
                    if stop {
                        break None;
                    }
                    let p = u32::from(self.throttle.load(Ordering::Relaxed).min(99));
                    if !paused && p > 0 {
                        std::thread::sleep(THROTTLE_SLICE * p / 100);
                    }
                }
                Step::Exit(e) => break Some(e),
            }
        };
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        if let Some(e) = exit {
            let _ = self.exit_tx.send((self.vcpu.id, e));
            let _ = self.exit_evt.write(1);
        }
    }

    /// Carries out one command; returns true to leave the thread.
    fn handle(&mut self, cmd: VcpuCmd, paused: &mut bool) -> bool {
        match cmd {
            VcpuCmd::Pause => {
                *paused = true;
                let _ = self.resp_tx.send(VcpuResp::Paused);
            }
            VcpuCmd::Resume => {
                *paused = false;
                let _ = self.resp_tx.send(VcpuResp::Resumed);
            }
            VcpuCmd::Save => {
                let r = if *paused {
                    vcpu_state::save(&self.vcpu.fd, &self.ctx).map_err(|e| e.to_string())
                } else {
                    Err("the vCPU is running; pause it first".to_string())
                };
                let _ = self.resp_tx.send(VcpuResp::Saved(Box::new(r)));
            }
            VcpuCmd::Stop => return true,
        }
        false
    }

    fn step(&mut self) -> Step {
        let id = self.vcpu.id;
        let outcome = match self.vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    metrics::inc(&metrics::VCPU.exits_io_in);
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    Ok(None)
                }
                VcpuExit::IoOut(port, data) => {
                    metrics::inc(&metrics::VCPU.exits_io_out);
                    self.pio.write(u64::from(port), data);
                    Ok(None)
                }
                VcpuExit::MmioRead(addr, data) => {
                    metrics::inc(&metrics::VCPU.exits_mmio_read);
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    Ok(None)
                }
                VcpuExit::MmioWrite(addr, data) => {
                    metrics::inc(&metrics::VCPU.exits_mmio_write);
                    self.mmio.write(addr, data);
                    Ok(None)
                }
                VcpuExit::Hlt => {
                    metrics::inc(&metrics::VCPU.exits_hlt);
                    Ok(None)
                }
                VcpuExit::Shutdown => Ok(Some(Err("triple fault (KVM_EXIT_SHUTDOWN)".to_string()))),
                VcpuExit::SystemEvent(kind, data) => Ok(Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VmExit::Poweroff),
                    KVM_SYSTEM_EVENT_RESET => Ok(VmExit::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Err(format!("guest crashed (system event, data {data:x?})")),
                    k => Err(format!("unexpected system event {k}")),
                })),
                VcpuExit::FailEntry(reason, cpu) => Ok(Some(Err(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
                )))),
                VcpuExit::InternalError => Ok(Some(Err(String::new()))),
                other => Ok(Some(Err(format!("unexpected KVM exit {other:?}")))),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) => Step::Continue,
            Ok(Some(Ok(exit))) => Step::Exit(exit),
            Ok(Some(Err(msg))) => {
                metrics::inc(&metrics::VCPU.failures);
                let msg = if msg.is_empty() {
                    self.internal_error()
                } else {
                    msg
                };
                Step::Exit(VmExit::Error(format!(
                    "vCPU {id} stopped at RIP {}: {msg}",
                    self.rip()
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                metrics::inc(&metrics::VCPU.exits_interrupted);
                Step::Interrupted
            }
            Err(e) => Step::Exit(VmExit::Error(format!(
                "vCPU {id}: KVM_RUN failed at RIP {}: {e}",
                self.rip()
            ))),
        }
    }

    fn rip(&self) -> String {
        match self.vcpu.fd.get_regs() {
            Ok(r) => format!("{:#x}", r.rip),
            Err(_) => "?".into(),
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR, with the instruction bytes KVM
    /// reports for an emulation failure.
    fn internal_error(&mut self) -> String {
        let run = self.vcpu.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal`
        // member of the union is the one KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        describe_internal_error(
            internal.suberror,
            &internal.data[..(internal.ndata as usize).min(16)],
        )
    }
}

/// Formats KVM's internal-error payload; for an emulation failure with
/// instruction bytes, names the instruction when it is one this host's KVM is
/// known not to emulate in ring 0.
pub fn describe_internal_error(suberror: u32, data: &[u64]) -> String {
    const EMULATION: u32 = 1;
    const FLAG_INSN_BYTES: u64 = 1;
    let kind = match suberror {
        EMULATION => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        _ => "internal error",
    };
    let mut msg = format!("KVM internal error, suberror {suberror} ({kind})");
    if suberror == EMULATION && data.len() >= 2 && data[0] & FLAG_INSN_BYTES != 0 {
        let bytes: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = usize::from(bytes[0]).min(15).min(bytes.len() - 1);
        let insn = &bytes[1..1 + len];
        let hex: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
        msg.push_str(&format!("; instruction bytes: {}", hex.join(" ")));
        let what = match insn {
            [0xcc, ..] => Some("int3"),
            [0xcd, n, ..] => Some(if *n == 3 { "int3" } else { "int n" }),
            [0x0f, 0x01, 0xf9, ..] => Some("rdtscp"),
            [0x0f, 0x01, 0xd0, ..] => Some("xgetbv"),
            _ => None,
        };
        if let Some(w) = what {
            msg.push_str(&format!(
                " ({w}: this host's KVM cannot emulate it in guest ring 0)"
            ));
        }
    } else if !data.is_empty() {
        msg.push_str(&format!("; data {data:x?}"));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_describe_internal_error_names_int3() {
        // As measured on PVM: flags=1, size 15, bytes cc 8b 04 25 ...
        let m = describe_internal_error(1, &[0x1, 0x0050_2025_048b_cc0f, 0x2504_c7fe_eb11_e700]);
        assert!(m.contains("instruction bytes: cc 8b 04 25 20 50"), "{m}");
        assert!(m.contains("int3"), "{m}");
        let m = describe_internal_error(3, &[7]);
        assert!(
            m.contains("delivery event failure") && m.contains("data [7]"),
            "{m}"
        );
    }
}
