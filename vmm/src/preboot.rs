// SPDX-License-Identifier: Apache-2.0
//! The configuration a VMM accumulates before boot (from the API, a config file
//! or the command line), and its conversion to and from the API's models.

use std::path::PathBuf;

use api::models::{BootSource, Drive, DriveFormat, FullVmConfig, MachineConfig, NetworkInterface};

use crate::config::{DiskConfig, NetConfig, SerialConfig, VmConfig, DEFAULT_CMDLINE};
use devices::disk::ImageFormat;

/// Pre-boot configuration, in API terms.
#[derive(Debug, Clone)]
pub struct Preboot {
    /// `PUT /boot-source`.
    pub boot_source: Option<BootSource>,
    /// `PUT /machine-config`.
    pub machine: MachineConfig,
    /// `PUT /drives/{id}`, in insertion order.
    pub drives: Vec<Drive>,
    /// `PUT /network-interfaces/{id}`, in insertion order.
    pub nets: Vec<NetworkInterface>,
    /// Console destination (not part of Firecracker's API).
    pub serial: SerialConfig,
}

impl Default for Preboot {
    fn default() -> Self {
        Self {
            boot_source: None,
            machine: MachineConfig::default(),
            drives: Vec::new(),
            nets: Vec::new(),
            serial: SerialConfig::Stdio,
        }
    }
}

/// Why the pre-boot configuration cannot boot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrebootError {
    /// No boot source was configured.
    #[error("No boot source configured: PUT /boot-source first")]
    NoBootSource,
    /// Two root devices.
    #[error("Only one drive can be the root device ({0} and {1} both are)")]
    TwoRoots(String, String),
}

impl Preboot {
    /// From a Firecracker-style configuration file.
    pub fn from_full(cfg: FullVmConfig) -> Self {
        let mut p = Preboot {
            boot_source: cfg.boot_source,
            ..Default::default()
        };
        if let Some(m) = cfg.machine_config {
            p.machine = m;
        }
        p.drives = cfg.drives;
        p.nets = cfg.network_interfaces;
        p
    }

    /// Inserts or replaces a drive by id.
    pub fn put_drive(&mut self, d: Drive) {
        match self.drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
            Some(x) => *x = d,
            None => self.drives.push(d),
        }
    }

    /// Inserts or replaces a network interface by id.
    pub fn put_net(&mut self, n: NetworkInterface) {
        match self.nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
            Some(x) => *x = n,
            None => self.nets.push(n),
        }
    }

    /// The configuration an incoming migration is checked against: no boot
    /// source is needed (the guest's state arrives with it).
    pub fn to_vm_config_for_incoming(&self) -> VmConfig {
        let mut p = self.clone();
        if p.boot_source.is_none() {
            p.boot_source = Some(BootSource {
                kernel_image_path: String::new(),
                initrd_path: None,
                boot_args: None,
            });
        }
        // Only a missing boot source or two roots fail; two roots fail later.
        p.to_vm_config().unwrap_or_else(|_| VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: String::new(),
            vcpus: p.machine.vcpu_count,
            mem_size: (p.machine.mem_size_mib as u64) << 20,
            serial: p.serial.clone(),
            disks: Vec::new(),
            nets: Vec::new(),
            track_dirty_pages: false,
        })
    }

    /// The VM configuration to boot.
    pub fn to_vm_config(&self) -> Result<VmConfig, PrebootError> {
        let bs = self
            .boot_source
            .as_ref()
            .ok_or(PrebootError::NoBootSource)?;
        let roots: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        if roots.len() > 1 {
            return Err(PrebootError::TwoRoots(
                roots[0].drive_id.clone(),
                roots[1].drive_id.clone(),
            ));
        }
        Ok(VmConfig {
            kernel: PathBuf::from(&bs.kernel_image_path),
            initrd: bs.initrd_path.as_ref().map(PathBuf::from),
            cmdline: bs
                .boot_args
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            vcpus: self.machine.vcpu_count,
            mem_size: (self.machine.mem_size_mib as u64) << 20,
            serial: self.serial.clone(),
            disks: self.drives.iter().map(disk_config).collect(),
            nets: self.nets.iter().map(net_config).collect(),
            track_dirty_pages: self.machine.track_dirty_pages,
        })
    }
}

/// A drive from the API as the VMM configures it.
pub fn disk_config(d: &Drive) -> DiskConfig {
    DiskConfig {
        path: PathBuf::from(&d.path_on_host),
        read_only: d.is_read_only,
        id: d.drive_id.clone(),
        serial: d.serial.clone(),
        format: d.format.map(|f| match f {
            DriveFormat::Raw => ImageFormat::Raw,
            DriveFormat::Qcow2 => ImageFormat::Qcow2,
            DriveFormat::Vmdk => ImageFormat::Vmdk,
        }),
        root: d.is_root_device,
    }
}

/// A configured disk as the API shows it (the inverse of [`disk_config`]).
pub fn drive(d: &DiskConfig) -> Drive {
    Drive {
        drive_id: d.id.clone(),
        path_on_host: d.path.display().to_string(),
        is_root_device: d.root,
        is_read_only: d.read_only,
        partuuid: None,
        cache_type: None,
        rate_limiter: None,
        io_engine: None,
        format: d.format.map(|f| match f {
            ImageFormat::Raw => DriveFormat::Raw,
            ImageFormat::Qcow2 => DriveFormat::Qcow2,
            ImageFormat::Vmdk => DriveFormat::Vmdk,
        }),
        serial: d.serial.clone(),
    }
}

/// A network interface from the API as the VMM configures it.
pub fn net_config(n: &NetworkInterface) -> NetConfig {
    NetConfig {
        id: n.iface_id.clone(),
        tap: n.host_dev_name.clone(),
        mac: n.guest_mac.clone(),
        bridge: n.bridge.clone(),
        mtu: n.mtu,
    }
}

/// A configured NIC as the API shows it (the inverse of [`net_config`]).
pub fn network_interface(n: &NetConfig) -> NetworkInterface {
    NetworkInterface {
        iface_id: n.id.clone(),
        host_dev_name: n.tap.clone(),
        guest_mac: n.mac.clone(),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        bridge: n.bridge.clone(),
        mtu: n.mtu,
    }
}

/// The API view (`GET /vm/config`) of a VM configuration.
pub fn full_config(cfg: &VmConfig) -> FullVmConfig {
    FullVmConfig {
        boot_source: Some(BootSource {
            kernel_image_path: cfg.kernel.display().to_string(),
            initrd_path: cfg.initrd.as_ref().map(|p| p.display().to_string()),
            boot_args: Some(cfg.cmdline.clone()),
        }),
        machine_config: Some(machine_config(cfg)),
        drives: cfg.disks.iter().map(drive).collect(),
        network_interfaces: cfg.nets.iter().map(network_interface).collect(),
        ..Default::default()
    }
}

/// The API view (`GET /machine-config`) of a VM configuration.
pub fn machine_config(cfg: &VmConfig) -> MachineConfig {
    MachineConfig {
        vcpu_count: cfg.vcpus,
        mem_size_mib: (cfg.mem_size >> 20) as usize,
        smt: false,
        track_dirty_pages: cfg.track_dirty_pages,
        cpu_template: None,
        huge_pages: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_preboot_needs_boot_source_and_roundtrips() {
        let mut p = Preboot::default();
        assert_eq!(p.to_vm_config(), Err(PrebootError::NoBootSource));
        p.boot_source = Some(BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        });
        let cfg = p.to_vm_config().unwrap();
        assert_eq!(cfg.mem_size, 128 << 20);
        assert_eq!(cfg.cmdline, "console=ttyS0");
        let full = full_config(&cfg);
        let back = Preboot::from_full(full).to_vm_config().unwrap();
        assert_eq!(back, cfg);
    }
}
