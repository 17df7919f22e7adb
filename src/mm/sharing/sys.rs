//! The raw system calls of page sharing: the pool's memfd, its seals and its views, the
//! mappings that put a pool page over a guest page (`mremap`) and take it away again
//! (`mmap` of fresh anonymous memory over it), and the packet sockets of a sharing group's
//! broker. Each is wrapped once here.
//!
//! Every mapping made here holds guest data, so each is `MADV_DONTDUMP`: a core dump of a
//! VM process must not carry guest memory (or another VM's) to disk.

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

/// Seals that make a memfd read-only for every descriptor and every future mapping:
/// writes, new shared writable mappings, holes, truncation and growth are refused, and so
/// is changing the seals. Mappings made writable before the seal keep working (the broker's).
pub const READ_ONLY_SEALS: libc::c_int =
    libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A new memfd named `name` (close-on-exec) that accepts seals, empty.
///
/// # Errors
/// The `memfd_create` error.
pub fn sealable_memfd(name: &CStr) -> io::Result<File> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: a NUL-terminated name we own; the new descriptor is ours alone.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Adds [`READ_ONLY_SEALS`] to `file`.
///
/// # Errors
/// The `fcntl` error (a memfd made without `MFD_ALLOW_SEALING` refuses).
pub fn seal_read_only(file: &File) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS only changes the file's seals.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, READ_ONLY_SEALS) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `file` carries every one of [`READ_ONLY_SEALS`].
///
/// # Errors
/// The `fcntl` error (not a memfd, for one).
pub fn is_sealed_read_only(file: &File) -> io::Result<bool> {
    // SAFETY: F_GET_SEALS only reads the file's seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals & READ_ONLY_SEALS == READ_ONLY_SEALS)
}

/// A new read-only descriptor of the file behind `file` (a separate open file description,
/// so that the holder cannot `fcntl` its way to writing).
///
/// # Errors
/// The `open` error (`/proc` not mounted, for one).
pub fn reopen_read_only(file: &File) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::OpenOptions::new().read(true).open(path)
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
        Self::map(file, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of `file` for reading only (a sealed pool, a read-only descriptor):
    /// [`View::write`] on it would fault, so only the broker's own view is ever written.
    ///
    /// # Errors
    /// The `mmap` error.
    pub fn read_only(file: &File, len: u64) -> io::Result<Self> {
        Self::map(file, len, libc::PROT_READ)
    }

    fn map(file: &File, len: u64, prot: libc::c_int) -> io::Result<Self> {
        let len = to_len(len)?;
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping at an address the kernel picks; nothing else refers to it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        crate::mm::sys::dont_dump(p as u64, len);
        Ok(Self { hva: p as u64, len })
    }

    fn at(&self, slot: u64) -> Option<*mut u8> {
        let offset = usize::try_from(slot).ok()?.checked_mul(PAGE_BYTES)?;
        (offset.checked_add(PAGE_BYTES)? <= self.len)
            .then(|| (self.hva as *mut u8).wrapping_add(offset))
    }

    /// Copies the page of slot `slot` into `out`; false past the end of the view. The
    /// mapping is shared with another process (a sharing group's broker, which writes only
    /// free slots, but is another process all the same), so it is copied out with volatile
    /// reads, never borrowed: a torn copy is at worst wrong bytes, never undefined behaviour.
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
    crate::mm::sys::dont_dump(p as u64, PAGE_BYTES);
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
    crate::mm::sys::dont_dump(p as u64, PAGE_BYTES);
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
