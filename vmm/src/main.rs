// SPDX-License-Identifier: Apache-2.0
//! The `wisp` binary: `wisp run` boots a microVM, `wisp ctl` drives one through
//! its API socket. Run as `firecracker` (or with Firecracker's flags and no
//! subcommand) it accepts Firecracker's command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{self, DiskConfig, NetConfig, SerialConfig};
use vmm::preboot::Preboot;
use vmm::runtime::{Runtime, RuntimeOptions};
use vmm::Outcome;

mod ctl;
mod firecracker;
mod image;
mod manage;

/// wisp: a minimal virtual machine monitor on KVM.
#[derive(Debug, Parser)]
#[command(name = "wisp", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a microVM (or serve an API socket and wait to be configured).
    Run(Box<RunArgs>),
    /// Control a running VM through its API socket.
    Ctl(ctl::CtlArgs),
    /// Create, inspect, check, convert, resize and clone disk images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Persistent VMs: list, define, start, shutdown, console, ... (docs/manage.md).
    #[command(flatten)]
    Manage(manage::ManageCommand),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry) or bzImage. Without it
    /// (and with --api-sock) wisp waits to be configured through the API.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u64,
    /// Guest memory, e.g. 512M or 4G.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    memory: u64,
    /// Serial console: stdio, file=PATH, socket=PATH[,log=FILE] (for `wisp console`) or none.
    #[arg(long, default_value = "stdio")]
    serial: SerialConfig,
    /// A disk: path=IMG[,readonly=on][,id=NAME][,serial=STR][,format=raw|qcow2]; repeatable.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A NIC: tap=NAME[,mac=MAC][,bridge=BR][,mtu=N]; repeatable.
    #[arg(long = "net")]
    nets: Vec<String>,
    /// Serve the API on this Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Take the whole configuration from a Firecracker-style JSON file and boot.
    #[arg(long, conflicts_with = "kernel")]
    config_file: Option<PathBuf>,
    /// Instance id reported by the API.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Write the VMM's log here instead of stderr.
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, default_value = "Warning")]
    level: String,
    /// Name the VM (shown by `wisp list`); without --api-sock its socket is
    /// RUNTIME_DIR/NAME.sock.
    #[arg(long)]
    name: Option<String>,
    /// Runtime directory where VMMs register.
    #[arg(long, default_value = vmm::registry::DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
    /// Write metrics (JSON lines) to this file or FIFO.
    #[arg(long)]
    metrics_path: Option<PathBuf>,
    /// Restore this snapshot (state file) instead of booting.
    #[arg(long, conflicts_with_all = ["kernel", "config_file"])]
    restore: Option<PathBuf>,
    /// The snapshot's memory file (default: the state file's path + ".mem").
    #[arg(long, requires = "restore")]
    mem: Option<PathBuf>,
    /// Keep the restored VM paused (resume it through the API).
    #[arg(long, requires = "restore")]
    paused: bool,
    /// Wait for a live migration on this URI (unix:PATH or tcp:HOST:PORT); the
    /// machine configuration given must match the sender's.
    #[arg(long, conflicts_with_all = ["kernel", "config_file", "restore"])]
    incoming: Option<String>,
    /// Receiving a migration: give up (exit status 1) if the handshake, or
    /// any later frame, takes longer than SECS seconds [default: 30].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    migration_timeout: Option<u64>,
    /// Shared secret for migrations, sent and received: each side proves it
    /// knows the token (HMAC challenge-response) before anything moves. The
    /// file must not be readable by group or others.
    #[arg(long, value_name = "FILE")]
    migration_token_file: Option<PathBuf>,
    /// Do not install the seccomp filters of the API and migration threads.
    #[arg(long)]
    no_seccomp: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

use vmm::error_chain;

/// The pre-boot configuration, and the metrics file (flag or config file).
fn preboot_from_args(a: &RunArgs) -> Result<(Preboot, Option<PathBuf>), String> {
    if let Some(path) = &a.config_file {
        let c = firecracker::read_config_file(path, a.serial.clone())?;
        let metrics = firecracker::metrics_path(a.metrics_path.clone(), c.metrics_path)?;
        return Ok((c.preboot, metrics));
    }
    let mut p = Preboot {
        serial: a.serial.clone(),
        ..Default::default()
    };
    let vcpus = config::check_vcpus(a.cpus, usize::MAX).map_err(|e| e.to_string())?;
    p.machine.vcpu_count = vcpus;
    p.machine.mem_size_mib = usize::try_from(a.memory >> 20).unwrap_or(usize::MAX);
    if !a.memory.is_multiple_of(1 << 20) {
        return Err(
            config::ConfigError::Memory(a.memory, "must be a whole number of MiB".into())
                .to_string(),
        );
    }
    if let Some(k) = &a.kernel {
        p.boot_source = Some(api::models::BootSource {
            kernel_image_path: k.display().to_string(),
            initrd_path: a.initrd.as_ref().map(|i| i.display().to_string()),
            boot_args: Some(
                a.cmdline
                    .clone()
                    .unwrap_or_else(|| config::DEFAULT_CMDLINE.into()),
            ),
        });
    }
    for (i, s) in a.disks.iter().enumerate() {
        let d = DiskConfig::parse(s, i).map_err(|e| e.to_string())?;
        p.put_drive(vmm::preboot::drive(&d));
    }
    for (i, s) in a.nets.iter().enumerate() {
        let n = NetConfig::parse(s, i).map_err(|e| e.to_string())?;
        p.put_net(vmm::preboot::network_interface(&n));
    }
    Ok((p, a.metrics_path.clone()))
}

/// Boots or serves according to `opts`, then maps how it ended to an exit code.
pub fn run_vmm(opts: RuntimeOptions) -> ExitCode {
    let signal_evt = match vmm::signals::install() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wisp: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match Runtime::new(opts, &signal_evt) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wisp: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    match rt.run() {
        Outcome::Poweroff => {
            eprintln!("wisp: guest powered off");
            ExitCode::SUCCESS
        }
        Outcome::Reset => {
            eprintln!("wisp: guest requested a reboot; the VM has ended");
            ExitCode::SUCCESS
        }
        Outcome::Stopped => {
            eprintln!("wisp: stopped through the API");
            ExitCode::SUCCESS
        }
        Outcome::Migrated(uri) => {
            eprintln!("wisp: the VM was migrated to {uri} and runs there; exiting");
            ExitCode::SUCCESS
        }
        Outcome::ShutdownTimeout(s) => {
            eprintln!(
                "wisp: the guest did not power off within {s} s of the ACPI power button; stopped"
            );
            ExitCode::FAILURE
        }
        Outcome::Signal(sig) => {
            eprintln!("wisp: stopped by {}", vmm::signals::name(sig));
            ExitCode::from(128u8.wrapping_add(sig as u8))
        }
        Outcome::Error(m) => {
            eprintln!("wisp: {m}");
            ExitCode::FAILURE
        }
    }
}

/// Applies `--log-path`/`--level` style options.
pub fn setup_logging(
    path: Option<&Path>,
    level: &str,
    show_level: bool,
    show_origin: bool,
) -> Result<(), String> {
    let lvl = vmm::logger::parse_level(level).ok_or_else(|| {
        format!("Invalid log level '{level}': expected Error, Warning, Info, Debug, Trace or Off")
    })?;
    vmm::logger::configure(path, lvl, show_level, show_origin).map_err(|e| {
        format!(
            "Cannot open log file {}: {e}",
            path.map(|p| p.display().to_string()).unwrap_or_default()
        )
    })
}

fn run(a: RunArgs) -> ExitCode {
    if let Err(e) = setup_logging(a.log_path.as_deref(), &a.level, true, false) {
        eprintln!("wisp: {e}");
        return ExitCode::from(2);
    }
    if a.kernel.is_none()
        && a.config_file.is_none()
        && a.api_sock.is_none()
        && a.restore.is_none()
        && a.incoming.is_none()
    {
        eprintln!("wisp: --kernel is required (or --restore SNAPSHOT, --incoming URI, --config-file, or --api-sock to be configured through the API)");
        return ExitCode::from(2);
    }
    let (preboot, metrics_path) = match preboot_from_args(&a) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("wisp: {e}");
            return ExitCode::from(2);
        }
    };
    let boot_now = preboot.boot_source.is_some();
    if let Some(n) = &a.name {
        if !vmm::registry::valid_name(n) {
            eprintln!("wisp: {}", vmm::registry::RegistryError::BadName(n.clone()));
            return ExitCode::from(2);
        }
    }
    let api_sock = a.api_sock.or_else(|| {
        a.name
            .as_ref()
            .map(|n| a.runtime_dir.join(format!("{n}.sock")))
    });
    let register_required = a.name.is_some();
    let restore = a.restore.map(|snap| {
        let mem = a.mem.unwrap_or_else(|| {
            let mut m = snap.clone().into_os_string();
            m.push(".mem");
            PathBuf::from(m)
        });
        (snap, mem, !a.paused)
    });
    let name = a
        .name
        .unwrap_or_else(|| format!("wisp-{}", std::process::id()));
    run_vmm(RuntimeOptions {
        id: a.id,
        api_sock,
        preboot,
        boot_now,
        register: Some((name, a.runtime_dir)),
        register_required,
        metrics_path,
        restore,
        incoming: a.incoming,
        migration_timeout_s: a.migration_timeout,
        migration_token_file: a.migration_token_file,
        seccomp: !a.no_seccomp,
    })
}

/// A tool command's result as the process exit status.
fn tool_exit(r: anyhow::Result<i32>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("wisp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    vmm::logger::init();
    let argv: Vec<String> = std::env::args().collect();
    if firecracker::wants_firecracker_cli(&argv) {
        return firecracker::main(&argv);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run(*a),
        Command::Manage(cmd) => tool_exit(manage::run(cmd)),
        Command::Image(cmd) => tool_exit(image::run(cmd)),
        Command::Ctl(args) => tool_exit(ctl::run(args)),
    }
}
