//! The host socket's requests and replies, on top of the VMs' ([`crate::api::protocol`]):
//! the same wire format, version and strictness.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::VmEntry;
use super::report::{HostReport, VmReport};
use crate::api::client::{Client, ClientError};
use crate::api::protocol::{Ack, NoArgs, Reply, VmRequest};

/// A request to the host's control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HostRequest {
    /// The protocol version and ebb's: `VersionReply`.
    Version(NoArgs),
    /// Every VM: [`VmsReply`].
    Vms(NoArgs),
    /// The host's report of the last tick: [`HostReport`].
    HostStats(NoArgs),
    /// The report in Prometheus's text format: [`MetricsReply`].
    Metrics(NoArgs),
    /// Sets the budget: [`Ack`].
    Budget(BudgetArgs),
    /// One VM's request, passed through (not the levers the host owns): the VM's reply.
    Vm(PassThrough),
    /// Starts a VM described as a `[[vm]]` table, admitted against the budget: [`Ack`].
    Create(Box<CreateArgs>),
    /// Asks a VM to stop (SIGTERM, then SIGKILL after 10 s); it stays listed: [`Ack`].
    Stop(NameArgs),
    /// Kills a VM if it runs and forgets it (its name is free again): [`Ack`].
    Destroy(NameArgs),
    /// One VM: its entry, its description and its last figures: [`InspectReply`].
    Inspect(NameArgs),
    /// The events after a sequence number: [`EventsReply`].
    Events(EventsArgs),
}

impl HostRequest {
    /// The verb, as on the wire.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Version(_) => "version",
            Self::Vms(_) => "vms",
            Self::HostStats(_) => "host_stats",
            Self::Metrics(_) => "metrics",
            Self::Budget(_) => "budget",
            Self::Vm(_) => "vm",
            Self::Create(_) => "create",
            Self::Stop(_) => "stop",
            Self::Destroy(_) => "destroy",
            Self::Inspect(_) => "inspect",
            Self::Events(_) => "events",
        }
    }
}

/// `{"budget": {"bytes": N}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetArgs {
    /// The memory all VMs may consume together, bytes (not below the reservations).
    pub bytes: u64,
}

/// `{"vm": {"name": "a", "request": {...}}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassThrough {
    /// The VM's name.
    pub name: String,
    /// What to ask it.
    pub request: VmRequest,
}

/// `{"create": {"vm": {...}}}`: the VM as a `[[vm]]` table of the host's description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// The table (`name`, `memory`, `firmware` or `kernel`, ...), keys as in the TOML.
    pub vm: VmEntry,
}

/// `{"stop": {"name": "a"}}` and the like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameArgs {
    /// The VM's name.
    pub name: String,
}

/// `{"events": {"after": N}}`: the events with a sequence number above N (0: all kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsArgs {
    /// The last sequence number the client has seen.
    pub after: u64,
}

/// The reply to `inspect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InspectReply {
    /// As in `vms`.
    pub vm: VmListing,
    /// Its description, as admitted.
    pub config: VmEntry,
    /// Its figures at the last tick (`null` before its first).
    pub report: Option<VmReport>,
}

/// The reply to `events`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventsReply {
    /// The events after the one asked for, oldest first.
    pub events: Vec<Event>,
    /// The sequence number to ask after next time.
    pub next: u64,
    /// Events the client missed: they were dropped from the host's bounded log before it
    /// asked.
    pub lost: u64,
}

/// One thing that happened on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Its sequence number, from 1.
    pub seq: u64,
    /// Milliseconds since the host started.
    pub t_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub what: EventKind,
}

/// What an [`Event`] says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A VM's process started.
    Started {
        /// The VM.
        vm: String,
        /// Its process id.
        pid: u32,
    },
    /// A VM an earlier host started was adopted by this one (a state directory).
    Adopted {
        /// The VM.
        vm: String,
        /// Its process id.
        pid: u32,
    },
    /// A VM ended, and how (`exit status 0`, `killed by signal 9`).
    Ended {
        /// The VM.
        vm: String,
        /// How.
        how: String,
    },
    /// A VM was created through the socket.
    Created {
        /// The VM.
        vm: String,
    },
    /// A VM was asked to stop through the socket.
    Stopping {
        /// The VM.
        vm: String,
    },
    /// A VM was destroyed through the socket.
    Destroyed {
        /// The VM.
        vm: String,
    },
    /// The memory state changed.
    State {
        /// The state before.
        from: String,
        /// The state now.
        to: String,
    },
    /// The budget changed.
    Budget {
        /// The new budget, bytes.
        bytes: u64,
    },
    /// A VM accepted a lever the policy moved.
    Lever {
        /// The VM.
        vm: String,
        /// The request it accepted.
        request: VmRequest,
    },
}

/// The reply to `vms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmsReply {
    /// Every VM, in start order.
    pub vms: Vec<VmListing>,
}

/// One VM in [`VmsReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmListing {
    /// Its name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Still running.
    pub running: bool,
    /// How it ended, once it has.
    pub exit: Option<String>,
    /// Its control socket.
    pub sock: std::path::PathBuf,
}

/// The reply to `metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReply {
    /// Prometheus's text format.
    pub text: String,
}

impl Reply for VmsReply {}
impl Reply for HostReport {}
impl Reply for MetricsReply {}
impl Reply for InspectReply {}
impl Reply for EventsReply {}

impl Client {
    /// A host's `vms`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn vms(&self) -> Result<VmsReply, ClientError> {
        self.call(&HostRequest::Vms(NoArgs {}))
    }

    /// A host's `host_stats`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn host_stats(&self) -> Result<HostReport, ClientError> {
        self.call(&HostRequest::HostStats(NoArgs {}))
    }

    /// A host's `metrics`: Prometheus's text format.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn metrics(&self) -> Result<String, ClientError> {
        self.call::<MetricsReply>(&HostRequest::Metrics(NoArgs {})).map(|m| m.text)
    }

    /// Sets a host's budget, bytes.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn set_budget(&self, bytes: u64) -> Result<(), ClientError> {
        self.call::<Ack>(&HostRequest::Budget(BudgetArgs { bytes })).map(drop)
    }

    /// Creates a VM on a host.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn create(&self, vm: VmEntry) -> Result<(), ClientError> {
        self.call::<Ack>(&HostRequest::Create(Box::new(CreateArgs { vm }))).map(drop)
    }

    /// Asks a host's VM to stop.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn stop(&self, name: &str) -> Result<(), ClientError> {
        self.call::<Ack>(&HostRequest::Stop(NameArgs { name: name.into() })).map(drop)
    }

    /// Kills and forgets a host's VM.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn destroy(&self, name: &str) -> Result<(), ClientError> {
        self.call::<Ack>(&HostRequest::Destroy(NameArgs { name: name.into() })).map(drop)
    }

    /// One of a host's VMs.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn inspect(&self, name: &str) -> Result<InspectReply, ClientError> {
        self.call(&HostRequest::Inspect(NameArgs { name: name.into() }))
    }

    /// A host's events after `after`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn events(&self, after: u64) -> Result<EventsReply, ClientError> {
        self.call(&HostRequest::Events(EventsArgs { after }))
    }

    /// Passes `request` to VM `name` of a host; the VM's reply.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn vm(&self, name: &str, request: VmRequest) -> Result<Value, ClientError> {
        self.call(&HostRequest::Vm(PassThrough { name: name.into(), request }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::protocol::parse_line;

    #[test]
    fn a_pass_through_carries_a_typed_vm_request() {
        assert_eq!(
            parse_line::<HostRequest>(r#"{"vm": {"name": "a", "request": {"stats": {}}}}"#)
                .unwrap(),
            HostRequest::Vm(PassThrough { name: "a".into(), request: VmRequest::Stats(NoArgs {}) })
        );
    }
}
