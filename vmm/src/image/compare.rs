// SPDX-License-Identifier: Apache-2.0
//! `wisp image compare`: whether two images hold the same guest data, as
//! `qemu-img compare` decides it (exit 0 identical, 1 different, 2 error).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use devices::disk::{open_disk, probe_format, DiskBackend, DiskOptions, ImageFormat};

use super::FormatArg;

/// Bytes compared per step.
const CHUNK: usize = 1 << 20;

/// `compare` arguments.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_enum)]
    format: Option<FormatArg>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_enum)]
    second_format: Option<FormatArg>,
    /// Images of different sizes differ (otherwise the tail of the larger must be zeros).
    #[arg(short = 's', long)]
    strict: bool,
    first: PathBuf,
    second: PathBuf,
}

/// Opens an image named on the command line, read-only; a probed VMDK may
/// open its descriptor's extents and a probed qcow2 its backing chain.
pub fn open_input(
    path: &Path,
    format: Option<ImageFormat>,
) -> anyhow::Result<Box<dyn DiskBackend>> {
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    Ok(open_disk(&DiskOptions {
        path: path.to_path_buf(),
        read_only: true,
        format: Some(format),
    })?)
}

/// The first differing byte of `a` and `b`, rounded down to a sector as qemu-img reports it.
fn mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| i & !511)
}

/// Runs `compare`; errors are reported here so that they exit with 2.
pub fn run(args: &CompareArgs) -> anyhow::Result<i32> {
    match compare(args) {
        Ok(same) => Ok(if same { 0 } else { 1 }),
        Err(e) => {
            eprintln!("wisp: {e:#}");
            Ok(2)
        }
    }
}

fn compare(args: &CompareArgs) -> anyhow::Result<bool> {
    let mut a = open_input(&args.first, args.format.map(Into::into))?;
    let mut b = open_input(&args.second, args.second_format.map(Into::into))?;
    let (sa, sb) = (a.size(), b.size());
    if args.strict && sa != sb {
        println!("Strict mode: Image size mismatch!");
        return Ok(false);
    }
    if sa != sb {
        println!("Warning: Image size mismatch!");
    }
    let common = sa.min(sb);
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < common {
        let n = (common - off).min(CHUNK as u64) as usize;
        a.read_at(&mut ba[..n], off)
            .with_context(|| format!("Cannot read {} at {off:#x}", args.first.display()))?;
        b.read_at(&mut bb[..n], off)
            .with_context(|| format!("Cannot read {} at {off:#x}", args.second.display()))?;
        if let Some(i) = mismatch(&ba[..n], &bb[..n]) {
            println!("Content mismatch at offset {}!", off + i as u64);
            return Ok(false);
        }
        off += n as u64;
    }
    // The rest of the larger image must read as zeros.
    let (larger, name, end) = if sa > sb {
        (&mut a, &args.first, sa)
    } else {
        (&mut b, &args.second, sb)
    };
    let zeros = vec![0u8; CHUNK];
    while off < end {
        let n = (end - off).min(CHUNK as u64) as usize;
        larger
            .read_at(&mut ba[..n], off)
            .with_context(|| format!("Cannot read {} at {off:#x}", name.display()))?;
        if let Some(i) = mismatch(&ba[..n], &zeros[..n]) {
            println!("Content mismatch at offset {}!", off + i as u64);
            return Ok(false);
        }
        off += n as u64;
    }
    println!("Images are identical.");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mismatch_rounds_down_to_a_sector() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        assert_eq!(mismatch(&a, &b), None);
        b[1000] = 1;
        assert_eq!(mismatch(&a, &b), Some(512));
    }
}
