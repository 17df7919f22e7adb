//! Merging: freezing candidate pages, comparing them byte by byte, and putting a pool page
//! over each guest page that matches, on the scanner's thread.
//!
//! A candidate is **frozen** the way eviction freezes a victim: claimed in place (its
//! faults now wait), then moved whole out of guest memory with `UFFDIO_MOVE` into a
//! scratch page. From then on its contents cannot change, so the comparison is exact, and
//! a guest write either landed before the move (and is compared) or waits for the claim.
//! A page that does not match is moved back and its claim undone.
//!
//! A matching page is **installed**: the pool page is mapped privately at a staging address,
//! registered for write protection on the fault handler's descriptor, populated and
//! write-protected there, and only then moved over the guest page with `mremap`. With
//! `UFFD_FEATURE_EVENT_REMAP` the move keeps the registration and the protection (the
//! `mremap` waits until the handler has read the remap event; the handler never waits for
//! the scanner, which holds the page's claim, so neither can hold the other up). So there
//! is no instant at which the guest could write the shared page unseen: its reads hit the
//! pool page directly, and its first write faults to the handler, which unshares it. The
//! claim then ends as Shared, and faults that waited on it are woken by the handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pool::SharePool;
use super::sys::{map_private_page, populate, remap_page_over, unmap_page};
use super::SharingStats;
use crate::mm::claim::Claim;
use crate::mm::layout::RamMap;
use crate::mm::pages::{PageState, PageTable, StateSet};
use crate::mm::sys::Mapping;
use crate::mm::uffd::{Resolved, Uffd, UffdError};
use crate::mm::zcache::Page;
use crate::units::PAGE_SIZE;

/// Scratch pages: a candidate and the page it is compared with.
pub const SCRATCH_PAGES: usize = 2;
/// How long a write-protect ioctl is retried while remove events keep it failing.
const PROTECT_PATIENCE: Duration = Duration::from_secs(2);
/// How long a frozen page may wait to go back before the scanner logs it.
const PUT_BACK_LOG_AFTER: Duration = Duration::from_secs(1);

/// The merging machinery of one VM (owned by the scanner).
#[derive(Debug)]
pub struct Merger {
    moves: Uffd,
    handler: Arc<Uffd>,
    scratch: Mapping,
    map: RamMap,
    table: Arc<PageTable>,
    pool: Arc<dyn SharePool>,
    stats: Arc<SharingStats>,
}

impl Merger {
    /// A merger for the guest RAM of `map`, whose faults `handler` serves.
    ///
    /// # Errors
    /// The move descriptor or the scratch range could not be set up.
    pub fn new(
        dev: &std::path::Path,
        handler: Arc<Uffd>,
        map: RamMap,
        table: Arc<PageTable>,
        pool: Arc<dyn SharePool>,
        stats: Arc<SharingStats>,
    ) -> Result<Self, UffdError> {
        let moves = Uffd::open_for_moves(dev)?;
        let scratch = Mapping::new(SCRATCH_PAGES * 4096).map_err(UffdError::Setup)?;
        // SAFETY: the scratch range is this value's own, and only ever a move's destination.
        unsafe { moves.register_for_moves(scratch.hva(), scratch.size_bytes() as u64) }?;
        Ok(Self { moves, handler, scratch, map, table, pool, stats })
    }

    /// The guest RAM layout.
    pub fn map(&self) -> &RamMap {
        &self.map
    }

    /// The page-state table.
    pub fn table(&self) -> &PageTable {
        &self.table
    }

    /// The pool.
    pub fn pool(&self) -> &dyn SharePool {
        &*self.pool
    }

    /// Claims Resident page `idx` and moves it into scratch page `slot`; None (nothing
    /// changed) if another mover holds it, it is not Resident, or it is not mapped. The
    /// page stays frozen until the guard is used up: installed, dropped as a zero page, or
    /// put back (which dropping the guard does).
    pub fn freeze(&self, idx: u64, slot: usize) -> Option<Frozen<'_>> {
        let hva = self.map.hva_of_idx(idx)?;
        let resident = StateSet::of(&[PageState::Resident]);
        let claim = Claim::new(&*self.table, idx, resident, PageState::Resident).ok()?;
        let dst = self.scratch.hva() + (slot * 4096) as u64;
        // SAFETY: `hva` is the guest page just claimed; `dst` our scratch page.
        match unsafe { self.moves.move_pages(dst, hva, PAGE_SIZE) } {
            Ok((Resolved::Mapped, _)) => {}
            _ if crate::mm::sys::mapped_pages_from(dst, 1).unwrap_or(0) == 1 => {}
            _ => return None, // not moved: the claim is dropped, undone
        }
        let mut copy = Box::new([0u8; 4096]);
        self.scratch.read(slot * 4096, &mut copy);
        Some(Frozen { merger: self, claim: Some(claim), slot, copy })
    }

    /// Puts frozen page `claim` back from scratch page `slot` and undoes its claim. It waits
    /// as long as the kernel has no memory for it: the page's contents exist only in the
    /// scratch page, and the guest's faults on it wait for the claim anyway.
    fn thaw(&self, claim: Claim<&PageTable>, slot: usize, copy: &Page) {
        let idx = claim.idx();
        let Some(hva) = self.map.hva_of_idx(idx) else { return };
        let src = self.scratch.hva() + (slot * 4096) as u64;
        let started = Instant::now();
        let mut logged = false;
        loop {
            // SAFETY: `src` is our scratch page; `hva` the guest page, claimed and empty.
            let moved = unsafe { self.handler.move_pages(hva, src, PAGE_SIZE) };
            if let Ok((Resolved::Mapped, _)) = moved {
                break;
            }
            if let Ok((Resolved::Mapped, _)) = self.handler.copy(hva, &copy[..], false) {
                break;
            }
            if !logged && started.elapsed() > PUT_BACK_LOG_AFTER {
                log::warn!("page sharing: page {idx} waits for memory to go back into the guest");
                logged = true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(claim); // back in guest memory: the claim is undone
        self.drop_scratch(slot);
    }

    /// Maps pool slot `slot` over frozen page `claim` (scratch page `scratch`), whose
    /// contents the caller has found equal to the slot's, and ends its claim as Shared. A
    /// pin of the slot the caller holds becomes the page's reference. On failure the page
    /// is thawed and the pin dropped.
    fn install(&self, claim: Claim<&PageTable>, scratch: usize, copy: &Page, slot: u64) -> bool {
        let idx = claim.idx();
        let Some(hva) = self.map.hva_of_idx(idx) else {
            self.pool.unpin(slot);
            self.thaw(claim, scratch, copy);
            return false;
        };
        match self.map_over(hva, slot) {
            Ok(()) => {
                self.pool.attach(idx, slot);
                if let Err(e) = claim.finish_into(PageState::Shared) {
                    log::error!("page sharing: sharing page {idx}: {e}");
                }
                self.drop_scratch(scratch);
                true
            }
            Err(e) => {
                log::debug!("page sharing: page {idx} stays private: {e}");
                self.stats.map_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.pool.unpin(slot);
                self.thaw(claim, scratch, copy);
                false
            }
        }
    }

    /// The staging dance of the module docs: the pool page, registered and write-protected,
    /// moved over the (empty) guest page at `hva`.
    fn map_over(&self, hva: u64, slot: u64) -> Result<(), UffdError> {
        let staging =
            map_private_page(self.pool.file(), slot * PAGE_SIZE).map_err(UffdError::Setup)?;
        let result = self.prepare(staging).and_then(|()| {
            // SAFETY: `staging` is our own page; `hva` is guest RAM whose page is frozen
            // (claimed, contents moved out), so replacing its mapping loses nothing.
            unsafe { remap_page_over(staging, hva) }.map_err(UffdError::Setup)
        });
        if result.is_err() {
            // SAFETY: the staging page was not moved, and nothing refers into it.
            unsafe { unmap_page(staging) };
        }
        result
    }

    fn prepare(&self, staging: u64) -> Result<(), UffdError> {
        // SAFETY: `staging` is our own mapping of a pool page, about to become guest RAM.
        unsafe { self.handler.register_wp_only(staging, PAGE_SIZE) }?;
        // SAFETY: our own mapping of a page the file has, registered for write protection
        // only, so a read neither faults to the handler nor allocates.
        unsafe { populate(staging) };
        let started = Instant::now();
        loop {
            match self.handler.write_protect(staging, PAGE_SIZE, true)? {
                Resolved::Mapped | Resolved::AlreadyMapped => return Ok(()),
                // EAGAIN while a remove event is pending: the handler reads it soon.
                _ if started.elapsed() < PROTECT_PATIENCE => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                _ => {
                    return Err(UffdError::Setup(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )))
                }
            }
        }
    }

    fn drop_scratch(&self, slot: usize) {
        if let Err(e) = self.scratch.drop_range(slot * 4096, 4096) {
            log::warn!("page sharing: dropping a scratch page: {e}");
        }
    }
}

/// A page frozen by [`Merger::freeze`]: claimed, its contents in a scratch page. Dropped, it
/// is put back into guest memory and its claim undone; a frozen page is never lost.
#[must_use = "a frozen page dropped is put back into the guest"]
#[derive(Debug)]
pub struct Frozen<'m> {
    merger: &'m Merger,
    /// None once used up.
    claim: Option<Claim<&'m PageTable>>,
    slot: usize,
    /// The contents, copied out of the scratch page.
    copy: Box<Page>,
}

impl Frozen<'_> {
    /// The frozen contents.
    pub fn contents(&self) -> &Page {
        &self.copy
    }

    /// The page was all zero: it becomes Untouched (its next read maps the zero page), and
    /// its scratch copy is dropped.
    pub fn drop_zero(mut self) {
        let Some(claim) = self.claim.take() else { return };
        let idx = claim.idx();
        if let Err(e) = claim.finish_into(PageState::Untouched) {
            log::error!("page sharing: dropping zero page {idx}: {e}");
        }
        self.merger.drop_scratch(self.slot);
    }

    /// Maps pool slot `slot` over the page (see [`Merger`]'s module docs); true if shared.
    /// A pin of the slot the caller holds becomes the page's reference; on failure the page
    /// is put back and the pin dropped.
    pub fn install(mut self, slot: u64) -> bool {
        match self.claim.take() {
            Some(claim) => self.merger.install(claim, self.slot, &self.copy, slot),
            None => false,
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            self.merger.thaw(claim, self.slot, &self.copy);
        }
    }
}
