//! Local APIC (Intel SDM Vol. 3A ch. 11, "Advanced Programmable Interrupt Controller").
//!
//! One [`Lapic`] per vCPU, in xAPIC mode (MMIO page, §11.4) or x2APIC mode (MSRs, §11.12):
//! ID, version, TPR/APR/PPR, EOI, LDR/DFR, SVR, the 256-bit ISR/TMR/IRR, ESR, ICR, the six LVT
//! entries (timer, thermal, performance counters, LINT0, LINT1, error), and the timer in
//! one-shot, periodic and TSC-deadline modes. The register page has the architectural layout
//! (§11.4.1 Table 11-1), which is also KVM's `kvm_lapic_state`, so [`Lapic::state`] /
//! [`Lapic::set_state`] exchange snapshots with the KVM backend.
//!
//! The structure is plain state: it never locks, never sleeps and never calls out. Time is a
//! guest TSC value passed in by the caller; an IPI or an EOI that must reach other devices
//! comes back as an [`Action`] for the caller (the [`IrqChip`](super::IrqChip)) to route.
//!
//! ## The timer clock and CPUID leaf 0x15
//!
//! The APIC timer counts the "bus clock" (§11.5.4). Here one bus clock is
//! [`apic_timer_tsc_ratio`] guest TSC cycles: 1 for any TSC up to 4.29 GHz, so with the default
//! 1 GHz guest TSC ([`vireo_hv::GuestClock::DEFAULT_TSC_HZ`]) the APIC timer counts at 1 GHz,
//! 1 ns per clock, as on KVM. The emulated CPU must report CPUID leaf 0x15 as
//! [`cpuid_leaf_0x15`] gives it (EAX = 1, EBX = ratio, ECX = bus clock in Hz): Linux takes ECX
//! as the core crystal clock, computes the TSC frequency as ECX × EBX / EAX and sets its APIC
//! timer period from ECX without calibrating (`native_calibrate_tsc`). CPUID.01H:ECX bit 24
//! (TSC-deadline) may be advertised: the TSC-deadline mode is implemented.
//!
//! Not modelled: SMI, the thermal and performance-counter interrupt sources (their LVT
//! entries are plain registers), LINT1 (not wired), CMCI (the version register reports six LVT
//! entries), EOI-broadcast suppression, focus-processor checks, the "illegal register
//! address" error (as KVM), and x2APIC #GP faults: the trait has no way to report them, so
//! invalid x2APIC accesses are ignored (writes) or read 0.

use tracing::debug;
use vireo_hv::LapicState;

/// Version register: version 0x14 (integrated APIC), max LVT entry 5 (six entries), no
/// EOI-broadcast suppression (§11.4.8).
pub const LAPIC_VERSION: u32 = 0x0005_0014;
/// A destination that matches every local APIC (xAPIC 0xff is normalised to this).
pub const BROADCAST: u32 = 0xffff_ffff;

// Register offsets in the APIC page (§11.4.1 Table 11-1; x2APIC MSR 0x800 + n is n << 4).
pub const APIC_ID: u32 = 0x20;
pub const APIC_VERSION: u32 = 0x30;
pub const APIC_TPR: u32 = 0x80;
pub const APIC_APR: u32 = 0x90;
pub const APIC_PPR: u32 = 0xa0;
pub const APIC_EOI: u32 = 0xb0;
pub const APIC_RRD: u32 = 0xc0;
pub const APIC_LDR: u32 = 0xd0;
pub const APIC_DFR: u32 = 0xe0;
pub const APIC_SVR: u32 = 0xf0;
pub const APIC_ISR: u32 = 0x100;
pub const APIC_TMR: u32 = 0x180;
pub const APIC_IRR: u32 = 0x200;
pub const APIC_ESR: u32 = 0x280;
pub const APIC_ICR_LOW: u32 = 0x300;
pub const APIC_ICR_HIGH: u32 = 0x310;
pub const APIC_LVT_TIMER: u32 = 0x320;
pub const APIC_LVT_THERMAL: u32 = 0x330;
pub const APIC_LVT_PERF: u32 = 0x340;
pub const APIC_LVT_LINT0: u32 = 0x350;
pub const APIC_LVT_LINT1: u32 = 0x360;
pub const APIC_LVT_ERROR: u32 = 0x370;
pub const APIC_TIMER_INITIAL: u32 = 0x380;
pub const APIC_TIMER_CURRENT: u32 = 0x390;
pub const APIC_TIMER_DIVIDE: u32 = 0x3e0;
/// x2APIC only (MSR 0x83f).
pub const APIC_SELF_IPI: u32 = 0x3f0;

/// The register part of the APIC page (64 registers, 16 bytes apart).
const PAGE_REGS: usize = LapicState::SIZE / 16;
const LVT_OFFSETS: [u32; 6] = [
    APIC_LVT_TIMER,
    APIC_LVT_THERMAL,
    APIC_LVT_PERF,
    APIC_LVT_LINT0,
    APIC_LVT_LINT1,
    APIC_LVT_ERROR,
];

// IA32_APIC_BASE (MSR 0x1b, §11.4.4).
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
pub const APIC_DEFAULT_ADDRESS: u64 = 0xfee0_0000;
/// The APIC page address bits (12..=51).
const APIC_BASE_ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

// Error status register bits (§11.5.3).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

// LVT fields (§11.5.1).
pub const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_WRITABLE: u32 = 0x0007_00ff;
const LVT_THERMAL_PERF_WRITABLE: u32 = 0x0001_07ff;
const LVT_LINT_WRITABLE: u32 = 0x0001_a7ff;
const LVT_ERROR_WRITABLE: u32 = 0x0001_00ff;
const LVT_DELIVERY_EXTINT: u32 = 7 << 8;

/// Spurious-interrupt vector register: vector, APIC software enable, focus checking.
const SVR_WRITABLE: u32 = 0x3ff;
pub const SVR_ENABLE: u32 = 1 << 8;

// Interrupt command register (§11.6.1).
const ICR_LOW_WRITABLE: u32 = 0x000c_cfff;
const ICR_DEST_LOGICAL: u32 = 1 << 11;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
const XAPIC_DEST_MASK: u32 = 0xff00_0000;

// Pending-event summary bits (see `Lapic::summary`).
pub(crate) const EV_INIT: u8 = 1;
pub(crate) const EV_SIPI: u8 = 2;
pub(crate) const EV_NMI: u8 = 4;
pub(crate) const EV_INTR: u8 = 8;

/// Guest TSC cycles per APIC timer (bus) clock for a guest TSC of `tsc_hz`: the smallest
/// integer ratio that keeps the bus clock, in Hz, within CPUID.15H:ECX's 32 bits.
pub fn apic_timer_tsc_ratio(tsc_hz: u64) -> u64 {
    tsc_hz.max(1).div_ceil(u64::from(u32::MAX))
}

/// The APIC timer (bus) clock in Hz for a guest TSC of `tsc_hz`.
pub fn apic_bus_hz(tsc_hz: u64) -> u64 {
    tsc_hz.max(1) / apic_timer_tsc_ratio(tsc_hz)
}

/// CPUID leaf 0x15 (Time Stamp Counter and Nominal Core Crystal Clock, SDM Vol. 2A CPUID)
/// consistent with the APIC timer: `[eax, ebx, ecx, edx]` = [denominator 1, numerator =
/// TSC cycles per bus clock, crystal (bus) clock in Hz, 0].
pub fn cpuid_leaf_0x15(tsc_hz: u64) -> [u32; 4] {
    let ratio = apic_timer_tsc_ratio(tsc_hz);
    [
        1,
        u32::try_from(ratio).unwrap_or(u32::MAX),
        u32::try_from(apic_bus_hz(tsc_hz)).unwrap_or(u32::MAX),
        0,
    ]
}

/// True when a write of `new` to IA32_APIC_BASE is a valid transition from `old` (§11.12.5
/// Figure 11-27: disabled ↔ xAPIC → x2APIC → disabled; x2APIC → xAPIC and "x2APIC without
/// enable" are invalid). A CPU backend raises #GP when this is false.
pub fn valid_apic_base_transition(old: u64, new: u64) -> bool {
    let mode = |v: u64| (v & APIC_BASE_ENABLE != 0, v & APIC_BASE_EXTD != 0);
    !matches!(
        (mode(old), mode(new)),
        (_, (false, true)) | ((true, true), (true, false)) | ((false, false), (true, true))
    )
}

/// Interrupt delivery modes of the ICR, LVT, IOAPIC redirection entries and MSI data
/// (§11.6.1, §11.11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    Reserved,
}

impl DeliveryMode {
    /// Decode a 3-bit delivery-mode field.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }

    fn is_fixed(self) -> bool {
        matches!(self, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
    }
}

/// Who an interrupt message is for (§11.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// Physical destination: an APIC ID, or [`BROADCAST`].
    Physical(u32),
    /// Logical destination: a message destination address matched against LDR/DFR.
    Logical(u32),
    /// Shorthand "self": only the vCPU with this index.
    Only(u32),
    /// Shorthand "all including self".
    All,
    /// Shorthand "all excluding self": every vCPU but this index.
    AllBut(u32),
}

/// An interrupt message on the (virtual) system bus: an IPI, an IOAPIC redirection or an MSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub vector: u8,
    pub mode: DeliveryMode,
    pub dest: Dest,
    /// Level-triggered (sets the TMR bit, so the EOI is broadcast to the IOAPIC).
    pub level_triggered: bool,
}

/// What a register write asks of the rest of the interrupt system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Deliver this message (an IPI).
    Send(Message),
    /// A level-triggered vector was EOI'd: broadcast the EOI to the IOAPIC (§11.8.5).
    Eoi(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
    /// LVT timer mode 11b: reserved; the timer does nothing.
    Reserved,
}

/// One local APIC.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Lapic {
    /// The vCPU index: the initial APIC ID and the x2APIC ID.
    index: u32,
    apic_base: u64,
    /// The register page, one `u32` per 16-byte slot.
    #[serde(with = "page_serde")]
    regs: [u32; PAGE_REGS],
    /// Errors detected since the last ESR write; a write moves them into ESR (§11.5.3).
    esr_pending: u32,
    /// Guest TSC cycles per timer bus clock.
    tsc_per_tick: u64,
    /// One-shot/periodic: TSC of the next expiry; `None` when stopped or expired.
    timer_expiry: Option<u64>,
    /// Periodic: TSC cycles per period (0 for one-shot).
    timer_period: u64,
    /// IA32_TSC_DEADLINE; 0 when disarmed.
    tsc_deadline: u64,
    nmi: bool,
    init: bool,
    sipi: Option<u8>,
    /// An ExtINT message arrived (IOAPIC or MSI): the vector comes from the 8259 at INTA.
    extint: bool,
}

/// serde for the register page (serde's arrays stop at 32 elements): a list of exactly
/// [`PAGE_REGS`] values.
mod page_serde {
    use super::PAGE_REGS;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(regs: &[u32; PAGE_REGS], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(regs.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u32; PAGE_REGS], D::Error> {
        let v = Vec::<u32>::deserialize(d)?;
        <[u32; PAGE_REGS]>::try_from(v.as_slice()).map_err(|_| {
            serde::de::Error::custom(format!(
                "a local APIC page of {} registers, not {PAGE_REGS}",
                v.len()
            ))
        })
    }
}

fn slot(offset: u32) -> usize {
    (offset >> 4) as usize
}

impl Lapic {
    /// The local APIC of vCPU `index` in its power-up state (§11.4.7.1), with the timer bus
    /// clock at `tsc_per_tick` guest TSC cycles. Like KVM, the BSP's LINT0 starts as
    /// unmasked ExtINT (virtual wire) since there is no firmware to program it.
    pub fn new(index: u32, tsc_per_tick: u64) -> Self {
        let mut l = Lapic {
            index,
            apic_base: 0,
            regs: [0; PAGE_REGS],
            esr_pending: 0,
            tsc_per_tick: tsc_per_tick.max(1),
            timer_expiry: None,
            timer_period: 0,
            tsc_deadline: 0,
            nmi: false,
            init: false,
            sipi: None,
            extint: false,
        };
        l.apic_base = APIC_DEFAULT_ADDRESS | APIC_BASE_ENABLE;
        if index == 0 {
            l.apic_base |= APIC_BASE_BSP;
        }
        l.reset_registers();
        l
    }

    /// Reset the registers as INIT or power-up does (§11.4.7.1); IA32_APIC_BASE is kept.
    fn reset_registers(&mut self) {
        self.regs = [0; PAGE_REGS];
        self.regs[slot(APIC_ID)] = (self.index & 0xff) << 24;
        self.regs[slot(APIC_VERSION)] = LAPIC_VERSION;
        self.regs[slot(APIC_DFR)] = 0xffff_ffff;
        self.regs[slot(APIC_SVR)] = 0xff;
        for off in LVT_OFFSETS {
            self.regs[slot(off)] = LVT_MASKED;
        }
        if self.index == 0 {
            self.regs[slot(APIC_LVT_LINT0)] = LVT_DELIVERY_EXTINT;
        }
        if self.x2apic() {
            self.regs[slot(APIC_LDR)] = self.x2apic_ldr();
        }
        self.esr_pending = 0;
        self.timer_expiry = None;
        self.timer_period = 0;
        self.tsc_deadline = 0;
        self.nmi = false;
        self.extint = false;
    }

    /// INIT (§9.4.2 / §11.4.7.3): registers reset, pending NMI dropped, IA32_APIC_BASE kept.
    /// A start-up IPI received after the INIT stays pending.
    pub fn init_reset(&mut self) {
        self.init = false;
        self.reset_registers();
    }

    /// The vCPU index and timer ratio this APIC was made with (checked on restore).
    pub(crate) fn identity(&self) -> (u32, u64) {
        (self.index, self.tsc_per_tick)
    }

    pub fn hw_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    pub fn x2apic(&self) -> bool {
        self.hw_enabled() && self.apic_base & APIC_BASE_EXTD != 0
    }

    /// Software enabled (SVR bit 8, §11.4.7.2).
    pub fn sw_enabled(&self) -> bool {
        self.regs[slot(APIC_SVR)] & SVR_ENABLE != 0
    }

    /// The APIC ID physical destinations are compared with.
    pub fn apic_id(&self) -> u32 {
        if self.x2apic() {
            self.index
        } else {
            self.regs[slot(APIC_ID)] >> 24
        }
    }

    fn x2apic_ldr(&self) -> u32 {
        ((self.index >> 4) << 16) | (1 << (self.index & 0xf))
    }

    fn reg(&self, offset: u32) -> u32 {
        self.regs[slot(offset)]
    }

    fn set(&mut self, offset: u32, value: u32) {
        self.regs[slot(offset)] = value;
    }

    fn test_vector(&self, base: u32, v: u8) -> bool {
        self.regs[slot(base) + usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }

    fn set_vector(&mut self, base: u32, v: u8) {
        self.regs[slot(base) + usize::from(v >> 5)] |= 1 << (v & 31);
    }

    fn clear_vector(&mut self, base: u32, v: u8) {
        self.regs[slot(base) + usize::from(v >> 5)] &= !(1 << (v & 31));
    }

    /// The highest vector set in the 256-bit register at `base` (ISR, TMR or IRR).
    fn highest(&self, base: u32) -> Option<u8> {
        (0..8usize).rev().find_map(|i| {
            let w = self.regs[slot(base) + i];
            (w != 0).then(|| (i as u32 * 32 + 31 - w.leading_zeros()) as u8)
        })
    }

    /// Processor priority (§11.8.3.1).
    pub fn ppr(&self) -> u32 {
        let tpr = self.reg(APIC_TPR) & 0xff;
        let isrv = self.highest(APIC_ISR).map_or(0, u32::from);
        if (tpr & 0xf0) >= (isrv & 0xf0) {
            tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Arbitration priority (§11.6.2.4, P6 family definition), used for lowest-priority
    /// delivery.
    pub fn apr(&self) -> u32 {
        let tpr = self.reg(APIC_TPR) & 0xff;
        let isrv = self.highest(APIC_ISR).map_or(0, u32::from);
        let irrv = self.highest(APIC_IRR).map_or(0, u32::from);
        if (tpr & 0xf0) >= (irrv & 0xf0) && (tpr & 0xf0) > (isrv & 0xf0) {
            tpr
        } else {
            (tpr & 0xf0).max(isrv & 0xf0).max(irrv & 0xf0)
        }
    }

    /// The highest pending vector when its priority class beats the PPR (§11.8.4).
    pub fn deliverable(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        let v = self.highest(APIC_IRR)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// Acknowledge the deliverable interrupt: IRR → ISR (§11.8.4).
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.deliverable()?;
        self.clear_vector(APIC_IRR, v);
        self.set_vector(APIC_ISR, v);
        Some(v)
    }

    /// True when interrupts from the 8259 reach this CPU: LINT0 unmasked in ExtINT mode, or
    /// the APIC globally disabled (INTR goes straight to the core).
    pub fn accepts_pic(&self) -> bool {
        let lvt0 = self.reg(APIC_LVT_LINT0);
        !self.hw_enabled() || (lvt0 & LVT_MASKED == 0 && lvt0 & 0x700 == LVT_DELIVERY_EXTINT)
    }

    /// Events waiting for the CPU, as `EV_*` bits (INIT, SIPI, NMI, a deliverable
    /// interrupt). The 8259's ExtINT through LINT0 is the caller's business.
    pub(crate) fn summary(&self) -> u8 {
        let mut s = 0;
        if self.init {
            s |= EV_INIT;
        }
        if self.sipi.is_some() {
            s |= EV_SIPI;
        }
        if self.nmi {
            s |= EV_NMI;
        }
        if self.extint || self.deliverable().is_some() {
            s |= EV_INTR;
        }
        s
    }

    pub(crate) fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.init)
    }

    pub(crate) fn take_sipi(&mut self) -> Option<u8> {
        self.sipi.take()
    }

    pub(crate) fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi)
    }

    pub(crate) fn take_extint(&mut self) -> bool {
        std::mem::take(&mut self.extint)
    }

    /// Does a physical destination select this APIC (§11.6.2.1)?
    pub fn matches_physical(&self, dest: u32) -> bool {
        self.hw_enabled() && (dest == BROADCAST || dest == self.apic_id())
    }

    /// Does a logical destination (message destination address) select this APIC
    /// (§11.6.2.2: flat and cluster models; x2APIC §11.12.10.2)?
    pub fn matches_logical(&self, mda: u32) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        if mda == BROADCAST {
            return true;
        }
        let ldr = self.reg(APIC_LDR);
        if self.x2apic() {
            return ldr >> 16 == mda >> 16 && ldr & mda & 0xffff != 0;
        }
        let id = ldr >> 24;
        let mda = mda & 0xff;
        match self.reg(APIC_DFR) >> 28 {
            0xf => id & mda != 0,
            0x0 => id >> 4 == mda >> 4 && id & mda & 0xf != 0,
            _ => false,
        }
    }

    /// Record an error (§11.5.3) and raise the error LVT interrupt if it is unmasked. An
    /// error vector below 16 only adds "receive illegal vector": errors never recurse.
    fn signal_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.reg(APIC_LVT_ERROR);
        if lvt & LVT_MASKED == 0 {
            let v = (lvt & 0xff) as u8;
            if v >= 16 {
                self.set_vector(APIC_IRR, v);
                self.clear_vector(APIC_TMR, v);
            } else {
                self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            }
        }
    }

    /// Accept an interrupt message (§11.6.2, §10.6 of the delivery modes). Returns whether
    /// anything changed. Fixed interrupts are dropped while the APIC is software disabled;
    /// vectors 0–15 set "receive illegal vector" instead (§11.5.2).
    pub fn accept(&mut self, mode: DeliveryMode, vector: u8, level_triggered: bool) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if !self.sw_enabled() {
                    return false;
                }
                if vector < 16 {
                    self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
                    return true;
                }
                self.set_vector(APIC_IRR, vector);
                if level_triggered {
                    self.set_vector(APIC_TMR, vector);
                } else {
                    self.clear_vector(APIC_TMR, vector);
                }
            }
            DeliveryMode::Nmi => self.nmi = true,
            DeliveryMode::Init => {
                // A start-up IPI must follow the INIT to count.
                self.init = true;
                self.sipi = None;
            }
            DeliveryMode::StartUp => self.sipi = Some(vector),
            DeliveryMode::ExtInt => self.extint = true,
            DeliveryMode::Smi | DeliveryMode::Reserved => {
                debug!(
                    lapic = self.index,
                    ?mode,
                    "delivery mode not supported; dropped"
                );
                return false;
            }
        }
        true
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.reg(APIC_LVT_TIMER) >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }

    /// Divide configuration (§11.5.4 Figure 11-10): bits 0, 1, 3 → 2, 4, ..., 128, 1.
    fn divide(&self) -> u64 {
        let v = self.reg(APIC_TIMER_DIVIDE);
        let code = ((v >> 1) & 4) | (v & 3);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    /// Guest TSC cycles per timer count.
    fn tsc_per_count(&self) -> u64 {
        self.divide().saturating_mul(self.tsc_per_tick)
    }

    fn counting_mode(&self) -> bool {
        matches!(self.timer_mode(), TimerMode::OneShot | TimerMode::Periodic)
    }

    /// (Re)start the one-shot/periodic count from the initial count at `now`.
    fn start_timer(&mut self, now: u64) {
        self.timer_expiry = None;
        self.timer_period = 0;
        let initial = u64::from(self.reg(APIC_TIMER_INITIAL));
        if !self.counting_mode() || initial == 0 {
            return;
        }
        let period = initial.saturating_mul(self.tsc_per_count());
        self.timer_expiry = now.checked_add(period);
        if self.timer_mode() == TimerMode::Periodic {
            self.timer_period = period;
        }
    }

    /// The current-count register (§11.5.4) at `now`.
    fn current_count(&self, now: u64) -> u32 {
        let Some(exp) = self.timer_expiry.filter(|_| self.counting_mode()) else {
            return 0;
        };
        let remaining = if exp > now {
            exp - now
        } else if self.timer_period > 0 {
            // Expired periods not yet polled: the count has reloaded since.
            self.timer_period - (now - exp) % self.timer_period
        } else {
            return 0;
        };
        let count = remaining.div_ceil(self.tsc_per_count());
        count.min(u64::from(self.reg(APIC_TIMER_INITIAL))) as u32
    }

    fn fire_timer(&mut self) {
        let lvt = self.reg(APIC_LVT_TIMER);
        if lvt & LVT_MASKED != 0 {
            return;
        }
        let v = (lvt & 0xff) as u8;
        if v < 16 {
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
        } else {
            self.set_vector(APIC_IRR, v);
            self.clear_vector(APIC_TMR, v);
        }
    }

    /// Fire the timer if it expired by `now`. A periodic timer that missed several periods
    /// raises one interrupt and skips ahead arithmetically. Returns whether it fired.
    pub fn poll_timer(&mut self, now: u64) -> bool {
        match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic => {
                let Some(exp) = self.timer_expiry else {
                    return false;
                };
                if now < exp {
                    return false;
                }
                // Periodic: skip every period that ended by `now`; one-shot: done.
                self.timer_expiry = (now - exp)
                    .checked_div(self.timer_period)
                    .and_then(|missed| {
                        exp.checked_add(missed.saturating_add(1).saturating_mul(self.timer_period))
                    });
                self.fire_timer();
                true
            }
            TimerMode::TscDeadline => {
                if self.tsc_deadline == 0 || now < self.tsc_deadline {
                    return false;
                }
                self.tsc_deadline = 0;
                self.fire_timer();
                true
            }
            TimerMode::Reserved => false,
        }
    }

    /// The TSC at which the timer next raises an interrupt (`None`: never, or masked — a
    /// masked timer is brought up to date whenever the APIC is next accessed).
    pub fn next_timer(&self) -> Option<u64> {
        if self.reg(APIC_LVT_TIMER) & LVT_MASKED != 0 {
            return None;
        }
        match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic => self.timer_expiry,
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            TimerMode::Reserved => None,
        }
    }

    /// IA32_TSC_DEADLINE (§11.5.4.1): reads 0 outside TSC-deadline mode and once fired.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// Arm (non-zero) or disarm (0) the TSC-deadline timer; ignored in other timer modes.
    pub fn set_tsc_deadline(&mut self, deadline: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline = deadline;
        }
    }

    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Write IA32_APIC_BASE (§11.4.4, §11.12.5). Invalid transitions are refused (returns
    /// false). Disabling resets the APIC; entering x2APIC mode derives the LDR from the ID.
    pub fn set_apic_base(&mut self, value: u64) -> bool {
        if !valid_apic_base_transition(self.apic_base, value) {
            debug!(
                lapic = self.index,
                value, "invalid IA32_APIC_BASE transition refused"
            );
            return false;
        }
        let was_enabled = self.hw_enabled();
        let was_x2apic = self.x2apic();
        let bsp = self.apic_base & APIC_BASE_BSP;
        self.apic_base =
            (value & (APIC_BASE_ADDRESS_MASK | APIC_BASE_ENABLE | APIC_BASE_EXTD)) | bsp;
        if !self.hw_enabled() {
            if was_enabled {
                self.reset_registers();
            }
        } else if self.x2apic() && !was_x2apic {
            self.regs[slot(APIC_LDR)] = self.x2apic_ldr();
        }
        true
    }

    /// Read the 32-bit register at byte `offset` of the APIC page (bytes 1–3 of a register
    /// read the register shifted; reserved offsets read 0).
    pub fn read(&self, offset: u32, now: u64) -> u32 {
        if offset >= LapicState::SIZE as u32 || offset & 0xf >= 4 {
            return 0;
        }
        let x2 = self.x2apic();
        let reg = offset & !0xf;
        let v = match reg {
            APIC_ID => self.apic_id_register(),
            APIC_VERSION => LAPIC_VERSION,
            APIC_TPR | APIC_LDR | APIC_SVR | APIC_ESR | APIC_ICR_LOW | APIC_ICR_HIGH => {
                self.reg(reg)
            }
            APIC_LVT_TIMER..=APIC_LVT_ERROR | APIC_TIMER_INITIAL | APIC_TIMER_DIVIDE => {
                self.reg(reg)
            }
            APIC_ISR..=0x270 => self.reg(reg),
            APIC_APR if !x2 => self.apr(),
            APIC_PPR => self.ppr(),
            APIC_DFR if !x2 => self.reg(reg),
            APIC_TIMER_CURRENT => self.current_count(now),
            _ => 0,
        };
        v >> ((offset & 3) * 8)
    }

    fn apic_id_register(&self) -> u32 {
        if self.x2apic() {
            self.index
        } else {
            self.reg(APIC_ID)
        }
    }

    /// Write the 32-bit register at byte `offset` (§11.4.1; x2APIC rules of §11.12.1.2).
    /// Writes to read-only, reserved or unaligned offsets are ignored.
    pub fn write(&mut self, offset: u32, value: u32, now: u64) -> Action {
        if offset >= LapicState::SIZE as u32 || offset & 0xf != 0 {
            return Action::None;
        }
        let x2 = self.x2apic();
        match offset {
            APIC_ID if !x2 => self.set(APIC_ID, value & 0xff00_0000),
            APIC_TPR => self.set(APIC_TPR, value & 0xff),
            APIC_EOI => return self.eoi(),
            APIC_LDR if !x2 => self.set(APIC_LDR, value & 0xff00_0000),
            APIC_DFR if !x2 => self.set(APIC_DFR, value | 0x0fff_ffff),
            APIC_SVR => self.write_svr(value),
            APIC_ESR => {
                self.set(APIC_ESR, self.esr_pending);
                self.esr_pending = 0;
            }
            APIC_ICR_LOW => {
                self.set(APIC_ICR_LOW, value & ICR_LOW_WRITABLE);
                return self.send_ipi();
            }
            APIC_ICR_HIGH if !x2 => self.set(APIC_ICR_HIGH, value & XAPIC_DEST_MASK),
            APIC_LVT_TIMER => self.write_lvt_timer(value),
            APIC_LVT_THERMAL | APIC_LVT_PERF => {
                self.write_lvt(offset, value, LVT_THERMAL_PERF_WRITABLE)
            }
            APIC_LVT_LINT0 | APIC_LVT_LINT1 => self.write_lvt(offset, value, LVT_LINT_WRITABLE),
            APIC_LVT_ERROR => self.write_lvt(offset, value, LVT_ERROR_WRITABLE),
            APIC_TIMER_INITIAL => match self.timer_mode() {
                TimerMode::OneShot | TimerMode::Periodic => {
                    self.set(APIC_TIMER_INITIAL, value);
                    self.start_timer(now);
                }
                TimerMode::Reserved => self.set(APIC_TIMER_INITIAL, value),
                // §11.5.4.1: ignored in TSC-deadline mode.
                TimerMode::TscDeadline => {}
            },
            APIC_TIMER_DIVIDE => self.write_divide(value, now),
            APIC_SELF_IPI if x2 => {
                return Action::Send(Message {
                    vector: value as u8,
                    mode: DeliveryMode::Fixed,
                    dest: Dest::Only(self.index),
                    level_triggered: false,
                })
            }
            _ => debug!(
                lapic = self.index,
                offset, "write to a read-only or reserved register"
            ),
        }
        Action::None
    }

    /// Write the x2APIC ICR (MSR 0x830) in one go (§11.12.9); in xAPIC mode the high half
    /// goes to ICR high as an xAPIC destination.
    pub fn write_icr(&mut self, value: u64) -> Action {
        let high = (value >> 32) as u32;
        let high = if self.x2apic() {
            high
        } else {
            high & XAPIC_DEST_MASK
        };
        self.set(APIC_ICR_HIGH, high);
        self.set(APIC_ICR_LOW, value as u32 & ICR_LOW_WRITABLE);
        self.send_ipi()
    }

    fn eoi(&mut self) -> Action {
        let Some(v) = self.highest(APIC_ISR) else {
            return Action::None;
        };
        self.clear_vector(APIC_ISR, v);
        if self.test_vector(APIC_TMR, v) {
            Action::Eoi(v)
        } else {
            Action::None
        }
    }

    fn write_svr(&mut self, value: u32) {
        self.set(APIC_SVR, value & SVR_WRITABLE);
        if value & SVR_ENABLE == 0 {
            // §11.4.7.2: software disable masks every LVT entry.
            for off in LVT_OFFSETS {
                self.regs[slot(off)] |= LVT_MASKED;
            }
        }
    }

    fn write_lvt(&mut self, offset: u32, value: u32, writable: u32) {
        let old = self.reg(offset);
        let mut v = (old & !writable) | (value & writable);
        if !self.sw_enabled() {
            v |= LVT_MASKED;
        }
        self.set(offset, v);
    }

    fn write_lvt_timer(&mut self, value: u32) {
        let old = self.timer_mode();
        self.write_lvt(APIC_LVT_TIMER, value, LVT_TIMER_WRITABLE);
        let new = self.timer_mode();
        if old == new {
            return;
        }
        let counting = |m| matches!(m, TimerMode::OneShot | TimerMode::Periodic);
        if counting(old) && counting(new) {
            // One-shot ↔ periodic: the count in progress goes on with the new reload rule.
            self.timer_period = if new == TimerMode::Periodic && self.timer_expiry.is_some() {
                u64::from(self.reg(APIC_TIMER_INITIAL)).saturating_mul(self.tsc_per_count())
            } else {
                0
            };
        } else {
            // §11.5.4.1: a transition to or from TSC-deadline mode disarms the timer.
            self.timer_expiry = None;
            self.timer_period = 0;
            self.tsc_deadline = 0;
            self.set(APIC_TIMER_INITIAL, 0);
        }
    }

    /// A new divide value applies to the rest of the count in progress.
    fn write_divide(&mut self, value: u32, now: u64) {
        let remaining = u64::from(self.current_count(now));
        self.set(APIC_TIMER_DIVIDE, value & 0xb);
        if self.timer_expiry.is_some() {
            let tpc = self.tsc_per_count();
            self.timer_expiry = now.checked_add(remaining.saturating_mul(tpc));
            if self.timer_mode() == TimerMode::Periodic {
                self.timer_period = u64::from(self.reg(APIC_TIMER_INITIAL)).saturating_mul(tpc);
            }
        }
    }

    /// Send the IPI described by the ICR (§11.6.1).
    fn send_ipi(&mut self) -> Action {
        let low = self.reg(APIC_ICR_LOW);
        let vector = low as u8;
        let mode = DeliveryMode::from_bits(low >> 8);
        let level_trigger = low & ICR_TRIGGER_LEVEL != 0;
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority if vector < 16 => {
                self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
                return Action::None;
            }
            // INIT level de-assert: only resynchronises arbitration IDs; nothing to do.
            DeliveryMode::Init if level_trigger && low & ICR_LEVEL_ASSERT == 0 => {
                return Action::None
            }
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {
                debug!(
                    lapic = self.index,
                    ?mode,
                    "IPI delivery mode not supported; dropped"
                );
                return Action::None;
            }
            _ => {}
        }
        let high = self.reg(APIC_ICR_HIGH);
        let dest = if self.x2apic() {
            high
        } else {
            match high >> 24 {
                0xff => BROADCAST,
                d => d,
            }
        };
        let dest = match (low >> 18) & 3 {
            0 if low & ICR_DEST_LOGICAL != 0 => Dest::Logical(dest),
            0 => Dest::Physical(dest),
            1 => Dest::Only(self.index),
            2 => Dest::All,
            _ => Dest::AllBut(self.index),
        };
        Action::Send(Message {
            vector,
            mode,
            dest,
            level_triggered: level_trigger && mode.is_fixed(),
        })
    }

    /// The register page in the architectural (and KVM `kvm_lapic_state`) layout, with the
    /// current count and the priorities filled in. In x2APIC mode the ID is stored in xAPIC
    /// form (ID << 24), as KVM does without `KVM_CAP_X2APIC_API`.
    pub fn state(&self, now: u64) -> LapicState {
        let mut s = LapicState::default();
        for (i, v) in self.regs.iter().enumerate() {
            s.set_reg(i * 16, *v);
        }
        let id = if self.x2apic() {
            (self.index & 0xff) << 24
        } else {
            self.reg(APIC_ID)
        };
        s.set_reg(APIC_ID as usize, id);
        s.set_reg(APIC_VERSION as usize, LAPIC_VERSION);
        s.set_reg(APIC_PPR as usize, self.ppr());
        s.set_reg(APIC_APR as usize, self.apr());
        s.set_reg(APIC_TIMER_CURRENT as usize, self.current_count(now));
        s
    }

    /// Load a register page (from [`Lapic::state`] or a KVM snapshot). Every value goes
    /// through the same write masks as a guest write; a running one-shot/periodic timer
    /// restarts from its initial count at `now` (as KVM does). IA32_APIC_BASE, pending
    /// INIT/SIPI/NMI and IA32_TSC_DEADLINE are not part of the page and are kept.
    pub fn set_state(&mut self, state: &LapicState, now: u64) {
        let r = |off: u32| state.reg(off as usize);
        let x2 = self.x2apic();
        if !x2 {
            self.set(APIC_ID, r(APIC_ID) & 0xff00_0000);
            self.set(APIC_LDR, r(APIC_LDR) & 0xff00_0000);
            self.set(APIC_ICR_HIGH, r(APIC_ICR_HIGH) & XAPIC_DEST_MASK);
        } else {
            self.regs[slot(APIC_LDR)] = self.x2apic_ldr();
            self.set(APIC_ICR_HIGH, r(APIC_ICR_HIGH));
        }
        self.set(APIC_VERSION, LAPIC_VERSION);
        self.set(APIC_TPR, r(APIC_TPR) & 0xff);
        self.set(APIC_DFR, r(APIC_DFR) | 0x0fff_ffff);
        self.set(APIC_SVR, r(APIC_SVR) & SVR_WRITABLE);
        for off in (APIC_ISR..APIC_ESR).step_by(16) {
            self.set(off, r(off));
        }
        self.set(APIC_ESR, r(APIC_ESR) & 0xff);
        self.esr_pending = 0;
        self.set(APIC_ICR_LOW, r(APIC_ICR_LOW) & ICR_LOW_WRITABLE);
        let old_mode = self.timer_mode();
        for (off, writable) in [
            (APIC_LVT_TIMER, LVT_TIMER_WRITABLE),
            (APIC_LVT_THERMAL, LVT_THERMAL_PERF_WRITABLE),
            (APIC_LVT_PERF, LVT_THERMAL_PERF_WRITABLE),
            (APIC_LVT_LINT0, LVT_LINT_WRITABLE),
            (APIC_LVT_LINT1, LVT_LINT_WRITABLE),
            (APIC_LVT_ERROR, LVT_ERROR_WRITABLE),
        ] {
            let mut v = r(off) & writable;
            if !self.sw_enabled() {
                v |= LVT_MASKED;
            }
            self.set(off, v);
        }
        self.set(APIC_TIMER_INITIAL, r(APIC_TIMER_INITIAL));
        self.set(APIC_TIMER_DIVIDE, r(APIC_TIMER_DIVIDE) & 0xb);
        if self.timer_mode() != TimerMode::TscDeadline || old_mode != TimerMode::TscDeadline {
            self.tsc_deadline = 0;
        }
        self.start_timer(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    const ENABLED: u32 = SVR_ENABLE | 0xff;

    fn enabled(index: u32) -> Lapic {
        let mut l = Lapic::new(index, 1);
        l.write(APIC_SVR, ENABLED, 0);
        l
    }

    #[test]
    fn power_up_state() {
        let bsp = Lapic::new(0, 1);
        assert_eq!(bsp.read(APIC_VERSION, 0), 0x0005_0014);
        assert_eq!(bsp.read(APIC_ID, 0), 0);
        assert_eq!(bsp.read(APIC_DFR, 0), 0xffff_ffff);
        assert_eq!(bsp.read(APIC_SVR, 0), 0xff);
        assert_eq!(bsp.read(APIC_LVT_TIMER, 0), LVT_MASKED);
        assert_eq!(
            bsp.read(APIC_LVT_LINT0, 0),
            0x700,
            "BSP LINT0: ExtINT, unmasked"
        );
        assert_eq!(bsp.apic_base(), 0xfee0_0900);
        assert!(bsp.accepts_pic());
        let ap = Lapic::new(3, 1);
        assert_eq!(ap.read(APIC_ID, 0), 3 << 24);
        assert_eq!(ap.read(APIC_LVT_LINT0, 0), LVT_MASKED);
        assert_eq!(ap.apic_base(), 0xfee0_0800);
        assert!(!ap.accepts_pic());
        assert_eq!(ap.summary(), 0);
    }

    #[test]
    fn register_write_masks() {
        let mut l = enabled(1);
        l.write(APIC_ID, 0xffff_ffff, 0);
        assert_eq!(l.read(APIC_ID, 0), 0xff00_0000);
        l.write(APIC_LDR, 0x1234_5678, 0);
        assert_eq!(l.read(APIC_LDR, 0), 0x1200_0000);
        l.write(APIC_DFR, 0, 0);
        assert_eq!(l.read(APIC_DFR, 0), 0x0fff_ffff);
        l.write(APIC_TPR, 0x1ff, 0);
        assert_eq!(l.read(APIC_TPR, 0), 0xff);
        l.write(APIC_LVT_LINT1, 0xffff_ffff, 0);
        assert_eq!(
            l.read(APIC_LVT_LINT1, 0),
            0x0001_a7ff,
            "remote IRR/status read-only"
        );
        l.write(APIC_LVT_TIMER, 0xffff_ffff, 0);
        assert_eq!(l.read(APIC_LVT_TIMER, 0), 0x0007_00ff);
        l.write(APIC_TIMER_DIVIDE, 0xff, 0);
        assert_eq!(l.read(APIC_TIMER_DIVIDE, 0), 0xb);
        // Read-only registers keep their value; reserved and unaligned offsets read 0.
        l.write(APIC_VERSION, 0, 0);
        assert_eq!(l.read(APIC_VERSION, 0), LAPIC_VERSION);
        assert_eq!(l.read(0x2f0, 0), 0);
        assert_eq!(l.read(APIC_VERSION + 4, 0), 0);
        assert_eq!(l.read(APIC_VERSION + 2, 0), 0x5);
        assert_eq!(l.read(0xffff_fff0, 0), 0);
    }

    #[test]
    fn tpr_masks_by_priority_class() {
        let mut l = enabled(0);
        l.accept(DeliveryMode::Fixed, 0x51, false);
        l.write(APIC_TPR, 0x50, 0);
        assert_eq!(l.deliverable(), None, "same class as TPR is blocked");
        assert_eq!(l.read(APIC_PPR, 0), 0x50);
        l.write(APIC_TPR, 0x4f, 0);
        assert_eq!(l.deliverable(), Some(0x51));
        assert_eq!(l.summary(), EV_INTR);
        assert_eq!(l.ack(), Some(0x51));
        assert_eq!(l.read(APIC_PPR, 0), 0x50, "ISR class beats TPR");
        assert_eq!(l.read(APIC_ISR + 0x20, 0), 1 << 0x11);
        assert_eq!(l.read(APIC_IRR + 0x20, 0), 0);
    }

    #[test]
    fn isr_nesting_and_eoi_order() {
        let mut l = enabled(0);
        l.accept(DeliveryMode::Fixed, 0x40, false);
        assert_eq!(l.ack(), Some(0x40));
        l.accept(DeliveryMode::Fixed, 0x45, false);
        assert_eq!(
            l.deliverable(),
            None,
            "same class as the one in service waits"
        );
        l.accept(DeliveryMode::Fixed, 0x80, false);
        assert_eq!(l.ack(), Some(0x80), "a higher class nests");
        assert_eq!(l.write(APIC_EOI, 0, 0), Action::None);
        assert_eq!(
            l.read(APIC_ISR + 0x40, 0),
            0,
            "EOI retires the highest (0x80)"
        );
        assert_eq!(l.read(APIC_ISR + 0x20, 0), 1);
        assert_eq!(l.deliverable(), None);
        l.write(APIC_EOI, 0, 0);
        assert_eq!(l.ack(), Some(0x45));
        l.write(APIC_EOI, 0, 0);
        assert_eq!(
            l.write(APIC_EOI, 0, 0),
            Action::None,
            "EOI with nothing in service"
        );
    }

    #[test]
    fn level_triggered_eoi_is_broadcast() {
        let mut l = enabled(0);
        l.accept(DeliveryMode::Fixed, 0x61, true);
        assert_eq!(l.read(APIC_TMR + 0x30, 0), 1 << 1);
        assert_eq!(l.ack(), Some(0x61));
        assert_eq!(l.write(APIC_EOI, 0, 0), Action::Eoi(0x61));
        // An edge-triggered delivery of the same vector clears TMR.
        l.accept(DeliveryMode::Fixed, 0x61, false);
        l.ack();
        assert_eq!(l.write(APIC_EOI, 0, 0), Action::None);
    }

    #[test]
    fn illegal_vectors_set_esr_and_raise_the_error_lvt() {
        let mut l = enabled(0);
        l.write(APIC_LVT_ERROR, 0xfe, 0);
        assert!(l.accept(DeliveryMode::Fixed, 3, false));
        assert_eq!(l.read(APIC_ESR, 0), 0, "ESR updates on write");
        l.write(APIC_ESR, 0, 0);
        assert_eq!(l.read(APIC_ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(l.ack(), Some(0xfe));
        l.write(APIC_EOI, 0, 0);
        // Sending an illegal vector: send error, nothing sent.
        l.write(APIC_ICR_HIGH, 1 << 24, 0);
        assert_eq!(l.write(APIC_ICR_LOW, 0x0000_0005, 0), Action::None);
        l.write(APIC_ESR, 0, 0);
        assert_eq!(l.read(APIC_ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
        assert_eq!(l.ack(), Some(0xfe), "send errors raise the error LVT too");
        l.write(APIC_EOI, 0, 0);
        l.write(APIC_ESR, 0, 0);
        assert_eq!(l.read(APIC_ESR, 0), 0);
        // An error vector below 16 does not recurse.
        l.write(APIC_LVT_ERROR, 0x02, 0);
        l.accept(DeliveryMode::Fixed, 1, false);
        assert_eq!(l.deliverable(), None);
        l.write(APIC_ESR, 0, 0);
        assert_eq!(l.read(APIC_ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
    }

    #[test]
    fn software_disable_masks_lvts_and_drops_fixed_interrupts() {
        let mut l = enabled(0);
        l.write(APIC_LVT_TIMER, 0x20, 0);
        l.write(APIC_SVR, 0xff, 0);
        assert!(!l.sw_enabled());
        assert_eq!(l.read(APIC_LVT_TIMER, 0), 0x20 | LVT_MASKED);
        assert_eq!(l.read(APIC_LVT_LINT0, 0), 0x700 | LVT_MASKED);
        l.write(APIC_LVT_TIMER, 0x21, 0);
        assert_eq!(
            l.read(APIC_LVT_TIMER, 0),
            0x21 | LVT_MASKED,
            "cannot unmask"
        );
        assert!(!l.accept(DeliveryMode::Fixed, 0x30, false));
        assert!(l.accept(DeliveryMode::Nmi, 0, false), "NMI still accepted");
        assert_eq!(l.summary(), EV_NMI);
        l.write(APIC_SVR, ENABLED, 0);
        assert_eq!(
            l.read(APIC_LVT_TIMER, 0),
            0x21 | LVT_MASKED,
            "re-enable keeps masks"
        );
    }

    #[test]
    fn one_shot_timer() {
        let mut l = enabled(0);
        l.write(APIC_TIMER_DIVIDE, 0x3, 0); // divide by 16
        l.write(APIC_LVT_TIMER, 0xec, 0);
        l.write(APIC_TIMER_INITIAL, 1000, 100);
        assert_eq!(l.read(APIC_TIMER_CURRENT, 100), 1000);
        assert_eq!(l.read(APIC_TIMER_CURRENT, 100 + 16 * 250), 750);
        assert_eq!(l.next_timer(), Some(100 + 16_000));
        assert!(!l.poll_timer(100 + 15_999));
        assert!(l.poll_timer(100 + 16_000));
        assert_eq!(l.deliverable(), Some(0xec));
        assert_eq!(l.read(APIC_TIMER_CURRENT, 100 + 16_000), 0);
        assert_eq!(l.next_timer(), None);
        assert!(!l.poll_timer(1 << 40), "one-shot fires once");
        // Initial count 0 stops the timer.
        l.write(APIC_TIMER_INITIAL, 10, 0);
        l.write(APIC_TIMER_INITIAL, 0, 1);
        assert_eq!(l.next_timer(), None);
    }

    #[test]
    fn divide_values() {
        let mut l = enabled(0);
        for (tdcr, div) in [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xa, 128),
            (0xb, 1),
        ] {
            l.write(APIC_TIMER_DIVIDE, tdcr, 0);
            assert_eq!(l.divide(), div, "TDCR {tdcr:#x}");
        }
        // Changing the divider mid-count rescales the rest of the count.
        l.write(APIC_LVT_TIMER, 0x30, 0);
        l.write(APIC_TIMER_DIVIDE, 0xb, 0);
        l.write(APIC_TIMER_INITIAL, 100, 0);
        l.write(APIC_TIMER_DIVIDE, 0x0, 40); // 60 counts left, now 2 cycles each
        assert_eq!(l.read(APIC_TIMER_CURRENT, 40), 60);
        assert_eq!(l.next_timer(), Some(160));
    }

    #[test]
    fn periodic_timer_coalesces_missed_periods() {
        let mut l = enabled(0);
        l.write(APIC_TIMER_DIVIDE, 0xb, 0);
        l.write(APIC_LVT_TIMER, (1 << 17) | 0xef, 0);
        l.write(APIC_TIMER_INITIAL, 1, 0);
        // A billion periods later: one interrupt and the next expiry just ahead.
        let now = 1_000_000_000;
        assert!(l.poll_timer(now));
        assert_eq!(l.next_timer(), Some(now + 1));
        assert_eq!(l.ack(), Some(0xef));
        assert_eq!(l.deliverable(), None);
        l.write(APIC_TIMER_INITIAL, 1000, now);
        assert_eq!(l.read(APIC_TIMER_CURRENT, now + 2500), 500);
        assert!(l.poll_timer(now + 2500));
        assert_eq!(l.next_timer(), Some(now + 3000));
    }

    #[test]
    fn masked_timer_counts_without_interrupts() {
        let mut l = enabled(0);
        l.write(APIC_TIMER_DIVIDE, 0xb, 0);
        l.write(APIC_LVT_TIMER, LVT_MASKED | (1 << 17) | 0x40, 0);
        l.write(APIC_TIMER_INITIAL, 100, 0);
        assert_eq!(l.next_timer(), None, "no wake-ups for a masked timer");
        assert_eq!(l.read(APIC_TIMER_CURRENT, 30), 70);
        l.poll_timer(250);
        assert_eq!(l.deliverable(), None);
        assert_eq!(l.read(APIC_TIMER_CURRENT, 250), 50);
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut l = enabled(0);
        l.set_tsc_deadline(500);
        assert_eq!(l.tsc_deadline(), 0, "ignored outside TSC-deadline mode");
        l.write(APIC_LVT_TIMER, (2 << 17) | 0xec, 0);
        l.write(APIC_TIMER_INITIAL, 1000, 0);
        assert_eq!(
            l.read(APIC_TIMER_INITIAL, 0),
            0,
            "TMICT ignored in TSC-deadline mode"
        );
        l.set_tsc_deadline(500);
        assert_eq!(l.tsc_deadline(), 500);
        assert_eq!(l.next_timer(), Some(500));
        assert!(!l.poll_timer(499));
        assert!(l.poll_timer(500));
        assert_eq!(l.tsc_deadline(), 0, "reads 0 once fired");
        assert_eq!(l.deliverable(), Some(0xec));
        // Leaving TSC-deadline mode disarms.
        l.set_tsc_deadline(900);
        l.write(APIC_LVT_TIMER, 0xec, 0);
        l.write(APIC_LVT_TIMER, (2 << 17) | 0xec, 0);
        assert_eq!(l.tsc_deadline(), 0);
        assert!(!l.poll_timer(1000));
    }

    #[test]
    fn timer_bus_clock_and_cpuid() {
        assert_eq!(apic_timer_tsc_ratio(1_000_000_000), 1);
        assert_eq!(cpuid_leaf_0x15(1_000_000_000), [1, 1, 1_000_000_000, 0]);
        let [eax, ebx, ecx, _] = cpuid_leaf_0x15(10_000_000_000);
        assert_eq!((eax, ebx, ecx), (1, 3, 3_333_333_333));
        assert_eq!(apic_bus_hz(0), 1);
        // 3 TSC cycles per count at ratio 3.
        let mut l = Lapic::new(0, apic_timer_tsc_ratio(10_000_000_000));
        l.write(APIC_SVR, ENABLED, 0);
        l.write(APIC_TIMER_DIVIDE, 0xb, 0);
        l.write(APIC_LVT_TIMER, 0x40, 0);
        l.write(APIC_TIMER_INITIAL, 10, 0);
        assert_eq!(l.next_timer(), Some(30));
    }

    #[test]
    fn icr_decoding() {
        let mut l = enabled(2);
        l.write(APIC_ICR_HIGH, 0x0300_0000, 0);
        let send = |l: &mut Lapic, low| match l.write(APIC_ICR_LOW, low, 0) {
            Action::Send(m) => Some(m),
            _ => None,
        };
        let m = send(&mut l, 0x0000_4031).unwrap();
        assert_eq!(m.dest, Dest::Physical(3));
        assert_eq!(
            (m.vector, m.mode, m.level_triggered),
            (0x31, DeliveryMode::Fixed, false)
        );
        assert_eq!(send(&mut l, 0x0000_0831).unwrap().dest, Dest::Logical(3));
        assert_eq!(send(&mut l, 0x0004_0031).unwrap().dest, Dest::Only(2));
        assert_eq!(send(&mut l, 0x0008_0031).unwrap().dest, Dest::All);
        assert_eq!(send(&mut l, 0x000c_0031).unwrap().dest, Dest::AllBut(2));
        let m = send(&mut l, 0x0000_c131).unwrap();
        assert_eq!(
            (m.mode, m.level_triggered),
            (DeliveryMode::LowestPriority, true)
        );
        // INIT assert, INIT level de-assert (ignored), start-up, NMI; SMI is dropped.
        assert_eq!(send(&mut l, 0x0000_c500).unwrap().mode, DeliveryMode::Init);
        assert_eq!(send(&mut l, 0x0000_8500), None);
        let m = send(&mut l, 0x0000_0608).unwrap();
        assert_eq!((m.mode, m.vector), (DeliveryMode::StartUp, 8));
        assert_eq!(send(&mut l, 0x0000_0400).unwrap().mode, DeliveryMode::Nmi);
        assert_eq!(send(&mut l, 0x0000_0200), None);
        // Destination 0xff is the broadcast.
        l.write(APIC_ICR_HIGH, 0xff00_0000, 0);
        assert_eq!(
            send(&mut l, 0x0000_0031).unwrap().dest,
            Dest::Physical(BROADCAST)
        );
        // Delivery status always reads idle.
        assert_eq!(l.read(APIC_ICR_LOW, 0) & (1 << 12), 0);
    }

    #[test]
    fn destination_matching() {
        let mut l = enabled(5);
        assert!(l.matches_physical(5));
        assert!(!l.matches_physical(4));
        assert!(l.matches_physical(BROADCAST));
        // Flat model: LDR bit mask.
        l.write(APIC_LDR, 0x2000_0000, 0);
        assert!(l.matches_logical(0x21));
        assert!(!l.matches_logical(0x01));
        assert!(l.matches_logical(BROADCAST));
        // Cluster model: cluster 2, member bit 1.
        l.write(APIC_DFR, 0x0fff_ffff, 0);
        l.write(APIC_LDR, 0x2200_0000, 0);
        assert!(l.matches_logical(0x23));
        assert!(!l.matches_logical(0x13));
        assert!(!l.matches_logical(0x21));
        // A globally disabled APIC matches nothing.
        l.set_apic_base(APIC_DEFAULT_ADDRESS);
        assert!(!l.matches_physical(BROADCAST));
        assert!(!l.matches_logical(BROADCAST));
        assert!(!l.accept(DeliveryMode::Nmi, 0, false));
    }

    #[test]
    fn x2apic_mode() {
        let mut l = enabled(0x23);
        assert!(
            !l.set_apic_base(APIC_DEFAULT_ADDRESS | APIC_BASE_EXTD),
            "EXTD without EN"
        );
        assert!(l.set_apic_base(APIC_DEFAULT_ADDRESS | APIC_BASE_ENABLE | APIC_BASE_EXTD));
        assert!(l.x2apic());
        assert_eq!(l.read(APIC_ID, 0), 0x23);
        assert_eq!(l.read(APIC_LDR, 0), (2 << 16) | (1 << 3));
        l.write(APIC_LDR, 0, 0);
        l.write(APIC_ID, 0, 0);
        assert_eq!(
            l.read(APIC_LDR, 0),
            (2 << 16) | (1 << 3),
            "read-only in x2APIC"
        );
        assert_eq!(l.read(APIC_ID, 0), 0x23);
        assert_eq!(l.read(APIC_DFR, 0), 0, "no DFR in x2APIC mode");
        assert!(l.matches_logical((2 << 16) | 0x8));
        assert!(!l.matches_logical((1 << 16) | 0x8));
        assert!(l.matches_physical(0x23));
        // A 64-bit ICR write with a 32-bit destination; 0xff is not a broadcast.
        match l.write_icr((0x0001_0000u64 << 32) | 0x0000_0040) {
            Action::Send(m) => assert_eq!(m.dest, Dest::Physical(0x1_0000)),
            a => panic!("{a:?}"),
        }
        match l.write_icr((0xffu64 << 32) | 0x40) {
            Action::Send(m) => assert_eq!(m.dest, Dest::Physical(0xff)),
            a => panic!("{a:?}"),
        }
        assert_eq!(l.read(APIC_ICR_HIGH, 0), 0xff);
        // SELF IPI register.
        match l.write(APIC_SELF_IPI, 0x1_0055, 0) {
            Action::Send(m) => {
                assert_eq!((m.vector, m.dest), (0x55, Dest::Only(0x23)));
            }
            a => panic!("{a:?}"),
        }
        // x2APIC → xAPIC is invalid; x2APIC → disabled → xAPIC is fine and resets.
        assert!(!l.set_apic_base(APIC_DEFAULT_ADDRESS | APIC_BASE_ENABLE));
        l.write(APIC_TPR, 0x20, 0);
        assert!(l.set_apic_base(APIC_DEFAULT_ADDRESS));
        assert!(l.set_apic_base(APIC_DEFAULT_ADDRESS | APIC_BASE_ENABLE));
        assert_eq!(l.read(APIC_TPR, 0), 0);
        assert_eq!(l.read(APIC_ID, 0), 0x23 << 24);
        assert!(!l.sw_enabled());
        assert!(!valid_apic_base_transition(
            0,
            APIC_BASE_ENABLE | APIC_BASE_EXTD
        ));
    }

    #[test]
    fn init_resets_registers_but_keeps_later_sipi() {
        let mut l = enabled(1);
        l.write(APIC_TPR, 0x30, 0);
        l.accept(DeliveryMode::Nmi, 0, false);
        l.accept(DeliveryMode::StartUp, 0x10, false);
        l.accept(DeliveryMode::Init, 0, false);
        assert_eq!(
            l.summary(),
            EV_INIT | EV_NMI,
            "INIT discards an earlier SIPI"
        );
        l.accept(DeliveryMode::StartUp, 0x9a, false);
        assert!(l.take_init());
        l.init_reset();
        assert_eq!(l.read(APIC_TPR, 0), 0);
        assert!(!l.sw_enabled());
        assert_eq!(l.summary(), EV_SIPI);
        assert_eq!(l.take_sipi(), Some(0x9a));
        assert_eq!(l.apic_base(), 0xfee0_0800);
    }

    #[test]
    fn state_uses_the_kvm_page_layout_and_round_trips() {
        let mut l = enabled(2);
        l.write(APIC_TPR, 0x20, 0);
        l.write(APIC_LDR, 0x0400_0000, 0);
        l.write(APIC_TIMER_DIVIDE, 0xb, 0);
        l.write(APIC_LVT_TIMER, 0xec, 0);
        l.write(APIC_TIMER_INITIAL, 1000, 0);
        l.accept(DeliveryMode::Fixed, 0x41, true);
        let s = l.state(400);
        assert_eq!(s.regs.len(), 1024);
        assert_eq!(s.reg(0x20), 2 << 24);
        assert_eq!(s.reg(0x30), LAPIC_VERSION);
        assert_eq!(s.reg(0x80), 0x20);
        assert_eq!(s.reg(0xd0), 0x0400_0000);
        assert_eq!(s.reg(0xf0), ENABLED);
        assert_eq!(s.reg(0x220), 1 << 1, "IRR word 2 bit 1 = vector 0x41");
        assert_eq!(s.reg(0x1a0), 1 << 1, "TMR");
        assert_eq!(s.reg(0x320), 0xec);
        assert_eq!(s.reg(0x380), 1000);
        assert_eq!(s.reg(0x390), 600, "current count filled in");
        let mut m = Lapic::new(2, 1);
        m.set_state(&s, 1000);
        assert_eq!(m.state(1000).regs[..0x390], l.state(1000).regs[..0x390]);
        assert_eq!(
            m.read(APIC_TIMER_CURRENT, 1000),
            1000,
            "timer restarts at restore"
        );
        assert_eq!(m.deliverable(), Some(0x41));
        // A hostile page: short, garbage everywhere.
        let junk = LapicState {
            regs: vec![0xff; 0x90],
        };
        m.set_state(&junk, 0);
        assert_eq!(m.read(APIC_TPR, 0), 0xff);
        assert_eq!(m.read(APIC_TIMER_INITIAL, 0), 0);
    }

    #[test]
    fn hostile_register_hammer() {
        let mut rng = Rng::new(7);
        let mut l = enabled(0);
        for i in 0..200_000u64 {
            let offset = match rng.below(4) {
                0 => rng.next() as u32,
                _ => (rng.below(0x400) as u32) & !3,
            };
            let value = rng.next() as u32;
            let now = i * rng.below(1000);
            match rng.below(10) {
                0 => {
                    l.read(offset, now);
                }
                1 => {
                    l.write_icr(rng.next());
                }
                2 => {
                    l.set_apic_base(rng.next());
                }
                3 => {
                    l.set_tsc_deadline(rng.next());
                }
                4 => {
                    l.poll_timer(rng.next());
                }
                5 => {
                    l.accept(DeliveryMode::from_bits(value), value as u8, value & 1 != 0);
                    l.ack();
                }
                _ => {
                    l.write(offset, value, now);
                }
            }
            l.summary();
            l.next_timer();
            l.state(now);
        }
    }
}
