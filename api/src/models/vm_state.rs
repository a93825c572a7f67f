// SPDX-License-Identifier: Apache-2.0
//! `PATCH /vm`.

use serde::{Deserialize, Serialize};

/// Target run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Target state.
    pub state: VmState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let v: Vm = serde_json::from_str(r#"{"state":"Paused"}"#).unwrap();
        assert_eq!(v.state, VmState::Paused);
        let v: Vm = serde_json::from_str(r#"{"state":"Resumed"}"#).unwrap();
        assert_eq!(v.state, VmState::Resumed);
        assert!(serde_json::from_str::<Vm>(r#"{"state":"Running"}"#).is_err());
        assert!(serde_json::from_str::<Vm>(r#"{"state":"Paused","x":0}"#).is_err());
    }
}
