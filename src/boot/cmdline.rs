//! The Linux kernel command line ebb builds: its own base, one entry per device, the
//! work-arounds a software-KVM host needs, then the user's part.

use crate::accel::Accelerator;

/// What ebb adds to every Linux command line: console on COM1, reboot through the i8042
/// (which ebb turns into exit status 0), no PCI probing, and reboot at once on a panic:
/// `panic=1` waits in `mdelay`, which never returns on PVM hosts, so the VM would hang.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Added on PVM hosts (see docs/design.md, "The host"):
/// - the instruction emulator that runs guest CPL0 code lacks XSAVE, POPCNT, SMAP's
///   stac/clac, `cmpxchg16b` and friends, and the guest at CPL0 sees the host's CPUID bits
///   for them anyway, so Linux must be told not to use them. `cx16` is the name Linux gives
///   CMPXCHG16B (`X86_FEATURE_CX16`);
/// - `ebb_syscall_pf`: a `syscall` at guest CPL3 stays at CPL3 and faults at the kernel's
///   entry; ebb's guest kernel (`guest/patches/0003-*`) then makes the system call. Another
///   kernel ignores the word (it reaches init as an argument).
pub const PVM_CMDLINE: &str = "noxsave clearcpuid=smap,smep,popcnt,umip,pku,cx16 ebb_syscall_pf";

/// The full Linux command line: ebb's base, device entries, host work-arounds, then the user's.
pub fn linux_cmdline(accel: Accelerator, devices: &[String], user: &str) -> String {
    let mut parts = vec![BASE_CMDLINE.to_owned()];
    parts.extend(devices.iter().cloned());
    if accel.is_software() {
        parts.push(PVM_CMDLINE.to_owned());
    }
    if !user.trim().is_empty() {
        parts.push(user.trim().to_owned());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_gets_the_work_arounds_before_the_user_part() {
        let c = linux_cmdline(
            Accelerator::Pvm,
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            "rootwait",
        );
        assert!(c.starts_with(BASE_CMDLINE));
        let dev = c.find("virtio_mmio").unwrap();
        let pvm = c.find(PVM_CMDLINE).unwrap();
        assert!(dev < pvm && pvm < c.find("rootwait").unwrap());
        assert!(c.contains("cx16"), "cmpxchg16b is hidden too: {c}");
        assert!(c.contains(" ebb_syscall_pf "), "system calls through the fault: {c}");
    }

    #[test]
    fn hardware_hosts_get_no_work_arounds() {
        let c = linux_cmdline(Accelerator::VtX { ept: true }, &[], "");
        assert_eq!(c, BASE_CMDLINE);
    }
}
