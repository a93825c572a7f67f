// SPDX-License-Identifier: Apache-2.0
//! qcow2 images that must never have their metadata overwritten: crafted
//! damage (each found by hostile-input tests), what wisp does with it, and
//! that `qemu-img check` agrees.
//!
//! Images are made by `qemu-img`/`qemu-io`; every test prints `SKIPPED` and
//! returns when they are not installed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use devices::disk::qcow2::{header, Qcow2Error, Repair};
use devices::disk::{
    open_disk, open_qcow2_for_repair, open_qcow2_metadata, DiskBackend, DiskError, DiskOptions,
    ImageFormat,
};

/// Layout of a 64 MiB qemu-img image after one 64 KiB write at 0.
const CS: u64 = 64 << 10;
const REFTABLE: u64 = CS;
const REFBLOCK: u64 = 2 * CS;
const L1: u64 = 3 * CS;
const L2: u64 = 4 * CS;
const DATA: u64 = 5 * CS;
const COPIED: u64 = 1 << 63;

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wisp-safety-{}-{n}", std::process::id()));
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

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check`'s exit code and output.
fn qemu_check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", p(path)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_info(path: &Path) -> serde_json::Value {
    let out = run(
        "qemu-img",
        &["info", "-U", "--output=json", "-f", "qcow2", p(path)],
    );
    serde_json::from_str(&out).unwrap()
}

/// A 64 MiB image with 64 KiB of 0xaa at guest offset 0 (data at [`DATA`]).
fn base(d: &Dir, name: &str) -> PathBuf {
    let img = d.join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    run("qemu-io", &["-c", "write -q -P 0xaa 0 64k", p(&img)]);
    img
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, offset)
        .unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

fn opts(path: &Path, read_only: bool) -> DiskOptions {
    DiskOptions {
        path: path.to_path_buf(),
        read_only,
        format: Some(ImageFormat::Qcow2),
    }
}

/// wisp's check verdict as `qemu-img check` exit codes (0, 2, 3; 1 = error).
fn wisp_check(path: &Path) -> i32 {
    match open_qcow2_metadata(path, true).map(|mut d| d.check(false)) {
        Ok(Ok(r)) if r.corruptions > 0 => 2,
        Ok(Ok(r)) if r.leaks > 0 => 3,
        Ok(Ok(_)) => 0,
        _ => 1,
    }
}

fn assert_rw_refused_inconsistent(path: &Path) {
    match open_disk(&opts(path, false)) {
        Err(DiskError::Qcow2 {
            source: Qcow2Error::Inconsistent(msg),
            ..
        }) => assert!(msg.contains("wisp image check -r all"), "{msg}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("an inconsistent image opened read-write"),
    }
}

/// A guest cluster aliasing metadata: refused read-write, unrepairable, and
/// a write through the run-time guard fails, writes nothing and marks the
/// image corrupt.
fn aliased_metadata_is_never_overwritten(target: u64) {
    let d = Dir::new();
    let img = base(&d, "a.qcow2");
    patch(&img, L2, &(target | COPIED).to_be_bytes());
    assert_eq!(qemu_check(&img).0, 2);
    assert_eq!(wisp_check(&img), 2);
    assert_rw_refused_inconsistent(&img);

    let before = std::fs::read(&img).unwrap();
    let report = open_qcow2_for_repair(&img)
        .unwrap()
        .check_and_repair(Some(Repair::All))
        .unwrap();
    let why = report.repair_refused.expect("repair must be refused");
    assert!(why.contains("aliased"), "{why}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "refused repair wrote"
    );
    assert_eq!(qemu_check(&img).0, 2);

    // Behind the open-time check (a repair open), the run-time guard.
    let mut disk = open_qcow2_for_repair(&img).unwrap();
    let err = disk.write_at(&[0x55; 4096], 0).unwrap_err();
    assert!(err.to_string().contains("corruption"), "{err}");
    assert!(disk.is_corrupt());
    assert!(
        disk.write_at(&[0x55; 512], 8 << 20).is_err(),
        "stays stopped"
    );
    assert!(disk.flush().is_err(), "no metadata write-back once corrupt");
    drop(disk);
    let after = std::fs::read(&img).unwrap();
    let hdr = header::OFF_INCOMPAT as usize;
    assert!(after[..hdr] == before[..hdr] && after[hdr + 8..] == before[hdr + 8..]);
    assert_eq!(qemu_info(&img)["format-specific"]["data"]["corrupt"], true);
    assert!(matches!(
        open_disk(&opts(&img, false)),
        Err(DiskError::Qcow2 {
            source: Qcow2Error::Corrupt,
            ..
        })
    ));
    assert_eq!(wisp_check(&img), 2);
}

#[test]
fn test_safety_l2_entry_pointing_at_its_own_l2_table() {
    if have_qemu() {
        aliased_metadata_is_never_overwritten(L2);
    }
}

#[test]
fn test_safety_l2_entry_pointing_at_a_refcount_block() {
    if have_qemu() {
        aliased_metadata_is_never_overwritten(REFBLOCK);
    }
}

#[test]
fn test_safety_l2_entry_pointing_at_the_l1_and_refcount_tables() {
    if have_qemu() {
        aliased_metadata_is_never_overwritten(L1);
        aliased_metadata_is_never_overwritten(REFTABLE);
    }
}

/// Damaged refcounts: read-only still works, read-write is refused, and
/// `check -r all` leaves an image qemu-img calls clean, data intact.
fn broken_refcounts_refuse_writes_until_repaired(img: &Path) {
    assert_eq!(qemu_check(img).0, 2);
    assert_eq!(wisp_check(img), 2);
    assert_rw_refused_inconsistent(img);
    let mut ro = open_disk(&opts(img, true)).unwrap();
    let mut buf = [0u8; 16];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xaa; 16]);
    drop(ro);
    let report = open_qcow2_for_repair(img)
        .unwrap()
        .check_and_repair(Some(Repair::All))
        .unwrap();
    assert!(report.is_clean(), "{report:?}");
    let (code, text) = qemu_check(img);
    assert_eq!(code, 0, "{text}");
    assert_eq!(wisp_check(img), 0);
    let mut rw = open_disk(&opts(img, false)).unwrap();
    rw.write_at(&[0xbb; 4096], 1 << 20).unwrap();
    rw.flush().unwrap();
    drop(rw);
    let mut ro = open_disk(&opts(img, true)).unwrap();
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xaa; 16]);
    ro.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [0xbb; 16], "a flushed write is never lost");
    drop(ro);
    assert_eq!(qemu_check(img).0, 0);
}

#[test]
fn test_safety_zeroed_refcounts_refuse_writes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "z.qcow2");
    patch(&img, REFBLOCK, &[0u8; 12]);
    broken_refcounts_refuse_writes_until_repaired(&img);
}

#[test]
fn test_safety_refcount_order_zero_refuses_writes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "o.qcow2");
    patch(&img, 96, &0u32.to_be_bytes());
    broken_refcounts_refuse_writes_until_repaired(&img);
}

#[test]
fn test_safety_refcount_table_at_the_header_is_reported_not_opened() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "h.qcow2");
    patch(&img, header::OFF_REFTABLE, &0u64.to_be_bytes());
    assert_eq!(qemu_check(&img).0, 2);
    assert_eq!(wisp_check(&img), 2);
    assert!(open_disk(&opts(&img, false)).is_err());
    // Not repairable: the repair open is refused, and nothing is written.
    let before = std::fs::read(&img).unwrap();
    assert!(open_qcow2_for_repair(&img).is_err());
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn test_safety_refcount_table_over_the_l1_table_refuses_writes() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "t.qcow2");
    patch(&img, header::OFF_REFTABLE, &L1.to_be_bytes());
    assert_ne!(qemu_check(&img).0, 0);
    assert_eq!(wisp_check(&img), 2);
    assert_rw_refused_inconsistent(&img);
}

/// Reserved bits are corruption for both tools, and not repaired.
fn reserved_bits_are_reported(offset: u64, entry: u64) {
    let d = Dir::new();
    let img = base(&d, "r.qcow2");
    patch(&img, offset, &entry.to_be_bytes());
    let (code, text) = qemu_check(&img);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("reserved bits"), "{text}");
    let report = open_qcow2_metadata(&img, true)
        .unwrap()
        .check(false)
        .unwrap();
    assert!(
        report.messages.iter().any(|m| m.contains("reserved bits")),
        "{report:?}"
    );
    assert_rw_refused_inconsistent(&img);
    let report = open_qcow2_for_repair(&img)
        .unwrap()
        .check_and_repair(Some(Repair::All))
        .unwrap();
    assert!(report.repair_refused.is_some());
    assert_eq!(qemu_check(&img).0, 2);
}

#[test]
fn test_safety_reserved_bits_in_l2_entry() {
    if have_qemu() {
        reserved_bits_are_reported(L2, DATA | COPIED | 0x2);
    }
}

#[test]
fn test_safety_reserved_bits_in_l1_entry() {
    if have_qemu() {
        reserved_bits_are_reported(L1, L2 | COPIED | 0x4);
    }
}

/// Bitmap flag names qemu-img reports for the first bitmap.
fn bitmap_flags(img: &Path) -> Vec<String> {
    let v = qemu_info(img);
    v["format-specific"]["data"]["bitmaps"][0]["flags"]
        .as_array()
        .map(|a| a.iter().map(|f| f.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn test_safety_persistent_bitmaps_are_counted_and_marked_in_use_on_write() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "b.qcow2");
    run("qemu-img", &["bitmap", "--add", p(&img), "b0"]);
    run("qemu-io", &["-c", "write -q -P 0x11 1M 64k", p(&img)]);
    assert_eq!(qemu_check(&img).0, 0);
    assert_eq!(wisp_check(&img), 0, "bitmap clusters are no leaks");
    // A leak repair keeps the bitmap.
    let r = open_qcow2_for_repair(&img)
        .unwrap()
        .check_and_repair(Some(Repair::Leaks))
        .unwrap();
    assert_eq!((r.leaks, r.corruptions), (0, 0));
    assert_eq!(bitmap_flags(&img), ["auto"]);

    let mut disk = open_disk(&opts(&img, false)).unwrap();
    disk.write_at(&[0x22; 4096], 2 << 20).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let flags = bitmap_flags(&img);
    assert!(flags.contains(&"in-use".to_string()), "{flags:?}");
    assert_eq!(qemu_check(&img).0, 0);
    assert_eq!(wisp_check(&img), 0);
}

#[test]
fn test_safety_internal_snapshots_are_counted_and_leaks_repaired() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "s.qcow2");
    run("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    run("qemu-io", &["-c", "write -q -P 0x33 32k 64k", p(&img)]);
    assert_eq!(qemu_check(&img).0, 0);
    assert_eq!(wisp_check(&img), 0, "snapshot clusters are no leaks");
    // Leak one cluster: give the cluster at the end of the file refcount 1.
    let len = std::fs::metadata(&img).unwrap().len();
    let c = len / CS;
    patch(&img, REFBLOCK + c * 2, &1u16.to_be_bytes());
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len + CS)
        .unwrap();
    assert_eq!(qemu_check(&img).0, 3);
    assert_eq!(wisp_check(&img), 3);
    let r = open_qcow2_for_repair(&img)
        .unwrap()
        .check_and_repair(Some(Repair::Leaks))
        .unwrap();
    assert_eq!((r.leaks, r.leaks_fixed), (1, 1), "{r:?}");
    assert_eq!(qemu_check(&img).0, 0);
    let list = run("qemu-img", &["snapshot", "-l", p(&img)]);
    assert!(list.contains("s1"), "{list}");
}

#[test]
fn test_safety_corrupt_flag_is_a_corruption_until_repaired() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = base(&d, "c.qcow2");
    patch(
        &img,
        header::OFF_INCOMPAT,
        &header::INCOMPAT_CORRUPT.to_be_bytes(),
    );
    // qemu-img check only looks at the tables (exit 0); wisp reports the
    // flag, since the VM would refuse the image.
    assert_eq!(wisp_check(&img), 2);
    let r = open_qcow2_for_repair(&img)
        .unwrap()
        .check_and_repair(Some(Repair::All))
        .unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(qemu_info(&img)["format-specific"]["data"]["corrupt"], false);
    assert_eq!(wisp_check(&img), 0);
    assert!(open_disk(&opts(&img, false)).is_ok());
}

#[test]
fn test_safety_data_writes_stay_in_data_clusters() {
    if !have_qemu() {
        return;
    }
    let d = Dir::new();
    let img = d.join("w.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&img),
            "32M",
        ],
    );
    let mut disk = open_qcow2_metadata(&img, false).unwrap();
    disk.record_data_writes();
    let mut checked = 0;
    for i in 0..400u64 {
        let off = ((i * 7919 * 512) % (32 << 20)).min((32 << 20) - 3000);
        disk.write_at(&[i as u8; 3000], off).unwrap();
        if i % 7 == 0 {
            let start = off & !4095;
            disk.discard(start, 8192.min((32 << 20) - start)).unwrap();
        }
        if i % 50 == 49 {
            // Clusters freed by a flush may become metadata later, so each
            // flush interval's writes are checked against the metadata at
            // its end (16 L2 tables: the cache never evicts, which would
            // flush mid-interval).
            disk.flush().unwrap();
            let meta = metadata_clusters(&img, 4096);
            for &(off, len) in disk.data_writes() {
                for c in off / 4096..(off + len).div_ceil(4096) {
                    assert!(!meta.contains(&c), "data write at {off:#x} hit metadata");
                }
                checked += 1;
            }
            disk.record_data_writes();
        }
    }
    drop(disk);
    assert!(checked > 400, "{checked} writes checked");
    assert_eq!(qemu_check(&img).0, 0);
}

/// Clusters holding the header, L1, L2, refcount table and blocks, parsed
/// independently of wisp's reader (64-bit fields at fixed header offsets).
fn metadata_clusters(img: &Path, cs: u64) -> std::collections::HashSet<u64> {
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    let h = read_at(img, 0, 72);
    let l1_size = u32::from_be_bytes(h[36..40].try_into().unwrap()) as usize;
    let (l1_off, rt_off) = (be(&h[40..48]), be(&h[48..56]));
    let rt_clusters = u32::from_be_bytes(h[56..60].try_into().unwrap()) as u64;
    let mut set = std::collections::HashSet::from([0u64]);
    for c in 0..(l1_size as u64 * 8).div_ceil(cs) {
        set.insert(l1_off / cs + c);
    }
    for c in 0..rt_clusters {
        set.insert(rt_off / cs + c);
    }
    let mask = 0x00ff_ffff_ffff_fe00;
    for e in read_at(img, rt_off, (rt_clusters * cs) as usize).chunks(8) {
        if be(e) & mask != 0 {
            set.insert((be(e) & mask) / cs);
        }
    }
    for e in read_at(img, l1_off, l1_size * 8).chunks(8) {
        if be(e) & mask != 0 {
            set.insert((be(e) & mask) / cs);
        }
    }
    set
}
