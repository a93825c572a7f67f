// SPDX-License-Identifier: Apache-2.0
//! The address buses (port I/O and MMIO) that route vCPU exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a range of port or MMIO addresses.
///
/// `offset` is relative to the start of the range the device was inserted at.
/// Accesses are 1, 2, 4 or 8 bytes; a device ignores sizes it does not support
/// (reads then return zeros, as unclaimed hardware would).
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    #[error("Invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First address.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("Bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges mapped to devices.
#[derive(Default, Clone)]
pub struct Bus {
    // base -> (len, device)
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, (l, _))| (*b, *l)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((b, (l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` within its range.
    pub fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((dev, offset))
    }

    /// Dispatches a read; returns false if no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler
/// panicked on another thread keeps its last consistent state.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn test_bus_routes_by_offset_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x3fc, 8),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x3f0, 9),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert!(bus.insert(dev.clone(), 0x3f0, 8).is_ok());
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![7])]);
    }
}
