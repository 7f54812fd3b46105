//! Integer SIMD on MMX and XMM registers (Intel SDM Vol. 1 chapter 9, §10.4.6-7, §11.4.3;
//! Vol. 2 instruction pages): PADD/PSUB (wrapping and saturating), multiplies, PMADDWD,
//! PAVG, PMIN/PMAX, PSADBW, compares, packs, unpacks (also UNPCKxPS/PD), logic (also the
//! ANDPS/ORPS/XORPS family), shifts by register and immediate, PSLLDQ/PSRLDQ, shuffles
//! (PSHUFW/D/HW/LW, SHUFPS/PD), PINSRW/PEXTRW, PMOVMSKB, EMMS.
//!
//! One lane function per operation works on 128-bit values; an MMX operand is the low 64 bits
//! (the upper half of the result is dropped), so both forms share the code except where the
//! register width matters (packs, unpacks).

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::fpu::{
    gpr_op, mm, mm_op, mm_rm, mmx_ok, read128, set_mm, set_xmm, sse_ok, xmm, xmm_op, xmm_rm,
};
use super::{Exec, Handler, Op};
use crate::emu::cpu::R;

/// Operations (`OP` parameters).
pub const PADDB: u8 = 0;
pub const PADDW: u8 = 1;
pub const PADDD: u8 = 2;
pub const PADDQ: u8 = 3;
pub const PSUBB: u8 = 4;
pub const PSUBW: u8 = 5;
pub const PSUBD: u8 = 6;
pub const PSUBQ: u8 = 7;
pub const PADDSB: u8 = 8;
pub const PADDSW: u8 = 9;
pub const PADDUSB: u8 = 10;
pub const PADDUSW: u8 = 11;
pub const PSUBSB: u8 = 12;
pub const PSUBSW: u8 = 13;
pub const PSUBUSB: u8 = 14;
pub const PSUBUSW: u8 = 15;
pub const PMULLW: u8 = 16;
pub const PMULHW: u8 = 17;
pub const PMULHUW: u8 = 18;
pub const PMULUDQ: u8 = 19;
pub const PMADDWD: u8 = 20;
pub const PAVGB: u8 = 21;
pub const PAVGW: u8 = 22;
pub const PMINUB: u8 = 23;
pub const PMAXUB: u8 = 24;
pub const PMINSW: u8 = 25;
pub const PMAXSW: u8 = 26;
pub const PSADBW: u8 = 27;
pub const PCMPEQB: u8 = 28;
pub const PCMPEQW: u8 = 29;
pub const PCMPEQD: u8 = 30;
pub const PCMPGTB: u8 = 31;
pub const PCMPGTW: u8 = 32;
pub const PCMPGTD: u8 = 33;
pub const PACKSSWB: u8 = 34;
pub const PACKSSDW: u8 = 35;
pub const PACKUSWB: u8 = 36;
pub const PUNPCKLBW: u8 = 37;
pub const PUNPCKLWD: u8 = 38;
pub const PUNPCKLDQ: u8 = 39;
pub const PUNPCKLQDQ: u8 = 40;
pub const PUNPCKHBW: u8 = 41;
pub const PUNPCKHWD: u8 = 42;
pub const PUNPCKHDQ: u8 = 43;
pub const PUNPCKHQDQ: u8 = 44;
pub const PAND: u8 = 45;
pub const PANDN: u8 = 46;
pub const POR: u8 = 47;
pub const PXOR: u8 = 48;
pub const PSLLW: u8 = 49;
pub const PSLLD: u8 = 50;
pub const PSLLQ: u8 = 51;
pub const PSRLW: u8 = 52;
pub const PSRLD: u8 = 53;
pub const PSRLQ: u8 = 54;
pub const PSRAW: u8 = 55;
pub const PSRAD: u8 = 56;
pub const PSLLDQ: u8 = 57;
pub const PSRLDQ: u8 = 58;
pub const PSHUFW: u8 = 59;
pub const PSHUFD: u8 = 60;
pub const PSHUFHW: u8 = 61;
pub const PSHUFLW: u8 = 62;
pub const SHUFPS: u8 = 63;
pub const SHUFPD: u8 = 64;

/// `f` on each `W`-bit lane of `a` and `b` (lanes passed zero-extended). Written over byte
/// arrays so the compiler turns it into vector code.
#[inline(always)]
fn map<const W: u32>(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
    let mut r = [0u8; 16];
    match W {
        8 => {
            for i in 0..16 {
                r[i] = f(x[i] as u64, y[i] as u64) as u8;
            }
        }
        16 => {
            for i in 0..8 {
                let p = |v: &[u8; 16]| u16::from_le_bytes([v[2 * i], v[2 * i + 1]]) as u64;
                let v = (f(p(&x), p(&y)) as u16).to_le_bytes();
                r[2 * i..2 * i + 2].copy_from_slice(&v);
            }
        }
        32 => {
            for i in 0..4 {
                let p = |v: &[u8; 16]| {
                    u32::from_le_bytes([v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]]) as u64
                };
                let v = (f(p(&x), p(&y)) as u32).to_le_bytes();
                r[4 * i..4 * i + 4].copy_from_slice(&v);
            }
        }
        _ => {
            let lo = f(a as u64, b as u64);
            let hi = f((a >> 64) as u64, (b >> 64) as u64);
            return lo as u128 | (hi as u128) << 64;
        }
    }
    u128::from_le_bytes(r)
}

/// Lane `i` of width `w` bits.
#[inline(always)]
fn lane(v: u128, w: u32, i: u32) -> u64 {
    ((v >> (w * i)) & ((1u128 << w) - 1)) as u64
}

#[inline(always)]
fn ss8(v: i64) -> u64 {
    v.clamp(i8::MIN as i64, i8::MAX as i64) as u8 as u64
}
#[inline(always)]
fn ss16(v: i64) -> u64 {
    v.clamp(i16::MIN as i64, i16::MAX as i64) as u16 as u64
}
#[inline(always)]
fn us8(v: i64) -> u64 {
    v.clamp(0, u8::MAX as i64) as u64
}
#[inline(always)]
fn us16(v: i64) -> u64 {
    v.clamp(0, u16::MAX as i64) as u64
}
#[inline(always)]
fn sx8(v: u64) -> i64 {
    v as u8 as i8 as i64
}
#[inline(always)]
fn sx16(v: u64) -> i64 {
    v as u16 as i16 as i64
}
#[inline(always)]
fn sx32(v: u64) -> i64 {
    v as u32 as i32 as i64
}

/// Pack the `w`-bit lanes of `a` then `b` into `w/2`-bit lanes with `sat`; `bytes` is the
/// register width (8 for MMX, 16 for XMM).
#[inline(always)]
fn pack(a: u128, b: u128, w: u32, bytes: u32, sat: impl Fn(u64) -> u64) -> u128 {
    let n = bytes * 8 / w;
    let h = w / 2;
    let mut r = 0u128;
    for i in 0..n {
        r |= (sat(lane(a, w, i)) as u128) << (h * i);
        r |= (sat(lane(b, w, i)) as u128) << (h * (i + n));
    }
    r
}

/// Interleave the low (`high` = false) or high halves of the `w`-bit lanes of `a` and `b`.
#[inline(always)]
fn unpack(a: u128, b: u128, w: u32, bytes: u32, high: bool) -> u128 {
    let n = bytes * 8 / w / 2;
    let base = if high { n } else { 0 };
    let mut r = 0u128;
    for i in 0..n {
        r |= (lane(a, w, base + i) as u128) << (w * 2 * i);
        r |= (lane(b, w, base + i) as u128) << (w * (2 * i + 1));
    }
    r
}

/// Shift each `w`-bit lane by `count` (logical left/right, arithmetic right).
#[inline(always)]
fn shift(a: u128, w: u32, count: u64, kind: u8) -> u128 {
    let big = count >= w as u64;
    let c = count as u32;
    map_w(a, w, |v| match kind {
        0 => {
            if big {
                0
            } else {
                v << c
            }
        }
        1 => {
            if big {
                0
            } else {
                v >> c
            }
        }
        _ => {
            let s = (v << (64 - w)) as i64;
            let c = if big { w - 1 } else { c };
            ((s >> c) as u64) >> (64 - w)
        }
    })
}

#[inline(always)]
fn map_w(a: u128, w: u32, f: impl Fn(u64) -> u64) -> u128 {
    match w {
        16 => map::<16>(a, 0, |x, _| f(x)),
        32 => map::<32>(a, 0, |x, _| f(x)),
        _ => map::<64>(a, 0, |x, _| f(x)),
    }
}

/// `OP` on destination `a` and source `b` (MMX when `MMX`); `imm` for shuffles and immediate
/// shifts (where `b` is unused).
#[inline(always)]
pub fn apply<const OP: u8, const MMX: bool>(a: u128, b: u128, imm: u8) -> u128 {
    let bytes = if MMX { 8 } else { 16 };
    match OP {
        PADDB => map::<8>(a, b, |x, y| x.wrapping_add(y)),
        PADDW => map::<16>(a, b, |x, y| x.wrapping_add(y)),
        PADDD => map::<32>(a, b, |x, y| x.wrapping_add(y)),
        PADDQ => map::<64>(a, b, |x, y| x.wrapping_add(y)),
        PSUBB => map::<8>(a, b, |x, y| x.wrapping_sub(y)),
        PSUBW => map::<16>(a, b, |x, y| x.wrapping_sub(y)),
        PSUBD => map::<32>(a, b, |x, y| x.wrapping_sub(y)),
        PSUBQ => map::<64>(a, b, |x, y| x.wrapping_sub(y)),
        PADDSB => map::<8>(a, b, |x, y| ss8(sx8(x) + sx8(y))),
        PADDSW => map::<16>(a, b, |x, y| ss16(sx16(x) + sx16(y))),
        PADDUSB => map::<8>(a, b, |x, y| us8(x as i64 + y as i64)),
        PADDUSW => map::<16>(a, b, |x, y| us16(x as i64 + y as i64)),
        PSUBSB => map::<8>(a, b, |x, y| ss8(sx8(x) - sx8(y))),
        PSUBSW => map::<16>(a, b, |x, y| ss16(sx16(x) - sx16(y))),
        PSUBUSB => map::<8>(a, b, |x, y| us8(x as i64 - y as i64)),
        PSUBUSW => map::<16>(a, b, |x, y| us16(x as i64 - y as i64)),
        PMULLW => map::<16>(a, b, |x, y| x.wrapping_mul(y)),
        PMULHW => map::<16>(a, b, |x, y| ((sx16(x) * sx16(y)) >> 16) as u64),
        PMULHUW => map::<16>(a, b, |x, y| (x * y) >> 16),
        PMULUDQ => map::<64>(a, b, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        PMADDWD => map::<32>(a, b, |x, y| {
            (sx16(x) * sx16(y) + sx16(x >> 16) * sx16(y >> 16)) as u64
        }),
        PAVGB => map::<8>(a, b, |x, y| (x + y + 1) >> 1),
        PAVGW => map::<16>(a, b, |x, y| (x + y + 1) >> 1),
        PMINUB => map::<8>(a, b, |x, y| x.min(y)),
        PMAXUB => map::<8>(a, b, |x, y| x.max(y)),
        PMINSW => map::<16>(a, b, |x, y| if sx16(x) < sx16(y) { x } else { y }),
        PMAXSW => map::<16>(a, b, |x, y| if sx16(x) > sx16(y) { x } else { y }),
        PSADBW => map::<64>(a, b, |x, y| {
            (0..8)
                .map(|i| ((x >> (8 * i)) as u8).abs_diff((y >> (8 * i)) as u8) as u64)
                .sum()
        }),
        PCMPEQB => map::<8>(a, b, |x, y| if x == y { 0xff } else { 0 }),
        PCMPEQW => map::<16>(a, b, |x, y| if x == y { 0xffff } else { 0 }),
        PCMPEQD => map::<32>(a, b, |x, y| if x == y { 0xffff_ffff } else { 0 }),
        PCMPGTB => map::<8>(a, b, |x, y| if sx8(x) > sx8(y) { 0xff } else { 0 }),
        PCMPGTW => map::<16>(a, b, |x, y| if sx16(x) > sx16(y) { 0xffff } else { 0 }),
        PCMPGTD => map::<32>(a, b, |x, y| if sx32(x) > sx32(y) { 0xffff_ffff } else { 0 }),
        PACKSSWB => pack(a, b, 16, bytes, |v| ss8(sx16(v))),
        PACKSSDW => pack(a, b, 32, bytes, |v| ss16(sx32(v))),
        PACKUSWB => pack(a, b, 16, bytes, |v| us8(sx16(v))),
        PUNPCKLBW => unpack(a, b, 8, bytes, false),
        PUNPCKLWD => unpack(a, b, 16, bytes, false),
        PUNPCKLDQ => unpack(a, b, 32, bytes, false),
        PUNPCKLQDQ => unpack(a, b, 64, bytes, false),
        PUNPCKHBW => unpack(a, b, 8, bytes, true),
        PUNPCKHWD => unpack(a, b, 16, bytes, true),
        PUNPCKHDQ => unpack(a, b, 32, bytes, true),
        PUNPCKHQDQ => unpack(a, b, 64, bytes, true),
        PAND => a & b,
        PANDN => !a & b,
        POR => a | b,
        PXOR => a ^ b,
        PSLLW => shift(a, 16, b as u64, 0),
        PSLLD => shift(a, 32, b as u64, 0),
        PSLLQ => shift(a, 64, b as u64, 0),
        PSRLW => shift(a, 16, b as u64, 1),
        PSRLD => shift(a, 32, b as u64, 1),
        PSRLQ => shift(a, 64, b as u64, 1),
        PSRAW => shift(a, 16, b as u64, 2),
        PSRAD => shift(a, 32, b as u64, 2),
        PSLLDQ => {
            if imm > 15 {
                0
            } else {
                a << (8 * imm as u32)
            }
        }
        PSRLDQ => {
            if imm > 15 {
                0
            } else {
                a >> (8 * imm as u32)
            }
        }
        // Shuffles read their source from `b`.
        PSHUFW => (0..4).fold(0, |r, i| {
            r | (lane(b, 16, (imm as u32 >> (2 * i)) & 3) as u128) << (16 * i)
        }),
        PSHUFD => (0..4).fold(0, |r, i| {
            r | (lane(b, 32, (imm as u32 >> (2 * i)) & 3) as u128) << (32 * i)
        }),
        PSHUFLW => {
            let lo = (0..4).fold(0u128, |r, i| {
                r | (lane(b, 16, (imm as u32 >> (2 * i)) & 3) as u128) << (16 * i)
            });
            (b & !(u64::MAX as u128)) | lo
        }
        PSHUFHW => {
            let hi = (0..4).fold(0u128, |r, i| {
                r | (lane(b, 16, 4 + ((imm as u32 >> (2 * i)) & 3)) as u128) << (16 * i)
            });
            (b & u64::MAX as u128) | hi << 64
        }
        SHUFPS => {
            let s = |v: u128, i: u32| lane(v, 32, (imm as u32 >> (2 * i)) & 3) as u128;
            s(a, 0) | s(a, 1) << 32 | s(b, 2) << 64 | s(b, 3) << 96
        }
        _ => {
            // SHUFPD
            lane(a, 64, imm as u32 & 1) as u128 | (lane(b, 64, (imm as u32 >> 1) & 1) as u128) << 64
        }
    }
}

/// Source alignment of an XMM memory operand: every legacy SSE 128-bit operand here must be
/// 16-byte aligned (SDM Vol. 1 §11.6.7).
const ALIGN: bool = true;

/// `OP` with an MMX/XMM destination `op.r1` and a register (`op.r2`) or memory source.
pub fn binary<const OP: u8, const MMX: bool, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if MMX {
        mmx_ok(x.cpu)?;
        let b = if MEM {
            let lin = x.lin(op);
            x.read(lin, 8)?
        } else {
            mm(x.cpu, op.r2)
        };
        let a = mm(x.cpu, op.r1);
        let r = apply::<OP, true>(a as u128, b as u128, op.imm as u8);
        set_mm(x.cpu, op.r1, r as u64);
    } else {
        sse_ok(x.cpu)?;
        let b = if MEM {
            let lin = x.lin(op);
            read128(x, lin, ALIGN)?
        } else {
            xmm(x.cpu, op.r2)
        };
        let a = xmm(x.cpu, op.r1);
        let r = apply::<OP, false>(a, b, op.imm as u8);
        set_xmm(x.cpu, op.r1, r);
    }
    Ok(())
}

/// Shifts by an immediate count (`op.imm`) of MMX/XMM register `op.r1`.
pub fn shift_imm<const OP: u8, const MMX: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if MMX {
        mmx_ok(x.cpu)?;
        let a = mm(x.cpu, op.r1);
        let r = apply::<OP, true>(a as u128, op.imm as u128, op.imm as u8);
        set_mm(x.cpu, op.r1, r as u64);
    } else {
        sse_ok(x.cpu)?;
        let a = xmm(x.cpu, op.r1);
        let r = apply::<OP, false>(a, op.imm as u128, op.imm as u8);
        set_xmm(x.cpu, op.r1, r);
    }
    Ok(())
}

/// PMOVMSKB r32/64, mm/xmm: the top bit of each byte (SDM Vol. 2B "PMOVMSKB").
pub fn pmovmskb<const MMX: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    let v = if MMX {
        mmx_ok(x.cpu)?;
        mm(x.cpu, op.r2) as u128
    } else {
        sse_ok(x.cpu)?;
        xmm(x.cpu, op.r2)
    };
    // Gather the top bit of each byte of a 64-bit half with one multiply.
    let half = |h: u64| (h & 0x8080_8080_8080_8080).wrapping_mul(0x0002_0408_1020_4081) >> 56;
    let m = half(v as u64) | half((v >> 64) as u64) << 8;
    x.cpu.set_reg(op.r1, 8, m);
    Ok(())
}

/// PEXTRW r32/64, mm/xmm, imm8: the selected word, zero-extended.
pub fn pextrw<const MMX: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    let (v, n) = if MMX {
        mmx_ok(x.cpu)?;
        (mm(x.cpu, op.r2) as u128, 3)
    } else {
        sse_ok(x.cpu)?;
        (xmm(x.cpu, op.r2), 7)
    };
    let w = lane(v, 16, op.imm as u32 & n);
    x.cpu.set_reg(op.r1, 8, w);
    Ok(())
}

/// PINSRW mm/xmm, r32/m16, imm8: replace the selected word. The source register number is in
/// `op.r2`.
pub fn pinsrw<const MMX: bool, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if MMX {
        mmx_ok(x.cpu)?;
    } else {
        sse_ok(x.cpu)?;
    }
    let w = if MEM {
        let lin = x.lin(op);
        x.read(lin, 2)?
    } else {
        x.cpu.reg(op.r2, 2)
    } as u128;
    if MMX {
        let sh = 16 * (op.imm as u32 & 3);
        let v = (mm(x.cpu, op.r1) as u128 & !(0xffff << sh)) | w << sh;
        set_mm(x.cpu, op.r1, v as u64);
    } else {
        let sh = 16 * (op.imm as u32 & 7);
        let v = (xmm(x.cpu, op.r1) & !(0xffff << sh)) | w << sh;
        set_xmm(x.cpu, op.r1, v);
    }
    Ok(())
}

/// EMMS: all x87 registers empty, TOP = 0 like any MMX instruction (SDM Vol. 2A "EMMS").
pub fn emms(x: &mut Exec<'_>, _op: &Op) -> R {
    let c = &mut *x.cpu;
    mmx_ok(c)?;
    c.fpu.ftwx = 0;
    Ok(())
}

// ---- translation -----------------------------------------------------------------------------------

/// The operation of a two-operand integer SIMD, logic, unpack or shuffle mnemonic.
fn op_of(m: M) -> Option<u8> {
    Some(match m {
        M::Paddb => PADDB,
        M::Paddw => PADDW,
        M::Paddd => PADDD,
        M::Paddq => PADDQ,
        M::Psubb => PSUBB,
        M::Psubw => PSUBW,
        M::Psubd => PSUBD,
        M::Psubq => PSUBQ,
        M::Paddsb => PADDSB,
        M::Paddsw => PADDSW,
        M::Paddusb => PADDUSB,
        M::Paddusw => PADDUSW,
        M::Psubsb => PSUBSB,
        M::Psubsw => PSUBSW,
        M::Psubusb => PSUBUSB,
        M::Psubusw => PSUBUSW,
        M::Pmullw => PMULLW,
        M::Pmulhw => PMULHW,
        M::Pmulhuw => PMULHUW,
        M::Pmuludq => PMULUDQ,
        M::Pmaddwd => PMADDWD,
        M::Pavgb => PAVGB,
        M::Pavgw => PAVGW,
        M::Pminub => PMINUB,
        M::Pmaxub => PMAXUB,
        M::Pminsw => PMINSW,
        M::Pmaxsw => PMAXSW,
        M::Psadbw => PSADBW,
        M::Pcmpeqb => PCMPEQB,
        M::Pcmpeqw => PCMPEQW,
        M::Pcmpeqd => PCMPEQD,
        M::Pcmpgtb => PCMPGTB,
        M::Pcmpgtw => PCMPGTW,
        M::Pcmpgtd => PCMPGTD,
        M::Packsswb => PACKSSWB,
        M::Packssdw => PACKSSDW,
        M::Packuswb => PACKUSWB,
        M::Punpcklbw => PUNPCKLBW,
        M::Punpcklwd => PUNPCKLWD,
        M::Punpckldq | M::Unpcklps => PUNPCKLDQ,
        M::Punpcklqdq | M::Unpcklpd => PUNPCKLQDQ,
        M::Punpckhbw => PUNPCKHBW,
        M::Punpckhwd => PUNPCKHWD,
        M::Punpckhdq | M::Unpckhps => PUNPCKHDQ,
        M::Punpckhqdq | M::Unpckhpd => PUNPCKHQDQ,
        M::Pand | M::Andps | M::Andpd => PAND,
        M::Pandn | M::Andnps | M::Andnpd => PANDN,
        M::Por | M::Orps | M::Orpd => POR,
        M::Pxor | M::Xorps | M::Xorpd => PXOR,
        M::Psllw => PSLLW,
        M::Pslld => PSLLD,
        M::Psllq => PSLLQ,
        M::Psrlw => PSRLW,
        M::Psrld => PSRLD,
        M::Psrlq => PSRLQ,
        M::Psraw => PSRAW,
        M::Psrad => PSRAD,
        M::Pslldq => PSLLDQ,
        M::Psrldq => PSRLDQ,
        M::Pshufw => PSHUFW,
        M::Pshufd => PSHUFD,
        M::Pshufhw => PSHUFHW,
        M::Pshuflw => PSHUFLW,
        M::Shufps => SHUFPS,
        M::Shufpd => SHUFPD,
        _ => return None,
    })
}

macro_rules! op_table {
    (@one $f:ident, $name:ident, [$($extra:tt)*]) => {
        $f::<$name, $($extra)*> as Handler
    };
    ($f:ident, $o:expr, $extra:tt; $($name:ident)*) => {
        match $o {
            $($name => op_table!(@one $f, $name, $extra),)*
            _ => return None,
        }
    };
}

/// The handler for an integer SIMD instruction.
pub fn translate(i: &Instruction, op: &mut Op) -> Option<Handler> {
    let m = i.mnemonic();
    match m {
        M::Emms => return Some(emms as Handler),
        M::Pmovmskb | M::Pextrw => {
            op.r1 = gpr_op(i, 0)?.0;
            let mmx = if let Some(r) = mm_op(i, 1) {
                op.r2 = r;
                true
            } else {
                op.r2 = xmm_op(i, 1)?;
                false
            };
            if m == M::Pextrw {
                op.imm = i.immediate8() as u64;
                return Some(if mmx { pextrw::<true> } else { pextrw::<false> });
            }
            return Some(if mmx {
                pmovmskb::<true>
            } else {
                pmovmskb::<false>
            });
        }
        M::Pinsrw => {
            let mmx = if let Some(r) = mm_op(i, 0) {
                op.r1 = r;
                true
            } else {
                op.r1 = xmm_op(i, 0)?;
                false
            };
            let mem = super::fpu::mem_op(i, 1);
            if !mem {
                op.r2 = gpr_op(i, 1)?.0;
            }
            op.imm = i.immediate8() as u64;
            return Some(match (mmx, mem) {
                (true, true) => pinsrw::<true, true>,
                (true, false) => pinsrw::<true, false>,
                (false, true) => pinsrw::<false, true>,
                (false, false) => pinsrw::<false, false>,
            });
        }
        _ => {}
    }
    let o = op_of(m)?;
    let mmx = if let Some(r) = mm_op(i, 0) {
        op.r1 = r;
        true
    } else {
        op.r1 = xmm_op(i, 0)?;
        false
    };
    if matches!(o, PSHUFW | PSHUFD | PSHUFHW | PSHUFLW | SHUFPS | SHUFPD) {
        op.imm = i.immediate8() as u64;
    }
    // Shifts by an immediate.
    if i.op_count() == 2 && matches!(i.op_kind(1), OpKind::Immediate8) {
        op.imm = i.immediate8() as u64;
        return Some(if mmx {
            op_table!(shift_imm, o, [true]; PSLLW PSLLD PSLLQ PSRLW PSRLD PSRLQ PSRAW PSRAD)
        } else {
            op_table!(shift_imm, o, [false];
                PSLLW PSLLD PSLLQ PSRLW PSRLD PSRLQ PSRAW PSRAD PSLLDQ PSRLDQ)
        });
    }
    let mem = if mmx {
        mm_rm(i, 1, op)?
    } else {
        xmm_rm(i, 1, op)?
    };
    macro_rules! all {
        ($mmx:expr, $mem:expr) => {
            op_table!(binary, o, [$mmx, $mem];
                PADDB PADDW PADDD PADDQ PSUBB PSUBW PSUBD PSUBQ PADDSB PADDSW PADDUSB PADDUSW
                PSUBSB PSUBSW PSUBUSB PSUBUSW PMULLW PMULHW PMULHUW PMULUDQ PMADDWD PAVGB PAVGW
                PMINUB PMAXUB PMINSW PMAXSW PSADBW PCMPEQB PCMPEQW PCMPEQD PCMPGTB PCMPGTW
                PCMPGTD PACKSSWB PACKSSDW PACKUSWB PUNPCKLBW PUNPCKLWD PUNPCKLDQ PUNPCKLQDQ
                PUNPCKHBW PUNPCKHWD PUNPCKHDQ PUNPCKHQDQ PAND PANDN POR PXOR PSLLW PSLLD PSLLQ
                PSRLW PSRLD PSRLQ PSRAW PSRAD PSHUFW PSHUFD PSHUFHW PSHUFLW SHUFPS SHUFPD)
        };
    }
    if mmx
        && matches!(
            o,
            PUNPCKLQDQ | PUNPCKHQDQ | PSHUFD | PSHUFHW | PSHUFLW | SHUFPS | SHUFPD
        )
    {
        return None;
    }
    Some(match (mmx, mem) {
        (true, true) => all!(true, true),
        (true, false) => all!(true, false),
        (false, true) => all!(false, true),
        (false, false) => all!(false, false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes() {
        let a = 0x8000_7fff_0001_ffff_1234_5678_9abc_def0u128;
        let b = 0x0001_0001_ffff_0001_1111_1111_1111_1111u128;
        assert_eq!(
            apply::<PADDSW, false>(a, b, 0),
            0x8001_7fff_0000_0000_2345_6789_abcd_f001
        );
        assert_eq!(apply::<PSRAW, false>(a, 3, 0) >> 112, 0xf000);
        assert_eq!(apply::<PSRAW, false>(a, 99, 0) >> 112, 0xffff);
        assert_eq!(apply::<PSLLQ, false>(a, 64, 0), 0);
        assert_eq!(apply::<PSRLDQ, false>(a, 0, 15), 0x80);
        assert_eq!(
            apply::<PUNPCKLBW, true>(0x0706_0504_0302_0100, 0x1716_1514_1312_1110, 0),
            0x1303_1202_1101_1000
        );
        assert_eq!(
            apply::<PACKSSWB, true>(0x0080_ff7f_0001_8000, 0x7fff_0000_0002_fffe, 0) as u64,
            0x7f00_02fe_7f80_0180
        );
        assert_eq!(
            apply::<PSHUFD, false>(0, a, 0x1b),
            0x9abc_def0_1234_5678_0001_ffff_8000_7fff
        );
        assert_eq!(apply::<PSADBW, false>(0x00ff, 0xff00, 0), 0x1fe);
    }
}
