// SPDX-License-Identifier: Apache-2.0
//! Measures how soon the API answers `GET /` after process start.
//!
//! `cargo run --release -p api --example startup -- /tmp/x.sock`, ideally under
//! `perf stat -e task-clock` for the CPU time.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("/tmp/wisp-startup-{}.sock", std::process::id()));
    let (handle, rx) = api::ApiServer::start(&path)?;
    std::thread::spawn(move || {
        for (_req, resp) in rx {
            resp.send(Ok(Some(serde_json::json!({"state": "Not started"}))));
        }
    });
    let (status, _) = api::Client::new(&path).get("/")?;
    println!("GET / -> {status} after {:?}", t.elapsed());
    handle.shutdown();
    Ok(())
}
