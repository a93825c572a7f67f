// SPDX-License-Identifier: Apache-2.0
//! The harness shared by the cargo-fuzz target and the mutation smoke tests.

use crate::disk::{open_qcow2_metadata, DiskBackend};

/// Fuzzing harness: opens `data` as a qcow2 image (never following a backing
/// file), reads every cluster, checks it, then writes and discards a little.
/// Must not panic, whatever `data` holds.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("wisp-fuzz-{}-{n}.qcow2", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for read_only in [true, false] {
        let Ok(mut disk) = open_qcow2_metadata(&path, read_only) else {
            break;
        };
        let size = disk.size();
        let step = (size / 64).max(disk.cs());
        let mut buf = vec![0u8; 4096];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = disk.read_at(&mut buf[..n], off);
            off = off.saturating_add(step);
        }
        let _ = disk.check(false);
        if !read_only {
            let len = size.min(3 * disk.cs() + 5);
            let _ = disk.write_at(&vec![0x5a; len as usize], 0);
            let _ = disk.discard(0, size.min(disk.cs()));
            let _ = disk.write_zeroes(0, len, false);
            let _ = disk.flush();
        }
    }
    let _ = std::fs::remove_file(&path);
}
