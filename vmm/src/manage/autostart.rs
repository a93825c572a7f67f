// SPDX-License-Identifier: Apache-2.0
//! Host boot and shutdown: `wisp autostart-all`, `wisp shutdown-all` and the
//! systemd unit that runs them (`wisp install-autostart`).

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use super::lifecycle;
use super::store::Store;

/// The unit as shipped in resources/systemd/.
pub const UNIT: &str = include_str!("../../../resources/systemd/wisp-autostart.service");
/// Its file name.
pub const UNIT_NAME: &str = "wisp-autostart.service";

fn report(results: Vec<(String, anyhow::Result<super::Done>)>, json: bool) -> i32 {
    let mut failed = 0;
    let mut out = Vec::new();
    for (name, r) in results {
        match r {
            Ok(d) => {
                if !json {
                    println!("{}", d.text);
                }
                out.push(json!({ "name": name, "ok": true, "result": d.json }));
            }
            Err(e) => {
                failed += 1;
                eprintln!("wisp: {e:#}");
                out.push(json!({ "name": name, "ok": false, "error": format!("{e:#}") }));
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    i32::from(failed > 0)
}

/// `wisp autostart-all`: starts every autostart VM that is not running.
pub fn start_all(store: &Store, json: bool) -> anyhow::Result<i32> {
    // Networks first: VMs may join their bridges.
    let mut results = super::network::start_autostart(store);
    for name in store.defined()? {
        let autostart = store.load(&name).map(|d| d.autostart);
        match autostart {
            Ok(true) if !store.state(&name).is_active() => {
                let r = lifecycle::start(store, &name, false);
                results.push((name, r));
            }
            Ok(_) => {}
            Err(e) => results.push((name, Err(e))),
        }
    }
    Ok(report(results, json))
}

/// `wisp shutdown-all`: shuts down every running defined VM, in parallel.
pub fn shutdown_all(store: &Store, json: bool, timeout: Option<u64>) -> anyhow::Result<i32> {
    let names: Vec<String> = store
        .defined()?
        .into_iter()
        .filter(|n| store.state(n).is_active())
        .collect();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| s.spawn(move || lifecycle::shutdown(store, n, timeout)))
            .collect();
        names
            .iter()
            .zip(handles)
            .map(|(n, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("shutting down '{n}' panicked")));
                (n.clone(), r)
            })
            .collect::<Vec<_>>()
    });
    Ok(report(results, json))
}

/// The unit with this binary's path in its ExecStart/ExecStop lines.
pub fn unit_for(exe: &Path) -> String {
    UNIT.replace("/usr/local/bin/wisp", &exe.display().to_string())
}

/// `wisp install-autostart`: writes the unit into `unit_dir`.
pub fn install(unit_dir: &Path) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("Cannot find the wisp binary")?;
    std::fs::create_dir_all(unit_dir)
        .with_context(|| format!("Cannot create {}", unit_dir.display()))?;
    let path = unit_dir.join(UNIT_NAME);
    super::definition::write_atomic(&path, unit_for(&exe).as_bytes())
        .with_context(|| format!("Cannot write {}", path.display()))?;
    println!(
        "Installed {}; enable it with: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}",
        path.display()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_unit_runs_this_binary() {
        let u = unit_for(Path::new("/opt/wisp/bin/wisp"));
        assert!(u.contains("ExecStart=/opt/wisp/bin/wisp autostart-all"));
        assert!(u.contains("ExecStop=/opt/wisp/bin/wisp shutdown-all"));
        assert!(!u.contains("/usr/local/bin"));
    }
}
