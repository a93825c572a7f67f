// SPDX-License-Identifier: Apache-2.0
//! Helpers shared by the `wisp image` integration tests (image_compat, image_tools).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use crate::harness::{wisp, TempDir};

pub fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-img is not installed");
    }
    ok
}

pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `wisp image ARGS`; returns (exit code, stdout, stderr).
pub fn image(args: &[&str]) -> (i32, String, String) {
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

pub fn ok(args: &[&str]) -> String {
    let (code, out, err) = image(args);
    assert_eq!(code, 0, "wisp image {args:?}: {err}");
    out
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw source with scattered data, not a whole number of 64 KiB grains.
pub fn source(dir: &TempDir) -> std::path::PathBuf {
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

/// Every field wisp's `--output=json` emits equals qemu-img's, recursively
/// (wisp may omit fields; it may not add or differ).
pub fn assert_subset(ours: &serde_json::Value, theirs: &serde_json::Value, at: &str) {
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

pub fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

pub fn have_qemu_io() -> bool {
    let ok = Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-io is not installed");
    }
    ok
}

pub fn qemu_io(img: &Path, cmds: &[&str]) {
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
