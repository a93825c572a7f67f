// SPDX-License-Identifier: Apache-2.0
//! qemu-img's `-o name=value,...` creation options, by qemu-img's names.
//!
//! Every option wisp accepts is honoured; a value wisp cannot honour (say
//! `lazy_refcounts=on` or `compression_type=zstd`) is refused with the reason,
//! never dropped.

use anyhow::{bail, Context};
use devices::disk::qcow2::{CreateOptions, Preallocation};
use devices::disk::ImageFormat;

use super::size::parse_size;

/// Options given with `-o`, merged over the command's own flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuOptions {
    pub cluster_size: Option<u64>,
    pub preallocation: Option<Preallocation>,
    /// qcow2 version: 2 for compat=0.10, 3 for compat=1.1.
    pub version: Option<u32>,
    pub refcount_bits: Option<u32>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<ImageFormat>,
}

const NAMES: [&str; 8] = [
    "cluster_size",
    "preallocation",
    "compat",
    "lazy_refcounts",
    "refcount_bits",
    "backing_file",
    "backing_fmt",
    "compression_type",
];
const KNOWN: &str = "cluster_size, preallocation, compat, lazy_refcounts, refcount_bits, \
                     backing_file, backing_fmt, compression_type";

fn on_off(name: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Invalid value '{v}' for option {name} (expected on or off)"),
    }
}

/// Splits `a=1,b=2` into pairs; `,,` is an escaped comma, as in qemu-img.
fn pairs(spec: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
                continue;
            }
            items.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => bail!("Invalid option '{i}' (expected name=value; known: {KNOWN})"),
        })
        .collect()
}

impl QemuOptions {
    /// Parses every `-o` argument for an image of `format`.
    pub fn parse(specs: &[String], format: ImageFormat) -> anyhow::Result<QemuOptions> {
        let mut o = QemuOptions::default();
        for spec in specs {
            for (k, v) in pairs(spec)? {
                o.set(&k, &v, format)?;
            }
        }
        Ok(o)
    }

    fn set(&mut self, k: &str, v: &str, format: ImageFormat) -> anyhow::Result<()> {
        let qcow2_only = !matches!(k, "preallocation");
        if format != ImageFormat::Qcow2 && qcow2_only && NAMES.contains(&k) {
            bail!("Option {k} applies to qcow2 images, not {format}");
        }
        match k {
            "cluster_size" => {
                self.cluster_size =
                    Some(parse_size(v).with_context(|| format!("Invalid cluster_size '{v}'"))?)
            }
            "preallocation" => {
                self.preallocation = Some(match v {
                    "off" => Preallocation::Off,
                    "metadata" if format == ImageFormat::Qcow2 => Preallocation::Metadata,
                    "full" => Preallocation::Full,
                    "falloc" => bail!("preallocation=falloc is not supported (use full or off)"),
                    _ => bail!("Invalid preallocation '{v}' (expected off, metadata or full)"),
                })
            }
            "compat" => {
                self.version = Some(match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Invalid compat '{v}' (expected 0.10 or 1.1)"),
                })
            }
            "lazy_refcounts" => {
                if on_off(k, v)? {
                    bail!("lazy_refcounts=on is not supported: wisp keeps refcounts up to date");
                }
            }
            "refcount_bits" => {
                self.refcount_bits = Some(
                    v.parse()
                        .ok()
                        .filter(|b: &u32| b.is_power_of_two() && *b <= 64)
                        .with_context(|| {
                            format!("Invalid refcount_bits '{v}' (a power of two from 1 to 64)")
                        })?,
                )
            }
            "backing_file" => self.backing_file = Some(v.to_string()),
            "backing_fmt" => self.backing_fmt = Some(v.parse()?),
            "compression_type" => match v {
                "zlib" => {}
                "zstd" => bail!("compression_type=zstd is not supported for writing (use zlib)"),
                _ => bail!("Invalid compression_type '{v}' (expected zlib)"),
            },
            _ => bail!("Unknown option '{k}' (known: {KNOWN})"),
        }
        Ok(())
    }

    /// Merges `-b`/`-F` with `backing_file`/`backing_fmt`; they must agree.
    pub fn merge_backing(
        &self,
        mut file: Option<String>,
        mut format: Option<ImageFormat>,
    ) -> anyhow::Result<(Option<String>, Option<ImageFormat>)> {
        merge(&mut file, &self.backing_file, "backing file")?;
        merge(&mut format, &self.backing_fmt, "backing format")?;
        Ok((file, format))
    }

    /// Applies the qcow2 options onto `opts`; a backing file or format given
    /// both with `-b`/`-F` and with `-o` must agree.
    pub fn apply(&self, opts: &mut CreateOptions) -> anyhow::Result<()> {
        if let Some(cs) = self.cluster_size {
            opts.cluster_size = cs;
        }
        if let Some(p) = self.preallocation {
            opts.preallocation = p;
        }
        if let Some(v) = self.version {
            opts.version = v;
        }
        if let Some(b) = self.refcount_bits {
            opts.refcount_bits = b;
        }
        if opts.version == 2 && self.refcount_bits.is_some_and(|b| b != 16) {
            bail!("compat=0.10 images have 16-bit refcounts");
        }
        merge(&mut opts.backing_file, &self.backing_file, "backing file")?;
        merge(
            &mut opts.backing_format,
            &self.backing_fmt,
            "backing format",
        )?;
        Ok(())
    }
}

fn merge<T: Clone + PartialEq + std::fmt::Debug>(
    dst: &mut Option<T>,
    src: &Option<T>,
    what: &str,
) -> anyhow::Result<()> {
    match (dst.as_ref(), src) {
        (Some(a), Some(b)) if a != b => bail!("Conflicting {what}s: {a:?} and {b:?}"),
        (None, Some(b)) => *dst = Some(b.clone()),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> anyhow::Result<QemuOptions> {
        QemuOptions::parse(&[s.to_string()], ImageFormat::Qcow2)
    }

    #[test]
    fn test_parse_qemu_names() {
        let o = q("cluster_size=4k,compat=0.10,preallocation=metadata,lazy_refcounts=off").unwrap();
        assert_eq!(o.cluster_size, Some(4096));
        assert_eq!(o.version, Some(2));
        assert_eq!(o.preallocation, Some(Preallocation::Metadata));
        let o = q("refcount_bits=64,backing_file=a,,b.raw,backing_fmt=raw").unwrap();
        assert_eq!(o.refcount_bits, Some(64));
        assert_eq!(o.backing_file.as_deref(), Some("a,b.raw"));
        assert_eq!(o.backing_fmt, Some(ImageFormat::Raw));
    }

    #[test]
    fn test_values_wisp_cannot_honour_are_refused() {
        for (spec, needle) in [
            ("lazy_refcounts=on", "lazy_refcounts=on"),
            ("compression_type=zstd", "zstd"),
            ("preallocation=falloc", "falloc"),
            ("refcount_bits=3", "refcount_bits"),
            ("compat=2.0", "compat"),
            ("extended_l2=on", "Unknown option 'extended_l2'"),
            ("cluster_size", "name=value"),
        ] {
            let err = q(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
        let err = QemuOptions::parse(&["cluster_size=4k".into()], ImageFormat::Raw).unwrap_err();
        assert!(err.to_string().contains("not raw"), "{err}");
    }

    #[test]
    fn test_apply_merges_and_detects_conflicts() {
        let mut c = CreateOptions {
            backing_file: Some("a".into()),
            ..Default::default()
        };
        q("compat=1.1,refcount_bits=8")
            .unwrap()
            .apply(&mut c)
            .unwrap();
        assert_eq!((c.version, c.refcount_bits), (3, 8));
        assert!(q("backing_file=b").unwrap().apply(&mut c).is_err());
        let mut c = CreateOptions::default();
        assert!(q("compat=0.10,refcount_bits=8")
            .unwrap()
            .apply(&mut c)
            .is_err());
    }
}
