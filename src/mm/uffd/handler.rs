//! The fault-handler thread: reads userfaultfd events and decides what backs each page.
//!
//! It is the only thread that resolves faults and the only writer of most page-state
//! transitions. It never touches guest memory through the mapping itself (its own accesses
//! would fault to itself) and never calls `madvise` on it (see the module docs of `uffd`).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{Event, Resolved, Uffd, UffdError};
use crate::mm::active::{ActiveConfig, ActiveEstimator, ActiveStats, SampleRng};
use crate::mm::layout::{RamMap, PAGE};
use crate::mm::state::{PageState, PageTable, FLAG_SAMPLED};
use crate::mm::stats::FaultStats;

/// Most neighbours fault-around may fill in one call.
pub const MAX_FAULT_AROUND: u64 = 255;

/// How the handler resolves faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerConfig {
    /// Untouched pages after the faulting one to fill in the same call (0..=255).
    pub fault_around: u64,
    /// Active-memory sampling, if the kernel offers write protection.
    pub active: Option<ActiveConfig>,
}

/// What the handler shares with the rest of ebb.
#[derive(Clone)]
pub struct Shared {
    /// Guest RAM layout.
    pub map: RamMap,
    /// Page states.
    pub table: Arc<PageTable>,
    /// Fault counters.
    pub stats: Arc<FaultStats>,
    /// Active-memory estimate.
    pub active: Arc<ActiveStats>,
}

/// Outcome of one attempt at a fault.
enum Step {
    Done,
    Retry,
}

struct Sampler {
    config: ActiveConfig,
    timer: TimerFd,
    estimator: ActiveEstimator,
    current: Vec<u64>,
    rng: SampleRng,
}

/// The handler, to be moved onto its own thread and [`run`](FaultHandler::run).
pub struct FaultHandler {
    uffd: Uffd,
    shared: Shared,
    fault_around: u64,
    zeros: Vec<u8>,
    sampler: Option<Sampler>,
    events: Vec<Event>,
    retry: Vec<Event>,
}

impl FaultHandler {
    /// A handler for RAM already registered on `uffd`.
    pub fn new(uffd: Uffd, shared: Shared, config: HandlerConfig) -> Result<Self, UffdError> {
        let fault_around = config.fault_around.min(MAX_FAULT_AROUND);
        let zeros = vec![0u8; usize::try_from((fault_around + 1) * PAGE).unwrap_or(0)];
        let sampler = match config.active {
            Some(active) if uffd.has_wp() => {
                let mut timer = TimerFd::new().map_err(|e| UffdError::Read(e.into()))?;
                timer
                    .reset(active.interval, Some(active.interval))
                    .map_err(|e| UffdError::Read(e.into()))?;
                Some(Sampler {
                    config: active,
                    timer,
                    estimator: ActiveEstimator::default(),
                    current: Vec::new(),
                    rng: SampleRng::new(),
                })
            }
            Some(_) => {
                log::warn!("userfaultfd write protection unavailable: Active memory is reported as resident");
                None
            }
            None => None,
        };
        Ok(Self {
            uffd,
            shared,
            fault_around,
            zeros,
            sampler,
            events: Vec::new(),
            retry: Vec::new(),
        })
    }

    /// Serves faults until `stop` is signalled or an unrecoverable error occurs.
    pub fn run(mut self, stop: &EventFd) -> Result<(), UffdError> {
        self.shared.stats.set_cpu_clock_of_current_thread();
        let timer_fd = self.sampler.as_ref().map_or(-1, |s| s.timer.as_raw_fd());
        let mut fds = [
            libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: timer_fd, events: libc::POLLIN, revents: 0 },
        ];
        loop {
            // With faults waiting for a retry, poll briefly instead of sleeping.
            let timeout = if self.retry.is_empty() { -1 } else { 1 };
            // SAFETY: fds is a live array of pollfd; a negative fd is ignored by poll.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(UffdError::Read(std::io::Error::last_os_error()));
            }
            if fds[1].revents != 0 {
                break;
            }
            if fds[2].revents != 0 {
                self.sample_tick()?;
            }
            self.drain()?;
        }
        Ok(())
    }

    /// Reads and handles pending events, then retries faults that hit EAGAIN.
    ///
    /// A read that returns fewer messages than fit means the queue was empty: back to poll
    /// rather than spend a syscall on a read that would say EAGAIN.
    fn drain(&mut self) -> Result<(), UffdError> {
        loop {
            self.events.clear();
            let n = self.uffd.read_events(&mut self.events)?;
            if n == 0 {
                break;
            }
            let read_at = Instant::now();
            let events = std::mem::take(&mut self.events);
            for ev in &events {
                self.handle(*ev, read_at)?;
            }
            self.events = events;
            if n < super::READ_BATCH {
                break;
            }
        }
        // Removals that caused EAGAIN have now been read: retry once per drain.
        let retry = std::mem::take(&mut self.retry);
        let now = Instant::now();
        for ev in retry {
            self.handle(ev, now)?;
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event, read_at: Instant) -> Result<(), UffdError> {
        match ev {
            Event::Fault { addr, write, wp } => {
                let step = self.fault(addr & !(PAGE - 1), write, wp)?;
                match step {
                    Step::Done => self.shared.stats.latency.record(elapsed_ns(read_at)),
                    Step::Retry => {
                        self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                        self.retry.push(ev);
                    }
                }
            }
            Event::Remove { start, end } => self.remove(start, end),
            Event::Other(kind) => log::debug!("ignoring userfaultfd event {kind:#x}"),
        }
        Ok(())
    }

    fn fault(&mut self, page: u64, write: bool, wp: bool) -> Result<Step, UffdError> {
        let Some(pfn) = self.shared.map.pfn_of(page) else {
            // Only registered ranges fault to us; wake the thread so it sees SIGBUS-free
            // progress or a fresh fault rather than hanging.
            log::warn!("fault at {page:#x} outside guest RAM");
            self.uffd.wake(page, PAGE)?;
            return Ok(Step::Done);
        };
        if wp {
            return self.write_protect_fault(page, pfn);
        }
        // A missing fault means no PTE, whatever the table says: a page the table calls
        // Resident may have been zapped by a `madvise` whose remove event was read in the
        // same batch, before this fault. So always fill; if the page does exist (a
        // duplicate event for a page resolved meanwhile), the kernel says EEXIST and the
        // waiters are woken below.
        self.fill(page, pfn, write)
    }

    /// A write to a page write-protected by the Active sampler: note it, lift the protection
    /// (which wakes the writer).
    fn write_protect_fault(&mut self, page: u64, pfn: u64) -> Result<Step, UffdError> {
        self.shared.table.set_flags(pfn, FLAG_SAMPLED, false);
        self.uffd.write_protect(page, PAGE, false)?;
        self.shared.stats.wp.fetch_add(1, Ordering::Relaxed);
        Ok(Step::Done)
    }

    /// Untouched pages from `pfn` on, up to 1 + fault_around, within one region.
    fn run_length(&self, pfn: u64) -> u64 {
        let limit = (self.fault_around + 1).min(self.shared.map.pages_left_in_region(pfn));
        let untouched = |p| self.shared.table.get(p) == Some(PageState::Untouched);
        1 + (1..limit).take_while(|&i| untouched(pfn + i)).count() as u64
    }

    /// Maps a private zeroed page (`write`) or the zero page, plus untouched neighbours.
    ///
    /// The table and counters are updated before the ioctl, because the ioctl wakes the
    /// faulting thread, which may read the stats at once; what the ioctl did not map is
    /// rolled back after it.
    fn fill(&mut self, page: u64, pfn: u64, write: bool) -> Result<Step, UffdError> {
        let pages = self.run_length(pfn);
        let new_state = if write { PageState::Resident } else { PageState::ZeroMapped };
        let first_was = self.shared.table.set(pfn, new_state).unwrap_or(PageState::Untouched);
        for i in 1..pages {
            self.shared.table.set(pfn + i, new_state);
        }
        let stats = &self.shared.stats;
        let counter = if write { &stats.copy } else { &stats.zero };
        counter.fetch_add(1, Ordering::Relaxed);
        stats.around_pages.fetch_add(pages - 1, Ordering::Relaxed);
        let result = if write {
            self.uffd.copy(page, self.zeros.as_ptr(), pages * PAGE, false)
        } else {
            self.uffd.zeropage(page, pages * PAGE)
        };
        let (resolved, done_bytes) = match result {
            Ok(r) => r,
            Err(e) => {
                self.roll_back(pfn, 0, pages, first_was, write);
                return Err(e);
            }
        };
        let mapped = (done_bytes / PAGE).min(pages);
        if mapped < pages {
            self.roll_back(pfn, mapped, pages, first_was, write);
        }
        match resolved {
            Resolved::Mapped => Ok(Step::Done),
            Resolved::Retry | Resolved::AlreadyMapped if mapped > 0 => Ok(Step::Done),
            Resolved::Retry => Ok(Step::Retry),
            Resolved::AlreadyMapped => {
                // Mapped behind our back (a racing duplicate event). The kernel does not wake
                // on EEXIST, so wake the waiters ourselves.
                self.shared.stats.already_mapped.fetch_add(1, Ordering::Relaxed);
                self.uffd.wake(page, PAGE)?;
                Ok(Step::Done)
            }
        }
    }

    /// Undoes the optimistic updates of [`fill`](Self::fill) for pages `mapped..planned`.
    fn roll_back(&self, pfn: u64, mapped: u64, planned: u64, first_was: PageState, write: bool) {
        for i in mapped..planned {
            let back = if i == 0 { first_was } else { PageState::Untouched };
            self.shared.table.set(pfn + i, back);
        }
        let stats = &self.shared.stats;
        stats.around_pages.fetch_sub(planned - mapped.max(1), Ordering::Relaxed);
        if mapped == 0 {
            let counter = if write { &stats.copy } else { &stats.zero };
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// `madvise` removed `[start, end)`: those pages are missing again. Ballooned pages stay
    /// Ballooned (the balloon marks them before it calls `madvise`); others become Untouched.
    fn remove(&mut self, start: u64, end: u64) {
        let stats = &self.shared.stats;
        stats.removes.fetch_add(1, Ordering::Relaxed);
        let mut addr = start & !(PAGE - 1);
        while addr < end {
            if let Some(pfn) = self.shared.map.pfn_of(addr) {
                self.shared.table.set_flags(pfn, FLAG_SAMPLED, false);
                if self.shared.table.get(pfn) != Some(PageState::Ballooned) {
                    self.shared.table.set(pfn, PageState::Untouched);
                }
                stats.removed_pages.fetch_add(1, Ordering::Relaxed);
            }
            addr += PAGE;
        }
    }

    /// Closes the current Active sample and starts the next.
    fn sample_tick(&mut self) -> Result<(), UffdError> {
        let Some(s) = self.sampler.as_mut() else { return Ok(()) };
        let _ = s.timer.wait();
        let table = &self.shared.table;
        let mut touched = 0u32;
        for &pfn in &s.current {
            // Still flagged: not written since it was protected. Lift the protection so a
            // later sample starts clean.
            if table.set_flags(pfn, FLAG_SAMPLED, false) & FLAG_SAMPLED == 0 {
                touched += 1;
            } else if let Some(hva) = self.shared.map.hva_of(pfn) {
                if table.get(pfn) == Some(PageState::Resident) {
                    self.uffd.write_protect(hva, PAGE, false)?;
                }
            }
        }
        let sampled = u32::try_from(s.current.len()).unwrap_or(u32::MAX);
        s.estimator.update(touched, sampled);
        let resident = table.count(PageState::Resident) * PAGE;
        self.shared.active.publish(&s.estimator, resident);
        s.current.clear();
        let pages = self.shared.map.pages();
        let attempts = u64::from(s.config.sample_pages) * 64;
        for _ in 0..attempts {
            if s.current.len() >= s.config.sample_pages as usize || pages == 0 {
                break;
            }
            let pfn = s.rng.below(pages);
            if table.get(pfn) != Some(PageState::Resident) || table.flags(pfn) & FLAG_SAMPLED != 0 {
                continue;
            }
            let Some(hva) = self.shared.map.hva_of(pfn) else { continue };
            table.set_flags(pfn, FLAG_SAMPLED, true);
            self.uffd.write_protect(hva, PAGE, true)?;
            s.current.push(pfn);
        }
        Ok(())
    }
}

fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
