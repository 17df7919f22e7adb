//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! The guest finds each device through a `virtio_mmio.device=<size>@<base>:<irq>` entry on
//! its command line ([`MmioTransport::cmdline_entry`]). Every register access is checked:
//! wrong widths, reads of write-only registers and writes in the wrong state are ignored
//! and counted, never trusted.

use std::sync::{Arc, Mutex, PoisonError};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::{irq, status, Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::bus::{BusDevice, ExitRequest};
use crate::devices::guest_errors::GuestErrorCounter;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The non-legacy transport.
const VERSION: u32 = 2;
/// "ebb\0" as a vendor ID.
const VENDOR_ID: u32 = u32::from_le_bytes(*b"ebb\0");
/// Device configuration space starts here.
const CONFIG_OFFSET: u64 = 0x100;

// Register offsets (virtio 1.2, table 4.1).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
/// Offset of QueueNotify, where ebb registers one ioeventfd per queue.
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Counters of guest misbehaviour seen by the transport, each logged once.
#[derive(Debug, Default)]
pub struct MmioMetrics {
    /// Register accesses that were not 32 bits wide, or hit no register.
    pub bad_accesses: GuestErrorCounter,
    /// Writes refused in the device's current state (queue setup after `DRIVER_OK`...).
    pub bad_state_writes: GuestErrorCounter,
    /// Queue sizes that are not a power of two up to the maximum, misaligned ring addresses,
    /// rings outside guest RAM at activation.
    pub bad_queue_config: GuestErrorCounter,
    /// Notifications before `DRIVER_OK` or for a queue that does not exist.
    pub bad_notifies: GuestErrorCounter,
    /// Activations the device refused.
    pub activate_failures: GuestErrorCounter,
}

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
    metrics: Arc<MmioMetrics>,
}

impl MmioTransport {
    /// Wraps `device`, which raises interrupts through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
            metrics: Arc::new(MmioMetrics::default()),
        }
    }

    /// The kernel command-line entry announcing a device window at `base` with `irq`.
    pub fn cmdline_entry(size: u64, base: u64, irq: u32) -> String {
        format!("virtio_mmio.device={}K@{base:#x}:{irq}", size >> 10)
    }

    /// Misbehaviour counters (shared, for the control API).
    pub fn metrics(&self) -> &Arc<MmioMetrics> {
        &self.metrics
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn features(&self) -> u64 {
        lock(&self.device).avail_features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let word = |v: u64, high: bool| {
            u32::try_from(if high { v >> 32 } else { v & 0xffff_ffff }).unwrap_or(0)
        };
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => word(self.features(), false),
                1 => word(self.features(), true),
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: length all ones means "absent" (section 4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.metrics.bad_accesses.hit(|| format!("read of register {offset:#x}"));
                0
            }
        }
    }

    /// Queue registers may change only while the driver is setting the device up: after
    /// FEATURES_OK and before DRIVER_OK (section 4.2.3.2).
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn write_queue_register(&mut self, offset: u64, v: u32) {
        if !self.queue_setup_allowed() {
            // Linux's vm_del_vq clears QueueReady after resetting the device: harmless.
            if offset != REG_QUEUE_READY || v != 0 {
                let state = self.status;
                self.metrics.bad_state_writes.hit(|| {
                    format!("queue register {offset:#x} written in device status {state:#x}")
                });
            }
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            self.metrics
                .bad_state_writes
                .hit(|| format!("queue {sel} selected, which does not exist"));
            return;
        };
        // The crate's setters log every refusal; these never log on the guest's behalf.
        let ok = match offset {
            REG_QUEUE_NUM => u16::try_from(v).is_ok_and(|n| q.try_set_size(n).is_ok()),
            REG_QUEUE_READY => {
                q.set_ready(v == 1);
                true
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                let addr = with_half(q.desc_table(), offset == REG_QUEUE_DESC_HIGH, v);
                q.try_set_desc_table_address(addr).is_ok()
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                let addr = with_half(q.avail_ring(), offset == REG_QUEUE_DRIVER_HIGH, v);
                q.try_set_avail_ring_address(addr).is_ok()
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                let addr = with_half(q.used_ring(), offset == REG_QUEUE_DEVICE_HIGH, v);
                q.try_set_used_ring_address(addr).is_ok()
            }
            _ => true,
        };
        if !ok {
            self.metrics
                .bad_queue_config
                .hit(|| format!("queue {sel}: register {offset:#x} refused value {v:#x}"));
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, v),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => {}
            _ => self.metrics.bad_accesses.hit(|| format!("write of register {offset:#x}")),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features are fixed once FEATURES_OK is set (section 3.1.1).
        if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
            let state = self.status;
            self.metrics
                .bad_state_writes
                .hit(|| format!("features written in device status {state:#x}"));
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        // Bits the device never offered are dropped: the driver cannot enable them.
        let accepted = (u64::from(v) << shift) & self.features();
        self.acked_features = (self.acked_features & !mask) | accepted;
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (section 2.1.2), except FAILED which it may set anytime.
        if v & self.status != self.status {
            let state = self.status;
            self.metrics
                .bad_state_writes
                .hit(|| format!("status {v:#x} clears bits of {state:#x}"));
            return;
        }
        let added = v & !self.status;
        let mut new = v;
        if added & status::FEATURES_OK != 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // A legacy driver: refuse FEATURES_OK so the driver sees it was not accepted.
            new &= !status::FEATURES_OK;
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self.queues.iter().all(|q| !q.ready() || rings_fit(q, &self.mem));
        let activation = Activation {
            mem: self.mem.clone(),
            // Copies through the plain state: the transport keeps its own to answer
            // QueueReady and to reset.
            queues: self.queues.iter().filter_map(|q| Queue::try_from(q.state()).ok()).collect(),
            acked_features: self.acked_features,
            interrupt: self.interrupt.clone(),
        };
        let result = if valid {
            lock(&self.device).activate(activation)
        } else {
            Err(super::VirtioError::Activate {
                device_type: lock(&self.device).device_type(),
                reason: super::ActivateError::BadQueue,
            })
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                self.metrics.activate_failures.hit(|| e.to_string());
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal(irq::CONFIG_CHANGE) {
                    log::warn!("{e}");
                }
            }
        }
    }

    fn notify(&mut self, index: u32) {
        match u16::try_from(index) {
            Ok(i) if self.activated && usize::from(i) < self.queues.len() => {
                lock(&self.device).queue_notify(i);
            }
            _ => self.metrics.bad_notifies.hit(|| {
                format!("notification of queue {index} in device status {:#x}", self.status)
            }),
        }
    }

    fn reset(&mut self) {
        if self.activated || self.status != 0 {
            lock(&self.device).reset();
        }
        self.queues.iter_mut().for_each(QueueT::reset);
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }
}

/// `old` with its high (`high`) or low 32 bits replaced by `v`.
fn with_half(old: u64, high: bool, v: u32) -> GuestAddress {
    let v = u64::from(v);
    GuestAddress(if high { (old & 0xffff_ffff) | (v << 32) } else { (old & !0xffff_ffff) | v })
}

/// True if the queue's three rings lie in guest RAM (virtio 1.2, 2.7: 16-byte descriptors,
/// a 6-byte header plus 2 bytes per entry in the driver area, 6 plus 8 in the device area);
/// the crate's own check logs every failure.
fn rings_fit(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = u64::from(q.size());
    let fits = |addr: u64, len: u64, access: Permissions| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, access))
    };
    fits(q.desc_table(), 16 * size, Permissions::Read)
        && fits(q.avail_ring(), 6 + 2 * size, Permissions::Read)
        && fits(q.used_ring(), 6 + 8 * size, Permissions::Write)
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_register(offset).to_le_bytes(),
            _ => self.metrics.bad_accesses.hit(|| format!("read at {offset:#x} not 32 bits wide")),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<ExitRequest> {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            return None;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(word)),
            _ => self.metrics.bad_accesses.hit(|| format!("write at {offset:#x} not 32 bits wide")),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    /// A device that records what the transport does to it (a real implementation of the
    /// trait: the transport under test is the thing being checked).
    #[derive(Default)]
    struct Recorder {
        activations: Vec<(u64, usize)>,
        notified: Vec<u16>,
        resets: u32,
        config: [u8; 8],
        refuse: bool,
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn avail_features(&self) -> u64 {
            1 << 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.config.get(o + i))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) =
                usize::try_from(offset).ok().and_then(|o| self.config.get_mut(o..o + data.len()))
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), super::super::VirtioError> {
            if self.refuse {
                return Err(super::super::VirtioError::Activate {
                    device_type: 5,
                    reason: super::super::ActivateError::QueueNotReady { index: 0 },
                });
            }
            self.activations
                .push((a.acked_features, a.queues.iter().filter(|q| q.ready()).count()));
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) {
            self.notified.push(index);
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn setup(refuse: bool) -> (MmioTransport, Arc<Mutex<Recorder>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Recorder { refuse, ..Default::default() }));
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
        ));
        (MmioTransport::new(dev.clone(), Arc::new(mem), irq), dev)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the Linux driver's probe sequence up to FEATURES_OK with the given features.
    fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
        wr(t, REG_STATUS, status::ACKNOWLEDGE);
        wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, low);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, high);
        wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u32) {
        wr(t, REG_QUEUE_SEL, index);
        wr(t, REG_QUEUE_NUM, 16);
        wr(t, REG_QUEUE_DESC_LOW, base);
        wr(t, REG_QUEUE_DRIVER_LOW, base + 0x1000);
        wr(t, REG_QUEUE_DEVICE_LOW, base + 0x2000);
        wr(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers_match_the_spec() {
        let (mut t, _) = setup(false);
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 5);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 256);
        wr(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "absent queue");
    }

    #[test]
    fn full_probe_activates_with_ready_queues_and_negotiated_features() {
        let (mut t, dev) = setup(false);
        negotiate(&mut t, 0b11, 1);
        assert_eq!(rd(&mut t, REG_STATUS) & status::FEATURES_OK, status::FEATURES_OK);
        setup_queue(&mut t, 0, 0x10000);
        wr(&mut t, REG_STATUS, ALL_OK);
        // Bit 0 was never offered, so it is not acked.
        assert_eq!(dev.lock().unwrap().activations, vec![((1 << 32) | 0b10, 1)]);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.lock().unwrap().notified, vec![0]);
    }

    #[test]
    fn driver_without_version_1_is_refused_features_ok() {
        let (mut t, _) = setup(false);
        negotiate(&mut t, 0b10, 0);
        assert_eq!(rd(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn notify_before_driver_ok_or_out_of_range_is_ignored_and_counted() {
        let (mut t, dev) = setup(false);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        negotiate(&mut t, 0, 1);
        setup_queue(&mut t, 0, 0x10000);
        wr(&mut t, REG_STATUS, ALL_OK);
        wr(&mut t, REG_QUEUE_NOTIFY, 7);
        wr(&mut t, REG_QUEUE_NOTIFY, 0x1_0000);
        assert!(dev.lock().unwrap().notified.is_empty());
        assert_eq!(t.metrics().bad_notifies.get(), 3);
    }

    #[test]
    fn queue_outside_guest_memory_marks_device_needs_reset() {
        let (mut t, dev) = setup(false);
        negotiate(&mut t, 0, 1);
        setup_queue(&mut t, 0, 0xfff0_0000);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), irq::CONFIG_CHANGE);
        assert_eq!(t.metrics().activate_failures.get(), 1);
    }

    #[test]
    fn refused_activation_marks_device_needs_reset() {
        let (mut t, _) = setup(true);
        negotiate(&mut t, 0, 1);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_setup_after_driver_ok_is_refused() {
        let (mut t, _) = setup(false);
        negotiate(&mut t, 0, 1);
        wr(&mut t, REG_STATUS, ALL_OK);
        wr(&mut t, REG_QUEUE_NUM, 8);
        wr(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(t.metrics().bad_state_writes.get(), 2);
    }

    #[test]
    fn writing_zero_status_resets_everything() {
        let (mut t, dev) = setup(false);
        negotiate(&mut t, 0, 1);
        setup_queue(&mut t, 0, 0x10000);
        wr(&mut t, REG_STATUS, ALL_OK);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.lock().unwrap().notified, Vec::<u16>::new());
    }

    #[test]
    fn invalid_queue_sizes_and_misaligned_rings_are_counted_and_refused() {
        let (mut t, _) = setup(false);
        negotiate(&mut t, 0, 1);
        wr(&mut t, REG_QUEUE_SEL, 0);
        for i in 0..20_000u32 {
            wr(&mut t, REG_QUEUE_NUM, 3 + 2 * (i % 100)); // odd: never a power of two
        }
        wr(&mut t, REG_QUEUE_NUM, 1 << 20); // beyond u16
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x1001); // descriptors are 16-byte aligned
        wr(&mut t, REG_QUEUE_DEVICE_LOW, 0x2002); // the used ring is 4-byte aligned
        assert_eq!(t.metrics().bad_queue_config.get(), 20_003);
        wr(&mut t, REG_QUEUE_NUM, 16);
        assert_eq!(t.metrics().bad_queue_config.get(), 20_003, "a good size is taken");
    }

    #[test]
    fn rings_outside_guest_memory_fail_activation() {
        let (mut t, dev) = setup(false);
        negotiate(&mut t, 0, 1);
        setup_queue(&mut t, 0, 0xff000); // the used ring runs past 1 MiB of RAM
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(t.metrics().activate_failures.get(), 1);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn odd_width_register_accesses_are_ignored() {
        let (mut t, _) = setup(false);
        let mut b = [0u8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        wr(&mut t, 0x0f0, 1);
        assert_eq!(t.metrics().bad_accesses.get(), 3);
    }

    #[test]
    fn config_space_goes_to_the_device() {
        let (mut t, dev) = setup(false);
        t.write(CONFIG_OFFSET + 4, &[1, 2]);
        assert_eq!(dev.lock().unwrap().config[4..6], [1, 2]);
        let mut b = [0u8; 4];
        t.read(CONFIG_OFFSET + 4, &mut b);
        assert_eq!(b, [1, 2, 0, 0]);
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let (mut t, _) = setup(false);
        t.interrupt.signal(irq::USED_BUFFER | irq::CONFIG_CHANGE).unwrap();
        wr(&mut t, REG_INTERRUPT_ACK, irq::USED_BUFFER);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), irq::CONFIG_CHANGE);
    }

    #[test]
    fn cmdline_entry_has_linux_syntax() {
        assert_eq!(
            MmioTransport::cmdline_entry(0x1000, 0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
