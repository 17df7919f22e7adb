//! The control socket: one JSON request per line in, one JSON reply per line out.
//!
//! | request | reply |
//! |---|---|
//! | `{"balloon": {"target_mib": N}}` | `{"ok": true}` |
//! | `{"balloon_stats": {}}` | `{"target_mib": T, "actual_mib": A, "stats": {"free_memory": ...}, "stats_age_ms": M}` |
//! | `{"stats": {}}` | the `--stats-json` object |
//! | `{"reclaim": {"target_mib": N}}` | `{"ok": true}`: keep at most N MiB resident (0: off) |
//! | `{"reclaim": {"off": true}}` | `{"ok": true}`: stop reclaiming |
//! | `{"sharing": {"scan_rate": N}}` | `{"ok": true}`: hash N pages per second looking for identical pages (0: off) |
//! | `{"sharing": {"off": true}}` | `{"ok": true}`: stop scanning (shared pages stay shared) |
//! | `{"alloc": {"wait_above_mib": N}}` | `{"ok": true}`: new guest memory waits while N MiB or more are resident (`mm::gate`) |
//! | `{"alloc": {"off": true}}` | `{"ok": true}`: new memory never waits |
//!
//! Errors come back as `{"error": "..."}`. The device never sees JSON: this module turns
//! requests into calls on it.

pub mod client;
pub mod server;
mod sys;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde_json::{json, Value};

use crate::config::MAX_SHARE_SCAN_RATE;
use crate::devices::virtio::balloon::{Balloon, STAT_NAMES};
use crate::devices::virtio::mmio::MmioMetrics;
use crate::metrics::StatsSource;
use crate::mm::gate::AllocGate;
use crate::mm::reclaim::ReclaimControl;
use crate::mm::sharing::SharingControl;

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
    json!({ "error": msg.to_string() })
}

/// The verb and arguments of request `line` (an object with one key), or the error reply
/// that names `verbs`, the requests the socket knows.
///
/// # Errors
/// The reply to send: the line is not JSON, or not an object with one key.
pub fn parse_request(line: &str, verbs: &str) -> Result<(String, Value), Value> {
    let request: Value =
        serde_json::from_str(line).map_err(|e| error(format!("invalid JSON: {e}")))?;
    match request {
        Value::Object(o) if o.len() == 1 => {
            o.into_iter().next().ok_or_else(|| error("empty request"))
        }
        _ => Err(error(format!("a request is an object with one key: {verbs}"))),
    }
}

/// The requests a VM's socket knows.
const VERBS: &str = "alloc, balloon, balloon_stats, reclaim, sharing or stats";

impl ApiContext {
    /// Handles one request line; always returns one reply object.
    pub fn handle(&self, line: &str) -> Value {
        let (verb, args) = match parse_request(line, VERBS) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let args = &args;
        match verb.as_str() {
            "balloon" => self.balloon_target(args),
            "balloon_stats" => self.balloon_stats(),
            "reclaim" => self.reclaim_target(args),
            "sharing" => self.sharing_rate(args),
            "alloc" => self.alloc_gate(args),
            "stats" => {
                let t_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
                serde_json::to_value(self.stats.snapshot(t_ms)).unwrap_or_else(error)
            }
            other => error(format!("unknown request {other:?}: use {VERBS}")),
        }
    }

    fn balloon(&self) -> Result<std::sync::MutexGuard<'_, Balloon>, Value> {
        let b = self
            .balloon
            .as_ref()
            .ok_or_else(|| error("this VM has no balloon: start it with --balloon"))?;
        Ok(b.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn balloon_target(&self, args: &Value) -> Value {
        let Some(target) = args.get("target_mib").and_then(Value::as_u64) else {
            return error("balloon needs {\"target_mib\": N} with N a whole number of MiB");
        };
        let mut balloon = match self.balloon() {
            Ok(b) => b,
            Err(e) => return e,
        };
        match balloon.set_target_mib(target) {
            Ok(()) => json!({ "ok": true }),
            Err(e) => error(e),
        }
    }

    fn reclaim_target(&self, args: &Value) -> Value {
        let Some((control, mem_bytes)) = &self.reclaim else {
            return error(
                "reclaim is unavailable in this VM (--no-uffd, or a kernel without UFFDIO_MOVE)",
            );
        };
        if args.get("off").and_then(Value::as_bool) == Some(true) {
            control.set_target(None);
            return json!({ "ok": true });
        }
        let Some(mib) = args.get("target_mib").and_then(Value::as_u64) else {
            return error(
                "reclaim needs {\"target_mib\": N} (a whole number of MiB) or {\"off\": true}",
            );
        };
        match mib.checked_mul(1 << 20).filter(|b| b <= mem_bytes) {
            Some(0) => {
                control.set_target(None); // 0: off, as on the command line
                json!({ "ok": true })
            }
            Some(bytes) => {
                control.set_target(Some(bytes));
                json!({ "ok": true })
            }
            None => error(format!(
                "reclaim target of {mib} MiB is more than the guest's {} MiB",
                mem_bytes >> 20
            )),
        }
    }

    fn alloc_gate(&self, args: &Value) -> Value {
        let Some(gate) = &self.gate else {
            return error(
                "the allocation gate needs guest RAM served through userfaultfd (not --no-uffd)",
            );
        };
        if args.get("off").and_then(Value::as_bool) == Some(true) {
            gate.set(None);
            return json!({ "ok": true });
        }
        match args
            .get("wait_above_mib")
            .and_then(Value::as_u64)
            .and_then(|m| m.checked_mul(1 << 20))
        {
            Some(bytes) => {
                gate.set(Some(bytes));
                json!({ "ok": true })
            }
            None => error(
                "alloc needs {\"wait_above_mib\": N} (a whole number of MiB) or {\"off\": true}",
            ),
        }
    }

    fn sharing_rate(&self, args: &Value) -> Value {
        let Some(control) = &self.sharing else {
            return error(
                "page sharing is unavailable in this VM (--no-uffd, or a kernel without UFFDIO_MOVE and memfd write protection)",
            );
        };
        if args.get("off").and_then(Value::as_bool) == Some(true) {
            control.set_scan_rate(0);
            return json!({ "ok": true });
        }
        match args.get("scan_rate").and_then(Value::as_u64) {
            Some(rate) if rate <= MAX_SHARE_SCAN_RATE => {
                control.set_scan_rate(rate);
                json!({ "ok": true })
            }
            Some(rate) => error(format!(
                "sharing scan rate {rate} is more than {MAX_SHARE_SCAN_RATE} pages per second"
            )),
            None => error(
                "sharing needs {\"scan_rate\": N} (pages per second, 0: off) or {\"off\": true}",
            ),
        }
    }

    fn balloon_stats(&self) -> Value {
        let balloon = match self.balloon() {
            Ok(b) => b,
            Err(e) => return e,
        };
        let gs = balloon.guest_stats();
        let mut stats = serde_json::Map::new();
        for &(tag, value) in &gs.values {
            let name = STAT_NAMES
                .iter()
                .find(|(t, _)| *t == tag)
                .map_or_else(|| format!("tag_{tag}"), |(_, n)| (*n).to_owned());
            stats.insert(name, json!(value));
        }
        let age = gs.updated.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
        let m = balloon.metrics();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        json!({
            "target_mib": balloon.target_mib(),
            "actual_mib": balloon.actual_mib(),
            "driver_ready": balloon.is_running(),
            "stats": stats,
            "stats_age_ms": age,
            "inflated_pages": load(&m.inflated_pages),
            "deflated_pages": load(&m.deflated_pages),
            "reported_pages": load(&m.reported_pages),
            "early_notifies": load(&m.early_notifies),
            "activations": load(&m.activations),
            "reports_kept": load(&m.reports_kept),
            "madvise_errors": load(&m.madvise_errors),
            "guest_errors": {
                "bad_pfns": m.bad_pfns.get(),
                "bad_descriptors": m.bad_descriptors.get(),
                "bad_stats": m.bad_stats.get(),
                "bad_notifies": m.bad_notifies.get(),
                "bad_config_writes": m.bad_config_writes.get(),
            },
            "transport_errors": self.transport.as_deref().map(|t| json!({
                "bad_accesses": t.bad_accesses.get(),
                "bad_state_writes": t.bad_state_writes.get(),
                "bad_queue_config": t.bad_queue_config.get(),
                "bad_notifies": t.bad_notifies.get(),
                "activate_failures": t.activate_failures.get(),
            })),
        })
    }
}
