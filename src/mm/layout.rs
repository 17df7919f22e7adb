//! Guest RAM as `mm` numbers it: every 4 KiB page of every RAM region gets an index, from 0
//! up across the regions in guest-physical order. The page-state table is indexed this way.
//!
//! An index is not a guest page frame number: RAM above the MMIO hole starts at 4 GiB, so
//! `gpa >> 12` and the index differ there. Devices speak guest-physical addresses; this map
//! turns them into indices and host addresses.

use crate::units::{is_page_aligned, PAGE_SIZE};
use crate::vstate::memory::RamRegion;

/// One region with the index of its first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The region.
    pub region: RamRegion,
    /// Index of its first page.
    pub first_idx: u64,
}

impl Span {
    fn pages(&self) -> u64 {
        self.region.len / PAGE_SIZE
    }
}

/// Consecutive pages inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// Index of the first page.
    pub first_idx: u64,
    /// Host address of the first page.
    pub hva: u64,
    /// Number of pages (at least 1).
    pub pages: u64,
}

impl PageRange {
    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
}

/// The host view of guest RAM: index <-> host address <-> guest-physical address.
#[derive(Debug, Clone, Default)]
pub struct RamMap {
    spans: Vec<Span>,
    pages: u64,
}

impl RamMap {
    /// Numbers the pages of `regions` in order.
    pub fn new(regions: &[RamRegion]) -> Self {
        let mut pages = 0;
        let spans = regions
            .iter()
            .map(|&region| {
                let span = Span { region, first_idx: pages };
                pages += region.len / PAGE_SIZE;
                span
            })
            .collect();
        Self { spans, pages }
    }

    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The regions.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// The index of the page at host address `hva`, or None outside guest RAM.
    pub fn idx_of_hva(&self, hva: u64) -> Option<u64> {
        self.spans.iter().find_map(|s| {
            let off = hva.checked_sub(s.region.hva)?;
            (off < s.region.len).then(|| s.first_idx + off / PAGE_SIZE)
        })
    }

    /// The host address of page `idx`, or None past the end.
    pub fn hva_of_idx(&self, idx: u64) -> Option<u64> {
        self.spans.iter().find_map(|s| {
            let i = idx.checked_sub(s.first_idx)?;
            (i < s.pages()).then(|| s.region.hva + i * PAGE_SIZE)
        })
    }

    /// Pages from `idx` to the end of its region (0 past the end).
    pub fn pages_left_in_region(&self, idx: u64) -> u64 {
        self.spans
            .iter()
            .find_map(|s| {
                let i = idx.checked_sub(s.first_idx)?;
                (i < s.pages()).then(|| s.pages() - i)
            })
            .unwrap_or(0)
    }

    /// The pages of guest-physical `[gpa, gpa + len)`, if it is page-aligned, not empty, and
    /// inside one RAM region.
    pub fn range_of_gpa(&self, gpa: u64, len: u64) -> Option<PageRange> {
        if len == 0 || !is_page_aligned(gpa) || !is_page_aligned(len) {
            return None;
        }
        let end = gpa.checked_add(len)?;
        self.spans.iter().find_map(|s| {
            let off = gpa.checked_sub(s.region.gpa)?;
            (end <= s.region.gpa + s.region.len).then(|| PageRange {
                first_idx: s.first_idx + off / PAGE_SIZE,
                hva: s.region.hva + off,
                pages: len / PAGE_SIZE,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = PAGE_SIZE;

    fn map() -> RamMap {
        RamMap::new(&[
            RamRegion { gpa: 0, hva: 0x10_0000, len: 4 * PAGE },
            RamRegion { gpa: 1 << 32, hva: 0x90_0000, len: 2 * PAGE },
        ])
    }

    #[test]
    fn pages_are_numbered_across_regions() {
        let m = map();
        assert_eq!(m.pages(), 6);
        assert_eq!(m.idx_of_hva(0x10_0000 + 3 * PAGE + 5), Some(3));
        assert_eq!(m.idx_of_hva(0x90_0000 + PAGE), Some(5));
        assert_eq!(m.hva_of_idx(4), Some(0x90_0000));
        assert_eq!(m.hva_of_idx(6), None);
    }

    #[test]
    fn addresses_outside_guest_ram_have_no_index() {
        let m = map();
        assert_eq!(m.idx_of_hva(0x10_0000 - 1), None);
        assert_eq!(m.idx_of_hva(0x10_0000 + 4 * PAGE), None);
        assert_eq!(m.idx_of_hva(0x90_0000 + 2 * PAGE), None);
    }

    #[test]
    fn pages_left_stop_at_the_region_end() {
        let m = map();
        assert_eq!(m.pages_left_in_region(2), 2);
        assert_eq!(m.pages_left_in_region(4), 2);
        assert_eq!(m.pages_left_in_region(9), 0);
    }

    #[test]
    fn guest_physical_ranges_map_within_one_region_only() {
        let m = map();
        let r = m.range_of_gpa((1 << 32) + PAGE, PAGE).unwrap();
        assert_eq!((r.first_idx, r.hva, r.pages), (5, 0x90_0000 + PAGE, 1));
        assert_eq!(m.range_of_gpa(0, 4 * PAGE).unwrap().pages, 4);
        assert_eq!(m.range_of_gpa(2 * PAGE, 3 * PAGE), None, "runs past the region");
        assert_eq!(m.range_of_gpa(4 * PAGE, PAGE), None, "the hole is not RAM");
        assert_eq!(m.range_of_gpa(100, PAGE), None, "unaligned");
        assert_eq!(m.range_of_gpa(0, 0), None, "empty");
        assert_eq!(m.range_of_gpa(u64::MAX - PAGE + 1, PAGE), None, "wraps");
    }
}
