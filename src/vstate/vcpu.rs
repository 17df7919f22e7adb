//! A vCPU: its boot state and the `KVM_RUN` loop that routes exits to the buses.
//!
//! Stopping: every vCPU of a VM shares one [`VcpuStopper`]. Whoever stops them sets it and
//! then kicks each vCPU thread with a signal ([`kick_current_vcpu`] is what the signal
//! handler calls): the kick sets the thread's `kvm_run.immediate_exit`, so a kick that lands
//! between the loop's check of the stopper and the next `KVM_RUN` still makes that
//! `KVM_RUN` return at once (`EINTR`), and one kick is enough.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_run, kvm_sregs, CpuId};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::insn;
use super::msr::{self, MsrError};
use crate::boot::{gdt, BootCpu};
use crate::devices::{Bus, ExitRequest};

/// Errors configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Setting MSRs failed.
    #[error(transparent)]
    Msr(#[from] MsrError),
    /// KVM could not fault in guest memory for this long: the host, or the VM's memory
    /// cgroup, had no memory for the guest's pages or KVM's page tables.
    #[error("out of memory: KVM could not map guest memory for {waited:?} (host memory or the VM's memory cgroup limit is exhausted); last error: {source}")]
    OutOfMemory {
        /// How long the vCPU waited and retried.
        waited: Duration,
        /// The last error of KVM_RUN.
        source: kvm_ioctls::Error,
    },
}

/// `KVM_SYSTEM_EVENT_*` types (`linux/kvm.h`).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
/// `KVM_INTERNAL_ERROR_EMULATION`: the instruction emulator gave up.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`.
const EMULATION_FLAG_INSN_BYTES: u64 = 1;
/// Pause between runs while KVM cannot fault in guest memory.
const MEMORY_RETRY: Duration = Duration::from_millis(10);
/// How long `KVM_RUN` may fail for lack of memory unless the VMM says otherwise.
pub const DEFAULT_MEMORY_PATIENCE: Duration = Duration::from_secs(30);
/// The longest x86 instruction.
const MAX_INSN_BYTES: usize = 15;
/// x87 control word after FNINIT.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset: all SSE exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;
// LAPIC local vector table (Intel SDM vol. 3, 10.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// How a guest ended.
#[derive(Debug)]
pub enum VcpuOutcome {
    /// The payload wrote its exit status to the debug-exit port.
    Exited(u8),
    /// The guest reset (i8042 pulse, `KVM_SYSTEM_EVENT_RESET`).
    Reset,
    /// The guest powered off (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    PowerOff,
    /// The guest crashed: triple fault, emulation failure, failed entry.
    Crashed(Box<CrashReport>),
    /// The VMM stopped the vCPU because it received this signal (SIGINT, SIGTERM).
    Stopped(i32),
}

/// `KVM_MP_STATE_RUNNABLE`: a vCPU that runs without waiting for INIT/SIPI.
const MP_STATE_RUNNABLE: u32 = 0;

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs (null when it runs none). Constant-
    /// initialised and without a destructor, so the kick's signal handler may read it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Makes the calling thread's vCPU, if it runs one, leave (or not enter) `KVM_RUN`: for the
/// kick signal's handler. Async-signal-safe: a thread-local read and a volatile store.
pub fn kick_current_vcpu() {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU's kvm_run mapping, set by `Vcpu::run`
        // for as long as it runs (it outlives the call), and cleared before it returns.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Clears the thread's `kvm_run` pointer when `Vcpu::run` returns, however it returns.
struct RunRegistration;

impl RunRegistration {
    fn new(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|c| c.set(run));
        Self
    }
}

impl Drop for RunRegistration {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Asks running vCPUs to stop: set from another thread, seen by the vCPU after its next
/// exit (kick its thread with a signal to force one).
#[derive(Debug, Clone, Default)]
pub struct VcpuStopper(Arc<AtomicI32>);

impl VcpuStopper {
    /// Asks the vCPU to stop, naming the signal that asked.
    pub fn stop(&self, signal: i32) {
        self.0.store(signal.max(1), Ordering::SeqCst);
    }

    fn requested(&self) -> Option<i32> {
        let v = self.0.load(Ordering::SeqCst);
        (v != 0).then_some(v)
    }
}

/// What ebb knows about a guest crash.
#[derive(Debug)]
pub struct CrashReport {
    /// What happened.
    pub reason: String,
    /// Extra lines (the emulator's data, advice).
    pub notes: Vec<String>,
    /// Registers at the crash.
    pub regs: Option<kvm_regs>,
    /// Segment and control registers at the crash.
    pub sregs: Option<kvm_sregs>,
    /// The bytes at the faulting instruction, when they could be read.
    pub insn: Vec<u8>,
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "guest crashed: {}", self.reason)?;
        for n in &self.notes {
            writeln!(f, "  {n}")?;
        }
        if !self.insn.is_empty() {
            let hex: Vec<String> = self.insn.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(f, "  instruction bytes at rip: {}", hex.join(" "))?;
        }
        if let Some(r) = &self.regs {
            writeln!(f, "  rip={:016x} rsp={:016x} rflags={:016x}", r.rip, r.rsp, r.rflags)?;
            writeln!(
                f,
                "  rax={:016x} rbx={:016x} rcx={:016x} rdx={:016x}",
                r.rax, r.rbx, r.rcx, r.rdx
            )?;
            writeln!(
                f,
                "  rsi={:016x} rdi={:016x} rbp={:016x} r8 ={:016x}",
                r.rsi, r.rdi, r.rbp, r.r8
            )?;
            writeln!(
                f,
                "  r9 ={:016x} r10={:016x} r11={:016x} r12={:016x}",
                r.r9, r.r10, r.r11, r.r12
            )?;
            writeln!(f, "  r13={:016x} r14={:016x} r15={:016x}", r.r13, r.r14, r.r15)?;
        }
        if let Some(s) = &self.sregs {
            writeln!(f, "  cs={:04x} (dpl {}) ss={:04x} cr0={:08x} cr2={:016x} cr3={:016x} cr4={:08x} efer={:x}",
                s.cs.selector, s.cs.dpl, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer)?;
        }
        Ok(())
    }
}

/// The crash-report line naming the instruction in `insn` when it is one KVM's emulator is
/// known not to run (see [`insn::unemulated_instruction`]).
fn unemulated_note(insn: &[u8]) -> Option<String> {
    insn::unemulated_instruction(insn).map(|name| {
        format!("the instruction is `{name}`, which this host's KVM emulator does not run")
    })
}

/// One vCPU and what its exits need.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    bus_pio: Arc<Bus>,
    bus_mmio: Arc<Bus>,
    mem: Arc<GuestMemoryMmap>,
    stopper: VcpuStopper,
    memory_patience: Duration,
    /// Since when `KVM_RUN` fails for lack of memory (None: it does not).
    short_of_memory: Option<Instant>,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu").field("stopper", &self.stopper).finish_non_exhaustive()
    }
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { what, source }
}

impl Vcpu {
    /// Creates vCPU `id` of `vm` (its APIC ID too; vCPU 0 is the boot CPU), stopped by
    /// `stopper` with the VM's other vCPUs.
    pub fn new(
        vm: &VmFd,
        id: u8,
        buses: (Arc<Bus>, Arc<Bus>),
        mem: Arc<GuestMemoryMmap>,
        stopper: VcpuStopper,
    ) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let (bus_pio, bus_mmio) = buses;
        let (short_of_memory, memory_patience) = (None, DEFAULT_MEMORY_PATIENCE);
        Ok(Self { id, fd, bus_pio, bus_mmio, mem, stopper, memory_patience, short_of_memory })
    }

    /// The vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// A handle that asks this vCPU to stop.
    pub fn stopper(&self) -> VcpuStopper {
        self.stopper.clone()
    }

    /// The guest TSC frequency in kHz (0 if KVM cannot tell).
    pub fn tsc_khz(&self) -> u32 {
        self.fd.get_tsc_khz().unwrap_or(0)
    }

    /// Sets CPUID, MSRs, FPU, LAPIC and, with `start`, the registers it starts with. Without
    /// one, a vCPU other than 0 waits (in-kernel LAPIC) for the guest's INIT/SIPI; with one, it
    /// runs from the first `KVM_RUN`.
    pub fn configure(
        &self,
        kvm: &Kvm,
        cpuid: &CpuId,
        start: Option<&BootCpu>,
    ) -> Result<(), VcpuError> {
        self.fd.set_cpuid2(cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        msr::set_boot_msrs(kvm, &self.fd)?;
        let fpu = kvm_fpu { fcw: FPU_FCW_DEFAULT, mxcsr: MXCSR_DEFAULT, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;
        self.set_lint()?;
        let Some(boot) = start else { return Ok(()) };
        if self.id != 0 {
            let runnable = kvm_mp_state { mp_state: MP_STATE_RUNNABLE };
            self.fd.set_mp_state(runnable).map_err(ioctl("KVM_SET_MP_STATE"))?;
        }
        let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        gdt::apply_sregs(&mut sregs, boot.mode);
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.fd.set_regs(&boot.regs).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(())
    }

    /// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as PC firmware leaves them, so a
    /// guest without an MP table still gets PIC interrupts through the LAPIC.
    fn set_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: Vec<u8> =
                lapic.regs[reg..reg + 4].iter().map(|&b| b.to_ne_bytes()[0]).collect();
            let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let v = (v & !0x700) | (mode << 8);
            for (dst, b) in lapic.regs[reg..reg + 4].iter_mut().zip(v.to_le_bytes()) {
                *dst = i8::from_ne_bytes([b]);
            }
        }
        self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
    }

    /// Runs until the guest exits, resets, powers off or crashes, or the stopper asks.
    pub fn run(&mut self) -> Result<VcpuOutcome, VcpuError> {
        let _registered = RunRegistration::new(std::ptr::from_mut(self.fd.get_kvm_run()));
        loop {
            if let Some(signal) = self.stopper.requested() {
                return Ok(VcpuOutcome::Stopped(signal));
            }
            let request = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => self.bus_pio.write(u64::from(port), data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.bus_pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => self.bus_mmio.write(addr, data),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.bus_mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::Intr) => None,
                Ok(VcpuExit::SystemEvent(kind, _)) => return Ok(self.system_event(kind)),
                Ok(VcpuExit::Shutdown) => {
                    return Ok(self.crash("triple fault (KVM_EXIT_SHUTDOWN)", vec![
                        "an exception could not be delivered (no valid IDT, or a fault while delivering one)".into(),
                    ]));
                }
                Ok(VcpuExit::InternalError) => return Ok(self.internal_error()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Ok(self.crash(
                        "VM entry failed (KVM_EXIT_FAIL_ENTRY)",
                        vec![format!(
                            "hardware entry failure reason {reason:#x} on host CPU {cpu}"
                        )],
                    ));
                }
                Ok(VcpuExit::Hlt) => {
                    return Ok(
                        self.crash("vCPU halted with nothing to wake it (KVM_EXIT_HLT)", vec![])
                    );
                }
                Ok(other) => {
                    let what = format!("unexpected exit {other:?}");
                    return Ok(self.crash(&what, vec![]));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: the stopper is looked at before the next entry.
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                // KVM could not fault in guest memory: with ebb's own mapping that means the
                // host (or the memory cgroup) had no page for it or for KVM's page tables.
                // Wait for memory, as the fault handler does, then run again.
                Err(e) if e.errno() == libc::EFAULT || e.errno() == libc::ENOMEM => {
                    self.wait_for_memory(e)?;
                    continue;
                }
                Err(e) => return Err(VcpuError::Ioctl { what: "KVM_RUN", source: e }),
            };
            if let Some(since) = self.short_of_memory.take() {
                log::warn!(
                    "vCPU {} waited {:?} for memory the host refused",
                    self.id,
                    since.elapsed()
                );
            }
            match request {
                Some(ExitRequest::Status(code)) => return Ok(VcpuOutcome::Exited(code)),
                Some(ExitRequest::Reset) => return Ok(VcpuOutcome::Reset),
                None => {}
            }
        }
    }

    /// One more wait for memory after `KVM_RUN` failed with `err`; the error once the wait
    /// has lasted longer than the patience set with [`set_memory_patience`](Self::set_memory_patience).
    fn wait_for_memory(&mut self, err: kvm_ioctls::Error) -> Result<(), VcpuError> {
        let since = *self.short_of_memory.get_or_insert_with(Instant::now);
        if since.elapsed() > self.memory_patience {
            return Err(VcpuError::OutOfMemory { waited: since.elapsed(), source: err });
        }
        std::thread::sleep(MEMORY_RETRY);
        Ok(())
    }

    /// How long `KVM_RUN` may keep failing for lack of memory before the vCPU gives up.
    pub fn set_memory_patience(&mut self, patience: Duration) {
        self.memory_patience = patience;
    }

    fn system_event(&mut self, kind: u32) -> VcpuOutcome {
        match kind {
            SYSTEM_EVENT_SHUTDOWN => VcpuOutcome::PowerOff,
            SYSTEM_EVENT_RESET => VcpuOutcome::Reset,
            other => self.crash(&format!("system event {other} (KVM_EXIT_SYSTEM_EVENT)"), vec![]),
        }
    }

    fn internal_error(&mut self) -> VcpuOutcome {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the kvm_run union; it is plain data.
        let (suberror, ndata, data) = unsafe {
            let run = self.fd.get_kvm_run();
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let n = usize::try_from(ndata).unwrap_or(0).min(data.len());
        let mut notes = vec![format!(
            "KVM_EXIT_INTERNAL_ERROR suberror {suberror}, data [{}]",
            data[..n].iter().map(|d| format!("{d:#x}")).collect::<Vec<_>>().join(", ")
        )];
        let mut insn = Vec::new();
        if suberror == INTERNAL_ERROR_EMULATION {
            notes.push("this host's KVM could not emulate the instruction below (on PVM hosts, CPL0 code runs through KVM's instruction emulator, which lacks e.g. xrstor, popcnt, clac, int3, fnclex, cmpxchg16b)".into());
            // Newer kernels put the bytes in the exit: data[0] is flags, then insn_size and
            // the bytes, packed as `struct kvm_run.emulation_failure`.
            if n >= 2 && data[0] & EMULATION_FLAG_INSN_BYTES != 0 {
                let raw: Vec<u8> = data[1..].iter().flat_map(|d| d.to_le_bytes()).collect();
                let size = usize::from(raw[0]).min(MAX_INSN_BYTES);
                insn = raw[1..=size].to_vec();
            }
        }
        let mut report =
            self.report("KVM could not run the guest instruction (KVM_EXIT_INTERNAL_ERROR)", notes);
        if !insn.is_empty() {
            report.insn = insn;
        }
        if suberror == INTERNAL_ERROR_EMULATION {
            report.notes.extend(unemulated_note(&report.insn));
        }
        VcpuOutcome::Crashed(Box::new(report))
    }

    fn crash(&mut self, reason: &str, notes: Vec<String>) -> VcpuOutcome {
        VcpuOutcome::Crashed(Box::new(self.report(reason, notes)))
    }

    fn report(&mut self, reason: &str, notes: Vec<String>) -> CrashReport {
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        let insn = match (&regs, &sregs) {
            (Some(r), Some(s)) => self.read_insn(s.cs.base.wrapping_add(r.rip)),
            _ => Vec::new(),
        };
        CrashReport { reason: reason.to_owned(), notes, regs, sregs, insn }
    }

    /// Reads up to 15 bytes at guest-virtual `gva` through the vCPU's page tables.
    fn read_insn(&self, gva: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(gva) else { return Vec::new() };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut buf = [0u8; MAX_INSN_BYTES];
        // Stop at the page end: the next page may map elsewhere.
        let in_page = usize::try_from(4096 - (gva & 0xfff)).unwrap_or(0).min(MAX_INSN_BYTES);
        match self.mem.read_slice(&mut buf[..in_page], GuestAddress(t.physical_address)) {
            Ok(()) => buf[..in_page].to_vec(),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_unemulated_instruction_gets_a_named_note() {
        let note = unemulated_note(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e, 0x90]);
        assert_eq!(
            note.as_deref(),
            Some(
                "the instruction is `lock cmpxchg16b`, which this host's KVM emulator does not run"
            )
        );
    }

    #[test]
    fn an_ordinary_or_missing_instruction_gets_no_named_note() {
        assert_eq!(unemulated_note(&[0x90]), None);
        assert_eq!(unemulated_note(&[]), None);
    }

    #[test]
    fn the_report_shows_the_named_note_and_the_bytes() {
        let insn = vec![0xf0, 0x48, 0x0f, 0xc7, 0x0e];
        let mut notes = vec!["general".to_owned()];
        notes.extend(unemulated_note(&insn));
        let report =
            CrashReport { reason: "emulation failed".into(), notes, regs: None, sregs: None, insn };
        let text = report.to_string();
        assert!(text.contains("  general\n"), "{text}");
        assert!(text.contains("`lock cmpxchg16b`, which this host's KVM emulator"), "{text}");
        assert!(text.contains("instruction bytes at rip: f0 48 0f c7 0e"), "{text}");
    }
}
