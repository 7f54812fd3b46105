//! SSE/SSE2 floating point (Intel SDM Vol. 1 chapters 10-11, Vol. 2 instruction pages):
//! packed and scalar arithmetic, MIN/MAX, SQRT, RCP/RSQRT, compares (CMPccPS/PD/SS/SD,
//! (U)COMISS/SD), conversions, LDMXCSR/STMXCSR.
//!
//! Each lane goes through [`softfloat`](super::softfloat) with the MXCSR environment, except
//! for a fast path: when MXCSR is round-to-nearest without DAZ/FTZ, the precision exception is
//! masked and its flag already set, and both operands and the result are normal numbers, the
//! host's IEEE operation gives the same bits and raises nothing new. Exceptions are reported as
//! SDM Vol. 1 §11.5.2 says: if an unmasked exception occurs in any lane, MXCSR gets the flags
//! (only the pre-computation ones IE/DE/ZE when one of those is unmasked), the destination is
//! left unchanged and #XM (or #UD when CR4.OSXMMEXCPT = 0) is raised.

use iced_x86::{Instruction, Mnemonic as M};

use super::fpu::{
    by_mem, gpr_op, mm_op, mm_rm, mmx_ok, set_mm, set_xmm, simd_exception, src128, src32, src64,
    src_mm, sse_ok, xmm, xmm_op, xmm_rm, MXCSR_MASK,
};
use super::rcp_table;
use super::softfloat::{
    self as sf, compare, pack_nan, round, to_int, unpack, Class, Enc, Env, Exact, Fmt, Unp, DE,
    F32, F64, IE, RZ, ZE,
};
use super::{Exec, Handler, Op};
use crate::emu::cpu::{gp0, Cpu, R};
use crate::emu::flags::{ARITH, CF, PF, ZF};

/// Lane layouts: packed/scalar single/double.
pub const PS: u8 = 0;
pub const PD: u8 = 1;
pub const SS: u8 = 2;
pub const SD: u8 = 3;

/// Operations.
pub const ADD: u8 = 0;
pub const SUB: u8 = 1;
pub const MUL: u8 = 2;
pub const DIV: u8 = 3;
pub const MIN: u8 = 4;
pub const MAX: u8 = 5;
pub const SQRT: u8 = 6;
pub const RCP: u8 = 7;
pub const RSQRT: u8 = 8;
pub const CMP: u8 = 9;

/// MXCSR bits that allow the host fast path, and their required values: RC = nearest,
/// DAZ = FZ = 0, PM = 1, PE = 1.
const FAST_MASK: u32 = 0xf060;
const FAST_WANT: u32 = 0x1020;

/// Merge the flags raised by an instruction into MXCSR; an unmasked one is #XM/#UD and the
/// caller must not write its destination (SDM Vol. 1 §11.5.2).
#[inline(always)]
pub fn finish(c: &mut Cpu, flags: u32) -> R {
    let mx = c.fpu.mxcsr;
    let unmasked = flags & !(mx >> 7) & sf::ALL;
    if unmasked == 0 {
        c.fpu.mxcsr = mx | flags;
        return Ok(());
    }
    let pre = IE | DE | ZE;
    c.fpu.mxcsr = mx
        | if unmasked & pre != 0 {
            flags & pre
        } else {
            flags
        };
    Err(simd_exception(c))
}

// ---- one lane -----------------------------------------------------------------------------------------

/// A lane format: its bits as u64, the host float type and the soft-float format.
trait Lane {
    const FMT: Fmt;
    const ENC: Enc;
    /// Exponent field neither zero nor all ones.
    fn normal(b: u64) -> bool;
    /// A normal result that cannot have been tiny before rounding: exponent field at least 2
    /// (the smallest normal number may be a rounded-up tiny one, which raises UE).
    fn safe(b: u64) -> bool;
    /// The host operation `OP` on two normal numbers; `None` when not done on the host.
    fn host(op: u8, a: u64, b: u64) -> Option<u64>;
}

struct L32;
struct L64;

impl Lane for L32 {
    const FMT: Fmt = F32;
    const ENC: Enc = Enc::F32;
    #[inline(always)]
    fn normal(b: u64) -> bool {
        ((b >> 23) as u32 & 0xff).wrapping_sub(1) < 0xfe
    }
    #[inline(always)]
    fn safe(b: u64) -> bool {
        ((b >> 23) as u32 & 0xff).wrapping_sub(2) < 0xfd
    }
    #[inline(always)]
    fn host(op: u8, a: u64, b: u64) -> Option<u64> {
        let (x, y) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
        let r = match op {
            ADD => x + y,
            SUB => x - y,
            MUL => x * y,
            DIV => x / y,
            SQRT => y.sqrt(),
            _ => return None,
        };
        Some(r.to_bits() as u64)
    }
}

impl Lane for L64 {
    const FMT: Fmt = F64;
    const ENC: Enc = Enc::F64;
    #[inline(always)]
    fn normal(b: u64) -> bool {
        ((b >> 52) as u32 & 0x7ff).wrapping_sub(1) < 0x7fe
    }
    #[inline(always)]
    fn safe(b: u64) -> bool {
        ((b >> 52) as u32 & 0x7ff).wrapping_sub(2) < 0x7fd
    }
    #[inline(always)]
    fn host(op: u8, a: u64, b: u64) -> Option<u64> {
        let (x, y) = (f64::from_bits(a), f64::from_bits(b));
        let r = match op {
            ADD => x + y,
            SUB => x - y,
            MUL => x * y,
            DIV => x / y,
            SQRT => y.sqrt(),
            _ => return None,
        };
        Some(r.to_bits())
    }
}

/// `OP` on one lane: `a` is the destination (first source), `b` the source. Unary operations
/// use `b`.
#[inline(always)]
fn lane<T: Lane, const OP: u8>(env: &mut Env, fast: bool, a: u64, b: u64, imm: u8) -> u64 {
    if fast
        && matches!(OP, ADD | SUB | MUL | DIV | SQRT)
        && T::normal(b)
        && (OP == SQRT || T::normal(a))
    {
        if let Some(r) = T::host(OP, a, b) {
            if T::safe(r) {
                return r;
            }
        }
    }
    lane_slow::<T, OP>(env, a, b, imm)
}

#[inline(never)]
fn lane_slow<T: Lane, const OP: u8>(env: &mut Env, a: u64, b: u64, imm: u8) -> u64 {
    let ub = unpack(b as u128, T::ENC, env.daz);
    match OP {
        SQRT => {
            if ub.is_nan() {
                if ub.class == Class::SNan {
                    env.flags |= IE;
                }
                return pack_nan(&ub, T::ENC) as u64;
            }
            // A negative operand is invalid before it is a denormal.
            if ub.denormal && !ub.sign {
                env.flags |= DE;
            }
            let x = sf::sqrt(env, &ub);
            round(env, x, T::FMT) as u64
        }
        RCP | RSQRT => recip(OP == RSQRT, b as u32) as u64,
        _ => {
            let ua = unpack(a as u128, T::ENC, env.daz);
            match OP {
                MIN | MAX => min_max::<T>(env, OP == MAX, a, b, &ua, &ub),
                CMP => {
                    if compare_pred(env, imm, &ua, &ub) {
                        u64::MAX
                    } else {
                        0
                    }
                }
                _ => {
                    // SSE NaN rule: the first source if it is a NaN, else the second
                    // (SDM Vol. 1 Table 4-7); quieted.
                    if ua.is_nan() || ub.is_nan() {
                        if ua.class == Class::SNan || ub.class == Class::SNan {
                            env.flags |= IE;
                        }
                        let n = if ua.is_nan() { &ua } else { &ub };
                        return pack_nan(n, T::ENC) as u64;
                    }
                    // A (denormal) number divided by zero raises only ZE.
                    if (ua.denormal || ub.denormal) && !(OP == DIV && ub.class == Class::Zero) {
                        env.flags |= DE;
                    }
                    let x = match OP {
                        ADD => sf::add(env, &ua, &ub),
                        SUB => sf::add(env, &ua, &ub.neg()),
                        MUL => sf::mul(env, &ua, &ub),
                        _ => sf::div(env, &ua, &ub),
                    };
                    round(env, x, T::FMT) as u64
                }
            }
        }
    }
}

/// MINPS/MAXPS and friends: a NaN in either operand, or two zeros, give the second operand;
/// any NaN is an invalid operation (SDM Vol. 2B "MINPS").
#[inline]
fn min_max<T: Lane>(env: &mut Env, max: bool, a: u64, b: u64, ua: &Unp, ub: &Unp) -> u64 {
    // With DAZ a denormal source reads as a zero, and that zero is what is returned.
    let value = |bits: u64, u: &Unp| -> u64 {
        if u.class == Class::Zero {
            sf::zero(u.sign, T::ENC) as u64
        } else {
            bits
        }
    };
    if ua.is_nan() || ub.is_nan() {
        env.flags |= IE;
        return value(b, ub);
    }
    if ua.denormal || ub.denormal {
        env.flags |= DE;
    }
    let o = compare(ua, ub);
    let pick_a = if max { o.is_gt() } else { o.is_lt() };
    if pick_a {
        value(a, ua)
    } else {
        value(b, ub)
    }
}

/// The CMPPS predicate `imm & 7` (SDM Vol. 2A "CMPPS", Table 3-1): EQ, LT, LE, UNORD, NEQ,
/// NLT, NLE, ORD. LT/LE/NLT/NLE signal on QNaNs too.
#[inline]
fn compare_pred(env: &mut Env, imm: u8, ua: &Unp, ub: &Unp) -> bool {
    let p = imm & 7;
    let unord = ua.is_nan() || ub.is_nan();
    let signaling = matches!(p, 1 | 2 | 5 | 6);
    if ua.class == Class::SNan || ub.class == Class::SNan || (signaling && unord) {
        env.flags |= IE;
    }
    // A NaN operand makes the compare unordered before denormals are looked at.
    if !unord && (ua.denormal || ub.denormal) {
        env.flags |= DE;
    }
    let o = if unord { None } else { Some(compare(ua, ub)) };
    match p {
        0 => o.is_some_and(|o| o.is_eq()),
        1 => o.is_some_and(|o| o.is_lt()),
        2 => o.is_some_and(|o| o.is_le()),
        3 => unord,
        4 => o.is_none_or(|o| o.is_ne()),
        5 => o.is_none_or(|o| o.is_ge()),
        6 => o.is_none_or(|o| o.is_gt()),
        _ => !unord,
    }
}

/// RCPSS/RSQRTSS: the reference CPU's 12-bit approximations (table in `rcp_table`). Denormal
/// inputs count as zeros, tiny results are flushed to zero, no flags are raised (SDM Vol. 2B
/// "RCPSS", "RSQRTSS").
pub fn recip(rsqrt: bool, x: u32) -> u32 {
    let sign = x & 0x8000_0000;
    let e = (x >> 23) & 0xff;
    let f = x & 0x7f_ffff;
    if e == 0xff {
        if f != 0 {
            return x | 0x40_0000; // NaN, quieted
        }
        if rsqrt && sign != 0 {
            return 0xffc0_0000;
        }
        return sign; // ±0
    }
    if e == 0 {
        return sign | 0x7f80_0000; // ±0 and denormals: ±infinity
    }
    if !rsqrt {
        let r = rcp_table::RCP[(f >> 12) as usize] as u32;
        let re = 253 - e as i32; // biased exponent of the result
        if re <= 0 {
            return sign;
        }
        return sign | (re as u32) << 23 | r << 11;
    }
    if sign != 0 {
        return 0xffc0_0000;
    }
    let k = e as i32 - 127;
    let (idx, half) = if k & 1 == 0 {
        ((f >> 13) as usize, k / 2)
    } else {
        (1024 + (f >> 13) as usize, (k - 1) / 2)
    };
    let r = rcp_table::RSQRT[idx] as u32;
    ((126 - half) as u32) << 23 | r << 11
}

// ---- packed and scalar arithmetic -----------------------------------------------------------------

#[inline(always)]
fn fast_env(c: &Cpu) -> (Env, bool) {
    let mx = c.fpu.mxcsr;
    (Env::sse(mx), mx & FAST_MASK == FAST_WANT)
}

/// ADDPS/PD/SS/SD, SUB*, MUL*, DIV*, MIN*, MAX*, SQRT*, RCP*, RSQRT*, CMP*: `OP` on layout `K`.
pub fn arith<const OP: u8, const K: u8, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let d = xmm(x.cpu, op.r1);
    let s = match K {
        PS | PD => src128::<MEM>(x, op, true)?,
        SS => src32::<MEM>(x, op)? as u128,
        _ => src64::<MEM>(x, op)? as u128,
    };
    let (mut env, fast) = fast_env(x.cpu);
    let imm = op.imm as u8;
    let r = match K {
        PS => {
            let mut r = 0u128;
            for i in 0..4 {
                let a = (d >> (32 * i)) as u32 as u64;
                let b = (s >> (32 * i)) as u32 as u64;
                r |= ((lane::<L32, OP>(&mut env, fast, a, b, imm) as u32) as u128) << (32 * i);
            }
            r
        }
        PD => {
            let lo = lane::<L64, OP>(&mut env, fast, d as u64, s as u64, imm);
            let hi = lane::<L64, OP>(&mut env, fast, (d >> 64) as u64, (s >> 64) as u64, imm);
            lo as u128 | (hi as u128) << 64
        }
        SS => {
            let v = lane::<L32, OP>(&mut env, fast, d as u32 as u64, s as u32 as u64, imm);
            (d & !0xffff_ffff) | (v as u32) as u128
        }
        _ => {
            let v = lane::<L64, OP>(&mut env, fast, d as u64, s as u64, imm);
            (d & !(u64::MAX as u128)) | v as u128
        }
    };
    finish(x.cpu, env.flags)?;
    set_xmm(x.cpu, op.r1, r);
    Ok(())
}

/// COMISS/COMISD/UCOMISS/UCOMISD: ZF, PF, CF from an unordered compare; OF, SF, AF cleared
/// (SDM Vol. 2A "COMISS"). COMI* signal on QNaNs, UCOMI* only on SNaNs.
pub fn comi<const DOUBLE: bool, const SIGNALING: bool, const MEM: bool>(
    x: &mut Exec<'_>,
    op: &Op,
) -> R {
    sse_ok(x.cpu)?;
    let mut env = Env::sse(x.cpu.fpu.mxcsr);
    let (ua, ub) = if DOUBLE {
        let b = src64::<MEM>(x, op)?;
        let a = xmm(x.cpu, op.r1) as u64;
        (
            unpack(a as u128, Enc::F64, env.daz),
            unpack(b as u128, Enc::F64, env.daz),
        )
    } else {
        let b = src32::<MEM>(x, op)?;
        let a = xmm(x.cpu, op.r1) as u32;
        (
            unpack(a as u128, Enc::F32, env.daz),
            unpack(b as u128, Enc::F32, env.daz),
        )
    };
    let f = compare_flags(&mut env, SIGNALING, &ua, &ub);
    finish(x.cpu, env.flags)?;
    x.cpu.set_arith(ARITH, f);
    Ok(())
}

/// ZF/PF/CF of an ordered or unordered compare of `a` with `b` (also FCOMI).
pub fn compare_flags(env: &mut Env, signaling: bool, ua: &Unp, ub: &Unp) -> u64 {
    let unord = ua.is_nan() || ub.is_nan();
    if ua.class == Class::SNan || ub.class == Class::SNan || (signaling && unord) {
        env.flags |= IE;
    }
    if unord {
        return ZF | PF | CF;
    }
    if ua.denormal || ub.denormal {
        env.flags |= DE;
    }
    match compare(ua, ub) {
        std::cmp::Ordering::Greater => 0,
        std::cmp::Ordering::Less => CF,
        std::cmp::Ordering::Equal => ZF,
    }
}

// ---- conversions ----------------------------------------------------------------------------------------

/// Float lane → float lane of the other width (CVTSS2SD, CVTSD2SS, ...).
#[inline]
fn cvt_float(env: &mut Env, v: u64, from: Enc, to: Fmt) -> u64 {
    let u = unpack(v as u128, from, env.daz);
    if u.is_nan() {
        if u.class == Class::SNan {
            env.flags |= IE;
        }
        return pack_nan(&u, to.enc) as u64;
    }
    if u.denormal {
        env.flags |= DE;
    }
    round(env, Exact::of(&u), to) as u64
}

/// Float lane → signed integer of `bits` (CVTSS2SI, CVTTPD2DQ, ...): NaN and out of range
/// give the integer indefinite with IE.
#[inline]
fn cvt_int(env: &mut Env, v: u64, from: Enc, bits: u32, trunc: bool) -> u64 {
    let u = unpack(v as u128, from, env.daz);
    let rc = if trunc { RZ } else { env.rc };
    match to_int(env, &u, rc, bits) {
        Some(i) => i as u64 & width_mask(bits),
        None => {
            env.flags |= IE;
            1u64 << (bits - 1)
        }
    }
}

#[inline]
fn width_mask(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Signed integer → float lane, rounded per MXCSR.
#[inline]
fn cvt_from_int(env: &mut Env, v: i64, to: Fmt) -> u64 {
    round(env, Exact::int(v < 0, v.unsigned_abs()), to) as u64
}

/// Conversion kinds (`op.ext`).
pub const CVTPS2PD: u8 = 0;
pub const CVTPD2PS: u8 = 1;
pub const CVTSS2SD: u8 = 2;
pub const CVTSD2SS: u8 = 3;
pub const CVTDQ2PS: u8 = 4;
pub const CVTDQ2PD: u8 = 5;
pub const CVTPS2DQ: u8 = 6;
pub const CVTTPS2DQ: u8 = 7;
pub const CVTPD2DQ: u8 = 8;
pub const CVTTPD2DQ: u8 = 9;

/// XMM ← XMM/m conversions (`KIND` one of the constants above).
pub fn cvt<const KIND: u8, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let d = xmm(x.cpu, op.r1);
    let s: u128 = match KIND {
        CVTPS2PD | CVTDQ2PD => src64::<MEM>(x, op)? as u128,
        CVTSS2SD => src32::<MEM>(x, op)? as u128,
        CVTSD2SS => src64::<MEM>(x, op)? as u128,
        _ => src128::<MEM>(x, op, true)?,
    };
    let mut env = Env::sse(x.cpu.fpu.mxcsr);
    let e = &mut env;
    let l32 = |i: u32| (s >> (32 * i)) as u32 as u64;
    let l64 = |i: u32| (s >> (64 * i)) as u64;
    let r: u128 = match KIND {
        CVTPS2PD => {
            let lo = cvt_float(e, l32(0), Enc::F32, F64);
            let hi = cvt_float(e, l32(1), Enc::F32, F64);
            lo as u128 | (hi as u128) << 64
        }
        CVTPD2PS => {
            let lo = cvt_float(e, l64(0), Enc::F64, F32);
            let hi = cvt_float(e, l64(1), Enc::F64, F32);
            lo as u128 | (hi as u128) << 32
        }
        CVTSS2SD => (d & !(u64::MAX as u128)) | cvt_float(e, l32(0), Enc::F32, F64) as u128,
        CVTSD2SS => (d & !0xffff_ffff) | cvt_float(e, l64(0), Enc::F64, F32) as u128,
        CVTDQ2PS => (0..4).fold(0u128, |r, i| {
            r | (cvt_from_int(e, l32(i) as u32 as i32 as i64, F32) as u128) << (32 * i)
        }),
        CVTDQ2PD => {
            let lo = cvt_from_int(e, l32(0) as u32 as i32 as i64, F64);
            let hi = cvt_from_int(e, l32(1) as u32 as i32 as i64, F64);
            lo as u128 | (hi as u128) << 64
        }
        CVTPS2DQ | CVTTPS2DQ => (0..4).fold(0u128, |r, i| {
            r | (cvt_int(e, l32(i), Enc::F32, 32, KIND == CVTTPS2DQ) as u128) << (32 * i)
        }),
        _ => {
            let t = KIND == CVTTPD2DQ;
            let lo = cvt_int(e, l64(0), Enc::F64, 32, t);
            let hi = cvt_int(e, l64(1), Enc::F64, 32, t);
            lo as u128 | (hi as u128) << 32
        }
    };
    finish(x.cpu, env.flags)?;
    set_xmm(x.cpu, op.r1, r);
    Ok(())
}

/// CVTPI2PS / CVTPI2PD: two 32-bit integers from an MMX register or m64 into the low lanes
/// (CVTPI2PS keeps the upper half of the destination).
pub fn cvtpi2p<const DOUBLE: bool, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    if !MEM {
        mmx_ok(x.cpu)?;
    }
    let s = src_mm::<MEM>(x, op)?;
    let d = xmm(x.cpu, op.r1);
    let mut env = Env::sse(x.cpu.fpu.mxcsr);
    let (a, b) = (s as u32 as i32 as i64, (s >> 32) as u32 as i32 as i64);
    let r = if DOUBLE {
        cvt_from_int(&mut env, a, F64) as u128 | (cvt_from_int(&mut env, b, F64) as u128) << 64
    } else {
        let lo = cvt_from_int(&mut env, a, F32) | cvt_from_int(&mut env, b, F32) << 32;
        (d & !(u64::MAX as u128)) | lo as u128
    };
    finish(x.cpu, env.flags)?;
    set_xmm(x.cpu, op.r1, r);
    Ok(())
}

/// CVT(T)PS2PI / CVT(T)PD2PI: two lanes to 32-bit integers in an MMX register.
pub fn cvtp2pi<const DOUBLE: bool, const TRUNC: bool, const MEM: bool>(
    x: &mut Exec<'_>,
    op: &Op,
) -> R {
    sse_ok(x.cpu)?;
    mmx_ok(x.cpu)?;
    let mut env = Env::sse(x.cpu.fpu.mxcsr);
    let r = if DOUBLE {
        let s = src128::<MEM>(x, op, true)?;
        cvt_int(&mut env, s as u64, Enc::F64, 32, TRUNC)
            | cvt_int(&mut env, (s >> 64) as u64, Enc::F64, 32, TRUNC) << 32
    } else {
        let s = src64::<MEM>(x, op)?;
        cvt_int(&mut env, s as u32 as u64, Enc::F32, 32, TRUNC)
            | cvt_int(&mut env, s >> 32, Enc::F32, 32, TRUNC) << 32
    };
    finish(x.cpu, env.flags)?;
    set_mm(x.cpu, op.r1, r);
    Ok(())
}

/// CVTSI2SS / CVTSI2SD: a 32- or 64-bit integer (`op.size`) from a register or memory.
pub fn cvtsi2s<const DOUBLE: bool, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let v = if MEM {
        let lin = x.lin(op);
        x.read(lin, op.size)?
    } else {
        x.cpu.reg(op.r2, op.size)
    };
    let v = if op.size == 8 {
        v as i64
    } else {
        v as u32 as i32 as i64
    };
    let d = xmm(x.cpu, op.r1);
    let mut env = Env::sse(x.cpu.fpu.mxcsr);
    let r = if DOUBLE {
        (d & !(u64::MAX as u128)) | cvt_from_int(&mut env, v, F64) as u128
    } else {
        (d & !0xffff_ffff) | cvt_from_int(&mut env, v, F32) as u128
    };
    finish(x.cpu, env.flags)?;
    set_xmm(x.cpu, op.r1, r);
    Ok(())
}

/// CVT(T)SS2SI / CVT(T)SD2SI into a 32- or 64-bit register (`op.size`).
pub fn cvts2si<const DOUBLE: bool, const TRUNC: bool, const MEM: bool>(
    x: &mut Exec<'_>,
    op: &Op,
) -> R {
    sse_ok(x.cpu)?;
    let (v, enc) = if DOUBLE {
        (src64::<MEM>(x, op)?, Enc::F64)
    } else {
        (src32::<MEM>(x, op)? as u64, Enc::F32)
    };
    let mut env = Env::sse(x.cpu.fpu.mxcsr);
    let r = cvt_int(&mut env, v, enc, op.size as u32 * 8, TRUNC);
    finish(x.cpu, env.flags)?;
    x.cpu.set_reg(op.r1, op.size, r);
    Ok(())
}

// ---- MXCSR ---------------------------------------------------------------------------------------------

/// LDMXCSR m32: reserved bits set is #GP(0) (SDM Vol. 2A "LDMXCSR").
pub fn ldmxcsr(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let lin = x.lin(op);
    let v = x.read(lin, 4)? as u32;
    if v & !MXCSR_MASK != 0 {
        return Err(gp0());
    }
    x.cpu.fpu.mxcsr = v;
    Ok(())
}

/// STMXCSR m32.
pub fn stmxcsr(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let lin = x.lin(op);
    let v = x.cpu.fpu.mxcsr;
    x.write(lin, 4, v as u64)
}

// ---- translation -------------------------------------------------------------------------------------------

macro_rules! arith_k {
    ($op:expr, $k:expr, $mem:expr) => {
        match $k {
            PS => by_mem!($mem, arith, $op, PS),
            PD => by_mem!($mem, arith, $op, PD),
            SS => by_mem!($mem, arith, $op, SS),
            _ => by_mem!($mem, arith, $op, SD),
        }
    };
}

/// The handler for an SSE/SSE2 floating-point instruction.
pub fn translate(i: &Instruction, op: &mut Op) -> Option<Handler> {
    let m = i.mnemonic();
    let arith_op = match m {
        M::Addps => Some((ADD, PS)),
        M::Addpd => Some((ADD, PD)),
        M::Addss => Some((ADD, SS)),
        M::Addsd => Some((ADD, SD)),
        M::Subps => Some((SUB, PS)),
        M::Subpd => Some((SUB, PD)),
        M::Subss => Some((SUB, SS)),
        M::Subsd => Some((SUB, SD)),
        M::Mulps => Some((MUL, PS)),
        M::Mulpd => Some((MUL, PD)),
        M::Mulss => Some((MUL, SS)),
        M::Mulsd => Some((MUL, SD)),
        M::Divps => Some((DIV, PS)),
        M::Divpd => Some((DIV, PD)),
        M::Divss => Some((DIV, SS)),
        M::Divsd => Some((DIV, SD)),
        M::Minps => Some((MIN, PS)),
        M::Minpd => Some((MIN, PD)),
        M::Minss => Some((MIN, SS)),
        M::Minsd => Some((MIN, SD)),
        M::Maxps => Some((MAX, PS)),
        M::Maxpd => Some((MAX, PD)),
        M::Maxss => Some((MAX, SS)),
        M::Maxsd => Some((MAX, SD)),
        M::Sqrtps => Some((SQRT, PS)),
        M::Sqrtpd => Some((SQRT, PD)),
        M::Sqrtss => Some((SQRT, SS)),
        M::Sqrtsd => Some((SQRT, SD)),
        M::Rcpps => Some((RCP, PS)),
        M::Rcpss => Some((RCP, SS)),
        M::Rsqrtps => Some((RSQRT, PS)),
        M::Rsqrtss => Some((RSQRT, SS)),
        M::Cmpps => Some((CMP, PS)),
        M::Cmppd => Some((CMP, PD)),
        M::Cmpss => Some((CMP, SS)),
        M::Cmpsd => Some((CMP, SD)),
        _ => None,
    };
    if let Some((o, k)) = arith_op {
        op.r1 = xmm_op(i, 0)?;
        let mem = xmm_rm(i, 1, op)?;
        if o == CMP {
            op.imm = i.immediate8() as u64;
        }
        return Some(match o {
            ADD => arith_k!(ADD, k, mem),
            SUB => arith_k!(SUB, k, mem),
            MUL => arith_k!(MUL, k, mem),
            DIV => arith_k!(DIV, k, mem),
            MIN => arith_k!(MIN, k, mem),
            MAX => arith_k!(MAX, k, mem),
            SQRT => arith_k!(SQRT, k, mem),
            RCP => arith_k!(RCP, k, mem),
            RSQRT => arith_k!(RSQRT, k, mem),
            _ => arith_k!(CMP, k, mem),
        });
    }
    let cvt_kind = match m {
        M::Cvtps2pd => Some(CVTPS2PD),
        M::Cvtpd2ps => Some(CVTPD2PS),
        M::Cvtss2sd => Some(CVTSS2SD),
        M::Cvtsd2ss => Some(CVTSD2SS),
        M::Cvtdq2ps => Some(CVTDQ2PS),
        M::Cvtdq2pd => Some(CVTDQ2PD),
        M::Cvtps2dq => Some(CVTPS2DQ),
        M::Cvttps2dq => Some(CVTTPS2DQ),
        M::Cvtpd2dq => Some(CVTPD2DQ),
        M::Cvttpd2dq => Some(CVTTPD2DQ),
        _ => None,
    };
    if let Some(k) = cvt_kind {
        op.r1 = xmm_op(i, 0)?;
        let mem = xmm_rm(i, 1, op)?;
        return Some(match k {
            CVTPS2PD => by_mem!(mem, cvt, CVTPS2PD),
            CVTPD2PS => by_mem!(mem, cvt, CVTPD2PS),
            CVTSS2SD => by_mem!(mem, cvt, CVTSS2SD),
            CVTSD2SS => by_mem!(mem, cvt, CVTSD2SS),
            CVTDQ2PS => by_mem!(mem, cvt, CVTDQ2PS),
            CVTDQ2PD => by_mem!(mem, cvt, CVTDQ2PD),
            CVTPS2DQ => by_mem!(mem, cvt, CVTPS2DQ),
            CVTTPS2DQ => by_mem!(mem, cvt, CVTTPS2DQ),
            CVTPD2DQ => by_mem!(mem, cvt, CVTPD2DQ),
            _ => by_mem!(mem, cvt, CVTTPD2DQ),
        });
    }
    match m {
        M::Comiss | M::Comisd | M::Ucomiss | M::Ucomisd => {
            op.r1 = xmm_op(i, 0)?;
            let mem = xmm_rm(i, 1, op)?;
            Some(match m {
                M::Comiss => by_mem!(mem, comi, false, true),
                M::Comisd => by_mem!(mem, comi, true, true),
                M::Ucomiss => by_mem!(mem, comi, false, false),
                _ => by_mem!(mem, comi, true, false),
            })
        }
        M::Cvtpi2ps | M::Cvtpi2pd => {
            op.r1 = xmm_op(i, 0)?;
            let mem = mm_rm(i, 1, op)?;
            Some(if m == M::Cvtpi2ps {
                by_mem!(mem, cvtpi2p, false)
            } else {
                by_mem!(mem, cvtpi2p, true)
            })
        }
        M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi => {
            op.r1 = mm_op(i, 0)?;
            let mem = xmm_rm(i, 1, op)?;
            Some(match m {
                M::Cvtps2pi => by_mem!(mem, cvtp2pi, false, false),
                M::Cvttps2pi => by_mem!(mem, cvtp2pi, false, true),
                M::Cvtpd2pi => by_mem!(mem, cvtp2pi, true, false),
                _ => by_mem!(mem, cvtp2pi, true, true),
            })
        }
        M::Cvtsi2ss | M::Cvtsi2sd => {
            op.r1 = xmm_op(i, 0)?;
            let mem = super::fpu::mem_op(i, 1);
            if mem {
                op.size = match i.memory_size().size() {
                    8 => 8,
                    _ => 4,
                };
            } else {
                let (r, s) = gpr_op(i, 1)?;
                op.r2 = r;
                op.size = s;
            }
            Some(if m == M::Cvtsi2ss {
                by_mem!(mem, cvtsi2s, false)
            } else {
                by_mem!(mem, cvtsi2s, true)
            })
        }
        M::Cvtss2si | M::Cvttss2si | M::Cvtsd2si | M::Cvttsd2si => {
            let (r, s) = gpr_op(i, 0)?;
            op.r1 = r;
            op.size = s;
            let mem = xmm_rm(i, 1, op)?;
            Some(match m {
                M::Cvtss2si => by_mem!(mem, cvts2si, false, false),
                M::Cvttss2si => by_mem!(mem, cvts2si, false, true),
                M::Cvtsd2si => by_mem!(mem, cvts2si, true, false),
                _ => by_mem!(mem, cvts2si, true, true),
            })
        }
        M::Ldmxcsr if super::fpu::mem_op(i, 0) => Some(ldmxcsr as Handler),
        M::Stmxcsr if super::fpu::mem_op(i, 0) => Some(stmxcsr as Handler),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::exec::softfloat::PE;

    #[test]
    fn reciprocal_special_values() {
        assert_eq!(recip(false, 0x3f80_0000), 0x3f7f_f000);
        assert_eq!(recip(false, 0x4000_0000), 0x3eff_f000);
        assert_eq!(recip(false, 0x7e7f_ffff), 0x0080_0800);
        assert_eq!(recip(false, 0x7e80_0000), 0);
        assert_eq!(recip(false, 0x8000_0001), 0xff80_0000);
        assert_eq!(recip(false, 0xff80_0000), 0x8000_0000);
        assert_eq!(recip(false, 0x7f80_0001), 0x7fc0_0001);
        assert_eq!(recip(true, 0x3f80_0000), 0x3f7f_f000);
        assert_eq!(recip(true, 0x4000_0000), 0x3f34_f800);
        assert_eq!(recip(true, 0x0080_0000), 0x5eff_f000);
        assert_eq!(recip(true, 0x7f7f_ffff), 0x1f80_0800);
        assert_eq!(recip(true, 0xbf80_0000), 0xffc0_0000);
        assert_eq!(recip(true, 0x7f80_0000), 0);
        assert_eq!(recip(true, 0x8000_0000), 0xff80_0000);
    }

    #[test]
    fn unmasked_exception_keeps_only_precomputation_flags() {
        let mut c = Cpu::new(0, crate::emu::tests::dummy_vm(), Vec::new());
        c.cr4 |= crate::emu::cpu::CR4_OSXMMEXCPT;
        c.fpu.mxcsr = 0x1f80 & !(ZE << 7); // ZE unmasked
        assert!(finish(&mut c, ZE | PE).is_err());
        assert_eq!(c.fpu.mxcsr & 0x3f, ZE);
        c.fpu.mxcsr = 0x1f80;
        assert!(finish(&mut c, ZE | PE).is_ok());
        assert_eq!(c.fpu.mxcsr & 0x3f, ZE | PE);
    }
}
