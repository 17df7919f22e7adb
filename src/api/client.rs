//! The client side of the control protocol: one [`Client`] with a typed method for each
//! request, used by `ebb ctl`, `ebb lab`, `ebb top` and the tests. (`ebb host` talks to many
//! VMs at once under one deadline, through `host::poll`, with the same types.)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::protocol::{
    request_line, Ack, AllocArgs, BalloonArgs, BalloonStatsReply, ErrorReply, NoArgs, ReclaimArgs,
    Reply, SharingArgs, VersionReply, VmRequest,
};
use crate::mm::stats::MemStats;

/// How long a reply may take, unless set.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest reply line read (a host's report of many VMs is the largest).
const MAX_REPLY_BYTES: u64 = 16 << 20;

/// Errors talking to a VM or a host.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error(
        "cannot connect to {path}: {source} (is the VM or host running with --api-sock {path}?)"
    )]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The reply is not JSON, or not the reply the request expects.
    #[error("unexpected reply ({why}): {reply:?}")]
    Reply {
        /// What did not fit.
        why: String,
        /// The reply line.
        reply: String,
    },
    /// The server refused the request, and said why.
    #[error("{0}")]
    Refused(String),
}

/// A control socket, VM's or host's.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// The socket at `path` (nothing is connected until a request).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), timeout: REPLY_TIMEOUT }
    }

    /// The same, waiting at most `timeout` for a reply (10 s unless set).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `request` and reads its reply as `R`; `{"error": ...}` is
    /// [`ClientError::Refused`].
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn call<R: Reply>(&self, request: &impl Serialize) -> Result<R, ClientError> {
        let line = self.exchange(&request_line(request))?;
        let value: Value = serde_json::from_str(line.trim())
            .map_err(|e| ClientError::Reply { why: e.to_string(), reply: line.clone() })?;
        if let Ok(ErrorReply { error }) = serde_json::from_value::<ErrorReply>(value.clone()) {
            return Err(ClientError::Refused(error));
        }
        serde_json::from_value(value)
            .map_err(|e| ClientError::Reply { why: e.to_string(), reply: line })
    }

    /// Sends one line (with its newline) and returns the reply line.
    fn exchange(&self, line: &str) -> Result<String, ClientError> {
        let path = &self.path;
        let mut stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        // A server that refuses the client (another uid) says why and closes at once: the
        // request may then meet a closed socket, but the reason is still there to read.
        let sent = stream.write_all(line.as_bytes());
        let mut reply = String::new();
        let read = BufReader::new(stream.take(MAX_REPLY_BYTES)).read_line(&mut reply);
        match (sent, read) {
            (_, Ok(n)) if n > 0 => Ok(reply),
            (Err(e), _) | (Ok(()), Err(e)) => Err(e.into()),
            (Ok(()), Ok(_)) => Err(ClientError::Reply { why: "no reply".into(), reply }),
        }
    }

    /// `version`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn version(&self) -> Result<VersionReply, ClientError> {
        self.call(&VmRequest::Version(NoArgs {}))
    }

    /// A VM's `stats`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn stats(&self) -> Result<MemStats, ClientError> {
        self.call(&VmRequest::Stats(NoArgs {}))
    }

    /// A VM's `balloon_stats`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn balloon_stats(&self) -> Result<BalloonStatsReply, ClientError> {
        self.call(&VmRequest::BalloonStats(NoArgs {}))
    }

    /// Sets a VM's balloon target, bytes (a multiple of 4096).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn set_balloon(&self, target_bytes: u64) -> Result<(), ClientError> {
        self.call::<Ack>(&VmRequest::Balloon(BalloonArgs { target_bytes })).map(drop)
    }

    /// Sets a VM's reclaim target, bytes (None: off).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn set_reclaim(&self, target_bytes: Option<u64>) -> Result<(), ClientError> {
        self.call::<Ack>(&VmRequest::Reclaim(ReclaimArgs { target_bytes })).map(drop)
    }

    /// Sets a VM's sharing scan rate, pages per second (0: off).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn set_sharing(&self, scan_rate: u64) -> Result<(), ClientError> {
        self.call::<Ack>(&VmRequest::Sharing(SharingArgs { scan_rate })).map(drop)
    }

    /// Sets a VM's allocation gate, bytes (None: open).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn set_alloc(&self, wait_above_bytes: Option<u64>) -> Result<(), ClientError> {
        self.call::<Ack>(&VmRequest::Alloc(AllocArgs { wait_above_bytes })).map(drop)
    }

    /// Sends `line` as it is (no version added) and returns the reply as JSON, error or
    /// not: for tests that send what a hostile client would.
    ///
    /// # Errors
    /// [`ClientError`] if nothing came back or the reply is not JSON.
    pub fn raw(&self, line: &str) -> Result<Value, ClientError> {
        let mut line = line.trim_end_matches('\n').to_owned();
        line.push('\n');
        let reply = self.exchange(&line)?;
        serde_json::from_str(reply.trim())
            .map_err(|e| ClientError::Reply { why: e.to_string(), reply })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
