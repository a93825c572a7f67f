// SPDX-License-Identifier: Apache-2.0
//! Maps (method, path, body) to an [`ApiRequest`] or a 4xx [`ApiFault`].

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::de::DeserializeOwned;

use crate::models::{
    ApiFault, BootSource, Drive, InstanceActionInfo, Logger, MachineConfig, MachineConfigUpdate,
    Metrics, MigrationReceive, MigrationSend, ModelError, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vm,
};
use crate::request::ApiRequest;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// The body limit in force: [`MAX_BODY_LEN`] unless lowered with
/// [`set_max_body_len`] (Firecracker's `--http-api-max-payload-size`).
static BODY_LIMIT: AtomicUsize = AtomicUsize::new(MAX_BODY_LEN);

/// Lowers the largest request body accepted; `0` or more than
/// [`MAX_BODY_LEN`] is refused (the server never reads more than that).
pub fn set_max_body_len(n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_BODY_LEN {
        return Err(format!(
            "the API payload limit must be 1..={MAX_BODY_LEN} bytes, not {n}"
        ));
    }
    BODY_LIMIT.store(n, Ordering::Relaxed);
    Ok(())
}

/// The largest request body accepted now.
pub fn max_body_len() -> usize {
    BODY_LIMIT.load(Ordering::Relaxed)
}

/// HTTP methods the API knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// Anything else.
    Other,
}

impl Method {
    /// Parses a method name (case-sensitive, as HTTP requires).
    pub fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }
}

/// Firecracker answers an unknown path, or a method a path does not take,
/// with 400 and this message naming the method and the path's first segment.
fn not_allowed(method: &str, path: &str) -> ApiFault {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let shown: String = first.chars().take(128).collect();
    let method: String = method.chars().take(16).collect();
    ApiFault::bad_request(format!(
        "Invalid request method and/or path: {method} {shown}."
    ))
}

fn model_fault(e: ModelError) -> ApiFault {
    ApiFault::bad_request(e.to_string())
}

/// Deserialises a JSON body.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiFault> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiFault::bad_request("a JSON request body is required"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiFault::bad_request(format!("invalid request body: {}", e.inner()))
        } else {
            ApiFault::bad_request(format!("invalid request body: {path}: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| ApiFault::bad_request(format!("invalid request body: {e}")))?;
    Ok(value)
}

/// Routes one request. `path` is the URI path without the query string.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiFault> {
    check_body_len(body.len(), max_body_len())?;
    let m = Method::parse(method);
    if !path.starts_with('/') || path.contains("//") {
        return Err(unknown(method, path));
    }
    let trimmed = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let mut segments = trimmed.strip_prefix('/').unwrap_or(trimmed).split('/');
    let first = segments.next().unwrap_or("");
    let second = segments.next();
    if segments.next().is_some() {
        return Err(unknown(method, path));
    }
    match (first, second) {
        ("", None) => get_only(m, method, path, ApiRequest::GetInstanceInfo),
        ("version", None) => get_only(m, method, path, ApiRequest::GetVersion),
        ("vm", Some("config")) => get_only(m, method, path, ApiRequest::GetVmConfig),
        ("migration", None) => get_only(m, method, path, ApiRequest::GetMigrationStatus),
        ("machine-config", None) => match m {
            Method::Get => Ok(ApiRequest::GetMachineConfig),
            Method::Put => {
                let c: MachineConfig = parse(body)?;
                c.validate().map_err(model_fault)?;
                Ok(ApiRequest::PutMachineConfig(c))
            }
            Method::Patch => {
                let c: MachineConfigUpdate = parse(body)?;
                if c == MachineConfigUpdate::default() {
                    return Err(ApiFault::bad_request(
                        "Empty PATCH request: give at least one machine-config field",
                    ));
                }
                c.validate().map_err(model_fault)?;
                Ok(ApiRequest::PatchMachineConfig(c))
            }
            Method::Other => Err(not_allowed(method, path)),
        },
        ("boot-source", None) => {
            put_only(m, method, path)?;
            let b: BootSource = parse(body)?;
            b.validate().map_err(model_fault)?;
            Ok(ApiRequest::PutBootSource(b))
        }
        ("drives", Some(id)) if !id.is_empty() => match m {
            Method::Put => {
                let d: Drive = parse(body)?;
                check_id("drive_id", id, &d.drive_id)?;
                d.validate().map_err(model_fault)?;
                Ok(ApiRequest::PutDrive(d))
            }
            Method::Patch => {
                let d: PartialDrive = parse(body)?;
                check_id("drive_id", id, &d.drive_id)?;
                d.validate().map_err(model_fault)?;
                Ok(ApiRequest::PatchDrive(d))
            }
            _ => Err(not_allowed(method, path)),
        },
        ("network-interfaces", Some(id)) if !id.is_empty() => match m {
            Method::Put => {
                let n: NetworkInterface = parse(body)?;
                check_id("iface_id", id, &n.iface_id)?;
                n.validate().map_err(model_fault)?;
                Ok(ApiRequest::PutNetworkInterface(n))
            }
            Method::Patch => {
                let n: PartialNetworkInterface = parse(body)?;
                check_id("iface_id", id, &n.iface_id)?;
                n.validate().map_err(model_fault)?;
                Ok(ApiRequest::PatchNetworkInterface(n))
            }
            _ => Err(not_allowed(method, path)),
        },
        (
            "balloon" | "vsock" | "mmds" | "entropy" | "cpu-config" | "pmem" | "hotplug" | "serial",
            _,
        ) => Err(ApiFault::bad_request(format!(
            "{path} is a Firecracker endpoint that wisp does not implement"
        ))),
        ("actions", None) => {
            put_only(m, method, path)?;
            let a: InstanceActionInfo = parse(body)?;
            a.validate().map_err(model_fault)?;
            Ok(ApiRequest::Action(a))
        }
        ("vm", None) => {
            if m != Method::Patch {
                return Err(not_allowed(method, path));
            }
            let v: Vm = parse(body)?;
            Ok(ApiRequest::PatchVm(v))
        }
        ("logger", None) => {
            put_only(m, method, path)?;
            let l: Logger = parse(body)?;
            l.validate().map_err(model_fault)?;
            Ok(ApiRequest::PutLogger(l))
        }
        ("metrics", None) => {
            put_only(m, method, path)?;
            let x: Metrics = parse(body)?;
            x.validate().map_err(model_fault)?;
            Ok(ApiRequest::PutMetrics(x))
        }
        ("snapshot", Some("create")) => {
            put_only(m, method, path)?;
            let s: SnapshotCreateParams = parse(body)?;
            s.validate().map_err(model_fault)?;
            Ok(ApiRequest::CreateSnapshot(s))
        }
        ("snapshot", Some("load")) => {
            put_only(m, method, path)?;
            let s: SnapshotLoadParams = parse(body)?;
            s.validate().map_err(model_fault)?;
            Ok(ApiRequest::LoadSnapshot(s))
        }
        ("migration", Some("receive")) => {
            put_only(m, method, path)?;
            let r: MigrationReceive = parse(body)?;
            r.validate().map_err(model_fault)?;
            Ok(ApiRequest::MigrationReceive(r))
        }
        ("migration", Some("send")) => {
            put_only(m, method, path)?;
            let s: MigrationSend = parse(body)?;
            s.validate().map_err(model_fault)?;
            Ok(ApiRequest::MigrationSend(s))
        }
        ("migration", Some("cancel")) => {
            put_only(m, method, path)?;
            Ok(ApiRequest::MigrationCancel)
        }
        _ => Err(unknown(method, path)),
    }
}

/// Firecracker's answer to a body over the limit: 400 and this message.
fn check_body_len(len: usize, limit: usize) -> Result<(), ApiFault> {
    if len > limit {
        return Err(ApiFault::bad_request(format!(
            "Request payload with size {len} is larger than the limit of {limit} allowed by server."
        )));
    }
    Ok(())
}

fn unknown(method: &str, path: &str) -> ApiFault {
    not_allowed(method, path)
}

fn get_only(m: Method, method: &str, path: &str, r: ApiRequest) -> Result<ApiRequest, ApiFault> {
    if m == Method::Get {
        Ok(r)
    } else {
        Err(not_allowed(method, path))
    }
}

fn put_only(m: Method, method: &str, path: &str) -> Result<(), ApiFault> {
    if m == Method::Put {
        Ok(())
    } else {
        Err(not_allowed(method, path))
    }
}

fn check_id(field: &str, in_path: &str, in_body: &str) -> Result<(), ApiFault> {
    if in_path == in_body {
        Ok(())
    } else {
        Err(ApiFault::bad_request(format!(
            "{field} in the path ({in_path:?}) does not match the body ({in_body:?})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ActionType, VmState};

    fn ok(method: &str, path: &str, body: &str) -> ApiRequest {
        match route(method, path, body.as_bytes()) {
            Ok(r) => r,
            Err(f) => panic!("{method} {path} {body}: {f}"),
        }
    }

    fn err(method: &str, path: &str, body: &str) -> ApiFault {
        match route(method, path, body.as_bytes()) {
            Ok(r) => panic!("{method} {path} {body}: unexpectedly {r:?}"),
            Err(f) => f,
        }
    }

    #[test]
    fn gets() {
        assert_eq!(ok("GET", "/", ""), ApiRequest::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), ApiRequest::GetVersion);
        assert_eq!(ok("GET", "/version/", ""), ApiRequest::GetVersion);
        assert_eq!(ok("GET", "/vm/config", ""), ApiRequest::GetVmConfig);
        assert_eq!(
            ok("GET", "/machine-config", ""),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(ok("GET", "/migration", ""), ApiRequest::GetMigrationStatus);
        assert_eq!(err("PUT", "/", "{}").status, 400);
        assert_eq!(err("PUT", "/version", "{}").status, 400);
        assert_eq!(err("PATCH", "/vm/config", "{}").status, 400);
        assert_eq!(err("PUT", "/migration", "{}").status, 400);
    }

    #[test]
    fn unknown_paths() {
        for p in [
            "/nope",
            "/drives",
            "/drives/",
            "/drives/a/b",
            "/snapshot/x",
            "/vm/x",
            "//",
        ] {
            let f = err("PUT", p, "{}");
            assert_eq!(f.status, 400, "{p}");
            assert!(
                f.fault_message
                    .starts_with("Invalid request method and/or path: PUT "),
                "{f}"
            );
        }
        // Firecracker's exact message: the method and the first path segment.
        let f = err("GET", "/nope/deeper", "");
        assert_eq!(f.status, 400);
        assert_eq!(
            f.fault_message,
            "Invalid request method and/or path: GET nope."
        );
        let f = err("DELETE", "/actions", "");
        assert_eq!(f.status, 400);
        assert_eq!(
            f.fault_message,
            "Invalid request method and/or path: DELETE actions."
        );
        assert_eq!(err("POST", "/boot-source", "{}").status, 400);
    }

    #[test]
    fn boot_source() {
        assert!(matches!(
            ok("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#),
            ApiRequest::PutBootSource(_)
        ));
        let f = err("PUT", "/boot-source", "");
        assert_eq!(f.status, 400);
        assert!(f.fault_message.contains("body is required"));
        let f = err("PUT", "/boot-source", "not json");
        assert!(f.fault_message.contains("invalid request body"));
        let f = err(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"/k","foo":1}"#,
        );
        assert!(f.fault_message.contains("foo"), "{f}");
        let f = err("PUT", "/boot-source", r#"{"kernel_image_path":""}"#);
        assert!(f.fault_message.contains("kernel_image_path"), "{f}");
        assert_eq!(err("GET", "/boot-source", "").status, 400);
    }

    #[test]
    fn machine_config() {
        assert!(matches!(
            ok(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":2,"mem_size_mib":128}"#
            ),
            ApiRequest::PutMachineConfig(_)
        ));
        assert!(matches!(
            ok("PATCH", "/machine-config", r#"{"vcpu_count":4}"#),
            ApiRequest::PatchMachineConfig(_)
        ));
        let f = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":64,"mem_size_mib":128}"#,
        );
        assert!(f.fault_message.contains("vcpu_count"), "{f}");
        let f = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":true}"#,
        );
        assert!(f.fault_message.contains("smt") && f.fault_message.contains("not supported"));
        let f = err("PATCH", "/machine-config", r#"{"cpu_template":"C3"}"#);
        assert!(f.fault_message.contains("C3"), "{f}");
        assert_eq!(
            err("PATCH", "/machine-config", r#"{"vcpu_count":-1}"#).status,
            400
        );
        // As Firecracker: a PATCH that changes nothing is refused.
        let f = err("PATCH", "/machine-config", "{}");
        assert_eq!(f.status, 400);
        assert!(f.fault_message.contains("Empty PATCH request"), "{f}");
    }

    #[test]
    fn drives() {
        let r = ok(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":true}"#,
        );
        assert!(matches!(r, ApiRequest::PutDrive(d) if d.is_read_only));
        let f = err(
            "PUT",
            "/drives/other",
            r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true}"#,
        );
        assert!(f.fault_message.contains("does not match"));
        assert!(matches!(
            ok(
                "PATCH",
                "/drives/d",
                r#"{"drive_id":"d","path_on_host":"/n"}"#
            ),
            ApiRequest::PatchDrive(_)
        ));
        assert!(err(
            "PATCH",
            "/drives/x",
            r#"{"drive_id":"d","path_on_host":"/n"}"#
        )
        .fault_message
        .contains("does not match"));
        assert_eq!(err("GET", "/drives/d", "").status, 400);
    }

    #[test]
    fn network() {
        assert!(matches!(
            ok(
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#
            ),
            ApiRequest::PutNetworkInterface(_)
        ));
        assert!(err(
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#
        )
        .fault_message
        .contains("iface_id"));
        assert!(matches!(
            ok(
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0"}"#
            ),
            ApiRequest::PatchNetworkInterface(_)
        ));
        assert!(
            err("PATCH", "/network-interfaces/x", r#"{"iface_id":"eth0"}"#)
                .fault_message
                .contains("does not match")
        );
        assert_eq!(err("GET", "/network-interfaces/eth0", "").status, 400);
        let f = err("PUT", "/vsock", "{}");
        assert_eq!(f.status, 400);
        assert!(f.fault_message.contains("does not implement"));
        assert_eq!(err("PUT", "/balloon/statistics", "{}").status, 400);
    }

    #[test]
    fn actions_and_vm() {
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
            ApiRequest::Action(InstanceActionInfo {
                action_type: ActionType::InstanceStart,
                timeout_s: None
            })
        );
        assert!(matches!(
            ok(
                "PUT",
                "/actions",
                r#"{"action_type":"Shutdown","timeout_s":3}"#
            ),
            ApiRequest::Action(InstanceActionInfo {
                timeout_s: Some(3),
                ..
            })
        ));
        assert!(err("PUT", "/actions", r#"{"action_type":"Explode"}"#)
            .fault_message
            .contains("Explode"));
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Paused"}"#),
            ApiRequest::PatchVm(Vm {
                state: VmState::Paused
            })
        );
        assert_eq!(err("PUT", "/vm", r#"{"state":"Paused"}"#).status, 400);
        assert_eq!(err("PATCH", "/vm", r#"{"state":"Frozen"}"#).status, 400);
    }

    #[test]
    fn logger_metrics() {
        assert!(matches!(
            ok(
                "PUT",
                "/logger",
                r#"{"log_path":"/l","level":"Info","show_level":true,"show_log_origin":true}"#
            ),
            ApiRequest::PutLogger(_)
        ));
        assert!(matches!(
            ok("PUT", "/metrics", r#"{"metrics_path":"/m"}"#),
            ApiRequest::PutMetrics(_)
        ));
        assert_eq!(err("PUT", "/metrics", r#"{"metrics_path":""}"#).status, 400);
    }

    #[test]
    fn snapshots() {
        assert!(matches!(
            ok(
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_type":"Diff","snapshot_path":"/s","mem_file_path":"/m"}"#
            ),
            ApiRequest::CreateSnapshot(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#
            ),
            ApiRequest::LoadSnapshot(_)
        ));
        assert_eq!(
            err("PUT", "/snapshot/load", r#"{"snapshot_path":"/s"}"#).status,
            400
        );
        assert_eq!(err("GET", "/snapshot/create", "").status, 400);
    }

    #[test]
    fn migration() {
        assert!(matches!(
            ok("PUT", "/migration/receive", r#"{"uri":"unix:/tmp/m"}"#),
            ApiRequest::MigrationReceive(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/migration/send",
                r#"{"uri":"tcp:127.0.0.1:9","max_downtime_ms":50}"#
            ),
            ApiRequest::MigrationSend(_)
        ));
        assert_eq!(
            ok("PUT", "/migration/cancel", ""),
            ApiRequest::MigrationCancel
        );
        assert!(err("PUT", "/migration/send", r#"{"uri":"ftp://x"}"#)
            .fault_message
            .contains("uri"));
    }

    #[test]
    fn openapi_lists_every_route() {
        let spec = include_str!("../openapi/wisp.yaml");
        for p in [
            "/",
            "/version",
            "/vm/config",
            "/machine-config",
            "/boot-source",
            "/drives/{drive_id}",
            "/network-interfaces/{iface_id}",
            "/actions",
            "/vm",
            "/logger",
            "/metrics",
            "/snapshot/create",
            "/snapshot/load",
            "/migration",
            "/migration/receive",
            "/migration/send",
            "/migration/cancel",
        ] {
            assert!(
                spec.contains(&format!("\n  {p}:\n")),
                "{p} missing from wisp.yaml"
            );
        }
    }

    #[test]
    fn oversized() {
        let big = vec![b' '; MAX_BODY_LEN + 1];
        let f = route("PUT", "/actions", &big).unwrap_err();
        assert_eq!(f.status, 400);
        assert!(
            f.fault_message.contains("larger than the limit of 65536"),
            "{f}"
        );
        // A lowered limit (the global is left alone: other tests route).
        let f = check_body_len(101, 100).unwrap_err();
        assert_eq!(
            f.fault_message,
            "Request payload with size 101 is larger than the limit of 100 allowed by server."
        );
        assert!(check_body_len(100, 100).is_ok());
        assert!(set_max_body_len(0).is_err());
        assert!(set_max_body_len(MAX_BODY_LEN + 1).is_err());
    }
}
