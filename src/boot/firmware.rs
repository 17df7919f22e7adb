//! ebb's firmware payloads: small ELF programs that start directly at CPL3.
//!
//! The ABI (also in `firmware/ebb.h`): the vCPU starts in 64-bit mode at CPL3 at the ELF
//! entry point, with every byte of guest RAM identity-mapped user-writable (2 MiB pages),
//! and the virtio-mmio device windows at 0xd000_0000 too (accesses there exit to ebb's
//! devices), interrupts off, no IDT (an exception is a triple fault, reported by ebb), a TSS I/O
//! bitmap that lets `out`/`in` reach every port, `rsp` at [`FIRMWARE_STACK_TOP_GPA`] and
//! `rdi` pointing at a [`FirmwareBootInfo`] and `rsi` holding the vCPU's index. Every vCPU
//! (`--vcpus N`) starts there at once, each on its own stack ([`stack_top`]); the boot info
//! says how many there are. The UART is at 0x3f8; writing a 32-bit value to
//! the debug-exit port 0xf4 ends the VM with that value (low 8 bits) as ebb's exit status.
//!
//! A payload may also get a data blob from the host (a text corpus for `touch`'s `mix=text`,
//! say): [`load`] places it page-aligned at the top of the free RAM below 4 GiB and takes
//! those pages out of the free ranges the boot info lists. And it may report how far it got:
//! the boot info points at a u64 at [`FIRMWARE_PROGRESS_GPA`] that the payload bumps and the
//! host reads with [`read_progress`].
//!
//! Starting at CPL3 is deliberate: on PVM hosts CPL0 code is emulated at about 1.6 M
//! instructions/s, while CPL3 code runs natively (docs/design.md, "The host").

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::Ordering;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{
    ram_ranges, ram_top, CMDLINE_GPA, CMDLINE_MAX_BYTES, FIRMWARE_PROGRESS_GPA,
    FIRMWARE_STACK_BYTES, FIRMWARE_STACK_TOP_GPA, HIMEM_GPA, MMIO_HOLE_GPA, PAGE_BYTES,
    VIRTIO_MMIO_BASE_GPA, VIRTIO_MMIO_WINDOW_BYTES, ZERO_PAGE_GPA,
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
    /// Guest-physical address of the host's data blob, page-aligned, below 4 GiB and outside
    /// `free_ranges` (0 when there is none).
    pub blob_gpa: u64,
    /// Length of the blob in bytes (0 when there is none).
    pub blob_len: u64,
    /// Guest-physical address of the u64 progress counter the payload bumps as it works
    /// ([`FIRMWARE_PROGRESS_GPA`], 0 at start).
    pub progress_gpa: u64,
    /// How many vCPUs run the payload; each starts with its index (0..nr_cpus) in `rsi`.
    pub nr_cpus: u64,
}
const _: () = {
    // The layout `firmware/ebb.h` declares: 14 u64s, no padding.
    assert!(std::mem::size_of::<FirmwareBootInfo>() == 112);
    assert!(std::mem::offset_of!(FirmwareBootInfo, nr_cpus) == 104);
    assert!(std::mem::offset_of!(FirmwareBootInfo, tsc_khz) == 72);
    assert!(std::mem::offset_of!(FirmwareBootInfo, blob_gpa) == 80);
    assert!(std::mem::offset_of!(FirmwareBootInfo, blob_len) == 88);
    assert!(std::mem::offset_of!(FirmwareBootInfo, progress_gpa) == 96);
    // The progress counter lies in the boot-info page, after the boot info.
    assert!(
        ZERO_PAGE_GPA + std::mem::size_of::<FirmwareBootInfo>() as u64 <= FIRMWARE_PROGRESS_GPA
    );
};
// SAFETY: repr(C) struct of u64s without padding: every byte pattern is valid.
unsafe impl ByteValued for FirmwareBootInfo {}

/// The payloads built into the binary by `build.rs` from `firmware/`.
pub const BUILTIN: &[(&str, &[u8])] = &[
    ("hello", include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"))),
    ("touch", include_bytes!(concat!(env!("OUT_DIR"), "/touch.elf"))),
    ("hostile", include_bytes!(concat!(env!("OUT_DIR"), "/hostile.elf"))),
];

/// The payload `ebb run` boots when given neither a kernel nor a firmware.
pub const DEFAULT_PAYLOAD: &str = "hello";

/// The image of a built-in payload.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, image)| *image)
}

/// Reads a blob file for [`load`].
pub fn read_blob(path: &Path) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| BootError::Read {
        what: "firmware blob",
        path: path.to_path_buf(),
        source,
    })
}

/// The payload's progress counter as it stands now (see [`FirmwareBootInfo::progress_gpa`]),
/// read atomically, so a counter the vCPU is storing to concurrently is never torn. Only
/// meaningful for a VM booted with [`load`].
pub fn read_progress(mem: &GuestMemoryMmap) -> Result<u64, GuestMemoryError> {
    mem.load(GuestAddress(FIRMWARE_PROGRESS_GPA), Ordering::Relaxed)
}

/// The top of vCPU `cpu`'s stack: the stacks are [`FIRMWARE_STACK_BYTES`] each, vCPU 0's
/// highest, all within the firmware stack area.
pub fn stack_top(cpu: u8) -> u64 {
    FIRMWARE_STACK_TOP_GPA - u64::from(cpu) * FIRMWARE_STACK_BYTES
}

/// How vCPU `cpu` starts: as the boot vCPU `bsp` does, on its own stack, with its index in
/// `rsi`.
pub fn cpu_start(bsp: &BootCpu, cpu: u8) -> BootCpu {
    let mut start = bsp.clone();
    start.regs.rsp = stack_top(cpu);
    start.regs.rsi = u64::from(cpu);
    start
}

/// Loads a payload, its arguments and the optional data `blob` for `nr_cpus` vCPUs; returns
/// how the boot vCPU starts (the others: [`cpu_start`]). An empty blob counts as none.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    source: &FirmwareSource,
    args: &[(String, String)],
    blob: Option<&[u8]>,
    tsc_khz: u32,
    nr_cpus: u8,
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
    // RAM, and the virtio-mmio windows, so that a payload can drive a device itself.
    let top = ram_top(mem_bytes).max(VIRTIO_MMIO_BASE_GPA + VIRTIO_MMIO_WINDOW_BYTES);
    paging::write_identity_map(mem, top, true)?;
    let args_len = write_args(mem, args)?;
    let blob = blob.unwrap_or_default();
    let mut info = boot_info(mem_bytes, loaded.kernel_end, args_len as u64, blob.len() as u64)?;
    info.tsc_khz = u64::from(tsc_khz);
    info.nr_cpus = u64::from(nr_cpus.max(1));
    if !blob.is_empty() {
        write_bytes(mem, blob, info.blob_gpa, "firmware blob")?;
    }
    write_obj(mem, 0u64, FIRMWARE_PROGRESS_GPA, "firmware progress counter")?;
    write_obj(mem, info, ZERO_PAGE_GPA, "firmware boot info")?;
    let mut cpu = BootCpu { mode: CpuMode::Long64User, regs: Default::default() };
    cpu.regs.rip = loaded.kernel_load.0;
    cpu.regs.rsp = stack_top(0);
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

/// The boot info for a payload whose image ends at `image_end`, with a blob of `blob_len`
/// bytes (0: none) placed at the top of the free RAM below 4 GiB.
pub fn boot_info(
    mem_bytes: u64,
    image_end: u64,
    args_len: u64,
    blob_len: u64,
) -> Result<FirmwareBootInfo, BootError> {
    let mut info = FirmwareBootInfo {
        magic: BOOT_INFO_MAGIC,
        args_gpa: CMDLINE_GPA,
        args_len,
        mem_bytes,
        progress_gpa: FIRMWARE_PROGRESS_GPA,
        ..Default::default()
    };
    let free_start = image_end.max(HIMEM_GPA).next_multiple_of(PAGE_BYTES);
    let mut ranges: Vec<[u64; 2]> = ram_ranges(mem_bytes)
        .into_iter()
        .filter_map(|(start, len)| {
            let (start, end) = (start.max(free_start), start + len);
            (start < end).then(|| [start, end - start])
        })
        .collect();
    if ranges.is_empty() {
        return Err(BootError::DoesNotFit { what: "firmware image", mem_bytes });
    }
    if blob_len > 0 {
        info.blob_gpa = take_blob_pages(&mut ranges, blob_len)?;
        info.blob_len = blob_len;
    }
    // ram_ranges gives at most MAX_RANGES ranges.
    for (slot, range) in info.free_ranges.iter_mut().zip(&ranges) {
        *slot = *range;
    }
    info.nr_ranges = ranges.len() as u64;
    Ok(info)
}

/// Takes the pages for a blob of `len` bytes from the top of the free range below 4 GiB
/// (dropping the range if nothing is left of it); returns where the blob starts.
fn take_blob_pages(ranges: &mut Vec<[u64; 2]>, len: u64) -> Result<u64, BootError> {
    let low = ranges.iter().position(|&[start, _]| start < MMIO_HOLE_GPA);
    let room = low.map_or(0, |i| ranges[i][1]);
    let pages_len = len.checked_next_multiple_of(PAGE_BYTES).filter(|&l| l <= room);
    let (Some(i), Some(pages_len)) = (low, pages_len) else {
        return Err(BootError::BlobTooLarge { len, room });
    };
    ranges[i][1] -= pages_len;
    let gpa = ranges[i][0] + ranges[i][1];
    if ranges[i][1] == 0 {
        ranges.remove(i);
    }
    Ok(gpa)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn free_ranges_start_after_the_image() {
        let info = boot_info(64 << 20, 0x20_1234, 5, 0).unwrap();
        assert_eq!(info.magic, BOOT_INFO_MAGIC);
        assert_eq!(info.nr_ranges, 1);
        assert_eq!(info.free_ranges[0], [0x20_2000, (64 << 20) - 0x20_2000]);
    }

    #[test]
    fn memory_above_the_hole_is_a_second_range() {
        let info = boot_info(4 << 30, 0x30_0000, 0, 0).unwrap();
        assert_eq!(info.nr_ranges, 2);
        assert_eq!(info.free_ranges[1], [4 << 30, 1 << 30]);
    }

    #[test]
    fn image_beyond_ram_is_refused() {
        assert!(boot_info(2 << 20, 3 << 20, 0, 0).is_err());
    }

    #[test]
    fn no_blob_leaves_the_free_ranges_whole_and_the_blob_fields_zero() {
        let info = boot_info(64 * MIB, 0x20_2000, 0, 0).unwrap();
        assert_eq!((info.blob_gpa, info.blob_len), (0, 0));
        assert_eq!(info.free_ranges[0], [0x20_2000, 64 * MIB - 0x20_2000]);
        assert_eq!(info.progress_gpa, FIRMWARE_PROGRESS_GPA);
    }

    #[test]
    fn a_blob_takes_whole_pages_from_the_top_of_low_free_ram() {
        // 5000 bytes: two pages at the top of the 64 MiB, the free range ends below them.
        let info = boot_info(64 * MIB, 0x20_2000, 0, 5000).unwrap();
        assert_eq!((info.blob_gpa, info.blob_len), (64 * MIB - 0x2000, 5000));
        assert_eq!(info.nr_ranges, 1);
        assert_eq!(info.free_ranges[0], [0x20_2000, 64 * MIB - 0x2000 - 0x20_2000]);
    }

    #[test]
    fn a_blob_goes_below_the_mmio_hole_and_ram_above_4_gib_stays_free() {
        let info = boot_info(4 << 30, 0x30_0000, 0, 3 * MIB).unwrap();
        assert_eq!(info.blob_gpa, MMIO_HOLE_GPA - 3 * MIB);
        assert_eq!(info.nr_ranges, 2);
        assert_eq!(info.free_ranges[0], [0x30_0000, MMIO_HOLE_GPA - 3 * MIB - 0x30_0000]);
        assert_eq!(info.free_ranges[1], [4 << 30, 1 << 30]);
    }

    #[test]
    fn a_blob_that_fills_low_free_ram_exactly_removes_that_range() {
        let room = 4 * MIB - 0x20_0000;
        let info = boot_info(4 * MIB, 0x20_0000, 0, room).unwrap();
        assert_eq!((info.blob_gpa, info.nr_ranges), (0x20_0000, 0));
        assert_eq!(info.free_ranges, [[0; 2]; MAX_RANGES]);
    }

    #[test]
    fn a_blob_larger_than_low_free_ram_is_refused_with_the_room_there() {
        let room = 4 * MIB - 0x20_0000;
        let err = boot_info(4 * MIB, 0x20_0000, 0, room + 1).unwrap_err();
        assert!(
            matches!(err, BootError::BlobTooLarge { len, room: r } if len == room + 1 && r == room),
            "{err:?}"
        );
        assert!(err.to_string().contains("below 4 GiB"), "{err}");
        // Free RAM above 4 GiB does not help: the blob must stay below the hole.
        let err = boot_info(4 << 30, 0x20_0000, 0, 3 << 30).unwrap_err();
        assert!(matches!(err, BootError::BlobTooLarge { .. }), "{err:?}");
        assert!(matches!(
            boot_info(64 * MIB, 0x20_0000, 0, u64::MAX),
            Err(BootError::BlobTooLarge { .. })
        ));
    }

    fn guest(mem_bytes: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(mem_bytes).unwrap())])
            .unwrap()
    }

    fn read_info(mem: &GuestMemoryMmap) -> FirmwareBootInfo {
        mem.read_obj(GuestAddress(ZERO_PAGE_GPA)).unwrap()
    }

    #[test]
    fn load_writes_the_blob_where_the_boot_info_says_outside_the_free_ranges() {
        let mem = guest(32 * MIB);
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let touch = FirmwareSource::Builtin("touch".into());
        load(&mem, 32 * MIB, &touch, &[], Some(&blob), 1000, 1).unwrap();
        let info = read_info(&mem);
        assert_eq!(info.blob_len, 10_000);
        assert_eq!(info.blob_gpa % PAGE_BYTES, 0);
        let mut back = vec![0; blob.len()];
        mem.read_slice(&mut back, GuestAddress(info.blob_gpa)).unwrap();
        assert_eq!(back, blob);
        let [start, len] = info.free_ranges[0];
        assert_eq!(start + len, info.blob_gpa, "the free range ends where the blob starts");
        assert_eq!(info.blob_gpa + 3 * PAGE_BYTES, 32 * MIB, "three pages at the top");
    }

    #[test]
    fn load_without_a_blob_or_with_an_empty_one_reports_none() {
        let mem = guest(32 * MIB);
        let touch = FirmwareSource::Builtin("touch".into());
        for blob in [None, Some(&[][..])] {
            load(&mem, 32 * MIB, &touch, &[], blob, 1000, 1).unwrap();
            let info = read_info(&mem);
            assert_eq!((info.blob_gpa, info.blob_len), (0, 0));
            let [start, len] = info.free_ranges[0];
            assert_eq!(start + len, 32 * MIB);
        }
    }

    #[test]
    fn a_blob_too_big_for_the_guest_fails_the_load() {
        let mem = guest(4 * MIB);
        let touch = FirmwareSource::Builtin("touch".into());
        let blob = vec![1u8; usize::try_from(4 * MIB).unwrap()];
        let err = load(&mem, 4 * MIB, &touch, &[], Some(&blob), 0, 1).unwrap_err();
        assert!(matches!(err, BootError::BlobTooLarge { .. }), "{err:?}");
    }

    #[test]
    fn the_progress_counter_starts_at_zero_and_reads_what_the_guest_stores() {
        let mem = guest(8 * MIB);
        mem.write_obj(0xdead_u64, GuestAddress(FIRMWARE_PROGRESS_GPA)).unwrap();
        load(&mem, 8 * MIB, &FirmwareSource::Builtin("hello".into()), &[], None, 0, 1).unwrap();
        assert_eq!(read_info(&mem).progress_gpa, FIRMWARE_PROGRESS_GPA);
        assert_eq!(read_progress(&mem).unwrap(), 0);
        mem.write_obj(12_345_u64, GuestAddress(FIRMWARE_PROGRESS_GPA)).unwrap();
        assert_eq!(read_progress(&mem).unwrap(), 12_345);
    }

    #[test]
    fn a_missing_blob_file_is_a_read_error_naming_it() {
        let err = read_blob(Path::new("/nonexistent/ebb-blob")).unwrap_err();
        assert!(err.to_string().contains("firmware blob /nonexistent/ebb-blob"), "{err}");
    }

    #[test]
    fn every_vcpu_gets_its_own_stack_and_its_index() {
        let mem = guest(8 * MIB);
        let bsp = load(&mem, 8 * MIB, &FirmwareSource::Builtin("touch".into()), &[], None, 0, 32)
            .unwrap();
        assert_eq!(read_info(&mem).nr_cpus, 32);
        let last = cpu_start(&bsp, 31);
        assert_eq!((last.regs.rip, last.regs.rdi, last.regs.rsi), (bsp.regs.rip, bsp.regs.rdi, 31));
        assert_eq!(bsp.regs.rsp - last.regs.rsp, 31 * FIRMWARE_STACK_BYTES);
        assert!(last.regs.rsp - FIRMWARE_STACK_BYTES >= CMDLINE_GPA + CMDLINE_MAX_BYTES as u64);
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
