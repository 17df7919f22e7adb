//! The guest's physical memory map, as the e820 table, PVH and the firmware see it.

use super::layout::{ram_ranges, EBDA_GPA, HIMEM_GPA};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The map for `mem_bytes` of RAM: conventional memory below the EBDA, the EBDA reserved,
/// the legacy VGA/BIOS hole left out, RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB.
pub fn memory_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for (start, len) in ram_ranges(mem_bytes) {
        let end = start + len;
        if start == 0 {
            map.push(E820Entry { addr: 0, size: end.min(EBDA_GPA), kind: E820_RAM });
            if end > EBDA_GPA {
                let size = end.min(0xa_0000) - EBDA_GPA;
                map.push(E820Entry { addr: EBDA_GPA, size, kind: E820_RESERVED });
            }
            if end > HIMEM_GPA {
                map.push(E820Entry { addr: HIMEM_GPA, size: end - HIMEM_GPA, kind: E820_RAM });
            }
        } else {
            map.push(E820Entry { addr: start, size: len, kind: E820_RAM });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_skips_legacy_hole_and_mmio_hole() {
        let map = memory_map(4 << 30);
        assert_eq!(
            map,
            vec![
                E820Entry { addr: 0, size: EBDA_GPA, kind: E820_RAM },
                E820Entry { addr: EBDA_GPA, size: 0x400, kind: E820_RESERVED },
                E820Entry { addr: HIMEM_GPA, size: (3 << 30) - HIMEM_GPA, kind: E820_RAM },
                E820Entry { addr: 4 << 30, size: 1 << 30, kind: E820_RAM },
            ]
        );
    }

    #[test]
    fn ram_entries_add_up_to_less_than_configured() {
        let ram: u64 =
            memory_map(256 << 20).iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (256 << 20) - (HIMEM_GPA - EBDA_GPA));
    }
}
