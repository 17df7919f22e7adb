//! Page sharing: guest pages with the same contents backed by one host page, copy-on-write,
//! ESX's first and cheapest reclaimer, done by ebb itself rather than the kernel's KSM.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the lever ([`SharingControl`]), the counters, and [`SharedPages`]: queueing a guest write's break for the unsharer, releasing a shared page |
//! | `pool.rs` | the canonical pages (a memfd), their reference counts, the hash index |
//! | `broker.rs` | a sharing group's pool and tables, in the host, serving the group's VMs |
//! | `member.rs` | a VM's side of its group: the pool the broker serves |
//! | `wire.rs` | the broker's messages and packet sockets |
//! | `merge.rs` | freezing candidates, comparing them, mapping a pool page over a guest page |
//! | `scanner.rs` | the rate-limited scanner thread |
//! | `unshare.rs` | the unsharer thread: copy-on-write breaks |
//! | `sys.rs` | the raw calls: memfd, `mremap`, `mmap` over a guest page |
//!
//! # The mechanism, and why
//!
//! - **Zero pages** are dropped: the page becomes Untouched and its next read maps the
//!   kernel's zero page (write-protected, as every zero-mapped page is, so its first write
//!   is seen). No pool page, no mapping of its own.
//! - **Other identical pages** map one canonical copy in a per-VM memfd pool, privately
//!   (`MAP_PRIVATE`): the kernel serves every read from the pool page with no trip to ebb.
//!   The mapping is registered on the fault handler's descriptor in write-protect mode and
//!   protected before it is moved over the guest page (see `merge.rs`), so the first guest
//!   write faults to the handler, which claims the page and hands it to the **unsharer**
//!   (`unshare.rs`): it gives the page fresh registered memory and copies the pool page in,
//!   which wakes the writer. The table says Resident again, and the page is an ordinary guest
//!   page: it can be sampled, evicted, ballooned.
//!
//! A guest page is never left empty and unregistered: any access then (the event loop
//! reading a virtqueue through the mapping, another vCPU) would get the kernel's zero page
//! behind ebb's back. Fresh memory is therefore registered *before* it is moved over the
//! guest page; the move keeps the registration through a remap event, which is why the
//! moves happen on threads other than the fault handler's (`mremap` waits for the handler
//! to read that event).
//!
//! The alternatives were weighed and measured: KSM on exactly the pages ebb found identical
//! merges across every process with mergeable pages, which breaks per-VM isolation, and
//! still converges at ksmd's pace; one KVM memory slot per shared range makes every guest
//! write an exit to ebb and there are about 32k slots; a content-addressed store of evicted
//! duplicates costs a fault on every read. The price of the pool is mappings: each shared
//! page may split guest RAM into up to two more, and a process has `vm.max_map_count`
//! (65530 by default), so at most a quarter of that many pages are shared at once (the
//! scanner counts what it skips for that reason).
//!
//! The scanner's hash is keyed with a secret of the pool (a random one per VM, or per
//! group), so a guest cannot fill pages that all land on one hash. A sharing group's pool
//! is the broker's (`broker.rs`): its members distrust each other, so none of them can
//! write the pool or its tables.
//!
//! # Invariants
//! - A Shared page maps a live pool slot privately, write-protected; it is never evicted
//!   (the reclaimers take Resident pages only) and is released only through
//!   [`SharedPages::release`], which moves fresh registered guest memory over it and drops
//!   its reference.
//! - Pages are moved in the page-state table only by the scanner (Resident to Shared or to
//!   Untouched, under a claim), the fault handler and the unsharer (Shared to Resident: the
//!   handler claims the page, the unsharer finishes the claim once the copy is mapped) and
//!   the memory manager (Shared to Ballooned or Untouched, under a claim).

pub mod broker;
pub mod member;
mod merge;
pub mod pool;
mod scanner;
mod sys;
mod unshare;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use merge::Merger;
pub(crate) use scanner::spawn;
pub use unshare::Queued;

use crate::mm::pages::PageTable;
use crate::mm::uffd::{Uffd, UffdError};
use crate::units::PAGE_SIZE;
use pool::SharePool;
use unshare::Unsharer;

/// How the scanner hashes pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShareHash {
    /// xxh3-64 of the page keyed with the pool's secret (its seed), so that a guest cannot
    /// choose contents that collide.
    #[default]
    Xxh3,
    /// Every page hashes to the same value: every candidate is a collision unless its
    /// contents are equal. For tests that prove a hash match alone never shares.
    Constant,
}

impl ShareHash {
    /// The hash of `page` under the key `seed`.
    pub fn of(self, seed: u64, page: &[u8]) -> u64 {
        match self {
            Self::Xxh3 => broker::group_hash(seed, page),
            Self::Constant => 0x5eed,
        }
    }
}

/// The lever, shared by the control API and the scanner: pages scanned per second.
#[derive(Debug)]
pub struct SharingControl {
    rate: AtomicU64,
    kick: EventFd,
    clock: crate::mm::thread::ThreadClock,
}

impl SharingControl {
    /// A lever at `rate` pages per second (0: off).
    ///
    /// # Errors
    /// The eventfd that wakes the scanner could not be created.
    pub fn new(rate: u64) -> std::io::Result<Self> {
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(Self { rate: AtomicU64::new(rate), kick, clock: Default::default() })
    }

    /// Scan `rate` pages per second (0 stops scanning; shared pages stay shared).
    pub fn set_scan_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        let _ = self.kick.write(1);
    }

    /// Pages scanned per second (0: off).
    pub fn scan_rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// CPU time of the scanner thread so far, nanoseconds (0 before it starts).
    pub fn cpu_ns(&self) -> u64 {
        self.clock.ns()
    }
}

/// Counters of page sharing.
#[derive(Debug, Default)]
pub struct SharingStats {
    /// Pages hashed.
    pub scanned: AtomicU64,
    /// Passes over guest RAM completed.
    pub passes: AtomicU64,
    /// Zero pages dropped.
    pub zero_pages: AtomicU64,
    /// Pages made to map a pool page.
    pub merged: AtomicU64,
    /// Candidates whose hash matched but whose contents did not.
    pub collisions: AtomicU64,
    /// Shared pages the guest wrote (each got a private copy).
    pub cow_breaks: AtomicU64,
    /// Visits skipped because the page was written while shared not long ago (backoff).
    pub backoff_skips: AtomicU64,
    /// Candidates left private because mapping the pool page failed.
    pub map_failures: AtomicU64,
    /// Candidates skipped because shared pages use their share of `vm.max_map_count`.
    pub map_limited: AtomicU64,
    /// Resident pages skipped because they were not mapped when the scanner looked (a
    /// state that would be a bug: see `scanner.rs`).
    pub unmapped_skips: AtomicU64,
}

/// Errors of unsharing or releasing a shared page.
#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    /// The fresh private page could not be made or moved over the guest page.
    #[error("mapping guest memory over shared page {idx}: {source}")]
    Map {
        /// Page index.
        idx: u64,
        /// The `mmap` or `mremap` error.
        source: std::io::Error,
    },
    /// A Shared page maps no pool page (a bug: the table and the pool disagree).
    #[error("shared page {idx} maps no pool page")]
    NoPoolPage {
        /// Page index.
        idx: u64,
    },
    /// The fresh memory could not be registered with userfaultfd.
    #[error("registering unshared page {idx}: {source}")]
    Register {
        /// Page index.
        idx: u64,
        /// The error.
        source: UffdError,
    },
    /// The pool page of a shared page could not be copied into its fresh memory.
    #[error("copying the pool page of shared page {idx}: {source}")]
    Copy {
        /// Page index.
        idx: u64,
        /// The error.
        source: UffdError,
    },
    /// The fresh memory of an unshared page was mapped by someone else before the copy,
    /// although it was registered and claimed (a bug).
    #[error("unshared page {idx} was mapped behind ebb's back before its contents were copied in")]
    MappedBehindOurBack {
        /// Page index.
        idx: u64,
    },
}

impl SharingError {
    /// True if the kernel was short of memory: waited out, not a failure.
    pub fn is_no_memory(&self) -> bool {
        let enomem = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOMEM);
        match self {
            Self::Map { source, .. } => enomem(source),
            Self::Register { source: UffdError::Register { source, .. }, .. } => enomem(source),
            _ => false,
        }
    }
}

/// The shared pages of one VM, as the fault handler and the memory manager see them.
#[derive(Debug)]
pub struct SharedPages {
    /// The pool.
    pub pool: Arc<dyn SharePool>,
    /// The counters.
    pub stats: Arc<SharingStats>,
    uffd: Arc<Uffd>,
    unsharer: Unsharer,
}

impl SharedPages {
    /// Shared pages of a VM whose faults `uffd` serves; starts their unsharer thread.
    ///
    /// # Errors
    /// The unsharer could not be started.
    pub fn new(
        pool: Arc<dyn SharePool>,
        stats: Arc<SharingStats>,
        uffd: Arc<Uffd>,
    ) -> std::io::Result<Self> {
        let unsharer = Unsharer::start(pool.clone(), stats.clone(), uffd.clone())?;
        Ok(Self { pool, stats, uffd, unsharer })
    }

    /// A guest write to shared page `idx` at `hva` (a write-protect fault): the page is
    /// claimed and queued for its private copy (see `unshare.rs`), whose ioctl wakes the
    /// writer. Called on the fault handler's thread; never blocks or allocates.
    pub fn unshare(&self, table: &Arc<PageTable>, idx: u64, hva: u64) -> Queued {
        self.unsharer.queue(table, idx, hva)
    }

    /// Readable once a copy-on-write break failed for good ([`take_failure`](Self::take_failure)).
    pub fn failed_event(&self) -> &EventFd {
        self.unsharer.failed_event()
    }

    /// The error a copy-on-write break failed on, if one did: the VM cannot go on.
    pub fn take_failure(&self) -> Option<SharingError> {
        self.unsharer.take_failure()
    }

    /// Stops the unsharer (the fault handler must still be reading events).
    pub fn stop(&self) {
        self.unsharer.stop();
    }

    /// Releases shared page `idx` at `hva`, claimed by the caller on its way to a state
    /// without memory (ballooned, untouched): fresh empty guest memory, registered, replaces
    /// the pool page, whose reference is dropped. (`MADV_DONTNEED` would not do: on a private
    /// file mapping it brings the file's page back, not zeros.) Never called on the fault
    /// handler's thread: the move waits for the handler to read its remap event.
    ///
    /// # Errors
    /// The fresh page could not be made, registered or moved: the page stays shared.
    pub fn release(&self, idx: u64, hva: u64) -> Result<(), SharingError> {
        let staging = sys::map_anon_page().map_err(|source| SharingError::Map { idx, source })?;
        // SAFETY: `staging` is our own fresh page, about to become guest page `idx`.
        let moved = unsafe { self.uffd.register(staging, PAGE_SIZE, self.uffd.has_wp()) }
            .map_err(|source| SharingError::Register { idx, source })
            .and_then(|()| {
                // SAFETY: `staging` is our own empty page; `hva` is guest page `idx`, claimed
                // by the caller, whose contents the guest gave up.
                unsafe { sys::remap_page_over(staging, hva) }
                    .map_err(|source| SharingError::Map { idx, source })
            });
        if let Err(e) = moved {
            // SAFETY: not moved, and nothing refers into it (unmapping also unregisters).
            unsafe { sys::unmap_page(staging) };
            return Err(e);
        }
        self.pool.detach(idx);
        Ok(())
    }
}
