//! Legacy PC devices: 16550 UART, i8042 PS/2 controller, MC146818 CMOS/RTC and the ACPI
//! hardware-reduced sleep/reset registers.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod power_button;
pub mod pvpanic;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::Cmos;
pub use i8042::I8042;
pub use power_button::PowerButton;
pub use pvpanic::PvPanic;
pub use serial::Serial;

/// A wider access to an 8-bit ISA device is carried out as byte cycles at consecutive
/// addresses (what a PC chipset does for an `inw`/`inl` to 8-bit ports). Offsets past
/// `u64::MAX` read as all-ones.
pub(crate) fn read_bytes(offset: u64, data: &mut [u8], mut read: impl FnMut(u64) -> u8) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = match offset.checked_add(i as u64) {
            Some(o) => read(o),
            None => 0xff,
        };
    }
}

/// The write counterpart of [`read_bytes`]; offsets past `u64::MAX` are dropped.
pub(crate) fn write_bytes(offset: u64, data: &[u8], mut write: impl FnMut(u64, u8)) {
    for (i, &b) in data.iter().enumerate() {
        if let Some(o) = offset.checked_add(i as u64) {
            write(o, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_splitting_covers_every_byte_and_stops_at_the_top() {
        let mut d = [0u8; 4];
        read_bytes(10, &mut d, |o| o as u8);
        assert_eq!(d, [10, 11, 12, 13]);
        read_bytes(u64::MAX - 1, &mut d, |_| 0);
        assert_eq!(d, [0, 0, 0xff, 0xff]);
        let mut seen = Vec::new();
        write_bytes(u64::MAX - 1, &[1, 2, 3], |o, b| seen.push((o, b)));
        assert_eq!(seen, vec![(u64::MAX - 1, 1), (u64::MAX, 2)]);
    }
}
