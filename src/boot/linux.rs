//! Loading a Linux kernel: bzImage through the 64-bit boot protocol, or an ELF vmlinux
//! through its PVH entry point.
//!
//! References: `Documentation/arch/x86/boot.rst` (zero page, 64-bit entry at load address
//! + 0x200) and the Xen PVH ABI (`hvm_start_info`, 32-bit entry with paging off).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::e820::memory_map;
use super::layout::{
    ram_ranges, BOOT_STACK_GPA, CMDLINE_GPA, CMDLINE_MAX_BYTES, HIMEM_GPA, PVH_MEMMAP_GPA,
    ZERO_PAGE_GPA,
};
use super::{gdt, mptable, paging, write_bytes, write_obj, BootCpu, BootError, CpuMode};

/// `HdrS` at offset 0x202 marks a bzImage (boot protocol 2.00+).
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel (boot.rst).
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `XEN_HVM_START_MAGIC_VALUE` from `xen/include/public/arch-x86/hvm/start_info.h`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Where the PVH module list (the initrd) goes, in the start_info page after the memmap.
const PVH_MODLIST_GPA: u64 = ZERO_PAGE_GPA + 0x800;
/// Linux's `COMMAND_LINE_SIZE` on x86 when the header does not say (protocol < 2.06).
const DEFAULT_CMDLINE_MAX: usize = 256;
/// The kernel maps only the first 1 GiB before it builds its own page tables.
const BOOT_MAP_BYTES: u64 = 1 << 30;
/// Most e820 entries the zero page holds (`E820_MAX_ENTRIES_ZEROPAGE`).
const ZERO_PAGE_E820_MAX: usize = 128;

/// `boot_params` as plain bytes for vm-memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a repr(C) struct of integers and arrays of integers; any byte
// pattern is a valid value and it has no padding that could leak host data.
unsafe impl ByteValued for ZeroPage {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: repr(C) integers only (56 bytes, checked by linux-loader).
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: repr(C) integers only (24 bytes, checked by linux-loader).
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: repr(C) integers only (32 bytes, checked by linux-loader).
unsafe impl ByteValued for ModlistEntry {}

/// The kind of kernel image, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// A bzImage.
    BzImage,
    /// An ELF file (vmlinux).
    Elf,
}

/// Identifies `file` by its magic bytes.
pub fn kernel_kind(file: &mut File, path: &Path) -> Result<KernelKind, BootError> {
    let read_err = |source| BootError::Read { what: "kernel", path: path.to_owned(), source };
    let mut magic = [0u8; 4];
    file.rewind().map_err(read_err)?;
    if file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(KernelKind::Elf);
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).map_err(read_err)?;
    if file.read_exact(&mut magic).is_ok() && &magic == BZIMAGE_MAGIC {
        return Ok(KernelKind::BzImage);
    }
    Err(BootError::NotAKernel(path.to_owned()))
}

/// Loads the kernel, initrd and command line, with an MP table listing `nr_cpus` CPUs;
/// returns how the boot vCPU starts (the others wait for the kernel's INIT/SIPI).
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    nr_cpus: u8,
) -> Result<BootCpu, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::Read {
        what: "kernel",
        path: kernel.to_owned(),
        source,
    })?;
    gdt::write_tables(mem)?;
    mptable::write(mem, nr_cpus.max(1))?;
    match kernel_kind(&mut file, kernel)? {
        KernelKind::BzImage => load_bzimage(mem, mem_bytes, &mut file, kernel, initrd, cmdline),
        KernelKind::Elf => load_pvh(mem, mem_bytes, &mut file, kernel, initrd, cmdline),
    }
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    file: &mut File,
    path: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootCpu, BootError> {
    let loaded = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_GPA)))
        .map_err(|source| BootError::BzImage { path: path.to_owned(), source })?;
    let mut hdr = loaded.setup_header.unwrap_or_default();
    let cmdline_max = match usize::try_from(hdr.cmdline_size).unwrap_or(0) {
        0 => DEFAULT_CMDLINE_MAX,
        n => (n + 1).min(CMDLINE_MAX_BYTES),
    };
    let cmdline_len = write_cmdline(mem, cmdline, cmdline_max)?;
    let initrd_max = u64::from(hdr.initrd_addr_max);
    // linux-loader reports the end as an address already, not as an offset from the load.
    let kernel_end = loaded.kernel_end;
    if let Some((addr, size)) = load_initrd(mem, mem_bytes, initrd, kernel_end, initrd_max)? {
        hdr.ramdisk_image =
            u32::try_from(addr).map_err(|_| BootError::InitrdTooLarge { size, room: 0 })?;
        hdr.ramdisk_size =
            u32::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, room: 0 })?;
    }
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = u32::try_from(CMDLINE_GPA).unwrap_or(0);
    hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    let mut params = ZeroPage::default();
    params.0.hdr = hdr;
    let map = memory_map(mem_bytes);
    for (slot, e) in params.0.e820_table.iter_mut().zip(map.iter().take(ZERO_PAGE_E820_MAX)) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    params.0.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    write_obj(mem, params, ZERO_PAGE_GPA, "zero page")?;
    paging::write_identity_map(mem, BOOT_MAP_BYTES, false)?;
    let mut cpu = BootCpu { mode: CpuMode::Long64Kernel, regs: Default::default() };
    cpu.regs.rip = loaded.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET;
    cpu.regs.rsp = BOOT_STACK_GPA;
    cpu.regs.rbp = BOOT_STACK_GPA;
    cpu.regs.rsi = ZERO_PAGE_GPA;
    cpu.regs.rflags = 0x2;
    Ok(cpu)
}

fn load_pvh(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    file: &mut File,
    path: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootCpu, BootError> {
    let loaded = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_GPA)))
        .map_err(|source| BootError::Elf { path: path.to_owned(), source })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvhNote(path.to_owned()));
    };
    write_cmdline(mem, cmdline, CMDLINE_MAX_BYTES)?;
    let mut info = StartInfo::default();
    info.0.magic = PVH_MAGIC;
    info.0.version = 1;
    info.0.cmdline_paddr = CMDLINE_GPA;
    let kernel_end = loaded.kernel_end;
    if let Some((addr, size)) =
        load_initrd(mem, mem_bytes, initrd, kernel_end, u64::from(u32::MAX))?
    {
        let module = hvm_modlist_entry { paddr: addr, size, ..Default::default() };
        write_obj(mem, ModlistEntry(module), PVH_MODLIST_GPA, "PVH module list")?;
        info.0.nr_modules = 1;
        info.0.modlist_paddr = PVH_MODLIST_GPA;
    }
    let map = memory_map(mem_bytes);
    for (i, e) in map.iter().enumerate() {
        let entry =
            hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 };
        let gpa = PVH_MEMMAP_GPA + 24 * i as u64;
        write_obj(mem, MemmapEntry(entry), gpa, "PVH memory map")?;
    }
    info.0.memmap_paddr = PVH_MEMMAP_GPA;
    info.0.memmap_entries = u32::try_from(map.len()).unwrap_or(0);
    write_obj(mem, info, ZERO_PAGE_GPA, "PVH start_info")?;
    let mut cpu = BootCpu { mode: CpuMode::Protected32, regs: Default::default() };
    cpu.regs.rip = entry.0;
    cpu.regs.rbx = ZERO_PAGE_GPA;
    cpu.regs.rflags = 0x2;
    Ok(cpu)
}

/// Writes the NUL-terminated command line; returns its length without the NUL.
fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    max_with_nul: usize,
) -> Result<usize, BootError> {
    let len = cmdline.len() + 1;
    if len > max_with_nul {
        return Err(BootError::CmdlineTooLong { len, max: max_with_nul });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write_bytes(mem, &bytes, CMDLINE_GPA, "command line")?;
    Ok(cmdline.len())
}

/// Places the initrd page-aligned at the top of low RAM (below `max_addr`), above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    initrd: Option<&Path>,
    kernel_end: u64,
    max_addr: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(path) = initrd else { return Ok(None) };
    let data = std::fs::read(path).map_err(|source| BootError::Read {
        what: "initrd",
        path: path.to_owned(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = ram_ranges(mem_bytes)[0].1.min(max_addr.saturating_add(1));
    let room = low_end.saturating_sub(kernel_end);
    let addr = low_end.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end);
    let addr = addr.ok_or(BootError::InitrdTooLarge { size, room })?;
    write_bytes(mem, &data, addr, "initrd")?;
    log::debug!("initrd {} ({size} bytes) at {addr:#x}", path.display());
    Ok(Some((addr, size)))
}
