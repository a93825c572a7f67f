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
    /// Firecracker sections for devices wisp does not have: `null` (as
    /// Firecracker exports them) is absent, anything else is refused by
    /// [`FullVmConfig::validate`].
    #[serde(default, skip_serializing)]
    pub balloon: Option<serde_json::Value>,
    /// See `balloon`.
    #[serde(default, skip_serializing)]
    pub vsock: Option<serde_json::Value>,
    /// See `balloon`.
    #[serde(default, skip_serializing)]
    pub entropy: Option<serde_json::Value>,
    /// See `balloon`.
    #[serde(rename = "mmds-config", default, skip_serializing)]
    pub mmds_config: Option<serde_json::Value>,
    /// See `balloon`.
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<serde_json::Value>,
    /// See `balloon`.
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<serde_json::Value>,
    /// Firecracker's pmem devices: only an empty list is accepted.
    #[serde(default, skip_serializing)]
    pub pmem: Option<Vec<serde_json::Value>>,
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

    /// The first section wisp cannot honour that is present and not `null`.
    fn unsupported_section(&self) -> Option<&'static str> {
        [
            ("balloon", self.balloon.is_some()),
            ("vsock", self.vsock.is_some()),
            ("entropy", self.entropy.is_some()),
            ("mmds-config", self.mmds_config.is_some()),
            ("cpu-config", self.cpu_config.is_some()),
            ("memory-hotplug", self.memory_hotplug.is_some()),
            ("pmem", self.pmem.as_ref().is_some_and(|p| !p.is_empty())),
        ]
        .into_iter()
        .find_map(|(name, present)| present.then_some(name))
    }

    /// Validates every section; ids must be unique and at most one root drive.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(section) = self.unsupported_section() {
            return Err(ModelError::Section(section));
        }
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
        assert!(FullVmConfig::from_json(r#"{"bogus":{}}"#)
            .unwrap_err()
            .contains("bogus"));
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

    #[test]
    fn firecracker_null_sections_are_absent() {
        let c = FullVmConfig::from_json(
            r#"{
              "balloon": null, "drives": [], "boot-source": {"kernel_image_path": "/k"},
              "cpu-config": null, "logger": null, "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
              "metrics": null, "mmds-config": null, "network-interfaces": [], "vsock": null,
              "entropy": null, "memory-hotplug": null, "pmem": []
            }"#,
        )
        .unwrap();
        assert!(c.balloon.is_none() && c.vsock.is_none() && c.logger.is_none());
        // Not written back: GET /vm/config shows what wisp has.
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            !text.contains("balloon") && !text.contains("pmem"),
            "{text}"
        );
    }

    #[test]
    fn sections_wisp_cannot_honour_are_named() {
        for (json, name) in [
            (
                r#"{"balloon":{"amount_mib":0,"deflate_on_oom":false}}"#,
                "balloon",
            ),
            (r#"{"vsock":{"guest_cid":3,"uds_path":"/v"}}"#, "vsock"),
            (r#"{"entropy":{}}"#, "entropy"),
            (
                r#"{"mmds-config":{"network_interfaces":["eth0"]}}"#,
                "mmds-config",
            ),
            (r#"{"cpu-config":"/t.json"}"#, "cpu-config"),
            (r#"{"pmem":[{"id":"p"}]}"#, "pmem"),
        ] {
            let e = FullVmConfig::from_json(json).unwrap_err();
            assert!(
                e.contains(name) && e.contains("not supported"),
                "{json}: {e}"
            );
        }
    }
}
