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
use crate::persist::snapshot::{missing_cpu_features, DeviceStates, MicrovmState};
use crate::tap_handover::AdoptedTaps;
use crate::vmm::{AttachedBlock, AttachedNet, Vmm};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError};
use crate::vstate::vcpu_state::VcpuStateContext;
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
    /// The snapshot cannot be restored here.
    #[error("Cannot restore the snapshot: {0}")]
    Snapshot(String),
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

type SerialOut = (
    Box<dyn Write + Send>,
    Option<crate::serial_socket::SerialSocket>,
);

fn serial_output(cfg: &SerialConfig) -> Result<SerialOut, BuildError> {
    if let SerialConfig::Socket { path, log } = cfg {
        let (socket, writer) = crate::serial_socket::SerialSocket::bind(path, log.as_deref())
            .map_err(dev_err(format!("serial console socket {}", path.display())))?;
        return Ok((Box::new(writer), Some(socket)));
    }
    let out: Box<dyn Write + Send> = match cfg {
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
        SerialConfig::None | SerialConfig::Socket { .. } => Box::new(std::io::sink()),
    };
    Ok((out, None))
}

fn open_checked_kvm(cfg: &VmConfig) -> Result<(kvm_ioctls::Kvm, kvm_bindings::CpuId), BuildError> {
    let kvm = vm::open_kvm()?;
    config::check_vcpus(u64::from(cfg.vcpus), kvm.get_max_vcpus())?;
    config::check_memory(cfg.mem_size, memory::host_ram())?;
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Ioctl {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    Ok((kvm, supported_cpuid))
}

struct VirtioDevices {
    mmio: Bus,
    alloc: MmioAllocator,
    disks: Vec<AttachedBlock>,
    nets: Vec<AttachedNet>,
}

/// Creates and attaches the virtio devices in a fixed order (root disk first,
/// other disks, then NICs), so windows and interrupt lines are the same on
/// boot and on restore; `saved` restores their state.
fn attach_virtio_devices(
    vm: &Vm,
    cfg: &VmConfig,
    saved: Option<&DeviceStates>,
    taps: &mut AdoptedTaps,
) -> Result<VirtioDevices, BuildError> {
    let mut mmio = Bus::new();
    let mut alloc = MmioAllocator::default();
    let mut ordered: Vec<&config::DiskConfig> = cfg.disks.iter().filter(|d| d.root).collect();
    ordered.extend(cfg.disks.iter().filter(|d| !d.root));
    if let Some(s) = saved {
        if s.blocks.len() != ordered.len() || s.nets.len() != cfg.nets.len() {
            return Err(BuildError::Snapshot(format!(
                "it has {} disks and {} NICs but its configuration lists {} and {}",
                s.blocks.len(),
                s.nets.len(),
                ordered.len(),
                cfg.nets.len()
            )));
        }
    }
    let mut disks = Vec::with_capacity(ordered.len());
    for (i, d) in ordered.into_iter().enumerate() {
        let st = saved.map(|s| &s.blocks[i]);
        let blk = match st {
            Some(st) => device_manager::restore_block(d, &st.device)?,
            None => device_manager::create_block(d)?,
        };
        let transport = device_manager::attach_virtio(
            vm,
            &mut mmio,
            &mut alloc,
            blk.clone(),
            st.map(|s| &s.transport),
        )?;
        disks.push(AttachedBlock {
            block: blk,
            transport,
        });
    }
    let mut nets = Vec::with_capacity(cfg.nets.len());
    for (i, n) in cfg.nets.iter().enumerate() {
        let st = saved.map(|s| &s.nets[i]);
        let (net, port) = device_manager::create_net(n, st.map(|s| &s.device), taps)?;
        let transport = device_manager::attach_virtio(
            vm,
            &mut mmio,
            &mut alloc,
            net.clone(),
            st.map(|s| &s.transport),
        )?;
        nets.push(AttachedNet {
            net,
            transport,
            port,
        });
    }
    Ok(VirtioDevices {
        mmio,
        alloc,
        disks,
        nets,
    })
}

struct Legacy {
    pio: Bus,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_socket: Option<crate::serial_socket::SerialSocket>,
    i8042: Arc<Mutex<I8042>>,
    ged: Arc<Mutex<Ged>>,
    reset_evt: EventFd,
    poweroff_evt: EventFd,
}

/// COM1, the i8042, the ACPI sleep/reset register and the GED on the port bus.
fn legacy_devices(
    vm: &Vm,
    cfg: &VmConfig,
    saved: Option<&DeviceStates>,
) -> Result<Legacy, BuildError> {
    let reset_evt = eventfd("reset event")?;
    let poweroff_evt = eventfd("power-off event")?;
    let serial_irq = irqfd(vm, COM1_IRQ, "serial")?;
    let (out, serial_socket) = serial_output(&cfg.serial)?;
    let serial = match saved {
        Some(s) => SerialDevice::from_state(&s.serial, serial_irq, out),
        None => SerialDevice::new(serial_irq, out),
    }
    .map_err(dev_err("serial"))?;
    let serial = Arc::new(Mutex::new(serial));
    let i8042_reset = reset_evt.try_clone().map_err(dev_err("i8042"))?;
    let i8042_irq = irqfd(vm, I8042_IRQ, "i8042")?;
    let i8042 = Arc::new(Mutex::new(match saved {
        Some(s) => I8042::from_state(s.i8042.clone(), i8042_reset, i8042_irq),
        None => I8042::new(i8042_reset, i8042_irq),
    }));
    let mut acpi_pm = AcpiPm::new(
        ACPI_S5_SLP_TYP,
        ACPI_RESET_VALUE,
        poweroff_evt.try_clone().map_err(dev_err("ACPI PM"))?,
        reset_evt.try_clone().map_err(dev_err("ACPI PM"))?,
    );
    let mut ged = Ged::new(irqfd(vm, GED_IRQ, "GED")?);
    if let Some(s) = saved {
        acpi_pm.restore(s.acpi_pm);
        ged.restore(s.ged);
    }
    let ged = Arc::new(Mutex::new(ged));
    let acpi_pm = Arc::new(Mutex::new(acpi_pm));
    let mut pio = Bus::new();
    let bus_err = |what: &str, e: devices::bus::BusError| {
        dev_err(what)(std::io::Error::new(std::io::ErrorKind::AddrInUse, e))
    };
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)
        .map_err(|e| bus_err("serial", e))?;
    pio.insert(i8042.clone(), u64::from(I8042_PORT), 5)
        .map_err(|e| bus_err("i8042", e))?;
    pio.insert(acpi_pm.clone(), u64::from(ACPI_PM_PORT), 4)
        .map_err(|e| bus_err("ACPI PM", e))?;
    pio.insert(ged.clone(), u64::from(GED_PORT), 1)
        .map_err(|e| bus_err("GED", e))?;
    Ok(Legacy {
        pio,
        acpi_pm,
        serial,
        serial_socket,
        i8042,
        ged,
        reset_evt,
        poweroff_evt,
    })
}

/// Starts the vCPU threads and assembles the running VM.
fn finish(
    vm: Vm,
    vcpus: Vec<Vcpu>,
    legacy: Legacy,
    virtio: VirtioDevices,
    cfg: &VmConfig,
    ctx: Arc<VcpuStateContext>,
    start_paused: bool,
) -> Result<Vmm, BuildError> {
    let pio = Arc::new(legacy.pio);
    let mmio = Arc::new(virtio.mmio);
    let (exit_tx, exit_rx) = channel();
    let exit_evt = eventfd("vCPU exit event")?;
    let throttle = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        handles.push(v.start(
            vcpu::VcpuLinks {
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit_tx: exit_tx.clone(),
                exit_evt: exit_evt.try_clone().map_err(dev_err("vCPU exit event"))?,
                ctx: ctx.clone(),
                throttle: throttle.clone(),
            },
            start_paused,
        )?);
    }
    Ok(Vmm {
        vm,
        vcpus: handles,
        vcpu_ctx: ctx,
        serial: legacy.serial,
        serial_socket: legacy.serial_socket,
        i8042: legacy.i8042,
        ged: legacy.ged,
        acpi_pm: legacy.acpi_pm,
        exit_rx,
        exit_evt,
        reset_evt: legacy.reset_evt,
        poweroff_evt: legacy.poweroff_evt,
        disks: virtio.disks,
        nets: virtio.nets,
        config: cfg.clone(),
        dirty_tracking: false,
        host_cpuid: Vec::new(),
        throttle,
        kicker: None,
    })
}

fn vcpu_ctx(vm: &Vm) -> Result<Arc<VcpuStateContext>, BuildError> {
    VcpuStateContext::new(&vm.kvm, &vm.fd)
        .map(Arc::new)
        .map_err(|e| BuildError::Snapshot(e.to_string()))
}

/// Builds the VM described by `cfg` and starts its vCPUs (paused if
/// `start_paused`).
pub fn build_vm(cfg: &VmConfig, start_paused: bool) -> Result<Vmm, BuildError> {
    let (kvm, supported_cpuid) = open_checked_kvm(cfg)?;
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

    let virtio = attach_virtio_devices(&vm, cfg, None, &mut AdoptedTaps::new())?;
    let cmdline = loader::build_cmdline(&cfg.cmdline, &virtio.alloc.cmdline_params(), cmdline_max)?;
    let cmdline_len = loader::write_cmdline(&vm.memory, &cmdline)?;

    boot::mptable::setup_mptable(&vm.memory, cfg.vcpus)?;
    let rsdp = boot::acpi::setup_acpi(&vm.memory, cfg.vcpus, &virtio.alloc.devices)?;
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
    let legacy = legacy_devices(&vm, cfg, None)?;

    vcpu::register_kick_handler().map_err(dev_err("vCPU kick signal handler"))?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus.into());
    for id in 0..cfg.vcpus {
        let mut v = Vcpu::new(&vm, id)?;
        v.configure(&vm, &supported_cpuid, cfg.vcpus, kernel.entry)?;
        vcpus.push(v);
    }
    let ctx = vcpu_ctx(&vm)?;
    if cfg.track_dirty_pages {
        crate::persist::set_dirty_logging(&vm.fd, &vm.memory, true)
            .map_err(|e| BuildError::Snapshot(e.to_string()))?;
    }
    let mut vmm = finish(vm, vcpus, legacy, virtio, cfg, ctx, start_paused)?;
    vmm.dirty_tracking = cfg.track_dirty_pages;
    vmm.host_cpuid = supported_cpuid.as_slice().to_vec();
    Ok(vmm)
}

/// Checks a state's memory layout against its configuration.
fn check_restorable(state: &MicrovmState) -> Result<(), BuildError> {
    let cfg = &state.config;
    let expected: Vec<(u64, u64)> = boot::layout::ram_ranges(cfg.mem_size);
    let found: Vec<(u64, u64)> = state
        .vm
        .memory
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if expected != found {
        return Err(BuildError::Snapshot(format!(
            "its memory layout {found:x?} does not match {} MiB",
            cfg.mem_size >> 20
        )));
    }
    Ok(())
}

/// Rebuilds a VM from a state and guest memory already filled (mapped from a
/// snapshot's memory file by `persist::load_snapshot`, or from a migration
/// stream), using the TAPs in `taps` (handed
/// over by a migration source on this host) instead of opening them.
pub fn restore_vm_with_memory(
    state: &MicrovmState,
    mem: devices::GuestMemoryMmap,
    track_dirty: bool,
    start_paused: bool,
    taps: &mut AdoptedTaps,
) -> Result<Vmm, BuildError> {
    check_restorable(state)?;
    let cfg = &state.config;
    let (kvm, supported_cpuid) = open_checked_kvm(cfg)?;
    if state.vcpus.len() != usize::from(cfg.vcpus) {
        return Err(BuildError::Snapshot(format!(
            "it holds {} vCPU states for {} vCPUs",
            state.vcpus.len(),
            cfg.vcpus
        )));
    }
    {
        let missing = missing_cpu_features(&state.host_cpuid, supported_cpuid.as_slice());
        if !missing.is_empty() {
            return Err(BuildError::Snapshot(format!(
                "this host's CPU lacks features the guest uses: {}",
                missing.join(", ")
            )));
        }
    }
    let vm = Vm::new(kvm, mem)?;
    if track_dirty {
        crate::persist::set_dirty_logging(&vm.fd, &vm.memory, true)
            .map_err(|e| BuildError::Snapshot(e.to_string()))?;
    }
    crate::vstate::vm_state::restore(&vm.fd, &state.vm)
        .map_err(|e| BuildError::Snapshot(e.to_string()))?;
    let virtio = attach_virtio_devices(&vm, cfg, Some(&state.devices), taps)?;
    let legacy = legacy_devices(&vm, cfg, Some(&state.devices))?;

    vcpu::register_kick_handler().map_err(dev_err("vCPU kick signal handler"))?;
    let ctx = vcpu_ctx(&vm)?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus.into());
    for (id, vs) in (0..cfg.vcpus).zip(&state.vcpus) {
        let v = Vcpu::new(&vm, id)?;
        v.restore_state(vs, &ctx)
            .map_err(|e| BuildError::Snapshot(format!("vCPU {id}: {e}")))?;
        vcpus.push(v);
    }
    let mut vmm = finish(vm, vcpus, legacy, virtio, cfg, ctx, start_paused)?;
    vmm.dirty_tracking = track_dirty;
    vmm.host_cpuid = supported_cpuid.as_slice().to_vec();
    Ok(vmm)
}
