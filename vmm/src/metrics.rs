// SPDX-License-Identifier: Apache-2.0
//! VMM metrics: counters kept as atomics where they happen (vCPU exits by
//! reason, API requests) plus device counters, written as one JSON line per
//! flush to a file or FIFO (`PUT /metrics`, `FlushMetrics`, and every minute).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// vCPU exits by reason and failures, summed over all vCPUs.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exits_io_in: AtomicU64,
    /// Port writes.
    pub exits_io_out: AtomicU64,
    /// MMIO reads.
    pub exits_mmio_read: AtomicU64,
    /// MMIO writes.
    pub exits_mmio_write: AtomicU64,
    /// HLT exits (only without the in-kernel irqchip).
    pub exits_hlt: AtomicU64,
    /// KVM_RUN interrupted (pause, stop).
    pub exits_interrupted: AtomicU64,
    /// Failed KVM_RUN or fatal exits.
    pub failures: AtomicU64,
}

/// API server counters.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// Requests handled.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

/// Process-wide counters.
pub static VCPU: VcpuMetrics = VcpuMetrics {
    exits_io_in: AtomicU64::new(0),
    exits_io_out: AtomicU64::new(0),
    exits_mmio_read: AtomicU64::new(0),
    exits_mmio_write: AtomicU64::new(0),
    exits_hlt: AtomicU64::new(0),
    exits_interrupted: AtomicU64::new(0),
    failures: AtomicU64::new(0),
};

/// Process-wide API counters.
pub static API: ApiMetrics = ApiMetrics {
    requests: AtomicU64::new(0),
    errors: AtomicU64::new(0),
};

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The process-wide part of a metrics line.
pub fn core_metrics() -> Value {
    json!({
        "vcpu": {
            "exits_io_in": get(&VCPU.exits_io_in),
            "exits_io_out": get(&VCPU.exits_io_out),
            "exits_mmio_read": get(&VCPU.exits_mmio_read),
            "exits_mmio_write": get(&VCPU.exits_mmio_write),
            "exits_hlt": get(&VCPU.exits_hlt),
            "exits_interrupted": get(&VCPU.exits_interrupted),
            "failures": get(&VCPU.failures),
        },
        "api_server": {
            "requests": get(&API.requests),
            "errors": get(&API.errors),
        },
    })
}

/// Where metrics lines go.
#[derive(Debug)]
pub struct MetricsSink {
    file: File,
}

impl MetricsSink {
    /// Opens (appends to) a regular file or a FIFO, creating a missing file
    /// with mode 0600. Anything else (a directory, a device node, a socket)
    /// is refused with `InvalidInput`. Symbolic links are followed: metrics
    /// are appended, never written by replacing the file. A FIFO is opened
    /// without blocking: it needs a reader already (else `ENXIO`), so a FIFO
    /// nobody reads cannot hang the VMM.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let refuse = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} {what}: metrics go only to a regular file or a FIFO",
                    path.display()
                ),
            )
        };
        let kind = |t: std::fs::FileType| {
            if t.is_dir() {
                "is a directory"
            } else if t.is_char_device() || t.is_block_device() {
                "is a device node"
            } else if t.is_socket() {
                "is a socket"
            } else {
                "is not a regular file"
            }
        };
        // Refuse before opening: opening some devices has side effects.
        if let Ok(md) = std::fs::metadata(path) {
            let t = md.file_type();
            if !t.is_file() && !t.is_fifo() {
                return Err(refuse(kind(t)));
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        let t = file.metadata()?.file_type();
        if !t.is_file() && !t.is_fifo() {
            return Err(refuse(kind(t)));
        }
        // Writes block as before; only the open had to be non-blocking.
        set_blocking(&file)?;
        Ok(Self { file })
    }

    /// Writes one line: the timestamp, the core counters and `devices`.
    pub fn flush(&mut self, devices: Value) -> std::io::Result<()> {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut line = core_metrics();
        line["utc_timestamp_ms"] = json!(ts);
        if let (Some(obj), Value::Object(devs)) = (line.as_object_mut(), devices) {
            obj.extend(devs);
        }
        let mut text = line.to_string();
        text.push('\n');
        self.file.write_all(text.as_bytes())
    }
}

fn set_blocking(file: &File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn test_metrics_line_has_counters_and_devices() {
        let path = std::env::temp_dir().join(format!("wisp-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut sink = MetricsSink::open(&path).unwrap();
        inc(&API.requests);
        sink.flush(json!({"block": {"disk0": {"requests": 3}}}))
            .unwrap();
        sink.flush(json!({})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert!(v["api_server"]["requests"].as_u64().unwrap() >= 1);
        assert_eq!(v["block"]["disk0"]["requests"], 3);
        assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 0);
        assert!(v["vcpu"]["exits_io_out"].is_u64());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn test_metrics_file_is_private_and_only_a_file_or_fifo() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics");
        MetricsSink::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        for bad in [dir.path(), Path::new("/dev/full")] {
            let err = MetricsSink::open(bad).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
            assert!(err.to_string().contains(bad.to_str().unwrap()), "{err}");
        }
        // A FIFO without a reader: refused at once, not a hang.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = MetricsSink::open(&fifo).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "{err}");
        // With a reader it works.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut sink = MetricsSink::open(&fifo).unwrap();
        sink.flush(json!({})).unwrap();
        drop(reader);
    }
}
