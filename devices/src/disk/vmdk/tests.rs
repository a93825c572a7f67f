// SPDX-License-Identifier: Apache-2.0
//! VMDK reading over images built by hand ([`super::build`]) and hostile mutations of them.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::build::{monolithic_sparse, stream_optimized_gd_at_end};
use super::*;
use crate::disk::testutil::TempDir;

/// 1 MiB + 3 sectors with data in a few grains, the last grain partial.
fn pattern() -> Vec<u8> {
    let mut d = vec![0u8; (1 << 20) + 3 * 512];
    for (i, b) in d[..100_000].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    d[600_000..600_100].fill(0x22);
    let n = d.len();
    d[n - 700..].fill(0x33);
    d
}

fn write(dir: &TempDir, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn open(p: &Path) -> Result<VmdkDisk, VmdkError> {
    VmdkDisk::open(File::open(p).unwrap(), p, true)
}

fn read_all(disk: &mut VmdkDisk) -> Vec<u8> {
    let mut out = vec![0u8; disk.size() as usize];
    // Odd-sized reads cross grain and extent boundaries.
    for (i, chunk) in out.chunks_mut(70_001).enumerate() {
        disk.read_at(chunk, i as u64 * 70_001).unwrap();
    }
    out
}

#[test]
fn test_monolithic_sparse_reads_back_the_data() {
    let dir = TempDir::new();
    let data = pattern();
    let p = write(&dir, "disk.vmdk", &monolithic_sparse(&data, false));
    let mut disk = open(&p).unwrap();
    assert_eq!(disk.size(), data.len() as u64);
    assert!(disk.read_only());
    assert_eq!(read_all(&mut disk), data);
    assert_eq!(disk.info().create_type, "monolithicSparse");
    assert_eq!(disk.info().cid, Some(0x12345678));
    assert_eq!(disk.allocation(0).unwrap(), (true, 65536));
    assert_eq!(
        disk.allocation(200_000).unwrap(),
        (false, 262_144 - 200_000)
    );
}

#[test]
fn test_monolithic_sparse_falls_back_to_the_redundant_directory() {
    let dir = TempDir::new();
    let data = pattern();
    let p = write(&dir, "disk.vmdk", &monolithic_sparse(&data, true));
    let mut disk = open(&p).unwrap();
    assert_eq!(read_all(&mut disk), data);
}

#[test]
fn test_stream_optimized_with_footer_reads_back_the_data() {
    let dir = TempDir::new();
    let data = pattern();
    let p = write(&dir, "disk.vmdk", &stream_optimized_gd_at_end(&data));
    let mut disk = open(&p).unwrap();
    assert_eq!(disk.info().create_type, "streamOptimized");
    assert!(disk.info().extents[0].compressed);
    assert_eq!(read_all(&mut disk), data);
}

#[test]
fn test_writes_are_refused() {
    let dir = TempDir::new();
    let p = write(&dir, "disk.vmdk", &monolithic_sparse(&pattern(), false));
    let mut disk = open(&p).unwrap();
    let err = disk.write_at(&[1], 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(disk.discard(0, 512).is_err());
    assert!(disk.write_zeroes(0, 512, false).is_err());
    let mut buf = [0u8; 2];
    assert!(disk.read_at(&mut buf, disk.size() - 1).is_err());
}

#[test]
fn test_descriptor_with_flat_zero_and_sparse_extents() {
    let dir = TempDir::new();
    let data = pattern();
    let mut flat = vec![0xeeu8; 1024];
    flat.extend_from_slice(&data[..4096]);
    write(&dir, "a-flat.vmdk", &flat);
    write(&dir, "b-s001.vmdk", &monolithic_sparse(&data, false));
    let sectors = data.len() / 512;
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\
         RW 8 FLAT \"a-flat.vmdk\" 2\nRW 4 ZERO\nRW {sectors} SPARSE \"b-s001.vmdk\"\n"
    );
    let p = write(&dir, "disk.vmdk", desc.as_bytes());
    let mut disk = open(&p).unwrap();
    let mut want = data[..4096].to_vec();
    want.extend_from_slice(&[0u8; 2048]);
    want.extend_from_slice(&data);
    assert_eq!(read_all(&mut disk), want);
    assert_eq!(disk.info().extents.len(), 3);
    assert_eq!(disk.info().extents[2].cluster_size, Some(65536));
    // Probed (not declared), a descriptor may not open other files.
    let err = VmdkDisk::open(File::open(&p).unwrap(), &p, false)
        .err()
        .unwrap();
    assert!(err.to_string().contains("declare format=vmdk"), "{err}");
}

#[test]
fn test_descriptor_extent_problems_are_named() {
    let dir = TempDir::new();
    write(&dir, "short-flat.vmdk", &[0u8; 1024]);
    let d = |ext: &str| format!("createType=\"monolithicFlat\"\n{ext}\n");
    let cases = [
        (
            "RW 8 FLAT \"short-flat.vmdk\" 0",
            "is 1024 bytes, but the descriptor needs 4096",
        ),
        ("RW 8 FLAT \"missing-flat.vmdk\" 0", "does not exist"),
        ("RW 2 SPARSE \"short-flat.vmdk\"", "magic"),
        ("RW 8 FLAT \"/etc/passwd\" 0", "absolute"),
    ];
    for (ext, want) in cases {
        let p = write(&dir, "disk.vmdk", d(ext).as_bytes());
        let err = open(&p).err().unwrap();
        let text = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(text.contains(want), "{ext}: {text}");
    }
}

#[test]
fn test_sparse_capacity_must_match_the_descriptor() {
    let dir = TempDir::new();
    write(&dir, "s.vmdk", &monolithic_sparse(&pattern(), false));
    let p = write(
        &dir,
        "disk.vmdk",
        b"createType=\"twoGbMaxExtentSparse\"\nRW 8 SPARSE \"s.vmdk\"\n",
    );
    let err = open(&p).err().unwrap();
    assert!(err.to_string().contains("descriptor says 8"), "{err}");
}

/// Offsets (in the built stream image) of the first grain marker.
fn first_grain_marker(img: &[u8]) -> usize {
    let desc_sectors = u64::from_le_bytes(img[36..44].try_into().unwrap()) as usize;
    (1 + desc_sectors) * 512
}

type Mutation = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn test_stream_optimized_hostile_grains_are_read_errors() {
    let dir = TempDir::new();
    let data = pattern();
    let good = stream_optimized_gd_at_end(&data);
    let m = first_grain_marker(&good);
    let mutations: [(&str, Mutation); 4] = [
        ("is for sector", Box::new(move |v| v[m] = 9)),
        (
            "compressed size",
            Box::new(move |v| v[m + 8..m + 12].copy_from_slice(&u32::MAX.to_le_bytes())),
        ),
        (
            "compressed size",
            Box::new(move |v| v[m + 8..m + 12].copy_from_slice(&0u32.to_le_bytes())),
        ),
        ("corrupt", Box::new(move |v| v[m + 14..m + 40].fill(0xff))),
    ];
    for (want, mutate) in mutations {
        let mut img = good.clone();
        mutate(&mut img);
        let p = write(&dir, "disk.vmdk", &img);
        let mut disk = open(&p).unwrap();
        let mut buf = vec![0u8; 4096];
        let err = disk.read_at(&mut buf, 0).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
}

#[test]
fn test_truncated_images_are_errors_not_panics() {
    let dir = TempDir::new();
    let data = pattern();
    for img in [
        monolithic_sparse(&data, false),
        stream_optimized_gd_at_end(&data),
    ] {
        for cut in [0, 100, 511, 512, 1500, img.len() / 2, img.len() - 600] {
            let p = write(&dir, "disk.vmdk", &img[..cut]);
            if let Ok(mut disk) = open(&p) {
                let mut buf = vec![0u8; disk.size() as usize];
                let _ = disk.read_at(&mut buf, 0);
            }
        }
    }
}

#[test]
fn test_fuzz_harness_survives_byte_flips() {
    let data = pattern();
    let mut seeds = vec![monolithic_sparse(&data[..69_632], false)];
    seeds.push(stream_optimized_gd_at_end(&data[..69_632]));
    for seed in seeds {
        for i in (0..seed.len()).step_by(97).take(300) {
            let mut m = seed.clone();
            m[i] ^= 0xa5;
            fuzz_one(&m);
        }
    }
}

#[test]
fn test_empty_disk_with_garbage_offsets_opens() {
    let dir = TempDir::new();
    let mut img = monolithic_sparse(&[], false);
    img[56..64].copy_from_slice(&u64::MAX.to_le_bytes()); // gdOffset
    img[48..56].copy_from_slice(&u64::MAX.to_le_bytes()); // rgdOffset
    img.resize(4096, 0);
    let p = write(&dir, "disk.vmdk", &img);
    // GD_AT_END without a footer is refused; any other offset is unused.
    assert!(open(&p).is_err());
    img[56..64].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
    std::fs::write(&p, &img).unwrap();
    let disk = open(&p).unwrap();
    assert_eq!(disk.size(), 0);
}
