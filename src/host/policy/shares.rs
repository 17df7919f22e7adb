//! Memory targets from shares, with the idle memory tax (Waldspurger, OSDI 2002, 5.2).
//!
//! A VM with `S` shares, `P` bytes allocated of which `a` are active has the adjusted
//! shares-per-page ratio `rho = S / (a + k * (P - a))`, with `k = 1 / (1 - tax)`: an idle
//! byte costs `k` times an active one (4x at the default 75% tax). When the VMs hold more
//! than is available, memory is taken a step at a time from the VM with the lowest `rho`
//! (min-funding revocation), never below its reservation. No VM is given more than its
//! limit. This is pure arithmetic, tested against figures worked by hand.

/// What one VM claims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claim {
    /// Bytes it holds now.
    pub consumed: u64,
    /// Of those, bytes it actively uses.
    pub active: u64,
    /// Never below this.
    pub reservation: u64,
    /// Never above this.
    pub limit: u64,
    /// Its weight.
    pub shares: u64,
}

/// Smallest step of revocation: 1 MiB, so that a result is exact to the MiB.
const MIN_STEP_BYTES: u64 = 1 << 20;
/// At most this many steps per call (the step grows with the excess to stay under it).
const MAX_STEPS: u64 = 4096;

/// The adjusted shares-per-page ratio of `c` holding `p` bytes, with idle cost `k`.
fn rho(c: &Claim, p: u64, k: f64) -> f64 {
    let active = c.active.min(p) as f64;
    let cost = active + k * (p as f64 - active);
    if cost <= 0.0 {
        return f64::INFINITY;
    }
    c.shares as f64 / cost
}

/// Each VM's target in bytes, so that together they hold at most `available` where
/// reservations allow. `tax_percent` is below 100.
pub fn targets(claims: &[Claim], available: u64, tax_percent: u8) -> Vec<u64> {
    let k = 100.0 / f64::from(100 - tax_percent.min(99));
    let mut held: Vec<u64> = claims.iter().map(|c| c.consumed.min(c.limit)).collect();
    let total: u64 = held.iter().sum();
    if total <= available {
        return share_out(claims, held, available - total);
    }
    let mut excess = total - available;
    let step = (excess / MAX_STEPS).max(MIN_STEP_BYTES);
    while excess > 0 {
        let victim = (0..claims.len())
            .filter(|&i| held[i] > claims[i].reservation)
            .min_by(|&a, &b| rho(&claims[a], held[a], k).total_cmp(&rho(&claims[b], held[b], k)));
        let Some(i) = victim else { break };
        let take = step.min(excess).min(held[i] - claims[i].reservation);
        held[i] -= take;
        excess -= take;
    }
    held
}

/// `held` plus `slack` handed out in proportion to shares, each capped at its limit.
fn share_out(claims: &[Claim], mut held: Vec<u64>, slack: u64) -> Vec<u64> {
    let shares: u128 = claims.iter().map(|c| u128::from(c.shares)).sum::<u128>().max(1);
    for (h, c) in held.iter_mut().zip(claims) {
        let part = u128::from(slack) * u128::from(c.shares) / shares;
        *h = h.saturating_add(u64::try_from(part).unwrap_or(u64::MAX)).min(c.limit);
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn vm(consumed_mib: u64, active_mib: u64) -> Claim {
        Claim {
            consumed: consumed_mib * MIB,
            active: active_mib * MIB,
            reservation: 0,
            limit: 256 * MIB,
            shares: 2560,
        }
    }

    fn mib(v: Vec<u64>) -> Vec<u64> {
        v.into_iter().map(|b| b / MIB).collect()
    }

    // The paper's experiment (5.3): two VMs of 256 MB with equal shares, one idle and one
    // busy, on a host that cannot hold both. Worked by hand below for 358 MiB available.

    #[test]
    fn without_a_tax_equal_shares_split_memory_evenly() {
        // tax 0: rho = S / P, equal when both hold 358 / 2 = 179 MiB.
        let t = targets(&[vm(256, 0), vm(256, 256)], 358 * MIB, 0);
        assert_eq!(mib(t), [179, 179]);
    }

    #[test]
    fn the_idle_tax_takes_memory_from_the_idle_vm() {
        // tax 75%: k = 4. Idle: rho = S / (4 P1); busy at 256: rho = S / 256. The idle VM
        // stays the poorer while 4 P1 > 256, i.e. for all 154 MiB of excess: 102 and 256.
        let t = targets(&[vm(256, 0), vm(256, 256)], 358 * MIB, 75);
        assert_eq!(mib(t), [102, 256]);
    }

    #[test]
    fn past_the_balance_point_both_give_in_the_taxed_ratio() {
        // 300 MiB available: balance where S / (4 P1) = S / P2 and P1 + P2 = 300, so
        // P2 = 4 P1: 60 and 240.
        let t = targets(&[vm(256, 0), vm(256, 256)], 300 * MIB, 75);
        assert_eq!(mib(t), [60, 240]);
    }

    #[test]
    fn shares_weigh_the_split() {
        // No tax, shares 2:1 over 300 MiB: rho equal when P1 = 2 P2: 200 and 100.
        let mut rich = vm(256, 256);
        rich.shares = 5120;
        let t = targets(&[rich, vm(256, 256)], 300 * MIB, 75);
        assert_eq!(mib(t), [200, 100]);
    }

    #[test]
    fn a_reservation_is_never_reclaimed() {
        let mut reserved = vm(256, 0);
        reserved.reservation = 200 * MIB;
        let t = targets(&[reserved, vm(256, 256)], 300 * MIB, 75);
        assert_eq!(mib(t), [200, 100]);
    }

    #[test]
    fn when_reservations_exceed_what_is_available_they_still_hold() {
        let mut a = vm(256, 0);
        a.reservation = 200 * MIB;
        let mut b = vm(256, 0);
        b.reservation = 200 * MIB;
        assert_eq!(mib(targets(&[a, b], 300 * MIB, 75)), [200, 200]);
    }

    #[test]
    fn with_room_to_spare_targets_grow_by_shares_up_to_the_limit() {
        let mut small = vm(10, 10);
        small.limit = 20 * MIB;
        let t = targets(&[small, vm(10, 10)], 220 * MIB, 75);
        assert_eq!(mib(t), [20, 110]);
    }

    #[test]
    fn a_vm_over_its_limit_is_brought_to_it() {
        let mut over = vm(256, 256);
        over.limit = 128 * MIB;
        assert_eq!(mib(targets(&[over], 1024 * MIB, 75)), [128]);
    }
}
