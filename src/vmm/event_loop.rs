//! The VM's two threads of control once it runs: the vCPU thread (`KVM_RUN`) and this
//! thread's event loop (device queues, the control socket, the statistics timer, stop
//! signals), until the vCPU ends, the fault handler fails, or SIGINT/SIGTERM arrives.

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
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuOutcome, VcpuStopper};

/// How often a stopping vCPU thread is kicked until it leaves `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_millis(10);
/// How long a stopping vCPU thread may take before ebb exits without it.
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

/// Runs `vcpu` on its own thread while this thread runs the event loop with `subscribers`
/// and the statistics writer; returns how the guest ended.
pub fn run(
    vcpu: Vcpu,
    subscribers: Vec<Subscriber>,
    stats: Option<Arc<Mutex<StatsWriter>>>,
    engine: Option<&Engine>,
) -> Result<RunOutcome, VmmError> {
    let result = run_until_end(vcpu, subscribers, stats.clone(), engine);
    if let Some(s) = &stats {
        // The last line describes the VM as it ended, however it ended.
        if let Err(e) = s.lock().unwrap_or_else(PoisonError::into_inner).write_final_line() {
            log::warn!("writing statistics: {e}");
        }
    }
    result
}

fn run_until_end(
    mut vcpu: Vcpu,
    subscribers: Vec<Subscriber>,
    stats: Option<Arc<Mutex<StatsWriter>>>,
    engine: Option<&Engine>,
) -> Result<RunOutcome, VmmError> {
    let exit_evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmmError::EventLoopSetup)?;
    let signal = exit_evt.try_clone().map_err(VmmError::EventLoopSetup)?;
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
    let stopper = vcpu.stopper();
    let handle = thread::Builder::new()
        .name("ebb-vcpu0".into())
        .spawn(move || {
            crate::mm::sys::prefault_stack(crate::mm::sys::THREAD_STACK_RESERVE);
            let outcome = vcpu.run();
            // Said by the thread itself, so that the order against guest RAM's release
            // shows in the log (tests/handler_failure.rs reads it).
            log::debug!("vCPU 0 has left KVM_RUN for good");
            let _ = signal.write(1);
            outcome
        })
        .map_err(VmmError::EventLoopSetup)?;
    let mut stopped_by = None;
    while !FlagWatcher::fired(&watcher) {
        if engine_failed.as_ref().is_some_and(FlagWatcher::fired) {
            break;
        }
        let received = signals.lock().unwrap_or_else(PoisonError::into_inner).received();
        if let Some(signal) = received {
            stop_vcpu(&stopper, &handle, signal);
            stopped_by = Some(signal);
            break;
        }
        events.run().map_err(VmmError::EventLoop)?;
    }
    if let Some(engine) = engine.filter(|e| e.has_failed()) {
        // Also when the vCPU ended meanwhile: the handler's cause comes first.
        return Err(end_after_handler_failure(engine, &stopper, &handle));
    }
    let outcome = match stopped_by {
        // A vCPU that did not leave KVM_RUN in time: end the VM all the same.
        Some(signal) if !handle.is_finished() => VcpuOutcome::Stopped(signal),
        // The vCPU said it is done (or stopped): its thread ends at once.
        _ => handle.join().map_err(|_| VmmError::VcpuPanic)??,
    };
    Ok(outcome)
}

/// Ends the VM after its fault handler stopped on an error or panicked, in the one order
/// that never lets the guest read a page ebb did not give it: (1) the vCPU is stopped, kicked
/// out of `KVM_RUN` and not let in again, and its thread has ended; (2) only then is guest
/// RAM unregistered (and, after running out of memory, dropped); (3) the cause is returned,
/// for `ebb run` to report before it exits non-zero.
///
/// Unregistering (or closing the descriptor) wakes every thread waiting on a fault, and the
/// kernel then serves the missing page as plain anonymous memory: zeros where an evicted or
/// shared page was. So the vCPU must be out first. When the handler died, the vCPU is most
/// likely waiting on a fault the handler read and never resolved, inside `KVM_RUN`. The kick
/// still brings it out: KVM's guest-fault path waits interruptibly (`FOLL_INTERRUPTIBLE`,
/// Linux 6.2+; PVM hosts behave the same), so the signal ends the userfaultfd wait with the
/// fault unresolved, `KVM_RUN` returns `EINTR` without retiring the faulting instruction,
/// and the vCPU loop sees the stop request before it would enter again. Where a wait does
/// not end on a kick (an older kernel), only resolving the fault (no one will) or waking it
/// into zeros ends it: then guest RAM stays registered and the descriptor open (`Engine`'s
/// drop leaks it), and ebb reports and exits all the same; the exit's fatal signal ends the
/// wait before the kernel closes the descriptor, so the guest never runs on a zero page.
fn end_after_handler_failure(
    engine: &Engine,
    stopper: &VcpuStopper,
    handle: &JoinHandle<Result<VcpuOutcome, VcpuError>>,
) -> VmmError {
    log::warn!("the fault handler stopped: stopping the vCPU before guest RAM is released");
    // The signal only names the stop in the outcome, which is not used: the error is.
    if stop_vcpu(stopper, handle, kick_signal()) {
        engine.release_guest_ram(VcpusStopped::confirmed());
    } else {
        log::error!(
            "the vCPU is still waiting on a fault: guest RAM stays registered until ebb exits"
        );
    }
    let why = engine.take_failure();
    VmmError::FaultHandler(why.unwrap_or_else(|| FaultError::Panicked("no cause recorded".into())))
}

/// Asks the vCPU to stop and kicks its thread until it leaves `KVM_RUN` (a kick that lands
/// just before the thread enters `KVM_RUN` is lost, hence the repeats), for at most
/// [`STOP_PATIENCE`]; returns true if its thread has ended.
fn stop_vcpu(
    stopper: &VcpuStopper,
    handle: &JoinHandle<Result<VcpuOutcome, VcpuError>>,
    signal: i32,
) -> bool {
    use vmm_sys_util::signal::Killable;
    stopper.stop(signal);
    let deadline = Instant::now() + STOP_PATIENCE;
    while !handle.is_finished() && Instant::now() < deadline {
        if let Err(e) = handle.kill(kick_signal()) {
            log::warn!("cannot kick the vCPU thread: {e}");
            break;
        }
        thread::sleep(KICK_INTERVAL);
    }
    let stopped = handle.is_finished();
    if !stopped {
        log::warn!("the vCPU did not stop within {STOP_PATIENCE:?}; exiting without it");
    }
    stopped
}
