//! What `ebb run --metrics-addr` serves: the VM's statistics (the `stats` reply, every
//! field) in Prometheus's text format, and its health.
//!
//! Counters (what only grows: faults, evictions, swap-ins, CPU time) end in `_total`; times
//! are in seconds (`fault_p50_us` is `ebb_vm_fault_p50_seconds`); every other figure is a
//! gauge named after its field. `promtool check metrics` judges the text in the tests. Each VM is its own
//! scrape target, so the metrics carry no `vm` label (the host's `ebb_vm_*{vm="..."}` do).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::http::Source;
use crate::metrics::StatsSource;

/// The statistics fields that count up.
const COUNTERS: [&str; 30] = [
    "faults",
    "faults_zero",
    "faults_copy",
    "faults_wp",
    "fault_around_pages",
    "remove_events",
    "removed_pages",
    "faults_already_mapped",
    "fault_retries",
    "fault_no_memory",
    "active_samples",
    "alloc_waits",
    "alloc_wait_timeouts",
    "swap_errors",
    "evictions",
    "zero_pages_dropped",
    "written_back",
    "refaults",
    "swapins_zcache",
    "swapins_swap",
    "zero_pages_shared",
    "share_scanned",
    "share_passes",
    "share_merged",
    "share_collisions",
    "cow_breaks",
    "share_backoff_skips",
    "share_map_failures",
    "share_map_limited",
    "vcpu_faults",
];

fn family(out: &mut String, name: &str, field: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} The VM's `{field}` statistic (docs/api.md).");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `stats`, a `stats` reply as JSON, in Prometheus's text format.
pub fn prometheus(stats: &Value) -> String {
    let mut out = String::new();
    let Some(fields) = stats.as_object() else { return out };
    for (field, value) in fields {
        let cpu = field.strip_suffix("_cpu_ms");
        match (value, cpu) {
            (Value::Number(n), Some(thread)) => {
                let name = format!("ebb_vm_{thread}_cpu_seconds_total");
                family(&mut out, &name, field, "counter");
                let _ = writeln!(out, "{name} {}", n.as_f64().unwrap_or(0.0) / 1000.0);
            }
            (Value::Number(n), None) if field == "t_ms" => {
                family(&mut out, "ebb_vm_uptime_seconds", field, "gauge");
                let _ =
                    writeln!(out, "ebb_vm_uptime_seconds {}", n.as_f64().unwrap_or(0.0) / 1000.0);
            }
            (Value::Number(n), None) => {
                let counter = COUNTERS.contains(&field.as_str());
                // Prometheus's base unit of time is the second.
                let (base, scale) = match field.strip_suffix("_us") {
                    Some(base) => (format!("{base}_seconds"), 1e-6),
                    None => (field.clone(), 1.0),
                };
                let name =
                    if counter { format!("ebb_vm_{base}_total") } else { format!("ebb_vm_{base}") };
                family(&mut out, &name, field, if counter { "counter" } else { "gauge" });
                if scale == 1.0 {
                    let _ = writeln!(out, "{name} {n}");
                } else {
                    let _ = writeln!(out, "{name} {}", n.as_f64().unwrap_or(0.0) * scale);
                }
            }
            (Value::Array(per_vcpu), None) => {
                let counter = COUNTERS.contains(&field.as_str());
                let (name, scale) = match field.strip_suffix("_us") {
                    Some(base) => (format!("ebb_vm_{base}_seconds_total"), 1e-6),
                    None if counter => (format!("ebb_vm_{field}_total"), 1.0),
                    None => (format!("ebb_vm_{field}"), 1.0),
                };
                let kind = if counter || field.ends_with("_us") { "counter" } else { "gauge" };
                family(&mut out, &name, field, kind);
                for (i, v) in per_vcpu.iter().enumerate() {
                    let v = v.as_f64().unwrap_or(0.0) * scale;
                    let _ = writeln!(out, "{name}{{vcpu=\"{i}\"}} {v}");
                }
            }
            // null: the figure does not apply to this VM.
            _ => {}
        }
    }
    out
}

/// The VM's figures for the HTTP server.
#[derive(Debug)]
pub struct VmSource {
    stats: Arc<StatsSource>,
    start: Instant,
}

impl VmSource {
    /// Serves `stats`, of a VM started at `start`.
    pub fn new(stats: Arc<StatsSource>, start: Instant) -> Self {
        Self { stats, start }
    }
}

impl Source for VmSource {
    fn metrics(&self) -> String {
        let t_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        prometheus(&serde_json::to_value(self.stats.snapshot(t_ms)).unwrap_or(Value::Null))
    }

    fn health(&self) -> Result<String, String> {
        Ok(format!("ok: running for {} s", self.start.elapsed().as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::stats::MemStats;

    #[test]
    fn every_statistic_is_a_metric_and_counters_end_in_total() {
        let mut stats = MemStats {
            vcpu_faults: vec![3, 4],
            vcpu_fault_wait_us: vec![1_000_000, 0],
            ..MemStats::default()
        };
        stats.faults = 7;
        stats.guest_progress = Some(9);
        let json = serde_json::to_value(&stats).unwrap();
        let text = prometheus(&json);
        assert!(
            text.contains("# TYPE ebb_vm_faults_total counter\nebb_vm_faults_total 7\n"),
            "{text}"
        );
        assert!(text.contains("ebb_vm_vcpu_faults_total{vcpu=\"1\"} 4\n"), "{text}");
        assert!(text.contains("ebb_vm_vcpu_fault_wait_seconds_total{vcpu=\"0\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE ebb_vm_handler_cpu_seconds_total counter"), "{text}");
        assert!(
            text.contains("ebb_vm_consumed_bytes 0\n")
                && text.contains("ebb_vm_guest_progress 9\n")
        );
        // Every field is exported, but those that are null for this VM.
        for (field, v) in json.as_object().unwrap() {
            if !v.is_null() {
                assert!(text.contains(&format!("`{field}`")), "{field} is not exported");
            }
        }
        // A counter named in COUNTERS is a field that exists.
        for c in COUNTERS {
            assert!(json.get(c).is_some(), "{c} is no statistics field");
        }
    }
}
