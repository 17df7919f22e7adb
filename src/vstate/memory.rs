//! Guest RAM: anonymous `MAP_NORESERVE` mappings, one per range of the layout.
//!
//! Nothing is backed until first touch. The regions stay reachable through
//! [`GuestRam::regions`] so the lazy-RAM engine can register them with userfaultfd.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::layout::{ram_ranges, ram_top};
use crate::units::human_bytes;

/// Most guest RAM ebb accepts: 4 TiB, safely below KVM's memslot limit of 2^31 - 1 pages
/// (just under 8 TiB) per slot.
pub const MAX_MEM_BYTES: u64 = 4 << 40;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused to map that much address space.
    #[error("cannot map {} of guest RAM: {source}", human_bytes(*.mem_bytes))]
    Map {
        /// Requested size.
        mem_bytes: u64,
        /// The error from vm-memory (mmap).
        source: vm_memory::mmap::FromRangesError,
    },
    /// More RAM than KVM or the CPU can address.
    #[error(
        "guest RAM of {} is more than this host can give a guest (at most {}: {why})",
        human_bytes(*.mem_bytes),
        human_bytes(*.limit)
    )]
    TooLarge {
        /// Requested size.
        mem_bytes: u64,
        /// The limit.
        limit: u64,
        /// Which limit.
        why: &'static str,
    },
}

/// One VM's RAM.
pub struct GuestRam {
    mem: Arc<GuestMemoryMmap>,
    mem_bytes: u64,
}

/// A region as KVM and userfaultfd see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Host virtual address of the mapping.
    pub hva: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRam {
    /// Maps `mem_bytes` of RAM after checking it against `phys_bits` of guest-physical space.
    pub fn new(mem_bytes: u64, phys_bits: u8) -> Result<Self, MemoryError> {
        if mem_bytes > MAX_MEM_BYTES {
            return Err(MemoryError::TooLarge {
                mem_bytes,
                limit: MAX_MEM_BYTES,
                why: "ebb's limit, below KVM's memslot size",
            });
        }
        let addressable = 1u64.checked_shl(u32::from(phys_bits)).unwrap_or(u64::MAX);
        if ram_top(mem_bytes) > addressable {
            // The MMIO hole moves RAM above 3 GiB up by 1 GiB.
            let limit = addressable.saturating_sub(1 << 30);
            return Err(MemoryError::TooLarge {
                mem_bytes,
                limit,
                why: "CPU physical address bits",
            });
        }
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
            .into_iter()
            .map(|(gpa, len)| {
                let too_large =
                    MemoryError::TooLarge { mem_bytes, limit: 0, why: "host address width" };
                Ok((GuestAddress(gpa), usize::try_from(len).map_err(|_| too_large)?))
            })
            .collect::<Result<_, MemoryError>>()?;
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|source| MemoryError::Map { mem_bytes, source })?;
        // Guest RAM never goes into a core file. Every page mapping page sharing moves over
        // guest RAM is marked too (`mm/sharing/sys.rs`): VMAs merge only when their flags
        // agree, and a shared page released or unshared must merge back into guest RAM.
        for region in mem.iter() {
            dont_dump(region.as_ptr() as u64, usize::try_from(region.len()).unwrap_or(0));
        }
        Ok(Self { mem: Arc::new(mem), mem_bytes })
    }

    /// The vm-memory view.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Configured size.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The regions, in guest-physical order.
    pub fn regions(&self) -> Vec<RamRegion> {
        self.mem
            .iter()
            .map(|r| RamRegion { gpa: r.start_addr().0, hva: r.as_ptr() as u64, len: r.len() })
            .collect()
    }
}

/// Leaves `[hva, hva + len)` out of core dumps (`MADV_DONTDUMP`): the copies ebb keeps of
/// guest RAM never reach a disk through a crash. Best effort: a refusal is logged.
///
/// `VM_DONTDUMP` is a VMA flag: the kernel merges only neighbouring VMAs with equal flags,
/// and `mremap` carries a VMA's flags along. So guest RAM and every mapping page sharing
/// moves over it carry it alike, or a page released or unshared would never merge back.
pub fn dont_dump(hva: u64, len: usize) {
    // SAFETY: MADV_DONTDUMP changes no contents and no mapping, only what a core dump holds.
    if unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_DONTDUMP) } != 0 {
        // Once: page sharing calls this for every page it maps.
        static ONCE: std::sync::Once = std::sync::Once::new();
        let e = std::io::Error::last_os_error();
        ONCE.call_once(|| log::warn!("MADV_DONTDUMP on {len} bytes refused: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_above_three_gib_is_split_around_the_hole() {
        let ram = GuestRam::new(4 << 30, 48).unwrap();
        let r = ram.regions();
        assert_eq!((r[0].gpa, r[0].len), (0, 3 << 30));
        assert_eq!((r[1].gpa, r[1].len), (4 << 30, 1 << 30));
    }

    #[test]
    fn memory_beyond_physical_address_bits_is_refused() {
        assert!(matches!(GuestRam::new(64 << 30, 36), Err(MemoryError::TooLarge { .. })));
    }

    #[test]
    fn memory_beyond_a_memslot_is_refused() {
        assert!(matches!(
            GuestRam::new(MAX_MEM_BYTES + 4096, 52),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
