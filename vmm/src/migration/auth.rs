// SPDX-License-Identifier: Apache-2.0
//! The optional migration token: a shared secret both sides read from a file,
//! proven by an HMAC-SHA256 challenge-response so it never crosses the wire.
//!
//! After the `Hello`s the receiver sends a fresh 32-byte nonce
//! (`Challenge`); the sender answers with its own nonce and, if it has a
//! token, `HMAC(token, "wisp-migration sender" | receiver nonce | sender
//! nonce)` (`Auth`); the receiver checks it in constant time and answers with
//! `HMAC(token, "wisp-migration receiver" | receiver nonce | sender nonce)`
//! (`AuthOk`), which the sender checks. Each side thus proves it knows the
//! token without revealing it; fresh nonces on both sides stop replays, and
//! the distinct labels stop a proof being reflected back. All of this happens
//! before the configuration or any memory moves. See `docs/migration.md` for
//! what it does not protect (the stream afterwards is not encrypted).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Nonce and proof length.
pub const AUTH_LEN: usize = 32;
/// Shortest token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

const SENDER_LABEL: &[u8] = b"wisp-migration sender";
const RECEIVER_LABEL: &[u8] = b"wisp-migration receiver";

/// A nonce or a proof.
pub type AuthBytes = [u8; AUTH_LEN];

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be opened or read.
    #[error("Cannot read migration token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Other users may read it.
    #[error(
        "Migration token file {path} is accessible to group or others (mode {mode:04o}): \
         make it private (chmod 600)"
    )]
    NotPrivate {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Too short or too long.
    #[error(
        "Migration token in {path} is {len} bytes long (after trailing white space is \
         removed); it must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} bytes"
    )]
    BadLength {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// No randomness for a nonce.
    #[error("Cannot get random bytes for the migration nonce: {0}")]
    Random(#[source] std::io::Error),
}

/// The shared secret. Its bytes are never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads the token from `path`: the whole file less trailing white space
    /// (so `echo secret > file` works), 16 to 4096 bytes. The file must not
    /// be accessible to group or others.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let read_err = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let mode = f.metadata().map_err(read_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(TokenError::NotPrivate {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        let mut bytes = Vec::new();
        // One byte past the limit is enough to tell it is too long.
        f.by_ref()
            .take(MAX_TOKEN_LEN as u64 + 64)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&bytes.len()) {
            return Err(TokenError::BadLength {
                path: path.to_path_buf(),
                len: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }

    /// A token from bytes (tests, in-process use).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    fn mac(
        &self,
        label: &[u8],
        receiver_nonce: &AuthBytes,
        sender_nonce: &AuthBytes,
    ) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(label);
        m.update(receiver_nonce);
        m.update(sender_nonce);
        m
    }

    /// The sender's proof for these nonces.
    pub fn sender_proof(&self, receiver_nonce: &AuthBytes, sender_nonce: &AuthBytes) -> AuthBytes {
        self.mac(SENDER_LABEL, receiver_nonce, sender_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The receiver's proof for these nonces.
    pub fn receiver_proof(
        &self,
        receiver_nonce: &AuthBytes,
        sender_nonce: &AuthBytes,
    ) -> AuthBytes {
        self.mac(RECEIVER_LABEL, receiver_nonce, sender_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a sender's proof, in constant time.
    pub fn verify_sender(&self, r: &AuthBytes, s: &AuthBytes, proof: &AuthBytes) -> bool {
        self.mac(SENDER_LABEL, r, s).verify_slice(proof).is_ok()
    }

    /// Checks a receiver's proof, in constant time.
    pub fn verify_receiver(&self, r: &AuthBytes, s: &AuthBytes, proof: &AuthBytes) -> bool {
        self.mac(RECEIVER_LABEL, r, s).verify_slice(proof).is_ok()
    }
}

/// 32 bytes from the kernel's CSPRNG.
pub fn nonce() -> Result<AuthBytes, TokenError> {
    let mut n = [0u8; AUTH_LEN];
    let mut filled = 0;
    while filled < n.len() {
        let rest = &mut n[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TokenError::Random(e));
        }
        filled += r as usize;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn test_token_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ok = write(dir.path(), "ok", b"0123456789abcdef\n", 0o600);
        assert_eq!(
            Token::from_file(&ok).unwrap(),
            Token::from_bytes(b"0123456789abcdef")
        );
        let open = write(dir.path(), "open", b"0123456789abcdef", 0o644);
        let e = Token::from_file(&open).unwrap_err();
        assert!(
            matches!(e, TokenError::NotPrivate { mode: 0o644, .. }),
            "{e}"
        );
        let short = write(dir.path(), "short", b"short \n", 0o400);
        let e = Token::from_file(&short).unwrap_err();
        assert!(matches!(e, TokenError::BadLength { len: 5, .. }), "{e}");
        let long = write(dir.path(), "long", &[b'x'; MAX_TOKEN_LEN + 1], 0o600);
        assert!(matches!(
            Token::from_file(&long),
            Err(TokenError::BadLength { .. })
        ));
        let e = Token::from_file(&dir.path().join("absent")).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
        assert_eq!(format!("{:?}", Token::from_bytes(b"secret")), "Token(..)");
    }

    #[test]
    fn test_proofs_bind_token_nonces_and_role() {
        let t = Token::from_bytes(b"0123456789abcdef");
        let other = Token::from_bytes(b"0123456789abcdeF");
        let (r, s) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(r, s);
        let p = t.sender_proof(&r, &s);
        assert!(t.verify_sender(&r, &s, &p));
        assert!(!other.verify_sender(&r, &s, &p));
        assert!(!t.verify_sender(&s, &r, &p), "nonces swapped");
        assert!(
            !t.verify_receiver(&r, &s, &p),
            "reflected to the other role"
        );
        let q = t.receiver_proof(&r, &s);
        assert!(t.verify_receiver(&r, &s, &q));
        assert_ne!(p, q);
        let mut bad = p;
        bad[31] ^= 1;
        assert!(!t.verify_sender(&r, &s, &bad));
    }
}
