// SPDX-License-Identifier: Apache-2.0
//! Errors from building the guest's boot environment.

use std::path::PathBuf;

/// Why the guest's boot environment could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("Cannot read kernel {path}: {source}")]
    KernelFile {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The kernel file is neither an x86_64 ELF nor a bzImage.
    #[error("{path} is not a kernel wisp can boot (expected an x86_64 ELF vmlinux or a bzImage): {detail}")]
    NotAKernel {
        /// The path given.
        path: PathBuf,
        /// What the loaders said.
        detail: String,
    },
    /// The initrd file could not be opened or read.
    #[error("Cannot read initrd {path}: {source}")]
    InitrdFile {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory below the kernel's limit.
    #[error("Initrd {path} ({size} bytes) does not fit in guest memory (at most {room} bytes free below {limit:#x})")]
    InitrdTooBig {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room available.
        room: u64,
        /// The highest address the kernel accepts.
        limit: u64,
    },
    /// The kernel command line is invalid or too long.
    #[error("Invalid kernel command line: {0}")]
    Cmdline(String),
    /// Guest memory is too small or too large.
    #[error("Invalid memory size {size} bytes: {why}")]
    MemorySize {
        /// Requested size.
        size: u64,
        /// Why it was refused.
        why: String,
    },
    /// Writing boot data into guest memory failed.
    #[error("Cannot write {what} into guest memory: {detail}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// The memory error.
        detail: String,
    },
    /// Too many vCPUs for the tables wisp builds.
    #[error("Too many vCPUs for the boot tables: {0} (at most 254)")]
    TooManyVcpus(usize),
}
