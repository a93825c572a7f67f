// SPDX-License-Identifier: Apache-2.0
//! Snapshot save and restore with the real `wisp` binary: the test guest keeps
//! a counter and a memory pattern (verified by the guest itself) and writes to
//! its disk; after pause, snapshot, kill and restore in a new process it goes on
//! where it was. Also: both copies running, repeated cycles, Diff on top of
//! Full, 1 and 2 vCPUs, 128 MiB and 2 GiB, and every kind of bad snapshot.
//! `snapshot/crash.rs`: creates killed at every step, and file safety.

#[path = "snapshot/crash.rs"]
mod crash;
mod harness;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use harness::{
    continues_with, guest, http, last_tick, partial_line, spawn, wait, wait_for_api, wait_for_text,
    wait_tick, TempDir,
};

struct Vm {
    sock: PathBuf,
    log: PathBuf,
    child: Child,
}

fn boot(dir: &TempDir, tag: &str, cpus: u32, mem_mib: u64, cmdline: &str, extra: &[&str]) -> Vm {
    let sock = dir.path(&format!("{tag}.sock"));
    let log = dir.path(&format!("{tag}.log"));
    let g = guest();
    let mut args = vec![
        "run".to_string(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--serial".into(),
        format!("file={}", log.display()),
        "--kernel".into(),
        g.display().to_string(),
        "--cpus".into(),
        cpus.to_string(),
        "--memory".into(),
        format!("{mem_mib}M"),
        "--cmdline".into(),
        cmdline.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn(&a);
    wait_for_api(&sock);
    Vm { sock, log, child }
}

fn restore(dir: &TempDir, tag: &str, snap: &Path, mem: &Path) -> Vm {
    let sock = dir.path(&format!("{tag}.sock"));
    let log = dir.path(&format!("{tag}.log"));
    let child = spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial",
        &format!("file={}", log.display()),
        "--restore",
        snap.to_str().unwrap(),
        "--mem",
        mem.to_str().unwrap(),
    ]);
    wait_for_api(&sock);
    Vm { sock, log, child }
}

fn pause(sock: &Path) {
    let (c, b) = http(sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(c, 204, "{b}");
}

fn snapshot(sock: &Path, kind: &str, snap: &Path, mem: &Path) {
    let (c, b) = try_snapshot(sock, kind, snap, mem);
    assert_eq!(c, 204, "{b}");
}

/// PUT /snapshot/create; (status, body), status 0 if wisp died first.
fn try_snapshot(sock: &Path, kind: &str, snap: &Path, mem: &Path) -> (u16, String) {
    http(
        sock,
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.display(),
            mem.display()
        )),
    )
}

/// PUT /snapshot/load (not resumed); (status, body).
fn try_load(sock: &Path, snap: &Path, mem: &Path) -> (u16, String) {
    http(
        sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
            snap.display(),
            mem.display()
        )),
    )
}

/// Names in `dir` of temporaries a snapshot create writes.
fn temps(dir: &TempDir) -> Vec<String> {
    std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".wisp-tmp."))
        .collect()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

const TICK: &str = "tests=tick tick_ms=20 tick_count=150 verify_every=5 pattern_mib=16";

fn round_trip(cpus: u32, mem_mib: u64) {
    let dir = TempDir::new(&format!("snap-{cpus}-{mem_mib}"));
    let a = boot(&dir, "a", cpus, mem_mib, TICK, &[]);
    wait_tick(&a.log, 20);
    pause(&a.sock);
    let at = last_tick(&a.log);
    let tail = partial_line(&a.log);
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    snapshot(&a.sock, "Full", &snap, &mem);
    kill(a.child);
    // The memory file is sparse: far less allocated than the guest's RAM.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&mem).unwrap();
    // Guest RAM, then the one-page trailer binding it to the state file.
    assert_eq!(m.len(), (mem_mib << 20) + 4096);
    // Neither file is readable by other users.
    assert_eq!((mode(&snap), mode(&mem)), (0o600, 0o600));
    assert!(
        m.blocks() * 512 < (64 << 20),
        "memory file not sparse: {} bytes allocated",
        m.blocks() * 512
    );

    let b = restore(&dir, "b", &snap, &mem);
    let r = wait(b.child, Duration::from_secs(120));
    r.assert_no_panic();
    r.assert_code(0);
    let text = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        continues_with(&tail, &text, at + 1),
        "restored guest did not continue from tick {at}:\n{text}"
    );
    assert!(text.contains("PASS tick"), "{text}");
}

#[test]
fn test_snapshot_restore_1_vcpu_128m() {
    require_kvm!();
    round_trip(1, 128);
}

#[test]
fn test_snapshot_restore_2_vcpus_2g() {
    require_kvm!();
    round_trip(2, 2048);
}

#[test]
fn test_both_copies_run_and_repeated_cycles() {
    require_kvm!();
    let dir = TempDir::new("snap-both");
    let a = boot(
        &dir,
        "a",
        1,
        128,
        "tests=tick tick_ms=20 verify_every=5",
        &[],
    );
    wait_tick(&a.log, 10);
    let mut current = a;
    let mut prev: Vec<Vm> = Vec::new();
    for cycle in 0..3 {
        pause(&current.sock);
        let at = last_tick(&current.log);
        let tail = partial_line(&current.log);
        let snap = dir.path(&format!("c{cycle}.snap"));
        let mem = dir.path(&format!("c{cycle}.mem"));
        snapshot(&current.sock, "Full", &snap, &mem);
        // The original resumes too: both copies run.
        let (c, b) = http(
            &current.sock,
            "PATCH",
            "/vm",
            Some(r#"{"state": "Resumed"}"#),
        );
        assert_eq!(c, 204, "{b}");
        let next = restore(&dir, &format!("r{cycle}"), &snap, &mem);
        wait_tick(&next.log, at + 5);
        wait_tick(&current.log, at + 5);
        let text = std::fs::read_to_string(&next.log).unwrap();
        assert!(
            continues_with(&tail, &text, at + 1),
            "cycle {cycle}:\n{text}"
        );
        assert!(!text.contains("FAIL"), "{text}");
        prev.push(std::mem::replace(&mut current, next));
    }
    for v in prev.into_iter().chain(std::iter::once(current)) {
        let text = std::fs::read_to_string(&v.log).unwrap();
        assert!(!text.contains("FAIL"), "{text}");
        kill(v.child);
    }
}

#[test]
fn test_diff_snapshot_on_top_of_full() {
    require_kvm!();
    let dir = TempDir::new("snap-diff");
    let sock = dir.path("a.sock");
    let log = dir.path("a.log");
    let child = spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial",
        &format!("file={}", log.display()),
    ]);
    wait_for_api(&sock);
    let g = guest();
    let (c, b) = http(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "tests=tick tick_ms=20 tick_count=200 verify_every=5 dirty_pages_per_tick=8"}}"#,
            g.display()
        )),
    );
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}"#),
    );
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(c, 204, "{b}");
    wait_tick(&log, 10);
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    pause(&sock);
    snapshot(&sock, "Full", &snap, &mem);
    let (c, _) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204);
    wait_tick(&log, last_tick(&log) + 20);
    pause(&sock);
    let at = last_tick(&log);
    let tail = partial_line(&log);
    let full_size = std::fs::metadata(&mem).unwrap().len();
    snapshot(&sock, "Diff", &snap, &mem);
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), full_size);
    // A Diff applies only to the memory file of the VM's last snapshot:
    // after a Full elsewhere, vm.mem is refused untouched (still paused at
    // the same point, so every pair below holds the same guest state).
    let (s3, m3) = (dir.path("three.snap"), dir.path("three.mem"));
    snapshot(&sock, "Full", &s3, &m3);
    let before = std::fs::read(&mem).unwrap();
    let (c, b) = try_snapshot(&sock, "Diff", &snap, &mem);
    assert_eq!(c, 400, "{b}");
    assert!(b.contains("is not that file"), "{b}");
    assert!(std::fs::read(&mem).unwrap() == before);
    // The refusal kept the base: a Diff onto three.mem works.
    snapshot(&sock, "Diff", &s3, &m3);
    kill(child);
    let b = restore(&dir, "b", &snap, &mem);
    let r = wait(b.child, Duration::from_secs(120));
    r.assert_code(0);
    let text = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        continues_with(&tail, &text, at + 1),
        "did not continue from {at}:\n{text}"
    );
    assert!(text.contains("PASS tick"), "{text}");
}

#[test]
fn test_disk_writes_after_restore_land() {
    require_kvm!();
    let dir = TempDir::new("snap-disk");
    let img = dir.path("disk.img");
    harness::make_pattern_image(&img, 8 << 20, harness::PATTERN_DISK1);
    let a = boot(
        &dir,
        "a",
        1,
        128,
        "tests=blk_write_tick tick_ms=20 tick_count=60 pattern_mib=0",
        &["--disk", &format!("path={}", img.display())],
    );
    wait_tick(&a.log, 10);
    pause(&a.sock);
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    snapshot(&a.sock, "Full", &snap, &mem);
    kill(a.child);
    let b = restore(&dir, "b", &snap, &mem);
    let r = wait(b.child, Duration::from_secs(120));
    r.assert_code(0);
    let text = std::fs::read_to_string(&b.log).unwrap();
    assert!(text.contains("PASS blk_write_tick"), "{text}");
    // The last tick's sector, written after the restore, is in the image.
    // Tick 60 writes sector 2048 + 60 % 64.
    let off = (2048 + 60) * 512u64;
    let mut buf = vec![0u8; 512];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    assert!(harness::has_pattern(&buf, off, 0x7469_636b_0000_0000 ^ 60));
}

#[test]
fn test_snapshot_rules_and_bad_files() {
    require_kvm!();
    let dir = TempDir::new("snap-bad");
    let a = boot(
        &dir,
        "a",
        1,
        128,
        "tests=tick tick_ms=20 verify_every=5",
        &[],
    );
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    // Not paused: refused.
    let (c, b) = http(
        &a.sock,
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.display(),
            mem.display()
        )),
    );
    assert_eq!(c, 400);
    assert!(b.contains("paused"), "{b}");
    wait_tick(&a.log, 5);
    pause(&a.sock);
    // Diff without dirty tracking: refused.
    let (c, b) = http(
        &a.sock,
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_type": "Diff", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.display(),
            mem.display()
        )),
    );
    assert_eq!(c, 400);
    assert!(b.contains("dirty page tracking"), "{b}");
    snapshot(&a.sock, "Full", &snap, &mem);
    // Loading into a running VMM: refused.
    let (c, _) = http(
        &a.sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
            snap.display(),
            mem.display()
        )),
    );
    assert_eq!(c, 400);
    kill(a.child);

    let good = std::fs::read(&snap).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "runcated"),
        (
            "corrupt",
            {
                let mut v = good.clone();
                let n = v.len();
                v[n - 10] ^= 0xff;
                v
            },
            "CRC-32",
        ),
        (
            "version",
            {
                let mut v = good.clone();
                v[8] = 0x7f;
                v
            },
            "version",
        ),
        (
            "notsnap",
            b"this is not a snapshot at all, just some text".to_vec(),
            "not a wisp snapshot",
        ),
    ];
    let sock = dir.path("load.sock");
    let child = spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for_api(&sock);
    for (name, bytes, needle) in cases {
        let p = dir.path(&format!("{name}.snap"));
        std::fs::write(&p, bytes).unwrap();
        let (c, b) = http(
            &sock,
            "PUT",
            "/snapshot/load",
            Some(&format!(
                r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
                p.display(),
                mem.display()
            )),
        );
        assert_eq!(c, 400, "{name}: {b}");
        assert!(
            b.to_lowercase().contains(&needle.to_lowercase()),
            "{name}: fault lacks '{needle}': {b}"
        );
        // Still usable.
        let (c, b) = http(&sock, "GET", "/", None);
        assert_eq!(c, 200);
        assert!(b.contains("Not started"), "{b}");
    }
    // A memory file of the wrong size.
    let short = dir.path("short.mem");
    std::fs::File::create(&short)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (c, b) = http(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
            snap.display(),
            short.display()
        )),
    );
    assert_eq!(c, 400, "{b}");
    assert!(
        b.contains("is 67108864 bytes") && b.contains("needs 134221824"),
        "{b}"
    );
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait(child, Duration::from_secs(20));

    // A missing disk is a clear error from the command line too.
    let img = dir.path("gone.img");
    harness::make_pattern_image(&img, 1 << 20, harness::PATTERN_DISK1);
    let a = boot(
        &dir,
        "d",
        1,
        128,
        "tests=tick tick_ms=20",
        &["--disk", &format!("path={}", img.display())],
    );
    wait_tick(&a.log, 3);
    pause(&a.sock);
    let (s2, m2) = (dir.path("d.snap"), dir.path("d.mem"));
    snapshot(&a.sock, "Full", &s2, &m2);
    kill(a.child);
    std::fs::remove_file(&img).unwrap();
    let r = harness::run(
        &[
            "run",
            "--restore",
            s2.to_str().unwrap(),
            "--mem",
            m2.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    r.assert_no_panic();
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("gone.img") && r.stderr.contains("does not exist"),
        "{}",
        r.stderr
    );
    let _ = wait_for_text;
}

/// The VMM after `--restore`, and the serial log lines it must continue.
struct NetRestored {
    vm: Child,
    log: PathBuf,
    at: u64,
    tail: String,
    /// The bridge's MAC address while the first VMM ran.
    bridge_mac: String,
}

fn bridge_mac(ns: &harness::NetNs) -> String {
    ns.output("cat", &["/sys/class/net/br0/address"])
        .trim()
        .to_string()
}

/// Boots the test guest answering ARP/ping for 10.77.0.2 on TAP `tap` (in
/// `ns`'s bridge), pings it, snapshots it, kills the VMM (which removes the
/// TAP) and restores the snapshot in a new process.
fn net_snapshot_and_restore(
    ns: &harness::NetNs,
    dir: &TempDir,
    tap: &str,
    extra: &str,
) -> NetRestored {
    let g = guest();
    let (sock, log) = (dir.path("a.sock"), dir.path("a.log"));
    let net = format!("tap={tap},mac=52:54:00:77:00:0c,bridge=br0");
    let cmdline = format!("tests=tick tick_ms=20 tick_net=1 ip=10.77.0.2 pattern_mib=4 {extra}");
    let a = ns.spawn_wisp(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial",
        &format!("file={}", log.display()),
        "--kernel",
        g.to_str().unwrap(),
        "--net",
        &net,
        "--cmdline",
        &cmdline,
    ]);
    wait_for_api(&sock);
    wait_tick(&log, 5);
    let ping = ns.output("ping", &["-c", "2", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("2 received"), "before: {ping}");
    let bridge_mac = bridge_mac(ns);
    pause(&sock);
    let at = last_tick(&log);
    let tail = partial_line(&log);
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    snapshot(&sock, "Full", &snap, &mem);
    kill(a);
    assert!(!ns.has_link(tap), "TAP outlived the killed VMM");
    let (sock2, log2) = (dir.path("b.sock"), dir.path("b.log"));
    let vm = ns.spawn_wisp(&[
        "run",
        "--api-sock",
        sock2.to_str().unwrap(),
        "--serial",
        &format!("file={}", log2.display()),
        "--restore",
        snap.to_str().unwrap(),
        "--mem",
        mem.to_str().unwrap(),
    ]);
    wait_for_api(&sock2);
    wait_tick(&log2, at + 3);
    let master = ns.output("ip", &["link", "show", "master", "br0"]);
    assert!(master.contains(tap), "TAP not re-attached: {master}");
    NetRestored {
        vm,
        log: log2,
        at,
        tail,
        bridge_mac,
    }
}

impl NetRestored {
    /// Pings the guest three times, checks the guest's output and stops it.
    fn ping_and_finish(self, ns: &harness::NetNs) {
        let ping = ns.output("ping", &["-c", "3", "-W", "5", "10.77.0.2"]);
        assert!(ping.contains("3 received"), "after restore: {ping}");
        let text = std::fs::read_to_string(&self.log).unwrap();
        assert!(continues_with(&self.tail, &text, self.at + 1), "{text}");
        assert!(!text.contains("FAIL"), "{text}");
        kill(self.vm);
    }
}

#[test]
fn test_network_works_after_restore_in_new_process() {
    require_net!();
    let dir = TempDir::new("snap-net");
    let ns = harness::NetNs::new("snap");
    net_snapshot_and_restore(&ns, &dir, "wsnap0", "").ping_and_finish(&ns);
}

/// The bridge's own address is the guest's peer, and the TAP is its only
/// port, so the bridge's MAC is the TAP's. The guest (`net_neigh=1`) answers
/// to the MAC it learnt before the snapshot, as Linux's neighbour cache does:
/// the re-created TAP must carry the same MAC, or the bridge changes its
/// address under the guest and drops every reply.
#[test]
fn test_bridge_mac_and_guest_neighbour_survive_restore() {
    require_net!();
    let dir = TempDir::new("snap-brmac");
    let ns = harness::NetNs::new("snapmac");
    // The host side is the bridge itself: no other port to lend it a MAC.
    for args in [
        &["link", "del", "vh"][..],
        &["addr", "add", "10.77.0.1/24", "dev", "br0"][..],
    ] {
        let out = ns.output("ip", args);
        assert!(out.trim().is_empty(), "ip {args:?}: {out}");
    }
    let r = net_snapshot_and_restore(&ns, &dir, "wsnapm0", "net_neigh=1");
    let (before, after) = (r.bridge_mac.clone(), bridge_mac(&ns));
    let tap_mac = ns.output("cat", &["/sys/class/net/wsnapm0/address"]);
    // A Linux guest pinging the bridge sends to the MAC it cached; if that is
    // stale the bridge drops the requests and the host never ARPs the guest.
    // Model that here: the host must not ARP (which would refresh the guest's
    // cache), so it is given a permanent entry for the guest.
    let args = "neigh replace 10.77.0.2 lladdr 52:54:00:77:00:0c dev br0 nud permanent";
    let out = ns.output("ip", &args.split(' ').collect::<Vec<_>>());
    assert!(out.trim().is_empty(), "ip {args}: {out}");
    r.ping_and_finish(&ns);
    assert_eq!(before, after, "the bridge changed its MAC on restore");
    assert_eq!(
        tap_mac.trim(),
        "fe:54:00:77:00:0c",
        "TAP MAC not derived from the guest's"
    );
}
