//! userfaultfd: the kernel tells ebb about first touches, writes to protected pages and
//! `madvise` removals of guest RAM, and ebb decides what backs each page.
//!
//! Kernel facts that shape this code:
//! - A fault is resolved by an ioctl that maps the page (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`);
//!   the faulting thread then wakes. `EEXIST` means someone mapped the page first (a racing
//!   fault on the same page, or fault-around): the fault is resolved all the same.
//! - `EAGAIN` from those ioctls means the mm changed under us, typically a pending
//!   `madvise(MADV_DONTNEED)` whose `UFFD_EVENT_REMOVE` we have not read yet. The fault must
//!   not be retried blindly: read the pending events first, then retry (the removal may have
//!   made the page missing again, which the retry handles).
//! - With `UFFD_FEATURE_EVENT_REMOVE`, the thread calling `madvise` blocks until the monitor
//!   has read the remove event. So the thread that reads events must never call `madvise` on
//!   guest RAM itself, or it deadlocks.

pub mod handler;
mod sys;

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use sys::*;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// Errors of userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither the syscall nor /dev/userfaultfd gave a descriptor.
    #[error(
        "userfaultfd is unavailable: {syscall} (syscall), {dev} (/dev/userfaultfd). Run as root, set sysctl vm.unprivileged_userfaultfd=1, give your user access to /dev/userfaultfd, or run with --no-uffd"
    )]
    Unavailable {
        /// Why the syscall failed.
        syscall: io::Error,
        /// Why the device failed.
        dev: io::Error,
    },
    /// The API handshake failed or lacks a feature ebb needs.
    #[error("userfaultfd API handshake: {0}")]
    Api(String),
    /// Registering guest RAM failed.
    #[error("cannot register {len} bytes at {hva:#x} with userfaultfd: {source}")]
    Register {
        /// Host address.
        hva: u64,
        /// Length.
        len: u64,
        /// The error.
        source: io::Error,
    },
    /// The kernel does not allow an ioctl ebb needs on the range.
    #[error("userfaultfd does not offer {0} on guest RAM (kernel too old?)")]
    MissingIoctl(&'static str),
    /// A resolving ioctl failed for a reason other than a race.
    #[error("{what} at {addr:#x} failed: {source}")]
    Resolve {
        /// The ioctl.
        what: &'static str,
        /// The page.
        addr: u64,
        /// The error.
        source: io::Error,
    },
    /// Reading events failed.
    #[error("reading userfaultfd events: {0}")]
    Read(io::Error),
}

/// What a resolving ioctl did (with the bytes it mapped, returned beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// It mapped the whole range (and woke the waiters).
    Mapped,
    /// A page in the range was already mapped (`EEXIST`); nothing was woken.
    AlreadyMapped,
    /// The mm changed (`EAGAIN`), or the range was mapped only in part (the kernel also says
    /// `EAGAIN` then, after waking the waiters on the part it mapped): read pending events,
    /// then retry what is left.
    Retry,
}

/// Most messages one read takes.
pub const READ_BATCH: usize = 64;

/// One event read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr`.
    Fault {
        /// Faulting address (page-aligned by the caller).
        addr: u64,
        /// A write access.
        write: bool,
        /// A write to a write-protected page.
        wp: bool,
    },
    /// `[start, end)` was removed by `madvise`.
    Remove {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// An event ebb does not register for.
    Other(u8),
}

/// A userfaultfd descriptor after the API handshake.
pub struct Uffd {
    file: File,
    features: u64,
}

/// Features ebb asks for; write protection is optional (older kernels lack it for anon).
const REQUIRED_FEATURES: u64 = UFFD_FEATURE_EVENT_REMOVE;
const OPTIONAL_FEATURES: u64 = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_THREAD_ID;

impl Uffd {
    /// Opens a non-blocking descriptor, by syscall or through `dev` (normally
    /// `/dev/userfaultfd`), and negotiates the API.
    pub fn open(dev: &Path) -> Result<Self, UffdError> {
        let file = match open_syscall() {
            Ok(f) => f,
            Err(syscall) => open_dev(dev).map_err(|dev| UffdError::Unavailable { syscall, dev })?,
        };
        let mut api =
            UffdioApi { api: UFFD_API, features: REQUIRED_FEATURES | OPTIONAL_FEATURES, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly a struct uffdio_api we own.
        let ret = unsafe { ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) };
        if ret != 0 {
            // Some optional feature may be unknown to this kernel: ask for the required ones
            // alone, on a fresh descriptor (UFFDIO_API may be called only once).
            return Self::open_required_only(dev, io::Error::last_os_error());
        }
        Ok(Self { file, features: api.features })
    }

    fn open_required_only(dev: &Path, first: io::Error) -> Result<Self, UffdError> {
        let file =
            open_syscall().or_else(|_| open_dev(dev)).map_err(|e| UffdError::Api(e.to_string()))?;
        let mut api = UffdioApi { api: UFFD_API, features: REQUIRED_FEATURES, ioctls: 0 };
        // SAFETY: as above.
        let ret = unsafe { ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            return Err(UffdError::Api(format!("{e} (and {first} with write protection)")));
        }
        Ok(Self { file, features: api.features })
    }

    /// True if write-protect faults are available.
    pub fn has_wp(&self) -> bool {
        self.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP != 0
    }

    /// Registers `[hva, hva + len)` in missing mode, and write-protect mode if `wp`.
    pub fn register(&self, hva: u64, len: u64, wp: bool) -> Result<(), UffdError> {
        let mode = UFFDIO_REGISTER_MODE_MISSING | if wp { UFFDIO_REGISTER_MODE_WP } else { 0 };
        let mut reg = UffdioRegister { range: UffdioRange { start: hva, len }, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a struct uffdio_register we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut reg) };
        if ret != 0 {
            return Err(UffdError::Register { hva, len, source: io::Error::last_os_error() });
        }
        let need = [(UFFDIO_COPY_BIT, "UFFDIO_COPY"), (UFFDIO_ZEROPAGE_BIT, "UFFDIO_ZEROPAGE")];
        let wp_need = [(UFFDIO_WRITEPROTECT_BIT, "UFFDIO_WRITEPROTECT")];
        for (bit, name) in need.iter().chain(if wp { &wp_need[..] } else { &[] }) {
            if reg.ioctls & bit == 0 {
                return Err(UffdError::MissingIoctl(name));
            }
        }
        Ok(())
    }

    /// Copies `len` bytes from `src` to the missing range at `dst` (write-protected if `wp`).
    /// Returns what happened and the bytes mapped from `dst` on.
    pub fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        wp: bool,
    ) -> Result<(Resolved, u64), UffdError> {
        let mode = if wp { UFFDIO_COPY_MODE_WP } else { 0 };
        let mut c = UffdioCopy { dst, src: src as u64, len, mode, copy: 0 };
        // SAFETY: the kernel reads `len` bytes at `src`, which the caller guarantees are
        // readable, and maps them at `dst`, which lies in a range registered on this fd.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut c) };
        resolved("UFFDIO_COPY", dst, len, ret, c.copy)
    }

    /// Maps the shared zero page over the missing range at `dst`.
    /// Returns what happened and the bytes mapped from `dst` on.
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<(Resolved, u64), UffdError> {
        let mut z = UffdioZeropage { range: UffdioRange { start: dst, len }, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly a struct uffdio_zeropage we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut z) };
        resolved("UFFDIO_ZEROPAGE", dst, len, ret, z.zeropage)
    }

    /// Sets or clears write protection on `[addr, addr + len)`, waking waiters when clearing.
    pub fn write_protect(&self, addr: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mode = if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 };
        let mut w = UffdioWriteprotect { range: UffdioRange { start: addr, len }, mode };
        // SAFETY: UFFDIO_WRITEPROTECT reads exactly a struct uffdio_writeprotect we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_WRITEPROTECT(), &mut w) };
        if ret != 0 {
            let source = io::Error::last_os_error();
            return Err(UffdError::Resolve { what: "UFFDIO_WRITEPROTECT", addr, source });
        }
        Ok(())
    }

    /// Wakes threads waiting on faults in `[addr, addr + len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads exactly a struct uffdio_range we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_WAKE(), &mut r) };
        if ret != 0 {
            let source = io::Error::last_os_error();
            return Err(UffdError::Resolve { what: "UFFDIO_WAKE", addr, source });
        }
        Ok(())
    }

    /// Reads pending events into `out` without blocking; returns how many.
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<usize, UffdError> {
        let mut buf = [UffdMsg::default(); READ_BATCH];
        // SAFETY: UffdMsg is repr(C) plain data; viewing the array as bytes for read() is
        // sound and any bytes the kernel writes form valid UffdMsg values.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                buf.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(&buf),
            )
        };
        let n = match (&self.file).read(bytes) {
            Ok(n) => n / std::mem::size_of::<UffdMsg>(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(UffdError::Read(e)),
        };
        out.extend(buf[..n].iter().map(decode));
        Ok(n)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

fn decode(m: &UffdMsg) -> Event {
    match m.event {
        UFFD_EVENT_PAGEFAULT => Event::Fault {
            addr: m.arg[1],
            write: m.arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
            wp: m.arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0,
        },
        UFFD_EVENT_REMOVE => Event::Remove { start: m.arg[0], end: m.arg[1] },
        other => Event::Other(other),
    }
}

/// Interprets a resolving ioctl: `result` is the kernel's byte count or negative errno.
fn resolved(
    what: &'static str,
    addr: u64,
    len: u64,
    ret: i32,
    result: i64,
) -> Result<(Resolved, u64), UffdError> {
    let done = u64::try_from(result).unwrap_or(0).min(len);
    if ret == 0 {
        return Ok((Resolved::Mapped, len));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok((Resolved::AlreadyMapped, done)),
        Some(libc::EAGAIN) => Ok((Resolved::Retry, done)),
        _ => Err(UffdError::Resolve { what, addr, source: err }),
    }
}

fn open_syscall() -> io::Result<File> {
    // SAFETY: userfaultfd(2) takes flags only; a non-negative return is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn open_dev(dev: &Path) -> io::Result<File> {
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
