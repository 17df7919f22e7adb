//! The raw system calls of page sharing: the pool's memfd and its shared view, and the
//! mappings that put a pool page over a guest page (`mremap`) and take it away again
//! (`mmap` of fresh anonymous memory over it). Each is wrapped once here.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use crate::mm::zcache::{Page, PAGE_BYTES};

fn invalid() -> io::Error {
    io::Error::from(io::ErrorKind::InvalidInput)
}

fn to_off(x: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(x).map_err(|_| invalid())
}

fn to_len(x: u64) -> io::Result<usize> {
    usize::try_from(x).map_err(|_| invalid())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new memfd named `name` (close-on-exec), empty.
///
/// # Errors
/// The `memfd_create` error.
pub fn memfd(name: &CStr) -> io::Result<File> {
    // SAFETY: a NUL-terminated name we own; the new descriptor is ours alone.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Frees the memory of `[offset, offset + len)` of `file`; the file keeps its size and
/// those bytes read as zeros.
///
/// # Errors
/// The `fallocate` error.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own; it changes only the file.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, to_off(offset)?, to_off(len)?) })
}

/// A shared, writable view of a whole memfd (`MAP_SHARED`, no swap reservation), unmapped
/// when dropped. Through it ebb writes canonical pages and reads them back.
#[derive(Debug)]
pub struct View {
    hva: u64,
    len: usize,
}

impl View {
    /// Maps `len` bytes of `file` (the file may be shorter yet: only the pages it has may be
    /// read).
    ///
    /// # Errors
    /// The `mmap` error.
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        let len = to_len(len)?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        // TODO(lead, jailer): MADV_DONTDUMP the pool (crate::mm::sys::dont_dump), as guest RAM.
        // SAFETY: a fresh mapping at an address the kernel picks; nothing else refers to it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { hva: p as u64, len })
    }

    fn at(&self, slot: u64) -> Option<*mut u8> {
        let offset = usize::try_from(slot).ok()?.checked_mul(PAGE_BYTES)?;
        (offset.checked_add(PAGE_BYTES)? <= self.len)
            .then(|| (self.hva as *mut u8).wrapping_add(offset))
    }

    /// The 64-bit word at index `i` of the view, shared with every process that maps the
    /// same file (a sharing group's tables).
    pub fn word(&self, i: u64) -> Option<&std::sync::atomic::AtomicU64> {
        let offset = usize::try_from(i).ok()?.checked_mul(8)?;
        if offset.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in bounds of our live mapping, 8-byte aligned (the mapping is page
        // aligned); AtomicU64 has the layout of u64, and every process touches these words
        // only atomically.
        Some(unsafe {
            &*(self.hva as *const u8).wrapping_add(offset).cast::<std::sync::atomic::AtomicU64>()
        })
    }

    /// Copies the page of slot `slot` into `out`; false past the end of the view. The
    /// mapping is shared with other processes (a sharing group's members), which may write
    /// it whatever the protocol says, so it is copied out with volatile reads, never
    /// borrowed: a torn copy is at worst wrong bytes, never undefined behaviour.
    pub fn read(&self, slot: u64, out: &mut Page) -> bool {
        let Some(p) = self.at(slot) else { return false };
        let src = p.cast::<u64>().cast_const();
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: in bounds of our live mapping (`at` checked the whole page), 8-byte
            // aligned (page aligned plus a multiple of 8); `i` < 512.
            let word = unsafe { std::ptr::read_volatile(src.add(i)) };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        true
    }

    /// Writes `content` into slot `slot`, which nothing maps or reads yet.
    pub fn write(&self, slot: u64, content: &Page) -> bool {
        let Some(p) = self.at(slot) else { return false };
        // SAFETY: in bounds of our live mapping; the slot is free, so no reference into it
        // exists.
        unsafe { std::ptr::copy_nonoverlapping(content.as_ptr(), p, PAGE_BYTES) };
        true
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped, once.
        unsafe { libc::munmap(self.hva as *mut libc::c_void, self.len) };
    }
}

/// Maps the page of `file` at `offset` privately, read-write, at an address the kernel
/// picks: a write would give the writer a private copy, never change the file.
///
/// # Errors
/// The `mmap` error.
pub fn map_private_page(file: &File, offset: u64) -> io::Result<u64> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    // SAFETY: a fresh mapping at an address the kernel picks; nothing else refers to it.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), PAGE_BYTES, prot, flags, file.as_raw_fd(), to_off(offset)?)
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as u64)
}

/// Unmaps one page mapped by [`map_private_page`] or [`map_anon_page`] that was not moved.
///
/// # Safety
/// `hva` must be such a page, with no references into it.
pub unsafe fn unmap_page(hva: u64) {
    // SAFETY: the caller guarantees it is our staging page.
    unsafe { libc::munmap(hva as *mut libc::c_void, PAGE_BYTES) };
}

/// Reads a byte of the page at `hva`, so that its page-table entry exists.
///
/// # Safety
/// `hva` must be a readable mapping that is not registered for missing faults.
pub unsafe fn populate(hva: u64) {
    // SAFETY: the caller guarantees the address is mapped and readable.
    unsafe { std::ptr::read_volatile(hva as *const u8) };
}

/// Moves the one-page mapping at `from` over the page at `to`, replacing what was mapped
/// there; `from` is unmapped afterwards.
///
/// # Safety
/// `from` must be a page of ours with no references into it, and `to` a page of guest RAM
/// whose mapping may be replaced (claimed, its contents moved out).
///
/// # Errors
/// The `mremap` error (nothing moved).
pub unsafe fn remap_page_over(from: u64, to: u64) -> io::Result<()> {
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    // SAFETY: the caller guarantees both pages are ours to move and replace.
    let p = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            PAGE_BYTES,
            PAGE_BYTES,
            flags,
            to as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps one fresh private anonymous page (no swap reservation, as guest RAM is mapped) at
/// an address the kernel picks: empty until written.
///
/// # Errors
/// The `mmap` error.
pub fn map_anon_page() -> io::Result<u64> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh mapping at an address the kernel picks; nothing else refers to it.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE_BYTES, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as u64)
}

/// Copies the page at `hva` into `out` with volatile reads: the guest may be writing it, so
/// the copy may be torn, which only hashing tolerates (anything shared is compared again
/// once frozen).
///
/// # Safety
/// `hva` must be a mapped page of guest RAM (an unmapped one would fault to the handler).
pub unsafe fn read_page_racy(hva: u64, out: &mut Page) {
    let src = hva as *const u64;
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        // SAFETY: the caller guarantees the page is mapped; `i` < 512 stays inside it.
        let word = unsafe { std::ptr::read_volatile(src.add(i)) };
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
}

/// `vm.max_map_count`: the most mappings a process may have (65530 if unreadable).
pub fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65_530)
}
