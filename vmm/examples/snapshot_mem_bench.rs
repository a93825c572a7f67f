// SPDX-License-Identifier: Apache-2.0
//! Measures the guest memory file: full dump, diff dump and restore of a VM
//! whose RAM is partly touched.
//!
//! `cargo run --release -p vmm --example snapshot_mem_bench -- [MiB] [touched%] [dir]`
//! (defaults: 1024 MiB, 10 %, the system temporary directory). Touched pages
//! are spread evenly (one in every 100/touched%), the worst case for run
//! coalescing; the diff marks 1 % of pages dirty. Set `BENCH_MADV_RANDOM=1`
//! to turn off readahead on the restored mapping before the first touch.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::persist::dump;
use vmm::persist::memory::{self, MemoryLayout, PAGE_SIZE};
use vmm::vstate::memory::create_guest_memory;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map_or(Ok(1024), |a| a.parse())?;
    let pct: f64 = args.get(2).map_or(Ok(10.0), |a| a.parse())?;
    let dir = args.get(3).map_or_else(std::env::temp_dir, PathBuf::from);
    let path = dir.join(format!("wisp-bench-{}.mem", std::process::id()));

    let mem = create_guest_memory(mib << 20)?;
    let stride = (100.0 / pct).round().max(1.0) as u64;
    let t = Instant::now();
    let mut touched = 0u64;
    let page = [0x5au8; PAGE_SIZE as usize];
    for r in mem.iter() {
        let pages = r.len() / PAGE_SIZE;
        for p in (0..pages).step_by(stride as usize) {
            mem.write_slice(&page, GuestAddress(r.start_addr().0 + p * PAGE_SIZE))?;
            touched += 1;
        }
    }
    println!(
        "{mib} MiB guest, {touched} pages touched ({pct}%), filled in {:.2?}",
        t.elapsed()
    );

    let (full, s) = dump::dump_memory(&path, &mem)?;
    let blocks = std::fs::metadata(&path)?.blocks() * 512;
    println!(
        "full dump: {:.2?}, {} MiB written, {:.0} MB/s of guest memory, {:.0} MB/s written, file {} MiB allocated",
        s.elapsed,
        s.bytes_written >> 20,
        s.memory_mb_per_s(),
        s.write_mb_per_s(),
        blocks >> 20
    );

    // Diff: 1 % of pages dirty, spread evenly.
    let layout = MemoryLayout::of(&mem);
    let dirty: Vec<Vec<u64>> = mem
        .iter()
        .map(|r| {
            let pages = r.len() / PAGE_SIZE;
            let mut w = vec![0u64; pages.div_ceil(64) as usize];
            for p in (0..pages).step_by(100) {
                w[(p / 64) as usize] |= 1 << (p % 64);
                let _ =
                    mem.write_slice(&[0xa5; 64], GuestAddress(r.start_addr().0 + p * PAGE_SIZE));
            }
            w
        })
        .collect();
    let (diffed, s) = dump::dump_memory_diff(&path, &mem, &dirty, &full)?;
    println!(
        "diff dump (1% dirty, in place): {:.2?}, {} MiB written, {:.0} MB/s written",
        s.elapsed,
        s.bytes_written >> 20,
        s.write_mb_per_s()
    );
    let (last, s) = dump::dump_memory_diff_atomic(&path, &path, &mem, &dirty, &diffed)?;
    println!(
        "diff dump (1% dirty, copy + rename): {:.2?}, {} MiB written",
        s.elapsed,
        s.bytes_written >> 20
    );

    for cold in [false, true] {
        if cold {
            // Evict the file from the page cache: a restore on a host that
            // has not just written the snapshot.
            let f = std::fs::File::open(&path)?;
            // SAFETY: advice on an fd we own; it changes no contents.
            unsafe {
                use std::os::unix::io::AsRawFd;
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
        let t = Instant::now();
        let restored = memory::map_memory_file(&path, &layout, &last)?;
        let map_time = t.elapsed();
        if std::env::var_os("BENCH_MADV_RANDOM").is_some() {
            for r in restored.iter() {
                // SAFETY: advice on a mapping we own; it changes no contents.
                unsafe {
                    libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_RANDOM);
                }
            }
        }
        let t = Instant::now();
        let mut sum = 0u64;
        for r in restored.iter() {
            let pages = r.len() / PAGE_SIZE;
            for p in (0..pages).step_by(stride as usize) {
                sum = sum.wrapping_add(
                    restored.read_obj::<u64>(GuestAddress(r.start_addr().0 + p * PAGE_SIZE))?,
                );
            }
        }
        println!(
            "restore ({} page cache): map {map_time:.2?}; first touch of the {touched} touched pages {:.2?} (checksum {sum:#x})",
            if cold { "cold" } else { "warm" },
            t.elapsed()
        );
    }
    std::fs::remove_file(&path)?;
    Ok(())
}
