//! The pool of canonical pages: one memfd per VM (one per sharing group later) holding one
//! copy of each shared content, with a reference count per slot, which guest page maps
//! which slot, and the hash index the scanner looks contents up in.
//!
//! Invariants, all kept under one lock:
//! - a slot with a non-zero count holds its content unchanged: nothing writes a live slot
//!   (guest pages map it privately, so a guest write makes a private copy);
//! - a slot's count is the number of guest pages that map it plus the scanner's pins;
//! - when a count falls to zero the slot's memory is returned to the host (a hole punched
//!   in the memfd), its index entry goes, and the slot is free for reuse;
//! - the index maps a content hash to a live slot (canonical) or to a guest page seen with
//!   that hash in this pass of the scanner (a hint, KSM's unstable tree); hints are dropped
//!   at each new pass and kept to at most the pool's hint capacity.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::sys::{memfd, punch_hole, View};
use crate::mm::zcache::Page;
use crate::units::PAGE_SIZE;

/// Slots the memfd grows by at a time.
const GROW_SLOTS: u64 = 256;
/// Index entries: the top bit says canonical (the rest is a slot), else a hint (a page).
const CANONICAL: u64 = 1 << 63;

/// What the index knows of a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A live slot with that hash, pinned for the caller (unpin or attach it).
    Canonical(u64),
    /// A guest page seen with that hash in this pass.
    Hint(u64),
    /// A page of another VM of the sharing group seen with that hash (it cannot be frozen
    /// from here: store this VM's page as the canonical copy for the other to join).
    Foreign,
    /// Nothing.
    Nothing,
}

/// What the scanner, the merger and the fault handler need of a pool: a VM's own
/// ([`Pool`]) or its sharing group's (`member::GroupMember`). Semantics are [`Pool`]'s.
pub trait SharePool: std::fmt::Debug + Send + Sync {
    /// The memfd of canonical pages.
    fn file(&self) -> &File;
    /// The secret key of the scanner's hash (every member of a group has the group's).
    fn seed(&self) -> u64;
    /// Copies the content of live slot `slot` into `out`; false if there is no such slot.
    fn read(&self, slot: u64, out: &mut Page) -> bool;
    /// Looks `hash` up; a canonical slot comes back pinned.
    fn find(&self, hash: u64) -> Found;
    /// Remembers page `idx` as having `hash`, unless known or the hints are full.
    fn hint(&self, hash: u64, idx: u64);
    /// Forgets the hint for `hash` if it names page `idx`.
    fn forget_hint(&self, hash: u64, idx: u64);
    /// Drops this VM's hints (a new pass of its scanner begins).
    fn clear_hints(&self);
    /// Stores `content` in a free slot, indexed and pinned once.
    ///
    /// # Errors
    /// The pool is full, or its memfd could not grow.
    fn create(&self, hash: u64, content: &Page) -> Result<u64, PoolError>;
    /// Pins `slot` once more.
    fn pin(&self, slot: u64);
    /// Drops a pin of `slot`.
    fn unpin(&self, slot: u64);
    /// Page `idx` now maps `slot` (a pin becomes the page's reference).
    fn attach(&self, idx: u64, slot: u64);
    /// Page `idx` no longer maps its slot; returns the slot.
    fn detach(&self, idx: u64) -> Option<u64>;
    /// The slot page `idx` maps.
    fn slot_of(&self, idx: u64) -> Option<u64>;
    /// Host pages this VM's shared pages cost (its part of a group's pool).
    fn live_pages(&self) -> u64;
    /// The whole group's live pages (None: not a group).
    fn group_live_pages(&self) -> Option<u64> {
        None
    }
    /// Bytes of metadata this VM keeps for the pool.
    fn metadata_bytes(&self) -> u64;
}

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The memfd or its view could not be created or grown.
    #[error("sharing pool: {0}")]
    Io(#[from] std::io::Error),
    /// Every slot is in use.
    #[error("sharing pool is full ({0} pages)")]
    Full(u64),
}

#[derive(Debug, Default)]
struct Inner {
    refs: Vec<u32>,
    hashes: Vec<u64>,
    free: Vec<u64>,
    of_page: HashMap<u64, u64>,
    index: HashMap<u64, u64>,
    hints: usize,
    live: u64,
}

/// The canonical pages of one VM.
#[derive(Debug)]
pub struct Pool {
    file: File,
    view: View,
    capacity: u64,
    hint_capacity: usize,
    seed: u64,
    inner: Mutex<Inner>,
}

impl Pool {
    /// An empty pool of at most `capacity` pages, with at most `hint_capacity` hints.
    ///
    /// # Errors
    /// The memfd or its view could not be created.
    pub fn new(capacity: u64, hint_capacity: usize) -> Result<Self, PoolError> {
        let file = memfd(c"ebb-sharing-pool")?;
        let view = View::new(&file, capacity.saturating_mul(PAGE_SIZE).max(PAGE_SIZE))?;
        let seed = crate::mm::rng::secret_u64()?;
        Ok(Self { file, view, capacity, hint_capacity, seed, inner: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new slot past the end of the file, growing the file when it is full.
    fn grow(&self, inner: &mut Inner) -> Result<u64, PoolError> {
        let slot = inner.refs.len() as u64;
        if slot >= self.capacity {
            return Err(PoolError::Full(self.capacity));
        }
        if slot % GROW_SLOTS == 0 {
            let pages = (slot + GROW_SLOTS).min(self.capacity);
            self.file.set_len(pages * PAGE_SIZE)?;
        }
        inner.refs.push(0);
        inner.hashes.push(0);
        Ok(slot)
    }

    fn release(&self, inner: &mut Inner, slot: u64) {
        let i = to_index(slot);
        let Some(refs) = inner.refs.get_mut(i) else { return };
        if *refs == 0 {
            // A slot released more often than it was referenced (a bug): freeing it again
            // would put it on the free stack twice, and two contents would share it later.
            log::error!("sharing pool: slot {slot} released while free; ignored");
            return;
        }
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        let hash = inner.hashes[i];
        if inner.index.get(&hash) == Some(&(slot | CANONICAL)) {
            inner.index.remove(&hash);
        }
        if let Err(e) = punch_hole(&self.file, slot * PAGE_SIZE, PAGE_SIZE) {
            log::warn!("sharing pool: freeing slot {slot}: {e}");
        }
        inner.free.push(slot);
        inner.live -= 1;
    }
}

impl SharePool for Pool {
    /// The memfd (mapped privately over shared guest pages).
    fn file(&self) -> &File {
        &self.file
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    /// Copies the content of live slot `slot` (unchanged while the caller holds a reference).
    fn read(&self, slot: u64, out: &mut Page) -> bool {
        self.view.read(slot, out)
    }

    /// Looks `hash` up; a canonical slot comes back pinned.
    fn find(&self, hash: u64) -> Found {
        let mut inner = self.lock();
        match inner.index.get(&hash).copied() {
            Some(e) if e & CANONICAL != 0 => {
                let slot = e & !CANONICAL;
                inner.pin(slot);
                Found::Canonical(slot)
            }
            Some(page) => Found::Hint(page),
            None => Found::Nothing,
        }
    }

    /// Remembers page `idx` as having `hash`, unless the hash is known or the hints are full.
    fn hint(&self, hash: u64, idx: u64) {
        let mut inner = self.lock();
        if inner.hints < self.hint_capacity && !inner.index.contains_key(&hash) {
            inner.index.insert(hash, idx);
            inner.hints += 1;
        }
    }

    /// Forgets the hint for `hash` if it names page `idx`.
    fn forget_hint(&self, hash: u64, idx: u64) {
        let mut inner = self.lock();
        if inner.index.get(&hash) == Some(&idx) {
            inner.index.remove(&hash);
            inner.hints -= 1;
        }
    }

    /// Drops every hint (a new pass of the scanner begins).
    fn clear_hints(&self) {
        let mut inner = self.lock();
        inner.index.retain(|_, e| *e & CANONICAL != 0);
        inner.hints = 0;
    }

    /// Stores `content` (whose hash is `hash`) in a free slot, indexed and pinned once.
    ///
    /// # Errors
    /// The pool is full, or its memfd could not grow.
    fn create(&self, hash: u64, content: &Page) -> Result<u64, PoolError> {
        let mut inner = self.lock();
        let slot = match inner.free.pop() {
            Some(slot) => slot,
            None => self.grow(&mut inner)?,
        };
        self.view.write(slot, content);
        let i = to_index(slot);
        inner.refs[i] = 1;
        inner.hashes[i] = hash;
        inner.live += 1;
        if inner.index.insert(hash, slot | CANONICAL).is_some_and(|e| e & CANONICAL == 0) {
            inner.hints -= 1;
        }
        Ok(slot)
    }

    /// Pins `slot` once more (for a second page about to map it).
    fn pin(&self, slot: u64) {
        self.lock().pin(slot);
    }

    /// Drops a pin of `slot`, freeing the slot when nothing refers to it any more.
    fn unpin(&self, slot: u64) {
        let mut inner = self.lock();
        self.release(&mut inner, slot);
    }

    /// Page `idx` now maps `slot`: a pin of the caller's becomes the page's reference.
    fn attach(&self, idx: u64, slot: u64) {
        self.lock().of_page.insert(idx, slot);
    }

    /// Page `idx` no longer maps its slot; drops its reference. Returns the slot.
    fn detach(&self, idx: u64) -> Option<u64> {
        let mut inner = self.lock();
        let slot = inner.of_page.remove(&idx)?;
        self.release(&mut inner, slot);
        Some(slot)
    }

    /// The slot page `idx` maps, if it is shared.
    fn slot_of(&self, idx: u64) -> Option<u64> {
        self.lock().of_page.get(&idx).copied()
    }

    /// Slots in use: host pages backing shared guest pages.
    fn live_pages(&self) -> u64 {
        self.lock().live
    }

    /// Bytes of metadata: per slot, per shared page, per index entry.
    fn metadata_bytes(&self) -> u64 {
        let inner = self.lock();
        let slots =
            inner.refs.capacity() * 4 + inner.hashes.capacity() * 8 + inner.free.capacity() * 8;
        // A hash map entry: key and value (16 bytes) plus a control byte, at 7/8 load.
        let maps = (inner.of_page.capacity() + inner.index.capacity()) * 17;
        (slots + maps) as u64
    }
}

impl Inner {
    fn pin(&mut self, slot: u64) {
        if let Some(r) = self.refs.get_mut(to_index(slot)) {
            *r += 1;
        }
    }
}

fn to_index(slot: u64) -> usize {
    usize::try_from(slot).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(byte: u8) -> Box<Page> {
        Box::new([byte; 4096])
    }

    fn content(pool: &dyn SharePool, slot: u64) -> Box<Page> {
        let mut out = Box::new([0xffu8; 4096]);
        assert!(pool.read(slot, &mut out));
        out
    }

    #[test]
    fn a_created_slot_holds_its_content_and_is_found_pinned() {
        let pool = Pool::new(16, 8).unwrap();
        let slot = pool.create(7, &page_of(3)).unwrap();
        assert_eq!(content(&pool, slot)[100], 3);
        assert_eq!(pool.find(7), Found::Canonical(slot));
        assert_eq!(pool.live_pages(), 1);
    }

    #[test]
    fn the_last_reference_frees_the_slot_and_its_index_entry() {
        let pool = Pool::new(16, 8).unwrap();
        let slot = pool.create(7, &page_of(3)).unwrap();
        pool.attach(10, slot);
        pool.pin(slot);
        pool.attach(11, slot);
        assert_eq!(pool.detach(10), Some(slot));
        assert_eq!(pool.live_pages(), 1, "page 11 still maps it");
        assert_eq!(pool.detach(11), Some(slot));
        assert_eq!(pool.live_pages(), 0);
        assert_eq!(pool.find(7), Found::Nothing);
        assert_eq!(content(&pool, slot)[100], 0, "the hole reads as zeros");
        assert_eq!(pool.create(8, &page_of(4)).unwrap(), slot, "the slot is reused");
    }

    #[test]
    fn a_slot_released_once_too_often_is_not_freed_twice() {
        let pool = Pool::new(16, 8).unwrap();
        let slot = pool.create(7, &page_of(3)).unwrap();
        pool.unpin(slot);
        assert_eq!(pool.live_pages(), 0);
        pool.unpin(slot); // one release too many
        assert_eq!(pool.live_pages(), 0, "no underflow");
        let a = pool.create(8, &page_of(4)).unwrap();
        let b = pool.create(9, &page_of(5)).unwrap();
        assert_ne!(a, b, "the slot was on the free stack once, not twice");
        assert_eq!((content(&pool, a)[0], content(&pool, b)[0]), (4, 5));
    }

    #[test]
    fn hints_are_capped_replaced_by_canonical_slots_and_cleared_per_pass() {
        let pool = Pool::new(16, 2).unwrap();
        pool.hint(1, 100);
        pool.hint(2, 200);
        pool.hint(3, 300);
        assert_eq!(pool.find(3), Found::Nothing, "over capacity");
        assert_eq!(pool.find(1), Found::Hint(100));
        let slot = pool.create(1, &page_of(9)).unwrap();
        assert_eq!(pool.find(1), Found::Canonical(slot));
        pool.hint(3, 300);
        assert_eq!(pool.find(3), Found::Hint(300), "the canonical entry freed a hint");
        pool.clear_hints();
        assert_eq!(pool.find(2), Found::Nothing);
        assert!(matches!(pool.find(1), Found::Canonical(_)), "canonical entries stay");
    }

    #[test]
    fn a_full_pool_refuses_new_content() {
        let pool = Pool::new(1, 2).unwrap();
        pool.create(1, &page_of(1)).unwrap();
        assert!(matches!(pool.create(2, &page_of(2)), Err(PoolError::Full(1))));
    }
}
