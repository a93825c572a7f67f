// SPDX-License-Identifier: Apache-2.0
//! virtio-net over a [`Tap`](crate::net::Tap): one RX queue (0) and one TX
//! queue (1), no control queue.
//!
//! Queue processing is plain methods ([`Net::process_tx`], [`Net::process_rx`])
//! that need no event loop; [`event_handler`] is the thin `event-manager` glue.
//! Offloads the guest accepts are passed to the TAP (`TUNSETOFFLOAD`), so large
//! segments cross the host without being split.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod persist;
pub mod rx;
pub mod tx;

#[cfg(test)]
mod tests;

pub use device::{Net, NetConfig, NetError};
pub use metrics::{NetMetrics, NetMetricsSnapshot};
pub use persist::{NetQueueState, NetState};
pub use rx::RxStatus;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Index of the receive queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue.
pub const TX_INDEX: usize = 1;
/// Number of queues.
pub const NUM_QUEUES: usize = 2;
/// Default (and maximum offered) queue size.
pub const QUEUE_SIZE: u16 = 256;

/// Ethernet header plus one VLAN tag: what a frame carries beyond the MTU.
pub const ETH_OVERHEAD: usize = 14 + 4;
/// Largest frame (without virtio-net header) with segmentation offload: an IP
/// packet of up to 64 KiB plus Ethernet and VLAN headers.
pub const MAX_GSO_FRAME_LEN: usize = 65_536 + ETH_OVERHEAD;
/// Size of the buffer RX reads TAP frames into (header included).
pub const RX_BUF_LEN: usize = crate::net::VNET_HDR_LEN + MAX_GSO_FRAME_LEN;
/// Offset of `num_buffers` in the virtio-net header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Config space layout: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
pub const CONFIG_SPACE_LEN: usize = 12;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Features wisp's virtio-net offers, before `RING_EVENT_IDX` (optional).
pub const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_UFO);

/// `VIRTIO_RING_F_EVENT_IDX` as a feature bit.
pub const EVENT_IDX_FEATURE: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
/// `VIRTIO_NET_F_MRG_RXBUF` as a feature bit.
pub const MRG_RXBUF_FEATURE: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
/// Features that let the guest send frames larger than the MTU.
pub const HOST_GSO_FEATURES: u64 =
    bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_HOST_UFO);
/// Features that let the host send the guest frames larger than the MTU.
pub const GUEST_GSO_FEATURES: u64 =
    bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_UFO);

/// The `TUN_F_*` offload flags matching the guest's RX features: what the TAP
/// may hand us without segmenting or checksumming it first.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_UFO) != 0 {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

/// Largest frame (without header) the guest may send given `acked` features
/// and the MTU.
pub fn max_tx_frame_len(acked: u64, mtu: u16) -> usize {
    if acked & HOST_GSO_FEATURES != 0 {
        MAX_GSO_FRAME_LEN
    } else {
        usize::from(mtu.max(1500)) + ETH_OVERHEAD
    }
}
