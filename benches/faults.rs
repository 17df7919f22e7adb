//! First-touch cost per 4 KiB page, host threads, all in one run:
//!   kernel   the kernel's own anonymous fault (no userfaultfd)
//!   minimal  a minimal userfaultfd handler: poll, read one message, UFFDIO_COPY a zero page
//!   ebb      ebb's engine (page-state table, stats), without and with fault-around 15/63/255
//! Medians over rounds, alternating the order; ratios against the baselines.
//!
//!   cargo bench --bench faults [-- PAGES ROUNDS]
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::uffd::handler::HandlerConfig;
use ebb::vstate::memory::GuestRam;

const PAGE: usize = 4096;

/// Writes one byte per page; returns nanoseconds per page.
fn touch(base: *mut u8, pages: usize) -> f64 {
    let t = Instant::now();
    for p in 0..pages {
        // SAFETY: base is a mapping of at least `pages` pages.
        unsafe { base.add(p * PAGE).write_volatile(1) };
    }
    t.elapsed().as_nanos() as f64 / pages as f64
}

fn mmap_anon(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

fn kernel(pages: usize) -> f64 {
    let base = mmap_anon(pages * PAGE);
    let ns = touch(base, pages);
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(base.cast(), pages * PAGE) };
    ns
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

fn minimal(pages: usize) -> f64 {
    let len = pages * PAGE;
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
    let ns = touch(base, pages);
    done.store(true, Ordering::Relaxed);
    handler.join().unwrap();
    drop(uffd);
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(base.cast(), len) };
    ns
}

fn ebb(pages: usize, fault_around: u64) -> f64 {
    let ram = GuestRam::new((pages * PAGE) as u64, 48).unwrap();
    let config = EngineConfig {
        handler: HandlerConfig { fault_around, active: None },
        ..Default::default()
    };
    let engine = Engine::start(&ram, &config).unwrap();
    let ns = touch(ram.regions()[0].hva as *mut u8, pages);
    engine.stop().unwrap();
    ns
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with('-')).collect();
    let pages: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(16384);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    type Case = (&'static str, Box<dyn Fn(usize) -> f64>);
    let cases: Vec<Case> = vec![
        ("kernel", Box::new(kernel)),
        ("minimal", Box::new(minimal)),
        ("ebb", Box::new(|p| ebb(p, 0))),
        ("ebb+around15", Box::new(|p| ebb(p, 15))),
        ("ebb+around63", Box::new(|p| ebb(p, 63))),
        ("ebb+around255", Box::new(|p| ebb(p, 255))),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for r in 0..rounds {
        // Rotate the order each round so no case always runs first or last.
        for i in 0..cases.len() {
            let c = (i + r) % cases.len();
            results[c].push((cases[c].1)(pages));
        }
    }
    println!("first touch of {pages} pages x {rounds} rounds (host threads), median ns/page:");
    let med: Vec<f64> = results.into_iter().map(median).collect();
    for ((name, _), m) in cases.iter().zip(&med) {
        println!("  {name:13} {m:9.0} ns/page  {:8.0} faults/s", 1e9 / m);
    }
    println!("ratios: ebb/minimal = {:.2}, ebb/kernel = {:.2}", med[2] / med[1], med[2] / med[0]);
    for (i, (name, _)) in cases.iter().enumerate().skip(3) {
        println!("        {name}/kernel = {:.2}", med[i] / med[0]);
    }
}
