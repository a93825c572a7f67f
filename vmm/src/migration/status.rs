// SPDX-License-Identifier: Apache-2.0
//! Shared migration progress, readable from other threads (the API), and the
//! cancel flag the sender checks between frames.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// Phase of a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Connecting, handshake and configuration check.
    #[default]
    Setup,
    /// Copying memory while the guest runs.
    PreCopy,
    /// The guest is paused; last pages and state are moving.
    Downtime,
    /// The receiver runs the guest.
    Completed,
    /// Failed; the source was resumed.
    Failed,
    /// Cancelled; the source was resumed.
    Cancelled,
}

/// A copy of the progress counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatusSnapshot {
    /// Phase.
    pub state: MigrationState,
    /// Pre-copy iteration (0 = the full copy).
    pub iteration: u32,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Pages sent (data and zero markers).
    pub pages_sent: u64,
    /// Of those, pages sent as zero markers.
    pub zero_pages: u64,
    /// Pages found dirty at the last check.
    pub dirty_pages: u64,
    /// Dirty rate, pages per second.
    pub dirty_pages_per_s: f64,
    /// Dirty rate, MiB per second.
    pub dirty_mib_per_s: f64,
    /// Measured transfer bandwidth, MiB per second.
    pub bandwidth_mib_per_s: f64,
    /// Expected downtime for the current dirty set, milliseconds.
    pub expected_downtime_ms: u64,
    /// Actual downtime, pause to `Running`, once completed.
    pub downtime_ms: Option<u64>,
    /// Current CPU throttle (auto-converge), percent.
    pub throttle_percent: u8,
    /// The failure, once failed or cancelled.
    pub error: Option<String>,
}

/// Progress shared between the migration thread and observers. Cloning
/// shares the same status.
#[derive(Debug, Clone, Default)]
pub struct MigrationStatus {
    inner: Arc<Mutex<StatusSnapshot>>,
    cancel: Arc<AtomicBool>,
}

impl MigrationStatus {
    /// A fresh status in [`MigrationState::Setup`].
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, StatusSnapshot> {
        // A panic while holding the lock leaves plain counters behind; keep
        // using them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current progress.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.lock().clone()
    }

    /// Asks the sender to stop; honoured at the next frame boundary until
    /// `Complete` has been sent.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether [`MigrationStatus::cancel`] was called.
    pub fn is_cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Changes the progress.
    pub(crate) fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.lock())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_status_shared_between_clones() {
        let s = MigrationStatus::new();
        let t = s.clone();
        assert_eq!(s.snapshot().state, MigrationState::Setup);
        t.update(|x| {
            x.state = MigrationState::PreCopy;
            x.iteration = 3;
        });
        assert_eq!(s.snapshot().iteration, 3);
        assert!(!s.is_cancel_requested());
        t.cancel();
        assert!(s.is_cancel_requested());
        let json = serde_json::to_string(&s.snapshot()).unwrap();
        assert!(json.contains("\"pre_copy\""), "{json}");
    }
}
