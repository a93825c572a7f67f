// SPDX-License-Identifier: Apache-2.0
//! The qcow2 header: parsing, validation against the file, and serialization.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::Qcow2Error;

/// "QFI\xfb", the first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Size of a version 2 header; version 3 headers are at least [`V3_HEADER_LEN`].
pub const V2_HEADER_LEN: u32 = 72;
/// Minimal size of a version 3 header.
pub const V3_HEADER_LEN: u32 = 104;
/// Size of the version 3 headers wisp writes (with the compression type).
pub const V3_WRITE_LEN: u32 = 112;

/// Smallest and largest supported `cluster_bits` (512 B and 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest virtual size accepted: 64 PiB.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Largest L1 table accepted, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 32 << 20;
/// Longest backing file name (bytes), as the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear feature bit: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Byte offsets of the header fields wisp rewrites in place.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_REFTABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

/// Compression methods for compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

/// The bitmaps header extension: where the bitmap directory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// A parsed and validated qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// Backing file name as stored (not resolved).
    pub backing_file: Option<String>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
    /// The bitmaps extension, as stored (valid only with [`AUTOCLEAR_BITMAPS`]).
    pub bitmaps: Option<BitmapsExt>,
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Decodes a table of big-endian `u64` entries (L1, L2, refcount table);
/// a trailing partial entry is ignored.
pub(crate) fn be64_table(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8).map(|c| be64(c, 0)).collect()
}

fn read_exact(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<(), Qcow2Error> {
    file.read_exact_at(buf, offset)
        .map_err(|source| match source.kind() {
            io::ErrorKind::UnexpectedEof => Qcow2Error::Truncated { what, offset },
            _ => Qcow2Error::Io {
                what,
                offset,
                source,
            },
        })
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Number of L1 entries needed to map `size` bytes with `cluster_bits`.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let l2_coverage_bits = cluster_bits + (cluster_bits - 3);
        size.div_ceil(1u64 << l2_coverage_bits)
    }

    /// Reads and validates the header of `file`.
    pub fn read(file: &File) -> Result<Header, Qcow2Error> {
        Self::read_with(file, false)
    }

    /// Reads and validates the header; `lenient` lets the L1 and refcount
    /// tables overlap the header cluster (read-only opens, so that `check`
    /// can report such damage rather than give up, as QEMU does).
    pub fn read_with(file: &File, lenient: bool) -> Result<Header, Qcow2Error> {
        let file_len = crate::disk::raw::file_size(file).map_err(|source| Qcow2Error::Io {
            what: "header",
            offset: 0,
            source,
        })?;
        let mut fixed = [0u8; V2_HEADER_LEN as usize];
        read_exact(file, &mut fixed, 0, "header")?;
        if fixed[..4] != MAGIC {
            return Err(Qcow2Error::BadMagic);
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version(version));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(&fixed, 8),
            backing_file_size: be32(&fixed, 16),
            cluster_bits: be32(&fixed, 20),
            size: be64(&fixed, 24),
            crypt_method: be32(&fixed, 32),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            snapshots_offset: be64(&fixed, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Deflate,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(Qcow2Error::ClusterBits(h.cluster_bits));
        }
        let cs = h.cluster_size();
        if version == 3 {
            let mut v3 = [0u8; (V3_HEADER_LEN - V2_HEADER_LEN) as usize];
            read_exact(file, &mut v3, u64::from(V2_HEADER_LEN), "header")?;
            h.incompatible_features = be64(&v3, 0);
            h.compatible_features = be64(&v3, 8);
            h.autoclear_features = be64(&v3, 16);
            h.refcount_order = be32(&v3, 24);
            h.header_length = be32(&v3, 28);
            // Lenient as QEMU: the spec wants a multiple of 8, QEMU does not check.
            if h.header_length < V3_HEADER_LEN
                || (!lenient && !h.header_length.is_multiple_of(8))
                || u64::from(h.header_length) > cs
            {
                return Err(Qcow2Error::HeaderLength(h.header_length));
            }
            if h.header_length > V3_HEADER_LEN {
                let mut ct = [0u8; 1];
                read_exact(file, &mut ct, u64::from(V3_HEADER_LEN), "header")?;
                h.compression = match ct[0] {
                    0 => Compression::Deflate,
                    1 => Compression::Zstd,
                    t => return Err(Qcow2Error::CompressionType(t)),
                };
            }
            if h.incompatible_features & INCOMPAT_COMPRESSION == 0
                && h.compression != Compression::Deflate
            {
                return Err(Qcow2Error::CompressionType(1));
            }
        }
        h.validate(file_len, lenient)?;
        h.read_extensions(file)?;
        h.read_backing_name(file)?;
        Ok(h)
    }

    fn validate(&self, file_len: u64, lenient: bool) -> Result<(), Qcow2Error> {
        let cs = self.cluster_size();
        let min = if lenient { 0 } else { cs };
        if self.crypt_method != 0 {
            return Err(Qcow2Error::Encrypted);
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::ExternalDataFile);
        }
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(Qcow2Error::ExtendedL2);
        }
        let unknown =
            self.incompatible_features & !INCOMPAT_KNOWN & !INCOMPAT_DATA_FILE & !INCOMPAT_EXTL2;
        if unknown != 0 {
            return Err(Qcow2Error::UnknownFeatures(unknown));
        }
        if self.refcount_order > 6 {
            return Err(Qcow2Error::RefcountOrder(self.refcount_order));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::VirtualSize(self.size));
        }
        let needed = Self::l1_entries_for(self.size, self.cluster_bits);
        if u64::from(self.l1_size) < needed {
            return Err(Qcow2Error::L1TooSmall {
                l1_size: self.l1_size,
                needed,
            });
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Qcow2Error::TableTooLarge {
                table: "L1 table",
                bytes: l1_bytes,
            });
        }
        if self.l1_size > 0 {
            // Lenient: tables past the end read as zeros (and `check` reports them).
            let l1_file_len = if lenient { u64::MAX } else { file_len };
            check_table(
                "L1 table",
                self.l1_table_offset,
                l1_bytes,
                cs,
                min,
                l1_file_len,
            )?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes == 0 {
            return Err(Qcow2Error::TableTooLarge {
                table: "refcount table",
                bytes: 0,
            });
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::TableTooLarge {
                table: "refcount table",
                bytes: rt_bytes,
            });
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            min,
            if lenient { u64::MAX } else { file_len },
        )?;
        if self.backing_file_offset != 0 {
            if self.backing_file_size == 0 || self.backing_file_size > MAX_BACKING_NAME {
                return Err(Qcow2Error::BackingName);
            }
            let end = self
                .backing_file_offset
                .checked_add(u64::from(self.backing_file_size));
            if end.is_none_or(|e| e > cs) {
                return Err(Qcow2Error::BackingName);
            }
        }
        Ok(())
    }

    fn read_extensions(&mut self, file: &File) -> Result<(), Qcow2Error> {
        let cs = self.cluster_size();
        // Extensions end where the backing name starts, or at the end of cluster 0.
        let limit = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            cs
        };
        let mut off = u64::from(self.header_length);
        while off + 8 <= limit {
            let mut eh = [0u8; 8];
            read_exact(file, &mut eh, off, "header extension")?;
            let ty = be32(&eh, 0);
            let len = u64::from(be32(&eh, 4));
            if ty == EXT_END {
                return Ok(());
            }
            let data_off = off + 8;
            if data_off + len > limit {
                return Err(Qcow2Error::Extension { offset: off });
            }
            match ty {
                EXT_BACKING_FORMAT => {
                    let mut name = vec![0u8; len as usize];
                    read_exact(file, &mut name, data_off, "backing format")?;
                    let name = String::from_utf8(name).map_err(|_| Qcow2Error::BackingName)?;
                    self.backing_format = Some(name);
                }
                EXT_BITMAPS if len >= 24 => {
                    let mut b = [0u8; 24];
                    read_exact(file, &mut b, data_off, "bitmaps extension")?;
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(&b, 0),
                        directory_size: be64(&b, 8),
                        directory_offset: be64(&b, 16),
                    });
                }
                EXT_ENCRYPTION => return Err(Qcow2Error::Encrypted),
                EXT_DATA_FILE => return Err(Qcow2Error::ExternalDataFile),
                _ => {}
            }
            off = data_off + len.next_multiple_of(8);
        }
        Ok(())
    }

    fn read_backing_name(&mut self, file: &File) -> Result<(), Qcow2Error> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let mut name = vec![0u8; self.backing_file_size as usize];
        read_exact(
            file,
            &mut name,
            self.backing_file_offset,
            "backing file name",
        )?;
        let name = String::from_utf8(name).map_err(|_| Qcow2Error::BackingName)?;
        if name.contains('\0') {
            return Err(Qcow2Error::BackingName);
        }
        self.backing_file = Some(name);
        Ok(())
    }

    /// Serializes the header, its extensions and the backing name into cluster 0.
    pub fn to_cluster(&self) -> Vec<u8> {
        let cs = self.cluster_size() as usize;
        let mut b = Vec::with_capacity(cs);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            b.resize(self.header_length as usize, 0);
        }
        if let Some(fmt) = &self.backing_format {
            b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            b.extend_from_slice(fmt.as_bytes());
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            b.extend_from_slice(name.as_bytes());
        }
        b.resize(cs, 0);
        b
    }

    /// Offset the backing name gets when serialized by [`Header::to_cluster`].
    pub fn backing_name_offset(&self) -> u64 {
        let mut off = if self.version >= 3 {
            u64::from(self.header_length)
        } else {
            u64::from(V2_HEADER_LEN)
        };
        if let Some(fmt) = &self.backing_format {
            off += 8 + (fmt.len() as u64).next_multiple_of(8);
        }
        off + 8
    }
}

/// Checks a table is cluster-aligned, at or above `min` and inside the file.
fn check_table(
    table: &'static str,
    offset: u64,
    bytes: u64,
    cs: u64,
    min: u64,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    let inside = offset.checked_add(bytes).is_some_and(|end| end <= file_len);
    if offset < min || !offset.is_multiple_of(cs) || !inside {
        return Err(Qcow2Error::TableOutOfBounds { table, offset });
    }
    Ok(())
}

/// Whether `bytes` of metadata at `offset` are cluster-aligned, outside the
/// header cluster and inside a file of `file_len` bytes.
pub(crate) fn placed_in_file(offset: u64, bytes: u64, cs: u64, file_len: u64) -> bool {
    offset.is_multiple_of(cs)
        && offset >= cs
        && offset.checked_add(bytes).is_some_and(|end| end <= file_len)
}
