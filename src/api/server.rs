//! The Unix socket server of the control API, run by the event loop.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{ApiContext, MAX_REQUEST_BYTES};

/// How long a reply may wait for a client to read.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Event data of the listening socket (connections use their fd).
const LISTENER: u32 = u32::MAX;

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// Accepts connections and answers requests line by line.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u32, Conn>,
    ctx: ApiContext,
}

impl ApiServer {
    /// Listens on `path` (an existing socket file there is replaced).
    pub fn bind(path: &Path, ctx: ApiContext) -> std::io::Result<Self> {
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self { path: path.to_owned(), listener, conns: HashMap::new(), ctx })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            // Replies are written blocking (they are small), but a client that stops reading
            // must not stall the event loop: it gets a second, then it is dropped.
            if stream.set_nonblocking(true).is_err()
                || stream.set_write_timeout(Some(REPLY_TIMEOUT)).is_err()
            {
                continue;
            }
            let Ok(key) = u32::try_from(stream.as_raw_fd()) else { continue };
            if ops.add(Events::with_data(&stream, key, EventSet::IN | EventSet::HANG_UP)).is_ok() {
                self.conns.insert(key, Conn { stream, buf: Vec::new() });
            }
        }
    }

    /// Reads what arrived on connection `key`; returns false when it should be closed.
    fn serve(&mut self, key: u32) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else { return false };
        let mut chunk = [0u8; 4096];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        while let Some(pos) = conn.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            let reply = match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => self.ctx.handle(text.trim()),
                Err(_) => serde_json::json!({ "error": "request is not UTF-8" }),
            };
            let mut out = reply.to_string().into_bytes();
            out.push(b'\n');
            if conn.stream.set_nonblocking(false).is_err() || conn.stream.write_all(&out).is_err() {
                return false;
            }
            let _ = conn.stream.set_nonblocking(true);
        }
        if conn.buf.len() > MAX_REQUEST_BYTES {
            let _ = conn.stream.write_all(b"{\"error\":\"request line too long\"}\n");
            return false;
        }
        true
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => self.accept(ops),
            key => {
                if !self.serve(key) {
                    if let Some(conn) = self.conns.remove(&key) {
                        let _ = ops.remove(Events::with_data(
                            &conn.stream,
                            key,
                            EventSet::IN | EventSet::HANG_UP,
                        ));
                    }
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.listener, LISTENER, EventSet::IN)) {
            log::error!("control socket: cannot watch {}: {e:?}", self.path.display());
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
