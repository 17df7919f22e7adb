//! `ebb lab`: run scenarios under several policies with the real host and compare them.
//!
//! | file | owns |
//! |---|---|
//! | `scenario.rs` | scenario files: parsing, checks, scaling, the host description they become |
//! | `runner.rs` | one run: a real `ebb host`, the scenario's events on time, the reports back |
//! | `summary.rs` | a run's figures and the table comparing policies |
//! | `chart.rs` | the PNG charts |
//!
//! Every scenario also runs once unconstrained (twice the VMs' memory as budget, no events),
//! so that the guests' progress under each policy reads as a fraction of what they do with
//! all the memory they want.

pub mod chart;
pub mod runner;
pub mod scenario;
pub mod summary;
pub mod timeline;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host::rundir::PrivateDir;
use scenario::Scenario;
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
    /// An unknown policy.
    #[error("unknown policy {0:?}: use {1}")]
    Policy(String, String),
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
    /// Policies (none: every shipped policy).
    pub policies: Vec<String>,
    /// Where to write charts.
    pub plot: Option<PathBuf>,
    /// Sizes and times multiplied by this.
    pub scale: f64,
    /// The `ebb` executable.
    pub exe: PathBuf,
    /// Show progress on stderr.
    pub progress: bool,
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

/// Runs every scenario of `opts` under every policy, writing each scenario's table to
/// `out` as soon as it is done.
///
/// # Errors
/// A scenario is bad, a policy unknown, a run or a chart fails.
pub fn run(opts: &LabOptions, out: &mut dyn Write) -> Result<LabOutcome, LabError> {
    let names = crate::host::policy::POLICY_NAMES;
    let policies: Vec<String> = if opts.policies.is_empty() {
        names.iter().map(|s| (*s).to_owned()).collect()
    } else {
        opts.policies.clone()
    };
    if let Some(p) = policies.iter().find(|p| !names.contains(&p.as_str())) {
        return Err(LabError::Policy(p.clone(), names.join(", ")));
    }
    let scenarios: Vec<Scenario> =
        opts.scenarios.iter().map(|p| Scenario::load(p, opts.scale)).collect::<Result<_, _>>()?;
    let work_dir = work_dir()?;
    let work = work_dir.path();
    if let Some(dir) = &opts.plot {
        std::fs::create_dir_all(dir).map_err(dir_error(dir))?;
    }
    let runs_each = policies.len() + 1;
    let total_ms: u64 =
        scenarios.iter().map(|s| s.duration_ms.saturating_mul(runs_each as u64)).sum();
    let mut done_ms = 0u64;
    let mut outcome = LabOutcome::default();
    let result = (|| {
        for s in &scenarios {
            let mut runs = Vec::new();
            for (i, policy) in
                std::iter::once("esx").chain(policies.iter().map(String::as_str)).enumerate()
            {
                let unconstrained = i == 0;
                let label = if unconstrained { "unconstrained" } else { policy };
                let show = |elapsed: Duration| {
                    if opts.progress {
                        let e = done_ms + u64::try_from(elapsed.as_millis()).unwrap_or(0);
                        eprint!(
                            "\r\x1b[K{} / {label}: {:.1} s of about {:.0} s",
                            s.name,
                            e as f64 / 1000.0,
                            total_ms as f64 / 1000.0
                        );
                    }
                };
                let run = runner::run(&opts.exe, s, policy, unconstrained, work, show).map_err(
                    |source| LabError::Run {
                        scenario: s.name.clone(),
                        policy: label.to_owned(),
                        source,
                    },
                )?;
                done_ms += s.duration_ms;
                runs.push(run);
            }
            if opts.progress {
                eprint!("\r\x1b[K");
            }
            let summaries: Vec<Summary> = runs.iter().map(Summary::of).collect();
            let baseline = summaries.first().map(|b| b.progress);
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
                    let from = work.join(format!("{}-{}.jsonl", s.name, run.policy));
                    let to = dir.join(format!("{}-{}.jsonl", s.name, run.policy));
                    std::fs::copy(&from, &to).map_err(dir_error(&to))?;
                }
                for run in runs.iter().skip(1) {
                    let path = dir.join(format!("{}-{}.png", s.name, run.policy));
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
