//! Counters of one virtio-blk device: what it did, and what the guest did wrong.

use std::sync::atomic::AtomicU64;

pub use crate::devices::guest_errors::GuestErrorCounter;

/// One disk's metrics.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Read requests served.
    pub reads: AtomicU64,
    /// Bytes read into the guest.
    pub read_bytes: AtomicU64,
    /// Write requests served.
    pub writes: AtomicU64,
    /// Bytes written to the image.
    pub write_bytes: AtomicU64,
    /// Flush requests served.
    pub flushes: AtomicU64,
    /// Get-id requests served.
    pub get_ids: AtomicU64,
    /// Host I/O errors (the guest got `IOERR`).
    pub io_errors: AtomicU64,
    /// Chains framed wrong, data going the wrong way, buffers outside guest RAM, chains too
    /// long or looping, broken available rings.
    pub bad_descriptors: GuestErrorCounter,
    /// Requests for sectors beyond the disk, or data that is not whole sectors.
    pub bad_sectors: GuestErrorCounter,
    /// Writes to a read-only disk.
    pub read_only_writes: GuestErrorCounter,
    /// Request types ebb does not implement.
    pub unsupported: GuestErrorCounter,
    /// Notifications for a queue the device does not have.
    pub bad_notifies: GuestErrorCounter,
    /// Notifications before DRIVER_OK (their buffers are served at activation).
    pub early_notifies: AtomicU64,
    /// Times the driver activated the device; more than one means resets.
    pub activations: AtomicU64,
    /// Configuration-space writes (the space is read-only: `writeback` is not offered).
    pub bad_config_writes: GuestErrorCounter,
}

impl BlockMetrics {
    /// Guest mistakes of every kind, together.
    pub fn guest_errors(&self) -> u64 {
        [
            &self.bad_descriptors,
            &self.bad_sectors,
            &self.read_only_writes,
            &self.unsupported,
            &self.bad_notifies,
            &self.bad_config_writes,
        ]
        .iter()
        .map(|c| c.get())
        .sum()
    }
}
