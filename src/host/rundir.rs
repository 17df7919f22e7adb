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

/// Checks that `dir` is a directory (not a symlink to one) of this process's user that no one
/// else can write, so that nobody can swap a VM's socket there for one of theirs.
///
/// # Errors
/// What is wrong, in words.
pub fn check_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if meta.file_type().is_symlink() {
        return Err("it is a symbolic link".into());
    }
    if !meta.is_dir() {
        return Err("it is not a directory".into());
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!("it belongs to uid {}, not to {me}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("its group or others may write it (mode {:o})", meta.mode() & 0o777));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_given_run_dir_must_be_a_private_directory_of_ours() {
        use std::os::unix::fs::PermissionsExt;
        let d = PrivateDir::new("ebb-unit-check-").unwrap();
        assert_eq!(check_private(d.path()), Ok(()));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_private(d.path()).unwrap_err().contains("may write"));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = d.path().with_extension("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(check_private(&link).unwrap_err().contains("symbolic link"));
        std::fs::remove_file(&link).unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(check_private(&file).unwrap_err().contains("not a directory"));
        assert!(check_private(&d.path().join("missing")).is_err());
    }

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
