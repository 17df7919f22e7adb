//! The virtio-balloon device driven by the stock Linux driver of the guest kernel.
//!
//! The kernel boots without a disk (`root=/dev/vda rootwait`), so on PVM hosts, where user
//! space cannot run, it idles with its drivers alive. `init_on_free=1` makes it write every
//! page it frees at boot, so there is backed guest memory to give back.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn ctl(sock: &Path, req: Value) -> Value {
    ebb::api::client::Client::new(sock)
        .raw(&req.to_string())
        .unwrap_or_else(|e| panic!("{req}: {e}"))
}

/// Polls `f` every 500 ms until it returns Some, or panics after `timeout` with `what`.
fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Boots the guest with `mem` of RAM and a balloon; returns the running VM and its socket.
fn boot(test: &str, mem: &str, balloon: &str) -> Option<(Running, std::path::PathBuf)> {
    if !kvm_or_skip(test) {
        return None;
    }
    let guest = guest_or_skip(test)?;
    let sock = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{test}-{}.sock", std::process::id()));
    let vm = Running::start(&[
        "run",
        "--kernel",
        guest.vmlinux.to_str().unwrap(),
        "--mem",
        mem,
        "--cmdline",
        "root=/dev/vda rootwait init_on_free=1",
        "--balloon",
        balloon,
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait("the control socket", Duration::from_secs(10), || sock.exists().then_some(()));
    wait("the balloon driver", Duration::from_secs(300), || {
        ctl(&sock, json!({"balloon_stats": {}}))["driver_ready"].as_bool().filter(|&r| r)
    });
    Some((vm, sock))
}

#[test]
fn linux_driver_inflates_deflates_and_sends_stats() {
    let test = "linux_driver_inflates_deflates_and_sends_stats";
    let Some((_vm, sock)) = boot(test, "128M", "stats=1,deflate_on_oom=on") else { return };
    // Statistics arrive with the guest's names.
    let stats = wait("guest statistics", Duration::from_secs(60), || {
        let s = ctl(&sock, json!({"balloon_stats": {}}));
        s["stats"]["total_memory"].as_u64().map(|_| s)
    });
    let total = u(&stats["stats"], "total_memory");
    assert!(total > 64 << 20 && total <= 128 << 20, "total_memory {total}: {stats}");
    assert!(stats["stats"]["free_memory"].is_u64(), "{stats}");
    let before = ctl(&sock, json!({"stats": {}}));
    // Inflate to 32 MiB.
    assert_eq!(ctl(&sock, json!({"balloon": {"target_bytes": 32 << 20}})), json!({"ok": true}));
    let t0 = Instant::now();
    wait("actual to reach 32 MiB", Duration::from_secs(180), || {
        (u(&ctl(&sock, json!({"balloon_stats": {}})), "actual_bytes") == 32 << 20).then_some(())
    });
    let inflated = ctl(&sock, json!({"stats": {}}));
    eprintln!(
        "{test}: inflate to 32 MiB took {:.1} s; rss {} -> {} MiB, consumed {} -> {} MiB",
        t0.elapsed().as_secs_f64(),
        u(&before, "rss_bytes") >> 20,
        u(&inflated, "rss_bytes") >> 20,
        u(&before, "consumed_bytes") >> 20,
        u(&inflated, "consumed_bytes") >> 20
    );
    assert_eq!(u(&inflated, "ballooned_bytes"), 32 << 20);
    let dropped = u(&before, "rss_bytes").saturating_sub(u(&inflated, "rss_bytes"));
    assert!(dropped >= 28 << 20, "host RSS dropped by about the balloon: {dropped} bytes");
    // Deflate back.
    assert_eq!(ctl(&sock, json!({"balloon": {"target_bytes": 0}})), json!({"ok": true}));
    wait("actual to return to 0", Duration::from_secs(180), || {
        (u(&ctl(&sock, json!({"balloon_stats": {}})), "actual_bytes") == 0).then_some(())
    });
    assert_eq!(u(&ctl(&sock, json!({"stats": {}})), "ballooned_bytes"), 0);
    // A target beyond guest RAM is refused with a reason; the guest made no mistakes.
    let err = ctl(&sock, json!({"balloon": {"target_bytes": 1u64 << 30}}));
    assert!(err["error"].as_str().unwrap().contains("more than the guest's 128 MiB"), "{err}");
    let stats = ctl(&sock, json!({"balloon_stats": {}}));
    for kind in ["guest_errors", "transport_errors"] {
        let errors = &stats[kind];
        assert!(
            errors.as_object().unwrap().values().all(|v| v == 0),
            "the stock driver is well-behaved: {kind} {errors}"
        );
    }
}

#[test]
fn free_page_reporting_releases_memory_freed_at_boot() {
    let test = "free_page_reporting_releases_memory_freed_at_boot";
    // Linux 6.1 reports whole free pageblocks only (2 MiB here: the guest kernel has
    // hugetlbfs, guest/README.md), and only while 32 of them (64 MiB) are free above the low
    // watermark. tests/guest_user.rs has the guest free memory from user space.
    let Some((_vm, sock)) = boot(test, "256M", "free_page_reporting=on") else { return };
    let reported = wait("free page reports", Duration::from_secs(120), || {
        let s = ctl(&sock, json!({"balloon_stats": {}}));
        (u(&s, "reported_pages") > 0).then(|| u(&s, "reported_pages"))
    });
    // Reporting goes on in 2 MiB blocks for a while; let it settle, then look at the host.
    std::thread::sleep(Duration::from_secs(5));
    let s = ctl(&sock, json!({"stats": {}}));
    let rss = u(&s, "rss_bytes");
    eprintln!("{test}: {reported}+ pages reported; guest RSS now {} MiB of 256", rss >> 20);
    assert!(rss < 128 << 20, "memory the guest freed at boot went back to the host: rss {rss}");
    assert!(u(&s, "consumed_bytes").abs_diff(rss) < 8 << 20, "the page table agrees with RSS: {s}");
}
