//! Bad input gets `error: ...` with the cause and exit status 1, never a panic.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// Runs ebb, expects exit 1 with `error:` and `needle` on stderr and no panic.
fn expect_error(args: &[&str], needle: &str) {
    let out = run_ebb(args);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
}

#[test]
fn missing_kernel_file() {
    expect_error(
        &["run", "--kernel", "/nonexistent/bzImage"],
        "cannot read kernel /nonexistent/bzImage",
    );
}

#[test]
fn a_file_that_is_no_kernel() {
    if !kvm_or_skip("a_file_that_is_no_kernel") {
        return;
    }
    let path = temp_file("not-a-kernel", &[0x42; 4096]);
    expect_error(&["run", "--kernel", path.to_str().unwrap()], "is not a Linux kernel");
}

#[test]
fn an_elf_without_pvh_note_is_no_kernel_to_boot() {
    if !kvm_or_skip("an_elf_without_pvh_note_is_no_kernel_to_boot") {
        return;
    }
    let path = temp_file("no-pvh.elf", &tiny_elf(&[0xf4]));
    expect_error(&["run", "--kernel", path.to_str().unwrap()], "no PVH entry note");
}

#[test]
fn zero_memory() {
    expect_error(&["run", "--mem", "0"], "--mem must be larger than 0");
}

#[test]
fn memory_that_is_no_size() {
    // Sizes are parsed by the command line's parser, which names the flag and the value;
    // the status is 1, as for every bad option (2 is a guest crash).
    let out = run_ebb(&["run", "--mem", "lots"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--mem") && stderr.contains("invalid size \"lots\""), "{stderr}");
}

#[test]
fn more_memory_than_the_host_can_map() {
    if !kvm_or_skip("more_memory_than_the_host_can_map") {
        return;
    }
    expect_error(&["run", "--mem", "1000T"], "more than this host can give a guest");
    expect_error(&["run", "--mem", "1000T"], "hint: ask for less --mem");
}

#[test]
fn unknown_firmware_name() {
    if !kvm_or_skip("unknown_firmware_name") {
        return;
    }
    expect_error(
        &["run", "--firmware", "nosuch"],
        "unknown firmware \"nosuch\": built-in payloads are hello, touch",
    );
}

#[test]
fn firmware_file_that_is_not_elf() {
    if !kvm_or_skip("firmware_file_that_is_not_elf") {
        return;
    }
    let path = temp_file(
        "garbage.bin",
        b"not an elf at all, just some bytes padding it out to 64+ bytes.....",
    );
    expect_error(&["run", "--firmware", path.to_str().unwrap()], "cannot load ELF");
}

#[test]
fn firmware_arguments_too_long() {
    if !kvm_or_skip("firmware_arguments_too_long") {
        return;
    }
    let long = format!("k={}", "x".repeat(5000));
    expect_error(
        &["run", "--firmware", "hello", "--firmware-arg", &long],
        "firmware arguments are 5002 bytes",
    );
}

#[test]
fn firmware_argument_without_equals() {
    expect_error(&["run", "--firmware", "touch", "--firmware-arg", "pages"], "expected KEY=VALUE");
}

#[test]
fn kernel_and_firmware_together() {
    expect_error(&["run", "--kernel", "x", "--firmware", "hello"], "exclude each other");
}

#[test]
fn initrd_without_kernel() {
    expect_error(&["run", "--initrd", "/tmp/x"], "--initrd needs --kernel");
}

#[test]
fn more_vcpus_than_supported() {
    expect_error(&["run", "--vcpus", "33"], "--vcpus 33 is out of range: a VM has 1 to 32 vCPUs");
    expect_error(&["run", "--vcpus", "0"], "--vcpus 0 is out of range");
}

#[test]
fn serial_log_in_a_missing_directory() {
    if !kvm_or_skip("serial_log_in_a_missing_directory") {
        return;
    }
    expect_error(&["run", "--serial-log", "/nonexistent/dir/log"], "cannot create serial log");
}

#[test]
fn no_kvm_device() {
    expect_error(
        &["run", "--kvm-device", "/nonexistent/kvm"],
        "/nonexistent/kvm does not exist: this host has no KVM",
    );
}

#[test]
fn kvm_device_without_permission() {
    // Simulated by running ebb as an unprivileged user against the real /dev/kvm (0600 or
    // 0660 root:kvm on most hosts), or against a root-only copy of the node's permissions.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let path = temp_file("kvm-noperm", b"");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        expect_error(&["run", "--kvm-device", path.to_str().unwrap()], "permission denied opening");
        return;
    }
    let setpriv = run_ebb_unprivileged(&["run"]);
    let Ok(out) = setpriv else {
        eprintln!(
            "\n*** SKIPPED kvm_device_without_permission: setpriv (util-linux) is missing ***\n"
        );
        return;
    };
    let (_, stderr) = text(&out);
    if stderr.contains("Permission denied") && !stderr.contains("error:") {
        eprintln!("\n*** SKIPPED kvm_device_without_permission: user 65534 cannot execute the test binary ***\n");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied opening /dev/kvm"), "{stderr}");
    assert!(stderr.contains("'kvm' group"), "says what to do: {stderr}");
}

#[test]
fn sampling_that_would_starve_the_fault_handler_is_refused() {
    let args = ["run", "--active-interval-ms", "10", "--active-sample-pages", "100000"];
    expect_error(&args, "samples 10000000 pages/s; at most 20000 pages/s");
}

#[test]
fn a_balloon_size_that_is_not_whole_mib_is_refused() {
    expect_error(&["run", "--balloon", "target=1536K"], "not a whole number of MiB");
}

#[test]
fn sharing_options_that_cannot_work_are_refused() {
    expect_error(&["run", "--share-scan-rate", "99999999"], "more than 4194304 pages per second");
    expect_error(&["run", "--share-scan-rate", "1000", "--ksm"], "pick one");
    expect_error(&["run", "--share-scan-rate", "1000", "--no-uffd"], "--share-scan-rate");
}
