//! The one door through which devices change what backs guest pages: the balloon and free
//! page reporting ask here, by guest-physical range. (The reclaim worker and the sharing
//! scanner are `mm`'s own threads and move pages through the same claims.)
//!
//! # Releasing a range
//!
//! [`MemoryManager::release`] walks the range once:
//! 1. claims each page with `PageTable::begin`: it moves to the destination state with the
//!    in-flight flag set, so the fault handler defers faults on it and no other mover takes it;
//! 2. drops the backing of each run of claimed pages with one `madvise(MADV_DONTNEED)`;
//!    a page's compressed copy or swap slot is freed at the same point, and a shared page
//!    gets fresh memory mapped over it instead (on its private file mapping `madvise`
//!    would bring the pool page back) and drops its pool reference;
//! 3. ends the claims (`PageTable::finish`), or undoes them if `madvise` failed.
//!
//! Pages the caller may not release (in flight with another mover, or ballooned when the
//! release is a free page report) split the runs and are counted, not touched. A page the
//! guest writes while it is being released loses that write: the guest gave it up.

use std::sync::Arc;

use super::claim::Claim;
use super::layout::{PageRange, RamMap};
use super::pages::{PageError, PageState, PageTable, StateSet};
use super::reclaim::store::Backing;
use super::sharing::SharedPages;
use super::sys::madvise_dontneed;
use crate::units::PAGE_SIZE;
use crate::vstate::memory::RamRegion;

use PageState::*;

/// What released pages become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Taken by the balloon: the guest must deflate before it uses them again.
    Balloon,
    /// Free guest memory (a free page report): untouched again, the guest may reuse it at any
    /// time. Ballooned pages in the range stay ballooned.
    Free,
}

impl Release {
    fn target(self) -> PageState {
        match self {
            Self::Balloon => Ballooned,
            Self::Free => Untouched,
        }
    }

    /// States a page may be claimed from (the target itself included: claimed in place).
    fn sources(self) -> StateSet {
        match self {
            Self::Balloon => StateSet::of(&[
                Untouched, ZeroMapped, Resident, Shared, Compressed, Swapped, Ballooned,
            ]),
            Self::Free => {
                StateSet::of(&[Untouched, ZeroMapped, Resident, Shared, Compressed, Swapped])
            }
        }
    }
}

/// What one release did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Pages now in the target state with their backing dropped.
    pub pages: u64,
    /// Pages left alone because another mover held them.
    pub busy: u64,
    /// Pages left alone because they may not be released this way (ballooned pages in a
    /// free page report).
    pub skipped: u64,
}

/// Errors of the memory manager.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// The range is not page-aligned guest RAM inside one region.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not page-aligned RAM within one region")]
    NotRam {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `madvise` refused to drop the pages (they keep their contents and state).
    #[error("madvise(MADV_DONTNEED) of {len} bytes at {hva:#x}: {source}")]
    Madvise {
        /// Host address.
        hva: u64,
        /// Length in bytes.
        len: u64,
        /// The error.
        source: std::io::Error,
    },
}

/// Guest RAM as `mm` manages it: the page numbering and, when the lazy-RAM engine tracks
/// pages, the page-state table.
#[derive(Debug)]
pub struct MemoryManager {
    map: RamMap,
    table: Option<Arc<PageTable>>,
    backing: Option<Arc<Backing>>,
    /// Shared pages, once the engine has set sharing up.
    sharing: std::sync::OnceLock<Arc<SharedPages>>,
}

impl MemoryManager {
    /// A manager for `regions`; `tracked` creates the page-state table (the lazy-RAM engine
    /// keeps it; without the engine only `madvise` is done).
    pub fn new(regions: &[RamRegion], tracked: bool) -> Self {
        let map = RamMap::new(regions);
        let table = tracked.then(|| Arc::new(PageTable::new(map.pages())));
        Self { map, table, backing: None, sharing: std::sync::OnceLock::new() }
    }

    /// Adds the stores where evicted pages go (host-side reclaim).
    pub fn with_backing(mut self, backing: Arc<Backing>) -> Self {
        self.backing = Some(backing);
        self
    }

    /// Releases of Shared pages go through `sharing` from now on (the engine sets it once).
    pub fn set_sharing(&self, sharing: Arc<SharedPages>) {
        let _ = self.sharing.set(sharing);
    }

    /// The stores of evicted pages, if reclaim is set up.
    pub fn backing(&self) -> Option<&Arc<Backing>> {
        self.backing.as_ref()
    }

    /// Guest RAM as `mm` numbers it.
    pub fn map(&self) -> &RamMap {
        &self.map
    }

    /// The page-state table, if pages are tracked.
    pub fn table(&self) -> Option<&Arc<PageTable>> {
        self.table.as_ref()
    }

    fn range(&self, gpa: u64, len: u64) -> Result<PageRange, MmError> {
        self.map.range_of_gpa(gpa, len).ok_or(MmError::NotRam { gpa, len })
    }

    /// Releases guest-physical `[gpa, gpa + len)` as `how` says (see the module docs).
    ///
    /// # Errors
    /// [`MmError::NotRam`] for a range that is not page-aligned RAM within one region (nothing
    /// is done); [`MmError::Madvise`] if the kernel refused (the pages of that run keep their
    /// state; earlier runs stay released).
    pub fn release(&self, gpa: u64, len: u64, how: Release) -> Result<Released, MmError> {
        let range = self.range(gpa, len)?;
        let Some(table) = &self.table else {
            drop_backing(range.hva, range.len_bytes())?;
            return Ok(Released { pages: range.pages, ..Released::default() });
        };
        let mut done = Released::default();
        let mut run: Vec<Claim<&PageTable>> = Vec::new();
        for idx in range.first_idx..range.first_idx + range.pages {
            match Claim::new(&**table, idx, how.sources(), how.target()) {
                Ok(claim) => {
                    run.push(claim);
                    continue;
                }
                Err(PageError::InFlight { .. }) => done.busy += 1,
                Err(_) => done.skipped += 1,
            }
            done.pages += self.drop_run(&range, std::mem::take(&mut run))?;
        }
        done.pages += self.drop_run(&range, run)?;
        Ok(done)
    }

    /// Drops the backing of the claimed pages of `run` (consecutive) and ends their claims:
    /// finished where the backing went, aborted (dropped) where it stays.
    fn drop_run(&self, range: &PageRange, run: Vec<Claim<&PageTable>>) -> Result<u64, MmError> {
        let Some(first) = run.first().map(Claim::idx) else { return Ok(0) };
        let hva = range.hva + (first - range.first_idx) * PAGE_SIZE;
        let pages = run.len() as u64;
        let (released_shared, rest) = self.release_shared(range, run);
        let result = drop_backing(hva, pages * PAGE_SIZE);
        let mut dropped = released_shared.len() as u64;
        // A released shared page has empty memory of its own already, whatever `madvise`
        // said: it is released. (Put back to Shared, it would claim a pool page it no
        // longer maps.)
        released_shared.into_iter().for_each(Claim::finish);
        if result.is_ok() {
            for claim in rest {
                // An evicted page's copy goes with it: the guest gave the page up.
                if matches!(claim.old(), Compressed | Swapped) {
                    if let Some(b) = &self.backing {
                        b.discard(claim.idx());
                    }
                }
                claim.finish();
                dropped += 1;
            }
        }
        result.map(|()| dropped)
    }

    /// Gives the Shared pages of `run` fresh memory instead of their pool page
    /// (`MADV_DONTNEED` would bring the pool page back). Returns them, and the rest of the
    /// run; a shared page that could not be released is dropped from both (its claim
    /// aborted: it stays shared).
    fn release_shared<'t>(
        &self,
        range: &PageRange,
        run: Vec<Claim<&'t PageTable>>,
    ) -> (Vec<Claim<&'t PageTable>>, Vec<Claim<&'t PageTable>>) {
        let Some(sharing) = self.sharing.get() else { return (Vec::new(), run) };
        let (shared, rest): (Vec<_>, Vec<_>) = run.into_iter().partition(|c| c.old() == Shared);
        let released = shared
            .into_iter()
            .filter(|claim| {
                let idx = claim.idx();
                let hva = range.hva + (idx - range.first_idx) * PAGE_SIZE;
                let Err(e) = sharing.release(idx, hva) else { return true };
                log::warn!("releasing shared page {idx}: {e}; it stays shared");
                false
            })
            .collect();
        (released, rest)
    }

    /// Hands guest RAM to the kernel's KSM (`--ksm`): the baseline ebb's own sharing is
    /// measured against. KSM's merges and copy-on-write breaks happen behind ebb's back, so
    /// the page-state table does not see them (the host's PSS does).
    ///
    /// # Errors
    /// The kernel refused (it has no KSM).
    pub fn merge_with_ksm(&self) -> std::io::Result<()> {
        for s in self.map.spans() {
            super::sys::madvise_mergeable(s.region.hva, s.region.len)?;
        }
        Ok(())
    }

    /// Deflate: ballooned pages of `[gpa, gpa + len)` become untouched pages the guest may use
    /// again (they are still unbacked: the next touch faults). Returns how many were ballooned.
    ///
    /// # Errors
    /// [`MmError::NotRam`] for a range that is not page-aligned RAM within one region.
    pub fn unballoon(&self, gpa: u64, len: u64) -> Result<u64, MmError> {
        let range = self.range(gpa, len)?;
        let Some(table) = &self.table else { return Ok(range.pages) };
        let from = StateSet::of(&[Ballooned]);
        let idxs = range.first_idx..range.first_idx + range.pages;
        Ok(idxs.filter(|&idx| table.transition(idx, from, Untouched).is_ok()).count() as u64)
    }
}

fn drop_backing(hva: u64, len: u64) -> Result<(), MmError> {
    // SAFETY: the range came from the RamMap, so it is guest RAM, which ebb maps privately
    // and anonymously and never holds Rust references into.
    unsafe { madvise_dontneed(hva, len) }.map_err(|source| MmError::Madvise { hva, len, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::PAGE_SIZE as PAGE;
    use crate::vstate::memory::GuestRam;

    /// 16 MiB of plain guest RAM (no userfaultfd) with a tracked table.
    fn setup() -> (GuestRam, MemoryManager) {
        let ram = GuestRam::new(16 << 20, 48).unwrap();
        let mm = MemoryManager::new(&ram.regions(), true);
        (ram, mm)
    }

    fn write(ram: &GuestRam, gpa: u64, v: u8) {
        use vm_memory::Bytes;
        ram.memory().write_obj(v, vm_memory::GuestAddress(gpa)).unwrap();
    }

    fn read(ram: &GuestRam, gpa: u64) -> u8 {
        use vm_memory::Bytes;
        ram.memory().read_obj(vm_memory::GuestAddress(gpa)).unwrap()
    }

    fn state(mm: &MemoryManager, gpa: u64) -> PageState {
        mm.table().unwrap().get(gpa / PAGE).unwrap()
    }

    fn make_resident(mm: &MemoryManager, ram: &GuestRam, gpa: u64) {
        write(ram, gpa, 0xab);
        mm.table().unwrap().transition(gpa / PAGE, StateSet::of(&[Untouched]), Resident).unwrap();
    }

    #[test]
    fn balloon_release_drops_contents_and_marks_pages() {
        let (ram, mm) = setup();
        make_resident(&mm, &ram, 0x10_0000);
        let r = mm.release(0x10_0000, 4 * PAGE, Release::Balloon).unwrap();
        assert_eq!(r, Released { pages: 4, busy: 0, skipped: 0 });
        assert_eq!(read(&ram, 0x10_0000), 0);
        assert_eq!(state(&mm, 0x10_0000), Ballooned);
        let t = mm.table().unwrap();
        assert_eq!((t.count(Ballooned), t.count(Resident)), (4, 0));
        assert_eq!(t.flags(0x100), 0, "claims ended");
    }

    #[test]
    fn free_release_leaves_ballooned_pages_ballooned() {
        let (ram, mm) = setup();
        make_resident(&mm, &ram, 0x20_0000);
        make_resident(&mm, &ram, 0x20_2000);
        mm.release(0x20_1000, PAGE, Release::Balloon).unwrap();
        let r = mm.release(0x20_0000, 3 * PAGE, Release::Free).unwrap();
        assert_eq!(r, Released { pages: 2, busy: 0, skipped: 1 });
        assert_eq!(state(&mm, 0x20_0000), Untouched);
        assert_eq!(state(&mm, 0x20_1000), Ballooned);
        assert_eq!((read(&ram, 0x20_0000), read(&ram, 0x20_2000)), (0, 0));
    }

    #[test]
    fn a_page_held_by_another_mover_is_left_alone() {
        let (ram, mm) = setup();
        make_resident(&mm, &ram, 0x30_1000);
        let t = mm.table().unwrap();
        let old = t.begin(0x301, StateSet::of(&[Resident]), Untouched).unwrap();
        let r = mm.release(0x30_0000, 3 * PAGE, Release::Balloon).unwrap();
        assert_eq!(r, Released { pages: 2, busy: 1, skipped: 0 });
        t.abort(0x301, old);
        assert_eq!(read(&ram, 0x30_1000), 0xab, "its contents are kept");
        assert_eq!(state(&mm, 0x30_1000), Resident);
    }

    #[test]
    fn deflate_makes_only_ballooned_pages_untouched() {
        let (ram, mm) = setup();
        make_resident(&mm, &ram, 0x40_1000);
        mm.release(0x40_0000, PAGE, Release::Balloon).unwrap();
        assert_eq!(mm.unballoon(0x40_0000, 2 * PAGE).unwrap(), 1);
        assert_eq!(state(&mm, 0x40_0000), Untouched);
        assert_eq!(state(&mm, 0x40_1000), Resident, "a page that was not ballooned stays");
    }

    #[test]
    fn ranges_that_are_not_ram_are_refused_whole() {
        let (_ram, mm) = setup();
        for (gpa, len) in [(16 << 20, PAGE), ((16 << 20) - PAGE, 2 * PAGE), (5, PAGE), (0, 0)] {
            assert!(matches!(mm.release(gpa, len, Release::Balloon), Err(MmError::NotRam { .. })));
            assert!(mm.unballoon(gpa, len).is_err());
        }
        assert_eq!(mm.table().unwrap().count(Ballooned), 0);
    }

    #[test]
    fn untracked_memory_is_released_without_a_table() {
        let ram = GuestRam::new(16 << 20, 48).unwrap();
        let mm = MemoryManager::new(&ram.regions(), false);
        write(&ram, 0x50_0000, 7);
        assert_eq!(mm.release(0x50_0000, PAGE, Release::Free).unwrap().pages, 1);
        assert_eq!(read(&ram, 0x50_0000), 0);
    }
}
