// SPDX-License-Identifier: Apache-2.0
//! `wisp image bench`: throughput of wisp's disk backends.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    pub path: PathBuf,
}

pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("Not implemented")
}
