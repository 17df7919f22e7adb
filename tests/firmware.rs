//! KVM tests with ebb's firmware payloads: boot, serial, exit codes, memory written from a
//! real guest at CPL3 and read back.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn default_payload_prints_hello_and_exits_zero() {
    if !kvm_or_skip("default_payload_prints_hello_and_exits_zero") {
        return;
    }
    let out = run_ebb(&["run"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "Hello from ebb firmware at CPL3\n");
    assert!(stderr.contains("accelerator:"), "the accelerator is logged at start: {stderr}");
}

fn touch(args: &[&str], mem: &str) -> (Option<i32>, String, String) {
    let mut argv = vec!["run", "--mem", mem, "--firmware", "touch"];
    for a in args {
        argv.extend(["--firmware-arg", a]);
    }
    let out = run_ebb(&argv);
    let (stdout, stderr) = text(&out);
    (out.status.code(), stdout, stderr)
}

fn expect_checksum(stdout: &str, pattern: &str, pages: u64, passes: u64, seed: u64) {
    let want = format!("{:#018x}", touch_checksum(pattern, pages, passes, seed));
    assert_eq!(touch_field(stdout, "checksum").as_deref(), Some(want.as_str()), "{stdout}");
    assert_eq!(touch_field(stdout, "bad").as_deref(), Some("0"), "{stdout}");
}

#[test]
fn touch_64_mib_reads_back_the_expected_checksum() {
    if !kvm_or_skip("touch_64_mib_reads_back_the_expected_checksum") {
        return;
    }
    let (code, stdout, stderr) = touch(&["pages=16384"], "256M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    expect_checksum(&stdout, "seq", 16384, 1, 0);
}

#[test]
fn every_pattern_and_several_passes_read_back() {
    if !kvm_or_skip("every_pattern_and_several_passes_read_back") {
        return;
    }
    for pattern in ["zero", "random", "dup"] {
        let (code, stdout, stderr) =
            touch(&["pages=1000", "passes=3", "seed=0x5eed", &format!("pattern={pattern}")], "64M");
        assert_eq!(code, Some(0), "{pattern}: {stdout}{stderr}");
        expect_checksum(&stdout, pattern, 1000, 3, 0x5eed);
    }
}

#[test]
fn touch_detects_corrupted_pages_and_fails() {
    if !kvm_or_skip("touch_detects_corrupted_pages_and_fails") {
        return;
    }
    // The checker's self-test: flipping a bit in 5 pages must be caught.
    let (code, stdout, _) = touch(&["pages=64", "corrupt=5"], "32M");
    assert_eq!(code, Some(3), "{stdout}");
    assert_eq!(touch_field(&stdout, "bad").as_deref(), Some("5"));
    let good = format!("{:#018x}", touch_checksum("seq", 64, 1, 0));
    assert_ne!(touch_field(&stdout, "checksum"), Some(good));
}

#[test]
fn touch_crosses_the_mmio_hole_into_ram_above_4_gib() {
    if !kvm_or_skip("touch_crosses_the_mmio_hole_into_ram_above_4_gib") {
        return;
    }
    // 3 GiB + 16 MiB: the last 16 MiB live above 4 GiB. Skip to about 64 pages before the
    // hole (free RAM starts right after the payload image, a few pages above 2 MiB).
    let low_free_pages = ((3u64 << 30) - 0x20_3000) / 4096;
    let skip = format!("skip={}", low_free_pages - 64);
    let (code, stdout, stderr) = touch(&[&skip, "pages=128"], "3088M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(touch_field(&stdout, "bad").as_deref(), Some("0"), "{stdout}");
    // The payload's image size moves the start of free RAM by a few pages; what matters is
    // that the run straddles the hole.
    let high: u64 = touch_field(&stdout, "high").unwrap().parse().unwrap();
    assert!((1..128).contains(&high), "pages on both sides of the hole: {stdout}");
}

#[test]
fn touch_rejects_bad_arguments_with_status_4() {
    if !kvm_or_skip("touch_rejects_bad_arguments_with_status_4") {
        return;
    }
    let (code, stdout, _) = touch(&["pattern=bogus"], "32M");
    assert_eq!(code, Some(4));
    assert!(stdout.contains("pattern must be"), "{stdout}");
    let (code, stdout, _) = touch(&["pages=100000"], "32M");
    assert_eq!(code, Some(4));
    assert!(stdout.contains("not enough free guest RAM"), "{stdout}");
}

#[test]
fn strided_pages_written_in_random_order_read_back_the_model_checksum() {
    if !kvm_or_skip("strided_pages_written_in_random_order_read_back_the_model_checksum") {
        return;
    }
    // 1000 pages spread over 8000 (31 MiB) of a 64 MiB guest. A page the random order
    // skipped would read back zeros and count as bad, so bad=0 also shows it is a permutation.
    let args =
        ["pages=1000", "passes=2", "seed=0x5eed", "pattern=random", "stride=8", "order=random"];
    let (code, stdout, stderr) = touch(&args, "64M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(touch_field(&stdout, "stride").as_deref(), Some("8"), "{stdout}");
    assert_eq!(touch_field(&stdout, "order").as_deref(), Some("random"), "{stdout}");
    // Neither stride nor order changes the checksum: the model knows neither.
    expect_checksum(&stdout, "random", 1000, 2, 0x5eed);
}

#[test]
fn random_order_with_loop_ms_keeps_every_page_good() {
    if !kvm_or_skip("random_order_with_loop_ms_keeps_every_page_good") {
        return;
    }
    let args = ["pages=777", "stride=3", "order=random", "seed=12345", "loop_ms=200"];
    let (code, stdout, stderr) = touch(&args, "64M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("touch: loop rounds="), "{stdout}");
    expect_checksum(&stdout, "seq", 777, 1, 12345);
}

#[test]
fn a_stride_spreads_the_pages_across_the_mmio_hole() {
    if !kvm_or_skip("a_stride_spreads_the_pages_across_the_mmio_hole") {
        return;
    }
    // 3 GiB + 16 MiB: about 785,900 free pages below the hole. 770 pages 1024 apart end
    // at index 787,456, past it; without the stride all 770 would be far below 4 GiB.
    let (code, stdout, stderr) = touch(&["pages=770", "stride=1024", "order=random"], "3088M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    expect_checksum(&stdout, "seq", 770, 1, 0);
    let high: u64 = touch_field(&stdout, "high").unwrap().parse().unwrap();
    assert!((1..770).contains(&high), "the last pages land above 4 GiB: {stdout}");
}

#[test]
fn touch_rejects_a_bad_stride_or_order_with_status_4() {
    if !kvm_or_skip("touch_rejects_a_bad_stride_or_order_with_status_4") {
        return;
    }
    for stride in ["stride=0", "stride=4097"] {
        let (code, stdout, _) = touch(&["pages=16", stride], "32M");
        assert_eq!(code, Some(4), "{stride}: {stdout}");
        assert!(stdout.contains("stride must be 1..4096"), "{stdout}");
    }
    // 100 pages 4096 apart need 1.6 GiB of a 32 MiB guest.
    let (code, stdout, _) = touch(&["pages=100", "stride=4096"], "32M");
    assert_eq!(code, Some(4), "{stdout}");
    assert!(stdout.contains("not enough free guest RAM"), "{stdout}");
    // A stride that fits pages=2 but not pages=3 in a 32 MiB guest (about 7600 free pages).
    let (code, stdout, _) = touch(&["pages=2", "stride=4096"], "32M");
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) = touch(&["pages=3", "stride=4096"], "32M");
    assert_eq!(code, Some(4), "{stdout}");
    let (code, stdout, _) = touch(&["order=backwards"], "32M");
    assert_eq!(code, Some(4), "{stdout}");
    assert!(stdout.contains("order must be seq or random"), "{stdout}");
}

#[test]
fn strided_touch_consumes_only_the_pages_it_writes() {
    if !kvm_or_skip("strided_touch_consumes_only_the_pages_it_writes") {
        return;
    }
    // 2048 pages spread over 16384 (64 MiB), walked in order and scattered, with ebb's
    // default (adaptive) fault-around: only the 8 MiB written may be consumed.
    for order in ["order=seq", "order=random"] {
        let stats = temp_file(&format!("stats-stride-{order}.json"), b"");
        let argv = [
            "run",
            "--mem",
            "256M",
            "--firmware",
            "touch",
            "--stats-json",
            stats.to_str().unwrap(),
            "--firmware-arg",
            "pages=2048",
            "--firmware-arg",
            "stride=8",
            "--firmware-arg",
            order,
        ];
        let out = run_ebb(&argv);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        let text = std::fs::read_to_string(&stats).unwrap();
        let last: serde_json::Value = serde_json::from_str(
            text.lines().last().unwrap_or_else(|| panic!("no stats: {stderr}")),
        )
        .unwrap();
        let consumed = last["consumed_bytes"].as_u64().unwrap_or_else(|| panic!("{last}"));
        let written = 2048u64 * 4096;
        // ebb itself places the payload, page tables, GDT and TSS in the guest: under 1 MiB.
        let ebb_own = 1u64 << 20;
        assert!(consumed >= written, "{order}: consumed {consumed} < written {written}");
        let most = (written + ebb_own) + (written + ebb_own) / 10;
        assert!(
            consumed <= most,
            "{order}: consumed {consumed}: the pages between the strides stay untouched"
        );
    }
}

#[test]
fn firmware_from_a_file_runs_and_serial_log_gets_a_copy() {
    if !kvm_or_skip("firmware_from_a_file_runs_and_serial_log_gets_a_copy") {
        return;
    }
    let elf = concat!(env!("OUT_DIR"), "/hello.elf");
    let log = temp_file("serial.log", b"");
    let out = run_ebb(&["run", "--firmware", elf, "--serial-log", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "Hello from ebb firmware at CPL3\n");
}

#[test]
fn payload_exit_status_is_ebb_exit_status() {
    if !kvm_or_skip("payload_exit_status_is_ebb_exit_status") {
        return;
    }
    // mov eax, 42; out 0xf4, eax
    let path = temp_file("exit42.elf", &tiny_elf(&[0xb8, 42, 0, 0, 0, 0xe7, 0xf4]));
    let out = run_ebb(&["run", "--firmware", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(42), "{:?}", text(&out));
}

#[test]
fn triple_fault_exits_2_with_a_register_dump() {
    if !kvm_or_skip("triple_fault_exits_2_with_a_register_dump") {
        return;
    }
    // mov rax, 0x1234; ud2 -> #UD with no IDT -> triple fault.
    let code = [0x48, 0xc7, 0xc0, 0x34, 0x12, 0, 0, 0x0f, 0x0b];
    let path = temp_file("ud2.elf", &tiny_elf(&code));
    let out = run_ebb(&["run", "--firmware", path.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(stderr.contains("rax=0000000000001234"), "{stderr}");
    assert!(stderr.contains("cs=002b (dpl 3)"), "started at CPL3: {stderr}");
}

// --- hot sets, access distributions, content mixes, the blob and the progress counter ----

/// A `key=value` field of touch's `loop accesses=` line.
fn loop_field(stdout: &str, key: &str) -> Option<u64> {
    let line = stdout.lines().find(|l| l.starts_with("touch: loop accesses="))?;
    line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))?.parse().ok())
}

fn field_u64(stdout: &str, key: &str) -> u64 {
    touch_field(stdout, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{stdout}"))
}

#[test]
fn touch_rejects_bad_hot_dist_zipf_and_mix_arguments_with_status_4() {
    if !kvm_or_skip("touch_rejects_bad_hot_dist_zipf_and_mix_arguments_with_status_4") {
        return;
    }
    let cases: &[(&[&str], &str)] = &[
        (&["pages=64", "loop_ms=10", "hot=0"], "hot must be 1..pages"),
        (&["pages=64", "loop_ms=10", "hot=65"], "hot must be 1..pages"),
        (&["pages=64", "loop_ms=10", "hot=x"], "take a number"),
        (&["pages=64", "hot=8"], "need loop_ms"),
        (&["pages=64", "dist=zipf"], "need loop_ms"),
        (&["pages=64", "loop_ms=10", "dist=pareto"], "dist must be sweep, uniform or zipf"),
        (&["pages=64", "loop_ms=10", "dist=zipf", "zipf_s=1001"], "zipf_s must be 0..1000"),
        (&["pages=64", "loop_ms=10", "dist=uniform", "zipf_s=90"], "zipf_s needs dist=zipf"),
        (&["pages=64", "mix=zero:50,random:40"], "summing to 100"),
        (&["pages=64", "mix=zero:50,junk:50"], "mix must be"),
        (&["pages=64", "mix=zero:50,zero:50"], "mix must be"),
        (&["pages=64", "mix=zero:50,random:50,"], "mix must be"),
        (&["pages=64", "mix=zero:101"], "mix must be"),
        (&["pages=64", "mix=zero:100", "pattern=seq"], "not both"),
        (&["pages=64", "mix=zero:100", "dup_groups=0"], "dup_groups must be"),
        (&["pages=64", "mix=text:50,random:50"], "--firmware-blob"),
    ];
    for (args, message) in cases {
        let (code, stdout, stderr) = touch(args, "32M");
        assert_eq!(code, Some(4), "{args:?}: {stdout}{stderr}");
        assert!(stdout.contains(message), "{args:?}: wanted {message:?} in {stdout}");
    }
}

#[test]
fn random_loops_keep_every_page_good_and_pick_rank_1_as_often_as_their_distribution_says() {
    if !kvm_or_skip(
        "random_loops_keep_every_page_good_and_pick_rank_1_as_often_as_their_distribution_says",
    ) {
        return;
    }
    // (arguments, pages, hot, P(rank 1)). hot=4096 goes past the 256 exactly weighted ranks
    // into the bucketed tail, whose weights move rank 1's share by well under 1%.
    let cases: &[(&[&str], u64, u64, f64)] = &[
        (&["dist=zipf"], 256, 64, zipf_rank1_probability(64, 1.0)),
        (&["dist=zipf", "order=random"], 256, 64, zipf_rank1_probability(64, 1.0)),
        (&["dist=zipf", "zipf_s=50"], 4096, 4096, zipf_rank1_probability(4096, 0.5)),
        (&["dist=zipf", "zipf_s=120"], 4096, 4096, zipf_rank1_probability(4096, 1.2)),
        (&["dist=uniform"], 256, 64, 1.0 / 64.0),
    ];
    for &(extra, pages, hot, p1) in cases {
        let (pages_arg, hot_arg) = (format!("pages={pages}"), format!("hot={hot}"));
        let mut args = vec![pages_arg.as_str(), hot_arg.as_str(), "seed=77", "loop_ms=300"];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = touch(&args, "64M");
        assert_eq!(code, Some(0), "{args:?}: {stdout}{stderr}");
        expect_checksum(&stdout, "seq", pages, 1, 77);
        assert_eq!(touch_field(&stdout, "hot"), Some(hot.to_string()), "{stdout}");
        let accesses = loop_field(&stdout, "accesses").unwrap_or_else(|| panic!("{stdout}"));
        let rank1 = loop_field(&stdout, "rank1").unwrap_or_else(|| panic!("{stdout}"));
        // The counter the host can read saw every access.
        assert_eq!(field_u64(&stdout, "progress"), accesses, "{stdout}");
        assert!(accesses >= 10_000, "{args:?}: too few accesses to judge: {stdout}");
        let seen = rank1 as f64 / accesses as f64;
        let sigma = (p1 * (1.0 - p1) / accesses as f64).sqrt();
        assert!(
            (seen - p1).abs() <= 0.02 * p1 + 5.0 * sigma,
            "{args:?}: rank 1 got {seen:.5} of {accesses} accesses, expected {p1:.5}"
        );
    }
}

#[test]
fn a_sweep_loop_over_a_hot_set_counts_every_page_it_rewrites() {
    if !kvm_or_skip("a_sweep_loop_over_a_hot_set_counts_every_page_it_rewrites") {
        return;
    }
    let args = ["pages=512", "hot=100", "order=random", "pattern=random", "loop_ms=200"];
    let (code, stdout, stderr) = touch(&args, "64M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    expect_checksum(&stdout, "random", 512, 1, 0);
    let rounds: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("touch: loop rounds="))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(rounds > 0, "{stdout}");
    assert_eq!(field_u64(&stdout, "progress"), rounds * 100, "100 pages a round: {stdout}");
    assert_eq!(touch_field(&stdout, "dist").as_deref(), Some("sweep"), "{stdout}");
}

#[test]
fn a_run_without_a_loop_leaves_the_progress_counter_at_zero() {
    if !kvm_or_skip("a_run_without_a_loop_leaves_the_progress_counter_at_zero") {
        return;
    }
    let (code, stdout, stderr) = touch(&["pages=64"], "32M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(field_u64(&stdout, "progress"), 0, "{stdout}");
}

#[test]
fn a_content_mix_without_text_reads_back_the_model_checksum() {
    if !kvm_or_skip("a_content_mix_without_text_reads_back_the_model_checksum") {
        return;
    }
    let spec = "random:20,zero:30,fill:25,dup:25";
    let mix = TouchMix::new(spec, 3, &[]);
    // Every kind shows up in 1000 pages; the model decides which page gets which.
    let kinds: std::collections::BTreeSet<_> = (0..1000).map(|p| mix.kind(0x5eed, p)).collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let mix_arg = format!("mix={spec}");
    let args = ["pages=1000", "passes=2", "seed=0x5eed", &mix_arg, "dup_groups=3", "order=random"];
    let (code, stdout, stderr) = touch(&args, "64M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let want = format!("{:#018x}", mix.checksum(1000, 2, 0x5eed));
    assert_eq!(touch_field(&stdout, "checksum").as_deref(), Some(want.as_str()), "{stdout}");
    assert_eq!(touch_field(&stdout, "bad").as_deref(), Some("0"), "{stdout}");
    assert_eq!(touch_field(&stdout, "pattern").as_deref(), Some("mix"), "{stdout}");
    // Canonical order, kinds left out shown as 0.
    let canonical = "zero:30,fill:25,dup:25,text:0,random:20";
    assert_eq!(touch_field(&stdout, "mix").as_deref(), Some(canonical), "{stdout}");
}

#[test]
fn dup_pages_of_one_group_equal_pattern_dup_pages() {
    if !kvm_or_skip("dup_pages_of_one_group_equal_pattern_dup_pages") {
        return;
    }
    // mix=dup:100 with the default dup_groups=1 writes exactly what pattern=dup writes.
    let (code, stdout, stderr) = touch(&["pages=300", "passes=2", "seed=3", "mix=dup:100"], "32M");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    expect_checksum(&stdout, "dup", 300, 2, 3);
}

/// Deterministic English-looking text: what a text page of a real guest holds.
fn corpus(bytes: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "the",
        "memory",
        "of",
        "a",
        "guest",
        "is",
        "compressed",
        "when",
        "cold",
        "and",
        "shared",
        "page",
    ];
    let (mut text, mut x) = (Vec::with_capacity(bytes + 16), 12345u64);
    while text.len() < bytes {
        // Knuth's MMIX linear congruential generator (TAOCP vol. 2, 3.3.4).
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let word = WORDS[usize::try_from(x >> 60).unwrap() % WORDS.len()];
        text.extend_from_slice(word.as_bytes());
        text.push(if x & 0xf == 0 { b'\n' } else { b' ' });
    }
    text.truncate(bytes);
    text
}

/// Runs touch through the library, which already takes a blob (the CLI's `--firmware-blob`
/// is not there yet); returns the exit status and the serial output.
fn touch_with_blob(name: &str, args: &[&str], blob: &[u8], mem_bytes: u64) -> (u8, String) {
    use ebb::config::{BootSource, FirmwareSource};
    let blob_path = temp_file(&format!("{name}.blob"), blob);
    let log = temp_file(&format!("{name}.serial"), b"");
    let args = args
        .iter()
        .map(|a| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).unwrap())
        .collect();
    let mut config = ebb::VmConfig::new(BootSource::Firmware {
        source: FirmwareSource::Builtin("touch".into()),
        args,
        blob: Some(blob_path),
    });
    config.mem_bytes = mem_bytes;
    config.serial_log = Some(log.clone());
    let outcome = ebb::run(&config).unwrap();
    let serial = std::fs::read_to_string(&log).unwrap();
    match outcome {
        ebb::RunOutcome::Exited(code) => (code, serial),
        other => panic!("{other:?}: {serial}"),
    }
}

#[test]
fn text_pages_copy_the_host_blob_and_read_back_the_model_checksum() {
    if !kvm_or_skip("text_pages_copy_the_host_blob_and_read_back_the_model_checksum") {
        return;
    }
    // 100 KiB of text (25 pages) at the top of a 16 MiB guest. touch's image ends a few
    // pages above 2 MiB, leaving about 3550 free pages below the blob: 3500 pages come within
    // some 50 pages of it, and a blob the pages overwrote would fail the text checks.
    let blob = corpus(100 * 1024);
    let spec = "text:60,zero:10,dup:10,random:20";
    let mix_arg = format!("mix={spec}");
    let args = [
        "pages=3500",
        "passes=2",
        "seed=99",
        &mix_arg,
        "dup_groups=4",
        "loop_ms=100",
        "hot=200",
        "dist=zipf",
    ];
    let (code, serial) = touch_with_blob("text", &args, &blob, 16 << 20);
    assert_eq!(code, 0, "{serial}");
    let want = format!("{:#018x}", TouchMix::new(spec, 4, &blob).checksum(3500, 2, 99));
    assert_eq!(touch_field(&serial, "checksum").as_deref(), Some(want.as_str()), "{serial}");
    assert_eq!(touch_field(&serial, "bad").as_deref(), Some("0"), "{serial}");
    assert!(field_u64(&serial, "progress") > 0, "{serial}");
}

#[test]
fn text_pages_need_a_blob_of_at_least_a_page() {
    if !kvm_or_skip("text_pages_need_a_blob_of_at_least_a_page") {
        return;
    }
    let (code, serial) =
        touch_with_blob("short", &["pages=16", "mix=text:100"], &corpus(4095), 16 << 20);
    assert_eq!(code, 4, "{serial}");
    assert!(serial.contains("at least 4096 bytes"), "{serial}");
    // Exactly a page: every text page is that page.
    let blob = corpus(4096);
    let (code, serial) = touch_with_blob("page", &["pages=16", "mix=text:100"], &blob, 16 << 20);
    assert_eq!(code, 0, "{serial}");
    let want = format!("{:#018x}", TouchMix::new("text:100", 1, &blob).checksum(16, 1, 0));
    assert_eq!(touch_field(&serial, "checksum").as_deref(), Some(want.as_str()), "{serial}");
}
