//! What one VM is made of, as the command line (or a later API) describes it.
//!
//! Plain data plus the parsing of sizes and `KEY=VALUE` pairs; no KVM here, so every rule is
//! unit-tested without privileges.

use std::path::PathBuf;
use std::time::Duration;

use crate::devices::virtio::balloon::BalloonConfig;
use crate::mm::active::ActiveConfig;
use crate::mm::uffd::handler::MAX_FAULT_AROUND;

/// Default guest memory: 256 MiB.
pub const DEFAULT_MEM_BYTES: u64 = 256 << 20;
/// Most vCPUs this version can run: SMP needs an MP table and per-vCPU threads with kicks,
/// which are not done yet.
pub const MAX_VCPUS: u8 = 1;

/// Errors in a VM description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string that is not `<number>[K|M|G|T]`.
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 512M, 2G)")]
    InvalidSize(String),
    /// Guest memory of zero bytes.
    #[error("--mem must be larger than 0")]
    ZeroMemory,
    /// Guest memory that is not a whole number of 4 KiB pages.
    #[error("--mem {0} is not a multiple of 4 KiB")]
    UnalignedMemory(u64),
    /// A vCPU count out of range.
    #[error("--vcpus {0} is not supported: this version runs exactly {MAX_VCPUS} vCPU")]
    VcpuCount(u8),
    /// A firmware argument without `=`.
    #[error("invalid --firmware-arg {0:?}: expected KEY=VALUE")]
    InvalidFirmwareArg(String),
    /// Both `--kernel` and `--firmware` given.
    #[error("--kernel and --firmware exclude each other: boot either a Linux kernel or a payload")]
    KernelAndFirmware,
    /// Fault-around beyond what one ioctl should fill.
    #[error("--fault-around {0} is out of range: use 0 to {MAX_FAULT_AROUND} pages")]
    FaultAround(u64),
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
    /// An Active sample size out of range.
    #[error("--active-sample-pages {0} is out of range: use 1 to 100000")]
    SamplePages(u32),
    /// Options of the lazy-RAM engine given with `--no-uffd`.
    #[error("{0} needs userfaultfd: drop --no-uffd")]
    NeedsUffd(&'static str),
    /// A `--balloon` option that does not parse.
    #[error(
        "invalid --balloon {0:?}: expected target=SIZE,stats=SECS,deflate_on_oom=on|off,free_page_reporting=on|off"
    )]
    Balloon(String),
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
    /// The control socket, if any.
    pub api_sock: Option<PathBuf>,
}

/// The lazy-RAM engine's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Serve guest RAM through userfaultfd (false: plain anonymous memory, `--no-uffd`).
    pub uffd: bool,
    /// The userfaultfd device, used when the syscall is refused.
    pub uffd_dev: PathBuf,
    /// Untouched neighbours to fill with each fault.
    pub fault_around: u64,
    /// Active-memory sampling.
    pub active: ActiveConfig,
    /// Where to write JSON-lines statistics.
    pub stats_json: Option<PathBuf>,
    /// Time between statistics lines.
    pub stats_interval: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            uffd: true,
            uffd_dev: PathBuf::from("/dev/userfaultfd"),
            fault_around: 0,
            active: ActiveConfig::default(),
            stats_json: None,
            stats_interval: Duration::from_secs(1),
        }
    }
}

impl MemoryConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.fault_around > MAX_FAULT_AROUND {
            return Err(ConfigError::FaultAround(self.fault_around));
        }
        let ms = |d: Duration| d.as_millis();
        if !(10..=3_600_000).contains(&ms(self.stats_interval)) {
            let (what, value) = ("--stats-interval", self.stats_interval);
            return Err(ConfigError::Interval { what, value, range: "10 ms to 1 hour" });
        }
        if !(10..=3_600_000).contains(&ms(self.active.interval)) {
            let (what, value) = ("--active-interval-ms", self.active.interval);
            return Err(ConfigError::Interval { what, value, range: "10 ms to 1 hour" });
        }
        if !(1..=100_000).contains(&self.active.sample_pages) {
            return Err(ConfigError::SamplePages(self.active.sample_pages));
        }
        if !self.uffd && self.fault_around > 0 {
            return Err(ConfigError::NeedsUffd("--fault-around"));
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
            kvm_path: PathBuf::from("/dev/kvm"),
            memory: MemoryConfig::default(),
            balloon: None,
            api_sock: None,
        }
    }

    /// Checks the rules that do not need the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mem_bytes == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if self.mem_bytes % 4096 != 0 {
            return Err(ConfigError::UnalignedMemory(self.mem_bytes));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        self.memory.validate()
    }
}

/// Formats a byte count with the largest binary unit that divides it (`3 GiB`, `1000 TiB`).
pub fn human_bytes(n: u64) -> String {
    let units = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    match units.iter().find(|(shift, _)| n != 0 && n % (1u64 << shift) == 0) {
        Some((shift, unit)) => format!("{} {unit}", n >> shift),
        None => format!("{n} bytes"),
    }
}

/// Parses `512M`, `2G`, `4096`, `64K`, `1T` (binary units, case-insensitive, optional `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::InvalidSize(s.to_owned());
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(err)
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
            "target" => c.target_mib = parse_size(v).map_err(|_| err())? >> 20,
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
    fn sizes_with_suffixes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn human_bytes_picks_the_largest_exact_unit() {
        assert_eq!(human_bytes(3 << 30), "3 GiB");
        assert_eq!(human_bytes(1536 << 20), "1536 MiB");
        assert_eq!(human_bytes(1000 << 40), "1000 TiB");
        assert_eq!(human_bytes(4097), "4097 bytes");
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for s in ["", "M", "12X", "-1G", "1.5G", "99999999999999999999"] {
            assert!(parse_size(s).is_err(), "{s:?} should be rejected");
        }
        assert!(parse_size("17179869184G").is_err(), "overflow must be caught");
    }

    #[test]
    fn zero_and_unaligned_memory_are_rejected() {
        let mut c = VmConfig::new(BootSource::Firmware {
            source: FirmwareSource::Builtin("hello".into()),
            args: vec![],
        });
        c.mem_bytes = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroMemory));
        c.mem_bytes = 4097;
        assert_eq!(c.validate(), Err(ConfigError::UnalignedMemory(4097)));
        c.mem_bytes = 1 << 20;
        c.vcpus = 2;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(2)));
    }

    #[test]
    fn memory_options_are_range_checked() {
        let mut m = MemoryConfig::default();
        assert_eq!(m.validate(), Ok(()));
        m.fault_around = 256;
        assert_eq!(m.validate(), Err(ConfigError::FaultAround(256)));
        m.fault_around = 255;
        assert_eq!(m.validate(), Ok(()));
        m.uffd = false;
        assert_eq!(m.validate(), Err(ConfigError::NeedsUffd("--fault-around")));
        m = MemoryConfig { stats_interval: Duration::ZERO, ..Default::default() };
        assert!(matches!(m.validate(), Err(ConfigError::Interval { .. })));
        m = MemoryConfig::default();
        m.active.sample_pages = 0;
        assert_eq!(m.validate(), Err(ConfigError::SamplePages(0)));
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
