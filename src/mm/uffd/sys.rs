//! Raw userfaultfd ABI (`include/uapi/linux/userfaultfd.h`): structs, ioctl numbers, flags,
//! and the two ways to get a descriptor (the syscall, `/dev/userfaultfd`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

/// The only userfaultfd API version (`UFFD_API`).
pub const UFFD_API: u64 = 0xaa;
/// ioctl type of userfaultfd (`UFFDIO` and `USERFAULTFD_IOC`).
const UFFDIO: u32 = 0xaa;

// Features (uffdio_api.features).
/// Page faults report `UFFD_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `mremap` of a registered range keeps its registration (and write protection) and
/// produces `UFFD_EVENT_REMAP`, which the `mremap` caller waits to see read.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `madvise(MADV_DONTNEED/REMOVE)` on the range produces `UFFD_EVENT_REMOVE`.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Faults report the faulting thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// Write protection of shared-memory (memfd) and hugetlbfs mappings.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFDIO_MOVE` (Linux 6.8): move a page between registered ranges without copying it.
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

// Register modes.
/// Trap accesses to pages with no PTE.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Trap writes to write-protected pages.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

// Bits of uffdio_register.ioctls: which range ioctls the kernel allows there.
/// `_UFFDIO_COPY`.
pub const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
/// `_UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE_BIT: u64 = 1 << 0x04;
/// `_UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;
/// `_UFFDIO_MOVE`.
pub const UFFDIO_MOVE_BIT: u64 = 1 << 0x05;
/// Do not wake threads waiting on the destination after a move.
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;

/// Map the copied page write-protected.
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
/// Do not wake the faulting threads after mapping the zero page.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
/// Set write protection (clear it when absent).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

// Events.
/// A page fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `madvise(MADV_DONTNEED/MADV_REMOVE)` of part of the range.
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// The fault was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// The fault hit a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// `UFFD_API`.
    pub api: u64,
    /// Requested, then granted, features.
    pub features: u64,
    /// ioctls available on the fd (output).
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    /// Page-aligned start.
    pub start: u64,
    /// Page-aligned length.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// ioctls allowed on the range (output).
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    /// Destination (in the registered range).
    pub dst: u64,
    /// Source buffer.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*`.
    pub mode: u64,
    /// Bytes copied, or a negative errno (output).
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_ZEROPAGE_MODE_DONTWAKE` or 0.
    pub mode: u64,
    /// Bytes mapped, or a negative errno (output).
    pub zeropage: i64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioMove {
    /// Destination (in a registered range, not mapped).
    pub dst: u64,
    /// Source (mapped, private anonymous, not shared).
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// `UFFDIO_MOVE_MODE_*`.
    pub mode: u64,
    /// Bytes moved, or a negative errno (output).
    pub r#move: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `struct uffd_msg`: 32 bytes; the event's arguments are in `arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// Pagefault: flags, address, thread id. Remove: start, end.
    pub arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioMove>() == 40);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
ioctl_iowr_nr!(UFFDIO_MOVE, UFFDIO, 0x05, UffdioMove);

/// A non-blocking, close-on-exec descriptor from the `userfaultfd(2)` syscall.
pub fn open_syscall() -> io::Result<File> {
    // SAFETY: userfaultfd(2) takes flags only; a non-negative return is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The same from `dev` (normally `/dev/userfaultfd`, whose permissions may allow users the
/// syscall refuses).
pub fn open_dev(dev: &Path) -> io::Result<File> {
    let ctl = OpenOptions::new().read(true).write(true).open(dev)?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new fd.
    let fd = unsafe { libc::ioctl(ctl.as_raw_fd(), USERFAULTFD_IOC_NEW() as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values of the macros in linux/userfaultfd.h on x86_64.
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT(), 0xc018_aa06);
        assert_eq!(UFFDIO_MOVE(), 0xc028_aa05);
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xaa00);
    }
}
