// SPDX-License-Identifier: Apache-2.0
//! Stable-toolchain smoke run of the qcow2 fuzz harness over mutated valid images.

use std::os::unix::fs::FileExt;

use devices::disk::qcow2::{self, CreateOptions};
use devices::disk::{open_disk, DiskOptions, ImageFormat};

/// A small valid image with some data and a compressed-looking layout.
fn seed(cluster_size: u64, version: u32) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!(
        "wisp-mutate-{}-{cluster_size}-{version}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("seed.qcow2");
    qcow2::create(
        &p,
        &CreateOptions {
            size: 1 << 20,
            cluster_size,
            version,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let mut d = open_disk(&DiskOptions {
            path: p.clone(),
            read_only: false,
            format: Some(ImageFormat::Qcow2),
        })
        .unwrap();
        d.write_at(&[0x11; 3000], 1000).unwrap();
        d.write_at(&[0x22; 5000], 300_000).unwrap();
        d.discard(300_000, cluster_size).unwrap();
        d.flush().unwrap();
    }
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    bytes
}

#[test]
fn test_mutated_images_never_panic() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (cs, version) in [(512, 3), (4096, 2), (65536, 3)] {
        let base = seed(cs, version);
        // Metadata lives in the first few clusters: mutate there mostly.
        let hot = base.len().min(8 * cs as usize);
        for _ in 0..100 {
            let mut img = base.clone();
            for _ in 0..1 + rnd() % 8 {
                let at = (rnd() as usize) % hot;
                img[at] = match rnd() % 4 {
                    0 => 0xff,
                    1 => 0,
                    _ => rnd() as u8,
                };
            }
            // Guest operations after the image, and their count last.
            let ops = 1 + rnd() % 32;
            for _ in 0..ops * 4 {
                img.push(rnd() as u8);
            }
            img.push(ops as u8);
            qcow2::fuzz_one(&img);
        }
    }
}

#[test]
fn test_truncated_images_never_panic() {
    let base = seed(4096, 3);
    for cut in (0..base.len()).step_by(397) {
        let mut img = base[..cut].to_vec();
        img.push(0);
        qcow2::fuzz_one(&img);
    }
}

#[test]
fn test_fuzz_harness_leaves_valid_image_valid() {
    let base = seed(65536, 3);
    let dir = std::env::temp_dir().join(format!("wisp-mutate-valid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("v.qcow2");
    std::fs::File::create(&p)
        .unwrap()
        .write_all_at(&base, 0)
        .unwrap();
    let report = devices::disk::open_qcow2_metadata(&p, true)
        .unwrap()
        .check(false)
        .unwrap();
    assert!(report.is_clean(), "{report:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
