//! A template JIT for hot 64-bit blocks. A block that has run [`HOT`] times is translated to
//! host code: the most common ops (the [`Kind`]s: MOV, LEA, PUSH/POP, the ALU ops, fused
//! CMP/TEST+Jcc, MOVZX/MOVSX, shifts by an immediate, CALL/RET/JMP) become a few host
//! instructions with the TLB fast path inline; every other op is a call of its interpreter
//! handler ([`call_op`]). Translated code never leaves an op half
//! done: when a fast path misses (TLB miss, a store into a code page, an access that crosses a
//! page) it returns *before* that op and the block loop interprets the rest of the block, so
//! faults, self-modifying code and dirty logging keep the interpreter's exact behaviour.
//!
//! On by default; `VIREO_EMU_JIT=0` (or `EmuHypervisor::with_jit(false)`) only interprets.

mod arena;
mod emit;

use std::ffi::c_void;
use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::cpu::{
    Cpu, Exc, FS, GS, R, RAX as GUEST_RAX, RCX as GUEST_RCX, RDX as GUEST_RDX, RSP as GUEST_RSP,
};
use super::exec::{alu, bits, shift, tag, Exec, Op, F_CL, F_FLAT, F_LOCK, F_MEM, F_NF, RIPREG};
use super::flags::{self, Lazy};
use super::huge::HugeSlice;
use super::mmu::{tlb_index, TlbEntry, PAGE_MASK, PAGE_SIZE, TLB_SIZE};
use arena::Arena;
pub use arena::Pool;

/// Runs of a block before it is translated.
pub const HOT: u16 = 32;
/// Bytes of executable memory per vCPU.
/// Bytes of executable memory per vCPU (address space: only what is written is backed). The
/// kernel's I/O paths alone took 16 MiB with the chain exits.
const ARENA_SIZE: usize = 64 << 20;
/// vCPUs of one backend with a JIT (the others only interpret).
const JIT_VCPUS: usize = 16;

/// `Exit` codes in the high half of a translated block's return value (the op index is in the
/// low half).
const DONE: u64 = 0;
const BAIL: u64 = 1;
const RESULT: u64 = 2;
/// A fused CMP/TEST + Jcc was taken: RIP is at the target (`Exc::Stop` at that op).
const TAKEN: u64 = 3;

/// How a translated block ended. `at` is the offset of op `k` from the block's start.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Every op ran.
    Done,
    /// Op `k` and the ops after it did not run: interpret them.
    Bail { k: usize, at: u64 },
    /// Op `k` ran through its handler and returned this (an error, or `Ok` with a store into
    /// the running block): the ops after it did not run.
    Result { k: usize, at: u64, r: R },
}

/// A translated block's return value: `code`, the op index and its offset.
fn exit_value(code: u64, k: usize, at: u32) -> u64 {
    code << 32 | (at as u64 & 0xffff) << 16 | k as u64 & 0xffff
}

/// What translated code reads: built by [`run`] for each call.
#[repr(C)]
struct Ctx {
    exec: *mut c_void,
    /// The vCPU: translated code reaches its fields from RBX (see [`cpu_field`]).
    cpu: *mut Cpu,
    tlb: *const TlbEntry,
    code_flags: *const u8,
    code_len: u64,
    /// Fused CMP/TEST + Jcc ops run (each is two instructions).
    fused: u64,
    out: Option<R>,
    /// For the chain stub: the block loop's attention flag, the VM's code epoch,
    /// `Cpu::tlb_user` on entry (the TLB in R14) and the jump cache.
    attention: *const AtomicBool,
    code_epoch: *const AtomicU64,
    user: u64,
    links: *mut Link,
    /// Blocks the stub may still chain to before the block loop's time check.
    budget: u64,
    /// The jump-cache entry of the block running, once the stub chained (else null).
    link: *const Link,
    /// Where the stub records the entry it chained through for exits without a memo
    /// ([`Memos`]); never read.
    memo_sink: u64,
    /// Code pages [`relink`] found unwritten by the VMM, and the epoch then (direct-mapped by
    /// page): the page's other entries at that epoch need no second look (the stub reads it).
    clean: [Clean; CLEAN],
    /// `CodePages::logging`, for the stub.
    logging: *const AtomicBool,
}

/// Entries of `Ctx::clean` (a power of two).
const CLEAN: usize = 16;

/// A code page (its `CodePages` index) found unwritten by the VMM at code epoch `epoch`.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Clean {
    page: u64,
    epoch: u64,
}

const _: () = assert!(std::mem::size_of::<Clean>() == 16);

/// Entries of a vCPU's jump cache (a power of two; 1 MiB), in sets of two (the entry
/// [`link_slot`] names and the next). At 4096 direct-mapped entries the kernel's block and
/// network paths missed in it for a quarter of the chains that went back to the block loop;
/// at 16384 direct-mapped, hot blocks whose RIPs shared an entry still evicted each other
/// ~200 times per MiB of guest `dd` reads.
const LINKS: usize = 16384;
/// `Link::rip` of an empty entry (not canonical: no block starts there).
const NO_RIP: u64 = u64::MAX;

/// A jump-cache entry: a translated block the chain stub may go on to without returning to
/// the block loop, found by the linear RIP it ran at. It is good while that RIP's page still
/// translates to `phys` for execution and the vCPU's code epoch is still `epoch` (the block
/// was checked then). One cache line, aligned: the stub reads fields at both ends.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Link {
    rip: u64,
    phys: u64,
    epoch: u64,
    /// Where the translation goes on after its prologue.
    code: u64,
    block: u64,
    ops: u64,
    bytes: u64,
    /// Offset of RIP's entry in a TLB.
    tlb_off: u64,
}

const EMPTY_LINK: Link = Link {
    rip: NO_RIP,
    phys: 0,
    epoch: 0,
    code: 0,
    block: 0,
    ops: 0,
    bytes: 0,
    tlb_off: 0,
};

const _: () = assert!(std::mem::size_of::<Link>() == 64);

/// The first jump-cache entry of `rip`'s set (the second is the next one).
fn link_slot(rip: u64) -> usize {
    (rip ^ rip >> 12) as usize & (LINKS - 2)
}

/// What the block loop gives [`run`] for chaining: the block about to run, the blocks it may
/// chain to before its time check, and its attention flag.
pub struct Chain<'a> {
    pub block: u32,
    pub budget: u32,
    pub attention: &'a AtomicBool,
}

/// Where [`run`] stopped: the exit of the block that ran last (`block`, entered at RIP
/// `start`), and the chaining budget left.
pub struct Ran {
    pub exit: Exit,
    pub block: u32,
    pub start: u64,
    pub budget: u32,
    /// Blocks chained to.
    pub chained: u64,
}

/// The chain stub's two entries.
#[derive(Clone, Copy, Default)]
struct Stub {
    full: usize,
    native: usize,
}

impl Stub {
    /// Put the stub at the start of `arena`.
    fn place(arena: &mut Arena) -> Option<Stub> {
        let (code, fast) = chain_stub()?;
        let full = arena.push(&code)?;
        Some(Stub {
            full,
            native: full + fast,
        })
    }
}

/// One vCPU's translator: its arena, jump cache and statistics.
pub struct Jit {
    arena: Arena,
    links: HugeSlice<Link>,
    memos: Memos,
    /// The chain stub's entries in the arena (first in it): full, and for blocks without
    /// handler calls.
    stub: Stub,
    /// Bytes of a translation's prologue (the same for all).
    prologue: usize,
    /// A translation did not fit: the block cache should be cleared.
    pub full: bool,
    /// Blocks translated (statistics).
    pub translated: u64,
    /// Ops translated to host code rather than handler calls (statistics).
    pub native_ops: u64,
}

/// Whether the JIT is on: unless `VIREO_EMU_JIT=0`.
pub fn default_on() -> bool {
    std::env::var("VIREO_EMU_JIT").map_or(true, |v| v != "0")
}

/// Code memory for the JIT of up to `JIT_VCPUS` vCPUs at a time (`None`, with a warning,
/// when it cannot be mapped: the vCPUs then interpret).
pub fn pool() -> Option<Arc<Pool>> {
    match Pool::new(ARENA_SIZE, JIT_VCPUS) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            tracing::warn!("emu: no JIT, executable memory unavailable: {e}");
            None
        }
    }
}

/// The process's code memory, mapped by [`prepare`] (`None`: not prepared, or the JIT is off).
static POOL: OnceLock<Option<Arc<Pool>>> = OnceLock::new();

/// Map the process's code memory unless `VIREO_EMU_JIT=0`. The VMM calls this
/// first thing, before any seccomp filter (they refuse `memfd_create` and executable
/// mappings); a backend created later uses it.
pub fn prepare() {
    POOL.get_or_init(|| if default_on() { pool() } else { None });
}

/// The code memory [`prepare`] mapped, if any.
pub fn prepared() -> Option<Arc<Pool>> {
    POOL.get().cloned().flatten()
}

/// The op kinds translated to host code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    MovRR(u8),
    MovRI(u8),
    MovRM(u8),
    MovMR(u8),
    Lea,
    Push,
    Pop,
    Nop,
    /// `op reg, reg/imm/flat memory` or `op flat memory, reg/imm` (ADD, OR, AND, SUB, XOR,
    /// CMP, TEST; forms RR, RI, RM, MR, MI);
    /// `nf`: no flags recorded.
    Alu {
        op: u8,
        s: u8,
        form: u8,
        nf: bool,
    },
    /// ADC or SBB (`op`): as `Alu`, with the guest's CF as carry in. `host_cf`: the host's CF
    /// is the guest's when the op starts (a register form right after an op that left the
    /// guest's flags or CF in the host's, see [`Jit::translate`]); else it is computed first.
    Carry {
        op: u8,
        s: u8,
        form: u8,
        nf: bool,
        host_cf: bool,
    },
    /// MOV of an immediate to flat memory (4 or 8 bytes).
    MovMI(u8),
    /// LEA to a 32-bit register.
    Lea32,
    /// SHL/SHR/SAR (`k`) of a 4- or 8-byte register by `count`; `flags`: the arithmetic
    /// flags are set as `shift::shift` sets them (else they are dead).
    /// `cl`: by CL instead (only with the flags dead).
    Shift {
        k: u8,
        s: u8,
        count: u8,
        flags: bool,
        cl: bool,
    },
    /// CMP/TEST fused with a Jcc, in every form; a taken one finishes in code placed after
    /// the block's end and returns `TAKEN` (it ends the block).
    CmpJcc {
        op: u8,
        s: u8,
        form: u8,
    },
    /// MOVZX/MOVSX/MOVSXD to a 32- or 64-bit register, from a register or flat memory.
    Movx {
        d: u8,
        s: u8,
        signed: bool,
        mem: bool,
    },
    /// Jcc right after a translated ALU op that recorded its flags: the host's flags are
    /// the guest's, so it is a host Jcc; a taken one finishes after the block's end.
    Jcc,
    /// CMOVcc between 4- or 8-byte registers right after such an ALU op: a host CMOVcc.
    Cmov(u8),
    /// INC/DEC/NOT/NEG (`op`, `alu::INC` ...) of a register or flat memory (`mem`), `s`
    /// bytes; `nf`: no flags recorded; `lock`: an atomic read-modify-write of memory.
    Unary {
        op: u8,
        s: u8,
        mem: bool,
        nf: bool,
        lock: bool,
    },
    /// SETcc of a register, right after an op whose flags the host holds: a host SETcc.
    Setcc,
    /// LOCK ADD/OR/AND/SUB/XOR with a flat memory destination (forms MR, MI), `s` bytes: a
    /// host compare-and-exchange loop.
    LockAlu {
        op: u8,
        s: u8,
        form: u8,
    },
    /// CMPXCHG / XADD of flat memory with a register, `s` bytes: the host's locked
    /// instruction.
    Cmpxchg(u8),
    Xadd(u8),
    /// CBW/CWDE/CDQE (`Widen`) and CWD/CDQ/CQO (`SignFill`) of `s` bytes.
    Widen(u8),
    SignFill(u8),
    /// BT/BTS/BTR/BTC (`k`) of `s` bytes: of a register by an immediate or a register, or
    /// of flat memory by an immediate (`mem`, LOCK: `lock`). CF goes to the vCPU's flags
    /// (`Cpu::set_arith`) and stays in the host's.
    Bt {
        k: u8,
        s: u8,
        mem: bool,
        imm: bool,
        lock: bool,
    },
    /// IMUL r, r/m (`imm`: IMUL r, r/m, imm) of 4 or 8 bytes, from a register or flat memory;
    /// flags as `muldiv::imul` sets them (CF/OF overflow, SF/ZF/PF of the result), eagerly.
    Imul {
        s: u8,
        mem: bool,
        imm: bool,
    },
    /// MUL / IMUL (`signed`) r/m of 4 or 8 bytes into RDX:RAX, flags as `muldiv::mul1` sets
    /// them.
    Mul1 {
        s: u8,
        mem: bool,
        signed: bool,
    },
    /// CALL / JMP through a register in 64-bit mode: they end their block.
    CallR,
    JmpR,
    /// CALL rel32, RET (imm16), JMP rel in 64-bit mode: they end their block.
    Call,
    Ret,
    Jmp,
}

/// What the host's arithmetic flags hold after an op's translation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostFlags {
    /// Nothing of the guest's.
    Lost,
    /// The guest's flags, all of them.
    All,
    /// The guest's flags except CF (after INC/DEC, which keep the guest's CF).
    NoCf,
    /// The guest's CF only (after BT*).
    CfOnly,
    /// Whatever they held before (the op changes neither the guest's nor the host's).
    Kept,
}

impl Kind {
    /// The op sets RIP itself (a branch, last in its block).
    fn branches(self) -> bool {
        matches!(
            self,
            Kind::Call | Kind::Ret | Kind::Jmp | Kind::CallR | Kind::JmpR
        )
    }

    /// The op reads the guest's flags from the host's (condition code `Op::ext`).
    fn reads_host_flags(self) -> bool {
        matches!(self, Kind::Jcc | Kind::Cmov(_) | Kind::Setcc)
    }

    /// What the host's flags hold after the op's code (see `assemble`).
    fn host_flags(self) -> HostFlags {
        match self {
            Kind::Alu { nf: false, .. }
            | Kind::Carry { nf: false, .. }
            | Kind::CmpJcc { .. }
            | Kind::LockAlu { .. }
            | Kind::Cmpxchg(_)
            | Kind::Xadd(_)
            | Kind::Unary {
                op: alu::NEG,
                nf: false,
                ..
            } => HostFlags::All,
            Kind::Unary {
                op: alu::INC | alu::DEC,
                nf: false,
                ..
            } => HostFlags::NoCf,
            Kind::Bt { .. } => HostFlags::CfOnly,
            Kind::Jcc
            | Kind::Cmov(_)
            | Kind::Setcc
            | Kind::MovRR(_)
            | Kind::MovRI(_)
            | Kind::Nop => HostFlags::Kept,
            _ => HostFlags::Lost,
        }
    }
}

/// Whether condition code `cc` reads CF (B, AE, BE, A).
fn cc_reads_cf(cc: u8) -> bool {
    matches!(cc & 15, 2 | 3 | 6 | 7)
}

/// What `op` is translated as, from the decoder's tag; `None`: call its handler.
fn kind(op: &Op) -> Option<Kind> {
    // Flat, or FS:/GS: with 64-bit addressing (only 64-bit blocks are translated).
    let fs_gs = matches!(op.seg as usize, FS | GS) && op.asize == 8 && op.flags & F_MEM != 0;
    let flat = (op.flags & F_FLAT != 0 || fs_gs) && op.flags & F_LOCK == 0;
    let s = op.size;
    let regs = op.r1 < 16 && op.r2 < 16;
    // Byte operands may name AH, CH, DH or BH (16-19).
    let regs_s = if s == 1 {
        op.r1 < 20 && op.r2 < 20
    } else {
        regs
    };
    let sized = matches!(s, 1 | 2 | 4 | 8);
    // Flat memory with LOCK: the atomic forms.
    let flat_locked = op.flags & F_FLAT != 0 || fs_gs;
    let (opid, form) = (op.jarg >> 4, op.jarg & 15);
    let mem_form = matches!(form, alu::RM | alu::MR | alu::MI);
    match op.jit {
        tag::NOP => Some(Kind::Nop),
        tag::MOV if regs_s && sized => match op.jarg {
            alu::RR => Some(Kind::MovRR(s)),
            alu::RI => Some(Kind::MovRI(s)),
            alu::RM if flat => Some(Kind::MovRM(s)),
            alu::MR if flat => Some(Kind::MovMR(s)),
            alu::MI if flat => Some(Kind::MovMI(s)),
            _ => None,
        },
        tag::LEA if s == 8 && op.asize == 8 && regs && op.flags & F_MEM != 0 => Some(Kind::Lea),
        tag::LEA if s == 4 && op.asize >= 4 && regs && op.flags & F_MEM != 0 => Some(Kind::Lea32),
        tag::SHIFT
            if regs
                && (s == 4 || s == 8)
                && (op.flags & F_CL == 0 || op.flags & F_NF != 0)
                && (matches!(op.jarg, shift::SHL | shift::SHR | shift::SAR)
                    // Rotates only when their flags (CF, OF) are dead.
                    || (op.flags & F_NF != 0 && matches!(op.jarg, shift::ROL | shift::ROR))) =>
        {
            let count = (op.imm & if s == 8 { 0x3f } else { 0x1f }) as u8;
            Some(Kind::Shift {
                k: op.jarg,
                s,
                count,
                flags: op.flags & F_NF == 0,
                cl: op.flags & F_CL != 0,
            })
        }
        tag::PUSH if regs => Some(Kind::Push),
        tag::POP if regs => Some(Kind::Pop),
        tag::CALL => Some(Kind::Call),
        tag::CALL_R if op.r2 < 16 => Some(Kind::CallR),
        tag::JMP_R if op.r2 < 16 => Some(Kind::JmpR),
        tag::CBW if matches!(s, 2 | 4 | 8) => Some(Kind::Widen(s)),
        tag::IMUL if regs && (s == 4 || s == 8) => {
            let mem = op.flags & F_MEM != 0;
            (!mem || flat).then_some(Kind::Imul {
                s,
                mem,
                imm: op.ext == 3,
            })
        }
        tag::MUL1 if regs && (s == 4 || s == 8) => {
            let mem = op.flags & F_MEM != 0;
            (!mem || flat).then_some(Kind::Mul1 {
                s,
                mem,
                signed: op.ext == 1,
            })
        }
        tag::BT if regs && matches!(s, 2 | 4 | 8) => {
            let mem = op.flags & F_MEM != 0;
            let lock = op.flags & F_LOCK != 0;
            let ok = !mem || if lock { flat_locked } else { flat };
            ok.then_some(Kind::Bt {
                k: op.ext & 3,
                s,
                mem,
                imm: op.ext & bits::BT_IMM != 0,
                lock,
            })
        }
        tag::CWD if matches!(s, 2 | 4 | 8) => Some(Kind::SignFill(s)),
        tag::RET => Some(Kind::Ret),
        tag::JMP => Some(Kind::Jmp),
        tag::JCC if op.size == 8 => Some(Kind::Jcc),
        tag::CMOV if regs && (s == 4 || s == 8) => Some(Kind::Cmov(s)),
        tag::SETCC if op.r2 < 20 => Some(Kind::Setcc),
        tag::UNARY if regs_s && sized => {
            let mem = op.flags & F_MEM != 0;
            let lock = op.flags & F_LOCK != 0;
            let ok = if lock {
                mem && flat_locked
            } else {
                !mem || flat
            };
            ok.then_some(Kind::Unary {
                op: op.jarg,
                s,
                mem,
                nf: op.flags & F_NF != 0,
                lock,
            })
        }
        tag::LOCK_ALU
            if regs_s
                && sized
                && flat_locked
                && matches!(form, alu::MR | alu::MI)
                && matches!(opid, alu::ADD | alu::OR | alu::AND | alu::SUB | alu::XOR) =>
        {
            Some(Kind::LockAlu { op: opid, s, form })
        }
        tag::CMPXCHG if regs_s && sized && flat_locked => Some(Kind::Cmpxchg(s)),
        tag::XADD if regs_s && sized && flat_locked => Some(Kind::Xadd(s)),
        tag::ALU
            if regs_s
                && sized
                && (matches!(form, alu::RR | alu::RI) || (mem_form && flat))
                && matches!(
                    opid,
                    alu::ADD | alu::OR | alu::AND | alu::SUB | alu::XOR | alu::CMP | alu::TEST
                ) =>
        {
            Some(Kind::Alu {
                op: opid,
                s,
                form,
                nf: op.flags & F_NF != 0,
            })
        }
        tag::ALU
            if regs_s
                && sized
                && (matches!(form, alu::RR | alu::RI) || (mem_form && flat))
                && matches!(opid, alu::ADC | alu::SBB) =>
        {
            Some(Kind::Carry {
                op: opid,
                s,
                form,
                nf: op.flags & F_NF != 0,
                host_cf: false,
            })
        }
        tag::CMP_JCC
            if regs_s
                && sized
                && form <= alu::MI
                && (opid == alu::CMP || opid == alu::TEST)
                && (flat || !mem_form) =>
        {
            Some(Kind::CmpJcc { op: opid, s, form })
        }
        tag::MOVX => {
            let (src, signed, mem) = (op.jarg & 15, op.jarg & 0x10 != 0, op.jarg & 0x20 != 0);
            let src_reg = op.r2 < 16 || (src == 1 && op.r2 < 20);
            let ok = op.r1 < 16
                && src_reg
                && (s == 4 || s == 8)
                && matches!(src, 1 | 2 | 4)
                && (flat || !mem);
            ok.then_some(Kind::Movx {
                d: s,
                s: src,
                signed,
                mem,
            })
        }
        _ => None,
    }
}

/// `call_op`: the op ran and the block goes on.
const GO_ON: u32 = 0;
/// `call_op`: the block must stop after the op; its result is in the context.
const STOP: u32 = 1;
/// `call_op`: the op ended the block (`Exc::Stop`: a taken Jcc, a mode change, a REP
/// yield) with RIP set; the block may chain.
const ENDED: u32 = 2;

/// Call op `op` through its handler with RIP `next` (after the instruction): [`GO_ON`],
/// [`STOP`] or [`ENDED`].
extern "sysv64" fn call_op(ctx: *mut Ctx, op: *const Op, next: u64) -> u32 {
    // SAFETY: translated code passes the context `run` built on its stack (alive for the
    // whole call) and a pointer into the block cache's op storage, which is never reallocated
    // while translated code exists (see `BlockCache::enable_jit`).
    let (ctx, op) = unsafe { (&mut *ctx, &*op) };
    // SAFETY: `exec` is the `&mut Exec` `run` was given, unused by it during the call.
    let x = unsafe { &mut *(ctx.exec as *mut Exec<'_>) };
    x.cpu.rip = next;
    let r = (op.h)(x, op);
    match r {
        _ if x.cpu.smc => {}
        Ok(()) => return GO_ON,
        Err(Exc::Stop) => return ENDED,
        Err(_) => {}
    }
    ctx.out = Some(r);
    STOP
}

use emit::*;

/// Displacement of guest register `r` from RBX (`gpr`).
fn gpr_disp(r: u8) -> i32 {
    (r as i32 & 15) * 8
}

/// Displacement of the `s`-byte guest register `r` from RBX: for a byte, 16-19 are AH, CH,
/// DH and BH (bits 15:8 of RAX ... RBX).
fn reg_disp(r: u8, s: u8) -> i32 {
    if s == 1 && (16..20).contains(&r) {
        gpr_disp(r - 16) + 1
    } else {
        gpr_disp(r)
    }
}

/// Displacement of field `offset` (`offset_of!(Cpu, ...)`) of the vCPU from RBX, which points
/// at `Cpu::gpr`.
fn cpu_field(offset: usize) -> i32 {
    offset as i32 - offset_of!(Cpu, gpr) as i32
}

/// Registers the translated code keeps: RBX = `Cpu::gpr` (so the vCPU's fields too, see
/// [`cpu_field`]), R12 = context, R13 = the block's RIP, R14 = the TLB in use; RBP and R15
/// hold values across a TLB look-up.
fn prologue(e: &mut Emit) {
    for r in [RBX, RBP, R12, R13, R14, R15] {
        e.push(r);
    }
    // Keep RSP 16-byte aligned at handler calls.
    e.alu_imm(SUB, true, RSP, 8);
    e.mov_rr(true, R12, RDI);
    e.mov_rr(true, R13, RSI);
    e.load64(RBX, R12, offset_of!(Ctx, cpu) as i32);
    e.lea(RBX, RBX, offset_of!(Cpu, gpr) as i32);
    e.load64(R14, R12, offset_of!(Ctx, tlb) as i32);
}

fn epilogue(e: &mut Emit) {
    e.alu_imm(ADD, true, RSP, 8);
    for r in [R15, R14, R13, R12, RBP, RBX] {
        e.pop(r);
    }
    e.ret();
}

/// RAX = the flat linear address of `op`'s memory operand (base + index * scale + disp; a
/// RIP-relative base is RIP after the op, `next` bytes into the block). Uses RCX.
fn effective_address(e: &mut Emit, op: &Op, next: u32) {
    e.mov_imm(RAX, op.disp);
    if op.base < 16 {
        e.add_mem(RAX, RBX, gpr_disp(op.base));
    } else if op.base == RIPREG {
        e.lea(RCX, R13, next as i32);
        e.add_rr(RAX, RCX);
    }
    if op.index < 16 {
        e.load64(RCX, RBX, gpr_disp(op.index));
        if op.scale & 3 != 0 {
            e.shift(SHL, RCX, op.scale & 3);
        }
        e.add_rr(RAX, RCX);
    }
    // Other register numbers add nothing, as in `Exec::ea`.
}

/// RAX = the linear address of `op`'s memory operand: its effective address plus the FS or
/// GS base for an FS:/GS: operand (64-bit mode: other segments have base 0). Uses RCX.
fn linear_address(e: &mut Emit, op: &Op, next: u32) {
    effective_address(e, op, next);
    if matches!(op.seg as usize, FS | GS) {
        let base = offset_of!(Cpu, seg)
            + op.seg as usize * std::mem::size_of::<crate::Segment>()
            + offset_of!(crate::Segment, base);
        e.add_mem(RAX, RBX, cpu_field(base));
    }
}

/// RAX: linear address of a `size`-byte access. Leaves RAX = its host address when the TLB
/// holds the page for a read or `write` (and, for a write, the page's flag byte is clear: no
/// code, not armed for dirty logging) and the access stays in the page; jumps to `miss`
/// otherwise. Uses RCX and RDX. The same test as `Exec::read` / `Exec::write`.
fn tlb_fast_path(e: &mut Emit, size: u8, write: bool, miss: Label) {
    // RDX = the entry's offset in the TLB at R14: the index times 16, then times 3.
    const _: () = assert!(std::mem::size_of::<TlbEntry>() == 48);
    e.mov_rr(true, RDX, RAX);
    e.shift(SHR, RDX, 8);
    e.alu_imm(AND, false, RDX, ((TLB_SIZE - 1) << 4) as i32);
    e.times3(RDX);
    // The page of the access's last byte: an access that crosses into the next page misses
    // the tag of its first page (tags are page addresses, or never equal one).
    e.lea(RCX, RAX, size as i32 - 1);
    e.alu_imm(AND, true, RCX, -(PAGE_SIZE as i32));
    let tag = if write {
        offset_of!(TlbEntry, tag_w)
    } else {
        offset_of!(TlbEntry, tag_r)
    };
    e.cmp_mem_idx(RCX, R14, RDX, tag as i32);
    e.jcc(CC_NE, miss);
    if write {
        e.load32_idx(RCX, R14, RDX, offset_of!(TlbEntry, code) as i32);
        e.cmp_mem(RCX, R12, offset_of!(Ctx, code_len) as i32);
        e.jcc(CC_AE, miss);
        e.add_mem(RCX, R12, offset_of!(Ctx, code_flags) as i32);
        e.cmp_byte_zero(RCX, 0);
        e.jcc(CC_NE, miss);
    }
    e.add_mem_idx(RAX, R14, RDX, offset_of!(TlbEntry, addend) as i32);
}

impl Jit {
    /// A translator with code memory from `pool`; `None` when the pool is used up.
    pub fn new(pool: &Arc<Pool>) -> Option<Jit> {
        let mut e = Emit::new();
        prologue(&mut e);
        let mut jit = Jit {
            arena: pool.take()?,
            links: HugeSlice::new(LINKS, |_| EMPTY_LINK),
            memos: Memos::new(),
            stub: Stub::default(),
            prologue: e.buf.len(),
            full: false,
            translated: 0,
            native_ops: 0,
        };
        jit.stub = Stub::place(&mut jit.arena)?;
        Some(jit)
    }

    /// The jump cache, for [`run`].
    pub fn links(&mut self) -> &mut [Link] {
        &mut self.links
    }

    /// Let the chain stub find block `block` (translated at `native`; `ops` ops, `bytes`
    /// bytes, at guest-physical `phys`) by RIP `rip` while the code epoch is `epoch`.
    #[allow(clippy::too_many_arguments)]
    pub fn remember(
        &mut self,
        rip: u64,
        phys: u64,
        epoch: u64,
        native: usize,
        block: u32,
        ops: usize,
        bytes: usize,
    ) {
        // The newest entry of a set first; the other moves to the second place unless it is
        // for the same RIP.
        let i = link_slot(rip);
        if let Some(&first) = self.links.get(i) {
            if first.rip != rip {
                if let Some(second) = self.links.get_mut(i + 1) {
                    *second = first;
                }
            }
        }
        if let Some(l) = self.links.get_mut(i) {
            *l = Link {
                rip,
                phys: phys & PAGE_MASK,
                epoch,
                code: (native + self.prologue) as u64,
                block: block as u64,
                ops: ops as u64,
                bytes: bytes as u64,
                tlb_off: (tlb_index(rip) * std::mem::size_of::<TlbEntry>()) as u64,
            };
        }
    }

    /// Translate `ops` (a block of 64-bit code at `place`); its entry address, or `None` when
    /// the arena is full or nothing in the block is worth it.
    pub fn translate(&mut self, ops: &[Op], place: Place) -> Option<usize> {
        let mut kinds: Vec<Option<Kind>> = ops.iter().map(kind).collect();
        // A Jcc, CMOVcc or SETcc is translated only where the host's flags are the guest's:
        // after a translated op that sets them, with only ops that keep them in between.
        let mut host = HostFlags::Lost;
        for (k, op) in kinds.iter_mut().zip(ops) {
            if let Some(kind) = *k {
                let good = match host {
                    HostFlags::All => true,
                    HostFlags::NoCf => !cc_reads_cf(op.ext),
                    // B or AE.
                    HostFlags::CfOnly => matches!(op.ext & 15, 2 | 3),
                    _ => false,
                };
                if kind.reads_host_flags() && !good {
                    *k = None;
                }
                // ADC/SBB take the carry from the host's CF when it is the guest's and no
                // memory operand's TLB look comes first (it changes the host's flags).
                if let Some(Kind::Carry { form, host_cf, .. }) = k {
                    *host_cf = matches!(host, HostFlags::All | HostFlags::CfOnly)
                        && matches!(*form, alu::RR | alu::RI);
                }
            }
            host = match k.map_or(HostFlags::Lost, Kind::host_flags) {
                HostFlags::Kept => host,
                h => h,
            };
        }
        if kinds.iter().all(|k| k.is_none()) {
            return None;
        }
        let first_link = self.links.as_ptr() as u64;
        let code = assemble(
            ops,
            &kinds,
            self.stub,
            place,
            Some((&mut self.memos, first_link)),
        )?;
        let Some(at) = self.arena.push(&code) else {
            self.full = true;
            return None;
        };
        self.translated += 1;
        self.native_ops += kinds.iter().filter(|k| k.is_some()).count() as u64;
        Some(at)
    }

    /// Forget every translation (the block cache was cleared).
    pub fn reset(&mut self) {
        self.arena.reset();
        self.full = false;
        self.links.fill(EMPTY_LINK);
        self.memos.next = 0;
        // The stub first again, where it was: it fitted before.
        if let Some(stub) = Stub::place(&mut self.arena) {
            self.stub = stub;
        }
    }
}

/// `dst` = the `s`-byte value at `[base + disp]`, zero-extended.
fn load_sized(e: &mut Emit, dst: u8, base: u8, disp: i32, s: u8) {
    match s {
        1 => e.load8z(dst, base, disp),
        2 => e.load16z(dst, base, disp),
        4 => e.load32(dst, base, disp),
        _ => e.load64(dst, base, disp),
    }
}

/// `[base + disp]` = the low `s` bytes of `src` (RAX, RCX or RDX for a byte).
fn store_sized(e: &mut Emit, base: u8, disp: i32, src: u8, s: u8) {
    match s {
        1 => e.store8(base, disp, src),
        2 => e.store16(base, disp, src),
        4 => e.store32(base, disp, src),
        _ => e.store64(base, disp, src),
    }
}

/// Guest register `r` = the `s`-byte value in `src` (zero-extended when `s` is 4): a 1- or
/// 2-byte write keeps the rest of the register, a 4-byte one clears the upper half (SDM
/// Vol. 1 §3.4.1.1).
fn set_gpr(e: &mut Emit, r: u8, src: u8, s: u8) {
    match s {
        1 | 2 => store_sized(e, RBX, reg_disp(r, s), src, s),
        _ => e.store64(RBX, gpr_disp(r), src),
    }
}

/// `op dst, src` (binary operation in `alu_rr` numbering) on the low `s` bytes.
fn alu_sized(e: &mut Emit, op: u8, s: u8, dst: u8, src: u8) {
    match s {
        1 => e.alu_rr8(op, dst, src),
        2 => e.alu_rr16(op, dst, src),
        _ => e.alu_rr(op, s == 8, dst, src),
    }
}

/// RAX, RCX = the two operands of a binary op (ALU, CMP/TEST) in `form` (`s` bytes,
/// zero-extended; `b` is the immediate). A memory operand is read first, through the TLB fast
/// path (for a write too when `write`: the op stores its result there), to `bail` on a miss
/// with nothing changed; R15 = its host address.
#[allow(clippy::too_many_arguments)]
fn operands(e: &mut Emit, op: &Op, s: u8, form: u8, b: u64, end: u32, write: bool, bail: Label) {
    if matches!(form, alu::RM | alu::MR | alu::MI) {
        linear_address(e, op, end);
        tlb_fast_path(e, s, write, bail);
        e.mov_rr(true, R15, RAX);
        load_sized(e, RSI, RAX, 0, s);
    }
    match form {
        alu::RR => {
            load_sized(e, RAX, RBX, reg_disp(op.r1, s), s);
            load_sized(e, RCX, RBX, reg_disp(op.r2, s), s);
        }
        alu::RI => {
            load_sized(e, RAX, RBX, reg_disp(op.r1, s), s);
            e.mov_imm(RCX, b);
        }
        alu::RM => {
            load_sized(e, RAX, RBX, reg_disp(op.r1, s), s);
            e.mov_rr(true, RCX, RSI);
        }
        alu::MR => {
            e.mov_rr(true, RAX, RSI);
            load_sized(e, RCX, RBX, reg_disp(op.r1, s), s);
        }
        _ => {
            e.mov_rr(true, RAX, RSI);
            e.mov_imm(RCX, b);
        }
    }
}

/// `dst` = the `s`-byte r/m operand of `op` (zero-extended): flat memory (`mem`, through the
/// TLB fast path for a read, to `bail` on a miss with nothing changed) or register `op.r2`.
/// Uses RAX, RCX, RDX for memory.
#[allow(clippy::too_many_arguments)]
fn load_rm(e: &mut Emit, op: &Op, dst: u8, s: u8, mem: bool, end: u32, bail: Label) {
    if mem {
        linear_address(e, op, end);
        tlb_fast_path(e, s, false, bail);
        load_sized(e, dst, RAX, 0, s);
    } else {
        load_sized(e, dst, RBX, reg_disp(op.r2, s), s);
    }
}

/// Call the `extern "sysv64"` function at `f` with the context as its first argument (other
/// arguments already in RSI, RDX). Clobbers the caller-saved registers.
fn call_with_ctx(e: &mut Emit, f: u64) {
    e.mov_rr(true, RDI, R12);
    e.mov_imm(RAX, f);
    e.call(RAX);
}

/// Consecutive PUSH (or POP) register ops from `k` on, none of RSP, at most 8: run as one,
/// with one look in the TLB for all their stack slots (0 for PUSH or POP RSP).
fn stack_run(ops: &[Op], kinds: &[Option<Kind>], k: usize, want: Kind) -> usize {
    ops.iter()
        .zip(kinds)
        .skip(k)
        .take(8)
        .take_while(|(op, kind)| **kind == Some(want) && op.r1 != GUEST_RSP as u8)
        .count()
}

/// PUSH of each register of `ops` in turn (a [`stack_run`]): one TLB look for the `8 * n`
/// bytes below RSP; to `bail` with nothing done when it misses (or they cross a page).
fn push_run(e: &mut Emit, ops: &[Op], bail: Label) {
    let n = ops.len() as i32;
    e.load64(RAX, RBX, gpr_disp(GUEST_RSP as u8));
    e.alu_imm(SUB, true, RAX, 8 * n);
    e.mov_rr(true, RBP, RAX);
    tlb_fast_path(e, 8 * n as u8, true, bail);
    for (i, op) in ops.iter().enumerate() {
        e.load64(R15, RBX, gpr_disp(op.r1));
        e.store64(RAX, 8 * (n - 1 - i as i32), R15);
    }
    e.store64(RBX, gpr_disp(GUEST_RSP as u8), RBP);
}

/// POP into each register of `ops` in turn (a [`stack_run`]): one TLB look for the `8 * n`
/// bytes at RSP; to `bail` with nothing done when it misses (or they cross a page).
fn pop_run(e: &mut Emit, ops: &[Op], bail: Label) {
    let n = ops.len() as i32;
    e.load64(RAX, RBX, gpr_disp(GUEST_RSP as u8));
    e.mov_rr(true, RBP, RAX);
    tlb_fast_path(e, 8 * n as u8, false, bail);
    for (i, op) in ops.iter().enumerate() {
        e.load64(R15, RAX, 8 * i as i32);
        e.store64(RBX, gpr_disp(op.r1), R15);
    }
    e.alu_imm(ADD, true, RBP, 8 * n);
    e.store64(RBX, gpr_disp(GUEST_RSP as u8), RBP);
}

/// Push R15 onto the guest stack (64-bit): to `bail` with nothing changed when the TLB fast
/// path misses.
fn push_r15(e: &mut Emit, bail: Label) {
    e.load64(RAX, RBX, gpr_disp(GUEST_RSP as u8));
    e.alu_imm(SUB, true, RAX, 8);
    e.mov_rr(true, RBP, RAX);
    tlb_fast_path(e, 8, true, bail);
    e.store64(RAX, 0, R15);
    e.store64(RBX, gpr_disp(GUEST_RSP as u8), RBP);
}

/// `dst` = the 8 bytes at the guest's RSP, RBP = RSP (not yet moved): to `bail` with nothing
/// changed when the TLB fast path misses.
fn pop_to(e: &mut Emit, dst: u8, bail: Label) {
    e.load64(RAX, RBX, gpr_disp(GUEST_RSP as u8));
    e.mov_rr(true, RBP, RAX);
    tlb_fast_path(e, 8, false, bail);
    e.load64(dst, RAX, 0);
}

/// `dst` = RIP `end` bytes into the block plus `rel` (a branch target); to `bail` when it is
/// not canonical (the interpreter raises the #GP). Uses RCX.
fn branch_target(e: &mut Emit, at: Place, dst: u8, end: u32, rel: u64, bail: Label) {
    let off = (end as u64).wrapping_add(rel);
    if off as i64 == off as i32 as i64 {
        e.lea(dst, R13, off as i32);
    } else {
        e.mov_imm(dst, off);
        e.add_rr(dst, R13);
    }
    // A target in the block's own page is canonical, as the block's RIP is.
    if !at.holds(off) {
        canonical_or(e, dst, bail);
    }
}

/// Where a block is: the offset of its first byte in its page (the same in every linear
/// mapping of the block, which is keyed by its physical address).
#[derive(Clone, Copy, Default)]
pub struct Place {
    pub page_off: u32,
    /// The block's guest-physical page.
    pub phys_page: u64,
}

impl Place {
    /// The byte `off` bytes after the block's first (wrapping) is in the block's page.
    fn holds(self, off: u64) -> bool {
        (self.page_off as u64).wrapping_add(off) < PAGE_SIZE
    }
}

/// Memos per vCPU (8 bytes each): one per chain exit of a translated block to a fixed target
/// in the block's own page. When they run out, new exits go through the stub only.
const MEMOS: usize = 1 << 17;

/// The exits' memos: each holds the jump-cache entry the exit last chained through, so the
/// exit can check that entry and go on to its block without the stub (`chain_or_return`).
/// Translated code reads and writes them; they live as long as the `Jit` and are handed out
/// again after a reset (which drops every translation that had one).
struct Memos {
    slots: HugeSlice<AtomicU64>,
    next: usize,
}

impl Memos {
    fn new() -> Memos {
        Memos {
            slots: HugeSlice::new(MEMOS, |_| AtomicU64::new(0)),
            next: 0,
        }
    }

    /// The address of a fresh memo holding `link` (any jump-cache entry: the exit checks the
    /// one it finds), or `None` when all are taken.
    fn take(&mut self, link: u64) -> Option<u64> {
        let m = self.slots.get(self.next)?;
        m.store(link, Ordering::Relaxed);
        self.next += 1;
        Some(m.as_ptr() as u64)
    }
}

/// An exit with a fixed target in the block's page, taken by a block of translated ops only:
/// it goes on through its memo when that names the target's entry at the current epoch.
#[derive(Clone, Copy)]
struct Fast {
    /// The memo's address.
    memo: u64,
    /// The register holding the target RIP.
    target: u8,
    /// The target's offset from the block's start RIP.
    off: i32,
    /// The block's (and so the target's) guest-physical page.
    phys: u64,
}

/// RDX = binary operation `o` (ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST) of RAX and RCX,
/// `s` bytes (ADC/SBB with the host's CF as carry in); returns the `Lazy::op` that records it
/// (as `alu::compute` does).
fn compute(e: &mut Emit, o: u8, s: u8) -> u8 {
    let (host, fop) = match o {
        alu::ADD => (alu::ADD, flags::ADD),
        alu::ADC => (alu::ADC, flags::ADC),
        alu::SBB => (alu::SBB, flags::SBB),
        alu::SUB | alu::CMP => (alu::SUB, flags::SUB),
        alu::TEST => (alu::AND, flags::LOGIC),
        o => (o, flags::LOGIC),
    };
    // Operands are zero-extended: a 1- or 2-byte result leaves RDX zero-extended too.
    e.mov_rr(true, RDX, RAX);
    alu_sized(e, host, s, RDX, RCX);
    fop
}

/// The rest of a fused CMP/TEST (`o`, `s` bytes) of RAX with RCX once its branch is decided:
/// one more fused op counted, and `Cpu::lazy` as `alu::compute` records it. The host's flags
/// are then the compare's. Uses RDX, RSI.
fn record_compare(e: &mut Emit, o: u8, s: u8) {
    e.load64(RSI, R12, offset_of!(Ctx, fused) as i32);
    e.alu_imm(ADD, true, RSI, 1);
    e.store64(R12, offset_of!(Ctx, fused) as i32, RSI);
    let fop = compute(e, o, s);
    record_lazy(e, fop, s);
}

/// After SHL/SHR/SAR (`k`, `s` bytes, a nonzero count) of RDX into RAX by the host: set the
/// guest's arithmetic flags as `shift::shift` does (CF, PF, ZF, SF from the host's shift; OF
/// the result's sign against CF for SHL, the value's sign for SHR, clear for SAR; AF clear),
/// eagerly. Uses RCX, RDX.
fn shift_flags(e: &mut Emit, k: u8, s: u8) {
    e.pushfq();
    e.pop(RCX);
    e.alu_imm(
        AND,
        false,
        RCX,
        (flags::CF | flags::PF | flags::ZF | flags::SF) as i32,
    );
    let top = s * 8 - 1;
    match k {
        shift::SHL => {
            e.mov_rr(true, RDX, RAX);
            e.shift(SHR, RDX, top);
            e.alu_rr(alu::XOR, false, RDX, RCX);
            e.alu_imm(AND, false, RDX, 1);
        }
        shift::SHR => {
            e.shift(SHR, RDX, top);
            e.alu_imm(AND, false, RDX, 1);
        }
        _ => e.mov_imm(RDX, 0),
    }
    e.shift(SHL, RDX, flags::OF.trailing_zeros() as u8);
    e.alu_rr(alu::OR, false, RCX, RDX);
    set_arith_eagerly(e);
}

/// Right after a host multiply with the low half of the product in RAX: the vCPU's flags as
/// `muldiv::mul_flags` sets them (CF and OF from the host's multiply, SF/ZF/PF of the low
/// half, AF clear), eagerly. Uses RCX, RDX.
fn multiply_flags(e: &mut Emit, s: u8) {
    e.pushfq();
    e.pop(RDX);
    e.alu_imm(AND, false, RDX, (flags::CF | flags::OF) as i32);
    alu_sized(e, alu::TEST, s, RAX, RAX);
    e.pushfq();
    e.pop(RCX);
    e.alu_imm(AND, false, RCX, (flags::SF | flags::ZF | flags::PF) as i32);
    e.alu_rr(alu::OR, false, RCX, RDX);
    set_arith_eagerly(e);
}

/// The vCPU's arithmetic flags = RCX (its other flags kept), recorded eagerly. Uses RDX.
fn set_arith_eagerly(e: &mut Emit) {
    let rflags = cpu_field(offset_of!(Cpu, flags));
    e.load64(RDX, RBX, rflags);
    e.alu_imm(AND, true, RDX, !flags::ARITH as i32);
    e.alu_rr(alu::OR, true, RDX, RCX);
    e.store64(RBX, rflags, RDX);
    e.store_imm8(RBX, lazy_field(offset_of!(Lazy, op)), flags::EAGER);
}

/// INC/DEC/NOT/NEG (`o`) of `s` bytes of a register or flat memory (`mem`; LOCK: `lock`),
/// with the flags recorded unless `nf`, as `alu::unary` does; the host's flags are then the
/// guest's (but for CF after INC/DEC). To `bail` on a TLB miss, with nothing changed but CF
/// frozen (which the interpreter does again).
#[allow(clippy::too_many_arguments)]
fn unary(
    e: &mut Emit,
    op: &Op,
    o: u8,
    s: u8,
    mem: bool,
    nf: bool,
    lock: bool,
    end: u32,
    bail: Label,
) {
    let host = match o {
        alu::INC => INC,
        alu::DEC => DEC,
        alu::NOT => NOT,
        _ => NEG,
    };
    if !nf && matches!(o, alu::INC | alu::DEC) {
        call_with_ctx(e, freeze_cf as *const () as u64);
    }
    if mem {
        linear_address(e, op, end);
        tlb_fast_path(e, s, true, bail);
        e.mov_rr(true, R15, RAX);
        load_sized(e, RAX, RAX, 0, s);
    } else {
        load_sized(e, RAX, RBX, reg_disp(op.r1, s), s);
    }
    // RAX = the value (zero-extended), RDX = the result.
    if lock {
        let again = e.label();
        e.bind(again);
        e.mov_rr(true, RDX, RAX);
        e.unary(host, s, RDX);
        e.lock_cmpxchg(s, R15, 0, RDX);
        e.jcc(CC_NE, again);
    }
    e.mov_rr(true, RDX, RAX);
    e.unary(host, s, RDX);
    match (lock, mem) {
        (true, _) => {}
        (false, true) => store_sized(e, R15, 0, RDX, s),
        (false, false) => set_gpr(e, op.r1, RDX, s),
    }
    if nf || o == alu::NOT {
        return;
    }
    if o == alu::NEG {
        // As SUB 0 - value.
        e.mov_rr(true, RCX, RAX);
        e.mov_imm(RAX, 0);
        record_lazy(e, flags::SUB, s);
    } else {
        e.mov_imm(RCX, 1);
        record_lazy(
            e,
            if o == alu::INC {
                flags::INC
            } else {
                flags::DEC
            },
            s,
        );
    }
}

/// Jump to `bail` unless register `r` holds a canonical address (bits 63..47 equal). Uses RCX.
fn canonical_or(e: &mut Emit, r: u8, bail: Label) {
    e.mov_rr(true, RCX, r);
    e.shift(SHL, RCX, 16);
    e.shift(SAR, RCX, 16);
    e.alu_rr(alu::CMP, true, RCX, r);
    e.jcc(CC_NE, bail);
}

/// `Cpu::rip` = register `r`.
fn set_rip(e: &mut Emit, r: u8) {
    e.store64(RBX, cpu_field(offset_of!(Cpu, rip)), r);
}

/// Displacement of field `offset` of `Cpu::lazy` from RBX.
fn lazy_field(offset: usize) -> i32 {
    cpu_field(offset_of!(Cpu, lazy) + offset)
}

/// `Cpu::lazy` = { `fop`, `s`, res RDX, a RAX, b RCX } (as `alu::compute` records it).
fn record_lazy(e: &mut Emit, fop: u8, s: u8) {
    record_lazy_from(e, fop, s, RDX, RAX, RCX);
}

/// `Cpu::lazy` = { `fop`, `s`, `res`, `a`, `b` } (registers). Leaves the host's flags alone.
fn record_lazy_from(e: &mut Emit, fop: u8, s: u8, res: u8, a: u8, b: u8) {
    // `op` and `size` with one store.
    const _: () = assert!(offset_of!(Lazy, size) == offset_of!(Lazy, op) + 1);
    e.store_imm16(
        RBX,
        lazy_field(offset_of!(Lazy, op)),
        u16::from_le_bytes([fop, s]),
    );
    e.store64(RBX, lazy_field(offset_of!(Lazy, res)), res);
    e.store64(RBX, lazy_field(offset_of!(Lazy, a)), a);
    e.store64(RBX, lazy_field(offset_of!(Lazy, b)), b);
}

/// After BT*: the vCPU's CF = `cf`, its other flags as they are (`Cpu::set_arith`). Called
/// from translated code.
extern "sysv64" fn set_cf(ctx: *mut Ctx, cf: u64) {
    // SAFETY: as in `freeze_cf`.
    let cpu = unsafe { &mut *(*ctx).cpu };
    cpu.set_arith(flags::CF, cf & 1);
}

/// Before INC/DEC records its flags: CF as the current flags have it, kept in `Cpu::flags`
/// (as `Cpu::set_lazy` does). Called from translated code.
extern "sysv64" fn freeze_cf(ctx: *mut Ctx) {
    // SAFETY: translated code passes the context `run` built on its stack; its `cpu` is the
    // vCPU `run` was given, which nothing else touches during the call.
    let cpu = unsafe { &mut *(*ctx).cpu };
    let cf = cpu.cf();
    cpu.flags = (cpu.flags & !flags::CF) | cf as u64;
}

/// The chain stub and the offset of its second entry, which skips the checks of the vCPU
/// state only handlers change; called by a translated block that ran to its end (RIP is
/// set): RAX = where
/// the translation of the block at RIP goes on after its prologue, with R13, the context and
/// the vCPU's instruction count and running-block bounds moved on to that block; RAX = 0
/// (nothing changed) when the block loop must look first: the vCPU has something to attend to
/// (attention, a poll, an interrupt shadow, TF), the mode or privilege changed, the budget is
/// spent, or the jump cache does not hold a block for RIP that is good now (same page
/// translation, checked at this code epoch or passing [`relink`] after one). RDI = where to
/// record the entry it chains through (an exit's memo, or `Ctx::memo_sink`). Uses RAX, RCX,
/// RDX, RSI and, through `relink`, the other registers the System V ABI lets a callee change.
fn chain_stub() -> Option<(Vec<u8>, usize)> {
    let mut e = Emit::new();
    let fail = e.label();
    let stale = e.label();
    let go = e.label();
    let ctx = |f: usize| f as i32;
    let link = ctx;
    // The full entry: a handler ran in the block, it may have changed the vCPU's state.
    e.cmp_byte_zero(RBX, cpu_field(offset_of!(Cpu, poll)));
    e.jcc(CC_NE, fail);
    e.cmp_byte_zero(RBX, cpu_field(offset_of!(Cpu, shadow)));
    e.jcc(CC_NE, fail);
    // TF is bit 8 of RFLAGS.
    e.test_mem8(RBX, cpu_field(offset_of!(Cpu, flags)) + 1, 1);
    e.jcc(CC_NE, fail);
    e.load8z(RAX, RBX, cpu_field(offset_of!(Cpu, bitness)));
    e.alu_imm(CMP, false, RAX, 64);
    e.jcc(CC_NE, fail);
    e.load64(RAX, RBX, cpu_field(offset_of!(Cpu, tlb_user)));
    e.cmp_mem(RAX, R12, ctx(offset_of!(Ctx, user)));
    e.jcc(CC_NE, fail);
    // The entry for blocks of translated ops only: those leave that state alone.
    let fast = e.buf.len();
    budget_spent_or_attention(&mut e, fail);
    // The jump cache entry for RIP (`link_slot`).
    e.load64(RSI, RBX, cpu_field(offset_of!(Cpu, rip)));
    e.mov_rr(true, RAX, RSI);
    e.shift(SHR, RAX, 12);
    e.alu_rr(alu::XOR, true, RAX, RSI);
    e.alu_imm(AND, false, RAX, (LINKS - 2) as i32);
    e.shift(SHL, RAX, std::mem::size_of::<Link>().trailing_zeros() as u8);
    e.add_mem(RAX, R12, ctx(offset_of!(Ctx, links)));
    let hit = e.label();
    e.cmp_mem(RSI, RAX, link(offset_of!(Link, rip)));
    e.jcc(CC_E, hit);
    e.alu_imm(ADD, true, RAX, std::mem::size_of::<Link>() as i32);
    e.cmp_mem(RSI, RAX, link(offset_of!(Link, rip)));
    e.jcc(CC_NE, fail);
    e.bind(hit);
    // RIP's page in the execute TLB, still at the block's physical page.
    e.load64(RDX, RAX, link(offset_of!(Link, tlb_off)));
    e.add_rr(RDX, R14);
    e.mov_rr(true, RCX, RSI);
    e.alu_imm(AND, true, RCX, -(PAGE_SIZE as i32));
    e.cmp_mem(RCX, RDX, offset_of!(TlbEntry, tag_x) as i32);
    e.jcc(CC_NE, fail);
    e.load64(RCX, RDX, offset_of!(TlbEntry, phys) as i32);
    e.cmp_mem(RCX, RAX, link(offset_of!(Link, phys)));
    e.jcc(CC_NE, fail);
    // Checked at this code epoch, and `Cpu::sync_epoch` would not move it.
    vm_epoch_moved(&mut e, stale);
    e.load64(RCX, RBX, cpu_field(offset_of!(Cpu, epoch)));
    e.cmp_mem(RCX, RAX, link(offset_of!(Link, epoch)));
    e.jcc(CC_NE, stale);
    // Go: what the block loop does before running a block.
    e.bind(go);
    move_on(&mut e, 0);
    e.store64(RDI, 0, RAX);
    e.load64(RCX, RDX, offset_of!(TlbEntry, addend) as i32);
    e.add_rr(RCX, RSI);
    e.store64(RBX, cpu_field(offset_of!(Cpu, blk_host)), RCX);
    e.load64(RAX, RAX, link(offset_of!(Link, code)));
    e.ret();
    // The epoch moved since the entry was checked. When only I/O exits moved it and
    // `Ctx::clean` has the page as unwritten at this epoch, stamp the entry here (what
    // `relink` would do); else `relink` looks.
    e.bind(stale);
    let call_relink = e.label();
    vm_epoch_moved(&mut e, call_relink);
    e.load64(RCX, RAX, link(offset_of!(Link, epoch)));
    e.cmp_mem(RCX, RBX, cpu_field(offset_of!(Cpu, hard_floor)));
    e.jcc(CC_B, fail);
    e.load64(RCX, R12, ctx(offset_of!(Ctx, logging)));
    e.cmp_byte_zero(RCX, 0);
    e.jcc(CC_NE, fail);
    e.load32(R8, RDX, offset_of!(TlbEntry, code) as i32);
    e.mov_rr(true, R9, R8);
    e.alu_imm(AND, false, R9, (CLEAN - 1) as i32);
    e.shift(SHL, R9, std::mem::size_of::<Clean>().trailing_zeros() as u8);
    e.add_rr(R9, R12);
    let clean = offset_of!(Ctx, clean);
    e.cmp_mem(R8, R9, ctx(clean + offset_of!(Clean, page)));
    e.jcc(CC_NE, call_relink);
    e.load64(RCX, RBX, cpu_field(offset_of!(Cpu, epoch)));
    e.cmp_mem(RCX, R9, ctx(clean + offset_of!(Clean, epoch)));
    e.jcc(CC_NE, call_relink);
    e.store64(RAX, link(offset_of!(Link, epoch)), RCX);
    e.jmp(go);
    // `relink` (RSP is 8 below a multiple of 16 here; four pushes and 8 bytes align it for
    // the call).
    e.bind(call_relink);
    for r in [RAX, RDX, RSI, RDI] {
        e.push(r);
    }
    e.alu_imm(SUB, true, RSP, 8);
    e.mov_rr(true, RSI, RAX);
    call_with_ctx(&mut e, relink as *const () as u64);
    e.mov_rr(true, RCX, RAX);
    e.alu_imm(ADD, true, RSP, 8);
    for r in [RDI, RSI, RDX, RAX] {
        e.pop(r);
    }
    e.alu_rr(alu::TEST, true, RCX, RCX);
    e.jcc(CC_NE, go);
    e.bind(fail);
    e.mov_imm(RAX, 0);
    e.ret();
    Some((e.finish()?, fast))
}

/// Before going on to the block of jump-cache entry RAX at RIP RSI: R13, `Ctx::link`, the
/// running block's length, the instruction count (less `skipped` ops of the block that ends,
/// which the block loop counted) and the budget moved on, as the block loop does; the caller
/// sets `Cpu::blk_host`. Uses RCX.
fn move_on(e: &mut Emit, skipped: i32) {
    e.mov_rr(true, R13, RSI);
    e.store64(R12, offset_of!(Ctx, link) as i32, RAX);
    e.load64(RCX, RAX, offset_of!(Link, bytes) as i32);
    e.store64(RBX, cpu_field(offset_of!(Cpu, blk_len)), RCX);
    e.load64(RCX, RAX, offset_of!(Link, ops) as i32);
    if skipped != 0 {
        e.alu_imm(SUB, true, RCX, skipped);
    }
    e.add_to_mem(RBX, cpu_field(offset_of!(Cpu, icount)), RCX);
    e.alu_mem_imm8(SUB, R12, offset_of!(Ctx, budget) as i32, 1);
}

/// Call the chain stub at `stub` with RDI = `memo` (an exit's memo, else `Ctx::memo_sink`),
/// then test RAX (zero: the block loop must look).
fn call_stub(e: &mut Emit, stub: usize, memo: Option<u64>) {
    match memo {
        Some(m) => e.mov_imm(RDI, m),
        None => e.lea(RDI, R12, offset_of!(Ctx, memo_sink) as i32),
    }
    e.mov_imm(RAX, stub as u64);
    e.call(RAX);
    e.alu_rr(alu::TEST, true, RAX, RAX);
}

/// To `stop` when the chaining budget is spent or the block loop's attention flag is set.
/// Uses RCX.
fn budget_spent_or_attention(e: &mut Emit, stop: Label) {
    e.alu_mem_imm8(CMP, R12, offset_of!(Ctx, budget) as i32, 0);
    e.jcc(CC_E, stop);
    e.load64(RCX, R12, offset_of!(Ctx, attention) as i32);
    e.cmp_byte_zero(RCX, 0);
    e.jcc(CC_NE, stop);
}

/// To `moved` when the VM's code epoch moved since this vCPU last looked
/// (`Cpu::sync_epoch` would move its own). Uses RCX.
fn vm_epoch_moved(e: &mut Emit, moved: Label) {
    e.load64(RCX, R12, offset_of!(Ctx, code_epoch) as i32);
    e.load64(RCX, RCX, 0);
    e.cmp_mem(RCX, RBX, cpu_field(offset_of!(Cpu, seen_epoch)));
    e.jcc(CC_NE, moved);
}

/// The chain stub found jump-cache entry `link` for RIP, but checked at an older code epoch
/// (or the VM's epoch moved): catch up with the VM's epoch and, when only I/O exits moved it
/// since and the VMM has not written the block's page (RIP's execute-TLB entry is `entry`),
/// stamp the entry with the current epoch, as `BlockCache::revalidate` stamps the block
/// without comparing its bytes. Nonzero: the entry is good now. Called from the chain stub.
extern "sysv64" fn relink(ctx: *mut Ctx, link: *mut Link, entry: *const TlbEntry) -> u64 {
    // SAFETY: the chain stub passes the context `run` built on its stack (its `cpu` is the
    // vCPU `run` was given, which nothing else touches during the call), an entry of the
    // jump cache `run` was given mutably, and the entry of RIP in the vCPU's TLB.
    let (ctx, link, entry) = unsafe { (&mut *ctx, &mut *link, &*entry) };
    // SAFETY: as above: `cpu` is the vCPU `run` was given.
    let cpu = unsafe { &mut *ctx.cpu };
    cpu.sync_epoch();
    if link.epoch == cpu.epoch {
        return 1;
    }
    let code = cpu.mmu.code();
    let code_idx = entry.code as usize;
    if link.epoch < cpu.hard_floor || code.logging() {
        return 0;
    }
    // A page found clean at this epoch stayed so: a store into it (which clears its flag)
    // would have moved the epoch.
    let seen = Clean {
        page: code_idx as u64,
        epoch: cpu.epoch,
    };
    let Some(memo) = ctx.clean.get_mut(code_idx % CLEAN) else {
        return 0;
    };
    if *memo != seen {
        code.set(code_idx);
        if code.vmm_bit_set(code_idx) {
            return 0;
        }
        *memo = seen;
    }
    link.epoch = cpu.epoch;
    1
}

/// Take the ops in register `r` back from the instruction count: ops of a block that ended
/// early, which the block loop counted as retired when it was entered.
fn uncount(e: &mut Emit, r: u8) {
    e.sub_to_mem(RBX, cpu_field(offset_of!(Cpu, icount)), r);
}

/// A block's end with RIP set: go on to the next translated block through the chain stub at
/// `stub` when it can, else return `exit` to the block loop. `skipped`: ops of the block that
/// did not run (the block loop counted them as retired; it takes them back on a return).
/// With `fast`, first the exit's memo: when it names the target's jump-cache entry, checked at
/// this epoch and for this physical page, and neither the budget, the attention flag nor the
/// VM's code epoch stops it, the exit does what the stub would, without it. The block's
/// mapping cannot have changed (translated ops only), so the target's page (the block's own)
/// needs no look in the TLB.
fn chain_or_return(
    e: &mut Emit,
    stub: usize,
    exit: u64,
    skipped: i32,
    done: Label,
    fast: Option<Fast>,
) {
    let ctx = |f: usize| f as i32;
    let link = ctx;
    if let Some(f) = fast {
        let slow = e.label();
        if f.target != RSI {
            e.mov_rr(true, RSI, f.target);
        }
        e.mov_imm(RAX, f.memo);
        e.load64(RAX, RAX, 0);
        e.cmp_mem(RSI, RAX, link(offset_of!(Link, rip)));
        e.jcc(CC_NE, slow);
        e.load64(RCX, RBX, cpu_field(offset_of!(Cpu, epoch)));
        e.cmp_mem(RCX, RAX, link(offset_of!(Link, epoch)));
        e.jcc(CC_NE, slow);
        e.mov_imm(RCX, f.phys);
        e.cmp_mem(RCX, RAX, link(offset_of!(Link, phys)));
        e.jcc(CC_NE, slow);
        vm_epoch_moved(e, slow);
        budget_spent_or_attention(e, slow);
        // Go, as the stub does; the target's bytes are `off` after the block's.
        move_on(e, skipped);
        e.alu_mem_imm32(ADD, RBX, cpu_field(offset_of!(Cpu, blk_host)), f.off);
        e.jmp_mem(RAX, link(offset_of!(Link, code)));
        e.bind(slow);
    }
    call_stub(e, stub, fast.map(|f| f.memo));
    let back = e.label();
    e.jcc(CC_E, back);
    if skipped != 0 {
        e.mov_imm(RDX, skipped as u64);
        uncount(e, RDX);
    }
    e.jmp_r(RAX);
    e.bind(back);
    e.mov_imm(RAX, exit);
    e.jmp(done);
}

/// Host code for `ops` (classified as `kinds`); a block that runs to its end goes on through
/// the chain stub (its shorter entry when every op is translated).
/// `memos`: where exits to fixed targets in the block's page get their memos, and the
/// jump-cache entry a new memo names (`None`: every exit goes through the stub).
fn assemble(
    ops: &[Op],
    kinds: &[Option<Kind>],
    stub: Stub,
    at_page: Place,
    mut memos: Option<(&mut Memos, u64)>,
) -> Option<Vec<u8>> {
    let mut e = Emit::new();
    let native = kinds.iter().all(|k| k.is_some());
    let stub = if native { stub.native } else { stub.full };
    // The fast exit to `off` bytes after the block's start (RIP in register `target`): for
    // blocks of translated ops only, to a target in the block's page.
    let mut fast = |off: u64, target: u8| {
        if !native || !at_page.holds(off) {
            return None;
        }
        let (m, first) = memos.as_mut()?;
        Some(Fast {
            memo: m.take(*first)?,
            target,
            off: off as i64 as i32,
            phys: at_page.phys_page,
        })
    };
    prologue(&mut e);
    let mut exits: Vec<(Label, u64)> = Vec::new();
    // Taken Jccs: (entry, bail, op index, offset, end, displacement).
    let mut jumps: Vec<(Label, Label, usize, u32, u32, u64)> = Vec::new();
    // Handler calls that did not go on: (label, op index, offset).
    let mut ended: Vec<(Label, usize, u32)> = Vec::new();
    // Taken fused compare-and-branch ops: (entry, bail, op index, offset, end, displacement,
    // operation, size).
    #[allow(clippy::type_complexity)]
    let mut taken: Vec<(Label, Label, usize, u32, u32, u64, u8, u8)> = Vec::new();
    let done = e.label();
    let mut end = 0u32;
    // The last op was translated and is not a branch: RIP goes after it at the end.
    let mut last_native = false;
    // Ops after this one that a run of PUSHes or POPs already did.
    let mut covered = 0;
    for (k, (op, kind)) in ops.iter().zip(kinds).enumerate() {
        let at = end;
        end += op.len as u32;
        last_native = kind.is_some_and(|k| !k.branches());
        if covered > 0 {
            covered -= 1;
            continue;
        }
        let Some(kind) = *kind else {
            e.mov_imm(RSI, op as *const Op as u64);
            e.lea(RDX, R13, end as i32);
            call_with_ctx(&mut e, call_op as *const () as u64);
            e.test32(RAX, RAX);
            let stop = e.label();
            e.jcc(CC_NE, stop);
            ended.push((stop, k, at));
            continue;
        };
        let bail = e.label();
        let mut can_bail = true;
        match kind {
            Kind::Nop => can_bail = false,
            Kind::MovRR(s) => {
                load_sized(&mut e, RAX, RBX, reg_disp(op.r2, s), s);
                set_gpr(&mut e, op.r1, RAX, s);
                can_bail = false;
            }
            Kind::MovRI(s) => {
                e.mov_imm(RAX, op.imm & flags::mask(s));
                set_gpr(&mut e, op.r1, RAX, s);
                can_bail = false;
            }
            Kind::MovRM(s) => {
                linear_address(&mut e, op, end);
                tlb_fast_path(&mut e, s, false, bail);
                load_sized(&mut e, RAX, RAX, 0, s);
                set_gpr(&mut e, op.r1, RAX, s);
            }
            Kind::MovMR(s) => {
                linear_address(&mut e, op, end);
                tlb_fast_path(&mut e, s, true, bail);
                load_sized(&mut e, RCX, RBX, reg_disp(op.r1, s), s);
                store_sized(&mut e, RAX, 0, RCX, s);
            }
            Kind::Lea => {
                effective_address(&mut e, op, end);
                e.store64(RBX, gpr_disp(op.r1), RAX);
                can_bail = false;
            }
            Kind::Push => match stack_run(ops, kinds, k, Kind::Push) {
                n @ 1.. => {
                    push_run(&mut e, &ops[k..k + n], bail);
                    covered = n - 1;
                }
                0 => {
                    // PUSH RSP: the value first, it pushes the old RSP.
                    e.load64(R15, RBX, gpr_disp(op.r1));
                    push_r15(&mut e, bail);
                }
            },
            Kind::Alu { op: o, s, form, nf }
            | Kind::Carry {
                op: o, s, form, nf, ..
            } => {
                let to_mem = matches!(form, alu::MR | alu::MI);
                let b = op.imm & flags::mask(s);
                // ADC/SBB whose carry in is not in the host's CF: `Cpu::flags` gets the
                // guest's CF (before the operands: the call clobbers them), then the host's.
                let freeze = matches!(kind, Kind::Carry { host_cf: false, .. });
                if freeze {
                    call_with_ctx(&mut e, freeze_cf as *const () as u64);
                }
                operands(&mut e, op, s, form, b, end, to_mem && alu::writes(o), bail);
                if freeze {
                    e.bt_mem_imm(false, 0, 8, RBX, cpu_field(offset_of!(Cpu, flags)), 0);
                }
                let fop = compute(&mut e, o, s);
                if !nf {
                    record_lazy(&mut e, fop, s);
                }
                match (alu::writes(o), to_mem) {
                    (false, _) => {}
                    (true, false) => set_gpr(&mut e, op.r1, RDX, s),
                    (true, true) => store_sized(&mut e, R15, 0, RDX, s),
                }
                can_bail = form != alu::RR && form != alu::RI;
            }
            Kind::MovMI(s) => {
                linear_address(&mut e, op, end);
                tlb_fast_path(&mut e, s, true, bail);
                e.mov_imm(RCX, op.imm & flags::mask(s));
                store_sized(&mut e, RAX, 0, RCX, s);
            }
            Kind::Lea32 => {
                effective_address(&mut e, op, end);
                e.mov_rr(false, RAX, RAX);
                e.store64(RBX, gpr_disp(op.r1), RAX);
                can_bail = false;
            }
            Kind::Shift {
                k,
                s,
                count,
                flags,
                cl,
            } => {
                load_sized(&mut e, RAX, RBX, reg_disp(op.r2, s), s);
                if flags && k == shift::SHR {
                    // The value before, for SHR's OF.
                    e.mov_rr(true, RDX, RAX);
                }
                let host = match k {
                    shift::SHL => SHL,
                    shift::SHR => SHR,
                    shift::ROL => ROL,
                    shift::ROR => ROR,
                    _ => SAR,
                };
                if cl {
                    // The host masks the count as the guest does (flags are dead).
                    e.load64(RCX, RBX, gpr_disp(GUEST_RCX as u8));
                    e.shift_cl(host, s == 8, RAX);
                } else if count != 0 {
                    if s == 8 {
                        e.shift(host, RAX, count);
                    } else {
                        e.shift32(host, RAX, count);
                    }
                    if flags {
                        shift_flags(&mut e, k, s);
                    }
                }
                // A 32-bit result (or a zero count) zero-extends.
                if s == 4 {
                    e.mov_rr(false, RAX, RAX);
                }
                e.store64(RBX, gpr_disp(op.r2), RAX);
                can_bail = false;
            }
            Kind::CmpJcc { op: o, s, form } => {
                let b = op.imm as u32 as i32 as i64 as u64 & flags::mask(s);
                operands(&mut e, op, s, form, b, end, false, bail);
                // The host's flags are the guest's. A taken branch goes to code after the
                // block's end that finishes the op there.
                alu_sized(&mut e, o, s, RAX, RCX);
                let to = e.label();
                e.jcc(op.ext & 15, to);
                record_compare(&mut e, o, s);
                let disp = (op.imm >> 32) as u32 as i32 as i64 as u64;
                taken.push((to, bail, k, at, end, disp, o, s));
            }
            Kind::Movx { d, s, signed, mem } => {
                load_rm(&mut e, op, RAX, s, mem, end, bail);
                if signed && s < 8 {
                    e.shift(SHL, RAX, 64 - 8 * s);
                    e.shift(SAR, RAX, 64 - 8 * s);
                }
                if d == 4 {
                    e.mov_rr(false, RAX, RAX);
                }
                e.store64(RBX, gpr_disp(op.r1), RAX);
                can_bail = mem;
            }
            Kind::Call => {
                // Return address in R15, target in RSI (checked canonical), new RSP in RBP.
                e.lea(R15, R13, end as i32);
                branch_target(&mut e, at_page, RSI, end, op.imm, bail);
                push_r15(&mut e, bail);
                set_rip(&mut e, RSI);
            }
            Kind::Ret => {
                pop_to(&mut e, RSI, bail);
                canonical_or(&mut e, RSI, bail);
                e.alu_imm(ADD, true, RBP, 8 + (op.imm as u16) as i32);
                e.store64(RBX, gpr_disp(GUEST_RSP as u8), RBP);
                set_rip(&mut e, RSI);
            }
            Kind::Jmp => {
                branch_target(&mut e, at_page, RSI, end, op.imm, bail);
                set_rip(&mut e, RSI);
            }
            Kind::Bt {
                k,
                s,
                mem,
                imm,
                lock,
            } => {
                let bit = (op.imm & (s as u64 * 8 - 1)) as u8;
                if mem {
                    linear_address(&mut e, op, end);
                    tlb_fast_path(&mut e, s, k != 0, bail);
                    e.mov_rr(true, R15, RAX);
                    e.mov_imm(RDX, 0);
                    e.bt_mem_imm(lock, k, s, R15, 0, bit);
                } else {
                    load_sized(&mut e, RAX, RBX, gpr_disp(op.r2), s);
                    e.mov_imm(RDX, 0);
                    if imm {
                        e.bt_imm(k, s, RAX, bit);
                    } else {
                        e.load64(RCX, RBX, gpr_disp(op.r1));
                        e.bt_rr(k, s, RAX, RCX);
                    }
                    if k != 0 {
                        // A 4-byte result zero-extends (the host's did).
                        set_gpr(&mut e, op.r2, RAX, s);
                    }
                }
                // CF to the vCPU (the other flags as they were), then back into the host's.
                e.setcc(2, RDX);
                e.mov_rr(true, RBP, RDX);
                e.mov_rr(true, RSI, RDX);
                call_with_ctx(&mut e, set_cf as *const () as u64);
                e.bt_imm(0, 8, RBP, 0);
                can_bail = mem;
            }
            Kind::Imul { s, mem, imm } => {
                load_rm(&mut e, op, RCX, s, mem, end, bail);
                if imm {
                    // The immediate is sign-extended to the operand size by the decoder.
                    if s == 8 {
                        e.imul_imm(RAX, RCX, op.imm as i32);
                    } else {
                        e.imul_imm32(RAX, RCX, op.imm as i32);
                    }
                } else {
                    load_sized(&mut e, RAX, RBX, gpr_disp(op.r1), s);
                    e.imul_rr(s == 8, RAX, RCX);
                }
                e.store64(RBX, gpr_disp(op.r1), RAX);
                multiply_flags(&mut e, s);
                can_bail = mem;
            }
            Kind::Mul1 { s, mem, signed } => {
                load_rm(&mut e, op, RCX, s, mem, end, bail);
                load_sized(&mut e, RAX, RBX, gpr_disp(GUEST_RAX as u8), s);
                // 4-byte halves zero-extend, as `Cpu::set_reg` writes them.
                e.mul1(signed, s == 8, RCX);
                e.store64(RBX, gpr_disp(GUEST_RAX as u8), RAX);
                e.store64(RBX, gpr_disp(GUEST_RDX as u8), RDX);
                multiply_flags(&mut e, s);
                can_bail = mem;
            }
            Kind::CallR | Kind::JmpR => {
                // The target first (a non-canonical one is the interpreter's #GP), then the
                // return address pushed.
                e.load64(RSI, RBX, gpr_disp(op.r2));
                canonical_or(&mut e, RSI, bail);
                if kind == Kind::CallR {
                    e.lea(R15, R13, end as i32);
                    push_r15(&mut e, bail);
                }
                set_rip(&mut e, RSI);
            }
            Kind::Widen(s) | Kind::SignFill(s) => {
                // The accumulator's low half (CBW ...) or all of it (CWD ...), sign-extended.
                let from = if matches!(kind, Kind::Widen(_)) {
                    s / 2
                } else {
                    s
                };
                load_sized(&mut e, RAX, RBX, gpr_disp(GUEST_RAX as u8), from);
                e.shift(SHL, RAX, 64 - 8 * from);
                e.shift(SAR, RAX, 64 - 8 * from);
                let dst = if matches!(kind, Kind::Widen(_)) {
                    GUEST_RAX
                } else {
                    e.shift(SAR, RAX, 63);
                    GUEST_RDX
                };
                if s == 4 {
                    e.mov_rr(false, RAX, RAX);
                }
                set_gpr(&mut e, dst as u8, RAX, s);
                can_bail = false;
            }
            Kind::Cmov(s) => {
                // The flags of the ALU op just before: see `Jit::translate`. A 4-byte CMOVcc
                // zero-extends its destination either way.
                load_sized(&mut e, RAX, RBX, reg_disp(op.r1, s), s);
                load_sized(&mut e, RCX, RBX, reg_disp(op.r2, s), s);
                e.cmov(op.ext & 15, s == 8, RAX, RCX);
                e.store64(RBX, gpr_disp(op.r1), RAX);
                can_bail = false;
            }
            Kind::Jcc => {
                // The flags of the ALU op just before: see `Jit::translate`.
                let to = e.label();
                e.jcc(op.ext & 15, to);
                jumps.push((to, bail, k, at, end, op.imm));
            }
            Kind::Setcc => {
                // The flags of an op before: see `Jit::translate`.
                e.setcc(op.ext & 15, RAX);
                set_gpr(&mut e, op.r2, RAX, 1);
                can_bail = false;
            }
            Kind::Unary {
                op: o,
                s,
                mem,
                nf,
                lock,
            } => {
                unary(&mut e, op, o, s, mem, nf, lock, end, bail);
                can_bail = mem;
            }
            Kind::LockAlu { op: o, s, form } => {
                let b = op.imm & flags::mask(s);
                operands(&mut e, op, s, form, b, end, true, bail);
                // RAX = the value in memory, RCX = the operand: replace RAX by the result
                // unless another vCPU changed it first (then RAX holds its value: again).
                let again = e.label();
                e.bind(again);
                let fop = compute(&mut e, o, s);
                e.lock_cmpxchg(s, R15, 0, RDX);
                e.jcc(CC_NE, again);
                // The host's flags of the operation that took effect.
                compute(&mut e, o, s);
                record_lazy(&mut e, fop, s);
            }
            Kind::Cmpxchg(s) => {
                linear_address(&mut e, op, end);
                tlb_fast_path(&mut e, s, true, bail);
                e.mov_rr(true, R15, RAX);
                load_sized(&mut e, RCX, RBX, reg_disp(op.r1, s), s);
                load_sized(&mut e, RAX, RBX, gpr_disp(GUEST_RAX as u8), s);
                e.mov_rr(true, RSI, RAX);
                e.lock_cmpxchg(s, R15, 0, RCX);
                // RAX = the value found (the accumulator when they matched, which stays).
                let same = e.label();
                e.jcc(CC_E, same);
                set_gpr(&mut e, GUEST_RAX as u8, RAX, s);
                e.bind(same);
                // Flags as CMP accumulator, value found (the host's compare).
                e.mov_rr(true, RDX, RSI);
                alu_sized(&mut e, alu::SUB, s, RDX, RAX);
                record_lazy_from(&mut e, flags::SUB, s, RDX, RSI, RAX);
            }
            Kind::Xadd(s) => {
                linear_address(&mut e, op, end);
                tlb_fast_path(&mut e, s, true, bail);
                e.mov_rr(true, R15, RAX);
                load_sized(&mut e, RCX, RBX, reg_disp(op.r1, s), s);
                e.mov_rr(true, RDX, RCX);
                e.lock_xadd(s, R15, 0, RDX);
                // RDX = the old value: to the register; flags of old + operand.
                set_gpr(&mut e, op.r1, RDX, s);
                e.mov_rr(true, RAX, RDX);
                alu_sized(&mut e, alu::ADD, s, RAX, RCX);
                record_lazy_from(&mut e, flags::ADD, s, RAX, RDX, RCX);
            }
            Kind::Pop => match stack_run(ops, kinds, k, Kind::Pop) {
                n @ 1.. => {
                    pop_run(&mut e, &ops[k..k + n], bail);
                    covered = n - 1;
                }
                0 => {
                    // POP RSP: RSP moved on first, then loaded with the popped value.
                    pop_to(&mut e, R15, bail);
                    e.alu_imm(ADD, true, RBP, 8);
                    e.store64(RBX, gpr_disp(GUEST_RSP as u8), RBP);
                    e.store64(RBX, gpr_disp(op.r1), R15);
                }
            },
        }
        if can_bail {
            exits.push((bail, exit_value(BAIL, k, at)));
        } else {
            e.bind(bail);
        }
    }
    // Every op ran. A block that ends with a translated op leaves RIP after it (one that ends
    // with a handler call had RIP set by the handler).
    if last_native {
        e.lea(RAX, R13, end as i32);
        set_rip(&mut e, RAX);
    }
    let to = match (ops.last(), kinds.last()) {
        _ if last_native => fast(end as u64, RAX),
        (Some(op), Some(Some(Kind::Jmp | Kind::Call))) => {
            fast((end as u64).wrapping_add(op.imm), RSI)
        }
        _ => None,
    };
    chain_or_return(&mut e, stub, DONE, 0, done, to);
    for (l, v) in exits {
        e.bind(l);
        e.mov_imm(RAX, v);
        e.jmp(done);
    }
    if !ended.is_empty() {
        // A handler call that did not go on: RBP = its exit as a taken branch, R15 = the ops
        // after it. STOP returns the handler's result; ENDED chains, as the block loop would
        // go on (then the skipped ops are taken back from the count).
        let common = e.label();
        for (l, k, at) in ended {
            e.bind(l);
            e.mov_imm(RBP, exit_value(TAKEN, k, at));
            e.mov_imm(R15, (ops.len() - k - 1) as u64);
            e.jmp(common);
        }
        e.bind(common);
        let (result, back) = (e.label(), e.label());
        e.alu_imm(CMP, false, RAX, ENDED as i32);
        e.jcc(CC_NE, result);
        call_stub(&mut e, stub, None);
        e.jcc(CC_E, back);
        uncount(&mut e, R15);
        e.jmp_r(RAX);
        e.bind(back);
        e.mov_rr(true, RAX, RBP);
        e.jmp(done);
        e.bind(result);
        // The same op and offset, as a handler result.
        e.mov_imm(RCX, (TAKEN - RESULT) << 32);
        e.mov_rr(true, RAX, RBP);
        e.alu_rr(alu::SUB, true, RAX, RCX);
        e.jmp(done);
    }
    for (to, bail, k, at, end, disp) in jumps {
        // The target first (a non-canonical one faults at the Jcc, interpreted), then RIP.
        e.bind(to);
        branch_target(&mut e, at_page, R10, end, disp, bail);
        set_rip(&mut e, R10);
        let skipped = (ops.len() - k - 1) as i32;
        let to = fast((end as u64).wrapping_add(disp), R10);
        chain_or_return(&mut e, stub, exit_value(TAKEN, k, at), skipped, done, to);
    }
    for (to, bail, k, at, end, disp, o, s) in taken {
        // The target first (a non-canonical one faults at the Jcc: the interpreter's), with
        // the operands kept; then the flags, then RIP.
        e.bind(to);
        e.mov_rr(true, R11, RCX);
        branch_target(&mut e, at_page, R10, end, disp, bail);
        e.mov_rr(true, RCX, R11);
        record_compare(&mut e, o, s);
        set_rip(&mut e, R10);
        let skipped = (ops.len() - k - 1) as i32;
        let to = fast((end as u64).wrapping_add(disp), R10);
        chain_or_return(&mut e, stub, exit_value(TAKEN, k, at), skipped, done, to);
    }
    e.bind(done);
    epilogue(&mut e);
    e.finish()
}

/// Run translated block `code` (built for `x.cpu`'s mode) starting at RIP `rip`, and the
/// translated blocks it chains to (`links`: the jump cache of the vCPU's [`Jit`]).
pub fn run(x: &mut Exec<'_>, code: usize, rip: u64, chain: Chain<'_>, links: &mut [Link]) -> Ran {
    let cpu: &mut Cpu = x.cpu;
    let user = cpu.tlb_user as u64;
    let code_epoch: *const AtomicU64 = &cpu.vm.code_epoch;
    let tlb = cpu.mmu.tlb[cpu.tlb_user & 1].as_ptr();
    let (code_flags, code_len) = cpu.mmu.code().flags_raw();
    let logging = cpu.mmu.code().logging_flag();
    let cpu: *mut Cpu = cpu;
    let mut ctx = Ctx {
        exec: x as *mut Exec<'_> as *mut c_void,
        cpu,
        tlb,
        code_flags,
        code_len: code_len as u64,
        fused: 0,
        out: None,
        attention: chain.attention,
        code_epoch,
        user,
        links: links.as_mut_ptr(),
        budget: chain.budget as u64,
        link: std::ptr::null(),
        memo_sink: 0,
        clean: [Clean::default(); CLEAN],
        logging,
    };
    // SAFETY: `code` is the entry of a block `Jit::translate` assembled into the arena with the
    // System V calling convention; it only touches the context and what its pointers reach
    // (this vCPU's `Cpu`, its TLB, the code flags, the jump cache, and guest RAM through TLB
    // entries), and calls back into `call_op` with the context.
    let ret = unsafe {
        let f: extern "sysv64" fn(*mut Ctx, u64) -> u64 = std::mem::transmute(code);
        f(&mut ctx, rip)
    };
    x.cpu.icount += ctx.fused;
    let (k, at) = ((ret & 0xffff) as usize, ret >> 16 & 0xffff);
    let exit = match ret >> 32 {
        DONE => Exit::Done,
        BAIL => Exit::Bail { k, at },
        TAKEN => Exit::Result {
            k,
            at,
            r: Err(Exc::Stop),
        },
        _ => Exit::Result {
            k,
            at,
            r: ctx.out.take().unwrap_or(Ok(())),
        },
    };
    // The block that ran last: the one the stub chained to last, found again in the jump
    // cache by the entry's address (nothing is read through the pointer).
    let last = (ctx.link as usize)
        .checked_sub(links.as_ptr() as usize)
        .map(|d| d / std::mem::size_of::<Link>())
        .and_then(|i| links.get(i))
        .filter(|_| !ctx.link.is_null());
    Ran {
        exit,
        block: last.map_or(chain.block, |l| l.block as u32),
        start: last.map_or(rip, |l| l.rip),
        budget: ctx.budget as u32,
        chained: (chain.budget as u64).saturating_sub(ctx.budget),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::decode;
    use iced_x86::{Decoder, DecoderOptions};

    /// The op the decoder makes of `bytes` (64-bit code).
    fn op(bytes: &[u8]) -> Op {
        op_flags(bytes, true)
    }

    /// The same, `need_flags` saying whether its flags are read later (`op` assumes they are).
    fn op_flags(bytes: &[u8], need_flags: bool) -> Op {
        let i = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE).decode();
        decode::translate(&i, 64, need_flags).0
    }

    /// A direct branch whose target stays in the block's page needs no canonical check (the
    /// block's RIP is canonical); one that leaves the page does.
    #[test]
    fn only_branches_out_of_the_page_check_the_target_is_canonical() {
        let sars = |page_off: u32, bytes: &[u8]| {
            let ops = [op(bytes)];
            let kinds: Vec<_> = ops.iter().map(kind).collect();
            let code = assemble(
                &ops,
                &kinds,
                Stub::default(),
                Place {
                    page_off,
                    phys_page: 0,
                },
                None,
            )
            .unwrap();
            let mut d = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE);
            d.iter()
                .filter(|i| i.mnemonic() == iced_x86::Mnemonic::Sar)
                .count()
        };
        // JMP rel32 +0x20 (5 bytes): the target is 0x25 bytes after the block's start.
        let jmp = [0xe9, 0x20, 0, 0, 0];
        assert_eq!(sars(0, &jmp), 0, "in the page");
        assert_eq!(sars(0xfd0, &jmp), 0, "near the page's end");
        assert_eq!(sars(0xfdb, &jmp), 1, "the next page");
        // JMP rel32 -0x10: before the page.
        let back = [0xe9, 0xf0, 0xff, 0xff, 0xff];
        assert_eq!(sars(0x100, &back), 0);
        assert_eq!(sars(0x8, &back), 1);
    }

    /// The jump cache keeps the two RIPs of a set seen last; refreshing one keeps the other.
    #[test]
    fn the_jump_cache_holds_two_rips_per_set() {
        let pool = Arc::new(Pool::new(1 << 20, 1).unwrap());
        let mut jit = Jit::new(&pool).unwrap();
        let (a, b, c) = (0x1000u64, 0x1001u64, 0x400_1000u64);
        assert!(link_slot(a) == link_slot(b) && link_slot(b) == link_slot(c));
        let i = link_slot(a);
        let set = |jit: &mut Jit| {
            let l = jit.links();
            (l[i].rip, l[i + 1].rip)
        };
        jit.remember(a, 0, 1, 0, 1, 1, 1);
        jit.remember(b, 0, 1, 0, 2, 1, 1);
        assert_eq!(set(&mut jit), (b, a));
        jit.remember(a, 0, 2, 0, 1, 1, 1);
        assert_eq!(set(&mut jit), (a, b));
        jit.remember(a, 0, 3, 0, 1, 1, 1);
        assert_eq!(set(&mut jit), (a, b), "a refresh keeps the other RIP");
        jit.remember(c, 0, 3, 0, 3, 1, 1);
        assert_eq!(set(&mut jit), (c, a));
    }

    #[test]
    fn a_full_arena_says_so_until_it_is_reset() {
        let pool = Arc::new(Pool::new(8192, 1).unwrap());
        let mut jit = Jit::new(&pool).unwrap();
        assert!(Jit::new(&pool).is_none(), "one slice");
        let block = [
            op(&[0x48, 0x89, 0xd8]),
            op(&[0x48, 0x01, 0xd8]),
            op(&[0xc3]),
        ];
        let mut n = 0;
        while jit.translate(&block, Place::default()).is_some() {
            n += 1;
            assert!(n < 1000, "an 8 KiB arena fills up");
        }
        assert!(n > 0 && jit.full);
        jit.reset();
        assert!(!jit.full);
        assert!(
            jit.translate(&block, Place::default()).is_some(),
            "room again after a reset"
        );
    }

    #[test]
    fn the_decoder_names_what_the_jit_translates() {
        assert_eq!(kind(&op(&[0xe9, 0, 0, 0, 0])), Some(Kind::Jmp));
        assert_eq!(kind(&op(&[0xe8, 0, 0, 0, 0])), Some(Kind::Call));
        assert_eq!(kind(&op(&[0xc3])), Some(Kind::Ret));
        // JNE rel8 and CMOVNE eax, ecx (translated only after an ALU op that recorded its
        // flags); not CMOVNE eax, [rcx].
        assert_eq!(kind(&op(&[0x75, 0x10])), Some(Kind::Jcc));
        assert_eq!(kind(&op(&[0x0f, 0x45, 0xc1])), Some(Kind::Cmov(4)));
        assert_eq!(kind(&op(&[0x0f, 0x45, 0x01])), None);
        assert_eq!(kind(&op(&[0x53])), Some(Kind::Push));
        assert_eq!(kind(&op(&[0x5b])), Some(Kind::Pop));
        assert_eq!(kind(&op(&[0x48, 0x89, 0xd8])), Some(Kind::MovRR(8)));
        assert_eq!(kind(&op(&[0x8b, 0x47, 0x08])), Some(Kind::MovRM(4)));
        assert_eq!(kind(&op(&[0x0f, 0x1f, 0x44, 0, 0])), Some(Kind::Nop));
        let add = Kind::Alu {
            op: alu::ADD,
            s: 8,
            form: alu::RR,
            nf: false,
        };
        assert_eq!(kind(&op(&[0x48, 0x01, 0xd8])), Some(add));
        let movzx = Kind::Movx {
            d: 4,
            s: 1,
            signed: false,
            mem: true,
        };
        assert_eq!(kind(&op(&[0x0f, 0xb6, 0x07])), Some(movzx));
        let shr = Kind::Shift {
            k: shift::SHR,
            s: 8,
            count: 3,
            flags: false,
            cl: false,
        };
        // SHR rax, 3 as the decoder makes it when a later instruction overwrites the flags.
        assert_eq!(kind(&op_flags(&[0x48, 0xc1, 0xe8, 3], false)), Some(shr));
        // ALU to memory: ADD [rax], ecx and ADD DWORD [rax], 5.
        let add_mem = |form| Kind::Alu {
            op: alu::ADD,
            s: 4,
            form,
            nf: false,
        };
        assert_eq!(kind(&op(&[0x01, 0x08])), Some(add_mem(alu::MR)));
        assert_eq!(kind(&op(&[0x83, 0x00, 0x05])), Some(add_mem(alu::MI)));
        // GS-relative: the base is added at run time.
        assert_eq!(kind(&op(&[0x65, 0x48, 0x8b, 0x07])), Some(Kind::MovRM(8)));
        // Byte and word forms, AH too: MOV al, bl; TEST ah, 1; ADD WORD [rdi], 5.
        assert_eq!(kind(&op(&[0x88, 0xd8])), Some(Kind::MovRR(1)));
        let test_ah = Kind::Alu {
            op: alu::TEST,
            s: 1,
            form: alu::RI,
            nf: false,
        };
        assert_eq!(kind(&op(&[0xf6, 0xc4, 0x01])), Some(test_ah));
        let add16 = Kind::Alu {
            op: alu::ADD,
            s: 2,
            form: alu::MI,
            nf: false,
        };
        assert_eq!(kind(&op(&[0x66, 0x83, 0x07, 0x05])), Some(add16));
        // Atomics: LOCK ADD [rdi], rax; LOCK CMPXCHG [rdi], ecx; LOCK XADD [rdi], rax.
        let lock_add = Kind::LockAlu {
            op: alu::ADD,
            s: 8,
            form: alu::MR,
        };
        assert_eq!(kind(&op(&[0xf0, 0x48, 0x01, 0x07])), Some(lock_add));
        assert_eq!(kind(&op(&[0xf0, 0x0f, 0xb1, 0x0f])), Some(Kind::Cmpxchg(4)));
        assert_eq!(
            kind(&op(&[0xf0, 0x48, 0x0f, 0xc1, 0x07])),
            Some(Kind::Xadd(8))
        );
        // SETE al, CDQE, CALL rax, JMP rcx.
        assert_eq!(kind(&op(&[0x0f, 0x94, 0xc0])), Some(Kind::Setcc));
        assert_eq!(kind(&op(&[0x48, 0x98])), Some(Kind::Widen(8)));
        assert_eq!(kind(&op(&[0xff, 0xd0])), Some(Kind::CallR));
        assert_eq!(kind(&op(&[0xff, 0xe1])), Some(Kind::JmpR));
        // SHR rax, cl only with the flags dead.
        let shr_cl = Kind::Shift {
            k: shift::SHR,
            s: 8,
            count: 0,
            flags: false,
            cl: true,
        };
        assert_eq!(kind(&op_flags(&[0x48, 0xd3, 0xe8], false)), Some(shr_cl));
        assert_eq!(kind(&op(&[0x48, 0xd3, 0xe8])), None);
        // BTS DWORD [rdi], 5 and BT rax, rcx; not BT [rdi], rcx (a bit string).
        let bts = Kind::Bt {
            k: 1,
            s: 4,
            mem: true,
            imm: true,
            lock: false,
        };
        assert_eq!(kind(&op(&[0x0f, 0xba, 0x2f, 0x05])), Some(bts));
        let bt = Kind::Bt {
            k: 0,
            s: 8,
            mem: false,
            imm: false,
            lock: false,
        };
        assert_eq!(kind(&op(&[0x48, 0x0f, 0xa3, 0xc8])), Some(bt));
        assert_eq!(kind(&op(&[0x48, 0x0f, 0xa3, 0x0f])), None);
        // IMUL eax, [rdi] and IMUL rax, rcx, 100.
        let imul = |s, mem, imm| Kind::Imul { s, mem, imm };
        assert_eq!(kind(&op(&[0x0f, 0xaf, 0x07])), Some(imul(4, true, false)));
        assert_eq!(
            kind(&op(&[0x48, 0x69, 0xc1, 100, 0, 0, 0])),
            Some(imul(8, false, true))
        );
        // MUL QWORD [rdi] and IMUL ecx.
        let mul1 = |s, mem, signed| Kind::Mul1 { s, mem, signed };
        assert_eq!(kind(&op(&[0x48, 0xf7, 0x27])), Some(mul1(8, true, false)));
        assert_eq!(kind(&op(&[0xf7, 0xe9])), Some(mul1(4, false, true)));
        // ADC rax, rbx (the carry's source is decided by `Jit::translate`).
        let adc = Kind::Carry {
            op: alu::ADC,
            s: 8,
            form: alu::RR,
            nf: false,
            host_cf: false,
        };
        assert_eq!(kind(&op(&[0x48, 0x11, 0xd8])), Some(adc));
        // ROR eax, 7 only with the flags dead; RCL never.
        let ror = Kind::Shift {
            k: shift::ROR,
            s: 4,
            count: 7,
            flags: false,
            cl: false,
        };
        assert_eq!(kind(&op_flags(&[0xc1, 0xc8, 7], false)), Some(ror));
        assert_eq!(kind(&op(&[0xc1, 0xc8, 7])), None);
        assert_eq!(kind(&op_flags(&[0xc1, 0xd0, 7], false)), None);
        // Not translated: a GS-relative load with 32-bit addressing.
        assert_eq!(kind(&op(&[0x65, 0x67, 0x48, 0x8b, 0x07])), None);
    }
}
