// SPDX-License-Identifier: Apache-2.0
//! `--output=json`: qemu-img's JSON, with its field names (`virtual-size`,
//! `format-specific`, `backing-filename`, `check-errors`, ...), so scripts
//! written against qemu-img read wisp's output unchanged.

use std::path::Path;

use anyhow::Context;
use devices::disk::{open_qcow2_metadata, DiskBackend};
use serde_json::{json, Map, Value};

use super::info::ImageInfo;

fn format_specific(info: &ImageInfo) -> Option<Value> {
    if let Some(v) = &info.vmdk {
        let extents: Vec<Value> = v
            .extents
            .iter()
            .map(|e| {
                let mut m = Map::new();
                m.insert("virtual-size".into(), e.virtual_size.into());
                if let Some(f) = &e.filename {
                    m.insert("filename".into(), f.display().to_string().into());
                }
                if let Some(cs) = e.cluster_size {
                    m.insert("cluster-size".into(), cs.into());
                }
                // qemu-img names the extent format only for flat extents.
                let kind = if e.kind == "FLAT" || e.kind == "VMFS" {
                    "FLAT"
                } else {
                    ""
                };
                m.insert("format".into(), kind.into());
                Value::Object(m)
            })
            .collect();
        let mut data = Map::new();
        if let Some(cid) = v.cid {
            data.insert("cid".into(), cid.into());
        }
        data.insert("parent-cid".into(), u32::MAX.into());
        data.insert("create-type".into(), v.create_type.clone().into());
        data.insert("extents".into(), extents.into());
        return Some(json!({"type": "vmdk", "data": data}));
    }
    let version = info.qcow2_version?;
    let mut data = Map::new();
    data.insert(
        "compat".into(),
        if version >= 3 { "1.1" } else { "0.10" }.into(),
    );
    if version >= 3 {
        if let Some(c) = info.compression_type {
            data.insert("compression-type".into(), c.into());
        }
        if let Some(l) = info.lazy_refcounts {
            data.insert("lazy-refcounts".into(), l.into());
        }
    }
    if let Some(b) = info.refcount_bits {
        data.insert("refcount-bits".into(), b.into());
    }
    if version >= 3 {
        data.insert("corrupt".into(), info.corrupt.into());
        if let Some(e) = info.extended_l2 {
            data.insert("extended-l2".into(), e.into());
        }
    }
    Some(json!({"type": "qcow2", "data": data}))
}

/// One image as `qemu-img info --output=json` shows it.
fn one(info: &ImageInfo, below: Option<&ImageInfo>) -> Value {
    let mut m = Map::new();
    m.insert("virtual-size".into(), info.virtual_size.into());
    m.insert(
        "filename".into(),
        info.filename.display().to_string().into(),
    );
    if let Some(cs) = info.cluster_size {
        m.insert("cluster-size".into(), cs.into());
    }
    m.insert("format".into(), info.format.name().into());
    m.insert("actual-size".into(), info.actual_size.into());
    if let Some(fs) = format_specific(info) {
        m.insert("format-specific".into(), fs);
    }
    if let Some(b) = &info.backing_file {
        m.insert("backing-filename".into(), b.clone().into());
        if let Some(full) = below {
            m.insert(
                "full-backing-filename".into(),
                full.filename.display().to_string().into(),
            );
        }
    }
    if let Some(f) = info.backing_format {
        m.insert("backing-filename-format".into(), f.name().into());
    }
    m.insert("dirty-flag".into(), info.dirty.into());
    Value::Object(m)
}

/// `qemu-img info --output=json` for the top image.
pub fn info(info: &ImageInfo) -> Value {
    one(info, info.backing_chain.first())
}

/// `qemu-img info --backing-chain --output=json`: the top image, then each one below.
pub fn chain(info: &ImageInfo) -> Value {
    let mut layers: Vec<&ImageInfo> = vec![info];
    layers.extend(&info.backing_chain);
    let out: Vec<Value> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| one(l, layers.get(i + 1).copied()))
        .collect();
    Value::Array(out)
}

/// `qemu-img check --output=json`: exit 0 clean, 2 corrupt, 3 leaks.
/// Prints a qcow2 check report in `qemu-img check --output=json`'s shape.
pub fn print_check(path: &Path, r: &devices::disk::qcow2::CheckReport) -> anyhow::Result<()> {
    let disk = open_qcow2_metadata(path, true)
        .with_context(|| format!("Cannot open image {}", path.display()))?;
    let total = disk.size().div_ceil(disk.header().cluster_size());
    drop(disk);
    let mut m = Map::new();
    m.insert("filename".into(), path.display().to_string().into());
    m.insert("format".into(), "qcow2".into());
    m.insert("image-end-offset".into(), r.image_end_offset.into());
    m.insert("total-clusters".into(), total.into());
    m.insert("check-errors".into(), 0.into());
    // Not "allocated-clusters": qemu-img counts guest data clusters there,
    // wisp's report counts metadata too.
    for (k, v) in [
        ("corruptions", r.corruptions - r.corruptions_fixed),
        ("leaks", r.leaks - r.leaks_fixed),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
    ] {
        if v > 0 {
            m.insert(k.into(), v.into());
        }
    }
    println!("{}", serde_json::to_string_pretty(&Value::Object(m))?);
    Ok(())
}
