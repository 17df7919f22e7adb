//! The boot GDT, the TSS, and the segment/control registers of each [`CpuMode`].
//!
//! One GDT serves every mode, so a crash dump always names the same selectors:
//!
//! | index | selector | descriptor |
//! |---|---|---|
//! | 1 | 0x08 | 64-bit code, DPL0 |
//! | 2 | 0x10 | data, DPL0 |
//! | 3 | 0x18 | 32-bit code, DPL0 (PVH entry) |
//! | 4 | 0x23 | data, DPL3 |
//! | 5 | 0x2b | 64-bit code, DPL3 |
//! | 6-7 | 0x30 | 64-bit TSS (16-byte descriptor) |

use kvm_bindings::{kvm_segment, kvm_sregs};

use super::layout::{GDT_GPA, PML4_GPA, TSS_GPA};
use super::{write_bytes, BootError, CpuMode};

/// Size of a 64-bit TSS without its I/O bitmap (Intel SDM vol. 3, 8.7).
pub const TSS_BYTES: u64 = 104;
/// Offset of the I/O map base field in the TSS.
const TSS_IOMAP_BASE_OFFSET: usize = 102;
/// I/O permission bitmap for all 65536 ports, one bit each.
pub const IO_BITMAP_BYTES: u64 = 65536 / 8;
/// TSS limit: TSS, bitmap and the terminating 0xff byte the CPU reads past the last port.
pub const TSS_LIMIT: u64 = TSS_BYTES + IO_BITMAP_BYTES;

/// Selector of the 64-bit kernel code segment.
pub const SEL_CODE64: u16 = 0x08;
/// Selector of the kernel data segment.
pub const SEL_DATA: u16 = 0x10;
/// Selector of the 32-bit kernel code segment.
pub const SEL_CODE32: u16 = 0x18;
/// Selector of the user data segment (RPL 3).
pub const SEL_USER_DATA: u16 = 0x23;
/// Selector of the 64-bit user code segment (RPL 3).
pub const SEL_USER_CODE64: u16 = 0x2b;
/// Selector of the TSS.
pub const SEL_TSS: u16 = 0x30;

// Control register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Access flags of a descriptor (type, S, DPL, P in bits 0-7; AVL, L, D/B, G in 12-15).
#[derive(Clone, Copy)]
struct Flags(u16);
const CODE64_DPL0: Flags = Flags(0xa09b);
const DATA_DPL0: Flags = Flags(0xc093);
const CODE32_DPL0: Flags = Flags(0xc09b);
const DATA_DPL3: Flags = Flags(0xc0f3);
const CODE64_DPL3: Flags = Flags(0xa0fb);
/// Present, 64-bit TSS, busy (type 0xb): KVM requires a busy TSS in TR.
const TSS64_BUSY: Flags = Flags(0x008b);

/// Encodes an 8-byte segment descriptor.
fn descriptor(flags: Flags, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((u64::from(flags.0) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The GDT entries, in table order.
pub fn gdt_entries() -> [u64; 8] {
    [
        0,
        descriptor(CODE64_DPL0, 0, 0xfffff),
        descriptor(DATA_DPL0, 0, 0xfffff),
        descriptor(CODE32_DPL0, 0, 0xfffff),
        descriptor(DATA_DPL3, 0, 0xfffff),
        descriptor(CODE64_DPL3, 0, 0xfffff),
        descriptor(TSS64_BUSY, TSS_GPA, TSS_LIMIT),
        TSS_GPA >> 32, // upper half of the 16-byte TSS descriptor: base bits 63:32
    ]
}

/// Decodes a descriptor into the form `KVM_SET_SREGS` takes.
fn segment(flags: Flags, base: u64, limit: u64, selector: u16) -> kvm_segment {
    let f = flags.0;
    let bit = |n: u16| u8::from(f & (1 << n) != 0);
    let granular = bit(15) == 1;
    kvm_segment {
        base,
        // The limit is in 4 KiB units when G is set; KVM wants the byte limit.
        limit: u32::try_from(if granular { (limit << 12) | 0xfff } else { limit })
            .unwrap_or(u32::MAX),
        selector,
        type_: (f & 0xf) as u8,
        s: bit(4),
        dpl: ((f >> 5) & 3) as u8,
        present: bit(7),
        avl: bit(12),
        l: bit(13),
        db: bit(14),
        g: bit(15),
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and a TSS whose I/O bitmap allows every port.
///
/// On PVM, `RFLAGS.IOPL=3` does not let CPL3 `out` through but an all-zero bitmap does
/// (docs/design.md, "The host"), so the bitmap is how firmware payloads reach the UART.
pub fn write_tables(mem: &vm_memory::GuestMemoryMmap) -> Result<(), BootError> {
    let gdt: Vec<u8> = gdt_entries().iter().flat_map(|e| e.to_le_bytes()).collect();
    write_bytes(mem, &gdt, GDT_GPA, "GDT")?;
    let mut tss = vec![0u8; usize::try_from(TSS_LIMIT + 1).unwrap_or(0)];
    let iomap = u16::try_from(TSS_BYTES).unwrap_or(0).to_le_bytes();
    tss[TSS_IOMAP_BASE_OFFSET..TSS_IOMAP_BASE_OFFSET + 2].copy_from_slice(&iomap);
    if let Some(last) = tss.last_mut() {
        *last = 0xff;
    }
    write_bytes(mem, &tss, TSS_GPA, "TSS")
}

/// Sets segment, descriptor-table and control registers for `mode`.
pub fn apply_sregs(sregs: &mut kvm_sregs, mode: CpuMode) {
    let (code, data) = match mode {
        CpuMode::Long64Kernel => {
            (segment(CODE64_DPL0, 0, 0xfffff, SEL_CODE64), segment(DATA_DPL0, 0, 0xfffff, SEL_DATA))
        }
        CpuMode::Long64User => (
            segment(CODE64_DPL3, 0, 0xfffff, SEL_USER_CODE64),
            segment(DATA_DPL3, 0, 0xfffff, SEL_USER_DATA),
        ),
        CpuMode::Protected32 => {
            (segment(CODE32_DPL0, 0, 0xfffff, SEL_CODE32), segment(DATA_DPL0, 0, 0xfffff, SEL_DATA))
        }
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS64_BUSY, TSS_GPA, TSS_LIMIT, SEL_TSS);
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = u16::try_from(gdt_entries().len() * 8 - 1).unwrap_or(u16::MAX);
    // No IDT: an exception before the guest installs its own becomes a triple fault, which
    // ebb reports with a register dump.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    match mode {
        CpuMode::Long64Kernel | CpuMode::Long64User => {
            sregs.cr3 = PML4_GPA;
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        CpuMode::Protected32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_code_descriptor_matches_the_classic_encoding() {
        // The 64-bit flat code descriptor every x86_64 boot loader uses.
        assert_eq!(descriptor(CODE64_DPL0, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(DATA_DPL0, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn user_segments_have_dpl3() {
        let mut sregs = kvm_sregs::default();
        apply_sregs(&mut sregs, CpuMode::Long64User);
        assert_eq!((sregs.cs.dpl, sregs.cs.l, sregs.cs.selector), (3, 1, SEL_USER_CODE64));
        assert_eq!((sregs.ss.dpl, sregs.ss.selector & 3), (3, 3));
        assert_eq!(sregs.tr.limit, u32::try_from(TSS_LIMIT).unwrap());
    }

    #[test]
    fn selectors_index_the_table() {
        let entries = gdt_entries();
        assert_eq!(entries[usize::from(SEL_CODE64 >> 3)], descriptor(CODE64_DPL0, 0, 0xfffff));
        assert_eq!(entries[usize::from(SEL_USER_CODE64 >> 3)], descriptor(CODE64_DPL3, 0, 0xfffff));
        assert_eq!(usize::from(SEL_TSS >> 3) + 2, entries.len());
    }
}
