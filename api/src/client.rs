// SPDX-License-Identifier: Apache-2.0
//! A minimal blocking HTTP/1.1 client over a Unix socket, for `wisp ctl` and tests.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest response body read.
pub const MAX_RESPONSE_LEN: usize = 16 * 1024 * 1024;
/// Longest response head line.
const MAX_LINE: usize = 8 * 1024;

/// Why a request failed (not an HTTP error status: those are returned).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("cannot connect to {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// I/O failed mid-request.
    #[error("I/O error talking to the API")]
    Io(#[from] io::Error),
    /// The server's answer is not valid HTTP.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// A keep-alive connection to the API socket.
#[derive(Debug)]
pub struct Connection {
    reader: BufReader<UnixStream>,
}

impl Connection {
    /// Connects, with a read/write timeout if given.
    pub fn open(path: impl AsRef<Path>, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        Ok(Connection {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request and reads its response: `(status, body)`.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), ClientError> {
        let body = body.unwrap_or("");
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if !body.is_empty() || method != "GET" {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        stream.flush()?;
        self.read_response()
    }

    fn read_line(&mut self) -> Result<String, ClientError> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err(ClientError::Malformed("connection closed".into()));
        }
        if line.last() != Some(&b'\n') {
            return Err(ClientError::Malformed("header line too long".into()));
        }
        let s =
            String::from_utf8(line).map_err(|_| ClientError::Malformed("non-UTF-8 head".into()))?;
        Ok(s.trim_end_matches(['\r', '\n']).to_owned())
    }

    fn read_response(&mut self) -> Result<(u16, String), ClientError> {
        let status_line = self.read_line()?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(ClientError::Malformed(format!(
                "status line {status_line:?}"
            )));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Malformed(format!("status line {status_line:?}")))?;
        let mut content_length = None;
        let mut chunked = false;
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| ClientError::Malformed(format!("header {line:?}")))?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n: usize = value
                    .parse()
                    .map_err(|_| ClientError::Malformed(format!("Content-Length {value:?}")))?;
                content_length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let body = if status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else if chunked {
            self.read_chunked()?
        } else if let Some(n) = content_length {
            if n > MAX_RESPONSE_LEN {
                return Err(ClientError::Malformed(format!("response of {n} bytes")));
            }
            let mut buf = vec![0u8; n];
            self.reader.read_exact(&mut buf)?;
            buf
        } else {
            let mut buf = Vec::new();
            (&mut self.reader)
                .take(MAX_RESPONSE_LEN as u64)
                .read_to_end(&mut buf)?;
            buf
        };
        let body =
            String::from_utf8(body).map_err(|_| ClientError::Malformed("non-UTF-8 body".into()))?;
        Ok((status, body))
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let line = self.read_line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let n = usize::from_str_radix(size, 16)
                .map_err(|_| ClientError::Malformed(format!("chunk size {line:?}")))?;
            if n == 0 {
                // Trailers until the empty line.
                while !self.read_line()?.is_empty() {}
                return Ok(out);
            }
            if out.len() + n > MAX_RESPONSE_LEN {
                return Err(ClientError::Malformed("response too large".into()));
            }
            let start = out.len();
            out.resize(start + n, 0);
            self.reader.read_exact(&mut out[start..])?;
            self.read_line()?;
        }
    }
}

/// A client that opens a connection per request.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the API socket at `path`, with a 30 s timeout.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Client {
            path: path.as_ref().to_path_buf(),
            timeout: Some(Duration::from_secs(30)),
        }
    }

    /// Changes the per-request I/O timeout (`None`: wait forever).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Any method.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), ClientError> {
        Connection::open(&self.path, self.timeout)?.request(method, path, body)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<(u16, String), ClientError> {
        self.request("GET", path, None)
    }

    /// `PUT path` with a JSON body.
    pub fn put(&self, path: &str, body: &str) -> Result<(u16, String), ClientError> {
        self.request("PUT", path, Some(body))
    }

    /// `PATCH path` with a JSON body.
    pub fn patch(&self, path: &str, body: &str) -> Result<(u16, String), ClientError> {
        self.request("PATCH", path, Some(body))
    }
}
