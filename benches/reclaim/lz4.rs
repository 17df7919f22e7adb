//! Part 1: LZ4 on guest pages and the mix, as the compression cache runs it.

use super::*;

// ---------------------------------------------------------------------------------------
// 1. LZ4

/// One set of pages of part 1.
pub(crate) struct Set {
    name: String,
    pages: Vec<Box<Page>>,
}

/// The pages of a file, the last one padded with zeros.
pub(crate) fn file_pages(path: &Path) -> std::io::Result<Vec<Box<Page>>> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .chunks(PAGE)
        .map(|c| {
            let mut p = zero_page();
            p[..c.len()].copy_from_slice(c);
            p
        })
        .collect())
}

/// The guest images: EBB_GUEST_IMAGES, else the newest complete entry of the guest cache.
pub(crate) fn guest_images() -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("EBB_GUEST_IMAGES") {
        return list.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect();
    }
    let names = ["vmlinux", "bzImage", "initramfs.cpio"];
    let root = std::env::var("EBB_GUEST_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ebb/guest")
    });
    let Ok(entries) = std::fs::read_dir(&root) else { return Vec::new() };
    let newest = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|d| names.iter().all(|n| d.join(n).is_file()))
        .max_by_key(|d| d.join("vmlinux").metadata().and_then(|m| m.modified()).ok());
    newest.map(|d| names.iter().map(|n| d.join(n)).collect()).unwrap_or_default()
}

/// Figures of one set.
#[derive(Default, Clone)]
pub(crate) struct Lz4Result {
    pages: usize,
    zero: usize,
    fill: usize,
    data: usize,
    data_bytes: usize,
    compressed_bytes: usize,
    small: usize,
    small_bytes: usize,
    compress_mbs: f64,
    decompress_mbs: f64,
    store_mbs: f64,
    load_mbs: f64,
}

pub(crate) fn lz4_set(set: &Set, rounds: usize) -> Lz4Result {
    let mut r = Lz4Result { pages: set.pages.len(), ..Default::default() };
    let mut data: Vec<&Page> = Vec::new();
    for p in &set.pages {
        match classify(p) {
            Content::Zero => r.zero += 1,
            Content::Fill(_) => r.fill += 1,
            Content::Data => data.push(p),
        }
    }
    let mut scratch = vec![0u8; get_maximum_output_size(PAGE)];
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for p in &data {
        let n = compress_into(&p[..], &mut scratch).unwrap();
        r.compressed_bytes += n;
        if n <= MAX_COMPRESSED_BYTES {
            kept.push(scratch[..n].to_vec());
        }
    }
    r.data = data.len();
    r.data_bytes = data.len() * PAGE;
    r.small = kept.len();
    r.small_bytes = kept.len() * PAGE;
    let mut out = zero_page();
    let (mut comp, mut decomp, mut store, mut load) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        comp.push(throughput(r.data_bytes, || {
            for p in &data {
                black_box(compress_into(&p[..], &mut scratch).unwrap());
            }
        }));
        decomp.push(throughput(r.small_bytes, || {
            for c in &kept {
                black_box(decompress_into(c, &mut out[..]).unwrap());
            }
        }));
        // The cache's own paths over every page of the set: classify, then drop (zero),
        // keep a word (same-filled), compress into a slab slot, or refuse (too big).
        let mut handles = Vec::with_capacity(set.pages.len());
        store.push(throughput(r.pages * PAGE, || {
            let mut z = ZCache::new(u64::MAX >> 1);
            handles.clear();
            for (i, p) in set.pages.iter().enumerate() {
                let h = match classify(p) {
                    Content::Zero => continue,
                    Content::Fill(w) => z.insert_fill(i as u64, w),
                    Content::Data => z.insert(i as u64, p),
                };
                match h {
                    Ok(h) => handles.push(h),
                    Err(ZcacheError::TooBig { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            black_box(&z);
        }));
        let mut z = ZCache::new(u64::MAX >> 1);
        let hs: Vec<_> = (set.pages.iter().enumerate())
            .filter_map(|(i, p)| match classify(p) {
                Content::Zero => None,
                Content::Fill(w) => z.insert_fill(i as u64, w).ok(),
                Content::Data => z.insert(i as u64, p).ok(),
            })
            .collect();
        load.push(throughput(hs.len() * PAGE, || {
            for &h in &hs {
                z.get(h, &mut out).unwrap();
                black_box(&out);
            }
        }));
    }
    r.compress_mbs = median(comp);
    r.decompress_mbs = median(decomp);
    r.store_mbs = median(store);
    r.load_mbs = median(load);
    r
}

/// Throughput over several sets: total bytes over total time.
pub(crate) fn combined(
    rs: &[&Lz4Result],
    bytes: impl Fn(&Lz4Result) -> usize,
    mbs: impl Fn(&Lz4Result) -> f64,
) -> f64 {
    let total: f64 = rs.iter().map(|r| bytes(r) as f64).sum();
    let secs: f64 = rs.iter().filter(|r| bytes(r) > 0).map(|r| bytes(r) as f64 / mbs(r)).sum();
    total / secs
}

pub(crate) fn part_lz4(pool: &[(Kind, Box<Page>)], rounds: usize) -> Value {
    println!("== 1. LZ4 on 4 KiB pages, one core (lz4_flex block format with safe decoding, as ebb's compression cache)");
    let images = guest_images();
    let mut sets = Vec::new();
    for path in &images {
        match file_pages(path) {
            Ok(pages) => sets.push(Set {
                name: path.file_name().map_or("?".into(), |n| n.to_string_lossy().into_owned()),
                pages,
            }),
            Err(e) => println!("  (cannot read {}: {e}; left out)", path.display()),
        }
    }
    let n_images = sets.len();
    if n_images == 0 {
        skip(
            "guest images",
            "no guest kernel cache (run scripts/build-guest.sh, or set EBB_GUEST_IMAGES)",
        );
    }
    let pick =
        |k: Kind| pool.iter().filter(|(kind, _)| *kind == k).map(|(_, p)| p.clone()).collect();
    sets.push(Set {
        name: "mix (all)".into(),
        pages: pool.iter().map(|(_, p)| p.clone()).collect(),
    });
    sets.push(Set { name: "mix: text".into(), pages: pick(Kind::Text) });
    sets.push(Set { name: "mix: random".into(), pages: pick(Kind::Random) });
    let pct = |a: usize, b: usize| if b == 0 { f64::NAN } else { 100.0 * a as f64 / b as f64 };
    println!(
        "  {:16} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7}   {:>10} {:>10}   {:>11} {:>10}",
        "set",
        "pages",
        "zero%",
        "fill%",
        "data",
        "ratio",
        "<=2KiB",
        "compress",
        "decompress",
        "cache store",
        "cache load"
    );
    let results: Vec<Lz4Result> = sets.iter().map(|s| lz4_set(s, rounds)).collect();
    for (s, r) in sets.iter().zip(&results) {
        println!(
            "  {:16} {:6} {} {} {:6} {} {}%   {} MB/s {} MB/s   {} MB/s {} MB/s",
            s.name,
            r.pages,
            num(pct(r.zero, r.pages), 6, 1),
            num(pct(r.fill, r.pages), 6, 1),
            r.data,
            num(r.data_bytes as f64 / r.compressed_bytes as f64, 6, 2),
            num(pct(r.small, r.data), 6, 1),
            num(r.compress_mbs, 5, 0),
            num(r.decompress_mbs, 5, 0),
            num(r.store_mbs, 6, 0),
            num(r.load_mbs, 5, 0)
        );
    }
    println!(
        "  ratio: data bytes / LZ4 bytes over the data pages (neither zero nor same-filled);\n  \
         <=2KiB: share of data pages the cache keeps (the rest go to the swap file);\n  \
         compress: over all data pages; decompress: over the kept ones (the only ones ever \
         decompressed);\n  cache store/load: ZCache's classify + insert / get over every page of \
         the set (MB of guest pages).\n  The images are files, not a running guest's memory: a \
         proxy for the memory of an idle guest (kernel text and data, initramfs)."
    );
    let (img, mix): (Vec<&Lz4Result>, Vec<&Lz4Result>) =
        (results[..n_images].iter().collect(), vec![&results[n_images]]);
    let comp = |rs: &[&Lz4Result]| combined(rs, |r| r.data_bytes, |r| r.compress_mbs);
    let decomp = |rs: &[&Lz4Result]| combined(rs, |r| r.small_bytes, |r| r.decompress_mbs);
    let verdict = |x: f64, goal: f64| if x >= goal { "met" } else { "NOT met" };
    for (name, goal, f) in [
        ("compress", GOAL_COMPRESS_MBS, &comp as &dyn Fn(&[&Lz4Result]) -> f64),
        ("decompress", GOAL_DECOMPRESS_MBS, &decomp),
    ] {
        let (i, m) = (f(&img), f(&mix));
        let img_s = if img.is_empty() {
            "n/a".to_string()
        } else {
            format!("{i:.0} MB/s ({})", verdict(i, goal))
        };
        println!(
            "  goal: {name} >= {goal:.0} MB/s on one core; measured: guest images {img_s}, mix {m:.0} MB/s ({})",
            verdict(m, goal)
        );
    }
    let sets_json: Vec<Value> = sets
        .iter()
        .zip(&results)
        .map(|(s, r)| {
            json!({"set": s.name, "pages": r.pages, "zero": r.zero, "fill": r.fill, "data": r.data,
                   "ratio": r.data_bytes as f64 / r.compressed_bytes as f64,
                   "small_share": r.small as f64 / r.data as f64,
                   "compress_mbs": r.compress_mbs, "decompress_mbs": r.decompress_mbs,
                   "store_mbs": r.store_mbs, "load_mbs": r.load_mbs})
        })
        .collect();
    json!({"sets": sets_json,
           "images_compress_mbs": comp(&img), "images_decompress_mbs": decomp(&img),
           "mix_compress_mbs": comp(&mix), "mix_decompress_mbs": decomp(&mix)})
}
