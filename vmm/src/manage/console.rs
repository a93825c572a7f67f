// SPDX-License-Identifier: Apache-2.0
//! `wisp console NAME`: attach to a running VM's serial console.

use super::store::Store;

/// The `--serial` a managed VM's VMM gets.
pub fn serial_spec(store: &Store, name: &str) -> String {
    format!("file={}", store.file(name, "console.log").display())
}

/// `wisp console NAME`.
pub fn attach(store: &Store, name: &str) -> anyhow::Result<i32> {
    store.load(name)?;
    store.running(name)?;
    anyhow::bail!("wisp console is not implemented yet")
}
