//! One VM's process: `ebb run` spawned from a [`VmSpec`], its control socket, its exit.
//!
//! Each child is put in its own process group (a terminal's Ctrl-C reaches the host, which
//! stops the children in order) and asks the kernel for `SIGKILL` when the host dies
//! (`PR_SET_PDEATHSIG`), so that a host killed with `kill -9` leaves no VM behind. The
//! death signal fires when the *thread* that forked exits, so children are spawned from the
//! host's main thread, which lives as long as the host.
//!
//! A VM of a sharing group inherits its membership (`--share-group-fds`): the group's
//! sealed pool and its end of a socket to the group's broker; every other descriptor of the
//! host is made close-on-exec before exec (`ebb::jail`).

use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::config::VmSpec;
use super::poll::nonblocking_connect;
use crate::mm::sharing::broker::MemberFds;

/// How long a child's control socket may take to appear.
pub const SOCKET_WAIT: Duration = Duration::from_secs(20);
/// How long a pass-through request through the host's socket may take in all.
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
    /// Starts `exe run ...` for `vm` with its socket in `dir`, without waiting for the socket
    /// ([`socket_up`](Self::socket_up) looks). `group` holds its membership of its sharing
    /// group, which the child inherits; `extra` are more options (the policy's).
    ///
    /// # Errors
    /// The process cannot start.
    pub fn spawn(
        exe: &Path,
        vm: &VmSpec,
        dir: &Path,
        group: Option<&MemberFds>,
        extra: &[String],
    ) -> Result<Self, ChildError> {
        let name = vm.entry.name.clone();
        let sock = dir.join(format!("{name}.sock"));
        let parent = std::process::id();
        let mut cmd = Command::new(exe);
        cmd.args(run_args(vm, &sock)).args(policy_args(extra, &vm.entry.args));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let inherit = group.map(|g| [g.data.as_raw_fd(), g.link.as_raw_fd()]);
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
                // Nothing of the host's but the group membership reaches the VM.
                crate::jail::child_pre_exec(inherit.as_ref().map_or(&[], |fds| &fds[..]))
            });
        }
        let child =
            cmd.spawn().map_err(|source| ChildError::Spawn { name: name.clone(), source })?;
        Ok(Self { name, sock, child, exit: None })
    }

    /// One look at the control socket, without waiting: true once it accepts connections
    /// (a full backlog counts: something listens). The host looks once a tick, so that a VM
    /// slow to come up never holds the others' tick.
    ///
    /// # Errors
    /// The process ended first, or `since` (when it was spawned) is more than
    /// [`SOCKET_WAIT`] ago: then it is killed.
    pub fn socket_up(&mut self, since: Instant) -> Result<bool, ChildError> {
        match nonblocking_connect(&self.sock) {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
            Err(_) => {}
        }
        if let Some(status) = self.poll_exit() {
            return Err(ChildError::EndedEarly {
                name: self.name.clone(),
                status: describe(status),
            });
        }
        if since.elapsed() > SOCKET_WAIT {
            self.kill();
            return Err(ChildError::NoSocket {
                name: self.name.clone(),
                path: self.sock.clone(),
                secs: SOCKET_WAIT.as_secs(),
            });
        }
        Ok(false)
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
}

/// Longest reply [`request_with_timeout`] takes: a host's `host_stats` grows with its VMs
/// (under 1 KiB each), a VM's replies stay under [`super::poll::MAX_REPLY_BYTES`].
pub const MAX_CLIENT_REPLY_BYTES: usize = 1 << 20;

/// One request over a fresh connection, the whole exchange bounded by `timeout` (a reply
/// trickled a byte at a time fails at `timeout`, not a read's timeout later) and the reply
/// by [`MAX_CLIENT_REPLY_BYTES`].
///
/// # Errors
/// The socket fails or times out, or the reply is too long or not JSON.
pub fn request_with_timeout(path: &Path, req: &Value, timeout: Duration) -> std::io::Result<Value> {
    super::poll::request_within(path, req, timeout, MAX_CLIENT_REPLY_BYTES)
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
