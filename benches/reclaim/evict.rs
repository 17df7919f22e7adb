//! Part 2: taking pages out of a mapping, UFFDIO_MOVE against copy + MADV_DONTNEED.

use super::*;

// ---------------------------------------------------------------------------------------
// 2. Eviction mechanism

/// Writes every page of `[base, base + pages)` (so each is a private page of its own).
pub(crate) fn populate(base: *mut u8, pages: usize) {
    for i in 0..pages {
        // SAFETY: base is a mapping of at least `pages` pages.
        unsafe { base.add(i * PAGE).cast::<u64>().write_volatile(i as u64 | 1) };
    }
}

/// How a page leaves the mapping.
#[derive(Clone, Copy)]
pub(crate) enum Evict {
    MovePerPage,
    MovePerBatch,
    CopyDontneedPerPage,
    CopyDontneedPerBatch,
}

pub(crate) struct EvictRig {
    moves: Uffd,
    src: *mut u8,
    scratch: *mut u8,
    buf: Vec<u8>,
    pages: usize,
    failed_moves: u64,
}

impl EvictRig {
    /// ns per page of one pass over all pages.
    pub(crate) fn run(&mut self, how: Evict) -> f64 {
        populate(self.src, self.pages);
        let scratch = self.scratch as u64;
        let t = Instant::now();
        for b in 0..self.pages / BATCH {
            // SAFETY: b * BATCH + BATCH <= pages: inside the source mapping.
            let batch = unsafe { self.src.add(b * BATCH * PAGE) };
            match how {
                Evict::MovePerPage => {
                    for j in 0..BATCH {
                        let src = batch as u64 + (j * PAGE) as u64;
                        let dst = scratch + (j * PAGE) as u64;
                        // SAFETY: the benchmark's own pages and scratch range.
                        match unsafe { self.moves.move_pages(dst, src, PAGE_U64) } {
                            Ok((Resolved::Mapped, _)) => {}
                            _ => self.failed_moves += 1,
                        }
                    }
                    dontneed(self.scratch, BATCH * PAGE);
                }
                Evict::MovePerBatch => {
                    let len = (BATCH * PAGE) as u64;
                    // SAFETY: the benchmark's own pages and scratch range.
                    match unsafe { self.moves.move_pages(scratch, batch as u64, len) } {
                        Ok((Resolved::Mapped, _)) => {}
                        _ => self.failed_moves += 1,
                    }
                    dontneed(self.scratch, BATCH * PAGE);
                }
                Evict::CopyDontneedPerPage | Evict::CopyDontneedPerBatch => {
                    for j in 0..BATCH {
                        // SAFETY: both ranges are BATCH pages long, mapped, and disjoint.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                batch.add(j * PAGE),
                                self.buf.as_mut_ptr().add(j * PAGE),
                                PAGE,
                            );
                        }
                        if matches!(how, Evict::CopyDontneedPerPage) {
                            // SAFETY: as above.
                            dontneed(unsafe { batch.add(j * PAGE) }, PAGE);
                        }
                    }
                    if matches!(how, Evict::CopyDontneedPerBatch) {
                        dontneed(batch, BATCH * PAGE);
                    }
                    black_box(&self.buf);
                }
            }
        }
        t.elapsed().as_nanos() as f64 / self.pages as f64
    }
}

pub(crate) fn part_evict(pages: usize, rounds: usize) -> Value {
    println!("\n== 2. Eviction mechanism: taking {pages} resident pages out of a mapping, batches of {BATCH}, {rounds} rounds, median");
    let moves = match Uffd::open_for_moves(Path::new(DEFAULT_UFFD_DEV)) {
        Ok(u) if u.has_move() => u,
        other => {
            let why = other.err().map_or("no UFFDIO_MOVE (Linux 6.8+)".into(), |e| e.to_string());
            skip("part 2", &why);
            return Value::Null;
        }
    };
    let pages = pages.div_ceil(BATCH) * BATCH;
    let scratch = mmap_anon(BATCH * PAGE);
    // SAFETY: the benchmark's own scratch range.
    unsafe { moves.register_for_moves(scratch as u64, (BATCH * PAGE) as u64) }.unwrap();
    let mut rig = EvictRig {
        moves,
        src: mmap_anon(pages * PAGE),
        scratch,
        buf: vec![1u8; BATCH * PAGE],
        pages,
        failed_moves: 0,
    };
    let cases = [
        ("copy + MADV_DONTNEED, per page", Evict::CopyDontneedPerPage),
        ("copy + MADV_DONTNEED, per 64 pages", Evict::CopyDontneedPerBatch),
        ("UFFDIO_MOVE, per page (ebb)", Evict::MovePerPage),
        ("UFFDIO_MOVE, per 64 pages", Evict::MovePerBatch),
    ];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for r in 0..rounds {
        for i in 0..cases.len() {
            let c = (i + r) % cases.len();
            ns[c].push(rig.run(cases[c].1));
        }
    }
    let med: Vec<f64> = ns.into_iter().map(median).collect();
    for ((name, _), m) in cases.iter().zip(&med) {
        println!(
            "  {name:36} {:8.2} us/page {:10.0} pages/s   x{:.2} of copy+DONTNEED per page",
            m / 1e3,
            1e9 / m,
            m / med[0]
        );
    }
    if rig.failed_moves > 0 {
        println!("  ({} moves did not complete; their pages stayed)", rig.failed_moves);
    }
    println!(
        "  Both move every page out of an unregistered anonymous mapping; a move also drops the \
         scratch pages after each batch, as eviction does.\n  Copy + MADV_DONTNEED alone can \
         lose a write that lands between the two (it needs write protection first, which costs \
         more);\n  a move cannot: the page changes owner in one step."
    );
    // SAFETY: unmapping what we mapped; the move descriptor is dropped with the rig after.
    unsafe {
        libc::munmap(rig.src.cast(), pages * PAGE);
    }
    let names = ["copy_dontneed_page", "copy_dontneed_batch", "move_page", "move_batch"];
    let us: serde_json::Map<String, Value> =
        names.iter().zip(&med).map(|(n, m)| ((*n).to_string(), json!(m / 1e3))).collect();
    Value::Object(us)
}
