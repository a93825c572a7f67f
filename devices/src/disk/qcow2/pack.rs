// SPDX-License-Identifier: Apache-2.0
//! Writing a new qcow2 image whose clusters are deflate-compressed
//! (`wisp image convert -c`).
//!
//! The image is laid out in one pass: header, packed compressed clusters
//! (never crossing a host cluster), then L2 tables, L1 table and refcounts.
//! Each cluster is compressed as raw deflate with a full flush every 4 KiB, so
//! no back-reference reaches further than 4 KiB: QEMU inflates with a 4 KiB
//! window. A cluster that does not shrink is stored uncompressed; an all-zero
//! cluster is left unallocated.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};

use super::create::CreateOptions;
use super::header::{self, Compression, Header, V3_WRITE_LEN};
use super::refcount::set_entry;
use super::{Preallocation, COMPRESSED, COPIED};
use crate::disk::{DiskBackend, DiskError};

/// QEMU's deflate window for compressed clusters.
const WINDOW: usize = 4096;

/// Raw deflate of `data` with no match distance beyond [`WINDOW`]; `None`
/// when the result would not be smaller than `limit` bytes.
pub fn deflate_4k(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(6, -15, 0));
    let mut out = vec![0u8; data.len() + data.len() / 8 + 64];
    let mut pos = 0;
    let chunks: Vec<&[u8]> = data.chunks(WINDOW).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let flush = if i + 1 == chunks.len() {
            TDEFLFlush::Finish
        } else {
            TDEFLFlush::Full
        };
        let (status, used, written) = compress(&mut c, chunk, &mut out[pos..], flush);
        pos += written;
        let done = match status {
            TDEFLStatus::Done => true,
            TDEFLStatus::Okay => false,
            _ => return None,
        };
        if used != chunk.len() || (flush == TDEFLFlush::Finish && !done) || pos >= limit {
            return None;
        }
    }
    (pos < limit).then(|| {
        out.truncate(pos);
        out
    })
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid_opts(msg: &str) -> DiskError {
    DiskError::InvalidOptions(msg.to_string())
}

/// Where the next data goes and what it costs in refcounts.
struct Layout {
    cs: u64,
    /// Next free byte (compressed data is packed; clusters are aligned).
    cursor: u64,
    /// Refcount of each host cluster so far.
    refs: Vec<u64>,
}

impl Layout {
    fn take_cluster(&mut self) -> u64 {
        let off = self.cursor.div_ceil(self.cs) * self.cs;
        self.cursor = off + self.cs;
        self.count(off, 1);
        off
    }

    fn take_bytes(&mut self, len: u64) -> u64 {
        let in_cluster = self.cursor % self.cs;
        if in_cluster == 0 || in_cluster + len > self.cs {
            self.cursor = self.cursor.div_ceil(self.cs) * self.cs;
        }
        let off = self.cursor;
        self.cursor += len;
        self.count(off, 1);
        off
    }

    fn count(&mut self, off: u64, n: u64) {
        let c = (off / self.cs) as usize;
        if self.refs.len() <= c {
            self.refs.resize(c + 1, 0);
        }
        self.refs[c] += n;
    }
}

/// Creates `path` holding the data of `src`, compressed.
pub fn create_compressed(
    path: &Path,
    opts: &CreateOptions,
    src: &mut dyn DiskBackend,
    mut progress: impl FnMut(u64),
) -> Result<(), DiskError> {
    let cs = opts.cluster_size;
    let bits = cs.trailing_zeros();
    if !cs.is_power_of_two()
        || !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits)
    {
        return Err(invalid_opts(
            "cluster_size must be a power of two from 512 to 2M",
        ));
    }
    if opts.backing_file.is_some() || opts.preallocation != Preallocation::Off {
        return Err(invalid_opts(
            "compressed images are written without backing file or preallocation",
        ));
    }
    if opts.refcount_bits != 16 || !(opts.version == 2 || opts.version == 3) {
        return Err(invalid_opts(
            "compressed images are written with 16-bit refcounts (compat 0.10 or 1.1)",
        ));
    }
    // Whole sectors, as qemu-img sizes images; the tail reads as zeros.
    let src_size = src.size();
    let size = src_size.div_ceil(512) * 512;
    if size > header::MAX_VIRTUAL_SIZE {
        return Err(invalid_opts("virtual size too large for qcow2"));
    }
    let err = io_err(path);
    let file = File::create(path).map_err(&err)?;
    crate::disk::set_flock(&file, Some(false)).map_err(&err)?;
    let mut lay = Layout {
        cs,
        cursor: cs,
        refs: vec![1],
    };
    let guest_clusters = size.div_ceil(cs);
    let mut l2e = vec![0u64; guest_clusters as usize];
    let mut buf = vec![0u8; cs as usize];
    let shift = 62 - (bits - 8);
    for (i, entry) in l2e.iter_mut().enumerate() {
        let off = i as u64 * cs;
        let n = src_size.saturating_sub(off).min(cs) as usize;
        buf[n..].fill(0);
        src.read_at(&mut buf[..n], off).map_err(&err)?;
        if buf.iter().all(|&b| b == 0) {
            continue;
        }
        match deflate_4k(&buf, cs as usize) {
            Some(packed) => {
                let at = lay.take_bytes(packed.len() as u64);
                file.write_all_at(&packed, at).map_err(&err)?;
                let extra = (at + packed.len() as u64 - 1) / 512 - at / 512;
                *entry = COMPRESSED | (extra << shift) | at;
            }
            None => {
                let at = lay.take_cluster();
                file.write_all_at(&buf, at).map_err(&err)?;
                *entry = COPIED | at;
            }
        }
        progress(off + n as u64);
    }
    finish(&file, path, opts, size, &mut lay, &l2e)
}

/// Appends the refcount table and blocks (counting themselves) after the
/// data and tables; returns the table's offset and size in clusters.
fn write_refcounts(file: &File, lay: &mut Layout) -> io::Result<(u64, u64)> {
    let cs = lay.cs;
    // Refcount blocks and table must count themselves: find the fixed point.
    let first = lay.cursor.div_ceil(cs);
    let per_block = cs * 8 / 16;
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = first + blocks + table;
        let (nb, nt) = (
            total.div_ceil(per_block),
            (total.div_ceil(per_block) * 8).div_ceil(cs),
        );
        if (nb, nt) == (blocks, table) {
            break;
        }
        (blocks, table) = (nb, nt);
    }
    let table_off = first * cs;
    let blocks_off = table_off + table * cs;
    lay.cursor = table_off;
    for _ in 0..table + blocks {
        lay.take_cluster();
    }
    let mut rt = vec![0u8; (table * cs) as usize];
    for b in 0..blocks {
        let off = (blocks_off + b * cs).to_be_bytes();
        rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off);
    }
    let mut rb = vec![0u8; (blocks * cs) as usize];
    for (c, &r) in lay.refs.iter().enumerate() {
        set_entry(&mut rb, c, 4, r);
    }
    file.write_all_at(&rt, table_off)?;
    file.write_all_at(&rb, blocks_off)?;
    Ok((table_off, table))
}

/// Writes the L2 tables, L1 table, refcounts and header.
fn finish(
    file: &File,
    path: &Path,
    opts: &CreateOptions,
    size: u64,
    lay: &mut Layout,
    l2e: &[u64],
) -> Result<(), DiskError> {
    let err = io_err(path);
    let cs = lay.cs;
    let bits = cs.trailing_zeros();
    let per_l2 = (cs / 8) as usize;
    let l1_entries = Header::l1_entries_for(size, bits) as usize;
    let mut l1 = vec![0u64; l1_entries];
    for (i, table) in l2e.chunks(per_l2).enumerate() {
        if table.iter().all(|&e| e == 0) {
            continue;
        }
        let at = lay.take_cluster();
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize(cs as usize, 0);
        file.write_all_at(&bytes, at).map_err(&err)?;
        l1[i] = COPIED | at;
    }
    let l1_bytes = (l1_entries as u64 * 8).div_ceil(cs).max(1) * cs;
    let l1_off = lay.take_cluster();
    for _ in 1..l1_bytes / cs {
        lay.take_cluster();
    }
    let mut bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    bytes.resize(l1_bytes as usize, 0);
    file.write_all_at(&bytes, l1_off).map_err(&err)?;
    let (table_off, table) = write_refcounts(file, lay).map_err(&err)?;
    let h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: bits,
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: table_off,
        refcount_table_clusters: table as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: if opts.version == 3 { V3_WRITE_LEN } else { 72 },
        compression: Compression::Deflate,
        backing_file: None,
        backing_format: None,
        bitmaps: None,
    };
    file.write_all_at(&h.to_cluster(), 0).map_err(&err)?;
    file.sync_all().map_err(&err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_deflate_4k_roundtrips_and_keeps_distances_short() {
        // Repeats 8 KiB apart: a 32 KiB window would reference them.
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i % 8192) * 31 % 251) as u8;
        }
        let packed = deflate_4k(&data, data.len()).unwrap();
        let out = miniz_oxide::inflate::decompress_to_vec(&packed).unwrap();
        assert_eq!(out, data);
        // Random-looking data does not shrink: stored uncompressed.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(deflate_4k(&noise, noise.len()).is_none());
    }
}
