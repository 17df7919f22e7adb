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

/// Resident bytes of `regions`, from `/proc/self/smaps` (0 if unreadable). Read a line at a
/// time: with page sharing, guest RAM may be split into tens of thousands of mappings, and
/// the whole file is then tens of MiB, which a single read would hold in memory at once.
fn rss_of(regions: &[RamRegion]) -> u64 {
    use std::io::BufRead;
    let wanted: Vec<(u64, u64)> = regions.iter().map(|r| (r.hva, r.hva + r.len)).collect();
    let Ok(file) = std::fs::File::open("/proc/self/smaps") else { return 0 };
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
    let (mut total, mut current, mut line) = (0, false, String::new());
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if let Some(inside) = mapping_inside(&line, &wanted) {
            current = inside;
        } else if let Some(kb) = line.strip_prefix("Rss:").filter(|_| current) {
            total += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
        }
        line.clear();
    }
    total
}

/// For a mapping's header line of smaps (`lo-hi perms ...`), whether it lies inside one of
/// `wanted`; None for any other line.
fn mapping_inside(line: &str, wanted: &[(u64, u64)]) -> Option<bool> {
    let (range, _) = line.split_once(' ')?;
    let (lo, hi) = range.split_once('-')?;
    let (lo, hi) = (u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?);
    Some(wanted.iter().any(|&(a, b)| lo >= a && hi <= b))
}
