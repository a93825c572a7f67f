// SPDX-License-Identifier: Apache-2.0
//! The ACPI Generic Event Device of a hardware-reduced platform: one event
//! register (an I/O port) and an interrupt line. The DSDT's `_EVT` method reads
//! the register and turns bit 0 into a power-button notification, which is how
//! the VMM asks the guest to shut down in an orderly way.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1;

/// What a snapshot keeps of the GED: the events not yet read by the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    /// Pending event bits.
    pub pending: u8,
}

/// The GED register.
#[derive(Debug)]
pub struct Ged {
    state: GedState,
    irq: EventFd,
}

impl Ged {
    /// A GED raising `irq` (an irqfd) on events.
    pub fn new(irq: EventFd) -> Self {
        Self {
            state: GedState::default(),
            irq,
        }
    }

    /// Presses the power button.
    pub fn power_button(&mut self) -> std::io::Result<()> {
        self.state.pending |= GED_POWER_BUTTON;
        self.irq.write(1)
    }

    /// Its state.
    pub fn state(&self) -> GedState {
        self.state
    }

    /// Restores its state.
    pub fn restore(&mut self, state: GedState) {
        self.state = state;
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                // Reading the register acknowledges the events it reports.
                *b = std::mem::take(&mut self.state.pending);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ged_power_button_interrupts_and_read_acks() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut g = Ged::new(irq.try_clone().unwrap());
        g.power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(g.state().pending, GED_POWER_BUTTON);
        let mut b = [0u8];
        g.read(0, &mut b);
        assert_eq!(b[0], GED_POWER_BUTTON);
        g.read(0, &mut b);
        assert_eq!(b[0], 0);
    }
}
