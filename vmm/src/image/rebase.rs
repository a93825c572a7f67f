// SPDX-License-Identifier: Apache-2.0
//! `wisp image rebase`: point a qcow2 image at another backing file.
//!
//! Safe mode (the default) first copies into the image every cluster it does
//! not hold itself whose content would change under the new backing file, so
//! the guest sees the same disk afterwards; `-u` only rewrites the name.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use devices::disk::qcow2;
use devices::disk::status::BlockKind;
use devices::disk::{open_qcow2_metadata, probe_format, DiskBackend, ImageFormat};

use super::compare::open_input;
use super::{info, FormatArg, Progress, ProgressMode};

/// `rebase` arguments.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// Image format (only qcow2 images have backing files).
    #[arg(short = 'f', value_enum)]
    format: Option<FormatArg>,
    /// New backing file, stored as given (relative names are resolved against
    /// the image's directory); an empty name removes the backing file.
    #[arg(short = 'b')]
    backing: String,
    /// Format of the new backing file (probed when omitted in safe mode).
    #[arg(short = 'F', value_enum)]
    backing_format: Option<FormatArg>,
    /// Unsafe: rewrite the name only, without comparing or copying data.
    #[arg(short = 'u')]
    unsafe_: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    path: PathBuf,
}

/// Reads `buf` at `off` of `disk`; bytes past its end read as zeros.
fn read_padded(disk: &mut dyn DiskBackend, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let size = disk.size();
    let avail = size.saturating_sub(off).min(buf.len() as u64) as usize;
    buf[avail..].fill(0);
    if avail > 0 {
        disk.read_at(&mut buf[..avail], off)?;
    }
    Ok(())
}

/// Runs `rebase`.
pub fn run(args: &RebaseArgs) -> anyhow::Result<()> {
    let format = match args.format {
        Some(f) => f.into(),
        None => probe_format(&args.path)?,
    };
    if format != ImageFormat::Qcow2 {
        bail!(
            "Only qcow2 images have a backing file ({} is {format})",
            args.path.display()
        );
    }
    let name = (!args.backing.is_empty()).then_some(args.backing.as_str());
    let mut new_format: Option<ImageFormat> = args.backing_format.map(Into::into);
    if name.is_none() && new_format.is_some() {
        bail!("-F needs a backing file (-b)");
    }
    if !args.unsafe_ {
        let resolved = name.map(|n| qcow2::resolve_backing(&args.path, n));
        if let (Some(p), None) = (&resolved, new_format) {
            new_format = Some(
                probe_format(p)
                    .with_context(|| format!("Cannot open backing file {}", p.display()))?,
            );
        }
        copy_changed(&args.path, resolved.as_deref(), new_format, args.progress)?;
    }
    let mut top = open_qcow2_metadata(&args.path, false)?;
    top.set_backing_file(name, new_format)
        .with_context(|| format!("Cannot rewrite the header of {}", args.path.display()))?;
    Ok(())
}

/// Copies into `path` the clusters it leaves to its backing file whose
/// content differs between the old backing chain and `new`.
fn copy_changed(
    path: &Path,
    new: Option<&Path>,
    new_format: Option<ImageFormat>,
    progress: bool,
) -> anyhow::Result<()> {
    let chain = info::gather(path, Some(ImageFormat::Qcow2))?;
    let mut old = match chain.backing_chain.first() {
        Some(b) => Some(open_input(&b.filename, Some(b.format))?),
        None => None,
    };
    let mut new = match new {
        Some(p) => Some(open_input(p, new_format)?),
        None => None,
    };
    let mut top = open_qcow2_metadata(path, false)?;
    let size = top.size();
    let cs = top.header().cluster_size() as usize;
    let (mut a, mut b) = (vec![0u8; cs], vec![0u8; cs]);
    let mode = if progress {
        ProgressMode::Always
    } else {
        ProgressMode::Auto
    };
    let mut shown = Progress::with_mode("Rebasing", size, mode);
    let mut off = 0u64;
    while off < size {
        let st = top.block_status(off)?;
        let n = st.len as usize;
        if st.kind == BlockKind::Unallocated {
            a[..n].fill(0);
            b[..n].fill(0);
            if let Some(d) = old.as_mut() {
                read_padded(d.as_mut(), &mut a[..n], off)
                    .context("Cannot read the old backing file")?;
            }
            if let Some(d) = new.as_mut() {
                read_padded(d.as_mut(), &mut b[..n], off)
                    .context("Cannot read the new backing file")?;
            }
            if a[..n] != b[..n] {
                let r = if a[..n].iter().all(|&x| x == 0) {
                    top.write_zeroes(off, n as u64, false)
                } else {
                    top.write_at(&a[..n], off)
                };
                r.with_context(|| format!("Cannot write {} at {off:#x}", path.display()))?;
            }
        }
        off += st.len;
        shown.update(off);
    }
    shown.finish();
    top.flush()
        .with_context(|| format!("Cannot flush {}", path.display()))?;
    Ok(())
}
