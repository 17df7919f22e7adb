//! Which accelerator backs `/dev/kvm` on this host: VT-x, AMD-V or PVM (software).
//!
//! Read from the host's `/proc/cpuinfo` flags and loaded KVM modules, so that ebb can log it
//! at start, apply the work-arounds PVM needs, and tests can say what they checked.

use std::fmt;
use std::fs;
use std::path::Path;

/// The virtualization technique behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Intel VT-x (`kvm_intel`); `ept` says whether extended page tables are on.
    VtX {
        /// Extended page tables in use (`/sys/module/kvm_intel/parameters/ept`).
        ept: bool,
    },
    /// AMD-V (`kvm_amd`); `npt` says whether nested page tables (RVI) are on.
    AmdV {
        /// Nested page tables in use (`/sys/module/kvm_amd/parameters/npt`).
        npt: bool,
    },
    /// PVM (`kvm_pvm`): software virtualization with shadow paging; guest CPL0 code is
    /// emulated (docs/design.md, "The host").
    Pvm,
    /// No KVM module ebb knows was found (the host may still offer `/dev/kvm`).
    Unknown,
}

impl Accelerator {
    /// Detects the accelerator from `/sys/module` and `/proc/cpuinfo`.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/"))
    }

    /// Detects the accelerator with `root` standing for `/` (tests pass a fake tree).
    pub fn detect_in(root: &Path) -> Self {
        let module = |name: &str| root.join("sys/module").join(name).exists();
        let param_on = |path: &str| {
            fs::read_to_string(root.join(path))
                .map(|s| matches!(s.trim(), "Y" | "y" | "1"))
                .unwrap_or(false)
        };
        // kvm_pvm is checked first: a PVM host may also load kvm_intel/kvm_amd without
        // VMX/SVM being usable (the CPU flags are hidden by the outer hypervisor).
        if module("kvm_pvm") {
            return Self::Pvm;
        }
        let flags = cpu_flags(root);
        if module("kvm_intel") && flags.iter().any(|f| f == "vmx") {
            return Self::VtX { ept: param_on("sys/module/kvm_intel/parameters/ept") };
        }
        if module("kvm_amd") && flags.iter().any(|f| f == "svm") {
            return Self::AmdV { npt: param_on("sys/module/kvm_amd/parameters/npt") };
        }
        Self::Unknown
    }

    /// True when guest CPL0 code runs through KVM's instruction emulator.
    pub fn is_software(self) -> bool {
        self == Self::Pvm
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        match self {
            Self::VtX { ept } => write!(f, "Intel VT-x (EPT {})", on(*ept)),
            Self::AmdV { npt } => write!(f, "AMD-V (NPT/RVI {})", on(*npt)),
            Self::Pvm => write!(f, "PVM (software virtualization, shadow paging)"),
            Self::Unknown => write!(f, "unknown (no kvm_intel, kvm_amd or kvm_pvm module)"),
        }
    }
}

/// The `flags` of the first CPU in `/proc/cpuinfo`.
fn cpu_flags(root: &Path) -> Vec<String> {
    let text = fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(modules: &[&str], flags: &str, params: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for m in modules {
            fs::create_dir_all(dir.path().join("sys/module").join(m).join("parameters")).unwrap();
        }
        fs::create_dir_all(dir.path().join("proc")).unwrap();
        fs::write(dir.path().join("proc/cpuinfo"), format!("processor\t: 0\nflags\t\t: {flags}\n"))
            .unwrap();
        for (path, value) in params {
            fs::write(dir.path().join(path), value).unwrap();
        }
        dir
    }

    #[test]
    fn pvm_module_wins_over_cpu_flags() {
        let root = fake_root(&["kvm", "kvm_pvm"], "fpu vme", &[]);
        assert_eq!(Accelerator::detect_in(root.path()), Accelerator::Pvm);
    }

    #[test]
    fn intel_with_ept_is_detected() {
        let root = fake_root(
            &["kvm_intel"],
            "fpu vmx ept",
            &[("sys/module/kvm_intel/parameters/ept", "Y\n")],
        );
        assert_eq!(Accelerator::detect_in(root.path()), Accelerator::VtX { ept: true });
    }

    #[test]
    fn amd_without_npt_is_detected() {
        let root =
            fake_root(&["kvm_amd"], "fpu svm", &[("sys/module/kvm_amd/parameters/npt", "0")]);
        assert_eq!(Accelerator::detect_in(root.path()), Accelerator::AmdV { npt: false });
    }

    #[test]
    fn module_without_cpu_flag_is_unknown() {
        let root = fake_root(&["kvm_intel"], "fpu sse", &[]);
        assert_eq!(Accelerator::detect_in(root.path()), Accelerator::Unknown);
    }

    /// A minimal temporary directory, removed on drop (no extra dependency for one test).
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: AtomicU32 = AtomicU32::new(0);
                let n = N.fetch_add(1, Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("ebb-accel-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
