//! Exception and interrupt delivery (Intel SDM Vol. 3A chapter 6) and IRET.
//!
//! Delivery goes through the real-mode IVT, the protected-mode IDT (interrupt/trap gates, with
//! a stack switch through the 32-bit TSS) or the 64-bit IDT (with IST and TSS.RSPn). A fault
//! while delivering is combined with the event being delivered per SDM Table 6-5: two
//! contributory exceptions, or a page fault followed by a contributory exception or a page
//! fault, give #DF; a fault while delivering #DF is a triple fault (shutdown).

use super::cpu::*;
use super::exec::{Exec, Op};
use super::flags::{self, AC, ARITH, DF, ID, IF, IOPL, NT, RF, TF, VIF, VIP, VM};
use super::log_once;
use super::seg::{null_ss, parse_desc};

/// What is being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A processor exception (fault, trap or abort).
    Exception,
    /// INT n / INT3 / INTO: gate DPL checked, EXT = 0.
    Soft,
    /// INT1 (ICEBP).
    Icebp,
    /// A maskable external interrupt.
    External,
    /// A non-maskable interrupt.
    Nmi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub vector: u8,
    pub code: Option<u32>,
    pub kind: Kind,
}

impl Event {
    pub fn exception(vector: u8, code: Option<u32>) -> Event {
        Event {
            vector,
            code,
            kind: Kind::Exception,
        }
    }

    pub fn soft(vector: u8, kind: SoftKind) -> Event {
        Event {
            vector,
            code: None,
            kind: match kind {
                SoftKind::Int => Kind::Soft,
                SoftKind::Icebp => Kind::Icebp,
            },
        }
    }

    pub fn external(vector: u8) -> Event {
        Event {
            vector,
            code: None,
            kind: Kind::External,
        }
    }

    pub fn nmi() -> Event {
        Event {
            vector: NMI,
            code: None,
            kind: Kind::Nmi,
        }
    }
}

#[derive(PartialEq, Eq)]
enum Class {
    Benign,
    Contributory,
    PageFault,
}

fn class(ev: &Event) -> Class {
    if ev.kind != Kind::Exception {
        return Class::Benign;
    }
    match ev.vector {
        DE | TS | NP | SS_VEC | GP => Class::Contributory,
        PF_VEC => Class::PageFault,
        _ => Class::Benign,
    }
}

/// Deliver `ev`. RIP must already be the return address (the faulting instruction for a
/// fault, the next instruction for a trap or software interrupt). `Err` means triple fault.
pub fn deliver(x: &mut Exec<'_>, ev: Event) -> Result<(), ()> {
    deliver_from(x, ev, None)
}

/// Deliver `ev`; when it is a software interrupt whose delivery faults, the fault is reported
/// at `insn_rip` (the INT instruction), as it is a fault of that instruction.
pub fn deliver_from(x: &mut Exec<'_>, ev: Event, insn_rip: Option<u64>) -> Result<(), ()> {
    let mut cur = ev;
    for _ in 0..3 {
        match deliver_once(x, cur) {
            Ok(()) => {
                if cur.kind == Kind::Nmi {
                    x.cpu.nmi_blocked = true;
                }
                return Ok(());
            }
            Err(Exc::Fault { vector, code }) => {
                if let (Kind::Soft | Kind::Icebp, Some(rip)) = (cur.kind, insn_rip) {
                    x.cpu.rip = rip;
                }
                let next = Event::exception(vector, code.map(u32::from));
                if cur.kind == Kind::Exception && cur.vector == DF_VEC {
                    break;
                }
                let c1 = class(&cur);
                let c2 = class(&next);
                cur = if (c1 == Class::Contributory && c2 == Class::Contributory)
                    || (c1 == Class::PageFault && c2 != Class::Benign)
                {
                    Event::exception(DF_VEC, Some(0))
                } else {
                    next
                };
            }
            Err(_) => break,
        }
    }
    tracing::warn!(
        "vCPU {}: triple fault delivering vector {} at RIP {:#x}",
        x.cpu.id,
        ev.vector,
        x.cpu.rip
    );
    Err(())
}

fn has_error_code(vector: u8) -> bool {
    matches!(vector, DF_VEC | TS | NP | SS_VEC | GP | PF_VEC | 17 | 21)
}

fn deliver_once(x: &mut Exec<'_>, ev: Event) -> R {
    let ext = !matches!(ev.kind, Kind::Soft);
    let code = if ev.kind == Kind::Exception && has_error_code(ev.vector) {
        Some(ev.code.unwrap_or(0))
    } else {
        None
    };
    if !x.cpu.protected() {
        real_mode(x, ev)
    } else if x.cpu.long_mode() {
        long_mode(x, ev, code, ext)
    } else {
        protected_mode(x, ev, code, ext)
    }
}

/// Real-address mode: the IVT (SDM Vol. 3A §20.1.4).
fn real_mode(x: &mut Exec<'_>, ev: Event) -> R {
    let off = ev.vector as u64 * 4;
    if off + 3 > x.cpu.idt.limit as u64 {
        return Err(gp0());
    }
    let ent = x.read_sys(x.cpu.idt.base.wrapping_add(off) & 0xffff_ffff, 4)?;
    let saved = x.cpu.gpr[RSP];
    let fl = x.cpu.rflags();
    let cs = x.cpu.seg[CS].selector as u64;
    let ip = x.cpu.rip;
    let r = x
        .push(fl & 0xffff, 2)
        .and_then(|_| x.push(cs, 2))
        .and_then(|_| x.push(ip & 0xffff, 2));
    if let Err(e) = r {
        x.cpu.gpr[RSP] = saved;
        return Err(e);
    }
    let sel = (ent >> 16) as u16;
    x.cpu.seg[CS].selector = sel;
    x.cpu.seg[CS].base = (sel as u64) << 4;
    x.cpu.rip = ent & 0xffff;
    x.cpu.flags = x.cpu.rflags() & !(IF | TF | AC | RF);
    x.cpu.lazy.op = flags::EAGER;
    Ok(())
}

/// The target code segment of a gate.
fn gate_cs(x: &mut Exec<'_>, sel: u16, ext: bool, want_64: bool) -> R<SegCache> {
    let e = |s: u16| fault(GP, (s & 0xfffc) as u32 | ext as u32);
    if sel & 0xfffc == 0 {
        return Err(fault(GP, ext as u32));
    }
    let raw = x.read_desc(sel, ext)?;
    let d = parse_desc(raw);
    if !d.s || d.type_ & SEG_TYPE_CODE == 0 || d.dpl > x.cpu.cpl {
        return Err(e(sel));
    }
    if want_64 && (!d.l || d.db) {
        return Err(e(sel));
    }
    if !d.present {
        return Err(fault(NP, (sel & 0xfffc) as u32 | ext as u32));
    }
    Ok(SegCache {
        selector: sel,
        type_: d.type_ | SEG_TYPE_ACCESSED,
        ..d
    })
}

/// Read the gate for `ev`: (low, high) quadwords; checks the IDT limit, type, DPL, present.
fn read_gate(x: &mut Exec<'_>, ev: Event, ext: bool, size: u64) -> R<(u64, u64)> {
    let v = ev.vector as u64;
    let idt_err = (v as u32) * 8 + 2 + ext as u32;
    if v * size + size - 1 > x.cpu.idt.limit as u64 {
        return Err(fault(GP, idt_err));
    }
    let base = x.cpu.idt.base.wrapping_add(v * size) & x.cpu.lin_mask_sys();
    let lo = x.read_sys(base, 8)?;
    let hi = if size == 16 {
        x.read_sys(base.wrapping_add(8), 8)?
    } else {
        0
    };
    let typ = (lo >> 40) & 0x1f;
    let ok = if size == 16 {
        typ == 0xe || typ == 0xf
    } else {
        matches!(typ, 0x6 | 0x7 | 0xe | 0xf)
    };
    if !ok {
        if size == 8 && typ == 0x5 {
            log_once(
                super::LogOnce::Gate,
                format_args!("vCPU {}: task gate in the IDT (unsupported)", x.cpu.id),
            );
        }
        return Err(fault(GP, idt_err));
    }
    let dpl = ((lo >> 45) & 3) as u8;
    if ev.kind == Kind::Soft && dpl < x.cpu.cpl {
        return Err(fault(GP, (v as u32) * 8 + 2));
    }
    if lo & (1 << 47) == 0 {
        return Err(fault(NP, idt_err));
    }
    Ok((lo, hi))
}

/// Read `size` bytes at `off` in the TSS; #TS if beyond its limit.
fn tss_read(x: &mut Exec<'_>, off: u64, size: u8, ext: bool) -> R<u64> {
    if off + size as u64 - 1 > x.cpu.tr.limit as u64 || x.cpu.tr.unusable {
        return Err(fault(TS, (x.cpu.tr.selector & 0xfffc) as u32 | ext as u32));
    }
    x.read_sys(x.cpu.tr.base.wrapping_add(off), size)
}

/// IA-32e mode: 64-bit IDT gates (SDM Vol. 3A §6.14).
fn long_mode(x: &mut Exec<'_>, ev: Event, code: Option<u32>, ext: bool) -> R {
    let (lo, hi) = read_gate(x, ev, ext, 16)?;
    let sel = (lo >> 16) as u16;
    let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
    let ist = (lo >> 32) & 7;
    let cs = gate_cs(x, sel, ext, true)?;
    let cpl = x.cpu.cpl;
    let new_cpl = if cs.type_ & SEG_TYPE_CONFORMING != 0 {
        cpl
    } else {
        cs.dpl
    };
    let mut rsp = if ist != 0 {
        tss_read(x, 0x24 + (ist - 1) * 8, 8, ext)?
    } else if new_cpl < cpl {
        tss_read(x, 4 + new_cpl as u64 * 8, 8, ext)?
    } else {
        x.cpu.gpr[RSP]
    };
    if !Cpu::canonical(rsp) {
        return Err(fault(SS_VEC, ext as u32));
    }
    if !Cpu::canonical(target) {
        return Err(fault(GP, ext as u32));
    }
    rsp &= !0xf;
    let mut frame = [0u64; 6];
    let mut n = 0;
    if let Some(c) = code {
        frame[n] = c as u64;
        n += 1;
    }
    frame[n] = x.cpu.rip;
    frame[n + 1] = x.cpu.seg[CS].selector as u64;
    frame[n + 2] = x.cpu.rflags();
    frame[n + 3] = x.cpu.gpr[RSP];
    frame[n + 4] = x.cpu.seg[SS].selector as u64;
    n += 5;
    let mut bytes = [0u8; 48];
    for (i, v) in frame[..n].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let new_rsp = rsp.wrapping_sub(n as u64 * 8);
    x.write_bytes(new_rsp, &bytes[..n * 8], new_cpl == 3)?;

    if new_cpl < cpl {
        x.cpu.seg[SS] = null_ss(new_cpl);
    }
    x.cpu.seg[CS] = SegCache {
        selector: (sel & !3) | new_cpl as u16,
        ..cs
    };
    x.cpu.gpr[RSP] = new_rsp;
    x.cpu.cpl = new_cpl;
    let mut f = x.cpu.rflags() & !(TF | NT | RF | VM);
    if (lo >> 40) & 0x1f == 0xe {
        f &= !IF;
    }
    x.cpu.flags = f;
    x.cpu.lazy.op = flags::EAGER;
    x.cpu.rip = target;
    x.cpu.update_mode();
    Ok(())
}

/// Protected mode: 32/16-bit interrupt and trap gates (SDM Vol. 3A §6.12.1).
fn protected_mode(x: &mut Exec<'_>, ev: Event, code: Option<u32>, ext: bool) -> R {
    let (lo, _) = read_gate(x, ev, ext, 8)?;
    let typ = (lo >> 40) & 0x1f;
    let gsize: u8 = if typ & 8 != 0 { 4 } else { 2 };
    let sel = (lo >> 16) as u16;
    let mut target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
    if gsize == 2 {
        target &= 0xffff;
    }
    let cs = gate_cs(x, sel, ext, false)?;
    let cpl = x.cpu.cpl;
    let new_cpl = if cs.type_ & SEG_TYPE_CONFORMING != 0 {
        cpl
    } else {
        cs.dpl
    };
    let saved_rsp = x.cpu.gpr[RSP];
    let saved_ss = x.cpu.seg[SS];
    let old_ss = saved_ss.selector as u64;
    let old_sp = x.cpu.gpr[RSP];
    let fl = x.cpu.rflags();
    let old_cs = x.cpu.seg[CS].selector as u64;
    let ip = x.cpu.rip;
    let result = (|| -> R {
        if new_cpl < cpl {
            // Stack switch through the 32-bit TSS (SDM Vol. 3A §7.2.1).
            let esp = tss_read(x, 4 + new_cpl as u64 * 8, 4, ext)?;
            let ss_sel = tss_read(x, 8 + new_cpl as u64 * 8, 2, ext)? as u16;
            let ss = x
                .return_ss(ss_sel, new_cpl, false)
                .map_err(|_| fault(TS, (ss_sel & 0xfffc) as u32 | ext as u32))?;
            x.cpu.seg[SS] = ss;
            x.cpu.cpl = new_cpl;
            x.cpu.update_mode();
            x.cpu.gpr[RSP] = esp;
            x.push(old_ss, gsize)?;
            x.push(old_sp, gsize)?;
        }
        x.push(fl, gsize)?;
        x.push(old_cs, gsize)?;
        x.push(ip, gsize)?;
        if let Some(c) = code {
            x.push(c as u64, gsize)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        x.cpu.gpr[RSP] = saved_rsp;
        x.cpu.seg[SS] = saved_ss;
        x.cpu.cpl = cpl;
        x.cpu.update_mode();
        return Err(e);
    }
    x.cpu.seg[CS] = SegCache {
        selector: (sel & !3) | new_cpl as u16,
        ..cs
    };
    x.cpu.cpl = new_cpl;
    let mut f = fl & !(TF | NT | RF | VM);
    if typ & 7 == 6 {
        f &= !IF;
    }
    x.cpu.flags = f;
    x.cpu.lazy.op = flags::EAGER;
    x.cpu.rip = target;
    x.cpu.update_mode();
    Ok(())
}

/// The RFLAGS an IRET (or SYSRET-like return) may change at privilege `cpl` (SDM Vol. 2A
/// "IRET" operation).
fn iret_flags(x: &Exec<'_>, popped: u64, size: u8) -> u64 {
    let cpl = x.cpu.cpl;
    let mut m = ARITH | TF | DF | NT | RF | AC | ID;
    if !x.cpu.protected() || cpl == 0 {
        m |= IOPL | VIF | VIP;
    }
    if !x.cpu.protected() || cpl <= x.cpu.iopl() {
        m |= IF;
    }
    if size == 2 {
        m &= 0xffff;
    }
    let old = x.cpu.rflags();
    (old & !m) | (popped & m)
}

/// IRET / IRETD / IRETQ.
pub fn iret(x: &mut Exec<'_>, op: &Op) -> R {
    x.cpu.serialize();
    let s = op.size;
    let sz = s as u64;
    if !x.cpu.protected() {
        let ip = x.peek(0, s)?;
        let sel = x.peek(sz, s)? as u16;
        let fl = x.peek(2 * sz, s)?;
        let m = x.cpu.sp_mask;
        x.cpu.add_masked(RSP, 3 * sz, m);
        x.cpu.seg[CS].selector = sel;
        x.cpu.seg[CS].base = (sel as u64) << 4;
        x.cpu.rip = ip & if s == 2 { 0xffff } else { 0xffff_ffff };
        let f = iret_flags(x, fl, s);
        x.cpu.set_rflags(f);
        x.cpu.nmi_blocked = false;
        x.cpu.poll |= x.cpu.nmi_pending;
        return Err(Exc::Stop);
    }
    let lm = x.cpu.long_mode();
    if !lm && x.cpu.flags & NT != 0 {
        log_once(
            super::LogOnce::Gate,
            format_args!(
                "vCPU {}: IRET with NT=1 (task return, unsupported)",
                x.cpu.id
            ),
        );
        return Err(gp0());
    }
    let new_ip = x.peek(0, s)?;
    let sel = x.peek(sz, s)? as u16;
    let fl = x.peek(2 * sz, s)?;
    if !lm && fl & VM != 0 && x.cpu.cpl == 0 {
        log_once(
            super::LogOnce::Gate,
            format_args!("vCPU {}: IRET to virtual-8086 mode (unsupported)", x.cpu.id),
        );
        return Err(gp0());
    }
    let cs = x.return_cs(sel)?;
    let new_cpl = (sel & 3) as u8;
    let cs64 = lm && cs.l;
    // 64-bit mode always pops SS:RSP; otherwise only on a privilege change.
    let stack = if x.cpu.bitness == 64 || new_cpl > x.cpu.cpl {
        let sp = x.peek(3 * sz, s)?;
        let ss_sel = x.peek(4 * sz, s)? as u16;
        Some((sp, x.return_ss(ss_sel, new_cpl, cs64)?))
    } else {
        None
    };
    if cs64 && !Cpu::canonical(new_ip) {
        return Err(gp0());
    }
    let f = iret_flags(x, fl, s) & !VM;
    let outer = new_cpl > x.cpu.cpl;
    match stack {
        Some((sp, ss)) => {
            x.cpu.seg[SS] = ss;
            x.cpu.gpr[RSP] = if s == 2 {
                (x.cpu.gpr[RSP] & !0xffff) | (sp & 0xffff)
            } else if s == 4 && !cs64 {
                sp & 0xffff_ffff
            } else {
                sp
            };
        }
        None => {
            let m = x.cpu.sp_mask;
            x.cpu.add_masked(RSP, 3 * sz, m);
        }
    }
    x.cpu.cpl = new_cpl;
    x.cpu.seg[CS] = cs;
    x.cpu.rip = if cs64 {
        new_ip
    } else if s == 2 {
        new_ip & 0xffff
    } else {
        new_ip & 0xffff_ffff
    };
    x.cpu.set_rflags(f);
    if outer {
        x.null_inaccessible_segs();
    }
    x.cpu.nmi_blocked = false;
    x.cpu.poll |= x.cpu.nmi_pending;
    x.cpu.update_mode();
    Err(Exc::Stop)
}
