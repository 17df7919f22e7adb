//! SMP guests (`--vcpus N`): the `touch` payload on every vCPU at once, each writing and
//! verifying its share of the pages (and, with `cross=1`, the others' shares too), so that
//! the memory engine serves faults, restores and copy-on-write breaks from several threads
//! at the same time; a stop signal with every vCPU busy. (Linux on 2 and 4 CPUs:
//! tests/linux.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A scratch directory under the target directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("smp-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs touch on `vcpus` vCPUs with `args` and extra ebb options `extra`.
fn touch(vcpus: u8, mem: &str, args: &[&str], extra: &[&str]) -> (Option<i32>, String, String) {
    let n = vcpus.to_string();
    let mut argv = vec!["run", "--mem", mem, "--vcpus", &n, "--firmware", "touch"];
    argv.extend(extra);
    for a in args {
        argv.extend(["--firmware-arg", a]);
    }
    let out = run_ebb(&argv);
    let (stdout, stderr) = text(&out);
    (out.status.code(), stdout, stderr)
}

fn expect_good(stdout: &str, pattern: &str, pages: u64, passes: u64, seed: u64, cpus: u64) {
    let want = format!("{:#018x}", touch_checksum_smp(pattern, pages, passes, seed, cpus));
    assert_eq!(touch_field(stdout, "checksum").as_deref(), Some(want.as_str()), "{stdout}");
    assert_eq!(touch_field(stdout, "bad").as_deref(), Some("0"), "{stdout}");
    assert_eq!(touch_field(stdout, "cpus"), Some(cpus.to_string()), "{stdout}");
}

fn stats_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn every_vcpu_writes_and_verifies_its_share_and_the_others() {
    if !kvm_or_skip("every_vcpu_writes_and_verifies_its_share_and_the_others") {
        return;
    }
    // 3001 pages: shares of unequal size; random order: scattered faults from every vCPU.
    for vcpus in [2u8, 3, 4, 8] {
        for (cross, order) in [("0", "seq"), ("1", "random")] {
            let (cross_arg, order_arg) = (format!("cross={cross}"), format!("order={order}"));
            let args =
                ["pages=3001", "passes=3", "seed=0x5eed", "pattern=random", &cross_arg, &order_arg];
            let (code, stdout, stderr) = touch(vcpus, "64M", &args, &[]);
            let what = format!("{vcpus} vCPUs, cross={cross}, order={order}");
            assert_eq!(code, Some(0), "{what}: {stdout}{stderr}");
            expect_good(&stdout, "random", 3001, 3, 0x5eed, u64::from(vcpus));
            assert_eq!(touch_field(&stdout, "cross").as_deref(), Some(cross), "{stdout}");
        }
    }
    // The checker still checks: a page flipped in every share is found by whoever verifies it.
    let (code, stdout, _) = touch(3, "64M", &["pages=3000", "corrupt=1500", "cross=1"], &[]);
    assert_eq!(code, Some(3), "{stdout}");
    assert_eq!(touch_field(&stdout, "bad").as_deref(), Some("1500"), "{stdout}");
}

#[test]
fn payloads_that_use_one_vcpu_run_on_many() {
    if !kvm_or_skip("payloads_that_use_one_vcpu_run_on_many") {
        return;
    }
    let out = run_ebb(&["run", "--vcpus", "4"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "Hello from ebb firmware at CPL3\n");
    assert!(stderr.contains("4 vCPUs"), "{stderr}");
}

#[test]
fn four_vcpus_fault_restore_and_break_shares_at_once_and_every_page_reads_back() {
    let test = "four_vcpus_fault_restore_and_break_shares_at_once_and_every_page_reads_back";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = Scratch::new("engine");
    // dup: every page identical, so sharing merges them and every pass breaks the shares
    // from four vCPUs; random: incompressible, so reclaim swaps. The loop then brings evicted
    // pages back from four vCPUs at once.
    for pattern in ["dup", "random"] {
        let stats = dir.join(&format!("{pattern}.jsonl"));
        let pattern_arg = format!("pattern={pattern}");
        let args = [
            "pages=8192",
            "passes=3",
            "cross=1",
            "order=random",
            "loop_ms=1500",
            "dist=uniform",
            &pattern_arg,
        ];
        let extra = [
            "--reclaim-target",
            "8M",
            "--share-scan-rate",
            "100000",
            "--swap-dir",
            dir.0.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
            "--stats-interval",
            "0.2",
        ];
        let (code, stdout, stderr) = touch(4, "64M", &args, &extra);
        assert_eq!(code, Some(0), "{pattern}: {stdout}{stderr}");
        expect_good(&stdout, pattern, 8192, 3, 0, 4);
        let last = stats_lines(&stats).pop().unwrap_or_else(|| panic!("no stats: {stderr}"));
        assert!(num(&last, "evictions") > 0, "{pattern}: reclaim evicted nothing: {last}");
        let swapins = num(&last, "swapins_zcache") + num(&last, "swapins_swap");
        assert!(swapins > 0, "{pattern}: nothing came back from the stores: {last}");
        // Each vCPU's faults are counted apart, with the time they waited.
        let per_vcpu = |k: &str| -> Vec<u64> {
            last[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
        };
        let (faults, waits) = (per_vcpu("vcpu_faults"), per_vcpu("vcpu_fault_wait_us"));
        assert_eq!(faults.len(), 4, "{last}");
        assert!(faults.iter().all(|&f| f > 0) && waits.iter().all(|&w| w > 0), "{last}");
        if pattern == "dup" {
            assert!(num(&last, "share_merged") > 0, "nothing was shared: {last}");
            assert!(num(&last, "cow_breaks") > 0, "no shared page was broken: {last}");
        }
    }
}

#[test]
fn a_stop_signal_stops_four_busy_vcpus_and_the_last_stats_line_is_written() {
    let test = "a_stop_signal_stops_four_busy_vcpus_and_the_last_stats_line_is_written";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = Scratch::new("signal");
    let stats = dir.join("stats.jsonl");
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let _ = std::fs::remove_file(&stats);
        let mut vm = Running::start(&[
            "run",
            "--vcpus",
            "4",
            "--mem",
            "64M",
            "--firmware",
            "touch",
            "--firmware-arg",
            "pages=4096",
            "--firmware-arg",
            "loop_ms=600000",
            "--stats-json",
            stats.to_str().unwrap(),
            "--stats-interval",
            "60",
        ]);
        assert!(
            vm.wait_for(&["touch: loop"], Duration::from_secs(60)).is_some(),
            "{}",
            vm.tail(20)
        );
        // Every vCPU is in the loop now (a barrier precedes it); let them spin a while.
        std::thread::sleep(Duration::from_millis(300));
        vm.signal(signal);
        let code = vm.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(128 + signal), "signal {signal}: {}", vm.tail(20));
        // With a 60 s interval, a line written before a minute has passed is the one written
        // as the VM stopped, after the loop had made progress.
        let last =
            stats_lines(&stats).pop().unwrap_or_else(|| panic!("signal {signal}: no stats line"));
        assert!(num(&last, "t_ms") < 60_000, "signal {signal}: {last}");
        let progress = num(&last, "guest_progress");
        assert!(progress > 4096, "signal {signal}: the loop made no progress: {progress}");
    }
}
