//! Swap-file reads off the fault handler's thread: a fault on a Swapped page is claimed by
//! the handler (Swapped to Resident, in flight) and handed to a reader thread, which reads
//! the page's copy from the swap file, checks it, maps it with `UFFDIO_COPY` (which wakes the
//! faulting thread) and frees the copy. The handler goes on serving every other fault
//! meanwhile, so a slow disk delays only the vCPUs that need a page from it: a vCPU's first
//! touch, or its swap-in from the compression cache, never waits behind another vCPU's disk
//! read. [`READERS`] threads read at once.
//!
//! The reader is the only thread that touches a queued page until its claim ends: another
//! fault on it finds it in flight and is retried by the handler until the page is mapped.
//! `EAGAIN` (a remove event pending, which the handler reads) is retried; `ENOMEM` too, for
//! at most the handler's `oom_wait`. A copy that cannot be read, or a page found mapped
//! behind ebb's back, ends the VM through the handler ([`SwapReaders::failed_event`]), with
//! the page still claimed, so that no fault is served from it.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::FaultError;
use crate::mm::claim::Claim;
use crate::mm::pages::PageTable;
use crate::mm::reclaim::store::Backing;
use crate::mm::stats::{elapsed_ns, FaultStats};
use crate::mm::uffd::{Resolved, Uffd};
use crate::mm::zcache::{Page, PAGE_BYTES};

/// Reader threads: as many swap-file reads in flight at once.
pub const READERS: usize = 4;
/// Reads queued at most: more than a vCPU per entry ever waits on (each faulting thread
/// has one fault outstanding). A full queue makes the handler retry the fault later.
pub const QUEUE: usize = 256;
/// Pause between tries while the kernel has no memory or a remove event is pending.
const RETRY_PAUSE: Duration = Duration::from_micros(200);
/// How long the readers are given to stop.
const STOP_PATIENCE: Duration = Duration::from_secs(2);

/// A claimed Swapped page on its way back.
pub struct Read {
    /// The page's claim (Swapped to Resident).
    pub claim: Claim<Arc<PageTable>>,
    /// Its address in guest RAM.
    pub hva: u64,
    /// When the handler read the fault (for the fault latency).
    pub read_at: Instant,
    /// The faulting vCPU, if a registered vCPU thread faulted.
    pub vcpu: Option<usize>,
}

/// The reader threads and their queue.
#[derive(Debug)]
pub struct SwapReaders {
    queue: Option<SyncSender<Read>>,
    threads: Vec<JoinHandle<()>>,
    failed: EventFd,
    failure: Arc<Mutex<Option<FaultError>>>,
}

/// What a reader thread needs.
struct Reader {
    backing: Arc<Backing>,
    stats: Arc<FaultStats>,
    uffd: Arc<Uffd>,
    oom_wait: Duration,
    page: Box<Page>,
}

impl SwapReaders {
    /// Starts [`READERS`] threads that bring pages back from `backing`'s swap file into guest
    /// RAM served by `uffd`.
    ///
    /// # Errors
    /// The eventfd or a thread could not be created.
    pub fn start(
        backing: &Arc<Backing>,
        stats: &Arc<FaultStats>,
        uffd: &Arc<Uffd>,
        oom_wait: Duration,
    ) -> std::io::Result<Self> {
        let failed = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let failure = Arc::new(Mutex::new(None));
        let (tx, rx) = sync_channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(READERS);
        for n in 0..READERS {
            let reader = Reader {
                backing: backing.clone(),
                stats: stats.clone(),
                uffd: uffd.clone(),
                oom_wait,
                page: Box::new([0; PAGE_BYTES]),
            };
            let (rx, failed, failure) = (rx.clone(), failed.try_clone()?, failure.clone());
            let thread = std::thread::Builder::new()
                .name(format!("ebb-swapin{n}"))
                .spawn(move || reader.run(&rx, &failed, &failure))?;
            threads.push(thread);
        }
        Ok(Self { queue: Some(tx), threads, failed, failure })
    }

    /// Queues a read; gives it back if the queue is full (the handler retries the fault
    /// later). Never blocks and never allocates.
    pub fn queue(&self, read: Read) -> Result<(), Read> {
        let Some(tx) = self.queue.as_ref() else { return Err(read) };
        match tx.try_send(read) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) => Err(r),
        }
    }

    /// Readable once a read failed for good.
    pub fn failed_event(&self) -> &EventFd {
        &self.failed
    }

    /// Takes the error a read failed on, if one did.
    pub fn take_failure(&self) -> Option<FaultError> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl Drop for SwapReaders {
    /// Stops the readers after the reads queued. A reader still waiting on the kernel after
    /// `STOP_PATIENCE` is left to end with the process.
    fn drop(&mut self) {
        drop(self.queue.take());
        let started = Instant::now();
        while self.threads.iter().any(|t| !t.is_finished()) && started.elapsed() < STOP_PATIENCE {
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("a swap-in reader did not stop; it ends with the process");
            }
        }
    }
}

impl Reader {
    fn run(
        mut self,
        rx: &Mutex<Receiver<Read>>,
        failed: &EventFd,
        failure: &Mutex<Option<FaultError>>,
    ) {
        crate::mm::sys::prefault_stack(crate::mm::sys::THREAD_STACK_RESERVE);
        loop {
            // The lock is held only while waiting for the next read, never while reading.
            let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
            let Ok(read) = next else { return };
            if let Err(e) = self.bring_back(read) {
                *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                let _ = failed.write(1);
                return;
            }
        }
    }

    /// Reads the page's copy and maps it (see the module docs). On an error the page stays
    /// claimed.
    fn bring_back(&mut self, read: Read) -> Result<(), FaultError> {
        let Read { claim, hva, read_at, vcpu } = read;
        let idx = claim.idx();
        crate::mm::hooks::SWAPIN_BEFORE_READ.reach();
        let mut short = None;
        let loc = loop {
            match self.backing.load(idx, &mut self.page) {
                Ok(loc) => break loc,
                Err(e) if e.is_no_memory() => self.wait_for_memory(&mut short)?,
                Err(e) => {
                    std::mem::forget(claim);
                    return Err(FaultError::Restore(e));
                }
            }
        };
        // Counted before the copy, which wakes the faulting thread: it may read the
        // statistics at once.
        self.stats.copy.fetch_add(1, Ordering::Relaxed);
        loop {
            match self.uffd.copy(hva, &self.page[..], false) {
                Ok((Resolved::Mapped, _)) => break,
                Ok((Resolved::Retry, _)) => std::thread::sleep(RETRY_PAUSE),
                Ok((Resolved::NoMemory, _)) => self.wait_for_memory(&mut short)?,
                // Claimed and evicted, yet mapped: whatever is there is not its contents.
                Ok((Resolved::AlreadyMapped, _)) => {
                    std::mem::forget(claim);
                    return Err(FaultError::MappedBehindOurBack { idx });
                }
                Err(e) => {
                    std::mem::forget(claim);
                    return Err(e.into());
                }
            }
        }
        self.backing.free(idx, loc);
        claim.table().mark_referenced(idx);
        claim.finish();
        let stats = &self.backing.stats;
        stats.swapins_swap.fetch_add(1, Ordering::Relaxed);
        let waited = elapsed_ns(read_at);
        stats.swapin_swap_ns.record(waited);
        self.stats.latency.record(waited);
        if let Some(vcpu) = vcpu {
            self.stats.vcpus.record(vcpu, waited);
        }
        Ok(())
    }

    /// One more pause while the kernel has no memory for the page; the error once that has
    /// lasted longer than `oom_wait`.
    fn wait_for_memory(&self, since: &mut Option<Instant>) -> Result<(), FaultError> {
        let since = *since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.oom_wait {
            return Err(FaultError::OutOfMemory { waited: since.elapsed() });
        }
        std::thread::sleep(RETRY_PAUSE);
        Ok(())
    }
}
