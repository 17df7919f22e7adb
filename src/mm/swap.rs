//! The per-VM swap file: guest pages the host reclaimed and could not keep compressed.
//!
//! [`SwapFile`] owns one unnamed file in a directory the operator chose, and the
//! [`SlotAllocator`] of its 4 KiB slots. Which guest page is in which slot belongs to the
//! caller (the page-state table); this module only stores and returns page contents.
//!
//! # Invariants
//! - The file never has a name while ebb runs: it is opened with `O_TMPFILE`, or, where the
//!   file system lacks it, created under a random name (mode 0600, `O_EXCL`) and unlinked
//!   before [`SwapFile::create`] returns. Nothing is left behind, even after `kill -9`.
//! - Slot `s` is the bytes `[s * 4096, (s + 1) * 4096)` of the file. Slots are handed out
//!   lowest first, so the file stays as short as the peak number of pages swapped; it never
//!   shrinks ([`SwapFile::file_bytes`] is the high-water mark).
//! - Pages are written and read only in allocated slots; a write or read of any other slot
//!   is [`SwapError::BadSlot`] and touches nothing.
//! - A failed write reports exactly the slots whose pages are not known to be on the device,
//!   so the caller keeps those pages where they were; a failed or short read is an error,
//!   never a page of zeros.
//! - Every page written has a checksum ([`page_sum`], xxh3 of the exact bytes handed to the
//!   kernel, seeded with the slot), which the caller keeps and gives back to
//!   [`SwapFile::read`]: a page that comes back with other bytes (a flipped bit on the
//!   device, a lost or misdirected write, a hole read as zeros) is
//!   [`SwapError::Checksum`], never a page for the guest.
//! - Each batch's outcome is its own: [`SwapFile::write_batch`] waits for the writeback of
//!   every page it wrote, whatever became of its other runs, so a device error is reported
//!   to the caller of that batch, who still has the pages, and never to the next one. The
//!   pages it reports written are then on the device, and out of the page cache (the host
//!   memory is freed, not moved to the cache).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::zcache::{Page, PAGE_BYTES, PAGE_SIZE};

/// Bytes of one slot: one page.
pub const SLOT_BYTES: u64 = PAGE_SIZE;
/// Most pages one write carries: a longer run of consecutive slots is split. 64 pages
/// (256 KiB) is past the size where larger writes stop getting faster on SSDs and the page
/// cache, and bounds the staging buffer.
pub const MAX_RUN_PAGES: usize = 64;
/// Permissions of the swap file: the owner only (guest memory is private).
const FILE_MODE: u32 = 0o600;
/// Names tried when falling back to a named file, before giving up on collisions.
const NAME_ATTEMPTS: u32 = 16;
/// Start of the fallback file's name (hidden, and says whose it is if ever seen).
const NAME_PREFIX: &str = ".ebb-swap-";
/// Bits in one word of the allocator's bitmaps.
const WORD_BITS: usize = 64;
/// [`WORD_BITS`] as a u64, for slot arithmetic.
const WORD_BITS_U64: u64 = 64;
const _: () = assert!(WORD_BITS as u64 == WORD_BITS_U64);
/// Slots listed in an error message before "and N more".
const SLOTS_SHOWN: usize = 8;
/// Most slots a swap file has (4 TiB of pages): a page's location word (`reclaim::store`)
/// keeps the slot in 30 bits, beside its 32-bit checksum and 2 bits of tag.
pub const MAX_SLOTS: u64 = 1 << 30;

/// The checksum of a page written to `slot`: the high half of the page's xxh3, seeded with
/// the slot so that another slot's bytes (a misdirected write or read) do not pass either.
pub fn page_sum(slot: u64, bytes: &[u8]) -> u32 {
    let hash = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, slot);
    u32::try_from(hash >> 32).unwrap_or(u32::MAX)
}

/// How the file came to be unnamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// `open(dir, O_TMPFILE)`: it never had a name.
    TmpFile,
    /// The file system has no `O_TMPFILE`: created under a random name and unlinked at once.
    UnlinkedName,
}

/// Slots whose pages are not on the file after a failed write, displayed briefly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedSlots(pub Vec<u64>);

impl fmt::Display for FailedSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} slot{}", if n == 1 { "" } else { "s" })?;
        let shown: Vec<String> = self.0.iter().take(SLOTS_SHOWN).map(u64::to_string).collect();
        write!(f, " ({}", shown.join(", "))?;
        if n > SLOTS_SHOWN {
            write!(f, " and {} more", n - SLOTS_SHOWN)?;
        }
        write!(f, ")")
    }
}

/// What went wrong with the swap file. Write errors name every slot whose page did not
/// reach the file; the pages of the other slots of the batch did.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The file could not be created in the directory.
    #[error("cannot create the swap file in {}: {advice}", dir.display())]
    Create {
        /// The directory given.
        dir: PathBuf,
        /// What the operator can do about it.
        advice: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// The file system is full (`ENOSPC`, or `EDQUOT` for a quota).
    #[error("swap file: no space left on its file system; not written: {failed}")]
    NoSpace {
        /// Slots whose pages are not on the file.
        failed: FailedSlots,
    },
    /// Any other write error (`EIO`, `EFBIG`, ...).
    #[error("swap file write failed; not written: {failed} ({source})")]
    Io {
        /// Slots whose pages are not on the file.
        failed: FailedSlots,
        /// The system's error.
        source: io::Error,
    },
    /// A write returned 0 bytes without an error.
    #[error("swap file write wrote nothing; not written: {failed}")]
    ShortWrite {
        /// Slots whose pages are not on the file.
        failed: FailedSlots,
    },
    /// The page came back with other bytes than were written to it: the device or the file
    /// system under the swap file changed them, and the page is lost.
    #[error(
        "swap slot {slot} does not hold what was written to it (checksum {found:#010x}, \
         written {expected:#010x}): the device or file system under the swap file changed it"
    )]
    Checksum {
        /// The slot read.
        slot: u64,
        /// The checksum of the bytes written.
        expected: u32,
        /// The checksum of the bytes read.
        found: u32,
    },
    /// The kernel had no memory for the read (`ENOMEM`: a page cache allocation in a memory
    /// cgroup at its limit). Nothing is lost: the read may be tried again.
    #[error("swap file read of slot {slot}: no memory for the read (ENOMEM)")]
    NoMemory {
        /// The slot read.
        slot: u64,
    },
    /// A read failed: the page is lost.
    #[error("swap file read of slot {slot} failed: {source}")]
    Read {
        /// The slot read.
        slot: u64,
        /// The system's error.
        source: io::Error,
    },
    /// A read found the end of the file before a whole page: the page is lost.
    #[error("swap file read of slot {slot} came back short (the file ends before it)")]
    ShortRead {
        /// The slot read.
        slot: u64,
    },
    /// The slot is not allocated (a caller bug); nothing was read or written.
    #[error("swap slot {slot} is not allocated")]
    BadSlot {
        /// The slot given.
        slot: u64,
    },
}

impl SwapError {
    /// The slots a failed write did not write (empty for other errors).
    pub fn failed_slots(&self) -> &[u64] {
        match self {
            SwapError::NoSpace { failed }
            | SwapError::Io { failed, .. }
            | SwapError::ShortWrite { failed } => &failed.0,
            _ => &[],
        }
    }
}

/// Counts of failed operations, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SwapErrorCounts {
    /// Batches that hit a full file system.
    pub no_space: u64,
    /// Batches that hit another write error.
    pub io: u64,
    /// Batches whose write returned 0 bytes.
    pub short_write: u64,
    /// Reads that failed, came back short, or came back changed (not `ENOMEM`, which is
    /// retried).
    pub read: u64,
}

/// The slots of a swap file: lowest free slot first, at most `max_slots`.
///
/// A bitmap of allocated slots up to the high-water mark serves as the free list (a bit per
/// slot, not 8 bytes per free slot as a list of numbers would take: 4 KiB of bitmap per
/// 128 MiB of swap), with a summary bitmap of the words that have a free slot, so an
/// allocation looks at one bit per 4096 slots at most.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    max_slots: u64,
    high_water: u64,
    used: u64,
    /// Bit `s` set: slot `s` is allocated. Covers `[0, high_water)`; bits above are 0.
    bits: Vec<u64>,
    /// Bit `w` set: word `w` of `bits` has a free slot below the high-water mark.
    summary: Vec<u64>,
    /// No word of `summary` below this has a bit set.
    summary_hint: usize,
    bad_frees: u64,
}

/// `(word, bit mask)` of bit `i` in a bitmap, or None if `i` does not fit a `usize` index.
fn locate(i: u64) -> Option<(usize, u64)> {
    Some((usize::try_from(i / WORD_BITS_U64).ok()?, 1u64 << (i % WORD_BITS_U64)))
}

impl SlotAllocator {
    /// An allocator of at most `max_slots` slots, none allocated.
    pub fn new(max_slots: u64) -> Self {
        Self {
            max_slots,
            high_water: 0,
            used: 0,
            bits: Vec::new(),
            summary: Vec::new(),
            summary_hint: 0,
            bad_frees: 0,
        }
    }

    /// The lowest free slot, or None if all `max_slots` are allocated.
    pub fn alloc(&mut self) -> Option<u64> {
        let slot = match self.first_free_word() {
            Some(w) => {
                let word = self.bits.get(w)?;
                u64::try_from(w).ok()? * WORD_BITS_U64 + u64::from((!word).trailing_zeros())
            }
            None if self.high_water < self.max_slots => {
                let slot = self.high_water;
                self.high_water += 1;
                let (w, _) = locate(slot)?;
                if self.bits.len() <= w {
                    self.bits.resize(w + 1, 0);
                }
                let sw = w / WORD_BITS;
                if self.summary.len() <= sw {
                    self.summary.resize(sw + 1, 0);
                }
                slot
            }
            None => return None,
        };
        let (w, m) = locate(slot)?;
        let word = self.bits.get_mut(w)?;
        *word |= m;
        if !self.word_has_free(w) {
            self.set_summary(w, false);
        }
        self.used += 1;
        Some(slot)
    }

    /// Frees `slot`. Returns false, changing nothing but the count of bad frees, if it is
    /// not allocated (a double free, or a slot never handed out).
    pub fn free(&mut self, slot: u64) -> bool {
        if !self.is_allocated(slot) {
            self.bad_frees += 1;
            return false;
        }
        let Some((w, m)) = locate(slot) else { return false };
        if let Some(word) = self.bits.get_mut(w) {
            *word &= !m;
        }
        self.set_summary(w, true);
        self.used -= 1;
        true
    }

    /// Whether `slot` is allocated.
    pub fn is_allocated(&self, slot: u64) -> bool {
        slot < self.high_water
            && locate(slot).is_some_and(|(w, m)| self.bits.get(w).is_some_and(|b| b & m != 0))
    }

    /// Slots allocated now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// One past the highest slot ever allocated: the file is at most this many slots long.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// The most slots there may be.
    pub fn max_slots(&self) -> u64 {
        self.max_slots
    }

    /// Frees refused because the slot was not allocated.
    pub fn bad_frees(&self) -> u64 {
        self.bad_frees
    }

    /// Whether word `w` of `bits` has a free slot below the high-water mark.
    fn word_has_free(&self, w: usize) -> bool {
        let Ok(w64) = u64::try_from(w) else { return false };
        let below = self.high_water.saturating_sub(w64 * WORD_BITS_U64).min(WORD_BITS_U64);
        let mask = if below == WORD_BITS_U64 { u64::MAX } else { (1u64 << below) - 1 };
        self.bits.get(w).is_some_and(|b| b & mask != mask)
    }

    fn set_summary(&mut self, w: usize, on: bool) {
        let (sw, m) = (w / WORD_BITS, 1u64 << (w % WORD_BITS));
        if let Some(s) = self.summary.get_mut(sw) {
            if on {
                *s |= m;
                self.summary_hint = self.summary_hint.min(sw);
            } else {
                *s &= !m;
            }
        }
    }

    /// The lowest word of `bits` with a free slot below the high-water mark.
    fn first_free_word(&mut self) -> Option<usize> {
        let start = self.summary_hint.min(self.summary.len());
        match self.summary[start..].iter().position(|&s| s != 0) {
            Some(i) => {
                let sw = start + i;
                self.summary_hint = sw;
                let bit = usize::try_from(self.summary[sw].trailing_zeros()).ok()?;
                Some(sw * WORD_BITS + bit)
            }
            None => {
                self.summary_hint = self.summary.len();
                None
            }
        }
    }
}

/// The swap file of one VM: see the module documentation.
pub struct SwapFile {
    file: File,
    dir: PathBuf,
    creation: Creation,
    /// Held only for a slot's allocation, release or check: never during I/O, so that a
    /// read (a guest's swap-in) never waits for a batch being written.
    slots: Mutex<SlotAllocator>,
    /// The writer's buffers; held for a whole [`SwapFile::write_batch`], which readers
    /// never take.
    writer: Mutex<Writer>,
    no_space: AtomicU64,
    io_errors: AtomicU64,
    short_writes: AtomicU64,
    read_errors: AtomicU64,
    /// Errors to inject in place of the system's (tests only).
    #[cfg(test)]
    faults: Mutex<faults::Faults>,
}

/// Buffers of the one batch being written.
#[derive(Debug)]
struct Writer {
    /// Consecutive pages of a run, copied together for one write.
    staging: Vec<u8>,
    /// The batch's pages in slot order (reused, so a batch allocates nothing).
    order: Vec<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for SwapFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapFile")
            .field("dir", &self.dir)
            .field("creation", &self.creation)
            .field("slots", &self.slots)
            .field("errors", &self.errors())
            .finish_non_exhaustive()
    }
}

/// What to tell the operator about a failure to create a file in `dir`.
fn advice(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => {
            "the directory does not exist: create it, or choose another directory for swap"
        }
        io::ErrorKind::PermissionDenied => {
            "this user may not create files there: give it write permission on the \
             directory, or choose another directory for swap"
        }
        io::ErrorKind::ReadOnlyFilesystem => {
            "it is on a read-only file system: choose a directory on a writable one"
        }
        io::ErrorKind::NotADirectory => "that is not a directory: give a directory",
        _ => "choose another directory for swap, on a local writable file system",
    }
}

/// A random-enough file name for the fallback: pid, time and attempt (collisions are
/// retried with `O_EXCL`, so this needs to be unlikely to collide, not unpredictable).
fn fallback_name(attempt: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{NAME_PREFIX}{}-{nanos:x}-{attempt}", std::process::id())
}

/// Creates a file under a fresh random name in `dir` (mode 0600, `O_EXCL`) and unlinks it.
fn create_unlinked_named(dir: &Path) -> io::Result<File> {
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for attempt in 0..NAME_ATTEMPTS {
        let path = dir.join(fallback_name(attempt));
        match OpenOptions::new().read(true).write(true).create_new(true).mode(FILE_MODE).open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Why one write of a batch stopped.
enum WriteFailure {
    Short,
    Os(io::Error),
}

impl WriteFailure {
    fn is_no_space(&self) -> bool {
        matches!(self, WriteFailure::Os(e)
            if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }
}

impl SwapFile {
    /// Creates the swap file of at most `max_bytes` (rounded down to whole slots, and at
    /// most [`MAX_SLOTS`]) in `dir`, unnamed from the start. Takes no disk space until pages
    /// are written.
    ///
    /// # Errors
    /// [`SwapError::Create`], naming `dir` and what to do about it (the directory is
    /// missing, not a directory, not writable, read-only).
    pub fn create(dir: &Path, max_bytes: u64) -> Result<SwapFile, SwapError> {
        let fail = |source: io::Error| SwapError::Create {
            dir: dir.to_path_buf(),
            advice: advice(&source),
            source,
        };
        let tmp = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_TMPFILE)
            .open(dir);
        let (file, creation) = match tmp {
            Ok(f) => (f, Creation::TmpFile),
            // EOPNOTSUPP: the file system has no O_TMPFILE; EISDIR: the kernel has none.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
                (create_unlinked_named(dir).map_err(fail)?, Creation::UnlinkedName)
            }
            Err(e) => return Err(fail(e)),
        };
        Ok(SwapFile {
            file,
            dir: dir.to_path_buf(),
            creation,
            slots: Mutex::new(SlotAllocator::new((max_bytes / SLOT_BYTES).min(MAX_SLOTS))),
            writer: Mutex::new(Writer {
                staging: vec![0u8; MAX_RUN_PAGES * PAGE_BYTES],
                order: Vec::new(),
            }),
            no_space: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
            short_writes: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            #[cfg(test)]
            faults: Mutex::default(),
        })
    }

    /// A free slot (the lowest), or None if the file is at its size limit.
    pub fn alloc_slot(&self) -> Option<u64> {
        lock(&self.slots).alloc()
    }

    /// Frees a slot whose page the caller no longer needs. Returns false, changing nothing,
    /// if it was not allocated (counted in [`SlotAllocator::bad_frees`]).
    pub fn free_slot(&self, slot: u64) -> bool {
        lock(&self.slots).free(slot)
    }

    /// Writes each page to its slot (all allocated), coalescing runs of consecutive slots
    /// into one write of up to [`MAX_RUN_PAGES`] pages, and puts in `sums[i]` the checksum
    /// ([`page_sum`]) of the bytes written for page `i`, which [`read`](Self::read) needs
    /// back. After an error in one run the other runs are still tried, so as many pages as
    /// possible reach the file; and every page written is waited for before this returns,
    /// so the batch's outcome is exact and no error of it is left for the next batch.
    ///
    /// # Errors
    /// [`SwapError::BadSlot`] (nothing written) if a slot is not allocated; otherwise
    /// [`SwapError::NoSpace`], [`SwapError::Io`] or [`SwapError::ShortWrite`], listing every
    /// slot (in slot order) whose page is not known to be on the device: the caller keeps
    /// those pages and may free those slots. The pages of the other slots are on the device,
    /// and their `sums` are good. A writeback error fails the whole batch: the kernel keeps
    /// one such error per file, not per page, so it cannot be pinned on one run.
    pub fn write_batch(
        &self,
        pages: &[(u64, &Page)],
        sums: &mut Vec<u32>,
    ) -> Result<(), SwapError> {
        sums.clear();
        sums.resize(pages.len(), 0);
        {
            let slots = lock(&self.slots);
            if let Some(&(slot, _)) = pages.iter().find(|(s, _)| !slots.is_allocated(*s)) {
                return Err(SwapError::BadSlot { slot });
            }
        }
        let mut writer = lock(&self.writer);
        let Writer { staging, order } = &mut *writer;
        order.clear();
        order.extend(0..pages.len());
        order.sort_unstable_by_key(|&i| (pages[i].0, i));
        let mut failed: Vec<u64> = Vec::new();
        let mut first: Option<WriteFailure> = None;
        let mut start = 0;
        while start < order.len() {
            let mut end = start + 1;
            while end < order.len()
                && end - start < MAX_RUN_PAGES
                && pages[order[end]].0 == pages[order[end - 1]].0 + 1
            {
                end += 1;
            }
            let run = &order[start..end];
            let first_slot = pages[run[0]].0;
            // Each checksum is of the very bytes handed to the kernel.
            let res = if let [single] = run {
                sums[*single] = page_sum(first_slot, &pages[*single].1[..]);
                self.write_all_at(&pages[*single].1[..], first_slot * SLOT_BYTES)
            } else {
                for (k, &i) in run.iter().enumerate() {
                    let bytes = &mut staging[k * PAGE_BYTES..(k + 1) * PAGE_BYTES];
                    bytes.copy_from_slice(pages[i].1);
                    sums[i] = page_sum(pages[i].0, bytes);
                }
                let len = run.len() * PAGE_BYTES;
                self.write_all_at(&staging[..len], first_slot * SLOT_BYTES)
            };
            if let Err((done, why)) = res {
                // Pages wholly written before the error are on the file; the rest are not.
                failed.extend(run.iter().skip(done / PAGE_BYTES).map(|&i| pages[i].0));
                first.get_or_insert(why);
            }
            start = end;
        }
        // Wait for every run written, failed runs or not: a run left unsettled would be
        // reported written without being on the device, and its writeback error would be
        // reported to the next batch, which would be refused for it.
        let slots = order.iter().map(|&i| pages[i].0);
        if let (Some(lo), Some(hi)) = (slots.clone().min(), slots.max()) {
            if let Err(e) = self.settle(lo, hi) {
                // Written, but not on the device: none of the batch can be trusted. The
                // device error is the graver one, and the one the operator must see.
                failed.clear();
                failed.extend(order.iter().map(|&i| pages[i].0));
                first = Some(WriteFailure::Os(e));
            }
        }
        drop(writer);
        let Some(why) = first else { return Ok(()) };
        let failed = FailedSlots(failed);
        Err(if why.is_no_space() {
            self.no_space.fetch_add(1, Ordering::Relaxed);
            SwapError::NoSpace { failed }
        } else {
            match why {
                WriteFailure::Short => {
                    self.short_writes.fetch_add(1, Ordering::Relaxed);
                    SwapError::ShortWrite { failed }
                }
                WriteFailure::Os(source) => {
                    self.io_errors.fetch_add(1, Ordering::Relaxed);
                    SwapError::Io { failed, source }
                }
            }
        })
    }

    /// Writes all of `buf` at `offset`: `Ok(())`, or the bytes written before the error.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), (usize, WriteFailure)> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + u64::try_from(done).unwrap_or(u64::MAX);
            match self.pwrite(&buf[done..], at) {
                Ok(0) => return Err((done, WriteFailure::Short)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((done, WriteFailure::Os(e))),
            }
        }
        Ok(())
    }

    /// Waits until slots `lo..=hi` are on the device, then drops them from the page cache.
    /// Waiting makes a writeback error (EIO, ENOSPC on a thin device) come back here, to
    /// the pages' owner, who still has them, rather than later as a lost page; dropping
    /// frees the host memory that swapping is for.
    ///
    /// The kernel reports a writeback error once per open file, to the first wait after it
    /// (`errseq`), whatever range that wait covers: so the error returned may be of any
    /// page written since the last wait, and every batch must wait for all it wrote.
    fn settle(&self, lo: u64, hi: u64) -> io::Result<()> {
        let to_off = |v: u64| libc::off64_t::try_from(v).unwrap_or(libc::off64_t::MAX);
        let (off, len) = (to_off(lo * SLOT_BYTES), to_off((hi - lo + 1) * SLOT_BYTES));
        #[cfg(test)]
        if let Some(e) = lock(&self.faults).settle(lo, hi) {
            return Err(e);
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: plain syscalls on our own descriptor; no memory is passed.
        if unsafe { libc::sync_file_range(fd, off, len, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above. Advice only: a failure leaves the pages cached, which is harmless.
        let _ = unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }

    /// Reads the page in `slot` into `out` and checks it against `sum`, the checksum
    /// [`write_batch`](Self::write_batch) gave for it.
    ///
    /// # Errors
    /// [`SwapError::BadSlot`] if the slot is not allocated; [`SwapError::NoMemory`] if the
    /// kernel had no memory for the read (try again later); [`SwapError::Read`],
    /// [`SwapError::ShortRead`] or [`SwapError::Checksum`] if the page cannot be read whole
    /// or came back changed: the page is lost, and the caller must not give the guest
    /// anything in its place (`out` then holds no page of anyone's).
    pub fn read(&self, slot: u64, sum: u32, out: &mut Page) -> Result<(), SwapError> {
        if !lock(&self.slots).is_allocated(slot) {
            return Err(SwapError::BadSlot { slot });
        }
        let offset = slot * SLOT_BYTES;
        let mut done = 0;
        while done < PAGE_BYTES {
            let at = offset + u64::try_from(done).unwrap_or(u64::MAX);
            match self.pread(&mut out[done..], at) {
                Ok(0) => {
                    self.read_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(SwapError::ShortRead { slot });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A page cache allocation refused in a memory cgroup at its limit: memory
                // may come back, as for every other ENOMEM the guest's faults meet.
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    return Err(SwapError::NoMemory { slot })
                }
                Err(source) => {
                    self.read_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(SwapError::Read { slot, source });
                }
            }
        }
        let found = page_sum(slot, &out[..]);
        if found != sum {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
            return Err(SwapError::Checksum { slot, expected: sum, found });
        }
        Ok(())
    }

    /// `pwrite` on the file (or the error a test injected).
    fn pwrite(&self, buf: &[u8], at: u64) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(e) = lock(&self.faults).write(at, buf.len()) {
            return Err(e);
        }
        self.file.write_at(buf, at)
    }

    /// `pread` on the file (or the error a test injected).
    fn pread(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(e) = lock(&self.faults).read() {
            return Err(e);
        }
        self.file.read_at(buf, at)
    }
    /// Bytes the file may occupy: the high-water mark of slots times 4 KiB.
    pub fn file_bytes(&self) -> u64 {
        lock(&self.slots).high_water() * SLOT_BYTES
    }

    /// Slots holding pages now.
    pub fn used_slots(&self) -> u64 {
        lock(&self.slots).used()
    }

    /// The slot allocator, for its counters (held until the guard is dropped).
    pub fn slots(&self) -> MutexGuard<'_, SlotAllocator> {
        lock(&self.slots)
    }

    /// Failed operations so far, by kind.
    pub fn errors(&self) -> SwapErrorCounts {
        SwapErrorCounts {
            no_space: self.no_space.load(Ordering::Relaxed),
            io: self.io_errors.load(Ordering::Relaxed),
            short_write: self.short_writes.load(Ordering::Relaxed),
            read: self.read_errors.load(Ordering::Relaxed),
        }
    }

    /// The directory the file was created in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How the file was made unnamed.
    pub fn creation(&self) -> Creation {
        self.creation
    }
}

/// Errors a test injects in place of the system's, to drive the paths that a real device
/// reaches only by failing at the right moment.
#[cfg(test)]
mod faults {
    use std::collections::VecDeque;
    use std::io;

    use super::SLOT_BYTES;

    /// The injected errors, and the waits the file made.
    #[derive(Debug, Default)]
    pub struct Faults {
        /// A write of the bytes of this slot fails whole with this errno.
        pub write_fails: Option<(u64, i32)>,
        /// A write of the bytes of this slot succeeds, but its writeback fails: the next
        /// wait reports `EIO`, as the kernel does (one error per file, to the first wait).
        pub writeback_fails: Option<u64>,
        /// Set by such a write until a wait reports it.
        pub writeback_error: bool,
        /// The next reads fail with these errnos, one each.
        pub reads: VecDeque<i32>,
        /// Every wait for writeback: the slots `lo..=hi` it covered.
        pub settled: Vec<(u64, u64)>,
    }

    /// Whether a write of `len` bytes at `at` covers the start of `slot`.
    fn covers(at: u64, len: usize, slot: u64) -> bool {
        let off = slot * SLOT_BYTES;
        at <= off && off < at + u64::try_from(len).unwrap_or(u64::MAX)
    }

    impl Faults {
        pub fn write(&mut self, at: u64, len: usize) -> Option<io::Error> {
            if let Some((_, errno)) = self.write_fails.filter(|&(s, _)| covers(at, len, s)) {
                return Some(io::Error::from_raw_os_error(errno));
            }
            if self.writeback_fails.is_some_and(|s| covers(at, len, s)) {
                self.writeback_error = true;
            }
            None
        }

        pub fn settle(&mut self, lo: u64, hi: u64) -> Option<io::Error> {
            self.settled.push((lo, hi));
            std::mem::take(&mut self.writeback_error)
                .then(|| io::Error::from_raw_os_error(libc::EIO))
        }

        pub fn read(&mut self) -> Option<io::Error> {
            self.reads.pop_front().map(io::Error::from_raw_os_error)
        }
    }
}

#[cfg(test)]
impl SwapFile {
    /// The errors to inject (tests only).
    pub(crate) fn faults(&self) -> MutexGuard<'_, faults::Faults> {
        lock(&self.faults)
    }

    /// Changes one byte of `slot` on the file, as a failing device would (tests only).
    pub(crate) fn flip_byte(&self, slot: u64, at: usize) {
        let off = slot * SLOT_BYTES + u64::try_from(at).unwrap_or(0);
        let mut byte = [0u8];
        self.file.read_exact_at(&mut byte, off).unwrap();
        byte[0] ^= 0x20;
        self.file.write_all_at(&byte, off).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::process::Command;
    use std::sync::atomic::AtomicU32;

    use crate::testutil::SplitMix as Rng;

    /// A page that says which slot and which write it belongs to, in every word.
    fn page_for(slot: u64, version: u64) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_BYTES]);
        for (i, w) in p.chunks_exact_mut(8).enumerate() {
            let v = slot << 32 ^ version << 16 ^ u64::try_from(i).unwrap();
            w.copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    /// The checksum of `page_for(slot, version)` written to `slot`.
    fn sum_for(slot: u64, version: u64) -> u32 {
        page_sum(slot, &page_for(slot, version)[..])
    }

    /// Writes a batch and checks that the checksum given for every page written is that of
    /// its bytes.
    fn write(f: &SwapFile, pages: &[(u64, &Page)]) -> Result<(), SwapError> {
        let mut sums = vec![7; 3];
        let res = f.write_batch(pages, &mut sums);
        assert_eq!(sums.len(), pages.len());
        // Written: all of an Ok batch, none of a refused one, the unlisted ones otherwise.
        let failed = res.as_ref().err().map_or(&[][..], SwapError::failed_slots);
        for (&(slot, page), &sum) in pages.iter().zip(&sums) {
            if res.is_ok() || (!failed.is_empty() && !failed.contains(&slot)) {
                assert_eq!(sum, page_sum(slot, &page[..]), "slot {slot}");
            }
        }
        res
    }

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir()
                .join(format!("ebb-swap-test-{}-{n}-{name}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn listing(&self) -> Vec<String> {
            std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A tmpfs mounted on a fresh directory, unmounted on drop (also when the test fails).
    struct Tmpfs(TempDir);

    impl Tmpfs {
        /// Mounts a tmpfs with `options`, or None if this process cannot mount.
        fn mount(name: &str, options: &str) -> Option<Self> {
            let dir = TempDir::new(name);
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", options, "tmpfs"])
                .arg(&dir.0)
                .output()
                .ok()?;
            if !out.status.success() {
                eprintln!("mount: {}", String::from_utf8_lossy(&out.stderr).trim());
                return None;
            }
            Some(Self(dir))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let ok = Command::new("umount").arg(&self.0 .0).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.0 .0).status();
            }
        }
    }

    fn skipped(test: &str, why: &str) {
        eprintln!("\n*** SKIPPED {test}: {why} ***\n");
    }

    #[test]
    fn allocator_hands_out_lowest_slots_and_refuses_when_full() {
        let mut a = SlotAllocator::new(5);
        let got: Vec<_> = (0..5).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert_eq!(a.alloc(), None, "full");
        assert_eq!((a.used(), a.high_water()), (5, 5));
        assert!(a.free(3));
        assert!(a.free(1));
        assert_eq!(a.used(), 3);
        assert_eq!(a.alloc(), Some(1), "lowest free first");
        assert_eq!(a.alloc(), Some(3));
        assert_eq!(a.alloc(), None);
        assert_eq!(a.high_water(), 5, "reuse does not grow the file");
        assert_eq!(SlotAllocator::new(0).alloc(), None);
    }

    #[test]
    fn allocator_double_free_is_ignored_and_counted() {
        let mut a = SlotAllocator::new(100);
        let s: Vec<_> = (0..10).map(|_| a.alloc().unwrap()).collect();
        assert!(a.free(s[4]));
        assert!(!a.free(s[4]), "double free");
        assert!(!a.free(50), "never allocated, above the high-water mark");
        assert!(!a.free(u64::MAX));
        assert_eq!(a.bad_frees(), 3);
        assert_eq!(a.used(), 9);
        // The allocator is intact: slot 4 comes back once, then new slots.
        assert_eq!(a.alloc(), Some(4));
        assert_eq!(a.alloc(), Some(10));
        assert_eq!(a.used(), 11);
    }

    #[test]
    fn allocator_matches_a_model() {
        let mut rng = Rng(11);
        // Sizes around the word and summary-word boundaries.
        for max in [1, 63, 64, 65, 130, 4095, 4096, 4097, 10_000] {
            let mut a = SlotAllocator::new(max);
            // The model: free slots below the high-water mark, and the allocated ones.
            let mut free = BTreeSet::new();
            let mut live: Vec<u64> = Vec::new();
            let mut hw = 0;
            for _ in 0..20_000 {
                if rng.below(3) != 0 {
                    let want = free.first().copied().or((hw < max).then_some(hw));
                    assert_eq!(a.alloc(), want, "max {max}");
                    if let Some(s) = want {
                        free.remove(&s);
                        live.push(s);
                        hw = hw.max(s + 1);
                    }
                } else if rng.below(4) == 0 || live.is_empty() {
                    // Any slot: refused unless allocated.
                    let s = rng.below(max + 2);
                    let pos = live.iter().position(|&l| l == s);
                    assert_eq!(a.free(s), pos.is_some());
                    if let Some(pos) = pos {
                        live.swap_remove(pos);
                        free.insert(s);
                    }
                } else {
                    let pos = usize::try_from(rng.below(u64::try_from(live.len()).unwrap()));
                    let s = live.swap_remove(pos.unwrap());
                    assert!(a.free(s));
                    free.insert(s);
                }
                assert_eq!(a.used(), u64::try_from(live.len()).unwrap());
                assert_eq!(a.high_water(), hw);
            }
            for s in 0..max + 2 {
                assert_eq!(a.is_allocated(s), live.contains(&s), "slot {s}");
            }
        }
    }

    #[test]
    fn file_is_not_visible_in_the_directory() {
        let dir = TempDir::new("tmpfile");
        let f = SwapFile::create(&dir.0, 1 << 20).unwrap();
        assert_eq!(f.creation(), Creation::TmpFile, "O_TMPFILE on {}", dir.0.display());
        let s = f.alloc_slot().unwrap();
        write(&f, &[(s, &page_for(s, 0))]).unwrap();
        assert!(dir.listing().is_empty(), "{:?}", dir.listing());
        drop(f);
        assert!(dir.listing().is_empty());
    }

    #[test]
    fn fallback_file_is_unlinked_at_once() {
        let dir = TempDir::new("fallback");
        let file = create_unlinked_named(&dir.0).unwrap();
        assert!(dir.listing().is_empty(), "{:?}", dir.listing());
        let mode = file.metadata().unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, FILE_MODE);
        file.write_all_at(b"works", 4096).unwrap();
    }

    #[test]
    fn round_trip_of_many_pages_in_random_slots() {
        let dir = TempDir::new("round-trip");
        let slots = 3000u64;
        let f = SwapFile::create(&dir.0, slots * SLOT_BYTES).unwrap();
        let mut rng = Rng(12);
        // slot -> version of the page it holds
        let mut held: Vec<Option<u64>> = vec![None; usize::try_from(slots).unwrap()];
        let mut version = 0;
        for round in 0..40 {
            // Free a few slots, allocate a batch (lowest first, so runs of consecutive slots
            // and scattered ones), and rewrite some held ones in place.
            for _ in 0..rng.below(120) {
                let s = rng.below(slots);
                let i = usize::try_from(s).unwrap();
                if held[i].is_some() {
                    assert!(f.free_slot(s));
                    held[i] = None;
                }
            }
            let mut batch_slots = Vec::new();
            for _ in 0..rng.below(200) {
                match f.alloc_slot() {
                    Some(s) => batch_slots.push(s),
                    None => break,
                }
            }
            for _ in 0..rng.below(20) {
                let s = rng.below(slots);
                if held[usize::try_from(s).unwrap()].is_some() && !batch_slots.contains(&s) {
                    batch_slots.push(s);
                }
            }
            // Not in slot order: the file sorts them.
            for i in (1..batch_slots.len()).rev() {
                let j = usize::try_from(rng.below(u64::try_from(i + 1).unwrap())).unwrap();
                batch_slots.swap(i, j);
            }
            version += 1;
            let pages: Vec<_> = batch_slots.iter().map(|&s| (s, page_for(s, version))).collect();
            let refs: Vec<(u64, &Page)> = pages.iter().map(|(s, p)| (*s, &**p)).collect();
            write(&f, &refs).unwrap();
            for &s in &batch_slots {
                held[usize::try_from(s).unwrap()] = Some(version);
            }
            let mut out = Box::new([0u8; PAGE_BYTES]);
            for (s, v) in held.iter().enumerate() {
                let s = u64::try_from(s).unwrap();
                match v {
                    Some(v) => {
                        f.read(s, sum_for(s, *v), &mut out).unwrap();
                        assert!(out == page_for(s, *v), "slot {s} round {round}");
                    }
                    None => {
                        assert!(matches!(f.read(s, 0, &mut out), Err(SwapError::BadSlot { .. })))
                    }
                }
            }
            let used = held.iter().filter(|v| v.is_some()).count();
            assert_eq!(f.used_slots(), u64::try_from(used).unwrap());
        }
        assert_eq!(f.file_bytes(), f.slots().high_water() * SLOT_BYTES);
        let len = f.file.metadata().unwrap().len();
        assert!(len <= f.file_bytes(), "file {len} bytes, high water {}", f.file_bytes());
        assert_eq!(f.errors(), SwapErrorCounts::default());
    }

    #[test]
    fn slot_reuse_after_free() {
        let dir = TempDir::new("reuse");
        let f = SwapFile::create(&dir.0, 64 * SLOT_BYTES).unwrap();
        let a = f.alloc_slot().unwrap();
        let b = f.alloc_slot().unwrap();
        write(&f, &[(a, &page_for(a, 1)), (b, &page_for(b, 1))]).unwrap();
        assert!(f.free_slot(a));
        assert!(!f.free_slot(a), "double free refused");
        let mut out = Box::new([0u8; PAGE_BYTES]);
        assert!(matches!(f.read(a, 0, &mut out), Err(SwapError::BadSlot { slot }) if slot == a));
        let c = f.alloc_slot().unwrap();
        assert_eq!(c, a, "the freed slot comes back");
        write(&f, &[(c, &page_for(c, 2))]).unwrap();
        f.read(c, sum_for(c, 2), &mut out).unwrap();
        assert!(out == page_for(c, 2));
        f.read(b, sum_for(b, 1), &mut out).unwrap();
        assert!(out == page_for(b, 1));
        assert_eq!((f.used_slots(), f.file_bytes()), (2, 2 * SLOT_BYTES));
    }

    #[test]
    fn full_allocator_refuses() {
        let dir = TempDir::new("full");
        let f = SwapFile::create(&dir.0, 10 * SLOT_BYTES + 100).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| f.alloc_slot()).collect();
        assert_eq!(got, (0..10).collect::<Vec<_>>(), "max_bytes rounded down to slots");
        assert_eq!(f.alloc_slot(), None);
        let tiny = SwapFile::create(&dir.0, SLOT_BYTES - 1).unwrap();
        assert_eq!(tiny.alloc_slot(), None);
    }

    #[test]
    fn unallocated_slots_are_refused_and_nothing_written() {
        let dir = TempDir::new("bad-slot");
        let f = SwapFile::create(&dir.0, 64 * SLOT_BYTES).unwrap();
        let a = f.alloc_slot().unwrap();
        let p = page_for(a, 1);
        let err = write(&f, &[(a, &p), (7, &p)]).unwrap_err();
        assert!(matches!(err, SwapError::BadSlot { slot: 7 }), "{err}");
        let mut out = Box::new([0u8; PAGE_BYTES]);
        // Slot a was allocated but the batch was refused whole: the file is still empty.
        assert!(matches!(f.read(a, 0, &mut out), Err(SwapError::ShortRead { .. })));
        assert_eq!(f.errors().read, 1);
        assert!(matches!(f.read(u64::MAX, 0, &mut out), Err(SwapError::BadSlot { .. })));
        write(&f, &[]).unwrap();
    }

    #[test]
    fn creation_errors_name_the_directory_and_what_to_do() {
        let dir = TempDir::new("errors");
        let missing = dir.0.join("missing");
        let err = SwapFile::create(&missing, 1 << 20).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("does not exist: create it"), "{err}");
        let file = dir.0.join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = SwapFile::create(&file, 1 << 20).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("not a directory"), "{err}");
        // Read-only: a read-only tmpfs where this process may mount one.
        match Tmpfs::mount("ro", "ro,size=64k") {
            Some(ro) => {
                let err = SwapFile::create(&ro.0 .0, 1 << 20).unwrap_err().to_string();
                assert!(err.contains("read-only file system"), "{err}");
            }
            None => skipped(
                "creation_errors_name_the_directory_and_what_to_do (read-only part)",
                "cannot mount a tmpfs here (needs root)",
            ),
        }
    }

    #[test]
    fn no_space_reports_the_slots_not_written() {
        let test = "no_space_reports_the_slots_not_written";
        // 64 KiB: room for 16 pages.
        let Some(fs) = Tmpfs::mount("enospc", "size=64k") else {
            skipped(test, "cannot mount a tmpfs here (needs root and mount)");
            return;
        };
        let f = SwapFile::create(&fs.0 .0, 1 << 20).unwrap();
        let slots: Vec<u64> = (0..40).map(|_| f.alloc_slot().unwrap()).collect();
        let pages: Vec<_> = slots.iter().map(|&s| (s, page_for(s, 1))).collect();
        let refs: Vec<(u64, &Page)> = pages.iter().map(|(s, p)| (*s, &**p)).collect();
        let err = write(&f, &refs).unwrap_err();
        println!("{err}");
        let SwapError::NoSpace { failed } = &err else { panic!("not NoSpace: {err}") };
        let failed = &failed.0;
        assert!(!failed.is_empty() && failed.len() < slots.len(), "{err}");
        assert_eq!(err.failed_slots(), &failed[..]);
        assert_eq!(f.errors().no_space, 1);
        // Every slot reported is one of the batch, and every other one reads back whole.
        let mut out = Box::new([0u8; PAGE_BYTES]);
        for &s in &slots {
            if failed.contains(&s) {
                continue;
            }
            f.read(s, sum_for(s, 1), &mut out).unwrap();
            assert!(out == page_for(s, 1), "slot {s}");
        }
        assert!(failed.iter().all(|s| slots.contains(s)));
        // A scattered batch over written and unwritten slots: the rewrites of pages already
        // on the file succeed, the new ones fail, and only those are reported.
        let rewrite: Vec<u64> = slots.iter().copied().filter(|s| !failed.contains(s)).collect();
        let batch: Vec<u64> = [rewrite[0], failed[0], rewrite[rewrite.len() - 1]].to_vec();
        let pages: Vec<_> = batch.iter().map(|&s| (s, page_for(s, 2))).collect();
        let refs: Vec<(u64, &Page)> = pages.iter().map(|(s, p)| (*s, &**p)).collect();
        let err = write(&f, &refs).unwrap_err();
        assert_eq!(err.failed_slots(), [failed[0]], "{err}");
        f.read(rewrite[0], sum_for(rewrite[0], 2), &mut out).unwrap();
        assert!(out == page_for(rewrite[0], 2));
        drop(f);
    }

    #[test]
    fn a_flipped_byte_is_a_checksum_error_naming_the_slot() {
        let dir = TempDir::new("flip");
        let f = SwapFile::create(&dir.0, 64 * SLOT_BYTES).unwrap();
        let slots: Vec<u64> = (0..3).map(|_| f.alloc_slot().unwrap()).collect();
        let pages: Vec<_> = slots.iter().map(|&s| (s, page_for(s, 1))).collect();
        let refs: Vec<(u64, &Page)> = pages.iter().map(|(s, p)| (*s, &**p)).collect();
        write(&f, &refs).unwrap();
        f.flip_byte(slots[1], 1234);
        let mut out = Box::new([0u8; PAGE_BYTES]);
        let err = f.read(slots[1], sum_for(slots[1], 1), &mut out).unwrap_err();
        let SwapError::Checksum { slot, expected, found } = err else { panic!("{err}") };
        assert_eq!((slot, expected), (slots[1], sum_for(slots[1], 1)));
        assert_eq!(found, page_sum(slot, &out[..]), "the sum of the bytes read");
        let msg = err.to_string();
        assert!(msg.contains(&format!("swap slot {slot} does not hold")), "{msg}");
        assert_eq!(f.errors().read, 1);
        // The other slots are intact; and a slot's bytes do not pass for another slot's.
        for &s in [slots[0], slots[2]].iter() {
            f.read(s, sum_for(s, 1), &mut out).unwrap();
            assert!(out == page_for(s, 1));
        }
        let err = f.read(slots[2], sum_for(slots[0], 1), &mut out).unwrap_err();
        assert!(matches!(err, SwapError::Checksum { .. }), "{err}");
    }

    #[test]
    fn a_failed_run_leaves_the_other_runs_written_and_waited_for() {
        let dir = TempDir::new("failed-run");
        let f = SwapFile::create(&dir.0, 64 * SLOT_BYTES).unwrap();
        for _ in 0..8 {
            f.alloc_slot().unwrap();
        }
        // Three runs: 0-2, 4-5 (whose write fails with EIO) and 7.
        f.faults().write_fails = Some((4, libc::EIO));
        let batch = [7u64, 0, 4, 1, 5, 2];
        let pages: Vec<_> = batch.iter().map(|&s| (s, page_for(s, 1))).collect();
        let refs: Vec<(u64, &Page)> = pages.iter().map(|(s, p)| (*s, &**p)).collect();
        let err = write(&f, &refs).unwrap_err();
        assert!(matches!(err, SwapError::Io { .. }), "{err}");
        assert_eq!(err.failed_slots(), [4, 5], "exactly the failed run: {err}");
        let settled = std::mem::take(&mut f.faults().settled);
        for s in [0, 1, 2, 7] {
            let waited = settled.iter().any(|&(lo, hi)| (lo..=hi).contains(&s));
            assert!(waited, "slot {s} reported written but never waited for: {settled:?}");
        }
        let mut out = Box::new([0u8; PAGE_BYTES]);
        for s in [0, 1, 2, 7] {
            f.read(s, sum_for(s, 1), &mut out).unwrap();
            assert!(out == page_for(s, 1), "slot {s}");
        }
        assert_eq!(f.errors().io, 1);
    }

    #[test]
    fn a_writeback_error_is_charged_to_its_own_batch() {
        let dir = TempDir::new("writeback");
        let f = SwapFile::create(&dir.0, 64 * SLOT_BYTES).unwrap();
        for _ in 0..16 {
            f.alloc_slot().unwrap();
        }
        // Run 0-1 reaches the page cache but fails on its way to the device; run 4-5 finds
        // the file system full.
        f.faults().writeback_fails = Some(0);
        f.faults().write_fails = Some((4, libc::ENOSPC));
        let batch = [0u64, 1, 4, 5];
        let pages: Vec<_> = batch.iter().map(|&s| (s, page_for(s, 1))).collect();
        let refs: Vec<(u64, &Page)> = pages.iter().map(|(s, p)| (*s, &**p)).collect();
        let err = write(&f, &refs).unwrap_err();
        assert_eq!(err.failed_slots(), batch, "none of the batch is on the device: {err}");
        assert!(
            matches!(&err, SwapError::Io { source, .. } if source.raw_os_error() == Some(libc::EIO)),
            "the device error is the one reported: {err}"
        );
        // The next batch, on a healthy device, succeeds: the error was this batch's.
        let mut faults = f.faults();
        (faults.writeback_fails, faults.write_fails) = (None, None);
        drop(faults);
        let next: Vec<_> = [8u64, 9, 12].iter().map(|&s| (s, page_for(s, 2))).collect();
        let refs: Vec<(u64, &Page)> = next.iter().map(|(s, p)| (*s, &**p)).collect();
        write(&f, &refs).unwrap();
        assert_eq!(f.errors(), SwapErrorCounts { io: 1, ..SwapErrorCounts::default() });
    }

    #[test]
    fn no_memory_for_a_read_is_its_own_error_and_the_page_stays() {
        let dir = TempDir::new("enomem");
        let f = SwapFile::create(&dir.0, 64 * SLOT_BYTES).unwrap();
        let s = f.alloc_slot().unwrap();
        write(&f, &[(s, &page_for(s, 1))]).unwrap();
        f.faults().reads.push_back(libc::ENOMEM);
        let mut out = Box::new([0u8; PAGE_BYTES]);
        let err = f.read(s, sum_for(s, 1), &mut out).unwrap_err();
        assert!(matches!(err, SwapError::NoMemory { slot } if slot == s), "{err}");
        assert_eq!(f.errors().read, 0, "not a lost page");
        f.read(s, sum_for(s, 1), &mut out).unwrap();
        assert!(out == page_for(s, 1));
    }

    #[test]
    fn slots_are_capped_at_what_a_location_word_holds() {
        let dir = TempDir::new("cap");
        let f = SwapFile::create(&dir.0, u64::MAX).unwrap();
        assert_eq!(f.slots().max_slots(), MAX_SLOTS);
    }
}
