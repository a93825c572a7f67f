// SPDX-License-Identifier: Apache-2.0
//! The migration wire protocol: CRC-checked frames carrying typed messages.
//!
//! A frame is `tag: u32 LE | len: u32 LE | payload[len] | crc: u32 LE`, the
//! CRC-32 covering tag, length and payload. `Hello` and `Pages` have fixed
//! binary layouts; the other messages are postcard. Decoding never panics:
//! every malformed input becomes a [`ProtocolError`].

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::auth::{AuthBytes, AUTH_LEN};
use super::config::MigrationConfig;

/// First bytes of every `Hello`.
pub const MAGIC: [u8; 8] = *b"WISPMIGR";
/// The protocol version this build speaks. Independent of the snapshot
/// state format version (`persist::format::FORMAT_VERSION`).
/// Version 2 added the `Ready`/`Go` commit: version 1 ran the guest on the
/// receiver before the source knew, so a link break then left two copies.
/// Version 3 added the `Challenge`/`Auth`/`AuthOk` exchange (the optional
/// migration token) after the `Hello`s.
pub const PROTOCOL_VERSION: u32 = 3;
/// Protocol versions this build accepts from a peer.
pub const SUPPORTED_VERSIONS: &[u32] = &[3];
/// Page size of `Pages` frames.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: u32 = 256;
/// Most bytes of state in one `State` frame.
pub const MAX_STATE_CHUNK: usize = 1 << 20;
/// Largest payload a decoder accepts.
pub const MAX_FRAME_PAYLOAD: u32 = 2 << 20;
/// Frame header length (tag + len).
pub const HEADER_LEN: usize = 8;
/// Longest version string in `Hello`.
const MAX_VERSION_STRING: usize = 256;
/// `Pages` header: region u32, first_page u64, count u32.
const PAGES_HEADER: usize = 16;

/// Why a frame or message could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream ended inside a frame, or before one.
    #[error("Migration stream ended unexpectedly")]
    Truncated,
    /// A read or write failed.
    #[error("Migration stream I/O failed: {0}")]
    Io(#[source] io::Error),
    /// A read or write timed out.
    #[error("Migration stream timed out")]
    Timeout,
    /// The CRC does not match the frame.
    #[error("Migration frame CRC mismatch: frame says {stored:#010x}, data has {computed:#010x}")]
    BadCrc {
        /// CRC stored in the frame.
        stored: u32,
        /// CRC of the received bytes.
        computed: u32,
    },
    /// The frame is longer than [`MAX_FRAME_PAYLOAD`].
    #[error("Migration frame of {len} bytes exceeds the {max}-byte limit")]
    Oversize {
        /// Declared payload length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The tag names no known message.
    #[error("Unknown migration message tag {0}")]
    UnknownTag(u32),
    /// `Hello` does not start with [`MAGIC`].
    #[error("Not a wisp migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The peer speaks a protocol version this build does not.
    #[error("Unsupported migration protocol version {theirs} (this build speaks {ours:?})")]
    UnsupportedVersion {
        /// The peer's version.
        theirs: u32,
        /// Versions we accept.
        ours: &'static [u32],
    },
    /// A payload does not match its message's layout.
    #[error("Malformed {message} message: {reason}")]
    Malformed {
        /// The message kind.
        message: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl ProtocolError {
    /// Classifies an I/O error: EOF is truncation, timeouts are timeouts.
    pub fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => Self::Truncated,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout,
            _ => Self::Io(e),
        }
    }
}

type Result<T> = std::result::Result<T, ProtocolError>;

fn malformed(message: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        message,
        reason: reason.into(),
    }
}

/// The opening message of each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Must be [`MAGIC`].
    pub magic: [u8; 8],
    /// The sender's protocol version.
    pub protocol_version: u32,
    /// The wisp release that produced it (informational).
    pub wisp_version: String,
}

impl Hello {
    /// This build's `Hello`.
    pub fn ours() -> Self {
        Self {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            wisp_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Checks magic and version.
    pub fn check(&self) -> Result<()> {
        if self.magic != MAGIC {
            return Err(ProtocolError::BadMagic(self.magic));
        }
        if !SUPPORTED_VERSIONS.contains(&self.protocol_version) {
            return Err(ProtocolError::UnsupportedVersion {
                theirs: self.protocol_version,
                ours: SUPPORTED_VERSIONS,
            });
        }
        Ok(())
    }
}

/// A run of pages of one region. Page `i` of the run (guest page
/// `first_page + i` of region `region`) is in `data` when bit `i` of
/// `present` is set, and is all zeros otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pages {
    /// Region index, in guest-address order.
    pub region: u32,
    /// First page, counted from the region's start.
    pub first_page: u64,
    /// Number of pages (1..=[`MAX_PAGES_PER_FRAME`]).
    pub count: u32,
    /// Bitmap of `count` bits (LSB first): which pages carry data.
    pub present: Vec<u8>,
    /// The non-zero pages, in order, [`PAGE_SIZE`] bytes each.
    pub data: Vec<u8>,
}

impl Pages {
    /// Whether page `i` of the run carries data.
    pub fn is_present(&self, i: u32) -> bool {
        self.present
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Both sides, first: magic and version.
    Hello(Hello),
    /// Receiver, after its `Hello`: a fresh nonce for the sender's proof.
    Challenge {
        /// The receiver's nonce.
        nonce: AuthBytes,
    },
    /// Sender: its own nonce and, if it has a token, its proof.
    Auth {
        /// The sender's nonce.
        nonce: AuthBytes,
        /// HMAC of both nonces under the token (sender's label).
        proof: Option<AuthBytes>,
    },
    /// Receiver: the sender is accepted; the receiver's proof if it has a
    /// token.
    AuthOk {
        /// HMAC of both nonces under the token (receiver's label).
        proof: Option<AuthBytes>,
    },
    /// Sender: what is being migrated.
    Config(MigrationConfig),
    /// Receiver: the configuration fits; send memory.
    Accept,
    /// Receiver: the configuration does not fit, and why.
    Refuse {
        /// Every difference found.
        reason: String,
    },
    /// Sender: guest memory.
    Pages(Pages),
    /// Sender: a chunk of the opaque device and vCPU state; chunks are
    /// concatenated in order.
    State(Vec<u8>),
    /// Sender: everything has been sent.
    Complete,
    /// Receiver: the guest is restored here, paused, waiting for `Go`.
    Ready,
    /// Sender: the commit point. The source will not run the guest again;
    /// the receiver runs it.
    Go,
    /// Receiver: the guest runs here.
    Running,
    /// Sender: the migration is abandoned.
    Cancel {
        /// Why.
        reason: String,
    },
    /// Either side: a failure ends the migration.
    Error {
        /// What failed.
        message: String,
    },
}

/// Message tags on the wire.
pub mod tag {
    /// [`super::Message::Hello`].
    pub const HELLO: u32 = 1;
    /// [`super::Message::Config`].
    pub const CONFIG: u32 = 2;
    /// [`super::Message::Accept`].
    pub const ACCEPT: u32 = 3;
    /// [`super::Message::Refuse`].
    pub const REFUSE: u32 = 4;
    /// [`super::Message::Pages`].
    pub const PAGES: u32 = 5;
    /// [`super::Message::State`].
    pub const STATE: u32 = 6;
    /// [`super::Message::Complete`].
    pub const COMPLETE: u32 = 7;
    /// [`super::Message::Running`].
    pub const RUNNING: u32 = 8;
    /// [`super::Message::Cancel`].
    pub const CANCEL: u32 = 9;
    /// [`super::Message::Error`].
    pub const ERROR: u32 = 10;
    /// [`super::Message::Ready`].
    pub const READY: u32 = 11;
    /// [`super::Message::Go`].
    pub const GO: u32 = 12;
    /// [`super::Message::Challenge`].
    pub const CHALLENGE: u32 = 13;
    /// [`super::Message::Auth`].
    pub const AUTH: u32 = 14;
    /// [`super::Message::AuthOk`].
    pub const AUTH_OK: u32 = 15;
}

#[derive(Serialize, Deserialize)]
struct Reason {
    text: String,
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Challenge { .. } => "Challenge",
            Message::Auth { .. } => "Auth",
            Message::AuthOk { .. } => "AuthOk",
            Message::Config(_) => "Config",
            Message::Accept => "Accept",
            Message::Refuse { .. } => "Refuse",
            Message::Pages(_) => "Pages",
            Message::State(_) => "State",
            Message::Complete => "Complete",
            Message::Ready => "Ready",
            Message::Go => "Go",
            Message::Running => "Running",
            Message::Cancel { .. } => "Cancel",
            Message::Error { .. } => "Error",
        }
    }

    /// Encodes the message as one complete frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut f = FrameBuf::default();
        match self {
            Message::Hello(h) => {
                f.begin(tag::HELLO);
                f.put(&h.magic);
                f.put(&h.protocol_version.to_le_bytes());
                let v = h.wisp_version.as_bytes();
                let v = &v[..v.len().min(MAX_VERSION_STRING)];
                f.put(&(v.len() as u16).to_le_bytes());
                f.put(v);
            }
            Message::Challenge { nonce } => {
                f.begin(tag::CHALLENGE);
                f.put(nonce);
            }
            Message::Auth { nonce, proof } => {
                f.begin(tag::AUTH);
                f.put(nonce);
                put_proof(&mut f, proof);
            }
            Message::AuthOk { proof } => {
                f.begin(tag::AUTH_OK);
                put_proof(&mut f, proof);
            }
            Message::Config(c) => {
                f.begin(tag::CONFIG);
                f.put_postcard(c);
            }
            Message::Accept => f.begin(tag::ACCEPT),
            Message::Refuse { reason } => {
                f.begin(tag::REFUSE);
                f.put_postcard(&Reason {
                    text: reason.clone(),
                });
            }
            Message::Pages(p) => {
                f.begin(tag::PAGES);
                f.put(&p.region.to_le_bytes());
                f.put(&p.first_page.to_le_bytes());
                f.put(&p.count.to_le_bytes());
                f.put(&p.present);
                f.put(&p.data);
            }
            Message::State(b) => {
                f.begin(tag::STATE);
                f.put(b);
            }
            Message::Complete => f.begin(tag::COMPLETE),
            Message::Ready => f.begin(tag::READY),
            Message::Go => f.begin(tag::GO),
            Message::Running => f.begin(tag::RUNNING),
            Message::Cancel { reason } => {
                f.begin(tag::CANCEL);
                f.put_postcard(&Reason {
                    text: reason.clone(),
                });
            }
            Message::Error { message } => {
                f.begin(tag::ERROR);
                f.put_postcard(&Reason {
                    text: message.clone(),
                });
            }
        }
        f.finish();
        f.buf
    }

    /// Decodes a frame's payload.
    pub fn decode(tag: u32, payload: &[u8]) -> Result<Message> {
        let empty = |m: Message| {
            if payload.is_empty() {
                Ok(m)
            } else {
                Err(malformed(m.name(), "unexpected payload"))
            }
        };
        match tag {
            tag::HELLO => decode_hello(payload).map(Message::Hello),
            tag::CHALLENGE => auth_bytes("Challenge", payload)
                .and_then(|(nonce, rest)| no_rest("Challenge", rest).map(|()| nonce))
                .map(|nonce| Message::Challenge { nonce }),
            tag::AUTH => {
                let (nonce, rest) = auth_bytes("Auth", payload)?;
                let proof = decode_proof("Auth", rest)?;
                Ok(Message::Auth { nonce, proof })
            }
            tag::AUTH_OK => decode_proof("AuthOk", payload).map(|proof| Message::AuthOk { proof }),
            tag::CONFIG => postcard_exact("Config", payload).map(Message::Config),
            tag::ACCEPT => empty(Message::Accept),
            tag::REFUSE => postcard_exact::<Reason>("Refuse", payload)
                .map(|r| Message::Refuse { reason: r.text }),
            tag::PAGES => decode_pages(payload).map(Message::Pages),
            tag::STATE => {
                if payload.len() > MAX_STATE_CHUNK {
                    return Err(malformed("State", "chunk too large"));
                }
                Ok(Message::State(payload.to_vec()))
            }
            tag::COMPLETE => empty(Message::Complete),
            tag::READY => empty(Message::Ready),
            tag::GO => empty(Message::Go),
            tag::RUNNING => empty(Message::Running),
            tag::CANCEL => postcard_exact::<Reason>("Cancel", payload)
                .map(|r| Message::Cancel { reason: r.text }),
            tag::ERROR => postcard_exact::<Reason>("Error", payload)
                .map(|r| Message::Error { message: r.text }),
            t => Err(ProtocolError::UnknownTag(t)),
        }
    }
}

fn put_proof(f: &mut FrameBuf, proof: &Option<AuthBytes>) {
    match proof {
        Some(p) => {
            f.put(&[1]);
            f.put(p);
        }
        None => f.put(&[0]),
    }
}

/// The first [`AUTH_LEN`] bytes and the rest.
fn auth_bytes<'a>(message: &'static str, p: &'a [u8]) -> Result<(AuthBytes, &'a [u8])> {
    let b = p
        .get(..AUTH_LEN)
        .and_then(|s| <AuthBytes>::try_from(s).ok())
        .ok_or_else(|| malformed(message, "too short"))?;
    Ok((b, &p[AUTH_LEN..]))
}

fn no_rest(message: &'static str, rest: &[u8]) -> Result<()> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(malformed(message, format!("{} trailing bytes", rest.len())))
    }
}

/// A flag byte (0 or 1) and, after a 1, the proof.
fn decode_proof(message: &'static str, p: &[u8]) -> Result<Option<AuthBytes>> {
    match p.split_first() {
        Some((0, rest)) => no_rest(message, rest).map(|()| None),
        Some((1, rest)) => {
            let (proof, rest) = auth_bytes(message, rest)?;
            no_rest(message, rest)?;
            Ok(Some(proof))
        }
        Some((flag, _)) => Err(malformed(
            message,
            format!("proof flag {flag} is not 0 or 1"),
        )),
        None => Err(malformed(message, "too short")),
    }
}

fn postcard_exact<T: DeserializeOwned>(message: &'static str, payload: &[u8]) -> Result<T> {
    match postcard::take_from_bytes(payload) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(malformed(message, format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(malformed(message, e.to_string())),
    }
}

fn decode_hello(p: &[u8]) -> Result<Hello> {
    let short = || malformed("Hello", "too short");
    let magic: [u8; 8] = p
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(short)?;
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = le_u32(p, 8).ok_or_else(short)?;
    let vlen = p
        .get(12..14)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        .ok_or_else(short)?;
    let v = p.get(14..14 + vlen).ok_or_else(short)?;
    if p.len() != 14 + vlen {
        return Err(malformed("Hello", "trailing bytes"));
    }
    Ok(Hello {
        magic,
        protocol_version: version,
        wisp_version: String::from_utf8_lossy(v).into_owned(),
    })
}

fn le_u32(p: &[u8], at: usize) -> Option<u32> {
    p.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

fn decode_pages(p: &[u8]) -> Result<Pages> {
    let short = || malformed("Pages", "too short");
    let region = le_u32(p, 0).ok_or_else(short)?;
    let first_page = p
        .get(4..12)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(short)?;
    let count = le_u32(p, 12).ok_or_else(short)?;
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(malformed(
            "Pages",
            format!("page count {count} not in 1..={MAX_PAGES_PER_FRAME}"),
        ));
    }
    let map_len = count.div_ceil(8) as usize;
    let present = p
        .get(PAGES_HEADER..PAGES_HEADER + map_len)
        .ok_or_else(short)?
        .to_vec();
    // Bits past `count` must be clear so one run has one encoding.
    let tail = count % 8;
    if tail != 0 {
        if let Some(last) = present.last() {
            if last >> tail != 0 {
                return Err(malformed("Pages", "bitmap bits set past the page count"));
            }
        }
    }
    let n: usize = present.iter().map(|b| b.count_ones() as usize).sum();
    let data = &p[PAGES_HEADER + map_len..];
    if data.len() != n * PAGE_SIZE {
        return Err(malformed(
            "Pages",
            format!("{} data bytes for {n} present pages", data.len()),
        ));
    }
    Ok(Pages {
        region,
        first_page,
        count,
        present,
        data: data.to_vec(),
    })
}

/// A frame under construction; also used by the sender to build `Pages`
/// frames straight from guest memory without an intermediate copy.
#[derive(Debug, Default)]
pub struct FrameBuf {
    /// The frame bytes so far.
    pub buf: Vec<u8>,
}

impl FrameBuf {
    /// Starts a frame with `tag`, discarding any previous contents.
    pub fn begin(&mut self, tag: u32) {
        self.buf.clear();
        self.buf.extend_from_slice(&tag.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
    }

    /// Appends payload bytes.
    pub fn put(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn put_postcard<T: Serialize>(&mut self, v: &T) {
        // Serialising plain structs of strings and integers into a Vec
        // cannot fail; fall back to an empty payload that the peer rejects.
        if let Ok(b) = postcard::to_stdvec(v) {
            self.put(&b);
        }
    }

    /// Payload length so far.
    pub fn payload_len(&self) -> usize {
        self.buf.len().saturating_sub(HEADER_LEN)
    }

    /// Fills in the length and appends the CRC.
    pub fn finish(&mut self) {
        if self.buf.len() < HEADER_LEN {
            self.buf.resize(HEADER_LEN, 0);
        }
        let len = self.payload_len() as u32;
        self.buf[4..8].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
    }
}

/// Writes one message.
pub fn write_message<W: Write + ?Sized>(w: &mut W, m: &Message) -> Result<()> {
    w.write_all(&m.encode()).map_err(ProtocolError::from_io)
}

/// Reads one frame: its tag and verified payload.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<(u32, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head).map_err(ProtocolError::from_io)?;
    let tag = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_FRAME_PAYLOAD {
        return Err(ProtocolError::Oversize {
            len,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(ProtocolError::from_io)?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc).map_err(ProtocolError::from_io)?;
    let stored = u32::from_le_bytes(crc);
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&payload);
    let computed = h.finalize();
    if stored != computed {
        return Err(ProtocolError::BadCrc { stored, computed });
    }
    Ok((tag, payload))
}

/// Reads and decodes one message.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message> {
    let (tag, payload) = read_frame(r)?;
    Message::decode(tag, &payload)
}

#[cfg(test)]
mod tests;
