// SPDX-License-Identifier: Apache-2.0
//! A running VM: the device event loop on the VMM thread, console input, and
//! how the VM ends (guest power-off/reset, a signal, or a failure).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::{SerialDevice, I8042};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::persist::snapshot::{DeviceStates, MicrovmState, VirtioState};
use crate::persist::SnapshotError;
use crate::vstate::vcpu::{VcpuCmd, VcpuError, VcpuHandle, VcpuResp, VmExit};
use crate::vstate::vm::Vm;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    Poweroff,
    /// The guest asked to reboot.
    Reset,
    /// The VMM was told to stop by a signal.
    Signal(i32),
    /// The VMM was told to stop through its API.
    Stopped,
    /// The VM was migrated to this URI and runs there now.
    Migrated(String),
    /// An orderly shutdown was asked for, and the guest did not power off
    /// within the deadline (seconds), so the VM was stopped.
    ShutdownTimeout(u64),
    /// Something failed; the message says what.
    Error(String),
}

/// A virtio-blk device and its transport.
#[derive(Debug)]
pub struct AttachedBlock {
    /// The device (also an event-loop subscriber).
    pub block: Arc<Mutex<devices::virtio::block::Block>>,
    /// Its virtio-mmio transport.
    pub transport: Arc<Mutex<devices::virtio::mmio::MmioTransport>>,
}

/// A virtio-net device, its transport and its bridge port.
#[derive(Debug)]
pub struct AttachedNet {
    /// The device (also an event-loop subscriber).
    pub net: Arc<Mutex<devices::virtio::net::Net<devices::net::TapDevice>>>,
    /// Its virtio-mmio transport.
    pub transport: Arc<Mutex<devices::virtio::mmio::MmioTransport>>,
    /// The bridge port to detach when the VM ends.
    pub port: Option<devices::net::BridgePort>,
}

/// A built VM with its vCPU threads.
#[derive(Debug)]
pub struct Vmm {
    /// KVM VM and guest memory.
    pub vm: Vm,
    /// vCPU threads.
    pub vcpus: Vec<VcpuHandle>,
    /// What saving and restoring vCPU state needs (probed once per VM).
    pub vcpu_ctx: Arc<crate::vstate::vcpu_state::VcpuStateContext>,
    /// Whether KVM logs dirty pages (for Diff snapshots and migration).
    pub dirty_tracking: bool,
    /// The CPUID this host's KVM supports (recorded in snapshots).
    pub host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// vCPU throttle in percent (auto-converge), read by the vCPU threads.
    pub throttle: Arc<std::sync::atomic::AtomicU8>,
    /// Kicks throttled vCPUs once per slice while the throttle is set.
    pub kicker: Option<std::thread::JoinHandle<()>>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// COM1's console socket (`--serial socket=`), until the event loop serves it.
    pub serial_socket: Option<crate::serial_socket::SerialSocket>,
    /// The keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI Generic Event Device (power button).
    pub ged: Arc<Mutex<devices::legacy::Ged>>,
    /// The ACPI sleep/reset register.
    pub acpi_pm: Arc<Mutex<devices::legacy::AcpiPm>>,
    /// How vCPUs report the end of the VM.
    pub exit_rx: Receiver<(u8, VmExit)>,
    /// Signalled with `exit_rx`.
    pub exit_evt: EventFd,
    /// Guest reset request (i8042, ACPI reset register).
    pub reset_evt: EventFd,
    /// Guest power-off (ACPI S5).
    pub poweroff_evt: EventFd,
    /// virtio-blk devices, root first.
    pub disks: Vec<AttachedBlock>,
    /// virtio-net devices.
    pub nets: Vec<AttachedNet>,
    /// What the VM was built from.
    pub config: VmConfig,
}

/// Clears a signalled eventfd (non-blocking; an empty one is left as is).
pub fn drain_eventfd(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into an 8-byte buffer that outlives the call.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
}

/// What the event loop holds.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

const EV_EXIT: u32 = 0;
const EV_RESET: u32 = 1;
const EV_POWEROFF: u32 = 2;

/// Turns the VM's end events into an [`Outcome`].
struct Control {
    exit_rx: Receiver<(u8, VmExit)>,
    fds: [(RawFd, u32); 3],
    slot: Arc<Mutex<Option<Outcome>>>,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in self.fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                lock(&self.slot)
                    .get_or_insert(Outcome::Error(format!("Cannot watch VM events: {e:?}")));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        drain_eventfd(events.fd());
        let outcome = match events.data() {
            EV_EXIT => match self.exit_rx.try_recv() {
                Ok((_, VmExit::Poweroff)) => Outcome::Poweroff,
                Ok((_, VmExit::Reset)) => Outcome::Reset,
                Ok((_, VmExit::Error(m))) => Outcome::Error(m),
                Err(_) => return,
            },
            EV_RESET => Outcome::Reset,
            EV_POWEROFF => Outcome::Poweroff,
            _ => return,
        };
        lock(&self.slot).get_or_insert(outcome);
    }
}

/// Forwards console input (stdin, when it is a terminal) to COM1, pausing while
/// the guest's FIFO is full.
struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    reading: bool,
}

const EV_STDIN: u32 = 0;
const EV_DRAINED: u32 = 1;

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data_raw(
            libc::STDIN_FILENO,
            EV_STDIN,
            EventSet::IN,
        ));
        let _ = ops.add(Events::with_data(&self.drained, EV_DRAINED, EventSet::IN));
        self.reading = true;
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = Events::with_data_raw(libc::STDIN_FILENO, EV_STDIN, EventSet::IN);
        match events.data() {
            EV_STDIN => {
                let mut serial = lock(&self.serial);
                let room = serial.input_room();
                if room == 0 {
                    let _ = ops.remove(stdin);
                    self.reading = false;
                    return;
                }
                let mut buf = [0u8; 64];
                let want = room.min(buf.len());
                // SAFETY: reading at most `want` bytes into a buffer that large.
                let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), want) };
                if n <= 0 || events.event_set().contains(EventSet::HANG_UP) {
                    let _ = ops.remove(stdin);
                    self.reading = false;
                }
                if n > 0 {
                    serial.enqueue_input(&buf[..n as usize]);
                }
            }
            EV_DRAINED => {
                let _ = self.drained.read();
                if !self.reading {
                    let _ = ops.add(stdin);
                    self.reading = true;
                }
            }
            _ => {}
        }
    }
}

impl Vmm {
    /// Registers the VM's end events (and console input, when `console`) with
    /// the event loop; `slot` receives the outcome.
    pub fn register_events(
        &mut self,
        em: &mut EventManager<Subscriber>,
        slot: Arc<Mutex<Option<Outcome>>>,
        console: bool,
    ) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let exit_rx = std::mem::replace(&mut self.exit_rx, rx);
        drop(tx);
        em.add_subscriber(Arc::new(Mutex::new(Control {
            exit_rx,
            fds: [
                (self.exit_evt.as_raw_fd(), EV_EXIT),
                (self.reset_evt.as_raw_fd(), EV_RESET),
                (self.poweroff_evt.as_raw_fd(), EV_POWEROFF),
            ],
            slot,
        })));
        for d in &self.disks {
            em.add_subscriber(d.block.clone());
        }
        for n in &self.nets {
            em.add_subscriber(n.net.clone());
        }
        if let Some(socket) = self.serial_socket.take() {
            let server = socket
                .into_subscriber(self.serial.clone())
                .map_err(|e| format!("Console socket disabled: {e}"))?;
            em.add_subscriber(Arc::new(Mutex::new(server)));
        }
        if console {
            let drained = lock(&self.serial)
                .input_drained_evt()
                .try_clone()
                .map_err(|e| format!("Console input disabled: {e}"))?;
            em.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
                serial: self.serial.clone(),
                drained,
                reading: false,
            })));
        }
        Ok(())
    }

    /// Pauses every vCPU (each completes the exit it is handling first).
    pub fn pause(&self) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.send(VcpuCmd::Pause)?;
        }
        for v in &self.vcpus {
            v.wait(VcpuResp::Paused)?;
        }
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.send(VcpuCmd::Resume)?;
        }
        for v in &self.vcpus {
            v.wait(VcpuResp::Resumed)?;
        }
        Ok(())
    }

    /// Makes every disk write completed so far durable.
    pub fn flush_disks(&self) -> Result<(), String> {
        for d in &self.disks {
            let mut b = lock(&d.block);
            b.flush()
                .map_err(|e| format!("Cannot flush disk '{}': {e}", b.id()))?;
        }
        Ok(())
    }

    /// The whole VM's state except memory; the vCPUs must be paused.
    pub fn save_state(&self) -> Result<MicrovmState, String> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let vm = crate::vstate::vm_state::save(&self.vm.fd, &self.vm.memory)
            .map_err(|e| e.to_string())?;
        let blocks = self
            .disks
            .iter()
            .map(|d| {
                // One lock at a time: the transport locks the device itself.
                let device = lock(&d.block).save();
                let transport = lock(&d.transport).save();
                VirtioState { device, transport }
            })
            .collect();
        let nets = self
            .nets
            .iter()
            .map(|n| {
                // Hand RX buffers the device reserved back to the guest's ring,
                // so the saved queue positions count only consumed buffers.
                lock(&n.net).release_rx_buffers();
                let device = lock(&n.net).save();
                let transport = lock(&n.transport).save();
                VirtioState { device, transport }
            })
            .collect();
        Ok(MicrovmState {
            config: self.config.clone(),
            vm,
            vcpus,
            devices: DeviceStates {
                serial: lock(&self.serial).state(),
                i8042: lock(&self.i8042).state(),
                acpi_pm: lock(&self.acpi_pm).state(),
                ged: lock(&self.ged).state(),
                blocks,
                nets,
            },
            host_cpuid: self.host_cpuid.clone(),
        })
    }

    /// Checks a snapshot request before anything is touched: Diff needs
    /// dirty tracking and `base` (this VM's last snapshot) in the memory file
    /// at `mem_path`; both paths must be regular files or new paths.
    pub fn check_snapshot(
        &self,
        diff: bool,
        base: Option<&crate::persist::MemoryBinding>,
        snapshot_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<(), SnapshotError> {
        if diff && !self.dirty_tracking {
            return Err(SnapshotError::Refused(
                "Diff snapshots need dirty page tracking (track_dirty_pages in the machine configuration)"
                    .into(),
            ));
        }
        crate::persist::create::check_targets(snapshot_path, mem_path)?;
        match (diff, base) {
            (false, _) => Ok(()),
            (true, Some(base)) => crate::persist::create::check_diff_base(mem_path, base),
            (true, None) => Err(SnapshotError::Refused(format!(
                "A Diff snapshot applies to the memory file of this microVM's last snapshot, and there is none to apply it to (none taken, or the last one failed, or a migration consumed the dirty page log): take a Full snapshot to {} first",
                mem_path.display()
            ))),
        }
    }

    /// Writes a snapshot pair (`persist::create_snapshot`) once
    /// [`Vmm::check_snapshot`] passed: disks are flushed, then the memory file
    /// (the whole RAM, sparse; or, for a diff, a copy of the existing memory
    /// file with the pages dirtied since `base` applied) and the state file
    /// are written, bound to each other by a new id. The vCPUs must be paused.
    /// Returns the new pair's binding. After an error the dirty page log may
    /// be consumed: the next Diff must not apply to `base`.
    pub fn snapshot(
        &self,
        diff: bool,
        base: Option<&crate::persist::MemoryBinding>,
        snapshot_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<(crate::persist::MemoryBinding, crate::persist::DumpStats), SnapshotError> {
        self.check_snapshot(diff, base, snapshot_path, mem_path)?;
        self.flush_disks().map_err(SnapshotError::Vmm)?;
        let state = self.save_state().map_err(SnapshotError::Vmm)?;
        let mem = &self.vm.memory;
        let dirty = if self.dirty_tracking {
            // For a Full snapshot this starts the next diff from this point.
            let d = crate::persist::dirty_bitmaps(&self.vm.fd, mem)
                .map_err(|e| SnapshotError::Vmm(e.to_string()))?;
            Some(d)
        } else {
            None
        };
        let kind = match (diff, base, &dirty) {
            (true, Some(base), Some(dirty)) => crate::persist::Kind::Diff { dirty, base },
            _ => crate::persist::Kind::Full,
        };
        crate::persist::create_snapshot(snapshot_path, mem_path, mem, &state, kind)
    }

    /// Limits each vCPU to `100 - percent` percent of the time (0 lifts it).
    pub fn set_throttle(&mut self, percent: u8) {
        use std::sync::atomic::Ordering;
        self.throttle.store(percent.min(99), Ordering::SeqCst);
        if percent == 0 {
            if let Some(k) = self.kicker.take() {
                let _ = k.join();
            }
            return;
        }
        if self.kicker.is_some() {
            return;
        }
        // Thread ids stay valid until the vCPU threads are joined, which
        // `stop` does only after joining this kicker.
        let threads: Vec<usize> = self
            .vcpus
            .iter()
            .filter_map(|v| v.pthread())
            .map(|t| t as usize)
            .collect();
        let throttle = self.throttle.clone();
        let sig = crate::vstate::vcpu::kick_signal();
        self.kicker = std::thread::Builder::new()
            .name("wisp-throttle".into())
            .spawn(move || {
                while throttle.load(Ordering::SeqCst) > 0 {
                    for t in &threads {
                        // SAFETY: signalling vCPU threads of this process that
                        // have not been joined (see above); the handler only
                        // sets a flag.
                        unsafe { libc::pthread_kill(*t as libc::pthread_t, sig) };
                    }
                    std::thread::sleep(crate::vstate::vcpu::THROTTLE_SLICE);
                }
            })
            .ok();
        log::info!("vCPUs throttled to {}%", 100 - u32::from(percent.min(99)));
    }

    /// The TAPs to offer a migration receiver on this host.
    pub fn tap_offer(&self) -> crate::tap_handover::TapOffer {
        use devices::net::Tap;
        use std::os::fd::AsRawFd;
        crate::tap_handover::TapOffer::new(self.nets.iter().map(|n| {
            let net = lock(&n.net);
            let tap = net.tap();
            (tap.name().to_string(), tap.as_raw_fd(), tap.created())
        }))
    }

    /// Leaves the VM's host resources to a migration peer: the TAPs' bridge
    /// ports (teardown skips them), then the disk locks.
    pub fn hand_over_host_resources(&mut self) -> Result<(), String> {
        self.hand_over_nets(true);
        for d in &self.disks {
            let mut b = lock(&d.block);
            b.release_lock()
                .map_err(|e| format!("Cannot unlock disk '{}': {e}", b.id()))?;
        }
        Ok(())
    }

    /// Leaves the TAPs' bridge ports to a migration peer (teardown skips
    /// them) or, with `false`, takes them back.
    pub fn hand_over_nets(&mut self, hand_over: bool) {
        for p in self.nets.iter_mut().filter_map(|n| n.port.as_mut()) {
            if hand_over {
                p.hand_over();
            } else {
                p.take_over();
            }
        }
    }

    /// Stops the vCPUs, detaches the TAPs from their bridges and flushes the
    /// console.
    pub fn stop(&mut self) {
        self.set_throttle(0);
        for v in &mut self.vcpus {
            v.stop();
        }
        for n in &mut self.nets {
            if let Some(p) = &mut n.port {
                if let Err(e) = p.teardown() {
                    log::warn!("Cannot detach a TAP from its bridge: {e}");
                }
            }
        }
        lock(&self.serial).flush_output();
    }
}
