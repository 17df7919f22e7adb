//! A fault handler that fails or panics while the guest runs ends the VM in order: the vCPU
//! stops first, guest RAM is released after, and `ebb run` reports the cause and exits 1.
//! The failure is injected through the debug build's test-only `EBB_TEST_HANDLER_FAULT`
//! (src/mm/fault/inject.rs).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ebb, kvm_or_skip, text};
use ebb::mm::uffd::{Uffd, DEFAULT_UFFD_DEV};

/// How long a VM whose handler died may take to end before the test calls it a hang.
const HANG_AFTER: Duration = Duration::from_secs(60);
/// What the vCPU thread logs (at debug level) when its run loop has ended.
const VCPU_ENDED: &str = "vCPU 0 has left KVM_RUN for good";
/// What the engine logs when it has unregistered guest RAM.
const RAM_RELEASED: &str = "guest RAM unregistered from userfaultfd";

/// Runs touch (one fault per page, so that the handler is busy until the end) with the
/// handler made to `failure` (`panic:N` or `error:N`); returns the exit status, stdout and
/// stderr, or None if the test cannot run here.
fn run_with_failure(test: &str, failure: &str) -> Option<(Option<i32>, String, String)> {
    if !kvm_or_skip(test) {
        return None;
    }
    if !cfg!(debug_assertions) {
        eprintln!("\n*** SKIPPED {test}: the failure injection exists in debug builds only ***\n");
        return None;
    }
    if let Err(e) = Uffd::open(std::path::Path::new(DEFAULT_UFFD_DEV)) {
        eprintln!("\n*** SKIPPED {test}: userfaultfd unavailable here ({e}) ***\n");
        return None;
    }
    let mut child = ebb()
        .args(["run", "--mem", "256M", "--firmware", "touch", "--firmware-arg", "pages=20000"])
        .args(["--fault-around", "0"])
        .env("EBB_TEST_HANDLER_FAULT", failure)
        .env("RUST_LOG", "warn,ebb=info,ebb::vmm::event_loop=debug")
        // As a user chasing the panic would run it: printing the backtrace needs system
        // calls (getcwd) that the seccomp filter must allow, or the VM ends with SIGSYS.
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + HANG_AFTER;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let (_, stderr) = text(&child.wait_with_output().unwrap());
            panic!("ebb still running {HANG_AFTER:?} after its handler's {failure} (a hang):\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    Some((out.status.code(), stdout, stderr))
}

/// Checks that the vCPU thread ended before guest RAM was unregistered, and that the guest
/// never got past the failure.
fn assert_vcpu_stopped_before_release(stdout: &str, stderr: &str) {
    let ended = stderr.find(VCPU_ENDED);
    let released = stderr.find(RAM_RELEASED);
    assert!(ended.is_some(), "the vCPU thread never ended:\n{stderr}");
    assert!(released.is_some(), "guest RAM was never released:\n{stderr}");
    assert!(ended < released, "guest RAM was released while the vCPU still ran:\n{stderr}");
    assert!(!stdout.contains("touch: done"), "the guest ran on after the failure:\n{stdout}");
}

#[test]
fn a_panicking_fault_handler_ends_the_vm_with_the_panic_message() {
    let test = "a_panicking_fault_handler_ends_the_vm_with_the_panic_message";
    let Some((code, stdout, stderr)) = run_with_failure(test, "panic:50") else { return };
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("the fault handler panicked: injected by EBB_TEST_HANDLER_FAULT"),
        "{stderr}"
    );
    assert_vcpu_stopped_before_release(&stdout, &stderr);
}

#[test]
fn a_failing_fault_handler_stops_the_vcpu_before_guest_ram_is_released() {
    let test = "a_failing_fault_handler_stops_the_vcpu_before_guest_ram_is_released";
    let Some((code, stdout, stderr)) = run_with_failure(test, "error:50") else { return };
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("reading userfaultfd events: injected by"), "{stderr}");
    assert_vcpu_stopped_before_release(&stdout, &stderr);
}
