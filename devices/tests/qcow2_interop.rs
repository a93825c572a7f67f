// SPDX-License-Identifier: Apache-2.0
//! Interoperability with QEMU's tools: images either side writes, the other reads.
//!
//! Every test skips (with a printed reason) when `qemu-img` is not installed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use devices::disk::qcow2::{self, CreateOptions, Preallocation};
use devices::disk::{open_disk, DiskBackend, DiskError, DiskOptions, ImageFormat};

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wisp-interop-{}-{n}", std::process::id()));
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

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: {tool} is not installed");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Deterministic bytes for a seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes to `disk` and mirrors every write into a raw reference file.
fn scribble(disk: &mut dyn DiskBackend, reference: &File, seed: u64, writes: usize) {
    let size = disk.size();
    let mut x = seed | 1;
    for i in 0..writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x % 200_000) as usize;
        let off = (x >> 20) % (size - len as u64);
        let data = pattern(seed + i as u64, len);
        disk.write_at(&data, off).unwrap();
        reference.write_all_at(&data, off).unwrap();
    }
}

fn qemu_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", p(path)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img check failed: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v.get("leaks").and_then(|l| l.as_u64()).unwrap_or(0),
        0,
        "{text}"
    );
    assert_eq!(
        v.get("corruptions").and_then(|l| l.as_u64()).unwrap_or(0),
        0,
        "{text}"
    );
}

fn raw_reference(path: &Path, size: u64) -> File {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    f
}

fn read_all(disk: &mut dyn DiskBackend) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    // Odd-sized reads exercise cluster boundaries.
    let mut pos = 0;
    while pos < buf.len() {
        let n = (buf.len() - pos).min(123_457);
        disk.read_at(&mut buf[pos..pos + n], pos as u64).unwrap();
        pos += n;
    }
    buf
}

fn open(path: &Path, read_only: bool) -> Box<dyn DiskBackend> {
    let opts = DiskOptions {
        path: path.to_path_buf(),
        read_only,
        format: Some(ImageFormat::Qcow2),
    };
    // A qemu-img forked by a parallel test holds copies of our descriptors
    // (and so our flock) until it execs: retry briefly.
    for _ in 0..50 {
        match open_disk(&opts) {
            Err(DiskError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
    open_disk(&opts).unwrap()
}

fn wisp_writes_qemu_agrees(version: u32, cluster_size: u64, refcount_bits: u32) {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let img = d.join("w.qcow2");
    let size = 24 << 20;
    qcow2::create(
        &img,
        &CreateOptions {
            size,
            cluster_size,
            version,
            refcount_bits,
            ..Default::default()
        },
    )
    .unwrap();
    let reference = raw_reference(&d.join("ref.raw"), size);
    {
        let mut disk = open(&img, false);
        scribble(
            disk.as_mut(),
            &reference,
            cluster_size + u64::from(version),
            40,
        );
        disk.flush().unwrap();
    }
    qemu_check_clean(&img);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&img),
            p(&d.join("ref.raw")),
        ],
    );
}

#[test]
fn test_interop_wisp_v3_64k_passes_qemu_check() {
    wisp_writes_qemu_agrees(3, 64 << 10, 16);
}

#[test]
fn test_interop_wisp_v2_4k_passes_qemu_check() {
    wisp_writes_qemu_agrees(2, 4096, 16);
}

#[test]
fn test_interop_wisp_512b_clusters_grow_refcount_table() {
    wisp_writes_qemu_agrees(3, 512, 16);
}

#[test]
fn test_interop_wisp_2m_clusters_one_bit_refcounts() {
    wisp_writes_qemu_agrees(3, 2 << 20, 1);
}

#[test]
fn test_interop_wisp_64bit_refcounts() {
    wisp_writes_qemu_agrees(3, 8192, 64);
}

/// qemu-img creates, qemu-io writes; wisp must read what qemu-img converts to raw.
fn qemu_writes_wisp_reads(create_opts: &str, io_cmds: &[&str]) {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = Dir::new();
    let img = d.join("q.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            create_opts,
            p(&img),
            "16M",
        ],
    );
    for c in io_cmds {
        run("qemu-io", &["-f", "qcow2", "-c", c, p(&img)]);
    }
    let raw = d.join("q.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&raw)],
    );
    let expected = std::fs::read(&raw).unwrap();
    let mut disk = open(&img, true);
    assert!(read_all(disk.as_mut()) == expected);
}

const IO: &[&str] = &[
    "write -P 0xab 0 100k",
    "write -P 0xcd 1M 3M",
    "write -P 0x11 5000 7000",
    "write -z 2M 512k",
    "discard 3M 128k",
    "write -P 0x22 15M 1M",
];

#[test]
fn test_interop_qemu_v2_64k_reads_back() {
    qemu_writes_wisp_reads("compat=0.10,cluster_size=65536", IO);
}

#[test]
fn test_interop_qemu_v3_4k_reads_back() {
    qemu_writes_wisp_reads("compat=1.1,cluster_size=4096", IO);
}

#[test]
fn test_interop_qemu_v3_512b_refcount1_reads_back() {
    qemu_writes_wisp_reads("compat=1.1,cluster_size=512,refcount_bits=1", IO);
}

#[test]
fn test_interop_qemu_v3_2m_reads_back() {
    qemu_writes_wisp_reads("compat=1.1,cluster_size=2M", IO);
}

fn compressed(extra: &str) {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let raw = d.join("src.raw");
    let mut data = vec![0u8; 8 << 20];
    for (i, chunk) in data.chunks_mut(64 << 10).enumerate() {
        if i % 3 != 0 {
            let half = chunk.len() / 2;
            chunk[..half].copy_from_slice(&pattern(i as u64, half));
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let img = d.join("c.qcow2");
    let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
    if !extra.is_empty() {
        args.extend(["-o", extra]);
    }
    args.extend([p(&raw), p(&img)]);
    let out = Command::new("qemu-img").args(&args).output().unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped: qemu-img cannot compress with {extra}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let mut disk = open(&img, true);
    assert!(read_all(disk.as_mut()) == data);
}

#[test]
fn test_interop_deflate_compressed_reads_back() {
    compressed("");
}

#[test]
fn test_interop_zstd_compressed_reads_back() {
    compressed("compression_type=zstd");
}

#[test]
fn test_interop_overwrite_compressed_cluster_stays_clean() {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let raw = d.join("src.raw");
    std::fs::write(&raw, pattern(5, 1 << 20).repeat(2)).unwrap();
    let img = d.join("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&raw),
            p(&img),
        ],
    );
    {
        let mut disk = open(&img, false);
        disk.write_at(&[0x5a; 1000], 70_000).unwrap();
        disk.flush().unwrap();
    }
    let f = File::options().write(true).open(&raw).unwrap();
    f.write_all_at(&[0x5a; 1000], 70_000).unwrap();
    qemu_check_clean(&img);
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(&img), p(&raw)],
    );
}

#[test]
fn test_interop_backing_chain_reads_through() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = Dir::new();
    let base = d.join("base.raw");
    std::fs::write(&base, pattern(1, 4 << 20)).unwrap();
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            p(&mid),
            "8M",
        ],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x77 1M 64k", p(&mid)],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x99 1056k 10k",
            "-c",
            "write -z 0 4k",
            p(&top),
        ],
    );
    let raw = d.join("flat.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&top), p(&raw)],
    );
    let mut disk = open(&top, true);
    assert!(read_all(disk.as_mut()) == std::fs::read(&raw).unwrap());
}

#[test]
fn test_interop_wisp_overlay_writes_keep_backing_intact() {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let base = d.join("base.raw");
    let content = pattern(2, 4 << 20);
    std::fs::write(&base, &content).unwrap();
    let top = d.join("top.qcow2");
    qcow2::create(
        &top,
        &CreateOptions {
            size: 4 << 20,
            backing_file: Some("base.raw".into()),
            backing_format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let reference = raw_reference(&d.join("ref.raw"), 4 << 20);
    reference.write_all_at(&content, 0).unwrap();
    {
        let mut disk = open(&top, false);
        scribble(disk.as_mut(), &reference, 9, 10);
        disk.discard(0, 200_000).unwrap();
        reference.write_all_at(&vec![0u8; 200_000], 0).unwrap();
        disk.flush().unwrap();
    }
    assert!(std::fs::read(&base).unwrap() == content);
    qemu_check_clean(&top);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&top),
            p(&d.join("ref.raw")),
        ],
    );
}

#[test]
fn test_interop_wisp_discard_and_zeroes_stay_clean() {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let img = d.join("z.qcow2");
    let size = 8 << 20;
    qcow2::create(
        &img,
        &CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let reference = raw_reference(&d.join("ref.raw"), size);
    {
        let mut disk = open(&img, false);
        scribble(disk.as_mut(), &reference, 3, 20);
        disk.discard(100_000, 1 << 20).unwrap();
        reference
            .write_all_at(&vec![0u8; 1 << 20], 100_000)
            .unwrap();
        disk.write_zeroes(3 << 20, 300_000, false).unwrap();
        reference
            .write_all_at(&vec![0u8; 300_000], 3 << 20)
            .unwrap();
        disk.write_zeroes(5 << 20, 1 << 20, true).unwrap();
        reference
            .write_all_at(&vec![0u8; 1 << 20], 5 << 20)
            .unwrap();
        disk.flush().unwrap();
        // Freed clusters get reused by later writes.
        scribble(disk.as_mut(), &reference, 4, 20);
        disk.flush().unwrap();
    }
    qemu_check_clean(&img);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&img),
            p(&d.join("ref.raw")),
        ],
    );
}

#[test]
fn test_interop_wisp_preallocated_and_resized_stay_clean() {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let img = d.join("p.qcow2");
    qcow2::create(
        &img,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            preallocation: Preallocation::Metadata,
            ..Default::default()
        },
    )
    .unwrap();
    qemu_check_clean(&img);
    let file = File::options().read(true).write(true).open(&img).unwrap();
    let mut disk = qcow2::Qcow2Disk::open_with(file, &img, false, |_| unreachable!()).unwrap();
    disk.resize(3 << 30).unwrap();
    disk.write_at(b"tail", (3 << 30) - 4).unwrap();
    drop(disk);
    qemu_check_clean(&img);
    let info = run("qemu-img", &["info", "--output=json", p(&img)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(3 << 30));
    let io = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x74 3221225468 1", p(&img)],
    );
    assert!(!io.contains("Pattern verification failed"), "{io}");
}

/// qemu-img creates with `create_opts`, wisp writes, qemu-img checks and compares.
fn qemu_creates_wisp_writes(create_opts: &str) {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let img = d.join("q.qcow2");
    let size = 16u64 << 20;
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            create_opts,
            p(&img),
            "16M",
        ],
    );
    let reference = raw_reference(&d.join("ref.raw"), size);
    {
        let mut disk = open(&img, false);
        scribble(disk.as_mut(), &reference, 21, 30);
        disk.discard(1 << 20, 1 << 20).unwrap();
        reference
            .write_all_at(&vec![0u8; 1 << 20], 1 << 20)
            .unwrap();
        disk.flush().unwrap();
    }
    qemu_check_clean(&img);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&img),
            p(&d.join("ref.raw")),
        ],
    );
}

#[test]
fn test_interop_qemu_v2_image_takes_wisp_writes() {
    qemu_creates_wisp_writes("compat=0.10,cluster_size=4096");
}

#[test]
fn test_interop_qemu_refcount1_512b_image_takes_wisp_writes() {
    qemu_creates_wisp_writes("compat=1.1,cluster_size=512,refcount_bits=1");
}

#[test]
fn test_interop_qemu_preallocated_image_takes_wisp_writes() {
    qemu_creates_wisp_writes("preallocation=metadata,cluster_size=65536");
}

#[test]
fn test_interop_qemu_lazy_refcounts_image_takes_wisp_writes() {
    qemu_creates_wisp_writes("lazy_refcounts=on");
}

#[test]
fn test_interop_dirty_lazy_refcount_image_is_repaired_on_open() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = Dir::new();
    let img = d.join("dirty.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p(&img),
            "8M",
        ],
    );
    // abort leaves the dirty bit set and the refcounts stale.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x12 0 1M",
            "-c",
            "abort",
            p(&img),
        ])
        .output()
        .unwrap();
    let h = qcow2::Header::read(&File::open(&img).unwrap()).unwrap();
    if h.incompatible_features & qcow2::header::INCOMPAT_DIRTY == 0 {
        eprintln!("skipped: qemu-io abort did not leave the image dirty");
        return;
    }
    {
        let mut disk = open(&img, false);
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0x12; 4]);
    }
    let h = qcow2::Header::read(&File::open(&img).unwrap()).unwrap();
    assert_eq!(h.incompatible_features & qcow2::header::INCOMPAT_DIRTY, 0);
    qemu_check_clean(&img);
}

#[test]
fn test_interop_internal_snapshot_image_reads_active_layer_read_only() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = Dir::new();
    let img = d.join("s.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x01 0 1M", p(&img)],
    );
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x02 64k 64k", p(&img)],
    );
    let raw = d.join("s.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&raw)],
    );
    let mut disk = open(&img, true);
    assert!(read_all(disk.as_mut()) == std::fs::read(&raw).unwrap());
    drop(disk);
    let err = open_disk(&DiskOptions {
        path: img.clone(),
        read_only: false,
        format: Some(ImageFormat::Qcow2),
    })
    .err()
    .unwrap();
    assert!(err.to_string().starts_with("Invalid qcow2 image"), "{err}");
}

#[test]
fn test_interop_stress_small_clusters_evictions_discards_reuse() {
    if !have("qemu-img") {
        return;
    }
    let d = Dir::new();
    let img = d.join("stress.qcow2");
    let size = 64u64 << 20;
    qcow2::create(
        &img,
        &CreateOptions {
            size,
            cluster_size: 512,
            refcount_bits: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let reference = raw_reference(&d.join("ref.raw"), size);
    {
        let mut disk = open(&img, false);
        let mut x: u64 = 77;
        for round in 0..6u64 {
            scribble(disk.as_mut(), &reference, round * 1000 + 1, 25);
            for _ in 0..10 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = x % 300_000;
                let off = (x >> 24) % (size - len);
                if x.is_multiple_of(2) {
                    disk.discard(off, len).unwrap();
                } else {
                    disk.write_zeroes(off, len, x.is_multiple_of(3)).unwrap();
                }
                reference
                    .write_all_at(&vec![0u8; len as usize], off)
                    .unwrap();
            }
            if round.is_multiple_of(2) {
                disk.flush().unwrap();
            }
        }
        disk.flush().unwrap();
    }
    qemu_check_clean(&img);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&img),
            p(&d.join("ref.raw")),
        ],
    );
}

#[test]
fn test_interop_wisp_check_finds_qemu_images_clean() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = Dir::new();
    for (i, o) in [
        "compat=0.10",
        "preallocation=metadata",
        "preallocation=falloc",
        "lazy_refcounts=on",
        "cluster_size=512,refcount_bits=2",
        "cluster_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let img = d.join(&format!("{i}.qcow2"));
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, p(&img), "20M"],
        );
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 3 0 3M",
                "-c",
                "write -z 4M 1M",
                "-c",
                "discard 1M 512k",
                p(&img),
            ],
        );
        let report = devices::disk::open_qcow2_metadata(&img, true)
            .unwrap()
            .check(false)
            .unwrap();
        assert!(report.is_clean(), "{o}: {report:?}");
    }
}
