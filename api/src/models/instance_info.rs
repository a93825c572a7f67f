// SPDX-License-Identifier: Apache-2.0
//! `GET /` and `GET /version` answers.

use serde::{Deserialize, Serialize};

/// Run state as reported by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured but not booted.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// The answer of `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance id.
    pub id: String,
    /// Run state.
    pub state: InstanceState,
    /// Version of the VMM.
    pub vmm_version: String,
    /// Name of the VMM application.
    pub app_name: String,
}

/// The answer of `GET /version` (Firecracker's key name, kept for compatibility).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmVersion {
    /// Version of the VMM.
    pub firecracker_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let i = InstanceInfo {
            id: "anonymous-instance".into(),
            state: InstanceState::NotStarted,
            vmm_version: "0.1.0".into(),
            app_name: "wisp".into(),
        };
        let v = serde_json::to_value(&i).unwrap();
        assert_eq!(v["state"], "Not started");
        let back: InstanceInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, i);
    }
}
