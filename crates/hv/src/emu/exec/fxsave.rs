//! Saving and restoring the x87/SSE state: FXSAVE/FXRSTOR (and the REX.W forms; SDM Vol. 1
//! §10.5.1, Vol. 2A "FXSAVE" Tables 3-53 to 3-56), FNSAVE/FSAVE/FRSTOR and
//! FNSTENV/FSTENV/FLDENV (Vol. 1 §8.1.10, Figures 8-9 to 8-12: the protected-mode layouts;
//! they are also used in real mode).
//!
//! FXSAVE writes bytes 0-415 of its 512-byte area (0-287 outside 64-bit mode) and never the
//! rest, which software may use. The instruction pointer / operand pointer / opcode of the
//! last x87 instruction are not tracked: the saved values are those last loaded (0 after
//! FNINIT).

use iced_x86::{Code, Instruction, Mnemonic as M};

use super::fpu::{mem_op, x87_ok, x87_ok_nowait, MXCSR_MASK};
use super::softfloat::Class;
use super::x87::{fcw_value, init, set_fsw, st, top, unp, update_es};
use super::{Exec, Handler, Op};
use crate::emu::cpu::{gp0, Cpu, R};
use crate::emu::mmu::{Access, PAGE_MASK};

/// 64-bit words FXSAVE writes: the header and registers (4 + 16), plus 2 per XMM register.
const HEADER_WORDS: usize = 20;

/// Check that every page of `lin .. lin + len` may be written, before anything is.
fn check_write(x: &mut Exec<'_>, lin: u64, len: u64) -> R {
    let user = x.cpu.tlb_user != 0;
    x.cpu.translate(lin, Access::Write, user)?;
    let last = lin.wrapping_add(len - 1) & x.cpu.lin_mask;
    if last & PAGE_MASK != lin & PAGE_MASK {
        x.cpu.translate(last, Access::Write, user)?;
    }
    Ok(())
}

/// XMM registers in the image: 16 in 64-bit mode, 8 otherwise.
#[inline]
fn xmm_count(c: &Cpu) -> usize {
    if c.bitness == 64 {
        16
    } else {
        8
    }
}

/// FXSAVE / FXSAVE64 (`W64`: 64-bit instruction and data pointers) m512: #GP(0) when not
/// 16-byte aligned, #NM when CR0.TS or CR0.EM is set.
pub fn fxsave<const W64: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok_nowait(x.cpu)?;
    let lin = x.lin(op);
    if lin & 15 != 0 {
        return Err(gp0());
    }
    let n = xmm_count(x.cpu);
    let words = HEADER_WORDS + 2 * n;
    let mut img = [0u64; HEADER_WORDS + 32];
    {
        let f = &x.cpu.fpu;
        img[0] = f.fcw as u64
            | (f.fsw as u64) << 16
            | (f.ftwx as u64) << 32
            | (f.last_opcode as u64) << 48;
        if W64 {
            img[1] = f.last_ip;
            img[2] = f.last_dp;
        } else {
            // FCS and FDS are stored as zero (deprecated, CPUID.(7,0):EBX[13]).
            img[1] = f.last_ip & 0xffff_ffff;
            img[2] = f.last_dp & 0xffff_ffff;
        }
        img[3] = f.mxcsr as u64 | (MXCSR_MASK as u64) << 32;
        for (i, r) in f.fpr.iter().enumerate() {
            let v = u128::from_le_bytes(*r) & super::x87::MASK80;
            img[4 + 2 * i] = v as u64;
            img[5 + 2 * i] = (v >> 64) as u64;
        }
        for (i, r) in f.xmm.iter().take(n).enumerate() {
            let v = u128::from_le_bytes(*r);
            img[HEADER_WORDS + 2 * i] = v as u64;
            img[HEADER_WORDS + 2 * i + 1] = (v >> 64) as u64;
        }
    }
    check_write(x, lin, words as u64 * 8)?;
    let m = x.cpu.lin_mask;
    for (k, w) in img[..words].iter().enumerate() {
        x.write(lin.wrapping_add(8 * k as u64) & m, 8, *w)?;
    }
    Ok(())
}

/// FXRSTOR / FXRSTOR64 m512: reserved MXCSR bits set is #GP(0).
pub fn fxrstor<const W64: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok_nowait(x.cpu)?;
    let lin = x.lin(op);
    if lin & 15 != 0 {
        return Err(gp0());
    }
    let n = xmm_count(x.cpu);
    let words = HEADER_WORDS + 2 * n;
    let mut img = [0u64; HEADER_WORDS + 32];
    let m = x.cpu.lin_mask;
    for (k, w) in img[..words].iter_mut().enumerate() {
        *w = x.read(lin.wrapping_add(8 * k as u64) & m, 8)?;
    }
    let mxcsr = img[3] as u32;
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(gp0());
    }
    let f = &mut x.cpu.fpu;
    f.fcw = fcw_value(img[0] as u16);
    f.fsw = (img[0] >> 16) as u16;
    f.ftwx = (img[0] >> 32) as u8;
    f.last_opcode = (img[0] >> 48) as u16 & 0x7ff;
    if W64 {
        f.last_ip = img[1];
        f.last_dp = img[2];
    } else {
        f.last_ip = img[1] & 0xffff_ffff;
        f.last_dp = img[2] & 0xffff_ffff;
    }
    f.mxcsr = mxcsr;
    for i in 0..8 {
        let v = (img[4 + 2 * i] as u128 | (img[5 + 2 * i] as u128) << 64) & super::x87::MASK80;
        f.fpr[i] = v.to_le_bytes();
    }
    for i in 0..n {
        let v = img[HEADER_WORDS + 2 * i] as u128 | (img[HEADER_WORDS + 2 * i + 1] as u128) << 64;
        f.xmm[i] = v.to_le_bytes();
    }
    update_es(x.cpu);
    Ok(())
}

// ---- FNSTENV / FLDENV / FNSAVE / FRSTOR ---------------------------------------------------------------

/// The full tag word: 00 valid, 01 zero, 10 special (NaN, infinity, denormal, unsupported),
/// 11 empty, for physical registers 0-7 (SDM Vol. 1 §8.1.7).
pub fn full_tag(c: &Cpu) -> u16 {
    let t = top(c);
    let mut w = 0u16;
    for p in 0..8u32 {
        let tag = if c.fpu.ftwx & (1 << p) == 0 {
            3
        } else {
            let u = unp(st(c, ((p + 8 - t) & 7) as u8));
            match u.class {
                Class::Zero => 1,
                Class::Num if !u.denormal => 0,
                _ => 2,
            }
        };
        w |= tag << (2 * p);
    }
    w
}

/// The abridged tag byte of a full tag word: a register is in use unless its tag is 11.
pub fn abridged_tag(full: u16) -> u8 {
    (0..8).fold(0u8, |a, p| {
        if (full >> (2 * p)) & 3 != 3 {
            a | 1 << p
        } else {
            a
        }
    })
}

/// The environment image: 7 dwords (32-bit operand size) or 7 words (16-bit).
fn env_image(c: &Cpu, o32: bool) -> [u32; 7] {
    let f = &c.fpu;
    let (ip, dp) = if o32 {
        (f.last_ip as u32, f.last_dp as u32)
    } else {
        (f.last_ip as u32 & 0xffff, f.last_dp as u32 & 0xffff)
    };
    let hi = if o32 { 0xffff_0000 } else { 0 };
    [
        f.fcw as u32 | hi,
        f.fsw as u32 | hi,
        full_tag(c) as u32 | hi,
        ip,
        if o32 {
            (f.last_opcode as u32 & 0x7ff) << 16
        } else {
            0
        },
        dp,
        hi,
    ]
}

/// Write the environment (and, for FNSAVE, the registers) at `lin`.
fn store_env(x: &mut Exec<'_>, lin: u64, o32: bool, regs: bool) -> R {
    let env = env_image(x.cpu, o32);
    let esz: u64 = if o32 { 4 } else { 2 };
    let len = 7 * esz + if regs { 80 } else { 0 };
    check_write(x, lin, len)?;
    let m = x.cpu.lin_mask;
    for (k, v) in env.iter().enumerate() {
        x.write(lin.wrapping_add(k as u64 * esz) & m, esz as u8, *v as u64)?;
    }
    if regs {
        for i in 0..8u8 {
            let v = st(x.cpu, i);
            let a = lin.wrapping_add(7 * esz + 10 * i as u64) & m;
            x.write(a, 8, v as u64)?;
            x.write(a.wrapping_add(8) & m, 2, (v >> 64) as u64 & 0xffff)?;
        }
    }
    Ok(())
}

/// Read the environment (and registers) at `lin` and load it.
fn load_env(x: &mut Exec<'_>, lin: u64, o32: bool, regs: bool) -> R {
    let esz: u64 = if o32 { 4 } else { 2 };
    let m = x.cpu.lin_mask;
    let mut env = [0u32; 7];
    for (k, v) in env.iter_mut().enumerate() {
        *v = x.read(lin.wrapping_add(k as u64 * esz) & m, esz as u8)? as u32;
    }
    let mut st_img = [0u128; 8];
    if regs {
        for (i, v) in st_img.iter_mut().enumerate() {
            let a = lin.wrapping_add(7 * esz + 10 * i as u64) & m;
            let lo = x.read(a, 8)?;
            let hi = x.read(a.wrapping_add(8) & m, 2)?;
            *v = lo as u128 | (hi as u128) << 64;
        }
    }
    let c = &mut *x.cpu;
    if regs {
        // The registers are in ST order relative to the new TOP.
        c.fpu.fsw = env[1] as u16;
    } else {
        set_fsw(c, env[1] as u16);
    }
    let f = &mut c.fpu;
    f.fcw = fcw_value(env[0] as u16);
    f.ftwx = abridged_tag(env[2] as u16);
    f.last_ip = env[3] as u64;
    f.last_opcode = if o32 {
        (env[4] >> 16) as u16 & 0x7ff
    } else {
        0
    };
    f.last_dp = env[5] as u64;
    if regs {
        for (i, v) in st_img.iter().enumerate() {
            f.fpr[i] = v.to_le_bytes();
        }
    }
    update_es(c);
    Ok(())
}

/// FNSTENV/FSTENV (`WAIT`): store the environment, then mask all exceptions (which clears
/// ES and B).
pub fn fstenv<const WAIT: bool, const O32: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if WAIT {
        x87_ok(x.cpu)?;
    } else {
        x87_ok_nowait(x.cpu)?;
    }
    let lin = x.lin(op);
    store_env(x, lin, O32, false)?;
    x.cpu.fpu.fcw |= 0x3f;
    update_es(x.cpu);
    Ok(())
}

/// FLDENV (a waiting instruction: a pending exception is reported first).
pub fn fldenv<const O32: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    load_env(x, lin, O32, false)
}

/// FNSAVE/FSAVE: store environment and registers, then FNINIT.
pub fn fsave<const WAIT: bool, const O32: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    if WAIT {
        x87_ok(x.cpu)?;
    } else {
        x87_ok_nowait(x.cpu)?;
    }
    let lin = x.lin(op);
    store_env(x, lin, O32, true)?;
    init(x.cpu);
    Ok(())
}

/// FRSTOR (waiting).
pub fn frstor<const O32: bool>(x: &mut Exec<'_>, op: &Op) -> R {
    x87_ok(x.cpu)?;
    let lin = x.lin(op);
    load_env(x, lin, O32, true)
}

/// The handler for a state save/restore instruction.
pub fn translate(i: &Instruction, _op: &mut Op) -> Option<Handler> {
    if !mem_op(i, 0) {
        return None;
    }
    let o32 = !matches!(
        i.code(),
        Code::Fnstenv_m14byte
            | Code::Fstenv_m14byte
            | Code::Fldenv_m14byte
            | Code::Fnsave_m94byte
            | Code::Fsave_m94byte
            | Code::Frstor_m94byte
    );
    Some(match (i.mnemonic(), o32) {
        (M::Fxsave, _) => fxsave::<false>,
        (M::Fxsave64, _) => fxsave::<true>,
        (M::Fxrstor, _) => fxrstor::<false>,
        (M::Fxrstor64, _) => fxrstor::<true>,
        (M::Fnstenv, true) => fstenv::<false, true>,
        (M::Fnstenv, false) => fstenv::<false, false>,
        (M::Fstenv, true) => fstenv::<true, true>,
        (M::Fstenv, false) => fstenv::<true, false>,
        (M::Fldenv, true) => fldenv::<true>,
        (M::Fldenv, false) => fldenv::<false>,
        (M::Fnsave, true) => fsave::<false, true>,
        (M::Fnsave, false) => fsave::<false, false>,
        (M::Fsave, true) => fsave::<true, true>,
        (M::Fsave, false) => fsave::<true, false>,
        (M::Frstor, true) => frstor::<true>,
        (M::Frstor, false) => frstor::<false>,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_words() {
        assert_eq!(abridged_tag(0xffff), 0);
        assert_eq!(abridged_tag(0x0000), 0xff);
        assert_eq!(abridged_tag(0xfff4), 0x03);
        let mut c = Cpu::new(0, crate::emu::tests::dummy_vm(), Vec::new());
        c.fpu.fsw = 6 << 11; // TOP = 6
        c.fpu.ftwx = 0b1100_0000; // physical 6 and 7 in use
        c.fpu.fpr[0] = 0u128.to_le_bytes(); // ST0 = R6 = +0
        c.fpu.fpr[1] = ((0x3fffu128 << 64) | 1 << 63).to_le_bytes(); // ST1 = R7 = 1.0
        assert_eq!(full_tag(&c), 0x1fff);
    }
}
