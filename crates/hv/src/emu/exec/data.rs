//! Data movement: MOV, MOVZX, MOVSX/MOVSXD, LEA, CMOVcc, SETcc, BSWAP, CBW/CWDE/CDQE,
//! CWD/CDQ/CQO, LAHF/SAHF, CLC/STC/CMC/CLD/STD, XLAT, NOP (Intel SDM Vol. 2).

use super::alu::{MI, MR, RI, RM, RR};
use super::{Exec, Op};
use crate::emu::cpu::{R, RAX, RBX, RDX};
use crate::emu::flags::{self, mask, sext, AF, CF, DF, PF, SF, ZF};

/// MOV in form `FORM` with operand size `S`.
pub fn mov<const S: u8, const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    match FORM {
        RR => {
            let v = x.cpu.reg(op.r2, S);
            x.cpu.set_reg(op.r1, S, v);
        }
        RM => {
            let lin = x.lin(op);
            let v = x.read(lin, S)?;
            x.cpu.set_reg(op.r1, S, v);
        }
        MR => {
            let lin = x.lin(op);
            let v = x.cpu.reg(op.r1, S);
            x.write(lin, S, v)?;
        }
        RI => x.cpu.set_reg(op.r1, S, op.imm),
        _ => {
            debug_assert_eq!(FORM, MI);
            let lin = x.lin(op);
            x.write(lin, S, op.imm & mask(S))?;
        }
    }
    Ok(())
}

/// MOVZX / MOVSX / MOVSXD: destination size `D`, source size `S`.
pub fn movx<const D: u8, const S: u8, const SIGNED: bool, const MEM: bool>(
    x: &mut Exec<'_>,
    op: &Op,
) -> R {
    let v = if MEM {
        let lin = x.lin(op);
        x.read(lin, S)?
    } else {
        x.cpu.reg(op.r2, S)
    };
    let v = if SIGNED { sext(v, S) as u64 } else { v };
    x.cpu.set_reg(op.r1, D, v & mask(D));
    Ok(())
}

/// LEA: the effective address, truncated or zero-extended to the operand size.
pub fn lea<const S: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let ea = x.ea(op);
    x.cpu.set_reg(op.r1, S, ea & mask(S));
    Ok(())
}

/// CMOVcc: the source is read (and may fault) whatever the condition; a 32-bit destination is
/// zero-extended even when the condition is false.
pub fn cmov(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let v = x.rm_read(op, s)?;
    if x.cpu.cond(op.ext) {
        x.cpu.set_reg(op.r1, s, v);
    } else if s == 4 {
        let cur = x.cpu.reg(op.r1, 4);
        x.cpu.set_reg(op.r1, 4, cur);
    }
    Ok(())
}

/// SETcc r/m8.
pub fn setcc(x: &mut Exec<'_>, op: &Op) -> R {
    let v = x.cpu.cond(op.ext) as u64;
    x.rm_write(op, 1, v)
}

/// BSWAP r32/r64; with a 16-bit operand the result is undefined (zero here, as on hardware).
pub fn bswap(x: &mut Exec<'_>, op: &Op) -> R {
    let v = x.cpu.reg(op.r1, op.size);
    let r = match op.size {
        8 => v.swap_bytes(),
        4 => (v as u32).swap_bytes() as u64,
        _ => 0,
    };
    x.cpu.set_reg(op.r1, op.size, r);
    Ok(())
}

/// CBW / CWDE / CDQE: sign-extend the low half of the accumulator into all of it.
pub fn cbw(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let half = s / 2;
    let v = sext(x.cpu.reg(RAX as u8, half), half) as u64;
    x.cpu.set_reg(RAX as u8, s, v & mask(s));
    Ok(())
}

/// CWD / CDQ / CQO: sign of the accumulator into RDX.
pub fn cwd(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let v = x.cpu.reg(RAX as u8, s);
    let fill = if sext(v, s) < 0 { mask(s) } else { 0 };
    x.cpu.set_reg(RDX as u8, s, fill);
    Ok(())
}

/// LAHF: AH = SF:ZF:0:AF:0:PF:1:CF.
pub fn lahf(x: &mut Exec<'_>, _op: &Op) -> R {
    let f = x.cpu.rflags() & (SF | ZF | AF | PF | CF | flags::FIXED1);
    x.cpu.set_reg(16, 1, f);
    Ok(())
}

/// SAHF: SF, ZF, AF, PF, CF from AH.
pub fn sahf(x: &mut Exec<'_>, _op: &Op) -> R {
    let ah = x.cpu.reg(16, 1);
    x.cpu.set_arith(SF | ZF | AF | PF | CF, ah);
    Ok(())
}

/// CLC (ext 0), STC (1), CMC (2).
pub fn carry_op(x: &mut Exec<'_>, op: &Op) -> R {
    let cf = match op.ext {
        0 => 0,
        1 => CF,
        _ => (!x.cpu.cf()) as u64,
    };
    x.cpu.set_arith(CF, cf);
    Ok(())
}

/// CLD (ext 0) / STD (ext 1).
pub fn dir_op(x: &mut Exec<'_>, op: &Op) -> R {
    if op.ext == 0 {
        x.cpu.flags &= !DF;
    } else {
        x.cpu.flags |= DF;
    }
    Ok(())
}

/// XLAT: AL = [seg:rBX + AL].
pub fn xlat(x: &mut Exec<'_>, op: &Op) -> R {
    let ea = x.cpu.gpr[RBX].wrapping_add(x.cpu.gpr[RAX] & 0xff) & mask(op.asize);
    let lin = x.seg_lin(op.seg, ea);
    let v = x.read(lin, 1)?;
    x.cpu.set_reg(RAX as u8, 1, v);
    Ok(())
}

/// NOP, ENDBR64, hint NOPs, prefetches.
pub fn nop(_x: &mut Exec<'_>, _op: &Op) -> R {
    Ok(())
}

/// PAUSE: a spin-wait hint. Every 64th one yields the host thread, so a vCPU spinning on a
/// lock held by a descheduled vCPU gives it the core.
pub fn pause(x: &mut Exec<'_>, _op: &Op) -> R {
    x.cpu.pauses = x.cpu.pauses.wrapping_add(1);
    if x.cpu.pauses.is_multiple_of(64) {
        std::thread::yield_now();
    }
    Ok(())
}

/// MFENCE / LFENCE / SFENCE: order this CPU's guest memory accesses on the host too.
pub fn fence(_x: &mut Exec<'_>, _op: &Op) -> R {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}
