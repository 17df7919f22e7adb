//! The i8042 keyboard controller: enough for Linux's probe, and the reset line.
//!
//! Linux with `reboot=k` pulses the reset line by writing 0xfe to the command port; ebb turns
//! that into the end of the VM (exit status 0). Linux's i8042 driver also reads the control
//! register (CTR) at probe and polls up to 0.5 s for the answer, so the controller answers the
//! commands the probe sends. There is no keyboard behind it.

use std::collections::VecDeque;

use super::bus::{BusDevice, ExitRequest};

/// The i8042 data port (0x60); the command/status port is at +4 (0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60-0x64.
pub const I8042_LEN: u64 = 5;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
// Status register bits.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
// Controller commands (the ones Linux's i8042.c sends).
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
const CMD_RESET_CPU: u8 = 0xfe;
/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// A keyboard command acknowledged.
const KBD_ACK: u8 = 0xfa;
/// CTR after firmware: keyboard interrupt on, system flag, scancode translation.
const CTR_DEFAULT: u8 = 0x45;
/// Output port after firmware: A20 on, not in reset.
const OUTP_DEFAULT: u8 = 0x03;
/// Bytes the controller holds for the guest to read. A real 8042 has a one-byte output
/// buffer; a few more let a driver send a command while an answer waits (QEMU's PS/2 queue
/// began at 16). Bytes beyond it are dropped: a guest that never reads cannot grow ebb.
pub const OUT_QUEUE_BYTES: usize = 16;

/// The controller on the port bus.
#[derive(Debug)]
pub struct I8042 {
    ctr: u8,
    outp: u8,
    out: VecDeque<u8>,
    pending: Option<u8>,
}

impl I8042 {
    /// A controller after firmware initialisation.
    pub fn new() -> Self {
        Self { ctr: CTR_DEFAULT, outp: OUTP_DEFAULT, out: VecDeque::new(), pending: None }
    }

    /// Queues a byte for the guest, unless the queue is full.
    fn answer(&mut self, b: u8) {
        if self.out.len() < OUT_QUEUE_BYTES {
            self.out.push_back(b);
        }
    }

    fn command(&mut self, cmd: u8) -> Option<ExitRequest> {
        match cmd {
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_READ_OUTP => self.answer(self.outp),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_KBD_TEST => self.answer(0),
            CMD_KBD_DISABLE | CMD_KBD_ENABLE | CMD_AUX_DISABLE | CMD_AUX_ENABLE => {}
            CMD_RESET_CPU => return Some(ExitRequest::Reset),
            _ => log::debug!("i8042: ignoring command {cmd:#x}"),
        }
        None
    }

    fn data(&mut self, v: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = v,
            Some(_) => self.outp = v,
            // A byte for the keyboard, which is absent: acknowledge it like a real one would.
            None => self.answer(KBD_ACK),
        }
    }
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [b] = data else { return };
        *b = match offset {
            DATA => self.out.pop_front().unwrap_or(0),
            COMMAND => STATUS_SYS | if self.out.is_empty() { 0 } else { STATUS_OBF },
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<ExitRequest> {
        let [b] = data else { return None };
        match offset {
            COMMAND => self.command(*b),
            DATA => {
                self.data(*b);
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(k: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        k.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_requests_reset() {
        let mut kbd = I8042::new();
        assert_eq!(kbd.write(COMMAND, &[CMD_RESET_CPU]), Some(ExitRequest::Reset));
        assert_eq!(kbd.write(COMMAND, &[CMD_KBD_ENABLE]), None);
    }

    #[test]
    fn ctr_reads_back_what_was_written() {
        let mut kbd = I8042::new();
        assert_eq!(read(&mut kbd, COMMAND) & STATUS_OBF, 0);
        kbd.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut kbd, COMMAND) & STATUS_OBF, STATUS_OBF, "the answer is waiting");
        assert_eq!(read(&mut kbd, DATA), CTR_DEFAULT);
        kbd.write(COMMAND, &[CMD_WRITE_CTR]);
        kbd.write(DATA, &[0x30]);
        kbd.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut kbd, DATA), 0x30);
        assert_eq!(read(&mut kbd, COMMAND) & STATUS_OBF, 0);
    }

    #[test]
    fn self_test_passes_and_keyboard_bytes_are_acknowledged() {
        let mut kbd = I8042::new();
        kbd.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut kbd, DATA), SELF_TEST_OK);
        kbd.write(DATA, &[0xff]);
        assert_eq!(read(&mut kbd, DATA), KBD_ACK);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_output_queue() {
        let mut kbd = I8042::new();
        for _ in 0..100_000 {
            kbd.write(DATA, &[0xff]);
            kbd.write(COMMAND, &[CMD_READ_CTR]);
        }
        assert_eq!(kbd.out.len(), OUT_QUEUE_BYTES);
        assert_eq!(read(&mut kbd, DATA), KBD_ACK, "the oldest bytes are kept");
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let mut kbd = I8042::new();
        assert_eq!(kbd.write(COMMAND, &[CMD_RESET_CPU, 0]), None);
    }
}
