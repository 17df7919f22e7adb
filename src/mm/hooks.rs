//! Pause points for race tests: a test arms a point, the engine thread that reaches it stops
//! there until the test releases it, and the test does its racing access in between. That
//! turns a window of a few instructions into one a test hits every time.
//!
//! Disarmed (always, outside tests), a point costs one relaxed atomic load. Only code in
//! ebb's own process can arm one (there is no option, request or variable that does), so a
//! guest or a client of the control socket cannot. A paused thread waits at most
//! [`MAX_PAUSE`], so a test that forgets to release never wedges the engine for good.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// The longest a thread stays at a pause point.
pub const MAX_PAUSE: Duration = Duration::from_secs(20);

/// A pause point; see the module docs.
#[derive(Debug)]
pub struct PausePoint {
    armed: AtomicBool,
    /// (reached, released)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl PausePoint {
    const fn new() -> Self {
        Self {
            armed: AtomicBool::new(false),
            state: Mutex::new((false, false)),
            changed: Condvar::new(),
        }
    }

    /// Makes the next thread that reaches the point stop there (once).
    pub fn arm(&self) {
        *self.lock() = (false, false);
        self.armed.store(true, Ordering::Release);
    }

    /// Waits until a thread stopped at the point; false after `timeout` without one.
    pub fn wait_reached(&self, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| !s.0)
            .unwrap_or_else(PoisonError::into_inner);
        guard.0
    }

    /// Lets the stopped thread (or the next to arrive) go on, and disarms the point.
    pub fn release(&self) {
        self.armed.store(false, Ordering::Release);
        self.lock().1 = true;
        self.changed.notify_all();
    }

    /// Called by the engine where the race is: stops here if armed.
    pub(crate) fn reach(&self) {
        // A load first: the disarmed path (every fault) must not write the shared line.
        if !self.armed.load(Ordering::Relaxed) || !self.armed.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut guard = self.lock();
        guard.0 = true;
        self.changed.notify_all();
        let _ = self
            .changed
            .wait_timeout_while(guard, MAX_PAUSE, |s| !s.1)
            .unwrap_or_else(PoisonError::into_inner);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// In the fault handler, after a missing fault's pages (the faulting one and its
/// fault-around neighbours) are claimed and before they are mapped.
pub static FILL_BEFORE_MAP: PausePoint = PausePoint::new();
/// In a swap-in reader, after it took a Swapped page's read and before it reads the swap
/// file: a test pauses it there to play a slow disk.
pub static SWAPIN_BEFORE_READ: PausePoint = PausePoint::new();
/// In a copy-on-write break, after the guest page has its fresh private memory and before
/// the shared contents are copied in.
pub static UNSHARE_BEFORE_COPY: PausePoint = PausePoint::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disarmed_point_lets_every_thread_through() {
        static P: PausePoint = PausePoint::new();
        P.reach();
        assert!(!P.wait_reached(Duration::from_millis(1)));
    }

    #[test]
    fn an_armed_point_stops_one_thread_until_released() {
        static P: PausePoint = PausePoint::new();
        P.arm();
        let t = std::thread::spawn(|| P.reach());
        assert!(P.wait_reached(Duration::from_secs(5)));
        assert!(!t.is_finished());
        P.release();
        t.join().unwrap();
        P.reach(); // disarmed again
    }
}
