// SPDX-License-Identifier: Apache-2.0
//! `wisp image map`: which layer of a backing chain holds each range of guest
//! data and where, in `qemu-img map`'s terms and (with --output=json) format.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use devices::disk::qcow2::Qcow2Disk;
use devices::disk::status::{raw_status, BlockKind, BlockStatus};
use devices::disk::vmdk::VmdkDisk;
use devices::disk::{open_qcow2_metadata, open_vmdk, DiskBackend, ImageFormat};

use super::{info, FormatArg, OutputArg};

/// `map` arguments.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<FormatArg>,
    /// `json` prints qemu-img's JSON (start, length, depth, present, zero, data, offset).
    #[arg(long, value_enum, default_value = "human")]
    output: OutputArg,
    path: PathBuf,
}

/// One image of the chain, opened alone.
enum Layer {
    Raw(File, u64),
    Qcow2(Box<Qcow2Disk>),
    Vmdk(Box<VmdkDisk>),
}

impl Layer {
    fn open(path: &Path, format: ImageFormat) -> anyhow::Result<Layer> {
        Ok(match format {
            ImageFormat::Raw => {
                let f =
                    File::open(path).with_context(|| format!("Cannot open {}", path.display()))?;
                let len = f.metadata()?.len();
                Layer::Raw(f, len)
            }
            ImageFormat::Qcow2 => Layer::Qcow2(Box::new(open_qcow2_metadata(path, true)?)),
            ImageFormat::Vmdk => Layer::Vmdk(Box::new(open_vmdk(path)?)),
        })
    }

    fn status(&mut self, offset: u64) -> anyhow::Result<BlockStatus> {
        let size = match self {
            Layer::Raw(_, n) => *n,
            Layer::Qcow2(d) => d.size(),
            Layer::Vmdk(d) => d.size(),
        };
        if offset >= size {
            // Past the end of a shorter backing file: zeros.
            return Ok(BlockStatus {
                kind: BlockKind::Unallocated,
                len: u64::MAX,
                offset: None,
            });
        }
        Ok(match self {
            Layer::Raw(f, n) => raw_status(f, *n, offset)?,
            Layer::Qcow2(d) => d.block_status(offset)?,
            Layer::Vmdk(d) => d.block_status(offset)?,
        })
    }
}

/// One line of the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub offset: Option<u64>,
}

impl Extent {
    /// Whether `next` continues this extent (same state, contiguous offsets).
    fn joins(&self, next: &Extent) -> bool {
        let same = (self.depth, self.present, self.zero, self.data)
            == (next.depth, next.present, next.zero, next.data);
        let contiguous = match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + self.length == b,
            _ => false,
        };
        same && contiguous && self.start + self.length == next.start
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// Maps the chain whose top is `path`.
pub fn map(
    path: &Path,
    format: Option<ImageFormat>,
) -> anyhow::Result<(Vec<Extent>, Vec<PathBuf>)> {
    let top = info::gather(path, format)?;
    let mut names = vec![top.filename.clone()];
    let mut layers = vec![Layer::open(path, top.format)?];
    for below in &top.backing_chain {
        names.push(below.filename.clone());
        layers.push(Layer::open(&below.filename, below.format)?);
    }
    let size = top.virtual_size;
    let mut out: Vec<Extent> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let mut depth = 0;
        let mut len = size - off;
        let st = loop {
            let st = layers[depth].status(off)?;
            len = len.min(st.len.max(1));
            if st.kind != BlockKind::Unallocated || depth + 1 == layers.len() {
                break st;
            }
            depth += 1;
        };
        let e = Extent {
            start: off,
            length: len,
            depth,
            present: st.kind != BlockKind::Unallocated,
            zero: matches!(
                st.kind,
                BlockKind::Zero | BlockKind::ZeroData | BlockKind::Unallocated
            ),
            data: matches!(st.kind, BlockKind::Data | BlockKind::ZeroData),
            offset: st.offset,
        };
        match out.last_mut() {
            Some(last) if last.joins(&e) => last.length += e.length,
            _ => out.push(e),
        }
        off += len;
    }
    Ok((out, names))
}

/// Runs `map`.
pub fn run(args: &MapArgs) -> anyhow::Result<()> {
    let (extents, names) = map(&args.path, args.format.map(Into::into))?;
    let mut o = std::io::stdout().lock();
    if args.output == OutputArg::Json {
        let lines: Vec<String> = extents.iter().map(Extent::json).collect();
        writeln!(o, "[{}]", lines.join(",\n"))?;
        return Ok(());
    }
    writeln!(o, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to")?;
    let hex = |v: u64| {
        if v == 0 {
            "0".to_string()
        } else {
            format!("{v:#x}")
        }
    };
    for e in extents.iter().filter(|e| e.data && e.offset.is_some()) {
        let at = e.offset.unwrap_or(0);
        writeln!(
            o,
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            hex(at),
            names[e.depth].display()
        )?;
    }
    Ok(())
}
