//! The Unix socket server of the control API, run by the event loop. Nothing in it blocks:
//! a client that sends without reading, reads slowly, or sends garbage can cost ebb a bounded
//! amount of memory and work, and never delays another client, the device queues or the
//! statistics timer.
//!
//! What a client gets (the README repeats it):
//! - only clients of the owner's uid (`ebb::jail::owner_uid`) and root are served: any other
//!   is sent one error line saying why and closed;
//! - the socket is created mode 0600 whatever the umask; `bind` refuses a path where another
//!   process answers or that is not a socket; at exit only the socket this process created
//!   is removed;
//! - at most [`MAX_CONNECTIONS`] clients at once: when one more connects, the client that has
//!   been quiet longest (at least [`MIN_QUIET`], with no request or reply in flight) is closed
//!   to make room; if none has, the newcomer is told so and closed;
//! - a request line is at most [`MAX_REQUEST_BYTES`], checked as the bytes arrive: a longer
//!   one gets an error reply and the connection is closed;
//! - a client's requests are read only as fast as they are served (nothing piles up in ebb);
//! - replies wait in a per-client buffer, written as the socket takes them; a client whose
//!   unread replies pass [`MAX_PENDING_REPLY_BYTES`] is dropped;
//! - one event serves at most [`REQUESTS_PER_TURN`] requests of a client, then the others
//!   get their turn (a kick eventfd brings the loop back for the rest).
//!
//! So the most a client can hold is about a request line, a read and its reply buffer:
//! under 80 KiB, and under 10 MiB for all of them.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{ApiContext, Handler, MAX_REQUEST_BYTES};

/// Most clients connected at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Most bytes of replies a client may leave unread before it is dropped.
pub const MAX_PENDING_REPLY_BYTES: usize = 64 * 1024;
/// How long a client must have been quiet before a newcomer may take its place.
pub const MIN_QUIET: std::time::Duration = std::time::Duration::from_millis(50);
/// Requests of one client served per event before the others get a turn. One, so that a
/// client with one request waits for at most one request of each other client: with 4, a
/// round over 128 pipelining clients took 25-50 ms (debug build, 2 busy cores) and a
/// well-behaved client's p99 passed 100 ms; with 1 it is 10-15 ms and the p99 about 40 ms.
pub const REQUESTS_PER_TURN: usize = 1;
/// Bytes read from one client per event.
const READ_PER_TURN: usize = 8 * 1024;
/// Mode of the socket file: the owner only.
const SOCKET_MODE: u32 = 0o600;

/// What a client gets when there is no room for it.
const TOO_MANY: &[u8] = b"{\"error\":\"too many control connections\"}\n";

/// Event data of the listening socket and of the kick eventfd (connections use their fd).
const LISTENER: u32 = u32::MAX;
const KICK: u32 = u32::MAX - 1;

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    /// Bytes of `input` already taken as requests.
    taken: usize,
    output: Vec<u8>,
    /// Bytes of `output` already written.
    sent: usize,
    /// EPOLLOUT is registered.
    writable_wanted: bool,
    /// Close once the output is written (after an oversized line).
    closing: bool,
    /// When it last sent a request or was accepted.
    active: std::time::Instant,
}

impl Conn {
    /// A client just accepted.
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            taken: 0,
            output: Vec::new(),
            sent: 0,
            writable_wanted: false,
            closing: false,
            active: std::time::Instant::now(),
        }
    }

    fn events(&self, key: u32) -> Events {
        let mut set = EventSet::IN | EventSet::HANG_UP;
        if self.writable_wanted {
            set |= EventSet::OUT;
        }
        Events::with_data(&self.stream, key, set)
    }

    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Quiet for [`MIN_QUIET`] with nothing in flight: no reply waiting, no request read and
    /// not served, and none sent and not read yet (a busy loop may not have read a request
    /// that arrived long ago: closing that client would lose it, and reset the connection).
    fn is_quiet(&self) -> bool {
        self.active.elapsed() >= MIN_QUIET
            && self.pending() == 0
            && !self.has_line()
            && !self.closing
            && super::sys::unread_bytes(&self.stream) == 0
    }

    /// Writes what the socket takes; false if the client is gone.
    fn flush(&mut self) -> bool {
        while self.sent < self.output.len() {
            match self.stream.write(&self.output[self.sent..]) {
                Ok(0) => return false,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        }
        true
    }

    /// Reads what arrived, up to the per-turn budget, unless a request is still waiting to
    /// be served; false if the client is gone.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let mut budget = READ_PER_TURN;
        while budget > 0 && !self.closing && !self.has_line() {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    budget = budget.saturating_sub(n);
                    if self.unterminated_line_too_long() {
                        self.reply_error_and_close("request line too long");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        true
    }

    /// True if the input holds more than a request line may carry with no newline in it.
    fn unterminated_line_too_long(&self) -> bool {
        let start = self.input.iter().rposition(|&b| b == b'\n').map_or(self.taken, |p| p + 1);
        self.input.len() - start.max(self.taken) > MAX_REQUEST_BYTES
    }

    fn reply_error_and_close(&mut self, msg: &str) {
        let reply = serde_json::json!({ "error": msg });
        self.output.extend_from_slice(reply.to_string().as_bytes());
        self.output.push(b'\n');
        self.input.clear();
        self.taken = 0;
        self.closing = true;
    }

    /// The next complete request line, if any. Taken lines are dropped from the buffer only
    /// when no line is left, so many short lines cost linear time.
    fn next_line(&mut self) -> Option<&[u8]> {
        let rest = &self.input[self.taken..];
        let Some(pos) = rest.iter().position(|&b| b == b'\n') else {
            self.input.drain(..self.taken);
            self.taken = 0;
            return None;
        };
        let line = self.taken..self.taken + pos;
        self.taken += pos + 1;
        Some(&self.input[line])
    }

    fn has_line(&self) -> bool {
        self.input[self.taken..].contains(&b'\n')
    }
}

/// Accepts connections and answers requests line by line, each with `H` (a VM's
/// [`ApiContext`], or the host's).
#[derive(Debug)]
pub struct ApiServer<H: Handler = ApiContext> {
    path: PathBuf,
    /// Device and inode of the socket file this server created, to remove only that.
    created: (u64, u64),
    listener: UnixListener,
    kick: EventFd,
    conns: HashMap<u32, Conn>,
    ctx: H,
    /// Clients refused or dropped (too many, too slow, line too long).
    dropped: u64,
}

impl<H: Handler> ApiServer<H> {
    /// Listens on `path`, mode 0600.
    ///
    /// # Errors
    /// `AddrInUse` if another process answers on `path`, `AlreadyExists` if something other
    /// than a socket is there, or the error of `bind`.
    pub fn bind(path: &Path, ctx: H) -> std::io::Result<Self> {
        remove_stale_socket(path)?;
        let listener = {
            // The mode is set by bind from the umask: a tighter one for the call leaves no
            // moment in which others could connect.
            let _umask = super::sys::UmaskGuard::set(0o777 & !SOCKET_MODE);
            UnixListener::bind(path)?
        };
        listener.set_nonblocking(true)?;
        let meta = std::fs::symlink_metadata(path)?;
        // Close-on-exec: the host's VMs, spawned while its socket serves, must not get it.
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(Self {
            path: path.to_owned(),
            created: (meta.dev(), meta.ino()),
            listener,
            kick,
            conns: HashMap::new(),
            ctx,
            dropped: 0,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            // Only the owner's uid and root are served (SO_PEERCRED); others learn why.
            if let Err(why) = crate::jail::check_peer(&stream) {
                let _ = stream.set_nonblocking(true);
                let line = serde_json::json!({ "error": why }).to_string() + "\n";
                let _ = (&stream).write_all(line.as_bytes());
                self.dropped += 1;
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS && !self.evict_quietest(ops) {
                // Best effort: the client learns why; it is closed either way.
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write_all(TOO_MANY);
                self.dropped += 1;
                continue;
            }
            let Ok(key) = u32::try_from(stream.as_raw_fd()) else { continue };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let conn = Conn::new(stream);
            if ops.add(conn.events(key)).is_ok() {
                self.conns.insert(key, conn);
            }
        }
    }

    /// Serves connection `key`: reads, answers up to a turn's worth, writes. Returns false
    /// when it should be closed, and whether it has requests left for another turn.
    fn serve(&mut self, key: u32, readable: bool) -> (bool, bool) {
        let Some(conn) = self.conns.get_mut(&key) else { return (false, false) };
        if readable && !conn.fill() {
            return (false, false);
        }
        for _ in 0..REQUESTS_PER_TURN {
            if conn.closing {
                break;
            }
            let reply = match conn.next_line().map(std::str::from_utf8) {
                None => break,
                Some(Ok(text)) if text.trim().is_empty() => continue,
                Some(Ok(text)) => self.ctx.handle(text.trim()),
                Some(Err(_)) => serde_json::json!({ "error": "request is not UTF-8" }),
            };
            conn.output.extend_from_slice(reply.to_string().as_bytes());
            conn.output.push(b'\n');
            conn.active = std::time::Instant::now();
            if conn.pending() > MAX_PENDING_REPLY_BYTES {
                return (false, false); // it does not read its replies: drop it
            }
        }
        if !conn.flush() || (conn.closing && conn.pending() == 0) {
            return (false, false);
        }
        (true, !conn.closing && conn.has_line())
    }

    /// Closes the client that has been quiet longest, if one has been quiet long enough with
    /// nothing in flight, to make room for a new one; false if none has.
    fn evict_quietest(&mut self, ops: &mut EventOps) -> bool {
        let candidate =
            self.conns.iter().filter(|(_, c)| c.is_quiet()).min_by_key(|(_, c)| c.active);
        let Some((&key, conn)) = candidate else { return false };
        let _ = (&conn.stream).write_all(TOO_MANY);
        self.dropped += 1;
        self.close(key, ops);
        true
    }

    fn close(&mut self, key: u32, ops: &mut EventOps) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = ops.remove(conn.events(key));
        }
    }

    /// Serves `key` and keeps its registration in step: EPOLLOUT while replies wait.
    fn turn(&mut self, key: u32, readable: bool, ops: &mut EventOps) -> bool {
        let (open, more) = self.serve(key, readable);
        if !open {
            self.dropped += 1;
            self.close(key, ops);
            return false;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            let want = conn.pending() > 0;
            if want != conn.writable_wanted {
                conn.writable_wanted = want;
                let _ = ops.modify(conn.events(key));
            }
        }
        more
    }

    /// Another turn for every client with requests left.
    fn kicked(&mut self, ops: &mut EventOps) {
        let _ = self.kick.read();
        let keys: Vec<u32> = self.conns.keys().copied().collect();
        // Every client gets its turn (no short-circuit), then one kick if any has more.
        let more: Vec<bool> = keys.into_iter().map(|key| self.turn(key, false, ops)).collect();
        if more.contains(&true) {
            let _ = self.kick.write(1);
        }
    }

    /// Clients refused or dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Removes a socket file nobody answers on (a VM that died without cleaning up); refuses one
/// where somebody does, and anything that is not a socket.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        let msg = format!("{} exists and is not a socket", path.display());
        return Err(std::io::Error::new(ErrorKind::AlreadyExists, msg));
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            let msg = format!("another process (another VM?) answers on {}", path.display());
            Err(std::io::Error::new(ErrorKind::AddrInUse, msg))
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

impl<H: Handler> MutEventSubscriber for ApiServer<H> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => self.accept(ops),
            KICK => self.kicked(ops),
            key => {
                let readable = events.event_set().contains(EventSet::IN);
                if self.turn(key, readable, ops) {
                    let _ = self.kick.write(1);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.listener, LISTENER, EventSet::IN)) {
            log::error!("control socket: cannot watch {}: {e:?}", self.path.display());
        }
        if let Err(e) = ops.add(Events::with_data(&self.kick, KICK, EventSet::IN)) {
            log::error!("control socket: cannot watch its kick event: {e:?}");
        }
    }
}

impl<H: Handler> Drop for ApiServer<H> {
    fn drop(&mut self) {
        // Only our own socket: another VM may have bound this path since (after ours was
        // removed by hand, say).
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.created);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(stream: UnixStream, quiet_for: std::time::Duration) -> Conn {
        let mut c = Conn::new(stream);
        c.active = std::time::Instant::now().checked_sub(quiet_for).unwrap();
        c
    }

    #[test]
    fn a_client_whose_request_waits_unread_is_not_quiet() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let c = conn(ours, MIN_QUIET * 4);
        assert!(c.is_quiet(), "nothing sent, nothing in flight, long quiet");
        // The client sends while the server's loop is busy elsewhere: the request sits in
        // the socket. Evicting the client now would lose it (and reset the connection).
        theirs.write_all(b"{\"stats\": {}}\n").unwrap();
        assert!(!c.is_quiet());
        let young = conn(UnixStream::pair().unwrap().0, std::time::Duration::ZERO);
        assert!(!young.is_quiet(), "not quiet long enough");
    }
}
