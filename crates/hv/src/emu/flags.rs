//! RFLAGS (Intel SDM Vol. 1 §3.4.3) with lazily computed arithmetic flags.
//!
//! The common ALU instructions (ADD/ADC/SUB/SBB/CMP/NEG, AND/OR/XOR/TEST, INC/DEC) do not
//! compute CF/PF/AF/ZF/SF/OF; they record the operation, the operand size, both inputs and the
//! result in [`Lazy`]. A flag is computed only when something reads it (Jcc, SETcc, CMOVcc,
//! ADC, PUSHF, ...). Everything else (shifts, multiplies, POPF, ...) writes the flags eagerly
//! and sets [`Lazy::op`] to [`EAGER`], meaning "the arithmetic flags are in `Cpu::flags`".

/// Carry flag.
pub const CF: u64 = 1 << 0;
/// Bit 1 of RFLAGS always reads as 1.
pub const FIXED1: u64 = 1 << 1;
/// Parity flag (even parity of the low result byte).
pub const PF: u64 = 1 << 2;
/// Auxiliary carry flag (carry out of bit 3).
pub const AF: u64 = 1 << 4;
/// Zero flag.
pub const ZF: u64 = 1 << 6;
/// Sign flag.
pub const SF: u64 = 1 << 7;
/// Trap flag (single step).
pub const TF: u64 = 1 << 8;
/// Interrupt enable flag.
pub const IF: u64 = 1 << 9;
/// Direction flag.
pub const DF: u64 = 1 << 10;
/// Overflow flag.
pub const OF: u64 = 1 << 11;
/// I/O privilege level (2 bits).
pub const IOPL: u64 = 3 << 12;
/// Nested task.
pub const NT: u64 = 1 << 14;
/// Resume flag.
pub const RF: u64 = 1 << 16;
/// Virtual-8086 mode.
pub const VM: u64 = 1 << 17;
/// Alignment check / access control.
pub const AC: u64 = 1 << 18;
/// Virtual interrupt flag.
pub const VIF: u64 = 1 << 19;
/// Virtual interrupt pending.
pub const VIP: u64 = 1 << 20;
/// CPUID available.
pub const ID: u64 = 1 << 21;

/// The six arithmetic status flags.
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// `Lazy::op`: the arithmetic flags are stored in `Cpu::flags`.
pub const EAGER: u8 = 0;
/// `res = a + b`.
pub const ADD: u8 = 1;
/// `res = a + b + CF`.
pub const ADC: u8 = 2;
/// `res = a - b` (also CMP and NEG with `a = 0`).
pub const SUB: u8 = 3;
/// `res = a - b - CF`.
pub const SBB: u8 = 4;
/// AND/OR/XOR/TEST: CF = OF = 0, AF = 0.
pub const LOGIC: u8 = 5;
/// INC: like ADD with `b = 1`, but CF is kept (in `Cpu::flags`).
pub const INC: u8 = 6;
/// DEC: like SUB with `b = 1`, but CF is kept (in `Cpu::flags`).
pub const DEC: u8 = 7;

/// The recorded last flag-setting operation. `a`, `b` and `res` are truncated to `size` bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lazy {
    pub op: u8,
    pub size: u8,
    pub res: u64,
    pub a: u64,
    pub b: u64,
}

/// All-ones mask of an operand of `size` bytes (1, 2, 4 or 8).
#[inline(always)]
pub const fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size as u32 * 8)) - 1
    }
}

/// The sign bit of an operand of `size` bytes.
#[inline(always)]
pub const fn sign(size: u8) -> u64 {
    1u64 << ((size as u32 * 8).wrapping_sub(1) & 63)
}

/// Sign-extend a `size`-byte value to 64 bits.
#[inline(always)]
pub const fn sext(v: u64, size: u8) -> i64 {
    let sh = 64u32.wrapping_sub(size as u32 * 8) & 63;
    ((v << sh) as i64) >> sh
}

/// PF: set when the low byte of `res` has an even number of 1 bits.
#[inline(always)]
pub const fn parity(res: u64) -> bool {
    let b = (res as u8) ^ ((res as u8) >> 4);
    (0x6996u16 >> (b & 0xf)) & 1 == 0
}

/// ZF, SF and PF of a result of `size` bytes (already truncated).
#[inline(always)]
pub fn szp(res: u64, size: u8) -> u64 {
    let mut f = 0;
    if res == 0 {
        f |= ZF;
    }
    if res & sign(size) != 0 {
        f |= SF;
    }
    if parity(res) {
        f |= PF;
    }
    f
}

impl Lazy {
    /// CF. `stored` is the RFLAGS value holding the flags this op does not define.
    #[inline(always)]
    pub fn cf(&self, stored: u64) -> bool {
        let m = mask(self.size);
        match self.op {
            ADD => self.res < self.a,
            ADC => {
                let cin = self.res.wrapping_sub(self.a).wrapping_sub(self.b) & m;
                if cin == 0 {
                    self.res < self.a
                } else {
                    self.res <= self.a
                }
            }
            SUB => self.a < self.b,
            SBB => {
                let cin = self.a.wrapping_sub(self.b).wrapping_sub(self.res) & m;
                if cin == 0 {
                    self.a < self.b
                } else {
                    self.a <= self.b
                }
            }
            LOGIC => false,
            _ => stored & CF != 0,
        }
    }

    #[inline(always)]
    pub fn zf(&self, stored: u64) -> bool {
        if self.op == EAGER {
            stored & ZF != 0
        } else {
            self.res == 0
        }
    }

    #[inline(always)]
    pub fn sf(&self, stored: u64) -> bool {
        if self.op == EAGER {
            stored & SF != 0
        } else {
            self.res & sign(self.size) != 0
        }
    }

    #[inline(always)]
    pub fn of(&self, stored: u64) -> bool {
        let s = sign(self.size);
        match self.op {
            ADD | ADC | INC => (self.a ^ self.res) & (self.b ^ self.res) & s != 0,
            SUB | SBB | DEC => (self.a ^ self.b) & (self.a ^ self.res) & s != 0,
            LOGIC => false,
            _ => stored & OF != 0,
        }
    }

    #[inline(always)]
    pub fn pf(&self, stored: u64) -> bool {
        if self.op == EAGER {
            stored & PF != 0
        } else {
            parity(self.res)
        }
    }

    #[inline(always)]
    pub fn af(&self, stored: u64) -> bool {
        match self.op {
            EAGER => stored & AF != 0,
            LOGIC => false,
            _ => (self.a ^ self.b ^ self.res) & 0x10 != 0,
        }
    }

    /// The six arithmetic flags as RFLAGS bits.
    #[inline]
    pub fn arith(&self, stored: u64) -> u64 {
        if self.op == EAGER {
            return stored & ARITH;
        }
        let mut f = szp(self.res, self.size);
        if self.cf(stored) {
            f |= CF;
        }
        if self.of(stored) {
            f |= OF;
        }
        if self.af(stored) {
            f |= AF;
        }
        f
    }

    /// Evaluate condition code `cc` (the low 4 bits of Jcc/SETcc/CMOVcc, SDM Vol. 1 App. B).
    #[inline(always)]
    pub fn cond(&self, cc: u8, stored: u64) -> bool {
        let r = match (self.op, (cc >> 1) & 7) {
            (SUB, 1) => self.a < self.b,
            (SUB, 2) | (LOGIC, 2) => self.res == 0,
            (SUB, 3) => self.a <= self.b,
            (SUB, 6) => sext(self.a, self.size) < sext(self.b, self.size),
            (SUB, 7) => sext(self.a, self.size) <= sext(self.b, self.size),
            (LOGIC, 1) => false,
            (LOGIC, 3) => self.res == 0,
            (LOGIC, 6) => self.res & sign(self.size) != 0,
            (LOGIC, 7) => self.res == 0 || self.res & sign(self.size) != 0,
            (_, 0) => self.of(stored),
            (_, 1) => self.cf(stored),
            (_, 2) => self.zf(stored),
            (_, 3) => self.cf(stored) || self.zf(stored),
            (_, 4) => self.sf(stored),
            (_, 5) => self.pf(stored),
            (_, 6) => self.sf(stored) != self.of(stored),
            _ => self.zf(stored) || (self.sf(stored) != self.of(stored)),
        };
        r != (cc & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy(op: u8, size: u8, a: u64, b: u64, res: u64) -> Lazy {
        Lazy {
            op,
            size,
            res: res & mask(size),
            a: a & mask(size),
            b: b & mask(size),
        }
    }

    #[test]
    fn add_flags() {
        let l = lazy(ADD, 1, 0x7f, 1, 0x80);
        assert_eq!(l.arith(0), OF | SF | AF);
        let l = lazy(ADD, 1, 0xff, 1, 0x100);
        assert_eq!(l.arith(0), CF | ZF | PF | AF);
        let l = lazy(ADD, 8, u64::MAX, u64::MAX, u64::MAX.wrapping_add(u64::MAX));
        assert!(l.cf(0) && l.sf(0) && !l.of(0));
    }

    #[test]
    fn adc_carry_in_recovered() {
        // 0xff + 0xff + 1 = 0x1ff: CF = 1, res = 0xff.
        let l = lazy(ADC, 1, 0xff, 0xff, 0xff);
        assert!(l.cf(0));
        // 0x00 + 0xff + 1 = 0x100: CF = 1, ZF.
        let l = lazy(ADC, 1, 0, 0xff, 0);
        assert!(l.cf(0) && l.zf(0));
        // 1 + 1 + 0 = 2
        let l = lazy(ADC, 1, 1, 1, 2);
        assert!(!l.cf(0));
    }

    #[test]
    fn sbb_borrow_in_recovered() {
        // 5 - 5 - 1 = -1: borrow.
        let l = lazy(SBB, 4, 5, 5, 0xffff_ffff);
        assert!(l.cf(0) && l.sf(0));
        // 5 - 5 - 0 = 0
        let l = lazy(SBB, 4, 5, 5, 0);
        assert!(!l.cf(0) && l.zf(0));
    }

    #[test]
    fn conditions_after_cmp() {
        // cmp 1, 2 (signed and unsigned less)
        let l = lazy(SUB, 4, 1, 2, 1u64.wrapping_sub(2));
        assert!(l.cond(0x2, 0)); // B
        assert!(l.cond(0xc, 0)); // L
        assert!(!l.cond(0x4, 0)); // E
        assert!(l.cond(0x5, 0)); // NE
                                 // cmp -1, 1: signed less, unsigned above
        let l = lazy(SUB, 4, 0xffff_ffff, 1, 0xffff_fffe);
        assert!(l.cond(0xc, 0));
        assert!(l.cond(0x7, 0)); // A
                                 // The generic path agrees with the fast path.
        for cc in 0..16u8 {
            let eager = l.arith(0);
            let e = Lazy::default();
            assert_eq!(l.cond(cc, 0), e.cond(cc, eager), "cc {cc}");
        }
    }

    #[test]
    fn inc_dec_keep_cf() {
        let l = lazy(INC, 1, 0x7f, 1, 0x80);
        assert!(l.of(0) && !l.cf(0) && l.cf(CF));
        let l = lazy(DEC, 1, 0x80, 1, 0x7f);
        assert!(l.of(0) && l.af(0));
    }

    #[test]
    fn parity_and_sext() {
        assert!(parity(0));
        assert!(!parity(1));
        assert!(parity(3));
        assert!(parity(0x100)); // only the low byte counts
        assert_eq!(sext(0x80, 1), -128);
        assert_eq!(sext(0x7fff, 2), 0x7fff);
        assert_eq!(sext(u64::MAX, 8), -1);
    }
}
