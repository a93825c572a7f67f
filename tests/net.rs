// SPDX-License-Identifier: Apache-2.0
//! virtio-net over TAP devices on a Linux bridge, with the real `wisp` binary,
//! inside network namespaces the tests create (never the host's interfaces):
//! ARP and ping answered by the guest, a burst of frames of every size reaching
//! a host veth intact, frames injected from the host received intact, two VMs
//! exchanging frames on one bridge (whose forwarding table learns both MACs),
//! TAPs removed after exit, and bad network configuration refused before boot.

mod harness;

use std::process::{Child, Stdio};
use std::time::Duration;

use harness::{guest, wait, LineReader, NetNs};

const MAC_A: &str = "52:54:00:77:00:0a";
const MAC_B: &str = "52:54:00:77:00:0b";

fn vm(ns: &NetNs, tap: &str, mac: &str, cmdline: &str) -> Child {
    let g = guest();
    let net = format!("tap={tap},mac={mac},bridge=br0");
    ns.spawn_wisp(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--net",
        &net,
        "--cmdline",
        cmdline,
    ])
}

fn pkt_py() -> String {
    harness::repo_root()
        .join("tests/net/pkt.py")
        .display()
        .to_string()
}

#[test]
fn test_guest_answers_arp_and_ping_and_tap_is_removed() {
    require_net!();
    let ns = NetNs::new("ping");
    let mut a = vm(
        &ns,
        "wtap0",
        MAC_A,
        "tests=net_arp_icmp ip=10.77.0.2 net_echo_count=3",
    );
    let mut lines = LineReader::new(&mut a);
    lines.wait_line("net_arp_icmp: serving", Duration::from_secs(60));
    assert!(ns.has_link("wtap0"));
    let master = ns.output("ip", &["link", "show", "master", "br0"]);
    assert!(master.contains("wtap0"), "TAP not on the bridge: {master}");
    let ping = ns.output("ping", &["-c", "2", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("2 received"), "{ping}");
    // Before the third echo: after it the guest powers off and the TAP goes.
    let fdb = ns.output("bridge", &["fdb", "show", "br", "br0"]);
    assert!(
        fdb.contains(MAC_A),
        "bridge did not learn the guest's MAC: {fdb}"
    );
    let ping = ns.output("ping", &["-c", "1", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("1 received"), "{ping}");
    let st = a.wait().unwrap();
    let out = lines.rest();
    assert!(st.success(), "{out}");
    assert!(out.contains("PASS net_arp_icmp"), "{out}");
    assert!(!ns.has_link("wtap0"), "the TAP wisp created outlived it");
}

#[test]
fn test_tx_burst_of_every_size_arrives_intact() {
    require_net!();
    let ns = NetNs::new("tx");
    let mut cap = ns
        .cmd("python3")
        .args([&pkt_py(), "capture", "vh", "1455", "90"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cap_lines = LineReader::new(&mut cap);
    cap_lines.wait_line("ready", Duration::from_secs(20));
    // 1455 frames: every size from 60 to 1514 bytes.
    let a = vm(
        &ns,
        "wtap1",
        MAC_A,
        "tests=net_tx_burst burst=1455 mtu=1500 net_tx_delay_ms=200",
    );
    let r = wait(a, Duration::from_secs(120));
    r.assert_code(0);
    r.assert_pass("net_tx_burst");
    let got = cap_lines.wait_line("captured", Duration::from_secs(100));
    assert_eq!(got, "captured 1455 good 0 bad sizes 60..1514");
    let _ = cap.wait();
}

#[test]
fn test_rx_frames_injected_from_host() {
    require_net!();
    let ns = NetNs::new("rx");
    let mut a = vm(&ns, "wtap2", MAC_A, "tests=net_rx rx_count=300");
    let mut lines = LineReader::new(&mut a);
    lines.wait_line("net_rx: ready", Duration::from_secs(60));
    let sent = ns.output("python3", &[&pkt_py(), "send", "vh", "300", MAC_A]);
    assert!(sent.contains("sent 300"), "{sent}");
    let st = a.wait().unwrap();
    let out = lines.rest();
    assert!(st.success(), "{out}");
    assert!(out.contains("PASS net_rx"), "{out}");
    assert!(out.contains("net_rx: 300 good, 0 bad"), "{out}");
}

#[test]
fn test_two_vms_on_one_bridge() {
    require_net!();
    let ns = NetNs::new("two");
    let mut cap = ns
        .cmd("python3")
        .args([&pkt_py(), "capture", "vh", "200", "90"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cap_lines = LineReader::new(&mut cap);
    cap_lines.wait_line("ready", Duration::from_secs(20));
    // B announces itself with one frame, then waits for A's burst.
    let mut b = vm(
        &ns,
        "wtapb",
        MAC_B,
        "tests=net_tx_burst,net_rx burst=1 rx_count=200 rx_ethertype=34997 exit=halt",
    );
    let mut b_lines = LineReader::new(&mut b);
    b_lines.wait_line("net_rx: ready", Duration::from_secs(60));
    // A answers the host's ping, then sends its burst to everyone.
    let mut a = vm(
        &ns,
        "wtapa",
        MAC_A,
        "tests=net_arp_icmp,net_tx_burst ip=10.77.0.2 net_echo_count=2 burst=200 exit=halt",
    );
    let mut a_lines = LineReader::new(&mut a);
    a_lines.wait_line("net_arp_icmp: serving", Duration::from_secs(60));
    let ping = ns.output("ping", &["-c", "2", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("2 received"), "{ping}");
    a_lines.wait_line("PASS net_tx_burst", Duration::from_secs(60));
    b_lines.wait_line("PASS net_rx", Duration::from_secs(60));
    let got = cap_lines.wait_line("captured", Duration::from_secs(100));
    assert!(got.starts_with("captured 200 good 0 bad"), "{got}");
    let fdb = ns.output("bridge", &["fdb", "show", "br", "br0"]);
    assert!(
        fdb.contains(MAC_A) && fdb.contains(MAC_B),
        "forwarding table: {fdb}"
    );
    for (mut c, tap) in [(a, "wtapa"), (b, "wtapb")] {
        // SAFETY: signalling children we spawned (through `ip netns exec`).
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let st = c.wait().unwrap();
        assert_eq!(st.code(), Some(128 + libc::SIGTERM));
        assert!(!ns.has_link(tap), "{tap} left behind after SIGTERM");
    }
    let _ = cap.wait();
}

fn expect_refused(ns: &NetNs, net: &str, needle: &str) {
    let g = guest();
    let c = ns.spawn_wisp(&["run", "--kernel", g.to_str().unwrap(), "--net", net]);
    let r = wait(c, Duration::from_secs(30));
    r.assert_no_panic();
    assert!(r.code.is_some_and(|c| c != 0), "{net} was accepted");
    assert!(
        r.stderr.contains(needle),
        "{net}: stderr lacks '{needle}': {}",
        r.stderr
    );
    assert_eq!(
        r.stderr.trim().lines().count(),
        1,
        "not one line: {}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "the guest ran: {}", r.stdout);
}

#[test]
fn test_bad_network_configuration_refused_before_boot() {
    require_net!();
    let ns = NetNs::new("bad");
    expect_refused(&ns, "tap=wbad0,bridge=nobridge", "nobridge");
    expect_refused(&ns, "tap=wbad0,mac=01:00:5e:00:00:01", "multicast");
    expect_refused(&ns, "tap=wbad0,mac=zz:00", "MAC");
    expect_refused(
        &ns,
        "tap=this-name-is-far-too-long",
        "this-name-is-far-too-long",
    );
    expect_refused(&ns, "tap=wbad0,bridge=vh", "vh");
    assert!(!ns.has_link("wbad0"), "a refused TAP was left behind");
    // A TAP in use by another VMM.
    let mut a = vm(&ns, "wbusy", MAC_A, "tests=cmdline exit=halt");
    let mut lines = LineReader::new(&mut a);
    lines.wait_line("PASS cmdline", Duration::from_secs(60));
    expect_refused(&ns, "tap=wbusy", "wbusy");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    let _ = a.wait();
}

#[test]
fn test_linux_guest_ping_across_bridge() {
    require_net!();
    if harness::host_is_pvm() {
        eprintln!("SKIPPED: {}", harness::PVM_LINUX_SKIP);
        return;
    }
    let ns = NetNs::new("linux");
    let (kernel, initrd) = harness::linux_guest();
    let c = ns.spawn_wisp(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--net",
        &format!("tap=wlin0,mac={MAC_A},bridge=br0"),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 wisp.test=net wisp.ip=10.77.0.2/24 wisp.peer=10.77.0.1",
    ]);
    let r = wait(c, Duration::from_secs(600));
    r.assert_code(0);
    assert!(r.stdout.contains("WISP-LINUX-NET-OK"), "{}", r.stdout);
}
