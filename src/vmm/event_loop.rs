//! The VM's threads of control once it runs: one thread per vCPU (`KVM_RUN`) and this
//! thread's event loop (device queues, the control socket, the statistics timer, stop
//! signals), until a vCPU ends (the guest exited, reset, powered off or crashed), the fault
//! handler fails, or SIGINT/SIGTERM arrives. Then every vCPU stops; the VM's outcome is the
//! outcome of the vCPU that ended first.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::signals::{kick_signal, StopSignals};
use super::{RunOutcome, VmmError};
use crate::metrics::StatsWriter;
use crate::mm::engine::{Engine, VcpusStopped};
use crate::mm::fault::FaultError;
use crate::mm::stats::FaultStats;
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuOutcome, VcpuStopper};

/// How often the stopping vCPU threads are kicked until they leave `KVM_RUN` (one kick does
/// it; the repeats are for a thread that is slow to get scheduled).
const KICK_INTERVAL: Duration = Duration::from_millis(10);
/// How long stopping vCPU threads may take before ebb exits without them.
const STOP_PATIENCE: Duration = Duration::from_secs(2);

/// An event-loop subscriber.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Notes that an eventfd fired: the vCPU finished, or the fault handler failed.
#[derive(Debug)]
struct FlagWatcher {
    evt: EventFd,
    done: bool,
}

impl FlagWatcher {
    fn new(evt: EventFd) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self { evt, done: false }))
    }

    fn fired(w: &Arc<Mutex<Self>>) -> bool {
        w.lock().unwrap_or_else(PoisonError::into_inner).done
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

/// The vCPU threads of a running VM.
struct VcpuThreads {
    handles: Vec<JoinHandle<Result<VcpuOutcome, VcpuError>>>,
    /// The index of the vCPU that ended first: its outcome is the VM's.
    first: Arc<Mutex<Option<usize>>>,
    stopper: VcpuStopper,
}

impl VcpuThreads {
    /// Starts one thread per vCPU; each registers with the engine's per-vCPU fault counters
    /// (`faults`) and writes to `ended` when its vCPU is done.
    fn spawn(
        vcpus: Vec<Vcpu>,
        ended: &EventFd,
        faults: Option<&Arc<FaultStats>>,
    ) -> Result<Self, VmmError> {
        let first = Arc::new(Mutex::new(None));
        let stopper = vcpus.first().map(Vcpu::stopper).unwrap_or_default();
        let mut handles = Vec::with_capacity(vcpus.len());
        for (index, mut vcpu) in vcpus.into_iter().enumerate() {
            let ended = ended.try_clone().map_err(VmmError::EventLoopSetup)?;
            let first = first.clone();
            let id = vcpu.id();
            let faults = faults.cloned();
            let handle = thread::Builder::new()
                .name(format!("ebb-vcpu{id}"))
                .spawn(move || {
                    crate::mm::sys::prefault_stack(crate::mm::sys::THREAD_STACK_RESERVE);
                    if let Some(f) = faults {
                        f.vcpus.register_current_thread(usize::from(id));
                    }
                    let outcome = vcpu.run();
                    // Said by the thread itself, so that the order against guest RAM's
                    // release shows in the log (tests/handler_failure.rs reads it).
                    log::debug!("vCPU {id} has left KVM_RUN for good");
                    first.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(index);
                    let _ = ended.write(1);
                    outcome
                })
                .map_err(VmmError::EventLoopSetup)?;
            handles.push(handle);
        }
        Ok(Self { handles, first, stopper })
    }

    fn first_ended(&self) -> Option<usize> {
        *self.first.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn all_finished(&self) -> bool {
        self.handles.iter().all(JoinHandle::is_finished)
    }

    /// Asks every vCPU to stop and kicks the threads still in `KVM_RUN` until all have
    /// ended, for at most [`STOP_PATIENCE`] (a thread that is not in `KVM_RUN` yet sees the
    /// stop before it enters, or enters with `immediate_exit` set); returns true if all did.
    fn stop_all(&self, signal: i32) -> bool {
        use vmm_sys_util::signal::Killable;
        self.stopper.stop(signal);
        let deadline = Instant::now() + STOP_PATIENCE;
        while !self.all_finished() && Instant::now() < deadline {
            for h in self.handles.iter().filter(|h| !h.is_finished()) {
                if let Err(e) = h.kill(kick_signal()) {
                    log::warn!("cannot kick a vCPU thread: {e}");
                }
            }
            thread::sleep(KICK_INTERVAL);
        }
        let stopped = self.all_finished();
        if !stopped {
            let left = self.handles.iter().filter(|h| !h.is_finished()).count();
            log::warn!(
                "{left} vCPU(s) did not stop within {STOP_PATIENCE:?}; exiting without them"
            );
        }
        stopped
    }

    /// Joins every thread (all have ended); returns the outcome of the vCPU that ended
    /// first, and logs what any other vCPU ended with besides being stopped.
    fn join(self) -> Result<VcpuOutcome, VmmError> {
        let first = self.first_ended().unwrap_or(0);
        let mut outcome = None;
        for (index, h) in self.handles.into_iter().enumerate() {
            let result = h.join().map_err(|_| VmmError::VcpuPanic)?;
            if index == first {
                outcome = Some(result);
                continue;
            }
            match result {
                Ok(VcpuOutcome::Stopped(_)) => {}
                Ok(other) => log::warn!("vCPU {index} also ended: {other:?}"),
                Err(e) => log::warn!("vCPU {index} also failed: {e}"),
            }
        }
        Ok(outcome.ok_or(VmmError::VcpuPanic)??)
    }
}

/// Runs every vCPU on its own thread while this thread runs the event loop with
/// `subscribers` and the statistics writer; returns how the guest ended.
pub fn run(
    vcpus: Vec<Vcpu>,
    subscribers: Vec<Subscriber>,
    stats: Option<Arc<Mutex<StatsWriter>>>,
    engine: Option<&Engine>,
) -> Result<RunOutcome, VmmError> {
    let result = run_until_end(vcpus, subscribers, stats.clone(), engine);
    if let Some(s) = &stats {
        // The last line describes the VM as it ended, however it ended.
        if let Err(e) = s.lock().unwrap_or_else(PoisonError::into_inner).write_final_line() {
            log::warn!("writing statistics: {e}");
        }
    }
    result
}

fn run_until_end(
    vcpus: Vec<Vcpu>,
    subscribers: Vec<Subscriber>,
    stats: Option<Arc<Mutex<StatsWriter>>>,
    engine: Option<&Engine>,
) -> Result<RunOutcome, VmmError> {
    let exit_evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmmError::EventLoopSetup)?;
    let threads_ended = exit_evt.try_clone().map_err(VmmError::EventLoopSetup)?;
    let watcher = FlagWatcher::new(exit_evt);
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    events.add_subscriber(watcher.clone());
    let engine_failed = match engine {
        Some(e) => {
            let evt = e.failed_event().try_clone().map_err(VmmError::EventLoopSetup)?;
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
    let signals = Arc::new(Mutex::new(StopSignals::install().map_err(VmmError::EventLoopSetup)?));
    events.add_subscriber(signals.clone());
    let threads = VcpuThreads::spawn(vcpus, &threads_ended, engine.map(Engine::fault_stats))?;
    drop(threads_ended);
    let mut stopped_by = None;
    while !FlagWatcher::fired(&watcher) {
        if engine_failed.as_ref().is_some_and(FlagWatcher::fired) {
            break;
        }
        let received = signals.lock().unwrap_or_else(PoisonError::into_inner).received();
        if let Some(signal) = received {
            stopped_by = Some(signal);
            break;
        }
        events.run().map_err(VmmError::EventLoop)?;
    }
    if let Some(engine) = engine.filter(|e| e.has_failed()) {
        // Also when a vCPU ended meanwhile: the handler's cause comes first.
        return Err(end_after_handler_failure(engine, &threads));
    }
    // One vCPU ended (or a signal came): the others stop with it. The signal, if any, is
    // the stopped vCPUs' outcome; otherwise theirs is not used.
    let all_stopped = threads.stop_all(stopped_by.unwrap_or_else(kick_signal));
    match stopped_by {
        // A vCPU that did not leave KVM_RUN in time: end the VM all the same.
        Some(signal) if !all_stopped => Ok(VcpuOutcome::Stopped(signal)),
        _ if !all_stopped => {
            // The first vCPU's outcome is in; the others' threads are left behind.
            let first = threads.first_ended().unwrap_or(0);
            let VcpuThreads { mut handles, .. } = threads;
            let h = handles.swap_remove(first);
            h.join().map_err(|_| VmmError::VcpuPanic)?.map_err(VmmError::from)
        }
        _ => threads.join(),
    }
}

/// Ends the VM after its fault handler stopped on an error or panicked, in the one order
/// that never lets the guest read a page ebb did not give it: (1) every vCPU is stopped,
/// kicked out of `KVM_RUN` and not let in again, and its thread has ended; (2) only then is
/// guest RAM unregistered (and, after running out of memory, dropped); (3) the cause is
/// returned, for `ebb run` to report before it exits non-zero.
///
/// Unregistering (or closing the descriptor) wakes every thread waiting on a fault, and the
/// kernel then serves the missing page as plain anonymous memory: zeros where an evicted or
/// shared page was. So the vCPUs must be out first. When the handler died, a vCPU is most
/// likely waiting on a fault the handler read and never resolved, inside `KVM_RUN`. The kick
/// still brings it out: KVM's guest-fault path waits interruptibly (`FOLL_INTERRUPTIBLE`,
/// Linux 6.2+; PVM hosts behave the same), so the signal ends the userfaultfd wait with the
/// fault unresolved, `KVM_RUN` returns `EINTR` without retiring the faulting instruction,
/// and the vCPU loop sees the stop request before it would enter again. Where a wait does
/// not end on a kick (an older kernel), only resolving the fault (no one will) or waking it
/// into zeros ends it: then guest RAM stays registered and the descriptor open (`Engine`'s
/// drop leaks it), and ebb reports and exits all the same; the exit's fatal signal ends the
/// wait before the kernel closes the descriptor, so the guest never runs on a zero page.
fn end_after_handler_failure(engine: &Engine, threads: &VcpuThreads) -> VmmError {
    log::warn!("the fault handler stopped: stopping the vCPUs before guest RAM is released");
    // The signal only names the stop in the outcome, which is not used: the error is.
    if threads.stop_all(kick_signal()) {
        engine.release_guest_ram(VcpusStopped::confirmed());
    } else {
        log::error!(
            "a vCPU is still waiting on a fault: guest RAM stays registered until ebb exits"
        );
    }
    let why = engine.take_failure();
    VmmError::FaultHandler(why.unwrap_or_else(|| FaultError::Panicked("no cause recorded".into())))
}
