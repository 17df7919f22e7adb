//! Serving guest faults: the fault-handler thread, fault-around, and the Active-memory
//! sampler that rides on write protection. Above `uffd` (the kernel ABI, which it drives)
//! and beside the mechanisms it calls into to bring a page back: the stores of evicted pages
//! (`reclaim`) and the unsharer (`sharing`).
//!
//! | file | owns |
//! |---|---|
//! | `handler.rs` | the handler thread: reads events, resolves each fault by the page's state |
//! | `around.rs` | the fault-around window: how many untouched neighbours a fault maps |
//! | `active.rs` | Active memory: the write-protect sampler and its averages |
//! | `swapin.rs` | the swap-in readers: swap-file reads and their copies, off the handler's thread |
//! | `inject.rs` | test-only failures of the handler (debug builds) |
//!
//! Invariant: the handler thread never touches guest memory through its mapping and never
//! calls `madvise` or `mremap` on it (each would wait for an event only this thread reads),
//! and never waits on a disk: swap-file reads go to the readers.

pub mod active;
pub mod around;
pub mod handler;
#[cfg(debug_assertions)]
pub mod inject;
pub mod swapin;

use crate::mm::pages::PageState;
use crate::mm::reclaim::store::StoreError;
use crate::mm::sharing::SharingError;
use crate::mm::uffd::UffdError;

/// Why the fault handler stopped: guest faults can no longer be served.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// A userfaultfd call failed for a reason other than a race.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// An evicted page's copy could not be read back: its contents are lost, and the guest
    /// must not see zeros in their place.
    #[error("bringing an evicted page back: {0}")]
    Restore(#[source] StoreError),
    /// Guest faults could not be served for this long because the host (or the VM's memory
    /// cgroup) had no memory for them.
    #[error("out of memory: the kernel refused guest pages for {waited:?} (host memory or the VM's memory cgroup limit is exhausted)")]
    OutOfMemory {
        /// How long ebb waited and retried.
        waited: std::time::Duration,
    },
    /// A shared page could not be given a private copy on a guest write.
    #[error("unsharing a page: {0}")]
    Sharing(#[source] SharingError),
    /// A fault on a page whose contents this build cannot bring back.
    #[error("fault on page {idx}, which is {state:?}: nothing here can restore it")]
    Unrestorable {
        /// Page index.
        idx: u64,
        /// Its state.
        state: PageState,
    },
    /// An evicted page, claimed to be brought back, was found mapped: something mapped it
    /// behind ebb's back (a bug), so its contents are not the guest's.
    #[error("evicted page {idx} was mapped behind ebb's back while it was being brought back")]
    MappedBehindOurBack {
        /// Page index.
        idx: u64,
    },
    /// Waiting for events failed.
    #[error("waiting for userfaultfd events: {0}")]
    Poll(std::io::Error),
    /// A timer of the handler could not be set up.
    #[error("setting up the fault handler: {0}")]
    Setup(std::io::Error),
    /// The handler thread panicked (a bug in ebb), with this message.
    #[error("the fault handler panicked: {0}")]
    Panicked(String),
}
