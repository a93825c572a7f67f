// SPDX-License-Identifier: Apache-2.0
//! Which host clusters hold metadata, so that no data write or allocation
//! ever lands on one (QEMU's metadata overlap check).
//!
//! The map is built once at open from the header, L1 table, refcount table,
//! snapshot table and bitmap directory (none of which needs reading the L2
//! tables), then kept up to date as wisp allocates or frees metadata. A
//! lookup is one `BTreeMap` range query, cheap next to the write itself.

use std::collections::BTreeMap;
use std::fmt;

/// A kind of metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meta {
    Header,
    L1,
    L2,
    RefTable,
    RefBlock,
    SnapshotTable,
    SnapshotL1,
    BitmapDirectory,
    BitmapTable,
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Meta::Header => "header",
            Meta::L1 => "L1 table",
            Meta::L2 => "L2 table",
            Meta::RefTable => "refcount table",
            Meta::RefBlock => "refcount block",
            Meta::SnapshotTable => "snapshot table",
            Meta::SnapshotL1 => "snapshot L1 table",
            Meta::BitmapDirectory => "bitmap directory",
            Meta::BitmapTable => "bitmap table",
        })
    }
}

/// A metadata cluster a range touches: its host offset and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub offset: u64,
    pub kind: Meta,
}

/// Non-overlapping runs of metadata clusters, keyed by first cluster.
#[derive(Clone, Debug)]
pub struct MetaMap {
    runs: BTreeMap<u64, (u64, Meta)>,
    bits: u32,
}

impl MetaMap {
    pub fn new(cluster_bits: u32) -> Self {
        MetaMap {
            runs: BTreeMap::new(),
            bits: cluster_bits,
        }
    }

    /// Cluster numbers `[first, end)` that bytes `[off, off + len)` touch.
    fn clusters(&self, off: u64, len: u64) -> (u64, u64) {
        let end = off.saturating_add(len.max(1));
        (
            off >> self.bits,
            (end - 1).checked_shr(self.bits).unwrap_or(0) + 1,
        )
    }

    fn first_in(&self, first: u64, end: u64) -> Option<Hit> {
        let (&start, &(run_end, kind)) = self.runs.range(..end).next_back()?;
        (run_end > first).then(|| Hit {
            offset: start.max(first) << self.bits,
            kind,
        })
    }

    /// The first metadata cluster that bytes `[off, off + len)` touch.
    pub fn hit(&self, off: u64, len: u64) -> Option<Hit> {
        let (first, end) = self.clusters(off, len);
        self.first_in(first, end)
    }

    /// Records `len` bytes of `kind` at `off`; refuses (and records nothing)
    /// when they overlap metadata already recorded.
    pub fn add(&mut self, kind: Meta, off: u64, len: u64) -> Result<(), Hit> {
        let (first, end) = self.clusters(off, len);
        if let Some(hit) = self.first_in(first, end) {
            return Err(hit);
        }
        self.runs.insert(first, (end, kind));
        Ok(())
    }

    /// Forgets the run that starts at `off` (a table wisp freed).
    pub fn remove(&mut self, off: u64) {
        self.runs.remove(&(off >> self.bits));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_meta_map_hit_finds_overlap_inside_a_run() {
        let mut m = MetaMap::new(16);
        m.add(Meta::L1, 3 << 16, 2 << 16).unwrap();
        assert_eq!(m.hit(4 << 16, 10).map(|h| h.kind), Some(Meta::L1));
        assert_eq!(m.hit(5 << 16, 1 << 16), None);
        assert_eq!(m.hit(2 << 16, 1 << 16), None);
        assert_eq!(
            m.hit((2 << 16) + 5, 1 << 16).map(|h| h.offset),
            Some(3 << 16)
        );
    }

    #[test]
    fn test_meta_map_add_refuses_overlap() {
        let mut m = MetaMap::new(9);
        m.add(Meta::RefBlock, 512, 512).unwrap();
        let hit = m.add(Meta::L2, 512, 512).unwrap_err();
        assert_eq!(hit.kind, Meta::RefBlock);
        m.remove(512);
        m.add(Meta::L2, 512, 512).unwrap();
        assert_eq!(m.hit(0, 2048).map(|h| h.kind), Some(Meta::L2));
    }
}
