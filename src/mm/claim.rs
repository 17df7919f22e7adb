//! Claims on guest pages as values: the in-flight protocol of [`PageTable`] kept by the
//! compiler rather than by hand.
//!
//! A mover that changes what backs a page claims it first ([`Claim`], [`ClaimRun`]): the
//! page's state names the destination at once and it carries
//! [`FLAG_IN_FLIGHT`](super::pages::FLAG_IN_FLIGHT) until the claim ends. A claim ends in
//! exactly one of two ways:
//! - **finished** ([`Claim::finish`], [`Claim::finish_into`]), which consumes it: the move
//!   is done and the page is in its new state;
//! - **aborted**, which is what dropping it does: the page goes back to the state it was
//!   claimed from, as if nothing happened. An early return, a `?` or a panic therefore
//!   never leaves a page in flight for good (which would make every fault on it wait for
//!   ever), and a claim cannot be ended twice.
//!
//! A [`ClaimRun`] is the same for a run of consecutive pages claimed together (a fault and
//! its fault-around neighbours): it allocates nothing, as the fault handler must not while
//! memory is short. Eviction batches hold a `Vec` of single claims.
//!
//! The guard borrows the table or holds an `Arc` of it (`T` is either): a claim that
//! outlives the function that made it (a copy-on-write break waiting for memory) holds an
//! `Arc`.

use std::ops::Deref;

use super::pages::{PageError, PageState, PageTable, StateSet};

/// A claim on one page; dropping it aborts it. See the module docs.
#[must_use = "dropping a claim aborts it: finish it once the move is done"]
#[derive(Debug)]
pub struct Claim<T: Deref<Target = PageTable>> {
    table: T,
    idx: u64,
    old: PageState,
    /// False once finished (Drop then does nothing).
    live: bool,
}

impl<T: Deref<Target = PageTable>> Claim<T> {
    /// Claims page `idx` of `table`: see [`PageTable::begin`].
    ///
    /// # Errors
    /// As [`PageTable::begin`]: the page is in flight, in no state of `from`, or the move
    /// is not allowed.
    pub(in crate::mm) fn new(
        table: T,
        idx: u64,
        from: StateSet,
        to: PageState,
    ) -> Result<Self, PageError> {
        let old = table.begin(idx, from, to)?;
        Ok(Self { table, idx, old, live: true })
    }

    /// The page claimed.
    pub fn idx(&self) -> u64 {
        self.idx
    }

    /// The state the page was claimed from (where an abort puts it back).
    pub fn old(&self) -> PageState {
        self.old
    }

    /// The table the page is in.
    pub fn table(&self) -> &T {
        &self.table
    }

    /// The move is done: the page stays in the state the claim named.
    pub fn finish(mut self) {
        self.table.finish(self.idx);
        self.live = false;
    }

    /// The move is done and its destination was learnt on the way (an eviction learns it
    /// from the page's contents): the page goes to `to`.
    ///
    /// # Errors
    /// The move is not in the transition table: the page then stays in flight for good
    /// (a bug, logged by the caller). Its contents are wherever the mover put them, so
    /// neither aborting (a fault would then map zeros over them) nor finishing is safe.
    pub fn finish_into(mut self, to: PageState) -> Result<(), PageError> {
        let result = self.table.finish_into(self.idx, to);
        self.live = false;
        result
    }
}

impl<T: Deref<Target = PageTable>> Drop for Claim<T> {
    fn drop(&mut self) {
        if self.live {
            self.table.abort(self.idx, self.old);
        }
    }
}

/// A claim on the run of pages `first .. first + len`; dropping it aborts every page of it.
/// The first page was claimed from `first_old`, the others from `rest_old`.
#[must_use = "dropping a claim aborts it: finish it once the pages are mapped"]
#[derive(Debug)]
pub struct ClaimRun<'t> {
    table: &'t PageTable,
    first: u64,
    len: u64,
    first_old: PageState,
    rest_old: PageState,
}

impl<'t> ClaimRun<'t> {
    /// Claims page `first` (from a state in `from`) and then up to `more` pages after it
    /// (from a state in `rest_from`), all to `to`, stopping at the first that cannot be
    /// claimed.
    ///
    /// # Errors
    /// The first page cannot be claimed (as [`PageTable::begin`]).
    pub(in crate::mm) fn new(
        table: &'t PageTable,
        first: u64,
        from: StateSet,
        more: u64,
        rest_from: StateSet,
        to: PageState,
    ) -> Result<Self, PageError> {
        let first_old = table.begin(first, from, to)?;
        let mut run = Self { table, first, len: 1, first_old, rest_old: to };
        for i in 1..=more {
            let Ok(old) = table.begin(first + i, rest_from, to) else { break };
            // The run remembers one state for all pages after the first: it ends before a
            // page that came from another.
            if i > 1 && old != run.rest_old {
                table.abort(first + i, old);
                break;
            }
            run.rest_old = old;
            run.len += 1;
        }
        Ok(run)
    }

    /// Pages in the run (at least 1: a run starts with a claimed page).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Gives up the pages after the first `len` (at least 1): their claims are aborted.
    pub fn truncate(&mut self, len: u64) {
        let len = len.clamp(1, self.len);
        for i in len..self.len {
            self.table.abort(self.first + i, self.rest_old);
        }
        self.len = len;
    }

    /// The state the first page was claimed from.
    pub fn first_old(&self) -> PageState {
        self.first_old
    }

    /// The first `done` pages were moved: their claims are finished, the rest aborted.
    pub fn finish_first(mut self, done: u64) {
        let done = done.min(self.len);
        for i in 0..done {
            self.table.finish(self.first + i);
        }
        self.first += done;
        self.len -= done;
        if done > 0 {
            self.first_old = self.rest_old;
        }
        // Drop aborts what is left.
    }
}

impl Drop for ClaimRun<'_> {
    fn drop(&mut self) {
        for i in 0..self.len {
            let old = if i == 0 { self.first_old } else { self.rest_old };
            self.table.abort(self.first + i, old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::pages::FLAG_IN_FLIGHT;
    use PageState::*;

    const ANY: StateSet =
        StateSet::of(&[Untouched, ZeroMapped, Resident, Shared, Compressed, Swapped, Ballooned]);

    #[test]
    fn a_dropped_claim_puts_the_page_back() {
        let t = PageTable::new(1);
        t.transition(0, ANY, Resident).unwrap();
        {
            let c = Claim::new(&t, 0, ANY, Untouched).unwrap();
            assert_eq!((c.idx(), c.old()), (0, Resident));
            assert_eq!((t.get(0), t.flags(0)), (Some(Untouched), FLAG_IN_FLIGHT));
        }
        assert_eq!((t.get(0), t.flags(0)), (Some(Resident), 0));
        assert_eq!(t.count(Resident), 1);
    }

    #[test]
    fn a_claim_given_up_on_an_early_return_is_aborted() {
        fn mover(t: &PageTable) -> Result<(), PageError> {
            let _claim = Claim::new(t, 0, ANY, Ballooned)?;
            Err(PageError::OutOfRange { idx: 9 }) // what a failing step returns
        }
        let t = PageTable::new(1);
        assert!(mover(&t).is_err());
        assert_eq!((t.get(0), t.flags(0)), (Some(Untouched), 0));
    }

    #[test]
    fn a_finished_claim_keeps_its_destination() {
        let t = std::sync::Arc::new(PageTable::new(2));
        Claim::new(t.clone(), 0, ANY, Ballooned).unwrap().finish();
        assert_eq!((t.get(0), t.flags(0)), (Some(Ballooned), 0));
        t.transition(1, ANY, Resident).unwrap();
        let c = Claim::new(&*t, 1, ANY, Resident).unwrap();
        assert_eq!(c.finish_into(Compressed), Ok(()));
        assert_eq!((t.get(1), t.flags(1)), (Some(Compressed), 0));
    }

    #[test]
    fn a_refused_finish_leaves_the_page_in_flight() {
        let t = PageTable::new(1);
        let c = Claim::new(&t, 0, ANY, Ballooned).unwrap();
        assert!(c.finish_into(Compressed).is_err());
        assert_eq!(t.flags(0), FLAG_IN_FLIGHT, "neither aborted nor finished");
    }

    #[test]
    fn a_run_stops_at_the_first_page_it_cannot_claim() {
        let t = PageTable::new(8);
        t.transition(4, ANY, Resident).unwrap();
        let untouched = StateSet::of(&[Untouched]);
        let run = ClaimRun::new(&t, 1, untouched, 6, untouched, Resident).unwrap();
        assert_eq!(run.len(), 3, "pages 1, 2, 3; page 4 is not untouched");
        assert!((1..4).all(|i| t.flags(i) == FLAG_IN_FLIGHT && t.get(i) == Some(Resident)));
        drop(run);
        assert!((1..4).all(|i| t.flags(i) == 0 && t.get(i) == Some(Untouched)));
        assert_eq!(t.count(Resident), 1);
    }

    #[test]
    fn a_run_partly_mapped_finishes_the_mapped_pages_and_aborts_the_rest() {
        let t = PageTable::new(8);
        t.transition(0, ANY, Ballooned).unwrap();
        let from = StateSet::of(&[Untouched, Ballooned]);
        let run = ClaimRun::new(&t, 0, from, 4, StateSet::of(&[Untouched]), ZeroMapped).unwrap();
        assert_eq!((run.len(), run.first_old()), (5, Ballooned));
        run.finish_first(2);
        assert_eq!(
            (t.get(0), t.get(1), t.get(2)),
            (Some(ZeroMapped), Some(ZeroMapped), Some(Untouched))
        );
        assert!((0..8).all(|i| t.flags(i) == 0));
        assert_eq!((t.count(ZeroMapped), t.count(Untouched)), (2, 6));
    }

    #[test]
    fn a_truncated_run_gives_up_its_tail_and_keeps_its_head() {
        let t = PageTable::new(8);
        let untouched = StateSet::of(&[Untouched]);
        let mut run = ClaimRun::new(&t, 2, untouched, 4, untouched, Resident).unwrap();
        run.truncate(1);
        assert_eq!(run.len(), 1);
        assert_eq!((t.get(2), t.flags(2)), (Some(Resident), FLAG_IN_FLIGHT));
        assert!((3..7).all(|i| t.get(i) == Some(Untouched) && t.flags(i) == 0));
        run.finish_first(1);
        assert_eq!((t.get(2), t.flags(2), t.count(Resident)), (Some(Resident), 0, 1));
    }

    #[test]
    fn a_run_not_mapped_at_all_goes_back_whole() {
        let t = PageTable::new(4);
        t.transition(0, ANY, Ballooned).unwrap();
        let from = StateSet::of(&[Untouched, Ballooned]);
        let run = ClaimRun::new(&t, 0, from, 3, StateSet::of(&[Untouched]), Resident).unwrap();
        run.finish_first(0);
        assert_eq!(t.get(0), Some(Ballooned), "the first page goes back to where it was");
        assert_eq!(t.count(Untouched), 3);
        assert!((0..4).all(|i| t.flags(i) == 0));
    }
}
