//! The probes' own code, run after the common start-up (long mode, own tables, GDT, IDT, stack).

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use vireo_arch::layout::{CMOS_PORT, LAPIC_START};

use super::asm::{Asm, GATE_INTERRUPT_DPL0};
use super::boot::trampoline;
use super::memory::*;
use super::{Platform, Probe, ProbeError, USER_MODE_MULTIPLIER, USER_MODE_SEED};

/// MMIO address the unknown-I/O probe reads: in the 32-bit PCI window, where nothing is mapped.
pub(crate) const UNKNOWN_MMIO_ADDR: u64 = 0xd000_0000;
/// Port the unknown-I/O probe reads.
pub(crate) const UNKNOWN_PORT: u16 = 0x1234;

/// CMOS registers (MC146818: seconds, minutes, hours, day of month, month, year, status A/B,
/// and the century byte at 0x32 named by the ACPI FADT CENTURY field).
const RTC_SECONDS: u32 = 0x00;
const RTC_MINUTES: u32 = 0x02;
const RTC_HOURS: u32 = 0x04;
const RTC_DAY: u32 = 0x07;
const RTC_MONTH: u32 = 0x08;
const RTC_YEAR: u32 = 0x09;
const RTC_CENTURY: u32 = 0x32;
const RTC_STATUS_A: u32 = 0x0a;
const RTC_STATUS_B: u32 = 0x0b;
const RTC_A_UIP: u32 = 1 << 7;
const RTC_B_24H: u32 = 1 << 1;
const RTC_B_BINARY: u32 = 1 << 2;
const RTC_HOUR_PM: u32 = 1 << 7;
/// Bounds: polls of UIP per attempt, and attempts at a consistent read.
const RTC_UIP_POLL_LIMIT: u32 = 20_000;
const RTC_ATTEMPTS: u32 = 4;

/// Local APIC registers (SDM Vol. 3A §10.4.1, Table 10-1) and ICR values (§10.6.1): INIT and
/// start-up, edge, assert, destination shorthand "all excluding self" — as in the SDM's MP
/// initialization example (§8.4.4.1).
const LAPIC_ID: i32 = 0x20;
const LAPIC_SVR: i32 = 0xf0;
const LAPIC_ICR_LOW: i32 = 0x300;
const LAPIC_ICR_HIGH: i32 = 0x310;
const SVR_APIC_ENABLE: u32 = 1 << 8;
const ICR_INIT_ALL_EXCLUDING_SELF: u32 = 0x000c_4500;
const ICR_STARTUP_ALL_EXCLUDING_SELF: u32 = 0x000c_4600;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_POLL_LIMIT: u32 = 1000;

/// TSC ticks taken as one millisecond. The TSC rate is unknown to the probe; 3 GHz is at the
/// fast end of real machines, so on slower TSCs the waits only get longer.
const TSC_PER_MS: u64 = 3_000_000;
const INIT_DELAY_TSC: u64 = 10 * TSC_PER_MS;
const SIPI_DELAY_TSC: u64 = TSC_PER_MS / 5;
/// The BSP stops waiting for APs once the AP counter has not changed for this long.
const AP_QUIET_TSC: u64 = 200 * TSC_PER_MS;
/// Loop iterations allowed per TSC tick waited, so a stuck TSC cannot hang a wait.
const TSC_TICKS_PER_ITERATION: u64 = 16;

/// Emits the probe. Returns the label of the APs' 64-bit entry for the SMP probe.
pub(crate) fn emit(
    asm: &mut Asm,
    probe: &Probe,
    platform: Platform,
    ap32: u64,
) -> Result<Option<CodeLabel>, ProbeError> {
    match *probe {
        Probe::Hello | Probe::FirstByte => {
            asm.print(super::HELLO_LINE)?;
            asm.a.jmp(asm.l.power_off)?;
        }
        Probe::UnknownIo => unknown_io(asm)?,
        Probe::PowerOff => {
            asm.print("poweroff\n")?;
            asm.a.jmp(asm.l.power_off)?;
        }
        Probe::AcpiReset => {
            asm.print("acpi-reset\n")?;
            asm.emit_acpi_reset(platform)?;
            still_running(asm)?;
        }
        Probe::I8042Reset => {
            asm.print("i8042-reset\n")?;
            asm.emit_i8042_reset()?;
            still_running(asm)?;
        }
        Probe::Smp => return smp(asm, ap32).map(Some),
        Probe::CmosTime => cmos_time(asm)?,
        Probe::UserMode { n } => user_mode(asm, n)?,
        Probe::PioLoop { n, port } => io_loop(
            asm,
            n,
            |a| {
                a.mov(edx, u32::from(port))?;
                Ok(())
            },
            |a| a.out(dx, al),
        )?,
        Probe::PioReadLoop { n, port } => io_loop(
            asm,
            n,
            |a| {
                a.mov(edx, u32::from(port))?;
                Ok(())
            },
            |a| a.in_(al, dx),
        )?,
        Probe::MmioLoop { n, addr } => {
            io_loop(asm, n, |a| a.mov(rbx, addr), |a| a.mov(dword_ptr(rbx), eax))?
        }
        Probe::MmioReadLoop { n, addr } => {
            io_loop(asm, n, |a| a.mov(rbx, addr), |a| a.mov(eax, dword_ptr(rbx)))?
        }
        Probe::PciScan => super::pci::pci_scan(asm)?,
        Probe::VirtioRng => super::pci::virtio_rng(asm)?,
        Probe::VirtioBlk => super::pci::virtio_blk(asm)?,
        Probe::Counter => counter(asm)?,
    }
    Ok(None)
}

/// The counter's timer vector, period (APIC bus clocks, divide by 1) and ticks per line.
const COUNTER_VECTOR: u32 = 0x30;
const COUNTER_PERIOD: u32 = 10_000_000;
const COUNTER_TICKS_PER_LINE: u32 = 10;
const LAPIC_EOI: i32 = 0xb0;
const LAPIC_LVT_TIMER: i32 = 0x320;
const LAPIC_TIMER_INITIAL: i32 = 0x380;
const LAPIC_TIMER_DIVIDE: i32 = 0x3e0;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;

/// `Probe::Counter`.
fn counter(asm: &mut Asm) -> Result<(), IcedError> {
    let ticks = asm.blob(vec![0u8; 8]);
    let mut on_tick = asm.label();
    let mut next = asm.label();
    let mut wait = asm.label();
    asm.idt_entries = asm.idt_entries.max(COUNTER_VECTOR + 1);
    asm.a.mov(edi, COUNTER_VECTOR)?;
    asm.a.lea(rax, ptr(on_tick))?;
    asm.a.mov(edx, GATE_INTERRUPT_DPL0)?;
    asm.a.call(asm.l.set_gate)?;
    {
        let a = &mut asm.a;
        a.mov(ebx, LAPIC_START as u32)?;
        a.mov(dword_ptr(rbx + LAPIC_SVR), 0x1ffu32)?;
        a.mov(dword_ptr(rbx + LAPIC_TIMER_DIVIDE), 0xbu32)?; // divide by 1
        a.mov(
            dword_ptr(rbx + LAPIC_LVT_TIMER),
            COUNTER_VECTOR | LVT_TIMER_PERIODIC,
        )?;
        a.mov(dword_ptr(rbx + LAPIC_TIMER_INITIAL), COUNTER_PERIOD)?;
        a.xor(r12d, r12d)?; // the count
        a.xor(r13d, r13d)?; // ticks at the last line
    }
    asm.set(&mut next)?;
    asm.print("count ")?;
    asm.print_dec(r12, 1)?;
    asm.print_char(b'\n')?;
    asm.a.inc(r12)?;
    asm.a.add(r13d, COUNTER_TICKS_PER_LINE)?;
    asm.set(&mut wait)?;
    // `sti; hlt`: an interrupt pending as hlt starts is still taken, so none is lost.
    asm.a.sti()?;
    asm.a.hlt()?;
    asm.a.cli()?;
    asm.a.mov(eax, dword_ptr(ticks))?;
    asm.a.sub(eax, r13d)?;
    asm.a.cmp(eax, COUNTER_TICKS_PER_LINE)?;
    // Signed: ticks at or past the next line's (wrapping arithmetic on the 32-bit counts).
    asm.a.jge(next)?;
    asm.a.jmp(wait)?;
    asm.set(&mut on_tick)?;
    asm.a.push(rbx)?;
    asm.a.inc(dword_ptr(ticks))?;
    asm.a.mov(ebx, LAPIC_START as u32)?;
    asm.a.mov(dword_ptr(rbx + LAPIC_EOI), 0u32)?;
    asm.a.pop(rbx)?;
    asm.a.iretq()
}

/// `still-running`, then halt for good (a reset that did not happen).
fn still_running(asm: &mut Asm) -> Result<(), IcedError> {
    asm.print("still-running\n")?;
    asm.a.jmp(asm.l.halt)
}

/// `S`, `n` accesses, `E`, power-off. `setup` loads the target, `access` is the loop body.
fn io_loop(
    asm: &mut Asm,
    n: u32,
    setup: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    access: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    asm.print("S\n")?;
    setup(&mut asm.a)?;
    asm.a.xor(eax, eax)?;
    asm.a.mov(ecx, n)?;
    let mut done = asm.label();
    let mut next = asm.label();
    asm.a.test(ecx, ecx)?;
    asm.a.jz(done)?;
    asm.set(&mut next)?;
    access(&mut asm.a)?;
    asm.a.dec(ecx)?;
    asm.a.jnz(next)?;
    asm.set(&mut done)?;
    asm.print("E\n")?;
    asm.a.jmp(asm.l.power_off)
}

/// Reads and writes an unclaimed port and an unclaimed MMIO address.
fn unknown_io(asm: &mut Asm) -> Result<(), IcedError> {
    let a = &mut asm.a;
    a.mov(edx, u32::from(UNKNOWN_PORT))?;
    a.xor(eax, eax)?;
    a.in_(al, dx)?;
    a.mov(r12d, eax)?;
    a.xor(eax, eax)?;
    a.in_(ax, dx)?;
    a.mov(r13d, eax)?;
    a.in_(eax, dx)?;
    a.mov(r14d, eax)?;
    a.mov(ebx, UNKNOWN_MMIO_ADDR as u32)?;
    a.mov(eax, dword_ptr(rbx))?;
    a.mov(r15d, eax)?;
    // Writes, which must be ignored.
    a.mov(eax, 0x5a5a_5a5au32)?;
    a.out(dx, al)?;
    a.out(dx, ax)?;
    a.out(dx, eax)?;
    a.mov(dword_ptr(rbx), eax)?;
    asm.print("unknown-io: pio8=")?;
    asm.print_hex(r12, 2)?;
    asm.print(" pio16=")?;
    asm.print_hex(r13, 4)?;
    asm.print(" pio32=")?;
    asm.print_hex(r14, 8)?;
    asm.print(" mmio32=")?;
    asm.print_hex(r15, 8)?;
    asm.print("\n")?;
    asm.a.jmp(asm.l.power_off)
}

/// Inline: RAX = TSC (EDX:EAX combined).
fn emit_rdtsc64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// Inline: waits `ticks` TSC ticks (bounded in iterations too). Clobbers RAX, RCX, RDX, R8, R9.
fn emit_delay(a: &mut CodeAssembler, ticks: u64) -> Result<(), IcedError> {
    emit_rdtsc64(a)?;
    a.mov(r8, rax)?;
    a.mov(r9, ticks)?;
    a.mov(rcx, (ticks / TSC_TICKS_PER_ITERATION).max(1000))?;
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut next)?;
    a.pause()?;
    emit_rdtsc64(a)?;
    a.sub(rax, r8)?;
    a.cmp(rax, r9)?;
    a.jae(done)?;
    a.dec(rcx)?;
    a.jnz(next)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// Inline: spins until the print lock is ours (`xchg` with memory is locked, SDM Vol. 3A
/// §8.1.2.1). Needs no stack. Clobbers EAX.
fn emit_acquire(asm: &mut Asm) -> Result<(), IcedError> {
    let mut spin = asm.label();
    let mut got = asm.label();
    asm.set(&mut spin)?;
    asm.a.mov(eax, 1u32)?;
    asm.a.xchg(dword_ptr(asm.l.lock), eax)?;
    asm.a.test(eax, eax)?;
    asm.a.jz(got)?;
    asm.a.pause()?;
    asm.a.jmp(spin)?;
    asm.set(&mut got)?;
    asm.a.nop()
}

/// Inline: writes ICR low (RBX = LAPIC base) and waits (bounded) for the delivery to finish.
fn emit_send_ipi(a: &mut CodeAssembler, icr_low: u32) -> Result<(), IcedError> {
    a.mov(dword_ptr(rbx + LAPIC_ICR_HIGH), 0u32)?;
    a.mov(dword_ptr(rbx + LAPIC_ICR_LOW), icr_low)?;
    a.mov(ecx, ICR_POLL_LIMIT)?;
    let mut poll = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut poll)?;
    a.test(dword_ptr(rbx + LAPIC_ICR_LOW), ICR_DELIVERY_PENDING)?;
    a.jz(done)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(poll)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// The SMP probe: BSP line, INIT-SIPI-SIPI to all others (SDM Vol. 3A §8.4.4.1), wait until
/// the AP count is quiet, `cpus <n>`. Returns the label of the APs' 64-bit code.
fn smp(asm: &mut Asm, ap32: u64) -> Result<CodeLabel, ProbeError> {
    let tramp = trampoline(ap32)?;
    let tramp_len = tramp.len() as u32;
    let tramp_label = asm.blob(tramp);

    asm.a.mov(eax, 1u32)?;
    asm.a.cpuid()?;
    asm.a.shr(ebx, 24)?;
    asm.print("cpu ")?;
    asm.print_dec(rbx, 1)?;
    asm.print(" bsp\n")?;
    asm.a.mov(dword_ptr(asm.l.lock), 0u32)?;
    asm.a.mov(dword_ptr(asm.l.ap_count), 0u32)?;
    // Trampoline to its page, then the GDTR for its lgdt.
    asm.a.lea(rsi, ptr(tramp_label))?;
    asm.a.mov(edi, TRAMPOLINE as u32)?;
    asm.a.mov(ecx, tramp_len)?;
    asm.a.rep().movsb()?;
    asm.a.mov(edi, (TRAMPOLINE + TRAMPOLINE_GDTR) as u32)?;
    asm.a.sgdt(ptr(rdi))?;
    // Software-enable the local APIC, then INIT, SIPI, SIPI.
    asm.a.mov(ebx, LAPIC_START as u32)?;
    asm.a.mov(eax, dword_ptr(rbx + LAPIC_SVR))?;
    asm.a.or(eax, SVR_APIC_ENABLE)?;
    asm.a.mov(dword_ptr(rbx + LAPIC_SVR), eax)?;
    emit_send_ipi(&mut asm.a, ICR_INIT_ALL_EXCLUDING_SELF)?;
    emit_delay(&mut asm.a, INIT_DELAY_TSC)?;
    for _ in 0..2 {
        emit_send_ipi(
            &mut asm.a,
            ICR_STARTUP_ALL_EXCLUDING_SELF | u32::from(SIPI_VECTOR),
        )?;
        emit_delay(&mut asm.a, SIPI_DELAY_TSC)?;
    }
    // Wait until the AP count has been stable for AP_QUIET_TSC (bounded in iterations).
    {
        let a = &mut asm.a;
        emit_rdtsc64(a)?;
        a.mov(r8, rax)?; // time of the last change
        a.mov(r11d, dword_ptr(asm.l.ap_count))?; // count at the last change
        a.mov(r9, AP_QUIET_TSC)?;
        a.mov(r10, AP_QUIET_TSC / TSC_TICKS_PER_ITERATION)?;
        let mut next = a.create_label();
        let mut same = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next)?;
        a.pause()?;
        a.mov(eax, dword_ptr(asm.l.ap_count))?;
        a.cmp(eax, r11d)?;
        a.je(same)?;
        a.mov(r11d, eax)?;
        emit_rdtsc64(a)?;
        a.mov(r8, rax)?;
        a.set_label(&mut same)?;
        emit_rdtsc64(a)?;
        a.sub(rax, r8)?;
        a.cmp(rax, r9)?;
        a.jae(done)?;
        a.dec(r10)?;
        a.jnz(next)?;
        a.set_label(&mut done)?;
        a.nop()?;
    }
    emit_acquire(asm)?;
    asm.a.mov(eax, dword_ptr(asm.l.ap_count))?;
    asm.a.inc(eax)?;
    asm.print("cpus ")?;
    asm.print_dec(rax, 1)?;
    asm.print("\n")?;
    asm.a.mov(dword_ptr(asm.l.lock), 0u32)?;
    asm.a.jmp(asm.l.power_off)?;

    // APs: from the 32-bit step, long mode on the BSP's tables, no stack until the lock is held.
    let mut ap64 = asm.label();
    asm.set(&mut ap64)?;
    asm.a.mov(eax, SEL_DATA as u32)?;
    asm.a.mov(ds, ax)?;
    asm.a.mov(es, ax)?;
    asm.a.mov(ss, ax)?;
    emit_acquire(asm)?;
    asm.a.mov(esp, AP_STACK_TOP as u32)?;
    asm.a.lidt(ptr(asm.l.idtr))?;
    asm.a.mov(eax, 1u32)?;
    asm.a.cpuid()?;
    asm.a.shr(ebx, 24)?;
    asm.print("cpu ")?;
    asm.print_dec(rbx, 1)?;
    asm.print(" ")?;
    asm.a.mov(ebx, LAPIC_START as u32)?;
    asm.a.mov(eax, dword_ptr(rbx + LAPIC_ID))?;
    asm.a.shr(eax, 24)?;
    asm.print_dec(rax, 1)?;
    asm.print("\n")?;
    asm.a.lock().inc(dword_ptr(asm.l.ap_count))?;
    asm.a.mov(dword_ptr(asm.l.lock), 0u32)?;
    asm.a.jmp(asm.l.halt)?;
    Ok(ap64)
}

/// Inline helper: AL = CMOS register AL (index port 0x70, data port 0x71).
fn emit_cmos_read(a: &mut CodeAssembler, register: u32) -> Result<(), IcedError> {
    a.mov(al, register)?;
    a.mov(edx, u32::from(CMOS_PORT))?;
    a.out(dx, al)?;
    a.inc(edx)?;
    a.in_(al, dx)
}

/// Inline: converts the BCD byte in `reg` (32-bit) to binary. Clobbers EAX, ECX.
fn emit_bcd_to_binary(a: &mut CodeAssembler, reg: AsmRegister32) -> Result<(), IcedError> {
    a.mov(eax, reg)?;
    a.and(eax, 0xf)?;
    a.mov(ecx, reg)?;
    a.shr(ecx, 4)?;
    a.and(ecx, 0xf)?;
    a.imul_3(ecx, ecx, 10)?;
    a.add(eax, ecx)?;
    a.mov(reg, eax)
}

/// The RTC probe: consistent read (UIP clear, seconds unchanged across the read), BCD or
/// binary and 12/24-hour as status B says, printed as `rtc: YYYY-MM-DD HH:MM:SS`.
fn cmos_time(asm: &mut Asm) -> Result<(), IcedError> {
    let fields = [
        (RTC_SECONDS, r8d),
        (RTC_MINUTES, r9d),
        (RTC_HOURS, r10d),
        (RTC_DAY, r11d),
        (RTC_MONTH, r12d),
        (RTC_YEAR, r13d),
        (RTC_CENTURY, r14d),
    ];
    {
        let a = &mut asm.a;
        a.mov(r15d, RTC_ATTEMPTS)?;
        let mut attempt = a.create_label();
        let mut stable = a.create_label();
        a.set_label(&mut attempt)?;
        // Wait (bounded) for "no update in progress".
        a.mov(esi, RTC_UIP_POLL_LIMIT)?;
        let mut uip = a.create_label();
        let mut uip_clear = a.create_label();
        a.set_label(&mut uip)?;
        emit_cmos_read(a, RTC_STATUS_A)?;
        a.test(al, RTC_A_UIP)?;
        a.jz(uip_clear)?;
        a.pause()?;
        a.dec(esi)?;
        a.jnz(uip)?;
        a.set_label(&mut uip_clear)?;
        for (register, reg) in fields {
            emit_cmos_read(a, register)?;
            a.movzx(reg, al)?;
        }
        emit_cmos_read(a, RTC_SECONDS)?;
        a.movzx(eax, al)?;
        a.cmp(eax, r8d)?;
        a.je(stable)?;
        a.dec(r15d)?;
        a.jnz(attempt)?;
        a.set_label(&mut stable)?;
        emit_cmos_read(a, RTC_STATUS_B)?;
        a.movzx(ebx, al)?;
        // 12-hour mode keeps PM in bit 7 of the hour.
        a.mov(esi, r10d)?;
        a.and(esi, RTC_HOUR_PM)?;
        a.and(r10d, !RTC_HOUR_PM & 0xff)?;
        let mut binary = a.create_label();
        a.test(ebx, RTC_B_BINARY)?;
        a.jnz(binary)?;
        for (_, reg) in fields {
            emit_bcd_to_binary(a, reg)?;
        }
        a.set_label(&mut binary)?;
        let mut hours_done = a.create_label();
        let mut not_twelve = a.create_label();
        a.test(ebx, RTC_B_24H)?;
        a.jnz(hours_done)?;
        a.cmp(r10d, 12)?; // 12 AM is 00, 12 PM is 12
        a.jne(not_twelve)?;
        a.xor(r10d, r10d)?;
        a.set_label(&mut not_twelve)?;
        a.test(esi, esi)?;
        a.jz(hours_done)?;
        a.add(r10d, 12)?;
        a.set_label(&mut hours_done)?;
        // A century register that reads as nonsense (absent): assume 20.
        let mut century_bad = a.create_label();
        let mut century_ok = a.create_label();
        a.cmp(r14d, 19)?;
        a.jb(century_bad)?;
        a.cmp(r14d, 99)?;
        a.jbe(century_ok)?;
        a.set_label(&mut century_bad)?;
        a.mov(r14d, 20u32)?;
        a.set_label(&mut century_ok)?;
        a.nop()?;
    }
    asm.print("rtc: ")?;
    asm.print_dec(r14, 2)?;
    asm.print_dec(r13, 2)?;
    asm.print_char(b'-')?;
    asm.print_dec(r12, 2)?;
    asm.print_char(b'-')?;
    asm.print_dec(r11, 2)?;
    asm.print_char(b' ')?;
    asm.print_dec(r10, 2)?;
    asm.print_char(b':')?;
    asm.print_dec(r9, 2)?;
    asm.print_char(b':')?;
    asm.print_dec(r8, 2)?;
    asm.print_char(b'\n')?;
    asm.a.jmp(asm.l.power_off)
}

/// The user-mode probe: TSS with RSP0, `iretq` to ring 3,
/// the loop in ring 3, a #GP (from `hlt`) back to ring 0, which prints what ring 3 found (SDM Vol. 3A §6.12.1, §7.7).
fn user_mode(asm: &mut Asm, n: u32) -> Result<(), IcedError> {
    const GP_VECTOR: u32 = 13;
    let mut user_code = asm.label();
    let mut user_return = asm.label();
    {
        let a = &mut asm.a;
        // TSS: all zero but RSP0 and the I/O map base (= size: no bitmap).
        a.mov(edi, TSS as u32)?;
        a.xor(eax, eax)?;
        a.mov(ecx, (TSS_SIZE / 8) as u32)?;
        a.rep().stosq()?;
        a.mov(edi, TSS as u32)?;
        a.mov(eax, RSP0_STACK_TOP as u32)?;
        a.mov(qword_ptr(rdi + 4), rax)?;
        a.mov(word_ptr(rdi + 102), TSS_SIZE as u32)?;
        a.mov(eax, SEL_TSS as u32)?;
        a.ltr(ax)?;
        // #GP goes to `user_return` (exceptions ignore the gate's DPL).
        a.mov(edi, GP_VECTOR)?;
        a.lea(rax, ptr(user_return))?;
        a.mov(edx, GATE_INTERRUPT_DPL0)?;
    }
    asm.a.call(asm.l.set_gate)?;
    {
        let a = &mut asm.a;
        a.push(i32::from(SEL_USER_DATA))?;
        a.mov(eax, USER_STACK_TOP as u32)?;
        a.push(rax)?;
        a.push(USER_RFLAGS as i32)?;
        a.push(i32::from(SEL_USER_CODE64))?;
        a.lea(rax, ptr(user_code))?;
        a.push(rax)?;
        a.iretq()?;
        // Ring 3.
        a.set_label(&mut user_code)?;
        a.mov(rax, USER_MODE_SEED)?;
        a.mov(rdx, USER_MODE_MULTIPLIER)?;
        a.mov(ecx, n)?;
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.test(ecx, ecx)?;
        a.jz(done)?;
        a.set_label(&mut next)?;
        a.imul_2(rax, rdx)?;
        a.add(rax, rcx)?;
        a.mov(rbx, rax)?;
        a.shr(rbx, 29)?;
        a.xor(rax, rbx)?;
        a.dec(ecx)?;
        a.jnz(next)?;
        a.set_label(&mut done)?;
        a.mov(r12, rax)?;
    }
    // Ring 3 records its CPL and result, then returns to ring 0 through the #GP that `hlt`
    // raises at CPL 3, and ring 0 prints them: ring-3 port I/O, `int 0x80` and SYSCALL with
    // a stock LSTAR are not available everywhere (KVM-PVM refuses them).
    asm.a.xor(eax, eax)?;
    asm.a.mov(ax, cs)?;
    asm.a.and(eax, 3)?;
    asm.a.mov(r13, rax)?;
    asm.a.hlt()?; // privileged: #GP(0) into ring 0
    asm.a.ud2()?; // not reached
    asm.set(&mut user_return)?;
    asm.a.mov(rsp, RSP0_STACK_TOP)?;
    asm.print("user: cpl=")?;
    asm.print_dec(r13, 1)?;
    asm.print(" result=")?;
    asm.print_hex(r12, 16)?;
    asm.print("\n")?;
    asm.print("user: back in ring 0\n")?;
    asm.a.jmp(asm.l.power_off)
}
