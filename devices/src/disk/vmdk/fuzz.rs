// SPDX-License-Identifier: Apache-2.0
//! The harness shared by the cargo-fuzz target and the mutation smoke tests.

use super::VmdkDisk;
use crate::disk::DiskBackend;

/// Fuzzing harness: writes `data` as `disk.vmdk` into a fresh directory, opens
/// it as a VMDK (a descriptor may name `disk.vmdk` itself or a missing file),
/// and reads the disk in 64 steps. Must not panic, whatever `data` holds.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wisp-fuzz-vmdk-{}-{n}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let path = dir.join("disk.vmdk");
    if std::fs::write(&path, data).is_ok() {
        if let Ok(file) = std::fs::File::open(&path) {
            if let Ok(mut disk) = VmdkDisk::open(file, &path, true) {
                let size = disk.size();
                let step = (size / 64).max(512);
                let mut buf = vec![0u8; 4096];
                let mut off = 0u64;
                while off < size {
                    let len = (size - off).min(buf.len() as u64) as usize;
                    let _ = disk.read_at(&mut buf[..len], off);
                    let _ = disk.allocation(off);
                    off = off.saturating_add(step);
                }
                let _ = disk.write_at(&buf[..1], 0);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
