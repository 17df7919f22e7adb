//! Memory-engine tests without KVM: a real userfaultfd-registered guest-RAM mapping, with host
//! threads playing vCPUs.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::fault::active::ActiveConfig;
use ebb::mm::fault::around::FaultAround;
use ebb::mm::fault::handler::{HandlerConfig, DEFAULT_OOM_WAIT};
use ebb::mm::pages::PageState;
use ebb::mm::{MemoryManager, Release};
use ebb::vstate::memory::GuestRam;

const PAGE: u64 = 4096;

/// Guest RAM of `mem` bytes served by an engine with a fixed fault-around (0: none).
fn engine_or_skip(
    test: &str,
    mem: u64,
    fault_around: u64,
    active: Option<ActiveConfig>,
) -> Option<(GuestRam, Arc<MemoryManager>, Engine)> {
    engine_with(test, mem, FaultAround::Fixed(fault_around), active)
}

fn engine_with(
    test: &str,
    mem: u64,
    fault_around: FaultAround,
    active: Option<ActiveConfig>,
) -> Option<(GuestRam, Arc<MemoryManager>, Engine)> {
    let ram = GuestRam::new(mem, 48).unwrap();
    let mm = Arc::new(MemoryManager::new(&ram.regions(), true));
    let config = EngineConfig {
        handler: HandlerConfig { fault_around, active, oom_wait: DEFAULT_OOM_WAIT },
        ..Default::default()
    };
    match Engine::start(&mm, &config, None) {
        Ok(engine) => Some((ram, mm, engine)),
        Err(e) => {
            eprintln!("\n*** SKIPPED {test}: userfaultfd unavailable here ({e}) ***\n");
            None
        }
    }
}

/// The host address of guest page `pfn` (one low region in these tests).
fn page_ptr(ram: &GuestRam, pfn: u64) -> *mut u64 {
    (ram.regions()[0].hva + pfn * PAGE) as *mut u64
}

fn write_word(ram: &GuestRam, pfn: u64, word: usize, v: u64) {
    // SAFETY: pfn is inside the test's guest RAM mapping, word < 512.
    unsafe { page_ptr(ram, pfn).add(word).write_volatile(v) }
}

fn read_word(ram: &GuestRam, pfn: u64, word: usize) -> u64 {
    // SAFETY: as above.
    unsafe { page_ptr(ram, pfn).add(word).read_volatile() }
}

#[test]
fn untouched_reads_see_zeros_and_cost_no_memory() {
    let Some((ram, _mm, engine)) =
        engine_or_skip("untouched_reads_see_zeros_and_cost_no_memory", 64 << 20, 0, None)
    else {
        return;
    };
    for pfn in (0..16384).step_by(8) {
        assert_eq!(read_word(&ram, pfn, 7), 0);
    }
    let s = engine.snapshot(0);
    assert_eq!(s.faults_zero, 2048);
    assert_eq!(s.consumed_bytes, 0);
    assert_eq!(s.zero_mapped_bytes, 2048 * PAGE);
    assert!(s.rss_bytes < (1 << 20), "zero-page reads cost no memory: rss {}", s.rss_bytes);
}

#[test]
fn writes_read_back_and_are_consumed() {
    let Some((ram, _mm, engine)) =
        engine_or_skip("writes_read_back_and_are_consumed", 64 << 20, 0, None)
    else {
        return;
    };
    for pfn in 0..5000 {
        write_word(&ram, pfn, (pfn % 512) as usize, pfn * 3 + 1);
    }
    for pfn in 0..5000 {
        assert_eq!(read_word(&ram, pfn, (pfn % 512) as usize), pfn * 3 + 1);
        assert_eq!(
            read_word(&ram, pfn, ((pfn + 1) % 512) as usize),
            0,
            "the rest of the page is zero"
        );
    }
    let s = engine.snapshot(0);
    assert_eq!(s.faults_copy, 5000);
    assert_eq!(s.consumed_bytes, 5000 * PAGE);
    let rss = s.rss_bytes;
    assert!(
        (5000 * PAGE..5000 * PAGE + (2 << 20)).contains(&rss),
        "rss {rss} agrees with consumed"
    );
}

#[test]
fn thousands_of_concurrent_faults_on_same_and_different_pages() {
    let Some((ram, _mm, engine)) = engine_or_skip("concurrent_faults", 64 << 20, 0, None) else {
        return;
    };
    let ram = Arc::new(ram);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let ram = ram.clone();
            std::thread::spawn(move || {
                // Pages 0..4000 are shared by all threads (each owns one word); pages
                // 4000+t*2000.. are private to the thread.
                for pfn in 0..4000 {
                    write_word(&ram, pfn, t as usize, (t << 32) | pfn);
                }
                for pfn in 0..2000 {
                    write_word(&ram, 4000 + t * 2000 + pfn, 0, !pfn);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
    for t in 0..4u64 {
        for pfn in 0..4000 {
            assert_eq!(
                read_word(&ram, pfn, t as usize),
                (t << 32) | pfn,
                "shared page {pfn} thread {t}"
            );
        }
        for pfn in 0..2000 {
            assert_eq!(read_word(&ram, 4000 + t * 2000 + pfn, 0), !pfn);
        }
    }
    assert_eq!(engine.table().count(PageState::Resident), 12000);
}

#[test]
fn removed_pages_fault_again_and_read_zero() {
    let Some((ram, _mm, engine)) =
        engine_or_skip("removed_pages_fault_again_and_read_zero", 16 << 20, 0, None)
    else {
        return;
    };
    for pfn in 0..100 {
        write_word(&ram, pfn, 0, 0xdead_beef);
    }
    let hva = ram.regions()[0].hva;
    // SAFETY: the first 50 pages of the mapping; the data there is disposable.
    let ret = unsafe {
        libc::madvise(hva as *mut libc::c_void, (50 * PAGE) as usize, libc::MADV_DONTNEED)
    };
    assert_eq!(ret, 0);
    // madvise returns once the handler has *read* the remove event; it handles it right after.
    let deadline = Instant::now() + Duration::from_secs(2);
    while engine.snapshot(0).remove_events == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = engine.snapshot(0);
    assert_eq!(s.remove_events, 1);
    assert_eq!(s.removed_pages, 50);
    assert_eq!(s.consumed_bytes, 50 * PAGE);
    assert_eq!(read_word(&ram, 10, 0), 0, "a removed page reads zero");
    assert_eq!(read_word(&ram, 60, 0), 0xdead_beef, "the rest is untouched");
    assert_eq!(engine.table().get(10), Some(PageState::ZeroMapped));
}

#[test]
fn fault_around_fills_untouched_neighbours_in_one_call() {
    let Some((ram, _mm, engine)) =
        engine_or_skip("fault_around_fills_untouched_neighbours", 16 << 20, 15, None)
    else {
        return;
    };
    write_word(&ram, 100, 0, 1);
    let s = engine.snapshot(0);
    assert_eq!((s.faults_copy, s.fault_around_pages), (1, 15));
    assert_eq!(s.consumed_bytes, 16 * PAGE);
    for pfn in 101..116 {
        assert_eq!(read_word(&ram, pfn, 0), 0);
    }
    assert_eq!(engine.snapshot(0).faults, 1, "neighbours were mapped: no further faults");
    // Fault-around stops at a page that is already mapped.
    write_word(&ram, 90, 0, 2);
    let s = engine.snapshot(0);
    assert_eq!(s.consumed_bytes, 26 * PAGE, "pages 90..100 only");
}

#[test]
fn active_follows_the_working_set_without_losing_writes() {
    let active = ActiveConfig { interval: Duration::from_millis(100), sample_pages: 200 };
    let Some((ram, _mm, engine)) =
        engine_or_skip("active_follows_the_working_set", 64 << 20, 0, Some(active))
    else {
        return;
    };
    if !engine.write_protect() {
        eprintln!(
            "\n*** SKIPPED active_follows_the_working_set: no userfaultfd write protection ***\n"
        );
        return;
    }
    for pfn in 0..4000 {
        write_word(&ram, pfn, 0, pfn);
    }
    // Phase 1: keep writing half the resident pages; each write bumps a per-page counter
    // that is checked at the end, so a lost write would show.
    let mut counters = vec![0u64; 2000];
    let busy_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < busy_until {
        for pfn in 0..2000u64 {
            counters[pfn as usize] += 1;
            write_word(&ram, pfn, 1, counters[pfn as usize]);
        }
    }
    let busy = engine.snapshot(0);
    let frac = busy.active_bytes as f64 / busy.consumed_bytes as f64;
    assert!((0.3..0.75).contains(&frac), "half the pages are busy: active {frac:.2} of consumed");
    // Phase 2: idle.
    std::thread::sleep(Duration::from_millis(2500));
    let idle = engine.snapshot(0);
    assert!(
        idle.active_bytes * 4 < busy.active_bytes,
        "active falls when the guest idles: {} then {}",
        busy.active_bytes,
        idle.active_bytes
    );
    for pfn in 0..4000u64 {
        assert_eq!(read_word(&ram, pfn, 0), pfn);
        if pfn < 2000 {
            assert_eq!(
                read_word(&ram, pfn, 1),
                counters[pfn as usize],
                "no write lost on page {pfn}"
            );
        }
    }
    assert!(idle.faults_wp > 0 && idle.active_samples >= 30);
}

/// The race behind a VM that died under balloon use: the Active sampler write-protects and
/// unprotects pages every interval while another thread `madvise`s pages of the same range.
/// Each `madvise` raises the kernel's `mmap_changing` until its remove event is read and the
/// call goes on, and every userfaultfd ioctl issued meanwhile fails with EAGAIN. The handler
/// must retry them, never give up: a dropped unprotect leaves a writer waiting forever.
#[test]
fn sampling_and_madvise_race_never_stops_the_handler_or_loses_a_write() {
    const WRITER_PAGES: u64 = 1024;
    const CHURN_FIRST: u64 = 2048;
    const CHURN_PAGES: u64 = 2048;
    const ROUNDS: u64 = 6000;
    let active = ActiveConfig { interval: Duration::from_millis(1), sample_pages: 256 };
    let Some((ram, _mm, engine)) =
        engine_or_skip("sampling_and_madvise_race", 16 << 20, 0, Some(active))
    else {
        return;
    };
    if !engine.write_protect() {
        eprintln!("\n*** SKIPPED sampling_and_madvise_race: no userfaultfd write protection ***\n");
        return;
    }
    let ram = Arc::new(ram);
    for pfn in 0..WRITER_PAGES {
        write_word(&ram, pfn, 0, 0);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Two writers bump one counter per page, in their own half of the writer pages.
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (ram, stop, done) = (ram.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let half = WRITER_PAGES / 2;
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    rounds += 1;
                    for pfn in t * half..(t + 1) * half {
                        write_word(&ram, pfn, 0, rounds);
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rounds
            })
        })
        .collect();
    // The churner makes pages resident and releases them again, one madvise per page.
    let churner = {
        let (ram, done) = (ram.clone(), done.clone());
        std::thread::spawn(move || {
            let hva = ram.regions()[0].hva;
            for round in 0..ROUNDS {
                let pfn = CHURN_FIRST + round % CHURN_PAGES;
                write_word(&ram, pfn, 1, round);
                // SAFETY: one page of the test's guest RAM; its data is disposable.
                let ret = unsafe {
                    libc::madvise(
                        (hva + pfn * PAGE) as *mut libc::c_void,
                        PAGE as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                assert_eq!(ret, 0);
            }
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
    };
    // Wait for the churner, then stop the writers; a thread stuck in a fault never finishes.
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(std::sync::atomic::Ordering::Relaxed) < 1 && Instant::now() < deadline {
        assert!(engine.failure().is_none(), "the handler stopped: {:?}", engine.failure());
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while done.load(std::sync::atomic::Ordering::Relaxed) < 3 && Instant::now() < deadline {
        assert!(engine.failure().is_none(), "the handler stopped: {:?}", engine.failure());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(engine.failure().is_none(), "the handler stopped: {:?}", engine.failure());
    assert_eq!(
        done.load(std::sync::atomic::Ordering::Relaxed),
        3,
        "a thread is stuck in a fault that was never resolved"
    );
    churner.join().unwrap();
    let rounds: Vec<u64> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    for (t, &r) in rounds.iter().enumerate() {
        let half = WRITER_PAGES / 2;
        for pfn in t as u64 * half..(t as u64 + 1) * half {
            assert_eq!(read_word(&ram, pfn, 0), r, "no write lost on page {pfn}");
        }
    }
    let s = engine.snapshot(0);
    eprintln!(
        "race: {} samples, {} wp faults, {} retries, {} removes, writer rounds {rounds:?}",
        s.active_samples, s.faults_wp, s.fault_retries, s.remove_events
    );
    assert!(s.active_samples >= 100 && s.faults_wp > 0, "the race was exercised: {s:?}");
}

/// Which pages of the first region the host backs (mincore), one bool per page.
fn host_resident(ram: &GuestRam, pages: u64) -> Vec<bool> {
    let mut v = vec![0u8; pages as usize];
    // SAFETY: the range is the test's guest RAM mapping; mincore writes one byte per page.
    let ret = unsafe {
        libc::mincore(
            ram.regions()[0].hva as *mut libc::c_void,
            (pages * PAGE) as usize,
            v.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0);
    v.into_iter().map(|b| b & 1 != 0).collect()
}

/// Pages whose table state disagrees with the host: (page, state, backed).
fn disagreements(ram: &GuestRam, engine: &Engine, pages: u64) -> Vec<(u64, PageState, bool)> {
    let host = host_resident(ram, pages);
    (0..pages)
        .map(|p| (p, engine.table().get(p).unwrap(), host[p as usize]))
        .filter(|&(_, state, backed)| (state == PageState::Resident) != backed)
        .collect()
}

/// Releases through the memory manager racing with first-touch faults and fault-around: at
/// every pause, the table says Resident exactly where the host backs a page, and Consumed
/// agrees. (Releasing first and marking the pages afterwards, as free page reporting once
/// did, leaves pages the guest refilled in between marked Untouched: this test catches it.)
#[test]
fn releases_racing_with_faults_leave_the_table_matching_the_host() {
    const PAGES: u64 = 1024;
    const EPOCHS: u64 = 20;
    let active = ActiveConfig { interval: Duration::from_millis(2), sample_pages: 64 };
    let Some((ram, mm, engine)) = engine_with(
        "releases_racing_with_faults",
        PAGES * PAGE,
        FaultAround::default(),
        Some(active),
    ) else {
        return;
    };
    let ram = Arc::new(ram);
    let gpa0 = ram.regions()[0].gpa;
    let mut released = 0;
    for epoch in 0..EPOCHS {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Runs of 32 pages from scattered starts: fault-around grows inside a run.
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (ram, stop) = (ram.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = t + epoch * 1000;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let start = (i * 2_654_435_761) % (PAGES - 32);
                        for pfn in start..start + 32 {
                            write_word(&ram, pfn, (t + 1) as usize, i);
                        }
                        i += 2;
                    }
                })
            })
            .collect();
        for round in epoch * 500..(epoch + 1) * 500 {
            let first = (round * 7919) % (PAGES - 16);
            let how = if round % 2 == 0 { Release::Free } else { Release::Balloon };
            released += mm.release(gpa0 + first * PAGE, 16 * PAGE, how).unwrap().pages;
            if how == Release::Balloon {
                mm.unballoon(gpa0 + first * PAGE, 16 * PAGE).unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writers.into_iter().for_each(|h| h.join().unwrap());
        assert!(engine.failure().is_none(), "{:?}", engine.failure());
        let wrong = disagreements(&ram, &engine, PAGES);
        assert!(
            wrong.is_empty(),
            "epoch {epoch}: {} pages disagree with the host, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        let backed = host_resident(&ram, PAGES).iter().filter(|&&b| b).count() as u64;
        assert_eq!(engine.snapshot(0).consumed_bytes, backed * PAGE, "epoch {epoch}");
        assert_eq!(
            engine.table().count(PageState::Ballooned),
            0,
            "every ballooned run was deflated"
        );
    }
    let s = engine.snapshot(0);
    eprintln!("release race: {released} pages released, {} retries", s.fault_retries);
    assert!(released > 0 && s.faults > 0);
}

#[test]
fn adaptive_fault_around_maps_ahead_of_a_walk_but_not_around_scattered_touches() {
    let Some((ram, _mm, engine)) =
        engine_with("adaptive_fault_around", 64 << 20, FaultAround::default(), None)
    else {
        return;
    };
    for pfn in 0..4096 {
        write_word(&ram, pfn, 0, pfn);
    }
    let seq = engine.snapshot(0);
    assert!(seq.faults_copy < 64, "a sequential walk takes few faults: {}", seq.faults_copy);
    assert!(seq.consumed_bytes <= (4096 + 256) * PAGE, "at most one window ahead");
    // Every 8th page from page 8192 on, in a scattered order: one fault, one page each.
    let n = 1024u64;
    for i in 0..n {
        write_word(&ram, 8192 + (i * 2_654_435_761 % n) * 8, 0, i);
    }
    let s = engine.snapshot(0);
    let scattered = s.consumed_bytes - seq.consumed_bytes;
    assert!(scattered <= n * PAGE * 11 / 10, "Consumed {scattered} for {n} scattered pages");
    assert_eq!(s.faults_copy - seq.faults_copy, n);
}

/// Pages released while they are in the Active sample leave it: releasing half of an idle
/// guest's memory must not make Active jump as if those pages had been written.
#[test]
fn releasing_sampled_pages_does_not_count_as_activity() {
    let active = ActiveConfig { interval: Duration::from_millis(50), sample_pages: 400 };
    let Some((ram, mm, engine)) =
        engine_with("releasing_sampled_pages", 64 << 20, FaultAround::Fixed(0), Some(active))
    else {
        return;
    };
    if !engine.write_protect() {
        eprintln!("\n*** SKIPPED releasing_sampled_pages: no userfaultfd write protection ***\n");
        return;
    }
    for pfn in 0..4000 {
        write_word(&ram, pfn, 0, pfn);
    }
    // Idle until Active has fallen to (almost) nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.snapshot(0).active_bytes > 100 * PAGE && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle = engine.snapshot(0);
    assert!(idle.active_bytes <= 100 * PAGE, "the guest idles: {idle:?}");
    // Balloon away a fifth of the pages in each of four intervals.
    let gpa0 = ram.regions()[0].gpa;
    let mut worst = 0.0f64;
    for round in 0..4u64 {
        for pfn in (round..4000).step_by(5) {
            mm.release(gpa0 + pfn * PAGE, PAGE, Release::Balloon).unwrap();
        }
        std::thread::sleep(Duration::from_millis(60));
        let s = engine.snapshot(0);
        worst = worst.max(s.active_bytes as f64 / s.consumed_bytes as f64);
    }
    assert!(worst < 0.05, "Active rose to {worst:.2} of Consumed while nothing was written");
}

/// A page first read (mapped to the kernel's zero page) and then written gets a private page
/// from the kernel without a missing fault: the write-protected zero page makes that write
/// fault to ebb, so Consumed counts it.
#[test]
fn a_zero_mapped_page_written_later_counts_as_resident() {
    let Some((ram, _mm, engine)) =
        engine_or_skip("a_zero_mapped_page_written_later", 16 << 20, 0, None)
    else {
        return;
    };
    if !engine.write_protect() {
        eprintln!(
            "\n*** SKIPPED a_zero_mapped_page_written_later: no userfaultfd write protection ***\n"
        );
        return;
    }
    for pfn in 0..100 {
        assert_eq!(read_word(&ram, pfn, 0), 0);
    }
    assert_eq!(engine.snapshot(0).zero_mapped_bytes, 100 * PAGE);
    for pfn in 0..100 {
        write_word(&ram, pfn, 3, pfn + 7);
    }
    let s = engine.snapshot(0);
    assert_eq!((s.consumed_bytes, s.zero_mapped_bytes), (100 * PAGE, 0), "{s:?}");
    assert_eq!(engine.table().get(50), Some(PageState::Resident));
    for pfn in 0..100 {
        assert_eq!((read_word(&ram, pfn, 0), read_word(&ram, pfn, 3)), (0, pfn + 7));
    }
    let rss = ebb::mm::rss::RssProbe::new(ram.regions()).bytes();
    assert!(rss >= 100 * PAGE, "the host backs them: rss {rss}");
}

/// The stale-remove race, narrowed to one page: a release claims an untouched page, the guest
/// faults on it, the release's `madvise` queues its remove event and goes on once the handler
/// has read it, and the handler then sees the fault and the remove in one batch. Applying the
/// remove after resolving the fault marked the freshly mapped page Untouched: the table then
/// said Untouched for a page the host backs. (Found by `releases_racing_with_faults`, about
/// one run in fifteen under load.)
#[test]
fn a_remove_read_with_a_later_fault_never_unmarks_the_fresh_page() {
    const PAGES: u64 = 64;
    const ROUNDS: u64 = 3000;
    let Some((ram, mm, engine)) =
        engine_or_skip("a_remove_read_with_a_later_fault", PAGES * PAGE, 0, None)
    else {
        return;
    };
    let ram = Arc::new(ram);
    let gpa0 = ram.regions()[0].gpa;
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let writer = {
        let (ram, barrier) = (ram.clone(), barrier.clone());
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                barrier.wait();
                write_word(&ram, round % PAGES, 0, round + 1);
                barrier.wait();
            }
        })
    };
    let mut wrong = Vec::new();
    for round in 0..ROUNDS {
        let pfn = round % PAGES;
        barrier.wait();
        mm.release(gpa0 + pfn * PAGE, PAGE, Release::Free).unwrap();
        barrier.wait();
        // The write is done; the handler may still be reading events: give it a moment.
        let deadline = Instant::now() + Duration::from_millis(50);
        loop {
            let state = engine.table().get(pfn).unwrap();
            let backed = host_resident(&ram, PAGES)[pfn as usize];
            if (state == PageState::Resident) == backed {
                break;
            }
            if Instant::now() > deadline {
                wrong.push((round, state, backed));
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    writer.join().unwrap();
    assert!(
        wrong.is_empty(),
        "{} rounds left the table wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}
