//! The power button: an ACPI Generic Event Device (ACPI 6.4 §5.6.9, `ACPI0013`) whose one
//! interrupt means "the power button was pressed". The DSDT (`arch::acpi`) describes the GED
//! with that interrupt (edge, active high) and an `_EVT` method that notifies the control-method
//! power button `\_SB.PWRB` (`PNP0C0C`, §4.8.2.2.1.2) with 0x80; Linux's `button` driver turns
//! that into a KEY_POWER input event, which the guest's `acpid` acts on.
//!
//! The device has no registers: pressing pulses the line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vireo_hv::IrqLine;

/// The power button's interrupt line.
pub struct PowerButton {
    irq: Arc<dyn IrqLine>,
    presses: AtomicU64,
}

impl PowerButton {
    pub fn new(irq: Arc<dyn IrqLine>) -> Self {
        PowerButton {
            irq,
            presses: AtomicU64::new(0),
        }
    }

    /// Press (and release) the button: one edge on the GED's interrupt.
    pub fn press(&self) {
        self.presses.fetch_add(1, Ordering::Relaxed);
        tracing::info!("power button pressed");
        self.irq.pulse();
    }

    /// How many times the button was pressed.
    pub fn presses(&self) -> u64 {
        self.presses.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::FakeIrq;

    #[test]
    fn press_is_one_edge() {
        let irq = Arc::new(FakeIrq::default());
        let b = PowerButton::new(irq.clone());
        b.press();
        assert_eq!(irq.edges(), 1);
        assert!(!irq.is_high());
        b.press();
        assert_eq!((irq.edges(), b.presses()), (2, 2));
    }
}
