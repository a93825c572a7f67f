// SPDX-License-Identifier: Apache-2.0
//! Live migration (wisp extension): `PUT /migration/receive`, `PUT /migration/send`,
//! `GET /migration`, `PUT /migration/cancel`.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Longest migration URI accepted.
pub const MAX_URI_LEN: usize = 4096;

/// Checks a migration URI: `unix:PATH` or `tcp:HOST:PORT`.
pub fn validate_uri(uri: &str) -> Result<(), ModelError> {
    if uri.len() > MAX_URI_LEN || uri.contains('\0') {
        return Err(ModelError::invalid("uri", "too long or contains NUL"));
    }
    if let Some(path) = uri.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ModelError::invalid("uri", "unix: needs a path"));
        }
        return Ok(());
    }
    if let Some(rest) = uri.strip_prefix("tcp:") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| ModelError::invalid("uri", format!("{uri:?} is not tcp:HOST:PORT")))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(ModelError::invalid(
                "uri",
                format!("{uri:?} is not tcp:HOST:PORT"),
            ));
        }
        return Ok(());
    }
    Err(ModelError::invalid(
        "uri",
        format!("{uri:?} must start with unix: or tcp:"),
    ))
}

/// The body of `PUT /migration/receive`: listen for an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReceive {
    /// Where to listen: `unix:PATH` or `tcp:HOST:PORT`.
    pub uri: String,
    /// Give up if the handshake, or any later frame, takes longer than this
    /// many seconds (default: the VMM's `--migration-timeout`, else 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// A file holding the migration token the sender must prove it knows
    /// (default: the VMM's `--migration-token-file`, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl MigrationReceive {
    /// Longest `timeout_s` accepted.
    pub const MAX_TIMEOUT_S: u64 = 3600;

    /// Checks the URI, timeout and token file name.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_uri(&self.uri)?;
        if let Some(t) = self.timeout_s {
            if t == 0 || t > Self::MAX_TIMEOUT_S {
                return Err(ModelError::invalid(
                    "timeout_s",
                    format!("{t} is outside 1..={}", Self::MAX_TIMEOUT_S),
                ));
            }
        }
        validate_token_file(self.token_file.as_deref())
    }
}

/// Checks a `token_file`: a non-empty path without NUL.
fn validate_token_file(f: Option<&str>) -> Result<(), ModelError> {
    match f {
        Some(f) if f.is_empty() || f.contains('\0') || f.len() > MAX_URI_LEN => Err(
            ModelError::invalid("token_file", "empty, too long or contains NUL"),
        ),
        _ => Ok(()),
    }
}

/// The body of `PUT /migration/send`: migrate this VM away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSend {
    /// Destination: `unix:PATH` or `tcp:HOST:PORT`.
    pub uri: String,
    /// Longest acceptable pause of the final copy, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Throttle vCPUs when pre-copy does not converge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,
    /// Cap on the migration stream's bandwidth, MiB/s (unlimited if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib_s: Option<u64>,
    /// A file holding the migration token; the receiver must prove it knows
    /// it (default: the VMM's `--migration-token-file`, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl MigrationSend {
    /// Default `max_downtime_ms`.
    pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;

    /// Checks the URI and downtime.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_uri(&self.uri)?;
        if let Some(d) = self.max_downtime_ms {
            if d == 0 || d > 60_000 {
                return Err(ModelError::invalid(
                    "max_downtime_ms",
                    format!("{d} is outside 1..=60000"),
                ));
            }
        }
        if let Some(b) = self.max_bandwidth_mib_s {
            if b == 0 || b > 1_000_000 {
                return Err(ModelError::invalid(
                    "max_bandwidth_mib_s",
                    format!("{b} is outside 1..=1000000"),
                ));
            }
        }
        validate_token_file(self.token_file.as_deref())
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationState {
    /// No migration has been started.
    #[default]
    None,
    /// Waiting for or receiving a migration.
    Receiving,
    /// Sending this VM.
    Sending,
    /// Finished successfully.
    Completed,
    /// Failed; see `error`.
    Failed,
    /// Cancelled by `PUT /migration/cancel`.
    Cancelled,
}

/// The answer of `GET /migration`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Current state.
    pub state: MigrationState,
    /// Peer URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Memory bytes transferred so far.
    #[serde(default)]
    pub transferred_bytes: u64,
    /// Guest memory size in bytes.
    #[serde(default)]
    pub total_bytes: u64,
    /// Pre-copy iteration number.
    #[serde(default)]
    pub iteration: u32,
    /// Dirty pages left in the last iteration.
    #[serde(default)]
    pub remaining_dirty_pages: u64,
    /// Measured downtime of a completed migration, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert!(validate_uri("unix:/tmp/m.sock").is_ok());
        assert!(validate_uri("tcp:127.0.0.1:4444").is_ok());
        assert!(validate_uri("tcp:[::1]:4444").is_ok());
        assert!(validate_uri("tcp:127.0.0.1").is_err());
        assert!(validate_uri("tcp::1").is_err());
        assert!(validate_uri("tcp:h:99999").is_err());
        assert!(validate_uri("unix:").is_err());
        assert!(validate_uri("http://x").is_err());
    }

    #[test]
    fn bodies() {
        let s: MigrationSend =
            serde_json::from_str(r#"{"uri":"unix:/m","max_downtime_ms":100,"auto_converge":true}"#)
                .unwrap();
        assert!(s.validate().is_ok());
        let s: MigrationSend =
            serde_json::from_str(r#"{"uri":"unix:/m","max_downtime_ms":0}"#).unwrap();
        assert!(s.validate().is_err());
        assert!(serde_json::from_str::<MigrationSend>(r#"{"uri":"unix:/m","speed":1}"#).is_err());
        let r: MigrationReceive = serde_json::from_str(r#"{"uri":"tcp:0.0.0.0:7"}"#).unwrap();
        assert!(r.validate().is_ok());
        assert!(serde_json::from_str::<MigrationReceive>(r#"{}"#).is_err());
        let r: MigrationReceive =
            serde_json::from_str(r#"{"uri":"unix:/m","timeout_s":5,"token_file":"/t"}"#).unwrap();
        assert_eq!(
            (r.timeout_s, r.token_file.as_deref()),
            (Some(5), Some("/t"))
        );
        r.validate().unwrap();
        for bad in [
            r#"{"uri":"unix:/m","timeout_s":0}"#,
            r#"{"uri":"unix:/m","timeout_s":3601}"#,
            r#"{"uri":"unix:/m","token_file":""}"#,
        ] {
            let r: MigrationReceive = serde_json::from_str(bad).unwrap();
            assert!(r.validate().is_err(), "{bad}");
        }
        let s: MigrationSend =
            serde_json::from_str(r#"{"uri":"unix:/m","token_file":"/t"}"#).unwrap();
        assert_eq!(s.token_file.as_deref(), Some("/t"));
        s.validate().unwrap();
        let st = MigrationStatus::default();
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["state"], "None");
    }
}
