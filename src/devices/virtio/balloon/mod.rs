//! virtio-balloon (virtio 1.2, section 5.5): the guest gives pages back, and tells how its
//! memory is used.
//!
//! Queue numbering follows Linux: inflate and deflate are always 0 and 1; the optional queues
//! follow in the order statistics, free page hinting, free page reporting, and only the ones
//! whose feature was negotiated take an index (`virtballoon_probe`/`init_vqs` in
//! `drivers/virtio/virtio_balloon.c`, and `vm_find_vqs` skipping absent ones).

pub mod device;
pub mod event_handler;
pub mod metrics;

pub use device::{Balloon, GuestStats};

/// virtio device ID of the balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// Feature: the driver must tell the host before using deflated pages.
pub const F_MUST_TELL_HOST: u32 = 0;
/// Feature: the statistics queue.
pub const F_STATS_VQ: u32 = 1;
/// Feature: the driver deflates when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Feature: free page hinting (for migration; not offered).
pub const F_FREE_PAGE_HINT: u32 = 3;
/// Feature: the driver tells the device what freed pages contain (`poison_val`). Linux
/// disables free page reporting without it when it poisons or zeroes freed pages
/// (`init_on_free=1`, `virtballoon_validate`), so ebb offers it with reporting.
pub const F_PAGE_POISON: u32 = 4;
/// Feature: free page reporting queue.
pub const F_REPORTING: u32 = 5;

/// Queue size offered for every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Inflate/deflate PFNs are in units of 4 KiB (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PFN_SHIFT: u32 = 12;
/// A descriptor chain longer than this is malformed: Linux sends one descriptor per
/// inflate/deflate/stats buffer and at most `PAGE_REPORTING_CAPACITY` (32) for reports.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Configuration space offsets (`struct virtio_balloon_config`).
pub mod config {
    /// Pages the host wants in the balloon (device writes, driver reads).
    pub const NUM_PAGES: u64 = 0;
    /// Pages in the balloon (driver writes).
    pub const ACTUAL: u64 = 4;
    /// Free page hint command id.
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 8;
    /// Page poison value.
    pub const POISON_VAL: u64 = 12;
    /// Size of the configuration space.
    pub const SIZE: u64 = 16;
}

/// Statistics tags (`VIRTIO_BALLOON_S_*`) and the names ebb reports them under, the same as
/// QEMU's and Firecracker's.
pub const STAT_NAMES: &[(u16, &str)] = &[
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
    (10, "oom_kills"),
    (11, "alloc_stalls"),
    (12, "async_scans"),
    (13, "direct_scans"),
    (14, "async_reclaims"),
    (15, "direct_reclaims"),
];

/// Size of one statistics entry: `__le16 tag; __le64 val;`, packed.
pub const STAT_ENTRY_BYTES: u32 = 10;

/// Errors of the balloon.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    /// A target larger than guest RAM.
    #[error(
        "balloon target of {} is more than the guest's {}",
        crate::units::human_bytes(*target_bytes),
        crate::units::human_bytes(*mem_bytes)
    )]
    TargetTooLarge {
        /// Requested size.
        target_bytes: u64,
        /// Guest RAM.
        mem_bytes: u64,
    },
    /// A target that is not a whole number of balloon pages.
    #[error(
        "balloon target of {0} bytes is not a multiple of 4096 (the balloon moves in 4 KiB pages)"
    )]
    NotPages(u64),
}
