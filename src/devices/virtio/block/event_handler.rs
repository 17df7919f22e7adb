//! Event-loop glue: the queue's notification (ioeventfd).

use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::Block;

/// Runs a disk's queue from the event loop.
pub struct BlockEventHandler {
    block: Arc<Mutex<Block>>,
    queue_evt: EventFd,
}

impl BlockEventHandler {
    /// Watches `queue_evt`, the ioeventfd of queue 0.
    pub fn new(block: Arc<Mutex<Block>>, queue_evt: EventFd) -> Self {
        Self { block, queue_evt }
    }
}

impl MutEventSubscriber for BlockEventHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.queue_evt.read();
        let more = self.block.lock().unwrap_or_else(PoisonError::into_inner).process_queue(0);
        if more {
            // Come back after the loop has served its other events.
            let _ = self.queue_evt.write(1);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evt, EventSet::IN)) {
            log::error!("virtio-blk: cannot watch its queue: {e:?}");
        }
    }
}
