//! Stack instructions: PUSH, POP, PUSHF, POPF, ENTER, LEAVE, PUSHA, POPA (Intel SDM Vol. 2B).

use super::{Exec, Op};
use crate::emu::cpu::{R, RBP, RSP};
use crate::emu::flags::{mask, AC, ARITH, DF, ID, IF, IOPL, NT, RF, TF, VM};

/// PUSH reg.
pub fn push_r(x: &mut Exec<'_>, op: &Op) -> R {
    let v = x.cpu.reg(op.r1, op.size);
    x.push(v, op.size)
}

/// PUSH reg in 64-bit mode with a 64-bit operand (the flat 64-bit stack: no mask, no segment
/// base), the common case spelled out.
pub fn push_r64(x: &mut Exec<'_>, op: &Op) -> R {
    push64(x, x.cpu.gpr[op.r1 as usize & 15])
}

/// Push `v` on the flat 64-bit stack; RSP moves only if the write succeeds.
#[inline(always)]
pub fn push64(x: &mut Exec<'_>, v: u64) -> R {
    let sp = x.cpu.gpr[RSP].wrapping_sub(8);
    x.write(sp, 8, v)?;
    x.cpu.gpr[RSP] = sp;
    Ok(())
}

/// POP reg in 64-bit mode with a 64-bit operand (POP RSP loads the popped value).
pub fn pop_r64(x: &mut Exec<'_>, op: &Op) -> R {
    let sp = x.cpu.gpr[RSP];
    let v = x.read(sp, 8)?;
    x.cpu.gpr[RSP] = sp.wrapping_add(8);
    x.cpu.gpr[op.r1 as usize & 15] = v;
    Ok(())
}

/// PUSH r/m (memory form).
pub fn push_m(x: &mut Exec<'_>, op: &Op) -> R {
    let lin = x.lin(op);
    let v = x.read(lin, op.size)?;
    x.push(v, op.size)
}

/// PUSH imm (sign-extended by the decoder).
pub fn push_i(x: &mut Exec<'_>, op: &Op) -> R {
    x.push(op.imm & mask(op.size), op.size)
}

/// POP reg (POP RSP loads the popped value).
pub fn pop_r(x: &mut Exec<'_>, op: &Op) -> R {
    let v = x.pop(op.size)?;
    x.cpu.set_reg(op.r1, op.size, v);
    Ok(())
}

/// POP r/m: the address is computed with the incremented RSP (SDM "POP").
pub fn pop_m(x: &mut Exec<'_>, op: &Op) -> R {
    let v = x.peek(0, op.size)?;
    let old = x.cpu.gpr[RSP];
    let m = x.cpu.sp_mask;
    x.cpu.add_masked(RSP, op.size as u64, m);
    let lin = x.lin(op);
    if let Err(e) = x.write(lin, op.size, v) {
        x.cpu.gpr[RSP] = old;
        return Err(e);
    }
    Ok(())
}

/// PUSHF/PUSHFD/PUSHFQ: VM and RF read as 0.
pub fn pushf(x: &mut Exec<'_>, op: &Op) -> R {
    let f = x.cpu.rflags() & !(VM | RF);
    x.push(f & mask(op.size), op.size)
}

/// POPF/POPFD/POPFQ with the privilege rules of SDM Vol. 2B "POPF" (no virtual-8086 mode).
pub fn popf(x: &mut Exec<'_>, op: &Op) -> R {
    let v = x.pop(op.size)?;
    let mut changeable = ARITH | TF | DF | NT | AC | ID | IF | IOPL;
    if x.cpu.protected() {
        if x.cpu.cpl > 0 {
            changeable &= !IOPL;
        }
        if x.cpu.cpl > x.cpu.iopl() {
            changeable &= !IF;
        }
    }
    changeable &= mask(op.size);
    let old = x.cpu.rflags();
    let new = ((old & !changeable) | (v & changeable)) & !RF;
    x.cpu.set_rflags(new);
    Err(crate::emu::cpu::Exc::Stop)
}

/// LEAVE: RSP = RBP; POP RBP.
pub fn leave(x: &mut Exec<'_>, op: &Op) -> R {
    let m = x.cpu.sp_mask;
    let sp = x.cpu.gpr[RBP] & m;
    let lin = x.stack_lin(sp);
    let v = x.read(lin, op.size)?;
    x.cpu.gpr[RSP] = (x.cpu.gpr[RSP] & !m) | (sp.wrapping_add(op.size as u64) & m);
    x.cpu.set_reg(RBP as u8, op.size, v);
    Ok(())
}

/// ENTER imm16, imm8 (SDM Vol. 2A "ENTER"): `imm` is the frame size, `ext` the nesting level.
pub fn enter(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let level = op.ext & 31;
    let saved_rsp = x.cpu.gpr[RSP];
    let saved_rbp = x.cpu.gpr[RBP];
    let result = (|| -> R {
        let rbp = x.cpu.reg(RBP as u8, s);
        x.push(rbp, s)?;
        let frame = x.cpu.gpr[RSP] & x.cpu.sp_mask;
        let mut bp = saved_rbp;
        for _ in 1..level {
            bp = bp.wrapping_sub(s as u64);
            let lin = x.stack_lin(bp & x.cpu.sp_mask);
            let v = x.read(lin, s)?;
            x.push(v, s)?;
        }
        if level > 0 {
            x.push(frame, s)?;
        }
        // Touch the bottom of the new frame so a fault happens now, as on hardware.
        let m = x.cpu.sp_mask;
        let new_sp = x.cpu.gpr[RSP].wrapping_sub(op.imm & 0xffff) & m;
        if op.imm & 0xffff != 0 {
            let lin = x.stack_lin(new_sp);
            x.read(lin, 1)?;
        }
        x.cpu.set_reg(RBP as u8, s, frame);
        x.cpu.gpr[RSP] = (x.cpu.gpr[RSP] & !m) | new_sp;
        Ok(())
    })();
    if result.is_err() {
        x.cpu.gpr[RSP] = saved_rsp;
        x.cpu.gpr[RBP] = saved_rbp;
    }
    result
}

/// PUSHA/PUSHAD (16/32-bit code only).
pub fn pusha(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let saved = x.cpu.gpr[RSP];
    let sp = x.cpu.reg(RSP as u8, s);
    for r in 0..8u8 {
        let v = if r as usize == RSP {
            sp
        } else {
            x.cpu.reg(r, s)
        };
        if let Err(e) = x.push(v, s) {
            x.cpu.gpr[RSP] = saved;
            return Err(e);
        }
    }
    Ok(())
}

/// POPA/POPAD (16/32-bit code only): the saved SP is skipped.
pub fn popa(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let mut vals = [0u64; 8];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = x.peek((i as u64) * s as u64, s)?;
    }
    for (i, v) in vals.iter().enumerate() {
        let r = 7 - i as u8;
        if r as usize != RSP {
            x.cpu.set_reg(r, s, *v);
        }
    }
    let m = x.cpu.sp_mask;
    x.cpu.add_masked(RSP, 8 * s as u64, m);
    Ok(())
}
