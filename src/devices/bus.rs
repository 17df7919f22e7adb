//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What a device write may ask of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitRequest {
    /// Stop the VM with this exit status (the debug-exit port).
    Status(u8),
    /// The guest asked for a reset (i8042 pulse); ebb treats it as the end of the VM.
    Reset,
}

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// Handles a read; `data` is pre-filled with 0xff (a floating bus).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write; may ask the VM to stop.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<ExitRequest>;
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges to devices. Built before the vCPUs start, then only read.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
    unhandled: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if before.is_some_and(|(&b, &(l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range.
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Reads from the device at `addr`; returns false (and leaves 0xff) if there is none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0xff);
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock().unwrap_or_else(PoisonError::into_inner).read(offset, data);
                true
            }
            None => {
                self.note_unhandled(addr, "read");
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to nothing are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<ExitRequest> {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock().unwrap_or_else(PoisonError::into_inner).write(offset, data)
            }
            None => {
                self.note_unhandled(addr, "write");
                None
            }
        }
    }

    /// Accesses that hit no device so far.
    pub fn unhandled_count(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn note_unhandled(&self, addr: u64, what: &str) {
        self.unhandled.fetch_add(1, Ordering::Relaxed);
        log::trace!("unhandled {what} at {addr:#x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> Option<ExitRequest> {
            self.0.extend_from_slice(data);
            None
        }
    }

    fn echo() -> SharedDevice {
        Arc::new(Mutex::new(Echo(Vec::new())))
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, echo()).unwrap();
        assert_eq!(bus.insert(0x17, 2, echo()), Err(BusError::Overlap { base: 0x17, len: 2 }));
        assert_eq!(bus.insert(0x08, 9, echo()), Err(BusError::Overlap { base: 0x08, len: 9 }));
        assert!(bus.insert(0x18, 1, echo()).is_ok());
        assert!(bus.insert(0x08, 8, echo()).is_ok());
        assert_eq!(bus.insert(0x100, 0, echo()), Err(BusError::Empty(0x100)));
    }

    #[test]
    fn reads_reach_the_device_with_its_offset() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, echo()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
    }

    #[test]
    fn accesses_straddling_the_end_or_missing_are_unhandled() {
        let mut bus = Bus::new();
        bus.insert(0x60, 1, echo()).unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.read(0x60, &mut b), "a 2-byte read of a 1-byte range");
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.read(0x9999, &mut b));
        assert_eq!(bus.write(0x9999, &[1]), None);
        assert_eq!(bus.unhandled_count(), 3);
    }
}
