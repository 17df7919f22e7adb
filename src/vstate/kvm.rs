//! Opening `/dev/kvm` and checking that it offers what ebb relies on.

use std::io;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version there has ever been (`KVM_API_VERSION` in `linux/kvm.h`).
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities ebb needs, each with what it is used for (shown when one is missing).
pub const REQUIRED_CAPS: &[(Cap, &str, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY", "guest RAM in user memory"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP", "in-kernel PIC, IOAPIC and LAPIC"),
    (Cap::Hlt, "KVM_CAP_HLT", "idle vCPUs sleep in the kernel"),
    (Cap::Pit2, "KVM_CAP_PIT2", "the i8254 timer Linux calibrates against"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2", "PIT state"),
    (Cap::Irqfd, "KVM_CAP_IRQFD", "device interrupts through eventfds"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD", "virtqueue notifications through eventfds"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID", "KVM_GET_SUPPORTED_CPUID"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR", "the TSS region VT-x needs"),
    (Cap::MpState, "KVM_CAP_MP_STATE", "vCPU run state"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK", "guest clock"),
    (Cap::SyncMmu, "KVM_CAP_SYNC_MMU", "releasing guest pages with madvise while the VM runs"),
];

/// Errors opening or checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error(
        "{0} does not exist: this host has no KVM. Load kvm_intel, kvm_amd or kvm_pvm, or run on a host with virtualization enabled"
    )]
    NoDevice(PathBuf),
    /// The device node exists but may not be opened.
    #[error(
        "permission denied opening {0}: add your user to the 'kvm' group (or the group owning {0}) or run as root"
    )]
    Permission(PathBuf),
    /// Any other open error.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The device node.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// The API version is not 12.
    #[error("KVM API version is {0}, ebb needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// A capability ebb needs is missing.
    #[error("KVM lacks {name} (needed for {why})")]
    MissingCap {
        /// The `KVM_CAP_*` name.
        name: &'static str,
        /// What ebb uses it for.
        why: &'static str,
    },
}

/// Opens the KVM device at `path` and checks its API version and every required capability.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::Open {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        })?;
    let kvm = Kvm::new_with_path(c_path).map_err(|e| {
        let io = io::Error::from_raw_os_error(e.errno());
        match io.kind() {
            io::ErrorKind::NotFound => KvmError::NoDevice(path.to_owned()),
            io::ErrorKind::PermissionDenied => KvmError::Permission(path.to_owned()),
            _ => KvmError::Open { path: path.to_owned(), source: io },
        }
    })?;
    check(&kvm)?;
    Ok(kvm)
}

/// Checks the API version and the required capabilities.
pub fn check(kvm: &Kvm) -> Result<(), KvmError> {
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version));
    }
    for &(cap, name, why) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap { name, why });
        }
    }
    Ok(())
}
