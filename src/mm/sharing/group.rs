//! A sharing group's pool: canonical pages that the VM processes of one group share with
//! each other (ESX's salting: VMs in different groups, or in none, never share a page).
//!
//! The host creates two memfds per group ([`create_files`]) and every VM process of the
//! group inherits them: `data`, the canonical pages (mapped privately over guest pages, so
//! a page read by three VMs is one host page), and `meta`, the pool's tables as 64-bit words
//! in shared memory:
//!
//! | words | what |
//! |---|---|
//! | 0..16 | header: magic, capacity, index length, hint capacity, lock, members, live slots, hints, free-stack top, next slot, pages attached |
//! | then `capacity` | each slot's reference count (guest pages of any member that map it, plus pins) |
//! | then `capacity` | each slot's content hash |
//! | then `capacity` | the stack of free slots |
//! | then 2 x index length | the hash index, open addressing: (hash, entry) pairs, hash 0 empty |
//!
//! Index entries: the top bit says canonical (the rest is a slot); otherwise a hint, a guest
//! page seen with that hash this pass, tagged with its member (bits 40-62) since a member
//! can freeze only its own pages. A member that meets another member's hint stores its own
//! page as the canonical copy, which the other member joins at its next visit.
//!
//! Invariants: every table changes under the lock word (a spin lock holding the owner's
//! pid; a lock whose owner died is taken over); a slot's count is the number of guest pages
//! of all members that map it plus the scanners' pins; a member releases the pages it
//! maps when it ends. A member killed outright leaks its references until the group ends
//! (the host holds the memfds): memory, never another VM's data.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::pool::{Found, PoolError, SharePool};
use super::sys::{memfd, punch_hole, View};
use crate::mm::zcache::{Page, PAGE_BYTES};
use crate::units::PAGE_SIZE;

/// "ebbgroup" in ASCII: the meta memfd's first word.
const MAGIC: u64 = u64::from_be_bytes(*b"ebbgroup");
const HEADER_WORDS: u64 = 16;
const W_MAGIC: u64 = 0;
const W_CAPACITY: u64 = 1;
const W_INDEX_LEN: u64 = 2;
const W_HINT_CAP: u64 = 3;
const W_LOCK: u64 = 4;
const W_MEMBERS: u64 = 5;
const W_LIVE: u64 = 6;
const W_HINTS: u64 = 7;
const W_FREE_TOP: u64 = 8;
const W_NEXT_SLOT: u64 = 9;
const W_ATTACHED: u64 = 10;
/// Index entry bit: a canonical slot.
const CANONICAL: u64 = 1 << 63;
/// Hint entries: member id above this shift, page index below.
const MEMBER_SHIFT: u32 = 40;
/// Slots the data memfd grows by at a time.
const GROW_SLOTS: u64 = 256;
/// Default capacity of a group's pool: 65536 pages (256 MiB of canonical content).
pub const DEFAULT_GROUP_SLOTS: u64 = 1 << 16;

fn words_for(capacity: u64) -> u64 {
    HEADER_WORDS + 3 * capacity + 2 * index_len(capacity)
}

/// Index length: a power of two at least four times the slots (canonical plus as many
/// hints), so that the table stays at most half full.
fn index_len(capacity: u64) -> u64 {
    (capacity.max(4) * 4).next_power_of_two()
}

/// Creates a group's two memfds, `(data, meta)`, for `capacity` canonical pages.
///
/// # Errors
/// The memfds could not be created or sized.
pub fn create_files(capacity: u64) -> std::io::Result<(File, File)> {
    let data = memfd(c"ebb-sharing-group")?;
    let meta = memfd(c"ebb-sharing-group-meta")?;
    meta.set_len(words_for(capacity) * 8)?;
    let view = View::new(&meta, words_for(capacity) * 8)?;
    let w = |i: u64| view.word(i).ok_or_else(|| std::io::Error::other("meta view too short"));
    w(W_CAPACITY)?.store(capacity, Ordering::Relaxed);
    w(W_INDEX_LEN)?.store(index_len(capacity), Ordering::Relaxed);
    w(W_HINT_CAP)?.store(capacity, Ordering::Relaxed);
    w(W_MAGIC)?.store(MAGIC, Ordering::Release);
    Ok((data, meta))
}

#[derive(Debug, Default)]
struct Local {
    /// This member's shared pages and the slot each maps.
    of_page: HashMap<u64, u64>,
}

/// This process's handle on its group's pool.
#[derive(Debug)]
pub struct GroupPool {
    data: File,
    view: View,
    meta: View,
    capacity: u64,
    index_len: u64,
    member: u64,
    local: Mutex<Local>,
}

/// The lock word held: released on drop.
struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

fn pid_alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl GroupPool {
    /// Joins the group whose memfds are `data` and `meta`.
    ///
    /// # Errors
    /// `meta` is not a group's table (wrong magic or size), or a view cannot be mapped.
    pub fn attach(data: File, meta: File) -> Result<Self, PoolError> {
        let bad = |why: &str| {
            PoolError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a sharing group's pool: {why}"),
            ))
        };
        let len = meta.metadata()?.len();
        if len < HEADER_WORDS * 8 {
            return Err(bad("its table is too short"));
        }
        let head = View::new(&meta, HEADER_WORDS * 8)?;
        let read = |i| head.word(i).map_or(0, |w| w.load(Ordering::Acquire));
        let (magic, capacity) = (read(W_MAGIC), read(W_CAPACITY));
        if magic != MAGIC || capacity == 0 || capacity > 1 << 30 {
            return Err(bad("wrong magic or capacity"));
        }
        if len != words_for(capacity) * 8 || read(W_INDEX_LEN) != index_len(capacity) {
            return Err(bad("its table does not match its capacity"));
        }
        let meta_view = View::new(&meta, len)?;
        let view = View::new(&data, capacity * PAGE_SIZE)?;
        let member = meta_view.word(W_MEMBERS).map_or(0, |w| w.fetch_add(1, Ordering::Relaxed));
        if member >= 1 << (63 - MEMBER_SHIFT) {
            return Err(bad("too many members"));
        }
        Ok(Self {
            data,
            view,
            meta: meta_view,
            capacity,
            index_len: index_len(capacity),
            member,
            local: Mutex::default(),
        })
    }

    fn w(&self, i: u64) -> &AtomicU64 {
        // Every index passed is within the table, checked at attach; a miss is a bug.
        self.meta.word(i).unwrap_or_else(|| panic!("group table word {i} out of range"))
    }

    fn refs(&self, slot: u64) -> &AtomicU64 {
        self.w(HEADER_WORDS + slot)
    }

    fn hash_word(&self, slot: u64) -> &AtomicU64 {
        self.w(HEADER_WORDS + self.capacity + slot)
    }

    fn free_word(&self, i: u64) -> &AtomicU64 {
        self.w(HEADER_WORDS + 2 * self.capacity + i)
    }

    fn entry(&self, i: u64) -> (&AtomicU64, &AtomicU64) {
        let base = HEADER_WORDS + 3 * self.capacity + 2 * i;
        (self.w(base), self.w(base + 1))
    }

    fn get(&self, w: u64) -> u64 {
        self.w(w).load(Ordering::Relaxed)
    }

    fn add(&self, w: u64, delta: i64) {
        let v = self.get(w).saturating_add_signed(delta);
        self.w(w).store(v, Ordering::Relaxed);
    }

    fn lock(&self) -> Held<'_> {
        let word = self.w(W_LOCK);
        let me = u64::from(std::process::id());
        let mut spins = 0u32;
        loop {
            if word.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return Held(word);
            }
            spins = spins.wrapping_add(1);
            if spins % 64 != 0 {
                std::hint::spin_loop();
                continue;
            }
            std::thread::yield_now();
            let owner = word.load(Ordering::Relaxed);
            if owner != 0
                && owner != me
                && !pid_alive(owner)
                && word.compare_exchange(owner, me, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                {
                    log::warn!(
                        "sharing group: process {owner} died holding the pool's lock; taken over"
                    );
                    return Held(word);
                }
            }
        }
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index slot of `key`, or of the empty entry where it would go.
    fn probe(&self, key: u64) -> u64 {
        let mask = self.index_len - 1;
        let mut i = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20 & mask;
        loop {
            let k = self.entry(i).0.load(Ordering::Relaxed);
            if k == 0 || k == key {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    fn lookup(&self, key: u64) -> Option<u64> {
        let (k, v) = self.entry(self.probe(key));
        (k.load(Ordering::Relaxed) == key).then(|| v.load(Ordering::Relaxed))
    }

    fn insert(&self, key: u64, value: u64) -> Option<u64> {
        let (k, v) = self.entry(self.probe(key));
        let old = (k.load(Ordering::Relaxed) == key).then(|| v.load(Ordering::Relaxed));
        k.store(key, Ordering::Relaxed);
        v.store(value, Ordering::Relaxed);
        old
    }

    /// Removes `key`, shifting later entries of its run back (no tombstones).
    fn remove(&self, key: u64) {
        let mask = self.index_len - 1;
        let mut hole = self.probe(key);
        if self.entry(hole).0.load(Ordering::Relaxed) != key {
            return;
        }
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let (k, v) = self.entry(i);
            let key_i = k.load(Ordering::Relaxed);
            if key_i == 0 {
                break;
            }
            let home = key_i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20 & mask;
            // Move the entry into the hole unless its home lies cyclically in (hole, i].
            let stays = if hole <= i { hole < home && home <= i } else { hole < home || home <= i };
            if !stays {
                let (hk, hv) = self.entry(hole);
                hk.store(key_i, Ordering::Relaxed);
                hv.store(v.load(Ordering::Relaxed), Ordering::Relaxed);
                hole = i;
            }
        }
        self.entry(hole).0.store(0, Ordering::Relaxed);
    }

    /// Removes this member's hints from the index; the lock is held.
    fn clear_own_hints(&self) {
        let mine: Vec<u64> = (0..self.index_len)
            .filter_map(|i| {
                let (k, v) = self.entry(i);
                let (k, v) = (k.load(Ordering::Relaxed), v.load(Ordering::Relaxed));
                (k != 0 && v & CANONICAL == 0 && v >> MEMBER_SHIFT == self.member).then_some(k)
            })
            .collect();
        for key in &mine {
            self.remove(*key);
        }
        self.add(W_HINTS, -i64::try_from(mine.len()).unwrap_or(0));
    }

    fn hint_entry(&self, idx: u64) -> u64 {
        (self.member << MEMBER_SHIFT) | idx
    }

    fn release(&self, slot: u64) {
        if slot >= self.capacity {
            return;
        }
        let refs = self.refs(slot);
        let n = refs.load(Ordering::Relaxed);
        if n == 0 {
            // Released twice (a bug): freeing it again would push it on the free stack twice.
            log::error!("sharing group: slot {slot} released with no reference");
            return;
        }
        refs.store(n - 1, Ordering::Relaxed);
        if n > 1 {
            return;
        }
        let key = key_of(self.hash_word(slot).load(Ordering::Relaxed));
        if self.lookup(key) == Some(slot | CANONICAL) {
            self.remove(key);
        }
        if let Err(e) = punch_hole(&self.data, slot * PAGE_SIZE, PAGE_SIZE) {
            log::warn!("sharing group: freeing slot {slot}: {e}");
        }
        let top = self.get(W_FREE_TOP);
        self.free_word(top).store(slot, Ordering::Relaxed);
        self.w(W_FREE_TOP).store(top + 1, Ordering::Relaxed);
        self.add(W_LIVE, -1);
    }

    fn new_slot(&self) -> Result<u64, PoolError> {
        let top = self.get(W_FREE_TOP);
        if top > 0 {
            self.w(W_FREE_TOP).store(top - 1, Ordering::Relaxed);
            return Ok(self.free_word(top - 1).load(Ordering::Relaxed));
        }
        let slot = self.get(W_NEXT_SLOT);
        if slot >= self.capacity {
            return Err(PoolError::Full(self.capacity));
        }
        if slot % GROW_SLOTS == 0 {
            let pages = (slot + GROW_SLOTS).min(self.capacity);
            if self.data.metadata()?.len() < pages * PAGE_SIZE {
                self.data.set_len(pages * PAGE_SIZE)?;
            }
        }
        self.w(W_NEXT_SLOT).store(slot + 1, Ordering::Relaxed);
        Ok(slot)
    }
}

/// Index key of a hash: 0 marks an empty entry, so hash 0 is stored as 1 (a collision
/// like any other: contents are always compared).
fn key_of(hash: u64) -> u64 {
    hash.max(1)
}

impl SharePool for GroupPool {
    fn file(&self) -> &File {
        &self.data
    }

    fn read(&self, slot: u64, out: &mut Page) -> bool {
        self.view.read(slot, out)
    }

    fn find(&self, hash: u64) -> Found {
        let _held = self.lock();
        match self.lookup(key_of(hash)) {
            Some(e) if e & CANONICAL != 0 => {
                let slot = e & !CANONICAL;
                self.refs(slot).fetch_add(1, Ordering::Relaxed);
                Found::Canonical(slot)
            }
            Some(e) if e >> MEMBER_SHIFT == self.member => {
                Found::Hint(e & ((1 << MEMBER_SHIFT) - 1))
            }
            Some(_) => Found::Foreign,
            None => Found::Nothing,
        }
    }

    fn hint(&self, hash: u64, idx: u64) {
        let _held = self.lock();
        let key = key_of(hash);
        if self.get(W_HINTS) < self.get(W_HINT_CAP) && self.lookup(key).is_none() {
            self.insert(key, self.hint_entry(idx));
            self.add(W_HINTS, 1);
        }
    }

    fn forget_hint(&self, hash: u64, idx: u64) {
        let _held = self.lock();
        let key = key_of(hash);
        if self.lookup(key) == Some(self.hint_entry(idx)) {
            self.remove(key);
            self.add(W_HINTS, -1);
        }
    }

    fn clear_hints(&self) {
        let _held = self.lock();
        self.clear_own_hints();
    }

    /// Another member may have stored the same content since this member looked the hash
    /// up: then its slot is pinned and returned, so that the group keeps one copy.
    fn create(&self, hash: u64, content: &Page) -> Result<u64, PoolError> {
        let _held = self.lock();
        if let Some(e) = self.lookup(key_of(hash)).filter(|e| e & CANONICAL != 0) {
            let slot = e & !CANONICAL;
            let mut stored = Box::new([0u8; PAGE_BYTES]);
            if self.view.read(slot, &mut stored) && *stored == *content {
                self.refs(slot).fetch_add(1, Ordering::Relaxed);
                return Ok(slot);
            }
        }
        let slot = self.new_slot()?;
        self.view.write(slot, content);
        self.refs(slot).store(1, Ordering::Relaxed);
        self.hash_word(slot).store(hash, Ordering::Relaxed);
        self.add(W_LIVE, 1);
        if self.insert(key_of(hash), slot | CANONICAL).is_some_and(|e| e & CANONICAL == 0) {
            self.add(W_HINTS, -1);
        }
        Ok(slot)
    }

    fn pin(&self, slot: u64) {
        let _held = self.lock();
        if slot < self.capacity {
            self.refs(slot).fetch_add(1, Ordering::Relaxed);
        }
    }

    fn unpin(&self, slot: u64) {
        let _held = self.lock();
        self.release(slot);
    }

    fn attach(&self, idx: u64, slot: u64) {
        let mut local = self.local();
        let _held = self.lock();
        if local.of_page.insert(idx, slot).is_none() {
            self.add(W_ATTACHED, 1);
        }
    }

    fn detach(&self, idx: u64) -> Option<u64> {
        let mut local = self.local();
        let slot = local.of_page.remove(&idx)?;
        let _held = self.lock();
        self.add(W_ATTACHED, -1);
        self.release(slot);
        Some(slot)
    }

    fn slot_of(&self, idx: u64) -> Option<u64> {
        self.local().of_page.get(&idx).copied()
    }

    /// This member's part of the group's pool: its live pages in proportion to the guest
    /// pages it maps, so that the members' parts add up to the pool.
    fn live_pages(&self) -> u64 {
        let mine = self.local().of_page.len() as u64;
        let _held = self.lock();
        let (live, attached) = (self.get(W_LIVE), self.get(W_ATTACHED));
        if attached == 0 {
            return 0;
        }
        u64::try_from(u128::from(live) * u128::from(mine) / u128::from(attached)).unwrap_or(live)
    }

    fn group_live_pages(&self) -> Option<u64> {
        let _held = self.lock();
        Some(self.get(W_LIVE))
    }

    fn metadata_bytes(&self) -> u64 {
        let members = self.get(W_MEMBERS).max(1);
        (self.local().of_page.capacity() * 17) as u64 + words_for(self.capacity) * 8 / members
    }
}

impl Drop for GroupPool {
    /// A member that ends gives back the references of its shared pages, and its hints.
    fn drop(&mut self) {
        let pages: Vec<u64> = self.local().of_page.drain().map(|(_, slot)| slot).collect();
        let _held = self.lock();
        // Hints count against the group's cap: a member's would block the others' forever.
        self.clear_own_hints();
        for slot in pages {
            self.add(W_ATTACHED, -1);
            self.release(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(byte: u8) -> Box<Page> {
        Box::new([byte; crate::mm::zcache::PAGE_BYTES])
    }

    fn group(capacity: u64) -> (GroupPool, GroupPool) {
        let (data, meta) = create_files(capacity).unwrap();
        let a = GroupPool::attach(data.try_clone().unwrap(), meta.try_clone().unwrap()).unwrap();
        let b = GroupPool::attach(data, meta).unwrap();
        (a, b)
    }

    #[test]
    fn a_canonical_page_of_one_member_is_found_by_another() {
        let (a, b) = group(16);
        let slot = a.create(42, &page_of(7)).unwrap();
        a.attach(3, slot);
        assert_eq!(b.find(42), Found::Canonical(slot));
        let mut seen = Box::new([0u8; PAGE_BYTES]);
        assert!(b.read(slot, &mut seen));
        assert_eq!(seen[100], 7);
        b.attach(9, slot);
        assert_eq!(a.group_live_pages(), Some(1));
        // Each member's part: half of the one live page, rounded down.
        assert_eq!(a.live_pages() + b.live_pages(), 0);
        a.detach(3);
        assert_eq!(b.live_pages(), 1);
        b.detach(9);
        assert_eq!(b.find(42), Found::Nothing, "the last reference frees the slot");
    }

    #[test]
    fn content_another_member_stored_meanwhile_is_not_stored_twice() {
        let (a, b) = group(16);
        let slot = a.create(42, &page_of(7)).unwrap();
        assert_eq!(b.create(42, &page_of(7)).unwrap(), slot);
        assert_eq!(a.group_live_pages(), Some(1));
        // A true collision (same hash, other bytes) gets a slot of its own.
        assert_ne!(b.create(42, &page_of(8)).unwrap(), slot);
    }

    #[test]
    fn hints_are_each_members_own() {
        let (a, b) = group(16);
        a.hint(5, 100);
        assert_eq!(a.find(5), Found::Hint(100));
        assert_eq!(b.find(5), Found::Foreign);
        b.clear_hints();
        assert_eq!(a.find(5), Found::Hint(100), "b's pass leaves a's hints");
        a.clear_hints();
        assert_eq!(b.find(5), Found::Nothing);
    }

    #[test]
    fn removal_keeps_every_other_key_findable() {
        let (a, _) = group(4); // an index of 16 entries, 12 of them used: long probe runs
        let _held = a.lock();
        for k in 1..=12u64 {
            a.insert(k * 16, k);
        }
        for k in (1..=12u64).step_by(2) {
            a.remove(k * 16);
        }
        for k in 1..=12u64 {
            let want = if k % 2 == 1 { None } else { Some(k) };
            assert_eq!(a.lookup(k * 16), want, "key {}", k * 16);
        }
        for k in (2..=12u64).step_by(2) {
            a.remove(k * 16);
        }
        assert!((0..16).all(|i| a.entry(i).0.load(Ordering::Relaxed) == 0), "all empty again");
    }

    #[test]
    fn a_member_that_ends_releases_its_pages() {
        let (a, b) = group(16);
        let slot = a.create(1, &page_of(1)).unwrap();
        a.attach(0, slot);
        a.hint(77, 5);
        drop(a);
        assert_eq!(b.find(77), Found::Nothing, "and its hints");
        assert_eq!(b.find(1), Found::Nothing);
        assert_eq!(b.group_live_pages(), Some(0));
    }

    #[test]
    fn a_full_group_refuses_new_content_and_reuses_freed_slots() {
        let (a, _) = group(1);
        let slot = a.create(1, &page_of(1)).unwrap();
        assert!(matches!(a.create(2, &page_of(2)), Err(PoolError::Full(1))));
        a.unpin(slot);
        assert_eq!(a.create(3, &page_of(3)).unwrap(), slot);
    }

    #[test]
    fn files_that_are_not_a_group_are_refused() {
        let junk = memfd(c"junk").unwrap();
        junk.set_len(4096).unwrap();
        let err = GroupPool::attach(memfd(c"d").unwrap(), junk).unwrap_err();
        assert!(err.to_string().contains("not a sharing group's pool"), "{err}");
    }
}
