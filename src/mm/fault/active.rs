//! Active memory, estimated the ESX way: each interval a random sample of resident pages is
//! write-protected; the share of them written before the next interval, smoothed by a fast and
//! a slow moving average, times the resident size is Active.
//!
//! Only writes are seen: write protection is the one access trap that never moves guest data,
//! so sampling cannot lose or corrupt a page. A page only read in the interval counts as idle.
//!
//! The [`Sampler`] runs on the fault-handler thread (it issues userfaultfd ioctls and reads
//! the write-protect faults); it owns the sample and the [`FLAG_SAMPLED`] bits of the
//! page-state table. A sampled page that stops being Resident during the interval (released
//! by the balloon, say) leaves the sample: it was neither written nor idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use super::FaultError;
use crate::mm::layout::RamMap;
use crate::mm::pages::{PageState, PageTable, FLAG_SAMPLED};
use crate::mm::rng::SampleRng;
use crate::mm::stats::round_u64;
use crate::mm::uffd::{Resolved, Uffd};
use crate::units::PAGE_SIZE;

/// Default sampling interval in milliseconds: short enough that a demo reacts within
/// seconds (ESX: 60 s).
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
/// [`DEFAULT_INTERVAL_MS`] as a duration.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(DEFAULT_INTERVAL_MS);
/// Default sample size (ESX: 100 pages).
pub const DEFAULT_SAMPLE_PAGES: u32 = 100;
/// Random picks tried per wanted sample page before the sampler settles for fewer (most
/// guest RAM may be untouched).
const PICKS_PER_SAMPLE_PAGE: u64 = 64;
/// Most random picks in one interval, whatever the sample size.
const MAX_PICKS_PER_INTERVAL: u64 = 1 << 16;
/// Most pages sampled per second (sample pages / interval): each costs two write-protect
/// round trips on the fault handler's thread, so more would starve the guest's faults.
pub const MAX_SAMPLE_PAGES_PER_S: u64 = 20_000;

/// How many pages to sample and how many random picks to spend on finding them, for a
/// sample of `sample_pages` among `resident` resident pages.
pub fn sample_budget(sample_pages: u32, resident: u64) -> (u64, u64) {
    let want = u64::from(sample_pages).min(resident);
    (want, (want * PICKS_PER_SAMPLE_PAGE).min(MAX_PICKS_PER_INTERVAL))
}

/// Pages sampled per second by `config`.
pub fn sample_rate(config: &ActiveConfig) -> u64 {
    let ms = u64::try_from(config.interval.as_millis()).unwrap_or(u64::MAX).max(1);
    u64::from(config.sample_pages).saturating_mul(1000) / ms
}
/// Weight of the newest interval in the fast average.
pub const FAST_WEIGHT: f64 = 0.5;
/// Weight of the newest interval in the slow average.
pub const SLOW_WEIGHT: f64 = 0.125;

/// Sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveConfig {
    /// Time between samples.
    pub interval: Duration,
    /// Pages per sample.
    pub sample_pages: u32,
}

impl Default for ActiveConfig {
    fn default() -> Self {
        Self { interval: DEFAULT_INTERVAL, sample_pages: DEFAULT_SAMPLE_PAGES }
    }
}

/// The moving averages of the touched fraction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ActiveEstimator {
    fast: f64,
    slow: f64,
    intervals: u64,
}

impl ActiveEstimator {
    /// Folds in one interval in which `touched` of `sampled` pages were written.
    pub fn update(&mut self, touched: u32, sampled: u32) {
        if sampled == 0 {
            return;
        }
        let f = f64::from(touched) / f64::from(sampled);
        if self.intervals == 0 {
            self.fast = f;
            self.slow = f;
        } else {
            self.fast += FAST_WEIGHT * (f - self.fast);
            self.slow += SLOW_WEIGHT * (f - self.slow);
        }
        self.intervals += 1;
    }

    /// The fraction of resident memory estimated active: the larger average, so Active rises
    /// quickly and falls slowly (ESX takes the maximum the same way).
    pub fn fraction(&self) -> f64 {
        self.fast.max(self.slow)
    }

    /// Fast and slow averages.
    pub fn averages(&self) -> (f64, f64) {
        (self.fast, self.slow)
    }

    /// Intervals folded in so far.
    pub fn intervals(&self) -> u64 {
        self.intervals
    }
}

/// Active bytes for `resident_bytes` at `fraction`, rounded to whole pages.
pub fn active_bytes(fraction: f64, resident_bytes: u64) -> u64 {
    let pages = resident_bytes / PAGE_SIZE;
    // Float only for the fraction; the product is at most `pages`.
    let active = round_u64(fraction.clamp(0.0, 1.0) * pages as f64);
    active.min(pages) * PAGE_SIZE
}

/// What the sampler publishes to the stats path.
#[derive(Debug, Default)]
pub struct ActiveStats {
    /// The current estimate in bytes.
    pub active_bytes: AtomicU64,
    /// Samples completed.
    pub intervals: AtomicU64,
    /// Fast average in parts per million.
    pub fast_ppm: AtomicU64,
    /// Slow average in parts per million.
    pub slow_ppm: AtomicU64,
}

impl ActiveStats {
    /// Publishes an estimate.
    pub fn publish(&self, est: &ActiveEstimator, resident_bytes: u64) {
        let ppm = |f: f64| round_u64(f.clamp(0.0, 1.0) * 1e6);
        let (fast, slow) = est.averages();
        self.active_bytes.store(active_bytes(est.fraction(), resident_bytes), Ordering::Relaxed);
        self.intervals.store(est.intervals(), Ordering::Relaxed);
        self.fast_ppm.store(ppm(fast), Ordering::Relaxed);
        self.slow_ppm.store(ppm(slow), Ordering::Relaxed);
    }
}

/// The sampling state of one VM: the pages in the current sample and the averages.
#[derive(Debug)]
pub struct Sampler {
    config: ActiveConfig,
    timer: TimerFd,
    estimator: ActiveEstimator,
    current: Vec<u64>,
    rng: SampleRng,
}

impl Sampler {
    /// A sampler whose timer fires every `config.interval`.
    ///
    /// # Errors
    /// The timer could not be created or armed.
    pub fn new(config: ActiveConfig) -> std::io::Result<Self> {
        let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
        timer.reset(config.interval, Some(config.interval)).map_err(std::io::Error::from)?;
        let (estimator, current, rng) = (ActiveEstimator::default(), Vec::new(), SampleRng::new());
        Ok(Self { config, timer, estimator, current, rng })
    }

    /// The timer to poll: readable when an interval ends.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// Closes the current sample, publishes the estimate, and protects the next sample.
    ///
    /// # Errors
    /// A userfaultfd ioctl failed for a reason other than a pending remove (`EAGAIN`, which
    /// only shrinks the sample).
    pub fn tick(
        &mut self,
        uffd: &Uffd,
        map: &RamMap,
        table: &PageTable,
        out: &ActiveStats,
    ) -> Result<(), FaultError> {
        let _ = self.timer.wait();
        let (touched, sampled) = self.close(uffd, map, table)?;
        self.estimator.update(touched, sampled);
        out.publish(&self.estimator, table.count(PageState::Resident) * PAGE_SIZE);
        self.open(uffd, map, table)
    }

    /// Ends the sample: (written, still-resident) page counts. Unwritten pages are unprotected.
    fn close(
        &mut self,
        uffd: &Uffd,
        map: &RamMap,
        table: &PageTable,
    ) -> Result<(u32, u32), FaultError> {
        let (mut touched, mut sampled) = (0u32, 0u32);
        for idx in self.current.drain(..) {
            let Some((state, flags)) = table.clear_sampled(idx) else { continue };
            if state != PageState::Resident {
                continue; // released or moved during the interval: out of the sample
            }
            sampled += 1;
            if flags & FLAG_SAMPLED == 0 {
                touched += 1; // the write-protect fault cleared the flag
                continue;
            }
            let Some(hva) = map.hva_of_idx(idx) else { continue };
            // EAGAIN leaves the page protected, which is harmless: its next write takes a
            // write-protect fault, which the handler resolves (and retries) like any other.
            uffd.write_protect(hva, PAGE_SIZE, false)?;
        }
        Ok((touched, sampled))
    }

    /// Picks and write-protects the next sample among resident pages.
    fn open(&mut self, uffd: &Uffd, map: &RamMap, table: &PageTable) -> Result<(), FaultError> {
        let pages = map.pages();
        let resident = table.count(PageState::Resident);
        let (want, picks) = sample_budget(self.config.sample_pages, resident);
        let want = usize::try_from(want).unwrap_or(usize::MAX);
        for _ in 0..picks {
            if self.current.len() >= want || pages == 0 {
                break;
            }
            let idx = self.rng.below(pages);
            let Some(hva) = map.hva_of_idx(idx) else { continue };
            if !table.mark_sampled(idx, PageState::Resident) {
                continue;
            }
            match uffd.write_protect(hva, PAGE_SIZE, true)? {
                Resolved::Mapped => self.current.push(idx),
                // A remove is pending, or memory is short: skip this page rather than wait.
                _ => {
                    table.clear_sampled(idx);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_interval_sets_both_averages() {
        let mut e = ActiveEstimator::default();
        e.update(50, 100);
        assert_eq!(e.averages(), (0.5, 0.5));
        assert_eq!(e.fraction(), 0.5);
    }

    #[test]
    fn active_rises_fast_and_falls_slowly() {
        let mut e = ActiveEstimator::default();
        e.update(0, 100);
        e.update(100, 100);
        assert!(e.fraction() >= 0.5, "one busy interval lifts the fast average to half");
        for _ in 0..3 {
            e.update(0, 100);
        }
        let (fast, slow) = e.averages();
        assert!(fast < 0.1 && slow > fast, "fast {fast} slow {slow}");
        assert_eq!(e.fraction(), slow, "the slow average holds Active up after a phase change");
    }

    #[test]
    fn empty_samples_change_nothing() {
        let mut e = ActiveEstimator::default();
        e.update(0, 0);
        assert_eq!(e.intervals(), 0);
    }

    #[test]
    fn active_bytes_are_whole_pages_of_resident() {
        assert_eq!(active_bytes(0.5, 64 << 20), 32 << 20);
        assert_eq!(active_bytes(1.5, 8192), 8192);
        assert_eq!(active_bytes(0.0, 8192), 0);
    }

    #[test]
    fn the_sample_is_bounded_by_the_resident_pages_and_the_picks_by_a_constant() {
        assert_eq!(sample_budget(100, 0), (0, 0), "nothing resident: no picks at all");
        assert_eq!(sample_budget(100, 10), (10, 640));
        assert_eq!(sample_budget(100_000, 1 << 30), (100_000, MAX_PICKS_PER_INTERVAL));
    }

    #[test]
    fn sample_rate_is_pages_per_second() {
        let c =
            |ms, pages| ActiveConfig { interval: Duration::from_millis(ms), sample_pages: pages };
        assert_eq!(sample_rate(&c(1000, 100)), 100);
        assert_eq!(sample_rate(&c(10, 100_000)), 10_000_000);
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = SampleRng(12345);
        assert!((0..1000).all(|_| r.below(7) < 7));
    }
}
