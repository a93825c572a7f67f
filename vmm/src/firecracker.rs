// SPDX-License-Identifier: Apache-2.0
//! Firecracker's command line, so SDKs that start the VMM binary themselves can
//! point at wisp: `--api-sock`, `--config-file`, `--no-api`, `--id`, logging and
//! metrics flags, `--http-api-max-payload-size`, `--describe-snapshot`,
//! `--snapshot-version`, `--module`. Flags wisp cannot honour are refused by
//! name, with the reason, exit status 1.

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
    /// Not supported by wisp (no seccomp filter is installed).
    #[arg(long, hide = true)]
    seccomp_filter: Option<String>,
    /// Not supported by wisp (no boot-timer device).
    #[arg(long, hide = true)]
    boot_timer: bool,
    /// Largest API request body in bytes (1..=65536 in wisp); larger bodies
    /// get 400, as in Firecracker.
    #[arg(long)]
    http_api_max_payload_size: Option<usize>,
    /// Not supported by wisp (no MMDS).
    #[arg(long, hide = true)]
    mmds_size_limit: Option<String>,
    /// Print the format version of this snapshot state file and exit.
    #[arg(long)]
    describe_snapshot: Option<PathBuf>,
    /// Print the snapshot format version this wisp writes and exit.
    #[arg(long)]
    snapshot_version: bool,
    /// Only log from this module path (and its submodules).
    #[arg(long)]
    module: Option<String>,
    /// Not supported by wisp (virtio-mmio only).
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

/// A configuration file, read: the pre-boot configuration and the metrics
/// file it names (its logger section is applied while reading).
#[derive(Debug)]
pub struct ConfigFile {
    /// Everything configured before boot.
    pub preboot: Preboot,
    /// The `metrics` section's file, if any.
    pub metrics_path: Option<PathBuf>,
}

/// Reads a Firecracker-style configuration file and applies its `logger`
/// section (what it leaves out keeps the command line's setting).
pub fn read_config_file(path: &Path, serial: SerialConfig) -> Result<ConfigFile, String> {
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
    if let Some(l) = &cfg.logger {
        let update = vmm::logger::LogUpdate {
            path: l.log_path.as_deref().map(Path::new),
            level: l.level.map(|v| v.to_filter()),
            show_level: l.show_level,
            show_origin: l.show_log_origin,
            module: l.module.as_deref(),
        };
        vmm::logger::update(&update).map_err(|e| {
            format!(
                "Config file {}: cannot open log file {}: {e}",
                path.display(),
                l.log_path.as_deref().unwrap_or_default()
            )
        })?;
    }
    let metrics_path = cfg.metrics.as_ref().map(|m| PathBuf::from(&m.metrics_path));
    let mut p = Preboot::from_full(cfg);
    p.serial = serial;
    Ok(ConfigFile {
        preboot: p,
        metrics_path,
    })
}

/// The metrics file from `--metrics-path` or the config file; both is refused.
pub fn metrics_path(
    flag: Option<PathBuf>,
    file: Option<PathBuf>,
) -> Result<Option<PathBuf>, String> {
    match (flag, file) {
        (Some(_), Some(_)) => Err(
            "Metrics are configured twice: by --metrics-path and by the config file's metrics section"
                .into(),
        ),
        (f, c) => Ok(f.or(c)),
    }
}

/// The first Firecracker flag given that wisp cannot honour, and why.
fn unsupported(a: &FcArgs) -> Option<(&'static str, &'static str)> {
    [
        (
            a.seccomp_filter.is_some(),
            "--seccomp-filter",
            "wisp installs no seccomp filter",
        ),
        (
            a.boot_timer,
            "--boot-timer",
            "wisp has no boot-timer device",
        ),
        (
            a.mmds_size_limit.is_some(),
            "--mmds-size-limit",
            "wisp has no MMDS",
        ),
        (
            a.enable_pci,
            "--enable-pci",
            "wisp has no PCI transport yet; virtio-mmio only",
        ),
    ]
    .into_iter()
    .find_map(|(given, flag, why)| given.then_some((flag, why)))
}

/// `--describe-snapshot`: the state file's format version, as Firecracker
/// prints it (`v` and the version).
fn describe_snapshot(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use vmm::persist::format::MAGIC;
    let fail = |e: &dyn std::fmt::Display| {
        format!("Unable to read snapshot state file {}: {e}", path.display())
    };
    // Checked first: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(|e| fail(&e))?;
    if !meta.is_file() {
        return Err(fail(&"not a regular file"));
    }
    let mut head = [0u8; 12];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| fail(&e))?;
    if head[..8] != MAGIC {
        return Err(format!(
            "Invalid snapshot state file {}: it does not start with wisp's magic",
            path.display()
        ));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&head[8..12]);
    Ok(format!("v{}", u32::from_le_bytes(v)))
}

/// The flags that print something and exit, if one was given.
fn print_and_exit(a: &FcArgs) -> Option<ExitCode> {
    if a.snapshot_version {
        println!("v{}", vmm::persist::format::FORMAT_VERSION);
        return Some(ExitCode::SUCCESS);
    }
    let path = a.describe_snapshot.as_deref()?;
    Some(match describe_snapshot(path) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wisp: {e}");
            ExitCode::FAILURE
        }
    })
}

/// Runs wisp with Firecracker's command line.
pub fn main(argv: &[String]) -> ExitCode {
    let a = FcArgs::parse_from(argv);
    if let Some((flag, why)) = unsupported(&a) {
        eprintln!("wisp: {flag} cannot be honoured: {why}");
        return ExitCode::FAILURE;
    }
    if let Some(code) = print_and_exit(&a) {
        return code;
    }
    if let Some(n) = a.http_api_max_payload_size {
        if let Err(e) = api::routes::set_max_body_len(n) {
            eprintln!("wisp: --http-api-max-payload-size: {e}");
            return ExitCode::from(2);
        }
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
    if let Some(m) = a.module.as_deref() {
        if m.is_empty() {
            eprintln!("wisp: --module must not be empty");
            return ExitCode::from(2);
        }
        let only = vmm::logger::LogUpdate {
            module: Some(m),
            ..Default::default()
        };
        if let Err(e) = vmm::logger::update(&only) {
            eprintln!("wisp: {e}");
            return ExitCode::from(2);
        }
    }
    let (preboot, file_metrics) = match &a.config_file {
        Some(p) => match read_config_file(p, SerialConfig::Stdio) {
            Ok(c) => (c.preboot, c.metrics_path),
            Err(e) => {
                eprintln!("wisp: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => (Preboot::default(), None),
    };
    let metrics_path = match metrics_path(a.metrics_path, file_metrics) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("wisp: {e}");
            return ExitCode::FAILURE;
        }
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
        metrics_path,
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
