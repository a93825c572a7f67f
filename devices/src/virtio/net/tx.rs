// SPDX-License-Identifier: Apache-2.0
//! Transmit: guest TX chains (virtio-net header + frame) go to the TAP in one
//! `writev` straight from guest memory.

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::device::add_used;
use super::metrics::NetMetrics;
use super::{max_tx_frame_len, Net, NetError, TX_INDEX};
use crate::net::{FrameIov, Tap, VNET_HDR_LEN};
use crate::GuestMemoryMmap;

/// Why a TX chain was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxMalformed {
    /// Shorter than the virtio-net header.
    Short,
    /// A buffer outside guest memory.
    OutOfBounds,
    /// A device-writable descriptor.
    WriteOnly,
    /// The chain loops or its `next` points past the table.
    BadChain,
    /// The frame exceeds the negotiated maximum.
    TooLarge,
}

impl TxMalformed {
    fn count(self, m: &NetMetrics) {
        NetMetrics::inc(match self {
            TxMalformed::Short => &m.tx_malformed_short,
            TxMalformed::OutOfBounds => &m.tx_malformed_oob,
            TxMalformed::WriteOnly => &m.tx_malformed_write_only,
            TxMalformed::BadChain => &m.tx_malformed_chain,
            TxMalformed::TooLarge => &m.tx_too_large,
        });
    }
}

/// Gathers a TX chain into an iovec list over guest memory, validating it.
pub fn gather_tx_chain<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    max_len: usize,
) -> Result<FrameIov<'a>, TxMalformed> {
    let mut iov = FrameIov::new();
    let mut total = 0usize;
    let mut truncated = false;
    for desc in chain {
        // The chain iterator stops at a loop (after queue-size descriptors) or
        // an out-of-table `next`; a last descriptor still claiming a successor
        // shows that.
        truncated = desc.has_next();
        if desc.is_write_only() {
            return Err(TxMalformed::WriteOnly);
        }
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|t| *t <= max_len)
            .ok_or(TxMalformed::TooLarge)?;
        push_guest_range(mem, &mut iov, desc.addr(), len)?;
    }
    if truncated {
        return Err(TxMalformed::BadChain);
    }
    if total < VNET_HDR_LEN {
        return Err(TxMalformed::Short);
    }
    Ok(iov)
}

fn push_guest_range<'a>(
    mem: &'a GuestMemoryMmap,
    iov: &mut FrameIov<'a>,
    addr: GuestAddress,
    len: usize,
) -> Result<(), TxMalformed> {
    if len == 0 {
        return Ok(());
    }
    // Fast path: the range lies in one region (bounds-checked by vm-memory).
    if let Ok(slice) = GuestMemoryBackend::get_slice(mem, addr, len) {
        iov.push_slice(&slice);
        return Ok(());
    }
    if !GuestMemoryBackend::check_range(mem, addr, len) {
        return Err(TxMalformed::OutOfBounds);
    }
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let slice = slice.map_err(|_| TxMalformed::OutOfBounds)?;
        iov.push_slice(&slice);
    }
    Ok(())
}

impl<T: Tap> Net<T> {
    /// Sends every frame the guest queued on the TX queue, then interrupts the
    /// guest if it wants to know. Returns how many chains were consumed
    /// (including dropped ones). Does nothing before activation.
    pub fn process_tx(&mut self) -> Result<usize, NetError> {
        let max_len = VNET_HDR_LEN + max_tx_frame_len(self.acked_features, self.config.mtu);
        let tap = &mut self.tap;
        let metrics = &self.metrics;
        let Some(active) = self.active.as_mut() else {
            return Ok(0);
        };
        let mem = &active.mem;
        let q = &mut active.queues[TX_INDEX];
        let tap_name = tap.name().to_string();
        let queue_err = |source| NetError::Queue {
            tap: tap_name.clone(),
            source,
        };
        let mut consumed = 0usize;
        loop {
            q.disable_notification(mem).map_err(queue_err)?;
            while let Some(chain) = q.iter(mem).map_err(queue_err)?.next() {
                let head = chain.head_index();
                match gather_tx_chain(mem, chain, max_len) {
                    Ok(iov) => match tap.write_frame(&iov) {
                        Ok(_) => {
                            NetMetrics::inc(&metrics.tx_frames);
                            NetMetrics::add(&metrics.tx_bytes, (iov.len() - VNET_HDR_LEN) as u64);
                        }
                        Err(e) => {
                            NetMetrics::inc(&metrics.tx_tap_errors);
                            log::debug!("TAP {}: dropping TX frame: {e}", tap.name());
                        }
                    },
                    Err(why) => why.count(metrics),
                }
                add_used(q, mem, head, 0, metrics);
                consumed += 1;
            }
            if !q.enable_notification(mem).map_err(queue_err)? {
                break;
            }
        }
        if consumed > 0 {
            self.signal_used(TX_INDEX);
        }
        Ok(consumed)
    }
}
