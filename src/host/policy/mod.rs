//! Reclamation policies: what the host asks of each VM, given a snapshot of all of them.
//!
//! A policy is a [`Policy`]: it gets a [`Snapshot`] (the host's budget, free memory, minFree
//! and state; each VM's figures and controls) once per tick (and at once after a budget change), and
//! returns one [`VmAction`] per VM, in the snapshot's order. The host turns actions into
//! control-socket requests, sending only what changed. A policy never talks to a VM itself,
//! so policies are plain values that tests drive with hand-made snapshots.
//!
//! | policy | file | believes |
//! |---|---|---|
//! | `esx` (default) | `esx.rs` | ESX: targets from shares with the idle memory tax, reclaimers chosen by state |
//! | `balloon-only` | `balloon_only.rs` | the guest knows best: ask only through the balloon, never reclaim behind its back |
//! | `swap-only` | `swap_only.rs` | a host without cooperation: page out to the swap file, nothing else |
//! | `feedback` | `feedback.rs` | TMO/Senpai: squeeze each VM until its refaults reach a target |
//!
//! Adding one: a file here with a type that implements [`Policy`], and a line in [`by_name`].

pub mod balloon_only;
pub mod esx;
pub mod feedback;
pub mod shares;
pub mod swap_only;

use serde::Serialize;

use super::pressure::MemState;

/// What a policy sees of the host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostView {
    /// Memory the host may give its VMs, bytes.
    pub budget_bytes: u64,
    /// Budget less what the VMs consume (capped by the host's available memory), bytes;
    /// negative when the VMs are over the budget.
    pub free_bytes: i64,
    /// minFree for this budget, bytes.
    pub min_free_bytes: u64,
    /// The memory state.
    pub state: MemState,
}

/// What a policy sees of one VM. Sizes in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VmView {
    /// The VM's name.
    pub name: String,
    /// Guest memory configured.
    pub configured_bytes: u64,
    /// Host memory the VM consumes (guest pages, pool pages, compression cache, metadata).
    pub consumed_bytes: u64,
    /// Of that, guest pages resident in guest memory.
    pub resident_bytes: u64,
    /// Estimated Active memory.
    pub active_bytes: u64,
    /// Guest memory backed by shared pages.
    pub shared_bytes: u64,
    /// Host memory sharing saves the VM (its pages that map a shared or the zero page,
    /// less the shared copies it holds).
    pub sharing_saved_bytes: u64,
    /// Pages the sharing scanner has hashed so far.
    pub share_scanned_pages: u64,
    /// Guest memory the balloon holds.
    pub ballooned_bytes: u64,
    /// Guest memory in the compression cache.
    pub compressed_bytes: u64,
    /// Guest memory in the swap file.
    pub swapped_bytes: u64,
    /// Never reclaim below this.
    pub reservation_bytes: u64,
    /// Never give more than this.
    pub limit_bytes: u64,
    /// Shares: the VM's weight when memory is short.
    pub shares: u64,
    /// The guest's balloon driver is up and can be asked for memory.
    pub balloon_ready: bool,
    /// Guest page faults per second since the last tick.
    pub fault_rate: f64,
    /// Refaults (evicted pages touched again) per second since the last tick.
    pub refault_rate: f64,
}

/// Everything a policy decides from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// The host.
    pub host: HostView,
    /// The running VMs.
    pub vms: Vec<VmView>,
}

/// What the host should make of one VM. Every field is the lever's full desired value;
/// the host sends only changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmAction {
    /// The memory the policy thinks the VM should have (reported, not a lever).
    pub target_bytes: u64,
    /// Balloon size: guest memory the guest should give back (0: deflate).
    pub balloon_bytes: u64,
    /// Keep at most this much of the guest resident: compress and swap the rest
    /// (None: reclaim off).
    pub reclaim_target_bytes: Option<u64>,
    /// Pages per second for the sharing scanner (0: off).
    pub share_scan_rate: u64,
    /// New guest memory waits while this much is resident (None: never waits).
    pub alloc_wait_above_bytes: Option<u64>,
}

/// A reclamation policy.
pub trait Policy: std::fmt::Debug + Send {
    /// The name `--policy` takes.
    fn name(&self) -> &'static str;
    /// One action per VM of `snap`, in its order.
    fn decide(&mut self, snap: &Snapshot) -> Vec<VmAction>;
    /// More `ebb run` options every VM starts with under this policy (the mechanisms it
    /// believes in), none by default.
    fn vm_args(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `action` made to keep `vm`'s reservation, whatever the policy asked: memory below the
/// reservation is never reclaimed. The reclaim lever counts the guest's resident pages only,
/// so a floor there is exact: the guest keeps at least its reservation resident, and what it
/// consumes besides (its compression cache, its part of a sharing pool, metadata) only adds
/// to that. (A floor of reservation less that overhead, as a policy may compute from
/// consumption, breaks the promise as soon as the cache shrinks: it is written back to swap
/// when full, and the guest's consumption falls below its reservation.) The balloon never
/// asks for the reserved part, and new memory is never held back below it.
pub fn keep_reservation(mut action: VmAction, vm: &VmView) -> VmAction {
    let floor = vm.reservation_bytes;
    action.reclaim_target_bytes = action.reclaim_target_bytes.map(|t| t.max(floor));
    action.alloc_wait_above_bytes = action.alloc_wait_above_bytes.map(|t| t.max(floor));
    action.balloon_bytes = action.balloon_bytes.min(vm.configured_bytes.saturating_sub(floor));
    action
}

/// Each VM's fair part of what the host may give (the budget less minFree), by shares, within
/// its reservation and limit: the split a policy that knows nothing of Active memory makes.
pub fn fair_shares(snap: &Snapshot) -> Vec<u64> {
    let available = snap.host.budget_bytes.saturating_sub(snap.host.min_free_bytes);
    let total_shares: u64 = snap.vms.iter().map(|v| v.shares).sum();
    snap.vms.iter().map(|vm| fair_share(available, vm, total_shares)).collect()
}

/// `vm`'s part of `available` bytes by shares (of `total_shares`), within its reservation
/// and limit.
pub fn fair_share(available: u64, vm: &VmView, total_shares: u64) -> u64 {
    let part = u128::from(available) * u128::from(vm.shares) / u128::from(total_shares.max(1));
    u64::try_from(part)
        .unwrap_or(u64::MAX)
        .clamp(vm.reservation_bytes, vm.limit_bytes.max(vm.reservation_bytes))
}

/// The policies `--policy` knows, default first.
pub const POLICY_NAMES: [&str; 4] = ["esx", "balloon-only", "swap-only", "feedback"];

/// What policies are built with (the host's description sets them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyParams {
    /// Idle memory tax, percent (below 100).
    pub tax_percent: u8,
    /// Sharing scan rate with no memory pressure, pages per second per VM.
    pub share_rate_idle: u64,
    /// Sharing scan rate under pressure (Clear and below).
    pub share_rate_busy: u64,
    /// Free memory ESX's targets leave, percent of minFree.
    pub goal_free_percent: u64,
}

impl Default for PolicyParams {
    fn default() -> Self {
        Self {
            tax_percent: 75,
            share_rate_idle: 1000,
            share_rate_busy: 10_000,
            goal_free_percent: esx::GOAL_FREE_PERCENT,
        }
    }
}

/// The policy called `name`, built with `params`.
pub fn by_name(name: &str, params: PolicyParams) -> Option<Box<dyn Policy>> {
    match name {
        "esx" => Some(Box::new(esx::Esx::new(params))),
        "balloon-only" => Some(Box::new(balloon_only::BalloonOnly)),
        "swap-only" => Some(Box::new(swap_only::SwapOnly)),
        "feedback" => Some(Box::new(feedback::Feedback::default())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn reserved_vm() -> VmView {
        VmView {
            name: "r".into(),
            configured_bytes: 256 * MIB,
            consumed_bytes: 170 * MIB,
            resident_bytes: 160 * MIB,
            reservation_bytes: 160 * MIB,
            limit_bytes: 256 * MIB,
            ..Default::default()
        }
    }

    #[test]
    fn a_reclaim_target_below_the_reservation_is_raised_to_it() {
        // What ESX computed before the fix: the reservation less the VM's overhead.
        let asked = VmAction {
            reclaim_target_bytes: Some(150 * MIB),
            alloc_wait_above_bytes: Some(150 * MIB),
            balloon_bytes: 200 * MIB,
            ..Default::default()
        };
        let kept = keep_reservation(asked, &reserved_vm());
        assert_eq!(kept.reclaim_target_bytes, Some(160 * MIB));
        assert_eq!(kept.alloc_wait_above_bytes, Some(160 * MIB));
        assert_eq!(kept.balloon_bytes, 96 * MIB, "the balloon leaves the reservation alone");
    }

    #[test]
    fn levers_above_the_reservation_or_off_are_left_alone() {
        let asked = VmAction {
            reclaim_target_bytes: Some(200 * MIB),
            balloon_bytes: 10 * MIB,
            ..Default::default()
        };
        assert_eq!(keep_reservation(asked.clone(), &reserved_vm()), asked);
        let off = VmAction::default();
        assert_eq!(keep_reservation(off.clone(), &reserved_vm()), off);
    }

    #[test]
    fn every_policy_keeps_the_reservation_through_the_host() {
        // Under the deepest state, every policy's action, as the host sends it, leaves the
        // reserved VM at least its reservation resident.
        let snap = Snapshot {
            host: HostView {
                budget_bytes: 288 * MIB,
                free_bytes: -(64 << 20),
                min_free_bytes: 20 * MIB,
                state: MemState::Low,
            },
            vms: vec![
                VmView { compressed_bytes: 8 * MIB, ..reserved_vm() },
                VmView { name: "o".into(), reservation_bytes: 0, ..reserved_vm() },
            ],
        };
        for name in POLICY_NAMES {
            let mut policy = by_name(name, PolicyParams::default()).unwrap();
            let action = policy.decide(&snap).remove(0);
            let kept = keep_reservation(action, &snap.vms[0]);
            assert!(kept.reclaim_target_bytes.is_none_or(|t| t >= 160 * MIB), "{name}: {kept:?}");
            assert!(kept.balloon_bytes <= 96 * MIB, "{name}: {kept:?}");
        }
    }
}
