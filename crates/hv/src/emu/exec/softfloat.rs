//! IEEE 754 binary floating point in software, as the x87 FPU and the SSE unit compute it:
//! single, double and double-extended formats (Intel SDM Vol. 1 §4.2.2, §4.8), the four
//! rounding modes, x87 precision control (§8.1.5.2), MXCSR denormals-are-zeros and
//! flush-to-zero (§10.2.3.3-4), and the six exception flags with x86's rules: tininess is
//! detected after rounding (§4.9.1.5), masked underflow is flagged only when the tiny result is
//! also inexact, and unmasked x87 overflow/underflow deliver the result with its exponent
//! adjusted by 24576 (§8.5.4-5).
//!
//! Values are unpacked into [`Unp`] (sign, unbiased exponent, 64-bit significand with the
//! leading one at bit 63); an operation computes an [`Exact`] result (a 128-bit significand
//! whose lowest bit is a sticky bit) and [`round`] rounds and packs it into a [`Fmt`]. Encoded
//! values travel as `u128` holding the format's bits (an 80-bit value: significand in bits
//! 0-63, sign and exponent in bits 64-79, the FXSAVE byte order).
//!
//! NaN operands are not handled here: SSE and x87 propagate them differently (SDM Vol. 1
//! Table 4-7), so their callers do it before calling an arithmetic function.

use std::cmp::Ordering;

/// Exception flags, in MXCSR and x87 FSW bit order (SDM Vol. 1 §4.9.1).
pub const IE: u32 = 0x01;
pub const DE: u32 = 0x02;
pub const ZE: u32 = 0x04;
pub const OE: u32 = 0x08;
pub const UE: u32 = 0x10;
pub const PE: u32 = 0x20;
/// All six.
pub const ALL: u32 = 0x3f;

/// Rounding control, MXCSR.RC / FCW.RC encoding (SDM Vol. 1 Table 4-8).
pub const RNE: u8 = 0;
pub const RD: u8 = 1;
pub const RU: u8 = 2;
pub const RZ: u8 = 3;

/// The x87 bias adjustment for unmasked overflow and underflow (SDM Vol. 1 §8.5.4).
const BIAS_ADJUST: i32 = 24576;

/// The environment of one operation: rounding, masks, DAZ/FTZ; collects the raised flags.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    pub rc: u8,
    /// Masked exceptions (`IE`..`PE` bits).
    pub masks: u32,
    /// SSE flush-to-zero (only with underflow masked).
    pub ftz: bool,
    /// SSE denormals-are-zeros (applied by [`unpack`] when asked).
    pub daz: bool,
    /// Flags raised so far.
    pub flags: u32,
    /// The last rounding increased the magnitude (x87 C1).
    pub up: bool,
}

impl Env {
    /// The SSE environment of `mxcsr` (SDM Vol. 1 §10.2.3).
    pub fn sse(mxcsr: u32) -> Env {
        Env {
            rc: ((mxcsr >> 13) & 3) as u8,
            masks: (mxcsr >> 7) & ALL,
            ftz: mxcsr & (1 << 15) != 0,
            daz: mxcsr & (1 << 6) != 0,
            flags: 0,
            up: false,
        }
    }

    /// The x87 environment of control word `fcw` (SDM Vol. 1 §8.1.5).
    pub fn x87(fcw: u16) -> Env {
        Env {
            rc: ((fcw >> 10) & 3) as u8,
            masks: fcw as u32 & ALL,
            ftz: false,
            daz: false,
            flags: 0,
            up: false,
        }
    }
}

/// An encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    F32,
    F64,
    F80,
}

/// A destination format: encoding, significand precision and exponent range (unbiased).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fmt {
    pub prec: u32,
    pub emin: i32,
    pub emax: i32,
    pub enc: Enc,
}

pub const F32: Fmt = Fmt {
    prec: 24,
    emin: -126,
    emax: 127,
    enc: Enc::F32,
};
pub const F64: Fmt = Fmt {
    prec: 53,
    emin: -1022,
    emax: 1023,
    enc: Enc::F64,
};
pub const F80: Fmt = Fmt {
    prec: 64,
    emin: -16382,
    emax: 16383,
    enc: Enc::F80,
};

/// The x87 register format under precision control `pc` (FCW bits 8-9): the significand is
/// rounded to 24, 53 or 64 bits, the exponent range stays the extended one (§8.1.5.2).
pub fn x87_fmt(pc: u16) -> Fmt {
    Fmt {
        prec: match pc & 3 {
            0 => 24,
            2 => 53,
            _ => 64,
        },
        ..F80
    }
}

/// Operand classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Zero,
    /// A finite nonzero number (normal or denormal).
    Num,
    Inf,
    QNan,
    SNan,
    /// An 80-bit encoding the x87 rejects (unnormal, pseudo-NaN, pseudo-infinity).
    Unsupported,
}

/// An unpacked operand. For `Num`, value = `sig` × 2^(`exp` − 63) with bit 63 of `sig` set.
/// For NaNs, `sig` is the payload left-aligned as in the 80-bit format (bit 63 set, bit 62 the
/// quiet bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unp {
    pub class: Class,
    pub sign: bool,
    pub exp: i32,
    pub sig: u64,
    /// The encoding was a denormal (or, for 80 bits, a pseudo-denormal).
    pub denormal: bool,
}

impl Unp {
    pub const fn zero(sign: bool) -> Unp {
        Unp {
            class: Class::Zero,
            sign,
            exp: 0,
            sig: 0,
            denormal: false,
        }
    }

    #[inline]
    pub fn is_nan(&self) -> bool {
        matches!(self.class, Class::QNan | Class::SNan)
    }

    /// Negated (FCHS, subtraction).
    #[inline]
    pub fn neg(mut self) -> Unp {
        self.sign = !self.sign;
        self
    }
}

/// Unpack `bits` of encoding `enc`; with `daz`, denormals read as zeros of the same sign.
#[inline]
pub fn unpack(bits: u128, enc: Enc, daz: bool) -> Unp {
    match enc {
        Enc::F32 => {
            let b = bits as u32;
            unpack_ieee(
                b >> 31 != 0,
                (b >> 23) & 0xff,
                (b as u64 & 0x7f_ffff) << 40,
                0xff,
                127,
                daz,
            )
        }
        Enc::F64 => {
            let b = bits as u64;
            unpack_ieee(
                b >> 63 != 0,
                ((b >> 52) & 0x7ff) as u32,
                (b & 0xf_ffff_ffff_ffff) << 11,
                0x7ff,
                1023,
                daz,
            )
        }
        Enc::F80 => unpack80((bits >> 64) as u16, bits as u64),
    }
}

/// Single/double: `frac` is the fraction left-aligned at bit 62.
#[inline(always)]
fn unpack_ieee(sign: bool, e: u32, frac: u64, emax_field: u32, bias: i32, daz: bool) -> Unp {
    if e == 0 {
        if frac == 0 || daz {
            return Unp::zero(sign);
        }
        let lz = frac.leading_zeros();
        return Unp {
            class: Class::Num,
            sign,
            exp: 1 - bias - lz as i32,
            sig: frac << lz,
            denormal: true,
        };
    }
    if e == emax_field {
        return Unp {
            class: if frac == 0 {
                Class::Inf
            } else if frac & (1 << 62) != 0 {
                Class::QNan
            } else {
                Class::SNan
            },
            sign,
            exp: 0,
            sig: (1 << 63) | frac,
            denormal: false,
        };
    }
    Unp {
        class: Class::Num,
        sign,
        exp: e as i32 - bias,
        sig: (1 << 63) | frac,
        denormal: false,
    }
}

/// Double-extended (SDM Vol. 1 §4.2.2, Table 8-3 for the unsupported encodings).
#[inline]
pub fn unpack80(se: u16, m: u64) -> Unp {
    let sign = se & 0x8000 != 0;
    let e = (se & 0x7fff) as i32;
    let j = m >> 63 != 0;
    let mut u = Unp {
        class: Class::Num,
        sign,
        exp: 0,
        sig: m,
        denormal: false,
    };
    if e == 0 {
        if m == 0 {
            return Unp::zero(sign);
        }
        let lz = m.leading_zeros();
        u.exp = -16382 - lz as i32;
        u.sig = m << lz;
        u.denormal = true;
    } else if e == 0x7fff {
        u.class = if !j {
            Class::Unsupported
        } else if m << 1 == 0 {
            Class::Inf
        } else if m & (1 << 62) != 0 {
            Class::QNan
        } else {
            Class::SNan
        };
    } else if !j {
        u.class = Class::Unsupported;
    } else {
        u.exp = e - 16383;
    }
    u
}

/// An exact (or sticky-bit exact) result before rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exact {
    Zero(bool),
    Inf(bool),
    /// The default NaN (invalid operation; `IE` already raised).
    Nan,
    /// value = `sig` × 2^(`exp` − 127), bit 127 of `sig` set; bit 0 may be a sticky bit.
    Num {
        sign: bool,
        exp: i32,
        sig: u128,
    },
}

impl Exact {
    /// The exact value of a non-NaN operand (NaNs and unsupported encodings give `Nan`).
    #[inline]
    pub fn of(u: &Unp) -> Exact {
        match u.class {
            Class::Zero => Exact::Zero(u.sign),
            Class::Inf => Exact::Inf(u.sign),
            Class::Num => Exact::Num {
                sign: u.sign,
                exp: u.exp,
                sig: (u.sig as u128) << 64,
            },
            _ => Exact::Nan,
        }
    }

    /// An integer `sign`·`mag`.
    #[inline]
    pub fn int(sign: bool, mag: u64) -> Exact {
        if mag == 0 {
            return Exact::Zero(sign);
        }
        let lz = mag.leading_zeros();
        Exact::Num {
            sign,
            exp: 63 - lz as i32,
            sig: ((mag << lz) as u128) << 64,
        }
    }
}

// ---- packing ------------------------------------------------------------------------------------

/// The default NaN (the "real indefinite", SDM Vol. 1 §4.8.3.7).
#[inline]
pub fn default_nan(enc: Enc) -> u128 {
    match enc {
        Enc::F32 => 0xffc0_0000,
        Enc::F64 => 0xfff8_0000_0000_0000,
        Enc::F80 => (0xffffu128 << 64) | 0xc000_0000_0000_0000,
    }
}

/// ±infinity.
#[inline]
pub fn inf(sign: bool, enc: Enc) -> u128 {
    let s = sign as u128;
    match enc {
        Enc::F32 => (s << 31) | 0x7f80_0000,
        Enc::F64 => (s << 63) | 0x7ff0_0000_0000_0000,
        Enc::F80 => (((s << 15) | 0x7fff) << 64) | (1 << 63),
    }
}

/// ±0.
#[inline]
pub fn zero(sign: bool, enc: Enc) -> u128 {
    let s = sign as u128;
    match enc {
        Enc::F32 => s << 31,
        Enc::F64 => s << 63,
        Enc::F80 => s << 79,
    }
}

/// Pack a NaN operand (its payload truncated to the format), quieted.
#[inline]
pub fn pack_nan(u: &Unp, enc: Enc) -> u128 {
    let s = u.sign as u128;
    let sig = u.sig | (1 << 62);
    match enc {
        Enc::F32 => (s << 31) | 0x7f80_0000 | ((sig >> 40) as u128 & 0x7f_ffff),
        Enc::F64 => (s << 63) | 0x7ff0_0000_0000_0000 | ((sig >> 11) as u128 & 0xf_ffff_ffff_ffff),
        Enc::F80 => (((s << 15) | 0x7fff) << 64) | (sig | (1 << 63)) as u128,
    }
}

/// Pack a rounded significand `m` (`fmt.prec` bits; leading bit at `prec − 1` for a normal
/// number, below it for a denormal with exponent `emin`) with unbiased exponent `e`.
#[inline]
fn pack(sign: bool, e: i32, m: u128, fmt: Fmt) -> u128 {
    let s = sign as u128;
    let normal = (m >> (fmt.prec - 1)) & 1 != 0;
    match fmt.enc {
        Enc::F32 => {
            let be = if normal { (e + 127) as u128 & 0xff } else { 0 };
            (s << 31) | (be << 23) | (m & 0x7f_ffff)
        }
        Enc::F64 => {
            let be = if normal {
                (e + 1023) as u128 & 0x7ff
            } else {
                0
            };
            (s << 63) | (be << 52) | (m & 0xf_ffff_ffff_ffff)
        }
        Enc::F80 => {
            let be = if normal {
                (e + 16383) as u128 & 0x7fff
            } else {
                0
            };
            let mant = (m << (64 - fmt.prec)) & u64::MAX as u128;
            (((s << 15) | be) << 64) | mant
        }
    }
}

/// The largest finite value.
#[inline]
fn max_finite(sign: bool, fmt: Fmt) -> u128 {
    pack(sign, fmt.emax, (1u128 << fmt.prec) - 1, fmt)
}

/// `v >> d`, with the bits shifted out or-ed into bit 0.
#[inline(always)]
pub fn shr_sticky(v: u128, d: u32) -> u128 {
    if d == 0 {
        v
    } else if d >= 128 {
        (v != 0) as u128
    } else {
        (v >> d) | ((v & ((1u128 << d) - 1)) != 0) as u128
    }
}

/// Round `sig` to `sig >> shift` (1 <= shift < 128). Returns the rounded value (which may
/// have carried into one more bit), whether bits were lost, whether it was incremented.
#[inline(always)]
fn round_bits(sig: u128, shift: u32, sign: bool, rc: u8) -> (u128, bool, bool) {
    let m = sig >> shift;
    let rem = sig & ((1u128 << shift) - 1);
    let half = 1u128 << (shift - 1);
    let inexact = rem != 0;
    let inc = match rc {
        RNE => rem > half || (rem == half && m & 1 != 0),
        RD => sign && inexact,
        RU => !sign && inexact,
        _ => false,
    };
    (m + inc as u128, inexact, inc)
}

/// Round and pack an exact result into `fmt`, raising flags in `env` (SDM Vol. 1 §4.8.4,
/// §4.9.1.4-6).
pub fn round(env: &mut Env, x: Exact, fmt: Fmt) -> u128 {
    env.up = false;
    match x {
        Exact::Zero(s) => zero(s, fmt.enc),
        Exact::Inf(s) => inf(s, fmt.enc),
        Exact::Nan => default_nan(fmt.enc),
        Exact::Num { sign, exp, sig } => round_num(env, sign, exp, sig, fmt),
    }
}

fn round_num(env: &mut Env, sign: bool, exp: i32, sig: u128, fmt: Fmt) -> u128 {
    let shift = 128 - fmt.prec;
    // Rounded to the precision with an unbounded exponent: decides tininess (after rounding)
    // and overflow, and is the bias-adjusted result.
    let (mut m, inexact, up) = round_bits(sig, shift, sign, env.rc);
    let mut e = exp;
    if m >> fmt.prec != 0 {
        m >>= 1;
        e += 1;
    }
    if e > fmt.emax {
        if env.masks & OE == 0 {
            // Unmasked: the result rounded with an unbounded exponent decides PE; the x87
            // delivers it with the exponent adjusted, SSE raises #XM without a result. Beyond
            // the reach of the adjustment (only FSCALE gets there) the result is infinity.
            if e - BIAS_ADJUST > fmt.emax {
                env.flags |= OE | PE;
                env.up = true;
                return inf(sign, fmt.enc);
            }
            env.flags |= OE;
            if inexact {
                env.flags |= PE;
            }
            env.up = up;
            return pack(sign, e - BIAS_ADJUST, m, fmt);
        }
        env.flags |= OE | PE;
        let to_inf = match env.rc {
            RNE => true,
            RD => sign,
            RU => !sign,
            _ => false,
        };
        env.up = to_inf;
        return if to_inf {
            inf(sign, fmt.enc)
        } else {
            max_finite(sign, fmt)
        };
    }
    if exp >= fmt.emin {
        if inexact {
            env.flags |= PE;
        }
        env.up = up;
        return pack(sign, e, m, fmt);
    }
    // Below the normal range: denormalize, then round at the same bit position.
    let tiny = e < fmt.emin;
    let (m2, inexact2, up2) = round_bits(
        shr_sticky(sig, (fmt.emin - exp) as u32),
        shift,
        sign,
        env.rc,
    );
    if tiny {
        if env.masks & UE == 0 {
            // Unmasked: as for overflow (tiny is enough, exact or not); beyond the reach of
            // the adjustment the result is zero.
            if e + BIAS_ADJUST < fmt.emin {
                env.flags |= UE | PE;
                return zero(sign, fmt.enc);
            }
            env.flags |= UE;
            if inexact {
                env.flags |= PE;
            }
            env.up = up;
            return pack(sign, e + BIAS_ADJUST, m, fmt);
        } else if env.ftz {
            env.flags |= UE | PE;
            return zero(sign, fmt.enc);
        } else if inexact2 {
            env.flags |= UE;
        }
    }
    if inexact2 {
        env.flags |= PE;
    }
    env.up = up2;
    pack(sign, fmt.emin, m2, fmt)
}

// ---- arithmetic -------------------------------------------------------------------------------

/// `a + b` (SDM Vol. 1 §4.8.3, Table 4-? for the special cases). No NaN operands.
pub fn add(env: &mut Env, a: &Unp, b: &Unp) -> Exact {
    use Class::*;
    match (a.class, b.class) {
        (Inf, Inf) => {
            if a.sign == b.sign {
                Exact::Inf(a.sign)
            } else {
                env.flags |= IE;
                Exact::Nan
            }
        }
        (Inf, _) => Exact::Inf(a.sign),
        (_, Inf) => Exact::Inf(b.sign),
        (Zero, Zero) => Exact::Zero(if a.sign == b.sign {
            a.sign
        } else {
            env.rc == RD
        }),
        (Zero, _) => Exact::of(b),
        (_, Zero) => Exact::of(a),
        _ => {
            // Order by magnitude.
            let (big, small) = if (a.exp, a.sig) >= (b.exp, b.sig) {
                (a, b)
            } else {
                (b, a)
            };
            let d = (big.exp - small.exp) as u32;
            let x = (big.sig as u128) << 63;
            let y = shr_sticky((small.sig as u128) << 63, d);
            let r = if a.sign == b.sign { x + y } else { x - y };
            if r == 0 {
                return Exact::Zero(env.rc == RD);
            }
            let lz = r.leading_zeros();
            Exact::Num {
                sign: big.sign,
                exp: big.exp + 1 - lz as i32,
                sig: r << lz,
            }
        }
    }
}

/// `a × b`. No NaN operands.
pub fn mul(env: &mut Env, a: &Unp, b: &Unp) -> Exact {
    use Class::*;
    let sign = a.sign != b.sign;
    match (a.class, b.class) {
        (Inf, Zero) | (Zero, Inf) => {
            env.flags |= IE;
            Exact::Nan
        }
        (Inf, _) | (_, Inf) => Exact::Inf(sign),
        (Zero, _) | (_, Zero) => Exact::Zero(sign),
        _ => {
            let p = a.sig as u128 * b.sig as u128;
            let (sig, exp) = if p >> 127 != 0 {
                (p, a.exp + b.exp + 1)
            } else {
                (p << 1, a.exp + b.exp)
            };
            Exact::Num { sign, exp, sig }
        }
    }
}

/// `a ÷ b`. No NaN operands.
pub fn div(env: &mut Env, a: &Unp, b: &Unp) -> Exact {
    use Class::*;
    let sign = a.sign != b.sign;
    match (a.class, b.class) {
        (Inf, Inf) | (Zero, Zero) => {
            env.flags |= IE;
            Exact::Nan
        }
        (Inf, _) => Exact::Inf(sign),
        (_, Inf) | (Zero, _) => Exact::Zero(sign),
        (_, Zero) => {
            env.flags |= ZE;
            Exact::Inf(sign)
        }
        _ => {
            let bs = b.sig as u128;
            let n1 = (a.sig as u128) << 63;
            let (q1, r1) = (n1 / bs, n1 % bs);
            let n2 = r1 << 64;
            let (q2, r2) = (n2 / bs, n2 % bs);
            let q = (q1 << 64) | q2;
            let lz = q.leading_zeros();
            Exact::Num {
                sign,
                exp: a.exp - b.exp - lz as i32,
                sig: (q << lz) | (r2 != 0) as u128,
            }
        }
    }
}

/// Integer square root of `n`: the largest `r` with `r²` <= `n`.
pub fn isqrt(n: u128) -> u64 {
    if n == 0 {
        return 0;
    }
    // A float estimate, one Newton step, then exact correction.
    let mut r = ((n as f64).sqrt() as u128).clamp(1, u64::MAX as u128);
    r = (r + n / r) / 2;
    r = r.min(u64::MAX as u128);
    while r * r > n {
        r -= 1;
    }
    while r < u64::MAX as u128 && (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r as u64
}

/// `√a`. No NaN operands.
pub fn sqrt(env: &mut Env, a: &Unp) -> Exact {
    match a.class {
        Class::Zero => Exact::Zero(a.sign),
        _ if a.sign => {
            env.flags |= IE;
            Exact::Nan
        }
        Class::Inf => Exact::Inf(false),
        _ => {
            // value = sig × 2^(exp − 63) = n × 2^t with t even and n in [2^126, 2^128).
            let t = a.exp - 63;
            let (n, t) = if (t - 64) % 2 == 0 {
                ((a.sig as u128) << 64, t - 64)
            } else {
                ((a.sig as u128) << 63, t - 63)
            };
            let r = isqrt(n);
            let rem = n - r as u128 * r as u128;
            // The fraction of the root beyond r is above one half exactly when rem > r.
            let sig = ((r as u128) << 64)
                | if rem > r as u128 { 1 << 63 } else { 0 }
                | (rem != 0) as u128;
            Exact::Num {
                sign: false,
                exp: t / 2 + 63,
                sig,
            }
        }
    }
}

/// Scale a number by 2^n (FSCALE; exact before rounding).
pub fn scale(x: Exact, n: i32) -> Exact {
    match x {
        Exact::Num { sign, exp, sig } => Exact::Num {
            sign,
            exp: exp.saturating_add(n),
            sig,
        },
        other => other,
    }
}

/// Compare two non-NaN operands (zeros of either sign are equal).
pub fn compare(a: &Unp, b: &Unp) -> Ordering {
    let mag = |u: &Unp| -> (u8, i32, u64) {
        match u.class {
            Class::Zero => (0, 0, 0),
            Class::Inf => (2, 0, 0),
            _ => (1, u.exp, u.sig),
        }
    };
    let neg_a = a.sign && a.class != Class::Zero;
    let neg_b = b.sign && b.class != Class::Zero;
    match (neg_a, neg_b) {
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => mag(a).cmp(&mag(b)),
        (true, true) => mag(b).cmp(&mag(a)),
    }
}

/// Round a number to an integer magnitude under `rc`: (magnitude, inexact, incremented).
/// `None` when the magnitude is 2^64 or more. Zeros give 0.
pub fn to_int_mag(u: &Unp, rc: u8) -> Option<(u64, bool, bool)> {
    match u.class {
        Class::Zero => Some((0, false, false)),
        Class::Num => {
            if u.exp >= 64 {
                return None;
            }
            if u.exp >= 63 {
                return Some((u.sig, false, false));
            }
            // 64 fraction bits below the integer part.
            let fx = shr_sticky((u.sig as u128) << 64, (63 - u.exp) as u32);
            let int = (fx >> 64) as u64;
            let frac = fx as u64;
            let half = 1u64 << 63;
            let inexact = frac != 0;
            let inc = match rc {
                RNE => frac > half || (frac == half && int & 1 != 0),
                RD => u.sign && inexact,
                RU => !u.sign && inexact,
                _ => false,
            };
            let (v, o) = int.overflowing_add(inc as u64);
            if o {
                return None;
            }
            Some((v, inexact, inc))
        }
        _ => None,
    }
}

/// Convert to a signed integer of `bits` bits (16, 32, 64) under `rc` (CVTSD2SI, FIST).
/// `None` is the invalid-operation case (NaN, infinity, out of range): the caller raises `IE`
/// and stores the integer indefinite. Raises `PE` and sets `env.up` otherwise.
pub fn to_int(env: &mut Env, u: &Unp, rc: u8, bits: u32) -> Option<i64> {
    let (mag, inexact, inc) = to_int_mag(u, rc)?;
    let limit = 1u64 << (bits - 1);
    let v = if u.sign {
        if mag > limit {
            return None;
        }
        (mag as i64).wrapping_neg()
    } else {
        if mag >= limit {
            return None;
        }
        mag as i64
    };
    if inexact {
        env.flags |= PE;
    }
    env.up = inc;
    Some(v)
}

/// Round to an integral value in the same format (FRNDINT, SDM Vol. 2A "FRNDINT").
pub fn round_to_integral(env: &mut Env, u: &Unp) -> Exact {
    match u.class {
        Class::Num if u.exp < 63 => {
            let (mag, inexact, inc) = to_int_mag(u, env.rc).unwrap_or((0, false, false));
            if inexact {
                env.flags |= PE;
            }
            env.up = inc;
            Exact::int(u.sign, mag)
        }
        _ => Exact::of(u),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rc: u8) -> Env {
        Env {
            rc,
            masks: ALL,
            ftz: false,
            daz: false,
            flags: 0,
            up: false,
        }
    }

    fn f64op(op: u8, a: f64, b: f64, rc: u8) -> (u64, u32) {
        let mut e = env(rc);
        let ua = unpack(a.to_bits() as u128, Enc::F64, false);
        let ub = unpack(b.to_bits() as u128, Enc::F64, false);
        let x = match op {
            0 => add(&mut e, &ua, &ub),
            1 => add(&mut e, &ua, &ub.neg()),
            2 => mul(&mut e, &ua, &ub),
            3 => div(&mut e, &ua, &ub),
            _ => sqrt(&mut e, &ua),
        };
        (round(&mut e, x, F64) as u64, e.flags)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn matches_host_double_rounding_to_nearest() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..200_000 {
            let mut a = f64::from_bits(r.next());
            let mut b = f64::from_bits(r.next());
            if i % 3 == 0 {
                // Nearby exponents exercise cancellation and rounding.
                b = f64::from_bits((a.to_bits() & 0xfff0_0000_0000_0000) | (r.next() >> 12));
            }
            if i % 7 == 0 {
                a = f64::from_bits(r.next() >> 12); // denormal
            }
            if a.is_nan() || b.is_nan() {
                continue;
            }
            for op in 0..5u8 {
                let host = match op {
                    0 => a + b,
                    1 => a - b,
                    2 => a * b,
                    3 => a / b,
                    _ => a.sqrt(),
                };
                let (got, _) = f64op(op, a, b, RNE);
                if host.is_nan() {
                    assert_eq!(got, 0xfff8_0000_0000_0000, "op {op} {a:e} {b:e}");
                } else {
                    assert_eq!(got, host.to_bits(), "op {op} {a:e} {b:e}");
                }
            }
        }
    }

    #[test]
    fn directed_rounding_and_flags() {
        // 1 + 2^-60 in the four modes.
        let a = 1.0f64;
        let b = 2f64.powi(-60);
        assert_eq!(f64op(0, a, b, RNE), (1.0f64.to_bits(), PE));
        assert_eq!(f64op(0, a, b, RU), (1.0f64.to_bits() + 1, PE));
        assert_eq!(f64op(0, a, b, RZ), (1.0f64.to_bits(), PE));
        assert_eq!(f64op(0, -a, -b, RD), ((-1.0f64).to_bits() + 1, PE));
        // x - x is -0 only when rounding down.
        assert_eq!(f64op(1, 3.0, 3.0, RD).0, (-0.0f64).to_bits());
        assert_eq!(f64op(1, 3.0, 3.0, RNE).0, 0);
        // Overflow: infinity or the largest finite number.
        assert_eq!(
            f64op(2, f64::MAX, 2.0, RNE),
            (f64::INFINITY.to_bits(), OE | PE)
        );
        assert_eq!(f64op(2, f64::MAX, 2.0, RZ), (f64::MAX.to_bits(), OE | PE));
        assert_eq!(
            f64op(2, -f64::MAX, 2.0, RU),
            ((-f64::MAX).to_bits(), OE | PE)
        );
        // Underflow: exact denormals raise nothing, inexact ones UE|PE.
        let tiny = f64::MIN_POSITIVE;
        assert_eq!(f64op(3, tiny, 4.0, RNE), ((tiny / 4.0).to_bits(), 0));
        assert_eq!(f64op(3, tiny, 3.0, RNE), ((tiny / 3.0).to_bits(), UE | PE));
        // Invalid and divide-by-zero.
        assert_eq!(f64op(1, f64::INFINITY, f64::INFINITY, RNE).1, IE);
        assert_eq!(f64op(3, 1.0, 0.0, RNE), (f64::INFINITY.to_bits(), ZE));
        assert_eq!(f64op(4, -1.0, 0.0, RNE).1, IE);
        assert_eq!(f64op(4, -0.0, 0.0, RNE), ((-0.0f64).to_bits(), 0));
    }

    #[test]
    fn tininess_is_detected_after_rounding() {
        // The largest denormal plus half an ulp rounds up to the smallest normal: not tiny,
        // so no UE (x86 detects tininess after rounding), but inexact.
        let mut e = env(RNE);
        let x = Exact::Num {
            sign: false,
            exp: -1023,
            sig: u128::MAX, // just below 2^-1022
        };
        assert_eq!(round(&mut e, x, F64) as u64, f64::MIN_POSITIVE.to_bits());
        assert_eq!(e.flags, PE);
    }

    #[test]
    fn flush_to_zero_and_bias_adjust() {
        let mut e = env(RNE);
        e.ftz = true;
        let x = Exact::Num {
            sign: true,
            exp: -1030,
            sig: 1 << 127,
        };
        assert_eq!(round(&mut e, x, F64) as u64, (-0.0f64).to_bits());
        assert_eq!(e.flags, UE | PE);
        // x87 unmasked overflow: exponent reduced by 24576.
        let mut e = Env::x87(0x037f & !(OE as u16));
        let x = Exact::Num {
            sign: false,
            exp: 16384,
            sig: 1 << 127,
        };
        let r = round(&mut e, x, F80);
        assert_eq!((r >> 64) as u16, (16384 - 24576 + 16383) as u16);
        assert_eq!(e.flags, OE);
    }

    #[test]
    fn extended_precision_control() {
        // 1/3 at 24, 53 and 64 bits.
        for (pc, bits) in [(0u16, 24u32), (2, 53), (3, 64)] {
            let mut e = Env::x87(0x037f);
            let one = unpack80(0x3fff, 1 << 63);
            let three = unpack80(0x4000, 0xc000_0000_0000_0000);
            let q = div(&mut e, &one, &three);
            let r = round(&mut e, q, x87_fmt(pc));
            let m = r as u64;
            assert_eq!((r >> 64) as u16, 0x3ffd);
            assert!(m.trailing_zeros() >= 64 - bits, "pc {pc}");
            // 1/3 = 1.0101...b × 2^-2: an even precision rounds up, an odd one down.
            let pattern = u128::MAX / 3 * 2; // 0b1010...10
            let want = (pattern >> (128 - bits)) as u64 + (bits % 2 == 0) as u64;
            assert_eq!(m >> (64 - bits), want, "pc {pc}");
            assert_eq!(e.flags, PE);
        }
    }

    #[test]
    fn integer_conversions() {
        let mut e = env(RNE);
        let u = |v: f64| unpack(v.to_bits() as u128, Enc::F64, false);
        assert_eq!(to_int(&mut e, &u(2.5), RNE, 32), Some(2));
        assert_eq!(to_int(&mut e, &u(3.5), RNE, 32), Some(4));
        assert_eq!(to_int(&mut e, &u(-2.5), RD, 32), Some(-3));
        assert_eq!(to_int(&mut e, &u(-2.5), RZ, 32), Some(-2));
        assert_eq!(
            to_int(&mut e, &u(2147483647.0), RNE, 32),
            Some(i32::MAX as i64)
        );
        assert_eq!(to_int(&mut e, &u(2147483648.0), RNE, 32), None);
        assert_eq!(
            to_int(&mut e, &u(-2147483648.0), RNE, 32),
            Some(i32::MIN as i64)
        );
        assert_eq!(
            to_int(&mut e, &u(-(2f64.powi(63))), RNE, 64),
            Some(i64::MIN)
        );
        assert_eq!(to_int(&mut e, &u(2f64.powi(63)), RNE, 64), None);
        assert_eq!(to_int(&mut e, &u(-0.4), RU, 16), Some(0));
        let mut e = env(RNE);
        let x = round_to_integral(&mut e, &u(-0.3));
        assert_eq!(round(&mut e, x, F64) as u64, (-0.0f64).to_bits());
        assert_eq!(Exact::int(false, 10), Exact::of(&u(10.0)));
    }

    #[test]
    fn ordering() {
        let u = |v: f64| unpack(v.to_bits() as u128, Enc::F64, false);
        let vals = [
            f64::NEG_INFINITY,
            -3.0,
            -1e-310,
            -0.0,
            0.0,
            1e-310,
            2.0,
            f64::INFINITY,
        ];
        for a in vals {
            for b in vals {
                assert_eq!(compare(&u(a), &u(b)), a.partial_cmp(&b).unwrap(), "{a} {b}");
            }
        }
    }

    #[test]
    fn integer_square_root() {
        for n in [
            0u128,
            1,
            2,
            3,
            4,
            15,
            16,
            17,
            u64::MAX as u128,
            u128::MAX,
            1 << 126,
        ] {
            let r = isqrt(n) as u128;
            assert!(r * r <= n);
            assert!((r + 1).checked_mul(r + 1).is_none_or(|s| s > n));
        }
    }
}
