//! x87 partial remainders, scaling and the transcendental instructions (Intel SDM Vol. 2
//! instruction pages "FPREM", "FPREM1", "FSCALE", "FXTRACT", "FSIN", "FCOS", "FSINCOS",
//! "FPTAN", "FPATAN", "F2XM1", "FYL2X", "FYL2XP1").
//!
//! FPREM, FPREM1, FSCALE and FXTRACT are exact. The transcendental functions are computed in
//! double precision with the host's libm (tiny-argument and near-one cases handled in extended
//! precision), so their results carry about 53 correct bits, not the 64 of the hardware; they
//! raise PE (and UE when tiny) for every inexact result and leave C1 clear. FSIN, FCOS,
//! FSINCOS and FPTAN reduce their argument exactly by the x87's own 66-bit π (SDM Vol. 1
//! §8.3.10), so large arguments give the hardware's results, not the mathematically exact ones.
//! Precision control does not apply to any of them (§8.1.5.2).

use iced_x86::Mnemonic as M;

use super::softfloat::{
    self as sf, pack_nan, round, unpack, Class, Enc, Env, Exact, Unp, F64, F80, IE, PE, RZ, UE, ZE,
};
use super::x87::{
    denormal_stop, env_of, nan2, pop, raise, set_st, st, underflow, unp, valid, INDEF,
};
use super::{Exec, Handler, Op};
use crate::emu::cpu::{Cpu, R};
use crate::emu::exec::fpu::{x87_ok, FSW_C0, FSW_C1, FSW_C2, FSW_C3};

/// 1.0 and ln 2 / log2 e as 80-bit operands.
const ONE: u128 = (0x3fffu128 << 64) | 1 << 63;

#[inline]
fn set_cc(c: &mut Cpu, cc: u16) {
    c.fpu.fsw = (c.fpu.fsw & !(FSW_C0 | FSW_C1 | FSW_C2 | FSW_C3)) | cc;
}

/// An 80-bit image from an exact value.
fn pack80(env: &mut Env, x: Exact) -> u128 {
    round(env, x, F80)
}

/// `u` (finite) to the nearest double; exponents beyond the double range give 0 or infinity.
fn to_f64(u: &Unp) -> f64 {
    let mut e = Env::sse(0x1f80);
    f64::from_bits(round(&mut e, Exact::of(u), F64) as u64)
}

/// A double as an operand (exact).
fn from_f64(v: f64) -> Unp {
    unpack(v.to_bits() as u128, Enc::F64, false)
}

/// An approximate result `v` (a double) rounded into the destination: PE, and UE when tiny.
fn approx(env: &mut Env, v: f64) -> u128 {
    if v.is_nan() {
        env.flags |= IE;
        return INDEF;
    }
    let u = from_f64(v);
    if u.class == Class::Num {
        env.flags |= PE;
        if u.exp < -16382 {
            env.flags |= UE;
        }
    }
    pack80(env, Exact::of(&u))
}

/// An approximate (so inexact) result `r`: PE, and UE when it is tiny.
fn inexact(env: &mut Env, r: u128) -> u128 {
    env.flags |= PE;
    if (r >> 64) as u16 & 0x7fff == 0 && r as u64 != 0 {
        env.flags |= UE;
    }
    r
}

/// An operand passed through unchanged: a pseudo-denormal comes out normalized.
fn canonical(v: u128) -> u128 {
    if (v >> 64) as u16 & 0x7fff == 0 && v & (1 << 63) != 0 {
        v | 1 << 64
    } else {
        v
    }
}

// ---- FPREM / FPREM1 ---------------------------------------------------------------------------------

/// FPREM (`ONE` = false: quotient truncated) and FPREM1 (quotient rounded to nearest):
/// ST(0) ← ST(0) − Q·ST(1), exactly. When the exponents differ by 64 or more, one step reduces
/// the difference to a multiple of 32 below it (as the reference CPU does) and sets C2
/// (incomplete); otherwise C0, C3, C1 get the low three quotient bits.
pub fn fprem<const ONE_: bool>(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) || !valid(c, 1) {
        c.fpu.fsw &= !FSW_C2;
        if underflow(c) {
            set_st(c, 0, INDEF);
        }
        return Ok(());
    }
    let a = unp(st(c, 0));
    let b = unp(st(c, 1));
    let mut env = env_of(c);
    // The condition codes: `None` for an invalid operation (C1 and C2 cleared, C0 and C3
    // left alone).
    let mut cc = None;
    let r = if a.class == Class::Unsupported || b.class == Class::Unsupported {
        env.flags |= IE;
        INDEF
    } else if a.is_nan() || b.is_nan() {
        nan2(&mut env, &a, &b)
    } else if a.class == Class::Inf || b.class == Class::Zero {
        env.flags |= IE;
        INDEF
    } else if denormal_stop(&mut env, a.denormal || b.denormal) {
        INDEF
    } else if a.class == Class::Zero || b.class == Class::Inf {
        cc = Some(0);
        canonical(st(c, 0))
    } else {
        let (rem, q, partial) = remainder(&a, &b, ONE_);
        cc = Some(if partial {
            FSW_C2
        } else {
            let bit = |b: u64, f: u16| if q & b != 0 { f } else { 0 };
            bit(4, FSW_C0) | bit(2, FSW_C3) | bit(1, FSW_C1)
        });
        pack80(&mut env, rem)
    };
    let ok = raise(c, env.flags, false);
    match cc {
        Some(cc) if ok => {
            set_st(c, 0, r);
            set_cc(c, cc);
        }
        None if ok => {
            set_st(c, 0, r);
            c.fpu.fsw &= !FSW_C2;
        }
        _ => c.fpu.fsw &= !FSW_C2,
    }
    Ok(())
}

/// The exact partial remainder of finite nonzero `a` by `b`: (remainder, low quotient bits,
/// incomplete).
fn remainder(a: &Unp, b: &Unp, nearest: bool) -> (Exact, u64, bool) {
    let d = a.exp - b.exp;
    if d < -1 || (d == -1 && !nearest) {
        return (Exact::of(a), 0, false);
    }
    let (d, partial) = if d >= 64 {
        (d - 32 * (d / 32 - 1), true)
    } else {
        (d, false)
    };
    // a = A × 2^u, b = B × 2^u with u = exp(b) − 64 + (reduction), integers.
    let big_a = (a.sig as u128) << (d + 1) as u32;
    let big_b = (b.sig as u128) << 1;
    let mut q = big_a / big_b;
    let mut r = big_a % big_b;
    let mut sign = a.sign;
    if nearest && !partial && (2 * r > big_b || (2 * r == big_b && q & 1 != 0)) {
        q += 1;
        r = big_b - r;
        sign = !sign;
    }
    if r == 0 {
        return (Exact::Zero(a.sign), q as u64, partial);
    }
    let unit = a.exp - d - 64; // exponent of the integers' unit
    let lz = r.leading_zeros();
    (
        Exact::Num {
            sign,
            exp: unit + 127 - lz as i32,
            sig: r << lz,
        },
        q as u64,
        partial,
    )
}

// ---- FSCALE / FXTRACT -------------------------------------------------------------------------------

/// FSCALE: ST(0) × 2^trunc(ST(1)), exact before rounding to 64 bits.
pub fn fscale(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) || !valid(c, 1) {
        if underflow(c) {
            set_st(c, 0, INDEF);
        }
        return Ok(());
    }
    let a = unp(st(c, 0));
    let b = unp(st(c, 1));
    let mut env = env_of(c);
    let r = if a.class == Class::Unsupported || b.class == Class::Unsupported {
        env.flags |= IE;
        INDEF
    } else if a.is_nan() || b.is_nan() {
        nan2(&mut env, &a, &b)
    } else if denormal_stop(&mut env, a.denormal || b.denormal) {
        INDEF
    } else {
        match (a.class, b.class) {
            (Class::Zero, Class::Inf) if !b.sign => {
                env.flags |= IE;
                INDEF
            }
            (Class::Inf, Class::Inf) if b.sign => {
                env.flags |= IE;
                INDEF
            }
            (Class::Num, Class::Inf) => {
                if b.sign {
                    sf::zero(a.sign, Enc::F80)
                } else {
                    sf::inf(a.sign, Enc::F80)
                }
            }
            // Scaling by ±0 returns the operand as it is (a denormal stays one).
            (Class::Num, Class::Zero) => canonical(st(c, 0)),
            (Class::Num, _) => {
                // Beyond ±2^17 every result is out of range even after bias adjustment.
                let n = match sf::to_int_mag(&b, RZ) {
                    Some((m, _, _)) => m.min(1 << 17) as i32,
                    None => 1 << 17,
                };
                let n = if b.sign { -n } else { n };
                pack80(&mut env, sf::scale(Exact::of(&a), n))
            }
            _ => st(c, 0),
        }
    };
    if raise(c, env.flags, env.up) {
        set_st(c, 0, r);
    }
    Ok(())
}

/// FXTRACT: ST(0) ← exponent, then push the significand (SDM Vol. 2A "FXTRACT").
pub fn fxtract(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) {
        if underflow(c) {
            set_st(c, 0, INDEF);
            super::x87::push(c, INDEF);
        }
        return Ok(());
    }
    if valid(c, 7) {
        if super::x87::overflow(c) {
            set_st(c, 0, INDEF);
            super::x87::push(c, INDEF);
        }
        return Ok(());
    }
    let a = unp(st(c, 0));
    let mut env = env_of(c);
    let (e, s) = match a.class {
        Class::Unsupported => {
            env.flags |= IE;
            (INDEF, INDEF)
        }
        Class::QNan | Class::SNan => {
            if a.class == Class::SNan {
                env.flags |= IE;
            }
            let n = pack_nan(&a, Enc::F80);
            (n, n)
        }
        Class::Zero => {
            env.flags |= ZE;
            (sf::inf(true, Enc::F80), st(c, 0))
        }
        Class::Inf => (sf::inf(false, Enc::F80), st(c, 0)),
        Class::Num if denormal_stop(&mut env, a.denormal) => (INDEF, INDEF),
        Class::Num => {
            let e = pack80(&mut env, Exact::int(a.exp < 0, a.exp.unsigned_abs() as u64));
            let s = (((a.sign as u128) << 15 | 0x3fff) << 64) | a.sig as u128;
            (e, s)
        }
    };
    if raise(c, env.flags, false) {
        set_st(c, 0, e);
        super::x87::push(c, s);
    }
    Ok(())
}

// ---- transcendental functions --------------------------------------------------------------------------

/// Trigonometric kinds.
const SIN: u8 = 0;
const COS: u8 = 1;
const SINCOS: u8 = 2;
const TAN: u8 = 3;

/// π truncated to 66 bits, the x87's internal constant: π ≈ `PI66` × 2^-64.
const PI66: u128 = (0xc90f_daa2_2168_c234u128 << 2) | 3;

/// Reduce |x| (finite, |x| < 2^63) by π/2 ≈ `PI66` × 2^-65, exactly: (quadrant, remainder),
/// |remainder| ≤ π/4 as a double.
fn reduce(u: &Unp) -> (u32, f64) {
    if u.exp < -2 {
        return (0, to_f64(&Unp { sign: false, ..*u }));
    }
    // |x| in units of 2^-65 (exp ≤ 62, so at most 128 bits).
    let x = (u.sig as u128) << (u.exp + 2) as u32;
    let mut k = x / PI66;
    let mut r = (x % PI66) as i128;
    if 2 * r > PI66 as i128 {
        k += 1;
        r -= PI66 as i128;
    }
    ((k & 3) as u32, r as f64 * 2f64.powi(-65))
}

/// sin and cos of |x| from its reduction.
fn sin_cos(u: &Unp) -> (f64, f64) {
    let (q, r) = reduce(u);
    let (s, c) = (r.sin(), r.cos());
    match q {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// FSIN, FCOS, FSINCOS, FPTAN. |ST(0)| ≥ 2^63 sets C2 and changes nothing.
pub fn trig<const K: u8>(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    let pushes = K == SINCOS || K == TAN;
    if !valid(c, 0) {
        c.fpu.fsw &= !FSW_C2;
        if underflow(c) {
            set_st(c, 0, INDEF);
            if pushes {
                super::x87::push(c, INDEF);
            }
        }
        return Ok(());
    }
    if pushes && valid(c, 7) {
        c.fpu.fsw &= !FSW_C2;
        if super::x87::overflow(c) {
            set_st(c, 0, INDEF);
            super::x87::push(c, INDEF);
        }
        return Ok(());
    }
    let a = unp(st(c, 0));
    let mut env = env_of(c);
    // (new ST(0), value pushed after it)
    let (r0, r1): (u128, Option<u128>) = match a.class {
        Class::Unsupported | Class::Inf => {
            env.flags |= IE;
            (INDEF, pushes.then_some(INDEF))
        }
        Class::QNan | Class::SNan => {
            if a.class == Class::SNan {
                env.flags |= IE;
            }
            let n = pack_nan(&a, Enc::F80);
            (n, pushes.then_some(n))
        }
        Class::Zero => match K {
            COS => (ONE, None),
            SIN => (st(c, 0), None),
            _ => (st(c, 0), Some(ONE)),
        },
        Class::Num => {
            if a.exp >= 63 {
                c.fpu.fsw |= FSW_C2;
                return Ok(());
            }
            if denormal_stop(&mut env, a.denormal) {
                (INDEF, None)
            } else if a.exp < -40 {
                // sin x = tan x = x and cos x = 1 to far beyond 64 bits.
                let v = st(c, 0);
                env.flags |= PE;
                if a.exp < -16382 && K != COS {
                    env.flags |= UE;
                }
                match K {
                    COS => (ONE, None),
                    SIN => (v, None),
                    _ => (v, Some(ONE)),
                }
            } else {
                let (s, co) = sin_cos(&a);
                let sign = if a.sign { -1.0 } else { 1.0 };
                match K {
                    SIN => (approx(&mut env, sign * s), None),
                    COS => (approx(&mut env, co), None),
                    // FSINCOS: ST(0) ← sine, then push the cosine.
                    SINCOS => (approx(&mut env, sign * s), Some(approx(&mut env, co))),
                    _ => (approx(&mut env, sign * s / co), Some(ONE)),
                }
            }
        }
    };
    if raise(c, env.flags, false) {
        set_st(c, 0, r0);
        if let Some(v) = r1 {
            super::x87::push(c, v);
        }
    }
    c.fpu.fsw &= !FSW_C2;
    Ok(())
}

/// F2XM1: 2^ST(0) − 1.
pub fn f2xm1(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) {
        if underflow(c) {
            set_st(c, 0, INDEF);
        }
        return Ok(());
    }
    let a = unp(st(c, 0));
    let mut env = env_of(c);
    let r = match a.class {
        Class::Unsupported => {
            env.flags |= IE;
            INDEF
        }
        Class::QNan | Class::SNan => super::x87::special1(&mut env, &a).unwrap_or(INDEF),
        Class::Zero => st(c, 0),
        Class::Inf => {
            if a.sign {
                (0xbfffu128 << 64) | 1 << 63 // −1
            } else {
                st(c, 0)
            }
        }
        Class::Num if denormal_stop(&mut env, a.denormal) => INDEF,
        Class::Num if a.exp > 0 || (a.exp == 0 && a.sig != 1 << 63) => {
            // Outside [-1, 1] the result is undefined; the reference CPU returns the operand.
            env.flags |= PE;
            st(c, 0)
        }
        Class::Num => {
            if a.exp < -60 {
                // 2^x − 1 = x·ln 2 to well beyond 64 bits.
                let ln2 = unp((0x3ffeu128 << 64) | 0xb172_17f7_d1cf_79ac);
                let p = sf::mul(&mut env, &a, &ln2);
                let r = pack80(&mut env, p);
                inexact(&mut env, r)
            } else {
                approx(&mut env, (to_f64(&a) * std::f64::consts::LN_2).exp_m1())
            }
        }
    };
    if raise(c, env.flags, false) {
        set_st(c, 0, r);
    }
    Ok(())
}

/// log2 of a finite positive `u` in double precision, accurate near 1.
fn log2(u: &Unp) -> f64 {
    if u.exp == 0 || (u.exp == -1 && u.sig >= 0xc000_0000_0000_0000) {
        // In [0.75, 2): x − 1 is exact.
        let mut e = Env::sse(0x1f80);
        let one = unp(ONE);
        let t = sf::add(&mut e, u, &one.neg());
        let t = to_f64(&unpack(round(&mut e, t, F80), Enc::F80, false));
        return t.ln_1p() / std::f64::consts::LN_2;
    }
    let m = (u.sig >> 11) as f64 / (1u64 << 52) as f64;
    u.exp as f64 + m.log2()
}

/// FYL2X (`P1` = false): ST(1) × log2 ST(0); FYL2XP1: ST(1) × log2(ST(0) + 1). Pops.
pub fn fyl2x<const P1: bool>(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) || !valid(c, 1) {
        if underflow(c) {
            set_st(c, 1, INDEF);
            pop(c);
        }
        return Ok(());
    }
    let xv = unp(st(c, 0));
    let y = unp(st(c, 1));
    let mut env = env_of(c);
    let r = if xv.class == Class::Unsupported || y.class == Class::Unsupported {
        env.flags |= IE;
        INDEF
    } else if xv.is_nan() || y.is_nan() {
        nan2(&mut env, &xv, &y)
    } else if !P1 && xv.sign && xv.class != Class::Zero {
        // The logarithm of a negative number, before any denormal check.
        env.flags |= IE;
        INDEF
    } else if !(!P1 && xv.class == Class::Zero && y.class == Class::Num)
        && denormal_stop(&mut env, xv.denormal || y.denormal)
    {
        // (log2 0 times a number is a division by zero, reported before denormals.)
        INDEF
    } else {
        // The logarithm as an operand: exact zero, ±infinity, or a double.
        let l: Option<Unp> = if P1 {
            match xv.class {
                Class::Zero => Some(xv),
                Class::Inf => None,
                _ if xv.sign && (xv.exp >= 0) => None,
                _ if xv.exp < -1000 => {
                    // log2(1 + x) = x · log2 e: fold log2 e into y (no intermediate underflow).
                    let l2e = unp((0x3fffu128 << 64) | 0xb8aa_3b29_5c17_f0bc);
                    let mut scratch = Env::x87(0x37f);
                    let p = sf::mul(&mut scratch, &y, &l2e);
                    let y2 = unpack(round(&mut scratch, p, F80), Enc::F80, false);
                    let p = sf::mul(&mut env, &y2, &xv);
                    let r = round(&mut env, p, F80);
                    let r = inexact(&mut env, r);
                    if raise(c, env.flags, false) {
                        set_st(c, 1, r);
                        pop(c);
                    }
                    return Ok(());
                }
                _ => Some(from_f64(to_f64(&xv).ln_1p() / std::f64::consts::LN_2)),
            }
        } else {
            match xv.class {
                _ if xv.sign && xv.class != Class::Zero => None,
                Class::Zero => Some(Unp {
                    class: Class::Inf,
                    sign: true,
                    exp: 0,
                    sig: 1 << 63,
                    denormal: false,
                }),
                Class::Inf => Some(xv),
                _ => Some(from_f64(log2(&xv))),
            }
        };
        match l {
            None => {
                env.flags |= IE;
                INDEF
            }
            Some(l) => {
                if !P1 && xv.class == Class::Zero && y.class == Class::Num {
                    env.flags |= ZE;
                }
                let exact_log = matches!(l.class, Class::Zero | Class::Inf);
                let p = sf::mul(&mut env, &y, &l);
                let r = round(&mut env, p, F80);
                if !exact_log && matches!(p, Exact::Num { .. }) {
                    inexact(&mut env, r)
                } else {
                    r
                }
            }
        }
    };
    if raise(c, env.flags, false) {
        set_st(c, 1, r);
        pop(c);
    }
    Ok(())
}

/// FPATAN: ST(1) ← arctan(ST(1) / ST(0)) with the quadrant of (ST(0), ST(1)); pops.
pub fn fpatan(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) || !valid(c, 1) {
        if underflow(c) {
            set_st(c, 1, INDEF);
            pop(c);
        }
        return Ok(());
    }
    let xv = unp(st(c, 0));
    let y = unp(st(c, 1));
    let mut env = env_of(c);
    let r = if xv.class == Class::Unsupported || y.class == Class::Unsupported {
        env.flags |= IE;
        INDEF
    } else if xv.is_nan() || y.is_nan() {
        nan2(&mut env, &xv, &y)
    } else if denormal_stop(&mut env, xv.denormal || y.denormal) {
        INDEF
    } else {
        if y.class == Class::Num && xv.class == Class::Num && !xv.sign && y.exp < xv.exp - 60 {
            // atan(y/x) = y/x to beyond 64 bits.
            let q = sf::div(&mut env, &y, &xv);
            let r = round(&mut env, q, F80);
            inexact(&mut env, r)
        } else {
            // Scale both by the same power of two into the double range.
            let k = match (xv.class, y.class) {
                (Class::Num, Class::Num) => xv.exp.max(y.exp),
                (Class::Num, _) => xv.exp,
                (_, Class::Num) => y.exp,
                _ => 0,
            };
            let sx = to_f64(&unpack(
                pack80(&mut Env::x87(0x37f), sf::scale(Exact::of(&xv), -k)),
                Enc::F80,
                false,
            ));
            let sy = to_f64(&unpack(
                pack80(&mut Env::x87(0x37f), sf::scale(Exact::of(&y), -k)),
                Enc::F80,
                false,
            ));
            let v = sy.atan2(sx);
            if v == 0.0 {
                pack80(&mut env, Exact::Zero(v.is_sign_negative()))
            } else {
                approx(&mut env, v)
            }
        }
    };
    if raise(c, env.flags, false) {
        set_st(c, 1, r);
        pop(c);
    }
    Ok(())
}

/// The handlers of this module.
pub fn translate(m: M) -> Option<Handler> {
    Some(match m {
        M::Fprem => fprem::<false>,
        M::Fprem1 => fprem::<true>,
        M::Fscale => fscale,
        M::Fxtract => fxtract,
        M::Fsin => trig::<SIN>,
        M::Fcos => trig::<COS>,
        M::Fsincos => trig::<SINCOS>,
        M::Fptan => trig::<TAN>,
        M::F2xm1 => f2xm1,
        M::Fyl2x => fyl2x::<false>,
        M::Fyl2xp1 => fyl2x::<true>,
        M::Fpatan => fpatan,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(v: f64) -> Unp {
        from_f64(v)
    }

    #[test]
    fn remainders_are_exact() {
        for (a, b) in [
            (10.0, 3.0),
            (-10.0, 3.0),
            (7.5, 2.0),
            (1e10, 0.375),
            (12345.678, 0.0625),
            (5.0, 10.0),
        ] {
            let (r, q, partial) = remainder(&ext(a), &ext(b), false);
            assert!(!partial);
            let mut e = Env::x87(0x37f);
            let rv = to_f64(&unpack(round(&mut e, r, F80), Enc::F80, false));
            assert_eq!(rv, a % b, "{a} % {b}");
            assert_eq!(q & 7, ((a / b).abs().trunc() as u64) & 7, "{a} / {b}");
        }
        // FPREM1 rounds the quotient to nearest (even on a tie).
        let (r, q, _) = remainder(&ext(7.0), &ext(2.0), true);
        let mut e = Env::x87(0x37f);
        assert_eq!(
            to_f64(&unpack(round(&mut e, r, F80), Enc::F80, false)),
            -1.0
        );
        assert_eq!(q & 7, 4);
        // A large exponent difference is reduced to a multiple of 32.
        let (r, _, partial) = remainder(&ext(2f64.powi(100) * 1.3), &ext(1.7), false);
        assert!(partial);
        match r {
            Exact::Num { exp, .. } => assert!(exp <= 64),
            _ => panic!("zero remainder"),
        }
    }

    #[test]
    fn logarithms_near_one() {
        let one_plus = unp((0x3fffu128 << 64) | (1 << 63) | 1);
        let l = log2(&one_plus);
        let want = 2f64.powi(-63) / std::f64::consts::LN_2;
        assert!((l - want).abs() / want < 1e-15);
        assert!((log2(&ext(1024.0)) - 10.0).abs() < 1e-15);
    }
}
