// SPDX-License-Identifier: Apache-2.0
//! The HTTP/1.1 server on a Unix socket.
//!
//! It runs on one thread of its own with a single-threaded tokio runtime and
//! hyper, so every connection is a cheap task: clients that connect and never
//! send do not stall the others, and are dropped after [`HEADER_TIMEOUT`].
//! At most [`MAX_CONNECTIONS`] are open; past that a new connection closes
//! the longest-idle one (see `connections.rs`), so idle or slow clients can
//! never lock the API out.
//! Each routed request is handed to the VMM through an `mpsc` channel with a
//! [`ResponseSender`]; the server task waits (asynchronously) for the answer.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;

use crate::models::ApiFault;
use crate::request::{ApiRequest, ApiResponse};
use crate::routes::{route, MAX_BODY_LEN};

mod connections;
use connections::{Admission, Connections, Tracker};

/// How long a connection may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once; a new one past this evicts the longest-idle
/// one (one with no request at the VMM). Well under the usual 1024-descriptor
/// limit, which the VM's own descriptors share.
pub const MAX_CONNECTIONS: usize = 512;
/// Read buffer limit per connection (bounds the request head).
const MAX_BUF: usize = 16 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process is listening on the socket path.
    #[error("API socket {0} is in use: another process is listening on it")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The stale socket could not be removed.
    #[error("cannot remove stale API socket {path}")]
    RemoveStale {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// bind/listen failed.
    #[error("cannot bind API socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The thread or its runtime could not be created.
    #[error("cannot start the API thread")]
    Thread(#[source] io::Error),
    /// The sandbox hook failed on the server thread.
    #[error("cannot sandbox the API thread: {0}")]
    Sandbox(String),
}

/// Gives the VMM's answer back to the waiting HTTP connection.
#[derive(Debug)]
pub struct ResponseSender(oneshot::Sender<ApiResponse>);

impl ResponseSender {
    /// Sends the answer; if the client has gone, it is dropped silently.
    pub fn send(self, response: ApiResponse) {
        // The receiver is gone only if the connection was closed: nothing to do.
        let _ = self.0.send(response);
    }
}

/// One request for the VMM and where its answer goes.
pub type ApiCall = (ApiRequest, ResponseSender);

/// Called after each request is queued, e.g. to write an eventfd the VMM polls.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Tunables of the server; [`Default`] gives the documented constants.
#[derive(Clone)]
pub struct ServerOptions {
    /// Called after each request is queued for the VMM.
    pub waker: Option<Waker>,
    /// Time allowed to send a request's head (also bounds idle keep-alive).
    pub header_timeout: Duration,
    /// Time allowed to send a request's body.
    pub body_timeout: Duration,
    /// Connections open at once; past it the longest-idle one is closed.
    pub max_connections: usize,
    /// Run on the server thread once its runtime and listener are set up and
    /// before any client is served, e.g. to install a seccomp filter. An
    /// error stops the server: [`ApiServer::start_with_options`] fails.
    pub sandbox: Option<Sandbox>,
}

/// See [`ServerOptions::sandbox`].
pub type Sandbox = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            waker: None,
            header_timeout: HEADER_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            sandbox: None,
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("waker", &self.waker.is_some())
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("max_connections", &self.max_connections)
            .field("sandbox", &self.sandbox.is_some())
            .finish()
    }
}

/// Owns the server thread; dropping it stops the server and removes the socket.
#[derive(Debug)]
pub struct ApiServerHandle {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    open_connections: Arc<AtomicUsize>,
}

impl ApiServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Stops serving, waits for the thread and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may already have exited; then there is nothing to stop.
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("API server thread panicked");
            }
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove API socket {}: {e}", self.path.display());
                }
            }
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The API server.
pub struct ApiServer;

impl ApiServer {
    /// Binds `path` (mode 0600) and serves it on a new thread. Requests arrive
    /// on the returned receiver.
    pub fn start(path: impl AsRef<Path>) -> Result<(ApiServerHandle, Receiver<ApiCall>), ApiError> {
        Self::start_with_options(path, ServerOptions::default())
    }

    /// Like [`ApiServer::start`], calling `waker` after each request is queued.
    pub fn start_with_waker(
        path: impl AsRef<Path>,
        waker: Option<Waker>,
    ) -> Result<(ApiServerHandle, Receiver<ApiCall>), ApiError> {
        Self::start_with_options(
            path,
            ServerOptions {
                waker,
                ..ServerOptions::default()
            },
        )
    }

    /// Like [`ApiServer::start`], with every tunable.
    pub fn start_with_options(
        path: impl AsRef<Path>,
        options: ServerOptions,
    ) -> Result<(ApiServerHandle, Receiver<ApiCall>), ApiError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind(&path)?;
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let open2 = open.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("wisp-api".into())
            .spawn(move || serve_thread(listener, tx, options, stop_rx, open2, ready_tx))
            .map_err(ApiError::Thread)?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(ApiError::Sandbox("the API thread ended".into())));
        if let Err(e) = ready {
            // The thread has returned (or is about to): nothing to serve.
            let _ = thread.join();
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok((
            ApiServerHandle {
                path,
                stop: Some(stop_tx),
                thread: Some(thread),
                open_connections: open,
            },
            rx,
        ))
    }
}

/// Binds the socket, replacing a stale one and refusing a live one.
fn bind(path: &Path) -> Result<StdUnixListener, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        if StdUnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    // Mode 0600 from the first instant, without touching the umask.
    let listener = crate::socket::bind_owner_only(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

fn serve_thread(
    listener: StdUnixListener,
    tx: Sender<ApiCall>,
    options: ServerOptions,
    stop: oneshot::Receiver<()>,
    open: Arc<AtomicUsize>,
    ready: Sender<Result<(), ApiError>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(ApiError::Thread(e)));
            return;
        }
    };
    let listener = {
        let _guard = rt.enter();
        match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(ApiError::Thread(e)));
                return;
            }
        }
    };
    if let Some(sandbox) = &options.sandbox {
        if let Err(e) = sandbox() {
            let _ = ready.send(Err(ApiError::Sandbox(e)));
            return;
        }
    }
    // The starter may have gone (it waits for this): then serve anyway.
    let _ = ready.send(Ok(()));
    rt.block_on(async move {
        tokio::select! {
            _ = stop => {}
            _ = accept_loop(listener, tx, options, open) => {}
        }
    });
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    tx: Sender<ApiCall>,
    options: ServerOptions,
    open: Arc<AtomicUsize>,
) {
    let table = Connections::new(options.max_connections);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("API server: accept failed: {e}");
                // Typically EMFILE: free a descriptor held by an idle client
                // if there is one, and back off instead of spinning.
                table.evict_one();
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (tracker, evicted) = match table.admit() {
            Admission::Admitted(t, rx) => (t, rx),
            Admission::Full => {
                log::warn!(
                    "API server: every connection has a request in flight, closing a new one"
                );
                drop(stream);
                continue;
            }
        };
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve_connection(
            stream,
            tx.clone(),
            options.clone(),
            tracker,
            evicted,
            open.clone(),
        ));
    }
}

/// Frees the connection's slot and count however its task ends.
struct ConnectionGuard {
    tracker: Tracker,
    open: Arc<AtomicUsize>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tracker.release();
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection until it ends, times out or is evicted.
async fn serve_connection(
    stream: tokio::net::UnixStream,
    tx: Sender<ApiCall>,
    options: ServerOptions,
    tracker: Tracker,
    evicted: oneshot::Receiver<()>,
    open: Arc<AtomicUsize>,
) {
    let _guard = ConnectionGuard {
        tracker: tracker.clone(),
        open,
    };
    let waker = options.waker.clone();
    let body_timeout = options.body_timeout;
    let service = hyper::service::service_fn(move |req| {
        handle(
            req,
            tx.clone(),
            waker.clone(),
            body_timeout,
            tracker.clone(),
        )
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_buf_size(MAX_BUF)
        // A client may shut down its write side after its request and
        // still wait for the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                log::debug!("API connection ended: {e}");
            }
        }
        // Only idle connections are evicted: dropping `conn` closes the
        // socket without losing an answer.
        _ = evicted => log::debug!("API connection evicted"),
    }
}

type Resp = Response<Full<Bytes>>;

fn fault_response(fault: &ApiFault, close: bool) -> Resp {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(Full::new(Bytes::from(fault.body())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if close {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn to_http(response: ApiResponse) -> Resp {
    match response {
        Ok(None) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(Some(v)) => {
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(f) => fault_response(&f, false),
    }
}

async fn handle(
    req: Request<Incoming>,
    tx: Sender<ApiCall>,
    waker: Option<Waker>,
    body_timeout: Duration,
    tracker: Tracker,
) -> Result<Resp, Infallible> {
    tracker.active();
    let too_large = || {
        ApiFault::new(
            413,
            format!("request body is larger than {MAX_BODY_LEN} bytes"),
        )
    };
    // Refuse a declared oversized body before reading any of it.
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        let len = len.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok());
        match len {
            Some(n) if n > MAX_BODY_LEN as u64 => return Ok(fault_response(&too_large(), true)),
            Some(_) => {}
            None => {
                return Ok(fault_response(
                    &ApiFault::bad_request("invalid Content-Length"),
                    true,
                ))
            }
        }
    }
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let body = Limited::new(req.into_body(), MAX_BODY_LEN);
    let body = match tokio::time::timeout(body_timeout, body.collect()).await {
        Err(_) => {
            return Ok(fault_response(
                &ApiFault::new(408, "timed out reading the request body"),
                true,
            ))
        }
        Ok(Err(e)) => {
            let f = if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiFault::bad_request(format!("cannot read the request body: {e}"))
            };
            return Ok(fault_response(&f, true));
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let request = match route(&method, &path, &body) {
        Ok(r) => r,
        Err(f) => {
            log::info!(
                "API {method} {path} refused ({}): {}",
                f.status,
                f.fault_message
            );
            return Ok(fault_response(&f, false));
        }
    };
    log::debug!("API {method} {path}");
    tracker.busy();
    let answer = ask_vmm(request, &tx, waker.as_ref()).await;
    tracker.idle();
    Ok(answer)
}

/// Hands `request` to the VMM and waits for its answer.
async fn ask_vmm(request: ApiRequest, tx: &Sender<ApiCall>, waker: Option<&Waker>) -> Resp {
    let (rtx, rrx) = oneshot::channel();
    if tx.send((request, ResponseSender(rtx))).is_err() {
        return fault_response(
            &ApiFault::new(503, "the VMM is not accepting requests"),
            false,
        );
    }
    if let Some(w) = waker {
        w();
    }
    match rrx.await {
        Ok(r) => to_http(r),
        Err(_) => fault_response(
            &ApiFault::internal("the VMM dropped the request without answering"),
            false,
        ),
    }
}
