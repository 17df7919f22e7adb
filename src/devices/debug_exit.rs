//! The debug-exit port: a payload writes its exit status to port 0xf4 to end the VM.
//!
//! Unlike QEMU's `isa-debug-exit` (which exits with `(value << 1) | 1`), ebb exits with the
//! value itself, so a payload's `return 0` is ebb's exit status 0.

use super::bus::{BusDevice, ExitRequest};

/// The port (the same one QEMU test setups conventionally give `isa-debug-exit`).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Width of the port range.
pub const DEBUG_EXIT_LEN: u64 = 4;

/// The debug-exit device.
#[derive(Debug, Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<ExitRequest> {
        // Only a write at the port itself counts; its low byte is the status.
        (offset == 0).then(|| ExitRequest::Status(data.first().copied().unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_requests_exit_with_its_low_byte() {
        assert_eq!(DebugExit.write(0, &[3, 0, 0, 0]), Some(ExitRequest::Status(3)));
        assert_eq!(DebugExit.write(1, &[3]), None);
    }
}
