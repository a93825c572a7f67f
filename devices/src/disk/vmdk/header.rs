// SPDX-License-Identifier: Apache-2.0
//! The 512-byte header of a hosted sparse extent (`KDMV`), and the footer a
//! stream-optimized image carries when its grain directory is written last.

use super::error::{field, VmdkError};

/// `KDMV` as it appears in the first four bytes of a sparse extent.
pub const MAGIC: [u8; 4] = *b"KDMV";
/// ESX's older sparse format (`COWD`), which wisp does not read.
pub const COWD_MAGIC: [u8; 4] = *b"COWD";
/// Bytes in a sector, the unit of every offset in a VMDK.
pub const SECTOR: u64 = 512;
/// `gdOffset` value meaning "the grain directory follows the data; see the footer".
pub const GD_AT_END: u64 = u64::MAX;

/// Flag bit: the newline-detection characters are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag bit: a redundant grain directory exists at `rgdOffset`.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag bit: a grain table entry of 1 means "grain reads as zeros".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag bit: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag bit: the extent holds stream markers.
pub const FLAG_MARKERS: u32 = 1 << 17;

/// Largest virtual size wisp accepts for one extent: 64 TiB.
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 37;
/// Largest grain: 1 MiB (VMware writes 64 KiB), which bounds each decompression buffer.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Most entries per grain table (the specification fixes 512).
pub const MAX_GTES_PER_GT: u32 = 512;
/// Most grain directory entries (16 MiB of directory; 128 TiB at the defaults).
pub const MAX_GD_ENTRIES: u64 = 1 << 22;
/// Largest embedded or standalone descriptor: 1 MiB.
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// Marker type of the footer marker that precedes the footer header.
const MARKER_FOOTER: u32 = 3;
/// Marker type of the end-of-stream marker.
const MARKER_EOS: u32 = 0;

/// A validated sparse extent header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Virtual size of the extent in sectors.
    pub capacity: u64,
    /// Sectors per grain (a power of two).
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_sectors: u64,
    pub gtes_per_gt: u32,
    /// Redundant grain directory sector, when [`FLAG_RGD`] is set.
    pub rgd_offset: Option<u64>,
    /// Grain directory sector (taken from the footer when the header said GD_AT_END).
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean_shutdown: bool,
    /// Grains are deflate-compressed (zlib streams).
    pub compressed: bool,
    /// Grains carry a 12-byte marker (LBA, size) before their data.
    pub markers: bool,
    /// The grain directory came from the footer.
    pub gd_from_footer: bool,
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// The raw fields of a 512-byte header block, unvalidated.
struct RawHeader {
    version: u32,
    flags: u32,
    capacity: u64,
    grain: u64,
    desc_off: u64,
    desc_size: u64,
    gtes: u32,
    rgd: u64,
    gd: u64,
    overhead: u64,
    unclean: u8,
    nl: [u8; 4],
    algo: u16,
}

fn raw(b: &[u8; 512]) -> Result<RawHeader, VmdkError> {
    if b[..4] == COWD_MAGIC {
        return Err(VmdkError::Unsupported(
            "ESX COWD sparse extents (vmfsSparse) are not supported".into(),
        ));
    }
    if b[..4] != MAGIC {
        return Err(field("magic", le32(b, 0) as u64, "expected KDMV"));
    }
    Ok(RawHeader {
        version: le32(b, 4),
        flags: le32(b, 8),
        capacity: le64(b, 12),
        grain: le64(b, 20),
        desc_off: le64(b, 28),
        desc_size: le64(b, 36),
        gtes: le32(b, 44),
        rgd: le64(b, 48),
        gd: le64(b, 56),
        overhead: le64(b, 64),
        unclean: b[72],
        nl: [b[73], b[74], b[75], b[76]],
        algo: le16(b, 77),
    })
}

/// Checks that `count` sectors from sector `start` lie inside a file of `file_len` bytes.
pub fn check_in_file(
    name: &'static str,
    start: u64,
    bytes: u64,
    file_len: u64,
) -> Result<(), VmdkError> {
    let end = start
        .checked_mul(SECTOR)
        .and_then(|s| s.checked_add(bytes))
        .ok_or_else(|| field(name, start, "offset overflows"))?;
    if end > file_len {
        return Err(field(
            name,
            start,
            &format!("{bytes} bytes there run past the end of the file ({file_len} bytes)"),
        ));
    }
    Ok(())
}

impl SparseHeader {
    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Entries in the grain directory.
    pub fn gd_entries(&self) -> u64 {
        let per_gd = self.grain_sectors * self.gtes_per_gt as u64;
        self.capacity.div_ceil(per_gd)
    }

    /// Parses and validates the header in `first` (the file's first 512 bytes).
    ///
    /// `tail` returns the file's last 1536 bytes when the grain directory is
    /// at the end (footer marker, footer, end-of-stream marker); `file_len`
    /// bounds every offset.
    pub fn parse(
        first: &[u8; 512],
        file_len: u64,
        tail: impl FnOnce() -> Result<[u8; 1536], VmdkError>,
    ) -> Result<SparseHeader, VmdkError> {
        let mut r = raw(first)?;
        let mut gd_from_footer = false;
        if r.gd == GD_AT_END {
            let t = tail()?;
            let marker_ok = |b: &[u8], kind: u32| {
                le64(b, 0) == u64::from(kind == MARKER_FOOTER)
                    && le32(b, 8) == 0
                    && le32(b, 12) == kind
            };
            if !marker_ok(&t[..512], MARKER_FOOTER) {
                return Err(field(
                    "gdOffset",
                    GD_AT_END,
                    "says the grain directory is at the end, but no footer marker precedes the last two sectors",
                ));
            }
            if !marker_ok(&t[1024..], MARKER_EOS) {
                return Err(VmdkError::Corrupt(
                    "the footer is not followed by an end-of-stream marker".into(),
                ));
            }
            let mut footer = [0u8; 512];
            footer.copy_from_slice(&t[512..1024]);
            let f = raw(&footer).map_err(|e| VmdkError::Corrupt(format!("footer: {e}")))?;
            if f.gd == GD_AT_END {
                return Err(field(
                    "footer gdOffset",
                    f.gd,
                    "the footer must give the grain directory's sector",
                ));
            }
            r = f;
            gd_from_footer = true;
        }
        Self::validate(r, file_len, gd_from_footer)
    }

    fn validate(
        r: RawHeader,
        file_len: u64,
        gd_from_footer: bool,
    ) -> Result<SparseHeader, VmdkError> {
        if !(1..=3).contains(&r.version) {
            return Err(field(
                "version",
                r.version.into(),
                "supported versions are 1 to 3",
            ));
        }
        if r.flags & FLAG_NL_DETECT != 0 && r.nl != *b"\n \r\n" {
            return Err(VmdkError::Corrupt(
                "the newline-detection bytes are wrong: the file was probably copied in text mode"
                    .into(),
            ));
        }
        if r.capacity > MAX_CAPACITY_SECTORS {
            return Err(field("capacity", r.capacity, "larger than 64 TiB"));
        }
        if r.grain == 0 || !r.grain.is_power_of_two() || r.grain > MAX_GRAIN_SECTORS {
            return Err(field(
                "grainSize",
                r.grain,
                "must be a power of two from 1 to 2048 sectors",
            ));
        }
        if r.gtes == 0 || r.gtes > MAX_GTES_PER_GT {
            return Err(field(
                "numGTEsPerGT",
                r.gtes.into(),
                "must be from 1 to 512",
            ));
        }
        let compressed = match r.algo {
            0 => false,
            1 => true,
            n => {
                return Err(field(
                    "compressAlgorithm",
                    n.into(),
                    "only 0 (none) and 1 (deflate) exist",
                ))
            }
        };
        let h = SparseHeader {
            version: r.version,
            flags: r.flags,
            capacity: r.capacity,
            grain_sectors: r.grain,
            descriptor_offset: r.desc_off,
            descriptor_sectors: r.desc_size,
            gtes_per_gt: r.gtes,
            rgd_offset: (r.flags & FLAG_RGD != 0).then_some(r.rgd),
            gd_offset: r.gd,
            overhead: r.overhead,
            unclean_shutdown: r.unclean != 0,
            compressed,
            markers: r.flags & FLAG_MARKERS != 0,
            gd_from_footer,
        };
        h.check_bounds(file_len)?;
        Ok(h)
    }

    /// Checks that the directories, overhead and descriptor lie inside the file.
    fn check_bounds(&self, file_len: u64) -> Result<(), VmdkError> {
        let entries = self.gd_entries();
        if entries > MAX_GD_ENTRIES {
            return Err(field(
                "numGTEsPerGT",
                self.gtes_per_gt.into(),
                &format!("with this grainSize and capacity the grain directory needs {entries} entries (at most {MAX_GD_ENTRIES})"),
            ));
        }
        if entries > 0 {
            check_in_file("gdOffset", self.gd_offset, entries * 4, file_len)?;
            if let Some(rgd) = self.rgd_offset {
                check_in_file("rgdOffset", rgd, entries * 4, file_len)?;
            }
        }
        check_in_file("overHead", self.overhead, 0, file_len)?;
        if self.descriptor_sectors > 0 {
            if self.descriptor_sectors > MAX_DESCRIPTOR_BYTES / SECTOR {
                return Err(field(
                    "descriptorSize",
                    self.descriptor_sectors,
                    "larger than 1 MiB",
                ));
            }
            check_in_file(
                "descriptorOffset",
                self.descriptor_offset,
                self.descriptor_sectors * SECTOR,
                file_len,
            )?;
        }
        Ok(())
    }

    /// Encodes the header (for tests and seeds): the inverse of [`SparseHeader::parse`].
    #[doc(hidden)]
    pub fn encode(&self, gd_offset: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.unwrap_or(0).to_le_bytes());
        b[56..64].copy_from_slice(&gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = self.unclean_shutdown as u8;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&(self.compressed as u16).to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 2048,
            grain_sectors: 128,
            descriptor_offset: 1,
            descriptor_sectors: 20,
            gtes_per_gt: 512,
            rgd_offset: Some(21),
            gd_offset: 30,
            overhead: 128,
            unclean_shutdown: false,
            compressed: false,
            markers: false,
            gd_from_footer: false,
        }
    }

    fn no_tail() -> Result<[u8; 1536], VmdkError> {
        panic!("tail read for a header with a grain directory offset")
    }

    #[test]
    fn test_parse_roundtrips_encode() {
        let h = sample();
        let parsed = SparseHeader::parse(&h.encode(30), 1 << 20, no_tail).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.gd_entries(), 1);
    }

    fn err_of(mutate: impl FnOnce(&mut [u8; 512])) -> String {
        let mut b = sample().encode(30);
        mutate(&mut b);
        SparseHeader::parse(&b, 1 << 20, no_tail)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn test_parse_hostile_fields_name_the_field() {
        assert!(err_of(|b| b[0] = b'X').contains("magic"));
        assert!(err_of(|b| b[4] = 9).contains("version"));
        assert!(
            err_of(|b| b[12..20].copy_from_slice(&u64::MAX.to_le_bytes())).contains("capacity")
        );
        assert!(err_of(|b| b[20] = 3).contains("grainSize"));
        assert!(err_of(|b| b[20..28].copy_from_slice(&0u64.to_le_bytes())).contains("grainSize"));
        assert!(err_of(|b| b[44..48].copy_from_slice(&0u32.to_le_bytes())).contains("numGTEsPerGT"));
        assert!(
            err_of(|b| b[44..48].copy_from_slice(&100_000u32.to_le_bytes()))
                .contains("numGTEsPerGT")
        );
        assert!(
            err_of(|b| b[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes())).contains("gdOffset")
        );
        assert!(
            err_of(|b| b[48..56].copy_from_slice(&(1u64 << 60).to_le_bytes()))
                .contains("rgdOffset")
        );
        assert!(
            err_of(|b| b[36..44].copy_from_slice(&(1u64 << 50).to_le_bytes()))
                .contains("descriptorSize")
        );
        assert!(
            err_of(|b| b[36..44].copy_from_slice(&u64::MAX.to_le_bytes()))
                .contains("descriptorSize")
        );
        assert!(
            err_of(|b| b[28..36].copy_from_slice(&u64::MAX.to_le_bytes()))
                .contains("descriptorOffset")
        );
        assert!(err_of(|b| b[77] = 7).contains("compressAlgorithm"));
        assert!(
            err_of(|b| b[64..72].copy_from_slice(&(1u64 << 40).to_le_bytes())).contains("overHead")
        );
        assert!(err_of(|b| b[75] = b'\n').contains("text mode"));
    }

    #[test]
    fn test_parse_tiny_grains_on_huge_disk_are_refused_before_allocating() {
        let mut h = sample();
        h.capacity = MAX_CAPACITY_SECTORS;
        h.grain_sectors = 1;
        h.gtes_per_gt = 1;
        let err = SparseHeader::parse(&h.encode(30), u64::MAX, no_tail).unwrap_err();
        assert!(err.to_string().contains("grain directory needs"), "{err}");
    }

    #[test]
    fn test_parse_cowd_is_unsupported_by_name() {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(&COWD_MAGIC);
        let err = SparseHeader::parse(&b, 1 << 20, no_tail).unwrap_err();
        assert!(err.to_string().contains("COWD"));
    }

    fn marker(kind: u32, val: u64) -> [u8; 512] {
        let mut m = [0u8; 512];
        m[..8].copy_from_slice(&val.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        m
    }

    #[test]
    fn test_parse_gd_at_end_reads_the_footer() {
        let mut h = sample();
        h.flags |= FLAG_COMPRESSED | FLAG_MARKERS;
        h.rgd_offset = None;
        h.flags &= !FLAG_RGD;
        let head = h.encode(GD_AT_END);
        let mut tail = [0u8; 1536];
        tail[..512].copy_from_slice(&marker(MARKER_FOOTER, 1));
        tail[512..1024].copy_from_slice(&h.encode(40));
        tail[1024..].copy_from_slice(&marker(MARKER_EOS, 0));
        let parsed = SparseHeader::parse(&head, 1 << 20, || Ok(tail)).unwrap();
        assert_eq!(parsed.gd_offset, 40);
        assert!(parsed.gd_from_footer && parsed.markers);
        // Without the footer marker the image is refused, naming gdOffset.
        tail[..512].copy_from_slice(&[0u8; 512]);
        let err = SparseHeader::parse(&head, 1 << 20, || Ok(tail)).unwrap_err();
        assert!(err.to_string().contains("gdOffset"), "{err}");
    }
}
