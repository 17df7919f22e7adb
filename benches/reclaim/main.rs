//! Host-side reclaim, host threads only (no KVM), all in one run:
//!
//! 1. LZ4 as ebb's compression cache runs it (lz4_flex block format, safe decoding) on 4 KiB
//!    pages, one core: the pages of the guest kernel images (vmlinux, bzImage,
//!    initramfs.cpio: files, so a proxy for the memory of an idle guest, not a measurement of
//!    one) and a synthetic mix like the touch payload's (zero, same-filled, text-like,
//!    random). Compress and decompress MB/s, the compression ratio, the share of data pages
//!    (neither zero nor same-filled) that compress to 2 KiB or less (what the cache keeps),
//!    and the cache's own store (classify + insert) and load paths; goal vs measured.
//! 2. Eviction: taking a page out of a mapping, batches of 64: UFFDIO_MOVE into a scratch
//!    range registered on a descriptor of its own (ebb's way), one ioctl per page and one per
//!    64 pages, against copying the page out and MADV_DONTNEED, per page (the baseline) and
//!    per 64 pages.
//! 3. Swap-in: a first read of a page evicted into the compression cache, and of one evicted
//!    into the swap file (random data), against a first touch of a never-touched page served
//!    by the same engine (a write: UFFDIO_COPY, the baseline; a read: UFFDIO_ZEROPAGE),
//!    fault-around off; per page as the faulting thread sees it, and the engine's own p50/p99
//!    service time.
//! 4. A workload: the engine as a memory cgroup would be used, WORKLOAD MiB of the mix
//!    written with a resident target of LIMIT MiB, then reread (and checked): per-page times,
//!    the reclaim worker's evictions per CPU second and per wall second, where the evicted
//!    pages went. scripts/bench-reclaim.sh runs the kernel's zswap on the same pages and
//!    prints the two side by side.
//!
//! Medians over rounds, rotating the order of the cases; ratios against a baseline measured
//! in the same run. Timings are never asserted (a wrong page read back is).
//!
//! ```text
//! cargo bench --bench reclaim [-- PAGES ROUNDS [WORKLOAD_MIB LIMIT_MIB]]
//! ```
//!
//! PAGES (default 4096) is the page count of parts 2 and 3 (per case), ROUNDS (default 5)
//! the rounds of parts 1-3; part 4 runs once (default 256 MiB, limit 64 MiB).
//! `EBB_GUEST_IMAGES`: the image files of part 1, colon-separated (default: vmlinux, bzImage
//! and initramfs.cpio of the newest complete entry of ~/.cache/ebb/guest).
//! `EBB_BENCH_OUT`: a directory where results.json, mix-pool.bin (the mix's pages, which part
//! 4 writes in turn) and text-blob.bin (text-like bytes for touch's `text` pages) go.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

#[path = "../common/mod.rs"]
mod common;
pub(crate) use common::mmap_anon;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb::mm::engine::{Engine, EngineConfig};
use ebb::mm::fault::around::FaultAround;
use ebb::mm::fault::handler::{HandlerConfig, DEFAULT_OOM_WAIT};
use ebb::mm::pages::PageState;
use ebb::mm::reclaim::evict::BATCH_PAGES;
use ebb::mm::reclaim::store::Backing;
use ebb::mm::reclaim::DEFAULT_CACHE_PERCENT;
use ebb::mm::swap::SwapFile;
use ebb::mm::uffd::{Resolved, Uffd, DEFAULT_UFFD_DEV};
use ebb::mm::zcache::{classify, Content, Page, ZCache, ZcacheError, MAX_COMPRESSED_BYTES};
use ebb::mm::MemoryManager;
use ebb::vstate::memory::GuestRam;
use lz4_flex::block::{compress_into, decompress_into, get_maximum_output_size};
use serde_json::{json, Value};

pub(crate) const PAGE: usize = 4096;
pub(crate) const PAGE_U64: u64 = 4096;
/// Pages per eviction batch: the reclaim worker's.
pub(crate) const BATCH: usize = BATCH_PAGES;
/// Distinct pages in the mix's pool; part 4 (and the zswap run) writes page i = pool[i % POOL].
pub(crate) const POOL: usize = 4096;
/// Pages of text-like bytes written for touch's `text` pages.
pub(crate) const TEXT_BLOB_PAGES: usize = 256;
/// Least time one throughput sample of part 1 takes.
pub(crate) const SAMPLE: Duration = Duration::from_millis(40);
/// The goals of the issue, MB/s (1 MB = 10^6 bytes) on one core.
pub(crate) const GOAL_COMPRESS_MBS: f64 = 1000.0;
pub(crate) const GOAL_DECOMPRESS_MBS: f64 = 4000.0;
/// The goal of the issue for a swap-in from the cache against a bare fault.
pub(crate) const GOAL_SWAPIN_RATIO: f64 = 1.2;
/// SplitMix64's increment.
pub(crate) const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// A prime above 2^31: i * A mod n is a permutation of 0..n (the touch payload's order).
pub(crate) const PERMUTE: u64 = 2_654_435_761;

/// SplitMix64's finalizer.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64.
pub(crate) struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix64(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub(crate) fn zero_page() -> Box<Page> {
    vec![0u8; PAGE].into_boxed_slice().try_into().unwrap()
}

mod engine;
mod evict;
mod lz4;
mod mix;

use engine::*;
use evict::*;
use lz4::*;
use mix::*;

// ---------------------------------------------------------------------------------------
// Small helpers

/// `x` with `prec` decimals, right-aligned in `width`; "n/a" when there is nothing to show.
pub(crate) fn num(x: f64, width: usize, prec: usize) -> String {
    if x.is_finite() {
        format!("{x:width$.prec$}")
    } else {
        format!("{:>width$}", "n/a")
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `permille`/1000 quantile.
pub(crate) fn quantile(mut v: Vec<f64>, permille: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) * permille + 500) / 1000]
}

/// Runs `pass` (which handles `bytes` bytes) until SAMPLE has elapsed; returns MB/s.
pub(crate) fn throughput(bytes: usize, mut pass: impl FnMut()) -> f64 {
    if bytes == 0 {
        return f64::NAN;
    }
    let t = Instant::now();
    let mut passes = 0u32;
    while passes == 0 || t.elapsed() < SAMPLE {
        pass();
        passes += 1;
    }
    (bytes as f64 * f64::from(passes)) / t.elapsed().as_secs_f64() / 1e6
}

pub(crate) fn dontneed(addr: *mut u8, len: usize) {
    // SAFETY: the callers pass ranges of their own anonymous mappings, whose contents they
    // no longer need.
    let r = unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// A directory removed (with what is left in it) when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("ebb-bench-reclaim-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn skip(part: &str, why: &str) {
    println!("\n  *** SKIPPED {part}: {why} ***\n");
}

// ---------------------------------------------------------------------------------------

fn write_file(path: &Path, pages: impl Iterator<Item = Box<Page>>) {
    let mut bytes = Vec::new();
    for p in pages {
        bytes.extend_from_slice(&p[..]);
    }
    std::fs::write(path, bytes).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let pages = arg(0, 4096).max(BATCH as u64) as usize;
    let rounds = arg(1, 5).max(1) as usize;
    let (workload_mib, limit_mib) = (arg(2, 256).max(4), arg(3, 64).max(1));
    let vocab = Vocab::new();
    let pool: Vec<(Kind, Box<Page>)> = (0..POOL as u64).map(|i| mix_page(&vocab, i)).collect();
    let out = std::env::var("EBB_BENCH_OUT").ok().map(PathBuf::from);
    if let Some(dir) = &out {
        write_file(&dir.join("mix-pool.bin"), pool.iter().map(|(_, p)| p.clone()));
        let mut rng = Rng(0x7465_7874);
        write_file(&dir.join("text-blob.bin"), (0..TEXT_BLOB_PAGES).map(|_| vocab.page(&mut rng)));
    }
    let counts: Vec<String> = MIX.iter().map(|(k, pct)| format!("{k:?} {pct}%")).collect();
    println!("(the mix: {}; a pool of {POOL} distinct pages)\n", counts.join(", "));
    let lz4 = part_lz4(&pool, rounds);
    let evict = part_evict(pages, rounds);
    let swapin = part_swapin(&pool, pages, rounds);
    let workload = part_workload(&pool, workload_mib, limit_mib);
    if let Some(dir) = &out {
        let all = json!({"lz4": lz4, "evict": evict, "swapin": swapin, "workload": workload});
        std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&all).unwrap())
            .unwrap();
    }
}
