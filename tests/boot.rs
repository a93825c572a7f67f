// SPDX-License-Identifier: Apache-2.0
//! Boots the test guest with the real `wisp` binary: vCPU counts, memory sizes,
//! the command line, the e820 map, the MADT, AP start-up, power-off and reboot,
//! console destinations, and stopping by signal.

mod harness;

use std::time::Duration;

use harness::{guest, run, spawn, wait, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);

fn boot(cpus: u32, mem_mib: u64) -> harness::Run {
    let g = guest();
    let cmdline = format!("tests=cmdline,e820,madt,smp expect_cpus={cpus} expect_mem_mib={mem_mib} token=wisp-{cpus}-{mem_mib}");
    let r = run(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--cpus",
            &cpus.to_string(),
            "--memory",
            &format!("{mem_mib}M"),
            "--cmdline",
            &cmdline,
        ],
        TIMEOUT,
    );
    r.assert_no_panic();
    r.assert_code(0);
    for t in ["cmdline", "e820", "madt", "smp"] {
        r.assert_pass(t);
    }
    r.assert_summary(4);
    assert!(
        r.stdout
            .contains(&format!("wisp-guest: cmdline: {cmdline}")),
        "command line not echoed verbatim:\n{}",
        r.stdout
    );
    for ap in 1..cpus {
        assert!(
            r.stdout.contains(&format!("cpu {ap} apic_id {ap} online")),
            "AP {ap} did not report:\n{}",
            r.stdout
        );
    }
    assert!(r.stderr.contains("guest powered off"), "{}", r.stderr);
    r
}

#[test]
fn test_boot_1_vcpu_128m() {
    require_kvm!();
    boot(1, 128);
}

#[test]
fn test_boot_2_vcpus_128m() {
    require_kvm!();
    boot(2, 128);
}

#[test]
fn test_boot_4_vcpus_128m() {
    require_kvm!();
    boot(4, 128);
}

#[test]
fn test_boot_2_vcpus_4g_ram_above_hole() {
    require_kvm!();
    let r = boot(2, 4096);
    // RAM resumes at 4 GiB above the 32-bit MMIO hole.
    assert!(
        r.stdout
            .contains("[0x0000000100000000-0x000000013fffffff] type 1"),
        "{}",
        r.stdout
    );
}

#[test]
fn test_guest_reboot_request_ends_vm_with_success() {
    require_kvm!();
    let g = guest();
    let r = run(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--cmdline",
            "tests=cmdline exit=reboot",
        ],
        TIMEOUT,
    );
    r.assert_no_panic();
    r.assert_code(0);
    r.assert_pass("cmdline");
    assert!(r.stderr.contains("reboot"), "{}", r.stderr);
}

#[test]
fn test_serial_to_file_and_none() {
    require_kvm!();
    let g = guest();
    let dir = TempDir::new("serial");
    let log = dir.path("console.log");
    let spec = format!("file={}", log.display());
    let r = run(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--cmdline",
            "tests=cmdline",
            "--serial",
            &spec,
        ],
        TIMEOUT,
    );
    r.assert_code(0);
    assert!(!r.stdout.contains("PASS"), "console leaked to stdout");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("PASS cmdline"), "{text}");

    let r = run(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--cmdline",
            "tests=cmdline",
            "--serial",
            "none",
        ],
        TIMEOUT,
    );
    r.assert_code(0);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}

fn stop_with(sig: i32, name: &str) {
    let g = guest();
    let child = spawn(&[
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--cpus",
        "2",
        "--cmdline",
        "tests=cmdline exit=halt",
    ]);
    let pid = child.id() as i32;
    // Let it boot, then stop it.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling the child we spawned.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    let r = wait(child, Duration::from_secs(20));
    r.assert_no_panic();
    r.assert_code(128 + sig);
    r.assert_pass("cmdline");
    assert!(
        r.stderr.contains(&format!("stopped by {name}")),
        "{}",
        r.stderr
    );
}

#[test]
fn test_sigterm_stops_vm_cleanly() {
    require_kvm!();
    stop_with(libc::SIGTERM, "SIGTERM");
}

#[test]
fn test_sigint_stops_vm_cleanly() {
    require_kvm!();
    stop_with(libc::SIGINT, "SIGINT");
}

#[test]
fn test_terminal_settings_restored_after_run() {
    require_kvm!();
    // `script` gives wisp a pseudo-terminal as stdin; the settings printed by
    // `stty -g` before and after must match.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: util-linux 'script' is not installed");
        return;
    }
    let g = guest();
    let cmd = format!(
        "stty -g; {} run --kernel {} --cmdline 'tests=cmdline' >/dev/null 2>&1; echo rc=$?; stty -g",
        harness::wisp().display(),
        g.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "unexpected output: {text:?}");
    assert_eq!(lines[1], "rc=0", "{text:?}");
    assert_eq!(lines[0], lines[2], "terminal settings changed: {text:?}");
}
