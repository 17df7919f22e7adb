//! The sharing scanner thread: walks guest RAM at the rate the lever sets, hashes each
//! Resident page, and merges the ones whose contents it has seen before.
//!
//! For each page, in order, wrapping around (a pass):
//! 1. skip it unless it is Resident and neither claimed by a mover nor in the Active sample;
//! 2. hash a copy of it (claimed for the instant of the copy, so that no mover takes it
//!    away meanwhile, and read only once `/proc/self/pagemap` shows it mapped); keep 32
//!    bits of the hash per page, and go on only if they are what the last pass saw: a page
//!    written between two visits is volatile, and sharing it would buy a copy-on-write
//!    fault soon (KSM's rule);
//! 3. an all-zero page is frozen, checked, and dropped: it reads as the zero page afterwards;
//! 4. a page whose hash names a canonical slot is frozen and compared with the slot byte by
//!    byte; equal, it maps the slot (see `merge.rs`);
//! 5. a page whose hash names another page seen this pass (a hint) is frozen with that page;
//!    equal, their contents become a new canonical slot that both map;
//! 6. anything else becomes a hint.
//!
//! A hash match alone never shares: a candidate that differs (a collision) is put back
//! unchanged and counted.
//!
//! A page rewritten with the same bytes keeps its hash, so the stable-hash rule alone would
//! merge it again after every copy-on-write break: a busy guest's hot pages would churn
//! between private and shared, each round a fault. So a page the guest wrote while shared
//! (the handler sets `FLAG_UNSHARED`) is skipped for 1, 3, 7, ... up to 63 passes, doubling
//! with each break ([`Backoff`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::merge::Merger;
use super::pool::Found;
use super::sys::{max_map_count, read_page_racy};
use super::{ShareHash, SharingControl, SharingStats};
use crate::mm::claim::Claim;
use crate::mm::pages::{PageState, StateSet, FLAG_IN_FLIGHT, FLAG_SAMPLED};
use crate::mm::sys::Pagemap;
use crate::mm::thread::serve_lever;
use crate::mm::zcache::{Page, PAGE_BYTES};

/// How often the scanner wakes.
pub const TICK: Duration = Duration::from_millis(20);
/// Most wall time of work per tick: half a core at most, whatever the rate asks.
pub const MAX_WORK_PER_TICK: Duration = Duration::from_millis(10);
/// Highest backoff level: a page broken that often is skipped for 2^6 - 1 = 63 passes.
const MAX_BACKOFF: u8 = 6;

/// Per page, how many passes to skip it, grown with each copy-on-write break.
#[derive(Debug)]
struct Backoff {
    level: Vec<u8>,
    skip: Vec<u8>,
}

impl Backoff {
    fn new(pages: usize) -> Self {
        Self { level: vec![0; pages], skip: vec![0; pages] }
    }

    /// One visit of page `i` (once a pass); `broken`: written while shared since the last
    /// visit. True if the page is to be skipped this time.
    fn skips(&mut self, i: usize, broken: bool) -> bool {
        let (Some(level), Some(skip)) = (self.level.get_mut(i), self.skip.get_mut(i)) else {
            return false;
        };
        if broken {
            *level = (*level + 1).min(MAX_BACKOFF);
            *skip = (1 << *level) - 1;
            return true;
        }
        if *skip > 0 {
            *skip -= 1;
            return true;
        }
        false
    }
}

/// Share of `vm.max_map_count` that shared pages may use: each costs up to two mappings
/// (the pool page and the split of guest RAM around it).
const MAP_COUNT_SHARE: u64 = 4;

struct Scanner {
    control: Arc<SharingControl>,
    stats: Arc<SharingStats>,
    merger: Merger,
    hash: ShareHash,
    /// 32 bits of each page's hash at the last visit (0: not seen).
    seen: Vec<u32>,
    cursor: u64,
    max_shared: u64,
    buf: Box<Page>,
    backoff: Backoff,
    pagemap: Pagemap,
}

/// Starts the scanner; it stops when `stop` is written.
///
/// # Errors
/// The timer or the thread could not be created.
pub(crate) fn spawn(
    control: Arc<SharingControl>,
    stats: Arc<SharingStats>,
    stop: EventFd,
    merger: Merger,
    hash: ShareHash,
) -> std::io::Result<JoinHandle<()>> {
    let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
    timer.reset(TICK, Some(TICK)).map_err(std::io::Error::from)?;
    let pages = usize::try_from(merger.table().len()).unwrap_or(0);
    let mut scanner = Scanner {
        control: control.clone(),
        stats,
        merger,
        hash,
        seen: vec![0; pages],
        cursor: 0,
        max_shared: max_map_count() / MAP_COUNT_SHARE,
        buf: Box::new([0; PAGE_BYTES]),
        backoff: Backoff::new(pages),
        pagemap: Pagemap::open()?,
    };
    std::thread::Builder::new().name("ebb-share".into()).spawn(move || {
        let fds = [&stop, &control.kick];
        serve_lever("page sharing scanner", &control.clock, fds, &mut timer, |ticked| {
            if ticked {
                scanner.tick();
            }
            Ok::<(), std::convert::Infallible>(())
        });
    })
}

impl Scanner {
    /// Scans this tick's share of the rate, within the tick's work budget.
    fn tick(&mut self) {
        let rate = self.control.scan_rate();
        let pages = self.seen.len() as u64;
        if rate == 0 || pages == 0 {
            return;
        }
        let tick_ms = u64::try_from(TICK.as_millis()).unwrap_or(20);
        let budget = (rate.saturating_mul(tick_ms) / 1000).max(1);
        let started = Instant::now();
        for _ in 0..budget {
            let idx = self.cursor;
            self.cursor = (self.cursor + 1) % pages;
            if self.cursor == 0 {
                self.merger.pool().clear_hints();
                self.stats.passes.fetch_add(1, Ordering::Relaxed);
            }
            self.visit(idx);
            if started.elapsed() > MAX_WORK_PER_TICK {
                break;
            }
        }
    }

    fn visit(&mut self, idx: u64) {
        let table = self.merger.table();
        if table.get(idx) != Some(PageState::Resident)
            || table.flags(idx) & (FLAG_IN_FLIGHT | FLAG_SAMPLED) != 0
        {
            return;
        }
        let i = usize::try_from(idx).unwrap_or(usize::MAX);
        if self.backoff.skips(i, table.take_unshared(idx)) {
            self.stats.backoff_skips.fetch_add(1, Ordering::Relaxed);
            if let Some(seen) = self.seen.get_mut(i) {
                *seen = 0; // stable again only over two visits after the backoff
            }
            return;
        }
        let Some(hash) = self.hash_of(idx) else { return };
        self.stats.scanned.fetch_add(1, Ordering::Relaxed);
        let Some(seen) = self.seen.get_mut(i) else { return };
        let short = u32::try_from(hash >> 32).unwrap_or(u32::MAX).max(1);
        let stable = *seen == short;
        *seen = short;
        if !stable {
            return;
        }
        if self.buf.iter().all(|&b| b == 0) {
            self.share_zero(idx);
        } else if self.merger.table().count(PageState::Shared) < self.max_shared {
            self.share(idx, hash);
        } else {
            self.stats.map_limited.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hashes a copy of page `idx`, claimed for the copy; None if a mover has it or it is
    /// not mapped.
    ///
    /// The claim keeps every mover away, and only a mover unmaps a page, so a page claimed
    /// and then found mapped stays mapped until the claim ends: reading it never faults.
    /// (The table alone is not proof: a page the fault handler is mapping is Resident before
    /// its ioctl, and a read of it would be a fault that the handler defers while the page
    /// is claimed, for ever if the ioctl failed. The handler claims such pages too now; the
    /// check costs one `pread` and keeps the scanner safe whatever else a state means.)
    fn hash_of(&mut self, idx: u64) -> Option<u64> {
        let table = self.merger.table();
        let hva = self.merger.map().hva_of_idx(idx)?;
        let resident = StateSet::of(&[PageState::Resident]);
        let _claim = Claim::new(table, idx, resident, PageState::Resident).ok()?;
        if !self.pagemap.is_mapped(hva).unwrap_or(false) {
            self.stats.unmapped_skips.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: claimed and mapped, so it stays mapped during the copy (see above).
        unsafe { read_page_racy(hva, &mut self.buf) };
        Some(self.hash.of(self.merger.pool().seed(), &self.buf[..]))
    }

    fn share_zero(&mut self, idx: u64) {
        let Some(frozen) = self.merger.freeze(idx, 0) else { return };
        if frozen.contents().iter().all(|&b| b == 0) {
            frozen.drop_zero();
            self.stats.zero_pages.fetch_add(1, Ordering::Relaxed);
        } // else written since the copy: dropped, the page is put back
    }

    fn share(&mut self, idx: u64, hash: u64) {
        match self.merger.pool().find(hash) {
            Found::Canonical(slot) => self.join(idx, slot),
            Found::Hint(other) if other != idx => self.pair(other, idx, hash),
            Found::Hint(_) => {}
            Found::Foreign => self.publish(idx, hash),
            Found::Nothing => self.merger.pool().hint(hash, idx),
        }
    }

    /// Another VM of the sharing group saw this content: page `idx` becomes the canonical
    /// copy, which that VM joins when its scanner next visits its page.
    fn publish(&mut self, idx: u64, hash: u64) {
        let Some(frozen) = self.merger.freeze(idx, 0) else { return };
        let pool = self.merger.pool();
        // The frozen content is what goes into the pool: hash it again, as it may have
        // changed since the copy that was hashed.
        let p = frozen.contents();
        let slot =
            (self.hash.of(pool.seed(), p) == hash).then(|| pool.create(hash, p).ok()).flatten();
        // No slot: the frozen page is dropped, put back.
        if slot.is_some_and(|slot| frozen.install(slot)) {
            self.stats.merged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Maps page `idx` to canonical `slot` (pinned by `find`) if they are equal.
    fn join(&mut self, idx: u64, slot: u64) {
        let pool = self.merger.pool();
        let Some(frozen) = self.merger.freeze(idx, 0) else {
            pool.unpin(slot);
            return;
        };
        let equal = pool.read(slot, &mut self.buf) && *frozen.contents() == *self.buf;
        if !equal {
            self.stats.collisions.fetch_add(1, Ordering::Relaxed);
            pool.unpin(slot);
            return; // the frozen page is dropped, put back
        }
        if frozen.install(slot) {
            self.stats.merged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Merges page `idx` with `hint`, a page seen with the same hash this pass, if equal.
    fn pair(&mut self, hint: u64, idx: u64, hash: u64) {
        let pool = self.merger.pool();
        pool.forget_hint(hash, hint);
        let Some(frozen_hint) = self.merger.freeze(hint, 1) else {
            pool.hint(hash, idx); // the hint went away: this page takes its place
            return;
        };
        // Not frozen: the hint, dropped, is put back.
        let Some(frozen) = self.merger.freeze(idx, 0) else { return };
        let p = frozen.contents();
        let equal = p == frozen_hint.contents();
        let slot = equal.then(|| pool.create(self.hash.of(pool.seed(), p), p));
        let Some(Ok(slot)) = slot else {
            if !equal {
                self.stats.collisions.fetch_add(1, Ordering::Relaxed);
                pool.hint(hash, idx);
            }
            return; // both dropped, put back
        };
        pool.pin(slot);
        let merged = u64::from(frozen_hint.install(slot)) + u64::from(frozen.install(slot));
        self.stats.merged.fetch_add(merged, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_break_doubles_the_passes_a_page_is_skipped() {
        let mut b = Backoff::new(2);
        assert!(!b.skips(0, false), "a page never broken is never skipped");
        for skipped in [1, 3, 7, 15, 31, 63, 63] {
            assert!(b.skips(0, true), "the visit that finds the break skips");
            for _ in 0..skipped {
                assert!(b.skips(0, false));
            }
            assert!(!b.skips(0, false), "then it is looked at again");
        }
        assert!(!b.skips(1, false), "pages back off alone");
        assert!(!b.skips(7, true), "out of range: never skipped");
    }
}
