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
pub mod signals;
pub mod terminal;
pub mod vmm;
pub mod vstate;

pub use builder::{build_vm, BuildError};
pub use vmm::{Outcome, Vmm};
