// SPDX-License-Identifier: Apache-2.0
//! Migration transports: a listener and a byte stream over Unix or TCP
//! sockets, with timeouts on accept, connect, reads and writes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::uri::MigrationUri;

/// Pause between connection attempts while the peer is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket call failed.
    #[error("Cannot {what} {uri}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The endpoint.
        uri: String,
        /// The OS error.
        source: io::Error,
    },
    /// The Unix socket path is in use by a live listener.
    #[error("Migration socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// The Unix socket path exists and is not a socket.
    #[error("Migration socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// No connection arrived in time.
    #[error("No migration connection on {uri} within {timeout:?}")]
    AcceptTimeout {
        /// The endpoint.
        uri: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The peer did not accept a connection in time.
    #[error("Cannot connect to {uri} within {timeout:?}: {source}")]
    ConnectTimeout {
        /// The endpoint.
        uri: String,
        /// How long we tried.
        timeout: Duration,
        /// The last error seen.
        source: io::Error,
    },
    /// A TCP host name resolved to no address.
    #[error("Host of {0} resolves to no address")]
    NoAddress(String),
}

type Result<T> = std::result::Result<T, TransportError>;

fn io_err(what: &'static str, uri: &MigrationUri) -> impl FnOnce(io::Error) -> TransportError {
    let uri = uri.to_string();
    move |source| TransportError::Io { what, uri, source }
}

/// A connected migration byte stream.
#[derive(Debug)]
pub enum Stream {
    /// Over a Unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// A connected pair of Unix streams (for tests and in-process use).
    pub fn pair() -> io::Result<(Stream, Stream)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Stream::Unix(a), Stream::Unix(b)))
    }

    /// Sets the read timeout (`None` blocks forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the write timeout (`None` blocks forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// A second handle to the same socket (e.g. to shut it down from another
    /// thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A stream whose timeouts can be changed: what the sender needs to bound
/// its waits for the receiver.
pub trait Connection: Read + Write {
    /// Sets the read timeout (`None` blocks forever).
    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()>;
    /// Sets the write timeout (`None` blocks forever).
    fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()>;
}

impl Connection for Stream {
    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        Stream::set_read_timeout(self, t)
    }

    fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        Stream::set_write_timeout(self, t)
    }
}

/// A listening migration endpoint. A Unix listener removes its socket file
/// when dropped.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket listener and its path.
    Unix(UnixListener, PathBuf),
    /// A TCP listener.
    Tcp(TcpListener),
}

/// Starts listening on `uri`. A Unix socket is only reachable by its owner
/// (mode 0600, never wider even for an instant). A stale Unix socket file
/// (nobody accepting) is replaced; a live one, or a path that is not a
/// socket, is refused.
pub fn listen(uri: &MigrationUri) -> Result<Listener> {
    match uri {
        MigrationUri::Unix(path) => {
            remove_stale_socket(path)?;
            // Mode 0600 from its first instant: a peer on this host must be
            // the socket's owner (see `api::socket` for how, without umask).
            let l = api::socket::bind_owner_only(path).map_err(io_err("listen on", uri))?;
            Ok(Listener::Unix(l, path.clone()))
        }
        MigrationUri::Tcp { host, port } => {
            let l = TcpListener::bind((host.as_str(), *port)).map_err(io_err("listen on", uri))?;
            Ok(Listener::Tcp(l))
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TransportError::Io {
                what: "inspect",
                uri: path.display().to_string(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(TransportError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(TransportError::SocketInUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| TransportError::Io {
                what: "remove stale socket",
                uri: path.display().to_string(),
                source,
            }),
        Err(source) => Err(TransportError::Io {
            what: "probe existing socket",
            uri: path.display().to_string(),
            source,
        }),
    }
}

impl Listener {
    /// The address actually bound (with the kernel's port for `tcp:…:0`).
    pub fn local_uri(&self) -> io::Result<MigrationUri> {
        match self {
            Listener::Unix(_, p) => Ok(MigrationUri::Unix(p.clone())),
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(MigrationUri::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn uri_string(&self) -> String {
        self.local_uri()
            .map(|u| u.to_string())
            .unwrap_or_else(|_| "listener".into())
    }

    /// Waits for one connection, at most `timeout` if given.
    pub fn accept(&self, timeout: Option<Duration>) -> Result<Stream> {
        if let Some(timeout) = timeout {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                let mut pfd = libc::pollfd {
                    fd: self.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `pfd` is a valid pollfd for the duration of the
                // call and the count is 1.
                let r = unsafe { libc::poll(&mut pfd, 1, ms) };
                if r > 0 {
                    break;
                }
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(TransportError::Io {
                        what: "wait for a connection on",
                        uri: self.uri_string(),
                        source: e,
                    });
                }
                if left.is_zero() || Instant::now() >= deadline {
                    return Err(TransportError::AcceptTimeout {
                        uri: self.uri_string(),
                        timeout,
                    });
                }
            }
        }
        let stream = match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        stream.map_err(|source| TransportError::Io {
            what: "accept on",
            uri: self.uri_string(),
            source,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connects to `uri`, retrying while nobody listens yet, for at most
/// `timeout`.
pub fn connect(uri: &MigrationUri, timeout: Duration) -> Result<Stream> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = match uri {
            MigrationUri::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            MigrationUri::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(io_err("resolve", uri))?
                    .collect();
                let Some(addr) = addrs.first() else {
                    return Err(TransportError::NoAddress(uri.to_string()));
                };
                let per_try = left.max(Duration::from_millis(1));
                TcpStream::connect_timeout(addr, per_try).map(|s| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                })
            }
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if retryable(&e) && Instant::now() + CONNECT_RETRY < deadline => {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) if retryable(&source) || source.kind() == io::ErrorKind::TimedOut => {
                return Err(TransportError::ConnectTimeout {
                    uri: uri.to_string(),
                    timeout,
                    source,
                })
            }
            Err(e) => return Err(io_err("connect to", uri)(e)),
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(listener: Listener) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut s = listener.accept(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        })
    }

    fn round_trip(uri: &MigrationUri) {
        let mut s = connect(uri, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        s.shutdown(Shutdown::Both).unwrap();
    }

    #[test]
    fn test_transport_unix_round_trip_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let uri = MigrationUri::Unix(path.clone());
        let l = listen(&uri).unwrap();
        assert_eq!(l.local_uri().unwrap(), uri);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let t = echo(l);
        round_trip(&uri);
        t.join().unwrap();
        assert!(!path.exists(), "listener drop removes the socket file");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left behind"
        );
    }

    #[test]
    fn test_transport_tcp_port_zero_reports_bound_port() {
        let l = listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let uri = l.local_uri().unwrap();
        assert!(matches!(&uri, MigrationUri::Tcp { port, .. } if *port != 0));
        let t = echo(l);
        round_trip(&uri);
        t.join().unwrap();
    }

    #[test]
    fn test_transport_unix_stale_socket_replaced_live_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        // A stale socket: bound, then the listener is gone (no accept).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let uri = MigrationUri::Unix(path.clone());
        let live = listen(&uri).unwrap();
        let e = listen(&uri).unwrap_err();
        assert!(matches!(e, TransportError::SocketInUse(_)), "{e}");
        drop(live);
        // A regular file is never deleted.
        std::fs::write(&path, b"data").unwrap();
        let e = listen(&uri).unwrap_err();
        assert!(matches!(e, TransportError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn test_transport_accept_times_out() {
        let l = listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let t0 = Instant::now();
        let e = l.accept(Some(Duration::from_millis(100))).unwrap_err();
        assert!(matches!(e, TransportError::AcceptTimeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn test_transport_connect_nobody_listening_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrationUri::Unix(dir.path().join("absent.sock"));
        let t0 = Instant::now();
        let e = connect(&uri, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, TransportError::ConnectTimeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn test_transport_connect_waits_for_late_listener() {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrationUri::Unix(dir.path().join("late.sock"));
        let u2 = uri.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let l = listen(&u2).unwrap();
            let _s = l.accept(Some(Duration::from_secs(5))).unwrap();
        });
        connect(&uri, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }
}
