// SPDX-License-Identifier: Apache-2.0
//! Receive: frames from the TAP land in guest RX chains; with
//! `VIRTIO_NET_F_MRG_RXBUF` one frame may span several chains.
//!
//! The device first reserves guest chains. When they can hold any frame
//! ([`RX_BUF_LEN`] bytes) the TAP is read straight into them with one
//! `readv`; otherwise the frame goes through a bounce buffer and waits there
//! until enough buffers arrive.
//!
//! RX never drops a frame for lack of buffers: the frame stays in the bounce
//! buffer, [`Net::process_rx`] returns [`RxStatus::NeedBuffers`] and the caller
//! stops polling the TAP until the guest posts buffers (RX queue notification).
//! Reserved chains are held, not returned, so the guest's next buffer always
//! triggers a notification (also with event index).

use std::io;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::device::add_used;
use super::metrics::NetMetrics;
use super::{Net, NetError, MRG_RXBUF_FEATURE, NUM_BUFFERS_OFFSET, RX_BUF_LEN, RX_INDEX};
use crate::net::{GuestIovMut, Tap, VNET_HDR_LEN};
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
    /// First buffer inline (most chains have one), the others in `more`.
    first: (GuestAddress, usize),
    more: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxChain {
    fn descs(&self) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }
}

/// Validates a RX chain: only writable, in-bounds buffers, no loop.
fn collect_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<RxChain, u16> {
    let head = chain.head_index();
    let mut first = None;
    let mut more = Vec::new();
    let mut capacity = 0usize;
    let mut truncated = false;
    for desc in chain {
        truncated = desc.has_next();
        let len = desc.len() as usize;
        let in_bounds = GuestMemoryBackend::get_slice(mem, desc.addr(), len).is_ok()
            || GuestMemoryBackend::check_range(mem, desc.addr(), len);
        if !desc.is_write_only() || !in_bounds {
            return Err(head);
        }
        if len > 0 {
            if first.is_none() {
                first = Some((desc.addr(), len));
            } else {
                more.push((desc.addr(), len));
            }
            capacity = capacity.checked_add(len).ok_or(head)?;
        }
    }
    match first {
        Some(first) if !truncated => Ok(RxChain {
            head,
            first,
            more,
            capacity,
        }),
        _ => Err(head),
    }
}

/// Copies `data` into the chain's buffers; returns bytes written.
fn scatter(mem: &GuestMemoryMmap, chain: &RxChain, data: &[u8]) -> usize {
    let mut off = 0;
    for (addr, len) in chain.descs() {
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

/// Writes `bytes` at logical `offset` of the chain's buffers.
fn write_at(mem: &GuestMemoryMmap, chain: &RxChain, offset: usize, bytes: &[u8]) {
    let (addr, len) = chain.first;
    if offset + bytes.len() <= len {
        let _ = mem.write_slice(bytes, GuestAddress(addr.0 + offset as u64));
        return;
    }
    let mut base = 0usize;
    let mut idx = 0usize;
    for (addr, len) in chain.descs() {
        while idx < bytes.len() && offset + idx < base + len {
            let pos = offset + idx - base;
            if let Some(at) = addr.0.checked_add(pos as u64) {
                let _ = mem.write_obj(bytes[idx], GuestAddress(at));
            }
            idx += 1;
        }
        base += len;
    }
}

/// How many of `chains` a frame of `len` bytes fills, and the bytes in each.
fn chains_needed(chains: &[RxChain], len: usize) -> usize {
    let mut cap = 0usize;
    for (i, c) in chains.iter().enumerate() {
        cap += c.capacity;
        if cap >= len {
            return i + 1;
        }
    }
    chains.len()
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
                if let Err(e) = self.reserve_rx_chains(RX_BUF_LEN) {
                    break Err(e);
                }
                let read = if self.rx_reserved_cap >= RX_BUF_LEN {
                    self.read_into_guest()
                } else {
                    self.read_into_bounce()
                };
                match read {
                    Ok(true) => {
                        handled += 1;
                        continue;
                    }
                    Ok(false) => {}
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

    /// Reserves guest chains until they hold `target` bytes or the queue is
    /// empty (without MRG_RXBUF: at most one chain). Malformed chains are
    /// returned empty and counted.
    fn reserve_rx_chains(&mut self, target: usize) -> Result<(), NetError> {
        let mrg = self.has_feature(MRG_RXBUF_FEATURE);
        let tap = &self.tap;
        let metrics = &self.metrics;
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = &active.mem;
        let q = &mut active.queues[RX_INDEX];
        while self.rx_reserved_cap < target && (mrg || self.rx_reserved.is_empty()) {
            let next = q
                .iter(mem)
                .map_err(|source| NetError::Queue {
                    tap: tap.name().to_string(),
                    source,
                })?
                .next();
            let Some(chain) = next else {
                break;
            };
            let chain = match collect_rx_chain(mem, chain) {
                // The first buffer of a frame must hold the whole header.
                Ok(c) if self.rx_reserved.is_empty() && c.capacity < VNET_HDR_LEN => Err(c.head),
                other => other,
            };
            match chain {
                Err(head) => {
                    NetMetrics::inc(&metrics.rx_malformed);
                    self.rx_reserved_gap |= !self.rx_reserved.is_empty();
                    add_used(q, mem, head, 0, metrics);
                }
                Ok(c) => {
                    self.rx_reserved_cap += c.capacity;
                    self.rx_reserved.push(c);
                }
            }
        }
        Ok(())
    }

    /// Returns the first `count` reserved chains to the guest; `len` bytes
    /// were written into them in order. Sets `num_buffers`.
    fn complete_rx(&mut self, count: usize, len: usize) {
        let metrics = &self.metrics;
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let q = &mut active.queues[RX_INDEX];
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        if let Some(first) = self.rx_reserved.first() {
            write_at(mem, first, NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
        }
        let mut left = len;
        for chain in self.rx_reserved.drain(..count) {
            let written = left.min(chain.capacity);
            left -= written;
            self.rx_reserved_cap -= chain.capacity;
            add_used(q, mem, chain.head, written as u32, metrics);
        }
        if self.rx_reserved.is_empty() {
            self.rx_reserved_gap = false;
        }
        NetMetrics::inc(&metrics.rx_frames);
        NetMetrics::add(&metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
    }

    /// Reads one frame straight into the reserved chains. `Ok(true)`: a
    /// frame was handled.
    fn read_into_guest(&mut self) -> io::Result<bool> {
        let Some(active) = self.active.as_ref() else {
            return Ok(false);
        };
        let mem = &active.mem;
        let mut iov = GuestIovMut::new();
        for chain in &self.rx_reserved {
            for (addr, len) in chain.descs() {
                if let Ok(slice) = GuestMemoryBackend::get_slice(mem, addr, len) {
                    iov.push_slice(slice);
                    continue;
                }
                for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
                    // Checked when reserved; guest memory does not shrink.
                    let slice = slice.map_err(io::Error::other)?;
                    iov.push_slice(slice);
                }
            }
        }
        let n = self.tap.read_frame_iov(&iov)?;
        iov.mark_dirty(n);
        drop(iov);
        if n < VNET_HDR_LEN {
            NetMetrics::inc(&self.metrics.rx_tap_short);
            return Ok(true);
        }
        let count = chains_needed(&self.rx_reserved, n);
        self.complete_rx(count, n);
        Ok(true)
    }

    /// Reads one frame into the bounce buffer. `Ok(false)`: it is pending.
    fn read_into_bounce(&mut self) -> io::Result<bool> {
        let n = self.tap.read_frame(&mut self.rx_buf)?;
        if n < VNET_HDR_LEN {
            NetMetrics::inc(&self.metrics.rx_tap_short);
            return Ok(true);
        }
        self.rx_pending = n;
        Ok(false)
    }

    /// Delivers the frame in the bounce buffer `rx_buf[..rx_pending]`.
    fn deliver_pending(&mut self) -> Result<Delivery, NetError> {
        let frame_len = self.rx_pending;
        self.reserve_rx_chains(frame_len)?;
        if self.rx_reserved_cap < frame_len {
            if self.has_feature(MRG_RXBUF_FEATURE) || self.rx_reserved.is_empty() {
                return Ok(Delivery::NoBuffers);
            }
            // Without MRG_RXBUF the frame must fit one chain: drop it, counted.
            let chain = self.rx_reserved.remove(0);
            self.rx_reserved_cap -= chain.capacity;
            NetMetrics::inc(&self.metrics.rx_dropped);
            if let Some(active) = self.active.as_mut() {
                let q = &mut active.queues[RX_INDEX];
                add_used(q, &active.mem, chain.head, 0, &self.metrics);
            }
            return Ok(Delivery::Dropped);
        }
        let Some(active) = self.active.as_ref() else {
            return Ok(Delivery::NoBuffers);
        };
        let count = chains_needed(&self.rx_reserved, frame_len);
        let frame = &self.rx_buf[..frame_len];
        let mut off = 0;
        for chain in &self.rx_reserved[..count] {
            off += scatter(&active.mem, chain, &frame[off..]);
        }
        if off != frame_len {
            // Guest memory refused a write it had accepted when reserved.
            NetMetrics::inc(&self.metrics.rx_malformed);
        }
        self.complete_rx(count, frame_len);
        Ok(Delivery::Done)
    }
}
