//! Virtio devices and their virtio-mmio transport (virtio 1.2, section 4.2).
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on the MMIO bus,
//! negotiates features and queues with the driver, and hands the device its queues when the
//! driver sets `DRIVER_OK`. The devices: the balloon (`virtio/balloon/`) and disks
//! (`virtio/block/`).

pub mod balloon;
pub mod block;
pub mod mmio;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1` (virtio 1.2, section 6): the device is not legacy. Always offered and
/// required: ebb implements no legacy interface.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits (virtio 1.2, section 4.2.2: InterruptStatus).
pub mod irq {
    /// A used buffer was added to a queue.
    pub const USED_BUFFER: u32 = 1;
    /// The configuration space changed.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Why a device could not be activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    /// A queue the driver marked ready lies outside guest memory or has an invalid size.
    #[error("a ready queue lies outside guest memory or has an invalid size")]
    BadQueue,
    /// Fewer queues than the negotiated features need.
    #[error("{queues} queues for {needed} roles")]
    TooFewQueues {
        /// Queues the transport has.
        queues: usize,
        /// Queues the features need.
        needed: usize,
    },
    /// A queue the features need is not ready.
    #[error("queue {index} is not ready")]
    QueueNotReady {
        /// Its index.
        index: usize,
    },
}

/// Errors of virtio devices and their transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The device refused the queues or features it was activated with.
    #[error("activation of virtio device type {device_type} failed: {reason}")]
    Activate {
        /// The virtio device ID.
        device_type: u32,
        /// Why.
        reason: ActivateError,
    },
    /// Raising an interrupt failed.
    #[error("cannot signal virtio interrupt: {0}")]
    Interrupt(io::Error),
}

/// The interrupt line of one virtio-mmio device: the status register and the irqfd.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// A line raising the GSI that `irqfd` is registered for.
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn signal(&self, bits: u32) -> Result<(), VirtioError> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1).map_err(VirtioError::Interrupt)
    }

    /// The current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd (to register with KVM).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct Activation {
    /// Guest memory, for the queues' descriptors and buffers.
    pub mem: Arc<GuestMemoryMmap>,
    /// The queues the driver set up, in index order (not-ready ones included, `ready()` false).
    pub queues: Vec<Queue>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The device's interrupt line.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// A virtio device behind a transport. It never sees the transport's registers.
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio 1.2, section 5).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is the slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (`VIRTIO_F_VERSION_1` is added by the transport).
    fn avail_features(&self) -> u64;
    /// Reads device configuration space at `offset`; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`; out-of-range writes are dropped.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// The driver notified queue `index` (only after activation).
    fn queue_notify(&mut self, index: u16);
    /// Returns the device to its initial state (the driver wrote 0 to Status).
    fn reset(&mut self);
}

/// One descriptor, copied out of the guest's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write_only: bool,
}

/// The descriptors of a chain, or None if it has more than `max` (a loop ends the same way:
/// virtio-queue stops a chain after queue-size descriptors).
pub fn chain_descriptors<M>(chain: DescriptorChain<M>, max: usize) -> Option<Vec<Desc>>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() == max {
            return None;
        }
        descs.push(Desc { addr: d.addr().0, len: d.len(), write_only: d.is_write_only() });
    }
    Some(descs)
}
