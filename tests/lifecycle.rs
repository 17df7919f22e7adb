//! VMs created, inspected, stopped and destroyed while `ebb host` runs, through `ebb ctl`,
//! and the host's event log that tells a client what happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ebb, kvm_or_skip, run_ebb, text, Reaped};
use serde_json::Value;

/// `ebb ctl --api-sock SOCK ARGS...`: exit code, stdout, stderr.
fn ctl(sock: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["ctl", "--api-sock", sock];
    all.extend_from_slice(args);
    let out = run_ebb(&all);
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

fn events(sock: &str) -> Vec<Value> {
    let (code, out, err) = ctl(sock, &["events"]);
    assert_eq!(code, Some(0), "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn has(events: &[Value], kind: &str, vm: &str) -> bool {
    events.iter().any(|e| e["event"] == kind && e["vm"] == vm)
}

/// Polls `f` every 100 ms for up to `limit`.
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn vms_come_and_go_through_the_socket_and_the_events_say_so() {
    if !kvm_or_skip("vms_come_and_go_through_the_socket_and_the_events_say_so") {
        return;
    }
    let dir = ebb::host::rundir::PrivateDir::new("ebb-lifecycle-test-").unwrap();
    let sock_path = dir.path().join("host.sock");
    let sock = sock_path.to_str().unwrap().to_owned();
    let mut host = Reaped::new(
        ebb()
            .args([
                "host",
                "--budget",
                "256M",
                "--tick-ms",
                "200",
                "--keep-running",
                "--api-sock",
                &sock,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the host's socket", Duration::from_secs(30), || sock_path.exists());
    let (_, out, _) = ctl(&sock, &["vms"]);
    assert!(out.contains("\"vms\": []"), "a host may start with no VM: {out}");

    let touch = "firmware = \"touch\", firmware_args = [\"pages=2000\", \"loop_ms=600000\"]";
    let a = format!(
        "{{name = \"a\", memory = \"64M\", reservation = \"32M\", {touch}, run = {{zcache_max = \"5%\"}}}}"
    );
    assert_eq!(ctl(&sock, &["create", &a]).0, Some(0));
    let (code, _, err) = ctl(&sock, &["create", &a]);
    assert_eq!(code, Some(1));
    assert!(err.contains("a VM named \"a\" exists"), "{err}");
    // A reservation the budget cannot hold beside a's is refused, with the figures.
    let big = format!("{{name = \"big\", memory = \"512M\", reservation = \"300M\", {touch}}}");
    let (code, _, err) = ctl(&sock, &["create", &big]);
    assert_eq!(code, Some(1));
    assert!(err.contains("big") && err.contains("32 MiB"), "{err}");
    let (code, _, err) =
        ctl(&sock, &["create", "{name = \"x\", memory = \"64M\", colour = \"red\"}"]);
    assert_eq!(code, Some(1), "a table that does not parse is refused before it is sent: {err}");
    assert!(err.contains("colour"), "{err}");
    let b = format!("{{name = \"b\", memory = \"64M\", {touch}}}");
    assert_eq!(ctl(&sock, &["create", &b]).0, Some(0));

    // Both run, and the host reports them.
    wait_until("both VMs in the report", Duration::from_secs(60), || {
        let (_, out, _) = ctl(&sock, &["host-stats"]);
        let r: Value = serde_json::from_str(&out).unwrap();
        r["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["consumed_bytes"].as_u64() > Some(0))
            .count()
            == 2
    });
    let (code, out, err) = ctl(&sock, &["inspect", "a"]);
    assert_eq!(code, Some(0), "{err}");
    let a_info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(a_info["config"]["reservation"], "32M", "{a_info}");
    assert_eq!(a_info["vm"]["running"], true, "{a_info}");
    assert!(a_info["report"]["consumed_bytes"].as_u64() > Some(0), "{a_info}");
    // The host runs each VM with ebb-vm, the binary without the lab's and top's libraries.
    let pid = a_info["vm"]["pid"].as_u64().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("ebb-vm"), "vm a runs {}", exe.display());
    // Its description came as a file, not as flags.
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> =
        argv.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let config = argv.iter().position(|a| a == "--config").map(|i| &argv[i + 1]);
    let config = config.unwrap_or_else(|| panic!("no --config: {argv:?}"));
    assert!(!argv.iter().any(|a| a == "--firmware-arg" || a == "--mem"), "{argv:?}");
    let description = std::fs::read_to_string(config).unwrap();
    assert!(
        description.contains("pages=2000") && description.contains("firmware = \"touch\""),
        "{description}"
    );
    assert!(description.contains("zcache_max = \"5%\""), "the run table reached it: {description}");
    let (code, _, err) = ctl(&sock, &["inspect", "zz"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no VM named \"zz\""), "{err}");

    // Stop: the VM ends and stays listed with how it ended.
    assert_eq!(ctl(&sock, &["stop", "a"]).0, Some(0));
    wait_until("a to end", Duration::from_secs(30), || {
        let (_, out, _) = ctl(&sock, &["inspect", "a"]);
        serde_json::from_str::<Value>(&out).unwrap()["vm"]["running"] == false
    });
    // Destroy: gone from the list, its reservation given back (big's would still not fit
    // beside b's if it were not: 300M is over 256M anyway, so try a 200M one).
    assert_eq!(ctl(&sock, &["destroy", "a"]).0, Some(0));
    let (_, out, _) = ctl(&sock, &["vms"]);
    assert!(!out.contains("\"name\": \"a\"") && out.contains("\"name\": \"b\""), "{out}");
    let c = format!("{{name = \"c\", memory = \"256M\", reservation = \"200M\", {touch}}}");
    assert_eq!(ctl(&sock, &["create", &c]).0, Some(0), "a's 32M reservation was given back");
    assert_eq!(ctl(&sock, &["destroy", "c"]).0, Some(0));
    assert_eq!(ctl(&sock, &["destroy", "b"]).0, Some(0));

    // A budget change is an event too (and answers: it once deadlocked the socket's thread).
    assert_eq!(ctl(&sock, &["budget", "300M"]).0, Some(0));
    let log = events(&sock);
    assert!(
        log.iter().any(|e| e["event"] == "budget" && e["bytes"] == 300 << 20),
        "no budget event: {log:?}"
    );
    for (kind, vm) in [
        ("created", "a"),
        ("started", "a"),
        ("stopping", "a"),
        ("ended", "a"),
        ("destroyed", "a"),
        ("created", "b"),
        ("destroyed", "b"),
    ] {
        assert!(has(&log, kind, vm), "no {kind} event for {vm}: {log:?}");
    }
    let seqs: Vec<u64> = log.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "sequence numbers in order: {seqs:?}");
    let (_, out, _) = ctl(&sock, &["events", "--after", &seqs[seqs.len() - 1].to_string()]);
    assert!(out.trim().is_empty(), "nothing after the last: {out}");

    // With no VM left, the host still runs (--keep-running) until a signal.
    std::thread::sleep(Duration::from_millis(600));
    assert!(host.try_wait().unwrap().is_none(), "the host exited with no VM left");
    // SAFETY: kill only sends a signal to the host this test started.
    unsafe { libc::kill(i32::try_from(host.id()).unwrap(), libc::SIGTERM) };
    assert_eq!(host.wait().unwrap().code(), Some(143));
}
