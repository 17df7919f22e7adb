//! What page sharing costs per 4 KiB page, host threads, all in one run:
//!   kernel     the kernel's own first-touch write fault (no userfaultfd)
//!   first      a first-touch write fault through ebb (fault-around off: one page a fault)
//!   cow        the first write to a page ebb shares: the fault handler gives the writer a
//!              private copy of the pool page
//!   merge      the scanner's cost per page it shares (CPU time of the scanner thread)
//!   group      the same merge as a member of a sharing group: the scanner's CPU plus the
//!              broker's (one round trip per lookup and per store), and the copy-on-write
//!              break of a group page
//! Medians over rounds; ratios against the first-touch fault and the VM's own pool.
//!
//!   cargo bench --bench sharing [-- PAGES ROUNDS]
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
use common::mmap_anon;

use std::time::{Duration, Instant};

use std::os::fd::IntoRawFd;

use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::fault::around::FaultAround;
use ebb::mm::fault::handler::{HandlerConfig, DEFAULT_OOM_WAIT};
use ebb::mm::sharing::broker::Broker;
use ebb::mm::MemoryManager;
use ebb::vstate::memory::GuestRam;

const PAGE: usize = 4096;

fn engine(pages: usize, group: Option<&Broker>) -> (GuestRam, Engine) {
    let ram = GuestRam::new((pages * PAGE) as u64 * 2, 48).unwrap();
    let mm = MemoryManager::new(&ram.regions(), true);
    let handler = HandlerConfig {
        fault_around: FaultAround::Fixed(0),
        active: None,
        oom_wait: DEFAULT_OOM_WAIT,
    };
    let share_group_fds = group.map(|b| {
        let fds = b.add_member().unwrap();
        (fds.data.into_raw_fd(), fds.link.into_raw_fd()) // the engine takes them over
    });
    let config = EngineConfig { handler, share_group_fds, ..Default::default() };
    let engine = Engine::start(&mm, &config, None).expect("userfaultfd");
    (ram, engine)
}

/// Writes one word in each of `pages` pages from `base`; nanoseconds per page.
fn write_each(base: *mut u8, pages: usize, value: u64) -> f64 {
    let t = Instant::now();
    for i in 0..pages {
        // SAFETY: base is a mapping of at least `pages` pages.
        unsafe { base.add(i * PAGE).cast::<u64>().add(7).write_volatile(value) };
    }
    t.elapsed().as_nanos() as f64 / pages as f64
}

fn kernel(pages: usize) -> f64 {
    let base = mmap_anon(pages * PAGE);
    let ns = write_each(base, pages, 1);
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(base.cast(), pages * PAGE) };
    ns
}

/// First touch through ebb, then sharing every page (all identical) and the first write to
/// each: (first-touch ns, CoW ns, scanner CPU ns per merged page, seconds to share all).
fn ebb(pages: usize, group: Option<&Broker>) -> (f64, f64, f64, f64) {
    let (ram, engine) = engine(pages, group);
    let base = ram.regions()[0].hva as *mut u8;
    let first = write_each(base, pages, 1);
    let lever = engine.sharing().expect("a kernel that can share pages (Linux 6.8+)");
    let cpu0 = lever.cpu_ns() + broker_cpu_ns();
    let t = Instant::now();
    lever.set_scan_rate(1 << 22);
    let deadline = t + Duration::from_secs(120);
    while engine.snapshot(0).sharing.shared_bytes < (pages * PAGE) as u64 {
        assert!(Instant::now() < deadline, "sharing did not converge: {:#?}", engine.snapshot(0));
        std::thread::sleep(Duration::from_millis(2));
    }
    let converge = t.elapsed().as_secs_f64();
    lever.set_scan_rate(0);
    std::thread::sleep(Duration::from_millis(50)); // let a tick in progress end
    let merge = (lever.cpu_ns() + broker_cpu_ns() - cpu0) as f64 / pages as f64;
    let cow = write_each(base, pages, 2);
    assert!(engine.snapshot(0).sharing.cow_breaks >= pages as u64);
    (first, cow, merge, converge)
}

/// CPU time of this process's broker threads (`ebb-group-*`), from `/proc`.
fn broker_cpu_ns() -> u64 {
    let tick_ns = 1_000_000_000 / 100; // USER_HZ
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|s| s.contains("(ebb-group-"))
        .filter_map(|s| {
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * tick_ns
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> =
        std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect::<Vec<_>>();
    let pages = args.first().copied().unwrap_or(4096);
    let rounds = args.get(1).copied().unwrap_or(5);
    let (mut k, mut f, mut c, mut m, mut s) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut gc, mut gm, mut gs) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        k.push(kernel(pages));
        let (first, cow, merge, secs) = ebb(pages, None);
        f.push(first);
        c.push(cow);
        m.push(merge);
        s.push(secs);
        let broker = Broker::start("bench", pages as u64).unwrap();
        let (_, cow, merge, secs) = ebb(pages, Some(&broker));
        gc.push(cow);
        gm.push(merge);
        gs.push(secs);
    }
    let (k, f, c, m, s) =
        (median(&mut k), median(&mut f), median(&mut c), median(&mut m), median(&mut s));
    let (gc, gm, gs) = (median(&mut gc), median(&mut gm), median(&mut gs));
    println!("pages {pages}, {rounds} rounds, medians, ns per page:");
    println!("  kernel first-touch write fault     {k:>9.0}");
    println!("  ebb first-touch write fault        {f:>9.0}   1.00");
    println!("  ebb copy-on-write of a shared page {c:>9.0}   {:.2}x the first-touch fault", c / f);
    println!("  scanner CPU per page shared        {m:>9.0}   ({pages} identical pages shared in {s:.2} s)");
    println!("  group: copy-on-write               {gc:>9.0}   {:.2}x the VM's own pool", gc / c);
    println!(
        "  group: scanner + broker CPU/page   {gm:>9.0}   {:.2}x ({pages} pages in {gs:.2} s)",
        gm / m
    );
}
