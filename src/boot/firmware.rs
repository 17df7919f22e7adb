//! ebb's firmware payloads: small ELF programs that start directly at CPL3.
//!
//! The ABI (also in `firmware/ebb.h`): the vCPU starts in 64-bit mode at CPL3 at the ELF
//! entry point, with every byte of guest RAM identity-mapped user-writable (2 MiB pages),
//! interrupts off, no IDT (an exception is a triple fault, reported by ebb), a TSS I/O
//! bitmap that lets `out`/`in` reach every port, `rsp` at [`FIRMWARE_STACK_TOP_GPA`] and
//! `rdi` pointing at a [`FirmwareBootInfo`]. The UART is at 0x3f8; writing a 32-bit value to
//! the debug-exit port 0xf4 ends the VM with that value (low 8 bits) as ebb's exit status.
//!
//! Starting at CPL3 is deliberate: on PVM hosts CPL0 code is emulated at about 1.6 M
//! instructions/s, while CPL3 code runs natively (DESIGN.md section 4).

use std::borrow::Cow;
use std::io::Cursor;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ram_ranges, ram_top, CMDLINE_GPA, CMDLINE_MAX_BYTES, FIRMWARE_STACK_TOP_GPA, HIMEM_GPA,
    PAGE_BYTES, ZERO_PAGE_GPA,
};
use super::{gdt, paging, write_bytes, write_obj, BootCpu, BootError, CpuMode};
use crate::config::FirmwareSource;

/// `"EBBBOOT1"` read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"EBBBOOT1");
/// Most RAM ranges the boot info lists (below the MMIO hole and above 4 GiB).
pub const MAX_RANGES: usize = 2;

/// What `rdi` points at when a payload starts (`struct ebb_boot_info` in `firmware/ebb.h`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FirmwareBootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// Guest-physical address of the NUL-terminated `key=value key=value` arguments.
    pub args_gpa: u64,
    /// Length of the arguments without the NUL.
    pub args_len: u64,
    /// Configured guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of valid entries in `free_ranges`.
    pub nr_ranges: u64,
    /// RAM the payload may use freely: `[start, length]` pairs, page-aligned, not overlapping
    /// its image, page tables, stack or this structure.
    pub free_ranges: [[u64; 2]; MAX_RANGES],
    /// TSC frequency in kHz, for payloads that time their phases (0 if unknown).
    pub tsc_khz: u64,
}
const _: () = assert!(std::mem::size_of::<FirmwareBootInfo>() == 80);
// SAFETY: repr(C) struct of u64s without padding: every byte pattern is valid.
unsafe impl ByteValued for FirmwareBootInfo {}

/// The payloads built into the binary by `build.rs` from `firmware/`.
pub const BUILTIN: &[(&str, &[u8])] = &[
    ("hello", include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"))),
    ("touch", include_bytes!(concat!(env!("OUT_DIR"), "/touch.elf"))),
];

/// The payload `ebb run` boots when given neither a kernel nor a firmware.
pub const DEFAULT_PAYLOAD: &str = "hello";

/// The image of a built-in payload.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, image)| *image)
}

/// Loads a payload and its arguments; returns how the boot vCPU starts.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    source: &FirmwareSource,
    args: &[(String, String)],
    tsc_khz: u32,
) -> Result<BootCpu, BootError> {
    let (image, path): (Cow<'_, [u8]>, _) = match source {
        FirmwareSource::Builtin(name) => {
            let known = BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
            let image = builtin(name)
                .ok_or_else(|| BootError::UnknownFirmware { name: name.clone(), known })?;
            (Cow::Borrowed(image), std::path::PathBuf::from(name))
        }
        FirmwareSource::File(path) => {
            let image = std::fs::read(path).map_err(|source| BootError::Read {
                what: "firmware",
                path: path.clone(),
                source,
            })?;
            (Cow::Owned(image), path.clone())
        }
    };
    let loaded = Elf::load(mem, None, &mut Cursor::new(&image[..]), Some(GuestAddress(HIMEM_GPA)))
        .map_err(|source| BootError::Elf { path, source })?;
    gdt::write_tables(mem)?;
    paging::write_identity_map(mem, ram_top(mem_bytes), true)?;
    let args_len = write_args(mem, args)?;
    let mut info = boot_info(mem_bytes, loaded.kernel_end, args_len as u64)?;
    info.tsc_khz = u64::from(tsc_khz);
    write_obj(mem, info, ZERO_PAGE_GPA, "firmware boot info")?;
    let mut cpu = BootCpu { mode: CpuMode::Long64User, regs: Default::default() };
    cpu.regs.rip = loaded.kernel_load.0;
    cpu.regs.rsp = FIRMWARE_STACK_TOP_GPA;
    cpu.regs.rdi = ZERO_PAGE_GPA;
    cpu.regs.rflags = 0x2;
    Ok(cpu)
}

/// Joins the arguments as `k=v k=v`, writes them NUL-terminated; returns the length.
fn write_args(mem: &GuestMemoryMmap, args: &[(String, String)]) -> Result<usize, BootError> {
    let text = args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    if text.len() + 1 > CMDLINE_MAX_BYTES {
        return Err(BootError::FirmwareArgsTooLong { len: text.len(), max: CMDLINE_MAX_BYTES - 1 });
    }
    let mut bytes = text.into_bytes();
    bytes.push(0);
    write_bytes(mem, &bytes, CMDLINE_GPA, "firmware arguments")?;
    Ok(bytes.len() - 1)
}

/// The boot info for a payload whose image ends at `image_end`.
pub fn boot_info(
    mem_bytes: u64,
    image_end: u64,
    args_len: u64,
) -> Result<FirmwareBootInfo, BootError> {
    let mut info = FirmwareBootInfo {
        magic: BOOT_INFO_MAGIC,
        args_gpa: CMDLINE_GPA,
        args_len,
        mem_bytes,
        ..Default::default()
    };
    let free_start = image_end.max(HIMEM_GPA).next_multiple_of(PAGE_BYTES);
    let mut n = 0;
    for (start, len) in ram_ranges(mem_bytes) {
        let (start, end) = (start.max(free_start), start + len);
        if start < end {
            info.free_ranges[n] = [start, end - start];
            n += 1;
        }
    }
    if n == 0 {
        return Err(BootError::DoesNotFit { what: "firmware image", mem_bytes });
    }
    info.nr_ranges = n as u64;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ranges_start_after_the_image() {
        let info = boot_info(64 << 20, 0x20_1234, 5).unwrap();
        assert_eq!(info.magic, BOOT_INFO_MAGIC);
        assert_eq!(info.nr_ranges, 1);
        assert_eq!(info.free_ranges[0], [0x20_2000, (64 << 20) - 0x20_2000]);
    }

    #[test]
    fn memory_above_the_hole_is_a_second_range() {
        let info = boot_info(4 << 30, 0x30_0000, 0).unwrap();
        assert_eq!(info.nr_ranges, 2);
        assert_eq!(info.free_ranges[1], [4 << 30, 1 << 30]);
    }

    #[test]
    fn image_beyond_ram_is_refused() {
        assert!(boot_info(2 << 20, 3 << 20, 0).is_err());
    }

    #[test]
    fn builtin_payloads_are_elf_files() {
        for (name, image) in BUILTIN {
            assert_eq!(&image[..4], b"\x7fELF", "{name}");
        }
        assert!(builtin(DEFAULT_PAYLOAD).is_some());
        assert!(builtin("nope").is_none());
    }
}
