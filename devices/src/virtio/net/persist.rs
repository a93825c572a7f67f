// SPDX-License-Identifier: Apache-2.0
//! Serializable state of a virtio-net device.
//!
//! [`NetQueueState`] mirrors `virtio_queue::QueueState` with serde; it is a
//! local stand-in until the virtio transport provides a shared queue-state type.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::device::{Net, NetConfig, NetError};
use super::RX_INDEX;
use crate::net::VNET_HDR_LEN as VNET_HDR_LEN_USIZE;
use crate::net::{MacAddr, Tap};

/// The driver-visible state of one split virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetQueueState {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in use.
    pub event_idx_enabled: bool,
    /// Size chosen by the driver.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for NetQueueState {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<NetQueueState> for QueueState {
    fn from(s: NetQueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl NetQueueState {
    /// A validated queue from untrusted state.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState::from(*self))
    }
}

/// Everything needed to rebuild a virtio-net device (the TAP is reopened by
/// name by the VMM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Name of the TAP.
    pub tap_name: String,
    /// Guest MAC address.
    pub mac: MacAddr,
    /// MTU advertised to the guest.
    pub mtu: u16,
    /// Maximum queue size offered.
    pub queue_size: u16,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the device was activated.
    pub activated: bool,
    /// RX and TX queue state (empty if not activated).
    pub queues: Vec<NetQueueState>,
    /// A frame read from the TAP but not yet delivered (header included).
    pub rx_pending_frame: Vec<u8>,
}

impl<T: Tap> Net<T> {
    /// The device's state. Guest RX buffers set aside for a pending frame are
    /// given back (the RX `next_avail` is rewound) so they are found again
    /// after restore.
    pub fn save(&self) -> NetState {
        let mut queues: Vec<NetQueueState> = self
            .active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state().into()).collect())
            .unwrap_or_default();
        if let Some(rx) = queues.get_mut(RX_INDEX) {
            if !self.rx_reserved.is_empty() {
                if self.rx_reserved_gap {
                    log::warn!(
                        "virtio-net on TAP {}: {} reserved RX buffers cannot be given back",
                        self.tap.name(),
                        self.rx_reserved.len()
                    );
                } else {
                    rx.next_avail = rx.next_avail.wrapping_sub(self.rx_reserved.len() as u16);
                }
            }
        }
        NetState {
            tap_name: self.tap.name().to_string(),
            mac: self.config.mac,
            mtu: self.config.mtu,
            queue_size: self.config.queue_size,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            activated: self.active.is_some(),
            queues,
            rx_pending_frame: self.rx_buf[..self.rx_pending].to_vec(),
        }
    }

    /// Gives back guest RX buffers set aside for a frame that has not arrived
    /// yet, by rewinding the live RX queue's `next_avail`. Call before the
    /// transport snapshots queue state itself (instead of [`Net::save`]'s
    /// copy); RX processing simply reserves them again afterwards.
    pub fn release_rx_buffers(&mut self) {
        if self.rx_reserved.is_empty() || self.rx_reserved_gap {
            return;
        }
        if let Some(active) = self.active.as_mut() {
            let q = &mut active.queues[RX_INDEX];
            let back = self.rx_reserved.len() as u16;
            q.set_next_avail(q.next_avail().wrapping_sub(back));
            self.rx_reserved.clear();
            self.rx_reserved_cap = 0;
        }
    }

    /// Rebuilds a device over `tap` from `state`. If `state.activated`, the
    /// transport then calls `activate` with `state.queues` converted by
    /// [`NetQueueState::to_queue`], as it does for a fresh device.
    pub fn restore(tap: T, state: &NetState) -> Result<Self, NetError> {
        let mut config = NetConfig::new(state.mac);
        config.mtu = state.mtu;
        config.queue_size = state.queue_size;
        config.event_idx = state.avail_features & super::EVENT_IDX_FEATURE != 0;
        let mut net = Net::new(tap, config)?;
        net.avail_features &= state.avail_features;
        net.acked_features = state.acked_features & net.avail_features;
        let pending = &state.rx_pending_frame;
        if pending.len() >= VNET_HDR_LEN_USIZE && pending.len() <= net.rx_buf.len() {
            net.rx_buf[..pending.len()].copy_from_slice(pending);
            net.rx_pending = pending.len();
        } else if !pending.is_empty() {
            log::warn!(
                "virtio-net on TAP {}: ignoring a {}-byte pending RX frame of invalid size",
                net.tap.name(),
                pending.len()
            );
        }
        Ok(net)
    }
}
