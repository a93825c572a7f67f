// SPDX-License-Identifier: Apache-2.0
//! Serializable virtqueue state shared by every virtio device and transport.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

/// Why a saved queue cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum QueueStateError {
    /// The saved sizes or ring addresses break virtqueue rules.
    #[error("Invalid saved virtqueue (max size {max_size}, size {size}): {source}")]
    Invalid {
        /// Saved maximum size.
        max_size: u16,
        /// Saved driver-selected size.
        size: u16,
        /// What virtio-queue rejected.
        #[source]
        source: virtio_queue::Error,
    },
}

/// Everything needed to rebuild a split virtqueue exactly where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver selected.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_F_RING_EVENT_IDX` is in use.
    pub event_idx: bool,
}

impl From<&Queue> for VirtqueueState {
    fn from(q: &Queue) -> Self {
        Self {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }
}

impl VirtqueueState {
    /// Rebuilds the queue; saved values are untrusted and validated by virtio-queue.
    pub fn to_queue(&self) -> Result<Queue, QueueStateError> {
        let state = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|source| QueueStateError::Invalid {
            max_size: self.max_size,
            size: self.size,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_queue_state_round_trip() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(128);
        q.set_ready(true);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(1));
        q.set_next_avail(7);
        q.set_next_used(5);
        q.set_event_idx(true);
        let s = VirtqueueState::from(&q);
        let q2 = s.to_queue().unwrap();
        assert_eq!(VirtqueueState::from(&q2), s);
        assert_eq!(q2.used_ring(), 0x1_0000_3000);

        let bad = VirtqueueState { size: 3, ..s };
        assert!(bad.to_queue().is_err());
        let bad = VirtqueueState { max_size: 0, ..s };
        assert!(bad.to_queue().is_err());
    }
}
