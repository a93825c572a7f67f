// SPDX-License-Identifier: Apache-2.0
//! Refcount table and blocks: reading, updating, and growing them on allocation.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::cache::TableCache;
use super::meta::Meta;
use super::{invalid, read_full, OFFSET_MASK};

/// The refcount structures of an open image.
pub struct Refcounts {
    /// Refcount table entries (host offsets of refcount blocks).
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    pub table_dirty: bool,
    /// The table moved: the header must be rewritten before the old one is freed.
    pub table_moved: bool,
    /// Clusters of replaced tables, freed once the header points elsewhere.
    pub old_tables: Vec<(u64, u64)>,
    /// Metadata allocated since the owner last looked (blocks, tables).
    pub new_meta: Vec<(Meta, u64, u64)>,
    order: u32,
    cluster_bits: u32,
    blocks: TableCache<Vec<u8>>,
}

/// Reads entry `idx` of a refcount block of width `1 << order` bits.
pub fn get_entry(block: &[u8], idx: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[idx / per_byte];
            let shift = (idx % per_byte) * bits;
            u64::from((byte >> shift) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[idx]),
        4 => u64::from(u16::from_be_bytes([block[idx * 2], block[idx * 2 + 1]])),
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&block[idx * 4..idx * 4 + 4]);
            u64::from(u32::from_be_bytes(a))
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[idx * 8..idx * 8 + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `idx` of a refcount block; `value` must fit the width.
pub fn set_entry(block: &mut [u8], idx: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[idx / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[idx] = value as u8,
        4 => block[idx * 2..idx * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[idx * 4..idx * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[idx * 8..idx * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

impl Refcounts {
    /// Loads the refcount table; `file_len`, when given, bounds the block
    /// offsets (without it, blocks past the end of the file read as zeros).
    pub fn load(
        file: &File,
        table_offset: u64,
        table_clusters: u64,
        order: u32,
        cluster_bits: u32,
        file_len: Option<u64>,
        cache_tables: usize,
    ) -> io::Result<Self> {
        let cs = 1u64 << cluster_bits;
        let mut raw = vec![0u8; (table_clusters * cs) as usize];
        match file_len {
            Some(_) => file.read_exact_at(&mut raw, table_offset)?,
            None => read_full(file, &mut raw, table_offset)?,
        }
        let table = super::header::be64_table(&raw);
        for (i, &e) in table.iter().enumerate() {
            let off = e & OFFSET_MASK;
            let Some(file_len) = file_len else { break };
            if off != 0 && !super::header::placed_in_file(off, cs, cs, file_len) {
                return Err(invalid(format!(
                    "refcount block {i} at {off:#x} is misaligned or outside the file"
                )));
            }
        }
        Ok(Refcounts {
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            table_moved: false,
            old_tables: Vec::new(),
            new_meta: Vec::new(),
            order,
            cluster_bits,
            blocks: TableCache::new(cache_tables),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Host offsets of the refcount blocks the table names.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.table
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
    }

    /// Refcount entries per block.
    pub fn per_block(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }

    /// Largest refcount the width can hold.
    pub fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// The block at `off` for modification (it becomes dirty).
    fn block<'a>(&'a mut self, file: &File, off: u64) -> io::Result<&'a mut Vec<u8>> {
        self.load_block(file, off)?;
        self.blocks
            .get_mut(off)
            .ok_or_else(|| invalid("refcount block vanished from the cache".into()))
    }

    /// Caches the block at `off` (clean) if it is not cached yet.
    fn load_block(&mut self, file: &File, off: u64) -> io::Result<()> {
        if !self.blocks.contains(off) {
            let mut buf = vec![0u8; self.cs() as usize];
            read_full(file, &mut buf, off)?;
            if let Some((k, v)) = self.blocks.insert(off, buf, false) {
                file.write_all_at(&v, k)?;
            }
        }
        Ok(())
    }

    /// Refcount of host cluster number `cluster`.
    pub fn get(&mut self, file: &File, cluster: u64) -> io::Result<u64> {
        let per = self.per_block();
        let Some(&entry) = self.table.get((cluster / per) as usize) else {
            return Ok(0);
        };
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let order = self.order;
        self.load_block(file, off)?;
        let block = self
            .blocks
            .get(off)
            .ok_or_else(|| invalid("refcount block vanished from the cache".into()))?;
        Ok(get_entry(block, (cluster % per) as usize, order))
    }

    /// Sets the refcount of `cluster`, allocating blocks (and growing the
    /// table) at `*next_free` as needed.
    pub fn set(
        &mut self,
        file: &File,
        cluster: u64,
        value: u64,
        next_free: &mut u64,
    ) -> io::Result<()> {
        if value > self.max_value() {
            return Err(invalid(format!(
                "refcount {value} of cluster {cluster} overflows the refcount width"
            )));
        }
        let per = self.per_block();
        let cs = self.cs();
        let bi = (cluster / per) as usize;
        if bi >= self.table.len() {
            if value == 0 {
                return Ok(());
            }
            self.grow_table(file, bi + 1, next_free)?;
        }
        let mut off = self.table[bi] & OFFSET_MASK;
        if off == 0 {
            if value == 0 {
                return Ok(());
            }
            off = *next_free;
            *next_free += cs;
            self.table[bi] = off;
            self.table_dirty = true;
            self.new_meta.push((Meta::RefBlock, off, cs));
            if let Some((k, v)) = self.blocks.insert(off, vec![0u8; cs as usize], true) {
                file.write_all_at(&v, k)?;
            }
            self.set(file, off >> self.cluster_bits, 1, next_free)?;
        }
        let order = self.order;
        let block = self.block(file, off)?;
        set_entry(block, (cluster % per) as usize, order, value);
        Ok(())
    }

    fn grow_table(
        &mut self,
        file: &File,
        min_entries: usize,
        next_free: &mut u64,
    ) -> io::Result<()> {
        let cs = self.cs();
        let want = min_entries.max(self.table.len() * 2) as u64;
        let clusters = (want * 8).div_ceil(cs);
        if clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(invalid("refcount table would exceed its size limit".into()));
        }
        let new_off = *next_free;
        *next_free += clusters * cs;
        self.old_tables
            .push((self.table_offset, self.table_clusters));
        self.table.resize((clusters * cs / 8) as usize, 0);
        self.table_offset = new_off;
        self.table_clusters = clusters;
        self.table_dirty = true;
        self.table_moved = true;
        self.new_meta.push((Meta::RefTable, new_off, clusters * cs));
        for c in 0..clusters {
            self.set(file, (new_off >> self.cluster_bits) + c, 1, next_free)?;
        }
        Ok(())
    }

    /// Writes dirty blocks; returns whether anything was written.
    pub fn write_blocks(&mut self, file: &File) -> io::Result<bool> {
        let keys = self.blocks.dirty_keys();
        for &k in &keys {
            if let Some(b) = self.blocks.peek(k) {
                file.write_all_at(b, k)?;
            }
            self.blocks.mark_clean(k);
        }
        Ok(!keys.is_empty())
    }

    /// Writes the table if dirty; returns whether it did.
    pub fn write_table(&mut self, file: &File) -> io::Result<bool> {
        if !self.table_dirty {
            return Ok(false);
        }
        let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&raw, self.table_offset)?;
        self.table_dirty = false;
        Ok(true)
    }

    /// Whether anything awaits write-back.
    pub fn is_dirty(&self) -> bool {
        self.table_dirty || self.table_moved || !self.blocks.dirty_keys().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_refcount_entry_one_bit_packs_lsb_first() {
        let mut b = vec![0u8; 2];
        set_entry(&mut b, 1, 0, 1);
        set_entry(&mut b, 8, 0, 1);
        assert_eq!(b, vec![0b10, 1]);
        assert_eq!(get_entry(&b, 1, 0), 1);
        assert_eq!(get_entry(&b, 0, 0), 0);
    }

    #[test]
    fn test_refcount_entry_four_bits_roundtrip_keeps_neighbour() {
        let mut b = vec![0u8; 1];
        set_entry(&mut b, 0, 2, 0xa);
        set_entry(&mut b, 1, 2, 0x5);
        assert_eq!(b[0], 0x5a);
        assert_eq!(get_entry(&b, 0, 2), 0xa);
    }

    #[test]
    fn test_refcount_entry_sixteen_bits_is_big_endian() {
        let mut b = vec![0u8; 4];
        set_entry(&mut b, 1, 4, 0x1234);
        assert_eq!(b, vec![0, 0, 0x12, 0x34]);
    }

    #[test]
    fn test_refcount_entry_sixty_four_bits_roundtrip() {
        let mut b = vec![0u8; 16];
        set_entry(&mut b, 1, 6, u64::MAX - 1);
        assert_eq!(get_entry(&b, 1, 6), u64::MAX - 1);
        assert_eq!(get_entry(&b, 0, 6), 0);
    }
}
