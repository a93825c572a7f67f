// SPDX-License-Identifier: Apache-2.0
//! Block status of a qcow2 image's guest clusters (for `wisp image map`).

use std::io;

use super::{Mapping, Qcow2Disk};
use crate::disk::status::{BlockKind, BlockStatus};
use crate::disk::{check_range, DiskBackend};

impl Qcow2Disk {
    /// The status of guest byte `offset` up to the end of its cluster, in
    /// this image alone (a backing file is never consulted).
    pub fn block_status(&mut self, offset: u64) -> io::Result<BlockStatus> {
        check_range(self.size(), offset, 1)?;
        let cs = self.cs();
        let len = (cs - (offset & (cs - 1))).min(self.size() - offset);
        let in_off = offset & (cs - 1);
        let entry = self.entry_for(offset)?;
        let (kind, off) = match self.mapping(entry)? {
            Mapping::Unallocated => (BlockKind::Unallocated, None),
            Mapping::Zero { prealloc, .. } => (BlockKind::Zero, prealloc.map(|p| p + in_off)),
            Mapping::Data { off, .. } => (BlockKind::Data, Some(off + in_off)),
            Mapping::Compressed { .. } => (BlockKind::Data, None),
        };
        Ok(BlockStatus {
            kind,
            len,
            offset: off,
        })
    }
}
