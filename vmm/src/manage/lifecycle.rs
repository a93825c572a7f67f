// SPDX-License-Identifier: Apache-2.0
//! Starting and stopping defined VMs: `wisp start`, `shutdown`, `destroy`,
//! `reboot`, `suspend`, `resume` and `save` (managed save).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use api::models::{ActionType, InstanceActionInfo};
use serde_json::json;
use vmm::registry::{self, Listed};

use super::store::{log_tail, Store, VmState};
use super::Done;

/// How long a VMM may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra time `shutdown` waits past the VMM's own hard-stop deadline.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// How long `destroy` waits for an API stop before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// One API request; a non-2xx answer is an error carrying the fault message.
pub fn api_call(sock: &Path, method: &str, path: &str, body: Option<String>) -> anyhow::Result<()> {
    let client = api::Client::new(sock).with_timeout(Some(Duration::from_secs(60)));
    let (status, text) = client
        .request(method, path, body.as_deref())
        .with_context(|| format!("{method} {path} on {} failed", sock.display()))?;
    if !(200..300).contains(&status) {
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
            .unwrap_or(text);
        bail!("{method} {path}: {msg} (HTTP {status})");
    }
    Ok(())
}

fn action(sock: &Path, action_type: ActionType, timeout_s: Option<u64>) -> anyhow::Result<()> {
    let body = serde_json::to_string(&InstanceActionInfo {
        action_type,
        timeout_s,
    })?;
    api_call(sock, "PUT", "/actions", Some(body))
}

fn set_paused(sock: &Path, paused: bool) -> anyhow::Result<()> {
    let state = if paused { "Paused" } else { "Resumed" };
    api_call(
        sock,
        "PATCH",
        "/vm",
        Some(json!({ "state": state }).to_string()),
    )
}

/// Waits until the VMM of `l` is gone; false on timeout.
fn wait_gone(l: &Listed, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while registry::entry_alive(&l.entry) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// SIGKILLs the VMM of `l` (if it is still that process) and waits for it.
fn kill(l: &Listed) -> anyhow::Result<()> {
    if registry::entry_alive(&l.entry) {
        let pid = i32::try_from(l.entry.pid).context("pid out of range")?;
        // SAFETY: kill has no memory effects; the pid was just checked to be
        // this VM's VMM (same start time).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if !wait_gone(l, Duration::from_secs(10)) {
        bail!("VMM pid {} did not die after SIGKILL", l.entry.pid);
    }
    Ok(())
}

fn vmm_command(store: &Store, name: &str, force_boot: bool) -> anyhow::Result<(Command, bool)> {
    let def = store.load(name)?;
    let exe = std::env::current_exe().context("Cannot find the wisp binary")?;
    let mut cmd = Command::new(exe);
    let path = |f: &str| store.file(name, f).display().to_string();
    cmd.args(["run", "--name", name, "--id", name]);
    cmd.args(["--runtime-dir", &store.runtime_dir.display().to_string()]);
    cmd.args(["--api-sock", &path("api.sock")]);
    cmd.args(["--serial", &super::console::serial_spec(store, name)]);
    let restored = match store.managed_save(name) {
        Some((state, mem)) if !force_boot => {
            let paused = std::fs::read_to_string(store.file(name, "save.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("paused")?.as_bool())
                .unwrap_or(false);
            cmd.arg("--restore").arg(state).arg("--mem").arg(mem);
            if paused {
                cmd.arg("--paused");
            }
            true
        }
        _ => {
            let run_cfg = store.file(name, "run-config.json");
            super::definition::write_atomic(&run_cfg, def.config_file_json().as_bytes())
                .with_context(|| format!("Cannot write {}", run_cfg.display()))?;
            cmd.arg("--config-file").arg(run_cfg);
            false
        }
    };
    Ok((cmd, restored))
}

/// Starts `name` in the background (its lock held by the caller).
pub fn start_locked(store: &Store, name: &str, force_boot: bool) -> anyhow::Result<Done> {
    match store.entry(name) {
        Some(l) if l.alive => bail!("VM '{name}' is already running (pid {})", l.entry.pid),
        Some(_) => {
            registry::prune(&store.runtime_dir, name);
        }
        None => {}
    }
    let (mut cmd, restored) = vmm_command(store, name, force_boot)?;
    let log_path = store.file(name, "vmm.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("Cannot open {}", log_path.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    use std::io::Write;
    let _ = writeln!(log, "--- wisp start {name} (unix time {now}) ---");
    cmd.stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .context("Cannot duplicate the log descriptor")?,
        )
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("Cannot start the VMM")?;
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("Cannot wait for the VMM")? {
            // A VMM exits successfully only after running the VM (power off,
            // reset, stop): the guest was quicker than this loop.
            if status.success() {
                return Ok(Done {
                    text: format!(
                        "VM '{name}' started and has already stopped: {}",
                        log_tail(&log_path, 1)
                    ),
                    json: json!({ "name": name, "pid": pid, "restored": restored, "stopped": true }),
                });
            }
            bail!(
                "VM '{name}' failed to start: the VMM exited ({status}). Last lines of {}:\n{}",
                log_path.display(),
                log_tail(&log_path, 15)
            );
        }
        if let Some(l) = store.entry(name) {
            if l.alive && l.entry.pid == pid && l.entry.state != "Not started" {
                break;
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "VM '{name}' did not come up within {} s; killed it. Last lines of {}:\n{}",
                START_TIMEOUT.as_secs(),
                log_path.display(),
                log_tail(&log_path, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if restored || force_boot {
        store.remove_managed_save(name);
    }
    let how = if restored {
        "restored from its managed save"
    } else {
        "started"
    };
    Ok(Done {
        text: format!("VM '{name}' {how} (pid {pid})"),
        json: json!({ "name": name, "pid": pid, "restored": restored }),
    })
}

/// `wisp start NAME`.
pub fn start(store: &Store, name: &str, force_boot: bool) -> anyhow::Result<Done> {
    store.load(name)?;
    let _lock = store.lock(name)?;
    start_locked(store, name, force_boot)
}

/// Orderly shutdown (lock held by the caller): the ACPI power button, a hard
/// stop by the VMM after `timeout` s, SIGKILL if even that does not happen.
pub fn shutdown_locked(store: &Store, name: &str, timeout: Option<u64>) -> anyhow::Result<Done> {
    let l = store.running(name)?;
    let t = timeout.unwrap_or(InstanceActionInfo::DEFAULT_SHUTDOWN_TIMEOUT_S);
    let sock = store.api_sock(name)?;
    let mut how = "powered off";
    if VmState::of(Some(&l)) == VmState::NotStarted {
        action(&sock, ActionType::Stop, None)?;
        how = "stopped (it had not booted)";
    } else {
        action(&sock, ActionType::Shutdown, Some(t))?;
    }
    if !wait_gone(&l, Duration::from_secs(t) + SHUTDOWN_GRACE) {
        kill(&l)?;
        how = "killed (the VMM did not stop)";
    } else if log_tail(&store.file(name, "vmm.log"), 1).contains("did not power off within") {
        how = "stopped (the guest did not power off within the timeout)";
    }
    registry::prune(&store.runtime_dir, name);
    Ok(Done {
        text: format!("VM '{name}' {how}"),
        json: json!({ "name": name, "result": how }),
    })
}

/// `wisp shutdown NAME`.
pub fn shutdown(store: &Store, name: &str, timeout: Option<u64>) -> anyhow::Result<Done> {
    store.load(name)?;
    let _lock = store.lock(name)?;
    shutdown_locked(store, name, timeout)
}

/// `wisp destroy NAME`: stop at once (API stop, else SIGKILL).
pub fn destroy(store: &Store, name: &str) -> anyhow::Result<Done> {
    store.load(name)?;
    let _lock = store.lock(name)?;
    let how = match store.entry(name) {
        None => bail!("VM '{name}' is not running"),
        Some(l) if !l.alive => "cleaned up (its VMM had crashed)",
        Some(l) => {
            let stopped = l
                .entry
                .api_sock
                .as_deref()
                .map(|s| action(s, ActionType::Stop, None).is_ok())
                .unwrap_or(false);
            if stopped && wait_gone(&l, STOP_WAIT) {
                "destroyed"
            } else {
                kill(&l)?;
                "destroyed (SIGKILL)"
            }
        }
    };
    registry::prune(&store.runtime_dir, name);
    Ok(Done {
        text: format!("VM '{name}' {how}"),
        json: json!({ "name": name, "result": how }),
    })
}

/// `wisp reboot NAME`: an orderly shutdown, then a fresh start.
pub fn reboot(store: &Store, name: &str, timeout: Option<u64>) -> anyhow::Result<Done> {
    store.load(name)?;
    let _lock = store.lock(name)?;
    let down = shutdown_locked(store, name, timeout)?;
    let up = start_locked(store, name, false)?;
    Ok(Done {
        text: format!("{}; {}", down.text, up.text),
        json: json!({ "name": name, "shutdown": down.json["result"], "pid": up.json["pid"] }),
    })
}

/// `wisp suspend NAME` / `wisp resume NAME`.
pub fn suspend(store: &Store, name: &str, paused: bool) -> anyhow::Result<Done> {
    store.load(name)?;
    set_paused(&store.api_sock(name)?, paused)?;
    let how = if paused { "suspended" } else { "resumed" };
    Ok(Done {
        text: format!("VM '{name}' {how}"),
        json: json!({ "name": name, "state": if paused { "paused" } else { "running" } }),
    })
}

/// `wisp save NAME`: pause, snapshot into the state directory, stop. The next
/// `wisp start` restores it.
pub fn save(store: &Store, name: &str) -> anyhow::Result<Done> {
    store.load(name)?;
    let _lock = store.lock(name)?;
    let l = store.running(name)?;
    let sock = store.api_sock(name)?;
    let was_paused = VmState::of(Some(&l)) == VmState::Paused;
    if VmState::of(Some(&l)) == VmState::NotStarted {
        bail!("VM '{name}' has not booted: nothing to save");
    }
    if !was_paused {
        set_paused(&sock, true)?;
    }
    let (state, mem) = store.save_paths(name);
    store.remove_managed_save(name);
    let body = json!({
        "snapshot_type": "Full",
        "snapshot_path": state.display().to_string(),
        "mem_file_path": mem.display().to_string(),
    });
    if let Err(e) = api_call(&sock, "PUT", "/snapshot/create", Some(body.to_string())) {
        store.remove_managed_save(name);
        if !was_paused {
            let _ = set_paused(&sock, false);
        }
        return Err(e.context(format!("Cannot save VM '{name}'; it keeps running")));
    }
    super::definition::write_atomic(
        &store.file(name, "save.json"),
        json!({ "paused": was_paused }).to_string().as_bytes(),
    )?;
    action(&sock, ActionType::Stop, None)?;
    if !wait_gone(&l, STOP_WAIT) {
        kill(&l)?;
    }
    registry::prune(&store.runtime_dir, name);
    Ok(Done {
        text: format!(
            "VM '{name}' saved to {}; `wisp start {name}` restores it",
            state.display()
        ),
        json: json!({ "name": name, "state_file": state, "mem_file": mem }),
    })
}
