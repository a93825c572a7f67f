// SPDX-License-Identifier: Apache-2.0
//! The 8250/16550 UART on COM1 (the register model is `vm-superio`'s), with its
//! interrupt on an irqfd and its output to any writer.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// An eventfd as a `vm-superio` interrupt trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals an eventfd when the guest has drained the input FIFO, so the VMM can
/// resume reading the console without spinning while the FIFO is full.
#[derive(Debug, Clone)]
struct InputDrained(Arc<EventFd>);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Losing this wake-up only delays input until the next key press.
        let _ = self.0.write(1);
    }
}

/// What a snapshot keeps of the UART: its registers and pending input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

type Uart = Serial<EventFdTrigger, InputDrained, Box<dyn Write + Send>>;

/// COM1.
pub struct SerialDevice {
    uart: Uart,
    drained: Arc<EventFd>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let uart = Serial::with_events(EventFdTrigger(irq), InputDrained(drained.clone()), out);
        Ok(Self { uart, drained })
    }

    /// A UART restored from `state`.
    pub fn from_state(
        state: &SerialDeviceState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> std::io::Result<Self> {
        let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let uart = Serial::from_state(
            &state.into(),
            EventFdTrigger(irq),
            InputDrained(drained.clone()),
            out,
        )
        .map_err(|e| std::io::Error::other(format!("Invalid serial state: {e:?}")))?;
        Ok(Self { uart, drained })
    }

    /// Signalled when the guest empties the input FIFO.
    pub fn input_drained_evt(&self) -> &EventFd {
        &self.drained
    }

    /// Free space in the input FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues console input for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// The registers and pending input.
    pub fn state(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    /// Flushes guest output written so far.
    pub fn flush_output(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *b) {
                log::warn!("Serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_serial_output_input_and_state_roundtrip() {
        let cap = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(cap.clone())).unwrap();
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*cap.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then feed input.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let st = s.state();
        assert_eq!(st.in_buffer, b"ab");
        let json = serde_json::to_string(&st).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        let mut r = SerialDevice::from_state(&back, irq, Box::new(std::io::sink())).unwrap();
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
        assert_eq!(r.state().in_buffer, b"b");
    }

    #[test]
    fn test_serial_input_never_exceeds_fifo() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq, Box::new(std::io::sink())).unwrap();
        let big = vec![b'x'; 1000];
        let taken = s.enqueue_input(&big);
        assert!(taken > 0 && taken < 1000);
        assert_eq!(s.enqueue_input(&big), 0);
        assert_eq!(s.input_room(), 0);
    }
}
