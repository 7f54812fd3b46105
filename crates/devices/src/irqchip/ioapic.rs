//! 82093AA I/O APIC (Intel 82093AA datasheet, 1996), 24 pins.
//!
//! Its MMIO page has IOREGSEL at offset 0x00 and IOWIN at 0x10; through them the ID
//! (register 0), version (1: 0x170011, 24 redirection entries, no EOI register), arbitration
//! ID (2) and the redirection table (0x10 + 2n low, 0x11 + 2n high). Edge-triggered pins
//! deliver on a rising edge; level-triggered pins deliver while asserted, set Remote IRR and
//! deliver again only after the local APIC broadcasts the EOI of their vector
//! ([`Ioapic::eoi`]) or the guest switches the pin to edge (how Linux clears a stuck Remote
//! IRR on a version 0x11 IOAPIC).
//!
//! A line level passed to [`Ioapic::set_irq`] means "asserted", whatever the polarity bit
//! says (as KVM's IOAPIC): the polarity describes the wire, and devices here drive logical
//! levels. Level-triggered NMI/SMI/INIT/ExtINT entries behave as edge-triggered (they have
//! no EOI). Interrupt messages go out through a callback the caller routes to the local APICs.

use tracing::debug;

use super::lapic::{DeliveryMode, Dest, Message, BROADCAST};

/// Number of redirection entries (input pins).
pub const IOAPIC_NUM_PINS: usize = 24;
/// Version register: max redirection entry 23, version 0x11.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;
/// Length of the MMIO range the IOAPIC is mapped with.
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;
/// Offset of the register-select register.
pub const IOREGSEL: u64 = 0x00;
/// Offset of the data window.
pub const IOWIN: u64 = 0x10;

const IOAPICID: u32 = 0x00;
const IOAPICVER: u32 = 0x01;
const IOAPICARB: u32 = 0x02;
const IOREDTBL: u32 = 0x10;

const RTE_DEST_LOGICAL: u64 = 1 << 11;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Guest-writable bits of the low dword: vector, delivery mode, destination mode, polarity,
/// trigger mode, mask (delivery status and Remote IRR are read-only).
const RTE_LOW_WRITABLE: u64 = 0x0001_afff;
/// Guest-writable bits of the high dword: the 8-bit destination.
const RTE_HIGH_WRITABLE: u64 = 0xff00_0000_0000_0000;

/// The I/O APIC state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ioapic {
    id: u32,
    select: u32,
    redir: [u64; IOAPIC_NUM_PINS],
    /// Asserted input lines, one bit per pin.
    lines: u32,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    /// Reset state: ID 0, every pin masked.
    pub fn new() -> Self {
        Ioapic {
            id: 0,
            select: 0,
            redir: [RTE_MASKED; IOAPIC_NUM_PINS],
            lines: 0,
        }
    }

    /// The redirection entry of `pin`, if it exists.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redir.get(pin).copied()
    }

    /// The message pin `pin` sends, or `None` when it is masked or does not exist.
    pub fn routed(&self, pin: usize) -> Option<Message> {
        let e = *self.redir.get(pin)?;
        (e & RTE_MASKED == 0).then(|| Self::message(e))
    }

    /// The message an entry sends (destination 0xff is the xAPIC broadcast).
    pub fn message(entry: u64) -> Message {
        let mode = DeliveryMode::from_bits((entry >> 8) as u32);
        let dest = match (entry >> 56) as u32 {
            0xff => BROADCAST,
            d => d,
        };
        Message {
            vector: entry as u8,
            mode,
            dest: if entry & RTE_DEST_LOGICAL != 0 {
                Dest::Logical(dest)
            } else {
                Dest::Physical(dest)
            },
            level_triggered: Self::level_triggered(entry),
        }
    }

    fn level_triggered(entry: u64) -> bool {
        entry & RTE_TRIGGER_LEVEL != 0
            && matches!(
                DeliveryMode::from_bits((entry >> 8) as u32),
                DeliveryMode::Fixed | DeliveryMode::LowestPriority
            )
    }

    /// Deliver `pin` if it is asserted, unmasked and (level-triggered) not waiting for EOI.
    fn service(&mut self, pin: usize, out: &mut dyn FnMut(Message)) {
        let e = self.redir[pin];
        if e & RTE_MASKED != 0 || self.lines & (1 << pin) == 0 {
            return;
        }
        let msg = Self::message(e);
        if matches!(msg.mode, DeliveryMode::StartUp | DeliveryMode::Reserved) {
            debug!(pin, "IOAPIC: reserved delivery mode; not delivered");
            return;
        }
        if msg.level_triggered {
            if e & RTE_REMOTE_IRR != 0 {
                return;
            }
            self.redir[pin] |= RTE_REMOTE_IRR;
        }
        out(msg);
    }

    /// Drive input `pin` (pins ≥ 24 are ignored).
    pub fn set_irq(&mut self, pin: usize, level: bool, out: &mut dyn FnMut(Message)) {
        if pin >= IOAPIC_NUM_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let level_triggered = Self::level_triggered(self.redir[pin]);
        if level && (level_triggered || !was) {
            self.service(pin, out);
        }
    }

    /// A local APIC EOI'd level-triggered `vector`: clear Remote IRR of the pins using it
    /// and deliver again those still asserted.
    pub fn eoi(&mut self, vector: u8, out: &mut dyn FnMut(Message)) {
        for pin in 0..IOAPIC_NUM_PINS {
            let e = self.redir[pin];
            if e as u8 == vector && e & RTE_REMOTE_IRR != 0 {
                self.redir[pin] &= !RTE_REMOTE_IRR;
                self.service(pin, out);
            }
        }
    }

    /// Read an indirect register (unknown ones read 0).
    pub fn read_register(&self, index: u32) -> u32 {
        match index {
            IOAPICID | IOAPICARB => self.id << 24,
            IOAPICVER => IOAPIC_VERSION,
            IOREDTBL..=0x3f => {
                let e = self.redir[((index - IOREDTBL) / 2) as usize];
                if index & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// Write an indirect register; read-only and unknown ones ignore writes.
    pub fn write_register(&mut self, index: u32, value: u32, out: &mut dyn FnMut(Message)) {
        match index {
            IOAPICID => self.id = (value >> 24) & 0xf,
            IOREDTBL..=0x3f => {
                let pin = ((index - IOREDTBL) / 2) as usize;
                let old = self.redir[pin];
                let mut e = if index & 1 == 0 {
                    (old & !RTE_LOW_WRITABLE) | (u64::from(value) & RTE_LOW_WRITABLE)
                } else {
                    (old & !RTE_HIGH_WRITABLE) | ((u64::from(value) << 32) & RTE_HIGH_WRITABLE)
                };
                if e & RTE_TRIGGER_LEVEL == 0 {
                    e &= !RTE_REMOTE_IRR;
                }
                self.redir[pin] = e;
                // An unmasked, asserted level-triggered line delivers at once; past edges
                // on a masked edge-triggered pin are lost.
                if Self::level_triggered(e) {
                    self.service(pin, out);
                }
            }
            _ => debug!(
                index,
                value, "IOAPIC: write to a read-only or unknown register"
            ),
        }
    }

    /// An MMIO read of the IOAPIC page. Each byte reads the byte of the 32-bit register it
    /// falls in (IOREGSEL or IOWIN); everything else reads 0.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|a| {
                    let byte = (a & 0xf) as u32;
                    let value = match a & !0xf {
                        IOREGSEL => self.select,
                        IOWIN => self.read_register(self.select),
                        _ => return None,
                    };
                    (byte < 4).then(|| (value >> (byte * 8)) as u8)
                })
                .unwrap_or(0);
        }
    }

    /// An MMIO write of the IOAPIC page. Narrow writes merge into the 32-bit register;
    /// bytes outside IOREGSEL and IOWIN are ignored.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], out: &mut dyn FnMut(Message)) {
        let reg = offset & !0xf;
        let start = offset & 0xf;
        if !matches!(reg, IOREGSEL | IOWIN) || start >= 4 || data.is_empty() {
            debug!(
                offset,
                len = data.len(),
                "IOAPIC: write outside IOREGSEL/IOWIN ignored"
            );
            return;
        }
        let old = if reg == IOREGSEL {
            self.select
        } else {
            self.read_register(self.select)
        };
        let mut bytes = old.to_le_bytes();
        for (i, &b) in data.iter().enumerate().take(4 - start as usize) {
            bytes[start as usize + i] = b;
        }
        let value = u32::from_le_bytes(bytes);
        if reg == IOREGSEL {
            self.select = value & 0xff;
        } else {
            self.write_register(self.select, value, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    /// Write a register through the MMIO window, as a driver does.
    fn write_reg(io: &mut Ioapic, index: u32, value: u32, sent: &mut Vec<Message>) {
        io.mmio_write(IOREGSEL, &index.to_le_bytes(), &mut |m| sent.push(m));
        io.mmio_write(IOWIN, &value.to_le_bytes(), &mut |m| sent.push(m));
    }

    fn read_reg(io: &mut Ioapic, index: u32) -> u32 {
        io.mmio_write(IOREGSEL, &index.to_le_bytes(), &mut |_| {});
        let mut d = [0u8; 4];
        io.mmio_read(IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn id_version_arbitration() {
        let mut io = Ioapic::new();
        let mut sent = Vec::new();
        assert_eq!(read_reg(&mut io, 1), 0x0017_0011);
        write_reg(&mut io, 0, 0xffff_ffff, &mut sent);
        assert_eq!(read_reg(&mut io, 0), 0x0f00_0000);
        assert_eq!(read_reg(&mut io, 2), 0x0f00_0000);
        write_reg(&mut io, 1, 0, &mut sent);
        assert_eq!(read_reg(&mut io, 1), 0x0017_0011);
        assert_eq!(read_reg(&mut io, 0x40), 0);
        // IOREGSEL reads back; byte reads of IOWIN work.
        let mut b = [0u8; 1];
        io.mmio_read(IOREGSEL, &mut b);
        assert_eq!(b, [0x40]);
        io.mmio_write(IOREGSEL, &[1], &mut |_| {});
        io.mmio_read(IOWIN + 2, &mut b);
        assert_eq!(b, [0x17]);
        assert!(sent.is_empty());
    }

    #[test]
    fn linux_style_programming_and_edge_delivery() {
        let mut io = Ioapic::new();
        let mut sent = Vec::new();
        // Pin 4 (COM1): high dword (destination) first, then the low dword.
        write_reg(&mut io, 0x11 + 8, 0x0100_0000, &mut sent);
        write_reg(&mut io, 0x10 + 8, 0x0000_0024, &mut sent);
        assert_eq!(read_reg(&mut io, 0x18), 0x24);
        assert_eq!(read_reg(&mut io, 0x19), 0x0100_0000);
        // Read-only bits cannot be set; reserved high bits are dropped.
        write_reg(&mut io, 0x18, 0xffff_ffff, &mut sent);
        assert_eq!(read_reg(&mut io, 0x18), 0x0001_afff);
        write_reg(&mut io, 0x19, 0x01ff_ffff, &mut sent);
        assert_eq!(read_reg(&mut io, 0x19), 0x0100_0000);
        write_reg(&mut io, 0x18, 0x24, &mut sent);
        assert!(sent.is_empty());
        io.set_irq(4, true, &mut |m| sent.push(m));
        io.set_irq(4, true, &mut |m| sent.push(m));
        io.set_irq(4, false, &mut |m| sent.push(m));
        io.set_irq(4, true, &mut |m| sent.push(m));
        assert_eq!(sent.len(), 2, "one delivery per rising edge");
        assert_eq!(
            sent[0],
            Message {
                vector: 0x24,
                mode: DeliveryMode::Fixed,
                dest: Dest::Physical(1),
                level_triggered: false
            }
        );
        // Masked: edges are dropped, and not delivered at unmask.
        io.set_irq(4, false, &mut |m| sent.push(m));
        write_reg(&mut io, 0x18, 0x1_0024, &mut sent);
        io.set_irq(4, true, &mut |m| sent.push(m));
        write_reg(&mut io, 0x18, 0x24, &mut sent);
        assert_eq!(sent.len(), 2);
    }

    #[test]
    fn level_triggered_remote_irr_and_eoi() {
        let mut io = Ioapic::new();
        let mut sent = Vec::new();
        // Pin 10, level, active low (polarity is the wire's business), logical destination.
        write_reg(&mut io, 0x10 + 20, 0x0000_a931, &mut sent);
        write_reg(&mut io, 0x11 + 20, 0x0300_0000, &mut sent);
        io.set_irq(10, true, &mut |m| sent.push(m));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].dest, Dest::Logical(3));
        assert!(sent[0].level_triggered);
        assert_ne!(
            read_reg(&mut io, 0x10 + 20) & (1 << 14),
            0,
            "Remote IRR set"
        );
        io.set_irq(10, true, &mut |m| sent.push(m));
        assert_eq!(sent.len(), 1, "no re-delivery before EOI");
        io.eoi(0x30, &mut |m| sent.push(m));
        assert_eq!(sent.len(), 1, "other vectors do nothing");
        io.eoi(0x31, &mut |m| sent.push(m));
        assert_eq!(sent.len(), 2, "still asserted after EOI: delivered again");
        io.set_irq(10, false, &mut |m| sent.push(m));
        io.eoi(0x31, &mut |m| sent.push(m));
        assert_eq!(sent.len(), 2);
        assert_eq!(read_reg(&mut io, 0x10 + 20) & (1 << 14), 0);
        // Masked while asserted, then unmasked: delivered at unmask.
        write_reg(&mut io, 0x10 + 20, 0x0001_a931, &mut sent);
        io.set_irq(10, true, &mut |m| sent.push(m));
        assert_eq!(sent.len(), 2);
        write_reg(&mut io, 0x10 + 20, 0x0000_a931, &mut sent);
        assert_eq!(sent.len(), 3);
        // Switching to edge clears a stuck Remote IRR (Linux's workaround for 0x11 IOAPICs).
        write_reg(&mut io, 0x10 + 20, 0x0001_2931, &mut sent);
        assert_eq!(read_reg(&mut io, 0x10 + 20) & (1 << 14), 0);
        write_reg(&mut io, 0x10 + 20, 0x0000_a931, &mut sent);
        assert_eq!(sent.len(), 4, "asserted level line delivers again");
    }

    #[test]
    fn broadcast_and_other_modes() {
        let e = 0xff00_0000_0000_0000u64 | (4 << 8) | (1 << 15);
        let m = Ioapic::message(e);
        assert_eq!(m.dest, Dest::Physical(BROADCAST));
        assert_eq!(m.mode, DeliveryMode::Nmi);
        assert!(!m.level_triggered, "level NMI behaves as edge");
        let mut io = Ioapic::new();
        let mut sent = Vec::new();
        // Start-up through the IOAPIC is reserved: not delivered.
        write_reg(&mut io, 0x10, 0x0600, &mut sent);
        io.set_irq(0, true, &mut |m| sent.push(m));
        assert!(sent.is_empty());
    }

    #[test]
    fn hostile_inputs() {
        let mut io = Ioapic::new();
        let mut sent = 0usize;
        io.set_irq(24, true, &mut |_| sent += 1);
        io.set_irq(usize::MAX, true, &mut |_| sent += 1);
        io.eoi(0, &mut |_| sent += 1);
        let mut rng = Rng::new(3);
        let mut buf = [0u8; 9];
        for _ in 0..200_000 {
            let offset = match rng.below(5) {
                0 => rng.next(),
                1 => u64::MAX - rng.below(4),
                _ => rng.below(0x20),
            };
            let len = rng.below(10) as usize;
            buf.iter_mut().for_each(|b| *b = rng.next() as u8);
            match rng.below(4) {
                0 => io.mmio_read(offset, &mut buf[..len]),
                1 => io.set_irq(rng.below(30) as usize, rng.below(2) == 0, &mut |_| {
                    sent += 1
                }),
                2 => io.eoi(rng.next() as u8, &mut |_| sent += 1),
                _ => io.mmio_write(offset, &buf[..len], &mut |_| sent += 1),
            }
        }
        assert!(sent > 0, "the random programming delivered something");
    }
}
