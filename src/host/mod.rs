//! `ebb host`: many VMs under one memory budget. Each VM is its own `ebb run` process; the
//! host owns the budget, the minFree state machine and the policy, and steers the VMs
//! through their control sockets (balloon target, reclaim target, sharing scan rate).
//!
//! | file | owns |
//! |---|---|
//! | `config.rs` | the TOML description, its checks, admission against the budget |
//! | `pressure.rs` | minFree and the memory states (a pure transition function) |
//! | `policy/` | the [`Policy`](policy::Policy) trait and the policies |
//! | `child.rs` | one VM process: spawn or adopt (pidfd), socket, signals, exit |
//! | `poll.rs` | requests to every VM at once under one deadline, replies capped |
//! | `figures.rs` | a VM's reported figures made safe, and what it holds measured from outside |
//! | `supervisor/` | the tick: read the VMs, pick the state, ask the policy, move levers; VMs created and destroyed at run time, the event log, adoption after a restart |
//! | `report.rs` | the report per tick, and its Prometheus form |
//! | `state.rs` | the state directory: the VMs a restarted host adopts, pidfds |
//! | `rundir.rs` | private directories (mkdtemp, mode 0700) for the run and the lab |
//! | `protocol.rs` | the host socket's requests and replies, and the client's methods for them |
//! | `api.rs` | the host's control socket |
//! | `service.rs` | what `--metrics-addr` serves, and the status told to systemd |
//! | `top.rs` | `ebb top`, the live terminal view |
//!
//! Mechanisms stay in the VM processes and decisions here: the host never touches guest
//! memory, and a VM's crash ends only that VM (the host reports it).

pub mod api;
pub mod child;
pub mod config;
pub mod figures;
pub mod policy;
pub mod poll;
pub mod pressure;
pub mod protocol;
pub mod report;
pub mod rundir;
pub mod service;
pub mod state;
pub mod supervisor;
pub mod top;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::api::server::ApiServer;
use crate::service::http::MetricsServer;
use crate::service::notify::Notifier;
use crate::vmm::signals::StopSignals;
use config::HostConfig;
use supervisor::Supervisor;

/// How long VMs get to stop after SIGTERM before they are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Errors of the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The policy name is unknown.
    #[error("unknown policy {0:?}")]
    Policy(String),
    /// The run directory could not be made.
    #[error("cannot create the run directory {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The run directory given is not private to this user.
    #[error("run directory {path}: {why}; give a directory of yours that no one else can write (mkdir -m 700 DIR), or leave --run-dir out for a fresh private one")]
    RunDirNotPrivate {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A VM could not start.
    #[error(transparent)]
    Child(#[from] child::ChildError),
    /// Setting up signals, the socket or the statistics file failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// How to run a host.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The VMs, budget and policy.
    pub config: HostConfig,
    /// The `ebb` executable the VMs run.
    pub exe: PathBuf,
    /// The host's control socket.
    pub api_sock: Option<PathBuf>,
    /// One JSON line per tick.
    pub stats_json: Option<PathBuf>,
    /// Where the VMs' control sockets go (default: a private directory in the temp dir,
    /// created by `mkdtemp` and removed at exit).
    pub run_dir: Option<PathBuf>,
    /// Serve `/metrics` and `/healthz` over HTTP here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Run until a signal, even when every VM has ended.
    pub keep_running: bool,
    /// Keep the VMs' list here, so that a restarted host adopts the VMs still running
    /// (their sockets, status files and logs go in its `vms/`, not in `run_dir`).
    pub state_dir: Option<PathBuf>,
    /// With a state directory, VMs still die with the host (today's behaviour without
    /// one): nothing is left to adopt.
    pub vms_die_with_host: bool,
}

/// How a host ended.
#[derive(Debug)]
pub enum HostOutcome {
    /// Every VM ended on its own: each one's name and status.
    Ended(Vec<(String, Option<child::VmExit>)>),
    /// A signal stopped the host (and its VMs).
    Stopped(i32),
}

impl HostOutcome {
    /// The host's exit status: 0 when every VM exited 0, 128 + the signal when one stopped
    /// it, 1 otherwise.
    pub fn exit_status(&self) -> u8 {
        match self {
            HostOutcome::Ended(v) if v.iter().all(|(_, s)| s.is_some_and(|s| s.success())) => 0,
            HostOutcome::Ended(_) => 1,
            HostOutcome::Stopped(sig) => u8::try_from(128 + sig).unwrap_or(1),
        }
    }
}

fn setup(what: &str) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::Setup { what: what.into(), source }
}

/// Where the VMs' sockets go: the user's directory, or a private one of ours (removed on
/// drop).
#[derive(Debug)]
enum RunDir {
    Given(PathBuf),
    Ours(rundir::PrivateDir),
}

impl RunDir {
    fn new(given: Option<PathBuf>) -> Result<Self, HostError> {
        match given {
            Some(p) => {
                rundir::check_private(&p)
                    .map_err(|why| HostError::RunDirNotPrivate { path: p.clone(), why })?;
                Ok(Self::Given(p))
            }
            None => rundir::PrivateDir::new("ebb-host-")
                .map(Self::Ours)
                .map_err(|source| HostError::RunDir { path: std::env::temp_dir(), source }),
        }
    }

    fn path(&self) -> &std::path::Path {
        match self {
            Self::Given(p) => p,
            Self::Ours(d) => d.path(),
        }
    }
}

/// Serves the host's socket on a thread until the returned flag is set.
fn serve_api(
    path: &std::path::Path,
    handler: api::HostApi,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>), HostError> {
    let server = ApiServer::bind(path, handler).map_err(setup("host control socket"))?;
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| HostError::Setup {
            what: "host event loop".into(),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    events.add_subscriber(Arc::new(Mutex::new(server)));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::Builder::new()
        .name("ebb-host-api".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if let Err(e) = events.run_with_timeout(100) {
                    log::error!("host control socket: {e:?}");
                    return;
                }
            }
        })
        .map_err(setup("host control socket thread"))?;
    Ok((stop, handle))
}

/// Runs the host until every VM ends or a signal stops it.
///
/// # Errors
/// Setup fails or a VM cannot start (those started are stopped).
pub fn run(opts: &HostOptions) -> Result<HostOutcome, HostError> {
    // First, before any thread or VM starts: it takes NOTIFY_SOCKET out of the environment,
    // which the VMs must not inherit (and which is not safe to change once threads run).
    let notifier = Notifier::from_env();
    let mut signals = StopSignals::install().map_err(setup("signal handlers"))?;
    let policy = policy::by_name(&opts.config.policy, opts.config.params)
        .ok_or_else(|| HostError::Policy(opts.config.policy.clone()))?;
    let state = match &opts.state_dir {
        Some(p) => Some(
            state::StateDir::open(p)
                .map_err(|why| HostError::RunDirNotPrivate { path: p.clone(), why })?,
        ),
        None => None,
    };
    let dir = match &state {
        Some(s) => RunDir::new(Some(s.vm_dir()))?,
        None => RunDir::new(opts.run_dir.clone())?,
    };
    let mut stats = match &opts.stats_json {
        Some(p) => {
            Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(setup("--stats-json"))?))
        }
        None => None,
    };
    let mut sup = Supervisor::start(
        &opts.config,
        &opts.exe,
        dir.path(),
        policy,
        state,
        opts.vms_die_with_host,
    )?;
    sup.keep_running(opts.keep_running);
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(setup("eventfd"))?;
    let api = match &opts.api_sock {
        Some(path) => {
            let h = api::HostApi::new(sup.shared(), wake.try_clone().map_err(setup("eventfd"))?);
            Some(serve_api(path, h)?)
        }
        None => None,
    };
    let tick = opts.config.tick;
    let _http = match opts.metrics_addr {
        Some(addr) => {
            let source = Arc::new(service::HostSource::new(sup.shared(), tick));
            let server = MetricsServer::start(addr, source).map_err(|source| HostError::Setup {
                what: format!("--metrics-addr {addr}"),
                source,
            })?;
            eprintln!("ebb host: metrics on http://{}/metrics", server.addr());
            Some(server)
        }
        None => None,
    };
    if let Some(n) = &notifier {
        if n.watchdog().is_some_and(|w| w < tick * 2) {
            log::warn!(
                "systemd's watchdog ({:?}) is under two ticks ({tick:?}): it may kill a healthy host; set WatchdogSec above two ticks",
                n.watchdog().unwrap_or_default()
            );
        }
        n.ready(&format!("{} VMs started", opts.config.vms.len()));
    }
    let stop_fd = signals.fd();
    let stopped = sup.run(
        &wake,
        || signals.take(),
        stop_fd,
        |report| {
            if let Some(n) = &notifier {
                n.status(&service::status_line(report));
            }
            if let Some(out) = &mut stats {
                let line = serde_json::to_string(report).unwrap_or_default();
                if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                    log::warn!("writing host statistics: {e}");
                }
            }
        },
    );
    let outcome = match stopped {
        Some(sig) => {
            log::info!("signal {sig}: stopping every VM");
            if let Some(n) = &notifier {
                n.stopping(&format!("signal {sig}: stopping every VM"));
            }
            sup.stop_all(STOP_GRACE);
            HostOutcome::Stopped(sig)
        }
        None => HostOutcome::Ended(sup.exits()),
    };
    if let Some((flag, handle)) = api {
        flag.store(true, Ordering::Relaxed);
        let _ = handle.join();
    }
    drop(sup);
    drop(dir);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_run_dir_is_private_and_a_planted_symlink_neither_followed_nor_blocking() {
        let elsewhere =
            std::env::temp_dir().join(format!("ebb-host-planted-{}", std::process::id()));
        std::fs::create_dir_all(&elsewhere).unwrap();
        let planted = std::env::temp_dir().join(format!("ebb-host-{}", std::process::id()));
        // A run dir of an older ebb whose pid was ours may be left there: it is no one's now.
        let _ = std::fs::remove_file(&planted);
        let _ = std::fs::remove_dir_all(&planted);
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        let made = RunDir::new(None);
        let _ = std::fs::remove_file(&planted);
        let _ = std::fs::remove_dir_all(&elsewhere);
        let dir = made.unwrap();
        let path = dir.path().to_owned();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_dir(), "{path:?}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{path:?}");
        drop(dir);
        assert!(!path.exists(), "{path:?} is left behind");
    }
}
