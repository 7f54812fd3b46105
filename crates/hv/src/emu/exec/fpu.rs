//! x87 FPU, MMX and SSE/SSE2 (Intel SDM Vol. 1 chapters 8-11), FXSAVE/FXRSTOR,
//! LDMXCSR/STMXCSR.
//!
//! Stage 1 implements none of them: [`translate`] maps every such instruction to [`stub`],
//! which raises #UD and logs the instruction once. The architectural state lives in
//! `Cpu::fpu` (`FpuState`, FXSAVE layout), which `Vcpu::fpu`/`set_fpu` already read and
//! write. Stage 2 adds handlers here (one per instruction group) and returns them from
//! `translate`; `decode.rs` needs no change. FWAIT is a no-op already (no x87 exceptions can
//! be pending).

use std::sync::OnceLock;

use iced_x86::{Instruction, Mnemonic, Register};

use super::{Exec, Handler, Op};
use crate::emu::cpu::{ud, R};
use crate::emu::{log_once, LogOnce};

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
    ) {
        return true;
    }
    if is_x87_mnemonic(i.mnemonic()) {
        return true;
    }
    (0..i.op_count()).any(|n| {
        i.op_kind(n) == iced_x86::OpKind::Register && {
            let r: Register = i.op_register(n);
            r.is_xmm() || r.is_mm() || r.is_st() || r.is_ymm()
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

/// The handler for an instruction `owns` accepted (stage 1: the #UD stub).
pub fn translate(i: &Instruction, op: &mut Op) -> Handler {
    op.imm = i.code() as u64;
    stub
}

/// #UD, logged once per instruction kind.
pub fn stub(x: &mut Exec<'_>, op: &Op) -> R {
    let code = iced_x86::Code::try_from(op.imm as usize).unwrap_or_default();
    log_once(
        LogOnce::Insn(op.imm as u32),
        format_args!(
            "vCPU {}: x87/SSE instruction {code:?} is not implemented yet (#UD) at RIP {:#x}",
            x.cpu.id,
            x.cpu.rip.wrapping_sub(op.len as u64)
        ),
    );
    Err(ud())
}
