//! MUL, IMUL (one, two and three operands), DIV, IDIV (Intel SDM Vol. 2). DIV/IDIV raise #DE
//! for a zero divisor or a quotient that does not fit; their flags are undefined and left
//! unchanged. After a multiply CF = OF = "the result did not fit"; SF/ZF/PF (undefined) follow
//! the low half of the result, AF is 0.

use super::{Exec, Op};
use crate::emu::cpu::{Cpu, Exc, DE, R, RAX, RDX};
use crate::emu::flags::{mask, sext, szp, ARITH, CF, OF};

fn mul_flags(cpu: &mut Cpu, lo: u64, size: u8, overflow: bool) {
    let mut f = szp(lo & mask(size), size);
    if overflow {
        f |= CF | OF;
    }
    cpu.set_arith(ARITH, f);
}

/// MUL r/m (ext 0) and IMUL r/m (ext 1): RDX:RAX (or AX) = accumulator * r/m.
pub fn mul1(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let src = x.rm_read(op, s)?;
    let acc = x.cpu.reg(RAX as u8, s);
    let bits = s as u32 * 8;
    let (lo, hi, overflow) = if op.ext == 0 {
        let p = (acc as u128) * (src as u128);
        let lo = p as u64 & mask(s);
        let hi = (p >> bits) as u64 & mask(s);
        (lo, hi, hi != 0)
    } else {
        let p = (sext(acc, s) as i128) * (sext(src, s) as i128);
        let lo = p as u64 & mask(s);
        let hi = (p >> bits) as u64 & mask(s);
        (lo, hi, sext(lo, s) as i128 != p)
    };
    if s == 1 {
        x.cpu.set_reg(RAX as u8, 2, lo | (hi << 8));
    } else {
        x.cpu.set_reg(RAX as u8, s, lo);
        x.cpu.set_reg(RDX as u8, s, hi);
    }
    mul_flags(x.cpu, lo, s, overflow);
    Ok(())
}

/// IMUL r, r/m (ext 2) and IMUL r, r/m, imm (ext 3): truncated signed product.
pub fn imul(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let src = x.rm_read(op, s)?;
    let (a, b) = if op.ext == 2 {
        (x.cpu.reg(op.r1, s), src)
    } else {
        (src, op.imm & mask(s))
    };
    let p = (sext(a, s) as i128) * (sext(b, s) as i128);
    let lo = p as u64 & mask(s);
    x.cpu.set_reg(op.r1, s, lo);
    mul_flags(x.cpu, lo, s, sext(lo, s) as i128 != p);
    Ok(())
}

/// DIV r/m (ext 0) and IDIV r/m (ext 1).
pub fn div(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let src = x.rm_read(op, s)?;
    let de = || Exc::Fault {
        vector: DE,
        code: None,
    };
    if src == 0 {
        return Err(de());
    }
    let bits = s as u32 * 8;
    let dividend: u128 = if s == 1 {
        x.cpu.reg(RAX as u8, 2) as u128
    } else {
        ((x.cpu.reg(RDX as u8, s) as u128) << bits) | x.cpu.reg(RAX as u8, s) as u128
    };
    let (q, r) = if op.ext == 0 {
        let q = dividend / src as u128;
        if q > mask(s) as u128 {
            return Err(de());
        }
        (q as u64, (dividend % src as u128) as u64)
    } else {
        // Sign-extend the 2*bits-wide dividend.
        let sh = 128 - 2 * bits;
        let n = ((dividend << sh) as i128) >> sh;
        let d = sext(src, s) as i128;
        let (Some(q), Some(r)) = (n.checked_div(d), n.checked_rem(d)) else {
            return Err(de());
        };
        let lim = 1i128 << (bits - 1);
        if q >= lim || q < -lim {
            return Err(de());
        }
        (q as u64 & mask(s), r as u64 & mask(s))
    };
    if s == 1 {
        x.cpu.set_reg(RAX as u8, 2, q | (r << 8));
    } else {
        x.cpu.set_reg(RAX as u8, s, q);
        x.cpu.set_reg(RDX as u8, s, r);
    }
    Ok(())
}
