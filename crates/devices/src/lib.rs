//! Devices: the port-I/O and MMIO bus, the PCI root complex, legacy PC devices and userspace
//! interrupt controllers.
//!
//! Devices see the hypervisor only through [`vireo_hv::IoHandler`] (implemented by
//! [`IoBus`]) and [`vireo_hv::IrqLine`]; they never name a backend. A device sees offsets
//! into its own range: the VMM decides where each device lives.

pub mod bus;
pub mod irqchip;
pub mod legacy;
pub mod pci;

use std::sync::Arc;

pub use bus::{Bus, BusDevice, BusError, BusStats, DeviceStats, IoBus, IoBusStats, Offset};

/// Something the guest asked of the platform (not of one device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlatformEvent {
    /// Power off: ACPI S5 written to the sleep control register.
    PowerOff,
    /// Reset: the i8042 reset line was pulsed or the ACPI reset value was written.
    Reset,
    /// The guest kernel panicked (pvpanic).
    Panic,
}

/// Where devices report [`PlatformEvent`]s. The VMM passes a closure that stops the VM.
///
/// Devices call it from a vCPU thread while holding their own lock, so the closure must not
/// access the bus; it should only record the event and kick the vCPUs.
pub type EventSink = Arc<dyn Fn(PlatformEvent) + Send + Sync>;

#[cfg(test)]
pub(crate) mod test_util {
    //! Fakes shared by the unit tests.

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use vireo_hv::IrqLine;

    use crate::{EventSink, PlatformEvent};

    /// An interrupt line that records rising edges and its level.
    #[derive(Default)]
    pub struct FakeIrq {
        pub rising: AtomicUsize,
        pub level: AtomicBool,
    }

    impl FakeIrq {
        pub fn edges(&self) -> usize {
            self.rising.load(Ordering::SeqCst)
        }
        pub fn is_high(&self) -> bool {
            self.level.load(Ordering::SeqCst)
        }
    }

    impl IrqLine for FakeIrq {
        fn set_level(&self, level: bool) {
            let old = self.level.swap(level, Ordering::SeqCst);
            if level && !old {
                self.rising.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// An event sink that records what it was given.
    pub fn recording_sink() -> (EventSink, Arc<Mutex<Vec<PlatformEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let sink: EventSink = Arc::new(move |e| seen.lock().unwrap().push(e));
        (sink, events)
    }

    /// xorshift64*: deterministic pseudo-random numbers for the hostile-guest loops.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Random accesses of every size 0..=9 at offsets in `0..span` (plus a few absurd ones).
    pub fn hammer(dev: &mut dyn crate::BusDevice, span: u64, rounds: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let mut buf = [0u8; 9];
        for _ in 0..rounds {
            let offset = match rng.below(20) {
                0 => u64::MAX - rng.below(8),
                1 => rng.next(),
                _ => rng.below(span),
            };
            let len = rng.below(10) as usize;
            for b in buf.iter_mut() {
                *b = rng.next() as u8;
            }
            if rng.below(2) == 0 {
                dev.read(offset, &mut buf[..len]);
            } else {
                dev.write(offset, &buf[..len]);
            }
        }
    }
}
