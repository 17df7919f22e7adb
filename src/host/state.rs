//! The host's state directory (`--state-dir`): what a host restarted after a crash, a
//! `kill -9` or an upgrade needs to find its VMs and go on steering them.
//!
//! `DIR/host.json` lists every VM running, written whole and renamed into place each time
//! the set changes (so a crash leaves the old list or the new one, never half of one).
//! `DIR/vms/` holds the VMs' control sockets, their status files (`NAME.status`: the exit
//! code `ebb run --status-file` writes) and their logs (`NAME.log`). The directory is the
//! host user's, mode 0700, like a run directory.
//!
//! A VM is adopted only if its process is the one the list names: same pid *and* same start
//! time (`/proc/PID/stat`), checked after a pidfd is open on it, so a pid reused by another
//! process is never taken for the VM.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::VmEntry;

/// The list's format; a list of another version is ignored (and said so).
const STATE_VERSION: u32 = 1;

/// One VM as the list keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedVm {
    /// Its name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Its start time, clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// The uid it runs as, when the host gave it one.
    pub uid: Option<u32>,
    /// Its description.
    pub entry: VmEntry,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedHost {
    version: u32,
    vms: Vec<SavedVm>,
}

/// A host's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens `path` (made, mode 0700, if missing), and its `vms/`.
    ///
    /// # Errors
    /// It cannot be made, or is not private to this user.
    pub fn open(path: &Path) -> Result<Self, String> {
        for dir in [path.to_owned(), path.join("vms")] {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            super::rundir::check_private(&dir)
                .map_err(|why| format!("{}: {why}", dir.display()))?;
        }
        Ok(Self { path: path.to_owned() })
    }

    /// Where the VMs' sockets, status files and logs go.
    pub fn vm_dir(&self) -> PathBuf {
        self.path.join("vms")
    }

    fn list(&self) -> PathBuf {
        self.path.join("host.json")
    }

    /// The VMs the last host left running (as it listed them; whether they still run is
    /// for [`super::child::VmProcess::adopt`] to find out).
    pub fn load(&self) -> Vec<SavedVm> {
        let text = match std::fs::read_to_string(self.list()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                log::warn!("{}: {e}: no VM adopted", self.list().display());
                return Vec::new();
            }
        };
        match serde_json::from_str::<SavedHost>(&text) {
            Ok(h) if h.version == STATE_VERSION => h.vms,
            Ok(h) => {
                log::warn!(
                    "{}: version {}, not {STATE_VERSION}: no VM adopted",
                    self.list().display(),
                    h.version
                );
                Vec::new()
            }
            Err(e) => {
                log::warn!("{}: {e}: no VM adopted", self.list().display());
                Vec::new()
            }
        }
    }

    /// Lists `vms` as the VMs running now.
    ///
    /// # Errors
    /// The list cannot be written.
    pub fn save(&self, vms: &[SavedVm]) -> std::io::Result<()> {
        let host = SavedHost { version: STATE_VERSION, vms: vms.to_vec() };
        let tmp = self.path.join("host.json.new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&host).unwrap_or_default().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.list())
    }
}

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

/// The start time of process `pid` (`/proc/PID/stat` field 22), if it runs.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after its last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    // Field 3 is the first after the name; field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `pidfd_open(2)`: a descriptor that names process `pid` for as long as it is held.
///
/// # Errors
/// The process does not exist, or the kernel has no pidfds.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(2)`: `sig` to the process `pidfd` names (never to another).
///
/// # Errors
/// The process has ended, or the signal is refused.
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: the call reads the descriptor and the signal; the info pointer is null.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_a_pidfd() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert!(pidfd_open(me).is_ok());
        assert!(start_time(u32::MAX).is_none());
    }

    #[test]
    fn the_list_is_written_whole_and_read_back() {
        let dir = super::super::rundir::PrivateDir::new("ebb-state-unit-").unwrap();
        let state = StateDir::open(&dir.path().join("s")).unwrap();
        assert!(state.load().is_empty(), "no list yet");
        let vm = SavedVm {
            name: "a".into(),
            pid: 42,
            start_time: 7,
            uid: Some(100_000),
            entry: VmEntry { name: "a".into(), memory: "64M".into(), ..VmEntry::default() },
        };
        state.save(std::slice::from_ref(&vm)).unwrap();
        assert_eq!(state.load(), vec![vm]);
        std::fs::write(dir.path().join("s/host.json"), "{half").unwrap();
        assert!(state.load().is_empty(), "a broken list adopts nothing");
    }
}
