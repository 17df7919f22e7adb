//! Linux e2e: the tiny guest kernel from scripts/build-guest.sh boots under ebb.
//!
//! The guest reaches user space (`ebb-guest: init started`) on every host: on PVM hosts through
//! `ebb_syscall_pf`, which ebb adds there and the guest kernel's patch understands
//! (docs/design.md, "The host"); tests/guest_user.rs runs programs in it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

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
