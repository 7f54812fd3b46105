//! LOCK-prefixed read-modify-write instructions and the implicitly locked ones (XCHG with
//! memory, CMPXCHG8B/16B; SDM Vol. 3A §8.1.2). They run as host atomic operations on guest
//! RAM, so another vCPU (another host thread) sees them atomic. An operand that is not RAM or
//! not naturally aligned falls back to a read and a write under one process-wide lock.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use super::alu::{self, compute, unary_compute, unary_flags};
use super::{Exec, Op};
use crate::emu::cpu::{gp0, R, RAX, RBX, RCX, RDX};
use crate::emu::flags::{self, mask, ZF};

/// Serializes locked operations that cannot be done with one host atomic.
static SPLIT_LOCK: Mutex<()> = Mutex::new(());

macro_rules! cas_loop {
    ($atomic:ty, $t:ty, $p:expr, $f:expr) => {{
        // SAFETY: `$p` is a naturally aligned address inside a RAM page (checked by
        // `rmw_host`), which stays mapped while the VM exists.
        let a = unsafe { <$atomic>::from_ptr($p as *mut $t) };
        let mut cur = a.load(Ordering::Relaxed);
        loop {
            let new = $f(cur as u64) as $t;
            match a.compare_exchange_weak(cur, new, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => break cur as u64,
                Err(v) => cur = v,
            }
        }
    }};
}

/// Atomically replace the `size`-byte value `v` at `lin` with `f(v)`; returns `v`. `f` may
/// run more than once.
pub fn rmw(x: &mut Exec<'_>, lin: u64, size: u8, f: impl Fn(u64) -> u64) -> R<u64> {
    match x.rmw_host(lin, size)? {
        Some(p) => Ok(match size {
            1 => cas_loop!(AtomicU8, u8, p, f),
            2 => cas_loop!(AtomicU16, u16, p, f),
            4 => cas_loop!(AtomicU32, u32, p, f),
            _ => cas_loop!(AtomicU64, u64, p, f),
        }),
        None => {
            let _g = SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let old = x.read(lin, size)?;
            x.write(lin, size, f(old) & mask(size))?;
            Ok(old)
        }
    }
}

/// `LOCK OP [mem], src` for the binary ALU operations (form MR or MI).
pub fn alu_lock<const OP: u8, const S: u8, const FORM: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let lin = x.lin(op);
    let b = if FORM == alu::MR {
        x.cpu.reg(op.r1, S)
    } else {
        op.imm & mask(S)
    };
    let cf = x.cpu.cf() as u64;
    let m = mask(S);
    let f = move |a: u64| -> u64 {
        let r = match OP {
            alu::ADD => a.wrapping_add(b),
            alu::OR => a | b,
            alu::ADC => a.wrapping_add(b).wrapping_add(cf),
            alu::SBB => a.wrapping_sub(b).wrapping_sub(cf),
            alu::AND => a & b,
            alu::XOR => a ^ b,
            _ => a.wrapping_sub(b),
        };
        r & m
    };
    let old = rmw(x, lin, S, f)?;
    let (_, l) = compute(x.cpu, OP, S, old, b);
    x.cpu.lazy = l;
    Ok(())
}

/// `LOCK INC/DEC/NOT/NEG [mem]`.
pub fn unary_lock<const OP: u8, const S: u8>(x: &mut Exec<'_>, op: &Op) -> R {
    let lin = x.lin(op);
    let old = rmw(x, lin, S, |a| unary_compute(OP, S, a).0)?;
    let (r, f) = unary_compute(OP, S, old);
    unary_flags(x.cpu, OP, S, old, r, f);
    Ok(())
}

/// XCHG reg, reg.
pub fn xchg_rr(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let a = x.cpu.reg(op.r1, s);
    let b = x.cpu.reg(op.r2, s);
    x.cpu.set_reg(op.r1, s, b);
    x.cpu.set_reg(op.r2, s, a);
    Ok(())
}

/// XCHG [mem], reg: always locked.
pub fn xchg_mr(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let lin = x.lin(op);
    let v = x.cpu.reg(op.r1, s);
    let old = rmw(x, lin, s, |_| v)?;
    x.cpu.set_reg(op.r1, s, old);
    Ok(())
}

/// XADD r/m, reg (SDM Vol. 2B "XADD"): TEMP = SRC + DEST; SRC = DEST; DEST = TEMP.
pub fn xadd(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let src = x.cpu.reg(op.r1, s);
    let m = mask(s);
    let old = if op.is_mem() {
        let lin = x.lin(op);
        rmw(x, lin, s, |a| a.wrapping_add(src) & m)?
    } else {
        let d = x.cpu.reg(op.r2, s);
        x.cpu.set_reg(op.r1, s, d);
        x.cpu.set_reg(op.r2, s, d.wrapping_add(src) & m);
        d
    };
    if op.is_mem() {
        x.cpu.set_reg(op.r1, s, old);
    }
    let r = old.wrapping_add(src) & m;
    x.cpu.set_lazy(flags::ADD, s, r, old, src);
    Ok(())
}

/// CMPXCHG r/m, reg (SDM Vol. 2A "CMPXCHG").
pub fn cmpxchg(x: &mut Exec<'_>, op: &Op) -> R {
    let s = op.size;
    let acc = x.cpu.reg(RAX as u8, s);
    let src = x.cpu.reg(op.r1, s);
    let old = if op.is_mem() {
        let lin = x.lin(op);
        rmw(x, lin, s, |cur| if cur == acc { src } else { cur })?
    } else {
        let d = x.cpu.reg(op.r2, s);
        if d == acc {
            x.cpu.set_reg(op.r2, s, src);
        }
        d
    };
    if old != acc {
        x.cpu.set_reg(RAX as u8, s, old);
    }
    x.cpu
        .set_lazy(flags::SUB, s, acc.wrapping_sub(old) & mask(s), acc, old);
    Ok(())
}

/// CMPXCHG8B m64 (`size == 4`) / CMPXCHG16B m128 (`size == 8`), always atomic.
pub fn cmpxchg_wide(x: &mut Exec<'_>, op: &Op) -> R {
    let lin = x.lin(op);
    let g = &x.cpu.gpr;
    let eq = if op.size == 8 {
        if lin & 15 != 0 {
            return Err(gp0());
        }
        let old = (g[RAX] as u128) | ((g[RDX] as u128) << 64);
        let new = (g[RBX] as u128) | ((g[RCX] as u128) << 64);
        let cur = cas128(x, lin, old, new)?;
        let eq = cur == old;
        if !eq {
            x.cpu.gpr[RAX] = cur as u64;
            x.cpu.gpr[RDX] = (cur >> 64) as u64;
        }
        eq
    } else {
        let old = (g[RAX] & 0xffff_ffff) | (g[RDX] << 32);
        let new = (g[RBX] & 0xffff_ffff) | (g[RCX] << 32);
        let cur = rmw(x, lin, 8, |c| if c == old { new } else { c })?;
        let eq = cur == old;
        if !eq {
            x.cpu.gpr[RAX] = cur & 0xffff_ffff;
            x.cpu.gpr[RDX] = cur >> 32;
        }
        eq
    };
    x.cpu.set_arith(ZF, if eq { ZF } else { 0 });
    Ok(())
}

/// 128-bit compare-and-exchange at 16-byte aligned `lin`; returns the old value.
fn cas128(x: &mut Exec<'_>, lin: u64, old: u128, new: u128) -> R<u128> {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = x.rmw_host16(lin)? {
        let (mut lo, mut hi) = (old as u64, (old >> 64) as u64);
        let new_lo = new as u64;
        let new_hi = (new >> 64) as u64;
        // SAFETY: `p` is a 16-byte aligned address of 16 bytes inside one RAM page (checked by
        // `rmw_host16`); CMPXCHG16B only touches those bytes. RBX is reserved by the compiler,
        // so it is swapped in and restored around the instruction.
        unsafe {
            std::arch::asm!(
                "xchg {nlo}, rbx",
                "lock cmpxchg16b xmmword ptr [{p}]",
                "mov rbx, {nlo}",
                p = in(reg) p,
                nlo = inout(reg) new_lo => _,
                inout("rax") lo,
                inout("rdx") hi,
                in("rcx") new_hi,
                options(nostack)
            );
        }
        return Ok((lo as u128) | ((hi as u128) << 64));
    }
    let _g = SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = [0u8; 16];
    let user = x.cpu.tlb_user != 0;
    x.read_bytes(lin, &mut b, user)?;
    let cur = u128::from_le_bytes(b);
    let out = if cur == old { new } else { cur };
    x.write_bytes(lin, &out.to_le_bytes(), user)?;
    Ok(cur)
}

impl Exec<'_> {
    /// Host address for a 16-byte locked access at 16-byte aligned `lin`, if it is RAM and
    /// not a code page (`rmw_host`).
    fn rmw_host16(&mut self, lin: u64) -> R<Option<usize>> {
        Ok(self.rmw_host(lin, 8)?.filter(|p| p % 16 == 0))
    }
}
