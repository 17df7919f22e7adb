//! The host's loop, on its main thread: every tick it starts the VMs due, looks once at the
//! sockets of those starting, reaps ended VMs, reads every running VM's statistics over its
//! control socket, measures what each holds, works out free memory and the state, asks the
//! policy, moves the levers that changed, and publishes the report.
//!
//! No VM can stall the tick: the statistics of every VM are read at once under one
//! deadline, and the levers sent at once under another ([`exchange_all`]), each half
//! of the tick at most; a VM that misses a deadline or answers wrongly is *stale*: it keeps
//! its last figures, gets no levers, and is not asked again for 1, 2, 4, then up to
//! [`MAX_BACKOFF_TICKS`] ticks. A VM's socket is looked at once a tick until it comes up,
//! never waited for inside one.
//!
//! Invariants: the supervisor alone moves a VM's levers (what it last sent is in
//! `Slot::sent`, so a lever is sent only when the policy changes it); the budget changes
//! only through [`Shared::set_budget`], which refuses a budget below the reservations; a
//! VM's figures enter the host's sums only through [`figures`] (saturated, clamped, and
//! never below what the VM is measured to hold).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use super::child::{describe, ChildError, Keep, VmExit, VmProcess, REPLY_TIMEOUT};
use super::config::{HostConfig, VmEntry, VmSpec};
use super::figures::{self, Meter};
use super::policy::{keep_reservation, HostView, Policy, Snapshot, VmAction, VmView};
use super::poll::exchange_all;
use super::pressure::{min_free_bytes, MemState, DEFAULT_THRESHOLDS};
use super::protocol::EventKind;
use super::report::{HostReport, VmReport};
use super::state::StateDir;
use crate::api::protocol::{to_reply, BalloonStatsReply, NoArgs, VmRequest};
use crate::mm::sharing::broker::{Broker, DEFAULT_GROUP_SLOTS};
use crate::mm::stats::MemStats;
use crate::mm::thread::ThreadClock;
use crate::units::human_bytes;
use levers::lever_requests;

mod adopt;
mod levers;
pub mod lifecycle;

/// Largest budget: 1 PiB.
pub const MAX_BUDGET_BYTES: u64 = 1 << 50;
/// Host memory kept out of `free` beyond what `MemAvailable` says (other processes' room).
pub const HOST_MARGIN_BYTES: u64 = 64 << 20;
/// Most ticks a stale VM is left out before it is asked again.
pub const MAX_BACKOFF_TICKS: u64 = 8;
/// Shortest time a half tick gives the VMs to answer (with a short tick, a loaded host
/// still gets its answers; the tick then runs long).
pub const MIN_EXCHANGE: Duration = Duration::from_millis(250);

/// What the supervisor and the host's control socket share.
#[derive(Debug)]
pub struct Shared {
    /// The budget, bytes.
    budget_bytes: u64,
    /// Sum of the reservations: the budget may not go below it.
    reserved_bytes: u64,
    /// The last report.
    pub report: HostReport,
    /// Every VM started and not destroyed, in start order.
    pub vms: Vec<HostedVm>,
    /// When the last report was published (None before the first tick).
    pub updated: Option<Instant>,
    /// Lifecycle requests waiting for the loop.
    ops: Vec<lifecycle::Queued>,
    /// What happened.
    pub events: lifecycle::EventLog,
}

/// A VM as the control socket sees it.
#[derive(Debug, Clone)]
pub struct HostedVm {
    /// Its name.
    pub name: String,
    /// Its control socket.
    pub sock: std::path::PathBuf,
    /// Its process id.
    pub pid: u32,
    /// Its description.
    pub entry: VmEntry,
}

impl Shared {
    /// Sets the budget.
    ///
    /// # Errors
    /// A budget below the reservations, with the figures.
    pub fn set_budget(&mut self, bytes: u64) -> Result<(), String> {
        if bytes > MAX_BUDGET_BYTES {
            return Err(format!(
                "a budget of {} is more than the {} ebb manages",
                human_bytes(bytes),
                human_bytes(MAX_BUDGET_BYTES)
            ));
        }
        if bytes == 0 || bytes < self.reserved_bytes {
            return Err(format!(
                "a budget of {} is below the VMs' reservations ({})",
                human_bytes(bytes),
                human_bytes(self.reserved_bytes)
            ));
        }
        self.budget_bytes = bytes;
        Ok(())
    }
}

/// One VM as the supervisor keeps it.
#[derive(Debug)]
struct Slot {
    spec: VmSpec,
    proc: VmProcess,
    /// When it was spawned, while its socket is not up yet.
    starting: Option<Instant>,
    /// Its process's start time (`/proc/PID/stat`), once read: what the state list keeps.
    start_time: Option<u64>,
    /// What the policy sees: `consumed_bytes` is [`figures::counted_bytes`].
    view: VmView,
    /// Consumed bytes as last reported (clamped).
    reported_bytes: u64,
    /// What it was last measured to hold from outside, if it could be.
    measured_bytes: Option<u64>,
    /// Ticks missed in a row (late, or a bad reply): stale while not 0.
    misses: u32,
    /// The tick before which it is not asked (backing off while stale).
    skip_until: u64,
    /// Counters at the last tick, for rates: (faults, refaults, when).
    last_counts: Option<(u64, u64, Instant)>,
    refaults: u64,
    alloc_waits: u64,
    /// CPU of the VM's memory threads (handler, reclaim, sharing), ms.
    cpu_ms: f64,
    progress: Option<u64>,
    saved: u64,
    /// What the policy last asked (reported).
    sent: Option<VmAction>,
    /// Each lever's last request the VM accepted: a lever is sent when its request differs.
    levers: HashMap<&'static str, VmRequest>,
    /// The last lever error, logged once.
    last_error: Option<String>,
    /// Its end was logged.
    exit_logged: bool,
    /// Asked to stop: killed if still running then.
    stop_by: Option<Instant>,
}

/// The host: its VMs, policy, state and clock.
#[derive(Debug)]
pub struct Supervisor {
    slots: Vec<Slot>,
    policy: Box<dyn Policy>,
    shared: Arc<Mutex<Shared>>,
    state: MemState,
    state_since: Instant,
    state_ms: [u64; 5],
    transitions: u64,
    ticks: u64,
    start: Instant,
    clock: ThreadClock,
    tick: Duration,
    /// VMs not started yet, the next one last.
    pending: Vec<VmSpec>,
    exe: std::path::PathBuf,
    dir: std::path::PathBuf,
    /// The sharing groups' brokers (serving while the host runs).
    groups: HashMap<String, Broker>,
    meter: Meter,
    /// Run on when every VM has ended (VMs may be created through the socket).
    keep_running: bool,
    /// The state directory, if the host keeps one.
    state_dir: Option<StateDir>,
    /// Set when VMs outlive the host: where their status files and logs go.
    keep: Option<Keep>,
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Supervisor {
    /// Starts every VM of `config` (`exe run ...`, sockets in `dir`) in order.
    ///
    /// # Errors
    /// A VM that cannot start; the ones started before it are stopped.
    pub fn start(
        config: &HostConfig,
        exe: &Path,
        dir: &Path,
        policy: Box<dyn Policy>,
        state: Option<StateDir>,
        vms_die_with_host: bool,
    ) -> Result<Self, ChildError> {
        let shared = Shared {
            budget_bytes: config.budget_bytes,
            reserved_bytes: config.vms.iter().map(|v| v.reservation_bytes).sum(),
            report: HostReport::default(),
            vms: Vec::new(),
            updated: None,
            ops: Vec::new(),
            events: lifecycle::EventLog::default(),
        };
        let clock = ThreadClock::default();
        clock.start_here();
        let mut pending = config.vms.clone();
        pending.reverse(); // popped from the end, in start order
        let mut sup = Self {
            slots: Vec::new(),
            pending,
            exe: exe.to_owned(),
            dir: dir.to_owned(),
            groups: HashMap::new(),
            meter: Meter::default(),
            keep_running: false,
            keep: state.as_ref().filter(|_| !vms_die_with_host).map(|s| Keep { dir: s.vm_dir() }),
            state_dir: state,
            policy,
            shared: Arc::new(Mutex::new(shared)),
            state: MemState::High,
            state_since: Instant::now(),
            state_ms: [0; 5],
            transitions: 0,
            ticks: 0,
            start: Instant::now(),
            clock,
            tick: config.tick,
        };
        // The VMs an earlier host left running first: they are not started again.
        sup.adopt_saved();
        // Dropping `sup` kills the VMs started before a failure.
        sup.start_due(Duration::ZERO)?;
        sup.wait_started()?;
        Ok(sup)
    }

    /// Waits for the sockets of the VMs started with the host (all at once: the wait is
    /// the slowest one's, not their sum).
    fn wait_started(&mut self) -> Result<(), ChildError> {
        while self.slots.iter().any(|s| s.starting.is_some()) {
            for s in &mut self.slots {
                if let Some(since) = s.starting {
                    if s.proc.socket_up(since)? {
                        s.starting = None;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Looks once at the socket of each VM starting; one that ended or took too long is
    /// logged (it is reported as ended).
    fn check_starting(&mut self) {
        for s in &mut self.slots {
            let Some(since) = s.starting else { continue };
            match s.proc.socket_up(since) {
                Ok(true) => {
                    log::info!("vm {}: control socket up", s.spec.entry.name);
                    s.starting = None;
                }
                Ok(false) => {}
                Err(e) => {
                    log::error!("{e}");
                    s.proc.kill();
                    s.starting = None;
                    s.exit_logged = true;
                }
            }
        }
    }

    /// Starts the VMs whose `start_after_ms` is at most `now` since the host started, in
    /// order, without waiting for their sockets.
    fn start_due(&mut self, now: Duration) -> Result<(), ChildError> {
        let mut started = false;
        let result = self.start_due_inner(now, &mut started);
        if started {
            self.save_state();
        }
        result
    }

    fn start_due_inner(&mut self, now: Duration, started: &mut bool) -> Result<(), ChildError> {
        while let Some(spec) = self.pending.last() {
            if spec.start_after > now {
                break;
            }
            let Some(spec) = self.pending.pop() else { break };
            let spawn_error =
                |source| super::child::ChildError::Spawn { name: spec.entry.name.clone(), source };
            let broker = match &spec.entry.sharing_group {
                Some(name) => Some(match self.groups.entry(name.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Broker::start(name, DEFAULT_GROUP_SLOTS).map_err(spawn_error)?)
                    }
                }),
                None => None,
            };
            // The member's descriptors are the host's until the child inherits them; dropped
            // after the spawn, so the broker sees the member go when the child does.
            let member = broker.map(|b| b.add_member()).transpose().map_err(spawn_error)?;
            let extra = self.policy.vm_args();
            let keep = self.keep.as_ref();
            let proc =
                VmProcess::spawn(&self.exe, &spec, &self.dir, member.as_ref(), &extra, keep)?;
            log::info!("vm {}: started, pid {}", spec.entry.name, proc.pid());
            {
                let mut shared = self.lock();
                shared.vms.push(HostedVm {
                    name: spec.entry.name.clone(),
                    sock: proc.sock.clone(),
                    pid: proc.pid(),
                    entry: spec.entry.clone(),
                });
                shared
                    .events
                    .push(EventKind::Started { vm: spec.entry.name.clone(), pid: proc.pid() });
            }
            self.slots.push(Slot::new(spec, proc));
            *started = true;
        }
        Ok(())
    }

    /// Keeps the host running when every VM has ended (VMs come and go through the socket).
    pub fn keep_running(&mut self, yes: bool) {
        self.keep_running = yes;
    }

    /// What the control socket shares with the loop.
    pub fn shared(&self) -> Arc<Mutex<Shared>> {
        Arc::clone(&self.shared)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs ticks until every VM has ended or `stop` reports a signal; `wake` cuts a tick's
    /// wait short (a budget change). Returns the signal, if one stopped it.
    pub fn run(
        &mut self,
        wake: &EventFd,
        mut stop: impl FnMut() -> Option<i32>,
        stop_fd: std::os::fd::RawFd,
        mut on_report: impl FnMut(&HostReport),
    ) -> Option<i32> {
        loop {
            if let Some(sig) = stop() {
                return Some(sig);
            }
            let report = self.tick_once();
            on_report(&report);
            let all_ended = self.slots.iter_mut().all(|s| s.proc.poll_exit().is_some());
            if all_ended && self.pending.is_empty() && !self.keep_running {
                return None;
            }
            let wait_ms = i32::try_from(self.tick.as_millis()).unwrap_or(i32::MAX);
            let fds = [std::os::fd::AsRawFd::as_raw_fd(wake), stop_fd];
            if let Ok([true, _]) = crate::mm::sys::poll_readable(fds, wait_ms) {
                let _ = wake.read();
            }
        }
    }

    /// One tick: returns the report it published.
    pub fn tick_once(&mut self) -> HostReport {
        let cpu_before = self.clock.ns();
        self.serve_ops();
        if let Err(e) = self.start_due(self.start.elapsed()) {
            log::error!("{e}");
        }
        self.check_starting();
        self.reap();
        let answered = self.read_all();
        self.measure_all();
        let budget = self.lock().budget_bytes;
        let running: Vec<usize> = (0..self.slots.len()).filter(|&i| self.is_running(i)).collect();
        let used = running
            .iter()
            .fold(0u64, |sum, &i| sum.saturating_add(self.slots[i].view.consumed_bytes));
        let min_free = min_free_bytes(budget);
        let free = free_bytes(budget, used, mem_available());
        self.enter(DEFAULT_THRESHOLDS.next(self.state, free, min_free));
        let snap = Snapshot {
            host: HostView {
                budget_bytes: budget,
                free_bytes: free,
                min_free_bytes: min_free,
                state: self.state,
            },
            vms: running.iter().map(|&i| self.slots[i].view.clone()).collect(),
        };
        let actions = self.policy.decide(&snap);
        // The host keeps every reservation, whatever the policy asked. A stale VM gets no
        // levers this tick.
        let levers: Vec<(usize, VmAction)> = (running.iter().zip(actions).zip(&snap.vms))
            .filter(|((i, _), _)| answered.contains(i))
            .map(|((&i, action), vm)| (i, keep_reservation(action, vm)))
            .collect();
        self.apply_all(levers);
        self.ticks += 1;
        let tick_cpu_us = self.clock.ns().saturating_sub(cpu_before) / 1000;
        let report = self.report(&snap.host, tick_cpu_us);
        {
            let mut shared = self.lock();
            shared.report = report.clone();
            shared.updated = Some(Instant::now());
        }
        report
    }

    /// VM `i` is up and has not ended.
    fn is_running(&mut self, i: usize) -> bool {
        let s = &mut self.slots[i];
        s.starting.is_none() && s.proc.poll_exit().is_none()
    }

    /// How long one exchange with the VMs may take: half a tick, within bounds.
    fn exchange_time(&self) -> Duration {
        (self.tick / 2).clamp(MIN_EXCHANGE, REPLY_TIMEOUT)
    }

    fn enter(&mut self, next: MemState) {
        let now = Instant::now();
        let ms =
            u64::try_from(now.duration_since(self.state_since).as_millis()).unwrap_or(u64::MAX);
        self.state_ms[self.state.index()] += ms;
        self.state_since = now;
        if next != self.state {
            log::info!("memory state {} -> {next}", self.state);
            let (from, to) = (self.state.name().into(), next.name().into());
            self.lock().events.push(EventKind::State { from, to });
            self.transitions += 1;
            self.state = next;
        }
    }

    fn reap(&mut self) {
        let mut ended = false;
        for s in &mut self.slots {
            let Some(status) = s.proc.poll_exit() else { continue };
            if std::mem::replace(&mut s.exit_logged, true) {
                continue;
            }
            let how = describe(status);
            if status.success() {
                log::info!("vm {}: ended ({how})", s.spec.entry.name);
            } else {
                log::warn!("vm {}: ended ({how})", s.spec.entry.name);
            }
            let vm = s.spec.entry.name.clone();
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .events
                .push(EventKind::Ended { vm, how });
            ended = true;
        }
        if ended {
            self.save_state();
        }
    }

    /// Reads the statistics of every running VM not backing off, all at once; returns the
    /// VMs that answered.
    fn read_all(&mut self) -> Vec<usize> {
        let ticks = self.ticks;
        let ask: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.is_running(i) && self.slots[i].skip_until <= ticks)
            .collect();
        let jobs: Vec<(&std::path::Path, Vec<Value>)> = (ask.iter().map(|&i| &self.slots[i]))
            .map(|s| {
                let mut reqs = vec![to_reply(&VmRequest::Stats(NoArgs {}))];
                if s.spec.balloon.is_some() {
                    reqs.push(to_reply(&VmRequest::BalloonStats(NoArgs {})));
                }
                (s.proc.sock.as_path(), reqs)
            })
            .collect();
        let results = exchange_all(&jobs, Instant::now() + self.exchange_time());
        let mut answered = Vec::with_capacity(ask.len());
        for (i, result) in ask.into_iter().zip(results) {
            let s = &mut self.slots[i];
            match result.map_err(|e| e.to_string()).and_then(|r| s.take_stats(&r)) {
                Ok(()) => {
                    s.answered();
                    answered.push(i);
                }
                Err(msg) => s.missed(ticks, &msg),
            }
        }
        answered
    }

    /// Measures what each running VM holds; the larger of that and its report counts.
    fn measure_all(&mut self) {
        for i in 0..self.slots.len() {
            if !self.is_running(i) {
                continue;
            }
            let s = &mut self.slots[i];
            s.measured_bytes = self.meter.measure(s.proc.pid(), None);
            s.view.consumed_bytes = figures::counted_bytes(s.reported_bytes, s.measured_bytes);
        }
    }

    /// Moves each VM's levers where its action differs from what was sent, all VMs at once.
    fn apply_all(&mut self, actions: Vec<(usize, VmAction)>) {
        let mut sent = Vec::with_capacity(actions.len());
        for (i, action) in actions {
            let s = &mut self.slots[i];
            let changed: Vec<(&'static str, VmRequest)> =
                lever_requests(&action, s.spec.balloon.is_some(), s.spec.reservation_bytes)
                    .into_iter()
                    .filter(|(lever, req)| s.levers.get(lever) != Some(req))
                    .collect();
            s.sent = Some(action);
            if !changed.is_empty() {
                sent.push((i, changed));
            }
        }
        let jobs: Vec<(&std::path::Path, Vec<Value>)> = (sent.iter())
            .map(|(i, reqs)| {
                (
                    self.slots[*i].proc.sock.as_path(),
                    reqs.iter().map(|(_, r)| to_reply(r)).collect(),
                )
            })
            .collect();
        let results = exchange_all(&jobs, Instant::now() + self.exchange_time());
        let ticks = self.ticks;
        for ((i, reqs), result) in sent.into_iter().zip(results) {
            let s = &mut self.slots[i];
            match result {
                Ok(replies) => {
                    let accepted = s.take_lever_replies(reqs, &replies);
                    let vm = &s.spec.entry.name;
                    let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
                    for request in accepted {
                        shared.events.push(EventKind::Lever { vm: vm.clone(), request });
                    }
                }
                Err(e) => s.missed(ticks, &format!("levers: {e}")),
            }
        }
    }

    fn report(&self, host: &HostView, tick_cpu_us: u64) -> HostReport {
        let mut state_ms = self.state_ms;
        state_ms[self.state.index()] +=
            u64::try_from(self.state_since.elapsed().as_millis()).unwrap_or(u64::MAX);
        HostReport {
            t_ms: u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            policy: self.policy.name().into(),
            budget_bytes: host.budget_bytes,
            free_bytes: host.free_bytes,
            min_free_bytes: host.min_free_bytes,
            state: host.state.name().into(),
            transitions: self.transitions,
            state_ms,
            ticks: self.ticks,
            tick_cpu_us,
            host_cpu_ms: self.clock.ns() as f64 / 1e6,
            vms: self.slots.iter().map(Slot::report).collect(),
        }
    }

    /// Stops every VM: SIGTERM to all, then waits up to `grace` for each.
    pub fn stop_all(&mut self, grace: Duration) {
        for s in &mut self.slots {
            s.proc.signal(libc::SIGTERM);
        }
        for s in &mut self.slots {
            if let Some(status) = s.proc.stop(grace) {
                log::info!("vm {}: stopped ({})", s.spec.entry.name, describe(status));
            }
        }
        // None runs now: a host started on the state directory has nothing to adopt.
        self.save_state();
    }

    /// Each VM's name and how it ended (None: still running).
    pub fn exits(&mut self) -> Vec<(String, Option<VmExit>)> {
        self.slots.iter_mut().map(|s| (s.spec.entry.name.clone(), s.proc.poll_exit())).collect()
    }
}

impl Slot {
    /// A VM just started (or adopted), its socket not up yet.
    fn new(spec: VmSpec, proc: VmProcess) -> Self {
        Slot {
            view: figures::base_view(&spec),
            spec,
            proc,
            starting: Some(Instant::now()),
            start_time: None,
            reported_bytes: 0,
            measured_bytes: None,
            misses: 0,
            skip_until: 0,
            last_counts: None,
            refaults: 0,
            alloc_waits: 0,
            cpu_ms: 0.0,
            progress: None,
            saved: 0,
            sent: None,
            levers: HashMap::new(),
            last_error: None,
            exit_logged: false,
            stop_by: None,
        }
    }

    /// Takes a `stats` (and `balloon_stats`) reply into the view.
    fn take_stats(&mut self, replies: &[Value]) -> Result<(), String> {
        let stats = replies.first().ok_or("no stats reply")?;
        if let Some(e) = stats.get("error") {
            return Err(format!("stats refused: {e}"));
        }
        // A reply that is not the statistics (a field missing, of the wrong type, negative)
        // is a VM answering wrongly: it is marked stale, as a late one is.
        let stats = MemStats::deserialize(stats).map_err(|e| format!("stats reply: {e}"))?;
        let balloon_ready = match replies.get(1) {
            None => false,
            Some(b) if b.get("error").is_some() => false,
            Some(b) => {
                BalloonStatsReply::deserialize(b)
                    .map_err(|e| format!("balloon_stats reply: {e}"))?
                    .driver_ready
            }
        };
        let f = figures::read(&self.spec, &stats, balloon_ready);
        let now = Instant::now();
        let (fault_rate, refault_rate) = match self.last_counts {
            Some((f0, r0, t0)) => {
                let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
                (f.faults.saturating_sub(f0) as f64 / dt, f.refaults.saturating_sub(r0) as f64 / dt)
            }
            None => (0.0, 0.0),
        };
        self.last_counts = Some((f.faults, f.refaults, now));
        self.refaults = f.refaults;
        self.alloc_waits = f.alloc_waits;
        self.cpu_ms = f.cpu_ms;
        self.progress = f.progress;
        self.saved = f.saved;
        self.reported_bytes = f.view.consumed_bytes;
        // Until the next measure, the last one still holds.
        let consumed = figures::counted_bytes(self.reported_bytes, self.measured_bytes);
        self.view = VmView { consumed_bytes: consumed, fault_rate, refault_rate, ..f.view };
        Ok(())
    }

    /// Records each lever the VM accepted, and returns them; logs a refusal once.
    fn take_lever_replies(
        &mut self,
        reqs: Vec<(&'static str, VmRequest)>,
        replies: &[Value],
    ) -> Vec<VmRequest> {
        let mut accepted = Vec::with_capacity(reqs.len());
        for ((lever, req), reply) in reqs.into_iter().zip(replies) {
            match reply.get("error") {
                // Not recorded as sent: the next tick tries again.
                Some(e) => {
                    let msg = format!("vm {}: {} refused: {e}", self.spec.entry.name, req.verb());
                    if self.last_error.as_deref() != Some(msg.as_str()) {
                        log::warn!("{msg}");
                        self.last_error = Some(msg);
                    }
                }
                None => {
                    accepted.push(req.clone());
                    self.levers.insert(lever, req);
                }
            }
        }
        accepted
    }

    /// The VM answered in time.
    fn answered(&mut self) {
        if self.misses > 0 {
            log::info!(
                "vm {}: answers again after {} missed ticks",
                self.spec.entry.name,
                self.misses
            );
        }
        self.misses = 0;
    }

    /// The VM missed tick `tick` (`why`): stale, and left out for the next 1, 2, 4 ... up
    /// to [`MAX_BACKOFF_TICKS`] ticks.
    fn missed(&mut self, tick: u64, why: &str) {
        self.misses = self.misses.saturating_add(1);
        let skip = 1u64.checked_shl(self.misses - 1).unwrap_or(u64::MAX).min(MAX_BACKOFF_TICKS);
        self.skip_until = tick.saturating_add(1).saturating_add(skip);
        let name = &self.spec.entry.name;
        if self.proc.poll_exit().is_some() {
            log::debug!("vm {name}: {why} (it has ended)");
        } else if !self.proc.sock.exists() {
            // `ebb run` removes its socket as it ends: no warning for a VM ending.
            log::info!("vm {name}: its control socket is gone (ending?)");
        } else if self.misses == 1 {
            log::warn!("vm {name}: stale ({why}): not asked for {skip} ticks");
        } else {
            log::debug!("vm {name}: stale ({why}), {} ticks in a row", self.misses);
        }
    }

    fn report(&self) -> VmReport {
        let v = &self.view;
        let sent = self.sent.clone().unwrap_or_default();
        let exit_status = self.proc.exit_status().map(describe);
        VmReport {
            name: self.spec.entry.name.clone(),
            pid: self.proc.pid(),
            running: exit_status.is_none(),
            exit: exit_status,
            configured_bytes: self.spec.memory_bytes,
            consumed_bytes: v.consumed_bytes,
            resident_bytes: v.resident_bytes,
            active_bytes: v.active_bytes,
            shared_bytes: v.shared_bytes,
            sharing_saved_bytes: self.saved,
            ballooned_bytes: v.ballooned_bytes,
            compressed_bytes: v.compressed_bytes,
            swapped_bytes: v.swapped_bytes,
            target_bytes: sent.target_bytes,
            balloon_target_bytes: sent.balloon_bytes,
            reclaim_target_bytes: sent.reclaim_target_bytes,
            share_scan_rate: sent.share_scan_rate,
            alloc_wait_above_bytes: sent.alloc_wait_above_bytes,
            alloc_waits: self.alloc_waits,
            memory_cpu_ms: self.cpu_ms,
            shares: self.spec.shares,
            reservation_bytes: self.spec.reservation_bytes,
            limit_bytes: self.spec.limit_bytes,
            balloon_ready: v.balloon_ready,
            refaults: self.refaults,
            guest_progress: self.progress,
            measured_bytes: self.measured_bytes,
            stale: self.misses > 0,
        }
    }
}

/// Free memory: the budget less what the VMs use, but never more than the host has
/// available (less a margin), so that other processes' pressure counts too.
pub fn free_bytes(budget: u64, used: u64, available: Option<u64>) -> i64 {
    let by_budget = i128::from(budget) - i128::from(used);
    let by_host = available.map_or(i128::MAX, |a| i128::from(a) - i128::from(HOST_MARGIN_BYTES));
    let free = by_budget.min(by_host);
    i64::try_from(free).unwrap_or(if free < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_memory_is_the_budget_left_unless_the_host_has_less() {
        assert_eq!(free_bytes(1000, 400, None), 600);
        assert_eq!(free_bytes(1000, 1400, None), -400);
        let avail = HOST_MARGIN_BYTES + 100;
        assert_eq!(free_bytes(1 << 30, 0, Some(avail)), 100);
        assert_eq!(free_bytes(1 << 30, 0, Some(0)), -i64::try_from(HOST_MARGIN_BYTES).unwrap());
    }
}
