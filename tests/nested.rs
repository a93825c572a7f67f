// SPDX-License-Identifier: Apache-2.0
//! The real-Linux tier: the unmodified Debian cloud kernel (L2) booted by the
//! real `wisp` binary, with real Linux drivers for every device.
//!
//! On a host whose KVM is not VMX/SVM (PVM here), wisp runs inside an L1
//! Linux under QEMU's TCG with an emulated AMD CPU (SVM with nested paging),
//! where the L1 kernel's kvm-amd gives it an ordinary hardware-virtualisation
//! KVM. On a VMX/SVM host the same checks run directly, in a private network
//! namespace. `WISP_NESTED=l1|direct|off` overrides the choice.
//!
//! The checks themselves are shell scripts (`resources/nested/job/checks/`)
//! run in one L1 boot, so the tier costs one L1 start; each reports
//! `NESTED-CHECK name PASS|FAIL|SKIP detail`, passing only on what the guest
//! itself printed after verifying (its `WISP-LINUX-*` markers) together with
//! what the host verified. Each `#[test]` below asserts one check; they share
//! the one run.

mod harness;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use harness::{have_kvm, host_is_pvm, repo_root, wisp};

/// Every check the job runs, in order (scripts under job/checks/).
const CHECK_SCRIPTS: &[&str] = &[
    "boot",
    "serial",
    "disk",
    "lifecycle",
    "net",
    "snapshot",
    "migration",
];

/// The hard limit for the whole L1 run (the scripts limit each check).
const L1_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Kernel-log lines that the nested set-up itself causes, not wisp: QEMU's
/// emulated SVM never intercepts XSETBV (so L2's XSAVE leaves look
/// inconsistent), and TCG's TSC is unstable. Matched as substrings; a
/// `cut here` ... `end trace` block is allowed as a whole when it contains
/// an allowed warning.
const NESTED_ARTEFACTS: &[&str] = &[
    "XSAVE consistency problem",
    "Marking clocksource 'tsc' as unstable because the skew is too large",
    "tsc: Marking TSC unstable due to clocksource watchdog",
];

/// Words that make a kernel-log line suspect.
const SUSPECT: &[&str] = &[
    "WARNING",
    "BUG",
    "Oops",
    "Call Trace",
    "error",
    "Error",
    "ERROR",
    "failed",
    "Failed",
    "FAIL",
    "Unknown symbol",
    "timed out",
    "hung",
    "panic",
];

/// Lines with a suspect word that are normal on every boot of this kernel
/// under any VMM (no hardware present that it probes for).
const BENIGN: &[&str] = &[
    "WISP-LINUX-",
    "Kernel command line:",
    "Command line:",
    "Run /init as init process",
    "panic=1",
    "ima: Error Communicating to TPM chip",
    "ACPI BIOS Error",
    "PCI: Fatal: No config space access function found",
    "RAS: Correctable Errors collector initialized",
    "device-mapper: core: CONFIG_IMA_DISABLE_HTABLE is disabled",
    "failed to load regulatory.db",
    "EDAC",
];

/// What one L1 run reported.
struct NestedRun {
    /// Check name -> (verdict, detail).
    checks: BTreeMap<String, (String, String)>,
    /// L2 console (and wisp stderr) logs by file name.
    logs: BTreeMap<String, String>,
    /// The whole L1 console, kept on disk for post-mortems.
    console: PathBuf,
    /// How the checks ran.
    mode: &'static str,
}

enum Outcome {
    Ran(NestedRun),
    Skipped(String),
    Broken(String),
}

fn outcome() -> &'static Outcome {
    static RUN: OnceLock<Outcome> = OnceLock::new();
    RUN.get_or_init(|| match run_tier() {
        Ok(o) => o,
        Err(e) => Outcome::Broken(e),
    })
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn run_tier() -> Result<Outcome, String> {
    let forced = std::env::var("WISP_NESTED").unwrap_or_default();
    let direct_possible = have_kvm() && !host_is_pvm();
    let mode = match forced.as_str() {
        "off" => return Ok(Outcome::Skipped("WISP_NESTED=off".into())),
        "direct" if !direct_possible => {
            return Err("WISP_NESTED=direct needs a VMX/SVM /dev/kvm".into())
        }
        "direct" => "direct",
        "l1" | "" if !direct_possible || forced == "l1" => "l1",
        "" => "direct",
        other => return Err(format!("WISP_NESTED={other}: expected l1, direct or off")),
    };
    if mode == "l1" && !which("qemu-system-x86_64") {
        return Ok(Outcome::Skipped(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86), and this host's KVM is not VMX/SVM".into(),
        ));
    }
    if !nix_is_root() {
        return Ok(Outcome::Skipped("the real-Linux tier needs root".into()));
    }
    let build = Command::new(repo_root().join("resources/nested/build.sh"))
        .output()
        .map_err(|e| format!("run resources/nested/build.sh: {e}"))?;
    if !build.status.success() {
        return Err(format!(
            "resources/nested/build.sh failed:\n{}{}",
            String::from_utf8_lossy(&build.stdout),
            String::from_utf8_lossy(&build.stderr)
        ));
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nested");
    let _ = std::fs::remove_dir_all(&dir);
    let job = dir.join("root/job");
    make_job(&job)?;
    let console = dir.join("console.log");
    let text = match mode {
        "l1" => run_l1(&dir, &console)?,
        _ => run_direct(&dir, &job, &console)?,
    };
    Ok(Outcome::Ran(parse(&text, console, mode)))
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn sh(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Lays out /job: wisp (stripped), the L2 guest, the check scripts and an
/// ext4 image made on this host.
fn make_job(job: &Path) -> Result<(), String> {
    let res = repo_root().join("resources");
    let mk = |p: &Path| std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()));
    mk(&job.join("l2"))?;
    mk(&job.join("images"))?;
    mk(&job.join("checks"))?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
    };
    if which("strip") {
        sh(
            Command::new("strip")
                .arg("-o")
                .arg(job.join("wisp"))
                .arg(wisp()),
            "strip wisp",
        )?;
    } else {
        copy(&wisp(), &job.join("wisp"))?;
    }
    for f in ["vmlinuz", "vmlinux", "initramfs.cpio.gz"] {
        copy(&res.join("linux/build").join(f), &job.join("l2").join(f))?;
    }
    for f in ["lib.sh", "run.sh"] {
        copy(&res.join("nested/job").join(f), &job.join(f))?;
    }
    for c in CHECK_SCRIPTS {
        let name = format!("{c}.sh");
        copy(
            &res.join("nested/job/checks").join(&name),
            &job.join("checks").join(&name),
        )?;
    }
    // WISP_NESTED_CHECKS=disk,net runs only those scripts (the other
    // checks then fail as not reported).
    let only = std::env::var("WISP_NESTED_CHECKS").unwrap_or_default();
    let list: Vec<&str> = CHECK_SCRIPTS
        .iter()
        .copied()
        .filter(|c| only.is_empty() || only.split(',').any(|o| o == *c))
        .collect();
    std::fs::write(job.join("checks.list"), list.join("\n") + "\n")
        .map_err(|e| format!("checks.list: {e}"))?;
    // An empty 128 MiB ext4 file system, shipped as qcow2 (small); the disk
    // check makes its raw twin with `wisp image convert`.
    let raw = job.join("images/ext4.raw");
    sh(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-E", "nodiscard"])
            .arg(&raw)
            .arg("128M"),
        "mke2fs",
    )?;
    sh(
        Command::new(wisp())
            .args(["image", "convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(job.join("images/ext4.qcow2")),
        "wisp image convert ext4.raw",
    )?;
    std::fs::remove_file(&raw).map_err(|e| format!("{}: {e}", raw.display()))
}

/// The shared libraries `ldd` names for wisp, to ship with it (none when it
/// is static).
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(bin).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect()
}

/// Boots L1 under QEMU TCG with the base initramfs plus /job appended, and
/// returns its console.
fn run_l1(dir: &Path, console: &Path) -> Result<String, String> {
    let root = dir.join("root");
    for lib in libraries(&wisp()) {
        let to = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        std::fs::copy(&lib, &to).map_err(|e| format!("copy {}: {e}", lib.display()))?;
    }
    let initrd = dir.join("l1.cpio");
    let base = repo_root().join("resources/nested/build/l1-initramfs.cpio");
    std::fs::copy(&base, &initrd).map_err(|e| format!("{}: {e}", base.display()))?;
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(&initrd)
        .map_err(|e| format!("{}: {e}", initrd.display()))?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet")
        .current_dir(&root)
        .stdout(out)
        .status()
        .map_err(|e| format!("cpio: {e}"))?;
    if !status.success() {
        return Err(format!("cpio of {} failed", root.display()));
    }
    let kernel = repo_root().join("resources/linux/build/vmlinuz");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "7G",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .args(["-monitor", "none", "-no-reboot", "-kernel"])
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 panic=-1 loglevel=4"]);
    drive_console(qemu, console)
}

/// Runs the job directly on a VMX/SVM host, in a private network namespace,
/// with busybox's applets first on PATH.
fn run_direct(dir: &Path, job: &Path, console: &Path) -> Result<String, String> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    let busybox = repo_root().join("resources/linux/build/busybox");
    sh(
        Command::new(&busybox).arg("--install").arg("-s").arg(&bin),
        "busybox --install",
    )?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec sh \"$JOB/run.sh\"",
    ])
    .env("JOB", job)
    .env("WORK", dir.join("work"))
    .env("PATH", path);
    drive_console(cmd, console)
}

/// Runs the child with its console on a pipe: logs every line to `console`,
/// types the serial-input line when asked, and kills it at L1_TIMEOUT.
fn drive_console(mut cmd: Command, console: &Path) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {cmd:?}: {e}"))?;
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let errs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let text = Arc::new(Mutex::new(String::new()));
    let mut log =
        std::fs::File::create(console).map_err(|e| format!("{}: {e}", console.display()))?;
    let start = Instant::now();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        while start.elapsed() < L1_TIMEOUT {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: kill with signal 0 only probes whether the pid exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return false;
            }
        }
        // SAFETY: the pid is our own child, which has not been reaped yet
        // (the main thread reaps it only after its stdout closes).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        true
    });
    for line in BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).into_owned();
        let _ = writeln!(log, "{line}");
        if line.starts_with("NESTED-BEGIN") || line.starts_with("NESTED-CHECK") {
            eprintln!("[{:>6.1}s] {line}", start.elapsed().as_secs_f64());
        }
        if line.contains("NESTED-TYPE-NOW") {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(b"wisp-serial-input\r");
                let _ = s.flush();
            }
        }
        let mut t = text.lock().unwrap_or_else(|p| p.into_inner());
        t.push_str(&line);
        t.push('\n');
    }
    drop(stdin);
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    let killed = watchdog.join().unwrap_or(false);
    let errs = errs.join().unwrap_or_default();
    let text = std::mem::take(&mut *text.lock().unwrap_or_else(|p| p.into_inner()));
    if killed {
        return Err(format!(
            "the run took longer than {L1_TIMEOUT:?} and was killed; console in {}",
            console.display()
        ));
    }
    if !text.contains("NESTED-L1-END")
        && !text.contains("NESTED-LOG-")
        && !text.contains("NESTED-END")
    {
        return Err(format!(
            "the run ended ({status}) without running the job:\n{}\n{errs}",
            tail(&text, 60)
        ));
    }
    Ok(text)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn parse(text: &str, console: PathBuf, mode: &'static str) -> NestedRun {
    let mut checks = BTreeMap::new();
    let mut logs = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some((name, body)) = current.as_mut() {
            if line == format!("NESTED-LOG-END {name}") {
                if let Some((n, b)) = current.take() {
                    logs.insert(n, b);
                }
            } else {
                body.push_str(line);
                body.push('\n');
            }
            continue;
        }
        if let Some(name) = line.strip_prefix("NESTED-LOG-BEGIN ") {
            current = Some((name.to_string(), String::new()));
        } else if let Some(rest) = line.strip_prefix("NESTED-CHECK ") {
            let mut w = rest.splitn(3, ' ');
            let name = w.next().unwrap_or_default().to_string();
            let verdict = w.next().unwrap_or_default().to_string();
            let detail = w.next().unwrap_or_default().to_string();
            checks.insert(name, (verdict, detail));
        }
    }
    NestedRun {
        checks,
        logs,
        console,
        mode,
    }
}

impl NestedRun {
    fn logs_for(&self, check: &str) -> String {
        let group = check.split('-').next().unwrap_or(check);
        self.logs
            .iter()
            .filter(|(n, _)| n.starts_with(group))
            .map(|(n, b)| format!("--- {n} ---\n{}", tail(b, 80)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn assert_pass(&self, check: &str) {
        match self.checks.get(check) {
            None => panic!(
                "check {check} did not report ({} mode); console {}:\n{}",
                self.mode,
                self.console.display(),
                self.logs_for(check)
            ),
            Some((v, d)) if v == "PASS" => eprintln!("{check}: PASS ({}): {d}", self.mode),
            Some((v, d)) if v == "SKIP" => eprintln!("SKIPPED: {check}: {d}"),
            Some((v, d)) => panic!(
                "check {check}: {v}: {d}\nconsole {}\n{}",
                self.console.display(),
                self.logs_for(check)
            ),
        }
    }
}

fn check(name: &str) {
    match outcome() {
        Outcome::Skipped(why) => eprintln!("SKIPPED: real-Linux tier: {why}"),
        Outcome::Broken(e) => panic!("the real-Linux tier could not run: {e}"),
        Outcome::Ran(run) => run.assert_pass(name),
    }
}

macro_rules! nested_checks {
    ($($f:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $f() { check($name) })*
    };
}

nested_checks! {
    test_linux_boot_bzimage_1cpu_128m => "boot-bzimage-1cpu-128m",
    test_linux_boot_elf_2cpu_1g => "boot-elf-2cpu-1g",
    test_linux_boot_bzimage_4cpu_4g_high_memory => "boot-bzimage-4cpu-4g",
    test_linux_serial_input => "serial-input",
    test_linux_disk_ext4_raw => "disk-ext4-raw",
    test_linux_disk_ext4_qcow2 => "disk-ext4-qcow2",
    test_linux_disk_qcow2_check_clean => "disk-qcow2-check",
    test_linux_disk_read_only => "disk-readonly",
    test_linux_disk_flush => "disk-flush",
    test_linux_disk_backing_chain => "disk-backing",
    test_linux_disk_discard_raw => "disk-discard-raw",
    test_linux_disk_discard_qcow2 => "disk-discard-qcow2",
    test_linux_disk_qcow2_check_after_trim => "disk-qcow2-check-after-trim",
    test_linux_ctrl_alt_del => "lifecycle-ctrl-alt-del",
    test_linux_acpi_power_button => "lifecycle-power-button",
    test_linux_guest_reboot => "lifecycle-reboot",
    test_linux_guest_poweroff => "lifecycle-poweroff",
    test_linux_net_ping_out => "net-ping-out",
    test_linux_net_ping_in => "net-ping-in",
    test_linux_net_bulk_guest_to_host => "net-bulk-guest-to-host",
    test_linux_net_bulk_host_to_guest => "net-bulk-host-to-guest",
    test_linux_net_exit => "net-exit",
    test_linux_snapshot_full_keeps_disk_and_network => "snapshot-full",
    test_linux_snapshot_diff_keeps_disk_and_network => "snapshot-diff",
    test_linux_migration_unix => "migration-unix",
    test_linux_migration_tcp => "migration-tcp",
}

/// Lines of one kernel log that point at a problem, less the nested
/// artefacts (a whole `cut here` block when it is one of them) and lines
/// that every boot of this kernel prints.
fn suspect_lines(log: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    let mut in_block = false;
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if line.contains("------------[ cut here ]------------") {
            in_block = true;
            block.clear();
        }
        if in_block {
            block.push(line);
            if line.contains("---[ end trace") {
                in_block = false;
                if !block
                    .iter()
                    .any(|l| NESTED_ARTEFACTS.iter().any(|a| l.contains(a)))
                {
                    bad.extend(block.iter().map(|l| l.to_string()));
                }
                block.clear();
            }
            continue;
        }
        if NESTED_ARTEFACTS.iter().any(|a| line.contains(a))
            || BENIGN.iter().any(|b| line.contains(b))
        {
            continue;
        }
        if SUSPECT.iter().any(|s| line.contains(s)) {
            bad.push(line.to_string());
        }
    }
    bad.extend(block.iter().map(|l| l.to_string()));
    bad
}

#[test]
fn test_linux_kernel_logs_show_nothing_caused_by_wisp() {
    let run = match outcome() {
        Outcome::Skipped(why) => return eprintln!("SKIPPED: real-Linux tier: {why}"),
        Outcome::Broken(e) => panic!("the real-Linux tier could not run: {e}"),
        Outcome::Ran(run) => run,
    };
    // Every L2 console; restored and migrated guests continue a log that
    // started elsewhere, so only the booted ones carry the banner.
    let consoles: Vec<_> = run
        .logs
        .iter()
        .filter(|(n, _)| n.ends_with(".log"))
        .collect();
    let booted = consoles
        .iter()
        .filter(|(_, b)| b.contains("Linux version "))
        .count();
    assert!(booted >= 10, "too few L2 boot logs: {:?}", run.logs.keys());
    let mut report = String::new();
    for (name, body) in consoles {
        for l in suspect_lines(body) {
            report.push_str(&format!("{name}: {l}\n"));
        }
    }
    assert!(
        report.is_empty(),
        "kernel log lines not explained by the nested set-up:\n{report}"
    );
}

#[test]
fn test_suspect_lines_filters_only_the_listed_artefacts() {
    let log = "ok line\n------------[ cut here ]------------\nXSAVE consistency problem, dumping leaves\nWARNING: CPU: 0 at xstate.c\nCall Trace:\n---[ end trace 0 ]---\nvirtio_net: probe failed\n------------[ cut here ]------------\nXSAVE consistency problem\n---[ end trace 2 ]---\nclocksource: timekeeping watchdog on CPU1: Marking clocksource 'tsc' as unstable because the skew is too large:\n------------[ cut here ]------------\nWARNING: CPU: 1 at drivers/x.c\n---[ end trace 1 ]---\n------------[ cut here ]------------\nXSAVE consistency problem\n---[ end trace 3 ]---\n------------[ cut here ]------------\nWARNING: unfinished\n";
    let bad = suspect_lines(log);
    assert_eq!(
        bad,
        vec![
            "virtio_net: probe failed",
            "------------[ cut here ]------------",
            "WARNING: CPU: 1 at drivers/x.c",
            "---[ end trace 1 ]---",
            "------------[ cut here ]------------",
            "WARNING: unfinished",
        ]
    );
}
