//! `ebb lab sweep`: how far each policy can overcommit a scenario before its guests' hot loops
//! slow down by more than 5% and 10%.
//!
//! For each scenario, two unconstrained runs give each VM's hot-loop work with all the memory
//! it wants (their mean is the baseline; their difference is the noise, reported). Then each
//! policy runs the scenario at shrinking budgets, fractions of the unconstrained runs' peak
//! consumption (largest first; the scenario's events scaled alike). A budget **holds** for a
//! threshold when the run kept its budget, every guest verified every page, and no VM's hot
//! loop slowed down by more than the threshold. A policy's figure is the smallest budget at
//! which it and every larger budget held, given as the overcommit ratio (the VMs' configured
//! memory over that budget) and the memory saved (that budget against the unconstrained
//! peak, as Meta's TMO reports its savings). A policy stops once a budget fails the looser
//! threshold: smaller ones would not count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;

use super::runner::{self, file_tag, RunBudget};
use super::spec::PolicySpec;
use super::summary::{slowdowns, worst, Summary};
use super::{work_dir, LabError, LabOptions};
use crate::mm::stats::round_u64;

/// The slowdowns the sweep reports an overcommit for, percent.
pub const THRESHOLDS: [f64; 2] = [5.0, 10.0];
/// Default budgets, as fractions of the unconstrained peak, largest first.
pub const DEFAULT_FRACTIONS: [f64; 7] = [1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5];

/// One policy's run at one budget.
#[derive(Debug, Clone)]
pub struct Step {
    /// The budget, bytes.
    pub budget_bytes: u64,
    /// The worst VM's hot-loop slowdown, percent.
    pub worst_slowdown: f64,
    /// The run kept its budget and every checksum was right.
    pub kept: bool,
}

impl Step {
    fn holds(&self, threshold: f64) -> bool {
        self.kept && self.worst_slowdown <= threshold
    }
}

/// What the sweep found for one scenario.
#[derive(Debug, Clone, Default)]
pub struct ScenarioSweep {
    /// The scenario.
    pub scenario: String,
    /// The VMs' configured memory, bytes.
    pub configured_bytes: u64,
    /// The unconstrained runs' peak consumption (the larger of the two), bytes.
    pub peak_bytes: u64,
    /// The two unconstrained runs' largest per-VM difference, percent of their mean.
    pub noise_percent: f64,
    /// Each policy's steps, largest budget first.
    pub steps: Vec<(String, Vec<Step>)>,
}

impl ScenarioSweep {
    /// The smallest budget at which `steps` held `threshold`, and every larger one did.
    pub fn held_to(steps: &[Step], threshold: f64) -> Option<u64> {
        steps.iter().take_while(|s| s.holds(threshold)).last().map(|s| s.budget_bytes)
    }

    fn figure(&self, steps: &[Step], threshold: f64) -> String {
        match Self::held_to(steps, threshold) {
            Some(b) => format!(
                "{:.2}x ({:.0}% saved)",
                self.configured_bytes as f64 / b as f64,
                100.0 * (1.0 - b as f64 / self.peak_bytes.max(1) as f64)
            ),
            None => "none".into(),
        }
    }

    /// The scenario's table: a row per policy.
    pub fn table(&self) -> String {
        let mut out = format!(
            "configured {} MiB, unconstrained peak {} MiB, baseline noise {:.0}%\n\n| policy | overcommit at <= 5% slowdown | at <= 10% | budget MiB: worst slowdown |\n|---|---|---|---|\n",
            self.configured_bytes >> 20,
            self.peak_bytes >> 20,
            self.noise_percent
        );
        for (policy, steps) in &self.steps {
            let runs: Vec<String> = steps
                .iter()
                .map(|s| {
                    let mark = if s.kept { "" } else { " (budget broken or FAILED)" };
                    format!("{}: {:.0}%{mark}", s.budget_bytes >> 20, s.worst_slowdown)
                })
                .collect();
            let _ = writeln!(
                out,
                "| {policy} | {} | {} | {} |",
                self.figure(steps, THRESHOLDS[0]),
                self.figure(steps, THRESHOLDS[1]),
                runs.join(", ")
            );
        }
        out
    }
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Scenarios, policies, scale, executable, progress (its `plot` is not used).
    pub lab: LabOptions,
    /// Budgets as fractions of the unconstrained peak, largest first.
    pub fractions: Vec<f64>,
}

/// The mean of two unconstrained runs' per-VM progress, and their largest difference in
/// percent of it.
fn baseline(a: &Summary, b: &Summary) -> (Summary, f64) {
    let mut noise = 0.0f64;
    let mut mean = BTreeMap::new();
    for (name, &pa) in &a.vm_progress {
        let pb = b.vm_progress.get(name).copied().unwrap_or(0);
        let m = (pa + pb) / 2;
        if m > 0 {
            noise = noise.max(100.0 * pa.abs_diff(pb) as f64 / m as f64);
        }
        mean.insert(name.clone(), m);
    }
    (Summary { vm_progress: mean, ..a.clone() }, noise)
}

/// Sweeps every scenario of `opts` under every policy, writing each scenario's table to
/// `out` as soon as it is done.
///
/// # Errors
/// A scenario is bad, a policy unknown, a run fails to happen.
pub fn sweep(opts: &SweepOptions, out: &mut dyn Write) -> Result<Vec<ScenarioSweep>, LabError> {
    let (policies, scenarios) = super::load(&opts.lab)?;
    let work_dir = work_dir()?;
    let work = work_dir.path();
    let mut found = Vec::new();
    for s in &scenarios {
        let one = |spec: &PolicySpec, budget: RunBudget, tag: &str| {
            if opts.lab.progress {
                eprint!("\r\x1b[K{} / {tag}", s.name);
            }
            runner::run(&opts.lab.exe, s, spec, budget, work, &file_tag(tag), |_| {})
                .map(|r| Summary::of(&r))
                .map_err(|source| LabError::Run {
                    scenario: s.name.clone(),
                    policy: tag.to_owned(),
                    source,
                })
        };
        let esx = PolicySpec::plain("esx");
        let a = one(&esx, RunBudget::Unconstrained, "unconstrained")?;
        let b = one(&esx, RunBudget::Unconstrained, "unconstrained-2")?;
        let (base, noise_percent) = baseline(&a, &b);
        let peak_bytes = round_u64(a.peak_mib.max(b.peak_mib) * f64::from(1u32 << 20));
        let mut result = ScenarioSweep {
            scenario: s.name.clone(),
            configured_bytes: s.configured_bytes(),
            peak_bytes,
            noise_percent,
            steps: Vec::new(),
        };
        for spec in &policies {
            let mut steps = Vec::new();
            for &f in &opts.fractions {
                let budget_bytes = round_u64(peak_bytes as f64 * f);
                let times = budget_bytes as f64 / s.budget_bytes.max(1) as f64;
                let tag = format!("{}-{:.0}M", spec.label, budget_bytes >> 20);
                let run = one(spec, RunBudget::Times(times), &tag)?;
                let step = Step {
                    budget_bytes,
                    worst_slowdown: worst(&slowdowns(&run, &base)).unwrap_or(0.0),
                    kept: run.correct && !run.broke_budget,
                };
                let loosest = THRESHOLDS[THRESHOLDS.len() - 1];
                let done = !step.holds(loosest);
                steps.push(step);
                if done {
                    break;
                }
            }
            result.steps.push((spec.label.clone(), steps));
        }
        if opts.lab.progress {
            eprint!("\r\x1b[K");
        }
        let _ = writeln!(out, "## {}: overcommit within a slowdown\n\n{}", s.name, result.table());
        found.push(result);
    }
    let _ = write!(out, "{}", overall(&found));
    drop(work_dir);
    Ok(found)
}

/// The table of every scenario's figures: a row per policy, a column per scenario.
pub fn overall(found: &[ScenarioSweep]) -> String {
    let Some(first) = found.first() else { return String::new() };
    let mut out = String::from("## Overcommit at <= 5% / <= 10% hot-loop slowdown\n\n| policy |");
    for f in found {
        let _ = write!(out, " {} |", f.scenario);
    }
    out += "\n|---|";
    out += &"---|".repeat(found.len());
    out.push('\n');
    for (i, (policy, _)) in first.steps.iter().enumerate() {
        let _ = write!(out, "| {policy} |");
        for f in found {
            let cell = f.steps.get(i).map_or_else(String::new, |(_, steps)| {
                let ratio = |t| {
                    ScenarioSweep::held_to(steps, t).map_or_else(
                        || "-".to_owned(),
                        |b| format!("{:.2}x", f.configured_bytes as f64 / b as f64),
                    )
                };
                format!("{} / {}", ratio(THRESHOLDS[0]), ratio(THRESHOLDS[1]))
            });
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// The fractions `text` gives (`1.2,1.0,0.8`), checked: each in (0, 4], largest first.
///
/// # Errors
/// Not numbers, out of range, or none.
pub fn parse_fractions(text: &str) -> Result<Vec<f64>, String> {
    let mut v: Vec<f64> = text
        .split(',')
        .map(|t| {
            let f: f64 = t.trim().parse().map_err(|_| format!("{t:?} is not a number"))?;
            if f > 0.0 && f <= 4.0 {
                Ok(f)
            } else {
                Err(format!("{f} is not in (0, 4]"))
            }
        })
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err("no budgets".into());
    }
    v.sort_by(|a, b| b.total_cmp(a));
    v.dedup();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(mib: u64, slow: f64, kept: bool) -> Step {
        Step { budget_bytes: mib << 20, worst_slowdown: slow, kept }
    }

    #[test]
    fn a_policy_holds_to_the_last_budget_before_its_first_failure() {
        let steps =
            [step(100, 1.0, true), step(80, 4.0, true), step(60, 8.0, true), step(50, 3.0, true)];
        // 60 MiB slowed by 8%: past 5%, so 50 MiB (3%) does not count for 5%.
        assert_eq!(ScenarioSweep::held_to(&steps, 5.0), Some(80 << 20));
        assert_eq!(ScenarioSweep::held_to(&steps, 10.0), Some(50 << 20));
        let broken = [step(100, 1.0, true), step(80, 0.0, false)];
        assert_eq!(ScenarioSweep::held_to(&broken, 10.0), Some(100 << 20));
        assert_eq!(ScenarioSweep::held_to(&[step(100, 20.0, true)], 10.0), None);
        let s = ScenarioSweep {
            scenario: "x".into(),
            configured_bytes: 200 << 20,
            peak_bytes: 100 << 20,
            noise_percent: 2.0,
            steps: vec![("esx".into(), steps.to_vec())],
        };
        let t = s.table();
        assert!(
            t.contains(
                "| esx | 2.50x (20% saved) | 4.00x (50% saved) | 100: 1%, 80: 4%, 60: 8%, 50: 3% |"
            ),
            "{t}"
        );
        let o = overall(&[s]);
        assert!(o.contains("| esx | 2.50x / 4.00x |"), "{o}");
    }

    #[test]
    fn fractions_are_checked_and_sorted() {
        assert_eq!(parse_fractions("0.8,1.2,1.0").unwrap(), [1.2, 1.0, 0.8]);
        assert!(parse_fractions("0").unwrap_err().contains("not in (0, 4]"));
        assert!(parse_fractions("x").unwrap_err().contains("\"x\" is not a number"));
    }
}
