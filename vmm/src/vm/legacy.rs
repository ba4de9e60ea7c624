//! Legacy devices on the port bus: COM1 (the 16550 in [`crate::serial`]),
//! the debug-exit port and a minimal i8042 whose reset command stops the VM.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmr_proto::LifecycleKind;

use super::{kvm_err, VmError};
use crate::boot::layout;
use crate::bus::{Bus, MmioDevice};
use crate::serial::{SerialDevice, COM1_BASE, COM1_LEN};
use crate::vcpu::ExitRequest;

/// Port of the debug-exit device: a write stops the VM with a `Shutdown`
/// event whose detail carries the value ("guest exit code N").
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 ports 0x60-0x64; writing 0xfe to 0x64 resets (stops) the VM.
pub const I8042_BASE: u16 = 0x60;

/// Debug-exit port device.
struct DebugExit(Arc<ExitRequest>);

impl MmioDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        self.0.request(
            LifecycleKind::Shutdown,
            format!("guest exit code {}", u64::from_le_bytes(v)),
        );
    }
}

/// Minimal i8042: status reads 0 (no data), command 0xfe resets.
struct I8042(Arc<ExitRequest>);

impl MmioDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            self.0
                .request(LifecycleKind::Shutdown, "i8042 reset".into());
        }
    }
}

/// Maps COM1, the debug-exit port and the i8042 on `pio`; with an in-kernel
/// irqchip, the serial interrupt goes to its GSI through an irqfd. Returns
/// the serial port (the VM keeps it for input and snapshots).
pub(super) fn attach(
    fd: &VmFd,
    irqchip: bool,
    pio: &Bus,
    serial: SerialDevice,
    exit: &Arc<ExitRequest>,
) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
    if irqchip {
        fd.register_irqfd(serial.irq_evt(), layout::SERIAL_GSI)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    }
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
    pio.insert(
        u64::from(DEBUG_EXIT_PORT),
        1,
        Arc::new(Mutex::new(DebugExit(exit.clone()))),
    )?;
    pio.insert(
        u64::from(I8042_BASE),
        5,
        Arc::new(Mutex::new(I8042(exit.clone()))),
    )?;
    Ok(serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_requests_a_shutdown_with_the_written_value() {
        let exit = Arc::new(ExitRequest::default());
        let mut d = DebugExit(exit.clone());
        let mut b = [0xffu8; 1];
        d.read(0, &mut b);
        assert_eq!(b, [0]);
        assert!(exit.peek().is_none());
        d.write(0, &[42]);
        assert_eq!(
            exit.peek(),
            Some((LifecycleKind::Shutdown, "guest exit code 42".into()))
        );
        // The first request wins.
        d.write(0, &[1, 0]);
        assert_eq!(exit.peek().map(|r| r.1), Some("guest exit code 42".into()));
    }

    #[test]
    fn i8042_stops_only_on_the_reset_command() {
        let exit = Arc::new(ExitRequest::default());
        let mut k = I8042(exit.clone());
        k.write(0, &[0xfe]);
        k.write(4, &[0xad]);
        assert!(
            exit.peek().is_none(),
            "only 0xfe on the command port resets"
        );
        k.write(4, &[0xfe]);
        assert_eq!(
            exit.peek(),
            Some((LifecycleKind::Shutdown, "i8042 reset".into()))
        );
    }
}
