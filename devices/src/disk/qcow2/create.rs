// SPDX-License-Identifier: Apache-2.0
//! Creating, preallocating and growing qcow2 images.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{self, Header, V3_WRITE_LEN};
use super::refcount::set_entry;
use super::{invalid, Qcow2Disk, Qcow2Error, COPIED};
use crate::disk::{open::open_file, DiskError, ImageFormat};

/// Virtual sizes are whole 512-byte sectors (rounded up, as qemu-img does).
pub const SECTOR: u64 = 512;

/// How much of a new image is allocated up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing: clusters are allocated on first write.
    #[default]
    Off,
    /// Every L2 table and data cluster is allocated; data stays sparse.
    Metadata,
    /// Like `Metadata`, and the data clusters are written with zeros.
    Full,
}

/// Parameters of a new qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes, a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// 2 or 3.
    pub version: u32,
    /// Refcount width (1 to 64 bits, a power of two; version 3 only, else 16).
    pub refcount_bits: u32,
    /// Backing file name stored in the header (as given).
    pub backing_file: Option<String>,
    /// Backing format stored in the header extension.
    pub backing_format: Option<ImageFormat>,
    pub preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 64 << 10,
            version: 3,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
        }
    }
}

fn bad(path: &Path, source: Qcow2Error) -> DiskError {
    DiskError::Qcow2 {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates (or overwrites) a qcow2 image at `path`.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), DiskError> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() {
        return Err(bad(path, Qcow2Error::ClusterBits(0)));
    }
    let cluster_bits = cs.trailing_zeros();
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(bad(path, Qcow2Error::ClusterBits(cluster_bits)));
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(bad(path, Qcow2Error::Version(opts.version)));
    }
    let refcount_order = opts.refcount_bits.trailing_zeros();
    if !opts.refcount_bits.is_power_of_two()
        || refcount_order > 6
        || (opts.version == 2 && opts.refcount_bits != 16)
    {
        return Err(bad(path, Qcow2Error::RefcountOrder(refcount_order)));
    }
    if opts.size > header::MAX_VIRTUAL_SIZE {
        return Err(bad(path, Qcow2Error::VirtualSize(opts.size)));
    }
    // Whole sectors, as qemu-img rounds: QEMU would see a smaller disk.
    let size = opts.size.next_multiple_of(SECTOR);
    if opts.backing_file.is_some() && opts.preallocation != Preallocation::Off {
        return Err(DiskError::InvalidOptions(
            "preallocation cannot be combined with a backing file".into(),
        ));
    }
    let l1_entries = Header::l1_entries_for(size, cluster_bits);
    if l1_entries * 8 > header::MAX_L1_BYTES {
        return Err(bad(path, Qcow2Error::VirtualSize(size)));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let per_block = (cs * 8) >> refcount_order;
    // Find a fixed point: the refcount structures must cover themselves.
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = 1 + table + blocks + l1_clusters;
        let nb = total.div_ceil(per_block);
        let nt = (nb * 8).div_ceil(cs);
        if nb == blocks && nt == table {
            break;
        }
        (blocks, table) = (nb, nt);
    }
    let total = 1 + table + blocks + l1_clusters;
    let table_off = cs;
    let blocks_off = table_off + table * cs;
    let l1_off = blocks_off + blocks * cs;

    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_entries > 0 { l1_off } else { 0 },
        refcount_table_offset: table_off,
        refcount_table_clusters: table as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: if opts.version == 3 { V3_WRITE_LEN } else { 72 },
        compression: header::Compression::Deflate,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.map(|f| f.name().to_string()),
        bitmaps: None,
    };
    if let Some(name) = &h.backing_file {
        if name.is_empty() || name.len() > header::MAX_BACKING_NAME as usize || name.contains('\0')
        {
            return Err(bad(path, Qcow2Error::BackingName));
        }
        h.backing_file_offset = h.backing_name_offset();
        h.backing_file_size = name.len() as u32;
        if h.backing_file_offset + u64::from(h.backing_file_size) > cs {
            return Err(bad(path, Qcow2Error::BackingName));
        }
    }

    let io_err = |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err)?;
    let file = open_file(path, false)?;
    file.set_len(0).map_err(io_err)?;
    let mut meta = h.to_cluster();
    let mut rt = vec![0u8; (table * cs) as usize];
    for b in 0..blocks {
        let off = blocks_off + b * cs;
        rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    meta.extend_from_slice(&rt);
    let mut rb = vec![0u8; (blocks * cs) as usize];
    for c in 0..total {
        set_entry(&mut rb, c as usize, refcount_order, 1);
    }
    meta.extend_from_slice(&rb);
    meta.resize((total * cs) as usize, 0);
    file.write_all_at(&meta, 0).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;

    if opts.preallocation != Preallocation::Off {
        let mut disk = Qcow2Disk::open_with(file, path, false, |_| {
            Err(DiskError::InvalidOptions("unexpected backing file".into()))
        })?;
        disk.preallocate(opts.preallocation == Preallocation::Full)
            .map_err(io_err)?;
    }
    Ok(())
}

impl Qcow2Disk {
    /// Allocates every L2 table and data cluster (writing zeros when `full`).
    fn preallocate(&mut self, full: bool) -> io::Result<()> {
        let cs = self.cs();
        let zeros = if full {
            vec![0u8; cs as usize]
        } else {
            Vec::new()
        };
        for i in 0..self.header.size.div_ceil(cs) {
            let (l1i, l2i) = self.indices(i * cs);
            let l2off = self
                .l2_table(l1i, true)?
                .ok_or_else(|| invalid("L2 table allocation failed".into()))?;
            if self.l2_entry(l2off, l2i)? != 0 {
                continue;
            }
            let off = self.alloc(1)?;
            if full {
                self.write_data(&zeros, off)?;
            }
            self.set_l2_entry(l2off, l2i, off | COPIED)?;
        }
        self.file.set_len(self.next_free)?;
        self.data_dirty = true;
        self.flush_metadata()
    }

    /// Grows the virtual size to `new_size` (rounded up to whole sectors),
    /// moving the L1 table if it must grow.
    pub fn resize(&mut self, new_size: u64) -> io::Result<()> {
        self.check_writable()?;
        let new_size = new_size.checked_next_multiple_of(SECTOR).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "virtual size is too large")
        })?;
        if new_size < self.header.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shrinking qcow2 images is not supported",
            ));
        }
        if new_size > header::MAX_VIRTUAL_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("virtual size {new_size} is too large"),
            ));
        }
        self.flush_metadata()?;
        let cs = self.cs();
        let needed = Header::l1_entries_for(new_size, self.cluster_bits);
        if needed > self.l1.len() as u64 {
            if needed * 8 > header::MAX_L1_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("virtual size {new_size} needs too large an L1 table"),
                ));
            }
            let clusters = (needed * 8).div_ceil(cs);
            let new_off = self.alloc(clusters)?;
            self.add_meta(super::Meta::L1, new_off, clusters * cs)?;
            let mut l1 = self.l1.clone();
            l1.resize(needed as usize, 0);
            let mut raw: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            raw.resize((clusters * cs) as usize, 0);
            self.file.write_all_at(&raw, new_off)?;
            self.data_dirty = true;
            self.flush_metadata()?;
            let mut f = [0u8; 12];
            f[..4].copy_from_slice(&(needed as u32).to_be_bytes());
            f[4..].copy_from_slice(&new_off.to_be_bytes());
            self.file.write_all_at(&f, header::OFF_L1_SIZE)?;
            self.file.sync_data()?;
            let old_bytes = u64::from(self.header.l1_size) * 8;
            if self.header.l1_table_offset != 0 && old_bytes > 0 {
                self.meta.remove(self.header.l1_table_offset);
                self.pending_free
                    .push((self.header.l1_table_offset, old_bytes.next_multiple_of(cs)));
            }
            self.header.l1_size = needed as u32;
            self.header.l1_table_offset = new_off;
            self.l1 = l1;
        }
        self.file
            .write_all_at(&new_size.to_be_bytes(), header::OFF_SIZE)?;
        self.file.sync_data()?;
        self.header.size = new_size;
        self.flush_metadata()
    }
}
