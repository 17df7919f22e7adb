//! One VM from config to exit, as a [`Vm`] value: [`Vm::build`] sets up KVM, guest memory,
//! the memory engine, devices, the vCPUs and their boot state; [`Vm::run`] runs every vCPU on
//! its own thread and the event loop on the calling one until the guest ends. A host process
//! can hold several.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the `Vm`, its errors, the exit status |
//! | `devices.rs` | the devices, their bus ranges, interrupt lines and MMIO slots |
//! | `memory.rs` | the memory manager, the stores of evicted pages, the engine |
//! | `event_loop.rs` | the vCPU threads, the event loop, the vCPUs stopped first when the fault handler dies |
//! | `signals.rs` | SIGINT and SIGTERM: an orderly stop |

pub mod devices;
pub mod event_loop;
pub mod memory;
pub mod signals;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use kvm_ioctls::VmFd;

use crate::accel::Accelerator;
use crate::api::server::ApiServer;
use crate::api::ApiContext;
use crate::boot::{self, cmdline::linux_cmdline, firmware, linux, BootCpu, BootError};
use crate::config::{BootSource, ConfigError, VmConfig};
use crate::devices::virtio::balloon::BalloonError;
use crate::devices::virtio::block::BlockError;
use crate::devices::BusError;
use crate::metrics::{MemorySource, StatsSource, StatsWriter};
use crate::mm::engine::Engine;
use crate::mm::engine::EngineError;
use crate::mm::fault::FaultError;
use crate::mm::rss::RssProbe;
use crate::service::http::{Bound, MetricsServer};
use crate::service::vm::VmSource;
use crate::vstate::cpuid::{self, CpuidError};
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuOutcome, VcpuStopper};
use crate::vstate::vm::{self, VmError};
use devices::Devices;
use event_loop::Subscriber;

/// How a VM ended.
pub type RunOutcome = VcpuOutcome;

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
    /// The kernel refused to take guest RAM into KSM (`--ksm`).
    #[error("--ksm: the kernel refused MADV_MERGEABLE on guest RAM ({0}); is it built with KSM?")]
    Ksm(std::io::Error),
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
    /// No virtio-mmio window or interrupt line is left for another device.
    #[error("no virtio-mmio slot left for another device")]
    NoMmioSlot,
    /// The serial log could not be created.
    #[error("cannot create serial log {path}: {source}")]
    SerialLog {
        /// The path given.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The memory engine (userfaultfd, its handler and workers) could not be set up.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The statistics file could not be created.
    #[error("cannot create statistics file {path}: {source}")]
    StatsJson {
        /// The path given.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The balloon could not be created.
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// A disk could not be set up.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The control socket could not be created.
    #[error("cannot listen on control socket {path}: {source}")]
    ApiSock {
        /// The path given.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `--metrics-addr` could not be bound or served.
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsAddr {
        /// The address given.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The fault handler stopped, so the guest's faults can no longer be served.
    #[error(
        "the userfaultfd fault handler stopped: {0}. The guest cannot go on; {advice}",
        advice = fault_handler_advice(.0)
    )]
    FaultHandler(#[source] FaultError),
    /// The swap file could not be created.
    #[error(transparent)]
    Swap(#[from] crate::mm::swap::SwapError),
    /// An eventfd, timer or thread of the event loop could not be created.
    #[error("setting up the event loop: {0}")]
    EventLoopSetup(#[source] std::io::Error),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(#[source] event_manager::Error),
    /// The vCPU thread died.
    #[error("vCPU thread panicked")]
    VcpuPanic,
    /// The process could not give up its rights before the guest runs.
    #[error("jailer: {0}")]
    Jail(#[from] crate::jail::JailError),
}

// Every vCPU's faults are counted apart.
const _: () = assert!(crate::config::MAX_VCPUS as usize <= crate::mm::stats::VCPU_SLOTS);

/// How much longer than the fault handler the vCPU waits for memory (see `Vm::build`).
const VCPU_EXTRA_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Exit status base for a VM stopped by a signal: 128 + the signal number, as shells report.
pub const SIGNAL_EXIT_BASE: u8 = 128;

/// The exit status ebb gives for an outcome: the payload's status, 0 for reset or power-off,
/// 2 for a crash, 128 + the signal number when SIGINT or SIGTERM stopped it.
pub fn exit_status(outcome: &RunOutcome) -> u8 {
    match outcome {
        VcpuOutcome::Exited(code) => *code,
        VcpuOutcome::Reset | VcpuOutcome::PowerOff => 0,
        VcpuOutcome::Crashed(_) => 2,
        VcpuOutcome::Stopped(signal) => {
            SIGNAL_EXIT_BASE.saturating_add(u8::try_from(*signal).unwrap_or(u8::MAX))
        }
    }
}

/// One VM, built and ready to run.
pub struct Vm {
    started: Instant,
    /// Kept open for the VM's lifetime (the vCPU and memory slots belong to it; the reclaim
    /// worker reads its dirty log).
    vm_fd: Arc<VmFd>,
    /// Guest RAM; the mapping must outlive the vCPU and the engine.
    _ram: GuestRam,
    devices: Devices,
    vcpus: Vec<Vcpu>,
    engine: Option<Arc<Engine>>,
    subscribers: Vec<Subscriber>,
    stats: Option<Arc<Mutex<StatsWriter>>>,
    /// `--metrics-addr`: bound while the VM is built, served once it is locked down.
    metrics: Option<(Bound, Arc<StatsSource>)>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("devices", &self.devices)
            .field("engine", &self.engine.is_some())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Sets up everything `config` describes, up to the first instruction.
    ///
    /// # Errors
    /// Whatever stops the VM from being built, with its cause.
    pub fn build(config: &VmConfig) -> Result<Self, VmmError> {
        let started = Instant::now();
        config.validate()?;
        let accel = Accelerator::detect();
        log::info!("accelerator: {accel}");
        let kvm = kvm::open(&config.kvm_path)?;
        let cpuid = cpuid::supported(&kvm)?;
        let ram = GuestRam::new(config.mem_bytes, cpuid::phys_bits(cpuid.as_slice()))?;
        let vm_fd = Arc::new(vm::create(&kvm, &ram)?);
        let mm = Arc::new(memory::manager(config, &ram)?);
        let mut devices = Devices::new(config, &vm_fd, &ram, &mm)?;
        let stopper = VcpuStopper::default();
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let buses = (devices.pio.clone(), devices.mmio.clone());
            let mut vcpu = Vcpu::new(&vm_fd, id, buses, ram.memory().clone(), stopper.clone())?;
            // The fault handler gives up first: it frees guest RAM, so that ebb's threads (in
            // the same memory cgroup) can allocate what reporting the cause takes.
            vcpu.set_memory_patience(config.memory.oom_wait + VCPU_EXTRA_PATIENCE);
            vcpus.push(vcpu);
        }
        let boot = load_boot(config, &ram, accel, &devices.cmdline, vcpus[0].tsc_khz())?;
        for vcpu in &vcpus {
            let mut own = cpuid.clone();
            cpuid::normalize(own.as_mut_slice(), vcpu.id(), config.vcpus, accel);
            // A payload starts on every vCPU; Linux starts the others with INIT/SIPI.
            let start = match (&config.boot, vcpu.id()) {
                (_, 0) => Some(boot.clone()),
                (BootSource::Firmware { .. }, id) => Some(firmware::cpu_start(&boot, id)),
                (BootSource::Linux { .. }, _) => None,
            };
            vcpu.configure(&kvm, &own, start.as_ref())?;
        }
        if config.vcpus > 1 {
            log::info!("{} vCPUs", config.vcpus);
        }
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let kernel = matches!(config.boot, BootSource::Linux { .. });
        if kernel && accel.is_software() && usize::from(config.vcpus) > cores {
            // Measured: 8 vCPUs on 2 cores reach user space 4.7x later than 2 (README).
            log::warn!(
                "{} vCPUs on {cores} host cores: on this software-virtualized host the guest \
                 kernel's emulated code slows down when vCPUs outnumber cores; use --vcpus {cores} \
                 or fewer",
                config.vcpus
            );
        }
        // Registered after boot loading, so what ebb wrote into the guest starts out Resident.
        let engine = memory::start_engine(config, &mm, &vm_fd, ram.regions())?;
        let memory = match &engine {
            Some(e) => MemorySource::Engine(e.clone()),
            None => MemorySource::Plain(RssProbe::new(ram.regions())),
        };
        let source = match config.boot {
            BootSource::Firmware { .. } => {
                StatsSource::new(memory).with_progress(ram.memory().clone())
            }
            BootSource::Linux { .. } => StatsSource::new(memory),
        };
        let source = Arc::new(source);
        let mut subscribers: Vec<Subscriber> = Vec::new();
        if let Some(h) = devices.balloon_handler.take() {
            subscribers.push(Arc::new(Mutex::new(h)));
        }
        for h in devices.disk_handlers.drain(..) {
            subscribers.push(Arc::new(Mutex::new(h)));
        }
        if let Some(path) = &config.api_sock {
            let (balloon, transport) = (devices.balloon.clone(), devices.balloon_transport.clone());
            let reclaim =
                engine.as_ref().and_then(|e| e.reclaim().cloned()).map(|r| (r, config.mem_bytes));
            let sharing = engine.as_ref().and_then(|e| e.sharing().cloned());
            let gate = engine.as_ref().map(|e| e.gate().clone());
            let stats = source.clone();
            let ctx =
                ApiContext { balloon, transport, stats, reclaim, sharing, gate, start: started };
            let server = ApiServer::bind(path, ctx)
                .map_err(|source| VmmError::ApiSock { path: path.clone(), source })?;
            subscribers.push(Arc::new(Mutex::new(server)));
        }
        // Bound now (socket, bind and listen are not allowed once the process is locked
        // down); served by `run`.
        let metrics = match config.metrics_addr {
            Some(addr) => Some((
                MetricsServer::bind(addr)
                    .map_err(|source| VmmError::MetricsAddr { addr, source })?,
                source.clone(),
            )),
            None => None,
        };
        let stats = match &config.memory.stats_json {
            Some(path) => Some(Arc::new(Mutex::new(
                StatsWriter::new(path, config.memory.stats_interval, source, started)
                    .map_err(|source| VmmError::StatsJson { path: path.clone(), source })?,
            ))),
            None => None,
        };
        Ok(Self { started, vm_fd, _ram: ram, devices, vcpus, engine, subscribers, stats, metrics })
    }

    /// Runs the guest to its end.
    ///
    /// # Errors
    /// The event loop failed, the vCPU could not run, or the fault handler stopped.
    pub fn run(self) -> Result<RunOutcome, VmmError> {
        let Self { started, vm_fd, _ram, devices, vcpus, engine, subscribers, stats, metrics } =
            self;
        let _http = match metrics {
            Some((bound, source)) => {
                let addr = bound.addr();
                let server = bound
                    .serve(Arc::new(VmSource::new(source, started)))
                    .map_err(|source| VmmError::MetricsAddr { addr, source })?;
                log::info!("metrics on http://{addr}/metrics");
                Some(server)
            }
            None => None,
        };
        crate::mm::sys::prefault_stack(crate::mm::sys::THREAD_STACK_RESERVE);
        let outcome = event_loop::run(vcpus, subscribers, stats, engine.as_deref());
        if let Err(e) = devices.serial.lock().unwrap_or_else(PoisonError::into_inner).flush() {
            log::warn!("flushing serial output: {e}");
        }
        devices.log_disk_metrics();
        if let Some(engine) = engine {
            let m = engine.snapshot(u64::try_from(started.elapsed().as_millis()).unwrap_or(0));
            log::info!(
                "guest memory: consumed {} MiB, {} faults (p50 {:.1} us, p99 {:.1} us), handler CPU {:.0} ms",
                m.consumed_bytes >> 20,
                m.faults,
                m.fault_p50_us,
                m.fault_p99_us,
                m.handler_cpu_ms
            );
        }
        drop(vm_fd);
        outcome
    }
}

/// Runs the VM described by `config` to its end.
///
/// # Errors
/// See [`Vm::build`] and [`Vm::run`].
pub fn run(config: &VmConfig) -> Result<RunOutcome, VmmError> {
    let vm = Vm::build(config)?;
    // Every file, device and socket is open: the process gives up what it no longer needs
    // before the first guest instruction (and before the vCPU thread, which inherits the
    // filter).
    crate::jail::lock_down(&config.jail)?;
    vm.run()
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
            linux::load(mem, ram.mem_bytes(), kernel, initrd.as_deref(), &full, config.vcpus)
        }
        BootSource::Firmware { source, args, blob } => {
            let blob = blob.as_deref().map(firmware::read_blob).transpose()?;
            let blob = blob.as_deref();
            firmware::load(mem, ram.mem_bytes(), source, args, blob, tsc_khz, config.vcpus)
        }
    }
}

/// Re-exported so `main.rs` can name the default payload.
pub use boot::firmware::DEFAULT_PAYLOAD;

/// What a user can do about the handler's failure `e`.
fn fault_handler_advice(e: &FaultError) -> &'static str {
    match e {
        FaultError::Restore(_) | FaultError::Unrestorable { .. } => {
            "a page's stored copy could not be read back, and ebb never gives the guest zeros \
             instead: check the device under --swap-dir (kernel log), or run without \
             --reclaim-target"
        }
        FaultError::OutOfMemory { .. } => {
            "give the VM more memory (its memory cgroup limit), or a larger --oom-wait"
        }
        FaultError::Panicked(_) => {
            "this is a bug in ebb: please report it with the message above; --no-uffd runs \
             without the fault handler"
        }
        _ => "--no-uffd runs without it",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_follows_the_outcome() {
        assert_eq!(exit_status(&VcpuOutcome::Exited(7)), 7);
        assert_eq!(exit_status(&VcpuOutcome::Reset), 0);
        assert_eq!(exit_status(&VcpuOutcome::PowerOff), 0);
        assert_eq!(exit_status(&VcpuOutcome::Stopped(libc::SIGINT)), 130);
        assert_eq!(exit_status(&VcpuOutcome::Stopped(libc::SIGTERM)), 143);
    }
}
