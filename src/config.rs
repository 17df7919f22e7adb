//! What one VM is made of, as the command line (or a later API) describes it.
//!
//! Plain data plus the parsing of option strings; no KVM here, so every rule is unit-tested
//! without privileges. The defaults are written here once; the command line shows them.

use std::path::PathBuf;
use std::time::Duration;

use crate::mm::fault::active::{sample_rate, ActiveConfig, MAX_SAMPLE_PAGES_PER_S};
use crate::mm::fault::around::{FaultAround, MAX_FAULT_AROUND};
use crate::mm::fault::handler::DEFAULT_OOM_WAIT;
use crate::mm::reclaim::{VictimPolicy, DEFAULT_CACHE_PERCENT};
use crate::mm::uffd::DEFAULT_UFFD_DEV;
use crate::units::{exact_mib, parse_size, SizeError};

/// Default guest memory, as the command line shows it.
pub const DEFAULT_MEM: &str = "256M";
/// Default guest memory in bytes (`DEFAULT_MEM`; a test keeps the two equal).
pub const DEFAULT_MEM_BYTES: u64 = 256 << 20;
/// Default time between statistics lines.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Default KVM device node.
pub const DEFAULT_KVM_DEV: &str = "/dev/kvm";
/// Shortest and longest statistics and sampling intervals accepted, in milliseconds.
pub const INTERVAL_RANGE_MS: std::ops::RangeInclusive<u128> = 10..=3_600_000;
/// Longest `--oom-wait` accepted.
pub const MAX_OOM_WAIT: Duration = Duration::from_secs(3600);
/// Most pages one Active-memory sample may hold.
pub const MAX_SAMPLE_PAGES: u32 = 100_000;
/// Most vCPUs a VM may have (Firecracker's limit too; the MP table and the firmware stacks
/// are sized for it).
pub const MAX_VCPUS: u8 = 32;

/// Errors in a VM description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string that is not `<number>[K|M|G|T]`.
    #[error(transparent)]
    InvalidSize(#[from] SizeError),
    /// Guest memory of zero bytes.
    #[error("--mem must be larger than 0")]
    ZeroMemory,
    /// Guest memory that is not a whole number of 4 KiB pages.
    #[error("--mem {0} is not a multiple of 4 KiB")]
    UnalignedMemory(u64),
    /// A vCPU count out of range.
    #[error("--vcpus {0} is out of range: a VM has 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount(u8),
    /// A firmware argument without `=`.
    #[error("invalid --firmware-arg {0:?}: expected KEY=VALUE")]
    InvalidFirmwareArg(String),
    /// Both `--kernel` and `--firmware` given.
    #[error("--kernel and --firmware exclude each other: boot either a Linux kernel or a payload")]
    KernelAndFirmware,
    /// Fault-around that is neither `auto` nor a page count in range.
    #[error("--fault-around {0} is out of range: use auto, or 0 to {MAX_FAULT_AROUND} pages")]
    FaultAround(String),
    /// A zero or absurd interval.
    #[error("{what} {value:?} is out of range ({range})")]
    Interval {
        /// The option.
        what: &'static str,
        /// The value given.
        value: Duration,
        /// What is accepted.
        range: &'static str,
    },
    /// Active sampling that would take more of the fault handler than the guest's faults.
    #[error("--active-sample-pages {pages} every --active-interval-ms {interval_ms} samples {rate} pages/s; at most {max} pages/s (each sampled page costs the fault handler two write-protect round trips)")]
    SampleRate {
        /// Pages per sample.
        pages: u32,
        /// Interval in milliseconds.
        interval_ms: u128,
        /// Pages per second.
        rate: u64,
        /// The most accepted.
        max: u64,
    },
    /// An Active sample size out of range.
    #[error("--active-sample-pages {0} is out of range: use 1 to {MAX_SAMPLE_PAGES}")]
    SamplePages(u32),
    /// Options of the lazy-RAM engine given with `--no-uffd`.
    #[error("{0} needs userfaultfd: drop --no-uffd")]
    NeedsUffd(&'static str),
    /// Both ebb's page sharing and KSM asked for.
    #[error("--ksm and ebb's page sharing (--share-scan-rate, --share-group-fds) both share pages: pick one (--ksm is the kernel's, for comparison)")]
    TwoSharers,
    /// A sharing scan rate above the most the scanner takes.
    #[error("--share-scan-rate {rate} is more than {max} pages per second")]
    ScanRate {
        /// What was asked.
        rate: u64,
        /// The most.
        max: u64,
    },
    /// A `--balloon` option that does not parse.
    #[error(
        "invalid --balloon {0:?}: expected target=SIZE,stats=SECS,deflate_on_oom=on|off,free_page_reporting=on|off"
    )]
    Balloon(String),
    /// A `--disk` option that does not parse.
    #[error("invalid --disk {0:?}: expected PATH or PATH,ro")]
    Disk(String),
    /// A balloon size that is not a whole number of MiB.
    #[error("balloon size {0} is not a whole number of MiB (the balloon moves in MiB)")]
    BalloonNotMib(u64),
    /// A compression cache size out of range.
    #[error(
        "--zcache-max {0} is out of range: give a size up to guest RAM or a percentage up to 100%"
    )]
    CacheSize(String),
    /// A reclaim target above guest RAM.
    #[error(
        "--reclaim-target {} is more than the guest's {} of RAM: give a size up to --mem",
        crate::units::human_bytes(*target),
        crate::units::human_bytes(*mem)
    )]
    ReclaimTarget {
        /// The target.
        target: u64,
        /// Guest RAM.
        mem: u64,
    },
    /// Linux-only options given without `--kernel`.
    #[error("{0} needs --kernel")]
    NeedsKernel(&'static str),
}

/// What the vCPU starts executing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// A Linux kernel: bzImage, or an ELF vmlinux with a PVH entry note.
    Linux {
        /// Path of the kernel image.
        kernel: PathBuf,
        /// Optional initrd/initramfs.
        initrd: Option<PathBuf>,
        /// Appended to the command line ebb builds.
        cmdline: String,
    },
    /// A payload following ebb's firmware ABI (see `firmware/README.md`).
    Firmware {
        /// A built-in name (`hello`, `touch`) or a path to an ELF file.
        source: FirmwareSource,
        /// `KEY=VALUE` pairs handed to the payload.
        args: Vec<(String, String)>,
        /// A file whose bytes the payload finds in guest memory (`blob_gpa`, `blob_len` in
        /// its boot info), e.g. a text corpus for `touch`'s `mix=text`.
        blob: Option<PathBuf>,
    },
}

/// Where a firmware payload comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareSource {
    /// One of the payloads built into the binary, by name.
    Builtin(String),
    /// An ELF file on disk.
    File(PathBuf),
}

impl FirmwareSource {
    /// A name with a `/` or an existing file is a path; anything else a built-in name.
    pub fn parse(s: &str) -> Self {
        let path = PathBuf::from(s);
        if s.contains('/') || path.is_file() {
            Self::File(path)
        } else {
            Self::Builtin(s.to_owned())
        }
    }
}

/// A virtio-blk disk as the user configures it (`--disk PATH[,ro]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// The guest may not write it.
    pub read_only: bool,
}

/// Parses `--disk PATH[,ro]`. A path that itself ends in `,ro` cannot be given (rename it).
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let (path, read_only) = match s.strip_suffix(",ro") {
        Some(p) => (p, true),
        None => (s, false),
    };
    if path.is_empty() {
        return Err(ConfigError::Disk(s.to_owned()));
    }
    Ok(DiskConfig { path: PathBuf::from(path), read_only })
}

/// The virtio-balloon as the user configures it (`--balloon ...`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial balloon size in MiB.
    pub target_mib: u64,
    /// Statistics polling interval in seconds; 0 turns the statistics queue off.
    pub stats_interval_s: u64,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer `VIRTIO_BALLOON_F_REPORTING`.
    pub free_page_reporting: bool,
}

/// One VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What to boot.
    pub boot: BootSource,
    /// Where serial output is also written.
    pub serial_log: Option<PathBuf>,
    /// The KVM device node (`/dev/kvm`); tests point it elsewhere to simulate its absence.
    pub kvm_path: PathBuf,
    /// How guest memory is backed and observed.
    pub memory: MemoryConfig,
    /// The virtio-balloon device, if any.
    pub balloon: Option<BalloonConfig>,
    /// virtio-blk disks, in the order the guest sees them (`vda`, `vdb`, ...).
    pub disks: Vec<DiskConfig>,
    /// The control socket, if any.
    pub api_sock: Option<PathBuf>,
    /// Serve `/metrics` and `/healthz` over HTTP here, if set.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// What the process gives up once the VM is built (uid, seccomp); none by default, so
    /// that a library user's process is left as it is. `ebb run` asks for the filter.
    pub jail: crate::jail::JailOptions,
}

/// The lazy-RAM engine's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Serve guest RAM through userfaultfd (false: plain anonymous memory, `--no-uffd`).
    pub uffd: bool,
    /// The userfaultfd device, used when the syscall is refused.
    pub uffd_dev: PathBuf,
    /// Untouched neighbours to fill with each fault.
    pub fault_around: FaultAround,
    /// Active-memory sampling.
    pub active: ActiveConfig,
    /// Where to write JSON-lines statistics.
    pub stats_json: Option<PathBuf>,
    /// Time between statistics lines.
    pub stats_interval: Duration,
    /// How long guest faults may wait for memory the kernel refuses before the VM ends.
    pub oom_wait: Duration,
    /// Host-side reclaim: compression cache, swap file, target.
    pub reclaim: ReclaimOptions,
    /// Pages the sharing scanner hashes per second from the start (0: off until the
    /// control socket sets a rate).
    pub share_scan_rate: u64,
    /// Hand guest RAM to the kernel's KSM instead (`--ksm`), as a baseline.
    pub ksm: bool,
    /// The inherited descriptors (data, broker link) of a sharing group's pool, which `ebb host`
    /// hands to the VMs of one group; None: the VM's pages are shared only with each other.
    pub share_group_fds: Option<(i32, i32)>,
}

/// Most pages per second the sharing scanner may be asked to scan (about 16 GiB/s: more
/// than one core can hash; the scanner also stops each tick's work at half a core).
pub const MAX_SHARE_SCAN_RATE: u64 = 1 << 22;

/// The compression cache's capacity: bytes, or a share of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSize {
    /// This many bytes.
    Bytes(u64),
    /// This percentage of guest RAM.
    Percent(u64),
}

impl CacheSize {
    /// The capacity in bytes for `mem_bytes` of guest RAM.
    pub fn bytes(self, mem_bytes: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::Percent(p) => mem_bytes / 100 * p.min(100),
        }
    }
}

/// Host-side reclaim options (`--zcache-max`, `--swap-dir`, `--swap-max`,
/// `--reclaim-target`, `--reclaim-victims`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimOptions {
    /// The compression cache's capacity.
    pub cache: CacheSize,
    /// Where the swap file goes; None: `$TMPDIR`, else `/var/tmp`, and ebb runs without
    /// swap (saying so) if it cannot create the file there.
    pub swap_dir: Option<PathBuf>,
    /// Largest swap file; None: the size of guest RAM; 0: no swap file.
    pub swap_max_bytes: Option<u64>,
    /// Resident memory to keep at most from the start; None: reclaim waits for the lever.
    pub target_bytes: Option<u64>,
    /// How victims are picked.
    pub victims: VictimPolicy,
}

impl Default for ReclaimOptions {
    fn default() -> Self {
        Self {
            cache: CacheSize::Percent(DEFAULT_CACHE_PERCENT),
            swap_dir: None,
            swap_max_bytes: None,
            target_bytes: None,
            victims: VictimPolicy::default(),
        }
    }
}

impl ReclaimOptions {
    /// The swap directory: the one given, else `$TMPDIR`, else `/var/tmp`.
    pub fn swap_dir(&self) -> PathBuf {
        self.swap_dir.clone().unwrap_or_else(|| {
            std::env::var_os("TMPDIR")
                .filter(|d| !d.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_SWAP_DIR), PathBuf::from)
        })
    }

    /// Checks the options against `mem_bytes` of guest RAM.
    pub fn validate(&self, mem_bytes: u64) -> Result<(), ConfigError> {
        match self.cache {
            CacheSize::Percent(p) if p > 100 => {
                return Err(ConfigError::CacheSize(format!("{p}%")))
            }
            CacheSize::Bytes(b) if b > mem_bytes => {
                return Err(ConfigError::CacheSize(crate::units::human_bytes(b)))
            }
            _ => {}
        }
        match self.target_bytes {
            Some(t) if t > mem_bytes => {
                Err(ConfigError::ReclaimTarget { target: t, mem: mem_bytes })
            }
            _ => Ok(()),
        }
    }
}

/// Default swap directory when `$TMPDIR` is not set.
pub const DEFAULT_SWAP_DIR: &str = "/var/tmp";

/// Parses `--zcache-max`: a size (`64M`) or a percentage of guest RAM (`10%`).
pub fn parse_cache_size(s: &str) -> Result<CacheSize, ConfigError> {
    if let Some(p) = s.strip_suffix('%') {
        return p.parse().map(CacheSize::Percent).map_err(|_| ConfigError::CacheSize(s.to_owned()));
    }
    Ok(CacheSize::Bytes(parse_size(s)?))
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            uffd: true,
            uffd_dev: PathBuf::from(DEFAULT_UFFD_DEV),
            fault_around: FaultAround::default(),
            active: ActiveConfig::default(),
            stats_json: None,
            stats_interval: DEFAULT_STATS_INTERVAL,
            oom_wait: DEFAULT_OOM_WAIT,
            reclaim: ReclaimOptions::default(),
            share_scan_rate: 0,
            ksm: false,
            share_group_fds: None,
        }
    }
}

impl MemoryConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.fault_around.max() > MAX_FAULT_AROUND {
            return Err(ConfigError::FaultAround(self.fault_around.to_string()));
        }
        let ms = |d: Duration| d.as_millis();
        if !INTERVAL_RANGE_MS.contains(&ms(self.stats_interval)) {
            let (what, value) = ("--stats-interval", self.stats_interval);
            return Err(ConfigError::Interval { what, value, range: "10 ms to 1 hour" });
        }
        if !INTERVAL_RANGE_MS.contains(&ms(self.active.interval)) {
            let (what, value) = ("--active-interval-ms", self.active.interval);
            return Err(ConfigError::Interval { what, value, range: "10 ms to 1 hour" });
        }
        if self.oom_wait > MAX_OOM_WAIT {
            let (what, value) = ("--oom-wait", self.oom_wait);
            return Err(ConfigError::Interval { what, value, range: "0 to 1 hour" });
        }
        if !(1..=MAX_SAMPLE_PAGES).contains(&self.active.sample_pages) {
            return Err(ConfigError::SamplePages(self.active.sample_pages));
        }
        let rate = sample_rate(&self.active);
        if rate > MAX_SAMPLE_PAGES_PER_S {
            return Err(ConfigError::SampleRate {
                pages: self.active.sample_pages,
                interval_ms: self.active.interval.as_millis(),
                rate,
                max: MAX_SAMPLE_PAGES_PER_S,
            });
        }
        if !self.uffd && matches!(self.fault_around, FaultAround::Fixed(n) if n > 0) {
            return Err(ConfigError::NeedsUffd("--fault-around"));
        }
        if !self.uffd && self.reclaim.target_bytes.is_some() {
            return Err(ConfigError::NeedsUffd("--reclaim-target"));
        }
        if self.share_scan_rate > MAX_SHARE_SCAN_RATE {
            return Err(ConfigError::ScanRate {
                rate: self.share_scan_rate,
                max: MAX_SHARE_SCAN_RATE,
            });
        }
        if !self.uffd && self.share_scan_rate > 0 {
            return Err(ConfigError::NeedsUffd("--share-scan-rate"));
        }
        if self.ksm && (self.share_scan_rate > 0 || self.share_group_fds.is_some()) {
            return Err(ConfigError::TwoSharers);
        }
        if !self.uffd && self.share_group_fds.is_some() {
            return Err(ConfigError::NeedsUffd("--share-group-fds"));
        }
        Ok(())
    }
}

impl VmConfig {
    /// A config with defaults that boots the given source.
    pub fn new(boot: BootSource) -> Self {
        Self {
            mem_bytes: DEFAULT_MEM_BYTES,
            vcpus: 1,
            boot,
            serial_log: None,
            kvm_path: PathBuf::from(DEFAULT_KVM_DEV),
            memory: MemoryConfig::default(),
            balloon: None,
            disks: Vec::new(),
            api_sock: None,
            metrics_addr: None,
            jail: crate::jail::JailOptions::default(),
        }
    }

    /// Checks the rules that do not need the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mem_bytes == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if !crate::units::is_page_aligned(self.mem_bytes) {
            return Err(ConfigError::UnalignedMemory(self.mem_bytes));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        self.memory.reclaim.validate(self.mem_bytes)?;
        self.memory.validate()
    }
}

/// Parses `--fault-around`: `auto` (adaptive, up to the maximum) or a fixed page count.
pub fn parse_fault_around(s: &str) -> Result<FaultAround, ConfigError> {
    if s == "auto" {
        return Ok(FaultAround::default());
    }
    match s.parse::<u64>() {
        Ok(n) if n <= MAX_FAULT_AROUND => Ok(FaultAround::Fixed(n)),
        _ => Err(ConfigError::FaultAround(s.to_owned())),
    }
}

/// A balloon size in bytes as whole MiB; `1536K` is refused rather than rounded down.
pub fn balloon_mib(bytes: u64) -> Result<u64, ConfigError> {
    exact_mib(bytes).ok_or(ConfigError::BalloonNotMib(bytes))
}

/// Parses `--balloon [target=SIZE,stats=SECS,deflate_on_oom=on,free_page_reporting=on]`
/// (all optional; an empty string gives a balloon with every option off and no target).
pub fn parse_balloon(s: &str) -> Result<BalloonConfig, ConfigError> {
    let err = || ConfigError::Balloon(s.to_owned());
    let on_off = |v: &str| match v {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(err()),
    };
    let mut c = BalloonConfig::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(err)?;
        match k {
            "target" => c.target_mib = balloon_mib(parse_size(v).map_err(|_| err())?)?,
            "stats" => c.stats_interval_s = v.parse().map_err(|_| err())?,
            "deflate_on_oom" => c.deflate_on_oom = on_off(v)?,
            "free_page_reporting" => c.free_page_reporting = on_off(v)?,
            _ => return Err(err()),
        }
    }
    Ok(c)
}

/// Parses one `KEY=VALUE` firmware argument.
pub fn parse_firmware_arg(s: &str) -> Result<(String, String), ConfigError> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty()
                && !k.contains(char::is_whitespace)
                && !v.contains(char::is_whitespace) =>
        {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(ConfigError::InvalidFirmwareArg(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_memory_is_written_once_in_two_forms_that_agree() {
        assert_eq!(parse_size(DEFAULT_MEM), Ok(DEFAULT_MEM_BYTES));
    }

    #[test]
    fn zero_and_unaligned_memory_are_rejected() {
        let mut c = VmConfig::new(BootSource::Firmware {
            source: FirmwareSource::Builtin("hello".into()),
            args: vec![],
            blob: None,
        });
        c.mem_bytes = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroMemory));
        c.mem_bytes = 4097;
        assert_eq!(c.validate(), Err(ConfigError::UnalignedMemory(4097)));
        c.mem_bytes = 1 << 20;
        c.vcpus = 33;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(33)));
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(0)));
    }

    #[test]
    fn memory_options_are_range_checked() {
        let mut m = MemoryConfig::default();
        assert_eq!(m.validate(), Ok(()));
        m.fault_around = FaultAround::Fixed(256);
        assert_eq!(m.validate(), Err(ConfigError::FaultAround("256".into())));
        m.fault_around = FaultAround::Fixed(255);
        assert_eq!(m.validate(), Ok(()));
        m.uffd = false;
        assert_eq!(m.validate(), Err(ConfigError::NeedsUffd("--fault-around")));
        m.fault_around = FaultAround::default();
        assert_eq!(m.validate(), Ok(()), "the adaptive default is fine without userfaultfd");
        m.reclaim.target_bytes = Some(1 << 20);
        assert_eq!(m.validate(), Err(ConfigError::NeedsUffd("--reclaim-target")));
        m.reclaim.target_bytes = None;
        m = MemoryConfig { stats_interval: Duration::ZERO, ..Default::default() };
        assert!(matches!(m.validate(), Err(ConfigError::Interval { .. })));
        m = MemoryConfig::default();
        m.active.sample_pages = 0;
        assert_eq!(m.validate(), Err(ConfigError::SamplePages(0)));
        m.active = ActiveConfig { interval: Duration::from_millis(10), sample_pages: 100_000 };
        assert!(matches!(m.validate(), Err(ConfigError::SampleRate { rate: 10_000_000, .. })));
        m.active.sample_pages = 200;
        assert_eq!(m.validate(), Ok(()), "20000 pages/s is the most");
    }

    #[test]
    fn disk_options_parse_path_and_read_only() {
        let rw = DiskConfig { path: PathBuf::from("/img/a.raw"), read_only: false };
        assert_eq!(parse_disk("/img/a.raw"), Ok(rw));
        let ro = DiskConfig { path: PathBuf::from("a,b.raw"), read_only: true };
        assert_eq!(parse_disk("a,b.raw,ro"), Ok(ro));
        assert_eq!(parse_disk(",ro"), Err(ConfigError::Disk(",ro".into())));
        assert!(parse_disk("").is_err());
    }

    #[test]
    fn balloon_options_parse() {
        let c =
            parse_balloon("target=64M,stats=2,deflate_on_oom=on,free_page_reporting=on").unwrap();
        let want = BalloonConfig {
            target_mib: 64,
            stats_interval_s: 2,
            deflate_on_oom: true,
            free_page_reporting: true,
        };
        assert_eq!(c, want);
        assert_eq!(parse_balloon("").unwrap(), BalloonConfig::default());
        for bad in ["target", "target=lots", "stats=-1", "colour=blue", "deflate_on_oom=maybe"] {
            assert!(parse_balloon(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_balloon_size_that_is_not_whole_mib_is_refused_not_truncated() {
        assert_eq!(parse_balloon("target=1536K"), Err(ConfigError::BalloonNotMib(1536 << 10)));
        assert_eq!(parse_balloon("target=2048K").unwrap().target_mib, 2);
        assert_eq!(balloon_mib(64 << 20), Ok(64));
    }

    #[test]
    fn the_compression_cache_is_a_size_or_a_share_of_guest_ram() {
        assert_eq!(parse_cache_size("10%"), Ok(CacheSize::Percent(10)));
        assert_eq!(parse_cache_size("64M"), Ok(CacheSize::Bytes(64 << 20)));
        assert_eq!(CacheSize::Percent(10).bytes(1000 << 20), 100 << 20);
        assert!(parse_cache_size("lots%").is_err());
        let mut r = ReclaimOptions { cache: CacheSize::Percent(200), ..Default::default() };
        assert_eq!(r.validate(1 << 30), Err(ConfigError::CacheSize("200%".into())));
        r.cache = CacheSize::Percent(10);
        r.target_bytes = Some(2 << 30);
        assert!(matches!(r.validate(1 << 30), Err(ConfigError::ReclaimTarget { .. })));
    }

    #[test]
    fn fault_around_is_auto_or_a_page_count() {
        assert_eq!(parse_fault_around("auto"), Ok(FaultAround::default()));
        assert_eq!(parse_fault_around("0"), Ok(FaultAround::Fixed(0)));
        assert_eq!(parse_fault_around("255"), Ok(FaultAround::Fixed(255)));
        for bad in ["256", "-1", "lots", ""] {
            assert!(parse_fault_around(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn firmware_args_need_key_and_equals() {
        assert_eq!(parse_firmware_arg("pages=16"), Ok(("pages".into(), "16".into())));
        assert_eq!(parse_firmware_arg("empty="), Ok(("empty".into(), "".into())));
        assert!(parse_firmware_arg("pages").is_err());
        assert!(parse_firmware_arg("=16").is_err());
        assert!(parse_firmware_arg("a b=1").is_err());
    }

    #[test]
    fn firmware_source_with_slash_is_a_path() {
        assert_eq!(FirmwareSource::parse("./x.elf"), FirmwareSource::File("./x.elf".into()));
        assert_eq!(FirmwareSource::parse("touch"), FirmwareSource::Builtin("touch".into()));
    }
}
