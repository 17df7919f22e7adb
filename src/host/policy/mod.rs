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
}

impl Default for PolicyParams {
    fn default() -> Self {
        Self { tax_percent: 75, share_rate_idle: 1000, share_rate_busy: 10_000 }
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
