// SPDX-License-Identifier: Apache-2.0
//! qcow2 images (versions 2 and 3): mapping, allocation and crash-safe write-back.
//!
//! Metadata is cached and written back on `flush` in an order that keeps the
//! image consistent after a crash (at worst leaking clusters): data, then
//! refcount blocks and table, then the header if the refcount table moved,
//! then L2 tables, then the L1 table; refcount decrements come last.

mod cache;
mod check;
mod compress;
pub mod create;
mod error;
mod flush;
mod fuzz;
mod guard;
pub mod header;
mod meta;
mod open;
mod pack;
mod rebase;
mod refcount;
mod status;
mod tables;
mod zero;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cache::TableCache;
use meta::{Meta, MetaMap};
use refcount::Refcounts;

pub use check::{CheckReport, Repair};
pub use create::{create, CreateOptions, Preallocation};
pub use error::Qcow2Error;
pub use fuzz::fuzz_one;
pub use header::{Header, MAGIC};
pub use open::OpenMode;
pub use pack::create_compressed;

use super::{check_range, DiskBackend, ImageFormat};

/// Host offset bits of L1, L2 (standard) and refcount table entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// An `InvalidData` I/O error for metadata that makes no sense.
pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The backing file an image names, resolved against the image's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingSpec {
    pub path: PathBuf,
    pub format: Option<ImageFormat>,
}

/// Resolves a backing name stored in `image`'s header.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Where a guest cluster's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    /// Not in this image: the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; may keep a preallocated host cluster.
    Zero { prealloc: Option<u64>, copied: bool },
    /// A host cluster; `copied` means its refcount is one (writable in place).
    Data { off: u64, copied: bool },
    /// Compressed bytes at `off` of at most `len` bytes.
    Compressed { off: u64, len: u64 },
}

/// An open qcow2 image.
pub struct Qcow2Disk {
    file: File,
    path: PathBuf,
    header: Header,
    read_only: bool,
    cluster_bits: u32,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: TableCache<Vec<u64>>,
    rc: Refcounts,
    /// Where the next cluster is allocated (allocation appends).
    next_free: u64,
    /// Host byte ranges whose refcounts drop once L2 updates are durable.
    pending_free: Vec<(u64, u64)>,
    /// No free cluster lies below this cluster index.
    free_hint: u64,
    data_dirty: bool,
    backing: Option<Box<dyn DiskBackend>>,
    /// Last decompressed cluster, by L2 entry.
    unpacked: Option<(u64, Vec<u8>)>,
    /// Every metadata cluster: data writes and allocations must miss them.
    meta: MetaMap,
    snapshots: tables::Snapshots,
    /// Why the snapshot table could not be read (`check` reports it).
    snapshots_error: Option<String>,
    bitmaps: Option<tables::Bitmaps>,
    /// Why the bitmap directory could not be read (read-only opens only:
    /// `check` then cannot complete).
    tables_error: Option<String>,
    /// A write would have overwritten metadata: nothing is written any more.
    corrupt: bool,
    /// Host ranges of data writes, when a test or fuzzer asks for them.
    write_log: Option<Vec<(u64, u64)>>,
}

pub(crate) fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Most memory the L2 cache of one image may use (filled lazily): with
/// 64 KiB clusters it maps 256 GiB of guest space.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Most memory the refcount block cache of one image may use.
const REFCOUNT_CACHE_BYTES: u64 = 4 << 20;

/// How many tables of one cluster each fit `budget` bytes (4 to 1024).
fn cache_tables(cluster_bits: u32, budget: u64) -> usize {
    (budget >> cluster_bits).clamp(4, 1024) as usize
}

impl Qcow2Disk {
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image path this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn indices(&self, vaddr: u64) -> (usize, usize) {
        let l2_bits = self.cluster_bits - 3;
        let cluster = vaddr >> self.cluster_bits;
        (
            (cluster >> l2_bits) as usize,
            (cluster & ((1 << l2_bits) - 1)) as usize,
        )
    }

    fn mapping(&self, entry: u64) -> io::Result<Mapping> {
        let cs = self.cs();
        if entry & COMPRESSED != 0 {
            let shift = 62 - (self.cluster_bits - 8);
            let off = entry & ((1 << shift) - 1);
            let sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (off & 511);
            if off < cs {
                return Err(invalid(format!(
                    "compressed cluster at {off:#x} overlaps the header"
                )));
            }
            return Ok(Mapping::Compressed { off, len });
        }
        let off = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        if self.header.version >= 3 && entry & ZERO != 0 {
            let prealloc = (off != 0 && off.is_multiple_of(cs) && off >= cs).then_some(off);
            return Ok(Mapping::Zero { prealloc, copied });
        }
        if off == 0 {
            return Ok(Mapping::Unallocated);
        }
        if !off.is_multiple_of(cs) || off < cs {
            return Err(invalid(format!(
                "data cluster at {off:#x} is misaligned or overlaps the header"
            )));
        }
        Ok(Mapping::Data { off, copied })
    }

    /// Allocates `n` contiguous clusters: a single one in the first hole of
    /// the image, several at its end.
    fn alloc(&mut self, n: u64) -> io::Result<u64> {
        if n == 1 {
            if let Some(c) = self.find_free()? {
                self.rc_set(c, 1)?;
                return Ok(c << self.cluster_bits);
            }
        }
        let cs = self.cs();
        let off = self.next_free;
        self.guard("cluster allocation", off, n * cs)?;
        self.next_free += n * cs;
        for c in 0..n {
            self.rc_set((off >> self.cluster_bits) + c, 1)?;
        }
        Ok(off)
    }

    /// The first cluster below the end of the image whose refcount is zero.
    fn find_free(&mut self) -> io::Result<Option<u64>> {
        let end = self.next_free >> self.cluster_bits;
        while self.free_hint < end {
            let c = self.free_hint;
            if self.rc.get(&self.file, c)? == 0
                && self.meta.hit(c << self.cluster_bits, 1).is_none()
            {
                return Ok(Some(c));
            }
            self.free_hint += 1;
        }
        Ok(None)
    }

    /// Host offset of the L2 table for L1 index `l1i`, allocating it if asked.
    fn l2_table(&mut self, l1i: usize, allocate: bool) -> io::Result<Option<u64>> {
        let Some(&entry) = self.l1.get(l1i) else {
            return Err(invalid(format!("L1 index {l1i} is past the L1 table")));
        };
        let off = entry & OFFSET_MASK;
        if off != 0 {
            self.load_l2(off)?;
            return Ok(Some(off));
        }
        if !allocate {
            return Ok(None);
        }
        self.make_room_in_l2_cache()?;
        let off = self.alloc(1)?;
        self.add_meta(Meta::L2, off, self.cs())?;
        let entries = (self.cs() / 8) as usize;
        self.l2.insert(off, vec![0u64; entries], true);
        self.l1[l1i] = off | COPIED;
        self.l1_dirty = true;
        Ok(Some(off))
    }

    /// Writes everything back before the cache evicts a dirty L2 table.
    fn make_room_in_l2_cache(&mut self) -> io::Result<()> {
        if let Some((_, true)) = self.l2.victim() {
            self.flush_metadata()?;
        }
        Ok(())
    }

    fn load_l2(&mut self, off: u64) -> io::Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        self.make_room_in_l2_cache()?;
        let mut raw = vec![0u8; self.cs() as usize];
        read_full(&self.file, &mut raw, off)?;
        let table = header::be64_table(&raw);
        if let Some((k, t)) = self.l2.insert(off, table, false) {
            // Not reached: make_room_in_l2_cache wrote dirty tables back.
            self.write_l2(k, &t)?;
        }
        Ok(())
    }

    fn write_l2(&self, off: u64, table: &[u64]) -> io::Result<()> {
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&raw, off)
    }

    fn l2_entry(&mut self, l2off: u64, l2i: usize) -> io::Result<u64> {
        self.load_l2(l2off)?;
        self.l2
            .get(l2off)
            .and_then(|t| t.get(l2i).copied())
            .ok_or_else(|| invalid(format!("L2 index {l2i} missing")))
    }

    fn set_l2_entry(&mut self, l2off: u64, l2i: usize, value: u64) -> io::Result<()> {
        self.load_l2(l2off)?;
        let slot = self
            .l2
            .get_mut(l2off)
            .and_then(|t| t.get_mut(l2i))
            .ok_or_else(|| invalid(format!("L2 index {l2i} missing")))?;
        *slot = value;
        Ok(())
    }

    /// The L2 entry for `vaddr` (0 when no L2 table exists).
    fn entry_for(&mut self, vaddr: u64) -> io::Result<u64> {
        let (l1i, l2i) = self.indices(vaddr);
        match self.l2_table(l1i, false)? {
            Some(off) => self.l2_entry(off, l2i),
            None => Ok(0),
        }
    }

    /// Reads `buf.len()` bytes at `vaddr`, all within one cluster.
    fn read_in_cluster(&mut self, buf: &mut [u8], vaddr: u64) -> io::Result<()> {
        let entry = self.entry_for(vaddr)?;
        let m = self.mapping(entry)?;
        self.read_mapped(m, entry, buf, vaddr)
    }

    fn read_mapped(
        &mut self,
        m: Mapping,
        entry: u64,
        buf: &mut [u8],
        vaddr: u64,
    ) -> io::Result<()> {
        let in_off = vaddr & (self.cs() - 1);
        match m {
            Mapping::Unallocated => self.read_backing(buf, vaddr),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { off, .. } => read_full(&self.file, buf, off + in_off),
            Mapping::Compressed { off, len } => {
                let cluster = self.unpack(entry, off, len)?;
                let start = in_off as usize;
                buf.copy_from_slice(&cluster[start..start + buf.len()]);
                Ok(())
            }
        }
    }

    fn read_backing(&mut self, buf: &mut [u8], vaddr: u64) -> io::Result<()> {
        let Some(backing) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = backing.size();
        let avail = bsize.saturating_sub(vaddr).min(buf.len() as u64) as usize;
        if avail > 0 {
            backing.read_at(&mut buf[..avail], vaddr)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn unpack(&mut self, entry: u64, off: u64, len: u64) -> io::Result<&[u8]> {
        if self.unpacked.as_ref().is_none_or(|(e, _)| *e != entry) {
            let mut input = vec![0u8; len as usize];
            read_full(&self.file, &mut input, off)?;
            let cluster =
                compress::decompress(self.header.compression, &input, self.cs() as usize)?;
            self.unpacked = Some((entry, cluster));
        }
        match &self.unpacked {
            Some((_, c)) => Ok(c),
            None => Err(invalid("decompressed cluster vanished".into())),
        }
    }

    /// The whole current content of the cluster at `vaddr` (cluster aligned).
    fn cluster_content(&mut self, vaddr: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.cs() as usize];
        self.read_in_cluster(&mut buf, vaddr)?;
        Ok(buf)
    }

    /// Queues the host clusters a mapping holds for release after the next L2 write-back.
    fn release(&mut self, m: Mapping) {
        let cs = self.cs();
        match m {
            Mapping::Data { off, .. } => self.pending_free.push((off, cs)),
            Mapping::Zero {
                prealloc: Some(off),
                ..
            } => self.pending_free.push((off, cs)),
            Mapping::Compressed { off, len } => self.pending_free.push((off, len)),
            _ => {}
        }
    }

    /// Maps a write of `data` at `vaddr`, all within one cluster.
    ///
    /// Returns the host offset the caller must write `data` to, or `None`
    /// when the data was already written (copy-on-write of a partial cluster).
    fn write_in_cluster(&mut self, data: &[u8], vaddr: u64) -> io::Result<Option<u64>> {
        let cs = self.cs();
        let base = vaddr & !(cs - 1);
        let in_off = (vaddr - base) as usize;
        let (l1i, l2i) = self.indices(vaddr);
        let l2off = self
            .l2_table(l1i, true)?
            .ok_or_else(|| invalid("L2 table allocation failed".into()))?;
        let entry = self.l2_entry(l2off, l2i)?;
        let m = self.mapping(entry)?;
        self.data_dirty = true;
        let full = data.len() as u64 == cs;
        match m {
            Mapping::Data { off, copied: true } => {
                self.check_host_cluster(off)?;
                return Ok(Some(off + in_off as u64));
            }
            Mapping::Zero {
                prealloc: Some(off),
                copied: true,
            } => {
                self.check_host_cluster(off)?;
                if !full {
                    let mut buf = vec![0u8; cs as usize];
                    buf[in_off..in_off + data.len()].copy_from_slice(data);
                    self.write_data(&buf, off)?;
                }
                self.set_l2_entry(l2off, l2i, off | COPIED)?;
                return Ok(full.then_some(off));
            }
            _ => {}
        }
        self.check_release(m)?;
        let old = if full {
            None
        } else {
            let mut b = self.cluster_content(base)?;
            b[in_off..in_off + data.len()].copy_from_slice(data);
            Some(b)
        };
        let new = self.alloc(1)?;
        if let Some(b) = &old {
            self.write_data(b, new)?;
        }
        self.set_l2_entry(l2off, l2i, new | COPIED)?;
        self.release(m);
        if matches!(m, Mapping::Compressed { .. }) {
            self.unpacked = None;
        }
        Ok(if full { Some(new) } else { None })
    }

    /// Writes `data` at `vaddr`, all within one cluster.
    fn write_one(&mut self, data: &[u8], vaddr: u64) -> io::Result<()> {
        if let Some(host) = self.write_in_cluster(data, vaddr)? {
            self.write_data(data, host)?;
        }
        Ok(())
    }

    /// Whether the L2 table covering `vaddr` is cached (so mapping it cannot
    /// trigger a metadata write-back).
    fn l2_cached(&self, vaddr: u64) -> bool {
        let (l1i, _) = self.indices(vaddr);
        self.l1
            .get(l1i)
            .map(|e| e & OFFSET_MASK)
            .is_some_and(|o| o != 0 && self.l2.contains(o))
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.corrupt {
            return Err(io::Error::other(
                "the image is marked corrupt: writes are refused",
            ));
        }
        super::check_writable(self.read_only)
    }

    /// Starts recording the host range of every data write (for tests and
    /// the fuzzer, which check them against the image's metadata).
    #[doc(hidden)]
    pub fn record_data_writes(&mut self) {
        self.write_log = Some(Vec::new());
    }

    /// The data writes recorded since [`Qcow2Disk::record_data_writes`].
    #[doc(hidden)]
    pub fn data_writes(&self) -> &[(u64, u64)] {
        self.write_log.as_deref().unwrap_or(&[])
    }

    /// Whether a write found metadata where data should be (see `guard`).
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }
}

impl DiskBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.header.size
    }

    // Backing files keep their shared locks: another reader may share them.
    fn release_lock(&mut self) -> io::Result<()> {
        crate::disk::set_flock(&self.file, None)
    }

    fn reacquire_lock(&mut self) -> io::Result<()> {
        crate::disk::set_flock(&self.file, Some(self.read_only))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.header.size, offset, buf.len() as u64)?;
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cs - (pos & (cs - 1))) as usize).min(buf.len() - done);
            let entry = self.entry_for(pos)?;
            let m = self.mapping(entry)?;
            let Mapping::Data { off, .. } = m else {
                self.read_mapped(m, entry, &mut buf[done..done + n], pos)?;
                done += n;
                continue;
            };
            // Coalesce clusters that follow each other on the host too.
            let start = off + (pos & (cs - 1));
            let mut total = n;
            while done + total < buf.len() {
                let next = pos + total as u64;
                match self.entry_for(next).and_then(|e| self.mapping(e))? {
                    Mapping::Data { off: o, .. } if o == start + total as u64 => {
                        total += (cs as usize).min(buf.len() - done - total);
                    }
                    _ => break,
                }
            }
            read_full(&self.file, &mut buf[done..done + total], start)?;
            done += total;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.header.size, offset, buf.len() as u64)?;
        let cs = self.cs();
        // A run of data bound for consecutive host bytes: (host, start in buf, len).
        let mut run: Option<(u64, usize, usize)> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cs - (pos & (cs - 1))) as usize).min(buf.len() - done);
            if !self.l2_cached(pos) {
                // Mapping may write metadata back: pending data goes first.
                if let Some((h, b, l)) = run.take() {
                    self.write_data(&buf[b..b + l], h)?;
                }
            }
            match self.write_in_cluster(&buf[done..done + n], pos)? {
                Some(host) => match run {
                    Some((h, b, l)) if h + l as u64 == host && b + l == done => {
                        run = Some((h, b, l + n));
                    }
                    _ => {
                        if let Some((h, b, l)) = run.take() {
                            self.write_data(&buf[b..b + l], h)?;
                        }
                        run = Some((host, done, n));
                    }
                },
                None => {
                    if let Some((h, b, l)) = run.take() {
                        self.write_data(&buf[b..b + l], h)?;
                    }
                }
            }
            done += n;
        }
        if let Some((h, b, l)) = run {
            self.write_data(&buf[b..b + l], h)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_metadata()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.zero_range(offset, len, unmap)
    }
}

impl Drop for Qcow2Disk {
    fn drop(&mut self) {
        if let Err(e) = self.flush_metadata() {
            log::error!("{}: cannot write back metadata: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests;
