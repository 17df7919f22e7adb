//! One run: a scenario under one policy, through a real `ebb host` (its VMs real `ebb run`
//! processes), with the scenario's events sent to the host's socket on time, and the host's
//! `--stats-json` report of every tick read back.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::scenario::Scenario;
use super::spec::PolicySpec;
use crate::api::client::Client;
use crate::host::report::HostReport;

/// A run stops (SIGTERM to the host) after three times the scenario's duration plus this.
pub const RUN_GRACE: Duration = Duration::from_secs(20);
/// How often the runner looks at the clock, the events and the host.
const POLL: Duration = Duration::from_millis(20);

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The host could not be started, or its files written or read.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The host refused the scenario.
    #[error("the host refused the scenario ({status}): {stderr}")]
    Refused {
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
}

/// The budget of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunBudget {
    /// Twice the VMs' memory, no events: what the guests do with all they want.
    Unconstrained,
    /// The scenario's budget and events' budgets times this.
    Times(f64),
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct Run {
    /// The policy spec, or `unconstrained`.
    pub policy: String,
    /// The host's tick.
    pub tick: Duration,
    /// The tag its files in the work directory are named after.
    pub file_tag: String,
    /// Every tick's report.
    pub reports: Vec<HostReport>,
    /// The host's exit status (0: every guest verified every page).
    pub exit_code: Option<i32>,
    /// The lab stopped it (it ran past its time).
    pub timed_out: bool,
    /// Wall time.
    pub wall: Duration,
}

/// Sends `sig` to our unreaped child `pid`.
fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        if pid > 0 {
            // SAFETY: kill(2) on our own child, not yet reaped: the pid is still its.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// A file name's part for `label`: letters, digits, `.` and `-` kept, the rest `_`.
pub fn file_tag(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect()
}

/// Runs `scenario` under `spec` with `budget` with `exe host`, its files in `dir` named
/// after `tag`; `progress` is called with the elapsed time every poll.
///
/// # Errors
/// The host cannot be started or refuses the scenario, or its report cannot be read.
pub fn run(
    exe: &Path,
    scenario: &Scenario,
    spec: &PolicySpec,
    budget: RunBudget,
    dir: &Path,
    tag: &str,
    mut progress: impl FnMut(Duration),
) -> Result<Run, RunError> {
    let file = |ext: &str| -> PathBuf { dir.join(format!("{}-{tag}.{ext}", scenario.name)) };
    let (config, sock, stats, log) = (file("toml"), file("sock"), file("jsonl"), file("log"));
    let (budget_bytes, factor) = match budget {
        RunBudget::Unconstrained => (scenario.unconstrained_budget(), None),
        RunBudget::Times(f) => {
            (crate::mm::stats::round_u64(scenario.budget_bytes as f64 * f), Some(f))
        }
    };
    std::fs::write(&config, scenario.host_toml(budget_bytes, spec))
        .map_err(io("writing the host description"))?;
    let log_file = std::fs::File::create(&log).map_err(io("creating the host log"))?;
    let mut host = Command::new(exe)
        .args(["host", "--policy", &spec.policy, "--config"])
        .arg(&config)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--stats-json")
        .arg(&stats)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(io(format!("starting {} host", exe.display())))?;
    let start = Instant::now();
    let limit = Duration::from_millis(scenario.duration_ms.saturating_mul(3)) + RUN_GRACE;
    let mut events = scenario.events.iter().peekable();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = host.try_wait().map_err(io("waiting for the host"))? {
            break status;
        }
        let elapsed = start.elapsed();
        progress(elapsed);
        while let Some(e) =
            events.next_if(|e| factor.is_some() && Duration::from_millis(e.at_ms) <= elapsed)
        {
            let bytes = e.budget_bytes as f64 * factor.unwrap_or(1.0);
            let client = Client::new(&sock).with_timeout(Duration::from_secs(2));
            if let Err(err) = client.set_budget(crate::mm::stats::round_u64(bytes)) {
                log::warn!("{}: budget event at {} ms: {err}", scenario.name, e.at_ms);
            }
        }
        if elapsed > limit && !timed_out {
            timed_out = true;
            signal(host.id(), libc::SIGTERM);
        }
        if elapsed > limit + RUN_GRACE {
            signal(host.id(), libc::SIGKILL); // the VMs follow it (their death signal)
        }
        std::thread::sleep(POLL);
    };
    let wall = start.elapsed();
    let text = std::fs::read_to_string(&stats).unwrap_or_default();
    let reports: Vec<HostReport> =
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    if reports.is_empty() {
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(RunError::Refused {
            status: status.to_string(),
            stderr: stderr.trim().to_owned(),
        });
    }
    let policy = match budget {
        RunBudget::Unconstrained => "unconstrained".to_owned(),
        RunBudget::Times(_) => spec.label.clone(),
    };
    let tick = Duration::from_millis(scenario.tick_ms);
    Ok(Run {
        policy,
        tick,
        file_tag: tag.to_owned(),
        reports,
        exit_code: status.code(),
        timed_out,
        wall,
    })
}
