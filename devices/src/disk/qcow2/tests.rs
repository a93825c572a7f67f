// SPDX-License-Identifier: Apache-2.0
//! qcow2 behaviour and hostile-image tests.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::disk::testutil::TempDir;
use crate::disk::{open_disk, DiskError, DiskOptions};

const CS: u64 = 64 << 10;
/// Layout of a fresh 64 KiB-cluster image: header, reftable, refblock, L1.
const L1_OFF: u64 = 3 * CS;
/// First cluster allocated by a write: the L2 table, then data.
const L2_OFF: u64 = 4 * CS;
const DATA_OFF: u64 = 5 * CS;

fn image(dir: &TempDir, name: &str, opts: CreateOptions) -> PathBuf {
    let p = dir.join(name);
    create(&p, &opts).unwrap();
    p
}

fn small(dir: &TempDir) -> PathBuf {
    image(
        dir,
        "a.qcow2",
        CreateOptions {
            size: 16 << 20,
            ..Default::default()
        },
    )
}

fn opts(path: &Path, read_only: bool) -> DiskOptions {
    DiskOptions {
        path: path.to_path_buf(),
        read_only,
        format: Some(ImageFormat::Qcow2),
    }
}

fn open(path: &Path, read_only: bool) -> Result<Box<dyn DiskBackend>, DiskError> {
    open_disk(&opts(path, read_only))
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = File::options().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn qcow2_error(path: &Path) -> Qcow2Error {
    match open(path, false) {
        Err(DiskError::Qcow2 { source, .. }) => source,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("hostile image opened"),
    }
}

fn metadata(path: &Path, read_only: bool) -> Qcow2Disk {
    crate::disk::open_qcow2_metadata(path, read_only).unwrap()
}

/// Writable without the open-time consistency checks (as `check -r`), so
/// tests reach the run-time guards behind them.
pub(super) fn repair_open(path: &Path) -> Qcow2Disk {
    crate::disk::open_qcow2_for_repair(path).unwrap()
}

/// Asserts a read-write open is refused as inconsistent.
pub(super) fn assert_refused_inconsistent(path: &Path) {
    match open(path, false) {
        Err(DiskError::Qcow2 {
            source: Qcow2Error::Inconsistent(msg),
            ..
        }) => assert!(msg.contains("wisp image check -r all"), "{msg}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("inconsistent image opened read-write"),
    }
}

/// An image with one written cluster at guest offset 0.
fn written(dir: &TempDir) -> PathBuf {
    let p = small(dir);
    let mut d = open(&p, false).unwrap();
    d.write_at(&[0xaa; 4096], 0).unwrap();
    d.flush().unwrap();
    p
}

#[test]
fn test_qcow2_write_across_clusters_reads_back() {
    let dir = TempDir::new();
    let p = small(&dir);
    let mut d = open(&p, false).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    d.write_at(&data, CS - 100).unwrap();
    let mut back = vec![0u8; data.len()];
    d.read_at(&mut back, CS - 100).unwrap();
    assert_eq!(back, data);
}

#[test]
fn test_qcow2_unallocated_reads_zero() {
    let dir = TempDir::new();
    let p = small(&dir);
    let mut d = open(&p, true).unwrap();
    let mut buf = vec![1u8; 8192];
    d.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn test_qcow2_data_persists_after_reopen() {
    let dir = TempDir::new();
    let p = written(&dir);
    let mut d = open(&p, true).unwrap();
    let mut buf = [0u8; 4];
    d.read_at(&mut buf, 4092).unwrap();
    assert_eq!(buf, [0xaa; 4]);
}

#[test]
fn test_qcow2_read_only_write_is_refused() {
    let dir = TempDir::new();
    let p = small(&dir);
    let mut d = open(&p, true).unwrap();
    let err = d.write_at(b"x", 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
}

#[test]
fn test_qcow2_write_past_end_is_invalid_input() {
    let dir = TempDir::new();
    let p = small(&dir);
    let mut d = open(&p, false).unwrap();
    let err = d.write_at(b"xy", (16 << 20) - 1).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn test_qcow2_discard_frees_cluster_without_leak() {
    let dir = TempDir::new();
    let p = written(&dir);
    {
        let mut d = open(&p, false).unwrap();
        d.discard(0, CS).unwrap();
        d.flush().unwrap();
        let mut buf = [1u8; 16];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 16]);
    }
    let report = metadata(&p, true).check(false).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0));
    assert_eq!(report.allocated_clusters, 5);
}

#[test]
fn test_qcow2_write_zeroes_without_unmap_keeps_cluster() {
    let dir = TempDir::new();
    let p = written(&dir);
    {
        let mut d = open(&p, false).unwrap();
        d.write_zeroes(0, CS, false).unwrap();
        let mut buf = [1u8; 16];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 16]);
    }
    let report = metadata(&p, true).check(false).unwrap();
    assert_eq!(report.allocated_clusters, 6);
    assert!(report.is_clean());
}

#[test]
fn test_qcow2_partial_discard_zeroes_only_the_range() {
    let dir = TempDir::new();
    let p = written(&dir);
    let mut d = open(&p, false).unwrap();
    d.discard(100, 200).unwrap();
    let mut buf = [0u8; 400];
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[99], 0xaa);
    assert!(buf[100..300].iter().all(|&b| b == 0));
    assert_eq!(buf[300], 0xaa);
}

#[test]
fn test_qcow2_check_finds_and_repairs_leak() {
    let dir = TempDir::new();
    let p = written(&dir);
    {
        let mut d = metadata(&p, false);
        let off = d.alloc(1).unwrap();
        // Inside the file (refcounts past its end are not looked at).
        d.file.write_all_at(&[1], off + CS - 1).unwrap();
        d.data_dirty = true;
        d.flush_metadata().unwrap();
    }
    let report = metadata(&p, false).check(true).unwrap();
    assert_eq!((report.leaks, report.leaks_fixed), (1, 1));
    let after = metadata(&p, true).check(false).unwrap();
    assert_eq!(after.leaks, 0);
}

#[test]
fn test_qcow2_check_finds_wrong_refcount_as_corruption() {
    let dir = TempDir::new();
    let p = written(&dir);
    // Refcount of the data cluster (cluster 5) in the 16-bit refcount block at cluster 2.
    patch(&p, 2 * CS + 5 * 2, &[0, 0]);
    let report = metadata(&p, true).check(false).unwrap();
    // The refcount, and the COPIED flag judged by the stored refcount (as QEMU).
    assert_eq!(report.corruptions, 2, "{:?}", report.messages);
}

#[test]
fn test_qcow2_dirty_bit_is_repaired_on_read_write_open() {
    let dir = TempDir::new();
    let p = written(&dir);
    patch(&p, 2 * CS + 5 * 2, &[0, 0]);
    patch(
        &p,
        header::OFF_INCOMPAT,
        &header::INCOMPAT_DIRTY.to_be_bytes(),
    );
    drop(open(&p, false).unwrap());
    let d = metadata(&p, true);
    assert_eq!(d.header().incompatible_features & header::INCOMPAT_DIRTY, 0);
    drop(d);
    assert!(metadata(&p, true).check(false).unwrap().is_clean());
}

#[test]
fn test_qcow2_resize_grows_and_new_area_reads_zero() {
    let dir = TempDir::new();
    let p = written(&dir);
    crate::disk::resize_image(&p, Some(ImageFormat::Qcow2), 8 << 30).unwrap();
    let mut d = open(&p, false).unwrap();
    assert_eq!(d.size(), 8 << 30);
    d.write_at(b"end", (8 << 30) - 3).unwrap();
    let mut buf = [0u8; 3];
    d.read_at(&mut buf, (8 << 30) - 3).unwrap();
    assert_eq!(&buf, b"end");
    let mut first = [0u8; 1];
    d.read_at(&mut first, 0).unwrap();
    assert_eq!(first[0], 0xaa);
}

#[test]
fn test_qcow2_resize_shrink_is_refused() {
    let dir = TempDir::new();
    let p = small(&dir);
    let err = crate::disk::resize_image(&p, Some(ImageFormat::Qcow2), 1 << 20).unwrap_err();
    assert!(matches!(err, DiskError::InvalidOptions(_)));
}

#[test]
fn test_qcow2_backing_relative_path_reads_through() {
    let dir = TempDir::new();
    std::fs::write(dir.join("base.raw"), vec![0x42u8; 1 << 20]).unwrap();
    let top = image(
        &dir,
        "top.qcow2",
        CreateOptions {
            size: 2 << 20,
            backing_file: Some("base.raw".into()),
            backing_format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    );
    let mut d = open(&top, false).unwrap();
    d.write_at(b"new", 10).unwrap();
    let mut buf = [0u8; 16];
    d.read_at(&mut buf, 8).unwrap();
    assert_eq!(
        &buf,
        b"\x42\x42new\x42\x42\x42\x42\x42\x42\x42\x42\x42\x42\x42"
    );
    // Past the end of the smaller backing file: zeros.
    let mut tail = [1u8; 4];
    d.read_at(&mut tail, (1 << 20) + 4).unwrap();
    assert_eq!(tail, [0; 4]);
}

#[test]
fn test_qcow2_v2_discard_over_backing_reads_zero() {
    let dir = TempDir::new();
    std::fs::write(dir.join("base.raw"), vec![0x42u8; 1 << 20]).unwrap();
    let top = image(
        &dir,
        "top.qcow2",
        CreateOptions {
            size: 1 << 20,
            version: 2,
            backing_file: Some("base.raw".into()),
            backing_format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    );
    let mut d = open(&top, false).unwrap();
    d.discard(0, CS).unwrap();
    let mut buf = [1u8; 8];
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0; 8]);
}

#[test]
fn test_qcow2_probed_image_with_backing_is_refused() {
    let dir = TempDir::new();
    std::fs::write(dir.join("base.raw"), vec![0u8; 4096]).unwrap();
    let top = image(
        &dir,
        "top.qcow2",
        CreateOptions {
            size: 4096,
            backing_file: Some("base.raw".into()),
            ..Default::default()
        },
    );
    let err = open_disk(&DiskOptions::new(&top)).err().unwrap();
    assert!(matches!(err, DiskError::ProbedBacking { .. }));
    assert!(err.to_string().contains("format=qcow2"));
}

#[test]
fn test_qcow2_probed_image_without_backing_opens() {
    let dir = TempDir::new();
    let p = small(&dir);
    let d = open_disk(&DiskOptions::new(&p)).unwrap();
    assert_eq!(d.size(), 16 << 20);
}

#[test]
fn test_qcow2_self_backing_is_cycle() {
    let dir = TempDir::new();
    let p = image(
        &dir,
        "loop.qcow2",
        CreateOptions {
            size: 4096,
            backing_file: Some("loop.qcow2".into()),
            backing_format: Some(ImageFormat::Qcow2),
            ..Default::default()
        },
    );
    let err = open(&p, true).err().unwrap();
    assert!(matches!(err, DiskError::BackingCycle { .. }));
}

#[test]
fn test_qcow2_deep_chain_is_refused() {
    let dir = TempDir::new();
    std::fs::write(dir.join("0.img"), vec![0u8; 4096]).unwrap();
    for i in 1..=MAX_DEPTH_PLUS_TWO {
        let fmt = if i == 1 {
            ImageFormat::Raw
        } else {
            ImageFormat::Qcow2
        };
        let below = if i == 1 {
            "0.img".to_string()
        } else {
            format!("{}.img", i - 1)
        };
        image(
            &dir,
            &format!("{i}.img"),
            CreateOptions {
                size: 4096,
                backing_file: Some(below),
                backing_format: Some(fmt),
                ..Default::default()
            },
        );
    }
    let top = dir.join(&format!("{MAX_DEPTH_PLUS_TWO}.img"));
    let err = open(&top, true).err().unwrap();
    assert!(matches!(err, DiskError::BackingTooDeep { .. }));
}

const MAX_DEPTH_PLUS_TWO: usize = crate::disk::MAX_BACKING_DEPTH + 2;

#[test]
fn test_qcow2_missing_backing_names_the_overlay() {
    let dir = TempDir::new();
    let p = image(
        &dir,
        "top.qcow2",
        CreateOptions {
            size: 4096,
            backing_file: Some("gone.raw".into()),
            backing_format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    );
    let err = open(&p, true).err().unwrap();
    assert!(matches!(err, DiskError::Backing { .. }));
}

#[test]
fn test_qcow2_create_rejects_bad_cluster_size() {
    let dir = TempDir::new();
    let err = create(
        &dir.join("x.qcow2"),
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 3000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DiskError::Qcow2 { .. }));
}

#[test]
fn test_qcow2_create_preallocation_with_backing_is_refused() {
    let dir = TempDir::new();
    let err = create(
        &dir.join("x.qcow2"),
        &CreateOptions {
            size: 1 << 20,
            backing_file: Some("b".into()),
            preallocation: Preallocation::Metadata,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DiskError::InvalidOptions(_)));
}

#[test]
fn test_qcow2_header_roundtrip_keeps_backing() {
    let dir = TempDir::new();
    std::fs::write(dir.join("b.raw"), [0u8; 512]).unwrap();
    let p = image(
        &dir,
        "h.qcow2",
        CreateOptions {
            size: 1 << 20,
            backing_file: Some("b.raw".into()),
            backing_format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    );
    let h = Header::read(&File::open(&p).unwrap()).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("b.raw"));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
}

#[test]
fn test_qcow2_discarded_cluster_is_reused() {
    let dir = TempDir::new();
    let p = written(&dir);
    let mut d = open(&p, false).unwrap();
    d.discard(0, CS).unwrap();
    d.flush().unwrap();
    d.write_at(&[0xbb; 4096], 2 * CS).unwrap();
    d.flush().unwrap();
    drop(d);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), DATA_OFF + CS);
    assert!(metadata(&p, true).check(false).unwrap().is_clean());
}

#[test]
fn test_qcow2_hostile_data_cluster_over_l1_is_write_error() {
    let dir = TempDir::new();
    let p = written(&dir);
    patch(&p, L2_OFF, &(L1_OFF | COPIED).to_be_bytes());
    assert_refused_inconsistent(&p);
    let mut d = repair_open(&p);
    let err = d.write_at(b"x", 0).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::Other, "{err}");
    assert!(d.is_corrupt());
    drop(d);
    let mut l1 = [0u8; 8];
    File::open(&p)
        .unwrap()
        .read_exact_at(&mut l1, L1_OFF)
        .unwrap();
    assert_eq!(
        u64::from_be_bytes(l1),
        L2_OFF | COPIED,
        "L1 table untouched"
    );
}

#[test]
fn test_qcow2_hostile_shared_l2_table_counts_every_reference() {
    let dir = TempDir::new();
    let p = image(
        &dir,
        "big.qcow2",
        CreateOptions {
            size: 4 << 30,
            ..Default::default()
        },
    );
    {
        let mut d = open(&p, false).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
    }
    for i in 1..8u64 {
        patch(&p, L1_OFF + 8 * i, &(L2_OFF | COPIED).to_be_bytes());
    }
    let report = metadata(&p, true).check(false).unwrap();
    // The L2 table is referenced 8 times, as is its data cluster (as QEMU
    // counts them): two refcount errors. The table is read once. A repair
    // also clears the COPIED flags of the (now shared) table and cluster.
    assert_eq!(report.corruptions, 2, "{:?}", report.messages);
    let fixed = repair_open(&p).check(true).unwrap();
    assert_eq!(fixed.corruptions_fixed, 2 + 8 + 1, "{:?}", fixed.messages);
    assert!(fixed.is_clean());
    assert!(metadata(&p, true).check(false).unwrap().is_clean());
}

#[test]
fn test_qcow2_hostile_zero_refcounts_never_hand_out_metadata() {
    let dir = TempDir::new();
    let p = written(&dir);
    // Claim clusters 0..=5 (header, tables, L2, data) are all free.
    patch(&p, 2 * CS, &[0u8; 12]);
    assert_refused_inconsistent(&p);
    let mut d = repair_open(&p);
    d.write_at(&[0x77; 4096], 3 * CS).unwrap();
    d.flush().unwrap();
    drop(d);
    let h = Header::read(&File::open(&p).unwrap()).unwrap();
    assert_eq!(h.l1_table_offset, L1_OFF);
    let mut d = open(&p, true).unwrap();
    let mut buf = [0u8; 2];
    d.read_at(&mut buf, 3 * CS).unwrap();
    assert_eq!(buf, [0x77; 2]);
}

#[test]
fn test_qcow2_l2_cache_eviction_keeps_every_write() {
    let dir = TempDir::new();
    // 512 B clusters: one L2 table maps 32 KiB, and the cache holds 1024 tables.
    let p = image(
        &dir,
        "evict.qcow2",
        CreateOptions {
            size: 48 << 20,
            cluster_size: 512,
            ..Default::default()
        },
    );
    let span = 32u64 << 10;
    {
        let mut d = open(&p, false).unwrap();
        for i in 0..(48 << 20) / span {
            d.write_at(&[(i % 251) as u8 + 1], i * span + 7).unwrap();
        }
        d.flush().unwrap();
    }
    let mut d = open(&p, true).unwrap();
    for i in 0..(48 << 20) / span {
        let mut b = [0u8; 1];
        d.read_at(&mut b, i * span + 7).unwrap();
        assert_eq!(b[0], (i % 251) as u8 + 1, "write {i} lost");
    }
    drop(d);
    assert!(metadata(&p, true).check(false).unwrap().is_clean());
}

#[test]
fn test_qcow2_crash_before_flush_leaves_image_consistent() {
    let dir = TempDir::new();
    let p = written(&dir);
    let file = File::options().read(true).write(true).open(&p).unwrap();
    let mut d = Qcow2Disk::open_with(file, &p, false, |_| unreachable!()).unwrap();
    d.write_at(&[0xcc; 300_000], 5 * CS).unwrap();
    d.discard(0, CS).unwrap();
    // Simulate a crash: no write-back of cached metadata.
    std::mem::forget(d);
    let report = metadata(&p, true).check(false).unwrap();
    assert_eq!(report.corruptions, 0);
    let mut back = open(&p, true).unwrap();
    let mut buf = [0u8; 4];
    back.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xaa; 4], "flushed data survives");
}

#[test]
fn test_qcow2_check_repairs_missing_copied_flag() {
    let dir = TempDir::new();
    let p = written(&dir);
    patch(&p, L2_OFF, &DATA_OFF.to_be_bytes());
    let report = repair_open(&p).check(true).unwrap();
    assert_eq!((report.corruptions, report.corruptions_fixed), (1, 1));
    assert!(metadata(&p, true).check(false).unwrap().is_clean());
}

#[path = "hostile_tests.rs"]
mod hostile;
