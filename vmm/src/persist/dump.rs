// SPDX-License-Identifier: Apache-2.0
//! Whole memory files: a full dump, a diff applied to a copy of the base
//! (then renamed over), and a diff applied in place with the trailer marking
//! the file half-written until it is done. The snapshot create
//! (`create.rs`) uses the same pieces with its state file in between.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use devices::GuestMemoryMmap;
use vm_memory::GuestMemoryBackend;

use super::binding::{MemoryBinding, Trailer, TrailerState, TRAILER_LEN};
use super::files::{check_target, open_regular, parent_dir, sync_dir, TempFile};
use super::memory::{
    bit, check_bitmaps, clone_sparse, io_err, region_bytes, touched_pages, write_pages, DumpStats,
    MemoryLayout, Result,
};

/// Writes all of `mem` into the new, empty `file` (at `path`, for messages)
/// and sizes it to RAM plus trailer; the trailer itself is not written.
/// All-zero pages are not written, so the file is sparse; for anonymous
/// memory, pages the guest never touched are skipped without being read.
pub fn write_full(file: &File, path: &Path, mem: &GuestMemoryMmap) -> Result<DumpStats> {
    let start = Instant::now();
    let layout = MemoryLayout::of(mem);
    let mut stats = DumpStats::default();
    file.set_len(layout.file_size() + TRAILER_LEN)
        .map_err(io_err("size", path))?;
    for (region, l) in mem.iter().zip(&layout.regions) {
        let touched = touched_pages(region);
        let want = |p: usize| touched.as_ref().is_none_or(|t| t[p]);
        write_pages(
            file,
            path,
            region_bytes(region),
            l.file_offset,
            want,
            false,
            &mut stats,
        )?;
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Writes the pages marked in `dirty` (one bitmap per region, bit `i` = page
/// `i`, as `dirty_bitmaps` returns) into `file`, a memory file of `mem`'s
/// layout, in place. Dirty pages that are now all zero are punched out (or
/// zeroed). The trailer is left alone.
pub fn write_diff(
    file: &File,
    path: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<DumpStats> {
    let start = Instant::now();
    let layout = MemoryLayout::of(mem);
    check_bitmaps(mem, dirty)?;
    let mut stats = DumpStats::default();
    for ((region, l), words) in mem.iter().zip(&layout.regions).zip(dirty) {
        let want = |p: usize| bit(words, p);
        write_pages(
            file,
            path,
            region_bytes(region),
            l.file_offset,
            want,
            true,
            &mut stats,
        )?;
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Copies the base memory file `src` (trailer included) into the new, empty
/// temporary `dst`, then applies the diff to the copy. Returns what the diff
/// wrote. The caller writes the new trailer.
pub fn write_diff_copy(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<DumpStats> {
    let start = Instant::now();
    check_bitmaps(mem, dirty)?;
    let len = MemoryLayout::of(mem).file_size() + TRAILER_LEN;
    clone_sparse(src, src_path, dst, dst_path, len)?;
    let mut stats = write_diff(dst, dst_path, mem, dirty)?;
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Opens the existing memory file `path` as the base of a Diff and checks
/// that it holds `base` and is complete.
pub fn open_base(path: &Path, base: &MemoryBinding, write: bool) -> Result<File> {
    let file = open_regular(path, write)?;
    Trailer::check(&file, path, base)?;
    Ok(file)
}

fn complete(binding: MemoryBinding) -> Trailer {
    Trailer {
        binding,
        state: TrailerState::Complete,
    }
}

/// Dumps all of `mem` to `path`, replacing it atomically (temporary file,
/// fsync, rename, directory fsync), with a new binding in the trailer.
pub fn dump_memory(path: &Path, mem: &GuestMemoryMmap) -> Result<(MemoryBinding, DumpStats)> {
    let start = Instant::now();
    check_target(path)?;
    let binding = MemoryBinding::new(MemoryLayout::of(mem).file_size());
    let mut tmp = TempFile::create(path)?;
    let mut stats = write_full(&tmp.file, &tmp.path, mem)?;
    complete(binding).write(&tmp.file, &tmp.path)?;
    tmp.sync()?;
    tmp.rename_to(path)?;
    sync_dir(parent_dir(path))?;
    stats.elapsed = start.elapsed();
    Ok((binding, stats))
}

/// Applies a diff **in place** to the memory file `path`, which must hold
/// `base`. Fast (only dirty pages are written), but the base is consumed:
///
/// 1. the trailer is rewritten as "Diff in progress" with the new binding and
///    fsynced, so from here the file matches neither the old state file (id
///    differs) nor any other — restore refuses it as half-written;
/// 2. the dirty pages are written and fsynced;
/// 3. the trailer is rewritten as complete and fsynced.
///
/// A crash before 1 leaves the base intact; during 2, a file restore
/// refuses; after 3, a complete file that only the new state file (written
/// next by the caller) matches. Never use it on a file a running VM maps.
pub fn dump_memory_diff(
    path: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
    base: &MemoryBinding,
) -> Result<(MemoryBinding, DumpStats)> {
    let start = Instant::now();
    check_bitmaps(mem, dirty)?;
    let file = open_base(path, base, true)?;
    let binding = base.successor();
    Trailer {
        binding,
        state: TrailerState::DiffInProgress,
    }
    .write(&file, path)?;
    file.sync_data().map_err(io_err("fsync", path))?;
    let mut stats = write_diff(&file, path, mem, dirty)?;
    file.sync_data().map_err(io_err("fsync", path))?;
    complete(binding).write(&file, path)?;
    file.sync_all().map_err(io_err("fsync", path))?;
    stats.elapsed = start.elapsed();
    Ok((binding, stats))
}

/// Like [`dump_memory_diff`], but leaves `base_path` untouched: it is copied
/// to a temporary file next to `out` (a reflink where the file system
/// allows, else a copy that keeps holes), the diff is applied to the copy,
/// which gets its own binding, is fsynced and renamed to `out`. A crash
/// leaves `base_path` and any earlier `out` intact, and VMs mapping the old
/// file keep their inode. `base_path` and `out` may be the same path.
pub fn dump_memory_diff_atomic(
    base_path: &Path,
    out: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
    base: &MemoryBinding,
) -> Result<(MemoryBinding, DumpStats)> {
    let start = Instant::now();
    check_bitmaps(mem, dirty)?;
    check_target(out)?;
    let src = open_base(base_path, base, false)?;
    let mut tmp = TempFile::create(out)?;
    let mut stats = write_diff_copy(&src, base_path, &tmp.file, &tmp.path, mem, dirty)?;
    let binding = base.successor();
    complete(binding).write(&tmp.file, &tmp.path)?;
    tmp.sync()?;
    tmp.rename_to(out)?;
    sync_dir(parent_dir(out))?;
    stats.elapsed = start.elapsed();
    Ok((binding, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::memory::test_util::*;
    use crate::persist::memory::{map_memory_file, MemoryFileError, PAGE_SIZE};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const FILE_LEN: u64 = 32 * MIB as u64 + TRAILER_LEN;

    #[test]
    fn test_memory_dump_is_sparse_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = test_memory();
        fill(&mem, TOUCHED, 0xa5);
        // A touched page that is zero again: must be skipped, not written.
        fill(&mem, &[0x9000], 0);
        let (b, stats) = dump_memory(&path, &mem).unwrap();
        assert_eq!(stats.pages_written, TOUCHED.len() as u64);
        assert_eq!(stats.bytes_written, TOUCHED.len() as u64 * PAGE_SIZE);
        assert_eq!(stats.pages_written + stats.pages_skipped, 32 * 256);
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.len(), FILE_LEN);
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        // 6 data pages and the trailer; far below 32 MiB.
        assert!(md.blocks() * 512 < MIB as u64, "{} blocks", md.blocks());
        let layout = MemoryLayout::of(&mem);
        let restored = map_memory_file(&path, &layout, &b).unwrap();
        assert_same(&restored, &mem);
        // Guest writes to the restored memory stay private.
        fill(&restored, &[0x5000], 0x11);
        let again = map_memory_file(&path, &layout, &b).unwrap();
        assert_same(&again, &mem);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Another dump's binding is refused, naming both.
        let other = MemoryBinding::new(b.ram_len);
        let err = map_memory_file(&path, &layout, &other).unwrap_err();
        assert!(matches!(err, MemoryFileError::Mismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&b.id_hex()) && msg.contains(&other.id_hex()));
    }

    #[test]
    fn test_memory_dump_of_file_backed_memory_reads_the_file() {
        // A restored VM's memory is a file mapping: untouched pages are not
        // zero, so the pagemap shortcut must not skip them.
        let dir = tempfile::tempdir().unwrap();
        let (p1, p2) = (dir.path().join("m1"), dir.path().join("m2"));
        let mem = test_memory();
        fill(&mem, TOUCHED, 0x5a);
        let (b, _) = dump_memory(&p1, &mem).unwrap();
        let restored = map_memory_file(&p1, &MemoryLayout::of(&mem), &b).unwrap();
        let (_, stats) = dump_memory(&p2, &restored).unwrap();
        assert_eq!(stats.pages_written, TOUCHED.len() as u64);
        let (a, c) = (std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        let ram = 32 * MIB;
        assert!(a[..ram] == c[..ram]);
    }

    #[test]
    fn test_memory_diff_in_place_writes_only_dirty_pages_and_bumps_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = test_memory();
        fill(&mem, TOUCHED, 0xa5);
        let (base, _) = dump_memory(&path, &mem).unwrap();
        // Change pages: new data, changed data, and data zeroed again.
        let dirty = [0x2000, 0x5000, 0x1000_0000, 0x1100_0000];
        fill(&mem, &dirty[..2], 0x77);
        fill(&mem, &[0x1000_0000], 0);
        fill(&mem, &[0x1100_0000], 0x33);
        let before = std::fs::read(&path).unwrap();
        let (next, stats) =
            dump_memory_diff(&path, &mem, &bitmaps_for(&mem, &dirty), &base).unwrap();
        assert_eq!(next.generation, 1);
        assert_eq!(stats.pages_written, 4);
        assert_eq!(stats.bytes_written, 3 * PAGE_SIZE);
        let after = std::fs::read(&path).unwrap();
        let changed: Vec<usize> = (0..after.len() / 4096)
            .filter(|p| before[p * 4096..(p + 1) * 4096] != after[p * 4096..(p + 1) * 4096])
            .collect();
        // The four pages, and the trailer page.
        let expect: Vec<usize> = vec![2, 5, 8 * 256, 8 * 256 + 16 * 256, 32 * 256];
        assert_eq!(changed, expect);
        let layout = MemoryLayout::of(&mem);
        let restored = map_memory_file(&path, &layout, &next).unwrap();
        assert_same(&restored, &mem);
        // The old state's binding no longer matches.
        let err = map_memory_file(&path, &layout, &base).unwrap_err();
        assert!(matches!(err, MemoryFileError::Mismatch { .. }), "{err}");
        // A diff on a base that is not the expected one is refused untouched.
        let err = dump_memory_diff(&path, &mem, &bitmaps_for(&mem, &[]), &base).unwrap_err();
        assert!(matches!(err, MemoryFileError::Mismatch { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), after);
    }

    #[test]
    fn test_memory_diff_in_place_interrupted_is_refused_as_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = test_memory();
        let (base, _) = dump_memory(&path, &mem).unwrap();
        // What step 1 of an in-place diff leaves if the process dies in step 2.
        let next = base.successor();
        let file = open_regular(&path, true).unwrap();
        let t = Trailer {
            binding: next,
            state: TrailerState::DiffInProgress,
        };
        t.write(&file, &path).unwrap();
        let layout = MemoryLayout::of(&mem);
        for b in [&base, &next] {
            let err = map_memory_file(&path, &layout, b).unwrap_err();
            let ok = matches!(
                (&err, b == &next),
                (MemoryFileError::Unfinished { .. }, true)
                    | (MemoryFileError::Mismatch { .. }, false)
            );
            assert!(ok, "{err}");
        }
        let err = map_memory_file(&path, &layout, &next).unwrap_err();
        assert!(err.to_string().contains("half-written"), "{err}");
    }

    #[test]
    fn test_memory_diff_atomic_keeps_base() {
        let dir = tempfile::tempdir().unwrap();
        let (base_p, out) = (dir.path().join("base"), dir.path().join("out"));
        let mem = test_memory();
        fill(&mem, TOUCHED, 0xa5);
        let (base, _) = dump_memory(&base_p, &mem).unwrap();
        let base_bytes = std::fs::read(&base_p).unwrap();
        fill(&mem, &[0x3000, 0x1000_3000], 0x42);
        let dirty = bitmaps_for(&mem, &[0x3000, 0x1000_3000]);
        let (next, _) = dump_memory_diff_atomic(&base_p, &out, &mem, &dirty, &base).unwrap();
        assert_eq!(std::fs::read(&base_p).unwrap(), base_bytes);
        let layout = MemoryLayout::of(&mem);
        let restored = map_memory_file(&out, &layout, &next).unwrap();
        assert_same(&restored, &mem);
        map_memory_file(&base_p, &layout, &base).unwrap();
        // The copy keeps holes (or shares extents).
        let md = std::fs::metadata(&out).unwrap();
        assert!(md.blocks() * 512 < MIB as u64, "{} blocks", md.blocks());
        // Short bitmaps are refused before anything is touched.
        let err = dump_memory_diff(&base_p, &mem, &dirty[..1], &base).unwrap_err();
        assert!(matches!(err, MemoryFileError::BitmapSize { region: 1, .. }));
        assert_eq!(std::fs::read(&base_p).unwrap(), base_bytes);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn test_memory_file_of_wrong_size_or_without_trailer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = test_memory();
        let (b, _) = dump_memory(&path, &mem).unwrap();
        let layout = MemoryLayout::of(&mem);
        let mut bigger = layout.clone();
        bigger.regions[1].size += 4096;
        let err = map_memory_file(&path, &bigger, &b).unwrap_err();
        assert!(matches!(err, MemoryFileError::BadLayout(_)), "{err}");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(4096).unwrap();
        let err = map_memory_file(&path, &layout, &b).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::WrongSize { found: 4096, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("trailer"), "{err}");
        // Right size, but the trailer page is zeros (an old-format file).
        f.set_len(0).unwrap();
        f.set_len(FILE_LEN).unwrap();
        let err = map_memory_file(&path, &layout, &b).unwrap_err();
        assert!(err.to_string().contains("no wisp trailer"), "{err}");
    }

    #[test]
    fn test_memory_dump_refuses_non_regular_targets_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let mem = test_memory();
        let err = dump_memory(dir.path(), &mem).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let err = dump_memory(Path::new("/dev/null"), &mem).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        assert!(std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    use std::os::unix::fs::FileTypeExt;
}
