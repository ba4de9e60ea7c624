//! The MMIO and port-I/O buses: address ranges mapped to device handlers.
//!
//! A vCPU that exits on an MMIO or PIO access looks the address up here and
//! calls the device with the offset into its range. Devices are shared
//! (`Arc<Mutex<_>>`) because any vCPU thread may call them.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmr_vmm::bus::{Bus, MmioDevice};
//!
//! struct Scratch([u8; 8]);
//! impl MmioDevice for Scratch {
//!     fn read(&mut self, offset: u64, data: &mut [u8]) {
//!         let o = offset as usize;
//!         data.copy_from_slice(&self.0[o..o + data.len()]);
//!     }
//!     fn write(&mut self, offset: u64, data: &[u8]) {
//!         let o = offset as usize;
//!         self.0[o..o + data.len()].copy_from_slice(data);
//!     }
//! }
//!
//! let bus = Bus::new("mmio");
//! bus.insert(0xd000_0000, 8, Arc::new(Mutex::new(Scratch([0; 8])))).unwrap();
//! assert!(bus.write(0xd000_0004, &[7]));
//! let mut b = [0u8];
//! assert!(bus.read(0xd000_0004, &mut b));
//! assert_eq!(b, [7]);
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range the
/// device was inserted at; `data.len()` is the access width (1, 2, 4 or 8).
///
/// The same trait serves the MMIO and the port-I/O bus.
pub trait MmioDevice: Send {
    /// A guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Alias for devices on either bus.
pub use MmioDevice as BusDevice;

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn MmioDevice>>;

/// Errors changing a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps a device already on the bus.
    #[error("{bus} range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Bus name.
        bus: &'static str,
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range is empty or wraps around.
    #[error("{bus} range {base:#x}+{len:#x} is invalid")]
    BadRange {
        /// Bus name.
        bus: &'static str,
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Nothing is mapped at the address.
    #[error("no device at {bus} address {0:#x}", bus = .1)]
    NotFound(u64, &'static str),
}

/// Description of a virtio-mmio device, for the kernel command line and
/// ACPI tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Name for logs.
    pub name: String,
    /// Guest physical base of its register window.
    pub mmio_base: u64,
    /// Window length.
    pub mmio_len: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// A bus: non-overlapping address ranges, each with a device.
pub struct Bus {
    name: &'static str,
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self
            .devices
            .read()
            .map(|d| d.iter().map(|(b, e)| (*b, e.len)).collect())
            .unwrap_or_default();
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &ranges)
            .finish()
    }
}

impl Bus {
    /// An empty bus named `name` (for errors and logs).
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            devices: RwLock::new(BTreeMap::new()),
        }
    }

    /// Maps `dev` at `base..base+len`.
    pub fn insert(&self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let bad = BusError::BadRange {
            bus: self.name,
            base,
            len,
        };
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(bad)?;
        let mut map = self.devices.write().unwrap_or_else(|p| p.into_inner());
        if let Some((b, e)) = map.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap {
                    bus: self.name,
                    base,
                    len,
                });
            }
        }
        map.insert(base, Entry { len, dev });
        Ok(())
    }

    /// Unmaps the device at `base`; returns it.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut map = self.devices.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&base)
            .map(|e| e.dev)
            .ok_or(BusError::NotFound(base, self.name))
    }

    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let map = self.devices.read().unwrap_or_else(|p| p.into_inner());
        let (base, e) = map.range(..=addr).next_back()?;
        (addr - base < e.len).then(|| (addr - base, Arc::clone(&e.dev)))
    }

    /// Dispatches a read; returns false when nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rec(Vec<(u64, Vec<u8>)>);
    impl MmioDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let bus = Bus::new("pio");
        let a = Arc::new(Mutex::new(Rec(vec![])));
        bus.insert(0x3f8, 8, a.clone()).expect("free");
        assert!(matches!(
            bus.insert(0x3fc, 8, Arc::new(Mutex::new(Rec(vec![])))),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x3f0, 9, Arc::new(Mutex::new(Rec(vec![])))),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x3f0, 8, Arc::new(Mutex::new(Rec(vec![]))))
            .expect("adjacent is fine");
        assert!(matches!(
            bus.insert(0, 0, a.clone()),
            Err(BusError::BadRange { .. })
        ));
        let mut d = [0u8; 2];
        assert!(bus.read(0x3fb, &mut d));
        assert_eq!(d, [3, 3]);
        assert!(bus.write(0x3f9, &[1]));
        assert!(!bus.write(0x400, &[1]));
        assert_eq!(a.lock().expect("not poisoned").0, vec![(1, vec![1])]);
        bus.remove(0x3f8).expect("present");
        assert!(!bus.write(0x3f9, &[1]));
    }
}
