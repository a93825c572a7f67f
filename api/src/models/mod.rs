// SPDX-License-Identifier: Apache-2.0
//! JSON models of the API, shaped like Firecracker's, plus wisp extensions.
//!
//! Every body model rejects unknown fields and has a `validate` method that
//! checks ranges and values wisp does not support.

pub mod actions;
pub mod boot_source;
pub mod drive;
pub mod fault;
pub mod instance_info;
pub mod logger;
pub mod machine_config;
pub mod metrics;
pub mod migration;
pub mod network_interface;
pub mod snapshot;
pub mod vm_config;
pub mod vm_state;

pub use actions::{ActionType, InstanceActionInfo};
pub use boot_source::BootSource;
pub use drive::{CacheType, Drive, DriveFormat, IoEngine, PartialDrive, RateLimiter, TokenBucket};
pub use fault::ApiFault;
pub use instance_info::{InstanceInfo, InstanceState, VmmVersion};
pub use logger::{LogLevel, Logger};
pub use machine_config::{CpuTemplate, HugePages, MachineConfig, MachineConfigUpdate};
pub use metrics::Metrics;
pub use migration::{MigrationReceive, MigrationSend, MigrationState, MigrationStatus};
pub use network_interface::{NetworkInterface, PartialNetworkInterface};
pub use snapshot::{
    MemBackend, MemBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType,
};
pub use vm_config::FullVmConfig;
pub use vm_state::{Vm, VmState};

/// Why a syntactically valid body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A field has a value out of range or badly formed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A value that Firecracker accepts but wisp does not implement.
    #[error("unsupported {field}: {value} is not supported by wisp")]
    Unsupported {
        /// The offending field.
        field: &'static str,
        /// The unsupported value.
        value: String,
    },
    /// A Firecracker configuration section for a device wisp does not have.
    #[error("the {0} section is not supported by wisp; remove it or set it to null")]
    Section(&'static str),
}

impl ModelError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ModelError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(field: &'static str, value: impl Into<String>) -> Self {
        ModelError::Unsupported {
            field,
            value: value.into(),
        }
    }
}

/// Longest id (drive, interface) accepted.
pub const MAX_ID_LEN: usize = 64;
/// Longest host path accepted.
pub const MAX_PATH_LEN: usize = 4096;

/// Checks an identifier: non-empty, at most [`MAX_ID_LEN`] bytes of `[A-Za-z0-9_]`.
pub(crate) fn validate_id(field: &'static str, id: &str) -> Result<(), ModelError> {
    if id.is_empty() {
        return Err(ModelError::invalid(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ModelError::invalid(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ModelError::invalid(
            field,
            format!("{id:?} may only contain ASCII letters, digits and '_'"),
        ));
    }
    Ok(())
}

/// Checks a host path: non-empty, bounded, no NUL byte.
pub(crate) fn validate_path(field: &'static str, path: &str) -> Result<(), ModelError> {
    if path.is_empty() {
        return Err(ModelError::invalid(field, "must not be empty"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(ModelError::invalid(
            field,
            format!("longer than {MAX_PATH_LEN} bytes"),
        ));
    }
    if path.contains('\0') {
        return Err(ModelError::invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("drive_id", "rootfs_1").is_ok());
        assert!(validate_id("drive_id", "").is_err());
        assert!(validate_id("drive_id", "a/b").is_err());
        assert!(validate_id("drive_id", &"a".repeat(65)).is_err());
    }

    #[test]
    fn paths() {
        assert!(validate_path("p", "/x").is_ok());
        assert!(validate_path("p", "").is_err());
        assert!(validate_path("p", "a\0b").is_err());
    }
}
