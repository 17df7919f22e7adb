//! The host's control socket: the same JSON-lines server as a VM's, with the host's
//! requests ([`super::protocol::HostRequest`], every one listed in `docs/api.md`).
//!
//! A pass-through waits for the VM (at most 2 s in all, its reply at most 64 KiB) on the
//! socket's thread: the one request here that can delay the host's other clients, by as long.

use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use super::child::REPLY_TIMEOUT;
use super::poll::{request_within, MAX_REPLY_BYTES};
use super::protocol::{BudgetArgs, HostRequest, MetricsReply, PassThrough, VmEntry, VmsReply};
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
        let vms = (shared.vms.iter().enumerate())
            .map(|(i, (name, sock, pid))| {
                // Before the first tick there is no report yet: the VMs are running.
                let (running, exit) =
                    shared.report.vms.get(i).map_or((true, None), |v| (v.running, v.exit.clone()));
                VmEntry { name: name.clone(), pid: *pid, running, exit, sock: sock.clone() }
            })
            .collect();
        VmsReply { vms }
    }

    fn budget(&self, args: BudgetArgs) -> Value {
        match self.lock().set_budget(args.bytes) {
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
        let sock = self.lock().vms.iter().find(|(n, _, _)| n == name).map(|(_, s, _)| s.clone());
        let Some(sock) = sock else {
            return error(format!("no VM named {name:?}"));
        };
        request_within(&sock, &to_reply(&args.request), REPLY_TIMEOUT, MAX_REPLY_BYTES)
            .unwrap_or_else(|e| error(format!("vm {name:?}: {e}")))
    }
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
        }
    }
}
