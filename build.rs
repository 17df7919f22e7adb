//! Builds the firmware payloads in `firmware/` with the host's gcc (present on every machine
//! ebb is built on) and leaves `<name>.elf` in OUT_DIR for `include_bytes!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const PAYLOADS: &[&str] = &["hello", "touch", "hostile"];
const COMMON: &[&str] = &["start.S", "rt.c"];
const CFLAGS: &[&str] = &[
    "-m64",
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-no-pie",
    "-nostdlib",
    "-static",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
];

fn main() {
    let src = Path::new("firmware");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cc = env::var("EBB_FIRMWARE_CC").unwrap_or_else(|_| "gcc".into());
    println!("cargo:rerun-if-changed=firmware");
    println!("cargo:rerun-if-env-changed=EBB_FIRMWARE_CC");
    for name in PAYLOADS {
        let elf = out.join(format!("{name}.elf"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-T")
            .arg(src.join("link.ld"))
            .args(COMMON.iter().map(|f| src.join(f)))
            .arg(src.join(format!("{name}.c")))
            .arg("-o")
            .arg(&elf);
        let status = cmd.status().unwrap_or_else(|e| {
            panic!("cannot run {cc} to build firmware/{name}: {e} (install gcc, or set EBB_FIRMWARE_CC)")
        });
        assert!(status.success(), "building firmware/{name} failed: {cmd:?}");
    }
}
