//! A VM's figures, read with suspicion: what it reports over its control socket is
//! saturated and clamped to what a VM of its size could hold, and what it holds is also
//! measured from outside, the larger of the two counting.
//!
//! A VM is not trusted: a `consumed_bytes` of `u64::MAX` must not overflow the host's sums
//! (a debug build panics, and every VM goes with the host), and a VM that reports less
//! than it holds must not take the others' share. So every figure is read as a `u64` (a
//! negative, fractional or missing one is 0), products and sums saturate, each byte figure
//! is clamped to the VM's memory ([`most_consumed_bytes`] for what it consumes, which adds
//! the engine's metadata and buffers), and times must be finite and not negative.
//!
//! Measured from outside: the VM's cgroup's `memory.current` where the host put it in a
//! cgroup it owns, else the memory its process allocated, proportionally (`Pss_Anon` and
//! `Pss_Shmem` of `/proc/PID/smaps_rollup`: pages shared with the VMs of a sharing group
//! count a share each, not once per VM; the program's code, page cache that any `ebb run`
//! maps, is left out). The report counts the guest's memory and ebb's metadata, not the
//! process's own heap and stacks, so [`PROCESS_ALLOWANCE_BYTES`] comes off the measure
//! before the two are compared: a VM can hide at most that much. (Counting the whole
//! process, 3-13 MiB more per VM in a debug build, left ESX unable to reach minFree on a
//! small budget: no lever reclaims a process's own memory.) A non-dumpable process's
//! `/proc` files belong to root, so an unprivileged host cannot read them: it then counts
//! the clamped report alone, and says so once.

use std::path::Path;

use super::config::VmSpec;
use super::policy::VmView;
use crate::mm::stats::MemStats;
use crate::units::{MIB, PAGE_SIZE};

/// What a VM may consume beyond its memory, fixed part: the process itself (code, heap,
/// thread stacks, buffers).
pub const OVERHEAD_FIXED_BYTES: u64 = 64 * MIB;
/// And the part that grows with its memory: one eighth (the page-state table, the
/// compressed cache's and the sharing index's metadata stay well below it).
pub const OVERHEAD_DIVISOR: u64 = 8;
/// What an `ebb run` process may hold for itself beyond what it reports (heap, thread
/// stacks): taken off the measure before it is compared with the report. A debug `ebb run`
/// of a touch guest held about 3 MiB of anonymous memory beyond its report.
pub const PROCESS_ALLOWANCE_BYTES: u64 = 16 * MIB;

/// The most a VM of `memory_bytes` can consume: its memory and the stated overhead.
pub fn most_consumed_bytes(memory_bytes: u64) -> u64 {
    memory_bytes
        .saturating_add(memory_bytes / OVERHEAD_DIVISOR)
        .saturating_add(OVERHEAD_FIXED_BYTES)
}

/// Milliseconds as a VM reported them: 0 unless finite and not negative.
fn millis(ms: f64) -> f64 {
    if ms.is_finite() && ms >= 0.0 {
        ms
    } else {
        0.0
    }
}

/// What one `stats` reply says, made safe.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// The policy's view, `consumed_bytes` as reported (clamped).
    pub view: VmView,
    /// Fault and refault counters (only their differences are used, saturating).
    pub faults: u64,
    /// Refaults so far.
    pub refaults: u64,
    /// Allocations that waited.
    pub alloc_waits: u64,
    /// CPU of the memory threads, ms (finite; may be large).
    pub cpu_ms: f64,
    /// The guest's progress counter.
    pub progress: Option<u64>,
    /// Bytes sharing saved.
    pub saved: u64,
}

/// The figures of `stats`, a `stats` reply of VM `spec`, with `balloon_ready` as found.
pub fn read(spec: &VmSpec, stats: &MemStats, balloon_ready: bool) -> Figures {
    let mem = spec.memory_bytes;
    let bytes = |n: u64| n.min(mem);
    let pages = |n: u64| n.saturating_mul(PAGE_SIZE).min(mem);
    let (r, sh) = (&stats.reclaim, &stats.sharing);
    let consumed = stats.consumed_bytes.saturating_add(stats.metadata_bytes);
    let saved = sh.sharing_saved_bytes.saturating_add(pages(sh.zero_pages_shared)).min(mem);
    let cpu_ms = [stats.handler_cpu_ms, r.reclaim_cpu_ms, sh.sharing_cpu_ms]
        .into_iter()
        .map(millis)
        .sum::<f64>();
    Figures {
        view: VmView {
            consumed_bytes: consumed.min(most_consumed_bytes(mem)),
            resident_bytes: bytes(r.resident_bytes),
            active_bytes: bytes(stats.active_bytes),
            shared_bytes: bytes(sh.shared_bytes),
            sharing_saved_bytes: saved,
            share_scanned_pages: sh.share_scanned,
            ballooned_bytes: bytes(stats.ballooned_bytes),
            compressed_bytes: pages(r.zcache_pages),
            swapped_bytes: bytes(r.swapped_bytes),
            balloon_ready,
            ..base_view(spec)
        },
        faults: stats.faults,
        refaults: r.refaults,
        alloc_waits: stats.alloc_waits,
        // Three finite sums can still be infinite.
        cpu_ms: if cpu_ms.is_finite() { cpu_ms } else { f64::MAX },
        progress: stats.guest_progress,
        saved,
    }
}

/// The view of VM `spec` before it has reported anything: its description only.
pub fn base_view(spec: &VmSpec) -> VmView {
    VmView {
        name: spec.entry.name.clone(),
        configured_bytes: spec.memory_bytes,
        reservation_bytes: spec.reservation_bytes,
        limit_bytes: spec.limit_bytes,
        shares: spec.shares,
        ..VmView::default()
    }
}

/// Field `key` (`"Pss_Anon:"`) of an `smaps_rollup` text, bytes.
fn rollup_field(rollup: &str, key: &str) -> Option<u64> {
    let line = rollup.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The memory a process allocated, of an `smaps_rollup` text: `Pss_Anon` + `Pss_Shmem`, or
/// `Pss` on kernels before 5.9, which lack them.
fn allocated_bytes(rollup: &str) -> Option<u64> {
    match (rollup_field(rollup, "Pss_Anon:"), rollup_field(rollup, "Pss_Shmem:")) {
        (Some(anon), shmem) => Some(anon.saturating_add(shmem.unwrap_or(0))),
        (None, _) => rollup_field(rollup, "Pss:"),
    }
}

/// What counts of a VM: the larger of its (clamped) report and its measure less the
/// process's allowance.
pub fn counted_bytes(reported: u64, measured: Option<u64>) -> u64 {
    reported.max(measured.unwrap_or(0).saturating_sub(PROCESS_ALLOWANCE_BYTES))
}

/// Measures VMs from outside; remembers that it has said it cannot.
#[derive(Debug, Default)]
pub struct Meter {
    /// A permission error was logged.
    denied_logged: bool,
}

impl Meter {
    /// What process `pid` holds: `cgroup`'s `memory.current` if given, else the memory it
    /// allocated (proportional set size, anonymous and shared memory).
    /// None when it cannot be read (the process is gone, or its files are root's).
    pub fn measure(&mut self, pid: u32, cgroup: Option<&Path>) -> Option<u64> {
        if let Some(dir) = cgroup {
            let text = self.read(&dir.join("memory.current"))?;
            return text.trim().parse().ok();
        }
        allocated_bytes(&self.read(Path::new(&format!("/proc/{pid}/smaps_rollup")))?)
    }

    fn read(&mut self, path: &Path) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                if !std::mem::replace(&mut self.denied_logged, true) {
                    log::info!(
                        "cannot read {} ({e}): VMs are counted at what they report, clamped \
                         to their size (further such errors are not logged)",
                        path.display()
                    );
                }
                None
            }
            Err(e) => {
                log::debug!("{}: {e}", path.display());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(mem: u64) -> VmSpec {
        let toml = format!(
            "budget = \"4G\"\n[[vm]]\nname = \"a\"\nmemory = \"{}M\"\nfirmware = \"touch\"\n",
            mem >> 20
        );
        let dir = crate::host::rundir::PrivateDir::new("ebb-figures-unit-").unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(&path, toml).unwrap();
        let over = crate::host::config::HostOverrides::default();
        crate::host::config::HostConfig::load(Some(&path), &over).unwrap().vms.remove(0)
    }

    #[test]
    fn figures_at_u64_max_saturate_and_are_clamped_to_what_the_vm_could_hold() {
        let s = spec(64 * MIB);
        let max = u64::MAX;
        let mut stats = MemStats {
            consumed_bytes: max,
            metadata_bytes: max,
            faults: max,
            ..MemStats::default()
        };
        stats.reclaim.resident_bytes = max;
        stats.reclaim.zcache_pages = max;
        stats.reclaim.swapped_bytes = max;
        stats.sharing.sharing_saved_bytes = max;
        stats.sharing.zero_pages_shared = max;
        let f = read(&s, &stats, false);
        assert_eq!(f.view.consumed_bytes, 64 * MIB + 8 * MIB + OVERHEAD_FIXED_BYTES);
        assert_eq!(f.view.resident_bytes, 64 * MIB);
        assert_eq!(f.view.compressed_bytes, 64 * MIB);
        assert_eq!(f.view.swapped_bytes, 64 * MIB);
        assert_eq!(f.saved, 64 * MIB);
        assert_eq!(f.faults, max);
    }

    #[test]
    fn negative_fractional_and_missing_figures_are_not_statistics() {
        use serde::Deserialize;
        let full = serde_json::to_value(MemStats::default()).unwrap();
        assert!(MemStats::deserialize(&full).is_ok());
        for (key, bad) in [("consumed_bytes", json!(-5)), ("active_bytes", json!(1.5))] {
            let mut v = full.clone();
            v[key] = bad;
            assert!(MemStats::deserialize(&v).is_err(), "{key}");
        }
        let mut v = full;
        v.as_object_mut().unwrap().remove("resident_bytes");
        assert!(MemStats::deserialize(&v).is_err(), "a missing field is refused, not 0");
    }

    #[test]
    fn cpu_times_that_are_not_finite_or_negative_do_not_poison_the_sum() {
        let s = spec(64 * MIB);
        let mut stats = MemStats { handler_cpu_ms: -3.0, ..MemStats::default() };
        stats.reclaim.reclaim_cpu_ms = 2.5;
        let f = read(&s, &stats, false);
        assert!((f.cpu_ms - 2.5).abs() < 1e-9);
        stats.handler_cpu_ms = 1e308;
        stats.reclaim.reclaim_cpu_ms = 1e308;
        assert!(read(&s, &stats, false).cpu_ms.is_finite());
    }

    #[test]
    fn the_most_a_vm_consumes_never_overflows() {
        assert_eq!(most_consumed_bytes(u64::MAX), u64::MAX);
        assert_eq!(most_consumed_bytes(0), OVERHEAD_FIXED_BYTES);
    }

    #[test]
    fn allocated_memory_is_anonymous_and_shared_pss_or_pss_on_old_kernels() {
        let text = "55d0-7ff [rollup]\nRss:   2048 kB\nPss:   1024 kB\nPss_Anon: 1000 kB\n\
                    Pss_File: 20 kB\nPss_Shmem: 4 kB\n";
        assert_eq!(allocated_bytes(text), Some(1004 * 1024));
        assert_eq!(allocated_bytes("Rss: 2 kB\nPss: 1 kB\n"), Some(1024));
        assert_eq!(allocated_bytes("Rss: 1 kB\n"), None);
    }

    #[test]
    fn the_larger_of_report_and_measure_less_the_allowance_counts() {
        assert_eq!(counted_bytes(10 * MIB, None), 10 * MIB);
        assert_eq!(counted_bytes(10 * MIB, Some(20 * MIB)), 10 * MIB);
        assert_eq!(counted_bytes(0, Some(80 * MIB)), 80 * MIB - PROCESS_ALLOWANCE_BYTES);
        assert_eq!(counted_bytes(u64::MAX, Some(u64::MAX)), u64::MAX);
    }

    #[test]
    fn a_process_is_measured_and_a_gone_one_is_none() {
        let mut m = Meter::default();
        let me = m.measure(std::process::id(), None);
        assert!(me.is_some_and(|b| b > 0), "{me:?}");
        assert_eq!(m.measure(u32::MAX, None), None);
    }

    #[test]
    fn a_cgroup_is_measured_by_its_memory_current() {
        let dir = crate::host::rundir::PrivateDir::new("ebb-figures-cg-").unwrap();
        std::fs::write(dir.path().join("memory.current"), "12345\n").unwrap();
        assert_eq!(Meter::default().measure(1, Some(dir.path())), Some(12345));
    }
}
