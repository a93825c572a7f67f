// SPDX-License-Identifier: Apache-2.0
//! Bad command lines and bad inputs: each gets a clear one-line error, a
//! non-zero exit status and no panic, before any guest runs.

mod harness;

use std::time::Duration;

use harness::{guest, run, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);

fn expect_error(args: &[&str], needle: &str) {
    let r = run(args, TIMEOUT);
    r.assert_no_panic();
    assert!(
        r.code.is_some_and(|c| c != 0),
        "expected failure for {args:?}, got {:?}\n{}",
        r.code,
        r.stderr
    );
    assert!(
        r.stderr.contains(needle),
        "stderr for {args:?} lacks '{needle}':\n{}",
        r.stderr
    );
    assert!(
        r.stdout.is_empty(),
        "guest output for {args:?}: {}",
        r.stdout
    );
}

#[test]
fn test_missing_kernel() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "Cannot read kernel /nonexistent/vmlinux",
    );
}

#[test]
fn test_kernel_is_directory() {
    let d = TempDir::new("kdir");
    expect_error(
        &["run", "--kernel", d.0.to_str().unwrap()],
        "is a directory",
    );
}

#[test]
fn test_kernel_unreadable() {
    let d = TempDir::new("kperm");
    let k = d.path("vmlinux");
    std::fs::write(&k, b"x").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o000)).unwrap();
    // root ignores file modes; only check when the open really fails.
    if std::fs::File::open(&k).is_ok() {
        eprintln!("SKIPPED: running as root, file modes do not deny reads");
        return;
    }
    expect_error(
        &["run", "--kernel", k.to_str().unwrap()],
        "Permission denied",
    );
}

#[test]
fn test_not_a_kernel() {
    let d = TempDir::new("notk");
    let k = d.path("notakernel");
    std::fs::write(&k, vec![0x41u8; 8192]).unwrap();
    expect_error(
        &["run", "--kernel", k.to_str().unwrap()],
        "is not a kernel wisp can boot",
    );
}

#[test]
fn test_zero_vcpus() {
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--cpus", "0"],
        "Invalid vCPU count 0",
    );
}

#[test]
fn test_too_many_vcpus() {
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--cpus", "5000"],
        "Invalid vCPU count 5000",
    );
}

#[test]
fn test_vcpu_limit_is_the_apis() {
    // Firecracker's (and wisp's API's) limit is 32, and so is the command line's.
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--cpus", "33"],
        "Invalid vCPU count 33: at most 32",
    );
}

#[test]
fn test_memory_too_small() {
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--memory", "1M"],
        "at least 16 MiB",
    );
}

#[test]
fn test_memory_larger_than_host() {
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--memory", "64T"],
        "larger than this host's RAM",
    );
}

#[test]
fn test_bad_memory_size() {
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--memory", "12Q"],
        "Invalid size '12Q'",
    );
}

#[test]
fn test_unknown_flag() {
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--frobnicate"],
        "unexpected argument '--frobnicate'",
    );
}

#[test]
fn test_unknown_subcommand() {
    expect_error(&["fly"], "unrecognized subcommand 'fly'");
}

#[test]
fn test_missing_initrd() {
    let g = guest();
    expect_error(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "Cannot read initrd /nonexistent/initrd",
    );
}

#[test]
fn test_initrd_does_not_fit() {
    let g = guest();
    let d = TempDir::new("bigrd");
    let rd = d.path("initrd");
    let f = std::fs::File::create(&rd).unwrap();
    f.set_len(64 << 20).unwrap();
    expect_error(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--memory",
            "32M",
            "--initrd",
            rd.to_str().unwrap(),
        ],
        "does not fit in guest memory",
    );
}

#[test]
fn test_cmdline_too_long() {
    let g = guest();
    let long = "x".repeat(5000);
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--cmdline", &long],
        "Invalid kernel command line",
    );
}

#[test]
fn test_bad_serial() {
    let g = guest();
    expect_error(
        &["run", "--kernel", g.to_str().unwrap(), "--serial", "tcp:1"],
        "Invalid serial 'tcp:1'",
    );
}

#[test]
fn test_bad_disk_option() {
    let g = guest();
    expect_error(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--disk",
            "readonly=on",
        ],
        "path=IMG is required",
    );
}

#[test]
fn test_firecracker_flags_wisp_cannot_honour() {
    for (flag, why) in [
        (
            &["--enable-pci"][..],
            "wisp has no PCI transport yet; virtio-mmio only",
        ),
        (&["--boot-timer"][..], "no boot-timer device"),
        (&["--mmds-size-limit", "4096"][..], "no MMDS"),
        (&["--seccomp-filter", "/f.bpf"][..], "no seccomp filter"),
    ] {
        let mut args = vec!["--api-sock", "/nonexistent/dir/x.sock"];
        args.extend_from_slice(flag);
        let r = run(&args, TIMEOUT);
        r.assert_no_panic();
        // A refusal (1), not a command-line syntax error (2).
        assert_eq!(r.code, Some(1), "{flag:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(flag[0]) && r.stderr.contains(why),
            "{flag:?}: {}",
            r.stderr
        );
    }
    expect_error(
        &["--api-sock", "/x.sock", "--http-api-max-payload-size", "0"],
        "--http-api-max-payload-size",
    );
    expect_error(&["--api-sock", "/x.sock", "--module", ""], "--module");
}

#[test]
fn test_snapshot_version_flags() {
    let r = run(&["--snapshot-version"], TIMEOUT);
    r.assert_no_panic();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "v2");

    let dir = TempDir::new("describe-snap");
    let f = dir.path("state");
    let mut head = b"WISPSNAP".to_vec();
    head.extend_from_slice(&2u32.to_le_bytes());
    head.extend_from_slice(&[0u8; 20]);
    std::fs::write(&f, &head).unwrap();
    let r = run(&["--describe-snapshot", f.to_str().unwrap()], TIMEOUT);
    r.assert_no_panic();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "v2");

    std::fs::write(&f, b"not a snapshot at all").unwrap();
    expect_error(
        &["--describe-snapshot", f.to_str().unwrap()],
        "does not start with wisp's magic",
    );
    let missing = dir.path("missing");
    expect_error(
        &["--describe-snapshot", missing.to_str().unwrap()],
        "Unable to read snapshot state file",
    );
    expect_error(
        &["--describe-snapshot", dir.0.to_str().unwrap()],
        "not a regular file",
    );
}

#[test]
fn test_config_file_sections_wisp_cannot_honour() {
    let dir = TempDir::new("cfg-sections");
    let cfg = dir.path("vm.json");
    let g = guest();
    for (section, value) in [
        ("balloon", r#"{"amount_mib": 0, "deflate_on_oom": false}"#),
        ("vsock", r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#),
        ("entropy", "{}"),
        ("mmds-config", r#"{"network_interfaces": ["eth0"]}"#),
    ] {
        std::fs::write(
            &cfg,
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "{section}": {value}}}"#,
                g.display()
            ),
        )
        .unwrap();
        expect_error(
            &["--no-api", "--config-file", cfg.to_str().unwrap()],
            &format!("the {section} section is not supported by wisp"),
        );
    }
}
