//! Eviction: taking resident pages out of guest memory into the stores, in batches, without
//! ever losing a guest write or letting the guest see stale data.
//!
//! For each victim (a Resident page):
//! 1. **claim** it in place ([`Claim`] Resident -> Resident, in flight): from now
//!    on the fault handler defers every fault on it, and no other mover takes it;
//! 2. **move** it out with `UFFDIO_MOVE` into a scratch page (a run of consecutive victims
//!    in one call, claimed together): the page itself changes owner,
//!    nothing is copied, and the guest mapping is empty from that instant. A guest write
//!    lands before the move (and is in the moved page) or faults after it (and waits for the
//!    claim to end); there is no third case, so no write-protection step is needed. A page
//!    that cannot be moved (not mapped, pinned, shared) keeps its claim for an instant only:
//!    the claim is undone and the page stays. A move the kernel reports as failed is
//!    checked against the scratch page ([`Uffd::move_pages`]): some kernels move the page
//!    and still answer `EEXIST`, and believing them would lose the page;
//! 3. **store** the scratch copy ([`Backing::store_batch`]): dropped if all zero, kept as a word if
//!    same-filled, compressed into the cache, or written to the swap file;
//! 4. **finish** the claim with the page's new state; deferred faults then bring it back.
//!    If storing failed, the page is moved back into guest memory first (through the fault
//!    handler's descriptor: a move lands only in a range registered on the descriptor that
//!    does it), then the claim is undone. Should even that fail (the kernel had no memory
//!    for a page table), the copy is held in ebb's own memory ([`Backing::hold`]) and the
//!    page counts as Compressed: it is never dropped.
//!
//! The scratch range is registered on a descriptor of its own without remove events, so
//! dropping the scratch pages after a batch never waits for the fault handler; and this
//! module never touches guest memory through its mapping. So the reclaim worker never waits
//! for the fault handler, which never waits for it either.
//!
//! Writing the cache's oldest pages back to the swap file follows the same claims: a
//! Compressed page is claimed in place, moved to the swap file by [`Backing::write_back`],
//! and finished as Swapped (or undone if the swap file refused).

use std::sync::Arc;

use super::store::{Backing, StoreError};
use crate::mm::claim::Claim;
use crate::mm::layout::RamMap;
use crate::mm::pages::{PageState, PageTable, StateSet};
use crate::mm::sys::Mapping;
use crate::mm::uffd::{Resolved, Uffd, UffdError};
use crate::mm::zcache::Page;
use crate::units::PAGE_SIZE;

/// Pages evicted per batch (the scratch range holds this many).
pub const BATCH_PAGES: usize = 64;
const PAGE: usize = 4096;

/// Outcome of one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Pages that left guest memory.
    pub pages: u64,
    /// Victims left alone: claimed by another mover, not mapped, or pinned.
    pub skipped: u64,
    /// Victims put back because the stores refused them.
    pub refused: u64,
}

/// The eviction machinery of one VM (owned by the reclaim worker).
#[derive(Debug)]
pub struct Evictor {
    moves: Uffd,
    handler: Arc<Uffd>,
    scratch: Mapping,
    map: RamMap,
    table: Arc<PageTable>,
    backing: Arc<Backing>,
    /// What became of each page of a batch (reused).
    stored: Vec<Result<PageState, StoreError>>,
    /// The pages of a batch, copied out of the scratch range (reused).
    copies: Vec<Page>,
}

impl Evictor {
    /// An evictor for the guest RAM of `map`, whose faults `handler` serves.
    ///
    /// # Errors
    /// The move descriptor or the scratch range could not be set up (the kernel lacks
    /// `UFFDIO_MOVE`, Linux 6.8+).
    pub fn new(
        dev: &std::path::Path,
        handler: Arc<Uffd>,
        map: RamMap,
        table: Arc<PageTable>,
        backing: Arc<Backing>,
    ) -> Result<Self, UffdError> {
        if !handler.has_move() {
            return Err(UffdError::MissingIoctl("UFFDIO_MOVE"));
        }
        let moves = Uffd::open_for_moves(dev)?;
        let scratch = Mapping::new(BATCH_PAGES * PAGE).map_err(UffdError::Setup)?;
        // Guest pages pass through it: never into a core file.
        crate::mm::sys::dont_dump(scratch.hva(), scratch.size_bytes());
        // SAFETY: the scratch range is this value's own, and only ever a move's destination.
        unsafe { moves.register_for_moves(scratch.hva(), scratch.size_bytes() as u64) }?;
        Ok(Self {
            moves,
            handler,
            scratch,
            map,
            table,
            backing,
            stored: Vec::new(),
            copies: Vec::new(),
        })
    }

    /// Evicts the pages of `victims` (at most [`BATCH_PAGES`] are looked at). Runs of
    /// consecutive pages (the clock's hand yields many) are claimed together and moved in
    /// one call: one page-table walk and one MMU-notifier flush (KVM's, in a VM) per run
    /// instead of per page.
    ///
    /// # Errors
    /// A move failed for a reason other than the page's own (the descriptors are broken).
    pub fn evict(&mut self, victims: &[u64]) -> Result<Evicted, UffdError> {
        let table = Arc::clone(&self.table);
        let mut out = Evicted::default();
        // Claims of the pages moved to the scratch range, and their scratch slots. Any
        // claim dropped on the way (a `?`, a page not moved) is aborted.
        let mut held: Vec<(Claim<&PageTable>, usize)> = Vec::with_capacity(BATCH_PAGES);
        let victims = &victims[..victims.len().min(BATCH_PAGES)];
        let mut i = 0;
        while i < victims.len() {
            let first = victims[i];
            let run = self.claim_run(&table, first, &victims[i..]);
            let n = run.len();
            let Some(src) = self.map.hva_of_idx(first).filter(|_| n > 0) else {
                out.skipped += 1; // claimed by another mover, or not guest RAM
                i += 1;
                continue;
            };
            let slot = held.len();
            let dst = self.scratch.hva() + (slot * PAGE) as u64;
            let len = n as u64 * PAGE_SIZE;
            // SAFETY: the run is guest RAM this batch claimed; `dst` is our scratch range.
            let mut result = unsafe { self.moves.move_pages(dst, src, len) };
            let mut moved = match &result {
                Ok((Resolved::Mapped, _)) => n,
                Ok((_, done)) => usize::try_from(done / PAGE_SIZE).unwrap_or(0).min(n),
                // Whatever reached the scratch range is stored below; nothing is lost.
                Err(_) => crate::mm::sys::mapped_pages_from(dst, n).unwrap_or(0).min(n),
            };
            if result.as_ref().is_err_and(UffdError::crosses_mapping) {
                // The run spans two mappings (see `UffdError::crosses_mapping`): the rest of
                // it one page at a time.
                (moved, result) = self.move_each(dst, src, moved, n);
            }
            // Not moved (not mapped, pinned, or shared): those stay, their claims dropped
            // with the rest of the run; the next round looks at them again.
            out.skipped += (n - moved) as u64;
            held.extend(run.into_iter().take(moved).zip(slot..));
            if let Err(e) = result {
                self.finish_batch(held, &mut out)?;
                return Err(e);
            }
            i += n;
        }
        self.finish_batch(held, &mut out)?;
        Ok(out)
    }

    /// Moves pages `from .. n` of a run (guest RAM at `src`, claimed, scratch at `dst`) one
    /// at a time, stopping at the first that does not move; returns how many of the run are
    /// in the scratch range then, and the error that stopped it, if any.
    fn move_each(
        &self,
        dst: u64,
        src: u64,
        from: usize,
        n: usize,
    ) -> (usize, Result<(Resolved, u64), UffdError>) {
        for k in from..n {
            let offset = (k * PAGE) as u64;
            // SAFETY: as for the whole run: claimed guest RAM into our scratch range.
            match unsafe { self.moves.move_pages(dst + offset, src + offset, PAGE_SIZE) } {
                Ok((Resolved::Mapped, _)) => {}
                Ok(other) => return (k, Ok(other)),
                Err(e) => return (k, Err(e)),
            }
        }
        (n, Ok((Resolved::Mapped, (n * PAGE) as u64)))
    }

    /// Claims `first` and the pages after it that follow it in `victims` (which starts with
    /// `first`) and in host memory; returns the claims (none: not even `first`).
    fn claim_run<'t>(
        &self,
        table: &'t PageTable,
        first: u64,
        victims: &[u64],
    ) -> Vec<Claim<&'t PageTable>> {
        let Some(src) = self.map.hva_of_idx(first) else { return Vec::new() };
        let resident = StateSet::of(&[PageState::Resident]);
        let contiguous = victims.iter().enumerate().take_while(|&(k, &idx)| {
            idx == first + k as u64 && self.map.hva_of_idx(idx) == Some(src + (k * PAGE) as u64)
        });
        contiguous
            .map_while(|(_, &idx)| Claim::new(table, idx, resident, PageState::Resident).ok())
            .collect()
    }

    /// Stores the moved pages and ends their claims; drops the scratch pages.
    fn finish_batch(
        &mut self,
        held: Vec<(Claim<&PageTable>, usize)>,
        out: &mut Evicted,
    ) -> Result<(), UffdError> {
        if held.is_empty() {
            return Ok(());
        }
        // The moved pages, copied out of the scratch range (which the kernel writes).
        let mut copies = std::mem::take(&mut self.copies);
        copies.resize(held.len(), [0; PAGE]);
        for ((_, slot), copy) in held.iter().zip(copies.iter_mut()) {
            self.scratch.read(slot * PAGE, copy);
        }
        let pages: Vec<(u64, &Page)> =
            held.iter().zip(copies.iter()).map(|((claim, _), copy)| (claim.idx(), copy)).collect();
        let mut stored = std::mem::take(&mut self.stored);
        self.backing.store_batch(&pages, &mut stored);
        drop(pages);
        let mut failed = None;
        let batch_len = held.len();
        let outcomes = held.into_iter().zip(copies.iter()).zip(stored.drain(..));
        for (((claim, slot), copy), result) in outcomes {
            match result {
                Ok(state) => {
                    let idx = claim.idx();
                    if let Err(e) = claim.finish_into(state) {
                        log::error!("eviction of page {idx}: {e}");
                    }
                    out.pages += 1;
                }
                Err(e) => {
                    if let Err(e) = self.put_back(claim, slot, copy, &e) {
                        failed.get_or_insert(e);
                    }
                    out.refused += 1;
                }
            }
        }
        self.stored = stored;
        self.copies = copies;
        if let Err(e) = self.scratch.drop_range(0, batch_len * PAGE) {
            log::warn!("dropping the eviction scratch pages: {e}");
        }
        failed.map_or(Ok(()), Err)
    }

    /// Moves a page the stores refused back into guest memory and undoes its claim (or,
    /// if that fails too, holds its copy; see the module docs).
    fn put_back(
        &mut self,
        claim: Claim<&PageTable>,
        slot: usize,
        copy: &Page,
        why: &StoreError,
    ) -> Result<(), UffdError> {
        let idx = claim.idx();
        log::debug!("eviction of page {idx} refused: {why}");
        let dst = self.map.hva_of_idx(idx).unwrap_or(0);
        let src = self.scratch.hva() + (slot * PAGE) as u64;
        // SAFETY: `src` is our scratch page; `dst` the guest page, claimed and empty.
        let result = unsafe { self.handler.move_pages(dst, src, PAGE_SIZE) };
        if let Ok((Resolved::Mapped, _)) = result {
            drop(claim); // back in guest memory: the claim is undone
            return Ok(());
        }
        self.backing.hold(idx, copy);
        if let Err(e) = claim.finish_into(PageState::Compressed) {
            log::error!("holding page {idx}: {e}");
        }
        result.map(|_| ())
    }

    /// Moves up to `n` of the cache's oldest pages to the swap file in one batch; returns
    /// how many moved.
    pub fn write_back(&mut self, n: usize) -> u64 {
        let compressed = StateSet::of(&[PageState::Compressed]);
        let table = &*self.table;
        // Pages being brought back are skipped: the next round takes others.
        let claims: Vec<Claim<&PageTable>> = (self.backing.oldest_cached(n).into_iter())
            .filter_map(|idx| Claim::new(table, idx, compressed, PageState::Compressed).ok())
            .collect();
        let claimed: Vec<u64> = claims.iter().map(Claim::idx).collect();
        let mut moved = Vec::new();
        self.backing.write_back(&claimed, &mut moved);
        let mut count = 0;
        // A page the swap file refused keeps its cached copy: its claim is dropped (undone).
        for (claim, &ok) in claims.into_iter().zip(&moved) {
            if ok && claim.finish_into(PageState::Swapped).is_ok() {
                count += 1;
            }
        }
        count
    }
}
