// SPDX-License-Identifier: Apache-2.0
//! Crash-safe write-back of cached metadata.

use std::io;
use std::os::unix::fs::FileExt;

use super::{header, Qcow2Disk};

impl Qcow2Disk {
    /// Writes all cached metadata back in crash-safe order and syncs.
    pub fn flush_metadata(&mut self) -> io::Result<()> {
        if self.corrupt {
            return Err(io::Error::other(
                "the image is marked corrupt: metadata is not written back",
            ));
        }
        if self.read_only {
            return Ok(());
        }
        let l2_dirty = !self.l2.dirty_keys().is_empty();
        let any = self.data_dirty
            || self.rc.is_dirty()
            || l2_dirty
            || self.l1_dirty
            || !self.pending_free.is_empty();
        if !any {
            return Ok(());
        }
        // 1. Data (and the file growth of new clusters).
        self.file.sync_data()?;
        self.data_dirty = false;
        // 2. Refcount increments, then the table that points at new blocks.
        if self.rc.write_blocks(&self.file)? {
            self.file.sync_data()?;
        }
        if self.rc.write_table(&self.file)? {
            self.file.sync_data()?;
        }
        if self.rc.table_moved {
            let mut f = [0u8; 12];
            f[..8].copy_from_slice(&self.rc.table_offset.to_be_bytes());
            f[8..].copy_from_slice(&(self.rc.table_clusters as u32).to_be_bytes());
            self.file.write_all_at(&f, header::OFF_REFTABLE)?;
            self.file.sync_data()?;
            self.header.refcount_table_offset = self.rc.table_offset;
            self.header.refcount_table_clusters = self.rc.table_clusters as u32;
            self.rc.table_moved = false;
            let cs = self.cs();
            for (off, n) in std::mem::take(&mut self.rc.old_tables) {
                self.meta.remove(off);
                self.pending_free.push((off, n * cs));
            }
        }
        // 3. L2 tables, then the L1 table that points at new ones.
        let keys = self.l2.dirty_keys();
        for &k in &keys {
            if let Some(t) = self.l2.peek(k) {
                self.write_l2(k, t)?;
            }
            self.l2.mark_clean(k);
        }
        if !keys.is_empty() {
            self.file.sync_data()?;
        }
        if self.l1_dirty {
            let raw: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_all_at(&raw, self.header.l1_table_offset)?;
            self.file.sync_data()?;
            self.l1_dirty = false;
        }
        // 4. Nothing points at released clusters any more: drop their refcounts.
        if !self.pending_free.is_empty() {
            for (off, len) in std::mem::take(&mut self.pending_free) {
                let first = off >> self.cluster_bits;
                let last = (off + len.max(1) - 1) >> self.cluster_bits;
                for c in first..=last {
                    let rc = self.rc.get(&self.file, c)?;
                    if rc > 0 {
                        self.rc_set(c, rc - 1)?;
                        if rc == 1 {
                            self.free_hint = self.free_hint.min(c);
                        }
                    }
                }
            }
            self.rc.write_blocks(&self.file)?;
            self.rc.write_table(&self.file)?;
            self.file.sync_data()?;
        }
        Ok(())
    }
}
