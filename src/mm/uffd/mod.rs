//! userfaultfd, the kernel ABI only: the descriptor, its events and its ioctls, with their
//! errors turned into meaning ([`Resolved`]). What a fault means for a page is decided
//! above, in `mm::fault`; nothing here knows page states, stores or sharing.
//!
//! Kernel facts that shape this code:
//! - A fault is resolved by an ioctl that maps the page (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`);
//!   the faulting thread then wakes. `EEXIST` means someone mapped the page first (a racing
//!   fault on the same page, or fault-around): the fault is resolved all the same.
//! - `EAGAIN` from any of them (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_WRITEPROTECT`,
//!   `UFFDIO_WAKE`) means the address space is changing: a non-cooperative event, typically
//!   the remove of a `madvise(MADV_DONTNEED)` on another thread, is pending. The kernel raises
//!   `mmap_changing` before it queues the remove and lowers it only when the `madvise` caller
//!   runs again, after the event was read, so a retry can fail again for a while. EAGAIN is
//!   never fatal: read the pending events, then retry, for as long as it takes (the removal
//!   may also have made the page missing again, which the retry handles).
//! - With `UFFD_FEATURE_EVENT_REMOVE`, the thread calling `madvise` blocks until the monitor
//!   has read the remove event. So the thread that reads events must never call `madvise` on
//!   guest RAM itself, or it deadlocks.
//! - Clearing write protection wakes the threads waiting on the range; a thread waiting on a
//!   write-protect fault whose unprotect is dropped waits forever.
//! - When the descriptor is closed, the kernel wakes every waiter, and their faults are then
//!   served as if userfaultfd were not registered.

mod sys;

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;

use sys::*;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::units::PAGE_SIZE;

/// Errors of userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither the syscall nor /dev/userfaultfd gave a descriptor.
    #[error(
        "userfaultfd is unavailable: {syscall} (syscall), {dev} (/dev/userfaultfd); it needs root, sysctl vm.unprivileged_userfaultfd=1, or access to /dev/userfaultfd"
    )]
    Unavailable {
        /// Why the syscall failed.
        syscall: io::Error,
        /// Why the device failed.
        dev: io::Error,
    },
    /// The API handshake failed: the kernel refused the features ebb needs.
    #[error("userfaultfd API handshake (features {features:#x}): {source}")]
    Api {
        /// Features asked for.
        features: u64,
        /// The error.
        source: io::Error,
    },
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
    /// A descriptor, mapping, timer or thread around userfaultfd could not be set up.
    #[error("setting up userfaultfd: {0}")]
    Setup(io::Error),
}

impl UffdError {
    /// True if a resolving ioctl failed because its range spans more than one mapping: the
    /// kernel answers `ENOENT` (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`) or `EINVAL`
    /// (`UFFDIO_MOVE`). Guest RAM is one mapping at first, but every shared page is a
    /// mapping of its own, and the fresh memory a copy-on-write break or a release maps over
    /// a page often cannot merge back with its neighbours (their `anon_vma`s differ), so a
    /// range of several pages may cross a boundary: the caller then does one page at a time.
    pub fn crosses_mapping(&self) -> bool {
        let Self::Resolve { source, .. } = self else { return false };
        matches!(source.raw_os_error(), Some(libc::ENOENT | libc::EINVAL))
    }
}

/// What an ioctl on a range did (resolving ones return the bytes mapped beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// It did the whole range (and woke the waiters).
    Mapped,
    /// A page in the range was already mapped (`EEXIST`); nothing was woken.
    AlreadyMapped,
    /// The mm changed (`EAGAIN`), or the range was mapped only in part (the kernel also says
    /// `EAGAIN` then, after waking the waiters on the part it mapped): read pending events,
    /// then retry what is left.
    Retry,
    /// The kernel could not allocate memory (`ENOMEM`: the host, or the VM's memory cgroup,
    /// is out of memory): nothing was done; wait for memory, then retry.
    NoMemory,
}

/// The userfaultfd device node, tried when the syscall is refused.
pub const DEFAULT_UFFD_DEV: &str = "/dev/userfaultfd";

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
        /// The faulting thread's id (0 where the kernel does not say:
        /// `UFFD_FEATURE_THREAD_ID` missing).
        tid: u32,
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
#[derive(Debug)]
pub struct Uffd {
    file: File,
    features: u64,
}

/// Features the fault handler's descriptor asks for, richest first: write protection, moves
/// and what page sharing needs (remap events, write protection of memfd mappings) are
/// optional (older kernels lack them), remove events are not.
const HANDLER_FEATURES: [u64; 4] = [
    UFFD_FEATURE_EVENT_REMOVE
        | UFFD_FEATURE_PAGEFAULT_FLAG_WP
        | UFFD_FEATURE_THREAD_ID
        | UFFD_FEATURE_MOVE
        | UFFD_FEATURE_EVENT_REMAP
        | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_EVENT_REMOVE
        | UFFD_FEATURE_PAGEFAULT_FLAG_WP
        | UFFD_FEATURE_THREAD_ID
        | UFFD_FEATURE_MOVE,
    UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_THREAD_ID,
    UFFD_FEATURE_EVENT_REMOVE,
];

impl Uffd {
    /// Opens a non-blocking descriptor, by syscall or through `dev` (normally
    /// `/dev/userfaultfd`), and negotiates the fault handler's features.
    pub fn open(dev: &Path) -> Result<Self, UffdError> {
        Self::negotiate(dev, &HANDLER_FEATURES)
    }

    /// A second descriptor for moving pages out of guest memory into a scratch range
    /// registered on it: `UFFDIO_MOVE` only, and no remove events, so that dropping the
    /// scratch pages never waits for the fault handler.
    pub fn open_for_moves(dev: &Path) -> Result<Self, UffdError> {
        Self::negotiate(dev, &[UFFD_FEATURE_MOVE])
    }

    /// Opens a descriptor and asks for each feature set of `sets` in turn until the kernel
    /// takes one (`UFFDIO_API` may be called once per descriptor, so each try opens anew).
    fn negotiate(dev: &Path, sets: &[u64]) -> Result<Self, UffdError> {
        let mut last = None;
        for &features in sets {
            let file = match sys::open_syscall() {
                Ok(f) => f,
                Err(syscall) => {
                    sys::open_dev(dev).map_err(|dev| UffdError::Unavailable { syscall, dev })?
                }
            };
            let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
            // SAFETY: UFFDIO_API reads and writes exactly a struct uffdio_api we own.
            let ret = unsafe { ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) };
            if ret == 0 {
                return Ok(Self { file, features: api.features });
            }
            last = Some(UffdError::Api { features, source: io::Error::last_os_error() });
        }
        Err(last.unwrap_or(UffdError::Api {
            features: 0,
            source: io::Error::from(io::ErrorKind::Unsupported),
        }))
    }

    /// True if write-protect faults are available.
    pub fn has_wp(&self) -> bool {
        self.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP != 0
    }

    /// True if `UFFDIO_MOVE` is available (Linux 6.8+), which eviction needs.
    pub fn has_move(&self) -> bool {
        self.features & UFFD_FEATURE_MOVE != 0
    }

    /// True if identical pages can be shared through a memfd pool: write protection of memfd
    /// mappings, remap events (so that a prepared mapping keeps its registration when
    /// `mremap` puts it over a guest page) and moves (to freeze a page while it is compared).
    pub fn has_sharing(&self) -> bool {
        let need = UFFD_FEATURE_PAGEFAULT_FLAG_WP
            | UFFD_FEATURE_EVENT_REMAP
            | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            | UFFD_FEATURE_MOVE;
        self.features & need == need
    }

    /// Moves the page(s) mapped at `[src, src + len)` to the unmapped, registered range at
    /// `dst` without copying them; `src` is unmapped afterwards (its next access faults).
    /// Returns [`Resolved::Mapped`] when all moved; `ENOENT` (nothing mapped at `src`),
    /// `EEXIST` (`dst` is mapped), `EBUSY` (the page is pinned, shared or huge) and
    /// `EAGAIN` come back as [`Resolved::Retry`] with the bytes moved: the caller gives up on
    /// that page for now.
    ///
    /// `dst` must be unmapped and held by the caller: nothing else maps it during the call
    /// (eviction's scratch range is its own; a guest page moved back is claimed, so its
    /// faults wait). That makes a failed move checkable, and the kernel's answer is not
    /// trusted when it says a page did not move (see `moved_despite_error`).
    ///
    /// # Safety
    /// `src` must be memory whose pages may be taken away (guest RAM claimed by the caller,
    /// or a scratch range of the caller's): afterwards it reads as missing, and no Rust
    /// reference may point into it. `dst` must be unmapped and held by the caller.
    ///
    /// # Errors
    /// The ioctl failed for a reason other than the pages' own.
    pub unsafe fn move_pages(
        &self,
        dst: u64,
        src: u64,
        len: u64,
    ) -> Result<(Resolved, u64), UffdError> {
        let mode = UFFDIO_MOVE_MODE_DONTWAKE;
        let mut m = UffdioMove { dst, src, len, mode, r#move: 0 };
        // SAFETY: UFFDIO_MOVE reads and writes exactly a struct uffdio_move we own; the
        // kernel checks both ranges (dst registered on this fd, src private anonymous).
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_MOVE(), &mut m) };
        if ret == 0 {
            return Ok((Resolved::Mapped, len));
        }
        let source = io::Error::last_os_error();
        let reported = u64::try_from(m.r#move).unwrap_or(0).min(len);
        let done = moved_despite_error(dst, reported, len);
        if done > reported {
            MOVES_CORRECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if done == len {
            log::debug!("UFFDIO_MOVE at {src:#x} said {source} but moved the page(s)");
            return Ok((Resolved::Mapped, len));
        }
        match source.raw_os_error() {
            Some(libc::ENOENT | libc::EEXIST | libc::EBUSY | libc::EAGAIN) => {
                Ok((Resolved::Retry, done))
            }
            Some(libc::ENOMEM) => Ok((Resolved::NoMemory, done)),
            _ => Err(UffdError::Resolve { what: "UFFDIO_MOVE", addr: src, source }),
        }
    }

    /// Registers `[hva, hva + len)` in missing mode, and write-protect mode if `wp`.
    ///
    /// # Safety
    /// From now on a missing page of the range faults to this descriptor and waits until
    /// it is resolved: the range must be memory whose faults this descriptor's reader serves
    /// (guest RAM, or a page of the caller's about to become guest RAM), never memory that
    /// other code uses, and the reader must not itself touch it.
    ///
    /// # Errors
    /// The ioctl failed, or the range lacks an ioctl ebb needs.
    pub unsafe fn register(&self, hva: u64, len: u64, wp: bool) -> Result<(), UffdError> {
        let mode = UFFDIO_REGISTER_MODE_MISSING | if wp { UFFDIO_REGISTER_MODE_WP } else { 0 };
        let need = [(UFFDIO_COPY_BIT, "UFFDIO_COPY"), (UFFDIO_ZEROPAGE_BIT, "UFFDIO_ZEROPAGE")];
        let wp_need = [(UFFDIO_WRITEPROTECT_BIT, "UFFDIO_WRITEPROTECT")];
        self.register_mode(hva, len, mode, &[&need[..], if wp { &wp_need[..] } else { &[] }])
    }

    /// Unregisters `[hva, hva + len)`: threads waiting on faults there wake, later faults
    /// are served as plain memory, and an `madvise` there no longer waits for a remove event
    /// to be read.
    ///
    /// # Errors
    /// The ioctl failed.
    pub fn unregister(&self, hva: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start: hva, len };
        // SAFETY: UFFDIO_UNREGISTER reads exactly a struct uffdio_range we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_UNREGISTER(), &mut r) };
        if ret != 0 {
            return Err(UffdError::Register { hva, len, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Registers `[hva, hva + len)`, a memfd mapping of a shared page, in write-protect mode
    /// only (its pages are always in the file, so nothing there is ever missing).
    ///
    /// # Safety
    /// As [`register`](Self::register): a write to a protected page of the range waits for
    /// this descriptor's reader.
    ///
    /// # Errors
    /// As [`register`](Self::register).
    pub unsafe fn register_wp_only(&self, hva: u64, len: u64) -> Result<(), UffdError> {
        let need = [(UFFDIO_WRITEPROTECT_BIT, "UFFDIO_WRITEPROTECT")];
        self.register_mode(hva, len, UFFDIO_REGISTER_MODE_WP, &[&need[..]])
    }

    /// Registers the scratch range `[hva, hva + len)` in missing mode, as the destination
    /// of moves.
    ///
    /// # Safety
    /// As [`register`](Self::register): the range must be the caller's own scratch memory.
    ///
    /// # Errors
    /// As [`register`](Self::register).
    pub unsafe fn register_for_moves(&self, hva: u64, len: u64) -> Result<(), UffdError> {
        let need = [(UFFDIO_MOVE_BIT, "UFFDIO_MOVE")];
        self.register_mode(hva, len, UFFDIO_REGISTER_MODE_MISSING, &[&need[..]])
    }

    /// Registers `[hva, hva + len)` with `mode`; every ioctl of `need` must be offered.
    fn register_mode(
        &self,
        hva: u64,
        len: u64,
        mode: u64,
        need: &[&[(u64, &'static str)]],
    ) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { range: UffdioRange { start: hva, len }, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a struct uffdio_register we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut reg) };
        if ret != 0 {
            return Err(UffdError::Register { hva, len, source: io::Error::last_os_error() });
        }
        match need.iter().copied().flatten().find(|(bit, _)| reg.ioctls & bit == 0) {
            Some(&(_, name)) => Err(UffdError::MissingIoctl(name)),
            None => Ok(()),
        }
    }

    /// Copies `src` (whole pages) to the missing range at `dst` (write-protected if `wp`).
    /// Returns what happened and the bytes mapped from `dst` on.
    pub fn copy(&self, dst: u64, src: &[u8], wp: bool) -> Result<(Resolved, u64), UffdError> {
        let mode = if wp { UFFDIO_COPY_MODE_WP } else { 0 };
        let len = src.len() as u64;
        let mut c = UffdioCopy { dst, src: src.as_ptr() as u64, len, mode, copy: 0 };
        // SAFETY: the kernel reads `len` bytes from `src`, a live slice of that length, and
        // maps them at `dst`; a `dst` outside the ranges registered on this fd is refused
        // by the kernel (ENOENT), never written.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut c) };
        resolved("UFFDIO_COPY", dst, len, ret, c.copy)
    }

    /// Maps the shared zero page over the missing range at `dst`.
    /// Returns what happened and the bytes mapped from `dst` on.
    /// With `wake` false the faulting threads sleep on until [`wake`](Self::wake) (or an
    /// unprotect) wakes them: time to write-protect the zero page first.
    pub fn zeropage(&self, dst: u64, len: u64, wake: bool) -> Result<(Resolved, u64), UffdError> {
        let mode = if wake { 0 } else { UFFDIO_ZEROPAGE_MODE_DONTWAKE };
        let mut z = UffdioZeropage { range: UffdioRange { start: dst, len }, mode, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly a struct uffdio_zeropage we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut z) };
        resolved("UFFDIO_ZEROPAGE", dst, len, ret, z.zeropage)
    }

    /// Sets or clears write protection on `[addr, addr + len)`, waking waiters when clearing.
    /// [`Resolved::Retry`] (EAGAIN: a remove is pending) means nothing was done.
    pub fn write_protect(&self, addr: u64, len: u64, protect: bool) -> Result<Resolved, UffdError> {
        let mode = if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 };
        let mut w = UffdioWriteprotect { range: UffdioRange { start: addr, len }, mode };
        // SAFETY: UFFDIO_WRITEPROTECT reads exactly a struct uffdio_writeprotect we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_WRITEPROTECT(), &mut w) };
        done_or_retry("UFFDIO_WRITEPROTECT", addr, ret)
    }

    /// Wakes threads waiting on faults in `[addr, addr + len)`. [`Resolved::Retry`] (EAGAIN)
    /// means nobody was woken.
    pub fn wake(&self, addr: u64, len: u64) -> Result<Resolved, UffdError> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads exactly a struct uffdio_range we own.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_WAKE(), &mut r) };
        done_or_retry("UFFDIO_WAKE", addr, ret)
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
            tid: u32::try_from(m.arg[2] & u64::from(u32::MAX)).unwrap_or(0),
        },
        UFFD_EVENT_REMOVE => Event::Remove { start: m.arg[0], end: m.arg[1] },
        other => Event::Other(other),
    }
}

/// Interprets an ioctl without a byte count: done, or EAGAIN to retry.
fn done_or_retry(what: &'static str, addr: u64, ret: i32) -> Result<Resolved, UffdError> {
    if ret == 0 {
        return Ok(Resolved::Mapped);
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN) => Ok(Resolved::Retry),
        Some(libc::ENOMEM) => Ok(Resolved::NoMemory),
        _ => Err(UffdError::Resolve { what, addr, source }),
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
        // A partial copy says EAGAIN, so ENOMEM means nothing was mapped.
        Some(libc::ENOMEM) => Ok((Resolved::NoMemory, 0)),
        _ => Err(UffdError::Resolve { what, addr, source: err }),
    }
}

static MOVES_CORRECTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Failed `UFFDIO_MOVE`s found to have moved pages after all, in this process so far (see
/// `moved_despite_error`): a kernel quirk worked around, counted for tests and debugging.
pub fn moves_corrected() -> u64 {
    MOVES_CORRECTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many bytes of a failed `UFFDIO_MOVE` to `dst` really moved: the `reported` ones,
/// and after them every page now mapped at `dst`.
///
/// Since Linux 6.17 (batched moves), a move that the kernel retries internally after a
/// transient `EAGAIN` (the source page changed under it: a copy-on-write of the zero page,
/// say) can complete and then report `EEXIST`: its retry loop keeps the old error, tries the
/// same page again, and finds the destination it has just filled. Taken at its word,
/// eviction would leave the page in its scratch range and the guest page unmapped while the
/// table says Resident: the guest would next read zeros. The caller's destination was
/// unmapped before the call and nothing else maps it, so a page mapped there now can only
/// have been moved. `/proc/self/pagemap` is read only on this rare path; if it cannot be
/// read, the kernel's count stands.
fn moved_despite_error(dst: u64, reported: u64, len: u64) -> u64 {
    let done = reported - reported % PAGE_SIZE;
    let left = usize::try_from((len - done) / PAGE_SIZE).unwrap_or(0);
    let more = crate::mm::sys::mapped_pages_from(dst + done, left).unwrap_or(0) as u64;
    (done + more * PAGE_SIZE).min(len)
}
