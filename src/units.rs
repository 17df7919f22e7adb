//! Sizes and page arithmetic every layer shares: the one page-size constant, size strings
//! (`512M`) and their display.
//!
//! This module depends on nothing else in ebb, so that any module may use it without
//! creating an import circle.

/// Size of a guest page and of a host base page on x86_64 (4 KiB).
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`: a guest-physical address shifted right by this is its page frame number.
pub const PAGE_SHIFT: u32 = 12;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// `log2(MIB)`.
pub const MIB_SHIFT: u32 = 20;

const _: () = assert!(1 << PAGE_SHIFT == PAGE_SIZE);
const _: () = assert!(1 << MIB_SHIFT == MIB);

/// A size string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 512M, 2G)"
)]
pub struct SizeError(pub String);

/// True if `x` is a multiple of [`PAGE_SIZE`].
pub fn is_page_aligned(x: u64) -> bool {
    x % PAGE_SIZE == 0
}

/// Whole pages in `bytes` (rounded down).
pub fn pages_in(bytes: u64) -> u64 {
    bytes / PAGE_SIZE
}

/// `bytes` in whole MiB, or None if it is not a whole number of MiB.
pub fn exact_mib(bytes: u64) -> Option<u64> {
    (bytes % MIB == 0).then_some(bytes >> MIB_SHIFT)
}

/// Formats a byte count with the largest binary unit that divides it (`3 GiB`, `1000 TiB`).
pub fn human_bytes(n: u64) -> String {
    let units = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    match units.iter().find(|(shift, _)| n != 0 && n % (1u64 << shift) == 0) {
        Some((shift, unit)) => format!("{} {unit}", n >> shift),
        None => format!("{n} bytes"),
    }
}

/// Parses `512M`, `2G`, `4096`, `64K`, `1T` (binary units, case-insensitive, optional
/// `iB`/`B`).
///
/// # Errors
/// [`SizeError`] for anything else, and for sizes that overflow 64 bits.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_owned());
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for s in ["", "M", "12X", "-1G", "1.5G", "99999999999999999999"] {
            assert!(parse_size(s).is_err(), "{s:?} should be rejected");
        }
        assert!(parse_size("17179869184G").is_err(), "overflow must be caught");
    }

    #[test]
    fn human_bytes_picks_the_largest_exact_unit() {
        assert_eq!(human_bytes(3 << 30), "3 GiB");
        assert_eq!(human_bytes(1536 << 20), "1536 MiB");
        assert_eq!(human_bytes(1000 << 40), "1000 TiB");
        assert_eq!(human_bytes(4097), "4097 bytes");
    }

    #[test]
    fn exact_mib_refuses_fractions() {
        assert_eq!(exact_mib(64 << 20), Some(64));
        assert_eq!(exact_mib(0), Some(0));
        assert_eq!(exact_mib(1536 << 10), None);
    }

    #[test]
    fn page_arithmetic() {
        assert!(is_page_aligned(0) && is_page_aligned(8192) && !is_page_aligned(4097));
        assert_eq!(pages_in(8191), 1);
    }
}
