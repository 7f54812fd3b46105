//! The interface between a CPU backend without an in-kernel interrupt controller (the
//! emulator) and a userspace interrupt-controller set (local APIC per vCPU, IOAPIC, 8259 PIC),
//! which lives in the `devices` crate. The backend asks it what to deliver; devices raise lines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Kicker, LapicState, MsiMessage};

/// Guest time: a TSC of fixed frequency that runs with host monotonic time. Shared by the CPU
/// backend (RDTSC, kvmclock) and the interrupt controllers (APIC timer, TSC-deadline).
#[derive(Debug, Clone, Copy)]
pub struct GuestClock {
    start: Instant,
    tsc_hz: u64,
}

impl GuestClock {
    /// The TSC frequency the emulated CPU advertises (CPUID leaves 0x15/0x16, kvmclock).
    pub const DEFAULT_TSC_HZ: u64 = 1_000_000_000;

    pub fn new(tsc_hz: u64) -> Self {
        GuestClock {
            start: Instant::now(),
            tsc_hz: tsc_hz.max(1),
        }
    }

    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// The TSC value at host instant `t` (0 at VM start).
    pub fn tsc_at(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.start).as_nanos();
        (ns * self.tsc_hz as u128 / 1_000_000_000) as u64
    }

    /// The TSC now.
    pub fn tsc(&self) -> u64 {
        self.tsc_at(Instant::now())
    }

    /// The host instant at which the TSC reaches `tsc`.
    pub fn instant_of(&self, tsc: u64) -> Instant {
        let ns = tsc as u128 * 1_000_000_000 / self.tsc_hz as u128;
        self.start + Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
    }

    /// Nanoseconds since VM start.
    pub fn nanos(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos() as u64
    }
}

impl Default for GuestClock {
    fn default() -> Self {
        Self::new(Self::DEFAULT_TSC_HZ)
    }
}

/// An event the interrupt controllers have for a vCPU (Intel SDM Vol. 3A §6.9 priorities:
/// INIT before NMI before maskable interrupts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuEvent {
    /// INIT IPI: reset to the wait-for-SIPI state (an AP) or to reset state.
    Init,
    /// Start-up IPI with its vector: start at `vector << 12` in real mode.
    Sipi(u8),
    /// Non-maskable interrupt (vector 2).
    Nmi,
    /// A maskable interrupt, already acknowledged (IRR → ISR), with its vector.
    Interrupt(u8),
}

/// A userspace interrupt-controller set for a backend without an in-kernel one.
///
/// All methods take the vCPU's index (0-based, equal to its APIC ID). Implementations are
/// thread-safe: vCPU threads and device threads call in concurrently.
pub trait UserIrqChip: Send + Sync {
    /// The clock that drives the APIC timers.
    fn clock(&self) -> GuestClock;
    /// Register vCPU `id`; `waker` is kicked whenever a new event becomes pending for it, so a
    /// halted vCPU wakes up.
    fn attach_vcpu(&self, id: u32, waker: Arc<dyn Kicker>);
    /// Read a 32-bit local APIC register at byte `offset` in the APIC page (xAPIC MMIO; an
    /// x2APIC MSR `0x800 + n` is offset `n << 4`).
    fn lapic_read(&self, id: u32, offset: u32) -> u32;
    /// Write a 32-bit local APIC register. Writing the ICR low word sends the IPI.
    fn lapic_write(&self, id: u32, offset: u32, value: u32);
    /// Write the 64-bit x2APIC ICR (MSR 0x830) in one go.
    fn lapic_write_icr(&self, id: u32, value: u64);
    /// The IA32_TSC_DEADLINE MSR of vCPU `id` (SDM Vol. 3A §11.5.4.1): 0 when disarmed.
    fn tsc_deadline(&self, id: u32) -> u64;
    /// Arm (non-zero, in guest TSC units of [`GuestClock`]) or disarm (0) the TSC-deadline
    /// timer; ignored unless the LVT timer is in TSC-deadline mode.
    fn set_tsc_deadline(&self, id: u32, deadline: u64);
    /// The IA32_APIC_BASE MSR of vCPU `id`.
    fn apic_base(&self, id: u32) -> u64;
    fn set_apic_base(&self, id: u32, value: u64);
    /// Take the highest-priority event for vCPU `id`. INIT, SIPI and NMI are always taken;
    /// a maskable interrupt only when `interruptible` (RFLAGS.IF = 1, no interrupt shadow), in
    /// which case it is acknowledged. Expired APIC timers fire as part of this call.
    fn take_event(&self, id: u32, interruptible: bool) -> Option<CpuEvent>;
    /// True when a maskable interrupt is waiting for vCPU `id` (used to leave HLT; the caller
    /// then calls `take_event`).
    fn has_interrupt(&self, id: u32) -> bool;
    /// When the next timer of vCPU `id` expires, so a halted vCPU knows how long it may sleep.
    fn next_deadline(&self, id: u32) -> Option<Instant>;
    /// Drive an interrupt line (GSI) from a device.
    fn set_irq(&self, gsi: u32, level: bool);
    /// Deliver an MSI.
    fn send_msi(&self, msi: MsiMessage);
    /// Local APIC register page of vCPU `id`, for snapshots.
    fn lapic_state(&self, id: u32) -> LapicState;
    fn set_lapic_state(&self, id: u32, state: &LapicState);
}
