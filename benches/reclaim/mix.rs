//! The synthetic page mix (zero, same-filled, text-like, random) the parts share.

use super::*;

// ---------------------------------------------------------------------------------------
// The synthetic mix

/// What a page of the mix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// All zero.
    Zero,
    /// One 8-byte word repeated.
    Fill,
    /// Text-like: lines of made-up words, numbers and identifiers (see [`Vocab`]).
    Text,
    /// Incompressible.
    Random,
}

/// The mix, in percent of the pages: the touch payload's kinds, without `dup` (page sharing
/// is not reclaim). scripts/bench-reclaim.sh gives the guest of part 5 the same percentages.
pub(crate) const MIX: [(Kind, u64); 4] =
    [(Kind::Zero, 10), (Kind::Fill, 10), (Kind::Text, 60), (Kind::Random, 20)];
pub(crate) const KIND_SALT: u64 = 0x646e_696b;

pub(crate) fn kind_of(i: u64) -> Kind {
    let k = mix64(i ^ KIND_SALT) % 100;
    let mut end = 0;
    for (kind, pct) in MIX {
        end += pct;
        if k < end {
            return kind;
        }
    }
    Kind::Random
}

/// Text-like pages: lines as programs keep them in memory (logs, configuration, source,
/// messages): each line one of a set of templates of made-up words, with numbers and hex
/// identifiers in between, the templates drawn with a Zipf-like skew.
pub(crate) struct Vocab {
    templates: Vec<Vec<Vec<u8>>>,
}

impl Vocab {
    const WORDS: u64 = 512;
    const TEMPLATES: u64 = 32;

    pub(crate) fn new() -> Self {
        // Letters roughly by English frequency, so words look like words to LZ4 too.
        const LETTERS: &[u8] = b"eeeeeeettttaaaaooooiiinnnsssshhhrrrddlllcuumwfgypbvkjxqz";
        let words: Vec<Vec<u8>> = (0..Self::WORDS)
            .map(|j| {
                let h = mix64(j ^ 0x776f_7264);
                let len = 2 + (h % 9) as usize;
                (0..len)
                    .map(|c| LETTERS[(mix64(h ^ c as u64) % LETTERS.len() as u64) as usize])
                    .collect()
            })
            .collect();
        let templates = (0..Self::TEMPLATES)
            .map(|t| {
                let mut rng = Rng(mix64(t ^ 0x7465_6d70));
                let n = 3 + rng.below(7);
                (0..n).map(|_| words[skewed(&mut rng, Self::WORDS)].clone()).collect()
            })
            .collect();
        Self { templates }
    }

    /// One page of text: lines of a template's words with a number or an identifier after
    /// some of them.
    pub(crate) fn page(&self, rng: &mut Rng) -> Box<Page> {
        let mut text = Vec::with_capacity(PAGE + 256);
        while text.len() < PAGE {
            let t = &self.templates[skewed(rng, Self::TEMPLATES)];
            for (k, w) in t.iter().enumerate() {
                text.extend_from_slice(w);
                match rng.below(16) {
                    0 => text.extend_from_slice(format!("={}", rng.below(100_000)).as_bytes()),
                    1 => text.extend_from_slice(format!(" 0x{:08x}", rng.next() >> 32).as_bytes()),
                    _ => {}
                }
                text.push(if k + 1 == t.len() { b'\n' } else { b' ' });
            }
        }
        let mut p = zero_page();
        p.copy_from_slice(&text[..PAGE]);
        p
    }
}

/// An index below `n` with a Zipf-like skew: the product of two uniform draws.
pub(crate) fn skewed(rng: &mut Rng, n: u64) -> usize {
    let r = rng.next();
    let (a, b) = (r & 0xffff, (r >> 16) & 0xffff);
    ((a * b * n) >> 32) as usize
}

/// Page `i` of the mix (a pure function of `i`).
pub(crate) fn mix_page(vocab: &Vocab, i: u64) -> (Kind, Box<Page>) {
    let kind = kind_of(i);
    let mut rng = Rng(mix64(i ^ 0x7061_6765));
    let page = match kind {
        Kind::Zero => zero_page(),
        Kind::Fill => {
            let mut p = zero_page();
            let w = rng.next().to_ne_bytes();
            p.chunks_exact_mut(8).for_each(|c| c.copy_from_slice(&w));
            p
        }
        Kind::Text => vocab.page(&mut rng),
        Kind::Random => random_page(&mut rng),
    };
    (kind, page)
}

pub(crate) fn random_page(rng: &mut Rng) -> Box<Page> {
    let mut p = zero_page();
    p.chunks_exact_mut(8).for_each(|c| c.copy_from_slice(&rng.next().to_ne_bytes()));
    p
}
