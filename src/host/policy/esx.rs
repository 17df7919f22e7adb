//! ESX's policy: every VM's target from its shares with the idle memory tax, bounded by its
//! reservation and limit; the memory state picks the reclaimers that bring VMs to target.
//!
//! | state | what it does |
//! |---|---|
//! | High | shares pages in the background; deflates balloons, stops reclaim |
//! | Clear | shares pages faster; holds the levers of VMs over target where they are (reclaims them to target while free memory is below the goal) |
//! | Soft | balloons VMs over target (compresses those without a balloon driver) |
//! | Hard | balloons and compresses/swaps VMs over target |
//! | Low | as Hard, and new memory of VMs over target waits for reclaim (`mm::gate`) |
//!
//! In every state but High, a VM *under* its target has its levers eased up to the target,
//! so that memory taken from it earlier (before Active memory told the idle VMs from the
//! busy ones, say) flows back as its target rises.
//!
//! A VM's claim is its demand: what it consumes plus what was compressed or swapped from it
//! (what it would hold unconstrained), so that a VM squeezed early still counts what it
//! wants. Targets aim to leave [`GOAL_FREE_PERCENT`] of minFree free, which is past Soft's
//! exit, so that reclaim that meets its targets lifts the host out of Soft. A VM above its
//! limit is reclaimed to it in every state.
//!
//! A VM that has refaulted at more than [`THRASH_PERCENT`] of its pages per second (at least
//! [`THRASH_MIN_REFAULTS`]) for [`THRASH_TICKS`] ticks in a row counts as wholly active for
//! the tax, whatever its Active estimate says: a vCPU that waits for its faults touches
//! fewer pages, so a thrashing VM's estimate collapses (a busy VM 6 MiB short of its 59 MiB
//! set read 10 to 24 MiB active) and the tax then took memory from the VM that needed it
//! most. The ticks in a row tell a working set that does not fit from a one-off pass over
//! evicted memory (a guest rewriting everything once), which gains nothing from more
//! memory and would take it from a neighbour's loop.
//!
//! Targets leave the policy's goal of free memory, [`GOAL_FREE_PERCENT`] of minFree by
//! default (`goal_free_percent` in the host's description).
//!
//! Sharing scans at the busy rate (Clear and below) only while it pays: once the scanner has
//! hashed twice what the VM holds resident (two passes: a page is merged only once its hash
//! held from one pass to the next; at least [`YIELD_WINDOW_PAGES`]) since the last look,
//! the policy compares what sharing saved meanwhile with what it scanned, and below
//! [`MIN_YIELD_PERCENT`] the VM goes back to the idle rate until a window at that rate pays
//! again. A scanner that finds nothing (random memory, or a guest whose duplicates are all
//! merged) then stops taking the guests' CPU: on busy guests that CPU was what the busy rate
//! cost (see lab/README.md).

use std::collections::HashMap;

use super::shares::{self, Claim};
use super::{Policy, PolicyParams, Snapshot, VmAction, VmView};
use crate::host::pressure::MemState;
use crate::units::PAGE_SIZE;

/// Free memory the targets leave, in percent of minFree.
pub const GOAL_FREE_PERCENT: u64 = 125;
/// Refaults per second, in percent of a VM's pages, from which it counts as wholly active.
pub const THRASH_PERCENT: u64 = 1;
/// Refaults per second from which a VM may count as wholly active, however small.
pub const THRASH_MIN_REFAULTS: u64 = 64;
/// Ticks in a row of such refaults before a VM counts as thrashing.
pub const THRASH_TICKS: u32 = 5;
/// Least pages a window of the sharing yield covers.
pub const YIELD_WINDOW_PAGES: u64 = 4096;
/// Pages saved per hundred scanned below which the busy rate is not worth it.
pub const MIN_YIELD_PERCENT: u64 = 1;

/// Whether sharing pays in one VM: what the scanner had hashed and sharing had saved at the
/// start of the window, and what the last window found.
#[derive(Debug, Clone, Copy)]
struct ShareYield {
    scanned: u64,
    saved_pages: u64,
    pays: bool,
}

impl ShareYield {
    fn new(vm: &VmView) -> Self {
        Self { scanned: vm.share_scanned_pages, saved_pages: saved_pages(vm), pays: true }
    }

    /// Looks at `vm`'s counters: closes the window once it covers enough pages.
    fn update(&mut self, vm: &VmView) {
        // Two passes over what is resident: the scanner merges a page only once its hash
        // held from one pass to the next, so a first pass saves nothing whatever it finds.
        let window = (vm.resident_bytes / PAGE_SIZE * 2).max(YIELD_WINDOW_PAGES);
        let scanned = vm.share_scanned_pages.saturating_sub(self.scanned);
        if vm.share_scanned_pages < self.scanned {
            *self = Self::new(vm); // the VM restarted its counters
        } else if scanned >= window {
            let gained = saved_pages(vm).saturating_sub(self.saved_pages);
            *self = Self { pays: gained * 100 >= scanned * MIN_YIELD_PERCENT, ..Self::new(vm) };
        }
    }
}

fn saved_pages(vm: &VmView) -> u64 {
    vm.sharing_saved_bytes / PAGE_SIZE
}

/// What `vm` would hold unconstrained: what it consumes, plus what was compressed or
/// swapped from it (plus its balloon, which it would take back).
fn demand(vm: &VmView) -> u64 {
    vm.consumed_bytes + vm.compressed_bytes + vm.swapped_bytes + vm.ballooned_bytes
}

/// True if `vm` refaulted fast enough this tick to be thrashing (if it goes on).
fn refaulting(vm: &VmView) -> bool {
    let pages = demand(vm) / PAGE_SIZE;
    let rate = (pages * THRASH_PERCENT / 100).max(THRASH_MIN_REFAULTS);
    vm.refault_rate >= rate as f64
}

/// What the tax counts as `vm`'s active memory: its Active estimate, or all it wants once
/// it has thrashed for `ticks` ticks in a row.
fn active(vm: &VmView, ticks: u32) -> u64 {
    if ticks >= THRASH_TICKS {
        demand(vm)
    } else {
        vm.active_bytes
    }
}

/// What the policy remembers of one VM between ticks.
#[derive(Debug, Clone, Copy)]
struct Track {
    share: ShareYield,
    /// Ticks in a row the VM refaulted fast enough to be thrashing.
    thrash_ticks: u32,
}

/// ESX's policy, remembering what it last asked of each VM (Clear holds it).
#[derive(Debug, Default)]
pub struct Esx {
    params: PolicyParams,
    last: HashMap<String, VmAction>,
    tracks: HashMap<String, Track>,
}

impl Esx {
    /// The policy with `params` (the tax is capped at 99%).
    pub fn new(mut params: PolicyParams) -> Self {
        params.tax_percent = params.tax_percent.min(99);
        Self { params, last: HashMap::new(), tracks: HashMap::new() }
    }

    /// `short`: free memory is below the goal (Clear then reclaims too).
    fn act(&self, vm: &VmView, target: u64, state: MemState, short: bool) -> VmAction {
        let pays = self.tracks.get(&vm.name).is_none_or(|t| t.share.pays);
        let held = self.last.get(&vm.name).cloned().unwrap_or_default();
        let over = vm.consumed_bytes.saturating_sub(target);
        // What is not resident (cache slabs, pool pages) counts against the target too.
        let overhead = vm.consumed_bytes.saturating_sub(vm.resident_bytes);
        let resident_goal = target.saturating_sub(overhead);
        let balloon_room = vm.configured_bytes.saturating_sub(vm.reservation_bytes);
        let balloon_more = (vm.ballooned_bytes + over).min(balloon_room);
        let mut action = VmAction {
            target_bytes: target,
            alloc_wait_above_bytes: None,
            share_scan_rate: if state == MemState::High || !pays {
                self.params.share_rate_idle
            } else {
                self.params.share_rate_busy
            },
            ..held.clone()
        };
        let room = target.saturating_sub(vm.consumed_bytes);
        match state {
            MemState::High => {
                action.balloon_bytes = 0;
                action.reclaim_target_bytes = None;
            }
            // A VM that may have all it wants: nothing holds it back. (Its resident goal
            // would, by its cache's slabs, which shrink as its pages come back, and a
            // lever a few pages short of a busy VM's set makes it thrash.)
            _ if target >= demand(vm) => {
                action.balloon_bytes = 0;
                action.reclaim_target_bytes = None;
            }
            // Under target: ease the levers so that the VM can grow to it.
            _ if over == 0 => {
                action.balloon_bytes = held.balloon_bytes.saturating_sub(room);
                action.reclaim_target_bytes =
                    held.reclaim_target_bytes.map(|t| t.max(resident_goal));
            }
            // Clear holds, unless free memory fell below the goal: then VMs over target
            // are brought to it, so that the host settles above minFree, not at it.
            MemState::Clear if short => action.reclaim_target_bytes = Some(resident_goal),
            MemState::Clear => {}
            MemState::Soft if vm.balloon_ready => action.balloon_bytes = balloon_more,
            MemState::Soft => action.reclaim_target_bytes = Some(resident_goal),
            MemState::Hard | MemState::Low => {
                if vm.balloon_ready {
                    action.balloon_bytes = balloon_more;
                }
                action.reclaim_target_bytes = Some(resident_goal);
                if state == MemState::Low {
                    action.alloc_wait_above_bytes = Some(resident_goal);
                }
            }
        }
        if vm.consumed_bytes > vm.limit_bytes {
            let at_limit = vm.limit_bytes.saturating_sub(overhead);
            action.reclaim_target_bytes =
                Some(action.reclaim_target_bytes.map_or(at_limit, |t| t.min(at_limit)));
        }
        action
    }
}

impl Policy for Esx {
    fn name(&self) -> &'static str {
        "esx"
    }

    fn decide(&mut self, snap: &Snapshot) -> Vec<VmAction> {
        let mut tracks = std::mem::take(&mut self.tracks);
        self.tracks = snap
            .vms
            .iter()
            .map(|v| {
                let mut t = tracks
                    .remove(&v.name)
                    .unwrap_or(Track { share: ShareYield::new(v), thrash_ticks: 0 });
                t.share.update(v);
                t.thrash_ticks = if refaulting(v) { t.thrash_ticks.saturating_add(1) } else { 0 };
                (v.name.clone(), t)
            })
            .collect();
        let goal_free =
            snap.host.min_free_bytes.saturating_mul(self.params.goal_free_percent) / 100;
        let short = snap.host.free_bytes < i64::try_from(goal_free).unwrap_or(i64::MAX);
        let available = snap.host.budget_bytes.saturating_sub(goal_free);
        let claims: Vec<Claim> = snap
            .vms
            .iter()
            .map(|v| Claim {
                consumed: demand(v),
                active: active(v, self.tracks.get(&v.name).map_or(0, |t| t.thrash_ticks)),
                reservation: v.reservation_bytes,
                limit: v.limit_bytes,
                shares: v.shares,
            })
            .collect();
        let targets = shares::targets(&claims, available, self.params.tax_percent);
        let actions: Vec<VmAction> = (snap.vms.iter().zip(targets))
            .map(|(vm, target)| self.act(vm, target, snap.host.state, short))
            .collect();
        self.last =
            snap.vms.iter().zip(&actions).map(|(v, a)| (v.name.clone(), a.clone())).collect();
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::policy::HostView;

    const MIB: u64 = 1 << 20;

    fn vm(name: &str, consumed_mib: u64, balloon_ready: bool) -> VmView {
        VmView {
            name: name.into(),
            configured_bytes: 1024 * MIB,
            consumed_bytes: consumed_mib * MIB,
            resident_bytes: consumed_mib * MIB,
            limit_bytes: 1024 * MIB,
            shares: 5120,
            balloon_ready,
            ..Default::default()
        }
    }

    fn snap(state: MemState, vms: Vec<VmView>) -> Snapshot {
        Snapshot {
            host: HostView {
                budget_bytes: 1000 * MIB,
                free_bytes: 100 << 20, // above minFree: Clear holds
                min_free_bytes: 80 * MIB,
                state,
                // 1000 - 125% of 80 = 900 MiB available to the VMs.
            },
            vms,
        }
    }

    #[test]
    fn high_shares_in_the_background_and_reclaims_nothing() {
        let a = Esx::new(PolicyParams::default())
            .decide(&snap(MemState::High, vec![vm("a", 500, true)]));
        assert_eq!(a[0].share_scan_rate, PolicyParams::default().share_rate_idle);
        assert_eq!((a[0].balloon_bytes, a[0].reclaim_target_bytes), (0, None));
    }

    #[test]
    fn soft_balloons_a_vm_with_a_driver_and_compresses_one_without() {
        let vms = vec![vm("a", 500, true), vm("b", 500, false)];
        let a = Esx::new(PolicyParams::default()).decide(&snap(MemState::Soft, vms));
        // 1000 MiB held, 900 available, equal and idle: 450 each, 50 over.
        assert_eq!(a[0].target_bytes, 450 * MIB);
        assert_eq!((a[0].balloon_bytes, a[0].reclaim_target_bytes), (50 * MIB, None));
        assert_eq!((a[1].balloon_bytes, a[1].reclaim_target_bytes), (0, Some(450 * MIB)));
        assert_eq!(a[1].share_scan_rate, PolicyParams::default().share_rate_busy);
    }

    #[test]
    fn hard_balloons_and_compresses() {
        let a = Esx::new(PolicyParams::default())
            .decide(&snap(MemState::Hard, vec![vm("a", 1000, true)]));
        assert_eq!(a[0].balloon_bytes, 100 * MIB);
        assert_eq!(a[0].reclaim_target_bytes, Some(900 * MIB));
    }

    #[test]
    fn low_makes_only_the_vms_over_target_wait_for_new_memory() {
        let a = Esx::new(PolicyParams::default())
            .decide(&snap(MemState::Low, vec![vm("a", 600, false), vm("b", 200, false)]));
        // 800 held, 900 available: nobody is over target, nobody waits.
        assert_eq!((a[0].alloc_wait_above_bytes, a[1].alloc_wait_above_bytes), (None, None));
        let mut busy = vm("b", 600, false);
        busy.active_bytes = 600 * MIB;
        let a = Esx::new(PolicyParams::default())
            .decide(&snap(MemState::Low, vec![vm("a", 600, false), busy]));
        // The idle VM pays the tax: it is over target and waits at its resident goal.
        assert_eq!(a[0].alloc_wait_above_bytes, a[0].reclaim_target_bytes);
        assert!(a[0].alloc_wait_above_bytes.is_some());
        assert_eq!(a[1].alloc_wait_above_bytes, None);
        let hard = Esx::new(PolicyParams::default())
            .decide(&snap(MemState::Hard, vec![vm("a", 1000, false)]));
        assert_eq!(hard[0].alloc_wait_above_bytes, None);
    }

    #[test]
    fn memory_taken_early_flows_back_once_the_idle_vm_is_known() {
        // Hard, nothing known of Active yet: both VMs squeezed alike to 450.
        let mut p = Esx::new(PolicyParams::default());
        let first = p.decide(&snap(MemState::Hard, vec![vm("a", 500, false), vm("b", 500, false)]));
        assert_eq!(first[0].reclaim_target_bytes, Some(450 * MIB));
        assert_eq!(first[1].reclaim_target_bytes, Some(450 * MIB));
        // Later, 100 MiB of each swapped out; a is known idle and b busy. b may now have
        // all it wants (500): its lever is lifted; a's target falls to 400 and its lever
        // holds in Clear.
        let mut a = vm("a", 400, false);
        a.swapped_bytes = 100 * MIB;
        let mut b = vm("b", 400, false);
        b.swapped_bytes = 100 * MIB;
        b.active_bytes = 400 * MIB;
        let acts = p.decide(&snap(MemState::Clear, vec![a, b]));
        assert_eq!((acts[0].target_bytes, acts[1].target_bytes), (400 * MIB, 500 * MIB));
        assert_eq!(acts[1].reclaim_target_bytes, None);
        assert_eq!(acts[0].reclaim_target_bytes, Some(450 * MIB));
    }

    #[test]
    fn clear_reclaims_vms_over_target_while_free_memory_is_below_the_goal() {
        let mut p = Esx::new(PolicyParams::default());
        let mut s = snap(MemState::Clear, vec![vm("a", 1000, false)]);
        s.host.free_bytes = 100 << 20; // the goal: 125% of minFree (80): hold
        assert_eq!(p.decide(&s)[0].reclaim_target_bytes, None);
        s.host.free_bytes = 90 << 20;
        assert_eq!(p.decide(&s)[0].reclaim_target_bytes, Some(900 * MIB));
    }

    #[test]
    fn clear_holds_what_soft_asked_and_high_lets_go() {
        let mut p = Esx::new(PolicyParams::default());
        p.decide(&snap(MemState::Soft, vec![vm("b", 1000, false)]));
        // 100 MiB went to the swap file: b still wants 1000, more than the 900 available.
        let mut b = vm("b", 900, false);
        b.swapped_bytes = 100 * MIB;
        let held = p.decide(&snap(MemState::Clear, vec![b.clone()]));
        assert_eq!(held[0].reclaim_target_bytes, Some(900 * MIB));
        let released = p.decide(&snap(MemState::High, vec![b]));
        assert_eq!(released[0].reclaim_target_bytes, None);
    }

    #[test]
    fn a_thrashing_vm_counts_as_active_whatever_its_estimate() {
        // 500 MiB each, 900 available. The busy VM thrashes: its Active estimate has
        // collapsed to 100 MiB, as in the lab's idle-tax scenario.
        let idle = vm("idle", 500, false);
        let mut busy = vm("busy", 500, false);
        busy.active_bytes = 100 * MIB;
        let mut p = Esx::new(PolicyParams::default());
        let fooled = p.decide(&snap(MemState::Hard, vec![idle.clone(), busy.clone()]));
        // The tax sees 400 MiB of the busy VM as idle and takes from it too: 488 of 500.
        assert_eq!((fooled[0].target_bytes, fooled[1].target_bytes), (412 * MIB, 488 * MIB));
        // 1% of its 128,000 pages per second: 1,280 refaults/s. Just below: still fooled.
        busy.refault_rate = 1279.0;
        for _ in 0..THRASH_TICKS {
            let still = p.decide(&snap(MemState::Hard, vec![idle.clone(), busy.clone()]));
            assert_eq!(still[1].target_bytes, 488 * MIB);
        }
        // At the rate, for fewer ticks in a row than THRASH_TICKS (a one-off pass): fooled.
        busy.refault_rate = 1280.0;
        for _ in 1..THRASH_TICKS {
            let once = p.decide(&snap(MemState::Hard, vec![idle.clone(), busy.clone()]));
            assert_eq!(once[1].target_bytes, 488 * MIB);
        }
        let seen = p.decide(&snap(MemState::Hard, vec![idle.clone(), busy.clone()]));
        assert_eq!((seen[0].target_bytes, seen[1].target_bytes), (400 * MIB, 500 * MIB));
        // A tick without: the count starts again.
        busy.refault_rate = 0.0;
        p.decide(&snap(MemState::Hard, vec![idle.clone(), busy.clone()]));
        busy.refault_rate = 1280.0;
        let again = p.decide(&snap(MemState::Hard, vec![idle, busy]));
        assert_eq!(again[1].target_bytes, 488 * MIB);
        // A small VM needs 64 refaults/s to count.
        let mut tiny = vm("tiny", 4, false);
        tiny.refault_rate = 63.0;
        assert!(!refaulting(&tiny));
        tiny.refault_rate = 64.0;
        assert!(refaulting(&tiny));
        assert_eq!((active(&tiny, THRASH_TICKS - 1), active(&tiny, THRASH_TICKS)), (0, 4 * MIB));
    }

    #[test]
    fn sharing_that_saves_nothing_goes_back_to_the_idle_rate_until_it_pays_again() {
        let (idle, busy) =
            (PolicyParams::default().share_rate_idle, PolicyParams::default().share_rate_busy);
        let mut p = Esx::new(PolicyParams::default());
        let mut v = vm("a", 500, false);
        let rate = |p: &mut Esx, v: &VmView| {
            p.decide(&snap(MemState::Clear, vec![v.clone()]))[0].share_scan_rate
        };
        assert_eq!(rate(&mut p, &v), busy, "first the scanner looks");
        // Two passes over its 500 MiB resident are 256,000 pages: the first pass alone
        // (which merges nothing: hashes must hold from one pass to the next) is no window.
        v.share_scanned_pages = 250_000;
        assert_eq!(rate(&mut p, &v), busy);
        // A window that saved 0.5%: not worth the busy rate.
        v.share_scanned_pages = 260_000;
        v.sharing_saved_bytes = 1300 * PAGE_SIZE;
        assert_eq!(rate(&mut p, &v), idle);
        // The next window, at the idle rate, saves 2%: the busy rate again.
        v.share_scanned_pages = 520_000;
        v.sharing_saved_bytes = (1300 + 5200) * PAGE_SIZE;
        assert_eq!(rate(&mut p, &v), busy);
        // Pages unshared (copy-on-write) count as nothing saved, not as a wrap-around.
        v.share_scanned_pages = 780_000;
        v.sharing_saved_bytes = 0;
        assert_eq!(rate(&mut p, &v), idle);
        // High scans at the idle rate whatever it pays.
        let mut fresh = Esx::new(PolicyParams::default());
        assert_eq!(
            fresh.decide(&snap(MemState::High, vec![vm("b", 1, false)]))[0].share_scan_rate,
            idle
        );
    }

    #[test]
    fn the_resident_goal_leaves_room_for_the_cache() {
        let mut b = vm("b", 1000, false);
        b.resident_bytes = 960 * MIB; // 40 MiB of compression cache
        let a = Esx::new(PolicyParams::default()).decide(&snap(MemState::Hard, vec![b]));
        assert_eq!(a[0].reclaim_target_bytes, Some(860 * MIB));
    }

    #[test]
    fn a_vm_over_its_limit_is_reclaimed_even_in_high() {
        let mut v = vm("a", 500, false);
        v.limit_bytes = 256 * MIB;
        let a = Esx::new(PolicyParams::default()).decide(&snap(MemState::High, vec![v]));
        assert_eq!(a[0].reclaim_target_bytes, Some(256 * MIB));
    }

    #[test]
    fn the_balloon_never_reaches_into_the_reservation() {
        let mut v = vm("a", 1000, true);
        v.configured_bytes = 1000 * MIB;
        v.reservation_bytes = 950 * MIB;
        let a = Esx::new(PolicyParams::default()).decide(&snap(MemState::Soft, vec![v]));
        assert_eq!(a[0].target_bytes, 950 * MIB);
        assert_eq!(a[0].balloon_bytes, 50 * MIB);
    }
}
