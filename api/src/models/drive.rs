// SPDX-License-Identifier: Apache-2.0
//! `PUT|PATCH /drives/{drive_id}`.

use serde::{Deserialize, Serialize};

use super::{validate_id, validate_path, ModelError};

/// Longest virtio-blk serial (the device's ID string is 20 bytes).
pub const MAX_SERIAL_LEN: usize = 20;

/// Host page cache behaviour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored.
    #[default]
    Unsafe,
    /// Flushes reach the host disk.
    Writeback,
}

/// How the host performs I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking syscalls.
    #[default]
    Sync,
    /// io_uring (Firecracker); not implemented by wisp.
    Async,
}

/// Image format of the backing file (wisp extension).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveFormat {
    /// A raw image.
    #[default]
    Raw,
    /// A QCOW2 image.
    Qcow2,
    /// A VMDK image (read-only).
    Vmdk,
}

/// A token bucket of a rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Bucket size in tokens (bytes or operations).
    pub size: u64,
    /// Initial extra tokens that do not refill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the whole bucket.
    pub refill_time: u64,
}

/// Bandwidth and operations limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Refuses buckets with a size but no refill time.
    pub fn validate(&self) -> Result<(), ModelError> {
        for b in [self.bandwidth, self.ops].into_iter().flatten() {
            if b.size > 0 && b.refill_time == 0 {
                return Err(ModelError::invalid(
                    "rate_limiter",
                    "refill_time must be positive when size is",
                ));
            }
        }
        Ok(())
    }
}

/// A block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Unique id, also in the URL.
    pub drive_id: String,
    /// Host path of the backing file.
    pub path_on_host: String,
    /// Whether the guest's root filesystem is on this drive.
    pub is_root_device: bool,
    /// Whether the guest sees it read-only.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition UUID (only with `is_root_device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Cache behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// I/O engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Image format (wisp extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DriveFormat>,
    /// virtio-blk serial reported to the guest (wisp extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl Drive {
    /// Checks the id, path, serial and options.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_id("drive_id", &self.drive_id)?;
        validate_path("path_on_host", &self.path_on_host)?;
        if let Some(p) = &self.partuuid {
            if !self.is_root_device {
                return Err(ModelError::invalid(
                    "partuuid",
                    "only allowed with is_root_device",
                ));
            }
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                return Err(ModelError::invalid(
                    "partuuid",
                    format!("{p:?} is not a UUID"),
                ));
            }
        }
        if let Some(s) = &self.serial {
            if s.len() > MAX_SERIAL_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ModelError::invalid(
                    "serial",
                    format!("must be at most {MAX_SERIAL_LEN} printable ASCII bytes"),
                ));
            }
        }
        if self.io_engine == Some(IoEngine::Async) {
            return Err(ModelError::unsupported("io_engine", "Async"));
        }
        if let Some(r) = &self.rate_limiter {
            r.validate()?;
        }
        Ok(())
    }

    /// Applies a PATCH.
    pub fn apply(&self, update: &PartialDrive) -> Result<Drive, ModelError> {
        let mut d = self.clone();
        if let Some(p) = &update.path_on_host {
            d.path_on_host = p.clone();
        }
        if update.rate_limiter.is_some() {
            d.rate_limiter = update.rate_limiter;
        }
        d.validate()?;
        Ok(d)
    }
}

/// `PATCH /drives/{drive_id}`: swap the backing file or change rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Id of the drive to update, also in the URL.
    pub drive_id: String,
    /// New backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// New rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl PartialDrive {
    /// Checks the fields present.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_id("drive_id", &self.drive_id)?;
        if let Some(p) = &self.path_on_host {
            validate_path("path_on_host", p)?;
        }
        if let Some(r) = &self.rate_limiter {
            r.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Drive, String> {
        let d: Drive = serde_json::from_str(s).map_err(|e| e.to_string())?;
        d.validate().map_err(|e| e.to_string())?;
        Ok(d)
    }

    #[test]
    fn good() {
        let d = parse(
            r#"{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap();
        assert!(d.is_root_device);
        let d = parse(
            r#"{"drive_id":"d1","path_on_host":"/d.qcow2","is_root_device":false,"format":"qcow2","serial":"SN-1",
                "cache_type":"Writeback","io_engine":"Sync","partuuid":null,
                "rate_limiter":{"bandwidth":{"size":1000,"refill_time":100},"ops":{"size":10,"one_time_burst":5,"refill_time":1}}}"#,
        )
        .unwrap();
        assert_eq!(d.format, Some(DriveFormat::Qcow2));
        assert_eq!(d.serial.as_deref(), Some("SN-1"));
        assert_eq!(d.cache_type, Some(CacheType::Writeback));
    }

    #[test]
    fn bad() {
        assert!(parse(r#"{"drive_id":"a","path_on_host":"/x"}"#).is_err());
        assert!(
            parse(r#"{"drive_id":"a b","path_on_host":"/x","is_root_device":false}"#)
                .unwrap_err()
                .contains("drive_id")
        );
        assert!(
            parse(r#"{"drive_id":"a","path_on_host":"","is_root_device":false}"#)
                .unwrap_err()
                .contains("path_on_host")
        );
        assert!(parse(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"format":"vdi"}"#
        )
        .is_err());
        assert!(parse(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"serial":"012345678901234567890"}"#
        )
        .unwrap_err()
        .contains("serial"));
        assert!(parse(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"io_engine":"Async"}"#
        )
        .unwrap_err()
        .contains("io_engine"));
        assert!(parse(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"partuuid":"abcd"}"#
        )
        .unwrap_err()
        .contains("partuuid"));
        assert!(parse(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"rate_limiter":{"ops":{"size":5,"refill_time":0}}}"#
        )
        .is_err());
        assert!(
            parse(r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"extra":1}"#)
                .unwrap_err()
                .contains("extra")
        );
    }

    #[test]
    fn patch() {
        let d = parse(r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false}"#).unwrap();
        let p: PartialDrive =
            serde_json::from_str(r#"{"drive_id":"a","path_on_host":"/y"}"#).unwrap();
        assert!(p.validate().is_ok());
        assert_eq!(d.apply(&p).unwrap().path_on_host, "/y");
        assert!(
            serde_json::from_str::<PartialDrive>(r#"{"drive_id":"a","is_read_only":true}"#)
                .is_err()
        );
        let p: PartialDrive =
            serde_json::from_str(r#"{"drive_id":"a","path_on_host":""}"#).unwrap();
        assert!(p.validate().is_err());
    }
}
