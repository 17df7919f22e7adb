//! What a run comes to: host memory against the budget, time in each state, what each
//! reclaimer took, refaults, the guests' progress against the unconstrained run, ebb's CPU,
//! free memory at the end; and the table that compares policies.

use std::fmt::Write as _;

use super::runner::Run;
use crate::host::report::HostReport;

const MIB: f64 = (1u64 << 20) as f64;

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
        }
    }
}

/// The comparison table of one scenario: a row per policy, progress relative to
/// `baseline` (the unconstrained run's progress).
pub fn table(summaries: &[Summary], baseline: Option<u64>) -> String {
    let mut out = String::from(
        "| policy | peak / mean MiB (budget) | ms High/Clear/Soft/Hard/Low | MiB ballooned / compressed / swapped / shared | refaults | progress | ebb CPU | free at end (minFree) | checksums |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in summaries {
        let progress = match baseline {
            Some(b) if b > 0 => format!("{:.2}x", s.progress as f64 / b as f64),
            _ => format!("{}", s.progress),
        };
        let states: Vec<String> = s.state_ms.iter().map(u64::to_string).collect();
        let [b, z, w, sh] = s.reclaimed_mib;
        let _ = writeln!(
            out,
            "| {} | {:.0} / {:.0} ({:.0}) | {} | {b:.0} / {z:.0} / {w:.0} / {sh:.0} | {} | {progress} | {:.0} ms | {:.1} ({:.1}) | {} |",
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

    #[test]
    fn a_run_sums_up_and_compares_with_the_baseline() {
        let run = Run {
            policy: "esx".into(),
            reports: vec![
                report(0, 10, true, 0),
                report(100, 30, true, 50),
                report(200, 0, false, 100),
            ],
            exit_code: Some(0),
            timed_out: false,
            wall: std::time::Duration::from_millis(200),
        };
        let s = Summary::of(&run);
        assert_eq!((s.peak_mib, s.progress, s.refaults), (30.0, 100, 10));
        assert_eq!(s.reclaimed_mib[1], 3.0);
        assert_eq!((s.end_free_mib, s.end_min_free_mib), (10.0, 6.0));
        assert!(s.correct);
        let t = table(&[s], Some(200));
        assert!(
            t.contains("| esx | 30 / 13 (100) | 200/0/0/0/0 | 0 / 3 / 0 / 0 | 10 | 0.50x |"),
            "{t}"
        );
        assert!(t.ends_with("| ok |\n"), "{t}");
    }
}
