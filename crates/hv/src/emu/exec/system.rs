//! System instructions (Intel SDM Vol. 2 and Vol. 3A): CPUID, RDTSC(P), RDMSR/WRMSR, MOV to and
//! from control/debug/segment registers, descriptor tables, LTR/LLDT, LAR/LSL/VERR/VERW,
//! CLI/STI, HLT, IN/OUT, INT n, far JMP/CALL/RET, SYSCALL/SYSRET, SWAPGS, INVLPG.

use super::{Exec, Op, F_CL};
use crate::emu::cpu::*;
use crate::emu::cpuid;
use crate::emu::flags::{mask, IF, RF, ZF};
use crate::emu::mmu::Access;
use crate::emu::seg::{flat_code32, flat_code64, flat_data, parse_desc};
use crate::emu::{log_once, LogOnce};

/// #GP(0) unless CPL 0 (real mode counts as CPL 0).
#[inline]
fn cpl0(x: &Exec<'_>) -> R {
    if x.cpu.protected() && x.cpu.cpl != 0 {
        return Err(gp0());
    }
    Ok(())
}

/// #UD outside protected mode.
#[inline]
fn need_protected(x: &Exec<'_>) -> R {
    if !x.cpu.protected() {
        return Err(ud());
    }
    Ok(())
}

/// An invalid or unimplemented instruction: #UD. `imm` holds the iced `Code`.
pub fn undefined(x: &mut Exec<'_>, op: &Op) -> R {
    if op.imm != 0 {
        let code = iced_x86::Code::try_from(op.imm as usize).unwrap_or_default();
        log_once(
            LogOnce::Insn(op.imm as u32),
            format_args!(
                "vCPU {}: {code:?} is not implemented (#UD) at RIP {:#x}",
                x.cpu.id,
                x.cpu.rip.wrapping_sub(op.len as u64)
            ),
        );
    }
    Err(ud())
}

/// UD0/UD1/UD2 and invalid encodings: #UD without logging.
pub fn ud_op(_x: &mut Exec<'_>, _op: &Op) -> R {
    Err(ud())
}

pub fn cpuid(x: &mut Exec<'_>, _op: &Op) -> R {
    x.cpu.serialize();
    let leaf = x.cpu.gpr[RAX] as u32;
    let sub = x.cpu.gpr[RCX] as u32;
    let r = cpuid::query(&x.cpu.cpuid, leaf, sub);
    x.cpu.gpr[RAX] = r[0] as u64;
    x.cpu.gpr[RBX] = r[1] as u64;
    x.cpu.gpr[RCX] = r[2] as u64;
    x.cpu.gpr[RDX] = r[3] as u64;
    Ok(())
}

/// RDTSC (ext 0) / RDTSCP (ext 1).
pub fn rdtsc(x: &mut Exec<'_>, op: &Op) -> R {
    if x.cpu.cr4 & CR4_TSD != 0 && x.cpu.protected() && x.cpu.cpl != 0 {
        return Err(gp0());
    }
    let t = x.cpu.guest_tsc();
    x.cpu.gpr[RAX] = t & 0xffff_ffff;
    x.cpu.gpr[RDX] = t >> 32;
    if op.ext == 1 {
        x.cpu.gpr[RCX] = x.cpu.msr.tsc_aux & 0xffff_ffff;
    }
    Ok(())
}

pub fn rdmsr(x: &mut Exec<'_>, _op: &Op) -> R {
    cpl0(x)?;
    let idx = x.cpu.gpr[RCX] as u32;
    let v = x.cpu.rdmsr(idx).ok_or_else(gp0)?;
    x.cpu.gpr[RAX] = v & 0xffff_ffff;
    x.cpu.gpr[RDX] = v >> 32;
    Ok(())
}

pub fn wrmsr(x: &mut Exec<'_>, _op: &Op) -> R {
    cpl0(x)?;
    let idx = x.cpu.gpr[RCX] as u32;
    // WRMSR serializes, except to IA32_TSC_DEADLINE and the x2APIC MSRs (SDM Vol. 3A §8.3).
    if idx != 0x6e0 && !(0x800..=0x8ff).contains(&idx) {
        x.cpu.serialize();
    }
    let v = (x.cpu.gpr[RAX] & 0xffff_ffff) | (x.cpu.gpr[RDX] << 32);
    if !x.cpu.wrmsr(idx, v, false) {
        return Err(gp0());
    }
    Ok(())
}

/// RDPMC: no performance counters (CPUID leaf 0xA is empty).
pub fn rdpmc(_x: &mut Exec<'_>, _op: &Op) -> R {
    Err(gp0())
}

pub fn hlt(x: &mut Exec<'_>, _op: &Op) -> R {
    cpl0(x)?;
    Err(Exc::Halt)
}

/// CLI (ext 0) / STI (ext 1): #GP(0) if CPL > IOPL in protected mode (no VME/PVI).
pub fn cli_sti(x: &mut Exec<'_>, op: &Op) -> R {
    if x.cpu.protected() && x.cpu.cpl > x.cpu.iopl() {
        return Err(gp0());
    }
    if op.ext == 0 {
        x.cpu.flags &= !IF;
        return Ok(());
    }
    if x.cpu.flags & IF == 0 {
        x.cpu.flags |= IF;
        // STI blocks interrupts for one instruction (SDM Vol. 2B "STI").
        x.cpu.shadow = true;
        x.cpu.poll = true;
        return Err(Exc::Stop);
    }
    Ok(())
}

pub fn clts(x: &mut Exec<'_>, _op: &Op) -> R {
    cpl0(x)?;
    x.cpu.cr0 &= !CR0_TS;
    Ok(())
}

/// LMSW: the low four CR0 bits; PE can be set but not cleared.
pub fn lmsw(x: &mut Exec<'_>, op: &Op) -> R {
    cpl0(x)?;
    let v = x.rm_read(op, 2)?;
    let cr0 = (x.cpu.cr0 & !0xe) | (v & 0xf) | (x.cpu.cr0 & CR0_PE);
    write_cr0(x, cr0)?;
    Err(Exc::Stop)
}

/// SMSW: CR0[15:0] (a register destination gets the operand size).
pub fn smsw(x: &mut Exec<'_>, op: &Op) -> R {
    let v = x.cpu.cr0 & mask(op.size);
    x.rm_write(op, op.size, v)
}

pub fn invlpg(x: &mut Exec<'_>, op: &Op) -> R {
    x.cpu.serialize();
    cpl0(x)?;
    let lin = x.lin(op);
    x.cpu.mmu.flush_page(lin);
    Err(Exc::Stop)
}

/// WBINVD / INVD: caches are not modelled.
pub fn wbinvd(x: &mut Exec<'_>, _op: &Op) -> R {
    x.cpu.serialize();
    cpl0(x)
}

/// MOV CR0 (SDM Vol. 3A §2.5, §9.8.5 for the IA-32e transitions).
fn write_cr0(x: &mut Exec<'_>, v: u64) -> R {
    let c = &mut *x.cpu;
    if v >> 32 != 0 {
        return Err(gp0());
    }
    let v = v | CR0_ET;
    if v & CR0_PG != 0 && v & CR0_PE == 0 {
        return Err(gp0());
    }
    if v & CR0_NW != 0 && v & CR0_CD == 0 {
        return Err(gp0());
    }
    let old = c.cr0;
    if v & CR0_PG != 0 && old & CR0_PG == 0 && c.efer & EFER_LME != 0 {
        if c.cr4 & CR4_PAE == 0 || c.seg[CS].l {
            return Err(gp0());
        }
        c.efer |= EFER_LMA;
    }
    if v & CR0_PG == 0 && old & CR0_PG != 0 && c.efer & EFER_LMA != 0 {
        if c.bitness == 64 {
            return Err(gp0());
        }
        c.efer &= !EFER_LMA;
    }
    c.cr0 = v;
    if (old ^ v) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
        c.mmu.flush_all();
    }
    c.update_mode();
    Ok(())
}

fn write_cr4(x: &mut Exec<'_>, v: u64) -> R {
    let c = &mut *x.cpu;
    if v & !CR4_VALID != 0 {
        return Err(gp0());
    }
    if c.long_mode() && v & CR4_PAE == 0 {
        return Err(gp0());
    }
    let old = c.cr4;
    c.cr4 = v;
    if (old ^ v) & (CR4_PGE | CR4_PAE | CR4_PSE) != 0 {
        c.mmu.flush_all();
    }
    Ok(())
}

fn write_cr3(x: &mut Exec<'_>, v: u64) -> R {
    let c = &mut *x.cpu;
    if c.long_mode() && v >> c.maxphy != 0 {
        return Err(gp0());
    }
    c.cr3 = v;
    c.mmu.flush_nonglobal();
    Ok(())
}

/// Write control register `n` (also used by `Vcpu::set_sregs` paths through the state).
pub fn write_cr(x: &mut Exec<'_>, n: u8, v: u64) -> R {
    match n {
        0 => write_cr0(x, v),
        2 => {
            x.cpu.cr2 = v;
            Ok(())
        }
        3 => write_cr3(x, v),
        4 => write_cr4(x, v),
        8 => {
            if v >> 4 != 0 {
                return Err(gp0());
            }
            x.cpu
                .vm
                .irqchip
                .lapic_write(x.cpu.id, 0x80, (v as u32 & 0xf) << 4);
            x.cpu.lapic_changed();
            Ok(())
        }
        _ => Err(ud()),
    }
}

/// MOV CRn, reg (`ext` = n, `r2` = the register).
pub fn mov_to_cr(x: &mut Exec<'_>, op: &Op) -> R {
    // Serializing, except MOV to CR8 (SDM Vol. 3A §8.3).
    if op.ext != 8 {
        x.cpu.serialize();
    }
    cpl0(x)?;
    let v = x.cpu.reg(op.r2, op.size);
    write_cr(x, op.ext, v)?;
    Err(Exc::Stop)
}

/// MOV reg, CRn.
pub fn mov_from_cr(x: &mut Exec<'_>, op: &Op) -> R {
    cpl0(x)?;
    let v = match op.ext {
        0 => x.cpu.cr0,
        2 => x.cpu.cr2,
        3 => x.cpu.cr3,
        4 => x.cpu.cr4,
        8 => (x.cpu.vm.irqchip.lapic_read(x.cpu.id, 0x80) >> 4) as u64 & 0xf,
        _ => return Err(ud()),
    };
    x.cpu.set_reg(op.r2, op.size, v);
    Ok(())
}

fn dr_index(x: &Exec<'_>, n: u8) -> R<usize> {
    match n {
        0..=3 | 6 | 7 => Ok(n as usize),
        4 | 5 if x.cpu.cr4 & CR4_DE == 0 => Ok(n as usize + 2),
        _ => Err(ud()),
    }
}

/// MOV DRn, reg (breakpoints are stored, not armed).
pub fn mov_to_dr(x: &mut Exec<'_>, op: &Op) -> R {
    x.cpu.serialize();
    cpl0(x)?;
    let n = dr_index(x, op.ext)?;
    let v = x.cpu.reg(op.r2, op.size);
    if (n == 6 || n == 7) && v >> 32 != 0 {
        return Err(gp0());
    }
    x.cpu.dr[n] = match n {
        6 => (v | 0xffff_0ff0) & 0xffff_ffff,
        7 => (v | 0x400) & 0xffff_ffff,
        _ => v,
    };
    Ok(())
}

pub fn mov_from_dr(x: &mut Exec<'_>, op: &Op) -> R {
    cpl0(x)?;
    let n = dr_index(x, op.ext)?;
    let v = x.cpu.dr[n];
    x.cpu.set_reg(op.r2, op.size, v);
    Ok(())
}

/// LGDT (ext 0) / LIDT (ext 1): limit, then a 64-bit (64-bit mode), 32-bit or 24-bit base.
pub fn load_dt(x: &mut Exec<'_>, op: &Op) -> R {
    x.cpu.serialize();
    cpl0(x)?;
    let lin = x.lin(op);
    let limit = x.read(lin, 2)? as u16;
    let base_lin = lin.wrapping_add(2) & x.cpu.lin_mask;
    let base = if x.cpu.bitness == 64 {
        x.read(base_lin, 8)?
    } else {
        let b = x.read(base_lin, 4)?;
        if op.size == 2 {
            b & 0xff_ffff
        } else {
            b
        }
    };
    let t = crate::state::DescriptorTable { base, limit };
    if op.ext == 0 {
        x.cpu.gdt = t;
    } else {
        x.cpu.idt = t;
    }
    Ok(())
}

/// SGDT (ext 0) / SIDT (ext 1).
pub fn store_dt(x: &mut Exec<'_>, op: &Op) -> R {
    let t = if op.ext == 0 { x.cpu.gdt } else { x.cpu.idt };
    let lin = x.lin(op);
    let mut b = [0u8; 10];
    b[..2].copy_from_slice(&t.limit.to_le_bytes());
    b[2..].copy_from_slice(&t.base.to_le_bytes());
    let n = if x.cpu.bitness == 64 { 10 } else { 6 };
    let user = x.cpu.tlb_user != 0;
    x.write_bytes(lin, &b[..n], user)
}

/// LLDT (ext 0) / LTR (ext 1).
pub fn load_system_seg(x: &mut Exec<'_>, op: &Op) -> R {
    x.cpu.serialize();
    need_protected(x)?;
    cpl0(x)?;
    let sel = x.rm_read(op, 2)? as u16;
    if op.ext == 0 {
        x.lldt(sel)
    } else {
        x.ltr(sel)
    }
}

/// SLDT (ext 0) / STR (ext 1).
pub fn store_system_seg(x: &mut Exec<'_>, op: &Op) -> R {
    need_protected(x)?;
    let sel = if op.ext == 0 {
        x.cpu.ldt.selector
    } else {
        x.cpu.tr.selector
    } as u64;
    let size = if op.is_mem() { 2 } else { op.size };
    x.rm_write(op, size, sel)
}

/// The descriptor of `sel` if LAR/LSL/VERR/VERW may look at it at the current privilege.
fn visible_desc(x: &mut Exec<'_>, sel: u16) -> R<Option<u64>> {
    if sel & 0xfffc == 0 {
        return Ok(None);
    }
    let raw = match x.read_desc(sel, false) {
        Ok(r) => r,
        Err(Exc::Fault { vector: GP, .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let d = parse_desc(raw);
    let conforming_code = d.s && d.type_ & SEG_TYPE_CODE != 0 && d.type_ & SEG_TYPE_CONFORMING != 0;
    let rpl = (sel & 3) as u8;
    if !conforming_code && (d.dpl < x.cpu.cpl || d.dpl < rpl) {
        return Ok(None);
    }
    Ok(Some(raw))
}

/// LAR (ext 0) / LSL (ext 1) reg, r/m16.
pub fn lar_lsl(x: &mut Exec<'_>, op: &Op) -> R {
    need_protected(x)?;
    let sel = x.rm_read(op, 2)? as u16;
    let found = visible_desc(x, sel)?.filter(|&raw| {
        let d = parse_desc(raw);
        if d.s {
            return true;
        }
        let lm = x.cpu.long_mode();
        match (op.ext, d.type_) {
            (0, 2 | 9 | 0xb | 0xc) => true,
            (0, 1 | 3 | 4 | 5) => !lm,
            (1, 2 | 9 | 0xb) => true,
            (1, 1 | 3) => !lm,
            _ => false,
        }
    });
    match found {
        Some(raw) => {
            let v = if op.ext == 0 {
                (raw >> 32) & 0x00f0_ff00
            } else {
                parse_desc(raw).limit as u64
            };
            x.cpu.set_reg(op.r1, op.size, v);
            x.cpu.set_arith(ZF, ZF);
        }
        None => x.cpu.set_arith(ZF, 0),
    }
    Ok(())
}

/// VERR (ext 0) / VERW (ext 1).
pub fn verr_verw(x: &mut Exec<'_>, op: &Op) -> R {
    need_protected(x)?;
    let sel = x.rm_read(op, 2)? as u16;
    let ok = visible_desc(x, sel)?.is_some_and(|raw| {
        let d = parse_desc(raw);
        let code = d.type_ & SEG_TYPE_CODE != 0;
        d.s && if op.ext == 0 {
            !code || d.type_ & SEG_TYPE_WRITE_READ != 0
        } else {
            !code && d.type_ & SEG_TYPE_WRITE_READ != 0
        }
    });
    x.cpu.set_arith(ZF, if ok { ZF } else { 0 });
    Ok(())
}

/// SWAPGS (SDM Vol. 2B): 64-bit mode, CPL 0.
pub fn swapgs(x: &mut Exec<'_>, _op: &Op) -> R {
    if x.cpu.bitness != 64 {
        return Err(ud());
    }
    cpl0(x)?;
    let c = &mut *x.cpu;
    std::mem::swap(&mut c.seg[GS].base, &mut c.msr.kernel_gs_base);
    Ok(())
}

/// SYSCALL (SDM Vol. 2B): flat CPL-0 segments from STAR, RIP from LSTAR, RFLAGS masked by
/// FMASK.
pub fn syscall(x: &mut Exec<'_>, _op: &Op) -> R {
    if x.cpu.efer & EFER_SCE == 0 || x.cpu.bitness != 64 {
        return Err(ud());
    }
    let c = &mut *x.cpu;
    let sel = ((c.msr.star >> 32) & 0xfffc) as u16;
    c.gpr[RCX] = c.rip;
    let f = c.rflags();
    c.gpr[11] = f & !RF;
    c.seg[CS] = flat_code64(sel, 0);
    c.seg[SS] = flat_data(sel.wrapping_add(8), 0);
    c.cpl = 0;
    c.set_rflags(f & !(c.msr.fmask | RF));
    c.rip = c.msr.lstar;
    c.update_mode();
    Err(Exc::Stop)
}

/// SYSRET (SDM Vol. 2B): to CPL 3, 64-bit (REX.W, `size == 8`) or compatibility mode.
pub fn sysret(x: &mut Exec<'_>, op: &Op) -> R {
    if x.cpu.efer & EFER_SCE == 0 || !x.cpu.long_mode() || x.cpu.bitness != 64 {
        return Err(ud());
    }
    cpl0(x)?;
    let c = &mut *x.cpu;
    let base = ((c.msr.star >> 48) & 0xffff) as u16;
    if op.size == 8 {
        if !Cpu::canonical(c.gpr[RCX]) {
            return Err(gp0());
        }
        c.rip = c.gpr[RCX];
        c.seg[CS] = flat_code64(base.wrapping_add(16) | 3, 3);
    } else {
        c.rip = c.gpr[RCX] & 0xffff_ffff;
        c.seg[CS] = flat_code32(base | 3, 3);
    }
    c.seg[SS] = flat_data(base.wrapping_add(8) | 3, 3);
    c.cpl = 3;
    let f = (c.gpr[11] & 0x3c_7fd7) | 2;
    c.set_rflags(f);
    c.update_mode();
    Err(Exc::Stop)
}

/// INT imm8 (`imm`), INT3 (ext 3), INTO (ext 4), INT1 (ext 1).
pub fn int_n(x: &mut Exec<'_>, op: &Op) -> R {
    match op.ext {
        1 => Err(Exc::SoftInt {
            vector: DB,
            kind: SoftKind::Icebp,
        }),
        3 => Err(Exc::SoftInt {
            vector: BP,
            kind: SoftKind::Int,
        }),
        4 => {
            if x.cpu.cond(0) {
                Err(Exc::SoftInt {
                    vector: OF_VEC,
                    kind: SoftKind::Int,
                })
            } else {
                Ok(())
            }
        }
        _ => Err(Exc::SoftInt {
            vector: op.imm as u8,
            kind: SoftKind::Int,
        }),
    }
}

/// JMP ptr16:16/32 (`imm` = selector << 32 | offset).
pub fn jmp_far_ptr(x: &mut Exec<'_>, op: &Op) -> R {
    x.far_jump((op.imm >> 32) as u16, op.imm & 0xffff_ffff, op.size)?;
    Err(Exc::Stop)
}

/// Read an m16:16/32/64 far pointer: offset (operand size) then selector.
fn far_ptr(x: &mut Exec<'_>, op: &Op) -> R<(u16, u64)> {
    let lin = x.lin(op);
    let off = x.read(lin, op.size)?;
    let sel = x.read(lin.wrapping_add(op.size as u64) & x.cpu.lin_mask, 2)? as u16;
    Ok((sel, off))
}

pub fn jmp_far_mem(x: &mut Exec<'_>, op: &Op) -> R {
    let (sel, off) = far_ptr(x, op)?;
    x.far_jump(sel, off, op.size)?;
    Err(Exc::Stop)
}

pub fn call_far_ptr(x: &mut Exec<'_>, op: &Op) -> R {
    x.far_call((op.imm >> 32) as u16, op.imm & 0xffff_ffff, op.size)?;
    Err(Exc::Stop)
}

pub fn call_far_mem(x: &mut Exec<'_>, op: &Op) -> R {
    let (sel, off) = far_ptr(x, op)?;
    x.far_call(sel, off, op.size)?;
    Err(Exc::Stop)
}

/// RETF [imm16].
pub fn retf(x: &mut Exec<'_>, op: &Op) -> R {
    x.far_return(op.size, op.imm)?;
    Err(Exc::Stop)
}

/// MOV Sreg, r/m16 (`ext` = segment register). MOV SS blocks interrupts for one instruction.
pub fn mov_to_sreg(x: &mut Exec<'_>, op: &Op) -> R {
    let sreg = op.ext as usize;
    if sreg == CS || sreg > GS {
        return Err(ud());
    }
    let sel = x.rm_read(op, 2)? as u16;
    x.load_seg(sreg, sel)?;
    if sreg == SS {
        x.cpu.shadow = true;
        return Err(Exc::Stop);
    }
    Ok(())
}

/// MOV r/m, Sreg: a register destination is zero-extended, memory gets 16 bits.
pub fn mov_from_sreg(x: &mut Exec<'_>, op: &Op) -> R {
    let sel = x.cpu.seg[op.ext as usize % 6].selector as u64;
    let size = if op.is_mem() { 2 } else { op.size };
    x.rm_write(op, size, sel)
}

pub fn push_sreg(x: &mut Exec<'_>, op: &Op) -> R {
    let sel = x.cpu.seg[op.ext as usize % 6].selector as u64;
    x.push(sel, op.size)
}

pub fn pop_sreg(x: &mut Exec<'_>, op: &Op) -> R {
    let sreg = op.ext as usize;
    if sreg == CS || sreg > GS {
        return Err(ud());
    }
    let sel = x.peek(0, op.size)? as u16;
    x.load_seg(sreg, sel)?;
    let m = x.cpu.sp_mask;
    x.cpu.add_masked(RSP, op.size as u64, m);
    if sreg == SS {
        x.cpu.shadow = true;
        return Err(Exc::Stop);
    }
    Ok(())
}

/// LDS/LES/LSS/LFS/LGS reg, m16:16/32/64 (`ext` = segment register).
pub fn load_far_ptr(x: &mut Exec<'_>, op: &Op) -> R {
    let (sel, off) = far_ptr(x, op)?;
    x.load_seg(op.ext as usize, sel)?;
    x.cpu.set_reg(op.r1, op.size, off);
    if op.ext as usize == SS {
        x.cpu.shadow = true;
        return Err(Exc::Stop);
    }
    Ok(())
}

/// IN (ext bit 0 clear) / OUT (set); the port is DX when `F_CL` is set, `imm` otherwise.
pub fn in_out(x: &mut Exec<'_>, op: &Op) -> R {
    x.io_allowed()?;
    let port = if op.flags & F_CL != 0 {
        x.cpu.gpr[RDX] as u16
    } else {
        op.imm as u16
    };
    let s = op.size as usize & 7;
    if op.ext & 1 == 0 {
        let mut b = [0u8; 8];
        x.io.pio_read(port, &mut b[..s]);
        x.cpu.vm.io_exit();
        x.cpu.set_reg(RAX as u8, op.size, u64::from_le_bytes(b));
    } else {
        let v = x.cpu.gpr[RAX].to_le_bytes();
        x.io.pio_write(port, &v[..s]);
        x.cpu.vm.io_exit();
    }
    Ok(())
}

/// CLFLUSH/CLFLUSHOPT/CLWB: caches are not modelled, but the address must translate.
pub fn clflush(x: &mut Exec<'_>, op: &Op) -> R {
    let lin = x.lin(op);
    let user = x.cpu.tlb_user != 0;
    x.cpu.translate(lin, Access::Read, user).map(|_| ())
}
