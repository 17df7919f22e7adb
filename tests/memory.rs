//! KVM tests of the lazy-RAM engine with the `touch` payload: Consumed, RSS, Active, faults,
//! and the engine's bad input.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs touch with `args` plus ebb options `extra`; returns (exit code, stdout, stats lines).
fn touch_with_stats(
    mem: &str,
    touch_args: &[&str],
    extra: &[&str],
) -> (Option<i32>, String, Vec<Value>) {
    let stats = temp_file(&format!("stats-{}.json", touch_args.join("-")), b"");
    let mut argv =
        vec!["run", "--mem", mem, "--firmware", "touch", "--stats-json", stats.to_str().unwrap()];
    argv.extend_from_slice(extra);
    for a in touch_args {
        argv.extend(["--firmware-arg", a]);
    }
    let out = run_ebb(&argv);
    let (stdout, stderr) = text(&out);
    let lines = std::fs::read_to_string(&stats)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e} ({stderr})"))
        })
        .collect();
    (out.status.code(), stdout, lines)
}

fn field(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no integer {k} in {v}"))
}

#[test]
fn a_2_gib_guest_touching_64_mib_consumes_64_mib() {
    if !kvm_or_skip("a_2_gib_guest_touching_64_mib_consumes_64_mib") {
        return;
    }
    let (code, stdout, lines) = touch_with_stats("2G", &["pages=16384"], &[]);
    assert_eq!(code, Some(0), "{stdout}");
    let last = lines.last().unwrap();
    let consumed = field(last, "consumed_bytes");
    let rss = field(last, "rss_bytes");
    let want = 64u64 << 20;
    // ebb itself places the payload, page tables, GDT and TSS in the guest: well under 1 MiB.
    assert!(consumed >= want && consumed < want + want / 10, "consumed {consumed}");
    assert!(rss.abs_diff(consumed) < want / 10, "host RSS {rss} agrees with consumed {consumed}");
    // Fault-around maps most pages ahead of the walk: few faults, every page mapped.
    let mapped = field(last, "faults_copy") + field(last, "fault_around_pages");
    assert!(mapped >= 16384 && field(last, "faults") < 16384 / 16, "{last}");
    for k in
        ["t_ms", "active_bytes", "fault_p50_us", "fault_p99_us", "handler_cpu_ms", "touched_bytes"]
    {
        assert!(last.get(k).is_some(), "stats line has {k}: {last}");
    }
    // 1 byte of page state per 4 KiB page: far below 0.5% of guest RAM.
    assert!(field(last, "metadata_bytes") * 200 < 2 << 30, "{last}");
}

#[test]
fn active_rises_while_touch_loops_and_falls_when_it_idles() {
    if !kvm_or_skip("active_rises_while_touch_loops_and_falls_when_it_idles") {
        return;
    }
    let (code, stdout, lines) = touch_with_stats(
        "1G",
        &["pages=4096", "loop_ms=3000", "idle_ms=4000"],
        &[
            "--stats-interval",
            "0.25",
            "--active-interval-ms",
            "250",
            "--active-sample-pages",
            "200",
        ],
    );
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("bad=0"), "sampling must not lose or corrupt data: {stdout}");
    let last = lines.last().unwrap();
    if field(last, "active_samples") == 0 || field(last, "faults_wp") == 0 {
        eprintln!("\n*** SKIPPED active test: no userfaultfd write protection on this host ***\n");
        return;
    }
    let peak = lines.iter().map(|l| field(l, "active_bytes")).max().unwrap();
    let consumed = field(last, "consumed_bytes");
    assert!(peak * 10 >= consumed * 8, "busy: active {peak} of consumed {consumed}");
    let end = field(last, "active_bytes");
    assert!(end * 4 <= peak, "after 4 s idle Active fell: peak {peak}, end {end}");
}

#[test]
fn fault_around_cuts_the_fault_count() {
    if !kvm_or_skip("fault_around_cuts_the_fault_count") {
        return;
    }
    let (code, stdout, lines) =
        touch_with_stats("256M", &["pages=8192"], &["--fault-around", "15"]);
    assert_eq!(code, Some(0), "{stdout}");
    let last = lines.last().unwrap();
    let faults = field(last, "faults_copy");
    assert!(faults <= 8192 / 16 + 16, "one fault per 16 pages: {faults}");
    assert!(field(last, "fault_around_pages") >= 8192 - faults - 16, "{last}");
}

#[test]
fn no_uffd_runs_on_plain_memory() {
    if !kvm_or_skip("no_uffd_runs_on_plain_memory") {
        return;
    }
    let (code, stdout, lines) = touch_with_stats("256M", &["pages=4096"], &["--no-uffd"]);
    assert_eq!(code, Some(0), "{stdout}");
    let last = lines.last().unwrap();
    assert_eq!(field(last, "faults"), 0);
    assert!(field(last, "rss_bytes") >= 16 << 20, "{last}");
}

#[test]
fn a_guest_touching_beyond_its_ram_reads_ones_and_goes_on() {
    if !kvm_or_skip("a_guest_touching_beyond_its_ram_reads_ones_and_goes_on") {
        return;
    }
    // 256 MiB of RAM; 0x2000_0000 (512 MiB) is mapped by the payload page tables but is no
    // RAM: mov dword [0x20000000], 1; mov eax, [0x20000000]; out 0xf4, eax
    let code = [
        0xc7, 0x04, 0x25, 0x00, 0x00, 0x00, 0x20, 0x01, 0x00, 0x00,
        0x00, // mov dword [abs], 1
        0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x20, // mov eax, [abs]
        0xe7, 0xf4, // out 0xf4, eax
    ];
    let path = temp_file("beyond-ram.elf", &tiny_elf(&code));
    let out = run_ebb(&["run", "--mem", "256M", "--firmware", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0xff),
        "the write was dropped, the read saw all ones: {:?}",
        text(&out)
    );
}

#[test]
fn fault_around_out_of_range_is_refused() {
    let out = run_ebb(&["run", "--fault-around", "256"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: --fault-around 256 is out of range: use auto, or 0 to 255"),
        "{stderr}"
    );
}

#[test]
fn userfaultfd_unavailable_is_a_clear_error() {
    // Simulated the honest way: an unprivileged user, with vm.unprivileged_userfaultfd=0 and a
    // root-only /dev/userfaultfd, is refused both; a KVM node it may open is made for it.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "\n*** SKIPPED userfaultfd_unavailable_is_a_clear_error: needs root to set up ***\n"
        );
        return;
    }
    let sysctl =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if sysctl.trim() != "0" || !kvm_or_skip("userfaultfd_unavailable_is_a_clear_error") {
        eprintln!("\n*** SKIPPED userfaultfd_unavailable_is_a_clear_error: unprivileged userfaultfd allowed ***\n");
        return;
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kvmnode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node = dir.join("kvm");
    let _ = std::fs::remove_file(&node);
    let c_node = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: mknod with a valid path; 10:232 is /dev/kvm's device number.
    let ret =
        unsafe { libc::mknod(c_node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 232)) };
    if ret != 0 {
        eprintln!("\n*** SKIPPED userfaultfd_unavailable_is_a_clear_error: mknod failed ***\n");
        return;
    }
    std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = run_ebb_unprivileged(&["run", "--kvm-device", node.to_str().unwrap()]).unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: userfaultfd is unavailable"), "{stderr}");
    assert!(stderr.contains("--no-uffd"), "says what to do: {stderr}");
    // And --no-uffd does run there.
    let out = run_ebb_unprivileged(&["run", "--no-uffd", "--kvm-device", node.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

/// Starts touch writing 80 MiB in a 256 MiB guest inside a memory cgroup limited to 40 MiB
/// with the OOM killer off (so that the kernel refuses pages, ENOMEM, rather than kill ebb),
/// with `--oom-wait oom_wait` and `extra` options.
fn under_pressure(
    test: &str,
    oom_wait: &str,
    extra: &[&str],
) -> Option<(MemCgroup, std::process::Child)> {
    if !kvm_or_skip(test) {
        return None;
    }
    let cg = MemCgroup::create(test, 40 << 20, false)?;
    let mut argv = vec![env!("CARGO_BIN_EXE_ebb"), "run", "--mem", "256M", "--firmware", "touch"];
    // One page per fault: the handler itself then meets ENOMEM, rather than a large
    // fault-around copy that the kernel stops part way.
    argv.extend(["--firmware-arg", "pages=20000", "--fault-around", "0", "--oom-wait", oom_wait]);
    argv.extend_from_slice(extra);
    let child =
        cg.shell_command(&argv).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    Some((cg, child))
}

/// A guest whose memory cgroup is at its limit: its faults wait, and when the limit is
/// raised the guest goes on and verifies every page.
#[test]
fn guest_faults_wait_out_memory_pressure() {
    let test = "guest_faults_wait_out_memory_pressure";
    let stats = temp_file("pressure.json", b"");
    let extra = ["--stats-json", stats.to_str().unwrap()];
    let Some((cg, mut child)) = under_pressure(test, "120", &extra) else { return };
    let deadline = Instant::now() + Duration::from_secs(60);
    while cg.failcnt() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cg.failcnt() > 0, "the guest never reached the limit");
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "ebb ended under pressure");
    cg.set_limit(1 << 30);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(touch_field(&stdout, "bad").as_deref(), Some("0"), "{stdout}");
    let text = std::fs::read_to_string(&stats).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    // Which of ebb's two waits ran depends on which allocation failed first: the fault
    // handler's UFFDIO_COPY (counted here) or KVM's own page tables (KVM_RUN says EFAULT,
    // and the vCPU waits). Either way the guest went on and lost nothing.
    eprintln!("{test}: fault_no_memory {}", field(&last, "fault_no_memory"));
}

/// The same pressure without relief: after --oom-wait the VM ends with the cause.
#[test]
fn memory_that_never_comes_back_ends_the_vm_with_the_cause() {
    let test = "memory_that_never_comes_back_ends_the_vm";
    let Some((_cg, mut child)) = under_pressure(test, "2", &[]) else { return };
    // Bounded: the handler once deadlocked here (an madvise of guest RAM waiting for its own
    // thread to read the remove event), and a hang must fail the test, not stall CI.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let (_, stderr) = text(&child.wait_with_output().unwrap());
            panic!("ebb still running 60 s after --oom-wait 2 ran out (a hang):\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("out of memory"), "{stderr}");
}
