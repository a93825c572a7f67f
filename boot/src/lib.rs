// SPDX-License-Identifier: Apache-2.0
//! x86_64 boot: guest memory layout, kernel loading, boot parameters, initial
//! CPU state, CPUID and the MP/ACPI tables.
//!
//! Everything here is a pure function over guest memory or plain values; nothing
//! touches a vCPU or VM file descriptor, so the VMM decides when to apply it.

pub mod acpi;
pub mod cpu;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod params;

mod error;
pub use error::BootError;
