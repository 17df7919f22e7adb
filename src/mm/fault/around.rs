//! Fault-around: how many untouched neighbours to map with a faulting page.
//!
//! A userfaultfd round trip costs tens of microseconds, a kernel first-touch fault one or two,
//! so a guest that walks memory in order should get its pages mapped ahead of it. A guest
//! that touches scattered pages should not: every neighbour mapped for nothing is Consumed
//! memory the host backs for no use.
//!
//! The adaptive window works as the kernel's readahead does: it follows up to
//! [`STREAMS`] sequential streams for each faulting thread (each vCPU, on an SMP guest), so
//! that vCPUs walking memory side by side never look scattered to each other, and one
//! vCPU's scattered faults never push another's streams out. A fault at the page where one of
//! its thread's streams' last fill ended doubles that stream's window (1, 2, 4, ... up to the
//! maximum); any other fault starts a new stream with no neighbours, replacing that thread's
//! stream least recently used. A strided or random access pattern never grows a window, so it
//! costs one page per fault. At most [`THREADS`] threads are followed; a new one takes the
//! place of the one that faulted least recently.

/// Most neighbours one fault may fill: one ioctl maps 1 + 255 pages, 1 MiB.
pub const MAX_FAULT_AROUND: u64 = 255;
/// Sequential streams followed at once for each thread.
pub const STREAMS: usize = 4;
/// Faulting threads followed at once (every vCPU of the largest VM, and then some).
pub const THREADS: usize = 64;

/// How many neighbours to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAround {
    /// Always this many (0: none).
    Fixed(u64),
    /// Grow on sequential faults, up to this many; none on scattered ones.
    Adaptive(u64),
}

impl Default for FaultAround {
    fn default() -> Self {
        Self::Adaptive(MAX_FAULT_AROUND)
    }
}

impl FaultAround {
    /// The largest number of neighbours this setting fills.
    pub fn max(self) -> u64 {
        match self {
            Self::Fixed(n) | Self::Adaptive(n) => n,
        }
    }
}

impl std::fmt::Display for FaultAround {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Adaptive(n) if *n == MAX_FAULT_AROUND => write!(f, "auto"),
            Self::Adaptive(n) => write!(f, "auto:{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// The page after the last fill: a fault here continues the stream.
    next: u64,
    /// Neighbours the next continuing fault fills.
    window: u64,
    /// Fault count when last used (for replacement).
    used: u64,
}

/// One faulting thread's streams.
#[derive(Debug, Clone, Copy, Default)]
struct Thread {
    tid: u32,
    streams: [Stream; STREAMS],
    /// Fault count when it last faulted (for replacement).
    used: u64,
}

/// The fault-around decision of one fault handler.
#[derive(Debug, Clone)]
pub struct Window {
    setting: FaultAround,
    threads: Vec<Thread>,
    /// Index into `threads` of the thread whose fault is being served.
    current: usize,
    faults: u64,
}

impl Window {
    /// A window for `setting`, clamped to [`MAX_FAULT_AROUND`].
    pub fn new(setting: FaultAround) -> Self {
        let setting = match setting {
            FaultAround::Fixed(n) => FaultAround::Fixed(n.min(MAX_FAULT_AROUND)),
            FaultAround::Adaptive(n) => FaultAround::Adaptive(n.min(MAX_FAULT_AROUND)),
        };
        Self { setting, threads: vec![Thread::default()], current: 0, faults: 0 }
    }

    /// Says which thread's fault comes next (0: unknown, which is one more thread).
    pub fn set_thread(&mut self, tid: u32) {
        if self.threads[self.current].tid == tid {
            return;
        }
        if let Some(i) = self.threads.iter().position(|t| t.tid == tid) {
            self.current = i;
            return;
        }
        let fresh = Thread { tid, ..Thread::default() };
        if self.threads.len() < THREADS {
            self.threads.push(fresh);
            self.current = self.threads.len() - 1;
        } else if let Some((i, t)) = self.threads.iter_mut().enumerate().min_by_key(|(_, t)| t.used)
        {
            *t = fresh;
            self.current = i;
        }
    }

    /// Neighbours to try to fill after a fault at page `idx`.
    pub fn neighbours(&mut self, idx: u64) -> u64 {
        let max = match self.setting {
            FaultAround::Fixed(n) => return n,
            FaultAround::Adaptive(max) => max,
        };
        self.faults += 1;
        let faults = self.faults;
        let thread = &mut self.threads[self.current];
        thread.used = faults;
        if let Some(s) = thread.streams.iter_mut().find(|s| s.next == idx && s.used > 0) {
            s.window = (s.window * 2).clamp(1, max.max(1)).min(max);
            s.used = faults;
            return s.window;
        }
        let oldest = thread.streams.iter_mut().min_by_key(|s| s.used);
        if let Some(s) = oldest {
            *s = Stream { next: idx, window: 0, used: faults };
        }
        0
    }

    /// Records that a fault at `idx` mapped `pages` pages from `idx` on (at least 1).
    pub fn filled(&mut self, idx: u64, pages: u64) {
        let thread = &mut self.threads[self.current];
        if let Some(s) = thread.streams.iter_mut().find(|s| s.next == idx && s.used == self.faults)
        {
            s.next = idx + pages.max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Faults a walk over `order` in a region of `END` pages, filling what the window asks
    /// for; returns the pages mapped and the faults taken.
    fn walk(setting: FaultAround, order: impl Iterator<Item = u64>) -> (u64, u64) {
        const END: u64 = 1 << 20;
        let mut w = Window::new(setting);
        let mut mapped = std::collections::BTreeSet::new();
        let mut faults = 0;
        for idx in order {
            if mapped.contains(&idx) {
                continue;
            }
            faults += 1;
            let extra = w.neighbours(idx);
            let n = 1
                + (1..=extra).take_while(|i| idx + i < END && !mapped.contains(&(idx + i))).count()
                    as u64;
            mapped.extend(idx..idx + n);
            w.filled(idx, n);
        }
        (mapped.len() as u64, faults)
    }

    #[test]
    fn a_sequential_walk_doubles_the_window_up_to_the_maximum() {
        let mut w = Window::new(FaultAround::default());
        let mut idx = 100;
        let mut windows = Vec::new();
        for _ in 0..11 {
            let n = w.neighbours(idx);
            windows.push(n);
            w.filled(idx, n + 1);
            idx += n + 1;
        }
        assert_eq!(windows, [0, 1, 2, 4, 8, 16, 32, 64, 128, 255, 255]);
    }

    #[test]
    fn sequential_first_touch_takes_few_faults() {
        let (mapped, faults) = walk(FaultAround::default(), 0..16384);
        assert!((16384..16384 + 256).contains(&mapped), "at most one window past the end");
        assert!(faults < 16384 / 200, "{faults} faults");
    }

    #[test]
    fn strided_and_scattered_access_maps_only_what_is_touched() {
        let (mapped, faults) = walk(FaultAround::default(), (0..4096).map(|p| p * 8));
        assert_eq!((mapped, faults), (4096, 4096));
        // A multiplicative permutation: every page once, in scattered order.
        let n = 4096u64;
        let (mapped, _) = walk(FaultAround::default(), (0..n).map(|i| (i * 2_654_435_761) % n));
        assert!(mapped <= n);
        let sparse = (0..2000u64).map(|i| (i * 2_654_435_761) % 100_000);
        let (mapped, _) = walk(FaultAround::default(), sparse);
        assert!(mapped <= 2000 + 2000 / 10, "scattered touches map at most 10% extra: {mapped}");
    }

    #[test]
    fn interleaved_streams_each_keep_their_window() {
        let mut w = Window::new(FaultAround::default());
        let (mut a, mut b) = (0u64, 1 << 20);
        let mut last = (0, 0);
        for _ in 0..6 {
            let na = w.neighbours(a);
            w.filled(a, na + 1);
            a += na + 1;
            let nb = w.neighbours(b);
            w.filled(b, nb + 1);
            b += nb + 1;
            last = (na, nb);
        }
        assert_eq!(last, (16, 16));
    }

    #[test]
    fn many_threads_walking_side_by_side_each_keep_their_window() {
        // Eight vCPUs each walk their own region in order, their faults interleaved: with
        // streams shared by every thread, eight walkers would push each other out of four
        // streams and every fault would look scattered.
        let mut w = Window::new(FaultAround::default());
        let mut next: Vec<u64> = (0..8u64).map(|t| t << 24).collect();
        let mut last = vec![0; 8];
        for _ in 0..8 {
            for (t, idx) in next.iter_mut().enumerate() {
                w.set_thread(1000 + u32::try_from(t).unwrap());
                let n = w.neighbours(*idx);
                w.filled(*idx, n + 1);
                *idx += n + 1;
                last[t] = n;
            }
        }
        assert_eq!(last, vec![64; 8]);
    }

    #[test]
    fn one_threads_scattered_faults_leave_another_threads_stream_alone() {
        let mut w = Window::new(FaultAround::default());
        let mut idx = 0;
        for round in 0..6u64 {
            w.set_thread(7);
            let n = w.neighbours(idx);
            w.filled(idx, n + 1);
            idx += n + 1;
            w.set_thread(8);
            for k in 0..8 {
                let scattered = (round * 8 + k) * 7919 + (1 << 30);
                assert_eq!(w.neighbours(scattered), 0);
                w.filled(scattered, 1);
            }
        }
        w.set_thread(7);
        assert_eq!(w.neighbours(idx), 32, "thread 7's stream survived thread 8's faults");
    }

    #[test]
    fn the_least_recent_thread_makes_room_for_a_new_one() {
        let mut w = Window::new(FaultAround::default());
        for tid in 1..=u32::try_from(THREADS).unwrap() + 10 {
            w.set_thread(tid);
            w.neighbours(u64::from(tid) << 20);
        }
        assert_eq!(w.threads.len(), THREADS);
    }

    #[test]
    fn fixed_settings_ignore_the_pattern() {
        let mut w = Window::new(FaultAround::Fixed(15));
        assert_eq!((w.neighbours(7), w.neighbours(900)), (15, 15));
        assert_eq!(Window::new(FaultAround::Fixed(1000)).neighbours(0), MAX_FAULT_AROUND);
        assert_eq!(Window::new(FaultAround::Fixed(0)).neighbours(0), 0);
    }

    #[test]
    fn a_short_fill_continues_the_stream_where_it_stopped() {
        let mut w = Window::new(FaultAround::default());
        assert_eq!(w.neighbours(10), 0);
        w.filled(10, 1);
        assert_eq!(w.neighbours(11), 1);
        w.filled(11, 1); // the neighbour was already mapped
        assert_eq!(w.neighbours(12), 2, "the fault at the stop continues the stream");
    }

    #[test]
    fn settings_display_as_the_command_line_takes_them() {
        assert_eq!(FaultAround::default().to_string(), "auto");
        assert_eq!(FaultAround::Fixed(0).to_string(), "0");
        assert_eq!(FaultAround::Adaptive(63).to_string(), "auto:63");
    }
}
