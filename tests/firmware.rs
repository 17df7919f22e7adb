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
