//! Host-side reclaim: ESX's reclaimers of last resort, compression and then swapping, for
//! one VM, pulled by a lever (a target of resident memory).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the configuration and the lever ([`ReclaimControl`]) |
//! | `store.rs` | the stored copies of evicted pages: the compression cache, the swap file, a location per page |
//! | `evict.rs` | the eviction protocol (claim, move out, store, finish) and writing the cache back to swap |
//! | `victims.rs` | which pages go first: the coldest, by a clock with ages |
//! | `worker.rs` | the reclaim worker thread that pulls the lever |
//!
//! Pages come back through the fault handler (`mm/fault/handler.rs`): a fault on a
//! Compressed or Swapped page reads the copy (a swap page checked against its checksum),
//! maps it with `UFFDIO_COPY`, and frees the copy.
//!
//! The worker runs on a thread of its own, never the fault handler's, and never waits for
//! the fault handler (see `evict.rs`), so neither can hold the other up.

pub mod evict;
pub mod store;
pub mod victims;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub use victims::VictimPolicy;
pub(crate) use worker::spawn;

/// Fills a bitmap with the guest pages written since the last call (bit `i % 64` of word
/// `i / 64` for page `i` in `mm`'s numbering): KVM's dirty log, which the VMM owns.
pub type DirtyLog = Box<dyn FnMut(&mut Vec<u64>) -> std::io::Result<()> + Send>;

/// Share of guest RAM the compression cache may take by default (ESX's `MemZipMaxPct`).
pub const DEFAULT_CACHE_PERCENT: u64 = 10;

/// The lever, shared by the control API and the reclaim worker.
#[derive(Debug)]
pub struct ReclaimControl {
    target: AtomicU64,
    kick: EventFd,
    clock: crate::mm::thread::ThreadClock,
}

/// [`ReclaimControl`]'s target when reclaim is off.
const OFF: u64 = u64::MAX;

impl ReclaimControl {
    /// A lever with `target` set (None: off).
    ///
    /// # Errors
    /// The eventfd that wakes the worker could not be created.
    pub fn new(target: Option<u64>) -> std::io::Result<Self> {
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let clock = crate::mm::thread::ThreadClock::default();
        Ok(Self { target: AtomicU64::new(target.unwrap_or(OFF)), kick, clock })
    }

    /// Keep at most `bytes` of the guest's memory resident (None: stop reclaiming).
    pub fn set_target(&self, bytes: Option<u64>) {
        self.target.store(bytes.unwrap_or(OFF), Ordering::Relaxed);
        let _ = self.kick.write(1);
    }

    /// The target, if reclaim is on.
    pub fn target(&self) -> Option<u64> {
        let t = self.target.load(Ordering::Relaxed);
        (t != OFF).then_some(t)
    }

    /// CPU time of the reclaim worker thread so far, nanoseconds (0 before it starts).
    pub fn cpu_ns(&self) -> u64 {
        self.clock.ns()
    }
}
