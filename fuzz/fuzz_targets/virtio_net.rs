// SPDX-License-Identifier: Apache-2.0
//! Fuzzes virtio-net queue processing: the input becomes the guest's
//! descriptor tables, rings and buffers plus frames arriving from a fake TAP.
//! The device must neither panic nor hang, whatever the guest writes.

#![no_main]

use std::sync::Arc;

use devices::net::fake::FakeTap;
use devices::net::MacAddr;
use devices::virtio::net::{Net, NetConfig};
use devices::virtio::{IrqTrigger, VirtioDevice};
use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x2_0000;
const QSIZE: u16 = 16;
/// Per queue: descriptor table (256 B), avail ring, used ring.
const RXQ: u64 = 0x0;
const TXQ: u64 = 0x1000;

fn queue(base: u64) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.try_set_desc_table_address(GuestAddress(base)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(base + 0x100)).unwrap();
    q.try_set_used_ring_address(GuestAddress(base + 0x200)).unwrap();
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let features = u64::from_le_bytes(data[..8].try_into().unwrap());
    let rounds = data[8] % 4 + 1;
    let data = &data[9..];
    // The first 8 KiB (both queues' structures) and a buffer area come from
    // the input; the rest are frames from the TAP.
    let split = data.len().min(0x2000 + 0x1000);
    let (guest, frames) = data.split_at(split);

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(guest, GuestAddress(0)).unwrap();
    let (tap, peer) = FakeTap::pair("fuzz").unwrap();
    let mut net = Net::new(tap, NetConfig::new(MacAddr::generate("fuzz"))).unwrap();
    net.set_acked_features(features);
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc_nonblock()).unwrap()));
    let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    if net.activate(mem.clone(), irq, vec![queue(RXQ), queue(TXQ)], evts).is_err() {
        return;
    }
    for chunk in frames.chunks(1500).take(8) {
        let _ = peer.send(chunk);
    }
    for _ in 0..rounds {
        let _ = net.process_tx();
        let _ = net.process_rx();
        while peer.recv().is_some() {}
    }
    let _ = net.save();
});

fn libc_nonblock() -> i32 {
    vmm_sys_util::eventfd::EFD_NONBLOCK
}
