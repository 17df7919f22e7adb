//! The `ebb` command: every subcommand (`run`, `host`, `ctl`, `top`, `lab`). `run` is
//! `ebb::cli::run`, shared with the `ebb-vm` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use ebb::cli::run::RunArgs;
use ebb::units::parse_size;

/// A small, fast KVM hypervisor that overcommits guest memory the way ESXi does.
#[derive(Parser)]
#[command(name = "ebb", version)]
struct Cli {
    #[command(flatten)]
    logging: ebb::cli::Logging,
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

fn main() -> ExitCode {
    // A VM process is non-dumpable from its first instruction on (see ebb::jail).
    if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        if let Err(e) = ebb::jail::early() {
            return report_error(&e.into());
        }
    }
    let (cli, matches) = match ebb::cli::parse::<Cli>() {
        Ok(parsed) => parsed,
        Err(status) => return status,
    };
    ebb::cli::init_logging(cli.logging.verbose);
    match cli.command {
        Command::Run(args) => ebb::cli::run::main(*args, matches.subcommand_matches("run")),
        Command::Ctl(args) => ctl(args),
        Command::Host(args) => host(args),
        Command::Top(args) => top(&args),
        Command::Lab(args) => lab(args),
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
        let ebb = std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("cannot find the ebb executable to run VMs with: {e}"))?;
        // `ebb-vm` beside `ebb` runs the VMs when it is there: it links only what a VM runs.
        let vm_exe = ebb.with_file_name("ebb-vm");
        let exe = if vm_exe.is_file() { vm_exe } else { ebb };
        log::info!("VMs run {}", exe.display());
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
