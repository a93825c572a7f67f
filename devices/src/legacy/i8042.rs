// SPDX-License-Identifier: Apache-2.0
//! A minimal i8042 keyboard controller: the guest's reset request (command
//! 0xfe) ends the VM, and the VMM can inject Ctrl-Alt-Del as keyboard scancodes.
//!
//! It answers what Linux's i8042 and atkbd drivers ask at probe time: the
//! status register (never 0xff, which means "no controller"), reading and
//! writing the configuration byte (CTR), the controller and keyboard-port
//! self-tests, enabling and disabling the ports, the output port (A20), and
//! the keyboard's own commands (reset, identify, LEDs, typematic rate,
//! enable...), which a keyboard acknowledges with 0xfa. There is no AUX
//! (mouse) port.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
// Controller commands (written to port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;
const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// Output port: reset line released (bit 0), A20 enabled (bit 1).
const OUTPUT_PORT: u8 = 0x03;
// Keyboard commands (written to port 0x60 with no controller command pending).
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
/// What an MF2 keyboard answers to "identify".
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Scancode set reported (the CTR never enables translation).
const KBD_SET: u8 = 2;
const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
/// Keyboard not inhibited (no keylock).
const STATUS_UNLOCKED: u8 = 0x10;
const CTR_KBD_INT: u8 = 0x01;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
/// Scancode set 2 make/break codes for Ctrl, Alt, Del (what atkbd reads untranslated).
const CTRL_ALT_DEL: [u8; 10] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x14, 0xf0];
const BUF_MAX: usize = 16;

/// What a snapshot keeps of the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller configuration byte.
    pub control: u8,
    /// The command waiting for its data byte, if any: a controller command
    /// (0x60, 0xd1, 0xd2) or a keyboard command taking a parameter (0xed,
    /// 0xf0, 0xf3); the two sets do not overlap.
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

impl I8042 {
    /// Queues `bytes` for the data port (dropping what does not fit: a real
    /// controller's buffer is one byte) and raises the interrupt.
    fn reply(&mut self, bytes: &[u8]) {
        let room = BUF_MAX.saturating_sub(self.state.out.len());
        self.state.out.extend(bytes.iter().take(room));
        let _ = self.raise();
    }

    fn controller_command(&mut self, cmd: u8) {
        let ctr = &mut self.state.control;
        match cmd {
            CMD_RESET_CPU => {
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("Cannot signal the guest's reset request: {e}");
                }
            }
            CMD_READ_CTR => {
                let v = *ctr;
                self.reply(&[v]);
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF => self.state.pending_cmd = cmd,
            CMD_SELF_TEST => self.reply(&[SELF_TEST_OK]),
            CMD_KBD_TEST => self.reply(&[KBD_TEST_OK]),
            CMD_KBD_DISABLE => *ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => *ctr &= !CTR_KBD_DISABLED,
            CMD_AUX_DISABLE => *ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => *ctr &= !CTR_AUX_DISABLED,
            CMD_READ_OUTP => self.reply(&[OUTPUT_PORT]),
            // 0xff (null command) and whatever else: nothing to do.
            _ => {}
        }
    }

    fn data_write(&mut self, v: u8) {
        let pending = std::mem::take(&mut self.state.pending_cmd);
        match pending {
            CMD_WRITE_CTR => self.state.control = v,
            // The output port's reset and A20 lines are not modelled.
            CMD_WRITE_OUTP => {}
            CMD_WRITE_KBD_OUTBUF => self.reply(&[v]),
            KBD_SCANCODE_SET if v == 0 => self.reply(&[KBD_ACK, KBD_SET]),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => self.reply(&[KBD_ACK]),
            _ => self.keyboard_command(v),
        }
    }

    /// A byte for the keyboard itself.
    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            KBD_RESET => {
                self.state.out.clear();
                self.reply(&[KBD_ACK, KBD_SELF_TEST_OK]);
            }
            KBD_GET_ID => self.reply(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_ECHO => self.reply(&[KBD_ECHO]),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => {
                self.state.pending_cmd = cmd;
                self.reply(&[KBD_ACK]);
            }
            // Enable, disable, set defaults, typematic modes...: acknowledged.
            _ => self.reply(&[KBD_ACK]),
        }
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
                    | STATUS_UNLOCKED
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
        match offset {
            COMMAND => self.controller_command(v),
            DATA => self.data_write(v),
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

    /// Everything waiting on the data port.
    fn drain(d: &mut I8042) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            let mut st = [0u8];
            d.read(COMMAND, &mut st);
            if st[0] & STATUS_OUT_FULL == 0 {
                return got;
            }
            let mut b = [0u8];
            d.read(DATA, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn test_i8042_controller_commands_linux_probes() {
        let (mut d, r, k) = dev();
        // i8042_controller_check: a status of 0xff means "no controller".
        let mut st = [0u8];
        d.read(COMMAND, &mut st);
        assert_ne!(st[0], 0xff);
        assert_eq!(st[0] & STATUS_UNLOCKED, STATUS_UNLOCKED, "no keylock");
        assert_eq!(st[0] & STATUS_OUT_FULL, 0);
        // Self-test, keyboard port test, output port.
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut d), [SELF_TEST_OK]);
        d.write(COMMAND, &[CMD_KBD_TEST]);
        assert_eq!(drain(&mut d), [KBD_TEST_OK]);
        d.write(COMMAND, &[CMD_READ_OUTP]);
        assert_eq!(drain(&mut d), [OUTPUT_PORT]);
        // Writing the output port (A20, as Linux does) consumes its data byte.
        d.write(COMMAND, &[CMD_WRITE_OUTP]);
        d.write(DATA, &[0xdf]);
        d.write(COMMAND, &[0xff]);
        assert_eq!(drain(&mut d), [] as [u8; 0]);
        // CTR read, write, read back; port disable/enable bits.
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut d), [CTR_KBD_INT]);
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[CTR_KBD_DISABLED]);
        assert_eq!(d.state().control, CTR_KBD_DISABLED);
        d.write(COMMAND, &[CMD_KBD_ENABLE]);
        d.write(COMMAND, &[CMD_AUX_DISABLE]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut d), [CTR_AUX_DISABLED]);
        d.write(COMMAND, &[CMD_KBD_DISABLE]);
        d.write(COMMAND, &[CMD_AUX_ENABLE]);
        assert_eq!(d.state().control, CTR_KBD_DISABLED);
        // With the keyboard interrupt off, replies raise no interrupt.
        let _ = k.read();
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert!(k.read().is_err());
        // The byte written with 0xd2 comes back as keyboard data.
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[CTR_KBD_INT]);
        d.write(COMMAND, &[CMD_WRITE_KBD_OUTBUF]);
        d.write(DATA, &[0x42]);
        assert!(k.read().unwrap() >= 1);
        assert_eq!(drain(&mut d), [SELF_TEST_OK, 0x42]);
        assert!(r.read().is_err(), "no reset requested");
    }

    #[test]
    fn test_i8042_keyboard_answers_atkbd_probe() {
        let (mut d, _, k) = dev();
        d.write(DATA, &[KBD_RESET]);
        assert_eq!(drain(&mut d), [KBD_ACK, KBD_SELF_TEST_OK]);
        d.write(DATA, &[KBD_GET_ID]);
        assert!(k.read().unwrap() >= 1, "replies interrupt");
        assert_eq!(drain(&mut d), [KBD_ACK, 0xab, 0x83]);
        // A parameter is acknowledged, never taken for a command (0xf2 here).
        for cmd in [KBD_SET_LEDS, KBD_SET_RATE] {
            d.write(DATA, &[cmd]);
            d.write(DATA, &[KBD_GET_ID]);
            assert_eq!(drain(&mut d), [KBD_ACK, KBD_ACK], "{cmd:#x}");
        }
        d.write(DATA, &[KBD_SCANCODE_SET]);
        d.write(DATA, &[0]);
        assert_eq!(drain(&mut d), [KBD_ACK, KBD_ACK, KBD_SET]);
        d.write(DATA, &[KBD_ECHO]);
        assert_eq!(drain(&mut d), [KBD_ECHO]);
        // Enable scanning, disable, defaults: acknowledged.
        for cmd in [0xf4, 0xf5, 0xf6] {
            d.write(DATA, &[cmd]);
            assert_eq!(drain(&mut d), [KBD_ACK], "{cmd:#x}");
        }
        // Replies never overflow the buffer.
        for _ in 0..BUF_MAX {
            d.write(DATA, &[KBD_GET_ID]);
        }
        assert_eq!(drain(&mut d).len(), BUF_MAX);
    }

    #[test]
    fn test_i8042_state_round_trip_keeps_pending_parameter() {
        let (mut d, _, _) = dev();
        d.write(DATA, &[KBD_SET_LEDS]);
        let _ = drain(&mut d);
        let (r, k) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        let mut d2 = I8042::from_state(d.state(), r, k);
        d2.write(DATA, &[KBD_GET_ID]);
        assert_eq!(drain(&mut d2), [KBD_ACK], "taken as the LED parameter");
    }
}
