//! The interface between a CPU backend without an in-kernel interrupt controller (the
//! emulator) and a userspace interrupt-controller set (local APIC per vCPU, IOAPIC, 8259 PIC),
//! which lives in the `devices` crate. The backend asks it what to deliver; devices raise lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Kicker, LapicState, MsiMessage};

/// Guest time: a TSC of fixed frequency that runs with host monotonic time while the VM runs
/// and stands still while it is paused. Shared by the CPU backend (RDTSC, kvmclock) and the
/// interrupt controllers (APIC timer, TSC-deadline); clones share one clock.
///
/// Guest nanoseconds are `host nanoseconds since the clock was made + offset` while running;
/// [`GuestClock::pause`] freezes them and [`GuestClock::resume`] moves the offset so they go
/// on from where they stopped. A restored VM's clock starts at the snapshot's value
/// ([`GuestClock::set_nanos`]), so its TSC never goes backwards.
#[derive(Debug, Clone)]
pub struct GuestClock {
    inner: Arc<ClockInner>,
}

#[derive(Debug)]
struct ClockInner {
    base: Instant,
    tsc_hz: u64,
    /// Guest ns minus host ns since `base` (wrapping), valid while running.
    offset: AtomicU64,
    /// Guest ns at the pause, or [`RUNNING`].
    frozen: AtomicU64,
}

/// `ClockInner::frozen` while the clock runs.
const RUNNING: u64 = u64::MAX;

impl GuestClock {
    /// The TSC frequency the emulated CPU advertises (CPUID leaves 0x15/0x16, kvmclock).
    pub const DEFAULT_TSC_HZ: u64 = 1_000_000_000;

    /// A running clock at 0.
    pub fn new(tsc_hz: u64) -> Self {
        GuestClock {
            inner: Arc::new(ClockInner {
                base: Instant::now(),
                tsc_hz: tsc_hz.max(1),
                offset: AtomicU64::new(0),
                frozen: AtomicU64::new(RUNNING),
            }),
        }
    }

    pub fn tsc_hz(&self) -> u64 {
        self.inner.tsc_hz
    }

    fn host_ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.inner.base).as_nanos() as u64
    }

    /// Guest nanoseconds at host instant `t`.
    fn nanos_at(&self, t: Instant) -> u64 {
        let f = self.inner.frozen.load(Ordering::SeqCst);
        if f != RUNNING {
            return f;
        }
        self.host_ns(t)
            .wrapping_add(self.inner.offset.load(Ordering::SeqCst))
    }

    fn tsc_of_ns(&self, ns: u64) -> u64 {
        (ns as u128 * self.inner.tsc_hz as u128 / 1_000_000_000) as u64
    }

    /// The TSC value at host instant `t` (0 at VM start).
    pub fn tsc_at(&self, t: Instant) -> u64 {
        self.tsc_of_ns(self.nanos_at(t))
    }

    /// The TSC now.
    pub fn tsc(&self) -> u64 {
        self.tsc_at(Instant::now())
    }

    /// The host instant at which the TSC reaches `tsc` (while paused: as if the clock were
    /// resumed now; nothing runs then anyway).
    pub fn instant_of(&self, tsc: u64) -> Instant {
        let ns =
            (tsc as u128 * 1_000_000_000 / self.inner.tsc_hz as u128).min(u64::MAX as u128) as u64;
        let now = Instant::now();
        let now_ns = self.nanos_at(now);
        if ns >= now_ns {
            now + Duration::from_nanos(ns - now_ns)
        } else {
            now.checked_sub(Duration::from_nanos(now_ns - ns))
                .unwrap_or(self.inner.base)
        }
    }

    /// Guest nanoseconds since VM start (paused time not counted).
    pub fn nanos(&self) -> u64 {
        self.nanos_at(Instant::now())
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.inner.frozen.load(Ordering::SeqCst) != RUNNING
    }

    /// Stop the clock (idempotent).
    pub fn pause(&self) {
        if !self.is_paused() {
            let ns = self.nanos().min(RUNNING - 1);
            self.inner.frozen.store(ns, Ordering::SeqCst);
        }
    }

    /// Start the clock again from where it stopped (idempotent).
    pub fn resume(&self) {
        let f = self.inner.frozen.load(Ordering::SeqCst);
        if f == RUNNING {
            return;
        }
        let offset = f.wrapping_sub(self.host_ns(Instant::now()));
        self.inner.offset.store(offset, Ordering::SeqCst);
        self.inner.frozen.store(RUNNING, Ordering::SeqCst);
    }

    /// Pause the clock at `ns` guest nanoseconds (a restored VM; [`GuestClock::resume`]
    /// starts it).
    pub fn set_nanos(&self, ns: u64) {
        self.inner
            .frozen
            .store(ns.min(RUNNING - 1), Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_clock_stands_still_and_resumes_where_it_stopped() {
        let c = GuestClock::new(1_000_000_000);
        std::thread::sleep(Duration::from_millis(5));
        c.pause();
        let at_pause = c.nanos();
        assert!(at_pause >= 5_000_000, "{at_pause}");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.nanos(), at_pause);
        assert!(c.is_paused());
        c.resume();
        let after = c.nanos();
        // The 30 ms of pause are not counted.
        assert!(
            after >= at_pause && after < at_pause + 20_000_000,
            "{at_pause} {after}"
        );
        let clone = c.clone();
        clone.pause();
        assert!(c.is_paused(), "clones share the clock");
    }

    #[test]
    fn restored_clock_continues_from_the_saved_value() {
        let c = GuestClock::new(2_000_000_000);
        c.set_nanos(10_000_000_000);
        assert_eq!(c.tsc(), 20_000_000_000);
        c.resume();
        assert!(c.tsc() >= 20_000_000_000);
        let t = c.tsc() + 2_000_000;
        let when = c.instant_of(t);
        let d = when.saturating_duration_since(Instant::now());
        assert!(d <= Duration::from_millis(1), "{d:?}");
    }
}
