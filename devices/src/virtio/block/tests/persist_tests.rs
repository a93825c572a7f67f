// SPDX-License-Identifier: Apache-2.0
//! Save/restore and event-loop tests of virtio-blk behind the MMIO transport.

use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::{status, MmioTransport, MmioTransportState, CONFIG_SPACE_OFFSET};

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn args() -> BlockArgs {
    BlockArgs {
        id: "root".into(),
        path: "/images/root.img".into(),
        read_only: false,
        serial: None,
    }
}

/// Brings a block device up through the registers like a driver, with the
/// queue where `vq` put it.
fn bring_up(t: &mut MmioTransport, vq: &MockSplitQueue<GuestMemoryMmap>) {
    wr(t, 0x70, status::ACKNOWLEDGE);
    wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, 0x14, 0);
    let lo = rd(t, 0x10);
    wr(t, 0x14, 1);
    let hi = rd(t, 0x10);
    wr(t, 0x24, 0);
    wr(t, 0x20, lo);
    wr(t, 0x24, 1);
    wr(t, 0x20, hi);
    wr(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(rd(t, 0x70) & status::FEATURES_OK, 0);
    wr(t, 0x30, 0);
    assert_eq!(rd(t, 0x34), u32::from(QUEUE_SIZE));
    wr(t, 0x38, u32::from(QUEUE_SIZE));
    for (reg, addr) in [
        (0x80, vq.desc_table_addr()),
        (0x90, vq.avail_addr()),
        (0xa0, vq.used_addr()),
    ] {
        wr(t, reg, addr.0 as u32);
        wr(t, reg + 4, (addr.0 >> 32) as u32);
    }
    wr(t, 0x44, 1);
    wr(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

fn push_flush(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, idx: u16) {
    mem.write_obj(VIRTIO_BLK_T_FLUSH, GuestAddress(HDR))
        .unwrap();
    mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
    let d0 = SplitDescriptor::new(HDR, 16, F_NEXT, idx * 2 + 1);
    let d1 = SplitDescriptor::new(STATUS, 1, F_WRITE, 0);
    vq.desc_table()
        .store(idx * 2, RawDescriptor::from(d0))
        .unwrap();
    vq.desc_table()
        .store(idx * 2 + 1, RawDescriptor::from(d1))
        .unwrap();
    let a = vq.avail().idx().load();
    vq.avail().ring().ref_at(a as usize).unwrap().store(idx * 2);
    vq.avail().idx().store(a + 1);
}

#[test]
fn test_block_save_restore_round_trip() {
    let mem = test_mem();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let disk = MemDisk::new(DISK_SIZE);
    let dev = Arc::new(Mutex::new(
        Block::new(args(), Box::new(disk.clone())).unwrap(),
    ));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(mem.clone(), irq, dev.clone()).unwrap();
    bring_up(&mut t, &vq);
    assert!(dev.lock().unwrap().is_activated());
    let mut cap = [0u8; 8];
    t.read(CONFIG_SPACE_OFFSET, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_SIZE / 512) as u64);

    push_flush(&mem, &vq, 0);
    assert!(dev.lock().unwrap().process_queue());
    assert_eq!(vq.used().idx().load(), 1);

    let bs = dev.lock().unwrap().save();
    let ts = t.save();
    assert!(bs.activated);
    assert_eq!(ts.queues[0].next_avail, 1);
    let bs2: BlockState = serde_json::from_str(&serde_json::to_string(&bs).unwrap()).unwrap();
    let ts2: MmioTransportState =
        serde_json::from_str(&serde_json::to_string(&ts).unwrap()).unwrap();

    let dev2 = Arc::new(Mutex::new(
        Block::restore(&bs2, Box::new(disk.clone())).unwrap(),
    ));
    let irq2 = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let t2 = MmioTransport::restore(mem.clone(), irq2, dev2.clone(), &ts2).unwrap();
    assert_eq!(dev2.lock().unwrap().save(), bs);
    assert_eq!(t2.save(), ts);

    // The restored device continues where the old one stopped.
    push_flush(&mem, &vq, 1);
    // (EVENT_IDX is negotiated and used_event = 0: no interrupt needed.)
    assert!(!dev2.lock().unwrap().process_queue());
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 2);

    // A disk of a different size is refused.
    assert!(Block::restore(&bs2, Box::new(MemDisk::new(4096))).is_err());
}

#[test]
fn test_event_loop_processes_queue() {
    let mem = test_mem();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let disk = MemDisk::new(DISK_SIZE);
    let dev = Arc::new(Mutex::new(
        Block::new(args(), Box::new(disk.clone())).unwrap(),
    ));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(mem.clone(), irq.clone(), dev.clone()).unwrap();

    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    em.add_subscriber(dev.clone());

    bring_up(&mut t, &vq);
    // Activation event: the handler registers the queue eventfd.
    em.run_with_timeout(100).unwrap();
    push_flush(&mem, &vq, 0);
    t.queue_evts()[0].write(1).unwrap();
    let mut n = 0;
    while vq.used().idx().load() == 0 && n < 50 {
        em.run_with_timeout(10).unwrap();
        n += 1;
    }
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(irq.evt.read().unwrap(), 1);
    assert_eq!(rd(&mut t, 0x60), crate::virtio::VIRTIO_INT_VRING);

    // Reset: the handler unregisters the queue; notifications are then ignored.
    wr(&mut t, 0x70, 0);
    em.run_with_timeout(100).unwrap();
    assert!(dev.lock().unwrap().registered_evts.is_empty());
    push_flush(&mem, &vq, 1);
    t.queue_evts()[0].write(1).unwrap();
    em.run_with_timeout(20).unwrap();
    assert_eq!(vq.used().idx().load(), 1);
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
fn test_restored_broken_device_still_needs_reset() {
    let mem = test_mem();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let disk = MemDisk::new(DISK_SIZE);
    let dev = Arc::new(Mutex::new(
        Block::new(args(), Box::new(disk.clone())).unwrap(),
    ));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(mem.clone(), irq, dev.clone()).unwrap();
    bring_up(&mut t, &vq);
    // Head index outside the queue breaks the ring.
    vq.avail().ring().ref_at(0).unwrap().store(QUEUE_SIZE + 1);
    vq.avail().idx().store(1);
    dev.lock().unwrap().process_queue();
    assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);

    let bs = dev.lock().unwrap().save();
    let ts = t.save();
    let dev2 = Arc::new(Mutex::new(Block::restore(&bs, Box::new(disk)).unwrap()));
    let irq2 = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t2 = MmioTransport::restore(mem.clone(), irq2, dev2.clone(), &ts).unwrap();
    assert_ne!(rd(&mut t2, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    // A driver reset recovers it.
    wr(&mut t2, 0x70, 0);
    assert_eq!(rd(&mut t2, 0x70), 0);
    assert!(!dev2.lock().unwrap().needs_reset());
}
