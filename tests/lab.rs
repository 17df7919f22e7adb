//! `ebb lab` end to end: a short scenario under three policies with the real host and VMs,
//! the table it prints (a policy that breaks its budget marked so), and its charts; ESX's
//! idle memory tax moving memory to the busy VM in a scaled reproduction of the paper's
//! experiment; and scenario files it must refuse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{kvm_or_skip, run_ebb, text};

const SHORT: &str = r#"
description = "two busy VMs at 2x overcommit, short"
budget = "64M"
duration_ms = 3500
tick_ms = 100

[[vm]]
name = "a"
memory = "64M"
pages = 10000
mix = "zero:20,fill:20,dup:30,random:30"
loop_ms = 2500
hot = 1500
dist = "uniform"

[[vm]]
name = "b"
memory = "64M"
pages = 10000
mix = "zero:20,fill:20,dup:30,random:30"
seed = 5
loop_ms = 2500
hot = 1500
dist = "uniform"
"#;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ebb-lab-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Width and height of a PNG file, if it is one (signature, then the IHDR chunk).
fn png_size(path: &Path) -> Option<(u32, u32)> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 24 || b[..8] != *b"\x89PNG\r\n\x1a\n" || &b[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Some((be(16), be(20)))
}

#[test]
fn a_short_scenario_runs_under_three_policies_with_a_table_and_charts() {
    if !kvm_or_skip("a_short_scenario_runs_under_three_policies_with_a_table_and_charts") {
        return;
    }
    let d = dir("short");
    let scenario = d.join("short.toml");
    std::fs::write(&scenario, SHORT).unwrap();
    let plots = d.join("plots");
    let out = run_ebb(&[
        "lab",
        "run",
        scenario.to_str().unwrap(),
        "--policy",
        "esx",
        "--policy",
        "swap-only",
        "--policy",
        "balloon-only",
        "--plot",
        plots.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    // Progress goes to a terminal only: none here.
    assert!(!stderr.contains("of about"), "{stderr}");
    assert!(stdout.starts_with("## short: two busy VMs at 2x overcommit, short\n"), "{stdout}");
    let rows: Vec<&str> =
        stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| policy")).collect();
    assert_eq!(rows.len(), 4, "unconstrained, esx, swap-only, balloon-only: {stdout}");
    let row =
        |p: &str| rows.iter().find(|r| r.starts_with(&format!("| {p} |"))).unwrap().to_string();
    let cell =
        |p: &str, column: usize| row(p).split('|').map(str::trim).nth(column).unwrap().to_owned();
    for p in ["unconstrained", "esx", "swap-only", "balloon-only"] {
        assert!(row(p).ends_with("| ok |"), "{p}: {}", row(p));
    }
    assert!(row("unconstrained").contains("| 1.00x |"));
    assert_eq!(cell("unconstrained", 8), "0% / 0%", "no slowdown against itself");
    // The budget column: ESX and swap-only keep it; balloon-only cannot reclaim from
    // guests without a balloon driver, so it holds about 2x the budget for the whole run:
    // broken, and its progress is struck through, not compared as if it had kept it.
    for p in ["unconstrained", "esx", "swap-only"] {
        assert_eq!(cell(p, 3), "kept", "{p}: {stdout}");
    }
    assert!(cell("balloon-only", 3).starts_with("**broken**: "), "{}", row("balloon-only"));
    let struck = cell("balloon-only", 7);
    assert!(struck.starts_with("~~") && struck.ends_with("x~~"), "{}", row("balloon-only"));
    // ESX keeps free memory above minFree at the end: "free (minFree)" column.
    let esx = row("esx");
    let cell = esx.split('|').map(str::trim).nth(10).unwrap();
    let (free, min_free) = cell.trim_end_matches(')').split_once(" (").unwrap();
    let (free, min_free): (f64, f64) = (free.parse().unwrap(), min_free.parse().unwrap());
    assert!(free >= min_free, "ESX ended with {free} MiB free, minFree {min_free}: {esx}");
    // Every chart is a PNG of the size the lab draws.
    for name in ["short-esx.png", "short-swap-only.png", "short-balloon-only.png"] {
        assert_eq!(png_size(&plots.join(name)), Some((1200, 700)), "{name}");
    }
    assert_eq!(png_size(&plots.join("short-compare.png")), Some((1200, 600)));
    assert!(stdout.contains(&format!("chart: {}", plots.join("short-compare.png").display())));
    let _ = std::fs::remove_dir_all(&d);
}

/// The progress cell of `policy`'s row in `table`, as a ratio to the unconstrained run.
fn progress(table: &str, policy: &str) -> f64 {
    let row = table.lines().find(|l| l.starts_with(&format!("| {policy} |"))).unwrap();
    let cell = row.split('|').map(str::trim).nth(7).unwrap();
    cell.trim_end_matches('x').parse().unwrap_or_else(|_| panic!("{row}"))
}

#[test]
fn the_idle_tax_moves_memory_to_the_busy_vm() {
    if !kvm_or_skip("the_idle_tax_moves_memory_to_the_busy_vm") {
        return;
    }
    // ESX's figure 7 (lab/paper/idle-tax.toml) at a tenth of its size and length: two VMs
    // of 26 MiB, one idle after writing 20 MiB, one rewriting its 20 MiB for 6 s; the
    // budget leaves them about 35 MiB. At a 0% tax they split it evenly and the busy VM's
    // loop thrashes; at ESX's 75% the idle VM gives it what it needs. Only the busy VM has
    // a loop, so the progress column is the busy VM's.
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/paper/idle-tax.toml");
    let out = run_ebb(&[
        "lab",
        "run",
        scenario.to_str().unwrap(),
        "--scale",
        "0.1",
        "--policy",
        "esx:tax=0",
        "--policy",
        "esx:tax=75",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let (untaxed, taxed) = (progress(&stdout, "esx:tax=0"), progress(&stdout, "esx:tax=75"));
    // On the development machine: 0.02x against 0.71x. Twice is a margin no noise crosses.
    assert!(
        taxed > 2.0 * untaxed,
        "the tax did not help the busy VM: 0% {untaxed}x, 75% {taxed}x\n{stdout}"
    );
    for p in ["esx:tax=0", "esx:tax=75"] {
        let row = stdout.lines().find(|l| l.starts_with(&format!("| {p} |"))).unwrap();
        assert!(row.contains("| kept |") && row.ends_with("| ok |"), "{row}");
    }
    eprintln!("idle tax: busy VM's progress {untaxed:.2}x at 0%, {taxed:.2}x at 75%");
}

#[test]
fn bad_scenario_files_are_refused_with_the_reason() {
    let d = dir("bad");
    let cases = [
        (SHORT.replace("hot = 1500\n", "hot = 1500\nhotness = 2\n"), "unknown field `hotness`"),
        (SHORT.replace("pages = 10000", "pages = -10000"), "invalid value: integer `-10000`"),
        (SHORT.replace("budget = \"64M\"", "budget = \"-64M\""), "budget: \"-64M\" is not a size"),
        (
            SHORT.replace("tick_ms = 100", "tick_ms = 100\novercommit = false"),
            "overcommit: false, but the VMs' 128 MiB exceed the budget (64 MiB)",
        ),
        (
            SHORT.replace("tick_ms = 100", "tick_ms = 100\novercommit = false").replacen(
                "memory = \"64M\"",
                "memory = \"128M\"",
                1,
            ),
            "vm \"a\".memory: 128 MiB is larger than the budget (64 MiB) and overcommit = false",
        ),
    ];
    for (i, (toml, want)) in cases.iter().enumerate() {
        let path = d.join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = run_ebb(&["lab", "run", path.to_str().unwrap(), "--policy", "esx"]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(stderr.contains(want), "{want:?} not in {stderr:?}");
        assert!(stdout.is_empty(), "nothing runs: {stdout}");
    }
    let out = run_ebb(&["lab", "run", d.join("bad0.toml").to_str().unwrap(), "--policy", "nope"]);
    assert!(text(&out).1.contains("unknown policy \"nope\""), "{}", text(&out).1);
    let out =
        run_ebb(&["lab", "run", d.join("bad0.toml").to_str().unwrap(), "--policy", "esx:tax=120"]);
    assert!(text(&out).1.contains("tax: 120 is not below 100"), "{}", text(&out).1);
    let out = run_ebb(&["lab", "sweep", d.join("bad0.toml").to_str().unwrap(), "--budgets", "1,x"]);
    assert!(text(&out).1.contains("--budgets \"1,x\": \"x\" is not a number"), "{}", text(&out).1);
    let out = run_ebb(&["lab", "run", "/nonexistent/x.toml"]);
    assert!(text(&out).1.contains("cannot read /nonexistent/x.toml"), "{}", text(&out).1);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn every_shipped_scenario_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab");
    let mut n = 0;
    let entries = ["scenarios", "scenarios/long", "paper"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"));
    for path in entries {
        ebb::lab::scenario::Scenario::load(&path, 1.0)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        ebb::lab::scenario::Scenario::load(&path, 0.5).unwrap();
        n += 1;
    }
    assert!(n >= 7, "the lab ships at least seven scenarios, found {n}");
}
