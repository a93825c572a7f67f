// SPDX-License-Identifier: Apache-2.0
//! Counters for a virtio-net device, shared with whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! net_metrics {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters, updated by the device with relaxed atomics.
        #[derive(Debug, Default)]
        pub struct NetMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`NetMetrics`].
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct NetMetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl NetMetrics {
            /// Copies every counter.
            pub fn snapshot(&self) -> NetMetricsSnapshot {
                NetMetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

net_metrics! {
    /// Frames the guest sent that reached the TAP.
    tx_frames,
    /// Bytes (without virtio-net header) of `tx_frames`.
    tx_bytes,
    /// TX chains shorter than the 12-byte virtio-net header.
    tx_malformed_short,
    /// TX chains with a buffer outside guest memory.
    tx_malformed_oob,
    /// TX chains containing a device-writable descriptor.
    tx_malformed_write_only,
    /// TX chains that loop or point past the descriptor table.
    tx_malformed_chain,
    /// TX frames larger than the negotiated maximum.
    tx_too_large,
    /// TX frames the TAP refused (bad header, no memory...).
    tx_tap_errors,
    /// Frames delivered to the guest.
    rx_frames,
    /// Bytes (without virtio-net header) of `rx_frames`.
    rx_bytes,
    /// RX chains that were malformed (readable descriptor, out of bounds, loop).
    rx_malformed,
    /// Frames dropped because a guest chain was malformed or, without
    /// MRG_RXBUF, too small for the frame.
    rx_dropped,
    /// Frames read from the TAP that were shorter than the header.
    rx_tap_short,
    /// Read errors from the TAP other than "no frame".
    rx_tap_errors,
    /// Times RX stopped reading the TAP because the guest had no buffers.
    rx_no_buffers,
    /// Interrupts raised.
    interrupts,
    /// Event-loop wakeups for the TX queue.
    tx_queue_events,
    /// Event-loop wakeups for the RX queue.
    rx_queue_events,
    /// Event-loop wakeups for the TAP.
    tap_events,
    /// Queue processing errors from the virtio-queue layer.
    queue_errors,
}

impl NetMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl NetMetricsSnapshot {
    /// All malformed TX chains, whatever the reason.
    pub fn tx_malformed(&self) -> u64 {
        self.tx_malformed_short
            + self.tx_malformed_oob
            + self.tx_malformed_write_only
            + self.tx_malformed_chain
            + self.tx_too_large
    }
}
