// SPDX-License-Identifier: Apache-2.0
//! virtio-blk through the real `wisp` binary: the test guest reads a known
//! pattern, writes and flushes (checked in the host file afterwards), is refused
//! writes on a read-only disk, reads the serial, drives two disks, takes an
//! interrupt; on raw images, qcow2 images and a linked clone whose base stays
//! untouched. Bad disks are refused before boot.

mod harness;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use harness::{
    guest, has_pattern, image_tool, make_pattern_image, run, spawn, wait, TempDir, PATTERN_DISK1,
    PATTERN_DISK2, PATTERN_GUEST_WRITE,
};

const TIMEOUT: Duration = Duration::from_secs(120);
const DISK_SIZE: u64 = 8 << 20;

fn boot_with(disks: &[String], tests: &str, extra: &str) -> harness::Run {
    let g = guest();
    let cmdline = format!("tests={tests} {extra}");
    let mut args: Vec<&str> = vec![
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    for d in disks {
        args.push("--disk");
        args.push(d);
    }
    let r = run(&args, TIMEOUT);
    r.assert_no_panic();
    r
}

fn check_guest_writes(img: &Path, size: u64) {
    let f = std::fs::File::open(img).unwrap();
    for (off, len) in [(4096u64, 8 * 512u64), (1 << 20, 512), (size - 512, 512)] {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(
            has_pattern(&buf, off, PATTERN_GUEST_WRITE),
            "guest write at {off:#x} not in {}",
            img.display()
        );
    }
    // Around the writes the original pattern is intact.
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(has_pattern(&buf, 0, PATTERN_DISK1), "sector 0 was modified");
}

#[test]
fn test_raw_read_write_flush_id_irq() {
    require_kvm!();
    let dir = TempDir::new("blk-raw");
    let img = dir.path("disk.img");
    make_pattern_image(&img, DISK_SIZE, PATTERN_DISK1);
    let spec = format!("path={},serial=wisp-serial-01", img.display());
    let r = boot_with(
        &[spec],
        "blk_read,blk_id,blk_irq,blk_write",
        "blk_serial=wisp-serial-01",
    );
    r.assert_code(0);
    for t in ["blk_read", "blk_id", "blk_irq", "blk_write"] {
        r.assert_pass(t);
    }
    r.assert_summary(4);
    check_guest_writes(&img, DISK_SIZE);
}

#[test]
fn test_readonly_disk_rejects_writes_and_file_is_unchanged() {
    require_kvm!();
    let dir = TempDir::new("blk-ro");
    let img = dir.path("ro.img");
    make_pattern_image(&img, DISK_SIZE, PATTERN_DISK1);
    let before = std::fs::read(&img).unwrap();
    let r = boot_with(
        &[format!("path={},readonly=on", img.display())],
        "blk_ro,blk_read",
        "",
    );
    r.assert_code(0);
    r.assert_pass("blk_ro");
    r.assert_pass("blk_read");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "read-only image changed"
    );
}

#[test]
fn test_two_disks() {
    require_kvm!();
    let dir = TempDir::new("blk-two");
    let a = dir.path("a.img");
    let b = dir.path("b.img");
    make_pattern_image(&a, DISK_SIZE, PATTERN_DISK1);
    make_pattern_image(&b, 4 << 20, PATTERN_DISK2);
    let r = boot_with(
        &[
            format!("path={}", a.display()),
            format!("path={}", b.display()),
        ],
        "blk_two",
        "",
    );
    r.assert_code(0);
    r.assert_pass("blk_two");
}

#[test]
fn test_qcow2_disk_passes_the_same_tests() {
    require_kvm!();
    let dir = TempDir::new("blk-qcow2");
    let raw = dir.path("src.img");
    let q = dir.path("disk.qcow2");
    make_pattern_image(&raw, DISK_SIZE, PATTERN_DISK1);
    image_tool(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let r = boot_with(
        &[format!("path={},format=qcow2,serial=q1", q.display())],
        "blk_read,blk_id,blk_write",
        "blk_serial=q1",
    );
    r.assert_code(0);
    r.assert_summary(3);
    // Read the result back through wisp's own converter.
    let out = dir.path("out.img");
    image_tool(&[
        "convert",
        "-O",
        "raw",
        q.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    check_guest_writes(&out, DISK_SIZE);
    let check = std::process::Command::new(harness::wisp())
        .args(["image", "check", q.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn test_linked_clone_writes_never_touch_base() {
    require_kvm!();
    let dir = TempDir::new("blk-clone");
    let raw = dir.path("src.img");
    let base = dir.path("base.qcow2");
    let clone = dir.path("clone.qcow2");
    make_pattern_image(&raw, DISK_SIZE, PATTERN_DISK1);
    image_tool(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    let base_before = std::fs::read(&base).unwrap();
    image_tool(&[
        "clone",
        "--linked",
        base.to_str().unwrap(),
        clone.to_str().unwrap(),
    ]);
    let r = boot_with(
        &[format!("path={},format=qcow2", clone.display())],
        "blk_read,blk_write",
        "",
    );
    r.assert_code(0);
    r.assert_summary(2);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the base image changed"
    );
    let out = dir.path("out.img");
    image_tool(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        clone.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    check_guest_writes(&out, DISK_SIZE);
}

fn expect_refused(disk: &str, needle: &str) {
    let g = guest();
    let r = run(
        &["run", "--kernel", g.to_str().unwrap(), "--disk", disk],
        Duration::from_secs(30),
    );
    r.assert_no_panic();
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "stderr lacks '{needle}': {}",
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
fn test_bad_disks_refused_before_boot() {
    require_kvm!();
    let dir = TempDir::new("blk-bad");
    expect_refused(
        &format!("path={}", dir.path("missing.img").display()),
        "does not exist",
    );
    expect_refused(&format!("path={}", dir.0.display()), "is a directory");
    let ro = dir.path("ro.img");
    make_pattern_image(&ro, 1 << 20, PATTERN_DISK1);
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    use std::os::unix::fs::PermissionsExt;
    perm.set_mode(0o444);
    std::fs::set_permissions(&ro, perm).unwrap();
    // As root, file modes do not stop writes; an immutable file does.
    let immutable = std::process::Command::new("chattr")
        .args(["+i", ro.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if std::fs::OpenOptions::new().write(true).open(&ro).is_err() {
        expect_refused(&format!("path={}", ro.display()), "readonly=on");
    } else {
        eprintln!("SKIPPED read-only file case: cannot make a file unwritable here");
    }
    if immutable {
        let _ = std::process::Command::new("chattr")
            .args(["-i", ro.to_str().unwrap()])
            .status();
    }
}

#[test]
fn test_second_writer_is_refused_while_first_runs() {
    require_kvm!();
    let dir = TempDir::new("blk-lock");
    let img = dir.path("shared.img");
    make_pattern_image(&img, 1 << 20, PATTERN_DISK1);
    let g = guest();
    let disk = format!("path={}", img.display());
    let first = spawn(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--disk",
        &disk,
        "--cmdline",
        "tests=cmdline exit=halt",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    expect_refused(&disk, "is locked by another process");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let r = wait(first, Duration::from_secs(20));
    r.assert_pass("cmdline");
    // Once the first VMM is gone, the image opens again.
    let r = boot_with(&[disk], "blk_read", "");
    r.assert_code(0);
    r.assert_pass("blk_read");
}

#[test]
fn test_linux_guest_reads_and_writes_disk() {
    require_kvm!();
    if harness::host_is_pvm() {
        eprintln!("SKIPPED: {}", harness::PVM_LINUX_SKIP);
        return;
    }
    let (kernel, initrd) = harness::linux_guest();
    let dir = TempDir::new("blk-linux");
    let img = dir.path("disk.img");
    make_pattern_image(&img, DISK_SIZE, PATTERN_DISK1);
    let r = run(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--disk",
            &format!("path={}", img.display()),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 wisp.test=blk",
        ],
        Duration::from_secs(600),
    );
    r.assert_code(0);
    assert!(
        r.stdout
            .contains(&format!("WISP-LINUX-BLK-SIZE {}", DISK_SIZE / 512)),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("WISP-LINUX-BLK-OK"), "{}", r.stdout);
    let mut buf = [0u8; 19];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, 2048 * 512)
        .unwrap();
    assert_eq!(&buf, b"wisp-linux-was-here");
}

fn tick_sector_ok(img: &Path, c: u64) -> bool {
    let off = (2048 + c % 64) * 512;
    let mut buf = vec![0u8; 512];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    has_pattern(&buf, off, 0x7469_636b_0000_0000 ^ c)
}

#[test]
fn test_patch_drive_swaps_backing_file_of_running_vm() {
    require_kvm!();
    let dir = TempDir::new("blk-patch");
    let a = dir.path("a.img");
    let b = dir.path("b.img");
    make_pattern_image(&a, DISK_SIZE, PATTERN_DISK1);
    std::fs::File::create(&b)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let sock = dir.path("api.sock");
    let g = guest();
    let mut child = spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--kernel",
        g.to_str().unwrap(),
        "--disk",
        &format!("path={},id=data", a.display()),
        "--cmdline",
        "tests=blk_write_tick tick_ms=50 tick_count=40 pattern_mib=0",
    ]);
    let mut lines = harness::LineReader::new(&mut child);
    lines.wait_line("tick 5 ok", Duration::from_secs(60));
    // A missing image is refused and the VM keeps running on the old one.
    let (c, body) = harness::http(
        &sock,
        "PATCH",
        "/drives/data",
        Some(r#"{"drive_id": "data", "path_on_host": "/nonexistent.img"}"#),
    );
    assert_eq!(c, 400, "{body}");
    assert!(body.contains("does not exist"), "{body}");
    let (c, body) = harness::http(
        &sock,
        "PATCH",
        "/drives/data",
        Some(&format!(
            r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
            b.display()
        )),
    );
    assert_eq!(c, 204, "{body}");
    let st = child.wait().unwrap();
    let out = lines.rest();
    assert!(st.success(), "{out}");
    assert!(out.contains("PASS blk_write_tick"), "{out}");
    // Early ticks landed in the first image, the last ones in the second.
    assert!(tick_sector_ok(&a, 1), "tick 1 not in the first image");
    assert!(tick_sector_ok(&b, 40), "tick 40 not in the second image");
    assert!(!tick_sector_ok(&a, 40), "tick 40 reached the old image");
}
