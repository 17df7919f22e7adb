//! `ebb host` as a service: Prometheus text scraped over HTTP (`--metrics-addr`) and judged
//! by `promtool check metrics`, `/healthz`, and systemd's notifications (`READY=1`,
//! `STATUS=`, `WATCHDOG=1`, `STOPPING=1`) received on a socket this test listens on, as
//! systemd would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `GET path` over HTTP/1.1: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if path == "/metrics" {
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    }
    (code, body.to_owned())
}

/// Reads `child`'s stderr until a line says `... metrics on http://ADDR/metrics`; ADDR. The
/// rest of its stderr is drained on a thread, so that the child never blocks on the pipe.
fn metrics_address(child: &mut std::process::Child) -> String {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some((_, rest)) = line.trim().split_once("metrics on http://") {
            let addr = rest.trim_end_matches("/metrics").to_owned();
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return addr;
        }
        line.clear();
    }
    panic!("it never said where its metrics are");
}

/// `promtool check metrics` on `text`: None when promtool is not installed.
fn promtool(text: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return None,
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), said))
}

#[test]
fn a_host_serves_metrics_over_http_and_tells_systemd_how_it_is() {
    let test = "a_host_serves_metrics_over_http_and_tells_systemd_how_it_is";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = ebb::host::rundir::PrivateDir::new("ebb-service-test-").unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let vm = |name: &str| {
        format!("--vm={{name = \"{name}\", memory = \"64M\", firmware = \"touch\", firmware_args = [\"pages=2000\", \"loop_ms=600000\"]}}")
    };
    let mut host = Reaped::new(
        ebb()
            .args(["host", "--budget", "256M", "--tick-ms", "200", "--metrics-addr", "127.0.0.1:0"])
            .args([vm("a"), vm("b")])
            .arg("--api-sock")
            .arg(dir.path().join("host.sock"))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "5000000")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let addr = metrics_address(&mut host);

    // systemd hears READY=1 first, then a status and a watchdog ping every tick.
    let mut buf = [0u8; 4096];
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && said.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 3
    {
        let n = notify.recv(&mut buf).expect("no notification within 30 s");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(said[0].contains("READY=1") && said[0].contains("STATUS="), "{said:?}");
    let status = said.iter().rev().find(|m| m.contains("STATUS=") && m.contains("WATCHDOG=1"));
    let status = status.unwrap_or_else(|| panic!("no status with a watchdog ping: {said:?}"));
    assert!(status.contains("2 VMs running") && status.contains("of 256 MiB"), "{status}");
    // The VMs did not inherit NOTIFY_SOCKET: only the host speaks to systemd.
    let vms = ask(&dir.path().join("host.sock"), r#"{"vms": {}}"#);
    for v in vms["vms"].as_array().unwrap() {
        let pid = v["pid"].as_u64().unwrap();
        match std::fs::read(format!("/proc/{pid}/environ")) {
            Ok(env) => assert!(
                !String::from_utf8_lossy(&env).contains("NOTIFY_SOCKET"),
                "vm {} inherited NOTIFY_SOCKET",
                v["name"]
            ),
            Err(e) => eprintln!("SKIPPED the environment check of vm {pid}: {e}"),
        }
    }

    // Prometheus text over HTTP, judged by promtool.
    let (code, body) = get(&addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("ebb_host_budget_bytes"), "{body}");
    assert!(body.contains("vm=\"a\"") && body.contains("vm=\"b\""), "{body}");
    match promtool(&body) {
        Some((ok, said)) => assert!(ok, "promtool check metrics refused the text: {said}\n{body}"),
        None if std::env::var_os("EBB_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is not installed (scripts/ci.sh installs Debian's prometheus)")
        }
        None => eprintln!(
            "SKIPPED promtool check: promtool is not installed (apt-get install prometheus)"
        ),
    }
    let (code, body) = get(&addr, "/healthz");
    assert_eq!((code, body.starts_with("ok")), (200, true), "{body}");
    assert_eq!(get(&addr, "/other").0, 404);

    // SIGTERM: systemd hears that the host is stopping.
    // SAFETY: kill only sends a signal to the host this test started.
    unsafe { libc::kill(i32::try_from(host.id()).unwrap(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stopping = false;
    while !stopping && Instant::now() < deadline {
        let Ok(n) = notify.recv(&mut buf) else { break };
        stopping = String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "systemd never heard STOPPING=1");
    let status = host.wait().unwrap();
    assert_eq!(status.code(), Some(143), "SIGTERM's exit status");
}

#[test]
fn a_vm_serves_its_statistics_over_http_after_it_is_locked_down() {
    let test = "a_vm_serves_its_statistics_over_http_after_it_is_locked_down";
    if !kvm_or_skip(test) {
        return;
    }
    // Seccomp is on (ebb run's default): serving must need no call the filter refuses.
    let mut vm = Reaped::new(
        ebb()
            .args(["run", "--firmware", "touch", "--mem", "64M", "--metrics-addr", "127.0.0.1:0"])
            .args(["--firmware-arg", "pages=2000", "--firmware-arg", "loop_ms=600000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let addr = metrics_address(&mut vm);
    // Wait for the guest's first faults, then scrape twice: counters only grow.
    let deadline = Instant::now() + Duration::from_secs(30);
    let faults = |body: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix("ebb_vm_faults_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let first = loop {
        let (code, body) = get(&addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        if faults(&body) > 0 {
            break body;
        }
        assert!(Instant::now() < deadline, "no fault counted: {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for name in [
        "ebb_vm_consumed_bytes ",
        "ebb_vm_handler_cpu_seconds_total ",
        "ebb_vm_vcpu_faults_total{vcpu=\"0\"} ",
    ] {
        assert!(first.contains(name), "no {name}in {first}");
    }
    match promtool(&first) {
        Some((ok, said)) => assert!(ok, "promtool check metrics refused the text: {said}\n{first}"),
        None if std::env::var_os("EBB_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is not installed (scripts/ci.sh installs Debian's prometheus)")
        }
        None => eprintln!("SKIPPED promtool check: promtool is not installed"),
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, second) = get(&addr, "/metrics");
    assert!(faults(&second) >= faults(&first), "a counter went down");
    let (code, body) = get(&addr, "/healthz");
    assert_eq!((code, body.starts_with("ok")), (200, true), "{body}");
    assert!(vm.try_wait().unwrap().is_none(), "the VM ended (a refused system call?)");
    drop(vm); // killed and reaped
}
