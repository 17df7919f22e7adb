//! What the host reports: one [`HostReport`] per tick, written as a `--stats-json` line,
//! served as `{"host_stats": {}}`, drawn by `ebb top`, and turned into Prometheus's text
//! format for `{"metrics": {}}`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The host and every VM at one tick. Sizes in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// Milliseconds since the host started.
    pub t_ms: u64,
    /// The policy's name.
    pub policy: String,
    /// The memory budget.
    pub budget_bytes: u64,
    /// Budget less what the VMs consume (capped by the host's available memory).
    pub free_bytes: i64,
    /// minFree for the budget.
    pub min_free_bytes: u64,
    /// The memory state.
    pub state: String,
    /// State changes so far.
    pub transitions: u64,
    /// Milliseconds spent in each state, High to Low.
    pub state_ms: [u64; 5],
    /// Policy ticks so far.
    pub ticks: u64,
    /// CPU time of the last tick (polling, policy, levers), microseconds.
    pub tick_cpu_us: u64,
    /// CPU time of all ticks, milliseconds.
    pub host_cpu_ms: f64,
    /// The VMs, in start order.
    pub vms: Vec<VmReport>,
}

/// One VM at one tick. Sizes in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    /// Name.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Still running.
    pub running: bool,
    /// How it ended (`exit status 0`, `killed by signal 9`), once it has.
    pub exit: Option<String>,
    /// Guest memory configured.
    pub configured_bytes: u64,
    /// Host memory it consumes, metadata included.
    pub consumed_bytes: u64,
    /// Of that, guest pages resident in guest memory.
    pub resident_bytes: u64,
    /// Active memory.
    pub active_bytes: u64,
    /// Guest memory backed by shared pages.
    pub shared_bytes: u64,
    /// Host memory sharing saves (shared less pool pages, plus dropped zero pages).
    pub sharing_saved_bytes: u64,
    /// Guest memory in the balloon.
    pub ballooned_bytes: u64,
    /// Guest memory in the compression cache.
    pub compressed_bytes: u64,
    /// Guest memory in the swap file.
    pub swapped_bytes: u64,
    /// The policy's target.
    pub target_bytes: u64,
    /// The balloon lever.
    pub balloon_target_bytes: u64,
    /// The reclaim lever (None: off).
    pub reclaim_target_bytes: Option<u64>,
    /// The sharing lever, pages per second.
    pub share_scan_rate: u64,
    /// The allocation gate: new memory waits while this much is resident (None: open).
    pub alloc_wait_above_bytes: Option<u64>,
    /// Faults the gate held back so far.
    pub alloc_waits: u64,
    /// CPU time of the VM's memory threads (fault handler, reclaim, sharing scanner), ms.
    pub memory_cpu_ms: f64,
    /// Shares.
    pub shares: u64,
    /// Reservation.
    pub reservation_bytes: u64,
    /// Limit.
    pub limit_bytes: u64,
    /// The guest's balloon driver is up.
    pub balloon_ready: bool,
    /// Refaults so far (evicted pages touched again).
    pub refaults: u64,
    /// A payload's progress counter, when it has one.
    pub guest_progress: Option<u64>,
    /// What the host measured the VM to hold from outside (its cgroup, or its process's
    /// anonymous and shared memory), when it could; `consumed_bytes` is never below it less
    /// `figures::PROCESS_ALLOWANCE_BYTES`.
    #[serde(default)]
    pub measured_bytes: Option<u64>,
    /// The VM missed its last exchange (late, or a bad reply): its figures are old, and it
    /// gets no levers until it answers again.
    #[serde(default)]
    pub stale: bool,
}

/// Names of the states, High to Low, as `state_ms` orders them.
pub const STATE_NAMES: [&str; 5] = ["high", "clear", "soft", "hard", "low"];

/// Escapes a label value for Prometheus's text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, rows: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in rows {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

type VmGauge = (&'static str, &'static str, fn(&VmReport) -> f64);

/// Per-VM gauges: name, help, value.
const VM_GAUGES: [VmGauge; 10] = [
    ("ebb_vm_configured_bytes", "Guest memory configured.", |v| v.configured_bytes as f64),
    ("ebb_vm_consumed_bytes", "Host memory the VM consumes.", |v| v.consumed_bytes as f64),
    ("ebb_vm_active_bytes", "Estimated Active memory.", |v| v.active_bytes as f64),
    ("ebb_vm_shared_bytes", "Guest memory backed by shared pages.", |v| v.shared_bytes as f64),
    ("ebb_vm_ballooned_bytes", "Guest memory in the balloon.", |v| v.ballooned_bytes as f64),
    ("ebb_vm_compressed_bytes", "Guest memory in the compression cache.", |v| {
        v.compressed_bytes as f64
    }),
    ("ebb_vm_swapped_bytes", "Guest memory in the swap file.", |v| v.swapped_bytes as f64),
    ("ebb_vm_target_bytes", "The policy's memory target.", |v| v.target_bytes as f64),
    ("ebb_vm_running", "1 while the VM's process runs.", |v| f64::from(u8::from(v.running))),
    ("ebb_vm_refaults_total", "Evicted pages the guest touched again.", |v| v.refaults as f64),
];

impl HostReport {
    /// The report in Prometheus's text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let none = String::new();
        let host = |v: f64| vec![(none.clone(), v)];
        metric(
            &mut out,
            "ebb_host_budget_bytes",
            "Memory budget.",
            "gauge",
            &host(self.budget_bytes as f64),
        );
        metric(
            &mut out,
            "ebb_host_free_bytes",
            "Budget less what the VMs consume.",
            "gauge",
            &host(self.free_bytes as f64),
        );
        metric(
            &mut out,
            "ebb_host_min_free_bytes",
            "minFree for the budget.",
            "gauge",
            &host(self.min_free_bytes as f64),
        );
        let states: Vec<(String, f64)> = STATE_NAMES
            .iter()
            .map(|s| (format!("{{state=\"{s}\"}}"), f64::from(u8::from(self.state == *s))))
            .collect();
        metric(&mut out, "ebb_host_state", "1 for the current memory state.", "gauge", &states);
        let times: Vec<(String, f64)> = (STATE_NAMES.iter().zip(self.state_ms))
            .map(|(s, ms)| (format!("{{state=\"{s}\"}}"), ms as f64 / 1000.0))
            .collect();
        metric(
            &mut out,
            "ebb_host_state_seconds_total",
            "Time spent in each state.",
            "counter",
            &times,
        );
        metric(
            &mut out,
            "ebb_host_transitions_total",
            "State changes.",
            "counter",
            &host(self.transitions as f64),
        );
        metric(
            &mut out,
            "ebb_host_cpu_seconds_total",
            "CPU time of the policy ticks.",
            "counter",
            &host(self.host_cpu_ms / 1000.0),
        );
        for (name, help, value) in VM_GAUGES {
            let rows: Vec<(String, f64)> = self
                .vms
                .iter()
                .map(|v| (format!("{{vm=\"{}\"}}", label(&v.name)), value(v)))
                .collect();
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            metric(&mut out, name, help, kind, &rows);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_labelled_samples() {
        let r = HostReport {
            budget_bytes: 768 << 20,
            state: "soft".into(),
            state_ms: [1500, 0, 250, 0, 0],
            vms: vec![VmReport {
                name: "a\"b".into(),
                consumed_bytes: 42,
                running: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = r.prometheus();
        assert!(
            text.contains("# TYPE ebb_host_budget_bytes gauge\nebb_host_budget_bytes 805306368\n"),
            "{text}"
        );
        assert!(text.contains("ebb_host_state{state=\"soft\"} 1\n"));
        assert!(text.contains("ebb_host_state{state=\"high\"} 0\n"));
        assert!(text.contains("ebb_host_state_seconds_total{state=\"high\"} 1.5\n"));
        assert!(text.contains("ebb_vm_consumed_bytes{vm=\"a\\\"b\"} 42\n"));
        assert!(text.contains("ebb_vm_running{vm=\"a\\\"b\"} 1\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }
}
