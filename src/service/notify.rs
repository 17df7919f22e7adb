//! systemd's notification protocol (`sd_notify(3)`), without libsystemd: datagrams such as
//! `READY=1`, `STATUS=...` and `WATCHDOG=1` to the socket named by `NOTIFY_SOCKET`
//! (a path, or an abstract name written `@name`). Without `NOTIFY_SOCKET` nothing is sent.
//!
//! A send never blocks and a failed one is logged once: the service manager going away
//! must not stop ebb.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    watchdog: Option<Duration>,
    warned: std::cell::Cell<bool>,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for, with the watchdog interval of `WATCHDOG_USEC`
    /// (when `WATCHDOG_PID` is unset or names this process); None without `NOTIFY_SOCKET`.
    /// The variables are removed, so that the VMs this process starts do not inherit them.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let usec = std::env::var("WATCHDOG_USEC").ok().and_then(|u| u.parse::<u64>().ok());
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        let addr = match address(&path) {
            Ok(a) => a,
            Err(e) => {
                log::warn!("NOTIFY_SOCKET {path:?}: {e}; not notifying systemd");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("NOTIFY_SOCKET: {e}; not notifying systemd");
                return None;
            }
        };
        let watchdog = usec.filter(|&u| u > 0 && pid_ok).map(Duration::from_micros);
        Some(Self { socket, addr, watchdog, warned: std::cell::Cell::new(false) })
    }

    /// The watchdog interval systemd expects pings within, if it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (`KEY=value` lines).
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            if !self.warned.replace(true) {
                log::warn!("notifying systemd: {e} (said once)");
            }
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\nMAINPID={}", std::process::id()));
    }

    /// A status line, and a watchdog ping if systemd wants them.
    pub fn status(&self, status: &str) {
        if self.watchdog.is_some() {
            self.send(&format!("STATUS={status}\nWATCHDOG=1"));
        } else {
            self.send(&format!("STATUS={status}"));
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }
}

/// The address of a `NOTIFY_SOCKET` value: a path, or `@name` for an abstract socket.
fn address(value: &std::ffi::OsStr) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None if bytes.starts_with(b"/") => std::os::unix::net::SocketAddr::from_pathname(value),
        None => Err(std::io::Error::other("neither an absolute path nor @name")),
    }
}
