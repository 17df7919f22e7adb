//! Boot-time MSR values, limited to the MSRs KVM lists as saveable.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

/// Errors setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    IndexList(kvm_ioctls::Error),
    /// Building the MSR list failed (more entries than KVM's MSR array holds).
    #[error("cannot build the MSR list: {0:?}")]
    Build(vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed or stopped early.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs; MSR {failed:#x} was refused")]
    Set {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
        /// The first one refused.
        failed: u32,
    },
}

// MSR numbers (Intel SDM vol. 4).
const IA32_TSC: u32 = 0x10;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Fast-string operations enabled, as firmware leaves them.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled (bit 11) with write-back (6) as the default memory type.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs a freshly reset CPU would have after firmware, as (index, value).
pub const BOOT_MSRS: &[(u32, u64)] = &[
    (IA32_SYSENTER_CS, 0),
    (IA32_SYSENTER_ESP, 0),
    (IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (IA32_TSC, 0),
    (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
];

/// The boot MSRs that appear in `supported`, in `BOOT_MSRS` order.
pub fn boot_entries(supported: &[u32]) -> Vec<kvm_msr_entry> {
    BOOT_MSRS
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
        .collect()
}

/// Sets the boot MSRs KVM supports on `vcpu`.
pub fn set_boot_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), MsrError> {
    let list = kvm.get_msr_index_list().map_err(MsrError::IndexList)?;
    let entries = boot_entries(list.as_slice());
    let skipped: Vec<String> = BOOT_MSRS
        .iter()
        .filter(|(i, _)| !list.as_slice().contains(i))
        .map(|(i, _)| format!("{i:#x}"))
        .collect();
    if !skipped.is_empty() {
        log::debug!("KVM does not list MSRs {}; leaving them alone", skipped.join(", "));
    }
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(|_| MsrError::Set {
        set: 0,
        wanted: entries.len(),
        failed: entries.first().map_or(0, |e| e.index),
    })?;
    if set != entries.len() {
        return Err(MsrError::Set { set, wanted: entries.len(), failed: entries[set].index });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_msrs_are_set() {
        let e = boot_entries(&[MSR_LSTAR, IA32_MISC_ENABLE, 0x1234]);
        let idx: Vec<u32> = e.iter().map(|m| m.index).collect();
        assert_eq!(idx, vec![MSR_LSTAR, IA32_MISC_ENABLE]);
        assert_eq!(e[1].data, MISC_ENABLE_FAST_STRING);
    }
}
