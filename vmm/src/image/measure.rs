// SPDX-License-Identifier: Apache-2.0
//! `wisp image measure`: how large a new image would be, computed the way
//! `qemu-img measure` computes it (required and fully-allocated sizes).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use devices::disk::qcow2::CreateOptions;
use devices::disk::ImageFormat;

use super::qopts::QemuOptions;
use super::size::parse_size;
use super::{info, map, FormatArg, OutputArg};

/// `measure` arguments.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Format of the input image (probed when omitted).
    #[arg(short = 'f', value_enum)]
    format: Option<FormatArg>,
    /// Format of the image to measure.
    #[arg(short = 'O', value_enum)]
    output_format: FormatArg,
    /// qemu-img options of the new image (cluster_size, refcount_bits, ...).
    #[arg(short = 'o', value_name = "NAME=VALUE,...")]
    options: Vec<String>,
    /// Measure an empty image of this virtual size instead of an input.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// `json` prints qemu-img's JSON (required, fully-allocated, bitmaps).
    #[arg(long, value_enum, default_value = "human")]
    output: OutputArg,
    /// Input image whose allocated data would be copied.
    path: Option<PathBuf>,
}

/// Bytes of refcount table and blocks covering `clusters` clusters and themselves.
fn refcount_metadata(clusters: u64, cs: u64, refcount_bits: u64) -> u64 {
    let per_table = cs / 8;
    let per_block = cs * 8 / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// The size of a fully allocated qcow2 image of `size` bytes.
pub fn qcow2_full_size(size: u64, cs: u64, refcount_bits: u64) -> u64 {
    let aligned = size.div_ceil(cs) * cs;
    let mut meta = cs;
    let l2_entries = (aligned / cs).div_ceil(cs / 8) * (cs / 8);
    meta += l2_entries * 8;
    let l1_entries = (l2_entries * 8 / cs).div_ceil(cs / 8) * (cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata((meta + aligned) / cs, cs, refcount_bits);
    meta + aligned
}

/// Bytes of `cs`-sized clusters holding data in the input's chain.
fn data_clusters(extents: &[map::Extent], cs: u64) -> u64 {
    let mut counted: Option<u64> = None;
    let mut total = 0;
    for e in extents.iter().filter(|e| e.data && !e.zero && e.length > 0) {
        let first = e.start / cs;
        let last = (e.start + e.length - 1) / cs;
        let from = match counted {
            Some(c) if c >= first => c + 1,
            _ => first,
        };
        if last >= from {
            total += (last - from + 1) * cs;
            counted = Some(last);
        }
    }
    total
}

/// Runs `measure`.
pub fn run(args: &MeasureArgs) -> anyhow::Result<()> {
    let out_format: ImageFormat = args.output_format.into();
    let qemu = QemuOptions::parse(&args.options, out_format)?;
    if qemu.backing_file.is_some() || qemu.backing_fmt.is_some() {
        bail!("measure does not support backing files");
    }
    let (size, input) = match (&args.path, args.size) {
        (Some(_), Some(_)) => bail!("--size cannot be used together with an input image"),
        (None, None) => bail!("Give an input image or --size"),
        (None, Some(s)) => (s, None),
        (Some(p), None) => {
            let top = info::gather(p, args.format.map(Into::into))?;
            (top.virtual_size, Some((p, top.format)))
        }
    };
    let (required, full, bitmaps) = match out_format {
        ImageFormat::Vmdk => bail!("wisp does not write VMDK images, so it cannot measure one"),
        ImageFormat::Raw => {
            let s = size.div_ceil(512) * 512;
            (s, s, false)
        }
        ImageFormat::Qcow2 => {
            let mut c = CreateOptions::default();
            qemu.apply(&mut c)?;
            let cs = c.cluster_size;
            if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
                bail!("Invalid cluster_size {cs} (a power of two from 512 to 2M)");
            }
            let full = qcow2_full_size(size, cs, u64::from(c.refcount_bits));
            let data = match &input {
                Some((p, f)) => data_clusters(&map::map(p, Some(*f))?.0, cs),
                None => 0,
            };
            let aligned = size.div_ceil(cs) * cs;
            let from_qcow2 = matches!(input, Some((_, ImageFormat::Qcow2)));
            (full - aligned + data, full, from_qcow2)
        }
    };
    if args.output == OutputArg::Json {
        let mut m = serde_json::Map::new();
        if bitmaps {
            m.insert("bitmaps".into(), 0.into());
        }
        m.insert("required".into(), required.into());
        m.insert("fully-allocated".into(), full.into());
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("required size: {required}");
        println!("fully allocated size: {full}");
        if bitmaps {
            println!("bitmaps size: 0");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_qcow2_full_size_matches_qemu_img_measure() {
        // qemu-img measure -O qcow2 --size 1G [-o cluster_size=4k,refcount_bits=1]
        assert_eq!(qcow2_full_size(1 << 30, 65536, 16), 1_074_135_040);
        assert_eq!(qcow2_full_size(1 << 30, 4096, 1), 1_075_888_128);
        assert_eq!(qcow2_full_size(3 << 20, 65536, 16), 3_473_408);
    }
}
