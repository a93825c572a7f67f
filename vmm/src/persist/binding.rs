// SPDX-License-Identifier: Apache-2.0
//! What ties a state file to its memory file: a [`MemoryBinding`] (random
//! snapshot id, generation, guest RAM length, creation time) recorded in the
//! state file, and the same binding in a one-page trailer after guest RAM in
//! the memory file.
//!
//! The trailer sits *after* RAM, at the page-aligned offset `ram_len`, so RAM
//! still starts at file offset 0 and each region is still mapped
//! `MAP_PRIVATE` straight from the file; the trailer page is never mapped.
//! Restore reads just that page (no checksum over guest RAM, which would
//! read the whole file and make restore time grow with memory size): the id
//! proves the two files were written by the same create, the length that
//! the file is complete.
//!
//! Trailer layout (little-endian), see `docs/snapshot-format.md`:
//!
//! | offset | size | field                                          |
//! |--------|------|------------------------------------------------|
//! | 0      | 8    | magic `b"WISPMEMT"`                            |
//! | 8      | 4    | trailer version (u32, 1)                       |
//! | 12     | 4    | state: 1 complete, 2 in-place diff in progress |
//! | 16     | 16   | snapshot id                                    |
//! | 32     | 8    | generation (u64)                               |
//! | 40     | 8    | guest RAM length in bytes (u64)                |
//! | 48     | 8    | creation time, seconds since the Unix epoch    |
//! | 56     | 4    | CRC-32 (IEEE) of bytes 0..56                   |
//! | 60     | 4036 | zero                                           |

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::memory::{MemoryFileError, Result};

/// Size of the memory file's trailer: one page.
pub const TRAILER_LEN: u64 = 4096;
/// The 8 bytes a memory file trailer starts with.
pub const TRAILER_MAGIC: [u8; 8] = *b"WISPMEMT";
/// The trailer version this build writes and reads.
pub const TRAILER_VERSION: u32 = 1;
const FIELDS_LEN: usize = 56;

/// Identifies one memory file written by one snapshot create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBinding {
    /// Random, new for every create (Full or Diff).
    pub id: [u8; 16],
    /// 0 for a Full snapshot, one more than its base for a Diff.
    pub generation: u64,
    /// Guest RAM bytes in the file (the trailer's offset).
    pub ram_len: u64,
    /// When it was written, seconds since the Unix epoch.
    pub created_unix: u64,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl MemoryBinding {
    /// A new binding (fresh random id) for a Full snapshot of `ram_len` bytes.
    pub fn new(ram_len: u64) -> Self {
        Self {
            id: super::files::random_bytes(),
            generation: 0,
            ram_len,
            created_unix: now_unix(),
        }
    }

    /// The binding of a Diff written on top of `self`: a fresh id, the next
    /// generation.
    pub fn successor(&self) -> Self {
        Self {
            generation: self.generation.wrapping_add(1),
            ..Self::new(self.ram_len)
        }
    }

    /// The id in hex.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the epoch.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl std::fmt::Display for MemoryBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "snapshot id {} (generation {}, {} bytes of guest RAM, written {})",
            self.id_hex(),
            self.generation,
            self.ram_len,
            utc(self.created_unix)
        )
    }
}

/// The state file's payload: the binding of its memory file, then the state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotFile<T> {
    /// The memory file this state belongs with.
    pub memory: MemoryBinding,
    /// The saved VM (or, in tests, any state).
    pub state: T,
}

/// Whether a memory file is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailerState {
    /// Completely written.
    Complete = 1,
    /// An in-place Diff started writing pages and did not finish.
    DiffInProgress = 2,
}

/// A memory file's trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Which snapshot the file holds.
    pub binding: MemoryBinding,
    /// Whether it is complete.
    pub state: TrailerState,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Trailer {
    /// The trailer page.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; TRAILER_LEN as usize];
        out[0..8].copy_from_slice(&TRAILER_MAGIC);
        out[8..12].copy_from_slice(&TRAILER_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(self.state as u32).to_le_bytes());
        out[16..32].copy_from_slice(&self.binding.id);
        out[32..40].copy_from_slice(&self.binding.generation.to_le_bytes());
        out[40..48].copy_from_slice(&self.binding.ram_len.to_le_bytes());
        out[48..56].copy_from_slice(&self.binding.created_unix.to_le_bytes());
        let crc = crc32fast::hash(&out[..FIELDS_LEN]);
        out[56..60].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a trailer page read from `path`; never panics.
    pub fn decode(page: &[u8], path: &Path) -> Result<Self> {
        let bad = |detail: String| MemoryFileError::BadTrailer {
            path: path.to_path_buf(),
            detail,
        };
        if page.len() < FIELDS_LEN + 4 {
            return Err(bad(format!("only {} bytes", page.len())));
        }
        if page[0..8] != TRAILER_MAGIC {
            return Err(bad(
                "no wisp trailer after guest RAM (not a wisp memory file, or one written by a wisp older than state format version 2)".into(),
            ));
        }
        let version = u32_at(page, 8);
        if version != TRAILER_VERSION {
            return Err(bad(format!(
                "trailer version {version}, this wisp reads version {TRAILER_VERSION}"
            )));
        }
        let (stored, computed) = (u32_at(page, 56), crc32fast::hash(&page[..FIELDS_LEN]));
        if stored != computed {
            return Err(bad(format!(
                "trailer CRC-32 is {computed:#010x}, the trailer says {stored:#010x}"
            )));
        }
        let state = match u32_at(page, 12) {
            1 => TrailerState::Complete,
            2 => TrailerState::DiffInProgress,
            s => return Err(bad(format!("unknown trailer state {s}"))),
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&page[16..32]);
        Ok(Self {
            binding: MemoryBinding {
                id,
                generation: u64_at(page, 32),
                ram_len: u64_at(page, 40),
                created_unix: u64_at(page, 48),
            },
            state,
        })
    }

    /// Writes the trailer at its place (`ram_len`) in `file`.
    pub fn write(&self, file: &File, path: &Path) -> Result<()> {
        file.write_all_at(&self.encode(), self.binding.ram_len)
            .map_err(|source| MemoryFileError::Io {
                what: "write the trailer of",
                path: path.to_path_buf(),
                source,
            })
    }

    /// Reads the trailer of `file`, whose guest RAM is `ram_len` bytes,
    /// checking first that the file is exactly RAM plus trailer long.
    pub fn read(file: &File, path: &Path, ram_len: u64) -> Result<Self> {
        let io = |what| {
            move |source| MemoryFileError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let found = file.metadata().map_err(io("stat"))?.len();
        let expected = ram_len.saturating_add(TRAILER_LEN);
        if found != expected {
            return Err(MemoryFileError::WrongSize {
                path: path.to_path_buf(),
                expected,
                found,
            });
        }
        let mut page = vec![0u8; TRAILER_LEN as usize];
        file.read_exact_at(&mut page, ram_len)
            .map_err(io("read the trailer of"))?;
        let t = Self::decode(&page, path)?;
        if t.binding.ram_len != ram_len {
            return Err(MemoryFileError::BadTrailer {
                path: path.to_path_buf(),
                detail: format!(
                    "the trailer says {} bytes of guest RAM, the file holds {ram_len}",
                    t.binding.ram_len
                ),
            });
        }
        Ok(t)
    }

    /// Reads the trailer of `file` and checks it is complete and holds
    /// `expected`.
    pub fn check(file: &File, path: &Path, expected: &MemoryBinding) -> Result<Self> {
        let t = Self::read(file, path, expected.ram_len)?;
        if t.binding != *expected {
            return Err(MemoryFileError::Mismatch {
                path: path.to_path_buf(),
                expected: *expected,
                found: t.binding,
            });
        }
        if t.state != TrailerState::Complete {
            return Err(MemoryFileError::Unfinished {
                path: path.to_path_buf(),
                found: t.binding,
            });
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailer() -> Trailer {
        Trailer {
            binding: MemoryBinding::new(8 << 20),
            state: TrailerState::Complete,
        }
    }

    #[test]
    fn test_trailer_round_trips_and_rejects_every_corruption() {
        let t = trailer();
        let page = t.encode();
        assert_eq!(page.len() as u64, TRAILER_LEN);
        let p = Path::new("m");
        assert_eq!(Trailer::decode(&page, p).unwrap(), t);
        for i in 0..60 {
            let mut m = page.clone();
            m[i] ^= 0x10;
            assert!(Trailer::decode(&m, p).is_err(), "byte {i} flipped");
        }
        for cut in 0..60 {
            assert!(Trailer::decode(&page[..cut], p).is_err(), "cut {cut}");
        }
        let err = Trailer::decode(&[0u8; 4096], p).unwrap_err();
        assert!(err.to_string().contains("no wisp trailer"), "{err}");
    }

    #[test]
    fn test_bindings_differ_and_successor_counts_generations() {
        let a = MemoryBinding::new(1 << 20);
        let b = MemoryBinding::new(1 << 20);
        assert_ne!(a.id, b.id);
        let s = a.successor();
        assert_eq!((s.generation, s.ram_len), (1, a.ram_len));
        assert_ne!(s.id, a.id);
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_420_587), "2026-12-04 21:43:07 UTC");
        assert!(a.to_string().contains(&a.id_hex()));
    }
}
