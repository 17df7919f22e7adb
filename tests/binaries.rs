//! The VM process links only what it runs: `ebb-vm`, which `ebb host` starts for each VM,
//! carries neither the lab's chart library (plotters) nor `ebb top`'s terminal UI (ratatui),
//! and `ebb host` starts it when it is beside `ebb`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// How many of the binary's symbols name `krate` (`nm`: a function linked from a crate
/// has the crate's name in its mangled symbol; debug information may still name its types,
/// which is why the symbols are read, not the bytes). None without `nm`.
fn symbols_of(path: &str, krate: &str) -> Option<usize> {
    let out = std::process::Command::new("nm").arg(path).output().ok()?;
    assert!(out.status.success(), "nm {path}: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(krate)).count())
}

#[test]
fn the_vm_binary_carries_neither_charts_nor_the_terminal_ui() {
    let (ebb, vm) = (env!("CARGO_BIN_EXE_ebb"), env!("CARGO_BIN_EXE_ebb-vm"));
    for krate in ["plotters", "ratatui", "crossterm"] {
        let Some(in_ebb) = symbols_of(ebb, krate) else {
            eprintln!("SKIPPED: nm (binutils) is not installed");
            return;
        };
        // The check can fail: `ebb` links all three.
        assert!(in_ebb > 0, "ebb has no {krate} symbol: the check below proves nothing");
        assert_eq!(symbols_of(vm, krate), Some(0), "ebb-vm links {krate}");
    }
    let size = |p: &str| std::fs::metadata(p).unwrap().len() >> 20;
    eprintln!("ebb {} MiB, ebb-vm {} MiB (this build's profile)", size(ebb), size(vm));
}

#[test]
fn ebb_vm_runs_a_vm_as_ebb_run_does() {
    if !common::kvm_or_skip("ebb_vm_runs_a_vm_as_ebb_run_does") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ebb-vm"))
        .args(["run", "--firmware", "hello"])
        .output()
        .unwrap();
    let (stdout, stderr) = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stdout.trim().is_empty(), "the payload said nothing: {stderr}");
}
