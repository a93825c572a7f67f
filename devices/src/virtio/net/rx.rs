// SPDX-License-Identifier: Apache-2.0
//! Receive: frames read from the TAP are scattered into guest RX chains; with
//! `VIRTIO_NET_F_MRG_RXBUF` one frame may span several chains.
//!
//! RX never drops a frame for lack of buffers: the frame stays in the device
//! buffer, [`Net::process_rx`] returns [`RxStatus::NeedBuffers`] and the caller
//! stops polling the TAP until the guest posts buffers (RX queue notification).
//! Chains collected for a frame that does not fit yet stay reserved, so the
//! guest's next buffer always triggers a notification (also with event index).

use std::io;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::device::add_used;
use super::metrics::NetMetrics;
use super::{Net, NetError, MRG_RXBUF_FEATURE, NUM_BUFFERS_OFFSET, RX_INDEX};
use crate::net::{Tap, VNET_HDR_LEN};
use crate::GuestMemoryMmap;

/// Frames handled per [`Net::process_rx`] call, so TX is not starved.
pub const RX_BUDGET: usize = 256;

/// Where RX processing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxStatus {
    /// The TAP has no more frames: keep polling it.
    Drained,
    /// A frame waits for guest buffers: stop polling the TAP until the RX
    /// queue is notified, then call `process_rx` again.
    NeedBuffers,
    /// The budget ran out with frames left: call again (the TAP stays readable).
    Budget,
}

/// A validated, device-writable guest chain.
#[derive(Debug)]
pub(crate) struct RxChain {
    pub(crate) head: u16,
    descs: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

/// Validates a RX chain: only writable, in-bounds buffers, no loop.
fn collect_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<RxChain, u16> {
    let head = chain.head_index();
    let mut descs = Vec::new();
    let mut capacity = 0usize;
    let mut truncated = false;
    for desc in chain {
        truncated = desc.has_next();
        let len = desc.len() as usize;
        if !desc.is_write_only() || !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(head);
        }
        if len > 0 {
            descs.push((desc.addr(), len));
            capacity = capacity.checked_add(len).ok_or(head)?;
        }
    }
    if truncated || capacity == 0 {
        return Err(head);
    }
    Ok(RxChain {
        head,
        descs,
        capacity,
    })
}

/// Copies `data` into the chain's buffers; returns bytes written.
fn scatter(mem: &GuestMemoryMmap, chain: &RxChain, data: &[u8]) -> usize {
    let mut off = 0;
    for &(addr, len) in &chain.descs {
        let n = len.min(data.len() - off);
        if n == 0 {
            break;
        }
        if mem.write_slice(&data[off..off + n], addr).is_err() {
            break;
        }
        off += n;
    }
    off
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

impl<T: Tap> Net<T> {
    /// Moves frames from the TAP into guest RX buffers (at most [`RX_BUDGET`]),
    /// then interrupts the guest if it wants to know.
    pub fn process_rx(&mut self) -> Result<RxStatus, NetError> {
        if self.active.is_none() {
            return Ok(RxStatus::NeedBuffers);
        }
        let mut handled = 0usize;
        let mut retried = false;
        let result = loop {
            if handled >= RX_BUDGET {
                break Ok(RxStatus::Budget);
            }
            if self.rx_pending == 0 {
                match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        NetMetrics::inc(&self.metrics.rx_tap_short);
                        handled += 1;
                        continue;
                    }
                    Ok(n) => self.rx_pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(RxStatus::Drained),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        NetMetrics::inc(&self.metrics.rx_tap_errors);
                        log::warn!("TAP {}: read failed: {e}", self.tap.name());
                        break Ok(RxStatus::Drained);
                    }
                }
            }
            match self.deliver_pending() {
                Ok(Delivery::Done) | Ok(Delivery::Dropped) => {
                    self.rx_pending = 0;
                    handled += 1;
                    retried = false;
                }
                Ok(Delivery::NoBuffers) => {
                    // Ask for a notification on the next buffer; if buffers
                    // arrived meanwhile, try once more.
                    match self.enable_rx_notification() {
                        Ok(true) if !retried => retried = true,
                        Ok(_) => {
                            NetMetrics::inc(&self.metrics.rx_no_buffers);
                            break Ok(RxStatus::NeedBuffers);
                        }
                        Err(e) => break Err(e),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if handled > 0 {
            self.signal_used(RX_INDEX);
        }
        result
    }

    fn enable_rx_notification(&mut self) -> Result<bool, NetError> {
        let tap = &self.tap;
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        active.queues[RX_INDEX]
            .enable_notification(&active.mem)
            .map_err(|source| NetError::Queue {
                tap: tap.name().to_string(),
                source,
            })
    }

    /// Delivers the frame in `rx_buf[..rx_pending]`.
    fn deliver_pending(&mut self) -> Result<Delivery, NetError> {
        let mrg = self.has_feature(MRG_RXBUF_FEATURE);
        let frame_len = self.rx_pending;
        let tap = &self.tap;
        let metrics = &self.metrics;
        let Some(active) = self.active.as_mut() else {
            return Ok(Delivery::NoBuffers);
        };
        let mem = &active.mem;
        let q = &mut active.queues[RX_INDEX];
        let queue_err = |source| NetError::Queue {
            tap: tap.name().to_string(),
            source,
        };
        while self.rx_reserved_cap < frame_len {
            let Some(chain) = q.iter(mem).map_err(queue_err)?.next() else {
                return Ok(Delivery::NoBuffers);
            };
            let chain = match collect_rx_chain(mem, chain) {
                Ok(c) if self.rx_reserved.is_empty() && c.capacity < VNET_HDR_LEN => Err(c.head),
                other => other,
            };
            match chain {
                Err(head) => {
                    // Return the bad buffer empty; the frame waits for a good one.
                    NetMetrics::inc(&metrics.rx_malformed);
                    self.rx_reserved_gap |= !self.rx_reserved.is_empty();
                    add_used(q, mem, head, 0, metrics);
                }
                Ok(c) if !mrg && c.capacity < frame_len => {
                    NetMetrics::inc(&metrics.rx_dropped);
                    add_used(q, mem, c.head, 0, metrics);
                    return Ok(Delivery::Dropped);
                }
                Ok(c) => {
                    self.rx_reserved_cap += c.capacity;
                    self.rx_reserved.push(c);
                }
            }
        }
        let num_buffers = u16::try_from(self.rx_reserved.len()).unwrap_or(u16::MAX);
        self.rx_buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        let frame = &self.rx_buf[..frame_len];
        let mut off = 0;
        for chain in self.rx_reserved.drain(..) {
            let written = scatter(mem, &chain, &frame[off..]);
            off += written;
            add_used(q, mem, chain.head, written as u32, metrics);
        }
        self.rx_reserved_cap = 0;
        self.rx_reserved_gap = false;
        if off == frame_len {
            NetMetrics::inc(&metrics.rx_frames);
            NetMetrics::add(&metrics.rx_bytes, (frame_len - VNET_HDR_LEN) as u64);
            Ok(Delivery::Done)
        } else {
            NetMetrics::inc(&metrics.rx_dropped);
            Ok(Delivery::Dropped)
        }
    }
}
