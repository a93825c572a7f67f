// SPDX-License-Identifier: Apache-2.0
//! The text descriptor: create type, parent CID and the extent list.
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=fffffffe
//! parentCID=ffffffff
//! createType="monolithicFlat"
//! RW 6144 FLAT "disk-flat.vmdk" 0
//! ```

use std::path::{Component, Path};

use super::error::VmdkError;
use super::header::MAX_CAPACITY_SECTORS;

/// Most extents a descriptor may list (each one is an open file).
pub const MAX_EXTENTS: usize = 1024;

/// What the first bytes of a standalone descriptor look like.
pub const SIGNATURE: &[u8] = b"# Disk DescriptorFile";

/// How an extent's data is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// A flat file (FLAT, or VMFS on ESXi): sector N is at `offset + N` of the file.
    Flat,
    /// A hosted sparse extent (`KDMV` header, grain directory and tables).
    Sparse,
    /// No file: reads as zeros.
    Zero,
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    pub sectors: u64,
    pub kind: ExtentKind,
    /// The type as written in the descriptor (FLAT, VMFS, SPARSE, ZERO).
    pub type_name: String,
    /// File name relative to the descriptor's directory (none for ZERO).
    pub file: Option<String>,
    /// Start of the extent in its file, in sectors (flat extents only).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub version: u32,
    pub cid: Option<u32>,
    pub create_type: String,
    pub extents: Vec<ExtentLine>,
}

/// Create types wisp reads (their extents are FLAT, VMFS, SPARSE or ZERO).
const SUPPORTED_TYPES: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
];

/// Create types that exist but that wisp does not read, and why.
const UNSUPPORTED_TYPES: &[(&str, &str)] = &[
    ("vmfsSparse", "ESX COWD delta disks"),
    ("seSparse", "space-efficient sparse delta disks"),
    ("vmfsRaw", "raw device mappings"),
    ("vmfsRawDeviceMap", "raw device mappings"),
    ("vmfsPassthroughRawDeviceMap", "raw device mappings"),
    ("fullDevice", "whole host devices"),
    ("partitionedDevice", "host device partitions"),
];

fn err(line: usize, why: impl Into<String>) -> VmdkError {
    VmdkError::Descriptor {
        line,
        why: why.into(),
    }
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

/// Checks that an extent file name stays in the descriptor's directory:
/// relative, without `..`, not empty.
pub fn check_file_name(line: usize, name: &str) -> Result<(), VmdkError> {
    if name.is_empty() {
        return Err(err(line, "empty extent file name"));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Err(err(
            line,
            format!("extent file \"{name}\" is an absolute path; wisp only opens extents next to the descriptor"),
        ));
    }
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(err(
            line,
            format!("extent file \"{name}\" leaves the descriptor's directory"),
        ));
    }
    Ok(())
}

fn parse_extent(line: usize, text: &str) -> Result<ExtentLine, VmdkError> {
    let mut rest = text;
    let mut token = || {
        let t = rest.trim_start();
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        rest = &t[end..];
        &t[..end]
    };
    let access = token();
    let sectors_s = token();
    let type_name = token().to_string();
    match access {
        "RW" | "RDONLY" => {}
        "NOACCESS" => return Err(err(line, "NOACCESS extents cannot be read")),
        a => return Err(err(line, format!("unknown extent access '{a}'"))),
    }
    let sectors: u64 = sectors_s.parse().map_err(|_| {
        err(
            line,
            format!("extent size '{sectors_s}' is not a number of sectors"),
        )
    })?;
    let kind = match type_name.as_str() {
        "FLAT" | "VMFS" => ExtentKind::Flat,
        "SPARSE" => ExtentKind::Sparse,
        "ZERO" => ExtentKind::Zero,
        "VMFSSPARSE" | "SESPARSE" | "VMFSRDM" | "VMFSRAW" => {
            return Err(VmdkError::Unsupported(format!(
                "descriptor line {line}: {type_name} extents are not supported"
            )))
        }
        t => return Err(err(line, format!("unknown extent type '{t}'"))),
    };
    let mut ext = ExtentLine {
        sectors,
        kind,
        type_name,
        file: None,
        offset: 0,
    };
    let rest = rest.trim();
    if kind == ExtentKind::Zero {
        return Ok(ext);
    }
    let Some(quoted) = rest.strip_prefix('"') else {
        return Err(err(line, "expected a quoted extent file name"));
    };
    let Some(close) = quoted.find('"') else {
        return Err(err(line, "unterminated extent file name"));
    };
    let name = &quoted[..close];
    check_file_name(line, name)?;
    ext.file = Some(name.to_string());
    let tail = quoted[close + 1..].trim();
    if !tail.is_empty() {
        if kind != ExtentKind::Flat {
            return Err(err(
                line,
                format!("unexpected '{tail}' after a {} extent", ext.type_name),
            ));
        }
        ext.offset = tail.parse().map_err(|_| {
            err(
                line,
                format!("extent offset '{tail}' is not a number of sectors"),
            )
        })?;
        if ext.offset > MAX_CAPACITY_SECTORS {
            return Err(err(
                line,
                format!("extent offset {} is larger than 64 TiB", ext.offset),
            ));
        }
    }
    Ok(ext)
}

fn check_create_type(t: &str) -> Result<(), VmdkError> {
    if SUPPORTED_TYPES.contains(&t) {
        return Ok(());
    }
    if let Some((_, what)) = UNSUPPORTED_TYPES.iter().find(|(n, _)| *n == t) {
        return Err(VmdkError::Unsupported(format!(
            "createType \"{t}\" ({what}) is not supported"
        )));
    }
    Err(VmdkError::Unsupported(format!(
        "unknown createType \"{t}\""
    )))
}

impl Descriptor {
    /// Parses descriptor text (an embedded descriptor ends at its first NUL).
    pub fn parse(bytes: &[u8]) -> Result<Descriptor, VmdkError> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end])
            .map_err(|e| VmdkError::Corrupt(format!("descriptor is not UTF-8 text: {e}")))?;
        let mut d = Descriptor {
            version: 0,
            cid: None,
            create_type: String::new(),
            extents: Vec::new(),
        };
        let mut total: u64 = 0;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if l.starts_with("RW ") || l.starts_with("RDONLY ") || l.starts_with("NOACCESS ") {
                if d.extents.len() == MAX_EXTENTS {
                    return Err(err(n, format!("more than {MAX_EXTENTS} extents")));
                }
                let e = parse_extent(n, l)?;
                total = total
                    .checked_add(e.sectors)
                    .filter(|t| *t <= MAX_CAPACITY_SECTORS)
                    .ok_or_else(|| err(n, "the extents add up to more than 64 TiB"))?;
                d.extents.push(e);
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                return Err(err(
                    n,
                    format!("expected key=value or an extent, found '{l}'"),
                ));
            };
            let v = unquote(v);
            match k.trim() {
                "version" => {
                    d.version = v
                        .parse()
                        .map_err(|_| err(n, format!("version '{v}' is not a number")))?;
                    if !(1..=3).contains(&d.version) {
                        return Err(err(
                            n,
                            format!("version {} is not supported (1 to 3)", d.version),
                        ));
                    }
                }
                "CID" => {
                    d.cid = Some(
                        u32::from_str_radix(v, 16)
                            .map_err(|_| err(n, format!("CID '{v}' is not hexadecimal")))?,
                    )
                }
                "parentCID" => {
                    let parent = u32::from_str_radix(v, 16)
                        .map_err(|_| err(n, format!("parentCID '{v}' is not hexadecimal")))?;
                    if parent != u32::MAX {
                        return Err(VmdkError::Unsupported(format!(
                            "this is a delta disk (parentCID={v}); wisp reads only base VMDKs: \
                             consolidate the snapshot chain first"
                        )));
                    }
                }
                "createType" => {
                    check_create_type(v)?;
                    d.create_type = v.to_string();
                }
                _ => {}
            }
        }
        if d.create_type.is_empty() {
            return Err(VmdkError::Corrupt("descriptor has no createType".into()));
        }
        if d.extents.is_empty() {
            return Err(VmdkError::Corrupt("descriptor lists no extents".into()));
        }
        Ok(d)
    }

    /// Virtual size in sectors: the sum of the extents.
    pub fn sectors(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=d78a0544\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 6144 FLAT \"a b-flat.vmdk\" 0\n\
        RDONLY 100 ZERO\nRW 50 VMFS \"c.vmdk\" 7\n\n#DDB\nddb.adapterType = \"ide\"\n";

    #[test]
    fn test_parse_flat_descriptor() {
        let d = Descriptor::parse(FLAT.as_bytes()).unwrap();
        assert_eq!(d.version, 1);
        assert_eq!(d.cid, Some(0xd78a0544));
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("a b-flat.vmdk"));
        assert_eq!(d.extents[1].kind, ExtentKind::Zero);
        assert_eq!(
            (d.extents[2].kind, d.extents[2].offset),
            (ExtentKind::Flat, 7)
        );
        assert_eq!(d.sectors(), 6294);
    }

    fn err_of(text: &str) -> String {
        Descriptor::parse(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn test_parse_refuses_paths_outside_the_directory() {
        let base = "createType=\"monolithicFlat\"\n";
        assert!(err_of(&format!("{base}RW 1 FLAT \"/etc/shadow\" 0")).contains("absolute"));
        assert!(err_of(&format!("{base}RW 1 FLAT \"../x\" 0")).contains("leaves"));
        assert!(err_of(&format!("{base}RW 1 FLAT \"a/../../x\" 0")).contains("leaves"));
        assert!(err_of(&format!("{base}RW 1 FLAT \"\" 0")).contains("empty"));
    }

    #[test]
    fn test_parse_hostile_lines_name_the_line() {
        let base = "createType=\"monolithicFlat\"\n";
        assert!(err_of(&format!("{base}RW lots FLAT \"x\" 0")).contains("line 2"));
        assert!(err_of(&format!("{base}RW 1 FLAT \"x")).contains("unterminated"));
        assert!(err_of(&format!("{base}RW 1 FLAT x")).contains("quoted"));
        assert!(err_of(&format!("{base}RW 1 BOGUS \"x\"")).contains("BOGUS"));
        assert!(err_of(&format!("{base}NOACCESS 1 FLAT \"x\"")).contains("NOACCESS"));
        assert!(err_of(&format!("{base}RW 1 FLAT \"x\" zz")).contains("offset"));
        assert!(err_of(&format!("{base}RW 1 SPARSE \"x\" 5")).contains("unexpected"));
        assert!(err_of(&format!("{base}RW 99999999999999999 FLAT \"x\"")).contains("64 TiB"));
        assert!(err_of(&format!("{base}just words")).contains("key=value"));
        assert!(err_of("RW 1 FLAT \"x\"").contains("createType"));
        assert!(err_of(base).contains("no extents"));
    }

    #[test]
    fn test_parse_refuses_unsupported_kinds_by_name() {
        assert!(err_of("createType=\"vmfsSparse\"\nRW 1 VMFSSPARSE \"x\"").contains("COWD"));
        assert!(err_of("createType=\"fancy\"\n").contains("fancy"));
        assert!(err_of("createType=\"vmfs\"\nRW 1 VMFSRDM \"x\"").contains("VMFSRDM"));
        let delta = "parentCID=12345678\ncreateType=\"monolithicSparse\"\nRW 1 SPARSE \"x\"";
        assert!(err_of(delta).contains("delta disk"));
    }

    #[test]
    fn test_parse_too_many_extents_is_refused() {
        let mut t = String::from("createType=\"twoGbMaxExtentFlat\"\n");
        for i in 0..=MAX_EXTENTS {
            t.push_str(&format!("RW 1 FLAT \"f{i}\" 0\n"));
        }
        assert!(err_of(&t).contains("more than 1024"));
    }
}
