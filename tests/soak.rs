//! The engine soak without KVM: every mover of the memory engine at once on one registered
//! guest-RAM mapping, and a model that knows every byte of it.
//!
//! Host threads play the vCPUs: each owns a set of pages, keeps each page's version, checks
//! the whole page before every write and writes the next version. A thread playing the event
//! loop reads pages of every owner through the same mapping, as it reads virtqueues, and
//! checks them against the model; it owns a few pages of its own that it writes too. Owners
//! release their own pages at times (the balloon, free page reports) and then expect zeros.
//! Meanwhile the reclaim worker evicts toward a small target, faults bring pages back, and
//! the sharing scanner at full rate merges the pages whose versions have the same contents,
//! which the next write breaks again.
//!
//! Contents are a function of (page, version): versions cycle through zeros, two variants of
//! a pattern all pages of a group share, and a pattern of the page's own, so that each write
//! changes the page and many pages are duplicates at any time. It runs until both copy-on-write
//! breaks and evictions reach the goal (10^5 each in CI, see [`DEFAULT_GOAL`];
//! `EBB_SOAK_SCALE` multiplies it, `scripts/soak-engine.sh` runs 10^7), with a wall-clock cap
//! that fails with the counts reached. No byte may ever read wrong, and every page reads back
//! right once the engine is quiet.
//!
//! The soak found two ways guest RAM's mappings break the engine; each has a test of its
//! own at the bottom of this file.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb::mm::engine::{Engine, EngineConfig, VcpusStopped};
use ebb::mm::pages::{PageState, FLAG_IN_FLIGHT};
use ebb::mm::reclaim::store::Backing;
use ebb::mm::swap::SwapFile;
use ebb::mm::{MemoryManager, Release};
use ebb::vstate::memory::GuestRam;

const PAGE: u64 = 4096;
const WORDS: usize = 512;
/// Guest RAM: small, so that the scanner's passes are short and every page churns.
const MEM: u64 = 16 << 20;
const PAGES: u64 = MEM / PAGE;
/// Compression cache; pages that do not compress go to a swap file.
const CACHE: u64 = 2 << 20;
/// Resident memory the reclaim worker keeps evicting toward.
const TARGET: u64 = 256 * PAGE;
/// Threads playing vCPUs.
const VCPUS: u64 = 2;
/// Every this many pages, one belongs to the event loop.
const EVENT_LOOP_EVERY: u64 = 16;
/// Pattern groups: page `pfn` is in group `pfn % GROUPS`, whose pages hold the same bytes
/// at versions of the same group kind.
const GROUPS: u64 = 16;
/// Fast enough that the scanner works its whole budget every tick.
const FAST: u64 = 1 << 20;
/// Copy-on-write breaks and evictions of a CI run (times `EBB_SOAK_SCALE`). Breaks are the
/// slower: the scanner merges about 680 pages a second in a debug build on our 2-core
/// machines with everything else running (its work budget per tick bounds it, not the
/// guest's size), while reclaim evicts about 4,300; 10^5 breaks (and some 6 * 10^5
/// evictions) take about two and a half minutes there.
const DEFAULT_GOAL: f64 = 1e5;
/// Wall-clock cap of a CI run (times `EBB_SOAK_SCALE` when above 1).
const CAP: Duration = Duration::from_secs(15 * 60);
/// A counter short of its goal that has not moved for this long means a mover stopped.
const STALL: Duration = Duration::from_secs(60);
/// Mismatches printed in full (all are counted).
const SHOWN: u64 = 8;

/// What the versions of a page hold, in the order they cycle (each differs from the next).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    GroupA,
    GroupB,
    Own,
}

const CYCLE: [Kind; 8] = [
    Kind::Zero,
    Kind::GroupA,
    Kind::GroupB,
    Kind::GroupA,
    Kind::GroupB,
    Kind::GroupA,
    Kind::GroupB,
    Kind::Own,
];

fn kind(version: u64) -> Kind {
    CYCLE[(version % CYCLE.len() as u64) as usize]
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The group patterns, computed once: text-like (16-byte phrases from a dictionary of 64,
/// which LZ4 compresses to about 1 KiB), so that evicted copies go to the cache.
struct Patterns(Vec<[u64; WORDS]>);

impl Patterns {
    fn new() -> Self {
        let page = |g: u64| {
            let mut p = [0u64; WORDS];
            for (w, x) in p.iter_mut().enumerate() {
                let w = w as u64;
                *x = mix64(((mix64((g << 20) ^ (w / 2)) % 64) << 1) | (w % 2)) | 1;
            }
            p
        };
        Self((0..2 * GROUPS).map(page).collect())
    }

    /// Word `w` of page `pfn` at `version`.
    fn word(&self, pfn: u64, version: u64, w: usize) -> u64 {
        let group = pfn % GROUPS;
        match kind(version) {
            Kind::Zero => 0,
            Kind::GroupA => self.0[group as usize][w],
            Kind::GroupB => self.0[(GROUPS + group) as usize][w],
            // Random bytes: these do not compress and go to swap.
            Kind::Own => mix64((pfn << 40) ^ (version << 10) ^ w as u64) | 1,
        }
    }
}

/// Who owns page `pfn`: a vCPU (0..VCPUS) or the event loop (VCPUS).
fn owner(pfn: u64) -> u64 {
    if pfn % EVENT_LOOP_EVERY == EVENT_LOOP_EVERY - 1 {
        VCPUS
    } else {
        pfn % VCPUS
    }
}

/// Counters of the run.
#[derive(Default)]
struct Counts {
    wrong_bytes: AtomicU64,
    wrong_pages: AtomicU64,
    writes: AtomicU64,
    owner_checks: AtomicU64,
    reads_checked: AtomicU64,
    reads_racing: AtomicU64,
    releases: AtomicU64,
    releases_busy: AtomicU64,
}

struct Soak {
    engine: Engine,
    mm: Arc<MemoryManager>,
    ram: GuestRam,
    /// Per page, a sequence word: the version the page holds, times two, plus one while its
    /// owner changes it (the event loop skips such pages, as a seqlock reader does).
    seq: Vec<AtomicU64>,
    patterns: Patterns,
    counts: Counts,
    stop: AtomicBool,
    swap_dir: TempDir,
}

/// A directory removed (with what is left in it) when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ebb-soak-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The engine with reclaim stores and sharing at full rate; None (after a loud skip) where
/// the kernel cannot move pages or share them.
fn soak_or_skip(test: &str) -> Option<Soak> {
    let ram = GuestRam::new(MEM, 48).unwrap();
    let swap_dir = TempDir::new(test);
    let swap = SwapFile::create(&swap_dir.0, MEM).unwrap();
    let backing = Arc::new(Backing::new(PAGES, CACHE, Some(swap)));
    let mm = Arc::new(MemoryManager::new(&ram.regions(), true).with_backing(backing));
    let config = EngineConfig { share_scan_rate: FAST, ..Default::default() };
    let engine = match Engine::start(&mm, &config, None) {
        Ok(e) if e.sharing().is_some() && e.reclaim().is_some() => e,
        Ok(_) => {
            eprintln!("\n*** SKIPPED {test}: this kernel cannot share or evict pages (needs UFFDIO_MOVE and memfd write protection) ***\n");
            return None;
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED {test}: userfaultfd unavailable here ({e}) ***\n");
            return None;
        }
    };
    let seq = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    let (patterns, counts, stop) = (Patterns::new(), Counts::default(), AtomicBool::new(false));
    Some(Soak { engine, mm, ram, seq, patterns, counts, stop, swap_dir })
}

impl Soak {
    fn ptr(&self, pfn: u64) -> *mut u64 {
        (self.ram.regions()[0].hva + pfn * PAGE) as *mut u64
    }

    fn version(&self, pfn: u64) -> u64 {
        self.seq[pfn as usize].load(Ordering::Acquire) / 2
    }

    /// Copies page `pfn` out of guest RAM.
    fn read(&self, pfn: u64, out: &mut [u64; WORDS]) {
        let p = self.ptr(pfn);
        for (w, x) in out.iter_mut().enumerate() {
            // SAFETY: pfn is inside the soak's guest RAM mapping, w < 512.
            *x = unsafe { p.add(w).read_volatile() };
        }
    }

    fn write(&self, pfn: u64, version: u64) {
        let p = self.ptr(pfn);
        for w in 0..WORDS {
            // SAFETY: as in `read`.
            unsafe { p.add(w).write_volatile(self.patterns.word(pfn, version, w)) }
        }
    }

    /// Compares a copy of page `pfn` with `version`; counts (and shows the first few of)
    /// the wrong bytes. `who` says which thread looked.
    fn check(&self, who: &str, pfn: u64, version: u64, got: &[u64; WORDS]) -> bool {
        let mut wrong = 0u64;
        let mut first = None;
        for (w, &g) in got.iter().enumerate() {
            let want = self.patterns.word(pfn, version, w);
            if g != want {
                wrong += (g ^ want).to_le_bytes().iter().filter(|&&b| b != 0).count() as u64;
                first.get_or_insert((w, g, want));
            }
        }
        let Some((w, g, want)) = first else { return true };
        self.counts.wrong_bytes.fetch_add(wrong, Ordering::Relaxed);
        if self.counts.wrong_pages.fetch_add(1, Ordering::Relaxed) < SHOWN {
            eprintln!(
                "{who}: page {pfn} version {version} ({:?}): {wrong} wrong bytes, first word {w} \
                 is {g:#x}, want {want:#x}; the page is {:?} now",
                kind(version),
                self.engine.table().get(pfn)
            );
        }
        false
    }

    /// One step of page `pfn`'s owner: check the page, then make the next version, by a
    /// release (the balloon or a free page report) half the times the next one is zeros.
    fn step(&self, who: &str, pfn: u64, rng: u64, buf: &mut [u64; WORDS]) {
        let seq = &self.seq[pfn as usize];
        let now = seq.load(Ordering::Relaxed);
        self.read(pfn, buf);
        self.check(who, pfn, now / 2, buf);
        self.counts.owner_checks.fetch_add(1, Ordering::Relaxed);
        let next = now / 2 + 1;
        seq.store(now + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        if !(kind(next) == Kind::Zero && rng % 2 == 0 && self.release(pfn, rng)) {
            self.write(pfn, next);
            self.counts.writes.fetch_add(1, Ordering::Relaxed);
        }
        seq.store(next * 2, Ordering::Release);
    }

    /// Releases page `pfn` (the balloon, then a deflate; or a free page report); false if a
    /// mover held it, which leaves it as it was.
    fn release(&self, pfn: u64, rng: u64) -> bool {
        let gpa = self.ram.regions()[0].gpa + pfn * PAGE;
        let how = if rng & 2 == 0 { Release::Balloon } else { Release::Free };
        let done = self.mm.release(gpa, PAGE, how).unwrap();
        if done.pages == 0 {
            self.counts.releases_busy.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if how == Release::Balloon {
            self.mm.unballoon(gpa, PAGE).unwrap();
        }
        self.counts.releases.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A vCPU: steps its pages in random order until told to stop.
    fn vcpu(&self, id: u64) {
        let mine: Vec<u64> = (0..PAGES).filter(|&p| owner(p) == id).collect();
        let mut buf = [0u64; WORDS];
        let mut rng = mix64(id + 1);
        let who = format!("vcpu {id}");
        while !self.stop.load(Ordering::Relaxed) {
            rng = mix64(rng);
            self.step(&who, mine[(rng % mine.len() as u64) as usize], rng >> 32, &mut buf);
        }
    }

    /// The event loop: reads any page through the mapping, as it reads virtqueues, and
    /// checks it unless its owner was changing it meanwhile; every eighth turn it steps one
    /// of its own pages.
    fn event_loop(&self) {
        let mine: Vec<u64> = (0..PAGES).filter(|&p| owner(p) == VCPUS).collect();
        let mut buf = [0u64; WORDS];
        let mut rng = mix64(0xe1);
        let mut turn = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            rng = mix64(rng);
            turn += 1;
            if turn % 8 == 0 {
                let pfn = mine[(rng % mine.len() as u64) as usize];
                self.step("event loop (own page)", pfn, rng >> 32, &mut buf);
                continue;
            }
            let pfn = rng % PAGES;
            let seq = &self.seq[pfn as usize];
            let before = seq.load(Ordering::Acquire);
            self.read(pfn, &mut buf);
            fence(Ordering::Acquire);
            if before % 2 == 1 || seq.load(Ordering::Relaxed) != before {
                self.counts.reads_racing.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.check("event loop", pfn, before / 2, &buf);
            self.counts.reads_checked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every page against the model, from one thread, the engine quiet.
    fn verify_all(&self) -> u64 {
        let mut buf = [0u64; WORDS];
        (0..PAGES)
            .filter(|&pfn| {
                self.read(pfn, &mut buf);
                !self.check("final check", pfn, self.version(pfn), &buf)
            })
            .count() as u64
    }

    /// The mappings of guest RAM as `/proc/self/maps` lists them: how many, and those next to
    /// the first address `text` names (an ioctl that failed), with their page numbers.
    fn maps_near(&self, text: &str) -> String {
        let r = self.ram.regions()[0];
        let addr = text
            .split_whitespace()
            .find_map(|w| u64::from_str_radix(w.strip_prefix("0x")?, 16).ok())
            .unwrap_or(0);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let ranges: Vec<(u64, u64)> = maps
            .lines()
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
            })
            .filter(|&(a, b)| a < r.hva + r.len && b > r.hva)
            .collect();
        let pfn = |a: u64| a.saturating_sub(r.hva) / PAGE;
        let near: Vec<String> = ranges
            .iter()
            .filter(|&&(a, b)| b + 64 * PAGE > addr && a < addr + 64 * PAGE)
            .map(|&(a, b)| format!("pages {}..{}", pfn(a), pfn(b)))
            .collect();
        format!(
            "guest RAM is {} mappings; address {addr:#x} is page {}; mappings near it: {}",
            ranges.len(),
            pfn(addr),
            near.join(", ")
        )
    }

    fn report(&self, secs: f64) -> String {
        let s = self.engine.snapshot(0);
        let c = &self.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{:.1} s: {} copy-on-write breaks, {} evictions ({} restores), {} merges, {} zero \
             pages dropped by sharing, {} releases ({} refused: busy), {} writes, {} owner \
             checks, {} event-loop reads checked ({} skipped: racing a write), {} wrong bytes \
             in {} page reads; {} KiB resident, {} KiB in the cache, {} KiB swapped, {} KiB \
             shared, {} scanner passes",
            secs,
            s.sharing.cow_breaks,
            s.reclaim.evictions,
            s.reclaim.refaults,
            s.sharing.share_merged,
            s.sharing.zero_pages_shared,
            get(&c.releases),
            get(&c.releases_busy),
            get(&c.writes),
            get(&c.owner_checks),
            get(&c.reads_checked),
            get(&c.reads_racing),
            get(&c.wrong_bytes),
            get(&c.wrong_pages),
            s.reclaim.resident_bytes >> 10,
            s.reclaim.zcache_bytes >> 10,
            s.reclaim.swapped_bytes >> 10,
            s.sharing.shared_bytes >> 10,
            s.sharing.share_passes,
        )
    }
}

/// The engine's threads report what stops them in the log: show warnings and errors.
fn log_warnings() {
    let _ =
        env_logger::Builder::new().filter_level(log::LevelFilter::Warn).is_test(true).try_init();
}

fn scale() -> f64 {
    std::env::var("EBB_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0)
}

/// Waits until both copy-on-write breaks and evictions reach `goal`, kicking the reclaim
/// worker meanwhile; the reason, with the counts reached, if the engine failed, a byte read
/// wrong, a counter stalled, or `cap` passed first.
fn run_to_goal(soak: &Soak, goal: u64, cap: Duration, started: Instant) -> Result<(), String> {
    let reclaim = soak.engine.reclaim().unwrap();
    let mut last_report = Instant::now();
    let mut moved = [(0, Instant::now()); 2];
    loop {
        std::thread::sleep(Duration::from_millis(2));
        reclaim.set_target(Some(TARGET)); // a kick: evict now, not at the next tick
        let s = soak.engine.snapshot(0);
        let now = [s.sharing.cow_breaks, s.reclaim.evictions];
        if now.iter().all(|&n| n >= goal) {
            return Ok(());
        }
        let secs = started.elapsed().as_secs_f64();
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!("soak: {}", soak.report(secs));
            last_report = Instant::now();
        }
        if let Some(f) = soak.engine.failure() {
            return Err(format!("the engine failed: {f}; {}", soak.report(secs)));
        }
        if soak.counts.wrong_bytes.load(Ordering::Relaxed) > 0 {
            return Err(format!("wrong bytes (see above): {}", soak.report(secs)));
        }
        for (i, what) in ["copy-on-write breaks", "evictions"].into_iter().enumerate() {
            if now[i] != moved[i].0 {
                moved[i] = (now[i], Instant::now());
            } else if now[i] < goal && moved[i].1.elapsed() > STALL {
                let why = format!("{what} stalled at {} for {STALL:?} (see the log)", now[i]);
                return Err(format!("{why}: {}", soak.report(secs)));
            }
        }
        if started.elapsed() > cap {
            return Err(format!("goal {goal} not reached in {cap:?}: {}", soak.report(secs)));
        }
    }
}

/// Ends a failed run: the threads are told to stop; if the engine failed, guest RAM is
/// unregistered (as the VMM does once its vCPUs stop) so that threads waiting on a fault
/// wake; then it panics with `why`, without waiting for ever on a thread that hangs.
fn fail(soak: &Soak, threads: &[std::thread::JoinHandle<()>], why: &str) -> ! {
    eprintln!("soak failed: {why}");
    eprintln!("{}", soak.maps_near(why));
    soak.stop.store(true, Ordering::Relaxed);
    soak.engine.release_guest_ram(VcpusStopped::confirmed());
    let deadline = Instant::now() + Duration::from_secs(30);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let hung = threads.iter().filter(|t| !t.is_finished()).count();
    // A hung thread holds the soak, which then never drops its directory.
    let _ = std::fs::remove_dir_all(&soak.swap_dir.0);
    panic!("{why} ({hung} threads still hang)");
}

#[test]
fn no_guest_write_is_lost_to_eviction_sharing_or_release() {
    let test = "no_guest_write_is_lost";
    log_warnings();
    let Some(soak) = soak_or_skip(test) else { return };
    let soak = Arc::new(soak);
    let goal = ebb::mm::stats::round_u64(DEFAULT_GOAL * scale());
    let cap = CAP.mul_f64(scale().max(1.0));
    let started = Instant::now();
    let mut threads: Vec<_> = (0..VCPUS)
        .map(|id| {
            let soak = soak.clone();
            std::thread::spawn(move || soak.vcpu(id))
        })
        .collect();
    threads.push({
        let soak = soak.clone();
        std::thread::spawn(move || soak.event_loop())
    });
    if let Err(why) = run_to_goal(&soak, goal, cap, started) {
        fail(&soak, &threads, &why);
    }
    soak.stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    let secs = started.elapsed().as_secs_f64();
    // Quiesce: no scanning, no eviction; then every page, wherever it is, reads back right.
    soak.engine.sharing().unwrap().set_scan_rate(0);
    soak.engine.reclaim().unwrap().set_target(None);
    std::thread::sleep(Duration::from_millis(200));
    let t = soak.engine.table();
    let states: Vec<(PageState, u64)> = [
        PageState::Resident,
        PageState::Shared,
        PageState::Compressed,
        PageState::Swapped,
        PageState::Untouched,
        PageState::ZeroMapped,
    ]
    .into_iter()
    .map(|s| (s, t.count(s)))
    .collect();
    let wrong_at_end = soak.verify_all();
    eprintln!("{test}: goal {goal}: {}", soak.report(secs));
    eprintln!("{test}: pages at the end: {states:?}");
    assert!(soak.engine.failure().is_none(), "{:?}", soak.engine.failure());
    assert_eq!(wrong_at_end, 0, "pages wrong after the run (see above)");
    assert_eq!(soak.counts.wrong_bytes.load(Ordering::Relaxed), 0, "wrong bytes (see above)");
    let s = soak.engine.snapshot(0);
    assert!(s.sharing.cow_breaks >= goal && s.reclaim.evictions >= goal, "{s:#?}");
    assert!(soak.counts.releases.load(Ordering::Relaxed) > 0, "releases were run");
    assert!(soak.counts.reads_checked.load(Ordering::Relaxed) > 0, "the event loop read pages");
    assert_eq!(s.reclaim.swap_errors, 0);
}

/// Guest RAM split the way copy-on-write breaks split it (the two findings below).
struct Split {
    ram: Arc<GuestRam>,
    mm: Arc<MemoryManager>,
    engine: Engine,
}

/// Pages 100..164 identical and shared (111 at least), then written from 110 down to 100: each write gives
/// its page fresh memory, moved over it. Page 110's has pool pages on both sides and stays a
/// mapping of its own, with an anonymous memory object of its own once the copy fills it;
/// 109 down to 101 join it; page 100's then joins the mapping of pages 0..100, which has
/// another, so the two cannot merge: pages 100 and 101 lie in different mappings. Page 99
/// and below are never touched.
fn split_or_skip(
    test: &str,
    config: &EngineConfig,
    backing: Option<Arc<Backing>>,
) -> Option<Split> {
    let ram = Arc::new(GuestRam::new(MEM, 48).unwrap());
    let mm = MemoryManager::new(&ram.regions(), true);
    let mm = Arc::new(match backing {
        Some(b) => mm.with_backing(b),
        None => mm,
    });
    let engine = match Engine::start(&mm, config, None) {
        Ok(e) if e.sharing().is_some() => e,
        _ => {
            eprintln!("\n*** SKIPPED {test}: this kernel cannot share pages ***\n");
            return None;
        }
    };
    let split = Split { ram, mm, engine };
    for pfn in 100..164 {
        for w in 0..WORDS {
            split.write(pfn, w, 0x5a5a_0000 + w as u64);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let shared = |pfn| split.engine.table().get(pfn) == Some(PageState::Shared);
    while !(100..=111).all(shared) {
        assert!(Instant::now() < deadline, "pages 100..=111 were never all shared");
        std::thread::sleep(Duration::from_millis(10));
    }
    split.engine.sharing().unwrap().set_scan_rate(0);
    // A tick under way finishes its budget: let it.
    std::thread::sleep(Duration::from_millis(100));
    for pfn in (100..=110).rev() {
        split.write(pfn, 0, 1);
    }
    // The writes are done; the breaks' claims end just after the copies that woke them.
    let settled = |pfn| {
        let t = split.engine.table();
        t.get(pfn) == Some(PageState::Resident) && t.flags(pfn) & FLAG_IN_FLIGHT == 0
    };
    while !(100..=110).all(settled) {
        assert!(Instant::now() < deadline, "pages 100..=110 never settled");
        std::thread::sleep(Duration::from_millis(1));
    }
    let maps = mappings(&split.ram);
    let of = |pfn: u64| maps.iter().position(|&(a, b)| a <= pfn && pfn < b);
    assert_ne!(of(100), of(101), "pages 100 and 101 in one mapping: {maps:?}");
    Some(split)
}

impl Split {
    fn write(&self, pfn: u64, w: usize, v: u64) {
        let p = (self.ram.regions()[0].hva + pfn * PAGE) as *mut u64;
        // SAFETY: inside the test's guest RAM mapping, w < 512.
        unsafe { p.add(w).write_volatile(v) }
    }

    /// Word `w` of page `pfn`, read on a thread of its own (a read waits for ever if the
    /// fault handler died); None after 10 s.
    fn read(&self, pfn: u64, w: usize) -> Option<u64> {
        let (tx, rx) = std::sync::mpsc::channel();
        let ram = self.ram.clone();
        std::thread::spawn(move || {
            let p = (ram.regions()[0].hva + pfn * PAGE) as *const u64;
            // SAFETY: as in `write`; the thread holds the mapping.
            let _ = tx.send(unsafe { p.add(w).read_volatile() });
        });
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }
}

/// Guest RAM's mappings as `/proc/self/maps` lists them, in page numbers.
fn mappings(ram: &GuestRam) -> Vec<(u64, u64)> {
    let r = ram.regions()[0];
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .filter(|&(a, b)| a < r.hva + r.len && b > r.hva)
        .map(|(a, b)| ((a.max(r.hva) - r.hva) / PAGE, (b.min(r.hva + r.len) - r.hva) / PAGE))
        .collect()
}

/// Found by the soak: a fault-around window reaches across the end of the faulting page's
/// mapping. After a release, pages 100.. of the split are Untouched again, as page 99 is; a
/// read of page 99 fills it and its untouched neighbours with one `UFFDIO_ZEROPAGE`, which
/// the kernel refuses with `ENOENT` (the range must lie in one mapping). The handler takes
/// that for fatal: the VM ends. (`UFFDIO_COPY` for a write fault checks the same.)
#[test]
fn fault_around_never_crosses_a_mapping_boundary() {
    use ebb::mm::fault::around::FaultAround;
    let test = "fault_around_never_crosses_a_mapping_boundary";
    let mut config = EngineConfig { share_scan_rate: FAST, ..Default::default() };
    config.handler.fault_around = FaultAround::Fixed(8);
    let Some(split) = split_or_skip(test, &config, None) else { return };
    let gpa = split.ram.regions()[0].gpa;
    let done = split.mm.release(gpa + 100 * PAGE, 11 * PAGE, Release::Free).unwrap();
    assert_eq!(done.pages, 11);
    assert_eq!(split.engine.table().get(99), Some(PageState::Untouched));
    let got = split.read(99, 0);
    assert!(
        split.engine.failure().is_none(),
        "the fault handler died: {:?}",
        split.engine.failure()
    );
    assert_eq!(got, Some(0), "the read of page 99 never ended");
    assert_eq!(split.read(100, 0), Some(0), "a released page reads zero");
}

/// Found by the soak: an eviction run reaches across a mapping boundary. Pages 100..=110 of
/// the split are resident and consecutive, so the reclaim worker moves them out with one
/// `UFFDIO_MOVE`, which the kernel refuses with `EINVAL` (the range must lie in one
/// mapping). The worker stops on it, and nobody is told: `Engine::failure` stays None, and
/// resident memory is never brought down to the target again.
#[test]
fn eviction_never_crosses_a_mapping_boundary() {
    let test = "eviction_never_crosses_a_mapping_boundary";
    log_warnings();
    let config = EngineConfig { share_scan_rate: FAST, ..Default::default() };
    // A swap file too: the split's pages (one word per 8 bytes changing) compress to more
    // than the cache's 2 KiB, and a backing without a swap file would refuse them.
    let swap_dir = TempDir::new(test);
    let swap = SwapFile::create(&swap_dir.0, MEM).unwrap();
    let backing = Arc::new(Backing::new(PAGES, CACHE, Some(swap)));
    let Some(split) = split_or_skip(test, &config, Some(backing)) else { return };
    let reclaim = split.engine.reclaim().unwrap();
    let target = 4 * PAGE;
    reclaim.set_target(Some(target));
    let deadline = Instant::now() + Duration::from_secs(10);
    while split.engine.snapshot(0).reclaim.resident_bytes > target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = split.engine.snapshot(0);
    assert!(split.engine.failure().is_none(), "{:?}", split.engine.failure());
    assert!(
        s.reclaim.resident_bytes <= target,
        "resident {} KiB, target {} KiB, {} evictions: the reclaim worker stopped",
        s.reclaim.resident_bytes >> 10,
        target >> 10,
        s.reclaim.evictions
    );
    for pfn in 100..=110 {
        assert_eq!(split.read(pfn, 0), Some(1), "page {pfn}");
        assert_eq!(split.read(pfn, 7), Some(0x5a5a_0007), "page {pfn}");
    }
}
