//! Integer arithmetic and logic: ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST, INC, DEC, NOT,
//! NEG (Intel SDM Vol. 2). Flags are recorded lazily (see `flags.rs`). Handlers are
//! monomorphized over the operation, the operand size and the operand form, so the common
//! cases compile to a few loads and stores.
//!
//! A memory destination is written before any register or flag changes, so a fault on the
//! write leaves the CPU as it was before the instruction.

use super::{Exec, Op};
use crate::emu::cpu::{Cpu, Exc, R};
use crate::emu::flags::{self, mask, Lazy};

/// Binary operations, in the x86 `/digit` order of opcodes 80-83.
pub const ADD: u8 = 0;
pub const OR: u8 = 1;
pub const ADC: u8 = 2;
pub const SBB: u8 = 3;
pub const AND: u8 = 4;
pub const SUB: u8 = 5;
pub const XOR: u8 = 6;
pub const CMP: u8 = 7;
pub const TEST: u8 = 8;

/// Operand forms: destination first.
pub const RR: u8 = 0;
pub const RM: u8 = 1;
pub const MR: u8 = 2;
pub const RI: u8 = 3;
pub const MI: u8 = 4;

/// Unary operations.
pub const INC: u8 = 0;
pub const DEC: u8 = 1;
pub const NOT: u8 = 2;
pub const NEG: u8 = 3;

/// Result and flag record of binary operation `op` on `a` and `b` (`size` bytes).
#[inline(always)]
pub fn compute(cpu: &Cpu, op: u8, size: u8, a: u64, b: u64) -> (u64, Lazy) {
    let m = mask(size);
    let (res, fop) = match op {
        ADD => (a.wrapping_add(b) & m, flags::ADD),
        OR => (a | b, flags::LOGIC),
        ADC => (
            a.wrapping_add(b).wrapping_add(cpu.cf() as u64) & m,
            flags::ADC,
        ),
        SBB => (
            a.wrapping_sub(b).wrapping_sub(cpu.cf() as u64) & m,
            flags::SBB,
        ),
        AND | TEST => (a & b, flags::LOGIC),
        XOR => (a ^ b, flags::LOGIC),
        _ => (a.wrapping_sub(b) & m, flags::SUB),
    };
    (
        res,
        Lazy {
            op: fop,
            size,
            res,
            a,
            b,
        },
    )
}

/// Whether the operation writes its destination (CMP and TEST do not).
#[inline(always)]
pub const fn writes(op: u8) -> bool {
    op != CMP && op != TEST
}

/// `OP dst, src` for operand size `S` and form `FORM`.
pub fn alu<const OP: u8, const S: u8, const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let m = mask(S);
    match FORM {
        RR | RI | RM => {
            let a = x.cpu.reg(op.r1, S);
            let b = match FORM {
                RR => x.cpu.reg(op.r2, S),
                RI => op.imm & m,
                _ => {
                    let lin = x.lin(op);
                    x.read(lin, S)?
                }
            };
            let (r, l) = compute(x.cpu, OP, S, a, b);
            x.cpu.lazy = l;
            if writes(OP) {
                x.cpu.set_reg(op.r1, S, r);
            }
        }
        _ => {
            let lin = x.lin(op);
            let a = x.read(lin, S)?;
            let b = if FORM == MR {
                x.cpu.reg(op.r1, S)
            } else {
                op.imm & m
            };
            let (r, l) = compute(x.cpu, OP, S, a, b);
            if writes(OP) {
                x.write(lin, S, r)?;
            }
            x.cpu.lazy = l;
        }
    }
    Ok(())
}

/// CMP or TEST (`OP`) fused with the Jcc that follows it, in 64-bit mode
/// (`decode::fuse_cmp_jcc`): `imm` holds the immediate operand in its low 32 bits
/// (sign-extended like every CMP/TEST immediate) and the Jcc's displacement in its high 32
/// bits, `ext` the condition code, `size2` the Jcc's length. RIP is already past both.
pub fn cmp_jcc<const OP: u8, const S: u8, const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let m = mask(S);
    let imm = op.imm as u32 as i32 as i64 as u64 & m;
    let (a, b) = match FORM {
        RR => (x.cpu.reg(op.r1, S), x.cpu.reg(op.r2, S)),
        RI => (x.cpu.reg(op.r1, S), imm),
        RM => {
            let lin = x.lin(op);
            (x.cpu.reg(op.r1, S), x.read(lin, S)?)
        }
        MR => {
            let lin = x.lin(op);
            (x.read(lin, S)?, x.cpu.reg(op.r1, S))
        }
        _ => {
            let lin = x.lin(op);
            (x.read(lin, S)?, imm)
        }
    };
    let (_, l) = compute(x.cpu, OP, S, a, b);
    x.cpu.lazy = l;
    x.cpu.icount += 1;
    if x.cpu.cond(op.ext) {
        let t = x
            .cpu
            .rip
            .wrapping_add((op.imm >> 32) as u32 as i32 as i64 as u64);
        if !Cpu::canonical(t) {
            // The Jcc faults on its own (#GP with RIP at the Jcc): the next block starts
            // there, not fused.
            x.cpu.rip = x.cpu.rip.wrapping_sub(op.size2 as u64);
            return Err(Exc::Stop);
        }
        x.cpu.rip = t;
        // Taken: the rest of the block is the fall-through path.
        return Err(Exc::Stop);
    }
    Ok(())
}

/// `OP reg, src` (forms RR, RI, RM) when no flag it writes is ever looked at (the decoder's
/// flag liveness, `decode::flags_needed`): the result only. ADC and SBB still read CF; CMP and
/// TEST with a memory operand still read it (and may fault).
pub fn alu_nf<const OP: u8, const S: u8, const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let m = mask(S);
    let b = match FORM {
        RR => x.cpu.reg(op.r2, S),
        RI => op.imm & m,
        _ => {
            let lin = x.lin(op);
            x.read(lin, S)?
        }
    };
    if writes(OP) {
        let a = x.cpu.reg(op.r1, S);
        let r = match OP {
            ADD => a.wrapping_add(b),
            OR => a | b,
            ADC => a.wrapping_add(b).wrapping_add(x.cpu.cf() as u64),
            SBB => a.wrapping_sub(b).wrapping_sub(x.cpu.cf() as u64),
            AND => a & b,
            XOR => a ^ b,
            _ => a.wrapping_sub(b),
        };
        x.cpu.set_reg(op.r1, S, r & m);
    }
    Ok(())
}

/// Result and flag record of a unary operation. NOT leaves the flags alone (`None`).
#[inline(always)]
pub fn unary_compute(op: u8, size: u8, a: u64) -> (u64, Option<(u8, u64)>) {
    let m = mask(size);
    match op {
        INC => (a.wrapping_add(1) & m, Some((flags::INC, 1))),
        DEC => (a.wrapping_sub(1) & m, Some((flags::DEC, 1))),
        NOT => (!a & m, None),
        _ => (a.wrapping_neg() & m, Some((flags::SUB, a))),
    }
}

/// Apply the flag record of a unary op whose input was `a` and result `r`.
#[inline(always)]
pub fn unary_flags(cpu: &mut Cpu, op: u8, size: u8, a: u64, r: u64, f: Option<(u8, u64)>) {
    if let Some((fop, b)) = f {
        if op == NEG {
            cpu.set_lazy(fop, size, r, 0, b);
        } else {
            cpu.set_lazy(fop, size, r, a, b);
        }
    }
}

/// INC/DEC/NEG on a register when no flag they write is looked at (see [`alu_nf`]).
pub fn unary_nf<const OP: u8, const S: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let a = x.cpu.reg(op.r1, S);
    let (r, _) = unary_compute(OP, S, a);
    x.cpu.set_reg(op.r1, S, r);
    Ok(())
}

/// INC/DEC/NOT/NEG on a register (`MEM = false`) or memory.
pub fn unary<const OP: u8, const S: u8, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if MEM {
        let lin = x.lin(op);
        let a = x.read(lin, S)?;
        let (r, f) = unary_compute(OP, S, a);
        x.write(lin, S, r)?;
        unary_flags(x.cpu, OP, S, a, r, f);
    } else {
        let a = x.cpu.reg(op.r1, S);
        let (r, f) = unary_compute(OP, S, a);
        x.cpu.set_reg(op.r1, S, r);
        unary_flags(x.cpu, OP, S, a, r, f);
    }
    Ok(())
}
