//! The raw system calls of the control API: the process umask around `bind`, and a look at
//! what a client has sent that the server has not read yet.

use std::os::fd::AsRawFd;

/// Bytes waiting in `stream`'s receive queue, not read yet (`FIONREAD`); 0 if unknown.
pub fn unread_bytes(stream: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Sets the process umask while it lives and puts the old one back when dropped.
///
/// The umask is process-wide: hold the guard only while no other thread creates files (ebb
/// binds its socket while the VM is being built, before the vCPU runs).
#[derive(Debug)]
pub struct UmaskGuard(libc::mode_t);

impl UmaskGuard {
    /// Sets the umask to `mask`.
    pub fn set(mask: libc::mode_t) -> Self {
        // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
        Self(unsafe { libc::umask(mask) })
    }
}

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        // SAFETY: as above, restoring the mask that was there.
        unsafe { libc::umask(self.0) };
    }
}
