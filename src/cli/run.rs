//! `ebb run`'s command line, shared by the two binaries that run a VM: `ebb` (every
//! subcommand) and `ebb-vm` (only `run`: what `ebb host` starts for each VM, so that a VM
//! process carries neither the lab's charts nor `ebb top`'s terminal UI).
//!
//! [`RunArgs`] are the flags, grouped under help headings; [`build_config`] turns them into
//! a [`VmConfig`]; [`main`] runs the VM and turns its outcome into an exit status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, Parser};
use serde::{Deserialize, Serialize};

use crate::config::{
    parse_balloon, parse_cache_size, parse_disk, parse_fault_around, parse_firmware_arg,
    BootSource, FirmwareSource, MemoryConfig, ReclaimOptions, VmConfig, DEFAULT_KVM_DEV,
    DEFAULT_MEM, DEFAULT_STATS_INTERVAL,
};
use crate::mm::fault::active::{ActiveConfig, DEFAULT_INTERVAL_MS, DEFAULT_SAMPLE_PAGES};
use crate::mm::fault::around::FaultAround;
use crate::mm::fault::handler::DEFAULT_OOM_WAIT;
use crate::mm::reclaim::DEFAULT_CACHE_PERCENT;
use crate::mm::uffd::DEFAULT_UFFD_DEV;
use crate::units::parse_size;
use crate::vmm::{exit_status, DEFAULT_PAYLOAD};

/// A size on the command line (`512M`, `2G`, `4096`), in bytes.
fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Sizes in a VM's file: a string (`"512M"`) or a number of bytes.
mod size_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }

    fn bytes(size: Size) -> Result<u64, String> {
        match size {
            Size::Bytes(b) => Ok(b),
            Size::Text(t) => crate::units::parse_size(&t).map_err(|e| e.to_string()),
        }
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        bytes(
            Size::deserialize(d)
                .map_err(|_| serde::de::Error::custom("a size: \"512M\" or a number of bytes"))?,
        )
        .map_err(serde::de::Error::custom)
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(b) => s.serialize_some(b),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            let size = Option::<super::Size>::deserialize(d)
                .map_err(|_| serde::de::Error::custom("a size: \"512M\" or a number of bytes"))?;
            size.map(super::bytes).transpose().map_err(serde::de::Error::custom)
        }
    }
}

/// The flags of `ebb run`, under a help heading each; also a VM's description file
/// (`--config`), whose keys are the flags' names with `_` for `-` (the process's own flags,
/// `--uid` and the like, stay on the command line).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunArgs {
    /// Read the VM's description from this TOML file; flags given beside it win.
    #[arg(long, value_name = "PATH", help_heading = "Guest")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Linux kernel: a bzImage, or an ELF vmlinux with a PVH note.
    #[arg(long, value_name = "PATH", help_heading = "Guest")]
    kernel: Option<PathBuf>,
    /// Initrd or initramfs for the kernel.
    #[arg(long, value_name = "PATH", help_heading = "Guest")]
    initrd: Option<PathBuf>,
    /// Appended to the kernel command line ebb builds.
    #[arg(long, value_name = "STR", help_heading = "Guest")]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEM, value_parser = size_arg, help_heading = "Guest")]
    #[serde(with = "size_serde")]
    mem: u64,
    /// Number of vCPUs (1 to 32), one thread each. A payload starts on every vCPU; Linux
    /// brings up the others itself.
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Guest")]
    vcpus: u8,
    /// A built-in payload by name (hello, touch) or the path of a payload ELF file.
    #[arg(long, value_name = "NAME|PATH", help_heading = "Guest")]
    firmware: Option<String>,
    /// A file whose bytes a payload finds in guest memory (touch's `text` pages copy it).
    #[arg(long, value_name = "PATH", help_heading = "Guest")]
    firmware_blob: Option<PathBuf>,
    /// A KEY=VALUE parameter for the payload (repeatable).
    #[arg(long = "firmware-arg", value_name = "KEY=VALUE", help_heading = "Guest")]
    firmware_args: Vec<String>,
    /// Also write the serial console to this file.
    #[arg(long, value_name = "PATH", help_heading = "Guest")]
    serial_log: Option<PathBuf>,
    /// The KVM device node.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KVM_DEV, help_heading = "Isolation")]
    kvm_device: PathBuf,
    /// Back guest RAM with plain anonymous memory instead of serving it through userfaultfd.
    #[arg(long, help_heading = "Memory engine")]
    no_uffd: bool,
    /// The userfaultfd device, used when the userfaultfd syscall is refused.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_UFFD_DEV, help_heading = "Memory engine")]
    uffd_device: PathBuf,
    /// Untouched neighbour pages to map with each fault: `auto` grows the window on
    /// sequential faults and keeps it closed on scattered ones; N (0 to 255) is fixed.
    #[arg(long, value_name = "auto|N", default_value_t = FaultAround::default().to_string(), help_heading = "Memory engine")]
    fault_around: String,
    /// Write memory statistics as JSON lines to this file (every --stats-interval, and at exit).
    #[arg(long, value_name = "PATH", help_heading = "Control and statistics")]
    stats_json: Option<PathBuf>,
    /// Seconds between statistics lines (fractions allowed).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_STATS_INTERVAL.as_secs_f64(), help_heading = "Control and statistics")]
    stats_interval: f64,
    /// Seconds guest faults may wait for memory the host refuses (a memory cgroup at its
    /// limit, say) before the VM ends with an error.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_OOM_WAIT.as_secs_f64(), help_heading = "Memory engine")]
    oom_wait: f64,
    /// The compression cache's capacity: a size (64M) or a share of guest RAM (10%).
    #[arg(long, value_name = "SIZE|PCT", default_value_t = format!("{DEFAULT_CACHE_PERCENT}%"), help_heading = "Reclaim")]
    zcache_max: String,
    /// Directory of the swap file (created unlinked, mode 0600) [default: $TMPDIR, else
    /// /var/tmp].
    #[arg(long, value_name = "DIR", help_heading = "Reclaim")]
    swap_dir: Option<PathBuf>,
    /// Largest swap file (0: none) [default: the guest's RAM].
    #[arg(long, value_name = "SIZE", value_parser = size_arg, help_heading = "Reclaim")]
    #[serde(with = "size_serde::option")]
    swap_max: Option<u64>,
    /// Keep at most SIZE of the guest's memory resident: evict (compress, swap) the rest (0: off)
    #[arg(long, value_name = "SIZE", value_parser = size_arg, help_heading = "Reclaim")]
    #[serde(with = "size_serde::option")]
    reclaim_target: Option<u64>,
    /// How reclaim picks pages to evict: cold (the least recently written first) or random.
    #[arg(long, value_name = "cold|random", default_value = "cold", help_heading = "Reclaim")]
    reclaim_victims: String,
    /// Pages per second the sharing scanner hashes, looking for identical pages to back
    /// once (0: off; the control socket can turn it on later).
    #[arg(long, value_name = "PAGES/S", default_value_t = 0, help_heading = "Page sharing")]
    share_scan_rate: u64,
    /// Inherited descriptors DATA,LINK of a sharing group: the pool's sealed memfd and a
    /// packet socket to the group's broker. `ebb host` passes them to the VMs of one
    /// `sharing_group`, which then share identical pages with each other.
    #[arg(long, value_name = "DATA,LINK", help_heading = "Page sharing")]
    #[serde(skip)]
    share_group_fds: Option<String>,
    /// Mark guest RAM mergeable for the kernel's KSM instead (the baseline ebb's sharing is
    /// measured against; KSM merges across every process that asks it to).
    #[arg(long, help_heading = "Page sharing")]
    ksm: bool,
    /// Milliseconds between Active-memory samples.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_INTERVAL_MS, help_heading = "Memory engine")]
    active_interval_ms: u64,
    /// Pages in each Active-memory sample.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SAMPLE_PAGES, help_heading = "Memory engine")]
    active_sample_pages: u32,
    /// Add a virtio-balloon: [target=SIZE,stats=SECS,deflate_on_oom=on,free_page_reporting=on].
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "", help_heading = "Devices")]
    balloon: Option<String>,
    /// Add a virtio-blk disk backed by a raw image file: PATH[,ro] (repeatable: vda, vdb, ...).
    /// Opened with O_DIRECT where the file system allows, so the host does not cache what the
    /// guest caches already.
    #[arg(long, value_name = "PATH[,ro]", help_heading = "Devices")]
    disk: Vec<String>,
    /// Listen for control requests (JSON lines) on this Unix socket.
    #[arg(long, value_name = "PATH", help_heading = "Control and statistics")]
    api_sock: Option<PathBuf>,
    /// Run the guest as this user id, once /dev/kvm, the files and the socket are open
    /// (needs root; with --gid). `ebb host` started as root gives each VM its own.
    #[arg(long, value_name = "UID", requires = "gid", help_heading = "Isolation")]
    #[serde(skip)]
    uid: Option<u32>,
    /// Run the guest as this group id (with --uid); supplementary groups are dropped.
    #[arg(long, value_name = "GID", requires = "uid", help_heading = "Isolation")]
    #[serde(skip)]
    gid: Option<u32>,
    /// The control socket serves this uid and root only [default: the uid that started
    /// ebb]. `ebb host` passes its own.
    #[arg(long, value_name = "UID", help_heading = "Isolation")]
    #[serde(skip)]
    owner_uid: Option<u32>,
    /// Write the exit status to this file when the VM ends (opened at start, before the
    /// VM drops its privileges). `ebb host --state-dir` passes one, so that a host that
    /// adopted the VM after a restart learns how it ended.
    #[arg(long, value_name = "PATH", help_heading = "Control and statistics")]
    #[serde(skip)]
    status_file: Option<PathBuf>,
    /// Serve /metrics (the statistics in Prometheus's text format) and /healthz over HTTP on
    /// ADDR:PORT.
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Control and statistics")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Run without the seccomp system call filter. For debugging only: a compromised VM
    /// could then make any system call its uid allows.
    #[arg(long, help_heading = "Isolation")]
    #[serde(skip)]
    no_seccomp: bool,
}

/// The flags of the process rather than of the VM: never read from a description file.
const PROCESS_FLAGS: [&str; 7] =
    ["config", "share_group_fds", "uid", "gid", "owner_uid", "status_file", "no_seccomp"];

/// `ebb run`'s flags alone, for parsing an argument list that is only them.
#[derive(Parser, Debug)]
#[command(name = "run", no_binary_name = true)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

impl Default for RunArgs {
    /// Every flag at its default: what `ebb run` with no flags means.
    fn default() -> Self {
        match RunOnly::try_parse_from(std::iter::empty::<&str>()) {
            Ok(r) => r.args,
            // The defaults are constants the tests parse: this cannot fail at run time.
            Err(e) => unreachable!("ebb run's defaults do not parse: {e}"),
        }
    }
}

impl RunArgs {
    /// Parses `argv`, flags of `ebb run` only (no program name, no `run`).
    ///
    /// # Errors
    /// clap's message: an unknown flag, or a value that does not parse.
    pub fn parse_flags<I: IntoIterator<Item = S>, S: Into<std::ffi::OsString> + Clone>(
        argv: I,
    ) -> Result<Self, String> {
        let matches =
            RunOnly::command_for_flags().try_get_matches_from(argv).map_err(|e| e.to_string())?;
        RunOnly::from_arg_matches(&matches).map(|r| r.args).map_err(|e| e.to_string())
    }

    /// Parses `argv` as a VM's description: `ebb run` flags, none of them this process's own
    /// (`--uid`, `--status-file`, ...: the host sets those).
    ///
    /// # Errors
    /// clap's message, or the process flag that was given.
    pub fn parse_description<I: IntoIterator<Item = S>, S: Into<std::ffi::OsString> + Clone>(
        argv: I,
    ) -> Result<Self, String> {
        let matches =
            RunOnly::command_for_flags().try_get_matches_from(argv).map_err(|e| e.to_string())?;
        for id in PROCESS_FLAGS {
            if matches.value_source(id) == Some(ValueSource::CommandLine) {
                return Err(format!(
                    "--{} is the process's, not the VM's description: the host sets it",
                    id.replace('_', "-")
                ));
            }
        }
        RunOnly::from_arg_matches(&matches).map(|r| r.args).map_err(|e| e.to_string())
    }

    /// This description with the keys of `table` (a description file's keys) put over it.
    ///
    /// # Errors
    /// An unknown key, or a value of the wrong kind, named.
    pub fn with_keys(self, table: &toml::Table) -> Result<Self, String> {
        let serde_json::Value::Object(mut merged) =
            serde_json::to_value(&self).map_err(|e| e.to_string())?
        else {
            return Err("a description is a table".into());
        };
        for (key, value) in table {
            merged.insert(key.clone(), serde_json::to_value(value).map_err(|e| e.to_string())?);
        }
        let mut args: RunArgs =
            serde_json::from_value(serde_json::Value::Object(merged)).map_err(|e| e.to_string())?;
        args.take_process_flags(self);
        Ok(args)
    }

    /// Takes this process's own flags (never in a file) from `from`.
    fn take_process_flags(&mut self, from: RunArgs) {
        self.config = from.config;
        self.share_group_fds = from.share_group_fds;
        self.uid = from.uid;
        self.gid = from.gid;
        self.owner_uid = from.owner_uid;
        self.status_file = from.status_file;
        self.no_seccomp = from.no_seccomp;
    }

    /// The VM's description as TOML: what `--config` reads.
    ///
    /// # Errors
    /// A value TOML cannot hold.
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| e.to_string())
    }

    /// The description in the `--config` file, with the flags `matches` says were given on
    /// the command line put over it, and this process's own flags (uid, status file, ...)
    /// from the command line.
    fn with_file(self, matches: Option<&ArgMatches>) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| named("--config", format!("{}: {e}", path.display())))?;
        let file: RunArgs = toml::from_str(&text)
            .map_err(|e| named("--config", format!("{}: {e}", path.display())))?;
        let (Ok(serde_json::Value::Object(cli)), Ok(serde_json::Value::Object(mut merged))) =
            (serde_json::to_value(&self), serde_json::to_value(&file))
        else {
            anyhow::bail!("--config: cannot merge the file with the command line");
        };
        for (key, value) in cli {
            let given =
                matches.and_then(|m| m.value_source(&key)) == Some(ValueSource::CommandLine);
            if given {
                merged.insert(key, value);
            }
        }
        let mut args: RunArgs = serde_json::from_value(serde_json::Value::Object(merged))
            .map_err(|e| named("--config", e))?;
        args.take_process_flags(self);
        Ok(args)
    }
}

impl RunOnly {
    fn command_for_flags() -> clap::Command {
        <Self as clap::CommandFactory>::command()
    }
}

/// The VM `args` describe.
///
/// # Errors
/// A flag's value is impossible; the error names the flag.
pub fn build_config(args: RunArgs) -> anyhow::Result<VmConfig> {
    let boot = match (args.kernel, args.firmware) {
        (Some(_), Some(_)) => return Err(crate::config::ConfigError::KernelAndFirmware.into()),
        (Some(kernel), None) => {
            if !args.firmware_args.is_empty() {
                anyhow::bail!("--firmware-arg needs --firmware");
            }
            if args.firmware_blob.is_some() {
                anyhow::bail!("--firmware-blob needs --firmware (a Linux guest takes --initrd)");
            }
            BootSource::Linux {
                kernel,
                initrd: args.initrd,
                cmdline: args.cmdline.unwrap_or_default(),
            }
        }
        (None, firmware) => {
            if args.initrd.is_some() {
                return Err(crate::config::ConfigError::NeedsKernel("--initrd").into());
            }
            if args.cmdline.is_some() {
                return Err(crate::config::ConfigError::NeedsKernel("--cmdline").into());
            }
            let source = FirmwareSource::parse(firmware.as_deref().unwrap_or(DEFAULT_PAYLOAD));
            let firmware_blob = args.firmware_blob;
            let args = args
                .firmware_args
                .iter()
                .map(|a| parse_firmware_arg(a))
                .collect::<Result<_, _>>()?;
            BootSource::Firmware { source, args, blob: firmware_blob }
        }
    };
    let mut config = VmConfig::new(boot);
    config.mem_bytes = args.mem;
    config.vcpus = args.vcpus;
    config.serial_log = args.serial_log;
    config.kvm_path = args.kvm_device;
    let stats_interval = Duration::try_from_secs_f64(args.stats_interval).map_err(|_| {
        anyhow::anyhow!("--stats-interval {} is not a number of seconds", args.stats_interval)
    })?;
    config.memory = MemoryConfig {
        uffd: !args.no_uffd,
        uffd_dev: args.uffd_device,
        fault_around: parse_fault_around(&args.fault_around)?,
        active: ActiveConfig {
            interval: Duration::from_millis(args.active_interval_ms),
            sample_pages: args.active_sample_pages,
        },
        stats_json: args.stats_json,
        stats_interval,
        oom_wait: Duration::try_from_secs_f64(args.oom_wait).map_err(|_| {
            anyhow::anyhow!("--oom-wait {} is not a number of seconds", args.oom_wait)
        })?,
        reclaim: ReclaimOptions {
            cache: parse_cache_size(&args.zcache_max).map_err(|e| named("--zcache-max", e))?,
            swap_dir: args.swap_dir,
            swap_max_bytes: args.swap_max,
            // 0 means off, as on the control socket.
            target_bytes: args.reclaim_target.filter(|&t| t > 0),
            victims: args
                .reclaim_victims
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--reclaim-victims: {e}"))?,
        },
        share_scan_rate: args.share_scan_rate,
        ksm: args.ksm,
        share_group_fds: args.share_group_fds.as_deref().map(parse_fd_pair).transpose()?,
    };
    config.balloon = args.balloon.as_deref().map(parse_balloon).transpose()?;
    config.disks =
        args.disk.iter().map(String::as_str).map(parse_disk).collect::<Result<_, _>>()?;
    config.api_sock = args.api_sock;
    config.metrics_addr = args.metrics_addr;
    let identity = match (args.uid, args.gid) {
        (Some(uid), Some(gid)) => Some(crate::jail::Identity { uid, gid }),
        _ => None,
    };
    config.jail = crate::jail::JailOptions { identity, seccomp: !args.no_seccomp };
    Ok(config)
}

/// `DATA,LINK`: two descriptor numbers.
fn parse_fd_pair(s: &str) -> anyhow::Result<(i32, i32)> {
    let bad = || anyhow::anyhow!("--share-group-fds {s:?}: two descriptor numbers, DATA,LINK");
    let (d, m) = s.split_once(',').ok_or_else(bad)?;
    let fd = |x: &str| x.trim().parse::<i32>().ok().filter(|&n| n >= 0).ok_or_else(bad);
    Ok((fd(d)?, fd(m)?))
}

/// `e` with the option it is about in front, so that the message names its cause.
pub(crate) fn named(option: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{option}: {e}")
}

/// Runs the VM `args` describe; its exit status (the payload's, 0 on a reboot or power-off,
/// 1 for an error, 2 for a guest crash).
pub fn main(args: RunArgs, matches: Option<&ArgMatches>) -> ExitCode {
    let args = match args.with_file(matches) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match args.owner_uid {
        Some(uid) => crate::jail::set_owner_uid(uid),
        // Fixed now, before the VM changes its uid.
        None => {
            let _ = crate::jail::owner_uid();
        }
    }
    let status_path = args.status_file.clone();
    let mut status_file = None;
    let result = build_config(args).and_then(|c| {
        let keep = c.memory.share_group_fds.map_or(Vec::new(), |(d, m)| vec![d, m]);
        crate::jail::close_inherited_fds(&keep)?;
        if let Some(path) = &status_path {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| named("--status-file", e))?;
            status_file = Some(file);
        }
        Ok(crate::run(&c)?)
    });
    let code = match &result {
        Ok(outcome) => exit_status(outcome),
        Err(_) => 1,
    };
    if let Some(mut f) = status_file {
        use std::io::Write;
        if let Err(e) = writeln!(f, "{code}").and_then(|()| f.sync_all()) {
            eprintln!("warning: --status-file: {e}");
        }
    }
    match result {
        Ok(outcome) => {
            if let crate::RunOutcome::Crashed(report) = &outcome {
                eprint!("{report}");
            }
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(hint) = advice(&e) {
                eprintln!("  hint: {hint}");
            }
            ExitCode::from(1)
        }
    }
}

/// What the user can do about an error, in terms of the command line (the library's
/// errors name values and limits, not flags).
fn advice(e: &anyhow::Error) -> Option<&'static str> {
    use crate::boot::BootError;
    use crate::mm::engine::EngineError;
    use crate::mm::uffd::UffdError;
    use crate::vmm::VmmError;
    use crate::vstate::memory::MemoryError;
    match e.downcast_ref::<VmmError>()? {
        VmmError::Memory(MemoryError::TooLarge { .. } | MemoryError::Map { .. }) => Some(
            "ask for less --mem (the host may also cap address space with ulimit -v or vm.overcommit_memory=2)",
        ),
        VmmError::Boot(BootError::InitrdTooLarge { .. } | BootError::DoesNotFit { .. }) => {
            Some("give the VM more --mem")
        }
        VmmError::Engine(EngineError::Uffd(UffdError::Unavailable { .. })) => {
            Some("run as root, set sysctl vm.unprivileged_userfaultfd=1, give your user access to /dev/userfaultfd, or run with --no-uffd")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_round_trips_through_its_file() {
        let argv = ["--mem", "96M", "--firmware", "touch", "--firmware-arg", "pages=10"];
        let args = RunArgs::parse_description(argv).unwrap();
        let text = args.to_toml().unwrap();
        let back: RunArgs = toml::from_str(&text).unwrap();
        assert_eq!(back.to_toml().unwrap(), text);
        assert_eq!(back.mem, 96 << 20);
        assert_eq!(back.firmware_args, ["pages=10"]);
        // Every default survives too: a file that says nothing is `ebb run` with no flags.
        let empty: RunArgs = toml::from_str("").unwrap();
        assert_eq!(empty.to_toml().unwrap(), RunArgs::default().to_toml().unwrap());
    }

    #[test]
    fn a_file_takes_sizes_as_text_or_bytes_and_refuses_unknown_keys() {
        let a: RunArgs = toml::from_str("mem = \"1G\"\nswap_max = 4096\n").unwrap();
        assert_eq!((a.mem, a.swap_max), (1 << 30, Some(4096)));
        let err = toml::from_str::<RunArgs>("colour = 1\n").unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
        let err = toml::from_str::<RunArgs>("mem = \"lots\"\n").unwrap_err().to_string();
        assert!(err.contains("lots") || err.contains("size"), "{err}");
        // The process's own flags are not the VM's: a file cannot set them.
        assert!(toml::from_str::<RunArgs>("uid = 0\n").is_err());
    }

    #[test]
    fn a_description_refuses_the_processs_own_flags() {
        let err = RunArgs::parse_description(["--uid", "5", "--gid", "5"]).unwrap_err();
        assert!(err.contains("--uid"), "{err}");
        let err = RunArgs::parse_description(["--status-file", "/x"]).unwrap_err();
        assert!(err.contains("--status-file"), "{err}");
    }
}
