// SPDX-License-Identifier: Apache-2.0
//! `wisp image` against qemu-img, and VMDK disks attached to a VM: convert
//! gives the bytes qemu-img gives, info agrees with `qemu-img info`, formats
//! wisp cannot read are refused by name, a VMDK boots read-only, `-o` and
//! `--output=json` speak qemu-img's names.
//!
//! Tests needing qemu-img print `SKIPPED: ...` and return when it is missing.

mod harness;
mod image_util;

use std::time::Duration;

use harness::{guest, make_pattern_image, run, TempDir, PATTERN_DISK1};
use image_util::*;

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "streamOptimized",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

#[test]
fn test_convert_vmdk_to_raw_and_qcow2_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-vmdk-convert");
    let raw = source(&dir);
    for sub in SUBFORMATS {
        let vmdk = dir.path(&format!("{sub}.vmdk"));
        let opt = format!("subformat={sub}");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &opt,
            s(&raw),
            s(&vmdk),
        ]);
        let theirs = dir.path(&format!("{sub}.qemu.raw"));
        qemu_img(&["convert", "-f", "vmdk", "-O", "raw", s(&vmdk), s(&theirs)]);
        let ours = dir.path(&format!("{sub}.wisp.raw"));
        ok(&["convert", "-O", "raw", s(&vmdk), s(&ours)]);
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{sub}: raw output differs from qemu-img's"
        );
        let q = dir.path(&format!("{sub}.qcow2"));
        ok(&["convert", "-f", "vmdk", "-O", "qcow2", s(&vmdk), s(&q)]);
        let cmp = qemu_img(&["compare", "-f", "vmdk", "-F", "qcow2", s(&vmdk), s(&q)]);
        assert!(cmp.contains("identical"), "{sub}: {cmp}");
        qemu_img(&["check", "-q", s(&q)]);
    }
}

#[test]
fn test_info_on_vmdk_agrees_with_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-vmdk-info");
    let raw = source(&dir);
    for sub in SUBFORMATS {
        let vmdk = dir.path(&format!("{sub}.vmdk"));
        let opt = format!("subformat={sub}");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &opt,
            s(&raw),
            s(&vmdk),
        ]);
        let theirs: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", s(&vmdk)])).unwrap();
        let ours: serde_json::Value =
            serde_json::from_str(&ok(&["info", "--json", s(&vmdk)])).unwrap();
        assert_eq!(ours["format"], "vmdk", "{sub}");
        assert_eq!(ours["virtual_size"], theirs["virtual-size"], "{sub}");
        let create = &theirs["format-specific"]["data"]["create-type"];
        assert_eq!(&ours["vmdk"]["create_type"], create, "{sub}");
        let text = ok(&["info", s(&vmdk)]);
        assert!(text.contains("file format: vmdk"), "{text}");
        assert!(text.contains(&format!("create type: {sub}")), "{text}");
        let (code, out, _) = image(&["check", s(&vmdk)]);
        assert_eq!(code, 0, "{sub}: {out}");
    }
}

#[test]
fn test_unreadable_formats_are_refused_by_name() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-unsupported");
    for fmt in ["vdi", "vhdx", "vpc", "qed"] {
        let img = dir.path(&format!("x.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, s(&img), "4M"]);
        for args in [
            vec!["info", s(&img)],
            vec!["convert", "-O", "raw", s(&img), "/dev/null"],
        ] {
            let (code, _, err) = image(&args);
            assert_eq!(code, 1, "{args:?}");
            assert!(
                err.contains(&format!("is a {fmt} image")),
                "{args:?}: {err}"
            );
        }
    }
    // Writing VMDK is refused, not silently done in another format.
    let raw = source(&dir);
    let (code, _, err) = image(&["convert", "-O", "vmdk", s(&raw), s(&dir.path("o.vmdk"))]);
    assert_eq!(code, 1);
    assert!(err.contains("does not write"), "{err}");
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn boot(disk: &str, tests: &str) -> harness::Run {
    let g = guest();
    let cmdline = format!("tests={tests}");
    let r = run(
        &[
            "run",
            "--kernel",
            s(&g),
            "--cmdline",
            &cmdline,
            "--disk",
            disk,
        ],
        TIMEOUT,
    );
    r.assert_no_panic();
    r
}

#[test]
fn test_vmdk_disk_boots_read_only() {
    require_kvm!();
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-vmdk-vm");
    let raw = dir.path("disk.raw");
    make_pattern_image(&raw, 8 << 20, PATTERN_DISK1);
    for sub in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
        let vmdk = dir.path(&format!("{sub}.vmdk"));
        let opt = format!("subformat={sub}");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &opt,
            s(&raw),
            s(&vmdk),
        ]);
        let before = std::fs::read(&vmdk).unwrap();
        let r = boot(
            &format!("path={},format=vmdk,readonly=on", vmdk.display()),
            "blk_ro,blk_read",
        );
        r.assert_code(0);
        r.assert_pass("blk_ro");
        r.assert_pass("blk_read");
        assert!(std::fs::read(&vmdk).unwrap() == before, "{sub} changed");
    }
    // Read-write through a qcow2 overlay on the VMDK.
    let top = dir.path("top.qcow2");
    ok(&[
        "clone",
        "--linked",
        s(&dir.path("streamOptimized.vmdk")),
        s(&top),
    ]);
    let r = boot(
        &format!("path={},format=qcow2", top.display()),
        "blk_read,blk_write",
    );
    r.assert_code(0);
    r.assert_pass("blk_read");
    r.assert_pass("blk_write");
}

#[test]
fn test_vmdk_disk_without_readonly_is_refused_before_boot() {
    require_kvm!();
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-vmdk-rw");
    let vmdk = dir.path("d.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&vmdk), "1M"]);
    let vdi = dir.path("d.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", s(&vdi), "1M"]);
    // A declared format=vmdk is a usage error (exit 2); a probed one fails to open (exit 1).
    for (disk, code, needle) in [
        (
            format!("path={},format=vmdk", vmdk.display()),
            2,
            "readonly=on",
        ),
        (format!("path={}", vmdk.display()), 1, "readonly=on"),
        (
            format!("path={},readonly=on", vdi.display()),
            1,
            "is a vdi image",
        ),
    ] {
        let r = boot(&disk, "blk_read");
        assert_eq!(r.code, Some(code), "{disk}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{disk}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "the guest ran: {}", r.stdout);
    }
}

#[test]
fn test_output_json_uses_qemu_img_field_names_and_values() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-qjson");
    let raw = source(&dir);
    let v2 = dir.path("v2.qcow2");
    ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4k",
        s(&v2),
        "5M",
    ]);
    let top = dir.path("top.qcow2");
    ok(&[
        "create",
        "-o",
        "refcount_bits=8",
        "-b",
        "src.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    let vmdk = dir.path("d.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&vmdk),
    ]);
    let flat = dir.path("f.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&raw),
        s(&flat),
    ]);
    for img in [&raw, &v2, &top, &vmdk, &flat] {
        let ours = json_of(&ok(&["info", "--output=json", s(img)]));
        let theirs = json_of(&qemu_img(&["info", "--output=json", s(img)]));
        for key in ["virtual-size", "format", "filename", "dirty-flag"] {
            assert!(ours.get(key).is_some(), "{}: no {key}", img.display());
        }
        assert_subset(&ours, &theirs, &img.display().to_string());
    }
    let chain = ["info", "--output=json", "--backing-chain", s(&top)];
    let ours = json_of(&ok(&chain));
    assert_eq!(ours.as_array().map(Vec::len), Some(2), "{ours}");
    assert_subset(&ours, &json_of(&qemu_img(&chain)), "chain");
    for img in [&v2, &top] {
        let (code, out, err) = image(&["check", "--output=json", s(img)]);
        assert_eq!(code, 0, "{err}");
        let theirs = json_of(&qemu_img(&["check", "--output=json", s(img)]));
        assert_subset(&json_of(&out), &theirs, "check");
    }
}

#[test]
fn test_create_and_convert_take_qemu_img_options() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-qopts");
    let raw = source(&dir);
    let q = dir.path("o.qcow2");
    ok(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=16k,refcount_bits=32",
        s(&raw),
        s(&q),
    ]);
    let info = json_of(&qemu_img(&["info", "--output=json", s(&q)]));
    assert_eq!(info["cluster-size"], 16384);
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 32);
    assert!(qemu_img(&["compare", s(&raw), s(&q)]).contains("identical"));
    qemu_img(&["check", "-q", s(&q)]);
    let m = dir.path("m.qcow2");
    ok(&[
        "create",
        "-o",
        "preallocation=metadata,compat=0.10",
        s(&m),
        "2M",
    ]);
    let info = json_of(&qemu_img(&["info", "--output=json", s(&m)]));
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
    qemu_img(&["check", "-q", s(&m)]);
    for (args, needle) in [
        (
            vec!["create", "-o", "lazy_refcounts=on", "x.qcow2", "1M"],
            "lazy_refcounts=on",
        ),
        (
            vec!["create", "-o", "compression_type=zstd", "x.qcow2", "1M"],
            "zstd",
        ),
        (
            vec!["create", "-o", "encrypt.format=luks", "x.qcow2", "1M"],
            "Unknown option",
        ),
        (
            vec!["create", "-f", "raw", "-o", "compat=1.1", "x.raw", "1M"],
            "not raw",
        ),
        (
            vec![
                "convert",
                "-O",
                "qcow2",
                "-o",
                "backing_file=a",
                s(&raw),
                "x.qcow2",
            ],
            "backing",
        ),
    ] {
        let (code, _, err) = image(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // -p --json: one JSON progress object per line on stdout, ending at 100%.
    let out = ok(&[
        "convert",
        "-p",
        "--json",
        "-O",
        "raw",
        s(&raw),
        s(&dir.path("p.raw")),
    ]);
    let last = out.lines().last().map(json_of).unwrap();
    assert_eq!(last["type"], "progress");
    assert_eq!(last["percent"], 100);
    // -p without a terminal: progress lines on stderr.
    let (code, _, err) = image(&[
        "convert",
        "-p",
        "-O",
        "raw",
        s(&raw),
        s(&dir.path("p2.raw")),
    ]);
    assert_eq!(code, 0);
    assert!(err.contains("Converting: 100%"), "{err}");
}
