//! The balloon's state and queue processing. Plain logic over guest memory: the event loop
//! (`event_handler.rs`) and the API only call in.
//!
//! Every PFN, address, length and descriptor flag comes from the guest and is checked before
//! use; a bad one is counted (and logged once) and skipped, never trusted.

use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::metrics::BalloonMetrics;
use super::{
    config, BalloonError, F_DEFLATE_ON_OOM, F_PAGE_POISON, F_REPORTING, F_STATS_VQ,
    MAX_CHAIN_DESCRIPTORS, PFN_SHIFT, QUEUE_SIZE, STAT_ENTRY_BYTES, VIRTIO_ID_BALLOON,
};
use crate::devices::virtio::{irq, Activation, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::mm::layout::{RamMap, PAGE};
use crate::mm::state::{PageState, PageTable};

/// Most bytes of PFNs one descriptor may carry (Linux sends at most 256 PFNs = 1 KiB).
const MAX_PFN_BYTES: u32 = 64 * 1024;
/// Most bytes of one statistics descriptor (Linux sends 10 entries of 10 bytes).
const MAX_STATS_DESC_BYTES: u32 = 4096;

/// The balloon as the user configures it (`--balloon ...`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial balloon size in MiB.
    pub target_mib: u64,
    /// Statistics polling interval in seconds; 0 turns the statistics queue off.
    pub stats_interval_s: u64,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer `VIRTIO_BALLOON_F_REPORTING`.
    pub free_page_reporting: bool,
}

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

struct Running {
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<(QueueRole, Queue)>,
    interrupt: Arc<VirtioInterrupt>,
}

/// The virtio-balloon device.
pub struct Balloon {
    config: BalloonConfig,
    mem: Arc<GuestMemoryMmap>,
    mem_bytes: u64,
    pages: Option<(RamMap, Arc<PageTable>)>,
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
    /// A balloon for `mem` (`mem_bytes` of guest RAM); `pages` is the lazy-RAM engine's view,
    /// absent with `--no-uffd`.
    pub fn new(
        config: BalloonConfig,
        mem: Arc<GuestMemoryMmap>,
        mem_bytes: u64,
        pages: Option<(RamMap, Arc<PageTable>)>,
    ) -> Result<Self, BalloonError> {
        let slots =
            2 + usize::from(config.stats_interval_s > 0) + usize::from(config.free_page_reporting);
        let mut balloon = Self {
            config,
            mem,
            mem_bytes,
            pages,
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

    /// Gives the balloon the lazy-RAM engine's page table (the engine starts after devices).
    pub fn attach_pages(&mut self, map: RamMap, table: Arc<PageTable>) {
        self.pages = Some((map, table));
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    /// Sets the balloon size the guest should reach, and tells the driver.
    pub fn set_target_mib(&mut self, target_mib: u64) -> Result<(), BalloonError> {
        let mem_mib = self.mem_bytes >> 20;
        let pages =
            target_mib.checked_mul(1 << (20 - PFN_SHIFT)).and_then(|p| u32::try_from(p).ok());
        let pages = match pages {
            Some(p) if target_mib <= mem_mib => p,
            _ => return Err(BalloonError::TargetTooLarge { target_mib, mem_mib }),
        };
        self.num_pages = pages;
        if let Some(r) = &self.running {
            if let Err(e) = r.interrupt.signal(irq::CONFIG_CHANGE) {
                log::warn!("virtio-balloon: {e}");
            }
        }
        Ok(())
    }

    /// The target in MiB (`num_pages`).
    pub fn target_mib(&self) -> u64 {
        u64::from(self.num_pages) >> (20 - PFN_SHIFT)
    }

    /// The balloon size the driver reports (`actual`), in MiB.
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.actual) >> (20 - PFN_SHIFT)
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

    /// Processes what the driver queued on queue `index`.
    pub fn process_queue(&mut self, index: usize) {
        let Some(running) = self.running.as_mut() else {
            // Linux primes the statistics queue and kicks it before DRIVER_OK (init_vqs);
            // the buffer is picked up at activation. Counted, not trusted.
            self.metrics.early_notifies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let Some((role, _)) = running.queues.get(index) else {
            self.metrics
                .bad_notifies
                .hit(|| format!("notification for queue {index}, which does not exist"));
            return;
        };
        let role = *role;
        let chains = pop_chains(running, index);
        let mut used = Vec::new();
        for (head, descs) in chains {
            let Some(descs) = descs else {
                self.metrics.bad_descriptors.hit(|| {
                    format!(
                        "descriptor chain {head} longer than {MAX_CHAIN_DESCRIPTORS} (or looping)"
                    )
                });
                used.push((head, 0));
                continue;
            };
            let used_len = match role {
                QueueRole::Inflate => self.inflate(&descs),
                QueueRole::Deflate => self.deflate(&descs),
                QueueRole::Stats => {
                    self.receive_stats(head, &descs);
                    continue; // held until the next polling tick
                }
                QueueRole::Reporting => self.report(&descs),
            };
            used.push((head, used_len));
        }
        self.return_used(index, &used);
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
    fn read_pfns(&self, descs: &[Desc]) -> Vec<u32> {
        let mut pfns = Vec::new();
        for d in descs {
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

    /// The host address of guest page `pfn`, if it is guest RAM.
    fn page_hva(&self, pfn: u32) -> Option<u64> {
        let gpa = u64::from(pfn) << PFN_SHIFT;
        let ptr = self.mem.get_host_address(GuestAddress(gpa)).ok()?;
        // The whole page must be RAM (regions are page-aligned, so this holds if the last byte is).
        self.mem.get_host_address(GuestAddress(gpa + PAGE - 1)).ok()?;
        Some(ptr as u64)
    }

    /// The host address and engine page number (if the engine runs) of every valid PFN in
    /// the chain; invalid ones are counted and skipped.
    fn valid_pages(&self, descs: &[Desc], what: &str) -> Vec<(u64, Option<u64>)> {
        let mut pages = Vec::new();
        for pfn in self.read_pfns(descs) {
            let Some(hva) = self.page_hva(pfn) else {
                self.metrics.bad_pfns.hit(|| format!("{what} PFN {pfn:#x} outside guest RAM"));
                continue;
            };
            pages.push((hva, self.pages.as_ref().and_then(|(map, _)| map.pfn_of(hva))));
        }
        pages
    }

    fn table(&self) -> Option<&PageTable> {
        self.pages.as_ref().map(|(_, t)| &**t)
    }

    fn inflate(&mut self, descs: &[Desc]) -> u32 {
        let mut released = 0;
        for (hva, pfn) in self.valid_pages(descs, "inflate") {
            // Marked first: the fault handler sees the remove event and keeps the page
            // Ballooned rather than Untouched.
            if let (Some(table), Some(p)) = (self.table(), pfn) {
                table.set(p, PageState::Ballooned);
            }
            if release(hva, PAGE) {
                released += 1;
            } else {
                self.metrics.madvise_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.metrics.inflated_pages.fetch_add(released, std::sync::atomic::Ordering::Relaxed);
        0
    }

    fn deflate(&mut self, descs: &[Desc]) -> u32 {
        let pages = self.valid_pages(descs, "deflate");
        for &(_, pfn) in &pages {
            if let (Some(table), Some(p)) = (self.table(), pfn) {
                // Still unbacked: the next touch faults and gets a zero page.
                let _ = table.transition(p, PageState::Ballooned, PageState::Untouched);
            }
        }
        self.metrics
            .deflated_pages
            .fetch_add(pages.len() as u64, std::sync::atomic::Ordering::Relaxed);
        0
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
        self.metrics.stats_updates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn report(&mut self, descs: &[Desc]) -> u32 {
        // Released pages read back as zeros: only right if freed pages hold zeros. With a
        // non-zero poison value the guest expects the poison, so the pages are kept.
        if self.acked_features & (1 << F_PAGE_POISON) != 0 && self.poison_val != 0 {
            self.metrics.reports_kept.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return 0;
        }
        let mut pages = 0;
        for d in descs {
            // Reports are device-writable buffers (virtqueue_add_inbuf in page_reporting).
            let aligned = d.addr % PAGE == 0 && u64::from(d.len) % PAGE == 0 && d.len > 0;
            if !d.write_only || !aligned {
                self.metrics
                    .bad_descriptors
                    .hit(|| format!("report descriptor at {:#x} len {}", d.addr, d.len));
                continue;
            }
            let Some(hva) = self.range_hva(d.addr, u64::from(d.len)) else {
                self.metrics
                    .bad_pfns
                    .hit(|| format!("reported range {:#x}+{} outside guest RAM", d.addr, d.len));
                continue;
            };
            // Free pages the guest may reuse at any time: released, not Ballooned. The table is
            // updated here rather than left to the remove event, which this host's kernel
            // does not always deliver while vCPUs fault concurrently.
            if release(hva, u64::from(d.len)) {
                let n = u64::from(d.len) / PAGE;
                self.mark_untouched(hva, n);
                pages += n;
            }
        }
        self.metrics.reported_pages.fetch_add(pages, std::sync::atomic::Ordering::Relaxed);
        0
    }

    /// Marks `n` released pages from `hva` as Untouched (Ballooned ones stay Ballooned).
    fn mark_untouched(&self, hva: u64, n: u64) {
        let Some((map, table)) = &self.pages else { return };
        for i in 0..n {
            if let Some(p) = map.pfn_of(hva + i * PAGE) {
                if table.get(p) != Some(PageState::Ballooned) {
                    table.set(p, PageState::Untouched);
                }
            }
        }
    }

    /// The host address of `[gpa, gpa + len)` if it lies inside one RAM region.
    fn range_hva(&self, gpa: u64, len: u64) -> Option<u64> {
        let last = gpa.checked_add(len)?.checked_sub(1)?;
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let end = region.start_addr().0.checked_add(region.len())?;
        (last < end).then_some(())?;
        self.mem.get_host_address(GuestAddress(gpa)).ok().map(|p| p as u64)
    }
}

/// Releases host memory behind `[hva, hva + len)`; true on success.
fn release(hva: u64, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else { return false };
    // SAFETY: the range was checked to lie inside guest RAM, which ebb maps privately and
    // anonymously: MADV_DONTNEED only drops its contents (reads see zeros afterwards).
    unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0 }
}

/// One descriptor, copied out of the guest's table.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    write_only: bool,
}

/// Pops every available chain of queue `index` with its descriptors (at most
/// `MAX_CHAIN_DESCRIPTORS`; longer or looping chains come back empty and are counted).
fn pop_chains(running: &mut Running, index: usize) -> Vec<(u16, Option<Vec<Desc>>)> {
    let mem = running.mem.clone();
    let Some((_, queue)) = running.queues.get_mut(index) else { return Vec::new() };
    let mut out = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
        out.push((chain.head_index(), descriptors(chain)));
    }
    out
}

/// The descriptors of a chain, or None if it is longer than `MAX_CHAIN_DESCRIPTORS` (a loop
/// ends the same way: virtio-queue stops a chain after queue-size descriptors).
fn descriptors<M>(chain: DescriptorChain<M>) -> Option<Vec<Desc>>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() == MAX_CHAIN_DESCRIPTORS {
            return None;
        }
        descs.push(Desc { addr: d.addr().0, len: d.len(), write_only: d.is_write_only() });
    }
    Some(descs)
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
        let err = |reason: String| VirtioError::Activate { device_type: VIRTIO_ID_BALLOON, reason };
        if activation.queues.len() < roles.len() {
            return Err(err(format!(
                "{} queues for {} roles",
                activation.queues.len(),
                roles.len()
            )));
        }
        let queues: Vec<(QueueRole, Queue)> = roles.into_iter().zip(activation.queues).collect();
        if let Some((role, _)) = queues.iter().find(|(_, q)| !q.ready()) {
            return Err(err(format!("the {role:?} queue is not ready")));
        }
        self.acked_features = activation.acked_features;
        let n = queues.len();
        self.running =
            Some(Running { mem: activation.mem, queues, interrupt: activation.interrupt });
        log::info!("virtio-balloon: driver ready, features {:#x}", self.acked_features);
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
    use std::sync::atomic::Ordering;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
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
        table: Arc<PageTable>,
        map: RamMap,
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
        let map = RamMap::new(&[crate::vstate::memory::RamRegion { gpa: 0, hva, len: MEM }]);
        let table = Arc::new(PageTable::new(map.pages()));
        let pages = Some((map.clone(), table.clone()));
        let balloon = Balloon::new(all_features(), mem.clone(), MEM, pages).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let queues = QUEUE_GPA
            .iter()
            .map(|&gpa| MockSplitQueue::create(leaked, GuestAddress(gpa), size))
            .collect();
        Rig { mem, balloon, table, map, irq, queues }
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

        fn pfn(&self, guest_pfn: u32) -> u64 {
            let gpa = GuestAddress(u64::from(guest_pfn) << 12);
            self.map.pfn_of(self.mem.get_host_address(gpa).unwrap() as u64).unwrap()
        }

        fn fill_page(&self, guest_pfn: u32) {
            self.table.set(self.pfn(guest_pfn), PageState::Resident);
            self.mem.write_obj(0xabu8, GuestAddress(u64::from(guest_pfn) << 12)).unwrap();
        }

        fn state(&self, guest_pfn: u32) -> Option<PageState> {
            self.table.get(self.pfn(guest_pfn))
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
        assert_eq!(r.state(0x100), Some(PageState::Resident));
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
        // Read-only, unaligned, and beyond RAM: all refused.
        q.add_desc_chains(&[desc(0x300 << 12, 4096, 0, 0)], 1).unwrap();
        q.add_desc_chains(&[desc((0x300 << 12) + 8, 4096, WRITE, 0)], 2).unwrap();
        q.add_desc_chains(&[desc(MEM - 4096, 8192, WRITE, 0)], 3).unwrap();
        r.balloon.process_queue(3);
        assert_eq!(r.balloon.metrics().bad_descriptors.get(), 2);
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
