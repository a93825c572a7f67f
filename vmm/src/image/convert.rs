// SPDX-License-Identifier: Apache-2.0
//! `wisp image convert`: copies guest data between images, skipping zeros.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use devices::disk::qcow2::{self, CreateOptions, Preallocation};
use devices::disk::{open_disk, DiskBackend, DiskOptions, ImageFormat};

use super::compare::open_input;
use super::qopts::QemuOptions;
use super::{FormatArg, Progress, ProgressMode};

/// Bytes copied per step.
const CHUNK: usize = 1 << 20;

/// `convert` arguments.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source format (probed when omitted).
    #[arg(short = 'f', value_enum)]
    format: Option<FormatArg>,
    /// Destination format.
    #[arg(short = 'O', value_enum)]
    output_format: FormatArg,
    /// qemu-img options for the destination (see `create -o`).
    #[arg(short = 'o', value_name = "NAME=VALUE,...")]
    options: Vec<String>,
    /// Show progress (on a terminal; as JSON lines on stdout with --json).
    #[arg(short = 'p')]
    progress: bool,
    /// Compress the destination's clusters (qcow2, deflate as qemu-img -c).
    #[arg(short = 'c')]
    compress: bool,
    /// With -p, print progress as JSON lines.
    #[arg(long)]
    json: bool,
    src: PathBuf,
    dst: PathBuf,
}

/// Runs `convert`.
pub fn run(a: &ConvertArgs) -> anyhow::Result<()> {
    let output_format: ImageFormat = a.output_format.into();
    let opts = ConvertOptions {
        qemu: QemuOptions::parse(&a.options, output_format)?,
        compress: a.compress,
        progress: match (a.progress, a.json) {
            (false, false) => ProgressMode::Auto,
            (false, true) => bail!("--json describes progress: use it with -p"),
            (true, false) => ProgressMode::Always,
            (true, true) => ProgressMode::Json,
        },
    };
    convert_with(
        &a.src,
        a.format.map(Into::into),
        &a.dst,
        output_format,
        &opts,
    )
}

/// How `convert` writes its output.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// `-o` options for the destination.
    pub qemu: QemuOptions,
    /// Write compressed qcow2 clusters.
    pub compress: bool,
    pub progress: ProgressMode,
}

/// Converts `src` (format `src_format`, probed if `None`) into a new `dst` of `dst_format`.
pub fn convert(
    src: &Path,
    src_format: Option<ImageFormat>,
    dst: &Path,
    dst_format: ImageFormat,
) -> anyhow::Result<()> {
    let opts = ConvertOptions {
        qemu: QemuOptions::default(),
        compress: false,
        progress: ProgressMode::Auto,
    };
    convert_with(src, src_format, dst, dst_format, &opts)
}

/// [`convert`] with `-o` options and a progress mode.
pub fn convert_with(
    src: &Path,
    src_format: Option<ImageFormat>,
    dst: &Path,
    dst_format: ImageFormat,
    opts: &ConvertOptions,
) -> anyhow::Result<()> {
    if opts.qemu.backing_file.is_some() || opts.qemu.backing_fmt.is_some() {
        bail!("convert does not write backing files: convert, then `wisp image create -b`");
    }
    // The source was named on the command line: its probed format counts as
    // declared (a qcow2 follows its backing chain, a VMDK opens its extents).
    let mut input = open_input(src, src_format)?;
    let size = input.size();
    if opts.compress {
        if dst_format != ImageFormat::Qcow2 {
            bail!("-c compresses qcow2 clusters; {dst_format} images cannot be compressed");
        }
        let mut c = CreateOptions {
            size,
            ..Default::default()
        };
        opts.qemu.apply(&mut c)?;
        let mut progress = Progress::with_mode("Converting", size, opts.progress);
        qcow2::create_compressed(dst, &c, input.as_mut(), |done| progress.update(done))?;
        progress.update(size);
        progress.finish();
        return Ok(());
    }
    match dst_format {
        ImageFormat::Raw => {
            if opts
                .qemu
                .preallocation
                .is_some_and(|p| p != Preallocation::Off)
            {
                bail!("convert to raw supports only preallocation=off");
            }
            let f = std::fs::File::create(dst)
                .with_context(|| format!("Cannot create image {}", dst.display()))?;
            f.set_len(size)
                .with_context(|| format!("Cannot size image {}", dst.display()))?;
        }
        ImageFormat::Qcow2 => {
            let mut c = CreateOptions {
                size,
                ..Default::default()
            };
            opts.qemu.apply(&mut c)?;
            qcow2::create(dst, &c)?
        }
        ImageFormat::Vmdk => {
            bail!("wisp reads VMDK images but does not write them; convert to raw or qcow2")
        }
    }
    let mut output = open_disk(&DiskOptions {
        path: dst.to_path_buf(),
        read_only: false,
        format: Some(dst_format),
    })?;
    let mut buf = vec![0u8; CHUNK];
    let mut progress = Progress::with_mode("Converting", size, opts.progress);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        input
            .read_at(chunk, off)
            .with_context(|| format!("Cannot read {} at {off:#x}", src.display()))?;
        write_nonzero(output.as_mut(), chunk, off)
            .with_context(|| format!("Cannot write {} at {off:#x}", dst.display()))?;
        off += n as u64;
        progress.update(off);
    }
    progress.finish();
    output
        .flush()
        .with_context(|| format!("Cannot flush {}", dst.display()))?;
    Ok(())
}

/// Writes only the non-zero 4 KiB runs of `chunk` (at `off`): the destination
/// is sparse already.
fn write_nonzero(output: &mut dyn DiskBackend, chunk: &[u8], off: u64) -> std::io::Result<()> {
    let n = chunk.len();
    let mut pos = 0;
    while pos < n {
        let end = (pos + 4096).min(n);
        if chunk[pos..end].iter().all(|&b| b == 0) {
            pos = end;
            continue;
        }
        let mut run_end = end;
        while run_end < n {
            let next = (run_end + 4096).min(n);
            if chunk[run_end..next].iter().all(|&b| b == 0) {
                break;
            }
            run_end = next;
        }
        output.write_at(&chunk[pos..run_end], off + pos as u64)?;
        pos = run_end;
    }
    Ok(())
}
