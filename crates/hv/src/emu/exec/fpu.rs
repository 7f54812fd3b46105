//! x87 FPU, MMX and SSE/SSE2 (Intel SDM Vol. 1 chapters 8-11), FXSAVE/FXRSTOR,
//! LDMXCSR/STMXCSR: which instructions belong to the family, the shared availability checks
//! (CR0.EM/TS/NE, CR4.OSFXSR/OSXMMEXCPT), register and memory access helpers, and the
//! translation of an iced instruction into a handler of one of the family modules:
//!
//! | module | what |
//! |---|---|
//! | `softfloat` | IEEE arithmetic in software (single, double, extended; rounding, flags) |
//! | `sse` | SSE/SSE2 floating point: arithmetic, compares, conversions, MXCSR |
//! | `simd` | integer SIMD, logic, shuffles and unpacks on MMX and XMM registers |
//! | `simd_move` | moves between XMM, MMX, general registers and memory |
//! | `x87`, `x87_math` | the x87 FPU |
//! | `fxsave` | FXSAVE/FXRSTOR, FNSAVE/FRSTOR, FNSTENV/FLDENV |
//!
//! The architectural state is `Cpu::fpu` (`FpuState`, the FXSAVE image): `fpr[i]` is ST(i)
//! (MMX register i when TOP = 0), `ftwx` the abridged tag byte (bit i: physical register i is
//! in use). XMM registers are read and written in place.

use std::sync::OnceLock;

use iced_x86::{EncodingKind, Instruction, Mnemonic, Register};

use super::{fxsave, simd, simd_move, sse, x87, Exec, Handler, Op};
use crate::emu::cpu::{
    gp0, ud, Cpu, Exc, CR0_EM, CR0_NE, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, NM, R,
};
use crate::emu::{log_once, LogOnce};

/// x87 floating-point error (SDM Vol. 3A §6.15, "Interrupt 16").
pub const MF: u8 = 16;
/// SIMD floating-point exception ("Interrupt 19").
pub const XM: u8 = 19;

/// FSW bits (SDM Vol. 1 §8.1.3).
pub const FSW_SF: u16 = 1 << 6;
pub const FSW_ES: u16 = 1 << 7;
pub const FSW_C0: u16 = 1 << 8;
pub const FSW_C1: u16 = 1 << 9;
pub const FSW_C2: u16 = 1 << 10;
pub const FSW_TOP: u16 = 7 << 11;
pub const FSW_C3: u16 = 1 << 14;
pub const FSW_B: u16 = 1 << 15;

/// The MXCSR bits this CPU implements (MXCSR_MASK, SDM Vol. 1 §11.6.6): flags, DAZ, masks,
/// RC, FZ.
pub const MXCSR_MASK: u32 = 0xffff;

/// Whether `i` belongs to the x87/MMX/SSE family this module owns.
pub fn owns(i: &Instruction) -> bool {
    if matches!(
        i.mnemonic(),
        Mnemonic::Fxsave
            | Mnemonic::Fxsave64
            | Mnemonic::Fxrstor
            | Mnemonic::Fxrstor64
            | Mnemonic::Ldmxcsr
            | Mnemonic::Stmxcsr
            | Mnemonic::Emms
            | Mnemonic::Wait
            | Mnemonic::Movnti
            // The memory forms have no XMM register operand.
            | Mnemonic::Cvtss2si
            | Mnemonic::Cvttss2si
            | Mnemonic::Cvtsd2si
            | Mnemonic::Cvttsd2si
    ) {
        return true;
    }
    if is_x87_mnemonic(i.mnemonic()) {
        return true;
    }
    (0..i.op_count()).any(|n| {
        i.op_kind(n) == iced_x86::OpKind::Register && {
            let r: Register = i.op_register(n);
            r.is_xmm() || r.is_mm() || r.is_st() || r.is_ymm() || r.is_zmm()
        }
    })
}

/// x87 mnemonics all start with `F` (FLD, FNINIT, FXSAVE, ...); no integer one does. The
/// table is built once from iced's mnemonic names.
fn is_x87_mnemonic(m: Mnemonic) -> bool {
    static TABLE: OnceLock<Vec<bool>> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        Mnemonic::values()
            .map(|m| format!("{m:?}").starts_with('F'))
            .collect()
    });
    t.get(m as usize).copied().unwrap_or(false)
}

/// The handler for an instruction `owns` accepted. VEX/EVEX/3DNow! encodings (AVX and later
/// are not advertised) and forms no module implements get [`stub`] (#UD, logged once).
pub fn translate(i: &Instruction, op: &mut Op) -> Handler {
    let h = if i.encoding() == EncodingKind::Legacy {
        x87::translate(i, op)
            .or_else(|| fxsave::translate(i, op))
            .or_else(|| sse::translate(i, op))
            .or_else(|| simd::translate(i, op))
            .or_else(|| simd_move::translate(i, op))
    } else {
        None
    };
    h.unwrap_or_else(|| {
        op.imm = i.code() as u64;
        stub
    })
}

/// #UD, logged once per instruction kind.
pub fn stub(x: &mut Exec<'_>, op: &Op) -> R {
    let code = iced_x86::Code::try_from(op.imm as usize).unwrap_or_default();
    log_once(
        LogOnce::Insn(op.imm as u32),
        format_args!(
            "vCPU {}: x87/SSE instruction {code:?} is not implemented (#UD) at RIP {:#x}",
            x.cpu.id,
            x.cpu.rip.wrapping_sub(op.len as u64)
        ),
    );
    Err(ud())
}

// ---- operand decoding helpers (translation time) --------------------------------------------------

/// Register number of operand `n` when it is an XMM register.
pub fn xmm_op(i: &Instruction, n: u32) -> Option<u8> {
    reg_op(i, n)
        .filter(|r| r.is_xmm())
        .map(|r| r.number() as u8)
}

/// Register number of operand `n` when it is an MMX register.
pub fn mm_op(i: &Instruction, n: u32) -> Option<u8> {
    reg_op(i, n).filter(|r| r.is_mm()).map(|r| r.number() as u8)
}

/// ST(i) index of operand `n` when it is an x87 register.
pub fn st_op(i: &Instruction, n: u32) -> Option<u8> {
    reg_op(i, n).filter(|r| r.is_st()).map(|r| r.number() as u8)
}

/// (number, size) of operand `n` when it is a 32- or 64-bit general register.
pub fn gpr_op(i: &Instruction, n: u32) -> Option<(u8, u8)> {
    reg_op(i, n)
        .filter(|r| r.is_gpr32() || r.is_gpr64())
        .map(|r| (r.full_register().number() as u8, r.size() as u8))
}

fn reg_op(i: &Instruction, n: u32) -> Option<Register> {
    (n < i.op_count() && i.op_kind(n) == iced_x86::OpKind::Register).then(|| i.op_register(n))
}

/// Operand `n` is memory.
pub fn mem_op(i: &Instruction, n: u32) -> bool {
    n < i.op_count() && i.op_kind(n) == iced_x86::OpKind::Memory
}

/// The r/m operand `n` is an XMM register (`Some(false)`, number stored in `op.r2`) or memory
/// (`Some(true)`).
pub fn xmm_rm(i: &Instruction, n: u32, op: &mut Op) -> Option<bool> {
    if mem_op(i, n) {
        return Some(true);
    }
    op.r2 = xmm_op(i, n)?;
    Some(false)
}

/// The r/m operand `n` is an MMX register (`Some(false)`, in `op.r2`) or memory.
pub fn mm_rm(i: &Instruction, n: u32, op: &mut Op) -> Option<bool> {
    if mem_op(i, n) {
        return Some(true);
    }
    op.r2 = mm_op(i, n)?;
    Some(false)
}

/// Pick the handler for a `MEM` const parameter: `by_mem!(mem, path::f, A, B)` is
/// `f::<A, B, true>` or `f::<A, B, false>`.
macro_rules! by_mem {
    ($mem:expr, $($f:ident)::+ $(, $g:expr)*) => {
        if $mem {
            $($f)::+::<$({ $g },)* true> as Handler
        } else {
            $($f)::+::<$({ $g },)* false> as Handler
        }
    };
}
pub(crate) use by_mem;

// ---- availability checks (execution time) ----------------------------------------------------------

/// SSE/SSE2 instructions: #UD when CR0.EM = 1 or CR4.OSFXSR = 0, #NM when CR0.TS = 1
/// (SDM Vol. 3A §2.5, §13.1; Vol. 2 "SIMD Floating-Point Exceptions" tables).
#[inline(always)]
pub fn sse_ok(c: &Cpu) -> R {
    if c.cr0 & (CR0_EM | CR0_TS) == 0 && c.cr4 & CR4_OSFXSR != 0 {
        Ok(())
    } else {
        Err(sse_fault(c))
    }
}

#[cold]
fn sse_fault(c: &Cpu) -> Exc {
    if c.cr0 & CR0_EM != 0 || c.cr4 & CR4_OSFXSR == 0 {
        ud()
    } else {
        nm()
    }
}

/// #NM (SDM Vol. 3A §6.15, "Interrupt 7").
#[inline]
pub fn nm() -> Exc {
    Exc::Fault {
        vector: NM,
        code: None,
    }
}

/// A pending unmasked x87 exception (FSW.ES) is reported with #MF before the next waiting
/// x87 or MMX instruction when CR0.NE = 1 (SDM Vol. 1 §8.6, Vol. 3A §6.15 "Interrupt 16").
/// With CR0.NE = 0 the PC-style FERR# path is not wired and the error is not reported.
#[inline(always)]
pub fn pending(c: &Cpu) -> R {
    if c.fpu.fsw & FSW_ES != 0 && c.cr0 & CR0_NE != 0 {
        return Err(Exc::Fault {
            vector: MF,
            code: None,
        });
    }
    Ok(())
}

/// MMX instructions (and SSE instructions on MMX registers): #UD when CR0.EM = 1, #NM when
/// CR0.TS = 1, #MF on a pending x87 exception; then the x87 state becomes the MMX state:
/// TOP = 0, all registers valid (SDM Vol. 1 §9.5.1, Table 9-2).
#[inline(always)]
pub fn mmx_ok(c: &mut Cpu) -> R {
    if c.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(if c.cr0 & CR0_EM != 0 { ud() } else { nm() });
    }
    pending(c)?;
    mmx_enter(c);
    Ok(())
}

/// The MMX transition: with TOP = 0, ST(i) is physical register i = MMi.
#[inline(always)]
pub fn mmx_enter(c: &mut Cpu) {
    let top = (c.fpu.fsw & FSW_TOP) >> 11;
    if top != 0 {
        c.fpu.fpr.rotate_right(top as usize);
        c.fpu.fsw &= !FSW_TOP;
    }
    c.fpu.ftwx = 0xff;
}

/// x87 instructions: #NM when CR0.EM or CR0.TS is set (SDM Vol. 3A §2.5 Table 2-2).
#[inline(always)]
pub fn x87_ok_nowait(c: &Cpu) -> R {
    if c.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(nm());
    }
    Ok(())
}

/// Waiting x87 instructions: [`x87_ok_nowait`], then a pending exception is #MF.
#[inline(always)]
pub fn x87_ok(c: &Cpu) -> R {
    x87_ok_nowait(c)?;
    pending(c)
}

/// A SIMD floating-point exception that is not masked: #XM when CR4.OSXMMEXCPT = 1, #UD
/// otherwise (SDM Vol. 3A §6.15 "Interrupt 19").
#[cold]
pub fn simd_exception(c: &Cpu) -> Exc {
    if c.cr4 & CR4_OSXMMEXCPT != 0 {
        Exc::Fault {
            vector: XM,
            code: None,
        }
    } else {
        ud()
    }
}

// ---- register access ---------------------------------------------------------------------------------

#[inline(always)]
pub fn xmm(c: &Cpu, r: u8) -> u128 {
    u128::from_le_bytes(c.fpu.xmm[(r & 15) as usize])
}

#[inline(always)]
pub fn set_xmm(c: &mut Cpu, r: u8, v: u128) {
    c.fpu.xmm[(r & 15) as usize] = v.to_le_bytes();
}

/// MMX register `r` (after [`mmx_ok`]: TOP = 0).
#[inline(always)]
pub fn mm(c: &Cpu, r: u8) -> u64 {
    let f = &c.fpu.fpr[(r & 7) as usize];
    u64::from_le_bytes([f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]])
}

/// Write MMX register `r`: the significand of physical register `r`, exponent and sign all
/// ones (SDM Vol. 1 §9.5.1).
#[inline(always)]
pub fn set_mm(c: &mut Cpu, r: u8, v: u64) {
    let f = &mut c.fpu.fpr[(r & 7) as usize];
    f[..8].copy_from_slice(&v.to_le_bytes());
    f[8] = 0xff;
    f[9] = 0xff;
}

// ---- memory access -----------------------------------------------------------------------------------

/// Read 16 bytes at `lin`; with `align`, a misaligned address is #GP(0) (SDM Vol. 1
/// §11.6.7: legacy SSE 128-bit memory operands must be 16-byte aligned unless the instruction
/// says otherwise).
#[inline(always)]
pub fn read128(x: &mut Exec<'_>, lin: u64, align: bool) -> R<u128> {
    if align && lin & 15 != 0 {
        return Err(gp0());
    }
    if lin & 0xfff <= 0xff0 {
        // One page: if the first half translates, so does the second.
        let lo = x.read(lin, 8)?;
        let hi = x.read(lin + 8, 8)?;
        return Ok(lo as u128 | (hi as u128) << 64);
    }
    let mut b = [0u8; 16];
    let user = x.cpu.tlb_user != 0;
    x.read_bytes(lin, &mut b, user)?;
    Ok(u128::from_le_bytes(b))
}

/// Write 16 bytes at `lin` (both pages are checked before any byte is written).
#[inline(always)]
pub fn write128(x: &mut Exec<'_>, lin: u64, v: u128, align: bool) -> R {
    if align && lin & 15 != 0 {
        return Err(gp0());
    }
    if lin & 0xfff <= 0xff0 {
        x.write(lin, 8, v as u64)?;
        return x.write(lin + 8, 8, (v >> 64) as u64);
    }
    let user = x.cpu.tlb_user != 0;
    x.write_bytes(lin, &v.to_le_bytes(), user)
}

/// The 128-bit source operand: XMM `op.r2` or aligned memory.
#[inline(always)]
pub fn src128<const MEM: bool>(x: &mut Exec<'_>, op: &Op, align: bool) -> R<u128> {
    if MEM {
        let lin = x.lin(op);
        read128(x, lin, align)
    } else {
        Ok(xmm(x.cpu, op.r2))
    }
}

/// The low 64 bits of the source: XMM `op.r2` or an 8-byte memory operand.
#[inline(always)]
pub fn src64<const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R<u64> {
    if MEM {
        let lin = x.lin(op);
        x.read(lin, 8)
    } else {
        Ok(xmm(x.cpu, op.r2) as u64)
    }
}

/// The low 32 bits of the source: XMM `op.r2` or a 4-byte memory operand.
#[inline(always)]
pub fn src32<const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R<u32> {
    if MEM {
        let lin = x.lin(op);
        Ok(x.read(lin, 4)? as u32)
    } else {
        Ok(xmm(x.cpu, op.r2) as u32)
    }
}

/// The MMX source: MMX `op.r2` or an 8-byte memory operand.
#[inline(always)]
pub fn src_mm<const MEM: bool>(x: &mut Exec<'_>, op: &Op) -> R<u64> {
    if MEM {
        let lin = x.lin(op);
        x.read(lin, 8)
    } else {
        Ok(mm(x.cpu, op.r2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::block::DECODER_OPTIONS;
    use iced_x86::Decoder;

    fn dec(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DECODER_OPTIONS).decode()
    }

    #[test]
    fn ownership() {
        assert!(owns(&dec(&[0x0f, 0x58, 0xc1]))); // addps xmm0, xmm1
        assert!(owns(&dec(&[0xd9, 0xe8]))); // fld1
        assert!(owns(&dec(&[0x0f, 0xfc, 0xc1]))); // paddb mm0, mm1
        assert!(owns(&dec(&[0x9b]))); // fwait
        assert!(owns(&dec(&[0x0f, 0xc3, 0x07]))); // movnti [rdi], eax
        assert!(!owns(&dec(&[0x48, 0x01, 0xd8]))); // add rax, rbx
        assert!(!owns(&dec(&[0x0f, 0xae, 0xf0]))); // mfence
    }

    #[test]
    fn vex_is_undefined() {
        let i = dec(&[0xc5, 0xf8, 0x58, 0xc1]); // vaddps xmm0, xmm0, xmm1
        assert!(owns(&i));
        let mut op = Op::new(stub, i.len() as u8);
        assert!(std::ptr::fn_addr_eq(
            translate(&i, &mut op),
            stub as Handler
        ));
    }
}
