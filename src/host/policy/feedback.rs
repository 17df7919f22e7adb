//! `feedback`: in the spirit of Meta's TMO and Senpai. It believes the right amount of
//! memory for a VM is the least it can have before it starts to hurt, and that the hurt
//! shows as refaults: pages the host took away and the guest wanted back. So it squeezes
//! every VM a little each tick while its refault rate stays under a target, and lets go
//! when the rate passes it, whatever the memory state; under pressure (Hard and Low) it
//! also holds VMs to a fair part of the budget, so that the host stays above minFree. It
//! never balloons or shares: the probe is host-side reclaim (compression, then swap).

use std::collections::HashMap;

use super::{Policy, Snapshot, VmAction, VmView};
use crate::host::pressure::MemState;

/// Refaults per second per VM the policy accepts (Senpai's pressure target, in faults).
pub const REFAULT_TARGET_PER_S: f64 = 50.0;
/// Each tick under the target squeezes the resident target by this much, in percent.
pub const SQUEEZE_PERCENT: u64 = 3;
/// Each tick over the target relaxes it by this much, in percent.
pub const RELAX_PERCENT: u64 = 10;
/// Never squeeze below this, whatever the refaults say.
pub const FLOOR_BYTES: u64 = 4 << 20;

/// The feedback policy: each VM's resident target, moved by its refault rate.
#[derive(Debug, Default)]
pub struct Feedback {
    resident_target: HashMap<String, u64>,
}

impl Feedback {
    fn next_target(&self, vm: &VmView, fair: u64, state: MemState) -> Option<u64> {
        let current = self.resident_target.get(&vm.name).copied().unwrap_or(vm.resident_bytes);
        let floor = vm.reservation_bytes.max(FLOOR_BYTES);
        let mut t = if vm.refault_rate < REFAULT_TARGET_PER_S {
            current.min(vm.resident_bytes) * (100 - SQUEEZE_PERCENT) / 100
        } else {
            current * (100 + RELAX_PERCENT) / 100
        };
        if matches!(state, MemState::Hard | MemState::Low) {
            t = t.min(fair.saturating_sub(vm.consumed_bytes.saturating_sub(vm.resident_bytes)));
        }
        let t = t.max(floor);
        (t < vm.configured_bytes).then_some(t)
    }
}

impl Policy for Feedback {
    fn name(&self) -> &'static str {
        "feedback"
    }

    fn decide(&mut self, snap: &Snapshot) -> Vec<VmAction> {
        let actions: Vec<VmAction> = snap
            .vms
            .iter()
            .zip(super::fair_shares(snap))
            .map(|(vm, fair)| {
                let target = self.next_target(vm, fair, snap.host.state);
                VmAction { target_bytes: fair, reclaim_target_bytes: target, ..VmAction::default() }
            })
            .collect();
        self.resident_target = (snap.vms.iter().zip(&actions))
            .filter_map(|(v, a)| Some((v.name.clone(), a.reclaim_target_bytes?)))
            .collect();
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::policy::HostView;

    const MIB: u64 = 1 << 20;

    fn snap(refault_rate: f64, state: MemState) -> Snapshot {
        Snapshot {
            host: HostView {
                budget_bytes: 1000 * MIB,
                free_bytes: 0,
                min_free_bytes: 100 * MIB,
                state,
            },
            vms: vec![VmView {
                name: "v".into(),
                configured_bytes: 512 * MIB,
                consumed_bytes: 400 * MIB,
                resident_bytes: 400 * MIB,
                limit_bytes: 512 * MIB,
                shares: 1,
                refault_rate,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn squeezes_while_refaults_stay_low_and_lets_go_when_they_rise() {
        let mut p = Feedback::default();
        let t1 = p.decide(&snap(0.0, MemState::High))[0].reclaim_target_bytes.unwrap();
        assert_eq!(t1, 400 * MIB * 97 / 100);
        let t2 = p.decide(&snap(0.0, MemState::High))[0].reclaim_target_bytes.unwrap();
        assert!(t2 < t1, "squeezes again");
        let t3 = p.decide(&snap(1000.0, MemState::High))[0].reclaim_target_bytes.unwrap();
        assert_eq!(t3, t2 * 110 / 100, "backs off when it hurts");
    }

    #[test]
    fn under_hard_pressure_it_holds_vms_to_their_fair_part() {
        let mut p = Feedback::default();
        let mut s = snap(1000.0, MemState::Hard);
        s.host.budget_bytes = 400 * MIB; // 300 available, one VM: 300 fair
        assert_eq!(p.decide(&s)[0].reclaim_target_bytes, Some(300 * MIB));
    }
}
