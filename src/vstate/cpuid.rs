//! The guest's CPUID: what KVM supports, with per-vCPU topology and vendor fix-ups.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::accel::Accelerator;

/// Errors building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    /// No room for the topology leaf's levels in the CPUID list.
    #[error("the CPUID list has no room for the topology levels: {0:?}")]
    Full(vmm_sys_util::fam::Error),
}

/// The extended topology leaf, and the levels a guest reads from it: SMT, core, and the
/// invalid level that ends the list.
const LEAF_TOPOLOGY: u32 = 0xb;
const TOPOLOGY_LEVELS: u32 = 3;
/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the entry depends on ECX (the subleaf).
const FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// CPU vendor from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" (or "HygonGenuine").
    Amd,
    /// Anything else.
    Other,
}

// Leaf 1 bits (Intel SDM vol. 2A, CPUID; AMD APM vol. 3, E.3.2).
/// CMPXCHG16B (leaf 1 ECX bit 13; Linux `X86_FEATURE_CX16`, `clearcpuid=cx16`).
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_POPCNT: u32 = 1 << 23;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 7 subleaf 0.
const LEAF7_EBX_SMEP: u32 = 1 << 7;
const LEAF7_EBX_SMAP: u32 = 1 << 20;
const LEAF7_ECX_UMIP: u32 = 1 << 2;
const LEAF7_ECX_PKU: u32 = 1 << 3;
// KVM's paravirtual features (leaf 0x4000_0001 EAX, `KVM_FEATURE_*`) that make hypercalls:
// `vmcall` never completes on PVM hosts, so a guest must not see them there.
/// `KVM_FEATURE_PV_UNHALT`: paravirtual spinlocks kick a halted vCPU by hypercall.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
/// `KVM_FEATURE_PV_TLB_FLUSH`.
const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
/// `KVM_FEATURE_PV_SEND_IPI`: IPIs by hypercall.
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
/// `KVM_FEATURE_PV_SCHED_YIELD`: yield to a preempted vCPU by hypercall.
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_HYPERCALL_FEATURES: u32 = KVM_FEATURE_PV_UNHALT
    | KVM_FEATURE_PV_TLB_FLUSH
    | KVM_FEATURE_PV_SEND_IPI
    | KVM_FEATURE_PV_SCHED_YIELD;
/// KVM's feature leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// CLFLUSH line size in 8-byte units (64 bytes), leaf 1 EBX[15:8].
const CLFLUSH_LINE_UNITS: u32 = 8;

/// The vendor named by a leaf-0 entry.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = entries.iter().find(|e| e.function == 0) else { return Vendor::Other };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&e.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&e.edx.to_le_bytes());
    name[8..].copy_from_slice(&e.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Physical address bits the guest can use (leaf 0x8000_0008 EAX bits 7:0; 36 if absent).
pub fn phys_bits(entries: &[kvm_cpuid_entry2]) -> u8 {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .and_then(|e| u8::try_from(e.eax & 0xff).ok())
        .filter(|&b| b > 0)
        .unwrap_or(36)
}

/// Fetches what KVM supports, with every level of the topology leaf (see
/// [`complete_topology`]).
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(CpuidError::Supported)?;
    complete_topology(&mut cpuid)?;
    Ok(cpuid)
}

/// Adds the levels of leaf 0xB that KVM left out, for [`normalize`] to fill in. KVM on AMD
/// hosts offers subleaf 0 alone: a guest then reads zeros for the core level, takes one core
/// per package, and counts every vCPU as a socket of its own (Linux: "Max logical packages:
/// 4" for four vCPUs, each with its own physical id).
pub fn complete_topology(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    if !cpuid.as_slice().iter().any(|e| e.function == LEAF_TOPOLOGY) {
        return Ok(());
    }
    for index in 0..TOPOLOGY_LEVELS {
        let present =
            cpuid.as_slice().iter().any(|e| e.function == LEAF_TOPOLOGY && e.index == index);
        if !present {
            let flags = FLAG_SIGNIFICANT_INDEX;
            let level =
                kvm_cpuid_entry2 { function: LEAF_TOPOLOGY, index, flags, ..Default::default() };
            cpuid.push(level).map_err(CpuidError::Full)?;
        }
    }
    Ok(())
}

/// Fixes up `entries` for vCPU `cpu_id` of `num_cpus`, one thread per core, one socket.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, num_cpus: u8, accel: Accelerator) {
    let vendor = vendor(entries);
    let apic_id = u32::from(cpu_id);
    let n = u32::from(num_cpus);
    // Bits needed to number `n` cores in an APIC ID.
    let core_bits = 32 - (n.max(1) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (apic_id << 24) | (n << 16) | (CLFLUSH_LINE_UNITS << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // XSAVE features are only usable once the guest sets CR4.OSXSAVE itself.
                e.ecx &= !LEAF1_ECX_OSXSAVE;
                if n > 1 {
                    e.edx |= 1 << 28; // HTT: the logical-count field is valid.
                }
            }
            4 if vendor == Vendor::Intel => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1.
                e.eax = (e.eax & 0x3fff) | ((n - 1) << 26);
            }
            6 => e.ecx &= !(1 << 3), // no energy-performance bias MSR
            0xb | 0x1f => topology_leaf(e, apic_id, n, core_bits),
            0x8000_0008 if vendor == Vendor::Amd => {
                // ECX[7:0]: threads - 1; ECX[15:12]: APIC ID size.
                e.ecx = (e.ecx & !0xf0ff) | (n - 1) | (core_bits << 12);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // one thread per compute unit
                e.ecx = 0; // node 0, one node per processor
            }
            _ => {}
        }
    }
    if accel.is_software() {
        hide_unemulated(entries);
    }
}

/// Extended topology (leaf 0xB/0x1F, same layout on Intel and AMD): level 0 SMT (1 thread), level 1 core.
fn topology_leaf(e: &mut kvm_cpuid_entry2, apic_id: u32, n: u32, core_bits: u32) {
    let level = e.index;
    let (eax, ebx, ecx) = match level {
        0 => (0, 1, 1 << 8),
        1 => (core_bits, n, (2 << 8) | 1),
        _ => (0, 0, level),
    };
    e.eax = eax;
    e.ebx = ebx;
    e.ecx = ecx;
    e.edx = apic_id;
}

/// On PVM, CPL0 runs through KVM's emulator, which lacks POPCNT, XSAVE/XRSTOR, the SMAP
/// instructions (docs/design.md, "The host") and `lock cmpxchg16b` (a distribution kernel's SLUB
/// allocator dies on it right after printing `Memory:`); hide them. The guest at CPL0 may
/// still see the host's bits, which is why ebb also puts `clearcpuid=` on a Linux command line.
/// KVM's paravirtual features that make hypercalls go too: `vmcall` never completes there
/// (an SMP Linux guest would otherwise send IPIs and flush TLBs by hypercall).
fn hide_unemulated(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (KVM_CPUID_FEATURES, _) => e.eax &= !KVM_HYPERCALL_FEATURES,
            (1, _) => {
                e.ecx &= !(LEAF1_ECX_POPCNT | LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | LEAF1_ECX_CX16);
            }
            (7, 0) => {
                e.ebx &= !(LEAF7_EBX_SMEP | LEAF7_EBX_SMAP);
                e.ecx &= !(LEAF7_ECX_UMIP | LEAF7_ECX_PKU);
            }
            (0xd, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    fn leaf0(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 {
            function: 0,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        }
    }

    #[test]
    fn software_hosts_hide_the_hypercall_features_and_keep_the_others() {
        // What a PVM host's KVM offers: clocksource, async PF, steal time, PV EOI and the four
        // that make hypercalls among them.
        let offered = 0x0100_7efb;
        let leaf =
            || kvm_cpuid_entry2 { function: KVM_CPUID_FEATURES, eax: offered, ..entry(0, 0) };
        let mut entries = [leaf()];
        normalize(&mut entries, 0, 4, Accelerator::Pvm);
        assert_eq!(entries[0].eax & KVM_HYPERCALL_FEATURES, 0);
        assert_eq!(entries[0].eax, offered & !(1 << 7 | 1 << 9 | 1 << 11 | 1 << 13));
        let mut entries = [leaf()];
        normalize(&mut entries, 0, 4, Accelerator::VtX { ept: true });
        assert_eq!(entries[0].eax, offered, "hardware hosts keep them");
    }

    #[test]
    fn a_topology_leaf_with_its_first_level_alone_gets_the_core_level() {
        // What KVM offers on an AMD host: leaf 0xB subleaf 0 only.
        let only_smt = kvm_cpuid_entry2 { function: 0xb, flags: 1, ..entry(0, 0) };
        let mut cpuid = CpuId::from_entries(&[leaf0(b"AuthenticAMD"), only_smt]).unwrap();
        complete_topology(&mut cpuid).unwrap();
        normalize(cpuid.as_mut_slice(), 3, 4, Accelerator::VtX { ept: true });
        let level =
            |i| *cpuid.as_slice().iter().find(|e| e.function == 0xb && e.index == i).unwrap();
        // SMT: one thread; core: 4 cores, shift 2, type 2; then the invalid level.
        assert_eq!((level(0).ebx, level(0).ecx >> 8 & 0xff), (1, 1));
        assert_eq!((level(1).eax, level(1).ebx, level(1).ecx >> 8 & 0xff), (2, 4, 2));
        assert_eq!(level(2).ecx >> 8 & 0xff, 0);
        assert!((0..3).all(|i| level(i).edx == 3), "x2APIC ID on every level");
        // A list without the leaf stays as it is.
        let mut none = CpuId::from_entries(&[leaf0(b"AuthenticAMD")]).unwrap();
        complete_topology(&mut none).unwrap();
        assert_eq!(none.as_slice().len(), 1);
    }

    #[test]
    fn vendor_is_read_from_leaf_0() {
        assert_eq!(vendor(&[leaf0(b"GenuineIntel")]), Vendor::Intel);
        assert_eq!(vendor(&[leaf0(b"AuthenticAMD")]), Vendor::Amd);
        assert_eq!(vendor(&[leaf0(b"SomethingOdd")]), Vendor::Other);
    }

    #[test]
    fn leaf1_gets_apic_id_count_and_hypervisor_bit() {
        let mut e = [leaf0(b"GenuineIntel"), entry(1, 0)];
        e[1].ecx = LEAF1_ECX_OSXSAVE;
        normalize(&mut e, 0, 1, Accelerator::VtX { ept: true });
        assert_eq!(e[1].ebx >> 24, 0);
        assert_eq!((e[1].ebx >> 16) & 0xff, 1);
        assert_ne!(e[1].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(e[1].ecx & LEAF1_ECX_OSXSAVE, 0);
    }

    #[test]
    fn pvm_hides_what_the_emulator_cannot_run() {
        let mut e = [leaf0(b"AuthenticAMD"), entry(1, 0), entry(7, 0)];
        e[1].ecx = LEAF1_ECX_POPCNT | LEAF1_ECX_XSAVE | LEAF1_ECX_CX16;
        e[2].ebx = LEAF7_EBX_SMAP | LEAF7_EBX_SMEP | 1;
        normalize(&mut e, 0, 1, Accelerator::Pvm);
        assert_eq!(e[1].ecx & (LEAF1_ECX_POPCNT | LEAF1_ECX_XSAVE | LEAF1_ECX_CX16), 0);
        assert_eq!(e[2].ebx, 1);
    }

    #[test]
    fn pvm_hides_cx16_but_keeps_its_neighbours() {
        // FMA and xTPR, the bits either side of CX16 (Intel SDM vol. 2A, CPUID, table 3-10).
        const FMA: u32 = 1 << 12;
        const XTPR: u32 = 1 << 14;
        let mut e = [leaf0(b"GenuineIntel"), entry(1, 0)];
        e[1].ecx = FMA | LEAF1_ECX_CX16 | XTPR;
        normalize(&mut e, 0, 1, Accelerator::Pvm);
        assert_eq!(e[1].ecx & LEAF1_ECX_CX16, 0);
        assert_eq!(e[1].ecx & (FMA | XTPR), FMA | XTPR);
    }

    #[test]
    fn hardware_hosts_keep_xsave() {
        let mut e = [leaf0(b"GenuineIntel"), entry(1, 0)];
        e[1].ecx = LEAF1_ECX_XSAVE;
        normalize(&mut e, 0, 1, Accelerator::VtX { ept: true });
        assert_ne!(e[1].ecx & LEAF1_ECX_XSAVE, 0);
    }

    #[test]
    fn hardware_hosts_keep_cx16() {
        for accel in [Accelerator::VtX { ept: true }, Accelerator::AmdV { npt: true }] {
            let mut e = [leaf0(b"AuthenticAMD"), entry(1, 0)];
            e[1].ecx = LEAF1_ECX_CX16;
            normalize(&mut e, 0, 1, accel);
            assert_ne!(e[1].ecx & LEAF1_ECX_CX16, 0, "{accel:?}");
        }
    }

    #[test]
    fn intel_topology_numbers_the_cores() {
        let mut e = [leaf0(b"GenuineIntel"), entry(0xb, 0), entry(0xb, 1)];
        normalize(&mut e, 2, 4, Accelerator::VtX { ept: true });
        assert_eq!((e[1].ebx, e[1].edx), (1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, 2));
    }

    #[test]
    fn amd_core_count_goes_in_leaf_80000008() {
        let mut e = [leaf0(b"AuthenticAMD"), entry(0x8000_0008, 0)];
        e[1].eax = 48;
        normalize(&mut e, 0, 2, Accelerator::AmdV { npt: true });
        assert_eq!(e[1].ecx & 0xff, 1);
        assert_eq!(phys_bits(&e), 48);
    }
}
