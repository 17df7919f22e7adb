//! Names the x86 instructions that KVM's instruction emulator is known not to run, from the
//! bytes at the faulting `rip`, so that a crash report on a PVM host (where guest CPL0 code
//! runs through that emulator) can say which instruction it was instead of only dumping hex.
//!
//! This is a recogniser for a short list, not a disassembler: it skips prefixes, matches the
//! opcode and, where the list needs it, the ModRM byte, and answers `None` for anything else,
//! including short or garbage input. It decodes as 64-bit code. That is also right for the
//! crashes it sees in 16- and 32-bit code: there 0x40-0x4f are `inc`/`dec`, which the
//! emulator runs, so an emulation failure never starts at one of them.

/// The longest x86 instruction (Intel SDM vol. 2A, 2.3.11: 15 bytes, or #GP).
const MAX_INSN_LEN: usize = 15;

// Legacy prefixes (Intel SDM vol. 2A, 2.1.1).
/// `lock`.
const PREFIX_LOCK: u8 = 0xf0;
/// `repne`/`repnz`; a mandatory prefix of some SSE and later instructions.
const PREFIX_REPNE: u8 = 0xf2;
/// `rep`/`repe`; the mandatory prefix of `popcnt`.
const PREFIX_REP: u8 = 0xf3;
/// Operand-size override; a mandatory prefix of some SSE and later instructions.
const PREFIX_OPERAND_SIZE: u8 = 0x66;
/// Address-size override.
const PREFIX_ADDRESS_SIZE: u8 = 0x67;
/// Segment overrides: CS, SS, DS, ES, FS, GS (also branch hints 2E/3E).
const PREFIX_SEGMENTS: [u8; 6] = [0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65];

// REX (Intel SDM vol. 2A, 2.2.1): 0100WRXB, only in 64-bit mode, right before the opcode.
/// The first REX byte.
const REX_FIRST: u8 = 0x40;
/// The last REX byte.
const REX_LAST: u8 = 0x4f;
/// REX.W: 64-bit operand size (turns `cmpxchg8b` into `cmpxchg16b`).
const REX_W: u8 = 0x08;

// Opcodes (Intel SDM vol. 2, appendix A, opcode map).
/// The two-byte opcode escape.
const ESCAPE_0F: u8 = 0x0f;
/// `int3`.
const OP_INT3: u8 = 0xcc;
/// `fwait`/`wait`.
const OP_FWAIT: u8 = 0x9b;
/// x87 escape whose `E2` form is `fnclex`.
const OP_X87_DB: u8 = 0xdb;
/// Second byte of `fnclex` (DB E2).
const FNCLEX_SECOND: u8 = 0xe2;
/// 0F 01: group 7 (system instructions; `xsetbv`, `clac`, `stac` are register forms).
const OP_0F_GROUP7: u8 = 0x01;
/// 0F 01 D1: `xsetbv`.
const GROUP7_XSETBV: u8 = 0xd1;
/// 0F 01 CA: `clac`.
const GROUP7_CLAC: u8 = 0xca;
/// 0F 01 CB: `stac`.
const GROUP7_STAC: u8 = 0xcb;
/// 0F AE: group 15 (fences, `xsave`, `xrstor`, `xsaveopt`, ...).
const OP_0F_GROUP15: u8 = 0xae;
/// 0F AE /4 with a memory operand: `xsave`.
const GROUP15_XSAVE: u8 = 4;
/// 0F AE /5 with a memory operand: `xrstor` (the register form is `lfence`).
const GROUP15_XRSTOR: u8 = 5;
/// 0F AE /6 with a memory operand: `xsaveopt` (the register form is `mfence`).
const GROUP15_XSAVEOPT: u8 = 6;
/// 0F B8: `popcnt` with a mandatory F3 prefix.
const OP_0F_POPCNT: u8 = 0xb8;
/// 0F C7: group 9.
const OP_0F_GROUP9: u8 = 0xc7;
/// 0F C7 /1 with a memory operand: `cmpxchg8b`, or `cmpxchg16b` with REX.W.
const GROUP9_CMPXCHG: u8 = 1;

// ModRM (Intel SDM vol. 2A, 2.1.5).
/// ModRM.mod when the operand is a register, not memory.
const MOD_REGISTER: u8 = 3;
/// ModRM.rm that means a SIB byte follows.
const RM_SIB: u8 = 4;
/// ModRM.rm (mod 0: RIP-relative) or SIB.base (mod 0: no base) that means a disp32 follows.
const RM_DISP32: u8 = 5;
/// Bytes of an 8-bit displacement.
const DISP8_LEN: usize = 1;
/// Bytes of a 32-bit displacement.
const DISP32_LEN: usize = 4;

/// The prefixes in front of an opcode, as far as the recogniser cares.
#[derive(Debug, Default)]
struct Prefixes {
    lock: bool,
    operand_size: bool,
    /// The last of F2/F3: when both appear, the last one is the mandatory prefix.
    rep: Option<u8>,
    /// The REX byte, if it came right before the opcode (a REX followed by a legacy prefix
    /// is ignored by the CPU, so it is dropped here too).
    rex: Option<u8>,
}

impl Prefixes {
    /// No 66, F2 or F3: the plain (non-SSE-style) form of a 0F opcode.
    fn no_simd(&self) -> bool {
        !self.operand_size && self.rep.is_none()
    }

    fn rex_w(&self) -> bool {
        self.rex.is_some_and(|r| r & REX_W != 0)
    }
}

/// The ModRM fields the recogniser matches on.
#[derive(Debug)]
struct ModRm {
    /// ModRM.reg: the opcode extension in group opcodes.
    reg: u8,
    /// True when the operand is memory (mod != 3).
    memory: bool,
    /// Bytes of ModRM, SIB and displacement together.
    len: usize,
}

/// Reads the ModRM at the start of `bytes` with what follows it; `None` if any of it is
/// missing. Uses the 32/64-bit addressing form (64-bit code with or without 67).
fn modrm(bytes: &[u8]) -> Option<ModRm> {
    let &b = bytes.first()?;
    let md = b >> 6;
    let reg = (b >> 3) & 7;
    let rm = b & 7;
    if md == MOD_REGISTER {
        return Some(ModRm { reg, memory: false, len: 1 });
    }
    let mut len = 1;
    let mut base = rm;
    if rm == RM_SIB {
        base = bytes.get(1)? & 7;
        len += 1;
    }
    len += match md {
        0 if base == RM_DISP32 => DISP32_LEN,
        0 => 0,
        1 => DISP8_LEN,
        _ => DISP32_LEN,
    };
    (bytes.len() >= len).then_some(ModRm { reg, memory: true, len })
}

/// Splits the prefixes off `bytes`: returns them and the index of the opcode.
fn prefixes(bytes: &[u8]) -> (Prefixes, usize) {
    let mut p = Prefixes::default();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            PREFIX_LOCK => p.lock = true,
            PREFIX_REPNE | PREFIX_REP => p.rep = Some(b),
            PREFIX_OPERAND_SIZE => p.operand_size = true,
            PREFIX_ADDRESS_SIZE => {}
            _ if PREFIX_SEGMENTS.contains(&b) => {}
            REX_FIRST..=REX_LAST => {
                p.rex = Some(b);
                i += 1;
                continue;
            }
            _ => break,
        }
        // A legacy prefix after a REX cancels the REX.
        p.rex = None;
        i += 1;
    }
    (p, i)
}

/// The name of the instruction at the start of `bytes` if it is one that KVM's instruction
/// emulator is known not to run on PVM hosts, or `None` (also for short or garbage input).
///
/// Recognised, by their encodings in the Intel SDM vol. 2: `xsave` (0F AE /4, memory),
/// `xrstor` (0F AE /5, memory), `xsaveopt` (0F AE /6, memory) (their REX.W `...64` forms get
/// the same names), `xsetbv` (0F 01 D1), `clac` (0F 01 CA), `stac` (0F 01 CB), `popcnt` (F3
/// 0F B8 /r), `int3` (CC), `fnclex` (DB E2), `fwait` (9B; so `fclex`, 9B DB E2, is named
/// `fwait`, the part that fails first) and `cmpxchg16b` (REX.W 0F C7 /1, memory), named
/// `lock cmpxchg16b` when it has a lock prefix.
pub fn unemulated_instruction(bytes: &[u8]) -> Option<&'static str> {
    let bytes = bytes.get(..bytes.len().min(MAX_INSN_LEN))?;
    let (p, at) = prefixes(bytes);
    let rest = bytes.get(at..)?;
    let (name, len) = match *rest {
        [OP_INT3, ..] => ("int3", 1),
        [OP_FWAIT, ..] => ("fwait", 1),
        [OP_X87_DB, FNCLEX_SECOND, ..] => ("fnclex", 2),
        [ESCAPE_0F, OP_0F_GROUP7, third, ..] if p.no_simd() => match third {
            GROUP7_XSETBV => ("xsetbv", 3),
            GROUP7_CLAC => ("clac", 3),
            GROUP7_STAC => ("stac", 3),
            _ => return None,
        },
        [ESCAPE_0F, OP_0F_GROUP15, ..] if p.no_simd() => {
            let m = modrm(rest.get(2..)?)?;
            if !m.memory {
                return None;
            }
            let name = match m.reg {
                GROUP15_XSAVE => "xsave",
                GROUP15_XRSTOR => "xrstor",
                GROUP15_XSAVEOPT => "xsaveopt",
                _ => return None,
            };
            (name, 2 + m.len)
        }
        [ESCAPE_0F, OP_0F_POPCNT, ..] if p.rep == Some(PREFIX_REP) => {
            ("popcnt", 2 + modrm(rest.get(2..)?)?.len)
        }
        [ESCAPE_0F, OP_0F_GROUP9, ..] if p.rex_w() => {
            let m = modrm(rest.get(2..)?)?;
            if !m.memory || m.reg != GROUP9_CMPXCHG {
                return None;
            }
            (if p.lock { "lock cmpxchg16b" } else { "cmpxchg16b" }, 2 + m.len)
        }
        _ => return None,
    };
    // The prefixes and the whole instruction must fit in the architectural limit.
    (at + len <= MAX_INSN_LEN).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(bytes: &[u8]) -> Option<&'static str> {
        unemulated_instruction(bytes)
    }

    #[test]
    fn xrstor_with_a_memory_operand_is_named() {
        // xrstor [rdi]; xrstor64 [rdi] (what Linux's XRSTOR macro emits).
        assert_eq!(name(&[0x0f, 0xae, 0x2f]), Some("xrstor"));
        assert_eq!(name(&[0x48, 0x0f, 0xae, 0x2f]), Some("xrstor"));
        // xrstor [rsp+8]: SIB and disp8.
        assert_eq!(name(&[0x0f, 0xae, 0x6c, 0x24, 0x08]), Some("xrstor"));
    }

    #[test]
    fn lfence_mfence_sfence_are_not_xrstor_or_xsaveopt() {
        assert_eq!(name(&[0x0f, 0xae, 0xe8]), None); // lfence (/5, register form)
        assert_eq!(name(&[0x0f, 0xae, 0xf0]), None); // mfence (/6, register form)
        assert_eq!(name(&[0x0f, 0xae, 0xf8]), None); // sfence
    }

    #[test]
    fn xsave_and_xsaveopt_with_memory_operands_are_named() {
        assert_eq!(name(&[0x0f, 0xae, 0x27]), Some("xsave")); // xsave [rdi]
        assert_eq!(name(&[0x48, 0x0f, 0xae, 0x27]), Some("xsave")); // xsave64 [rdi]
        assert_eq!(name(&[0x0f, 0xae, 0x37]), Some("xsaveopt")); // xsaveopt [rdi]
        assert_eq!(name(&[0x49, 0x0f, 0xae, 0x37]), Some("xsaveopt")); // xsaveopt64 [r15]
                                                                       // xsave [rip+0x1000]: mod 0, rm 5 is RIP-relative with a disp32.
        assert_eq!(name(&[0x0f, 0xae, 0x25, 0x00, 0x10, 0x00, 0x00]), Some("xsave"));
    }

    #[test]
    fn group15_with_a_simd_prefix_is_another_instruction() {
        assert_eq!(name(&[0x66, 0x0f, 0xae, 0x37]), None); // clwb [rdi]
        assert_eq!(name(&[0xf3, 0x0f, 0xae, 0x27]), None); // ptwrite [rdi]
        assert_eq!(name(&[0x0f, 0xae, 0x3f]), None); // clflush [rdi] (/7)
    }

    #[test]
    fn xsetbv_clac_stac_are_named() {
        assert_eq!(name(&[0x0f, 0x01, 0xd1]), Some("xsetbv"));
        assert_eq!(name(&[0x0f, 0x01, 0xca]), Some("clac"));
        assert_eq!(name(&[0x0f, 0x01, 0xcb]), Some("stac"));
        assert_eq!(name(&[0x2e, 0x0f, 0x01, 0xcb]), Some("stac"));
        assert_eq!(name(&[0x0f, 0x01, 0xd0]), None); // xgetbv
        assert_eq!(name(&[0xf3, 0x0f, 0x01, 0xca]), None); // erets/eretu (FRED), not clac
    }

    #[test]
    fn popcnt_needs_its_mandatory_f3() {
        assert_eq!(name(&[0xf3, 0x0f, 0xb8, 0xc1]), Some("popcnt")); // popcnt eax, ecx
        assert_eq!(name(&[0xf3, 0x48, 0x0f, 0xb8, 0xc1]), Some("popcnt")); // popcnt rax, rcx
        assert_eq!(name(&[0x66, 0xf3, 0x0f, 0xb8, 0xc1]), Some("popcnt")); // popcnt ax, cx
        assert_eq!(name(&[0xf3, 0x0f, 0xb8, 0x07]), Some("popcnt")); // popcnt eax, [rdi]
        assert_eq!(name(&[0x0f, 0xb8, 0xc1]), None); // no F3: jmpe, not popcnt
        assert_eq!(name(&[0xf2, 0x0f, 0xb8, 0xc1]), None);
        assert_eq!(name(&[0xf3, 0xf2, 0x0f, 0xb8, 0xc1]), None); // the last of F2/F3 counts
        assert_eq!(name(&[0xf2, 0xf3, 0x0f, 0xb8, 0xc1]), Some("popcnt"));
    }

    #[test]
    fn one_and_two_byte_x87_and_breakpoint_instructions_are_named() {
        assert_eq!(name(&[0xcc]), Some("int3"));
        assert_eq!(name(&[0xcc, 0x90, 0x90]), Some("int3"));
        assert_eq!(name(&[0xdb, 0xe2]), Some("fnclex"));
        assert_eq!(name(&[0x9b]), Some("fwait"));
        // fclex is fwait; fnclex: the emulator stops at the fwait.
        assert_eq!(name(&[0x9b, 0xdb, 0xe2]), Some("fwait"));
        assert_eq!(name(&[0xdb, 0xe3]), None); // fninit
        assert_eq!(name(&[0xcd, 0x03]), None); // int 3, the two-byte form
    }

    #[test]
    fn locked_cmpxchg16b_is_named_with_its_lock() {
        // lock cmpxchg16b [rsi], as SLUB's this_cpu_cmpxchg_double emits it.
        assert_eq!(name(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), Some("lock cmpxchg16b"));
        // With a segment override (%gs-relative per-CPU data) and a disp32.
        let gs = [0x65, 0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0x10, 0x20, 0x00, 0x00];
        assert_eq!(name(&gs), Some("lock cmpxchg16b"));
        // REX.WB: cmpxchg16b [r14].
        assert_eq!(name(&[0xf0, 0x49, 0x0f, 0xc7, 0x0e]), Some("lock cmpxchg16b"));
        assert_eq!(name(&[0x48, 0x0f, 0xc7, 0x0e]), Some("cmpxchg16b"));
    }

    #[test]
    fn cmpxchg8b_and_other_group9_forms_are_not_cmpxchg16b() {
        assert_eq!(name(&[0xf0, 0x0f, 0xc7, 0x0e]), None); // lock cmpxchg8b [rsi]
        assert_eq!(name(&[0x48, 0x0f, 0xc7, 0xf0]), None); // rdrand rax (/6, register)
        assert_eq!(name(&[0x48, 0x0f, 0xc7, 0xc8]), None); // /1 register form: #UD
                                                           // A legacy prefix between REX and opcode cancels the REX: cmpxchg8b.
        assert_eq!(name(&[0x48, 0xf0, 0x0f, 0xc7, 0x0e]), None);
    }

    #[test]
    fn empty_and_truncated_input_is_unknown() {
        assert_eq!(name(&[]), None);
        assert_eq!(name(&[0xf0]), None);
        assert_eq!(name(&[0xf0, 0x48]), None);
        assert_eq!(name(&[0xf0, 0x48, 0x0f]), None);
        assert_eq!(name(&[0xf0, 0x48, 0x0f, 0xc7]), None); // no ModRM
        assert_eq!(name(&[0x0f, 0xae]), None);
        assert_eq!(name(&[0x0f, 0xae, 0x6c]), None); // SIB missing
        assert_eq!(name(&[0x0f, 0xae, 0x6c, 0x24]), None); // disp8 missing
        assert_eq!(name(&[0x0f, 0xae, 0x25, 0x00, 0x10]), None); // disp32 cut short
        assert_eq!(name(&[0x0f, 0x01]), None);
        assert_eq!(name(&[0xf3, 0x0f, 0xb8]), None);
        assert_eq!(name(&[0xdb]), None);
    }

    #[test]
    fn garbage_and_ordinary_instructions_are_unknown() {
        assert_eq!(name(&[0x90]), None); // nop
        assert_eq!(name(&[0x0f, 0x0b]), None); // ud2
        assert_eq!(name(&[0x48, 0x89, 0xe5]), None); // mov rbp, rsp
        assert_eq!(name(&[0xff; 15]), None);
        assert_eq!(name(&[0x66; 15]), None); // nothing but prefixes
        assert_eq!(name(&[0x4f; 15]), None); // nothing but REX
                                             // Too many prefixes: past 15 bytes the CPU raises #GP, so it is not that instruction.
        let mut long = vec![0x2e; 14];
        long.extend_from_slice(&[0x0f, 0x01, 0xca]);
        assert_eq!(name(&long), None);
        let mut fits = vec![0x2e; 12];
        fits.extend_from_slice(&[0x0f, 0x01, 0xca]);
        assert_eq!(name(&fits), Some("clac"));
    }

    #[test]
    fn every_byte_pair_and_triple_is_handled_without_panic() {
        for a in 0..=u8::MAX {
            for b in 0..=u8::MAX {
                let _ = name(&[a, b]);
                let _ = name(&[0x0f, a, b]);
                let _ = name(&[0xf0, 0x48, 0x0f, a, b]);
            }
        }
    }
}
