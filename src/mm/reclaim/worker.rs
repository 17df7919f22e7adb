//! The reclaim worker thread: every tick (or when the lever moves) it ages the pages, then
//! evicts the coldest in batches until the guest's resident memory is at most the target,
//! writing the cache's oldest pages back to swap when the cache is full.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::evict::{Evictor, BATCH_PAGES};
use super::store::Backing;
use super::victims::Victims;
use super::{DirtyLog, ReclaimControl, VictimPolicy};
use crate::mm::pages::{PageState, PageTable};
use crate::mm::thread::serve_lever;
use crate::units::PAGE_SIZE;

/// How often the worker ages pages and checks the target.
pub const TICK: Duration = Duration::from_millis(100);
/// While nothing needs evicting, the worker reads KVM's dirty log only every this many
/// ticks (1 s): reading it write-protects every page the guest dirtied again, which on a
/// shadow-paging host (PVM) costs the guest a trap per hot page per read.
pub const IDLE_AGING_TICKS: u32 = 10;
/// Most pages evicted per tick: 32 MiB, so that a new target is reached at up to 320 MiB/s
/// without the worker hogging a core the guest may need.
pub const PAGES_PER_TICK: u64 = 8192;

/// What the worker needs.
struct Worker {
    control: Arc<ReclaimControl>,
    table: Arc<PageTable>,
    backing: Arc<Backing>,
    evictor: Evictor,
    victims: Victims,
    dirty_log: Option<DirtyLog>,
    bitmap: Vec<u64>,
    /// Ticks since the worker last evicted a page or aged the pages.
    quiet_ticks: u32,
}

/// Starts the worker; it stops when `stop` is written.
///
/// # Errors
/// The timer or the thread could not be created.
pub(crate) fn spawn(
    control: Arc<ReclaimControl>,
    stop: EventFd,
    table: Arc<PageTable>,
    backing: Arc<Backing>,
    evictor: Evictor,
    policy: VictimPolicy,
    dirty_log: Option<DirtyLog>,
) -> std::io::Result<JoinHandle<()>> {
    let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
    timer.reset(TICK, Some(TICK)).map_err(std::io::Error::from)?;
    let victims = Victims::new(policy, table.len());
    let mut worker = Worker {
        control: control.clone(),
        table,
        backing,
        evictor,
        victims,
        dirty_log,
        bitmap: Vec::new(),
        quiet_ticks: 0,
    };
    std::thread::Builder::new().name("ebb-reclaim".into()).spawn(move || {
        let fds = [&stop, &control.kick];
        serve_lever("reclaim worker", &control.clock, fds, &mut timer, |ticked| {
            worker.wake(ticked)
        });
    })
}

impl Worker {
    /// One wake-up: age the pages on a tick, then evict toward the target.
    fn wake(&mut self, ticked: bool) -> Result<(), crate::mm::uffd::UffdError> {
        if ticked {
            self.quiet_ticks = self.quiet_ticks.saturating_add(1);
            if self.over_target() || self.quiet_ticks >= IDLE_AGING_TICKS {
                self.age();
                self.quiet_ticks = 0;
            }
        }
        let evicted = self.reclaim()?;
        if evicted > 0 {
            self.quiet_ticks = 0;
        }
        Ok(())
    }

    /// True if the guest is over its target: victims are needed now, and they should be
    /// picked by fresh ages. (A guest sitting at its target ages once a second.)
    fn over_target(&self) -> bool {
        self.control.target().is_some_and(|t| self.resident_pages() > t / PAGE_SIZE)
    }

    /// Folds the dirty log (if any) and the refault marks into the pages' ages.
    fn age(&mut self) {
        if self.control.target().is_none() {
            return;
        }
        self.bitmap.clear();
        if let Some(log) = self.dirty_log.as_mut() {
            if let Err(e) = log(&mut self.bitmap) {
                log::warn!("reading KVM's dirty log: {e}; victims are picked without it");
                self.dirty_log = None;
                self.bitmap.clear();
            }
        }
        self.victims.age(&self.table, &self.bitmap);
    }

    fn resident_pages(&self) -> u64 {
        self.table.count(PageState::Resident)
    }

    /// Evicts until the target is met, this tick's budget is spent, or nothing moves;
    /// returns the pages evicted.
    fn reclaim(&mut self) -> Result<u64, crate::mm::uffd::UffdError> {
        let Some(target) = self.control.target() else { return Ok(0) };
        let target_pages = target / PAGE_SIZE;
        let mut budget = PAGES_PER_TICK;
        while budget > 0 {
            // One read of the count per round: other threads lower it concurrently (balloon
            // releases, the sharing scanner, removes the fault handler applies), so a second
            // read could find it under the target, and the subtraction would underflow.
            let Some(excess) = excess_pages(self.resident_pages(), target_pages) else { break };
            if self.backing.cache_is_full() {
                self.evictor.write_back(BATCH_PAGES);
            }
            let want = usize::try_from(excess.min(budget)).unwrap_or(BATCH_PAGES).min(BATCH_PAGES);
            let picked = self.victims.pick(&self.table, want);
            if picked.is_empty() {
                break;
            }
            let done = self.evictor.evict(&picked)?;
            if done.pages == 0 {
                break;
            }
            budget = budget.saturating_sub(done.pages);
        }
        self.victims.reset_threshold();
        Ok(PAGES_PER_TICK - budget)
    }
}

/// The pages resident over the target, None when at or under it.
fn excess_pages(resident_pages: u64, target_pages: u64) -> Option<u64> {
    resident_pages.checked_sub(target_pages).filter(|&excess| excess > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_excess_is_what_is_resident_over_the_target() {
        assert_eq!(excess_pages(10, 4), Some(6));
        assert_eq!(excess_pages(5, 4), Some(1));
    }

    #[test]
    fn a_count_at_or_under_the_target_has_no_excess() {
        // Under: the count dropped below the target after the loop last looked.
        assert_eq!(excess_pages(4, 4), None);
        assert_eq!(excess_pages(3, 4), None);
        assert_eq!(excess_pages(0, u64::MAX), None);
    }
}
