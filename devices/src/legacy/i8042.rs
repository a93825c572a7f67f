// SPDX-License-Identifier: Apache-2.0
//! A minimal i8042 keyboard controller: the guest's reset request (command
//! 0xfe) ends the VM, and the VMM can inject Ctrl-Alt-Del as keyboard scancodes.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const CTR_KBD_INT: u8 = 0x01;
/// Scancode set 2 make/break codes for Ctrl, Alt, Del (what atkbd reads untranslated).
const CTRL_ALT_DEL: [u8; 10] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x14, 0xf0];
const BUF_MAX: usize = 16;

/// What a snapshot keeps of the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller configuration byte.
    pub control: u8,
    /// The command waiting for its data byte, if any.
    pub pending_cmd: u8,
    /// Bytes waiting to be read from the data port.
    pub out: Vec<u8>,
}

/// The i8042 on ports 0x60 and 0x64.
#[derive(Debug)]
pub struct I8042 {
    state: I8042State,
    reset_evt: EventFd,
    kbd_irq: EventFd,
}

impl I8042 {
    /// A controller signalling `reset_evt` on a reset request and raising
    /// `kbd_irq` when keyboard data is ready.
    pub fn new(reset_evt: EventFd, kbd_irq: EventFd) -> Self {
        Self::from_state(
            I8042State {
                control: CTR_KBD_INT,
                ..Default::default()
            },
            reset_evt,
            kbd_irq,
        )
    }

    /// A controller restored from `state`.
    pub fn from_state(mut state: I8042State, reset_evt: EventFd, kbd_irq: EventFd) -> Self {
        state.out.truncate(BUF_MAX);
        Self {
            state,
            reset_evt,
            kbd_irq,
        }
    }

    /// Its state.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    /// Queues Ctrl-Alt-Del key presses and releases for the guest.
    pub fn trigger_ctrl_alt_del(&mut self) -> std::io::Result<()> {
        if self.state.out.len() + CTRL_ALT_DEL.len() > BUF_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "i8042 buffer full",
            ));
        }
        self.state.out.extend_from_slice(&CTRL_ALT_DEL);
        self.raise()
    }

    fn raise(&self) -> std::io::Result<()> {
        if self.state.control & CTR_KBD_INT != 0 && !self.state.out.is_empty() {
            self.kbd_irq.write(1)?;
        }
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        match offset {
            DATA if !self.state.out.is_empty() => {
                *b = self.state.out.remove(0);
                let _ = self.raise();
            }
            COMMAND => {
                *b = STATUS_SYSTEM
                    | if self.state.out.is_empty() {
                        0
                    } else {
                        STATUS_OUT_FULL
                    };
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match (offset, v) {
            (COMMAND, CMD_RESET_CPU) => {
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("Cannot signal the guest's reset request: {e}");
                }
            }
            (COMMAND, CMD_READ_CTR) if self.state.out.len() < BUF_MAX => {
                self.state.out.push(self.state.control);
            }
            (COMMAND, CMD_WRITE_CTR) => self.state.pending_cmd = CMD_WRITE_CTR,
            (DATA, _) if self.state.pending_cmd == CMD_WRITE_CTR => {
                self.state.control = v;
                self.state.pending_cmd = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, EventFd, EventFd) {
        let r = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let k = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (
            I8042::new(r.try_clone().unwrap(), k.try_clone().unwrap()),
            r,
            k,
        )
    }

    #[test]
    fn test_i8042_reset_command_signals_reset() {
        let (mut d, r, _) = dev();
        assert!(r.read().is_err());
        d.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(r.read().unwrap(), 1);
    }

    #[test]
    fn test_i8042_ctrl_alt_del_is_readable_with_irq() {
        let (mut d, _, k) = dev();
        d.trigger_ctrl_alt_del().unwrap();
        assert!(k.read().unwrap() >= 1);
        let mut st = [0u8];
        d.read(COMMAND, &mut st);
        assert_eq!(st[0] & STATUS_OUT_FULL, STATUS_OUT_FULL);
        let mut got = Vec::new();
        for _ in 0..CTRL_ALT_DEL.len() {
            let mut b = [0u8];
            d.read(DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
        d.read(COMMAND, &mut st);
        assert_eq!(st[0] & STATUS_OUT_FULL, 0);
    }
}
