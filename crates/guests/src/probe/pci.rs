//! PCI probes: enumerate bus 0 through configuration mechanism #1 (PCI Local Bus Spec 3.0
//! §3.2.2.3.2), size the BARs (§6.2.5.1), cross-check against ECAM; and drive a virtio-rng
//! device the way a driver does (virtio 1.2 §3.1.1, §4.1) with an MSI-X interrupt, which
//! exercises queue notifications (ioeventfd) and MSI routing (irqfd) end to end.

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use vireo_arch::layout::{
    LAPIC_START, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT, PCI_ECAM_START,
};

use super::asm::{Asm, GATE_INTERRUPT_DPL0};

/// CONFIG_ADDRESS enable bit.
const CONFIG_ENABLE: u32 = 1 << 31;
/// Configuration registers (§6.1).
const REG_COMMAND: u32 = 0x04;
const REG_CLASS: u32 = 0x08;
const REG_HEADER: u32 = 0x0c;
const REG_BAR0: u32 = 0x10;
const REG_CAP_PTR: u32 = 0x34;
/// Header type bit 7 (in the dword at 0x0c): a multi-function device.
const HEADER_MULTI_FUNCTION: u32 = 1 << 23;
/// Status bit 4 (in the dword at 0x04): a capability list.
const STATUS_CAP_LIST: u32 = 1 << 20;
const COMMAND_DECODE: u32 = 0b11;
const COMMAND_MEMORY_BUS_MASTER: u32 = 0b110;
/// Capability walks stop after this many entries (a loop in the list cannot hang the probe).
const MAX_CAPS: u32 = 48;

/// Where the virtio probe puts the device's BAR (inside the 32-bit window, identity-mapped
/// and uncached by the probe) and its queue (RAM above the image).
pub(crate) const VIRTIO_BAR: u32 = 0xc100_0000;
const QUEUE_DESC: u32 = 0x30_0000;
const QUEUE_AVAIL: u32 = 0x30_0100;
const QUEUE_USED: u32 = 0x30_1000;
const BUFFER: u32 = 0x30_2000;
const QUEUE_SIZE: u32 = 16;
const BUFFER_LEN: u32 = 64;
/// End of the area the virtio probes zero (rings, buffers, block request data).
const DATA_END: u32 = 0x30_6000;
/// virtio-pci common configuration registers (virtio 1.2 §4.1.4.3).
const CC_DRIVER_FEATURE_SELECT: i32 = 0x08;
const CC_DRIVER_FEATURE: i32 = 0x0c;
const CC_CONFIG_MSIX_VECTOR: i32 = 0x10;
const CC_STATUS: i32 = 0x14;
const CC_QUEUE_SELECT: i32 = 0x16;
const CC_QUEUE_SIZE: i32 = 0x18;
const CC_QUEUE_MSIX_VECTOR: i32 = 0x1a;
const CC_QUEUE_ENABLE: i32 = 0x1c;
const CC_QUEUE_NOTIFY_OFF: i32 = 0x1e;
const CC_QUEUE_DESC: i32 = 0x20;
const CC_QUEUE_DRIVER: i32 = 0x28;
const CC_QUEUE_DEVICE: i32 = 0x30;
/// This VMM's BAR layout (the capabilities say the same; the probe trusts them to agree).
const NOTIFY_OFFSET: u32 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: i32 = 0x4000;
/// Interrupt vectors: the queue's MSI, and the LAPIC timer that bounds the wait.
const VECTOR_QUEUE: u32 = 0x40;
const VECTOR_TIMEOUT: u32 = 0x41;
/// LAPIC registers (SDM Vol. 3A §11.4.1 Table 11-1).
const LAPIC_EOI: i32 = 0xb0;
const LAPIC_SVR: i32 = 0xf0;
const LAPIC_LVT_TIMER: i32 = 0x320;
const LAPIC_TIMER_INITIAL: i32 = 0x380;
const LAPIC_TIMER_DIVIDE: i32 = 0x3e0;
/// About two seconds of LAPIC timer at KVM's 1 GHz APIC bus, divide by 1.
const TIMEOUT_TICKS: u32 = 0x8000_0000;

/// Inline: EAX = configuration dword ECX of the function R12D selects. Clobbers EDX.
fn cfg_read(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, r12d)?;
    a.or(eax, ecx)?;
    a.mov(edx, u32::from(PCI_CONFIG_ADDRESS_PORT))?;
    a.out(dx, eax)?;
    a.mov(edx, u32::from(PCI_CONFIG_DATA_PORT))?;
    a.in_(eax, dx)
}

/// Inline: configuration dword ECX of the function R12D selects = EBX. Clobbers EAX, EDX.
fn cfg_write(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, r12d)?;
    a.or(eax, ecx)?;
    a.mov(edx, u32::from(PCI_CONFIG_ADDRESS_PORT))?;
    a.out(dx, eax)?;
    a.mov(edx, u32::from(PCI_CONFIG_DATA_PORT))?;
    a.mov(eax, ebx)?;
    a.out(dx, eax)
}

/// Inline: R12D = CONFIG_ADDRESS of device R13D, function R14D. Clobbers EAX.
fn select(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, r13d)?;
    a.shl(eax, 11)?;
    a.mov(r12d, r14d)?;
    a.shl(r12d, 8)?;
    a.or(r12d, eax)?;
    a.or(r12d, CONFIG_ENABLE)
}

/// Emits `00:SS.F` for R13 (device) and R14 (function).
fn print_bdf(asm: &mut Asm) -> Result<(), IcedError> {
    asm.print("00:")?;
    asm.print_hex(r13, 2)?;
    asm.print_char(b'.')?;
    asm.print_hex(r14, 1)
}

/// Loops over every function of bus 0 (device R13, function R14, R12D selecting it) and runs
/// `body` for each that exists; the body must preserve R12-R14.
fn for_each_function(
    asm: &mut Asm,
    mut body: impl FnMut(&mut Asm) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut dev_loop = asm.label();
    let mut fn_loop = asm.label();
    let mut next_fn = asm.label();
    let mut next_dev = asm.label();
    let mut present = asm.label();
    let mut done = asm.label();
    asm.a.xor(r13d, r13d)?;
    asm.set(&mut dev_loop)?;
    asm.a.xor(r14d, r14d)?;
    asm.set(&mut fn_loop)?;
    select(&mut asm.a)?;
    asm.a.xor(ecx, ecx)?;
    cfg_read(&mut asm.a)?;
    asm.a.cmp(eax, 0xffff_ffffu32)?;
    asm.a.jne(present)?;
    asm.a.test(r14d, r14d)?;
    asm.a.jz(next_dev)?; // no function 0: no device
    asm.a.jmp(next_fn)?;
    asm.set(&mut present)?;
    body(asm)?;
    // Functions 1-7 only exist on a multi-function device (function 0's header type).
    asm.a.test(r14d, r14d)?;
    asm.a.jnz(next_fn)?;
    asm.a.mov(ecx, REG_HEADER)?;
    cfg_read(&mut asm.a)?;
    asm.a.test(eax, HEADER_MULTI_FUNCTION)?;
    asm.a.jz(next_dev)?;
    asm.set(&mut next_fn)?;
    asm.a.inc(r14d)?;
    asm.a.cmp(r14d, 8)?;
    asm.a.jb(fn_loop)?;
    asm.set(&mut next_dev)?;
    asm.a.inc(r13d)?;
    asm.a.cmp(r13d, 32)?;
    asm.a.jb(dev_loop)?;
    asm.set(&mut done)?;
    asm.a.nop()
}

/// The PCI scan probe (see [`super::Probe::PciScan`]).
pub(crate) fn pci_scan(asm: &mut Asm) -> Result<(), IcedError> {
    // Pass 1: IDs, class, capabilities; ECAM must read the same IDs.
    asm.a.xor(r15d, r15d)?; // ECAM mismatches
    for_each_function(asm, |asm| {
        asm.a.mov(ebp, eax)?; // vendor:device
                              // ECAM: base + device << 15 + function << 12.
        asm.a.mov(ebx, PCI_ECAM_START as u32)?;
        asm.a.mov(eax, r13d)?;
        asm.a.shl(eax, 15)?;
        asm.a.add(ebx, eax)?;
        asm.a.mov(eax, r14d)?;
        asm.a.shl(eax, 12)?;
        asm.a.add(ebx, eax)?;
        asm.a.mov(eax, dword_ptr(rbx))?;
        let mut same = asm.label();
        asm.a.cmp(eax, ebp)?;
        asm.a.je(same)?;
        asm.a.inc(r15d)?;
        asm.set(&mut same)?;
        asm.print("pci ")?;
        print_bdf(asm)?;
        asm.print_char(b' ')?;
        asm.a.mov(edi, ebp)?;
        asm.a.and(edi, 0xffff)?;
        asm.print_hex(rdi, 4)?;
        asm.print_char(b':')?;
        asm.a.mov(edi, ebp)?;
        asm.a.shr(edi, 16)?;
        asm.print_hex(rdi, 4)?;
        asm.print(" class ")?;
        asm.a.mov(ecx, REG_CLASS)?;
        cfg_read(&mut asm.a)?;
        asm.a.shr(eax, 8)?;
        asm.a.mov(edi, eax)?;
        asm.print_hex(rdi, 6)?;
        asm.print_char(b'\n')?;
        // Capability IDs, if the status register says there is a list.
        let mut no_caps = asm.label();
        let mut next = asm.label();
        let mut end = asm.label();
        asm.a.mov(ecx, REG_COMMAND)?;
        cfg_read(&mut asm.a)?;
        asm.a.test(eax, STATUS_CAP_LIST)?;
        asm.a.jz(no_caps)?;
        asm.print("caps ")?;
        print_bdf(asm)?;
        asm.a.mov(ecx, REG_CAP_PTR)?;
        cfg_read(&mut asm.a)?;
        asm.a.movzx(edi, al)?; // next capability
        asm.a.mov(r8d, MAX_CAPS)?;
        asm.set(&mut next)?;
        asm.a.and(edi, 0xfc)?;
        asm.a.jz(end)?;
        asm.a.mov(ecx, edi)?;
        cfg_read(&mut asm.a)?;
        asm.a.mov(r9d, eax)?;
        asm.print_char(b' ')?;
        asm.a.movzx(edi, r9b)?;
        asm.print_hex(rdi, 2)?;
        asm.a.mov(edi, r9d)?;
        asm.a.shr(edi, 8)?;
        asm.a.and(edi, 0xff)?;
        asm.a.dec(r8d)?;
        asm.a.jnz(next)?;
        asm.set(&mut end)?;
        asm.print_char(b'\n')?;
        asm.set(&mut no_caps)?;
        asm.a.nop()
    })?;
    // Pass 2: BARs, sized with decoding off as an OS does.
    for_each_function(asm, |asm| {
        asm.a.mov(ecx, REG_COMMAND)?;
        cfg_read(&mut asm.a)?;
        asm.a.and(eax, 0xffff)?;
        asm.a.mov(ebp, eax)?; // the command register to restore
        asm.a.mov(ebx, eax)?;
        asm.a.and(ebx, !COMMAND_DECODE & 0xffff)?;
        cfg_write(&mut asm.a)?;
        asm.a.xor(r8d, r8d)?; // BAR index
        let mut bar_loop = asm.label();
        let mut next_bar = asm.label();
        let mut io = asm.label();
        let mut mem64 = asm.label();
        let mut print = asm.label();
        let mut done = asm.label();
        asm.set(&mut bar_loop)?;
        // r9 = original, r10 = all-ones read-back (low dword).
        size_dword(asm)?;
        asm.a.test(r10d, r10d)?;
        asm.a.jz(next_bar)?;
        asm.a.test(r9d, 1)?;
        asm.a.jnz(io)?;
        asm.a.mov(eax, r9d)?;
        asm.a.and(eax, 0b110)?;
        asm.a.cmp(eax, 0b100)?;
        asm.a.je(mem64)?;
        // 32-bit memory: addr = orig & ~0xf, size = ~(mask & ~0xf) + 1.
        asm.a.and(r9d, !0xfu32)?;
        asm.a.and(r10d, !0xfu32)?;
        asm.a.not(r10d)?;
        asm.a.inc(r10d)?;
        asm.a.mov(r11d, 32)?;
        asm.a.jmp(print)?;
        asm.set(&mut io)?;
        asm.a.and(r9d, !0x3u32)?;
        asm.a.and(r10d, !0x3u32)?;
        asm.a.not(r10d)?;
        asm.a.inc(r10d)?;
        asm.a.mov(r11d, 16)?;
        asm.a.jmp(print)?;
        asm.set(&mut mem64)?;
        // The upper half is the next BAR.
        asm.a.and(r9d, !0xfu32)?;
        asm.a.and(r10d, !0xfu32)?;
        asm.a.push(r9)?;
        asm.a.push(r10)?;
        asm.a.inc(r8d)?;
        size_dword(asm)?;
        asm.a.mov(rax, r9)?;
        asm.a.shl(rax, 32)?;
        asm.a.mov(rdi, r10)?;
        asm.a.shl(rdi, 32)?;
        asm.a.pop(r10)?;
        asm.a.pop(r9)?;
        asm.a.dec(r8d)?;
        asm.a.or(r9, rax)?;
        asm.a.or(r10, rdi)?;
        asm.a.not(r10)?;
        asm.a.inc(r10)?;
        asm.a.mov(r11d, 64)?;
        asm.set(&mut print)?;
        asm.print("bar ")?;
        print_bdf(asm)?;
        asm.print_char(b' ')?;
        asm.print_hex(r8, 1)?;
        let mut not_io = asm.label();
        let mut not_32 = asm.label();
        let mut kind_done = asm.label();
        asm.a.cmp(r11d, 16)?;
        asm.a.jne(not_io)?;
        asm.print(" io")?;
        asm.a.jmp(kind_done)?;
        asm.set(&mut not_io)?;
        asm.a.cmp(r11d, 32)?;
        asm.a.jne(not_32)?;
        asm.print(" mem32")?;
        asm.a.jmp(kind_done)?;
        asm.set(&mut not_32)?;
        asm.print(" mem64")?;
        asm.set(&mut kind_done)?;
        asm.print(" addr=")?;
        asm.print_hex(r9, 16)?;
        asm.print(" size=")?;
        asm.print_hex(r10, 16)?;
        asm.print_char(b'\n')?;
        asm.a.cmp(r11d, 64)?;
        asm.a.jne(next_bar)?;
        asm.a.inc(r8d)?; // skip the upper half
        asm.set(&mut next_bar)?;
        asm.a.inc(r8d)?;
        asm.a.cmp(r8d, 6)?;
        asm.a.jb(bar_loop)?;
        asm.set(&mut done)?;
        asm.a.mov(ecx, REG_COMMAND)?;
        asm.a.mov(ebx, ebp)?;
        cfg_write(&mut asm.a)
    })?;
    let mut mismatch = asm.label();
    asm.a.test(r15d, r15d)?;
    asm.a.jnz(mismatch)?;
    asm.print("ecam ok\n")?;
    asm.a.jmp(asm.l.power_off)?;
    asm.set(&mut mismatch)?;
    asm.print("ecam mismatch ")?;
    asm.print_dec(r15, 1)?;
    asm.print_char(b'\n')?;
    asm.a.jmp(asm.l.power_off)
}

/// Inline: the all-ones probe of BAR R8D: R9D = original value, R10D = value read back after
/// writing all-ones; the original is restored. Clobbers EAX, EBX, ECX, EDX.
fn size_dword(asm: &mut Asm) -> Result<(), IcedError> {
    let a = &mut asm.a;
    a.lea(ecx, dword_ptr(r8 * 4 + REG_BAR0 as i32))?;
    cfg_read(a)?;
    a.mov(r9d, eax)?;
    a.mov(ebx, 0xffff_ffffu32)?;
    cfg_write(a)?;
    cfg_read(a)?;
    a.mov(r10d, eax)?;
    a.mov(ebx, r9d)?;
    cfg_write(a)
}

/// Labels of the virtio probes' variables.
struct VirtioVars {
    irq_count: CodeLabel,
    timed_out: CodeLabel,
}

/// Find function 0 with `id` (vendor | device << 16) on bus 0, move its BAR 0 to
/// [`VIRTIO_BAR`], initialise it (virtio 1.2 §3.1.1: VERSION_1 and the device `features` of
/// bits 0-31), route queue 0's MSI-X
/// vector (entry 1) to [`VECTOR_QUEUE`] on the boot CPU, set up queue 0 and DRIVER_OK, and
/// install the interrupt handlers. Leaves R14 = queue 0's notify address. Prints
/// `<name>: found at`, `features-ok` and `driver-ok` lines (or `<name>: not found` and powers
/// off).
fn virtio_setup(
    asm: &mut Asm,
    id: u32,
    name: &str,
    features: u32,
) -> Result<VirtioVars, IcedError> {
    let v = VirtioVars {
        irq_count: asm.blob(vec![0; 8]),
        timed_out: asm.blob(vec![0; 8]),
    };
    let mut found = asm.label();
    asm.a.xor(r13d, r13d)?;
    asm.a.xor(r14d, r14d)?;
    let mut scan = asm.label();
    asm.set(&mut scan)?;
    select(&mut asm.a)?;
    asm.a.xor(ecx, ecx)?;
    cfg_read(&mut asm.a)?;
    asm.a.cmp(eax, id)?;
    asm.a.je(found)?;
    asm.a.inc(r13d)?;
    asm.a.cmp(r13d, 32)?;
    asm.a.jb(scan)?;
    asm.print(&format!("{name}: not found\n"))?;
    asm.a.jmp(asm.l.power_off)?;
    asm.set(&mut found)?;
    // Move BAR 0 (64-bit) with decoding off, then enable memory and bus mastering.
    {
        let a = &mut asm.a;
        a.mov(ecx, REG_COMMAND)?;
        a.xor(ebx, ebx)?;
        cfg_write(a)?;
        a.mov(ecx, REG_BAR0)?;
        a.mov(ebx, VIRTIO_BAR)?;
        cfg_write(a)?;
        a.mov(ecx, REG_BAR0 + 4)?;
        a.xor(ebx, ebx)?;
        cfg_write(a)?;
        a.mov(ecx, REG_COMMAND)?;
        a.mov(ebx, COMMAND_MEMORY_BUS_MASTER)?;
        cfg_write(a)?;
    }
    asm.print(&format!("{name}: found at "))?;
    print_bdf(asm)?;
    asm.print_char(b'\n')?;
    // The MSI-X capability (ID 0x11): R15D = its offset (0 if absent).
    {
        let a = &mut asm.a;
        a.xor(r15d, r15d)?;
        a.mov(ecx, REG_CAP_PTR)?;
        cfg_read(a)?;
        a.movzx(edi, al)?;
        a.mov(r8d, MAX_CAPS)?;
        let mut next = a.create_label();
        let mut end = a.create_label();
        let mut hit = a.create_label();
        a.set_label(&mut next)?;
        a.and(edi, 0xfc)?;
        a.jz(end)?;
        a.mov(ecx, edi)?;
        cfg_read(a)?;
        a.cmp(al, 0x11)?;
        a.je(hit)?;
        a.shr(eax, 8)?;
        a.movzx(edi, al)?;
        a.dec(r8d)?;
        a.jnz(next)?;
        a.jmp(end)?;
        a.set_label(&mut hit)?;
        a.mov(r15d, edi)?;
        a.set_label(&mut end)?;
        a.nop()?;
    }
    {
        let a = &mut asm.a;
        a.mov(ebx, VIRTIO_BAR)?;
        a.mov(byte_ptr(rbx + CC_STATUS), 0u32)?; // reset
        a.mov(byte_ptr(rbx + CC_STATUS), 1u32)?; // ACKNOWLEDGE
        a.mov(byte_ptr(rbx + CC_STATUS), 3u32)?; // DRIVER
        a.mov(dword_ptr(rbx + CC_DRIVER_FEATURE_SELECT), 1u32)?;
        a.mov(dword_ptr(rbx + CC_DRIVER_FEATURE), 1u32)?; // VIRTIO_F_VERSION_1 (bit 32)
        a.mov(dword_ptr(rbx + CC_DRIVER_FEATURE_SELECT), 0u32)?;
        a.mov(dword_ptr(rbx + CC_DRIVER_FEATURE), features)?;
        a.mov(byte_ptr(rbx + CC_STATUS), 0xbu32)?; // FEATURES_OK
        a.movzx(eax, byte_ptr(rbx + CC_STATUS))?;
        a.mov(edi, eax)?;
    }
    asm.print(&format!("{name}: features-ok status="))?;
    asm.print_hex(rdi, 2)?;
    asm.print_char(b'\n')?;
    // MSI-X entry 1 (queue 0's): fixed delivery of VECTOR_QUEUE to APIC 0, unmasked; then
    // MSI-X enable (Message Control bit 15, the top bit of the capability's first dword).
    {
        let a = &mut asm.a;
        a.mov(dword_ptr(rbx + MSIX_TABLE + 16), 0xfee0_0000u32)?;
        a.mov(dword_ptr(rbx + MSIX_TABLE + 20), 0u32)?;
        a.mov(dword_ptr(rbx + MSIX_TABLE + 24), VECTOR_QUEUE)?;
        a.mov(dword_ptr(rbx + MSIX_TABLE + 28), 0u32)?;
        a.push(rbx)?;
        a.mov(ecx, r15d)?;
        cfg_read(a)?;
        a.or(eax, 1u32 << 31)?;
        a.mov(ebx, eax)?;
        cfg_write(a)?;
        a.pop(rbx)?;
        a.mov(word_ptr(rbx + CC_CONFIG_MSIX_VECTOR), 0xffffu32)?;
        a.mov(word_ptr(rbx + CC_QUEUE_SELECT), 0u32)?;
        a.mov(word_ptr(rbx + CC_QUEUE_SIZE), QUEUE_SIZE)?;
        a.mov(word_ptr(rbx + CC_QUEUE_MSIX_VECTOR), 1u32)?;
        a.mov(dword_ptr(rbx + CC_QUEUE_DESC), QUEUE_DESC)?;
        a.mov(dword_ptr(rbx + CC_QUEUE_DESC + 4), 0u32)?;
        a.mov(dword_ptr(rbx + CC_QUEUE_DRIVER), QUEUE_AVAIL)?;
        a.mov(dword_ptr(rbx + CC_QUEUE_DRIVER + 4), 0u32)?;
        a.mov(dword_ptr(rbx + CC_QUEUE_DEVICE), QUEUE_USED)?;
        a.mov(dword_ptr(rbx + CC_QUEUE_DEVICE + 4), 0u32)?;
        // Zero the rings and the data area.
        a.cld()?;
        a.mov(edi, QUEUE_DESC)?;
        a.xor(eax, eax)?;
        a.mov(ecx, DATA_END - QUEUE_DESC)?;
        a.rep().stosb()?;
        a.mov(word_ptr(rbx + CC_QUEUE_ENABLE), 1u32)?;
        a.movzx(eax, word_ptr(rbx + CC_QUEUE_NOTIFY_OFF))?;
        a.imul_3(eax, eax, NOTIFY_MULTIPLIER as i32)?;
        a.add(eax, VIRTIO_BAR + NOTIFY_OFFSET)?;
        a.mov(r14d, eax)?;
        a.mov(byte_ptr(rbx + CC_STATUS), 0xfu32)?; // DRIVER_OK
        a.movzx(eax, word_ptr(rbx + CC_QUEUE_MSIX_VECTOR))?;
        a.mov(edi, eax)?;
        a.movzx(eax, byte_ptr(rbx + CC_STATUS))?;
        a.mov(r8d, eax)?;
    }
    asm.print(&format!("{name}: driver-ok status="))?;
    asm.print_hex(r8, 2)?;
    asm.print(" vector=")?;
    asm.print_hex(rdi, 4)?;
    asm.print_char(b'\n')?;
    // Interrupt handlers (count, EOI, return) and the software-enabled local APIC with its
    // timer in one-shot mode for the timeouts.
    let mut on_queue = asm.label();
    let mut on_timeout = asm.label();
    let mut past = asm.label();
    asm.idt_entries = asm.idt_entries.max(VECTOR_TIMEOUT + 1);
    for (vector, label) in [(VECTOR_QUEUE, on_queue), (VECTOR_TIMEOUT, on_timeout)] {
        asm.a.mov(edi, vector)?;
        asm.a.lea(rax, ptr(label))?;
        asm.a.mov(edx, GATE_INTERRUPT_DPL0)?;
        asm.a.call(asm.l.set_gate)?;
    }
    {
        let a = &mut asm.a;
        a.mov(ebx, LAPIC_START as u32)?;
        a.mov(dword_ptr(rbx + LAPIC_SVR), 0x1ffu32)?;
        a.mov(dword_ptr(rbx + LAPIC_TIMER_DIVIDE), 0xbu32)?; // divide by 1
        a.mov(dword_ptr(rbx + LAPIC_LVT_TIMER), VECTOR_TIMEOUT)?; // one-shot
        a.jmp(past)?;
    }
    for (label, counter) in [(&mut on_queue, v.irq_count), (&mut on_timeout, v.timed_out)] {
        asm.set(label)?;
        asm.a.push(rbx)?;
        asm.a.inc(dword_ptr(counter))?;
        asm.a.mov(ebx, LAPIC_START as u32)?;
        asm.a.mov(dword_ptr(rbx + LAPIC_EOI), 0u32)?;
        asm.a.pop(rbx)?;
        asm.a.iretq()?;
    }
    asm.set(&mut past)?;
    Ok(v)
}

/// One descriptor of a request: address, length, device-writable.
type Buf = (u32, u32, bool);

/// Make a chain of `bufs` available as request number `n` (0-based; descriptors from `3 * n`,
/// at most three per request), notify queue 0, and wait for the interrupt (or the timeout).
/// Afterwards R10 = the used index, R11 = the used length, R12 = timed out (0/1), R8 = the
/// interrupts counted so far.
fn virtio_request(asm: &mut Asm, v: &VirtioVars, n: u32, bufs: &[Buf]) -> Result<(), IcedError> {
    let a = &mut asm.a;
    let first = 3 * n;
    for (i, &(addr, len, write)) in bufs.iter().enumerate() {
        let index = first + i as u32;
        let mut flags = if write { 2u32 } else { 0 }; // VIRTQ_DESC_F_WRITE
        if i + 1 < bufs.len() {
            flags |= 1; // VIRTQ_DESC_F_NEXT
        }
        a.mov(edi, QUEUE_DESC + 16 * index)?;
        a.mov(dword_ptr(rdi), addr)?;
        a.mov(dword_ptr(rdi + 4), 0u32)?;
        a.mov(dword_ptr(rdi + 8), len)?;
        a.mov(word_ptr(rdi + 12), flags)?;
        a.mov(word_ptr(rdi + 14), index + 1)?;
    }
    a.mov(edi, QUEUE_AVAIL)?;
    a.mov(
        word_ptr(rdi + 4 + 2 * (n as i32 % QUEUE_SIZE as i32)),
        first,
    )?;
    a.mfence()?;
    a.mov(word_ptr(rdi + 2), n + 1)?;
    a.mfence()?;
    a.mov(dword_ptr(v.timed_out), 0u32)?;
    a.mov(ebx, LAPIC_START as u32)?;
    a.mov(dword_ptr(rbx + LAPIC_TIMER_INITIAL), TIMEOUT_TICKS)?;
    a.mov(word_ptr(r14), 0u32)?; // notify queue 0
                                 // `sti; hlt` takes an interrupt pending right as hlt starts, so none is lost between the
                                 // check and the wait.
    let mut wait = a.create_label();
    let mut woke = a.create_label();
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(dword_ptr(v.irq_count), n + 1)?;
    a.jae(woke)?;
    a.cmp(dword_ptr(v.timed_out), 0u32)?;
    a.jne(woke)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut woke)?;
    a.cli()?;
    a.mov(dword_ptr(rbx + LAPIC_TIMER_INITIAL), 0u32)?;
    a.mov(edi, QUEUE_USED)?;
    a.movzx(r10d, word_ptr(rdi + 2))?;
    a.mov(
        r11d,
        dword_ptr(rdi + 4 + 8 * (n as i32 % QUEUE_SIZE as i32) + 4),
    )?;
    a.mov(r12d, dword_ptr(v.timed_out))?;
    a.mov(r8d, dword_ptr(v.irq_count))
}

/// Prints ` irq=<n> timeout=<0/1> used=<n> len=<n>` from [`virtio_request`]'s registers.
fn print_completion(asm: &mut Asm) -> Result<(), IcedError> {
    asm.print(" irq=")?;
    asm.print_dec(r8, 1)?;
    asm.print(" timeout=")?;
    asm.print_dec(r12, 1)?;
    asm.print(" used=")?;
    asm.print_dec(r10, 1)?;
    asm.print(" len=")?;
    asm.print_dec(r11, 1)
}

/// The virtio-rng probe (see [`super::Probe::VirtioRng`]).
pub(crate) fn virtio_rng(asm: &mut Asm) -> Result<(), IcedError> {
    let v = virtio_setup(asm, 0x1044_1af4, "virtio-rng", 0)?;
    virtio_request(asm, &v, 0, &[(BUFFER, BUFFER_LEN, true)])?;
    // Did the buffer get random bytes? R9 = OR of its qwords.
    asm.a.xor(r9d, r9d)?;
    asm.a.mov(esi, BUFFER)?;
    for i in 0..(BUFFER_LEN / 8) as i32 {
        asm.a.or(r9, qword_ptr(rsi + 8 * i))?;
    }
    asm.print("virtio-rng:")?;
    print_completion(asm)?;
    asm.print(" random=")?;
    let mut zero = asm.label();
    let mut printed = asm.label();
    asm.a.test(r9, r9)?;
    asm.a.jz(zero)?;
    asm.print("yes\n")?;
    asm.a.jmp(printed)?;
    asm.set(&mut zero)?;
    asm.print("no\n")?;
    asm.set(&mut printed)?;
    asm.a.jmp(asm.l.power_off)
}

/// virtio-blk request types and the block probe's data (virtio 1.2 §5.2.6).
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const BLK_T_GET_ID: u32 = 8;
const BLK_F_FLUSH: u32 = 1 << 9;
const BLK_HEADER: u32 = 0x30_3000;
const BLK_STATUS: u32 = 0x30_3100;
const BLK_READ: u32 = 0x30_4000;
const BLK_WRITE: u32 = 0x30_5000;
const SECTOR: u32 = 512;
/// What the block probe writes to sector 1: this text, repeated.
pub(crate) const BLK_PROBE_PATTERN: &[u8; 16] = b"vireo-probe-blk\n";

/// Inline: header (type, sector) at BLK_HEADER and status byte 0xff.
fn blk_header(a: &mut CodeAssembler, kind: u32, sector: u32) -> Result<(), IcedError> {
    a.mov(edi, BLK_HEADER)?;
    a.mov(dword_ptr(rdi), kind)?;
    a.mov(dword_ptr(rdi + 4), 0u32)?;
    a.mov(dword_ptr(rdi + 8), sector)?;
    a.mov(dword_ptr(rdi + 12), 0u32)?;
    a.mov(edi, BLK_STATUS)?;
    a.mov(byte_ptr(rdi), 0xffu32)
}

/// Prints ` status=<hex>` of the last block request.
fn print_blk_status(asm: &mut Asm) -> Result<(), IcedError> {
    asm.a.mov(edi, BLK_STATUS)?;
    asm.a.movzx(r9d, byte_ptr(rdi))?;
    asm.print(" status=")?;
    asm.print_hex(r9, 2)
}

/// The virtio-blk probe (see [`super::Probe::VirtioBlk`]).
pub(crate) fn virtio_blk(asm: &mut Asm) -> Result<(), IcedError> {
    let v = virtio_setup(asm, 0x1042_1af4, "virtio-blk", BLK_F_FLUSH)?;
    // GET_ID: the serial, 20 bytes, printed as text up to the first NUL.
    blk_header(&mut asm.a, BLK_T_GET_ID, 0)?;
    virtio_request(
        asm,
        &v,
        0,
        &[
            (BLK_HEADER, 16, false),
            (BLK_READ, 20, true),
            (BLK_STATUS, 1, true),
        ],
    )?;
    asm.print("virtio-blk: get-id")?;
    print_completion(asm)?;
    print_blk_status(asm)?;
    asm.print(" serial=")?;
    {
        let mut next = asm.label();
        let mut end = asm.label();
        asm.a.mov(r9d, BLK_READ)?;
        asm.set(&mut next)?;
        asm.a.movzx(eax, byte_ptr(r9))?;
        asm.a.test(al, al)?;
        asm.a.jz(end)?;
        asm.a.call(asm.l.putc)?;
        asm.a.inc(r9d)?;
        asm.a.cmp(r9d, BLK_READ + 20)?;
        asm.a.jb(next)?;
        asm.set(&mut end)?;
        asm.print_char(b'\n')?;
    }
    // IN: sector 0, its first 16 bytes printed in hex (two qwords, byte order as on disk
    // read as little-endian numbers).
    blk_header(&mut asm.a, BLK_T_IN, 0)?;
    virtio_request(
        asm,
        &v,
        1,
        &[
            (BLK_HEADER, 16, false),
            (BLK_READ, SECTOR, true),
            (BLK_STATUS, 1, true),
        ],
    )?;
    asm.print("virtio-blk: read")?;
    print_completion(asm)?;
    print_blk_status(asm)?;
    asm.print(" data=")?;
    asm.a.mov(edi, BLK_READ)?;
    asm.a.mov(r9, qword_ptr(rdi))?;
    asm.a.bswap(r9)?;
    asm.print_hex(r9, 16)?;
    asm.a.mov(edi, BLK_READ)?;
    asm.a.mov(r9, qword_ptr(rdi + 8))?;
    asm.a.bswap(r9)?;
    asm.print_hex(r9, 16)?;
    asm.print_char(b'\n')?;
    // OUT: sector 1 = the pattern, repeated; then FLUSH.
    {
        let a = &mut asm.a;
        let lo = u64::from_le_bytes(BLK_PROBE_PATTERN[..8].try_into().unwrap_or([0; 8]));
        let hi = u64::from_le_bytes(BLK_PROBE_PATTERN[8..].try_into().unwrap_or([0; 8]));
        a.mov(edi, BLK_WRITE)?;
        a.mov(rax, lo)?;
        a.mov(rdx, hi)?;
        a.mov(ecx, SECTOR / 16)?;
        let mut fill = a.create_label();
        a.set_label(&mut fill)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.mov(qword_ptr(rdi + 8), rdx)?;
        a.add(edi, 16)?;
        a.dec(ecx)?;
        a.jnz(fill)?;
    }
    blk_header(&mut asm.a, BLK_T_OUT, 1)?;
    virtio_request(
        asm,
        &v,
        2,
        &[
            (BLK_HEADER, 16, false),
            (BLK_WRITE, SECTOR, false),
            (BLK_STATUS, 1, true),
        ],
    )?;
    asm.print("virtio-blk: write")?;
    print_completion(asm)?;
    print_blk_status(asm)?;
    asm.print_char(b'\n')?;
    blk_header(&mut asm.a, BLK_T_FLUSH, 0)?;
    virtio_request(
        asm,
        &v,
        3,
        &[(BLK_HEADER, 16, false), (BLK_STATUS, 1, true)],
    )?;
    asm.print("virtio-blk: flush")?;
    print_completion(asm)?;
    print_blk_status(asm)?;
    asm.print_char(b'\n')?;
    asm.a.jmp(asm.l.power_off)
}
