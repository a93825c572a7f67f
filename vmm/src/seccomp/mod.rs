// SPDX-License-Identifier: Apache-2.0
//! seccomp-BPF filters for the threads that read untrusted input from a
//! socket: the API server (`wisp-api`), the migration receiver
//! (`wisp-migrate-recv`) and the migration sender (`wisp-migrate-send`).
//!
//! The allow-lists live in `policy.json` (seccompiler's JSON format), which is
//! embedded in the binary and compiled when the VMM starts. Each thread
//! installs its own filter (without TSYNC, so other threads keep theirs)
//! before it reads anything from its peer; any other system call kills the
//! process (`SIGSYS`), as with Firecracker. `--no-seccomp` turns them off.
//!
//! Opening files: glibc's malloc may open `/proc/sys/vm/overcommit_memory`
//! from any thread when it trims a heap, and copes if that fails. So the API
//! and receiver threads also get the `deny_open` filter, which turns every
//! open into `EACCES` (the kernel applies the strictest answer of all the
//! filters: their own allows `openat`, `deny_open` refuses it). The sender
//! reads `/proc/self/pagemap`, so its filter allows read-only, non-creating
//! opens instead.
//! The vCPU threads and the main event loop have no filter yet.

use std::collections::HashMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, TargetArch};

/// The filter stacked on the API and receiver filters (see above).
const DENY_OPEN: &str = "deny_open";

/// The embedded policy.
pub const POLICY: &str = include_str!("policy.json");

/// A thread kind with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The HTTP API server.
    Api,
    /// The thread receiving an incoming migration.
    MigrationReceiver,
    /// The thread sending this VM away (after it connected).
    MigrationSender,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 3] = [
        ThreadKind::Api,
        ThreadKind::MigrationReceiver,
        ThreadKind::MigrationSender,
    ];

    /// Whether `deny_open` is installed with it.
    fn denies_open(self) -> bool {
        !matches!(self, ThreadKind::MigrationSender)
    }

    /// Its name in `policy.json`.
    pub fn policy_name(self) -> &'static str {
        match self {
            ThreadKind::Api => "api",
            ThreadKind::MigrationReceiver => "migration_receiver",
            ThreadKind::MigrationSender => "migration_sender",
        }
    }
}

/// Why a filter could not be compiled or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy does not compile.
    #[error("Cannot compile the seccomp policy: {0}")]
    Compile(String),
    /// The policy has no filter for a thread kind.
    #[error("The seccomp policy has no filter for '{0}'")]
    Missing(&'static str),
    /// The kernel refused the filter.
    #[error("Cannot install the '{kind}' seccomp filter: {reason}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// The error.
        reason: String,
    },
}

/// The compiled filters; cheap to clone into threads.
#[derive(Debug, Clone)]
pub struct Filters(Arc<HashMap<String, BpfProgram>>);

impl Filters {
    /// Compiles the embedded policy; every thread kind must have a filter.
    pub fn embedded() -> Result<Self, SeccompError> {
        Self::compile(POLICY)
    }

    /// Compiles a policy in seccompiler's JSON format.
    pub fn compile(json: &str) -> Result<Self, SeccompError> {
        let map = seccompiler::compile_from_json(json.as_bytes(), arch())
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        for name in ThreadKind::ALL
            .iter()
            .map(|k| k.policy_name())
            .chain([DENY_OPEN])
        {
            if !map.contains_key(name) {
                return Err(SeccompError::Missing(name));
            }
        }
        Ok(Self(Arc::new(map)))
    }

    /// Installs `kind`'s filter on the calling thread (for good).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        if kind.denies_open() {
            self.apply(DENY_OPEN)?;
        }
        self.apply(kind.policy_name())
    }

    fn apply(&self, name: &'static str) -> Result<(), SeccompError> {
        let prog = self.0.get(name).ok_or(SeccompError::Missing(name))?;
        seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install {
            kind: name,
            reason: e.to_string(),
        })?;
        log::debug!("seccomp filter '{name}' installed");
        Ok(())
    }
}

/// Installs `kind`'s filter from `filters`, if any (`None`: `--no-seccomp`).
pub fn install(filters: Option<&Filters>, kind: ThreadKind) -> Result<(), SeccompError> {
    match filters {
        Some(f) => f.install(kind),
        None => Ok(()),
    }
}

#[cfg(target_arch = "x86_64")]
fn arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(target_arch = "aarch64")]
fn arch() -> TargetArch {
    TargetArch::aarch64
}

#[cfg(test)]
mod tests;
