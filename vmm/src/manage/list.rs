// SPDX-License-Identifier: Apache-2.0
//! `wisp list [--all] [--json]`: defined and running VMs with a virsh-style
//! state. A VMM that died without unregistering shows as `crashed` when its VM
//! is defined (until the next start or `wisp destroy`); the entry of an
//! undefined VM whose VMM is gone is pruned.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;
use vmm::registry::{self, Listed};

use super::store::{Store, VmState};

/// One row of `wisp list`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// VM name.
    pub name: String,
    /// running, paused, not started, shut off or crashed.
    pub state: &'static str,
    /// Whether a definition exists in the state directory.
    pub defined: bool,
    /// Started by `wisp autostart-all`.
    pub autostart: bool,
    /// A managed save waits to be restored by `wisp start`.
    pub managed_save: bool,
    /// VMM pid (of the running or crashed VMM).
    pub pid: Option<u32>,
    /// Whether the VMM runs.
    pub alive: bool,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// API socket of the running VMM.
    pub api_sock: Option<PathBuf>,
}

/// Builds the rows (pruning entries of undefined VMs whose VMM is gone).
pub fn rows(store: &Store, all: bool) -> std::io::Result<Vec<Row>> {
    let registered = registry::list(&store.runtime_dir)?;
    let defined = store.defined().map_err(std::io::Error::other)?;
    let names: BTreeSet<String> = registered
        .iter()
        .map(|l| l.entry.name.clone())
        .chain(defined.iter().cloned())
        .collect();
    let mut out = Vec::new();
    for name in names {
        let entry: Option<&Listed> = registered.iter().find(|l| l.entry.name == name);
        let def = store.load(&name).ok();
        let is_defined = defined.contains(&name);
        let state = VmState::of(entry);
        if state == VmState::Crashed && !is_defined {
            registry::prune(&store.runtime_dir, &name);
            continue;
        }
        if !all && !state.is_active() {
            continue;
        }
        let (vcpus, mem_mib) = match (entry, &def) {
            (Some(l), _) if l.alive => (l.entry.vcpus, l.entry.mem_mib),
            (_, Some(d)) => {
                d.vm.machine_config
                    .as_ref()
                    .map(|m| (m.vcpu_count, m.mem_size_mib as u64))
                    .unwrap_or((1, 128))
            }
            (Some(l), None) => (l.entry.vcpus, l.entry.mem_mib),
            (None, None) => (0, 0),
        };
        out.push(Row {
            state: state.as_str(),
            defined: is_defined,
            autostart: def.as_ref().is_some_and(|d| d.autostart),
            managed_save: is_defined && store.managed_save(&name).is_some(),
            pid: entry.map(|l| l.entry.pid),
            alive: entry.is_some_and(|l| l.alive),
            vcpus,
            mem_mib,
            api_sock: entry
                .filter(|l| l.alive)
                .and_then(|l| l.entry.api_sock.clone()),
            name,
        });
    }
    Ok(out)
}

/// Renders rows as a table.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<24} {:<16} {:>8} {:>5} {:>9} {:<9} SOCKET\n",
        "NAME", "STATE", "PID", "VCPUS", "MEMORY", "AUTOSTART"
    );
    for r in rows {
        let state = if r.managed_save {
            format!("{} (saved)", r.state)
        } else {
            r.state.to_string()
        };
        let autostart = match (r.defined, r.autostart) {
            (false, _) => "-",
            (true, true) => "yes",
            (true, false) => "no",
        };
        s.push_str(&format!(
            "{:<24} {:<16} {:>8} {:>5} {:>7}Mi {:<9} {}\n",
            r.name,
            state,
            r.pid
                .filter(|_| r.alive)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            r.vcpus,
            r.mem_mib,
            autostart,
            r.api_sock
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into())
        ));
    }
    s
}
