//! The control protocol's types: every request and reply of a VM's socket and of the host's,
//! as serde values. The server, [`super::client`], `ebb ctl`, `ebb host`, `ebb lab`,
//! `ebb top` and the tests all use these, so a renamed field is a compile error rather than
//! a figure that silently reads as 0.
//!
//! The wire format is JSON lines: one request object per line, one reply object per line.
//! A request is an object with one key, the verb, whose value holds the arguments (`{}` for
//! none), and optionally `"v"`, the protocol version the client speaks
//! ([`PROTOCOL_VERSION`]; absent means the current one). Requests are read strictly: an
//! unknown verb, an unknown argument or a missing one is refused with the key named. Replies
//! are either the verb's reply or [`ErrorReply`].
//!
//! Levers travel in bytes, never rounded: a balloon target must be a whole number of 4 KiB
//! pages (the balloon's unit), which is checked, not rounded. `docs/api.md` lists every
//! request and every field; a test keeps it complete.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::mm::stats::MemStats;

/// The protocol version this ebb speaks. 2: levers in bytes (version 1 had MiB).
pub const PROTOCOL_VERSION: u32 = 2;

/// A verb without arguments: `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// A request to a VM's control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmRequest {
    /// The protocol version and ebb's: [`VersionReply`].
    Version(NoArgs),
    /// The memory statistics: [`MemStats`].
    Stats(NoArgs),
    /// The balloon's state and the guest's statistics: [`BalloonStatsReply`].
    BalloonStats(NoArgs),
    /// Sets the balloon's target size: [`Ack`].
    Balloon(BalloonArgs),
    /// Sets the resident-memory target of host-side reclaim: [`Ack`].
    Reclaim(ReclaimArgs),
    /// Sets the page-sharing scan rate: [`Ack`].
    Sharing(SharingArgs),
    /// Sets the allocation gate: [`Ack`].
    Alloc(AllocArgs),
}

impl VmRequest {
    /// The verb, as on the wire.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Version(_) => "version",
            Self::Stats(_) => "stats",
            Self::BalloonStats(_) => "balloon_stats",
            Self::Balloon(_) => "balloon",
            Self::Reclaim(_) => "reclaim",
            Self::Sharing(_) => "sharing",
            Self::Alloc(_) => "alloc",
        }
    }

    /// Whether this request moves a lever that `ebb host`'s policy owns.
    pub fn is_lever(&self) -> bool {
        matches!(self, Self::Balloon(_) | Self::Reclaim(_) | Self::Sharing(_) | Self::Alloc(_))
    }
}

/// `{"balloon": {"target_bytes": N}}`: the memory the guest should give back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonArgs {
    /// Balloon size in bytes, a multiple of 4096 (virtio's `num_pages` in bytes).
    pub target_bytes: u64,
}

/// `{"reclaim": {"target_bytes": N}}`: keep at most N bytes resident; `null` or 0: off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReclaimArgs {
    /// Resident bytes to keep at most (`null`: reclaim off). Required, even when `null`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub target_bytes: Option<u64>,
}

/// `{"sharing": {"scan_rate": N}}`: pages hashed per second; 0: off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingArgs {
    /// Pages per second (0: off; shared pages stay shared).
    pub scan_rate: u64,
}

/// `{"alloc": {"wait_above_bytes": N}}`: new guest pages wait while N bytes or more are
/// resident; `null`: never wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocArgs {
    /// The gate, in resident bytes (`null`: open). Required, even when `null`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub wait_above_bytes: Option<u64>,
}

/// `{"ok": true}`: the request was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Always true.
    pub ok: bool,
}

impl Ack {
    /// `{"ok": true}`.
    pub const OK: Self = Self { ok: true };
}

/// `{"error": "..."}`: the request was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong and what to do.
    pub error: String,
}

/// The reply to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionReply {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// ebb's version (`Cargo.toml`'s).
    pub ebb: String,
}

impl VersionReply {
    /// This ebb's.
    pub fn current() -> Self {
        Self { protocol: PROTOCOL_VERSION, ebb: env!("CARGO_PKG_VERSION").into() }
    }
}

/// The reply to `balloon_stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonStatsReply {
    /// The balloon size asked for, bytes.
    pub target_bytes: u64,
    /// The balloon size the driver reports, bytes.
    pub actual_bytes: u64,
    /// The guest's driver has set the device up.
    pub driver_ready: bool,
    /// The guest's last statistics, by virtio name (`free_memory`, ...; `tag_N` for tags
    /// the spec does not name).
    pub stats: BTreeMap<String, u64>,
    /// Milliseconds since the guest last sent statistics (`null`: never).
    pub stats_age_ms: Option<u64>,
    /// Pages the guest gave back so far.
    pub inflated_pages: u64,
    /// Pages it took back.
    pub deflated_pages: u64,
    /// Free pages it reported.
    pub reported_pages: u64,
    /// Notifications before the driver was ready (ignored).
    pub early_notifies: u64,
    /// Times the device was activated.
    pub activations: u64,
    /// Reported pages kept resident (they could not be dropped).
    pub reports_kept: u64,
    /// `madvise` calls that failed.
    pub madvise_errors: u64,
    /// What the guest's driver got wrong, counted.
    pub guest_errors: BalloonGuestErrors,
    /// What the guest got wrong of the virtio-mmio transport (`null`: not known).
    pub transport_errors: Option<TransportErrors>,
}

/// The balloon driver's mistakes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonGuestErrors {
    /// PFNs outside guest RAM.
    pub bad_pfns: u64,
    /// Malformed descriptor chains.
    pub bad_descriptors: u64,
    /// Malformed statistics buffers.
    pub bad_stats: u64,
    /// Notifications of queues that do not exist.
    pub bad_notifies: u64,
    /// Writes to read-only configuration.
    pub bad_config_writes: u64,
}

/// The virtio-mmio transport's count of the guest's mistakes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportErrors {
    /// Accesses outside the registers or of the wrong width.
    pub bad_accesses: u64,
    /// Device-status writes out of order.
    pub bad_state_writes: u64,
    /// Queue configurations refused.
    pub bad_queue_config: u64,
    /// Notifications of queues that do not exist.
    pub bad_notifies: u64,
    /// Activations that failed.
    pub activate_failures: u64,
}

/// The typed reply a request expects.
pub trait Reply: serde::de::DeserializeOwned {}
impl Reply for Ack {}
impl Reply for VersionReply {}
impl Reply for MemStats {}
impl Reply for BalloonStatsReply {}
impl Reply for Value {}

/// Why a request line was refused before any verb ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or not an object.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A version this ebb does not speak.
    #[error("protocol version {0} is not spoken here: this ebb speaks version {PROTOCOL_VERSION}")]
    Version(u64),
    /// Not a request this socket knows, or arguments it does not take.
    #[error("{0}")]
    Shape(String),
}

/// Parses one request line of type `R` (strictly), checking `"v"` if present.
///
/// # Errors
/// [`RequestError`]: what the client is told.
pub fn parse_line<R: serde::de::DeserializeOwned>(line: &str) -> Result<R, RequestError> {
    let value: Value = serde_json::from_str(line).map_err(|e| RequestError::Json(e.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(RequestError::Json("a request is a JSON object".into()));
    };
    match object.remove("v") {
        None => {}
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(v) => return Err(RequestError::Version(v.as_u64().unwrap_or(0))),
    }
    if object.len() != 1 {
        return Err(RequestError::Shape(format!(
            "a request is an object with one key, the verb (and \"v\"); got {} keys",
            object.len()
        )));
    }
    serde_json::from_value(Value::Object(object)).map_err(|e| {
        let e = e.to_string();
        let what = if e.starts_with("unknown variant") { "unknown request" } else { "bad request" };
        RequestError::Shape(format!("{what}: {e}"))
    })
}

/// The line a client sends for `request`: the request with `"v"`.
pub fn request_line(request: &impl Serialize) -> String {
    let mut value = serde_json::to_value(request).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut value {
        o.insert("v".into(), Value::from(PROTOCOL_VERSION));
    }
    let mut line = value.to_string();
    line.push('\n');
    line
}

/// `reply` as a JSON value (a reply that cannot be encoded becomes an [`ErrorReply`]).
pub fn to_reply(reply: &impl Serialize) -> Value {
    serde_json::to_value(reply).unwrap_or_else(|e| error_value(format!("cannot encode: {e}")))
}

/// `{"error": msg}`.
pub fn error_value(msg: impl std::fmt::Display) -> Value {
    serde_json::json!({ "error": msg.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_the_version() {
        let reqs = [
            VmRequest::Stats(NoArgs {}),
            VmRequest::Balloon(BalloonArgs { target_bytes: 64 << 20 }),
            VmRequest::Reclaim(ReclaimArgs { target_bytes: None }),
            VmRequest::Alloc(AllocArgs { wait_above_bytes: Some(12345) }),
        ];
        for r in reqs {
            let line = request_line(&r);
            assert!(line.contains("\"v\":2"), "{line}");
            assert_eq!(parse_line::<VmRequest>(&line).unwrap(), r);
        }
    }

    #[test]
    fn requests_are_read_strictly() {
        let refused = |line: &str| parse_line::<VmRequest>(line).unwrap_err().to_string();
        assert!(refused(r#"{"balloon": {"target_mib": 8}}"#).contains("target_mib"));
        assert!(refused(r#"{"reclaim": {}}"#).contains("target_bytes"));
        assert!(refused(r#"{"stats": {"x": 1}}"#).contains("x"));
        assert!(refused(r#"{"explode": {}}"#).contains("explode"));
        assert!(refused(r#"{"stats": {}, "v": 1}"#).contains("version 1"));
        assert!(refused(r#"{"stats": {}, "balloon_stats": {}}"#).contains("one key"));
        assert!(refused("[1]").contains("object"));
        assert!(refused(r#"{"balloon": {"target_bytes": -1}}"#).contains("-1"));
        assert_eq!(
            parse_line::<VmRequest>(r#"{"reclaim": {"target_bytes": null}}"#).unwrap(),
            VmRequest::Reclaim(ReclaimArgs { target_bytes: None })
        );
    }
}
