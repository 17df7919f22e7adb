//! Telling zero, same-filled and other pages apart, and rebuilding a same-filled page.

use super::{Page, CLASSIFY_CHUNK_BYTES, WORD_BYTES};

/// What a page holds, for choosing how to store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Every byte is zero.
    Zero,
    /// One 8-byte word repeated over the whole page ("same-filled" in ESX and zswap), in
    /// native byte order: [`fill_page`] with this word rebuilds the page.
    Fill(u64),
    /// Anything else.
    Data,
}

/// The 8-byte word at `w` (exactly 8 bytes), in native byte order.
#[inline(always)]
fn word(w: &[u8]) -> u64 {
    let mut b = [0u8; WORD_BYTES];
    b.copy_from_slice(w);
    u64::from_ne_bytes(b)
}

/// Classifies a page: all zero, one repeated 8-byte word, or data. A data page usually
/// differs from its first word within the first 64 bytes, which is where this stops.
pub fn classify(page: &Page) -> Content {
    let first = word(&page[..WORD_BYTES]);
    for chunk in page.chunks_exact(CLASSIFY_CHUNK_BYTES) {
        let mut diff = 0u64;
        for w in chunk.chunks_exact(WORD_BYTES) {
            diff |= word(w) ^ first;
        }
        if diff != 0 {
            return Content::Data;
        }
    }
    if first == 0 {
        Content::Zero
    } else {
        Content::Fill(first)
    }
}

/// Writes `word` over the whole of `out` (the inverse of [`Content::Fill`]).
pub fn fill_page(word: u64, out: &mut Page) {
    let bytes = word.to_ne_bytes();
    for w in out.chunks_exact_mut(WORD_BYTES) {
        w.copy_from_slice(&bytes);
    }
}
