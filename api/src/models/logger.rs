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

/// The body of `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// File or FIFO the log is written to.
    pub log_path: String,
    /// Verbosity.
    #[serde(default)]
    pub level: LogLevel,
    /// Prefix lines with the level.
    #[serde(default)]
    pub show_level: bool,
    /// Prefix lines with file:line.
    #[serde(default)]
    pub show_log_origin: bool,
    /// Only log from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// Checks the path.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_path("log_path", &self.log_path)
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
        assert_eq!(l.level.to_filter(), log::LevelFilter::Debug);
        assert!(l.validate().is_ok());
        let l: Logger = serde_json::from_str(r#"{"log_path":"/tmp/l","level":"info"}"#).unwrap();
        assert_eq!(l.level, LogLevel::Info);
        let l: Logger = serde_json::from_str(r#"{"log_path":""}"#).unwrap();
        assert!(l.validate().is_err());
        assert!(serde_json::from_str::<Logger>(r#"{"log_path":"/l","level":"Loud"}"#).is_err());
        assert!(serde_json::from_str::<Logger>(r#"{"log_path":"/l","colour":true}"#).is_err());
    }
}
