// SPDX-License-Identifier: Apache-2.0
//! Live migration wired into the VMM: the `migration` library's sender and
//! receiver run on their own thread, and ask the VMM's main thread (which owns
//! the VM) to pause and save, resume, or restore, through [`MainRequest`]s.
//!
//! While the sender's final phase runs, the main thread waits for its outcome
//! instead of returning to the event loop, so no device touches guest memory
//! or changes state after it was saved. The source stays authoritative until
//! the receiver reports `Running`.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::migration::{
    self, CpuFeatures, DeviceSummary, HookError, MigrationConfig, MigrationSource, MigrationStatus,
    MigrationTarget, RegionSpec, SendOptions,
};

/// What a migration thread asks of the main thread.
#[derive(Debug)]
pub enum MainRequest {
    /// Pause the VM and answer with its encoded state.
    PauseAndSave(Sender<Result<Vec<u8>, String>>),
    /// Make sure the VM runs (after a failed migration); answered when done.
    Resume(Sender<()>),
    /// The sender finished (success: the receiver runs the guest).
    SenderDone(Result<migration::SendReport, migration::MigrationError>),
    /// Restore the VM from `state` with this guest memory, paused.
    Restore(Vec<u8>, GuestMemoryMmap, Sender<Result<(), String>>),
    /// The source committed: run the restored VM.
    Run(Sender<Result<(), String>>),
    /// The receiver finished.
    ReceiverDone(Result<migration::ReceiveReport, String>),
    /// Throttle the vCPUs to this percentage (auto-converge); 0 lifts it.
    Throttle(u8),
}

/// The channel to the main thread and its wake-up eventfd.
#[derive(Debug, Clone)]
pub struct MainLink {
    tx: Sender<MainRequest>,
    wake: Arc<EventFd>,
}

impl MainLink {
    /// A link and the receiving end for the main thread.
    pub fn new(wake: Arc<EventFd>) -> (Self, Receiver<MainRequest>) {
        let (tx, rx) = channel();
        (Self { tx, wake }, rx)
    }

    fn send(&self, r: MainRequest) -> Result<(), HookError> {
        self.tx
            .send(r)
            .map_err(|_| HookError::from("the VMM's main thread is gone"))?;
        self.wake.write(1)?;
        Ok(())
    }
}

fn err(s: impl Into<String>) -> HookError {
    s.into().into()
}

/// What the migration handshake compares: memory layout, vCPUs, devices and
/// the CPU features the host can offer.
pub fn migration_config(cfg: &VmConfig, host_cpuid: &[kvm_cpuid_entry2]) -> MigrationConfig {
    let mut devices: Vec<DeviceSummary> = cfg
        .disks
        .iter()
        .map(|d| DeviceSummary {
            kind: "block".into(),
            id: d.id.clone(),
        })
        .collect();
    devices.extend(cfg.nets.iter().map(|n| DeviceSummary {
        kind: "net".into(),
        id: n.id.clone(),
    }));
    MigrationConfig {
        memory: boot::layout::ram_ranges(cfg.mem_size)
            .into_iter()
            .map(|(guest_addr, size)| RegionSpec { guest_addr, size })
            .collect(),
        vcpus: u32::from(cfg.vcpus),
        devices,
        cpu: cpu_features(host_cpuid),
    }
}

fn cpu_features(entries: &[kvm_cpuid_entry2]) -> CpuFeatures {
    match CpuId::from_entries(entries) {
        Ok(c) => CpuFeatures::from_cpuid(&c),
        // More entries than a CpuId holds cannot come from KVM.
        Err(_) => CpuFeatures::default(),
    }
}

/// What the source's state blob carries: the VM's state (the snapshot's)
/// and the TAPs a receiver on the same host takes over.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MigratedVm {
    /// Devices, vCPUs, configuration.
    pub state: crate::persist::snapshot::MicrovmState,
    /// The source's TAPs.
    pub taps: crate::tap_handover::TapOffer,
}

/// The running VM as the sender sees it.
pub struct Source {
    /// Handshake data.
    pub config: MigrationConfig,
    /// Guest RAM (shared mappings).
    pub memory: GuestMemoryMmap,
    /// For the dirty log.
    pub vm_fd: Arc<VmFd>,
    /// Whether dirty logging was on before (keep it on after a failure).
    pub tracking_before: bool,
    /// To the main thread.
    pub link: MainLink,
}

impl MigrationSource for Source {
    fn config(&self) -> MigrationConfig {
        self.config.clone()
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn start_dirty_tracking(&mut self) -> Result<(), HookError> {
        crate::persist::set_dirty_logging(&self.vm_fd, &self.memory, true)?;
        // Start from a clean log: everything is sent in the first pass.
        crate::persist::dirty_bitmaps(&self.vm_fd, &self.memory)?;
        Ok(())
    }

    fn initial_pages(&mut self) -> Option<Vec<Vec<u64>>> {
        crate::persist::memory::touched_bitmaps(&self.memory)
    }

    fn stop_dirty_tracking(&mut self) -> Result<(), HookError> {
        if !self.tracking_before {
            crate::persist::set_dirty_logging(&self.vm_fd, &self.memory, false)?;
        }
        Ok(())
    }

    fn dirty_bitmaps(&mut self) -> Result<Vec<Vec<u64>>, HookError> {
        Ok(crate::persist::dirty_bitmaps(&self.vm_fd, &self.memory)?)
    }

    fn pause_and_save(&mut self) -> Result<Vec<u8>, HookError> {
        let (tx, rx) = channel();
        self.link.send(MainRequest::PauseAndSave(tx))?;
        rx.recv()
            .map_err(|_| err("the VMM did not answer the pause request"))?
            .map_err(err)
    }

    fn throttle(&mut self, percent: u8) {
        if let Err(e) = self.link.send(MainRequest::Throttle(percent)) {
            log::warn!("Cannot throttle the vCPUs: {e}");
        }
    }

    fn resume(&mut self) -> Result<(), HookError> {
        let (tx, rx) = channel();
        self.link.send(MainRequest::Resume(tx))?;
        rx.recv()
            .map_err(|_| err("the VMM did not answer the resume request"))
    }
}

/// A connection whose writes are paced to a byte rate.
struct Paced {
    inner: migration::Stream,
    bytes_per_s: Option<u64>,
    start: std::time::Instant,
    written: u64,
}

impl std::io::Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for Paced {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(rate) = self.bytes_per_s {
            self.written += n as u64;
            let due = std::time::Duration::from_secs_f64(self.written as f64 / rate as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl migration::Connection for Paced {
    fn set_read_timeout(&mut self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(t)
    }

    fn set_write_timeout(&mut self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.inner.set_write_timeout(t)
    }
}

/// Runs the sender on its own thread, writing at most `max_mib_s` MiB/s.
pub fn spawn_sender(
    uri: migration::MigrationUri,
    mut source: Source,
    opts: SendOptions,
    status: MigrationStatus,
    max_mib_s: Option<u64>,
    filters: Option<crate::seccomp::Filters>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("wisp-migrate-send".into())
        .spawn(move || {
            let link = source.link.clone();
            let result = match migration::connect(&uri, opts.handshake_timeout) {
                // Sandboxed once connected (name resolution and connecting
                // need more), before anything is read from the peer.
                Ok(inner) => match crate::seccomp::install(
                    filters.as_ref(),
                    crate::seccomp::ThreadKind::MigrationSender,
                ) {
                    Err(e) => Err(migration::MigrationError::Source {
                        what: "sandbox the migration thread",
                        source: Box::new(e),
                    }),
                    Ok(()) => {
                        let mut conn = Paced {
                            inner,
                            bytes_per_s: max_mib_s.map(|m| m.saturating_mul(1 << 20)),
                            start: std::time::Instant::now(),
                            written: 0,
                        };
                        migration::send(&mut conn, &mut source, &opts, &status)
                    }
                },
                Err(e) => Err(migration::MigrationError::Transport(e)),
            };
            let _ = link.send(MainRequest::SenderDone(result));
        })
        .map(|_| ())
}

/// The receiving VMM as the receiver sees it.
pub struct Target {
    /// What this VMM was configured with.
    pub config: MigrationConfig,
    /// What this host can offer.
    pub host: CpuFeatures,
    /// Guest RAM being filled.
    pub memory: GuestMemoryMmap,
    /// To the main thread.
    pub link: MainLink,
}

impl MigrationTarget for Target {
    fn config(&self) -> MigrationConfig {
        self.config.clone()
    }

    fn host_cpu(&self) -> CpuFeatures {
        self.host.clone()
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), HookError> {
        let (tx, rx) = channel();
        self.link
            .send(MainRequest::Restore(state, self.memory.clone(), tx))?;
        rx.recv()
            .map_err(|_| err("the VMM did not answer the restore request"))?
            .map_err(err)
    }

    fn run(&mut self) -> Result<(), HookError> {
        let (tx, rx) = channel();
        self.link.send(MainRequest::Run(tx))?;
        rx.recv()
            .map_err(|_| err("the VMM did not answer the run request"))?
            .map_err(err)
    }
}

/// Accepts one migration on `listener` and receives it within `opts`, on
/// its own thread.
pub fn spawn_receiver(
    listener: migration::Listener,
    mut target: Target,
    opts: migration::ReceiveOptions,
    filters: Option<crate::seccomp::Filters>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("wisp-migrate-recv".into())
        .spawn(move || {
            let link = target.link.clone();
            let sandbox = crate::seccomp::install(
                filters.as_ref(),
                crate::seccomp::ThreadKind::MigrationReceiver,
            );
            if let Err(e) = sandbox {
                let _ = link.send(MainRequest::ReceiverDone(Err(e.to_string())));
                return;
            }
            // Waits for the sender as long as it takes: the operator may
            // start this receiver well ahead. Once connected, the sender has
            // `opts`' timeouts.
            let result = match listener.accept(None) {
                Ok(mut stream) => {
                    drop(listener);
                    migration::receive(&mut stream, &mut target, &opts).map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("Cannot accept a migration: {e}")),
            };
            let _ = link.send(MainRequest::ReceiverDone(result));
        })
        .map(|_| ())
}

/// The host's CPU features as the receiver offers them.
pub fn host_features(host_cpuid: &[kvm_cpuid_entry2]) -> CpuFeatures {
    cpu_features(host_cpuid)
}
