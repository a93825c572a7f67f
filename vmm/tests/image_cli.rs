// SPDX-License-Identifier: Apache-2.0
//! End-to-end tests of `wisp image` through the built binary.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wisp-cli-{}-{n}", std::process::id()));
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

fn wisp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wisp"))
        .arg("image")
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = wisp(args);
    assert!(
        out.status.success(),
        "wisp image {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn info(p: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["info", "--json", s(p)])).unwrap()
}

#[test]
fn test_cli_create_qcow2_info_reports_size() {
    let d = Dir::new();
    let img = d.join("a.qcow2");
    ok(&[
        "create",
        "-f",
        "qcow2",
        "--cluster-size",
        "4K",
        s(&img),
        "10G",
    ]);
    let v = info(&img);
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 10u64 << 30);
    assert_eq!(v["cluster_size"], 4096);
}

#[test]
fn test_cli_create_raw_is_sparse() {
    let d = Dir::new();
    let img = d.join("a.raw");
    ok(&["create", "-f", "raw", s(&img), "512M"]);
    let v = info(&img);
    assert_eq!(v["virtual_size"], 512u64 << 20);
    assert!(v["actual_size"].as_u64().unwrap() < 1 << 20);
}

#[test]
fn test_cli_linked_clone_reports_backing_chain() {
    let d = Dir::new();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    ok(&["create", s(&base), "1G"]);
    ok(&["clone", "--linked", s(&base), s(&top)]);
    let v = info(&top);
    assert_eq!(v["backing_format"], "qcow2");
    assert_eq!(v["backing_chain"].as_array().unwrap().len(), 1);
    assert_eq!(v["virtual_size"], 1u64 << 30);
}

#[test]
fn test_cli_check_clean_image_exits_zero() {
    let d = Dir::new();
    let img = d.join("a.qcow2");
    ok(&["create", s(&img), "64M"]);
    let out = wisp(&["check", s(&img)]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn test_cli_check_leak_exits_three_and_repair_fixes() {
    let d = Dir::new();
    let img = d.join("a.qcow2");
    ok(&["create", s(&img), "64M"]);
    // Give cluster 7 (past the metadata) a refcount of 1 and grow the file over it.
    let f = std::fs::File::options().write(true).open(&img).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), (2 << 16) + 7 * 2)
        .unwrap();
    f.set_len(8 << 16).unwrap();
    drop(f);
    assert_eq!(wisp(&["check", s(&img)]).status.code(), Some(3));
    assert_eq!(
        wisp(&["check", "--repair", "all", s(&img)]).status.code(),
        Some(0)
    );
    assert_eq!(wisp(&["check", s(&img)]).status.code(), Some(0));
}

#[test]
fn test_cli_convert_roundtrip_preserves_data_sparsely() {
    let d = Dir::new();
    let raw = d.join("a.raw");
    let mut data = vec![0u8; 8 << 20];
    data[5000..9000].fill(0x61);
    data[(6 << 20)..(6 << 20) + 10].fill(0x62);
    std::fs::write(&raw, &data).unwrap();
    let q = d.join("a.qcow2");
    let back = d.join("b.raw");
    ok(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    ok(&["convert", "-f", "qcow2", "-O", "raw", s(&q), s(&back)]);
    assert!(std::fs::read(&back).unwrap() == data);
    let v = info(&q);
    assert!(v["actual_size"].as_u64().unwrap() < 1 << 20);
}

#[test]
fn test_cli_resize_relative_grows() {
    let d = Dir::new();
    let img = d.join("a.qcow2");
    ok(&["create", s(&img), "1G"]);
    ok(&["resize", s(&img), "+1G"]);
    assert_eq!(info(&img)["virtual_size"], 2u64 << 30);
}

#[test]
fn test_cli_full_clone_copies_data() {
    let d = Dir::new();
    let raw = d.join("a.raw");
    std::fs::write(&raw, vec![0x77u8; 1 << 20]).unwrap();
    let copy = d.join("copy.raw");
    ok(&["clone", s(&raw), s(&copy)]);
    assert!(std::fs::read(&copy).unwrap() == vec![0x77u8; 1 << 20]);
}

#[test]
fn test_cli_locked_image_error_is_one_line() {
    let d = Dir::new();
    let img = d.join("a.raw");
    ok(&["create", "-f", "raw", s(&img), "1M"]);
    let holder = std::fs::File::open(&img).unwrap();
    // SAFETY: flock only acts on the descriptor `holder` owns.
    let ret = unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(ret, 0);
    let out = wisp(&["resize", s(&img), "2M"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!("wisp: Image {} is locked by another process", img.display())
    );
}

#[test]
fn test_cli_convert_flattens_a_named_qcow2_overlay_as_qemu_img_does() {
    // A source named on the command line counts as declared: its backing
    // chain is followed (as qemu-img does); a VM's probed disk still is not.
    let d = Dir::new();
    let base = d.join("base.raw");
    let mut data = vec![0u8; 1 << 20];
    data[4096..8192].fill(0x5a);
    std::fs::write(&base, &data).unwrap();
    let top = d.join("top.qcow2");
    ok(&["create", "-b", "base.raw", "-F", "raw", s(&top)]);
    for (args, out) in [
        (vec!["convert", "-O", "raw"], "x.raw"),
        (vec!["convert", "-f", "qcow2", "-O", "raw"], "y.raw"),
    ] {
        let mut a = args.clone();
        let dst = d.join(out);
        a.extend([s(&top), s(&dst)]);
        ok(&a);
        assert_eq!(std::fs::read(&dst).unwrap(), data, "{a:?}");
    }
}

#[test]
fn test_cli_qemu_img_accepts_wisp_images() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-img is not installed");
        return;
    }
    let d = Dir::new();
    let raw = d.join("a.raw");
    let mut data = vec![0u8; 4 << 20];
    data[70_000..200_000].fill(0x33);
    std::fs::write(&raw, &data).unwrap();
    let q = d.join("a.qcow2");
    ok(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    ok(&["resize", s(&q), "8M"]);
    let check = Command::new("qemu-img")
        .args(["check", s(&q)])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", s(&q), s(&raw)])
        .output()
        .unwrap();
    // The qcow2 grew to 8M; qemu-img compare accepts a zero tail.
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn test_cli_preallocated_qcow2_passes_qemu_check() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-img is not installed");
        return;
    }
    let d = Dir::new();
    for mode in ["metadata", "full"] {
        let img = d.join(&format!("{mode}.qcow2"));
        ok(&[
            "create",
            "--preallocation",
            mode,
            "--cluster-size",
            "64K",
            s(&img),
            "32M",
        ]);
        let check = Command::new("qemu-img")
            .args(["check", s(&img)])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        assert!(info(&img)["actual_size"].as_u64().unwrap() > 0);
    }
}

#[test]
fn test_cli_info_text_names_format_and_size() {
    let d = Dir::new();
    let img = d.join("a.qcow2");
    ok(&["create", s(&img), "2G"]);
    let text = ok(&["info", s(&img)]);
    assert!(text.contains("file format: qcow2"), "{text}");
    assert!(
        text.contains("virtual size: 2 GiB (2147483648 bytes)"),
        "{text}"
    );
}

#[test]
fn test_cli_missing_image_error_is_one_line() {
    let d = Dir::new();
    let out = wisp(&["check", s(&d.join("nope.qcow2"))]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
}
