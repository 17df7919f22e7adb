//! The host's control socket: the same JSON-lines server as a VM's, with the host's
//! requests ([`super::protocol::HostRequest`], every one listed in `docs/api.md`).
//!
//! Two kinds of request wait on the socket's thread, and so can delay the host's other
//! clients by as long: a pass-through waits for the VM (at most 2 s in all, its reply at most
//! 64 KiB), and a lifecycle request (create, stop, destroy) for the host's loop to carry it
//! out (at the next tick's start, which it brings forward; at most 10 s).

use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use super::child::REPLY_TIMEOUT;
use super::poll::{request_within, MAX_REPLY_BYTES};
use super::protocol::{
    BudgetArgs, EventKind, HostRequest, InspectReply, MetricsReply, PassThrough, VmListing,
    VmsReply,
};
use super::supervisor::lifecycle::{Op, OP_TIMEOUT};
use super::supervisor::HostedVm;
use super::supervisor::Shared;
use crate::api::protocol::{parse_line, to_reply, Ack, VersionReply};
use crate::api::{error, Handler};

/// What the host's requests act on.
#[derive(Debug)]
pub struct HostApi {
    shared: Arc<Mutex<Shared>>,
    /// Written when the budget changes, so that the supervisor ticks at once.
    wake: EventFd,
}

impl HostApi {
    /// Requests on `shared`; `wake` is written on a budget change.
    pub fn new(shared: Arc<Mutex<Shared>>, wake: EventFd) -> Self {
        Self { shared, wake }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vms(&self) -> VmsReply {
        let shared = self.lock();
        VmsReply { vms: shared.vms.iter().map(|v| listing(&shared, v)).collect() }
    }

    fn inspect(&self, name: &str) -> Value {
        let shared = self.lock();
        let Some(vm) = shared.vms.iter().find(|v| v.name == name) else {
            return error(format!("no VM named {name:?}"));
        };
        let report = shared.report.vms.iter().find(|r| r.name == name && r.pid == vm.pid);
        to_reply(&InspectReply {
            vm: listing(&shared, vm),
            config: vm.entry.clone(),
            report: report.cloned(),
        })
    }

    /// Queues `op` for the loop, wakes it, and waits for its answer.
    fn lifecycle(&self, op: Op) -> Value {
        let answer = match self.lock().queue(op) {
            Ok(rx) => rx,
            Err(e) => return error(e),
        };
        let _ = self.wake.write(1);
        match answer.recv_timeout(OP_TIMEOUT) {
            Ok(Ok(())) => to_reply(&Ack::OK),
            Ok(Err(e)) => error(e),
            Err(_) => error(format!(
                "the host's loop did not answer within {} s: look again with vms",
                OP_TIMEOUT.as_secs()
            )),
        }
    }

    fn budget(&self, args: BudgetArgs) -> Value {
        // One lock for the change and its event (a second `lock()` while the first guard
        // lives would deadlock: std's mutex is not reentrant).
        let result = {
            let mut shared = self.lock();
            let result = shared.set_budget(args.bytes);
            if result.is_ok() {
                shared.events.push(EventKind::Budget { bytes: args.bytes });
            }
            result
        };
        match result {
            Ok(()) => {
                let _ = self.wake.write(1);
                to_reply(&Ack::OK)
            }
            Err(e) => error(e),
        }
    }

    fn pass_through(&self, args: &PassThrough) -> Value {
        let name = &args.name;
        // The host owns the levers: a client moving one behind the policy would fight it.
        if args.request.is_lever() {
            return error(format!(
                "{} is the host's lever: change the budget, the VM's controls or the policy instead",
                args.request.verb()
            ));
        }
        let sock = self.lock().vms.iter().find(|v| v.name == *name).map(|v| v.sock.clone());
        let Some(sock) = sock else {
            return error(format!("no VM named {name:?}"));
        };
        request_within(&sock, &to_reply(&args.request), REPLY_TIMEOUT, MAX_REPLY_BYTES)
            .unwrap_or_else(|e| error(format!("vm {name:?}: {e}")))
    }
}

/// Most events in one reply (a reply stays under the client's limits).
const MAX_EVENTS_PER_REPLY: usize = 256;

/// `vm` as `vms` lists it: running until its report says it ended (before the first tick
/// there is no report).
fn listing(shared: &Shared, vm: &HostedVm) -> VmListing {
    let report = shared.report.vms.iter().find(|r| r.name == vm.name && r.pid == vm.pid);
    let (running, exit) = report.map_or((true, None), |r| (r.running, r.exit.clone()));
    VmListing { name: vm.name.clone(), pid: vm.pid, running, exit, sock: vm.sock.clone() }
}

impl Handler for HostApi {
    fn handle(&self, line: &str) -> Value {
        let request = match parse_line::<HostRequest>(line) {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        match &request {
            HostRequest::Version(_) => to_reply(&VersionReply::current()),
            HostRequest::Vms(_) => to_reply(&self.vms()),
            HostRequest::HostStats(_) => to_reply(&self.lock().report),
            HostRequest::Metrics(_) => {
                to_reply(&MetricsReply { text: self.lock().report.prometheus() })
            }
            HostRequest::Budget(args) => self.budget(*args),
            HostRequest::Vm(args) => self.pass_through(args),
            HostRequest::Create(args) => self.lifecycle(Op::Create(Box::new(args.vm.clone()))),
            HostRequest::Stop(args) => self.lifecycle(Op::Stop(args.name.clone())),
            HostRequest::Destroy(args) => self.lifecycle(Op::Destroy(args.name.clone())),
            HostRequest::Inspect(args) => self.inspect(&args.name),
            HostRequest::Events(args) => {
                to_reply(&self.lock().events.after(args.after, MAX_EVENTS_PER_REPLY))
            }
        }
    }
}
