// SPDX-License-Identifier: Apache-2.0
//! `wisp image check`, `create` and `resize` against `qemu-img`: the same
//! exit codes on damaged images, repairs qemu-img calls clean (or refused
//! with the image untouched), sector-rounded sizes, and no corruption when
//! wisp is killed mid-way.
//!
//! Every test prints `SKIPPED` and returns when qemu-img/qemu-io are missing.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Layout of a 64 MiB qemu-img image after one 64 KiB write at 0.
const CS: u64 = 64 << 10;
const REFBLOCK: u64 = 2 * CS;
const L1: u64 = 3 * CS;
const L2: u64 = 4 * CS;
const DATA: u64 = 5 * CS;
const COPIED: u64 = 1 << 63;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wisp-check-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        eprintln!("SKIPPED: qemu-img / qemu-io are not installed");
    }
    ok
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn wisp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wisp"))
        .arg("image")
        .args(args)
        .output()
        .unwrap()
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn qemu_check(img: &Path) -> i32 {
    code(
        &Command::new("qemu-img")
            .args(["check", s(img)])
            .output()
            .unwrap(),
    )
}

fn virtual_size(img: &Path) -> u64 {
    let out = run("qemu-img", &["info", "-U", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn patch(img: &Path, offset: u64, bytes: &[u8]) {
    std::fs::File::options()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(bytes, offset)
        .unwrap();
}

/// A 64 MiB image with 64 KiB written at guest offset 0.
fn base(d: &Dir, name: &str) -> PathBuf {
    let img = d.join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    run("qemu-io", &["-c", "write -q -P 0xaa 0 64k", s(&img)]);
    img
}

/// Damage found by hostile-input tests: (name, file offset, bytes).
fn damages() -> Vec<(&'static str, u64, Vec<u8>)> {
    let q = |v: u64| v.to_be_bytes().to_vec();
    vec![
        ("clean", 0, b"QFI\xfb".to_vec()),
        ("l2 entry at its own l2 table", L2, q(L2 | COPIED)),
        ("l2 entry at a refcount block", L2, q(REFBLOCK | COPIED)),
        ("l2 entry at the l1 table", L2, q(L1 | COPIED)),
        ("zeroed refcounts", REFBLOCK, vec![0; 12]),
        ("refcount_order 0", 96, 0u32.to_be_bytes().to_vec()),
        ("refcount table at the header", 48, q(0)),
        ("reserved bits in an l2 entry", L2, q(DATA | COPIED | 2)),
        ("reserved bits in an l1 entry", L1, q(L2 | COPIED | 4)),
        ("l2 table past the end", L1, q((64 << 20) | COPIED)),
        ("refcount block past the end", CS, q(64 << 20)),
        ("data cluster past the end", L2, q((64 << 20) | COPIED)),
        ("misaligned data cluster", L2, q((DATA + 512) | COPIED)),
        ("missing COPIED flag", L2, q(DATA)),
        ("l1 table past the end", 40, q(64 << 20)),
        (
            "leaked cluster",
            REFBLOCK + 6 * 2,
            1u16.to_be_bytes().to_vec(),
        ),
        (
            "refcount above references",
            REFBLOCK + 5 * 2,
            2u16.to_be_bytes().to_vec(),
        ),
    ]
}

fn damaged(d: &Dir, i: usize, offset: u64, bytes: &[u8]) -> PathBuf {
    let img = base(d, &format!("d{i}.qcow2"));
    patch(&img, offset, bytes);
    // The leak case needs its cluster inside the file.
    let f = std::fs::File::options().write(true).open(&img).unwrap();
    f.set_len(f.metadata().unwrap().len().max(7 * CS)).unwrap();
    img
}

#[test]
fn test_cli_check_exit_codes_agree_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    for (i, (name, offset, bytes)) in damages().into_iter().enumerate() {
        let img = damaged(&d, i, offset, &bytes);
        let out = wisp(&["check", s(&img)]);
        assert_eq!(
            code(&out),
            qemu_check(&img),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn test_cli_check_repair_leaves_qemu_clean_or_refuses_untouched() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    for (i, (name, offset, bytes)) in damages().into_iter().enumerate() {
        for mode in ["leaks", "all"] {
            let img = damaged(&d, i, offset, &bytes);
            let before = std::fs::read(&img).unwrap();
            let out = wisp(&["check", "-r", mode, s(&img)]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("repair refused") || stderr.contains("Check not completed") {
                assert!(std::fs::read(&img).unwrap() == before, "{name}: wrote");
                assert_ne!(code(&out), 0, "{name}");
                continue;
            }
            let after_wisp = code(&wisp(&["check", s(&img)]));
            assert_eq!(code(&out), after_wisp, "{name} -r {mode}: {stderr}");
            let q = qemu_check(&img);
            match (mode, code(&out)) {
                (_, 0) => assert_eq!(q, 0, "{name} -r {mode}: qemu-img disagrees"),
                ("leaks", c) => assert!(c == 2 && q == 2, "{name}: {c} {q}"),
                (_, c) => panic!("{name} -r all exits {c}: {stderr}"),
            }
        }
    }
}

#[test]
fn test_cli_check_corrupt_flag_exits_two_until_repaired() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "c.qcow2");
    patch(&img, 72, &2u64.to_be_bytes());
    assert_eq!(code(&wisp(&["check", s(&img)])), 2);
    assert_eq!(code(&wisp(&["check", "-r", "leaks", s(&img)])), 2);
    assert_eq!(code(&wisp(&["check", "-r", "all", s(&img)])), 0);
    assert_eq!(code(&wisp(&["check", s(&img)])), 0);
    assert_eq!(qemu_check(&img), 0);
}

#[test]
fn test_cli_check_bitmaps_and_snapshots_have_no_false_leaks() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "bs.qcow2");
    run("qemu-img", &["snapshot", "-c", "s1", s(&img)]);
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    run("qemu-io", &["-c", "write -q -P 1 1M 128k", s(&img)]);
    run("qemu-img", &["snapshot", "-c", "s2", s(&img)]);
    assert_eq!(qemu_check(&img), 0);
    let out = wisp(&["check", s(&img)]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    let before = std::fs::read(&img).unwrap();
    assert_eq!(code(&wisp(&["check", "-r", "all", s(&img)])), 0);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a clean repair writes nothing"
    );
    let list = run("qemu-img", &["snapshot", "-l", s(&img)]);
    assert!(list.contains("s1") && list.contains("s2"), "{list}");
}

#[test]
fn test_cli_create_and_resize_round_up_to_sectors_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    for fmt in ["qcow2", "raw"] {
        let ours = d.join(&format!("w.{fmt}"));
        let theirs = d.join(&format!("q.{fmt}"));
        assert!(wisp(&["create", "-f", fmt, s(&ours), "1000"])
            .status
            .success());
        run("qemu-img", &["create", "-q", "-f", fmt, s(&theirs), "1000"]);
        assert_eq!(virtual_size(&ours), virtual_size(&theirs), "{fmt}");
        assert_eq!(virtual_size(&ours), 1024);
        assert!(wisp(&["resize", s(&ours), "2001"]).status.success());
        assert_eq!(virtual_size(&ours), 2048, "{fmt} resize");
    }
    assert_eq!(qemu_check(&d.join("w.qcow2")), 0);
}

/// Kills `wisp image ARGS` after `delay` (if still running).
fn kill_after(args: &[&str], delay: Duration) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wisp"))
        .arg("image")
        .args(args)
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    // SIGKILL: no destructor, no flush.
    let _ = child.kill();
    let _ = child.wait();
}

fn is_qcow2(img: &Path) -> bool {
    std::fs::read(img).is_ok_and(|b| b.len() >= 4096 && b.starts_with(b"QFI\xfb"))
}

#[test]
fn test_cli_convert_killed_midway_leaves_no_corruption() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let src = d.join("src.raw");
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i / 4096) as u8 | 1).collect();
    std::fs::write(&src, &data).unwrap();
    let mut checked = 0;
    for ms in [5, 20, 50, 100, 200, 400] {
        let dst = d.join(&format!("dst{ms}.qcow2"));
        kill_after(
            &["convert", "-O", "qcow2", s(&src), s(&dst)],
            Duration::from_millis(ms),
        );
        // Killed before the header was complete: no image, nothing to corrupt.
        if !is_qcow2(&dst) {
            continue;
        }
        let q = qemu_check(&dst);
        let len = std::fs::metadata(&dst).map_or(0, |m| m.len());
        eprintln!("convert killed after {ms} ms: {len} bytes, qemu-img check exits {q}");
        assert!(
            q == 0 || q == 3,
            "killed after {ms} ms: qemu-img check exits {q}"
        );
        assert!(matches!(code(&wisp(&["check", s(&dst)])), 0 | 3));
        checked += 1;
    }
    assert!(checked > 0, "no run got far enough to check");
}

#[test]
fn test_cli_resize_killed_midway_leaves_no_corruption() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    // Process start-up takes most of the run: the sweep is dense where the
    // resize itself happens on an idle machine (and wider under load).
    let delays = (0..16u64)
        .map(|i| i * 2500)
        .chain((0..20).map(|i| 4000 + i * 200))
        .chain([50_000, 100_000]);
    for (i, us) in delays.enumerate() {
        let img = base(&d, &format!("r{i}.qcow2"));
        kill_after(&["resize", s(&img), "100T"], Duration::from_micros(us));
        let q = qemu_check(&img);
        let size = virtual_size(&img);
        eprintln!("resize killed after {us} us: size {size}, qemu-img check exits {q}");
        assert!(
            q == 0 || q == 3,
            "killed after {us} us: qemu-img check exits {q}"
        );
        assert!(size == 64 << 20 || size == 100 << 40, "size {size}");
    }
}
