//! The memory engine's races, each made deterministic: an engine thread is stopped at a
//! pause point (`ebb::mm::hooks`) inside the window, the test does the racing access, then
//! lets the thread go on. Real userfaultfd on a real guest-RAM mapping, host threads as
//! vCPUs and as the event loop; no KVM.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::fault::around::FaultAround;
use ebb::mm::hooks;
use ebb::mm::pages::{PageState, FLAG_IN_FLIGHT};
use ebb::vstate::memory::GuestRam;

const PAGE: u64 = 4096;
/// How long a thread the test expects to finish may take (a loaded 2-core machine).
const PATIENCE: Duration = Duration::from_secs(10);

/// The pause points are global to the process: one test at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ptr(ram: &GuestRam, pfn: u64) -> *mut u64 {
    (ram.regions()[0].hva + pfn * PAGE) as *mut u64
}

use common::{engine_or_skip, read_word, write_word};

/// True if the page at `hva` is mapped, as `/proc/self/pagemap` says (reading it never
/// faults the page in).
fn mapped(hva: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, hva / PAGE * 8).unwrap();
    u64::from_le_bytes(entry) & (1 << 63 | 1 << 62) != 0
}

/// Runs `f` on a thread; its result, or None if it did not end within [`PATIENCE`].
fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Finding: fault-around marked neighbours Resident before mapping them, without a claim.
/// A mover (the sharing scanner) could claim such a page and read it: a fault the handler
/// defers while the page is claimed, so if the mapping then failed (EAGAIN, ENOMEM) the
/// scanner and every vCPU touching that page waited for ever. Now the pages are in flight
/// until mapped: a page the table calls Resident and not in flight is mapped.
#[test]
fn pages_being_filled_are_in_flight_until_they_are_mapped() {
    let test = "pages_being_filled_are_in_flight_until_they_are_mapped";
    let _serial = serial();
    let mut config = EngineConfig::default();
    config.handler.fault_around = FaultAround::Fixed(8);
    config.handler.active = None;
    let Some((ram, _mm, engine)) = engine_or_skip(test, 16 << 20, &config, false) else { return };
    let first = 100;
    hooks::FILL_BEFORE_MAP.arm();
    let writer = {
        let ram = ram.clone();
        on_thread(move || write_word(&ram, first, 0, 0xfeed))
    };
    assert!(hooks::FILL_BEFORE_MAP.wait_reached(PATIENCE), "the fault never reached the handler");
    // The handler stands between claiming the pages and mapping them: what would a mover see?
    let table = engine.table();
    let base = ram.regions()[0].hva;
    let seen: Vec<(u64, PageState, bool, bool)> = (first..first + 9)
        .map(|i| {
            let state = table.get(i).unwrap();
            (i, state, table.flags(i) & FLAG_IN_FLIGHT != 0, mapped(base + i * PAGE))
        })
        .collect();
    hooks::FILL_BEFORE_MAP.release();
    writer.recv_timeout(PATIENCE).expect("the writer never woke");
    for &(i, state, in_flight, is_mapped) in &seen {
        assert!(
            state != PageState::Resident || in_flight || is_mapped,
            "page {i} is Resident, not in flight and not mapped: a mover may claim it and read it, \
             and wait for ever if its mapping fails: {seen:?}"
        );
    }
    assert!(seen.iter().filter(|s| s.1 == PageState::Resident).count() == 9, "{seen:?}");
    // Afterwards every page is mapped, Resident, and free of claims (the claims end just
    // after the ioctl that woke the writer).
    let started = Instant::now();
    while (first..first + 9).any(|i| table.flags(i) & FLAG_IN_FLIGHT != 0)
        && started.elapsed() < PATIENCE
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in first..first + 9 {
        assert_eq!(table.get(i), Some(PageState::Resident));
        assert_eq!(table.flags(i) & FLAG_IN_FLIGHT, 0, "page {i} still in flight");
        assert!(mapped(base + i * PAGE), "page {i} not mapped");
    }
    assert_eq!(read_word(&ram, first, 0), 0xfeed);
}

/// Waits until page `pfn` is Shared; false after [`PATIENCE`].
fn wait_shared(engine: &Engine, pfn: u64) -> bool {
    let started = Instant::now();
    while started.elapsed() < PATIENCE {
        if engine.table().get(pfn) == Some(PageState::Shared) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Finding: a copy-on-write break mapped fresh anonymous memory over the guest page and only
/// then registered it with userfaultfd. An access in between (the event loop reading a
/// virtqueue through the mapping, another vCPU) got the kernel's zero page behind ebb's
/// back; the copy of the shared contents then said EEXIST, which counted as success: the
/// page kept zeros, and the writer was never woken. Now the fresh memory is registered
/// before it replaces the pool page, so such an access faults and waits for the copy.
#[test]
fn a_read_during_a_copy_on_write_break_sees_the_shared_contents() {
    let test = "a_read_during_a_copy_on_write_break_sees_the_shared_contents";
    let _serial = serial();
    let config = EngineConfig { share_scan_rate: 1 << 20, ..Default::default() };
    let Some((ram, _mm, engine)) = engine_or_skip(test, 16 << 20, &config, true) else { return };
    let shared_word = |w: usize| 0x5a5a_0000 + w as u64;
    for pfn in 0..64 {
        for w in 0..512 {
            write_word(&ram, pfn, w, shared_word(w)); // 64 identical pages
        }
    }
    let victim = 10;
    assert!(wait_shared(&engine, victim), "page {victim} was never shared");
    engine.sharing().unwrap().set_scan_rate(0);
    hooks::UNSHARE_BEFORE_COPY.arm();
    let writer = {
        let ram = ram.clone();
        on_thread(move || write_word(&ram, victim, 0, 0xbeef))
    };
    assert!(hooks::UNSHARE_BEFORE_COPY.wait_reached(PATIENCE), "the write never broke the sharing");
    // The event loop reads the page while the break stands in the window.
    let reader = {
        let ram = ram.clone();
        on_thread(move || [1usize, 100, 511].map(|w| read_word(&ram, victim, w)))
    };
    std::thread::sleep(Duration::from_millis(100));
    hooks::UNSHARE_BEFORE_COPY.release();
    let during = reader.recv_timeout(PATIENCE).expect("the reader never woke");
    let woke = writer.recv_timeout(PATIENCE).is_ok();
    assert_eq!(
        during,
        [1usize, 100, 511].map(shared_word),
        "a read during the break saw other bytes than the shared page's"
    );
    assert!(woke, "the writer was never woken");
    assert_eq!(read_word(&ram, victim, 0), 0xbeef);
    for w in 1..512 {
        assert_eq!(read_word(&ram, victim, w), shared_word(w), "word {w}");
    }
    assert!(engine.failure().is_none(), "{:?}", engine.failure());
    let started = Instant::now();
    while engine.table().get(victim) != Some(PageState::Resident) && started.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(engine.table().get(victim), Some(PageState::Resident));
    // The page is guest RAM again: its next release reaches the handler (a remove event),
    // and the page reads as zeros afterwards.
    let removes = engine.snapshot(0).remove_events;
    // SAFETY: the page is in the test's guest RAM; the guest gives it up.
    let rc = unsafe { libc::madvise(ptr(&ram, victim).cast(), PAGE as usize, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    // `madvise` returns once the handler has read the remove event, a moment before the
    // handler counts it.
    let started = Instant::now();
    while engine.snapshot(0).remove_events == removes && started.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(engine.snapshot(0).remove_events > removes, "the page is no longer registered");
    assert_eq!(read_word(&ram, victim, 1), 0);
}

/// Word `w` of page `pfn` in the swap-in race: even pages random (compressed, they would not
/// fit the small cache: they go to the swap file), odd pages one repeated word (the cache
/// keeps them as that word).
fn swapin_word(pfn: u64, w: usize) -> u64 {
    if pfn % 2 == 1 {
        return pfn + 1;
    }
    let mut z = (pfn << 20) | w as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Finding: a swap-in from the swap file was a synchronous read on the one fault-handler
/// thread, so every other vCPU's fault (a first touch, a swap-in from the compression
/// cache) waited behind a slow disk. Now swap-file reads run on reader threads: with one
/// read stalled (a slow disk), a first touch, a cache swap-in and another swap-file read
/// all complete, and the stalled page still reads back right once the disk answers.
#[test]
fn a_stalled_swap_file_read_delays_no_other_fault() {
    use ebb::mm::reclaim::store::Backing;
    use ebb::mm::swap::SwapFile;
    use ebb::mm::MemoryManager;
    use std::sync::Arc;
    let test = "a_stalled_swap_file_read_delays_no_other_fault";
    let _serial = serial();
    let mem = 16 << 20;
    let dir = std::env::temp_dir().join(format!("ebb-races-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ram = Arc::new(GuestRam::new(mem, 48).unwrap());
    let swap = SwapFile::create(&dir, mem).unwrap();
    let backing = Arc::new(Backing::new(mem / PAGE, 64 << 10, Some(swap)));
    let mm = Arc::new(MemoryManager::new(&ram.regions(), true).with_backing(backing));
    let engine = match Engine::start(&mm, &EngineConfig::default(), None) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("\n*** SKIPPED {test}: userfaultfd unavailable here ({e}) ***\n");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    let Some(control) = engine.reclaim().cloned() else {
        eprintln!("\n*** SKIPPED {test}: no UFFDIO_MOVE on this kernel (Linux 6.8+) ***\n");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let touched = 2048u64;
    for pfn in 0..touched {
        for w in 0..512 {
            write_word(&ram, pfn, w, swapin_word(pfn, w));
        }
    }
    control.set_target(Some(256 << 10));
    let table = engine.table().clone();
    let deadline = Instant::now() + PATIENCE;
    while table.count(PageState::Swapped) < 64 || table.count(PageState::Compressed) < 64 {
        assert!(Instant::now() < deadline, "reclaim did not evict: {:?}", engine.snapshot(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    control.set_target(None);
    std::thread::sleep(Duration::from_millis(100)); // the worker's last batch settles
    let state = |p: u64| table.get(p);
    let swapped: Vec<u64> =
        (0..touched).filter(|&p| state(p) == Some(PageState::Swapped)).take(2).collect();
    let cached = (0..touched).find(|&p| state(p) == Some(PageState::Compressed)).unwrap();
    assert_eq!(swapped.len(), 2);

    hooks::SWAPIN_BEFORE_READ.arm();
    let (r, slow_pfn) = (ram.clone(), swapped[0]);
    let slow = on_thread(move || read_word(&r, slow_pfn, 7));
    assert!(
        hooks::SWAPIN_BEFORE_READ.wait_reached(PATIENCE),
        "the swap-file read never reached a reader"
    );
    let (r, other) = (ram.clone(), swapped[1]);
    let others = on_thread(move || {
        let t0 = Instant::now();
        let first_touch = read_word(&r, touched + 5, 0);
        write_word(&r, touched + 6, 0, 42);
        let from_cache = read_word(&r, cached, 3);
        let from_file = read_word(&r, other, 9);
        (first_touch, from_cache, from_file, t0.elapsed())
    });
    let got = others.recv_timeout(PATIENCE);
    let stalled = slow.try_recv().is_err();
    hooks::SWAPIN_BEFORE_READ.release();
    let (first_touch, from_cache, from_file, took) =
        got.expect("a fault waited behind the stalled swap-file read");
    eprintln!("{test}: first touch, cache swap-in and a second file swap-in took {took:?}");
    assert!(stalled, "the stalled read ended before the test released it");
    assert_eq!(first_touch, 0);
    assert_eq!(from_cache, swapin_word(cached, 3));
    assert_eq!(from_file, swapin_word(other, 9));
    assert_eq!(slow.recv_timeout(PATIENCE).unwrap(), swapin_word(slow_pfn, 7));
    for pfn in 0..touched {
        for w in [0, 7, 511] {
            assert_eq!(read_word(&ram, pfn, w), swapin_word(pfn, w), "page {pfn} word {w}");
        }
    }
    engine.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
