//! Scenarios: a budget, VMs running `touch` workloads, events during the run, as TOML files
//! (`lab/scenarios/*.toml`), checked and turned into an `ebb host` description.
//!
//! ```toml
//! description = "two busy VMs at 2x overcommit"
//! budget = "192M"
//! duration_ms = 4000     # how long the run should take; the lab stops it at 3x + 20 s
//! tick_ms = 100          # the host's policy tick (default 100)
//! active_interval_ms = 250   # how often VMs sample Active memory (default 250)
//! idle_tax_percent = 75  # the host's idle memory tax (default ESX's 75)
//! overcommit = true      # false: refuse VMs that do not fit in the budget
//!
//! [[vm]]
//! name = "a"
//! memory = "128M"
//! pages = 24000          # the working set: touch writes these pages first
//! mix = "zero:20,fill:20,dup:30,random:30"   # their content (default: random)
//! loop_ms = 2500         # then rewrites its hot set for this long ...
//! hot = 6000             # ... this many pages (default: all)
//! dist = "uniform"       # ... picked sweep | uniform | zipf
//! idle_ms = 1000         # then touches nothing for this long
//! burst = true           # then rewrites every page once (the working set bursts)
//! start_ms = 500         # start late
//!
//! [[event]]
//! at_ms = 2000
//! budget = "128M"        # the budget drops (or grows)
//! ```
//!
//! The workload's phases are touch's, in its order: write, loop over the hot set, idle,
//! burst; each VM then verifies every page (a bad one fails the run). `--scale` multiplies
//! sizes, times, the tick and the Active interval alike (the tick no lower than 50 ms, the
//! interval than 100 ms). VMs sample Active memory every 250 ms by default, four times as
//! often as `ebb run`'s default, as short runs last seconds; scenarios on a realistic time
//! scale set 1000. Unknown keys,
//! impossible sizes and VMs that cannot fit are refused with the key named.

use std::path::Path;

use serde::Deserialize;

use super::spec::PolicySpec;
use crate::units::{human_bytes, parse_size, PAGE_SIZE};

/// Default host tick of a scenario, ms.
pub const DEFAULT_TICK_MS: u64 = 100;
/// Largest budget or VM a scenario may have, after scaling: 1 TiB.
const MAX_BYTES: u64 = 1 << 40;
/// Longest scenario: an hour.
const MAX_DURATION_MS: u64 = 3_600_000;
/// The lab's Active-memory sampling interval at scale 1, ms.
pub const ACTIVE_INTERVAL_MS: u64 = 250;
/// Smallest VM after scaling, MiB.
const MIN_VM_MIB: u64 = 16;

/// Errors in a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Malformed TOML, an unknown key, a value of the wrong type.
    #[error("{0}")]
    Toml(String),
    /// An impossible value.
    #[error("{file}: {key}: {msg}")]
    Invalid {
        /// The scenario file.
        file: String,
        /// The key.
        key: String,
        /// What is wrong.
        msg: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    description: String,
    budget: String,
    duration_ms: u64,
    tick_ms: Option<u64>,
    active_interval_ms: Option<u64>,
    idle_tax_percent: Option<u8>,
    overcommit: Option<bool>,
    vm: Vec<VmFile>,
    #[serde(default)]
    event: Vec<EventFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    name: String,
    memory: String,
    pages: u64,
    mix: Option<String>,
    dup_groups: Option<u64>,
    seed: Option<u64>,
    loop_ms: Option<u64>,
    hot: Option<u64>,
    dist: Option<String>,
    idle_ms: Option<u64>,
    burst: Option<bool>,
    start_ms: Option<u64>,
    shares: Option<u64>,
    reservation: Option<String>,
    limit: Option<String>,
    sharing_group: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventFile {
    at_ms: u64,
    budget: String,
}

/// One VM of a scenario, checked (sizes in bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct LabVm {
    /// Name.
    pub name: String,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Pages written.
    pub pages: u64,
    /// touch's `mix=` (None: random pages).
    pub mix: Option<String>,
    /// Groups of identical pages.
    pub dup_groups: u64,
    /// Seed of the contents.
    pub seed: u64,
    /// Loop phase, ms.
    pub loop_ms: u64,
    /// Hot set of the loop, pages.
    pub hot: Option<u64>,
    /// How the loop picks pages.
    pub dist: Option<String>,
    /// Idle phase, ms.
    pub idle_ms: u64,
    /// Rewrite every page after the idle phase.
    pub burst: bool,
    /// Start this late, ms.
    pub start_ms: u64,
    /// The host's controls, as written (TOML fragments), if any.
    controls: Vec<String>,
}

/// A budget change during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabEvent {
    /// When, ms from the start.
    pub at_ms: u64,
    /// The new budget, bytes.
    pub budget_bytes: u64,
}

/// A checked scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Its name (the file's stem).
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The budget at the start, bytes.
    pub budget_bytes: u64,
    /// How long the run should take, ms.
    pub duration_ms: u64,
    /// The host's tick, ms.
    pub tick_ms: u64,
    /// Active-memory sampling interval of every VM, ms (scaled).
    pub active_interval_ms: u64,
    /// The host's idle memory tax, percent (None: the host's default).
    pub idle_tax_percent: Option<u8>,
    /// The VMs.
    pub vms: Vec<LabVm>,
    /// Budget changes, in time order.
    pub events: Vec<LabEvent>,
}

fn scaled(x: u64, scale: f64) -> u64 {
    crate::mm::stats::round_u64(x as f64 * scale)
}

impl Scenario {
    /// Reads and checks `path`, with sizes and times multiplied by `scale`.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or a value is impossible.
    pub fn load(path: &Path, scale: f64) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        let name = path
            .file_stem()
            .map_or_else(|| "scenario".into(), |s| s.to_string_lossy().into_owned());
        Self::parse(&name, &text, scale)
    }

    /// Checks scenario `name` from `text`.
    ///
    /// # Errors
    /// Malformed TOML, an unknown key, or an impossible value.
    pub fn parse(name: &str, text: &str, scale: f64) -> Result<Self, ScenarioError> {
        let f: File = toml::from_str(text)
            .map_err(|e| ScenarioError::Toml(format!("{name}: {}", e.to_string().trim_end())))?;
        let invalid = |key: &str, msg: String| ScenarioError::Invalid {
            file: name.into(),
            key: key.into(),
            msg,
        };
        if !(scale > 0.0 && scale <= 64.0) {
            return Err(invalid("--scale", format!("{scale} is not in (0, 64]")));
        }
        let size = |key: &str, s: &str| {
            parse_size(s)
                .map_err(|_| invalid(key, format!("{s:?} is not a size (e.g. 128M)")))
                .map(|b| scaled(b, scale))
        };
        let budget_bytes = size("budget", &f.budget)?;
        if budget_bytes > MAX_BYTES {
            return Err(invalid("budget", format!("more than {}", human_bytes(MAX_BYTES))));
        }
        if f.duration_ms > MAX_DURATION_MS {
            return Err(invalid("duration_ms", format!("more than {MAX_DURATION_MS} (an hour)")));
        }
        if budget_bytes < (16 << 20) {
            return Err(invalid(
                "budget",
                format!("{} is less than 16 MiB", human_bytes(budget_bytes)),
            ));
        }
        if f.vm.is_empty() {
            return Err(invalid("vm", "no VMs".into()));
        }
        let mut vms = Vec::new();
        for v in &f.vm {
            if vms.iter().any(|o: &LabVm| o.name == v.name) {
                return Err(invalid(&format!("vm {:?}.name", v.name), "used twice".into()));
            }
            vms.push(check_vm(v, scale, &invalid)?);
        }
        if !f.overcommit.unwrap_or(true) {
            if let Some(v) = vms.iter().find(|v| v.memory_bytes > budget_bytes) {
                return Err(invalid(
                    &format!("vm {:?}.memory", v.name),
                    format!(
                        "{} is larger than the budget ({}) and overcommit = false",
                        human_bytes(v.memory_bytes),
                        human_bytes(budget_bytes)
                    ),
                ));
            }
            let total: u64 = vms.iter().map(|v| v.memory_bytes).sum();
            if total > budget_bytes {
                return Err(invalid(
                    "overcommit",
                    format!(
                        "false, but the VMs' {} exceed the budget ({})",
                        human_bytes(total),
                        human_bytes(budget_bytes)
                    ),
                ));
            }
        }
        if f.idle_tax_percent.is_some_and(|t| t >= 100) {
            return Err(invalid("idle_tax_percent", "must be below 100".into()));
        }
        let mut events = Vec::new();
        for (i, e) in f.event.iter().enumerate() {
            let key = format!("event[{i}].budget");
            let budget = size(&key, &e.budget)?;
            if budget == 0 {
                return Err(invalid(&key, "must be more than 0".into()));
            }
            events.push(LabEvent { at_ms: scaled(e.at_ms, scale), budget_bytes: budget });
        }
        events.sort_by_key(|e| e.at_ms);
        Ok(Self {
            name: name.into(),
            description: f.description,
            budget_bytes,
            duration_ms: scaled(f.duration_ms, scale).max(1),
            tick_ms: scaled(f.tick_ms.unwrap_or(DEFAULT_TICK_MS), scale).max(50),
            active_interval_ms: scaled(f.active_interval_ms.unwrap_or(ACTIVE_INTERVAL_MS), scale)
                .max(100),
            idle_tax_percent: f.idle_tax_percent,
            vms,
            events,
        })
    }

    /// The budget of the run that shows what the guests do with all the memory they want:
    /// twice the VMs' memory.
    pub fn unconstrained_budget(&self) -> u64 {
        2 * self.vms.iter().map(|v| v.memory_bytes).sum::<u64>()
    }

    /// The VMs' configured memory together, bytes.
    pub fn configured_bytes(&self) -> u64 {
        self.vms.iter().map(|v| v.memory_bytes).sum()
    }

    /// The `ebb host` description of a run with `budget_bytes` under `spec`'s knobs (the
    /// scenario's where the spec gives none).
    pub fn host_toml(&self, budget_bytes: u64, spec: &PolicySpec) -> String {
        let mut out = format!("budget = \"{}K\"\ntick_ms = {}\n", budget_bytes >> 10, self.tick_ms);
        let spec =
            PolicySpec { tax_percent: spec.tax_percent.or(self.idle_tax_percent), ..spec.clone() };
        out += &spec.host_lines();
        for v in &self.vms {
            out += &v.host_table(self.active_interval_ms);
        }
        out
    }
}

fn check_vm(
    v: &VmFile,
    scale: f64,
    invalid: &dyn Fn(&str, String) -> ScenarioError,
) -> Result<LabVm, ScenarioError> {
    let key = |k: &str| format!("vm {:?}.{k}", v.name);
    let memory = parse_size(&v.memory)
        .map_err(|_| invalid(&key("memory"), format!("{:?} is not a size", v.memory)))?;
    let memory_mib = scaled(memory >> 20, scale).max(MIN_VM_MIB);
    let memory_bytes = memory_mib
        .checked_mul(1 << 20)
        .filter(|&b| b <= MAX_BYTES)
        .ok_or_else(|| invalid(&key("memory"), format!("more than {}", human_bytes(MAX_BYTES))))?;
    let pages = scaled(v.pages, scale).max(1);
    // touch keeps the first 2 MiB or so for itself: leave it room.
    let room = (memory_bytes / PAGE_SIZE).saturating_sub(1024);
    if pages > room {
        return Err(invalid(
            &key("pages"),
            format!("{pages} pages do not fit in {} (at most {room})", human_bytes(memory_bytes)),
        ));
    }
    let loop_ms = v.loop_ms.map_or(0, |t| scaled(t, scale));
    if loop_ms == 0 && (v.hot.is_some() || v.dist.is_some()) {
        return Err(invalid(&key("hot"), "hot and dist shape the loop: give loop_ms".into()));
    }
    let hot = v.hot.map(|h| scaled(h, scale).clamp(1, pages));
    if let Some(d) = &v.dist {
        if !["sweep", "uniform", "zipf"].contains(&d.as_str()) {
            return Err(invalid(&key("dist"), format!("{d:?} is not sweep, uniform or zipf")));
        }
    }
    let mut controls = Vec::new();
    if let Some(s) = v.shares {
        controls.push(format!("shares = {s}"));
    }
    for (k, val) in [("reservation", &v.reservation), ("limit", &v.limit)] {
        if let Some(val) = val {
            let b =
                parse_size(val).map_err(|_| invalid(&key(k), format!("{val:?} is not a size")))?;
            controls.push(format!("{k} = \"{}M\"", scaled(b >> 20, scale).min(memory_mib)));
        }
    }
    if let Some(g) = &v.sharing_group {
        controls.push(format!("sharing_group = {g:?}"));
    }
    Ok(LabVm {
        name: v.name.clone(),
        memory_bytes,
        pages,
        mix: v.mix.clone(),
        dup_groups: v.dup_groups.unwrap_or(64),
        seed: v.seed.unwrap_or(0),
        loop_ms,
        hot,
        dist: v.dist.clone(),
        idle_ms: v.idle_ms.map_or(0, |t| scaled(t, scale)),
        burst: v.burst.unwrap_or(false),
        start_ms: v.start_ms.map_or(0, |t| scaled(t, scale)),
        controls,
    })
}

impl LabVm {
    /// touch's arguments for this workload.
    pub fn touch_args(&self) -> Vec<String> {
        let mut a = vec![format!("pages={}", self.pages), format!("seed={}", self.seed)];
        match &self.mix {
            Some(m) => a.extend([format!("mix={m}"), format!("dup_groups={}", self.dup_groups)]),
            None => a.push("pattern=random".into()),
        }
        if self.loop_ms > 0 {
            a.push(format!("loop_ms={}", self.loop_ms));
            a.extend(self.hot.map(|h| format!("hot={h}")));
            a.extend(self.dist.as_ref().map(|d| format!("dist={d}")));
        }
        if self.idle_ms > 0 {
            a.push(format!("idle_ms={}", self.idle_ms));
        }
        if self.burst {
            a.push("rewrite=1".into());
        }
        a
    }

    fn host_table(&self, active_interval_ms: u64) -> String {
        let args: Vec<String> = self.touch_args().iter().map(|a| format!("{a:?}")).collect();
        let mut t = format!(
            "[[vm]]\nname = {:?}\nmemory = \"{}M\"\nfirmware = \"touch\"\nfirmware_args = [{}]\nstart_after_ms = {}\n",
            self.name,
            self.memory_bytes >> 20,
            args.join(", "),
            self.start_ms
        );
        for c in &self.controls {
            t += c;
            t.push('\n');
        }
        t += &format!("args = [\"--active-interval-ms\", \"{active_interval_ms}\"]\n");
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        description = "d"
        budget = "128M"
        duration_ms = 3000
        [[vm]]
        name = "a"
        memory = "128M"
        pages = 8000
        mix = "zero:50,random:50"
        loop_ms = 1000
        hot = 2000
        dist = "zipf"
        burst = true
        reservation = "32M"
        [[event]]
        at_ms = 1000
        budget = "64M"
    "#;

    #[test]
    fn a_good_scenario_becomes_a_host_description() {
        let s = Scenario::parse("good", GOOD, 1.0).unwrap();
        assert_eq!((s.budget_bytes, s.tick_ms), (128 << 20, DEFAULT_TICK_MS));
        assert_eq!(s.events, [LabEvent { at_ms: 1000, budget_bytes: 64 << 20 }]);
        let toml = s.host_toml(s.budget_bytes, &PolicySpec::plain("esx"));
        assert!(toml.contains("budget = \"131072K\""), "{toml}");
        assert!(toml.contains("args = [\"--active-interval-ms\", \"250\"]"), "{toml}");
        assert!(!toml.contains("idle_tax_percent"), "{toml}");
        assert!(toml.contains("\"pages=8000\", \"seed=0\", \"mix=zero:50,random:50\", \"dup_groups=64\", \"loop_ms=1000\", \"hot=2000\", \"dist=zipf\", \"rewrite=1\""), "{toml}");
        assert!(toml.contains("reservation = \"32M\""));
        assert_eq!(s.unconstrained_budget(), 256 << 20);
        let taxed = Scenario::parse("good", &format!("idle_tax_percent = 0\n{GOOD}"), 1.0).unwrap();
        let spec = PolicySpec::parse("esx:tax=50").unwrap();
        assert!(taxed
            .host_toml(1 << 30, &PolicySpec::plain("esx"))
            .contains("idle_tax_percent = 0\n"));
        assert!(taxed.host_toml(1 << 30, &spec).contains("idle_tax_percent = 50\n"));
        // The host takes what the lab writes.
        let over = crate::host::config::HostOverrides::default();
        let dir = std::env::temp_dir().join(format!("ebb-lab-unit-{}", std::process::id()));
        std::fs::write(&dir, &toml).unwrap();
        crate::host::config::HostConfig::load(Some(&dir), &over).unwrap();
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn scale_shrinks_sizes_and_times_together() {
        let s = Scenario::parse("good", GOOD, 0.5).unwrap();
        assert_eq!((s.budget_bytes, s.duration_ms), (64 << 20, 1500));
        assert_eq!((s.tick_ms, s.active_interval_ms), (50, 125));
        assert_eq!(
            (s.vms[0].memory_bytes, s.vms[0].pages, s.vms[0].hot),
            (64 << 20, 4000, Some(1000))
        );
        assert_eq!(s.events[0], LabEvent { at_ms: 500, budget_bytes: 32 << 20 });
    }

    fn err(text: &str) -> String {
        Scenario::parse("bad", text, 1.0).unwrap_err().to_string()
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        let e = err(&GOOD.replace("pages = 8000", "pages = 8000\nhotness = 3"));
        assert!(e.contains("unknown field `hotness`"), "{e}");
        let e = err(&GOOD.replace("pages = 8000", "pages = -5"));
        assert!(e.contains("bad:") && e.contains("pages"), "{e}");
        let e = err(&GOOD.replace("budget = \"128M\"", "budget = \"-128M\""));
        assert!(e.contains("budget: \"-128M\" is not a size"), "{e}");
        let e = err(&GOOD
            .replace("duration_ms = 3000", "duration_ms = 3000\novercommit = false")
            .replace("memory = \"128M\"", "memory = \"256M\""));
        assert_eq!(e, "bad: vm \"a\".memory: 256 MiB is larger than the budget (128 MiB) and overcommit = false");
        let e = err(&GOOD.replace("pages = 8000", "pages = 80000"));
        assert!(e.contains("vm \"a\".pages: 80000 pages do not fit in 128 MiB"), "{e}");
        let e = err(&GOOD.replace("loop_ms = 1000\n", ""));
        assert!(e.contains("give loop_ms"), "{e}");
        let e = err(&GOOD.replace("\"zipf\"", "\"pareto\""));
        assert!(e.contains("not sweep, uniform or zipf"), "{e}");
        assert!(err("description = \"x\"").contains("missing field"));
        let e = err(&format!("idle_tax_percent = 100\n{GOOD}"));
        assert_eq!(e, "bad: idle_tax_percent: must be below 100");
    }
}
