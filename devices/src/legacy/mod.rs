// SPDX-License-Identifier: Apache-2.0
//! Legacy PC devices a microVM needs: the serial console, the i8042 reset line
//! and the ACPI power-management registers.

mod acpi_pm;
mod ged;
mod i8042;
mod serial;

pub use acpi_pm::{AcpiPm, AcpiPmState};
pub use ged::{Ged, GedState, GED_POWER_BUTTON};
pub use i8042::{I8042State, I8042};
pub use serial::{EventFdTrigger, SerialDevice, SerialDeviceState};
