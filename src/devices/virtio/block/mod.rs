//! virtio-blk (virtio 1.2, section 5.2): a disk backed by a raw image file on the host.
//!
//! | file | owns |
//! |---|---|
//! | `request.rs` | parsing one descriptor chain into a checked [`request::Request`] (pure) |
//! | `disk.rs` | the image file: capacity, aligned reads and writes (`O_DIRECT` or page cache), flush |
//! | `device.rs` | the device: config space, features, one queue served in bounded turns |
//! | `event_handler.rs` | event-loop glue: the queue's ioeventfd |
//! | `metrics.rs` | what the device did, and what the guest did wrong |
//!
//! Invariants:
//! - Nothing the guest sends is trusted: every descriptor's direction and length, the sector
//!   range (`sector + len` within the capacity, with overflow checks) and every guest address
//!   is checked before a byte moves; a bad request gets `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for
//!   an unknown type), is counted and its kind logged once.
//! - A read-only disk never writes its image: writes get `VIRTIO_BLK_S_IOERR` (virtio 1.2,
//!   5.2.6.2) and the file is opened read-only anyway.
//! - One notification does bounded work: at most [`device::CHAINS_PER_TURN`] chains of at
//!   most [`MAX_REQUEST_BYTES`] each; the event loop comes back for the rest.
//! - The image is opened once, when the VM is built: after the jailer closed inherited
//!   descriptors and before the seccomp filter (which allows `pread64`, `pwrite64`,
//!   `fdatasync`).
//!
//! The rust-vmm `virtio-blk` crate (in `vm-virtio`) is not published on crates.io, the only
//! registry ebb builds from, so request parsing is ebb's own, on the same virtio-queue chains
//! the balloon reads.

pub mod device;
pub mod disk;
pub mod event_handler;
pub mod metrics;
pub mod request;

pub use device::Block;
pub use disk::Disk;

/// virtio device ID of a block device (virtio 1.2, section 5).
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Feature: `size_max` bounds the bytes of one data descriptor (`VIRTIO_BLK_F_SIZE_MAX`).
pub const F_SIZE_MAX: u32 = 1;
/// Feature: `seg_max` bounds the data descriptors of one request (`VIRTIO_BLK_F_SEG_MAX`).
pub const F_SEG_MAX: u32 = 2;
/// Feature: the disk is read-only (`VIRTIO_BLK_F_RO`).
pub const F_RO: u32 = 5;
/// Feature: the device takes flush requests (`VIRTIO_BLK_F_FLUSH`).
pub const F_FLUSH: u32 = 9;

/// Request types (`VIRTIO_BLK_T_*`, `include/uapi/linux/virtio_blk.h`).
pub mod req_type {
    /// Read sectors into the guest.
    pub const IN: u32 = 0;
    /// Write sectors from the guest.
    pub const OUT: u32 = 1;
    /// Make written data durable.
    pub const FLUSH: u32 = 4;
    /// The device's serial number.
    pub const GET_ID: u32 = 8;
}

/// Request status bytes (`VIRTIO_BLK_S_*`).
pub mod req_status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed (also: a write to a read-only disk, a bad request).
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Sectors are 512 bytes whatever the image's block size (virtio 1.2, 5.2.6).
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes of a sector.
pub const SECTOR_BYTES: u64 = 1 << SECTOR_SHIFT;
/// Bytes of the request header: `le32 type; le32 reserved; le64 sector;`.
pub const HEADER_BYTES: u32 = 16;
/// Bytes of a device ID (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most data descriptors of one request (`seg_max`, offered): Linux sizes its scatterlists
/// by it, so a request of more is malformed.
pub const SEG_MAX: u32 = 64;
/// Most bytes of one data descriptor (`size_max`, offered).
pub const SIZE_MAX: u32 = 64 << 10;
/// Most data bytes of one request: what `SEG_MAX` descriptors of `SIZE_MAX` hold (4 MiB;
/// Linux sends at most `BLK_DEF_MAX_SECTORS`, 1.25 MiB, in 6.1). The bounce buffer never
/// grows past it.
pub const MAX_REQUEST_BYTES: u32 = SEG_MAX * SIZE_MAX;
/// Most descriptors of one chain: a header, the data, a status.
pub const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// Configuration space (`struct virtio_blk_config`), the fields ebb fills.
pub mod config {
    /// Capacity in 512-byte sectors, `le64`.
    pub const CAPACITY: usize = 0;
    /// `size_max`, `le32`.
    pub const SIZE_MAX: usize = 8;
    /// `seg_max`, `le32`.
    pub const SEG_MAX: usize = 12;
    /// Bytes ebb exposes (up to `blk_size`, which is not offered); the rest reads as zero.
    pub const SIZE: usize = 16;
}

/// Errors of the block device's setup (request errors go to the guest as status bytes).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The path given.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The image's size is not a whole number of 512-byte sectors, or is zero.
    #[error("disk image {path} is {bytes} bytes: not a non-zero multiple of 512")]
    Size {
        /// The path given.
        path: std::path::PathBuf,
        /// Its size.
        bytes: u64,
    },
}
