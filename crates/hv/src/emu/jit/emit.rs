//! A small x86-64 encoder for the forms the translator uses (Intel SDM Vol. 2, §2.1-2.2:
//! REX prefix, ModR/M and SIB). Memory operands are `[base + disp]` or `[base + index + disp]`
//! with an 8-bit displacement where it fits, else 32 bits. Registers are numbered as in the
//! SDM (RAX = 0 ... R15 = 15).

pub const RAX: u8 = 0;
pub const RCX: u8 = 1;
pub const RDX: u8 = 2;
pub const RBX: u8 = 3;
pub const RSP: u8 = 4;
pub const RBP: u8 = 5;
pub const RSI: u8 = 6;
pub const RDI: u8 = 7;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
pub const R10: u8 = 10;
pub const R11: u8 = 11;
pub const R12: u8 = 12;
pub const R13: u8 = 13;
pub const R14: u8 = 14;
pub const R15: u8 = 15;

/// Condition codes (the low nibble of `0F 8x`).
pub const CC_B: u8 = 0x2;
pub const CC_AE: u8 = 0x3;
pub const CC_E: u8 = 0x4;
pub const CC_NE: u8 = 0x5;
#[cfg(test)]
pub const CC_A: u8 = 0x7;

/// Group-1 immediate operations (`81 /n`).
pub const ADD: u8 = 0;
pub const AND: u8 = 4;
pub const SUB: u8 = 5;
pub const CMP: u8 = 7;

/// Shifts and rotates (`C1 /n ib`).
pub const ROL: u8 = 0;
pub const ROR: u8 = 1;
pub const SHL: u8 = 4;
pub const SHR: u8 = 5;
pub const SAR: u8 = 7;

/// Unary ops for [`Emit::unary`] (group 3 digits for NOT/NEG; INC/DEC are mapped).
pub const INC: u8 = 0x10;
pub const DEC: u8 = 0x11;
pub const NOT: u8 = 2;
pub const NEG: u8 = 3;

/// A jump target, bound once.
#[derive(Clone, Copy)]
pub struct Label(usize);

#[derive(Default)]
pub struct Emit {
    pub buf: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (position of a rel32 field, its label).
    fixups: Vec<(usize, Label)>,
}

impl Emit {
    pub fn new() -> Emit {
        Emit::default()
    }

    fn rex(&mut self, w: bool, reg: u8, base: u8) {
        self.rex_x(w, reg, 0, base);
    }

    /// REX with the SIB index's high bit too.
    fn rex_x(&mut self, w: bool, reg: u8, index: u8, base: u8) {
        let rex =
            0x40 | (w as u8) << 3 | (reg >> 3 & 1) << 2 | (index >> 3 & 1) << 1 | (base >> 3 & 1);
        if rex != 0x40 {
            self.buf.push(rex);
        }
    }

    /// ModR/M (and SIB) for `[base + disp]` with `reg` in the reg field.
    fn mem(&mut self, reg: u8, base: u8, disp: i32) {
        self.mem_sib(reg, base, None, disp);
    }

    /// ModR/M and SIB for `[base + index << scale + disp]` (`index`: (register, scale); not
    /// RSP), or `[base + disp]` without one.
    fn mem_sib(&mut self, reg: u8, base: u8, index: Option<(u8, u8)>, disp: i32) {
        // Mod 01 (disp8) when the displacement fits, else mod 10 (disp32): shorter code. Mod 00
        // is never used, so a base of RBP or R13 needs no special case.
        let short = disp == disp as i8 as i32;
        let md = if short { 0x40 } else { 0x80 };
        match index {
            Some((i, scale)) => {
                self.buf.push(md | (reg & 7) << 3 | RSP);
                self.buf.push(scale << 6 | (i & 7) << 3 | (base & 7));
            }
            None => {
                self.buf.push(md | (reg & 7) << 3 | (base & 7));
                if base & 7 == RSP {
                    // SIB: no index, base.
                    self.buf.push(0x20 | (base & 7));
                }
            }
        }
        if short {
            self.buf.push(disp as u8);
        } else {
            self.buf.extend_from_slice(&disp.to_le_bytes());
        }
    }

    /// `opc reg, [base + disp]` (or the other direction, by opcode).
    fn op_mem(&mut self, opc: u8, w: bool, reg: u8, base: u8, disp: i32) {
        self.rex(w, reg, base);
        self.buf.push(opc);
        self.mem(reg, base, disp);
    }

    /// `opc reg, [base + index + disp]` (scale 1; `index` is not RSP).
    fn op_mem_idx(&mut self, opc: u8, w: bool, reg: u8, base: u8, index: u8, disp: i32) {
        self.rex_x(w, reg, index, base);
        self.buf.push(opc);
        self.mem_sib(reg, base, Some((index, 0)), disp);
    }

    /// CMP r64, [base + index + disp].
    pub fn cmp_mem_idx(&mut self, dst: u8, base: u8, index: u8, disp: i32) {
        self.op_mem_idx(0x3b, true, dst, base, index, disp);
    }

    /// ADD r64, [base + index + disp].
    pub fn add_mem_idx(&mut self, dst: u8, base: u8, index: u8, disp: i32) {
        self.op_mem_idx(0x03, true, dst, base, index, disp);
    }

    /// MOV r32, [base + index + disp].
    pub fn load32_idx(&mut self, dst: u8, base: u8, index: u8, disp: i32) {
        self.op_mem_idx(0x8b, false, dst, base, index, disp);
    }

    /// LEA r64, [r + r * 2]: three times `r` (`r` is not RSP).
    pub fn times3(&mut self, r: u8) {
        self.rex_x(true, r, r, r);
        self.buf.push(0x8d);
        self.mem_sib(r, r, Some((r, 1)), 0);
    }

    /// `opc rm, reg` with a register `rm` (ModR/M mod = 11).
    fn op_rr(&mut self, opc: u8, w: bool, reg: u8, rm: u8) {
        self.rex(w, reg, rm);
        self.buf.push(opc);
        self.buf.push(0xc0 | (reg & 7) << 3 | (rm & 7));
    }

    /// MOV r64, [base + disp].
    pub fn load64(&mut self, dst: u8, base: u8, disp: i32) {
        self.op_mem(0x8b, true, dst, base, disp);
    }

    /// MOV r32, [base + disp] (zero-extends).
    pub fn load32(&mut self, dst: u8, base: u8, disp: i32) {
        self.op_mem(0x8b, false, dst, base, disp);
    }

    /// MOVZX r32, BYTE [base + disp].
    pub fn load8z(&mut self, dst: u8, base: u8, disp: i32) {
        self.rex(false, dst, base);
        self.buf.extend_from_slice(&[0x0f, 0xb6]);
        self.mem(dst, base, disp);
    }

    /// MOVZX r32, WORD [base + disp].
    pub fn load16z(&mut self, dst: u8, base: u8, disp: i32) {
        self.rex(false, dst, base);
        self.buf.extend_from_slice(&[0x0f, 0xb7]);
        self.mem(dst, base, disp);
    }

    /// MOV [base + disp], r64.
    pub fn store64(&mut self, base: u8, disp: i32, src: u8) {
        self.op_mem(0x89, true, src, base, disp);
    }

    /// MOV [base + disp], r32.
    pub fn store32(&mut self, base: u8, disp: i32, src: u8) {
        self.op_mem(0x89, false, src, base, disp);
    }

    /// LEA r64, [base + disp].
    pub fn lea(&mut self, dst: u8, base: u8, disp: i32) {
        self.op_mem(0x8d, true, dst, base, disp);
    }

    /// ADD r64, [base + disp].
    pub fn add_mem(&mut self, dst: u8, base: u8, disp: i32) {
        self.op_mem(0x03, true, dst, base, disp);
    }

    /// CMP r64, [base + disp].
    pub fn cmp_mem(&mut self, dst: u8, base: u8, disp: i32) {
        self.op_mem(0x3b, true, dst, base, disp);
    }

    /// `op QWORD [base + disp], imm8` (group 1 by `/digit`: ADD, AND, SUB, CMP; the
    /// immediate sign-extended).
    pub fn alu_mem_imm8(&mut self, op: u8, base: u8, disp: i32, imm: i8) {
        self.op_mem(0x83, true, op, base, disp);
        self.buf.push(imm as u8);
    }

    /// `op QWORD [base + disp], imm32` (group 1 by `/digit`; the immediate sign-extended).
    pub fn alu_mem_imm32(&mut self, op: u8, base: u8, disp: i32, imm: i32) {
        self.op_mem(0x81, true, op, base, disp);
        self.buf.extend_from_slice(&imm.to_le_bytes());
    }

    /// JMP QWORD [base + disp].
    pub fn jmp_mem(&mut self, base: u8, disp: i32) {
        self.op_mem(0xff, false, 4, base, disp);
    }

    /// ADD QWORD [base + disp], r64.
    pub fn add_to_mem(&mut self, base: u8, disp: i32, src: u8) {
        self.op_mem(0x01, true, src, base, disp);
    }

    /// SUB QWORD [base + disp], r64.
    pub fn sub_to_mem(&mut self, base: u8, disp: i32, src: u8) {
        self.op_mem(0x29, true, src, base, disp);
    }

    /// CMP BYTE [base + disp], 0.
    pub fn cmp_byte_zero(&mut self, base: u8, disp: i32) {
        self.op_mem(0x80, false, 7, base, disp);
        self.buf.push(0);
    }

    /// CMOVcc r64, r64 (`w`) or CMOVcc r32, r32.
    pub fn cmov(&mut self, cc: u8, w: bool, dst: u8, src: u8) {
        self.rex(w, dst, src);
        self.buf.extend_from_slice(&[0x0f, 0x40 | (cc & 15)]);
        self.buf.push(0xc0 | (dst & 7) << 3 | (src & 7));
    }

    /// TEST BYTE [base + disp], imm8.
    pub fn test_mem8(&mut self, base: u8, disp: i32, imm: u8) {
        self.op_mem(0xf6, false, 0, base, disp);
        self.buf.push(imm);
    }

    /// MOV r64, r64 (`w`) or MOV r32, r32.
    pub fn mov_rr(&mut self, w: bool, dst: u8, src: u8) {
        self.op_rr(0x89, w, src, dst);
    }

    /// ADD r64, r64.
    pub fn add_rr(&mut self, dst: u8, src: u8) {
        self.op_rr(0x01, true, src, dst);
    }

    /// `op dst, src` for binary operation `op` in the x86 `/digit` order (ADD 0, OR 1, ADC 2,
    /// SBB 3, AND 4, SUB 5, XOR 6, CMP 7) or TEST (8); 64-bit (`w`) or 32-bit.
    pub fn alu_rr(&mut self, op: u8, w: bool, dst: u8, src: u8) {
        let opc = if op == 8 { 0x85 } else { (op & 7) << 3 | 1 };
        self.op_rr(opc, w, src, dst);
    }

    /// `op dst8, src8` (as [`alu_rr`](Self::alu_rr), byte-sized) on AL, CL, DL or BL.
    pub fn alu_rr8(&mut self, op: u8, dst: u8, src: u8) {
        debug_assert!(dst < 4 && src < 4);
        let opc = if op == 8 { 0x84 } else { (op & 7) << 3 };
        self.buf.push(opc);
        self.buf.push(0xc0 | (src & 3) << 3 | (dst & 3));
    }

    /// `op dst16, src16` (as [`alu_rr`](Self::alu_rr), word-sized).
    pub fn alu_rr16(&mut self, op: u8, dst: u8, src: u8) {
        self.buf.push(0x66);
        self.alu_rr(op, false, dst, src);
    }

    /// MOV BYTE [base + disp], r8 for AL, CL, DL or BL.
    pub fn store8(&mut self, base: u8, disp: i32, src: u8) {
        debug_assert!(src < 4);
        self.op_mem(0x88, false, src, base, disp);
    }

    /// MOV WORD [base + disp], r16.
    pub fn store16(&mut self, base: u8, disp: i32, src: u8) {
        self.buf.push(0x66);
        self.op_mem(0x89, false, src, base, disp);
    }

    /// Group 3/4/5 unary op `digit` (INC 0, DEC 1 by [`INC`]/[`DEC`]; NOT 2, NEG 3 by
    /// [`NOT`]/[`NEG`]) on a register of `s` bytes (1: AL, CL, DL or BL).
    pub fn unary(&mut self, digit: u8, s: u8, r: u8) {
        let (opc, w) = match (digit, s) {
            (INC | DEC, 1) => (0xfe, false),
            (INC | DEC, _) => (0xff, s == 8),
            (_, 1) => (0xf6, false),
            _ => (0xf7, s == 8),
        };
        let digit = match digit {
            INC => 0,
            DEC => 1,
            d => d,
        };
        self.prefixes(false, s);
        debug_assert!(s != 1 || r < 4);
        self.op_rr(opc, w, digit, r);
    }

    /// SETcc r8 (AL, CL, DL or BL).
    pub fn setcc(&mut self, cc: u8, r: u8) {
        debug_assert!(r < 4);
        self.buf
            .extend_from_slice(&[0x0f, 0x90 | (cc & 15), 0xc0 | (r & 3)]);
    }

    /// LOCK (when `lock`) and the operand-size prefix of an `s`-byte operand.
    fn prefixes(&mut self, lock: bool, s: u8) {
        if lock {
            self.buf.push(0xf0);
        }
        if s == 2 {
            self.buf.push(0x66);
        }
    }

    /// LOCK `0F opc` [base + disp], `src` of `s` bytes (`opc` for a byte, `opc + 1` else).
    fn locked_rmw(&mut self, opc: u8, s: u8, base: u8, disp: i32, src: u8) {
        self.prefixes(true, s);
        debug_assert!(s != 1 || src < 4);
        self.rex(s == 8, src, base);
        self.buf
            .extend_from_slice(&[0x0f, if s == 1 { opc } else { opc + 1 }]);
        self.mem(src, base, disp);
    }

    /// LOCK CMPXCHG [base + disp], `src` of `s` bytes (compares with AL/AX/EAX/RAX).
    pub fn lock_cmpxchg(&mut self, s: u8, base: u8, disp: i32, src: u8) {
        self.locked_rmw(0xb0, s, base, disp, src);
    }

    /// LOCK XADD [base + disp], `src` of `s` bytes.
    pub fn lock_xadd(&mut self, s: u8, base: u8, disp: i32, src: u8) {
        self.locked_rmw(0xc0, s, base, disp, src);
    }

    /// BT/BTS/BTR/BTC (`k` 0-3) of the `s`-byte (2, 4, 8) register `r` by bit `imm`.
    pub fn bt_imm(&mut self, k: u8, s: u8, r: u8, imm: u8) {
        self.prefixes(false, s);
        self.rex(s == 8, 0, r);
        self.buf
            .extend_from_slice(&[0x0f, 0xba, 0xc0 | (4 + (k & 3)) << 3 | (r & 7), imm]);
    }

    /// BT/BTS/BTR/BTC (`k` 0-3) of the `s`-byte register `dst` by the bit number in `src`.
    pub fn bt_rr(&mut self, k: u8, s: u8, dst: u8, src: u8) {
        self.prefixes(false, s);
        self.op_rr(0x0f, s == 8, src, dst);
        // `op_rr` wrote 0F and the ModR/M: put the second opcode byte between them.
        let modrm = self.buf.pop().unwrap_or(0);
        self.buf.push([0xa3, 0xab, 0xb3, 0xbb][(k & 3) as usize]);
        self.buf.push(modrm);
    }

    /// [LOCK] BT/BTS/BTR/BTC (`k` 0-3) of the `s`-byte value at [base + disp] by bit `imm`.
    pub fn bt_mem_imm(&mut self, lock: bool, k: u8, s: u8, base: u8, disp: i32, imm: u8) {
        self.prefixes(lock, s);
        self.rex(s == 8, 0, base);
        self.buf.extend_from_slice(&[0x0f, 0xba]);
        self.mem(4 + (k & 3), base, disp);
        self.buf.push(imm);
    }

    /// MOV BYTE [base + disp], imm8.
    pub fn store_imm8(&mut self, base: u8, disp: i32, v: u8) {
        self.op_mem(0xc6, false, 0, base, disp);
        self.buf.push(v);
    }

    /// MOV WORD [base + disp], imm16.
    pub fn store_imm16(&mut self, base: u8, disp: i32, v: u16) {
        self.buf.push(0x66);
        self.op_mem(0xc7, false, 0, base, disp);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// TEST r32, r32.
    pub fn test32(&mut self, a: u8, b: u8) {
        self.op_rr(0x85, false, b, a);
    }

    /// Load `v` into a 64-bit register in the shortest form.
    pub fn mov_imm(&mut self, dst: u8, v: u64) {
        if v as i64 == v as i32 as i64 {
            // C7 /0 id: sign-extended imm32.
            self.op_rr(0xc7, true, 0, dst);
            self.buf.extend_from_slice(&(v as u32).to_le_bytes());
        } else if v <= u32::MAX as u64 {
            // B8+r id: a 32-bit move zero-extends.
            self.rex(false, 0, dst);
            self.buf.push(0xb8 + (dst & 7));
            self.buf.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            self.rex(true, 0, dst);
            self.buf.push(0xb8 + (dst & 7));
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// `op r, imm32` (group 1: ADD, AND, SUB, CMP), 64-bit (`w`, imm sign-extended) or 32-bit.
    pub fn alu_imm(&mut self, op: u8, w: bool, dst: u8, imm: i32) {
        self.op_rr(0x81, w, op, dst);
        self.buf.extend_from_slice(&imm.to_le_bytes());
    }

    /// SHL/SHR/SAR r64, imm8.
    pub fn shift(&mut self, op: u8, dst: u8, n: u8) {
        self.op_rr(0xc1, true, op, dst);
        self.buf.push(n);
    }

    /// SHL/SHR/SAR r32, imm8 (zero-extends into the 64-bit register).
    pub fn shift32(&mut self, op: u8, dst: u8, n: u8) {
        self.op_rr(0xc1, false, op, dst);
        self.buf.push(n);
    }

    /// SHL/SHR/SAR r64 (`w`) or r32 by CL.
    pub fn shift_cl(&mut self, op: u8, w: bool, dst: u8) {
        self.op_rr(0xd3, w, op, dst);
    }

    /// PUSHFQ.
    pub fn pushfq(&mut self) {
        self.buf.push(0x9c);
    }

    /// IMUL r64, r64, imm32.
    pub fn imul_imm(&mut self, dst: u8, src: u8, imm: i32) {
        self.op_rr(0x69, true, dst, src);
        self.buf.extend_from_slice(&imm.to_le_bytes());
    }

    /// IMUL r64, r/m64 (`w`) or IMUL r32, r/m32 with a register `src`.
    pub fn imul_rr(&mut self, w: bool, dst: u8, src: u8) {
        self.op_rr(0x0f, w, dst, src);
        // `op_rr` wrote 0F and the ModR/M: put the second opcode byte between them.
        let modrm = self.buf.pop().unwrap_or(0);
        self.buf.extend_from_slice(&[0xaf, modrm]);
    }

    /// MUL (`signed`: IMUL) of RAX (or EAX, without `w`) by register `src` into RDX:RAX.
    pub fn mul1(&mut self, signed: bool, w: bool, src: u8) {
        self.op_rr(0xf7, w, if signed { 5 } else { 4 }, src);
    }

    /// IMUL r32, r32, imm32.
    pub fn imul_imm32(&mut self, dst: u8, src: u8, imm: i32) {
        self.op_rr(0x69, false, dst, src);
        self.buf.extend_from_slice(&imm.to_le_bytes());
    }

    /// CALL r64.
    pub fn call(&mut self, r: u8) {
        self.op_rr(0xff, false, 2, r);
    }

    /// JMP r64.
    pub fn jmp_r(&mut self, r: u8) {
        self.op_rr(0xff, false, 4, r);
    }

    pub fn push(&mut self, r: u8) {
        self.rex(false, 0, r);
        self.buf.push(0x50 + (r & 7));
    }

    pub fn pop(&mut self, r: u8) {
        self.rex(false, 0, r);
        self.buf.push(0x58 + (r & 7));
    }

    pub fn ret(&mut self) {
        self.buf.push(0xc3);
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Bind `l` here.
    pub fn bind(&mut self, l: Label) {
        if let Some(slot) = self.labels.get_mut(l.0) {
            *slot = Some(self.buf.len());
        }
    }

    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.buf.len(), l));
        self.buf.extend_from_slice(&[0; 4]);
    }

    /// Jcc rel32 to `l`.
    pub fn jcc(&mut self, cc: u8, l: Label) {
        self.buf.extend_from_slice(&[0x0f, 0x80 | cc]);
        self.rel32(l);
    }

    /// JMP rel32 to `l`.
    pub fn jmp(&mut self, l: Label) {
        self.buf.push(0xe9);
        self.rel32(l);
    }

    /// The code with every jump resolved; `None` if a label was never bound.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        for &(at, l) in &self.fixups {
            let target = (*self.labels.get(l.0)?)?;
            let rel = target as i64 - (at as i64 + 4);
            self.buf
                .get_mut(at..at + 4)?
                .copy_from_slice(&(rel as i32).to_le_bytes());
        }
        Some(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::{Decoder, DecoderOptions, Instruction};

    fn decode(bytes: &[u8]) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
        let mut v = Vec::new();
        while d.can_decode() {
            v.push(d.decode());
        }
        v
    }

    /// What an instruction does: its code, operands, memory base and displacement (not how
    /// long its displacement field is).
    fn key(i: &Instruction) -> String {
        let ops: Vec<String> = (0..i.op_count())
            .map(|k| match i.op_kind(k) {
                iced_x86::OpKind::Register => format!("{:?}", i.op_register(k)),
                iced_x86::OpKind::Memory => {
                    format!("[{:?}+{:#x}]", i.memory_base(), i.memory_displacement64())
                }
                kind => format!("{kind:?}={:#x}", i.immediate(k)),
            })
            .collect();
        format!("{:?} {}", i.code(), ops.join(", "))
    }

    fn reg64(n: u8) -> AsmRegister64 {
        [
            rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
        ][n as usize]
    }

    fn reg32(n: u8) -> AsmRegister32 {
        [
            eax, ecx, edx, ebx, esp, ebp, esi, edi, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d,
        ][n as usize]
    }

    fn reg16(n: u8) -> AsmRegister16 {
        [
            ax, cx, dx, bx, sp, bp, si, di, r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w,
        ][n as usize]
    }

    /// Each form, for every register and a few displacements, decodes to what iced's
    /// assembler would have encoded.
    #[test]
    fn every_form_decodes_to_the_intended_instruction() {
        for x in 0..16u8 {
            for y in 0..16u8 {
                for disp in [0i32, 8, -8, 127, -128, 128, -129, 0x1234_5678] {
                    let mut e = Emit::new();
                    let mut a = CodeAssembler::new(64).unwrap();
                    let (rx, ry) = (reg64(x), reg64(y));
                    e.load64(x, y, disp);
                    a.mov(rx, qword_ptr(ry + disp)).unwrap();
                    e.load32(x, y, disp);
                    a.mov(reg32(x), dword_ptr(ry + disp)).unwrap();
                    e.store64(y, disp, x);
                    a.mov(qword_ptr(ry + disp), rx).unwrap();
                    e.store32(y, disp, x);
                    a.mov(dword_ptr(ry + disp), reg32(x)).unwrap();
                    e.lea(x, y, disp);
                    a.lea(rx, qword_ptr(ry + disp)).unwrap();
                    e.add_mem(x, y, disp);
                    a.add(rx, qword_ptr(ry + disp)).unwrap();
                    e.cmp_mem(x, y, disp);
                    a.cmp(rx, qword_ptr(ry + disp)).unwrap();
                    e.cmp_byte_zero(y, disp);
                    a.cmp(byte_ptr(ry + disp), 0).unwrap();
                    e.store_imm16(y, disp, 0x1234);
                    a.mov(word_ptr(ry + disp), 0x1234).unwrap();
                    e.alu_mem_imm32(ADD, y, disp, 0x1234);
                    a.add(qword_ptr(ry + disp), 0x1234).unwrap();
                    e.alu_mem_imm32(SUB, y, disp, -0x1234);
                    a.sub(qword_ptr(ry + disp), -0x1234).unwrap();
                    e.jmp_mem(y, disp);
                    a.jmp(qword_ptr(ry + disp)).unwrap();
                    if x != RSP {
                        e.cmp_mem_idx(y, y, x, disp);
                        a.cmp(ry, qword_ptr(ry + rx + disp)).unwrap();
                        e.add_mem_idx(x, y, x, disp);
                        a.add(rx, qword_ptr(ry + rx + disp)).unwrap();
                        e.load32_idx(y, y, x, disp);
                        a.mov(reg32(y), dword_ptr(ry + rx + disp)).unwrap();
                        e.times3(x);
                        a.lea(rx, qword_ptr(rx + rx * 2)).unwrap();
                    }
                    e.test_mem8(y, disp, 0x81);
                    a.test(byte_ptr(ry + disp), 0x81).unwrap();
                    e.alu_mem_imm8(CMP, y, disp, 0);
                    a.cmp(qword_ptr(ry + disp), 0).unwrap();
                    e.alu_mem_imm8(SUB, y, disp, 1);
                    a.sub(qword_ptr(ry + disp), 1).unwrap();
                    e.add_to_mem(y, disp, x);
                    a.add(qword_ptr(ry + disp), rx).unwrap();
                    e.sub_to_mem(y, disp, x);
                    a.sub(qword_ptr(ry + disp), rx).unwrap();
                    e.cmov(CC_NE, true, x, y);
                    a.cmovne(rx, ry).unwrap();
                    e.cmov(CC_A, false, x, y);
                    a.cmova(reg32(x), reg32(y)).unwrap();
                    e.mov_rr(true, x, y);
                    a.mov(rx, ry).unwrap();
                    e.mov_rr(false, x, y);
                    a.mov(reg32(x), reg32(y)).unwrap();
                    e.add_rr(x, y);
                    a.add(rx, ry).unwrap();
                    e.test32(x, y);
                    a.test(reg32(x), reg32(y)).unwrap();
                    for w in [true, false] {
                        let (ex, ey) = (reg32(x), reg32(y));
                        e.alu_rr(1, w, x, y);
                        e.alu_rr(5, w, x, y);
                        e.alu_rr(6, w, x, y);
                        e.alu_rr(7, w, x, y);
                        e.alu_rr(8, w, x, y);
                        if w {
                            a.or(rx, ry).unwrap();
                            a.sub(rx, ry).unwrap();
                            a.xor(rx, ry).unwrap();
                            a.cmp(rx, ry).unwrap();
                            a.test(rx, ry).unwrap();
                        } else {
                            a.or(ex, ey).unwrap();
                            a.sub(ex, ey).unwrap();
                            a.xor(ex, ey).unwrap();
                            a.cmp(ex, ey).unwrap();
                            a.test(ex, ey).unwrap();
                        }
                    }
                    e.load8z(x, y, disp);
                    a.movzx(reg32(x), byte_ptr(ry + disp)).unwrap();
                    e.load16z(x, y, disp);
                    a.movzx(reg32(x), word_ptr(ry + disp)).unwrap();
                    if x < 4 && y < 4 {
                        let b8 = [al, cl, dl, bl];
                        e.alu_rr8(7, x, y);
                        a.cmp(b8[x as usize], b8[y as usize]).unwrap();
                        e.alu_rr8(8, x, y);
                        a.test(b8[x as usize], b8[y as usize]).unwrap();
                    }
                    e.store_imm8(y, disp, 0x5a);
                    a.mov(byte_ptr(ry + disp), 0x5a).unwrap();
                    e.store16(y, disp, x);
                    a.mov(word_ptr(ry + disp), reg16(x)).unwrap();
                    e.alu_rr16(5, x, y);
                    a.sub(reg16(x), reg16(y)).unwrap();
                    e.alu_rr16(8, x, y);
                    a.test(reg16(x), reg16(y)).unwrap();
                    for s in [2u8, 4, 8] {
                        e.lock_xadd(s, y, disp, x);
                        match s {
                            2 => a.lock().xadd(word_ptr(ry + disp), reg16(x)),
                            4 => a.lock().xadd(dword_ptr(ry + disp), reg32(x)),
                            _ => a.lock().xadd(qword_ptr(ry + disp), rx),
                        }
                        .unwrap();
                        e.lock_cmpxchg(s, y, disp, x);
                        match s {
                            2 => a.lock().cmpxchg(word_ptr(ry + disp), reg16(x)),
                            4 => a.lock().cmpxchg(dword_ptr(ry + disp), reg32(x)),
                            _ => a.lock().cmpxchg(qword_ptr(ry + disp), rx),
                        }
                        .unwrap();
                    }
                    e.bt_mem_imm(true, 1, 4, y, disp, 5);
                    a.lock().bts(dword_ptr(ry + disp), 5).unwrap();
                    e.bt_mem_imm(false, 0, 8, y, disp, 63);
                    a.bt(qword_ptr(ry + disp), 63).unwrap();
                    e.bt_mem_imm(false, 2, 2, y, disp, 9);
                    a.btr(word_ptr(ry + disp), 9).unwrap();
                    e.bt_rr(3, 8, x, y);
                    a.btc(rx, ry).unwrap();
                    e.bt_rr(0, 4, x, y);
                    a.bt(reg32(x), reg32(y)).unwrap();
                    e.bt_rr(1, 2, x, y);
                    a.bts(reg16(x), reg16(y)).unwrap();
                    if x < 4 {
                        let b8 = [al, cl, dl, bl];
                        e.store8(y, disp, x);
                        a.mov(byte_ptr(ry + disp), b8[x as usize]).unwrap();
                        e.lock_xadd(1, y, disp, x);
                        a.lock().xadd(byte_ptr(ry + disp), b8[x as usize]).unwrap();
                        e.lock_cmpxchg(1, y, disp, x);
                        a.lock()
                            .cmpxchg(byte_ptr(ry + disp), b8[x as usize])
                            .unwrap();
                    }
                    let got: Vec<_> = decode(&e.finish().unwrap()).iter().map(key).collect();
                    let want: Vec<_> = a.instructions().iter().map(key).collect();
                    assert_eq!(got, want, "registers {x}, {y}, disp {disp}");
                }
            }
            let mut e = Emit::new();
            let mut a = CodeAssembler::new(64).unwrap();
            let r = reg64(x);
            for v in [
                0u64,
                5,
                u64::MAX,
                0xffff_ffff,
                0x8000_0000,
                0x1234_5678_9abc_def0,
            ] {
                let mut m = Emit::new();
                m.mov_imm(x, v);
                let i = decode(&m.finish().unwrap())[0];
                assert_eq!(i.mnemonic(), iced_x86::Mnemonic::Mov);
                assert_eq!(i.op0_register().full_register(), r.into());
                let got = if i.op0_register().size() == 4 {
                    i.immediate(1) as u32 as u64
                } else {
                    i.immediate(1)
                };
                assert_eq!(got, v, "register {x}: {i:?}");
            }
            for (op, imm) in [(ADD, 5), (AND, -4096), (SUB, 8), (CMP, 0xff0)] {
                e.alu_imm(op, true, x, imm);
                e.alu_imm(op, false, x, imm);
                match op {
                    ADD => {
                        a.add(r, imm).unwrap();
                        a.add(reg32(x), imm).unwrap();
                    }
                    AND => {
                        a.and(r, imm).unwrap();
                        a.and(reg32(x), imm).unwrap();
                    }
                    SUB => {
                        a.sub(r, imm).unwrap();
                        a.sub(reg32(x), imm).unwrap();
                    }
                    _ => {
                        a.cmp(r, imm).unwrap();
                        a.cmp(reg32(x), imm).unwrap();
                    }
                }
            }
            e.shift(SHL, x, 3);
            a.shl(r, 3).unwrap();
            e.shift(SHR, x, 12);
            a.shr(r, 12).unwrap();
            e.shift(SAR, x, 16);
            a.sar(r, 16).unwrap();
            e.shift32(SHL, x, 3);
            a.shl(reg32(x), 3).unwrap();
            e.shift32(SAR, x, 31);
            a.sar(reg32(x), 31).unwrap();
            e.shift_cl(SHR, true, x);
            a.shr(r, cl).unwrap();
            e.shift_cl(SHL, false, x);
            a.shl(reg32(x), cl).unwrap();
            e.pushfq();
            a.pushfq().unwrap();
            for s in [1u8, 2, 4, 8] {
                if s == 1 && x >= 4 {
                    continue;
                }
                for d in [INC, DEC, NOT, NEG] {
                    e.unary(d, s, x);
                    let a = &mut a;
                    match (s, d) {
                        (1, INC) => a.inc([al, cl, dl, bl][x as usize]),
                        (1, DEC) => a.dec([al, cl, dl, bl][x as usize]),
                        (1, NOT) => a.not([al, cl, dl, bl][x as usize]),
                        (1, _) => a.neg([al, cl, dl, bl][x as usize]),
                        (2, INC) => a.inc(reg16(x)),
                        (2, DEC) => a.dec(reg16(x)),
                        (2, NOT) => a.not(reg16(x)),
                        (2, _) => a.neg(reg16(x)),
                        (4, INC) => a.inc(reg32(x)),
                        (4, DEC) => a.dec(reg32(x)),
                        (4, NOT) => a.not(reg32(x)),
                        (4, _) => a.neg(reg32(x)),
                        (_, INC) => a.inc(r),
                        (_, DEC) => a.dec(r),
                        (_, NOT) => a.not(r),
                        _ => a.neg(r),
                    }
                    .unwrap();
                }
            }
            e.bt_imm(0, 8, x, 0);
            a.bt(r, 0).unwrap();
            e.bt_imm(1, 4, x, 31);
            a.bts(reg32(x), 31).unwrap();
            e.bt_imm(2, 2, x, 15);
            a.btr(reg16(x), 15).unwrap();
            if x < 4 {
                e.setcc(CC_NE, x);
                a.setne([al, cl, dl, bl][x as usize]).unwrap();
                e.setcc(CC_A, x);
                a.seta([al, cl, dl, bl][x as usize]).unwrap();
            }
            e.call(x);
            a.call(r).unwrap();
            e.jmp_r(x);
            a.jmp(r).unwrap();
            e.push(x);
            a.push(r).unwrap();
            e.pop(x);
            a.pop(r).unwrap();
            e.imul_imm(x, 3, 24);
            a.imul_3(r, rbx, 24).unwrap();
            e.imul_imm32(x, 6, -1000);
            a.imul_3(reg32(x), esi, -1000).unwrap();
            e.imul_rr(true, x, 9);
            a.imul_2(r, r9).unwrap();
            e.imul_rr(false, x, 2);
            a.imul_2(reg32(x), edx).unwrap();
            e.mul1(false, true, x);
            a.mul(r).unwrap();
            e.mul1(true, false, x);
            a.imul(reg32(x)).unwrap();
            let got = decode(&e.finish().unwrap());
            // iced picks the short immediate forms where they fit: compare what the
            // instructions do (mnemonic, registers, immediate value), not the opcodes.
            let want = a.instructions();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.mnemonic(), w.mnemonic(), "register {x}: {g:?} / {w:?}");
                assert_eq!(g.op_count(), w.op_count(), "register {x}: {g:?} / {w:?}");
                for k in 0..g.op_count() {
                    if g.op_kind(k) == iced_x86::OpKind::Register {
                        assert_eq!(g.op_register(k), w.op_register(k), "{g:?}");
                    } else {
                        let wide = g.op0_register().size() == 8;
                        let (gv, wv) = (g.immediate(k), w.immediate(k));
                        let same = if wide {
                            gv == wv
                        } else {
                            gv as u32 == wv as u32
                        };
                        assert!(same, "register {x}: {g:?} / {w:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn jumps_reach_their_labels() {
        let mut e = Emit::new();
        let back = e.label();
        let fwd = e.label();
        e.bind(back);
        e.jcc(CC_NE, fwd);
        e.jcc(CC_A, back);
        e.jmp(fwd);
        e.ret();
        e.bind(fwd);
        e.ret();
        let code = e.finish().unwrap();
        let got = decode(&code);
        let end = code.len() as u64 - 1;
        assert_eq!(got[0].near_branch_target(), end);
        assert_eq!(got[1].near_branch_target(), 0);
        assert_eq!(got[2].near_branch_target(), end);
        let mut e = Emit::new();
        let l = e.label();
        e.jmp(l);
        assert!(e.finish().is_none(), "an unbound label is refused");
    }
}
