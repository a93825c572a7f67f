// SPDX-License-Identifier: Apache-2.0
//! Read-only VMDK images (VMware): the way VMs move from VMware onto wisp.
//!
//! Supported layouts:
//! - **monolithicSparse** and **streamOptimized**: one file with a `KDMV`
//!   header, grain directory (plus the redundant one) and grain tables;
//!   streamOptimized grains are zlib-compressed behind 12-byte markers and its
//!   grain directory may sit in a footer at the end of the file (`GD_AT_END`).
//! - **monolithicFlat**, **twoGbMaxExtentFlat**, **twoGbMaxExtentSparse** and
//!   ESXi's **vmfs** (`disk.vmdk` + `disk-flat.vmdk`): a text descriptor
//!   listing FLAT, VMFS, SPARSE or ZERO extents in other files.
//!
//! Extent files are resolved relative to the descriptor's directory. A name
//! that is absolute or has a `..` component is refused: descriptors written by
//! VMware always name their extents relatively, and refusing the rest keeps a
//! descriptor from pointing wisp at arbitrary host files. Symlinks inside the
//! directory are followed (the host administrator placed them). A descriptor
//! found by probing (no `format=vmdk`) is refused altogether when it names
//! extent files, just as a probed qcow2 never follows a backing file.
//!
//! Delta disks (a `parentCID`), COWD/SESPARSE deltas and raw device mappings
//! are refused by name. Every header and descriptor field is bounds-checked
//! before use; errors name the field or descriptor line.

#[doc(hidden)]
pub mod build;
mod descriptor;
mod error;
mod fuzz;
pub mod header;
mod sparse;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use descriptor::{Descriptor, ExtentKind, ExtentLine};
pub use error::VmdkError;
pub use fuzz::fuzz_one;
pub use sparse::{Grain, SparseExtent};

use super::status::{raw_status, BlockKind, BlockStatus};
use super::{check_range, check_writable, DiskBackend, DiskError};
use header::{MAX_DESCRIPTOR_BYTES, SECTOR};

/// What one extent holds.
enum Data {
    Flat { file: File, offset: u64 },
    Zero,
    Sparse(Box<SparseExtent>),
}

struct Extent {
    /// First byte of the virtual disk this extent covers.
    start: u64,
    len: u64,
    data: Data,
}

/// What `wisp image info` shows about one extent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExtentInfo {
    /// The extent file (none for ZERO extents).
    pub filename: Option<PathBuf>,
    /// FLAT, VMFS, SPARSE or ZERO.
    #[serde(rename = "type")]
    pub kind: String,
    pub virtual_size: u64,
    /// Grain size of a sparse extent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub compressed: bool,
}

/// What `wisp image info` shows about a VMDK.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VmdkInfo {
    pub create_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<u32>,
    pub extents: Vec<ExtentInfo>,
}

/// An open, read-only VMDK.
pub struct VmdkDisk {
    extents: Vec<Extent>,
    size: u64,
    info: VmdkInfo,
}

/// Whether the first bytes of a file look like a VMDK (sparse header or descriptor).
pub fn looks_like_vmdk(head: &[u8]) -> bool {
    head.starts_with(&header::MAGIC)
        || head.starts_with(&header::COWD_MAGIC)
        || head.starts_with(descriptor::SIGNATURE)
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmdkError {
    move |source| VmdkError::Io { what, source }
}

impl VmdkDisk {
    /// Opens the VMDK in `file` (at `path`). A descriptor's extents are
    /// opened (read-only, share-locked) only with `follow_extents`.
    pub fn open(file: File, path: &Path, follow_extents: bool) -> Result<VmdkDisk, VmdkError> {
        let len = file.metadata().map_err(io_err("image size"))?.len();
        let mut head = [0u8; 4];
        let n = file.read_at(&mut head, 0).map_err(io_err("image header"))?;
        if n == 4 && (head == header::MAGIC || head == header::COWD_MAGIC) {
            return Self::open_sparse(file, path);
        }
        if len > MAX_DESCRIPTOR_BYTES {
            return Err(VmdkError::Corrupt(format!(
                "the file has no sparse header and is {len} bytes, too large for a descriptor (at most 1 MiB)"
            )));
        }
        let mut text = vec![0u8; len as usize];
        file.read_exact_at(&mut text, 0)
            .map_err(io_err("descriptor"))?;
        let desc = Descriptor::parse(&text)?;
        if !follow_extents && desc.extents.iter().any(|e| e.file.is_some()) {
            return Err(VmdkError::Unsupported(
                "the descriptor names extent files, which a probed image may not open; declare format=vmdk".into(),
            ));
        }
        Self::open_descriptor(desc, path)
    }

    fn open_sparse(file: File, path: &Path) -> Result<VmdkDisk, VmdkError> {
        let sparse = SparseExtent::open(file)?;
        let embedded = match sparse.descriptor()? {
            Some(t) if t.iter().any(|b| !b.is_ascii_whitespace() && *b != 0) => {
                Some(Descriptor::parse(&t)?)
            }
            _ => None,
        };
        let h = sparse.header();
        let create_type = match &embedded {
            Some(d) => d.create_type.clone(),
            None if h.compressed => "streamOptimized".to_string(),
            None => "monolithicSparse".to_string(),
        };
        let size = sparse.size();
        let info = VmdkInfo {
            create_type,
            cid: embedded.and_then(|d| d.cid),
            extents: vec![ExtentInfo {
                filename: Some(path.to_path_buf()),
                kind: "SPARSE".into(),
                virtual_size: size,
                cluster_size: Some(h.grain_bytes()),
                compressed: h.compressed,
            }],
        };
        Ok(VmdkDisk {
            extents: vec![Extent {
                start: 0,
                len: size,
                data: Data::Sparse(Box::new(sparse)),
            }],
            size,
            info,
        })
    }

    fn open_descriptor(desc: Descriptor, path: &Path) -> Result<VmdkDisk, VmdkError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut extents = Vec::with_capacity(desc.extents.len());
        let mut infos = Vec::with_capacity(desc.extents.len());
        let mut start = 0u64;
        for (index, line) in desc.extents.iter().enumerate() {
            let len = line.sectors * SECTOR;
            let file_path = line.file.as_ref().map(|f| dir.join(f));
            let (data, cluster_size, compressed) = match &file_path {
                None => (Data::Zero, None, false),
                Some(p) => open_extent(index, line, p)?,
            };
            infos.push(ExtentInfo {
                filename: file_path,
                kind: line.type_name.clone(),
                virtual_size: len,
                cluster_size,
                compressed,
            });
            extents.push(Extent { start, len, data });
            start += len;
        }
        Ok(VmdkDisk {
            extents,
            size: start,
            info: VmdkInfo {
                create_type: desc.create_type,
                cid: desc.cid,
                extents: infos,
            },
        })
    }

    /// Create type, CID and extents.
    pub fn info(&self) -> &VmdkInfo {
        &self.info
    }

    /// Whether byte `offset` of the disk is stored (`true`) or reads as
    /// zeros, and how many bytes from there share that state.
    pub fn allocation(&mut self, offset: u64) -> io::Result<(bool, u64)> {
        let st = self.block_status(offset)?;
        Ok((
            matches!(st.kind, BlockKind::Data | BlockKind::ZeroData),
            st.len,
        ))
    }

    /// The status of byte `offset` up to the end of its grain or extent.
    pub fn block_status(&mut self, offset: u64) -> io::Result<BlockStatus> {
        let i = self.extent_index(offset)?;
        let e = &mut self.extents[i];
        let local = offset - e.start;
        let rest = e.len - local;
        let (kind, len, off) = match &mut e.data {
            Data::Flat { file, offset } => {
                let st = raw_status(file, *offset + e.len, *offset + local)?;
                let kind = match st.kind {
                    BlockKind::Data => BlockKind::Data,
                    _ => BlockKind::ZeroData,
                };
                (kind, st.len, Some(*offset + local))
            }
            Data::Zero => (BlockKind::Zero, rest, None),
            Data::Sparse(s) => {
                let gb = s.header().grain_bytes();
                let within = local % gb;
                let n = (gb - within).min(rest);
                match s.grain(local / gb)? {
                    Grain::Unallocated => (BlockKind::Unallocated, n, None),
                    Grain::Zero => (BlockKind::Zero, n, None),
                    Grain::Data(at) => (BlockKind::Data, n, Some(at + within)),
                    Grain::Compressed(_) => (BlockKind::Data, n, None),
                }
            }
        };
        Ok(BlockStatus {
            kind,
            len,
            offset: off,
        })
    }

    fn extent_index(&self, offset: u64) -> io::Result<usize> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        if i >= self.extents.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset is past the last extent",
            ));
        }
        Ok(i)
    }
}

fn open_extent(
    index: usize,
    line: &ExtentLine,
    p: &Path,
) -> Result<(Data, Option<u64>, bool), VmdkError> {
    let extent_err = |source: DiskError| VmdkError::Extent {
        index,
        path: p.to_path_buf(),
        source: Box::new(source),
    };
    let file = super::open::open_file(p, true).map_err(extent_err)?;
    let io = |source| {
        extent_err(DiskError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    match line.kind {
        ExtentKind::Flat => {
            let have = file.metadata().map_err(io)?.len();
            let need = (line.offset + line.sectors) * SECTOR;
            if have < need {
                return Err(VmdkError::Corrupt(format!(
                    "extent {index} ({}) is {have} bytes, but the descriptor needs {need}",
                    p.display()
                )));
            }
            Ok((
                Data::Flat {
                    file,
                    offset: line.offset * SECTOR,
                },
                None,
                false,
            ))
        }
        ExtentKind::Sparse => {
            let s = SparseExtent::open(file).map_err(|e| {
                VmdkError::Corrupt(format!("extent {index} ({}): {e}", p.display()))
            })?;
            if s.header().capacity != line.sectors {
                return Err(VmdkError::Corrupt(format!(
                    "extent {index} ({}) holds {} sectors, but the descriptor says {}",
                    p.display(),
                    s.header().capacity,
                    line.sectors
                )));
            }
            let (gs, c) = (s.header().grain_bytes(), s.header().compressed);
            Ok((Data::Sparse(Box::new(s)), Some(gs), c))
        }
        ExtentKind::Zero => Ok((Data::Zero, None, false)),
    }
}

impl DiskBackend for VmdkDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = self.extent_index(pos)?;
            let e = &mut self.extents[i];
            let local = pos - e.start;
            let n = ((e.len - local) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match &mut e.data {
                Data::Zero => out.fill(0),
                Data::Flat { file, offset } => file.read_exact_at(out, *offset + local)?,
                Data::Sparse(s) => s.read(out, local)?,
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        check_writable(true)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        check_writable(true)
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        check_writable(true)
    }
}
