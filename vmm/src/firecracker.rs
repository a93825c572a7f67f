// SPDX-License-Identifier: Apache-2.0
//! Firecracker's command line, so SDKs that start the VMM binary themselves can
//! point at wisp: `--api-sock`, `--config-file`, `--no-api`, `--id`, logging and
//! metrics flags. Flags wisp does not implement are refused by name.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use vmm::config::SerialConfig;
use vmm::preboot::Preboot;
use vmm::runtime::RuntimeOptions;

/// Firecracker-compatible command line of wisp.
#[derive(Debug, Parser)]
#[command(
    name = "firecracker",
    version,
    about = "wisp, speaking Firecracker's command line"
)]
struct FcArgs {
    /// Path to the API socket.
    #[arg(long, default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,
    /// Configuration file (boots at once).
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Do not serve the API (requires --config-file).
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// MicroVM id.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Log file or FIFO.
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Log level.
    #[arg(long, default_value = "Warning")]
    level: String,
    /// Print the level in log lines.
    #[arg(long)]
    show_level: bool,
    /// Print the source location in log lines.
    #[arg(long)]
    show_log_origin: bool,
    /// Metrics file or FIFO.
    #[arg(long)]
    metrics_path: Option<PathBuf>,
    /// Do not install wisp's seccomp filters (API and migration threads).
    #[arg(long)]
    no_seccomp: bool,
    /// Start time set by the jailer (informational).
    #[arg(long)]
    start_time_us: Option<u64>,
    /// Start CPU time set by the jailer (informational).
    #[arg(long)]
    start_time_cpu_us: Option<u64>,
    /// Parent CPU time set by the jailer (informational).
    #[arg(long)]
    parent_cpu_time_us: Option<u64>,
    /// Not supported by wisp.
    #[arg(long, hide = true)]
    seccomp_filter: Option<String>,
    /// Not supported by wisp.
    #[arg(long, hide = true)]
    boot_timer: bool,
    /// Not supported by wisp.
    #[arg(long, hide = true)]
    http_api_max_payload_size: Option<String>,
    /// Not supported by wisp.
    #[arg(long, hide = true)]
    mmds_size_limit: Option<String>,
    /// Not supported by wisp.
    #[arg(long, hide = true)]
    describe_snapshot: Option<String>,
    /// Not supported by wisp.
    #[arg(long, hide = true)]
    enable_pci: bool,
}

/// Whether to parse `argv` as Firecracker's command line: the binary is named
/// `firecracker`, or the first argument is a flag other than help/version.
pub fn wants_firecracker_cli(argv: &[String]) -> bool {
    let name = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if name == "firecracker" {
        return true;
    }
    match argv.get(1) {
        Some(a) => a.starts_with("--") && !matches!(a.as_str(), "--help" | "--version"),
        None => false,
    }
}

/// Reads a Firecracker-style configuration file.
pub fn read_config_file(path: &Path, serial: SerialConfig) -> Result<Preboot, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("Cannot read config file {}: {e}", path.display()))?;
    let cfg = api::models::FullVmConfig::from_json(&text)
        .map_err(|e| format!("Invalid config file {}: {e}", path.display()))?;
    if cfg.boot_source.is_none() {
        return Err(format!(
            "Invalid config file {}: boot-source is required",
            path.display()
        ));
    }
    let mut p = Preboot::from_full(cfg);
    p.serial = serial;
    Ok(p)
}

fn unsupported(a: &FcArgs) -> Option<&'static str> {
    if a.seccomp_filter.is_some() {
        return Some("--seccomp-filter");
    }
    if a.boot_timer {
        return Some("--boot-timer");
    }
    if a.http_api_max_payload_size.is_some() {
        return Some("--http-api-max-payload-size");
    }
    if a.mmds_size_limit.is_some() {
        return Some("--mmds-size-limit");
    }
    if a.describe_snapshot.is_some() {
        return Some("--describe-snapshot");
    }
    if a.enable_pci {
        return Some("--enable-pci");
    }
    None
}

/// Runs wisp with Firecracker's command line.
pub fn main(argv: &[String]) -> ExitCode {
    let a = FcArgs::parse_from(argv);
    if let Some(flag) = unsupported(&a) {
        eprintln!("wisp: {flag} is a Firecracker flag that wisp does not support");
        return ExitCode::from(2);
    }
    if let Err(e) = crate::setup_logging(
        a.log_path.as_deref(),
        &a.level,
        a.show_level,
        a.show_log_origin,
    ) {
        eprintln!("wisp: {e}");
        return ExitCode::from(2);
    }
    let preboot = match &a.config_file {
        Some(p) => match read_config_file(p, SerialConfig::Stdio) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("wisp: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Preboot::default(),
    };
    let boot_now = a.config_file.is_some();
    let name = if vmm::registry::valid_name(&a.id) && a.id != "anonymous-instance" {
        a.id.clone()
    } else {
        format!("wisp-{}", std::process::id())
    };
    crate::run_vmm(RuntimeOptions {
        id: a.id,
        api_sock: (!a.no_api).then_some(a.api_sock),
        preboot,
        boot_now,
        register: Some((name, PathBuf::from(vmm::registry::DEFAULT_RUNTIME_DIR))),
        register_required: false,
        metrics_path: a.metrics_path,
        restore: None,
        incoming: None,
        migration_timeout_s: None,
        migration_token_file: None,
        seccomp: !a.no_seccomp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_wants_firecracker_cli() {
        assert!(wants_firecracker_cli(&v(&["/usr/bin/firecracker"])));
        assert!(wants_firecracker_cli(&v(&["wisp", "--api-sock", "/x"])));
        assert!(!wants_firecracker_cli(&v(&["wisp", "run"])));
        assert!(!wants_firecracker_cli(&v(&["wisp", "--help"])));
        assert!(!wants_firecracker_cli(&v(&["wisp"])));
    }
}
