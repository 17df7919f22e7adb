//! A small HTTP/1.1 server for machines: `GET /metrics` (Prometheus's text format) and
//! `GET /healthz`. Requests are parsed by `httparse`, the parser under hyper: zero
//! dependencies, no async runtime, well kept, and it leaves the limits to us.
//!
//! The limits (a scraper is a client like any other, and may be hostile):
//! - one request per connection (`Connection: close`), its head at most
//!   [`MAX_HEAD_BYTES`] (431 beyond), read within [`READ_TIMEOUT`] and the reply taken
//!   within as long (the connection is dropped after);
//! - at most [`MAX_CLIENTS`] connections served at once, each on its own short-lived
//!   thread; one more is answered 503 at once, so a slow client never delays a scrape for
//!   longer than its own timeout;
//! - only `GET` and `HEAD` (405 otherwise), only the two paths (404 otherwise).
//!
//! The server makes no system call a VM process's seccomp filter refuses once it is locked
//! down: it binds (socket, bind, listen, getsockname) in [`MetricsServer::bind`], before the
//! lock-down, and serves with accept, read, write, poll and shutdown only (deadlines are
//! `poll` timeouts, not socket options).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest request head read.
pub const MAX_HEAD_BYTES: usize = 8192;
/// How long a client has to send its request head, and to take the reply.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a refused connection is read from before it is closed, and how much.
const LINGER: Duration = Duration::from_millis(200);
const LINGER_BYTES: usize = 64 * 1024;

/// Prometheus's text exposition format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the server serves: the metrics text, and health (`Ok(detail)` healthy,
/// `Err(why)` not).
pub trait Source: Send + Sync + 'static {
    /// The metrics, in Prometheus's text format.
    fn metrics(&self) -> String;
    /// Whether the process is healthy, and a line saying so.
    fn health(&self) -> Result<String, String>;
}

/// A bound listener, not served yet.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
}

/// A running server; stops (at the next accept) when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        Ok(Bound { listener, addr })
    }

    /// Binds `addr` and serves `source` on a thread.
    ///
    /// # Errors
    /// The address cannot be bound, or the thread cannot start.
    pub fn start(addr: SocketAddr, source: Arc<dyn Source>) -> std::io::Result<Self> {
        Self::bind(addr)?.serve(source)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Bound {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `source` on a thread of its own.
    ///
    /// # Errors
    /// The thread cannot start.
    pub fn serve(self, source: Arc<dyn Source>) -> std::io::Result<MetricsServer> {
        let Self { listener, addr } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ebb-http".into())
            .spawn(move || accept_loop(&listener, &source, &flag))?;
        Ok(MetricsServer { addr, stop, thread: Some(thread) })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until `stream` is ready for `events` (`POLLIN`, `POLLOUT`) or `deadline` passes:
/// false then, or on an error or a hang-up without data.
fn ready(stream: &TcpStream, events: libc::c_short, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd it is given, which lives on the stack.
        let r = unsafe { libc::poll(&mut fd, 1, ms) };
        if r > 0 {
            return fd.revents & (events | libc::POLLHUP) != 0;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Writes all of `bytes` to the non-blocking `stream` by `deadline`.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !ready(stream, libc::POLLOUT, deadline) {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, source: &Arc<dyn Source>, stop: &AtomicBool) {
    let busy = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                log::warn!("metrics server: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::AcqRel);
            let mut s = stream;
            if s.set_nonblocking(true).is_ok() {
                let deadline = Instant::now() + LINGER;
                let _ = respond(&mut s, 503, "text/plain", b"too many clients\n", false, deadline);
                linger_close(s);
            }
            continue;
        }
        let (source, busy2) = (Arc::clone(source), Arc::clone(&busy));
        let spawned = std::thread::Builder::new().name("ebb-http-client".into()).spawn(move || {
            serve(stream, source.as_ref());
            busy2.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Reads one request head (up to the blank line) within the limits; None if the client
/// went away or was too slow. `Err(())` when the head is too long.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Option<Result<Vec<u8>, ()>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !ready(stream, libc::POLLIN, deadline) {
                    return None;
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(Ok(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Some(Err(()));
        }
    }
}

fn serve(mut stream: TcpStream, source: &dyn Source) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let deadline = Instant::now() + READ_TIMEOUT;
    let head = match read_head(&mut stream, deadline) {
        None => return,
        Some(Err(())) => {
            let reply = b"request head too large\n";
            let _ = respond(&mut stream, 431, "text/plain", reply, false, deadline);
            linger_close(stream);
            return;
        }
        Some(Ok(h)) => h,
    };
    // The reply has as long again to be taken.
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let (method, path) = match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {
            (req.method.unwrap_or_default(), req.path.unwrap_or_default())
        }
        Ok(httparse::Status::Partial) | Err(_) => {
            let _ = respond(&mut stream, 400, "text/plain", b"bad request\n", false, deadline);
            return;
        }
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut stream, 405, "text/plain", b"only GET and HEAD\n", false, deadline);
        return;
    }
    let path = path.split('?').next().unwrap_or_default();
    let (status, kind, body) = match path {
        "/metrics" => (200, METRICS_TYPE, source.metrics().into_bytes()),
        "/healthz" => match source.health() {
            Ok(line) => (200, "text/plain", format!("{line}\n").into_bytes()),
            Err(why) => (503, "text/plain", format!("{why}\n").into_bytes()),
        },
        _ => (404, "text/plain", b"not found: try /metrics or /healthz\n".to_vec()),
    };
    let _ = respond(&mut stream, status, kind, &body, head_only, deadline);
}

/// Closes a connection whose request was not read to its end: says so (FIN), then reads and
/// drops what the client still sends for a moment, so that its unread request does not turn
/// the close into a reset that loses the reply on the client's side.
fn linger_close(stream: TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match (&stream).read(&mut sink) {
            Ok(0) => break,
            Ok(n) => left = left.saturating_sub(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !ready(&stream, libc::POLLIN, deadline) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    deadline: Instant,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    write_by(stream, head.as_bytes(), deadline)?;
    if !head_only {
        write_by(stream, body, deadline)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<String, String>);
    impl Source for Fixed {
        fn metrics(&self) -> String {
            "# TYPE x gauge\nx 1\n".into()
        }
        fn health(&self) -> Result<String, String> {
            self.0.clone()
        }
    }

    fn get(addr: SocketAddr, raw: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
        out
    }

    #[test]
    fn serves_metrics_and_health_and_refuses_the_rest() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = MetricsServer::start(any, Arc::new(Fixed(Ok("ok".into())))).unwrap();
        let a = server.addr();
        let m = get(a, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            m.starts_with("HTTP/1.1 200") && m.contains("version=0.0.4") && m.ends_with("x 1\n"),
            "{m}"
        );
        assert!(get(a, "GET /healthz HTTP/1.1\r\n\r\n").ends_with("\r\n\r\nok\n"));
        assert!(get(a, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(a, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(a, "garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(3 * MAX_HEAD_BYTES));
        assert!(get(a, &long).starts_with("HTTP/1.1 431"));
        let head = get(a, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "{head}");
        let sick = MetricsServer::start(any, Arc::new(Fixed(Err("stale".into())))).unwrap();
        assert!(get(sick.addr(), "GET /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503"));
    }

    #[test]
    fn slow_clients_do_not_hold_up_a_scrape() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = MetricsServer::start(any, Arc::new(Fixed(Ok("ok".into())))).unwrap();
        // More silent clients than the server serves at once.
        let _slow: Vec<TcpStream> =
            (0..MAX_CLIENTS + 4).map(|_| TcpStream::connect(server.addr()).unwrap()).collect();
        // The newcomer is answered, at once (503) or once a slow one times out (200).
        let t = std::time::Instant::now();
        let reply = get(server.addr(), "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(t.elapsed() < READ_TIMEOUT * 3, "{:?}", t.elapsed());
    }
}
