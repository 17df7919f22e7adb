//! The VM's statistics over time: `--stats-json` lines from the event loop.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::mm::engine::{rss_of, Engine};
use crate::mm::stats::MemStats;
use crate::vstate::memory::RamRegion;

/// Where memory statistics come from.
pub enum StatsSource {
    /// The lazy-RAM engine knows every page.
    Engine(Arc<Engine>),
    /// Plain memory (`--no-uffd`): only the mappings' RSS is known.
    Plain(Vec<RamRegion>),
}

impl StatsSource {
    /// A snapshot at `t_ms`.
    pub fn snapshot(&self, t_ms: u64) -> MemStats {
        match self {
            Self::Engine(e) => e.snapshot(t_ms),
            Self::Plain(regions) => {
                let rss = rss_of(regions.iter().copied());
                MemStats {
                    t_ms,
                    consumed_bytes: rss,
                    active_bytes: rss,
                    touched_bytes: rss,
                    rss_bytes: rss,
                    ..Default::default()
                }
            }
        }
    }
}

/// Writes one JSON object per line, every interval and once more at the end.
pub struct StatsWriter {
    out: BufWriter<File>,
    timer: TimerFd,
    source: Arc<StatsSource>,
    start: Instant,
}

impl StatsWriter {
    /// Creates (truncates) `path` and arms the interval timer.
    pub fn new(
        path: &Path,
        interval: Duration,
        source: Arc<StatsSource>,
        start: Instant,
    ) -> std::io::Result<Self> {
        let out = BufWriter::new(File::create(path)?);
        let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
        timer.reset(interval, Some(interval)).map_err(std::io::Error::from)?;
        Ok(Self { out, timer, source, start })
    }

    /// Writes a line now.
    pub fn write_line(&mut self) -> std::io::Result<()> {
        let t_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let stats = self.source.snapshot(t_ms);
        serde_json::to_writer(&mut self.out, &stats)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

impl MutEventSubscriber for StatsWriter {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        if let Err(e) = self.write_line() {
            log::warn!("writing statistics: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("cannot arm the statistics timer: {e:?}");
        }
    }
}
