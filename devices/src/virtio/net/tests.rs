// SPDX-License-Identifier: Apache-2.0
//! Unit tests of the virtio-net device over a fake TAP and mock queues.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::net::fake::{FakeTap, FakeTapPeer};
use crate::net::{MacAddr, VNET_HDR_LEN};
use crate::virtio::{IrqTrigger, VirtioDevice};
use crate::GuestMemoryMmap;

const MEM_SIZE: usize = 0x400_0000;
const RXQ_ADDR: u64 = 0x0;
const TXQ_ADDR: u64 = 0x1_0000;
const QSIZE: u16 = 256;

fn bit(b: u32) -> u64 {
    1 << b
}

pub(crate) fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A buffer in a test chain: (address, length, device-writable).
type Buf = (u64, u32, bool);

struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    txq: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: [u16; 2],
    net: Net<FakeTap>,
    peer: FakeTapPeer,
    irq: Arc<IrqTrigger>,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap, features: u64) -> Self {
        let (tap, peer) = FakeTap::pair("fake-tap").unwrap();
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        let mut net = Net::new(tap, NetConfig::new(mac)).unwrap();
        net.set_acked_features(features | bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1));
        let rxq = MockSplitQueue::create(mem, GuestAddress(RXQ_ADDR), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(TXQ_ADDR), QSIZE);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(0).unwrap()));
        let queues: Vec<Queue> = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        net.activate(mem.clone(), irq.clone(), queues, evts)
            .unwrap();
        Harness {
            mem,
            rxq,
            txq,
            next_desc: [0, 0],
            net,
            peer,
            irq,
        }
    }

    /// Adds a chain of `bufs` to queue `q` (raw: `next` fields as given).
    fn add_raw(&mut self, q: usize, descs: &[SplitDescriptor]) {
        let start = self.next_desc[q];
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        let mq = if q == RX_INDEX { &self.rxq } else { &self.txq };
        mq.add_desc_chains(&raw, start).unwrap();
        self.next_desc[q] += descs.len() as u16;
    }

    fn add_chain(&mut self, q: usize, bufs: &[Buf]) {
        let start = self.next_desc[q];
        let descs: Vec<SplitDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                SplitDescriptor::new(addr, len, flags, start + i as u16 + 1)
            })
            .collect();
        self.add_raw(q, &descs);
    }

    fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let mq = if q == RX_INDEX { &self.rxq } else { &self.txq };
        let n = mq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = mq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn metrics(&self) -> NetMetricsSnapshot {
        self.net.metrics().snapshot()
    }

    fn irq_count(&self) -> u64 {
        self.irq.evt.read().unwrap_or(0)
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

#[test]
fn config_space() {
    let mem = guest_mem();
    let h = Harness::new(&mem, 0);
    let mut cfg = [0xffu8; 16];
    h.net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], [2, 0, 0, 0, 0, 1]);
    assert_eq!(
        u16::from_le_bytes([cfg[6], cfg[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    assert_eq!(cfg[12..], [0; 4]);
    let mut far = [0xffu8; 4];
    h.net.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
    assert_eq!(h.net.device_type(), VIRTIO_ID_NET);
    assert_eq!(h.net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let f = h.net.avail_features();
    for b in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_STATUS,
    ] {
        assert_ne!(f & bit(b), 0);
    }
    assert_ne!(f & EVENT_IDX_FEATURE, 0);
}

#[test]
fn bad_config_rejected() {
    let (tap, _peer) = FakeTap::pair("fake-tap").unwrap();
    let mut cfg = NetConfig::new(MacAddr::generate("x"));
    cfg.mtu = 10;
    let err = Net::new(tap, cfg).unwrap_err();
    assert!(err.to_string().contains("Invalid MTU 10 for TAP fake-tap"));
    let (tap, _peer) = FakeTap::pair("fake-tap").unwrap();
    let mut cfg = NetConfig::new(MacAddr::generate("x"));
    cfg.queue_size = 100;
    assert!(matches!(
        Net::new(tap, cfg),
        Err(NetError::QueueSize { .. })
    ));
}

#[test]
fn offloads_follow_guest_features() {
    let mem = guest_mem();
    let h = Harness::new(
        &mem,
        bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_UFO),
    );
    assert_eq!(
        h.peer.offload(),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_UFO
    );
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)),
        0,
        "TSO needs CSUM"
    );
}

#[test]
fn tx_single_descriptor() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, 0);
    let f = frame(60, 1);
    mem.write_slice(&f, GuestAddress(0x10_0000)).unwrap();
    h.add_chain(TX_INDEX, &[(0x10_0000, f.len() as u32, false)]);
    assert_eq!(h.net.process_tx().unwrap(), 1);
    assert_eq!(h.peer.recv().unwrap(), f);
    assert!(h.peer.recv().is_none());
    assert_eq!(h.used(TX_INDEX), vec![(0, 0)]);
    let m = h.metrics();
    assert_eq!((m.tx_frames, m.tx_bytes), (1, 60));
    assert_eq!(h.irq_count(), 1);
}

#[test]
fn tx_multi_descriptor_and_gso_size() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_CSUM));
    let f = frame(65_000, 3);
    // Header alone, then the frame in uneven pieces.
    let cuts = [0, VNET_HDR_LEN, 100, 4096, 40_000, f.len()];
    let mut bufs = Vec::new();
    for w in cuts.windows(2) {
        let addr = 0x20_0000 + (w[0] as u64) * 2;
        mem.write_slice(&f[w[0]..w[1]], GuestAddress(addr)).unwrap();
        bufs.push((addr, (w[1] - w[0]) as u32, false));
    }
    h.add_chain(TX_INDEX, &bufs);
    assert_eq!(h.net.process_tx().unwrap(), 1);
    assert_eq!(h.peer.recv().unwrap(), f);
    assert_eq!(h.metrics().tx_frames, 1);
}

#[test]
fn tx_malformed_chains_are_counted_and_skipped() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, 0);
    let good = frame(100, 9);
    mem.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    // Too short for the header.
    h.add_chain(TX_INDEX, &[(0x10_0000, 8, false)]);
    // Out of guest memory, and straddling its end.
    h.add_chain(TX_INDEX, &[(MEM_SIZE as u64 + 0x1000, 100, false)]);
    h.add_chain(
        TX_INDEX,
        &[(0x10_0000, 12, false), (MEM_SIZE as u64 - 10, 100, false)],
    );
    // Device-writable descriptor.
    h.add_chain(TX_INDEX, &[(0x10_0000, 12, false), (0x10_1000, 100, true)]);
    // Larger than MTU without host TSO.
    h.add_chain(
        TX_INDEX,
        &[(0x10_0000, (VNET_HDR_LEN + 1500 + 19) as u32, false)],
    );
    // A descriptor pointing to itself, and one pointing past the table.
    let idx = h.next_desc[TX_INDEX];
    h.add_raw(
        TX_INDEX,
        &[SplitDescriptor::new(
            0x10_0000,
            1,
            VRING_DESC_F_NEXT as u16,
            idx,
        )],
    );
    h.add_raw(
        TX_INDEX,
        &[SplitDescriptor::new(
            0x10_0000,
            12,
            VRING_DESC_F_NEXT as u16,
            1000,
        )],
    );
    // Empty chain payload (zero length).
    h.add_chain(TX_INDEX, &[(0x10_0000, 0, false)]);
    // Then a good frame still goes through.
    h.add_chain(TX_INDEX, &[(0x10_0000, good.len() as u32, false)]);
    assert_eq!(h.net.process_tx().unwrap(), 9);
    assert_eq!(h.peer.recv().unwrap(), good);
    assert!(h.peer.recv().is_none());
    let m = h.metrics();
    assert_eq!(m.tx_malformed_short, 2);
    assert_eq!(m.tx_malformed_oob, 2);
    assert_eq!(m.tx_malformed_write_only, 1);
    assert_eq!(m.tx_too_large, 1);
    assert_eq!(m.tx_malformed_chain, 2);
    assert_eq!(m.tx_malformed(), 8);
    assert_eq!(m.tx_frames, 1);
    assert_eq!(h.used(TX_INDEX).len(), 9);
}

#[test]
fn rx_into_one_buffer() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, 0);
    let f = frame(1000, 5);
    h.peer.send(&f).unwrap();
    h.add_chain(RX_INDEX, &[(0x30_0000, 2048, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(h.used(RX_INDEX), vec![(0, f.len() as u32)]);
    let mut expect = f.clone();
    expect[10..12].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(h.read_guest(0x30_0000, f.len()), expect);
    let m = h.metrics();
    assert_eq!((m.rx_frames, m.rx_bytes), (1, 1000));
    assert_eq!(h.irq_count(), 1);
}

#[test]
fn rx_into_merged_buffers() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    let f = frame(3000, 7);
    h.peer.send(&f).unwrap();
    for i in 0..5u64 {
        h.add_chain(RX_INDEX, &[(0x40_0000 + i * 0x1000, 1000, true)]);
    }
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(
        h.used(RX_INDEX),
        vec![(0, 1000), (1, 1000), (2, 1000), (3, 12)]
    );
    let mut got = Vec::new();
    for (i, len) in [1000, 1000, 1000, 12].into_iter().enumerate() {
        got.extend(h.read_guest(0x40_0000 + i as u64 * 0x1000, len));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4, "num_buffers");
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
}

#[test]
fn rx_waits_for_buffers_without_losing_frames() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF) | EVENT_IDX_FEATURE);
    let (f1, f2) = (frame(3000, 1), frame(200, 2));
    h.peer.send(&f1).unwrap();
    h.peer.send(&f2).unwrap();
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::NeedBuffers);
    assert!(h.net.rx_frame_pending());
    assert_eq!(h.metrics().rx_no_buffers, 1);
    // Not enough for f1 yet: the buffer is held, nothing used.
    h.add_chain(RX_INDEX, &[(0x50_0000, 2000, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::NeedBuffers);
    assert!(h.used(RX_INDEX).is_empty());
    h.add_chain(RX_INDEX, &[(0x51_0000, 2000, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::NeedBuffers);
    assert_eq!(h.used(RX_INDEX), vec![(0, 2000), (1, 1012)]);
    h.add_chain(RX_INDEX, &[(0x52_0000, 2000, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert!(!h.net.rx_frame_pending());
    assert_eq!(h.used(RX_INDEX)[2], (2, 212));
    let mut got = h.read_guest(0x50_0000, 2000);
    got.extend(h.read_guest(0x51_0000, 1012));
    assert_eq!(got[VNET_HDR_LEN..], f1[VNET_HDR_LEN..]);
    assert_eq!(h.read_guest(0x52_0000 + 12, 200), f2[VNET_HDR_LEN..]);
    let m = h.metrics();
    assert_eq!((m.rx_frames, m.rx_dropped), (2, 0));
}

#[test]
fn rx_malformed_buffers_are_counted() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, 0);
    let f = frame(500, 4);
    h.peer.send(&f).unwrap();
    // Read-only, out of bounds, looping, header-too-small: returned empty.
    h.add_chain(RX_INDEX, &[(0x60_0000, 2048, false)]);
    h.add_chain(RX_INDEX, &[(MEM_SIZE as u64 - 100, 2048, true)]);
    let idx = h.next_desc[RX_INDEX];
    h.add_raw(
        RX_INDEX,
        &[SplitDescriptor::new(
            0x60_0000,
            8,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            idx,
        )],
    );
    h.add_chain(RX_INDEX, &[(0x60_0000, 0, true)]);
    // Without MRG_RXBUF a buffer too small for the frame drops it (counted).
    h.add_chain(RX_INDEX, &[(0x60_0000, 100, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    let m = h.metrics();
    assert_eq!((m.rx_malformed, m.rx_dropped, m.rx_frames), (4, 1, 0));
    assert!(h.used(RX_INDEX).iter().all(|&(_, len)| len == 0));
    // The next frame lands in a good buffer.
    h.peer.send(&f).unwrap();
    h.add_chain(RX_INDEX, &[(0x61_0000, 2048, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(h.metrics().rx_frames, 1);
    assert_eq!(h.read_guest(0x61_0000 + 12, 500), f[VNET_HDR_LEN..]);
}

#[test]
fn rx_short_tap_frame_counted() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, 0);
    h.peer.send(&[1, 2, 3]).unwrap();
    h.add_chain(RX_INDEX, &[(0x30_0000, 2048, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(h.metrics().rx_tap_short, 1);
    assert!(h.used(RX_INDEX).is_empty());
}

#[test]
fn not_activated_does_nothing() {
    let (tap, peer) = FakeTap::pair("fake-tap").unwrap();
    let mut net = Net::new(tap, NetConfig::new(MacAddr::generate("x"))).unwrap();
    peer.send(&frame(10, 0)).unwrap();
    assert_eq!(net.process_tx().unwrap(), 0);
    assert_eq!(net.process_rx().unwrap(), RxStatus::NeedBuffers);
    assert!(!net.is_activated());
}

#[test]
fn state_round_trip() {
    let mem = guest_mem();
    let mut h = Harness::new(
        &mem,
        bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_GUEST_CSUM),
    );
    let f = frame(3000, 8);
    h.peer.send(&f).unwrap();
    h.add_chain(RX_INDEX, &[(0x50_0000, 1000, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::NeedBuffers);
    let state = h.net.save();
    assert_eq!(state.rx_pending_frame, f);
    assert_eq!(
        state.queues[RX_INDEX].next_avail, 0,
        "reserved buffer given back"
    );
    let json = serde_json::to_string(&state).unwrap();
    let back: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let (tap, peer) = FakeTap::pair("fake-tap").unwrap();
    let mut net = Net::restore(tap, &back).unwrap();
    assert_eq!(net.acked_features(), state.acked_features);
    assert!(net.rx_frame_pending());
    let queues: Vec<Queue> = back.queues.iter().map(|q| q.to_queue().unwrap()).collect();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(0).unwrap()));
    let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    net.activate(mem.clone(), irq, queues, evts).unwrap();
    assert_eq!(peer.offload(), libc::TUN_F_CSUM);
    // The held buffer is found again; with more buffers the frame is delivered.
    for i in 1..4u64 {
        h.add_chain(RX_INDEX, &[(0x50_0000 + i * 0x1000, 1000, true)]);
    }
    assert_eq!(net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(net.metrics().snapshot().rx_frames, 1);
    assert_eq!(h.used(RX_INDEX).len(), 4);
    assert_eq!(h.read_guest(0x50_0000 + 12, 988), f[12..1000]);
}

#[test]
fn event_loop_stops_polling_tap_without_buffers() {
    let mem = guest_mem();
    let h = Harness::new(&mem, 0);
    let Harness {
        net, peer, mut rxq, ..
    } = h;
    let rx_evt = net.active.as_ref().unwrap().queue_evts[RX_INDEX]
        .try_clone()
        .unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut em: EventManager<Arc<Mutex<Net<FakeTap>>>> = EventManager::new().unwrap();
    em.add_subscriber(net.clone());
    // Activation was signalled before the subscriber existed: handled on first run.
    em.run_with_timeout(100).unwrap();
    assert!(net.lock().unwrap().events.tap_polling);
    peer.send(&frame(64, 1)).unwrap();
    em.run_with_timeout(100).unwrap();
    {
        let n = net.lock().unwrap();
        assert!(n.rx_frame_pending());
        assert!(
            !n.events.tap_polling,
            "TAP must not be polled without buffers"
        );
    }
    // No busy loop: nothing fires while the guest posts no buffer.
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    rxq.add_chain(1).unwrap();
    // Make the mock's one-descriptor chain a writable 2 KiB buffer.
    let d = SplitDescriptor::new(0x30_0000, 2048, VRING_DESC_F_WRITE as u16, 0);
    rxq.desc_table().store(0, RawDescriptor::from(d)).unwrap();
    rx_evt.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    let n = net.lock().unwrap();
    assert!(!n.rx_frame_pending());
    assert!(n.events.tap_polling);
    assert_eq!(n.metrics().snapshot().rx_frames, 1);
}

#[test]
fn reset_and_reactivate() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, bit(VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(h.peer.offload(), libc::TUN_F_CSUM);
    h.net.reset();
    assert!(!h.net.is_activated());
    assert_eq!(h.net.acked_features(), 0);
    assert_eq!(h.peer.offload(), 0);
    assert_eq!(h.net.retired_evts.len(), 2);
    let queues: Vec<Queue> = vec![h.rxq.create_queue().unwrap(), h.txq.create_queue().unwrap()];
    let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    h.net
        .activate(mem.clone(), h.irq.clone(), queues, evts)
        .unwrap();
    assert!(h.net.is_activated());
    let bad = h.net.activate(mem.clone(), h.irq.clone(), vec![], vec![]);
    assert!(bad.is_err());
}

fn dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    // The single region starts at 0, so the address is the region offset.
    region.bitmap().dirty_at(addr as usize)
}

#[test]
fn rx_zero_copy_into_big_buffer() {
    let mem = guest_mem();
    let mut h = Harness::new(
        &mem,
        bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
    );
    let f = frame(65_000, 3);
    h.peer.send(&f).unwrap();
    // A "big packets" chain: header buffer + 64 KiB + a bit.
    h.add_chain(
        RX_INDEX,
        &[(0x80_0000, 12, true), (0x90_0000, RX_BUF_LEN as u32, true)],
    );
    assert!(!dirty(&mem, 0x90_0000 + 0x8000));
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(h.used(RX_INDEX), vec![(0, f.len() as u32)]);
    let mut got = h.read_guest(0x80_0000, 12);
    got.extend(h.read_guest(0x90_0000, f.len() - 12));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    assert!(
        dirty(&mem, 0x90_0000 + 0x8000),
        "direct reads mark guest pages dirty"
    );
    assert_eq!(h.metrics().rx_frames, 1);
}

#[test]
fn rx_zero_copy_merged_keeps_unused_buffers() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    for i in 0..20u64 {
        h.add_chain(RX_INDEX, &[(0x100_0000 + i * 0x2000, 4096, true)]);
    }
    let (f1, f2) = (frame(10_000, 1), frame(100, 2));
    h.peer.send(&f1).unwrap();
    h.peer.send(&f2).unwrap();
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    let used = h.used(RX_INDEX);
    assert_eq!(
        used,
        vec![(0, 4096), (1, 4096), (2, 10_012 - 8192), (3, 112)]
    );
    let mut got = Vec::new();
    for (i, &(_, len)) in used[..3].iter().enumerate() {
        got.extend(h.read_guest(0x100_0000 + i as u64 * 0x2000, len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(got[VNET_HDR_LEN..], f1[VNET_HDR_LEN..]);
    let second = h.read_guest(0x100_0000 + 3 * 0x2000, 112);
    assert_eq!(u16::from_le_bytes([second[10], second[11]]), 1);
    assert_eq!(second[VNET_HDR_LEN..], f2[VNET_HDR_LEN..]);
    // The other 16 buffers stay reserved, and are given back in a snapshot.
    assert_eq!(h.net.rx_reserved.len(), 16);
    assert_eq!(h.net.save().queues[RX_INDEX].next_avail, 4);
}

#[test]
fn rx_zero_copy_into_many_descriptor_chain() {
    let mem = guest_mem();
    let mut h = Harness::new(
        &mem,
        bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
    );
    // Header + six 13,200-byte pieces: more than the inline iovec slots.
    let mut bufs = vec![(0x80_0000u64, 12u32, true)];
    bufs.extend((0..6u64).map(|i| (0x90_0000 + i * 0x4000, 13_200, true)));
    h.add_chain(RX_INDEX, &bufs);
    let f = frame(60_000, 6);
    h.peer.send(&f).unwrap();
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(h.used(RX_INDEX), vec![(0, f.len() as u32)]);
    let mut got = h.read_guest(0x80_0000, 12);
    for i in 0..6u64 {
        got.extend(h.read_guest(0x90_0000 + i * 0x4000, 13_200));
    }
    got.truncate(f.len());
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    assert!(
        dirty(&mem, 0x90_0000 + 4 * 0x4000 + 100),
        "spilled buffers marked dirty"
    );
}

#[test]
fn release_rx_buffers_rewinds_reservations() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    h.peer.send(&frame(3000, 1)).unwrap();
    h.add_chain(RX_INDEX, &[(0x50_0000, 1000, true)]);
    h.add_chain(RX_INDEX, &[(0x51_0000, 1000, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::NeedBuffers);
    assert_eq!(h.net.save().queues[RX_INDEX].next_avail, 0);
    h.net.release_rx_buffers();
    assert!(h.net.rx_reserved.is_empty());
    assert_eq!(h.net.save().queues[RX_INDEX].next_avail, 0);
    // The same buffers are found again, plus one more: the frame arrives.
    h.add_chain(RX_INDEX, &[(0x52_0000, 2000, true)]);
    assert_eq!(h.net.process_rx().unwrap(), RxStatus::Drained);
    assert_eq!(h.used(RX_INDEX), vec![(0, 1000), (1, 1000), (2, 1012)]);
}

#[test]
fn event_loop_sends_on_tx_notification_and_rearms_after_reset() {
    let mem = guest_mem();
    let mut h = Harness::new(&mem, 0);
    let f = frame(80, 2);
    mem.write_slice(&f, GuestAddress(0x10_0000)).unwrap();
    h.add_chain(TX_INDEX, &[(0x10_0000, f.len() as u32, false)]);
    let Harness { net, peer, .. } = h;
    let tx_evt = net.active.as_ref().unwrap().queue_evts[TX_INDEX]
        .try_clone()
        .unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut em: EventManager<Arc<Mutex<Net<FakeTap>>>> = EventManager::new().unwrap();
    em.add_subscriber(net.clone());
    // Activation registers the queues and flushes work queued before it.
    em.run_with_timeout(100).unwrap();
    assert_eq!(peer.recv().unwrap(), f);
    // A later notification is served through the queue eventfd.
    tx_evt.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(net.lock().unwrap().metrics().snapshot().tx_queue_events, 1);
    // Reset: the handler drops the old queue eventfds and the TAP.
    net.lock().unwrap().reset();
    em.run_with_timeout(100).unwrap();
    {
        let n = net.lock().unwrap();
        assert!(n.retired_evts.is_empty());
        assert!(!n.events.tap_registered && !n.events.queues_registered);
    }
    peer.send(&frame(10, 1)).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 0, "TAP no longer watched");
}
