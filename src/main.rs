//! The `ebb` command: parse the command line, run the VM, turn the outcome into an exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use ebb::config::{
    parse_balloon, parse_firmware_arg, parse_size, BootSource, FirmwareSource, MemoryConfig,
    VmConfig,
};
use ebb::mm::active::ActiveConfig;
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
    /// Talk to a running VM through its control socket.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's control socket (its --api-sock).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Subcommand)]
enum CtlRequest {
    /// Set the balloon size: the memory the guest gives back (e.g. 128M).
    Balloon {
        /// Size, e.g. 128M or 1G.
        size: String,
    },
    /// The balloon's target, actual size and the guest's memory statistics.
    BalloonStats,
    /// The VM's memory statistics (the --stats-json object).
    Stats,
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
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    mem: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// A built-in payload by name (hello, touch) or the path of a payload ELF file.
    #[arg(long, value_name = "NAME|PATH")]
    firmware: Option<String>,
    /// A KEY=VALUE parameter for the payload (repeatable).
    #[arg(long = "firmware-arg", value_name = "KEY=VALUE")]
    firmware_args: Vec<String>,
    /// Also write the serial console to this file.
    #[arg(long, value_name = "PATH")]
    serial_log: Option<PathBuf>,
    /// The KVM device node.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Back guest RAM with plain anonymous memory instead of serving it through userfaultfd.
    #[arg(long)]
    no_uffd: bool,
    /// The userfaultfd device, used when the userfaultfd syscall is refused.
    #[arg(long, value_name = "PATH", default_value = "/dev/userfaultfd")]
    uffd_device: PathBuf,
    /// Untouched neighbour pages to fill with each fault (0 to 255).
    #[arg(long, value_name = "N", default_value_t = 0)]
    fault_around: u64,
    /// Write memory statistics as JSON lines to this file (every --stats-interval, and at exit).
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    /// Seconds between statistics lines (fractions allowed).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    stats_interval: f64,
    /// Milliseconds between Active-memory samples.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    active_interval_ms: u64,
    /// Pages in each Active-memory sample.
    #[arg(long, value_name = "N", default_value_t = 100)]
    active_sample_pages: u32,
    /// Add a virtio-balloon: [target=SIZE,stats=SECS,deflate_on_oom=on,free_page_reporting=on].
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<String>,
    /// Listen for control requests (JSON lines) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
}

fn build_config(args: RunArgs) -> anyhow::Result<VmConfig> {
    let boot = match (args.kernel, args.firmware) {
        (Some(_), Some(_)) => return Err(ebb::config::ConfigError::KernelAndFirmware.into()),
        (Some(kernel), None) => {
            if !args.firmware_args.is_empty() {
                anyhow::bail!("--firmware-arg needs --firmware");
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
            let args = args
                .firmware_args
                .iter()
                .map(|a| parse_firmware_arg(a))
                .collect::<Result<_, _>>()?;
            BootSource::Firmware { source, args }
        }
    };
    let mut config = VmConfig::new(boot);
    config.mem_bytes = parse_size(&args.mem)?;
    config.vcpus = args.vcpus;
    config.serial_log = args.serial_log;
    config.kvm_path = args.kvm_device;
    let stats_interval = Duration::try_from_secs_f64(args.stats_interval).map_err(|_| {
        anyhow::anyhow!("--stats-interval {} is not a number of seconds", args.stats_interval)
    })?;
    config.memory = MemoryConfig {
        uffd: !args.no_uffd,
        uffd_dev: args.uffd_device,
        fault_around: args.fault_around,
        active: ActiveConfig {
            interval: Duration::from_millis(args.active_interval_ms),
            sample_pages: args.active_sample_pages,
        },
        stats_json: args.stats_json,
        stats_interval,
    };
    config.balloon = args.balloon.as_deref().map(parse_balloon).transpose()?;
    config.api_sock = args.api_sock;
    Ok(config)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,ebb=info",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let args = match cli.command {
        Command::Run(args) => *args,
        Command::Ctl(args) => return ctl(args),
    };
    let result = build_config(args).and_then(|c| Ok(ebb::run(&c)?));
    match result {
        Ok(outcome) => {
            if let ebb::RunOutcome::Crashed(report) = &outcome {
                eprint!("{report}");
            }
            ExitCode::from(exit_status(&outcome))
        }
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}

/// `ebb ctl`: one request, the reply pretty-printed; exit 1 if the VM answered with an error.
fn ctl(args: CtlArgs) -> ExitCode {
    let request = match &args.request {
        CtlRequest::Balloon { size } => match parse_size(size) {
            Ok(bytes) => serde_json::json!({ "balloon": { "target_mib": bytes >> 20 } }),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        },
        CtlRequest::BalloonStats => serde_json::json!({ "balloon_stats": {} }),
        CtlRequest::Stats => serde_json::json!({ "stats": {} }),
    };
    match ebb::api::client::request(&args.api_sock, &request) {
        Ok(reply) => {
            println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
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
