//! The per-VM page-state table: one atomic byte per 4 KiB guest page, plus a count of pages
//! in each state. `mm` alone changes it; everything else reads it.
//!
//! # States and transitions
//!
//! Each page is in one [`PageState`]. The allowed moves (row: from, column: to):
//!
//! | from \ to   | Untouched | ZeroMapped | Resident | Shared | Compressed | Swapped | Ballooned |
//! |-------------|-----------|------------|----------|--------|------------|---------|-----------|
//! | Untouched   |           | read fault | write fault, fault-around | | |         | inflate   |
//! | ZeroMapped  | release, remove |      | write    |        |            |         | inflate   |
//! | Resident    | release, remove, zero page dropped | | | share | evict | evict (incompressible) | inflate |
//! | Shared      | release   |            | CoW write fault |  |            |         | inflate   |
//! | Compressed  | release   |            | fault    |        |            | cache full | inflate |
//! | Swapped     | release   |            | fault    |        |            |         | inflate   |
//! | Ballooned   | deflate   | read fault | write fault |     |            |         |           |
//!
//! A guest may touch a ballooned page before it tells the device (Linux does so on deflate
//! without `VIRTIO_BALLOON_F_MUST_TELL_HOST`), hence the fault edges out of Ballooned.
//! [`allowed`] is this table in code; every transition checks it.
//!
//! # The in-flight flag
//!
//! A page whose backing is being changed outside the fault handler (released with
//! `madvise`, and later evicted or shared) carries [`FLAG_IN_FLIGHT`] from the moment its
//! mover claims it (`PageTable::begin`) until the change is complete (`PageTable::finish`)
//! or undone (`PageTable::abort`). Its state already names the destination. While the flag
//! is set:
//! - no other mover may claim the page (`PageTable::begin` fails with
//!   [`PageError::InFlight`]);
//! - the fault handler does not resolve a fault on it: it defers the fault and retries it
//!   after reading more events. It never waits for the flag, because the mover may itself be
//!   waiting for the handler to read the remove event of its `madvise`.
//! - a remove event for the page changes nothing: its mover sets the final state.
//!
//! Only the mover that set the flag clears it.
//!
//! # Counters
//!
//! A transition is one compare-and-swap of the byte. The per-state counts cannot move in the
//! same instruction, so they follow a fixed order that keeps every count at or above the
//! number of pages really in that state: the destination's count is raised before the swap,
//! the source's lowered after it (or the destination's lowered again if the swap failed).
//! So a count never underflows, and exceeds the pages really in its state by at most the
//! transitions in progress at that instant.
//!
//! Metadata cost: 1 byte per 4096-byte page (0.024% of guest RAM, against ESX's 0.5%).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// What backs a guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Never touched, or released: no host memory, reads as zero.
    Untouched = 0,
    /// Mapped read-only to the kernel's shared zero page: no host memory of its own.
    ZeroMapped = 1,
    /// A private host page holds it.
    Resident = 2,
    /// Backed by a shared canonical copy (page sharing).
    Shared = 3,
    /// Held compressed in the compression cache.
    Compressed = 4,
    /// Held in the swap file.
    Swapped = 5,
    /// Given back by the guest's balloon driver: no host memory, reads as zero.
    Ballooned = 6,
}

/// Number of states.
pub const NUM_STATES: usize = 7;
const STATE_MASK: u8 = 0x0f;
/// Flag: a mover is changing the page's backing; see the module docs.
pub const FLAG_IN_FLIGHT: u8 = 0x80;
/// Flag: the page is write-protected in the current Active-memory sample and has not been
/// written since.
pub const FLAG_SAMPLED: u8 = 0x40;
/// Flag: the page faulted back in after an eviction since the reclaim worker last looked:
/// it is in use (a read counts too), so it is not the next victim.
pub const FLAG_REFERENCED: u8 = 0x20;
/// Flag: the guest wrote the page while it was shared (a copy-on-write break) since the
/// sharing scanner last looked: it is written often, and the scanner backs off from it.
pub const FLAG_UNSHARED: u8 = 0x10;
const _: () = assert!(FLAG_UNSHARED & STATE_MASK == 0);

/// The transition table of the module docs: `ALLOWED[from][to]`.
const ALLOWED: [[bool; NUM_STATES]; NUM_STATES] = {
    const N: bool = false;
    const Y: bool = true;
    [
        // to: Untouched ZeroMapped Resident Shared Compressed Swapped Ballooned
        [N, Y, Y, N, N, N, Y], // from Untouched
        [Y, N, Y, N, N, N, Y], // from ZeroMapped
        [Y, N, N, Y, Y, Y, Y], // from Resident
        [Y, N, Y, N, N, N, Y], // from Shared
        [Y, N, Y, N, N, Y, Y], // from Compressed
        [Y, N, Y, N, N, N, Y], // from Swapped
        [Y, Y, Y, N, N, N, N], // from Ballooned
    ]
};

/// True if a page may move from `from` to `to` (the table in the module docs).
pub fn allowed(from: PageState, to: PageState) -> bool {
    ALLOWED[from as usize][to as usize]
}

impl PageState {
    /// All states, in discriminant order.
    pub const ALL: [PageState; NUM_STATES] = [
        Self::Untouched,
        Self::ZeroMapped,
        Self::Resident,
        Self::Shared,
        Self::Compressed,
        Self::Swapped,
        Self::Ballooned,
    ];

    fn from_bits(bits: u8) -> Self {
        Self::ALL.get(usize::from(bits & STATE_MASK)).copied().unwrap_or(Self::Untouched)
    }

    /// True if the host backs this page with memory of its own (counted in Consumed).
    pub fn consumes_memory(self) -> bool {
        matches!(self, Self::Resident)
    }
}

/// A set of states, for transitions that accept several sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSet(u8);

impl StateSet {
    /// The states in `states`.
    pub const fn of(states: &[PageState]) -> Self {
        let mut bits = 0;
        let mut i = 0;
        while i < states.len() {
            bits |= 1 << states[i] as u8;
            i += 1;
        }
        Self(bits)
    }

    /// True if `state` is in the set.
    pub fn contains(self, state: PageState) -> bool {
        self.0 & (1 << state as u8) != 0
    }
}

/// Why a transition did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// The page index is past the end of guest RAM.
    #[error("page {idx} is outside guest RAM")]
    OutOfRange {
        /// Page index.
        idx: u64,
    },
    /// The page was not in a state the caller accepts.
    #[error("page {idx} is {actual:?}")]
    Mismatch {
        /// Page index.
        idx: u64,
        /// What it was.
        actual: PageState,
    },
    /// Another mover holds the page.
    #[error("page {idx} is in flight")]
    InFlight {
        /// Page index.
        idx: u64,
    },
    /// The move is not in the transition table.
    #[error("page {idx}: {from:?} -> {to:?} is not an allowed transition")]
    Forbidden {
        /// Page index.
        idx: u64,
        /// From.
        from: PageState,
        /// To.
        to: PageState,
    },
}

/// The table for one VM's RAM, indexed by page index within that RAM (see `layout`), not by
/// guest-physical address.
pub struct PageTable {
    bytes: Box<[AtomicU8]>,
    counts: [AtomicU64; NUM_STATES],
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts: Vec<(PageState, u64)> =
            PageState::ALL.iter().map(|&s| (s, self.count(s))).collect();
        f.debug_struct("PageTable").field("pages", &self.len()).field("counts", &counts).finish()
    }
}

impl PageTable {
    /// A table of `num_pages` untouched pages.
    pub fn new(num_pages: u64) -> Self {
        let n = usize::try_from(num_pages).unwrap_or(0);
        let bytes = (0..n).map(|_| AtomicU8::new(PageState::Untouched as u8)).collect();
        let counts = std::array::from_fn(|i| AtomicU64::new(if i == 0 { num_pages } else { 0 }));
        Self { bytes, counts }
    }

    /// Pages in the table.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// True if the table has no pages.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes of metadata this table uses.
    pub fn metadata_bytes(&self) -> u64 {
        (self.bytes.len() + std::mem::size_of::<Self>()) as u64
    }

    fn slot(&self, idx: u64) -> Result<&AtomicU8, PageError> {
        usize::try_from(idx)
            .ok()
            .and_then(|i| self.bytes.get(i))
            .ok_or(PageError::OutOfRange { idx })
    }

    /// The state of page `idx`, or None past the end.
    pub fn get(&self, idx: u64) -> Option<PageState> {
        self.slot(idx).ok().map(|b| PageState::from_bits(b.load(Ordering::Acquire)))
    }

    /// The flag bits of page `idx` (0 past the end).
    pub fn flags(&self, idx: u64) -> u8 {
        self.slot(idx).map_or(0, |b| b.load(Ordering::Acquire) & !STATE_MASK)
    }

    /// Pages currently in `state` (see the module docs for what a reader may see).
    pub fn count(&self, state: PageState) -> u64 {
        self.counts[state as usize].load(Ordering::Relaxed)
    }

    /// Moves the count of one page from `from` to `to` around a compare-and-swap on `slot`:
    /// `update` returns the new byte for an old one, or None to refuse. Returns the old byte.
    fn swap(
        &self,
        slot: &AtomicU8,
        to: PageState,
        update: impl FnMut(u8) -> Option<u8>,
    ) -> Result<u8, u8> {
        self.counts[to as usize].fetch_add(1, Ordering::Relaxed);
        let result = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, update);
        let undo = match result {
            Ok(old) => PageState::from_bits(old),
            Err(_) => to,
        };
        self.counts[undo as usize].fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// Moves page `idx` from any state in `from` to `to`, keeping its flags; refused if the
    /// page is in flight, in no state of `from`, or the move is not allowed. Returns the old
    /// state.
    pub(in crate::mm) fn transition(
        &self,
        idx: u64,
        from: StateSet,
        to: PageState,
    ) -> Result<PageState, PageError> {
        self.claim(idx, from, to, 0)
    }

    /// Claims page `idx` for a mover: moves it from a state in `from` to `to` (or leaves it
    /// there if it is already `to`) and sets [`FLAG_IN_FLIGHT`], clearing [`FLAG_SAMPLED`]
    /// (the page loses its mapping). Returns the old state, for [`abort`](Self::abort).
    pub(in crate::mm) fn begin(
        &self,
        idx: u64,
        from: StateSet,
        to: PageState,
    ) -> Result<PageState, PageError> {
        self.claim(idx, from, to, FLAG_IN_FLIGHT)
    }

    fn claim(
        &self,
        idx: u64,
        from: StateSet,
        to: PageState,
        flag: u8,
    ) -> Result<PageState, PageError> {
        let slot = self.slot(idx)?;
        let mut refused = None;
        let result = self.swap(slot, to, |old| {
            let state = PageState::from_bits(old);
            refused = if old & FLAG_IN_FLIGHT != 0 {
                Some(PageError::InFlight { idx })
            } else if !from.contains(state) {
                Some(PageError::Mismatch { idx, actual: state })
            } else if !(allowed(state, to) || (flag != 0 && state == to)) {
                // A mover may claim a page already in its destination ("in place").
                Some(PageError::Forbidden { idx, from: state, to })
            } else {
                None
            };
            let keep =
                if flag == 0 { old & !STATE_MASK } else { old & !STATE_MASK & !FLAG_SAMPLED };
            refused.is_none().then_some(keep | flag | to as u8)
        });
        match (result, refused) {
            (Ok(old), _) => Ok(PageState::from_bits(old)),
            (Err(_), Some(e)) => Err(e),
            (Err(old), None) => Err(PageError::Mismatch { idx, actual: PageState::from_bits(old) }),
        }
    }

    /// Ends a mover's claim on page `idx`: clears [`FLAG_IN_FLIGHT`], leaving the state
    /// [`begin`](Self::begin) set.
    pub(in crate::mm) fn finish(&self, idx: u64) {
        if let Ok(slot) = self.slot(idx) {
            slot.fetch_and(!FLAG_IN_FLIGHT, Ordering::AcqRel);
        }
    }

    /// Ends a claim made in place (the destination was not known when the page was claimed:
    /// an eviction learns it from the page's contents): moves the in-flight page to `to`
    /// and clears [`FLAG_IN_FLIGHT`].
    ///
    /// # Errors
    /// [`PageError::Forbidden`] if the move is not in the table (the claim stays), or
    /// [`PageError::Mismatch`] if the page is not in flight.
    pub(in crate::mm) fn finish_into(&self, idx: u64, to: PageState) -> Result<(), PageError> {
        let slot = self.slot(idx)?;
        let mut refused = None;
        let result = self.swap(slot, to, |b| {
            let from = PageState::from_bits(b);
            refused = if b & FLAG_IN_FLIGHT == 0 {
                Some(PageError::Mismatch { idx, actual: from })
            } else if from != to && !allowed(from, to) {
                Some(PageError::Forbidden { idx, from, to })
            } else {
                None
            };
            refused.is_none().then_some((b & !STATE_MASK & !FLAG_IN_FLIGHT) | to as u8)
        });
        match (result, refused) {
            (Ok(_), _) => Ok(()),
            (Err(_), Some(e)) => Err(e),
            (Err(b), None) => Err(PageError::Mismatch { idx, actual: PageState::from_bits(b) }),
        }
    }

    /// Undoes a mover's claim on page `idx`: back to `old` (the state `begin` returned),
    /// flag cleared.
    pub(in crate::mm) fn abort(&self, idx: u64, old: PageState) {
        let Ok(slot) = self.slot(idx) else { return };
        let result = self.swap(slot, old, |b| {
            (b & FLAG_IN_FLIGHT != 0).then_some((b & !STATE_MASK & !FLAG_IN_FLIGHT) | old as u8)
        });
        debug_assert!(result.is_ok(), "abort of page {idx}, which is not in flight");
    }

    /// Sets [`FLAG_SAMPLED`] on page `idx` if it is `state` and not in flight; true if set.
    pub(in crate::mm) fn mark_sampled(&self, idx: u64, state: PageState) -> bool {
        let Ok(slot) = self.slot(idx) else { return false };
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            let ok = PageState::from_bits(b) == state && b & (FLAG_IN_FLIGHT | FLAG_SAMPLED) == 0;
            ok.then_some(b | FLAG_SAMPLED)
        })
        .is_ok()
    }

    /// Sets [`FLAG_REFERENCED`] on page `idx`.
    pub(in crate::mm) fn mark_referenced(&self, idx: u64) {
        if let Ok(slot) = self.slot(idx) {
            slot.fetch_or(FLAG_REFERENCED, Ordering::AcqRel);
        }
    }

    /// Clears [`FLAG_REFERENCED`] on page `idx`; true if it was set.
    pub(in crate::mm) fn take_referenced(&self, idx: u64) -> bool {
        self.slot(idx)
            .is_ok_and(|s| s.fetch_and(!FLAG_REFERENCED, Ordering::AcqRel) & FLAG_REFERENCED != 0)
    }

    /// Sets [`FLAG_UNSHARED`] on page `idx`.
    pub(in crate::mm) fn mark_unshared(&self, idx: u64) {
        if let Ok(slot) = self.slot(idx) {
            slot.fetch_or(FLAG_UNSHARED, Ordering::AcqRel);
        }
    }

    /// Clears [`FLAG_UNSHARED`] on page `idx`; true if it was set.
    pub(in crate::mm) fn take_unshared(&self, idx: u64) -> bool {
        self.slot(idx)
            .is_ok_and(|s| s.fetch_and(!FLAG_UNSHARED, Ordering::AcqRel) & FLAG_UNSHARED != 0)
    }

    /// Clears [`FLAG_SAMPLED`] on page `idx`; returns the byte before (state and flags).
    pub(in crate::mm) fn clear_sampled(&self, idx: u64) -> Option<(PageState, u8)> {
        let old = self.slot(idx).ok()?.fetch_and(!FLAG_SAMPLED, Ordering::AcqRel);
        Some((PageState::from_bits(old), old & !STATE_MASK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use PageState::*;

    const ANY: StateSet =
        StateSet::of(&[Untouched, ZeroMapped, Resident, Shared, Compressed, Swapped, Ballooned]);

    /// A one-page table with the page in `state`, reached through allowed edges.
    fn table_at(state: PageState) -> PageTable {
        let t = PageTable::new(1);
        let path: &[PageState] = match state {
            Untouched => &[],
            ZeroMapped | Resident | Ballooned => &[state],
            Shared | Compressed | Swapped => &[Resident, state],
        };
        for &s in path {
            t.transition(0, ANY, s).unwrap();
        }
        t
    }

    fn counts(t: &PageTable) -> Vec<u64> {
        PageState::ALL.iter().map(|&s| t.count(s)).collect()
    }

    #[test]
    fn new_table_is_all_untouched() {
        let t = PageTable::new(10);
        assert_eq!(t.count(Untouched), 10);
        assert_eq!(t.get(9), Some(Untouched));
        assert_eq!(t.get(10), None);
    }

    #[test]
    fn every_edge_of_the_table_is_taken_or_refused_as_documented() {
        let mut taken = 0;
        for from in PageState::ALL {
            for to in PageState::ALL {
                let t = table_at(from);
                let result = t.transition(0, ANY, to);
                if allowed(from, to) {
                    assert_eq!(result, Ok(from), "{from:?} -> {to:?}");
                    assert_eq!(t.get(0), Some(to));
                    let mut want = vec![0; NUM_STATES];
                    want[to as usize] = 1;
                    assert_eq!(counts(&t), want, "{from:?} -> {to:?} moves one count");
                    taken += 1;
                } else {
                    assert_eq!(result, Err(PageError::Forbidden { idx: 0, from, to }));
                    assert_eq!(t.get(0), Some(from), "a refused move changes nothing");
                }
            }
        }
        // The table in the module docs has 24 entries.
        assert_eq!(taken, 24);
    }

    #[test]
    fn no_state_moves_to_itself() {
        assert!(PageState::ALL.iter().all(|&s| !allowed(s, s)));
    }

    #[test]
    fn a_page_outside_the_expected_states_is_refused() {
        let t = table_at(Resident);
        let r = t.transition(0, StateSet::of(&[Untouched]), ZeroMapped);
        assert_eq!(r, Err(PageError::Mismatch { idx: 0, actual: Resident }));
        assert_eq!(t.transition(5, ANY, Resident), Err(PageError::OutOfRange { idx: 5 }));
        assert_eq!(counts(&t)[Resident as usize], 1);
    }

    #[test]
    fn a_page_in_flight_is_refused_to_everyone_until_finished() {
        let t = table_at(Resident);
        assert_eq!(t.begin(0, ANY, Ballooned), Ok(Resident));
        assert_eq!(t.get(0), Some(Ballooned), "the state names the destination at once");
        assert_eq!(t.flags(0), FLAG_IN_FLIGHT);
        assert_eq!(t.begin(0, ANY, Untouched), Err(PageError::InFlight { idx: 0 }));
        assert_eq!(t.transition(0, ANY, Resident), Err(PageError::InFlight { idx: 0 }));
        assert!(!t.mark_sampled(0, Ballooned));
        t.finish(0);
        assert_eq!(t.flags(0), 0);
        assert_eq!(t.transition(0, ANY, Resident), Ok(Ballooned));
    }

    #[test]
    fn a_mover_may_claim_a_page_already_in_its_destination() {
        let t = table_at(Ballooned);
        assert_eq!(t.begin(0, ANY, Ballooned), Ok(Ballooned));
        assert_eq!(t.flags(0), FLAG_IN_FLIGHT);
        t.finish(0);
        assert_eq!(counts(&t), vec![0, 0, 0, 0, 0, 0, 1]);
        assert!(t.transition(0, ANY, Ballooned).is_err(), "but it is no transition");
    }

    #[test]
    fn a_claim_in_place_ends_in_the_state_the_mover_found() {
        for to in [Untouched, Compressed, Swapped, Resident] {
            let t = table_at(Resident);
            assert_eq!(t.begin(0, StateSet::of(&[Resident]), Resident), Ok(Resident));
            assert_eq!(t.finish_into(0, to), Ok(()));
            assert_eq!((t.get(0), t.flags(0)), (Some(to), 0));
            let mut want = vec![0; NUM_STATES];
            want[to as usize] = 1;
            assert_eq!(counts(&t), want);
        }
        let t = table_at(Resident);
        assert!(matches!(t.finish_into(0, Compressed), Err(PageError::Mismatch { .. })));
        t.begin(0, ANY, Resident).unwrap();
        assert!(matches!(t.finish_into(0, Ballooned), Ok(())), "inflate is an allowed edge");
        t.begin(0, ANY, Ballooned).unwrap();
        assert!(matches!(t.finish_into(0, Compressed), Err(PageError::Forbidden { .. })));
        assert_eq!(t.flags(0), FLAG_IN_FLIGHT, "a refused finish keeps the claim");
    }

    #[test]
    fn abort_puts_the_page_and_its_count_back() {
        let t = table_at(Resident);
        let old = t.begin(0, ANY, Untouched).unwrap();
        t.abort(0, old);
        assert_eq!((t.get(0), t.flags(0)), (Some(Resident), 0));
        assert_eq!(counts(&t), vec![0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn begin_drops_the_sample_flag_and_transition_keeps_it() {
        let t = table_at(Resident);
        assert!(t.mark_sampled(0, Resident));
        assert!(!t.mark_sampled(0, Resident), "already sampled");
        t.transition(0, ANY, Compressed).unwrap();
        assert_eq!(t.flags(0), FLAG_SAMPLED);
        t.begin(0, ANY, Untouched).unwrap();
        assert_eq!(t.flags(0), FLAG_IN_FLIGHT);
        t.finish(0);
        assert_eq!(t.clear_sampled(0), Some((Untouched, 0)));
    }

    #[test]
    fn metadata_is_far_below_half_a_percent() {
        let pages = (1u64 << 30) / 4096;
        let t = PageTable::new(pages);
        assert!(t.metadata_bytes() * 200 < 1 << 30, "{} bytes per GiB", t.metadata_bytes());
    }

    #[test]
    fn concurrent_transitions_never_lose_a_count() {
        let t = Arc::new(PageTable::new(4096));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..4096)
                        .filter(|&p| t.transition(p, StateSet::of(&[Untouched]), Resident).is_ok())
                        .count()
                })
            })
            .collect();
        let won: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(won, 4096, "each page moves exactly once");
        assert_eq!(t.count(Resident), 4096);
        assert_eq!(t.count(Untouched), 0);
    }

    #[test]
    fn counts_never_underflow_or_drift_under_concurrent_churn() {
        // Threads move pages around a cycle of allowed edges while a reader checks that no
        // count ever looks negative (a huge u64) or exceeds the pages plus the movers.
        let pages = 64u64;
        let t = Arc::new(PageTable::new(pages));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cycle = [Resident, Ballooned, ZeroMapped, Untouched];
        let movers: Vec<_> = (0..3)
            .map(|k| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i: usize = k;
                    while !stop.load(Ordering::Relaxed) {
                        let idx = i as u64 % pages;
                        let to = cycle[i % cycle.len()];
                        if let Ok(old) = t.begin(idx, ANY, to) {
                            if i % 3 == 0 {
                                t.abort(idx, old);
                            } else {
                                t.finish(idx);
                            }
                        }
                        let _ = t.transition(idx, ANY, cycle[(i + 1) % cycle.len()]);
                        i += 7;
                    }
                })
            })
            .collect();
        for _ in 0..200_000 {
            let c = counts(&t);
            assert!(c.iter().all(|&n| n <= pages + 3), "underflow or drift: {c:?}");
        }
        stop.store(true, Ordering::Relaxed);
        movers.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(counts(&t).iter().sum::<u64>(), pages, "at rest the counts add up");
        let by_bytes = (0..pages).fold(vec![0u64; NUM_STATES], |mut acc, i| {
            acc[t.get(i).unwrap() as usize] += 1;
            acc
        });
        assert_eq!(counts(&t), by_bytes, "at rest every count matches the bytes");
    }
}
