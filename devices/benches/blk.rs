// SPDX-License-Identifier: Apache-2.0
//! virtio-blk device-model throughput against direct pread/pwrite on the same file.
//!
//! Drives `Block::process_queue` with batches of queued requests (queue depth 1
//! and 32) built in simulated guest memory, over a positional-I/O file backend,
//! and runs the same access pattern with plain pread/pwrite loops. Both work on
//! the page cache, so the ratio isolates the device model's overhead.
//!
//! Run: `cargo bench -p devices --bench blk` (env `WISP_BENCH_FILE` to choose
//! the file, `WISP_BENCH_SECS` for the time per case).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::disk::{check_range, DiskBackend};
use devices::virtio::block::{Block, BlockArgs, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use devices::virtio::{IrqTrigger, VirtioDevice};
use devices::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const FILE_SIZE: u64 = 512 << 20;
const QSIZE: u16 = 256;
const ROUNDS: u32 = 20;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDRS: u64 = 0x10_0000;
const STATUS: u64 = 0x20_0000;
const DATA: u64 = 0x100_0000;
const MEM_SIZE: u64 = DATA + 40 * (1 << 20);

struct FileDisk {
    file: File,
    size: u64,
    /// Skip the I/O (measures the device model alone).
    null: bool,
}

impl DiskBackend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if self.null {
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if self.null {
            return Ok(());
        }
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        self.file.write_all_at(&vec![0; len as usize], offset)
    }
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    write: bool,
    block: u64,
    random: bool,
    depth: usize,
    /// Split each request's buffer into this many non-adjacent segments.
    segments: u64,
}

/// xorshift64: the same offsets for the device and the host runs.
fn offsets(case: &Case, n: usize) -> Vec<u64> {
    let blocks = FILE_SIZE / case.block;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| {
            if case.random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % blocks) * case.block
            } else {
                (i as u64 % blocks) * case.block
            }
        })
        .collect()
}

struct Result {
    ops: u64,
    bytes: u64,
    secs: f64,
}

impl Result {
    fn add(&mut self, o: &Result) {
        self.ops += o.ops;
        self.bytes += o.bytes;
        self.secs += o.secs;
    }
    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

fn host_run(
    file: &File,
    bufs: &mut [Vec<u8>],
    case: &Case,
    offs: &[u64],
    i: &mut usize,
    dur: Duration,
) -> Result {
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < dur {
        for buf in bufs.iter_mut() {
            let off = offs[*i % offs.len()];
            *i += 1;
            let seg = (case.block / case.segments) as usize;
            for (k, chunk) in buf.chunks_mut(seg).enumerate() {
                let o = off + (k * seg) as u64;
                if case.write {
                    file.write_all_at(chunk, o).unwrap();
                } else {
                    file.read_exact_at(chunk, o).unwrap();
                }
            }
            ops += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Result {
        ops,
        bytes: ops * case.block,
        secs,
    }
}

struct DeviceBench {
    mem: GuestMemoryMmap,
    dev: Block,
    heads: Vec<u16>,
    avail: u16,
    next_off: usize,
}

fn device_setup(path: &str, case: &Case) -> DeviceBench {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let disk = FileDisk {
        file,
        size: FILE_SIZE,
        null: std::env::var_os("WISP_BENCH_NULL").is_some(),
    };
    let args = BlockArgs {
        id: "bench".into(),
        path: path.into(),
        read_only: false,
        serial: None,
    };
    let mut dev = Block::new(args, Box::new(disk)).unwrap();
    dev.set_acked_features(dev.avail_features() & !(1 << 29));
    // Rings laid out by hand (desc table, avail ring, used ring).
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.activate(
        mem.clone(),
        irq,
        vec![q],
        vec![EventFd::new(EFD_NONBLOCK).unwrap()],
    )
    .unwrap();

    // Fixed descriptor chains, one per slot: header, data segments, status.
    let seg = case.block / case.segments;
    let per_chain = case.segments as u16 + 2;
    // Touch the data buffers like the host side does its Vecs (otherwise they
    // are all backed by the shared zero page, which flatters writes).
    let fill = vec![0x5au8; 1 << 20];
    for off in (DATA..MEM_SIZE).step_by(fill.len()) {
        mem.write_slice(&fill, GuestAddress(off)).unwrap();
    }
    let mut heads = Vec::new();
    for slot in 0..case.depth as u64 {
        let head = slot as u16 * per_chain;
        let mut descs = vec![(HDRS + slot * 16, 16u32, 0u16)];
        for k in 0..case.segments {
            // Non-adjacent segments when split (so they are not merged).
            let stride = if case.segments > 1 { seg * 2 } else { seg };
            let addr = DATA + slot * case.block * if case.segments > 1 { 2 } else { 1 };
            descs.push((
                addr + k * stride,
                seg as u32,
                if case.write { 0 } else { 2 },
            ));
        }
        descs.push((STATUS + slot, 1, 2));
        for (j, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = j == descs.len() - 1;
            let d = Descriptor::new(
                addr,
                len,
                flags | if last { 0 } else { 1 },
                head + j as u16 + 1,
            );
            let at = DESC + 16 * u64::from(head + j as u16);
            mem.write_obj(RawDescriptor::from(d), GuestAddress(at))
                .unwrap();
        }
        let t = if case.write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        mem.write_obj(t, GuestAddress(HDRS + slot * 16)).unwrap();
        heads.push(head);
    }
    DeviceBench {
        mem,
        dev,
        heads,
        avail: 0,
        next_off: 0,
    }
}

fn device_run(b: &mut DeviceBench, case: &Case, offs: &[u64], dur: Duration) -> Result {
    let DeviceBench {
        mem,
        dev,
        heads,
        avail,
        next_off: i,
    } = b;
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < dur {
        for (slot, &head) in heads.iter().enumerate() {
            let sector = offs[*i % offs.len()] / 512;
            *i += 1;
            // Guest-side work kept cheap: single-region slices, no iterators.
            mem.get_slice(GuestAddress(HDRS + slot as u64 * 16 + 8), 8)
                .unwrap()
                .write_obj(sector, 0)
                .unwrap();
            let at = AVAIL + 4 + 2 * u64::from(*avail % QSIZE);
            mem.get_slice(GuestAddress(at), 2)
                .unwrap()
                .write_obj(head, 0)
                .unwrap();
            *avail = avail.wrapping_add(1);
        }
        mem.store(*avail, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
        dev.process_queue();
        ops += case.depth as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(),
        *avail,
        "{:?}",
        dev.metrics().snapshot()
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    Result {
        ops,
        bytes: ops * case.block,
        secs,
    }
}

fn main() {
    let path =
        std::env::var("WISP_BENCH_FILE").unwrap_or_else(|_| "/tmp/wisp-blk-bench.img".into());
    let secs: f64 = std::env::var("WISP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let dur = Duration::from_secs_f64(secs);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        let chunk = vec![0x3cu8; 1 << 20];
        for off in (0..FILE_SIZE).step_by(chunk.len()) {
            f.write_all_at(&chunk, off).unwrap();
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut cases = Vec::new();
    for depth in [1, 32] {
        for write in [false, true] {
            cases.push(Case {
                name: if write { "4k-randwrite" } else { "4k-randread" },
                write,
                block: 4096,
                random: true,
                depth,
                segments: 1,
            });
            cases.push(Case {
                name: if write { "1m-seqwrite" } else { "1m-seqread" },
                write,
                block: 1 << 20,
                random: false,
                depth,
                segments: 1,
            });
        }
    }
    // 1 MiB as 128 non-adjacent 8 KiB segments (a fragmented guest buffer).
    for write in [false, true] {
        cases.push(Case {
            name: if write {
                "1m-seqwrite-128sg"
            } else {
                "1m-seqread-128sg"
            },
            write,
            block: 1 << 20,
            random: false,
            depth: 1,
            segments: 128,
        });
    }
    println!(
        "{:<24} {:>3} {:>10} {:>10} {:>10} {:>10} {:>6}",
        "case", "qd", "dev MB/s", "host MB/s", "dev IOPS", "host IOPS", "ratio"
    );
    let filter = std::env::var("WISP_BENCH_CASE").unwrap_or_default();
    for case in cases.iter().filter(|c| c.name.contains(filter.as_str())) {
        let offs = offsets(case, 1 << 16);
        // Interleave short host and device slices so that noise from other
        // processes hits both alike; sum them up.
        let mut bufs = vec![vec![0x5au8; case.block as usize]; case.depth];
        let mut hi = 0;
        let mut bench = device_setup(&path, case);
        let _ = host_run(&file, &mut bufs, case, &offs, &mut hi, dur / 10);
        let _ = device_run(&mut bench, case, &offs, dur / 10);
        let mut d = Result {
            ops: 0,
            bytes: 0,
            secs: 0.0,
        };
        let mut h = Result {
            ops: 0,
            bytes: 0,
            secs: 0.0,
        };
        let only = std::env::var("WISP_BENCH_ONLY").unwrap_or_default();
        for _ in 0..ROUNDS {
            if only == "dev" {
                d.add(&device_run(&mut bench, case, &offs, dur / ROUNDS));
                continue;
            }
            if only == "host" {
                h.add(&host_run(
                    &file,
                    &mut bufs,
                    case,
                    &offs,
                    &mut hi,
                    dur / ROUNDS,
                ));
                continue;
            }
            let r = host_run(&file, &mut bufs, case, &offs, &mut hi, dur / ROUNDS);
            h.add(&r);
            let r = device_run(&mut bench, case, &offs, dur / ROUNDS);
            d.add(&r);
        }
        println!(
            "{:<24} {:>3} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>6.2}",
            case.name,
            case.depth,
            d.mbps(),
            h.mbps(),
            d.iops(),
            h.iops(),
            d.mbps() / h.mbps()
        );
    }
    let _ = std::fs::remove_file(&path);
}
