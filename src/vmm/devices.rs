//! The devices of one VM: the UART, the i8042, the debug-exit port and the virtio devices,
//! each with its bus range, interrupt line and (for virtio) ioeventfds.
//!
//! Virtio-mmio devices get consecutive 4 KiB windows from [`VIRTIO_MMIO_BASE_GPA`] and
//! consecutive interrupt lines from [`FIRST_VIRTIO_IRQ`], handed out by [`MmioSlots`].

use std::fs::File;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::VmmError;
use crate::boot::layout::{VIRTIO_MMIO_BASE_GPA, VIRTIO_MMIO_WINDOW_BYTES};
use crate::config::VmConfig;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::balloon::event_handler::BalloonEventHandler;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::event_handler::BlockEventHandler;
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::mmio::{MmioMetrics, MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::Bus;
use crate::mm::MemoryManager;
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::{self, VmError};

/// Interrupt line of the first virtio-mmio device (COM1 has 4; Linux's PIC takes 0-15).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last interrupt line a virtio-mmio device may take (KVM's IOAPIC has 24 pins).
pub const LAST_VIRTIO_IRQ: u32 = 23;

/// Hands out virtio-mmio windows and interrupt lines, one pair per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlots {
    next_base: u64,
    next_irq: u32,
}

impl Default for MmioSlots {
    fn default() -> Self {
        Self { next_base: VIRTIO_MMIO_BASE_GPA, next_irq: FIRST_VIRTIO_IRQ }
    }
}

impl MmioSlots {
    /// The next window's base address and interrupt line, or None when the lines run out.
    pub fn take(&mut self) -> Option<(u64, u32)> {
        if self.next_irq > LAST_VIRTIO_IRQ {
            return None;
        }
        let slot = (self.next_base, self.next_irq);
        self.next_base += VIRTIO_MMIO_WINDOW_BYTES;
        self.next_irq += 1;
        Some(slot)
    }
}

/// The devices of one VM and what the event loop and the kernel command line need of them.
pub struct Devices {
    /// The port I/O bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// The UART (flushed at exit).
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The balloon, if configured.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// The balloon's event-loop glue, until the loop takes it.
    pub balloon_handler: Option<BalloonEventHandler>,
    /// What the balloon's transport counted of the guest's mistakes.
    pub balloon_transport: Option<Arc<MmioMetrics>>,
    /// The disks, in `--disk` order (`vda`, `vdb`, ... in a Linux guest).
    pub disks: Vec<Arc<Mutex<Block>>>,
    /// The disks' event-loop glue, until the loop takes it.
    pub disk_handlers: Vec<BlockEventHandler>,
    /// `virtio_mmio.device=` entries for a Linux command line.
    pub cmdline: Vec<String>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("balloon", &self.balloon.is_some())
            .field("disks", &self.disks.len())
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

impl Devices {
    /// Creates the UART, i8042, debug-exit port and, if configured, the balloon and the
    /// disks (their images are opened here: after the jailer closed inherited descriptors,
    /// before the seccomp filter).
    ///
    /// # Errors
    /// The serial log or a disk image cannot be opened, KVM refuses an irqfd or ioeventfd,
    /// or devices overlap.
    pub fn new(
        config: &VmConfig,
        vm: &VmFd,
        ram: &GuestRam,
        mm: &Arc<MemoryManager>,
    ) -> Result<Self, VmmError> {
        let serial_log = match &config.serial_log {
            Some(path) => Some(
                File::create(path)
                    .map_err(|source| VmmError::SerialLog { path: path.clone(), source })?,
            ),
            None => None,
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            vm::irqfd(vm, COM1_IRQ)?,
            SerialOut::new(serial_log),
        )));
        let mut pio = Bus::new();
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
        pio.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::new())))?;
        pio.insert(DEBUG_EXIT_PORT, DEBUG_EXIT_LEN, Arc::new(Mutex::new(DebugExit)))?;
        let mut mmio = Bus::new();
        let mut slots = MmioSlots::default();
        let (mut balloon, mut balloon_handler, mut cmdline) = (None, None, Vec::new());
        let mut balloon_transport = None;
        if let Some(bc) = config.balloon {
            let dev = Balloon::new(bc, ram.memory().clone(), ram.mem_bytes(), mm.clone())?;
            let dev = Arc::new(Mutex::new(dev));
            let (base, irq) = slots.take().ok_or(VmmError::NoMmioSlot)?;
            let (queue_evts, transport) =
                add_virtio_mmio(vm, ram, &mut mmio, dev.clone(), base, irq)?;
            balloon_transport = Some(transport);
            cmdline.push(MmioTransport::cmdline_entry(VIRTIO_MMIO_WINDOW_BYTES, base, irq));
            let interval =
                (bc.stats_interval_s > 0).then(|| Duration::from_secs(bc.stats_interval_s));
            let handler = BalloonEventHandler::new(dev.clone(), queue_evts, interval)
                .map_err(VmmError::EventLoopSetup)?;
            balloon_handler = Some(handler);
            balloon = Some(dev);
        }
        let (mut disks, mut disk_handlers) = (Vec::new(), Vec::new());
        for dc in &config.disks {
            let disk = Disk::open(&dc.path, dc.read_only)?;
            log::info!(
                "disk {}: {} sectors{}{}",
                dc.path.display(),
                disk.capacity_sectors(),
                if dc.read_only { ", read-only" } else { "" },
                if disk.direct() { ", direct I/O" } else { ", host page cache" }
            );
            let dev = Arc::new(Mutex::new(Block::new(disk)));
            let (base, irq) = slots.take().ok_or(VmmError::NoMmioSlot)?;
            let (queue_evts, _transport) =
                add_virtio_mmio(vm, ram, &mut mmio, dev.clone(), base, irq)?;
            cmdline.push(MmioTransport::cmdline_entry(VIRTIO_MMIO_WINDOW_BYTES, base, irq));
            let evt = queue_evts.into_iter().next().ok_or(VmmError::NoMmioSlot)?;
            disk_handlers.push(BlockEventHandler::new(dev.clone(), evt));
            disks.push(dev);
        }
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        Ok(Self {
            pio,
            mmio,
            serial,
            balloon,
            balloon_handler,
            balloon_transport,
            disks,
            disk_handlers,
            cmdline,
        })
    }

    /// Logs what each disk did and what its guest did wrong (at exit).
    pub fn log_disk_metrics(&self) {
        for dev in &self.disks {
            let dev = dev.lock().unwrap_or_else(PoisonError::into_inner);
            let m = dev.metrics();
            let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            log::info!(
                "disk {}: {} reads ({} bytes), {} writes ({} bytes), {} flushes, {} get-ids, \
                 {} I/O errors, {} guest errors",
                dev.disk().path().display(),
                n(&m.reads),
                n(&m.read_bytes),
                n(&m.writes),
                n(&m.write_bytes),
                n(&m.flushes),
                n(&m.get_ids),
                n(&m.io_errors),
                m.guest_errors()
            );
        }
    }
}

/// Puts `device` on the MMIO bus at `base` with interrupt `irq`; returns one ioeventfd per
/// queue, signalled by KVM when the driver writes that queue's index to QueueNotify.
fn add_virtio_mmio(
    vm: &VmFd,
    ram: &GuestRam,
    mmio: &mut Bus,
    device: Arc<Mutex<dyn VirtioDevice>>,
    base: u64,
    irq: u32,
) -> Result<(Vec<EventFd>, Arc<MmioMetrics>), VmmError> {
    let interrupt = Arc::new(VirtioInterrupt::new(vm::irqfd(vm, irq)?));
    let queues = device.lock().unwrap_or_else(PoisonError::into_inner).queue_max_sizes().len();
    let transport = MmioTransport::new(device, ram.memory().clone(), interrupt);
    let metrics = transport.metrics().clone();
    mmio.insert(base, VIRTIO_MMIO_WINDOW_BYTES, Arc::new(Mutex::new(transport)))?;
    let mut evts = Vec::with_capacity(queues);
    for index in 0..queues {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(VmmError::EventLoopSetup)?;
        let datamatch = u32::try_from(index).unwrap_or(u32::MAX);
        let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        vm.register_ioevent(&evt, &addr, datamatch)
            .map_err(|source| VmError::Ioctl { what: "KVM_IOEVENTFD", source })?;
        evts.push(evt);
    }
    Ok((evts, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_windows_and_lines_until_the_ioapic_runs_out() {
        let mut s = MmioSlots::default();
        assert_eq!(s.take(), Some((VIRTIO_MMIO_BASE_GPA, FIRST_VIRTIO_IRQ)));
        assert_eq!(
            s.take(),
            Some((VIRTIO_MMIO_BASE_GPA + VIRTIO_MMIO_WINDOW_BYTES, FIRST_VIRTIO_IRQ + 1))
        );
        let left = (0..100).map_while(|_| s.take()).count();
        assert_eq!(left, usize::try_from(LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ - 1).unwrap());
    }
}
