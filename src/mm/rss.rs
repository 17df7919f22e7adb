//! What the host kernel says the guest-RAM mappings hold (their RSS), as a cross-check of
//! Consumed and as the only figure without the lazy-RAM engine.
//!
//! Reading it means parsing `/proc/self/smaps` (about half a millisecond), so a probe keeps
//! its last reading for [`MAX_AGE`]: any number of statistics requests cost one parse per
//! interval.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::vstate::memory::RamRegion;

/// How long a reading is reused.
pub const MAX_AGE: Duration = Duration::from_millis(100);

/// The RSS of some mappings, read at most every [`MAX_AGE`].
#[derive(Debug)]
pub struct RssProbe {
    regions: Vec<RamRegion>,
    last: Mutex<Option<(Instant, u64)>>,
}

impl RssProbe {
    /// A probe of `regions`.
    pub fn new(regions: Vec<RamRegion>) -> Self {
        Self { regions, last: Mutex::new(None) }
    }

    /// Forgets the last reading: the next one is fresh (the VM's last statistics line).
    pub fn invalidate(&self) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Resident bytes of the regions, at most [`MAX_AGE`] old (0 if unreadable).
    pub fn bytes(&self) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some((at, bytes)) if at.elapsed() < MAX_AGE => bytes,
            _ => {
                let bytes = rss_of(&self.regions);
                *last = Some((Instant::now(), bytes));
                bytes
            }
        }
    }
}

/// Resident bytes of `regions`, from `/proc/self/smaps` (0 if unreadable).
fn rss_of(regions: &[RamRegion]) -> u64 {
    let wanted: Vec<(u64, u64)> = regions.iter().map(|r| (r.hva, r.hva + r.len)).collect();
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
    let mut total = 0;
    let mut current = false;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
                {
                    current = wanted.iter().any(|&(a, b)| lo >= a && hi <= b);
                    continue;
                }
            }
        }
        if current {
            if let Some(kb) = line.strip_prefix("Rss:") {
                total +=
                    kb.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    total
}
