//! Host-side reclaim without KVM: a real userfaultfd-registered guest-RAM mapping, a real
//! compression cache and swap file, the real reclaim worker, and host threads playing vCPUs
//! that write and verify every page while it is evicted and brought back.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::pages::PageState;
use ebb::mm::reclaim::store::Backing;
use ebb::mm::swap::SwapFile;
use ebb::mm::uffd::{Resolved, Uffd};
use ebb::mm::MemoryManager;
use ebb::vstate::memory::GuestRam;

const PAGE: u64 = 4096;
const WORDS: usize = 512;

/// Evict/restore cycles the soak runs by default (`EBB_RECLAIM_CYCLES` overrides; the
/// soak script asks for 10^7).
const DEFAULT_CYCLES: u64 = 1_000_000;

struct Vm {
    ram: GuestRam,
    _mm: Arc<MemoryManager>,
    engine: Engine,
    _swap_dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed (with what is left in it) when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ebb-reclaim-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A VM of `mem` bytes with a cache of `cache` bytes and a swap file, reclaim off until
/// the test sets a target; None (after a loud skip) where the host cannot.
fn vm_or_skip(test: &str, mem: u64, cache: u64) -> Option<Vm> {
    let ram = GuestRam::new(mem, 48).unwrap();
    let swap_dir = tempdir::Dir::new(test);
    let swap = SwapFile::create(&swap_dir.0, mem).unwrap();
    let backing = Arc::new(Backing::new(mem / PAGE, cache, Some(swap)));
    let mm = Arc::new(MemoryManager::new(&ram.regions(), true).with_backing(backing));
    let engine = match Engine::start(&mm, &EngineConfig::default(), None) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("\n*** SKIPPED {test}: userfaultfd unavailable here ({e}) ***\n");
            return None;
        }
    };
    if engine.reclaim().is_none() {
        eprintln!("\n*** SKIPPED {test}: no UFFDIO_MOVE on this kernel (Linux 6.8+) ***\n");
        return None;
    }
    Some(Vm { ram, _mm: mm, engine, _swap_dir: swap_dir })
}

fn page_ptr(ram: &GuestRam, pfn: u64) -> *mut u64 {
    (ram.regions()[0].hva + pfn * PAGE) as *mut u64
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `w` of page `pfn` at version `v`: versions cycle through the kinds eviction sorts
/// pages into (zero: dropped; same-filled: a word; text-like: compressed; random: swapped).
/// Version 0 is a page never written: zeros.
fn word(pfn: u64, v: u64, w: usize) -> u64 {
    let w = w as u64;
    if v == 0 {
        return 0;
    }
    match (pfn + v) % 4 {
        0 => 0,
        1 => mix64((pfn << 20) | v),
        // Text-like: 16-byte phrases from a dictionary of 64, which LZ4 finds again (about
        // 1 KiB compressed).
        2 => mix64(((mix64((pfn << 20) ^ (v << 10) ^ (w / 2)) % 64) << 1) | (w % 2)),
        _ => mix64((pfn << 40) ^ (v << 16) ^ w),
    }
}

/// Checks that page `pfn` holds version `v`; returns the first wrong word, if any.
fn check(ram: &GuestRam, pfn: u64, v: u64) -> Option<(usize, u64, u64)> {
    let p = page_ptr(ram, pfn);
    (0..WORDS).find_map(|w| {
        // SAFETY: pfn is inside the test's guest RAM mapping, w < 512.
        let got = unsafe { p.add(w).read_volatile() };
        let want = word(pfn, v, w);
        (got != want).then_some((w, got, want))
    })
}

fn write(ram: &GuestRam, pfn: u64, v: u64) {
    let p = page_ptr(ram, pfn);
    for w in 0..WORDS {
        // SAFETY: as above.
        unsafe { p.add(w).write_volatile(word(pfn, v, w)) }
    }
}

fn cycles_wanted() -> u64 {
    std::env::var("EBB_RECLAIM_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_CYCLES)
}

/// The soak: vCPU threads keep verifying and rewriting their pages (each write a new
/// version) while a lever thread keeps the worker evicting toward a small target. Every
/// read of every page must see exactly the last version written.
#[test]
fn pages_survive_a_million_evictions_and_restores_unchanged() {
    let test = "pages_survive_a_million_evictions_and_restores_unchanged";
    let (mem, cache) = (32 << 20, 1 << 20);
    let Some(vm) = vm_or_skip(test, mem, cache) else { return };
    let vm = Arc::new(vm);
    let pages = mem / PAGE;
    let target = 64 * PAGE;
    let control = vm.engine.reclaim().unwrap().clone();
    control.set_target(Some(target));
    let (stop, bad, checks) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let threads = 2u64;
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let (vm, stop, bad, checks) = (vm.clone(), stop.clone(), bad.clone(), checks.clone());
            std::thread::spawn(move || {
                let mine: Vec<u64> = (0..pages).filter(|p| p % threads == t).collect();
                let mut version = vec![0u64; mine.len()];
                let mut rng = t + 1;
                while !stop.load(Ordering::Relaxed) {
                    rng = mix64(rng);
                    let k = (rng % mine.len() as u64) as usize;
                    let pfn = mine[k];
                    if let Some((w, got, want)) = check(&vm.ram, pfn, version[k]) {
                        if bad.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!(
                                "page {pfn} v{}: word {w} is {got:#x}, want {want:#x}",
                                version[k]
                            );
                        }
                    }
                    version[k] += 1;
                    write(&vm.ram, pfn, version[k]);
                    checks.fetch_add(1, Ordering::Relaxed);
                }
                // Last look at every page after the run.
                for (k, &pfn) in mine.iter().enumerate() {
                    if check(&vm.ram, pfn, version[k]).is_some() {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let want = cycles_wanted();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        std::thread::sleep(Duration::from_millis(2));
        control.set_target(Some(target)); // a kick: evict now, not at the next tick
        let s = vm.engine.snapshot(0);
        if s.reclaim.evictions >= want && s.reclaim.refaults >= want / 2 {
            break;
        }
        assert!(Instant::now() < deadline, "too slow: {} evictions in 600 s", s.reclaim.evictions);
        assert_eq!(bad.load(Ordering::Relaxed), 0, "corrupted pages (see above)");
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let s = vm.engine.snapshot(0);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} evictions, {} restores ({} from the cache, {} from swap, {} written back), {} \
         page checks, {:.1} s ({:.0} cycles/s), swap-in p50 {} us (cache) {} us (swap)",
        s.reclaim.evictions,
        s.reclaim.refaults,
        s.reclaim.swapins_zcache,
        s.reclaim.swapins_swap,
        s.reclaim.written_back,
        checks.load(Ordering::Relaxed),
        secs,
        s.reclaim.evictions as f64 / secs,
        s.reclaim.swapin_zcache_p50_us,
        s.reclaim.swapin_swap_p50_us,
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "corrupted pages (see above)");
    assert!(s.reclaim.swapins_zcache > 0 && s.reclaim.swapins_swap > 0, "both stores served");
    assert!(
        s.reclaim.zero_pages_dropped > 0
            && s.reclaim.same_filled_pages + s.reclaim.swapins_zcache > 0
    );
    assert!(s.reclaim.written_back > 0, "a 1 MiB cache fills and is written back to swap");
    assert_eq!(s.reclaim.swap_errors, 0);
    assert_eq!(s.reclaim.held_pages, 0);
}

/// With the guest idle, resident memory comes down to the target and no further; the
/// evicted pages read back intact; turning reclaim off stops it.
#[test]
fn resident_memory_falls_to_the_target_and_pages_read_back() {
    let test = "resident_memory_falls_to_the_target_and_pages_read_back";
    let mem = 16 << 20;
    let Some(vm) = vm_or_skip(test, mem, 4 << 20) else { return };
    let pages = mem / PAGE;
    for pfn in 0..pages {
        write(&vm.ram, pfn, 1);
    }
    assert_eq!(vm.engine.table().count(PageState::Resident), pages);
    let control = vm.engine.reclaim().unwrap();
    let target = 1 << 20;
    control.set_target(Some(target));
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.engine.snapshot(0).reclaim.resident_bytes > target {
        assert!(Instant::now() < deadline, "resident stays above the target");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = vm.engine.snapshot(0);
    assert!(s.reclaim.resident_bytes >= target - 64 * PAGE, "no more than needed: {s:?}");
    // Zero pages (a quarter, by `word`) went back to Untouched; the rest are stored.
    let t = vm.engine.table();
    let stored = t.count(PageState::Compressed) + t.count(PageState::Swapped);
    let evicted = pages - target / PAGE;
    assert!(stored + t.count(PageState::Untouched) >= evicted, "{s:?}");
    assert!(s.consumed_bytes < 6 << 20, "consumed {} is resident + the cache", s.consumed_bytes);
    vm.engine.rss().invalidate();
    let s = vm.engine.snapshot(0);
    assert!(s.rss_bytes <= target + (256 << 10), "the host really freed them: rss {}", s.rss_bytes);
    control.set_target(None);
    for pfn in 0..pages {
        assert_eq!(check(&vm.ram, pfn, 1), None, "page {pfn}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let s = vm.engine.snapshot(0);
    assert_eq!(s.reclaim.reclaim_target_bytes, None);
    assert_eq!(
        s.reclaim.resident_bytes + s.zero_mapped_bytes,
        pages * PAGE,
        "off: nothing evicted"
    );
}

/// The race the soak found, at the kernel's level: a page that is the zero page one
/// instant and a private copy the next (a guest read, then a write: copy-on-write) while
/// it is moved out. Linux 6.17+ may finish such a move after an internal retry and still
/// answer `EEXIST`; eviction took the answer at its word, left the page in its scratch
/// range, and the guest's write was lost. Every answer of `move_pages` must say what
/// really happened to the page.
#[test]
fn a_move_racing_with_copy_on_write_is_reported_as_it_happened() {
    let test = "a_move_racing_with_copy_on_write_is_reported_as_it_happened";
    let moves = match Uffd::open_for_moves(std::path::Path::new("/dev/userfaultfd")) {
        Ok(u) if u.has_move() => u,
        other => {
            let why = other.err().map_or("no UFFDIO_MOVE (Linux 6.8+)".into(), |e| e.to_string());
            eprintln!("\n*** SKIPPED {test}: {why} ***\n");
            return;
        }
    };
    let (src, scratch) = (anon_page(), anon_page());
    // SAFETY: the scratch page is this test's own.
    unsafe { moves.register_for_moves(scratch, PAGE) }.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let p = src as *mut u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `src` is a live private anonymous page of this test.
                unsafe {
                    let _ = p.read_volatile(); // maps the zero page if the page was moved
                    p.write_volatile(n); // copies it
                }
                n += 1;
            }
        })
    };
    // Until the kernel has misreported a few moves (about one every 2 s here), or 10 s on
    // kernels that do not.
    let (mut moved, mut refused, started) = (0u64, 0u64, Instant::now());
    while started.elapsed() < Duration::from_secs(10) && ebb::mm::uffd::moves_corrected() < 3 {
        // SAFETY: `src` is the test's own page; `scratch` its registered scratch page.
        let said_moved =
            matches!(unsafe { moves.move_pages(scratch, src, PAGE) }, Ok((Resolved::Mapped, _)));
        let really = mapped(scratch);
        assert_eq!(
            said_moved, really,
            "move_pages said moved={said_moved}, the page says {really}"
        );
        if really {
            moved += 1;
            // SAFETY: our own scratch page; nothing refers into it.
            let ret =
                unsafe { libc::madvise(scratch as *mut _, PAGE as usize, libc::MADV_DONTNEED) };
            assert_eq!(ret, 0);
        } else {
            refused += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!(
        "{moved} moves, {refused} refused (nothing mapped, or a race), {} misreported by the \
         kernel and corrected, {:.1} s",
        ebb::mm::uffd::moves_corrected(),
        started.elapsed().as_secs_f64()
    );
    assert!(moved > 1000, "the race was run");
}

/// A private anonymous page, not registered anywhere (the test leaks it).
fn anon_page() -> u64 {
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

/// True if a page is mapped at `hva` (`/proc/self/pagemap`: present or swapped).
fn mapped(hva: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, hva / PAGE * 8).unwrap();
    u64::from_le_bytes(e) >> 62 != 0
}
