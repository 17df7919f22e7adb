//! The Intel MultiProcessor table (MP spec 1.4): tells a guest without ACPI where its local
//! APICs and the IOAPIC are and how the ISA interrupts reach the IOAPIC, so Linux runs
//! "symmetric I/O mode" instead of the PIC in virtual-wire mode.
//!
//! Placed in the last KiB of base memory (0x9fc00, reserved in the e820 map), where Linux's
//! `smp_scan_config` looks first.

use super::layout::EBDA_GPA;
use super::{write_bytes, BootError};

/// Where the local APIC of every CPU is mapped.
pub const LAPIC_GPA: u32 = 0xfee0_0000;
/// Where KVM's in-kernel IOAPIC is mapped.
pub const IOAPIC_GPA: u32 = 0xfec0_0000;
/// IOAPIC input pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
/// Room the table may take (the EBDA's KiB).
const MAX_BYTES: usize = 1024;

// Entry types and flags (MP spec 1.4, chapter 4).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_BUS_ID: u8 = 0;

fn checksum_fix(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// The floating pointer and configuration table for `num_cpus` CPUs, to live at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, BootError> {
    let ioapic_id = num_cpus; // after the CPUs' APIC IDs
    let mut entries: Vec<u8> = Vec::new();
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend([ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend(0x0000_0600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend(0x0000_0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend([0u8; 8]);
    }
    entries.extend([ENTRY_BUS, ISA_BUS_ID]);
    entries.extend(*b"ISA   ");
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend(IOAPIC_GPA.to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // Flags 0: polarity and trigger conform to the bus (ISA: edge, active high).
        entries.extend([ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
    }
    // LINT0 carries the PIC's ExtINT, LINT1 the NMI, on every local APIC (0xff).
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    let count = 2 + usize::from(num_cpus) + usize::from(IOAPIC_PINS) + 2;

    let table_len = 44 + entries.len();
    let too_big = || BootError::DoesNotFit { what: "MP table", mem_bytes: MAX_BYTES as u64 };
    let table_gpa = u32::try_from(base + 16).map_err(|_| too_big())?;
    let mut table = Vec::with_capacity(table_len);
    table.extend(*b"PCMP");
    table.extend(u16::try_from(table_len).map_err(|_| too_big())?.to_le_bytes());
    table.extend([4u8, 0]); // spec revision 1.4, checksum (below)
    table.extend(*b"EBB     "); // OEM ID
    table.extend(*b"ebb VMM     "); // product ID
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(u16::try_from(count).map_err(|_| too_big())?.to_le_bytes());
    table.extend(LAPIC_GPA.to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table length
    table.extend([0u8, 0]); // extended checksum, reserved
    table.extend(entries);
    table[7] = checksum_fix(&table);

    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend(*b"_MP_");
    fp.extend(table_gpa.to_le_bytes());
    fp.extend([1u8, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision, checksum, features
    fp[10] = checksum_fix(&fp);
    fp.extend(table);
    if fp.len() > MAX_BYTES {
        return Err(too_big());
    }
    Ok(fp)
}

/// Writes the MP table for `num_cpus` CPUs into the EBDA.
pub fn write(mem: &vm_memory::GuestMemoryMmap, num_cpus: u8) -> Result<(), BootError> {
    write_bytes(mem, &build(num_cpus, EBDA_GPA)?, EBDA_GPA, "MP table")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_are_zero_and_the_pointer_finds_the_table() {
        let t = build(1, EBDA_GPA).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        let ptr = u64::from(u32::from_le_bytes(t[4..8].try_into().unwrap()));
        let table = &t[usize::try_from(ptr - EBDA_GPA).unwrap()..];
        assert_eq!(&table[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "configuration table checksum");
    }

    #[test]
    fn entry_count_matches_the_entries() {
        let t = build(2, EBDA_GPA).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 2 + 24 + 2);
        // Processors are 20 bytes, everything else 8.
        assert_eq!(table.len(), 44 + 2 * 20 + 8 * (2 + 24 + 2));
    }

    #[test]
    fn the_table_fits_the_ebda_for_the_most_vcpus() {
        let t = build(crate::config::MAX_VCPUS, EBDA_GPA).unwrap();
        assert!(t.len() <= MAX_BYTES, "{} bytes", t.len());
    }
}
