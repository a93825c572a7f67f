// SPDX-License-Identifier: Apache-2.0
//! A hosted sparse extent: header, grain directory, grain tables and grains
//! (plain, or zlib-compressed with stream markers as in streamOptimized).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::error::{invalid, VmdkError};
use super::header::{check_in_file, SparseHeader, FLAG_ZERO_GRAIN, MAX_DESCRIPTOR_BYTES, SECTOR};

/// Grain tables kept in memory (2 KiB each at 512 entries).
const GT_CACHE: usize = 512;
/// Bytes of a grain marker before the compressed data: LBA (u64) and size (u32).
const MARKER_LEN: u64 = 12;

/// Where one grain's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Never written: reads as zeros.
    Unallocated,
    /// Written as zeros (grain table entry 1 with the zero-grain flag).
    Zero,
    /// Stored at this byte offset of the extent file.
    Data(u64),
    /// Compressed, starting (with its marker, if any) at this byte offset.
    Compressed(u64),
}

/// An open sparse extent.
pub struct SparseExtent {
    file: File,
    file_len: u64,
    header: SparseHeader,
    gd: Vec<u32>,
    /// The primary grain directory was unusable and the redundant one is read.
    pub uses_redundant_gd: bool,
    tables: HashMap<usize, Vec<u32>>,
    /// The last grain inflated: (grain index, data).
    inflated: Option<(u64, Vec<u8>)>,
}

fn read_exact(file: &File, buf: &mut [u8], off: u64, what: &'static str) -> Result<(), VmdkError> {
    file.read_exact_at(buf, off)
        .map_err(|source| VmdkError::Io { what, source })
}

fn read_u32s(file: &File, off: u64, n: usize, what: &'static str) -> Result<Vec<u32>, VmdkError> {
    let mut raw = vec![0u8; n * 4];
    read_exact(file, &mut raw, off, what)?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl SparseExtent {
    /// Reads and validates the header (or footer) and the grain directory of `file`.
    pub fn open(file: File) -> Result<SparseExtent, VmdkError> {
        let file_len = file
            .metadata()
            .map_err(|source| VmdkError::Io {
                what: "extent size",
                source,
            })?
            .len();
        if file_len < SECTOR {
            return Err(VmdkError::Corrupt(format!(
                "sparse extent is {file_len} bytes, shorter than its header"
            )));
        }
        let mut first = [0u8; 512];
        read_exact(&file, &mut first, 0, "header")?;
        let header = SparseHeader::parse(&first, file_len, || {
            let mut t = [0u8; 1536];
            if file_len < 2048 {
                return Err(VmdkError::Corrupt(
                    "the file is too short to hold a footer".into(),
                ));
            }
            read_exact(&file, &mut t, file_len - 1536, "footer")?;
            Ok(t)
        })?;
        let entries = header.gd_entries() as usize;
        let gt_bytes = header.gtes_per_gt as u64 * 4;
        let valid = |gd: &[u32]| {
            gd.iter()
                .enumerate()
                .find(|(_, &s)| {
                    s != 0
                        && check_in_file("grain directory entry", s.into(), gt_bytes, file_len)
                            .is_err()
                })
                .map(|(i, &s)| (i, s))
        };
        // An empty disk has no directory (and its offsets were not checked).
        let mut gd = if entries == 0 {
            Vec::new()
        } else {
            read_u32s(&file, header.gd_offset * SECTOR, entries, "grain directory")?
        };
        let mut uses_redundant_gd = false;
        if let Some((i, s)) = valid(&gd) {
            let rgd = match header.rgd_offset {
                Some(r) => Some(read_u32s(
                    &file,
                    r * SECTOR,
                    entries,
                    "redundant grain directory",
                )?),
                None => None,
            };
            match rgd {
                Some(r) if valid(&r).is_none() => {
                    gd = r;
                    uses_redundant_gd = true;
                }
                _ => {
                    return Err(VmdkError::Corrupt(format!(
                        "grain directory entry {i} points to sector {s:#x}, past the end of the file ({file_len} bytes)"
                    )))
                }
            }
        }
        Ok(SparseExtent {
            file,
            file_len,
            header,
            gd,
            uses_redundant_gd,
            tables: HashMap::new(),
            inflated: None,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    /// The embedded descriptor's bytes, if the header has one.
    pub fn descriptor(&self) -> Result<Option<Vec<u8>>, VmdkError> {
        let h = &self.header;
        if h.descriptor_sectors == 0 {
            return Ok(None);
        }
        let len = (h.descriptor_sectors * SECTOR).min(MAX_DESCRIPTOR_BYTES) as usize;
        let mut buf = vec![0u8; len];
        read_exact(
            &self.file,
            &mut buf,
            h.descriptor_offset * SECTOR,
            "embedded descriptor",
        )?;
        Ok(Some(buf))
    }

    /// Where grain `index` lives.
    pub fn grain(&mut self, index: u64) -> io::Result<Grain> {
        let per_gt = self.header.gtes_per_gt as u64;
        let gd_index = (index / per_gt) as usize;
        let Some(&gt_sector) = self.gd.get(gd_index) else {
            return Err(invalid(format!(
                "grain {index} is outside the grain directory"
            )));
        };
        if gt_sector == 0 {
            return Ok(Grain::Unallocated);
        }
        if !self.tables.contains_key(&gd_index) {
            if self.tables.len() >= GT_CACHE {
                self.tables.clear();
            }
            let t = read_u32s(
                &self.file,
                gt_sector as u64 * SECTOR,
                per_gt as usize,
                "grain table",
            )
            .map_err(|e| io::Error::other(e.to_string()))?;
            self.tables.insert(gd_index, t);
        }
        let entry = self.tables[&gd_index][(index % per_gt) as usize] as u64;
        Ok(match entry {
            0 => Grain::Unallocated,
            1 if self.header.flags & FLAG_ZERO_GRAIN != 0 => Grain::Zero,
            s if s * SECTOR >= self.file_len => {
                return Err(invalid(format!(
                    "grain {index} points to sector {s:#x}, past the end of the file ({} bytes)",
                    self.file_len
                )))
            }
            s if self.header.compressed => Grain::Compressed(s * SECTOR),
            s => Grain::Data(s * SECTOR),
        })
    }

    /// Fills `buf` from byte `offset` of the extent (the caller checked the range).
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let gb = self.header.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / gb;
            let within = pos % gb;
            let n = ((gb - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.grain(index)? {
                Grain::Unallocated | Grain::Zero => out.fill(0),
                Grain::Data(at) => self.read_plain(out, at + within)?,
                Grain::Compressed(at) => {
                    let data = self.inflate(index, at)?;
                    out.copy_from_slice(&data[within as usize..within as usize + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads file bytes at `at`; the part past the end of the file reads as zeros.
    fn read_plain(&self, out: &mut [u8], at: u64) -> io::Result<()> {
        let avail = self.file_len.saturating_sub(at).min(out.len() as u64) as usize;
        self.file.read_exact_at(&mut out[..avail], at)?;
        out[avail..].fill(0);
        Ok(())
    }

    /// The whole of compressed grain `index` stored at byte `at`.
    fn inflate(&mut self, index: u64, at: u64) -> io::Result<&[u8]> {
        if self.inflated.as_ref().map(|(i, _)| *i) != Some(index) {
            let data = self.inflate_uncached(index, at)?;
            self.inflated = Some((index, data));
        }
        match &self.inflated {
            Some((_, d)) => Ok(d),
            None => Err(invalid("grain cache is empty".into())),
        }
    }

    fn inflate_uncached(&self, index: u64, at: u64) -> io::Result<Vec<u8>> {
        let gb = self.header.grain_bytes();
        let limit = 2 * gb + SECTOR;
        let (start, len) = if self.header.markers {
            let mut m = [0u8; MARKER_LEN as usize];
            self.file.read_exact_at(&mut m, at)?;
            let lba = u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]);
            let size = u32::from_le_bytes([m[8], m[9], m[10], m[11]]) as u64;
            let expect = index * self.header.grain_sectors;
            if lba != expect {
                return Err(invalid(format!(
                    "grain marker at {at:#x} is for sector {lba:#x}, expected {expect:#x}"
                )));
            }
            if size == 0 || size > limit {
                return Err(invalid(format!(
                    "grain marker at {at:#x} gives a compressed size of {size} bytes (grains are {gb} bytes)"
                )));
            }
            (at + MARKER_LEN, size)
        } else {
            (at, self.file_len.saturating_sub(at).min(limit))
        };
        if start.checked_add(len).is_none_or(|e| e > self.file_len) {
            return Err(invalid(format!(
                "compressed grain at {at:#x} runs past the end of the file"
            )));
        }
        let mut packed = vec![0u8; len as usize];
        self.file.read_exact_at(&mut packed, start)?;
        let mut data =
            miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&packed, gb as usize)
                .map_err(|e| invalid(format!("compressed grain at {at:#x} is corrupt: {e}")))?;
        let needed = gb.min(self.size() - index * gb) as usize;
        if data.len() < needed {
            return Err(invalid(format!(
                "compressed grain at {at:#x} inflates to {} bytes, expected {needed}",
                data.len()
            )));
        }
        data.resize(gb as usize, 0);
        Ok(data)
    }
}
