//! The lazy-RAM engine of one VM: userfaultfd registration, the page-state table, the
//! fault-handler thread, and the statistics the rest of ebb reads.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::active::{ActiveConfig, ActiveStats};
use super::layout::{RamMap, PAGE};
use super::state::{PageState, PageTable};
use super::stats::{FaultStats, MemStats};
use super::uffd::handler::{FaultHandler, HandlerConfig, Shared};
use super::uffd::{Uffd, UffdError};
use crate::vstate::memory::{GuestRam, RamRegion};

/// How the engine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The userfaultfd device, tried when the syscall is refused.
    pub uffd_dev: PathBuf,
    /// Fault-around and Active sampling.
    pub handler: HandlerConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            uffd_dev: PathBuf::from("/dev/userfaultfd"),
            handler: HandlerConfig { fault_around: 0, active: Some(ActiveConfig::default()) },
        }
    }
}

/// A running engine; dropping it stops the handler thread.
pub struct Engine {
    shared: Shared,
    stop: EventFd,
    failed: EventFd,
    failure: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<Result<(), UffdError>>>,
    wp: bool,
}

impl Engine {
    /// Registers `ram` with userfaultfd and starts the handler thread. Pages ebb already
    /// wrote (kernel, boot tables) are found with `mincore` and start out Resident.
    pub fn start(ram: &GuestRam, config: &EngineConfig) -> Result<Self, UffdError> {
        let uffd = Uffd::open(&config.uffd_dev)?;
        let wp = uffd.has_wp();
        let regions = ram.regions();
        for r in &regions {
            uffd.register(r.hva, r.len, wp)?;
        }
        let map = RamMap::new(&regions);
        let table = Arc::new(PageTable::new(map.pages()));
        mark_resident(&map, &table);
        let shared = Shared {
            map,
            table,
            stats: Arc::new(FaultStats::default()),
            active: Arc::new(ActiveStats::default()),
        };
        let handler = FaultHandler::new(uffd, shared.clone(), config.handler)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(UffdError::Read)?;
        let stop_thread = stop.try_clone().map_err(UffdError::Read)?;
        let failed = EventFd::new(libc::EFD_NONBLOCK).map_err(UffdError::Read)?;
        let failed_thread = failed.try_clone().map_err(UffdError::Read)?;
        let failure = Arc::new(Mutex::new(None));
        let failure_thread = failure.clone();
        let thread = std::thread::Builder::new()
            .name("ebb-uffd".into())
            .spawn(move || {
                let result = handler.run(&stop_thread);
                if let Err(e) = &result {
                    // Faulting threads now wait forever: tell the VMM, which ends the VM.
                    *failure_thread.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(e.to_string());
                    let _ = failed_thread.write(1);
                }
                result
            })
            .map_err(UffdError::Read)?;
        Ok(Self { shared, stop, failed, failure, thread: Some(thread), wp })
    }

    /// Signalled if the handler thread stops on an error: faults can no longer be served.
    pub fn failed_event(&self) -> &EventFd {
        &self.failed
    }

    /// Why the handler thread stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The page-state table.
    pub fn table(&self) -> &Arc<PageTable> {
        &self.shared.table
    }

    /// Guest RAM as the engine numbers it.
    pub fn map(&self) -> &RamMap {
        &self.shared.map
    }

    /// True if guest RAM is registered in write-protect mode too.
    pub fn write_protect(&self) -> bool {
        self.wp
    }

    /// Bytes of metadata the engine keeps for this VM.
    pub fn metadata_bytes(&self) -> u64 {
        self.shared.table.metadata_bytes()
            + std::mem::size_of::<FaultStats>() as u64
            + std::mem::size_of::<ActiveStats>() as u64
    }

    /// A snapshot of the statistics at `t_ms`.
    pub fn snapshot(&self, t_ms: u64) -> MemStats {
        let table = &self.shared.table;
        let stats = &self.shared.stats;
        let resident = table.count(PageState::Resident) * PAGE;
        let active = if self.shared.active.intervals.load(Ordering::Relaxed) == 0 {
            resident // no sample yet: assume everything resident is active
        } else {
            self.shared.active.active_bytes.load(Ordering::Relaxed)
        };
        MemStats {
            t_ms,
            consumed_bytes: resident,
            active_bytes: active,
            touched_bytes: (resident + table.count(PageState::ZeroMapped) * PAGE),
            zero_mapped_bytes: table.count(PageState::ZeroMapped) * PAGE,
            ballooned_bytes: table.count(PageState::Ballooned) * PAGE,
            rss_bytes: rss_of(self.shared.map.spans().iter().map(|s| s.region)),
            faults: stats.faults(),
            faults_zero: stats.zero.load(Ordering::Relaxed),
            faults_copy: stats.copy.load(Ordering::Relaxed),
            faults_wp: stats.wp.load(Ordering::Relaxed),
            fault_around_pages: stats.around_pages.load(Ordering::Relaxed),
            remove_events: stats.removes.load(Ordering::Relaxed),
            faults_already_mapped: stats.already_mapped.load(Ordering::Relaxed),
            fault_retries: stats.retries.load(Ordering::Relaxed),
            removed_pages: stats.removed_pages.load(Ordering::Relaxed),
            fault_p50_us: stats.latency.quantile(0.50) as f64 / 1000.0,
            fault_p99_us: stats.latency.quantile(0.99) as f64 / 1000.0,
            handler_cpu_ms: stats.cpu_ns() as f64 / 1e6,
            active_samples: self.shared.active.intervals.load(Ordering::Relaxed),
            metadata_bytes: self.metadata_bytes(),
        }
    }

    /// Stops the handler thread; returns its error if it failed.
    pub fn stop(mut self) -> Result<(), UffdError> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Result<(), UffdError> {
        let _ = self.stop.write(1);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(UffdError::Api("fault handler thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.stop_thread() {
            log::error!("fault handler: {e}");
        }
    }
}

/// Marks pages that are already backed (written before registration) as Resident.
fn mark_resident(map: &RamMap, table: &PageTable) {
    for span in map.spans() {
        let (Ok(pages), Ok(len)) =
            (usize::try_from(span.region.len / PAGE), usize::try_from(span.region.len))
        else {
            continue;
        };
        let mut vec = vec![0u8; pages];
        // SAFETY: the region is a live mapping of `len` bytes and `vec` has one byte per page.
        let ret =
            unsafe { libc::mincore(span.region.hva as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if ret != 0 {
            log::warn!("mincore failed: {}", std::io::Error::last_os_error());
            continue;
        }
        for (i, _) in vec.iter().enumerate().filter(|(_, &v)| v & 1 != 0) {
            table.set(span.first_pfn + i as u64, PageState::Resident);
        }
    }
}

/// Resident bytes of the given mappings, from `/proc/self/smaps` (0 if unreadable).
pub fn rss_of(regions: impl Iterator<Item = RamRegion>) -> u64 {
    let wanted: Vec<(u64, u64)> = regions.map(|r| (r.hva, r.hva + r.len)).collect();
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
    let mut total = 0;
    let mut current = false;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
                {
                    current = wanted.iter().any(|&(a, b)| lo >= a && hi <= b);
                    continue;
                }
            }
        }
        if current {
            if let Some(kb) = line.strip_prefix("Rss:") {
                total +=
                    kb.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    total
}
