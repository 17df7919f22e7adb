//! The KVM VM: in-kernel irqchip and PIT, guest RAM slots, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestRam;
use crate::boot::layout::KVM_TSS_GPA;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    Create(kvm_ioctls::Error),
    /// A VM-level ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Registering guest RAM failed.
    #[error("KVM_SET_USER_MEMORY_REGION for {len} bytes at {gpa:#x} failed: {source}")]
    MemorySlot {
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

/// Creates a VM with the in-kernel PIC/IOAPIC/LAPIC and PIT and registers guest RAM.
pub fn create(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(VmError::Create)?;
    let ioctl = |what| move |source| VmError::Ioctl { what, source };
    let tss = usize::try_from(KVM_TSS_GPA).unwrap_or(usize::MAX);
    vm.set_tss_address(tss).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    // The dummy speaker port (0x61) keeps Linux's PIT calibration from exiting to us.
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
    for (slot, r) in ram.regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            guest_phys_addr: r.gpa,
            memory_size: r.len,
            userspace_addr: r.hva,
            flags: 0,
        };
        // SAFETY: the region maps memory owned by `ram`, which outlives the VM: the caller
        // keeps both in the same struct and drops the VM fd first.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| VmError::MemorySlot {
            gpa: r.gpa,
            len: r.len,
            source,
        })?;
    }
    Ok(vm)
}

/// An eventfd that raises `gsi` when written.
pub fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmError> {
    let ioctl = |what| move |source| VmError::Ioctl { what, source };
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Ioctl {
        what: "eventfd",
        source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
    })?;
    vm.register_irqfd(&evt, gsi).map_err(ioctl("KVM_IRQFD"))?;
    Ok(evt)
}
