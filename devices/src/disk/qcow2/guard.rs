// SPDX-License-Identifier: Apache-2.0
//! The metadata overlap guard: every data write and every allocation is
//! checked against the metadata map; a hit marks the image corrupt.

use std::io;
use std::os::unix::fs::FileExt;

use super::meta::Meta;
use super::{header, invalid, Mapping, Qcow2Disk};

impl Qcow2Disk {
    /// Marks the image corrupt (incompatible feature bit 1, version 3) and
    /// stops all further writes and metadata write-back; returns the I/O
    /// error for the request that found the damage.
    pub(super) fn corruption(&mut self, what: String) -> io::Error {
        log::error!(
            "{}: {what}; the image is marked corrupt, run `wisp image check` on it",
            self.path.display()
        );
        if !self.corrupt {
            self.corrupt = true;
            if self.header.version >= 3 {
                self.header.incompatible_features |= header::INCOMPAT_CORRUPT;
                let bits = self.header.incompatible_features.to_be_bytes();
                let r = self
                    .file
                    .write_all_at(&bits, header::OFF_INCOMPAT)
                    .and_then(|()| self.file.sync_data());
                if let Err(e) = r {
                    log::error!("{}: cannot set the corrupt bit: {e}", self.path.display());
                }
            }
        }
        io::Error::other(format!("qcow2 metadata corruption: {what}"))
    }

    /// Fails with an I/O error (after marking the image corrupt) when bytes
    /// `[off, off + len)` touch metadata.
    pub(super) fn guard(&mut self, what: &str, off: u64, len: u64) -> io::Result<()> {
        match self.meta.hit(off, len) {
            None => Ok(()),
            Some(hit) => Err(self.corruption(format!(
                "{what} at {off:#x} would overwrite the {} at {:#x}",
                hit.kind, hit.offset
            ))),
        }
    }

    /// Writes guest data (or zeros) at host offset `off`, outside metadata.
    pub(super) fn write_data(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.guard("data write", off, buf.len() as u64)?;
        if let Some(log) = &mut self.write_log {
            log.push((off, buf.len() as u64));
        }
        self.file.write_all_at(buf, off)
    }

    /// Refuses guest writes to a data cluster that lies past the image or
    /// over metadata.
    pub(super) fn check_host_cluster(&mut self, off: u64) -> io::Result<()> {
        let cs = self.cs();
        if off + cs > self.next_free {
            return Err(invalid(format!(
                "data cluster at {off:#x} lies past the end of the image"
            )));
        }
        self.guard("data cluster", off, cs)
    }

    /// Refuses to drop the reference a mapping holds when its host bytes are
    /// metadata: that would free a table still in use.
    pub(super) fn check_release(&mut self, m: Mapping) -> io::Result<()> {
        let cs = self.cs();
        match m {
            Mapping::Data { off, .. }
            | Mapping::Zero {
                prealloc: Some(off),
                ..
            } => self.guard("data cluster", off, cs),
            Mapping::Compressed { off, len } => self.guard("compressed cluster", off, len),
            _ => Ok(()),
        }
    }

    /// Records metadata the refcount code allocated.
    pub(super) fn absorb_new_meta(&mut self) -> io::Result<()> {
        for (kind, off, len) in std::mem::take(&mut self.rc.new_meta) {
            self.add_meta(kind, off, len)?;
        }
        Ok(())
    }

    /// Records newly allocated metadata; an overlap is a corruption.
    pub(super) fn add_meta(&mut self, kind: Meta, off: u64, len: u64) -> io::Result<()> {
        match self.meta.add(kind, off, len) {
            Ok(()) => Ok(()),
            Err(hit) => Err(self.corruption(format!(
                "new {kind} at {off:#x} would overlap the {} at {:#x}",
                hit.kind, hit.offset
            ))),
        }
    }

    /// Sets a refcount, recording any refcount block or table it allocates.
    pub(super) fn rc_set(&mut self, cluster: u64, value: u64) -> io::Result<()> {
        let r = self.rc.set(&self.file, cluster, value, &mut self.next_free);
        self.absorb_new_meta()?;
        r
    }
}
