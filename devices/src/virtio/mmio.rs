// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio transport (virtio 1.x "modern" register layout, version 2).
//!
//! The transport owns the driver-visible registers: feature negotiation, the
//! device status state machine, queue configuration and the interrupt status.
//! It activates the device on DRIVER_OK and resets it when the driver writes 0
//! to Status. Anything a driver can misprogram ends with the device reporting
//! `DEVICE_NEEDS_RESET`, never with a panic.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::persist::{QueueStateError, VirtqueueState};
use super::{IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_INT_CONFIG};
use crate::bus::{lock, BusDevice};
use crate::GuestMemoryMmap;

/// Size of the MMIO window of one transport.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register: register one ioeventfd per queue at
/// `base + NOTIFY_REG_OFFSET`, 4 bytes wide, with datamatch = queue index.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset where device configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) MMIO register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("WISP").
pub const MMIO_VENDOR_ID: u32 = 0x5749_5350;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 0x01;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 0x02;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = 0x04;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 0x08;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Errors creating or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue notification eventfd could not be created.
    #[error("Cannot create the notify eventfd for queue {queue}: {source}")]
    EventFd {
        /// Queue index.
        queue: usize,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The device reports a queue maximum size virtio-queue refuses.
    #[error("Device queue {queue} has an invalid maximum size {max_size}")]
    QueueMaxSize {
        /// Queue index.
        queue: usize,
        /// Reported maximum size.
        max_size: u16,
    },
    /// A saved queue could not be rebuilt.
    #[error("Cannot restore queue {queue}: {source}")]
    QueueState {
        /// Queue index.
        queue: usize,
        /// Why.
        #[source]
        source: QueueStateError,
    },
    /// The saved state does not match the device (number of queues, sizes).
    #[error("Saved transport state does not match the device: {0}")]
    Mismatch(String),
    /// Re-activating the restored device failed.
    #[error("Cannot re-activate the restored device: {0}")]
    Activate(#[source] super::ActivateError),
}

/// The transport's serializable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver has written so far.
    pub driver_features: u64,
    /// Features acknowledged with FEATURES_OK.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// Device status as the driver wrote it (without `DEVICE_NEEDS_RESET`).
    pub status: u32,
    /// Whether the transport itself flagged `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
    /// Per-queue state (the device's live queues when activated).
    pub queues: Vec<VirtqueueState>,
    /// Pending interrupt reasons.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}

/// A virtio device behind the MMIO register interface.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    needs_reset: bool,
    config_generation: u32,
    // The driver accepted a feature bit above 63 (never offered).
    bogus_features: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("needs_reset", &self.needs_reset)
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl MmioTransport {
    /// Wraps `device`. `irq` must be the trigger whose eventfd the VMM registers
    /// as the irqfd of this transport's interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (i, &max_size) in max_sizes.iter().enumerate() {
            queues.push(
                Queue::new(max_size).map_err(|_| MmioError::QueueMaxSize { queue: i, max_size })?,
            );
            queue_evts.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| MmioError::EventFd { queue: i, source })?,
            );
        }
        Ok(Self {
            device,
            mem,
            irq,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            needs_reset: false,
            config_generation: 0,
            bogus_features: false,
        })
    }

    /// The per-queue notify eventfds, indexed by queue: register each with KVM
    /// as an ioeventfd at `base + NOTIFY_REG_OFFSET`, length 4, datamatch = index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt trigger (its `evt` is the irqfd to register with KVM).
    pub fn irq(&self) -> Arc<IrqTrigger> {
        self.irq.clone()
    }

    /// The wrapped device.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The device status as the driver sees it.
    pub fn device_status(&self) -> u32 {
        let mut s = self.status;
        if self.needs_reset || lock(&self.device).needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// Tells the driver the device configuration changed (e.g. disk resize).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise_config_irq();
    }

    fn raise_config_irq(&self) {
        if let Err(e) = self.irq.trigger(VIRTIO_INT_CONFIG) {
            warn!("virtio-mmio: cannot raise config interrupt: {e}");
        }
    }

    fn set_needs_reset(&mut self, why: &str) {
        warn!("virtio-mmio: driver error, device needs reset: {why}");
        if !self.needs_reset {
            self.needs_reset = true;
            // Only a driver that completed initialisation is told by interrupt.
            if self.status & status::DRIVER_OK != 0 {
                self.raise_config_irq();
            }
        }
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.has(status::FEATURES_OK) && self.status & (status::DRIVER_OK | status::FAILED) == 0
    }

    fn reset(&mut self) {
        debug!("virtio-mmio: device reset");
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        // Drain stale notifications so a re-activated device starts clean.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.bogus_features = false;
        self.queue_select = 0;
        self.status = 0;
        self.needs_reset = false;
        self.irq.status.store(0, Ordering::SeqCst);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is device-owned; ignore it from the driver.
        let value = value & !status::DEVICE_NEEDS_RESET;
        if value & self.status != self.status {
            warn!(
                "virtio-mmio: driver tried to clear status bits ({:#x} -> {value:#x}); ignored",
                self.status
            );
            return;
        }
        let new = value & !self.status;
        if new & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        // Each step requires the previous one, in one write or an earlier one.
        let steps = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, prereq) in steps {
            if new & bit != 0 && value & prereq != prereq {
                warn!("virtio-mmio: status {value:#x} skips a step; ignored");
                return;
            }
        }
        let known = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        if new & !known != 0 {
            warn!(
                "virtio-mmio: unknown status bits {:#x} ignored",
                new & !known
            );
        }
        if new & status::ACKNOWLEDGE != 0 {
            self.status |= status::ACKNOWLEDGE;
        }
        if new & status::DRIVER != 0 {
            self.status |= status::DRIVER;
        }
        if new & status::FEATURES_OK != 0 && !self.accept_features() {
            // FEATURES_OK stays clear: the driver reads it back and gives up.
            return;
        }
        if new & status::DRIVER_OK != 0 {
            self.status |= status::DRIVER_OK;
            self.activate();
        }
    }

    fn accept_features(&mut self) -> bool {
        let mut dev = lock(&self.device);
        let avail = dev.avail_features();
        let wanted = self.driver_features;
        if wanted & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        if wanted & !avail != 0 || self.bogus_features {
            warn!(
                "virtio-mmio: driver accepted unoffered features {:#x}",
                wanted & !avail
            );
            return false;
        }
        dev.set_acked_features(wanted);
        drop(dev);
        self.status |= status::FEATURES_OK;
        true
    }

    fn activate(&mut self) {
        if self.needs_reset {
            return;
        }
        let mut dev = lock(&self.device);
        if dev.is_activated() {
            return;
        }
        let event_idx = dev.acked_features() & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if !q.is_valid(&self.mem) {
                drop(dev);
                self.set_needs_reset(&format!("queue {i} is not ready or not in guest memory"));
                return;
            }
            match VirtqueueState::from(&*q).to_queue() {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    drop(dev);
                    self.set_needs_reset(&format!("queue {i}: {e}"));
                    return;
                }
            }
        }
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for evt in &self.queue_evts {
            match evt.try_clone() {
                Ok(e) => evts.push(e),
                Err(e) => {
                    drop(dev);
                    self.set_needs_reset(&format!("cannot clone queue eventfd: {e}"));
                    return;
                }
            }
        }
        let res = dev.activate(self.mem.clone(), self.irq.clone(), queues, evts);
        drop(dev);
        if let Err(e) = res {
            self.set_needs_reset(&format!("activation failed: {e}"));
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_config_allowed() {
            warn!("virtio-mmio: queue register {offset:#x} written outside setup; ignored");
            return;
        }
        let Some(q) = self.selected_queue() else {
            warn!("virtio-mmio: queue register written for a nonexistent queue");
            return;
        };
        let mut bad_size = false;
        match offset {
            REG_QUEUE_NUM => {
                let ok = u16::try_from(v)
                    .ok()
                    .filter(|&n| n != 0 && n <= q.max_size() && n.is_power_of_two());
                match ok {
                    Some(n) => q.set_size(n),
                    None => bad_size = true,
                }
            }
            REG_QUEUE_READY => q.set_ready(v == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            REG_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            REG_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            REG_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
        if bad_size {
            self.set_needs_reset(&format!("invalid queue size {v}"));
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_select as usize);
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            REG_QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table() as u32),
            REG_QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table() >> 32) as u32),
            REG_QUEUE_AVAIL_LOW => q.map_or(0, |q| q.avail_ring() as u32),
            REG_QUEUE_AVAIL_HIGH => q.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            REG_QUEUE_USED_LOW => q.map_or(0, |q| q.used_ring() as u32),
            REG_QUEUE_USED_HIGH => q.map_or(0, |q| (q.used_ring() >> 32) as u32),
            REG_INTERRUPT_STATUS => self.irq.status.load(Ordering::SeqCst),
            REG_STATUS => self.device_status(),
            // No shared memory regions: length reads as all ones ("none").
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if !self.has(status::DRIVER) || self.status & status::FEATURES_OK != 0 {
                    warn!("virtio-mmio: DriverFeatures written outside negotiation; ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    // Bits beyond 63 are never offered; accepting one fails FEATURES_OK.
                    _ => self.bogus_features |= v != 0,
                }
            }
            REG_QUEUE_SEL => self.queue_select = v,
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            NOTIFY_REG_OFFSET => {
                // Normally caught by an ioeventfd; forward if it reaches the bus.
                match self.queue_evts.get(v as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            warn!("virtio-mmio: cannot signal queue {v}: {e}");
                        }
                    }
                    None => warn!("virtio-mmio: notify for nonexistent queue {v}"),
                }
            }
            REG_INTERRUPT_ACK => {
                self.irq.status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => {}
            _ => debug!("virtio-mmio: write of unknown/read-only register {offset:#x}"),
        }
    }

    /// Saves the transport's state; call with the vCPUs and event loop paused.
    pub fn save(&self) -> MmioTransportState {
        let dev = lock(&self.device);
        let live = dev.queues();
        let queues = if dev.is_activated() && live.len() == self.queues.len() {
            live.iter().map(VirtqueueState::from).collect()
        } else {
            self.queues.iter().map(VirtqueueState::from).collect()
        };
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            acked_features: dev.acked_features(),
            queue_select: self.queue_select,
            status: self.status,
            needs_reset: self.needs_reset,
            queues,
            interrupt_status: self.irq.status.load(Ordering::SeqCst),
            config_generation: self.config_generation,
        }
    }

    /// Rebuilds a transport around an already restored (not activated) device;
    /// re-activates it when the saved driver had reached DRIVER_OK.
    pub fn restore(
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioTransportState,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(mem, irq, device)?;
        if state.queues.len() != t.queues.len() {
            return Err(MmioError::Mismatch(format!(
                "{} saved queues, device has {}",
                state.queues.len(),
                t.queues.len()
            )));
        }
        for (i, (qs, q)) in state.queues.iter().zip(t.queues.iter_mut()).enumerate() {
            if qs.max_size != q.max_size() {
                return Err(MmioError::Mismatch(format!(
                    "queue {i} max size {} saved, device offers {}",
                    qs.max_size,
                    q.max_size()
                )));
            }
            *q = qs
                .to_queue()
                .map_err(|source| MmioError::QueueState { queue: i, source })?;
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_select = state.queue_select;
        t.status = state.status & !status::DEVICE_NEEDS_RESET;
        t.needs_reset = state.needs_reset;
        t.config_generation = state.config_generation;
        t.irq.status.store(state.interrupt_status, Ordering::SeqCst);
        {
            let mut dev = lock(&t.device);
            if state.acked_features & !dev.avail_features() != 0 {
                return Err(MmioError::Mismatch(format!(
                    "saved acked features {:#x} not offered by the device",
                    state.acked_features
                )));
            }
            dev.set_acked_features(state.acked_features);
        }
        if t.has(status::DRIVER_OK) && !t.needs_reset {
            let mut queues = Vec::with_capacity(t.queues.len());
            for (i, qs) in state.queues.iter().enumerate() {
                queues.push(
                    qs.to_queue()
                        .map_err(|source| MmioError::QueueState { queue: i, source })?,
                );
            }
            let mut evts = Vec::with_capacity(t.queue_evts.len());
            for (i, evt) in t.queue_evts.iter().enumerate() {
                evts.push(
                    evt.try_clone()
                        .map_err(|source| MmioError::EventFd { queue: i, source })?,
                );
            }
            lock(&t.device)
                .activate(t.mem.clone(), t.irq.clone(), queues, evts)
                .map_err(MmioError::Activate)?;
        }
        Ok(t)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn!(
                "virtio-mmio: bad register read size {} at {offset:#x}",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                "virtio-mmio: bad register write size {} at {offset:#x}",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
