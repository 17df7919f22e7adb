//! The i8042 keyboard controller, reduced to what a guest uses to reset the machine.
//!
//! Linux with `reboot=k` pulses the reset line by writing 0xfe to the command port; ebb
//! turns that into the end of the VM (exit status 0).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::bus::{BusDevice, ExitRequest};

/// The i8042 data port (0x60); the command/status port is at +4 (0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60-0x64.
pub const I8042_LEN: u64 = 5;

/// Trigger that records the reset request.
#[derive(Debug, Default, Clone)]
pub struct ResetFlag(Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The controller on the port bus.
pub struct I8042 {
    inner: I8042Device<ResetFlag>,
    reset: ResetFlag,
}

impl I8042 {
    /// A controller with no key pressed and reset not requested.
    pub fn new() -> Self {
        let reset = ResetFlag::default();
        Self { inner: I8042Device::new(reset.clone()), reset }
    }
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<ExitRequest> {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            // Errors are ignored keys (a full buffer): nothing for the guest to learn.
            let _ = self.inner.write(off, *b);
        }
        self.reset.0.swap(false, Ordering::SeqCst).then_some(ExitRequest::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let mut kbd = I8042::new();
        assert_eq!(kbd.write(4, &[0xfe]), Some(ExitRequest::Reset));
        assert_eq!(kbd.write(4, &[0x20]), None);
    }
}
