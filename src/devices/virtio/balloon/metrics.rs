//! Counters of the balloon device: what it did, and what the guest did wrong.

use std::sync::atomic::AtomicU64;

pub use crate::devices::guest_errors::GuestErrorCounter;

/// The balloon's metrics.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Pages released on inflate.
    pub inflated_pages: AtomicU64,
    /// Pages given back on deflate.
    pub deflated_pages: AtomicU64,
    /// Pages released by free page reporting.
    pub reported_pages: AtomicU64,
    /// Reports not acted on because freed pages hold a non-zero poison value.
    pub reports_kept: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
    /// PFNs or reported ranges outside guest RAM.
    pub bad_pfns: GuestErrorCounter,
    /// Descriptors of the wrong direction, length or address; chains too long or looping.
    pub bad_descriptors: GuestErrorCounter,
    /// Statistics buffers of a size that is not a whole number of entries.
    pub bad_stats: GuestErrorCounter,
    /// Notifications for a queue the device does not have.
    pub bad_notifies: GuestErrorCounter,
    /// Notifications before DRIVER_OK (Linux primes the statistics queue that way); the
    /// buffers are processed at activation.
    pub early_notifies: AtomicU64,
    /// Times the driver activated the device (set DRIVER_OK); more than one means resets.
    pub activations: AtomicU64,
    /// Configuration-space writes other than `actual`.
    pub bad_config_writes: GuestErrorCounter,
    /// `madvise` failures releasing guest pages.
    pub madvise_errors: AtomicU64,
}
