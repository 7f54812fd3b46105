//! A type-0 PCI configuration header with BARs and a capability list (PCI Local Bus
//! Specification 3.0 §6.1-§6.2, §6.7), as the guest sees it through configuration cycles.
//!
//! The header is 256 bytes; the PCIe extended space above it (up to 4 KiB through ECAM) reads
//! as zero and ignores writes, as for a conventional PCI function. Every register has a
//! writable-bit mask; BARs are special: their writable bits are the address bits above the
//! BAR's size, so writing all-ones and reading back gives the size (§6.2.5.1).

use serde::{Deserialize, Serialize};

use super::PciError;

/// Size of the conventional configuration header and capability area.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of a function's configuration space through ECAM (PCIe base spec §7.2.2).
pub const EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;

/// Register offsets of a type-0 header (PCI 3.0 §6.1, Figure 6-1).
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const CLASS_CODE: u16 = 0x09;
pub const CACHE_LINE_SIZE: u16 = 0x0c;
pub const LATENCY_TIMER: u16 = 0x0d;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BAR0: u16 = 0x10;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
pub const SUBSYSTEM_ID: u16 = 0x2e;
pub const EXPANSION_ROM: u16 = 0x30;
pub const CAPABILITIES_POINTER: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3c;
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Command register bits (§6.2.2).
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
pub const COMMAND_SERR_ENABLE: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command bits a guest may change.
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR_ENABLE
    | COMMAND_INTX_DISABLE;
/// Status register: a capability list is present (§6.2.3).
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// First byte of the capability area (§6.7: capabilities live above the 64-byte header).
const FIRST_CAPABILITY: usize = 0x40;

/// Memory BAR type bits (§6.2.5.1): 64-bit decoder, prefetchable.
const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;
const BAR_IO_SPACE: u32 = 1;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BarKind {
    /// Port I/O (x86 I/O space).
    Io,
    /// Memory, a 32-bit decoder.
    Mem32,
    /// Memory, a 64-bit decoder (uses this BAR and the next).
    Mem64,
}

/// A BAR a device implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub kind: BarKind,
    /// Size in bytes, a power of two (at least 16 for memory, 4 for I/O).
    pub size: u64,
    pub prefetchable: bool,
}

/// A BAR as it decodes right now: enabled in the command register and programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMapping {
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
}

/// The IDs and class of a function (§6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    /// Base class, sub-class and programming interface, as `0xCCSSPP`.
    pub class_code: u32,
    pub revision_id: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The configuration space of one function, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    pub registers: Vec<u32>,
}

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    regs: [u32; CONFIG_SPACE_SIZE / 4],
    writable: [u32; CONFIG_SPACE_SIZE / 4],
    bars: [Option<Bar>; NUM_BARS],
    /// Offset of the last capability added (its next pointer links the one after).
    last_capability: Option<usize>,
    /// Where the next capability goes.
    next_capability: usize,
}

impl PciConfiguration {
    /// A header with the given IDs, no BARs, no capabilities, no interrupt pin.
    pub fn new(h: &PciHeader) -> Self {
        let mut c = PciConfiguration {
            regs: [0; CONFIG_SPACE_SIZE / 4],
            writable: [0; CONFIG_SPACE_SIZE / 4],
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        c.set_u16(VENDOR_ID, h.vendor_id);
        c.set_u16(DEVICE_ID, h.device_id);
        c.set_u32(REVISION_ID, (h.class_code << 8) | u32::from(h.revision_id));
        c.set_u16(SUBSYSTEM_VENDOR_ID, h.subsystem_vendor_id);
        c.set_u16(SUBSYSTEM_ID, h.subsystem_id);
        c.writable[usize::from(COMMAND) / 4] = u32::from(COMMAND_WRITABLE);
        c.writable[usize::from(CACHE_LINE_SIZE) / 4] = 0x0000_ffff;
        c.writable[usize::from(INTERRUPT_LINE) / 4] = 0x0000_00ff;
        c
    }

    /// Declare BAR `index` (a 64-bit BAR also takes `index + 1`). The address is 0 (not
    /// programmed) until [`PciConfiguration::set_bar_addr`].
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), PciError> {
        let wide = bar.kind == BarKind::Mem64;
        let last = if wide { index + 1 } else { index };
        if last >= NUM_BARS || self.bars[index].is_some() || self.bars[last].is_some() {
            return Err(PciError::BarIndex(index));
        }
        if wide && index > 0 && self.bars[index - 1].map(|b| b.kind) == Some(BarKind::Mem64) {
            return Err(PciError::BarIndex(index));
        }
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        let max = match bar.kind {
            BarKind::Io => 1 << 16,
            BarKind::Mem32 => 1 << 31,
            BarKind::Mem64 => 1 << 62,
        };
        if !bar.size.is_power_of_two() || bar.size < min || bar.size > max {
            return Err(PciError::BarSize(bar.size));
        }
        if bar.kind == BarKind::Io && bar.prefetchable {
            return Err(PciError::BarSize(bar.size));
        }
        self.bars[index] = Some(bar);
        let mut low = match bar.kind {
            BarKind::Io => BAR_IO_SPACE,
            BarKind::Mem32 => 0,
            BarKind::Mem64 => BAR_MEM_TYPE_64,
        };
        if bar.prefetchable {
            low |= BAR_MEM_PREFETCHABLE;
        }
        self.regs[bar_reg(index)] = low;
        if wide {
            self.regs[bar_reg(index + 1)] = 0;
        }
        Ok(())
    }

    /// The BAR declared at `index` (not the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Program BAR `index` with `addr` (aligned down to its size), as firmware would.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let bar = self.bar(index).ok_or(PciError::BarIndex(index))?;
        let masked = addr & !(bar.size - 1);
        if bar.kind != BarKind::Mem64 && masked > u64::from(u32::MAX) {
            return Err(PciError::BarAddress(addr));
        }
        let i = bar_reg(index);
        self.regs[i] = (self.regs[i] & bar_type_bits(bar)) | masked as u32;
        if bar.kind == BarKind::Mem64 {
            self.regs[i + 1] = (masked >> 32) as u32;
        }
        Ok(())
    }

    /// The address BAR `index` holds (whether or not it decodes).
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let i = bar_reg(index);
        let low = u64::from(self.regs[i] & !bar_type_bits(bar));
        Some(match bar.kind {
            BarKind::Mem64 => low | (u64::from(self.regs[i + 1]) << 32),
            _ => low,
        })
    }

    /// The BARs that decode now: the command register enables their space and they hold a
    /// non-zero address (0 means "not assigned").
    pub fn decoded_bars(&self) -> [Option<BarMapping>; NUM_BARS] {
        let cmd = self.command();
        let mut out = [None; NUM_BARS];
        for (index, slot) in out.iter_mut().enumerate() {
            let (Some(bar), Some(addr)) = (self.bar(index), self.bar_addr(index)) else {
                continue;
            };
            let enabled = match bar.kind {
                BarKind::Io => cmd & COMMAND_IO_SPACE != 0,
                _ => cmd & COMMAND_MEMORY_SPACE != 0,
            };
            if enabled && addr != 0 {
                *slot = Some(BarMapping {
                    kind: bar.kind,
                    addr,
                    size: bar.size,
                });
            }
        }
        out
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Set command bits (firmware enabling decode at start-up).
    pub fn set_command(&mut self, value: u16) {
        self.set_u16(COMMAND, value & COMMAND_WRITABLE);
    }

    /// Append a capability: `id`, then `body` (the bytes after the ID and next pointer).
    /// Returns its offset. `body` is read-only to the guest unless made writable with
    /// [`PciConfiguration::set_writable`].
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u16, PciError> {
        let offset = self.next_capability;
        let len = 2 + body.len();
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpace);
        }
        self.set_u8(offset as u16, id);
        self.set_u8(offset as u16 + 1, 0);
        for (i, &b) in body.iter().enumerate() {
            self.set_u8((offset + 2 + i) as u16, b);
        }
        match self.last_capability {
            Some(prev) => self.set_u8(prev as u16 + 1, offset as u8),
            None => {
                self.set_u8(CAPABILITIES_POINTER, offset as u8);
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len).next_multiple_of(4);
        Ok(offset as u16)
    }

    /// Let the guest write the bits of `mask` in the bytes from `offset` on.
    pub fn set_writable(&mut self, offset: u16, mask: &[u8]) {
        for (i, &m) in mask.iter().enumerate() {
            let at = usize::from(offset) + i;
            if at >= CONFIG_SPACE_SIZE {
                return;
            }
            let shift = (at % 4) * 8;
            let w = &mut self.writable[at / 4];
            *w = (*w & !(0xff << shift)) | (u32::from(m) << shift);
        }
    }

    /// A guest read of `data.len()` bytes at `offset` (any size or alignment; beyond the
    /// header reads zero).
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.u8_at(usize::from(offset).saturating_add(i));
        }
    }

    /// A guest write: only writable bits change; BAR address bits are masked to the BAR size.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        let end = start.saturating_add(data.len()).min(CONFIG_SPACE_SIZE);
        if start >= end {
            return;
        }
        for reg in start / 4..=(end - 1) / 4 {
            let mut value = self.regs[reg];
            let mut written = 0u32;
            for at in (reg * 4).max(start)..((reg + 1) * 4).min(end) {
                let shift = (at % 4) * 8;
                value = (value & !(0xff << shift)) | (u32::from(data[at - start]) << shift);
                written |= 0xff << shift;
            }
            let mask = self.writable_mask(reg) & written;
            self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
        }
    }

    /// Writable bits of dword `reg`, BARs included.
    fn writable_mask(&self, reg: usize) -> u32 {
        let first_bar = usize::from(BAR0) / 4;
        if (first_bar..first_bar + NUM_BARS).contains(&reg) {
            let index = reg - first_bar;
            if let Some(bar) = self.bars[index] {
                let addr_mask = !(bar.size - 1);
                return match bar.kind {
                    BarKind::Io | BarKind::Mem32 => addr_mask as u32 & !bar_type_bits(bar),
                    BarKind::Mem64 => addr_mask as u32 & !bar_type_bits(bar),
                };
            }
            // The upper half of a 64-bit BAR.
            if index > 0 {
                if let Some(bar) = self.bars[index - 1] {
                    if bar.kind == BarKind::Mem64 {
                        return (!(bar.size - 1) >> 32) as u32;
                    }
                }
            }
            return 0;
        }
        self.writable[reg]
    }

    /// Raw register access for the device itself (capability contents it maintains).
    pub fn u8_at(&self, offset: usize) -> u8 {
        if offset >= CONFIG_SPACE_SIZE {
            return 0;
        }
        (self.regs[offset / 4] >> ((offset % 4) * 8)) as u8
    }

    pub fn u16_at(&self, offset: u16) -> u16 {
        let o = usize::from(offset);
        u16::from_le_bytes([self.u8_at(o), self.u8_at(o + 1)])
    }

    pub fn u32_at(&self, offset: u16) -> u32 {
        let o = usize::from(offset);
        u32::from_le_bytes([
            self.u8_at(o),
            self.u8_at(o + 1),
            self.u8_at(o + 2),
            self.u8_at(o + 3),
        ])
    }

    pub fn set_u8(&mut self, offset: u16, value: u8) {
        let o = usize::from(offset);
        if o >= CONFIG_SPACE_SIZE {
            return;
        }
        let shift = (o % 4) * 8;
        let r = &mut self.regs[o / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(value) << shift);
    }

    pub fn set_u16(&mut self, offset: u16, value: u16) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.set_u8(offset.saturating_add(i as u16), b);
        }
    }

    pub fn set_u32(&mut self, offset: u16, value: u32) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.set_u8(offset.saturating_add(i as u16), b);
        }
    }

    /// The registers as data (for snapshots).
    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            registers: self.regs.to_vec(),
        }
    }

    /// Restore registers saved by [`PciConfiguration::state`] into a function of the same
    /// shape (BARs and capabilities are the device's, so only the values are taken).
    pub fn restore(&mut self, state: &PciConfigState) -> Result<(), PciError> {
        if state.registers.len() != self.regs.len() {
            return Err(PciError::State("configuration space size".into()));
        }
        self.regs.copy_from_slice(&state.registers);
        Ok(())
    }
}

/// Dword index of BAR `index`.
fn bar_reg(index: usize) -> usize {
    usize::from(BAR0) / 4 + index
}

/// The read-only type bits in the low dword of `bar`.
fn bar_type_bits(bar: Bar) -> u32 {
    match bar.kind {
        BarKind::Io => 0b11,
        BarKind::Mem32 | BarKind::Mem64 => 0b1111,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            class_code: 0x01_00_00,
            revision_id: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn r32(c: &PciConfiguration, off: u16) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w32(c: &mut PciConfiguration, off: u16, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn ids_and_class_read_back_and_are_read_only() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0100_0001);
        assert_eq!(r32(&c, 0x2c), 0x0040_1af4);
        w32(&mut c, 0, 0xdead_beef);
        w32(&mut c, 8, 0xdead_beef);
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0100_0001);
        // The interrupt line is scratch for the OS; the pin stays 0 (no INTx).
        w32(&mut c, 0x3c, 0xffff_ffff);
        assert_eq!(r32(&c, 0x3c), 0xff);
        // No expansion ROM.
        w32(&mut c, EXPANSION_ROM, 0xffff_ffff);
        assert_eq!(r32(&c, EXPANSION_ROM), 0);
    }

    #[test]
    fn command_register_masks_unknown_bits() {
        let mut c = PciConfiguration::new(&header());
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        // The status half of the dword is read-only.
        w32(&mut c, COMMAND, 0xffff_0000);
        assert_eq!(r32(&c, COMMAND), 0);
    }

    /// The all-ones probe of §6.2.5.1: write ~0, read, size = ~(value & mask) + 1.
    fn probe32(c: &mut PciConfiguration, index: usize) -> u32 {
        let off = BAR0 + 4 * index as u16;
        let old = r32(c, off);
        w32(c, off, 0xffff_ffff);
        let v = r32(c, off);
        w32(c, off, old);
        v
    }

    #[test]
    fn bar_sizing_32_bit_memory_io_and_64_bit() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(
            0,
            Bar {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            1,
            Bar {
                kind: BarKind::Io,
                size: 0x20,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            Bar {
                kind: BarKind::Mem64,
                size: 0x2_0000_0000,
                prefetchable: true,
            },
        )
        .unwrap();
        assert_eq!(probe32(&mut c, 0), 0xffff_f000);
        assert_eq!(probe32(&mut c, 1), 0xffff_ffe1);
        // 64-bit prefetchable: type bits 0b1100; the low dword has no address bits for 8 GiB,
        // the high dword gives the rest.
        assert_eq!(probe32(&mut c, 2), 0x0000_000c);
        assert_eq!(probe32(&mut c, 3), 0xffff_fffe);
        let size =
            !((u64::from(probe32(&mut c, 3)) << 32) | u64::from(probe32(&mut c, 2) & !0xf)) + 1;
        assert_eq!(size, 0x2_0000_0000);
        // Unimplemented BARs read 0 and ignore writes.
        assert_eq!(probe32(&mut c, 4), 0);
        assert_eq!(probe32(&mut c, 5), 0);
        // Sizing restored the old (zero) addresses.
        assert_eq!(c.bar_addr(0), Some(0));
        assert_eq!(c.bar_addr(2), Some(0));
    }

    #[test]
    fn bar_addresses_are_masked_and_decode_follows_the_command_register() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(
            0,
            Bar {
                kind: BarKind::Mem64,
                size: 0x4000,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            Bar {
                kind: BarKind::Io,
                size: 0x10,
                prefetchable: false,
            },
        )
        .unwrap();
        c.set_bar_addr(0, 0x8_0000_0000).unwrap();
        c.set_bar_addr(2, 0x1000).unwrap();
        assert_eq!(c.decoded_bars(), [None; NUM_BARS]);
        c.set_command(COMMAND_MEMORY_SPACE);
        let d = c.decoded_bars();
        assert_eq!(
            d[0],
            Some(BarMapping {
                kind: BarKind::Mem64,
                addr: 0x8_0000_0000,
                size: 0x4000
            })
        );
        assert_eq!(d[2], None);
        c.write(COMMAND, &[0x03]);
        assert_eq!(c.decoded_bars()[2].map(|m| m.addr), Some(0x1000));
        // A misaligned guest address is masked to the BAR's size.
        w32(&mut c, BAR0, 0xc000_1234);
        w32(&mut c, BAR0 + 4, 0);
        assert_eq!(c.bar_addr(0), Some(0xc000_0000));
        assert_eq!(r32(&c, BAR0), 0xc000_0004);
        // Byte writes to a BAR are merged into the dword.
        c.write(BAR0 + 2, &[0x12]);
        assert_eq!(c.bar_addr(0), Some(0xc012_0000));
        // Zero means unassigned: no decode.
        w32(&mut c, BAR0, 0);
        assert_eq!(c.decoded_bars()[0], None);
    }

    #[test]
    fn bad_bar_declarations_are_refused() {
        let mut c = PciConfiguration::new(&header());
        let mem = |size| Bar {
            kind: BarKind::Mem32,
            size,
            prefetchable: false,
        };
        assert!(c.add_bar(0, mem(0x1800)).is_err());
        assert!(c.add_bar(0, mem(8)).is_err());
        assert!(c.add_bar(6, mem(0x1000)).is_err());
        assert!(c
            .add_bar(
                5,
                Bar {
                    kind: BarKind::Mem64,
                    size: 0x1000,
                    prefetchable: false
                }
            )
            .is_err());
        c.add_bar(0, mem(0x1000)).unwrap();
        assert!(c.add_bar(0, mem(0x1000)).is_err());
        assert!(c.set_bar_addr(0, 0x1_0000_0000).is_err());
        assert!(c.set_bar_addr(3, 0x1000).is_err());
    }

    #[test]
    fn capabilities_chain_and_respect_write_masks() {
        let mut c = PciConfiguration::new(&header());
        let a = c.add_capability(0x09, &[1, 2, 3]).unwrap();
        let b = c.add_capability(0x11, &[0; 10]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.u8_at(0x34), 0x40);
        assert_eq!(c.u8_at(0x41), 0x48);
        assert_eq!(c.u8_at(0x49), 0);
        c.set_writable(b + 2, &[0x00, 0xc0]);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.u16_at(b + 2), 0xc000);
        c.write(a, &[0, 0, 0, 0]);
        assert_eq!(c.u8_at(0x40), 0x09);
        // Full area.
        let mut c = PciConfiguration::new(&header());
        c.add_capability(0x09, &[0; 180]).unwrap();
        assert!(c.add_capability(0x09, &[0; 20]).is_err());
    }

    #[test]
    fn odd_accesses_never_panic() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(
            0,
            Bar {
                kind: BarKind::Mem64,
                size: 0x1000,
                prefetchable: false,
            },
        )
        .unwrap();
        let mut rng = crate::test_util::Rng::new(7);
        let mut buf = [0u8; 9];
        for _ in 0..20_000 {
            let off = rng.below(5000) as u16;
            let len = rng.below(10) as usize;
            for b in buf.iter_mut() {
                *b = rng.next() as u8;
            }
            if rng.below(2) == 0 {
                c.read(off, &mut buf[..len]);
            } else {
                c.write(off, &buf[..len]);
            }
        }
        c.write(u16::MAX, &[1, 2, 3, 4]);
        c.read(u16::MAX, &mut buf);
        // IDs survived.
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        let mut d = [0u8; 4];
        c.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn state_round_trips() {
        let mut c = PciConfiguration::new(&header());
        c.write(INTERRUPT_LINE, &[9]);
        let s = c.state();
        let mut d = PciConfiguration::new(&header());
        d.restore(&s).unwrap();
        assert_eq!(d.u8_at(0x3c), 9);
        assert!(d
            .restore(&PciConfigState {
                registers: vec![0; 3]
            })
            .is_err());
    }
}
