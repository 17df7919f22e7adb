//! Counting what a guest does wrong without letting it flood the log: each kind of mistake
//! is counted every time and logged the first time only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One guest-misbehaviour counter that logs its first occurrence only.
#[derive(Debug, Default)]
pub struct GuestErrorCounter {
    count: AtomicU64,
    logged: AtomicBool,
}

impl GuestErrorCounter {
    /// Counts one occurrence; logs `what` (formatted only then) the first time.
    pub fn hit(&self, what: impl FnOnce() -> String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if !self.logged.swap(true, Ordering::Relaxed) {
            let what = what();
            log::warn!("guest error: {what} (logged once; see the device metrics)");
        }
    }

    /// Occurrences so far.
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hit_counts_but_only_the_first_is_formatted() {
        let c = GuestErrorCounter::default();
        let mut formatted = 0;
        for _ in 0..1000 {
            c.hit(|| {
                formatted += 1;
                "bad".into()
            });
        }
        assert_eq!((c.get(), formatted), (1000, 1));
    }
}
