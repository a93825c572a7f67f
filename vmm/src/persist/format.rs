// SPDX-License-Identifier: Apache-2.0
//! The snapshot state file: a fixed header (magic, format version,
//! architecture, payload length, CRC-32) followed by one postcard-encoded
//! payload, written atomically. A snapshot's payload is a
//! [`SnapshotFile`](super::binding::SnapshotFile): the binding of its memory
//! file, then the microVM state.
//!
//! Layout (all integers little-endian), see `docs/snapshot-format.md`:
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 8    | magic `b"WISPSNAP"`                     |
//! | 8      | 4    | format version (u32)                    |
//! | 12     | 8    | architecture tag, NUL-padded (`x86_64`) |
//! | 20     | 8    | payload length in bytes (u64)           |
//! | 28     | 4    | CRC-32 (IEEE) of the payload            |
//! | 32     | len  | payload (postcard)                      |

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::files::{check_target, open_regular, parent_dir, sync_dir, FileError, TempFile};

/// The 8 bytes every wisp state file starts with.
pub const MAGIC: [u8; 8] = *b"WISPSNAP";
/// The format version this build writes. Version 2 binds the state file to
/// its memory file (`SnapshotFile` payload, memory file trailer).
pub const FORMAT_VERSION: u32 = 2;
/// Every format version this build can read.
pub const SUPPORTED_VERSIONS: &[u32] = &[2];
/// The version a live-migration stream's state (the microVM state tree,
/// without a memory binding) is framed with. Version 2 changed only the
/// snapshot file's payload, not the tree, so streams stay at 1 and a
/// migration between this build and one before the binding still works. A
/// change to the state tree bumps both this and [`FORMAT_VERSION`].
pub const STREAM_VERSION: u32 = 1;
/// Every stream state version this build can read.
pub const STREAM_SUPPORTED_VERSIONS: &[u32] = &[1];
/// The architecture tag of this build.
pub const ARCH: &str = "x86_64";
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 32;
/// Largest payload a reader accepts (state is small; this bounds allocation on
/// hostile input).
pub const MAX_PAYLOAD_LEN: u64 = 64 << 20;

const ARCH_LEN: usize = 8;

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A file-system operation failed.
    #[error("Cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The path cannot be written or read (not a regular file, ...).
    #[error(transparent)]
    File(#[from] FileError),
    /// The state could not be encoded.
    #[error("Cannot encode snapshot state: {0}")]
    Encode(String),
    /// The file ends before its header or payload does.
    #[error("Snapshot state file {path} is truncated: {needed} bytes expected, {found} present")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header says must be there.
        needed: u64,
        /// Bytes actually there.
        found: u64,
    },
    /// The magic is wrong: not a wisp snapshot.
    #[error(
        "{path} is not a wisp snapshot state file (magic {found:02x?}, expected \"WISPSNAP\")"
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first 8 bytes found.
        found: [u8; 8],
    },
    /// The format version is not one this build reads.
    #[error(
        "Snapshot state file {path} has format version {found}; this wisp reads versions {supported:?}{}",
        version_hint(*found)
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Versions this build reads.
        supported: &'static [u32],
    },
    /// The snapshot was taken on another architecture.
    #[error("Snapshot state file {path} is for architecture {found:?}, this host is {expected:?}")]
    WrongArch {
        /// The file.
        path: PathBuf,
        /// Architecture in the file.
        found: String,
        /// This build's architecture.
        expected: &'static str,
    },
    /// The payload length is beyond what a reader accepts.
    #[error("Snapshot state file {path} declares a {found}-byte payload (at most {max} allowed)")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Declared length.
        found: u64,
        /// Limit.
        max: u64,
    },
    /// Bytes follow the payload.
    #[error("Snapshot state file {path} has {extra} bytes after its payload")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// How many.
        extra: u64,
    },
    /// The payload's CRC does not match the header.
    #[error(
        "Snapshot state file {path} is corrupt: payload CRC-32 is {found:#010x}, header says {expected:#010x}"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// CRC in the header.
        expected: u32,
        /// CRC computed over the payload.
        found: u32,
    },
    /// The payload passed the checksum but does not decode as the expected type.
    #[error("Snapshot state file {path} has an undecodable payload: {detail}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What postcard said.
        detail: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, FormatError>;

/// What to do about a state file of an unsupported version.
fn version_hint(found: u32) -> &'static str {
    if found == 1 {
        " (version 1 snapshots do not bind their memory file, so this wisp cannot tell whether the pair belongs together: restore it with the wisp release that took it, or take a new snapshot)"
    } else if found > FORMAT_VERSION {
        " (it was written by a newer wisp)"
    } else {
        ""
    }
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FormatError + 'a {
    move |source| FormatError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn arch_tag() -> [u8; ARCH_LEN] {
    let mut tag = [0u8; ARCH_LEN];
    tag[..ARCH.len()].copy_from_slice(ARCH.as_bytes());
    tag
}

/// Encodes `state` as a complete state file image (header + payload).
pub fn encode_state<T: Serialize>(state: &T) -> Result<Vec<u8>> {
    encode_state_as(state, FORMAT_VERSION)
}

/// Encodes `state` framed with format version `version` (a migration
/// stream uses [`STREAM_VERSION`]).
pub fn encode_state_as<T: Serialize>(state: &T, version: u32) -> Result<Vec<u8>> {
    let payload = postcard::to_stdvec(state).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&arch_tag());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Decodes a state file image read from `path` (used only in messages).
///
/// Checks run in order: magic, version, architecture, length, CRC, payload,
/// so the error names the first thing wrong. Never panics on any input.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    decode_state_with(bytes, path, SUPPORTED_VERSIONS)
}

/// [`decode_state`] accepting the versions in `supported` (a migration
/// stream's are [`STREAM_SUPPORTED_VERSIONS`]).
pub fn decode_state_with<T: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    supported: &'static [u32],
) -> Result<T> {
    let path_buf = || path.to_path_buf();
    let found = bytes.len() as u64;
    let truncated = |needed: u64| FormatError::Truncated {
        path: path_buf(),
        needed,
        found,
    };
    // Magic first, so a short non-wisp file is called "not a snapshot" only
    // once we have seen enough of it to say so.
    if bytes.len() < MAGIC.len() {
        if !MAGIC.starts_with(bytes) {
            let mut m = [0u8; 8];
            m[..bytes.len()].copy_from_slice(bytes);
            return Err(FormatError::BadMagic {
                path: path_buf(),
                found: m,
            });
        }
        return Err(truncated(HEADER_LEN as u64));
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[..8]);
    if magic != MAGIC {
        return Err(FormatError::BadMagic {
            path: path_buf(),
            found: magic,
        });
    }
    if bytes.len() < 12 {
        return Err(truncated(HEADER_LEN as u64));
    }
    let version = le_u32(&bytes[8..12]);
    if !supported.contains(&version) {
        return Err(FormatError::UnsupportedVersion {
            path: path_buf(),
            found: version,
            supported,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(truncated(HEADER_LEN as u64));
    }
    let arch = &bytes[12..12 + ARCH_LEN];
    if arch != arch_tag() {
        let end = arch.iter().position(|&b| b == 0).unwrap_or(ARCH_LEN);
        return Err(FormatError::WrongArch {
            path: path_buf(),
            found: String::from_utf8_lossy(&arch[..end]).into_owned(),
            expected: ARCH,
        });
    }
    let len = le_u64(&bytes[20..28]);
    if len > MAX_PAYLOAD_LEN {
        return Err(FormatError::TooLarge {
            path: path_buf(),
            found: len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let expected_crc = le_u32(&bytes[28..32]);
    let body = &bytes[HEADER_LEN..];
    // `len` <= MAX_PAYLOAD_LEN, so it fits usize and the addition cannot wrap.
    let len_usize = len as usize;
    if body.len() < len_usize {
        return Err(truncated(HEADER_LEN as u64 + len));
    }
    if body.len() > len_usize {
        return Err(FormatError::TrailingBytes {
            path: path_buf(),
            extra: (body.len() - len_usize) as u64,
        });
    }
    let crc = crc32fast::hash(body);
    if crc != expected_crc {
        return Err(FormatError::Checksum {
            path: path_buf(),
            expected: expected_crc,
            found: crc,
        });
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(FormatError::Decode {
            path: path_buf(),
            detail: format!("{} bytes left over after the state", rest.len()),
        }),
        Err(e) => Err(FormatError::Decode {
            path: path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file (mode 0600) in the
/// same directory is written and fsynced, renamed over `path`, and the
/// directory is fsynced. A crash at any point leaves either the old file or
/// the new one, never a mix; on error the temporary file is removed. `path`
/// must be a regular file or a new name (see `files::check_target`).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_atomic_with(path, |f, tmp| {
        f.write_all(bytes).map_err(io_err("write", tmp))
    })
}

/// Atomic replace of `path`, with `fill` writing the content into the
/// temporary file (given with its path for messages).
pub(crate) fn write_file_atomic_with<E, F>(path: &Path, fill: F) -> std::result::Result<(), E>
where
    E: From<FormatError>,
    F: FnOnce(&mut std::fs::File, &Path) -> std::result::Result<(), E>,
{
    check_target(path).map_err(FormatError::from)?;
    let mut tmp = TempFile::create(path).map_err(FormatError::from)?;
    let tmp_path = tmp.path.clone();
    fill(&mut tmp.file, &tmp_path)?;
    tmp.sync().map_err(FormatError::from)?;
    tmp.rename_to(path).map_err(FormatError::from)?;
    sync_dir(parent_dir(path)).map_err(FormatError::from)?;
    Ok(())
}

/// Serialises `state` and writes it atomically to `path` as a state file.
pub fn write_state_file<T: Serialize>(path: &Path, state: &T) -> Result<()> {
    let bytes = encode_state(state)?;
    write_file_atomic(path, &bytes)
}

/// Reads and validates the state file at `path`.
pub fn read_state_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let mut f = open_regular(path, false)?;
    // Read at most header + limit + 1 bytes, so a huge file cannot exhaust
    // memory and an oversize one is still reported.
    let mut bytes = Vec::new();
    (&mut f)
        .take(HEADER_LEN as u64 + MAX_PAYLOAD_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    decode_state(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
        flag: bool,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm0".into(),
            values: (0..100).collect(),
            flag: true,
        }
    }

    fn decode(bytes: &[u8]) -> Result<Sample> {
        decode_state(bytes, Path::new("t.state"))
    }

    #[test]
    fn test_state_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.state");
        write_state_file(&p, &sample()).unwrap();
        assert_eq!(read_state_file::<Sample>(&p).unwrap(), sample());
        // No temporary left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn test_state_file_truncated_at_every_boundary_is_refused() {
        let img = encode_state(&sample()).unwrap();
        for cut in [0, 4, 8, 10, 12, 16, 20, 24, 28, 31, 32, 40, img.len() - 1] {
            match decode(&img[..cut]) {
                Err(FormatError::Truncated { needed, found, .. }) => {
                    assert_eq!(found, cut as u64);
                    assert!(needed > found);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn test_state_file_every_truncation_is_an_error() {
        let img = encode_state(&sample()).unwrap();
        for cut in 0..img.len() {
            assert!(decode(&img[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn test_state_file_flipped_payload_byte_is_checksum_error() {
        let mut img = encode_state(&sample()).unwrap();
        img[HEADER_LEN + 5] ^= 0x40;
        assert!(matches!(decode(&img), Err(FormatError::Checksum { .. })));
        let msg = decode(&img).unwrap_err().to_string();
        assert!(msg.contains("corrupt"), "{msg}");
    }

    #[test]
    fn test_state_file_wrong_magic_is_refused() {
        let mut img = encode_state(&sample()).unwrap();
        img[0] = b'X';
        let err = decode(&img).unwrap_err();
        assert!(matches!(err, FormatError::BadMagic { .. }));
        assert!(err.to_string().contains("not a wisp snapshot"));
        assert!(matches!(
            decode(b"{\"json\"}"),
            Err(FormatError::BadMagic { .. })
        ));
        assert!(matches!(decode(b"ELF"), Err(FormatError::BadMagic { .. })));
    }

    #[test]
    fn test_state_file_wrong_version_names_supported_versions() {
        let mut img = encode_state(&sample()).unwrap();
        img[8..12].copy_from_slice(&7u32.to_le_bytes());
        let err = decode(&img).unwrap_err();
        assert!(matches!(
            err,
            FormatError::UnsupportedVersion { found: 7, .. }
        ));
        assert!(err.to_string().contains("reads versions [2]"), "{err}");
        let mut img = encode_state(&sample()).unwrap();
        img[8..12].copy_from_slice(&1u32.to_le_bytes());
        let err = decode(&img).unwrap_err().to_string();
        assert!(
            err.contains("format version 1") && err.contains("reads versions [2]"),
            "{err}"
        );
        assert!(err.contains("do not bind their memory file"), "{err}");
    }

    #[test]
    fn test_stream_state_keeps_version_1_and_is_not_a_snapshot_file() {
        let img = encode_state_as(&sample(), STREAM_VERSION).unwrap();
        assert_eq!(img[8..12], 1u32.to_le_bytes());
        let p = Path::new("migration stream");
        let got: Sample = decode_state_with(&img, p, STREAM_SUPPORTED_VERSIONS).unwrap();
        assert_eq!(got, sample());
        // Neither is taken for the other.
        assert!(matches!(
            decode(&img),
            Err(FormatError::UnsupportedVersion { found: 1, .. })
        ));
        let snap = encode_state(&sample()).unwrap();
        assert!(matches!(
            decode_state_with::<Sample>(&snap, p, STREAM_SUPPORTED_VERSIONS),
            Err(FormatError::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn test_state_file_wrong_arch_is_refused() {
        let mut img = encode_state(&sample()).unwrap();
        img[12..20].copy_from_slice(b"aarch64\0");
        let err = decode(&img).unwrap_err();
        match &err {
            FormatError::WrongArch { found, .. } => assert_eq!(found, "aarch64"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_state_file_trailing_bytes_and_oversize_are_refused() {
        let mut img = encode_state(&sample()).unwrap();
        img.push(0);
        assert!(matches!(
            decode(&img),
            Err(FormatError::TrailingBytes { extra: 1, .. })
        ));
        let mut img = encode_state(&sample()).unwrap();
        img[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&img), Err(FormatError::TooLarge { .. })));
    }

    #[test]
    fn test_state_file_wrong_type_is_decode_error() {
        let img = encode_state(&(1u8, 2u8)).unwrap();
        assert!(matches!(decode(&img), Err(FormatError::Decode { .. })));
    }

    #[test]
    fn test_state_file_failed_write_keeps_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.state");
        write_state_file(&p, &sample()).unwrap();
        let before = std::fs::read(&p).unwrap();
        // Inject a failure after part of the new content is written.
        let err = write_file_atomic_with::<FormatError, _>(&p, |f, _| {
            f.write_all(b"WISPSNAP partial").unwrap();
            Err(FormatError::Encode("injected".into()))
        })
        .unwrap_err();
        assert!(matches!(err, FormatError::Encode(_)));
        assert_eq!(std::fs::read(&p).unwrap(), before);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A directory that does not exist fails cleanly too.
        let bad = dir.path().join("missing/vm.state");
        let err = write_state_file(&bad, &sample()).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        // Not over a directory, a device or a symbolic link either.
        for bad in [dir.path(), Path::new("/dev/null")] {
            let err = write_state_file(bad, &sample()).unwrap_err();
            assert!(matches!(err, FormatError::File(_)), "{err}");
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let err = write_state_file(&link, &sample()).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }
}
