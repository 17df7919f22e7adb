//! Memory-engine tests without KVM: a real userfaultfd-registered guest-RAM mapping, with host
//! threads playing vCPUs.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb::mm::active::ActiveConfig;
use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::state::PageState;
use ebb::mm::uffd::handler::HandlerConfig;
use ebb::vstate::memory::GuestRam;

const PAGE: u64 = 4096;

fn engine_or_skip(
    test: &str,
    mem: u64,
    fault_around: u64,
    active: Option<ActiveConfig>,
) -> Option<(GuestRam, Engine)> {
    let ram = GuestRam::new(mem, 48).unwrap();
    let config =
        EngineConfig { handler: HandlerConfig { fault_around, active }, ..Default::default() };
    match Engine::start(&ram, &config) {
        Ok(engine) => Some((ram, engine)),
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
    let Some((ram, engine)) =
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
    let Some((ram, engine)) =
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
    let Some((ram, engine)) = engine_or_skip("concurrent_faults", 64 << 20, 0, None) else {
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
    let Some((ram, engine)) =
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
    let Some((ram, engine)) =
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
    let Some((ram, engine)) =
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
