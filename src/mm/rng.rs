//! Randomness: a small generator for picking sample pages (Active memory, reclaim's
//! victims), and secret keys from the kernel for hashes a guest must not predict.

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

/// A secret 64-bit key from the kernel's random source (`getrandom`): what keys the page
/// hashes a guest must not be able to aim at one bucket.
///
/// # Errors
/// The `getrandom` error.
pub fn secret_u64() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    let mut got = 0;
    while got < bytes.len() {
        let rest = &mut bytes[got..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into a buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => got += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(u64::from_ne_bytes(bytes))
}
