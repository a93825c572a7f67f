// SPDX-License-Identifier: Apache-2.0
//! `PUT /actions`.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Longest orderly-shutdown deadline accepted, in seconds.
pub const MAX_SHUTDOWN_TIMEOUT_S: u64 = 3600;

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured machine.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
    /// Wisp extension: ACPI power button, then a hard stop after `timeout_s`.
    Shutdown,
    /// Wisp extension: stop the VM at once.
    Stop,
}

/// The body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
    /// Deadline of `Shutdown`, seconds (wisp extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

impl InstanceActionInfo {
    /// Default deadline of an orderly shutdown.
    pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;

    /// `timeout_s` only goes with `Shutdown`, and is bounded.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(t) = self.timeout_s {
            if self.action_type != ActionType::Shutdown {
                return Err(ModelError::invalid(
                    "timeout_s",
                    "only allowed with action_type Shutdown",
                ));
            }
            if t > MAX_SHUTDOWN_TIMEOUT_S {
                return Err(ModelError::invalid(
                    "timeout_s",
                    format!("{t} is above {MAX_SHUTDOWN_TIMEOUT_S}"),
                ));
            }
        }
        Ok(())
    }

    /// The shutdown deadline, defaulted.
    pub fn shutdown_timeout_s(&self) -> u64 {
        self.timeout_s.unwrap_or(Self::DEFAULT_SHUTDOWN_TIMEOUT_S)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<InstanceActionInfo, String> {
        let a: InstanceActionInfo = serde_json::from_str(s).map_err(|e| e.to_string())?;
        a.validate().map_err(|e| e.to_string())?;
        Ok(a)
    }

    #[test]
    fn actions() {
        for t in [
            "InstanceStart",
            "SendCtrlAltDel",
            "FlushMetrics",
            "Shutdown",
            "Stop",
        ] {
            assert!(parse(&format!(r#"{{"action_type":"{t}"}}"#)).is_ok(), "{t}");
        }
        let a = parse(r#"{"action_type":"Shutdown","timeout_s":5}"#).unwrap();
        assert_eq!(a.shutdown_timeout_s(), 5);
        assert!(parse(r#"{"action_type":"Stop","timeout_s":5}"#)
            .unwrap_err()
            .contains("timeout_s"));
        assert!(parse(r#"{"action_type":"Shutdown","timeout_s":99999}"#).is_err());
        assert!(parse(r#"{"action_type":"Reboot"}"#).is_err());
        assert!(parse(r#"{"action_type":"Stop","x":1}"#).is_err());
        assert!(parse(r#"{}"#).is_err());
    }
}
