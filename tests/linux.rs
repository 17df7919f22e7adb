//! Linux e2e: the tiny guest kernel from scripts/build-guest.sh boots under ebb.
//!
//! The guest reaches user space (`ebb-guest: init started`) on every host: on PVM hosts through
//! `ebb_syscall_pf`, which ebb adds there and the guest kernel's patch understands
//! (docs/design.md, "The host"); tests/guest_user.rs runs programs in it. SMP: the kernel
//! brings up 2 and 4 CPUs, four processes fault side by side, the balloon works.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// PVM needs about 100 s to reach `Run /init` when the machine is otherwise idle; CI runs
/// other tests beside it on two cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
const USER_SPACE_LINE: &str = "ebb-guest: init started";
const RUN_INIT_LINE: &str = "Run /init as init process";

fn boot(test: &str, kernel_of: impl Fn(&Guest) -> &std::path::Path) {
    if !kvm_or_skip(test) {
        return;
    }
    let Some(guest) = guest_or_skip(test) else { return };
    let marker = USER_SPACE_LINE;
    eprintln!("{test}: checking that the kernel reaches user space");
    let kernel = kernel_of(&guest).to_str().unwrap().to_owned();
    let initrd = guest.initramfs.to_str().unwrap().to_owned();
    let start = Instant::now();
    let mut vm =
        Running::start(&["run", "--kernel", &kernel, "--initrd", &initrd, "--mem", "256M"]);
    let line = vm.wait_for(&[marker], BOOT_TIMEOUT);
    assert!(
        line.is_some(),
        "{test}: no {marker:?} within {BOOT_TIMEOUT:?}; last lines:\n{}",
        vm.tail(30)
    );
    eprintln!("{test}: reached {marker:?} after {:.1} s", start.elapsed().as_secs_f64());
    let banner = vm.seen.iter().any(|l| l.starts_with("Linux version 6.1"));
    assert!(banner, "the kernel printed its banner on ttyS0");
    let cmdline = vm.seen.iter().find(|l| l.starts_with("Command line:")).unwrap();
    assert!(cmdline.contains("console=ttyS0 reboot=k"), "ebb's base command line: {cmdline}");
    assert!(vm.seen.iter().any(|l| l.contains(RUN_INIT_LINE)), "the kernel ran /init");
    // Then init reboots on its own; the reboot goes through the i8042 and ebb exits 0.
    let status = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(
        status,
        Some(0),
        "{test}: ebb did not exit 0 after the guest rebooted:\n{}",
        vm.tail(15)
    );
}

#[test]
fn bzimage_boots_to_init() {
    boot("bzimage_boots_to_init", |g| &g.bzimage);
}

#[test]
fn pvh_vmlinux_boots_to_init() {
    boot("pvh_vmlinux_boots_to_init", |g| &g.vmlinux);
}

#[test]
fn command_line_too_long_is_refused() {
    if !kvm_or_skip("command_line_too_long_is_refused") {
        return;
    }
    let Some(guest) = guest_or_skip("command_line_too_long_is_refused") else { return };
    let long = "x".repeat(5000);
    let out = run_ebb(&["run", "--kernel", guest.bzimage.to_str().unwrap(), "--cmdline", &long]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: kernel command line is"), "{stderr}");
    assert!(stderr.contains("the kernel accepts at most 2048"), "{stderr}");
}

/// Boots the guest kernel on `vcpus` vCPUs with `extra` options and waits for user space;
/// returns the running VM once the kernel said how many CPUs it brought up.
fn boot_smp(
    test: &str,
    guest: &Guest,
    kernel: &std::path::Path,
    vcpus: u8,
    extra: &[&str],
) -> Running {
    let n = vcpus.to_string();
    let mut argv = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        guest.initramfs.to_str().unwrap(),
        "--mem",
        "128M",
        "--vcpus",
        &n,
    ];
    argv.extend(extra);
    let start = Instant::now();
    let mut vm = Running::start(&argv);
    let brought_up = format!("smp: Brought up 1 node, {vcpus} CPUs");
    // PVM: about 50 s to user space on an idle machine, whatever the vCPU count (the APs'
    // real-mode start is emulated, and takes a few seconds); CI runs tests beside it.
    let line = vm.wait_for(&["ebb-guest: init started"], Duration::from_secs(420));
    assert!(line.is_some(), "{test}: no user space; last lines:\n{}", vm.tail(30));
    assert!(
        vm.seen.iter().any(|l| l.contains(&brought_up)),
        "{test}: the kernel did not bring up {vcpus} CPUs:\n{}",
        vm.seen.iter().filter(|l| l.contains("smp")).cloned().collect::<Vec<_>>().join("\n")
    );
    // One socket of N cores, as CPUID says: not N packages of one core each.
    let packages = vm.seen.iter().find(|l| l.contains("Max logical packages:")).cloned();
    assert_eq!(
        packages.as_deref().map(str::trim),
        Some("smpboot: Max logical packages: 1"),
        "{test}: the CPUs' topology"
    );
    eprintln!("{test}: {vcpus} CPUs up, user space after {:.1} s", start.elapsed().as_secs_f64());
    vm
}

#[test]
fn linux_brings_up_two_and_four_cpus_and_the_balloon_still_works() {
    let test = "linux_brings_up_two_and_four_cpus_and_the_balloon_still_works";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(guest) = guest_or_skip(test) else { return };
    // Two CPUs from the bzImage: user space runs, and the guest reboots on its own.
    let mut vm = boot_smp(test, &guest, &guest.bzimage, 2, &["--cmdline", "ebb.workload=meminfo"]);
    assert_eq!(vm.wait_exit(Duration::from_secs(120)), Some(0), "{}", vm.tail(15));
    // Four CPUs from the PVH vmlinux: four memfill processes fault side by side, each
    // checking every page it wrote; then the balloon inflates.
    let sock = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("smp-{}.sock", std::process::id()));
    let extra = [
        "--cmdline",
        "ebb.workload=fillpar:4:16,idle:600",
        "--balloon",
        "stats=1",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    let mut vm = boot_smp(test, &guest, &guest.vmlinux, 4, &extra);
    let step = vm.wait_for(&["ebb-guest: step fillpar:4:16 exit="], Duration::from_secs(300));
    assert_eq!(step.as_deref(), Some("ebb-guest: step fillpar:4:16 exit=0"), "{}", vm.tail(20));
    let filled = vm.seen.iter().filter(|l| l.trim() == "memfill: touched 16 MiB").count();
    assert_eq!(filled, 4, "{}", vm.tail(20));
    let num = |v: &Value, key: &str| {
        v.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("no {key} in {v}"))
    };
    let ctl = |req: Value| {
        ebb::api::client::Client::new(&sock)
            .raw(&req.to_string())
            .unwrap_or_else(|e| panic!("{req}: {e}"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while ctl(serde_json::json!({"balloon_stats": {}}))["driver_ready"] != Value::Bool(true) {
        assert!(std::time::Instant::now() < deadline, "the balloon driver never came up");
        std::thread::sleep(Duration::from_millis(500));
    }
    let target = serde_json::json!({"balloon": {"target_bytes": 32 << 20}});
    assert_eq!(ctl(target), serde_json::json!({"ok": true}));
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while num(&ctl(serde_json::json!({"balloon_stats": {}})), "actual_bytes") != 32 << 20 {
        assert!(std::time::Instant::now() < deadline, "the balloon never reached 32 MiB");
        std::thread::sleep(Duration::from_millis(500));
    }
    let stats = ctl(serde_json::json!({"stats": {}}));
    assert_eq!(num(&stats, "ballooned_bytes"), 32 << 20);
    // The guest's CPUs took faults of their own, counted apart.
    let per_vcpu = stats["vcpu_faults"].as_array().unwrap();
    assert_eq!(per_vcpu.len(), 4, "{stats}");
    let busy = per_vcpu.iter().filter(|f| f.as_u64().unwrap() > 0).count();
    assert!(busy >= 2, "faults came from {busy} of 4 CPUs: {stats}");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), Some(143), "{}", vm.tail(15));
}
