//! The VM process's seccomp allow-list, and the SIGSYS handler that names a refused call.
//!
//! The filter is installed once, by the main thread, after [`Vm::build`](crate::vmm::Vm::build)
//! (every privileged open is done, the engine's threads run) and before the vCPU thread is
//! started, with `SECCOMP_FILTER_FLAG_TSYNC`: the kernel applies it to every existing thread
//! atomically or fails the call, and threads created later inherit it from their creator. So
//! one filter covers every thread; per-thread filters (Firecracker's choice) would tighten the
//! vCPU and API threads further, at the price of installing before each thread starts, which
//! here would mean threading the filter through the engine's constructors (another owner).
//!
//! A call outside the list gets `SECCOMP_RET_TRAP`: the kernel sends `SIGSYS` to the thread,
//! whose handler writes `ebb: seccomp: refused system call NAME (NR)` to stderr with `write(2)`
//! alone (async-signal-safe: the name comes from a static table) and ends the process with
//! `_exit(`[`SECCOMP_EXIT_STATUS`]`)`.
//!
//! What the arguments are checked for (the rest is allowed whatever its arguments):
//! - `ioctl` only with a request of KVM's type (0xAE), userfaultfd's (0xAA) or the terminal's
//!   (0x54: `TCGETS`, `FIONBIO`); the descriptor is not checked;
//! - `openat` only read-only, never creating or truncating (the swap file, serial log and
//!   statistics file are opened before); which path cannot be checked (a pointer);
//! - `mmap` and `mprotect` never with `PROT_EXEC`: no new code after setup;
//! - `tgkill` and `kill` only at this process (vCPU kicks, `abort`): not even signal 0 at
//!   another, which would tell whether a process exists;
//! - `prctl` only `PR_SET_NAME`/`PR_GET_NAME` (thread names) and `PR_SET_DUMPABLE` 0;
//! - `prlimit64` only to read a limit (so `RLIMIT_CORE` stays 0);
//! - no `socket`, `connect`, `execve`, `ptrace`, `process_vm_readv`/`writev`, `open`
//!   (the old call), `setuid` and friends: the control socket is bound before, and only
//!   accepts.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::names::SYSCALL_NAMES;
use super::JailError;

/// The exit status of a VM that made a refused system call (128 + SIGSYS, as a shell shows a
/// process killed by SIGSYS).
pub const SECCOMP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// `_IOC_TYPE` of an ioctl request: bits 8 to 15 (`include/uapi/asm-generic/ioctl.h`).
const IOC_TYPE_MASK: u64 = 0xff00;
/// ioctl types the VM uses: KVM (`linux/kvm.h`), userfaultfd (`linux/userfaultfd.h`), and
/// the terminal's (`TCGETS` for isatty, `FIONBIO`; `asm-generic/ioctls.h`).
const IOCTL_TYPES: [u64; 3] = [0xAE00, 0xAA00, 0x5400];

/// The system calls allowed whatever their arguments.
const ALWAYS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fadvise64,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_brk,
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    // A panic's backtrace (`RUST_BACKTRACE`) shortens paths against the working directory:
    // without it, a panic the VM would report and survive ends it with SIGSYS instead.
    libc::SYS_getcwd,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrusage,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
];

/// `arg` of the call, 32 bits, masked with `mask`, equals `value`.
fn masked(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition, JailError> {
    SeccompCondition::new(arg, Len::Dword, Op::MaskedEq(mask), value).map_err(JailError::Filter)
}

/// `arg` of the call (64 bits) equals `value`.
fn equals(arg: u8, value: u64) -> Result<SeccompCondition, JailError> {
    SeccompCondition::new(arg, Len::Qword, Op::Eq, value).map_err(JailError::Filter)
}

/// A (non-negative) kernel constant as a filter operand.
fn flag(c: libc::c_int) -> u64 {
    u64::from(c.unsigned_abs())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, JailError> {
    SeccompRule::new(conditions).map_err(JailError::Filter)
}

/// The calls allowed only with some arguments, for process `pid`.
fn conditional(pid: u64) -> Result<Vec<(i64, Vec<SeccompRule>)>, JailError> {
    let read_only = flag(libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC);
    let exec = flag(libc::PROT_EXEC);
    let ioctls: Result<Vec<_>, _> =
        IOCTL_TYPES.iter().map(|&t| rule(vec![masked(1, IOC_TYPE_MASK, t)?])).collect();
    let prctls: Result<Vec<_>, _> = [libc::PR_SET_NAME, libc::PR_GET_NAME]
        .iter()
        .map(|&op| rule(vec![equals(0, flag(op))?]))
        .chain([rule(vec![equals(0, flag(libc::PR_SET_DUMPABLE))?, equals(1, 0)?])])
        .collect();
    Ok(vec![
        (libc::SYS_ioctl, ioctls?),
        (libc::SYS_openat, vec![rule(vec![masked(2, read_only, 0)?])?]),
        (libc::SYS_mmap, vec![rule(vec![masked(2, exec, 0)?])?]),
        (libc::SYS_mprotect, vec![rule(vec![masked(2, exec, 0)?])?]),
        (libc::SYS_tgkill, vec![rule(vec![equals(0, pid)?])?]),
        (libc::SYS_kill, vec![rule(vec![equals(0, pid)?])?]),
        (libc::SYS_prctl, prctls?),
        // prlimit64 only to read a limit (std reads RLIMIT_STACK): RLIMIT_CORE stays 0.
        (libc::SYS_prlimit64, vec![rule(vec![equals(2, 0)?])?]),
    ])
}

/// The compiled filter for process `pid`.
///
/// # Errors
/// The filter could not be compiled (a bug).
pub fn filter(pid: u32) -> Result<BpfProgram, JailError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALWAYS.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.extend(conditional(u64::from(pid))?);
    let filter =
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(JailError::Filter)?;
    filter.try_into().map_err(JailError::Filter)
}

/// How many system calls the filter allows (some only with given arguments).
pub fn allowed_count() -> usize {
    ALWAYS.len() + conditional(0).map_or(0, |c| c.len())
}

/// Installs the handler that names a refused call, then the filter on every thread (TSYNC).
///
/// # Errors
/// The handler or the filter could not be installed.
pub fn install() -> Result<(), JailError> {
    install_sigsys_handler()?;
    let program = filter(std::process::id())?;
    seccompiler::apply_filter_all_threads(&program).map_err(JailError::Install)
}

fn install_sigsys_handler() -> Result<(), JailError> {
    // SAFETY: a zeroed sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `on_sigsys` is an `extern "C"` handler of the SA_SIGINFO shape that makes only
    // async-signal-safe calls; `action` is fully initialised.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(JailError::Sigaction(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Offset of `_sigsys._syscall` in `siginfo_t` on x86_64: after `si_signo`, `si_errno`,
/// `si_code` (and 4 bytes of padding) comes the union, whose `_sigsys` starts with
/// `void *_call_addr` (`include/uapi/asm-generic/siginfo.h`).
const SI_SYSCALL_OFFSET: usize = 16 + 8;

/// The name of system call `nr`, or "unknown".
pub fn syscall_name(nr: i64) -> &'static str {
    SYSCALL_NAMES.iter().find(|(n, _)| *n == nr).map_or("unknown", |(_, name)| name)
}

/// Writes `bytes` to stderr with write(2) alone.
fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) from a valid slice; async-signal-safe.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// `n` in decimal into `buf`; the digits written.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 || i == 0 {
            return &buf[i..];
        }
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a siginfo_t of SIGSYS (SA_SIGINFO), whose `_sigsys` member
        // holds the syscall number at this offset; read unaligned to make no assumption.
        i64::from(unsafe {
            std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>())
        })
    };
    let mut digits = [0u8; 20];
    write_stderr(b"ebb: seccomp: refused system call ");
    write_stderr(syscall_name(nr).as_bytes());
    write_stderr(b" (");
    write_stderr(decimal(nr.unsigned_abs(), &mut digits));
    write_stderr(b"); the VM ends\n");
    // SAFETY: _exit is async-signal-safe and ends the process without running anything else.
    unsafe { libc::_exit(SECCOMP_EXIT_STATUS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_process() {
        let program = filter(std::process::id()).unwrap();
        assert!(!program.is_empty());
        assert!(allowed_count() > 50);
    }

    /// Runs `call` in a forked child under the filter (built before the fork, for this
    /// process's pid); the child's exit status. The child only makes raw calls.
    fn status_under_filter(call: impl FnOnce() -> i32) -> i32 {
        let program = filter(std::process::id()).unwrap();
        // SAFETY: the child makes only async-signal-safe calls (sigaction, prctl, seccomp,
        // the call under test, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let installed = install_sigsys_handler().is_ok()
                && seccompiler::apply_filter_all_threads(&program).is_ok();
            // SAFETY: _exit ends the child.
            unsafe { libc::_exit(if installed { call() } else { 100 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn a_forbidden_call_ends_the_process_with_sigsys_status() {
        let traceme = || {
            // SAFETY: PTRACE_TRACEME takes no memory.
            let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            i32::from(rc != 0)
        };
        assert_eq!(status_under_filter(traceme), SECCOMP_EXIT_STATUS);
    }

    #[test]
    fn another_process_may_be_neither_signalled_nor_probed() {
        let kill = |signal| {
            // SAFETY: kill takes integers; the filter refuses both calls before they run
            // (signal 0 sends nothing, and SIGCONT to init would be harmless anyway).
            let rc = unsafe { libc::kill(1, signal) };
            i32::from(rc != 0)
        };
        assert_eq!(status_under_filter(|| kill(0)), SECCOMP_EXIT_STATUS);
        assert_eq!(status_under_filter(|| kill(libc::SIGCONT)), SECCOMP_EXIT_STATUS);
    }

    #[test]
    fn files_open_only_for_reading() {
        const PATH: &[u8] = b"/dev/null\0";
        let open = |flags| {
            // SAFETY: a NUL-terminated path.
            let fd = unsafe { libc::open(PATH.as_ptr().cast(), flags) };
            i32::from(fd < 0)
        };
        assert_eq!(status_under_filter(|| open(libc::O_RDONLY)), 0);
        assert_eq!(status_under_filter(|| open(libc::O_WRONLY)), SECCOMP_EXIT_STATUS);
        assert_eq!(
            status_under_filter(|| open(libc::O_RDONLY | libc::O_CREAT)),
            SECCOMP_EXIT_STATUS
        );
    }

    #[test]
    fn no_new_executable_memory() {
        let map = |prot| {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            // SAFETY: a fresh anonymous mapping, never used.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0) };
            i32::from(p == libc::MAP_FAILED)
        };
        assert_eq!(status_under_filter(|| map(libc::PROT_READ)), 0);
        assert_eq!(
            status_under_filter(|| map(libc::PROT_READ | libc::PROT_EXEC)),
            SECCOMP_EXIT_STATUS
        );
    }

    #[test]
    fn a_syscall_number_is_named_from_the_table() {
        assert_eq!(syscall_name(libc::SYS_ptrace), "ptrace");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(100_000), "unknown");
    }

    #[test]
    fn decimal_writes_every_digit() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(101, &mut buf), b"101");
        assert_eq!(decimal(u64::MAX, &mut buf), b"18446744073709551615");
    }
}
