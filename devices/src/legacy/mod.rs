// SPDX-License-Identifier: Apache-2.0
//! Legacy PC devices a microVM needs: the serial console, the i8042 reset line
//! and the ACPI power-management registers.
