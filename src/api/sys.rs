//! The one raw system call of the control API: the process umask around `bind`.

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
