//! The host seen by machines: what its HTTP server serves (`--metrics-addr`) and what it
//! tells systemd (`NOTIFY_SOCKET`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::report::HostReport;
use super::supervisor::Shared;
use crate::service::http::Source;
use crate::units::MIB;

/// How many ticks may pass without a report before the host is unhealthy.
const STALE_TICKS: u32 = 3;
/// And the slack on top (a tick's own work, a loaded machine).
const STALE_SLACK: Duration = Duration::from_secs(2);

/// The host's figures for the HTTP server.
#[derive(Debug)]
pub struct HostSource {
    shared: Arc<Mutex<Shared>>,
    tick: Duration,
    start: Instant,
}

impl HostSource {
    /// Serves `shared`, whose reports come every `tick`.
    pub fn new(shared: Arc<Mutex<Shared>>, tick: Duration) -> Self {
        Self { shared, tick, start: Instant::now() }
    }
}

impl Source for HostSource {
    fn metrics(&self) -> String {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).report.prometheus()
    }

    fn health(&self) -> Result<String, String> {
        let (updated, state) = {
            let s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            (s.updated, s.report.state.clone())
        };
        let most = self.tick * STALE_TICKS + STALE_SLACK;
        match updated {
            Some(t) if t.elapsed() <= most => Ok(format!("ok: state {state}")),
            Some(t) => Err(format!("stale: no tick for {} ms", t.elapsed().as_millis())),
            None if self.start.elapsed() <= most => Ok("ok: starting".into()),
            None => Err(format!("stale: no tick in {} ms", self.start.elapsed().as_millis())),
        }
    }
}

/// The one-line status systemd shows for `report`.
pub fn status_line(report: &HostReport) -> String {
    let running = report.vms.iter().filter(|v| v.running).count();
    format!(
        "{} VMs running, state {}, free {} MiB of {} MiB, policy {}",
        running,
        report.state,
        report.free_bytes / i64::try_from(MIB).unwrap_or(1),
        report.budget_bytes / MIB,
        report.policy
    )
}
