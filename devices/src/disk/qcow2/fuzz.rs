// SPDX-License-Identifier: Apache-2.0
//! The harness shared by the cargo-fuzz target and the mutation smoke tests.

use std::collections::HashSet;

use super::Qcow2Disk;
use crate::disk::{open_qcow2_for_repair, open_qcow2_metadata, DiskBackend};

/// Most guest operations one input drives.
const MAX_OPS: usize = 32;

/// Fuzzing harness: opens `data` as a qcow2 image (never following a backing
/// file), reads every cluster, checks it, then runs a sequence of writes,
/// discards, zero writes and flushes on it. The input's last byte says how
/// many 4-byte operations precede it at the end; the rest is the image.
///
/// The writes run twice: opened read-write (refused unless consistent), and
/// opened as for `check -r`, which skips the open-time checks so that the
/// run-time overlap guard alone faces the hostile tables.
///
/// Must not panic, whatever `data` holds, except on the invariants it
/// asserts: no guest data write touches a cluster that holds metadata in the
/// original image (parsed here independently of the reader under test), and
/// an image that opened read-write (so passed the consistency check) has no
/// corruption after the writes.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (image, ops) = split(data);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("wisp-fuzz-{}-{n}.qcow2", std::process::id()));
    if std::fs::write(&path, image).is_err() {
        return;
    }
    if let Ok(mut disk) = open_qcow2_metadata(&path, true) {
        read_everything(&mut disk);
        let _ = disk.check(false);
    }
    for guarded_only in [false, true] {
        if std::fs::write(&path, image).is_err() {
            break;
        }
        let opened = if guarded_only {
            open_qcow2_for_repair(&path)
        } else {
            open_qcow2_metadata(&path, false)
        };
        let Ok(mut disk) = opened else {
            continue;
        };
        let (size, cs) = (disk.size(), disk.cs());
        if size == 0 {
            continue;
        }
        disk.record_data_writes();
        drive(&mut disk, ops, size, cs);
        let writes = disk.data_writes().to_vec();
        let stopped = disk.is_corrupt();
        drop(disk);
        // The refcount table fields of the header now (the file may be huge
        // and sparse: hostile tables can point far past its end).
        let mut now = [0u8; 12];
        let read = std::fs::File::open(&path).and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut now, 48)
        });
        let moved = read.is_err() || image.get(48..60) != Some(&now[..]);
        assert_writes_miss_metadata(image, moved, &writes, cs);
        if !guarded_only && !stopped {
            // It passed the open-time check: wisp's writes keep it consistent.
            let after = open_qcow2_metadata(&path, true).and_then(|mut d| {
                d.check(false).map_err(|source| crate::disk::DiskError::Io {
                    path: path.clone(),
                    source,
                })
            });
            if let Ok(report) = after {
                assert_eq!(report.corruptions, 0, "writes corrupted it: {report:?}");
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

fn read_everything(disk: &mut Qcow2Disk) {
    let size = disk.size();
    let step = (size / 64).max(disk.cs());
    let mut buf = vec![0u8; 4096];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = disk.read_at(&mut buf[..n], off);
        off = off.saturating_add(step);
    }
}

/// The invariant: data writes miss the original image's metadata (but for
/// a refcount table that moved, whose old clusters were freed for reuse).
fn assert_writes_miss_metadata(image: &[u8], moved: bool, writes: &[(u64, u64)], cs: u64) {
    let Some(meta) = metadata_clusters(image) else {
        return;
    };
    let bits = cs.trailing_zeros();
    for &(off, len) in writes {
        for c in off >> bits..=(off + len.max(1) - 1) >> bits {
            if let Some(kind) = meta.get(c) {
                assert!(
                    moved && kind == Kind::RefTable,
                    "data write at {off:#x} (+{len}) hit the original {kind:?} in cluster {c}"
                );
            }
        }
    }
}

/// Splits an input into the image and its operations.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&count, rest)) = data.split_last() else {
        return (data, &[]);
    };
    let ops = (usize::from(count) % (MAX_OPS + 1)) * 4;
    if ops > rest.len() {
        return (rest, &[]);
    }
    rest.split_at(rest.len() - ops)
}

/// Runs 4-byte operations: kind, 16-bit position, length.
fn drive(disk: &mut Qcow2Disk, ops: &[u8], size: u64, cs: u64) {
    if ops.is_empty() {
        // Seeds without operations still exercise the write path.
        let len = size.min(3 * cs + 5);
        let _ = disk.write_at(&vec![0x5a; len as usize], 0);
        let _ = disk.discard(0, size.min(cs));
        let _ = disk.write_zeroes(0, len, false);
        let _ = disk.flush();
        return;
    }
    for op in ops.chunks_exact(4) {
        let pos = (u64::from(u16::from_le_bytes([op[1], op[2]])) * 512) % size;
        let len = (u64::from(op[3]) + 1) * 97;
        let len = len.min(size - pos);
        let _ = match op[0] % 5 {
            0 | 1 => disk.write_at(&vec![op[3] | 1; len as usize], pos),
            2 => disk.discard(pos, len),
            3 => disk.write_zeroes(pos, len, op[0] & 0x80 != 0),
            _ => disk.flush(),
        };
    }
    let _ = disk.flush();
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Header,
    L1,
    L2,
    RefTable,
    RefBlock,
}

/// Metadata clusters of an image, by cluster number.
struct MetaSet(std::collections::HashMap<u64, Kind>);

impl MetaSet {
    fn get(&self, c: u64) -> Option<Kind> {
        self.0.get(&c).copied()
    }
}

/// The header, L1, L2, refcount table and refcount block clusters of a
/// qcow2 image, parsed from its bytes with nothing but the format spec.
fn metadata_clusters(img: &[u8]) -> Option<MetaSet> {
    const MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let be64 = |off: u64| -> Option<u64> {
        let o = usize::try_from(off).ok()?;
        Some(u64::from_be_bytes(
            img.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let be32 = |off: usize| -> Option<u32> {
        Some(u32::from_be_bytes(img.get(off..off + 4)?.try_into().ok()?))
    };
    let bits = be32(20)?;
    if !(9..=21).contains(&bits) {
        return None;
    }
    let cs = 1u64 << bits;
    let l1_size = u64::from(be32(36)?);
    let (l1_off, rt_off) = (be64(40)?, be64(48)?);
    let rt_clusters = u64::from(be32(56)?);
    let mut set = std::collections::HashMap::from([(0u64, Kind::Header)]);
    let limit = img.len() as u64 / cs + 1;
    for c in 0..(l1_size * 8).div_ceil(cs).min(limit) {
        set.insert(l1_off / cs + c, Kind::L1);
    }
    for c in 0..rt_clusters.min(limit) {
        set.insert(rt_off / cs + c, Kind::RefTable);
    }
    let mut seen = HashSet::new();
    for i in 0..(rt_clusters * cs / 8).min(img.len() as u64 / 8) {
        let e = be64(rt_off + i * 8).unwrap_or(0) & MASK;
        if e != 0 && seen.insert(e) {
            set.insert(e / cs, Kind::RefBlock);
        }
    }
    for i in 0..l1_size.min(img.len() as u64 / 8) {
        let e = be64(l1_off + i * 8).unwrap_or(0) & MASK;
        if e != 0 {
            set.entry(e / cs).or_insert(Kind::L2);
        }
    }
    Some(MetaSet(set))
}
