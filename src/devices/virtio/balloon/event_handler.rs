//! Event-loop glue: queue notifications (ioeventfds) and the statistics polling timer.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::Balloon;

/// Event data of the statistics timer (queue events use their index).
const STATS_TIMER: u32 = u32::MAX;

/// Runs the balloon's queues from the event loop.
pub struct BalloonEventHandler {
    balloon: Arc<Mutex<Balloon>>,
    queue_evts: Vec<EventFd>,
    stats_timer: Option<TimerFd>,
}

impl BalloonEventHandler {
    /// Watches `queue_evts` (index = queue) and, if `stats_interval` is set, polls statistics.
    pub fn new(
        balloon: Arc<Mutex<Balloon>>,
        queue_evts: Vec<EventFd>,
        stats_interval: Option<Duration>,
    ) -> std::io::Result<Self> {
        let stats_timer = match stats_interval {
            Some(interval) => {
                let mut t = TimerFd::new().map_err(std::io::Error::from)?;
                t.reset(interval, Some(interval)).map_err(std::io::Error::from)?;
                Some(t)
            }
            None => None,
        };
        Ok(Self { balloon, queue_evts, stats_timer })
    }
}

impl MutEventSubscriber for BalloonEventHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut balloon = self.balloon.lock().unwrap_or_else(PoisonError::into_inner);
        match events.data() {
            STATS_TIMER => {
                if let Some(t) = &mut self.stats_timer {
                    let _ = t.wait();
                }
                balloon.request_stats();
            }
            index => {
                let evt = usize::try_from(index).ok().and_then(|i| self.queue_evts.get(i));
                if let Some(evt) = evt {
                    let _ = evt.read();
                }
                let more = balloon.process_queue(usize::try_from(index).unwrap_or(usize::MAX));
                if let (true, Some(evt)) = (more, evt) {
                    // Come back after the loop has served its other events.
                    let _ = evt.write(1);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let data = u32::try_from(i).unwrap_or(u32::MAX - 1);
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch queue {i}: {e:?}");
            }
        }
        if let Some(t) = &self.stats_timer {
            if let Err(e) = ops.add(Events::with_data(t, STATS_TIMER, EventSet::IN)) {
                log::error!("virtio-balloon: cannot arm the statistics timer: {e:?}");
            }
        }
    }
}
