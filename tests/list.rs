// SPDX-License-Identifier: Apache-2.0
//! `wisp list`: VMMs register in a runtime directory, are listed with their
//! state, leave no entry after a clean exit, and are pruned after being
//! killed (a VM that is not defined has nothing to show as crashed).
//! `wisp run --name` puts the API socket in that directory.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{guest, http, spawn, wait, wait_for_api, TempDir};

fn list_json(dir: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(harness::wisp())
        .args(["list", "--json", "--runtime-dir", dir.to_str().unwrap()])
        .env("WISP_STATE_DIR", dir.join("no-state"))
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn test_list_named_vms_stale_and_cleanup() {
    require_kvm!();
    let dir = TempDir::new("list");
    let rt = dir.path("run");
    let g = guest();
    let start = |name: &str| {
        spawn(&[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "64M",
            "--cmdline",
            "tests=cmdline exit=halt",
            "--name",
            name,
            "--runtime-dir",
            rt.to_str().unwrap(),
        ])
    };
    let a = start("alpha");
    let b = start("beta");
    let sock_a = rt.join("alpha.sock");
    wait_for_api(&sock_a);
    wait_for_api(&rt.join("beta.sock"));
    // The name is taken while alpha runs.
    let r = harness::run(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--name",
            "alpha",
            "--runtime-dir",
            rt.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("already running"), "{}", r.stderr);

    // Paused state shows in the list.
    let (c, _) = http(&sock_a, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(c, 204);
    let vms = list_json(&rt);
    assert_eq!(vms.len(), 2, "{vms:?}");
    assert_eq!(vms[0]["name"], "alpha");
    assert_eq!(vms[0]["state"], "paused");
    assert_eq!(vms[0]["pid"], a.id());
    assert_eq!(vms[0]["vcpus"], 2);
    assert_eq!(vms[0]["mem_mib"], 64);
    assert_eq!(vms[0]["alive"], true);
    assert_eq!(vms[1]["name"], "beta");
    assert_eq!(vms[1]["state"], "running");
    assert_eq!(vms[1]["defined"], false);

    // Human output names both.
    let out = Command::new(harness::wisp())
        .args(["list", "--runtime-dir", rt.to_str().unwrap()])
        .env("WISP_STATE_DIR", rt.join("no-state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("alpha") && text.contains("beta") && text.contains("paused"),
        "{text}"
    );

    // Killed without cleanup: the stale entry (and its socket) is pruned.
    // SAFETY: signalling children we spawned.
    unsafe { libc::kill(b.id() as i32, libc::SIGKILL) };
    wait(b, Duration::from_secs(20));
    assert!(rt.join("beta.json").exists());
    let vms = list_json(&rt);
    assert!(vms.iter().all(|v| v["name"] != "beta"), "{vms:?}");
    assert!(!rt.join("beta.json").exists() && !rt.join("beta.sock").exists());

    // Clean exit removes the entry and the socket.
    // SAFETY: as above.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    wait(a, Duration::from_secs(20));
    let vms = list_json(&rt);
    assert!(vms.iter().all(|v| v["name"] != "alpha"), "{vms:?}");
    assert!(!sock_a.exists());
}

#[test]
fn test_bad_name_refused() {
    let g = guest();
    let r = harness::run(
        &["run", "--kernel", g.to_str().unwrap(), "--name", "../evil"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("Invalid VM name"), "{}", r.stderr);
}
