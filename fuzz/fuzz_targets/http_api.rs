// SPDX-License-Identifier: Apache-2.0
//! Fuzzes the API's request routing and body parsing, and the config-file parser.
//!
//! Input layout: byte 0 picks the method, then the path up to the first `\n`,
//! then the body. Routing must never panic, must answer only 4xx faults, and
//! every accepted request must round-trip through its own JSON form.

#![no_main]

use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "get"];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(sel) % METHODS.len()];
    let (path, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let path = String::from_utf8_lossy(path);
    match api::route(method, &path, body) {
        Ok(req) => {
            // Accepted requests carry valid models: re-route their JSON.
            let again = match &req {
                api::ApiRequest::PutBootSource(b) => {
                    Some(("PUT", "/boot-source".to_owned(), serde_json::to_vec(b)))
                }
                api::ApiRequest::PutMachineConfig(m) => {
                    Some(("PUT", "/machine-config".to_owned(), serde_json::to_vec(m)))
                }
                api::ApiRequest::PutDrive(d) => Some((
                    "PUT",
                    format!("/drives/{}", d.drive_id),
                    serde_json::to_vec(d),
                )),
                api::ApiRequest::PutNetworkInterface(n) => Some((
                    "PUT",
                    format!("/network-interfaces/{}", n.iface_id),
                    serde_json::to_vec(n),
                )),
                api::ApiRequest::Action(a) => {
                    Some(("PUT", "/actions".to_owned(), serde_json::to_vec(a)))
                }
                api::ApiRequest::LoadSnapshot(s) => {
                    Some(("PUT", "/snapshot/load".to_owned(), serde_json::to_vec(s)))
                }
                _ => None,
            };
            if let Some((m, p, Ok(b))) = again {
                assert_eq!(api::route(m, &p, &b).ok(), Some(req));
            }
        }
        Err(fault) => {
            assert!((400..500).contains(&fault.status), "{fault}");
            assert!(!fault.fault_message.is_empty());
        }
    }
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = api::models::FullVmConfig::from_json(text);
    }
});
