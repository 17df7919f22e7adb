//! The client side of the control socket, for `ebb ctl`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Errors talking to a VM.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No VM listens there.
    #[error("cannot connect to {path}: {source} (is the VM running with --api-sock {path}?)")]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The reply is not JSON.
    #[error("invalid reply {0:?}")]
    Reply(String),
}

/// Sends one request and returns the reply.
pub fn request(path: &Path, req: &Value) -> Result<Value, ClientError> {
    let mut stream = UnixStream::connect(path)
        .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = req.to_string();
    line.push('\n');
    // A server that refuses the client (another uid) says why and closes at once: the
    // request may then meet a closed socket, but the reason is still there to read.
    let sent = stream.write_all(line.as_bytes());
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(e.into()),
        (Ok(()), Ok(_)) => {}
    }
    serde_json::from_str(reply.trim()).map_err(|_| ClientError::Reply(reply))
}
