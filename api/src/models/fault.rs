// SPDX-License-Identifier: Apache-2.0
//! The error body every failed request gets, and the fault the VMM returns.

use serde::{Deserialize, Serialize};

/// An error answer: an HTTP status and the `{"fault_message": ...}` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiFault {
    /// HTTP status code (4xx for a refused request, 5xx for a VMM failure).
    #[serde(skip)]
    pub status: u16,
    /// Human-readable explanation.
    pub fault_message: String,
}

impl ApiFault {
    /// A fault with any status.
    pub fn new(status: u16, fault_message: impl Into<String>) -> Self {
        ApiFault {
            status,
            fault_message: fault_message.into(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(fault_message: impl Into<String>) -> Self {
        Self::new(400, fault_message)
    }

    /// 500 Internal Server Error.
    pub fn internal(fault_message: impl Into<String>) -> Self {
        Self::new(500, fault_message)
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> String {
        serde_json::json!({ "fault_message": self.fault_message }).to_string()
    }
}

impl std::fmt::Display for ApiFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.fault_message, self.status)
    }
}

impl std::error::Error for ApiFault {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let f = ApiFault::bad_request("nope \"x\"");
        let v: serde_json::Value = serde_json::from_str(&f.body()).unwrap();
        assert_eq!(v["fault_message"], "nope \"x\"");
        assert_eq!(f.status, 400);
    }
}
