//! The 16550 UART at 0x3f8 (IRQ 4): guest output to stdout and, optionally, a log file.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{BusDevice, ExitRequest};

/// COM1's base port.
pub const COM1_BASE: u64 = 0x3f8;
/// The UART's eight registers.
pub const COM1_LEN: u64 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest output goes: stdout, and a copy in the serial log if one was asked for.
pub struct SerialOut {
    stdout: io::Stdout,
    log: Option<io::BufWriter<File>>,
}

impl SerialOut {
    /// Output to stdout and, if given, to `log`.
    pub fn new(log: Option<File>) -> Self {
        Self { stdout: io::stdout(), log: log.map(io::BufWriter::new) }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stdout.write_all(buf)?;
        if let Some(log) = &mut self.log {
            log.write_all(buf)?;
            if buf.contains(&b'\n') {
                log.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stdout.flush()?;
        self.log.as_mut().map_or(Ok(()), Write::flush)
    }
}

/// The UART on the port bus.
pub struct SerialDevice(Serial<IrqTrigger, NoEvents, SerialOut>);

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self(Serial::new(IrqTrigger(irq), out))
    }

    /// Flushes what the guest wrote (at VM exit).
    pub fn flush(&mut self) -> io::Result<()> {
        self.0.writer_mut().flush()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<ExitRequest> {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.0.write(off, *b) {
                log::warn!("serial write failed: {e:?}");
            }
        }
        None
    }
}
