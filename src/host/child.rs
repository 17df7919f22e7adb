//! One VM's process: `ebb run` spawned from a [`VmSpec`], or one a host before this one
//! started and this one adopted; its control socket, its exit.
//!
//! Each child is put in its own process group (a terminal's Ctrl-C reaches the host, which
//! stops the children in order). Unless the host keeps its VMs across restarts (a state
//! directory), a child asks the kernel for `SIGKILL` when the host dies
//! (`PR_SET_PDEATHSIG`), so that a host killed with `kill -9` leaves no VM behind. The
//! death signal fires when the *thread* that forked exits, so children are spawned from the
//! host's main thread, which lives as long as the host.
//!
//! An adopted VM is not this process's child: it cannot be waited for. It is watched through
//! a pidfd (which, unlike a pid, cannot come to name another process), and it says how it
//! ended in its status file (`ebb run --status-file`), which the host reads when the pidfd
//! says it has.
//!
//! A VM of a sharing group inherits its membership (`--share-group-fds`): the group's
//! sealed pool and its end of a socket to the group's broker; every other descriptor of the
//! host is made close-on-exec before exec (`ebb::jail`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::config::VmSpec;
use super::poll::nonblocking_connect;
use crate::cli::run::RunArgs;
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
    proc: Proc,
    exit: Option<VmExit>,
    /// Where it writes its exit code, if it was given one.
    status_file: Option<PathBuf>,
    /// The uid it runs as, when the host gave it one.
    pub uid: Option<u32>,
}

#[derive(Debug)]
enum Proc {
    /// Spawned by this host.
    Child(Child),
    /// Spawned by an earlier host and adopted: watched through its pidfd.
    Adopted { pid: u32, pidfd: OwnedFd },
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// As its parent, this host, saw it.
    Status(ExitStatus),
    /// An adopted VM: the exit code it wrote in its status file.
    Code(i32),
    /// An adopted VM that ended without writing its code (killed, or it crashed).
    Unknown,
}

impl VmExit {
    /// It exited 0.
    pub fn success(self) -> bool {
        match self {
            Self::Status(s) => s.success(),
            Self::Code(c) => c == 0,
            Self::Unknown => false,
        }
    }
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

/// How a VM ended, as a person reads it: `exit status 3` or `killed by signal 9`.
pub fn describe(exit: VmExit) -> String {
    let status = match exit {
        VmExit::Status(s) => s,
        VmExit::Code(code) => return format!("exit status {code}"),
        VmExit::Unknown => return "ended without an exit status (killed or crashed)".into(),
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The `ebb run` flags that describe `vm`: its table's keys, then `extra` (the policy's,
/// less those the VM's `args` set), then its `args`. The host parses them into the VM's
/// description file; the child never sees them as flags.
pub fn description_args(vm: &VmSpec, extra: &[String]) -> Vec<String> {
    let e = &vm.entry;
    let mut a: Vec<String> = vec!["--mem".into(), format!("{}M", vm.memory_bytes >> 20)];
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
    a.extend(policy_args(extra, &e.args));
    a.extend(e.args.iter().cloned());
    a
}

/// Writes `text` to `path`, mode 0600, replacing what was there.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
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
        keep: Option<&Keep>,
    ) -> Result<Self, ChildError> {
        let name = vm.entry.name.clone();
        let sock = dir.join(format!("{name}.sock"));
        let parent = std::process::id();
        let die_with_host = keep.is_none();
        let spawn_error = |msg: String| ChildError::Spawn {
            name: name.clone(),
            source: std::io::Error::other(msg),
        };
        // The VM's description goes to it as a file (`run --config`), parsed here first so
        // that a bad option is the host's error, with the VM named.
        let mut description = RunArgs::parse_description(description_args(vm, extra))
            .map_err(|e| spawn_error(format!("its ebb run options: {e}")))?;
        if let Some(run) = &vm.entry.run {
            description = description
                .with_keys(run)
                .map_err(|e| spawn_error(format!("its run table: {e}")))?;
        }
        let file = dir.join(format!("{name}.toml"));
        let text =
            description.to_toml().map_err(|e| spawn_error(format!("its description: {e}")))?;
        write_private(&file, &text)
            .map_err(|e| spawn_error(format!("writing {}: {e}", file.display())))?;
        let jail = crate::jail::next_vm_args();
        let uid =
            jail.iter().position(|a| a == "--uid").and_then(|i| jail.get(i + 1)?.parse().ok());
        let mut cmd = Command::new(exe);
        cmd.arg("run").arg("--config").arg(&file).arg("--api-sock").arg(&sock).args(jail);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let status_file = keep.map(|k| k.dir.join(format!("{name}.status")));
        if let (Some(k), Some(status)) = (keep, &status_file) {
            // A VM that outlives its host says how it ended in a file, and logs to one (the
            // host's stderr may be a pipe no one reads once the host is gone).
            let _ = std::fs::remove_file(status);
            cmd.arg("--status-file").arg(status);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(k.dir.join(format!("{name}.log")))
                .map_err(|source| ChildError::Spawn { name: name.clone(), source })?;
            cmd.stderr(log);
        }
        let inherit = group.map(|g| [g.data.as_raw_fd(), g.link.as_raw_fd()]);
        if let Some([d, m]) = inherit {
            cmd.arg(format!("--share-group-fds={d},{m}"));
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, setpgid, close_range, fcntl, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if die_with_host && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
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
        Ok(Self { name, sock, proc: Proc::Child(child), exit: None, status_file, uid })
    }

    /// Adopts VM `name`, process `pid`, started by an earlier host, if it still runs and is
    /// the process that host started (`start_time`, from `/proc/PID/stat`, matches): None if
    /// it has gone.
    pub fn adopt(
        name: &str,
        sock: &Path,
        pid: u32,
        start_time: u64,
        status_file: PathBuf,
        uid: Option<u32>,
    ) -> Option<Self> {
        let pidfd = super::state::pidfd_open(pid).ok()?;
        // Checked after the pidfd is open: the pid cannot be reused while it is held.
        if super::state::start_time(pid) != Some(start_time) {
            return None;
        }
        Some(Self {
            name: name.into(),
            sock: sock.into(),
            proc: Proc::Adopted { pid, pidfd },
            exit: None,
            status_file: Some(status_file),
            uid,
        })
    }

    /// Whether this host adopted the process rather than started it.
    pub fn adopted(&self) -> bool {
        matches!(self.proc, Proc::Adopted { .. })
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
        match &self.proc {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// How it ended, if it has (reaps a child).
    pub fn poll_exit(&mut self) -> Option<VmExit> {
        if self.exit.is_none() {
            self.exit = match &mut self.proc {
                Proc::Child(c) => c.try_wait().ok().flatten().map(VmExit::Status),
                Proc::Adopted { pidfd, .. } => {
                    let fds = [pidfd.as_raw_fd()];
                    match crate::mm::sys::poll_readable(fds, 0) {
                        Ok([true]) => {
                            Some(self.status_file.as_deref().map_or(VmExit::Unknown, read_status))
                        }
                        _ => None,
                    }
                }
            };
        }
        self.exit
    }

    /// How it ended, as last seen by [`poll_exit`](Self::poll_exit).
    pub fn exit_status(&self) -> Option<VmExit> {
        self.exit
    }

    /// Sends `sig` to the process unless it has ended.
    pub fn signal(&mut self, sig: i32) {
        if self.poll_exit().is_some() {
            return;
        }
        match &self.proc {
            Proc::Child(c) => {
                let pid = libc::pid_t::try_from(c.id()).unwrap_or(0);
                if pid > 0 {
                    // SAFETY: kill(2) on our own unreaped child: the pid cannot have been
                    // reused.
                    unsafe { libc::kill(pid, sig) };
                }
            }
            Proc::Adopted { pidfd, .. } => {
                let _ = super::state::pidfd_send_signal(pidfd, sig);
            }
        }
    }

    /// Kills the process and waits for its end.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if self.exit.is_some() {
            return;
        }
        match &mut self.proc {
            Proc::Child(c) => self.exit = c.wait().ok().map(VmExit::Status),
            Proc::Adopted { pidfd, .. } => {
                let fds = [pidfd.as_raw_fd()];
                let _ = crate::mm::sys::poll_readable(fds, 5000);
                let _ = self.poll_exit();
            }
        }
    }

    /// Asks it to stop (SIGTERM), waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) -> Option<VmExit> {
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

/// What a host that keeps its VMs across restarts gives each: where its status file and its
/// log go.
#[derive(Debug, Clone)]
pub struct Keep {
    /// The state directory's VM directory.
    pub dir: PathBuf,
}

/// The exit code in a status file: `Code`, or `Unknown` when it is empty or unreadable.
fn read_status(path: &Path) -> VmExit {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .map_or(VmExit::Unknown, VmExit::Code)
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
    /// A VM that dies with its host is killed when its handle goes (a host that failed
    /// half way leaves none behind); one kept across restarts runs on for the next host.
    fn drop(&mut self) {
        if self.status_file.is_none() {
            self.kill();
        }
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
