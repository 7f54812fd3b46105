//! The two entries, the common 64-bit start-up code and the AP trampoline; and the layout of
//! the whole image.
//!
//! - 64-bit entry (`e_entry`, Linux boot protocol §"64-bit Boot Protocol" style): long mode with
//!   some identity map; falls straight into the common code.
//! - PVH entry (the `XEN_ELFNOTE_PHYS32_ENTRY` note; Xen `docs/misc/pvh.pandoc`): 32-bit protected
//!   mode, paging off, flat CS/DS/ES/SS, no stack. It builds the page tables, loads the GDT, and
//!   switches to IA-32e mode the SDM way (Vol. 3A §9.8.5: PAE, CR3, EFER.LME, CR0.PG), then
//!   far-jumps to the common code.
//! - Common 64-bit code: installs the probe's own page tables (unless the PVH stub already did),
//!   CR0/CR4, GDT, segments, stack and IDT, so nothing set up by the VMM is relied upon.

use iced_x86::code_asm::*;
use iced_x86::{Code, IcedError, Instruction, MemoryOperand};

use super::asm::{Asm, EXCEPTION_STUB_SIZE, EXCEPTION_VECTORS, GATE_INTERRUPT_DPL0};
use super::elf;
use super::memory::*;
use super::probes;
use super::{Platform, Probe, ProbeError};
use vireo_arch::layout::COM1_PORT;

/// Entries per paging structure.
const ENTRIES: u32 = 512;
const PAGE_2M: u32 = 0x20_0000;

/// Inline: writes `!` to COM1 (the start-up benchmark's first byte). Valid in 32- and 64-bit code.
fn emit_first_byte(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(edx, COM1_PORT as u32)?;
    a.mov(al, u32::from(super::FIRST_BYTE))?;
    a.out(dx, al)
}

/// Inline, no stack: writes the complete PML4, PDPT and four PDs, every entry with its final
/// value (so running it over live tables would be harmless).
fn emit_page_tables64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cld()?;
    a.mov(edi, PML4 as u32)?;
    a.mov(eax, (PDPT | TABLE_FLAGS) as u32)?;
    a.stosq()?;
    a.xor(eax, eax)?;
    a.mov(ecx, ENTRIES - 1)?;
    a.rep().stosq()?;
    // PDPT (RDI now points at it): four PDs, then not-present entries.
    a.mov(eax, (PD | TABLE_FLAGS) as u32)?;
    a.mov(ecx, 4u32)?;
    let mut pdpt = a.create_label();
    a.set_label(&mut pdpt)?;
    a.stosq()?;
    a.add(eax, 0x1000)?;
    a.dec(ecx)?;
    a.jnz(pdpt)?;
    a.xor(eax, eax)?;
    a.mov(ecx, ENTRIES - 4)?;
    a.rep().stosq()?;
    // The four PDs: 2 MiB pages, the fourth GiB uncached.
    a.mov(eax, PAGE_2M_FLAGS as u32)?;
    for (count, extra) in [
        (WB_PDS * ENTRIES, 0),
        (ENTRIES, (PAGE_2M_UC_FLAGS & !PAGE_2M_FLAGS) as u32),
    ] {
        if extra != 0 {
            a.or(eax, extra)?;
        }
        a.mov(ecx, count)?;
        let mut pd = a.create_label();
        a.set_label(&mut pd)?;
        a.stosq()?;
        a.add(rax, PAGE_2M as i32)?;
        a.dec(ecx)?;
        a.jnz(pd)?;
    }
    Ok(())
}

/// The same tables from 32-bit code (entries written as two dwords).
fn emit_page_tables32(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cld()?;
    a.mov(edi, PML4 as u32)?;
    a.mov(eax, (PDPT | TABLE_FLAGS) as u32)?;
    a.stosd()?;
    a.xor(eax, eax)?;
    a.stosd()?;
    a.mov(ecx, (ENTRIES - 1) * 2)?;
    a.rep().stosd()?;
    let entries = |a: &mut CodeAssembler, count: u32, step: u32| -> Result<(), IcedError> {
        a.mov(ecx, count)?;
        let mut next = a.create_label();
        a.set_label(&mut next)?;
        a.stosd()?;
        a.mov(dword_ptr(edi), 0u32)?;
        a.add(edi, 4)?;
        a.add(eax, step)?;
        a.dec(ecx)?;
        a.jnz(next)
    };
    a.mov(eax, (PD | TABLE_FLAGS) as u32)?;
    entries(a, 4, 0x1000)?;
    a.xor(eax, eax)?;
    a.mov(ecx, (ENTRIES - 4) * 2)?;
    a.rep().stosd()?;
    a.mov(eax, PAGE_2M_FLAGS as u32)?;
    entries(a, WB_PDS * ENTRIES, PAGE_2M)?;
    a.or(eax, (PAGE_2M_UC_FLAGS & !PAGE_2M_FLAGS) as u32)?;
    entries(a, ENTRIES, PAGE_2M)
}

/// Inline, 32-bit, paging off, page tables and GDT ready: enters IA-32e mode (SDM Vol. 3A
/// §9.8.5) and far-jumps to `target` in the 64-bit code segment.
fn emit_enter_long_mode32(a: &mut CodeAssembler, target: u32) -> Result<(), IcedError> {
    a.mov(eax, CR4_PAE)?;
    a.mov(cr4, eax)?;
    a.mov(eax, PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.or(eax, EFER_LME)?;
    a.wrmsr()?;
    a.mov(eax, CR0_LONG)?;
    a.mov(cr0, eax)?;
    a.jmp_far(SEL_CODE64, target)
}

/// The 16-bit AP start-up trampoline, run from [`TRAMPOLINE`] with CS = `TRAMPOLINE >> 4`, IP = 0
/// (SDM Vol. 3A §9.4.4.1, §9.5). It loads the GDTR the BSP stored at [`TRAMPOLINE_GDTR`], sets
/// CR0.PE and far-jumps to `ap32` in the 32-bit code segment.
pub(crate) fn trampoline(ap32: u64) -> Result<Vec<u8>, ProbeError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.mov(ax, cs)?;
    a.mov(ds, ax)?;
    // o32 lgdt [TRAMPOLINE_GDTR]: the 32-bit operand-size form loads a full 32-bit base.
    a.add_instruction(Instruction::with1(
        Code::Lgdt_m1632,
        MemoryOperand::with_displ(TRAMPOLINE_GDTR, 2),
    )?)?;
    a.mov(eax, cr0)?;
    a.or(eax, CR0_PE)?;
    a.mov(cr0, eax)?;
    a.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        SEL_CODE32,
        below_4g(ap32)?,
    )?)?;
    let bytes = a.assemble(0)?;
    if bytes.len() > TRAMPOLINE_CODE_MAX {
        return Err(ProbeError::Internal("AP trampoline overlaps its GDTR slot"));
    }
    Ok(bytes)
}

/// What the 64-bit unit exports to the 32-bit one.
struct Main {
    bytes: Vec<u8>,
    common64: u64,
    ap64: Option<u64>,
    gdtr: u64,
}

/// Assembles the 64-bit unit at `ip`: 64-bit entry, common start-up, the probe, shared
/// routines, data. `ap32` is where the 32-bit AP code will be (for the trampoline).
fn assemble_main(
    probe: &Probe,
    platform: Platform,
    ip: u64,
    ap32: u64,
) -> Result<Main, ProbeError> {
    let mut asm = Asm::new()?;
    if matches!(probe, Probe::FirstByte) {
        emit_first_byte(&mut asm.a)?;
    }
    let mut common64 = asm.label();
    asm.set(&mut common64)?;
    asm.a.cli()?;
    asm.a.cld()?;
    // Own page tables, unless CR3 already points at them (PVH path).
    let mut tables_ready = asm.label();
    asm.a.mov(rax, cr3)?;
    asm.a.and(rax, -0x1000)?;
    asm.a.cmp(rax, PML4 as i32)?;
    asm.a.je(tables_ready)?;
    emit_page_tables64(&mut asm.a)?;
    asm.a.mov(eax, PML4 as u32)?;
    asm.a.mov(cr3, rax)?;
    asm.set(&mut tables_ready)?;
    asm.a.mov(eax, CR4_PAE)?;
    asm.a.mov(cr4, rax)?;
    asm.a.mov(eax, CR0_LONG)?;
    asm.a.mov(cr0, rax)?;
    // Own GDT; reload CS with a far return, then the data segments.
    asm.a.lgdt(ptr(asm.l.gdtr))?;
    asm.a.mov(esp, BSP_STACK_TOP as u32)?;
    let mut reloaded = asm.label();
    asm.a.push(i32::from(SEL_CODE64))?;
    asm.a.lea(rax, ptr(reloaded))?;
    asm.a.push(rax)?;
    asm.a.retf()?;
    asm.set(&mut reloaded)?;
    asm.a.mov(eax, SEL_DATA as u32)?;
    asm.a.mov(ds, ax)?;
    asm.a.mov(es, ax)?;
    asm.a.mov(ss, ax)?;
    asm.a.xor(eax, eax)?;
    asm.a.mov(fs, ax)?;
    asm.a.mov(gs, ax)?;
    // IDT: a reporting handler for every exception.
    asm.a.xor(edi, edi)?;
    asm.a.lea(rax, ptr(asm.l.exception_stubs))?;
    asm.a.mov(edx, GATE_INTERRUPT_DPL0)?;
    let mut gate = asm.label();
    asm.set(&mut gate)?;
    asm.a.call(asm.l.set_gate)?;
    asm.a.add(rax, EXCEPTION_STUB_SIZE as i32)?;
    asm.a.inc(edi)?;
    asm.a.cmp(edi, EXCEPTION_VECTORS)?;
    asm.a.jb(gate)?;
    asm.a.lidt(ptr(asm.l.idtr))?;

    let ap64 = probes::emit(&mut asm, probe, platform, ap32)?;
    asm.emit_routines(platform)?;
    asm.emit_data()?;
    let (assembled, labels) = asm.finish(ip)?;
    Ok(Main {
        common64: assembled.result.label_ip(&common64)?,
        ap64: ap64.map(|l| assembled.result.label_ip(&l)).transpose()?,
        gdtr: assembled.result.label_ip(&labels.gdtr)?,
        bytes: assembled.bytes,
    })
}

/// An address the 32-bit code refers to (always true: the image is at 2 MiB).
fn below_4g(addr: u64) -> Result<u32, ProbeError> {
    u32::try_from(addr).map_err(|_| ProbeError::Internal("32-bit code refers above 4 GiB"))
}

/// What the 32-bit unit exports.
struct Boot32 {
    bytes: Vec<u8>,
    pvh_entry: u64,
    ap32: Option<u64>,
}

/// Assembles the 32-bit unit at `ip`: the PVH entry and, for the SMP probe, the APs' 32-bit step.
fn assemble_boot32(probe: &Probe, ip: u64, main: &Main) -> Result<Boot32, ProbeError> {
    let mut a = CodeAssembler::new(32)?;
    let mut pvh = a.create_label();
    a.set_label(&mut pvh)?;
    if matches!(probe, Probe::FirstByte) {
        emit_first_byte(&mut a)?;
    }
    a.cli()?;
    emit_page_tables32(&mut a)?;
    a.lgdt(ptr(below_4g(main.gdtr)?))?;
    emit_enter_long_mode32(&mut a, below_4g(main.common64)?)?;
    let mut ap32 = a.create_label();
    if let Some(ap64) = main.ap64 {
        // APs arrive from the trampoline: protected mode, CS = 32-bit code, others real-mode.
        a.set_label(&mut ap32)?;
        a.mov(eax, SEL_DATA as u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        emit_enter_long_mode32(&mut a, below_4g(ap64)?)?;
    }
    let result = a.assemble_options(
        ip,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    Ok(Boot32 {
        pvh_entry: result.label_ip(&pvh)?,
        ap32: main.ap64.map(|_| result.label_ip(&ap32)).transpose()?,
        bytes: result.inner.code_buffer,
    })
}

/// Builds the whole ELF file. The 64-bit unit comes first (so `e_entry` is fixed), the 32-bit
/// unit after it; the trampoline inside the 64-bit unit needs the 32-bit AP entry, so the layout
/// is repeated until that address is stable (twice: sizes do not depend on it).
pub(crate) fn build_image(probe: &Probe, platform: Platform) -> Result<Vec<u8>, ProbeError> {
    let code_base = LOAD_ADDR + CODE_OFFSET;
    let mut ap32_guess = code_base;
    for _ in 0..4 {
        let main = assemble_main(probe, platform, code_base, ap32_guess)?;
        let base32 = (code_base + main.bytes.len() as u64).next_multiple_of(16);
        let boot = assemble_boot32(probe, base32, &main)?;
        if let Some(ap32) = boot.ap32 {
            if ap32 != ap32_guess {
                ap32_guess = ap32;
                continue;
            }
        }
        let mut body = main.bytes;
        body.resize((base32 - code_base) as usize, 0xcc); // int3 padding, never executed
        body.extend_from_slice(&boot.bytes);
        let size = CODE_OFFSET as usize + body.len();
        if size > MAX_IMAGE_SIZE as usize {
            return Err(ProbeError::TooLarge {
                size,
                max: MAX_IMAGE_SIZE as usize,
            });
        }
        let pvh_entry = below_4g(boot.pvh_entry)?;
        return Ok(elf::write(&elf::Image {
            entry64: code_base,
            pvh_entry,
            body: &body,
            mem_size: BSS_END - LOAD_ADDR,
        }));
    }
    Err(ProbeError::Layout)
}
