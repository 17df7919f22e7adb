//! Guest- and client-facing parsers under random input, at scale: virtqueue descriptor tables
//! and rings for every balloon queue (inflate, deflate, statistics, free page reports) and
//! for a disk's queue, virtio-mmio register sequences, and control-socket request lines.
//!
//! A seeded driver feeds random bytes to `arbitrary`, which shapes them into inputs biased
//! towards the interesting edges (sizes at the limits, indices just past the end, PFNs at
//! the end of RAM). Invariants: no panic, nothing outside guest RAM is touched (vm-memory
//! refuses, the memory manager checks), nothing grows without bound, the page-state table
//! stays consistent, and bad input is counted.
//!
//! `EBB_FUZZ_CASES` sets the cases per target (default 35,000: over 10^5 in all, for CI);
//! `EBB_FUZZ_SEED` the first seed. `scripts/fuzz.sh` runs 10^7.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use ebb::api::ApiContext;
use ebb::config::BalloonConfig;
use ebb::devices::virtio::balloon::Balloon;
use ebb::devices::virtio::block::metrics::BlockMetrics;
use ebb::devices::virtio::block::{Block, Disk};
use ebb::devices::virtio::mmio::MmioTransport;
use ebb::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt};
use ebb::devices::BusDevice;
use ebb::metrics::{MemorySource, StatsSource};
use ebb::mm::pages::PageState;
use ebb::mm::rss::RssProbe;
use ebb::mm::MemoryManager;
use ebb::vstate::memory::RamRegion;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 16 << 20;
const PAGES: u64 = MEM >> 12;
/// Rings of queue i at RING_BASE + i * 64 KiB; buffers (PFN arrays, stats) at BUF_BASE.
const RING_BASE: u64 = 0x40_0000;
const BUF_BASE: u64 = 0x80_0000;
const BUF_BYTES: u64 = 64 << 10;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

fn cases() -> u64 {
    std::env::var("EBB_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(35_000)
}

fn first_seed() -> u64 {
    std::env::var("EBB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed)
}

/// xorshift64*: the seeded source of the bytes `arbitrary` shapes.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Runs `case` for every seed, with that seed's bytes; reports the rate.
fn drive(target: &str, bytes: usize, mut case: impl FnMut(&mut Unstructured<'_>)) {
    let n = cases();
    let start = Instant::now();
    let mut buf = vec![0u8; bytes];
    for seed in first_seed()..first_seed() + n {
        fill(seed, &mut buf);
        let mut u = Unstructured::new(&buf);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut u)));
        assert!(
            result.is_ok(),
            "{target}: seed {seed} panicked (EBB_FUZZ_SEED={seed} EBB_FUZZ_CASES=1 reproduces it)"
        );
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("fuzz {target}: {n} cases in {secs:.1} s ({:.0}/s)", n as f64 / secs);
}

/// A value biased to the edges: small, around `limit`, or anything.
fn edgy(u: &mut Unstructured<'_>, limit: u64) -> u64 {
    match u.int_in_range(0..=5u8).unwrap_or(0) {
        0 => u.int_in_range(0..=8).unwrap_or(0),
        1 => limit.saturating_sub(u.int_in_range(0..=2).unwrap_or(0)),
        2 => limit.saturating_add(u.int_in_range(0..=2).unwrap_or(0)),
        3 => u.int_in_range(0..=limit).unwrap_or(0),
        _ => u64::arbitrary(u).unwrap_or(0),
    }
}

struct Rig {
    mem: Arc<GuestMemoryMmap>,
    mm: Arc<MemoryManager>,
}

impl Rig {
    fn new() -> Self {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap());
        let hva = vm_memory::GuestMemoryBackend::get_host_address(&*mem, GuestAddress(0)).unwrap();
        let region = RamRegion { gpa: 0, hva: hva as u64, len: MEM };
        Self { mem, mm: Arc::new(MemoryManager::new(&[region], true)) }
    }

    fn balloon(&self, u: &mut Unstructured<'_>) -> Balloon {
        let config = BalloonConfig {
            target_mib: 0,
            stats_interval_s: u8::arbitrary(u).unwrap_or(0).into(),
            deflate_on_oom: bool::arbitrary(u).unwrap_or(false),
            free_page_reporting: bool::arbitrary(u).unwrap_or(false),
        };
        Balloon::new(config, self.mem.clone(), MEM, self.mm.clone()).unwrap()
    }

    fn interrupt() -> Arc<VirtioInterrupt> {
        Arc::new(VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    }

    /// The page-state table still adds up, and nothing left is in flight.
    fn check_table(&self) {
        let t = self.mm.table().unwrap();
        let total: u64 = PageState::ALL.iter().map(|&s| t.count(s)).sum();
        assert_eq!(total, PAGES, "the per-state counts add up to the pages");
        assert_eq!((0..PAGES).filter(|&p| t.flags(p) & 0x80 != 0).count(), 0, "no claim left");
    }
}

/// Writes a random descriptor table, driver ring and buffers for a queue of `size` at `base`.
fn random_queue(u: &mut Unstructured<'_>, mem: &GuestMemoryMmap, base: u64, size: u16) {
    for i in 0..u64::from(size) {
        let addr = match u.int_in_range(0..=3u8).unwrap_or(0) {
            0..=1 => BUF_BASE + u.int_in_range(0..=BUF_BYTES / 4).unwrap_or(0) * 4,
            2 => edgy(u, MEM),
            _ => u64::arbitrary(u).unwrap_or(0),
        };
        let len = match u.int_in_range(0..=3u8).unwrap_or(0) {
            0 => u.int_in_range(0..=8u32).unwrap_or(0) * 4,
            1 => edgy(u, 1024) as u32,
            2 => edgy(u, 4 << 20) as u32,
            _ => u32::arbitrary(u).unwrap_or(0),
        };
        let flags = u16::arbitrary(u).unwrap_or(0) & (DESC_F_NEXT | DESC_F_WRITE);
        let next = edgy(u, u64::from(size)) as u16;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&d, GuestAddress(base + 16 * i));
    }
    let avail = base + 0x8000;
    let idx = edgy(u, u64::from(size)) as u16;
    let _ = mem.write_obj(idx, GuestAddress(avail + 2));
    for i in 0..u64::from(size) {
        let head = edgy(u, u64::from(size)) as u16;
        let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * i));
    }
    // PFN arrays and statistics: PFNs near guest RAM, or anything.
    for i in 0..u.int_in_range(0..=64u64).unwrap_or(0) {
        let word = match u.int_in_range(0..=2u8).unwrap_or(0) {
            0 => u.int_in_range(0..=PAGES + 4).unwrap_or(0) as u32,
            1 => edgy(u, PAGES) as u32,
            _ => u32::arbitrary(u).unwrap_or(0),
        };
        let _ = mem.write_obj(word, GuestAddress(BUF_BASE + 4 * i));
    }
}

/// Every balloon queue (inflate, deflate, statistics, reports) with random descriptor
/// tables, rings and buffers, processed in random order.
#[test]
fn balloon_queues_survive_random_rings() {
    let rig = Rig::new();
    drive("balloon queues", 16 << 10, |u| {
        let mut balloon = rig.balloon(u);
        let features = balloon.avail_features() & u64::arbitrary(u).unwrap_or(0);
        let roles = Balloon::roles(features).len();
        let mut queues = Vec::new();
        for i in 0..roles {
            let size = 1u16 << u.int_in_range(0..=8u32).unwrap_or(4);
            let base = RING_BASE + (i as u64) * 0x1_0000;
            let mut q = Queue::new(256).unwrap();
            q.set_size(size);
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some((base + 0x8000) as u32), Some(0));
            q.set_used_ring_address(Some((base + 0xc000) as u32), Some(0));
            q.set_ready(true);
            random_queue(u, &rig.mem, base, size);
            queues.push(q);
        }
        let a = Activation {
            mem: rig.mem.clone(),
            queues,
            acked_features: features,
            interrupt: Rig::interrupt(),
        };
        if balloon.activate(a).is_err() {
            return;
        }
        for _ in 0..u.int_in_range(0..=8u32).unwrap_or(1) {
            let q = edgy(u, roles as u64) as usize;
            balloon.process_queue(q);
            if bool::arbitrary(u).unwrap_or(false) {
                balloon.request_stats();
            }
        }
        let _ = balloon.set_target_mib(edgy(u, MEM >> 20));
        assert!(balloon.guest_stats().values.len() <= 4096 / 10, "statistics are bounded");
        rig.check_table();
    });
}

/// The virtio-mmio transport of a balloon under random register sequences: any offset,
/// width and value, status changes in any order, notifications of any queue.
#[test]
fn mmio_transport_survives_random_register_sequences() {
    let rig = Rig::new();
    const REGS: [u64; 27] = [
        0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
        0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0fc, 0x100, 0x104,
        0x10c,
    ];
    drive("mmio registers", 8 << 10, |u| {
        let balloon = Arc::new(std::sync::Mutex::new(rig.balloon(u)));
        let mut t = MmioTransport::new(balloon, rig.mem.clone(), Rig::interrupt());
        for _ in 0..u.int_in_range(1..=64u32).unwrap_or(1) {
            let offset = match u.int_in_range(0..=4u8).unwrap_or(0) {
                0..=2 => *u.choose(&REGS).unwrap_or(&0),
                3 => edgy(u, 0x1000),
                _ => u64::arbitrary(u).unwrap_or(0),
            };
            let width = *u.choose(&[1usize, 2, 4, 4, 4, 8]).unwrap_or(&4);
            let value = match offset {
                // Mostly plausible values where they matter.
                0x070 => u32::from(u8::arbitrary(u).unwrap_or(0)) as u64,
                0x038 => edgy(u, 256),
                0x080 | 0x090 | 0x0a0 => RING_BASE + edgy(u, 0x1_0000),
                _ => u64::arbitrary(u).unwrap_or(0),
            };
            if bool::arbitrary(u).unwrap_or(false) {
                let mut data = vec![0u8; width];
                t.read(offset, &mut data);
            } else {
                let _ = t.write(offset, &value.to_le_bytes()[..width]);
            }
            if u.ratio(1, 8).unwrap_or(false) {
                random_queue(u, &rig.mem, RING_BASE, 16);
            }
        }
        rig.check_table();
    });
}

/// Control-socket request lines: valid requests with their bytes changed, numbers at the
/// edges, deep nesting, garbage. Every line gets one reply object, never a panic.
#[test]
fn control_requests_always_get_one_reply_object() {
    let rig = Rig::new();
    let hva = vm_memory::GuestMemoryBackend::get_host_address(&*rig.mem, GuestAddress(0)).unwrap();
    let probe = RssProbe::new(vec![RamRegion { gpa: 0, hva: hva as u64, len: MEM }]);
    let mut seed_bytes = vec![0u8; 64];
    fill(1, &mut seed_bytes);
    let balloon = rig.balloon(&mut Unstructured::new(&seed_bytes));
    let ctx = ApiContext {
        balloon: Some(Arc::new(std::sync::Mutex::new(balloon))),
        transport: None,
        reclaim: None,
        sharing: Some(Arc::new(ebb::mm::sharing::SharingControl::new(0).unwrap())),
        gate: Some(Arc::new(ebb::mm::gate::AllocGate::default())),
        stats: Arc::new(StatsSource::new(MemorySource::Plain(probe))),
        start: Instant::now(),
    };
    const CORPUS: [&str; 10] = [
        r#"{"balloon": {"target_bytes": 8388608}}"#,
        r#"{"alloc": {"wait_above_bytes": 67108864}, "v": 2}"#,
        r#"{"alloc": {"wait_above_bytes": null}}"#,
        r#"{"sharing": {"scan_rate": 1000}}"#,
        r#"{"reclaim": {"target_bytes": null}}"#,
        r#"{"balloon_stats": {}}"#,
        r#"{"stats": {}}"#,
        r#"{"balloon": {"target_bytes": 18446744073709551615}}"#,
        r#"{"balloon": {"target_bytes": -1.5e308}}"#,
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ];
    drive("control requests", 4 << 10, |u| {
        let mut line: Vec<u8> = u.choose(&CORPUS).unwrap_or(&CORPUS[0]).as_bytes().to_vec();
        for _ in 0..u.int_in_range(0..=6u32).unwrap_or(0) {
            let at = u.int_in_range(0..=line.len()).unwrap_or(0);
            match u.int_in_range(0..=3u8).unwrap_or(0) {
                0 => line.insert(at, u8::arbitrary(u).unwrap_or(b'{')),
                1 if at < line.len() => {
                    line.remove(at);
                }
                2 if at < line.len() => line[at] = *u.choose(b"{}[]\":,0-9e.").unwrap_or(&b'0'),
                _ => line.extend_from_slice(u.bytes(8).unwrap_or(&[])),
            }
        }
        let Ok(text) = std::str::from_utf8(&line) else { return };
        let reply = ctx.handle(text);
        let obj = reply.as_object().expect("a reply is a JSON object");
        assert!(!obj.is_empty(), "{text:?} got an empty reply");
    });
}

/// A disk's queue with random descriptor tables and rings, and request headers biased to
/// the real types and to sectors at the end of the disk, on direct-I/O and page-cache images,
/// writable and read-only. Invariants: no panic, the image keeps its size (nothing is written
/// past its end), a read-only image keeps its bytes.
#[test]
fn block_queue_survives_random_rings() {
    let rig = Rig::new();
    // 64 KiB (direct I/O on most file systems) and 63.5 KiB (always the page cache).
    let sizes = [64u64 << 10, (64 << 10) - 512];
    let mut disks: Vec<(std::path::PathBuf, Block, Vec<u8>)> = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        for read_only in [false, true] {
            let bytes: Vec<u8> = (0..size).map(|b| (b % 253) as u8).collect();
            let name = format!("{}-fuzz-disk-{i}-{read_only}", std::process::id());
            let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
            std::fs::write(&path, &bytes).unwrap();
            let block = Block::new(Disk::open(&path, read_only).unwrap());
            disks.push((path, block, bytes));
        }
    }
    drive("block queue", 16 << 10, |u| {
        let which = u.int_in_range(0..=disks.len() - 1).unwrap_or(0);
        let (path, block, original) = &mut disks[which];
        let capacity = block.disk().capacity_sectors();
        block.reset();
        let size = 1u16 << u.int_in_range(0..=8u32).unwrap_or(4);
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(RING_BASE as u32), Some(0));
        q.set_avail_ring_address(Some((RING_BASE + 0x8000) as u32), Some(0));
        q.set_used_ring_address(Some((RING_BASE + 0xc000) as u32), Some(0));
        q.set_ready(true);
        random_queue(u, &rig.mem, RING_BASE, size);
        // Headers at every 16 bytes of the buffers' start: type, reserved, sector.
        for i in 0..u.int_in_range(0..=32u64).unwrap_or(0) {
            let t = match u.int_in_range(0..=3u8).unwrap_or(0) {
                0..=2 => *u.choose(&[0u32, 1, 4, 8]).unwrap_or(&0),
                _ => u32::arbitrary(u).unwrap_or(0),
            };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&edgy(u, capacity).to_le_bytes());
            let _ = rig.mem.write_slice(&h, GuestAddress(BUF_BASE + 16 * i));
        }
        let features = block.avail_features() | (1 << 32);
        let a = Activation {
            mem: rig.mem.clone(),
            queues: vec![q],
            acked_features: features,
            interrupt: Rig::interrupt(),
        };
        if block.activate(a).is_err() {
            return;
        }
        for _ in 0..u.int_in_range(0..=4u32).unwrap_or(1) {
            block.process_queue(edgy(u, 1) as usize);
        }
        let image = std::fs::read(&*path).unwrap();
        assert_eq!(image.len(), original.len(), "the image keeps its size");
        if block.disk().read_only() {
            assert!(image == *original, "a read-only image is never written");
        }
    });
    // The random rings reach past the checks: requests were served, not only refused.
    let served = |f: fn(&BlockMetrics) -> u64| disks.iter().map(|d| f(d.1.metrics())).sum::<u64>();
    let reads = served(|m| m.reads.load(Ordering::Relaxed));
    let writes = served(|m| m.writes.load(Ordering::Relaxed));
    eprintln!("fuzz block queue: {reads} reads and {writes} writes served");
    assert!(cases() < 1000 || (reads > 0 && writes > 0), "{reads} reads, {writes} writes");
    for (path, _, _) in disks {
        let _ = std::fs::remove_file(path);
    }
}
