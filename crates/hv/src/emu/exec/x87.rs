//! The x87 FPU (Intel SDM Vol. 1 chapter 8, Vol. 2 instruction pages): the register stack
//! (TOP, tags, stack overflow/underflow), loads and stores of every memory format, the
//! arithmetic in 80-bit extended precision with precision and rounding control (through
//! [`softfloat`](super::softfloat), exact), compares, condition codes, the control
//! instructions and FCMOVcc. Transcendentals, FPREM, FSCALE and FXTRACT are in `x87_math`;
//! environment and state save/restore in `fxsave`.
//!
//! `Cpu::fpu.fpr[i]` is ST(i); `ftwx` bit p is the tag of physical register p = (TOP + i) mod 8.
//! Exception flags go to FSW; an unmasked one also sets ES and B and is reported (#MF) at the
//! next waiting instruction (`fpu::pending`). Masked responses (SDM Vol. 1 §8.5): invalid
//! operations give the indefinite QNaN, stack underflow reads an empty register as that NaN,
//! stack overflow pushes it. With an unmasked IE, DE or ZE the destination and TOP are left
//! unchanged; unmasked OE/UE deliver the bias-adjusted result (§8.5.4-5).

use iced_x86::{Instruction, MemorySize, Mnemonic as M};

use super::fpu::{
    mem_op, st_op, x87_ok, x87_ok_nowait, FSW_B, FSW_C0, FSW_C1, FSW_C2, FSW_C3, FSW_ES, FSW_SF,
    FSW_TOP,
};
use super::softfloat::{
    self as sf, default_nan, pack_nan, round, to_int, unpack, unpack80, x87_fmt, Class, Enc, Env,
    Exact, Unp, ALL, DE, F32, F64, F80, IE, PE, RNE, RU, RZ, ZE,
};
use super::{x87_math, Exec, Handler, Op};
use crate::emu::cpu::{Cpu, CR0_MP, CR0_TS, R, RAX};
use crate::emu::flags::{ARITH, CF, PF, ZF};

/// The 80 bits of a register image.
pub const MASK80: u128 = (1 << 80) - 1;
/// The QNaN floating-point indefinite.
pub const INDEF: u128 = (0xffffu128 << 64) | 0xc000_0000_0000_0000;

// ---- the register stack ----------------------------------------------------------------------------

#[inline(always)]
pub fn top(c: &Cpu) -> u32 {
    ((c.fpu.fsw & FSW_TOP) >> 11) as u32
}

#[inline(always)]
fn set_top(c: &mut Cpu, t: u32) {
    c.fpu.fsw = (c.fpu.fsw & !FSW_TOP) | (((t & 7) as u16) << 11);
}

/// Load a new status word, keeping the physical registers in place: `fpr` is in ST order, so
/// it turns with TOP.
#[inline]
pub fn set_fsw(c: &mut Cpu, fsw: u16) {
    let old = top(c);
    let new = ((fsw & FSW_TOP) >> 11) as u32;
    c.fpu.fpr.rotate_left(((new + 8 - old) & 7) as usize);
    c.fpu.fsw = fsw;
}

/// FNINIT's state: control word 0x37F, status and tags clear, pointers zero.
pub fn init(c: &mut Cpu) {
    set_fsw(c, 0);
    let f = &mut c.fpu;
    f.fcw = 0x037f;
    f.ftwx = 0;
    f.last_opcode = 0;
    f.last_ip = 0;
    f.last_dp = 0;
}

/// ST(i) is in use (its tag is not empty).
#[inline(always)]
pub fn valid(c: &Cpu, i: u8) -> bool {
    c.fpu.ftwx & (1 << ((top(c) + i as u32) & 7)) != 0
}

#[inline(always)]
fn set_tag(c: &mut Cpu, i: u8, used: bool) {
    let bit = 1u8 << ((top(c) + i as u32) & 7);
    if used {
        c.fpu.ftwx |= bit;
    } else {
        c.fpu.ftwx &= !bit;
    }
}

/// The 80-bit image of ST(i).
#[inline(always)]
pub fn st(c: &Cpu, i: u8) -> u128 {
    u128::from_le_bytes(c.fpu.fpr[(i & 7) as usize]) & MASK80
}

/// Write ST(i) and mark it in use.
#[inline(always)]
pub fn set_st(c: &mut Cpu, i: u8, v: u128) {
    c.fpu.fpr[(i & 7) as usize] = (v & MASK80).to_le_bytes();
    set_tag(c, i, true);
}

/// Push `v` (the caller checked for overflow).
#[inline(always)]
pub fn push(c: &mut Cpu, v: u128) {
    c.fpu.fpr.rotate_right(1);
    let t = top(c).wrapping_sub(1);
    set_top(c, t);
    set_st(c, 0, v);
}

/// Pop: ST(0) becomes empty, TOP moves up.
#[inline(always)]
pub fn pop(c: &mut Cpu) {
    set_tag(c, 0, false);
    c.fpu.fpr.rotate_left(1);
    let t = top(c) + 1;
    set_top(c, t);
}

/// Unpack an 80-bit image.
#[inline(always)]
pub fn unp(v: u128) -> Unp {
    unpack80((v >> 64) as u16, v as u64)
}

/// An integer as an operand.
pub fn unp_int(v: i64) -> Unp {
    if v == 0 {
        return Unp::zero(false);
    }
    let m = v.unsigned_abs();
    let lz = m.leading_zeros();
    Unp {
        class: Class::Num,
        sign: v < 0,
        exp: 63 - lz as i32,
        sig: m << lz,
        denormal: false,
    }
}

// ---- exceptions --------------------------------------------------------------------------------------

/// Record exception flags `f` and C1; an unmasked flag sets ES and B. Returns whether the
/// destination may be written (no unmasked IE, DE or ZE).
#[inline]
pub fn raise(c: &mut Cpu, f: u32, c1: bool) -> bool {
    c.fpu.fsw = if c1 {
        c.fpu.fsw | FSW_C1
    } else {
        c.fpu.fsw & !FSW_C1
    };
    raise_flags(c, f)
}

/// [`raise`] without touching C1.
#[inline]
pub fn raise_flags(c: &mut Cpu, f: u32) -> bool {
    let mut fsw = c.fpu.fsw | f as u16;
    let unmasked = f & !(c.fpu.fcw as u32) & ALL;
    if unmasked != 0 {
        fsw |= FSW_ES | FSW_B;
    }
    c.fpu.fsw = fsw;
    unmasked & (IE | DE | ZE) == 0
}

/// Stack underflow (an empty register read): IE and SF, C1 = 0. Returns whether IE is masked
/// (then the masked response proceeds with the indefinite).
#[inline]
pub fn underflow(c: &mut Cpu) -> bool {
    c.fpu.fsw |= FSW_SF;
    raise(c, IE, false)
}

/// Stack overflow (a push onto a register in use): IE and SF, C1 = 1.
#[inline]
pub fn overflow(c: &mut Cpu) -> bool {
    c.fpu.fsw |= FSW_SF;
    raise(c, IE, true)
}

/// The x87 environment and the register format under precision control.
#[inline(always)]
pub fn env_of(c: &Cpu) -> Env {
    Env::x87(c.fpu.fcw)
}

#[inline(always)]
pub fn fmt_of(c: &Cpu) -> sf::Fmt {
    x87_fmt(c.fpu.fcw >> 8)
}

/// The x87 NaN rule (SDM Vol. 1 Table 4-7): an SNaN and a QNaN give the QNaN; two NaNs of
/// the same kind give the one with the larger significand (the positive one on a tie); the
/// result is quiet. IE when either is an SNaN.
pub fn nan2(env: &mut Env, a: &Unp, b: &Unp) -> u128 {
    let (sa, sb) = (a.class == Class::SNan, b.class == Class::SNan);
    if sa || sb {
        env.flags |= IE;
    }
    let pick = match (a.is_nan(), b.is_nan()) {
        (true, false) => a,
        (false, true) => b,
        _ => {
            if sa != sb {
                if sa {
                    b
                } else {
                    a
                }
            } else {
                let (ma, mb) = (a.sig | 1 << 62, b.sig | 1 << 62);
                if ma > mb || (ma == mb && !a.sign) {
                    a
                } else {
                    b
                }
            }
        }
    };
    pack_nan(pick, Enc::F80)
}

/// One NaN or unsupported operand: the result of a unary operation on it, or `None`.
#[inline]
pub fn special1(env: &mut Env, a: &Unp) -> Option<u128> {
    match a.class {
        Class::Unsupported => {
            env.flags |= IE;
            Some(INDEF)
        }
        Class::SNan | Class::QNan => {
            if a.class == Class::SNan {
                env.flags |= IE;
            }
            Some(pack_nan(a, Enc::F80))
        }
        _ => None,
    }
}

/// A denormal operand: DE; when DE is unmasked the operation stops here (nothing is
/// computed, so no other flag is raised). Returns whether it stopped.
#[inline]
pub fn denormal_stop(env: &mut Env, denormal: bool) -> bool {
    if denormal {
        env.flags |= DE;
        return env.masks & DE == 0;
    }
    false
}

/// Binary arithmetic operations.
pub const ADD: u8 = 0;
pub const MUL: u8 = 1;
pub const SUB: u8 = 2;
pub const SUBR: u8 = 3;
pub const DIV: u8 = 4;
pub const DIVR: u8 = 5;

/// `a OP b` rounded to the precision control, with the x87 operand rules.
pub fn binop(env: &mut Env, o: u8, a: &Unp, b: &Unp, fmt: sf::Fmt) -> u128 {
    if a.class == Class::Unsupported || b.class == Class::Unsupported {
        env.flags |= IE;
        return INDEF;
    }
    if a.is_nan() || b.is_nan() {
        return nan2(env, a, b);
    }
    // A (denormal) number divided by zero raises only ZE.
    let by_zero = match o {
        DIV => b.class == Class::Zero && a.class == Class::Num,
        DIVR => a.class == Class::Zero && b.class == Class::Num,
        _ => false,
    };
    if !by_zero && denormal_stop(env, a.denormal || b.denormal) {
        return INDEF;
    }
    let x = match o {
        ADD => sf::add(env, a, b),
        SUB => sf::add(env, a, &b.neg()),
        SUBR => sf::add(env, b, &a.neg()),
        MUL => sf::mul(env, a, b),
        DIV => sf::div(env, a, b),
        _ => sf::div(env, b, a),
    };
    round(env, x, fmt)
}

// ---- memory ------------------------------------------------------------------------------------------

/// Operand formats.
pub const REG: u8 = 0;
pub const REGP: u8 = 1;
pub const M32: u8 = 2;
pub const M64: u8 = 3;
pub const M80: u8 = 4;
pub const I16: u8 = 5;
pub const I32: u8 = 6;
pub const I64: u8 = 7;

/// Read 10 bytes.
pub fn read80(x: &mut Exec<'_>, lin: u64) -> R<u128> {
    if lin & 0xfff <= 0xff6 {
        let lo = x.read(lin, 8)?;
        let hi = x.read(lin + 8, 2)?;
        return Ok(lo as u128 | (hi as u128) << 64);
    }
    let mut b = [0u8; 16];
    let user = x.cpu.tlb_user != 0;
    x.read_bytes(lin, &mut b[..10], user)?;
    Ok(u128::from_le_bytes(b))
}

/// Write 10 bytes (both pages checked first).
pub fn write80(x: &mut Exec<'_>, lin: u64, v: u128) -> R {
    if lin & 0xfff <= 0xff6 {
        x.write(lin, 8, v as u64)?;
        return x.write(lin + 8, 2, (v >> 64) as u64 & 0xffff);
    }
    let user = x.cpu.tlb_user != 0;
    x.write_bytes(lin, &v.to_le_bytes()[..10], user)
}

/// A memory operand of format `K` as an operand value (raw: no exceptions yet).
#[inline]
fn load_operand(x: &mut Exec<'_>, op: &Op, k: u8) -> R<Unp> {
    let lin = x.lin(op);
    Ok(match k {
        M32 => unpack(x.read(lin, 4)? as u128, Enc::F32, false),
        M64 => unpack(x.read(lin, 8)? as u128, Enc::F64, false),
        M80 => unp(read80(x, lin)?),
        I16 => unp_int(x.read(lin, 2)? as u16 as i16 as i64),
        I32 => unp_int(x.read(lin, 4)? as u32 as i32 as i64),
        _ => unp_int(x.read(lin, 8)? as i64),
    })
}

// ---- loads -------------------------------------------------------------------------------------------

/// FLD m32/m64, FILD m16/m32/m64 (`K`), and FLD ST(i) (`K` = `REG`, index in `op.r2`).
/// An empty source register is a stack underflow (the indefinite is pushed); otherwise a full
/// stack is an overflow, checked before the memory operand is converted. An unmasked denormal
/// operand exception does not stop the load.
pub fn fld<const K: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let src = if K == REG {
        None
    } else {
        Some(load_operand(x, op, K)?)
    };
    let c = &mut *x.cpu;
    let v = match src {
        None => {
            if !valid(c, op.r2) {
                if underflow(c) {
                    push(c, INDEF);
                }
                return Ok(());
            }
            c.fpu.fsw &= !FSW_C1;
            st(c, op.r2)
        }
        Some(u) => {
            if valid(c, 7) {
                if overflow(c) {
                    push(c, INDEF);
                }
                return Ok(());
            }
            let mut env = env_of(c);
            let v = match u.class {
                Class::SNan | Class::QNan => {
                    if u.class == Class::SNan {
                        env.flags |= IE;
                    }
                    pack_nan(&u, Enc::F80)
                }
                _ => {
                    if u.denormal {
                        env.flags |= DE;
                    }
                    round(&mut env, Exact::of(&u), F80)
                }
            };
            raise(c, env.flags, false);
            if env.flags & IE != 0 && c.fpu.fcw & 1 == 0 {
                return Ok(());
            }
            push(c, v);
            return Ok(());
        }
    };
    push_checked(c, v);
    Ok(())
}

/// Push `v`, or on stack overflow push the indefinite (masked) or nothing (unmasked).
#[inline]
pub fn push_checked(c: &mut Cpu, v: u128) {
    if valid(c, 7) {
        if overflow(c) {
            push(c, INDEF);
        }
        return;
    }
    push(c, v);
}

/// FLD m80: the image as is (no exceptions on load, SDM Vol. 2A "FLD").
pub fn fld80(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    let v = read80(x, lin)?;
    let c = &mut *x.cpu;
    c.fpu.fsw &= !FSW_C1;
    push_checked(c, v);
    Ok(())
}

/// The internal 66-bit constants (SDM Vol. 1 §8.3.8): significand, exponent, and whether the
/// bits beyond 64 are above one half (they are never exactly a half or zero).
const CONSTANTS: [(u64, u16, bool); 5] = [
    (0xc90f_daa2_2168_c234, 0x4000, true),  // π
    (0xb8aa_3b29_5c17_f0bb, 0x3fff, true),  // log2 e
    (0xd49a_784b_cd1b_8afe, 0x4000, false), // log2 10
    (0x9a20_9a84_fbcf_f798, 0x3ffd, true),  // log10 2
    (0xb172_17f7_d1cf_79ab, 0x3ffe, true),  // ln 2
];

/// FLD1 (`K` = 5), FLDZ (6), FLDPI, FLDL2E, FLDL2T, FLDLG2, FLDLN2 (0-4): rounded by RC as if
/// computed to infinite precision; no precision exception.
pub fn fldconst<const K: u8>(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    let v = match K {
        5 => (0x3fffu128 << 64) | 1 << 63,
        6 => 0,
        _ => {
            let (m, e, above_half) = CONSTANTS[K as usize % 5];
            let up = match ((c.fpu.fcw >> 10) & 3) as u8 {
                RNE => above_half,
                RU => true,
                _ => false,
            };
            ((e as u128) << 64) | (m + up as u64) as u128
        }
    };
    if valid(c, 7) {
        if overflow(c) {
            push(c, INDEF);
        }
        return Ok(());
    }
    c.fpu.fsw &= !FSW_C1;
    push(c, v);
    Ok(())
}

// ---- stores ------------------------------------------------------------------------------------------

/// FST/FSTP m32/m64 (`K`), FSTP m80.
pub fn fst<const K: u8, const POP: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    let c = &mut *x.cpu;
    let enc = match K {
        M32 => Enc::F32,
        M64 => Enc::F64,
        _ => Enc::F80,
    };
    let mut env = env_of(c);
    let (v, empty) = if !valid(c, 0) {
        env.flags |= IE;
        (default_nan(enc), true)
    } else if K == M80 {
        (st(c, 0), false)
    } else {
        let u = unp(st(c, 0));
        let v = match u.class {
            Class::Unsupported => {
                env.flags |= IE;
                default_nan(enc)
            }
            Class::SNan | Class::QNan => {
                if u.class == Class::SNan {
                    env.flags |= IE;
                }
                pack_nan(&u, enc)
            }
            _ => round(&mut env, Exact::of(&u), if K == M32 { F32 } else { F64 }),
        };
        (v, false)
    };
    let unmasked = env.flags & !(c.fpu.fcw as u32) & ALL;
    if unmasked & (sf::OE | sf::UE) != 0 {
        // No result is stored, so no precision exception either.
        env.flags &= !sf::PE;
        env.up = false;
    }
    if unmasked & (IE | sf::OE | sf::UE) == 0 {
        match K {
            M32 => x.write(lin, 4, v as u64)?,
            M64 => x.write(lin, 8, v as u64)?,
            _ => write80(x, lin, v)?,
        }
    }
    let c = &mut *x.cpu;
    if empty {
        c.fpu.fsw |= FSW_SF;
    }
    raise(c, env.flags, env.up);
    if POP && unmasked & (IE | sf::OE | sf::UE) == 0 {
        pop(c);
    }
    Ok(())
}

/// FST/FSTP ST(i) (`op.r2`).
pub fn fst_st<const POP: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    let v = if !valid(c, 0) {
        if !underflow(c) {
            return Ok(());
        }
        INDEF
    } else {
        c.fpu.fsw &= !FSW_C1;
        st(c, 0)
    };
    set_st(c, op.r2, v);
    if POP {
        pop(c);
    }
    Ok(())
}

/// FIST/FISTP m16/m32/m64 (`K`), FISTTP (`TRUNC`): the integer indefinite on invalid.
pub fn fist<const K: u8, const POP: bool, const TRUNC: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    let c = &mut *x.cpu;
    let (size, bits) = match K {
        I16 => (2u8, 16u32),
        I32 => (4, 32),
        _ => (8, 64),
    };
    let indef = 1u64 << (bits - 1);
    let mut env = env_of(c);
    let empty = !valid(c, 0);
    let v = if empty {
        env.flags |= IE;
        indef
    } else {
        let u = unp(st(c, 0));
        let rc = if TRUNC { RZ } else { env.rc };
        match to_int(&mut env, &u, rc, bits) {
            Some(i) => i as u64,
            None => {
                env.flags |= IE;
                env.up = false;
                indef
            }
        }
    };
    let ie_unmasked = env.flags & IE != 0 && c.fpu.fcw & 1 == 0;
    if !ie_unmasked {
        x.write(lin, size, v)?;
    }
    let c = &mut *x.cpu;
    if empty {
        c.fpu.fsw |= FSW_SF;
    }
    raise(c, env.flags, env.up);
    if POP && !ie_unmasked {
        pop(c);
    }
    Ok(())
}

/// FBLD m80: an 18-digit packed BCD integer (SDM Vol. 1 §4.7; invalid digits give an undefined
/// value, here their weighted sum).
pub fn fbld(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    let v = read80(x, lin)?;
    let c = &mut *x.cpu;
    if valid(c, 7) {
        if overflow(c) {
            push(c, INDEF);
        }
        return Ok(());
    }
    let mut mag = 0u64;
    for i in (0..18).rev() {
        mag = mag
            .wrapping_mul(10)
            .wrapping_add(((v >> (4 * i)) & 0xf) as u64);
    }
    let sign = (v >> 79) & 1 != 0;
    let mut env = env_of(c);
    let r = round(&mut env, Exact::int(sign, mag), F80);
    c.fpu.fsw &= !FSW_C1;
    push(c, r);
    Ok(())
}

/// FBSTP m80: ST(0) rounded to an integer as 18 packed BCD digits, then pop; out of range,
/// NaN or infinity stores the BCD indefinite.
pub fn fbstp(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    let c = &mut *x.cpu;
    const BCD_INDEF: u128 = 0xffff_c000_0000_0000_0000;
    let mut env = env_of(c);
    let empty = !valid(c, 0);
    let v = if empty {
        env.flags |= IE;
        BCD_INDEF
    } else {
        let u = unp(st(c, 0));
        match sf::to_int_mag(&u, env.rc) {
            Some((mag, inexact, up)) if mag < 1_000_000_000_000_000_000 => {
                if inexact {
                    env.flags |= PE;
                }
                env.up = up;
                let mut bcd = 0u128;
                let mut m = mag;
                for i in 0..18 {
                    bcd |= ((m % 10) as u128) << (4 * i);
                    m /= 10;
                }
                bcd | (u.sign as u128) << 79
            }
            _ => {
                env.flags |= IE;
                BCD_INDEF
            }
        }
    };
    let ie_unmasked = env.flags & IE != 0 && c.fpu.fcw & 1 == 0;
    if !ie_unmasked {
        write80(x, lin, v)?;
    }
    let c = &mut *x.cpu;
    if empty {
        c.fpu.fsw |= FSW_SF;
    }
    raise(c, env.flags, env.up);
    if !ie_unmasked {
        pop(c);
    }
    Ok(())
}

// ---- arithmetic --------------------------------------------------------------------------------------

/// FADD/FMUL/FSUB/FSUBR/FDIV/FDIVR (`O`) in every form (`FORM`): ST(`op.r1`) ←
/// ST(`op.r1`) op source, the source being ST(`op.r2`) (REG, REGP: then pop) or memory.
pub fn arith<const O: u8, const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let mem = if FORM == REG || FORM == REGP {
        None
    } else {
        Some(load_operand(x, op, FORM)?)
    };
    let c = &mut *x.cpu;
    let d = op.r1;
    let pop_after = FORM == REGP;
    if !valid(c, d) || (mem.is_none() && !valid(c, op.r2)) {
        if underflow(c) {
            set_st(c, d, INDEF);
            if pop_after {
                pop(c);
            }
        }
        return Ok(());
    }
    let a = unp(st(c, d));
    let b = match mem {
        Some(m) => m,
        None => unp(st(c, op.r2)),
    };
    let mut env = env_of(c);
    let r = binop(&mut env, O, &a, &b, fmt_of(c));
    if raise(c, env.flags, env.up) {
        set_st(c, d, r);
        if pop_after {
            pop(c);
        }
    }
    Ok(())
}

/// Unary operations on ST(0).
pub const CHS: u8 = 0;
pub const ABS: u8 = 1;
pub const SQRT: u8 = 2;
pub const RNDINT: u8 = 3;

/// FCHS, FABS, FSQRT, FRNDINT.
pub fn unary<const O: u8>(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) {
        if underflow(c) {
            set_st(c, 0, INDEF);
        }
        return Ok(());
    }
    let v = st(c, 0);
    if O == CHS || O == ABS {
        let r = if O == CHS {
            v ^ (1 << 79)
        } else {
            v & !(1 << 79)
        };
        c.fpu.fsw &= !FSW_C1;
        set_st(c, 0, r);
        return Ok(());
    }
    let a = unp(v);
    let mut env = env_of(c);
    let r = match special1(&mut env, &a) {
        Some(r) => r,
        None if denormal_stop(&mut env, a.denormal && !(O == SQRT && a.sign)) => INDEF,
        None => {
            if O == SQRT {
                let e = sf::sqrt(&mut env, &a);
                round(&mut env, e, fmt_of(c))
            } else {
                let e = sf::round_to_integral(&mut env, &a);
                let up = env.up;
                let r = round(&mut env, e, F80);
                env.up = up;
                r
            }
        }
    };
    if raise(c, env.flags, env.up) {
        set_st(c, 0, r);
    }
    Ok(())
}

// ---- compares -----------------------------------------------------------------------------------------

/// Set C3, C2, C0 (and clear C1) from a compare result (SDM Vol. 2A "FCOM", Table 3-21).
#[inline]
fn set_cc(c: &mut Cpu, cc: u16) {
    c.fpu.fsw = (c.fpu.fsw & !(FSW_C0 | FSW_C1 | FSW_C2 | FSW_C3)) | cc;
}

/// C3 C2 C0 of `a` compared with `b`; IE on SNaNs (on any NaN when `ordered`) and unsupported
/// operands, DE on denormals.
pub fn compare_cc(env: &mut Env, ordered: bool, a: &Unp, b: &Unp) -> u16 {
    if a.class == Class::Unsupported || b.class == Class::Unsupported {
        env.flags |= IE;
        return FSW_C3 | FSW_C2 | FSW_C0;
    }
    let unord = a.is_nan() || b.is_nan();
    if a.class == Class::SNan || b.class == Class::SNan || (ordered && unord) {
        env.flags |= IE;
    }
    if unord {
        return FSW_C3 | FSW_C2 | FSW_C0;
    }
    if a.denormal || b.denormal {
        env.flags |= DE;
    }
    match sf::compare(a, b) {
        std::cmp::Ordering::Greater => 0,
        std::cmp::Ordering::Less => FSW_C0,
        std::cmp::Ordering::Equal => FSW_C3,
    }
}

/// FCOM/FCOMP/FCOMPP/FUCOM*/FICOM* (`UNORD` for FUCOM): ST(0) against ST(`op.r2`) or memory
/// (`SRC`), then `POPS` pops.
pub fn fcom<const SRC: u8, const POPS: u8, const UNORD: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let mem = if SRC == REG {
        None
    } else {
        Some(load_operand(x, op, SRC)?)
    };
    let c = &mut *x.cpu;
    if !valid(c, 0) || (mem.is_none() && !valid(c, op.r2)) {
        let masked = underflow(c);
        set_cc(c, FSW_C3 | FSW_C2 | FSW_C0);
        if masked {
            for _ in 0..POPS {
                pop(c);
            }
        }
        return Ok(());
    }
    let a = unp(st(c, 0));
    let b = match mem {
        Some(m) => m,
        None => unp(st(c, op.r2)),
    };
    let mut env = env_of(c);
    let cc = compare_cc(&mut env, !UNORD, &a, &b);
    // The condition codes are set even when an exception is unmasked; the pops are not done.
    let ok = raise(c, env.flags, false);
    set_cc(c, cc);
    if ok {
        for _ in 0..POPS {
            pop(c);
        }
    }
    Ok(())
}

/// FCOMI/FCOMIP/FUCOMI/FUCOMIP: ZF, PF, CF from ST(0) against ST(`op.r2`); OF, SF, AF
/// cleared (SDM Vol. 2A "FCOMI").
pub fn fcomi<const UNORD: bool, const POP: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) || !valid(c, op.r2) {
        let masked = underflow(c);
        c.set_arith(ARITH, ZF | PF | CF);
        if masked && POP {
            pop(c);
        }
        return Ok(());
    }
    let a = unp(st(c, 0));
    let b = unp(st(c, op.r2));
    let mut env = env_of(c);
    let f = if a.class == Class::Unsupported || b.class == Class::Unsupported {
        env.flags |= IE;
        ZF | PF | CF
    } else {
        super::sse::compare_flags(&mut env, !UNORD, &a, &b)
    };
    // C1 is left alone; EFLAGS are set even when an exception is unmasked.
    let ok = raise_flags(c, env.flags);
    c.set_arith(ARITH, f);
    if ok && POP {
        pop(c);
    }
    Ok(())
}

/// FTST: ST(0) against +0.0.
pub fn ftst(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) {
        underflow(c);
        set_cc(c, FSW_C3 | FSW_C2 | FSW_C0);
        return Ok(());
    }
    let a = unp(st(c, 0));
    let mut env = env_of(c);
    let cc = compare_cc(&mut env, true, &a, &Unp::zero(false));
    raise(c, env.flags, false);
    set_cc(c, cc);
    Ok(())
}

/// FXAM: the class of ST(0) in C3 C2 C0, its sign in C1 (SDM Vol. 2A "FXAM", Table 3-45).
pub fn fxam(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    let v = st(c, 0);
    let sign = if v >> 79 != 0 { FSW_C1 } else { 0 };
    let cc = if !valid(c, 0) {
        FSW_C3 | FSW_C0
    } else {
        let u = unp(v);
        match u.class {
            Class::Unsupported => 0,
            Class::QNan | Class::SNan => FSW_C0,
            Class::Inf => FSW_C2 | FSW_C0,
            Class::Zero => FSW_C3,
            Class::Num if u.denormal => FSW_C3 | FSW_C2,
            Class::Num => FSW_C2,
        }
    };
    c.fpu.fsw = (c.fpu.fsw & !(FSW_C0 | FSW_C1 | FSW_C2 | FSW_C3)) | cc | sign;
    Ok(())
}

// ---- register and control instructions ---------------------------------------------------------------

/// FXCH ST(i): an empty register reads as the indefinite (masked underflow).
pub fn fxch(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    let i = op.r2;
    let (mut a, mut b) = (st(c, 0), st(c, i));
    if !valid(c, 0) || !valid(c, i) {
        if !underflow(c) {
            return Ok(());
        }
        if !valid(c, 0) {
            a = INDEF;
        }
        if !valid(c, i) {
            b = INDEF;
        }
    } else {
        c.fpu.fsw &= !FSW_C1;
    }
    set_st(c, 0, b);
    set_st(c, i, a);
    Ok(())
}

/// FCMOVcc ST(0), ST(i): `op.ext` is the x86 condition code (B, E, BE, P and negations).
pub fn fcmov(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    if !valid(c, 0) || !valid(c, op.r2) {
        if underflow(c) {
            set_st(c, 0, INDEF);
        }
        return Ok(());
    }
    if c.cond(op.ext) {
        let v = st(c, op.r2);
        set_st(c, 0, v);
    }
    Ok(())
}

/// FNINIT/FINIT (SDM Vol. 2A "FINIT"): control word 0x37F, status and tags cleared.
pub fn finit<const WAIT: bool>(x: &mut Exec<'_>, _op: &Op) -> R {
    if WAIT {
        x87_ok(x.cpu)?;
    } else {
        x87_ok_nowait(x.cpu)?;
    }
    init(x.cpu);
    Ok(())
}

/// FNCLEX/FCLEX: exception flags, SF, ES and B cleared.
pub fn fclex<const WAIT: bool>(x: &mut Exec<'_>, _op: &Op) -> R {
    if WAIT {
        x87_ok(x.cpu)?;
    } else {
        x87_ok_nowait(x.cpu)?;
    }
    x.cpu.fpu.fsw &= 0x7f00;
    Ok(())
}

/// FNSTSW/FSTSW AX (`AX`) or m16.
pub fn fstsw<const WAIT: bool, const AX: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if WAIT {
        x87_ok(x.cpu)?;
    } else {
        x87_ok_nowait(x.cpu)?;
    }
    let v = x.cpu.fpu.fsw as u64;
    if AX {
        x.cpu.set_reg(RAX as u8, 2, v);
        return Ok(());
    }
    let lin = x.lin(op);
    x.write(lin, 2, v)
}

/// FNSTCW/FSTCW m16.
pub fn fstcw<const WAIT: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if WAIT {
        x87_ok(x.cpu)?;
    } else {
        x87_ok_nowait(x.cpu)?;
    }
    let lin = x.lin(op);
    let v = x.cpu.fpu.fcw as u64;
    x.write(lin, 2, v)
}

/// The FCW bits that exist: masks, PC, RC, X; bit 6 reads as 1.
pub fn fcw_value(v: u16) -> u16 {
    (v & 0x1f3f) | 0x40
}

/// Recompute ES and B from the flags and masks (after FLDCW, FLDENV, FRSTOR).
pub fn update_es(c: &mut Cpu) {
    if c.fpu.fsw & !c.fpu.fcw & 0x3f != 0 {
        c.fpu.fsw |= FSW_ES | FSW_B;
    } else {
        c.fpu.fsw &= !(FSW_ES | FSW_B);
    }
}

/// FLDCW m16.
pub fn fldcw(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    let v = x.read(lin, 2)? as u16;
    x.cpu.fpu.fcw = fcw_value(v);
    update_es(x.cpu);
    Ok(())
}

/// FFREE ST(i) (`POP`: FFREEP).
pub fn ffree<const POP: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    set_tag(c, op.r2, false);
    c.fpu.fsw &= !FSW_C1;
    if POP {
        pop(c);
    }
    Ok(())
}

/// FINCSTP (`UP`) / FDECSTP: TOP ± 1, tags and contents unchanged, C1 = 0.
pub fn fstp_move<const UP: bool>(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)?;
    let c = &mut *x.cpu;
    let t = top(c);
    if UP {
        c.fpu.fpr.rotate_left(1);
        set_top(c, t + 1);
    } else {
        c.fpu.fpr.rotate_right(1);
        set_top(c, t.wrapping_sub(1));
    }
    c.fpu.fsw &= !FSW_C1;
    Ok(())
}

/// FNOP (and the 287 FNENI/FNDISI/FNSETPM, no-ops since the 387).
pub fn fnop(x: &mut Exec<'_>, _op: &Op) -> R {
    x87_ok(x.cpu)
}

/// FWAIT: #NM when CR0.MP and CR0.TS are set, then pending exceptions (SDM Vol. 2B "WAIT").
pub fn fwait(x: &mut Exec<'_>, _op: &Op) -> R {
    let c = &*x.cpu;
    if c.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
        return Err(super::fpu::nm());
    }
    super::fpu::pending(c)
}

// ---- translation -----------------------------------------------------------------------------------------

fn mem_kind(i: &Instruction) -> Option<u8> {
    Some(match i.memory_size() {
        MemorySize::Float32 => M32,
        MemorySize::Float64 => M64,
        MemorySize::Float80 => M80,
        MemorySize::Int16 => I16,
        MemorySize::Int32 => I32,
        MemorySize::Int64 => I64,
        _ => return None,
    })
}

macro_rules! arith_forms {
    ($o:expr, $form:expr) => {
        match $form {
            REG => arith::<{ $o }, REG> as Handler,
            REGP => arith::<{ $o }, REGP>,
            M32 => arith::<{ $o }, M32>,
            M64 => arith::<{ $o }, M64>,
            I16 => arith::<{ $o }, I16>,
            _ => arith::<{ $o }, I32>,
        }
    };
}

macro_rules! fcom_forms {
    ($pops:expr, $unord:expr, $src:expr) => {
        match $src {
            REG => fcom::<REG, { $pops }, { $unord }> as Handler,
            M32 => fcom::<M32, { $pops }, { $unord }>,
            M64 => fcom::<M64, { $pops }, { $unord }>,
            I16 => fcom::<I16, { $pops }, { $unord }>,
            _ => fcom::<I32, { $pops }, { $unord }>,
        }
    };
}

/// The handler for an x87 instruction (FXSAVE & co. and the environment instructions are in
/// `fxsave`).
pub fn translate(i: &Instruction, op: &mut Op) -> Option<Handler> {
    let m = i.mnemonic();
    let last_st = |op: &mut Op| -> Option<()> {
        op.r2 = st_op(i, i.op_count().checked_sub(1)?)?;
        Some(())
    };
    let mem = mem_op(i, 0);
    Some(match m {
        M::Fld | M::Fild => {
            if mem {
                match mem_kind(i)? {
                    M32 => fld::<M32>,
                    M64 => fld::<M64>,
                    M80 => fld80,
                    I16 => fld::<I16>,
                    I32 => fld::<I32>,
                    _ => fld::<I64>,
                }
            } else {
                last_st(op)?;
                fld::<REG>
            }
        }
        M::Fbld if mem => fbld,
        M::Fbstp if mem => fbstp,
        M::Fld1 => fldconst::<5>,
        M::Fldz => fldconst::<6>,
        M::Fldpi => fldconst::<0>,
        M::Fldl2e => fldconst::<1>,
        M::Fldl2t => fldconst::<2>,
        M::Fldlg2 => fldconst::<3>,
        M::Fldln2 => fldconst::<4>,
        M::Fst | M::Fstp | M::Fstpnce => {
            let p = m != M::Fst;
            if mem {
                match (mem_kind(i)?, p) {
                    (M32, false) => fst::<M32, false>,
                    (M32, true) => fst::<M32, true>,
                    (M64, false) => fst::<M64, false>,
                    (M64, true) => fst::<M64, true>,
                    (M80, true) => fst::<M80, true>,
                    _ => return None,
                }
            } else {
                op.r2 = st_op(i, 0)?;
                if p {
                    fst_st::<true>
                } else {
                    fst_st::<false>
                }
            }
        }
        M::Fist | M::Fistp | M::Fisttp => {
            if !mem {
                return None;
            }
            match (m, mem_kind(i)?) {
                (M::Fist, I16) => fist::<I16, false, false>,
                (M::Fist, I32) => fist::<I32, false, false>,
                (M::Fistp, I16) => fist::<I16, true, false>,
                (M::Fistp, I32) => fist::<I32, true, false>,
                (M::Fistp, I64) => fist::<I64, true, false>,
                (M::Fisttp, I16) => fist::<I16, true, true>,
                (M::Fisttp, I32) => fist::<I32, true, true>,
                (M::Fisttp, I64) => fist::<I64, true, true>,
                _ => return None,
            }
        }
        M::Fadd
        | M::Faddp
        | M::Fiadd
        | M::Fmul
        | M::Fmulp
        | M::Fimul
        | M::Fsub
        | M::Fsubp
        | M::Fisub
        | M::Fsubr
        | M::Fsubrp
        | M::Fisubr
        | M::Fdiv
        | M::Fdivp
        | M::Fidiv
        | M::Fdivr
        | M::Fdivrp
        | M::Fidivr => {
            let o = match m {
                M::Fadd | M::Faddp | M::Fiadd => ADD,
                M::Fmul | M::Fmulp | M::Fimul => MUL,
                M::Fsub | M::Fsubp | M::Fisub => SUB,
                M::Fsubr | M::Fsubrp | M::Fisubr => SUBR,
                M::Fdiv | M::Fdivp | M::Fidiv => DIV,
                _ => DIVR,
            };
            let form = if mem {
                op.r1 = 0;
                match mem_kind(i)? {
                    k @ (M32 | M64 | I16 | I32) => k,
                    _ => return None,
                }
            } else {
                op.r1 = st_op(i, 0)?;
                op.r2 = st_op(i, 1)?;
                if matches!(
                    m,
                    M::Faddp | M::Fmulp | M::Fsubp | M::Fsubrp | M::Fdivp | M::Fdivrp
                ) {
                    REGP
                } else {
                    REG
                }
            };
            match o {
                ADD => arith_forms!(ADD, form),
                MUL => arith_forms!(MUL, form),
                SUB => arith_forms!(SUB, form),
                SUBR => arith_forms!(SUBR, form),
                DIV => arith_forms!(DIV, form),
                _ => arith_forms!(DIVR, form),
            }
        }
        M::Fchs => unary::<CHS>,
        M::Fabs => unary::<ABS>,
        M::Fsqrt => unary::<SQRT>,
        M::Frndint => unary::<RNDINT>,
        M::Fcom | M::Fcomp | M::Fucom | M::Fucomp | M::Ficom | M::Ficomp => {
            let src = if mem {
                match mem_kind(i)? {
                    k @ (M32 | M64 | I16 | I32) => k,
                    _ => return None,
                }
            } else {
                last_st(op)?;
                REG
            };
            match m {
                M::Fcom | M::Ficom => fcom_forms!(0, false, src),
                M::Fcomp | M::Ficomp => fcom_forms!(1, false, src),
                M::Fucom => fcom_forms!(0, true, src),
                _ => fcom_forms!(1, true, src),
            }
        }
        M::Fcompp => {
            op.r2 = 1;
            fcom::<REG, 2, false>
        }
        M::Fucompp => {
            op.r2 = 1;
            fcom::<REG, 2, true>
        }
        M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
            last_st(op)?;
            match m {
                M::Fcomi => fcomi::<false, false>,
                M::Fcomip => fcomi::<false, true>,
                M::Fucomi => fcomi::<true, false>,
                _ => fcomi::<true, true>,
            }
        }
        M::Ftst => ftst,
        M::Fxam => fxam,
        M::Fxch => {
            last_st(op)?;
            fxch
        }
        M::Fcmovb
        | M::Fcmove
        | M::Fcmovbe
        | M::Fcmovu
        | M::Fcmovnb
        | M::Fcmovne
        | M::Fcmovnbe
        | M::Fcmovnu => {
            last_st(op)?;
            op.ext = match m {
                M::Fcmovb => 2,
                M::Fcmove => 4,
                M::Fcmovbe => 6,
                M::Fcmovu => 10,
                M::Fcmovnb => 3,
                M::Fcmovne => 5,
                M::Fcmovnbe => 7,
                _ => 11,
            };
            fcmov
        }
        M::Fninit => finit::<false>,
        M::Finit => finit::<true>,
        M::Fnclex => fclex::<false>,
        M::Fclex => fclex::<true>,
        M::Fnstsw | M::Fstsw => {
            let wait = m == M::Fstsw;
            match (wait, mem) {
                (false, false) => fstsw::<false, true>,
                (false, true) => fstsw::<false, false>,
                (true, false) => fstsw::<true, true>,
                (true, true) => fstsw::<true, false>,
            }
        }
        M::Fnstcw if mem => fstcw::<false>,
        M::Fstcw if mem => fstcw::<true>,
        M::Fldcw if mem => fldcw,
        M::Ffree => {
            last_st(op)?;
            ffree::<false>
        }
        M::Ffreep => {
            last_st(op)?;
            ffree::<true>
        }
        M::Fincstp => fstp_move::<true>,
        M::Fdecstp => fstp_move::<false>,
        M::Fnop | M::Fneni | M::Fndisi | M::Fnsetpm => fnop,
        M::Wait => fwait,
        M::Fsin
        | M::Fcos
        | M::Fsincos
        | M::Fptan
        | M::Fpatan
        | M::F2xm1
        | M::Fyl2x
        | M::Fyl2xp1
        | M::Fprem
        | M::Fprem1
        | M::Fscale
        | M::Fxtract => {
            return x87_math::translate(m);
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Cpu {
        let mut c = Cpu::new(0, crate::emu::tests::dummy_vm(), Vec::new());
        init(&mut c);
        c
    }

    const ONE: u128 = (0x3fffu128 << 64) | 1 << 63;
    const TWO: u128 = (0x4000u128 << 64) | 1 << 63;

    #[test]
    fn stack_push_pop_and_tags() {
        let mut c = cpu();
        push(&mut c, ONE);
        push(&mut c, TWO);
        assert_eq!(top(&c), 6);
        assert_eq!(c.fpu.ftwx, 0b1100_0000);
        assert_eq!((st(&c, 0), st(&c, 1)), (TWO, ONE));
        pop(&mut c);
        assert_eq!(top(&c), 7);
        assert_eq!(c.fpu.ftwx, 0b1000_0000);
        assert_eq!(st(&c, 0), ONE);
        // The popped value stays in its physical register (now ST(7)).
        assert_eq!(st(&c, 7), TWO);
        // Loading a status word with another TOP keeps the physical registers in place.
        set_fsw(&mut c, 0);
        assert_eq!(st(&c, 7), ONE);
        assert!(valid(&c, 7) && !valid(&c, 0));
    }

    #[test]
    fn overflow_and_underflow_responses() {
        let mut c = cpu();
        for _ in 0..8 {
            push_checked(&mut c, ONE);
        }
        assert_eq!(c.fpu.fsw & 0x7f, 0);
        push_checked(&mut c, TWO);
        assert_eq!(st(&c, 0), INDEF, "masked overflow pushes the indefinite");
        assert_eq!(c.fpu.fsw & (FSW_SF | FSW_C1 | 1), FSW_SF | FSW_C1 | 1);
        let mut c = cpu();
        c.fpu.fcw &= !1; // IE unmasked
        assert!(!underflow(&mut c));
        assert_eq!(
            c.fpu.fsw & (FSW_ES | FSW_B | FSW_SF | FSW_C1),
            FSW_ES | FSW_B | FSW_SF
        );
    }

    #[test]
    fn nan_propagation_rule() {
        let q = |s: u16, m: u64| unp(((s as u128) << 64) | m as u128);
        let qa = q(0x7fff, 0xc000_0000_0000_0001);
        let qb = q(0xffff, 0xc000_0000_0000_0002);
        let sa = q(0x7fff, 0x8000_0000_0000_0005);
        let mut env = Env::x87(0x37f);
        // Two QNaNs: the larger significand; an SNaN and a QNaN: the QNaN (and IE).
        assert_eq!(
            nan2(&mut env, &qa, &qb),
            (0xffffu128 << 64) | 0xc000_0000_0000_0002
        );
        assert_eq!(env.flags, 0);
        assert_eq!(
            nan2(&mut env, &sa, &qa),
            (0x7fffu128 << 64) | 0xc000_0000_0000_0001
        );
        assert_eq!(env.flags, IE);
        // Equal significands: the positive one.
        let qc = q(0xffff, 0xc000_0000_0000_0001);
        assert_eq!(nan2(&mut env, &qc, &qa) >> 64, 0x7fff);
    }

    #[test]
    fn control_word_and_exception_summary() {
        assert_eq!(fcw_value(0), 0x40);
        assert_eq!(fcw_value(0xffff), 0x1f7f);
        let mut c = cpu();
        c.fpu.fsw = 0x0004; // ZE pending, masked
        update_es(&mut c);
        assert_eq!(c.fpu.fsw & (FSW_ES | FSW_B), 0);
        c.fpu.fcw &= !4;
        update_es(&mut c);
        assert_eq!(c.fpu.fsw & (FSW_ES | FSW_B), FSW_ES | FSW_B);
    }
}
