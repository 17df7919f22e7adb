//! One VM from config to exit: KVM, memory, devices, boot, vCPU thread, event loop.

use std::fs::File;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::accel::Accelerator;
use crate::api::server::ApiServer;
use crate::api::ApiContext;
use crate::boot::layout::{VIRTIO_MMIO_BASE_GPA, VIRTIO_MMIO_WINDOW_BYTES};
use crate::boot::{self, firmware, linux, BootCpu, BootError};
use crate::config::{BootSource, ConfigError, VmConfig};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::balloon::event_handler::BalloonEventHandler;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::{Bus, BusError};
use crate::metrics::{StatsSource, StatsWriter};
use crate::mm::engine::{Engine, EngineConfig};
use crate::mm::uffd::handler::HandlerConfig;
use crate::vstate::cpuid::{self, CpuidError};
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuOutcome};
use crate::vstate::vm::{self, VmError};

/// Interrupt line of the first virtio-mmio device (COM1 has 4; Linux's PIC takes 0-15).
pub const FIRST_VIRTIO_IRQ: u32 = 5;

/// How a VM ended.
pub type RunOutcome = VcpuOutcome;

/// What ebb adds to every Linux command line: console on COM1, reboot through the i8042
/// (which ebb turns into exit status 0), no PCI probing, and reboot at once on a panic:
/// `panic=1` waits in `mdelay`, which never returns on PVM hosts, so the VM would hang.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Added on PVM hosts: the instruction emulator that runs guest CPL0 code lacks XSAVE,
/// POPCNT, SMAP's stac/clac and friends, and the guest sees the host's CPUID bits for them
/// anyway (DESIGN.md section 4), so Linux must be told not to use them.
pub const PVM_CMDLINE: &str = "noxsave clearcpuid=smap,smep,popcnt,umip,pku";

/// Errors that stop a VM before or while it runs.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM is unavailable or lacks something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// CPUID could not be built.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// Guest RAM could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel or payload could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be set up or run.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Devices overlap on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The serial log could not be created.
    #[error("cannot create serial log {path}: {source}")]
    SerialLog {
        /// The path given.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// userfaultfd could not be set up.
    #[error(transparent)]
    Uffd(#[from] crate::mm::uffd::UffdError),
    /// The statistics file could not be created.
    #[error("cannot create statistics file {path}: {source}")]
    StatsJson {
        /// The path given.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The balloon could not be created.
    #[error(transparent)]
    Balloon(#[from] crate::devices::virtio::balloon::BalloonError),
    /// The control socket could not be created.
    #[error("cannot listen on control socket {path}: {source}")]
    ApiSock {
        /// The path given.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The fault handler stopped, so the guest's faults can no longer be served.
    #[error("the userfaultfd fault handler stopped: {0}. The guest cannot go on; --no-uffd runs without it")]
    FaultHandler(String),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// The vCPU thread died.
    #[error("vCPU thread panicked")]
    VcpuPanic,
}

/// The exit status ebb gives for an outcome: the payload's status, 0 for reset or power-off,
/// 2 for a crash.
pub fn exit_status(outcome: &RunOutcome) -> u8 {
    match outcome {
        VcpuOutcome::Exited(code) => *code,
        VcpuOutcome::Reset | VcpuOutcome::PowerOff => 0,
        VcpuOutcome::Crashed(_) => 2,
    }
}

/// The full Linux command line: ebb's base, device entries, host work-arounds, then the user's.
pub fn linux_cmdline(accel: Accelerator, devices: &[String], user: &str) -> String {
    let mut parts = vec![BASE_CMDLINE.to_owned()];
    parts.extend(devices.iter().cloned());
    if accel.is_software() {
        parts.push(PVM_CMDLINE.to_owned());
    }
    if !user.trim().is_empty() {
        parts.push(user.trim().to_owned());
    }
    parts.join(" ")
}

/// The devices of one VM and what the event loop and the kernel command line need of them.
struct Devices {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    balloon: Option<Arc<Mutex<Balloon>>>,
    balloon_handler: Option<BalloonEventHandler>,
    cmdline: Vec<String>,
}

/// Creates the UART, i8042, debug-exit port and, if configured, the balloon.
fn setup_devices(config: &VmConfig, vm: &VmFd, ram: &GuestRam) -> Result<Devices, VmmError> {
    let serial_log = match &config.serial_log {
        Some(path) => Some(
            File::create(path)
                .map_err(|source| VmmError::SerialLog { path: path.clone(), source })?,
        ),
        None => None,
    };
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        vm::irqfd(vm, COM1_IRQ)?,
        SerialOut::new(serial_log),
    )));
    let mut pio = Bus::new();
    pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
    pio.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::new())))?;
    pio.insert(DEBUG_EXIT_PORT, DEBUG_EXIT_LEN, Arc::new(Mutex::new(DebugExit)))?;
    let mut mmio = Bus::new();
    let mut cmdline = Vec::new();
    let (mut balloon, mut balloon_handler) = (None, None);
    if let Some(bc) = config.balloon {
        let dev = Balloon::new(bc, ram.memory().clone(), ram.mem_bytes(), None)?;
        let dev = Arc::new(Mutex::new(dev));
        let base = VIRTIO_MMIO_BASE_GPA;
        let queue_evts = add_virtio_mmio(vm, ram, &mut mmio, dev.clone(), base, FIRST_VIRTIO_IRQ)?;
        cmdline.push(MmioTransport::cmdline_entry(
            VIRTIO_MMIO_WINDOW_BYTES,
            base,
            FIRST_VIRTIO_IRQ,
        ));
        let interval = (bc.stats_interval_s > 0).then(|| Duration::from_secs(bc.stats_interval_s));
        balloon_handler = Some(
            BalloonEventHandler::new(dev.clone(), queue_evts, interval)
                .map_err(|e| VmmError::EventLoop(e.to_string()))?,
        );
        balloon = Some(dev);
    }
    Ok(Devices {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        balloon,
        balloon_handler,
        cmdline,
    })
}

/// Puts `device` on the MMIO bus at `base` with interrupt `irq`; returns one ioeventfd per
/// queue, signalled by KVM when the driver writes that queue's index to QueueNotify.
fn add_virtio_mmio(
    vm: &VmFd,
    ram: &GuestRam,
    mmio: &mut Bus,
    device: Arc<Mutex<dyn VirtioDevice>>,
    base: u64,
    irq: u32,
) -> Result<Vec<EventFd>, VmmError> {
    let interrupt = Arc::new(VirtioInterrupt::new(vm::irqfd(vm, irq)?));
    let queues = device.lock().unwrap_or_else(PoisonError::into_inner).queue_max_sizes().len();
    let transport = MmioTransport::new(device, ram.memory().clone(), interrupt);
    mmio.insert(base, VIRTIO_MMIO_WINDOW_BYTES, Arc::new(Mutex::new(transport)))?;
    let mut evts = Vec::with_capacity(queues);
    for index in 0..queues {
        let evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::EventLoop(e.to_string()))?;
        let datamatch = u32::try_from(index).unwrap_or(u32::MAX);
        let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        vm.register_ioevent(&evt, &addr, datamatch)
            .map_err(|source| VmError::Ioctl { what: "KVM_IOEVENTFD", source })?;
        evts.push(evt);
    }
    Ok(evts)
}

/// Runs the VM described by `config` to its end.
pub fn run(config: &VmConfig) -> Result<RunOutcome, VmmError> {
    let started = Instant::now();
    config.validate()?;
    let accel = Accelerator::detect();
    log::info!("accelerator: {accel}");
    let kvm = kvm::open(&config.kvm_path)?;
    let mut cpuid = cpuid::supported(&kvm)?;
    let ram = GuestRam::new(config.mem_bytes, cpuid::phys_bits(cpuid.as_slice()))?;
    let vm = vm::create(&kvm, &ram)?;
    let mut devices = setup_devices(config, &vm, &ram)?;
    let mem = ram.memory().clone();
    let vcpu = Vcpu::new(&vm, 0, devices.pio.clone(), devices.mmio.clone(), mem)?;
    let boot = load_boot(config, &ram, accel, &devices.cmdline, vcpu.tsc_khz())?;
    cpuid::normalize(cpuid.as_mut_slice(), 0, config.vcpus, accel);
    vcpu.configure(&kvm, &cpuid, &boot)?;
    // Registered after boot loading, so what ebb wrote into the guest starts out Resident.
    let engine = start_engine(config, &ram)?;
    if let (Some(e), Some(b)) = (&engine, &devices.balloon) {
        let mut b = b.lock().unwrap_or_else(PoisonError::into_inner);
        b.attach_pages(e.map().clone(), e.table().clone());
    }
    let source = Arc::new(match &engine {
        Some(e) => StatsSource::Engine(e.clone()),
        None => StatsSource::Plain(ram.regions()),
    });
    let mut subscribers: Vec<Subscriber> = Vec::new();
    if let Some(h) = devices.balloon_handler.take() {
        subscribers.push(Arc::new(Mutex::new(h)));
    }
    if let Some(path) = &config.api_sock {
        let ctx =
            ApiContext { balloon: devices.balloon.clone(), stats: source.clone(), start: started };
        let server = ApiServer::bind(path, ctx)
            .map_err(|source| VmmError::ApiSock { path: path.clone(), source })?;
        subscribers.push(Arc::new(Mutex::new(server)));
    }
    let stats = match &config.memory.stats_json {
        Some(path) => Some(Arc::new(Mutex::new(
            StatsWriter::new(path, config.memory.stats_interval, source, started)
                .map_err(|source| VmmError::StatsJson { path: path.clone(), source })?,
        ))),
        None => None,
    };
    let outcome = run_vcpu(vcpu, subscribers, stats, engine.as_deref());
    if let Err(e) = devices.serial.lock().unwrap_or_else(PoisonError::into_inner).flush() {
        log::warn!("flushing serial output: {e}");
    }
    if let Some(engine) = engine {
        let m = engine.snapshot(0);
        log::info!(
            "guest memory: consumed {} MiB, {} faults (p50 {:.1} us, p99 {:.1} us), handler CPU {:.0} ms",
            m.consumed_bytes >> 20,
            m.faults,
            m.fault_p50_us,
            m.fault_p99_us,
            m.handler_cpu_ms
        );
    }
    drop(vm);
    outcome
}

/// Starts the lazy-RAM engine unless `--no-uffd`.
fn start_engine(config: &VmConfig, ram: &GuestRam) -> Result<Option<Arc<Engine>>, VmmError> {
    if !config.memory.uffd {
        log::info!("guest RAM is plain anonymous memory (--no-uffd)");
        return Ok(None);
    }
    let engine_config = EngineConfig {
        uffd_dev: config.memory.uffd_dev.clone(),
        handler: HandlerConfig {
            fault_around: config.memory.fault_around,
            active: Some(config.memory.active),
        },
    };
    let engine = Engine::start(ram, &engine_config)?;
    log::debug!("userfaultfd engine: write protection {}", engine.write_protect());
    Ok(Some(Arc::new(engine)))
}

fn load_boot(
    config: &VmConfig,
    ram: &GuestRam,
    accel: Accelerator,
    devices: &[String],
    tsc_khz: u32,
) -> Result<BootCpu, BootError> {
    let mem = ram.memory();
    match &config.boot {
        BootSource::Linux { kernel, initrd, cmdline } => {
            let full = linux_cmdline(accel, devices, cmdline);
            log::info!("kernel command line: {full}");
            linux::load(mem, ram.mem_bytes(), kernel, initrd.as_deref(), &full)
        }
        BootSource::Firmware { source, args } => {
            firmware::load(mem, ram.mem_bytes(), source, args, tsc_khz)
        }
    }
}

/// Tells the event loop that the vCPU is done.
/// Notes that an eventfd fired: the vCPU finished, or the fault handler failed.
struct FlagWatcher {
    evt: EventFd,
    done: bool,
}

impl FlagWatcher {
    fn new(evt: EventFd) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self { evt, done: false }))
    }
}

impl MutEventSubscriber for FlagWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.done = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch an event: {e:?}");
        }
    }
}

/// An event-loop subscriber.
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs the vCPU on its own thread while this thread runs the event loop: device queues, the
/// control socket, the statistics timer.
fn run_vcpu(
    mut vcpu: Vcpu,
    subscribers: Vec<Subscriber>,
    stats: Option<Arc<Mutex<StatsWriter>>>,
    engine: Option<&Engine>,
) -> Result<RunOutcome, VmmError> {
    let loop_err = |e: event_manager::Error| VmmError::EventLoop(format!("{e:?}"));
    let exit_evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::EventLoop(e.to_string()))?;
    let signal = exit_evt.try_clone().map_err(|e| VmmError::EventLoop(e.to_string()))?;
    let watcher = FlagWatcher::new(exit_evt);
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(loop_err)?;
    events.add_subscriber(watcher.clone());
    let engine_failed = match engine {
        Some(e) => {
            let evt =
                e.failed_event().try_clone().map_err(|e| VmmError::EventLoop(e.to_string()))?;
            let w = FlagWatcher::new(evt);
            events.add_subscriber(w.clone());
            Some(w)
        }
        None => None,
    };
    for s in subscribers {
        events.add_subscriber(s);
    }
    if let Some(s) = &stats {
        events.add_subscriber(s.clone());
    }
    let handle = thread::Builder::new()
        .name("ebb-vcpu0".into())
        .spawn(move || {
            let outcome = vcpu.run();
            let _ = signal.write(1);
            outcome
        })
        .map_err(|e| VmmError::EventLoop(e.to_string()))?;
    let fired = |w: &Arc<Mutex<FlagWatcher>>| w.lock().unwrap_or_else(PoisonError::into_inner).done;
    while !fired(&watcher) {
        if engine_failed.as_ref().is_some_and(fired) {
            // The vCPU waits in a fault nobody will serve; it is left behind (the process is
            // about to exit) rather than joined.
            let why = engine.and_then(Engine::failure).unwrap_or_default();
            return Err(VmmError::FaultHandler(why));
        }
        events.run().map_err(loop_err)?;
    }
    let outcome = handle.join().map_err(|_| VmmError::VcpuPanic)??;
    if let Some(s) = &stats {
        // The last line describes the VM as it ended.
        if let Err(e) = s.lock().unwrap_or_else(PoisonError::into_inner).write_line() {
            log::warn!("writing statistics: {e}");
        }
    }
    Ok(outcome)
}

/// Re-exported so `main.rs` can name the default payload.
pub use boot::firmware::DEFAULT_PAYLOAD;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_gets_the_work_arounds_before_the_user_part() {
        let c = linux_cmdline(
            Accelerator::Pvm,
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            "rootwait",
        );
        assert!(c.starts_with(BASE_CMDLINE));
        let dev = c.find("virtio_mmio").unwrap();
        let pvm = c.find(PVM_CMDLINE).unwrap();
        assert!(dev < pvm && pvm < c.find("rootwait").unwrap());
    }

    #[test]
    fn hardware_hosts_get_no_work_arounds() {
        let c = linux_cmdline(Accelerator::VtX { ept: true }, &[], "");
        assert_eq!(c, BASE_CMDLINE);
    }

    #[test]
    fn exit_status_follows_the_outcome() {
        assert_eq!(exit_status(&VcpuOutcome::Exited(7)), 7);
        assert_eq!(exit_status(&VcpuOutcome::Reset), 0);
        assert_eq!(exit_status(&VcpuOutcome::PowerOff), 0);
    }
}
