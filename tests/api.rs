//! The control socket against a running VM (the touch payload keeps it busy for a while).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn ask(sock: &Path, req: &str) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn start_vm(test: &str) -> Option<(Running, PathBuf)> {
    if !kvm_or_skip(test) {
        return None;
    }
    let sock = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{test}-{}.sock", std::process::id()));
    let mut vm = Running::start(&[
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
        "loop_ms=8000",
    ]);
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
    let no_balloon = ask(&sock, r#"{"balloon": {"target_mib": 8}}"#);
    assert!(no_balloon["error"].as_str().unwrap().contains("no balloon"), "{no_balloon}");
    assert!(ask(&sock, "not json")["error"].as_str().unwrap().contains("invalid JSON"));
    assert!(ask(&sock, r#"{"reboot": {}}"#)["error"].as_str().unwrap().contains("unknown request"));
    assert!(ask(&sock, r#"{"stats": {}, "balloon": {}}"#)["error"].is_string());
    assert!(ask(&sock, r#"{"balloon": {"target_mib": "lots"}}"#)["error"].is_string());
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
