//! The host's description: a TOML file (or `--vm` tables) parsed with serde, checked, and
//! admitted against the budget.
//!
//! ```toml
//! budget = "768M"          # or --budget
//! tick_ms = 1000           # policy tick
//! policy = "esx"
//! idle_tax_percent = 75
//! goal_free_percent = 125   # free memory ESX's targets leave, percent of minFree
//! sharing_rate_idle = 1000  # pages/s per VM the policy scans for sharing in High
//! sharing_rate_busy = 10000 # and from Clear down, while sharing saves 1% of what it scans
//!
//! [[vm]]
//! name = "a"               # letters, digits, - and _
//! memory = "512M"
//! firmware = "touch"       # or kernel = "...", initrd = "...", cmdline = "..."
//! firmware_args = ["pages=131072", "loop_ms=20000"]
//! balloon = true           # or the --balloon options string
//! shares = 5120            # default: 10 per MiB of memory
//! reservation = "64M"      # never reclaimed below (default 0)
//! limit = "512M"           # never given more (default: memory)
//! sharing_group = "web"    # share identical pages with the VMs of this group only
//! args = ["--zcache-max", "5%"]   # more `ebb run` options
//! start_after_ms = 5000    # start late (default: with the host)
//! ```
//!
//! Unknown keys are refused, and so are impossible values, each error naming its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::{PolicyParams, POLICY_NAMES};
use crate::units::{human_bytes, parse_size};

/// Default policy tick.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
/// Shortest policy tick accepted.
pub const MIN_TICK: Duration = Duration::from_millis(50);
/// Most free memory, in percent of minFree, ESX's targets may be asked to leave.
pub const MAX_GOAL_FREE_PERCENT: u64 = 1000;
/// ESX's default idle memory tax, percent.
pub const DEFAULT_TAX_PERCENT: u8 = 75;
/// Default shares per MiB of configured memory (ESX's "normal": 10 per MB).
pub const SHARES_PER_MIB: u64 = 10;
/// Most shares one VM may have (their sum over every VM stays far from overflowing).
pub const MAX_SHARES: u64 = 1 << 32;
/// Most VMs one host runs.
pub const MAX_VMS: usize = 64;

/// Errors in the host's description.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("{0}")]
    Toml(String),
    /// A value is impossible.
    #[error("{key}: {msg}")]
    Invalid {
        /// Which key, e.g. `vm "b".reservation`.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A VM's reservation does not fit in what is left of the budget.
    #[error(
        "vm {name:?} is refused: its reservation of {reservation} does not fit in the {left} left of the {budget} budget (the VMs before it reserve {taken})"
    )]
    Admission {
        /// The VM.
        name: String,
        /// Its reservation.
        reservation: String,
        /// The budget.
        budget: String,
        /// Reserved by the VMs admitted before it.
        taken: String,
        /// Budget left.
        left: String,
    },
}

/// One `[[vm]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// Name.
    pub name: String,
    /// Guest memory, e.g. "512M".
    pub memory: String,
    /// vCPUs.
    pub vcpus: Option<u8>,
    /// Linux kernel.
    pub kernel: Option<PathBuf>,
    /// Its initrd.
    pub initrd: Option<PathBuf>,
    /// Appended to its command line.
    pub cmdline: Option<String>,
    /// A payload by name or path.
    pub firmware: Option<String>,
    /// The payload's KEY=VALUE arguments.
    #[serde(default)]
    pub firmware_args: Vec<String>,
    /// A data blob for the payload.
    pub firmware_blob: Option<PathBuf>,
    /// A balloon: true, or the `--balloon` options string.
    pub balloon: Option<BalloonEntry>,
    /// Shares.
    pub shares: Option<u64>,
    /// Reservation, e.g. "64M".
    pub reservation: Option<String>,
    /// Limit, e.g. "256M".
    pub limit: Option<String>,
    /// Sharing group.
    pub sharing_group: Option<String>,
    /// Serial console log file.
    pub serial_log: Option<PathBuf>,
    /// More `ebb run` options.
    #[serde(default)]
    pub args: Vec<String>,
    /// Start this many milliseconds after the host (default 0).
    pub start_after_ms: Option<u64>,
    /// Any other `ebb run` option, as a key of a VM's description file (`zcache_max =
    /// "5%"`); it wins over the same option in `args`.
    pub run: Option<toml::Table>,
}

/// `balloon = true` or `balloon = "stats=1"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BalloonEntry {
    /// On with defaults, or off.
    On(bool),
    /// The `--balloon` options.
    Options(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    budget: Option<String>,
    tick_ms: Option<u64>,
    policy: Option<String>,
    idle_tax_percent: Option<u8>,
    goal_free_percent: Option<u64>,
    sharing_rate_idle: Option<u64>,
    sharing_rate_busy: Option<u64>,
    #[serde(default)]
    vm: Vec<VmEntry>,
}

/// One VM, checked.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The entry as written (boot source, arguments).
    pub entry: VmEntry,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Shares.
    pub shares: u64,
    /// Reservation, bytes.
    pub reservation_bytes: u64,
    /// Limit, bytes.
    pub limit_bytes: u64,
    /// The `--balloon` options, when it has a balloon.
    pub balloon: Option<String>,
    /// When to start it, from the host's start.
    pub start_after: Duration,
}

/// The host, checked.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The memory budget, bytes.
    pub budget_bytes: u64,
    /// Policy tick.
    pub tick: Duration,
    /// Policy name.
    pub policy: String,
    /// What the policy is built with: the idle memory tax, the sharing scan rates.
    pub params: PolicyParams,
    /// The VMs, in start order.
    pub vms: Vec<VmSpec>,
}

/// What the command line says over the file.
#[derive(Debug, Clone, Default)]
pub struct HostOverrides {
    /// `--budget`.
    pub budget: Option<String>,
    /// `--policy`.
    pub policy: Option<String>,
    /// `--tick-ms`.
    pub tick_ms: Option<u64>,
    /// `--vm` tables (inline TOML), added after the file's.
    pub vms: Vec<String>,
    /// `--keep-running`: a description without VMs is fine (they come through the socket).
    pub keep_running: bool,
}

fn invalid(key: impl Into<String>, msg: impl Into<String>) -> HostConfigError {
    HostConfigError::Invalid { key: key.into(), msg: msg.into() }
}

fn toml_error(what: &str, e: &toml::de::Error) -> HostConfigError {
    HostConfigError::Toml(format!("{what}: {}", e.to_string().trim_end()))
}

impl HostConfig {
    /// Reads `path` (if any), applies `over`, checks everything and admits every VM.
    ///
    /// # Errors
    /// The file cannot be read or parsed, a value is impossible, or a VM is not admitted.
    pub fn load(path: Option<&Path>, over: &HostOverrides) -> Result<Self, HostConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| HostConfigError::Read { path: p.to_owned(), source })?,
            None => String::new(),
        };
        let what = path.map_or_else(|| "host config".to_owned(), |p| p.display().to_string());
        let mut file: HostFile = toml::from_str(&text).map_err(|e| toml_error(&what, &e))?;
        for (i, table) in over.vms.iter().enumerate() {
            file.vm.push(parse_vm_table(table, &format!("--vm #{}", i + 1))?);
        }
        Self::check(file, over)
    }

    fn check(file: HostFile, over: &HostOverrides) -> Result<Self, HostConfigError> {
        let budget = over.budget.clone().or(file.budget).ok_or_else(|| {
            invalid("budget", "no memory budget: give --budget SIZE or budget = \"SIZE\"")
        })?;
        let budget_bytes = size("budget", &budget)?;
        if budget_bytes == 0 {
            return Err(invalid("budget", "must be more than 0"));
        }
        let tick = Duration::from_millis(
            over.tick_ms
                .or(file.tick_ms)
                .unwrap_or(u64::try_from(DEFAULT_TICK.as_millis()).unwrap_or(1000)),
        );
        if tick < MIN_TICK {
            return Err(invalid("tick_ms", format!("at least {} ms", MIN_TICK.as_millis())));
        }
        let policy = over.policy.clone().or(file.policy).unwrap_or_else(|| "esx".into());
        if !POLICY_NAMES.contains(&policy.as_str()) {
            return Err(invalid("policy", format!("{policy:?} is not one of {POLICY_NAMES:?}")));
        }
        let tax_percent = file.idle_tax_percent.unwrap_or(DEFAULT_TAX_PERCENT);
        if tax_percent >= 100 {
            return Err(invalid("idle_tax_percent", "must be below 100"));
        }
        let defaults = PolicyParams::default();
        let params = PolicyParams {
            tax_percent,
            share_rate_idle: file.sharing_rate_idle.unwrap_or(defaults.share_rate_idle),
            share_rate_busy: file.sharing_rate_busy.unwrap_or(defaults.share_rate_busy),
            goal_free_percent: file.goal_free_percent.unwrap_or(defaults.goal_free_percent),
        };
        if params.goal_free_percent > MAX_GOAL_FREE_PERCENT {
            return Err(invalid(
                "goal_free_percent",
                format!("at most {MAX_GOAL_FREE_PERCENT} (percent of minFree)"),
            ));
        }
        for (key, rate) in [
            ("sharing_rate_idle", params.share_rate_idle),
            ("sharing_rate_busy", params.share_rate_busy),
        ] {
            if rate > crate::config::MAX_SHARE_SCAN_RATE {
                return Err(invalid(
                    key,
                    format!("at most {} pages per second", crate::config::MAX_SHARE_SCAN_RATE),
                ));
            }
        }
        if file.vm.is_empty() && !over.keep_running {
            return Err(invalid(
                "vm",
                "no VMs: add [[vm]] tables or --vm options, or run with --keep-running and create them through the socket",
            ));
        }
        if file.vm.len() > MAX_VMS {
            return Err(invalid("vm", format!("{} VMs, at most {MAX_VMS}", file.vm.len())));
        }
        let mut vms: Vec<VmSpec> = Vec::with_capacity(file.vm.len());
        for entry in file.vm {
            if vms.iter().any(|v| v.entry.name == entry.name) {
                return Err(invalid(format!("vm {:?}.name", entry.name), "used twice"));
            }
            vms.push(check_vm(entry)?);
        }
        // Start order: by start time, the file's order among equals.
        vms.sort_by_key(|v| v.start_after);
        admit(&vms, budget_bytes)?;
        Ok(Self { budget_bytes, tick, policy, params, vms })
    }
}

/// A `--vm` inline table, parsed as the value of a key (a bare `{...}` is no TOML document).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OneVm {
    vm: VmEntry,
}

/// One VM as an inline TOML table (`{name = "a", memory = "512M", ...}`), `what` naming it
/// in errors.
///
/// # Errors
/// Not such a table, or an unknown key.
pub fn parse_vm_table(table: &str, what: &str) -> Result<VmEntry, HostConfigError> {
    let one: OneVm =
        toml::from_str(&format!("vm = {table}\n")).map_err(|e| toml_error(what, &e))?;
    Ok(one.vm)
}

fn size(key: &str, s: &str) -> Result<u64, HostConfigError> {
    parse_size(s).map_err(|_| invalid(key, format!("{s:?} is not a size (e.g. 512M, 2G)")))
}

/// 1 to 32 letters, digits, `-` or `_`: a VM's or a group's name (it goes into paths).
fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks one VM's table (as [`HostConfig::load`] does each of the file's).
///
/// # Errors
/// An impossible value, its key named.
pub fn check_vm(entry: VmEntry) -> Result<VmSpec, HostConfigError> {
    let key = |k: &str| format!("vm {:?}.{k}", entry.name);
    if !valid_name(&entry.name) {
        return Err(invalid(key("name"), "1 to 32 letters, digits, - or _"));
    }
    let memory_bytes = size(&key("memory"), &entry.memory)?;
    if memory_bytes == 0 || memory_bytes % (1 << 20) != 0 {
        return Err(invalid(key("memory"), "a whole number of MiB, more than 0"));
    }
    let reservation_bytes =
        entry.reservation.as_deref().map(|s| size(&key("reservation"), s)).transpose()?;
    let reservation_bytes = reservation_bytes.unwrap_or(0);
    let limit_bytes = entry.limit.as_deref().map(|s| size(&key("limit"), s)).transpose()?;
    let limit_bytes = limit_bytes.unwrap_or(memory_bytes);
    if reservation_bytes > memory_bytes {
        return Err(invalid(
            key("reservation"),
            format!(
                "{} is more than the VM's memory ({})",
                human_bytes(reservation_bytes),
                human_bytes(memory_bytes)
            ),
        ));
    }
    if limit_bytes < reservation_bytes {
        return Err(invalid(
            key("limit"),
            format!(
                "{} is below the reservation ({})",
                human_bytes(limit_bytes),
                human_bytes(reservation_bytes)
            ),
        ));
    }
    let shares = entry.shares.unwrap_or((memory_bytes >> 20) * SHARES_PER_MIB);
    if shares == 0 || shares > MAX_SHARES {
        return Err(invalid(key("shares"), format!("1 to {MAX_SHARES}")));
    }
    if entry.kernel.is_some() && entry.firmware.is_some() {
        return Err(invalid(key("kernel"), "a VM boots a kernel or a firmware, not both"));
    }
    if entry.kernel.is_none() && (entry.initrd.is_some() || entry.cmdline.is_some()) {
        return Err(invalid(key("initrd"), "initrd and cmdline need a kernel"));
    }
    if let Some(g) = &entry.sharing_group {
        if !valid_name(g) {
            return Err(invalid(key("sharing_group"), "1 to 32 letters, digits, - or _"));
        }
    }
    let balloon = match &entry.balloon {
        None | Some(BalloonEntry::On(false)) => None,
        Some(BalloonEntry::On(true)) => Some(String::new()),
        Some(BalloonEntry::Options(o)) => {
            crate::config::parse_balloon(o).map_err(|e| invalid(key("balloon"), e.to_string()))?;
            Some(o.clone())
        }
    };
    if let Some(run) = &entry.run {
        check_run_table(run).map_err(|msg| invalid(key("run"), msg))?;
    }
    let start_after = Duration::from_millis(entry.start_after_ms.unwrap_or(0));
    Ok(VmSpec { entry, memory_bytes, shares, reservation_bytes, limit_bytes, balloon, start_after })
}

/// The keys of a VM's description that its `[[vm]]` table sets with keys of its own (or the
/// host sets): a `run` table must not set them again.
const TABLE_KEYS: [(&str, &str); 11] = [
    ("mem", "memory"),
    ("vcpus", "vcpus"),
    ("kernel", "kernel"),
    ("initrd", "initrd"),
    ("cmdline", "cmdline"),
    ("firmware", "firmware"),
    ("firmware_args", "firmware_args"),
    ("firmware_blob", "firmware_blob"),
    ("serial_log", "serial_log"),
    ("balloon", "balloon"),
    ("api_sock", "the host's run directory"),
];

/// Checks a `run` table: keys of a VM's description, none the table sets itself.
fn check_run_table(run: &toml::Table) -> Result<(), String> {
    if let Some((k, instead)) = TABLE_KEYS.iter().find(|(k, _)| run.contains_key(*k)) {
        return Err(format!("{k} is set by the [[vm]] table's `{instead}`, not in `run`"));
    }
    crate::cli::run::RunArgs::default().with_keys(run).map(drop)
}

/// Admits the VMs in order: each one's reservation must fit in what the ones before it
/// left of `budget`.
///
/// # Errors
/// The first VM that does not fit, with the figures.
pub fn admit(vms: &[VmSpec], budget: u64) -> Result<(), HostConfigError> {
    let mut taken = 0u64;
    for vm in vms {
        let left = budget.saturating_sub(taken);
        if vm.reservation_bytes > left {
            return Err(HostConfigError::Admission {
                name: vm.entry.name.clone(),
                reservation: human_bytes(vm.reservation_bytes),
                budget: human_bytes(budget),
                taken: human_bytes(taken),
                left: human_bytes(left),
            });
        }
        taken += vm.reservation_bytes;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<HostConfig, HostConfigError> {
        let file: HostFile = toml::from_str(text).map_err(|e| toml_error("t", &e))?;
        HostConfig::check(file, &HostOverrides::default())
    }

    const TWO: &str = r#"
        budget = "1G"
        [[vm]]
        name = "a"
        memory = "512M"
        firmware = "touch"
        [[vm]]
        name = "b"
        memory = "256M"
        reservation = "64M"
        limit = "128M"
        balloon = true
    "#;

    #[test]
    fn a_good_file_gives_defaults_for_what_it_leaves_out() {
        let c = load(TWO).unwrap();
        assert_eq!(c.budget_bytes, 1 << 30);
        assert_eq!((c.policy.as_str(), c.params.tax_percent, c.tick), ("esx", 75, DEFAULT_TICK));
        assert_eq!(c.vms[0].shares, 5120);
        assert_eq!(c.vms[0].limit_bytes, 512 << 20);
        assert_eq!(c.vms[1].reservation_bytes, 64 << 20);
        assert_eq!(c.vms[1].balloon.as_deref(), Some(""));
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = err("budget = \"1G\"\n[[vm]]\nname = \"a\"\nmemory = \"1M\"\nmemroy = \"2M\"\n");
        assert!(e.contains("unknown field `memroy`"), "{e}");
        assert!(err("budgte = \"1G\"").contains("unknown field `budgte`"));
    }

    #[test]
    fn impossible_values_name_their_key() {
        let base = "budget = \"1G\"\n[[vm]]\nname = \"a\"\nmemory = \"256M\"\n";
        let e = err(&format!("{base}reservation = \"300M\"\n"));
        assert!(e.starts_with("vm \"a\".reservation: 300 MiB is more than"), "{e}");
        let e = err(&format!("{base}reservation = \"100M\"\nlimit = \"50M\"\n"));
        assert!(e.starts_with("vm \"a\".limit: 50 MiB is below the reservation"), "{e}");
        assert!(err(&format!("{base}shares = 0\n")).starts_with("vm \"a\".shares"));
        assert!(err(&format!("{base}shares = 9223372036854775807\n"))
            .starts_with("vm \"a\".shares: 1 to"));
        assert!(err(&format!("{base}kernel = \"k\"\nfirmware = \"touch\"\n")).contains(".kernel"));
        assert!(err(&format!("{base}balloon = \"bogus\"\n")).starts_with("vm \"a\".balloon"));
        assert!(err("budget = \"1X\"\n").starts_with("budget:"));
        assert!(err(&format!("{base}policy = \"nope\"\n")).contains("unknown field"));
        let named_twice = format!("{base}[[vm]]\nname = \"a\"\nmemory = \"1M\"\n");
        assert!(err(&named_twice).contains("used twice"));
        assert!(err("budget = \"1G\"\n[[vm]]\nname = \"a/b\"\nmemory = \"1M\"\n").contains(".name"));
        assert!(err("budget = \"1G\"\n").starts_with("vm: no VMs"));
        assert!(err("budget = \"1G\"\nidle_tax_percent = 100\n").starts_with("idle_tax_percent"));
        assert!(err("budget = \"1G\"\ngoal_free_percent = 1001\n").starts_with("goal_free_percent"));
    }

    #[test]
    fn reservations_beyond_the_budget_refuse_the_vm_that_does_not_fit() {
        let text = r#"
            budget = "768M"
            [[vm]]
            name = "a"
            memory = "512M"
            reservation = "400M"
            [[vm]]
            name = "b"
            memory = "512M"
            reservation = "400M"
        "#;
        let e = err(text);
        assert_eq!(
            e,
            "vm \"b\" is refused: its reservation of 400 MiB does not fit in the 368 MiB left of the 768 MiB budget (the VMs before it reserve 400 MiB)"
        );
    }

    #[test]
    fn vm_options_are_inline_tables() {
        let over = HostOverrides {
            budget: Some("1G".into()),
            vms: vec!["{name = \"q\", memory = \"64M\", firmware = \"hello\"}".into()],
            ..Default::default()
        };
        let c = HostConfig::load(None, &over).unwrap();
        assert_eq!(c.vms[0].entry.name, "q");
        assert_eq!(c.vms[0].memory_bytes, 64 << 20);
    }

    #[test]
    fn a_run_table_takes_the_keys_of_a_vm_file_but_not_the_tables_own() {
        let vm = |run: &str| {
            format!("budget = \"1G\"\n[[vm]]\nname = \"a\"\nmemory = \"64M\"\n[vm.run]\n{run}\n")
        };
        let c = load(&vm("zcache_max = \"5%\"\nswap_max = \"16M\"")).unwrap();
        let run = c.vms[0].entry.run.as_ref().unwrap();
        assert_eq!(run["zcache_max"].as_str(), Some("5%"));
        assert!(err(&vm("colour = 1")).contains("colour"));
        assert!(err(&vm("swap_max = \"lots\"")).contains("vm \"a\".run"));
        let twice = err(&vm("mem = \"1G\""));
        assert!(twice.contains("`memory`"), "the table's own key is named: {twice}");
        assert!(err(&vm("uid = 0")).contains("uid"), "the process's flags are not the VM's");
    }
}
