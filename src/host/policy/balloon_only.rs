//! `balloon-only`: believes the guest knows best which of its pages to give up, so it asks
//! only through the balloon, never reclaims behind a guest's back, and never shares.
//!
//! Each VM over its fair part of the memory available (the budget less minFree, split by
//! shares, at least its reservation) is asked for the excess through its balloon; a VM
//! with no balloon driver is left alone, whatever the pressure. With no pressure (High)
//! the balloons deflate.

use super::{Policy, Snapshot, VmAction};
use crate::host::pressure::MemState;

/// The balloon-only policy.
#[derive(Debug, Default)]
pub struct BalloonOnly;

impl Policy for BalloonOnly {
    fn name(&self) -> &'static str {
        "balloon-only"
    }

    fn decide(&mut self, snap: &Snapshot) -> Vec<VmAction> {
        snap.vms
            .iter()
            .zip(super::fair_shares(snap))
            .map(|(vm, fair)| {
                let over = vm.consumed_bytes.saturating_sub(fair);
                let room = vm.configured_bytes.saturating_sub(vm.reservation_bytes);
                let balloon_bytes = match snap.host.state {
                    MemState::High => 0,
                    _ if vm.balloon_ready => (vm.ballooned_bytes + over).min(room),
                    _ => 0,
                };
                VmAction { target_bytes: fair, balloon_bytes, ..VmAction::default() }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::policy::{HostView, VmView};

    const MIB: u64 = 1 << 20;

    #[test]
    fn only_balloons_and_only_under_pressure() {
        let vm = |name: &str, ready| VmView {
            name: name.into(),
            configured_bytes: 512 * MIB,
            consumed_bytes: 400 * MIB,
            limit_bytes: 512 * MIB,
            shares: 1,
            balloon_ready: ready,
            ..Default::default()
        };
        let mut snap = Snapshot {
            host: HostView {
                budget_bytes: 600 * MIB,
                free_bytes: 0,
                min_free_bytes: 100 * MIB,
                state: MemState::Soft,
            },
            vms: vec![vm("a", true), vm("b", false)],
        };
        let a = BalloonOnly.decide(&snap);
        // 500 MiB available, 250 each: a gives 150 through its balloon, b cannot be asked.
        assert_eq!((a[0].target_bytes, a[0].balloon_bytes), (250 * MIB, 150 * MIB));
        assert_eq!(a[1].balloon_bytes, 0);
        assert!(a.iter().all(|x| x.reclaim_target_bytes.is_none() && x.share_scan_rate == 0));
        snap.host.state = MemState::High;
        assert!(BalloonOnly.decide(&snap).iter().all(|x| x.balloon_bytes == 0));
    }
}
