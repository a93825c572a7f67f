// SPDX-License-Identifier: Apache-2.0
//! `PUT /snapshot/create` and `PUT /snapshot/load`.

use serde::{Deserialize, Serialize};

use super::network_interface::validate_ifname;
use super::{validate_id, validate_path, ModelError};

/// Full or dirty-pages-only snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All guest memory.
    #[default]
    Full,
    /// Only pages dirtied since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// The body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the device/vCPU state goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
}

impl SnapshotCreateParams {
    /// Checks the paths.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_path("snapshot_path", &self.snapshot_path)?;
        validate_path("mem_file_path", &self.mem_file_path)?;
        if self.snapshot_path == self.mem_file_path {
            return Err(ModelError::invalid(
                "mem_file_path",
                "must differ from snapshot_path",
            ));
        }
        Ok(())
    }
}

/// How guest memory is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// Map a memory file.
    File,
    /// Userfaultfd handler (Firecracker); not implemented by wisp.
    Uffd,
}

/// Guest memory source of a snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// The backend kind.
    pub backend_type: MemBackendType,
    /// Path of the memory file.
    pub backend_path: String,
}

/// Re-points a restored NIC at another TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The saved interface's id.
    pub iface_id: String,
    /// The TAP device it opens instead of the saved one.
    pub host_dev_name: String,
}

/// The body of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The device/vCPU state file.
    pub snapshot_path: String,
    /// Memory source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Legacy spelling of a `File` memory backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// Keep tracking dirty pages after the load.
    #[serde(default, alias = "enable_diff_snapshots")]
    pub track_dirty_pages: bool,
    /// Resume the VM after loading.
    #[serde(default)]
    pub resume_vm: bool,
    /// NICs that open another TAP than the one saved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Firecracker's vsock socket override; wisp has no vsock device, so only
    /// `null` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<serde_json::Value>,
    /// Firecracker: move kvmclock to the host's real time on load. Not
    /// supported by wisp (only `false`).
    #[serde(default)]
    pub clock_realtime: bool,
}

impl SnapshotLoadParams {
    /// Exactly one memory source, of type `File`, and valid paths.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_path("snapshot_path", &self.snapshot_path)?;
        if self.vsock_override.is_some() {
            return Err(ModelError::invalid(
                "vsock_override",
                "wisp has no vsock device, so there is no vsock to override",
            ));
        }
        if self.clock_realtime {
            return Err(ModelError::invalid(
                "clock_realtime",
                "true is not supported: wisp restores kvmclock from the saved value",
            ));
        }
        for (i, o) in self.network_overrides.iter().enumerate() {
            validate_id("network_overrides.iface_id", &o.iface_id)?;
            validate_ifname("network_overrides.host_dev_name", &o.host_dev_name)?;
            if self.network_overrides[..i]
                .iter()
                .any(|x| x.iface_id == o.iface_id)
            {
                return Err(ModelError::invalid(
                    "network_overrides.iface_id",
                    format!("{} is overridden twice", o.iface_id),
                ));
            }
        }
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(ModelError::invalid(
                "mem_backend",
                "give either mem_backend or mem_file_path, not both",
            )),
            (None, None) => Err(ModelError::invalid(
                "mem_backend",
                "one of mem_backend or mem_file_path is required",
            )),
            (None, Some(p)) => validate_path("mem_file_path", p),
            (Some(b), None) => {
                if b.backend_type == MemBackendType::Uffd {
                    return Err(ModelError::unsupported("mem_backend.backend_type", "Uffd"));
                }
                validate_path("mem_backend.backend_path", &b.backend_path)
            }
        }
    }

    /// The memory file, whichever way it was given.
    pub fn mem_path(&self) -> Option<&str> {
        self.mem_backend
            .as_ref()
            .map(|b| b.backend_path.as_str())
            .or(self.mem_file_path.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create() {
        let c: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#).unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Full);
        assert!(c.validate().is_ok());
        let c: SnapshotCreateParams = serde_json::from_str(
            r#"{"snapshot_type":"Diff","snapshot_path":"/s","mem_file_path":"/m"}"#,
        )
        .unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Diff);
        let c: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path":"/s","mem_file_path":"/s"}"#).unwrap();
        assert!(c.validate().is_err());
        assert!(serde_json::from_str::<SnapshotCreateParams>(r#"{"snapshot_path":"/s"}"#).is_err());
        assert!(serde_json::from_str::<SnapshotCreateParams>(
            r#"{"snapshot_type":"Partial","snapshot_path":"/s","mem_file_path":"/m"}"#
        )
        .is_err());
    }

    fn load(s: &str) -> Result<SnapshotLoadParams, String> {
        let l: SnapshotLoadParams = serde_json::from_str(s).map_err(|e| e.to_string())?;
        l.validate().map_err(|e| e.to_string())?;
        Ok(l)
    }

    #[test]
    fn load_forms() {
        let l = load(
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},"resume_vm":true}"#,
        )
        .unwrap();
        assert_eq!(l.mem_path(), Some("/m"));
        assert!(l.resume_vm);
        let l =
            load(r#"{"snapshot_path":"/s","mem_file_path":"/m2","enable_diff_snapshots":true}"#)
                .unwrap();
        assert_eq!(l.mem_path(), Some("/m2"));
        assert!(l.track_dirty_pages);
        assert!(load(r#"{"snapshot_path":"/s"}"#)
            .unwrap_err()
            .contains("mem_backend"));
        assert!(load(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#
        )
        .is_err());
        assert!(load(
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"}}"#
        )
        .unwrap_err()
        .contains("Uffd"));
        assert!(load(r#"{"snapshot_path":"/s","mem_file_path":"/m","x":1}"#).is_err());
    }

    #[test]
    fn load_firecracker_extras() {
        let l = load(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","network_overrides":[{"iface_id":"eth0","host_dev_name":"tap7"}],"vsock_override":null,"clock_realtime":false}"#,
        )
        .unwrap();
        assert_eq!(
            l.network_overrides,
            vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap7".into()
            }]
        );
        let e = load(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","vsock_override":{"uds_path":"/v"}}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("vsock_override") && e.contains("no vsock"),
            "{e}"
        );
        let e = load(r#"{"snapshot_path":"/s","mem_file_path":"/m","clock_realtime":true}"#)
            .unwrap_err();
        assert!(e.contains("clock_realtime"), "{e}");
        let e = load(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","network_overrides":[{"iface_id":"a","host_dev_name":"t1"},{"iface_id":"a","host_dev_name":"t2"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = load(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","network_overrides":[{"iface_id":"a","host_dev_name":"a-very-long-tap-name"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("host_dev_name"), "{e}");
        assert!(load(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","network_overrides":[{"iface_id":"a"}]}"#
        )
        .is_err());
    }
}
