// SPDX-License-Identifier: Apache-2.0
//! The `wisp` binary: `wisp run` boots a microVM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{self, DiskConfig, NetConfig, SerialConfig, VmConfig};
use vmm::Outcome;

mod ctl;

/// wisp: a minimal virtual machine monitor on KVM.
#[derive(Debug, Parser)]
#[command(name = "wisp", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a microVM.
    Run(RunArgs),
    /// Control a running VM through its API socket.
    Ctl(ctl::CtlArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u64,
    /// Guest memory, e.g. 512M or 4G.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    memory: u64,
    /// Serial console: stdio, file=PATH or none.
    #[arg(long, default_value = "stdio")]
    serial: SerialConfig,
    /// A disk: path=IMG[,readonly=on][,id=NAME][,serial=STR][,format=raw|qcow2]; repeatable.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A NIC: tap=NAME[,mac=MAC][,bridge=BR][,mtu=N]; repeatable.
    #[arg(long = "net")]
    nets: Vec<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

fn vm_config(a: RunArgs) -> Result<VmConfig, config::ConfigError> {
    let disks = a
        .disks
        .iter()
        .enumerate()
        .map(|(i, s)| DiskConfig::parse(s, i))
        .collect::<Result<_, _>>()?;
    let nets = a
        .nets
        .iter()
        .enumerate()
        .map(|(i, s)| NetConfig::parse(s, i))
        .collect::<Result<_, _>>()?;
    // Range checks against the host happen when the VM is built.
    let vcpus = u8::try_from(a.cpus)
        .map_err(|_| config::ConfigError::Vcpus(a.cpus, "at most 254".into()))?;
    Ok(VmConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        vcpus,
        mem_size: a.memory,
        serial: a.serial,
        disks,
        nets,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    msg
}

fn run(args: RunArgs) -> ExitCode {
    let signal_evt = match vmm::signals::install() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wisp: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = match vm_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wisp: {e}");
            return ExitCode::from(2);
        }
    };
    let vmm = match vmm::build_vm(&cfg, false) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("wisp: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    match vmm.run(&signal_evt) {
        Outcome::Poweroff => {
            eprintln!("wisp: guest powered off");
            ExitCode::SUCCESS
        }
        Outcome::Reset => {
            eprintln!("wisp: guest requested a reboot; the VM has ended");
            ExitCode::SUCCESS
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run(a),
        Command::Ctl(args) => match ctl::run(args) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("wisp: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
