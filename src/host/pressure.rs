//! minFree and the memory states: how short of memory the host is, as a pure function of
//! free memory, with hysteresis on the way back up.
//!
//! minFree comes from the budget ebb manages: 6% of the first 4 GiB, 4% of 4-12 GiB, 2% of
//! 12-28 GiB and 1% above (ESX's tiers: 901.12 MiB for 28 GiB).
//!
//! | state | entered when free falls below | left upward when free reaches |
//! |---|---|---|
//! | High | (never entered downward) | |
//! | Clear | 300% of minFree | 400% (to High) |
//! | Soft | 64% | 100% (to Clear) |
//! | Hard | 32% | 48% (to Soft) |
//! | Low | 16% | 24% (to Hard) |
//!
//! Falling free memory moves straight to the deepest state whose threshold it crossed;
//! rising free memory climbs one state per threshold it passes, so a host at the edge of a
//! threshold does not flap between two states on every tick.

use serde::Serialize;

/// 1 MiB.
const MIB: u64 = 1 << 20;
/// minFree tiers: (upper end of the tier in MiB, percent of the tier's memory).
const MIN_FREE_TIERS: [(u64, u64); 4] =
    [(4 * 1024, 6), (12 * 1024, 4), (28 * 1024, 2), (u64::MAX, 1)];

/// minFree in bytes for a budget of `budget_bytes`.
pub fn min_free_bytes(budget_bytes: u64) -> u64 {
    let mut lower = 0u64;
    let mut total: u128 = 0;
    for (upper_mib, percent) in MIN_FREE_TIERS {
        let upper = upper_mib.saturating_mul(MIB);
        if budget_bytes <= lower {
            break;
        }
        let in_tier = budget_bytes.min(upper) - lower;
        total += u128::from(in_tier) * u128::from(percent);
        lower = upper;
    }
    u64::try_from(total / 100).unwrap_or(u64::MAX)
}

/// How short of memory the host is, from no pressure (High) to the worst (Low).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemState {
    /// No pressure: free memory never fell below 300% of minFree, or rose back to 400%.
    High,
    /// Below 300%: share pages more aggressively.
    Clear,
    /// Below 64%: balloon.
    Soft,
    /// Below 32%: compress and swap.
    Hard,
    /// Below 16%: compress and swap, and make VMs over their target wait for new memory.
    Low,
}

impl MemState {
    /// Every state, from High to Low.
    pub const ALL: [MemState; 5] =
        [MemState::High, MemState::Clear, MemState::Soft, MemState::Hard, MemState::Low];

    /// The state's name in lower case, as the statistics write it.
    pub fn name(self) -> &'static str {
        match self {
            MemState::High => "high",
            MemState::Clear => "clear",
            MemState::Soft => "soft",
            MemState::Hard => "hard",
            MemState::Low => "low",
        }
    }

    /// Index in [`MemState::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn below(self) -> Option<MemState> {
        MemState::ALL.get(self.index() + 1).copied()
    }

    fn above(self) -> Option<MemState> {
        self.index().checked_sub(1).map(|i| MemState::ALL[i])
    }
}

impl std::fmt::Display for MemState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The thresholds, in percent of minFree, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Free memory below this enters the state (indexed like [`MemState::ALL`]; High's is
    /// unused).
    pub enter_percent: [u64; 5],
    /// Free memory at or above this leaves the state for the one above (High's is unused).
    pub leave_percent: [u64; 5],
}

/// ESX's entry thresholds, with exits half as far again above them.
pub const DEFAULT_THRESHOLDS: Thresholds =
    Thresholds { enter_percent: [0, 300, 64, 32, 16], leave_percent: [0, 400, 100, 48, 24] };

impl Thresholds {
    /// Free bytes below which `state` is entered, for `min_free` bytes of minFree.
    pub fn enter_bytes(&self, state: MemState, min_free: u64) -> i64 {
        percent_of(min_free, self.enter_percent[state.index()])
    }

    /// Free bytes at or above which `state` is left upward.
    pub fn leave_bytes(&self, state: MemState, min_free: u64) -> i64 {
        percent_of(min_free, self.leave_percent[state.index()])
    }

    /// The state after `state` when `free` bytes are free (may be negative: VMs over the
    /// budget) and minFree is `min_free` bytes.
    pub fn next(&self, state: MemState, free: i64, min_free: u64) -> MemState {
        let mut s = state;
        while let Some(lower) = s.below() {
            if free >= self.enter_bytes(lower, min_free) {
                break;
            }
            s = lower;
        }
        if s != state {
            return s;
        }
        while let Some(upper) = s.above() {
            if free < self.leave_bytes(s, min_free) {
                break;
            }
            s = upper;
        }
        s
    }
}

fn percent_of(bytes: u64, percent: u64) -> i64 {
    let v = u128::from(bytes) * u128::from(percent) / 100;
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemState::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn min_free_follows_the_esx_tiers() {
        // 28 GiB: 245.76 + 327.68 + 327.68 = 901.12 MiB.
        assert_eq!(min_free_bytes(28 * GIB), 90112 * MIB / 100);
        // 261,712 MiB managed: 901.12 + 1% of the rest = 3231.52 MiB.
        assert_eq!(min_free_bytes(261_712 * MIB), 323_152 * MIB / 100);
        assert_eq!(min_free_bytes(4 * GIB), 4096 * MIB * 6 / 100);
        assert_eq!(min_free_bytes(768 * MIB), 768 * MIB * 6 / 100);
        assert_eq!(min_free_bytes(12 * GIB), (4096 * 6 + 8192 * 4) * MIB / 100);
        assert_eq!(min_free_bytes(0), 0);
    }

    fn mf() -> u64 {
        100 * MIB
    }

    fn at(percent: i64) -> i64 {
        percent * i64::try_from(MIB).unwrap()
    }

    #[test]
    fn falling_free_memory_enters_each_state_below_its_threshold() {
        let t = DEFAULT_THRESHOLDS;
        assert_eq!(t.next(High, at(300), mf()), High);
        assert_eq!(t.next(High, at(300) - 1, mf()), Clear);
        assert_eq!(t.next(Clear, at(64), mf()), Clear);
        assert_eq!(t.next(Clear, at(64) - 1, mf()), Soft);
        assert_eq!(t.next(Soft, at(32), mf()), Soft);
        assert_eq!(t.next(Soft, at(32) - 1, mf()), Hard);
        assert_eq!(t.next(Hard, at(16), mf()), Hard);
        assert_eq!(t.next(Hard, at(16) - 1, mf()), Low);
        assert_eq!(t.next(Low, -at(1000), mf()), Low);
    }

    #[test]
    fn a_sudden_drop_goes_straight_to_the_deepest_state() {
        let t = DEFAULT_THRESHOLDS;
        assert_eq!(t.next(High, at(40), mf()), Soft);
        assert_eq!(t.next(High, at(10), mf()), Low);
        assert_eq!(t.next(Clear, -1, mf()), Low);
    }

    #[test]
    fn rising_free_memory_leaves_a_state_only_past_its_exit_threshold() {
        let t = DEFAULT_THRESHOLDS;
        // Hysteresis: between entry and exit thresholds the state holds.
        assert_eq!(t.next(Low, at(16), mf()), Low);
        assert_eq!(t.next(Low, at(24) - 1, mf()), Low);
        assert_eq!(t.next(Low, at(24), mf()), Hard);
        assert_eq!(t.next(Hard, at(48) - 1, mf()), Hard);
        assert_eq!(t.next(Hard, at(48), mf()), Soft);
        assert_eq!(t.next(Soft, at(100) - 1, mf()), Soft);
        assert_eq!(t.next(Soft, at(100), mf()), Clear);
        assert_eq!(t.next(Clear, at(400) - 1, mf()), Clear);
        assert_eq!(t.next(Clear, at(400), mf()), High);
    }

    #[test]
    fn a_large_rise_climbs_every_state_it_passes() {
        let t = DEFAULT_THRESHOLDS;
        assert_eq!(t.next(Low, at(100), mf()), Clear);
        assert_eq!(t.next(Low, at(1000), mf()), High);
        assert_eq!(t.next(Hard, at(60), mf()), Soft);
    }

    #[test]
    fn no_state_flaps_at_its_own_threshold() {
        let t = DEFAULT_THRESHOLDS;
        for s in MemState::ALL {
            for free in [at(16), at(24), at(32), at(48), at(64), at(100), at(300), at(400)] {
                let once = t.next(s, free, mf());
                assert_eq!(t.next(once, free, mf()), once, "{s} at {free}");
            }
        }
    }

    #[test]
    fn states_order_from_high_to_low() {
        assert!(High < Clear && Clear < Soft && Soft < Hard && Hard < Low);
        assert_eq!(MemState::ALL.map(MemState::name), ["high", "clear", "soft", "hard", "low"]);
    }
}
