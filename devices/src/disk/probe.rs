// SPDX-License-Identifier: Apache-2.0
//! Format probing: the magic numbers of the formats wisp reads, and of the
//! ones it does not, so those are refused by name instead of read as raw.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{qcow2, vmdk, DiskError, ImageFormat};

/// What a file's first bytes (and last sector) say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// A format wisp opens.
    Known(ImageFormat),
    /// A format wisp recognises but cannot read, by its qemu-img name.
    Unsupported(&'static str),
}

/// Magic numbers at offset 0 of formats wisp does not read.
const AT_START: &[(&[u8], &str)] = &[
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"QED\0", "qed"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
];

/// The VDI signature, little-endian at offset 0x40.
const VDI_SIGNATURE: u32 = 0xbeda_107f;

/// Classifies a file from its first bytes `head` (up to 512) and its last
/// sector `tail` (fixed VHDs and DMGs keep their footer there).
pub fn classify(head: &[u8], tail: Option<&[u8; 512]>) -> Probed {
    if head.len() >= 8 && head[..4] == qcow2::MAGIC {
        let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        return if version == 1 {
            Probed::Unsupported("qcow (version 1)")
        } else {
            Probed::Known(ImageFormat::Qcow2)
        };
    }
    if vmdk::looks_like_vmdk(head) {
        return Probed::Known(ImageFormat::Vmdk);
    }
    if let Some((_, name)) = AT_START.iter().find(|(m, _)| head.starts_with(m)) {
        return Probed::Unsupported(name);
    }
    if head.len() >= 0x44
        && u32::from_le_bytes([head[0x40], head[0x41], head[0x42], head[0x43]]) == VDI_SIGNATURE
    {
        return Probed::Unsupported("vdi");
    }
    if let Some(t) = tail {
        if t.starts_with(b"conectix") {
            return Probed::Unsupported("vpc (fixed VHD)");
        }
        if t.starts_with(b"koly") {
            return Probed::Unsupported("dmg");
        }
    }
    Probed::Known(ImageFormat::Raw)
}

fn read_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Probes an open file; unsupported formats become [`DiskError::UnsupportedFormat`].
pub fn probe_file(file: &File, path: &Path) -> Result<ImageFormat, DiskError> {
    let io_err = |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 512];
    let n = read_full(file, &mut head, 0).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut tail = [0u8; 512];
    let tail = if len >= 1024 && read_full(file, &mut tail, len - 512).map_err(io_err)? == 512 {
        Some(&tail)
    } else {
        None
    };
    match classify(&head[..n], tail) {
        Probed::Known(f) => Ok(f),
        Probed::Unsupported(format) => Err(DiskError::UnsupportedFormat {
            path: path.to_path_buf(),
            format,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(off: usize, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 512];
        v[off..off + bytes.len()].copy_from_slice(bytes);
        v
    }

    #[test]
    fn test_classify_known_and_unsupported_magics() {
        let cases: &[(Vec<u8>, Probed)] = &[
            (
                at(0, b"QFI\xfb\0\0\0\x03"),
                Probed::Known(ImageFormat::Qcow2),
            ),
            (
                at(0, b"QFI\xfb\0\0\0\x01"),
                Probed::Unsupported("qcow (version 1)"),
            ),
            (at(0, b"KDMV"), Probed::Known(ImageFormat::Vmdk)),
            (at(0, b"COWD"), Probed::Known(ImageFormat::Vmdk)),
            (
                at(0, b"# Disk DescriptorFile\n"),
                Probed::Known(ImageFormat::Vmdk),
            ),
            (at(0, b"vhdxfile"), Probed::Unsupported("vhdx")),
            (at(0, b"conectix"), Probed::Unsupported("vpc")),
            (at(0, b"QED\0"), Probed::Unsupported("qed")),
            (at(0, b"LUKS\xba\xbe\0\x01"), Probed::Unsupported("luks")),
            (
                at(0x40, &VDI_SIGNATURE.to_le_bytes()),
                Probed::Unsupported("vdi"),
            ),
            (at(0, b"WithoutFreeSpace"), Probed::Unsupported("parallels")),
            (vec![0u8; 512], Probed::Known(ImageFormat::Raw)),
            (Vec::new(), Probed::Known(ImageFormat::Raw)),
        ];
        for (head, want) in cases {
            assert_eq!(
                classify(head, None),
                *want,
                "{:?}",
                &head[..head.len().min(8)]
            );
        }
    }

    #[test]
    fn test_classify_footers_in_the_last_sector() {
        let mut t = [0u8; 512];
        t[..8].copy_from_slice(b"conectix");
        assert_eq!(
            classify(&[0; 512], Some(&t)),
            Probed::Unsupported("vpc (fixed VHD)")
        );
        t[..8].copy_from_slice(b"koly\0\0\0\x04");
        assert_eq!(classify(&[0; 512], Some(&t)), Probed::Unsupported("dmg"));
    }

    #[test]
    fn test_probe_file_names_the_unsupported_format() {
        let dir = crate::disk::testutil::TempDir::new();
        let p = dir.join("x.vdi");
        let mut data = at(0x40, &VDI_SIGNATURE.to_le_bytes());
        data.resize(4096, 0);
        std::fs::write(&p, data).unwrap();
        let err = probe_file(&File::open(&p).unwrap(), &p).unwrap_err();
        assert!(err.to_string().contains("vdi image"), "{err}");
    }
}
