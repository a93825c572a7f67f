// SPDX-License-Identifier: Apache-2.0
//! `wisp image` against qemu-img, and VMDK disks attached to a VM: convert
//! gives the bytes qemu-img gives, info agrees with `qemu-img info`, formats
//! wisp cannot read are refused by name, a VMDK boots read-only.
//!
//! Tests needing qemu-img print `SKIPPED: ...` and return when it is missing.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{guest, make_pattern_image, run, wisp, TempDir, PATTERN_DISK1};

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-img is not installed");
    }
    ok
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `wisp image ARGS`; returns (exit code, stdout, stderr).
fn image(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(wisp())
        .arg("image")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = image(args);
    assert_eq!(code, 0, "wisp image {args:?}: {err}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw source with scattered data, not a whole number of 64 KiB grains.
fn source(dir: &TempDir) -> std::path::PathBuf {
    let raw = dir.path("src.raw");
    let mut d = vec![0u8; (3 << 20) + 5 * 512];
    for (i, b) in d[..200_000].iter_mut().enumerate() {
        *b = (i % 241) as u8 + 1;
    }
    d[(2 << 20)..(2 << 20) + 4096].fill(0x77);
    let n = d.len();
    d[n - 512..].fill(0x99);
    std::fs::write(&raw, d).unwrap();
    raw
}

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

/// Every field wisp's `--output=json` emits equals qemu-img's, recursively
/// (wisp may omit fields; it may not add or differ).
fn assert_subset(ours: &serde_json::Value, theirs: &serde_json::Value, at: &str) {
    match (ours, theirs) {
        (serde_json::Value::Object(o), serde_json::Value::Object(t)) => {
            for (k, v) in o {
                let Some(tv) = t.get(k) else {
                    panic!("{at}.{k}: qemu-img has no such field ({v})");
                };
                assert_subset(v, tv, &format!("{at}.{k}"));
            }
        }
        (serde_json::Value::Array(o), serde_json::Value::Array(t)) => {
            assert_eq!(o.len(), t.len(), "{at}: lengths");
            for (i, (a, b)) in o.iter().zip(t).enumerate() {
                assert_subset(a, b, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(ours, theirs, "{at}"),
    }
}

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
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

fn have_qemu_io() -> bool {
    let ok = Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-io is not installed");
    }
    ok
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec![];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = Command::new("qemu-io")
        .args(&args)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn test_map_json_matches_qemu_img_map() {
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    let dir = TempDir::new("img-map");
    let base = dir.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, &["write -P 1 0 64k", "write -P 3 1M 192k"]);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(
        &top,
        &[
            "write -P 2 128k 64k",
            "write -z 256k 64k",
            "write -P 4 1088k 4k",
        ],
    );
    // A compressed image: data without an offset.
    let packed = dir.path("packed.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&top), s(&packed)]);
    let raw = source(&dir);
    let mut images = vec![top.clone(), packed];
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
    ] {
        let v = dir.path(&format!("{sub}.vmdk"));
        let opt = format!("subformat={sub}");
        qemu_img(&["convert", "-O", "vmdk", "-o", &opt, s(&raw), s(&v)]);
        images.push(v);
    }
    for img in &images {
        let ours = json_of(&ok(&["map", "--output=json", s(img)]));
        let theirs = json_of(&qemu_img(&["map", "--output=json", s(img)]));
        assert_eq!(ours, theirs, "{}", img.display());
    }
    let human = ok(&["map", s(&top)]);
    assert!(
        human.starts_with("Offset          Length          Mapped to       File"),
        "{human}"
    );
    assert!(
        human.contains("base.qcow2") && human.contains("top.qcow2"),
        "{human}"
    );
}

#[test]
fn test_compare_agrees_with_qemu_img_compare() {
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    let dir = TempDir::new("img-compare");
    let raw = source(&dir);
    let q = dir.path("same.qcow2");
    ok(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
    let v = dir.path("same.vmdk");
    qemu_img(&["convert", "-O", "vmdk", s(&raw), s(&v)]);
    let diff = dir.path("diff.qcow2");
    ok(&["convert", "-O", "qcow2", s(&raw), s(&diff)]);
    qemu_io(&diff, &["write -P 9 1000000 1"]);
    let big = dir.path("big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&big), "8M"]);
    qemu_img(&["rebase", "-u", "-b", "src.raw", "-F", "raw", s(&big)]);
    for args in [
        vec![s(&raw), s(&q)],
        vec![s(&q), s(&v)],
        vec![s(&raw), s(&diff)],
        vec![s(&raw), s(&big)],
        vec!["-s", s(&raw), s(&big)],
        vec![s(&raw), s(&dir.path("missing"))],
    ] {
        let mut full = vec!["compare"];
        full.extend(&args);
        let (code, out, _) = image(&full);
        let theirs = Command::new("qemu-img").args(&full).output().unwrap();
        assert_eq!(Some(code), theirs.status.code(), "{args:?}");
        assert_eq!(out, String::from_utf8_lossy(&theirs.stdout), "{args:?}");
    }
}

#[test]
fn test_rebase_keeps_the_guest_view_and_qemu_img_agrees() {
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    let dir = TempDir::new("img-rebase");
    let b1 = dir.path("b1.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b1), "2M"]);
    qemu_io(&b1, &["write -P 1 0 1M"]);
    let b2 = dir.path("b2.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&b2), "2M"]);
    qemu_io(&b2, &["write -P 1 0 512k", "write -P 5 1536k 100k"]);
    let t = dir.path("t.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b1.qcow2",
        "-F",
        "qcow2",
        s(&t),
    ]);
    qemu_io(&t, &["write -P 9 64k 64k"]);
    let view = dir.path("view.raw");
    qemu_img(&["convert", "-O", "raw", s(&t), s(&view)]);
    // Safe rebase onto b2: same guest data, new backing in the header.
    ok(&["rebase", "-b", "b2.raw", "-F", "raw", s(&t)]);
    qemu_img(&["check", "-q", s(&t)]);
    assert!(qemu_img(&["compare", s(&t), s(&view)]).contains("identical"));
    let info = json_of(&qemu_img(&["info", "--output=json", s(&t)]));
    assert_eq!(info["backing-filename"], "b2.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    // Removing the backing file flattens the image.
    ok(&["rebase", "-b", "", s(&t)]);
    let info = json_of(&qemu_img(&["info", "--output=json", s(&t)]));
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert!(qemu_img(&["compare", s(&t), s(&view)]).contains("identical"));
    // Unsafe rebase only rewrites the name: the view changes to b1 + top.
    ok(&["rebase", "-u", "-b", "b2.raw", "-F", "raw", s(&t)]);
    qemu_img(&["check", "-q", s(&t)]);
    let info = json_of(&qemu_img(&["info", "--output=json", s(&t)]));
    assert_eq!(info["backing-filename"], "b2.raw");
    // Refused: -F without -b, and non-qcow2 images.
    let (code, _, err) = image(&["rebase", "-b", "", "-F", "raw", s(&t)]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = image(&["rebase", "-b", "x", s(&b2)]);
    assert_eq!(code, 1);
    assert!(err.contains("Only qcow2"), "{err}");
}

#[test]
fn test_commit_writes_the_overlay_into_its_backing_file() {
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    let dir = TempDir::new("img-commit");
    for (base_fmt, keep) in [("qcow2", false), ("raw", false), ("qcow2", true)] {
        let base = dir.path(&format!("base.{base_fmt}"));
        let _ = std::fs::remove_file(&base);
        qemu_img(&["create", "-q", "-f", base_fmt, s(&base), "2M"]);
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", base_fmt, "-c", "write -P 1 0 1M", s(&base)]);
        assert!(cmd.output().unwrap().status.success());
        let top = dir.path("top.qcow2");
        let name = format!("base.{base_fmt}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &name,
            "-F",
            base_fmt,
            s(&top),
        ]);
        qemu_io(
            &top,
            &[
                "write -P 9 64k 100k",
                "write -z 512k 64k",
                "write -P 3 1900k 4k",
            ],
        );
        let view = dir.path("view.raw");
        qemu_img(&["convert", "-O", "raw", s(&top), s(&view)]);
        let mut args = vec!["commit"];
        if keep {
            args.push("-d");
        }
        args.push(s(&top));
        ok(&args);
        for img in [&base, &top] {
            let out = qemu_img(&["compare", s(img), s(&view)]);
            assert!(
                out.contains("identical"),
                "{base_fmt} {}: {out}",
                img.display()
            );
        }
        if base_fmt == "qcow2" {
            qemu_img(&["check", "-q", s(&base)]);
        }
        qemu_img(&["check", "-q", s(&top)]);
        let map = json_of(&qemu_img(&["map", "--output=json", s(&top)]));
        let in_top = map.as_array().unwrap().iter().any(|e| e["depth"] == 0);
        assert_eq!(in_top, keep, "{base_fmt} keep={keep}: {map}");
        let info = json_of(&qemu_img(&["info", "--output=json", s(&top)]));
        assert_eq!(info["backing-filename"], name.as_str());
    }
    let (code, _, err) = image(&["commit", s(&dir.path("base.qcow2"))]);
    assert_eq!(code, 1);
    assert!(err.contains("no backing file"), "{err}");
}

#[test]
fn test_measure_matches_qemu_img_measure() {
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    let dir = TempDir::new("img-measure");
    let raw = source(&dir);
    let q = dir.path("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "7M"]);
    qemu_io(
        &q,
        &["write -P 1 0 100k", "write -z 1M 64k", "write -P 2 5M 4k"],
    );
    let v = dir.path("v.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&v),
    ]);
    let cases: Vec<Vec<&str>> = vec![
        vec!["-O", "qcow2", "--size", "1G"],
        vec![
            "-O",
            "qcow2",
            "--size",
            "100G",
            "-o",
            "cluster_size=4k,refcount_bits=1",
        ],
        vec![
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,refcount_bits=64",
            "--size",
            "3T",
        ],
        vec!["-O", "raw", "--size", "5M"],
        vec!["-O", "qcow2", s(&q)],
        vec!["-O", "qcow2", "-o", "cluster_size=512", s(&q)],
        vec!["-O", "raw", s(&q)],
        vec!["-O", "qcow2", s(&v)],
        vec!["-O", "qcow2", s(&raw)],
    ];
    for args in cases {
        let mut full = vec!["measure"];
        full.extend(&args);
        assert_eq!(ok(&full), qemu_img(&full), "{args:?}");
        full.push("--output=json");
        assert_eq!(json_of(&ok(&full)), json_of(&qemu_img(&full)), "{args:?}");
    }
    let (code, _, err) = image(&["measure", "-O", "qcow2", "--size", "1M", s(&raw)]);
    assert_eq!(code, 1);
    assert!(err.contains("--size cannot be used together"), "{err}");
}

#[test]
fn test_convert_compressed_is_read_by_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("img-compress");
    // Text that compresses, random 8 KiB blocks repeated (matches beyond
    // QEMU's 4 KiB inflate window), zeros, and a partial last sector.
    let mut d = Vec::new();
    let mut line = 0;
    while d.len() < 1 << 20 {
        d.extend_from_slice(
            format!("line {line}: the quick brown fox jumps over the lazy dog\n").as_bytes(),
        );
        line += 1;
    }
    d.truncate(1 << 20);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let block: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for _ in 0..16 {
        d.extend_from_slice(&block);
    }
    d.resize((2 << 20) + 3000, 0);
    let n = d.len();
    d[n - 1000..].fill(0x42);
    let raw = dir.path("src.raw");
    std::fs::write(&raw, &d).unwrap();
    for opts in [
        "cluster_size=64k",
        "cluster_size=4k,compat=0.10",
        "cluster_size=2M",
    ] {
        let q = dir.path("c.qcow2");
        ok(&["convert", "-c", "-O", "qcow2", "-o", opts, s(&raw), s(&q)]);
        qemu_img(&["check", "-q", s(&q)]);
        assert!(
            qemu_img(&["compare", s(&raw), s(&q)]).contains("identical"),
            "{opts}"
        );
        assert!(
            ok(&["compare", s(&raw), s(&q)]).contains("identical"),
            "{opts}"
        );
        // Compressed clusters map as data without a host offset.
        let map = json_of(&qemu_img(&["map", "--output=json", s(&q)]));
        let compressed = map
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["data"] == true && e.get("offset").is_none());
        assert!(compressed, "{opts}: {map}");
        // (2 MiB clusters: the metadata alone outweighs the data.)
        let len = std::fs::metadata(&q).unwrap().len();
        assert!(
            opts.contains("2M") || len < d.len() as u64 / 2,
            "{opts}: {len} bytes, not compressed"
        );
    }
    let (code, _, err) = image(&["convert", "-c", "-O", "raw", s(&raw), s(&dir.path("x.raw"))]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot be compressed"), "{err}");
}

#[test]
fn test_convert_flattens_a_probed_qcow2_overlay_like_qemu_img() {
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    let dir = TempDir::new("img-flatten");
    source(&dir); // the backing file, src.raw
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "src.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 7 100k 8k"]);
    let ours = dir.path("flat.wisp.raw");
    let theirs = dir.path("flat.qemu.raw");
    ok(&["convert", "-O", "raw", s(&top), s(&ours)]);
    qemu_img(&["convert", "-O", "raw", s(&top), s(&theirs)]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
}

/// A linked clone of a VMDK is a writable qcow2 overlay whose reads fall
/// through to the (read-only) VMDK: qemu-img and wisp see the same disk.
#[test]
fn test_linked_clone_of_a_vmdk_is_a_writable_overlay() {
    if !have_qemu_img() || !have_qemu_io() {
        return;
    }
    let dir = TempDir::new("img-vmdk-overlay");
    let raw = source(&dir);
    let vmdk = dir.path("base.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&raw),
        s(&vmdk),
    ]);
    let before = std::fs::read(dir.path("base-flat.vmdk")).unwrap();
    let top = dir.path("top.qcow2");
    ok(&["clone", "--linked", s(&vmdk), s(&top)]);
    let info = json_of(&qemu_img(&["info", "--output=json", s(&top)]));
    assert_eq!(info["backing-filename-format"], "vmdk");
    qemu_io(&top, &["write -P 0x44 0 4k"]);
    let ours = dir.path("ours.raw");
    let theirs = dir.path("theirs.raw");
    ok(&["convert", "-O", "raw", s(&top), s(&ours)]);
    qemu_img(&["convert", "-O", "raw", s(&top), s(&theirs)]);
    let data = std::fs::read(&ours).unwrap();
    assert!(data == std::fs::read(&theirs).unwrap());
    assert!(data[..4096].iter().all(|&b| b == 0x44));
    assert!(
        std::fs::read(dir.path("base-flat.vmdk")).unwrap() == before,
        "the VMDK changed"
    );
}
