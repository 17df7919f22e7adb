//! `ebb lab`: run scenarios under several policies with the real host and compare them.
//!
//! | file | owns |
//! |---|---|
//! | `scenario.rs` | scenario files: parsing, checks, scaling, the host description they become |
//! | `spec.rs` | policy specs: a policy and its knobs (`esx:tax=0`) |
//! | `runner.rs` | one run: a real `ebb host`, the scenario's events on time, the reports back |
//! | `summary.rs` | a run's figures, whether it kept its budget, and the table comparing policies |
//! | `sweep.rs` | the overcommit a policy reaches within a slowdown: runs at shrinking budgets |
//! | `chart.rs` | the PNG charts |
//!
//! Every scenario also runs once unconstrained (twice the VMs' memory as budget, no events),
//! so that the guests' progress under each policy reads as a fraction of what they do with
//! all the memory they want.

pub mod chart;
pub mod runner;
pub mod scenario;
pub mod spec;
pub mod summary;
pub mod sweep;
pub mod timeline;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host::rundir::PrivateDir;
use runner::{file_tag, RunBudget};
use scenario::Scenario;
use spec::PolicySpec;
use summary::Summary;

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A scenario is bad.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// A run failed to happen.
    #[error("{scenario} under {policy}: {source}")]
    Run {
        /// The scenario.
        scenario: String,
        /// The policy.
        policy: String,
        /// Why.
        source: runner::RunError,
    },
    /// A chart could not be drawn.
    #[error(transparent)]
    Chart(#[from] chart::ChartError),
    /// An unknown policy or knob.
    #[error(transparent)]
    Policy(#[from] spec::SpecError),
    /// The work or chart directory.
    #[error("{path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Scenario files.
    pub scenarios: Vec<PathBuf>,
    /// Policy specs (none: every shipped policy).
    pub policies: Vec<String>,
    /// Where to write charts.
    pub plot: Option<PathBuf>,
    /// Sizes and times multiplied by this.
    pub scale: f64,
    /// The `ebb` executable.
    pub exe: PathBuf,
    /// Show progress on stderr.
    pub progress: bool,
    /// Runs of each policy (and of the baseline); the row shows the median's.
    pub repeat: usize,
}

/// How the runs went.
#[derive(Debug, Default)]
pub struct LabOutcome {
    /// Each scenario's name and its summaries (unconstrained first).
    pub results: Vec<(String, Vec<Summary>)>,
    /// Chart files written.
    pub charts: Vec<PathBuf>,
}

impl LabOutcome {
    /// True if every guest of every run verified every page in time.
    pub fn all_correct(&self) -> bool {
        self.results.iter().all(|(_, s)| s.iter().all(|x| x.correct))
    }
}

fn dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Dir { path: path.to_owned(), source }
}

/// The lab's work directory: private, removed when the guard drops.
fn work_dir() -> Result<PrivateDir, LabError> {
    PrivateDir::new("ebb-lab-").map_err(dir_error(&std::env::temp_dir()))
}

/// The run of `tries` (at least one) whose guests progressed the median amount, and the
/// least and most progress of them all (None for one try).
fn median_run(mut tries: Vec<runner::Run>) -> (runner::Run, Option<(u64, u64)>) {
    let mut progress: Vec<(u64, usize)> =
        tries.iter().enumerate().map(|(i, r)| (Summary::of(r).progress, i)).collect();
    progress.sort_unstable();
    let spread = (tries.len() > 1).then(|| (progress[0].0, progress[progress.len() - 1].0));
    let (_, median) = progress[progress.len() / 2];
    (tries.swap_remove(median), spread)
}

/// The policy specs (every shipped policy if none) and the scenarios of `opts`.
fn load(opts: &LabOptions) -> Result<(Vec<PolicySpec>, Vec<Scenario>), LabError> {
    let names = crate::host::policy::POLICY_NAMES;
    let policies: Vec<PolicySpec> = if opts.policies.is_empty() {
        names.iter().map(|n| PolicySpec::plain(n)).collect()
    } else {
        opts.policies.iter().map(|p| PolicySpec::parse(p)).collect::<Result<_, _>>()?
    };
    let scenarios =
        opts.scenarios.iter().map(|p| Scenario::load(p, opts.scale)).collect::<Result<_, _>>()?;
    Ok((policies, scenarios))
}

/// Runs every scenario of `opts` under every policy, writing each scenario's table to
/// `out` as soon as it is done.
///
/// # Errors
/// A scenario is bad, a policy unknown, a run or a chart fails.
pub fn run(opts: &LabOptions, out: &mut dyn Write) -> Result<LabOutcome, LabError> {
    let (policies, scenarios) = load(opts)?;
    let work_dir = work_dir()?;
    let work = work_dir.path();
    if let Some(dir) = &opts.plot {
        std::fs::create_dir_all(dir).map_err(dir_error(dir))?;
    }
    let repeat = opts.repeat.max(1);
    let runs_each = (policies.len() + 1) * repeat;
    let total_ms: u64 =
        scenarios.iter().map(|s| s.duration_ms.saturating_mul(runs_each as u64)).sum();
    let mut done_ms = 0u64;
    let mut outcome = LabOutcome::default();
    let result = (|| {
        for s in &scenarios {
            let mut runs = Vec::new();
            let baseline = PolicySpec::plain("esx");
            for (i, spec) in std::iter::once(&baseline).chain(&policies).enumerate() {
                let unconstrained = i == 0;
                let label = if unconstrained { "unconstrained" } else { spec.label.as_str() };
                let budget =
                    if unconstrained { RunBudget::Unconstrained } else { RunBudget::Times(1.0) };
                let mut tries = Vec::new();
                for k in 1..=repeat {
                    let done = done_ms;
                    let show = |elapsed: Duration| {
                        if opts.progress {
                            let e = done + u64::try_from(elapsed.as_millis()).unwrap_or(0);
                            eprint!(
                                "\r\x1b[K{} / {label}: {:.1} s of about {:.0} s",
                                s.name,
                                e as f64 / 1000.0,
                                total_ms as f64 / 1000.0
                            );
                        }
                    };
                    let tag = if repeat > 1 {
                        file_tag(&format!("{label}-{k}"))
                    } else {
                        file_tag(label)
                    };
                    let run = runner::run(&opts.exe, s, spec, budget, work, &tag, show).map_err(
                        |source| LabError::Run {
                            scenario: s.name.clone(),
                            policy: label.to_owned(),
                            source,
                        },
                    )?;
                    done_ms += s.duration_ms;
                    tries.push(run);
                }
                runs.push(median_run(tries));
            }
            if opts.progress {
                eprint!("\r\x1b[K");
            }
            let summaries: Vec<Summary> = runs
                .iter()
                .map(|(r, spread)| Summary { progress_spread: *spread, ..Summary::of(r) })
                .collect();
            let runs: Vec<runner::Run> = runs.into_iter().map(|(r, _)| r).collect();
            let baseline = summaries.first();
            let _ = writeln!(
                out,
                "## {}: {}\n\n{}",
                s.name,
                s.description,
                summary::table(&summaries, baseline)
            );
            if let Some(dir) = &opts.plot {
                for run in &runs {
                    // The raw reports, one JSON line per tick, beside the charts.
                    let from = work.join(format!("{}-{}.jsonl", s.name, run.file_tag));
                    let to = dir.join(format!("{}-{}.jsonl", s.name, file_tag(&run.policy)));
                    std::fs::copy(&from, &to).map_err(dir_error(&to))?;
                }
                for run in runs.iter().skip(1) {
                    let path = dir.join(format!("{}-{}.png", s.name, file_tag(&run.policy)));
                    chart::run_chart(&path, &s.name, run)?;
                    outcome.charts.push(path);
                }
                let path = dir.join(format!("{}-compare.png", s.name));
                chart::compare_chart(&path, &s.name, &runs)?;
                outcome.charts.push(path);
            }
            outcome.results.push((s.name.clone(), summaries));
        }
        Ok(())
    })();
    drop(work_dir);
    result.map(|()| outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn the_work_dir_is_private_and_never_a_planted_symlink() {
        // Someone else plants a symlink where a predictable name would be.
        let elsewhere =
            std::env::temp_dir().join(format!("ebb-lab-planted-{}", std::process::id()));
        std::fs::create_dir_all(&elsewhere).unwrap();
        let planted = std::env::temp_dir().join(format!("ebb-lab-{}", std::process::id()));
        // A work dir of an older ebb whose pid was ours may be left there: it is no one's now.
        let _ = std::fs::remove_file(&planted);
        let _ = std::fs::remove_dir_all(&planted);
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        let dir = work_dir().unwrap();
        let work = dir.path();
        let meta = std::fs::symlink_metadata(work).unwrap();
        let target = std::fs::metadata(&elsewhere).unwrap();
        let followed = (meta.dev(), meta.ino()) == (target.dev(), target.ino());
        let _ = std::fs::remove_file(&planted);
        let _ = std::fs::remove_dir_all(&elsewhere);
        assert!(
            meta.is_dir() && !followed,
            "the work dir {work:?} is the planted symlink's target"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{work:?}");
    }
}
