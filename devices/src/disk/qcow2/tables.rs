// SPDX-License-Identifier: Apache-2.0
//! The snapshot table and the bitmap directory: parsed only to know which
//! clusters they own (wisp neither creates snapshots nor maintains bitmaps).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::header::{be32, be64, Header, AUTOCLEAR_BITMAPS};
use super::{invalid, OFFSET_MASK};

/// Most snapshots, and most bytes of snapshot table, accepted (as QEMU).
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Most bitmaps, bytes of bitmap directory, and entries of one bitmap table.
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;
const MAX_BITMAP_TABLE: u32 = 4 << 20;
/// Bitmap flag: the bitmap was being written when the image was closed.
pub const BITMAP_IN_USE: u32 = 1 << 0;

/// One internal snapshot's L1 table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotL1 {
    pub offset: u64,
    pub entries: u32,
}

/// The snapshot table: where it lies and the L1 tables it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshots {
    pub offset: u64,
    pub bytes: u64,
    pub l1s: Vec<SnapshotL1>,
}

/// One persistent bitmap's directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    pub table_offset: u64,
    pub table_entries: u32,
    pub flags: u32,
    /// File offset of this entry's flags field.
    pub flags_at: u64,
}

/// The (consistent) bitmap directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitmaps {
    pub offset: u64,
    pub bytes: u64,
    pub list: Vec<Bitmap>,
}

fn read(file: &File, len: u64, off: u64, what: &str) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, off)
        .map_err(|e| invalid(format!("cannot read the {what} at {off:#x}: {e}")))?;
    Ok(b)
}

fn aligned(off: u64, cs: u64) -> bool {
    off != 0 && off.is_multiple_of(cs) && off & !OFFSET_MASK == 0
}

/// Reads the snapshot table the header names.
pub fn read_snapshots(file: &File, h: &Header) -> io::Result<Snapshots> {
    if h.nb_snapshots == 0 {
        return Ok(Snapshots::default());
    }
    let cs = h.cluster_size();
    if h.nb_snapshots > MAX_SNAPSHOTS || !aligned(h.snapshots_offset, cs) {
        return Err(invalid(format!(
            "invalid snapshot table ({} snapshots at {:#x})",
            h.nb_snapshots, h.snapshots_offset
        )));
    }
    let mut pos = h.snapshots_offset;
    let mut l1s = Vec::new();
    for i in 0..h.nb_snapshots {
        let fixed = read(file, 40, pos, "snapshot table")?;
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra = u64::from(be32(&fixed, 36));
        let l1 = SnapshotL1 {
            offset: be64(&fixed, 0),
            entries: be32(&fixed, 8),
        };
        if !aligned(l1.offset, cs) || u64::from(l1.entries) * 8 > super::header::MAX_L1_BYTES {
            return Err(invalid(format!(
                "snapshot {i} has an invalid L1 table ({} entries at {:#x})",
                l1.entries, l1.offset
            )));
        }
        l1s.push(l1);
        pos += (40 + extra + id_len + name_len).next_multiple_of(8);
        if pos - h.snapshots_offset > MAX_SNAPSHOT_TABLE {
            return Err(invalid("the snapshot table is too large".into()));
        }
    }
    Ok(Snapshots {
        offset: h.snapshots_offset,
        bytes: pos - h.snapshots_offset,
        l1s,
    })
}

/// Reads a snapshot's L1 table (past the end of the file, zeros: `check`
/// reports that).
pub fn read_l1(file: &File, l1: SnapshotL1) -> io::Result<Vec<u64>> {
    let mut raw = vec![0u8; l1.entries as usize * 8];
    super::read_full(file, &mut raw, l1.offset)?;
    Ok(super::header::be64_table(&raw))
}

/// Reads the bitmap directory, when the header has a consistent one.
pub fn read_bitmaps(file: &File, h: &Header) -> io::Result<Option<Bitmaps>> {
    let Some(ext) = h.bitmaps else {
        return Ok(None);
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        // Written by a program without bitmap support: QEMU ignores them too.
        return Ok(None);
    }
    let cs = h.cluster_size();
    if ext.nb_bitmaps == 0
        || ext.nb_bitmaps > MAX_BITMAPS
        || ext.directory_size > MAX_BITMAP_DIRECTORY
        || !aligned(ext.directory_offset, cs)
    {
        return Err(invalid(format!(
            "invalid bitmap directory ({} bitmaps, {} bytes at {:#x})",
            ext.nb_bitmaps, ext.directory_size, ext.directory_offset
        )));
    }
    let dir = read(
        file,
        ext.directory_size,
        ext.directory_offset,
        "bitmap directory",
    )?;
    let mut list = Vec::new();
    let mut pos = 0usize;
    for i in 0..ext.nb_bitmaps {
        let bad = || invalid(format!("bitmap directory entry {i} is cut short"));
        let e = dir.get(pos..pos + 24).ok_or_else(bad)?;
        let name_len = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra = be32(e, 20) as usize;
        let b = Bitmap {
            table_offset: be64(e, 0),
            table_entries: be32(e, 8),
            flags: be32(e, 12),
            flags_at: ext.directory_offset + pos as u64 + 12,
            name: String::new(),
        };
        let name_at = pos + 24 + extra;
        let name = dir.get(name_at..name_at + name_len).ok_or_else(bad)?;
        if !aligned(b.table_offset, cs) || b.table_entries > MAX_BITMAP_TABLE {
            return Err(invalid(format!(
                "bitmap {i} has an invalid table ({} entries at {:#x})",
                b.table_entries, b.table_offset
            )));
        }
        list.push(Bitmap {
            name: String::from_utf8_lossy(name).into_owned(),
            ..b
        });
        pos = (name_at + name_len).next_multiple_of(8);
    }
    Ok(Some(Bitmaps {
        offset: ext.directory_offset,
        bytes: ext.directory_size,
        list,
    }))
}

/// The host clusters a bitmap table points at (entries with data).
pub fn bitmap_data(file: &File, b: &Bitmap) -> io::Result<Vec<u64>> {
    let raw = read(
        file,
        u64::from(b.table_entries) * 8,
        b.table_offset,
        "bitmap table",
    )?;
    let mut data = Vec::new();
    for (i, e) in super::header::be64_table(&raw).into_iter().enumerate() {
        let off = e & OFFSET_MASK;
        // Bit 0 alone means "all ones"; any other low or high bit is reserved.
        if e & !OFFSET_MASK & !1 != 0 || (e & 1 != 0 && off != 0) {
            return Err(invalid(format!(
                "bitmap '{}' table entry {i} ({e:#x}) is invalid",
                b.name
            )));
        }
        if off != 0 {
            data.push(off);
        }
    }
    Ok(data)
}
