// SPDX-License-Identifier: Apache-2.0
//! The whole VM configuration: the `--config-file` form and `GET /vm/config`.

use serde::{Deserialize, Serialize};

use super::{BootSource, Drive, Logger, MachineConfig, Metrics, ModelError, NetworkInterface};

/// All pre-boot configuration, with Firecracker's config-file key names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    /// Kernel, initrd, command line.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Network devices.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

impl FullVmConfig {
    /// Parses and validates a config file's text.
    pub fn from_json(text: &str) -> Result<FullVmConfig, String> {
        let mut de = serde_json::Deserializer::from_str(text);
        let c: FullVmConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            }
        })?;
        de.end().map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// Validates every section; ids must be unique and at most one root drive.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(b) = &self.boot_source {
            b.validate()?;
        }
        if let Some(m) = &self.machine_config {
            m.validate()?;
        }
        let mut roots = 0;
        for (i, d) in self.drives.iter().enumerate() {
            d.validate()?;
            if d.is_root_device {
                roots += 1;
            }
            if self.drives[..i].iter().any(|o| o.drive_id == d.drive_id) {
                return Err(ModelError::invalid(
                    "drive_id",
                    format!("{} is used twice", d.drive_id),
                ));
            }
        }
        if roots > 1 {
            return Err(ModelError::invalid(
                "is_root_device",
                "only one drive may be the root device",
            ));
        }
        for (i, n) in self.network_interfaces.iter().enumerate() {
            n.validate()?;
            if self.network_interfaces[..i]
                .iter()
                .any(|o| o.iface_id == n.iface_id)
            {
                return Err(ModelError::invalid(
                    "iface_id",
                    format!("{} is used twice", n.iface_id),
                ));
            }
        }
        if let Some(l) = &self.logger {
            l.validate()?;
        }
        if let Some(m) = &self.metrics {
            m.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file() {
        let c = FullVmConfig::from_json(
            r#"{
              "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
              "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}],
              "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]
            }"#,
        )
        .unwrap();
        assert_eq!(c.drives.len(), 1);
        let back = FullVmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(FullVmConfig::from_json(r#"{"vsock":{}}"#)
            .unwrap_err()
            .contains("vsock"));
        assert!(FullVmConfig::from_json(
            r#"{"drives":[{"drive_id":"a","path_on_host":"/r","is_root_device":true},{"drive_id":"a","path_on_host":"/s","is_root_device":false}]}"#
        )
        .unwrap_err()
        .contains("twice"));
        assert!(FullVmConfig::from_json(
            r#"{"drives":[{"drive_id":"a","path_on_host":"/r","is_root_device":true},{"drive_id":"b","path_on_host":"/s","is_root_device":true}]}"#
        )
        .is_err());
        assert!(
            FullVmConfig::from_json(r#"{"machine-config":{"vcpu_count":0,"mem_size_mib":1}}"#)
                .is_err()
        );
        assert_eq!(
            FullVmConfig::from_json("{}").unwrap(),
            FullVmConfig::default()
        );
    }
}
