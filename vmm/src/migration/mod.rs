// SPDX-License-Identifier: Apache-2.0
//! Live migration: transports, the versioned wire protocol, the pre-copy
//! sender and the receiver. VMM-agnostic: the VMM plugs in through the
//! [`MigrationSource`] and [`MigrationTarget`] traits and watches progress
//! through a shared [`MigrationStatus`]. See `docs/migration.md`.

pub mod auth;
pub mod config;
pub mod protocol;
pub mod receiver;
pub mod sender;
pub mod status;
pub mod transport;
pub mod uri;

use std::time::Duration;

pub use auth::{Token, TokenError};
pub use config::{CpuFeatures, DeviceSummary, MigrationConfig, RegionSpec};
pub use protocol::{ProtocolError, PROTOCOL_VERSION};
pub use receiver::{receive, MigrationTarget, ReceiveOptions, ReceiveReport, WrittenPages};
pub use sender::{send, MigrationSource, SendOptions, SendReport};
pub use status::{MigrationState, MigrationStatus, StatusSnapshot};
pub use transport::{connect, listen, Connection, Listener, Stream, TransportError};
pub use uri::{MigrationUri, UriError};

/// The error a VMM hook ([`MigrationSource`], [`MigrationTarget`]) returns.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The URI is invalid.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Listening, accepting or connecting failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream broke or carried something undecodable.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A valid message arrived out of order.
    #[error("Unexpected {got} message while waiting for {expected}")]
    Unexpected {
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The receiver's configuration or host does not fit the VM.
    #[error("Receiver refused the migration: {0}")]
    Refused(String),
    /// The peer sent `Error`.
    #[error("Migration peer reported an error: {0}")]
    Peer(String),
    /// Cancelled locally or by the peer.
    #[error("Migration cancelled: {0}")]
    Cancelled(String),
    /// The guest dirties memory faster than it can be sent.
    #[error(
        "Migration did not converge after {iterations} iterations: dirty rate \
         {dirty_mib_s:.1} MiB/s vs bandwidth {bandwidth_mib_s:.1} MiB/s"
    )]
    NotConverged {
        /// Pre-copy iterations done.
        iterations: u32,
        /// Last measured dirty rate.
        dirty_mib_s: f64,
        /// Last measured bandwidth.
        bandwidth_mib_s: f64,
    },
    /// A source hook failed.
    #[error("Migration source failed to {what}: {source}")]
    Source {
        /// The hook.
        what: &'static str,
        /// Its error.
        source: HookError,
    },
    /// A target hook failed.
    #[error("Migration target failed to {what}: {source}")]
    Target {
        /// The hook.
        what: &'static str,
        /// Its error.
        source: HookError,
    },
    /// A `Pages` run lies outside the guest memory layout.
    #[error("Pages {first_page}..+{count} of region {region} lie outside guest memory")]
    PageOutOfRange {
        /// Region index.
        region: u32,
        /// First page of the run.
        first_page: u64,
        /// Pages in the run.
        count: u32,
    },
    /// Guest memory could not be read or written.
    #[error("Guest memory access at region {region} offset {offset:#x} failed: {reason}")]
    Memory {
        /// Region index.
        region: u32,
        /// Byte offset in the region.
        offset: u64,
        /// The vm-memory error.
        reason: String,
    },
    /// The device state exceeds the receiver's limit.
    #[error("Device state exceeds the {max}-byte limit")]
    StateTooLarge {
        /// The limit.
        max: usize,
    },
    /// The peer did not answer in time.
    #[error("Timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// `Go` was sent but the receiver did not confirm: it may or may not run
    /// the guest. The source stays paused; resume it only after checking
    /// that the receiver does not run the guest.
    #[error(
        "Migration outcome unknown: the receiver was told to run the guest but did not \
         confirm ({0}); the source stays paused: check the receiver, and resume the \
         source only if the receiver is not running the guest"
    )]
    InDoubt(String),
    /// The peer did not prove it knows the migration token.
    #[error("Migration peer not authenticated: {0}")]
    Unauthenticated(String),
    /// The token file or the nonce could not be had.
    #[error(transparent)]
    Token(#[from] auth::TokenError),
    /// Setting socket options failed.
    #[error("Cannot configure the migration stream: {0}")]
    Socket(#[source] std::io::Error),
}

/// Result of migration operations.
pub type Result<T> = std::result::Result<T, MigrationError>;

/// Connects to `uri` (retrying for up to `connect_timeout` while nobody
/// listens) and migrates the VM behind `source` there. See [`send`] for the
/// outcome; a connection failure also resumes nothing, as nothing started.
pub fn send_to(
    uri: &MigrationUri,
    connect_timeout: Duration,
    source: &mut dyn MigrationSource,
    opts: &SendOptions,
    status: &MigrationStatus,
) -> Result<SendReport> {
    let mut stream = match transport::connect(uri, connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            let e = MigrationError::from(e);
            status.update(|s| {
                s.state = MigrationState::Failed;
                s.error = Some(e.to_string());
            });
            return Err(e);
        }
    };
    send(&mut stream, source, opts, status)
}

/// Listens on `uri`, accepts one connection within `accept_timeout` (or
/// waits forever), and receives a VM into `target` within `opts`' timeouts.
/// See [`receive`] for the outcome.
pub fn receive_from(
    uri: &MigrationUri,
    accept_timeout: Option<Duration>,
    opts: &ReceiveOptions,
    target: &mut dyn MigrationTarget,
) -> Result<ReceiveReport> {
    let listener = transport::listen(uri)?;
    let mut stream = listener.accept(accept_timeout)?;
    drop(listener);
    receive(&mut stream, target, opts)
}

#[cfg(test)]
mod tests;
