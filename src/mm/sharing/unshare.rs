//! Copy-on-write breaks, done on a thread of their own (the unsharer) so that the guest page
//! is never empty and unregistered, and never needs the fault handler to wait for itself.
//!
//! A guest write to a Shared page faults to the handler, which claims the page (Shared to
//! Resident, in flight) and hands it here; the writer sleeps until the copy below wakes it.
//! For each page, the unsharer:
//! 1. copies the page's pool page out (volatile: the pool may be shared with other VMs);
//! 2. maps a fresh empty anonymous page at an address the kernel picks and registers it
//!    with the handler's userfaultfd, as guest RAM is registered;
//! 3. moves it over the guest page with `mremap`: with `UFFD_FEATURE_EVENT_REMAP` the move
//!    keeps the registration, and `mremap` returns once the handler has read the remap
//!    event (which is why this cannot run on the handler's own thread);
//! 4. copies the pool page in with `UFFDIO_COPY`, which maps it and wakes the writer;
//! 5. drops the pool reference and ends the claim.
//!
//! So the guest page is registered at every instant: between 3 and 4 it is empty, and an
//! access (the event loop reading a virtqueue, another vCPU) faults to the handler, which
//! defers it while the page is claimed; the copy wakes it. Mapping fresh memory over the
//! page first and registering it afterwards, as ebb once did, let such an access get the
//! kernel's zero page behind ebb's back, and the copy then said EEXIST: the page kept zeros.
//! `EEXIST` here is therefore an error, never a success.
//!
//! The fresh page is registered while still empty, so its mapping merges with the guest
//! RAM around it: a copy-on-write break costs no mapping of its own (a page filled before
//! the move would keep an `anon_vma` of its own, and every break would cost one more of the
//! process's `vm.max_map_count` mappings for good).
//!
//! `EAGAIN` (a remove event pending) and `ENOMEM` are waited out; any other failure ends the
//! VM through the handler ([`Unsharer::failed`]), with the page still claimed so that no
//! fault is served from it.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::pool::SharePool;
use super::sys::{map_anon_page, remap_page_over, unmap_page};
use super::{SharingError, SharingStats};
use crate::mm::claim::Claim;
use crate::mm::pages::PageTable;
use crate::mm::uffd::{Resolved, Uffd};
use crate::mm::zcache::{Page, PAGE_BYTES};
use crate::units::PAGE_SIZE;

/// Breaks queued at most: more than a vCPU per entry ever waits on (each writer has one
/// fault outstanding). A full queue makes the handler retry the fault later.
pub const QUEUE: usize = 256;
/// How long a step is retried while the kernel has no memory (or a remove event keeps an
/// ioctl failing) before the unsharer logs that it waits.
const LOG_WAIT_AFTER: Duration = Duration::from_secs(1);
/// How long the unsharer is given to stop.
const STOP_PATIENCE: Duration = Duration::from_secs(2);

/// A claimed Shared page on its way to a private copy.
struct Break {
    claim: Claim<Arc<PageTable>>,
    hva: u64,
}

/// The unsharer thread and its queue.
#[derive(Debug)]
pub struct Unsharer {
    queue: Mutex<Option<SyncSender<Break>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Written when a break failed for good: the fault handler then stops the VM.
    failed: EventFd,
    failure: Arc<Mutex<Option<SharingError>>>,
}

/// What the unsharer thread needs.
struct Worker {
    pool: Arc<dyn SharePool>,
    stats: Arc<SharingStats>,
    uffd: Arc<Uffd>,
    page: Box<Page>,
}

/// What became of a queued break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// On its way: the writer sleeps until the copy wakes it.
    Yes,
    /// The page is not Shared or another mover holds it, or the queue is full: retry the
    /// fault later.
    Later,
}

impl Unsharer {
    /// Starts the unsharer for the pool `pool` of guest RAM whose faults `uffd` serves.
    ///
    /// # Errors
    /// The eventfd or the thread could not be created.
    pub fn start(
        pool: Arc<dyn SharePool>,
        stats: Arc<SharingStats>,
        uffd: Arc<Uffd>,
    ) -> std::io::Result<Self> {
        let failed = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let failure = Arc::new(Mutex::new(None));
        let (tx, rx) = sync_channel(QUEUE);
        let worker = Worker { pool, stats, uffd, page: Box::new([0; PAGE_BYTES]) };
        let (failed_thread, failure_thread) = (failed.try_clone()?, failure.clone());
        let thread = std::thread::Builder::new()
            .name("ebb-unshare".into())
            .spawn(move || worker.run(&rx, &failed_thread, &failure_thread))?;
        Ok(Self { queue: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), failed, failure })
    }

    /// Claims Shared page `idx` of `table` at `hva` and queues its break. Never blocks and
    /// never allocates (the fault handler calls it, also while memory is short).
    pub fn queue(&self, table: &Arc<PageTable>, idx: u64, hva: u64) -> Queued {
        use crate::mm::pages::{PageState, StateSet};
        let shared = StateSet::of(&[PageState::Shared]);
        let Ok(claim) = Claim::new(Arc::clone(table), idx, shared, PageState::Resident) else {
            return Queued::Later;
        };
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = queue.as_ref() else { return Queued::Later };
        match tx.try_send(Break { claim, hva }) {
            Ok(()) => Queued::Yes,
            // The break is dropped with its claim: the page is Shared again.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Queued::Later,
        }
    }

    /// Readable once a break failed for good.
    pub fn failed_event(&self) -> &EventFd {
        &self.failed
    }

    /// Takes the error a break failed on, if one did.
    pub fn take_failure(&self) -> Option<SharingError> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Stops the unsharer after the breaks queued, while the fault handler still reads
    /// events (a break's `mremap` waits for the handler). If the handler is gone the
    /// unsharer may never return; it is left to end with the process.
    pub fn stop(&self) {
        drop(self.queue.lock().unwrap_or_else(PoisonError::into_inner).take());
        let Some(thread) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        let started = Instant::now();
        while !thread.is_finished() && started.elapsed() < STOP_PATIENCE {
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!("page sharing: the unsharer did not stop; it ends with the process");
        }
    }
}

impl Worker {
    fn run(
        mut self,
        rx: &Receiver<Break>,
        failed: &EventFd,
        failure: &Mutex<Option<SharingError>>,
    ) {
        crate::mm::sys::prefault_stack(crate::mm::sys::THREAD_STACK_RESERVE);
        while let Ok(job) = rx.recv() {
            if let Err(e) = self.unshare(job) {
                *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                let _ = failed.write(1);
                return;
            }
        }
    }

    /// Breaks one page (see the module docs). On an error the page stays claimed.
    fn unshare(&mut self, job: Break) -> Result<(), SharingError> {
        let Break { claim, hva } = job;
        let idx = claim.idx();
        if !self.pool.slot_of(idx).is_some_and(|s| self.pool.read(s, &mut self.page)) {
            std::mem::forget(claim);
            return Err(SharingError::NoPoolPage { idx });
        }
        if let Err(e) = self.fresh_page_over(idx, hva) {
            std::mem::forget(claim);
            return Err(e);
        }
        crate::mm::hooks::UNSHARE_BEFORE_COPY.reach();
        // Counted before the copy, which wakes the writer: it may read the statistics at once.
        self.stats.cow_breaks.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.copy_in(idx, hva) {
            std::mem::forget(claim);
            return Err(e);
        }
        let table = Arc::clone(claim.table());
        self.pool.detach(idx);
        claim.finish();
        table.mark_unshared(idx);
        Ok(())
    }

    /// Steps 2 and 3: an empty registered page over the guest page at `hva`, retried while
    /// the kernel has no memory for it.
    fn fresh_page_over(&self, idx: u64, hva: u64) -> Result<(), SharingError> {
        let wp = self.uffd.has_wp();
        let mut waiting = Wait::new(idx, "memory for its private copy");
        loop {
            let staging = match map_anon_page() {
                Ok(s) => s,
                Err(e) => {
                    waiting.or_fail(SharingError::Map { idx, source: e })?;
                    continue;
                }
            };
            // SAFETY: `staging` is our own fresh page, about to become guest page `idx`.
            let moved = unsafe { self.uffd.register(staging, PAGE_SIZE, wp) }
                .map_err(|source| SharingError::Register { idx, source })
                .and_then(|()| {
                    // SAFETY: `staging` is our own empty page; `hva` is guest page `idx`,
                    // claimed, whose contents are in the pool (and in `self.page`).
                    unsafe { remap_page_over(staging, hva) }
                        .map_err(|source| SharingError::Map { idx, source })
                });
            match moved {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // SAFETY: not moved, and nothing refers into it.
                    unsafe { unmap_page(staging) };
                    waiting.or_fail(e)?;
                }
            }
        }
    }

    /// Step 4: the pool page's copy into the (registered, empty) guest page, retried on
    /// `EAGAIN` and `ENOMEM`.
    fn copy_in(&self, idx: u64, hva: u64) -> Result<(), SharingError> {
        let mut waiting = Wait::new(idx, "its copy to be mapped");
        loop {
            match self.uffd.copy(hva, &self.page[..], false) {
                Ok((Resolved::Mapped, _)) => return Ok(()),
                Ok((Resolved::Retry | Resolved::NoMemory, _)) => {
                    waiting.sleep();
                }
                // Mapped behind ebb's back although registered and claimed: whatever is
                // there is not the page's contents.
                Ok((Resolved::AlreadyMapped, _)) => {
                    return Err(SharingError::MappedBehindOurBack { idx })
                }
                Err(source) => return Err(SharingError::Copy { idx, source }),
            }
        }
    }
}

/// A wait for the kernel, logged once if it lasts.
struct Wait {
    idx: u64,
    what: &'static str,
    since: Instant,
    logged: bool,
}

impl Wait {
    fn new(idx: u64, what: &'static str) -> Self {
        Self { idx, what, since: Instant::now(), logged: false }
    }

    fn sleep(&mut self) {
        if !self.logged && self.since.elapsed() > LOG_WAIT_AFTER {
            log::warn!("page sharing: unsharing page {} waits for {}", self.idx, self.what);
            self.logged = true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }

    /// Waits and returns Ok if `e` is the kernel being short of memory; else `e`.
    fn or_fail(&mut self, e: SharingError) -> Result<(), SharingError> {
        if !e.is_no_memory() {
            return Err(e);
        }
        self.sleep();
        Ok(())
    }
}
