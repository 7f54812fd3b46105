//! Near control transfers: JMP, Jcc, CALL, RET, LOOP/LOOPE/LOOPNE, JCXZ/JECXZ/JRCXZ
//! (Intel SDM Vol. 2). Relative targets are `RIP after the instruction + imm`, truncated to the
//! operand size (`Exec::jump`).

use super::{Exec, Op};
use crate::emu::cpu::{gp0, Cpu, Exc, R, RCX, RSP};
use crate::emu::flags::mask;

/// JMP rel.
pub fn jmp_rel(x: &mut Exec<'_>, op: &Op) -> R {
    let t = x.cpu.rip.wrapping_add(op.imm);
    x.jump(t, op.size)
}

/// Jcc rel: `ext` is the condition code. Taken, it ends the block (`Exc::Stop`): the ops
/// after it in the block are its fall-through path.
pub fn jcc(x: &mut Exec<'_>, op: &Op) -> R {
    if x.cpu.cond(op.ext) {
        let t = x.cpu.rip.wrapping_add(op.imm);
        x.jump(t, op.size)?;
        return Err(Exc::Stop);
    }
    Ok(())
}

/// JMP r/m.
pub fn jmp_rm(x: &mut Exec<'_>, op: &Op) -> R {
    let t = x.rm_read(op, op.size)?;
    x.jump(t, op.size)
}

/// CALL rel.
pub fn call_rel(x: &mut Exec<'_>, op: &Op) -> R {
    let ret = x.cpu.rip;
    let t = ret.wrapping_add(op.imm) & call_mask(x, op);
    check_target(x, t)?;
    x.push(ret, op.size)?;
    x.cpu.rip = t;
    Ok(())
}

/// CALL rel in 64-bit mode (64-bit operand, flat stack).
pub fn call_rel64(x: &mut Exec<'_>, op: &Op) -> R {
    let ret = x.cpu.rip;
    let t = ret.wrapping_add(op.imm);
    if !Cpu::canonical(t) {
        return Err(gp0());
    }
    super::stack::push64(x, ret)?;
    x.cpu.rip = t;
    Ok(())
}

/// RET (near, optional imm16) in 64-bit mode with a 64-bit operand.
pub fn ret64(x: &mut Exec<'_>, op: &Op) -> R {
    let sp = x.cpu.gpr[RSP];
    let t = x.read(sp, 8)?;
    if !Cpu::canonical(t) {
        return Err(gp0());
    }
    x.cpu.gpr[RSP] = sp.wrapping_add(8).wrapping_add(op.imm);
    x.cpu.rip = t;
    Ok(())
}

/// CALL r/m.
pub fn call_rm(x: &mut Exec<'_>, op: &Op) -> R {
    let ret = x.cpu.rip;
    let t = x.rm_read(op, op.size)?;
    check_target(x, t)?;
    x.push(ret, op.size)?;
    x.cpu.rip = t & call_mask(x, op);
    Ok(())
}

/// RET / RET imm16 (`imm` is the number of extra bytes to release).
pub fn ret(x: &mut Exec<'_>, op: &Op) -> R {
    let t = x.peek(0, op.size)?;
    check_target(x, t)?;
    let m = x.cpu.sp_mask;
    x.cpu
        .add_masked(RSP, (op.size as u64).wrapping_add(op.imm), m);
    x.cpu.rip = t;
    Ok(())
}

/// LOOP (ext 0), LOOPE (1), LOOPNE (2), JrCXZ (3); the counter width is the address size.
pub fn loop_op(x: &mut Exec<'_>, op: &Op) -> R {
    let m = mask(op.asize);
    let taken = if op.ext == 3 {
        x.cpu.gpr[RCX] & m == 0
    } else {
        x.cpu.add_masked(RCX, u64::MAX, m);
        let nz = x.cpu.gpr[RCX] & m != 0;
        match op.ext {
            0 => nz,
            1 => nz && x.cpu.cond(4),
            _ => nz && x.cpu.cond(5),
        }
    };
    if taken {
        let t = x.cpu.rip.wrapping_add(op.imm);
        return x.jump(t, op.size);
    }
    Ok(())
}

#[inline(always)]
fn call_mask(x: &Exec<'_>, op: &Op) -> u64 {
    if x.cpu.bitness == 64 {
        u64::MAX
    } else {
        mask(op.size)
    }
}

#[inline(always)]
fn check_target(x: &Exec<'_>, t: u64) -> R {
    if x.cpu.bitness == 64 && !crate::emu::cpu::Cpu::canonical(t) {
        return Err(crate::emu::cpu::gp0());
    }
    Ok(())
}
