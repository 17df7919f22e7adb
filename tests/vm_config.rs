//! One VM description: `ebb run --config FILE` reads a VM's description (the flags' names as
//! keys), flags beside it win, unknown keys are refused by name; `ebb host` hands each VM its
//! description as such a file, not as flags.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{kvm_or_skip, run_ebb, text};

fn file(name: &str, body: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("ebb-vm-config-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn a_vm_boots_from_its_file_and_flags_beside_it_win() {
    if !kvm_or_skip("a_vm_boots_from_its_file_and_flags_beside_it_win") {
        return;
    }
    let ok = file("ok", "firmware = \"hello\"\nmem = \"64M\"\nvcpus = 1\n");
    let out = run_ebb(&["run", "--config", ok.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("Hello from ebb"), "{stdout}");

    // The file asks for more memory than any host has; the flag beside it wins.
    let big = file("big", "firmware = \"hello\"\nmem = \"1000T\"\n");
    let out = run_ebb(&["run", "--config", big.to_str().unwrap(), "--mem", "64M"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let out = run_ebb(&["run", "--config", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "the file's 1000T was not used");

    let bad = file("bad", "firmware = \"hello\"\ncolour = \"red\"\n");
    let out = run_ebb(&["run", "--config", bad.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--config") && stderr.contains("colour"), "{stderr}");
    let out = run_ebb(&["run", "--config", "/no/such/file.toml"]);
    assert!(text(&out).1.contains("/no/such/file.toml"), "{}", text(&out).1);
    for f in [ok, big, bad] {
        let _ = std::fs::remove_file(f);
    }
}
