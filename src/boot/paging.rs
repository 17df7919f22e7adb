//! Identity-mapped boot page tables with 2 MiB pages.

use super::layout::{PDPT_GPA, PD_END_GPA, PD_GPA, PML4_GPA};
use super::{write_bytes, BootError};

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_LARGE: u64 = 1 << 7;
const PAGE_2M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const ENTRIES: u64 = 512;

/// Most guest-physical bytes the page-directory area can map.
pub const MAX_MAPPED_BYTES: u64 = (PD_END_GPA - PD_GPA) / 4096 * GIB;

/// Builds the tables mapping `[0, top)` one to one; `user` makes every page CPL3-accessible.
///
/// Returns the bytes of the PML4, PDPT and page directories, in that order (contiguous from
/// `PML4_GPA`). Pure, so it is tested without a VM.
pub fn identity_map(top: u64, user: bool) -> Result<Vec<u8>, BootError> {
    let flags = PTE_PRESENT | PTE_WRITABLE | if user { PTE_USER } else { 0 };
    let num_pd = top.div_ceil(GIB).max(1);
    if num_pd * 4096 > PD_END_GPA - PD_GPA {
        return Err(BootError::PageTablesTooSmall { top, max: MAX_MAPPED_BYTES });
    }
    let mut words: Vec<u64> = Vec::new();
    words.push(PDPT_GPA | flags);
    words.resize(usize::try_from(ENTRIES).unwrap_or(512), 0);
    let mut pdpt = vec![0u64; 512];
    for (i, e) in pdpt.iter_mut().enumerate().take(usize::try_from(num_pd).unwrap_or(0)) {
        *e = (PD_GPA + 4096 * i as u64) | flags;
    }
    words.extend(pdpt);
    for page in 0..num_pd * ENTRIES {
        words.push((page * PAGE_2M) | flags | PTE_LARGE);
    }
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// Writes the tables of [`identity_map`] at `PML4_GPA`.
pub fn write_identity_map(
    mem: &vm_memory::GuestMemoryMmap,
    top: u64,
    user: bool,
) -> Result<(), BootError> {
    debug_assert_eq!(PML4_GPA + 4096, PDPT_GPA);
    debug_assert_eq!(PDPT_GPA + 4096, PD_GPA);
    write_bytes(mem, &identity_map(top, user)?, PML4_GPA, "page tables")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(bytes: &[u8], index: usize) -> u64 {
        u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().unwrap())
    }

    #[test]
    fn two_gib_maps_two_directories() {
        let t = identity_map(2 << 30, true).unwrap();
        assert_eq!(t.len(), 4 * 4096);
        assert_eq!(word(&t, 0), PDPT_GPA | 7);
        assert_eq!(word(&t, 512 + 1), (PD_GPA + 4096) | 7);
        assert_eq!(word(&t, 512 + 2), 0, "third GiB is not mapped");
        // The last 2 MiB page of the second GiB maps itself.
        assert_eq!(word(&t, 1024 + 1023), ((2 << 30) - PAGE_2M) | 0x87);
    }

    #[test]
    fn kernel_tables_are_not_user_accessible() {
        let t = identity_map(1 << 30, false).unwrap();
        assert_eq!(word(&t, 1024), PTE_PRESENT | PTE_WRITABLE | PTE_LARGE);
    }

    #[test]
    fn too_much_memory_is_refused() {
        assert!(identity_map(MAX_MAPPED_BYTES + 1, true).is_err());
        assert!(identity_map(MAX_MAPPED_BYTES, true).is_ok());
    }
}
