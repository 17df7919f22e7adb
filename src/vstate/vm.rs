//! The KVM VM: in-kernel irqchip and PIT, guest RAM slots, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::memory::{GuestRam, RamRegion};
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

/// `KVM_MEM_LOG_DIRTY_PAGES`: KVM records the pages the guest writes in the slot.
const MEM_LOG_DIRTY_PAGES: u32 = 1;

/// Registers guest RAM region `r` as memory slot `slot` with `flags`.
fn set_slot(vm: &VmFd, slot: usize, r: &RamRegion, flags: u32) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot: u32::try_from(slot).unwrap_or(u32::MAX),
        guest_phys_addr: r.gpa,
        memory_size: r.len,
        userspace_addr: r.hva,
        flags,
    };
    // SAFETY: the region maps guest RAM, which outlives the VM: the VMM keeps both and
    // drops the VM fd first. Re-registering a slot with other flags maps the same memory.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| VmError::MemorySlot {
        gpa: r.gpa,
        len: r.len,
        source,
    })
}

/// Turns on KVM's dirty log for every guest RAM slot (the slots `create` made).
pub fn log_dirty_pages(vm: &VmFd, regions: &[RamRegion]) -> Result<(), VmError> {
    regions.iter().enumerate().try_for_each(|(slot, r)| set_slot(vm, slot, r, MEM_LOG_DIRTY_PAGES))
}

/// Replaces `out` with the pages written since the last call, as one bitmap over all slots
/// (bit `i % 64` of word `i / 64` for the `i`-th page of guest RAM in slot order, the order
/// `mm` numbers pages in).
pub fn dirty_bitmap(vm: &VmFd, regions: &[RamRegion], out: &mut Vec<u64>) -> Result<(), VmError> {
    out.clear();
    let mut bit = 0usize;
    for (slot, r) in regions.iter().enumerate() {
        let slot_id = u32::try_from(slot).unwrap_or(u32::MAX);
        let len = usize::try_from(r.len).unwrap_or(0);
        let words = vm
            .get_dirty_log(slot_id, len)
            .map_err(|source| VmError::Ioctl { what: "KVM_GET_DIRTY_LOG", source })?;
        let pages = len / 4096;
        append_bits(out, bit, &words, pages);
        bit += pages;
    }
    Ok(())
}

/// Appends the first `n` bits of `words` to the bitmap `out`, which holds `at` bits.
fn append_bits(out: &mut Vec<u64>, at: usize, words: &[u64], n: usize) {
    out.resize((at + n).div_ceil(64), 0);
    let shift = at % 64;
    for (k, &w) in words.iter().enumerate().take(n.div_ceil(64)) {
        let valid = n - k * 64;
        let w = if valid < 64 { w & ((1u64 << valid) - 1) } else { w };
        let i = at / 64 + k;
        if let Some(o) = out.get_mut(i) {
            *o |= w << shift;
        }
        if shift != 0 {
            if let Some(o) = out.get_mut(i + 1) {
                *o |= w >> (64 - shift);
            }
        }
    }
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
        set_slot(&vm, slot, r, 0)?;
    }
    Ok(vm)
}

/// An eventfd that raises `gsi` when written.
pub fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmError> {
    let ioctl = |what| move |source| VmError::Ioctl { what, source };
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| VmError::Ioctl {
        what: "eventfd",
        source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
    })?;
    vm.register_irqfd(&evt, gsi).map_err(ioctl("KVM_IRQFD"))?;
    Ok(evt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_bitmaps_join_at_any_bit_offset() {
        let mut out = Vec::new();
        append_bits(&mut out, 0, &[u64::MAX, 0b1011], 68);
        assert_eq!(out, vec![u64::MAX, 0b1011]);
        append_bits(&mut out, 68, &[0b11 | 1 << 63], 3); // bit 63 is past the slot's end
        assert_eq!(out, vec![u64::MAX, 0b11_1011]);
        let mut out = Vec::new();
        append_bits(&mut out, 60, &[u64::MAX], 10);
        assert_eq!(out, vec![0xf << 60, 0b11_1111]);
    }
}
