//! The jailer: what a VM process gives up before it runs a guest, and who may talk to it.
//!
//! Every `ebb run` (alone, or a child of `ebb host`) goes through these steps, in order:
//! 1. [`early`], first thing in `main`: `/proc/self/pagemap` is opened (a non-dumpable
//!    process may not open its own, see below), then `PR_SET_DUMPABLE` 0: no core dump of
//!    guest RAM, and no process of the same uid may open `/proc/PID/fd/*`, `/proc/PID/mem`
//!    or ptrace it; and `RLIMIT_CORE` 0, which keeps guest RAM and the heap buffers that hold
//!    guest data (zcache slabs) out of core files (`MADV_DONTDUMP` is only on the reclaim
//!    scratch range for now: see the TODO in `vstate/memory.rs`).
//! 2. [`close_inherited_fds`]: every descriptor from 3 up that the command line does not name
//!    (`--share-group-fds`) is closed; `ebb host` also marks them close-on-exec in the child
//!    before exec ([`child_pre_exec`]).
//! 3. The VM is built: `/dev/kvm`, userfaultfd, the swap file, the serial log, the statistics
//!    file and the control socket are opened or bound while the process still has its rights.
//! 4. [`lock_down`]: `setgroups([])`, `setresgid`, `setresuid` to `--uid`/`--gid` when given
//!    (glibc applies them to every thread), `PR_SET_DUMPABLE` 0 and `PR_SET_PDEATHSIG` again
//!    (a credential change clears both), then `PR_SET_NO_NEW_PRIVS` and the seccomp filter ([`seccomp`]) on every thread.
//!
//! Kernel facts that shape the order:
//! - A non-dumpable process's `/proc/PID/*` files belong to root; `/proc/self/pagemap` is
//!   mode 0400, so an unprivileged non-dumpable process cannot open its own. It is opened
//!   once before, and every reader shares that descriptor (`crate::mm::sys::Pagemap`).
//! - `setresuid` to a non-zero uid drops every capability and sets dumpable to
//!   `fs.suid_dumpable`; it is set to 0 again after.
//! - Seccomp filters are inherited by threads created later, so one TSYNC install after the
//!   engine's threads start and before the vCPU thread covers every thread.
//!
//! The control sockets (a VM's and the host's) serve only their owner's uid and root
//! ([`check_peer`]): the owner is the uid that started `ebb run` or `ebb host`, passed down
//! to a host's VMs with `--owner-uid`.

pub mod names;
pub mod seccomp;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The first uid (and gid) `ebb host` started as root gives its VMs: VM number `n` in start
/// order (from 0) runs as `DEFAULT_VM_UID_BASE + n`. Above the ranges distributions hand to
/// people and system services, as the ranges of container runtimes are.
pub const DEFAULT_VM_UID_BASE: u32 = 100_000;

/// Errors of the jailer.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// `prctl` or `setrlimit` refused a setting.
    #[error("{what}: {source}")]
    Prctl {
        /// The setting.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Inherited descriptors could not be closed.
    #[error("closing inherited descriptors: {0}")]
    CloseFds(#[source] std::io::Error),
    /// The uid or gid could not be changed.
    #[error("cannot change to uid {uid}, gid {gid} ({step}): {source}")]
    Identity {
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
        /// The call that failed.
        step: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The seccomp filter could not be built.
    #[error("building the seccomp filter: {0}")]
    Filter(#[source] seccompiler::BackendError),
    /// The seccomp filter could not be installed.
    #[error("installing the seccomp filter: {0}")]
    Install(#[source] seccompiler::Error),
    /// The parent (`ebb host`) ended while the VM changed uid.
    #[error("the parent process ended while the VM was set up")]
    ParentGone,
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Sigaction(#[source] std::io::Error),
}

/// A uid and gid a VM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What [`lock_down`] does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JailOptions {
    /// Change to this uid and gid (needs root).
    pub identity: Option<Identity>,
    /// Install the seccomp filter (`--no-seccomp` turns it off, for debugging only).
    pub seccomp: bool,
}

fn prctl_set(
    what: &'static str,
    option: libc::c_int,
    value: libc::c_ulong,
) -> Result<(), JailError> {
    // SAFETY: prctl with an integer option and value; no memory is passed.
    if unsafe { libc::prctl(option, value, 0, 0, 0) } != 0 {
        return Err(JailError::Prctl { what, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Makes the process non-dumpable: no core dumps, no `/proc/PID/fd` opens or ptrace by
/// processes of the same uid.
///
/// # Errors
/// The prctl failed.
pub fn set_undumpable() -> Result<(), JailError> {
    prctl_set("prctl(PR_SET_DUMPABLE, 0)", libc::PR_SET_DUMPABLE, 0)
}

/// The first step of `ebb run`: opens `/proc/self/pagemap` while it still can, then makes
/// the process non-dumpable.
///
/// # Errors
/// The prctl failed (a pagemap that cannot be opened is left for its readers to report).
pub fn early() -> Result<(), JailError> {
    crate::mm::sys::open_pagemap();
    set_undumpable()?;
    // No core file at all, whatever fs.suid_dumpable says: the zcache's slabs and other
    // heap buffers hold guest data too, and marking each MADV_DONTDUMP would split the
    // heap into one mapping per slab.
    let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(JailError::Prctl {
            what: "setrlimit(RLIMIT_CORE, 0)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Closes every descriptor from 3 up but those in `keep` (and the shared pagemap).
///
/// # Errors
/// `close_range` failed.
pub fn close_inherited_fds(keep: &[RawFd]) -> Result<(), JailError> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.extend(crate::mm::sys::pagemap_fd());
    keep.sort_unstable();
    keep.dedup();
    let mut first: u32 = 3;
    for fd in keep {
        let fd = fd.unsigned_abs();
        if fd > first {
            sys_close_range(first, fd - 1, 0).map_err(JailError::CloseFds)?;
        }
        first = fd.saturating_add(1);
    }
    sys_close_range(first, u32::MAX, 0).map_err(JailError::CloseFds)
}

/// Raw `close_range(2)` (Linux 5.9; `CLOSE_RANGE_CLOEXEC` 5.11). Async-signal-safe.
fn sys_close_range(first: u32, last: u32, flags: u32) -> std::io::Result<()> {
    // SAFETY: close_range takes plain integers; closing descriptors this process owns is
    // what the callers ask for.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// In `ebb host`'s child between fork and exec: every descriptor from 3 up becomes
/// close-on-exec, but `keep`, which the VM inherits. Only async-signal-safe calls.
///
/// # Errors
/// `close_range` or `fcntl` failed.
pub fn child_pre_exec(keep: &[RawFd]) -> std::io::Result<()> {
    sys_close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC)?;
    for &fd in keep {
        // SAFETY: fcntl on an integer descriptor; clears its close-on-exec flag.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The parent-death signal of this thread (0: none).
fn parent_death_signal() -> Result<libc::c_int, JailError> {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which points at `signal`.
    if unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &raw mut signal, 0, 0, 0) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(JailError::Prctl { what: "prctl(PR_GET_PDEATHSIG)", source });
    }
    Ok(signal)
}

/// Changes to `id` for good: supplementary groups, gid, uid (real, effective, saved).
fn change_identity(id: Identity) -> Result<(), JailError> {
    let fail = |step| JailError::Identity {
        uid: id.uid,
        gid: id.gid,
        step,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: setgroups with an empty list; no memory is read.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(fail("setgroups"));
    }
    // SAFETY: integer arguments only. glibc applies it to every thread of the process.
    if unsafe { libc::setresgid(id.gid, id.gid, id.gid) } != 0 {
        return Err(fail("setresgid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(id.uid, id.uid, id.uid) } != 0 {
        return Err(fail("setresuid"));
    }
    Ok(())
}

/// The last step before the guest runs: the identity change, non-dumpable again, no new
/// privileges, and the seccomp filter on every thread.
///
/// # Errors
/// Any step failed: the VM must not run half-jailed.
pub fn lock_down(opts: &JailOptions) -> Result<(), JailError> {
    if let Some(id) = opts.identity {
        // A credential change clears the parent-death signal `ebb host` asked for: set it
        // again, or a host killed with SIGKILL would leave this VM running.
        let death_signal = parent_death_signal()?;
        // SAFETY: getppid cannot fail.
        let parent = unsafe { libc::getppid() };
        change_identity(id)?;
        if death_signal != 0 {
            let signal = libc::c_ulong::from(death_signal.unsigned_abs());
            prctl_set("prctl(PR_SET_PDEATHSIG)", libc::PR_SET_PDEATHSIG, signal)?;
            // The parent may have died in between: then no signal would come.
            // SAFETY: getppid cannot fail.
            if unsafe { libc::getppid() } != parent {
                return Err(JailError::ParentGone);
            }
        }
    }
    set_undumpable()?;
    prctl_set("prctl(PR_SET_NO_NEW_PRIVS, 1)", libc::PR_SET_NO_NEW_PRIVS, 1)?;
    if opts.seccomp {
        seccomp::install()?;
        log::debug!("seccomp: {} system calls allowed", seccomp::allowed_count());
    } else {
        log::warn!("--no-seccomp: the VM runs without its system call filter (debugging only)");
    }
    #[cfg(debug_assertions)]
    test_forbidden_call();
    Ok(())
}

/// Test hook (debug builds only): with `EBB_TEST_FORBIDDEN_SYSCALL` set, the VM calls
/// `ptrace` once locked down, so a test can see the filter end it and name the call.
#[cfg(debug_assertions)]
fn test_forbidden_call() {
    if std::env::var_os("EBB_TEST_FORBIDDEN_SYSCALL").is_some() {
        log::warn!("EBB_TEST_FORBIDDEN_SYSCALL: calling ptrace");
        // SAFETY: PTRACE_TRACEME takes no memory; the filter refuses it before it runs.
        unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    }
}

static OWNER_UID: OnceLock<u32> = OnceLock::new();

/// Sets the uid whose clients the control socket serves (besides root): `--owner-uid`.
/// Only the first call counts.
pub fn set_owner_uid(uid: u32) {
    let _ = OWNER_UID.set(uid);
}

/// The uid served by the control sockets besides root: `--owner-uid`, else the real uid of
/// this process when first asked.
pub fn owner_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    *OWNER_UID.get_or_init(|| unsafe { libc::getuid() })
}

/// The uid of the process at the other end of a Unix stream (`SO_PEERCRED`).
///
/// # Errors
/// getsockopt failed.
pub fn peer_uid(stream: &impl AsRawFd) -> std::io::Result<u32> {
    // SAFETY: a zeroed ucred is a valid value for the kernel to fill in.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(std::io::Error::other)?;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether the client at the other end of `stream` may be served: root or the owner. The
/// error is the line the client is told.
///
/// # Errors
/// The reason the client is refused.
pub fn check_peer(stream: &impl AsRawFd) -> Result<(), String> {
    let owner = owner_uid();
    match peer_uid(stream) {
        Ok(0) => Ok(()),
        Ok(uid) if uid == owner => Ok(()),
        Ok(uid) => Err(format!(
            "refused: this control socket serves only uid {owner} and root, and the client is uid {uid}"
        )),
        Err(e) => Err(format!("refused: the client's credentials cannot be read ({e})")),
    }
}

static VM_UID_BASE: AtomicU32 = AtomicU32::new(DEFAULT_VM_UID_BASE);
static VMS_STARTED: AtomicU32 = AtomicU32::new(0);

/// Sets the first uid `ebb host` started as root gives its VMs (`--vm-uid-base`).
pub fn set_vm_uid_base(base: u32) {
    VM_UID_BASE.store(base, Ordering::Relaxed);
}

/// Notes that a VM (adopted from an earlier host) runs as `uid`: the VMs started after it
/// get uids above it, never its own.
pub fn vm_uid_taken(uid: u32) {
    if let Some(n) = uid.checked_sub(VM_UID_BASE.load(Ordering::Relaxed)) {
        VMS_STARTED.fetch_max(n.saturating_add(1), Ordering::Relaxed);
    }
}

/// The jail arguments of the next VM `ebb host` starts: `--owner-uid` (the host's uid), and,
/// when the host is root, `--uid`/`--gid` of the VM's own: the base plus the number of VMs
/// started before it.
pub fn next_vm_args() -> Vec<String> {
    let mut args = vec!["--owner-uid".to_string(), owner_uid().to_string()];
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let n = VMS_STARTED.fetch_add(1, Ordering::Relaxed);
        let id = VM_UID_BASE.load(Ordering::Relaxed).saturating_add(n).to_string();
        args.extend(["--uid".to_string(), id.clone(), "--gid".to_string(), id]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_of_the_same_uid_is_served() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // This process is both ends: its uid is root or the owner (the real uid).
        assert_eq!(check_peer(&a), Ok(()));
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(peer_uid(&a).unwrap(), euid);
    }

    #[test]
    fn vm_args_name_the_owner() {
        let args = next_vm_args();
        assert_eq!(args[0], "--owner-uid");
        assert_eq!(args[1], owner_uid().to_string());
    }
}
