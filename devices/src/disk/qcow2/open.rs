// SPDX-License-Identifier: Apache-2.0
//! Opening a qcow2 image: header, tables, the metadata map, and the checks
//! that keep a broken image from being written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::cache::TableCache;
use super::meta::{Meta, MetaMap};
use super::refcount::Refcounts;
use super::tables::{self, BITMAP_IN_USE};
use super::{
    cache_tables, header, resolve_backing, BackingSpec, Header, Qcow2Disk, Qcow2Error,
    L2_CACHE_BYTES, OFFSET_MASK, REFCOUNT_CACHE_BYTES,
};
use crate::disk::{DiskBackend, DiskError, ImageFormat};

/// How an image is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Reads only; damaged tables are tolerated so `check` can report them.
    ReadOnly,
    /// Guest writes: refused unless the image is consistent.
    ReadWrite,
    /// `check -r`: writable, but only for refcount and flag repairs.
    Repair,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Qcow2Disk {
    /// Opens a qcow2 image from a locked `file`; `open_backing` opens the
    /// backing file when the header names one.
    pub fn open_with(
        file: File,
        path: &Path,
        read_only: bool,
        open_backing: impl FnOnce(&BackingSpec) -> Result<Box<dyn DiskBackend>, DiskError>,
    ) -> Result<Self, DiskError> {
        let mode = if read_only {
            OpenMode::ReadOnly
        } else {
            OpenMode::ReadWrite
        };
        Self::open_mode(file, path, mode, open_backing)
    }

    /// Opens a qcow2 image in `mode`.
    pub fn open_mode(
        file: File,
        path: &Path,
        mode: OpenMode,
        open_backing: impl FnOnce(&BackingSpec) -> Result<Box<dyn DiskBackend>, DiskError>,
    ) -> Result<Self, DiskError> {
        let qerr = |source| DiskError::Qcow2 {
            path: path.to_path_buf(),
            source,
        };
        let strict = mode == OpenMode::ReadWrite;
        let header = Header::read_with(&file, mode == OpenMode::ReadOnly).map_err(qerr)?;
        if strict && header.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
            return Err(qerr(Qcow2Error::Corrupt));
        }
        if strict && header.nb_snapshots > 0 {
            return Err(qerr(Qcow2Error::Snapshots));
        }
        let file_len = crate::disk::raw::file_size(&file).map_err(io_err(path))?;
        let cs = header.cluster_size();
        let l1 = load_l1(&file, &header, strict.then_some(file_len)).map_err(qerr)?;
        let rc = Refcounts::load(
            &file,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            header.refcount_order,
            header.cluster_bits,
            strict.then_some(file_len),
            cache_tables(header.cluster_bits, REFCOUNT_CACHE_BYTES),
        )
        .map_err(|source| {
            qerr(Qcow2Error::Io {
                what: "refcount table",
                offset: header.refcount_table_offset,
                source,
            })
        })?;
        let (snapshots, snapshots_error, bitmaps, tables_error) =
            load_tables(&file, &header, mode).map_err(qerr)?;
        let backing = open_backing_of(&header, path, open_backing)?;
        let mut disk = Qcow2Disk {
            cluster_bits: header.cluster_bits,
            l2: TableCache::new(cache_tables(header.cluster_bits, L2_CACHE_BYTES)),
            meta: MetaMap::new(header.cluster_bits),
            header,
            file,
            path: path.to_path_buf(),
            read_only: mode == OpenMode::ReadOnly,
            l1,
            l1_dirty: false,
            rc,
            next_free: file_len.next_multiple_of(cs),
            pending_free: Vec::new(),
            free_hint: 0,
            data_dirty: false,
            backing,
            unpacked: None,
            snapshots,
            snapshots_error,
            bitmaps,
            tables_error,
            corrupt: false,
            write_log: None,
        };
        let overlap = disk.build_meta_map().map_err(io_err(path))?;
        match mode {
            OpenMode::ReadOnly => {}
            OpenMode::Repair => disk.clear_unknown_autoclear().map_err(io_err(path))?,
            OpenMode::ReadWrite => {
                if let Some(why) = overlap {
                    return Err(qerr(Qcow2Error::Inconsistent(format!(
                        "{why}; run `wisp image check -r all` on it"
                    ))));
                }
                disk.prepare_for_writes().map_err(|e| match e.kind() {
                    io::ErrorKind::InvalidData => qerr(Qcow2Error::Inconsistent(e.to_string())),
                    _ => io_err(path)(e),
                })?;
            }
        }
        Ok(disk)
    }

    /// Records every metadata cluster the image names; returns the first
    /// overlap between two of them (which `check` reports in full).
    fn build_meta_map(&mut self) -> io::Result<Option<String>> {
        let cs = self.cs();
        let mut runs = vec![
            (Meta::Header, 0, cs),
            (
                Meta::RefTable,
                self.rc.table_offset,
                self.rc.table_clusters * cs,
            ),
        ];
        if !self.l1.is_empty() {
            runs.push((
                Meta::L1,
                self.header.l1_table_offset,
                self.l1.len() as u64 * 8,
            ));
        }
        runs.extend(self.rc.blocks().map(|o| (Meta::RefBlock, o, cs)));
        runs.extend(
            self.l1
                .iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| (Meta::L2, o, cs)),
        );
        if self.snapshots.bytes > 0 {
            runs.push((
                Meta::SnapshotTable,
                self.snapshots.offset,
                self.snapshots.bytes,
            ));
        }
        for l1 in &self.snapshots.l1s {
            runs.push((Meta::SnapshotL1, l1.offset, u64::from(l1.entries) * 8));
        }
        if let Some(b) = &self.bitmaps {
            runs.push((Meta::BitmapDirectory, b.offset, b.bytes));
            for bm in &b.list {
                let bytes = u64::from(bm.table_entries) * 8;
                runs.push((Meta::BitmapTable, bm.table_offset, bytes));
            }
        }
        let mut first = None;
        for (kind, off, len) in runs {
            if let Err(hit) = self.meta.add(kind, off, len) {
                // One L2 table named by several L1 entries is no overlap.
                if !(kind == Meta::L2 && hit.kind == Meta::L2 && hit.offset == off) {
                    first.get_or_insert(format!(
                        "the {kind} at {off:#x} overlaps the {} at {:#x}",
                        hit.kind, hit.offset
                    ));
                }
            }
        }
        Ok(first)
    }

    /// Before guest writes: rebuilds refcounts after a crash (dirty bit),
    /// refuses inconsistent refcounts, and marks persistent bitmaps in use.
    fn prepare_for_writes(&mut self) -> io::Result<()> {
        if self.header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            log::warn!(
                "{}: image was not closed cleanly, rebuilding refcounts",
                self.path.display()
            );
            let report = self.check(true)?;
            if let Some(why) = report.repair_refused {
                return Err(super::invalid(why));
            }
            self.header.incompatible_features &= !header::INCOMPAT_DIRTY;
            self.file.write_all_at(
                &self.header.incompatible_features.to_be_bytes(),
                header::OFF_INCOMPAT,
            )?;
            self.file.sync_data()?;
        } else {
            let report = self.check(false)?;
            if report.corruptions > 0 {
                return Err(super::invalid(format!(
                    "its metadata is inconsistent ({} errors; first: {}); \
                     run `wisp image check -r all` on it",
                    report.corruptions,
                    report.messages.first().map_or("?", |m| m.as_str())
                )));
            }
        }
        self.mark_bitmaps_in_use()?;
        self.clear_unknown_autoclear()
    }

    /// Guest writes make persistent bitmaps stale: flag them in use, as QEMU
    /// does while it tracks writes, so no program trusts them afterwards.
    fn mark_bitmaps_in_use(&mut self) -> io::Result<()> {
        let Some(b) = &mut self.bitmaps else {
            return Ok(());
        };
        let mut wrote = false;
        for bm in b.list.iter_mut().filter(|bm| bm.flags & BITMAP_IN_USE == 0) {
            bm.flags |= BITMAP_IN_USE;
            self.file
                .write_all_at(&bm.flags.to_be_bytes(), bm.flags_at)?;
            log::warn!(
                "{}: persistent bitmap '{}' is marked in use (inconsistent): wisp does not track writes in it",
                self.path.display(),
                bm.name
            );
            wrote = true;
        }
        if wrote {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Clears autoclear features wisp does not maintain (all but a
    /// consistent bitmaps extension, whose bitmaps are flagged in use).
    fn clear_unknown_autoclear(&mut self) -> io::Result<()> {
        let keep = if self.bitmaps.is_some() {
            header::AUTOCLEAR_BITMAPS
        } else {
            0
        };
        let want = self.header.autoclear_features & keep;
        if want != self.header.autoclear_features {
            self.header.autoclear_features = want;
            self.file
                .write_all_at(&want.to_be_bytes(), header::OFF_AUTOCLEAR)?;
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Reads the L1 table; with `file_len`, refuses L2 tables outside the file.
/// Without, a table cut short by the end of the file reads as zeros.
fn load_l1(file: &File, header: &Header, file_len: Option<u64>) -> Result<Vec<u64>, Qcow2Error> {
    let cs = header.cluster_size();
    let mut raw = vec![0u8; header.l1_size as usize * 8];
    match file_len {
        Some(_) => file.read_exact_at(&mut raw, header.l1_table_offset),
        None => super::read_full(file, &mut raw, header.l1_table_offset),
    }
    .map_err(|source| Qcow2Error::Io {
        what: "L1 table",
        offset: header.l1_table_offset,
        source,
    })?;
    let l1 = header::be64_table(&raw);
    if let Some(file_len) = file_len {
        for &e in &l1 {
            let off = e & OFFSET_MASK;
            if off != 0 && !header::placed_in_file(off, cs, cs, file_len) {
                return Err(Qcow2Error::TableOutOfBounds {
                    table: "L2 table",
                    offset: off,
                });
            }
        }
    }
    Ok(l1)
}

type Tables = (
    tables::Snapshots,
    Option<String>,
    Option<tables::Bitmaps>,
    Option<String>,
);

/// Reads the snapshot table and bitmap directory, with why either failed.
/// Not for writing, a broken snapshot table is left for `check` to report
/// (as QEMU does); read-only, a broken bitmap directory too (then `check`
/// cannot complete, as QEMU cannot open the image).
fn load_tables(file: &File, header: &Header, mode: OpenMode) -> Result<Tables, Qcow2Error> {
    let (snapshots, snapshots_error) = match tables::read_snapshots(file, header) {
        Ok(s) => (s, None),
        Err(e) if mode != OpenMode::ReadWrite => (Default::default(), Some(e.to_string())),
        Err(e) => return Err(Qcow2Error::Tables(e.to_string())),
    };
    let (bitmaps, bitmaps_error) = match tables::read_bitmaps(file, header) {
        Ok(b) => (b, None),
        Err(e) if mode == OpenMode::ReadOnly => (None, Some(e.to_string())),
        Err(e) => return Err(Qcow2Error::Tables(e.to_string())),
    };
    Ok((snapshots, snapshots_error, bitmaps, bitmaps_error))
}

/// Opens the backing file the header names, if any.
fn open_backing_of(
    header: &Header,
    path: &Path,
    open_backing: impl FnOnce(&BackingSpec) -> Result<Box<dyn DiskBackend>, DiskError>,
) -> Result<Option<Box<dyn DiskBackend>>, DiskError> {
    let Some(name) = &header.backing_file else {
        return Ok(None);
    };
    let format = match &header.backing_format {
        Some(f) => Some(f.parse::<ImageFormat>()?),
        None => None,
    };
    let spec = BackingSpec {
        path: resolve_backing(path, name),
        format,
    };
    Ok(Some(open_backing(&spec)?))
}
