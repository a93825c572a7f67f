// SPDX-License-Identifier: Apache-2.0
//! Why a VMDK could not be read.

use std::io;
use std::path::PathBuf;

/// A VMDK header, descriptor or extent that wisp refuses, or an I/O failure reading one.
#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    /// A header field holds a value wisp cannot accept.
    #[error("header field {name} = {value:#x}: {why}")]
    Field {
        name: &'static str,
        value: u64,
        why: String,
    },
    /// A line of the text descriptor is malformed.
    #[error("descriptor line {line}: {why}")]
    Descriptor { line: usize, why: String },
    /// Metadata that contradicts itself.
    #[error("{0}")]
    Corrupt(String),
    /// A valid VMDK feature wisp does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// An extent file could not be opened.
    #[error("extent {index} ({}): {source}", path.display())]
    Extent {
        index: usize,
        path: PathBuf,
        #[source]
        source: Box<crate::disk::DiskError>,
    },
    /// Reading the image failed.
    #[error("cannot read {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A [`VmdkError::Field`] for header field `name`.
pub fn field(name: &'static str, value: u64, why: &str) -> VmdkError {
    VmdkError::Field {
        name,
        value,
        why: why.to_string(),
    }
}

/// An `InvalidData` I/O error for corrupt metadata found while reading.
pub fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
