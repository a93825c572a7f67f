// SPDX-License-Identifier: Apache-2.0
//! Root-only tests of TAP and bridge plumbing. Each test creates its own
//! network namespace (`wisp-test-<pid>-<tag>`), works only inside it from a
//! thread that `setns`-ed into it, and deletes it afterwards. Without root,
//! iproute2 or `/dev/net/tun` the tests print why and pass.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use devices::net::{
    ifctl, open_tap, BridgeError, BridgePort, FrameIov, SetupError, Tap, TapDevice, TapError,
    VNET_HDR_LEN,
};

const ETHERTYPE_TEST: u16 = 0x88b5;

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let has_ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    let ok = root && has_ip && std::path::Path::new("/dev/net/tun").exists();
    if !ok {
        eprintln!("skipping: needs root, iproute2 and /dev/net/tun");
    }
    ok
}

struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("wisp-test-{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ns = Netns { name };
        ns.run(&["ip", "netns", "add", &ns.name.clone()]);
        ns
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -n <ns> <args>`.
    fn ip(&self, args: &str) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend(args.split_whitespace());
        self.run(&full)
    }

    /// Runs `f` on a thread inside the namespace.
    fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap();
                // SAFETY: setns on a valid netns fd; affects only this thread.
                let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// A bridge `br0` with veth `v0` on it; `v1` is the other end.
    fn with_bridge(tag: &str) -> Self {
        let ns = Netns::new(tag);
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ])
            .status();
        ns.ip("link add br0 type bridge");
        ns.ip("link add v0 type veth peer name v1");
        ns.ip("link set v0 master br0");
        ns.ip("link set br0 up");
        ns.ip("link set v0 up");
        ns.ip("link set v1 up");
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An AF_PACKET socket bound to an interface (in the calling thread's netns).
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn bind(ifname: &str, vnet_hdr: bool) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket() call; result checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if vnet_hdr {
            let one: libc::c_int = 1;
            // SAFETY: PACKET_VNET_HDR (15) takes an int.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    15,
                    (&one as *const libc::c_int).cast(),
                    4,
                )
            };
            assert_eq!(r, 0);
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
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
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket { fd }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Frames with our test ethertype (or TCP/IPv4 to `marker` port) until `deadline`.
    fn recv_matching(
        &self,
        offset: usize,
        want: impl Fn(&[u8]) -> bool,
        total: Duration,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + total;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && want(&buf[offset..n as usize]) {
                out.push(buf[..n as usize].to_vec());
            }
        }
        out
    }
}

fn test_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend([0x02, 0, 0, 0, 0, seed]);
    f.extend(ETHERTYPE_TEST.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8) ^ seed));
    f
}

fn is_test_frame(f: &[u8]) -> bool {
    f.len() >= 14 && f[12..14] == ETHERTYPE_TEST.to_be_bytes()
}

fn read_tap_frames(tap: &mut TapDevice, total: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + total;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70_000];
    while Instant::now() < deadline {
        match tap.read_frame(&mut buf) {
            Ok(n) => out.push(buf[..n].to_vec()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    out
}

fn write_tap(tap: &mut TapDevice, frame: &[u8], hdr: [u8; VNET_HDR_LEN]) {
    let mut iov = FrameIov::new();
    iov.push_bytes(&hdr);
    iov.push_bytes(frame);
    assert_eq!(tap.write_frame(&iov).unwrap(), VNET_HDR_LEN + frame.len());
}

#[test]
fn frames_cross_the_bridge_both_ways() {
    if !privileged() {
        return;
    }
    let ns = Netns::with_bridge("xing");
    ns.enter(|| {
        let (mut tap, port) = open_tap("wtap0", Some("br0"), Some(1500), None).unwrap();
        assert!(tap.created());
        assert_ne!(ifctl::flags("wtap0").unwrap() & libc::IFF_UP, 0);
        let v1 = PacketSocket::bind("v1", false);

        let out = test_frame(600, 1);
        write_tap(&mut tap, &out, [0; VNET_HDR_LEN]);
        let got = v1.recv_matching(0, is_test_frame, Duration::from_millis(400));
        assert_eq!(got, vec![out]);

        let inbound = test_frame(1500, 2);
        v1.send(&inbound);
        let got: Vec<_> = read_tap_frames(&mut tap, Duration::from_millis(400))
            .into_iter()
            .filter(|f| is_test_frame(&f[VNET_HDR_LEN..]))
            .collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0][VNET_HDR_LEN..], inbound[..]);
        drop(port);
    });
    let gone = Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "wtap0"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "created TAP removed after close");
}

/// A 64 KiB TCP/IPv4 GSO frame with its 10-byte virtio-net header.
fn tso_frame(payload: usize) -> (Vec<u8>, Vec<u8>) {
    let mut f = vec![0xff; 6];
    f.extend([0x02, 0, 0, 0, 0, 9]);
    f.extend(0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend(ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&4321u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5555u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH|ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    f.extend(tcp);
    f.extend((0..payload).map(|i| i as u8));
    // virtio_net_hdr: flags NEEDS_CSUM, gso TCPV4, hdr_len, gso_size, csum_start, csum_offset.
    let mut hdr = vec![1u8, 1];
    for v in [54u16, 1448, 34, 16] {
        hdr.extend(v.to_le_bytes());
    }
    (hdr, f)
}

fn is_tso_test(f: &[u8]) -> bool {
    f.len() > 38 && f[12..14] == [0x08, 0x00] && f[23] == 6 && f[36..38] == 5555u16.to_be_bytes()
}

#[test]
fn tso_frame_crosses_whole_with_offload() {
    if !privileged() {
        return;
    }
    let ns = Netns::with_bridge("tso");
    ns.enter(|| {
        let (mut tap, _port) = open_tap("wtap0", Some("br0"), None, None).unwrap();
        let v1 = PacketSocket::bind("v1", true);
        let (hdr, frame) = tso_frame(64_000);
        let mut msg = hdr.clone();
        msg.extend(&frame);

        // Without offload the kernel segments it for us.
        v1.send(&msg);
        let segs: Vec<_> = read_tap_frames(&mut tap, Duration::from_millis(400))
            .into_iter()
            .filter(|f| is_tso_test(&f[VNET_HDR_LEN..]))
            .collect();
        assert!(segs.len() > 40, "{} segments", segs.len());
        assert!(segs.iter().all(|f| f.len() <= VNET_HDR_LEN + 1514));

        // With TSO4 offload it arrives as one frame carrying GSO metadata.
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
            .unwrap();
        v1.send(&msg);
        let whole: Vec<_> = read_tap_frames(&mut tap, Duration::from_millis(400))
            .into_iter()
            .filter(|f| is_tso_test(&f[VNET_HDR_LEN..]))
            .collect();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].len(), VNET_HDR_LEN + frame.len());
        assert_eq!(whole[0][1], 1, "gso_type TCPV4");
        assert_eq!(whole[0][VNET_HDR_LEN..], frame[..]);

        // And the guest direction: a GSO frame written to the TAP crosses whole
        // to the veth (which keeps GSO) — the host never splits it.
        let v1_plain = PacketSocket::bind("v1", true);
        let mut vhdr = [0u8; VNET_HDR_LEN];
        vhdr[..10].copy_from_slice(&hdr);
        write_tap(&mut tap, &frame, vhdr);
        let got = v1_plain.recv_matching(10, is_tso_test, Duration::from_millis(400));
        let bytes: usize = got.iter().map(|f| f.len() - 10 - 54).sum();
        assert_eq!(bytes, 64_000, "payload crossed ({} frames)", got.len());
        assert_eq!(got.len(), 1, "crossed as one GSO frame");
    });
}

#[test]
fn created_tap_gets_the_given_mac_so_a_recreated_one_keeps_the_bridge_mac() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("mac");
    ns.ip("link add br0 type bridge");
    ns.ip("link set br0 up");
    ns.ip("tuntap add wpers mode tap");
    let mac: devices::net::MacAddr = "fe:54:00:77:00:0c".parse().unwrap();
    ns.enter(|| {
        let mut bridge_macs = Vec::new();
        for _ in 0..2 {
            // As a VMM and then its restored successor: the TAP is created,
            // joins the bridge (its only port) and is deleted again.
            let (tap, port) = open_tap("wmac0", Some("br0"), None, Some(mac)).unwrap();
            assert!(tap.created());
            assert_eq!(ifctl::mac("wmac0").unwrap(), mac.bytes());
            bridge_macs.push(ifctl::mac("br0").unwrap());
            drop(port);
            drop(tap);
            assert_eq!(ifctl::if_index("wmac0").unwrap(), None);
        }
        assert_eq!(bridge_macs, [mac.bytes(), mac.bytes()], "bridge MAC kept");

        let own = ifctl::mac("wpers").unwrap();
        let (tap, _port) = open_tap("wpers", Some("br0"), None, Some(mac)).unwrap();
        assert!(!tap.created());
        assert_eq!(
            ifctl::mac("wpers").unwrap(),
            own,
            "a persistent TAP keeps its MAC"
        );
    });
}

#[test]
fn teardown_removes_created_tap_and_keeps_persistent_one() {
    if !privileged() {
        return;
    }
    let ns = Netns::with_bridge("down");
    ns.ip("tuntap add wpers mode tap");
    ns.enter(|| {
        let (tap, port) = open_tap("wtap0", Some("br0"), Some(9000), None).unwrap();
        assert_eq!(ifctl::mtu("wtap0").unwrap(), 9000);
        let mut port = port.unwrap();
        assert_eq!((port.bridge(), port.tap()), ("br0", "wtap0"));
        port.teardown().unwrap();
        assert!(!port.is_attached());
        port.teardown().unwrap();
        drop(tap);
        assert_eq!(
            ifctl::if_index("wtap0").unwrap(),
            None,
            "created TAP deleted"
        );

        let (tap, port) = open_tap("wpers", Some("br0"), None, None).unwrap();
        assert!(!tap.created());
        drop(port);
        drop(tap);
        assert!(
            ifctl::if_index("wpers").unwrap().is_some(),
            "persistent TAP kept"
        );
        // Detached: it can be attached again.
        let tap = TapDevice::open("wpers").unwrap();
        let _port = BridgePort::attach(&tap, "br0").unwrap();
    });
    let ports = ns.ip("-o link show master br0");
    assert!(ports.contains("v0") && !ports.contains("wpers"), "{ports}");
}

#[test]
fn setup_errors_are_clear() {
    if !privileged() {
        return;
    }
    let ns = Netns::with_bridge("errs");
    ns.enter(|| {
        let err = open_tap("wtap0", Some("nobr"), None, None).unwrap_err();
        assert!(
            matches!(err, SetupError::Bridge(BridgeError::NoSuchBridge { .. })),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "Bridge nobr does not exist (attaching TAP wtap0)"
        );

        let err = open_tap("wtap1", Some("v1"), None, None).unwrap_err();
        assert!(
            matches!(err, SetupError::Bridge(BridgeError::NotABridge { .. })),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "Interface v1 is not a Linux bridge (attaching TAP wtap1)"
        );

        let _held = TapDevice::open("wbusy").unwrap();
        let err = TapDevice::open("wbusy").unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err}");
        assert_eq!(err.to_string(), "TAP wbusy is in use by another process");

        let err = TapDevice::open("v1").unwrap_err();
        assert!(matches!(err, TapError::NotTap { .. }), "{err}");

        let err = open_tap("bad/name", Some("br0"), None, None).unwrap_err();
        assert!(
            err.to_string().starts_with("Invalid TAP name 'bad/name'"),
            "{err}"
        );

        let tap = TapDevice::open("wtap2").unwrap();
        let err = BridgePort::attach(&tap, "a name").unwrap_err();
        assert!(matches!(err, BridgeError::InvalidName { .. }));
    });
}

mod device {
    //! The virtio-net device model over a real TAP on a bridge.

    use std::sync::Arc;

    use devices::virtio::net::{Net, NetConfig, RxStatus};
    use devices::virtio::{IrqTrigger, VirtioDevice};
    use devices::GuestMemoryMmap;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn guest_traffic_crosses_bridge_with_offloads() {
        if !privileged() {
            return;
        }
        let ns = Netns::with_bridge("dev");
        ns.enter(|| {
            let (tap, _port) = open_tap("wtap0", Some("br0"), None, None).unwrap();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
            let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 64);
            let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 64);
            let mut net =
                Net::new(tap, NetConfig::new("02:00:00:00:00:05".parse().unwrap())).unwrap();
            let bit = |b: u32| 1u64 << b;
            net.set_acked_features(
                bit(VIRTIO_F_VERSION_1)
                    | bit(VIRTIO_NET_F_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_HOST_TSO4)
                    | bit(VIRTIO_NET_F_MRG_RXBUF),
            );
            let irq = Arc::new(IrqTrigger::new(EventFd::new(0).unwrap()));
            let queues: Vec<Queue> = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
            let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
            net.activate(mem.clone(), irq, queues, evts).unwrap();
            let v1 = PacketSocket::bind("v1", true);

            // TX: a 64 KiB TSO frame in three descriptors leaves as one GSO frame.
            let (hdr10, frame) = tso_frame(64_000);
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[..10].copy_from_slice(&hdr10);
            mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
            mem.write_slice(&frame[..1000], GuestAddress(0x20_0000))
                .unwrap();
            mem.write_slice(&frame[1000..], GuestAddress(0x30_0000))
                .unwrap();
            let descs = [
                (0x10_0000u64, VNET_HDR_LEN as u32),
                (0x20_0000, 1000),
                (0x30_0000, (frame.len() - 1000) as u32),
            ];
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(a, l))| {
                    let flags = if i < 2 { VRING_DESC_F_NEXT as u16 } else { 0 };
                    RawDescriptor::from(SplitDescriptor::new(a, l, flags, i as u16 + 1))
                })
                .collect();
            txq.add_desc_chains(&raw, 0).unwrap();
            assert_eq!(net.process_tx().unwrap(), 1);
            let got = v1.recv_matching(10, is_tso_test, Duration::from_millis(400));
            assert_eq!(got.len(), 1, "one GSO frame on the veth");
            assert_eq!(got[0][10..], frame[..]);
            assert_eq!(got[0][1], 1, "still GSO TCPV4");

            // RX: the same frame sent from the veth reaches the guest whole,
            // in merged 4 KiB buffers, because the guest accepted TSO4.
            let raw: Vec<RawDescriptor> = (0..20u64)
                .map(|i| {
                    RawDescriptor::from(SplitDescriptor::new(
                        0x100_0000 + i * 0x1000,
                        4096,
                        VRING_DESC_F_WRITE as u16,
                        0,
                    ))
                })
                .collect();
            rxq.add_desc_chains(&raw, 0).unwrap();
            let mut msg = hdr10.clone();
            msg.extend(&frame);
            v1.send(&msg);
            let total = VNET_HDR_LEN + frame.len();
            let nbufs = total.div_ceil(4096);
            let read_buf = |i: u64| {
                let mut b = vec![0u8; 4096];
                mem.read_slice(&mut b, GuestAddress(0x100_0000 + i * 0x1000))
                    .unwrap();
                b
            };
            // Other frames (none expected, but the kernel may send some) come
            // first; find ours by its header.
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut start = None;
            let mut next = 0u64;
            while start.is_none() && Instant::now() < deadline {
                assert_ne!(net.process_rx().unwrap(), RxStatus::NeedBuffers);
                let used = u64::from(rxq.used().idx().load());
                while next < used {
                    let b = read_buf(next);
                    let n = u64::from(u16::from_le_bytes([b[10], b[11]])).max(1);
                    if b[1] == 1 && n as usize == nbufs {
                        start = Some(next);
                        break;
                    }
                    next += n;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let start = start.expect("TSO frame delivered whole to the guest");
            let mut got = Vec::new();
            for i in start..start + nbufs as u64 {
                got.extend(read_buf(i));
            }
            got.truncate(total);
            assert_eq!(got[1], 1, "GSO TCPV4 kept for the guest");
            assert_eq!(got[VNET_HDR_LEN..], frame[..]);
            let m = net.metrics().snapshot();
            assert_eq!((m.tx_frames, m.rx_dropped, m.rx_malformed), (1, 0, 0));
        });
    }

    #[test]
    fn deleted_tap_does_not_spin_the_event_loop() {
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::Mutex;
        if !privileged() {
            return;
        }
        let ns = Netns::with_bridge("del");
        ns.enter(|| {
            let (tap, _port) = open_tap("wtap0", Some("br0"), None, None).unwrap();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
            let mut net =
                Net::new(tap, NetConfig::new("02:00:00:00:00:06".parse().unwrap())).unwrap();
            net.set_acked_features(1 << VIRTIO_F_VERSION_1);
            let irq = Arc::new(IrqTrigger::new(EventFd::new(0).unwrap()));
            let queues: Vec<Queue> = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
            let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
            net.activate(mem.clone(), irq, queues, evts).unwrap();
            let net = Arc::new(Mutex::new(net));
            let mut em: EventManager<Arc<Mutex<Net<TapDevice>>>> = EventManager::new().unwrap();
            em.add_subscriber(net.clone());
            em.run_with_timeout(100).unwrap();
            let st = Command::new("ip")
                .args(["link", "del", "wtap0"])
                .status()
                .unwrap();
            assert!(st.success());
            // The error is reported once, then the TAP is no longer watched.
            let mut events = 0;
            for _ in 0..5 {
                events += em.run_with_timeout(20).unwrap();
            }
            assert!(events <= 1, "{events} events: the loop spins on a dead TAP");
            assert_eq!(net.lock().unwrap().metrics().snapshot().rx_tap_errors, 1);
        });
    }
}
