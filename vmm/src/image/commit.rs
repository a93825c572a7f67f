// SPDX-License-Identifier: Apache-2.0
//! `wisp image commit`: write what a qcow2 overlay holds into its backing
//! file, then (unless -d) empty the overlay so it reads through again.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use devices::disk::qcow2::{self, CreateOptions};
use devices::disk::status::BlockKind;
use devices::disk::{
    open_disk, open_qcow2_metadata, probe_format, DiskBackend, DiskOptions, ImageFormat,
};

use super::{info, FormatArg, Progress, ProgressMode};

/// `commit` arguments.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Image format (only qcow2 images have backing files).
    #[arg(short = 'f', value_enum)]
    format: Option<FormatArg>,
    /// Keep the overlay's data (do not empty it afterwards).
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    path: PathBuf,
}

/// Runs `commit`.
pub fn run(args: &CommitArgs) -> anyhow::Result<()> {
    let path = &args.path;
    let format = match args.format {
        Some(f) => f.into(),
        None => probe_format(path)?,
    };
    if format != ImageFormat::Qcow2 {
        bail!(
            "Only qcow2 images have a backing file to commit into ({} is {format})",
            path.display()
        );
    }
    let chain = info::gather(path, Some(format))?;
    let Some(base) = chain.backing_chain.first() else {
        bail!("{} has no backing file to commit into", path.display());
    };
    if base.format == ImageFormat::Vmdk {
        bail!("wisp cannot write VMDK backing files");
    }
    let mut top = open_qcow2_metadata(path, false)?;
    let mut below = open_disk(&DiskOptions {
        path: base.filename.clone(),
        read_only: false,
        format: Some(base.format),
    })?;
    let size = top.size();
    if below.size() < size {
        bail!(
            "Backing file {} ({} bytes) is smaller than {} ({size} bytes); grow it first with `wisp image resize`",
            base.filename.display(),
            below.size(),
            path.display()
        );
    }
    let cs = top.header().cluster_size() as usize;
    let mut buf = vec![0u8; cs];
    let mode = if args.progress {
        ProgressMode::Always
    } else {
        ProgressMode::Auto
    };
    let mut progress = Progress::with_mode("Committing", size, mode);
    let mut off = 0u64;
    while off < size {
        let st = top.block_status(off)?;
        let n = st.len as usize;
        let r = match st.kind {
            BlockKind::Unallocated => Ok(()),
            BlockKind::Zero => below.write_zeroes(off, st.len, false),
            BlockKind::Data | BlockKind::ZeroData => top
                .read_at(&mut buf[..n], off)
                .and_then(|()| below.write_at(&buf[..n], off)),
        };
        r.with_context(|| {
            format!(
                "Cannot commit {:#x}+{n:#x} into {}",
                off,
                base.filename.display()
            )
        })?;
        off += st.len;
        progress.update(off);
    }
    progress.finish();
    below
        .flush()
        .with_context(|| format!("Cannot flush {}", base.filename.display()))?;
    drop(below);
    if args.keep {
        return Ok(());
    }
    empty_overlay(path, top)
}

/// Replaces the overlay by a fresh, empty image with the same geometry and
/// backing file, so that it reads through to the backing file again.
fn empty_overlay(
    path: &std::path::Path,
    top: devices::disk::qcow2::Qcow2Disk,
) -> anyhow::Result<()> {
    let size = top.size();
    let h = top.header().clone();
    drop(top);
    let opts = CreateOptions {
        size,
        cluster_size: h.cluster_size(),
        version: h.version,
        refcount_bits: h.refcount_bits(),
        backing_file: h.backing_file.clone(),
        backing_format: h.backing_format.as_deref().map(str::parse).transpose()?,
        ..Default::default()
    };
    qcow2::create(path, &opts).with_context(|| format!("Cannot empty {}", path.display()))?;
    Ok(())
}
