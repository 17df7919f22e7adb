//! Where evicted pages live: the compression cache, the swap file, and which page is where.
//!
//! [`Backing`] owns the stored copies and one location word per guest page. It never touches
//! guest memory and never changes the page-state table: the reclaim worker and the fault
//! handler do that around its calls, under the claims the table's protocol gives them. So a
//! stored copy is only ever read or freed by the one thread that holds its page: the worker
//! while it evicts or writes a page back, the handler while it brings a page in, the memory
//! manager while it releases one.
//!
//! A location word is 0 (nothing stored), [`IN_CACHE`] with a cache handle, or [`IN_SWAP`]
//! with a swap slot and the checksum of the bytes written there (the slot in the low
//! [`SLOT_BITS`], the checksum in the 32 bits above: a page's metadata stays one word). It
//! is written before the page's state says Compressed or Swapped and cleared only by the
//! thread that holds the page, so a reader that sees the state sees the location.
//!
//! A page read back from the swap file is checked against its checksum: bytes the device
//! changed are [`StoreError::SwapCorrupt`], and the page never reaches the guest.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::super::pages::PageState;
use super::super::stats::Histogram;
use super::super::swap::{SwapError, SwapFile, MAX_SLOTS};
use super::super::zcache::{
    classify, compress_page, Content, Handle, Page, ZCache, ZcacheError, COMPRESS_BOUND, PAGE_BYTES,
};

/// Location tag: the page is in the compression cache (the rest of the word is its handle).
pub const IN_CACHE: u64 = 1 << 62;
/// Location tag: the page is in the swap file (the rest of the word is its slot).
pub const IN_SWAP: u64 = 1 << 63;
/// Location word of a page held uncompressed in ebb's memory ([`Backing::hold`]).
pub const HELD: u64 = IN_CACHE | IN_SWAP;
const LOC_MASK: u64 = IN_CACHE - 1;
/// Bits of a swap location word that hold the slot; its checksum takes the 32 above them.
pub const SLOT_BITS: u32 = 30;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const _: () = assert!(MAX_SLOTS <= 1 << SLOT_BITS, "every slot fits its bits");
const _: () = assert!(SLOT_BITS + u32::BITS <= IN_CACHE.trailing_zeros(), "below the tags");

/// Where a stored page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// In the compression cache.
    Cache(Handle),
    /// In the swap file.
    Swap {
        /// The slot.
        slot: u64,
        /// The checksum of the bytes written there ([`crate::mm::swap::page_sum`]).
        sum: u32,
    },
    /// Held uncompressed (an eviction that could neither store nor put the page back).
    Held,
}

impl Loc {
    fn word(self) -> u64 {
        match self {
            Self::Cache(h) => IN_CACHE | (h.to_raw() & LOC_MASK),
            Self::Swap { slot, sum } => IN_SWAP | u64::from(sum) << SLOT_BITS | (slot & SLOT_MASK),
            Self::Held => HELD,
        }
    }

    fn from_word(w: u64) -> Option<Self> {
        if w & HELD == HELD {
            Some(Self::Held)
        } else if w & IN_SWAP != 0 {
            let sum = u32::try_from((w & LOC_MASK) >> SLOT_BITS).unwrap_or(u32::MAX);
            Some(Self::Swap { slot: w & SLOT_MASK, sum })
        } else if w & IN_CACHE != 0 {
            Some(Self::Cache(Handle::from_raw(w & LOC_MASK)))
        } else {
            None
        }
    }
}

/// Why a page could not be stored or read back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Neither the cache nor the swap file has room (or there is no swap file).
    #[error("no room: the compression cache is full and the swap file is full or absent")]
    NoRoom,
    /// Writing the swap file failed (ENOSPC, EIO, a short write; logged once per kind, and
    /// counted); the page was not stored.
    #[error("the swap file refused the page")]
    SwapWrite,
    /// A page came back from the swap file with other bytes than were written (its
    /// checksum does not match): the device or file system changed them, and the page's
    /// contents are lost.
    #[error(
        "page {idx} came back from swap slot {slot} with other bytes than were written \
         (checksum {found:#010x}, written {expected:#010x}): the device or file system under \
         the swap file changed them"
    )]
    SwapCorrupt {
        /// Page index.
        idx: u64,
        /// The slot read.
        slot: u64,
        /// The checksum of the bytes written.
        expected: u32,
        /// The checksum of the bytes read.
        found: u32,
    },
    /// The kernel had no memory to read a page back from the swap file (`ENOMEM`): nothing
    /// is lost, and the read may be tried again once memory is back.
    #[error("reading page {idx} from the swap file: no memory for the read (ENOMEM)")]
    NoMemory {
        /// Page index.
        idx: u64,
    },
    /// Reading a page back from the swap file failed: its contents are lost.
    #[error("reading page {idx} from the swap file: {source}")]
    SwapRead {
        /// Page index.
        idx: u64,
        /// The error.
        source: SwapError,
    },
    /// A cache entry could not be read back: its contents are lost.
    #[error("reading page {idx} from the compression cache: {source}")]
    CacheRead {
        /// Page index.
        idx: u64,
        /// The error.
        source: ZcacheError,
    },
    /// The page's state says stored, but nothing is recorded for it.
    #[error("page {idx} has no stored copy")]
    Missing {
        /// Page index.
        idx: u64,
    },
}

impl StoreError {
    /// Whether the kernel only lacked memory to read the page: it is not lost, and the read
    /// is to be tried again later, as any other `ENOMEM` a fault meets.
    pub fn is_no_memory(&self) -> bool {
        matches!(self, Self::NoMemory { .. })
    }
}

/// Counters of the stores, written by the worker and the handler, read by the stats path.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Pages evicted (all kinds).
    pub evictions: AtomicU64,
    /// Evicted pages that were all zero: dropped, nothing stored.
    pub zero_dropped: AtomicU64,
    /// Evicted pages of one repeated word, kept as that word.
    pub same_filled: AtomicU64,
    /// Evicted pages written to the swap file (directly or from the cache).
    pub swapped_out: AtomicU64,
    /// Pages moved from the cache to the swap file because the cache was full.
    pub written_back: AtomicU64,
    /// Pages brought back from the cache.
    pub swapins_cache: AtomicU64,
    /// Pages brought back from the swap file.
    pub swapins_swap: AtomicU64,
    /// Swap writes that failed with ENOSPC, EIO or a short write (the pages stayed).
    pub swap_errors: AtomicU64,
    /// Pages held uncompressed because they could neither be stored nor put back.
    pub held: AtomicU64,
    /// Time to bring a page back from the cache, fault read to mapped, ns.
    pub swapin_cache_ns: Histogram,
    /// Time to bring a page back from the swap file, ns.
    pub swapin_swap_ns: Histogram,
}

/// What [`Backing::store_batch`] found a page to be, before it takes the cache's lock.
#[derive(Debug, Clone, Copy)]
enum Prepared {
    Zero,
    Fill(u64),
    /// Compressed: that many bytes at that offset of [`Staging::bytes`].
    Data(usize, usize),
    /// Compresses to more than the cache keeps: the swap file's.
    TooBig,
}

/// A batch's classification and compressed bytes, reused from batch to batch.
#[derive(Debug, Default)]
struct Staging {
    kinds: Vec<Prepared>,
    bytes: Vec<u8>,
    /// Where one page is compressed before its bytes join `bytes`.
    scratch: Vec<u8>,
}

/// The stored copies of one VM's evicted pages.
#[derive(Debug)]
pub struct Backing {
    locs: Box<[AtomicU64]>,
    cache: Mutex<ZCache>,
    /// The swap file locks only its slot allocator, never for I/O, so a swap-in never
    /// waits for a batch being written.
    swap: Option<SwapFile>,
    held: Mutex<std::collections::HashMap<u64, Box<Page>>>,
    /// The batch being stored, classified and compressed (the worker's alone).
    staging: Mutex<Staging>,
    /// Where the swap file is (for messages).
    swap_dir: std::path::PathBuf,
    /// Kinds of swap write error logged so far (bits; see `log_once`).
    logged: AtomicU8,
    /// Counters.
    pub stats: StoreStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backing {
    /// Stores for `pages` guest pages: a compression cache of at most `cache_bytes` and, if
    /// given, a swap file.
    pub fn new(pages: u64, cache_bytes: u64, swap: Option<SwapFile>) -> Self {
        let locs = zeroed_atomics(usize::try_from(pages).unwrap_or(0));
        let cache = Mutex::new(ZCache::new(cache_bytes));
        let swap_dir = swap.as_ref().map(|f| f.dir().to_path_buf()).unwrap_or_default();
        let (held, logged, staging) = (Mutex::default(), AtomicU8::new(0), Mutex::default());
        Self { locs, cache, swap, held, staging, swap_dir, logged, stats: StoreStats::default() }
    }

    /// True if evicted pages can go to a swap file (whose reads take a disk's time).
    pub fn has_swap(&self) -> bool {
        self.swap.is_some()
    }

    /// Where page `idx`'s copy is, if one is stored.
    pub fn loc(&self, idx: u64) -> Option<Loc> {
        let slot = self.locs.get(usize::try_from(idx).ok()?)?;
        Loc::from_word(slot.load(Ordering::Acquire))
    }

    fn set_loc(&self, idx: u64, loc: Option<Loc>) {
        if let Some(slot) = usize::try_from(idx).ok().and_then(|i| self.locs.get(i)) {
            slot.store(loc.map_or(0, Loc::word), Ordering::Release);
        }
    }

    /// Stores the contents of the pages of `batch` (each held by the caller, out of the
    /// guest's mapping); `out[i]` says what became of page `i`: the state it moves to
    /// (Untouched for a zero page, nothing stored; Compressed in the cache; Swapped when it
    /// compresses badly or the cache is full), or why it was not stored. The pages bound
    /// for the swap file go there in one batched write.
    ///
    /// An `Err` in `out` ([`StoreError::NoRoom`], [`StoreError::SwapWrite`]): nothing was
    /// stored for that page; it must go back where it was.
    pub fn store_batch(
        &self,
        batch: &[(u64, &Page)],
        out: &mut Vec<Result<PageState, StoreError>>,
    ) {
        out.clear();
        let mut to_swap = Vec::new();
        // Classify and compress first, without the cache's lock: a swap-in reading the cache
        // meanwhile then waits for one insert at most, not for a batch's compression.
        let mut staging = lock(&self.staging);
        let Staging { kinds, bytes, scratch } = &mut *staging;
        scratch.resize(COMPRESS_BOUND, 0);
        kinds.clear();
        bytes.clear();
        for &(_, page) in batch {
            kinds.push(match classify(page) {
                Content::Zero => Prepared::Zero,
                Content::Fill(word) => Prepared::Fill(word),
                Content::Data => match compress_page(page, scratch) {
                    Ok(n) => {
                        bytes.extend_from_slice(&scratch[..n]);
                        Prepared::Data(bytes.len() - n, n)
                    }
                    Err(_) => Prepared::TooBig,
                },
            });
        }
        {
            let mut cache = lock(&self.cache);
            for (i, (&(idx, _), kind)) in batch.iter().zip(kinds.iter()).enumerate() {
                let stored = match *kind {
                    Prepared::Zero => {
                        self.stats.zero_dropped.fetch_add(1, Ordering::Relaxed);
                        self.set_loc(idx, None);
                        Ok(PageState::Untouched)
                    }
                    Prepared::Fill(word) => cache.insert_fill(idx, word).map(|h| {
                        self.set_loc(idx, Some(Loc::Cache(h)));
                        PageState::Compressed
                    }),
                    Prepared::Data(at, n) => {
                        cache.insert_compressed(idx, &bytes[at..at + n]).map(|h| {
                            self.set_loc(idx, Some(Loc::Cache(h)));
                            PageState::Compressed
                        })
                    }
                    Prepared::TooBig => Err(ZcacheError::TooBig { compressed: PAGE_BYTES }),
                };
                out.push(match stored {
                    Err(ZcacheError::TooBig { .. } | ZcacheError::Full) => {
                        to_swap.push(i);
                        Ok(PageState::Swapped) // if the write below succeeds
                    }
                    other => other.map_err(|_| StoreError::NoRoom),
                });
            }
        }
        drop(staging);
        if !to_swap.is_empty() {
            let pages: Vec<(u64, &Page)> = to_swap.iter().map(|&i| batch[i]).collect();
            let mut written = Vec::new();
            self.write_swap(&pages, &mut written);
            for (&i, w) in to_swap.iter().zip(written) {
                out[i] = w.map(|loc| {
                    self.set_loc(batch[i].0, Some(loc));
                    PageState::Swapped
                });
            }
        }
        let stored = out.iter().filter(|r| r.is_ok()).count() as u64;
        self.stats.evictions.fetch_add(stored, Ordering::Relaxed);
    }

    /// Writes `pages` to new swap slots in one batch; `out[i]` is page `i`'s location (its
    /// slot and checksum), or why it is not on the file (its slot is freed again).
    fn write_swap(&self, pages: &[(u64, &Page)], out: &mut Vec<Result<Loc, StoreError>>) {
        out.clear();
        let Some(file) = self.swap.as_ref() else {
            out.extend(pages.iter().map(|_| Err(StoreError::NoRoom)));
            return;
        };
        let mut slots = Vec::with_capacity(pages.len());
        for &(_, page) in pages {
            match file.alloc_slot() {
                Some(slot) => slots.push((slot, page)),
                None => break,
            }
        }
        let mut sums = Vec::with_capacity(slots.len());
        let result = file.write_batch(&slots, &mut sums);
        let failed = result.as_ref().err().map_or(&[][..], SwapError::failed_slots);
        for (k, _) in pages.iter().enumerate() {
            let (Some(&(slot, _)), Some(&sum)) = (slots.get(k), sums.get(k)) else {
                out.push(Err(StoreError::NoRoom));
                continue;
            };
            if failed.contains(&slot) || matches!(result, Err(SwapError::BadSlot { .. })) {
                file.free_slot(slot);
                out.push(Err(StoreError::SwapWrite));
            } else {
                self.stats.swapped_out.fetch_add(1, Ordering::Relaxed);
                out.push(Ok(Loc::Swap { slot, sum }));
            }
        }
        if let Err(e) = result {
            let lost = out.iter().filter(|r| matches!(r, Err(StoreError::SwapWrite))).count();
            self.stats.swap_errors.fetch_add(lost as u64, Ordering::Relaxed);
            self.log_once(&e);
        }
    }

    /// Logs a swap write error the first time one of its kind happens (they are counted
    /// in the stats every time).
    fn log_once(&self, e: &SwapError) {
        let bit = match e {
            SwapError::NoSpace { .. } => 1,
            SwapError::ShortWrite { .. } => 2,
            _ => 4,
        };
        if self.logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            log::warn!(
                "swap file in {}: {e}; the pages stay in memory, and further errors of this \
                 kind are only counted (swap_errors)",
                self.swap_dir.display()
            );
        }
    }

    /// Reads page `idx`'s stored copy into `out`; returns where it was, for
    /// [`free`](Self::free) once the page is mapped again.
    ///
    /// # Errors
    /// [`StoreError::NoMemory`]: try again later. Any other: the copy is missing,
    /// unreadable or changed, and the page's contents are lost.
    pub fn load(&self, idx: u64, out: &mut Page) -> Result<Loc, StoreError> {
        let loc = self.loc(idx).ok_or(StoreError::Missing { idx })?;
        match loc {
            Loc::Cache(h) => lock(&self.cache)
                .get(h, out)
                .map_err(|source| StoreError::CacheRead { idx, source })?,
            Loc::Swap { slot, sum } => match self.swap.as_ref() {
                Some(file) => file.read(slot, sum, out).map_err(|e| match e {
                    SwapError::Checksum { slot, expected, found } => {
                        StoreError::SwapCorrupt { idx, slot, expected, found }
                    }
                    SwapError::NoMemory { .. } => StoreError::NoMemory { idx },
                    source => StoreError::SwapRead { idx, source },
                })?,
                None => return Err(StoreError::Missing { idx }),
            },
            Loc::Held => {
                let held = lock(&self.held);
                out.copy_from_slice(&**held.get(&idx).ok_or(StoreError::Missing { idx })?);
            }
        }
        Ok(loc)
    }

    /// Keeps a copy of page `idx` uncompressed (see the eviction docs: the last resort, so
    /// that a page is never dropped).
    pub fn hold(&self, idx: u64, page: &Page) {
        lock(&self.held).insert(idx, Box::new(*page));
        self.set_loc(idx, Some(Loc::Held));
        self.stats.held.fetch_add(1, Ordering::Relaxed);
    }

    /// Frees page `idx`'s stored copy at `loc` (it is mapped again, or released).
    pub fn free(&self, idx: u64, loc: Loc) {
        if self.loc(idx) == Some(loc) {
            self.set_loc(idx, None);
        }
        match loc {
            Loc::Cache(h) => {
                lock(&self.cache).remove(h);
            }
            Loc::Swap { slot, .. } => {
                if let Some(file) = self.swap.as_ref() {
                    file.free_slot(slot);
                }
            }
            Loc::Held => {
                lock(&self.held).remove(&idx);
            }
        }
    }

    /// Frees whatever is stored for page `idx`.
    pub fn discard(&self, idx: u64) {
        if let Some(loc) = self.loc(idx) {
            self.free(idx, loc);
        }
    }

    /// Up to `n` of the pages the cache has held longest (compressed ones: same-filled pages
    /// cost the cache nothing): the next to write back to swap.
    pub fn oldest_cached(&self, n: usize) -> Vec<u64> {
        lock(&self.cache).oldest_first().take(n).map(|(idx, _)| idx).collect()
    }

    /// Moves the pages of `idxs` (Compressed, each held by the caller) from the cache to the
    /// swap file in one batched write; `out[i]` is true if page `i` moved. A page that did
    /// not move stays cached.
    pub fn write_back(&self, idxs: &[u64], out: &mut Vec<bool>) {
        out.clear();
        let mut pages = vec![[0u8; PAGE_BYTES]; idxs.len()];
        let mut handles = Vec::with_capacity(idxs.len());
        {
            let cache = lock(&self.cache);
            for (&idx, page) in idxs.iter().zip(pages.iter_mut()) {
                let h = match self.loc(idx) {
                    Some(Loc::Cache(h)) if cache.get(h, page).is_ok() => Some(h),
                    _ => None,
                };
                handles.push(h);
            }
        }
        let readable: Vec<usize> = (0..idxs.len()).filter(|&i| handles[i].is_some()).collect();
        let batch: Vec<(u64, &Page)> = readable.iter().map(|&i| (idxs[i], &pages[i])).collect();
        let mut written = Vec::new();
        self.write_swap(&batch, &mut written);
        out.resize(idxs.len(), false);
        let mut cache = lock(&self.cache);
        for (&i, w) in readable.iter().zip(written) {
            if let (Ok(loc), Some(h)) = (w, handles[i]) {
                self.set_loc(idxs[i], Some(loc));
                cache.remove(h);
                self.stats.written_back.fetch_add(1, Ordering::Relaxed);
                out[i] = true;
            }
        }
    }

    /// True if the cache would refuse a new slab (time to write its oldest pages back).
    pub fn cache_is_full(&self) -> bool {
        let c = lock(&self.cache);
        c.slab_bytes() + crate::mm::zcache::SLAB_TARGET_BYTES as u64 > c.max_bytes()
    }

    /// What the stores hold now.
    pub fn sizes(&self) -> StoreSizes {
        let c = lock(&self.cache);
        let s = &self.swap;
        StoreSizes {
            cache_pages: c.pages(),
            cache_fill_pages: c.fill_pages(),
            compressed_bytes: c.compressed_bytes(),
            slab_bytes: c.slab_bytes(),
            held_pages: lock(&self.held).len() as u64,
            swap_pages: s.as_ref().map_or(0, SwapFile::used_slots),
            swap_file_bytes: s.as_ref().map_or(0, SwapFile::file_bytes),
        }
    }

    /// Bytes of metadata: one location word per page, and the cache's bookkeeping.
    pub fn metadata_bytes(&self) -> u64 {
        (self.locs.len() * std::mem::size_of::<AtomicU64>()) as u64
            + lock(&self.cache).metadata_bytes()
    }
}

/// What the stores hold at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreSizes {
    /// Pages in the cache (compressed and same-filled).
    pub cache_pages: u64,
    /// Of those, same-filled pages (stored as one word).
    pub cache_fill_pages: u64,
    /// Compressed bytes the cache holds.
    pub compressed_bytes: u64,
    /// Host memory of the cache's slabs.
    pub slab_bytes: u64,
    /// Pages held uncompressed ([`Backing::hold`]).
    pub held_pages: u64,
    /// Pages in the swap file.
    pub swap_pages: u64,
    /// Size of the swap file.
    pub swap_file_bytes: u64,
}

/// `n` atomics, all zero, allocated zeroed: the kernel backs only the pages of the array
/// that are written, so a VM that never evicts pays nothing for its location words.
fn zeroed_atomics(n: usize) -> Box<[AtomicU64]> {
    // The allocation of u64s is handed to AtomicU64s: that is sound only where both have one
    // layout (on some 32-bit targets u64 is aligned to 4 bytes and AtomicU64 to 8).
    const _: () = assert!(
        std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>()
            && std::mem::size_of::<AtomicU64>() == std::mem::size_of::<u64>()
    );
    let mut v = std::mem::ManuallyDrop::new(vec![0u64; n]);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: AtomicU64 has the size, alignment and bit validity of u64, and the vector's
    // allocation is handed over whole (ManuallyDrop: it is not freed twice).
    unsafe { Vec::from_raw_parts(ptr.cast::<AtomicU64>(), len, cap) }.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::SplitMix as Rng;

    /// A backing for 16 pages whose cache keeps nothing: every stored page goes to swap.
    fn swap_only() -> Backing {
        let swap = SwapFile::create(&std::env::temp_dir(), 1 << 20).unwrap();
        Backing::new(16, 0, Some(swap))
    }

    /// Random pages (they do not compress: the swap file's) for page indices `idxs`.
    fn random_pages(idxs: &[u64]) -> Vec<Box<Page>> {
        let mut rng = Rng(21);
        idxs.iter()
            .map(|_| {
                let mut p = Box::new([0u8; PAGE_BYTES]);
                rng.fill(&mut p[..]);
                p
            })
            .collect()
    }

    /// Stores `pages` at `idxs`; all must land in the swap file.
    fn swap_out(b: &Backing, idxs: &[u64], pages: &[Box<Page>]) {
        let batch: Vec<(u64, &Page)> = idxs.iter().zip(pages).map(|(&i, p)| (i, &**p)).collect();
        let mut out = Vec::new();
        b.store_batch(&batch, &mut out);
        assert!(out.iter().all(|r| matches!(r, Ok(PageState::Swapped))), "{out:?}");
    }

    #[test]
    fn location_word_packs_the_largest_slot_with_any_checksum() {
        for slot in [0, 1, 0x1234_5678, MAX_SLOTS - 1] {
            for sum in [0, 1, 0x8000_0000, 0xdead_beef, u32::MAX] {
                let loc = Loc::Swap { slot, sum };
                let word = loc.word();
                assert_eq!(Loc::from_word(word), Some(loc), "{word:#x}");
                assert_eq!(word & HELD, IN_SWAP, "the tags are intact: {word:#x}");
            }
        }
        let h = Handle::from_raw(LOC_MASK);
        assert_eq!(Loc::from_word(Loc::Cache(h).word()), Some(Loc::Cache(h)));
        assert_eq!(Loc::from_word(Loc::Held.word()), Some(Loc::Held));
        assert_eq!(Loc::from_word(0), None);
    }

    #[test]
    fn a_swapped_page_read_back_changed_is_corrupt_naming_page_and_slot() {
        let b = swap_only();
        let idxs = [3, 4, 9];
        let pages = random_pages(&idxs);
        swap_out(&b, &idxs, &pages);
        let Some(Loc::Swap { slot, .. }) = b.loc(4) else { panic!("{:?}", b.loc(4)) };
        b.swap.as_ref().unwrap().flip_byte(slot, 4095);
        let mut out = Box::new([0u8; PAGE_BYTES]);
        let err = b.load(4, &mut out).unwrap_err();
        assert!(matches!(err, StoreError::SwapCorrupt { idx: 4, slot: s, .. } if s == slot));
        let msg = err.to_string();
        assert!(msg.contains(&format!("page 4 came back from swap slot {slot}")), "{msg}");
        assert!(msg.contains("checksum"), "{msg}");
        assert!(!err.is_no_memory());
        // The others come back whole.
        for (&idx, page) in [3, 9].iter().zip([&pages[0], &pages[2]]) {
            b.load(idx, &mut out).unwrap();
            assert!(*out == **page, "page {idx}");
        }
    }

    #[test]
    fn no_memory_for_a_swap_read_is_retryable_and_the_copy_stays() {
        let b = swap_only();
        let pages = random_pages(&[5]);
        swap_out(&b, &[5], &pages);
        b.swap.as_ref().unwrap().faults().reads.push_back(libc::ENOMEM);
        let mut out = Box::new([0u8; PAGE_BYTES]);
        let err = b.load(5, &mut out).unwrap_err();
        assert!(err.is_no_memory(), "{err}");
        let loc = b.load(5, &mut out).unwrap();
        assert!(out == pages[0]);
        assert!(matches!(loc, Loc::Swap { .. }), "{loc:?}");
    }
}
