//! The control socket against a running VM (the touch payload keeps it busy for a while).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn sock_path(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}-{}.sock", std::process::id()))
}

fn start_vm(test: &str) -> Option<(Running, PathBuf)> {
    start_vm_with(test, &[], 8000)
}

/// A VM running touch's loop for `loop_ms` with its socket at `sock_path(test)`, plus `extra`.
fn start_vm_with(test: &str, extra: &[&str], loop_ms: u64) -> Option<(Running, PathBuf)> {
    if !kvm_or_skip(test) {
        return None;
    }
    let sock = sock_path(test);
    let loop_arg = format!("loop_ms={loop_ms}");
    let mut argv = vec![
        "run",
        "--mem",
        "64M",
        "--firmware",
        "touch",
        "--api-sock",
        sock.to_str().unwrap(),
        "--firmware-arg",
        "pages=256",
        "--firmware-arg",
        &loop_arg,
    ];
    argv.extend_from_slice(extra);
    let mut vm = Running::start(&argv);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // touch has written its pages once it starts looping over them.
    assert!(vm.wait_for(&["touch: loop"], Duration::from_secs(20)).is_some(), "{}", vm.tail(5));
    Some((vm, sock))
}

#[test]
fn requests_get_replies_and_bad_ones_get_reasons() {
    let Some((_vm, sock)) = start_vm("requests_get_replies_and_bad_ones_get_reasons") else {
        return;
    };
    let stats = ask(&sock, r#"{"stats": {}}"#);
    assert!(stats["consumed_bytes"].as_u64().unwrap() >= 256 * 4096, "{stats}");
    let no_balloon = ask(&sock, r#"{"balloon": {"target_bytes": 8388608}}"#);
    assert!(no_balloon["error"].as_str().unwrap().contains("no balloon"), "{no_balloon}");
    assert!(ask(&sock, "not json")["error"].as_str().unwrap().contains("invalid JSON"));
    assert!(ask(&sock, r#"{"reboot": {}}"#)["error"].as_str().unwrap().contains("unknown request"));
    assert!(ask(&sock, r#"{"stats": {}, "balloon": {}}"#)["error"].is_string());
    assert!(ask(&sock, r#"{"balloon": {"target_bytes": "lots"}}"#)["error"].is_string());
    // The sharing lever: a rate, off, or a reason (unavailable on kernels that cannot share).
    let rate = ask(&sock, r#"{"sharing": {"scan_rate": 5000}}"#);
    if rate["ok"] == true {
        assert_eq!(ask(&sock, r#"{"stats": {}}"#)["share_scan_rate"], 5000);
        assert_eq!(ask(&sock, r#"{"sharing": {"scan_rate": 0}}"#)["ok"], true);
        assert_eq!(ask(&sock, r#"{"stats": {}}"#)["share_scan_rate"], 0);
        let bad = ask(&sock, r#"{"sharing": {"scan_rate": 99999999}}"#);
        assert!(bad["error"].as_str().unwrap().contains("pages per second"), "{bad}");
        let bad = ask(&sock, r#"{"sharing": {"rate": 5}}"#);
        assert!(bad["error"].as_str().unwrap().contains("scan_rate"), "the field it wants: {bad}");
        let ctl =
            |arg: &str| run_ebb(&["ctl", "--api-sock", sock.to_str().unwrap(), "sharing", arg]);
        assert_eq!(ctl("2000").status.code(), Some(0));
        assert_eq!(ask(&sock, r#"{"stats": {}}"#)["share_scan_rate"], 2000);
        assert_eq!(ctl("off").status.code(), Some(0));
        let out = ctl("lots");
        assert_eq!(out.status.code(), Some(1), "refused before it is sent");
        assert!(text(&out).1.contains("not a number of pages per second"), "{:?}", text(&out));
    } else {
        assert!(rate["error"].as_str().unwrap().contains("unavailable"), "{rate}");
    }
}

#[test]
fn a_client_that_never_reads_does_not_stall_the_others() {
    let Some((_vm, sock)) = start_vm("a_client_that_never_reads_does_not_stall_the_others") else {
        return;
    };
    // Fill the socket buffers: many requests, no reads.
    let mut greedy = UnixStream::connect(&sock).unwrap();
    greedy.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let burst = r#"{"stats": {}}"#.to_owned() + "\n";
    for _ in 0..20_000 {
        if greedy.write_all(burst.as_bytes()).is_err() {
            break;
        }
    }
    let t = Instant::now();
    let reply = ask(&sock, r#"{"stats": {}}"#);
    assert!(reply["t_ms"].is_u64(), "{reply}");
    assert!(t.elapsed() < Duration::from_secs(4), "answered while the greedy client is dropped");
    drop(greedy);
}

#[test]
fn a_second_vm_cannot_take_over_a_live_socket_and_a_stale_one_is_reused() {
    let test = "a_second_vm_cannot_take_over_a_live_socket";
    let Some((mut first, sock)) = start_vm(test) else { return };
    let out = run_ebb(&["run", "--mem", "64M", "--api-sock", sock.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("answers on"), "{stderr}");
    assert!(ask(&sock, r#"{"stats": {}}"#)["t_ms"].is_u64(), "the first VM still answers");
    // A socket left behind by a VM that died is reused, and removed at exit.
    first.kill();
    assert!(sock.exists(), "SIGKILL leaves the socket file behind");
    let out = run_ebb(&["run", "--mem", "64M", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(!sock.exists(), "removed at exit");
}

#[test]
fn a_vm_never_removes_a_socket_it_did_not_create() {
    let test = "a_vm_never_removes_a_socket_it_did_not_create";
    let Some((mut first, sock)) = start_vm_with(test, &[], 1500) else { return };
    // Someone replaces the file while the VM runs; at exit the VM leaves the new one alone.
    std::fs::remove_file(&sock).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert_eq!(first.wait_exit(Duration::from_secs(30)), Some(0), "{}", first.tail(5));
    assert!(sock.exists(), "the other socket is still there");
    drop(other);
}

#[test]
fn the_socket_is_private_whatever_the_umask() {
    let test = "the_socket_is_private_whatever_the_umask";
    if !kvm_or_skip(test) {
        return;
    }
    let sock = sock_path(test);
    let script = format!(
        "umask 000; exec {} run --mem 64M --firmware touch --firmware-arg pages=16 --firmware-arg loop_ms=3000 --api-sock {}",
        env!("CARGO_BIN_EXE_ebb"),
        sock.display()
    );
    let mut child = std::process::Command::new("sh").args(["-c", &script]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

#[test]
fn an_oversized_request_line_is_refused_as_it_arrives() {
    let Some((_vm, sock)) = start_vm("an_oversized_request_line_is_refused") else { return };
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // No newline at all: ebb must not wait for one.
    let _ = s.write_all(&vec![b'x'; 1 << 20]);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).unwrap();
    assert!(line.contains("request line too long"), "{line}");
}

/// Hundreds of careless or hostile clients at once: pipelining without reading, reading
/// slowly, oversized lines, garbage, idle connections beyond the cap. A well-behaved client is
/// answered within 100 ms (p99), and the statistics line keeps its interval.
#[test]
fn hostile_clients_delay_neither_a_good_client_nor_the_stats_line() {
    let test = "hostile_clients_delay_neither";
    let stats = temp_file("hostile-stats.json", b"");
    let extra = ["--stats-json", stats.to_str().unwrap(), "--stats-interval", "0.2"];
    let Some((_vm, sock)) = start_vm_with(test, &extra, 20_000) else { return };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hostile = Vec::new();
    let spawn = |f: Box<dyn Fn(&Path) + Send>, sock: &Path| {
        let (sock, stop) = (sock.to_owned(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f(&sock);
            }
        })
    };
    // Pipeliners that never read: fill what the socket takes, then sit there.
    for _ in 0..40 {
        hostile.push(spawn(
            Box::new(|sock: &Path| {
                let Ok(mut s) = UnixStream::connect(sock) else { return };
                s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
                let burst = r#"{"stats": {}}"#.to_owned() + "\n";
                for _ in 0..5000 {
                    if s.write_all(burst.as_bytes()).is_err() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_secs(2));
            }),
            &sock,
        ));
    }
    // Slow readers: pipeline, then read 2 KiB every 0.7 s.
    for _ in 0..10 {
        hostile.push(spawn(
            Box::new(|sock: &Path| {
                let Ok(mut s) = UnixStream::connect(sock) else { return };
                s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                for _ in 0..200 {
                    let _ = s.write_all(b"{\"balloon_stats\": {}}\n");
                }
                let mut buf = [0u8; 2048];
                for _ in 0..4 {
                    if std::io::Read::read(&mut s, &mut buf).unwrap_or(0) == 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(700));
                }
            }),
            &sock,
        ));
    }
    // Oversized lines and garbage.
    for k in 0..10u8 {
        hostile.push(spawn(
            Box::new(move |sock: &Path| {
                let Ok(mut s) = UnixStream::connect(sock) else { return };
                s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
                let junk: Vec<u8> = if k % 2 == 0 {
                    vec![b'{'; 100_000]
                } else {
                    (0..20_000u32).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect()
                };
                let _ = s.write_all(&junk);
                std::thread::sleep(Duration::from_millis(50));
            }),
            &sock,
        ));
    }
    // Idle connections, more than the server keeps.
    let idle: Vec<UnixStream> = (0..150).filter_map(|_| UnixStream::connect(&sock).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut latencies = Vec::new();
    let attack_start = Instant::now();
    for _ in 0..200 {
        let t = Instant::now();
        let reply = ask(&sock, r#"{"stats": {}}"#);
        latencies.push(t.elapsed());
        assert!(reply["t_ms"].is_u64(), "{reply}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let attack = attack_start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(idle);
    hostile.into_iter().for_each(|h| h.join().unwrap());
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "{test}: good client p50 {:?} p99 {p99:?} over {attack:?}",
        latencies[latencies.len() / 2]
    );
    // A hostile client that could hold the loop up would cost the good one 500 ms (the
    // hostile write timeouts) or seconds; a busy 2-core machine alone costs it 100 ms now and
    // then (seen: 120 ms, with a leftover guest running beside the suite).
    assert!(p99 < Duration::from_millis(250), "p99 {p99:?}");
    let times: Vec<u64> = std::fs::read_to_string(&stats)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["t_ms"].as_u64().unwrap())
        .collect();
    let worst_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(times.len() >= 10, "{times:?}");
    assert!(worst_gap <= 200 + 150, "the 0.2 s statistics line waited {worst_gap} ms: {times:?}");
}

#[test]
fn sigint_and_sigterm_stop_the_vm_cleanly() {
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let test = format!("sigint_and_sigterm_stop_the_vm_cleanly-{signal}");
        let stats = temp_file(&format!("{test}.json"), b"");
        let extra = ["--stats-json", stats.to_str().unwrap(), "--stats-interval", "10"];
        let Some((mut vm, sock)) = start_vm_with(&test, &extra, 60_000) else { return };
        let t = Instant::now();
        vm.signal(signal);
        assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(status), "{}", vm.tail(5));
        assert!(t.elapsed() < Duration::from_secs(3), "stopped in {:?}", t.elapsed());
        assert!(!sock.exists(), "the control socket is removed");
        let text = std::fs::read_to_string(&stats).unwrap();
        let last: Value =
            serde_json::from_str(text.lines().last().expect("a final stats line")).unwrap();
        assert!(last["consumed_bytes"].as_u64().unwrap() >= 256 * 4096, "{last}");
    }
}
