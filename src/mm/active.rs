//! Active memory, estimated the ESX way (seed 000): each interval a random sample of resident
//! pages is write-protected; the share of them written before the next interval, smoothed by a
//! fast and a slow moving average, times the resident size is Active.
//!
//! Only writes are seen: write protection is the one access trap that never moves guest data,
//! so sampling cannot lose or corrupt a page. A page only read in the interval counts as idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::stats::round_u64;

/// Default sampling interval: short enough that a demo reacts within seconds (ESX: 60 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default sample size (ESX: 100 pages).
pub const DEFAULT_SAMPLE_PAGES: u32 = 100;
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
    let pages = resident_bytes / 4096;
    // Float only for the fraction; the product is at most `pages`.
    let active = round_u64(fraction.clamp(0.0, 1.0) * pages as f64);
    active.min(pages) * 4096
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

/// A small xorshift generator for picking sample pages (not for anything secret).
#[derive(Debug, Clone)]
pub struct SampleRng(u64);

impl SampleRng {
    /// Seeded from the clock.
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| {
                u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(1)
            });
        Self(seed | 1)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

impl Default for SampleRng {
    fn default() -> Self {
        Self::new()
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
    fn rng_stays_in_range() {
        let mut r = SampleRng(12345);
        assert!((0..1000).all(|_| r.below(7) < 7));
    }
}
