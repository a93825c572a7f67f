// SPDX-License-Identifier: Apache-2.0
//! The virtio device model shared by every virtio device and the MMIO transport.
//!
//! Life of a device: the VMM creates it (with its backend) and a transport around
//! it, registers one ioeventfd per queue on the transport's QueueNotify register
//! and an irqfd for its interrupt line. The guest driver negotiates features and
//! sets up queues through the transport; on DRIVER_OK the transport calls
//! [`VirtioDevice::activate`] with the queues, their notify eventfds and the
//! interrupt. Queue processing then happens on the event-loop thread
//! (`event_manager`), never on a vCPU thread.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

pub mod block;
pub mod mmio;
pub mod persist;

/// Feature bit: the device complies with virtio 1.x (required by the MMIO transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: descriptors may point at indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/available event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_INT_CONFIG: u32 = 0x2;

/// Raises a virtio device's interrupt: sets a bit in the interrupt status the
/// transport exposes to the guest, then signals the irqfd wired to the in-kernel
/// irqchip.
#[derive(Debug)]
pub struct IrqTrigger {
    /// Pending interrupt reasons (`VIRTIO_INT_*`), read and acked by the guest.
    pub status: AtomicU32,
    /// The irqfd registered with KVM for this device's GSI.
    pub evt: EventFd,
}

impl IrqTrigger {
    /// A trigger over an irqfd.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Records `reason` and interrupts the guest.
    pub fn trigger(&self, reason: u32) -> io::Result<()> {
        self.status.fetch_or(reason, Ordering::SeqCst);
        self.evt.write(1)
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a queue the device cannot use.
    #[error("Invalid queue configuration: {0}")]
    BadQueue(String),
    /// Registering with the event loop or cloning an eventfd failed.
    #[error("Cannot set up device event handling: {0}")]
    Events(#[source] io::Error),
}

/// Copies configuration space `cfg` from `offset` into `data`; bytes past
/// its end read as zero (what [`VirtioDevice::read_config`] promises).
pub fn read_config_space(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| cfg.get(o).copied())
            .unwrap_or(0);
    }
}

/// What every virtio device implements; the transport drives it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 1 = net).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted.
    fn acked_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;
    /// Stops the device after a driver reset; it may be activated again.
    fn reset(&mut self);
    /// Whether [`VirtioDevice::activate`] has run since the last reset.
    fn is_activated(&self) -> bool;
    /// The device's live queues while activated (for snapshots: the transport
    /// saves their `next_avail`/`next_used`). Empty when not activated.
    fn queues(&self) -> &[Queue] {
        &[]
    }
    /// Whether the device hit an unrecoverable driver error (e.g. a broken ring)
    /// and wants the transport to report `DEVICE_NEEDS_RESET`. A device that
    /// sets this also raises a `VIRTIO_INT_CONFIG` interrupt.
    fn needs_reset(&self) -> bool {
        false
    }
}

pub mod net;
