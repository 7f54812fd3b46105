//! The 8259A programmable interrupt controller pair of a PC (Intel 8259A datasheet; ELCR from
//! the PIIX/ICH datasheets): master at ports 0x20/0x21 (IRQ 0–7), slave at 0xa0/0xa1
//! (IRQ 8–15) cascaded on the master's IR2, edge/level control registers at 0x4d0/0x4d1.
//!
//! Implemented: the ICW1–ICW4 initialisation sequence, OCW1 (mask), OCW2 (non-specific,
//! specific and rotating EOIs, set priority, rotate in auto-EOI), OCW3 (read IRR/ISR, poll,
//! special mask), auto-EOI, special fully nested mode, edge or level inputs per the ELCR,
//! spurious IRQ 7/15 when a request goes away before the acknowledge. The master's INT output
//! feeds LINT0 of the boot CPU's local APIC (ExtINT); [`Pic::acknowledge`] is the INTA cycle.
//!
//! Not implemented (logged): 8080/8085 mode (ICW4 bit 0 clear), the ICW1 LTIM bit (PCs use
//! the ELCR), buffered mode. Cascading is wired to IR2 whatever ICW3 says.
//!
//! The power-up state of a real 8259A is undefined; we start with every input masked so an
//! uninitialised PIC (a hardware-reduced ACPI guest never programs it) cannot deliver vectors
//! 0–15 through LINT0. ICW1 clears the mask, as the datasheet says.

use tracing::debug;

/// Port offsets within each controller's two-port range.
pub const PIC_COMMAND: u64 = 0;
pub const PIC_DATA: u64 = 1;
/// Base ports and length of the master, the slave and the ELCR pair.
pub const PIC_MASTER_BASE: u64 = 0x20;
pub const PIC_SLAVE_BASE: u64 = 0xa0;
pub const ELCR_BASE: u64 = 0x4d0;
pub const PIC_LEN: u64 = 2;

/// The master input the slave is cascaded on.
const CASCADE_IRQ: u8 = 2;
/// ELCR bits that may be set: IRQ 0, 1, 2, 8 and 13 are always edge-triggered.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

const ICW1: u8 = 0x10;
const ICW1_IC4: u8 = 0x01;
const ICW1_SNGL: u8 = 0x02;
const ICW1_LTIM: u8 = 0x08;
const ICW4_UPM: u8 = 0x01;
const ICW4_AEOI: u8 = 0x02;
const ICW4_SFNM: u8 = 0x10;
const OCW3: u8 = 0x08;
const OCW3_POLL: u8 = 0x04;
const OCW3_RR: u8 = 0x02;
const OCW3_RIS: u8 = 0x01;
const OCW3_ESMM: u8 = 0x40;
const OCW3_SMM: u8 = 0x20;

/// Where the initialisation sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Init {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input line levels (edge detection and level mode).
    lines: u8,
    elcr: u8,
    elcr_mask: u8,
    /// The IRQ with the highest priority is `priority_add` (rotation, §"Priority").
    priority_add: u8,
    vector_base: u8,
    init: Init,
    icw4_needed: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_mask: bool,
    special_fully_nested: bool,
    read_isr: bool,
    poll: bool,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0xff,
            lines: 0,
            elcr: 0,
            elcr_mask,
            priority_add: 0,
            vector_base: 0,
            init: Init::Ready,
            icw4_needed: false,
            single: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_mask: false,
            special_fully_nested: false,
            read_isr: false,
            poll: false,
        }
    }

    /// The priority rank (0 = highest) of the best request in `mask`.
    fn best(&self, mask: u8) -> Option<u8> {
        (0..8u8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
    }

    fn irq_of_rank(&self, rank: u8) -> u8 {
        (rank + self.priority_add) & 7
    }

    /// The IRQ this chip would raise INT for (datasheet "Interrupt sequence").
    fn pending(&self, master: bool) -> Option<u8> {
        let rank = self.best(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if master && self.special_fully_nested {
            in_service &= !(1 << CASCADE_IRQ);
        }
        let current = self.best(in_service).unwrap_or(8);
        (rank < current).then(|| self.irq_of_rank(rank))
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if self.elcr & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// INTA for `irq`: IRR → ISR (edge requests clear; level ones follow the line).
    fn ack(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn highest_in_service(&self) -> Option<u8> {
        self.best(self.isr).map(|r| self.irq_of_rank(r))
    }

    fn write_command(&mut self, v: u8) {
        if v & ICW1 != 0 {
            // ICW1: start initialisation.
            if v & ICW1_LTIM != 0 {
                debug!("8259: ICW1 level-triggered mode not supported (the ELCR decides)");
            }
            self.irr &= self.elcr & self.lines;
            self.lines &= self.elcr;
            self.isr = 0;
            self.imr = 0;
            self.priority_add = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.icw4_needed = v & ICW1_IC4 != 0;
            self.single = v & ICW1_SNGL != 0;
            if !self.icw4_needed {
                self.auto_eoi = false;
                self.special_fully_nested = false;
            }
            self.init = Init::Icw2;
        } else if v & OCW3 != 0 {
            if v & OCW3_POLL != 0 {
                self.poll = true;
            }
            if v & OCW3_RR != 0 {
                self.read_isr = v & OCW3_RIS != 0;
            }
            if v & OCW3_ESMM != 0 {
                self.special_mask = v & OCW3_SMM != 0;
            }
        } else {
            // OCW2.
            let level = v & 7;
            match v >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                // Non-specific EOI, optionally rotating.
                cmd @ (1 | 5) => {
                    if let Some(irq) = self.highest_in_service() {
                        self.isr &= !(1 << irq);
                        if cmd == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << level),
                7 => {
                    self.isr &= !(1 << level);
                    self.priority_add = (level + 1) & 7;
                }
                6 => self.priority_add = (level + 1) & 7,
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init {
            Init::Ready => self.imr = v,
            Init::Icw2 => {
                self.vector_base = v & 0xf8;
                self.init = if !self.single {
                    Init::Icw3
                } else if self.icw4_needed {
                    Init::Icw4
                } else {
                    Init::Ready
                };
            }
            Init::Icw3 => {
                self.init = if self.icw4_needed {
                    Init::Icw4
                } else {
                    Init::Ready
                };
            }
            Init::Icw4 => {
                if v & ICW4_UPM == 0 {
                    debug!("8259: 8080/8085 mode not supported; staying in 8086 mode");
                }
                self.auto_eoi = v & ICW4_AEOI != 0;
                self.special_fully_nested = v & ICW4_SFNM != 0;
                self.init = Init::Ready;
            }
        }
    }
}

/// The cascaded master/slave pair.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    pub fn new() -> Self {
        Pic {
            chips: [Chip::new(ELCR_MASK[0]), Chip::new(ELCR_MASK[1])],
        }
    }

    /// The slave's INT output latches the master's IR2 request while it is raised.
    fn update_cascade(&mut self) {
        if self.chips[1].pending(false).is_some() {
            self.chips[0].irr |= 1 << CASCADE_IRQ;
        }
    }

    /// Drive ISA IRQ `irq` (0–15; others are ignored). IRQ 2 is the cascade input.
    pub fn set_irq(&mut self, irq: u32, level: bool) {
        if irq >= 16 || irq == u32::from(CASCADE_IRQ) {
            return;
        }
        self.chips[(irq >> 3) as usize].set_line((irq & 7) as u8, level);
        self.update_cascade();
    }

    /// The master's INT output.
    pub fn output(&self) -> bool {
        self.chips[0].pending(true).is_some()
    }

    /// True when ISA IRQ `irq` (0–7 on the master) is unmasked, so an edge would get through.
    pub fn unmasked(&self, irq: u8) -> bool {
        irq < 8 && self.chips[0].imr & (1 << irq) == 0
    }

    /// The INTA cycle: the vector of the highest-priority request, which goes in service.
    /// With nothing left to deliver (the request went away), the spurious IRQ 7 (or 15).
    pub fn acknowledge(&mut self) -> u8 {
        let master = &mut self.chips[0];
        let vector = match master.pending(true) {
            Some(irq) => {
                master.ack(irq);
                let master_base = master.vector_base;
                if irq == CASCADE_IRQ {
                    let slave = &mut self.chips[1];
                    match slave.pending(false) {
                        Some(irq2) => {
                            slave.ack(irq2);
                            slave.vector_base.wrapping_add(irq2)
                        }
                        None => slave.vector_base.wrapping_add(7),
                    }
                } else {
                    master_base.wrapping_add(irq)
                }
            }
            None => master.vector_base.wrapping_add(7),
        };
        self.update_cascade();
        vector
    }

    /// A read of port `port` (0 = command, 1 = data) of chip `chip` (0 = master).
    pub fn read(&mut self, chip: usize, port: u64) -> u8 {
        let Some(c) = self.chips.get_mut(chip) else {
            return 0xff;
        };
        let v = match port {
            PIC_COMMAND if c.poll => {
                // Poll command: the read acknowledges the best request (datasheet "Poll").
                c.poll = false;
                match c.pending(chip == 0) {
                    Some(irq) => {
                        c.ack(irq);
                        0x80 | irq
                    }
                    None => 0,
                }
            }
            PIC_COMMAND if c.read_isr => c.isr,
            PIC_COMMAND => c.irr,
            PIC_DATA => c.imr,
            _ => 0xff,
        };
        self.update_cascade();
        v
    }

    /// A write of port `port` of chip `chip`.
    pub fn write(&mut self, chip: usize, port: u64, value: u8) {
        let Some(c) = self.chips.get_mut(chip) else {
            return;
        };
        match port {
            PIC_COMMAND => c.write_command(value),
            PIC_DATA => c.write_data(value),
            _ => return,
        }
        self.update_cascade();
    }

    /// ELCR `i` (0: IRQ 0–7 at 0x4d0, 1: IRQ 8–15 at 0x4d1).
    pub fn read_elcr(&self, i: u64) -> u8 {
        self.chips.get(i as usize).map_or(0xff, |c| c.elcr)
    }

    pub fn write_elcr(&mut self, i: u64, value: u8) {
        if let Some(c) = self.chips.get_mut(i as usize) {
            c.elcr = value & c.elcr_mask;
            // Level inputs request while their line is high.
            c.irr = (c.irr & !c.elcr) | (c.lines & c.elcr);
            self.update_cascade();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    const MASTER: usize = 0;
    const SLAVE: usize = 1;

    /// Linux's `init_8259A(0)` followed by unmasking the cascade (and `extra` on the master).
    fn linux_init(pic: &mut Pic, master_mask: u8, slave_mask: u8) {
        pic.write(MASTER, PIC_DATA, 0xff);
        pic.write(MASTER, PIC_COMMAND, 0x11);
        pic.write(MASTER, PIC_DATA, 0x30);
        pic.write(MASTER, PIC_DATA, 0x04);
        pic.write(MASTER, PIC_DATA, 0x01);
        pic.write(SLAVE, PIC_COMMAND, 0x11);
        pic.write(SLAVE, PIC_DATA, 0x38);
        pic.write(SLAVE, PIC_DATA, 0x02);
        pic.write(SLAVE, PIC_DATA, 0x01);
        pic.write(MASTER, PIC_DATA, master_mask);
        pic.write(SLAVE, PIC_DATA, slave_mask);
    }

    #[test]
    fn starts_masked_and_linux_init_programs_vectors() {
        let mut pic = Pic::new();
        pic.set_irq(4, true);
        assert!(!pic.output(), "an uninitialised PIC delivers nothing");
        assert_eq!(pic.read(MASTER, PIC_DATA), 0xff);
        linux_init(&mut pic, 0xeb, 0xff);
        assert_eq!(pic.read(MASTER, PIC_DATA), 0xeb);
        assert!(
            !pic.output(),
            "ICW1 reset the edge detector: the old edge is gone"
        );
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x34);
        assert!(!pic.output());
        pic.write(MASTER, PIC_COMMAND, 0x0b);
        assert_eq!(pic.read(MASTER, PIC_COMMAND), 1 << 4, "ISR via OCW3");
        pic.write(MASTER, PIC_COMMAND, 0x20);
        assert_eq!(pic.read(MASTER, PIC_COMMAND), 0);
    }

    #[test]
    fn priority_nesting_and_eois() {
        let mut pic = Pic::new();
        linux_init(&mut pic, 0x00, 0xff);
        pic.set_irq(5, true);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x33, "IRQ 3 beats IRQ 5");
        assert!(!pic.output(), "IRQ 5 waits for IRQ 3's EOI");
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), 0x31, "IRQ 1 nests over IRQ 3");
        pic.write(MASTER, PIC_COMMAND, 0x20); // non-specific EOI: IRQ 1
        assert!(!pic.output());
        pic.write(MASTER, PIC_COMMAND, 0x63); // specific EOI: IRQ 3
        assert_eq!(pic.acknowledge(), 0x35);
        // Read IRR (the default after OCW3 0x0a).
        pic.write(MASTER, PIC_COMMAND, 0x0a);
        pic.set_irq(6, true);
        assert_eq!(pic.read(MASTER, PIC_COMMAND), 1 << 6);
        // Rotate on specific EOI of 5: IRQ 6 becomes highest priority, then 7, 0, ...
        pic.write(MASTER, PIC_COMMAND, 0xe5);
        pic.set_irq(0, true);
        assert_eq!(pic.acknowledge(), 0x36);
    }

    #[test]
    fn cascade_through_irq2() {
        let mut pic = Pic::new();
        linux_init(&mut pic, 0xfb, 0x00);
        pic.set_irq(12, true);
        pic.set_irq(9, true);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x39);
        pic.write(SLAVE, PIC_COMMAND, 0x20);
        pic.write(MASTER, PIC_COMMAND, 0x20);
        assert!(pic.output(), "the slave's second request comes through");
        assert_eq!(pic.acknowledge(), 0x3c);
        // Setting IRQ 2 directly does nothing: it is the cascade input.
        pic.write(SLAVE, PIC_COMMAND, 0x20);
        pic.write(MASTER, PIC_COMMAND, 0x20);
        pic.set_irq(2, true);
        assert!(!pic.output());
    }

    #[test]
    fn level_mode_via_elcr() {
        let mut pic = Pic::new();
        linux_init(&mut pic, 0x00, 0x00);
        pic.write_elcr(0, 0xff);
        assert_eq!(pic.read_elcr(0), 0xf8, "IRQ 0-2 stay edge");
        pic.write_elcr(1, 0xff);
        assert_eq!(pic.read_elcr(1), 0xde, "IRQ 8 and 13 stay edge");
        pic.set_irq(11, true);
        assert_eq!(pic.acknowledge(), 0x3b);
        pic.write(SLAVE, PIC_COMMAND, 0x20);
        pic.write(MASTER, PIC_COMMAND, 0x20);
        assert_eq!(
            pic.acknowledge(),
            0x3b,
            "still high: requested again after EOI"
        );
        pic.write(SLAVE, PIC_COMMAND, 0x20);
        pic.write(MASTER, PIC_COMMAND, 0x20);
        // Still high at the EOI: requested again, then withdrawn before INTA.
        pic.set_irq(11, false);
        assert_eq!(pic.acknowledge(), 0x3f, "spurious IRQ 15");
        pic.write(MASTER, PIC_COMMAND, 0x20);
        assert!(!pic.output());
    }

    #[test]
    fn spurious_irq7_and_15() {
        let mut pic = Pic::new();
        linux_init(&mut pic, 0x00, 0x00);
        pic.write_elcr(0, 0x20);
        pic.set_irq(5, true);
        assert!(pic.output());
        pic.set_irq(5, false); // a level request gone before INTA
        assert_eq!(pic.acknowledge(), 0x37);
        pic.write(MASTER, PIC_COMMAND, 0x0b);
        assert_eq!(
            pic.read(MASTER, PIC_COMMAND),
            0,
            "spurious IRQ 7 is not in service"
        );
        // The slave's request goes away after the master latched IR2: spurious 15.
        pic.write_elcr(1, 0x02);
        pic.set_irq(9, true);
        pic.set_irq(9, false);
        assert_eq!(pic.acknowledge(), 0x3f);
    }

    #[test]
    fn auto_eoi_and_poll() {
        let mut pic = Pic::new();
        pic.write(MASTER, PIC_COMMAND, 0x11);
        pic.write(MASTER, PIC_DATA, 0x08);
        pic.write(MASTER, PIC_DATA, 0x04);
        pic.write(MASTER, PIC_DATA, 0x03); // 8086 mode, auto-EOI
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), 0x09);
        pic.write(MASTER, PIC_COMMAND, 0x0b);
        assert_eq!(
            pic.read(MASTER, PIC_COMMAND),
            0,
            "auto-EOI: nothing in service"
        );
        pic.set_irq(1, false);
        pic.set_irq(1, true);
        assert!(pic.output(), "no EOI needed for the next one");
        // Poll: the read acknowledges.
        pic.write(MASTER, PIC_COMMAND, 0x0c);
        assert_eq!(pic.read(MASTER, PIC_COMMAND), 0x81);
        assert!(!pic.output());
        pic.write(MASTER, PIC_COMMAND, 0x0c);
        assert_eq!(pic.read(MASTER, PIC_COMMAND), 0);
    }

    #[test]
    fn special_mask_mode_lets_lower_priorities_through() {
        let mut pic = Pic::new();
        linux_init(&mut pic, 0x00, 0xff);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x33);
        pic.write(MASTER, PIC_DATA, 0x08); // mask the one in service
        pic.write(MASTER, PIC_COMMAND, 0x68); // set special mask
        pic.set_irq(6, true);
        assert_eq!(pic.acknowledge(), 0x36);
    }

    #[test]
    fn hostile_port_hammer() {
        let mut pic = Pic::new();
        let mut rng = Rng::new(11);
        for _ in 0..200_000 {
            let v = rng.next() as u8;
            match rng.below(6) {
                0 => {
                    pic.read(rng.below(4) as usize, rng.below(3));
                }
                1 => pic.set_irq(rng.below(20) as u32, rng.below(2) == 0),
                2 => {
                    pic.acknowledge();
                }
                3 => pic.write_elcr(rng.below(3), v),
                _ => pic.write(rng.below(3) as usize, rng.below(3), v),
            }
            pic.output();
        }
    }
}
