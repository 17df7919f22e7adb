//! Which resident pages to evict first: the coldest, by a clock over the pages with an age
//! per page.
//!
//! Two signals make a page young again: the guest wrote it (KVM's dirty log, folded in by
//! [`Victims::age`]), or it faulted back in after an eviction (the fault handler sets
//! [`FLAG_REFERENCED`], which catches pages the guest only reads). Every aging pass adds one
//! to the age of every other page, up to [`MAX_AGE`]. The hand then sweeps the pages and
//! takes those at least as old as the current threshold; a sweep that finds too few lowers
//! the threshold, so a guest with no cold pages still gives up its oldest ones.
//!
//! Without a dirty log (a host without KVM, the engine's own tests) pages age only by the
//! refault signal, and the clock degrades to a round robin that skips recently refaulted
//! pages: correct, not clever. [`VictimPolicy::Random`] picks uniformly at random, the
//! baseline the benchmark compares against.

use super::super::pages::{PageState, PageTable, FLAG_IN_FLIGHT, FLAG_REFERENCED};
use crate::mm::rng::SampleRng;

/// Oldest age a page reaches (aging passes without a write or a refault).
pub const MAX_AGE: u8 = 3;

/// How victims are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VictimPolicy {
    /// The coldest pages first (clock with ages).
    #[default]
    Cold,
    /// Uniformly at random among resident pages (a baseline).
    Random,
}

impl std::str::FromStr for VictimPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cold" => Ok(Self::Cold),
            "random" => Ok(Self::Random),
            other => Err(format!("victim policy {other:?}: use cold or random")),
        }
    }
}

/// The victim picker of one VM (owned by the reclaim worker).
#[derive(Debug)]
pub struct Victims {
    policy: VictimPolicy,
    ages: Vec<u8>,
    hand: u64,
    threshold: u8,
    rng: SampleRng,
}

impl Victims {
    /// A picker for `pages` pages.
    pub fn new(policy: VictimPolicy, pages: u64) -> Self {
        let n = usize::try_from(pages).unwrap_or(0);
        let (hand, threshold, rng) = (0, MAX_AGE, SampleRng::new());
        Self { policy, ages: vec![0; n], hand, threshold, rng }
    }

    /// One aging pass: pages whose bit is set in `dirty` (bit `i % 64` of word `i / 64`,
    /// one per page in `mm`'s numbering; empty when there is no dirty log) and pages the
    /// handler marked referenced become young; the others grow older.
    pub fn age(&mut self, table: &PageTable, dirty: &[u64]) {
        for (i, age) in self.ages.iter_mut().enumerate() {
            let idx = i as u64;
            let written = dirty.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
            let referenced = table.take_referenced(idx);
            *age = if written || referenced { 0 } else { (*age + 1).min(MAX_AGE) };
        }
    }

    /// Up to `n` resident pages to evict, coldest first by the policy.
    pub fn pick(&mut self, table: &PageTable, n: usize) -> Vec<u64> {
        match self.policy {
            VictimPolicy::Cold => self.pick_cold(table, n),
            VictimPolicy::Random => self.pick_random(table, n),
        }
    }

    fn candidate(table: &PageTable, idx: u64) -> bool {
        table.get(idx) == Some(PageState::Resident)
            && table.flags(idx) & (FLAG_IN_FLIGHT | FLAG_REFERENCED) == 0
    }

    fn pick_cold(&mut self, table: &PageTable, n: usize) -> Vec<u64> {
        let pages = self.ages.len() as u64;
        let mut out = Vec::with_capacity(n);
        if pages == 0 {
            return out;
        }
        loop {
            for _ in 0..pages {
                if out.len() >= n {
                    return out;
                }
                let idx = self.hand;
                self.hand = (self.hand + 1) % pages;
                let age = self.ages.get(usize::try_from(idx).unwrap_or(usize::MAX)).copied();
                if age.is_some_and(|a| a >= self.threshold) && Self::candidate(table, idx) {
                    out.push(idx);
                }
            }
            // A whole sweep found too few this old: settle for younger pages.
            if self.threshold == 0 {
                return out;
            }
            self.threshold -= 1;
        }
    }

    fn pick_random(&mut self, table: &PageTable, n: usize) -> Vec<u64> {
        let pages = self.ages.len() as u64;
        let mut out = Vec::with_capacity(n);
        // Bounded tries, so a guest with few resident pages costs little.
        for _ in 0..n.saturating_mul(64) {
            if out.len() >= n || pages == 0 {
                break;
            }
            let idx = self.rng.below(pages);
            if Self::candidate(table, idx) && !out.contains(&idx) {
                out.push(idx);
            }
        }
        out
    }

    /// Raises the threshold back once eviction has caught up (the next round starts from
    /// the coldest again).
    pub fn reset_threshold(&mut self) {
        self.threshold = MAX_AGE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::pages::StateSet;

    fn table(resident: u64, pages: u64) -> PageTable {
        let t = PageTable::new(pages);
        for i in 0..resident {
            t.transition(i, StateSet::of(&[PageState::Untouched]), PageState::Resident).unwrap();
        }
        t
    }

    #[test]
    fn written_pages_stay_young_and_the_rest_are_picked_first() {
        let t = table(64, 64);
        let mut v = Victims::new(VictimPolicy::Cold, 64);
        // Pages 0..32 are written in every pass; 32..64 never.
        let dirty = [0x0000_0000_ffff_ffffu64];
        for _ in 0..MAX_AGE {
            v.age(&t, &dirty);
        }
        let picked = v.pick(&t, 16);
        assert_eq!(picked.len(), 16);
        assert!(picked.iter().all(|&i| i >= 32), "cold pages first: {picked:?}");
    }

    #[test]
    fn with_no_cold_page_the_oldest_are_taken_anyway() {
        let t = table(8, 8);
        let mut v = Victims::new(VictimPolicy::Cold, 8);
        v.age(&t, &[u64::MAX]);
        assert_eq!(v.pick(&t, 4).len(), 4, "the threshold comes down to 0");
        v.reset_threshold();
        assert_eq!(v.threshold, MAX_AGE);
    }

    #[test]
    fn only_resident_pages_not_in_flight_are_candidates() {
        let t = table(4, 8);
        t.begin(1, StateSet::of(&[PageState::Resident]), PageState::Resident).unwrap();
        let mut v = Victims::new(VictimPolicy::Cold, 8);
        let mut picked = v.pick(&t, 8);
        picked.sort_unstable();
        assert_eq!(picked, vec![0, 2, 3]);
        let mut r = Victims::new(VictimPolicy::Random, 8);
        assert!(r.pick(&t, 8).iter().all(|i| [0, 2, 3].contains(i)));
    }

    #[test]
    fn a_refaulted_page_gets_a_second_chance() {
        let t = table(4, 4);
        let mut v = Victims::new(VictimPolicy::Cold, 4);
        for _ in 0..MAX_AGE {
            v.age(&t, &[]);
        }
        t.mark_referenced(2);
        assert!(!v.pick(&t, 4).contains(&2), "referenced: skipped");
        v.reset_threshold();
        v.age(&t, &[]);
        assert_eq!(v.ages[2], 0, "and young again after the next pass");
    }

    #[test]
    fn policies_parse() {
        assert_eq!("cold".parse(), Ok(VictimPolicy::Cold));
        assert_eq!("random".parse(), Ok(VictimPolicy::Random));
        assert!("lru".parse::<VictimPolicy>().is_err());
    }
}
