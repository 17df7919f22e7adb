//! `ebb lab` end to end: a short scenario under two policies with the real host and VMs,
//! the table it prints, and its charts; and scenario files it must refuse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{kvm_or_skip, run_ebb, text};

const SHORT: &str = r#"
description = "two busy VMs at 2x overcommit, short"
budget = "64M"
duration_ms = 2500
tick_ms = 100

[[vm]]
name = "a"
memory = "64M"
pages = 8000
mix = "zero:20,fill:20,dup:30,random:30"
loop_ms = 1500
hot = 1500
dist = "uniform"

[[vm]]
name = "b"
memory = "64M"
pages = 8000
mix = "zero:20,fill:20,dup:30,random:30"
seed = 5
loop_ms = 1500
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
fn a_short_scenario_runs_under_two_policies_with_a_table_and_charts() {
    if !kvm_or_skip("a_short_scenario_runs_under_two_policies_with_a_table_and_charts") {
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
    assert_eq!(rows.len(), 3, "unconstrained, esx, swap-only: {stdout}");
    let row =
        |p: &str| rows.iter().find(|r| r.starts_with(&format!("| {p} |"))).unwrap().to_string();
    for p in ["unconstrained", "esx", "swap-only"] {
        assert!(row(p).ends_with("| ok |"), "{p}: {}", row(p));
    }
    assert!(row("unconstrained").contains("| 1.00x |"));
    // ESX keeps free memory above minFree at the end: "free (minFree)" column.
    let esx = row("esx");
    let cell = esx.split('|').map(str::trim).nth(8).unwrap();
    let (free, min_free) = cell.trim_end_matches(')').split_once(" (").unwrap();
    let (free, min_free): (f64, f64) = (free.parse().unwrap(), min_free.parse().unwrap());
    assert!(free >= min_free, "ESX ended with {free} MiB free, minFree {min_free}: {esx}");
    // Every chart is a PNG of the size the lab draws.
    for name in ["short-esx.png", "short-swap-only.png"] {
        assert_eq!(png_size(&plots.join(name)), Some((1200, 700)), "{name}");
    }
    assert_eq!(png_size(&plots.join("short-compare.png")), Some((1200, 600)));
    assert!(stdout.contains(&format!("chart: {}", plots.join("short-compare.png").display())));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_scenario_files_are_refused_with_the_reason() {
    let d = dir("bad");
    let cases = [
        (SHORT.replace("hot = 1500\n", "hot = 1500\nhotness = 2\n"), "unknown field `hotness`"),
        (SHORT.replace("pages = 8000", "pages = -8000"), "invalid value: integer `-8000`"),
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
    let out = run_ebb(&["lab", "run", "/nonexistent/x.toml"]);
    assert!(text(&out).1.contains("cannot read /nonexistent/x.toml"), "{}", text(&out).1);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn every_shipped_scenario_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        ebb::lab::scenario::Scenario::load(&path, 1.0)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        ebb::lab::scenario::Scenario::load(&path, 0.5).unwrap();
        n += 1;
    }
    assert!(n >= 6, "the lab ships at least six scenarios, found {n}");
}
