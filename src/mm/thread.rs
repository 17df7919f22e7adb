//! What the memory engine's long-lived threads share: a CPU-time clock other threads can
//! read, and the wait loop of a worker pulled by a lever (the reclaim worker, the sharing
//! scanner): it wakes when the lever moves (its kick eventfd) and on its timer, and ends
//! when its stop eventfd is written.

use std::fmt::Display;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI64, Ordering};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::sys::THREAD_STACK_RESERVE;
use super::sys::{clock_ns, current_thread_cpu_clock, poll_readable, prefault_stack};

/// The CPU-time clock of one thread (`pthread_getcpuclockid`), read from other threads so
/// that the thread itself pays nothing for it.
#[derive(Debug)]
pub struct ThreadClock(AtomicI64);

impl Default for ThreadClock {
    fn default() -> Self {
        Self(AtomicI64::new(i64::MIN))
    }
}

impl ThreadClock {
    /// Makes the calling thread the one whose CPU time [`ns`](Self::ns) reports.
    pub fn start_here(&self) {
        if let Some(clock) = current_thread_cpu_clock() {
            self.0.store(i64::from(clock), Ordering::Relaxed);
        }
    }

    /// CPU time the thread has used so far, in nanoseconds (0 before it starts and, as the
    /// clock dies with the thread, after it exits: read it while the VM runs).
    pub fn ns(&self) -> u64 {
        libc::clockid_t::try_from(self.0.load(Ordering::Relaxed)).map_or(0, clock_ns)
    }
}

/// Runs a lever-driven worker on the calling thread: after every wake-up (the lever's
/// `kick`, or `timer`, whose expiry is passed as `ticked`) it calls `wake`, until `stop` is
/// written. An error of `wake` or of the wait ends the loop, logged as `what`'s.
pub fn serve_lever<E: Display>(
    what: &str,
    clock: &ThreadClock,
    [stop, kick]: [&EventFd; 2],
    timer: &mut TimerFd,
    mut wake: impl FnMut(bool) -> Result<(), E>,
) {
    prefault_stack(THREAD_STACK_RESERVE);
    clock.start_here();
    let fds = [stop.as_raw_fd(), kick.as_raw_fd(), timer.as_raw_fd()];
    loop {
        let ticked = match poll_readable(fds, -1) {
            Ok([true, _, _]) => return,
            Ok([_, kicked, ticked]) => {
                if kicked {
                    let _ = kick.read();
                }
                if ticked {
                    let _ = timer.wait();
                }
                ticked
            }
            Err(e) => {
                log::error!("{what}: {e}; it stops");
                return;
            }
        };
        if let Err(e) = wake(ticked) {
            log::error!("{what}: {e}; it stops");
            return;
        }
    }
}
