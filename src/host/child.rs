//! One VM's process: `ebb run` spawned from a [`VmSpec`], its control socket, its exit.
//!
//! Each child is put in its own process group (a terminal's Ctrl-C reaches the host, which
//! stops the children in order) and asks the kernel for `SIGKILL` when the host dies
//! (`PR_SET_PDEATHSIG`), so that a host killed with `kill -9` leaves no VM behind. The
//! death signal fires when the *thread* that forked exits, so children are spawned from the
//! host's main thread, which lives as long as the host.
//!
//! A VM of a sharing group inherits its group's two memfds (`--share-group-fds`); every
//! other descriptor of the host is made close-on-exec before exec (`ebb::jail`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::config::VmSpec;

/// How long a child's control socket may take to appear.
pub const SOCKET_WAIT: Duration = Duration::from_secs(20);
/// How long the host waits for one reply from a child.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors starting or talking to a child.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// `ebb run` could not be started.
    #[error("cannot start vm {name:?}: {source}")]
    Spawn {
        /// The VM.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// The child ended before its control socket answered.
    #[error("vm {name:?} ended before its control socket came up ({status})")]
    EndedEarly {
        /// The VM.
        name: String,
        /// How it ended.
        status: String,
    },
    /// The control socket did not come up in time.
    #[error("vm {name:?}: no control socket at {path} after {secs} s")]
    NoSocket {
        /// The VM.
        name: String,
        /// The socket.
        path: PathBuf,
        /// Seconds waited.
        secs: u64,
    },
    /// A request failed.
    #[error("vm {name:?}: {msg}")]
    Request {
        /// The VM.
        name: String,
        /// What went wrong.
        msg: String,
    },
}

/// A running (or ended) VM process.
#[derive(Debug)]
pub struct VmProcess {
    /// The VM's name.
    pub name: String,
    /// Its control socket.
    pub sock: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

/// The policy's `--option value` pairs in `extra`, less those the VM's own `args` set (the
/// user's word wins, and `ebb run` refuses an option twice).
fn policy_args(extra: &[String], own: &[String]) -> Vec<String> {
    let set_by_user = |opt: &str| own.iter().any(|a| a == opt || a.starts_with(&format!("{opt}=")));
    let mut out = Vec::new();
    for pair in extra.chunks(2) {
        match pair.first() {
            Some(opt) if set_by_user(opt) => {
                log::warn!("the policy's {opt} is left out: the VM's args set it");
            }
            _ => out.extend(pair.iter().cloned()),
        }
    }
    out
}

/// `status` as a person reads it: `exit status 3` or `killed by signal 9`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The `ebb run` arguments for `vm`, with its socket at `sock`.
pub fn run_args(vm: &VmSpec, sock: &Path) -> Vec<String> {
    let e = &vm.entry;
    let mut a: Vec<String> =
        vec!["run".into(), "--mem".into(), format!("{}M", vm.memory_bytes >> 20)];
    a.extend(["--api-sock".into(), sock.display().to_string()]);
    let mut opt = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            a.push(k.into());
            a.push(v);
        }
    };
    opt("--vcpus", e.vcpus.map(|n| n.to_string()));
    opt("--kernel", e.kernel.as_ref().map(|p| p.display().to_string()));
    opt("--initrd", e.initrd.as_ref().map(|p| p.display().to_string()));
    opt("--cmdline", e.cmdline.clone());
    opt("--firmware", e.firmware.clone());
    opt("--firmware-blob", e.firmware_blob.as_ref().map(|p| p.display().to_string()));
    opt("--serial-log", e.serial_log.as_ref().map(|p| p.display().to_string()));
    for fa in &e.firmware_args {
        a.extend(["--firmware-arg".into(), fa.clone()]);
    }
    if let Some(b) = &vm.balloon {
        a.push(format!("--balloon={b}"));
    }
    a.extend(crate::jail::next_vm_args());
    a.extend(e.args.iter().cloned());
    a
}

impl VmProcess {
    /// Starts `exe run ...` for `vm` with its socket in `dir`, and waits for the socket.
    /// `group` holds the memfds of its sharing group's pool, which the child inherits;
    /// `extra` are more options (the policy's).
    ///
    /// # Errors
    /// The process cannot start, ends first, or its socket does not come up.
    pub fn spawn(
        exe: &Path,
        vm: &VmSpec,
        dir: &Path,
        group: Option<&(File, File)>,
        extra: &[String],
    ) -> Result<Self, ChildError> {
        let name = vm.entry.name.clone();
        let sock = dir.join(format!("{name}.sock"));
        let parent = std::process::id();
        let mut cmd = Command::new(exe);
        cmd.args(run_args(vm, &sock)).args(policy_args(extra, &vm.entry.args));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let inherit = group.map(|(d, m)| [d.as_raw_fd(), m.as_raw_fd()]);
        if let Some([d, m]) = inherit {
            cmd.arg(format!("--share-group-fds={d},{m}"));
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, setpgid, close_range, fcntl, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The host may have died before the prctl: then no signal would come.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    libc::_exit(1);
                }
                libc::setpgid(0, 0);
                // Nothing of the host's but the group's memfds reaches the VM.
                crate::jail::child_pre_exec(inherit.as_ref().map_or(&[], |fds| &fds[..]))
            });
        }
        let child =
            cmd.spawn().map_err(|source| ChildError::Spawn { name: name.clone(), source })?;
        let mut p = Self { name, sock, child, exit: None };
        p.wait_for_socket()?;
        Ok(p)
    }

    fn wait_for_socket(&mut self) -> Result<(), ChildError> {
        let start = Instant::now();
        loop {
            if UnixStream::connect(&self.sock).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.poll_exit() {
                return Err(ChildError::EndedEarly {
                    name: self.name.clone(),
                    status: describe(status),
                });
            }
            if start.elapsed() > SOCKET_WAIT {
                self.kill();
                return Err(ChildError::NoSocket {
                    name: self.name.clone(),
                    path: self.sock.clone(),
                    secs: SOCKET_WAIT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it has (reaps it).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// How it ended, as last reaped by [`poll_exit`](Self::poll_exit).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Sends `sig` to the process unless it has been reaped.
    pub fn signal(&mut self, sig: i32) {
        if self.poll_exit().is_none() {
            let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
            if pid > 0 {
                // SAFETY: kill(2) on our own unreaped child: the pid cannot have been reused.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if self.exit.is_none() {
            self.exit = self.child.wait().ok();
        }
    }

    /// Asks it to stop (SIGTERM), waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while self.poll_exit().is_none() && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.exit.is_none() {
            log::warn!(
                "vm {}: still running {} s after SIGTERM: killed",
                self.name,
                grace.as_secs()
            );
            self.kill();
        }
        self.exit
    }

    /// Sends one request and returns the reply (an `{"error": ...}` reply is an error).
    ///
    /// # Errors
    /// The socket fails, times out, or the VM answers with an error.
    pub fn request(&self, req: &Value) -> Result<Value, ChildError> {
        let fail = |msg: String| ChildError::Request { name: self.name.clone(), msg };
        let reply = request_with_timeout(&self.sock, req, REPLY_TIMEOUT)
            .map_err(|e| fail(e.to_string()))?;
        match reply.get("error").and_then(Value::as_str) {
            Some(e) => Err(fail(format!("{req} refused: {e}"))),
            None => Ok(reply),
        }
    }
}

/// One request over a fresh connection, reads and writes bounded by `timeout`.
///
/// # Errors
/// The socket fails or times out, or the reply is not JSON.
pub fn request_with_timeout(path: &Path, req: &Value, timeout: Duration) -> std::io::Result<Value> {
    let mut stream = connect_within(path, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).take(1 << 20).read_line(&mut line)?;
    serde_json::from_str(line.trim())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Connects to `path`, giving up after `timeout`. A plain connect waits as long as the
/// listener's backlog is full: a VM that stopped accepting would freeze the host.
fn connect_within(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let start = Instant::now();
    loop {
        match nonblocking_connect(path) {
            Ok(s) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the control socket accepts no connection",
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One non-blocking connect: `WouldBlock` when the listener's backlog is full.
fn nonblocking_connect(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "socket path too long"));
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

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_option_the_vm_sets_itself_is_left_out() {
        let extra: Vec<String> = ["--zcache-max", "0", "--swap-max", "0"].map(String::from).into();
        let own: Vec<String> = ["--zcache-max=5%"].map(String::from).into();
        assert_eq!(policy_args(&extra, &own), ["--swap-max", "0"]);
        assert_eq!(policy_args(&extra, &[]), extra);
    }

    #[test]
    fn a_vm_that_accepts_no_connection_costs_at_most_the_timeout() {
        let path = std::env::temp_dir().join(format!("ebb-full-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Fill the backlog: nothing accepts.
        let mut held = Vec::new();
        while let Ok(s) = nonblocking_connect(&path) {
            held.push(s);
            assert!(held.len() < 100_000, "the backlog never filled");
        }
        let start = Instant::now();
        let err = request_with_timeout(&path, &serde_json::json!({}), Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_socket_nobody_listens_on_fails_at_once() {
        let path = std::env::temp_dir().join(format!("ebb-nobody-{}.sock", std::process::id()));
        let start = Instant::now();
        assert!(
            request_with_timeout(&path, &serde_json::json!({}), Duration::from_secs(2)).is_err()
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
