//! VMs created, stopped and destroyed while the host runs, and the host's event log.
//!
//! The control socket's thread never touches a VM: it queues an [`Op`] in [`Shared`] with a
//! channel for the answer and wakes the loop, which carries the op out at the start of its
//! next tick (`Supervisor::serve_ops`) and answers. So the supervisor stays the one owner
//! of the VMs, and a create is admitted against the budget by the same code as the
//! description's VMs.
//!
//! The event log is bounded ([`MAX_EVENTS`]): a client that asks too seldom is told how many
//! events it lost, and nothing a client does makes the log grow.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Shared, Supervisor};
use crate::host::child::describe;
use crate::host::config::{admit, check_vm, VmEntry, MAX_VMS};
use crate::host::protocol::{Event, EventKind, EventsReply};

/// Events kept.
pub const MAX_EVENTS: usize = 1024;
/// Ops queued at most (a client flooding creates is refused, not queued).
pub const MAX_OPS: usize = 16;
/// How long a VM asked to stop gets before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the socket's thread waits for the loop to carry an op out.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// A lifecycle request, for the loop.
#[derive(Debug)]
pub enum Op {
    /// Start this VM.
    Create(Box<VmEntry>),
    /// SIGTERM, then SIGKILL after [`STOP_GRACE`].
    Stop(String),
    /// Kill and forget.
    Destroy(String),
}

/// An op and where its answer goes.
pub type Queued = (Op, mpsc::SyncSender<Result<(), String>>);

/// The host's events, the newest [`MAX_EVENTS`].
#[derive(Debug)]
pub struct EventLog {
    events: VecDeque<Event>,
    next_seq: u64,
    start: Instant,
}

impl Default for EventLog {
    fn default() -> Self {
        Self { events: VecDeque::new(), next_seq: 1, start: Instant::now() }
    }
}

impl EventLog {
    /// Records `what`.
    pub fn push(&mut self, what: EventKind) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        let t_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.events.push_back(Event { seq: self.next_seq, t_ms, what });
        self.next_seq += 1;
    }

    /// The events after `after`, at most `limit` of them.
    pub fn after(&self, after: u64, limit: usize) -> EventsReply {
        let oldest = self.events.front().map_or(self.next_seq, |e| e.seq);
        let lost = oldest.saturating_sub(after.saturating_add(1));
        let events: Vec<Event> =
            self.events.iter().filter(|e| e.seq > after).take(limit).cloned().collect();
        let next = events.last().map_or(after.max(oldest.saturating_sub(1)), |e| e.seq);
        EventsReply { events, next, lost }
    }
}

impl Shared {
    /// Queues `op` for the loop; the receiver gets its answer.
    ///
    /// # Errors
    /// Too many ops are waiting already.
    pub fn queue(&mut self, op: Op) -> Result<mpsc::Receiver<Result<(), String>>, String> {
        if self.ops.len() >= MAX_OPS {
            return Err("too many lifecycle requests waiting: try again".into());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.ops.push((op, tx));
        Ok(rx)
    }
}

impl Supervisor {
    /// Carries out the queued ops, answering each.
    pub(super) fn serve_ops(&mut self) {
        let ops = std::mem::take(&mut self.lock().ops);
        for (op, answer) in ops {
            let result = match op {
                Op::Create(entry) => self.create(*entry),
                Op::Stop(name) => self.stop_vm(&name),
                Op::Destroy(name) => self.destroy(&name),
            };
            let _ = answer.try_send(result);
        }
        self.enforce_stops();
    }

    fn slot_of(&self, name: &str) -> Result<usize, String> {
        (self.slots.iter().position(|s| s.spec.entry.name == name))
            .ok_or_else(|| format!("no VM named {name:?}"))
    }

    fn create(&mut self, entry: VmEntry) -> Result<(), String> {
        let name = entry.name.clone();
        let taken = self.slots.iter().map(|s| &s.spec.entry.name);
        if taken.chain(self.pending.iter().map(|s| &s.entry.name)).any(|n| *n == name) {
            return Err(format!(
                "a VM named {name:?} exists: destroy it first, or pick another name"
            ));
        }
        if self.slots.len() + self.pending.len() >= MAX_VMS {
            return Err(format!("the host runs at most {MAX_VMS} VMs"));
        }
        let mut spec = check_vm(entry).map_err(|e| e.to_string())?;
        // Admitted as if it came last in the description: after every VM's reservation.
        let mut all: Vec<_> = self.slots.iter().map(|s| s.spec.clone()).collect();
        all.extend(self.pending.iter().cloned());
        all.push(spec.clone());
        let budget = self.lock().budget_bytes;
        admit(&all, budget).map_err(|e| e.to_string())?;
        spec.start_after = self.start.elapsed() + spec.start_after;
        let reservation = spec.reservation_bytes;
        // Started at once unless it asked to wait; the queue keeps start order.
        let at = self.pending.iter().position(|p| p.start_after <= spec.start_after);
        self.pending.insert(at.unwrap_or(self.pending.len()), spec);
        self.start_due(self.start.elapsed()).map_err(|e| e.to_string())?;
        let mut shared = self.lock();
        shared.reserved_bytes += reservation;
        shared.events.push(EventKind::Created { vm: name });
        Ok(())
    }

    fn stop_vm(&mut self, name: &str) -> Result<(), String> {
        let i = self.slot_of(name)?;
        let s = &mut self.slots[i];
        if s.proc.poll_exit().is_some() {
            return Err(format!("vm {name:?} has ended already"));
        }
        s.proc.signal(libc::SIGTERM);
        s.stop_by.get_or_insert(Instant::now() + STOP_GRACE);
        self.lock().events.push(EventKind::Stopping { vm: name.into() });
        Ok(())
    }

    /// Kills the VMs asked to stop that are still running past their grace.
    fn enforce_stops(&mut self) {
        for s in &mut self.slots {
            if s.stop_by.is_some_and(|t| Instant::now() >= t) && s.proc.poll_exit().is_none() {
                log::warn!(
                    "vm {}: still running {STOP_GRACE:?} after SIGTERM: killed",
                    s.proc.name
                );
                s.proc.kill();
            }
        }
    }

    fn destroy(&mut self, name: &str) -> Result<(), String> {
        if let Some(p) = self.pending.iter().position(|s| s.entry.name == name) {
            let spec = self.pending.remove(p);
            let mut shared = self.lock();
            shared.reserved_bytes = shared.reserved_bytes.saturating_sub(spec.reservation_bytes);
            shared.events.push(EventKind::Destroyed { vm: name.into() });
            return Ok(());
        }
        let i = self.slot_of(name)?;
        let mut slot = self.slots.remove(i);
        slot.proc.kill();
        if let Some(status) = slot.proc.exit_status() {
            log::info!("vm {name}: destroyed ({})", describe(status));
        }
        let mut shared = self.lock();
        shared.vms.retain(|v| v.name != name);
        shared.reserved_bytes = shared.reserved_bytes.saturating_sub(slot.spec.reservation_bytes);
        shared.events.push(EventKind::Destroyed { vm: name.into() });
        drop(shared);
        self.save_state();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: u64) -> EventKind {
        EventKind::Budget { bytes }
    }

    #[test]
    fn the_log_keeps_the_newest_and_says_what_a_late_client_lost() {
        let mut log = EventLog::default();
        assert_eq!(log.after(0, 10), EventsReply { events: vec![], next: 0, lost: 0 });
        for b in 0..(MAX_EVENTS as u64 + 10) {
            log.push(budget(b));
        }
        let r = log.after(0, 5);
        assert_eq!(r.lost, 10, "events 1 to 10 were dropped");
        assert_eq!(r.events[0].seq, 11);
        assert_eq!(r.next, 15);
        let r = log.after(r.next, usize::MAX);
        assert_eq!((r.lost, r.events.len()), (0, MAX_EVENTS - 5));
        let r2 = log.after(r.next, 10);
        assert_eq!((r2.events.len(), r2.next, r2.lost), (0, r.next, 0), "nothing new");
    }
}
