// SPDX-License-Identifier: Apache-2.0
//! Loading the kernel (ELF vmlinux, ELF with a PVH note, or bzImage), the initrd
//! and the command line into guest memory, with `linux-loader`.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::BootError;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start_info.
    Pvh(u64),
    /// 64-bit Linux boot protocol: long mode, `%rsi` = boot_params.
    Linux64(u64),
}

impl EntryPoint {
    /// The guest address execution starts at.
    pub fn addr(&self) -> u64 {
        match self {
            Self::Pvh(a) | Self::Linux64(a) => *a,
        }
    }
}

/// What loading the kernel produced.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts.
    pub entry: EntryPoint,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel at `path`: an ELF (entered through PVH when it carries a PVH
/// note, else at its 64-bit entry) or a bzImage (64-bit entry at +0x200).
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::KernelFile {
            path: path.into(),
            source,
        })
    };
    let mut file = open()?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(BootError::KernelFile {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "is a directory"),
        });
    }
    let himem = Some(GuestAddress(HIMEM_START));
    let elf_err = match Elf::load(mem, None, &mut file, himem) {
        Ok(res) => {
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.0),
                _ => EntryPoint::Linux64(res.kernel_load.0),
            };
            return Ok(LoadedKernel {
                entry,
                end: res.kernel_load.0.saturating_add(res.kernel_end),
                setup_header: None,
            });
        }
        Err(e) => e,
    };
    let mut file = open()?;
    match BzImage::load(mem, None, &mut file, himem) {
        Ok(res) => Ok(LoadedKernel {
            // The 64-bit entry of the protected-mode kernel is 0x200 bytes in.
            entry: EntryPoint::Linux64(res.kernel_load.0 + 0x200),
            end: res.kernel_load.0.saturating_add(res.kernel_end),
            setup_header: res.setup_header,
        }),
        Err(bz_err) => Err(BootError::NotAKernel {
            path: path.into(),
            detail: format!("as ELF: {elf_err}; as bzImage: {bz_err}"),
        }),
    }
}

/// Where the initrd landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at the top of low RAM, page aligned, above the kernel and
/// below `addr_max` (the kernel's `initrd_addr_max`).
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<LoadedInitrd, BootError> {
    let file_err = |source| BootError::InitrdFile {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let meta = file.metadata().map_err(file_err)?;
    if !meta.is_file() {
        return Err(file_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let size = meta.len();
    let low_end = layout::ram_ranges(mem_size)[0].1;
    let limit = low_end.min(addr_max.saturating_add(1));
    let floor = kernel_end.max(HIMEM_START);
    let room = limit.saturating_sub(floor);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= floor)
        .ok_or(BootError::InitrdTooBig {
            path: path.into(),
            size,
            room,
            limit,
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
        path: path.into(),
        size,
        room,
        limit,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| BootError::GuestWrite {
            what: "initrd",
            detail: e.to_string(),
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Builds the command line from the user's string plus `extra` parameters the
/// VMM adds, refusing one that does not fit in `max_len` bytes (with the NUL).
pub fn build_cmdline(user: &str, extra: &[String], max_len: usize) -> Result<Cmdline, BootError> {
    let max_len = max_len.min(CMDLINE_MAX_SIZE);
    let mut cmdline = Cmdline::new(max_len).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let too_long = |e: linux_loader::cmdline::Error| {
        BootError::Cmdline(format!("{e} (the limit is {} bytes)", max_len - 1))
    };
    if !user.trim().is_empty() {
        cmdline.insert_str(user.trim()).map_err(too_long)?;
    }
    for e in extra {
        cmdline.insert_str(e).map_err(too_long)?;
    }
    Ok(cmdline)
}

/// Writes the command line at [`CMDLINE_START`]; returns its length without the NUL.
pub fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &Cmdline,
) -> Result<usize, BootError> {
    let s = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    mem.write_slice(s.as_bytes_with_nul(), GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::GuestWrite {
            what: "command line",
            detail: e.to_string(),
        })?;
    Ok(s.as_bytes().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_build_cmdline_too_long_is_refused() {
        let long = "x".repeat(5000);
        assert!(matches!(
            build_cmdline(&long, &[], CMDLINE_MAX_SIZE),
            Err(BootError::Cmdline(_))
        ));
        let c = build_cmdline("console=ttyS0", &["a=b".into()], 64).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 a=b"
        );
    }
}
