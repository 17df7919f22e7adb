//! Where things go in guest-physical memory (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (null, code64/data DPL0, data/code64 DPL3, TSS)
//! 0x0000_1000  TSS + I/O permission bitmap (all ports allowed: firmware at CPL3 uses `out`)
//! 0x0000_7000  Linux zero page (boot_params) / PVH start_info / firmware boot info
//! 0x0000_7800  firmware progress counter (a u64 the payload bumps, ebb reads)
//! 0x0000_8ff0  Linux boot stack (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. page directories (2 MiB pages)
//! 0x0002_0000  kernel command line / firmware arguments
//! 0x0002_1000  firmware stacks (12 KiB per vCPU, vCPU 0's from 0x9f000 down)
//! 0x0009_fc00  EBDA (reserved in the e820 map)
//! 0x0010_0000  kernel or payload image (HIMEM)
//! 0xc000_0000  MMIO hole: virtio-mmio devices, then LAPIC/IOAPIC (to 4 GiB)
//! 0x1_0000_0000 RAM beyond 3 GiB continues here
//! ```

/// The GDT (Firecracker and the Linux boot protocol use the same low address).
pub const GDT_GPA: u64 = 0x500;
/// The 64-bit TSS, followed by its I/O permission bitmap.
pub const TSS_GPA: u64 = 0x1000;
/// The zero page (Linux `boot_params`), PVH `start_info`, or firmware boot info.
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// The firmware payload's progress counter: a u64 in the second half of the boot-info page,
/// which ebb reserves (free RAM starts at [`HIMEM_GPA`]) and no other firmware structure uses
/// (the PVH memory map at [`PVH_MEMMAP_GPA`] is for Linux boots only).
pub const FIRMWARE_PROGRESS_GPA: u64 = ZERO_PAGE_GPA + 0x800;
/// The PVH memory map follows `start_info` in the same page.
pub const PVH_MEMMAP_GPA: u64 = 0x7100;
/// Initial stack pointer of the Linux 64-bit entry.
pub const BOOT_STACK_GPA: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_GPA: u64 = 0x9000;
/// Page-directory-pointer table (512 entries: 512 GiB).
pub const PDPT_GPA: u64 = 0xa000;
/// First page directory; further ones follow contiguously.
pub const PD_GPA: u64 = 0xb000;
/// End of the page-directory area (exclusive): 21 page directories, 21 GiB of 2 MiB pages.
pub const PD_END_GPA: u64 = 0x2_0000;
/// Kernel command line / firmware argument string.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// Room for the command line (the page up to the firmware stack area).
pub const CMDLINE_MAX_BYTES: usize = 0x1000;
/// Firmware stack top (grows down to `CMDLINE_GPA + CMDLINE_MAX_BYTES`): vCPU 0's stack,
/// the others' below it, [`FIRMWARE_STACK_BYTES`] each.
pub const FIRMWARE_STACK_TOP_GPA: u64 = 0x9_f000;
/// One vCPU's firmware stack: 32 of them fit the area.
pub const FIRMWARE_STACK_BYTES: u64 = 0x3000;
/// Start of the Extended BIOS Data Area (reserved, as on PCs).
pub const EBDA_GPA: u64 = 0x9_fc00;
/// First byte above the legacy VGA/BIOS area where kernels load.
pub const HIMEM_GPA: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_GPA: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_HOLE_END_GPA: u64 = 1 << 32;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE_GPA: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_WINDOW_BYTES: u64 = 0x1000;
/// Where VT-x wants its three-page TSS region (`KVM_SET_TSS_ADDR`), just below the BIOS.
pub const KVM_TSS_GPA: u64 = 0xfffb_d000;
/// Page size.
pub const PAGE_BYTES: u64 = 4096;

// The fixed areas must not overlap; checked at compile time.
const _: () = {
    assert!(GDT_GPA + 0x60 <= TSS_GPA);
    assert!(TSS_GPA + 104 + 8192 < ZERO_PAGE_GPA);
    assert!(FIRMWARE_PROGRESS_GPA + 8 <= ZERO_PAGE_GPA + PAGE_BYTES);
    assert!(FIRMWARE_PROGRESS_GPA % 8 == 0 && ZERO_PAGE_GPA + PAGE_BYTES <= BOOT_STACK_GPA);
    assert!(BOOT_STACK_GPA < PML4_GPA && PD_END_GPA <= CMDLINE_GPA);
    assert!(CMDLINE_GPA + CMDLINE_MAX_BYTES as u64 <= FIRMWARE_STACK_TOP_GPA);
    assert!(
        CMDLINE_GPA + CMDLINE_MAX_BYTES as u64 + 32 * FIRMWARE_STACK_BYTES
            <= FIRMWARE_STACK_TOP_GPA
    );
    assert!(FIRMWARE_STACK_TOP_GPA <= EBDA_GPA && EBDA_GPA < HIMEM_GPA);
};

/// Guest RAM ranges for `mem_bytes` of memory: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_GPA);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((MMIO_HOLE_END_GPA, mem_bytes - low));
    }
    ranges
}

/// One past the highest guest-physical RAM address.
pub fn ram_top(mem_bytes: u64) -> u64 {
    ram_ranges(mem_bytes).last().map_or(0, |&(start, len)| start + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_top(256 << 20), 256 << 20);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(ram_top(4 << 30), 5 << 30);
    }
}
