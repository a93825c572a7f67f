// SPDX-License-Identifier: Apache-2.0
//! Compatibility with a third-party Firecracker client library, used unchanged:
//! `tests/sdk/test_sdk.py` has pyrecracker (PyPI, pinned in
//! `tests/sdk/requirements.txt`) start wisp as `firecracker`, configure the
//! test guest with 2 vCPUs and a drive, start, pause, resume and stop it,
//! while checking the state, the configuration and the guest's serial output.
//!
//! The library lives in a virtualenv under the target directory
//! (`target/sdk-venv`), created on first use with `python3 -m venv` and
//! `pip install -r tests/sdk/requirements.txt`; it is reinstalled when that
//! file changes. Without PyPI the test fails, saying so.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{guest, repo_root, wisp, TempDir};

/// The target directory (`target/`, or `CARGO_TARGET_DIR`): the parent of the
/// profile directory holding `wisp`.
fn target_dir() -> PathBuf {
    wisp()
        .parent()
        .and_then(Path::parent)
        .expect("wisp is in <target>/<profile>/")
        .to_path_buf()
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates or refreshes the virtualenv with the pinned library; returns its python.
fn sdk_venv() -> PathBuf {
    let venv = target_dir().join("sdk-venv");
    let python = venv.join("bin/python");
    let reqs = repo_root().join("tests/sdk/requirements.txt");
    let wanted = std::fs::read_to_string(&reqs).expect("read tests/sdk/requirements.txt");
    let stamp = venv.join("wisp-requirements.txt");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return python;
    }
    if !python.exists() {
        run_checked(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "creating the virtualenv (python3 -m venv; Debian needs python3-venv)",
        );
    }
    // pyrecracker says Requires-Python >=3.12 but runs on 3.11 (see
    // requirements.txt). No pip cache outside the repository.
    run_checked(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--ignore-requires-python",
                "-r",
            ])
            .arg(&reqs),
        "installing tests/sdk/requirements.txt from PyPI (is PyPI reachable?)",
    );
    std::fs::write(&stamp, wanted).expect("write the virtualenv's stamp");
    python
}

#[test]
fn test_pyrecracker_drives_wisp_unchanged() {
    require_kvm!();
    let python = sdk_venv();
    let dir = TempDir::new("sdk");
    let child = Command::new(&python)
        .arg(repo_root().join("tests/sdk/test_sdk.py"))
        .arg("--wisp")
        .arg(wisp())
        .arg("--guest")
        .arg(guest())
        .arg("--workdir")
        .arg(&dir.0)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tests/sdk/test_sdk.py");
    let r = harness::wait(child, Duration::from_secs(180));
    // Shown with --nocapture; on failure the assertion below prints it.
    println!("{}{}", r.stdout, r.stderr);
    assert_eq!(
        r.code,
        Some(0),
        "tests/sdk/test_sdk.py failed\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stdout.lines().any(|l| l == "sdk: all checks passed"),
        "test_sdk.py exited 0 without its closing line:\n{}",
        r.stdout
    );
}
