//! The raw system calls `mm` makes outside userfaultfd: `madvise`, `mincore`, `poll`, and the
//! CPU-time clock of a thread. Each is wrapped once here; the rest of `mm` calls the wrappers.

use std::io;
use std::os::fd::RawFd;

/// Stack each long-lived thread of a VM touches when it starts (see [`prefault_stack`]).
pub const THREAD_STACK_RESERVE: usize = 256 * 1024;

/// Drops the contents of `[hva, hva + len)`: later accesses see zeros, and, where the range is
/// registered with userfaultfd, fault again as missing pages.
///
/// With `UFFD_FEATURE_EVENT_REMOVE` the call blocks until the userfaultfd reader has read the
/// remove event, so the reader thread itself must never call it on registered memory.
///
/// # Safety
/// The range must lie inside guest RAM, which ebb maps privately and anonymously, and no
/// Rust reference may point into it (only raw accesses through the guest mapping).
///
/// # Errors
/// The `madvise` error.
pub unsafe fn madvise_dontneed(hva: u64, len: u64) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the caller guarantees the range is guest RAM without references into it;
    // MADV_DONTNEED on private anonymous memory only drops its contents.
    let ret = unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks `[hva, hva + len)` mergeable for the kernel's KSM (`MADV_MERGEABLE`): `ksmd` then
/// merges identical pages there with those of every other mergeable range on the host.
///
/// # Errors
/// The `madvise` error (`EINVAL` where the kernel has no KSM).
pub fn madvise_mergeable(hva: u64, len: u64) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: MADV_MERGEABLE changes no contents and no mapping, only a flag ksmd reads.
    let ret = unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_MERGEABLE) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Leaves a range out of core dumps: guest RAM's own helper (see there), which every
/// mapping that page sharing or reclaim moves pages through uses too.
pub use crate::vstate::memory::dont_dump;

/// A private anonymous mapping of `len` bytes (no swap reservation), unmapped when dropped.
#[derive(Debug)]
pub struct Mapping {
    hva: u64,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes.
    ///
    /// # Errors
    /// The `mmap` error.
    pub fn new(len: usize) -> io::Result<Self> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping at an address the kernel picks; nothing else refers to it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { hva: p as u64, len })
    }

    /// Its address.
    pub fn hva(&self) -> u64 {
        self.hva
    }

    /// The address `offset` bytes in (the caller keeps it in bounds before dereferencing).
    fn at(&self, offset: usize) -> *mut u8 {
        (self.hva as *mut u8).wrapping_add(offset)
    }

    /// Its length in bytes.
    pub fn size_bytes(&self) -> usize {
        self.len
    }

    /// Copies the 4 KiB page at byte `offset` into `out`, which the caller knows is mapped
    /// (reading a missing page of a userfaultfd-registered mapping would wait for a
    /// handler); false past the end. The kernel writes the mapping too (moves into it,
    /// drops), so it is copied out with volatile reads rather than borrowed: no reference
    /// into it can outlive a change.
    pub fn read(&self, offset: usize, out: &mut [u8; 4096]) -> bool {
        if offset % 8 != 0 || offset.checked_add(4096).is_none_or(|end| end > self.len) {
            return false;
        }
        let src = self.at(offset).cast::<u64>().cast_const();
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: in bounds of our live mapping (checked above) and 8-byte aligned (the
            // mapping is page aligned and `offset` a multiple of 8); i < 512.
            let word = unsafe { std::ptr::read_volatile(src.add(i)) };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        true
    }

    /// Drops the contents of `[offset, offset + len)` (no remove events: the scratch range
    /// is registered on a descriptor without them).
    pub fn drop_range(&self, offset: usize, len: usize) -> io::Result<()> {
        let len = len.min(self.len.saturating_sub(offset));
        // SAFETY: a range of our own mapping; no references into it outlive this call.
        let ret = unsafe {
            libc::madvise(self.at(offset).cast::<libc::c_void>(), len, libc::MADV_DONTNEED)
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped, once.
        unsafe { libc::munmap(self.hva as *mut libc::c_void, self.len) };
    }
}

/// How many of the `pages` pages from `hva` on are mapped in this process (present, or
/// swapped out by the kernel) before the first that is not, as `/proc/self/pagemap` says;
/// reading it never faults a page in.
///
/// # Errors
/// `/proc/self/pagemap` could not be read.
pub fn mapped_pages_from(hva: u64, pages: usize) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let file = shared_pagemap()?;
    let mut entries = vec![0u8; pages * 8];
    file.read_exact_at(&mut entries, hva / crate::units::PAGE_SIZE * 8)?;
    Ok(entries
        .chunks_exact(8)
        .take_while(|e| {
            let e: [u8; 8] = (*e).try_into().unwrap_or_default();
            u64::from_le_bytes(e) & (PRESENT | SWAPPED) != 0
        })
        .count())
}

/// `/proc/self/pagemap`, opened once by [`open_pagemap`] (or at first use).
static PAGEMAP: std::sync::OnceLock<io::Result<std::fs::File>> = std::sync::OnceLock::new();

/// Opens `/proc/self/pagemap` for every later reader. `ebb run` calls it before it makes
/// itself non-dumpable: the pagemap of a non-dumpable process belongs to root (mode 0400),
/// so an unprivileged one could not open its own afterwards.
pub fn open_pagemap() {
    let _ = shared_pagemap();
}

/// The descriptor of the shared pagemap, if it is open.
pub fn pagemap_fd() -> Option<RawFd> {
    use std::os::fd::AsRawFd;
    PAGEMAP.get().and_then(|r| r.as_ref().ok()).map(AsRawFd::as_raw_fd)
}

fn shared_pagemap() -> io::Result<&'static std::fs::File> {
    let opened = PAGEMAP.get_or_init(|| std::fs::File::open("/proc/self/pagemap"));
    opened.as_ref().map_err(|e| io::Error::new(e.kind(), e.to_string()))
}

/// `/proc/self/pagemap`, kept open: whether a page is mapped, without faulting it in.
#[derive(Debug)]
pub struct Pagemap(std::fs::File);

impl Pagemap {
    /// Opens this process's pagemap.
    ///
    /// # Errors
    /// The open error.
    pub fn open() -> io::Result<Self> {
        shared_pagemap()?.try_clone().map(Self)
    }

    /// True if the page at `hva` is mapped (present, or swapped out by the kernel, which
    /// brings it back itself): an access to it never reaches a userfaultfd handler.
    ///
    /// # Errors
    /// The read error.
    pub fn is_mapped(&self, hva: u64) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let mut entry = [0u8; 8];
        self.0.read_exact_at(&mut entry, hva / crate::units::PAGE_SIZE * 8)?;
        Ok(u64::from_le_bytes(entry) & (PRESENT | SWAPPED) != 0)
    }
}

/// Which pages of the mapping `[hva, hva + pages * 4 KiB)` are resident, one bool per page.
///
/// # Errors
/// The `mincore` error (`ENOMEM` if part of the range is not mapped).
pub fn resident_pages(hva: u64, pages: u64) -> io::Result<Vec<bool>> {
    let too_big = || io::Error::from(io::ErrorKind::InvalidInput);
    let n = usize::try_from(pages).map_err(|_| too_big())?;
    let len = pages
        .checked_mul(crate::units::PAGE_SIZE)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(too_big)?;
    let mut vec = vec![0u8; n];
    // SAFETY: mincore only reads the page tables of the range (an unmapped range gives
    // ENOMEM) and writes one byte per page into `vec`, which has exactly that many.
    let ret = unsafe { libc::mincore(hva as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|v| v & 1 != 0).collect())
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (-1: no limit); returns the
/// readiness of each (`revents != 0`). An interrupted wait reports nothing ready.
///
/// # Errors
/// The `poll` error other than `EINTR`.
pub fn poll_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    let n = libc::nfds_t::try_from(N).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `pfds` is a live array of N pollfd; poll ignores negative fds.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), n, timeout_ms) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(pfds.map(|p| p.revents != 0))
}

/// Touches `bytes` of the calling thread's stack now, so that a deeper call later does not
/// need a new page: a thread that must go on while its memory cgroup is at its limit would
/// otherwise wait in the kernel for a stack page.
#[inline(never)]
pub fn prefault_stack(bytes: usize) {
    // One 16 KiB frame per call, so the touched pages are consecutive stack pages.
    const CHUNK: usize = 16 * 1024;
    let mut page = [0u8; CHUNK];
    // SAFETY: a volatile write into our own local array, only to make it resident.
    unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 1) };
    for i in (0..CHUNK).step_by(4096) {
        // SAFETY: as above, one byte per page of the array.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr().add(i), 1) };
    }
    if bytes > CHUNK {
        prefault_stack(bytes - CHUNK);
    }
    std::hint::black_box(&page);
}

/// The CPU-time clock of the calling thread, readable from other threads while it lives.
pub fn current_thread_cpu_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self is always valid for the calling thread; the out pointer is ours.
    let ret = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    (ret == 0).then_some(clock)
}

/// The time of `clock` in nanoseconds (0 if it cannot be read, e.g. its thread has exited).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own; a stale clock id gives EINVAL.
    let ret = unsafe { libc::clock_gettime(clock, &mut ts) };
    if ret != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
