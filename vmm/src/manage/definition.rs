// SPDX-License-Identifier: Apache-2.0
//! A persistent VM definition: Firecracker's `--config-file` JSON (the shape
//! `wisp run --config-file` reads) plus wisp's `name` and `autostart` keys.
//! See docs/manage.md.

use std::io::Write;
use std::path::Path;

use api::models::FullVmConfig;
use serde_json::{Map, Value};

/// Why a definition is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefinitionError {
    /// Not JSON, or not an object.
    #[error("Invalid definition: {0}")]
    Json(String),
    /// `name` missing or not a string.
    #[error("Invalid definition: \"name\" (a string) is required")]
    NoName,
    /// `name` unusable.
    #[error("Invalid VM name '{0}': use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with '.', no '..')")]
    BadName(String),
    /// `autostart` not a boolean.
    #[error("Invalid definition: \"autostart\" must be true or false")]
    BadAutostart,
    /// A section wisp keeps elsewhere for managed VMs.
    #[error("Invalid definition: \"{0}\" is not allowed in a definition (a managed VM logs to its state directory)")]
    Section(&'static str),
    /// The Firecracker-shaped part is invalid.
    #[error("Invalid definition: {0}")]
    Config(String),
}

/// A parsed and validated definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// VM name (also its directory under the state directory).
    pub name: String,
    /// Started by `wisp autostart-all`.
    pub autostart: bool,
    /// Everything else, as `wisp run --config-file` reads it.
    pub vm: FullVmConfig,
}

impl Definition {
    /// Parses and validates a definition's text.
    pub fn parse(text: &str) -> Result<Self, DefinitionError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| DefinitionError::Json(e.to_string()))?;
        let Value::Object(mut map) = value else {
            return Err(DefinitionError::Json("expected a JSON object".into()));
        };
        let name = match map.remove("name") {
            Some(Value::String(s)) => s,
            _ => return Err(DefinitionError::NoName),
        };
        if !vmm::registry::valid_name(&name) {
            return Err(DefinitionError::BadName(name));
        }
        let autostart = match map.remove("autostart") {
            None => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(DefinitionError::BadAutostart),
        };
        for section in ["logger", "metrics"] {
            if map.contains_key(section) {
                return Err(DefinitionError::Section(section));
            }
        }
        let rest = Value::Object(map).to_string();
        let vm = FullVmConfig::from_json(&rest).map_err(DefinitionError::Config)?;
        let def = Self {
            name,
            autostart,
            vm,
        };
        def.check()?;
        Ok(def)
    }

    /// What `parse` checks beyond the JSON shape.
    fn check(&self) -> Result<(), DefinitionError> {
        if self.vm.boot_source.is_none() {
            return Err(DefinitionError::Config(
                "\"boot-source\" is required".into(),
            ));
        }
        vmm::preboot::Preboot::from_full(self.vm.clone())
            .to_vm_config()
            .map_err(|e| DefinitionError::Config(e.to_string()))?;
        Ok(())
    }

    /// The definition as stored: pretty JSON, `name` and `autostart` first.
    pub fn to_json(&self) -> String {
        let mut map = Map::new();
        map.insert("name".into(), Value::String(self.name.clone()));
        map.insert("autostart".into(), Value::Bool(self.autostart));
        if let Ok(Value::Object(vm)) = serde_json::to_value(&self.vm) {
            map.extend(vm);
        }
        let mut s = serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Only the `--config-file` part, for the VMM.
    pub fn config_file_json(&self) -> String {
        serde_json::to_string_pretty(&self.vm).unwrap_or_default()
    }

    /// Reads and validates a definition file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("Cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.unwrap_or_default(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "name": "web",
        "autostart": true,
        "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "root", "path_on_host": "/d.img", "is_root_device": true, "is_read_only": false}]
    }"#;

    #[test]
    fn test_parse_round_trip() {
        let d = Definition::parse(GOOD).unwrap();
        assert_eq!(d.name, "web");
        assert!(d.autostart);
        assert_eq!(d.vm.drives.len(), 1);
        let again = Definition::parse(&d.to_json()).unwrap();
        assert_eq!(again, d);
        // The config-file part is what `wisp run --config-file` reads.
        let fc = FullVmConfig::from_json(&d.config_file_json()).unwrap();
        assert_eq!(fc, d.vm);
        // autostart defaults to false.
        let v = GOOD.replace("\"autostart\": true,", "");
        assert!(!Definition::parse(&v).unwrap().autostart);
    }

    #[test]
    fn test_parse_refusals() {
        let e = |t: &str| Definition::parse(t).unwrap_err();
        assert!(matches!(e("{"), DefinitionError::Json(_)));
        assert!(matches!(e("[]"), DefinitionError::Json(_)));
        assert_eq!(
            e(&GOOD.replace("\"name\": \"web\",", "")),
            DefinitionError::NoName
        );
        for bad in ["../x", "a/b", ".hidden", "", "a..b"] {
            let t = GOOD.replace("\"web\"", &format!("\"{bad}\""));
            assert!(matches!(e(&t), DefinitionError::BadName(_)), "{bad}");
        }
        let long = "x".repeat(65);
        assert!(matches!(
            e(&GOOD.replace("\"web\"", &format!("\"{long}\""))),
            DefinitionError::BadName(_)
        ));
        assert_eq!(
            e(&GOOD.replace("true", "\"yes\"")),
            DefinitionError::BadAutostart
        );
        let no_boot = r#"{"name": "a", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#;
        assert!(matches!(e(no_boot), DefinitionError::Config(m) if m.contains("boot-source")));
        let unknown = GOOD.replace("\"drives\"", "\"disks\": [], \"drives\"");
        assert!(matches!(e(&unknown), DefinitionError::Config(m) if m.contains("disks")));
        let bad_cpus = GOOD.replace("\"vcpu_count\": 1", "\"vcpu_count\": 0");
        assert!(matches!(e(&bad_cpus), DefinitionError::Config(_)));
        let logger = GOOD.replace(
            "\"drives\"",
            "\"logger\": {\"log_path\": \"/l\"}, \"drives\"",
        );
        assert_eq!(e(&logger), DefinitionError::Section("logger"));
        let two_roots = GOOD.replace(
            "\"is_read_only\": false}]",
            "\"is_read_only\": false}, {\"drive_id\": \"b\", \"path_on_host\": \"/b\", \"is_root_device\": true}]",
        );
        assert!(matches!(e(&two_roots), DefinitionError::Config(_)));
    }

    #[test]
    fn test_write_atomic_replaces() {
        let dir = std::env::temp_dir().join(format!("wisp-def-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
