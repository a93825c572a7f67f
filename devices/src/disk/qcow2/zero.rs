// SPDX-License-Identifier: Apache-2.0
//! Discard and write-zeroes: through zero clusters where the version allows.

use std::io;

use super::{invalid, Mapping, Qcow2Disk, COPIED, ZERO};
use crate::disk::check_range;

impl Qcow2Disk {
    /// Whether a mapping reads as zeros.
    pub(super) fn reads_zero(&self, m: Mapping) -> bool {
        match m {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.is_none(),
            _ => false,
        }
    }

    /// Zeroes the whole cluster at `vaddr` through metadata where possible.
    pub(super) fn zero_cluster(&mut self, vaddr: u64, unmap: bool) -> io::Result<()> {
        let entry = self.entry_for(vaddr)?;
        let m = self.mapping(entry)?;
        let keep_prealloc = matches!(
            m,
            Mapping::Zero {
                prealloc: Some(_),
                ..
            }
        );
        if self.reads_zero(m) && !(unmap && keep_prealloc) {
            return Ok(());
        }
        let v3 = self.header.version >= 3;
        if !v3 && self.backing.is_some() {
            let zeros = vec![0u8; self.cs() as usize];
            return self.write_one(&zeros, vaddr);
        }
        let (new, keeps) = match m {
            Mapping::Data { off, copied: true } if v3 && !unmap => (off | COPIED | ZERO, true),
            _ if self.backing.is_none() => (0, false),
            _ => (ZERO, false),
        };
        if !keeps {
            self.check_release(m)?;
        }
        let (l1i, l2i) = self.indices(vaddr);
        let l2off = self
            .l2_table(l1i, true)?
            .ok_or_else(|| invalid("L2 table allocation failed".into()))?;
        self.set_l2_entry(l2off, l2i, new)?;
        if !keeps {
            self.release(m);
        }
        if matches!(m, Mapping::Compressed { .. }) {
            self.unpacked = None;
        }
        Ok(())
    }

    pub(super) fn zero_range(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.header.size, offset, len)?;
        let cs = self.cs();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster_end = (pos | (cs - 1)) + 1;
            let chunk_end = cluster_end.min(end);
            if pos.is_multiple_of(cs) && chunk_end == cluster_end {
                self.zero_cluster(pos, unmap)?;
            } else {
                let m = self.entry_for(pos).and_then(|e| self.mapping(e))?;
                if !self.reads_zero(m) {
                    let zeros = vec![0u8; (chunk_end - pos) as usize];
                    self.write_one(&zeros, pos)?;
                }
            }
            pos = chunk_end;
        }
        Ok(())
    }
}
