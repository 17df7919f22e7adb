//! Parts 3 and 4: swap-in latency against a bare fault, and the zswap workload, on ebb's engine.

use super::*;

// ---------------------------------------------------------------------------------------
// 3. Swap-in latency, and 4. the workload

/// An engine over fresh guest RAM with a compression cache and a swap file.
pub(crate) struct Vm {
    ram: GuestRam,
    _mm: Arc<MemoryManager>,
    engine: Engine,
    _swap_dir: TempDir,
}

impl Vm {
    pub(crate) fn new(mem: u64, cache: u64, config: &EngineConfig) -> Result<Self, String> {
        let ram = GuestRam::new(mem, 48).map_err(|e| e.to_string())?;
        let swap_dir = TempDir::new("swap");
        let swap = SwapFile::create(&swap_dir.0, mem).map_err(|e| e.to_string())?;
        let backing = Arc::new(Backing::new(mem / PAGE_U64, cache, Some(swap)));
        let mm = Arc::new(MemoryManager::new(&ram.regions(), true).with_backing(backing));
        let engine = Engine::start(&mm, config, None)
            .map_err(|e| format!("userfaultfd unavailable here ({e})"))?;
        if engine.reclaim().is_none() {
            return Err("no UFFDIO_MOVE on this kernel (Linux 6.8+)".into());
        }
        Ok(Self { ram, _mm: mm, engine, _swap_dir: swap_dir })
    }

    pub(crate) fn page(&self, idx: usize) -> *mut u8 {
        (self.ram.regions()[0].hva as usize + idx * PAGE) as *mut u8
    }

    pub(crate) fn write(&self, idx: usize, page: &Page) {
        // SAFETY: idx is inside guest RAM; the source is a page of ours.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), self.page(idx), PAGE) };
    }

    pub(crate) fn matches(&self, idx: usize, page: &Page) -> bool {
        // SAFETY: idx is inside guest RAM, mapped for the VM's life.
        let got = unsafe { std::slice::from_raw_parts(self.page(idx), PAGE) };
        got == &page[..]
    }

    pub(crate) fn resident(&self) -> u64 {
        self.engine.table().count(PageState::Resident)
    }

    /// Waits until at most `pages` pages are resident; false after `limit`.
    pub(crate) fn wait_resident(&self, pages: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.resident() > pages {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// ns of a first access to the page at `p` (a read, or a write of one word).
pub(crate) fn timed_access(p: *mut u8, write: bool) -> f64 {
    let t = Instant::now();
    // SAFETY: callers pass a page of guest RAM.
    unsafe {
        if write {
            p.cast::<u64>().write_volatile(1);
        } else {
            black_box(p.cast::<u64>().read_volatile());
        }
    }
    t.elapsed().as_nanos() as f64
}

pub(crate) const SWAPIN_CASES: [&str; 4] = [
    "bare first touch, write (UFFDIO_COPY)",
    "bare first touch, read (UFFDIO_ZEROPAGE)",
    "swap-in from the compression cache",
    "swap-in from the swap file",
];

/// One round of part 3: per-case samples (ns), and the engine's (p50, p99) for the cache
/// and the swap file (us).
pub(crate) fn swapin_round(
    pool: &[(Kind, Box<Page>)],
    p: usize,
    round: usize,
) -> Result<(Vec<Vec<f64>>, [f64; 4]), String> {
    let config = EngineConfig {
        handler: HandlerConfig {
            fault_around: FaultAround::Fixed(0),
            active: None,
            oom_wait: DEFAULT_OOM_WAIT,
        },
        ..Default::default()
    };
    // Pages [0, p): text (cache), [p, 2p): random (swap), [2p, 3p): read first,
    // [3p, 4p): written first.
    let vm = Vm::new((4 * p * PAGE) as u64, (2 * p * PAGE) as u64, &config)?;
    let text: Vec<&Page> =
        pool.iter().filter(|(k, _)| *k == Kind::Text).map(|(_, p)| &**p).collect();
    let mut rng = Rng(0x5eed + round as u64);
    let random: Vec<Box<Page>> = (0..p).map(|_| random_page(&mut rng)).collect();
    for i in 0..p {
        vm.write(i, text[i % text.len()]);
        vm.write(p + i, &random[i]);
    }
    let control = vm.engine.reclaim().unwrap().clone();
    control.set_target(Some(0));
    if !vm.wait_resident(0, Duration::from_secs(120)) {
        return Err(format!("eviction stalled with {} pages resident", vm.resident()));
    }
    control.set_target(None);
    let state = |idx: usize| vm.engine.table().get(idx as u64);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); SWAPIN_CASES.len()];
    // A scattered order, as a guest's accesses would be; the four kinds interleaved.
    for k in 0..p {
        let i = (k as u64 * PERMUTE % p as u64) as usize;
        for (case, idx) in [(0, 3 * p + i), (1, 2 * p + i), (2, i), (3, p + i)] {
            let before = state(idx);
            let ns = timed_access(vm.page(idx), case == 0);
            let case = match before {
                Some(PageState::Compressed) => 2,
                Some(PageState::Swapped) => 3,
                Some(PageState::Untouched) if case <= 1 => case,
                _ => continue, // not evicted (should not happen): not a swap-in
            };
            samples[case].push(ns);
        }
    }
    for i in 0..p {
        assert!(vm.matches(i, text[i % text.len()]), "text page {i} read back wrong");
        assert!(vm.matches(p + i, &random[i]), "random page {i} read back wrong");
    }
    let r = vm.engine.snapshot(0).reclaim;
    let engine = [
        r.swapin_zcache_p50_us,
        r.swapin_zcache_p99_us,
        r.swapin_swap_p50_us,
        r.swapin_swap_p99_us,
    ];
    vm.engine.stop().map_err(|e| e.to_string())?;
    Ok((samples, engine))
}

pub(crate) fn part_swapin(pool: &[(Kind, Box<Page>)], p: usize, rounds: usize) -> Value {
    println!(
        "\n== 3. Swap-in latency as the faulting thread sees it (host threads, no KVM; fault-around \
         off), {p} pages per case, {rounds} rounds, scattered order"
    );
    let mut per_round: Vec<Vec<f64>> = vec![Vec::new(); SWAPIN_CASES.len()];
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); SWAPIN_CASES.len()];
    let mut engine: Vec<[f64; 4]> = Vec::new();
    for round in 0..rounds {
        match swapin_round(pool, p, round) {
            Ok((samples, e)) => {
                for (c, s) in samples.into_iter().enumerate() {
                    per_round[c].push(median(s.clone()));
                    all[c].extend(s);
                }
                engine.push(e);
            }
            Err(why) => {
                skip("part 3", &why);
                return Value::Null;
            }
        }
    }
    let med: Vec<f64> = per_round.into_iter().map(median).collect();
    let counts: Vec<usize> = all.iter().map(Vec::len).collect();
    let p99: Vec<f64> = all.into_iter().map(|v| quantile(v, 990)).collect();
    let base = med[0];
    for (c, name) in SWAPIN_CASES.iter().enumerate() {
        println!(
            "  {name:42} p50 {} us  p99 {} us  ({:6} pages)   x{} of a bare write fault",
            num(med[c] / 1e3, 7, 1),
            num(p99[c] / 1e3, 7, 1),
            counts[c],
            num(med[c] / base, 4, 2)
        );
    }
    let e = |k: usize| median(engine.iter().map(|e| e[k]).collect());
    println!(
        "  the engine's own service time (fault read to page mapped): cache p50 {:.1} us p99 {:.1} us, swap file p50 {:.1} us p99 {:.1} us",
        e(0),
        e(1),
        e(2),
        e(3)
    );
    let (cache, swap) = (med[2] / base, med[3] / base);
    println!(
        "  ratios: cache swap-in / bare fault = {cache:.2} (goal <= {GOAL_SWAPIN_RATIO}: {}), swap-file swap-in / bare fault = {swap:.2}, \
         cache swap-in / bare read fault = {:.2}",
        if cache <= GOAL_SWAPIN_RATIO { "met" } else { "NOT met" },
        med[2] / med[1]
    );
    println!(
        "  (cache pages: text-like, swap-file pages: random; each from the state it was in before \
         the read. A bare read maps the zero page,\n  write-protects it and wakes the thread: \
         three ioctls where userfaultfd offers write protection; a write or a swap-in is one.)"
    );
    json!({"bare_write_us": med[0] / 1e3, "bare_read_us": med[1] / 1e3,
           "cache_us": med[2] / 1e3, "swap_us": med[3] / 1e3,
           "bare_write_p99_us": p99[0] / 1e3, "cache_p99_us": p99[2] / 1e3, "swap_p99_us": p99[3] / 1e3,
           "engine_cache_p50_us": e(0), "engine_cache_p99_us": e(1),
           "engine_swap_p50_us": e(2), "engine_swap_p99_us": e(3),
           "cache_ratio": cache, "swap_ratio": swap})
}

pub(crate) fn part_workload(
    pool: &[(Kind, Box<Page>)],
    workload_mib: u64,
    limit_mib: u64,
) -> Value {
    println!(
        "\n== 4. ebb on the zswap workload: {workload_mib} MiB of the mix written with a resident \
         target of {limit_mib} MiB, then reread (host threads, engine defaults, 1 run)"
    );
    let (mem, target) = (workload_mib << 20, limit_mib << 20);
    let pages = (mem / PAGE_U64) as usize;
    let config = EngineConfig { reclaim_target: Some(target), ..Default::default() };
    let vm = match Vm::new(mem, mem * DEFAULT_CACHE_PERCENT / 100, &config) {
        Ok(vm) => vm,
        Err(why) => {
            skip("part 4", &why);
            return Value::Null;
        }
    };
    let t0 = Instant::now();
    for i in 0..pages {
        vm.write(i, &pool[i % pool.len()].1);
    }
    let write = t0.elapsed();
    let settled_ok = vm.wait_resident(target / PAGE_U64, Duration::from_secs(120));
    let settled = t0.elapsed();
    let s1 = vm.engine.snapshot(0);
    let table = vm.engine.table();
    let stored = table.count(PageState::Compressed) + table.count(PageState::Swapped);
    let t1 = Instant::now();
    let bad = (0..pages).filter(|&i| !vm.matches(i, &pool[i % pool.len()].1)).count();
    let reread = t1.elapsed();
    let s2 = vm.engine.snapshot(0);
    assert_eq!(bad, 0, "pages read back wrong");
    let r1 = &s1.reclaim;
    let r2 = &s2.reclaim;
    let refaults = r2.refaults - r1.refaults;
    let per_page = |d: Duration| d.as_secs_f64() * 1e6 / pages as f64;
    let cpu_s = r1.reclaim_cpu_ms / 1e3;
    let evict_cpu = r1.evictions as f64 / cpu_s;
    let evict_wall = r1.evictions as f64 / settled.as_secs_f64();
    println!(
        "  write {:.2} us/page ({:.2} s); resident reached the target {:.2} s after the first write{}",
        per_page(write),
        write.as_secs_f64(),
        settled.as_secs_f64(),
        if settled_ok { "" } else { " (NOT reached in 120 s)" }
    );
    println!(
        "  reclaim worker: {} pages evicted in {:.0} ms of CPU: {:.0} pages per CPU second; {:.0} pages/s of wall time",
        r1.evictions, r1.reclaim_cpu_ms, evict_cpu, evict_wall
    );
    println!(
        "  where they went: {} zero pages dropped, {} in the cache ({} same-filled) in {:.1} MiB of slabs, \
         {:.1} MiB to the swap file ({} written back from the cache)",
        r1.zero_pages_dropped,
        r1.zcache_pages,
        r1.same_filled_pages,
        r1.zcache_bytes as f64 / 1048576.0,
        r1.swapped_bytes as f64 / 1048576.0,
        r1.written_back
    );
    println!(
        "  consumed {:.1} MiB (resident {:.1} MiB + cache) for {workload_mib} MiB written",
        s1.consumed_bytes as f64 / 1048576.0,
        r1.resident_bytes as f64 / 1048576.0
    );
    println!(
        "  reread (and check) {:.2} us/page ({:.2} s): {refaults} refaults ({} cache, {} swap file; \
         {stored} pages were stored when it began,\n  the resident ones are evicted before their \
         turn), {:.1} us per refault on average; engine swap-in p50/p99 cache {:.1}/{:.1} us, \
         swap file {:.1}/{:.1} us",
        per_page(reread),
        reread.as_secs_f64(),
        r2.swapins_zcache - r1.swapins_zcache,
        r2.swapins_swap - r1.swapins_swap,
        reread.as_secs_f64() * 1e6 / refaults as f64,
        r2.swapin_zcache_p50_us,
        r2.swapin_zcache_p99_us,
        r2.swapin_swap_p50_us,
        r2.swapin_swap_p99_us
    );
    let out = json!({"workload_mib": workload_mib, "limit_mib": limit_mib, "pages": pages,
           "write_us": per_page(write), "reread_us": per_page(reread),
           "settle_s": settled.as_secs_f64(), "evictions": r1.evictions,
           "reclaim_cpu_ms": r1.reclaim_cpu_ms,
           "evictions_per_cpu_s": evict_cpu, "evictions_per_wall_s": evict_wall,
           "zero_dropped": r1.zero_pages_dropped, "cache_pages": r1.zcache_pages,
           "cache_fill_pages": r1.same_filled_pages, "cache_bytes": r1.zcache_bytes,
           "compressed_bytes": r1.compressed_bytes, "swapped_bytes": r1.swapped_bytes,
           "consumed_bytes": s1.consumed_bytes, "resident_bytes": r1.resident_bytes,
           "refaults": refaults, "stored_pages": stored,
           "swapin_cache_p50_us": r2.swapin_zcache_p50_us, "swapin_cache_p99_us": r2.swapin_zcache_p99_us,
           "swapin_swap_p50_us": r2.swapin_swap_p50_us, "swapin_swap_p99_us": r2.swapin_swap_p99_us});
    vm.engine.stop().unwrap();
    out
}
