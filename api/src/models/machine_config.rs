// SPDX-License-Identifier: Apache-2.0
//! `GET|PUT|PATCH /machine-config`.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Most vCPUs a guest may have.
pub const MAX_VCPUS: u8 = 32;
/// Most guest memory, in MiB (1 TiB).
pub const MAX_MEM_MIB: usize = 1 << 20;

/// Firecracker CPU templates; wisp implements only `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// No template: the host CPUID, filtered.
    #[default]
    None,
    /// Firecracker's C3 template.
    C3,
    /// Firecracker's T2 template.
    T2,
    /// Firecracker's T2S template.
    T2S,
    /// Firecracker's T2CL template.
    T2CL,
    /// Firecracker's T2A template.
    T2A,
    /// Firecracker's V1N1 template.
    V1N1,
}

/// Backing page size of guest memory; wisp implements only `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages via madvise.
    Transparent,
    /// 2 MiB huge pages.
    #[serde(rename = "2M")]
    Huge2M,
}

/// The machine's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1..=32.
    pub vcpu_count: u8,
    /// Guest memory in MiB, at least 1.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading (unsupported: must be false).
    #[serde(default)]
    pub smt: bool,
    /// Track dirty pages (for diff snapshots and live migration).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

impl MachineConfig {
    /// Checks ranges and refuses what wisp does not implement.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_vcpus(self.vcpu_count)?;
        validate_mem(self.mem_size_mib)?;
        validate_unsupported(Some(self.smt), self.cpu_template, self.huge_pages)
    }

    /// Applies a PATCH, then validates the result.
    pub fn apply(&self, update: &MachineConfigUpdate) -> Result<MachineConfig, ModelError> {
        let mut c = self.clone();
        if let Some(v) = update.vcpu_count {
            c.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            c.mem_size_mib = v;
        }
        if let Some(v) = update.smt {
            c.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            c.track_dirty_pages = v;
        }
        if update.cpu_template.is_some() {
            c.cpu_template = update.cpu_template;
        }
        if update.huge_pages.is_some() {
            c.huge_pages = update.huge_pages;
        }
        c.validate()?;
        Ok(c)
    }
}

/// `PATCH /machine-config`: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    /// Simultaneous multithreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Track dirty pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// Checks the fields present.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(v) = self.vcpu_count {
            validate_vcpus(v)?;
        }
        if let Some(m) = self.mem_size_mib {
            validate_mem(m)?;
        }
        validate_unsupported(self.smt, self.cpu_template, self.huge_pages)
    }
}

fn validate_vcpus(v: u8) -> Result<(), ModelError> {
    if v == 0 || v > MAX_VCPUS {
        return Err(ModelError::invalid(
            "vcpu_count",
            format!("{v} is outside 1..={MAX_VCPUS}"),
        ));
    }
    Ok(())
}

fn validate_mem(m: usize) -> Result<(), ModelError> {
    if m == 0 || m > MAX_MEM_MIB {
        return Err(ModelError::invalid(
            "mem_size_mib",
            format!("{m} is outside 1..={MAX_MEM_MIB}"),
        ));
    }
    Ok(())
}

fn validate_unsupported(
    smt: Option<bool>,
    cpu_template: Option<CpuTemplate>,
    huge_pages: Option<HugePages>,
) -> Result<(), ModelError> {
    if smt == Some(true) {
        return Err(ModelError::unsupported("smt", "true"));
    }
    if let Some(t) = cpu_template {
        if t != CpuTemplate::None {
            return Err(ModelError::unsupported("cpu_template", format!("{t:?}")));
        }
    }
    match huge_pages {
        Some(HugePages::Huge2M) => return Err(ModelError::unsupported("huge_pages", "2M")),
        Some(HugePages::Transparent) => {
            return Err(ModelError::unsupported("huge_pages", "Transparent"))
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MachineConfig, String> {
        let c: MachineConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn good() {
        let c = parse(r#"{"vcpu_count":2,"mem_size_mib":256}"#).unwrap();
        assert_eq!(c.vcpu_count, 2);
        assert!(!c.smt);
        let c = parse(
            r#"{"vcpu_count":32,"mem_size_mib":1024,"smt":false,"track_dirty_pages":true,"cpu_template":"None","huge_pages":"None"}"#,
        )
        .unwrap();
        assert!(c.track_dirty_pages);
    }

    #[test]
    fn bad() {
        assert!(parse(r#"{"vcpu_count":0,"mem_size_mib":256}"#)
            .unwrap_err()
            .contains("vcpu_count"));
        assert!(parse(r#"{"vcpu_count":33,"mem_size_mib":256}"#).is_err());
        assert!(parse(r#"{"vcpu_count":300,"mem_size_mib":256}"#).is_err());
        assert!(parse(r#"{"vcpu_count":1,"mem_size_mib":0}"#)
            .unwrap_err()
            .contains("mem_size_mib"));
        assert!(parse(r#"{"vcpu_count":1}"#).is_err());
        assert!(parse(r#"{"vcpu_count":1,"mem_size_mib":1,"bogus":1}"#)
            .unwrap_err()
            .contains("bogus"));
        assert!(parse(r#"{"vcpu_count":1,"mem_size_mib":1,"smt":true}"#)
            .unwrap_err()
            .contains("smt"));
        assert!(
            parse(r#"{"vcpu_count":1,"mem_size_mib":1,"cpu_template":"T2"}"#)
                .unwrap_err()
                .contains("cpu_template")
        );
        assert!(
            parse(r#"{"vcpu_count":1,"mem_size_mib":1,"huge_pages":"2M"}"#)
                .unwrap_err()
                .contains("huge_pages")
        );
        assert!(parse(r#"{"vcpu_count":1,"mem_size_mib":1,"cpu_template":"Z9"}"#).is_err());
    }

    #[test]
    fn patch() {
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"mem_size_mib":512}"#).unwrap();
        assert!(u.validate().is_ok());
        let c = MachineConfig::default().apply(&u).unwrap();
        assert_eq!(c.mem_size_mib, 512);
        assert_eq!(c.vcpu_count, 1);
        let u: MachineConfigUpdate = serde_json::from_str(r#"{"vcpu_count":0}"#).unwrap();
        assert!(u.validate().is_err());
        assert!(MachineConfig::default().apply(&u).is_err());
        assert!(serde_json::from_str::<MachineConfigUpdate>(r#"{"x":1}"#).is_err());
    }
}
