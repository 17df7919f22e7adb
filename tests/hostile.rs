//! A hostile guest on KVM: the `hostile` payload drives the balloon through virtio-mmio with
//! floods, huge and looping chains, bad indices and PFNs, resets in a loop, and writes to
//! pages it gave away. The VM survives, the log stays short, the control socket answers
//! all along, every mistake is counted, and the balloon's numbers come out exact.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// One request on a fresh connection; the reply and how long it took, or None if no VM
/// answers (yet, or any more).
fn ask(sock: &Path, req: &str) -> Option<(Value, Duration)> {
    let t = Instant::now();
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("{req}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some((serde_json::from_str(&line).ok()?, t.elapsed()))
}

#[test]
fn a_hostile_guest_changes_nothing_it_should_not() {
    let test = "a_hostile_guest_changes_nothing_it_should_not";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let sock = dir.join(format!("{test}-{}.sock", std::process::id()));
    let stats = temp_file("hostile-stats.json", b"");
    let (rounds, final_pages) = (400u64, 512u64);
    let child = ebb()
        .args(["run", "--mem", "64M", "--firmware", "hostile", "--balloon"])
        .args(["--api-sock", sock.to_str().unwrap(), "--stats-json", stats.to_str().unwrap()])
        .args(["--firmware-arg", &format!("rounds={rounds}")])
        .args(["--firmware-arg", &format!("final={final_pages}")])
        .args(["--firmware-arg", "idle_ms=2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A well-behaved client asks all along; the last balloon_stats it got is from the idle
    // phase after the attack.
    let done = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<(Vec<Duration>, Option<Value>)>> = Arc::default();
    let client = {
        let (done, seen, sock) = (done.clone(), seen.clone(), sock.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some((_, took)) = ask(&sock, r#"{"stats": {}}"#) {
                    seen.lock().unwrap().0.push(took);
                }
                if let Some((reply, _)) = ask(&sock, r#"{"balloon_stats": {}}"#) {
                    seen.lock().unwrap().1 = Some(reply);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("hostile: done rounds={rounds} final={final_pages} bad=0")),
        "{stdout}"
    );
    let lines = stderr.lines().count();
    assert!(lines < 30, "{rounds} rounds of mistakes logged {lines} lines:\n{stderr}");
    // The balloon ends with exactly the pages the guest left in it.
    let text = std::fs::read_to_string(&stats).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["ballooned_bytes"].as_u64(), Some(final_pages * 4096), "{last}");
    // Every kind of mistake was counted.
    let (latencies, balloon) = std::mem::take(&mut *seen.lock().unwrap());
    let balloon = balloon.expect("balloon_stats answered");
    let g = &balloon["guest_errors"];
    let t = &balloon["transport_errors"];
    for (what, v) in [
        ("bad_pfns", &g["bad_pfns"]),
        ("bad_descriptors", &g["bad_descriptors"]),
        ("bad_config_writes", &g["bad_config_writes"]),
        ("transport bad_notifies", &t["bad_notifies"]),
    ] {
        assert!(v.as_u64().unwrap() >= rounds, "{what} {v}: {balloon}");
    }
    assert!(t["bad_queue_config"].as_u64().unwrap() >= 20_000, "{balloon}");
    assert_eq!(balloon["activations"].as_u64(), Some(rounds + 1), "{balloon}");
    // The socket answered all along.
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!("{test}: {} stats replies during the attack, worst {worst:?}", latencies.len());
    assert!(latencies.len() >= 10, "the socket answered during the attack");
    assert!(worst < Duration::from_secs(1), "a stats reply took {worst:?}");
}
