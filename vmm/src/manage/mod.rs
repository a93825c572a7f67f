// SPDX-License-Identifier: Apache-2.0
//! virsh-style management of persistent VMs, without a daemon: definitions in
//! a state directory (docs/manage.md), VMMs started in the background by
//! `wisp start`, found again through the runtime directory's registry.

pub mod autostart;
pub mod clone;
pub mod console;
pub mod definition;
pub mod defs;
pub mod lifecycle;
pub mod list;
pub mod network;
pub mod store;

use std::path::PathBuf;

use clap::{Args, Subcommand};

use store::Store;

/// What a command did: a line for people, an object for `--json`.
#[derive(Debug, Clone)]
pub struct Done {
    /// Human-readable result.
    pub text: String,
    /// Machine-readable result.
    pub json: serde_json::Value,
}

/// Options every management command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Where definitions live [env: WISP_STATE_DIR] [default: /var/lib/wisp].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where running VMMs register [env: WISP_RUNTIME_DIR] [default: /run/wisp].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// A VM name and the common options.
#[derive(Debug, Clone, Args)]
pub struct Named {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    common: Common,
}

/// The management subcommands of `wisp`.
#[derive(Debug, Clone, Subcommand)]
pub enum ManageCommand {
    /// List running VMs (with --all, also shut off and crashed defined VMs).
    List {
        /// Also VMs that are not running.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Store (or replace) a VM definition from a JSON file (docs/manage.md).
    Define {
        /// The definition file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a (stopped) VM's definition and its state directory.
    Undefine {
        #[command(flatten)]
        vm: Named,
        /// Also delete its writable disk images (read-only ones are kept).
        #[arg(long)]
        remove_disks: bool,
    },
    /// Start a defined VM in the background (restoring its managed save, if any).
    Start {
        #[command(flatten)]
        vm: Named,
        /// Boot afresh, discarding a managed save.
        #[arg(long)]
        force_boot: bool,
    },
    /// ACPI power button, then a hard stop after the timeout.
    Shutdown {
        #[command(flatten)]
        vm: Named,
        /// Seconds the guest gets to power off (default 30).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Stop a VM at once.
    Destroy(Named),
    /// Orderly shutdown, then start again.
    Reboot {
        #[command(flatten)]
        vm: Named,
        /// Seconds the guest gets to power off (default 30).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Pause a running VM's vCPUs.
    Suspend(Named),
    /// Resume a suspended VM.
    Resume(Named),
    /// Managed save: pause, snapshot into the state directory, stop.
    Save(Named),
    /// Edit a definition with $EDITOR; it is validated before it replaces the old one.
    Edit(Named),
    /// Print a VM's definition.
    Dumpconfig(Named),
    /// Mark (or with --disable unmark) a VM to start at boot.
    Autostart {
        #[command(flatten)]
        vm: Named,
        /// Unmark it.
        #[arg(long)]
        disable: bool,
    },
    /// Start every VM marked autostart (what the systemd unit runs at boot).
    AutostartAll(Common),
    /// Shut down every running defined VM (what the systemd unit runs at shutdown).
    ShutdownAll {
        #[command(flatten)]
        common: Common,
        /// Seconds each guest gets to power off (default 30).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Install the autostart systemd unit (resources/systemd/wisp-autostart.service).
    InstallAutostart {
        /// Where unit files go.
        #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
    },
    /// Attach to a running VM's serial console (Ctrl+] detaches).
    Console(Named),
    /// Store a network definition (bridge, address, NAT, DHCP; docs/manage.md).
    NetDefine {
        /// The definition file.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Remove an inactive network's definition.
    NetUndefine(Named),
    /// Create a network's bridge, NAT table and DHCP server.
    NetStart(Named),
    /// Remove what net-start created.
    NetDestroy(Named),
    /// List defined networks.
    NetList(Common),
    /// Copy a shut-off VM: new name, new MACs, new disk files.
    Clone {
        /// The VM to copy.
        src: String,
        /// The new VM's name.
        new: String,
        /// qcow2 overlays backed by SRC's disks instead of full copies.
        #[arg(long)]
        linked: bool,
        #[command(flatten)]
        common: Common,
    },
}

fn print(d: &Done, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&d.json).unwrap_or_default()
        );
    } else if !d.text.is_empty() {
        println!("{}", d.text);
    }
}

fn one(common: &Common, f: impl FnOnce(&Store) -> anyhow::Result<Done>) -> anyhow::Result<i32> {
    let store = Store::new(common.state_dir.clone(), common.runtime_dir.clone());
    let d = f(&store)?;
    print(&d, common.json);
    Ok(0)
}

/// Runs a management command; returns the exit code.
pub fn run(cmd: ManageCommand) -> anyhow::Result<i32> {
    use ManageCommand as C;
    match cmd {
        C::List { all, common } => {
            let store = Store::new(common.state_dir, common.runtime_dir);
            let rows = list::rows(&store, all)?;
            if common.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", list::table(&rows));
            }
            Ok(0)
        }
        C::Define { file, common } => one(&common, |s| defs::define(s, &file)),
        C::Undefine { vm, remove_disks } => {
            one(&vm.common, |s| defs::undefine(s, &vm.name, remove_disks))
        }
        C::Start { vm, force_boot } => {
            one(&vm.common, |s| lifecycle::start(s, &vm.name, force_boot))
        }
        C::Shutdown { vm, timeout } => {
            one(&vm.common, |s| lifecycle::shutdown(s, &vm.name, timeout))
        }
        C::Destroy(vm) => one(&vm.common, |s| lifecycle::destroy(s, &vm.name)),
        C::Reboot { vm, timeout } => one(&vm.common, |s| lifecycle::reboot(s, &vm.name, timeout)),
        C::Suspend(vm) => one(&vm.common, |s| lifecycle::suspend(s, &vm.name, true)),
        C::Resume(vm) => one(&vm.common, |s| lifecycle::suspend(s, &vm.name, false)),
        C::Save(vm) => one(&vm.common, |s| lifecycle::save(s, &vm.name)),
        C::Edit(vm) => one(&vm.common, |s| defs::edit(s, &vm.name)),
        C::Dumpconfig(vm) => one(&vm.common, |s| defs::dumpconfig(s, &vm.name)),
        C::Autostart { vm, disable } => one(&vm.common, |s| defs::autostart(s, &vm.name, !disable)),
        C::AutostartAll(common) => {
            let store = Store::new(common.state_dir, common.runtime_dir);
            autostart::start_all(&store, common.json)
        }
        C::ShutdownAll { common, timeout } => {
            let store = Store::new(common.state_dir, common.runtime_dir);
            autostart::shutdown_all(&store, common.json, timeout)
        }
        C::InstallAutostart { unit_dir } => autostart::install(&unit_dir),
        C::Clone {
            src,
            new,
            linked,
            common,
        } => one(&common, |s| clone::clone(s, &src, &new, linked)),
        C::NetDefine { file, common } => one(&common, |s| network::define(s, &file)),
        C::NetUndefine(n) => one(&n.common, |s| network::undefine(s, &n.name)),
        C::NetStart(n) => one(&n.common, |s| network::start(s, &n.name)),
        C::NetDestroy(n) => one(&n.common, |s| network::destroy(s, &n.name)),
        C::NetList(common) => one(&common, network::list),
        C::Console(vm) => {
            let store = Store::new(vm.common.state_dir, vm.common.runtime_dir);
            console::attach(&store, &vm.name)
        }
    }
}
