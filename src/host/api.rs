//! The host's control socket: the same JSON-lines server as a VM's, with the host's requests.
//!
//! | request | reply |
//! |---|---|
//! | `{"vms": {}}` | `{"vms": [{"name", "pid", "running", "exit", "sock"}]}` |
//! | `{"host_stats": {}}` | the host's report: budget, free, minFree, state, time in each state, transitions, every VM's figures and targets |
//! | `{"metrics": {}}` | `{"text": "..."}`: the report in Prometheus's text format |
//! | `{"budget": {"mib": N}}` | `{"ok": true}`: the new budget (not below the reservations) |
//! | `{"vm": {"name": "a", "request": {...}}}` | VM `a`'s reply to the request (not the levers the host owns: balloon, reclaim, sharing, alloc) |
//!
//! A pass-through waits for the VM (at most 2 s in all, its reply at most 64 KiB) on the
//! socket's thread: the one request here that can delay the host's other clients, by as long.

use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::child::REPLY_TIMEOUT;
use super::poll::{request_within, MAX_REPLY_BYTES};
use super::supervisor::Shared;
use crate::api::{error, parse_request, Handler};

/// What the host's requests act on.
#[derive(Debug)]
pub struct HostApi {
    shared: Arc<Mutex<Shared>>,
    /// Written when the budget changes, so that the supervisor ticks at once.
    wake: EventFd,
}

const VERBS: &str = "vms, host_stats, metrics, budget or vm";
/// A VM's requests that move the levers the host's policy owns.
const HOST_LEVERS: [&str; 4] = ["balloon", "reclaim", "sharing", "alloc"];

impl HostApi {
    /// Requests on `shared`; `wake` is written on a budget change.
    pub fn new(shared: Arc<Mutex<Shared>>, wake: EventFd) -> Self {
        Self { shared, wake }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vms(&self) -> Value {
        let shared = self.lock();
        let vms: Vec<Value> = (shared.vms.iter().enumerate())
            .map(|(i, (name, sock, pid))| {
                // Before the first tick there is no report yet: the VMs are running.
                let (running, exit) =
                    shared.report.vms.get(i).map_or((true, None), |v| (v.running, v.exit.clone()));
                json!({ "name": name, "pid": pid, "running": running, "exit": exit, "sock": sock })
            })
            .collect();
        json!({ "vms": vms })
    }

    fn budget(&self, args: &Value) -> Value {
        let Some(mib) = args.get("mib").and_then(Value::as_u64) else {
            return error("budget needs {\"mib\": N} with N a whole number of MiB");
        };
        let Some(bytes) = mib.checked_mul(1 << 20) else {
            return error(format!("a budget of {mib} MiB is too large"));
        };
        match self.lock().set_budget(bytes) {
            Ok(()) => {
                let _ = self.wake.write(1);
                json!({ "ok": true })
            }
            Err(e) => error(e),
        }
    }

    fn pass_through(&self, args: &Value) -> Value {
        let (Some(name), Some(request)) =
            (args.get("name").and_then(Value::as_str), args.get("request"))
        else {
            return error("vm needs {\"name\": \"NAME\", \"request\": {...}}");
        };
        // The host owns the levers: a client moving one behind the policy would fight it.
        let verb = request.as_object().and_then(|o| o.keys().next()).map(String::as_str);
        if let Some(lever) = verb.filter(|v| HOST_LEVERS.contains(v)) {
            return error(format!(
                "{lever} is the host's lever: change the budget, the VM's controls or the policy instead"
            ));
        }
        let sock = self.lock().vms.iter().find(|(n, _, _)| n == name).map(|(_, s, _)| s.clone());
        let Some(sock) = sock else {
            return error(format!("no VM named {name:?}"));
        };
        request_within(&sock, request, REPLY_TIMEOUT, MAX_REPLY_BYTES)
            .unwrap_or_else(|e| error(format!("vm {name:?}: {e}")))
    }
}

impl Handler for HostApi {
    fn handle(&self, line: &str) -> Value {
        let (verb, args) = match parse_request(line, VERBS) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let args = &args;
        match verb.as_str() {
            "vms" => self.vms(),
            "host_stats" => serde_json::to_value(&self.lock().report).unwrap_or_else(error),
            "metrics" => json!({ "text": self.lock().report.prometheus() }),
            "budget" => self.budget(args),
            "vm" => self.pass_through(args),
            other => error(format!("unknown request {other:?}: use {VERBS}")),
        }
    }
}
