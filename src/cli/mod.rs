//! What the binaries share of the command line: `ebb run`'s flags and its main
//! ([`run`]), and the logger.

pub mod run;

/// `-v`, shared by the binaries.
#[derive(clap::Args, Debug)]
pub struct Logging {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// Parses this process's command line as `C`, with the matches, which say which flags were
/// given on the command line (they win over a `run --config` file); or the exit status of a
/// refused one, already printed.
///
/// # Errors
/// The status to exit with ([`usage_exit`]).
pub fn parse<C: clap::Parser>() -> Result<(C, clap::ArgMatches), std::process::ExitCode> {
    let matches = C::command().try_get_matches().map_err(|e| usage_exit(&e))?;
    let cli = C::from_arg_matches(&matches).map_err(|e| usage_exit(&e))?;
    Ok((cli, matches))
}

/// Prints a command line the parser refused (or `--help`, `--version`) and gives its exit
/// status: 0 for help and version, 1 for a bad option or value, as for every error ebb
/// reports. (clap's own 2 would read as a guest crash, which is `ebb run`'s status 2.)
pub fn usage_exit(e: &clap::Error) -> std::process::ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Starts the logger for `-v` counts (`RUST_LOG` overrides). The virtio-queue crate logs
/// every malformed ring a guest hands it, at error level: a guest could flood the log with
/// it. ebb checks and counts those itself (logging each kind once), so the crate is silenced
/// unless `RUST_LOG` asks for it.
pub fn init_logging(verbose: u8) {
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
