// SPDX-License-Identifier: Apache-2.0
//! `wisp ctl`: drive a running wisp through its API socket.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use api::models::{
    ActionType, InstanceActionInfo, InstanceInfo, MemBackend, MemBackendType, MigrationReceive,
    MigrationSend, MigrationStatus, SnapshotCreateParams, SnapshotLoadParams, SnapshotType, Vm,
    VmState,
};

/// `wisp ctl` arguments.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct CtlArgs {
    /// Path of the VM's API socket.
    #[arg(long = "api-sock", value_name = "PATH", conflicts_with = "vm")]
    pub api_sock: Option<PathBuf>,
    /// The VM's name instead of --api-sock (as given to `wisp run --name`, or defined).
    #[arg(value_name = "NAME")]
    pub vm: Option<String>,
    /// Where named VMMs register [env: WISP_RUNTIME_DIR] [default: /run/wisp].
    #[arg(long = "runtime-dir", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Print the API's JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the API to answer.
    #[arg(long = "request-timeout", value_name = "S", default_value_t = 60)]
    pub request_timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `wisp ctl` commands.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// Show the instance id, state and version.
    Info,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Orderly shutdown: ACPI power button, then a hard stop after the timeout.
    Shutdown {
        /// Seconds to wait for the guest before stopping it.
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Stop the VM at once.
    Stop,
    /// Send Ctrl+Alt+Del to the guest.
    CtrlAltDel,
    /// Print the VM configuration.
    Config,
    /// Create or load a snapshot.
    Snapshot {
        /// Snapshot action.
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Live-migrate this VM to a waiting destination.
    Migrate {
        /// Destination: unix:PATH or tcp:HOST:PORT.
        #[arg(long, value_name = "URI")]
        to: String,
        /// Longest acceptable final pause, ms.
        #[arg(long = "max-downtime", value_name = "MS")]
        max_downtime: Option<u64>,
        /// Throttle vCPUs if pre-copy does not converge.
        #[arg(long = "auto-converge")]
        auto_converge: bool,
        /// Cap the migration stream's bandwidth, MiB/s.
        #[arg(long = "max-bandwidth", value_name = "MIB_S")]
        max_bandwidth: Option<u64>,
        /// Migration token file (read by the VMM; see docs/migration.md).
        #[arg(long = "token-file", value_name = "FILE")]
        token_file: Option<String>,
    },
    /// Inspect or control a migration.
    Migration {
        /// Migration action.
        #[command(subcommand)]
        command: MigrationCommand,
    },
}

/// `wisp ctl snapshot ...`.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum SnapshotCommand {
    /// Snapshot the (paused) VM.
    Create {
        /// Where the VM state goes.
        #[arg(long = "snapshot-path", value_name = "P")]
        snapshot_path: String,
        /// Where guest memory goes.
        #[arg(long = "mem-file-path", value_name = "M")]
        mem_file_path: String,
        /// Only pages dirtied since the last snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// Restore a snapshot into this (unstarted) VM.
    Load {
        /// The VM state file.
        #[arg(long = "snapshot-path", value_name = "P")]
        snapshot_path: String,
        /// The guest memory file.
        #[arg(long = "mem-file-path", value_name = "M")]
        mem_file_path: String,
        /// Resume the VM after loading.
        #[arg(long)]
        resume: bool,
        /// Keep tracking dirty pages.
        #[arg(long = "track-dirty-pages")]
        track_dirty_pages: bool,
    },
}

/// `wisp ctl migration ...`.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum MigrationCommand {
    /// Show the migration's progress.
    Status,
    /// Cancel the running migration.
    Cancel,
    /// Wait for an incoming migration (on an unstarted VM).
    Receive {
        /// Where to listen: unix:PATH or tcp:HOST:PORT.
        #[arg(long, value_name = "URI")]
        from: String,
        /// Give up if the handshake or any frame takes longer, seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Migration token file (read by the VMM; see docs/migration.md).
        #[arg(long = "token-file", value_name = "FILE")]
        token_file: Option<String>,
    },
}

/// One HTTP request to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// HTTP method.
    pub method: &'static str,
    /// URI path.
    pub path: &'static str,
    /// JSON body.
    pub body: Option<String>,
}

fn put<T: serde::Serialize>(path: &'static str, body: &T) -> anyhow::Result<Call> {
    Ok(Call {
        method: "PUT",
        path,
        body: Some(serde_json::to_string(body)?),
    })
}

fn action(action_type: ActionType, timeout_s: Option<u64>) -> anyhow::Result<Call> {
    put(
        "/actions",
        &InstanceActionInfo {
            action_type,
            timeout_s,
        },
    )
}

fn vm_state(state: VmState) -> anyhow::Result<Call> {
    Ok(Call {
        method: "PATCH",
        path: "/vm",
        body: Some(serde_json::to_string(&Vm { state })?),
    })
}

fn get(path: &'static str) -> Call {
    Call {
        method: "GET",
        path,
        body: None,
    }
}

/// The request a command makes.
pub fn build_call(command: &CtlCommand) -> anyhow::Result<Call> {
    match command {
        CtlCommand::Info => Ok(get("/")),
        CtlCommand::Pause => vm_state(VmState::Paused),
        CtlCommand::Resume => vm_state(VmState::Resumed),
        CtlCommand::Shutdown { timeout } => action(ActionType::Shutdown, *timeout),
        CtlCommand::Stop => action(ActionType::Stop, None),
        CtlCommand::CtrlAltDel => action(ActionType::SendCtrlAltDel, None),
        CtlCommand::Config => Ok(get("/vm/config")),
        CtlCommand::Snapshot {
            command:
                SnapshotCommand::Create {
                    snapshot_path,
                    mem_file_path,
                    diff,
                },
        } => put(
            "/snapshot/create",
            &SnapshotCreateParams {
                snapshot_type: if *diff {
                    SnapshotType::Diff
                } else {
                    SnapshotType::Full
                },
                snapshot_path: snapshot_path.clone(),
                mem_file_path: mem_file_path.clone(),
            },
        ),
        CtlCommand::Snapshot {
            command:
                SnapshotCommand::Load {
                    snapshot_path,
                    mem_file_path,
                    resume,
                    track_dirty_pages,
                },
        } => put(
            "/snapshot/load",
            &SnapshotLoadParams {
                snapshot_path: snapshot_path.clone(),
                mem_backend: Some(MemBackend {
                    backend_type: MemBackendType::File,
                    backend_path: mem_file_path.clone(),
                }),
                mem_file_path: None,
                track_dirty_pages: *track_dirty_pages,
                resume_vm: *resume,
                network_overrides: Vec::new(),
                vsock_override: None,
                clock_realtime: false,
            },
        ),
        CtlCommand::Migrate {
            to,
            max_downtime,
            auto_converge,
            max_bandwidth,
            token_file,
        } => put(
            "/migration/send",
            &MigrationSend {
                uri: to.clone(),
                max_downtime_ms: *max_downtime,
                auto_converge: auto_converge.then_some(true),
                max_bandwidth_mib_s: *max_bandwidth,
                token_file: token_file.clone(),
            },
        ),
        CtlCommand::Migration {
            command: MigrationCommand::Status,
        } => Ok(get("/migration")),
        CtlCommand::Migration {
            command: MigrationCommand::Cancel,
        } => Ok(Call {
            method: "PUT",
            path: "/migration/cancel",
            body: None,
        }),
        CtlCommand::Migration {
            command:
                MigrationCommand::Receive {
                    from,
                    timeout,
                    token_file,
                },
        } => put(
            "/migration/receive",
            &MigrationReceive {
                uri: from.clone(),
                timeout_s: *timeout,
                token_file: token_file.clone(),
            },
        ),
    }
}

/// What a command prints and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit code.
    pub code: i32,
    /// Text for stdout (with trailing newline, or empty).
    pub stdout: String,
    /// Text for stderr (with trailing newline, or empty).
    pub stderr: String,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn human_ok(command: &CtlCommand, body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    match command {
        CtlCommand::Info => match serde_json::from_str::<InstanceInfo>(body) {
            Ok(i) => {
                let state = serde_json::to_value(i.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                format!(
                    "id:      {}\nstate:   {}\nversion: {} {}\n",
                    i.id, state, i.app_name, i.vmm_version
                )
            }
            Err(_) => format!("{body}\n"),
        },
        CtlCommand::Migration {
            command: MigrationCommand::Status,
        } => match serde_json::from_str::<MigrationStatus>(body) {
            Ok(s) => {
                let mut out = format!("state:       {:?}\n", s.state);
                if let Some(u) = &s.uri {
                    out.push_str(&format!("peer:        {u}\n"));
                }
                out.push_str(&format!(
                    "transferred: {} of {}\niteration:   {}\ndirty pages: {}\n",
                    mib(s.transferred_bytes),
                    mib(s.total_bytes),
                    s.iteration,
                    s.remaining_dirty_pages
                ));
                if let Some(d) = s.downtime_ms {
                    out.push_str(&format!("downtime:    {d} ms\n"));
                }
                if let Some(e) = &s.error {
                    out.push_str(&format!("error:       {e}\n"));
                }
                out
            }
            Err(_) => format!("{body}\n"),
        },
        _ => match parsed {
            Some(v) => format!(
                "{}\n",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| body.to_owned())
            ),
            None => {
                let done = match command {
                    CtlCommand::Pause => "paused",
                    CtlCommand::Resume => "resumed",
                    CtlCommand::Shutdown { .. } => "shutdown requested",
                    CtlCommand::Stop => "stopped",
                    CtlCommand::CtrlAltDel => "Ctrl+Alt+Del sent",
                    CtlCommand::Snapshot {
                        command: SnapshotCommand::Create { .. },
                    } => "snapshot created",
                    CtlCommand::Snapshot {
                        command: SnapshotCommand::Load { .. },
                    } => "snapshot loaded",
                    CtlCommand::Migrate { .. } => "migration started",
                    CtlCommand::Migration {
                        command: MigrationCommand::Cancel,
                    } => "migration cancelled",
                    CtlCommand::Migration {
                        command: MigrationCommand::Receive { .. },
                    } => "waiting for the migration",
                    _ => "ok",
                };
                format!("{done}\n")
            }
        },
    }
}

/// Turns the API's answer into output and an exit code.
pub fn render(command: &CtlCommand, json: bool, status: u16, body: &str) -> Outcome {
    if (200..300).contains(&status) {
        let stdout = if json {
            if body.is_empty() {
                String::new()
            } else {
                format!("{body}\n")
            }
        } else {
            human_ok(command, body)
        };
        return Outcome {
            code: 0,
            stdout,
            stderr: String::new(),
        };
    }
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned());
    let stderr = if json {
        format!(
            "{}\n",
            serde_json::json!({ "status": status, "fault_message": message })
        )
    } else {
        format!("error: {message} (HTTP {status})\n")
    };
    Outcome {
        code: 1,
        stdout: String::new(),
        stderr,
    }
}

/// The API socket `wisp ctl` talks to: `--api-sock`, or that of the VM named.
pub fn resolve_socket(args: &CtlArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.api_sock {
        return Ok(s.clone());
    }
    let Some(name) = &args.vm else {
        anyhow::bail!("Give the VM's name or --api-sock PATH");
    };
    let dir = args
        .runtime_dir
        .clone()
        .or_else(|| std::env::var_os("WISP_RUNTIME_DIR").map(PathBuf::from))
        .unwrap_or_else(|| vmm::registry::DEFAULT_RUNTIME_DIR.into());
    if !vmm::registry::valid_name(name) {
        anyhow::bail!("{}", vmm::registry::RegistryError::BadName(name.clone()));
    }
    match vmm::registry::lookup(&dir, name) {
        Some(l) if l.alive => l.entry.api_sock.ok_or_else(|| {
            anyhow::anyhow!(
                "VM '{name}' runs without an API socket (pid {})",
                l.entry.pid
            )
        }),
        Some(l) => anyhow::bail!(
            "VM '{name}' is not running (its VMM, pid {}, is gone)",
            l.entry.pid
        ),
        None => anyhow::bail!(
            "No VM named '{name}' is running (none registered in {})",
            dir.display()
        ),
    }
}

/// Runs `wisp ctl`; returns the process exit code.
pub fn run(args: CtlArgs) -> anyhow::Result<i32> {
    let call = build_call(&args.command)?;
    let sock = resolve_socket(&args)?;
    let client = api::Client::new(&sock)
        .with_timeout(Some(Duration::from_secs(args.request_timeout.max(1))));
    let (status, body) = client
        .request(call.method, call.path, call.body.as_deref())
        .with_context(|| format!("{} {} failed", call.method, call.path))?;
    let out = render(&args.command, args.json, status, &body);
    // Broken pipes on output are not worth a different exit code.
    let _ = std::io::stdout().write_all(out.stdout.as_bytes());
    let _ = std::io::stderr().write_all(out.stderr.as_bytes());
    Ok(out.code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct T {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> CtlArgs {
        let mut v = vec!["ctl", "--api-sock", "/s"];
        v.extend_from_slice(args);
        T::try_parse_from(v).unwrap().ctl
    }

    fn call(args: &[&str]) -> (String, String, serde_json::Value) {
        let c = build_call(&parse(args).command).unwrap();
        let body = c
            .body
            .map(|b| serde_json::from_str(&b).unwrap())
            .unwrap_or(serde_json::Value::Null);
        (c.method.to_owned(), c.path.to_owned(), body)
    }

    #[test]
    fn calls() {
        assert_eq!(call(&["info"]).1, "/");
        let (m, p, b) = call(&["pause"]);
        assert_eq!((m.as_str(), p.as_str()), ("PATCH", "/vm"));
        assert_eq!(b["state"], "Paused");
        assert_eq!(call(&["resume"]).2["state"], "Resumed");
        let (_, p, b) = call(&["shutdown", "--timeout", "7"]);
        assert_eq!(p, "/actions");
        assert_eq!(b["action_type"], "Shutdown");
        assert_eq!(b["timeout_s"], 7);
        assert!(call(&["shutdown"]).2.get("timeout_s").is_none());
        assert_eq!(call(&["stop"]).2["action_type"], "Stop");
        assert_eq!(call(&["ctrl-alt-del"]).2["action_type"], "SendCtrlAltDel");
        assert_eq!(call(&["config"]).1, "/vm/config");
        let (_, p, b) = call(&[
            "snapshot",
            "create",
            "--snapshot-path",
            "/a",
            "--mem-file-path",
            "/b",
            "--diff",
        ]);
        assert_eq!(p, "/snapshot/create");
        assert_eq!(b["snapshot_type"], "Diff");
        let (_, p, b) = call(&[
            "snapshot",
            "load",
            "--snapshot-path",
            "/a",
            "--mem-file-path",
            "/b",
            "--resume",
        ]);
        assert_eq!(p, "/snapshot/load");
        assert_eq!(b["mem_backend"]["backend_path"], "/b");
        assert_eq!(b["resume_vm"], true);
        let (_, p, b) = call(&["migrate", "--to", "unix:/m", "--max-downtime", "50"]);
        assert_eq!(p, "/migration/send");
        assert_eq!(b["max_downtime_ms"], 50);
        assert_eq!(call(&["migration", "status"]).1, "/migration");
        assert_eq!(call(&["migration", "cancel"]).1, "/migration/cancel");
        assert_eq!(
            call(&["migration", "receive", "--from", "tcp:0.0.0.0:1"]).2["uri"],
            "tcp:0.0.0.0:1"
        );
        let (_, _, b) = call(&[
            "migration",
            "receive",
            "--from",
            "unix:/m",
            "--timeout",
            "5",
            "--token-file",
            "/t",
        ]);
        assert_eq!(
            (b["timeout_s"].clone(), b["token_file"].clone()),
            (5.into(), "/t".into())
        );
        let (_, _, b) = call(&["migrate", "--to", "unix:/m", "--token-file", "/t"]);
        assert_eq!(b["token_file"], "/t");
        // Every body the CLI builds passes the server's own router.
        for args in [
            &["pause"][..],
            &["shutdown", "--timeout", "3"],
            &["stop"],
            &[
                "snapshot",
                "create",
                "--snapshot-path",
                "/a",
                "--mem-file-path",
                "/b",
            ],
            &["migrate", "--to", "unix:/m"],
            &["migrate", "--to", "unix:/m", "--token-file", "/t"],
            &[
                "migration",
                "receive",
                "--from",
                "unix:/m",
                "--timeout",
                "5",
            ],
            &[
                "migration",
                "receive",
                "--from",
                "unix:/m",
                "--token-file",
                "/t",
            ],
            &["migration", "cancel"],
        ] {
            let c = build_call(&parse(args).command).unwrap();
            let body = c.body.unwrap_or_default();
            assert!(
                api::route(c.method, c.path, body.as_bytes()).is_ok(),
                "{args:?}"
            );
        }
    }

    #[test]
    fn name_or_socket() {
        let a = |v: &[&str]| T::try_parse_from(v).map(|t| t.ctl);
        let by_name = a(&["ctl", "web1", "info"]).unwrap();
        assert_eq!(by_name.vm.as_deref(), Some("web1"));
        assert_eq!(by_name.command, CtlCommand::Info);
        let by_name = a(&["ctl", "web1", "shutdown", "--timeout", "3"]).unwrap();
        assert_eq!(by_name.command, CtlCommand::Shutdown { timeout: Some(3) });
        assert!(a(&["ctl", "--api-sock", "/s", "web1", "info"]).is_err());
        let none = a(&["ctl", "info"]).unwrap();
        assert_eq!(none.vm, None);
        let e = resolve_socket(&none).unwrap_err().to_string();
        assert!(e.contains("--api-sock"), "{e}");
        let dir = std::env::temp_dir().join(format!("wisp-ctl-name-{}", std::process::id()));
        let mut missing = by_name.clone();
        missing.runtime_dir = Some(dir.clone());
        let e = resolve_socket(&missing).unwrap_err().to_string();
        assert!(e.contains("No VM named 'web1'"), "{e}");
        let reg = vmm::registry::Registration::register(
            &dir,
            vmm::registry::Entry {
                name: "web1".into(),
                pid: std::process::id(),
                state: "Running".into(),
                vcpus: 1,
                mem_mib: 64,
                api_sock: Some(dir.join("web1.sock")),
                start_time: None,
            },
        )
        .unwrap();
        assert_eq!(resolve_socket(&missing).unwrap(), dir.join("web1.sock"));
        drop(reg);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rendering() {
        let info = r#"{"id":"vm1","state":"Running","vmm_version":"0.1.0","app_name":"wisp"}"#;
        let o = render(&CtlCommand::Info, false, 200, info);
        assert_eq!(o.code, 0);
        assert!(o.stdout.contains("Running") && o.stdout.contains("vm1"));
        let o = render(&CtlCommand::Info, true, 200, info);
        assert_eq!(o.stdout.trim(), info);
        let o = render(&CtlCommand::Pause, false, 204, "");
        assert_eq!(o.stdout, "paused\n");
        let o = render(
            &CtlCommand::Stop,
            false,
            400,
            r#"{"fault_message":"VM not running"}"#,
        );
        assert_eq!(o.code, 1);
        assert_eq!(o.stderr, "error: VM not running (HTTP 400)\n");
        let o = render(&CtlCommand::Stop, true, 400, r#"{"fault_message":"x"}"#);
        assert!(o.stderr.contains("\"fault_message\":\"x\""));
        let st = r#"{"state":"Sending","transferred_bytes":1048576,"total_bytes":2097152,"iteration":2,"remaining_dirty_pages":10}"#;
        let o = render(
            &CtlCommand::Migration {
                command: MigrationCommand::Status,
            },
            false,
            200,
            st,
        );
        assert!(o.stdout.contains("Sending") && o.stdout.contains("1.0 MiB of 2.0 MiB"));
    }

    #[test]
    fn end_to_end_against_server() {
        let dir = std::env::temp_dir().join(format!("wisp-ctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let (handle, rx) = api::ApiServer::start(&sock).unwrap();
        let vmm = std::thread::spawn(move || {
            for (req, resp) in rx {
                resp.send(match req {
                    api::ApiRequest::PatchVm(_) => Ok(None),
                    _ => Err(api::ApiFault::bad_request("not now")),
                });
            }
        });
        let args = |cmd| CtlArgs {
            api_sock: Some(sock.clone()),
            vm: None,
            runtime_dir: None,
            json: false,
            request_timeout: 5,
            command: cmd,
        };
        assert_eq!(run(args(CtlCommand::Pause)).unwrap(), 0);
        assert_eq!(run(args(CtlCommand::Stop)).unwrap(), 1);
        drop(handle);
        vmm.join().unwrap();
        assert!(run(args(CtlCommand::Info)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
