//! Executing decoded ops: the pre-resolved op form, the execution context, operand helpers and
//! the block loop. One module per instruction family.

pub mod alu;
pub mod atomic;
pub mod bits;
pub mod branch;
pub mod data;
pub mod fpu;
pub mod fxsave;
pub mod muldiv;
pub mod rcp_table;
pub mod shift;
pub mod simd;
pub mod simd_move;
pub mod softfloat;
pub mod sse;
pub mod stack;
pub mod string;
pub mod system;
pub mod x87;
pub mod x87_math;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::block::{block_key, BlockCache, NO_BLOCK};
use super::cpu::*;
use super::flags::TF;
use super::interrupt::{self, Event};
use super::jit;
use super::mmu::{tlb_index, Access, Target, PAGE_MASK, PAGE_SIZE};
use crate::IoHandler;

/// An op handler: executes one pre-decoded instruction. RIP already points after it.
pub type Handler = fn(&mut Exec<'_>, &Op) -> R;

/// `Op::base` / `Op::index`: no register.
pub const NOREG: u8 = 0xff;
/// `Op::base`: RIP-relative (RIP after the instruction).
pub const RIPREG: u8 = 16;
/// `Op::seg`: no segment base applies (64-bit mode, not FS/GS).
pub const SEG_NONE: u8 = 0xff;

/// `Op::flags` bits.
pub const F_MEM: u8 = 1;
pub const F_REP: u8 = 2;
pub const F_REPNE: u8 = 4;
pub const F_LOCK: u8 = 8;
/// The count of a shift comes from CL (otherwise from `imm`).
pub const F_CL: u8 = 16;
/// The handler leaves the flags alone: the block's later instructions overwrite every flag it
/// would write before anything can look at them (`decode::flags_needed`).
pub const F_NF: u8 = 32;
/// Two instructions in one op (CMP/TEST and the Jcc after it, `decode::fuse_cmp_jcc`): a
/// single step or an interrupt shadow runs the first one alone, decoded again.
pub const F_FUSED: u8 = 64;
/// The memory operand is flat: 64-bit mode, 64-bit address size, no segment base (not FS or
/// GS). [`Exec::lin`] then skips the truncation and segment steps.
pub const F_FLAT: u8 = 128;

/// One decoded instruction in the compact internal form. Built once per block from iced's
/// `Instruction` (see `decode.rs`); executing it never looks at iced again. Position-dependent
/// values are stored relative to the next instruction (branch displacements in `imm`, RIP-
/// relative displacements in `disp`), so a block is valid at any linear address its physical
/// page is mapped at.
#[derive(Clone, Copy)]
pub struct Op {
    pub h: Handler,
    /// Immediate, branch displacement, or a second immediate packed by the decoder.
    pub imm: u64,
    /// Memory displacement (wrapping).
    pub disp: u64,
    /// Instruction length in bytes.
    pub len: u8,
    /// Operand size in bytes (1, 2, 4, 8).
    pub size: u8,
    /// First register operand (ModRM.reg or the destination); 16-19 are AH/CH/DH/BH.
    pub r1: u8,
    /// Second register operand (ModRM.rm when it is a register).
    pub r2: u8,
    /// Memory operand: base register, `NOREG` or `RIPREG`.
    pub base: u8,
    /// Memory operand: index register or `NOREG`.
    pub index: u8,
    /// Memory operand: log2 of the scale.
    pub scale: u8,
    /// Memory operand: segment register, or `SEG_NONE`.
    pub seg: u8,
    /// Address size in bytes (2, 4, 8).
    pub asize: u8,
    /// Family-specific: condition code, sub-operation, ...
    pub ext: u8,
    /// `F_*` bits.
    pub flags: u8,
    /// Second operand size (source of MOVZX/MOVSX, ...).
    pub size2: u8,
    /// What the JIT may translate the op as (`tag::*`; `tag::NONE`: a call of `h`), set by
    /// the decoder where it picks `h`.
    pub jit: u8,
    /// The tag's detail (`tag::*` says how it is packed).
    pub jarg: u8,
}

/// `Op::jit` tags: the handler families the JIT knows, named by the decoder (function
/// addresses cannot name them: a handler may have a copy per codegen unit).
pub mod tag {
    pub const NONE: u8 = 0;
    /// MOV; `jarg` = form (`alu::RR` ...), size in `Op::size`.
    pub const MOV: u8 = 1;
    /// LEA; size in `Op::size`.
    pub const LEA: u8 = 2;
    /// PUSH r64 / POP r64 in 64-bit mode.
    pub const PUSH: u8 = 3;
    pub const POP: u8 = 4;
    /// Binary ALU op without LOCK; `jarg` = operation << 4 | form.
    pub const ALU: u8 = 5;
    /// Fused CMP/TEST + Jcc; `jarg` = operation << 4 | form.
    pub const CMP_JCC: u8 = 6;
    /// MOVZX/MOVSX/MOVSXD; `jarg` = source size | 0x10 (signed) | 0x20 (memory source),
    /// destination size in `Op::size`.
    pub const MOVX: u8 = 7;
    /// CALL rel / RET / JMP rel in 64-bit mode.
    pub const CALL: u8 = 8;
    pub const RET: u8 = 9;
    pub const JMP: u8 = 10;
    /// Does nothing (NOP, ENDBR64, prefetch, a CMP/TEST whose flags are dead).
    pub const NOP: u8 = 11;
    /// A shift or rotate of a register by an immediate count or CL (`F_CL`; flags dead with
    /// `F_NF`); `jarg` = `shift::ROL` ... `shift::SAR`.
    pub const SHIFT: u8 = 12;
    /// Jcc rel in 64-bit mode (condition in `Op::ext`).
    pub const JCC: u8 = 13;
    /// CMOVcc between registers in 64-bit mode (condition in `Op::ext`).
    pub const CMOV: u8 = 14;
    /// INC/DEC/NOT/NEG of a register or memory in 64-bit mode, LOCK too (flags dead with
    /// `F_NF`); `jarg` = `alu::INC` ...
    pub const UNARY: u8 = 15;
    /// SETcc of a register in 64-bit mode (condition in `Op::ext`).
    pub const SETCC: u8 = 16;
    /// LOCK ADD/OR/AND/SUB/XOR with a memory destination in 64-bit mode; `jarg` as `ALU`.
    pub const LOCK_ALU: u8 = 17;
    /// CMPXCHG / XADD with a memory destination in 64-bit mode (LOCK or not: both run
    /// atomically).
    pub const CMPXCHG: u8 = 18;
    pub const XADD: u8 = 19;
    /// CBW/CWDE/CDQE and CWD/CDQ/CQO; the size in `Op::size`.
    pub const CBW: u8 = 20;
    pub const CWD: u8 = 21;
    /// CALL / JMP through a 64-bit register (`Op::r2`) in 64-bit mode.
    pub const CALL_R: u8 = 22;
    pub const JMP_R: u8 = 23;
    /// BT/BTS/BTR/BTC of a register (by an immediate or a register) or of memory by an
    /// immediate, in 64-bit mode; `Op::ext` as `bits::bt` reads it.
    pub const BT: u8 = 24;
    /// IMUL r, r/m (`Op::ext` 2) and IMUL r, r/m, imm (3) in 64-bit mode.
    pub const IMUL: u8 = 25;
    /// MUL r/m (`Op::ext` 0) and IMUL r/m (1): RDX:RAX = RAX * r/m, in 64-bit mode.
    pub const MUL1: u8 = 26;
}

impl Op {
    /// An op that runs `h` with everything else zero.
    pub fn new(h: Handler, len: u8) -> Op {
        Op {
            h,
            imm: 0,
            disp: 0,
            len,
            size: 0,
            r1: 0,
            r2: 0,
            base: NOREG,
            index: NOREG,
            scale: 0,
            seg: SEG_NONE,
            asize: 8,
            ext: 0,
            flags: 0,
            size2: 0,
            jit: tag::NONE,
            jarg: 0,
        }
    }

    #[inline(always)]
    pub fn is_mem(&self) -> bool {
        self.flags & F_MEM != 0
    }
}

/// The execution context of one vCPU while it runs: its state plus where I/O goes.
pub struct Exec<'a> {
    pub cpu: &'a mut Cpu,
    pub io: &'a dyn IoHandler,
}

impl Exec<'_> {
    /// Base + scaled index + displacement of the memory operand, not yet truncated to the
    /// address size.
    #[inline(always)]
    fn ea_untruncated(&self, op: &Op) -> u64 {
        let c = &*self.cpu;
        let mut a = op.disp;
        if let Some(b) = c.gpr.get(op.base as usize) {
            a = a.wrapping_add(*b);
        } else if op.base == RIPREG {
            a = a.wrapping_add(c.rip);
        }
        if let Some(i) = c.gpr.get(op.index as usize) {
            a = a.wrapping_add(*i << (op.scale & 3));
        }
        a
    }

    /// Effective address of the memory operand (SDM Vol. 1 §3.7.5), truncated to the address
    /// size.
    #[inline(always)]
    pub fn ea(&self, op: &Op) -> u64 {
        let a = self.ea_untruncated(op);
        match op.asize {
            8 => a,
            4 => a & 0xffff_ffff,
            _ => a & 0xffff,
        }
    }

    /// Linear address of `ea` in segment `seg`.
    #[inline(always)]
    pub fn seg_lin(&self, seg: u8, ea: u64) -> u64 {
        if seg == SEG_NONE {
            ea
        } else {
            self.cpu.seg[seg as usize % 6].base.wrapping_add(ea) & self.cpu.lin_mask
        }
    }

    /// Linear address of the memory operand.
    #[inline(always)]
    pub fn lin(&self, op: &Op) -> u64 {
        if op.flags & F_FLAT != 0 {
            return self.ea_untruncated(op);
        }
        let ea = self.ea(op);
        self.seg_lin(op.seg, ea)
    }

    /// Read the r/m operand.
    #[inline(always)]
    pub fn rm_read(&mut self, op: &Op, size: u8) -> R<u64> {
        if op.is_mem() {
            let lin = self.lin(op);
            self.read(lin, size)
        } else {
            Ok(self.cpu.reg(op.r2, size))
        }
    }

    /// Write the r/m operand.
    #[inline(always)]
    pub fn rm_write(&mut self, op: &Op, size: u8, v: u64) -> R {
        if op.is_mem() {
            let lin = self.lin(op);
            self.write(lin, size, v)
        } else {
            self.cpu.set_reg(op.r2, size, v);
            Ok(())
        }
    }

    /// Linear address of stack offset `sp` (already masked to the stack width).
    #[inline(always)]
    pub fn stack_lin(&self, sp: u64) -> u64 {
        if self.cpu.bitness == 64 {
            sp
        } else {
            self.cpu.seg[SS].base.wrapping_add(sp) & 0xffff_ffff
        }
    }

    /// PUSH `size` bytes (SDM Vol. 2B "PUSH"); RSP changes only if the write succeeds.
    #[inline(always)]
    pub fn push(&mut self, v: u64, size: u8) -> R {
        let m = self.cpu.sp_mask;
        let sp = self.cpu.gpr[RSP].wrapping_sub(size as u64) & m;
        let lin = self.stack_lin(sp);
        self.write(lin, size, v)?;
        self.cpu.gpr[RSP] = (self.cpu.gpr[RSP] & !m) | sp;
        Ok(())
    }

    /// Read the stack `offset` bytes above RSP without popping.
    #[inline(always)]
    pub fn peek(&mut self, offset: u64, size: u8) -> R<u64> {
        let m = self.cpu.sp_mask;
        let sp = self.cpu.gpr[RSP].wrapping_add(offset) & m;
        let lin = self.stack_lin(sp);
        self.read(lin, size)
    }

    /// POP `size` bytes.
    #[inline(always)]
    pub fn pop(&mut self, size: u8) -> R<u64> {
        let v = self.peek(0, size)?;
        let m = self.cpu.sp_mask;
        self.cpu.add_masked(RSP, size as u64, m);
        Ok(v)
    }

    /// Set RIP to a branch target with operand size `size`; in 64-bit mode a non-canonical
    /// target faults on the branch (#GP(0)), elsewhere the target is truncated to the size.
    #[inline(always)]
    pub fn jump(&mut self, target: u64, size: u8) -> R {
        if self.cpu.bitness == 64 {
            if !Cpu::canonical(target) {
                return Err(gp0());
            }
            self.cpu.rip = target;
        } else {
            self.cpu.rip = target & if size == 2 { 0xffff } else { 0xffff_ffff };
        }
        Ok(())
    }
}

/// Why the block loop stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// Events need to be looked at (a kick, an interrupt, a timer).
    Attention,
    /// The CPU executed HLT.
    Halt,
    /// Triple fault.
    Shutdown,
    /// Something the emulator cannot continue from.
    Failure(String),
}

/// Blocks between two looks at the clock for timer deadlines.
const TIME_CHECK_BLOCKS: u32 = 2048;

/// Run blocks until something needs the caller's attention.
pub fn run_blocks(x: &mut Exec<'_>, cache: &mut BlockCache, attention: &AtomicBool) -> Stop {
    let mut budget = TIME_CHECK_BLOCKS;
    // The block that ran last (its successor links are looked at first).
    let mut prev = NO_BLOCK;
    loop {
        if (x.cpu.poll || attention.load(Ordering::Relaxed)) && !x.cpu.shadow {
            return Stop::Attention;
        }
        budget -= 1;
        if budget == 0 {
            budget = TIME_CHECK_BLOCKS;
            if time_check(x) {
                continue;
            }
        }
        x.cpu.sync_epoch();

        // The fast path: RIP's page is in the execute TLB and its block in the index, checked
        // at the current epoch.
        let rip = x.cpu.rip;
        let lin = if x.cpu.bitness == 64 {
            rip
        } else {
            x.cpu.seg[CS].base.wrapping_add(rip) & 0xffff_ffff
        };
        let user = x.cpu.cpl == 3;
        let e = &x.cpu.mmu.tlb[user as usize][tlb_index(lin)];
        let host = e.addend.wrapping_add(lin as usize);
        let key = block_key(e.phys | (lin & 0xfff), x.cpu.bitness);
        let tlb_hit = e.tag_x == lin & PAGE_MASK;
        let hit = if tlb_hit {
            match cache.find_after(prev, key, x.cpu.epoch) {
                Ok(b) => Some(b),
                // The page is translated for execution: only the block's bytes need a look
                // (the epoch moved, or the block left the index).
                Err(b) => {
                    let code_idx = e.code as usize;
                    let (epoch, floor) = (x.cpu.epoch, x.cpu.hard_floor);
                    cache.revalidate(key, b, (epoch, floor), host, x.cpu.mmu.code(), code_idx)
                }
            }
        } else {
            None
        };
        let (mut b, host) = match hit {
            Some(b) => (b, host),
            None => match find_slow(x, cache, rip, lin, tlb_hit) {
                Ok(found) => found,
                Err(Some(stop)) => return stop,
                Err(None) => {
                    prev = NO_BLOCK;
                    continue;
                }
            },
        };
        prev = b;

        // TF only changes through instructions that end a block, so it is constant here. With
        // TF or an interrupt shadow, one instruction runs.
        let tf = x.cpu.flags & TF != 0;
        let single = x.cpu.shadow || tf;
        // Translated code runs whole blocks only.
        let native = if single {
            None
        } else {
            cache.native(b, rip, x.cpu.epoch)
        };
        let (ops, byte_len) = cache.get(b);
        let mut ops = if single {
            x.cpu.shadow = false;
            if ops
                .first()
                .is_some_and(|op| op.flags & (F_NF | F_FUSED) != 0)
            {
                match cache.build_single(x, lin, host) {
                    Ok(b) => cache.get(b).0,
                    Err(e) => {
                        if let Some(s) = handle_exc(x, e, rip) {
                            return s;
                        }
                        continue;
                    }
                }
            } else {
                &ops[..ops.len().min(1)]
            }
        } else {
            ops
        };
        x.cpu.blk_host = host;
        x.cpu.blk_len = byte_len;
        x.cpu.icount += ops.len() as u64;
        let mut start = rip;
        // RIP after the op about to run: ops that move RIP elsewhere (taken branches, faults,
        // REP yields) end the block, so inside one it advances by each op's length.
        let mut next = rip;
        let mut faulted = false;
        // A translated block runs first, and the translated blocks it chains to; the last
        // may leave its tail to the loop below.
        let (mut from, mut done) = (0, None);
        if let Some(code) = native {
            let chain = jit::Chain {
                block: b,
                budget: budget - 1,
                attention,
            };
            let ran = jit::run(x, code, rip, chain, cache.links());
            budget = ran.budget + 1;
            x.cpu.jit_entered += 1;
            x.cpu.jit_chained += ran.chained;
            if ran.block != b {
                (b, prev, start) = (ran.block, ran.block, ran.start);
            }
            ops = cache.get(b).0;
            match ran.exit {
                jit::Exit::Done => from = ops.len(),
                jit::Exit::Bail { k, at } => (from, next) = (k, start.wrapping_add(at)),
                jit::Exit::Result { k, at, r } => {
                    (from, next, done) = (k, start.wrapping_add(at), Some(r));
                }
            }
        }
        for (i, op) in ops.iter().enumerate().skip(from) {
            start = next;
            next = start.wrapping_add(op.len as u64);
            let r = match done.take() {
                Some(r) => r,
                None => {
                    x.cpu.rip = next;
                    (op.h)(x, op)
                }
            };
            if r.is_ok() && !x.cpu.smc {
                debug_assert!(x.cpu.rip == next || i + 1 == ops.len());
                continue;
            }
            // The block ends early (a taken Jcc, a fault, a store into the block): its other
            // instructions did not run.
            x.cpu.icount -= (ops.len() - i - 1) as u64;
            x.cpu.smc = false;
            match r {
                Ok(()) | Err(Exc::Stop) => {}
                Err(e) => {
                    faulted = true;
                    if let Some(s) = handle_exc(x, e, start) {
                        x.cpu.blk_len = 0;
                        return s;
                    }
                }
            }
            break;
        }
        x.cpu.blk_len = 0;
        // Single-step trap after a completed instruction (SDM Vol. 3A §17.3.1.4); a REP
        // instruction that yielded (RIP back at its start) is not complete.
        if tf && !faulted && x.cpu.rip != start {
            x.cpu.dr[6] |= 1 << 14;
            if interrupt::deliver(x, Event::exception(DB, None)).is_err() {
                return Stop::Shutdown;
            }
        }
    }
}

/// Every [`TIME_CHECK_BLOCKS`] blocks: take a profile sample, look for device writes into
/// code pages (every `EPOCH_REFRESH`; the epoch moves on its own every `EPOCH_REFRESH_ALL`)
/// and look at the timer deadline. True when the timer is due.
#[cold]
#[inline(never)]
fn time_check(x: &mut Exec<'_>) -> bool {
    if let Some(p) = x.cpu.profile.as_mut() {
        p.sample(x.cpu.rip);
    }
    let now = Instant::now();
    if now >= x.cpu.epoch_refresh {
        x.cpu.epoch_refresh = now + EPOCH_REFRESH;
        if now >= x.cpu.epoch_refresh_all {
            x.cpu.epoch_refresh_all = now + EPOCH_REFRESH_ALL;
            x.cpu.refresh_epoch();
        } else {
            x.cpu.device_wrote_code();
        }
    }
    if x.cpu.deadline.is_some_and(|d| now >= d) {
        x.cpu.poll = true;
        return true;
    }
    false
}

/// The block at `rip` (linear `lin`) when the fast path missed: translate for execution,
/// check an old block's bytes or decode a new one. Returns the block and the host address of
/// its first byte; `Err(Some(stop))` ends the loop, `Err(None)` restarts it (an exception was
/// delivered). `checked`: the fast path already looked for an old block with the same
/// translation (and found none, or a stale one).
#[cold]
#[inline(never)]
fn find_slow(
    x: &mut Exec<'_>,
    cache: &mut BlockCache,
    rip: u64,
    lin: u64,
    checked: bool,
) -> Result<(u32, usize), Option<Stop>> {
    let user = x.cpu.cpl == 3;
    let host = match x.cpu.translate(lin, Access::Exec, user) {
        Ok(Target::Ram(h)) => h,
        Ok(Target::Io(pa)) => {
            return Err(Some(Stop::Failure(format!(
                "executing non-RAM address {pa:#x} (RIP {rip:#x})"
            ))))
        }
        Err(e) => return Err(handle_exc(x, e, rip)),
    };
    let e = &x.cpu.mmu.tlb[user as usize][tlb_index(lin)];
    let code_idx = e.code as usize;
    let key = block_key(e.phys | (lin & 0xfff), x.cpu.bitness);
    let (epoch, floor) = (x.cpu.epoch, x.cpu.hard_floor);
    if !checked {
        if let Some(b) = cache.revalidate(
            key,
            NO_BLOCK,
            (epoch, floor),
            host,
            x.cpu.mmu.code(),
            code_idx,
        ) {
            return Ok((b, host));
        }
    }
    match cache.build(x, key, lin, host, code_idx) {
        Ok(b) => Ok((b, host)),
        Err(e) => Err(handle_exc(x, e, rip)),
    }
}

/// Deal with a non-normal end of an instruction that started at `start`. Returns a stop
/// reason when the block loop must end.
pub fn handle_exc(x: &mut Exec<'_>, e: Exc, start: u64) -> Option<Stop> {
    match e {
        Exc::Fault { vector, code } => {
            x.cpu.rip = start;
            interrupt::deliver(x, Event::exception(vector, code.map(u32::from)))
                .err()
                .map(|_| Stop::Shutdown)
        }
        Exc::SoftInt { vector, kind } => {
            interrupt::deliver_from(x, Event::soft(vector, kind), Some(start))
                .err()
                .map(|_| Stop::Shutdown)
        }
        Exc::Halt => Some(Stop::Halt),
        Exc::Stop => None,
        Exc::Shutdown => Some(Stop::Shutdown),
    }
}

/// Fetch up to `out.len()` instruction bytes at linear `lin` for an instruction that crosses a
/// page boundary (both pages are translated for execution first).
pub fn fetch_cross(x: &mut Exec<'_>, lin: u64, out: &mut [u8]) -> R {
    let user = x.cpu.cpl == 3;
    let first = ((PAGE_SIZE - (lin & 0xfff)) as usize).min(out.len());
    let t1 = x.cpu.translate(lin, Access::Exec, user)?;
    let lin2 = lin.wrapping_add(first as u64) & x.cpu.lin_mask;
    let t2 = x.cpu.translate(lin2, Access::Exec, user)?;
    let (a, b) = out.split_at_mut(first);
    x.read_target(t1, a);
    x.read_target(t2, b);
    Ok(())
}
