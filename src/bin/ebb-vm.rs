//! `ebb-vm`: one VM, nothing else. `ebb host` starts one per VM when it finds it beside
//! `ebb`: the same `run` as `ebb run`, in a binary that links only what a VM process runs
//! (no chart library, no terminal UI), so a VM process maps less code a guest that escapes
//! into it could use, and starts from a smaller file.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// One VM of ebb, the overcommitting KVM hypervisor (what `ebb host` starts for each VM).
#[derive(Parser)]
#[command(name = "ebb-vm", version)]
struct Cli {
    #[command(flatten)]
    logging: ebb::cli::Logging,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot and run one VM (the flags of `ebb run`).
    Run(Box<ebb::cli::run::RunArgs>),
}

fn main() -> ExitCode {
    // A VM process is non-dumpable from its first instruction on (see ebb::jail).
    if let Err(e) = ebb::jail::early() {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    // The matches say which flags were given on the command line: they win over a
    // `run --config` file.
    let matches = match <Cli as clap::CommandFactory>::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return ebb::cli::usage_exit(&e),
    };
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return ebb::cli::usage_exit(&e),
    };
    ebb::cli::init_logging(cli.logging.verbose);
    match cli.command {
        Command::Run(args) => ebb::cli::run::main(*args, matches.subcommand_matches("run")),
    }
}
