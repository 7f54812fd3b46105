//! String instructions: MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS with REP/REPE/REPNE
//! (Intel SDM Vol. 2B "REP/REPE/REPZ/REPNE/REPNZ"). The counter and pointers have the address
//! size; each element updates them, so a fault in the middle leaves a restartable state.
//! Long repeats stop after a chunk and restart the instruction, so a vCPU stays kickable.
//! `REP MOVS`/`REP STOS` going forwards copy page-sized runs of RAM at once.

use super::{Exec, Op, F_REP, F_REPNE};
use crate::emu::cpu::{gp0, Exc, ES, R, RAX, RCX, RDI, RDX, RSI};
use crate::emu::flags::{self, mask, DF};
use crate::emu::mmu::{store, Access, Target, PAGE_SIZE};

/// Elements per chunk before a long REP yields to the block loop.
const CHUNK: u64 = 1 << 16;

pub const MOVS: u8 = 0;
pub const STOS: u8 = 1;
pub const LODS: u8 = 2;
pub const CMPS: u8 = 3;
pub const SCAS: u8 = 4;
pub const INS: u8 = 5;
pub const OUTS: u8 = 6;

impl Exec<'_> {
    /// Linear address of ES:`ea` (string destination; no segment override).
    #[inline(always)]
    fn es_lin(&self, ea: u64) -> u64 {
        if self.cpu.bitness == 64 {
            ea
        } else {
            self.seg_lin(ES as u8, ea)
        }
    }

    /// I/O privilege check (SDM Vol. 1 §18.5.1; no TSS I/O bitmap).
    pub fn io_allowed(&self) -> R {
        if self.cpu.protected() && self.cpu.cpl > self.cpu.iopl() {
            return Err(gp0());
        }
        Ok(())
    }
}

/// One string instruction; `ext` selects which.
pub fn string(x: &mut Exec<'_>, op: &Op) -> R {
    let kind = op.ext;
    if kind == INS || kind == OUTS {
        x.io_allowed()?;
    }
    let rep = op.flags & (F_REP | F_REPNE) != 0;
    let s = op.size;
    let am = mask(op.asize);
    let step = if x.cpu.flags & DF != 0 {
        (s as u64).wrapping_neg()
    } else {
        s as u64
    };
    if !rep {
        return element(x, op, kind, s, am, step);
    }
    if (kind == MOVS || kind == STOS) && step == s as u64 && op.asize == 8 {
        if let Some(r) = bulk(x, op, kind, s)? {
            return r;
        }
    }
    let mut done = 0u64;
    loop {
        if x.cpu.gpr[RCX] & am == 0 {
            return Ok(());
        }
        element(x, op, kind, s, am, step)?;
        x.cpu.add_masked(RCX, u64::MAX, am);
        if kind == CMPS || kind == SCAS {
            let zf = x.cpu.cond(4);
            if (op.flags & F_REPNE != 0 && zf) || (op.flags & F_REP != 0 && !zf) {
                return Ok(());
            }
        }
        done += 1;
        if done >= CHUNK && x.cpu.gpr[RCX] & am != 0 {
            return yield_restart(x, op);
        }
    }
}

/// Leave the instruction half done: RIP back to its start, continue later.
fn yield_restart(x: &mut Exec<'_>, op: &Op) -> R {
    x.cpu.rip = x.cpu.rip.wrapping_sub(op.len as u64);
    Err(Exc::Stop)
}

/// One element of a string instruction, updating RSI/RDI.
fn element(x: &mut Exec<'_>, op: &Op, kind: u8, s: u8, am: u64, step: u64) -> R {
    let si = x.cpu.gpr[RSI] & am;
    let di = x.cpu.gpr[RDI] & am;
    match kind {
        MOVS => {
            let src = x.seg_lin(op.seg, si);
            let v = x.read(src, s)?;
            let dst = x.es_lin(di);
            x.write(dst, s, v)?;
            x.cpu.add_masked(RSI, step, am);
            x.cpu.add_masked(RDI, step, am);
        }
        STOS => {
            let dst = x.es_lin(di);
            let v = x.cpu.reg(RAX as u8, s);
            x.write(dst, s, v)?;
            x.cpu.add_masked(RDI, step, am);
        }
        LODS => {
            let src = x.seg_lin(op.seg, si);
            let v = x.read(src, s)?;
            x.cpu.set_reg(RAX as u8, s, v);
            x.cpu.add_masked(RSI, step, am);
        }
        CMPS => {
            let src = x.seg_lin(op.seg, si);
            let a = x.read(src, s)?;
            let dst = x.es_lin(di);
            let b = x.read(dst, s)?;
            x.cpu
                .set_lazy(flags::SUB, s, a.wrapping_sub(b) & mask(s), a, b);
            x.cpu.add_masked(RSI, step, am);
            x.cpu.add_masked(RDI, step, am);
        }
        SCAS => {
            let dst = x.es_lin(di);
            let b = x.read(dst, s)?;
            let a = x.cpu.reg(RAX as u8, s);
            x.cpu
                .set_lazy(flags::SUB, s, a.wrapping_sub(b) & mask(s), a, b);
            x.cpu.add_masked(RDI, step, am);
        }
        INS => {
            let dst = x.es_lin(di);
            let user = x.cpu.tlb_user != 0;
            // Check the destination before the port is read (the read may have side effects).
            x.cpu.translate(dst, Access::Write, user)?;
            if (dst & 0xfff) + s as u64 > PAGE_SIZE {
                let next = (dst | 0xfff).wrapping_add(1) & x.cpu.lin_mask;
                x.cpu.translate(next, Access::Write, user)?;
            }
            let mut buf = [0u8; 8];
            let port = x.cpu.gpr[RDX] as u16;
            x.io.pio_read(port, &mut buf[..s as usize]);
            x.cpu.vm.io_exit();
            x.write(dst, s, u64::from_le_bytes(buf))?;
            x.cpu.add_masked(RDI, step, am);
        }
        _ => {
            let src = x.seg_lin(op.seg, si);
            let v = x.read(src, s)?;
            let port = x.cpu.gpr[RDX] as u16;
            x.io.pio_write(port, &v.to_le_bytes()[..s as usize]);
            x.cpu.vm.io_exit();
            x.cpu.add_masked(RSI, step, am);
        }
    }
    Ok(())
}

/// Forward `REP MOVS` / `REP STOS` with 64-bit addresses, a RAM run at a time. Returns
/// `None` when the element loop should finish the job (MMIO, overlap, page-crossing element).
fn bulk(x: &mut Exec<'_>, op: &Op, kind: u8, s: u8) -> R<Option<R>> {
    let user = x.cpu.tlb_user != 0;
    let mut chunks = 0u64;
    loop {
        let count = x.cpu.gpr[RCX];
        if count == 0 {
            return Ok(Some(Ok(())));
        }
        let di = x.cpu.gpr[RDI];
        let dst = x.es_lin(di);
        let mut n = count.min(CHUNK).saturating_mul(s as u64);
        n = n.min(PAGE_SIZE - (dst & 0xfff));
        let mut src_t = None;
        if kind == MOVS {
            let src = x.seg_lin(op.seg, x.cpu.gpr[RSI]);
            n = n.min(PAGE_SIZE - (src & 0xfff));
            src_t = Some(x.cpu.translate(src, Access::Read, user)?);
        }
        n -= n % s as u64;
        if n == 0 {
            return Ok(None);
        }
        let Target::Ram(pd) = x.cpu.translate(dst, Access::Write, user)? else {
            return Ok(None);
        };
        match src_t {
            Some(Target::Ram(ps)) => {
                let overlap = ps < pd + n as usize && pd < ps + n as usize;
                if overlap {
                    return Ok(None);
                }
                // SAFETY: both ranges were translated above, lie inside one RAM page each and
                // do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(ps as *const u8, pd as *mut u8, n as usize)
                };
            }
            Some(Target::Io(_)) => return Ok(None),
            None => {
                let v = x.cpu.reg(RAX as u8, s);
                // SAFETY: `pd..pd+n` was translated for write and lies in one RAM page.
                unsafe { fill(pd, n as usize, s, v) };
            }
        }
        x.cpu.wrote_host(pd, n as usize);
        let elems = n / s as u64;
        x.cpu.gpr[RCX] -= elems;
        x.cpu.gpr[RDI] = x.cpu.gpr[RDI].wrapping_add(n);
        if kind == MOVS {
            x.cpu.gpr[RSI] = x.cpu.gpr[RSI].wrapping_add(n);
        }
        chunks += 1;
        if chunks >= 64 && x.cpu.gpr[RCX] != 0 {
            return Ok(Some(yield_restart(x, op)));
        }
    }
}

/// Store `n` bytes of the `s`-byte element `v` repeated from host address `p` (`n` a multiple
/// of `s`): a memset when the element is one repeated byte (`REP STOSB`, zeroing), else
/// 8-byte stores of the replicated element.
///
/// # Safety
/// `p..p+n` must lie inside a guest RAM mapping that stays mapped for the call.
unsafe fn fill(p: usize, n: usize, s: u8, v: u64) {
    let bytes = v.to_le_bytes();
    let elem = &bytes[..s as usize];
    if elem.iter().all(|&b| b == elem[0]) {
        // SAFETY: the caller's guarantee.
        unsafe { std::ptr::write_bytes(p as *mut u8, elem[0], n) };
        return;
    }
    let mut pattern = [0u8; 8];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = elem[i % elem.len()];
    }
    let wide = u64::from_le_bytes(pattern);
    let mut off = 0;
    while off + 8 <= n {
        // SAFETY: the caller's guarantee; `off + 8 <= n`.
        unsafe { store(p + off, 8, wide) };
        off += 8;
    }
    // 8 is a multiple of `s`, so what is left is whole elements.
    while off < n {
        // SAFETY: the caller's guarantee; `n` is a multiple of `s`.
        unsafe { store(p + off, s, v) };
        off += s as usize;
    }
}

#[cfg(test)]
mod fill_tests {
    use super::fill;

    #[test]
    fn fill_repeats_the_element_for_every_size_and_alignment() {
        for s in [1u8, 2, 4, 8] {
            for start in 0..8 {
                for elems in [0usize, 1, 3, 17, 600] {
                    let n = elems * s as usize;
                    let mut buf = vec![0xeeu8; n + 32];
                    let v = 0x1122_3344_5566_7788u64;
                    let p = buf.as_mut_ptr() as usize + start;
                    // SAFETY: `p..p+n` lies inside `buf`.
                    unsafe { fill(p, n, s, v) };
                    let elem = &v.to_le_bytes()[..s as usize];
                    for i in 0..n {
                        assert_eq!(
                            buf[start + i],
                            elem[i % s as usize],
                            "s={s} start={start} i={i}"
                        );
                    }
                    assert!(buf[..start].iter().all(|&b| b == 0xee));
                    assert!(buf[start + n..].iter().all(|&b| b == 0xee));
                    // A repeated-byte element takes the memset path.
                    let mut z = vec![0xeeu8; n + 8];
                    // SAFETY: inside `z`.
                    unsafe { fill(z.as_mut_ptr() as usize + 1, n, s, 0) };
                    assert!(z[1..1 + n].iter().all(|&b| b == 0));
                    assert_eq!(z[0], 0xee);
                }
            }
        }
    }
}
