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
fn connection_limit_evicts_the_longest_idle_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (handle, rx) = ApiServer::start_with_options(
        &path,
        api::ServerOptions {
            max_connections: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let _vmm = fake_vmm(rx);
    // Four idle hogs fill the table; a new client is still served, and the
    // oldest hog is the one closed to make room.
    let hogs: Vec<_> = (0..4)
        .map(|_| {
            let s = UnixStream::connect(&path).unwrap();
            wait_open(&handle, 1);
            s
        })
        .collect();
    wait_open(&handle, 4);
    let c = Client::new(&path).with_timeout(Some(Duration::from_secs(5)));
    assert_eq!(c.get("/").unwrap().0, 200);
    assert!(closed_within(
        hogs[0].try_clone().unwrap(),
        Duration::from_secs(5)
    ));
    for h in &hogs[1..] {
        assert!(still_open(h), "a newer idle connection was closed");
    }
}

/// Waits (5 s at most) until the server has at least `n` connections.
fn wait_open(handle: &api::ApiServerHandle, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.open_connections() < n {
        assert!(
            Instant::now() < deadline,
            "{} open",
            handle.open_connections()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The server has neither closed `s` nor sent anything on it.
fn still_open(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let r = (&*s).read(&mut buf);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn test_256_idle_connections_do_not_lock_the_api_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    // Half silent, half stuck in the middle of a request head.
    let idle: Vec<_> = (0..256)
        .map(|i| {
            let mut s = UnixStream::connect(&path).unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .unwrap();
            }
            s
        })
        .collect();
    wait_open(&handle, 256);
    // The 5 s client timeout only guards against a hang.
    let c = Client::new(&path).with_timeout(Some(Duration::from_secs(5)));
    for _ in 0..5 {
        assert_eq!(c.get("/").unwrap().0, 200);
    }
    // Answered while every idle connection is still open.
    for (i, s) in idle.iter().enumerate() {
        assert!(still_open(s), "idle connection {i} was closed");
    }
}

#[test]
fn test_reconnecting_client_cannot_lock_the_api_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, rx) = ApiServer::start_with_options(
        &path,
        api::ServerOptions {
            max_connections: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let _vmm = fake_vmm(rx);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let storm = {
        let (path, stop, opened) = (path.clone(), stop.clone(), opened.clone());
        std::thread::spawn(move || {
            // Keeps 64 idle connections, replacing the oldest every 1 ms.
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = UnixStream::connect(&path) {
                    held.push_back(s);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                if held.len() > 64 {
                    held.pop_front();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // The storm has filled the table (32) and is evicting its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while opened.load(Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "the storm does not get going");
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = Client::new(&path).with_timeout(Some(Duration::from_secs(5)));
    for i in 0..20 {
        // A request can lose a race with the storm only if its client stalls
        // between connecting and sending for 32 of the storm's connections.
        let answered = (0..3).any(|_| matches!(c.get("/"), Ok((200, _))));
        assert!(answered, "request {i} not answered in 3 attempts");
    }
    stop.store(true, Ordering::Relaxed);
    storm.join().unwrap();
}

#[test]
fn test_requests_in_flight_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (handle, rx) = ApiServer::start_with_options(
        &path,
        api::ServerOptions {
            max_connections: 2,
            ..Default::default()
        },
    )
    .unwrap();
    // A VMM that holds the first two requests until told to answer.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (arrived_tx, arrived_rx) = std::sync::mpsc::channel::<()>();
    let vmm = std::thread::spawn(move || {
        let held: Vec<_> = rx.iter().take(2).collect();
        arrived_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        for (_, resp) in held {
            resp.send(Ok(None));
        }
        for (_, resp) in rx {
            resp.send(Ok(None));
        }
    });
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let c = Client::new(&path).with_timeout(Some(Duration::from_secs(10)));
                c.put("/actions", r#"{"action_type":"FlushMetrics"}"#)
                    .map(|r| r.0)
            })
        })
        .collect();
    arrived_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // Both slots are busy: the newcomer is refused, nobody is evicted.
    let r = Client::new(&path)
        .with_timeout(Some(Duration::from_secs(5)))
        .get("/");
    assert!(r.is_err(), "third connection served: {r:?}");
    assert_eq!(handle.open_connections(), 2);
    go_tx.send(()).unwrap();
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), 204);
    }
    drop(handle);
    vmm.join().unwrap();
}

#[test]
fn test_half_closed_client_still_gets_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (_handle, rx) = ApiServer::start(&path).unwrap();
    let _vmm = fake_vmm(rx);
    let mut outs = Vec::new();
    for req in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n{\"action_type\":\"FlushMetrics\"}",
    ] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        outs.push(out);
    }
    // The fake VMM answers GET / and refuses actions (no VM running).
    assert!(outs[0].starts_with("HTTP/1.1 200"), "{:?}", outs[0]);
    assert!(outs[1].starts_with("HTTP/1.1 400"), "{:?}", outs[1]);
    assert!(outs[1].contains("not running"), "{:?}", outs[1]);
}

#[test]
fn test_sandbox_runs_on_the_server_thread_before_serving_and_its_failure_stops_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let ran_on = Arc::new(std::sync::Mutex::new(None));
    let r2 = ran_on.clone();
    let (_handle, rx) = ApiServer::start_with_options(
        &path,
        api::ServerOptions {
            sandbox: Some(Arc::new(move || {
                *r2.lock().unwrap() = std::thread::current().name().map(String::from);
                Ok(())
            })),
            ..Default::default()
        },
    )
    .unwrap();
    // It has run by the time start returns.
    assert_eq!(ran_on.lock().unwrap().as_deref(), Some("wisp-api"));
    let _vmm = fake_vmm(rx);
    assert_eq!(Client::new(&path).get("/").unwrap().0, 200);

    let path2 = dir.path().join("refused.sock");
    let e = ApiServer::start_with_options(
        &path2,
        api::ServerOptions {
            sandbox: Some(Arc::new(|| Err("no seccomp here".into()))),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, ApiError::Sandbox(m) if m.contains("no seccomp here")),
        "{e}"
    );
    assert!(
        !path2.exists(),
        "the socket of a server that never served is removed"
    );
}
