// SPDX-License-Identifier: Apache-2.0
//! Counters of one virtio-blk device.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::request::{Completion, RequestType};
use super::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

/// Request counters; updated by the device, readable from any thread.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Chains taken from the queue.
    pub requests: AtomicU64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written to the disk (including zeroed ranges).
    pub write_bytes: AtomicU64,
    /// Requests completed with IOERR (malformed or failed).
    pub errors: AtomicU64,
    /// Requests completed with UNSUPP.
    pub unsupported: AtomicU64,
    /// Malformed chains (IOERR or consumed with no status).
    pub invalid: AtomicU64,
    /// Times the queue was found broken (device needs reset).
    pub broken: AtomicU64,
    /// Flush requests that completed successfully (reached the backend).
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests that completed successfully.
    pub discards: AtomicU64,
}

/// A point-in-time copy of [`BlockMetrics`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockMetricsSnapshot {
    /// See [`BlockMetrics::requests`].
    pub requests: u64,
    /// See [`BlockMetrics::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlockMetrics::write_bytes`].
    pub write_bytes: u64,
    /// See [`BlockMetrics::errors`].
    pub errors: u64,
    /// See [`BlockMetrics::unsupported`].
    pub unsupported: u64,
    /// See [`BlockMetrics::invalid`].
    pub invalid: u64,
    /// See [`BlockMetrics::broken`].
    pub broken: u64,
    /// See [`BlockMetrics::flushes`].
    pub flushes: u64,
    /// See [`BlockMetrics::discards`].
    pub discards: u64,
}

impl BlockMetrics {
    pub(super) fn inc_requests(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn inc_invalid(&self) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn inc_broken(&self) {
        self.broken.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request of `kind` that completed with `VIRTIO_BLK_S_OK`.
    pub(super) fn record_ok(&self, kind: RequestType) {
        match kind {
            RequestType::Flush => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                self.discards.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    pub(super) fn record(&self, c: &Completion) {
        if c.read != 0 {
            self.read_bytes.fetch_add(c.read, Ordering::Relaxed);
        }
        if c.written != 0 {
            self.write_bytes.fetch_add(c.written, Ordering::Relaxed);
        }
        match c.status {
            VIRTIO_BLK_S_IOERR => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            VIRTIO_BLK_S_UNSUPP => {
                self.unsupported.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            requests: r(&self.requests),
            read_bytes: r(&self.read_bytes),
            write_bytes: r(&self.write_bytes),
            errors: r(&self.errors),
            unsupported: r(&self.unsupported),
            invalid: r(&self.invalid),
            broken: r(&self.broken),
            flushes: r(&self.flushes),
            discards: r(&self.discards),
        }
    }
}
