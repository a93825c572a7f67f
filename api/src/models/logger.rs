// SPDX-License-Identifier: Apache-2.0
//! `PUT /logger`.

use serde::{Deserialize, Serialize};

use super::{validate_path, ModelError};

/// Log verbosity. Firecracker also accepts the capitalised spellings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Logging off.
    #[serde(alias = "off", alias = "OFF")]
    Off,
    /// Errors only.
    #[serde(alias = "error", alias = "ERROR")]
    Error,
    /// Warnings and errors.
    #[serde(alias = "warning", alias = "WARNING", alias = "Warn", alias = "warn")]
    Warning,
    /// Informational (the default, as in Firecracker).
    #[default]
    #[serde(alias = "info", alias = "INFO")]
    Info,
    /// Debugging.
    #[serde(alias = "debug", alias = "DEBUG")]
    Debug,
    /// Everything.
    #[serde(alias = "trace", alias = "TRACE")]
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The body of `PUT /logger`. Every field is optional, as in Firecracker:
/// what is absent keeps its current setting (the log stays where it is when
/// `log_path` is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// File or FIFO the log is written to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Verbosity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix lines with the level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix lines with file:line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module path (and its submodules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// Checks the path and module, when given.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(p) = &self.log_path {
            validate_path("log_path", p)?;
        }
        if let Some(m) = &self.module {
            if m.is_empty() {
                return Err(ModelError::invalid("module", "must not be empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let l: Logger = serde_json::from_str(
            r#"{"log_path":"/tmp/l","level":"Debug","show_level":true,"show_log_origin":false}"#,
        )
        .unwrap();
        assert_eq!(
            l.level.map(LogLevel::to_filter),
            Some(log::LevelFilter::Debug)
        );
        assert!(l.validate().is_ok());
        let l: Logger = serde_json::from_str(r#"{"log_path":"/tmp/l","level":"info"}"#).unwrap();
        assert_eq!(l.level, Some(LogLevel::Info));
        let l: Logger = serde_json::from_str(r#"{"log_path":""}"#).unwrap();
        assert!(l.validate().is_err());
        assert!(serde_json::from_str::<Logger>(r#"{"log_path":"/l","level":"Loud"}"#).is_err());
        assert!(serde_json::from_str::<Logger>(r#"{"log_path":"/l","colour":true}"#).is_err());
    }

    #[test]
    fn every_field_is_optional() {
        let l: Logger = serde_json::from_str("{}").unwrap();
        assert_eq!(l, Logger::default());
        assert!(l.validate().is_ok());
        let l: Logger =
            serde_json::from_str(r#"{"level":"Warning","module":"vmm::runtime"}"#).unwrap();
        assert_eq!(l.log_path, None);
        assert_eq!(l.module.as_deref(), Some("vmm::runtime"));
        assert!(l.validate().is_ok());
        let l: Logger = serde_json::from_str(r#"{"module":""}"#).unwrap();
        assert!(l.validate().unwrap_err().to_string().contains("module"));
    }
}
