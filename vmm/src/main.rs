// SPDX-License-Identifier: Apache-2.0
//! The `wisp` binary.

use std::process::ExitCode;

use clap::Parser;

mod ctl;

/// wisp: a minimal VMM on /dev/kvm.
#[derive(Parser, Debug)]
#[command(name = "wisp", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Control a running VM through its API socket.
    Ctl(ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ctl(args) => ctl::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("wisp: {e:#}");
            ExitCode::FAILURE
        }
    }
}
