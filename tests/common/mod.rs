//! Helpers shared by the integration tests: finding KVM and the guest kernel, running the
//! `ebb` binary, and an independent model of the `touch` payload's checksum.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `ebb` binary cargo built for these tests.
pub fn ebb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ebb"))
}

/// True if /dev/kvm can be opened; otherwise prints loudly why the test is skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED {test}: /dev/kvm cannot be opened ({e}); this test needs KVM ***\n"
            );
            false
        }
    }
}

/// Runs `ebb` with `args` and returns its output.
pub fn run_ebb(args: &[&str]) -> Output {
    ebb().args(args).output().expect("ebb runs")
}

/// Runs `ebb` with `args` as user and group 65534 (nobody), through util-linux's setpriv.
pub fn run_ebb_unprivileged(args: &[&str]) -> std::io::Result<Output> {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_ebb")])
        .args(args)
        .output()
}

/// Sends one request line to the control socket at `sock`; returns the reply line, parsed.
pub fn ask(sock: &Path, req: &str) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let line = format!("{req}\n");
    std::io::Write::write_all(&mut s, line.as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// --- touch: an independent model of firmware/touch.c ---------------------------------------

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const WORDS: u64 = 512;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The value touch writes to word `w` of page `p` in pass `n` (see firmware/touch.c).
pub fn touch_word(pattern: &str, seed: u64, n: u64, p: u64, w: u64) -> u64 {
    match pattern {
        "seq" => ((p << 32) | (n << 16) | w) ^ seed,
        "zero" => 0,
        "random" => mix64(((p << 20) | (n << 9) | w) ^ seed),
        "dup" => mix64(((n << 9) | w) ^ seed ^ 0xd0d0),
        other => panic!("unknown pattern {other}"),
    }
}

/// The checksum touch reports when every page reads back what was written.
pub fn touch_checksum(pattern: &str, pages: u64, passes: u64, seed: u64) -> u64 {
    let mut sum = FNV_OFFSET;
    for n in 0..passes {
        for p in 0..pages {
            for w in 0..WORDS {
                sum = (sum ^ touch_word(pattern, seed, n, p, w)).wrapping_mul(FNV_PRIME);
            }
        }
    }
    sum
}

/// The checksum touch reports on `cpus` vCPUs (`--vcpus`) when every page reads back what
/// was written: each vCPU's share of the pages (`p` in `[pages * s / cpus, pages * (s + 1) /
/// cpus)`) is checksummed on its own over every pass, and the shares' checksums are then
/// folded the same way; with one vCPU that is [`touch_checksum`].
pub fn touch_checksum_smp(pattern: &str, pages: u64, passes: u64, seed: u64, cpus: u64) -> u64 {
    if cpus == 1 {
        return touch_checksum(pattern, pages, passes, seed);
    }
    let mut sum = FNV_OFFSET;
    for s in 0..cpus {
        let mut share = FNV_OFFSET;
        for n in 0..passes {
            for p in pages * s / cpus..pages * (s + 1) / cpus {
                for w in 0..WORDS {
                    share = (share ^ touch_word(pattern, seed, n, p, w)).wrapping_mul(FNV_PRIME);
                }
            }
        }
        sum = (sum ^ share).wrapping_mul(FNV_PRIME);
    }
    sum
}

// touch's mix= (see the header of firmware/touch.c): salts are ASCII "kind", "fill",
// "group", "text" as little-endian numbers; 0xd0d0 is the dup pattern's.
const KIND_SALT: u64 = 0x646e_696b;
const FILL_SALT: u64 = 0x6c6c_6966;
const GROUP_SALT: u64 = 0x70_756f_7267;
const TEXT_SALT: u64 = 0x7478_6574;
const DUP_SALT: u64 = 0xd0d0;
const PAGE: u64 = 4096;

/// The page-content kinds of touch's `mix=`, in the order they share out 0..100.
pub const TOUCH_KINDS: [&str; 5] = ["zero", "fill", "dup", "text", "random"];

/// touch's `mix=SPEC dup_groups=G`, and the blob its text pages copy.
pub struct TouchMix<'a> {
    /// Percentages, indexed like [`TOUCH_KINDS`].
    pub percent: [u64; 5],
    /// `dup_groups=`.
    pub dup_groups: u64,
    /// The host's blob (empty when there is none).
    pub blob: &'a [u8],
}

impl<'a> TouchMix<'a> {
    /// Parses a `mix=` value such as `zero:10,random:90`.
    pub fn new(spec: &str, dup_groups: u64, blob: &'a [u8]) -> Self {
        let mut percent = [0; 5];
        for part in spec.split(',') {
            let (kind, pct) = part.split_once(':').unwrap();
            let i = TOUCH_KINDS.iter().position(|k| *k == kind).unwrap();
            percent[i] = pct.parse().unwrap();
        }
        assert_eq!(percent.iter().sum::<u64>(), 100, "{spec}");
        Self { percent, dup_groups, blob }
    }

    /// The kind (an index into [`TOUCH_KINDS`]) of logical page `p`.
    pub fn kind(&self, seed: u64, p: u64) -> usize {
        let k = mulhi(mix64(p ^ seed ^ KIND_SALT), 100);
        let mut end = 0;
        for (i, pct) in self.percent.iter().enumerate() {
            end += pct;
            if k < end {
                return i;
            }
        }
        unreachable!("the percentages sum to 100")
    }

    /// The 512 words of logical page `p` in pass `n`.
    pub fn page(&self, seed: u64, n: u64, p: u64) -> Vec<u64> {
        let words = 0..WORDS;
        match TOUCH_KINDS[self.kind(seed, p)] {
            "zero" => vec![0; 512],
            "fill" => vec![mix64(((p << 20) | (n << 9)) ^ seed ^ FILL_SALT); 512],
            "dup" => {
                let g = mulhi(mix64(p ^ seed ^ GROUP_SALT), self.dup_groups);
                words.map(|w| mix64(((g << 20) | (n << 9) | w) ^ seed ^ DUP_SALT)).collect()
            }
            "text" => {
                let span = self.blob.len() as u64 - PAGE + 1;
                let off = mulhi(mix64(((p << 11) | n) ^ seed ^ TEXT_SALT), span);
                let off = usize::try_from(off).unwrap();
                self.blob[off..off + 4096]
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            }
            _ => words.map(|w| touch_word("random", seed, n, p, w)).collect(),
        }
    }

    /// The checksum touch reports for this mix when every page reads back what was written.
    pub fn checksum(&self, pages: u64, passes: u64, seed: u64) -> u64 {
        let mut sum = FNV_OFFSET;
        for n in 0..passes {
            for p in 0..pages {
                for v in self.page(seed, n, p) {
                    sum = (sum ^ v).wrapping_mul(FNV_PRIME);
                }
            }
        }
        sum
    }
}

fn mulhi(a: u64, b: u64) -> u64 {
    u64::try_from((u128::from(a) * u128::from(b)) >> 64).unwrap()
}

/// The probability that touch's `dist=zipf` loop picks rank 1 among `hot` ranks with
/// exponent `s`: 1 / sum(r^-s).
pub fn zipf_rank1_probability(hot: u64, s: f64) -> f64 {
    1.0 / (1..=hot).map(|r| (r as f64).powf(-s)).sum::<f64>()
}

/// Parses `key=value` from touch's `done` line.
pub fn touch_field(stdout: &str, key: &str) -> Option<String> {
    let line = stdout.lines().find(|l| l.starts_with("touch: done"))?;
    line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

// --- a hand-made payload ---------------------------------------------------------------

/// A minimal ELF64 executable that loads `code` at 2 MiB and starts there.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x20_0000;
    const HDR: u64 = 64 + 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(LOAD + HDR).to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&7u32.to_le_bytes()); // RWX
    let size = HDR + code.len() as u64;
    for v in [0, LOAD, LOAD, size, size, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

/// Writes `bytes` to a fresh file under the target directory and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

// --- the guest kernel ------------------------------------------------------------------

/// Paths of the tiny Linux guest built by scripts/build-guest.sh.
pub struct Guest {
    /// The bzImage.
    pub bzimage: PathBuf,
    /// The ELF vmlinux with the PVH note.
    pub vmlinux: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
}

/// The guest if it was built; otherwise skips loudly, or fails when CI asks for it.
pub fn guest_or_skip(test: &str) -> Option<Guest> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/build-guest.sh")).arg("--print-only").output();
    let found = out.ok().filter(|o| o.status.success()).map(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let get = |k: &str| {
            text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).map(PathBuf::from).unwrap()
        };
        Guest { bzimage: get("bzimage"), vmlinux: get("vmlinux"), initramfs: get("initramfs") }
    });
    if found.is_none() {
        let msg = format!("{test}: the guest kernel is not built (run scripts/build-guest.sh)");
        if std::env::var_os("EBB_REQUIRE_GUEST").is_some() {
            panic!("{msg}, and EBB_REQUIRE_GUEST is set");
        }
        eprintln!("\n*** SKIPPED {msg} ***\n");
    }
    found
}

/// True when KVM runs user space natively (VT-x or AMD-V), false on PVM.
pub fn hardware_virtualization() -> bool {
    !matches!(ebb::accel::Accelerator::detect(), ebb::accel::Accelerator::Pvm)
}

/// A running `ebb` whose stdout lines arrive on a channel.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

impl Running {
    /// Starts `ebb` with `args`.
    pub fn start(args: &[&str]) -> Self {
        let mut child =
            ebb().args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits for a line containing any of `needles`; returns it, or None on timeout or exit.
    pub fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().any(|n| line.contains(n)) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Waits for the process to exit; returns its status code, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Kills the process with SIGKILL (nothing of ebb's runs after it) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// The last `n` lines seen, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        self.seen[self.seen.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- memory cgroups ------------------------------------------------------------------------

/// A cgroup-v1 memory cgroup below the one this test runs in, removed when dropped.
pub struct MemCgroup {
    dir: PathBuf,
}

impl MemCgroup {
    /// A new cgroup limited to `limit` bytes, with the OOM killer off when `oom_kill` is false
    /// (the kernel then refuses allocations instead of killing). None, said loudly, where
    /// cgroup-v1 memory control is not available or not writable.
    pub fn create(test: &str, limit: u64, oom_kill: bool) -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|s| {
            s.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers.split(',').any(|c| c == "memory").then(|| path.to_owned())
            })
        });
        let Some(own) = own else {
            eprintln!("\n*** SKIPPED {test}: no cgroup-v1 memory controller here ***\n");
            return None;
        };
        let dir = PathBuf::from(format!("/sys/fs/cgroup/memory{own}"))
            .join(format!("ebb-{test}-{}", std::process::id()));
        let made = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()))
            .and_then(|()| {
                std::fs::write(dir.join("memory.oom_control"), if oom_kill { "0" } else { "1" })
            });
        if let Err(e) = made {
            eprintln!(
                "\n*** SKIPPED {test}: cannot set up a memory cgroup at {}: {e} ***\n",
                dir.display()
            );
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Self { dir })
    }

    /// A command line for `sh -c` that moves the shell into the cgroup, then runs `argv`.
    pub fn shell_command(&self, argv: &[&str]) -> Command {
        let procs = self.dir.join("cgroup.procs");
        let mut script = format!("echo $$ > {} && exec", procs.display());
        for a in argv {
            script.push_str(&format!(" '{a}'"));
        }
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    }

    /// Sets the limit.
    pub fn set_limit(&self, limit: u64) {
        std::fs::write(self.dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
    }

    /// How often the limit was hit.
    pub fn failcnt(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.failcnt"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Guest RAM of `mem_bytes` registered by a memory engine started with `config` (no KVM),
/// or None after a loud skip: userfaultfd unavailable, or (with `need_sharing`) a kernel that
/// cannot share pages.
pub fn engine_or_skip(
    test: &str,
    mem_bytes: u64,
    config: &ebb::mm::engine::EngineConfig,
    need_sharing: bool,
) -> Option<(
    std::sync::Arc<ebb::vstate::memory::GuestRam>,
    std::sync::Arc<ebb::mm::MemoryManager>,
    ebb::mm::engine::Engine,
)> {
    use std::sync::Arc;
    let ram = ebb::vstate::memory::GuestRam::new(mem_bytes, 48).unwrap();
    let mm = Arc::new(ebb::mm::MemoryManager::new(&ram.regions(), true));
    match ebb::mm::engine::Engine::start(&mm, config, None) {
        Ok(engine) if !need_sharing || engine.sharing().is_some() => {
            Some((Arc::new(ram), mm, engine))
        }
        Ok(_) => {
            eprintln!("\n*** SKIPPED {test}: this kernel cannot share pages (needs UFFDIO_MOVE and memfd write protection) ***\n");
            None
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED {test}: userfaultfd unavailable here ({e}) ***\n");
            None
        }
    }
}

/// Word `word` (of 512) of guest page `pfn` of `ram`, the first region's.
fn word_ptr(ram: &ebb::vstate::memory::GuestRam, pfn: u64, word: usize) -> *mut u64 {
    assert!(word < 512, "word {word} is outside a page");
    (ram.regions()[0].hva + pfn * 4096 + 8 * word as u64) as *mut u64
}

/// Writes `v` to word `word` of guest page `pfn` (a vCPU's store, through the mapping).
pub fn write_word(ram: &ebb::vstate::memory::GuestRam, pfn: u64, word: usize, v: u64) {
    // SAFETY: pfn is inside the test's guest RAM mapping (the tests pick it), word < 512.
    unsafe { word_ptr(ram, pfn, word).write_volatile(v) }
}

/// Reads word `word` of guest page `pfn` (a vCPU's load, through the mapping).
pub fn read_word(ram: &ebb::vstate::memory::GuestRam, pfn: u64, word: usize) -> u64 {
    // SAFETY: as in `write_word`.
    unsafe { word_ptr(ram, pfn, word).read_volatile() }
}

// --- processes a failed test must not leave behind -----------------------------------------

/// A child killed (SIGKILL) and reaped when dropped, unless taken back: a test that panics
/// half way leaves no host or VM running to load the machine under the tests after it.
pub struct Reaped(Option<Child>);

impl Reaped {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The child, no longer guarded (to wait for its output).
    pub fn take(mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Processes that are not this test's children (VMs that outlived their host), killed when
/// dropped if they still run `ebb`.
pub struct KillPids(pub Vec<u64>);

impl Drop for KillPids {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains("ebb");
            if let (true, Ok(pid)) = (ours, i32::try_from(pid)) {
                // SAFETY: kill(2) sends a signal; the pid runs an ebb this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
