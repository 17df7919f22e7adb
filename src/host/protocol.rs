//! The host socket's requests and replies, on top of the VMs' ([`crate::api::protocol`]):
//! the same wire format, version and strictness.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::report::HostReport;
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

/// The reply to `vms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmsReply {
    /// Every VM, in start order.
    pub vms: Vec<VmEntry>,
}

/// One VM in [`VmsReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
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
