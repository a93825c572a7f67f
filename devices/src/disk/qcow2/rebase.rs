// SPDX-License-Identifier: Apache-2.0
//! Rewriting the backing file name and format of a qcow2 image (`rebase`).

use std::io;
use std::os::unix::fs::FileExt;

use super::header::{self, Compression};
use super::{invalid, Qcow2Disk};
use crate::disk::ImageFormat;

impl Qcow2Disk {
    /// Points the image at another backing file (`None`: no backing file),
    /// rewriting the header cluster. Guest data is not touched: a safe rebase
    /// copies what would change first. The image must be open read-write.
    pub fn set_backing_file(
        &mut self,
        name: Option<&str>,
        format: Option<ImageFormat>,
    ) -> io::Result<()> {
        self.check_writable()?;
        if name.is_none() && format.is_some() {
            return Err(invalid("a backing format needs a backing file".into()));
        }
        let mut h = self.header.clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = format.map(|f| f.name().to_string());
        match name {
            Some(n) => {
                if n.is_empty() || n.contains('\0') || n.len() > header::MAX_BACKING_NAME as usize {
                    return Err(invalid(format!(
                        "backing file name must be 1 to {} bytes without NUL",
                        header::MAX_BACKING_NAME
                    )));
                }
                h.backing_file_offset = h.backing_name_offset();
                h.backing_file_size = n.len() as u32;
                if h.backing_file_offset + n.len() as u64 > h.cluster_size() {
                    return Err(invalid(
                        "backing file name does not fit in the header cluster".into(),
                    ));
                }
            }
            None => {
                h.backing_file_offset = 0;
                h.backing_file_size = 0;
            }
        }
        // Other header extensions (feature names, bitmaps) are dropped; the
        // autoclear bits that would announce bitmaps were cleared on opening.
        h.autoclear_features = 0;
        let mut cluster = h.to_cluster();
        if h.version >= 3 && h.header_length > 104 {
            cluster[104] = match h.compression {
                Compression::Deflate => 0,
                Compression::Zstd => 1,
            };
        }
        self.flush_metadata()?;
        self.file.write_all_at(&cluster, 0)?;
        self.file.sync_data()?;
        self.header = h;
        Ok(())
    }
}
