//! `swap-only`: what a host does without the guest's cooperation. It believes in nothing
//! but its own page-out: no balloon, no sharing, no compression cache (its VMs run with
//! `--zcache-max 0`), so every page it reclaims goes to the swap file. Targets are a fair
//! split of the budget less minFree by shares, as a host that knows nothing of Active
//! memory would make them, enforced from Soft down and dropped in High.

use super::{Policy, Snapshot, VmAction};
use crate::host::pressure::MemState;

/// The swap-only baseline.
#[derive(Debug, Default)]
pub struct SwapOnly;

impl Policy for SwapOnly {
    fn name(&self) -> &'static str {
        "swap-only"
    }

    fn vm_args(&self) -> Vec<String> {
        vec!["--zcache-max".into(), "0".into()]
    }

    fn decide(&mut self, snap: &Snapshot) -> Vec<VmAction> {
        let squeeze = matches!(snap.host.state, MemState::Soft | MemState::Hard | MemState::Low);
        snap.vms
            .iter()
            .zip(super::fair_shares(snap))
            .map(|(vm, fair)| {
                let overhead = vm.consumed_bytes.saturating_sub(vm.resident_bytes);
                let reclaim =
                    (squeeze && vm.consumed_bytes > fair).then(|| fair.saturating_sub(overhead));
                VmAction {
                    target_bytes: fair,
                    reclaim_target_bytes: reclaim,
                    ..VmAction::default()
                }
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
    fn swaps_vms_over_their_fair_part_under_pressure_only() {
        let vm = |c: u64| VmView {
            name: "v".into(),
            configured_bytes: 512 * MIB,
            consumed_bytes: c * MIB,
            resident_bytes: c * MIB,
            limit_bytes: 512 * MIB,
            shares: 1,
            balloon_ready: true,
            ..Default::default()
        };
        let mut snap = Snapshot {
            host: HostView {
                budget_bytes: 600 * MIB,
                free_bytes: 0,
                min_free_bytes: 100 * MIB,
                state: MemState::Hard,
            },
            vms: vec![vm(400), vm(100)],
        };
        let a = SwapOnly.decide(&snap);
        assert_eq!(a[0].reclaim_target_bytes, Some(250 * MIB));
        assert_eq!(a[1].reclaim_target_bytes, None, "under its part");
        assert!(a.iter().all(|x| x.balloon_bytes == 0 && x.share_scan_rate == 0));
        snap.host.state = MemState::Clear;
        assert!(SwapOnly.decide(&snap).iter().all(|x| x.reclaim_target_bytes.is_none()));
        assert_eq!(SwapOnly.vm_args(), ["--zcache-max", "0"]);
    }
}
