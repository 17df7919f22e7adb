//! The lazy-RAM engine of one VM: userfaultfd registration, the page-state table, the
//! fault-handler thread, and the statistics the rest of ebb reads.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::fault::active::{ActiveConfig, ActiveStats};
use super::fault::handler::{EngineCore, FaultHandler, HandlerConfig, DEFAULT_OOM_WAIT};
use super::fault::FaultError;
use super::layout::RamMap;
use super::manager::MemoryManager;
use super::pages::{PageState, PageTable, StateSet};
use super::reclaim::evict::Evictor;
use super::reclaim::{self, DirtyLog, ReclaimControl, VictimPolicy};
use super::rss::RssProbe;
use super::sharing::member::GroupMember;
use super::sharing::pool::{Pool, PoolError, SharePool};
use super::sharing::{Merger, ShareHash, SharedPages, SharingControl, SharingStats};
use super::stats::{FaultStats, Histogram, MemStats, ReclaimStats, ShareStats};
use super::sys::resident_pages;
use super::uffd::{Uffd, UffdError, DEFAULT_UFFD_DEV};
use crate::units::PAGE_SIZE;

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// userfaultfd refused: unavailable, a registration, an ioctl the kernel lacks.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The fault handler could not be set up.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// The memory manager keeps no page-state table (it was built for `--no-uffd`).
    #[error("guest memory is not tracked: the lazy-RAM engine needs a page-state table")]
    NotTracked,
    /// A thread, timer, eventfd, pool or inherited descriptor of the engine could not be set
    /// up.
    #[error("starting the memory engine: {0}")]
    Setup(std::io::Error),
}

/// How the engine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The userfaultfd device, tried when the syscall is refused.
    pub uffd_dev: PathBuf,
    /// Fault-around and Active sampling.
    pub handler: HandlerConfig,
    /// Resident memory to keep at most from the start (None: reclaim off until the lever
    /// sets a target).
    pub reclaim_target: Option<u64>,
    /// How the reclaim worker picks victims.
    pub victims: VictimPolicy,
    /// Pages the sharing scanner hashes per second from the start (0: off until the lever
    /// sets a rate).
    pub share_scan_rate: u64,
    /// How the sharing scanner hashes pages.
    pub share_hash: ShareHash,
    /// Inherited descriptors (data, broker link) of a sharing group's pool (None: a pool of the
    /// VM's own).
    pub share_group_fds: Option<(i32, i32)>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            uffd_dev: PathBuf::from(DEFAULT_UFFD_DEV),
            handler: HandlerConfig {
                fault_around: Default::default(),
                active: Some(ActiveConfig::default()),
                oom_wait: DEFAULT_OOM_WAIT,
            },
            reclaim_target: None,
            victims: VictimPolicy::default(),
            share_scan_rate: 0,
            share_hash: ShareHash::default(),
            share_group_fds: None,
        }
    }
}

/// The reclaim worker as the engine holds it: its lever, and how to stop it.
#[derive(Debug)]
struct Reclaim {
    control: Arc<ReclaimControl>,
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Reclaim {
    /// Stops the worker and waits for it (it never waits for the fault handler).
    fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}

/// The sharing scanner as the engine holds it.
#[derive(Debug)]
struct Sharing {
    control: Arc<SharingControl>,
    pages: Arc<SharedPages>,
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Sharing {
    /// How long [`stop`](Self::stop) waits for the scanner.
    const STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

    /// Stops the scanner and waits for it, while the fault handler still reads events: the
    /// scanner's `mremap` waits for the handler to read its remap event. If the handler is
    /// gone the scanner may never return; it is left to end with the process.
    fn stop(self) {
        self.pages.stop();
        let _ = self.stop.write(1);
        let started = std::time::Instant::now();
        while !self.thread.is_finished() && started.elapsed() < Self::STOP_PATIENCE {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        } else {
            log::warn!("page sharing: the scanner did not stop; it ends with the process");
        }
    }
}

/// What the handler thread leaves behind when it stops on an error, for the VMM.
#[derive(Debug, Default)]
struct Failure {
    /// Why it stopped (taken by the VMM to report it).
    error: Option<FaultError>,
    /// The thread's hold on the descriptor, kept open and guest RAM registered until the
    /// VMM says no vCPU runs ([`Engine::release_guest_ram`]).
    uffd: Option<Arc<Uffd>>,
    /// It stopped for lack of memory: guest RAM is dropped once released.
    out_of_memory: bool,
}

/// The VMM's word that no vCPU of the VM will run guest code again: every vCPU thread has
/// left `KVM_RUN` for good. [`Engine::release_guest_ram`] asks for it, so that no call site
/// can unregister guest RAM under a running guest without saying so.
#[derive(Debug)]
pub struct VcpusStopped(());

impl VcpusStopped {
    /// Made once every vCPU thread has ended (or by a user of the engine that runs none).
    pub fn confirmed() -> Self {
        Self(())
    }
}

/// A running engine; dropping it stops the handler thread.
#[derive(Debug)]
pub struct Engine {
    core: EngineCore,
    stop: EventFd,
    failed: EventFd,
    failure: Arc<Mutex<Failure>>,
    thread: Option<JoinHandle<()>>,
    wp: bool,
    rss: RssProbe,
    reclaim: Option<Arc<ReclaimControl>>,
    sharing: Option<Sharing>,
}

impl Engine {
    /// Registers the guest RAM of `mm` with userfaultfd and starts the handler thread, which
    /// keeps `mm`'s page-state table. Pages ebb already wrote (kernel, boot tables) are found
    /// with `mincore` and start out Resident.
    ///
    /// When `mm` has stores for evicted pages, a reclaim worker starts too (idle until a
    /// target is set); `dirty_log` tells it which pages the guest wrote.
    ///
    /// # Errors
    /// userfaultfd is unavailable or refuses the range, `mm` keeps no page table, or the
    /// thread could not be started.
    pub fn start(
        mm: &MemoryManager,
        config: &EngineConfig,
        dirty_log: Option<DirtyLog>,
    ) -> Result<Self, EngineError> {
        let table = mm.table().cloned().ok_or(EngineError::NotTracked)?;
        let uffd = Arc::new(Uffd::open(&config.uffd_dev)?);
        let wp = uffd.has_wp();
        let map = mm.map().clone();
        for s in map.spans() {
            // SAFETY: the span is guest RAM, whose faults this engine's handler serves.
            unsafe { uffd.register(s.region.hva, s.region.len, wp) }?;
        }
        mark_resident(&map, &table);
        let shared = shared_pages(&uffd, &table, config)?;
        let core = EngineCore {
            map,
            table,
            stats: Arc::new(FaultStats::default()),
            active: Arc::new(ActiveStats::default()),
            backing: mm.backing().cloned(),
            sharing: shared.clone(),
            gate: Arc::new(super::gate::AllocGate::default()),
        };
        let handler = FaultHandler::new(uffd.clone(), core.clone(), config.handler)?;
        let worker = start_reclaim(&core, &uffd, config, dirty_log)?;
        let sharing = match shared {
            Some(pages) => Some(start_sharing(&core, &uffd, config, pages)?),
            None => None,
        };
        if let Some(s) = &sharing {
            mm.set_sharing(s.pages.clone());
        }
        // From here the handler, the evictor, the sharing scanner, the shared pages and the
        // handler's thread hold the descriptor: it closes when all are gone, which wakes
        // every faulting thread. (A thread that failed hands its hold to the engine.)
        let held = uffd;
        let reclaim = worker.as_ref().map(|w| w.control.clone());
        let stop =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EngineError::Setup)?;
        let stop_thread = stop.try_clone().map_err(EngineError::Setup)?;
        let failed =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EngineError::Setup)?;
        let failed_thread = failed.try_clone().map_err(EngineError::Setup)?;
        let failure = Arc::new(Mutex::new(Failure::default()));
        let failure_thread = failure.clone();
        let thread = std::thread::Builder::new()
            .name("ebb-uffd".into())
            .spawn(move || {
                serve(handler, &stop_thread, worker, held, &failure_thread, &failed_thread)
            })
            .map_err(EngineError::Setup)?;
        let rss = RssProbe::new(core.map.spans().iter().map(|s| s.region).collect());
        Ok(Self { core, stop, failed, failure, thread: Some(thread), wp, rss, reclaim, sharing })
    }

    /// The sharing lever, if the kernel can share pages (see `mm::sharing`).
    pub fn sharing(&self) -> Option<&Arc<SharingControl>> {
        self.sharing.as_ref().map(|s| &s.control)
    }

    /// The fault counters, where a vCPU thread registers itself
    /// (`stats.vcpus.register_current_thread`) so that its faults are counted apart.
    pub fn fault_stats(&self) -> &Arc<FaultStats> {
        &self.core.stats
    }

    /// The allocation gate's lever.
    pub fn gate(&self) -> &Arc<super::gate::AllocGate> {
        &self.core.gate
    }

    /// The reclaim lever, if the engine has stores and the kernel can move pages.
    pub fn reclaim(&self) -> Option<&Arc<ReclaimControl>> {
        self.reclaim.as_ref()
    }

    /// Signalled if the handler thread stops on an error: faults can no longer be served.
    pub fn failed_event(&self) -> &EventFd {
        &self.failed
    }

    /// Why the handler thread stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.lock_failure().error.as_ref().map(|e| e.to_string())
    }

    /// Takes the error the handler thread stopped on, if it failed.
    pub fn take_failure(&self) -> Option<FaultError> {
        self.lock_failure().error.take()
    }

    /// True if the handler thread stopped on an error (taken or not).
    pub fn has_failed(&self) -> bool {
        let f = self.lock_failure();
        f.error.is_some() || f.uffd.is_some()
    }

    /// After the handler stopped on an error, and only once no vCPU runs: unregisters guest
    /// RAM from userfaultfd and lets go of the handler's descriptor, which wakes every other
    /// ebb thread waiting on a fault (their pages are then served as plain anonymous memory);
    /// after running out of memory, it drops guest RAM too. Returns false (doing nothing) if
    /// the handler did not fail or guest RAM was released already.
    ///
    /// Unregistered before guest RAM is dropped: an `madvise` of registered memory would wait
    /// for the dead handler to read its remove event. (Dropping our reference is not enough:
    /// the sharing scanner and the shared pages hold the descriptor too.) The same holds when
    /// a page's stored copy could not be read back: once the vCPUs are stopped, no guest code
    /// can see the zeros in its place.
    pub fn release_guest_ram(&self, _stopped: VcpusStopped) -> bool {
        let (uffd, out_of_memory) = {
            let mut f = self.lock_failure();
            (f.uffd.take(), f.out_of_memory)
        };
        let Some(uffd) = uffd else { return false };
        for s in self.core.map.spans() {
            if let Err(e) = uffd.unregister(s.region.hva, s.region.len) {
                log::warn!("unregistering guest RAM after the handler stopped: {e}");
            }
        }
        drop(uffd);
        if out_of_memory {
            drop_guest_memory(&self.core.map);
        }
        log::info!("guest RAM unregistered from userfaultfd after the fault handler stopped");
        true
    }

    fn lock_failure(&self) -> std::sync::MutexGuard<'_, Failure> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The page-state table.
    pub fn table(&self) -> &Arc<PageTable> {
        &self.core.table
    }

    /// True if guest RAM is registered in write-protect mode too.
    pub fn write_protect(&self) -> bool {
        self.wp
    }

    /// Bytes of metadata the engine keeps for this VM.
    pub fn metadata_bytes(&self) -> u64 {
        self.core.table.metadata_bytes()
            + self.core.backing.as_ref().map_or(0, |b| b.metadata_bytes())
            // The pool's tables, and the scanner's 4 bytes of hash and 2 of backoff per page.
            + self.sharing.as_ref().map_or(0, |s| s.pages.pool.metadata_bytes() + 6 * self.core.table.len())
            + std::mem::size_of::<FaultStats>() as u64
            + std::mem::size_of::<ActiveStats>() as u64
    }

    /// The probe of the guest-RAM mappings' RSS.
    pub fn rss(&self) -> &RssProbe {
        &self.rss
    }

    /// A snapshot of the statistics at `t_ms` (`rss_bytes` may be up to 100 ms old).
    pub fn snapshot(&self, t_ms: u64) -> MemStats {
        let table = &self.core.table;
        let stats = &self.core.stats;
        let resident = table.count(PageState::Resident) * PAGE_SIZE;
        let reclaim = self.reclaim_stats(resident);
        let sharing = self.sharing_stats();
        let active = if self.core.active.intervals.load(Ordering::Relaxed) == 0 {
            resident // no sample yet: assume everything resident is active
        } else {
            self.core.active.active_bytes.load(Ordering::Relaxed)
        };
        let (vcpu_faults, vcpu_fault_wait_us) = stats.vcpus.snapshot();
        MemStats {
            t_ms,
            vcpu_faults,
            vcpu_fault_wait_us,
            consumed_bytes: resident
                + reclaim.zcache_bytes
                + reclaim.held_pages * PAGE_SIZE
                + sharing.sharing_pool_bytes,
            active_bytes: active,
            touched_bytes: (resident + table.count(PageState::ZeroMapped) * PAGE_SIZE),
            zero_mapped_bytes: table.count(PageState::ZeroMapped) * PAGE_SIZE,
            ballooned_bytes: table.count(PageState::Ballooned) * PAGE_SIZE,
            rss_bytes: self.rss.bytes(),
            faults: stats.faults(),
            faults_zero: stats.zero.load(Ordering::Relaxed),
            faults_copy: stats.copy.load(Ordering::Relaxed),
            faults_wp: stats.wp.load(Ordering::Relaxed),
            fault_around_pages: stats.around_pages.load(Ordering::Relaxed),
            remove_events: stats.removes.load(Ordering::Relaxed),
            faults_already_mapped: stats.already_mapped.load(Ordering::Relaxed),
            fault_retries: stats.retries.load(Ordering::Relaxed),
            fault_no_memory: stats.no_memory.load(Ordering::Relaxed),
            removed_pages: stats.removed_pages.load(Ordering::Relaxed),
            fault_p50_us: stats.latency.quantile(0.50) as f64 / 1000.0,
            fault_p99_us: stats.latency.quantile(0.99) as f64 / 1000.0,
            handler_cpu_ms: stats.cpu_ns() as f64 / 1e6,
            active_samples: self.core.active.intervals.load(Ordering::Relaxed),
            metadata_bytes: self.metadata_bytes(),
            guest_progress: None,
            alloc_gate_bytes: self.core.gate.cap_bytes(),
            alloc_waits: self.core.gate.waits.load(Ordering::Relaxed),
            alloc_wait_timeouts: self.core.gate.timeouts.load(Ordering::Relaxed),
            reclaim,
            sharing,
        }
    }

    /// The sharing figures (all zero without sharing).
    fn sharing_stats(&self) -> ShareStats {
        let Some(s) = &self.sharing else { return ShareStats::default() };
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let st = &s.pages.stats;
        let shared = self.core.table.count(PageState::Shared) * PAGE_SIZE;
        let pool = s.pages.pool.live_pages() * PAGE_SIZE;
        ShareStats {
            share_scan_rate: s.control.scan_rate(),
            shared_bytes: shared,
            sharing_pool_bytes: pool,
            sharing_saved_bytes: shared.saturating_sub(pool),
            zero_pages_shared: get(&st.zero_pages),
            share_scanned: get(&st.scanned),
            share_passes: get(&st.passes),
            share_merged: get(&st.merged),
            share_collisions: get(&st.collisions),
            cow_breaks: get(&st.cow_breaks),
            share_backoff_skips: get(&st.backoff_skips),
            share_map_failures: get(&st.map_failures),
            share_map_limited: get(&st.map_limited),
            sharing_cpu_ms: s.control.cpu_ns() as f64 / 1e6,
            sharing_group_pool_bytes: s.pages.pool.group_live_pages().map(|p| p * PAGE_SIZE),
        }
    }

    /// The reclaim figures (zero but `resident_bytes` without stores).
    fn reclaim_stats(&self, resident: u64) -> ReclaimStats {
        let mut out = ReclaimStats { resident_bytes: resident, ..Default::default() };
        let Some(backing) = &self.core.backing else { return out };
        let sizes = backing.sizes();
        let s = &backing.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let us = |h: &Histogram, q| h.quantile(q) as f64 / 1000.0;
        out.reclaim_target_bytes = self.reclaim.as_ref().and_then(|r| r.target());
        out.zcache_pages = sizes.cache_pages;
        out.same_filled_pages = sizes.cache_fill_pages;
        out.compressed_bytes = sizes.compressed_bytes;
        out.zcache_bytes = sizes.slab_bytes;
        out.compression_ratio = if sizes.slab_bytes == 0 {
            0.0
        } else {
            (sizes.cache_pages * PAGE_SIZE) as f64 / sizes.slab_bytes as f64
        };
        out.swapped_bytes = self.core.table.count(PageState::Swapped) * PAGE_SIZE;
        out.swap_file_bytes = sizes.swap_file_bytes;
        out.swap_errors = get(&s.swap_errors);
        out.evictions = get(&s.evictions);
        out.zero_pages_dropped = get(&s.zero_dropped);
        out.written_back = get(&s.written_back);
        out.held_pages = sizes.held_pages;
        out.swapins_zcache = get(&s.swapins_cache);
        out.swapins_swap = get(&s.swapins_swap);
        out.refaults = out.swapins_zcache + out.swapins_swap;
        out.swapin_zcache_p50_us = us(&s.swapin_cache_ns, 0.50);
        out.swapin_zcache_p99_us = us(&s.swapin_cache_ns, 0.99);
        out.swapin_swap_p50_us = us(&s.swapin_swap_ns, 0.50);
        out.swapin_swap_p99_us = us(&s.swapin_swap_ns, 0.99);
        out.reclaim_cpu_ms = self.reclaim.as_ref().map_or(0.0, |r| r.cpu_ns() as f64 / 1e6);
        out
    }

    /// Stops the handler thread; returns its error if it failed.
    pub fn stop(mut self) -> Result<(), FaultError> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Result<(), FaultError> {
        // The scanner first, while the handler still reads its remap events.
        if let Some(s) = self.sharing.take() {
            s.stop();
        }
        let _ = self.stop.write(1);
        let joined = self.thread.take().map(JoinHandle::join);
        if let Some(uffd) = self.lock_failure().uffd.take() {
            // The handler failed and nobody said the vCPUs stopped: closing the descriptor
            // could wake one into zeros, so it is leaked. (In `ebb run` the process is
            // ending; its exit kills every thread before the kernel closes the descriptor.)
            std::mem::forget(uffd);
        }
        match joined {
            Some(Err(payload)) => Err(FaultError::Panicked(panic_message(&*payload))),
            _ => self.take_failure().map_or(Ok(()), Err),
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

/// The handler thread: serves faults until `stop`. On an error or a panic it stops the
/// reclaim worker, leaves the error and its hold on the descriptor in `failure`, and signals
/// `failed`.
fn serve(
    handler: FaultHandler,
    stop: &EventFd,
    worker: Option<Reclaim>,
    held: Arc<Uffd>,
    failure: &Mutex<Failure>,
    failed: &EventFd,
) {
    // A panic ends the handler as an error does, so that the VMM stops the VM and says why,
    // instead of the guest waiting forever on a fault nobody reads.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| handler.run(stop)))
        .unwrap_or_else(|payload| Err(FaultError::Panicked(panic_message(&*payload))));
    if let Some(w) = worker {
        // A worker thread the kernel ended without unwinding (an oops in a system call)
        // makes `join` panic; the handler's own failure must still reach the VMM.
        if std::panic::catch_unwind(AssertUnwindSafe(|| w.stop())).is_err() {
            log::error!("the reclaim worker ended abnormally");
        }
    }
    let Err(e) = result else { return };
    // Guest RAM stays registered, and the descriptor open, until the VMM has stopped the
    // vCPUs (`Engine::release_guest_ram`): unregistering or closing it now would wake the
    // vCPU waiting on a fault and let it run on, reading zeros where an evicted or shared
    // page was (the kernel serves the missing page as plain anonymous memory).
    let mut f = failure.lock().unwrap_or_else(PoisonError::into_inner);
    f.out_of_memory = matches!(e, FaultError::OutOfMemory { .. });
    f.error = Some(e);
    f.uffd = Some(held);
    drop(f);
    let _ = failed.write(1);
}

/// Starts the reclaim worker if the engine has stores for evicted pages and the kernel can
/// move pages out (`UFFDIO_MOVE`, Linux 6.8); otherwise says why reclaim is unavailable.
fn start_reclaim(
    core: &EngineCore,
    uffd: &Arc<Uffd>,
    config: &EngineConfig,
    dirty_log: Option<DirtyLog>,
) -> Result<Option<Reclaim>, EngineError> {
    let Some(backing) = core.backing.clone() else { return Ok(None) };
    if !uffd.has_move() {
        if config.reclaim_target.is_some() {
            // Asked for by name: an error, not a VM that silently never reclaims.
            return Err(
                UffdError::MissingIoctl("UFFDIO_MOVE (Linux 6.8+), which reclaim needs").into()
            );
        }
        log::warn!("host-side reclaim is unavailable: this kernel lacks UFFDIO_MOVE (Linux 6.8+)");
        return Ok(None);
    }
    let (map, table) = (core.map.clone(), core.table.clone());
    let evictor =
        Evictor::new(&config.uffd_dev, uffd.clone(), map, table.clone(), backing.clone())?;
    let control = Arc::new(ReclaimControl::new(config.reclaim_target).map_err(EngineError::Setup)?);
    let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EngineError::Setup)?;
    let stop_worker = stop.try_clone().map_err(EngineError::Setup)?;
    let thread = reclaim::spawn(
        control.clone(),
        stop_worker,
        table,
        backing,
        evictor,
        config.victims,
        dirty_log,
    )
    .map_err(EngineError::Setup)?;
    Ok(Some(Reclaim { control, stop, thread }))
}

/// The shared pages of the VM, if the kernel can share them (otherwise a scan rate asked
/// for by name is an error, and sharing is just unavailable).
fn shared_pages(
    uffd: &Arc<Uffd>,
    table: &PageTable,
    config: &EngineConfig,
) -> Result<Option<Arc<SharedPages>>, EngineError> {
    if !uffd.has_sharing() {
        let need = "UFFDIO_MOVE and write protection of memfd mappings (Linux 6.8+), which page sharing needs";
        if config.share_scan_rate > 0 {
            return Err(UffdError::MissingIoctl(need).into());
        }
        log::info!("page sharing is unavailable: this kernel lacks {need}");
        return Ok(None);
    }
    let setup = |e: PoolError| EngineError::Setup(std::io::Error::other(e));
    let pool: Arc<dyn SharePool> = match config.share_group_fds {
        Some((data, link)) => {
            let (data, link) = (inherited(data)?, inherited(link)?);
            Arc::new(GroupMember::attach(data, link.into()).map_err(setup)?)
        }
        None => {
            // Hints: at most one per two pages, so that the index stays within 10 bytes a
            // page.
            let hints = usize::try_from(table.len() / 2).unwrap_or(usize::MAX);
            Arc::new(Pool::new(table.len(), hints).map_err(setup)?)
        }
    };
    let stats = Arc::new(SharingStats::default());
    let pages = SharedPages::new(pool, stats, uffd.clone()).map_err(EngineError::Setup)?;
    Ok(Some(Arc::new(pages)))
}

/// A duplicate of inherited descriptor `fd`, close-on-exec, as a `File`.
fn inherited(fd: i32) -> Result<std::fs::File, EngineError> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd` (EBADF if it is not open) and returns a new
    // descriptor that nothing else owns.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        let e = std::io::Error::last_os_error();
        return Err(EngineError::Setup(std::io::Error::new(
            e.kind(),
            format!("sharing group descriptor {fd}: {e}"),
        )));
    }
    // The inherited number is ours alone (the host passed it to this process only): close it,
    // so that nothing is left open that the engine does not own.
    // SAFETY: `fd` is open (F_DUPFD succeeded) and nothing else in this process uses it.
    unsafe { libc::close(fd) };
    // SAFETY: `dup` is a fresh descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(dup) })
}

/// Starts the sharing scanner (idle until a scan rate is set).
fn start_sharing(
    core: &EngineCore,
    uffd: &Arc<Uffd>,
    config: &EngineConfig,
    pages: Arc<SharedPages>,
) -> Result<Sharing, EngineError> {
    let merger = Merger::new(
        &config.uffd_dev,
        uffd.clone(),
        core.map.clone(),
        core.table.clone(),
        pages.pool.clone(),
        pages.stats.clone(),
    )?;
    let control =
        Arc::new(SharingControl::new(config.share_scan_rate).map_err(EngineError::Setup)?);
    let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EngineError::Setup)?;
    let stop_scanner = stop.try_clone().map_err(EngineError::Setup)?;
    let thread = super::sharing::spawn(
        control.clone(),
        pages.stats.clone(),
        stop_scanner,
        merger,
        config.share_hash,
    )
    .map_err(EngineError::Setup)?;
    Ok(Sharing { control, pages, stop, thread })
}

/// The message of a panic, from its payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_owned(),
        (_, Some(s)) => s.clone(),
        _ => "(a panic without a message)".to_owned(),
    }
}

/// Drops all of guest RAM, after the handler gave up for lack of memory and the vCPUs
/// stopped (guest RAM is unregistered, so no remove events): the guest cannot go on, and
/// its pages are what ebb's own threads, in the same memory cgroup, need to report why and
/// exit.
fn drop_guest_memory(map: &RamMap) {
    for s in map.spans() {
        // SAFETY: the span is guest RAM, mapped privately and anonymously by ebb; the VM is
        // ending, and nothing holds references into it.
        let _ = unsafe { super::sys::madvise_dontneed(s.region.hva, s.region.len) };
    }
}

/// Marks pages that are already backed (written before registration) as Resident.
fn mark_resident(map: &RamMap, table: &PageTable) {
    for span in map.spans() {
        let pages = span.region.len / PAGE_SIZE;
        let resident = match resident_pages(span.region.hva, pages) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("mincore of guest RAM failed: {e}; its boot pages count as untouched");
                continue;
            }
        };
        for (i, _) in resident.iter().enumerate().filter(|(_, &r)| r) {
            let from = StateSet::of(&[PageState::Untouched]);
            let _ = table.transition(span.first_idx + i as u64, from, PageState::Resident);
        }
    }
}
