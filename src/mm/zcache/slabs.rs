//! The cache's memory: entries, size-classed slabs and their bitmaps, the FIFO list. The
//! invariants are those of the module docs of `zcache`; these are the only functions that
//! change slabs, slots and entries.

use super::*;

impl ZCache {
    /// Checks that a page for `idx` can get an entry; returns the index in 32 bits.
    pub(super) fn check_room(&self, idx: u64) -> Result<u32, ZcacheError> {
        let idx32 = u32::try_from(idx).map_err(|_| ZcacheError::IndexTooLarge { idx })?;
        let table_full = u32::try_from(self.entries.len()).map_or(true, |l| l == NIL);
        if self.free_entry == NIL && table_full {
            return Err(ZcacheError::Full);
        }
        Ok(idx32)
    }

    /// The live entry `h` names.
    pub(super) fn live(&self, h: Handle) -> Result<&Entry, ZcacheError> {
        match self.entries.get(h.entry() as usize) {
            Some(e) if u64::from(e.gen()) == h.gen() && e.kind() != Kind::Free => Ok(e),
            _ => Err(ZcacheError::StaleHandle(h)),
        }
    }

    pub(super) fn slab(&self, id: u32) -> Option<&Slab> {
        self.slabs.get(id as usize).and_then(Option::as_ref)
    }

    pub(super) fn slab_mut(&mut self, id: u32) -> Option<&mut Slab> {
        self.slabs.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// The compressed bytes of a data entry, checked against its slab.
    pub(super) fn stored_bytes(&self, e: &Entry) -> Result<&[u8], ZcacheError> {
        let corrupt = |what| ZcacheError::Corrupt { idx: u64::from(e.idx), what };
        let loc = Loc::unpack(e.payload);
        let slab = self.slab(loc.slab).ok_or(corrupt("slab missing"))?;
        let class = self.classes.get(usize::from(slab.class)).ok_or(corrupt("bad class"))?;
        let slot = usize::from(loc.slot);
        let len = usize::from(loc.len);
        if slot >= class.slots_per_slab || !bit(&slab.used_bits, slot) {
            return Err(corrupt("slot not in use"));
        }
        if len == 0 || len > class.slot_bytes {
            return Err(corrupt("length does not fit the slot"));
        }
        let start = slot * class.slot_bytes;
        slab.data.get(start..start + len).ok_or(corrupt("slot outside its slab"))
    }

    /// A free slot of class `c`: from a partly used slab, else from a new slab if the
    /// capacity allows (compacting first when that is worth it or needed).
    pub(super) fn alloc_slot(&mut self, c: usize) -> Result<(u32, u16), ZcacheError> {
        let slab = match self.classes[c].partial.last() {
            Some(&id) => id,
            None => {
                let need = u64_of(self.classes[c].slab_bytes());
                if self.compaction_due(need) {
                    self.compact();
                }
                self.new_slab(c)?
            }
        };
        let slot = self.take_slot(slab).ok_or(ZcacheError::Full)?;
        Ok((slab, slot))
    }

    /// Whether to compact before adding a slab of `need` bytes: if the slab would not fit,
    /// or if compaction would release at least 1/[`COMPACT_DIVISOR`] of the slab memory.
    pub(super) fn compaction_due(&self, need: u64) -> bool {
        let reclaimable: u64 =
            self.classes.iter().map(|c| u64_of(c.reclaimable_slabs() * c.slab_bytes())).sum();
        if reclaimable == 0 {
            return false;
        }
        self.slab_bytes.saturating_add(need) > self.max_bytes
            || reclaimable >= (self.slab_bytes / COMPACT_DIVISOR).max(COMPACT_MIN_BYTES)
    }

    /// Takes the first free slot of a slab on its class's partial list.
    pub(super) fn take_slot(&mut self, slab_id: u32) -> Option<u16> {
        let s = self.slabs.get_mut(slab_id as usize).and_then(Option::as_mut)?;
        let class = self.classes.get_mut(usize::from(s.class))?;
        let slot = first_clear(&s.used_bits, class.slots_per_slab)?;
        set_bit(&mut s.used_bits, slot, true);
        s.used += 1;
        class.free_slots -= 1;
        if usize::from(s.used) == class.slots_per_slab {
            self.remove_partial(slab_id);
        }
        u16::try_from(slot).ok()
    }

    /// Allocates an empty slab for class `c` and puts it on the class's partial list.
    pub(super) fn new_slab(&mut self, c: usize) -> Result<u32, ZcacheError> {
        let bytes = self.classes[c].slab_bytes();
        let bytes64 = u64_of(bytes);
        if self.slab_bytes.saturating_add(bytes64) > self.max_bytes {
            return Err(ZcacheError::Full);
        }
        let slab = Slab {
            data: vec![0u8; bytes].into_boxed_slice(),
            used_bits: [0; BITMAP_WORDS],
            used: 0,
            class: u8::try_from(c).map_err(|_| ZcacheError::Full)?,
            evacuating: false,
            partial_pos: NOT_PARTIAL,
        };
        let id = match self.free_slab_ids.pop() {
            Some(id) => {
                self.slabs[id as usize] = Some(slab);
                id
            }
            None => {
                let id = u32::try_from(self.slabs.len()).map_err(|_| ZcacheError::Full)?;
                if id == NIL {
                    return Err(ZcacheError::Full);
                }
                self.slabs.push(Some(slab));
                id
            }
        };
        self.slab_bytes += bytes64;
        self.classes[c].free_slots += self.classes[c].slots_per_slab;
        self.push_partial(id);
        Ok(id)
    }

    /// Frees one slot; releases the slab if it is now empty and not its class's only partial
    /// slab. A slab being evacuated stays off the partial list (compaction settles it).
    pub(super) fn free_slot(&mut self, slab_id: u32, slot: u16) {
        let Some(s) = self.slabs.get_mut(slab_id as usize).and_then(Option::as_mut) else {
            return;
        };
        let slot = usize::from(slot);
        if !bit(&s.used_bits, slot) {
            return;
        }
        set_bit(&mut s.used_bits, slot, false);
        s.used -= 1;
        let c = usize::from(s.class);
        self.classes[c].free_slots += 1;
        if s.evacuating {
            return;
        }
        let (used, was_full) = (s.used, s.partial_pos == NOT_PARTIAL);
        if was_full {
            self.push_partial(slab_id);
        }
        if used == 0 && self.classes[c].partial.len() > 1 {
            self.release_slab(slab_id);
        }
    }

    /// Gives an empty slab's memory back.
    pub(super) fn release_slab(&mut self, slab_id: u32) {
        self.remove_partial(slab_id);
        let Some(s) = self.slabs.get_mut(slab_id as usize).and_then(Option::take) else {
            return;
        };
        let class = &mut self.classes[usize::from(s.class)];
        class.free_slots -= class.slots_per_slab;
        self.slab_bytes -= u64_of(s.data.len());
        self.free_slab_ids.push(slab_id);
    }

    pub(super) fn push_partial(&mut self, slab_id: u32) {
        let Some(s) = self.slabs.get_mut(slab_id as usize).and_then(Option::as_mut) else {
            return;
        };
        if s.partial_pos != NOT_PARTIAL {
            return;
        }
        let partial = &mut self.classes[usize::from(s.class)].partial;
        s.partial_pos = u32::try_from(partial.len()).unwrap_or(NOT_PARTIAL);
        partial.push(slab_id);
    }

    pub(super) fn remove_partial(&mut self, slab_id: u32) {
        let Some(s) = self.slabs.get_mut(slab_id as usize).and_then(Option::as_mut) else {
            return;
        };
        let pos = s.partial_pos as usize;
        s.partial_pos = NOT_PARTIAL;
        let partial = &mut self.classes[usize::from(s.class)].partial;
        if partial.get(pos) != Some(&slab_id) {
            return;
        }
        partial.swap_remove(pos);
        if let Some(&moved) = partial.get(pos) {
            if let Some(m) = self.slabs.get_mut(moved as usize).and_then(Option::as_mut) {
                m.partial_pos = u32::try_from(pos).unwrap_or(NOT_PARTIAL);
            }
        }
    }

    /// Takes a free entry (or appends one) for a new page; returns its number and
    /// generation. The caller checked that the table has room ([`ZCache::check_room`]).
    pub(super) fn alloc_entry(&mut self, kind: Kind, idx: u32, payload: u64) -> (u32, u32) {
        let mut e = Entry { payload, idx, tag: 0, prev: NIL, next: NIL };
        if let Some(free) = self.entries.get_mut(self.free_entry as usize) {
            let id = self.free_entry;
            self.free_entry = free.next;
            let gen = free.gen();
            e.set(kind, gen);
            *free = e;
            return (id, gen);
        }
        if self.entries.len() == self.entries.capacity() {
            let step = (self.entries.len() / ENTRY_GROWTH_DIVISOR).max(MIN_ENTRY_GROWTH);
            self.entries.reserve_exact(step);
        }
        let id = u32::try_from(self.entries.len()).unwrap_or(NIL);
        e.set(kind, 0);
        self.entries.push(e);
        (id, 0)
    }

    /// Puts entry `id` on the free list and bumps its generation.
    pub(super) fn free_entry(&mut self, id: u32) {
        let head = self.free_entry;
        if let Some(e) = self.entries.get_mut(id as usize) {
            let gen = e.gen().wrapping_add(1);
            e.set(Kind::Free, gen);
            e.prev = NIL;
            e.next = head;
            self.free_entry = id;
        }
    }

    /// Appends entry `id` to the FIFO list (newest).
    pub(super) fn push_tail(&mut self, id: u32) {
        let old_tail = self.tail;
        if let Some(e) = self.entries.get_mut(id as usize) {
            e.prev = old_tail;
            e.next = NIL;
        }
        match self.entries.get_mut(old_tail as usize) {
            Some(t) => t.next = id,
            None => self.head = id,
        }
        self.tail = id;
    }

    /// Takes entry `id` off the FIFO list.
    pub(super) fn unlink(&mut self, id: u32) {
        let Some(&Entry { prev, next, .. }) = self.entries.get(id as usize) else {
            return;
        };
        match self.entries.get_mut(prev as usize) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.entries.get_mut(next as usize) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
    }
}

/// The first `len` bytes of slot `slot` of slab `slab` (a free function, so that the
/// caller may borrow the scratch buffer at the same time).
pub(super) fn slot_mut<'a>(
    slabs: &'a mut [Option<Slab>],
    classes: &[Class],
    slab: u32,
    slot: u16,
    len: usize,
) -> Option<&'a mut [u8]> {
    let s = slabs.get_mut(slab as usize).and_then(Option::as_mut)?;
    let slot_bytes = classes.get(usize::from(s.class))?.slot_bytes;
    if len > slot_bytes {
        return None;
    }
    let start = usize::from(slot) * slot_bytes;
    s.data.get_mut(start..start + len)
}

/// Bit `i` of a slab bitmap (false past its end).
pub(super) fn bit(bits: &[u64; BITMAP_WORDS], i: usize) -> bool {
    bits.get(i / BITMAP_WORD_BITS).is_some_and(|w| w >> (i % BITMAP_WORD_BITS) & 1 != 0)
}

/// Sets or clears bit `i` of a slab bitmap (nothing past its end).
pub(super) fn set_bit(bits: &mut [u64; BITMAP_WORDS], i: usize, on: bool) {
    if let Some(w) = bits.get_mut(i / BITMAP_WORD_BITS) {
        let m = 1u64 << (i % BITMAP_WORD_BITS);
        if on {
            *w |= m;
        } else {
            *w &= !m;
        }
    }
}

/// The first clear bit below `limit`.
pub(super) fn first_clear(bits: &[u64; BITMAP_WORDS], limit: usize) -> Option<usize> {
    bits.iter()
        .enumerate()
        .find(|(_, &w)| w != u64::MAX)
        .map(|(i, w)| i * BITMAP_WORD_BITS + w.trailing_ones() as usize)
        .filter(|&i| i < limit)
}
