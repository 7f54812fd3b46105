//! Segment descriptors (Intel SDM Vol. 3A §3.4–3.5, §5): loading segment registers with their
//! protection checks, far JMP/CALL/RET, LTR/LLDT. Call gates and task switches are not
//! implemented (#GP). In real mode a segment load only sets the selector and base.

use super::cpu::*;
use super::exec::Exec;
use super::log_once;

/// Descriptor bits (SDM Vol. 3A Figure 3-8).
const DESC_S: u64 = 1 << 44;
const DESC_P: u64 = 1 << 47;
const DESC_ACCESSED: u64 = 1 << 40;

/// Decode an 8-byte segment descriptor into a segment cache (selector not set).
pub fn parse_desc(raw: u64) -> SegCache {
    let limit = (raw & 0xffff) as u32 | ((raw >> 32) as u32 & 0xf_0000);
    let g = raw & (1 << 55) != 0;
    SegCache {
        base: ((raw >> 16) & 0xff_ffff) | (((raw >> 56) & 0xff) << 24),
        limit: if g { (limit << 12) | 0xfff } else { limit },
        selector: 0,
        type_: ((raw >> 40) & 0xf) as u8,
        present: raw & DESC_P != 0,
        dpl: ((raw >> 45) & 3) as u8,
        db: raw & (1 << 54) != 0,
        s: raw & DESC_S != 0,
        l: raw & (1 << 53) != 0,
        g,
        avl: raw & (1 << 52) != 0,
        unusable: false,
    }
}

/// The flat 64-bit segments SYSCALL/SYSRET load (SDM Vol. 2B "SYSCALL", "SYSRET").
pub fn flat_code64(selector: u16, dpl: u8) -> SegCache {
    SegCache {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb,
        present: true,
        dpl,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    }
}

pub fn flat_code32(selector: u16, dpl: u8) -> SegCache {
    SegCache {
        db: true,
        l: false,
        ..flat_code64(selector, dpl)
    }
}

pub fn flat_data(selector: u16, dpl: u8) -> SegCache {
    SegCache {
        type_: 0x3,
        db: true,
        l: false,
        ..flat_code64(selector, dpl)
    }
}

/// The null selector `rpl` as loaded into SS in 64-bit mode.
pub fn null_ss(rpl: u8) -> SegCache {
    SegCache {
        selector: rpl as u16,
        type_: 0x3,
        dpl: rpl,
        db: true,
        s: true,
        present: true,
        unusable: true,
        ..SegCache::default()
    }
}

#[inline]
fn sel_err(sel: u16, ext: bool) -> u32 {
    (sel & 0xfffc) as u32 | ext as u32
}

impl Exec<'_> {
    /// Linear address of the descriptor for `sel`; #GP(selector) if beyond the table limit.
    fn desc_addr(&mut self, sel: u16, size: u64, ext: bool) -> R<u64> {
        let (base, limit) = if sel & 4 != 0 {
            if self.cpu.ldt.unusable || self.cpu.ldt.selector & 0xfffc == 0 {
                return Err(fault(GP, sel_err(sel, ext)));
            }
            (self.cpu.ldt.base, self.cpu.ldt.limit as u64)
        } else {
            (self.cpu.gdt.base, self.cpu.gdt.limit as u64)
        };
        let off = (sel & 0xfff8) as u64;
        if off + size - 1 > limit {
            return Err(fault(GP, sel_err(sel, ext)));
        }
        Ok(base.wrapping_add(off) & self.cpu.lin_mask_sys())
    }

    /// Read the 8-byte descriptor of `sel`.
    pub fn read_desc(&mut self, sel: u16, ext: bool) -> R<u64> {
        let a = self.desc_addr(sel, 8, ext)?;
        self.read_sys(a, 8)
    }

    /// Read a 16-byte system descriptor (long mode TSS/LDT).
    fn read_desc16(&mut self, sel: u16) -> R<(u64, u64)> {
        let a = self.desc_addr(sel, 16, false)?;
        let lo = self.read_sys(a, 8)?;
        let hi = self.read_sys(a.wrapping_add(8), 8)?;
        Ok((lo, hi))
    }

    /// Set the accessed bit of a descriptor (SDM Vol. 3A §3.4.5.1).
    fn set_accessed(&mut self, sel: u16, raw: u64) -> R {
        if raw & DESC_ACCESSED == 0 {
            let a = self.desc_addr(sel, 8, false)?;
            self.write_sys(a.wrapping_add(5), 1, (raw >> 40) | 1)?;
        }
        Ok(())
    }

    /// MOV/POP/LxS to a data segment register or SS (SDM Vol. 2B "MOV", §5.10).
    pub fn load_seg(&mut self, sreg: usize, sel: u16) -> R {
        if !self.cpu.protected() {
            let s = &mut self.cpu.seg[sreg % 6];
            s.selector = sel;
            s.base = (sel as u64) << 4;
            s.present = true;
            s.unusable = false;
            if sreg == SS {
                self.cpu.update_mode();
            }
            return Ok(());
        }
        let cpl = self.cpu.cpl;
        if sel & 0xfffc == 0 {
            if sreg == SS && !(self.cpu.bitness == 64 && cpl != 3 && (sel & 3) as u8 == cpl) {
                return Err(gp0());
            }
            self.cpu.seg[sreg % 6] = if sreg == SS {
                null_ss(cpl)
            } else {
                SegCache {
                    selector: sel,
                    unusable: true,
                    ..SegCache::default()
                }
            };
            return Ok(());
        }
        let raw = self.read_desc(sel, false)?;
        let d = parse_desc(raw);
        let rpl = (sel & 3) as u8;
        let code = d.type_ & SEG_TYPE_CODE != 0;
        if !d.s {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if sreg == SS {
            if rpl != cpl || d.dpl != cpl || code || d.type_ & SEG_TYPE_WRITE_READ == 0 {
                return Err(fault(GP, sel_err(sel, false)));
            }
            if !d.present {
                return Err(fault(SS_VEC, sel_err(sel, false)));
            }
        } else {
            if code && d.type_ & SEG_TYPE_WRITE_READ == 0 {
                return Err(fault(GP, sel_err(sel, false)));
            }
            let conforming = code && d.type_ & SEG_TYPE_CONFORMING != 0;
            if !conforming && (rpl > d.dpl || cpl > d.dpl) {
                return Err(fault(GP, sel_err(sel, false)));
            }
            if !d.present {
                return Err(fault(NP, sel_err(sel, false)));
            }
        }
        self.set_accessed(sel, raw)?;
        self.cpu.seg[sreg % 6] = SegCache {
            selector: sel,
            type_: d.type_ | SEG_TYPE_ACCESSED,
            ..d
        };
        if sreg == SS {
            self.cpu.update_mode();
        }
        Ok(())
    }

    /// Check a code-segment selector as the target of a far JMP/CALL (same privilege only).
    fn far_target(&mut self, sel: u16) -> R<SegCache> {
        if sel & 0xfffc == 0 {
            return Err(gp0());
        }
        let raw = self.read_desc(sel, false)?;
        let d = parse_desc(raw);
        let cpl = self.cpu.cpl;
        if !d.s {
            log_once(
                super::LogOnce::Gate,
                format_args!(
                    "vCPU {}: far transfer through a gate/TSS {sel:#x} (unsupported)",
                    self.cpu.id
                ),
            );
            return Err(fault(GP, sel_err(sel, false)));
        }
        if d.type_ & SEG_TYPE_CODE == 0 {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if d.type_ & SEG_TYPE_CONFORMING != 0 {
            if d.dpl > cpl {
                return Err(fault(GP, sel_err(sel, false)));
            }
        } else if (sel & 3) as u8 > cpl || d.dpl != cpl {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if !d.present {
            return Err(fault(NP, sel_err(sel, false)));
        }
        if self.cpu.long_mode() && d.l && d.db {
            return Err(fault(GP, sel_err(sel, false)));
        }
        self.set_accessed(sel, raw)?;
        Ok(SegCache {
            selector: (sel & !3) | cpl as u16,
            type_: d.type_ | SEG_TYPE_ACCESSED,
            ..d
        })
    }

    /// Commit a new CS and RIP, checking the offset against the new mode.
    fn commit_cs(&mut self, cs: SegCache, offset: u64, size: u8) -> R {
        let lm64 = self.cpu.long_mode() && cs.l;
        if lm64 && !Cpu::canonical(offset) {
            return Err(gp0());
        }
        self.cpu.seg[CS] = cs;
        self.cpu.rip = if lm64 {
            offset
        } else if size == 2 {
            offset & 0xffff
        } else {
            offset & 0xffff_ffff
        };
        self.cpu.update_mode();
        Ok(())
    }

    /// JMP ptr16:16/32 and JMP m16:16/32/64.
    pub fn far_jump(&mut self, sel: u16, offset: u64, size: u8) -> R {
        if !self.cpu.protected() {
            let cs = SegCache {
                selector: sel,
                base: (sel as u64) << 4,
                ..self.cpu.seg[CS]
            };
            return self.commit_cs(cs, offset, size);
        }
        let cs = self.far_target(sel)?;
        self.commit_cs(cs, offset, size)
    }

    /// CALL ptr16:16/32 and CALL m16:16/32/64 (no call gates).
    pub fn far_call(&mut self, sel: u16, offset: u64, size: u8) -> R {
        let cs = if self.cpu.protected() {
            self.far_target(sel)?
        } else {
            SegCache {
                selector: sel,
                base: (sel as u64) << 4,
                ..self.cpu.seg[CS]
            }
        };
        let saved = self.cpu.gpr[RSP];
        let old_cs = self.cpu.seg[CS].selector as u64;
        let ret = self.cpu.rip;
        let r = self.push(old_cs, size).and_then(|_| self.push(ret, size));
        if let Err(e) = r {
            self.cpu.gpr[RSP] = saved;
            return Err(e);
        }
        if let Err(e) = self.commit_cs(cs, offset, size) {
            self.cpu.gpr[RSP] = saved;
            return Err(e);
        }
        Ok(())
    }

    /// Check the CS selector of a far return (RETF/IRET) to privilege `sel & 3`.
    pub fn return_cs(&mut self, sel: u16) -> R<SegCache> {
        let rpl = (sel & 3) as u8;
        if sel & 0xfffc == 0 {
            return Err(gp0());
        }
        if rpl < self.cpu.cpl {
            return Err(fault(GP, sel_err(sel, false)));
        }
        let raw = self.read_desc(sel, false)?;
        let d = parse_desc(raw);
        if !d.s || d.type_ & SEG_TYPE_CODE == 0 {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if d.type_ & SEG_TYPE_CONFORMING != 0 {
            if d.dpl > rpl {
                return Err(fault(GP, sel_err(sel, false)));
            }
        } else if d.dpl != rpl {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if !d.present {
            return Err(fault(NP, sel_err(sel, false)));
        }
        if d.l && (d.db || !self.cpu.long_mode()) {
            return Err(fault(GP, sel_err(sel, false)));
        }
        self.set_accessed(sel, raw)?;
        Ok(SegCache {
            selector: sel,
            type_: d.type_ | SEG_TYPE_ACCESSED,
            ..d
        })
    }

    /// Check the SS selector of a return to privilege `cpl`; `cs64` when returning to 64-bit
    /// code (where a null SS is allowed below CPL 3).
    pub fn return_ss(&mut self, sel: u16, cpl: u8, cs64: bool) -> R<SegCache> {
        if sel & 0xfffc == 0 {
            if cs64 && cpl != 3 && (sel & 3) as u8 == cpl {
                return Ok(null_ss(cpl));
            }
            return Err(gp0());
        }
        if (sel & 3) as u8 != cpl {
            return Err(fault(GP, sel_err(sel, false)));
        }
        let raw = self.read_desc(sel, false)?;
        let d = parse_desc(raw);
        if !d.s
            || d.type_ & SEG_TYPE_CODE != 0
            || d.type_ & SEG_TYPE_WRITE_READ == 0
            || d.dpl != cpl
        {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if !d.present {
            return Err(fault(SS_VEC, sel_err(sel, false)));
        }
        self.set_accessed(sel, raw)?;
        Ok(SegCache {
            selector: sel,
            type_: d.type_ | SEG_TYPE_ACCESSED,
            ..d
        })
    }

    /// After a return to an outer privilege level: data segment registers the new CPL may not
    /// use become null (SDM Vol. 2A "IRET", "RET").
    pub fn null_inaccessible_segs(&mut self) {
        let cpl = self.cpu.cpl;
        for r in [ES, DS, FS, GS] {
            let s = &mut self.cpu.seg[r];
            let conforming_code =
                s.type_ & SEG_TYPE_CODE != 0 && s.type_ & SEG_TYPE_CONFORMING != 0;
            if !s.unusable && s.s && !conforming_code && s.dpl < cpl {
                s.selector = 0;
                s.unusable = true;
            }
        }
    }

    /// RETF [imm16] (SDM Vol. 2B "RET", far return).
    pub fn far_return(&mut self, size: u8, imm: u64) -> R {
        let sz = size as u64;
        let offset = self.peek(0, size)?;
        let sel = self.peek(sz, size)? as u16;
        if !self.cpu.protected() {
            let cs = SegCache {
                selector: sel,
                base: (sel as u64) << 4,
                ..self.cpu.seg[CS]
            };
            let m = self.cpu.sp_mask;
            self.cpu.add_masked(RSP, 2 * sz + imm, m);
            return self.commit_cs(cs, offset, size);
        }
        let cs = self.return_cs(sel)?;
        let new_cpl = (sel & 3) as u8;
        if new_cpl == self.cpu.cpl {
            let lm64 = self.cpu.long_mode() && cs.l;
            if lm64 && !Cpu::canonical(offset) {
                return Err(gp0());
            }
            let m = self.cpu.sp_mask;
            self.cpu.add_masked(RSP, 2 * sz + imm, m);
            return self.commit_cs(cs, offset, size);
        }
        // Return to an outer level: SS:RSP follow the immediate-adjusted parameters.
        let new_sp = self.peek(2 * sz + imm, size)?;
        let ss_sel = self.peek(3 * sz + imm, size)? as u16;
        let ss = self.return_ss(ss_sel, new_cpl, self.cpu.long_mode() && cs.l)?;
        let lm64 = self.cpu.long_mode() && cs.l;
        if lm64 && !Cpu::canonical(offset) {
            return Err(gp0());
        }
        self.cpu.seg[SS] = ss;
        self.cpu.cpl = new_cpl;
        self.commit_cs(cs, offset, size)?;
        let m = self.cpu.sp_mask;
        self.cpu.gpr[RSP] = (self.cpu.gpr[RSP] & !m) | (new_sp.wrapping_add(imm) & m);
        self.null_inaccessible_segs();
        self.cpu.update_mode();
        Ok(())
    }

    /// LTR (SDM Vol. 2A "LTR").
    pub fn ltr(&mut self, sel: u16) -> R {
        if sel & 0xfffc == 0 {
            return Err(gp0());
        }
        if sel & 4 != 0 {
            return Err(fault(GP, sel_err(sel, false)));
        }
        let (lo, hi) = if self.cpu.long_mode() {
            self.read_desc16(sel)?
        } else {
            (self.read_desc(sel, false)?, 0)
        };
        let mut d = parse_desc(lo);
        if d.s || !(d.type_ == 9 || d.type_ == 1) {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if !d.present {
            return Err(fault(NP, sel_err(sel, false)));
        }
        if self.cpu.long_mode() {
            d.base |= hi << 32;
        }
        // Mark the TSS busy in the GDT.
        let a = self.desc_addr(sel, 8, false)?;
        self.write_sys(a.wrapping_add(5), 1, (lo >> 40) | 2)?;
        d.type_ |= 2;
        d.selector = sel;
        self.cpu.tr = d;
        Ok(())
    }

    /// LLDT (SDM Vol. 2A "LLDT").
    pub fn lldt(&mut self, sel: u16) -> R {
        if sel & 0xfffc == 0 {
            self.cpu.ldt = SegCache {
                selector: sel,
                unusable: true,
                ..SegCache::default()
            };
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(fault(GP, sel_err(sel, false)));
        }
        let (lo, hi) = if self.cpu.long_mode() {
            self.read_desc16(sel)?
        } else {
            (self.read_desc(sel, false)?, 0)
        };
        let mut d = parse_desc(lo);
        if d.s || d.type_ != 2 {
            return Err(fault(GP, sel_err(sel, false)));
        }
        if !d.present {
            return Err(fault(NP, sel_err(sel, false)));
        }
        if self.cpu.long_mode() {
            d.base |= hi << 32;
        }
        d.selector = sel;
        self.cpu.ldt = d;
        Ok(())
    }
}

impl Cpu {
    /// Linear-address mask for descriptor-table accesses (tables may live anywhere in 64-bit
    /// mode's address space even from compatibility mode).
    pub fn lin_mask_sys(&self) -> u64 {
        if self.long_mode() {
            u64::MAX
        } else {
            0xffff_ffff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_descriptors() {
        // The usual 64-bit kernel code descriptor: 0x00af9b000000ffff.
        let d = parse_desc(0x00af_9b00_0000_ffff);
        assert_eq!(d.base, 0);
        assert_eq!(d.limit, 0xffff_ffff);
        assert_eq!(d.type_, 0xb);
        assert!(d.s && d.present && d.l && !d.db && d.g);
        assert_eq!(d.dpl, 0);
        // 32-bit user data with a base: base 0x12345678, limit 0xfffff pages, DPL 3.
        let d = parse_desc(0x12cf_f334_5678_ffff);
        assert_eq!(d.base, 0x1234_5678);
        assert_eq!(d.dpl, 3);
        assert!(d.db && !d.l);
        assert_eq!(d.type_, 3);
    }
}
