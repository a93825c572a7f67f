// SPDX-License-Identifier: Apache-2.0
//! `PUT /metrics`.

use serde::{Deserialize, Serialize};

use super::{validate_path, ModelError};

/// The body of `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or FIFO the metrics are written to.
    pub metrics_path: String,
}

impl Metrics {
    /// Checks the path.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_path("metrics_path", &self.metrics_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let m: Metrics = serde_json::from_str(r#"{"metrics_path":"/m"}"#).unwrap();
        assert!(m.validate().is_ok());
        assert!(serde_json::from_str::<Metrics>(r#"{}"#).is_err());
        assert!(serde_json::from_str::<Metrics>(r#"{"metrics_path":"/m","x":1}"#).is_err());
    }
}
