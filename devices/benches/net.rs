// SPDX-License-Identifier: Apache-2.0
//! virtio-net throughput through the device model vs. the host writing and
//! reading the same TAP traffic directly, inside a private network namespace.
//!
//! Topology (namespace `wisp-bench-<pid>`): bridge `br0` with ports `tapdev`
//! (the device's TAP), `taphost` (the host baseline's TAP) and veth `v0`;
//! `v1`, the veth's other end, injects RX traffic with an AF_PACKET socket.
//! TX: the device sends 256-chain batches from a simulated guest TX queue to
//! `tapdev`; the baselines `writev` the same frames to `taphost` /
//! `taphost2`, from one host buffer and from the guest's own TX buffers.
//! RX: each injected batch is flooded to all TAPs; the device drains
//! `tapdev` into guest RX buffers, the baselines read `taphost` into one
//! host buffer and `taphost2` straight into the guest's RX buffers.
//! Only the device's / host's own work is timed (not the guest posting
//! buffers or the injection), as this thread's CPU time, so other load on
//! the machine does not skew the ratios. Needs root; prints "skipped" otherwise.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devices::net::{ifctl, open_tap, FrameIov, GuestIovMut, MacAddr, Tap, VNET_HDR_LEN};
use devices::virtio::net::{Net, NetConfig, RxStatus};
use devices::virtio::{IrqTrigger, VirtioDevice};
use devices::GuestMemoryMmap;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const RXQ: u64 = 0x0;
const TXQ: u64 = 0x1_0000;
const TX_BUFS: u64 = 0x10_0000;
const RX_BUFS: u64 = 0x200_0000;
const STRIDE: u64 = 0x1_1000;
const BUF_LEN: u32 = 65_562;
const BATCH: usize = 256;

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(ns: &str, args: &str) {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns]).args(args.split_whitespace());
    let out = cmd.output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bit(b: u32) -> u64 {
    1 << b
}

/// The frame (without header) and its virtio-net header for `kind`.
fn make_frame(kind: &str) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut f = vec![0xff; 6];
    f.extend([0x02, 0, 0, 0, 0, 9]);
    match kind {
        "64B" | "1500B" => {
            let len = if kind == "64B" { 64 } else { 1514 };
            f.extend(0x88b5u16.to_be_bytes());
            f.resize(len, 0x5a);
        }
        _ => {
            let payload = 65_000usize;
            f.extend(0x0800u16.to_be_bytes());
            let total = (40 + payload) as u16;
            let mut iph = vec![
                0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
            ];
            iph[2..4].copy_from_slice(&total.to_be_bytes());
            let mut sum: u32 = iph
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            iph[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            f.extend(iph);
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&4321u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&5555u16.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x18;
            f.extend(tcp);
            f.resize(14 + total as usize, 0x33);
            hdr[0] = 1; // NEEDS_CSUM
            hdr[1] = 1; // GSO TCPV4
            for (i, v) in [54u16, 1448, 34, 16].into_iter().enumerate() {
                hdr[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    (hdr, f)
}

#[derive(Default)]
struct Rate {
    frames: u64,
    bytes: u64,
    time: Duration,
}

impl Rate {
    fn add(&mut self, frames: u64, frame_len: u64, time: Duration) {
        self.frames += frames;
        self.bytes += frames * frame_len;
        self.time += time;
    }

    fn fps(&self) -> f64 {
        self.frames as f64 / self.time.as_secs_f64()
    }
    fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.time.as_secs_f64() / 1e9
    }
}

fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket() call; result checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: PACKET_VNET_HDR (15) takes an int.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            15,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    let sndbuf: libc::c_int = 64 << 20;
    // SAFETY: SO_SNDBUFFORCE takes an int.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&sndbuf as *const libc::c_int).cast(),
            4,
        )
    };
    // SAFETY: sockaddr_ll is plain data.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto;
    sa.sll_ifindex = ifctl::if_index(ifname).unwrap().unwrap() as i32;
    // SAFETY: `sa` is a valid sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0);
    fd
}

const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;

/// A ready split queue at `base`: descriptors, then avail and used rings 4 KiB apart.
fn make_queue(base: u64) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.try_set_desc_table_address(GuestAddress(base)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(base + AVAIL_OFF))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(base + USED_OFF))
        .unwrap();
    q.set_ready(true);
    q
}

/// Makes `n` more avail-ring entries (heads 0..n) visible to the device.
fn post(mem: &GuestMemoryMmap, avail: GuestAddress, idx: &mut u16, n: usize) {
    for head in 0..n {
        let head = head as u16;
        let slot = avail.0 + 4 + 2 * u64::from(*idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        *idx = idx.wrapping_add(1);
    }
    mem.write_obj(*idx, GuestAddress(avail.0 + 2)).unwrap();
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        println!("net bench skipped: needs root and /dev/net/tun");
        return;
    }
    let ns = Ns(format!("wisp-bench-{}", std::process::id()));
    let st = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap();
    assert!(st.success());
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ])
        .status();
    ip(&ns.0, "link add br0 type bridge");
    ip(&ns.0, "link add v0 type veth peer name v1");
    ip(&ns.0, "link set v0 master br0");
    for dev in ["br0", "v0", "v1"] {
        ip(&ns.0, &format!("link set {dev} up"));
    }
    let ns_file = File::open(format!("/run/netns/{}", ns.0)).unwrap();
    // SAFETY: setns on a valid netns fd; this benchmark thread stays in it.
    let entered = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(entered, 0);

    let (tapdev, _pd) = open_tap("tapdev", Some("br0"), None, None).unwrap();
    let (mut taphost, _ph) = open_tap("taphost", Some("br0"), None, None).unwrap();
    let (mut taphost2, _ph2) = open_tap("taphost2", Some("br0"), None, None).unwrap();
    let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
    taphost.set_offload(offload).unwrap();
    taphost2.set_offload(offload).unwrap();
    let v1 = packet_socket("v1");

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut net = Net::new(tapdev, NetConfig::new(MacAddr::generate("bench"))).unwrap();
    net.set_acked_features(
        bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_MRG_RXBUF),
    );
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let queues: Vec<Queue> = vec![make_queue(RXQ), make_queue(TXQ)];
    net.activate(
        mem.clone(),
        irq,
        queues,
        vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
    )
    .unwrap();
    // RX descriptors: one 64 KiB writable buffer per chain.
    for i in 0..u64::from(QSIZE) {
        let d = SplitDescriptor::new(RX_BUFS + i * STRIDE, BUF_LEN, VRING_DESC_F_WRITE as u16, 0);
        mem.write_obj(RawDescriptor::from(d), GuestAddress(RXQ + 16 * i))
            .unwrap();
    }
    // A running guest's buffers are resident: fault every page in first, so
    // no contender pays for first touches (zeroing, huge pages) the others
    // then skip.
    let resident = vec![0u8; STRIDE as usize];
    for i in 0..u64::from(QSIZE) {
        mem.write_slice(&resident, GuestAddress(RX_BUFS + i * STRIDE))
            .unwrap();
    }
    let (mut rx_idx, mut tx_idx) = (0u16, 0u16);

    println!(
        "{:<9} {:<3} {:>12} {:>8} | {:>12} {:>8} {:>6} | {:>12} {:>8} {:>6}",
        "frame",
        "dir",
        "device fr/s",
        "Gbit/s",
        "host-hot",
        "Gbit/s",
        "ratio",
        "host-guestbuf",
        "Gbit/s",
        "ratio"
    );
    // Baselines: the host's own I/O on one reused buffer ("host-hot"), and
    // the same I/O straight on the guest's buffers without the device model
    // ("host-guestbuf": same memory footprint, isolates the model's cost).
    let mut hot_rx = vec![0u8; 70_000];
    for kind in ["64B", "1500B", "64KiB-TSO"] {
        let (hdr, frame) = make_frame(kind);
        let flen = frame.len() as u64;
        let batches = if kind == "64KiB-TSO" { 60 } else { 150 };
        let mut msg = hdr.to_vec();
        msg.extend(&frame);

        // TX: the guest's chains hold header + frame in one buffer.
        for i in 0..u64::from(QSIZE) {
            let addr = TX_BUFS + i * STRIDE;
            mem.write_slice(&msg, GuestAddress(addr)).unwrap();
            let d = SplitDescriptor::new(addr, msg.len() as u32, 0, 0);
            mem.write_obj(RawDescriptor::from(d), GuestAddress(TXQ + 16 * i))
                .unwrap();
        }
        let mut rates = [Rate::default(), Rate::default(), Rate::default()];
        for b in 0..batches {
            post(&mem, GuestAddress(TXQ + AVAIL_OFF), &mut tx_idx, BATCH);
            // Rotate who goes first, so nobody always meets the same cache or
            // softirq state.
            for k in 0..3 {
                let who = (b + k) % 3;
                let t = cpu_now();
                let frames = match who {
                    0 => {
                        let before = net.metrics().snapshot().tx_frames;
                        net.process_tx().unwrap();
                        net.metrics().snapshot().tx_frames - before
                    }
                    _ => {
                        let tap = if who == 1 {
                            &mut taphost
                        } else {
                            &mut taphost2
                        };
                        let mut ok = 0;
                        for i in 0..BATCH as u64 {
                            let mut iov = FrameIov::new();
                            if who == 1 {
                                iov.push_bytes(&msg);
                            } else {
                                // Straight from the guest's TX buffers, no device model.
                                let addr = GuestAddress(TX_BUFS + (i % u64::from(QSIZE)) * STRIDE);
                                iov.push_slice(
                                    &GuestMemoryBackend::get_slice(&mem, addr, msg.len()).unwrap(),
                                );
                            }
                            ok += u64::from(tap.write_frame(&iov).is_ok());
                        }
                        ok
                    }
                };
                rates[who].add(frames, flen, cpu_now() - t);
            }
        }
        report(kind, "TX", &rates);
        std::thread::sleep(Duration::from_millis(20));
        // Forget what TX flooded into the TAPs.
        for fd in [
            net.tap().as_raw_fd(),
            taphost.as_raw_fd(),
            taphost2.as_raw_fd(),
        ] {
            flush_fd(fd);
        }

        // RX: inject a batch (flooded to all three TAPs), then let each drain it.
        let mut pmsg = hdr[..10].to_vec();
        pmsg.extend(&frame);
        let mut rates = [Rate::default(), Rate::default(), Rate::default()];
        let rx_batch = if kind == "64KiB-TSO" { 128 } else { BATCH };
        for b in 0..batches {
            post(&mem, GuestAddress(RXQ + AVAIL_OFF), &mut rx_idx, rx_batch);
            for _ in 0..rx_batch {
                // SAFETY: `pmsg` is valid for reads of its length.
                unsafe { libc::send(v1.as_raw_fd(), pmsg.as_ptr().cast(), pmsg.len(), 0) };
            }
            std::thread::sleep(Duration::from_millis(2));
            for k in 0..3 {
                let who = (b + k) % 3;
                let t = cpu_now();
                let frames = match who {
                    0 => {
                        let before = net.metrics().snapshot().rx_frames;
                        while let Ok(RxStatus::Budget) = net.process_rx() {}
                        net.metrics().snapshot().rx_frames - before
                    }
                    1 => {
                        let mut n = 0;
                        while taphost.read_frame(&mut hot_rx).is_ok() {
                            n += 1;
                        }
                        n
                    }
                    _ => {
                        // Straight into the guest's RX buffers, no device model.
                        let mut n = 0u64;
                        loop {
                            let addr = GuestAddress(RX_BUFS + (n % u64::from(QSIZE)) * STRIDE);
                            let mut iov = GuestIovMut::new();
                            for slice in
                                GuestMemoryBackend::get_slices(&mem, addr, BUF_LEN as usize)
                            {
                                iov.push_slice(slice.unwrap());
                            }
                            match taphost2.read_frame_iov(&iov) {
                                Ok(len) => iov.mark_dirty(len),
                                Err(_) => break,
                            }
                            n += 1;
                        }
                        n
                    }
                };
                rates[who].add(frames, flen, cpu_now() - t);
            }
        }
        report(kind, "RX", &rates);
    }
    let m = net.metrics().snapshot();
    println!(
        "device counters: tx_frames={} tx_tap_errors={} rx_frames={} rx_dropped={} rx_no_buffers={}",
        m.tx_frames, m.tx_tap_errors, m.rx_frames, m.rx_dropped, m.rx_no_buffers
    );
}

/// CPU time of this thread: unlike wall time, it is not inflated when other
/// processes share the cores.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn flush_fd(fd: i32) {
    let mut buf = vec![0u8; 70_000];
    // SAFETY: `buf` is valid for writes of its length; the fd is non-blocking.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

fn report(kind: &str, dir: &str, r: &[Rate; 3]) {
    println!(
        "{kind:<9} {dir:<3} {:>12.0} {:>8.2} | {:>12.0} {:>8.2} {:>6.2} | {:>12.0} {:>8.2} {:>6.2}",
        r[0].fps(),
        r[0].gbps(),
        r[1].fps(),
        r[1].gbps(),
        r[0].fps() / r[1].fps(),
        r[2].fps(),
        r[2].gbps(),
        r[0].fps() / r[2].fps(),
    );
}
