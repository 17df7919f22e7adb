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
    let (cli, matches) = match ebb::cli::parse::<Cli>() {
        Ok(parsed) => parsed,
        Err(status) => return status,
    };
    ebb::cli::init_logging(cli.logging.verbose);
    match cli.command {
        Command::Run(args) => ebb::cli::run::main(*args, matches.subcommand_matches("run")),
    }
}
