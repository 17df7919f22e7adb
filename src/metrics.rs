//! The VM's statistics over time: `--stats-json` lines from the event loop.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use vm_memory::GuestMemoryMmap;

use crate::boot::firmware::read_progress;
use crate::mm::engine::Engine;
use crate::mm::rss::RssProbe;
use crate::mm::stats::MemStats;

/// Where memory statistics come from.
#[derive(Debug)]
pub enum MemorySource {
    /// The lazy-RAM engine knows every page.
    Engine(Arc<Engine>),
    /// Plain memory (`--no-uffd`): only the mappings' RSS is known.
    Plain(RssProbe),
}

/// What a statistics line is made of: the memory figures, and a firmware payload's progress
/// counter when it has one.
#[derive(Debug)]
pub struct StatsSource {
    memory: MemorySource,
    progress: Option<Arc<GuestMemoryMmap>>,
}

impl StatsSource {
    /// Statistics of `memory`, without a progress counter.
    pub fn new(memory: MemorySource) -> Self {
        Self { memory, progress: None }
    }

    /// Adds the progress counter a firmware payload keeps in `mem`.
    pub fn with_progress(mut self, mem: Arc<GuestMemoryMmap>) -> Self {
        self.progress = Some(mem);
        self
    }

    /// Makes the next snapshot read the host's RSS afresh.
    pub fn refresh(&self) {
        match &self.memory {
            MemorySource::Engine(e) => e.rss().invalidate(),
            MemorySource::Plain(probe) => probe.invalidate(),
        }
    }

    /// A snapshot at `t_ms`.
    pub fn snapshot(&self, t_ms: u64) -> MemStats {
        let mut stats = match &self.memory {
            MemorySource::Engine(e) => e.snapshot(t_ms),
            MemorySource::Plain(regions) => {
                let rss = regions.bytes();
                MemStats {
                    t_ms,
                    consumed_bytes: rss,
                    active_bytes: rss,
                    touched_bytes: rss,
                    rss_bytes: rss,
                    ..Default::default()
                }
            }
        };
        stats.guest_progress = self.progress.as_deref().and_then(|m| read_progress(m).ok());
        stats
    }
}

/// Writes one JSON object per line, every interval and once more at the end.
#[derive(Debug)]
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

    /// Writes the last line, with a fresh reading of the host's RSS.
    pub fn write_final_line(&mut self) -> std::io::Result<()> {
        self.source.refresh();
        self.write_line()
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
