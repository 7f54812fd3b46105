//! ACPI hardware-reduced sleep and reset registers, as one 3-byte device (at port 0x600):
//! offset 0 sleep control and offset 1 sleep status (ACPI 6.4 §4.8.3.7), offset 2 reset
//! register (§4.8.3.6). The FADT points `SLEEP_CONTROL_REG`, `SLEEP_STATUS_REG` and
//! `RESET_REG` here; `\_S5` in the DSDT carries the same SLP_TYP as the one given to
//! [`AcpiPm::new`].

use tracing::{debug, info};

use super::{read_bytes, write_bytes};
use crate::{BusDevice, EventSink, PlatformEvent};

/// Offset of the sleep control register.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = 2;
/// The length the device is registered with.
pub const ACPI_PM_LEN: u64 = 3;

/// Sleep control: SLP_EN (bit 5) starts the transition to the state in SLP_TYPx (bits 4:2).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The power-off and reset registers.
pub struct AcpiPm {
    s5_slp_typ: u8,
    reset_value: u8,
    events: EventSink,
    unsupported_logged: bool,
}

impl AcpiPm {
    /// `s5_slp_typ`: the SLP_TYP of S5 (soft off) in the DSDT's `\_S5`; `reset_value`: the
    /// FADT `RESET_VALUE`.
    pub fn new(events: EventSink, s5_slp_typ: u8, reset_value: u8) -> Self {
        AcpiPm {
            s5_slp_typ: s5_slp_typ & SLP_TYP_MASK,
            reset_value,
            events,
            unsupported_logged: false,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            SLEEP_CONTROL_OFFSET if value & SLP_EN != 0 => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == self.s5_slp_typ {
                    info!("acpi: guest entered S5, powering off");
                    (self.events)(PlatformEvent::PowerOff);
                } else if !self.unsupported_logged {
                    self.unsupported_logged = true;
                    debug!("acpi: sleep type {slp_typ} not supported, ignored (logged once)");
                }
            }
            RESET_OFFSET if value == self.reset_value => {
                info!("acpi: guest wrote the reset register");
                (self.events)(PlatformEvent::Reset);
            }
            // Sleep status: WAK_STS is write-1-to-clear and never set here.
            _ => {}
        }
    }
}

impl BusDevice for AcpiPm {
    /// Every register reads 0: SLP_EN is write-only, WAK_STS is never set, the reset
    /// register is write-only.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| if o < ACPI_PM_LEN { 0 } else { 0xff });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |o, v| self.write_register(o, v));
    }

    fn name(&self) -> &'static str {
        "acpi-pm"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{hammer, recording_sink};

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (sink, events) = recording_sink();
        let mut pm = AcpiPm::new(sink, 5, 1);
        pm.write(SLEEP_CONTROL_OFFSET, &[5 << 2]); // no SLP_EN
        pm.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | 3 << 2]); // S3: not supported
        assert!(events.lock().unwrap().is_empty());
        pm.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | 5 << 2]);
        assert_eq!(*events.lock().unwrap(), vec![PlatformEvent::PowerOff]);
    }

    #[test]
    fn reset_value_resets() {
        let (sink, events) = recording_sink();
        let mut pm = AcpiPm::new(sink, 5, 1);
        pm.write(RESET_OFFSET, &[2]);
        pm.write(SLEEP_STATUS_OFFSET, &[1]);
        assert!(events.lock().unwrap().is_empty());
        pm.write(RESET_OFFSET, &[1]);
        assert_eq!(*events.lock().unwrap(), vec![PlatformEvent::Reset]);
    }

    #[test]
    fn registers_read_zero_and_status_is_write_one_to_clear() {
        let (sink, _) = recording_sink();
        let mut pm = AcpiPm::new(sink, 5, 1);
        pm.write(SLEEP_STATUS_OFFSET, &[0x80]); // clear WAK_STS
        let mut d = [0xaa; 4];
        pm.read(0, &mut d);
        assert_eq!(d, [0, 0, 0, 0xff]);
    }

    #[test]
    fn wide_write_reaches_each_register() {
        let (sink, events) = recording_sink();
        let mut pm = AcpiPm::new(sink, 5, 1);
        pm.write(0, &[SLP_EN | 5 << 2, 0, 1]);
        assert_eq!(
            *events.lock().unwrap(),
            vec![PlatformEvent::PowerOff, PlatformEvent::Reset]
        );
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let (sink, _) = recording_sink();
        let mut pm = AcpiPm::new(sink, 0xff, 0);
        hammer(&mut pm, ACPI_PM_LEN + 2, 20_000, 0xac71);
    }
}
