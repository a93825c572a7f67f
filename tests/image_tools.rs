// SPDX-License-Identifier: Apache-2.0
//! `wisp image compare|map|measure|rebase|commit`, `convert -c` and linked
//! clones of VMDKs, each checked against qemu-img on the same images.
//!
//! Tests needing qemu-img or qemu-io print `SKIPPED: ...` and return when missing.

mod harness;
mod image_util;

use std::process::Command;

use harness::TempDir;
use image_util::*;

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
