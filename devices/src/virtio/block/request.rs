// SPDX-License-Identifier: Apache-2.0
//! Parsing, validation and execution of one virtio-blk request.
//!
//! Expected layout (what Linux and every other driver produce): one
//! device-readable 16-byte header descriptor, then the data descriptors, then a
//! device-writable status descriptor whose last byte receives the status.
//! Every address and length comes from the guest and is checked against guest
//! memory, `seg_max`/`size_max` and the disk before any I/O happens.

use std::io;
use std::ops::Deref;

use log::debug;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::disk::DiskBackend;
use crate::GuestMemoryMmap;

/// Length of the request header (type, reserved, sector).
pub const HEADER_LEN: u32 = 16;
/// Length of one discard / write-zeroes range descriptor.
pub const RANGE_LEN: u64 = 16;

/// The request kinds the device knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest memory.
    In,
    /// Write sectors from guest memory.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the serial string.
    GetId,
    /// Discard ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Anything else (completed with UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

impl RequestType {
    /// Whether the data descriptors must be device-writable.
    fn device_writes(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }

    fn modifies_disk(self) -> bool {
        matches!(self, Self::Out | Self::Discard | Self::WriteZeroes)
    }
}

/// A data segment of a request, as the guest described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Device parameters a request is validated against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Disk capacity in sectors.
    pub capacity: u64,
    /// Maximum number of data segments.
    pub seg_max: u32,
    /// Maximum length of one data segment.
    pub size_max: u32,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Maximum sectors in one discard range.
    pub max_discard_sectors: u32,
    /// Maximum ranges in one discard request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Maximum ranges in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Whether the driver negotiated DISCARD.
    pub discard: bool,
    /// Whether the driver negotiated WRITE_ZEROES.
    pub write_zeroes: bool,
}

/// A validated request; its data segments are in the caller's scratch vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// Total length of the data segments.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain cannot be executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No usable status descriptor: the chain is consumed with length 0.
    #[error("Descriptor chain has no writable status descriptor")]
    NoStatus,
    /// The request is malformed; IOERR goes to `status`.
    #[error("Malformed request: {reason}")]
    Invalid {
        /// Where the status byte goes.
        status: GuestAddress,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Result of executing a request: the status byte and the number of bytes
/// written to the device-writable part of the chain (status byte included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Used-ring length.
    pub len: u32,
    /// Bytes read from the disk.
    pub read: u64,
    /// Bytes written to the disk.
    pub written: u64,
}

impl Completion {
    fn error(status: u8) -> Self {
        Self {
            status,
            len: 1,
            read: 0,
            written: 0,
        }
    }
}

fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> bool {
    let Some(last) = len.checked_sub(1) else {
        // Zero-length ranges are never accessed.
        return true;
    };
    let Some(end) = addr.checked_add(last) else {
        return false;
    };
    match mem.find_region(addr) {
        // Fast path: inside one region.
        Some(r) if end <= r.last_addr() => true,
        // A range may continue in an adjacent region.
        Some(_) => {
            usize::try_from(len).is_ok_and(|l| GuestMemoryBackend::check_range(mem, addr, l))
        }
        None => false,
    }
}

/// Reads guest memory, fast when the range lies inside one region.
fn read_guest(mem: &GuestMemoryMmap, buf: &mut [u8], addr: GuestAddress) -> Result<(), ()> {
    match GuestMemoryBackend::get_slice(mem, addr, buf.len()) {
        Ok(s) => s.read_slice(buf, 0).map_err(|_| ()),
        Err(_) => mem.read_slice(buf, addr).map_err(|_| ()),
    }
}

/// Writes one byte of guest memory (marking it dirty).
pub fn write_status(mem: &GuestMemoryMmap, status: u8, addr: GuestAddress) -> bool {
    match GuestMemoryBackend::get_slice(mem, addr, 1) {
        Ok(s) => s.write_obj(status, 0).is_ok(),
        Err(_) => false,
    }
}

/// Splits a chain into header, data segments (into `segs`) and status, and
/// validates everything that does not depend on the disk contents.
pub fn parse<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    limits: &Limits,
    segs: &mut Vec<Segment>,
) -> Result<Request, ParseError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    segs.clear();
    let mut header: Option<Descriptor> = None;
    let mut last: Option<Descriptor> = None;
    let mut too_many = false;
    let (mut any_readable, mut any_writable) = (false, false);
    // virtio-queue bounds the chain (queue size, or indirect table size) and
    // stops at loops, nested indirect tables and 4 GiB of total length.
    for desc in chain {
        if header.is_none() {
            header = Some(desc);
            continue;
        }
        if let Some(prev) = last.replace(desc) {
            if prev.is_write_only() {
                any_writable = true;
            } else {
                any_readable = true;
            }
            if segs.len() < limits.seg_max as usize {
                segs.push(Segment {
                    addr: prev.addr(),
                    len: prev.len(),
                });
            } else {
                too_many = true;
            }
        }
    }

    // A single descriptor can only be a status (with the header missing).
    let (header, status_desc) = match (header, last) {
        (Some(h), Some(s)) => (Some(h), s),
        (Some(s), None) => (None, s),
        (None, _) => return Err(ParseError::NoStatus),
    };
    if !status_desc.is_write_only() || status_desc.len() == 0 {
        return Err(ParseError::NoStatus);
    }
    let status = status_desc
        .addr()
        .checked_add(u64::from(status_desc.len()) - 1)
        .filter(|&a| in_memory(mem, a, 1))
        .ok_or(ParseError::NoStatus)?;
    let invalid = |reason| ParseError::Invalid { status, reason };

    let header = header.ok_or(invalid("no header descriptor"))?;
    if header.is_write_only() {
        return Err(invalid("header descriptor is device-writable"));
    }
    if header.len() != HEADER_LEN {
        return Err(invalid("header descriptor has the wrong length"));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    read_guest(mem, &mut raw, header.addr()).map_err(|_| invalid("header outside guest memory"))?;
    let (t, rest) = raw.split_at(4);
    let kind = RequestType::from(u32::from_le_bytes(t.try_into().unwrap_or_default()));
    let sector = u64::from_le_bytes(rest[4..].try_into().unwrap_or_default());

    if too_many {
        return Err(invalid("too many data segments"));
    }
    let wrong_dir = if kind.device_writes() {
        any_readable
    } else if matches!(
        kind,
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
    ) {
        any_writable
    } else {
        false
    };
    if wrong_dir {
        return Err(invalid("data descriptor has the wrong direction"));
    }
    let mut data_len: u64 = 0;
    for s in segs.iter() {
        if s.len > limits.size_max {
            return Err(invalid("data segment longer than size_max"));
        }
        if !in_memory(mem, s.addr, u64::from(s.len)) {
            return Err(invalid("data segment outside guest memory"));
        }
        // Cannot overflow: at most u32::MAX segments of u32::MAX bytes.
        data_len += u64::from(s.len);
    }
    if matches!(kind, RequestType::In | RequestType::Out) {
        if data_len & (SECTOR_SIZE - 1) != 0 {
            return Err(invalid("data length is not a multiple of 512"));
        }
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|o| o.checked_add(data_len))
            .ok_or(invalid("sector overflows"))?;
        if end > limits.capacity.saturating_mul(SECTOR_SIZE) {
            return Err(invalid("request past the end of the disk"));
        }
    }
    Ok(Request {
        kind,
        sector,
        data_len,
        status,
    })
}

/// Executes a parsed request and returns its status and used length. Never
/// touches guest memory outside the request's data segments (the status byte
/// is written by the caller).
pub fn execute(
    mem: &GuestMemoryMmap,
    disk: &mut dyn DiskBackend,
    req: &Request,
    segs: &[Segment],
    limits: &Limits,
    serial: &[u8; SERIAL_LEN],
) -> Completion {
    if req.kind.modifies_disk() && limits.read_only {
        return Completion::error(VIRTIO_BLK_S_IOERR);
    }
    let res = match req.kind {
        RequestType::In => {
            let offset = req.sector * SECTOR_SIZE;
            transfer(mem, disk, segs, offset, true).map(|()| Completion {
                status: VIRTIO_BLK_S_OK,
                len: saturating_len(req.data_len + 1),
                read: req.data_len,
                written: 0,
            })
        }
        RequestType::Out => {
            let offset = req.sector * SECTOR_SIZE;
            transfer(mem, disk, segs, offset, false).map(|()| Completion {
                status: VIRTIO_BLK_S_OK,
                len: 1,
                read: 0,
                written: req.data_len,
            })
        }
        RequestType::Flush => disk.flush().map(|()| Completion::error(VIRTIO_BLK_S_OK)),
        RequestType::GetId => Ok(get_id(mem, segs, serial)),
        RequestType::Discard if !limits.discard => Ok(Completion::error(VIRTIO_BLK_S_UNSUPP)),
        RequestType::WriteZeroes if !limits.write_zeroes => {
            Ok(Completion::error(VIRTIO_BLK_S_UNSUPP))
        }
        RequestType::Discard | RequestType::WriteZeroes => ranges(mem, disk, req, segs, limits),
        RequestType::Unsupported(t) => {
            debug!("virtio-blk: unsupported request type {t}");
            Ok(Completion::error(VIRTIO_BLK_S_UNSUPP))
        }
    };
    res.unwrap_or_else(|e| {
        debug!("virtio-blk: {:?} request failed: {e}", req.kind);
        Completion::error(VIRTIO_BLK_S_IOERR)
    })
}

fn saturating_len(len: u64) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Moves data between the disk and the guest segments, merging segments that
/// are adjacent in guest memory into one backend call.
fn transfer(
    mem: &GuestMemoryMmap,
    disk: &mut dyn DiskBackend,
    segs: &[Segment],
    mut offset: u64,
    to_guest: bool,
) -> io::Result<()> {
    let mut i = 0;
    while i < segs.len() {
        let start = segs[i].addr;
        let mut len = u64::from(segs[i].len);
        i += 1;
        while i < segs.len() && start.checked_add(len) == Some(segs[i].addr) {
            len += u64::from(segs[i].len);
            i += 1;
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // One slice when the range is inside a region, else one per region.
        let single = GuestMemoryBackend::get_slice(mem, start, len).ok();
        let mut rest = single
            .is_none()
            .then(|| GuestMemoryBackend::get_slices(mem, start, len));
        let mut first = single;
        loop {
            let slice = match (first.take(), rest.as_mut()) {
                (Some(s), _) => s,
                (None, Some(it)) => match it.next() {
                    Some(s) => s.map_err(io::Error::other)?,
                    None => break,
                },
                (None, None) => break,
            };
            if to_guest {
                let guard = slice.ptr_guard_mut();
                // SAFETY: `guard` points at `slice.len()` bytes of mapped guest
                // memory that stay mapped while `mem` is borrowed. The range was
                // bounds-checked by get_slice(s)(). The guest may race with us on
                // these bytes, as it may with any DMA; that changes data only,
                // never host memory outside the mapping.
                let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
                disk.read_at(buf, offset)?;
                slice.bitmap().mark_dirty(0, slice.len());
            } else {
                let guard = slice.ptr_guard();
                // SAFETY: as above; the bytes are only read.
                let buf = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
                disk.write_at(buf, offset)?;
            }
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

fn get_id(mem: &GuestMemoryMmap, segs: &[Segment], serial: &[u8; SERIAL_LEN]) -> Completion {
    let mut left: &[u8] = serial;
    let mut written = 0u32;
    for s in segs {
        if left.is_empty() {
            break;
        }
        let n = left.len().min(s.len as usize);
        if mem.write_slice(&left[..n], s.addr).is_err() {
            return Completion::error(VIRTIO_BLK_S_IOERR);
        }
        left = &left[n..];
        written += n as u32;
    }
    if written == 0 {
        return Completion::error(VIRTIO_BLK_S_IOERR);
    }
    Completion {
        status: VIRTIO_BLK_S_OK,
        len: written + 1,
        read: 0,
        written: 0,
    }
}

/// Largest number of ranges any discard/write-zeroes request may carry.
pub const MAX_RANGES: u32 = 32;

fn ranges(
    mem: &GuestMemoryMmap,
    disk: &mut dyn DiskBackend,
    req: &Request,
    segs: &[Segment],
    limits: &Limits,
) -> io::Result<Completion> {
    let discard = req.kind == RequestType::Discard;
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let max_seg = max_seg.min(MAX_RANGES);
    if req.data_len == 0
        || req.data_len & (RANGE_LEN - 1) != 0
        || req.data_len > u64::from(max_seg) * RANGE_LEN
    {
        return Ok(Completion::error(VIRTIO_BLK_S_IOERR));
    }
    let mut buf = [0u8; (MAX_RANGES as usize) * RANGE_LEN as usize];
    let mut filled = 0usize;
    for s in segs {
        let n = s.len as usize;
        let dst = buf
            .get_mut(filled..filled + n)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        mem.read_slice(dst, s.addr).map_err(io::Error::other)?;
        filled += n;
    }
    let disk_bytes = limits.capacity.saturating_mul(SECTOR_SIZE);
    // Validate every range before touching the disk.
    let mut parsed = [(0u64, 0u64, false); MAX_RANGES as usize];
    let count = filled / RANGE_LEN as usize;
    for (i, r) in buf[..filled].chunks_exact(RANGE_LEN as usize).enumerate() {
        let sector = u64::from_le_bytes(r[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(r[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(r[12..16].try_into().unwrap_or_default());
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
            || (discard && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
        {
            return Ok(Completion::error(VIRTIO_BLK_S_UNSUPP));
        }
        if num > max_sectors {
            return Ok(Completion::error(VIRTIO_BLK_S_IOERR));
        }
        let offset = sector.checked_mul(SECTOR_SIZE);
        let len = u64::from(num) * SECTOR_SIZE;
        match offset.and_then(|o| o.checked_add(len)) {
            Some(end) if end <= disk_bytes => {}
            _ => return Ok(Completion::error(VIRTIO_BLK_S_IOERR)),
        }
        parsed[i] = (
            sector * SECTOR_SIZE,
            len,
            flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        );
    }
    let mut written = 0;
    for &(offset, len, unmap) in &parsed[..count] {
        if len == 0 {
            continue;
        }
        if discard {
            disk.discard(offset, len)?;
        } else {
            disk.write_zeroes(offset, len, unmap)?;
            written += len;
        }
    }
    Ok(Completion {
        status: VIRTIO_BLK_S_OK,
        len: 1,
        read: 0,
        written,
    })
}
