//! The fault-handler thread: reads userfaultfd events and resolves each fault by what the
//! page-state table says of its page. It dispatches; the fault-around window (`around`) and
//! the Active sampler (`active`) decide the details.
//!
//! It never touches guest memory through the mapping itself (its own accesses would fault to
//! itself) and never calls `madvise` on it (see the module docs of `uffd`).
//!
//! # Why no fault waits forever
//!
//! Every fault event ends in exactly one of three ways: its ioctl succeeds, which wakes the
//! faulting thread (`UFFDIO_COPY`/`UFFDIO_ZEROPAGE` map the page; `UFFDIO_WRITEPROTECT`
//! clearing protection and `UFFDIO_WAKE` wake explicitly; on `EEXIST` the handler wakes the
//! page itself); or it is put on the retry list (`EAGAIN`, the page is in flight with a
//! mover, or `ENOMEM`); or the ioctl fails for another reason, which stops the handler. The
//! retry list is retried after every read of events and at least every [`RETRY_POLL_MS`]
//! ([`PRESSURE_POLL_MS`] while memory is short), and an entry leaves it only by succeeding.
//! A handler that stops on an error (or panics) leaves guest RAM registered and the
//! descriptor open: the VMM stops the vCPU first and only then releases guest RAM
//! (`Engine::release_guest_ram`), which wakes every other waiter. Released earlier, the
//! waiting vCPU would be served plain anonymous memory: zeros where an evicted page was.
//!
//! # Memory pressure
//!
//! `ENOMEM` means the kernel had no page for the guest (host memory, or the VM's memory
//! cgroup at its limit with the OOM killer off; with it on, the kernel kills ebb instead).
//! An overcommitting host meets that by design, so the fault waits and is retried: memory
//! may come back (other VMs shrink, the limit is raised). Only after [`HandlerConfig::oom_wait`]
//! without a single page does the handler stop with [`FaultError::OutOfMemory`]. Nothing is
//! logged while memory is short (logging allocates); the wait is counted in the statistics
//! and reported when it ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::around::{FaultAround, Window, MAX_FAULT_AROUND};
use super::swapin::{Read, SwapReaders};
use super::FaultError;
use crate::mm::claim::{Claim, ClaimRun};
use crate::mm::fault::active::{ActiveConfig, ActiveStats, Sampler};
use crate::mm::gate::{AllocGate, MAX_WAIT};
use crate::mm::layout::RamMap;
use crate::mm::pages::{PageState, PageTable, StateSet, FLAG_IN_FLIGHT};
use crate::mm::reclaim::store::Backing;
use crate::mm::sharing::{Queued, SharedPages};
use crate::mm::stats::{elapsed_ns, FaultStats};
use crate::mm::sys::poll_readable;
use crate::mm::uffd::{Event, Resolved, Uffd, READ_BATCH};
use crate::mm::zcache::{Page, PAGE_BYTES};
use crate::units::PAGE_SIZE;

use PageState::*;

/// How long the handler sleeps between retries of faults that could not be resolved yet.
pub const RETRY_POLL_MS: i32 = 1;
/// The same while the kernel refuses pages for lack of memory.
pub const PRESSURE_POLL_MS: i32 = 10;
/// Faults the retry lists hold without growing: more than a vCPU per list entry ever waits
/// on, since each waiting thread has one fault outstanding (duplicates aside).
const RETRY_CAPACITY: usize = 4 * READ_BATCH;
/// Default of [`HandlerConfig::oom_wait`].
pub const DEFAULT_OOM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// States a missing fault resolves from (the page has no host page).
const FAULTABLE: StateSet = StateSet::of(&[Untouched, Ballooned]);
/// States fault-around fills: only pages nobody has used.
const UNTOUCHED: StateSet = StateSet::of(&[Untouched]);
/// States a remove event makes untouched (others belong to movers or have no page).
const MAPPED: StateSet = StateSet::of(&[ZeroMapped, Resident]);

/// How the handler resolves faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerConfig {
    /// Untouched neighbours to map with each faulting page.
    pub fault_around: FaultAround,
    /// Active-memory sampling, if the kernel offers write protection.
    pub active: Option<ActiveConfig>,
    /// How long guest faults may wait for memory the kernel refuses before the VM ends.
    pub oom_wait: std::time::Duration,
}

/// What the handler shares with the rest of the engine.
#[derive(Debug, Clone)]
pub struct EngineCore {
    /// Guest RAM layout.
    pub map: RamMap,
    /// Page states.
    pub table: Arc<PageTable>,
    /// Fault counters.
    pub stats: Arc<FaultStats>,
    /// Active-memory estimate.
    pub active: Arc<ActiveStats>,
    /// Where evicted pages are (None: reclaim is not set up).
    pub backing: Option<Arc<Backing>>,
    /// Shared pages (None: sharing is not set up).
    pub sharing: Option<Arc<SharedPages>>,
    /// Holds new allocations while the VM is over its cap (`mm::gate`).
    pub gate: Arc<AllocGate>,
}

/// Outcome of one attempt at a fault.
enum Step {
    Done,
    Retry,
    NoMemory,
    /// Held by the allocation gate.
    Gated,
    /// Handed to a swap-in reader, whose copy wakes the faulting thread.
    Queued,
}

/// The handler, to be moved onto its own thread and [`run`](FaultHandler::run).
#[derive(Debug)]
pub struct FaultHandler {
    uffd: Arc<Uffd>,
    core: EngineCore,
    window: Window,
    zeros: Vec<u8>,
    /// A page brought back from the stores, on its way into guest memory.
    page: Box<Page>,
    sampler: Option<Sampler>,
    /// Reads from the swap file, off this thread (None: no swap file).
    swapin: Option<SwapReaders>,
    /// When the events being handled were read.
    read_at: Instant,
    /// The vCPU whose fault is being handled (None: not a registered vCPU thread).
    vcpu: Option<usize>,
    events: Vec<Event>,
    /// Faults to retry at the next drain.
    retry: Vec<Event>,
    /// The faults being retried now (swapped with `retry`).
    retrying: Vec<Event>,
    /// Zero pages mapped but not yet write-protected (EAGAIN): their threads sleep.
    pending_protect: Vec<(u64, u64)>,
    oom_wait: std::time::Duration,
    /// Since when the kernel refuses pages (None: it does not).
    short_of_memory: Option<Instant>,
    /// Since when the allocation gate holds faults (None: it does not).
    gated_since: Option<Instant>,
    /// The gate's longest wait ran out in this held period: faults go through until the VM
    /// is under its cap again.
    gate_gave_way: bool,
}

impl FaultHandler {
    /// A handler for RAM already registered on `uffd`.
    ///
    /// # Errors
    /// The sampler's timer could not be created.
    pub fn new(
        uffd: Arc<Uffd>,
        core: EngineCore,
        config: HandlerConfig,
    ) -> Result<Self, FaultError> {
        let window = Window::new(config.fault_around);
        let zero_bytes = (config.fault_around.max().min(MAX_FAULT_AROUND) + 1) * PAGE_SIZE;
        let zeros = vec![0u8; usize::try_from(zero_bytes).unwrap_or(0)];
        let sampler = match config.active {
            Some(active) if uffd.has_wp() => Some(Sampler::new(active).map_err(FaultError::Setup)?),
            Some(_) => {
                log::warn!("userfaultfd write protection unavailable: Active memory is reported as resident");
                None
            }
            None => None,
        };
        // Room for a few batches, so that queueing a retry under memory pressure does not
        // allocate.
        let events = Vec::with_capacity(READ_BATCH);
        let retry = Vec::with_capacity(RETRY_CAPACITY);
        let retrying = Vec::with_capacity(RETRY_CAPACITY);
        let (oom_wait, short_of_memory) = (config.oom_wait, None);
        let swapin = match core.backing.as_ref().filter(|b| b.has_swap()) {
            Some(backing) => Some(
                SwapReaders::start(backing, &core.stats, &uffd, oom_wait)
                    .map_err(FaultError::Setup)?,
            ),
            None => None,
        };
        Ok(Self {
            uffd,
            core,
            window,
            zeros,
            page: Box::new([0; PAGE_BYTES]),
            sampler,
            swapin,
            read_at: Instant::now(),
            vcpu: None,
            events,
            retry,
            retrying,
            pending_protect: Vec::new(),
            oom_wait,
            short_of_memory,
            gated_since: None,
            gate_gave_way: false,
        })
    }

    /// Serves faults until `stop` is signalled or an unrecoverable error occurs.
    ///
    /// # Errors
    /// An ioctl failed for a reason other than a race, or reading events failed.
    pub fn run(mut self, stop: &EventFd) -> Result<(), FaultError> {
        use std::os::fd::AsRawFd;
        self.prefault();
        self.core.stats.set_cpu_clock_of_current_thread();
        let timer_fd = self.sampler.as_ref().map_or(-1, |s| s.timer().as_raw_fd());
        let unshare_failed =
            self.core.sharing.as_ref().map_or(-1, |s| s.failed_event().as_raw_fd());
        let swapin_failed = self.swapin.as_ref().map_or(-1, |r| r.failed_event().as_raw_fd());
        let fds =
            [self.uffd.as_raw_fd(), stop.as_raw_fd(), timer_fd, unshare_failed, swapin_failed];
        loop {
            let idle = self.retry.is_empty() && self.pending_protect.is_empty();
            let pressed = self.short_of_memory.is_some() || self.gated_since.is_some();
            let timeout = match (idle, pressed) {
                (true, _) => -1,
                (false, false) => RETRY_POLL_MS,
                (false, true) => PRESSURE_POLL_MS,
            };
            let [_, stopped, tick, unshare_failed, swapin_failed] =
                poll_readable(fds, timeout).map_err(FaultError::Poll)?;
            if stopped {
                return Ok(());
            }
            if unshare_failed {
                if let Some(e) = self.core.sharing.as_ref().and_then(|s| s.take_failure()) {
                    return Err(FaultError::Sharing(e));
                }
            }
            if swapin_failed {
                if let Some(e) = self.swapin.as_ref().and_then(SwapReaders::take_failure) {
                    return Err(e);
                }
            }
            if tick {
                if let Some(s) = self.sampler.as_mut() {
                    s.tick(&self.uffd, &self.core.map, &self.core.table, &self.core.active)?;
                }
            }
            self.drain()?;
        }
    }

    /// Makes resident now the memory the handler uses as it serves faults: its stack, its
    /// event and retry lists, the zeroed source of `UFFDIO_COPY`. A handler that needs a new
    /// page of its own while the VM's memory cgroup is at its limit would wait in the kernel
    /// with the guest, instead of retrying the guest's faults.
    fn prefault(&mut self) {
        crate::mm::sys::prefault_stack(crate::mm::sys::THREAD_STACK_RESERVE);
        let filler = Event::Other(0);
        self.events.resize(self.events.capacity(), filler);
        self.events.clear();
        for list in [&mut self.retry, &mut self.retrying] {
            list.resize(list.capacity(), filler);
            list.clear();
        }
        // Written, not read: a read would map the shared zero page, and the kernel reading
        // it for UFFDIO_COPY is no different; a write makes the pages private and resident.
        for chunk in self.zeros.chunks_mut(to_usize(PAGE_SIZE)) {
            if let Some(b) = chunk.first_mut() {
                // SAFETY: a volatile write of the value the byte already holds.
                unsafe { std::ptr::write_volatile(b, 0) };
            }
        }
    }

    /// Reads and handles pending events, then retries the faults waiting for a retry.
    ///
    /// A read that returns fewer messages than fit means the queue was empty: back to poll
    /// rather than spend a syscall on a read that would say EAGAIN.
    fn drain(&mut self) -> Result<(), FaultError> {
        loop {
            self.events.clear();
            // TEST-ONLY: debug builds fail here when the tests ask for it (see `inject`).
            #[cfg(debug_assertions)]
            super::inject::before_read()?;
            let n = self.uffd.read_events(&mut self.events)?;
            if n == 0 {
                break;
            }
            let read_at = Instant::now();
            let events = std::mem::take(&mut self.events);
            // Removes before faults. A remove read in this batch may already be done (its
            // `madvise` went on once the event was read), and a fault in the same batch may
            // be a first touch after it: resolving that fault first and then applying the
            // stale remove would mark a freshly mapped page Untouched. The kernel hands out
            // pending faults before events, so a batch's order says nothing of which came
            // first. Applied first, a remove finds its pages still claimed by their mover
            // (mm's releases) or already in the mover's final state, and changes nothing.
            let is_remove = |e: &&Event| matches!(e, Event::Remove { .. });
            for ev in events.iter().filter(is_remove).chain(events.iter().filter(|e| !is_remove(e)))
            {
                self.handle(*ev, read_at)?;
            }
            self.events = events;
            if n < READ_BATCH {
                break;
            }
        }
        // Removes that made the ioctls say EAGAIN have now been read: retry once per drain.
        // The two lists swap rather than move, so that both keep their capacity and a retry
        // under memory pressure allocates nothing.
        std::mem::swap(&mut self.retry, &mut self.retrying);
        let now = Instant::now();
        for i in 0..self.retrying.len() {
            let ev = self.retrying[i];
            self.handle(ev, now)?;
        }
        self.retrying.clear();
        for (addr, len) in std::mem::take(&mut self.pending_protect) {
            self.protect_and_wake(addr, len)?;
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event, read_at: Instant) -> Result<(), FaultError> {
        match ev {
            Event::Fault { addr, write, wp, tid } => {
                self.window.set_thread(tid);
                self.read_at = read_at;
                self.vcpu = self.core.stats.vcpus.index_of(tid);
                match self.fault(addr & !(PAGE_SIZE - 1), write, wp)? {
                    Step::Done => {
                        let waited = elapsed_ns(read_at);
                        self.core.stats.latency.record(waited);
                        if let Some(vcpu) = self.vcpu {
                            self.core.stats.vcpus.record(vcpu, waited);
                        }
                        self.memory_is_back();
                    }
                    Step::Retry => {
                        self.core.stats.retries.fetch_add(1, Ordering::Relaxed);
                        self.retry.push(ev);
                    }
                    Step::Queued => {}
                    Step::Gated => {
                        self.core.gate.waits.fetch_add(1, Ordering::Relaxed);
                        self.retry.push(ev);
                    }
                    Step::NoMemory => {
                        self.core.stats.no_memory.fetch_add(1, Ordering::Relaxed);
                        self.retry.push(ev);
                        let since = *self.short_of_memory.get_or_insert_with(Instant::now);
                        if since.elapsed() > self.oom_wait {
                            return Err(FaultError::OutOfMemory { waited: since.elapsed() });
                        }
                    }
                }
            }
            Event::Remove { start, end } => self.remove(start, end),
            Event::Other(kind) => log::debug!("ignoring userfaultfd event {kind:#x}"),
        }
        Ok(())
    }

    /// True if the allocation gate holds a new page back now. A hold lasts at most
    /// [`MAX_WAIT`] from the first held fault; then faults go through until the VM is back
    /// under its cap.
    fn gate_holds(&mut self) -> bool {
        let resident = self.core.table.count(Resident);
        if !self.core.gate.holds(resident) {
            self.gated_since = None;
            self.gate_gave_way = false;
            return false;
        }
        let since = *self.gated_since.get_or_insert_with(Instant::now);
        if since.elapsed() < MAX_WAIT {
            return true;
        }
        if !std::mem::replace(&mut self.gate_gave_way, true) {
            self.core.gate.timeouts.fetch_add(1, Ordering::Relaxed); // once per held period
        }
        false
    }

    /// Ends a period of memory pressure, if one was going on.
    fn memory_is_back(&mut self) {
        if let Some(since) = self.short_of_memory.take() {
            log::warn!("guest faults waited {:?} for memory the kernel refused", since.elapsed());
        }
    }

    fn fault(&mut self, page: u64, write: bool, wp: bool) -> Result<Step, FaultError> {
        let Some(idx) = self.core.map.idx_of_hva(page) else {
            // Only registered ranges fault to us, so this cannot happen; wake the thread
            // rather than leave it waiting.
            log::warn!("fault at {page:#x} outside guest RAM");
            return Ok(retry_unless_done(self.uffd.wake(page, PAGE_SIZE)?));
        };
        if wp {
            return self.write_protect_fault(page, idx);
        }
        self.fill(page, idx, write)
    }

    /// A write to a write-protected page: a zero page's first write (now Resident: the
    /// kernel gives the writer a private copy), or a page in the Active sample (note the
    /// write). Lifting the protection wakes the writer. A page being evicted stays
    /// protected until its mover is done.
    fn write_protect_fault(&mut self, page: u64, idx: u64) -> Result<Step, FaultError> {
        let table = &self.core.table;
        if table.flags(idx) & FLAG_IN_FLIGHT != 0 {
            return Ok(Step::Retry);
        }
        match table.get(idx) {
            Some(Shared) => return self.unshare(page, idx),
            // The zero page's first write takes a host page: a new allocation.
            Some(ZeroMapped) if self.gate_holds() => return Ok(Step::Gated),
            _ => {}
        }
        let table = &self.core.table;
        if table.transition(idx, StateSet::of(&[ZeroMapped]), Resident).is_err() {
            table.clear_sampled(idx);
        }
        let step = retry_unless_done(self.uffd.write_protect(page, PAGE_SIZE, false)?);
        if matches!(step, Step::Done) {
            self.core.stats.wp.fetch_add(1, Ordering::Relaxed);
        }
        Ok(step)
    }

    /// The first write to a shared page: it gets a private copy (`mm::sharing`).
    fn unshare(&mut self, page: u64, idx: u64) -> Result<Step, FaultError> {
        let Some(sharing) = self.core.sharing.clone() else {
            return Err(FaultError::Unrestorable { idx, state: Shared });
        };
        match sharing.unshare(&self.core.table, idx, page) {
            // The unsharer's copy wakes the writer.
            Queued::Yes => Ok(Step::Done),
            Queued::Later => Ok(Step::Retry),
        }
    }

    /// A missing page: map a private zeroed page (`write`) or the zero page, plus untouched
    /// neighbours as the fault-around window says.
    ///
    /// The pages are claimed (in flight, their state already the destination) before the
    /// ioctl, because the ioctl wakes the faulting thread, which may read the stats at once;
    /// the claims end once the ioctl has mapped them, and what it did not map goes back.
    /// Until then no mover takes them: a page the table calls Resident and that is not in
    /// flight is mapped, which the sharing scanner relies on when it reads one (a neighbour
    /// marked Resident before its copy, then claimed and read by the scanner while the copy
    /// failed, made the scanner wait on a fault the handler deferred for ever).
    fn fill(&mut self, page: u64, idx: u64, write: bool) -> Result<Step, FaultError> {
        let table = Arc::clone(&self.core.table);
        if table.flags(idx) & FLAG_IN_FLIGHT != 0 {
            return Ok(Step::Retry); // a mover holds it: look again once it is done
        }
        let target = if write { Resident } else { ZeroMapped };
        let run = match table.get(idx) {
            Some(Untouched | Ballooned) if write && self.gate_holds() => return Ok(Step::Gated),
            Some(Untouched | Ballooned) => {
                let extra = self.neighbours(idx, target);
                match ClaimRun::new(&table, idx, FAULTABLE, extra, UNTOUCHED, target) {
                    Ok(run) => Some(run),
                    Err(_) => return Ok(Step::Retry), // it changed under us: look again
                }
            }
            // A duplicate event for a page resolved meanwhile: the ioctl says EEXIST and
            // the waiter is woken below.
            Some(Resident | ZeroMapped) | None => None,
            Some(state @ (Compressed | Swapped)) => return self.restore(page, idx, state),
            // A fault that waited while the page was being shared: its pool page is mapped
            // now, and the woken thread finds it (or write-faults to unshare it).
            Some(Shared) => return Ok(retry_unless_done(self.uffd.wake(page, PAGE_SIZE)?)),
        };
        let mut run = run;
        let mut pages = run.as_ref().map_or(1, ClaimRun::len);
        self.count_fill(pages, write, true);
        crate::mm::hooks::FILL_BEFORE_MAP.reach();
        // Zero pages are mapped without waking the faulting thread, then write-protected,
        // then the thread is woken: its first write then faults to us and the page is counted
        // Resident. Woken at once, it could write first and get a private copy the table
        // would never see.
        let protect_zero = !write && self.uffd.has_wp();
        let mut result = self.map_fresh(page, pages, write, protect_zero);
        if pages > 1 && result.as_ref().is_err_and(|e| e.crosses_mapping()) {
            // The window reached into the next mapping: the faulting page alone, then.
            if let Some(run) = run.as_mut() {
                run.truncate(1);
            }
            self.uncount_fill(1, pages, write);
            pages = 1;
            result = self.map_fresh(page, pages, write, protect_zero);
        }
        // On an error the run is dropped, which puts every page back.
        let (resolved, done) = result.inspect_err(|_| self.count_fill(pages, write, false))?;
        let mapped = (done / PAGE_SIZE).min(pages);
        // EEXIST on the faulting page itself: it is mapped, whatever the table said.
        let kept = if resolved == Resolved::AlreadyMapped && mapped == 0 { 1 } else { mapped };
        if let Some(run) = run {
            run.finish_first(kept);
            self.uncount_fill(kept, pages, write);
        } else {
            self.uncount_fill(0, pages, write);
        }
        if mapped > 0 {
            self.window.filled(idx, mapped);
            if protect_zero {
                self.protect_and_wake(page, mapped * PAGE_SIZE)?;
            }
            if write {
                // Mapped although the table said ZeroMapped (a duplicate): the zero page was
                // dropped behind our back, and the page is private now.
                let _ = table.transition(idx, StateSet::of(&[ZeroMapped]), Resident);
            }
        }
        match resolved {
            Resolved::Mapped => Ok(Step::Done),
            Resolved::Retry | Resolved::AlreadyMapped if mapped > 0 => Ok(Step::Done),
            Resolved::Retry => Ok(Step::Retry),
            Resolved::NoMemory => Ok(Step::NoMemory),
            Resolved::AlreadyMapped => {
                // Mapped behind our back (a duplicate event). The kernel does not wake on
                // EEXIST, so wake the waiters ourselves.
                self.core.stats.already_mapped.fetch_add(1, Ordering::Relaxed);
                Ok(retry_unless_done(self.uffd.wake(page, PAGE_SIZE)?))
            }
        }
    }

    /// Maps `pages` fresh pages from `page` on: zeroed private pages for a write, the zero
    /// page for a read (waking the faulting thread unless `protect_zero`).
    fn map_fresh(
        &self,
        page: u64,
        pages: u64,
        write: bool,
        protect_zero: bool,
    ) -> Result<(Resolved, u64), crate::mm::uffd::UffdError> {
        let len = pages * PAGE_SIZE;
        match write {
            true => self.uffd.copy(page, self.zeros.get(..to_usize(len)).unwrap_or(&[]), false),
            false => self.uffd.zeropage(page, len, !protect_zero),
        }
    }

    /// Write-protects freshly mapped zero pages, then wakes the threads waiting on them; on
    /// EAGAIN both are retried at the next drain (the threads sleep until then).
    fn protect_and_wake(&mut self, addr: u64, len: u64) -> Result<(), FaultError> {
        match self.uffd.write_protect(addr, len, true)? {
            Resolved::Mapped | Resolved::AlreadyMapped => {
                if self.uffd.wake(addr, len)? == Resolved::Retry {
                    self.pending_protect.push((addr, len));
                }
            }
            Resolved::Retry | Resolved::NoMemory => self.pending_protect.push((addr, len)),
        }
        Ok(())
    }

    /// Brings an evicted page back: claims it (so that no mover writes its copy back to
    /// swap meanwhile), reads its copy from the stores, maps it, frees the copy. The claim
    /// moves the page to Resident before the ioctl, as in [`fill`](Self::fill), and is
    /// undone if the ioctl did not map.
    fn restore(&mut self, page: u64, idx: u64, state: PageState) -> Result<Step, FaultError> {
        let started = Instant::now();
        let Some(backing) = self.core.backing.clone() else {
            return Err(FaultError::Unrestorable { idx, state });
        };
        let table = Arc::clone(&self.core.table);
        if state == Swapped {
            if let Some(readers) = &self.swapin {
                // A disk read: off this thread, so that no other fault waits behind it.
                let swapped = StateSet::of(&[Swapped]);
                let Ok(claim) = Claim::new(Arc::clone(&table), idx, swapped, Resident) else {
                    return Ok(Step::Retry); // a mover took it meanwhile
                };
                let read = Read { claim, hva: page, read_at: self.read_at, vcpu: self.vcpu };
                // A full queue gives the read back; dropped, its claim puts the page back.
                return Ok(if readers.queue(read).is_ok() { Step::Queued } else { Step::Retry });
            }
        }
        // Dropped on every early return: the page goes back to its stored state.
        let Ok(claim) = Claim::new(&*table, idx, StateSet::of(&[state]), Resident) else {
            return Ok(Step::Retry); // a mover took it meanwhile (written back to swap)
        };
        // A copy that cannot be read is lost: the VM ends rather than see zeros there.
        let loc = match backing.load(idx, &mut self.page) {
            Ok(loc) => loc,
            // The kernel had no memory to read the copy (a page cache page): nothing is lost,
            // and the fault waits and is retried as for any ENOMEM (see the module docs).
            Err(e) if e.is_no_memory() => return Ok(Step::NoMemory),
            Err(e) => return Err(FaultError::Restore(e)),
        };
        self.core.stats.copy.fetch_add(1, Ordering::Relaxed);
        let step = match self.uffd.copy(page, &self.page[..], false) {
            Ok((Resolved::Mapped, _)) => {
                backing.free(idx, loc);
                table.mark_referenced(idx);
                claim.finish();
                let (count, hist) = match state {
                    Swapped => (&backing.stats.swapins_swap, &backing.stats.swapin_swap_ns),
                    _ => (&backing.stats.swapins_cache, &backing.stats.swapin_cache_ns),
                };
                count.fetch_add(1, Ordering::Relaxed);
                hist.record(elapsed_ns(started));
                return Ok(Step::Done);
            }
            Ok((Resolved::NoMemory, _)) => Ok(Step::NoMemory),
            Ok((Resolved::Retry, _)) => Ok(Step::Retry),
            // The page was evicted and is claimed: whatever is mapped there now is not its
            // contents. Retrying would loop for ever; going on would run on wrong bytes.
            Ok((Resolved::AlreadyMapped, _)) => Err(FaultError::MappedBehindOurBack { idx }),
            Err(e) => Err(e.into()),
        };
        // Not mapped: the copy stays, and the claim, dropped, puts the page's state back.
        self.core.stats.copy.fetch_sub(1, Ordering::Relaxed);
        step
    }

    /// How many untouched neighbours after `idx` to claim with it, as the window allows.
    fn neighbours(&mut self, idx: u64, target: PageState) -> u64 {
        // Under an allocation cap, a fault maps its own page only.
        if target == Resident && self.core.gate.cap_bytes().is_some() {
            return 0;
        }
        let room = self.core.map.pages_left_in_region(idx).saturating_sub(1);
        self.window.neighbours(idx).min(room)
    }

    /// Counts a fill of `pages` pages (the faulting one and its neighbours) before its
    /// ioctl, or takes the count back (`add` false) after one that failed outright.
    fn count_fill(&self, pages: u64, write: bool, add: bool) {
        let stats = &self.core.stats;
        let counter = if write { &stats.copy } else { &stats.zero };
        let op = |c: &std::sync::atomic::AtomicU64, n| {
            if add {
                c.fetch_add(n, Ordering::Relaxed)
            } else {
                c.fetch_sub(n, Ordering::Relaxed)
            }
        };
        op(counter, 1);
        op(&stats.around_pages, pages - 1);
    }

    /// Takes back the counts of a fill's pages `kept .. planned`, which its ioctl did not
    /// map (the fault itself too if nothing was kept).
    fn uncount_fill(&self, kept: u64, planned: u64, write: bool) {
        let stats = &self.core.stats;
        let neighbours_unmapped = (planned - 1) - kept.saturating_sub(1).min(planned - 1);
        stats.around_pages.fetch_sub(neighbours_unmapped, Ordering::Relaxed);
        if kept == 0 {
            let counter = if write { &stats.copy } else { &stats.zero };
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// `madvise` removed `[start, end)`. Pages in flight belong to the mover that released
    /// them, which sets their state; any other mapped page (an `madvise` from outside `mm`)
    /// is untouched again.
    fn remove(&mut self, start: u64, end: u64) {
        let (table, stats) = (&self.core.table, &self.core.stats);
        stats.removes.fetch_add(1, Ordering::Relaxed);
        let mut addr = start & !(PAGE_SIZE - 1);
        while addr < end {
            if let Some(idx) = self.core.map.idx_of_hva(addr) {
                if table.flags(idx) & FLAG_IN_FLIGHT == 0 {
                    table.clear_sampled(idx);
                    let _ = table.transition(idx, MAPPED, Untouched);
                }
                stats.removed_pages.fetch_add(1, Ordering::Relaxed);
            }
            addr += PAGE_SIZE;
        }
    }
}

fn retry_unless_done(r: Resolved) -> Step {
    match r {
        Resolved::Retry => Step::Retry,
        Resolved::NoMemory => Step::NoMemory,
        Resolved::Mapped | Resolved::AlreadyMapped => Step::Done,
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
