//! Page sharing: guest pages with the same contents backed by one host page, copy-on-write,
//! ESX's first and cheapest reclaimer, done by ebb itself rather than the kernel's KSM.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the lever ([`SharingControl`]), the counters, and [`SharedPages`]: unsharing on a guest write, releasing a shared page |
//! | `pool.rs` | the canonical pages (a memfd), their reference counts, the hash index |
//! | `merge.rs` | freezing candidates, comparing them, mapping a pool page over a guest page |
//! | `scanner.rs` | the rate-limited scanner thread |
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
//!   write faults to the handler, which **unshares**: it claims the page, maps fresh
//!   anonymous memory over it, registers it as guest RAM is registered, copies the pool page
//!   in with `UFFDIO_COPY` (which wakes the writer) and drops the page's reference. The
//!   table says Resident again, and the page is an ordinary guest page: it can be sampled,
//!   evicted, ballooned.
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
//! The pool and its index are plain values behind an `Arc`, so that one pool can serve a
//! sharing group across VM processes once the host creates the memfd and hands it down.
//!
//! # Invariants
//! - A Shared page maps a live pool slot privately, write-protected; it is never evicted
//!   (the reclaimers take Resident pages only) and is released only through
//!   [`SharedPages::release`], which gives it fresh guest memory and drops its reference.
//! - Pages are moved in the page-state table only by the scanner (Resident to Shared or to
//!   Untouched, under a claim), the fault handler (Shared to Resident, under a claim) and
//!   the memory manager (Shared to Ballooned or Untouched, under a claim).

pub mod group;
mod merge;
pub mod pool;
mod scanner;
mod sys;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use merge::Merger;
pub(crate) use scanner::spawn;

use crate::mm::pages::{PageState, PageTable, StateSet};
use crate::mm::uffd::{Resolved, Uffd, UffdError};
use crate::units::PAGE_SIZE;
use pool::SharePool;

/// How the scanner hashes pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShareHash {
    /// xxh3-64 of the page.
    #[default]
    Xxh3,
    /// Every page hashes to the same value: every candidate is a collision unless its
    /// contents are equal. For tests that prove a hash match alone never shares.
    Constant,
}

impl ShareHash {
    /// The hash of `page`.
    pub fn of(self, page: &[u8]) -> u64 {
        match self {
            Self::Xxh3 => xxhash_rust::xxh3::xxh3_64(page),
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
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
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
}

/// Errors of unsharing or releasing a shared page.
#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    /// Fresh guest memory could not be mapped over the page.
    #[error("mapping guest memory over shared page {idx}: {source}")]
    Map {
        /// Page index.
        idx: u64,
        /// The `mmap` error.
        source: std::io::Error,
    },
    /// The pool page of a shared page could not be copied into its fresh memory.
    #[error("copying the pool page of shared page {idx}: {source}")]
    Copy {
        /// Page index.
        idx: u64,
        /// The error.
        source: UffdError,
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
}

/// What an unshare did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unshared {
    /// The page is private and the writer woken.
    Done,
    /// The page has its fresh memory, and its copy is on the pending list (it said
    /// EAGAIN): [`SharedPages::retry`] finishes it and wakes the writer.
    Pending,
    /// Not now (a mover holds the page): try the fault again later.
    Later,
    /// The kernel had no memory (for the fresh mapping: the page stays shared; or for the
    /// copy: it is on the pending list too): try again later.
    NoMemory,
}

/// The shared pages of one VM, as the fault handler and the memory manager see them.
#[derive(Debug)]
pub struct SharedPages {
    /// The pool.
    pub pool: Arc<dyn SharePool>,
    /// The counters.
    pub stats: Arc<SharingStats>,
    uffd: Arc<Uffd>,
}

impl SharedPages {
    /// Shared pages of a VM whose faults `uffd` serves.
    pub fn new(pool: Arc<dyn SharePool>, stats: Arc<SharingStats>, uffd: Arc<Uffd>) -> Self {
        Self { pool, stats, uffd }
    }

    /// Gives page `idx` at `hva`, claimed by the caller, fresh empty guest memory registered
    /// as guest RAM is. Its pool reference is the caller's to drop.
    fn remap_private(&self, idx: u64, hva: u64) -> Result<(), SharingError> {
        // SAFETY: `hva` is the guest page `idx`, claimed by the caller: its contents are in
        // the pool, and nothing refers into it.
        unsafe { sys::map_anon_over(hva) }.map_err(|source| SharingError::Map { idx, source })?;
        let wp = self.uffd.has_wp();
        // Without registration the kernel would serve the page's next fault a zero page
        // behind ebb's back: that is an error the VM cannot survive, not a retry.
        self.uffd
            .register(hva, PAGE_SIZE, wp)
            .map_err(|source| SharingError::Register { idx, source })
    }

    /// A guest write to shared page `idx` at `hva` (a write-protect fault): the page gets a
    /// private copy of the pool page, and the writer wakes. Called on the fault handler's
    /// thread; a copy that says EAGAIN or ENOMEM goes on `pending`, for
    /// [`retry`](Self::retry).
    ///
    /// # Errors
    /// The page could not be given guest memory of its own, or the copy failed for good.
    pub fn unshare(
        &self,
        table: &PageTable,
        idx: u64,
        hva: u64,
        pending: &mut Vec<(u64, u64)>,
    ) -> Result<Unshared, SharingError> {
        if table.begin(idx, StateSet::of(&[PageState::Shared]), PageState::Resident).is_err() {
            return Ok(Unshared::Later);
        }
        if let Err(e) = self.remap_private(idx, hva) {
            if matches!(e, SharingError::Map { .. }) {
                table.abort(idx, PageState::Shared); // still shared: the write waits
                return Ok(Unshared::NoMemory);
            }
            return Err(e);
        }
        let outcome = self.copy_in(table, idx, hva)?;
        if outcome != Unshared::Done {
            pending.push((idx, hva));
        }
        Ok(outcome)
    }

    /// Retries the copies of unshares that said EAGAIN or ENOMEM; keeps those that still do.
    ///
    /// # Errors
    /// A copy failed for good.
    pub fn retry(
        &self,
        table: &PageTable,
        pending: &mut Vec<(u64, u64)>,
    ) -> Result<(), SharingError> {
        let mut result = Ok(());
        pending.retain(|&(idx, hva)| match self.copy_in(table, idx, hva) {
            Ok(Unshared::Done) => false,
            Ok(_) => true,
            Err(e) => {
                result = Err(e);
                true
            }
        });
        result
    }

    /// Copies the pool page of claimed page `idx` into its fresh memory at `hva`.
    fn copy_in(&self, table: &PageTable, idx: u64, hva: u64) -> Result<Unshared, SharingError> {
        let Some(page) = self.pool.slot_of(idx).and_then(|s| self.pool.page(s)) else {
            return Err(SharingError::NoPoolPage { idx });
        };
        // Counted before the copy, which wakes the writer: it may read the statistics at once.
        self.stats.cow_breaks.fetch_add(1, Ordering::Relaxed);
        let outcome = match self.uffd.copy(hva, &page[..], false) {
            Ok((Resolved::Mapped | Resolved::AlreadyMapped, _)) => {
                self.pool.detach(idx);
                table.finish(idx);
                table.mark_unshared(idx);
                return Ok(Unshared::Done);
            }
            Ok((Resolved::NoMemory, _)) => Ok(Unshared::NoMemory),
            Ok((Resolved::Retry, _)) => Ok(Unshared::Pending),
            Err(source) => Err(SharingError::Copy { idx, source }),
        };
        self.stats.cow_breaks.fetch_sub(1, Ordering::Relaxed);
        outcome
    }

    /// Releases shared page `idx` at `hva`, claimed by the caller on its way to a state
    /// without memory (ballooned, untouched): fresh empty guest memory replaces the pool
    /// page, whose reference is dropped. (`MADV_DONTNEED` would not do: on a private file
    /// mapping it brings the file's page back, not zeros.)
    ///
    /// # Errors
    /// The page could not be given guest memory of its own (it stays shared).
    pub fn release(&self, idx: u64, hva: u64) -> Result<(), SharingError> {
        match self.remap_private(idx, hva) {
            Err(e @ SharingError::Map { .. }) => return Err(e),
            // The guest gave the page up, so its (zero) contents do not matter; only its
            // next faults will not reach ebb.
            Err(e) => log::error!("page sharing: {e}; the page is released untracked"),
            Ok(()) => {}
        }
        self.pool.detach(idx);
        Ok(())
    }
}
