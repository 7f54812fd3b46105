//! The 8254 programmable interval timer (Intel 8254 datasheet) at ports 0x40–0x43, and
//! system control port B at 0x61 (IBM PC/AT: bit 0 gate of counter 2, bit 1 speaker data,
//! bit 4 refresh toggle, bit 5 counter 2 output).
//!
//! Counters run at 1.193182 MHz and are computed lazily from the guest TSC the caller passes
//! in: nothing ticks in the background. Modes 0–5, LSB/MSB/LSB-then-MSB access, the counter
//! latch command, the read-back command with status bytes, and BCD counting (values are
//! decoded and encoded as four BCD digits, counting modulo 10000) are implemented. A new count
//! written in modes 2 and 3 while counting takes effect at the end of the current period, as
//! the datasheet says. Counter 0's output drives IRQ 0: [`Pit::poll_irq0`] reports whether it
//! had a rising edge since the last poll (any number of missed periods count as one) and
//! [`Pit::next_irq0`] when the next one is due.
//!
//! The refresh-request toggle (port 0x61 bit 4) flips on every read, so a guest polling it
//! for a change always sees one; Linux's TSC calibration (`pit_calibrate_tsc`,
//! `quick_pit_calibrate`) uses counter 2 in mode 0 with the gate bit and reads the output
//! bit and the live count, which are exact functions of guest time here.

use tracing::debug;

/// The counters' input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// Base port and length of the counter/control ports.
pub const PIT_BASE: u64 = 0x40;
pub const PIT_LEN: u64 = 4;
/// System control port B.
pub const PORT61_BASE: u64 = 0x61;
pub const PORT61_LEN: u64 = 1;

/// Offset of the control word register.
const CONTROL: u64 = 3;
const READ_BACK: u8 = 3;
const PORT61_GATE2: u8 = 0x01;
const PORT61_WRITABLE: u8 = 0x0f;
const PORT61_REFRESH: u8 = 0x10;
const PORT61_OUT2: u8 = 0x20;

/// Read/write access mode of a counter (control word bits 5:4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Access {
    Lsb = 1,
    Msb = 2,
    Word = 3,
}

/// What the counting element is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Counting {
    /// No count loaded since the control word; the output level as the mode sets it.
    Idle { out: bool },
    /// Counting from `n` since PIT tick `start`.
    Running { start: u64, n: u32 },
    /// Gate low (modes 0, 2, 3, 4): frozen `elapsed` ticks into a count of `n`.
    Paused { elapsed: u64, n: u32 },
    /// Modes 1 and 5: count `n` loaded, waiting for a gate trigger.
    Armed { n: u32 },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    gate: bool,
    counting: Counting,
    /// The last complete count written (for triggers and reloads).
    reload: u32,
    /// Modes 2/3: a new count and the tick (end of the current period) it loads at.
    next: Option<(u32, u64)>,
    /// Word access: the LSB was written, the MSB comes next.
    write_msb_next: bool,
    write_lsb: u8,
    /// Word access: the next live read returns the MSB.
    read_msb_next: bool,
    /// Latched count bytes still to be read, in order.
    latch: [u8; 2],
    latch_len: u8,
    status: Option<u8>,
    null_count: bool,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            access: Access::Word,
            bcd: false,
            gate,
            counting: Counting::Idle { out: false },
            reload: 0,
            next: None,
            write_msb_next: false,
            write_lsb: 0,
            read_msb_next: false,
            latch: [0; 2],
            latch_len: 0,
            status: None,
            null_count: true,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// A written 16-bit count as a number of clocks (0 stands for the modulus).
    fn decode(&self, raw: u16) -> u32 {
        let n = if self.bcd {
            (0..4).rev().fold(0u32, |acc, i| {
                acc * 10 + u32::from(((raw >> (i * 4)) & 0xf).min(9))
            })
        } else {
            u32::from(raw)
        };
        if n == 0 {
            self.modulus() as u32
        } else {
            n
        }
    }

    fn encode(&self, value: u64) -> u16 {
        let v = value % self.modulus();
        if self.bcd {
            (0..4).fold(0u16, |acc, i| {
                acc | ((((v / 10u64.pow(i)) % 10) as u16) << (i * 4))
            })
        } else {
            v as u16
        }
    }

    /// Apply a pending mode 2/3 reload whose period boundary has passed.
    fn settle(&mut self, t: u64) {
        if let (Some((n, at)), Counting::Running { .. }) = (self.next, self.counting) {
            if t >= at {
                self.counting = Counting::Running { start: at, n };
                self.next = None;
                self.null_count = false;
            }
        }
    }

    /// Counting-element value and output `d` ticks into a count of `n`.
    fn value_out(&self, d: u64, n: u32) -> (u64, bool) {
        let n64 = u64::from(n.max(1));
        let m = self.modulus();
        let down = (n64 + m - d % m) % m;
        match self.mode {
            0 | 1 => (down, d >= n64),
            2 => {
                let phase = d % n64;
                (n64 - phase, n64 < 2 || phase != n64 - 1)
            }
            3 => {
                let phase = d % n64;
                (n64 - (2 * phase) % n64, phase < n64.div_ceil(2))
            }
            _ => (down, d != n64),
        }
    }

    /// Value and output at tick `t` (after `settle`).
    fn at(&self, t: u64) -> (u64, bool) {
        match self.counting {
            Counting::Idle { out } => (u64::from(self.reload) % self.modulus(), out),
            Counting::Running { start, n } => self.value_out(t.saturating_sub(start), n),
            Counting::Paused { elapsed, n } => match self.mode {
                2 | 3 => (u64::from(n), true),
                _ => self.value_out(elapsed, n),
            },
            // Modes 1 and 5: the output is high until triggered.
            Counting::Armed { n } => (u64::from(n) % self.modulus(), true),
        }
    }

    /// The first rising edge of the output strictly after tick `t`.
    fn next_edge_after(&self, t: u64) -> Option<u64> {
        let Counting::Running { start, n } = self.counting else {
            return None;
        };
        let n64 = u64::from(n.max(1));
        match self.mode {
            0 | 1 => Some(start.saturating_add(n64)).filter(|&e| e > t),
            4 | 5 => Some(start.saturating_add(n64).saturating_add(1)).filter(|&e| e > t),
            _ if n64 < 2 => None,
            _ => {
                let periodic_after = |start: u64, n: u64, t: u64| {
                    let k = if t < start { 1 } else { (t - start) / n + 1 };
                    start.saturating_add(k.saturating_mul(n))
                };
                match self.next {
                    // Edges up to `at` follow the old count, later ones the new count.
                    Some((nn, at)) if t >= at => {
                        let nn = u64::from(nn.max(1));
                        (nn >= 2).then(|| periodic_after(at, nn, t.max(at)))
                    }
                    _ => Some(periodic_after(start, n64, t)),
                }
            }
        }
    }

    /// A complete count was written at tick `t`.
    fn load(&mut self, raw: u16, t: u64) {
        let n = self.decode(raw);
        self.reload = n;
        self.null_count = true;
        match self.mode {
            1 | 5 => {
                if !matches!(self.counting, Counting::Running { .. }) {
                    self.counting = Counting::Armed { n };
                }
            }
            2 | 3 => match self.counting {
                Counting::Running { start, n: old } => {
                    let old = u64::from(old.max(1));
                    let periods = t.saturating_sub(start) / old + 1;
                    let at = start.saturating_add(periods.saturating_mul(old));
                    self.next = Some((n, at));
                }
                _ => self.start(t, n),
            },
            _ => self.start(t, n),
        }
    }

    fn start(&mut self, t: u64, n: u32) {
        self.next = None;
        self.null_count = false;
        self.counting = if self.gate {
            Counting::Running { start: t, n }
        } else {
            Counting::Paused { elapsed: 0, n }
        };
    }

    fn set_gate(&mut self, gate: bool, t: u64) {
        if gate == self.gate {
            return;
        }
        self.settle(t);
        self.gate = gate;
        match (self.mode, gate, self.counting) {
            // Rising edge: modes 1/5 (re)trigger, modes 2/3 reload, modes 0/4 resume.
            (1 | 5, true, Counting::Armed { .. } | Counting::Running { .. }) => {
                self.counting = Counting::Running {
                    start: t,
                    n: self.reload,
                };
                self.null_count = false;
            }
            (2 | 3, true, Counting::Paused { n, .. }) => {
                self.counting = Counting::Running { start: t, n }
            }
            (0 | 4, true, Counting::Paused { elapsed, n }) => {
                self.counting = Counting::Running {
                    start: t.saturating_sub(elapsed),
                    n,
                }
            }
            // Falling edge: modes 0/4 and 2/3 stop counting.
            (0 | 4, false, Counting::Running { start, n }) => {
                self.counting = Counting::Paused {
                    elapsed: t.saturating_sub(start),
                    n,
                }
            }
            (2 | 3, false, Counting::Running { n, .. }) => {
                self.next = None;
                self.counting = Counting::Paused { elapsed: 0, n }
            }
            _ => {}
        }
    }

    fn status_byte(&self, t: u64) -> u8 {
        let (_, out) = self.at(t);
        (u8::from(out) << 7)
            | (u8::from(self.null_count) << 6)
            | ((self.access as u8) << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, t: u64) {
        if self.latch_len != 0 {
            return; // a latched count not yet read stands (datasheet "Counter Latch Command")
        }
        let v = self.encode(self.at(t).0).to_le_bytes();
        (self.latch, self.latch_len) = match self.access {
            Access::Lsb => ([v[0], 0], 1),
            Access::Msb => ([v[1], 0], 1),
            Access::Word => ([v[0], v[1]], 2),
        };
    }

    fn read(&mut self, t: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        if self.latch_len > 0 {
            let b = self.latch[0];
            self.latch = [self.latch[1], 0];
            self.latch_len -= 1;
            return b;
        }
        let v = self.encode(self.at(t).0).to_le_bytes();
        match self.access {
            Access::Lsb => v[0],
            Access::Msb => v[1],
            Access::Word => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    v[0]
                } else {
                    v[1]
                }
            }
        }
    }

    fn write(&mut self, value: u8, t: u64) {
        match self.access {
            Access::Lsb => self.load(u16::from(value), t),
            Access::Msb => self.load(u16::from(value) << 8, t),
            Access::Word if !self.write_msb_next => {
                self.write_lsb = value;
                self.write_msb_next = true;
                if self.mode == 0 {
                    // Mode 0: writing the first byte stops the count, OUT low.
                    self.next = None;
                    self.counting = Counting::Idle { out: false };
                }
            }
            Access::Word => {
                self.write_msb_next = false;
                self.load(u16::from_le_bytes([self.write_lsb, value]), t);
            }
        }
    }

    fn control(&mut self, access: Access, mode: u8, bcd: bool) {
        self.access = access;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.bcd = bcd;
        self.counting = Counting::Idle {
            out: self.mode != 0,
        };
        self.next = None;
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latch_len = 0;
        self.status = None;
        self.null_count = true;
    }
}

/// The 8254 and port 0x61.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pit {
    tsc_hz: u64,
    channels: [Channel; 3],
    /// Port 0x61 bits 0–3 as written.
    port61: u8,
    refresh: bool,
    /// Counter 0 rising edges at or before this tick have been reported.
    irq0_reported: u64,
}

impl Pit {
    /// The guest TSC frequency the counters are timed against (checked on restore).
    pub(crate) fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// A PIT whose time base is a guest TSC of `tsc_hz`.
    pub fn new(tsc_hz: u64) -> Self {
        Pit {
            tsc_hz: tsc_hz.max(1),
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            refresh: false,
            irq0_reported: 0,
        }
    }

    /// PIT ticks at guest TSC `tsc`.
    fn tick(&self, tsc: u64) -> u64 {
        let tick = u128::from(tsc) * u128::from(PIT_HZ) / u128::from(self.tsc_hz);
        u64::try_from(tick).unwrap_or(u64::MAX)
    }

    /// The guest TSC at which PIT tick `tick` begins.
    fn tsc_of(&self, tick: u64) -> u64 {
        let tsc = (u128::from(tick) * u128::from(self.tsc_hz)).div_ceil(u128::from(PIT_HZ));
        u64::try_from(tsc).unwrap_or(u64::MAX)
    }

    /// A read of port 0x40 + `offset` at guest TSC `now`.
    pub fn read(&mut self, offset: u64, now: u64) -> u8 {
        let t = self.tick(now);
        match self.channels.get_mut(offset as usize) {
            Some(ch) => {
                ch.settle(t);
                ch.read(t)
            }
            // The control word register is write-only.
            None => 0xff,
        }
    }

    /// A write of port 0x40 + `offset` at guest TSC `now`.
    pub fn write(&mut self, offset: u64, value: u8, now: u64) {
        let t = self.tick(now);
        for ch in &mut self.channels {
            ch.settle(t);
        }
        if offset == CONTROL {
            self.write_control(value, t);
        } else if let Some(ch) = self.channels.get_mut(offset as usize) {
            ch.write(value, t);
            if offset == 0 {
                self.irq0_reported = t;
            }
        }
    }

    fn write_control(&mut self, v: u8, t: u64) {
        let select = v >> 6;
        if select == READ_BACK {
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if v & (2 << i) == 0 {
                    continue;
                }
                if v & 0x20 == 0 {
                    ch.latch_count(t);
                }
                if v & 0x10 == 0 && ch.status.is_none() {
                    ch.status = Some(ch.status_byte(t));
                }
            }
            return;
        }
        let ch = &mut self.channels[usize::from(select)];
        let access = match (v >> 4) & 3 {
            0 => return ch.latch_count(t),
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        ch.control(access, (v >> 1) & 7, v & 1 != 0);
        if select == 0 {
            self.irq0_reported = t;
        }
        debug!(
            counter = select,
            mode = ch.mode,
            "PIT: control word {v:#04x}"
        );
    }

    /// A read of port 0x61.
    pub fn read_port61(&mut self, now: u64) -> u8 {
        let t = self.tick(now);
        let ch = &mut self.channels[2];
        ch.settle(t);
        let out = ch.at(t).1;
        self.refresh = !self.refresh;
        (self.port61 & PORT61_WRITABLE)
            | if self.refresh { PORT61_REFRESH } else { 0 }
            | if out { PORT61_OUT2 } else { 0 }
    }

    /// A write of port 0x61: bit 0 gates counter 2, bit 1 enables the speaker.
    pub fn write_port61(&mut self, value: u8, now: u64) {
        let t = self.tick(now);
        self.port61 = value & PORT61_WRITABLE;
        self.channels[2].set_gate(value & PORT61_GATE2 != 0, t);
    }

    /// True when counter 0's output rose at least once since the last call (or since it was
    /// programmed), up to guest TSC `now`.
    pub fn poll_irq0(&mut self, now: u64) -> bool {
        let t = self.tick(now);
        let ch = &mut self.channels[0];
        let edge = ch.next_edge_after(self.irq0_reported);
        ch.settle(t);
        match edge {
            Some(e) if e <= t => {
                self.irq0_reported = t;
                true
            }
            _ => false,
        }
    }

    /// The guest TSC of counter 0's next unreported rising edge.
    pub fn next_irq0(&self) -> Option<u64> {
        self.channels[0]
            .next_edge_after(self.irq0_reported)
            .map(|t| self.tsc_of(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    /// A 1 GHz guest TSC: `ns(t)` is the TSC at PIT tick `t`.
    const HZ: u64 = 1_000_000_000;
    fn ns(tick: u64) -> u64 {
        Pit::new(HZ).tsc_of(tick)
    }

    fn read16(pit: &mut Pit, port: u64, now: u64) -> u16 {
        let lo = pit.read(port, now);
        let hi = pit.read(port, now);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn tick_conversion() {
        let pit = Pit::new(HZ);
        assert_eq!(pit.tick(1_000_000_000), PIT_HZ);
        assert_eq!(pit.tick(ns(12345)), 12345);
        assert_eq!(pit.tick(ns(12345) - 1), 12344);
    }

    #[test]
    fn linux_pit_calibrate_tsc_sees_out2_rise() {
        // pit_calibrate_tsc(): gate high, speaker off; counter 2 mode 0, LSB then MSB.
        let mut pit = Pit::new(HZ);
        let p61 = pit.read_port61(0);
        pit.write_port61((p61 & !0x02) | 0x01, 0);
        pit.write(3, 0xb0, 0);
        let latch = 11932u16; // 10 ms
        let t0 = ns(100);
        pit.write(2, latch as u8, t0);
        pit.write(2, (latch >> 8) as u8, t0);
        assert_eq!(pit.read_port61(t0) & 0x20, 0);
        assert_eq!(pit.read_port61(ns(100 + 11931)) & 0x20, 0);
        assert_eq!(pit.read_port61(ns(100 + 11932)) & 0x20, 0x20);
        assert_eq!(pit.read_port61(ns(100 + 50_000)) & 0x23, 0x21);
    }

    #[test]
    fn linux_quick_pit_calibrate_reads_the_msb_going_down() {
        let mut pit = Pit::new(HZ);
        pit.write_port61(0x01, 0);
        pit.write(3, 0xb0, 0);
        pit.write(2, 0xff, 0);
        pit.write(2, 0xff, 0);
        // Live (unlatched) reads alternate LSB, MSB; the MSB drops every 256 ticks.
        for i in 0..=4u64 {
            let t = ns(i * 256 + 10);
            pit.read(2, t); // LSB, ignored
            assert_eq!(pit.read(2, t), 0xff - i as u8);
        }
        assert_eq!(read16(&mut pit, 2, ns(1000)), 0xffff - 1000);
    }

    #[test]
    fn refresh_bit_toggles_on_every_read() {
        let mut pit = Pit::new(HZ);
        let a = pit.read_port61(0) & 0x10;
        let b = pit.read_port61(0) & 0x10;
        let c = pit.read_port61(0) & 0x10;
        assert_ne!(a, b);
        assert_eq!(a, c);
        pit.write_port61(0xff, 0);
        assert_eq!(
            pit.read_port61(0) & 0xcf,
            0x0f,
            "bits 6-7 read 0, 0-3 as written"
        );
    }

    #[test]
    fn mode2_rate_generator_drives_irq0() {
        let mut pit = Pit::new(HZ);
        assert_eq!(pit.next_irq0(), None);
        pit.write(3, 0x34, 0); // counter 0, LSB/MSB, mode 2
        pit.write(0, 0x9c, 0);
        pit.write(0, 0x2e, 0); // 11932: 100 Hz
        assert_eq!(pit.next_irq0(), Some(ns(11932)));
        assert!(!pit.poll_irq0(ns(11931)));
        assert!(pit.poll_irq0(ns(11932)));
        assert!(!pit.poll_irq0(ns(11933)), "one edge per period");
        assert_eq!(pit.next_irq0(), Some(ns(2 * 11932)));
        // Many missed periods coalesce into one edge.
        assert!(pit.poll_irq0(ns(1000 * 11932 + 5)));
        assert!(!pit.poll_irq0(ns(1000 * 11932 + 6)));
        assert_eq!(pit.next_irq0(), Some(ns(1001 * 11932)));
        // Counting down from the count, output low for the last tick.
        pit.write(3, 0x00, ns(1000 * 11932 + 100)); // latch counter 0
        assert_eq!(read16(&mut pit, 0, ns(1000 * 11932 + 9000)), 11932 - 100);
        // Status via read-back: output high, mode 2, LSB/MSB.
        pit.write(3, 0xe2, ns(1000 * 11932 + 200));
        assert_eq!(pit.read(0, 0), 0x80 | 0x30 | (2 << 1));
    }

    #[test]
    fn mode2_new_count_loads_at_the_end_of_the_period() {
        let mut pit = Pit::new(HZ);
        pit.write(3, 0x34, 0);
        pit.write(0, 100, 0);
        pit.write(0, 0, 0);
        assert!(pit.poll_irq0(ns(100)));
        pit.write(0, 50, ns(130));
        pit.write(0, 0, ns(130));
        assert!(!pit.poll_irq0(ns(150)));
        assert_eq!(pit.next_irq0(), Some(ns(200)), "period 100 runs out first");
        assert!(pit.poll_irq0(ns(200)));
        assert_eq!(pit.next_irq0(), Some(ns(250)), "then periods of 50");
        pit.write(3, 0xe2, ns(210));
        assert_eq!(
            pit.read(0, ns(210)) & 0x40,
            0,
            "null count clear once loaded"
        );
    }

    #[test]
    fn mode3_square_wave() {
        let mut pit = Pit::new(HZ);
        pit.write(3, 0xb6, 0); // counter 2, LSB/MSB, mode 3
        pit.write(2, 10, 0);
        pit.write(2, 0, 0);
        assert_eq!(pit.read_port61(ns(5)) & 0x20, 0x20, "gate low: output high");
        pit.write_port61(0x01, ns(100)); // gate rises: counting starts
        let outs: Vec<bool> = (0..20)
            .map(|i| pit.read_port61(ns(100 + i)) & 0x20 != 0)
            .collect();
        let expect: Vec<bool> = (0..20).map(|i| i % 10 < 5).collect();
        assert_eq!(outs, expect);
        assert_eq!(read16(&mut pit, 2, ns(101)), 8, "counts by two");
    }

    #[test]
    fn mode0_interrupt_on_terminal_count_and_gate() {
        let mut pit = Pit::new(HZ);
        pit.write(3, 0x30, 0);
        pit.write(0, 0x10, 0);
        assert_eq!(pit.next_irq0(), None, "half a count: not counting");
        pit.write(0, 0x00, 0);
        assert_eq!(pit.next_irq0(), Some(ns(16)));
        assert!(pit.poll_irq0(ns(20)));
        assert_eq!(pit.next_irq0(), None, "mode 0 fires once");
        assert_eq!(
            read16(&mut pit, 0, ns(20)),
            0xfffc,
            "keeps counting, wrapping"
        );
        // Counter 2 with the gate low does not count; gate high resumes.
        pit.write(3, 0xb0, 0);
        pit.write(2, 100, 0);
        pit.write(2, 0, 0);
        assert_eq!(read16(&mut pit, 2, ns(50)), 100);
        pit.write_port61(1, ns(50));
        pit.write_port61(0, ns(80));
        assert_eq!(read16(&mut pit, 2, ns(500)), 70);
        pit.write_port61(1, ns(600));
        assert_eq!(read16(&mut pit, 2, ns(610)), 60);
        assert_eq!(pit.read_port61(ns(669)) & 0x20, 0);
        assert_eq!(pit.read_port61(ns(670)) & 0x20, 0x20);
    }

    #[test]
    fn mode4_strobe_and_mode1_trigger() {
        let mut pit = Pit::new(HZ);
        pit.write(3, 0x38, 0); // counter 0 mode 4
        pit.write(0, 20, 0);
        pit.write(0, 0, 0);
        assert_eq!(
            pit.next_irq0(),
            Some(ns(21)),
            "output rises after the one-tick strobe"
        );
        // Mode 1 on counter 2: armed until the gate rises.
        pit.write(3, 0xb2, 0);
        pit.write(2, 30, 0);
        pit.write(2, 0, 0);
        assert_eq!(pit.read_port61(ns(100)) & 0x20, 0x20);
        pit.write_port61(1, ns(100));
        assert_eq!(pit.read_port61(ns(110)) & 0x20, 0, "low while counting");
        assert_eq!(pit.read_port61(ns(130)) & 0x20, 0x20);
    }

    #[test]
    fn latch_and_access_modes() {
        let mut pit = Pit::new(HZ);
        pit.write(3, 0x74, 0); // counter 1, LSB/MSB, mode 2
        pit.write(1, 0x34, 0);
        pit.write(1, 0x12, 0);
        pit.write(3, 0x40, ns(0x34)); // latch counter 1
        pit.write(3, 0x40, ns(0x100)); // ignored: a latch is pending
        assert_eq!(pit.read(1, ns(0x200)), 0x00);
        assert_eq!(pit.read(1, ns(0x200)), 0x12);
        // MSB-only access.
        pit.write(3, 0x64, 0);
        pit.write(1, 0x20, 0);
        assert_eq!(pit.read(1, ns(0x100)), 0x1f);
        // Read-back latching count and status of counters 1 and 2; status first.
        pit.write(3, 0xcc, ns(0x100));
        assert_eq!(pit.read(1, ns(0x300)), 0x80 | 0x20 | (2 << 1));
        assert_eq!(pit.read(1, ns(0x300)), 0x1f);
        assert_eq!(pit.read(3, 0), 0xff, "control word is write-only");
    }

    #[test]
    fn bcd_counting() {
        let mut pit = Pit::new(HZ);
        pit.write(3, 0x31, 0); // counter 0, LSB/MSB, mode 0, BCD
        pit.write(0, 0x00, 0);
        pit.write(0, 0x10, 0); // 1000 decimal
        assert_eq!(read16(&mut pit, 0, ns(1)), 0x0999);
        assert_eq!(pit.next_irq0(), Some(ns(1000)));
        // Count 0 is 10000 in BCD; bad digits clamp to 9.
        pit.write(3, 0x31, 0);
        pit.write(0, 0x00, 0);
        pit.write(0, 0x00, 0);
        assert_eq!(pit.next_irq0(), Some(ns(10_000)));
        assert_eq!(read16(&mut pit, 0, ns(1)), 0x9999);
        pit.write(3, 0x31, 0);
        pit.write(0, 0xff, 0);
        pit.write(0, 0xff, 0);
        assert_eq!(pit.next_irq0(), Some(ns(9999)));
    }

    #[test]
    fn hostile_port_hammer() {
        let mut pit = Pit::new(HZ);
        let mut rng = Rng::new(5);
        let mut now = 0u64;
        for _ in 0..200_000 {
            now = match rng.below(50) {
                0 => rng.next(),
                1 => u64::MAX - rng.below(1000),
                _ => now.saturating_add(rng.below(100_000)),
            };
            let v = rng.next() as u8;
            match rng.below(6) {
                0 => {
                    pit.read(rng.below(6), now);
                }
                1 => {
                    pit.read_port61(now);
                }
                2 => pit.write_port61(v, now),
                3 => {
                    pit.poll_irq0(now);
                }
                _ => pit.write(rng.below(6), v, now),
            }
            pit.next_irq0();
        }
        // Periodic mode with count 1 and 2: bounded work, edges arithmetically.
        pit.write(3, 0x34, 0);
        pit.write(0, 2, 0);
        pit.write(0, 0, 0);
        assert!(pit.poll_irq0(u64::MAX));
        assert!(pit.next_irq0().is_some());
    }
}
