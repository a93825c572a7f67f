// SPDX-License-Identifier: Apache-2.0
//! The VMM's log: lines to stderr or a file (or FIFO), with a level filter,
//! configurable from the command line and `PUT /logger`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    out: Mutex<Option<File>>,
    show_level: Mutex<bool>,
    show_origin: Mutex<bool>,
    /// Only records whose module path starts with this are written.
    module: Mutex<Option<String>>,
}

static LOGGER: Logger = Logger {
    out: Mutex::new(None),
    show_level: Mutex::new(true),
    show_origin: Mutex::new(false),
    module: Mutex::new(None),
};

/// Whether `module_path` is `filter` or one of its submodules.
fn module_matches(filter: &str, module_path: &str) -> bool {
    module_path
        .strip_prefix(filter)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        if let Some(m) = devices::bus::lock(&self.module).as_deref() {
            if !module_matches(m, r.module_path().unwrap_or("")) {
                return;
            }
        }
        let mut line = String::from("wisp");
        if *devices::bus::lock(&self.show_level) {
            line.push_str(&format!(" [{}]", r.level()));
        }
        if *devices::bus::lock(&self.show_origin) {
            line.push_str(&format!(
                " [{}:{}]",
                r.file().unwrap_or("?"),
                r.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!(": {}\n", r.args()));
        match devices::bus::lock(&self.out).as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => eprint!("{line}"),
        }
    }

    fn flush(&self) {
        if let Some(f) = devices::bus::lock(&self.out).as_mut() {
            let _ = f.flush();
        }
    }
}

/// Installs the logger (warnings and errors to stderr until configured).
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
}

/// Parses a level as Firecracker spells them (`Error`, `Warning`, `Info`,
/// `Debug`, `Trace`, `Off`; any case).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Reconfigures the log: destination (None = stderr), level and decorations.
pub fn configure(
    path: Option<&Path>,
    level: LevelFilter,
    show_level: bool,
    show_origin: bool,
) -> std::io::Result<()> {
    let file = match path {
        Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
        None => None,
    };
    *devices::bus::lock(&LOGGER.out) = file;
    *devices::bus::lock(&LOGGER.show_level) = show_level;
    *devices::bus::lock(&LOGGER.show_origin) = show_origin;
    log::set_max_level(level);
    Ok(())
}

/// A partial reconfiguration (`PUT /logger`): what is `None` is kept.
#[derive(Debug, Default)]
pub struct LogUpdate<'a> {
    /// New destination file or FIFO.
    pub path: Option<&'a Path>,
    /// New level.
    pub level: Option<LevelFilter>,
    /// Prefix lines with the level.
    pub show_level: Option<bool>,
    /// Prefix lines with file:line.
    pub show_origin: Option<bool>,
    /// Only log from this module path (and its submodules).
    pub module: Option<&'a str>,
}

/// Applies `u`; nothing changes when the new file cannot be opened.
pub fn update(u: &LogUpdate<'_>) -> std::io::Result<()> {
    if let Some(p) = u.path {
        let f = OpenOptions::new().create(true).append(true).open(p)?;
        *devices::bus::lock(&LOGGER.out) = Some(f);
    }
    if let Some(v) = u.show_level {
        *devices::bus::lock(&LOGGER.show_level) = v;
    }
    if let Some(v) = u.show_origin {
        *devices::bus::lock(&LOGGER.show_origin) = v;
    }
    if let Some(m) = u.module {
        *devices::bus::lock(&LOGGER.module) = Some(m.to_string());
    }
    if let Some(l) = u.level {
        log::set_max_level(l);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_module_filter() {
        assert!(module_matches("vmm", "vmm"));
        assert!(module_matches("vmm", "vmm::runtime"));
        assert!(module_matches("vmm::runtime", "vmm::runtime::migration"));
        assert!(!module_matches("vmm", "vmmx::a"));
        assert!(!module_matches("vmm::runtime", "vmm"));
        assert!(!module_matches("devices", "vmm::builder"));
    }

    #[test]
    fn test_parse_level_firecracker_names() {
        assert_eq!(parse_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("Off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
