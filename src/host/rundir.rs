//! Private directories in the temp dir: the host's run directory and the lab's work
//! directory.
//!
//! A predictable name in a shared `/tmp` (`ebb-host-<pid>`) lets another user plant a
//! symlink there first: `create_dir_all` follows it (our sockets and files land in their
//! directory), a plain `mkdir` fails on it (the host cannot start). `mkdtemp(3)` picks an
//! unpredictable name and creates the directory atomically, mode 0700, failing on anything
//! already there; the directory is ours alone and is removed when its guard drops.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// A directory this process created with `mkdtemp`, removed with its contents on drop.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `<temp dir>/<prefix>XXXXXX`, mode 0700.
    ///
    /// # Errors
    /// The temp dir is unusable (the error names the template), or the prefix holds a NUL.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// Creates `<parent>/<prefix>XXXXXX`, mode 0700.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn new_in(parent: &Path, prefix: &str) -> std::io::Result<Self> {
        let template = parent.join(format!("{prefix}XXXXXX"));
        let mut bytes = CString::new(template.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
            .into_bytes_with_nul();
        // SAFETY: `bytes` is a NUL-terminated, writable template ending in XXXXXX, which
        // mkdtemp rewrites in place; it lives across the call.
        let ret = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if ret.is_null() {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("{}: {e}", template.display())));
        }
        bytes.pop(); // the NUL
        Ok(Self { path: PathBuf::from(OsString::from_vec(bytes)) })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_dir_is_fresh_mode_0700_and_gone_after_drop() {
        let a = PrivateDir::new("ebb-unit-").unwrap();
        let b = PrivateDir::new("ebb-unit-").unwrap();
        assert_ne!(a.path(), b.path());
        let meta = std::fs::symlink_metadata(a.path()).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        std::fs::write(a.path().join("f"), b"x").unwrap();
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }
}
