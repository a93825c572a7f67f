// SPDX-License-Identifier: Apache-2.0
//! Server tests over a real Unix socket with a fake VMM thread.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::models::{InstanceInfo, InstanceState, MachineConfig};
use api::{json_response, ApiCall, ApiError, ApiFault, ApiRequest, ApiServer, Client, Connection};

fn sock(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("api.sock")
}

/// Answers requests until the server goes away.
fn fake_vmm(rx: Receiver<ApiCall>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut n = 0;
        for (req, resp) in rx {
            n += 1;
            let r = match req {
                ApiRequest::GetInstanceInfo => json_response(&InstanceInfo {
                    id: "test".into(),
                    state: InstanceState::NotStarted,
                    vmm_version: "0.1.0".into(),
                    app_name: "wisp".into(),
                }),
                ApiRequest::GetMachineConfig => json_response(&MachineConfig::default()),
                ApiRequest::Action(_) => Err(ApiFault::bad_request("the VM is not running")),
                _ => Ok(None),
            };
            resp.send(r);
        }
        n
    })
}

fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the server closes or we have a complete small response.
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn routes_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (handle, rx) = ApiServer::start(&path).unwrap();
    let vmm = fake_vmm(rx);
    let c = Client::new(&path);

    let (st, body) = c.get("/").unwrap();
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "Not started");

    let (st, body) = c.get("/machine-config").unwrap();
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<MachineConfig>(&body)
            .unwrap()
            .vcpu_count,
        1
    );

    let (st, body) = c
        .put("/boot-source", r#"{"kernel_image_path":"/k"}"#)
        .unwrap();
    assert_eq!((st, body.as_str()), (204, ""));

    let (st, body) = c.put("/boot-source", r#"{"kernel":"/k"}"#).unwrap();
    assert_eq!(st, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["fault_message"].as_str().unwrap().contains("kernel"));

    let (st, _) = c.put("/boot-source", "{not json").unwrap();
    assert_eq!(st, 400);
    // Unknown paths and methods: 400 with Firecracker's fault message.
    let (st, body) = c.get("/nope").unwrap();
    assert_eq!(st, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["fault_message"],
        "Invalid request method and/or path: GET nope."
    );
    let (st, _) = c.request("DELETE", "/actions", None).unwrap();
    assert_eq!(st, 400);

    // A VMM-side fault is passed through.
    let (st, body) = c.put("/actions", r#"{"action_type":"Stop"}"#).unwrap();
    assert_eq!(st, 400);
    assert!(body.contains("not running"));

    handle.shutdown();
    assert!(!path.exists(), "socket removed on shutdown");
    assert_eq!(vmm.join().unwrap(), 4);
}

#[test]
fn keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    let mut conn = Connection::open(&path, Some(Duration::from_secs(5))).unwrap();
    for _ in 0..5 {
        assert_eq!(conn.request("GET", "/", None).unwrap().0, 200);
        assert_eq!(
            conn.request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
                .unwrap()
                .0,
            204
        );
        // Errors keep the connection too.
        assert_eq!(conn.request("GET", "/bad", None).unwrap().0, 400);
    }
}

#[test]
fn many_concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (handle, rx) = ApiServer::start(&path).unwrap();
    let vmm = fake_vmm(rx);
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut conn = Connection::open(&path, Some(Duration::from_secs(10))).unwrap();
                for _ in 0..10 {
                    assert_eq!(conn.request("GET", "/", None).unwrap().0, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(handle);
    assert_eq!(vmm.join().unwrap(), 320);
}

#[test]
fn idle_clients_do_not_stall_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    let _silent = UnixStream::connect(&path).unwrap();
    let mut partial = UnixStream::connect(&path).unwrap();
    partial
        .write_all(b"PUT /actions HTTP/1.1\r\nContent-Le")
        .unwrap();
    let mut half_body = UnixStream::connect(&path).unwrap();
    half_body
        .write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"act")
        .unwrap();
    let t = Instant::now();
    let c = Client::new(&path).with_timeout(Some(Duration::from_secs(2)));
    for _ in 0..10 {
        assert_eq!(c.get("/").unwrap().0, 200);
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(handle.open_connections() >= 3);
}

#[test]
fn oversized_body_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    // Declares 1 GiB, sends a few bytes: must be answered at once.
    let t = Instant::now();
    let resp = raw(
        &path,
        b"PUT /drives/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{\"drive_id\":",
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("fault_message"));
    assert!(t.elapsed() < Duration::from_secs(3));

    // Chunked with no declared length: cut off at the limit.
    let mut req =
        b"PUT /actions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b' '; 8192];
    for _ in 0..9 {
        req.extend_from_slice(b"2000\r\n");
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(&path, &req);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");

    // Just under the limit is fine (and then rejected only as bad JSON).
    let body = vec![b' '; api::MAX_BODY_LEN - 2];
    let mut req = format!(
        "PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len() + 2
    )
    .into_bytes();
    req.extend_from_slice(&body);
    req.extend_from_slice(b"{}");
    let resp = raw(&path, &req);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[test]
fn malformed_http_gets_400() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"PUT /actions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let resp = raw(&path, bad);
        assert!(
            resp.starts_with("HTTP/1.1 4") || resp.starts_with("HTTP/1.1 5"),
            "{:?} -> {resp:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // Huge header block.
    let mut req = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 64 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may close before we finish writing.
    let _ = s.write_all(&req);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 4"), "{out}");
    // Still serving.
    assert_eq!(Client::new(&path).get("/").unwrap().0, 200);
}

#[test]
fn socket_mode_is_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, _rx) = ApiServer::start(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn stale_socket_replaced_live_socket_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let (handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    match ApiServer::start(&path) {
        Err(ApiError::InUse(p)) => assert_eq!(p, path),
        other => panic!("expected InUse, got {other:?}"),
    }
    // The first server still works.
    assert_eq!(Client::new(&path).get("/").unwrap().0, 200);
    drop(handle);

    let file = dir.path().join("regular");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        ApiServer::start(&file),
        Err(ApiError::NotASocket(_))
    ));
    assert!(file.exists());
}

#[test]
fn waker_called_and_vmm_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = count.clone();
    let (_handle, rx) = ApiServer::start_with_waker(
        &path,
        Some(Arc::new(move || {
            c2.fetch_add(1, Ordering::SeqCst);
        })),
    )
    .unwrap();
    let vmm = fake_vmm(rx);
    let c = Client::new(&path);
    assert_eq!(c.get("/").unwrap().0, 200);
    assert_eq!(c.get("/version").unwrap().0, 204);
    assert_eq!(c.get("/nope").unwrap().0, 400);
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // A VMM that drops the request without answering.
    let dir2 = tempfile::tempdir().unwrap();
    let path2 = sock(&dir2);
    let (_h2, rx2) = ApiServer::start(&path2).unwrap();
    let dropper = std::thread::spawn(move || {
        for (_req, resp) in rx2.iter().take(1) {
            drop(resp);
        }
    });
    assert_eq!(Client::new(&path2).get("/").unwrap().0, 500);
    dropper.join().unwrap();
    // Receiver gone: 503.
    assert_eq!(Client::new(&path2).get("/").unwrap().0, 503);
    drop(vmm);
}

#[test]
fn answers_fast_after_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let t = Instant::now();
    let (_handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    assert_eq!(Client::new(&path).get("/").unwrap().0, 200);
    // Generous bound for a loaded CI machine; the real figure is well under 1 ms.
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

fn closed_within(mut s: UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = Vec::new();
    // EOF (possibly after a 408) means the server dropped us.
    s.read_to_end(&mut buf).is_ok()
}

#[test]
fn timeouts_and_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, rx) = ApiServer::start_with_options(
        &path,
        api::ServerOptions {
            header_timeout: Duration::from_millis(200),
            body_timeout: Duration::from_millis(200),
            max_connections: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let _vmm = fake_vmm(rx);

    // Silent, idle-after-a-request and slow-body clients are all dropped.
    let silent = UnixStream::connect(&path).unwrap();
    let mut idle = Connection::open(&path, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(idle.request("GET", "/", None).unwrap().0, 200);
    let mut slow = UnixStream::connect(&path).unwrap();
    slow.write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    assert!(closed_within(silent, Duration::from_secs(3)));
    assert!(closed_within(slow, Duration::from_secs(3)));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        idle.request("GET", "/", None).is_err(),
        "idle keep-alive kept"
    );
}

#[test]
fn connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, rx) = ApiServer::start_with_options(
        &path,
        api::ServerOptions {
            max_connections: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let _vmm = fake_vmm(rx);
    // Past the limit, new connections are closed; once they go, service resumes.
    let hogs: Vec<_> = (0..4)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    assert!(Client::new(&path).get("/").is_err());
    drop(hogs);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Client::new(&path).get("/") {
            Ok((200, _)) => break,
            other => assert!(Instant::now() < deadline, "not served again: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
