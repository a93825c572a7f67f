// SPDX-License-Identifier: Apache-2.0
//! Crash consistency and file safety of snapshot creates (part of the
//! `snapshot` test target): a create killed at every step
//! (`WISP_FAULT_SNAPSHOT`) leaves the old pair or the new one, a mix is
//! refused, the next create removes the temporaries; snapshot files are
//! never written over devices, directories, FIFOs or symbolic links.

use super::*;

/// Which pair a create killed at a step leaves on disk.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Survivor {
    /// The previous snapshot, intact.
    Old,
    /// New memory file, old state file: restore must refuse it.
    Mixed,
    /// The new snapshot, complete.
    New,
}

/// Every fault-injection step of a create (`persist::create::FAULT_STEPS`),
/// what it leaves and how many temporaries.
const FAULT_CASES: &[(&str, Survivor, usize)] = &[
    ("cleaned", Survivor::Old, 0),
    ("mem-created", Survivor::Old, 1),
    ("mem-written", Survivor::Old, 1),
    ("mem-synced", Survivor::Old, 1),
    ("state-written", Survivor::Old, 2),
    ("state-synced", Survivor::Old, 2),
    ("mem-renamed", Survivor::Mixed, 1),
    ("mem-dir-synced", Survivor::Mixed, 1),
    ("state-renamed", Survivor::New, 0),
    ("state-dir-synced", Survivor::New, 0),
];

const FAULT_TICK: &str = "tests=tick tick_ms=20 tick_count=90 verify_every=5 pattern_mib=16";

/// Boots the test guest (1 vCPU, 128 MiB) through the API, with dirty page
/// tracking if asked and `WISP_FAULT_SNAPSHOT=fault`.
fn boot_configured(dir: &TempDir, tag: &str, cmdline: &str, track: bool, fault: &str) -> Vm {
    let sock = dir.path(&format!("{tag}.sock"));
    let log = dir.path(&format!("{tag}.log"));
    let child = harness::die_with_test(&mut std::process::Command::new(harness::wisp()))
        .args(["run", "--api-sock", sock.to_str().unwrap()])
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .env("WISP_FAULT_SNAPSHOT", fault)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn wisp");
    wait_for_api(&sock);
    let put = |path: &str, body: String| {
        let (c, b) = http(&sock, "PUT", path, Some(&body));
        assert_eq!(c, 204, "{path}: {b}");
    };
    put(
        "/boot-source",
        format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{cmdline}"}}"#,
            guest().display()
        ),
    );
    put(
        "/machine-config",
        format!(r#"{{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": {track}}}"#),
    );
    put(
        "/actions",
        r#"{"action_type": "InstanceStart"}"#.to_string(),
    );
    Vm { sock, log, child }
}

/// Boots a guest, takes snapshot 1, lets it run, and has the second create
/// killed (SIGKILL) at `step`. Returns (tick, unfinished line) of each
/// snapshot.
fn kill_second_create(dir: &TempDir, step: &str, kind: &str) -> [(u64, String); 2] {
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let plan = format!("{step}@2");
    let a = boot_configured(dir, "a", FAULT_TICK, kind == "Diff", &plan);
    wait_tick(&a.log, 8);
    pause(&a.sock);
    let first = (last_tick(&a.log), partial_line(&a.log));
    snapshot(&a.sock, "Full", &snap, &mem);
    let (c, b) = http(&a.sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204, "{b}");
    wait_tick(&a.log, first.0 + 10);
    pause(&a.sock);
    let second = (last_tick(&a.log), partial_line(&a.log));
    let (c, b) = try_snapshot(&a.sock, kind, &snap, &mem);
    assert_eq!(
        c, 0,
        "{step}: the create answered ({c} {b}) instead of dying"
    );
    let r = wait(a.child, Duration::from_secs(30));
    assert_eq!(r.code, None, "{step}: wisp was not killed:\n{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("killing wisp after snapshot step {step}")),
        "{step}: {}",
        r.stderr
    );
    [first, second]
}

/// Restores the surviving pair, checks the guest continues from `from` and
/// passes its own checks, and that a create from it cleans the temporaries.
fn restore_survivor(dir: &TempDir, step: &str, from: &(u64, String)) {
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let b = restore(dir, "b", &snap, &mem);
    wait_tick(&b.log, from.0 + 3);
    let text = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        continues_with(&from.1, &text, from.0 + 1),
        "{step}: restored guest did not continue from tick {}:\n{text}",
        from.0
    );
    pause(&b.sock);
    snapshot(
        &b.sock,
        "Full",
        &dir.path("next.snap"),
        &dir.path("next.mem"),
    );
    assert_eq!(temps(dir), Vec::<String>::new(), "{step}: not cleaned");
    let (c, body) = http(&b.sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204, "{body}");
    let r = wait(b.child, Duration::from_secs(120));
    r.assert_code(0);
    let text = std::fs::read_to_string(&b.log).unwrap();
    assert!(text.contains("PASS tick"), "{step}:\n{text}");
}

/// Checks restore refuses the mixed pair, naming both files, and that the
/// next create (from another VM) cleans the temporaries.
fn refuse_mix(dir: &TempDir, step: &str) {
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let r = harness::run(
        &[
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--mem",
            mem.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    r.assert_no_panic();
    assert_eq!(r.code, Some(1), "{step}: a mixed pair was restored");
    assert!(
        r.stderr.contains("are not one snapshot")
            && r.stderr.contains(snap.to_str().unwrap())
            && r.stderr.contains(mem.to_str().unwrap()),
        "{step}: {}",
        r.stderr
    );
    let d = boot(dir, "d", 1, 128, "tests=tick tick_ms=20", &[]);
    wait_tick(&d.log, 2);
    pause(&d.sock);
    snapshot(&d.sock, "Full", &snap, &mem);
    assert_eq!(temps(dir), Vec::<String>::new(), "{step}: not cleaned");
    kill(d.child);
}

#[test]
fn test_create_killed_at_every_step_leaves_old_or_new_pair_never_a_usable_mix() {
    require_kvm!();
    let steps: Vec<&str> = FAULT_CASES.iter().map(|c| c.0).collect();
    assert_eq!(
        steps,
        vmm::persist::create::FAULT_STEPS,
        "cases out of date"
    );
    for &(step, survivor, n_temps) in FAULT_CASES {
        let dir = TempDir::new(&format!("snap-fault-{step}"));
        let [first, second] = kill_second_create(&dir, step, "Full");
        assert_eq!(temps(&dir).len(), n_temps, "{step}: {:?}", temps(&dir));
        match survivor {
            Survivor::Old => restore_survivor(&dir, step, &first),
            Survivor::New => restore_survivor(&dir, step, &second),
            Survivor::Mixed => refuse_mix(&dir, step),
        }
    }
}

#[test]
fn test_diff_create_killed_keeps_old_pair_or_refuses_the_mix() {
    require_kvm!();
    // A Diff is written to a copy of the memory file, then renamed: the same
    // steps, the same guarantee.
    for (step, survivor) in [
        ("mem-written", Survivor::Old),
        ("mem-renamed", Survivor::Mixed),
        ("state-renamed", Survivor::New),
    ] {
        let dir = TempDir::new(&format!("snap-dfault-{step}"));
        let [first, second] = kill_second_create(&dir, step, "Diff");
        match survivor {
            Survivor::Old => restore_survivor(&dir, step, &first),
            Survivor::New => restore_survivor(&dir, step, &second),
            Survivor::Mixed => refuse_mix(&dir, step),
        }
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn test_snapshot_never_writes_over_devices_directories_fifos_or_symlinks() {
    use std::os::unix::fs::FileTypeExt;
    require_kvm!();
    let dir = TempDir::new("snap-safety");
    let a = boot(
        &dir,
        "a",
        1,
        128,
        "tests=tick tick_ms=20 verify_every=5",
        &[],
    );
    wait_tick(&a.log, 3);
    pause(&a.sock);
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let adir = dir.path("adir");
    std::fs::create_dir(&adir).unwrap();
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let target = dir.path("target");
    std::fs::write(&target, b"keep me").unwrap();
    let link = dir.path("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dev_full = Path::new("/dev/full");
    let cases: [(&Path, &str); 4] = [
        (&adir, "is a directory"),
        (&fifo, "is a FIFO"),
        (&link, "is a symbolic link"),
        (dev_full, "is a character device"),
    ];
    for (bad, needle) in cases {
        for (s, m) in [(&snap as &Path, bad), (bad, &mem as &Path)] {
            let (c, b) = try_snapshot(&a.sock, "Full", s, m);
            assert_eq!(c, 400, "{}: {b}", bad.display());
            assert!(
                b.contains(&format!("{} {needle}", bad.display())),
                "{}: fault lacks '{needle}': {b}",
                bad.display()
            );
        }
    }
    // Everything is as it was; nothing was written anywhere.
    assert!(std::fs::metadata(dev_full)
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::metadata(&adir).unwrap().is_dir());
    assert_eq!(std::fs::read_dir(&adir).unwrap().count(), 0);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert!(!snap.exists() && !mem.exists());
    assert_eq!(temps(&dir), Vec::<String>::new());
    // One file for both: refused.
    let (c, b) = try_snapshot(&a.sock, "Full", &snap, &snap);
    assert_eq!(c, 400, "{b}");
    assert!(b.contains("must differ"), "{b}");
    // A directory that does not exist: a client error naming it.
    let (c, b) = try_snapshot(&a.sock, "Full", &dir.path("no/vm.snap"), &mem);
    assert_eq!(c, 400, "{b}");
    assert!(b.contains("does not exist"), "{b}");

    // A good snapshot then, files private.
    snapshot(&a.sock, "Full", &snap, &mem);
    assert_eq!((mode(&snap), mode(&mem)), (0o600, 0o600));
    // Symbolic links in the directory part of a path are followed.
    let real = dir.path("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, dir.path("ldir")).unwrap();
    let (s2, m2) = (dir.path("ldir/x.snap"), dir.path("ldir/x.mem"));
    snapshot(&a.sock, "Full", &s2, &m2);
    assert!(real.join("x.snap").is_file() && real.join("x.mem").is_file());
    kill(a.child);
}

#[test]
fn test_restore_refuses_another_snapshots_memory_file_naming_both() {
    require_kvm!();
    let dir = TempDir::new("snap-pair");
    let a = boot(
        &dir,
        "a",
        1,
        128,
        "tests=tick tick_ms=20 verify_every=5",
        &[],
    );
    wait_tick(&a.log, 3);
    pause(&a.sock);
    // Two good snapshots at different moments.
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    snapshot(&a.sock, "Full", &snap, &mem);
    let (c, b) = http(&a.sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204, "{b}");
    wait_tick(&a.log, last_tick(&a.log) + 3);
    pause(&a.sock);
    let (snap2, mem2) = (dir.path("two.snap"), dir.path("two.mem"));
    snapshot(&a.sock, "Full", &snap2, &mem2);
    kill(a.child);

    let sock = dir.path("load.sock");
    let child = spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for_api(&sock);
    // A state file with another snapshot's memory file: refused, naming both.
    for (s, m) in [(&snap, &mem2), (&snap2, &mem)] {
        let (c, b) = try_load(&sock, s, m);
        assert_eq!(c, 400, "{b}");
        assert!(
            b.contains("are not one snapshot")
                && b.contains(s.to_str().unwrap())
                && b.contains(m.to_str().unwrap()),
            "{b}"
        );
    }
    // Reading from a FIFO or a directory is refused (at once, no hang).
    let (fifo, adir) = (dir.path("fifo"), dir.path("adir"));
    mkfifo(&fifo);
    std::fs::create_dir(&adir).unwrap();
    let (c, b) = try_load(&sock, &fifo, &mem);
    assert_eq!(c, 400, "{b}");
    assert!(b.contains("is a FIFO"), "{b}");
    let (c, b) = try_load(&sock, &snap, &adir);
    assert_eq!(c, 400, "{b}");
    assert!(b.contains("is a directory"), "{b}");
    // The right pair loads.
    let (c, b) = try_load(&sock, &snap2, &mem2);
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(&sock, "GET", "/", None);
    assert_eq!(c, 200);
    assert!(b.contains("Paused"), "{b}");
    kill(child);
}
