//! The `ebb` command: parse the command line, run the VM, turn the outcome into an exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use ebb::config::{
    parse_balloon, parse_cache_size, parse_disk, parse_fault_around, parse_firmware_arg,
    BootSource, FirmwareSource, MemoryConfig, ReclaimOptions, VmConfig, DEFAULT_KVM_DEV,
    DEFAULT_MEM, DEFAULT_STATS_INTERVAL,
};
use ebb::mm::fault::active::{ActiveConfig, DEFAULT_INTERVAL_MS, DEFAULT_SAMPLE_PAGES};
use ebb::mm::fault::around::FaultAround;
use ebb::mm::fault::handler::DEFAULT_OOM_WAIT;
use ebb::mm::reclaim::DEFAULT_CACHE_PERCENT;
use ebb::mm::uffd::DEFAULT_UFFD_DEV;
use ebb::units::parse_size;
use ebb::vmm::{exit_status, DEFAULT_PAYLOAD};

/// A small, fast KVM hypervisor that overcommits guest memory the way ESXi does.
#[derive(Parser)]
#[command(name = "ebb", version)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM: a Linux kernel, a firmware payload, or (with neither) the built-in `hello`.
    Run(Box<RunArgs>),
    /// Talk to a running VM, or a host, through its control socket.
    Ctl(CtlArgs),
    /// Run many VMs under one memory budget: each VM its own `ebb run` process, steered
    /// by the memory states and a policy.
    Host(HostArgs),
    /// A live view of a running host (q quits).
    Top(TopArgs),
    /// Compare reclamation policies on scenarios, with the real host and VMs.
    Lab(LabArgs),
}

#[derive(Args)]
struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Run scenarios (lab/scenarios/*.toml) under policies; print a table per scenario.
    Run {
        /// Scenario files.
        #[arg(required = true, value_name = "SCENARIO")]
        scenarios: Vec<PathBuf>,
        /// A policy spec to run (repeatable; NAME or NAME:tax=N,share=N) [default: every
        /// shipped policy].
        #[arg(long = "policy", value_name = "SPEC")]
        policies: Vec<String>,
        /// Write PNG charts into this directory.
        #[arg(long, value_name = "DIR")]
        plot: Option<PathBuf>,
        /// Run each policy (and the unconstrained baseline) this many times; each row shows
        /// the median run, with the least and most progress beside it.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
        repeat: u16,
        /// Multiply the scenarios' sizes and times by this (0.5: half as big and long).
        #[arg(long, value_name = "FACTOR", default_value_t = 1.0)]
        scale: f64,
    },
    /// Find the overcommit each policy reaches before the guests' hot loops slow down by
    /// more than 5% and 10%: runs each scenario at shrinking budgets.
    Sweep {
        /// Scenario files.
        #[arg(required = true, value_name = "SCENARIO")]
        scenarios: Vec<PathBuf>,
        /// A policy spec to sweep (repeatable; NAME or NAME:tax=N,share=N) [default: every
        /// shipped policy].
        #[arg(long = "policy", value_name = "SPEC")]
        policies: Vec<String>,
        /// Budgets to try, as fractions of the unconstrained runs' peak consumption.
        #[arg(long, value_name = "F,F,...", default_value = "1.2,1.0,0.9,0.8,0.7,0.6,0.5")]
        budgets: String,
        /// Multiply the scenarios' sizes and times by this (0.5: half as big and long).
        #[arg(long, value_name = "FACTOR", default_value_t = 1.0)]
        scale: f64,
    },
}

#[derive(Args)]
struct HostArgs {
    /// The host's description (TOML): budget, policy, [[vm]] tables.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Memory the VMs may consume together, e.g. 768M or 8G (overrides the file's).
    #[arg(long, value_name = "SIZE")]
    budget: Option<String>,
    /// A VM as an inline TOML table (repeatable), e.g.
    /// '{name = "a", memory = "512M", firmware = "touch"}'.
    #[arg(long = "vm", value_name = "TABLE")]
    vms: Vec<String>,
    /// The reclamation policy.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// Milliseconds between policy ticks (overrides the file's; default 1000).
    #[arg(long, value_name = "MS")]
    tick_ms: Option<u64>,
    /// Listen for control requests (JSON lines) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Write the host and every VM as one JSON line per tick to this file.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    /// Directory for the VMs' control sockets [default: a fresh one in $TMPDIR, mode 0700].
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Keep the list of running VMs in DIR (made mode 0700 if missing), with their sockets,
    /// logs and exit statuses: VMs then outlive the host, and a host started again on DIR
    /// adopts those still running and goes on steering them.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// With --state-dir, VMs still die with the host (SIGKILL when it dies), as without one.
    #[arg(long, requires = "state_dir")]
    vms_die_with_host: bool,
    /// Run until a signal, even with no VM: VMs are created and destroyed through the
    /// control socket (`ebb ctl create`). Without it the host exits when its last VM ends.
    #[arg(long)]
    keep_running: bool,
    /// Serve /metrics (Prometheus's text format) and /healthz over HTTP on ADDR:PORT
    /// (port 0: any free one; the address is printed).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Started as root, the host runs VM number N (from 0, in start order) as uid and gid
    /// BASE + N.
    #[arg(long, value_name = "BASE", default_value_t = ebb::jail::DEFAULT_VM_UID_BASE)]
    vm_uid_base: u32,
}

#[derive(Args)]
struct TopArgs {
    /// The host's control socket (its --api-sock).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    interval: f64,
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's control socket (its --api-sock).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

/// A size on the command line (`128M`, `2G`, `4096`), in bytes.
fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A lever on the command line: a size, or `off` (None).
#[derive(Debug, Clone, Copy)]
struct Lever(Option<u64>);

/// Parses a [`Lever`].
fn lever_arg(s: &str) -> Result<Lever, String> {
    if s == "off" {
        return Ok(Lever(None));
    }
    size_arg(s).map(|b| Lever(Some(b)))
}

/// A scan rate on the command line: pages per second, or `off` (0).
fn rate_arg(s: &str) -> Result<u64, String> {
    if s == "off" {
        return Ok(0);
    }
    s.parse().map_err(|_| format!("{s:?} is not a number of pages per second, nor off"))
}

#[derive(Subcommand)]
enum CtlRequest {
    /// The protocol version the socket speaks, and ebb's.
    Version,
    /// Set the balloon size: the memory the guest gives back (e.g. 128M; 4 KiB pages).
    Balloon {
        /// Size, e.g. 128M or 1G.
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    /// The balloon's target, actual size and the guest's memory statistics.
    BalloonStats,
    /// The VM's memory statistics (the --stats-json object).
    Stats,
    /// Keep at most SIZE of the guest's memory resident (e.g. 64M), or `off`.
    Reclaim {
        /// Size, e.g. 64M, or off.
        #[arg(value_parser = lever_arg)]
        size: Lever,
    },
    /// Scan RATE pages per second for identical pages to share, or `off`.
    Sharing {
        /// Pages per second, or off.
        #[arg(value_parser = rate_arg)]
        rate: u64,
    },
    /// Make the guest's new memory wait while SIZE or more is resident (e.g. 64M), or `off`.
    Alloc {
        /// Size, e.g. 64M, or off.
        #[arg(value_parser = lever_arg)]
        size: Lever,
    },
    /// A host's VMs: name, pid, running or how it ended, control socket.
    Vms,
    /// A host's report: budget, free, minFree, state, every VM's figures and targets.
    HostStats,
    /// A host's report in Prometheus's text format.
    Metrics,
    /// Set a host's memory budget (e.g. 512M).
    Budget {
        /// Size, e.g. 512M or 2G.
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    /// Start a VM on a host: its `[[vm]]` table inline, e.g.
    /// '{name = "c", memory = "256M", firmware = "touch"}'. Admitted against the budget.
    Create {
        /// The VM as an inline TOML table.
        table: String,
    },
    /// Ask a host's VM to stop (SIGTERM, then SIGKILL after 10 s).
    Stop {
        /// The VM's name.
        name: String,
    },
    /// Kill a host's VM if it runs, and forget it.
    Destroy {
        /// The VM's name.
        name: String,
    },
    /// One of a host's VMs: its process, its description, its last figures.
    Inspect {
        /// The VM's name.
        name: String,
    },
    /// A host's events (VMs started and ended, states, levers, budgets), one JSON per line.
    Events {
        /// Print the events after this sequence number (0: every one the host kept).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing new events until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Send a request to one of a host's VMs, e.g. `vm a '{"stats":{}}'`.
    Vm {
        /// The VM's name.
        name: String,
        /// The request, as JSON (one of a VM's requests, not a lever the host owns).
        request: String,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Linux kernel: a bzImage, or an ELF vmlinux with a PVH note.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initrd or initramfs for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Appended to the kernel command line ebb builds.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEM)]
    mem: String,
    /// Number of vCPUs (1 to 32), one thread each. A payload starts on every vCPU; Linux
    /// brings up the others itself.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// A built-in payload by name (hello, touch) or the path of a payload ELF file.
    #[arg(long, value_name = "NAME|PATH")]
    firmware: Option<String>,
    /// A file whose bytes a payload finds in guest memory (touch's `text` pages copy it).
    #[arg(long, value_name = "PATH")]
    firmware_blob: Option<PathBuf>,
    /// A KEY=VALUE parameter for the payload (repeatable).
    #[arg(long = "firmware-arg", value_name = "KEY=VALUE")]
    firmware_args: Vec<String>,
    /// Also write the serial console to this file.
    #[arg(long, value_name = "PATH")]
    serial_log: Option<PathBuf>,
    /// The KVM device node.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KVM_DEV)]
    kvm_device: PathBuf,
    /// Back guest RAM with plain anonymous memory instead of serving it through userfaultfd.
    #[arg(long)]
    no_uffd: bool,
    /// The userfaultfd device, used when the userfaultfd syscall is refused.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_UFFD_DEV)]
    uffd_device: PathBuf,
    /// Untouched neighbour pages to map with each fault: `auto` grows the window on
    /// sequential faults and keeps it closed on scattered ones; N (0 to 255) is fixed.
    #[arg(long, value_name = "auto|N", default_value_t = FaultAround::default().to_string())]
    fault_around: String,
    /// Write memory statistics as JSON lines to this file (every --stats-interval, and at exit).
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    /// Seconds between statistics lines (fractions allowed).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_STATS_INTERVAL.as_secs_f64())]
    stats_interval: f64,
    /// Seconds guest faults may wait for memory the host refuses (a memory cgroup at its
    /// limit, say) before the VM ends with an error.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_OOM_WAIT.as_secs_f64())]
    oom_wait: f64,
    /// The compression cache's capacity: a size (64M) or a share of guest RAM (10%).
    #[arg(long, value_name = "SIZE|PCT", default_value_t = format!("{DEFAULT_CACHE_PERCENT}%"))]
    zcache_max: String,
    /// Directory of the swap file (created unlinked, mode 0600) [default: $TMPDIR, else
    /// /var/tmp].
    #[arg(long, value_name = "DIR")]
    swap_dir: Option<PathBuf>,
    /// Largest swap file (0: none) [default: the guest's RAM].
    #[arg(long, value_name = "SIZE")]
    swap_max: Option<String>,
    /// Keep at most SIZE of the guest's memory resident: evict (compress, swap) the rest (0: off)
    #[arg(long, value_name = "SIZE")]
    reclaim_target: Option<String>,
    /// How reclaim picks pages to evict: cold (the least recently written first) or random.
    #[arg(long, value_name = "cold|random", default_value = "cold")]
    reclaim_victims: String,
    /// Pages per second the sharing scanner hashes, looking for identical pages to back
    /// once (0: off; the control socket can turn it on later).
    #[arg(long, value_name = "PAGES/S", default_value_t = 0)]
    share_scan_rate: u64,
    /// Inherited descriptors DATA,LINK of a sharing group: the pool's sealed memfd and a
    /// packet socket to the group's broker. `ebb host` passes them to the VMs of one
    /// `sharing_group`, which then share identical pages with each other.
    #[arg(long, value_name = "DATA,LINK")]
    share_group_fds: Option<String>,
    /// Mark guest RAM mergeable for the kernel's KSM instead (the baseline ebb's sharing is
    /// measured against; KSM merges across every process that asks it to).
    #[arg(long)]
    ksm: bool,
    /// Milliseconds between Active-memory samples.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_INTERVAL_MS)]
    active_interval_ms: u64,
    /// Pages in each Active-memory sample.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SAMPLE_PAGES)]
    active_sample_pages: u32,
    /// Add a virtio-balloon: [target=SIZE,stats=SECS,deflate_on_oom=on,free_page_reporting=on].
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<String>,
    /// Add a virtio-blk disk backed by a raw image file: PATH[,ro] (repeatable: vda, vdb, ...).
    /// Opened with O_DIRECT where the file system allows, so the host does not cache what the
    /// guest caches already.
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<String>,
    /// Listen for control requests (JSON lines) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Run the guest as this user id, once /dev/kvm, the files and the socket are open
    /// (needs root; with --gid). `ebb host` started as root gives each VM its own.
    #[arg(long, value_name = "UID", requires = "gid")]
    uid: Option<u32>,
    /// Run the guest as this group id (with --uid); supplementary groups are dropped.
    #[arg(long, value_name = "GID", requires = "uid")]
    gid: Option<u32>,
    /// The control socket serves this uid and root only [default: the uid that started
    /// ebb]. `ebb host` passes its own.
    #[arg(long, value_name = "UID")]
    owner_uid: Option<u32>,
    /// Write the exit status to this file when the VM ends (opened at start, before the
    /// VM drops its privileges). `ebb host --state-dir` passes one, so that a host that
    /// adopted the VM after a restart learns how it ended.
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// Run without the seccomp system call filter. For debugging only: a compromised VM
    /// could then make any system call its uid allows.
    #[arg(long)]
    no_seccomp: bool,
}

fn build_config(args: RunArgs) -> anyhow::Result<VmConfig> {
    let boot = match (args.kernel, args.firmware) {
        (Some(_), Some(_)) => return Err(ebb::config::ConfigError::KernelAndFirmware.into()),
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
                return Err(ebb::config::ConfigError::NeedsKernel("--initrd").into());
            }
            if args.cmdline.is_some() {
                return Err(ebb::config::ConfigError::NeedsKernel("--cmdline").into());
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
    config.mem_bytes = parse_size(&args.mem).map_err(|e| named("--mem", e))?;
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
            swap_max_bytes: (args.swap_max.as_deref().map(parse_size).transpose())
                .map_err(|e| named("--swap-max", e))?,
            // 0 means off, as on the control socket.
            target_bytes: args
                .reclaim_target
                .as_deref()
                .map(parse_size)
                .transpose()
                .map_err(|e| named("--reclaim-target", e))?
                .filter(|&t| t > 0),
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
    let identity = match (args.uid, args.gid) {
        (Some(uid), Some(gid)) => Some(ebb::jail::Identity { uid, gid }),
        _ => None,
    };
    config.jail = ebb::jail::JailOptions { identity, seccomp: !args.no_seccomp };
    Ok(config)
}

/// `DATA,LINK`: two descriptor numbers.
fn parse_fd_pair(s: &str) -> anyhow::Result<(i32, i32)> {
    let bad = || anyhow::anyhow!("--share-group-fds {s:?}: two descriptor numbers, DATA,LINK");
    let (d, m) = s.split_once(',').ok_or_else(bad)?;
    let fd = |x: &str| x.trim().parse::<i32>().ok().filter(|&n| n >= 0).ok_or_else(bad);
    Ok((fd(d)?, fd(m)?))
}

/// The default log filter for `-v` counts. The virtio-queue crate logs every malformed ring
/// a guest hands it, at error level: a guest could flood the log with it. ebb checks and
/// counts those itself (logging each kind once), so the crate is silenced unless RUST_LOG
/// asks for it.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,ebb=info,virtio_queue=off",
        1 => "info,virtio_queue=off",
        2 => "debug,virtio_queue=off",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
}

/// `e` with the option it is about in front, so that the message names its cause.
fn named(option: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{option}: {e}")
}

fn main() -> ExitCode {
    // A VM process is non-dumpable from its first instruction on (see ebb::jail).
    if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        if let Err(e) = ebb::jail::early() {
            return report_error(&e.into());
        }
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let args = match cli.command {
        Command::Run(args) => *args,
        Command::Ctl(args) => return ctl(args),
        Command::Host(args) => return host(args),
        Command::Top(args) => return top(&args),
        Command::Lab(args) => return lab(args),
    };
    match args.owner_uid {
        Some(uid) => ebb::jail::set_owner_uid(uid),
        // Fixed now, before the VM changes its uid.
        None => {
            let _ = ebb::jail::owner_uid();
        }
    }
    let status_path = args.status_file.clone();
    let mut status_file = None;
    let result = build_config(args).and_then(|c| {
        let keep = c.memory.share_group_fds.map_or(Vec::new(), |(d, m)| vec![d, m]);
        ebb::jail::close_inherited_fds(&keep)?;
        if let Some(path) = &status_path {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| named("--status-file", e))?;
            status_file = Some(file);
        }
        Ok(ebb::run(&c)?)
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
            if let ebb::RunOutcome::Crashed(report) = &outcome {
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
    use ebb::boot::BootError;
    use ebb::mm::engine::EngineError;
    use ebb::mm::uffd::UffdError;
    use ebb::vmm::VmmError;
    use ebb::vstate::memory::MemoryError;
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

/// Says `e` and gives the status of a refused request.
fn usage_error(e: &str) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(1)
}

/// `ebb ctl`: one request, the reply pretty-printed; exit 1 if it was refused.
fn ctl(args: CtlArgs) -> ExitCode {
    use ebb::api::client::Client;
    use ebb::api::protocol::{to_reply, Ack, VmRequest};
    let client = Client::new(&args.api_sock);
    let ok = |r: Result<(), _>| r.map(|()| to_reply(&Ack::OK));
    let reply = match args.request {
        CtlRequest::Version => client.version().map(|r| to_reply(&r)),
        CtlRequest::Balloon { size } => ok(client.set_balloon(size)),
        CtlRequest::BalloonStats => client.balloon_stats().map(|r| to_reply(&r)),
        CtlRequest::Stats => client.stats().map(|r| to_reply(&r)),
        CtlRequest::Reclaim { size } => ok(client.set_reclaim(size.0)),
        CtlRequest::Sharing { rate } => ok(client.set_sharing(rate)),
        CtlRequest::Alloc { size } => ok(client.set_alloc(size.0)),
        CtlRequest::Vms => client.vms().map(|r| to_reply(&r)),
        CtlRequest::HostStats => client.host_stats().map(|r| to_reply(&r)),
        CtlRequest::Metrics => match client.metrics() {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => Err(e),
        },
        CtlRequest::Budget { size } => ok(client.set_budget(size)),
        CtlRequest::Create { table } => {
            match ebb::host::config::parse_vm_table(&table, "the VM's table") {
                Ok(vm) => ok(client.create(vm)),
                Err(e) => return usage_error(&e.to_string()),
            }
        }
        CtlRequest::Stop { name } => ok(client.stop(&name)),
        CtlRequest::Destroy { name } => ok(client.destroy(&name)),
        CtlRequest::Inspect { name } => client.inspect(&name).map(|r| to_reply(&r)),
        CtlRequest::Events { after, follow } => return events(&client, after, follow),
        CtlRequest::Vm { name, request } => {
            match ebb::api::protocol::parse_line::<VmRequest>(&request) {
                Ok(r) => client.vm(&name, r),
                Err(e) => return usage_error(&format!("the request: {e}")),
            }
        }
    };
    match reply {
        Ok(reply) => {
            println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
            // A passed-through request's refusal is the VM's reply.
            if let Some(e) = reply.get("error") {
                eprintln!("error: {}", e.as_str().unwrap_or_default());
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ebb ctl events`: one JSON line per event; with `follow`, on until interrupted.
fn events(client: &ebb::api::client::Client, mut after: u64, follow: bool) -> ExitCode {
    loop {
        match client.events(after) {
            Ok(reply) => {
                if reply.lost > 0 {
                    eprintln!(
                        "ebb ctl: {} events were dropped before they were asked for",
                        reply.lost
                    );
                }
                for e in &reply.events {
                    println!("{}", serde_json::to_string(e).unwrap_or_default());
                }
                after = reply.next;
                if !follow {
                    return ExitCode::SUCCESS;
                }
                if reply.events.is_empty() {
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
}

/// Prints `e` and its causes as `ebb run` does, and gives status 1.
fn report_error(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::from(1)
}

/// `ebb host`: load and admit the description, run the VMs, exit as the host's outcome says.
fn host(args: HostArgs) -> ExitCode {
    let over = ebb::host::config::HostOverrides {
        budget: args.budget,
        policy: args.policy,
        tick_ms: args.tick_ms,
        vms: args.vms,
        keep_running: args.keep_running,
    };
    // The VMs' control sockets serve the uid that started the host (and root).
    let _ = ebb::jail::owner_uid();
    ebb::jail::set_vm_uid_base(args.vm_uid_base);
    let run = || -> anyhow::Result<ebb::host::HostOutcome> {
        let config = ebb::host::config::HostConfig::load(args.config.as_deref(), &over)?;
        let exe = std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("cannot find the ebb executable to run VMs with: {e}"))?;
        let opts = ebb::host::HostOptions {
            config,
            exe,
            api_sock: args.api_sock,
            stats_json: args.stats_json,
            run_dir: args.run_dir,
            metrics_addr: args.metrics_addr,
            keep_running: args.keep_running,
            state_dir: args.state_dir,
            vms_die_with_host: args.vms_die_with_host,
        };
        Ok(ebb::host::run(&opts)?)
    };
    match run() {
        Ok(outcome) => {
            if let ebb::host::HostOutcome::Ended(vms) = &outcome {
                for (name, status) in vms {
                    let how =
                        status.map_or_else(|| "still running".into(), ebb::host::child::describe);
                    eprintln!("vm {name}: {how}");
                }
            }
            ExitCode::from(outcome.exit_status())
        }
        Err(e) => report_error(&e),
    }
}

/// `ebb top`: the live view until q.
fn top(args: &TopArgs) -> ExitCode {
    let Ok(interval) = Duration::try_from_secs_f64(args.interval) else {
        return usage_error(&format!("--interval {} is not a number of seconds", args.interval));
    };
    if interval < Duration::from_millis(100) {
        return usage_error("--interval: at least 0.1 s");
    }
    match ebb::host::top::run(&args.api_sock, interval) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report_error(&anyhow::anyhow!("ebb top: {e}")),
    }
}

/// `ebb lab run` and `ebb lab sweep`: the tables on stdout (progress on stderr when it is a
/// terminal); exit 1 if a run failed or a guest found a bad page.
fn lab(args: LabArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return report_error(&anyhow::anyhow!("cannot find the ebb executable: {e}")),
    };
    // SAFETY: isatty only inspects descriptor 2.
    let progress = unsafe { libc::isatty(2) } == 1;
    let mut stdout = std::io::stdout();
    let (scenarios, policies, plot, scale, repeat, budgets) = match args.command {
        LabCommand::Run { scenarios, policies, plot, scale, repeat } => {
            (scenarios, policies, plot, scale, repeat, None)
        }
        LabCommand::Sweep { scenarios, policies, budgets, scale } => {
            (scenarios, policies, None, scale, 1, Some(budgets))
        }
    };
    let opts = ebb::lab::LabOptions {
        scenarios,
        policies,
        plot,
        scale,
        exe,
        progress,
        repeat: usize::from(repeat),
    };
    if let Some(budgets) = budgets {
        let fractions = match ebb::lab::sweep::parse_fractions(&budgets) {
            Ok(f) => f,
            Err(e) => return report_error(&anyhow::anyhow!("--budgets {budgets:?}: {e}")),
        };
        let opts = ebb::lab::sweep::SweepOptions { lab: opts, fractions };
        return match ebb::lab::sweep::sweep(&opts, &mut stdout) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => report_error(&e.into()),
        };
    }
    match ebb::lab::run(&opts, &mut stdout) {
        Ok(outcome) => {
            for chart in &outcome.charts {
                println!("chart: {}", chart.display());
            }
            if outcome.all_correct() {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: a run failed (checksums FAILED in the table above)");
                ExitCode::from(1)
            }
        }
        Err(e) => report_error(&e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
