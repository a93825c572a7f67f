// SPDX-License-Identifier: Apache-2.0
//! Host networks for VMs (`wisp net-*`): a Linux bridge with a host address,
//! optional NAT (an nftables masquerade table) and optional DHCP/DNS
//! (dnsmasq). VMs join with `"bridge": "BR"` on a network interface.
//! Definitions live in `STATE/networks/NAME.json`; what `net-start` created is
//! recorded in `STATE/networks/NAME.run` so `net-destroy` removes exactly that.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::definition::write_atomic;
use super::store::{check_name, Store};
use super::Done;

/// A DHCP address range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpRange {
    /// First address handed out.
    pub start: Ipv4Addr,
    /// Last address handed out.
    pub end: Ipv4Addr,
}

/// A network definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Network name.
    pub name: String,
    /// Bridge device created by `net-start`.
    pub bridge: String,
    /// The host's address on the bridge, `A.B.C.D/N`.
    pub address: String,
    /// Masquerade traffic leaving the subnet.
    #[serde(default)]
    pub nat: bool,
    /// Serve DHCP (and DNS) with dnsmasq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpRange>,
    /// Started by `wisp autostart-all`.
    #[serde(default)]
    pub autostart: bool,
}

/// What `net-start` created.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    /// The network namespace it was made in (`/proc/self/ns/net`).
    netns: String,
    bridge: String,
    nft_table: Option<String>,
    dnsmasq_pid: Option<u32>,
}

fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Network {
    /// Parses and validates a definition.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let n: Network = serde_json::from_str(text).context("Invalid network definition")?;
        check_name(&n.name)?;
        if !valid_ifname(&n.bridge) {
            bail!(
                "Invalid bridge name '{}': 1-15 characters from A-Z a-z 0-9 - _ .",
                n.bridge
            );
        }
        let (ip, prefix) = n.ip_prefix()?;
        let mask = u32::MAX << (32 - prefix);
        let host = u32::from(ip) & !mask;
        if host == 0 || host == !mask {
            bail!(
                "Invalid address '{}': the network or broadcast address",
                n.address
            );
        }
        if let Some(r) = &n.dhcp {
            let net = u32::from(ip) & mask;
            for a in [r.start, r.end] {
                if u32::from(a) & mask != net || a == ip {
                    bail!("DHCP address {a} is not a free address of {}", n.subnet());
                }
            }
            if u32::from(r.start) > u32::from(r.end) {
                bail!("DHCP range {}..{} is empty", r.start, r.end);
            }
        }
        Ok(n)
    }

    fn ip_prefix(&self) -> anyhow::Result<(Ipv4Addr, u32)> {
        let bad = || {
            anyhow::anyhow!(
                "Invalid address '{}': expected A.B.C.D/N with N in 8..=30",
                self.address
            )
        };
        let (ip, prefix) = self.address.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u32 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        Ok((ip, prefix))
    }

    /// The subnet, `A.B.C.0/N`.
    pub fn subnet(&self) -> String {
        match self.ip_prefix() {
            Ok((ip, p)) => format!(
                "{}/{p}",
                Ipv4Addr::from(u32::from(ip) & (u32::MAX << (32 - p)))
            ),
            Err(_) => self.address.clone(),
        }
    }

    fn nft_table(&self) -> String {
        format!("wisp-{}", self.name)
    }

    /// The nftables script of the NAT table.
    pub fn nft_script(&self) -> String {
        let s = self.subnet();
        format!(
            "table ip {t} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {s} ip daddr != {s} masquerade\n  }}\n}}\n",
            t = self.nft_table()
        )
    }
}

fn dir(store: &Store) -> PathBuf {
    store.state_dir.join("networks")
}

fn file(store: &Store, name: &str, ext: &str) -> PathBuf {
    dir(store).join(format!("{name}.{ext}"))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("Cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn load(store: &Store, name: &str) -> anyhow::Result<Network> {
    check_name(name)?;
    let p = file(store, name, "json");
    let text = std::fs::read_to_string(&p)
        .map_err(|_| anyhow::anyhow!("No network named '{name}' is defined"))?;
    Network::parse(&text).with_context(|| p.display().to_string())
}

fn netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn run_path(store: &Store, name: &str) -> PathBuf {
    store.runtime_dir.join(format!("{name}.net"))
}

fn run_state(store: &Store, name: &str) -> Option<RunState> {
    serde_json::from_str(&std::fs::read_to_string(run_path(store, name)).ok()?).ok()
}

/// Started and not destroyed since (in whatever network namespace).
fn is_active(store: &Store, name: &str) -> bool {
    run_state(store, name).is_some()
}

/// `wisp net-define FILE`.
pub fn define(store: &Store, path: &std::path::Path) -> anyhow::Result<Done> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let n = Network::parse(&text).with_context(|| path.display().to_string())?;
    std::fs::create_dir_all(dir(store))?;
    let out = serde_json::to_string_pretty(&n)? + "\n";
    write_atomic(&file(store, &n.name, "json"), out.as_bytes())?;
    Ok(Done {
        text: format!("Network '{}' defined (bridge {})", n.name, n.bridge),
        json: json!({ "name": n.name, "bridge": n.bridge }),
    })
}

/// `wisp net-undefine NAME`.
pub fn undefine(store: &Store, name: &str) -> anyhow::Result<Done> {
    load(store, name)?;
    if is_active(store, name) {
        bail!("Network '{name}' is active: `wisp net-destroy {name}` first");
    }
    for ext in ["json", "leases"] {
        let _ = std::fs::remove_file(file(store, name, ext));
    }
    Ok(Done {
        text: format!("Network '{name}' undefined"),
        json: json!({ "name": name }),
    })
}

fn teardown(r: &RunState) {
    if let Some(pid) = r.dnsmasq_pid {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "dnsmasq" {
            // SAFETY: kill has no memory effects; the pid is our dnsmasq.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    if let Some(t) = &r.nft_table {
        let _ = run(Command::new("nft").args(["delete", "table", "ip", t]));
    }
    let _ = run(Command::new("ip").args(["link", "del", &r.bridge]));
}

/// `wisp net-start NAME`: bridge, address, NAT, DHCP; undone on failure.
pub fn start(store: &Store, name: &str) -> anyhow::Result<Done> {
    let n = load(store, name)?;
    if is_active(store, name) {
        bail!("Network '{name}' is already active");
    }
    if std::path::Path::new("/sys/class/net")
        .join(&n.bridge)
        .exists()
    {
        bail!("Device '{}' already exists: not taking it over", n.bridge);
    }
    let mut r = RunState {
        netns: netns(),
        bridge: n.bridge.clone(),
        nft_table: None,
        dnsmasq_pid: None,
    };
    let result = (|| -> anyhow::Result<()> {
        run(Command::new("ip").args(["link", "add", &n.bridge, "type", "bridge"]))?;
        run(Command::new("ip").args(["addr", "add", &n.address, "dev", &n.bridge]))?;
        run(Command::new("ip").args(["link", "set", &n.bridge, "up"]))?;
        if n.nat {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .context("Cannot enable IPv4 forwarding")?;
            run(Command::new("nft").args(["delete", "table", "ip", &n.nft_table()])).ok();
            let script = file(store, name, "nft");
            std::fs::write(&script, n.nft_script())?;
            let res = run(Command::new("nft").arg("-f").arg(&script));
            let _ = std::fs::remove_file(&script);
            res?;
            r.nft_table = Some(n.nft_table());
        }
        if let Some(d) = &n.dhcp {
            let pid_file = file(store, name, "pid");
            let _ = std::fs::remove_file(&pid_file);
            let (ip, _) = n.ip_prefix()?;
            run(Command::new("dnsmasq")
                .args([
                    "--conf-file=/dev/null",
                    "--strict-order",
                    "--bind-interfaces",
                    "--except-interface=lo",
                ])
                .arg(format!("--interface={}", n.bridge))
                .arg(format!("--listen-address={ip}"))
                .arg(format!("--dhcp-range={},{},12h", d.start, d.end))
                .arg(format!(
                    "--dhcp-leasefile={}",
                    file(store, name, "leases").display()
                ))
                .arg(format!("--pid-file={}", pid_file.display())))?;
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .context("dnsmasq wrote no pid file")?;
            r.dnsmasq_pid = Some(pid);
            let _ = std::fs::remove_file(&pid_file);
        }
        std::fs::create_dir_all(&store.runtime_dir)?;
        write_atomic(
            &run_path(store, name),
            serde_json::to_string(&r)?.as_bytes(),
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        teardown(&r);
        return Err(e.context(format!("Cannot start network '{name}'")));
    }
    Ok(Done {
        text: format!(
            "Network '{name}' started: bridge {} {}{}{}",
            n.bridge,
            n.address,
            if n.nat { ", NAT" } else { "" },
            if n.dhcp.is_some() { ", DHCP" } else { "" }
        ),
        json: json!({ "name": name, "bridge": n.bridge, "dnsmasq_pid": r.dnsmasq_pid, "nat": n.nat }),
    })
}

/// `wisp net-destroy NAME`: removes what `net-start` created.
pub fn destroy(store: &Store, name: &str) -> anyhow::Result<Done> {
    check_name(name)?;
    let Some(r) = run_state(store, name) else {
        bail!("Network '{name}' is not active");
    };
    if r.netns != netns() {
        bail!(
            "Network '{name}' was started in another network namespace ({}); run net-destroy there",
            r.netns
        );
    }
    teardown(&r);
    let _ = std::fs::remove_file(run_path(store, name));
    Ok(Done {
        text: format!("Network '{name}' stopped"),
        json: json!({ "name": name }),
    })
}

/// Every defined network's name, sorted.
pub fn defined(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir(store))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
                .filter(|n| vmm::registry::valid_name(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `wisp net-list`.
pub fn list(store: &Store) -> anyhow::Result<Done> {
    let mut rows = Vec::new();
    let mut text = format!(
        "{:<20} {:<8} {:<16} {:<20} {:<4} {:<4} AUTOSTART\n",
        "NAME", "STATE", "BRIDGE", "ADDRESS", "NAT", "DHCP"
    );
    for name in defined(store) {
        let Ok(n) = load(store, &name) else { continue };
        let active = is_active(store, &name);
        text.push_str(&format!(
            "{:<20} {:<8} {:<16} {:<20} {:<4} {:<4} {}\n",
            n.name,
            if active { "active" } else { "inactive" },
            n.bridge,
            n.address,
            if n.nat { "yes" } else { "no" },
            if n.dhcp.is_some() { "yes" } else { "no" },
            if n.autostart { "yes" } else { "no" }
        ));
        rows.push(
            json!({ "name": n.name, "active": active, "bridge": n.bridge, "address": n.address,
            "nat": n.nat, "dhcp": n.dhcp, "autostart": n.autostart }),
        );
    }
    Ok(Done {
        text: text.trim_end().to_string(),
        json: serde_json::Value::Array(rows),
    })
}

/// Starts every autostart network that is not active (for `autostart-all`).
pub fn start_autostart(store: &Store) -> Vec<(String, anyhow::Result<Done>)> {
    defined(store)
        .into_iter()
        .filter(|n| load(store, n).is_ok_and(|d| d.autostart) && !is_active(store, n))
        .map(|n| {
            let r = start(store, &n);
            (format!("network {n}"), r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"name": "lan", "bridge": "wbr0", "address": "192.168.77.1/24", "nat": true,
        "dhcp": {"start": "192.168.77.100", "end": "192.168.77.200"}}"#;

    #[test]
    fn test_parse_and_nft_script() {
        let n = Network::parse(GOOD).unwrap();
        assert_eq!(n.subnet(), "192.168.77.0/24");
        let s = n.nft_script();
        assert!(s.contains("table ip wisp-lan"));
        assert!(s.contains("ip saddr 192.168.77.0/24 ip daddr != 192.168.77.0/24 masquerade"));
        for (from, to, why) in [
            ("wbr0", "a-bridge-name-too-long", "bridge"),
            ("192.168.77.1/24", "192.168.77.0/24", "network or broadcast"),
            ("192.168.77.1/24", "192.168.77.1", "A.B.C.D/N"),
            ("192.168.77.1/24", "192.168.77.1/31", "A.B.C.D/N"),
            ("192.168.77.200\"", "192.168.78.200\"", "not a free address"),
            ("192.168.77.100", "192.168.77.250", "empty"),
            ("\"nat\"", "\"masq\"", "unknown field"),
            ("\"lan\"", "\"../x\"", "Invalid VM name"),
        ] {
            let e = format!("{:#}", Network::parse(&GOOD.replace(from, to)).unwrap_err());
            assert!(e.contains(why), "{to}: {e}");
        }
    }
}
