//! SIGINT and SIGTERM end the VM the orderly way: the vCPU stops, the last statistics line
//! is written, the control socket is removed, and ebb exits with status 128 + the signal
//! number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by it.
//!
//! The handlers only note the signal and write to an eventfd the event loop watches
//! (async-signal-safe: an atomic store and `write(2)`). The event loop then asks the vCPU to
//! stop and kicks every vCPU thread with [`kick_signal`], whose handler sets the thread's
//! `kvm_run.immediate_exit`, so that `KVM_RUN` returns `EINTR` whether the kick lands inside
//! it or just before it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The eventfd the handlers write to (-1 before [`StopSignals::install`]).
static NOTIFY_FD: AtomicI32 = AtomicI32::new(-1);
/// The last stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signals that stop a VM.
pub const STOP_SIGNALS: [i32; 2] = [libc::SIGINT, libc::SIGTERM];

/// The signal that kicks a vCPU thread out of `KVM_RUN` (the first real-time signal glibc
/// leaves to programs, as Firecracker uses).
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(num, Ordering::SeqCst);
    let fd = NOTIFY_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes; a stale fd at
        // worst makes the write fail.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    crate::vstate::vcpu::kick_current_vcpu();
}

/// The event-loop side: readable when a stop signal arrived.
#[derive(Debug)]
pub struct StopSignals {
    evt: EventFd,
    received: Option<i32>,
}

impl StopSignals {
    /// Installs the handlers for [`STOP_SIGNALS`] and the vCPU kick.
    ///
    /// # Errors
    /// The eventfd could not be created or a handler not installed.
    pub fn install() -> std::io::Result<Self> {
        // Close-on-exec: a child (`ebb host`'s VMs) that inherited it could wake its loop.
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        // The fd stays open as long as this value lives; the handlers only write to it.
        NOTIFY_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
        for num in STOP_SIGNALS {
            register_signal_handler(num, on_stop_signal).map_err(std::io::Error::from)?;
        }
        register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from)?;
        Ok(Self { evt, received: None })
    }

    /// The stop signal received, if any.
    pub fn received(&self) -> Option<i32> {
        self.received
    }

    /// For a caller without an event loop: consumes the notification, if any, and returns
    /// the stop signal received so far.
    pub fn take(&mut self) -> Option<i32> {
        let _ = self.evt.read();
        let num = RECEIVED.load(Ordering::SeqCst);
        if num != 0 {
            self.received = Some(num);
        }
        self.received
    }

    /// The eventfd that turns readable when a stop signal arrives.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.evt.as_raw_fd()
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        let _ = NOTIFY_FD.compare_exchange(
            self.evt.as_raw_fd(),
            -1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let num = RECEIVED.load(Ordering::SeqCst);
        if num != 0 {
            log::info!("signal {num} received: stopping the VM");
            self.received = Some(num);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch for stop signals: {e:?}");
        }
    }
}
