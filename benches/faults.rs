//! First-touch cost per 4 KiB page, host threads, all in one run:
//!   kernel   the kernel's own anonymous fault (no userfaultfd)
//!   minimal  a minimal userfaultfd handler: poll, read one message, UFFDIO_COPY a zero page
//!   ebb      ebb's engine (page-state table, stats) with its default (adaptive fault-around),
//!            fault-around off, and fixed windows of 63 and 255
//! for a sequential walk, then for a scattered one (every 8th page, in a multiplicative
//! permutation order), where it also reports Consumed against the pages touched.
//! Medians over rounds, alternating the order; ratios against the baselines. Then 1, 2, 4
//! and 8 threads faulting at once, each over its share of a sequential walk: the kernel's
//! fault against ebb's engine without fault-around (every page one fault, all served by the
//! one handler thread), as faults per second of wall time.
//!
//!   cargo bench --bench faults [-- PAGES ROUNDS]
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
use common::mmap_anon;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::fault::around::FaultAround;
use ebb::mm::fault::handler::{HandlerConfig, DEFAULT_OOM_WAIT};
use ebb::mm::MemoryManager;
use ebb::vstate::memory::GuestRam;

const PAGE: usize = 4096;
/// The scattered walk touches every STRIDE-th page of a mapping STRIDE times the size.
const STRIDE: usize = 8;
/// A prime above 2^31: i * A mod n is a permutation of 0..n (the touch payload's order).
const PERMUTE: usize = 2_654_435_761;

/// How the pages are walked.
#[derive(Clone, Copy, PartialEq)]
enum Walk {
    /// Pages 0, 1, 2, ... in order.
    Sequential,
    /// Every STRIDE-th page, in a scattered order.
    Scattered,
}

impl Walk {
    fn span(self, pages: usize) -> usize {
        match self {
            Self::Sequential => pages,
            Self::Scattered => pages * STRIDE,
        }
    }

    fn page(self, i: usize, pages: usize) -> usize {
        match self {
            Self::Sequential => i,
            Self::Scattered => (i * PERMUTE % pages) * STRIDE,
        }
    }
}

/// Writes one byte in each of `pages` pages of the walk; returns nanoseconds per page.
fn touch(base: *mut u8, pages: usize, walk: Walk) -> f64 {
    let t = Instant::now();
    for i in 0..pages {
        // SAFETY: base is a mapping of walk.span(pages) pages.
        unsafe { base.add(walk.page(i, pages) * PAGE).write_volatile(1) };
    }
    t.elapsed().as_nanos() as f64 / pages as f64
}

/// Writes one byte in each of `pages` pages of the walk from `threads` threads at once, each
/// over its own share; returns nanoseconds of wall time per page.
fn touch_threads(base: *mut u8, pages: usize, walk: Walk, threads: usize) -> f64 {
    if threads == 1 {
        return touch(base, pages, walk);
    }
    let base = base as usize;
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            s.spawn(move || {
                for i in pages * k / threads..pages * (k + 1) / threads {
                    let at = base + walk.page(i, pages) * PAGE;
                    // SAFETY: base is a mapping of walk.span(pages) pages.
                    unsafe { (at as *mut u8).write_volatile(1) };
                }
            });
        }
    });
    t.elapsed().as_nanos() as f64 / pages as f64
}

fn kernel(pages: usize, walk: Walk) -> (f64, f64) {
    kernel_threads(pages, walk, 1)
}

fn kernel_threads(pages: usize, walk: Walk, threads: usize) -> (f64, f64) {
    let len = walk.span(pages) * PAGE;
    let base = mmap_anon(len);
    let ns = touch_threads(base, pages, walk, threads);
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(base.cast(), len) };
    (ns, 1.0)
}

// The minimal handler's own copy of the ABI, to stay independent of ebb's.
#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct Register {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;

fn minimal(pages: usize, walk: Walk) -> (f64, f64) {
    let len = walk.span(pages) * PAGE;
    let base = mmap_anon(len);
    // SAFETY: plain syscalls on descriptors and structs we own.
    let uffd = unsafe {
        let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) as i32;
        assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        let mut api = Api { api: 0xaa, features: 0, ioctls: 0 };
        assert_eq!(libc::ioctl(fd, UFFDIO_API, &mut api), 0);
        let mut reg = Register { start: base as u64, len: len as u64, mode: 1, ioctls: 0 };
        assert_eq!(libc::ioctl(fd, UFFDIO_REGISTER, &mut reg), 0);
        OwnedFd::from_raw_fd(fd)
    };
    let done = Arc::new(AtomicBool::new(false));
    let (fd, stop) = (uffd.as_raw_fd(), done.clone());
    let handler = std::thread::spawn(move || {
        let zero = vec![0u8; PAGE];
        let mut msg = [0u8; 32];
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll/read/ioctl on our descriptor with buffers we own.
            unsafe {
                if libc::poll(&mut pfd, 1, 10) <= 0 {
                    continue;
                }
                if libc::read(fd, msg.as_mut_ptr().cast(), 32) != 32 {
                    continue;
                }
                let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap()) & !(PAGE as u64 - 1);
                let mut c = Copy {
                    dst: addr,
                    src: zero.as_ptr() as u64,
                    len: PAGE as u64,
                    mode: 0,
                    copy: 0,
                };
                libc::ioctl(fd, UFFDIO_COPY, &mut c);
            }
        }
    });
    let ns = touch(base, pages, walk);
    done.store(true, Ordering::Relaxed);
    handler.join().unwrap();
    drop(uffd);
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(base.cast(), len) };
    (ns, 1.0)
}

/// ebb's engine: ns per page, and Consumed over the pages touched.
fn ebb(pages: usize, walk: Walk, fault_around: FaultAround) -> (f64, f64) {
    ebb_threads(pages, walk, fault_around, 1)
}

fn ebb_threads(pages: usize, walk: Walk, fault_around: FaultAround, threads: usize) -> (f64, f64) {
    let ram = GuestRam::new((walk.span(pages) * PAGE) as u64, 48).unwrap();
    let mm = MemoryManager::new(&ram.regions(), true);
    let config = EngineConfig {
        handler: HandlerConfig { fault_around, active: None, oom_wait: DEFAULT_OOM_WAIT },
        ..Default::default()
    };
    let engine = Engine::start(&mm, &config, None).unwrap();
    let ns = touch_threads(ram.regions()[0].hva as *mut u8, pages, walk, threads);
    let consumed = engine.snapshot(0).consumed_bytes as f64 / (pages * PAGE) as f64;
    engine.stop().unwrap();
    (ns, consumed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

type Case = (&'static str, Box<dyn Fn(usize, Walk) -> (f64, f64)>);

/// Runs every case `rounds` times, rotating the order; returns (median ns/page, median
/// consumed/touched) per case.
fn measure(cases: &[Case], pages: usize, rounds: usize, walk: Walk) -> Vec<(f64, f64)> {
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); cases.len()];
    for r in 0..rounds {
        // Rotate the order each round so no case always runs first or last.
        for i in 0..cases.len() {
            let c = (i + r) % cases.len();
            let (ns, consumed) = (cases[c].1)(pages, walk);
            results[c].0.push(ns);
            results[c].1.push(consumed);
        }
    }
    results.into_iter().map(|(ns, c)| (median(ns), median(c))).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with('-')).collect();
    let pages: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(16384);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    let cases: Vec<Case> = vec![
        ("kernel", Box::new(kernel)),
        ("minimal", Box::new(minimal)),
        ("ebb", Box::new(|p, w| ebb(p, w, FaultAround::default()))),
        ("ebb around=0", Box::new(|p, w| ebb(p, w, FaultAround::Fixed(0)))),
        ("ebb around=63", Box::new(|p, w| ebb(p, w, FaultAround::Fixed(63)))),
        ("ebb around=255", Box::new(|p, w| ebb(p, w, FaultAround::Fixed(255)))),
    ];
    for (walk, name) in [(Walk::Sequential, "sequential"), (Walk::Scattered, "scattered")] {
        let med = measure(&cases, pages, rounds, walk);
        println!("{name} first touch of {pages} pages x {rounds} rounds (host threads), median:");
        for ((name, _), (ns, consumed)) in cases.iter().zip(&med) {
            println!(
                "  {name:15} {ns:9.0} ns/page {:9.0} faults/s   consumed/touched {consumed:5.2}",
                1e9 / ns
            );
        }
        let (k, m) = (med[0].0, med[1].0);
        println!(
            "  ratios: ebb(default)/kernel = {:.2}, ebb around=0/minimal = {:.2}, consumed/touched (default) = {:.2}",
            med[2].0 / k,
            med[3].0 / m,
            med[2].1
        );
    }
    println!(
        "concurrent first touch of {pages} pages x {rounds} rounds, sequential shares, median:"
    );
    println!("  threads  kernel faults/s  ebb around=0 faults/s  ebb/kernel");
    for threads in [1, 2, 4, 8] {
        let cases: Vec<Case> = vec![
            ("kernel", Box::new(move |p, w| kernel_threads(p, w, threads))),
            (
                "ebb around=0",
                Box::new(move |p, w| ebb_threads(p, w, FaultAround::Fixed(0), threads)),
            ),
        ];
        let med = measure(&cases, pages, rounds, Walk::Sequential);
        let (k, e) = (1e9 / med[0].0, 1e9 / med[1].0);
        println!("  {threads:7} {k:16.0} {e:22.0} {:11.2}", e / k);
    }
}
