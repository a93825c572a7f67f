// SPDX-License-Identifier: Apache-2.0
//! Why a qcow2 image is refused at open.

use std::io;

/// Why a qcow2 image was refused.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("Bad magic: not a qcow2 image")]
    BadMagic,
    #[error("Unsupported qcow2 version {0}")]
    Version(u32),
    #[error("Unsupported cluster_bits {0} (cluster sizes from 512 B to 2 MiB are supported)")]
    ClusterBits(u32),
    #[error("Invalid header_length {0}")]
    HeaderLength(u32),
    #[error("Unknown compression type {0}")]
    CompressionType(u8),
    #[error("Encrypted images are not supported")]
    Encrypted,
    #[error("Images with an external data file are not supported")]
    ExternalDataFile,
    #[error("Images with extended L2 entries are not supported")]
    ExtendedL2,
    #[error("Unknown incompatible features {0:#x}")]
    UnknownFeatures(u64),
    #[error("Invalid refcount_order {0}")]
    RefcountOrder(u32),
    #[error("Virtual size {0} is too large")]
    VirtualSize(u64),
    #[error("L1 table has {l1_size} entries but the virtual size needs {needed}")]
    L1TooSmall { l1_size: u32, needed: u64 },
    #[error("The {table} is too large ({bytes} bytes)")]
    TableTooLarge { table: &'static str, bytes: u64 },
    #[error("The {table} at {offset:#x} is misaligned, overlaps the header or lies past the end of the file")]
    TableOutOfBounds { table: &'static str, offset: u64 },
    #[error("Invalid backing file name or format")]
    BackingName,
    #[error("Header extension at {offset:#x} runs past its area")]
    Extension { offset: u64 },
    #[error("The image is marked corrupt; it can only be opened read-only")]
    Corrupt,
    #[error("Images with internal snapshots can only be opened read-only")]
    Snapshots,
    #[error("The image can only be opened read-only: {0}")]
    Inconsistent(String),
    #[error("Invalid snapshot table or bitmap directory: {0}")]
    Tables(String),
    #[error("The {what} at {offset:#x} is cut short by the end of the file")]
    Truncated { what: &'static str, offset: u64 },
    #[error("Cannot read the {what} at {offset:#x}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
}
