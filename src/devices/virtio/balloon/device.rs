//! The balloon's state and queue processing. Plain logic over guest memory: the event loop
//! (`event_handler.rs`) and the API only call in.
//!
//! Every PFN, address, length and descriptor flag comes from the guest and is checked before
//! use; a bad one is counted (and logged once) and skipped, never trusted.
//!
//! The device never changes guest memory itself: inflated pages, deflated pages and free
//! page reports go to the memory manager (`mm`), which moves them in the page-state table
//! and drops their backing. PFNs of one buffer are sorted and merged into runs first, so a
//! run of contiguous pages costs one `madvise`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::metrics::BalloonMetrics;
use super::{
    config, BalloonError, F_DEFLATE_ON_OOM, F_PAGE_POISON, F_REPORTING, F_STATS_VQ,
    MAX_CHAIN_DESCRIPTORS, PFN_SHIFT, QUEUE_SIZE, STAT_ENTRY_BYTES, VIRTIO_ID_BALLOON,
};
use crate::config::BalloonConfig;
use crate::devices::virtio::{
    chain_descriptors, irq, ActivateError, Activation, Desc, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use crate::mm::{MemoryManager, MmError, Release};
use crate::units::{MIB_SHIFT, PAGE_SIZE};

/// Most bytes of PFNs one chain may carry: Linux sends at most `VIRTIO_BALLOON_ARRAY_PFNS_MAX`
/// (256) PFNs of 4 bytes per buffer (`drivers/virtio/virtio_balloon.c`).
const MAX_PFN_BYTES: u32 = 256 * 4;
/// Most bytes one free page report descriptor may name: a free block of the largest buddy
/// order, 2^10 pages on x86 (`MAX_ORDER`, what `page_reporting` reports at most).
const MAX_REPORT_BYTES: u32 = 4 << 20;
/// Chains of one queue served per event before other events get their turn.
pub const CHAINS_PER_TURN: usize = 32;
/// Pages of work (released, deflated or reported) after which a turn ends.
pub const PAGES_PER_TURN: u64 = 64 * 1024;
/// Most bytes of one statistics descriptor (Linux sends 10 entries of 10 bytes).
const MAX_STATS_DESC_BYTES: u32 = 4096;
/// Most bytes of statistics one chain may carry, all descriptors together.
const MAX_STATS_BYTES: usize = 4096;

/// What the queues are for, in Linux's order (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// Pages the guest gives up.
    Inflate,
    /// Pages the guest takes back.
    Deflate,
    /// Memory statistics.
    Stats,
    /// Free page reports.
    Reporting,
}

/// The latest statistics the guest sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// `(tag, value)` pairs as the guest sent them.
    pub values: Vec<(u16, u64)>,
    /// When they arrived.
    pub updated: Option<Instant>,
}

#[derive(Debug)]
struct Running {
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<(QueueRole, Queue)>,
    interrupt: Arc<VirtioInterrupt>,
}

/// The virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    config: BalloonConfig,
    mem: Arc<GuestMemoryMmap>,
    mem_bytes: u64,
    mm: Arc<MemoryManager>,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    num_pages: u32,
    actual: u32,
    poison_val: u32,
    running: Option<Running>,
    stats: GuestStats,
    stats_head: Option<u16>,
    metrics: Arc<BalloonMetrics>,
}

impl Balloon {
    /// A balloon for `mem` (`mem_bytes` of guest RAM) whose pages `mm` releases.
    ///
    /// # Errors
    /// [`BalloonError::TargetTooLarge`] if the initial target exceeds guest RAM.
    pub fn new(
        config: BalloonConfig,
        mem: Arc<GuestMemoryMmap>,
        mem_bytes: u64,
        mm: Arc<MemoryManager>,
    ) -> Result<Self, BalloonError> {
        let slots =
            2 + usize::from(config.stats_interval_s > 0) + usize::from(config.free_page_reporting);
        let mut balloon = Self {
            config,
            mem,
            mem_bytes,
            mm,
            queue_sizes: vec![QUEUE_SIZE; slots],
            acked_features: 0,
            num_pages: 0,
            actual: 0,
            poison_val: 0,
            running: None,
            stats: GuestStats::default(),
            stats_head: None,
            metrics: Arc::new(BalloonMetrics::default()),
        };
        balloon.set_target_mib(config.target_mib)?;
        Ok(balloon)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    /// Sets the balloon size the guest should reach, in MiB, and tells the driver.
    ///
    /// # Errors
    /// As [`Self::set_target_bytes`].
    pub fn set_target_mib(&mut self, target_mib: u64) -> Result<(), BalloonError> {
        let bytes = target_mib.checked_mul(1 << MIB_SHIFT).unwrap_or(!(PAGE_SIZE - 1));
        self.set_target_bytes(bytes)
    }

    /// Sets the balloon size the guest should reach, and tells the driver.
    ///
    /// # Errors
    /// [`BalloonError::TargetTooLarge`] for more than guest RAM, [`BalloonError::NotPages`]
    /// for a size that is not a whole number of 4 KiB pages (nothing changes).
    pub fn set_target_bytes(&mut self, target_bytes: u64) -> Result<(), BalloonError> {
        if target_bytes % (1 << PFN_SHIFT) != 0 {
            return Err(BalloonError::NotPages(target_bytes));
        }
        let pages = u32::try_from(target_bytes >> PFN_SHIFT).ok();
        let pages = match pages {
            Some(p) if target_bytes <= self.mem_bytes => p,
            _ => {
                return Err(BalloonError::TargetTooLarge {
                    target_bytes,
                    mem_bytes: self.mem_bytes,
                })
            }
        };
        self.num_pages = pages;
        if let Some(r) = &self.running {
            if let Err(e) = r.interrupt.signal(irq::CONFIG_CHANGE) {
                log::warn!("virtio-balloon: {e}");
            }
        }
        Ok(())
    }

    /// The target in MiB (`num_pages`, rounded down).
    pub fn target_mib(&self) -> u64 {
        u64::from(self.num_pages) >> (MIB_SHIFT - PFN_SHIFT)
    }

    /// The balloon size the driver reports (`actual`), in MiB, rounded down.
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.actual) >> (MIB_SHIFT - PFN_SHIFT)
    }

    /// The target in bytes (`num_pages`).
    pub fn target_bytes(&self) -> u64 {
        u64::from(self.num_pages) << PFN_SHIFT
    }

    /// The balloon size the driver reports (`actual`), in bytes.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.actual) << PFN_SHIFT
    }

    /// The latest guest statistics.
    pub fn guest_stats(&self) -> &GuestStats {
        &self.stats
    }

    /// True once the driver set DRIVER_OK.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Roles of the queue indices for the negotiated features.
    pub fn roles(acked_features: u64) -> Vec<QueueRole> {
        let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
        if acked_features & (1 << F_STATS_VQ) != 0 {
            roles.push(QueueRole::Stats);
        }
        if acked_features & (1 << F_REPORTING) != 0 {
            roles.push(QueueRole::Reporting);
        }
        roles
    }

    /// Processes a turn's worth of what the driver queued on queue `index`: at most
    /// [`CHAINS_PER_TURN`] chains and about [`PAGES_PER_TURN`] pages. Returns true if more is
    /// waiting, so that the event loop comes back after serving its other events.
    pub fn process_queue(&mut self, index: usize) -> bool {
        let Some(running) = self.running.as_mut() else {
            // Linux primes the statistics queue and kicks it before DRIVER_OK (init_vqs);
            // the buffer is picked up at activation. Counted, not trusted.
            self.metrics.early_notifies.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let Some((role, _)) = running.queues.get(index) else {
            self.metrics
                .bad_notifies
                .hit(|| format!("notification for queue {index}, which does not exist"));
            return false;
        };
        let role = *role;
        let mut used = Vec::new();
        let mut pages = 0u64;
        let mut more = true;
        for _ in 0..CHAINS_PER_TURN {
            if pages >= PAGES_PER_TURN {
                break;
            }
            let Some((head, descs)) = self.pop_chain(index) else {
                more = false;
                break;
            };
            let Some(descs) = descs else {
                self.metrics.bad_descriptors.hit(|| {
                    format!(
                        "descriptor chain {head} longer than {MAX_CHAIN_DESCRIPTORS} (or looping)"
                    )
                });
                used.push((head, 0));
                continue;
            };
            pages += match role {
                QueueRole::Inflate => self.inflate(&descs),
                QueueRole::Deflate => self.deflate(&descs),
                QueueRole::Stats => {
                    self.receive_stats(head, &descs);
                    continue; // held until the next polling tick
                }
                QueueRole::Reporting => self.report(&descs),
            };
            // Nothing is written into these buffers: the used length is 0.
            used.push((head, 0));
        }
        self.return_used(index, &used);
        more && self.has_chains(index)
    }

    /// The next chain of queue `index` with its descriptors (None inside when it is longer
    /// than `MAX_CHAIN_DESCRIPTORS` or loops), or None when the queue is empty or its
    /// available ring is broken (counted: the guest must reset the device).
    fn pop_chain(&mut self, index: usize) -> Option<(u16, Option<Vec<Desc>>)> {
        let running = self.running.as_mut()?;
        let mem = running.mem.clone();
        let (_, queue) = running.queues.get_mut(index)?;
        match queue.iter(&*mem) {
            Ok(mut iter) => iter
                .next()
                .map(|chain| (chain.head_index(), chain_descriptors(chain, MAX_CHAIN_DESCRIPTORS))),
            Err(e) => {
                self.metrics.bad_descriptors.hit(|| format!("queue {index}: {e}"));
                None
            }
        }
    }

    /// True if queue `index` holds chains not taken yet.
    fn has_chains(&self, index: usize) -> bool {
        let Some(running) = self.running.as_ref() else { return false };
        let Some((_, queue)) = running.queues.get(index) else { return false };
        queue
            .avail_idx(&*running.mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    /// Returns the held statistics buffer so the driver sends fresh numbers.
    pub fn request_stats(&mut self) {
        let Some(head) = self.stats_head.take() else { return };
        let Some(index) = self.queue_index(QueueRole::Stats) else { return };
        self.return_used(index, &[(head, 0)]);
    }

    fn queue_index(&self, role: QueueRole) -> Option<usize> {
        self.running.as_ref()?.queues.iter().position(|(r, _)| *r == role)
    }

    fn return_used(&mut self, index: usize, used: &[(u16, u32)]) {
        let Some(running) = self.running.as_mut() else { return };
        if used.is_empty() {
            return;
        }
        let Some((_, queue)) = running.queues.get_mut(index) else { return };
        for &(head, len) in used {
            if let Err(e) = queue.add_used(&*running.mem, head, len) {
                self.metrics.bad_descriptors.hit(|| format!("cannot return buffer {head}: {e:?}"));
            }
        }
        if let Err(e) = running.interrupt.signal(irq::USED_BUFFER) {
            log::warn!("virtio-balloon: {e}");
        }
    }

    /// The bytes of a device-readable descriptor of at most `max` bytes; a write-only or
    /// oversized descriptor, or one outside guest RAM, is counted and gives None.
    fn read_desc(&self, d: &Desc, max: u32, what: &str) -> Option<Vec<u8>> {
        if d.write_only || d.len > max {
            let why = if d.write_only { "write-only" } else { "too long" };
            self.metrics
                .bad_descriptors
                .hit(|| format!("{what} descriptor at {:#x} len {}: {why}", d.addr, d.len));
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(d.len).ok()?];
        if self.mem.read_slice(&mut buf, GuestAddress(d.addr)).is_err() {
            self.metrics
                .bad_descriptors
                .hit(|| format!("{what} buffer {:#x}+{} outside guest RAM", d.addr, d.len));
            return None;
        }
        Some(buf)
    }

    /// PFNs from the device-readable descriptors of a chain.
    /// The PFNs of a chain, at most `MAX_PFN_BYTES` of them in all; more is counted and
    /// ignored.
    fn read_pfns(&self, descs: &[Desc]) -> Vec<u32> {
        let mut pfns = Vec::new();
        for d in descs {
            let room = MAX_PFN_BYTES - u32::try_from(pfns.len() * 4).unwrap_or(MAX_PFN_BYTES);
            if d.len > room {
                self.metrics.bad_descriptors.hit(|| {
                    format!("PFN chain longer than {MAX_PFN_BYTES} bytes (the Linux driver's most)")
                });
                break;
            }
            if d.len % 4 != 0 {
                self.metrics
                    .bad_descriptors
                    .hit(|| format!("PFN descriptor of {} bytes, not whole PFNs", d.len));
                continue;
            }
            if let Some(buf) = self.read_desc(d, MAX_PFN_BYTES, "PFN") {
                pfns.extend(
                    buf.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
        }
        pfns
    }

    /// The valid PFNs of a chain as sorted runs `(first_gpa, pages)`; PFNs outside guest RAM
    /// are counted and dropped, duplicates merged.
    fn pfn_runs(&self, descs: &[Desc], what: &str) -> Vec<(u64, u64)> {
        let map = self.mm.map();
        let mut gpas: Vec<u64> = self
            .read_pfns(descs)
            .into_iter()
            .filter_map(|pfn| {
                let gpa = u64::from(pfn) << PFN_SHIFT;
                if map.range_of_gpa(gpa, PAGE_SIZE).is_none() {
                    self.metrics.bad_pfns.hit(|| format!("{what} PFN {pfn:#x} outside guest RAM"));
                    return None;
                }
                Some(gpa)
            })
            .collect();
        gpas.sort_unstable();
        gpas.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for gpa in gpas {
            match runs.last_mut() {
                Some((first, n)) if *first + *n * PAGE_SIZE == gpa => *n += 1,
                _ => runs.push((gpa, 1)),
            }
        }
        runs
    }

    /// Releases `[gpa, gpa + len)` through the memory manager; returns the pages released.
    fn release(&self, gpa: u64, len: u64, how: Release) -> u64 {
        match self.mm.release(gpa, len, how) {
            Ok(r) => r.pages,
            // Every page was checked, so a run the manager refuses straddles two regions:
            // release it page by page.
            Err(MmError::NotRam { .. }) if len > PAGE_SIZE => (0..len / PAGE_SIZE)
                .map(|i| self.release(gpa + i * PAGE_SIZE, PAGE_SIZE, how))
                .sum(),
            Err(e) => {
                self.metrics.madvise_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("virtio-balloon: {e}");
                0
            }
        }
    }

    /// Inflates the PFNs of a chain; returns the pages it named (the work done).
    fn inflate(&mut self, descs: &[Desc]) -> u64 {
        let runs = self.pfn_runs(descs, "inflate");
        let released: u64 =
            runs.iter().map(|&(gpa, n)| self.release(gpa, n * PAGE_SIZE, Release::Balloon)).sum();
        self.metrics.inflated_pages.fetch_add(released, Ordering::Relaxed);
        runs.iter().map(|&(_, n)| n).sum()
    }

    /// Deflates the PFNs of a chain; returns the pages it named.
    fn deflate(&mut self, descs: &[Desc]) -> u64 {
        let runs = self.pfn_runs(descs, "deflate");
        for &(gpa, n) in &runs {
            // Checked PFNs within one region each; a straddling run is split by the map.
            if self.mm.unballoon(gpa, n * PAGE_SIZE).is_err() {
                (0..n).for_each(|i| {
                    let _ = self.mm.unballoon(gpa + i * PAGE_SIZE, PAGE_SIZE);
                });
            }
        }
        let pages: u64 = runs.iter().map(|&(_, n)| n).sum();
        self.metrics.deflated_pages.fetch_add(pages, Ordering::Relaxed);
        pages
    }

    fn receive_stats(&mut self, head: u16, descs: &[Desc]) {
        if let Some(old) = self.stats_head.replace(head) {
            // A second buffer while one is held: give the old one back.
            if let Some(index) = self.queue_index(QueueRole::Stats) {
                self.return_used(index, &[(old, 0)]);
            }
        }
        let mut bytes = Vec::new();
        for d in descs {
            let Some(buf) = self.read_desc(d, MAX_STATS_DESC_BYTES, "stats") else { return };
            if bytes.len() + buf.len() > MAX_STATS_BYTES {
                self.metrics
                    .bad_stats
                    .hit(|| format!("statistics chain of more than {MAX_STATS_BYTES} bytes"));
                return;
            }
            bytes.extend(buf);
        }
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        if len % STAT_ENTRY_BYTES != 0 {
            self.metrics
                .bad_stats
                .hit(|| format!("statistics buffer of {len} bytes, not a multiple of 10"));
            return;
        }
        self.stats.values = bytes
            .chunks_exact(STAT_ENTRY_BYTES as usize)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&e[2..10]);
                (tag, u64::from_le_bytes(v))
            })
            .collect();
        self.stats.updated = Some(Instant::now());
        self.metrics.stats_updates.fetch_add(1, Ordering::Relaxed);
    }

    /// Releases the free ranges a report names; returns the pages it named.
    fn report(&mut self, descs: &[Desc]) -> u64 {
        // Released pages read back as zeros: only right if freed pages hold zeros. With a
        // non-zero poison value the guest expects the poison, so the pages are kept.
        if self.acked_features & (1 << F_PAGE_POISON) != 0 && self.poison_val != 0 {
            self.metrics.reports_kept.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let (mut pages, mut named) = (0, 0);
        for d in descs {
            // Reports are device-writable buffers (virtqueue_add_inbuf in page_reporting),
            // each a free block of at most MAX_REPORT_BYTES.
            let aligned = d.addr % PAGE_SIZE == 0 && u64::from(d.len) % PAGE_SIZE == 0 && d.len > 0;
            if !d.write_only || !aligned || d.len > MAX_REPORT_BYTES {
                self.metrics
                    .bad_descriptors
                    .hit(|| format!("report descriptor at {:#x} len {}", d.addr, d.len));
                continue;
            }
            let len = u64::from(d.len);
            if self.mm.map().range_of_gpa(d.addr, len).is_none() {
                self.metrics
                    .bad_pfns
                    .hit(|| format!("reported range {:#x}+{} outside guest RAM", d.addr, d.len));
                continue;
            }
            // Free pages the guest may reuse as soon as the report is returned.
            pages += self.release(d.addr, len, Release::Free);
            named += len / PAGE_SIZE;
        }
        self.metrics.reported_pages.fetch_add(pages, Ordering::Relaxed);
        named
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let mut f = 0;
        if self.config.stats_interval_s > 0 {
            f |= 1 << F_STATS_VQ;
        }
        if self.config.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= (1 << F_REPORTING) | (1 << F_PAGE_POISON);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 16];
        const _: () = assert!(config::SIZE == 16);
        space[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual.to_le_bytes());
        space[12..16].copy_from_slice(&self.poison_val.to_le_bytes());
        data.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = space.get(start..).and_then(|s| s.get(..data.len())) {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            (config::ACTUAL, Ok(v)) => self.actual = u32::from_le_bytes(v),
            (config::POISON_VAL, Ok(v)) => self.poison_val = u32::from_le_bytes(v),
            _ => self
                .metrics
                .bad_config_writes
                .hit(|| format!("config write at {offset} of {} bytes", data.len())),
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        let roles = Self::roles(activation.acked_features);
        let err = |reason| VirtioError::Activate { device_type: VIRTIO_ID_BALLOON, reason };
        let (queues, needed) = (activation.queues.len(), roles.len());
        if queues < needed {
            return Err(err(ActivateError::TooFewQueues { queues, needed }));
        }
        let queues: Vec<(QueueRole, Queue)> = roles.into_iter().zip(activation.queues).collect();
        if let Some(index) = queues.iter().position(|(_, q)| !q.ready()) {
            return Err(err(ActivateError::QueueNotReady { index }));
        }
        self.acked_features = activation.acked_features;
        let n = queues.len();
        self.running =
            Some(Running { mem: activation.mem, queues, interrupt: activation.interrupt });
        // A guest may reset and activate the device in a loop: only the first is logged.
        if self.metrics.activations.fetch_add(1, Ordering::Relaxed) == 0 {
            log::info!("virtio-balloon: driver ready, features {:#x}", self.acked_features);
        } else {
            log::debug!("virtio-balloon: driver ready, features {:#x}", self.acked_features);
        }
        // Buffers the driver queued before DRIVER_OK (the primed statistics buffer).
        for index in 0..n {
            self.process_queue(index);
        }
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        self.process_queue(usize::from(index));
    }

    fn reset(&mut self) {
        self.running = None;
        self.stats_head = None;
        self.acked_features = 0;
        self.actual = 0;
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::mm::pages::PageState;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryBackend;
    use vmm_sys_util::eventfd::EventFd;

    const MEM: u64 = 16 << 20;
    /// Where the test queues live, clear of the pages the tests balloon.
    const QUEUE_GPA: [u64; 4] = [0x80_0000, 0x90_0000, 0xa0_0000, 0xb0_0000];
    /// Where the tests put PFN arrays and statistics buffers.
    const BUF_GPA: u64 = 0xc0_0000;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const BASE_FEATURES: u64 = 1 << 32;
    const STATS: u64 = 1 << F_STATS_VQ;
    const REPORTING: u64 = 1 << F_REPORTING;

    struct Rig {
        mem: Arc<GuestMemoryMmap>,
        balloon: Balloon,
        mm: Arc<MemoryManager>,
        irq: Arc<VirtioInterrupt>,
        queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn all_features() -> BalloonConfig {
        BalloonConfig {
            target_mib: 0,
            stats_interval_s: 1,
            deflate_on_oom: true,
            free_page_reporting: true,
        }
    }

    /// A balloon over 16 MiB of guest memory with four mock queues (the memory is leaked so
    /// the mocks can borrow it for the whole test).
    fn rig_with_queue_size(size: u16) -> Rig {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap());
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        let hva = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let region = crate::vstate::memory::RamRegion { gpa: 0, hva, len: MEM };
        let mm = Arc::new(MemoryManager::new(&[region], true));
        let balloon = Balloon::new(all_features(), mem.clone(), MEM, mm.clone()).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
        ));
        let queues = QUEUE_GPA
            .iter()
            .map(|&gpa| MockSplitQueue::create(leaked, GuestAddress(gpa), size))
            .collect();
        Rig { mem, balloon, mm, irq, queues }
    }

    fn rig() -> Rig {
        rig_with_queue_size(16)
    }

    impl Rig {
        fn activate(&mut self, features: u64) {
            let n = Balloon::roles(features).len();
            let queues =
                self.queues[..n].iter().map(|q| q.create_queue::<Queue>().unwrap()).collect();
            let interrupt = self.irq.clone();
            let a =
                Activation { mem: self.mem.clone(), queues, acked_features: features, interrupt };
            self.balloon.activate(a).unwrap();
        }

        fn used_idx(&self, i: usize) -> u16 {
            self.queues[i].used().idx().load()
        }

        fn write_pfns(&self, pfns: &[u32]) -> u32 {
            let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.mem.write_slice(&bytes, GuestAddress(BUF_GPA)).unwrap();
            u32::try_from(bytes.len()).unwrap()
        }

        /// Writes the first byte of a page. The table is `mm`'s: the page stays Untouched
        /// there (these queues run without the fault handler).
        fn fill_page(&self, guest_pfn: u32) {
            self.mem.write_obj(0xabu8, GuestAddress(u64::from(guest_pfn) << 12)).unwrap();
        }

        fn state(&self, guest_pfn: u32) -> Option<PageState> {
            self.mm.table().unwrap().get(u64::from(guest_pfn))
        }

        fn byte(&self, guest_pfn: u32) -> u8 {
            self.mem.read_obj(GuestAddress(u64::from(guest_pfn) << 12)).unwrap()
        }

        fn stats_buffer(&self, entries: &[(u16, u64)]) -> u32 {
            let bytes: Vec<u8> = entries
                .iter()
                .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
                .collect();
            self.mem.write_slice(&bytes, GuestAddress(BUF_GPA)).unwrap();
            u32::try_from(bytes.len()).unwrap()
        }
    }

    #[test]
    fn inflate_releases_pages_and_marks_them_ballooned() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        r.fill_page(0x100);
        let len = r.write_pfns(&[0x100, 0x101]);
        r.queues[0].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(0);
        assert_eq!(r.byte(0x100), 0, "a released page reads zero");
        assert_eq!(r.state(0x100), Some(PageState::Ballooned));
        assert_eq!(r.balloon.metrics().inflated_pages.load(Ordering::Relaxed), 2);
        assert_eq!(r.used_idx(0), 1);
        assert_eq!(r.irq.status() & irq::USED_BUFFER, irq::USED_BUFFER);
    }

    #[test]
    fn pfns_are_sorted_deduplicated_and_merged_into_runs() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        let beyond = u32::try_from(MEM >> 12).unwrap();
        let len = r.write_pfns(&[0x103, 0x101, 0x102, 0x101, beyond, 0x200, 0x100]);
        let runs = r.balloon.pfn_runs(&[Desc { addr: BUF_GPA, len, write_only: false }], "test");
        assert_eq!(runs, vec![(0x10_0000, 4), (0x20_0000, 1)]);
        assert_eq!(r.balloon.metrics().bad_pfns.get(), 1);
    }

    #[test]
    fn inflating_the_same_pfn_twice_keeps_one_ballooned_page() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        let len = r.write_pfns(&[0x100, 0x100]);
        r.queues[0].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(0);
        r.queues[0].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(0);
        let t = r.mm.table().unwrap();
        assert_eq!(t.count(PageState::Ballooned), 1);
        assert_eq!(r.state(0x100), Some(PageState::Ballooned));
    }

    #[test]
    fn a_chain_carries_no_more_pfns_than_the_linux_driver_sends() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        let pfns: Vec<u32> = (0x100..0x100 + 300).collect();
        let len = r.write_pfns(&pfns);
        // One descriptor of 300 PFNs: refused whole. Then 256 + 44 in two descriptors:
        // the first is taken, the second refused.
        r.queues[0].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(0);
        assert_eq!(r.balloon.metrics().inflated_pages.load(Ordering::Relaxed), 0);
        r.queues[0]
            .build_desc_chain(&[desc(BUF_GPA, 1024, 0, 0), desc(BUF_GPA + 1024, len - 1024, 0, 0)])
            .unwrap();
        r.balloon.process_queue(0);
        assert_eq!(r.balloon.metrics().inflated_pages.load(Ordering::Relaxed), 256);
        assert_eq!(r.balloon.metrics().bad_descriptors.get(), 2);
    }

    #[test]
    fn a_full_queue_is_served_in_turns() {
        let mut r = rig_with_queue_size(256);
        r.activate(BASE_FEATURES);
        let len = r.write_pfns(&[0x100]);
        let chains = CHAINS_PER_TURN + 8;
        for i in 0..chains {
            let i = u16::try_from(i).unwrap();
            r.queues[0].add_desc_chains(&[desc(BUF_GPA, len, 0, 0)], i).unwrap();
        }
        assert!(r.balloon.process_queue(0), "more is waiting after one turn");
        assert_eq!(usize::from(r.used_idx(0)), CHAINS_PER_TURN);
        assert!(!r.balloon.process_queue(0), "the rest fits in the next turn");
        assert_eq!(usize::from(r.used_idx(0)), chains);
    }

    #[test]
    fn a_broken_available_index_is_counted_not_logged_each_time() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        // The driver claims 1000 buffers in a queue of 16.
        r.queues[0].avail().idx().store(1000);
        for _ in 0..100 {
            assert!(!r.balloon.process_queue(0));
        }
        assert_eq!(r.balloon.metrics().bad_descriptors.get(), 100);
        assert_eq!(r.used_idx(0), 0);
    }

    #[test]
    fn inflate_with_out_of_range_pfn_is_ignored() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        let beyond = u32::try_from(MEM >> 12).unwrap();
        let len = r.write_pfns(&[beyond, u32::MAX, 0x102]);
        r.queues[0].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(0);
        assert_eq!(r.balloon.metrics().bad_pfns.get(), 2);
        assert_eq!(r.balloon.metrics().inflated_pages.load(Ordering::Relaxed), 1);
        assert_eq!(r.used_idx(0), 1, "the buffer is still returned");
    }

    #[test]
    fn write_only_descriptor_where_a_read_only_one_belongs_is_ignored() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        r.fill_page(0x100);
        let len = r.write_pfns(&[0x100]);
        r.queues[0].build_desc_chain(&[desc(BUF_GPA, len, WRITE, 0)]).unwrap();
        r.balloon.process_queue(0);
        assert_eq!(r.balloon.metrics().bad_descriptors.get(), 1);
        assert_eq!(r.state(0x100), Some(PageState::Untouched));
        assert_eq!(r.byte(0x100), 0xab);
    }

    #[test]
    fn lengths_that_overflow_or_do_not_fit_are_ignored() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        let q = &r.queues[0];
        // addr + len wraps around; a length not a multiple of 4; a huge length.
        q.add_desc_chains(&[desc(u64::MAX - 3, 8, 0, 0)], 0).unwrap();
        q.add_desc_chains(&[desc(BUF_GPA, 6, 0, 0)], 1).unwrap();
        q.add_desc_chains(&[desc(BUF_GPA, u32::MAX - 3, 0, 0)], 2).unwrap();
        r.balloon.process_queue(0);
        assert_eq!(r.balloon.metrics().bad_descriptors.get(), 3);
        assert_eq!(r.balloon.metrics().inflated_pages.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_looping_descriptor_chain_is_refused() {
        // Queue size 256: virtio-queue stops a chain after 256 descriptors, ebb after 64.
        let mut r = rig_with_queue_size(256);
        r.activate(BASE_FEATURES);
        let len = r.write_pfns(&[0x100]);
        let next = VRING_DESC_F_NEXT as u16;
        // 0 -> 1 -> 0 -> ...
        r.queues[0]
            .add_desc_chains(&[desc(BUF_GPA, len, next, 1), desc(BUF_GPA, len, next, 0)], 0)
            .unwrap();
        r.balloon.process_queue(0);
        assert_eq!(r.balloon.metrics().bad_descriptors.get(), 1);
        assert_eq!(r.balloon.metrics().inflated_pages.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn deflate_makes_ballooned_pages_usable_again() {
        let mut r = rig();
        r.activate(BASE_FEATURES);
        let len = r.write_pfns(&[0x100]);
        r.queues[0].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(0);
        r.queues[1].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(1);
        assert_eq!(r.state(0x100), Some(PageState::Untouched));
        assert_eq!(r.balloon.metrics().deflated_pages.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn stats_are_parsed_held_and_returned_on_request() {
        let mut r = rig();
        r.activate(BASE_FEATURES | STATS);
        let len = r.stats_buffer(&[(4, 1000), (5, 2000)]);
        r.queues[2].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(2);
        assert_eq!(r.balloon.guest_stats().values, vec![(4, 1000), (5, 2000)]);
        assert_eq!(r.used_idx(2), 0, "held until the next poll");
        r.balloon.request_stats();
        assert_eq!(r.used_idx(2), 1);
    }

    #[test]
    fn a_statistics_chain_longer_than_4_kib_is_ignored() {
        let mut r = rig_with_queue_size(256);
        r.activate(BASE_FEATURES | STATS);
        let len = r.stats_buffer(&[(4, 1000)]);
        let d =
            |i: u64| desc(BUF_GPA, 4090, VRING_DESC_F_NEXT as u16, u16::try_from(i + 1).unwrap());
        let chain: Vec<_> = (0..3).map(d).chain([desc(BUF_GPA, len, 0, 0)]).collect();
        r.queues[2].add_desc_chains(&chain, 0).unwrap();
        r.balloon.process_queue(2);
        assert_eq!(r.balloon.metrics().bad_stats.get(), 1);
        assert!(r.balloon.guest_stats().values.is_empty());
    }

    #[test]
    fn a_stats_buffer_of_the_wrong_size_is_ignored() {
        let mut r = rig();
        r.activate(BASE_FEATURES | STATS);
        r.stats_buffer(&[(4, 1000), (5, 2000)]);
        r.queues[2].build_desc_chain(&[desc(BUF_GPA, 15, 0, 0)]).unwrap();
        r.balloon.process_queue(2);
        assert_eq!(r.balloon.metrics().bad_stats.get(), 1);
        assert!(r.balloon.guest_stats().values.is_empty());
    }

    #[test]
    fn notifications_before_the_driver_is_ready_are_counted_and_picked_up_at_activation() {
        let mut r = rig();
        let len = r.stats_buffer(&[(4, 7)]);
        r.queues[2].build_desc_chain(&[desc(BUF_GPA, len, 0, 0)]).unwrap();
        r.balloon.process_queue(2);
        assert_eq!(r.balloon.metrics().early_notifies.load(Ordering::Relaxed), 1);
        assert!(r.balloon.guest_stats().values.is_empty());
        r.activate(BASE_FEATURES | STATS);
        assert_eq!(r.balloon.guest_stats().values, vec![(4, 7)]);
        r.balloon.process_queue(9);
        assert_eq!(r.balloon.metrics().bad_notifies.get(), 1, "a queue that does not exist");
    }

    #[test]
    fn free_page_reports_release_writable_page_aligned_ranges_only() {
        let mut r = rig();
        r.activate(BASE_FEATURES | STATS | REPORTING);
        r.fill_page(0x200);
        let q = &r.queues[3];
        q.build_desc_chain(&[desc(0x200 << 12, 8192, WRITE, 0)]).unwrap();
        r.balloon.process_queue(3);
        assert_eq!(r.balloon.metrics().reported_pages.load(Ordering::Relaxed), 2);
        assert_eq!(r.state(0x200), Some(PageState::Untouched));
        assert_eq!(r.byte(0x200), 0);
        // Read-only, unaligned, beyond RAM, and larger than a free block: all refused.
        q.add_desc_chains(&[desc(0x300 << 12, 4096, 0, 0)], 1).unwrap();
        q.add_desc_chains(&[desc((0x300 << 12) + 8, 4096, WRITE, 0)], 2).unwrap();
        q.add_desc_chains(&[desc(MEM - 4096, 8192, WRITE, 0)], 3).unwrap();
        q.add_desc_chains(&[desc(0, MAX_REPORT_BYTES + 4096, WRITE, 0)], 4).unwrap();
        r.balloon.process_queue(3);
        assert_eq!(r.balloon.metrics().bad_descriptors.get(), 3);
        assert_eq!(r.balloon.metrics().bad_pfns.get(), 1);
        assert_eq!(r.balloon.metrics().reported_pages.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn reports_are_kept_when_free_pages_hold_a_poison_value() {
        let mut r = rig();
        r.activate(BASE_FEATURES | REPORTING | (1 << F_PAGE_POISON));
        r.balloon.write_config(config::POISON_VAL, &0xaaaa_aaaau32.to_le_bytes());
        r.fill_page(0x200);
        r.queues[2].build_desc_chain(&[desc(0x200 << 12, 4096, WRITE, 0)]).unwrap();
        r.balloon.process_queue(2);
        assert_eq!(r.byte(0x200), 0xab, "not released: it must keep the guest's poison");
        assert_eq!(r.balloon.metrics().reports_kept.load(Ordering::Relaxed), 1);
        assert_eq!(r.used_idx(2), 1, "the report is still acknowledged");
    }

    #[test]
    fn queue_numbering_skips_absent_optional_queues_like_linux() {
        use QueueRole::*;
        assert_eq!(Balloon::roles(0), vec![Inflate, Deflate]);
        assert_eq!(Balloon::roles(REPORTING), vec![Inflate, Deflate, Reporting]);
        assert_eq!(Balloon::roles(STATS | REPORTING), vec![Inflate, Deflate, Stats, Reporting]);
    }

    #[test]
    fn config_space_shows_target_and_takes_actual_only() {
        let mut r = rig();
        r.balloon.set_target_mib(8).unwrap();
        let mut b = [0u8; 4];
        r.balloon.read_config(config::NUM_PAGES, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2048);
        r.balloon.write_config(config::ACTUAL, &1024u32.to_le_bytes());
        assert_eq!(r.balloon.actual_mib(), 4);
        r.balloon.write_config(config::NUM_PAGES, &1u32.to_le_bytes());
        r.balloon.write_config(config::ACTUAL, &[1, 2]);
        assert_eq!(r.balloon.metrics().bad_config_writes.get(), 2);
        assert_eq!(r.balloon.target_mib(), 8);
        let mut past = [0xffu8; 4];
        r.balloon.read_config(config::SIZE, &mut past);
        assert_eq!(past, [0; 4], "reads past the config space see zeros");
        assert!(r.balloon.set_target_mib(17).is_err(), "more than guest RAM");
    }

    #[test]
    fn activation_without_ready_queues_fails() {
        let mut r = rig();
        let a = Activation {
            mem: r.mem.clone(),
            queues: vec![],
            acked_features: BASE_FEATURES,
            interrupt: r.irq.clone(),
        };
        assert!(r.balloon.activate(a).is_err());
    }
}
