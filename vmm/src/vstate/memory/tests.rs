// SPDX-License-Identifier: Apache-2.0
use std::process::Command;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use super::*;

const MIB: u64 = 1 << 20;

/// One line of /proc/self/maps: start, end, permissions.
fn maps() -> Vec<(usize, usize, String)> {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
                perms.to_string(),
            ))
        })
        .collect()
}

/// The `VmFlags` of the mapping that contains `addr`.
fn vm_flags(addr: usize) -> String {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for l in text.lines() {
        if let Some((a, rest)) = l.split_once('-') {
            if let (Ok(a), Some(b)) = (usize::from_str_radix(a, 16), rest.split_whitespace().next())
            {
                if let Ok(b) = usize::from_str_radix(b, 16) {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(flags) = l.strip_prefix("VmFlags:") {
                return flags.to_string();
            }
        }
    }
    panic!("no mapping contains {addr:#x}");
}

fn thp_available() -> bool {
    std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists()
}

#[test]
fn test_guest_ram_regions_are_2mib_aligned_on_the_host_and_huge_page_advised() {
    // 4 GiB + 6 MiB is split around the MMIO hole into two regions.
    for size in [
        128 * MIB,
        1024 * MIB,
        129 * MIB + 4096,
        4096 * MIB + 6 * MIB,
    ] {
        let mem = create_guest_memory(size).unwrap();
        let ranges = boot::layout::ram_ranges(size);
        assert_eq!(mem.num_regions(), ranges.len(), "{size:#x}");
        for (region, (start, len)) in mem.iter().zip(ranges) {
            let host = region.as_ptr() as usize;
            assert_eq!(host % HOST_ALIGN, 0, "size {size:#x}: region at {host:#x}");
            assert_eq!((region.start_addr().0, region.len()), (start, len));
            if thp_available() {
                assert!(vm_flags(host).contains(" hg"), "not MADV_HUGEPAGE");
            } else {
                eprintln!("SKIPPED the MADV_HUGEPAGE check: no THP in this kernel");
            }
        }
        // Usable at both ends.
        let last = mem.last_addr();
        mem.write_obj(0xa5u8, last).unwrap();
        assert_eq!(mem.read_obj::<u8>(last).unwrap(), 0xa5);
    }
}

#[test]
fn test_aligned_file_mapping() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(2 * HOST_ALIGN as u64 + 8192).unwrap();
    let off = FileOffset::new(file, 4096);
    let size = HOST_ALIGN + 4096;
    let r = map_aligned(
        Some(&off),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
    .unwrap();
    assert_eq!(r.as_ptr() as usize % HOST_ALIGN, 0);
    assert_eq!(r.size(), size);
    assert!(r.owned(), "vm-memory unmaps it on drop");
    assert_eq!(r.file_offset().map(|f| f.start()), Some(4096));
}

/// Run by [`test_mapping_slack_is_freed_and_drop_unmaps_everything`] alone in
/// a child process, where no other thread maps memory meanwhile.
#[test]
#[ignore = "run in its own process by test_mapping_slack_is_freed_and_drop_unmaps_everything"]
fn child_mapping_slack_and_drop() {
    let size = 6 * MIB + 12 * 1024;
    let before = maps();
    let mem = create_guest_memory(size).unwrap();
    let (lo, hi) = {
        let region = mem.iter().next().unwrap();
        assert!(region.owned(), "vm-memory unmaps it on drop");
        let lo = region.as_ptr() as usize;
        (lo, lo + size as usize)
    };
    // Within reach of the reservation (size + 2 MiB around the region),
    // only the region itself and what existed before may be mapped: the
    // PROT_NONE slack is gone.
    let around = (lo - HOST_ALIGN, hi + HOST_ALIGN);
    let new_near = |m: &[(usize, usize, String)]| -> Vec<(usize, usize, String)> {
        m.iter()
            .filter(|(a, b, _)| *b > around.0 && *a < around.1)
            .filter(|v| !before.contains(v))
            .cloned()
            .collect()
    };
    let alive = new_near(&maps());
    assert!(
        alive
            .iter()
            .all(|(a, b, p)| *a >= lo && *b <= hi && p.starts_with("rw")),
        "mappings near the region {lo:#x}-{hi:#x}: {alive:x?}"
    );
    drop(mem);
    let after = new_near(&maps());
    assert!(
        after.is_empty(),
        "still mapped after drop: {after:x?} (region {lo:#x}-{hi:#x})"
    );
    println!("CHILD-OK");
}

#[test]
fn test_mapping_slack_is_freed_and_drop_unmaps_everything() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "vstate::memory::tests::child_mapping_slack_and_drop",
            "--test-threads=1",
            "--nocapture",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("CHILD-OK") && text.contains("1 passed"),
        "{text}"
    );
}
