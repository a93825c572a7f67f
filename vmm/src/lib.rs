// SPDX-License-Identifier: Apache-2.0
//! wisp's VMM: building a VM from a configuration, running its vCPUs and
//! device event loop, and ending it cleanly.

pub mod builder;
pub mod config;
pub mod device_manager;
pub mod host_quirks;
pub mod live_migration;
pub mod logger;
pub mod metrics;
pub mod migration;
pub mod persist;
pub mod preboot;
pub mod registry;
pub mod runtime;
pub mod seccomp;
pub mod serial_socket;
pub mod signals;
pub mod tap_handover;
pub mod terminal;
pub mod vmm;
pub mod vstate;

pub use builder::{build_vm, BuildError};
pub use vmm::{Outcome, Vmm};

/// An error and its sources on one line, without repeating a source the
/// message already contains.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    msg
}
