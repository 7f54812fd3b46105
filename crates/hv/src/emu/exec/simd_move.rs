//! Data movement between XMM, MMX, general registers and memory (Intel SDM Vol. 2
//! instruction pages): MOVAPS/UPS/APD/UPD/DQA/DQU, MOVNTPS/PD/DQ/Q/I, MOVSS/MOVSD, MOVD/MOVQ,
//! MOVQ2DQ/MOVDQ2Q, MOVLPS/HPS/LPD/HPD, MOVHLPS/MOVLHPS, MOVMSKPS/PD, MASKMOVQ/MASKMOVDQU.

use iced_x86::{CodeSize, Instruction, Mnemonic as M, OpKind, Register};

use super::fpu::{
    gpr_op, mem_op, mm, mm_op, mmx_ok, read128, set_mm, set_xmm, sse_ok, write128, xmm, xmm_op,
};
use super::{Exec, Handler, Op, NOREG, SEG_NONE};
use crate::emu::cpu::{R, RDI};

/// MOVAPS/MOVUPS/... xmm, xmm/m128 (`op.r1` ← `op.r2` or memory).
pub fn load128<const ALIGN: bool, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let v = if MEM {
        let lin = x.lin(op);
        read128(x, lin, ALIGN)?
    } else {
        xmm(x.cpu, op.r2)
    };
    set_xmm(x.cpu, op.r1, v);
    Ok(())
}

/// MOVAPS/MOVUPS/MOVNTPS/... m128, xmm (`op.r2`).
pub fn store128<const ALIGN: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let lin = x.lin(op);
    let v = xmm(x.cpu, op.r2);
    write128(x, lin, v, ALIGN)
}

/// Forms of the scalar and half moves.
pub const RR: u8 = 0;
pub const LOAD: u8 = 1;
pub const STORE: u8 = 2;

/// MOVSS (`BYTES` = 4) / MOVSD (8): register to register merges the low lane, a load zeroes
/// the rest, a store writes the low lane.
pub fn movs<const BYTES: u8, const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let mask: u128 = if BYTES == 4 {
        0xffff_ffff
    } else {
        u64::MAX as u128
    };
    match FORM {
        RR => {
            let v = (xmm(x.cpu, op.r1) & !mask) | (xmm(x.cpu, op.r2) & mask);
            set_xmm(x.cpu, op.r1, v);
        }
        LOAD => {
            let lin = x.lin(op);
            let v = x.read(lin, BYTES)?;
            set_xmm(x.cpu, op.r1, v as u128);
        }
        _ => {
            let lin = x.lin(op);
            let v = xmm(x.cpu, op.r2) as u64;
            x.write(lin, BYTES, v)?;
        }
    }
    Ok(())
}

/// MOVD/MOVQ between an XMM register (`op.r1`) and a general register or memory (`op.r2`),
/// `op.size` bytes. `TO_XMM`: the XMM register is the destination (zero-extended).
pub fn movd_xmm<const TO_XMM: bool, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    if TO_XMM {
        let v = if MEM {
            let lin = x.lin(op);
            x.read(lin, op.size)?
        } else {
            x.cpu.reg(op.r2, op.size)
        };
        set_xmm(x.cpu, op.r1, v as u128);
    } else {
        let v = xmm(x.cpu, op.r1) as u64;
        if MEM {
            let lin = x.lin(op);
            x.write(lin, op.size, v)?;
        } else {
            x.cpu.set_reg(op.r2, op.size, v);
        }
    }
    Ok(())
}

/// MOVD/MOVQ between an MMX register (`op.r1`) and a general register or memory (`op.r2`).
pub fn movd_mm<const TO_MM: bool, const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    mmx_ok(x.cpu)?;
    if TO_MM {
        let v = if MEM {
            let lin = x.lin(op);
            x.read(lin, op.size)?
        } else {
            x.cpu.reg(op.r2, op.size)
        };
        set_mm(x.cpu, op.r1, v);
    } else {
        let v = mm(x.cpu, op.r1);
        if MEM {
            let lin = x.lin(op);
            x.write(lin, op.size, v)?;
        } else {
            x.cpu.set_reg(op.r2, op.size, v);
        }
    }
    Ok(())
}

/// MOVQ xmm, xmm/m64 (zero-extends) and MOVQ m64, xmm.
pub fn movq_xmm<const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    match FORM {
        RR => {
            let v = xmm(x.cpu, op.r2) as u64;
            set_xmm(x.cpu, op.r1, v as u128);
        }
        LOAD => {
            let lin = x.lin(op);
            let v = x.read(lin, 8)?;
            set_xmm(x.cpu, op.r1, v as u128);
        }
        _ => {
            let lin = x.lin(op);
            let v = xmm(x.cpu, op.r2) as u64;
            x.write(lin, 8, v)?;
        }
    }
    Ok(())
}

/// MOVQ/MOVNTQ between MMX registers and memory.
pub fn movq_mm<const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    mmx_ok(x.cpu)?;
    match FORM {
        RR => {
            let v = mm(x.cpu, op.r2);
            set_mm(x.cpu, op.r1, v);
        }
        LOAD => {
            let lin = x.lin(op);
            let v = x.read(lin, 8)?;
            set_mm(x.cpu, op.r1, v);
        }
        _ => {
            let lin = x.lin(op);
            let v = mm(x.cpu, op.r2);
            x.write(lin, 8, v)?;
        }
    }
    Ok(())
}

/// MOVQ2DQ xmm, mm (zero-extended) and MOVDQ2Q mm, xmm.
pub fn movq2dq<const TO_XMM: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    mmx_ok(x.cpu)?;
    if TO_XMM {
        let v = mm(x.cpu, op.r2);
        set_xmm(x.cpu, op.r1, v as u128);
    } else {
        let v = xmm(x.cpu, op.r2) as u64;
        set_mm(x.cpu, op.r1, v);
    }
    Ok(())
}

/// MOVLPS/MOVLPD (`HIGH` = false) and MOVHPS/MOVHPD: load or store one 64-bit half.
pub fn movhalf<const HIGH: bool, const STORE_: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let lin = x.lin(op);
    let sh = if HIGH { 64 } else { 0 };
    if STORE_ {
        let v = (xmm(x.cpu, op.r2) >> sh) as u64;
        x.write(lin, 8, v)
    } else {
        let v = x.read(lin, 8)? as u128;
        let d = (xmm(x.cpu, op.r1) & !((u64::MAX as u128) << sh)) | v << sh;
        set_xmm(x.cpu, op.r1, d);
        Ok(())
    }
}

/// MOVHLPS (`LH` = false: low ← source high) and MOVLHPS (high ← source low).
pub fn movhlps<const LH: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let d = xmm(x.cpu, op.r1);
    let s = xmm(x.cpu, op.r2);
    let v = if LH {
        (d & u64::MAX as u128) | s << 64
    } else {
        (d & !(u64::MAX as u128)) | s >> 64
    };
    set_xmm(x.cpu, op.r1, v);
    Ok(())
}

/// MOVMSKPS / MOVMSKPD: the sign bits into a general register.
pub fn movmsk<const DOUBLE: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    sse_ok(x.cpu)?;
    let v = xmm(x.cpu, op.r2);
    let m = if DOUBLE {
        ((v >> 63) & 1 | ((v >> 127) & 1) << 1) as u64
    } else {
        (0..4).fold(0u64, |m, i| m | (((v >> (32 * i + 31)) & 1) as u64) << i)
    };
    x.cpu.set_reg(op.r1, 8, m);
    Ok(())
}

/// MASKMOVQ / MASKMOVDQU: store the bytes of `op.r1` whose mask byte (in `op.r2`) has its top
/// bit set, at DS:rDI. Every page the operand touches is checked for write first.
pub fn maskmov<const MMX: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    let (data, mask, n) = if MMX {
        mmx_ok(x.cpu)?;
        (mm(x.cpu, op.r1) as u128, mm(x.cpu, op.r2) as u128, 8u64)
    } else {
        sse_ok(x.cpu)?;
        (xmm(x.cpu, op.r1), xmm(x.cpu, op.r2), 16u64)
    };
    // Bit i: byte i is stored.
    let sel = (0..n).fold(0u32, |s, i| s | (((mask >> (8 * i + 7)) & 1) as u32) << i);
    if sel == 0 {
        return Ok(());
    }
    let lin = x.lin(op);
    let user = x.cpu.tlb_user != 0;
    let last = lin.wrapping_add(n - 1) & x.cpu.lin_mask;
    x.cpu.translate(lin, crate::emu::mmu::Access::Write, user)?;
    x.cpu
        .translate(last, crate::emu::mmu::Access::Write, user)?;
    for i in (0..n).filter(|i| sel & 1 << i != 0) {
        let a = lin.wrapping_add(i) & x.cpu.lin_mask;
        x.write(a, 1, (data >> (8 * i)) as u64 & 0xff)?;
    }
    Ok(())
}

/// MOVNTI m32/m64, r32/r64: a plain store here (no cache to bypass).
pub fn movnti(x: &mut Exec<'_>, op: &Op) -> R {
    let lin = x.lin(op);
    let v = x.cpu.reg(op.r2, op.size);
    x.write(lin, op.size, v)
}

// ---- translation ---------------------------------------------------------------------------------

/// The handler for a data movement instruction.
pub fn translate(i: &Instruction, op: &mut Op) -> Option<Handler> {
    let m = i.mnemonic();
    let (m0, m1) = (mem_op(i, 0), mem_op(i, 1));
    match m {
        M::Movaps
        | M::Movapd
        | M::Movdqa
        | M::Movups
        | M::Movupd
        | M::Movdqu
        | M::Movntps
        | M::Movntpd
        | M::Movntdq => {
            let align = !matches!(m, M::Movups | M::Movupd | M::Movdqu);
            if m0 {
                op.r2 = xmm_op(i, 1)?;
                return Some(if align {
                    store128::<true>
                } else {
                    store128::<false>
                });
            }
            op.r1 = xmm_op(i, 0)?;
            if !m1 {
                op.r2 = xmm_op(i, 1)?;
            }
            Some(match (align, m1) {
                (true, true) => load128::<true, true>,
                (true, false) => load128::<true, false>,
                (false, true) => load128::<false, true>,
                (false, false) => load128::<false, false>,
            })
        }
        M::Movss | M::Movsd => {
            let four = m == M::Movss;
            if m0 {
                op.r2 = xmm_op(i, 1)?;
                return Some(if four {
                    movs::<4, STORE>
                } else {
                    movs::<8, STORE>
                });
            }
            op.r1 = xmm_op(i, 0)?;
            if m1 {
                return Some(if four {
                    movs::<4, LOAD>
                } else {
                    movs::<8, LOAD>
                });
            }
            op.r2 = xmm_op(i, 1)?;
            Some(if four { movs::<4, RR> } else { movs::<8, RR> })
        }
        M::Movd | M::Movq => translate_movdq(i, op),
        M::Movntq => {
            op.r2 = mm_op(i, 1)?;
            m0.then_some(movq_mm::<STORE> as Handler)
        }
        M::Movq2dq => {
            op.r1 = xmm_op(i, 0)?;
            op.r2 = mm_op(i, 1)?;
            Some(movq2dq::<true>)
        }
        M::Movdq2q => {
            op.r1 = mm_op(i, 0)?;
            op.r2 = xmm_op(i, 1)?;
            Some(movq2dq::<false>)
        }
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd => {
            let high = matches!(m, M::Movhps | M::Movhpd);
            if m0 {
                op.r2 = xmm_op(i, 1)?;
                return Some(if high {
                    movhalf::<true, true>
                } else {
                    movhalf::<false, true>
                });
            }
            op.r1 = xmm_op(i, 0)?;
            if !m1 {
                return None;
            }
            Some(if high {
                movhalf::<true, false>
            } else {
                movhalf::<false, false>
            })
        }
        M::Movhlps | M::Movlhps => {
            op.r1 = xmm_op(i, 0)?;
            op.r2 = xmm_op(i, 1)?;
            Some(if m == M::Movlhps {
                movhlps::<true>
            } else {
                movhlps::<false>
            })
        }
        M::Movmskps | M::Movmskpd => {
            op.r1 = gpr_op(i, 0)?.0;
            op.r2 = xmm_op(i, 1)?;
            Some(if m == M::Movmskpd {
                movmsk::<true>
            } else {
                movmsk::<false>
            })
        }
        M::Maskmovq | M::Maskmovdqu => {
            // Operand 0 is the implicit DS:rDI destination.
            let asize = match i.op_kind(0) {
                OpKind::MemorySegDI => 2,
                OpKind::MemorySegEDI => 4,
                OpKind::MemorySegRDI => 8,
                _ => return None,
            };
            op.flags |= super::F_MEM;
            op.base = RDI as u8;
            op.index = NOREG;
            op.disp = 0;
            op.asize = asize;
            let seg = i.memory_segment();
            let n = if seg.is_segment_register() {
                seg.number() as u8
            } else {
                3
            };
            op.seg = if i.code_size() == CodeSize::Code64 && n != 4 && n != 5 {
                SEG_NONE
            } else {
                n
            };
            if m == M::Maskmovq {
                op.r1 = mm_op(i, 1)?;
                op.r2 = mm_op(i, 2)?;
                Some(maskmov::<true>)
            } else {
                op.r1 = xmm_op(i, 1)?;
                op.r2 = xmm_op(i, 2)?;
                Some(maskmov::<false>)
            }
        }
        M::Movnti => {
            if !m0 {
                return None;
            }
            let (r, s) = gpr_op(i, 1)?;
            op.r2 = r;
            op.size = s;
            Some(movnti)
        }
        _ => None,
    }
}

/// MOVD/MOVQ: GPR/memory ↔ XMM/MMX, XMM ↔ XMM/m64, MMX ↔ MMX/m64.
fn translate_movdq(i: &Instruction, op: &mut Op) -> Option<Handler> {
    let (m0, m1) = (mem_op(i, 0), mem_op(i, 1));
    let size = if i.mnemonic() == M::Movd { 4 } else { 8 };
    let reg = |n: u32| -> Register {
        if n < i.op_count() && i.op_kind(n) == OpKind::Register {
            i.op_register(n)
        } else {
            Register::None
        }
    };
    let (r0, r1) = (reg(0), reg(1));
    let gpr_or_mem = |n: u32, op: &mut Op| -> Option<bool> {
        if mem_op(i, n) {
            op.size = size;
            return Some(true);
        }
        let (r, s) = gpr_op(i, n)?;
        op.r2 = r;
        op.size = s;
        Some(false)
    };
    if r0.is_xmm() {
        op.r1 = r0.number() as u8;
        if r1.is_xmm() {
            op.r2 = r1.number() as u8;
            return Some(movq_xmm::<RR>);
        }
        if m1 && size == 8 && i.code() == iced_x86::Code::Movq_xmm_xmmm64 {
            return Some(movq_xmm::<LOAD>);
        }
        let mem = gpr_or_mem(1, op)?;
        return Some(if mem {
            movd_xmm::<true, true>
        } else {
            movd_xmm::<true, false>
        });
    }
    if r1.is_xmm() {
        op.r1 = r1.number() as u8;
        if m0 && size == 8 && i.code() == iced_x86::Code::Movq_xmmm64_xmm {
            op.r2 = op.r1;
            return Some(movq_xmm::<STORE>);
        }
        if r0.is_xmm() {
            return None;
        }
        let mem = gpr_or_mem(0, op)?;
        return Some(if mem {
            movd_xmm::<false, true>
        } else {
            movd_xmm::<false, false>
        });
    }
    if r0.is_mm() {
        op.r1 = r0.number() as u8;
        if r1.is_mm() {
            op.r2 = r1.number() as u8;
            return Some(movq_mm::<RR>);
        }
        if m1 && i.code() == iced_x86::Code::Movq_mm_mmm64 {
            return Some(movq_mm::<LOAD>);
        }
        let mem = gpr_or_mem(1, op)?;
        return Some(if mem {
            movd_mm::<true, true>
        } else {
            movd_mm::<true, false>
        });
    }
    if r1.is_mm() {
        op.r1 = r1.number() as u8;
        if m0 && i.code() == iced_x86::Code::Movq_mmm64_mm {
            op.r2 = op.r1;
            return Some(movq_mm::<STORE>);
        }
        let mem = gpr_or_mem(0, op)?;
        return Some(if mem {
            movd_mm::<false, true>
        } else {
            movd_mm::<false, false>
        });
    }
    None
}
