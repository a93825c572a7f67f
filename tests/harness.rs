// SPDX-License-Identifier: Apache-2.0
//! Shared helpers for integration tests: build the test guest, run the real
//! `wisp` binary with a timeout, and read the guest's PASS/FAIL report.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// The `wisp` binary under test.
pub fn wisp() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wisp"))
}

/// Builds the test guest once (make -C resources/guest) and returns its path.
pub fn guest() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let dir = repo_root().join("resources/guest");
            let out = Command::new("make")
                .arg("-s")
                .arg("-C")
                .arg(&dir)
                .output()
                .expect("run make for the test guest");
            assert!(
                out.status.success(),
                "building the test guest failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let elf = dir.join("build/wisp-guest.elf");
            assert!(elf.exists(), "{} was not built", elf.display());
            elf
        })
        .clone()
}

/// Whether /dev/kvm is usable; tests that need it skip (saying so) otherwise.
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Skips the calling test with a reason when KVM is missing.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !harness::have_kvm() {
            eprintln!("SKIPPED: /dev/kvm is not available on this host");
            return;
        }
    };
}

/// What a finished `wisp` run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit status code (None if killed by a signal).
    pub code: Option<i32>,
    /// Guest serial output and VMM stdout.
    pub stdout: String,
    /// VMM diagnostics.
    pub stderr: String,
}

impl Run {
    /// Asserts the guest printed `PASS name`.
    pub fn assert_pass(&self, name: &str) {
        let line = format!("PASS {name}");
        assert!(
            self.stdout.lines().any(|l| l.trim_end() == line),
            "guest did not print '{line}'\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }

    /// Asserts the guest's summary line reports `passed` passes and no failure.
    pub fn assert_summary(&self, passed: usize) {
        let want = format!("wisp-guest: {passed} passed, 0 failed");
        assert!(
            self.stdout.lines().any(|l| l.trim_end() == want),
            "guest summary '{want}' missing\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stdout.contains("FAIL "),
            "guest reported a failure:\n{}",
            self.stdout
        );
    }

    /// Asserts wisp exited with `code`.
    pub fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }

    /// Asserts no Rust panic text appeared.
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "wisp panicked:\n{}",
            self.stderr
        );
    }
}

/// Makes `cmd`'s process die (SIGKILL) when the test thread that spawned it
/// ends, so a failed test never leaves a VMM running.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Spawns `wisp` with `args`, stdin closed, output captured.
pub fn spawn(args: &[&str]) -> Child {
    die_with_test(&mut Command::new(wisp()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wisp")
}

/// Waits for `child` up to `timeout`, killing it after; collects its output.
pub fn wait(mut child: Child, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for wisp") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let st = child.wait().expect("reap wisp");
            let out = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
            panic!("wisp did not finish within {timeout:?}; it was killed (status {st}). Output:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned(),
    }
}

/// Runs `wisp` with `args` to completion (at most `timeout`).
pub fn run(args: &[&str], timeout: Duration) -> Run {
    wait(spawn(args), timeout)
}

/// Collects an `Output` as a [`Run`].
pub fn from_output(o: Output) -> Run {
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/wisp-test-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "wisp-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Key of the test guest's read pattern on the first disk.
pub const PATTERN_DISK1: u64 = 0x7769_7370_0000_0000;
/// Key of the test guest's read pattern on the second disk.
pub const PATTERN_DISK2: u64 = 0x7365_636f_6e64_0000;
/// Key of what the guest's `blk_write` test writes.
pub const PATTERN_GUEST_WRITE: u64 = 0x6775_6573_7400_0000;

/// Writes a raw image of `size` bytes whose 8-byte word at offset `o` is `o ^ key`.
pub fn make_pattern_image(path: &Path, size: u64, key: u64) {
    let mut buf = Vec::with_capacity(size as usize);
    for o in (0..size).step_by(8) {
        buf.extend_from_slice(&(o ^ key).to_le_bytes());
    }
    std::fs::write(path, buf).expect("write pattern image");
}

/// Checks that `data` (read from disk offset `base`) holds the `key` pattern.
pub fn has_pattern(data: &[u8], base: u64, key: u64) -> bool {
    data.chunks(8)
        .enumerate()
        .all(|(i, w)| w == ((base + 8 * i as u64) ^ key).to_le_bytes())
}

/// Runs `wisp image ARGS`, asserting success.
pub fn image_tool(args: &[&str]) -> String {
    let out = Command::new(wisp())
        .arg("image")
        .args(args)
        .output()
        .expect("run wisp image");
    assert!(
        out.status.success(),
        "wisp image {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the host's KVM is PVM, where guest ring-0 code is emulated and an
/// unmodified Linux kernel cannot reach user space.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Whether qemu-system-x86_64 is on PATH (the nested real-Linux tier needs it).
pub fn have_qemu() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false)
}

/// The reason Linux guest tests give on PVM hosts.
pub const PVM_LINUX_SKIP: &str = "this host's KVM is PVM (kvm_pvm): guest ring-0 code is emulated and an unmodified Linux kernel is stopped at its int3 self-test (see tests/linux.rs), so a Linux guest cannot reach user space here";

/// Builds the Linux guest from Debian packages once; returns (bzImage, initramfs).
pub fn linux_guest() -> (PathBuf, PathBuf) {
    static LINUX: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    LINUX
        .get_or_init(|| {
            let script = repo_root().join("resources/linux/build.sh");
            let out = Command::new(&script)
                .output()
                .expect("run resources/linux/build.sh");
            assert!(
                out.status.success(),
                "building the Linux guest failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = repo_root().join("resources/linux/build");
            (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"))
        })
        .clone()
}

/// Sends one raw HTTP/1.1 request over a Unix socket; returns (status, body).
pub fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let req = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    };
    http_raw(sock, req.as_bytes())
}

/// Sends raw bytes over the API socket and parses the answer's status and body.
pub fn http_raw(sock: &Path, bytes: &[u8]) -> (u16, String) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).expect("send request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until the API socket answers `GET /`.
pub fn wait_for_api(sock: &Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("API socket {} never came up", sock.display());
}

/// Waits until `file` contains `needle` (up to `timeout`).
pub fn wait_for_text(file: &Path, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if start.elapsed() > timeout {
            panic!(
                "'{needle}' did not appear in {} within {timeout:?}:\n{text}",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace with a bridge `br0` and a host-side veth `vh`
/// (10.77.0.1/24) plugged into it; deleted (with everything in it) on drop.
pub struct NetNs {
    /// Namespace name.
    pub name: String,
}

impl NetNs {
    /// Creates the namespace and its bridge.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wisp-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ns = Self { name };
        let ip = |args: &str| {
            let st = Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .expect("run ip");
            assert!(st.success(), "ip {args} failed");
        };
        ip(&format!("netns add {}", ns.name));
        let n = &ns.name;
        ip(&format!("-n {n} link set lo up"));
        ip(&format!("-n {n} link add br0 type bridge"));
        ip(&format!("-n {n} link set br0 up"));
        ip(&format!("-n {n} link add vh type veth peer name vb"));
        ip(&format!("-n {n} link set vb master br0"));
        ip(&format!("-n {n} link set vb up"));
        ip(&format!("-n {n} addr add 10.77.0.1/24 dev vh"));
        ip(&format!("-n {n} link set vh up"));
        ns
    }

    /// A command run inside the namespace (killed when the test ends).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        die_with_test(&mut c);
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Spawns `wisp ARGS` inside the namespace, output captured.
    pub fn spawn_wisp(&self, args: &[&str]) -> Child {
        self.cmd(wisp().to_str().expect("utf-8 path"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wisp in namespace")
    }

    /// Output of `program ARGS` run inside the namespace.
    pub fn output(&self, program: &str, args: &[&str]) -> String {
        let o = self
            .cmd(program)
            .args(args)
            .output()
            .expect("run in namespace");
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    }

    /// Whether interface `name` exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Whether this process may create network namespaces and TAP devices.
pub fn have_net_admin() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/net/tun").exists()
}

/// Skips the calling test with a reason when TAP/namespace setup is impossible.
#[macro_export]
macro_rules! require_net {
    () => {
        if !harness::have_kvm() || !harness::have_net_admin() {
            eprintln!("SKIPPED: needs /dev/kvm, /dev/net/tun and root for network namespaces");
            return;
        }
    };
}

/// Reads a child's stdout line by line on a thread; `wait_line` waits for one.
pub struct LineReader {
    rx: std::sync::mpsc::Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

impl LineReader {
    /// Takes over `child`'s stdout.
    pub fn new(child: &mut Child) -> Self {
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "no line with '{needle}' within {timeout:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Collects what is left after the child exits.
    pub fn rest(&mut self) -> String {
        while let Ok(l) = self.rx.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }
}

/// The counter of a `tick N ok` line of the test guest; a snapshot or a
/// migration may split a line between two processes' logs, so only the tail
/// of the line is required.
pub fn tick_of(line: &str) -> Option<u64> {
    line.strip_suffix(" ok")?.rsplit(' ').next()?.parse().ok()
}

/// The unfinished last line of a console log (what follows its last newline).
pub fn partial_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.rsplit_once('\n')
        .map(|(_, tail)| tail.to_string())
        .unwrap_or(text)
}

/// Whether `text` (a new process's log) continues with tick `n`, once joined
/// to `prefix`, the old process's unfinished line (a pause can split a line,
/// even inside the number).
pub fn continues_with(prefix: &str, text: &str, n: u64) -> bool {
    format!("{prefix}{text}").lines().find_map(tick_of) == Some(n)
}

/// The last `tick N ok` counter in a console log (0 if none).
pub fn last_tick(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(tick_of)
        .unwrap_or(0)
}

/// Waits (up to 90 s) until a console log reaches tick `n`.
pub fn wait_tick(log: &Path, n: u64) {
    let start = Instant::now();
    while last_tick(log) < n {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "tick {n} never came in {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
