//! Bit instructions: BT, BTS, BTR, BTC (Intel SDM Vol. 2A "BT"), BSF, BSR, POPCNT.
//!
//! With a register bit offset and a memory operand, BT* address a bit string: the offset is
//! signed and may reach outside the operand (SDM Vol. 1 §3.7.5 "bit base/bit offset").

use super::atomic::rmw;
use super::{Exec, Op, F_LOCK};
use crate::emu::cpu::R;
use crate::emu::flags::{mask, sext, ARITH, CF, ZF};

/// `Op::ext` of BT*: the low two bits select BT/BTS/BTR/BTC, this bit says the offset is `imm`.
pub const BT_IMM: u8 = 4;

#[inline(always)]
fn bt_apply(kind: u8, v: u64, bit: u32) -> u64 {
    match kind {
        1 => v | (1 << bit),
        2 => v & !(1 << bit),
        3 => v ^ (1 << bit),
        _ => v,
    }
}

/// BT/BTS/BTR/BTC r/m, reg|imm8.
pub fn bt(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let bits = s as u64 * 8;
    let kind = op.ext & 3;
    let off = if op.ext & BT_IMM != 0 {
        op.imm
    } else {
        x.cpu.reg(op.r1, s)
    };
    let cf;
    if op.is_mem() {
        let (ea_delta, bit) = if op.ext & BT_IMM != 0 {
            (0u64, (off & (bits - 1)) as u32)
        } else {
            let o = sext(off, s);
            let unit = o >> bits.trailing_zeros();
            (
                (unit as u64).wrapping_mul(s as u64),
                (o as u64 & (bits - 1)) as u32,
            )
        };
        let ea = x.ea(op).wrapping_add(ea_delta) & mask(op.asize);
        let lin = x.seg_lin(op.seg, ea);
        if kind == 0 {
            let v = x.read(lin, s)?;
            cf = (v >> bit) & 1;
        } else if op.flags & F_LOCK != 0 {
            let old = rmw(x, lin, s, |v| bt_apply(kind, v, bit))?;
            cf = (old >> bit) & 1;
        } else {
            let v = x.read(lin, s)?;
            x.write(lin, s, bt_apply(kind, v, bit))?;
            cf = (v >> bit) & 1;
        }
    } else {
        let bit = (off & (bits - 1)) as u32;
        let v = x.cpu.reg(op.r2, s);
        cf = (v >> bit) & 1;
        if kind != 0 {
            x.cpu.set_reg(op.r2, s, bt_apply(kind, v, bit));
        }
    }
    x.cpu.set_arith(CF, cf);
    Ok(())
}

/// BSF (ext 0) / BSR (ext 1): ZF = source is zero; the destination is left unchanged then.
pub fn bsf(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let v = x.rm_read(op, s)?;
    if v == 0 {
        x.cpu.set_arith(ZF, ZF);
        return Ok(());
    }
    let idx = if op.ext == 0 {
        v.trailing_zeros() as u64
    } else {
        63 - v.leading_zeros() as u64
    };
    x.cpu.set_reg(op.r1, s, idx);
    x.cpu.set_arith(ZF, 0);
    Ok(())
}

/// POPCNT: ZF = source is zero, the other arithmetic flags are cleared.
pub fn popcnt(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let v = x.rm_read(op, s)?;
    x.cpu.set_reg(op.r1, s, v.count_ones() as u64);
    x.cpu.set_arith(ARITH, if v == 0 { ZF } else { 0 });
    Ok(())
}
