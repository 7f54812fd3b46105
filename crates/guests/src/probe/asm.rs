//! The 64-bit assembly context of a probe and the routines every probe shares: serial output,
//! number formatting, power-off, exception reporting.
//!
//! Register conventions of the shared routines (all preserve every register they do not return
//! in, except RFLAGS; they use port I/O, so they run in ring 0):
//! - `putc`: AL = character.
//! - `puts`: RSI = NUL-terminated string.
//! - `put_hex`: RAX = value, ECX = number of digits (1..=16, zero-padded, lower case).
//! - `put_dec`: RAX = value, ECX = minimum number of digits (zero-padded).

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};
use vireo_arch::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_SLEEP_CONTROL_PORT, ACPI_SLP_EN,
    COM1_PORT, I8042_COMMAND_PORT,
};

use super::memory::{gdt, IDT, SEL_CODE64};
use super::{Platform, ProbeError};

/// 16550 line status register (offset 5) and its THRE bit (transmit holding register empty).
const COM1_LSR: u16 = COM1_PORT + 5;
const LSR_THRE: u32 = 1 << 5;
/// How many times `putc` polls LSR.THRE before writing anyway.
const LSR_POLL_LIMIT: u32 = 0x1_0000;
/// i8042 status register bit 1: input buffer full (the controller has not taken the last byte).
const I8042_STATUS_IBF: u32 = 1 << 1;
const I8042_POLL_LIMIT: u32 = 1000;
/// i8042 command "pulse output line 0" = CPU reset.
const I8042_CMD_RESET: u32 = 0xfe;
/// QEMU q35 (ICH9 LPC): PM1a_CNT at PMBASE (0x600, set by the firmware) + 4; SLP_TYP of S5 is 0
/// in QEMU's `\_S5`; SLP_EN is bit 13 (ACPI 6.4 §4.8.3.2.1).
const Q35_PM1A_CNT: u16 = 0x604;
const Q35_PM1_SLP_EN: u32 = 1 << 13;
/// ICH9 reset control register and the value for a hard reset (SYS_RST | RST_CPU).
const Q35_RST_CNT: u16 = 0xcf9;
const Q35_RST_CNT_RESET: u32 = 0x06;

/// Exceptions that push an error code (SDM Vol. 3A §6.15): 8, 10-14, 17, 21, 29, 30.
const ERROR_CODE_VECTORS: u32 = (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 17)
    | (1 << 21)
    | (1 << 29)
    | (1 << 30);
/// Number of exception vectors with a reporting handler.
pub(crate) const EXCEPTION_VECTORS: u32 = 32;
/// Size of each exception stub: `push 0` (or a 2-byte NOP), `push vector`, `jmp rel32`.
pub(crate) const EXCEPTION_STUB_SIZE: u32 = 9;
/// IDT gate type/attribute bytes: present 64-bit interrupt gate, DPL 0 or DPL 3 (SDM Vol. 3A
/// §6.14.1, Figure 6-8).
pub(crate) const GATE_INTERRUPT_DPL0: u32 = 0x8e;

/// Labels of the shared routines and data.
#[derive(Clone, Copy)]
pub(crate) struct Labels {
    pub putc: CodeLabel,
    pub puts: CodeLabel,
    pub put_hex: CodeLabel,
    pub put_dec: CodeLabel,
    pub set_gate: CodeLabel,
    pub power_off: CodeLabel,
    pub halt: CodeLabel,
    pub exception_stubs: CodeLabel,
    pub exception_common: CodeLabel,
    pub gdt: CodeLabel,
    pub gdtr: CodeLabel,
    pub idtr: CodeLabel,
    pub lock: CodeLabel,
    pub ap_count: CodeLabel,
}

/// A 64-bit code unit under construction.
pub(crate) struct Asm {
    pub a: CodeAssembler,
    pub l: Labels,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    /// Extra bytes to place in the data area, with their labels (e.g. the AP trampoline).
    blobs: Vec<(CodeLabel, Vec<u8>)>,
    /// Number of IDT entries to load.
    pub idt_entries: u32,
}

/// Result of assembling a unit.
pub(crate) struct Assembled {
    pub bytes: Vec<u8>,
    pub result: CodeAssemblerResult,
}

impl Asm {
    pub fn new() -> Result<Self, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let l = Labels {
            putc: a.create_label(),
            puts: a.create_label(),
            put_hex: a.create_label(),
            put_dec: a.create_label(),
            set_gate: a.create_label(),
            power_off: a.create_label(),
            halt: a.create_label(),
            exception_stubs: a.create_label(),
            exception_common: a.create_label(),
            gdt: a.create_label(),
            gdtr: a.create_label(),
            idtr: a.create_label(),
            lock: a.create_label(),
            ap_count: a.create_label(),
        };
        Ok(Self {
            a,
            l,
            strings: Vec::new(),
            blobs: Vec::new(),
            idt_entries: EXCEPTION_VECTORS,
        })
    }

    /// A fresh label.
    pub fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    /// Binds `label` to the next instruction.
    pub fn set(&mut self, label: &mut CodeLabel) -> Result<(), IcedError> {
        self.a.set_label(label)
    }

    /// Emits `lea rsi, [s]; call puts` for a string placed in the data area.
    pub fn print(&mut self, s: &str) -> Result<(), IcedError> {
        let label = self.a.create_label();
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.strings.push((label, bytes));
        self.a.lea(rsi, ptr(label))?;
        self.a.call(self.l.puts)
    }

    /// Emits `mov al, c; call putc`.
    pub fn print_char(&mut self, c: u8) -> Result<(), IcedError> {
        self.a.mov(al, c as u32)?;
        self.a.call(self.l.putc)
    }

    /// Emits a call printing `value_reg` in hex with `digits` digits.
    pub fn print_hex(&mut self, value: AsmRegister64, digits: u32) -> Result<(), IcedError> {
        if value != rax {
            self.a.mov(rax, value)?;
        }
        self.a.mov(ecx, digits)?;
        self.a.call(self.l.put_hex)
    }

    /// Emits a call printing `value` in decimal with at least `min_digits` digits.
    pub fn print_dec(&mut self, value: AsmRegister64, min_digits: u32) -> Result<(), IcedError> {
        if value != rax {
            self.a.mov(rax, value)?;
        }
        self.a.mov(ecx, min_digits)?;
        self.a.call(self.l.put_dec)
    }

    /// Places `bytes` in the data area under a new label.
    pub fn blob(&mut self, bytes: Vec<u8>) -> CodeLabel {
        let label = self.a.create_label();
        self.blobs.push((label, bytes));
        label
    }

    /// `putc`: waits (bounded) for LSR.THRE, then writes AL to COM1's THR.
    fn emit_putc(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut poll = a.create_label();
        let mut ready = a.create_label();
        let mut putc = self.l.putc;
        a.set_label(&mut putc)?;
        a.push(rax)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.mov(ah, al)?;
        a.mov(ecx, LSR_POLL_LIMIT)?;
        a.mov(edx, COM1_LSR as u32)?;
        a.set_label(&mut poll)?;
        a.in_(al, dx)?;
        a.test(al, LSR_THRE)?;
        a.jnz(ready)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(poll)?;
        a.set_label(&mut ready)?;
        a.mov(al, ah)?;
        a.mov(edx, COM1_PORT as u32)?;
        a.out(dx, al)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rax)?;
        a.ret()
    }

    /// `puts`: prints the NUL-terminated string at RSI.
    fn emit_puts(&mut self) -> Result<(), IcedError> {
        let putc = self.l.putc;
        let a = &mut self.a;
        let mut next = a.create_label();
        let mut done = a.create_label();
        let mut puts = self.l.puts;
        a.set_label(&mut puts)?;
        a.push(rax)?;
        a.push(rsi)?;
        a.set_label(&mut next)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(putc)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(rsi)?;
        a.pop(rax)?;
        a.ret()
    }

    /// `put_hex`: rotates the wanted digits to the top of RBX, then emits one nibble at a time.
    fn emit_put_hex(&mut self) -> Result<(), IcedError> {
        let putc = self.l.putc;
        let a = &mut self.a;
        let mut next = a.create_label();
        let mut decimal = a.create_label();
        let mut put_hex = self.l.put_hex;
        a.set_label(&mut put_hex)?;
        a.push(rax)?;
        a.push(rbx)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.mov(rbx, rax)?;
        a.mov(edx, ecx)?; // digit count
        a.shl(ecx, 2)?;
        a.ror(rbx, cl)?; // 16 digits: rotate by 64 = by 0 (count masked to 6 bits)
        a.set_label(&mut next)?;
        a.rol(rbx, 4)?;
        a.mov(al, bl)?;
        a.and(al, 0xf)?;
        a.cmp(al, 10)?;
        a.jb(decimal)?;
        a.add(al, (b'a' - b'0' - 10) as u32)?;
        a.set_label(&mut decimal)?;
        a.add(al, b'0' as u32)?;
        a.call(putc)?;
        a.dec(edx)?;
        a.jnz(next)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rbx)?;
        a.pop(rax)?;
        a.ret()
    }

    /// `put_dec`: pushes the digits (least significant first), pads, then pops and prints them.
    fn emit_put_dec(&mut self) -> Result<(), IcedError> {
        let putc = self.l.putc;
        let a = &mut self.a;
        let mut divide = a.create_label();
        let mut pad = a.create_label();
        let mut emit = a.create_label();
        let mut put_dec = self.l.put_dec;
        a.set_label(&mut put_dec)?;
        a.push(rax)?;
        a.push(rbx)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.push(rsi)?;
        a.mov(esi, ecx)?; // minimum width
        a.cmp(esi, 20)?; // a u64 has at most 20 digits; bound the padding
        a.jbe(divide)?;
        a.mov(esi, 20)?;
        a.set_label(&mut divide)?;
        a.xor(ecx, ecx)?;
        a.mov(ebx, 10)?;
        let mut div_loop = a.create_label();
        a.set_label(&mut div_loop)?;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.push(rdx)?;
        a.inc(ecx)?;
        a.test(rax, rax)?;
        a.jnz(div_loop)?;
        a.set_label(&mut pad)?;
        a.cmp(ecx, esi)?;
        a.jae(emit)?;
        a.push(0)?;
        a.inc(ecx)?;
        a.jmp(pad)?;
        a.set_label(&mut emit)?;
        a.pop(rax)?;
        a.add(al, b'0' as u32)?;
        a.call(putc)?;
        a.dec(ecx)?;
        a.jnz(emit)?;
        a.pop(rsi)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rbx)?;
        a.pop(rax)?;
        a.ret()
    }

    /// `set_gate`: IDT[EDI] = 64-bit gate to RAX, selector 0x08, type/attributes DL
    /// (SDM Vol. 3A §6.14.1, Figure 6-8).
    fn emit_set_gate(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut set_gate = self.l.set_gate;
        a.set_label(&mut set_gate)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.push(rdi)?;
        a.mov(edi, edi)?; // zero-extend the vector
        a.shl(rdi, 4)?;
        a.mov(ecx, IDT as u32)?;
        a.add(rdi, rcx)?;
        a.mov(ecx, eax)?;
        a.and(ecx, 0xffff)?;
        a.or(ecx, (SEL_CODE64 as u32) << 16)?;
        a.mov(dword_ptr(rdi), ecx)?; // offset 15:0, selector
        a.mov(ecx, eax)?;
        a.and(ecx, 0xffff_0000u32)?;
        a.movzx(edx, dl)?;
        a.shl(edx, 8)?;
        a.or(ecx, edx)?;
        a.mov(dword_ptr(rdi + 4), ecx)?; // IST 0, type/attributes, offset 31:16
        a.mov(rcx, rax)?;
        a.shr(rcx, 32)?;
        a.mov(dword_ptr(rdi + 8), ecx)?; // offset 63:32
        a.mov(dword_ptr(rdi + 12), 0u32)?;
        a.pop(rdi)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.ret()
    }

    /// `power_off` (never returns): the platform's power-off, then `halt`.
    fn emit_power_off(&mut self, platform: Platform) -> Result<(), IcedError> {
        let mut power_off = self.l.power_off;
        self.a.set_label(&mut power_off)?;
        match platform {
            Platform::Vireo => {
                // ACPI hardware-reduced sleep control register (ACPI 6.4 §4.8.3.7).
                self.a.mov(edx, ACPI_SLEEP_CONTROL_PORT as u32)?;
                self.a
                    .mov(al, ((ACPI_S5_SLP_TYP << 2) | ACPI_SLP_EN) as u32)?;
                self.a.out(dx, al)?;
            }
            Platform::QemuQ35 => {
                self.a.mov(edx, Q35_PM1A_CNT as u32)?;
                self.a.mov(eax, Q35_PM1_SLP_EN)?;
                self.a.out(dx, ax)?;
            }
            Platform::Firecracker => self.emit_i8042_reset()?,
        }
        self.emit_halt()
    }

    /// `halt`: `cli; hlt` forever.
    fn emit_halt(&mut self) -> Result<(), IcedError> {
        let mut halt = self.l.halt;
        self.a.set_label(&mut halt)?;
        self.a.cli()?;
        self.a.hlt()?;
        self.a.jmp(halt)
    }

    /// Inline: waits (bounded) until the i8042 takes commands, then pulses the reset line.
    pub fn emit_i8042_reset(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut poll = a.create_label();
        let mut ready = a.create_label();
        a.mov(ecx, I8042_POLL_LIMIT)?;
        a.mov(edx, I8042_COMMAND_PORT as u32)?;
        a.set_label(&mut poll)?;
        a.in_(al, dx)?;
        a.test(al, I8042_STATUS_IBF)?;
        a.jz(ready)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(poll)?;
        a.set_label(&mut ready)?;
        a.mov(edx, I8042_COMMAND_PORT as u32)?;
        a.mov(al, I8042_CMD_RESET)?;
        a.out(dx, al)
    }

    /// Inline: writes the platform's ACPI reset register (FADT RESET_REG, ACPI 6.4 §4.8.3.6).
    pub fn emit_acpi_reset(&mut self, platform: Platform) -> Result<(), IcedError> {
        let (port, value) = match platform {
            Platform::Vireo | Platform::Firecracker => (ACPI_RESET_PORT, ACPI_RESET_VALUE as u32),
            Platform::QemuQ35 => (Q35_RST_CNT, Q35_RST_CNT_RESET),
        };
        self.a.mov(edx, port as u32)?;
        self.a.mov(al, value)?;
        self.a.out(dx, al)
    }

    /// The 32 exception stubs (fixed size, hand-encoded so the IDT can be filled in a loop) and
    /// the common handler: prints `vireo-probe: exception <vector> error=<hex> rip=<hex>` and
    /// powers off.
    fn emit_exceptions(&mut self) -> Result<(), IcedError> {
        for vector in 0..EXCEPTION_VECTORS {
            let mut stub = Vec::with_capacity(EXCEPTION_STUB_SIZE as usize);
            if ERROR_CODE_VECTORS & (1 << vector) != 0 {
                stub.extend_from_slice(&[0x66, 0x90]); // 2-byte NOP: the CPU pushed an error code
            } else {
                stub.extend_from_slice(&[0x6a, 0x00]); // push 0: a dummy error code
            }
            stub.extend_from_slice(&[0x6a, vector as u8]); // push vector
                                                           // jmp rel32 to the common handler, which follows the last stub.
            let rel = (EXCEPTION_STUB_SIZE * (EXCEPTION_VECTORS - 1 - vector)) as i32;
            stub.push(0xe9);
            stub.extend_from_slice(&rel.to_le_bytes());
            if vector == 0 {
                self.a.set_label(&mut self.l.exception_stubs)?;
            }
            self.a.db(&stub)?;
        }
        self.a.set_label(&mut self.l.exception_common)?;
        // Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
        self.print("vireo-probe: exception ")?;
        self.a.mov(rax, qword_ptr(rsp))?;
        self.print_dec(rax, 1)?;
        self.print(" error=")?;
        self.a.mov(rax, qword_ptr(rsp + 8))?;
        self.print_hex(rax, 8)?;
        self.print(" rip=")?;
        self.a.mov(rax, qword_ptr(rsp + 16))?;
        self.print_hex(rax, 16)?;
        self.print("\n")?;
        self.a.jmp(self.l.power_off)
    }

    /// Emits the shared routines (call once, after the probe's own code).
    pub fn emit_routines(&mut self, platform: Platform) -> Result<(), IcedError> {
        self.emit_putc()?;
        self.emit_puts()?;
        self.emit_put_hex()?;
        self.emit_put_dec()?;
        self.emit_set_gate()?;
        self.emit_exceptions()?;
        self.emit_power_off(platform)
    }

    /// Emits the data area: GDT, GDTR, IDTR, the SMP variables, strings and blobs.
    pub fn emit_data(&mut self) -> Result<(), IcedError> {
        let table = gdt();
        self.a.set_label(&mut self.l.gdt)?;
        self.a.dq(&table)?;
        // The GDTR's base is an absolute address, so it is emitted by `finish` once the unit's
        // address is known; here it is a placeholder of the right size (limit + 64-bit base).
        self.a.set_label(&mut self.l.gdtr)?;
        self.a.dw(&[(table.len() * 8 - 1) as u16])?;
        self.a.dq(&[0])?;
        let mut idtr = self.l.idtr;
        self.a.set_label(&mut idtr)?;
        self.a.dw(&[(self.idt_entries * 16 - 1) as u16])?;
        self.a.dq(&[IDT])?;
        let mut lock = self.l.lock;
        self.a.set_label(&mut lock)?;
        self.a.dd(&[0])?;
        let mut ap_count = self.l.ap_count;
        self.a.set_label(&mut ap_count)?;
        self.a.dd(&[0])?;
        for (mut label, bytes) in std::mem::take(&mut self.strings)
            .into_iter()
            .chain(std::mem::take(&mut self.blobs))
        {
            for (i, chunk) in bytes.chunks(16).enumerate() {
                if i == 0 {
                    self.a.set_label(&mut label)?;
                }
                self.a.db(chunk)?;
            }
        }
        Ok(())
    }

    /// Assembles the unit at `ip` and fills in the GDTR base.
    pub fn finish(mut self, ip: u64) -> Result<(Assembled, Labels), ProbeError> {
        let result = self
            .a
            .assemble_options(ip, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let mut bytes = result.inner.code_buffer.clone();
        let gdt = result.label_ip(&self.l.gdt)?;
        let gdtr = result.label_ip(&self.l.gdtr)?;
        let at = (gdtr - ip) as usize + 2;
        bytes
            .get_mut(at..at + 8)
            .ok_or(ProbeError::Internal("GDTR outside the unit"))?
            .copy_from_slice(&gdt.to_le_bytes());
        let stubs = result.label_ip(&self.l.exception_stubs)?;
        let common = result.label_ip(&self.l.exception_common)?;
        if common - stubs != u64::from(EXCEPTION_STUB_SIZE * EXCEPTION_VECTORS) {
            return Err(ProbeError::Internal(
                "exception stubs are not of fixed size",
            ));
        }
        Ok((Assembled { bytes, result }, self.l))
    }
}
