//! Backend-neutral vCPU state. Every backend converts to and from these types, so boot code,
//! snapshots and migration never see a backend's own structures.

use serde::{Deserialize, Serialize};

/// General-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache (Intel SDM Vol. 3A §3.4.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Code/data (1) or system (0) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit in 4 KiB units.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// x87 / SSE state in FXSAVE layout terms (Intel SDM Vol. 1 §10.5.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// ST0–ST7 (80-bit values in the low 10 bytes).
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

impl Msr {
    pub const fn new(index: u32, data: u64) -> Self {
        Msr { index, data }
    }
}

/// One CPUID leaf/subleaf result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flags; bit 0: the leaf has significant subleaves (index matters).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `CpuidEntry::flags`: the leaf is indexed by ECX.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// The local APIC register page (the first 1 KiB of the 4 KiB APIC page, SDM Vol. 3A §11.4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    pub regs: Vec<u8>,
}

impl Default for LapicState {
    fn default() -> Self {
        LapicState {
            regs: vec![0; Self::SIZE],
        }
    }
}

impl LapicState {
    pub const SIZE: usize = 1024;

    /// Read the 32-bit register at byte `offset` (out-of-range offsets read 0).
    pub fn reg(&self, offset: usize) -> u32 {
        self.regs
            .get(offset..offset + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0)
    }

    /// Write the 32-bit register at byte `offset` (out-of-range offsets are ignored).
    pub fn set_reg(&mut self, offset: usize, value: u32) {
        if let Some(b) = self.regs.get_mut(offset..offset + 4) {
            b.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// Multiprocessing state of a vCPU (SDM Vol. 3A §9.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpState {
    Runnable,
    /// Application processor waiting for INIT.
    Uninitialized,
    /// Received INIT, waiting for a start-up IPI.
    InitReceived,
    Halted,
    SipiReceived,
}

/// Events a vCPU has pending or in progress besides its registers (what KVM calls vCPU
/// events; SDM Vol. 3A §6.9, §6.7.1): an exception or interrupt being injected, the
/// STI / MOV SS interrupt shadow, NMI state, a latched SIPI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VcpuEvents {
    pub exception_injected: bool,
    pub exception_pending: bool,
    pub exception_nr: u8,
    pub exception_has_error_code: bool,
    pub exception_error_code: u32,
    pub exception_has_payload: bool,
    pub exception_payload: u64,
    pub interrupt_injected: bool,
    pub interrupt_nr: u8,
    pub interrupt_soft: bool,
    /// Interrupt shadow bits (1: STI, 2: MOV SS).
    pub interrupt_shadow: u8,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
    /// NMIs blocked until the next IRET.
    pub nmi_masked: bool,
    pub sipi_vector: u32,
    pub smm: bool,
    pub smi_pending: bool,
    pub smm_inside_nmi: bool,
    pub latched_init: bool,
    pub triple_fault_pending: bool,
}

/// Debug registers DR0-DR3, DR6, DR7 (SDM Vol. 3B §17.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// One extended control register (XCR0 is index 0; SDM Vol. 1 §13.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    pub index: u32,
    pub value: u64,
}

/// Everything that describes one vCPU, for snapshots and migration.
///
/// `fpu` holds x87/SSE state; where the backend has XSAVE state (KVM on a CPU with AVX, ...)
/// `xsave` carries the whole XSAVE area (SDM Vol. 1 §13.4) and wins over `fpu` on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(default)]
    pub id: u32,
    pub regs: Regs,
    pub sregs: Sregs,
    pub fpu: FpuState,
    pub msrs: Vec<Msr>,
    pub lapic: LapicState,
    pub mp_state: MpState,
    #[serde(default)]
    pub cpuid: Vec<CpuidEntry>,
    #[serde(default)]
    pub events: VcpuEvents,
    #[serde(default)]
    pub debug: DebugRegs,
    #[serde(default)]
    pub xcrs: Vec<Xcr>,
    /// The XSAVE area, as 32-bit words (KVM's `kvm_xsave` region).
    #[serde(default)]
    pub xsave: Option<Vec<u32>>,
}

/// One 8259A PIC (Intel 8259A data sheet; the fields KVM keeps, `kvm_pic_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    pub elcr: u8,
    pub elcr_mask: u8,
}

/// The 82093AA IOAPIC: registers and the 24 redirection entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    pub redirtbl: Vec<u64>,
}

/// One 8254 PIT counter (the fields KVM keeps, `kvm_pit_channel_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    /// Host-relative load time (ns); the kernel rebases it on restore.
    pub count_load_time: i64,
}

/// The 8254 PIT with its speaker-port flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    pub channels: Vec<PitChannelState>,
    pub flags: u32,
}

/// VM-wide state kept by the hypervisor backend (not by vireo's devices): the in-kernel
/// interrupt controllers and PIT where the backend has them, and the guest clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The guest clock in nanoseconds (kvmclock on KVM, `GuestClock` on the emulator).
    pub clock_ns: u64,
    /// In-kernel 8259 pair (master, slave), IOAPIC and PIT; `None` when the VMM owns them.
    #[serde(default)]
    pub pic: Option<[PicState; 2]>,
    #[serde(default)]
    pub ioapic: Option<IoapicState>,
    #[serde(default)]
    pub pit: Option<PitState>,
}
