// SPDX-License-Identifier: Apache-2.0
//! `wisp image info`: what an image and its backing chain are.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use devices::disk::qcow2::{self, Header};
use devices::disk::vmdk::VmdkInfo;
use devices::disk::{open_vmdk, DiskBackend, ImageFormat, MAX_BACKING_DEPTH};
use serde::Serialize;

use super::size::human;

/// What `info` reports about one image.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host.
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refcount_bits: Option<u32>,
    pub dirty: bool,
    pub corrupt: bool,
    /// qcow2: `zlib` or `zstd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<&'static str>,
    /// qcow2: the lazy-refcounts compatible feature bit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// qcow2: extended L2 entries (subclusters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_format: Option<ImageFormat>,
    /// VMDK create type and extents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmdk: Option<VmdkInfo>,
    /// The images below this one, nearest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backing_chain: Vec<ImageInfo>,
}

fn sniff(path: &Path) -> anyhow::Result<ImageFormat> {
    Ok(devices::disk::probe_format(path)?)
}

/// Describes one image without its chain; returns the resolved backing path too.
fn describe(path: &Path, format: ImageFormat) -> anyhow::Result<(ImageInfo, Option<PathBuf>)> {
    let file = File::open(path).with_context(|| format!("Cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("Cannot stat {}", path.display()))?;
    if meta.is_dir() {
        bail!("Image {} is a directory", path.display());
    }
    let mut info = ImageInfo {
        filename: path.to_path_buf(),
        format,
        virtual_size: meta.len(),
        actual_size: meta.blocks() * 512,
        cluster_size: None,
        qcow2_version: None,
        refcount_bits: None,
        dirty: false,
        corrupt: false,
        compression_type: None,
        lazy_refcounts: None,
        extended_l2: None,
        backing_file: None,
        backing_format: None,
        vmdk: None,
        backing_chain: Vec::new(),
    };
    match format {
        ImageFormat::Raw => return Ok((info, None)),
        ImageFormat::Vmdk => {
            describe_vmdk(path, &mut info)?;
            return Ok((info, None));
        }
        ImageFormat::Qcow2 => {}
    }
    let h =
        Header::read(&file).with_context(|| format!("Invalid qcow2 image {}", path.display()))?;
    info.virtual_size = h.size;
    info.cluster_size = Some(h.cluster_size());
    info.qcow2_version = Some(h.version);
    info.refcount_bits = Some(h.refcount_bits());
    info.dirty = h.incompatible_features & qcow2::header::INCOMPAT_DIRTY != 0;
    info.corrupt = h.incompatible_features & qcow2::header::INCOMPAT_CORRUPT != 0;
    info.compression_type = Some(match h.compression {
        qcow2::header::Compression::Deflate => "zlib",
        qcow2::header::Compression::Zstd => "zstd",
    });
    info.lazy_refcounts = Some(h.compatible_features & qcow2::header::COMPAT_LAZY_REFCOUNTS != 0);
    info.extended_l2 = Some(h.incompatible_features & qcow2::header::INCOMPAT_EXTL2 != 0);
    info.backing_file = h.backing_file.clone();
    info.backing_format = match &h.backing_format {
        Some(f) => Some(f.parse()?),
        None => None,
    };
    let backing = h
        .backing_file
        .as_deref()
        .map(|name| qcow2::resolve_backing(path, name));
    Ok((info, backing))
}

fn describe_vmdk(path: &Path, info: &mut ImageInfo) -> anyhow::Result<()> {
    let disk = open_vmdk(path)?;
    info.virtual_size = disk.size();
    let v = disk.info().clone();
    info.cluster_size = v.extents.iter().find_map(|e| e.cluster_size);
    // The descriptor's own blocks, plus each distinct extent file's.
    let mut files: Vec<&Path> = vec![path];
    for f in v.extents.iter().filter_map(|e| e.filename.as_deref()) {
        if !files.contains(&f) {
            files.push(f);
        }
    }
    info.actual_size = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.blocks() * 512)
        .sum();
    info.vmdk = Some(v);
    Ok(())
}

/// Describes `path` and walks its backing chain.
pub fn gather(path: &Path, format: Option<ImageFormat>) -> anyhow::Result<ImageInfo> {
    let format = match format {
        Some(f) => f,
        None => sniff(path)?,
    };
    let (mut top, mut next) = describe(path, format)?;
    let mut next_format = top.backing_format;
    let mut seen = vec![path.canonicalize().unwrap_or_else(|_| path.to_path_buf())];
    while let Some(p) = next {
        if top.backing_chain.len() >= MAX_BACKING_DEPTH {
            bail!(
                "Backing chain of {} is deeper than {MAX_BACKING_DEPTH} images",
                path.display()
            );
        }
        let canonical = p
            .canonicalize()
            .with_context(|| format!("Cannot open backing file {}", p.display()))?;
        if seen.contains(&canonical) {
            bail!(
                "Backing chain of {} loops back to {}",
                path.display(),
                p.display()
            );
        }
        seen.push(canonical);
        let f = match next_format {
            Some(f) => f,
            None => sniff(&p)?,
        };
        let (info, below) = describe(&p, f)?;
        next_format = info.backing_format;
        next = below;
        top.backing_chain.push(info);
    }
    Ok(top)
}

fn print_one(info: &ImageInfo, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(out, "image: {}", info.filename.display());
    let _ = writeln!(out, "file format: {}", info.format);
    let _ = writeln!(
        out,
        "virtual size: {} ({} bytes)",
        human(info.virtual_size),
        info.virtual_size
    );
    let _ = writeln!(out, "disk size: {}", human(info.actual_size));
    if let Some(cs) = info.cluster_size {
        let _ = writeln!(out, "cluster_size: {cs}");
    }
    if let Some(v) = info.qcow2_version {
        let _ = writeln!(out, "qcow2 version: {v}");
    }
    if let Some(b) = info.refcount_bits {
        let _ = writeln!(out, "refcount bits: {b}");
    }
    if let Some(b) = &info.backing_file {
        let _ = writeln!(out, "backing file: {b}");
    }
    if let Some(f) = info.backing_format {
        let _ = writeln!(out, "backing file format: {f}");
    }
    if let Some(v) = &info.vmdk {
        let _ = writeln!(out, "create type: {}", v.create_type);
        if let Some(cid) = v.cid {
            let _ = writeln!(out, "cid: {cid:08x}");
        }
        for (i, e) in v.extents.iter().enumerate() {
            let name = e.filename.as_deref().map(|f| f.display().to_string());
            let _ = writeln!(
                out,
                "extent {i}: {} {} ({} bytes){}",
                e.kind,
                name.as_deref().unwrap_or("-"),
                e.virtual_size,
                if e.compressed { ", compressed" } else { "" }
            );
        }
    }
    if info.format == ImageFormat::Qcow2 {
        let _ = writeln!(out, "dirty: {}", info.dirty);
        let _ = writeln!(out, "corrupt: {}", info.corrupt);
    }
}

/// Human-readable rendering of the whole chain.
pub fn render(info: &ImageInfo) -> String {
    let mut out = String::new();
    print_one(info, &mut out);
    for below in &info.backing_chain {
        out.push('\n');
        print_one(below, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wisp-info-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_gather_raw_reports_file_length() {
        let d = tmp("raw");
        let p = d.join("a.raw");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let info = gather(&p, None).unwrap();
        assert_eq!(info.format, ImageFormat::Raw);
        assert_eq!(info.virtual_size, 1 << 20);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn test_gather_qcow2_walks_backing_chain() {
        let d = tmp("chain");
        let base = d.join("base.raw");
        File::create(&base).unwrap().set_len(1 << 20).unwrap();
        let top = d.join("top.qcow2");
        let opts = qcow2::CreateOptions {
            size: 1 << 20,
            backing_file: Some("base.raw".into()),
            backing_format: Some(ImageFormat::Raw),
            ..Default::default()
        };
        qcow2::create(&top, &opts).unwrap();
        let info = gather(&top, None).unwrap();
        assert_eq!(info.backing_chain.len(), 1);
        assert_eq!(info.backing_chain[0].filename, base);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn test_gather_self_backing_is_cycle_error() {
        let d = tmp("cycle");
        let top = d.join("top.qcow2");
        let opts = qcow2::CreateOptions {
            size: 1 << 20,
            backing_file: Some("top.qcow2".into()),
            backing_format: Some(ImageFormat::Qcow2),
            ..Default::default()
        };
        qcow2::create(&top, &opts).unwrap();
        let err = gather(&top, None).unwrap_err();
        assert!(err.to_string().contains("loops back"));
        std::fs::remove_dir_all(d).unwrap();
    }
}
