// SPDX-License-Identifier: Apache-2.0
//! `wisp image`: create, inspect, check, convert, resize and clone disk images.

mod bench;
mod commit;
mod compare;
mod convert;
mod info;
mod map;
mod measure;
mod qjson;
mod qopts;
mod rebase;
mod size;
mod vmdk;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use devices::disk::qcow2::{self, CreateOptions, Preallocation};
use devices::disk::{
    open_qcow2_for_repair, open_qcow2_metadata, probe_format, resize_image, ImageFormat,
};

pub use size::parse_size;

/// Image formats as command-line values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
    /// Read-only: an input of info, check, convert and compare.
    Vmdk,
}

impl From<FormatArg> for ImageFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
            FormatArg::Vmdk => ImageFormat::Vmdk,
        }
    }
}

/// What `check -r` repairs, as `qemu-img check -r` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Only leaked clusters.
    Leaks,
    /// Leaks and refcount/flag corruptions.
    All,
}

/// qemu-img's `--output` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    Human,
    Json,
}

/// Preallocation modes as command-line values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PreallocArg {
    Off,
    Metadata,
    Full,
}

/// The `wisp image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create a new image.
    Create {
        /// Image format.
        #[arg(short = 'f', long = "format", value_enum, default_value = "qcow2")]
        format: FormatArg,
        /// Backing file (qcow2 only), stored as given; relative names are
        /// resolved against the new image's directory.
        #[arg(short = 'b', long)]
        backing: Option<String>,
        /// Format of the backing file (probed when omitted).
        #[arg(short = 'F', long = "backing-format", value_enum)]
        backing_format: Option<FormatArg>,
        /// What to allocate up front.
        #[arg(long, value_enum, default_value = "off")]
        preallocation: PreallocArg,
        /// qcow2 cluster size, e.g. 64K.
        #[arg(long = "cluster-size", value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// qemu-img options: cluster_size, preallocation, compat, lazy_refcounts,
        /// refcount_bits, backing_file, backing_fmt, compression_type.
        #[arg(short = 'o', value_name = "NAME=VALUE,...")]
        options: Vec<String>,
        /// Image path.
        path: PathBuf,
        /// Virtual size, e.g. 10G (defaults to the backing file's size).
        #[arg(value_parser = parse_size)]
        size: Option<u64>,
    },
    /// Show an image's format, sizes and backing chain.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `json` prints qemu-img's JSON (`virtual-size`, `format-specific`, ...).
        #[arg(long, value_enum, default_value = "human")]
        output: OutputArg,
        /// With --output=json, print the whole backing chain as an array.
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        path: PathBuf,
    },
    /// Check a qcow2 image's metadata; exit 0 when clean, 1 when the check
    /// could not complete, 2 on corruption, 3 on leaks (as `qemu-img check`).
    Check {
        /// Fix leaked clusters, or all refcount and flag errors.
        #[arg(long, short = 'r', value_enum)]
        repair: Option<RepairArg>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `json` prints qemu-img's JSON (`check-errors`, `image-end-offset`, ...).
        #[arg(long, value_enum, default_value = "human")]
        output: OutputArg,
        /// Image format (checked against the probed one).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        path: PathBuf,
    },
    /// Copy an image into a new one, possibly of another format (sparse).
    Convert(convert::ConvertArgs),
    /// Grow an image to SIZE (or by +SIZE).
    Resize {
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        path: PathBuf,
        /// New size, e.g. 20G, or +5G to grow by that much.
        size: String,
    },
    /// Copy an image, or with --linked create a qcow2 overlay backed by it.
    Clone {
        /// Create a thin qcow2 overlay whose backing file is SRC.
        #[arg(long)]
        linked: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Measure I/O throughput of wisp's backend on an image.
    Bench(bench::BenchArgs),
    /// Compare the guest data of two images (exit 0 identical, 1 different, 2 error).
    Compare(compare::CompareArgs),
    /// Show where each range of guest data lives in the backing chain.
    Map(map::MapArgs),
    /// Point a qcow2 image at another backing file (safe: keeps the guest's view).
    Rebase(rebase::RebaseArgs),
    /// Write a qcow2 overlay's data into its backing file (then empty it unless -d).
    Commit(commit::CommitArgs),
    /// How large a new image of an input (or of --size) would be.
    Measure(measure::MeasureArgs),
}

/// Runs one `wisp image` command; returns the process exit code.
pub fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {
        ImageCommand::Create {
            format,
            backing,
            backing_format,
            preallocation,
            cluster_size,
            options,
            path,
            size,
        } => {
            let format: ImageFormat = format.into();
            let mut tune = qopts::QemuOptions::parse(&options, format)?;
            let (backing, backing_format) =
                tune.merge_backing(backing, backing_format.map(Into::into))?;
            tune.cluster_size = tune.cluster_size.or(Some(cluster_size));
            let preallocation = match tune.preallocation {
                Some(Preallocation::Off) => PreallocArg::Off,
                Some(Preallocation::Metadata) => PreallocArg::Metadata,
                Some(Preallocation::Full) => PreallocArg::Full,
                None => preallocation,
            };
            create(
                format,
                backing,
                backing_format,
                preallocation,
                &tune,
                &path,
                size,
            )
            .map(|()| 0)
        }
        ImageCommand::Info {
            json,
            output,
            backing_chain,
            format,
            path,
        } => info_cmd(&path, format, output, json, backing_chain).map(|()| 0),
        ImageCommand::Check {
            repair,
            json,
            output,
            format,
            path,
        } => check_cmd(&path, format, repair, json, output),
        ImageCommand::Convert(args) => convert::run(&args).map(|()| 0),
        ImageCommand::Resize { format, path, size } => {
            let format = match format {
                Some(f) => f.into(),
                None => probe_format(&path)?,
            };
            let new_size = match size.strip_prefix('+') {
                Some(delta) => {
                    let current = info::gather(&path, Some(format))?.virtual_size;
                    current
                        .checked_add(parse_size(delta)?)
                        .context("New size overflows")?
                }
                None => parse_size(&size)?,
            };
            resize_image(&path, Some(format), new_size)?;
            Ok(0)
        }
        ImageCommand::Clone { linked, src, dst } => clone(&src, &dst, linked).map(|()| 0),
        ImageCommand::Bench(args) => bench::run(&args).map(|()| 0),
        ImageCommand::Compare(args) => compare::run(&args),
        ImageCommand::Map(args) => map::run(&args).map(|()| 0),
        ImageCommand::Rebase(args) => rebase::run(&args).map(|()| 0),
        ImageCommand::Commit(args) => commit::run(&args).map(|()| 0),
        ImageCommand::Measure(args) => measure::run(&args).map(|()| 0),
    }
}

fn info_cmd(
    path: &Path,
    format: Option<FormatArg>,
    output: OutputArg,
    json: bool,
    backing_chain: bool,
) -> anyhow::Result<()> {
    let info = info::gather(path, format.map(Into::into))?;
    if output == OutputArg::Json && backing_chain {
        println!("{}", serde_json::to_string_pretty(&qjson::chain(&info))?);
    } else if output == OutputArg::Json {
        println!("{}", serde_json::to_string_pretty(&qjson::info(&info))?);
    } else if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info::render(&info));
    }
    Ok(())
}

/// `check`: VMDK and `--output=json` have their own reports; the rest is [`check`].
fn check_cmd(
    path: &Path,
    format: Option<FormatArg>,
    repair: Option<RepairArg>,
    json: bool,
    output: OutputArg,
) -> anyhow::Result<i32> {
    let probed = probe_format(path)?;
    if let Some(f) = format.map(ImageFormat::from) {
        if f != probed {
            bail!("{} is a {probed} image, not {f}", path.display());
        }
    }
    if probed == ImageFormat::Vmdk {
        return vmdk::check(path, repair.is_some(), json || output == OutputArg::Json);
    }
    check(path, repair, json, output == OutputArg::Json)
}

fn create(
    format: ImageFormat,
    backing: Option<String>,
    backing_format: Option<ImageFormat>,
    preallocation: PreallocArg,
    tune: &qopts::QemuOptions,
    path: &Path,
    size: Option<u64>,
) -> anyhow::Result<()> {
    let (backing_format, backing_size) = match &backing {
        Some(name) => {
            if format != ImageFormat::Qcow2 {
                bail!("Only qcow2 images can have a backing file");
            }
            let resolved = qcow2::resolve_backing(path, name);
            let fmt = match backing_format {
                Some(f) => f,
                None => probe_format(&resolved)
                    .with_context(|| format!("Cannot open backing file {}", resolved.display()))?,
            };
            let info = info::gather(&resolved, Some(fmt))?;
            (Some(fmt), Some(info.virtual_size))
        }
        None => (None, None),
    };
    let Some(size) = size.or(backing_size) else {
        bail!("Missing image size");
    };
    // Whole 512-byte sectors, rounded up as `qemu-img create` does.
    let size = size
        .checked_next_multiple_of(qcow2::create::SECTOR)
        .context("Image size is too large")?;
    match format {
        ImageFormat::Vmdk => bail!("wisp reads VMDK images but does not create them"),
        ImageFormat::Raw => create_raw(path, size, preallocation),
        ImageFormat::Qcow2 => {
            let mut opts = CreateOptions {
                size,
                backing_file: backing,
                backing_format,
                preallocation: match preallocation {
                    PreallocArg::Off => Preallocation::Off,
                    PreallocArg::Metadata => Preallocation::Metadata,
                    PreallocArg::Full => Preallocation::Full,
                },
                ..Default::default()
            };
            tune.apply(&mut opts)?;
            qcow2::create(path, &opts)?;
            Ok(())
        }
    }
}

fn create_raw(path: &Path, size: u64, preallocation: PreallocArg) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path)
        .with_context(|| format!("Cannot create image {}", path.display()))?;
    file.set_len(size)
        .with_context(|| format!("Cannot size image {}", path.display()))?;
    if preallocation != PreallocArg::Off {
        let chunk = vec![0u8; 1 << 20];
        let mut progress = Progress::new("Preallocating", size);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(chunk.len() as u64) as usize;
            file.write_all_at(&chunk[..n], off)
                .with_context(|| format!("Cannot write image {} at {off:#x}", path.display()))?;
            off += n as u64;
            progress.update(off);
        }
        progress.finish();
    }
    file.sync_all()
        .with_context(|| format!("Cannot sync image {}", path.display()))
}

/// `check` of a qcow2 (or raw) image: `json` is wisp's own report,
/// `qemu_json` qemu-img's `--output=json` shape.
fn check(
    path: &Path,
    repair: Option<RepairArg>,
    json: bool,
    qemu_json: bool,
) -> anyhow::Result<i32> {
    let format = probe_format(path)?;
    if format != ImageFormat::Qcow2 && qemu_json {
        // qemu-img: "This image format does not support checks".
        bail!("wisp checks qcow2 and vmdk images, not {format}");
    }
    if format != ImageFormat::Qcow2 {
        if json {
            println!("{{\"format\": \"raw\", \"corruptions\": 0, \"leaks\": 0}}");
        } else {
            println!("{}: raw images have no metadata to check", path.display());
        }
        return Ok(0);
    }
    let repair = repair.map(|r| match r {
        RepairArg::Leaks => qcow2::Repair::Leaks,
        RepairArg::All => qcow2::Repair::All,
    });
    // Exit 1 ("check not completed") when the image cannot be read through.
    let report = match repair {
        Some(_) => open_qcow2_for_repair(path),
        None => open_qcow2_metadata(path, true),
    }
    .map_err(anyhow::Error::from)
    .and_then(|mut disk| {
        disk.check_and_repair(repair)
            .with_context(|| format!("Cannot check image {}", path.display()))
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wisp: {e:#}");
            eprintln!("Check not completed.");
            return Ok(1);
        }
    };
    if qemu_json {
        qjson::print_check(path, &report)?;
    } else if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_check(&report));
    }
    if let Some(why) = &report.repair_refused {
        eprintln!("wisp: repair refused: {why}");
    }
    Ok(if report.corruptions > report.corruptions_fixed {
        2
    } else if report.leaks > report.leaks_fixed {
        3
    } else {
        0
    })
}

/// The human form of a check report, close to `qemu-img check`'s.
fn render_check(report: &qcow2::CheckReport) -> String {
    let mut out = String::new();
    for m in &report.messages {
        out.push_str(m);
        out.push('\n');
    }
    if report.corruptions_fixed + report.leaks_fixed > 0 {
        out.push_str(&format!(
            "Repaired {} corruptions and {} leaked clusters.\n",
            report.corruptions_fixed, report.leaks_fixed
        ));
    }
    let (c, l) = (
        report.corruptions.saturating_sub(report.corruptions_fixed),
        report.leaks.saturating_sub(report.leaks_fixed),
    );
    if c > 0 {
        out.push_str(&format!(
            "{c} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
        ));
    }
    if l > 0 {
        out.push_str(&format!(
            "{l} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
        ));
    }
    if report.is_clean() {
        out.push_str("No errors were found on the image.\n");
    }
    out.push_str(&format!(
        "{} allocated clusters\nImage end offset: {}\n",
        report.allocated_clusters, report.image_end_offset
    ));
    out
}

fn clone(src: &Path, dst: &Path, linked: bool) -> anyhow::Result<()> {
    let format = probe_format(src)?;
    if !linked {
        return convert::convert(src, Some(format), dst, format);
    }
    let info = info::gather(src, Some(format))?;
    let src_abs = src
        .canonicalize()
        .with_context(|| format!("Cannot resolve {}", src.display()))?;
    let name = src_abs
        .to_str()
        .with_context(|| format!("Path {} is not UTF-8", src_abs.display()))?
        .to_string();
    let opts = CreateOptions {
        size: info.virtual_size,
        backing_file: Some(name),
        backing_format: Some(format),
        ..Default::default()
    };
    qcow2::create(dst, &opts)?;
    Ok(())
}

/// When and how [`Progress`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProgressMode {
    /// On stderr, only when stderr is a terminal.
    Auto,
    /// `-p`: on a terminal as a percentage, otherwise one line per percent.
    Always,
    /// `-p --json`: one JSON object per percent on stdout.
    Json,
}

/// A percentage on stderr (or JSON lines on stdout).
pub(crate) struct Progress {
    label: &'static str,
    total: u64,
    shown: Option<u64>,
    enabled: bool,
    mode: ProgressMode,
    terminal: bool,
}

impl Progress {
    pub(crate) fn new(label: &'static str, total: u64) -> Self {
        Self::with_mode(label, total, ProgressMode::Auto)
    }

    pub(crate) fn with_mode(label: &'static str, total: u64, mode: ProgressMode) -> Self {
        let terminal = std::io::stderr().is_terminal();
        Progress {
            label,
            total,
            shown: None,
            enabled: terminal || mode != ProgressMode::Auto,
            mode,
            terminal,
        }
    }

    pub(crate) fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let pct = done
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100);
        if self.shown == Some(pct) {
            return;
        }
        self.shown = Some(pct);
        match self.mode {
            ProgressMode::Json => println!(
                "{}",
                serde_json::json!({"type": "progress", "operation": self.label,
                    "done": done, "total": self.total, "percent": pct})
            ),
            _ if self.terminal => eprint!("\r{}: {pct:3}%", self.label),
            _ => eprintln!("{}: {pct}%", self.label),
        }
    }

    pub(crate) fn finish(&mut self) {
        if self.enabled && self.shown.is_some() && self.terminal && self.mode != ProgressMode::Json
        {
            eprintln!();
        }
    }
}
