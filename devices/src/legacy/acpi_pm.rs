// SPDX-License-Identifier: Apache-2.0
//! The hardware-reduced ACPI sleep control/status and reset register (one I/O
//! port, declared in the FADT): S5 ends the VM as a power-off, the reset value
//! as a reboot.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// What a snapshot keeps of the register (nothing changes until the VM ends,
/// but the state is explicit so every device has one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// The last byte written.
    pub last: u8,
}

/// The sleep/reset register.
#[derive(Debug)]
pub struct AcpiPm {
    state: AcpiPmState,
    s5_slp_typ: u8,
    reset_value: u8,
    poweroff_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiPm {
    /// A register that signals `poweroff_evt` when the guest enters S5
    /// (`s5_slp_typ`) and `reset_evt` when it writes `reset_value`.
    pub fn new(s5_slp_typ: u8, reset_value: u8, poweroff_evt: EventFd, reset_evt: EventFd) -> Self {
        Self {
            state: AcpiPmState::default(),
            s5_slp_typ,
            reset_value,
            poweroff_evt,
            reset_evt,
        }
    }

    /// Its state.
    pub fn state(&self) -> AcpiPmState {
        self.state
    }

    /// Restores its state.
    pub fn restore(&mut self, state: AcpiPmState) {
        self.state = state;
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The sleep status register: wake status is never set.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset != 0 {
            return;
        }
        self.state.last = v;
        let evt = if v == self.reset_value {
            &self.reset_evt
        } else if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_slp_typ {
            &self.poweroff_evt
        } else {
            return;
        };
        if let Err(e) = evt.write(1) {
            log::error!("Cannot signal the guest's power request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_acpi_pm_s5_powers_off_and_reset_value_resets() {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rst = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pm = AcpiPm::new(5, 1, off.try_clone().unwrap(), rst.try_clone().unwrap());
        pm.write(0, &[5 << 2]); // SLP_TYP without SLP_EN: nothing
        assert!(off.read().is_err());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(off.read().unwrap(), 1);
        pm.write(0, &[1]);
        assert_eq!(rst.read().unwrap(), 1);
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        assert!(off.read().is_err());
        assert_eq!(pm.state().last, (3 << 2) | SLP_EN);
    }
}
