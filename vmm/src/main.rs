// SPDX-License-Identifier: Apache-2.0
//! The `wisp` binary.

mod image;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "wisp", about = "A minimal KVM virtual machine monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with disk images.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(cmd) => image::run(cmd),
    };
    let code = result.unwrap_or_else(|e| {
        eprintln!("wisp: {e:#}");
        1
    });
    std::process::exit(code);
}
