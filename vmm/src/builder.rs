// SPDX-License-Identifier: Apache-2.0
//! Building a VM from a [`VmConfig`]: memory, kernel, boot tables, devices and
//! vCPUs, in one place.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use boot::layout::{
    ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, CMDLINE_MAX_SIZE, COM1_IRQ, COM1_PORT,
    GED_IRQ, GED_PORT, I8042_IRQ, I8042_PORT,
};
use boot::loader::{self, EntryPoint};
use devices::bus::Bus;
use devices::legacy::{AcpiPm, Ged, SerialDevice, I8042};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{self, SerialConfig, VmConfig};
use crate::device_manager::{self, MmioAllocator};
use crate::vmm::Vmm;
use crate::vmm::{AttachedBlock, AttachedNet};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError};
use crate::vstate::vm::{self, Vm, VmError};

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// KVM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be allocated.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd, command line or boot tables failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A vCPU could not be created or configured.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A virtio device could not be created or attached.
    #[error(transparent)]
    VirtioDevice(#[from] crate::device_manager::DeviceError),
    /// A device could not be created.
    #[error("Cannot create {what}: {source}")]
    Device {
        /// Which device.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn dev_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Device { what, source }
}

fn eventfd(what: &str) -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err(what))
}

fn irqfd(vm: &Vm, gsi: u32, what: &str) -> Result<EventFd, BuildError> {
    let evt = eventfd(what)?;
    vm.fd
        .register_irqfd(&evt, gsi)
        .map_err(|e| dev_err(what)(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(evt)
}

fn serial_output(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match cfg {
        SerialConfig::Stdio => {
            // SAFETY: dup of stdout gives a new fd this File owns; writes go
            // straight to it without std's line buffering.
            let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
            if fd < 0 {
                return Err(dev_err("serial console")(std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            Box::new(unsafe { std::fs::File::from_raw_fd(fd) })
        }
        SerialConfig::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(dev_err(format!("serial output file {}", p.display())))?,
        ),
        SerialConfig::None => Box::new(std::io::sink()),
    })
}

/// Builds the VM described by `cfg` and starts its vCPUs (paused if
/// `start_paused`).
pub fn build_vm(cfg: &VmConfig, start_paused: bool) -> Result<Vmm, BuildError> {
    let kvm = vm::open_kvm()?;
    config::check_vcpus(u64::from(cfg.vcpus), kvm.get_max_vcpus())?;
    config::check_memory(cfg.mem_size, memory::host_ram())?;
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Ioctl {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;

    let mem = memory::create_guest_memory(cfg.mem_size)?;
    let kernel = loader::load_kernel(&mem, &cfg.kernel)?;
    let vm = Vm::new(kvm, mem)?;

    let (initrd_max, cmdline_max) = match kernel.setup_header {
        Some(h) => (
            u64::from(h.initrd_addr_max),
            (h.cmdline_size as usize).saturating_add(1).max(256),
        ),
        None => (u64::from(u32::MAX), CMDLINE_MAX_SIZE),
    };
    let initrd = cfg
        .initrd
        .as_deref()
        .map(|p| loader::load_initrd(&vm.memory, p, cfg.mem_size, kernel.end, initrd_max))
        .transpose()?;

    // virtio devices: the root disk first, so it is /dev/vda.
    let mut mmio = Bus::new();
    let mut alloc = MmioAllocator::default();
    let mut disks = Vec::with_capacity(cfg.disks.len());
    let mut ordered: Vec<&config::DiskConfig> = cfg.disks.iter().filter(|d| d.root).collect();
    ordered.extend(cfg.disks.iter().filter(|d| !d.root));
    for d in ordered {
        let blk = device_manager::create_block(d)?;
        let transport = device_manager::attach_virtio(&vm, &mut mmio, &mut alloc, blk.clone())?;
        disks.push(AttachedBlock {
            block: blk,
            transport,
        });
    }

    let mut nets = Vec::with_capacity(cfg.nets.len());
    for n in &cfg.nets {
        let (net, port) = device_manager::create_net(n)?;
        let transport = device_manager::attach_virtio(&vm, &mut mmio, &mut alloc, net.clone())?;
        nets.push(AttachedNet {
            net,
            transport,
            port,
        });
    }

    let cmdline = loader::build_cmdline(&cfg.cmdline, &alloc.cmdline_params(), cmdline_max)?;
    let cmdline_len = loader::write_cmdline(&vm.memory, &cmdline)?;

    boot::mptable::setup_mptable(&vm.memory, cfg.vcpus)?;
    let rsdp = boot::acpi::setup_acpi(&vm.memory, cfg.vcpus, &alloc.devices)?;
    match kernel.entry {
        EntryPoint::Pvh(_) => {
            boot::params::write_pvh_start_info(&vm.memory, initrd, cfg.mem_size, rsdp)?
        }
        EntryPoint::Linux64(_) => boot::params::write_linux_params(
            &vm.memory,
            kernel.setup_header,
            cmdline_len,
            initrd,
            cfg.mem_size,
        )?,
    }

    // Legacy devices.
    let reset_evt = eventfd("reset event")?;
    let poweroff_evt = eventfd("power-off event")?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(irqfd(&vm, COM1_IRQ, "serial")?, serial_output(&cfg.serial)?)
            .map_err(dev_err("serial"))?,
    ));
    let i8042 = Arc::new(Mutex::new(I8042::new(
        reset_evt.try_clone().map_err(dev_err("i8042"))?,
        irqfd(&vm, I8042_IRQ, "i8042")?,
    )));
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
        ACPI_S5_SLP_TYP,
        ACPI_RESET_VALUE,
        poweroff_evt.try_clone().map_err(dev_err("ACPI PM"))?,
        reset_evt.try_clone().map_err(dev_err("ACPI PM"))?,
    )));
    let ged = Arc::new(Mutex::new(Ged::new(irqfd(&vm, GED_IRQ, "GED")?)));
    let mut pio = Bus::new();
    let bus_err = |what: &str, e: devices::bus::BusError| {
        dev_err(what)(std::io::Error::new(std::io::ErrorKind::AddrInUse, e))
    };
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)
        .map_err(|e| bus_err("serial", e))?;
    pio.insert(i8042.clone(), u64::from(I8042_PORT), 5)
        .map_err(|e| bus_err("i8042", e))?;
    pio.insert(acpi_pm, u64::from(ACPI_PM_PORT), 4)
        .map_err(|e| bus_err("ACPI PM", e))?;
    pio.insert(ged.clone(), u64::from(GED_PORT), 1)
        .map_err(|e| bus_err("GED", e))?;
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);

    // vCPUs.
    vcpu::register_kick_handler().map_err(dev_err("vCPU kick signal handler"))?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus.into());
    for id in 0..cfg.vcpus {
        let mut v = Vcpu::new(&vm, id)?;
        v.configure(&vm, &supported_cpuid, cfg.vcpus, kernel.entry)?;
        vcpus.push(v);
    }
    let (exit_tx, exit_rx) = channel();
    let exit_evt = eventfd("vCPU exit event")?;
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        handles.push(v.start(
            pio.clone(),
            mmio.clone(),
            exit_tx.clone(),
            exit_evt.try_clone().map_err(dev_err("vCPU exit event"))?,
            start_paused,
        )?);
    }

    Ok(Vmm {
        vm,
        vcpus: handles,
        serial,
        i8042,
        ged,
        exit_rx,
        exit_evt,
        reset_evt,
        poweroff_evt,
        disks,
        nets,
        config: cfg.clone(),
    })
}
