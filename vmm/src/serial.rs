//! The COM1 16550 UART (vm-superio) on ports 0x3f8-0x3ff. Output goes to a
//! writer; the interrupt goes to an eventfd that the VM wires to GSI 4 with
//! an irqfd when it has an in-kernel irqchip.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::MmioDevice;

/// First port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports.
pub const COM1_LEN: u64 = 8;

/// Errors of the serial port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating the interrupt eventfd failed.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// The saved state is invalid.
    #[error("invalid serial state: {0}")]
    State(String),
}

/// An eventfd as the UART's interrupt line.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that appends to a shared buffer (for tests and for callers that
/// want to look at the console).
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(pub Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where console output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The saved registers of the UART.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
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

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
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

/// The COM1 device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART in its reset state writing to `out`.
    pub fn new(out: SerialOut) -> Result<Self, SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(SerialDevice {
            uart: Serial::new(IrqTrigger(evt), out),
        })
    }

    /// A UART with saved registers writing to `out`.
    pub fn from_snapshot(state: &SerialSnapshot, out: SerialOut) -> Result<Self, SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let uart = Serial::from_state(&SerialState::from(state), IrqTrigger(evt), NoEvents, out)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(SerialDevice { uart })
    }

    /// The interrupt eventfd (for an irqfd on GSI 4).
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// The registers.
    pub fn snapshot(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Queues input bytes for the guest.
    pub fn enqueue(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| SerialError::State(format!("{e:?}")))
    }
}

impl MmioDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                tracing::debug!(error = ?e, "serial write failed");
            }
            if offset == 0 {
                // Line-buffered consoles would lag behind the guest otherwise.
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_the_output_and_state_round_trips() {
        let buf = SharedBuffer::default();
        let mut s = SerialDevice::new(Box::new(buf.clone())).expect("eventfd");
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        s.write(7, &[0x5a]); // scratch
        s.write(3, &[0x03]); // LCR: 8N1
        assert_eq!(buf.contents(), b"hi");
        let snap = s.snapshot();
        let json = serde_json::to_vec(&snap).expect("serializable");
        let back: SerialSnapshot = serde_json::from_slice(&json).expect("parses");
        assert_eq!(back, snap);
        let mut r =
            SerialDevice::from_snapshot(&back, Box::new(std::io::sink())).expect("valid state");
        let mut d = [0u8];
        r.read(7, &mut d);
        assert_eq!(d, [0x5a]);
        assert_eq!(r.snapshot(), snap);
    }

    #[test]
    fn oversized_input_fifo_is_refused() {
        let snap = SerialSnapshot {
            in_buffer: vec![0; 100_000],
            ..SerialDevice::new(Box::new(std::io::sink()))
                .expect("eventfd")
                .snapshot()
        };
        assert!(SerialDevice::from_snapshot(&snap, Box::new(std::io::sink())).is_err());
    }
}
