// SPDX-License-Identifier: Apache-2.0
//! Attaching virtio devices: MMIO window and interrupt line allocation, the
//! transport on the MMIO bus, ioeventfds for queue notifications and irqfds for
//! interrupts, and how the guest learns about them (DSDT and command line).

use std::sync::{Arc, Mutex};

use boot::acpi::MmioDeviceInfo;
use boot::layout::{IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_START};
use devices::bus::Bus;
use devices::disk::{open_disk, DiskOptions};
use devices::virtio::block::{Block, BlockArgs};
use devices::virtio::mmio::{
    MmioTransport, MmioTransportState, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use devices::virtio::{IrqTrigger, VirtioDevice};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DiskConfig, NetConfig};
use crate::vstate::vm::Vm;

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Too many devices for the interrupt lines.
    #[error("Too many virtio devices: at most {0}")]
    TooMany(u32),
    /// The disk image could not be opened.
    #[error("Cannot open disk '{id}' ({path}): {source}")]
    Disk {
        /// Drive id.
        id: String,
        /// Image path.
        path: String,
        /// Why.
        #[source]
        source: devices::disk::DiskError,
    },
    /// The TAP or bridge could not be set up.
    #[error("Cannot set up network interface '{id}' (TAP {tap}): {detail}")]
    Net {
        /// Interface id.
        id: String,
        /// TAP name.
        tap: String,
        /// Why.
        detail: String,
    },
    /// The block device refused its configuration.
    #[error("Cannot create disk '{id}': {detail}")]
    Block {
        /// Drive id.
        id: String,
        /// Why.
        detail: String,
    },
    /// A KVM or eventfd operation failed.
    #[error("Cannot wire virtio device {index}: {what}: {source}")]
    Wire {
        /// Device index.
        index: u32,
        /// Which step.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Hands out MMIO windows and interrupt lines to virtio devices in order.
#[derive(Debug, Default)]
pub struct MmioAllocator {
    next: u32,
    /// What was handed out, for the DSDT and the command line.
    pub devices: Vec<MmioDeviceInfo>,
}

impl MmioAllocator {
    /// The next window and GSI.
    pub fn allocate(&mut self) -> Result<MmioDeviceInfo, DeviceError> {
        let slots = IRQ_MAX - IRQ_BASE + 1;
        if self.next >= slots {
            return Err(DeviceError::TooMany(slots));
        }
        let info = MmioDeviceInfo {
            base: VIRTIO_MMIO_START + u64::from(self.next) * MMIO_WINDOW_SIZE,
            len: MMIO_WINDOW_SIZE,
            gsi: IRQ_BASE + self.next,
        };
        self.next += 1;
        self.devices.push(info);
        Ok(info)
    }

    /// The `virtio_mmio.device=` parameters for kernels that take them.
    pub fn cmdline_params(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| {
                format!(
                    "virtio_mmio.device={}K@{:#x}:{}",
                    d.len >> 10,
                    d.base,
                    d.gsi
                )
            })
            .collect()
    }
}

fn wire_err(index: u32, what: &'static str) -> impl Fn(std::io::Error) -> DeviceError {
    move |source| DeviceError::Wire {
        index,
        what,
        source,
    }
}

fn kvm_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// Puts `device` behind a virtio-mmio transport at the next window, with its
/// queue notifications on ioeventfds and its interrupt on an irqfd.
pub fn attach_virtio(
    vm: &Vm,
    mmio: &mut Bus,
    alloc: &mut MmioAllocator,
    device: Arc<Mutex<dyn VirtioDevice>>,
    saved: Option<&MmioTransportState>,
) -> Result<Arc<Mutex<MmioTransport>>, DeviceError> {
    let info = alloc.allocate()?;
    let index = info.gsi - IRQ_BASE;
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(wire_err(index, "irqfd"))?;
    vm.fd
        .register_irqfd(&evt, info.gsi)
        .map_err(|e| wire_err(index, "KVM_IRQFD")(kvm_err(e)))?;
    let irq = Arc::new(IrqTrigger::new(evt));
    let transport = match saved {
        Some(state) => MmioTransport::restore(vm.memory.clone(), irq, device, state),
        None => MmioTransport::new(vm.memory.clone(), irq, device),
    }
    .map_err(|e| wire_err(index, "transport")(std::io::Error::other(e.to_string())))?;
    for (q, evt) in transport.queue_evts().iter().enumerate() {
        vm.fd
            .register_ioevent(
                evt,
                &IoEventAddress::Mmio(info.base + NOTIFY_REG_OFFSET),
                q as u32,
            )
            .map_err(|e| wire_err(index, "KVM_IOEVENTFD")(kvm_err(e)))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), info.base, info.len)
        .map_err(|e| wire_err(index, "MMIO bus")(std::io::Error::other(e.to_string())))?;
    Ok(transport)
}

/// Opens a disk image (locked, format declared or probed).
pub fn open_backend(d: &DiskConfig) -> Result<Box<dyn devices::disk::DiskBackend>, DeviceError> {
    open_disk(&DiskOptions {
        path: d.path.clone(),
        read_only: d.read_only,
        format: d.format,
    })
    .map_err(|source| DeviceError::Disk {
        id: d.id.clone(),
        path: d.path.display().to_string(),
        source,
    })
}

/// Opens a disk image (locked, format declared or probed) as a virtio-blk
/// device, restored from `saved` when given.
pub fn restore_block(
    d: &DiskConfig,
    saved: &devices::virtio::block::BlockState,
) -> Result<Arc<Mutex<Block>>, DeviceError> {
    let disk = open_backend(d)?;
    let blk = Block::restore(saved, disk).map_err(|e| DeviceError::Block {
        id: d.id.clone(),
        detail: e.to_string(),
    })?;
    Ok(Arc::new(Mutex::new(blk)))
}

/// Opens a disk image (locked, format declared or probed) as a virtio-blk device.
pub fn create_block(d: &DiskConfig) -> Result<Arc<Mutex<Block>>, DeviceError> {
    let disk = open_backend(d)?;
    let blk = Block::new(
        BlockArgs {
            id: d.id.clone(),
            path: d.path.clone(),
            read_only: d.read_only,
            serial: d.serial.clone(),
        },
        disk,
    )
    .map_err(|e| DeviceError::Block {
        id: d.id.clone(),
        detail: e.to_string(),
    })?;
    Ok(Arc::new(Mutex::new(blk)))
}

/// A virtio-net device over a TAP, and the bridge port to undo on teardown.
pub type NetDevice = (
    Arc<Mutex<devices::virtio::net::Net<devices::net::TapDevice>>>,
    Option<devices::net::BridgePort>,
);

/// Opens (or creates) the TAP, attaches it to its bridge, and creates the
/// virtio-net device with the configured or a generated stable MAC (or from
/// `saved`, keeping its MAC and negotiated state). A TAP in `adopted` (handed
/// over by a migration source on this host) is used as it is, already on its
/// bridge, and its port stays the source's until taken over.
pub fn create_net(
    n: &NetConfig,
    saved: Option<&devices::virtio::net::NetState>,
    adopted: &mut crate::tap_handover::AdoptedTaps,
) -> Result<NetDevice, DeviceError> {
    let err = |detail: String| DeviceError::Net {
        id: n.id.clone(),
        tap: n.tap.clone(),
        detail,
    };
    let mac = match &n.mac {
        Some(m) => m
            .parse::<devices::net::MacAddr>()
            .map_err(|e| err(e.to_string()))?,
        None => devices::net::MacAddr::generate(&format!("{}/{}", n.id, n.tap)),
    };
    let (tap, port) = match adopted.remove(&n.tap) {
        Some(tap) => {
            let port = n
                .bridge
                .as_deref()
                .map(|b| devices::net::BridgePort::adopt(&tap, b))
                .transpose()
                .map_err(|e| err(e.to_string()))?;
            (tap, port)
        }
        // The TAP's own MAC follows from the guest's, so a TAP re-created on
        // restore has the one the bridge (and the guest's neighbour cache)
        // knew: a bridge whose only port is the TAP takes its MAC.
        None => devices::net::open_tap(
            &n.tap,
            n.bridge.as_deref(),
            n.mtu,
            Some(saved.map_or(mac, |s| s.mac).tap_side()),
        )
        .map_err(|e| err(e.to_string()))?,
    };
    let mut cfg = devices::virtio::net::NetConfig::new(mac);
    if let Some(mtu) = n.mtu {
        cfg.mtu = mtu;
    }
    let net = match saved {
        Some(state) => devices::virtio::net::Net::restore(tap, state),
        None => devices::virtio::net::Net::new(tap, cfg),
    }
    .map_err(|e| err(e.to_string()))?;
    Ok((Arc::new(Mutex::new(net)), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_allocator_windows_gsis_and_cmdline() {
        let mut a = MmioAllocator::default();
        let d0 = a.allocate().unwrap();
        let d1 = a.allocate().unwrap();
        assert_eq!(d0.base, VIRTIO_MMIO_START);
        assert_eq!(d1.base, VIRTIO_MMIO_START + 0x1000);
        assert_eq!((d0.gsi, d1.gsi), (5, 6));
        assert_eq!(
            a.cmdline_params(),
            vec![
                "virtio_mmio.device=4K@0xd0000000:5".to_string(),
                "virtio_mmio.device=4K@0xd0001000:6".to_string()
            ]
        );
        for _ in 2..18 {
            a.allocate().unwrap();
        }
        assert!(matches!(a.allocate(), Err(DeviceError::TooMany(18))));
    }
}
