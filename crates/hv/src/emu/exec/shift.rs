//! Shifts and rotates: ROL, ROR, RCL, RCR, SHL/SAL, SHR, SAR (Intel SDM Vol. 2B "RCL/RCR/ROL/
//! ROR", "SAL/SAR/SHL/SHR"), SHLD, SHRD. The count is masked to 5 bits (6 for 64-bit
//! operands); a masked count of 0 changes nothing. Flags the SDM leaves undefined get the
//! values of the defined formula (OF as for a count of 1, AF = 0).

use super::{Exec, Op, F_CL};
use crate::emu::cpu::{Cpu, R, RCX};
use crate::emu::flags::{mask, sext, sign, szp, AF, ARITH, CF, OF};

pub const ROL: u8 = 0;
pub const ROR: u8 = 1;
pub const RCL: u8 = 2;
pub const RCR: u8 = 3;
pub const SHL: u8 = 4;
pub const SHR: u8 = 5;
pub const SAL: u8 = 6;
pub const SAR: u8 = 7;

#[inline(always)]
fn count(x: &Exec<'_>, op: &Op, size: u8) -> u32 {
    let raw = if op.flags & F_CL != 0 {
        x.cpu.gpr[RCX]
    } else {
        op.imm
    };
    (raw & if size == 8 { 0x3f } else { 0x1f }) as u32
}

/// Result of shift/rotate `k` of `a` by masked count `c` (non-zero), updating the flags.
#[inline(always)]
pub fn shift_compute(cpu: &mut Cpu, k: u8, size: u8, a: u64, c: u32) -> u64 {
    shift_compute_f::<true>(cpu, k, size, a, c)
}

/// [`shift_compute`], updating the flags only when `F`.
#[inline(always)]
fn shift_compute_f<const F: bool>(cpu: &mut Cpu, k: u8, size: u8, a: u64, c: u32) -> u64 {
    let bits = size as u32 * 8;
    let m = mask(size);
    let sb = sign(size);
    match k {
        SHL | SAL => {
            let (r, cf) = if c < bits {
                ((a << c) & m, (a >> (bits - c)) & 1 != 0)
            } else {
                (0, c == bits && a & 1 != 0)
            };
            if F {
                let of = (r & sb != 0) != cf;
                set_shift_flags(cpu, r, size, cf, of);
            }
            r
        }
        SHR => {
            let (r, cf) = if c < bits {
                (a >> c, (a >> (c - 1)) & 1 != 0)
            } else {
                (0, c == bits && a & sb != 0)
            };
            if F {
                set_shift_flags(cpu, r, size, cf, a & sb != 0);
            }
            r
        }
        SAR => {
            let sa = sext(a, size);
            let (r, cf) = if c < bits {
                ((sa >> c) as u64 & m, (sa >> (c - 1)) & 1 != 0)
            } else {
                ((sa >> 63) as u64 & m, sa < 0)
            };
            if F {
                set_shift_flags(cpu, r, size, cf, false);
            }
            r
        }
        ROL => {
            let rc = c % bits;
            let r = if rc == 0 {
                a
            } else {
                ((a << rc) | (a >> (bits - rc))) & m
            };
            if F {
                let cf = r & 1 != 0;
                let of = (r & sb != 0) != cf;
                set_cf_of(cpu, cf, of);
            }
            r
        }
        ROR => {
            let rc = c % bits;
            let r = if rc == 0 {
                a
            } else {
                ((a >> rc) | (a << (bits - rc))) & m
            };
            if F {
                let cf = r & sb != 0;
                let of = ((r >> (bits - 1)) ^ (r >> (bits - 2))) & 1 != 0;
                set_cf_of(cpu, cf, of);
            }
            r
        }
        RCL | RCR => {
            let width = bits + 1;
            let rc = match size {
                1 => c % 9,
                2 => c % 17,
                _ => c,
            };
            let cin = cpu.cf();
            let val = (a as u128) | ((cin as u128) << bits);
            let wm = (1u128 << width) - 1;
            let rot = if rc == 0 {
                val
            } else if k == RCL {
                ((val << rc) | (val >> (width - rc))) & wm
            } else {
                ((val >> rc) | (val << (width - rc))) & wm
            };
            let r = (rot as u64) & m;
            if F {
                let cf = (rot >> bits) & 1 != 0;
                let of = if k == RCL {
                    (r & sb != 0) != cf
                } else {
                    (a & sb != 0) != cin
                };
                set_cf_of(cpu, cf, of);
            }
            r
        }
        _ => a,
    }
}

#[inline(always)]
fn set_shift_flags(cpu: &mut Cpu, r: u64, size: u8, cf: bool, of: bool) {
    let mut f = szp(r, size);
    if cf {
        f |= CF;
    }
    if of {
        f |= OF;
    }
    cpu.set_arith(ARITH, f & !AF);
}

#[inline(always)]
fn set_cf_of(cpu: &mut Cpu, cf: bool, of: bool) {
    cpu.set_arith(CF | OF, (cf as u64) | if of { OF } else { 0 });
}

/// Shift or rotate kind `K`, operand size `S`; the destination is r/m (`r2` or memory).
pub fn shift<const K: u8, const S: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let c = count(x, op, S);
    if op.is_mem() {
        let lin = x.lin(op);
        let a = x.read(lin, S)?;
        if c == 0 {
            return Ok(());
        }
        let saved = (x.cpu.flags, x.cpu.lazy);
        let r = shift_compute(x.cpu, K, S, a, c);
        if let Err(e) = x.write(lin, S, r) {
            (x.cpu.flags, x.cpu.lazy) = saved;
            return Err(e);
        }
    } else {
        let a = x.cpu.reg(op.r2, S);
        if c == 0 {
            // A zero count still zero-extends a 32-bit register destination.
            if S == 4 {
                x.cpu.set_reg(op.r2, S, a);
            }
            return Ok(());
        }
        let r = shift_compute(x.cpu, K, S, a, c);
        x.cpu.set_reg(op.r2, S, r);
    }
    Ok(())
}

/// Shift or rotate kind `K`, size `S`, of a register when no flag it writes is looked at
/// (see `alu::alu_nf`).
pub fn shift_nf<const K: u8, const S: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let c = count(x, op, S);
    let a = x.cpu.reg(op.r2, S);
    let r = if c == 0 {
        a
    } else {
        shift_compute_f::<false>(x.cpu, K, S, a, c)
    };
    // (A zero count still zero-extends a 32-bit register destination.)
    x.cpu.set_reg(op.r2, S, r);
    Ok(())
}

/// SHLD (ext 0) / SHRD (ext 1) r/m, reg, imm8/CL.
pub fn shxd(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let c = count(x, op, s);
    let dst = x.rm_read(op, s)?;
    if c == 0 {
        if s == 4 && !op.is_mem() {
            x.cpu.set_reg(op.r2, s, dst);
        }
        return Ok(());
    }
    let src = x.cpu.reg(op.r1, s);
    let bits = s as u32 * 8;
    let m = mask(s);
    let (r, cf) = if op.ext == 0 {
        let tmp = ((dst as u128) << bits) | src as u128;
        let r = ((tmp << c) >> bits) as u64 & m;
        let cf = (tmp >> (2 * bits - c)) & 1 != 0;
        (r, cf)
    } else {
        let tmp = ((src as u128) << bits) | dst as u128;
        let r = (tmp >> c) as u64 & m;
        let cf = (tmp >> (c - 1)) & 1 != 0;
        (r, cf)
    };
    x.rm_write(op, s, r)?;
    let of = (r ^ dst) & sign(s) != 0;
    set_shift_flags(x.cpu, r, s, cf, of);
    Ok(())
}
