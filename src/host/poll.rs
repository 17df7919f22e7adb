//! Talking to many VMs at once under one deadline: each VM gets one connection, its
//! requests written on it at once (the control socket serves pipelined lines in order), and
//! its replies read back, all VMs together in one `poll(2)` loop on non-blocking sockets.
//!
//! What a VM can cost the host is bounded whatever it does: the whole exchange ends at the
//! deadline (a reply trickled a byte at a time, or never sent, fails at the deadline, not
//! per read), a reply line longer than [`MAX_REPLY_BYTES`] fails that VM at once, and a VM
//! whose listener backlog is full is retried until the deadline, never waited on in
//! `connect`. One VM's failure is that VM's result; the others' exchanges go on.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest reply line accepted, newline included. A VM's server drops a client that leaves
/// more than 64 KiB of replies unread (`api::server::MAX_PENDING_REPLY_BYTES`), so no true
/// reply is longer.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// How often a connection refused for a full backlog is tried again.
const CONNECT_RETRY: Duration = Duration::from_millis(5);
/// Bytes read per readable event.
const READ_CHUNK: usize = 8 * 1024;

/// Why one VM's exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The deadline passed before every reply came.
    #[error("no reply within {ms} ms ({got} of {want} replies)")]
    Timeout {
        /// The time allowed, ms.
        ms: u128,
        /// Replies received.
        got: usize,
        /// Replies wanted.
        want: usize,
    },
    /// A reply line passed the cap.
    #[error("a reply longer than {0} bytes")]
    TooLong(usize),
    /// The VM closed the connection before every reply came.
    #[error("the connection closed after {got} of {want} replies")]
    Closed {
        /// Replies received.
        got: usize,
        /// Replies wanted.
        want: usize,
    },
    /// A reply is not JSON.
    #[error("a reply is not JSON: {0}")]
    BadJson(serde_json::Error),
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<PollError> for std::io::Error {
    fn from(e: PollError) -> Self {
        let kind = match &e {
            PollError::Timeout { .. } => ErrorKind::TimedOut,
            PollError::Io(e) => e.kind(),
            _ => ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e.to_string())
    }
}

/// One VM's exchange in progress.
#[derive(Debug)]
struct Conn<'a> {
    sock: &'a Path,
    stream: Option<UnixStream>,
    out: Vec<u8>,
    written: usize,
    /// Bytes of the reply line being read.
    line: Vec<u8>,
    replies: Vec<Value>,
    want: usize,
    /// Longest reply line accepted, newline included.
    max: usize,
    result: Option<Result<Vec<Value>, PollError>>,
}

impl<'a> Conn<'a> {
    fn new(sock: &'a Path, requests: &[Value], max: usize) -> Self {
        let mut out = Vec::new();
        for r in requests {
            out.extend_from_slice(r.to_string().as_bytes());
            out.push(b'\n');
        }
        let mut c = Self {
            sock,
            stream: None,
            out,
            written: 0,
            line: Vec::new(),
            replies: Vec::new(),
            want: requests.len(),
            max,
            result: None,
        };
        if c.want == 0 {
            c.result = Some(Ok(Vec::new()));
        }
        c
    }

    fn fail(&mut self, e: PollError) {
        self.stream = None;
        self.result = Some(Err(e));
    }

    /// Tries to connect; true if it must be tried again (full backlog).
    fn connect(&mut self) -> bool {
        match nonblocking_connect(self.sock) {
            Ok(s) => self.stream = Some(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) => self.fail(PollError::Io(e)),
        }
        false
    }

    fn events(&self) -> i16 {
        if self.written < self.out.len() {
            libc::POLLOUT
        } else {
            libc::POLLIN
        }
    }

    /// Moves bytes after `poll` said the socket is ready.
    fn ready(&mut self) {
        let Some(stream) = self.stream.as_mut() else { return };
        if self.written < self.out.len() {
            match stream.write(&self.out[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => self.fail(PollError::Io(e)),
            }
            return;
        }
        let mut buf = [0u8; READ_CHUNK];
        match stream.read(&mut buf) {
            Ok(0) => self.fail(PollError::Closed { got: self.replies.len(), want: self.want }),
            Ok(n) => self.take(buf.get(..n).unwrap_or_default()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => self.fail(PollError::Io(e)),
        }
    }

    /// Takes read bytes: whole lines become replies; a line past the cap fails.
    fn take(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = bytes.split_at(nl);
            bytes = rest.get(1..).unwrap_or_default();
            if self.line.len() + head.len() >= self.max {
                return self.fail(PollError::TooLong(self.max));
            }
            self.line.extend_from_slice(head);
            match serde_json::from_slice(&self.line) {
                Ok(v) => self.replies.push(v),
                Err(e) => return self.fail(PollError::BadJson(e)),
            }
            self.line.clear();
            if self.replies.len() == self.want {
                self.stream = None;
                self.result = Some(Ok(std::mem::take(&mut self.replies)));
                return;
            }
        }
        if self.line.len() + bytes.len() >= self.max {
            return self.fail(PollError::TooLong(self.max));
        }
        self.line.extend_from_slice(bytes);
    }
}

/// Sends each job's requests to its socket and reads its replies, every job at once, all
/// ending by `deadline`, each reply line at most [`MAX_REPLY_BYTES`]. Returns one result per
/// job, in order: the replies (an `{"error": ...}` reply is a reply), or why that VM failed.
pub fn exchange_all(
    jobs: &[(&Path, Vec<Value>)],
    deadline: Instant,
) -> Vec<Result<Vec<Value>, PollError>> {
    exchange_capped(jobs, deadline, MAX_REPLY_BYTES)
}

/// [`exchange_all`] with replies of at most `max_reply_bytes`.
fn exchange_capped(
    jobs: &[(&Path, Vec<Value>)],
    deadline: Instant,
    max_reply_bytes: usize,
) -> Vec<Result<Vec<Value>, PollError>> {
    let start = Instant::now();
    let mut conns: Vec<Conn<'_>> =
        jobs.iter().map(|(p, r)| Conn::new(p, r, max_reply_bytes)).collect();
    loop {
        let mut retry = false;
        for c in conns.iter_mut().filter(|c| c.result.is_none() && c.stream.is_none()) {
            retry |= c.connect();
        }
        let now = Instant::now();
        if conns.iter().all(|c| c.result.is_some()) || now >= deadline {
            break;
        }
        let mut wait = deadline - now;
        if retry {
            wait = wait.min(CONNECT_RETRY);
        }
        poll_once(&mut conns, wait);
    }
    let ms = deadline.saturating_duration_since(start).as_millis();
    conns
        .into_iter()
        .map(|c| {
            c.result.unwrap_or(Err(PollError::Timeout { ms, got: c.replies.len(), want: c.want }))
        })
        .collect()
}

/// One `poll(2)` over the connected exchanges, for at most `wait`; moves the ready ones on.
fn poll_once(conns: &mut [Conn<'_>], wait: Duration) {
    let mut idx = Vec::with_capacity(conns.len());
    let mut fds = Vec::with_capacity(conns.len());
    for (i, c) in conns.iter().enumerate() {
        if let (None, Some(s)) = (&c.result, &c.stream) {
            idx.push(i);
            fds.push(libc::pollfd { fd: s.as_raw_fd(), events: c.events(), revents: 0 });
        }
    }
    // Rounded up, so that a wait under a millisecond does not spin.
    let ms = i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    let Ok(n) = libc::nfds_t::try_from(fds.len()) else { return };
    // SAFETY: `fds` is a live array of `n` pollfd structs for the duration of the call.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
    if ret <= 0 {
        return; // timeout, or EINTR: the caller checks the deadline
    }
    for (pfd, &i) in fds.iter().zip(&idx) {
        if pfd.revents != 0 {
            if let Some(c) = conns.get_mut(i) {
                c.ready();
            }
        }
    }
}

/// One request to `path`, the whole exchange (connect, write, read) bounded by `timeout`
/// and the reply line by `max_reply_bytes`.
///
/// # Errors
/// The socket fails, the reply is late (`TimedOut`), too long or not JSON.
pub fn request_within(
    path: &Path,
    req: &Value,
    timeout: Duration,
    max_reply_bytes: usize,
) -> std::io::Result<Value> {
    let jobs = [(path, vec![req.clone()])];
    let deadline = Instant::now() + timeout;
    match exchange_capped(&jobs, deadline, max_reply_bytes).pop() {
        Some(Ok(mut replies)) => {
            replies.pop().ok_or_else(|| std::io::Error::from(ErrorKind::UnexpectedEof))
        }
        Some(Err(e)) => Err(e.into()),
        None => Err(std::io::Error::from(ErrorKind::UnexpectedEof)),
    }
}

/// One non-blocking connect: `WouldBlock` when the listener's backlog is full (a plain
/// connect would wait for as long as the VM does not accept).
///
/// # Errors
/// The path is too long, or socket(2) or connect(2) fails.
pub fn nonblocking_connect(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (dst, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([b]);
    }
    let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that lives across the call.
    let ret = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    fn sock(name: &str) -> (crate::host::rundir::PrivateDir, std::path::PathBuf) {
        let dir = crate::host::rundir::PrivateDir::new("ebb-poll-unit-").unwrap();
        let path = dir.path().join(format!("{name}.sock"));
        (dir, path)
    }

    /// Serves one connection: answers each line with `reply(line)` written in `pieces`.
    fn serve(path: &Path, reply: fn(&str) -> Vec<Vec<u8>>) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let Ok((conn, _)) = listener.accept() else { return };
            let mut w = conn.try_clone().unwrap();
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { return };
                for piece in reply(&line) {
                    if w.write_all(&piece).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
    }

    #[test]
    fn pipelined_requests_get_their_replies_in_order() {
        let (_d, path) = sock("echo");
        serve(&path, |line| vec![format!("{{\"echo\":{line}}}\n").into_bytes()]);
        let reqs = vec![serde_json::json!({"a": 1}), serde_json::json!({"b": 2})];
        let out = exchange_all(&[(&path, reqs.clone())], Instant::now() + Duration::from_secs(5));
        let replies = out.into_iter().next().unwrap().unwrap();
        assert_eq!(
            replies,
            [serde_json::json!({"echo": reqs[0]}), serde_json::json!({"echo": reqs[1]})]
        );
    }

    #[test]
    fn a_reply_trickled_a_byte_at_a_time_fails_at_the_deadline() {
        let (_d, path) = sock("trickle");
        serve(&path, |_| (0..1000).map(|_| b" ".to_vec()).collect());
        let start = Instant::now();
        let req = serde_json::json!({});
        let err = request_within(&path, &req, Duration::from_millis(300), MAX_REPLY_BYTES);
        assert_eq!(err.unwrap_err().kind(), ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[test]
    fn a_reply_longer_than_the_cap_fails_that_vm_only() {
        let (_d, long) = sock("long");
        serve(&long, |_| vec![vec![b' '; MAX_REPLY_BYTES], b"{}\n".to_vec()]);
        let (_e, ok) = sock("ok");
        serve(&ok, |_| vec![b"{}\n".to_vec()]);
        let req = vec![serde_json::json!({})];
        let out = exchange_all(
            &[(&long, req.clone()), (&ok, req)],
            Instant::now() + Duration::from_secs(5),
        );
        assert!(matches!(out[0], Err(PollError::TooLong(MAX_REPLY_BYTES))), "{:?}", out[0]);
        assert_eq!(out[1].as_ref().unwrap(), &[serde_json::json!({})]);
    }

    #[test]
    fn a_closed_connection_and_a_bad_line_are_that_vms_errors() {
        let (_d, closed) = sock("closed");
        serve(&closed, |_| vec![]);
        let (_e, bad) = sock("bad");
        serve(&bad, |_| vec![b"not json\n".to_vec()]);
        let req = vec![serde_json::json!({}), serde_json::json!({})];
        let out = exchange_all(
            &[(&bad, req.clone()), (&closed, req)],
            Instant::now() + Duration::from_secs(5),
        );
        assert!(matches!(out[0], Err(PollError::BadJson(_))), "{:?}", out[0]);
        // The server thread ends its loop only when the client closes: a timeout here.
        assert!(out[1].is_err(), "{:?}", out[1]);
    }
}
