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
    /// Opens (appends to) a file or FIFO.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
