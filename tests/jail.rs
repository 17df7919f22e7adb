//! The jailer end to end: what another process, of the VM's own uid or another, can no
//! longer do to a VM (open its descriptors through /proc, ptrace it, use its control socket
//! or the host's), the seccomp filter and its log line, and `ebb host` started as root (a
//! uid per VM) and as an ordinary user.
//!
//! The tests run as root (as CI does); the other uids are taken by the helper process with
//! `Command::uid`/`gid` (setgroups, setresgid, setresuid), whose `pre_exec` hook makes the
//! attempts and reports them in its exit status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{ask, ebb, kvm_or_skip, text};

/// The VMs below load both cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A uid no VM here runs as, for "someone else".
const STRANGER_UID: u32 = 65534;

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("\n*** SKIPPED {test}: it changes uids, which needs root ***\n");
        return false;
    }
    true
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ebb-jail-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A process killed and reaped on drop, so that a failed test leaves no VM running.
struct Running(Child, PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// `ebb run` of an idle touch guest with a swap file, a sharing pool (memfd) and a control
/// socket, plus `extra`; returns it once its socket answers.
fn start_vm(name: &str, extra: &[&str]) -> (Running, PathBuf) {
    let dir = tmpdir(name);
    let sock = dir.join("vm.sock");
    let child = ebb()
        .args(["run", "--mem", "64M", "--firmware", "touch"])
        .args(["--firmware-arg", "pages=2000", "--firmware-arg", "idle_ms=60000"])
        .args(["--reclaim-target", "4M", "--share-scan-rate", "1000", "--swap-dir"])
        .arg(&dir)
        .arg("--api-sock")
        .arg(&sock)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vm = Running(child, dir);
    wait_for_socket(&sock);
    (vm, sock)
}

/// True if `sock` answers a request. A VM's socket accepts connections from the moment it
/// is bound, but answers only once the event loop runs: after the jailer's last step.
fn answers(sock: &Path, request: &str) -> bool {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(format!("{request}\n").as_bytes()).is_err() {
        return false;
    }
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).is_ok_and(|n| n > 0)
}

fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while !answers(sock, "{\"stats\":{}}") {
        assert!(start.elapsed() < Duration::from_secs(60), "{} never answered", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of `key` in /proc/PID/status (its first field).
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

/// Every /proc/PID/fd/N of `pid` with what it points to (read as root).
fn fds_of(pid: u32) -> Vec<(PathBuf, String)> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let target = std::fs::read_link(&path).map(|t| t.display().to_string());
            (path, target.unwrap_or_default())
        })
        .collect()
}

/// What a process of `uid` managed to do to `pid`: how many of `paths` it opened (read-write,
/// else read-only), and whether PTRACE_ATTACH and PTRACE_SEIZE worked.
#[derive(Debug, PartialEq, Eq)]
struct Attempts {
    opened: u8,
    attached: bool,
    seized: bool,
}

fn attempts_as(uid: u32, pid: u32, paths: &[PathBuf]) -> Attempts {
    let paths: Vec<CString> =
        paths.iter().map(|p| CString::new(p.as_os_str().as_encoded_bytes()).unwrap()).collect();
    let pid = libc::pid_t::try_from(pid).unwrap();
    let mut cmd = Command::new("/bin/true");
    cmd.uid(uid).gid(uid);
    // SAFETY: runs between fork and exec as `uid`, and calls only open, close, ptrace and
    // _exit (async-signal-safe) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let mut opened: i32 = 0;
            for p in &paths {
                for flags in [libc::O_RDWR, libc::O_RDONLY] {
                    let fd = libc::open(p.as_ptr(), flags | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::close(fd);
                        opened += 1;
                        break;
                    }
                }
            }
            let null = std::ptr::null_mut::<libc::c_void>();
            let attached = libc::ptrace(libc::PTRACE_ATTACH, pid, null, null) == 0;
            let seized = libc::ptrace(libc::PTRACE_SEIZE, pid, null, null) == 0;
            // Leaving traces nothing: the tracee is let go when this process exits.
            libc::_exit(opened.min(63) | i32::from(attached) << 6 | i32::from(seized) << 7);
        });
    }
    let code = cmd.status().unwrap().code().unwrap();
    Attempts {
        opened: u8::try_from(code & 63).unwrap(),
        attached: code & 64 != 0,
        seized: code & 128 != 0,
    }
}

/// `ebb ctl --api-sock SOCK REQUEST...` as `uid`; its (status, stdout + stderr).
fn ctl_as(uid: u32, sock: &Path, request: &[&str]) -> (i32, String) {
    let out = ebb()
        .uid(uid)
        .gid(uid)
        .arg("ctl")
        .arg("--api-sock")
        .arg(sock)
        .args(request)
        .output()
        .unwrap();
    let (o, e) = text(&out);
    (out.status.code().unwrap_or(-1), o + &e)
}

/// Lets everyone reach `sock` through the file system, so that only the server's own check
/// (SO_PEERCRED) stands between another uid and the VM.
fn open_socket_to_all(sock: &Path) {
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut dir = sock.parent().unwrap().to_path_buf();
    while dir != Path::new("/") && dir != std::env::temp_dir() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir.pop();
    }
}

const VM_UID: u32 = 100_050;

#[test]
fn a_vm_is_filtered_without_new_privileges_and_not_dumpable() {
    if !kvm_or_skip("a_vm_is_filtered_without_new_privileges_and_not_dumpable") {
        return;
    }
    let _serial = serial();
    let (vm, _sock) = start_vm("status", &[]);
    let pid = vm.0.id();
    assert_eq!(status_field(pid, "Seccomp"), "2", "the VM runs under a seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "RLIMIT_CORE is 0: {core}");
}

#[cfg(debug_assertions)]
#[test]
fn a_forbidden_system_call_ends_the_vm_and_names_the_call() {
    if !kvm_or_skip("a_forbidden_system_call_ends_the_vm_and_names_the_call") {
        return;
    }
    let _serial = serial();
    let out = ebb()
        .args(["run", "--mem", "32M"])
        .env("EBB_TEST_FORBIDDEN_SYSCALL", "1")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("seccomp: refused system call ptrace (101)"),
        "the log names the call: {stderr}"
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{stderr}");
}

#[test]
fn the_vms_own_uid_cannot_open_its_descriptors_nor_ptrace_it() {
    if !kvm_or_skip("the_vms_own_uid_cannot_open_its_descriptors_nor_ptrace_it")
        || !root_or_skip("the_vms_own_uid_cannot_open_its_descriptors_nor_ptrace_it")
    {
        return;
    }
    let _serial = serial();
    let uid = VM_UID.to_string();
    let (vm, sock) = start_vm("fds", &["--uid", &uid, "--gid", &uid]);
    let pid = vm.0.id();
    assert_eq!(status_field(pid, "Uid"), uid, "the VM runs as --uid");
    assert_eq!(status_field(pid, "Gid"), uid, "the VM runs as --gid");
    let fds = fds_of(pid);
    let has = |what: &str| fds.iter().any(|(_, t)| t.contains(what));
    assert!(has("memfd:") && has(&vm.1.display().to_string()), "a memfd and a swap file: {fds:?}");
    let paths: Vec<PathBuf> = fds.into_iter().map(|(p, _)| p).collect();
    // The VM's own uid and a stranger. (A uid change alone makes a process non-dumpable;
    // an_ordinary_user_host_runs_its_vms_jailed covers siblings that never changed uid.)
    for helper in [VM_UID, STRANGER_UID] {
        let got = attempts_as(helper, pid, &paths);
        assert_eq!(
            got,
            Attempts { opened: 0, attached: false, seized: false },
            "uid {helper} must not reach VM {pid} (running as {VM_UID})"
        );
    }
    // The VM still serves root.
    assert!(ask(&sock, "{\"stats\":{}}").get("error").is_none());
}

#[test]
fn another_uid_is_refused_by_the_vms_control_socket() {
    if !kvm_or_skip("another_uid_is_refused_by_the_vms_control_socket")
        || !root_or_skip("another_uid_is_refused_by_the_vms_control_socket")
    {
        return;
    }
    let _serial = serial();
    let uid = VM_UID.to_string();
    let (vm, sock) = start_vm("sock", &["--uid", &uid, "--gid", &uid]);
    open_socket_to_all(&sock);
    // Even the VM's own uid: the socket serves whoever started ebb (root here) and root.
    for helper in [VM_UID, STRANGER_UID] {
        let (status, out) = ctl_as(helper, &sock, &["stats"]);
        assert_eq!(status, 1, "{out}");
        assert!(
            out.contains("refused") && out.contains(&format!("the client is uid {helper}")),
            "one line says why: {out}"
        );
    }
    let (status, out) = ctl_as(0, &sock, &["stats"]);
    assert_eq!(status, 0, "root is served: {out}");
    // --owner-uid names who else is served.
    drop(vm);
    let (_vm, sock) = start_vm("owner", &["--owner-uid", &STRANGER_UID.to_string()]);
    open_socket_to_all(&sock);
    let (status, out) = ctl_as(STRANGER_UID, &sock, &["stats"]);
    assert_eq!(status, 0, "the owner is served: {out}");
}

/// `ebb host` with two idle VMs of one sharing group, its socket and its run directory.
fn start_host(name: &str, uid: Option<u32>) -> (Running, PathBuf, PathBuf) {
    let dir = tmpdir(name);
    let mut toml = String::from("budget = \"512M\"\ntick_ms = 200\n");
    for vm in ["a", "b"] {
        toml += &format!(
            "[[vm]]\nname = \"{vm}\"\nmemory = \"64M\"\nfirmware = \"touch\"\n\
             firmware_args = [\"pages=1000\", \"idle_ms=60000\"]\nsharing_group = \"g\"\n"
        );
    }
    std::fs::write(dir.join("host.toml"), toml).unwrap();
    let (sock, run_dir) = (dir.join("host.sock"), dir.join("run"));
    let mut cmd = ebb();
    cmd.arg("host").arg("--config").arg(dir.join("host.toml"));
    cmd.arg("--api-sock").arg(&sock).arg("--run-dir").arg(&run_dir);
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
        cmd.uid(uid).gid(uid).env("TMPDIR", &dir);
    }
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&run_dir, Some(uid), Some(uid)).unwrap();
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let host = Running(child, dir);
    wait_for_socket(&sock);
    (host, sock, run_dir)
}

/// The pids of the host's VMs, once each answers (is locked down).
fn host_vm_pids(sock: &Path) -> Vec<u32> {
    for vm in ["a", "b"] {
        let request = format!("{{\"vm\":{{\"name\":\"{vm}\",\"request\":{{\"stats\":{{}}}}}}}}");
        let start = Instant::now();
        while ask(sock, &request).get("error").is_some() {
            assert!(start.elapsed() < Duration::from_secs(60), "vm {vm} never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let vms = ask(sock, "{\"vms\":{}}");
    let pids = vms["vms"].as_array().unwrap().iter();
    pids.map(|v| u32::try_from(v["pid"].as_u64().unwrap()).unwrap()).collect()
}

#[test]
fn a_root_host_runs_each_vm_as_its_own_uid_and_serves_only_root() {
    if !kvm_or_skip("a_root_host_runs_each_vm_as_its_own_uid_and_serves_only_root")
        || !root_or_skip("a_root_host_runs_each_vm_as_its_own_uid_and_serves_only_root")
    {
        return;
    }
    let _serial = serial();
    let (_host, sock, _run_dir) = start_host("root", None);
    let pids = host_vm_pids(&sock);
    assert_eq!(pids.len(), 2);
    let uids: Vec<u32> = pids.iter().map(|&p| status_field(p, "Uid").parse().unwrap()).collect();
    assert_eq!(uids[0] + 1, uids[1], "one uid per VM, in start order: {uids:?}");
    assert!(uids[0] >= 100_000, "above the default base: {uids:?}");
    for &pid in &pids {
        assert_eq!(status_field(pid, "Seccomp"), "2");
    }
    // VM a's uid against VM b: its memfds of the shared pool are out of reach too.
    let paths: Vec<PathBuf> = fds_of(pids[1]).into_iter().map(|(p, _)| p).collect();
    let got = attempts_as(uids[0], pids[1], &paths);
    assert_eq!(got, Attempts { opened: 0, attached: false, seized: false });
    // The host's socket: a VM's uid is refused even where the file's mode lets it in.
    open_socket_to_all(&sock);
    let (status, out) = ctl_as(uids[0], &sock, &["vms"]);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("refused") && out.contains(&format!("uid {}", uids[0])), "{out}");
    assert!(ask(&sock, "{\"vms\":{}}").get("error").is_none(), "root is served");
}

/// The unprivileged user `scripts/jail-test-user.sh` makes (with access to /dev/kvm and
/// /dev/userfaultfd through ACLs): its uid, or why there is none.
fn test_user() -> Result<u32, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/jail-test-user.sh");
    let out = Command::new(&script).output().map_err(|e| format!("{}: {e}", script.display()))?;
    let (stdout, stderr) = text(&out);
    if !out.status.success() {
        return Err(format!("{} failed: {stderr}", script.display()));
    }
    let uid = stdout.trim().parse().map_err(|_| format!("no uid from the script: {stdout}"))?;
    // The debug binary must be reachable by that user (a checkout under a private home
    // would not be).
    let exe = env!("CARGO_BIN_EXE_ebb");
    let probe = Command::new(exe).arg("--version").uid(uid).gid(uid).output();
    match probe {
        Ok(o) if o.status.success() => Ok(uid),
        _ => Err(format!("uid {uid} cannot run {exe}")),
    }
}

#[test]
fn an_ordinary_user_host_runs_its_vms_jailed() {
    if !kvm_or_skip("an_ordinary_user_host_runs_its_vms_jailed")
        || !root_or_skip("an_ordinary_user_host_runs_its_vms_jailed")
    {
        return;
    }
    let uid = match test_user() {
        Ok(uid) => uid,
        Err(why) => {
            eprintln!("\n*** SKIPPED an_ordinary_user_host_runs_its_vms_jailed: {why} ***\n");
            return;
        }
    };
    let _serial = serial();
    let (host, sock, _run_dir) = start_host("user", Some(uid));
    let pids = host_vm_pids(&sock);
    assert_eq!(pids.len(), 2);
    // A sibling VM (same uid: no uid change made the VMs non-dumpable, only the jailer)
    // cannot reach the other's descriptors (the group's memfds) or ptrace it.
    let fds = fds_of(pids[1]);
    assert!(fds.iter().any(|(_, t)| t.contains("memfd:")), "the group's pool: {fds:?}");
    let paths: Vec<PathBuf> = fds.into_iter().map(|(p, _)| p).collect();
    let got = attempts_as(uid, pids[1], &paths);
    assert_eq!(got, Attempts { opened: 0, attached: false, seized: false });
    for &pid in &pids {
        assert_eq!(status_field(pid, "Uid"), uid.to_string(), "the VMs keep the host's uid");
        assert_eq!(status_field(pid, "Seccomp"), "2");
    }
    // Someone else is refused by the host's socket.
    open_socket_to_all(&sock);
    let (status, out) = ctl_as(STRANGER_UID, &sock, &["vms"]);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("refused"), "{out}");
    drop(host);
}
