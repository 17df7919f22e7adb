//! The compression cache: guest pages kept LZ4-compressed in host memory instead of being
//! written to the swap file (ESX's "memory compression").
//!
//! [`ZCache`] owns the compressed bytes of the pages handed to it, and nothing else: which
//! guest page is where (the page-state table) belongs to the caller, who keeps the
//! [`Handle`] of each stored page next to its state. The cache does not look pages up by
//! index; the index given at insert is only stored, for [`ZCache::oldest`] and debugging.
//!
//! `classify.rs` tells zero and same-filled pages apart; `slabs.rs` holds the only functions
//! that change slabs, slots and entries (the invariants below are theirs to keep).
//!
//! # Layout
//! Compressed pages live in size-classed slabs, never one heap allocation per page:
//! - [`CLASS_STEP`]-byte size classes up to [`MAX_COMPRESSED_BYTES`]; a page of `n`
//!   compressed bytes takes one slot of the smallest class that holds `n`.
//! - Each class carves slabs of about [`SLAB_TARGET_BYTES`] into equal slots (a slab is an
//!   exact multiple of its slot size, so no tail is wasted), with a bitmap of used slots.
//! - Same-filled pages ([`Content::Fill`]) take no slab memory: the 8-byte word lives in
//!   the entry itself.
//! - Every stored page has a 24-byte entry in one table (entry number + generation = the
//!   [`Handle`]); the entries of compressed pages form a FIFO list in insertion order.
//! - Removing pages leaves free slots scattered over a class's slabs. [`ZCache::compact`]
//!   moves pages out of the least used slabs into those holes and releases the emptied
//!   slabs; it runs by itself when a new slab is needed and either the capacity would be
//!   exceeded or the reclaimable slabs are worth more than 1/16 of the slab memory.
//!
//! # Invariants
//! - A live entry's slot is marked used in its slab's bitmap and no other live entry points
//!   to the same slot; a slab's `used` count is the number of its set bits, and a class's
//!   `free_slots` is the sum of the free slots of its slabs.
//! - A slab is on its class's partial list exactly when it has a free slot (outside
//!   [`ZCache::compact`], which takes the slabs it empties off the list first). An empty
//!   slab is released unless it is the only partial slab of its class (to avoid churn at a
//!   slab boundary), so at most one empty slab per class is kept.
//! - [`ZCache::slab_bytes`] never exceeds the capacity given to [`ZCache::new`].
//! - A handle carries the generation of its entry at insert; freeing an entry bumps the
//!   generation, so a stale handle (removed, or removed and reused) is refused by `get` and
//!   ignored by `remove` without touching the entry's new owner. Compaction moves bytes, not
//!   entries: handles stay valid across it.
//! - The FIFO list holds exactly the live compressed entries (fill entries hold no slab
//!   memory, so writing one to swap would free nothing; they are not on it). It is
//!   intrusive (links in the entries), so it needs no compaction and is bounded by the
//!   number of live entries.
//! - Nothing here panics on a corrupt entry: every slab, slot and length read back from an
//!   entry is checked, and a failed or short decompression is [`ZcacheError::Corrupt`].

use std::fmt;

use lz4_flex::block::{compress_into, decompress_into, get_maximum_output_size};

mod classify;
mod slabs;
use slabs::slot_mut;

pub use classify::{classify, fill_page, Content};

/// Size of a guest page (4 KiB), from [`crate::units::PAGE_SIZE`].
pub const PAGE_SIZE: u64 = crate::units::PAGE_SIZE;
/// [`PAGE_SIZE`] as a `usize`, for buffers.
pub const PAGE_BYTES: usize = 4096;
const _: () = assert!(PAGE_BYTES as u64 == PAGE_SIZE);

/// One guest page's contents.
pub type Page = [u8; PAGE_BYTES];

/// A page is kept compressed only if it compresses to at most this many bytes: half a page,
/// the rule ESX applies (anything larger saves too little to be worth the decompression on
/// every access, so it goes to the swap file instead).
pub const MAX_COMPRESSED_BYTES: usize = PAGE_BYTES / 2;

/// Largest page index the cache stores. Entries keep the index in 32 bits (it is only
/// handed back by [`ZCache::oldest`]); ebb's guest RAM limit,
/// [`crate::vstate::memory::MAX_MEM_BYTES`], is 2^30 pages.
pub const MAX_INDEX: u64 = u32::MAX as u64;
const _: () = assert!(crate::vstate::memory::MAX_MEM_BYTES / PAGE_SIZE <= MAX_INDEX + 1);

/// Granularity of the slot size classes. 32 bytes bounds the internal fragmentation at 31
/// bytes a page (about 1.5% of a 1 KiB compressed page on average) with 64 classes in all.
pub const CLASS_STEP: usize = 32;
/// Number of slot size classes: one per [`CLASS_STEP`] up to [`MAX_COMPRESSED_BYTES`].
pub const CLASSES: usize = MAX_COMPRESSED_BYTES / CLASS_STEP;
const _: () = assert!(CLASSES * CLASS_STEP == MAX_COMPRESSED_BYTES);

/// Target size of one slab. Small enough that the partly used slab each class may hold
/// wastes at most `CLASSES * 16 KiB = 1 MiB` in all (half that on average), large enough
/// that the per-slab bookkeeping (about 100 bytes) stays under 1%.
pub const SLAB_TARGET_BYTES: usize = 16 * 1024;

/// Automatic compaction runs when the slab memory it could release is at least
/// `slab_bytes / COMPACT_DIVISOR` (and [`COMPACT_MIN_BYTES`]): free slots scattered by
/// removals then cost at most about 6% of the slab memory before they are given back.
const COMPACT_DIVISOR: u64 = 16;
/// Least slab memory worth an automatic compaction (16 slabs): below it, a pass over the
/// entry table is not worth what it releases, unless the capacity is reached.
const COMPACT_MIN_BYTES: u64 = 256 * 1024;

/// Most slots in one slab (those of the smallest class).
const MAX_SLOTS_PER_SLAB: usize = SLAB_TARGET_BYTES / CLASS_STEP;
/// Bits in one word of a slab's used-slot bitmap.
const BITMAP_WORD_BITS: usize = 64;
/// Words in a slab's used-slot bitmap.
const BITMAP_WORDS: usize = MAX_SLOTS_PER_SLAB / BITMAP_WORD_BITS;
const _: () = assert!(BITMAP_WORDS * BITMAP_WORD_BITS == MAX_SLOTS_PER_SLAB);
// Slot numbers and used counts are stored as u16.
const _: () = assert!(MAX_SLOTS_PER_SLAB <= u16::MAX as usize);
// Compressed lengths are stored as u16.
const _: () = assert!(MAX_COMPRESSED_BYTES <= u16::MAX as usize);

/// Size of the scratch buffer the compressor writes into: `lz4_flex` refuses an output
/// buffer smaller than its worst case for the input, even if the result would fit.
const SCRATCH_BYTES: usize = get_maximum_output_size(PAGE_BYTES);

/// Bytes of one 64-bit word, the unit [`classify`] compares.
const WORD_BYTES: usize = 8;
/// Bytes [`classify`] compares before checking for a difference (one cache line), so the
/// inner loop has no branch and a data page is still refused within its first 64 bytes.
const CLASSIFY_CHUNK_BYTES: usize = 64;

/// The "no entry" link of the FIFO list and of the free-entry list.
const NIL: u32 = u32::MAX;
/// Not on its class's partial list.
const NOT_PARTIAL: u32 = u32::MAX;
/// Least number of entries the entry table grows by; it grows by an eighth of its size
/// otherwise, so its unused tail stays under about 12% of the table (not 100% as with
/// doubling).
const MIN_ENTRY_GROWTH: usize = 1024;
/// Divisor of the entry table's growth step (an eighth).
const ENTRY_GROWTH_DIVISOR: usize = 8;
/// Bits of an entry's tag that hold its generation; the two above hold its [`Kind`].
const GEN_BITS: u32 = 30;
/// Mask of the generation in an entry's tag.
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

/// Why the cache refused or failed an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ZcacheError {
    /// The page compresses to more than [`MAX_COMPRESSED_BYTES`]; nothing was stored (the
    /// page should go to the swap file instead).
    #[error(
        "page compresses to {compressed} bytes, more than the {MAX_COMPRESSED_BYTES} bytes \
         worth keeping compressed"
    )]
    TooBig {
        /// The page's LZ4 size.
        compressed: usize,
    },
    /// Storing the page needs a new slab and that would take the cache past its capacity,
    /// even after compaction (or the entry table is at its limit of 2^32 - 1 entries);
    /// nothing was stored: write the oldest pages to swap, or send this one there.
    #[error("compression cache full: a new slab would exceed its capacity")]
    Full,
    /// The page index is above [`MAX_INDEX`]; nothing was stored.
    #[error("page index {idx} is above the compression cache's limit of {MAX_INDEX}")]
    IndexTooLarge {
        /// The index given.
        idx: u64,
    },
    /// The handle does not name a stored page (it was removed, or never issued here).
    #[error("stale compression cache handle {0:?}")]
    StaleHandle(Handle),
    /// The stored entry is inconsistent, or its bytes do not decompress to one page: the
    /// page's contents are lost (the caller must not hand the guest anything in its place).
    #[error("compression cache entry for page {idx} is corrupt: {what}")]
    Corrupt {
        /// Index of the page given at insert.
        idx: u64,
        /// What was wrong.
        what: &'static str,
    },
    /// The compressor failed on a page (it cannot, with the scratch buffer sized for its
    /// worst case; kept so that it is an error and not a panic).
    #[error("LZ4 compression failed")]
    Compress,
}

/// Names one stored page: the entry number (low 32 bits) and the entry's generation at
/// insert (high 32 bits). Valid until the page is removed; a stale handle is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle(u64);

impl Handle {
    const ENTRY_BITS: u32 = 32;

    fn new(entry: u32, gen: u32) -> Self {
        Self(u64::from(gen) << Self::ENTRY_BITS | u64::from(entry))
    }

    fn entry(self) -> u32 {
        u32::try_from(self.0 & u64::from(u32::MAX)).unwrap_or(NIL)
    }

    fn gen(self) -> u64 {
        self.0 >> Self::ENTRY_BITS
    }

    /// The handle as a plain number, for storing it in a page-state table.
    pub fn to_raw(self) -> u64 {
        self.0
    }

    /// A handle from [`Handle::to_raw`]. Any value is accepted; one that names no stored page
    /// is refused by the cache as stale.
    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

/// What an entry of the table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// On the free-entry list.
    Free,
    /// A same-filled page; `payload` is the word.
    Fill,
    /// A compressed page; `payload` is a packed [`Loc`].
    Data,
}

impl Kind {
    fn bits(self) -> u32 {
        match self {
            Kind::Free => 0,
            Kind::Fill => 1,
            Kind::Data => 2,
        }
    }
}

/// Where a compressed page's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    slab: u32,
    slot: u16,
    len: u16,
}

impl Loc {
    const SLAB_SHIFT: u32 = 32;
    const SLOT_SHIFT: u32 = 16;
    const U16_MASK: u64 = 0xffff;

    fn pack(self) -> u64 {
        u64::from(self.slab) << Self::SLAB_SHIFT
            | u64::from(self.slot) << Self::SLOT_SHIFT
            | u64::from(self.len)
    }

    fn unpack(v: u64) -> Self {
        Self {
            slab: u32::try_from(v >> Self::SLAB_SHIFT).unwrap_or(NIL),
            slot: u16::try_from(v >> Self::SLOT_SHIFT & Self::U16_MASK).unwrap_or(u16::MAX),
            len: u16::try_from(v & Self::U16_MASK).unwrap_or(u16::MAX),
        }
    }
}

/// One row of the entry table.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Fill word, or packed [`Loc`]; unused when free.
    payload: u64,
    /// The page index given at insert.
    idx: u32,
    /// Generation (low [`GEN_BITS`], bumped each time the entry is freed) and [`Kind`].
    tag: u32,
    /// Older neighbour in the FIFO list (compressed entries only).
    prev: u32,
    /// Newer neighbour in the FIFO list; for a free entry, the next free entry.
    next: u32,
}
const _: () = assert!(std::mem::size_of::<Entry>() == 24);

impl Entry {
    fn kind(&self) -> Kind {
        match self.tag >> GEN_BITS {
            1 => Kind::Fill,
            2 => Kind::Data,
            _ => Kind::Free,
        }
    }

    fn gen(&self) -> u32 {
        self.tag & GEN_MASK
    }

    fn set(&mut self, kind: Kind, gen: u32) {
        self.tag = kind.bits() << GEN_BITS | gen & GEN_MASK;
    }
}

/// A slab: equal slots of one class in one allocation, and which of them are used.
struct Slab {
    data: Box<[u8]>,
    used_bits: [u64; BITMAP_WORDS],
    used: u16,
    class: u8,
    /// Being emptied by [`ZCache::compact`] (and so off its class's partial list).
    evacuating: bool,
    /// Position on its class's partial list, or [`NOT_PARTIAL`].
    partial_pos: u32,
}

/// One size class: its slot size and the slabs with a free slot.
#[derive(Debug)]
struct Class {
    slot_bytes: usize,
    slots_per_slab: usize,
    /// Free slots in all of this class's slabs.
    free_slots: usize,
    partial: Vec<u32>,
}

impl Class {
    fn slab_bytes(&self) -> usize {
        self.slot_bytes * self.slots_per_slab
    }

    /// Slabs that compaction could release: those the free slots would fill.
    fn reclaimable_slabs(&self) -> usize {
        self.free_slots / self.slots_per_slab
    }
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZcacheStats {
    /// Pages stored (compressed and same-filled).
    pub pages: u64,
    /// Of those, same-filled pages.
    pub fill_pages: u64,
    /// Sum of the compressed lengths of the compressed pages.
    pub compressed_bytes: u64,
    /// Host memory in slabs (what the capacity limits).
    pub slab_bytes: u64,
    /// Host memory in bookkeeping: the entry table, the slab table, the partial lists.
    pub metadata_bytes: u64,
    /// The capacity given at creation, in bytes of slabs.
    pub max_bytes: u64,
    /// Compaction passes run (automatic and explicit).
    pub compactions: u64,
    /// Compressed pages moved by compaction.
    pub moved_pages: u64,
}

/// The compression cache: see the module documentation.
pub struct ZCache {
    max_bytes: u64,
    classes: Vec<Class>,
    slabs: Vec<Option<Slab>>,
    free_slab_ids: Vec<u32>,
    entries: Vec<Entry>,
    free_entry: u32,
    /// Oldest compressed entry, or [`NIL`].
    head: u32,
    /// Newest compressed entry, or [`NIL`].
    tail: u32,
    pages: u64,
    fill_pages: u64,
    compressed_bytes: u64,
    slab_bytes: u64,
    compactions: u64,
    moved_pages: u64,
    /// Where the compressor writes before the bytes are copied into a slot.
    scratch: Box<[u8]>,
}

impl fmt::Debug for ZCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let live_slabs = self.slabs.iter().filter(|s| s.is_some()).count();
        f.debug_struct("ZCache")
            .field("pages", &self.pages)
            .field("fill_pages", &self.fill_pages)
            .field("compressed_bytes", &self.compressed_bytes)
            .field("slab_bytes", &self.slab_bytes)
            .field("max_bytes", &self.max_bytes)
            .field("slabs", &live_slabs)
            .field("entries", &self.entries.len())
            .field("compactions", &self.compactions)
            .finish_non_exhaustive()
    }
}

/// Room [`compress_page`] needs in its output: LZ4's bound for one page.
pub const COMPRESS_BOUND: usize = SCRATCH_BYTES;

/// Compresses `page` into `out` (at least [`COMPRESS_BOUND`] bytes); returns the length.
/// A page that does not compress to [`MAX_COMPRESSED_BYTES`] is [`ZcacheError::TooBig`].
///
/// # Errors
/// [`ZcacheError::TooBig`], or [`ZcacheError::Compress`] if `out` is too small.
pub fn compress_page(page: &Page, out: &mut [u8]) -> Result<usize, ZcacheError> {
    let n = compress_into(page, out).map_err(|_| ZcacheError::Compress)?;
    match n {
        0 => Err(ZcacheError::Compress),
        n if n > MAX_COMPRESSED_BYTES => Err(ZcacheError::TooBig { compressed: n }),
        n => Ok(n),
    }
}

/// The class of a compressed length in `1..=MAX_COMPRESSED_BYTES`.
fn class_of(len: usize) -> usize {
    len.saturating_sub(1) / CLASS_STEP
}

/// `n` as a u64 (lossless on every target ebb builds for).
fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl ZCache {
    /// An empty cache whose slabs may take up to `max_bytes` of host memory. No memory is
    /// taken until pages are stored.
    pub fn new(max_bytes: u64) -> Self {
        let classes = (0..CLASSES)
            .map(|c| {
                let slot_bytes = (c + 1) * CLASS_STEP;
                Class {
                    slot_bytes,
                    slots_per_slab: SLAB_TARGET_BYTES / slot_bytes,
                    free_slots: 0,
                    partial: Vec::new(),
                }
            })
            .collect();
        Self {
            max_bytes,
            classes,
            slabs: Vec::new(),
            free_slab_ids: Vec::new(),
            entries: Vec::new(),
            free_entry: NIL,
            head: NIL,
            tail: NIL,
            pages: 0,
            fill_pages: 0,
            compressed_bytes: 0,
            slab_bytes: 0,
            compactions: 0,
            moved_pages: 0,
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
        }
    }

    /// Compresses `page` and stores it for page index `idx`.
    ///
    /// # Errors
    /// [`ZcacheError::TooBig`] if it compresses to more than [`MAX_COMPRESSED_BYTES`],
    /// [`ZcacheError::Full`] if it needs a new slab that would exceed the capacity even
    /// after compaction, [`ZcacheError::IndexTooLarge`] above [`MAX_INDEX`]. Nothing is
    /// stored on an error.
    pub fn insert(&mut self, idx: u64, page: &Page) -> Result<Handle, ZcacheError> {
        self.check_room(idx)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        let stored = compress_page(page, &mut scratch).and_then(|n| {
            let bytes = scratch.get(..n).ok_or(ZcacheError::Compress)?;
            self.insert_compressed(idx, bytes)
        });
        self.scratch = scratch;
        stored
    }

    /// Stores a page already compressed by [`compress_page`] (so that a caller can
    /// compress outside whatever lock guards the cache) for page index `idx`.
    ///
    /// # Errors
    /// As [`insert`](Self::insert); [`ZcacheError::TooBig`] if `compressed` is longer than
    /// [`MAX_COMPRESSED_BYTES`].
    pub fn insert_compressed(
        &mut self,
        idx: u64,
        compressed: &[u8],
    ) -> Result<Handle, ZcacheError> {
        let idx32 = self.check_room(idx)?;
        let n = compressed.len();
        if n == 0 {
            return Err(ZcacheError::Compress);
        }
        if n > MAX_COMPRESSED_BYTES {
            return Err(ZcacheError::TooBig { compressed: n });
        }
        let len = u16::try_from(n).map_err(|_| ZcacheError::TooBig { compressed: n })?;
        let (slab, slot) = self.alloc_slot(class_of(n))?;
        let Some(dst) = slot_mut(&mut self.slabs, &self.classes, slab, slot, n) else {
            // Cannot happen (the slot was just taken in a class that holds n bytes).
            self.free_slot(slab, slot);
            return Err(ZcacheError::Full);
        };
        dst.copy_from_slice(compressed);
        let loc = Loc { slab, slot, len };
        let (id, gen) = self.alloc_entry(Kind::Data, idx32, loc.pack());
        self.push_tail(id);
        self.pages += 1;
        self.compressed_bytes += u64::from(len);
        Ok(Handle::new(id, gen))
    }

    /// Stores a same-filled page (see [`classify`]) for page index `idx`: the word only, no
    /// slab memory.
    ///
    /// # Errors
    /// [`ZcacheError::Full`] if the entry table is at its limit of 2^32 - 1 entries,
    /// [`ZcacheError::IndexTooLarge`] above [`MAX_INDEX`].
    pub fn insert_fill(&mut self, idx: u64, word: u64) -> Result<Handle, ZcacheError> {
        let idx32 = self.check_room(idx)?;
        let (id, gen) = self.alloc_entry(Kind::Fill, idx32, word);
        self.pages += 1;
        self.fill_pages += 1;
        Ok(Handle::new(id, gen))
    }

    /// Writes the page stored under `h` into `out`.
    ///
    /// # Errors
    /// [`ZcacheError::StaleHandle`] if `h` names no stored page, [`ZcacheError::Corrupt`] if
    /// the entry is inconsistent or does not decompress to exactly one page (`out` then
    /// holds garbage and must not reach the guest).
    pub fn get(&self, h: Handle, out: &mut Page) -> Result<(), ZcacheError> {
        let e = self.live(h)?;
        match e.kind() {
            Kind::Fill => {
                fill_page(e.payload, out);
                Ok(())
            }
            Kind::Data => {
                let idx = u64::from(e.idx);
                let bytes = self.stored_bytes(e)?;
                match decompress_into(bytes, out) {
                    Ok(PAGE_BYTES) => Ok(()),
                    Ok(_) => {
                        Err(ZcacheError::Corrupt { idx, what: "decompresses to less than a page" })
                    }
                    Err(_) => Err(ZcacheError::Corrupt { idx, what: "LZ4 data invalid" }),
                }
            }
            Kind::Free => Err(ZcacheError::StaleHandle(h)),
        }
    }

    /// The page index stored with `h`, or `None` if `h` is stale.
    pub fn index_of(&self, h: Handle) -> Option<u64> {
        self.live(h).ok().map(|e| u64::from(e.idx))
    }

    /// Removes the page stored under `h` and frees its slot. Returns false, changing nothing,
    /// if `h` is stale (already removed, possibly with its entry reused since).
    pub fn remove(&mut self, h: Handle) -> bool {
        let Ok(&e) = self.live(h) else {
            return false;
        };
        let id = h.entry();
        match e.kind() {
            Kind::Fill => self.fill_pages -= 1,
            Kind::Data => {
                self.unlink(id);
                let loc = Loc::unpack(e.payload);
                self.compressed_bytes -= u64::from(loc.len);
                self.free_slot(loc.slab, loc.slot);
            }
            Kind::Free => return false,
        }
        self.pages -= 1;
        self.free_entry(id);
        true
    }

    /// The oldest compressed page still stored (first inserted), with its page index: the
    /// first to write to the swap file when the cache is full. Same-filled pages are not in
    /// this order (they take no slab memory).
    pub fn oldest(&self) -> Option<(u64, Handle)> {
        self.oldest_first().next()
    }

    /// The stored compressed pages from oldest to newest, for taking a batch to write to
    /// swap: read each with [`ZCache::get`], write them, then [`ZCache::remove`] those written.
    pub fn oldest_first(&self) -> impl Iterator<Item = (u64, Handle)> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            let e = self.entries.get(cur as usize)?;
            let h = Handle::new(cur, e.gen());
            cur = e.next;
            Some((u64::from(e.idx), h))
        })
    }

    /// Takes the oldest compressed page out of the cache: decompresses it into `out` and
    /// removes it. `None` if there is none; `Some(Err(Corrupt))` if it did not decompress (it
    /// is removed all the same: its contents are lost). Prefer [`ZCache::oldest_first`] and
    /// removing after a successful write, which keeps a page if its write fails.
    pub fn pop_oldest(&mut self, out: &mut Page) -> Option<Result<u64, ZcacheError>> {
        let (idx, h) = self.oldest()?;
        let res = self.get(h, out).map(|()| idx);
        self.remove(h);
        Some(res)
    }

    /// Moves compressed pages out of the least used slabs of each class into the free slots
    /// of its other slabs, and releases the slabs so emptied. Returns the slab bytes
    /// released. Handles stay valid. Costs one pass over the entry table plus a copy of each
    /// page moved; runs by itself when worthwhile (see the module documentation), and the
    /// owner may call it when idle, e.g. after removing many pages.
    pub fn compact(&mut self) -> u64 {
        let before = self.slab_bytes;
        // Victims: in each class, the least used partial slabs, as many as the class's free
        // slots can absorb (evacuating a slab needs free slots elsewhere for each of its
        // pages, so while the class has a slab's worth of free slots, one more can go).
        let mut victims: Vec<u32> = Vec::new();
        for c in 0..CLASSES {
            let class = &self.classes[c];
            let per_slab = class.slots_per_slab;
            if class.reclaimable_slabs() == 0 {
                continue;
            }
            let mut cands: Vec<(u16, u32)> = class
                .partial
                .iter()
                .filter_map(|&id| self.slab(id).map(|s| (s.used, id)))
                .collect();
            cands.sort_unstable();
            let mut free = class.free_slots;
            for (_, id) in cands {
                if free < per_slab {
                    break;
                }
                free -= per_slab;
                self.remove_partial(id);
                if let Some(s) = self.slab_mut(id) {
                    s.evacuating = true;
                }
                victims.push(id);
            }
        }
        if victims.is_empty() {
            return 0;
        }
        self.compactions += 1;
        // Not the scratch buffer: an insert may be compacting with its page in there.
        let mut buf = [0u8; MAX_COMPRESSED_BYTES];
        for id in 0..self.entries.len() {
            let e = self.entries[id];
            if e.kind() != Kind::Data {
                continue;
            }
            let loc = Loc::unpack(e.payload);
            let Some(src) = self.slab(loc.slab) else { continue };
            if !src.evacuating {
                continue;
            }
            let c = usize::from(src.class);
            let Some(&dst_slab) = self.classes[c].partial.last() else { continue };
            let Some(dst_slot) = self.take_slot(dst_slab) else { continue };
            let n = usize::from(loc.len);
            let copied = match slot_mut(&mut self.slabs, &self.classes, loc.slab, loc.slot, n) {
                Some(src) => {
                    buf[..n].copy_from_slice(src);
                    true
                }
                None => false,
            };
            match slot_mut(&mut self.slabs, &self.classes, dst_slab, dst_slot, n) {
                Some(dst) if copied => dst.copy_from_slice(&buf[..n]),
                _ => {
                    // Inconsistent entry: leave it where it is.
                    self.free_slot(dst_slab, dst_slot);
                    continue;
                }
            }
            self.free_slot(loc.slab, loc.slot);
            self.entries[id].payload = Loc { slab: dst_slab, slot: dst_slot, len: loc.len }.pack();
            self.moved_pages += 1;
        }
        for id in victims {
            let Some(s) = self.slab_mut(id) else { continue };
            s.evacuating = false;
            let used = s.used;
            self.push_partial(id);
            if used == 0 {
                self.release_slab(id);
            }
        }
        before - self.slab_bytes
    }

    /// Pages stored (compressed and same-filled).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Same-filled pages stored.
    pub fn fill_pages(&self) -> u64 {
        self.fill_pages
    }

    /// Sum of the compressed lengths of the stored compressed pages.
    pub fn compressed_bytes(&self) -> u64 {
        self.compressed_bytes
    }

    /// Host memory held in slabs (what the capacity limits).
    pub fn slab_bytes(&self) -> u64 {
        self.slab_bytes
    }

    /// The capacity, in bytes of slabs.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Host memory held in bookkeeping: the entry table (including its unused tail), the slab
    /// table, the partial lists and the compressor's scratch buffer.
    pub fn metadata_bytes(&self) -> u64 {
        let partial: usize = self.classes.iter().map(|c| c.partial.capacity()).sum();
        u64_of(
            self.entries.capacity() * std::mem::size_of::<Entry>()
                + self.slabs.capacity() * std::mem::size_of::<Option<Slab>>()
                + (self.free_slab_ids.capacity() + partial) * std::mem::size_of::<u32>()
                + self.classes.capacity() * std::mem::size_of::<Class>()
                + self.scratch.len(),
        )
    }

    /// Host memory spent beyond the compressed bytes, as a fraction of them: `(slab_bytes +
    /// metadata_bytes - compressed_bytes) / compressed_bytes`. Covers internal fragmentation
    /// (slot rounding), free slots in partly used slabs and all bookkeeping, including the
    /// entries of same-filled pages. 0 when nothing compressed is stored.
    pub fn overhead_ratio(&self) -> f64 {
        if self.compressed_bytes == 0 {
            return 0.0;
        }
        let spent = self.slab_bytes.saturating_add(self.metadata_bytes());
        spent.saturating_sub(self.compressed_bytes) as f64 / self.compressed_bytes as f64
    }

    /// All counters at once.
    pub fn stats(&self) -> ZcacheStats {
        ZcacheStats {
            pages: self.pages,
            fill_pages: self.fill_pages,
            compressed_bytes: self.compressed_bytes,
            slab_bytes: self.slab_bytes,
            metadata_bytes: self.metadata_bytes(),
            max_bytes: self.max_bytes,
            compactions: self.compactions,
            moved_pages: self.moved_pages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::slabs::bit;
    use super::*;

    use crate::testutil::SplitMix as Rng;

    /// Text a guest might hold: ebb's own design notes and this file.
    const TEXT: &str = concat!(include_str!("../../../docs/design.md"), include_str!("mod.rs"));

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Source {
        Binary,
        Text,
        Records,
        Pattern,
        Sparse,
        Random,
        Fill,
    }

    /// One page of the given kind: a page of the test binary (ebb's code and data), of text,
    /// an array of kernel-like records (pointers, counters, flags), a short repeating
    /// pattern, a mostly-zero page with a few words set (page tables, fresh heap), random
    /// bytes, or one repeated word.
    fn make_page(rng: &mut Rng, exe: &[u8], kind: Source) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_BYTES]);
        match kind {
            Source::Binary => {
                let pages = exe.len() / PAGE_BYTES;
                let at = rng.index(pages) * PAGE_BYTES;
                p.copy_from_slice(&exe[at..at + PAGE_BYTES]);
            }
            Source::Text => {
                let text = TEXT.as_bytes();
                let at = rng.index(text.len());
                for (i, b) in p.iter_mut().enumerate() {
                    *b = text[(at + i) % text.len()];
                }
            }
            Source::Records => {
                let words = [4, 6, 8][rng.index(3)];
                let base = 0xffff_8880_0000_0000 | (rng.next() & 0xfff_ffff) << 12;
                for (r, rec) in p.chunks_exact_mut(words * 8).enumerate() {
                    let r = u64::try_from(r).unwrap();
                    let mut fields = vec![base + r * 64, base + r * 64 + 8, r, 0];
                    fields.extend((4..words).map(|_| rng.next() & 0xff));
                    for (f, w) in rec.chunks_exact_mut(8).zip(fields) {
                        f.copy_from_slice(&w.to_le_bytes());
                    }
                }
            }
            Source::Pattern => {
                let period = 9 + rng.index(40);
                let mut pat = vec![0u8; period];
                rng.fill(&mut pat);
                for (i, b) in p.iter_mut().enumerate() {
                    *b = pat[i % period];
                }
            }
            Source::Sparse => {
                for _ in 0..1 + rng.index(64) {
                    let w = rng.index(PAGE_BYTES / 8) * 8;
                    p[w..w + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            Source::Random => rng.fill(&mut p[..]),
            Source::Fill => fill_page(rng.next() | 1, &mut p),
        }
        p
    }

    fn exe() -> Vec<u8> {
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    /// A pool of pages of every kind, in the given proportions.
    fn pool(rng: &mut Rng, n: usize, mix: &[(Source, usize)]) -> Vec<Box<Page>> {
        let exe = exe();
        let total: usize = mix.iter().map(|m| m.1).sum();
        (0..n)
            .map(|_| {
                let mut r = rng.index(total);
                let mut kind = mix[0].0;
                for &(k, w) in mix {
                    if r < w {
                        kind = k;
                        break;
                    }
                    r -= w;
                }
                make_page(rng, &exe, kind)
            })
            .collect()
    }

    fn compressed_len(p: &Page) -> usize {
        compress_into(p, &mut [0u8; SCRATCH_BYTES]).unwrap()
    }

    /// Stores a page the way the reclaimer would: zero pages nowhere, fill pages as words.
    fn store(z: &mut ZCache, idx: u64, p: &Page) -> Result<Option<Handle>, ZcacheError> {
        match classify(p) {
            Content::Zero => Ok(None),
            Content::Fill(w) => z.insert_fill(idx, w).map(Some),
            Content::Data => z.insert(idx, p).map(Some),
        }
    }

    /// Checks the slab bookkeeping against the entries: used bits, used counts, free slots,
    /// partial lists and slab bytes.
    fn check_slabs(z: &ZCache) {
        let mut used = vec![0usize; z.slabs.len()];
        for e in z.entries.iter().filter(|e| e.kind() == Kind::Data) {
            let loc = Loc::unpack(e.payload);
            let s = z.slab(loc.slab).unwrap();
            assert!(bit(&s.used_bits, usize::from(loc.slot)));
            assert!(usize::from(loc.len) <= z.classes[usize::from(s.class)].slot_bytes);
            used[loc.slab as usize] += 1;
        }
        let mut bytes = 0;
        let mut free = [0usize; CLASSES];
        for (id, s) in z.slabs.iter().enumerate() {
            let Some(s) = s else { continue };
            let class = &z.classes[usize::from(s.class)];
            assert_eq!(usize::from(s.used), used[id], "slab {id}");
            let bits: u32 = s.used_bits.iter().map(|w| w.count_ones()).sum();
            assert_eq!(bits as usize, used[id]);
            assert!(!s.evacuating);
            let on_partial = s.partial_pos != NOT_PARTIAL;
            assert_eq!(on_partial, used[id] < class.slots_per_slab, "slab {id} partial");
            if on_partial {
                assert_eq!(class.partial[s.partial_pos as usize], u32::try_from(id).unwrap());
            }
            free[usize::from(s.class)] += class.slots_per_slab - used[id];
            bytes += s.data.len();
        }
        for (c, class) in z.classes.iter().enumerate() {
            assert_eq!(class.free_slots, free[c], "class {c}");
        }
        assert_eq!(z.slab_bytes(), u64_of(bytes));
    }

    #[test]
    fn classify_edge_cases() {
        let mut p = [0u8; PAGE_BYTES];
        assert_eq!(classify(&p), Content::Zero);
        p[PAGE_BYTES - 1] = 1;
        assert_eq!(classify(&p), Content::Data, "last byte differs");
        p = [0u8; PAGE_BYTES];
        p[0] = 1;
        assert_eq!(classify(&p), Content::Data, "first byte differs from the rest");
        p = [0u8; PAGE_BYTES];
        p[PAGE_BYTES / 2 + 3] = 0x80;
        assert_eq!(classify(&p), Content::Data, "one bit in the middle");
        p = [0xff; PAGE_BYTES];
        assert_eq!(classify(&p), Content::Fill(u64::MAX));
        fill_page(0x0102_0304_0506_0708, &mut p);
        assert_eq!(classify(&p), Content::Fill(0x0102_0304_0506_0708));
        // A 4-byte pattern is also an 8-byte one.
        for c in p.chunks_exact_mut(4) {
            c.copy_from_slice(&0xdead_beef_u32.to_ne_bytes());
        }
        let Content::Fill(w) = classify(&p) else { panic!("4-byte pattern not a fill") };
        let mut q = [0u8; PAGE_BYTES];
        fill_page(w, &mut q);
        assert_eq!(p, q, "fill word rebuilds the page");
        // A 16-byte pattern is not.
        for (i, b) in p.iter_mut().enumerate() {
            *b = u8::try_from(i % 16).unwrap();
        }
        assert_eq!(classify(&p), Content::Data);
        // Same word everywhere but one word at the very end.
        fill_page(7, &mut p);
        p[PAGE_BYTES - 8..].copy_from_slice(&8u64.to_ne_bytes());
        assert_eq!(classify(&p), Content::Data);
    }

    #[test]
    fn fill_pages_round_trip_without_slab_memory() {
        let mut z = ZCache::new(1 << 20);
        let h = z.insert_fill(5, 0xabcd).unwrap();
        let mut out = [0u8; PAGE_BYTES];
        z.get(h, &mut out).unwrap();
        assert_eq!(classify(&out), Content::Fill(0xabcd));
        assert_eq!((z.pages(), z.fill_pages(), z.slab_bytes()), (1, 1, 0));
        assert_eq!(z.oldest(), None, "fill pages are not evicted to swap");
        assert_eq!(z.index_of(h), Some(5));
        assert!(z.remove(h));
        assert_eq!((z.pages(), z.fill_pages()), (0, 0));
    }

    #[test]
    fn index_above_the_limit_is_refused() {
        let mut z = ZCache::new(1 << 20);
        let p = make_page(&mut Rng(8), &[], Source::Sparse);
        assert_eq!(z.insert(MAX_INDEX + 1, &p), Err(ZcacheError::IndexTooLarge { idx: 1 << 32 }));
        assert!(z.insert_fill(u64::MAX, 1).is_err());
        let h = z.insert(MAX_INDEX, &p).unwrap();
        assert_eq!(z.oldest(), Some((MAX_INDEX, h)));
        assert_eq!(z.pages(), 1);
    }

    #[test]
    fn random_operations_match_a_model() {
        let mut rng = Rng(1);
        let mix = [
            (Source::Binary, 3),
            (Source::Text, 2),
            (Source::Records, 2),
            (Source::Pattern, 2),
            (Source::Sparse, 3),
            (Source::Random, 1),
            (Source::Fill, 1),
        ];
        let pages = pool(&mut rng, 600, &mix);
        let lens: Vec<usize> = pages.iter().map(|p| compressed_len(p)).collect();
        let is_fill: Vec<bool> =
            pages.iter().map(|p| matches!(classify(p), Content::Fill(_))).collect();
        // Small enough that the cache fills up and the oldest pages must go.
        let mut z = ZCache::new(1 << 20);
        // Live pages: handle, index, pool page, insertion number (for FIFO order).
        let mut live: Vec<(Handle, u64, usize, u64)> = Vec::new();
        let mut seq = 0u64;
        let mut removed: Vec<Handle> = Vec::new();
        let (mut too_big, mut full, mut evicted) = (0, 0, 0);
        let mut out = Box::new([0u8; PAGE_BYTES]);
        let fifo = |live: &[(Handle, u64, usize, u64)]| {
            let mut want: Vec<_> =
                live.iter().filter(|l| !is_fill[l.2]).map(|l| (l.3, l.1, l.0)).collect();
            want.sort_unstable_by_key(|w| w.0);
            want.into_iter().map(|w| (w.1, w.2)).collect::<Vec<_>>()
        };
        for op in 0..100_000u64 {
            match rng.index(20) {
                0..=8 => {
                    let pi = rng.index(pages.len());
                    let idx = op;
                    let before = z.stats();
                    match store(&mut z, idx, &pages[pi]) {
                        Ok(Some(h)) => {
                            live.push((h, idx, pi, seq));
                            seq += 1;
                        }
                        Ok(None) => {}
                        Err(ZcacheError::TooBig { compressed }) => {
                            assert!(compressed > MAX_COMPRESSED_BYTES);
                            assert_eq!(compressed, lens[pi]);
                            assert_eq!(z.stats(), before, "nothing stored when too big");
                            too_big += 1;
                        }
                        Err(ZcacheError::Full) => {
                            let after = z.stats();
                            assert_eq!(
                                (after.pages, after.compressed_bytes),
                                (before.pages, before.compressed_bytes),
                                "nothing stored when full"
                            );
                            full += 1;
                            // Make room the way the reclaimer does: the oldest goes.
                            let oldest = z.oldest().unwrap();
                            assert_eq!(Some(&oldest), fifo(&live).first());
                            let pos = live.iter().position(|l| l.0 == oldest.1).unwrap();
                            let (_, _, pi, _) = live.swap_remove(pos);
                            assert_eq!(z.pop_oldest(&mut out), Some(Ok(oldest.0)));
                            assert_eq!(out[..], pages[pi][..]);
                            removed.push(oldest.1);
                            evicted += 1;
                        }
                        Err(e) => panic!("insert: {e}"),
                    }
                }
                9..=13 if !live.is_empty() => {
                    let (h, idx, pi, _) = live[rng.index(live.len())];
                    z.get(h, &mut out).unwrap();
                    assert_eq!(out[..], pages[pi][..], "page {idx}");
                    assert_eq!(z.index_of(h), Some(idx));
                }
                14..=17 if !live.is_empty() => {
                    let (h, ..) = live.swap_remove(rng.index(live.len()));
                    assert!(z.remove(h));
                    removed.push(h);
                }
                18 if !removed.is_empty() => {
                    // Stale handles are refused and change nothing.
                    let h = removed[rng.index(removed.len())];
                    let before = z.stats();
                    assert!(!z.remove(h));
                    assert_eq!(z.get(h, &mut out), Err(ZcacheError::StaleHandle(h)));
                    assert_eq!(z.stats(), before);
                }
                19 if op % 7 == 0 => {
                    z.compact();
                }
                _ => {}
            }
            assert_eq!(z.pages(), u64_of(live.len()));
            assert!(z.slab_bytes() <= z.max_bytes());
            if op % 2000 == 0 {
                assert_eq!(z.oldest_first().collect::<Vec<_>>(), fifo(&live), "FIFO order");
                let want: usize = live.iter().filter(|l| !is_fill[l.2]).map(|l| lens[l.2]).sum();
                assert_eq!(z.compressed_bytes(), u64_of(want));
                let fills = live.iter().filter(|l| is_fill[l.2]).count();
                assert_eq!(z.fill_pages(), u64_of(fills));
                check_slabs(&z);
            }
        }
        assert_eq!(z.oldest_first().collect::<Vec<_>>(), fifo(&live), "FIFO order");
        check_slabs(&z);
        for (h, idx, pi, _) in &live {
            z.get(*h, &mut out).unwrap();
            assert_eq!(out[..], pages[*pi][..], "page {idx}");
        }
        println!(
            "{} live, {too_big} too big, {full} full, {evicted} evicted; {:?}; overhead {:.1}%",
            live.len(),
            z,
            z.overhead_ratio() * 100.0
        );
        assert!(too_big > 0 && full > 0, "the mix exercised both refusals");
        assert!(z.stats().moved_pages > 0, "compaction moved pages");
        for (h, ..) in live.drain(..) {
            assert!(z.remove(h));
        }
        assert_eq!((z.pages(), z.compressed_bytes(), z.fill_pages()), (0, 0, 0));
        check_slabs(&z);
        assert!(
            z.slab_bytes() <= u64_of(CLASSES * SLAB_TARGET_BYTES),
            "empty slabs released, at most one kept per class: {}",
            z.slab_bytes()
        );
    }

    #[test]
    fn random_pages_are_too_big() {
        let mut rng = Rng(2);
        let mut z = ZCache::new(1 << 20);
        for i in 0..100 {
            let p = make_page(&mut rng, &[], Source::Random);
            match z.insert(i, &p) {
                Err(ZcacheError::TooBig { compressed }) => assert!(compressed > PAGE_BYTES),
                other => panic!("random page stored: {other:?}"),
            }
        }
        assert_eq!(z.stats().pages, 0);
        assert_eq!(z.slab_bytes(), 0);
    }

    #[test]
    fn full_at_the_cap() {
        let mut rng = Rng(3);
        let p = make_page(&mut rng, &[], Source::Sparse);
        let cap = 3 * u64_of(SLAB_TARGET_BYTES);
        let mut z = ZCache::new(cap);
        let mut hs = Vec::new();
        let err = loop {
            match z.insert(u64_of(hs.len()), &p) {
                Ok(h) => hs.push(h),
                Err(e) => break e,
            }
        };
        assert_eq!(err, ZcacheError::Full);
        assert!(z.slab_bytes() <= cap && z.slab_bytes() > cap / 2);
        assert_eq!(z.stats().pages, u64_of(hs.len()));
        // A freed slot takes the next page without a new slab.
        assert!(z.remove(hs[1]));
        let slabs = z.slab_bytes();
        let h = z.insert(99, &p).unwrap();
        assert_eq!(z.slab_bytes(), slabs);
        assert_eq!(z.insert(100, &p), Err(ZcacheError::Full));
        // Fill pages need no slab and still fit.
        z.insert_fill(101, 42).unwrap();
        let mut out = [0u8; PAGE_BYTES];
        z.get(h, &mut out).unwrap();
        assert_eq!(out, *p);
        // A cache of capacity 0 stores nothing compressed.
        assert_eq!(ZCache::new(0).insert(0, &p), Err(ZcacheError::Full));
    }

    #[test]
    fn full_cache_compacts_before_refusing() {
        // Two classes: pages of the first fill the cache, half of them leave at random, and
        // pages of the second class then fit only once the first class is compacted.
        let mut rng = Rng(10);
        let small = make_page(&mut rng, &[], Source::Pattern);
        let big = make_page(&mut rng, &[], Source::Sparse);
        assert_ne!(class_of(compressed_len(&small)), class_of(compressed_len(&big)));
        let cap = 8 * u64_of(SLAB_TARGET_BYTES);
        let mut z = ZCache::new(cap);
        let mut hs = Vec::new();
        while let Ok(h) = z.insert(u64_of(hs.len()), &small) {
            hs.push(h);
        }
        let mut kept = Vec::new();
        for (i, h) in hs.into_iter().enumerate() {
            if rng.index(2) == 0 {
                assert!(z.remove(h));
            } else {
                kept.push((u64_of(i), h));
            }
        }
        assert_eq!(z.slab_bytes(), cap, "random removals empty no slab");
        let big_h = z.insert(1_000_000, &big).unwrap();
        assert_eq!(z.stats().compactions, 1);
        assert!(z.slab_bytes() <= cap);
        check_slabs(&z);
        let mut out = [0u8; PAGE_BYTES];
        for &(_, h) in &kept {
            z.get(h, &mut out).unwrap();
            assert_eq!(out, *small);
        }
        z.get(big_h, &mut out).unwrap();
        assert_eq!(out, *big);
        let mut want: Vec<_> = kept.clone();
        want.push((1_000_000, big_h));
        assert_eq!(z.oldest_first().collect::<Vec<_>>(), want, "compaction keeps FIFO order");
    }

    #[test]
    fn fifo_order_with_removes_in_between() {
        let mut rng = Rng(4);
        let mut z = ZCache::new(16 << 20);
        let pages: Vec<_> = (0..10).map(|_| make_page(&mut rng, &[], Source::Records)).collect();
        let hs: Vec<_> = (0..10).map(|i| z.insert(u64_of(i), &pages[i]).unwrap()).collect();
        z.insert_fill(100, 3).unwrap();
        assert_eq!(z.oldest(), Some((0, hs[0])));
        assert!(z.remove(hs[0]));
        assert!(z.remove(hs[2]));
        assert!(z.remove(hs[9]));
        assert_eq!(z.oldest(), Some((1, hs[1])));
        let h10 = z.insert(10, &pages[0]).unwrap();
        let order: Vec<u64> = z.oldest_first().map(|(i, _)| i).collect();
        assert_eq!(order, [1, 3, 4, 5, 6, 7, 8, 10]);
        let mut out = [0u8; PAGE_BYTES];
        assert_eq!(z.pop_oldest(&mut out), Some(Ok(1)));
        assert_eq!(out, *pages[1]);
        assert_eq!(z.oldest(), Some((3, hs[3])));
        for &h in &hs[3..9] {
            assert!(z.remove(h));
        }
        assert_eq!(z.oldest(), Some((10, h10)));
        assert!(z.remove(h10));
        assert_eq!(z.oldest(), None);
        assert_eq!(z.pop_oldest(&mut out), None);
        assert_eq!(z.pages(), 1, "the fill page");
    }

    #[test]
    fn stale_handle_remove_does_not_disturb_others() {
        let mut rng = Rng(5);
        let mut z = ZCache::new(16 << 20);
        let a = make_page(&mut rng, &[], Source::Records);
        let b = make_page(&mut rng, &[], Source::Sparse);
        let ha = z.insert(1, &a).unwrap();
        assert!(z.remove(ha));
        // The entry is reused by the next page, with a new generation.
        let hb = z.insert(2, &b).unwrap();
        assert_eq!(hb.entry(), ha.entry());
        assert_ne!(hb, ha);
        assert!(!z.remove(ha), "stale handle ignored");
        assert!(!z.remove(ha));
        let mut out = [0u8; PAGE_BYTES];
        assert_eq!(z.get(ha, &mut out), Err(ZcacheError::StaleHandle(ha)));
        z.get(hb, &mut out).unwrap();
        assert_eq!(out, *b);
        assert_eq!(z.oldest(), Some((2, hb)));
        // Handles never issued are refused too.
        for raw in [0, u64::MAX, hb.to_raw() + 1, hb.to_raw() + (1 << 32)] {
            let h = Handle::from_raw(raw);
            if h != hb {
                assert!(!z.remove(h));
                assert!(z.get(h, &mut out).is_err());
            }
        }
        assert_eq!(z.pages(), 1);
        assert!(z.remove(Handle::from_raw(hb.to_raw())));
    }

    #[test]
    fn corrupt_entry_is_an_error_not_a_panic() {
        let mut rng = Rng(6);
        let mut z = ZCache::new(16 << 20);
        let p = make_page(&mut rng, &[], Source::Records);
        let mut out = [0u8; PAGE_BYTES];
        let mut corrupt = 0;
        for trial in 0..300u64 {
            let h = z.insert(trial, &p).unwrap();
            let loc = Loc::unpack(z.entries[h.entry() as usize].payload);
            let n = usize::from(loc.len);
            let bytes = slot_mut(&mut z.slabs, &z.classes, loc.slab, loc.slot, n).unwrap();
            // Scribble over a few bytes of the stored data.
            for _ in 0..1 + rng.index(4) {
                bytes[rng.index(n)] = u8::try_from(rng.next() & 0xff).unwrap();
            }
            match z.get(h, &mut out) {
                Ok(()) => {}
                Err(ZcacheError::Corrupt { idx, .. }) => {
                    assert_eq!(idx, trial);
                    corrupt += 1;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(z.remove(h));
        }
        assert!(corrupt > 0);
        // Inconsistent entries: a wrong length, a slot marked free, a missing slab.
        let h = z.insert(1, &p).unwrap();
        let id = h.entry() as usize;
        let good = Loc::unpack(z.entries[id].payload);
        let bad = [
            Loc { len: u16::try_from(MAX_COMPRESSED_BYTES + 1).unwrap(), ..good },
            Loc { len: 0, ..good },
            Loc { len: good.len - 1, ..good },
            Loc { slot: good.slot + 1, ..good },
            Loc { slot: u16::MAX, ..good },
            Loc { slab: 77, ..good },
            Loc { slab: NIL, ..good },
        ];
        for loc in bad {
            z.entries[id].payload = loc.pack();
            assert!(
                matches!(z.get(h, &mut out), Err(ZcacheError::Corrupt { idx: 1, .. })),
                "{loc:?}"
            );
        }
        z.entries[id].payload = good.pack();
        z.get(h, &mut out).unwrap();
        assert_eq!(out, *p);
    }

    #[test]
    fn overhead_under_ten_percent_for_a_realistic_mix() {
        let mut rng = Rng(7);
        // Guest memory as it might look: code and data of a program, text, arrays of
        // records, mostly-zero structures, some same-filled and incompressible pages.
        let mix = [
            (Source::Binary, 4),
            (Source::Text, 2),
            (Source::Records, 3),
            (Source::Sparse, 2),
            (Source::Pattern, 1),
            (Source::Fill, 1),
            (Source::Random, 1),
        ];
        let all = pool(&mut rng, 3000, &mix);
        let total = all.len();
        // Pages over the limit never reach the cache; leave them out of the churn below.
        let pages: Vec<_> =
            all.into_iter().filter(|p| compressed_len(p) <= MAX_COMPRESSED_BYTES).collect();
        println!("{} of {total} pages compress to half a page or less", pages.len());
        // A 64 MiB cache (a 2 GiB guest with 3% of its memory compressed), filled to about
        // half, with churn: pages leave at random (faulted back in) and others come in.
        let mut z = ZCache::new(64 << 20);
        let mut hs = Vec::new();
        let mut i = 0u64;
        while z.compressed_bytes() < 24 << 20 {
            if let Some(h) = store(&mut z, i, &pages[rng.index(pages.len())]).unwrap() {
                hs.push(h);
            }
            i += 1;
        }
        for _ in 0..3 {
            for _ in 0..hs.len() / 4 {
                assert!(z.remove(hs.swap_remove(rng.index(hs.len()))));
            }
            while z.compressed_bytes() < 24 << 20 {
                if let Some(h) = store(&mut z, i, &pages[rng.index(pages.len())]).unwrap() {
                    hs.push(h);
                }
                i += 1;
            }
        }
        check_slabs(&z);
        let s = z.stats();
        let ratio = z.overhead_ratio();
        let slot_total: u64 = z
            .entries
            .iter()
            .filter(|e| e.kind() == Kind::Data)
            .map(|e| {
                u64_of(z.classes[class_of(usize::from(Loc::unpack(e.payload).len))].slot_bytes)
            })
            .sum();
        println!(
            "realistic mix: {} pages ({} same-filled), {} compressed bytes (avg {} a page) \
             in {} slab bytes + {} metadata bytes: slot rounding {}, free slots {}, \
             {} compactions moving {} pages; overhead {:.2}%",
            s.pages,
            s.fill_pages,
            s.compressed_bytes,
            s.compressed_bytes / (s.pages - s.fill_pages),
            s.slab_bytes,
            s.metadata_bytes,
            slot_total - s.compressed_bytes,
            s.slab_bytes - slot_total,
            s.compactions,
            s.moved_pages,
            ratio * 100.0
        );
        assert!(ratio < 0.10, "overhead {ratio}");
    }
}
