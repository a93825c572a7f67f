// SPDX-License-Identifier: Apache-2.0
//! virsh-style management (`wisp define/start/shutdown/save/list/...`) with
//! temporary state and runtime directories and the test guest. Every test's
//! VMMs are killed by the `Env` guard, even when the test fails.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{die_with_test, guest, wait, wait_tick, Run, TempDir};

/// A state + runtime directory pair; kills every VMM started under it on drop.
struct Env {
    dir: TempDir,
    state: PathBuf,
    run: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let state = dir.path("state");
        let run = dir.path("run");
        Self { dir, state, run }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(harness::wisp());
        c.args(args)
            .env("WISP_STATE_DIR", &self.state)
            .env("WISP_RUNTIME_DIR", &self.run)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs `wisp ARGS` with this environment.
    fn wisp(&self, args: &[&str]) -> Run {
        let child = die_with_test(&mut self.cmd(args))
            .spawn()
            .expect("spawn wisp");
        wait(child, Duration::from_secs(120))
    }

    /// Runs `wisp ARGS`, asserting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.wisp(args);
        assert_eq!(
            r.code,
            Some(0),
            "wisp {args:?} failed:\n{}{}",
            r.stdout,
            r.stderr
        );
        r.stdout
    }

    /// Runs `wisp ARGS`, asserting failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let r = self.wisp(args);
        assert_eq!(
            r.code,
            Some(1),
            "wisp {args:?} should fail:\n{}{}",
            r.stdout,
            r.stderr
        );
        r.stderr
    }

    /// Writes a definition of the test guest and defines it.
    fn define(&self, name: &str, cmdline: &str, extra: &str) -> PathBuf {
        let file = self.dir.path(&format!("{name}.def.json"));
        let text = format!(
            r#"{{"name": "{name}", {extra}
                "boot-source": {{"kernel_image_path": "{}", "boot_args": "{cmdline}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            guest().display()
        );
        std::fs::write(&file, text).unwrap();
        self.ok(&["define", file.to_str().unwrap()]);
        file
    }

    fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["list", "--all", "--json"])).unwrap()
    }

    fn row(&self, name: &str) -> serde_json::Value {
        self.list()
            .into_iter()
            .find(|r| r["name"] == name)
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits (up to 30 s) until `wisp list` shows `name` in `state`: a VMM
    /// answers its API a moment before it has booted and registered so.
    fn wait_state(&self, name: &str, state: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while self.row(name)["state"] != state {
            assert!(
                Instant::now() < end,
                "{name} never {state}: {}",
                self.row(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn console_log(&self, name: &str) -> PathBuf {
        self.state.join(name).join("console.log")
    }

    fn pid(&self, name: &str) -> i32 {
        self.row(name)["pid"].as_i64().expect("pid") as i32
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.run) else {
            return;
        };
        let me = self.state.display().to_string();
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let Some(pid) = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["pid"].as_i64())
            else {
                continue;
            };
            // Only a process started for this test (its command line names our
            // state directory), so a reused pid is never hit.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&me) {
                // SAFETY: signalling a VMM this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn pid_gone(pid: i32) -> bool {
    let end = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

const TICK: &str = "tests=tick tick_ms=50 pattern_mib=1";

#[test]
fn test_define_start_list_ctl_suspend_shutdown() {
    require_kvm!();
    let env = Env::new("manage-life");
    env.define("web", TICK, "");
    let r = env.row("web");
    assert_eq!(r["state"], "shut off");
    assert_eq!(r["defined"], true);
    assert_eq!(r["mem_mib"], 64);
    // Not running: `wisp list` without --all does not show it.
    let active: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert!(active.is_empty(), "{active:?}");

    let out = env.ok(&["start", "web", "--json"]);
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(started["restored"], false);
    let pid = started["pid"].as_i64().unwrap() as i32;
    let r = env.row("web");
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["pid"], pid);
    wait_tick(&env.console_log("web"), 3);
    let e = env.fails(&["start", "web"]);
    assert!(e.contains("already running"), "{e}");

    // `wisp ctl` by name.
    let info = env.ok(&["ctl", "web", "--json", "info"]);
    assert!(info.contains("\"Running\""), "{info}");
    let e = env.fails(&["ctl", "nosuch", "info"]);
    assert!(e.contains("No VM named 'nosuch'"), "{e}");

    env.ok(&["suspend", "web"]);
    assert_eq!(env.row("web")["state"], "paused");
    let text = env.ok(&["list"]);
    assert!(text.contains("web") && text.contains("paused"), "{text}");
    env.ok(&["resume", "web"]);
    assert_eq!(env.row("web")["state"], "running");

    // The tick guest ignores the power button: hard stop after the timeout.
    let out = env.ok(&["shutdown", "web", "--timeout", "1"]);
    assert!(
        out.contains("did not power off within the timeout"),
        "{out}"
    );
    assert!(pid_gone(pid));
    assert_eq!(env.row("web")["state"], "shut off");
    let e = env.fails(&["shutdown", "web"]);
    assert!(e.contains("not running"), "{e}");
}

#[test]
fn test_define_refuses_bad_definitions() {
    let env = Env::new("manage-bad");
    let bad = |name: &str, text: &str, want: &str| {
        let f = env.dir.path(name);
        std::fs::write(&f, text).unwrap();
        let e = env.fails(&["define", f.to_str().unwrap()]);
        assert!(e.contains(want), "{name}: {e}");
    };
    bad("json", "{\"name\": ", "Invalid definition");
    bad(
        "noname",
        r#"{"boot-source": {"kernel_image_path": "/k"}}"#,
        "\"name\"",
    );
    bad(
        "badname",
        r#"{"name": "../x", "boot-source": {"kernel_image_path": "/k"}}"#,
        "Invalid VM name",
    );
    bad(
        "unknown",
        r#"{"name": "x", "boot-source": {"kernel_image_path": "/k"}, "cpus": 2}"#,
        "cpus",
    );
    bad("noboot", r#"{"name": "x"}"#, "boot-source");
    assert!(env.list().is_empty());
    for cmd in ["start", "dumpconfig", "destroy", "console"] {
        let e = env.fails(&[cmd, "nosuch"]);
        assert!(e.contains("No VM named 'nosuch' is defined"), "{cmd}: {e}");
    }
    let e = env.fails(&["start", "a/../b"]);
    assert!(e.contains("Invalid VM name"), "{e}");
}

#[test]
fn test_concurrent_starts_start_one_vm() {
    require_kvm!();
    let env = Env::new("manage-race");
    env.define("race", TICK, "");
    let children: Vec<_> = (0..3)
        .map(|_| {
            die_with_test(&mut env.cmd(&["start", "race"]))
                .spawn()
                .unwrap()
        })
        .collect();
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| wait(c, Duration::from_secs(120)))
        .collect();
    let ok = runs.iter().filter(|r| r.code == Some(0)).count();
    assert_eq!(ok, 1, "{runs:?}");
    for r in runs.iter().filter(|r| r.code != Some(0)) {
        assert!(
            r.stderr.contains("already running") || r.stderr.contains("Another wisp command"),
            "{r:?}"
        );
    }
    // One VMM whose command line names this VM.
    let me = env
        .state
        .join("race")
        .join("api.sock")
        .display()
        .to_string();
    let vmms = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let c = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&c).contains(&me)
        })
        .count();
    assert_eq!(vmms, 1);
    env.ok(&["destroy", "race"]);
    assert_eq!(env.row("race")["state"], "shut off");
}

#[test]
fn test_managed_save_and_restore() {
    require_kvm!();
    let env = Env::new("manage-save");
    env.define("sv", TICK, "");
    env.ok(&["start", "sv"]);
    let log = env.console_log("sv");
    wait_tick(&log, 5);
    let pid = env.pid("sv");
    env.ok(&["save", "sv"]);
    assert!(pid_gone(pid));
    let r = env.row("sv");
    assert_eq!(r["state"], "shut off");
    assert_eq!(r["managed_save"], true);
    let saved = harness::last_tick(&log);
    let out = env.ok(&["start", "sv", "--json"]);
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(started["restored"], true, "{out}");
    // The counter goes on from where it was (not restarting at 1).
    wait_tick(&log, saved + 3);
    let text = std::fs::read_to_string(&log).unwrap();
    let after: Vec<u64> = text.lines().filter_map(harness::tick_of).collect();
    let restart = after.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(restart, 0, "ticks restarted after the restore:\n{text}");
    // A successful start removes the managed save.
    assert_eq!(env.row("sv")["managed_save"], false);
    assert!(!env.state.join("sv/save.state").exists());
    env.ok(&["destroy", "sv"]);
}

#[test]
fn test_crashed_vm_and_pruned_transient_entry() {
    require_kvm!();
    let env = Env::new("manage-crash");
    env.define("cr", TICK, "");
    env.ok(&["start", "cr"]);
    let pid = env.pid("cr");
    // SAFETY: signalling the VMM this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(pid_gone(pid));
    assert_eq!(env.row("cr")["state"], "crashed");
    assert!(
        env.ok(&["list"]).trim().lines().count() == 1,
        "crashed is listed only with --all"
    );
    // A transient VM (wisp run --name) killed the same way is pruned.
    let g = guest();
    let mut t = die_with_test(&mut env.cmd(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--memory",
        "64M",
        "--cmdline",
        TICK,
        "--serial",
        "none",
        "--name",
        "tr",
        "--runtime-dir",
        env.run.to_str().unwrap(),
        "--api-sock",
        env.dir.path("tr.sock").to_str().unwrap(),
    ]))
    .spawn()
    .unwrap();
    harness::wait_for_api(&env.dir.path("tr.sock"));
    env.wait_state("tr", "running");
    t.kill().unwrap();
    t.wait().unwrap();
    assert!(env.row("tr").is_null(), "a dead transient VM is pruned");
    assert!(!env.run.join("tr.json").exists());
    // Starting the crashed VM again works; so does destroying a crashed one.
    env.ok(&["start", "cr"]);
    assert_eq!(env.row("cr")["state"], "running");
    let pid = env.pid("cr");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(pid_gone(pid));
    let out = env.ok(&["destroy", "cr"]);
    assert!(out.contains("crashed"), "{out}");
    assert_eq!(env.row("cr")["state"], "shut off");
}

#[test]
fn test_start_failure_reports_the_vmm_log() {
    require_kvm!();
    let env = Env::new("manage-fail");
    let f = env.dir.path("bad.json");
    std::fs::write(
        &f,
        r#"{"name": "bad", "boot-source": {"kernel_image_path": "/nonexistent/vmlinux"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
    )
    .unwrap();
    env.ok(&["define", f.to_str().unwrap()]);
    let e = env.fails(&["start", "bad"]);
    assert!(e.contains("failed to start"), "{e}");
    assert!(
        e.contains("/nonexistent/vmlinux"),
        "the log tail names the problem: {e}"
    );
    assert_eq!(env.row("bad")["state"], "shut off");
}

#[test]
fn test_edit_dumpconfig_autostart_undefine() {
    let env = Env::new("manage-edit");
    let disk = env.dir.path("rw.img");
    let ro = env.dir.path("ro.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    std::fs::write(&ro, vec![0u8; 4096]).unwrap();
    let drives = format!(
        r#""drives": [{{"drive_id": "rw", "path_on_host": "{}", "is_root_device": true}},
                      {{"drive_id": "ro", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}],"#,
        disk.display(),
        ro.display()
    );
    env.define("ed", TICK, &drives);
    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["dumpconfig", "ed"])).unwrap();
    assert_eq!(dump["machine-config"]["mem_size_mib"], 64);
    assert_eq!(dump["autostart"], false);

    let edit = |editor: &str| {
        let mut c = env.cmd(&["edit", "ed"]);
        c.env("EDITOR", editor).env_remove("VISUAL");
        harness::from_output(die_with_test(&mut c).output().unwrap())
    };
    let r = edit("sed -i s/\\\"mem_size_mib\\\":\\ 64/\\\"mem_size_mib\\\":\\ 96/");
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("updated"), "{r:?}");
    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["dumpconfig", "ed"])).unwrap();
    assert_eq!(dump["machine-config"]["mem_size_mib"], 96);
    // Invalid JSON is refused; the old definition stays.
    let r = edit("sed -i s/{/[/");
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("not changed") && r.stderr.contains("Invalid definition"),
        "{r:?}"
    );
    // So is a renaming.
    let r = edit("sed -i s/\\\"ed\\\"/\\\"other\\\"/");
    assert!(r.stderr.contains("renaming"), "{r:?}");
    let r = edit("true");
    assert!(r.stdout.contains("unchanged"), "{r:?}");
    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["dumpconfig", "ed"])).unwrap();
    assert_eq!(dump["machine-config"]["mem_size_mib"], 96);
    assert_eq!(dump["name"], "ed");

    env.ok(&["autostart", "ed"]);
    assert_eq!(env.row("ed")["autostart"], true);
    env.ok(&["autostart", "--disable", "ed"]);
    assert_eq!(env.row("ed")["autostart"], false);

    let out = env.ok(&["undefine", "ed", "--remove-disks"]);
    assert!(out.contains("kept read-only disk"), "{out}");
    assert!(!disk.exists() && ro.exists());
    assert!(env.row("ed").is_null());
    assert!(!env.state.join("ed").exists());
}

#[test]
fn test_undefine_refuses_a_running_vm_and_reboot_restarts() {
    require_kvm!();
    let env = Env::new("manage-reboot");
    env.define("rb", TICK, "");
    env.ok(&["start", "rb"]);
    let e = env.fails(&["undefine", "rb"]);
    assert!(e.contains("is running"), "{e}");
    let pid = env.pid("rb");
    env.ok(&["reboot", "rb", "--timeout", "1"]);
    assert!(pid_gone(pid));
    let r = env.row("rb");
    assert_eq!(r["state"], "running");
    assert_ne!(r["pid"], pid);
    env.ok(&["destroy", "rb"]);
    env.ok(&["undefine", "rb"]);
    assert!(env.list().is_empty());
}

/// The unit's `Exec*=` command lines, with the binary replaced by the one under test.
fn unit_commands(key: &str) -> Vec<String> {
    let unit = std::fs::read_to_string(
        harness::repo_root().join("resources/systemd/wisp-autostart.service"),
    )
    .unwrap();
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|c| {
            let mut words: Vec<String> = c.split_whitespace().map(str::to_owned).collect();
            assert_eq!(words[0], "/usr/local/bin/wisp");
            words.remove(0);
            words.join(" ")
        })
        .collect()
}

#[test]
fn test_autostart_unit_commands() {
    require_kvm!();
    let env = Env::new("manage-auto");
    env.define("on", TICK, r#""autostart": true,"#);
    env.define("off", TICK, "");
    let start = unit_commands("ExecStart");
    let stop = unit_commands("ExecStop");
    assert_eq!(start.len(), 1);
    assert_eq!(stop.len(), 1);
    let args: Vec<&str> = start[0].split(' ').collect();
    env.ok(&args);
    assert_eq!(env.row("on")["state"], "running");
    assert_eq!(env.row("off")["state"], "shut off");
    // Running it again starts nothing twice.
    env.ok(&args);
    env.ok(&["start", "off"]);
    // Shorter than the unit's timeout: the tick guest ignores the power button.
    let mut args: Vec<&str> = stop[0].split(' ').collect();
    if let Some(i) = args.iter().position(|a| *a == "--timeout") {
        args[i + 1] = "1";
    }
    let out = env.ok(&args);
    assert!(out.contains("'on'") && out.contains("'off'"), "{out}");
    assert_eq!(env.row("on")["state"], "shut off");
    assert_eq!(env.row("off")["state"], "shut off");

    let units = env.dir.path("units");
    env.ok(&["install-autostart", "--unit-dir", units.to_str().unwrap()]);
    let installed = std::fs::read_to_string(units.join("wisp-autostart.service")).unwrap();
    let exe = harness::wisp().display().to_string();
    assert!(
        installed.contains(&format!("ExecStart={exe} autostart-all")),
        "{installed}"
    );
}

/// Output read from a pty master on a thread.
fn pty_reader(master: std::fs::File) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut m = master;
        let mut chunk = [0u8; 4096];
        use std::io::Read;
        while let Ok(n) = m.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn wait_output(buf: &std::sync::Mutex<Vec<u8>>, needle: &str) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "'{needle}' never came on the console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_console_attach_busy_detach() {
    require_kvm!();
    use std::os::fd::FromRawFd;
    let env = Env::new("manage-console");
    env.define("con", TICK, "");
    env.ok(&["start", "con"]);
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors; no name, termios or size given.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptors from openpty, each owned by one File.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut cmd = env.cmd(&["console", "con"]);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    let mut child = die_with_test(&mut cmd).spawn().unwrap();
    let mut input = master.try_clone().unwrap();
    let out = pty_reader(master);
    wait_output(&out, "Ctrl+] detaches");
    // Guest output arrives live.
    let text = wait_output(&out, " ok\r\n");
    assert!(text.contains("tick "), "{text}");
    // A second client is refused and told who holds the console.
    let e = env.fails(&["console", "con"]);
    assert!(
        e.contains("in use by another client") && e.contains(&format!("pid {}", child.id())),
        "{e}"
    );
    // Typing reaches the VM (the test guest does not read it); Ctrl+] detaches.
    use std::io::Write;
    input.write_all(b"hello").unwrap();
    input.write_all(&[0x1d]).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "Ctrl+] did not detach");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    wait_output(&out, "it keeps running");
    // The VM runs on, and the console is free again.
    assert_eq!(env.row("con")["state"], "running");
    let log = env.console_log("con");
    let t = harness::last_tick(&log);
    wait_tick(&log, t + 2);
    let r = env.wisp(&["console", "con"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("Detached"), "{r:?}");
    // A client attached when the VM stops is told so and exits.
    // The VMM frees the console when it sees the last client's hang-up, a
    // moment after that client exits: retry while it is still held.
    let mut tries = 0;
    let mut attached = loop {
        let mut cmd = env.cmd(&["console", "con"]);
        cmd.stdin(Stdio::piped());
        let mut c = die_with_test(&mut cmd).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        match c.try_wait().unwrap() {
            Some(_) if tries < 20 => {
                let mut err = String::new();
                use std::io::Read;
                c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                assert!(err.contains("in use by another client"), "{err}");
                tries += 1;
            }
            _ => break c,
        }
    };
    let _keep_stdin_open = attached.stdin.take();
    let mut lines = harness::LineReader::new(&mut attached);
    lines.wait_line("tick ", Duration::from_secs(30));
    env.ok(&["destroy", "con"]);
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = attached.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "the console client did not notice the VM stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let mut err = String::new();
    use std::io::Read;
    attached
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("stopped"), "{err}");
}

#[test]
fn test_clone_full_linked_and_macs() {
    require_kvm!();
    let env = Env::new("manage-clone");
    let disk = env.dir.path("src-root.img");
    harness::make_pattern_image(&disk, 2 << 20, harness::PATTERN_DISK1);
    let ro = env.dir.path("shared.img");
    std::fs::write(&ro, vec![7u8; 4096]).unwrap();
    let drives = format!(
        r#""drives": [{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true}},
                      {{"drive_id": "ro", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}],"#,
        disk.display(),
        ro.display()
    );
    env.define("src", TICK, &drives);
    env.ok(&["start", "src"]);
    let e = env.fails(&["clone", "src", "full"]);
    assert!(e.contains("is running"), "{e}");
    env.ok(&["destroy", "src"]);

    let out: serde_json::Value =
        serde_json::from_str(&env.ok(&["clone", "src", "full", "--json"])).unwrap();
    let copy = env.dir.path("full-root.img");
    assert_eq!(out["disks"][0]["to"], copy.to_str().unwrap(), "{out}");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&disk).unwrap());
    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["dumpconfig", "full"])).unwrap();
    assert_eq!(dump["name"], "full");
    assert_eq!(dump["drives"][0]["path_on_host"], copy.to_str().unwrap());
    assert_eq!(
        dump["drives"][1]["path_on_host"],
        ro.to_str().unwrap(),
        "read-only disks are shared"
    );
    let e = env.fails(&["clone", "src", "full"]);
    assert!(e.contains("already defined"), "{e}");

    env.ok(&["clone", "src", "thin", "--linked"]);
    let overlay = env.dir.path("thin-root.qcow2");
    let info: serde_json::Value = serde_json::from_str(&harness::image_tool(&[
        "info",
        "--json",
        overlay.to_str().unwrap(),
    ]))
    .unwrap();
    assert!(
        info.to_string().contains(disk.to_str().unwrap()),
        "backed by the source: {info}"
    );
    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["dumpconfig", "thin"])).unwrap();
    assert_eq!(dump["drives"][0]["format"], "qcow2");
    // Both clones boot.
    env.ok(&["start", "full"]);
    env.ok(&["start", "thin"]);
    assert_eq!(env.row("full")["state"], "running");
    assert_eq!(env.row("thin")["state"], "running");
    env.ok(&["destroy", "full"]);
    env.ok(&["destroy", "thin"]);

    // New, locally administered MACs; the shared TAP is pointed out.
    let nic = r#""network-interfaces": [{"iface_id": "net0", "host_dev_name": "tap-n", "guest_mac": "52:54:00:12:34:56"}],"#;
    env.define("nic", TICK, nic);
    let out = env.ok(&["clone", "nic", "nic2"]);
    assert!(out.contains("tap-n"), "{out}");
    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["dumpconfig", "nic2"])).unwrap();
    let mac = dump["network-interfaces"][0]["guest_mac"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(mac, "52:54:00:12:34:56");
    assert_eq!(u8::from_str_radix(&mac[..2], 16).unwrap() & 3, 2, "{mac}");
}

/// Runs `net-destroy` (and kills its dnsmasq) even if the test fails, before
/// the namespace goes: a dnsmasq would otherwise keep it alive.
struct NetGuard<'a> {
    env: &'a Env,
    ns: &'a harness::NetNs,
}

impl NetGuard<'_> {
    fn wisp(&self, args: &[&str]) -> Run {
        let mut c = self.ns.cmd(harness::wisp().to_str().unwrap());
        c.args(args)
            .env("WISP_STATE_DIR", &self.env.state)
            .env("WISP_RUNTIME_DIR", &self.env.run)
            .stdin(Stdio::null());
        harness::from_output(c.output().unwrap())
    }
}

impl Drop for NetGuard<'_> {
    fn drop(&mut self) {
        let _ = self.wisp(&["destroy", "nvm"]);
        let _ = self.wisp(&["net-destroy", "lan"]);
    }
}

#[test]
fn test_network_bridge_nat_dhcp() {
    require_net!();
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("nft") || !have("dnsmasq") {
        eprintln!("SKIPPED: needs nft (nftables) and dnsmasq");
        return;
    }
    let env = Env::new("manage-net");
    let ns = harness::NetNs::new("mnet");
    let net = NetGuard { env: &env, ns: &ns };
    let def = env.dir.path("lan.json");
    std::fs::write(
        &def,
        r#"{"name": "lan", "bridge": "wbr0", "address": "192.168.77.1/24", "nat": true,
            "dhcp": {"start": "192.168.77.100", "end": "192.168.77.200"}}"#,
    )
    .unwrap();
    env.ok(&["net-define", def.to_str().unwrap()]);
    let r = net.wisp(&["net-start", "lan"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = net.wisp(&["net-start", "lan"]);
    assert!(r.stderr.contains("already active"), "{r:?}");
    let addr = ns.output("ip", &["addr", "show", "wbr0"]);
    assert!(addr.contains("192.168.77.1/24"), "{addr}");
    let nft = ns.output("nft", &["list", "table", "ip", "wisp-lan"]);
    assert!(
        nft.contains("ip saddr 192.168.77.0/24 ip daddr != 192.168.77.0/24 masquerade"),
        "{nft}"
    );
    let dhcp = ns.output("ss", &["-lunp"]);
    assert!(
        dhcp.contains(":67") && dhcp.contains("dnsmasq"),
        "no DHCP server: {dhcp}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&net.wisp(&["net-list", "--json"]).stdout).unwrap();
    assert_eq!(list[0]["active"], true, "{list}");

    // A VM on the network's bridge answers a ping from the host side.
    let nic = r#""network-interfaces": [{"iface_id": "net0", "host_dev_name": "wtapn", "bridge": "wbr0"}],"#;
    let file = env.dir.path("nvm.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"name": "nvm", {nic}
                "boot-source": {{"kernel_image_path": "{}", "boot_args": "tests=net_arp_icmp ip=192.168.77.2 net_serve_s=60"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#,
            guest().display()
        ),
    )
    .unwrap();
    env.ok(&["define", file.to_str().unwrap()]);
    let r = net.wisp(&["start", "nvm"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    harness::wait_for_text(
        &env.console_log("nvm"),
        "net_arp_icmp: serving",
        Duration::from_secs(60),
    );
    let ping = ns.output("ping", &["-c", "2", "-W", "5", "192.168.77.2"]);
    assert!(ping.contains("2 received"), "{ping}");
    assert_eq!(net.wisp(&["destroy", "nvm"]).code, Some(0));

    let r = env.wisp(&["net-undefine", "lan"]);
    assert!(r.stderr.contains("is active"), "{r:?}");
    let r = env.wisp(&["net-destroy", "lan"]);
    assert!(r.stderr.contains("another network namespace"), "{r:?}");
    let r = net.wisp(&["net-destroy", "lan"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!ns.has_link("wbr0"));
    assert!(!ns.output("nft", &["list", "tables"]).contains("wisp-lan"));
    env.ok(&["net-undefine", "lan"]);
}

#[test]
fn test_start_of_a_guest_that_powers_off_at_once() {
    require_kvm!();
    let env = Env::new("manage-quick");
    env.define("quick", "tests=cmdline", "");
    let out = env.ok(&["start", "quick"]);
    assert!(out.contains("started"), "{out}");
    harness::wait_for_text(
        &env.console_log("quick"),
        "PASS cmdline",
        Duration::from_secs(30),
    );
    // It powered off by itself: shut off, and it can be started again.
    let end = Instant::now() + Duration::from_secs(30);
    while env.row("quick")["state"] != "shut off" {
        assert!(Instant::now() < end, "{}", env.row("quick"));
        std::thread::sleep(Duration::from_millis(50));
    }
    env.ok(&["start", "quick"]);
}
