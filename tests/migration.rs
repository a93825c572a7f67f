// SPDX-License-Identifier: Apache-2.0
//! Live migration between two real `wisp` processes: the test guest keeps a
//! counter and a memory pattern it verifies itself, and writes to a shared
//! disk; it is moved over `unix:` and `tcp:` (loopback), with 1 and 2 vCPUs,
//! idle and write-heavy, back and forth; cancelled, interrupted by a killed
//! receiver, refused by a mismatched receiver, and fed a bad stream. With a
//! NIC on a bridge (in a network namespace) the receiver takes the TAP over:
//! the guest answers ping after a unix migration and receives every one of
//! 1000 frames streamed across a tcp migration. A receiver that vanishes
//! right after the commit leaves the source paused until an operator resumes
//! it.

mod harness;
mod perms;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use harness::{
    continues_with, guest, http, last_tick, partial_line, spawn, wait, wait_for_api, wait_tick,
    TempDir,
};

struct Vm {
    sock: PathBuf,
    log: PathBuf,
    child: Child,
}

/// `run --api-sock DIR/TAG.sock --serial file=DIR/TAG.log` and the two paths.
fn base_args(dir: &TempDir, tag: &str) -> (PathBuf, PathBuf, Vec<String>) {
    let sock = dir.path(&format!("{tag}.sock"));
    let log = dir.path(&format!("{tag}.log"));
    let args = vec![
        "run".into(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--serial".into(),
        format!("file={}", log.display()),
    ];
    (sock, log, args)
}

/// Spawns wisp with `args` (through `spawn_fn`) and waits for its API.
fn start(sock: PathBuf, log: PathBuf, args: &[String], spawn_fn: impl Fn(&[&str]) -> Child) -> Vm {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn_fn(&a);
    wait_for_api(&sock);
    Vm { sock, log, child }
}

fn boot_args(cpus: &str, mem: &str, cmdline: &str) -> Vec<String> {
    let g = guest();
    [
        "--kernel",
        g.to_str().unwrap(),
        "--cpus",
        cpus,
        "--memory",
        mem,
        "--cmdline",
        cmdline,
    ]
    .map(String::from)
    .to_vec()
}

fn source(dir: &TempDir, tag: &str, cpus: &str, cmdline: &str, extra: &[String]) -> Vm {
    let (sock, log, mut args) = base_args(dir, tag);
    args.extend(boot_args(cpus, "256M", cmdline));
    args.extend(extra.iter().cloned());
    start(sock, log, &args, spawn)
}

fn receiver(dir: &TempDir, tag: &str, uri: &str, cpus: &str, mem: &str, extra: &[String]) -> Vm {
    let (sock, log, mut args) = base_args(dir, tag);
    args.extend(["--incoming", uri, "--cpus", cpus, "--memory", mem].map(String::from));
    args.extend(extra.iter().cloned());
    start(sock, log, &args, spawn)
}

fn migrate(sock: &Path, uri: &str, max_downtime_ms: u64) {
    migrate_at(sock, uri, max_downtime_ms, None)
}

fn migrate_at(sock: &Path, uri: &str, max_downtime_ms: u64, mib_s: Option<u64>) {
    let bw = mib_s
        .map(|b| format!(r#", "max_bandwidth_mib_s": {b}"#))
        .unwrap_or_default();
    let body = format!(r#"{{"uri": "{uri}", "max_downtime_ms": {max_downtime_ms}{bw}}}"#);
    let (c, b) = http(sock, "PUT", "/migration/send", Some(&body));
    assert_eq!(c, 204, "{b}");
}

fn status(sock: &Path) -> serde_json::Value {
    let (c, b) = http(sock, "GET", "/migration", None);
    assert_eq!(c, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

/// Waits up to `secs` for `GET /migration` to report `state`.
fn wait_state(sock: &Path, state: &str, secs: u64) {
    let start = Instant::now();
    while status(sock)["state"] != state {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{}",
            status(sock)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Moves a ticking guest from a new source to a new receiver and checks it
/// goes on there; returns the receiver (still running).
fn move_guest(dir: &TempDir, uri: &str, cpus: &str, cmdline: &str, max_downtime_ms: u64) -> Vm {
    let a = source(dir, "src", cpus, cmdline, &[]);
    let b = receiver(dir, "dst", uri, cpus, "256M", &[]);
    wait_tick(&a.log, 10);
    migrate(&a.sock, uri, max_downtime_ms);
    let r = wait(a.child, Duration::from_secs(120));
    r.assert_no_panic();
    assert_eq!(r.code, Some(0), "source: {}", r.stderr);
    assert!(r.stderr.contains("was migrated to"), "{}", r.stderr);
    let at = last_tick(&a.log);
    let tail = partial_line(&a.log);
    wait_tick(&b.log, at + 10);
    let text = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        continues_with(&tail, &text, at + 1),
        "receiver did not continue from {at}:\n{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
    b
}

#[test]
fn test_migrate_over_unix_idle_guest() {
    require_kvm!();
    let dir = TempDir::new("mig-unix");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let b = move_guest(&dir, &uri, "1", "tests=tick tick_ms=20 verify_every=5", 100);
    let (c, body) = http(&b.sock, "GET", "/", None);
    assert_eq!(c, 200);
    assert!(body.contains("Running"), "{body}");
    let _ = b.child;
}

#[test]
fn test_migrate_over_tcp_busy_guest_2_vcpus() {
    require_kvm!();
    let dir = TempDir::new("mig-tcp");
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let b = move_guest(
        &dir,
        &uri,
        "2",
        "tests=tick tick_ms=5 dirty_pages_per_tick=64 verify_every=5 tick_aps=1",
        500,
    );
    let _ = b.child;
}

#[test]
fn test_migrate_back_and_forth_with_shared_disk() {
    require_kvm!();
    let dir = TempDir::new("mig-disk");
    let img = dir.path("shared.img");
    harness::make_pattern_image(&img, 8 << 20, harness::PATTERN_DISK1);
    let disk = vec![
        "--disk".to_string(),
        format!("path={},id=data", img.display()),
    ];
    let cmd = "tests=blk_write_tick tick_ms=20 tick_count=400 pattern_mib=8 verify_every=5";
    let a = source(&dir, "a", "1", cmd, &disk);
    wait_tick(&a.log, 5);
    let mut current = a;
    for hop in 0..2 {
        let uri = format!("unix:{}", dir.path(&format!("mig{hop}.sock")).display());
        let next = receiver(&dir, &format!("hop{hop}"), &uri, "1", "256M", &disk);
        migrate(&current.sock, &uri, 200);
        let r = wait(current.child, Duration::from_secs(120));
        assert_eq!(r.code, Some(0), "hop {hop}: {}", r.stderr);
        let at = last_tick(&current.log);
        wait_tick(&next.log, at + 5);
        current = next;
    }
    // Writes made after the last hop land in the shared image.
    let at = last_tick(&current.log);
    let off = (2048 + at % 64) * 512;
    let mut buf = vec![0u8; 512];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    assert!(
        harness::has_pattern(&buf, off, 0x7469_636b_0000_0000 ^ at),
        "tick {at} not on disk"
    );
    let text = std::fs::read_to_string(&current.log).unwrap();
    assert!(!text.contains("FAIL"), "{text}");
}

/// A guest with 64 MiB of data to copy, migrated at 16 MiB/s: several seconds
/// of pre-copy, a wide window to cancel or break it.
const HEAVY: &str = "tests=tick tick_ms=5 dirty_pages_per_tick=64 pattern_mib=64 verify_every=50";

fn wait_progress(sock: &Path, bytes: u64) {
    let start = Instant::now();
    while status(sock)["transferred_bytes"].as_u64().unwrap_or(0) < bytes {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            status(sock)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_cancel_midway_source_keeps_running() {
    require_kvm!();
    let dir = TempDir::new("mig-cancel");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let a = source(&dir, "src", "1", HEAVY, &[]);
    let b = receiver(&dir, "dst", &uri, "1", "256M", &[]);
    wait_tick(&a.log, 20);
    migrate_at(&a.sock, &uri, 1, Some(16));
    wait_progress(&a.sock, 8 << 20);
    let (c, body) = http(&a.sock, "PUT", "/migration/cancel", None);
    assert_eq!(c, 204, "{body}");
    wait_state(&a.sock, "Cancelled", 30);
    let r = wait(b.child, Duration::from_secs(30));
    assert!(
        r.code.is_some_and(|c| c != 0),
        "receiver: {:?} {}",
        r.code,
        r.stderr
    );
    let at = last_tick(&a.log);
    wait_tick(&a.log, at + 20);
    let (c, body) = http(&a.sock, "GET", "/", None);
    assert_eq!(c, 200);
    assert!(body.contains("Running"), "{body}");
    let _ = a.child;
}

#[test]
fn test_receiver_killed_midway_source_keeps_running() {
    require_kvm!();
    let dir = TempDir::new("mig-kill");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let a = source(&dir, "src", "1", HEAVY, &[]);
    let mut b = receiver(&dir, "dst", &uri, "1", "256M", &[]);
    wait_tick(&a.log, 20);
    migrate_at(&a.sock, &uri, 1, Some(16));
    wait_progress(&a.sock, 8 << 20);
    b.child.kill().unwrap();
    let _ = b.child.wait();
    wait_state(&a.sock, "Failed", 60);
    let at = last_tick(&a.log);
    wait_tick(&a.log, at + 20);
    let text = std::fs::read_to_string(&a.log).unwrap();
    assert!(!text.contains("FAIL"), "{text}");
    let _ = a.child;
}

#[test]
fn test_mismatched_receiver_refuses_before_anything_moves() {
    require_kvm!();
    let dir = TempDir::new("mig-mismatch");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let a = source(
        &dir,
        "src",
        "1",
        "tests=tick tick_ms=20 verify_every=5",
        &[],
    );
    let b = receiver(&dir, "dst", &uri, "2", "512M", &[]);
    wait_tick(&a.log, 5);
    migrate(&a.sock, &uri, 100);
    let r = wait(b.child, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    wait_state(&a.sock, "Failed", 30);
    let s = status(&a.sock);
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("refused") || err.contains("Refused"), "{s}");
    assert!(err.contains("vCPU") || err.contains("memory"), "{s}");
    let at = last_tick(&a.log);
    wait_tick(&a.log, at + 5);
    let _ = a.child;
}

#[test]
fn test_bad_stream_and_bad_uri() {
    require_kvm!();
    let dir = TempDir::new("mig-bad");
    let path = dir.path("mig.sock");
    let uri = format!("unix:{}", path.display());
    let b = receiver(&dir, "dst", &uri, "1", "256M", &[]);
    // The listener accepts one connection: wait for its file, do not probe it.
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no migration socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\nthis is not a migration stream")
            .unwrap();
    }
    let r = wait(b.child, Duration::from_secs(30));
    r.assert_no_panic();
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("Incoming migration failed"),
        "{}",
        r.stderr
    );
    // Bad URIs are refused up front.
    let r = harness::run(
        &["run", "--incoming", "ftp:somewhere"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("ftp:somewhere"), "{}", r.stderr);
    let a = source(&dir, "src", "1", "tests=tick tick_ms=20", &[]);
    let (c, body) = http(
        &a.sock,
        "PUT",
        "/migration/send",
        Some(r#"{"uri": "carrier-pigeon:1"}"#),
    );
    assert_eq!(c, 400, "{body}");
    let (c, body) = http(&a.sock, "PUT", "/migration/cancel", None);
    assert_eq!(c, 400, "{body}");
    let _ = a.child;
}

/// A guest that dirties its 8 MiB pattern faster than 8 MiB/s can carry.
const DIRTY: &str = "tests=tick tick_ms=2 dirty_pages_per_tick=32 pattern_mib=8 verify_every=20";

fn send_capped(sock: &Path, uri: &str, auto_converge: bool) {
    let body = format!(
        r#"{{"uri": "{uri}", "max_downtime_ms": 5, "max_bandwidth_mib_s": 8, "auto_converge": {auto_converge}}}"#
    );
    let (c, b) = http(sock, "PUT", "/migration/send", Some(&body));
    assert_eq!(c, 204, "{b}");
}

#[test]
fn test_non_converging_migration_gives_up_and_vm_keeps_running() {
    require_kvm!();
    let dir = TempDir::new("mig-noconv");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let a = source(&dir, "src", "1", DIRTY, &[]);
    let b = receiver(&dir, "dst", &uri, "1", "256M", &[]);
    wait_tick(&a.log, 20);
    send_capped(&a.sock, &uri, false);
    wait_state(&a.sock, "Failed", 120);
    let s = status(&a.sock);
    let err = s["error"].as_str().unwrap_or("");
    assert!(
        err.contains("did not converge") && err.contains("dirty rate"),
        "{s}"
    );
    let r = wait(b.child, Duration::from_secs(30));
    assert!(r.code.is_some_and(|c| c != 0));
    let at = last_tick(&a.log);
    wait_tick(&a.log, at + 20);
    assert!(!std::fs::read_to_string(&a.log).unwrap().contains("FAIL"));
    let _ = a.child;
}

#[test]
fn test_auto_converge_throttles_and_completes() {
    require_kvm!();
    let dir = TempDir::new("mig-autoconv");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let a = source(&dir, "src", "1", DIRTY, &["--level".into(), "Info".into()]);
    let b = receiver(&dir, "dst", &uri, "1", "256M", &[]);
    wait_tick(&a.log, 20);
    send_capped(&a.sock, &uri, true);
    let r = wait(a.child, Duration::from_secs(180));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("vCPUs throttled"), "{}", r.stderr);
    assert!(r.stderr.contains("was migrated to"), "{}", r.stderr);
    let at = last_tick(&a.log);
    let tail = partial_line(&a.log);
    wait_tick(&b.log, at + 20);
    let text = std::fs::read_to_string(&b.log).unwrap();
    assert!(continues_with(&tail, &text, at + 1), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    let _ = b.child;
}

const NET_MAC: &str = "52:54:00:77:01:0a";

/// A wisp in `ns` with a NIC on TAP `wmig0` (bridge `br0`): a source booting
/// `Ok(cmdline)`, or a receiver on `Err(uri)`.
fn net_vm(ns: &harness::NetNs, dir: &TempDir, tag: &str, boot: Result<&str, &str>) -> Vm {
    let (sock, log, mut args) = base_args(dir, tag);
    args.extend([
        "--net".into(),
        format!("tap=wmig0,mac={NET_MAC},bridge=br0"),
    ]);
    match boot {
        Ok(cmdline) => args.extend(boot_args("1", "256M", cmdline)),
        Err(uri) => args.extend(["--incoming", uri, "--memory", "256M"].map(String::from)),
    }
    start(sock, log, &args, |a| ns.spawn_wisp(a))
}

/// Migrates the guest of `a` to `b` over `uri`; the source must exit 0 with
/// the TAP still on the bridge, now serving the receiver.
fn migrate_net(ns: &harness::NetNs, a: Vm, b: &Vm, uri: &str) {
    migrate(&a.sock, uri, 100);
    let r = wait(a.child, Duration::from_secs(120));
    r.assert_no_panic();
    assert_eq!(r.code, Some(0), "source: {}", r.stderr);
    assert!(r.stderr.contains("was migrated to"), "{}", r.stderr);
    let (c, body) = http(&b.sock, "GET", "/", None);
    assert_eq!(c, 200);
    assert!(body.contains("Running"), "{body}");
    let master = ns.output("ip", &["link", "show", "master", "br0"]);
    assert!(
        master.contains("wmig0"),
        "the TAP left the bridge with the source: {master}"
    );
}

#[test]
fn test_migrate_with_nic_over_unix_guest_answers_ping_on_the_bridge() {
    require_net!();
    let ns = harness::NetNs::new("mignet");
    let dir = TempDir::new("mig-net-unix");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let a = net_vm(
        &ns,
        &dir,
        "src",
        Ok("tests=net_arp_icmp ip=10.77.0.2 net_echo_count=6 net_timeout_s=120"),
    );
    harness::wait_for_text(&a.log, "net_arp_icmp: serving", Duration::from_secs(60));
    let ping = ns.output("ping", &["-c", "3", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("3 received"), "before migration: {ping}");

    let b = net_vm(&ns, &dir, "dst", Err(&uri));
    let b_log = b.log.clone();
    migrate_net(&ns, a, &b, &uri);
    // The guest, now on the receiver, answers on the same bridge; its echo
    // count carries over, so it passes after three more.
    let ping = ns.output("ping", &["-c", "3", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("3 received"), "after migration: {ping}");
    let r = wait(b.child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&b_log).unwrap();
    assert_eq!(r.code, Some(0), "receiver: {}\n{text}", r.stderr);
    assert!(text.contains("PASS net_arp_icmp"), "{text}");
    assert!(
        !ns.has_link("wmig0"),
        "the TAP outlived the VM that ended last"
    );
}

#[test]
fn test_migrate_with_nic_over_tcp_loses_no_frame() {
    require_net!();
    let ns = harness::NetNs::new("mignet");
    let dir = TempDir::new("mig-net-tcp");
    // The namespace's own loopback: both wisps run in it.
    let uri = "tcp:127.0.0.1:47011";
    let a = net_vm(&ns, &dir, "src", Ok("tests=net_rx rx_count=1000"));
    harness::wait_for_text(&a.log, "net_rx: ready", Duration::from_secs(60));
    let b = net_vm(&ns, &dir, "dst", Err(uri));
    let b_log = b.log.clone();
    // 1000 frames 2 ms apart from the host, streaming across the migration:
    // the frames queued while the guest is paused wait in the TAP.
    let pkt = harness::repo_root().join("tests/net/pkt.py");
    let sender = ns
        .cmd("python3")
        .args([pkt.to_str().unwrap(), "send", "vh", "1000", NET_MAC, "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    migrate_net(&ns, a, &b, uri);
    let out = sender.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("sent 1000"));
    let r = wait(b.child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&b_log).unwrap();
    assert_eq!(r.code, Some(0), "receiver: {}\n{text}", r.stderr);
    assert!(text.contains("net_rx: 1000 good, 0 bad"), "{text}");
    assert!(text.contains("PASS net_rx"), "{text}");
}

/// A second wisp given `img` must be refused because the image is locked.
fn assert_disk_locked(img: &Path) {
    let g = guest();
    let disk = format!("path={}", img.display());
    let r = harness::run(
        &["run", "--kernel", g.to_str().unwrap(), "--disk", &disk],
        Duration::from_secs(30),
    );
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains("is locked by another process"),
        "{}",
        r.stderr
    );
}

#[test]
fn test_link_lost_after_go_leaves_source_paused_until_resumed() {
    use vmm::migration::protocol::{read_message, write_message, Hello, Message};
    require_kvm!();
    let dir = TempDir::new("mig-doubt");
    let img = dir.path("shared.img");
    harness::make_pattern_image(&img, 1 << 20, harness::PATTERN_DISK1);
    let disk = vec!["--disk".to_string(), format!("path={}", img.display())];
    let path = dir.path("mig.sock");
    let uri = format!("unix:{}", path.display());
    let a = source(&dir, "src", "1", "tests=tick tick_ms=10", &disk);
    wait_tick(&a.log, 5);
    // A receiver that takes everything, answers Ready, reads the commit (Go)
    // and vanishes before confirming: it may be running the guest.
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    migrate(&a.sock, &uri, 100);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert!(matches!(read_message(&mut s).unwrap(), Message::Hello(_)));
    write_message(&mut s, &Message::Hello(Hello::ours())).unwrap();
    write_message(&mut s, &Message::Challenge { nonce: [3; 32] }).unwrap();
    assert!(matches!(
        read_message(&mut s).unwrap(),
        Message::Auth { .. }
    ));
    write_message(&mut s, &Message::AuthOk { proof: None }).unwrap();
    assert!(matches!(read_message(&mut s).unwrap(), Message::Config(_)));
    write_message(&mut s, &Message::Accept).unwrap();
    while read_message(&mut s).unwrap() != Message::Complete {}
    write_message(&mut s, &Message::Ready).unwrap();
    assert_eq!(read_message(&mut s).unwrap(), Message::Go);
    drop(s);

    wait_state(&a.sock, "Failed", 30);
    let st = status(&a.sock);
    assert!(
        st["error"]
            .as_str()
            .unwrap_or("")
            .contains("outcome unknown"),
        "{st}"
    );
    // Never two running copies: the source stays paused, alive, its disk
    // unlocked for the receiver that may run the guest.
    let at = last_tick(&a.log);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(last_tick(&a.log), at, "the source ran on after Go");
    let (c, body) = http(&a.sock, "GET", "/", None);
    assert_eq!(c, 200);
    assert!(body.contains("Paused"), "{body}");
    // The operator checked the receiver and resumes the source: it takes its
    // disk back and runs on.
    let (c, body) = http(&a.sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204, "{body}");
    wait_tick(&a.log, at + 10);
    assert_disk_locked(&img);
    let text = std::fs::read_to_string(&a.log).unwrap();
    assert!(!text.contains("FAIL"), "{text}");
    let _ = a.child;
}

#[test]
fn test_migration_socket_is_never_reachable_by_others_even_under_umask_000() {
    require_kvm!();
    if !perms::is_root() {
        eprintln!("SKIPPED: needs root to probe the socket as nobody");
        return;
    }
    let dir = TempDir::new("mig-perms");
    let _control = perms::shared_dir(&dir);
    for i in 0..10 {
        let name = format!("mig{i}.sock");
        let path = dir.path(&name);
        let api = dir.path(&format!("api{i}.sock"));
        let mut watch = perms::ModeWatch::new(&dir.0);
        let prober = perms::fork_nobody_prober(&path, Some(Duration::from_secs(20)));
        let uri = format!("unix:{}", path.display());
        let mut child = perms::spawn_umask_000(&[
            "run",
            "--api-sock",
            api.to_str().unwrap(),
            "--incoming",
            &uri,
            "--memory",
            "64M",
        ]);
        watch.until(&name);
        let probe = perms::reap(prober);
        assert_eq!(perms::connect_as_nobody(&path), libc::EACCES);
        if i == 0 {
            // The receiver thread, waiting to accept, is under its filter.
            assert_eq!(
                seccomp_mode_of(child.id(), "wisp-migrate-re"),
                Some(2),
                "receiver thread not sandboxed"
            );
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            probe,
            libc::EACCES,
            "start {i}: nobody reached the migration socket"
        );
        assert!(watch.exposed().is_empty(), "start {i}: {:?}", watch.seen);
    }
}

/// Waits for the receiver's migration socket to appear (without probing it:
/// the listener accepts one connection).
fn wait_for_socket(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no migration socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_receiver_gives_up_on_a_silent_peer() {
    require_kvm!();
    let dir = TempDir::new("mig-silent");
    // From the command line...
    let path = dir.path("mig.sock");
    let uri = format!("unix:{}", path.display());
    let b = receiver(
        &dir,
        "dst",
        &uri,
        "1",
        "256M",
        &["--migration-timeout".into(), "1".into()],
    );
    wait_for_socket(&path);
    let _peer = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let r = wait(b.child, Duration::from_secs(30));
    r.assert_no_panic();
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("Timed out after 1s waiting for the sender's Hello"),
        "{}",
        r.stderr
    );
    // ... and through the API's receive request.
    let (sock, log, args) = base_args(&dir, "api");
    let b = start(sock.clone(), log, &args, spawn);
    let path = dir.path("mig2.sock");
    let body = format!(r#"{{"uri": "unix:{}", "timeout_s": 1}}"#, path.display());
    let (c, body) = http(&sock, "PUT", "/migration/receive", Some(&body));
    assert_eq!(c, 204, "{body}");
    wait_for_socket(&path);
    let _peer = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let r = wait(b.child, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("waiting for the sender's Hello"),
        "{}",
        r.stderr
    );
}

#[test]
fn test_receiver_gives_up_on_a_peer_stalling_mid_frame() {
    use std::io::Write;
    use vmm::migration::protocol::{read_message, write_message, Hello, Message};
    require_kvm!();
    let dir = TempDir::new("mig-stall");
    let path = dir.path("mig.sock");
    let uri = format!("unix:{}", path.display());
    let b = receiver(
        &dir,
        "dst",
        &uri,
        "1",
        "256M",
        &["--migration-timeout".into(), "1".into()],
    );
    wait_for_socket(&path);
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_message(&mut s, &Message::Hello(Hello::ours())).unwrap();
    assert!(matches!(read_message(&mut s).unwrap(), Message::Hello(_)));
    assert!(matches!(
        read_message(&mut s).unwrap(),
        Message::Challenge { .. }
    ));
    // Half an Auth frame, then silence with the connection open.
    let auth = Message::Auth {
        nonce: [0; 32],
        proof: None,
    }
    .encode();
    s.write_all(&auth[..auth.len() / 2]).unwrap();
    let r = wait(b.child, Duration::from_secs(30));
    r.assert_no_panic();
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("Timed out after 1s waiting for the sender's Auth"),
        "{}",
        r.stderr
    );
    // The peer was told why before the receiver closed.
    match read_message(&mut s) {
        Ok(Message::Error { message }) => assert!(message.contains("Timed out"), "{message}"),
        other => panic!("expected an Error, got {other:?}"),
    }
}

/// Writes `token` to DIR/NAME, mode 0600, and returns the path.
fn token_file(dir: &TempDir, name: &str, token: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.path(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Sends `a`'s VM to a fresh receiver started with `receiver_token` (a
/// `--migration-token-file`), the send carrying `send_token_file`; expects
/// it refused: the receiver exits 1 naming `why`, the source keeps running.
fn refused_by_token(
    dir: &TempDir,
    a: &Vm,
    tag: &str,
    receiver_token: Option<&Path>,
    send_token_file: Option<&Path>,
    why: &str,
) {
    let path = dir.path(&format!("{tag}.mig"));
    let uri = format!("unix:{}", path.display());
    let extra: Vec<String> = receiver_token
        .map(|t| vec!["--migration-token-file".into(), t.display().to_string()])
        .unwrap_or_default();
    let b = receiver(dir, tag, &uri, "1", "256M", &extra);
    let tf = send_token_file
        .map(|t| format!(r#", "token_file": "{}""#, t.display()))
        .unwrap_or_default();
    let body = format!(r#"{{"uri": "{uri}", "max_downtime_ms": 100{tf}}}"#);
    let (c, body) = http(&a.sock, "PUT", "/migration/send", Some(&body));
    assert_eq!(c, 204, "{body}");
    let r = wait(b.child, Duration::from_secs(30));
    r.assert_no_panic();
    assert_eq!(r.code, Some(1), "receiver: {}", r.stderr);
    assert!(r.stderr.contains(why), "receiver: {}", r.stderr);
    wait_state(&a.sock, "Failed", 30);
    let st = status(&a.sock);
    assert!(st["error"].as_str().unwrap_or("").contains(why), "{st}");
    assert_eq!(st["pages_sent"], 0, "no memory moved: {st}");
    let at = last_tick(&a.log);
    wait_tick(&a.log, at + 5);
}

#[test]
fn test_migration_token_right_one_migrates_missing_or_wrong_refused() {
    require_kvm!();
    let dir = TempDir::new("mig-token");
    let good = token_file(&dir, "good.token", "2f4e0c55a1b6d4e8a9f3c7b2d1e0f9a8");
    let bad = token_file(&dir, "bad.token", "00000000000000000000000000000000");
    let a = source(
        &dir,
        "src",
        "1",
        "tests=tick tick_ms=20 verify_every=5",
        &[],
    );
    wait_tick(&a.log, 5);
    // The receiver wants a token: none, then a wrong one, is refused.
    refused_by_token(
        &dir,
        &a,
        "r1",
        Some(&good),
        None,
        "the sender presented no migration token",
    );
    refused_by_token(
        &dir,
        &a,
        "r2",
        Some(&good),
        Some(&bad),
        "migration token does not match",
    );
    // The sender wants one and the receiver has none.
    refused_by_token(
        &dir,
        &a,
        "r3",
        None,
        Some(&good),
        "the receiver has no migration token",
    );
    // A world-readable token file is refused up front.
    use std::os::unix::fs::PermissionsExt;
    let open = token_file(&dir, "open.token", "2f4e0c55a1b6d4e8a9f3c7b2d1e0f9a8");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let body = format!(
        r#"{{"uri": "unix:/nonexistent", "token_file": "{}"}}"#,
        open.display()
    );
    let (c, body) = http(&a.sock, "PUT", "/migration/send", Some(&body));
    assert_eq!(c, 400, "{body}");
    assert!(body.contains("chmod 600"), "{body}");
    // The right token on both sides (the source's from the API request).
    let path = dir.path("ok.mig");
    let uri = format!("unix:{}", path.display());
    let b = receiver(
        &dir,
        "dst",
        &uri,
        "1",
        "256M",
        &["--migration-token-file".into(), good.display().to_string()],
    );
    let body = format!(
        r#"{{"uri": "{uri}", "max_downtime_ms": 100, "token_file": "{}"}}"#,
        good.display()
    );
    let (c, body) = http(&a.sock, "PUT", "/migration/send", Some(&body));
    assert_eq!(c, 204, "{body}");
    let r = wait(a.child, Duration::from_secs(120));
    r.assert_no_panic();
    assert_eq!(r.code, Some(0), "source: {}", r.stderr);
    assert!(r.stderr.contains("was migrated to"), "{}", r.stderr);
    let at = last_tick(&a.log);
    wait_tick(&b.log, at + 5);
    let _ = b.child;
}

/// The `Seccomp:` mode (0 none, 2 filter) of `pid`'s thread named `comm`
/// (waits up to 5 s for the thread to exist).
fn seccomp_mode_of(pid: u32, comm: &str) -> Option<u32> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if name.trim_end() == comm {
                let status = std::fs::read_to_string(t.path().join("status")).ok()?;
                return status
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp:"))
                    .and_then(|v| v.trim().parse().ok());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn test_bad_token_files_and_timeouts_refused_up_front() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("mig-badflags");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let open = token_file(&dir, "open.token", "0123456789abcdef");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let short = token_file(&dir, "short.token", "short");
    let absent = dir.path("absent.token");
    for (file, why) in [
        (&open, "chmod 600"),
        (&short, "must be 16 to 4096 bytes"),
        (&absent, "No such file"),
    ] {
        let f = file.to_str().unwrap();
        let r = harness::run(
            &["run", "--api-sock", sock, "--migration-token-file", f],
            Duration::from_secs(10),
        );
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert!(
            r.stderr.contains(f) && r.stderr.contains(why),
            "{}",
            r.stderr
        );
    }
    let r = harness::run(
        &["run", "--api-sock", sock, "--migration-timeout", "0"],
        Duration::from_secs(10),
    );
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("--migration-timeout"), "{}", r.stderr);
    // Through the API: a bad timeout is a 400 naming the field.
    let (sock, log, args) = base_args(&dir, "api2");
    let b = start(sock.clone(), log, &args, spawn);
    let (c, body) = http(
        &sock,
        "PUT",
        "/migration/receive",
        Some(r#"{"uri": "unix:/tmp/x.sock", "timeout_s": 0}"#),
    );
    assert_eq!(c, 400, "{body}");
    assert!(body.contains("timeout_s"), "{body}");
    let _ = b.child;
}
