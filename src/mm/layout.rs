//! Guest RAM as the engine sees it: host ranges numbered by page (pfn within guest RAM).

use crate::vstate::memory::RamRegion;

/// Guest page size.
pub const PAGE: u64 = 4096;

/// One region with the page number of its first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The region.
    pub region: RamRegion,
    /// Page number of its first page.
    pub first_pfn: u64,
}

/// The host view of guest RAM: hva <-> pfn for every page.
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
                let span = Span { region, first_pfn: pages };
                pages += region.len / PAGE;
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

    /// The page number of host address `hva`, or None outside guest RAM.
    pub fn pfn_of(&self, hva: u64) -> Option<u64> {
        self.spans.iter().find_map(|s| {
            let off = hva.checked_sub(s.region.hva)?;
            (off < s.region.len).then(|| s.first_pfn + off / PAGE)
        })
    }

    /// The host address of page `pfn`, or None past the end.
    pub fn hva_of(&self, pfn: u64) -> Option<u64> {
        self.spans.iter().find_map(|s| {
            let idx = pfn.checked_sub(s.first_pfn)?;
            (idx < s.region.len / PAGE).then(|| s.region.hva + idx * PAGE)
        })
    }

    /// Pages from `pfn` to the end of its region (0 past the end).
    pub fn pages_left_in_region(&self, pfn: u64) -> u64 {
        self.spans
            .iter()
            .find_map(|s| {
                let idx = pfn.checked_sub(s.first_pfn)?;
                let n = s.region.len / PAGE;
                (idx < n).then(|| n - idx)
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(m.pfn_of(0x10_0000 + 3 * PAGE + 5), Some(3));
        assert_eq!(m.pfn_of(0x90_0000 + PAGE), Some(5));
        assert_eq!(m.hva_of(4), Some(0x90_0000));
        assert_eq!(m.hva_of(6), None);
    }

    #[test]
    fn addresses_outside_guest_ram_have_no_pfn() {
        let m = map();
        assert_eq!(m.pfn_of(0x10_0000 - 1), None);
        assert_eq!(m.pfn_of(0x10_0000 + 4 * PAGE), None);
        assert_eq!(m.pfn_of(0x90_0000 + 2 * PAGE), None);
    }

    #[test]
    fn pages_left_stop_at_the_region_end() {
        let m = map();
        assert_eq!(m.pages_left_in_region(2), 2);
        assert_eq!(m.pages_left_in_region(4), 2);
        assert_eq!(m.pages_left_in_region(9), 0);
    }
}
