//! Engine statistics: fault counters, a latency histogram, and handler CPU time.
//!
//! Written by the fault-handler thread, read by the stats writer: all atomics, no locks.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Sub-buckets per power of two in the latency histogram (about 3% resolution).
const SUB_BUCKETS: u64 = 32;
/// Powers of two covered: 1 ns to about 1 s.
const OCTAVES: u64 = 30;
const BUCKETS: usize = 32 * 30;
const _: () = assert!(BUCKETS as u64 == SUB_BUCKETS * OCTAVES);

/// Rounds a non-negative float to u64, saturating (NaN and negatives give 0).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn round_u64(x: f64) -> u64 {
    // `as` from float saturates at the integer bounds and maps NaN to 0: the clamping we want.
    x.round().max(0.0) as u64
}

/// A log-linear histogram of nanosecond values.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB_BUCKETS {
        return usize::try_from(ns).unwrap_or(0);
    }
    let octave = 63 - u64::from(ns.leading_zeros()); // >= 5
    let sub = (ns >> (octave - 5)) & (SUB_BUCKETS - 1);
    let idx = (octave - 4) * SUB_BUCKETS + sub;
    usize::try_from(idx).unwrap_or(BUCKETS - 1).min(BUCKETS - 1)
}

/// The smallest value that lands in bucket `idx` (what a quantile reports).
fn bucket_floor(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < SUB_BUCKETS {
        return idx;
    }
    let octave = idx / SUB_BUCKETS + 4;
    let sub = idx % SUB_BUCKETS;
    (1 << octave) | (sub << (octave - 5))
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The value below which a fraction `q` (0..=1) of records fall; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        if total == 0 {
            return 0;
        }
        // Rank of the wanted record, 1-based; float only for the fraction.
        let rank = round_u64((q.clamp(0.0, 1.0) * total as f64).ceil()).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return bucket_floor(i);
            }
        }
        bucket_floor(BUCKETS - 1)
    }
}

/// Nanoseconds since `since`, saturated: what the latency histograms record.
pub fn elapsed_ns(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// vCPUs whose faults are counted apart (the most a VM has).
pub const VCPU_SLOTS: usize = 32;

/// Faults per vCPU, told apart by the faulting thread's id, and the time each vCPU's faults
/// waited for the engine (from the handler's read of the fault to the page mapped, on
/// whichever thread mapped it): the memory pressure of each vCPU, which a host can steer by.
/// A vCPU thread registers itself when it starts; faults of other threads (devices, ebb's
/// own) count in the totals only.
#[derive(Debug, Default)]
pub struct VcpuFaults {
    /// Thread id of each vCPU (0: none registered).
    tids: [AtomicU32; VCPU_SLOTS],
    faults: [AtomicU64; VCPU_SLOTS],
    wait_ns: [AtomicU64; VCPU_SLOTS],
}

impl VcpuFaults {
    /// Registers the calling thread as vCPU `index` (ignored beyond [`VCPU_SLOTS`]).
    pub fn register_current_thread(&self, index: usize) {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        if let (Some(slot), Ok(tid)) = (self.tids.get(index), u32::try_from(tid)) {
            slot.store(tid, Ordering::Relaxed);
        }
    }

    /// The vCPU index of thread `tid`, if it is a registered vCPU (0 is no thread).
    pub fn index_of(&self, tid: u32) -> Option<usize> {
        if tid == 0 {
            return None;
        }
        self.tids.iter().position(|t| t.load(Ordering::Relaxed) == tid)
    }

    /// Counts a fault of vCPU `index` that waited `ns`.
    pub fn record(&self, index: usize, ns: u64) {
        if let (Some(f), Some(w)) = (self.faults.get(index), self.wait_ns.get(index)) {
            f.fetch_add(1, Ordering::Relaxed);
            w.fetch_add(ns, Ordering::Relaxed);
        }
    }

    /// Faults and waits (microseconds) of vCPUs 0 up to the highest registered.
    pub fn snapshot(&self) -> (Vec<u64>, Vec<u64>) {
        let n = self.tids.iter().rposition(|t| t.load(Ordering::Relaxed) != 0).map_or(0, |i| i + 1);
        let faults = self.faults[..n].iter().map(|f| f.load(Ordering::Relaxed)).collect();
        let waits = self.wait_ns[..n].iter().map(|w| w.load(Ordering::Relaxed) / 1000).collect();
        (faults, waits)
    }
}

/// Counters of the fault handler.
#[derive(Debug)]
pub struct FaultStats {
    /// Read faults on untouched pages resolved with the zero page.
    pub zero: AtomicU64,
    /// Write faults resolved with a private zeroed page.
    pub copy: AtomicU64,
    /// Extra untouched pages filled by fault-around.
    pub around_pages: AtomicU64,
    /// Write faults on write-protected pages (Active sampling).
    pub wp: AtomicU64,
    /// Faults that found the page already mapped (a race or fault-around).
    pub already_mapped: AtomicU64,
    /// Faults put back for a retry: an ioctl said EAGAIN (a remove was pending), or the page
    /// was in flight with a mover.
    pub retries: AtomicU64,
    /// Faults put back because the kernel had no memory for the page (`ENOMEM`).
    pub no_memory: AtomicU64,
    /// Remove events read.
    pub removes: AtomicU64,
    /// Pages removed by those events.
    pub removed_pages: AtomicU64,
    /// Handler service time per fault, from reading the event to the resolving ioctl's return.
    pub latency: Histogram,
    /// The same per vCPU.
    pub vcpus: VcpuFaults,
    /// The handler thread's CPU-time clock.
    clock: super::thread::ThreadClock,
}

impl Default for FaultStats {
    fn default() -> Self {
        Self {
            zero: AtomicU64::new(0),
            copy: AtomicU64::new(0),
            around_pages: AtomicU64::new(0),
            wp: AtomicU64::new(0),
            already_mapped: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            no_memory: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            removed_pages: AtomicU64::new(0),
            latency: Histogram::default(),
            vcpus: VcpuFaults::default(),
            clock: super::thread::ThreadClock::default(),
        }
    }
}

impl FaultStats {
    /// Records the calling thread as the handler whose CPU time [`cpu_ns`](Self::cpu_ns) reports.
    pub fn set_cpu_clock_of_current_thread(&self) {
        self.clock.start_here();
    }

    /// CPU time the handler thread has used so far, in nanoseconds (0 before it starts and,
    /// as the clock dies with the thread, after it exits: read it while the VM runs).
    pub fn cpu_ns(&self) -> u64 {
        self.clock.ns()
    }

    /// Faults resolved (zero + copy + wp).
    pub fn faults(&self) -> u64 {
        self.zero.load(Ordering::Relaxed)
            + self.copy.load(Ordering::Relaxed)
            + self.wp.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [1, 31, 32, 33, 100, 1_000, 45_000, 1_000_000, 900_000_000] {
            let b = bucket_of(ns);
            assert!(b >= last, "{ns}");
            last = b;
            let floor = bucket_floor(b);
            assert!(floor <= ns && ns - floor <= ns / 16 + 1, "{ns} -> {floor}");
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let h = Histogram::default();
        for i in 1..=100u64 {
            h.record(i * 1000);
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((48_000..=50_000).contains(&p50), "{p50}");
        assert!((96_000..=99_000).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn empty_histogram_reports_zero() {
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}

/// One line of `--stats-json`: the VM's memory as the engine sees it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemStats {
    /// Milliseconds since the VM started.
    pub t_ms: u64,
    /// Faults of each vCPU (index order), counted as the engine resolved them.
    pub vcpu_faults: Vec<u64>,
    /// Microseconds each vCPU's faults waited for the engine, in all.
    pub vcpu_fault_wait_us: Vec<u64>,
    /// Host memory backing the guest: Resident pages, plus the compression cache's slabs
    /// and any pages held uncompressed by a failed eviction.
    pub consumed_bytes: u64,
    /// Estimated bytes the guest actively writes (Active memory).
    pub active_bytes: u64,
    /// Bytes the guest has touched and that are mapped: resident plus zero-page mapped.
    pub touched_bytes: u64,
    /// Bytes mapped to the shared zero page after read faults.
    pub zero_mapped_bytes: u64,
    /// Bytes the guest gave back through the balloon (inflated, not yet deflated).
    pub ballooned_bytes: u64,
    /// Resident set of the guest-RAM mappings from `/proc/self/smaps` (cross-check).
    pub rss_bytes: u64,
    /// Faults resolved: zero + copy + wp.
    pub faults: u64,
    /// Read faults served with the zero page.
    pub faults_zero: u64,
    /// Write faults served with a private zeroed page.
    pub faults_copy: u64,
    /// Writes to pages write-protected by the Active sampler.
    pub faults_wp: u64,
    /// Extra pages filled by fault-around.
    pub fault_around_pages: u64,
    /// `madvise` remove events.
    pub remove_events: u64,
    /// Pages those removed.
    pub removed_pages: u64,
    /// Faults whose page was already mapped (duplicate events; resolved by a wake).
    pub faults_already_mapped: u64,
    /// Faults put back for a retry: EAGAIN (a pending `madvise`) or a page in flight.
    pub fault_retries: u64,
    /// Faults put back because the kernel had no memory for the page (ENOMEM).
    pub fault_no_memory: u64,
    /// Median handler service time per fault (event read to ioctl return), microseconds.
    pub fault_p50_us: f64,
    /// 99th percentile of the same.
    pub fault_p99_us: f64,
    /// CPU time of the fault-handler thread, milliseconds.
    pub handler_cpu_ms: f64,
    /// Active-memory sampling intervals completed.
    pub active_samples: u64,
    /// Metadata the engine keeps for this VM, bytes.
    pub metadata_bytes: u64,
    /// A firmware payload's progress counter (touch counts the pages it rewrote), read
    /// from guest memory; null for other guests.
    pub guest_progress: Option<u64>,
    /// The allocation gate: new guest pages wait while this much is resident (null: open).
    pub alloc_gate_bytes: Option<u64>,
    /// Faults the gate held back (each look counts).
    pub alloc_waits: u64,
    /// Faults the gate let through after its longest wait.
    pub alloc_wait_timeouts: u64,
    /// Host-side reclaim (all zero when it never ran).
    #[serde(flatten)]
    pub reclaim: ReclaimStats,
    /// Page sharing (all zero when it never ran).
    #[serde(flatten)]
    pub sharing: ShareStats,
}

/// The page-sharing part of a statistics line.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShareStats {
    /// The lever: pages hashed per second (0: off).
    pub share_scan_rate: u64,
    /// Guest memory backed by shared pool pages (Shared pages).
    pub shared_bytes: u64,
    /// Host memory of the pool pages those map (counted in Consumed; in a sharing group,
    /// this VM's part of the group's pool, in proportion to the pages it maps).
    pub sharing_pool_bytes: u64,
    /// Host memory sharing saves now: shared bytes less the pool's.
    pub sharing_saved_bytes: u64,
    /// Zero pages the scanner dropped (they read as the zero page again).
    pub zero_pages_shared: u64,
    /// Pages hashed so far.
    pub share_scanned: u64,
    /// Passes over guest RAM completed.
    pub share_passes: u64,
    /// Pages made to map a pool page so far.
    pub share_merged: u64,
    /// Candidates whose hash matched but whose contents did not (left private).
    pub share_collisions: u64,
    /// Shared pages the guest wrote, each given a private copy.
    pub cow_breaks: u64,
    /// Scanner visits skipped because the page was written while shared not long ago.
    pub share_backoff_skips: u64,
    /// Candidates left private because the pool page could not be mapped over them.
    pub share_map_failures: u64,
    /// Candidates skipped because shared pages use their share of `vm.max_map_count`.
    pub share_map_limited: u64,
    /// CPU time of the sharing scanner, milliseconds.
    pub sharing_cpu_ms: f64,
    /// In a sharing group: host memory of the whole group's pool (this VM's part is in
    /// `sharing_pool_bytes`); null for a VM that shares only with itself.
    pub sharing_group_pool_bytes: Option<u64>,
}

/// The reclaim part of a statistics line.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReclaimStats {
    /// The lever: resident memory ebb keeps at most, bytes; null when reclaim is off.
    pub reclaim_target_bytes: Option<u64>,
    /// Guest bytes resident in guest memory (Resident pages only).
    pub resident_bytes: u64,
    /// Guest pages in the compression cache (compressed or same-filled).
    pub zcache_pages: u64,
    /// Of those, same-filled pages, each stored as one 8-byte word.
    pub same_filled_pages: u64,
    /// Compressed bytes the cache holds (the LZ4 output of its compressed pages).
    pub compressed_bytes: u64,
    /// Host memory of the cache's slabs (what `--zcache-max` caps).
    pub zcache_bytes: u64,
    /// Guest bytes in the cache per byte of slab (0 when empty).
    pub compression_ratio: f64,
    /// Guest bytes in the swap file.
    pub swapped_bytes: u64,
    /// Size of the swap file on disk.
    pub swap_file_bytes: u64,
    /// Swap writes that failed (ENOSPC, EIO, short): the pages stayed where they were.
    pub swap_errors: u64,
    /// Pages evicted so far.
    pub evictions: u64,
    /// Evicted pages that were all zero: dropped, nothing stored.
    pub zero_pages_dropped: u64,
    /// Pages written from the cache to the swap file because the cache was full.
    pub written_back: u64,
    /// Pages held uncompressed because an eviction could neither store nor put them back.
    pub held_pages: u64,
    /// Evicted pages the guest touched again (every swap-in is one).
    pub refaults: u64,
    /// Swap-ins from the compression cache.
    pub swapins_zcache: u64,
    /// Swap-ins from the swap file.
    pub swapins_swap: u64,
    /// Median time of a swap-in from the cache, fault read to mapped, microseconds.
    pub swapin_zcache_p50_us: f64,
    /// 99th percentile of the same.
    pub swapin_zcache_p99_us: f64,
    /// Median time of a swap-in from the swap file, microseconds.
    pub swapin_swap_p50_us: f64,
    /// 99th percentile of the same.
    pub swapin_swap_p99_us: f64,
    /// CPU time of the reclaim worker thread, milliseconds.
    pub reclaim_cpu_ms: f64,
}
