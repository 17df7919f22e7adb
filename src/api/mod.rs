//! The control socket: one JSON request per line in, one JSON reply per line out. The
//! requests and replies are the types of [`protocol`] (every one is listed in
//! `docs/api.md`); this module turns a VM's requests into calls on its devices and engine,
//! which never see JSON.

pub mod client;
pub mod protocol;
pub mod server;
mod sys;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde_json::Value;

use crate::config::MAX_SHARE_SCAN_RATE;
use crate::devices::virtio::balloon::{Balloon, STAT_NAMES};
use crate::devices::virtio::mmio::MmioMetrics;
use crate::metrics::StatsSource;
use crate::mm::gate::AllocGate;
use crate::mm::reclaim::ReclaimControl;
use crate::mm::sharing::SharingControl;
use crate::units::human_bytes;
use protocol::{
    error_value, parse_line, to_reply, Ack, AllocArgs, BalloonArgs, BalloonGuestErrors,
    BalloonStatsReply, ReclaimArgs, SharingArgs, TransportErrors, VersionReply, VmRequest,
};

/// Answers one request line of a control socket.
pub trait Handler: std::fmt::Debug {
    /// The reply to `line` (always one object; errors are `{"error": ...}`).
    fn handle(&self, line: &str) -> Value;
}

impl Handler for ApiContext {
    fn handle(&self, line: &str) -> Value {
        ApiContext::handle(self, line)
    }
}

/// What requests act on.
#[derive(Debug)]
pub struct ApiContext {
    /// The balloon, if the VM has one.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// What the balloon's virtio-mmio transport counted of the guest's mistakes.
    pub transport: Option<Arc<MmioMetrics>>,
    /// Memory statistics.
    pub stats: Arc<StatsSource>,
    /// The reclaim lever and the guest's RAM in bytes, if reclaim is available.
    pub reclaim: Option<(Arc<ReclaimControl>, u64)>,
    /// The sharing lever, if page sharing is available.
    pub sharing: Option<Arc<SharingControl>>,
    /// The allocation gate, if guest RAM is served by the engine.
    pub gate: Option<Arc<AllocGate>>,
    /// When the VM started.
    pub start: Instant,
}

/// Longest request line accepted (requests are small JSON objects).
pub const MAX_REQUEST_BYTES: usize = 4096;

/// The error reply `{"error": msg}`.
pub(crate) fn error(msg: impl std::fmt::Display) -> Value {
    error_value(msg)
}

/// The reply for a request the VM could not carry out.
type Refused = String;

impl ApiContext {
    /// Handles one request line; always returns one reply object.
    pub fn handle(&self, line: &str) -> Value {
        let request = match parse_line::<VmRequest>(line) {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        let reply = match request {
            VmRequest::Version(_) => Ok(to_reply(&VersionReply::current())),
            VmRequest::Stats(_) => {
                let t_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
                Ok(to_reply(&self.stats.snapshot(t_ms)))
            }
            VmRequest::BalloonStats(_) => self.balloon_stats().map(|r| to_reply(&r)),
            VmRequest::Balloon(args) => self.balloon_target(args).map(|()| to_reply(&Ack::OK)),
            VmRequest::Reclaim(args) => self.reclaim_target(args).map(|()| to_reply(&Ack::OK)),
            VmRequest::Sharing(args) => self.sharing_rate(args).map(|()| to_reply(&Ack::OK)),
            VmRequest::Alloc(args) => self.alloc_gate(args).map(|()| to_reply(&Ack::OK)),
        };
        reply.unwrap_or_else(error)
    }

    fn balloon(&self) -> Result<std::sync::MutexGuard<'_, Balloon>, Refused> {
        let b = self.balloon.as_ref().ok_or("this VM has no balloon: start it with --balloon")?;
        Ok(b.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn balloon_target(&self, args: BalloonArgs) -> Result<(), Refused> {
        self.balloon()?.set_target_bytes(args.target_bytes).map_err(|e| e.to_string())
    }

    fn reclaim_target(&self, args: ReclaimArgs) -> Result<(), Refused> {
        let Some((control, mem_bytes)) = &self.reclaim else {
            return Err(
                "reclaim is unavailable in this VM (--no-uffd, or a kernel without UFFDIO_MOVE)"
                    .into(),
            );
        };
        match args.target_bytes {
            // 0: off, as on the command line.
            None | Some(0) => control.set_target(None),
            Some(bytes) if bytes <= *mem_bytes => control.set_target(Some(bytes)),
            Some(bytes) => {
                return Err(format!(
                    "reclaim target of {} is more than the guest's {}",
                    human_bytes(bytes),
                    human_bytes(*mem_bytes)
                ))
            }
        }
        Ok(())
    }

    fn alloc_gate(&self, args: AllocArgs) -> Result<(), Refused> {
        let Some(gate) = &self.gate else {
            return Err(
                "the allocation gate needs guest RAM served through userfaultfd (not --no-uffd)"
                    .into(),
            );
        };
        gate.set(args.wait_above_bytes);
        Ok(())
    }

    fn sharing_rate(&self, args: SharingArgs) -> Result<(), Refused> {
        let Some(control) = &self.sharing else {
            return Err(
                "page sharing is unavailable in this VM (--no-uffd, or a kernel without UFFDIO_MOVE and memfd write protection)"
                    .into(),
            );
        };
        if args.scan_rate > MAX_SHARE_SCAN_RATE {
            return Err(format!(
                "sharing scan rate {} is more than {MAX_SHARE_SCAN_RATE} pages per second",
                args.scan_rate
            ));
        }
        control.set_scan_rate(args.scan_rate);
        Ok(())
    }

    fn balloon_stats(&self) -> Result<BalloonStatsReply, Refused> {
        let balloon = self.balloon()?;
        let gs = balloon.guest_stats();
        let stats = (gs.values.iter())
            .map(|&(tag, value)| {
                let name = STAT_NAMES
                    .iter()
                    .find(|(t, _)| *t == tag)
                    .map_or_else(|| format!("tag_{tag}"), |(_, n)| (*n).to_owned());
                (name, value)
            })
            .collect();
        let age = gs.updated.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
        let m = balloon.metrics();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        Ok(BalloonStatsReply {
            target_bytes: balloon.target_bytes(),
            actual_bytes: balloon.actual_bytes(),
            driver_ready: balloon.is_running(),
            stats,
            stats_age_ms: age,
            inflated_pages: load(&m.inflated_pages),
            deflated_pages: load(&m.deflated_pages),
            reported_pages: load(&m.reported_pages),
            early_notifies: load(&m.early_notifies),
            activations: load(&m.activations),
            reports_kept: load(&m.reports_kept),
            madvise_errors: load(&m.madvise_errors),
            guest_errors: BalloonGuestErrors {
                bad_pfns: m.bad_pfns.get(),
                bad_descriptors: m.bad_descriptors.get(),
                bad_stats: m.bad_stats.get(),
                bad_notifies: m.bad_notifies.get(),
                bad_config_writes: m.bad_config_writes.get(),
            },
            transport_errors: self.transport.as_deref().map(|t| TransportErrors {
                bad_accesses: t.bad_accesses.get(),
                bad_state_writes: t.bad_state_writes.get(),
                bad_queue_config: t.bad_queue_config.get(),
                bad_notifies: t.bad_notifies.get(),
                activate_failures: t.activate_failures.get(),
            }),
        })
    }
}
