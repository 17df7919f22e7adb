//! The virtio-blk device: configuration space, features, and its one queue served in bounded
//! turns. Plain logic over guest memory and a [`Disk`]: the event loop only calls in.
//!
//! Each chain is copied out of the guest's table, checked whole by [`request::parse`], and
//! only then moves bytes: guest buffers into a scratch buffer and to the disk, or the disk
//! into the scratch buffer and to the guest. A request refused or failed gets its status
//! byte; one without a usable status descriptor is returned with nothing written.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::metrics::BlockMetrics;
use super::request::{self, Desc, Fault, Geometry, Kind, Refused, Request};
use super::{
    config, req_status, Disk, F_FLUSH, F_RO, F_SEG_MAX, F_SIZE_MAX, ID_BYTES,
    MAX_CHAIN_DESCRIPTORS, QUEUE_SIZE, SEG_MAX, SIZE_MAX, VIRTIO_ID_BLOCK,
};
use crate::devices::virtio::{
    chain_descriptors, irq, ActivateError, Activation, VirtioDevice, VirtioError, VirtioInterrupt,
};

/// Chains served per event before other events get their turn (each at most
/// `MAX_REQUEST_BYTES`: a turn moves at most 128 MiB).
pub const CHAINS_PER_TURN: usize = 32;

#[derive(Debug)]
struct Running {
    mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    queue_sizes: [u16; 1],
    running: Option<Running>,
    /// Guest data on its way to or from the disk (at most `MAX_REQUEST_BYTES`).
    scratch: Vec<u8>,
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// A device serving `disk`.
    pub fn new(disk: Disk) -> Self {
        Self {
            disk,
            queue_sizes: [QUEUE_SIZE],
            running: None,
            scratch: Vec::new(),
            metrics: Arc::new(BlockMetrics::default()),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Serves a turn's worth of queue `index`: at most [`CHAINS_PER_TURN`] chains. Returns
    /// true if more is waiting, so that the event loop comes back after its other events.
    pub fn process_queue(&mut self, index: usize) -> bool {
        let Some(running) = self.running.as_ref() else {
            self.metrics.early_notifies.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if index != 0 {
            self.metrics
                .bad_notifies
                .hit(|| format!("notification for queue {index}, which does not exist"));
            return false;
        }
        let mem = running.mem.clone();
        let mut used = Vec::new();
        let mut more = true;
        for _ in 0..CHAINS_PER_TURN {
            let Some((head, descs)) = self.pop_chain(&mem) else {
                more = false;
                break;
            };
            let len = match descs {
                Some(descs) => self.serve(&mem, &descs),
                None => {
                    self.metrics.bad_descriptors.hit(|| {
                        format!("chain {head} longer than {MAX_CHAIN_DESCRIPTORS} (or looping)")
                    });
                    0
                }
            };
            used.push((head, len));
        }
        self.return_used(&mem, &used);
        more && self.has_chains(&mem)
    }

    /// The next chain with its descriptors (None inside when too long or looping), or None
    /// when the queue is empty or its available ring is broken (counted).
    fn pop_chain(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, Option<Vec<Desc>>)> {
        let running = self.running.as_mut()?;
        match running.queue.iter(mem) {
            Ok(mut iter) => iter
                .next()
                .map(|chain| (chain.head_index(), chain_descriptors(chain, MAX_CHAIN_DESCRIPTORS))),
            Err(e) => {
                self.metrics.bad_descriptors.hit(|| format!("virtio-blk queue: {e}"));
                None
            }
        }
    }

    fn has_chains(&self, mem: &GuestMemoryMmap) -> bool {
        let Some(running) = self.running.as_ref() else { return false };
        let queue = &running.queue;
        queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    fn return_used(&mut self, mem: &GuestMemoryMmap, used: &[(u16, u32)]) {
        let Some(running) = self.running.as_mut() else { return };
        if used.is_empty() {
            return;
        }
        for &(head, len) in used {
            if let Err(e) = running.queue.add_used(mem, head, len) {
                self.metrics.bad_descriptors.hit(|| format!("cannot return buffer {head}: {e:?}"));
            }
        }
        if let Err(e) = running.interrupt.signal(irq::USED_BUFFER) {
            log::warn!("virtio-blk: {e}");
        }
    }

    /// Serves one chain; returns the bytes written into guest buffers (the used length).
    fn serve(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u32 {
        let header = descs.first().and_then(|d| {
            let mut h = [0u8; 16];
            mem.read_slice(&mut h, GuestAddress(d.addr)).ok().map(|()| h)
        });
        let geometry = Geometry {
            capacity_sectors: self.disk.capacity_sectors(),
            read_only: self.disk.read_only(),
        };
        let (status_desc, status, written) = match request::parse(descs, header, geometry) {
            Ok(req) => {
                let (status, written) = self.execute(mem, &req);
                (req.status, status, written)
            }
            Err(refused) => {
                self.count(refused);
                let Some(status_desc) = refused.status else { return 0 };
                (status_desc, refused.status_byte(), 0)
            }
        };
        if mem.write_obj(status, GuestAddress(status_desc.addr)).is_err() {
            self.metrics
                .bad_descriptors
                .hit(|| format!("status byte at {:#x} outside guest RAM", status_desc.addr));
            return written;
        }
        written.saturating_add(1)
    }

    fn count(&self, refused: Refused) {
        let m = &self.metrics;
        match refused.fault {
            Fault::Framing(why) => m.bad_descriptors.hit(|| format!("virtio-blk request: {why}")),
            Fault::Direction => {
                m.bad_descriptors.hit(|| "virtio-blk data descriptor of the wrong direction".into())
            }
            Fault::Unaligned(len) => {
                m.bad_sectors.hit(|| format!("virtio-blk data of {len} bytes, not whole sectors"))
            }
            Fault::OutOfRange { sector, sectors } => m.bad_sectors.hit(|| {
                format!(
                    "virtio-blk sectors {sector}+{sectors} beyond the disk's {}",
                    self.disk.capacity_sectors()
                )
            }),
            Fault::ReadOnly => m.read_only_writes.hit(|| "write to a read-only disk".into()),
            Fault::Unsupported(t) => m.unsupported.hit(|| format!("virtio-blk request type {t}")),
        }
    }

    /// Runs a checked request; returns its status and the bytes written into the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        let m = self.metrics.clone();
        let len = req.data_bytes as usize;
        let result = match req.kind {
            Kind::Read => self.read(mem, req).map(|()| {
                m.reads.fetch_add(1, Ordering::Relaxed);
                m.read_bytes.fetch_add(u64::from(req.data_bytes), Ordering::Relaxed);
                req.data_bytes
            }),
            Kind::Write => self.write(mem, req).map(|()| {
                m.writes.fetch_add(1, Ordering::Relaxed);
                m.write_bytes.fetch_add(u64::from(req.data_bytes), Ordering::Relaxed);
                0
            }),
            Kind::Flush => match self.disk.flush() {
                Ok(()) => {
                    m.flushes.fetch_add(1, Ordering::Relaxed);
                    Ok(0)
                }
                Err(e) => Err(self.io_error("flush", &e)),
            },
            Kind::GetId => {
                let id = self.disk.id();
                let n = len.min(ID_BYTES);
                self.scratch.clear();
                self.scratch.extend_from_slice(&id[..n]);
                self.to_guest(mem, &req.data, n).map(|()| {
                    m.get_ids.fetch_add(1, Ordering::Relaxed);
                    u32::try_from(n).unwrap_or(0)
                })
            }
        };
        match result {
            Ok(written) => (req_status::OK, written),
            Err(Failed) => (req_status::IOERR, 0),
        }
    }

    fn read(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<(), Failed> {
        let len = req.data_bytes as usize;
        self.scratch.resize(len, 0);
        if let Err(e) = self.disk.read_at(req.offset, &mut self.scratch[..len]) {
            return Err(self.io_error("read", &e));
        }
        self.to_guest(mem, &req.data, len)
    }

    fn write(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<(), Failed> {
        let len = req.data_bytes as usize;
        self.scratch.resize(len, 0);
        let mut pos = 0;
        for d in &req.data {
            let end = pos + d.len as usize;
            if mem.read_slice(&mut self.scratch[pos..end], GuestAddress(d.addr)).is_err() {
                return Err(self.outside_ram(d));
            }
            pos = end;
        }
        if let Err(e) = self.disk.write_at(req.offset, &self.scratch[..len]) {
            return Err(self.io_error("write", &e));
        }
        Ok(())
    }

    /// Copies the first `len` bytes of the scratch buffer into the data descriptors.
    fn to_guest(&self, mem: &GuestMemoryMmap, data: &[Desc], len: usize) -> Result<(), Failed> {
        let mut pos = 0;
        for d in data {
            if pos == len {
                break;
            }
            let end = (pos + d.len as usize).min(len);
            if mem.write_slice(&self.scratch[pos..end], GuestAddress(d.addr)).is_err() {
                return Err(self.outside_ram(d));
            }
            pos = end;
        }
        Ok(())
    }

    fn outside_ram(&self, d: &Desc) -> Failed {
        self.metrics
            .bad_descriptors
            .hit(|| format!("virtio-blk buffer {:#x}+{} outside guest RAM", d.addr, d.len));
        Failed
    }

    fn io_error(&self, what: &str, e: &std::io::Error) -> Failed {
        // The host's errors, not the guest's: the first ten are logged (the guest sees IOERR).
        if self.metrics.io_errors.fetch_add(1, Ordering::Relaxed) < 10 {
            log::warn!("disk {}: {what} failed: {e}", self.disk.path().display());
        }
        Failed
    }
}

/// A request that failed, already counted and logged: the guest gets `IOERR`.
#[derive(Debug)]
struct Failed;

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.disk.read_only() { 1 << F_RO } else { 0 };
        (1 << F_FLUSH) | (1 << F_SEG_MAX) | (1 << F_SIZE_MAX) | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; config::SIZE];
        space[config::CAPACITY..config::CAPACITY + 8]
            .copy_from_slice(&self.disk.capacity_sectors().to_le_bytes());
        space[config::SIZE_MAX..config::SIZE_MAX + 4].copy_from_slice(&SIZE_MAX.to_le_bytes());
        space[config::SEG_MAX..config::SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        data.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = space.get(start..).and_then(|s| s.get(..data.len())) {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.metrics
            .bad_config_writes
            .hit(|| format!("virtio-blk config write at {offset} of {} bytes", data.len()));
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        let err = |reason| VirtioError::Activate { device_type: VIRTIO_ID_BLOCK, reason };
        let Some(queue) = activation.queues.into_iter().next() else {
            return Err(err(ActivateError::TooFewQueues { queues: 0, needed: 1 }));
        };
        if !queue.ready() {
            return Err(err(ActivateError::QueueNotReady { index: 0 }));
        }
        let (mem, interrupt) = (activation.mem, activation.interrupt);
        self.running = Some(Running { mem, queue, interrupt });
        let first = self.metrics.activations.fetch_add(1, Ordering::Relaxed) == 0;
        let msg = format!(
            "virtio-blk {}: driver ready, features {:#x}",
            self.disk.path().display(),
            activation.acked_features
        );
        if first {
            log::info!("{msg}");
        } else {
            log::debug!("{msg}");
        }
        // Requests queued before DRIVER_OK, if any.
        self.process_queue(0);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        self.process_queue(usize::from(index));
    }

    fn reset(&mut self) {
        self.running = None;
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{req_type, SECTOR_BYTES};
    use crate::testutil::TempFile;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    const MEM: u64 = 16 << 20;
    const QUEUE_GPA: u64 = 0x80_0000;
    /// Where request headers, data and status bytes go.
    const HDR_GPA: u64 = 0xc0_0000;
    const STATUS_GPA: u64 = 0xc0_1000;
    const DATA_GPA: u64 = 0xd0_0000;
    const SECTORS: u64 = 2048;
    const UNTOUCHED: u8 = 0xcc;

    struct Rig {
        mem: Arc<GuestMemoryMmap>,
        block: Block,
        irq: Arc<VirtioInterrupt>,
        queue: MockSplitQueue<'static, GuestMemoryMmap>,
        image: TempFile,
    }

    /// Sector `s` of the test image holds the byte `s` (mod 256) throughout.
    fn sector_byte(s: u64) -> u8 {
        (s % 256) as u8
    }

    fn rig_with(name: &str, read_only: bool, queue_size: u16) -> Rig {
        let bytes: Vec<u8> =
            (0..SECTORS * SECTOR_BYTES).map(|i| sector_byte(i / SECTOR_BYTES)).collect();
        let image = TempFile::with_bytes(name, &bytes);
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap());
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        let block = Block::new(Disk::open(&image.0, read_only).unwrap());
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
        ));
        let queue = MockSplitQueue::create(leaked, GuestAddress(QUEUE_GPA), queue_size);
        let mut r = Rig { mem, block, irq, queue, image };
        let a = Activation {
            mem: r.mem.clone(),
            queues: vec![r.queue.create_queue::<Queue>().unwrap()],
            acked_features: r.block.avail_features() | (1 << 32),
            interrupt: r.irq.clone(),
        };
        r.block.activate(a).unwrap();
        r
    }

    fn rig(name: &str) -> Rig {
        rig_with(name, false, 16)
    }

    fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next.unwrap_or(0)))
    }

    impl Rig {
        /// Queues a request of type `t` at `sector` with data descriptors `(addr, len,
        /// device-writable)`, its descriptors from table index `at`; the status byte is
        /// primed with `UNTOUCHED`.
        fn request(&self, at: u16, t: u32, sector: u64, data: &[(u64, u32, bool)]) {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&t.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&hdr, GuestAddress(HDR_GPA)).unwrap();
            self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS_GPA)).unwrap();
            let n = data.len() as u16 + 2;
            let next = |i: u16| (i + 1 < n).then_some(at + i + 1);
            let mut descs = vec![desc(HDR_GPA, 16, false, next(0))];
            for (i, &(addr, len, w)) in data.iter().enumerate() {
                descs.push(desc(addr, len, w, next(i as u16 + 1)));
            }
            descs.push(desc(STATUS_GPA, 1, true, None));
            self.queue.add_desc_chains(&descs, at).unwrap();
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS_GPA)).unwrap()
        }

        fn guest_bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
            v
        }

        fn used(&self, i: u16) -> (u32, u32) {
            let e = self.queue.used().ring().ref_at(usize::from(i)).unwrap().load();
            (e.id(), e.len())
        }

        fn m(&self) -> &BlockMetrics {
            self.block.metrics()
        }
    }

    fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn a_read_fills_every_data_descriptor_with_the_images_sectors() {
        let mut r = rig("blk-read");
        r.request(0, req_type::IN, 3, &[(DATA_GPA, 512, true), (DATA_GPA + 8192, 1024, true)]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::OK);
        assert_eq!(r.guest_bytes(DATA_GPA, 512), vec![3; 512]);
        assert_eq!(r.guest_bytes(DATA_GPA + 8192, 1024)[..512], [4; 512]);
        assert_eq!(r.guest_bytes(DATA_GPA + 8192, 1024)[512..], [5; 512]);
        assert_eq!(r.used(0), (0, 1536 + 1), "the data and the status byte were written");
        assert_eq!((load(&r.m().reads), load(&r.m().read_bytes)), (1, 1536));
        assert_eq!(r.irq.status() & irq::USED_BUFFER, irq::USED_BUFFER);
    }

    #[test]
    fn a_write_reaches_the_image_and_a_flush_succeeds() {
        let mut r = rig("blk-write");
        r.mem.write_slice(&[0x5a; 1024], GuestAddress(DATA_GPA)).unwrap();
        r.request(0, req_type::OUT, 7, &[(DATA_GPA, 1024, false)]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::OK);
        assert_eq!(r.used(0).1, 1, "only the status byte was written into the guest");
        r.request(3, req_type::FLUSH, 0, &[]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::OK);
        let image = std::fs::read(&r.image.0).unwrap();
        assert!(image[7 * 512..9 * 512].iter().all(|&b| b == 0x5a));
        assert!(image[6 * 512..7 * 512].iter().all(|&b| b == 6), "the sector before is kept");
        assert!(image[9 * 512..10 * 512].iter().all(|&b| b == 9), "and the one after");
        assert_eq!((load(&r.m().writes), load(&r.m().flushes)), (1, 1));
    }

    #[test]
    fn get_id_writes_the_disks_id() {
        let mut r = rig("blk-id");
        r.request(0, req_type::GET_ID, 0, &[(DATA_GPA, 20, true)]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::OK);
        assert_eq!(r.guest_bytes(DATA_GPA, 20), r.block.disk().id());
        assert_eq!(r.used(0).1, 21);
        assert_eq!(load(&r.m().get_ids), 1);
    }

    #[test]
    fn sectors_beyond_the_disk_get_ioerr_and_touch_nothing() {
        let mut r = rig("blk-range");
        r.mem.write_slice(&[UNTOUCHED; 1024], GuestAddress(DATA_GPA)).unwrap();
        for (i, sector) in [SECTORS - 1, SECTORS, u64::MAX, u64::MAX / 512].into_iter().enumerate()
        {
            r.request(0, req_type::IN, sector, &[(DATA_GPA, 1024, true)]);
            r.block.process_queue(0);
            assert_eq!(r.status(), req_status::IOERR, "sector {sector}");
            assert_eq!(r.used(i as u16).1, 1, "only the status");
        }
        assert_eq!(r.guest_bytes(DATA_GPA, 1024), vec![UNTOUCHED; 1024]);
        assert_eq!(r.m().bad_sectors.get(), 4);
        assert_eq!(load(&r.m().reads), 0);
        r.request(0, req_type::IN, SECTORS - 2, &[(DATA_GPA, 1024, true)]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::OK, "the last two sectors are in range");
    }

    #[test]
    fn a_read_only_disk_says_so_and_refuses_writes_with_ioerr() {
        let mut r = rig_with("blk-ro", true, 16);
        assert_ne!(r.block.avail_features() & (1 << F_RO), 0);
        r.mem.write_slice(&[0x5a; 512], GuestAddress(DATA_GPA)).unwrap();
        r.request(0, req_type::OUT, 0, &[(DATA_GPA, 512, false)]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::IOERR);
        assert_eq!(r.m().read_only_writes.get(), 1);
        assert!(std::fs::read(&r.image.0).unwrap()[..512].iter().all(|&b| b == 0));
        r.request(0, req_type::IN, 1, &[(DATA_GPA, 512, true)]);
        r.block.process_queue(0);
        assert_eq!((r.status(), r.guest_bytes(DATA_GPA, 1)[0]), (req_status::OK, 1));
    }

    #[test]
    fn bad_descriptors_are_counted_and_answered_when_they_can_be() {
        let mut r = rig("blk-bad");
        // Reading into a device-readable buffer.
        r.request(0, req_type::IN, 0, &[(DATA_GPA, 512, false)]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::IOERR);
        // A buffer that runs past the end of guest RAM.
        r.request(0, req_type::IN, 0, &[(MEM - 256, 512, true)]);
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::IOERR);
        // A status descriptor the device may not write: nothing is written at all.
        let hdr = desc(HDR_GPA, 16, false, Some(1));
        r.mem.write_obj(UNTOUCHED, GuestAddress(STATUS_GPA)).unwrap();
        r.queue.add_desc_chains(&[hdr, desc(STATUS_GPA, 1, false, None)], 0).unwrap();
        r.block.process_queue(0);
        assert_eq!(r.status(), UNTOUCHED);
        assert_eq!(r.used(2).1, 0);
        assert_eq!(r.m().bad_descriptors.get(), 3);
        assert_eq!(load(&r.m().reads), 0);
    }

    #[test]
    fn unknown_request_types_get_unsupp() {
        let mut r = rig("blk-unsupp");
        r.request(0, 11, 0, &[]); // VIRTIO_BLK_T_DISCARD: not offered
        r.block.process_queue(0);
        assert_eq!(r.status(), req_status::UNSUPP);
        assert_eq!(r.m().unsupported.get(), 1);
    }

    #[test]
    fn a_looping_chain_is_refused() {
        let mut r = rig_with("blk-loop", false, 256);
        let d0 = desc(HDR_GPA, 16, false, Some(1));
        let d1 = desc(DATA_GPA, 512, true, Some(0));
        r.queue.add_desc_chains(&[d0, d1], 0).unwrap();
        r.block.process_queue(0);
        assert_eq!(r.m().bad_descriptors.get(), 1);
        assert_eq!(r.used(0).1, 0);
    }

    #[test]
    fn a_full_queue_is_served_in_turns() {
        let mut r = rig_with("blk-turns", false, 256);
        let chains = CHAINS_PER_TURN + 8;
        for i in 0..chains {
            r.request(i as u16 * 3, req_type::IN, 0, &[(DATA_GPA, 512, true)]);
        }
        assert!(r.block.process_queue(0), "more is waiting after one turn");
        assert_eq!(usize::from(r.queue.used().idx().load()), CHAINS_PER_TURN);
        assert!(!r.block.process_queue(0), "the rest fits in the next turn");
        assert_eq!(usize::from(r.queue.used().idx().load()), chains);
        assert_eq!(load(&r.m().reads), chains as u64);
    }

    #[test]
    fn config_space_shows_capacity_and_limits_and_takes_no_writes() {
        let mut r = rig("blk-config");
        let mut b = [0u8; 8];
        r.block.read_config(config::CAPACITY as u64, &mut b);
        assert_eq!(u64::from_le_bytes(b), SECTORS);
        let mut w = [0u8; 4];
        r.block.read_config(config::SEG_MAX as u64, &mut w);
        assert_eq!(u32::from_le_bytes(w), SEG_MAX);
        r.block.read_config(config::SIZE_MAX as u64, &mut w);
        assert_eq!(u32::from_le_bytes(w), SIZE_MAX);
        let mut past = [0xffu8; 4];
        r.block.read_config(4096, &mut past);
        assert_eq!(past, [0; 4]);
        r.block.write_config(0, &[1; 8]);
        assert_eq!(r.m().bad_config_writes.get(), 1);
        r.block.read_config(config::CAPACITY as u64, &mut b);
        assert_eq!(u64::from_le_bytes(b), SECTORS);
        assert_eq!(r.block.avail_features() & (1 << F_RO), 0);
    }

    #[test]
    fn notifications_before_activation_and_for_other_queues_are_counted() {
        let f = TempFile::with_bytes("blk-early", &[0u8; 4096]);
        let mut block = Block::new(Disk::open(&f.0, false).unwrap());
        assert!(!block.process_queue(0));
        assert_eq!(load(&block.metrics().early_notifies), 1);
        let mut r = rig("blk-notify");
        r.block.process_queue(1);
        assert_eq!(r.m().bad_notifies.get(), 1);
    }
}
