//! A host no VM can stall or fool: fake VMs (a shell script for the process, a thread of
//! this test serving its control socket the way `ebb run` does) that trickle replies, never
//! answer, never bring their socket up, report absurd figures, send a 100 MB reply or
//! under-report what they hold. The real supervisor polls them; the well-behaved VMs must
//! still get their levers within one tick, and the host must neither panic nor miscount.
//!
//! No `/dev/kvm` is needed: no guest runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ebb::host::config::{HostConfig, HostOverrides};
use ebb::host::rundir::PrivateDir;
use ebb::host::supervisor::Supervisor;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// The tests here time ticks: one at a time on a 2-core box.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
/// The host's tick in these tests.
const TICK_MS: u64 = 1000;
/// How long the good VMs may wait for their levers: three ticks, for a loaded 2-core box.
const LEVERS_WITHIN: Duration = Duration::from_secs(3);

/// The fake `ebb run`: it ignores its options but `--api-sock`; a VM whose socket is named
/// `under.sock` holds 64 MiB (a shell variable) while it reports nothing; a VM whose socket
/// is named `*dump*` writes the list of its descriptors beside its socket and exits.
const FAKE_RUN: &str = r#"#!/bin/sh
sock=
while [ $# -gt 0 ]; do
  if [ "$1" = --api-sock ]; then sock=$2; fi
  shift
done
case "$sock" in
  *dump*) ls -l /proc/$$/fd > "$sock.fds"; exit 0 ;;
  */under.sock) x=$(head -c 67108864 /dev/zero | tr '\000' a) ;;
esac
# Short sleeps: a killed shell leaves its sleep behind for at most a second.
while :; do sleep 1; done
"#;

/// How a fake VM answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fake {
    /// Small, true figures; `{"ok": true}` to every lever.
    Good,
    /// Every reply a byte at a time, 300 ms apart, for ever (a line of spaces).
    Trickle,
    /// Reads, never answers.
    Silent,
    /// u64::MAX figures, and times at the ends of f64.
    Absurd,
    /// Statistics of the wrong types: negative and fractional counts, a field missing.
    Malformed,
    /// A 100 MB reply line to `stats`.
    Huge,
    /// Reports nothing held (its process holds 64 MiB).
    Under,
}

/// The requests a fake VM received, each with when.
type Log = Arc<Mutex<Vec<(Instant, Value)>>>;

/// A whole `stats` reply with `figures` set.
fn stats_with(figures: &Value) -> String {
    let mut stats = serde_json::to_value(ebb::mm::stats::MemStats::default()).unwrap();
    for (k, v) in figures.as_object().unwrap() {
        stats[k] = v.clone();
    }
    stats.to_string()
}

fn stats_reply(kind: Fake) -> String {
    match kind {
        Fake::Absurd => stats_with(&json!({
            "consumed_bytes": u64::MAX, "metadata_bytes": u64::MAX, "resident_bytes": u64::MAX,
            "active_bytes": u64::MAX, "shared_bytes": u64::MAX, "ballooned_bytes": u64::MAX,
            "zcache_pages": u64::MAX, "swapped_bytes": u64::MAX, "faults": u64::MAX,
            "refaults": u64::MAX, "alloc_waits": u64::MAX, "handler_cpu_ms": 1e308,
            "reclaim_cpu_ms": 1e308, "sharing_cpu_ms": -1e308, "sharing_saved_bytes": u64::MAX,
            "zero_pages_shared": u64::MAX, "guest_progress": u64::MAX,
        })),
        Fake::Malformed => {
            let mut v: Value = serde_json::from_str(&stats_with(&json!({
                "consumed_bytes": 10 * MIB, "shared_bytes": -5, "ballooned_bytes": 1e300,
                "active_bytes": 1.5,
            })))
            .unwrap();
            v.as_object_mut().unwrap().remove("resident_bytes");
            v.to_string()
        }
        Fake::Under => stats_with(&json!({ "consumed_bytes": 0, "resident_bytes": 0 })),
        _ => stats_with(&json!({ "consumed_bytes": 10 * MIB, "resident_bytes": 10 * MIB })),
    }
}

fn serve_conn(mut conn: UnixStream, kind: Fake, log: &Log) {
    let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        log.lock().unwrap().push((Instant::now(), req.clone()));
        let is_stats = req.get("stats").is_some();
        let reply = match kind {
            Fake::Silent => {
                std::thread::sleep(Duration::from_secs(3600));
                return;
            }
            Fake::Trickle => loop {
                if conn.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            },
            Fake::Huge if is_stats => {
                let pad = "a".repeat(100 << 20);
                format!("{{\"consumed_bytes\":1,\"pad\":\"{pad}\"}}")
            }
            _ if is_stats => stats_reply(kind),
            _ if req.get("balloon_stats").is_some() => json!({ "driver_ready": false }).to_string(),
            _ => json!({ "ok": true }).to_string(),
        };
        if conn.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// Serves `sock` as a `kind` VM on threads of this test; returns what it was asked.
fn fake_vm(sock: &Path, kind: Fake) -> Log {
    let listener = UnixListener::bind(sock).unwrap();
    let log: Log = Arc::default();
    let served = Arc::clone(&log);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let log = Arc::clone(&served);
            std::thread::spawn(move || serve_conn(conn, kind, &log));
        }
    });
    log
}

/// A run directory, the fake `ebb run` in it, and a host description of `vms`.
struct Setup {
    dir: PrivateDir,
    exe: PathBuf,
    config: HostConfig,
}

fn setup(vms: &[(&str, &str)]) -> Setup {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = PrivateDir::new("ebb-stall-test-").unwrap();
    let exe = dir.path().join("fake-run");
    std::fs::write(&exe, FAKE_RUN).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut toml = format!("budget = \"1G\"\ntick_ms = {TICK_MS}\npolicy = \"esx\"\n");
    for (name, extra) in vms {
        toml += &format!(
            "[[vm]]\nname = \"{name}\"\nmemory = \"64M\"\nfirmware = \"touch\"\n{extra}\n"
        );
    }
    let path = dir.path().join("host.toml");
    std::fs::write(&path, toml).unwrap();
    let config = HostConfig::load(Some(&path), &HostOverrides::default()).unwrap();
    Setup { dir, exe, config }
}

/// What the supervisor's thread tells the test.
enum Event {
    /// A tick begins.
    TickStart(Instant),
    /// A tick ended: its report, as JSON.
    Report(Value),
}

/// Starts the supervisor of `s` on a thread of its own (a stalled host must not stall the
/// test) and runs `ticks` ticks, a tick apart.
fn run_host(s: &Setup, ticks: usize) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    let (config, exe, dir) = (s.config.clone(), s.exe.clone(), s.dir.path().to_owned());
    std::thread::spawn(move || {
        let policy = ebb::host::policy::by_name("esx", config.params).unwrap();
        let mut sup = Supervisor::start(&config, &exe, &dir, policy, None, false).unwrap();
        for _ in 0..ticks {
            let _ = tx.send(Event::TickStart(Instant::now()));
            let report = sup.tick_once();
            let _ = tx.send(Event::Report(serde_json::to_value(&report).unwrap()));
            std::thread::sleep(Duration::from_millis(TICK_MS));
        }
    });
    rx
}

/// The next report, failing if the host's thread ended (it panicked) or took too long.
fn next_report(rx: &mpsc::Receiver<Event>, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let left = within.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Event::Report(r)) => return r,
            Ok(Event::TickStart(_)) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("a tick took more than {within:?}: one VM stalls the host")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the host's thread ended before its report: it panicked")
            }
        }
    }
}

fn next_tick_start(rx: &mpsc::Receiver<Event>) -> Instant {
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Event::TickStart(t)) => t,
        Ok(Event::Report(_)) => panic!("a report before its tick began"),
        Err(e) => panic!("no tick began: {e}"),
    }
}

/// When `log` first received a lever request (one that is neither `stats` nor
/// `balloon_stats`).
fn first_lever(log: &Log) -> Option<Instant> {
    let log = log.lock().unwrap();
    log.iter()
        .find(|(_, r)| r.get("stats").is_none() && r.get("balloon_stats").is_none())
        .map(|(t, _)| *t)
}

/// Waits until every log in `logs` has a lever request, at most `LEVERS_WITHIN` after
/// `since`.
fn assert_levers_arrive(logs: &[(&str, &Log)], since: Instant) {
    while since.elapsed() < LEVERS_WITHIN {
        if logs.iter().all(|(_, l)| first_lever(l).is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, log) in logs {
        let at = first_lever(log).map(|t| t.duration_since(since));
        assert!(
            at.is_some_and(|d| d < LEVERS_WITHIN),
            "vm {name}: no lever within {LEVERS_WITHIN:?} of the tick's start ({at:?})"
        );
    }
}

fn vm<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["vms"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn a_trickling_a_silent_and_a_late_vm_leave_the_others_their_levers_within_the_tick() {
    let _serial = serial();
    let s = setup(&[
        ("good1", ""),
        ("trickle", ""),
        ("silent", ""),
        ("good2", ""),
        ("late", "start_after_ms = 1"), // its socket never comes up
    ]);
    let sock = |n: &str| s.dir.path().join(format!("{n}.sock"));
    let good1 = fake_vm(&sock("good1"), Fake::Good);
    let good2 = fake_vm(&sock("good2"), Fake::Good);
    let trickle = fake_vm(&sock("trickle"), Fake::Trickle);
    let _silent = fake_vm(&sock("silent"), Fake::Silent);
    let rx = run_host(&s, 3);
    let t0 = next_tick_start(&rx);
    assert_levers_arrive(&[("good1", &good1), ("good2", &good2)], t0);
    let r1 = next_report(&rx, LEVERS_WITHIN);
    let asked_before = trickle.lock().unwrap().len();
    for name in ["trickle", "silent"] {
        assert_eq!(vm(&r1, name)["stale"], true, "{name} is not marked stale: {r1}");
    }
    // Backed off: the next tick does not wait for them again.
    let t1 = next_tick_start(&rx);
    let r2 = next_report(&rx, LEVERS_WITHIN);
    assert!(t1.elapsed() < Duration::from_millis(TICK_MS), "the second tick waited again");
    assert_eq!(trickle.lock().unwrap().len(), asked_before, "a stale VM was asked at once");
    assert_eq!(vm(&r2, "good1")["stale"], false, "{r2}");
    assert_eq!(vm(&r2, "late")["running"], true, "the late VM is still waited for: {r2}");
}

#[test]
fn absurd_figures_and_a_huge_reply_are_clamped_and_refused_and_nothing_panics() {
    let _serial = serial();
    let s = setup(&[("good", ""), ("absurd", ""), ("huge", ""), ("malformed", "")]);
    let sock = |n: &str| s.dir.path().join(format!("{n}.sock"));
    let good = fake_vm(&sock("good"), Fake::Good);
    let _absurd = fake_vm(&sock("absurd"), Fake::Absurd);
    let _huge = fake_vm(&sock("huge"), Fake::Huge);
    let _malformed = fake_vm(&sock("malformed"), Fake::Malformed);
    let rx = run_host(&s, 2);
    let t0 = next_tick_start(&rx);
    assert_levers_arrive(&[("good", &good)], t0);
    next_report(&rx, LEVERS_WITHIN);
    let r = next_report(&rx, LEVERS_WITHIN + Duration::from_millis(TICK_MS));
    let (g, a, h) = (vm(&r, "good"), vm(&r, "absurd"), vm(&r, "huge"));
    assert_eq!(u(g, "consumed_bytes"), 10 * MIB, "{r}");
    // What a 64 MiB VM could hold at most: its memory and the stated overhead.
    let most = ebb::host::figures::most_consumed_bytes(64 * MIB);
    assert_eq!(u(a, "consumed_bytes"), most, "{r}");
    for key in ["resident_bytes", "active_bytes", "compressed_bytes", "swapped_bytes"] {
        assert!(u(a, key) <= 64 * MIB, "{key}: {r}");
    }
    assert!(a["memory_cpu_ms"].as_f64().unwrap().is_finite(), "{r}");
    assert_eq!(h["stale"], true, "a 100 MB reply was taken: {r}");
    // Negative or fractional counts and a missing field are not statistics: not read as 0.
    let m = vm(&r, "malformed");
    assert_eq!(m["stale"], true, "malformed statistics were taken: {r}");
    assert!(u(m, "consumed_bytes") < 10 * MIB, "its report was read: {r}");
    assert!(u(h, "consumed_bytes") < 64 * MIB, "{r}");
    let used: u64 = [g, a, h, m].iter().map(|v| u(v, "consumed_bytes")).sum();
    let free = r["free_bytes"].as_i64().unwrap();
    assert!(free <= i64::try_from(u(&r, "budget_bytes") - used).unwrap(), "miscounted: {r}");
}

#[test]
fn a_vm_that_under_reports_is_counted_at_what_it_holds() {
    let _serial = serial();
    let s = setup(&[("good", ""), ("under", "")]);
    let sock = |n: &str| s.dir.path().join(format!("{n}.sock"));
    let _good = fake_vm(&sock("good"), Fake::Good);
    let _under = fake_vm(&sock("under"), Fake::Under);
    // The fake fills its 64 MiB in well under a second; a few ticks leave room.
    let rx = run_host(&s, 4);
    let mut last = Value::Null;
    for _ in 0..4 {
        last = next_report(&rx, Duration::from_secs(10));
        if u(vm(&last, "under"), "consumed_bytes") >= 48 * MIB {
            break;
        }
    }
    let under = u(vm(&last, "under"), "consumed_bytes");
    // Less what any VM process may hold for itself, beyond its report.
    let floor = 64 * MIB - ebb::host::figures::PROCESS_ALLOWANCE_BYTES;
    assert!(under >= floor, "a VM holding 64 MiB is counted at {} MiB: {last}", under >> 20);
}

#[test]
fn vms_inherit_no_eventfd_of_the_host() {
    let _serial = serial();
    let s = setup(&[("dump1", ""), ("dump2", "start_after_ms = 300")]);
    let sock = |n: &str| s.dir.path().join(format!("{n}.sock"));
    // The fakes dump their descriptors and exit; their sockets need only be there.
    let _l1 = UnixListener::bind(sock("dump1")).unwrap();
    let _l2 = UnixListener::bind(sock("dump2")).unwrap();
    let opts = ebb::host::HostOptions {
        config: s.config.clone(),
        exe: s.exe.clone(),
        api_sock: Some(s.dir.path().join("host.sock")),
        stats_json: None,
        run_dir: Some(s.dir.path().to_owned()),
        metrics_addr: None,
        keep_running: false,
        state_dir: None,
        vms_die_with_host: false,
    };
    let outcome = ebb::host::run(&opts).unwrap();
    assert_eq!(outcome.exit_status(), 0, "{outcome:?}");
    for name in ["dump1", "dump2"] {
        let fds = std::fs::read_to_string(s.dir.path().join(format!("{name}.sock.fds"))).unwrap();
        assert!(!fds.contains("eventfd"), "vm {name} inherited an eventfd:\n{fds}");
    }
}
