//! The pvpanic device (QEMU's `docs/specs/pvpanic.txt`, ACPI ID `QEMU0001`): one I/O port.
//! Reading it returns the events the device supports; the guest writes `PVPANIC_PANICKED` (bit
//! 0) when its kernel panics, which this device reports as [`PlatformEvent::Panic`].

use tracing::warn;

use super::{read_bytes, write_bytes};
use crate::{BusDevice, EventSink, PlatformEvent};

/// The guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest loaded a crash kernel and will dump (reported, but not an end of the run).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// A one-byte pvpanic port.
pub struct PvPanic {
    events: EventSink,
}

impl PvPanic {
    pub fn new(events: EventSink) -> Self {
        PvPanic { events }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| {
            if o == 0 {
                PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
            } else {
                0xff
            }
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |o, v| {
            if o != 0 {
                return;
            }
            if v & PVPANIC_PANICKED != 0 {
                warn!("pvpanic: the guest kernel panicked");
                (self.events)(PlatformEvent::Panic);
            } else if v & PVPANIC_CRASH_LOADED != 0 {
                warn!("pvpanic: the guest kernel crashed and is running its crash kernel");
            }
        });
    }

    fn name(&self) -> &'static str {
        "pvpanic"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{hammer, recording_sink};

    #[test]
    fn advertises_and_reports_panics() {
        let (sink, seen) = recording_sink();
        let mut p = PvPanic::new(sink);
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b[0], PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
        p.write(0, &[PVPANIC_CRASH_LOADED]);
        assert!(seen.lock().unwrap().is_empty());
        p.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformEvent::Panic]);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let (sink, _) = recording_sink();
        let mut p = PvPanic::new(sink);
        hammer(&mut p, 4, 20_000, 7);
    }
}
