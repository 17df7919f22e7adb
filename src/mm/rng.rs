//! A small generator for picking sample pages (Active memory, reclaim's victims).

/// A small xorshift generator for picking sample pages (not for anything secret).
#[derive(Debug, Clone)]
pub struct SampleRng(pub u64);

impl SampleRng {
    /// Seeded from the clock.
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| {
                u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(1)
            });
        Self(seed | 1)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

impl Default for SampleRng {
    fn default() -> Self {
        Self::new()
    }
}
