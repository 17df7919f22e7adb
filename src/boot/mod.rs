//! Placing what the vCPU runs in guest memory and describing the CPU state it starts in.
//!
//! [`linux`] loads a bzImage (64-bit boot protocol) or an ELF vmlinux (PVH); [`firmware`]
//! loads ebb's own test payloads, which start directly at CPL3 (see docs/design.md, "The
//! host": CPL0 code is emulated on PVM hosts). Both describe guest RAM with [`e820`] and start the vCPU
//! from a [`BootCpu`].

pub mod cmdline;
pub mod e820;
pub mod firmware;
pub mod gdt;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod paging;

use kvm_bindings::kvm_regs;

/// Errors while loading a kernel or payload into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel (or initrd, firmware) file cannot be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel", "initrd" or "firmware".
        what: &'static str,
        /// The path given.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor an ELF vmlinux.
    #[error("{0} is not a Linux kernel: no bzImage header (HdrS) and no ELF magic")]
    NotAKernel(std::path::PathBuf),
    /// The bzImage loader refused the image.
    #[error("cannot load bzImage {path}: {source}")]
    BzImage {
        /// The kernel path.
        path: std::path::PathBuf,
        /// linux-loader's reason.
        source: linux_loader::loader::Error,
    },
    /// The ELF loader refused the image.
    #[error("cannot load ELF {path}: {source}")]
    Elf {
        /// The image path.
        path: std::path::PathBuf,
        /// linux-loader's reason.
        source: linux_loader::loader::Error,
    },
    /// An ELF vmlinux without the Xen PVH entry note.
    #[error(
        "ELF kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y or boot its bzImage"
    )]
    NoPvhNote(std::path::PathBuf),
    /// The command line does not fit.
    #[error("kernel command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Bytes including the terminating NUL.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// The command line contains a byte the kernel cannot take.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The initrd does not fit in guest RAM below the kernel's limit.
    #[error("initrd of {size} bytes does not fit in guest RAM (free low RAM: {room} bytes)")]
    InitrdTooLarge {
        /// Size of the initrd.
        size: u64,
        /// Room available.
        room: u64,
    },
    /// An unknown built-in firmware name.
    #[error(
        "unknown firmware {name:?}: built-in payloads are {known}; or give a path to an ELF file"
    )]
    UnknownFirmware {
        /// The name given.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// Firmware arguments too long for their page.
    #[error("firmware arguments are {len} bytes, at most {max} fit")]
    FirmwareArgsTooLong {
        /// Bytes given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The firmware blob does not fit in the free RAM below 4 GiB.
    #[error(
        "the firmware blob of {len} bytes does not fit in the {room} bytes of free guest RAM below 4 GiB"
    )]
    BlobTooLarge {
        /// The blob's length.
        len: u64,
        /// Free RAM below 4 GiB after the payload image.
        room: u64,
    },
    /// The image or its data overlaps something or lies outside guest RAM.
    #[error("{what} does not fit in guest RAM of {mem_bytes} bytes")]
    DoesNotFit {
        /// What did not fit.
        what: &'static str,
        /// Guest RAM size.
        mem_bytes: u64,
    },
    /// The boot page tables cannot map this much memory.
    #[error(
        "the boot page tables map at most {} of guest-physical space, this VM needs {}; use less --mem",
        crate::units::human_bytes(*.max),
        crate::units::human_bytes(*.top)
    )]
    PageTablesTooSmall {
        /// Top of guest RAM.
        top: u64,
        /// What the tables can map.
        max: u64,
    },
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory: {source}")]
    GuestMemory {
        /// The structure.
        what: &'static str,
        /// vm-memory's reason.
        source: vm_memory::GuestMemoryError,
    },
}

/// The mode the boot vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 64-bit long mode at CPL0 with the boot page tables (Linux 64-bit boot protocol).
    Long64Kernel,
    /// 64-bit long mode at CPL3 with every page of RAM mapped user-accessible, and a TSS
    /// whose I/O bitmap allows every port (ebb's firmware ABI).
    Long64User,
    /// 32-bit protected mode, paging off (PVH entry).
    Protected32,
}

/// The register state the boot vCPU starts with.
#[derive(Debug, Clone)]
pub struct BootCpu {
    /// CPU mode; the segment and control registers follow from it.
    pub mode: CpuMode,
    /// General-purpose registers, `rip` and `rflags`.
    pub regs: kvm_regs,
}

/// Writes `val` at `gpa`, mapping the error to [`BootError::GuestMemory`].
pub(crate) fn write_obj<T: vm_memory::ByteValued>(
    mem: &vm_memory::GuestMemoryMmap,
    val: T,
    gpa: u64,
    what: &'static str,
) -> Result<(), BootError> {
    use vm_memory::{Bytes, GuestAddress};
    mem.write_obj(val, GuestAddress(gpa)).map_err(|source| BootError::GuestMemory { what, source })
}

/// Writes `bytes` at `gpa`, mapping the error to [`BootError::GuestMemory`].
pub(crate) fn write_bytes(
    mem: &vm_memory::GuestMemoryMmap,
    bytes: &[u8],
    gpa: u64,
    what: &'static str,
) -> Result<(), BootError> {
    use vm_memory::{Bytes, GuestAddress};
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|source| BootError::GuestMemory { what, source })
}
