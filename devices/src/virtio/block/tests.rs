// SPDX-License-Identifier: Apache-2.0
//! virtio-blk unit tests against simulated guest memory and queues.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::BlockConfig;
use super::*;
use crate::disk::{check_range, DiskBackend};
use crate::virtio::{IrqTrigger, VirtioDevice, VIRTIO_INT_CONFIG};
use crate::GuestMemoryMmap;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const DISK_SIZE: usize = 1 << 20;
/// Where test buffers live (the queue itself is at 0).
const BUF: u64 = 0x1_0000;
/// End of the first memory region; a second one follows directly.
const REGION1_END: u64 = 0x20_0000;
const MEM_END: u64 = 0x30_0000;
const POISON: u8 = 0xa5;

/// A recorded discard / write-zeroes: (kind, offset, len, unmap).
pub(crate) type DiskOp = (&'static str, u64, u64, bool);

#[derive(Clone, Default)]
pub(crate) struct MemDisk {
    pub data: Arc<Mutex<Vec<u8>>>,
    pub ro: bool,
    pub fail: Arc<AtomicBool>,
    pub flushes: Arc<AtomicU32>,
    pub ops: Arc<Mutex<Vec<DiskOp>>>,
}

impl MemDisk {
    pub fn new(size: usize) -> Self {
        let data = (0..size).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        Self {
            data: Arc::new(Mutex::new(data)),
            ..Default::default()
        }
    }

    fn check(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected failure"));
        }
        check_range(self.size(), offset, len)
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.check(0, 0)?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check(offset, len)?;
        self.ops
            .lock()
            .unwrap()
            .push(("discard", offset, len, false));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.check(offset, len)?;
        self.ops.lock().unwrap().push(("zero", offset, len, unmap));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
}

pub(crate) fn test_mem() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION1_END as usize),
        (GuestAddress(REGION1_END), (MEM_END - REGION1_END) as usize),
    ])
    .unwrap();
    let poison = vec![POISON; (MEM_END - BUF) as usize];
    mem.write_slice(&poison, GuestAddress(BUF)).unwrap();
    mem
}

/// A descriptor as a test writes it: address, length, device-writable.
#[derive(Clone, Copy)]
struct D(u64, u32, bool);

struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: Block,
    disk: MemDisk,
    next_desc: u16,
    irq: Arc<IrqTrigger>,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with(mem, MemDisk::new(DISK_SIZE), None, false)
    }

    fn with(
        mem: &'a GuestMemoryMmap,
        disk: MemDisk,
        config: Option<BlockConfig>,
        read_only: bool,
    ) -> Self {
        let args = BlockArgs {
            id: "disk0".into(),
            path: "/tmp/disk0.img".into(),
            read_only,
            serial: Some("wisp-serial-0123456789abc".into()),
        };
        let config = config.unwrap_or_else(|| BlockConfig::for_size(disk.size()));
        let mut dev = Block::with_config(args, Box::new(disk.clone()), config).unwrap();
        dev.set_acked_features(dev.avail_features());
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let q: Queue = vq.create_queue().unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(
            mem.clone(),
            irq.clone(),
            vec![q],
            vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        )
        .unwrap();
        Self {
            mem,
            vq,
            dev,
            disk,
            next_desc: 0,
            irq,
        }
    }

    /// Adds a chain of `descs` to the descriptor table and the available ring.
    fn add(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = self.next_desc;
            let last = i == descs.len() - 1;
            let flags = if d.2 { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let desc = SplitDescriptor::new(d.0, d.1, flags, idx.wrapping_add(1) % QUEUE_SIZE);
            self.vq
                .desc_table()
                .store(idx, RawDescriptor::from(desc))
                .unwrap();
            self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
        }
        self.push_head(head);
        head
    }

    fn push_head(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at((idx % QUEUE_SIZE) as usize)
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    fn used(&self, n: u16) -> (u32, u32) {
        let e = self.vq.used().ring().ref_at(n as usize).unwrap().load();
        (e.id(), e.len())
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// Runs one chain and returns (used len, status byte at `status`).
    fn run(&mut self, descs: &[D]) -> (u32, u8) {
        let head = self.add(descs);
        let before = self.used_idx();
        self.dev.process_queue();
        assert_eq!(self.used_idx(), before.wrapping_add(1));
        let (id, len) = self.used(before % QUEUE_SIZE);
        assert_eq!(id, u32::from(head));
        let status = descs.last().map_or(0, |d| {
            d.0.checked_add(u64::from(d.1.max(1)) - 1)
                .and_then(|at| self.mem.read_obj::<u8>(GuestAddress(at)).ok())
                .unwrap_or(0)
        });
        (len, status)
    }

    fn header(&self, at: u64, t: u32, sector: u64) -> D {
        self.mem.write_obj(t.to_le(), GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at + 8))
            .unwrap();
        D(at, 16, false)
    }

    fn disk_bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.disk.data.lock().unwrap()[off..off + len].to_vec()
    }

    fn guest(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

/// Asserts that guest memory in [BUF, MEM_END) is POISON except in `ranges`.
fn assert_untouched_except(mem: &GuestMemoryMmap, ranges: &[(u64, u64)]) {
    let mut all = vec![0u8; (MEM_END - BUF) as usize];
    mem.read_slice(&mut all, GuestAddress(BUF)).unwrap();
    for (i, b) in all.iter().enumerate() {
        let a = BUF + i as u64;
        if ranges.iter().any(|&(s, l)| a >= s && a < s + l) {
            continue;
        }
        assert_eq!(*b, POISON, "guest byte at {a:#x} was modified");
    }
}

const HDR: u64 = BUF;
const DATA: u64 = BUF + 0x1000;
const STATUS: u64 = BUF + 0x100;

#[test]
fn test_read_multi_segment() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 3);
    let (len, status) = h.run(&[
        hdr,
        D(DATA, 512, true),
        D(DATA + 0x2000, 1024, true),
        D(STATUS, 1, true),
    ]);
    assert_eq!((len, status), (1 + 1536, VIRTIO_BLK_S_OK));
    assert_eq!(h.guest(DATA, 512), h.disk_bytes(3 * 512, 512));
    assert_eq!(h.guest(DATA + 0x2000, 1024), h.disk_bytes(4 * 512, 1024));
    assert_untouched_except(
        &mem,
        &[(HDR, 16), (DATA, 512), (DATA + 0x2000, 1024), (STATUS, 1)],
    );
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.requests, m.read_bytes, m.errors), (1, 1536, 0));
}

#[test]
fn test_read_across_memory_regions_and_merged_segments() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 0);
    // Two adjacent segments (merged) spanning the region boundary.
    let a = REGION1_END - 0x600;
    let (len, status) = h.run(&[
        hdr,
        D(a, 0x400, true),
        D(a + 0x400, 0x400, true),
        D(STATUS, 1, true),
    ]);
    assert_eq!((len, status), (0x801, VIRTIO_BLK_S_OK));
    assert_eq!(h.guest(a, 0x800), h.disk_bytes(0, 0x800));
    assert_untouched_except(&mem, &[(HDR, 16), (a, 0x800), (STATUS, 1)]);
}

#[test]
fn test_write_and_flush() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    mem.write_slice(&[7u8; 1024], GuestAddress(DATA)).unwrap();
    let hdr = h.header(HDR, VIRTIO_BLK_T_OUT, 10);
    let (len, status) = h.run(&[hdr, D(DATA, 1024, false), D(STATUS, 1, true)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.disk_bytes(5120, 1024), vec![7u8; 1024]);
    assert_ne!(h.disk_bytes(5120 + 1024, 1)[0], 7);
    assert_eq!(h.dev.metrics().snapshot().write_bytes, 1024);

    let hdr = h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    let (len, status) = h.run(&[hdr, D(STATUS, 1, true)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.disk.flushes.load(Ordering::SeqCst), 1);
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.flushes, m.discards), (1, 0));
}

#[test]
fn test_get_id() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let hdr = h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (len, status) = h.run(&[hdr, D(DATA, 512, true), D(STATUS, 1, true)]);
    assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
    assert_eq!(h.guest(DATA, 20), b"wisp-serial-01234567".to_vec());
    assert_untouched_except(&mem, &[(HDR, 16), (DATA, 20), (STATUS, 1)]);

    // A short buffer gets a truncated ID; a serial shorter than 20 is zero-padded.
    let hdr = h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (len, _) = h.run(&[hdr, D(DATA + 0x100, 4, true), D(STATUS, 1, true)]);
    assert_eq!(len, 5);
    assert_eq!(h.guest(DATA + 0x100, 5), b"wisp\xa5".to_vec());

    let mut h2 = Harness::new(&mem);
    h2.dev.serial = *b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    let hdr = h2.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (len, _) = h2.run(&[hdr, D(DATA + 0x200, 20, true), D(STATUS, 1, true)]);
    assert_eq!(len, 21);
    assert_eq!(&h2.guest(DATA + 0x200, 20)[..4], b"abc\0");
}

fn ranges_at(mem: &GuestMemoryMmap, at: u64, ranges: &[(u64, u32, u32)]) -> u32 {
    for (i, &(sector, num, flags)) in ranges.iter().enumerate() {
        let a = at + 16 * i as u64;
        mem.write_obj(sector.to_le(), GuestAddress(a)).unwrap();
        mem.write_obj(num.to_le(), GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(a + 12)).unwrap();
    }
    16 * ranges.len() as u32
}

#[test]
fn test_discard_and_write_zeroes() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let n = ranges_at(&mem, DATA, &[(1, 2, 0), (8, 1, 0)]);
    let hdr = h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    let (len, status) = h.run(&[hdr, D(DATA, n, false), D(STATUS, 1, true)]);
    assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(
        *h.disk.ops.lock().unwrap(),
        vec![("discard", 512, 1024, false), ("discard", 4096, 512, false)]
    );
    // Discard with the unmap flag, or unknown flags: UNSUPP.
    let n = ranges_at(&mem, DATA, &[(1, 2, 1)]);
    let hdr = h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        h.run(&[hdr, D(DATA, n, false), D(STATUS, 1, true)]).1,
        VIRTIO_BLK_S_UNSUPP
    );

    h.disk.ops.lock().unwrap().clear();
    let n = ranges_at(&mem, DATA, &[(100, 4, 1)]);
    let hdr = h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        h.run(&[hdr, D(DATA, n, false), D(STATUS, 1, true)]),
        (1, VIRTIO_BLK_S_OK)
    );
    assert_eq!(h.disk_bytes(100 * 512, 2048), vec![0; 2048]);
    assert_eq!(
        *h.disk.ops.lock().unwrap(),
        vec![("zero", 100 * 512, 2048, true)]
    );
    let n = ranges_at(&mem, DATA, &[(100, 4, 2)]);
    let hdr = h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        h.run(&[hdr, D(DATA, n, false), D(STATUS, 1, true)]).1,
        VIRTIO_BLK_S_UNSUPP
    );

    // Malformed range lists: IOERR and no disk operation.
    h.disk.ops.lock().unwrap().clear();
    let cap = (DISK_SIZE / 512) as u64;
    for (ranges, len) in [
        (vec![(cap - 1, 2, 0)], None),
        (vec![(u64::MAX / 256, 1, 0)], None),
        (vec![(0, 1, 0), (cap, 1, 0)], None),
        (vec![(0, 1, 0)], Some(15)),
        (vec![], Some(0)),
        (vec![(0, 1, 0); 33], None),
    ] {
        let n = ranges_at(&mem, DATA, &ranges);
        let hdr = h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let mut chain = vec![hdr];
        if len != Some(0) {
            chain.push(D(DATA, len.unwrap_or(n), false));
        }
        chain.push(D(STATUS, 1, true));
        assert_eq!(h.run(&chain), (1, VIRTIO_BLK_S_IOERR), "{ranges:?}");
    }
    assert!(h.disk.ops.lock().unwrap().is_empty());

    // A range over max_write_zeroes_sectors.
    let cfg = BlockConfig {
        max_write_zeroes_sectors: 8,
        ..BlockConfig::for_size(DISK_SIZE as u64)
    };
    let mut h = Harness::with(&mem, MemDisk::new(DISK_SIZE), Some(cfg), false);
    let n = ranges_at(&mem, DATA, &[(0, 9, 0)]);
    let hdr = h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        h.run(&[hdr, D(DATA, n, false), D(STATUS, 1, true)]).1,
        VIRTIO_BLK_S_IOERR
    );

    // Not negotiated: UNSUPP.
    let mut h = Harness::new(&mem);
    h.dev
        .set_acked_features(1 << crate::virtio::VIRTIO_F_VERSION_1);
    let n = ranges_at(&mem, DATA, &[(0, 1, 0)]);
    let hdr = h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        h.run(&[hdr, D(DATA, n, false), D(STATUS, 1, true)]).1,
        VIRTIO_BLK_S_UNSUPP
    );
}

#[test]
fn test_indirect_chain() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let table = BUF + 0x8000;
    let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 1);
    let descs = [
        SplitDescriptor::new(hdr.0, 16, F_NEXT, 1),
        SplitDescriptor::new(DATA, 512, F_NEXT | F_WRITE, 2),
        SplitDescriptor::new(STATUS, 1, F_WRITE, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let desc = SplitDescriptor::new(table, 48, F_INDIRECT, 0);
    h.vq.desc_table()
        .store(0, RawDescriptor::from(desc))
        .unwrap();
    h.next_desc = 1;
    h.push_head(0);
    assert!(h.dev.process_queue());
    assert_eq!(h.used(0), (0, 513));
    assert_eq!(h.guest(STATUS, 1), vec![VIRTIO_BLK_S_OK]);
    assert_eq!(h.guest(DATA, 512), h.disk_bytes(512, 512));
}

#[test]
fn test_malformed_requests_get_ioerr() {
    let mem = test_mem();
    let cap = (DISK_SIZE / 512) as u64;
    type Case = (&'static str, u32, u64, Vec<D>);
    let cases: Vec<Case> = vec![
        (
            "read into readable",
            VIRTIO_BLK_T_IN,
            0,
            vec![D(DATA, 512, false)],
        ),
        (
            "write from writable",
            VIRTIO_BLK_T_OUT,
            0,
            vec![D(DATA, 512, true)],
        ),
        (
            "mixed directions",
            VIRTIO_BLK_T_IN,
            0,
            vec![D(DATA, 512, true), D(DATA + 512, 512, false)],
        ),
        (
            "not a multiple of 512",
            VIRTIO_BLK_T_IN,
            0,
            vec![D(DATA, 511, true)],
        ),
        (
            "past the end",
            VIRTIO_BLK_T_IN,
            cap - 1,
            vec![D(DATA, 1024, true)],
        ),
        (
            "sector overflow",
            VIRTIO_BLK_T_OUT,
            u64::MAX / 256,
            vec![D(DATA, 512, false)],
        ),
        (
            "data out of memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![D(MEM_END - 512, 1024, true)],
        ),
        (
            "data beyond address space",
            VIRTIO_BLK_T_IN,
            0,
            vec![D(u64::MAX - 511, 512, true)],
        ),
        (
            "segment over size_max",
            VIRTIO_BLK_T_IN,
            0,
            vec![D(DATA, (1 << 20) + 512, true)],
        ),
        ("get-id without buffer", VIRTIO_BLK_T_GET_ID, 0, vec![]),
    ];
    for (name, t, sector, data) in cases {
        let mut h = Harness::new(&mem);
        let before = h.disk_bytes(0, DISK_SIZE);
        let mut chain = vec![h.header(HDR, t, sector)];
        chain.extend(data);
        chain.push(D(STATUS, 1, true));
        assert_eq!(h.run(&chain), (1, VIRTIO_BLK_S_IOERR), "{name}");
        assert_untouched_except(&mem, &[(HDR, 16), (STATUS, 1)]);
        assert_eq!(h.disk_bytes(0, DISK_SIZE), before, "{name}");
        assert_eq!(h.dev.metrics().snapshot().errors, 1, "{name}");
        mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    }

    // Bad headers.
    let mut h = Harness::new(&mem);
    let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 0);
    for bad in [
        D(HDR, 16, true),
        D(HDR, 8, false),
        D(HDR, 32, false),
        D(MEM_END - 8, 16, false),
    ] {
        assert_eq!(
            h.run(&[bad, D(DATA, 512, true), D(STATUS, 1, true)]),
            (1, VIRTIO_BLK_S_IOERR)
        );
    }
    let _ = hdr;
    // Only a status descriptor (no header).
    assert_eq!(h.run(&[D(STATUS, 1, true)]), (1, VIRTIO_BLK_S_IOERR));
    // The status goes in the last byte of a longer status descriptor.
    let hdr = h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    let (len, st) = h.run(&[hdr, D(STATUS, 4, true)]);
    assert_eq!((len, st), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.guest(STATUS, 3), vec![POISON; 3]);

    // Unsupported type.
    let hdr = h.header(HDR, 0x42, 0);
    assert_eq!(h.run(&[hdr, D(STATUS, 1, true)]), (1, VIRTIO_BLK_S_UNSUPP));
}

#[test]
fn test_too_many_segments() {
    let mem = test_mem();
    let cfg = BlockConfig {
        seg_max: 2,
        ..BlockConfig::for_size(DISK_SIZE as u64)
    };
    let mut h = Harness::with(&mem, MemDisk::new(DISK_SIZE), Some(cfg), false);
    let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 0);
    let mut chain = vec![hdr];
    chain.extend((0..2).map(|i| D(DATA + 512 * i, 512, true)));
    chain.push(D(STATUS, 1, true));
    assert_eq!(h.run(&chain), (1025, VIRTIO_BLK_S_OK));
    chain.insert(1, D(DATA + 0x4000, 512, true));
    mem.write_slice(&[POISON; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(h.run(&chain), (1, VIRTIO_BLK_S_IOERR));
    assert_untouched_except(&mem, &[(HDR, 16), (STATUS, 1)]);
}

#[test]
fn test_no_status_descriptor_consumed_with_zero_len() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    for last in [
        D(STATUS, 1, false),
        D(STATUS, 0, true),
        D(MEM_END, 1, true),
        D(u64::MAX, 1, true),
    ] {
        let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 0);
        let (len, _) = h.run(&[hdr, D(DATA, 512, true), last]);
        assert_eq!(len, 0);
        assert_untouched_except(&mem, &[(HDR, 16)]);
    }
    assert_eq!(h.dev.metrics().snapshot().invalid, 4);
    assert!(!h.dev.needs_reset());
}

#[test]
fn test_read_only() {
    let mem = test_mem();
    let mut h = Harness::with(&mem, MemDisk::new(DISK_SIZE), None, true);
    assert_ne!(h.dev.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert!(h.dev.is_read_only());
    let before = h.disk_bytes(0, DISK_SIZE);
    let hdr = h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        h.run(&[hdr, D(DATA, 512, false), D(STATUS, 1, true)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let n = ranges_at(&mem, DATA, &[(0, 1, 0)]);
        let hdr = h.header(HDR, t, 0);
        assert_eq!(
            h.run(&[hdr, D(DATA, n, false), D(STATUS, 1, true)]),
            (1, VIRTIO_BLK_S_IOERR)
        );
    }
    assert_eq!(h.disk_bytes(0, DISK_SIZE), before);
    // Reads still work; a backend that is read-only makes the device read-only.
    let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        h.run(&[hdr, D(DATA, 512, true), D(STATUS, 1, true)]).1,
        VIRTIO_BLK_S_OK
    );
    let disk = MemDisk {
        ro: true,
        ..MemDisk::new(4096)
    };
    let h = Harness::with(&mem, disk, None, false);
    assert!(h.dev.is_read_only());
}

#[test]
fn test_host_io_error() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.disk.fail.store(true, Ordering::SeqCst);
    for (t, dir) in [(VIRTIO_BLK_T_IN, true), (VIRTIO_BLK_T_OUT, false)] {
        let hdr = h.header(HDR, t, 0);
        assert_eq!(
            h.run(&[hdr, D(DATA, 512, dir), D(STATUS, 1, true)]),
            (1, VIRTIO_BLK_S_IOERR)
        );
    }
    let hdr = h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[hdr, D(STATUS, 1, true)]), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(h.dev.metrics().snapshot().errors, 3);
}

#[test]
fn test_descriptor_loop_terminates() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let hdr = h.header(HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    let d0 = SplitDescriptor::new(hdr.0, 16, F_NEXT, 1);
    let d1 = SplitDescriptor::new(STATUS, 1, F_NEXT | F_WRITE, 0);
    h.vq.desc_table().store(0, RawDescriptor::from(d0)).unwrap();
    h.vq.desc_table().store(1, RawDescriptor::from(d1)).unwrap();
    h.push_head(0);
    h.dev.process_queue();
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0), (0, 1));
    assert_eq!(h.guest(STATUS, 1), vec![VIRTIO_BLK_S_IOERR]);
}

#[test]
fn test_broken_ring_needs_reset() {
    let mem = test_mem();
    // Head index outside the queue.
    let mut h = Harness::new(&mem);
    h.push_head(QUEUE_SIZE + 3);
    assert!(!h.dev.process_queue());
    assert!(h.dev.needs_reset());
    assert_eq!(h.irq.status.load(Ordering::SeqCst), VIRTIO_INT_CONFIG);
    // Later notifications are ignored until reset.
    let hdr = h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.add(&[hdr, D(STATUS, 1, true)]);
    assert!(!h.dev.process_queue());
    assert_eq!(h.used_idx(), 0);
    h.dev.reset();
    assert!(!h.dev.needs_reset());
    assert!(!h.dev.is_activated());

    // Available index too far ahead.
    let mut h = Harness::new(&mem);
    h.vq.avail().idx().store(QUEUE_SIZE + 1);
    h.dev.process_queue();
    assert!(h.dev.needs_reset());
}

#[test]
fn test_event_idx_suppresses_interrupts() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.dev.queues[0].set_event_idx(true);
    let used_event =
        h.vq.avail_addr()
            .unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
    mem.write_obj(5u16, used_event).unwrap();
    let hdr = h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.add(&[hdr, D(STATUS, 1, true)]);
    assert!(!h.dev.process_queue());
    assert_eq!(h.used_idx(), 1);
    mem.write_obj(1u16, used_event).unwrap();
    h.add(&[hdr, D(STATUS, 1, true)]);
    assert!(h.dev.process_queue());
    // Nothing new: no interrupt.
    assert!(!h.dev.process_queue());
    // The device published avail_event = next_avail.
    let avail_event =
        h.vq.used_addr()
            .unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);
}

#[test]
fn test_config_space() {
    let disk = MemDisk::new(DISK_SIZE + 100);
    let dev = Block::new(
        BlockArgs {
            id: "d".into(),
            path: "/x".into(),
            read_only: false,
            serial: None,
        },
        Box::new(disk),
    )
    .unwrap();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), (DISK_SIZE / 512) as u64);
    let mut b = [0u8; 4];
    dev.read_config(12, &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::from(QUEUE_SIZE) - 2);
    dev.read_config(20, &mut b);
    assert_eq!(u32::from_le_bytes(b), 512);
    dev.read_config(52, &mut b);
    assert_eq!(u32::from_le_bytes(b), 32);
    // Partial and out-of-range reads.
    let mut b = [0xffu8; 4];
    dev.read_config(58, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    let mut one = [0u8; 1];
    dev.read_config(56, &mut one);
    assert_eq!(one, [1]);
    assert_eq!(dev.serial[..2], *b"d\0");
    let f = dev.avail_features();
    for bit in [
        crate::virtio::VIRTIO_F_VERSION_1,
        crate::virtio::VIRTIO_RING_F_EVENT_IDX,
        crate::virtio::VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn test_activate_requires_one_queue() {
    let mut dev = Block::new(
        BlockArgs {
            id: "d".into(),
            path: "/x".into(),
            read_only: false,
            serial: None,
        },
        Box::new(MemDisk::new(4096)),
    )
    .unwrap();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    assert!(dev.activate(test_mem(), irq, vec![], vec![]).is_err());
    assert!(!dev.is_activated());
    assert!(!dev.process_queue());
}

mod persist_tests;

/// A deterministic stand-in for the fuzz target: structured random rings
/// must never panic, and the device must keep its used index consistent.
#[test]
fn test_random_rings_never_panic() {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000), (GuestAddress(0x8000), 0x8000)])
            .unwrap();
    for iter in 0..1500 {
        let qsize = 16u16;
        // Descriptor table at 0, avail ring at 0x100, used ring at 0x200.
        for i in 0..qsize {
            let addr = match rnd() % 8 {
                0 => rnd(),
                1 => 0x8000 - (rnd() % 64),
                _ => 0x400 + (rnd() % 0xf000),
            };
            let len = [0, 1, 15, 16, 17, 512, 4096, rnd() as u32][(rnd() % 8) as usize];
            let flags = (rnd() % 8) as u16;
            let next = (rnd() % 20) as u16;
            let d = SplitDescriptor::new(addr, len, flags, next);
            mem.write_obj(RawDescriptor::from(d), GuestAddress(u64::from(i) * 16))
                .unwrap();
        }
        for i in 0..qsize {
            mem.write_obj((rnd() % 18) as u16, GuestAddress(0x104 + 2 * u64::from(i)))
                .unwrap();
        }
        let avail_idx = (rnd() % 20) as u16;
        mem.write_obj(avail_idx, GuestAddress(0x102)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x202)).unwrap();
        // Random headers wherever descriptors may point.
        for _ in 0..16 {
            let at = 0x400 + (rnd() % 0xf000);
            let t = [0u32, 1, 4, 8, 11, 13, 99][(rnd() % 7) as usize];
            let _ = mem.write_obj(t, GuestAddress(at));
            let _ = mem.write_obj(rnd() % 80, GuestAddress(at + 8));
        }
        let disk = MemDisk::new(64 * 512);
        let args = BlockArgs {
            id: "r".into(),
            path: "/r".into(),
            read_only: iter % 5 == 0,
            serial: None,
        };
        let mut dev = Block::new(args, Box::new(disk)).unwrap();
        dev.set_acked_features(dev.avail_features());
        let mut q = Queue::new(qsize).unwrap();
        q.set_size(qsize);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x100), Some(0));
        q.set_used_ring_address(Some(0x200), Some(0));
        q.set_ready(true);
        q.set_event_idx(iter % 2 == 0);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(
            mem.clone(),
            irq,
            vec![q],
            vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        )
        .unwrap();
        dev.process_queue();
        let used: u16 = mem.read_obj(GuestAddress(0x202)).unwrap();
        if dev.needs_reset() {
            assert!(used <= avail_idx);
        } else {
            assert_eq!(used, avail_idx, "iteration {iter}");
        }
    }
}

#[test]
fn test_replace_disk_flushes_old_and_takes_new_capacity() {
    let old = MemDisk::new(1 << 20);
    let flushes = old.flushes.clone();
    let args = BlockArgs {
        id: "d".into(),
        path: "/old".into(),
        read_only: false,
        serial: None,
    };
    let mut blk = Block::new(args, Box::new(old)).unwrap();
    assert_eq!(blk.config().capacity, 2048);
    blk.replace_disk("/new".into(), Box::new(MemDisk::new(4 << 20)))
        .unwrap();
    assert_eq!(flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(blk.config().capacity, 8192);
    assert_eq!(blk.path(), std::path::Path::new("/new"));
    // A writable drive cannot become read-only underneath its driver.
    let mut ro = MemDisk::new(1 << 20);
    ro.ro = true;
    assert!(matches!(
        blk.replace_disk("/ro".into(), Box::new(ro)),
        Err(super::device::BlockError::Swap { .. })
    ));
    assert_eq!(blk.path(), std::path::Path::new("/new"));
}
