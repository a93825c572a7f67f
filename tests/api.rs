// SPDX-License-Identifier: Apache-2.0
//! The API socket of the real `wisp` binary, driven with plain HTTP/1.1 over the
//! Unix socket: configure and start the test guest, read its state, pause and
//! resume, stop; Firecracker's command line and config file; every bad request
//! answered with a 4xx and a fault message while the VMM stays usable.

mod harness;
mod perms;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use harness::{guest, http, http_raw, spawn, wait, wait_for_api, wait_for_text, TempDir};

fn fault_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["fault_message"].as_str().unwrap_or("").to_string()
}

fn state(sock: &Path) -> String {
    let (code, body) = http(sock, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["state"].as_str().unwrap().to_string()
}

fn configure(sock: &Path, cmdline: &str, cpus: u32) {
    let g = guest();
    let (c, b) = http(
        sock,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{cmdline}"}}"#,
            g.display()
        )),
    );
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(
        sock,
        "PUT",
        "/machine-config",
        Some(&format!(r#"{{"vcpu_count": {cpus}, "mem_size_mib": 128}}"#)),
    );
    assert_eq!(c, 204, "{b}");
}

#[test]
fn test_configure_start_state_and_stop_over_api() {
    require_kvm!();
    let dir = TempDir::new("api-life");
    let sock = dir.path("api.sock");
    let console = dir.path("console.log");
    let serial = format!("file={}", console.display());
    let child = spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial",
        &serial,
        "--id",
        "vm-42",
    ]);
    wait_for_api(&sock);
    // The socket is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let (c, body) = http(&sock, "GET", "/", None);
    assert_eq!(c, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], "vm-42");
    assert_eq!(v["state"], "Not started");

    // Starting without a boot source is refused and changes nothing.
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(c, 400);
    assert!(fault_of(&b).contains("boot source"), "{b}");

    configure(&sock, "tests=cmdline,smp expect_cpus=2 exit=halt", 2);
    let (c, b) = http(&sock, "GET", "/machine-config", None);
    assert_eq!(c, 200);
    assert!(b.contains(r#""vcpu_count":2"#), "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(c, 204, "{b}");
    wait_for_text(&console, "PASS smp", Duration::from_secs(60));
    assert_eq!(state(&sock), "Running");

    // Pre-boot-only resources are refused once running.
    let (c, b) = http(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/x"}"#),
    );
    assert_eq!(c, 400);
    assert!(fault_of(&b).contains("before the microVM starts"), "{b}");
    let (c, _) = http(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    assert_eq!(c, 400);
    // As Firecracker: PATCH /vm to the current state succeeds.
    let (c, b) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204, "{b}");
    assert_eq!(state(&sock), "Running");

    // Pause (twice), then resume (twice).
    let (c, b) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(c, 204, "{b}");
    assert_eq!(state(&sock), "Paused");
    let (c, b) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(c, 204, "{b}");
    assert_eq!(state(&sock), "Paused");
    let (c, _) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204);
    assert_eq!(state(&sock), "Running");
    let (c, _) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(c, 204);
    assert_eq!(state(&sock), "Running");

    let (c, b) = http(&sock, "GET", "/vm/config", None);
    assert_eq!(c, 200);
    let cfg: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert!(cfg["boot-source"]["kernel_image_path"]
        .as_str()
        .unwrap()
        .ends_with("wisp-guest.elf"));

    let (c, _) = http(&sock, "PUT", "/actions", Some(r#"{"action_type": "Stop"}"#));
    assert_eq!(c, 204);
    let r = wait(child, Duration::from_secs(20));
    r.assert_no_panic();
    r.assert_code(0);
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn test_bad_requests_get_4xx_and_vmm_stays_usable() {
    let dir = TempDir::new("api-bad");
    let sock = dir.path("api.sock");
    let child = spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for_api(&sock);

    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("GET", "/nope", None, 0, ""),
        ("DELETE", "/boot-source", None, 0, ""),
        ("PUT", "/boot-source", Some("not json"), 400, ""),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": 7}"#),
            400,
            "kernel_image_path",
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/k", "bogus": 1}"#),
            400,
            "bogus",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 0, "mem_size_mib": 128}"#),
            400,
            "vcpu_count",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#),
            400,
            "smt",
        ),
        (
            "PUT",
            "/drives/a",
            Some(
                r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false, "is_read_only": false}"#,
            ),
            400,
            "",
        ),
        ("PATCH", "/vm", Some(r#"{"state": "Sleeping"}"#), 400, ""),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state": "Paused"}"#),
            400,
            "not running",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
            400,
            "not running",
        ),
    ];
    for (m, p, b, want, needle) in cases {
        let (c, body) = http(&sock, m, p, *b);
        assert!(
            (400..500).contains(&c) && (*want == 0 || c == *want),
            "{m} {p}: status {c}, body {body}"
        );
        let f = fault_of(&body);
        assert!(!f.is_empty(), "{m} {p}: no fault_message in {body}");
        assert!(f.contains(needle), "{m} {p}: fault '{f}' lacks '{needle}'");
    }

    // Malformed HTTP.
    let (c, _) = http_raw(&sock, b"HELLO THERE\r\n\r\n");
    assert!((400..500).contains(&c), "malformed HTTP got {c}");
    // An oversized body is refused from its header, without being sent.
    let (c, _) = http_raw(
        &sock,
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n",
    );
    assert_eq!(c, 413);

    // Clients that connect and never send do not stall others.
    let silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut partial = UnixStream::connect(&sock).unwrap();
    partial
        .write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Le")
        .unwrap();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let s = sock.clone();
            std::thread::spawn(move || (0..5).all(|_| http(&s, "GET", "/", None).0 == 200))
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap(), "a concurrent client failed");
    }
    drop(silent);
    drop(partial);

    // Still usable.
    assert_eq!(state(&sock), "Not started");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait(child, Duration::from_secs(20));
    r.assert_no_panic();
    r.assert_code(128 + libc::SIGTERM);
}

#[test]
fn test_live_socket_is_refused_and_stale_one_replaced() {
    let dir = TempDir::new("api-sock");
    let sock = dir.path("api.sock");
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let first = spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for_api(&sock);
    assert_eq!(state(&sock), "Not started");
    // A live one is refused.
    let r = harness::run(
        &["run", "--api-sock", sock.to_str().unwrap()],
        Duration::from_secs(20),
    );
    r.assert_no_panic();
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(&sock.display().to_string()),
        "{}",
        r.stderr
    );
    assert_eq!(state(&sock), "Not started");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    wait(first, Duration::from_secs(20));
}

#[test]
fn test_firecracker_command_line_and_config_file() {
    require_kvm!();
    let dir = TempDir::new("api-fc");
    let g = guest();
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "tests=cmdline,smp expect_cpus=2"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 128}},
                "drives": [], "network-interfaces": [],
                "balloon": null, "vsock": null, "logger": null, "metrics": null,
                "mmds-config": null, "entropy": null, "cpu-config": null}}"#,
            g.display()
        ),
    )
    .unwrap();
    // Firecracker's flags with no subcommand: --no-api --config-file boots at once.
    let r = harness::run(
        &[
            "--no-api",
            "--config-file",
            cfg.to_str().unwrap(),
            "--id",
            "fc",
            "--level",
            "Info",
        ],
        Duration::from_secs(60),
    );
    r.assert_no_panic();
    r.assert_code(0);
    r.assert_pass("smp");

    // The same through a binary named `firecracker`.
    let fc = dir.path("firecracker");
    std::os::unix::fs::symlink(harness::wisp(), &fc).unwrap();
    let sock = dir.path("fc.sock");
    let child = harness::die_with_test(&mut std::process::Command::new(&fc))
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "fc-1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_api(&sock);
    let (c, b) = http(&sock, "GET", "/", None);
    assert_eq!(c, 200);
    assert!(b.contains(r#""id":"fc-1""#), "{b}");
    let (c, b) = http(&sock, "GET", "/version", None);
    assert_eq!(c, 200);
    assert!(b.contains("firecracker_version"), "{b}");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait(child, Duration::from_secs(20));

    // Flags wisp cannot honour are refused by name, with the reason.
    let r = harness::run(
        &["--api-sock", "/tmp/x.sock", "--boot-timer"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("--boot-timer") && r.stderr.contains("no boot-timer device"),
        "{}",
        r.stderr
    );
    let r = harness::run(
        &["--api-sock", "/tmp/x.sock", "--frobnicate"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(2));
    // --no-api needs a config file.
    let r = harness::run(&["--no-api"], Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    // A broken config file is a clear error.
    std::fs::write(&cfg, r#"{"boot-source": {"kernel_image_path": 1}}"#).unwrap();
    let r = harness::run(
        &["--no-api", "--config-file", cfg.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("Invalid config file"), "{}", r.stderr);
}

#[test]
fn test_logger_and_metrics() {
    require_kvm!();
    let dir = TempDir::new("api-metrics");
    let sock = dir.path("api.sock");
    let log = dir.path("wisp.log");
    let metrics = dir.path("metrics.json");
    let img = dir.path("disk.img");
    harness::make_pattern_image(&img, 1 << 20, harness::PATTERN_DISK1);
    let child = spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial",
        "none",
    ]);
    wait_for_api(&sock);
    let (c, _) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    // As Firecracker: nothing to flush is not an error.
    assert_eq!(c, 204, "flush before PUT /metrics is a no-op");
    let (c, b) = http(
        &sock,
        "PUT",
        "/logger",
        Some(&format!(
            r#"{{"log_path": "{}", "level": "Info", "show_level": true}}"#,
            log.display()
        )),
    );
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics.display())),
    );
    assert_eq!(c, 204, "{b}");
    configure(&sock, "tests=blk_read exit=halt", 1);
    let (c, b) = http(
        &sock,
        "PUT",
        "/drives/rootfs",
        Some(&format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            img.display()
        )),
    );
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(c, 204, "{b}");
    std::thread::sleep(Duration::from_millis(1500));
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(c, 204, "{b}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["vcpu"]["exits_io_out"].as_u64().unwrap() > 0, "{line}");
    assert!(
        line["api_server"]["requests"].as_u64().unwrap() >= 6,
        "{line}"
    );
    assert!(
        line["block"]["rootfs"]["read_bytes"].as_u64().unwrap() > 0,
        "{line}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("[INFO]") && logged.contains("microVM started: 1 vCPUs"),
        "{logged}"
    );
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait(child, Duration::from_secs(20));
}

fn start_guest_with_api(
    tag: &str,
    cmdline: &str,
) -> (TempDir, std::path::PathBuf, std::process::Child) {
    let dir = TempDir::new(tag);
    let sock = dir.path("api.sock");
    let g = guest();
    let child = spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--kernel",
        g.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ]);
    wait_for_api(&sock);
    (dir, sock, child)
}

#[test]
fn test_orderly_shutdown_through_acpi_power_button() {
    require_kvm!();
    let (_dir, sock, mut child) = start_guest_with_api("api-shutdown", "tests=acpi_power_button");
    let mut lines = harness::LineReader::new(&mut child);
    lines.wait_line("acpi_power_button: waiting", Duration::from_secs(60));
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Shutdown", "timeout_s": 30}"#),
    );
    assert_eq!(c, 204, "{b}");
    let st = child.wait().unwrap();
    let out = lines.rest();
    assert!(st.success(), "{out}");
    assert!(
        out.contains("acpi_power_button: interrupt, event register 0x1"),
        "{out}"
    );
    assert!(out.contains("PASS acpi_power_button"), "{out}");
}

#[test]
fn test_shutdown_deadline_stops_a_guest_that_ignores_it() {
    require_kvm!();
    let (_dir, sock, child) = start_guest_with_api("api-deadline", "tests=cmdline exit=halt");
    std::thread::sleep(Duration::from_millis(500));
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Shutdown", "timeout_s": 1}"#),
    );
    assert_eq!(c, 204, "{b}");
    let r = wait(child, Duration::from_secs(20));
    r.assert_no_panic();
    r.assert_code(1);
    assert!(
        r.stderr.contains("did not power off within 1 s"),
        "{}",
        r.stderr
    );
}

#[test]
fn test_send_ctrl_alt_del_reaches_guest_keyboard() {
    require_kvm!();
    let (_dir, sock, mut child) = start_guest_with_api("api-cad", "tests=ctrl_alt_del");
    let mut lines = harness::LineReader::new(&mut child);
    lines.wait_line("ctrl_alt_del: waiting", Duration::from_secs(60));
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(c, 204, "{b}");
    let st = child.wait().unwrap();
    let out = lines.rest();
    assert!(st.success(), "{out}");
    assert!(out.contains("PASS ctrl_alt_del"), "{out}");
}

/// Firecracker's answers where wisp used to differ (issue 17): unknown paths
/// and methods, an empty machine-config PATCH, a boot source that cannot be
/// opened, a logger without a path, FlushMetrics without metrics, and the
/// snapshot-load fields Firecracker's clients send.
#[test]
fn test_firecracker_conformance_before_boot() {
    let dir = TempDir::new("api-conf");
    let sock = dir.path("api.sock");
    let log = dir.path("wisp.log");
    let child = spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for_api(&sock);

    // Unknown path or method: 400 and Firecracker's fault message.
    let (c, b) = http(&sock, "GET", "/nope", None);
    assert_eq!(c, 400, "{b}");
    assert_eq!(
        fault_of(&b),
        "Invalid request method and/or path: GET nope."
    );
    let (c, b) = http(&sock, "DELETE", "/boot-source", None);
    assert_eq!(c, 400, "{b}");
    assert_eq!(
        fault_of(&b),
        "Invalid request method and/or path: DELETE boot-source."
    );
    let (c, b) = http(&sock, "GET", "/boot-source", None);
    assert_eq!(c, 400, "{b}");

    // An empty PATCH is refused.
    let (c, b) = http(&sock, "PATCH", "/machine-config", Some("{}"));
    assert_eq!(c, 400, "{b}");
    assert!(fault_of(&b).contains("Empty PATCH request"), "{b}");

    // A kernel or initrd that cannot be opened is refused at once.
    let missing = dir.path("no-such-kernel");
    let (c, b) = http(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}"}}"#,
            missing.display()
        )),
    );
    assert_eq!(c, 400, "{b}");
    assert!(fault_of(&b).contains("Cannot open the kernel image"), "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}"}}"#,
            guest().display(),
            missing.display()
        )),
    );
    assert_eq!(c, 400, "{b}");
    assert!(fault_of(&b).contains("Cannot open the initrd"), "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}"}}"#,
            dir.0.display()
        )),
    );
    assert_eq!(c, 400, "{b}");
    assert!(fault_of(&b).contains("not a regular file"), "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}"}}"#,
            guest().display()
        )),
    );
    assert_eq!(c, 204, "{b}");

    // The logger: every field optional; the log stays where it is.
    let (c, b) = http(&sock, "PUT", "/logger", Some("{}"));
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/logger",
        Some(r#"{"level": "Info", "show_level": true, "show_log_origin": false}"#),
    );
    assert_eq!(c, 204, "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/logger",
        Some(&format!(r#"{{"log_path": "{}"}}"#, log.display())),
    );
    assert_eq!(c, 204, "{b}");
    // The API server logs refused requests at Info (level kept from above).
    let (c, _) = http(&sock, "GET", "/first-unknown", None);
    assert_eq!(c, 400);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("/first-unknown"), "{logged}");
    // --module's filter: only vmm::runtime logs now, not api::server.
    let (c, b) = http(
        &sock,
        "PUT",
        "/logger",
        Some(r#"{"module": "vmm::runtime"}"#),
    );
    assert_eq!(c, 204, "{b}");
    let (c, _) = http(&sock, "GET", "/second-unknown", None);
    assert_eq!(c, 400);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("/second-unknown"), "{logged}");
    let (c, b) = http(&sock, "PUT", "/logger", Some(r#"{"module": ""}"#));
    assert_eq!(c, 400, "{b}");

    // FlushMetrics without a metrics file: nothing to flush.
    let (c, b) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(c, 204, "{b}");

    // Snapshot load: vsock_override only when null, clock_realtime only false.
    let snap = dir.path("s");
    let base = format!(
        r#""snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}.mem"}}"#,
        snap.display(),
        snap.display()
    );
    let (c, b) = http(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{{base}, "vsock_override": {{"uds_path": "/v"}}}}"#
        )),
    );
    assert_eq!(c, 400, "{b}");
    assert!(fault_of(&b).contains("no vsock"), "{b}");
    let (c, b) = http(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(r#"{{{base}, "clock_realtime": true}}"#)),
    );
    assert_eq!(c, 400, "{b}");
    assert!(fault_of(&b).contains("clock_realtime"), "{b}");
    // Accepted shape (the file does not exist, so the load itself fails).
    let (c, b) = http(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{{base}, "vsock_override": null, "clock_realtime": false, "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "tap1"}}]}}"#
        )),
    );
    assert_eq!(c, 400, "{b}");
    assert!(fault_of(&b).contains("Cannot load the snapshot"), "{b}");

    assert_eq!(state(&sock), "Not started");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait(child, Duration::from_secs(20));
    r.assert_no_panic();
}

#[test]
fn test_http_api_max_payload_size() {
    let dir = TempDir::new("api-payload");
    let sock = dir.path("api.sock");
    let child = spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--http-api-max-payload-size",
        "100",
    ]);
    wait_for_api(&sock);
    let body = format!(r#"{{"kernel_image_path": "/{}"}}"#, "k".repeat(100));
    let (c, b) = http(&sock, "PUT", "/boot-source", Some(&body));
    assert_eq!(c, 400, "{b}");
    assert_eq!(
        fault_of(&b),
        format!(
            "Request payload with size {} is larger than the limit of 100 allowed by server.",
            body.len()
        )
    );
    // A body within the limit is routed as usual.
    let (c, b) = http(
        &sock,
        "PATCH",
        "/machine-config",
        Some(r#"{"vcpu_count": 2}"#),
    );
    assert_eq!(c, 204, "{b}");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait(child, Duration::from_secs(20)).assert_no_panic();
}

/// firecracker-python's restore: `network_overrides` re-points the restored
/// NIC at another TAP; an unknown iface_id is refused before anything opens.
#[test]
fn test_snapshot_load_network_overrides() {
    require_net!();
    let dir = TempDir::new("api-netovr");
    let ns = harness::NetNs::new("netovr");
    let g = guest();
    let (sock, log) = (dir.path("a.sock"), dir.path("a.log"));
    let a = ns.spawn_wisp(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial",
        &format!("file={}", log.display()),
        "--kernel",
        g.to_str().unwrap(),
        "--net",
        "tap=wovr0,mac=52:54:00:77:00:0d,bridge=br0",
        "--cmdline",
        "tests=tick tick_ms=20 tick_net=1 ip=10.77.0.2",
    ]);
    wait_for_api(&sock);
    harness::wait_tick(&log, 5);
    let ping = ns.output("ping", &["-c", "2", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("2 received"), "before: {ping}");
    let (c, b) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(c, 204, "{b}");
    let (snap, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let (c, b) = http(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.display(),
            mem.display()
        )),
    );
    assert_eq!(c, 204, "{b}");
    let mut a = a;
    let _ = a.kill();
    let _ = a.wait();

    let (sock2, log2) = (dir.path("b.sock"), dir.path("b.log"));
    let mut second = ns.spawn_wisp(&[
        "run",
        "--api-sock",
        sock2.to_str().unwrap(),
        "--serial",
        &format!("file={}", log2.display()),
    ]);
    wait_for_api(&sock2);
    let load = |overrides: &str| {
        http(
            &sock2,
            "PUT",
            "/snapshot/load",
            Some(&format!(
                r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "network_overrides": {overrides}}}"#,
                snap.display(),
                mem.display()
            )),
        )
    };
    let (c, body) = load(r#"[{"iface_id": "eth9", "host_dev_name": "wovr1"}]"#);
    assert_eq!(c, 400, "{body}");
    let f = fault_of(&body);
    assert!(f.contains("eth9") && f.contains("net0"), "{f}");
    assert_eq!(state(&sock2), "Not started");
    assert!(!ns.has_link("wovr1"), "a refused load opened a TAP");

    let (c, body) = load(r#"[{"iface_id": "net0", "host_dev_name": "wovr1"}]"#);
    assert_eq!(c, 204, "{body}");
    assert_eq!(state(&sock2), "Running");
    let master = ns.output("ip", &["link", "show", "master", "br0"]);
    assert!(
        master.contains("wovr1") && !master.contains("wovr0"),
        "not re-pointed: {master}"
    );
    let ping = ns.output("ping", &["-c", "3", "-W", "5", "10.77.0.2"]);
    assert!(ping.contains("3 received"), "after restore: {ping}");
    let (c, b) = http(&sock2, "GET", "/vm/config", None);
    assert_eq!(c, 200);
    assert!(b.contains(r#""host_dev_name":"wovr1""#), "{b}");
    let _ = second.kill();
    let _ = second.wait();
}

/// A config file's logger and metrics sections are honoured, not ignored.
#[test]
fn test_config_file_logger_and_metrics_sections() {
    require_kvm!();
    let dir = TempDir::new("api-cfglog");
    let (cfg, log, metrics) = (
        dir.path("vm.json"),
        dir.path("vm.log"),
        dir.path("metrics.json"),
    );
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "tests=cmdline"}},
                "logger": {{"log_path": "{}", "level": "Info", "show_level": true}},
                "metrics": {{"metrics_path": "{}"}}}}"#,
            guest().display(),
            log.display(),
            metrics.display()
        ),
    )
    .unwrap();
    let r = harness::run(
        &["--no-api", "--config-file", cfg.to_str().unwrap()],
        Duration::from_secs(60),
    );
    r.assert_no_panic();
    r.assert_pass("cmdline");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("[INFO]") && logged.contains("microVM started"),
        "{logged}"
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["vcpu"]["exits_io_out"].as_u64().unwrap() > 0, "{line}");

    // Metrics given twice is refused before anything runs.
    let r = harness::run(
        &[
            "--no-api",
            "--config-file",
            cfg.to_str().unwrap(),
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("configured twice"), "{}", r.stderr);
}

#[test]
fn test_api_socket_is_never_reachable_by_others_even_under_umask_000() {
    if !perms::is_root() {
        eprintln!("SKIPPED: needs root to probe the socket as nobody");
        return;
    }
    let dir = TempDir::new("api-perms");
    let _control = perms::shared_dir(&dir);
    for i in 0..30 {
        let name = format!("api{i}.sock");
        let sock = dir.path(&name);
        let mut watch = perms::ModeWatch::new(&dir.0);
        // Spins connecting as nobody from before wisp starts.
        let prober = perms::fork_nobody_prober(&sock, Some(Duration::from_secs(20)));
        let mut child = perms::spawn_umask_000(&["run", "--api-sock", sock.to_str().unwrap()]);
        watch.until(&name);
        let probe = perms::reap(prober);
        wait_for_api(&sock);
        assert_eq!(http(&sock, "GET", "/", None).0, 200, "the owner is served");
        assert_eq!(perms::connect_as_nobody(&sock), libc::EACCES);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            probe,
            libc::EACCES,
            "start {i}: nobody reached the API socket"
        );
        assert!(watch.exposed().is_empty(), "start {i}: {:?}", watch.seen);
    }
}

/// The `Seccomp:` mode (0 none, 2 filter) of `pid`'s thread named `comm`.
fn thread_seccomp_mode(pid: u32, comm: &str) -> Option<u32> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?.path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if name.trim_end() == comm {
            let status = std::fs::read_to_string(t.join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .and_then(|v| v.trim().parse().ok());
        }
    }
    None
}

#[test]
fn test_api_thread_runs_under_its_seccomp_filter_unless_no_seccomp() {
    let dir = TempDir::new("api-seccomp");
    for (flag, want) in [(None, 2), (Some("--no-seccomp"), 0)] {
        let sock = dir.path("api.sock");
        let mut args = vec!["run", "--api-sock", sock.to_str().unwrap()];
        args.extend(flag);
        let mut child = spawn(&args);
        wait_for_api(&sock);
        // Answered (so the server thread runs), through every path of a
        // request, under the filter.
        assert_eq!(http(&sock, "GET", "/", None).0, 200);
        assert_eq!(http(&sock, "PUT", "/boot-source", Some("{bad")).0, 400);
        assert_eq!(
            thread_seccomp_mode(child.id(), "wisp-api"),
            Some(want),
            "{flag:?}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
