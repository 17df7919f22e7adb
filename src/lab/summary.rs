//! What a run comes to: host memory against the budget (and whether the run broke it), time
//! in each state, what each reclaimer took, refaults, the guests' progress and their hot
//! loops' slowdown against the unconstrained run, ebb's CPU, free memory at the end; and the
//! table that compares policies.
//!
//! A run **breaks its budget** when the VMs consume more than [`BUDGET_SLACK_PERCENT`] over
//! it for longer than [`BUDGET_GRACE`] (or three ticks, if longer) at a stretch: a policy
//! acts once per tick, and reclaim takes time, so a burst of first touches may overshoot
//! briefly; a policy that lets it last has not kept the budget, and its progress is not
//! compared with the others' as if it had.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::runner::Run;
use crate::host::report::HostReport;

const MIB: f64 = (1u64 << 20) as f64;

/// How far over its budget a run may go without breaking it, percent of the budget.
pub const BUDGET_SLACK_PERCENT: u64 = 5;
/// How long a run may stay over its budget and slack at a stretch (or three ticks).
pub const BUDGET_GRACE: Duration = Duration::from_secs(1);

/// The figures of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// The policy (or `unconstrained`).
    pub policy: String,
    /// Most and mean host memory the VMs consumed, MiB.
    pub peak_mib: f64,
    /// Mean of the same over the run.
    pub mean_mib: f64,
    /// The budget at the end, MiB.
    pub budget_mib: f64,
    /// Milliseconds in High, Clear, Soft, Hard, Low.
    pub state_ms: [u64; 5],
    /// Most guest memory in balloons, compressed, swapped, and saved by sharing, MiB.
    pub reclaimed_mib: [f64; 4],
    /// Evicted pages the guests touched again.
    pub refaults: u64,
    /// The guests' progress counters summed (pages rewritten).
    pub progress: u64,
    /// ebb's CPU: the host's ticks and the VMs' memory threads, ms.
    pub cpu_ms: f64,
    /// Free memory at the end: the median over the second half of the time all VMs ran,
    /// MiB.
    pub end_free_mib: f64,
    /// minFree then.
    pub end_min_free_mib: f64,
    /// Every guest verified every page and the run ended in time.
    pub correct: bool,
    /// The longest stretch the VMs consumed more than the budget and its slack, ms.
    pub over_budget_ms: u64,
    /// The most they consumed over the budget, MiB.
    pub over_budget_mib: f64,
    /// The run broke its budget (see the module's docs).
    pub broke_budget: bool,
    /// Each VM's progress counter at its highest (its hot loop's work).
    pub vm_progress: BTreeMap<String, u64>,
    /// With repeated runs (this one the median), the least and most progress of them.
    pub progress_spread: Option<(u64, u64)>,
}

/// The longest stretch of `reports` with the running VMs over the budget and its slack (ms),
/// and the most they were over the budget (bytes).
pub fn over_budget(reports: &[HostReport]) -> (u64, u64) {
    let (mut longest, mut most, mut since) = (0u64, 0u64, None::<u64>);
    for r in reports {
        let consumed: u64 = r.vms.iter().filter(|v| v.running).map(|v| v.consumed_bytes).sum();
        let slack = r.budget_bytes / 100 * BUDGET_SLACK_PERCENT;
        most = most.max(consumed.saturating_sub(r.budget_bytes));
        if consumed > r.budget_bytes.saturating_add(slack) {
            let start = *since.get_or_insert(r.t_ms);
            longest = longest.max(r.t_ms - start.min(r.t_ms));
        } else {
            since = None;
        }
    }
    (longest, most)
}

/// Each VM's hot-loop slowdown under `run` against `baseline`, percent: how much less of its
/// loop it did (the loop runs for a fixed time, so less work is a slower loop). VMs without
/// a loop in the baseline are left out.
pub fn slowdowns(run: &Summary, baseline: &Summary) -> Vec<f64> {
    baseline
        .vm_progress
        .iter()
        .filter(|(_, &b)| b > 0)
        .map(|(name, &b)| {
            let p = run.vm_progress.get(name).copied().unwrap_or(0);
            100.0 * (1.0 - p as f64 / b as f64)
        })
        .collect()
}

/// The worst (largest) of `slowdowns`, if any.
pub fn worst(slowdowns: &[f64]) -> Option<f64> {
    slowdowns.iter().copied().reduce(f64::max)
}

fn peak(reports: &[HostReport], f: impl Fn(&crate::host::report::VmReport) -> u64) -> u64 {
    reports.iter().map(|r| r.vms.iter().map(&f).sum::<u64>()).max().unwrap_or(0)
}

/// The reports of the second half of the time every VM that ever started was running:
/// the policy's steady state, after it had time to react, before the first VM ended.
pub fn end_reports(reports: &[HostReport]) -> Vec<&HostReport> {
    let most = reports.iter().map(|r| r.vms.len()).max().unwrap_or(0);
    let full: Vec<&HostReport> =
        reports.iter().filter(|r| r.vms.len() == most && r.vms.iter().all(|v| v.running)).collect();
    full[full.len() / 2..].to_vec()
}

/// Median free memory and minFree of `end`, bytes: a burst of faults (a guest's final
/// verification bringing its pages back) does not make the end.
fn median_free(end: &[&HostReport]) -> (i64, u64) {
    let mut free: Vec<i64> = end.iter().map(|r| r.free_bytes).collect();
    free.sort_unstable();
    let min_free = end.last().map_or(0, |r| r.min_free_bytes);
    (free.get(free.len() / 2).copied().unwrap_or(0), min_free)
}

impl Summary {
    /// The figures of `run`.
    pub fn of(run: &Run) -> Self {
        let reports = &run.reports;
        let running = |r: &HostReport| {
            r.vms.iter().filter(|v| v.running).map(|v| v.consumed_bytes).sum::<u64>()
        };
        let consumed: Vec<u64> = reports.iter().map(running).collect();
        let last = reports.last().cloned().unwrap_or_default();
        let mut per_vm_max = std::collections::HashMap::<&str, (u64, u64, f64)>::new();
        for r in reports {
            for v in &r.vms {
                let e = per_vm_max.entry(&v.name).or_default();
                e.0 = e.0.max(v.refaults);
                e.1 = e.1.max(v.guest_progress.unwrap_or(0));
                e.2 = e.2.max(v.memory_cpu_ms);
            }
        }
        let (end_free, end_min_free) = median_free(&end_reports(reports));
        let (over_ms, over_bytes) = over_budget(reports);
        let grace = BUDGET_GRACE.max(run.tick * 3);
        Summary {
            policy: run.policy.clone(),
            peak_mib: consumed.iter().copied().max().unwrap_or(0) as f64 / MIB,
            mean_mib: consumed.iter().sum::<u64>() as f64 / consumed.len().max(1) as f64 / MIB,
            budget_mib: last.budget_bytes as f64 / MIB,
            state_ms: last.state_ms,
            reclaimed_mib: [
                peak(reports, |v| v.ballooned_bytes) as f64 / MIB,
                peak(reports, |v| v.compressed_bytes) as f64 / MIB,
                peak(reports, |v| v.swapped_bytes) as f64 / MIB,
                peak(reports, |v| v.sharing_saved_bytes) as f64 / MIB,
            ],
            refaults: per_vm_max.values().map(|e| e.0).sum(),
            progress: per_vm_max.values().map(|e| e.1).sum(),
            cpu_ms: last.host_cpu_ms + per_vm_max.values().map(|e| e.2).sum::<f64>(),
            end_free_mib: end_free as f64 / MIB,
            end_min_free_mib: end_min_free as f64 / MIB,
            correct: run.exit_code == Some(0) && !run.timed_out,
            over_budget_ms: over_ms,
            over_budget_mib: over_bytes as f64 / MIB,
            broke_budget: u128::from(over_ms) > grace.as_millis(),
            vm_progress: per_vm_max.iter().map(|(n, e)| ((*n).to_owned(), e.1)).collect(),
            progress_spread: None,
        }
    }
}

/// The comparison table of one scenario: a row per policy, progress and slowdowns against
/// `baseline` (the unconstrained run). A run that broke its budget has its progress struck
/// through: it bought it with memory it was not given.
pub fn table(summaries: &[Summary], baseline: Option<&Summary>) -> String {
    let mut out = String::from(
        "| policy | peak / mean MiB (budget) | budget | ms High/Clear/Soft/Hard/Low | MiB ballooned / compressed / swapped / shared | refaults | progress | hot-loop slowdown worst / mean | ebb CPU | free at end (minFree) | checksums |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in summaries {
        let ratio = |p: u64| match baseline.map(|b| b.progress) {
            Some(b) if b > 0 => format!("{:.2}x", p as f64 / b as f64),
            _ => format!("{p}"),
        };
        let mut progress = ratio(s.progress);
        if let Some((lo, hi)) = s.progress_spread {
            progress = format!("{progress} ({}-{})", ratio(lo), ratio(hi));
        }
        let slow = baseline.map(|b| slowdowns(s, b)).unwrap_or_default();
        let slowdown = match worst(&slow) {
            Some(w) => {
                let mean = slow.iter().sum::<f64>() / slow.len() as f64;
                format!("{w:.0}% / {mean:.0}%")
            }
            None => "-".into(),
        };
        let budget = if s.broke_budget {
            progress = format!("~~{progress}~~");
            format!(
                "**broken**: {:.1} s over by up to {:.0} MiB",
                s.over_budget_ms as f64 / 1000.0,
                s.over_budget_mib
            )
        } else {
            "kept".into()
        };
        let states: Vec<String> = s.state_ms.iter().map(u64::to_string).collect();
        let [b, z, w, sh] = s.reclaimed_mib;
        let _ = writeln!(
            out,
            "| {} | {:.0} / {:.0} ({:.0}) | {budget} | {} | {b:.0} / {z:.0} / {w:.0} / {sh:.0} | {} | {progress} | {slowdown} | {:.0} ms | {:.1} ({:.1}) | {} |",
            s.policy,
            s.peak_mib,
            s.mean_mib,
            s.budget_mib,
            states.join("/"),
            s.refaults,
            s.cpu_ms,
            s.end_free_mib,
            s.end_min_free_mib,
            if s.correct { "ok" } else { "FAILED" },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::report::VmReport;

    fn report(t_ms: u64, consumed: u64, running: bool, progress: u64) -> HostReport {
        HostReport {
            t_ms,
            budget_bytes: 100 << 20,
            free_bytes: 10 << 20,
            min_free_bytes: 6 << 20,
            state_ms: [t_ms, 0, 0, 0, 0],
            vms: vec![VmReport {
                name: "a".into(),
                running,
                consumed_bytes: consumed << 20,
                compressed_bytes: 3 << 20,
                guest_progress: Some(progress),
                refaults: progress / 10,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn run(policy: &str, reports: Vec<HostReport>) -> Run {
        Run {
            policy: policy.into(),
            tick: Duration::from_millis(100),
            file_tag: policy.into(),
            reports,
            exit_code: Some(0),
            timed_out: false,
            wall: Duration::from_millis(200),
        }
    }

    #[test]
    fn a_run_sums_up_and_compares_with_the_baseline() {
        let s = Summary::of(&run(
            "esx",
            vec![report(0, 10, true, 0), report(100, 30, true, 50), report(200, 0, false, 100)],
        ));
        assert_eq!((s.peak_mib, s.progress, s.refaults), (30.0, 100, 10));
        assert_eq!(s.reclaimed_mib[1], 3.0);
        assert_eq!((s.end_free_mib, s.end_min_free_mib), (10.0, 6.0));
        assert!(s.correct && !s.broke_budget);
        let base = Summary { progress: 200, vm_progress: [("a".into(), 400)].into(), ..s.clone() };
        assert_eq!(slowdowns(&s, &base), [75.0]);
        let t = table(&[s], Some(&base));
        assert!(
            t.contains("| esx | 30 / 13 (100) | kept | 200/0/0/0/0 | 0 / 3 / 0 / 0 | 10 | 0.50x | 75% / 75% |"),
            "{t}"
        );
        assert!(t.ends_with("| ok |\n"), "{t}");
    }

    #[test]
    fn a_run_long_over_its_budget_broke_it_and_its_progress_is_struck() {
        // 100 MiB budget, 5% slack: 106 MiB is over it. 0.9 s over, then under, then 1.2 s.
        let mut reports: Vec<HostReport> =
            (0..=30).map(|i| report(i * 100, if i <= 9 { 106 } else { 90 }, true, i)).collect();
        let kept = Summary::of(&run("a", reports.clone()));
        assert_eq!((kept.over_budget_ms, kept.broke_budget), (900, false));
        assert_eq!(kept.over_budget_mib, 6.0);
        for r in &mut reports[15..=27] {
            r.vms[0].consumed_bytes = 140 << 20;
        }
        let broke = Summary::of(&run("b", reports.clone()));
        assert_eq!((broke.over_budget_ms, broke.broke_budget), (1200, true));
        assert_eq!(broke.over_budget_mib, 40.0);
        // 105 MiB is within the slack however long it lasts.
        let within: Vec<HostReport> = (0..30).map(|i| report(i * 100, 105, true, i)).collect();
        assert!(!Summary::of(&run("c", within)).broke_budget);
        // Three ticks of a slow policy are its grace, if longer than a second.
        let mut slow = run("d", reports);
        slow.tick = Duration::from_millis(500);
        assert!(!Summary::of(&slow).broke_budget);
        let t = table(std::slice::from_ref(&broke), Some(&kept));
        assert!(t.contains("| **broken**: 1.2 s over by up to 40 MiB |"), "{t}");
        assert!(t.contains("| ~~1.00x~~ |"), "{t}");
    }
}
