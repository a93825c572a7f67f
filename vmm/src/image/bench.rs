// SPDX-License-Identifier: Apache-2.0
//! `wisp image bench`: throughput of wisp's disk backends, with the same
//! access pattern as `qemu-img bench` so the two can be compared.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use devices::disk::{open_disk, DiskOptions};
use serde::Serialize;

use super::size::parse_size;
use super::FormatArg;

/// Arguments of `wisp image bench` (named like `qemu-img bench`'s).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<FormatArg>,
    /// Number of requests.
    #[arg(short = 'c', long, default_value_t = 10_000)]
    pub count: u64,
    /// Request size.
    #[arg(short = 's', long = "buffer-size", value_parser = parse_size, default_value = "4K")]
    pub buffer_size: u64,
    /// Distance between request offsets (defaults to the request size),
    /// wrapping around the disk.
    #[arg(short = 'S', long = "step-size", value_parser = parse_size)]
    pub step: Option<u64>,
    /// First request offset.
    #[arg(short = 'o', long, value_parser = parse_size, default_value = "0")]
    pub offset: u64,
    /// Flush after every N requests (0: never, like `qemu-img bench`).
    #[arg(long = "flush-interval", default_value_t = 0)]
    pub flush_interval: u64,
    /// Write instead of read.
    #[arg(short = 'w', long)]
    pub write: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    pub path: PathBuf,
}

#[derive(Debug, Serialize)]
struct BenchResult {
    requests: u64,
    bytes: u64,
    seconds: f64,
    mib_per_second: f64,
    iops: f64,
}

/// Runs the benchmark and prints its result.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut disk = open_disk(&DiskOptions {
        path: args.path.clone(),
        read_only: !args.write,
        format: args.format.map(Into::into),
    })?;
    let size = disk.size();
    let bs = args.buffer_size;
    anyhow::ensure!(
        bs > 0 && bs <= size,
        "Buffer size {bs} does not fit the disk ({size} bytes)"
    );
    let step = args.step.unwrap_or(bs);
    let mut buf = vec![0xa5u8; bs as usize];
    let mut offset = args.offset % (size - bs + 1);
    let start = Instant::now();
    for i in 0..args.count {
        if args.flush_interval > 0 && i > 0 && i % args.flush_interval == 0 {
            disk.flush().context("Flush failed")?;
        }
        if args.write {
            disk.write_at(&buf, offset)
        } else {
            disk.read_at(&mut buf, offset)
        }
        .with_context(|| format!("I/O failed at {offset:#x}"))?;
        offset = if size <= bs {
            0
        } else {
            (offset + step) % (size - bs)
        };
    }
    if args.write && args.flush_interval > 0 {
        disk.flush().context("Flush failed")?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let bytes = args.count * bs;
    let r = BenchResult {
        requests: args.count,
        bytes,
        seconds,
        mib_per_second: bytes as f64 / (1 << 20) as f64 / seconds,
        iops: args.count as f64 / seconds,
    };
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("Run completed in {:.3} seconds.", r.seconds);
        println!("{:.1} MiB/s, {:.0} requests/s", r.mib_per_second, r.iops);
    }
    Ok(())
}
