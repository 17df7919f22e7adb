//! The allocation gate: the lever that makes a VM's new memory wait (ESX's Low state
//! blocks VMs above their target from allocating).
//!
//! While the gate is set to a cap, a guest write that takes a new host page (a first touch,
//! the first write to a zero-page mapping, a page the balloon gave back) waits while the
//! VM's resident pages are at or above the cap: the fault handler puts it back on its retry
//! list and looks again every 10 ms, as reclaim brings the VM down; such a write maps only
//! its own page (no fault-around). Reads map the zero page and consume nothing, so they
//! never wait, nor do swap-ins (the page already counts against the VM). Once faults have
//! been held for [`MAX_WAIT`], they go through until the VM is under its cap again: the
//! gate slows a VM, it never stops it for good (reclaim might be unable to make room).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::units::PAGE_SIZE;

/// Longest a fault is held by the gate.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

/// Value of `cap_pages` when the gate is open.
const OPEN: u64 = u64::MAX;

/// The gate: one cap, set by the control socket, read by the fault handler.
#[derive(Debug)]
pub struct AllocGate {
    cap_pages: AtomicU64,
    /// Faults held back (each retry of a held fault counts once more).
    pub waits: AtomicU64,
    /// Held periods that ran past [`MAX_WAIT`] (faults then went through).
    pub timeouts: AtomicU64,
}

impl Default for AllocGate {
    fn default() -> Self {
        Self {
            cap_pages: AtomicU64::new(OPEN),
            waits: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        }
    }
}

impl AllocGate {
    /// New allocations wait while `bytes` or more are resident (None: never).
    pub fn set(&self, bytes: Option<u64>) {
        self.cap_pages.store(bytes.map_or(OPEN, |b| b / PAGE_SIZE), Ordering::Relaxed);
    }

    /// The cap in bytes, if set.
    pub fn cap_bytes(&self) -> Option<u64> {
        let cap = self.cap_pages.load(Ordering::Relaxed);
        (cap != OPEN).then(|| cap.saturating_mul(PAGE_SIZE))
    }

    /// True if a new allocation must wait with `resident_pages` resident.
    pub fn holds(&self, resident_pages: u64) -> bool {
        resident_pages >= self.cap_pages.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_gate_holds_nothing_and_a_cap_holds_at_and_above_it() {
        let g = AllocGate::default();
        assert!(!g.holds(u64::MAX - 1));
        assert_eq!(g.cap_bytes(), None);
        g.set(Some(100 * PAGE_SIZE));
        assert!(!g.holds(99));
        assert!(g.holds(100));
        assert_eq!(g.cap_bytes(), Some(100 * PAGE_SIZE));
        g.set(None);
        assert!(!g.holds(1000));
    }
}
