// SPDX-License-Identifier: Apache-2.0
//! Migration endpoint addresses: `unix:PATH` and `tcp:HOST:PORT`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Why a migration URI was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The scheme is not `unix` or `tcp`.
    #[error("Unsupported migration URI {0:?}: expected unix:PATH or tcp:HOST:PORT")]
    Scheme(String),
    /// `unix:` with nothing after it.
    #[error("Migration URI {0:?} has an empty socket path")]
    EmptyPath(String),
    /// `tcp:` without a `HOST:PORT` pair.
    #[error("Migration URI {0:?} needs HOST:PORT after tcp:")]
    MissingPort(String),
    /// The port is not a number in 0..=65535.
    #[error("Migration URI {0:?} has an invalid port")]
    BadPort(String),
    /// `tcp:` with an empty host.
    #[error("Migration URI {0:?} has an empty host")]
    EmptyHost(String),
}

/// Where a migration stream listens or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP endpoint. `host` is a name or an IP address (IPv6 in brackets).
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// Port; 0 asks the kernel for one when listening.
        port: u16,
    },
}

impl FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(UriError::EmptyPath(s.into()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(UriError::Scheme(s.into()));
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(UriError::MissingPort(s.into()));
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(UriError::EmptyHost(s.into()));
        }
        let port = port.parse().map_err(|_| UriError::BadPort(s.into()))?;
        Ok(Self::Tcp {
            host: host.into(),
            port,
        })
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_uri_parse_valid_forms_round_trip() {
        for (s, want) in [
            ("unix:/tmp/m.sock", MigrationUri::Unix("/tmp/m.sock".into())),
            ("unix:rel.sock", MigrationUri::Unix("rel.sock".into())),
            (
                "tcp:127.0.0.1:4444",
                MigrationUri::Tcp {
                    host: "127.0.0.1".into(),
                    port: 4444,
                },
            ),
            (
                "tcp:[::1]:0",
                MigrationUri::Tcp {
                    host: "::1".into(),
                    port: 0,
                },
            ),
            (
                "tcp:host.example:65535",
                MigrationUri::Tcp {
                    host: "host.example".into(),
                    port: 65535,
                },
            ),
        ] {
            let uri: MigrationUri = s.parse().unwrap();
            assert_eq!(uri, want, "{s}");
            assert_eq!(uri.to_string().parse::<MigrationUri>().unwrap(), want);
        }
    }

    #[test]
    fn test_uri_parse_invalid_forms_rejected() {
        let e = |s: &str| s.parse::<MigrationUri>().unwrap_err();
        assert!(matches!(e("http://x"), UriError::Scheme(_)));
        assert!(matches!(e("/tmp/sock"), UriError::Scheme(_)));
        assert!(matches!(e(""), UriError::Scheme(_)));
        assert!(matches!(e("unix:"), UriError::EmptyPath(_)));
        assert!(matches!(e("tcp:localhost"), UriError::MissingPort(_)));
        assert!(matches!(e("tcp::80"), UriError::EmptyHost(_)));
        assert!(matches!(e("tcp:h:99999"), UriError::BadPort(_)));
        assert!(matches!(e("tcp:h:-1"), UriError::BadPort(_)));
        assert!(matches!(e("tcp:h:"), UriError::BadPort(_)));
        assert!(e("ftp:x")
            .to_string()
            .starts_with("Unsupported migration URI"));
    }
}
