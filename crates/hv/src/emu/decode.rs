//! Translation of one iced-x86 `Instruction` into the internal [`Op`] form: registers become
//! numbers, the memory operand becomes base/index/scale/displacement/segment/address size,
//! branch targets become displacements from the next instruction, and the handler is chosen
//! for the exact operation, size and operand form, so execution never re-inspects iced.
//!
//! Anything not handled here becomes `system::undefined` (#UD, logged once per kind).

use iced_x86::{Code, ConditionCode, Instruction, MemorySize, Mnemonic as M, OpKind, Register};

use super::exec::alu::{self, MI, MR, RI, RM, RR};
use super::exec::{
    atomic, bits, branch, data, fpu, muldiv, shift, stack, string, system, tag, Handler, Op, F_CL,
    F_FLAT, F_FUSED, F_LOCK, F_MEM, F_NF, F_REP, F_REPNE, RIPREG, SEG_NONE,
};

/// Translate `i` (decoded in `bitness`-bit mode). Returns the op and whether the block must end
/// after it (control transfers and instructions that change how code is decoded or run).
/// `need_flags` false means no flag the instruction writes is ever looked at (see
/// [`flags_needed`]): a handler that leaves the flags alone may be chosen (`F_NF`).
pub fn translate(i: &Instruction, bitness: u32, need_flags: bool) -> (Op, bool) {
    let mut op = Op::new(system::ud_op, i.len() as u8);
    if i.is_invalid() {
        return (op, true);
    }
    let d = Dec {
        i,
        bits: bitness,
        need_flags,
    };
    match d.build(&mut op) {
        Some(ends) => (op, ends),
        None => {
            let mut op = Op::new(system::undefined, i.len() as u8);
            op.imm = i.code() as u64;
            (op, true)
        }
    }
}

/// A general-purpose register as an `Op` register number (AH/CH/DH/BH are 16-19).
fn gpr(r: Register) -> Option<u8> {
    if r.is_gpr8() {
        let n = r.number();
        return Some(if (4..8).contains(&n) {
            16 + (n - 4) as u8
        } else {
            r.full_register().number() as u8
        });
    }
    if r.is_gpr16() || r.is_gpr32() || r.is_gpr64() {
        return Some(r.full_register().number() as u8);
    }
    None
}

fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

fn valid_size(s: u8) -> Option<u8> {
    matches!(s, 1 | 2 | 4 | 8).then_some(s)
}

/// Condition code in x86 encoding order (O, NO, B, AE, E, NE, BE, A, S, NS, P, NP, L, GE,
/// LE, G).
fn cc(i: &Instruction) -> Option<u8> {
    match i.condition_code() {
        ConditionCode::None => None,
        c => Some(c as u8 - 1),
    }
}

macro_rules! forms {
    ($m:ident :: $f:ident, $op:expr, $s:literal, $form:expr) => {
        match $form {
            RR => $m::$f::<{ $op }, $s, { RR }> as Handler,
            RM => $m::$f::<{ $op }, $s, { RM }>,
            MR => $m::$f::<{ $op }, $s, { MR }>,
            RI => $m::$f::<{ $op }, $s, { RI }>,
            _ => $m::$f::<{ $op }, $s, { MI }>,
        }
    };
}

macro_rules! sizes {
    ($m:ident :: $f:ident, $op:expr, $s:expr, $form:expr) => {
        match $s {
            1 => forms!($m::$f, $op, 1, $form),
            2 => forms!($m::$f, $op, 2, $form),
            4 => forms!($m::$f, $op, 4, $form),
            _ => forms!($m::$f, $op, 8, $form),
        }
    };
}

macro_rules! nf_forms {
    ($op:expr, $s:literal, $form:expr) => {
        match $form {
            RR => alu::alu_nf::<{ $op }, $s, { RR }> as Handler,
            RI => alu::alu_nf::<{ $op }, $s, { RI }>,
            _ => alu::alu_nf::<{ $op }, $s, { RM }>,
        }
    };
}

macro_rules! nf_sizes {
    ($op:expr, $s:expr, $form:expr) => {
        match $s {
            1 => nf_forms!($op, 1, $form),
            2 => nf_forms!($op, 2, $form),
            4 => nf_forms!($op, 4, $form),
            _ => nf_forms!($op, 8, $form),
        }
    };
}

/// An ALU handler that leaves the flags alone, for forms RR, RI and RM.
fn alu_nf_handler(opid: u8, s: u8, form: u8) -> Handler {
    match opid {
        alu::ADD => nf_sizes!(alu::ADD, s, form),
        alu::OR => nf_sizes!(alu::OR, s, form),
        alu::ADC => nf_sizes!(alu::ADC, s, form),
        alu::SBB => nf_sizes!(alu::SBB, s, form),
        alu::AND => nf_sizes!(alu::AND, s, form),
        alu::SUB => nf_sizes!(alu::SUB, s, form),
        alu::XOR => nf_sizes!(alu::XOR, s, form),
        // CMP and TEST only write flags: with a memory operand the read (and its faults)
        // remains.
        _ if form == RM => nf_sizes!(alu::CMP, s, form),
        _ => data::nop,
    }
}

macro_rules! cmp_jcc_forms {
    ($op:expr, $s:literal, $form:expr) => {
        match $form {
            RR => alu::cmp_jcc::<{ $op }, $s, { RR }> as Handler,
            RM => alu::cmp_jcc::<{ $op }, $s, { RM }>,
            MR => alu::cmp_jcc::<{ $op }, $s, { MR }>,
            RI => alu::cmp_jcc::<{ $op }, $s, { RI }>,
            _ => alu::cmp_jcc::<{ $op }, $s, { MI }>,
        }
    };
}

macro_rules! cmp_jcc_sizes {
    ($op:expr, $s:expr, $form:expr) => {
        match $s {
            1 => cmp_jcc_forms!($op, 1, $form),
            2 => cmp_jcc_forms!($op, 2, $form),
            4 => cmp_jcc_forms!($op, 4, $form),
            _ => cmp_jcc_forms!($op, 8, $form),
        }
    };
}

/// One op for a CMP or TEST (decoded as `a`) followed by a Jcc (`second`, decoded as `j`) in
/// 64-bit mode, or `None` when the pair does not qualify. Most blocks end in such a pair; the
/// fused op saves a dispatch per block. See [`alu::cmp_jcc`] for the packing. The operation
/// and form are the ones the decoder recorded in `a`'s tag (`tag::ALU`).
pub fn fuse_cmp_jcc(second: &Instruction, a: &Op, j: &Op) -> Option<Op> {
    let (opid, form) = (a.jarg >> 4, a.jarg & 15);
    if a.jit != tag::ALU || !(opid == alu::CMP || opid == alu::TEST) {
        return None;
    }
    if !second.is_jcc_short_or_near() || j.size != 8 || a.flags & (F_LOCK | F_NF) != 0 {
        return None;
    }
    let mut f = *a;
    f.h = match opid {
        alu::CMP => cmp_jcc_sizes!(alu::CMP, a.size, form),
        _ => cmp_jcc_sizes!(alu::TEST, a.size, form),
    };
    f.len = a.len.checked_add(j.len)?;
    (f.jit, f.jarg) = (tag::CMP_JCC, opid << 4 | form);
    f.ext = j.ext;
    f.size2 = j.len;
    f.imm = ((j.imm as u32 as u64) << 32) | (a.imm as u32 as u64);
    if f.base == RIPREG {
        // RIP-relative to the instruction after the Jcc now.
        f.disp = f.disp.wrapping_sub(j.len as u64);
    }
    f.flags |= F_FUSED;
    Some(f)
}

fn alu_handler(opid: u8, s: u8, form: u8, lock: bool) -> Handler {
    if lock {
        return match opid {
            alu::ADD => sizes!(atomic::alu_lock, alu::ADD, s, form),
            alu::OR => sizes!(atomic::alu_lock, alu::OR, s, form),
            alu::ADC => sizes!(atomic::alu_lock, alu::ADC, s, form),
            alu::SBB => sizes!(atomic::alu_lock, alu::SBB, s, form),
            alu::AND => sizes!(atomic::alu_lock, alu::AND, s, form),
            alu::SUB => sizes!(atomic::alu_lock, alu::SUB, s, form),
            _ => sizes!(atomic::alu_lock, alu::XOR, s, form),
        };
    }
    match opid {
        alu::ADD => sizes!(alu::alu, alu::ADD, s, form),
        alu::OR => sizes!(alu::alu, alu::OR, s, form),
        alu::ADC => sizes!(alu::alu, alu::ADC, s, form),
        alu::SBB => sizes!(alu::alu, alu::SBB, s, form),
        alu::AND => sizes!(alu::alu, alu::AND, s, form),
        alu::SUB => sizes!(alu::alu, alu::SUB, s, form),
        alu::XOR => sizes!(alu::alu, alu::XOR, s, form),
        alu::CMP => sizes!(alu::alu, alu::CMP, s, form),
        _ => sizes!(alu::alu, alu::TEST, s, form),
    }
}

macro_rules! mov_sizes {
    ($s:expr, $form:expr) => {
        match $s {
            1 => mov_forms!(1, $form),
            2 => mov_forms!(2, $form),
            4 => mov_forms!(4, $form),
            _ => mov_forms!(8, $form),
        }
    };
}

macro_rules! mov_forms {
    ($s:literal, $form:expr) => {
        match $form {
            RR => data::mov::<$s, { RR }> as Handler,
            RM => data::mov::<$s, { RM }>,
            MR => data::mov::<$s, { MR }>,
            RI => data::mov::<$s, { RI }>,
            _ => data::mov::<$s, { MI }>,
        }
    };
}

macro_rules! unary_sizes {
    ($op:expr, $s:expr, $mem:expr, $lock:expr) => {
        match ($s, $mem, $lock) {
            (1, false, _) => alu::unary::<{ $op }, 1, false> as Handler,
            (2, false, _) => alu::unary::<{ $op }, 2, false>,
            (4, false, _) => alu::unary::<{ $op }, 4, false>,
            (_, false, _) => alu::unary::<{ $op }, 8, false>,
            (1, true, false) => alu::unary::<{ $op }, 1, true>,
            (2, true, false) => alu::unary::<{ $op }, 2, true>,
            (4, true, false) => alu::unary::<{ $op }, 4, true>,
            (_, true, false) => alu::unary::<{ $op }, 8, true>,
            (1, true, true) => atomic::unary_lock::<{ $op }, 1>,
            (2, true, true) => atomic::unary_lock::<{ $op }, 2>,
            (4, true, true) => atomic::unary_lock::<{ $op }, 4>,
            (_, true, true) => atomic::unary_lock::<{ $op }, 8>,
        }
    };
}

macro_rules! unary_nf_sizes {
    ($op:expr, $s:expr) => {
        match $s {
            1 => alu::unary_nf::<{ $op }, 1> as Handler,
            2 => alu::unary_nf::<{ $op }, 2>,
            4 => alu::unary_nf::<{ $op }, 4>,
            _ => alu::unary_nf::<{ $op }, 8>,
        }
    };
}

macro_rules! shift_nf_sizes {
    ($k:expr, $s:expr) => {
        match $s {
            1 => shift::shift_nf::<{ $k }, 1> as Handler,
            2 => shift::shift_nf::<{ $k }, 2>,
            4 => shift::shift_nf::<{ $k }, 4>,
            _ => shift::shift_nf::<{ $k }, 8>,
        }
    };
}

macro_rules! shift_sizes {
    ($k:expr, $s:expr) => {
        match $s {
            1 => shift::shift::<{ $k }, 1> as Handler,
            2 => shift::shift::<{ $k }, 2>,
            4 => shift::shift::<{ $k }, 4>,
            _ => shift::shift::<{ $k }, 8>,
        }
    };
}

fn movx_handler(d: u8, s: u8, signed: bool, mem: bool) -> Handler {
    macro_rules! m {
        ($d:literal, $s:literal) => {
            match (signed, mem) {
                (false, false) => data::movx::<$d, $s, false, false> as Handler,
                (false, true) => data::movx::<$d, $s, false, true>,
                (true, false) => data::movx::<$d, $s, true, false>,
                (true, true) => data::movx::<$d, $s, true, true>,
            }
        };
    }
    match (d, s) {
        (2, 1) => m!(2, 1),
        (4, 1) => m!(4, 1),
        (8, 1) => m!(8, 1),
        (2, 2) => m!(2, 2),
        (4, 2) => m!(4, 2),
        (8, 2) => m!(8, 2),
        (4, 4) => m!(4, 4),
        _ => m!(8, 4),
    }
}

/// The six arithmetic flags in iced's `RflagsBits` encoding (OF, SF, ZF, AF, CF, PF).
const ARITH_FLAGS: u32 = 0x3f;

/// How one instruction uses the arithmetic flags, for [`flags_needed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlagUse {
    /// Flags it reads.
    reads: u32,
    /// Flags it may write.
    writes: u32,
    /// Flags it always writes (a shift by CL writes none when the count is 0).
    kills: u32,
    /// It may fault: the flags before it must be exact (an exception pushes them).
    fault: bool,
    /// It may end the block once done (a store may hit the block, a system instruction may
    /// stop): the flags after it must be exact.
    end: bool,
}

/// Register-only forms of these run without faulting and never end a block early; with a
/// memory operand they may fault, and they may end the block when they store.
fn plain_data_op(m: M) -> bool {
    matches!(
        m,
        M::Add
            | M::Or
            | M::Adc
            | M::Sbb
            | M::And
            | M::Sub
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Not
            | M::Neg
            | M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Lea
            | M::Rol
            | M::Ror
            | M::Rcl
            | M::Rcr
            | M::Shl
            | M::Sal
            | M::Shr
            | M::Sar
            | M::Shld
            | M::Shrd
            | M::Imul
            | M::Bswap
            | M::Bt
            | M::Bsf
            | M::Bsr
            | M::Cbw
            | M::Cwde
            | M::Cdqe
            | M::Cwd
            | M::Cdq
            | M::Cqo
            | M::Nop
            | M::Cmova
            | M::Cmovae
            | M::Cmovb
            | M::Cmovbe
            | M::Cmove
            | M::Cmovg
            | M::Cmovge
            | M::Cmovl
            | M::Cmovle
            | M::Cmovne
            | M::Cmovno
            | M::Cmovnp
            | M::Cmovns
            | M::Cmovo
            | M::Cmovp
            | M::Cmovs
            | M::Seta
            | M::Setae
            | M::Setb
            | M::Setbe
            | M::Sete
            | M::Setg
            | M::Setge
            | M::Setl
            | M::Setle
            | M::Setne
            | M::Setno
            | M::Setnp
            | M::Setns
            | M::Seto
            | M::Setp
            | M::Sets
    )
}

fn flag_use(i: &Instruction) -> FlagUse {
    let m = i.mnemonic();
    let ops = i.op_count();
    let mut mem = false;
    let mut plain = plain_data_op(m) && !i.has_lock_prefix() && ops <= 3;
    for n in 0..ops {
        match i.op_kind(n) {
            OpKind::Memory => mem = true,
            OpKind::Register => plain &= gpr(i.op_register(n)).is_some(),
            k if is_imm(k) => {}
            _ => plain = false,
        }
    }
    if !plain {
        return FlagUse {
            reads: ARITH_FLAGS,
            writes: ARITH_FLAGS,
            kills: 0,
            fault: true,
            end: true,
        };
    }
    let writes = i.rflags_modified() & ARITH_FLAGS;
    let count_by_cl = matches!(
        m,
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar | M::Shld | M::Shrd
    ) && (0..ops)
        .any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n) == Register::CL);
    // Only the first operand is ever written to memory by these; CMP, TEST and BT only read.
    let stores = mem && i.op_kind(0) == OpKind::Memory && !matches!(m, M::Cmp | M::Test | M::Bt);
    FlagUse {
        reads: i.rflags_read() & ARITH_FLAGS,
        writes,
        kills: if count_by_cl { 0 } else { writes },
        fault: mem,
        end: stores,
    }
}

/// For each instruction of a block, whether any flag it writes may be looked at afterwards: by
/// a later instruction of the block, after the block (every flag is live at its end), or
/// because something can stop in between (a fault, a store into the block, a system
/// instruction). An instruction whose flags are dead may skip computing them.
pub fn flags_needed(block: &[Instruction], out: &mut [bool]) {
    let mut live = ARITH_FLAGS;
    for (i, need) in block.iter().zip(out.iter_mut()).rev() {
        let u = flag_use(i);
        let after = if u.end { ARITH_FLAGS } else { live };
        *need = u.writes & after != 0;
        live = if u.fault {
            ARITH_FLAGS
        } else {
            (after & !u.kills) | u.reads
        };
    }
}

struct Dec<'a> {
    i: &'a Instruction,
    bits: u32,
    need_flags: bool,
}

impl Dec<'_> {
    fn kind(&self, n: u32) -> OpKind {
        if n < self.i.op_count() {
            self.i.op_kind(n)
        } else {
            OpKind::Register
        }
    }

    fn reg(&self, n: u32) -> Register {
        if n < self.i.op_count() && self.i.op_kind(n) == OpKind::Register {
            self.i.op_register(n)
        } else {
            Register::None
        }
    }

    fn gpr(&self, n: u32) -> Option<u8> {
        gpr(self.reg(n))
    }

    /// Size in bytes of operand `n` (register or memory).
    fn size(&self, n: u32) -> Option<u8> {
        match self.kind(n) {
            OpKind::Register => valid_size(self.reg(n).size() as u8),
            OpKind::Memory => valid_size(self.i.memory_size().size() as u8),
            _ => None,
        }
    }

    fn seg_of(&self, s: Register) -> u8 {
        let n = if s.is_segment_register() {
            s.number() as u8
        } else {
            3
        };
        if self.bits == 64 && n != 4 && n != 5 {
            SEG_NONE
        } else {
            n
        }
    }

    /// Fill the memory operand of `op`.
    fn mem(&self, op: &mut Op) {
        let i = self.i;
        op.flags |= F_MEM;
        let base = i.memory_base();
        let index = i.memory_index();
        let mut asize = 0u8;
        if base == Register::RIP || base == Register::EIP {
            op.base = RIPREG;
            op.disp = i.memory_displacement64().wrapping_sub(i.next_ip());
            asize = if base == Register::RIP { 8 } else { 4 };
        } else {
            op.disp = i.memory_displacement64();
            if let Some(b) = gpr(base) {
                op.base = b;
                asize = base.size() as u8;
            }
        }
        if let Some(x) = gpr(index) {
            op.index = x;
            op.scale = i.memory_index_scale().trailing_zeros() as u8;
            if asize == 0 {
                asize = index.size() as u8;
            }
        }
        if asize == 0 {
            asize = if self.bits == 64 {
                8
            } else if i.memory_displ_size() == 2 {
                2
            } else {
                4
            };
        }
        op.asize = asize;
        op.seg = self.seg_of(i.memory_segment());
        if self.bits == 64 && asize == 8 && op.seg == SEG_NONE {
            op.flags |= F_FLAT;
        }
    }

    /// Put operand `n` (register or memory) in the r/m slot.
    fn rm(&self, op: &mut Op, n: u32) -> Option<()> {
        match self.kind(n) {
            OpKind::Register => op.r2 = self.gpr(n)?,
            OpKind::Memory => {}
            _ => return None,
        }
        Some(())
    }

    /// Branch displacement relative to the next instruction, and the operand size.
    fn near_branch(&self, op: &mut Op) -> Option<()> {
        let i = self.i;
        op.size = match self.kind(0) {
            OpKind::NearBranch16 => 2,
            OpKind::NearBranch32 => 4,
            OpKind::NearBranch64 => 8,
            _ => return None,
        };
        op.imm = i.near_branch_target().wrapping_sub(i.next_ip());
        Some(())
    }

    fn build(&self, op: &mut Op) -> Option<bool> {
        let i = self.i;
        if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
            self.mem(op);
        }
        let lock = i.has_lock_prefix();
        if lock {
            op.flags |= F_LOCK;
        }
        if fpu::owns(i) {
            op.h = fpu::translate(i, op);
            return Some(false);
        }
        let m = i.mnemonic();
        let mem = op.is_mem();
        match m {
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
                let opid = match m {
                    M::Add => alu::ADD,
                    M::Or => alu::OR,
                    M::Adc => alu::ADC,
                    M::Sbb => alu::SBB,
                    M::And => alu::AND,
                    M::Sub => alu::SUB,
                    M::Xor => alu::XOR,
                    M::Cmp => alu::CMP,
                    _ => alu::TEST,
                };
                let s = self.size(0)?;
                let form = match (self.kind(0), self.kind(1)) {
                    (OpKind::Register, OpKind::Register) => {
                        op.r1 = self.gpr(0)?;
                        op.r2 = self.gpr(1)?;
                        RR
                    }
                    (OpKind::Register, OpKind::Memory) => {
                        op.r1 = self.gpr(0)?;
                        RM
                    }
                    (OpKind::Memory, OpKind::Register) => {
                        op.r1 = self.gpr(1)?;
                        MR
                    }
                    (OpKind::Register, k) if is_imm(k) => {
                        op.r1 = self.gpr(0)?;
                        op.imm = i.immediate(1);
                        RI
                    }
                    (OpKind::Memory, k) if is_imm(k) => {
                        op.imm = i.immediate(1);
                        MI
                    }
                    _ => return None,
                };
                op.size = s;
                let lock = lock && (form == MR || form == MI) && opid != alu::CMP;
                op.h = if !lock && !self.need_flags && matches!(form, RR | RI | RM) {
                    op.flags |= F_NF;
                    alu_nf_handler(opid, s, form)
                } else {
                    alu_handler(opid, s, form, lock)
                };
                if !lock {
                    let dead = op.flags & F_NF != 0 && form != RM && !alu::writes(opid);
                    op.jit = if dead { tag::NOP } else { tag::ALU };
                    op.jarg = opid << 4 | form;
                } else if self.bits == 64 && opid != alu::ADC && opid != alu::SBB {
                    op.jit = tag::LOCK_ALU;
                    op.jarg = opid << 4 | form;
                }
                Some(false)
            }
            M::Inc | M::Dec | M::Not | M::Neg => {
                let s = self.size(0)?;
                op.size = s;
                if !mem {
                    op.r1 = self.gpr(0)?;
                }
                op.h = match m {
                    M::Inc if !mem && !self.need_flags => unary_nf_sizes!(alu::INC, s),
                    M::Dec if !mem && !self.need_flags => unary_nf_sizes!(alu::DEC, s),
                    M::Neg if !mem && !self.need_flags => unary_nf_sizes!(alu::NEG, s),
                    M::Inc => unary_sizes!(alu::INC, s, mem, lock),
                    M::Dec => unary_sizes!(alu::DEC, s, mem, lock),
                    M::Not => unary_sizes!(alu::NOT, s, mem, lock),
                    _ => unary_sizes!(alu::NEG, s, mem, lock),
                };
                // The memory forms' handlers record the flags anyway; the JIT skips them.
                if !self.need_flags && m != M::Not {
                    op.flags |= F_NF;
                }
                if self.bits == 64 && (mem || !lock) {
                    op.jit = tag::UNARY;
                    op.jarg = match m {
                        M::Inc => alu::INC,
                        M::Dec => alu::DEC,
                        M::Not => alu::NOT,
                        _ => alu::NEG,
                    };
                }
                Some(false)
            }
            M::Mov => self.mov(op),
            M::Movzx | M::Movsx | M::Movsxd => {
                op.r1 = self.gpr(0)?;
                let d = self.size(0)?;
                let s = self.size(1)?;
                self.rm(op, 1)?;
                if !matches!(
                    (d, s),
                    (2, 1) | (4, 1) | (8, 1) | (2, 2) | (4, 2) | (8, 2) | (4, 4) | (8, 4)
                ) {
                    return None;
                }
                op.size = d;
                op.size2 = s;
                op.h = movx_handler(d, s, m != M::Movzx, mem);
                op.jit = tag::MOVX;
                op.jarg = s | if m != M::Movzx { 0x10 } else { 0 } | if mem { 0x20 } else { 0 };
                Some(false)
            }
            M::Lea => {
                op.r1 = self.gpr(0)?;
                let s = self.size(0)?;
                op.size = s;
                op.h = match s {
                    2 => data::lea::<2>,
                    4 => data::lea::<4>,
                    _ => data::lea::<8>,
                };
                op.jit = tag::LEA;
                Some(false)
            }
            M::Xchg => {
                let s = self.size(0)?;
                op.size = s;
                match (self.kind(0), self.kind(1)) {
                    (OpKind::Register, OpKind::Register) => {
                        op.r1 = self.gpr(0)?;
                        op.r2 = self.gpr(1)?;
                        op.h = atomic::xchg_rr;
                    }
                    (OpKind::Memory, OpKind::Register) => {
                        op.r1 = self.gpr(1)?;
                        op.h = atomic::xchg_mr;
                    }
                    (OpKind::Register, OpKind::Memory) => {
                        op.r1 = self.gpr(0)?;
                        op.h = atomic::xchg_mr;
                    }
                    _ => return None,
                }
                Some(false)
            }
            M::Cmova
            | M::Cmovae
            | M::Cmovb
            | M::Cmovbe
            | M::Cmove
            | M::Cmovg
            | M::Cmovge
            | M::Cmovl
            | M::Cmovle
            | M::Cmovne
            | M::Cmovno
            | M::Cmovnp
            | M::Cmovns
            | M::Cmovo
            | M::Cmovp
            | M::Cmovs => {
                op.r1 = self.gpr(0)?;
                op.size = self.size(0)?;
                self.rm(op, 1)?;
                op.ext = cc(i)?;
                op.h = data::cmov;
                if self.bits == 64 && op.flags & F_MEM == 0 {
                    op.jit = tag::CMOV;
                }
                Some(false)
            }
            M::Seta
            | M::Setae
            | M::Setb
            | M::Setbe
            | M::Sete
            | M::Setg
            | M::Setge
            | M::Setl
            | M::Setle
            | M::Setne
            | M::Setno
            | M::Setnp
            | M::Setns
            | M::Seto
            | M::Setp
            | M::Sets => {
                self.rm(op, 0)?;
                op.size = 1;
                op.ext = cc(i)?;
                op.h = data::setcc;
                if self.bits == 64 && !mem {
                    op.jit = tag::SETCC;
                }
                Some(false)
            }
            M::Ja
            | M::Jae
            | M::Jb
            | M::Jbe
            | M::Je
            | M::Jg
            | M::Jge
            | M::Jl
            | M::Jle
            | M::Jne
            | M::Jno
            | M::Jnp
            | M::Jns
            | M::Jo
            | M::Jp
            | M::Js => {
                self.near_branch(op)?;
                op.ext = cc(i)?;
                op.h = branch::jcc;
                if self.bits == 64 {
                    op.jit = tag::JCC;
                }
                Some(true)
            }
            M::Jmp | M::Call => self.jmp_call(op, m == M::Call),
            M::Ret => {
                op.imm = if i.op_count() > 0 { i.immediate(0) } else { 0 };
                op.size = valid_size((i.stack_pointer_increment() as i64 - op.imm as i64) as u8)?;
                op.h = if self.bits == 64 && op.size == 8 {
                    op.jit = tag::RET;
                    branch::ret64
                } else {
                    branch::ret
                };
                Some(true)
            }
            M::Retf => {
                op.imm = if i.op_count() > 0 { i.immediate(0) } else { 0 };
                op.size = match i.code() {
                    Code::Retfw | Code::Retfw_imm16 => 2,
                    Code::Retfd | Code::Retfd_imm16 => 4,
                    _ => 8,
                };
                op.h = system::retf;
                Some(true)
            }
            M::Iret | M::Iretd | M::Iretq => {
                op.size = match m {
                    M::Iret => 2,
                    M::Iretd => 4,
                    _ => 8,
                };
                op.h = super::interrupt::iret;
                Some(true)
            }
            M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz | M::Jrcxz => {
                self.near_branch(op)?;
                op.ext = match m {
                    M::Loop => 0,
                    M::Loope => 1,
                    M::Loopne => 2,
                    _ => 3,
                };
                op.asize = match m {
                    M::Jcxz => 2,
                    M::Jecxz => 4,
                    M::Jrcxz => 8,
                    // LOOPcc counts in CX, ECX or RCX by address size (SDM Vol. 2A "LOOP").
                    _ => {
                        use iced_x86::Code as C;
                        match i.code() {
                            C::Loop_rel8_16_RCX
                            | C::Loop_rel8_64_RCX
                            | C::Loope_rel8_16_RCX
                            | C::Loope_rel8_64_RCX
                            | C::Loopne_rel8_16_RCX
                            | C::Loopne_rel8_64_RCX => 8,
                            C::Loop_rel8_16_ECX
                            | C::Loop_rel8_32_ECX
                            | C::Loop_rel8_64_ECX
                            | C::Loope_rel8_16_ECX
                            | C::Loope_rel8_32_ECX
                            | C::Loope_rel8_64_ECX
                            | C::Loopne_rel8_16_ECX
                            | C::Loopne_rel8_32_ECX
                            | C::Loopne_rel8_64_ECX => 4,
                            _ => 2,
                        }
                    }
                };
                op.h = branch::loop_op;
                Some(true)
            }
            M::Push => {
                op.size = valid_size((-i.stack_pointer_increment()) as u8)?;
                match self.kind(0) {
                    OpKind::Register if self.reg(0).is_segment_register() => {
                        op.ext = self.reg(0).number() as u8;
                        op.h = system::push_sreg;
                    }
                    OpKind::Register => {
                        op.r1 = self.gpr(0)?;
                        op.h = if self.bits == 64 && op.size == 8 {
                            op.jit = tag::PUSH;
                            stack::push_r64
                        } else {
                            stack::push_r
                        };
                    }
                    OpKind::Memory => op.h = stack::push_m,
                    k if is_imm(k) => {
                        op.imm = i.immediate(0);
                        op.h = stack::push_i;
                    }
                    _ => return None,
                }
                Some(false)
            }
            M::Pop => {
                op.size = valid_size(i.stack_pointer_increment() as u8)?;
                match self.kind(0) {
                    OpKind::Register if self.reg(0).is_segment_register() => {
                        op.ext = self.reg(0).number() as u8;
                        op.h = system::pop_sreg;
                        return Some(true);
                    }
                    OpKind::Register => {
                        op.r1 = self.gpr(0)?;
                        op.h = if self.bits == 64 && op.size == 8 {
                            op.jit = tag::POP;
                            stack::pop_r64
                        } else {
                            stack::pop_r
                        };
                    }
                    OpKind::Memory => op.h = stack::pop_m,
                    _ => return None,
                }
                Some(false)
            }
            M::Pushf | M::Pushfd | M::Pushfq => {
                op.size = valid_size((-i.stack_pointer_increment()) as u8)?;
                op.h = stack::pushf;
                Some(false)
            }
            M::Popf | M::Popfd | M::Popfq => {
                op.size = valid_size(i.stack_pointer_increment() as u8)?;
                op.h = stack::popf;
                Some(true)
            }
            M::Pusha | M::Pushad => {
                op.size = if m == M::Pusha { 2 } else { 4 };
                op.h = stack::pusha;
                Some(false)
            }
            M::Popa | M::Popad => {
                op.size = if m == M::Popa { 2 } else { 4 };
                op.h = stack::popa;
                Some(false)
            }
            M::Enter => {
                op.size = match i.code() {
                    Code::Enterw_imm16_imm8 => 2,
                    Code::Enterd_imm16_imm8 => 4,
                    _ => 8,
                };
                op.imm = i.immediate(0);
                op.ext = i.immediate(1) as u8;
                op.h = stack::enter;
                Some(false)
            }
            M::Leave => {
                op.size = match i.code() {
                    Code::Leavew => 2,
                    Code::Leaved => 4,
                    _ => 8,
                };
                op.h = stack::leave;
                Some(false)
            }
            M::Mul | M::Div | M::Idiv => {
                op.size = self.size(0)?;
                self.rm(op, 0)?;
                op.ext = (m != M::Mul && m != M::Div) as u8;
                op.h = if m == M::Mul {
                    muldiv::mul1
                } else {
                    muldiv::div
                };
                if m == M::Mul && self.bits == 64 {
                    op.jit = tag::MUL1;
                }
                Some(false)
            }
            M::Imul => {
                op.size = self.size(0)?;
                match i.op_count() {
                    1 => {
                        self.rm(op, 0)?;
                        op.ext = 1;
                        op.h = muldiv::mul1;
                    }
                    2 => {
                        op.r1 = self.gpr(0)?;
                        self.rm(op, 1)?;
                        op.ext = 2;
                        op.h = muldiv::imul;
                    }
                    _ => {
                        op.r1 = self.gpr(0)?;
                        self.rm(op, 1)?;
                        op.imm = i.immediate(2);
                        op.ext = 3;
                        op.h = muldiv::imul;
                    }
                }
                if self.bits == 64 {
                    op.jit = if op.ext >= 2 { tag::IMUL } else { tag::MUL1 };
                }
                Some(false)
            }
            M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
                let s = self.size(0)?;
                op.size = s;
                self.rm(op, 0)?;
                match self.kind(1) {
                    OpKind::Register if self.reg(1) == Register::CL => op.flags |= F_CL,
                    k if is_imm(k) => op.imm = i.immediate(1),
                    _ => return None,
                }
                if !mem {
                    // The JIT translates SHL/SHR/SAR of a register by an immediate, with or
                    // without their flags, by CL without them, and ROL/ROR without them.
                    op.jit = tag::SHIFT;
                    op.jarg = match m {
                        M::Shl | M::Sal => shift::SHL,
                        M::Shr => shift::SHR,
                        M::Sar => shift::SAR,
                        M::Rol => shift::ROL,
                        M::Ror => shift::ROR,
                        M::Rcl => shift::RCL,
                        _ => shift::RCR,
                    };
                }
                op.h = if !mem && !self.need_flags {
                    op.flags |= F_NF;
                    match m {
                        M::Rol => shift_nf_sizes!(shift::ROL, s),
                        M::Ror => shift_nf_sizes!(shift::ROR, s),
                        M::Rcl => shift_nf_sizes!(shift::RCL, s),
                        M::Rcr => shift_nf_sizes!(shift::RCR, s),
                        M::Shl | M::Sal => shift_nf_sizes!(shift::SHL, s),
                        M::Shr => shift_nf_sizes!(shift::SHR, s),
                        _ => shift_nf_sizes!(shift::SAR, s),
                    }
                } else {
                    match m {
                        M::Rol => shift_sizes!(shift::ROL, s),
                        M::Ror => shift_sizes!(shift::ROR, s),
                        M::Rcl => shift_sizes!(shift::RCL, s),
                        M::Rcr => shift_sizes!(shift::RCR, s),
                        M::Shl | M::Sal => shift_sizes!(shift::SHL, s),
                        M::Shr => shift_sizes!(shift::SHR, s),
                        _ => shift_sizes!(shift::SAR, s),
                    }
                };
                Some(false)
            }
            M::Shld | M::Shrd => {
                op.size = self.size(0)?;
                self.rm(op, 0)?;
                op.r1 = self.gpr(1)?;
                match self.kind(2) {
                    OpKind::Register if self.reg(2) == Register::CL => op.flags |= F_CL,
                    k if is_imm(k) => op.imm = i.immediate(2),
                    _ => return None,
                }
                op.ext = (m == M::Shrd) as u8;
                op.h = shift::shxd;
                Some(false)
            }
            M::Bt | M::Bts | M::Btr | M::Btc => {
                op.size = self.size(0)?;
                self.rm(op, 0)?;
                op.ext = match m {
                    M::Bt => 0,
                    M::Bts => 1,
                    M::Btr => 2,
                    _ => 3,
                };
                match self.kind(1) {
                    OpKind::Register => op.r1 = self.gpr(1)?,
                    k if is_imm(k) => {
                        op.imm = i.immediate(1);
                        op.ext |= bits::BT_IMM;
                    }
                    _ => return None,
                }
                op.h = bits::bt;
                if self.bits == 64 && (!mem || op.ext & bits::BT_IMM != 0) {
                    op.jit = tag::BT;
                }
                Some(false)
            }
            M::Bsf | M::Bsr | M::Popcnt => {
                op.size = self.size(0)?;
                op.r1 = self.gpr(0)?;
                self.rm(op, 1)?;
                op.ext = (m == M::Bsr) as u8;
                op.h = if m == M::Popcnt {
                    bits::popcnt
                } else {
                    bits::bsf
                };
                Some(false)
            }
            M::Bswap => {
                op.size = self.size(0)?;
                op.r1 = self.gpr(0)?;
                op.h = data::bswap;
                Some(false)
            }
            M::Cbw | M::Cwde | M::Cdqe | M::Cwd | M::Cdq | M::Cqo => {
                op.size = match m {
                    M::Cbw | M::Cwd => 2,
                    M::Cwde | M::Cdq => 4,
                    _ => 8,
                };
                let widen = matches!(m, M::Cbw | M::Cwde | M::Cdqe);
                op.h = if widen { data::cbw } else { data::cwd };
                op.jit = if widen { tag::CBW } else { tag::CWD };
                Some(false)
            }
            M::Xadd | M::Cmpxchg => {
                op.size = self.size(0)?;
                self.rm(op, 0)?;
                op.r1 = self.gpr(1)?;
                op.h = if m == M::Xadd {
                    atomic::xadd
                } else {
                    atomic::cmpxchg
                };
                if self.bits == 64 && mem {
                    op.jit = if m == M::Xadd {
                        tag::XADD
                    } else {
                        tag::CMPXCHG
                    };
                }
                Some(false)
            }
            M::Cmpxchg8b | M::Cmpxchg16b => {
                if !mem {
                    return None;
                }
                op.size = if m == M::Cmpxchg8b { 4 } else { 8 };
                op.h = atomic::cmpxchg_wide;
                Some(false)
            }
            M::Lahf => Some(self.simple(op, data::lahf, 0, false)),
            M::Sahf => Some(self.simple(op, data::sahf, 0, false)),
            M::Clc => Some(self.simple(op, data::carry_op, 0, false)),
            M::Stc => Some(self.simple(op, data::carry_op, 1, false)),
            M::Cmc => Some(self.simple(op, data::carry_op, 2, false)),
            M::Cld => Some(self.simple(op, data::dir_op, 0, false)),
            M::Std => Some(self.simple(op, data::dir_op, 1, false)),
            M::Cli => Some(self.simple(op, system::cli_sti, 0, false)),
            M::Sti => Some(self.simple(op, system::cli_sti, 1, true)),
            M::Pause => Some(self.simple(op, data::pause, 0, false)),
            M::Nop
            | M::Endbr64
            | M::Endbr32
            | M::Prefetch
            | M::Prefetchw
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchnta
            | M::Reservednop
            | M::Wait => {
                op.jit = tag::NOP;
                Some(self.simple(op, data::nop, 0, false))
            }
            M::Lfence | M::Mfence | M::Sfence => Some(self.simple(op, data::fence, 0, false)),
            M::Clflush | M::Clflushopt | M::Clwb => {
                op.h = system::clflush;
                Some(false)
            }
            M::Wbinvd | M::Invd => Some(self.simple(op, system::wbinvd, 0, false)),
            M::Xlatb => {
                let base = i.memory_base();
                op.asize = valid_size(base.size() as u8).unwrap_or(8);
                op.seg = self.seg_of(i.memory_segment());
                op.flags &= !F_MEM;
                op.h = data::xlat;
                Some(false)
            }
            M::Movsb | M::Movsw | M::Movsd | M::Movsq => self.string(op, string::MOVS),
            M::Stosb | M::Stosw | M::Stosd | M::Stosq => self.string(op, string::STOS),
            M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => self.string(op, string::LODS),
            M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => self.string(op, string::CMPS),
            M::Scasb | M::Scasw | M::Scasd | M::Scasq => self.string(op, string::SCAS),
            M::Insb | M::Insw | M::Insd => self.string(op, string::INS),
            M::Outsb | M::Outsw | M::Outsd => self.string(op, string::OUTS),
            M::In | M::Out => {
                let (data_n, port_n) = if m == M::In { (0, 1) } else { (1, 0) };
                op.size = self.size(data_n)?;
                match self.kind(port_n) {
                    OpKind::Register => op.flags |= F_CL,
                    k if is_imm(k) => op.imm = i.immediate(port_n),
                    _ => return None,
                }
                op.ext = (m == M::Out) as u8;
                op.h = system::in_out;
                Some(false)
            }
            M::Int => {
                op.imm = i.immediate(0);
                Some(self.simple(op, system::int_n, 0, true))
            }
            M::Int1 => Some(self.simple(op, system::int_n, 1, true)),
            M::Int3 => Some(self.simple(op, system::int_n, 3, true)),
            M::Into => Some(self.simple(op, system::int_n, 4, true)),
            M::Hlt => Some(self.simple(op, system::hlt, 0, true)),
            M::Cpuid => Some(self.simple(op, system::cpuid, 0, false)),
            M::Rdtsc => Some(self.simple(op, system::rdtsc, 0, false)),
            M::Rdtscp => Some(self.simple(op, system::rdtsc, 1, false)),
            M::Rdmsr => Some(self.simple(op, system::rdmsr, 0, false)),
            M::Wrmsr => Some(self.simple(op, system::wrmsr, 0, true)),
            M::Rdpmc => Some(self.simple(op, system::rdpmc, 0, false)),
            M::Swapgs => Some(self.simple(op, system::swapgs, 0, false)),
            M::Syscall => Some(self.simple(op, system::syscall, 0, true)),
            M::Sysret | M::Sysretq => {
                op.size = if m == M::Sysretq { 8 } else { 4 };
                op.h = system::sysret;
                Some(true)
            }
            M::Lgdt | M::Lidt | M::Sgdt | M::Sidt => {
                if !mem {
                    return None;
                }
                op.size = match i.code() {
                    Code::Lgdt_m1632_16
                    | Code::Lidt_m1632_16
                    | Code::Sgdt_m1632_16
                    | Code::Sidt_m1632_16 => 2,
                    Code::Lgdt_m1664 | Code::Lidt_m1664 | Code::Sgdt_m1664 | Code::Sidt_m1664 => 8,
                    _ => 4,
                };
                op.ext = matches!(m, M::Lidt | M::Sidt) as u8;
                let load = matches!(m, M::Lgdt | M::Lidt);
                op.h = if load {
                    system::load_dt
                } else {
                    system::store_dt
                };
                Some(load)
            }
            M::Lldt | M::Ltr => {
                self.rm(op, 0)?;
                op.ext = (m == M::Ltr) as u8;
                op.h = system::load_system_seg;
                Some(true)
            }
            M::Sldt | M::Str | M::Smsw => {
                self.rm(op, 0)?;
                op.size = if mem { 2 } else { self.size(0)? };
                op.ext = (m == M::Str) as u8;
                op.h = if m == M::Smsw {
                    system::smsw
                } else {
                    system::store_system_seg
                };
                Some(false)
            }
            M::Lmsw => {
                self.rm(op, 0)?;
                op.h = system::lmsw;
                Some(true)
            }
            M::Clts => Some(self.simple(op, system::clts, 0, true)),
            M::Invlpg => {
                if !mem {
                    return None;
                }
                op.h = system::invlpg;
                Some(true)
            }
            M::Lar | M::Lsl => {
                op.r1 = self.gpr(0)?;
                op.size = self.size(0)?;
                self.rm(op, 1)?;
                op.ext = (m == M::Lsl) as u8;
                op.h = system::lar_lsl;
                Some(false)
            }
            M::Verr | M::Verw => {
                self.rm(op, 0)?;
                op.ext = (m == M::Verw) as u8;
                op.h = system::verr_verw;
                Some(false)
            }
            M::Lds | M::Les | M::Lss | M::Lfs | M::Lgs => {
                if !mem {
                    return None;
                }
                op.r1 = self.gpr(0)?;
                op.size = self.size(0)?;
                op.ext = match m {
                    M::Les => 0,
                    M::Lss => 2,
                    M::Lds => 3,
                    M::Lfs => 4,
                    _ => 5,
                };
                op.h = system::load_far_ptr;
                Some(true)
            }
            M::Ud0 | M::Ud1 | M::Ud2 | M::Sysenter | M::Sysexit => {
                op.h = system::ud_op;
                Some(true)
            }
            _ => None,
        }
    }

    /// An op with no operands (or operands already filled in).
    fn simple(&self, op: &mut Op, h: Handler, ext: u8, ends: bool) -> bool {
        op.h = h;
        op.ext = ext;
        ends
    }

    fn mov(&self, op: &mut Op) -> Option<bool> {
        let i = self.i;
        let (k0, k1) = (self.kind(0), self.kind(1));
        let (r0, r1) = (self.reg(0), self.reg(1));
        if k0 == OpKind::Register && (r0.is_cr() || r0.is_dr()) {
            op.ext = r0.number() as u8;
            op.r2 = gpr(r1)?;
            op.size = valid_size(r1.size() as u8)?;
            op.h = if r0.is_cr() {
                system::mov_to_cr
            } else {
                system::mov_to_dr
            };
            return Some(true);
        }
        if k1 == OpKind::Register && (r1.is_cr() || r1.is_dr()) {
            op.ext = r1.number() as u8;
            op.r2 = gpr(r0)?;
            op.size = valid_size(r0.size() as u8)?;
            op.h = if r1.is_cr() {
                system::mov_from_cr
            } else {
                system::mov_from_dr
            };
            return Some(false);
        }
        if k0 == OpKind::Register && r0.is_segment_register() {
            op.ext = r0.number() as u8;
            self.rm(op, 1)?;
            op.h = system::mov_to_sreg;
            return Some(true);
        }
        if k1 == OpKind::Register && r1.is_segment_register() {
            op.ext = r1.number() as u8;
            self.rm(op, 0)?;
            op.size = if op.is_mem() { 2 } else { self.size(0)? };
            op.h = system::mov_from_sreg;
            return Some(false);
        }
        let s = self.size(0)?;
        let form = match (k0, k1) {
            (OpKind::Register, OpKind::Register) => {
                op.r1 = gpr(r0)?;
                op.r2 = gpr(r1)?;
                RR
            }
            (OpKind::Register, OpKind::Memory) => {
                op.r1 = gpr(r0)?;
                RM
            }
            (OpKind::Memory, OpKind::Register) => {
                op.r1 = gpr(r1)?;
                MR
            }
            (OpKind::Register, k) if is_imm(k) => {
                op.r1 = gpr(r0)?;
                op.imm = i.immediate(1);
                RI
            }
            (OpKind::Memory, k) if is_imm(k) => {
                op.imm = i.immediate(1);
                MI
            }
            _ => return None,
        };
        op.size = s;
        op.h = mov_sizes!(s, form);
        (op.jit, op.jarg) = (tag::MOV, form);
        Some(false)
    }

    fn jmp_call(&self, op: &mut Op, call: bool) -> Option<bool> {
        let i = self.i;
        match self.kind(0) {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                self.near_branch(op)?;
                op.h = if call && self.bits == 64 && op.size == 8 {
                    op.jit = tag::CALL;
                    branch::call_rel64
                } else if call {
                    branch::call_rel
                } else {
                    if self.bits == 64 {
                        op.jit = tag::JMP;
                    }
                    branch::jmp_rel
                };
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                let (off, size) = if self.kind(0) == OpKind::FarBranch16 {
                    (i.far_branch16() as u64, 2)
                } else {
                    (i.far_branch32() as u64, 4)
                };
                op.imm = ((i.far_branch_selector() as u64) << 32) | off;
                op.size = size;
                op.h = if call {
                    system::call_far_ptr
                } else {
                    system::jmp_far_ptr
                };
            }
            OpKind::Register => {
                op.r2 = self.gpr(0)?;
                op.size = self.size(0)?;
                if self.bits == 64 && op.size == 8 {
                    op.jit = if call { tag::CALL_R } else { tag::JMP_R };
                }
                op.h = if call {
                    branch::call_rm
                } else {
                    branch::jmp_rm
                };
            }
            OpKind::Memory => {
                let ms = i.memory_size();
                if matches!(
                    ms,
                    MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64
                ) {
                    op.size = valid_size(ms.size() as u8 - 2)?;
                    op.h = if call {
                        system::call_far_mem
                    } else {
                        system::jmp_far_mem
                    };
                } else {
                    op.size = valid_size(ms.size() as u8)?;
                    op.h = if call {
                        branch::call_rm
                    } else {
                        branch::jmp_rm
                    };
                }
            }
            _ => return None,
        }
        Some(true)
    }

    fn string(&self, op: &mut Op, kind: u8) -> Option<bool> {
        let i = self.i;
        let kinds = [self.kind(0), self.kind(1)];
        let mut asize = 0;
        for k in kinds {
            asize = match k {
                OpKind::MemorySegSI | OpKind::MemoryESDI => 2,
                OpKind::MemorySegESI | OpKind::MemoryESEDI => 4,
                OpKind::MemorySegRSI | OpKind::MemoryESRDI => 8,
                _ => continue,
            };
        }
        if asize == 0 {
            // Not the string form (e.g. SSE2 MOVSD/CMPSD), which `fpu` did not claim.
            return None;
        }
        op.asize = asize;
        op.size = valid_size(i.memory_size().size() as u8)?;
        op.seg = if kinds.iter().any(|k| {
            matches!(
                k,
                OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegRSI
            )
        }) {
            self.seg_of(i.memory_segment())
        } else {
            SEG_NONE
        };
        if i.has_rep_prefix() {
            op.flags |= F_REP;
        }
        if i.has_repne_prefix() {
            op.flags |= F_REPNE;
        }
        op.ext = kind;
        op.h = string::string;
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::{Decoder, IcedError};

    fn dec(bits: u32, bytes: &[u8]) -> (Op, bool) {
        let mut d = Decoder::with_ip(bits, bytes, 0x1000, super::super::block::DECODER_OPTIONS);
        let i = d.decode();
        translate(&i, bits, true)
    }

    #[test]
    fn registers_and_memory_operands() {
        // add rax, [rbx + rcx*4 + 0x10]
        let (op, ends) = dec(64, &[0x48, 0x03, 0x44, 0x8b, 0x10]);
        assert!(!ends);
        assert_eq!(op.r1, 0);
        assert_eq!(op.base, 3);
        assert_eq!(op.index, 1);
        assert_eq!(op.scale, 2);
        assert_eq!(op.disp, 0x10);
        assert_eq!(op.asize, 8);
        assert_eq!(op.size, 8);
        assert_eq!(op.seg, SEG_NONE);
        assert!(op.is_mem());
        // mov ah, bl: AH (the destination, r1) is register 16.
        let (op, _) = dec(64, &[0x88, 0xdc]);
        assert_eq!(op.r1, 16);
        assert_eq!(op.r2, 3);
    }

    #[test]
    fn rip_relative_is_position_independent() {
        // mov eax, [rip + 0x100] (6 bytes): disp relative to the next instruction.
        let (op, _) = dec(64, &[0x8b, 0x05, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(op.base, RIPREG);
        assert_eq!(op.disp, 0x100);
        // jne -2 (itself): displacement -2 from the next instruction.
        let (op, ends) = dec(64, &[0x75, 0xfe]);
        assert!(ends);
        assert_eq!(op.imm as i64, -2);
        assert_eq!(op.ext, 5);
    }

    #[test]
    fn rep_bsf_is_bsf() {
        // F3 0F BC C1: TZCNT on BMI1 CPUs, BSF here.
        let (op, _) = dec(64, &[0xf3, 0x0f, 0xbc, 0xc1]);
        assert!(std::ptr::fn_addr_eq(op.h, bits::bsf as Handler));
        assert_eq!(op.ext, 0);
        let (op, _) = dec(64, &[0xf3, 0x0f, 0xbd, 0xc1]);
        assert!(std::ptr::fn_addr_eq(op.h, bits::bsf as Handler));
        assert_eq!(op.ext, 1);
    }

    #[test]
    fn unknown_and_invalid_are_ud() {
        // VMCALL is not implemented.
        let (op, ends) = dec(64, &[0x0f, 0x01, 0xc1]);
        assert!(ends);
        assert!(std::ptr::fn_addr_eq(op.h, system::undefined as Handler));
        // LOCK NOP (an invalid encoding) is checked by executing it in
        // `tests/emu_system.rs::extensions_not_in_cpuid_are_ud`: `ud_op` is a one-line body
        // that release builds may merge with another, so its address proves nothing.
    }

    /// `flags_needed` for the instructions `f` assembles.
    fn needed(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<bool> {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        let bytes = a.assemble(0x1000).unwrap();
        let mut d = Decoder::with_ip(64, &bytes, 0x1000, super::super::block::DECODER_OPTIONS);
        let insts: Vec<Instruction> = d.iter().collect();
        let mut out = vec![true; insts.len()];
        flags_needed(&insts, &mut out);
        out
    }

    #[test]
    fn flag_liveness() {
        // Overwritten by the SUB; the SUB's flags are live at the end of the block. (Only
        // the plain data instructions are analysed: the rest count as reading and writing
        // every flag.)
        let n = needed(|a| {
            a.add(eax, ebx)?;
            a.sub(ecx, edx)?;
            a.jz(0x2000u64)
        });
        assert_eq!(n, [false, true, true]);
        // A load may fault (the exception sees the ADD's flags); a store may end the block.
        let n = needed(|a| {
            a.add(eax, ebx)?;
            a.mov(ecx, dword_ptr(rax))?;
            a.sub(ecx, edx)
        });
        assert_eq!(n, [true, false, true]);
        let n = needed(|a| {
            a.add(eax, ebx)?;
            a.add(dword_ptr(rax), ecx)?;
            a.sub(ecx, edx)
        });
        assert_eq!(n, [true, true, true]);
        // CF flows through INC into ADC; INC's own flags are overwritten by ADC.
        let n = needed(|a| {
            a.sub(eax, ebx)?;
            a.inc(ecx)?;
            a.adc(edx, 0)
        });
        assert_eq!(n, [true, false, true]);
        // A shift by CL writes no flag when CL is 0: it does not hide the ADD's CF from SETC.
        let n = needed(|a| {
            a.add(eax, ebx)?;
            a.shl(edx, cl)?;
            a.setc(al)?;
            a.sub(ecx, edx)
        });
        assert_eq!(n, [true, true, false, true]);
        let n = needed(|a| {
            a.add(eax, ebx)?;
            a.shl(edx, 3)?;
            a.setc(al)?;
            a.sub(ecx, edx)
        });
        assert_eq!(n, [false, true, false, true]);
        // Rotates write CF and OF only.
        let n = needed(|a| {
            a.ror(eax, 5)?;
            a.xor(eax, ebx)
        });
        assert_eq!(n, [false, true]);
        let n = needed(|a| {
            a.and(eax, ebx)?;
            a.ror(eax, 5)?;
            a.adc(eax, ebx)
        });
        assert_eq!(n, [false, true, true]);
        // Anything else (here a locked operation, PUSHF) reads every flag.
        let n = needed(|a| {
            a.add(eax, ebx)?;
            a.lock().add(dword_ptr(rax), ecx)?;
            a.sub(ecx, edx)?;
            a.pushfq()?;
            a.sub(ecx, edx)
        });
        assert_eq!(n, [true, true, true, true, true]);
    }

    #[test]
    fn sixteen_bit_addressing() {
        // mov ax, [bx+si+4] in 16-bit mode.
        let (op, _) = dec(16, &[0x8b, 0x40, 0x04]);
        assert_eq!(op.asize, 2);
        assert_eq!(op.base, 3);
        assert_eq!(op.index, 6);
        assert_eq!(op.seg, 3);
    }
}
