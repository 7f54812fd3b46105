//! MC146818 CMOS RAM and real-time clock: index port at offset 0 (0x70), data port at
//! offset 1 (0x71).
//!
//! The clock is the host's UTC time plus an offset the guest sets by writing the time (e.g.
//! `hwclock -w`: SET in status B freezes the registers, the guest writes them, clearing SET
//! starts the clock from the written time). Register names follow the MC146818A data sheet;
//! the memory-size bytes follow the PC/AT CMOS layout (and what SeaBIOS/QEMU fill in).
//!
//! Interrupts (IRQ 8): the periodic, alarm and update-ended flags in status C are computed
//! whenever the guest reads C or the VMM calls [`Cmos::tick`]; with an [`IrqLine`] the line is
//! high while status C's IRQF is set, until the guest reads C. To deliver interrupts on time
//! the VMM calls [`Cmos::tick`] at [`Cmos::next_deadline`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::debug;
use vireo_hv::IrqLine;

use super::{read_bytes, write_bytes};
use crate::BusDevice;

/// Offset of the index port (0x70); bit 7 of the written value is the NMI mask.
pub const INDEX_OFFSET: u64 = 0;
/// Offset of the data port (0x71).
pub const DATA_OFFSET: u64 = 1;
/// The length the device is registered with.
pub const CMOS_LEN: u64 = 2;

// Clock registers.
const RTC_SECONDS: u8 = 0x00;
const RTC_SECONDS_ALARM: u8 = 0x01;
const RTC_MINUTES: u8 = 0x02;
const RTC_MINUTES_ALARM: u8 = 0x03;
const RTC_HOURS: u8 = 0x04;
const RTC_HOURS_ALARM: u8 = 0x05;
const RTC_DAY_OF_WEEK: u8 = 0x06;
const RTC_DAY_OF_MONTH: u8 = 0x07;
const RTC_MONTH: u8 = 0x08;
const RTC_YEAR: u8 = 0x09;
const RTC_REG_A: u8 = 0x0a;
const RTC_REG_B: u8 = 0x0b;
const RTC_REG_C: u8 = 0x0c;
const RTC_REG_D: u8 = 0x0d;
/// Century (IBM PC/AT; ACPI FADT `CENTURY` points here).
const RTC_CENTURY: u8 = 0x32;

// Status A.
const REG_A_UIP: u8 = 0x80;
const REG_A_DV: u8 = 0x70;
const REG_A_RS: u8 = 0x0f;
/// Divider chain in reset (DV = 11x): no updates.
const REG_A_DV_RESET: u8 = 0x60;
/// 32.768 kHz time base, 1024 Hz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;

// Status B.
const REG_B_SET: u8 = 0x80;
const REG_B_PIE: u8 = 0x40;
const REG_B_AIE: u8 = 0x20;
const REG_B_UIE: u8 = 0x10;
/// Data mode: binary instead of BCD.
const REG_B_DM: u8 = 0x04;
/// 24-hour mode (clear: 12-hour mode, PM in bit 7 of the hour).
const REG_B_24H: u8 = 0x02;
const REG_B_DEFAULT: u8 = REG_B_24H;

// Status C.
const REG_C_IRQF: u8 = 0x80;
const REG_C_PF: u8 = 0x40;
const REG_C_AF: u8 = 0x20;
const REG_C_UF: u8 = 0x10;

/// Status D: valid RAM and time.
const REG_D_VRT: u8 = 0x80;

/// Alarm register values 0xc0–0xff match any value ("don't care").
const ALARM_DONT_CARE: u8 = 0xc0;
const HOUR_PM: u8 = 0x80;

/// UIP is set this long before each update (MC146818A: t_BUC = 244 µs).
const UIP_WINDOW_NS: u32 = 244_000;
/// Time base frequency.
const TIME_BASE_HZ: u128 = 32_768;

// PC/AT memory-size bytes.
const CMOS_BASE_MEM_LO: usize = 0x15;
const CMOS_EXT_MEM_LO: usize = 0x17;
const CMOS_EXT_MEM2_LO: usize = 0x30;
const CMOS_MEM_ABOVE_16M_LO: usize = 0x34;
const CMOS_MEM_ABOVE_4G: usize = 0x5b;

const MIB: u64 = 1 << 20;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday … 7 = Saturday.
    weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (eras of 400 years, years starting
/// in March so the leap day is last).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month, day).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // month is 1..=12 and day 1..=31 by construction.
    (year, month as u8, day as u8)
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (sod / 3600) as u8,
            minute: (sod / 60 % 60) as u8,
            second: (sod % 60) as u8,
            // 1970-01-01 was a Thursday (5).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

fn bin_to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn bcd_to_bin(v: u8) -> Option<u8> {
    let (hi, lo) = (v >> 4, v & 0xf);
    (hi < 10 && lo < 10).then_some(hi * 10 + lo)
}

/// Register encoding as selected by status B (DM and 24/12).
#[derive(Clone, Copy)]
struct Mode(u8);

impl Mode {
    fn encode(self, v: u8) -> u8 {
        if self.0 & REG_B_DM != 0 {
            v
        } else {
            bin_to_bcd(v)
        }
    }

    fn decode(self, v: u8) -> Option<u8> {
        if self.0 & REG_B_DM != 0 {
            Some(v)
        } else {
            bcd_to_bin(v)
        }
    }

    fn encode_hour(self, h: u8) -> u8 {
        if self.0 & REG_B_24H != 0 {
            return self.encode(h);
        }
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | if h >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(self, v: u8) -> Option<u8> {
        if self.0 & REG_B_24H != 0 {
            return self.decode(v).filter(|&h| h < 24);
        }
        let h = self.decode(v & !HOUR_PM).filter(|h| (1..=12).contains(h))?;
        Some(h % 12 + if v & HOUR_PM != 0 { 12 } else { 0 })
    }
}

/// Where the RTC gets host time from (tests substitute their own).
type Clock = Box<dyn Fn() -> SystemTime + Send>;

/// The CMOS RAM and RTC.
pub struct Cmos {
    index: u8,
    /// CMOS RAM: NVRAM, status A/B, alarm registers, and the clock registers while SET holds.
    data: [u8; 128],
    /// Guest RTC time minus host time, in seconds.
    offset_secs: i64,
    clock: Clock,
    irq: Option<Arc<dyn IrqLine>>,
    irq_level: bool,
    /// PF/AF/UF of status C.
    flags: u8,
    /// RTC second up to which updates were accounted for.
    last_update: i64,
    /// Periodic tick (host time in periods) up to which PF was accounted for.
    last_periodic: u128,
    bad_time_logged: bool,
}

/// The CMOS/RTC state as data (snapshots). The clock is the host's UTC plus the guest's
/// offset, so a restored guest's RTC shows the host's time then (its time jumps).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    index: u8,
    data: Vec<u8>,
    offset_secs: i64,
    irq_level: bool,
    flags: u8,
}

impl Cmos {
    /// The state as data.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            data: self.data.to_vec(),
            offset_secs: self.offset_secs,
            irq_level: self.irq_level,
            flags: self.flags,
        }
    }

    /// Load a state from [`Cmos::state`]; a malformed one is refused.
    pub fn restore(&mut self, s: &CmosState) -> Result<(), String> {
        self.data = s
            .data
            .as_slice()
            .try_into()
            .map_err(|_| "CMOS: RAM is not 128 bytes".to_string())?;
        self.index = s.index;
        self.offset_secs = s.offset_secs;
        self.irq_level = s.irq_level;
        self.flags = s.flags;
        self.last_update = self.rtc_now().0;
        self.last_periodic = self.periodic_index().unwrap_or(0);
        Ok(())
    }

    /// A CMOS with `mem_below_4g` bytes of RAM from address 0 up to the 32-bit MMIO hole
    /// and `mem_above_4g` bytes from 4 GiB up, without an interrupt line.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, None, Box::new(SystemTime::now))
    }

    /// Raise `irq` (ISA IRQ 8) for periodic, alarm and update-ended interrupts.
    pub fn with_irq(mut self, irq: Arc<dyn IrqLine>) -> Self {
        self.irq = Some(irq);
        self.irq_level = false;
        self
    }

    fn with_clock(
        mem_below_4g: u64,
        mem_above_4g: u64,
        irq: Option<Arc<dyn IrqLine>>,
        clock: Clock,
    ) -> Self {
        let mut data = [0u8; 128];
        data[usize::from(RTC_REG_A)] = REG_A_DEFAULT;
        data[usize::from(RTC_REG_B)] = REG_B_DEFAULT;
        let mut put = |at: usize, bytes: usize, value: u64| {
            for i in 0..bytes {
                data[at + i] = (value >> (8 * i)) as u8;
            }
        };
        put(CMOS_BASE_MEM_LO, 2, 640);
        let ext_kib = (mem_below_4g.saturating_sub(MIB) / 1024).min(0xffff);
        put(CMOS_EXT_MEM_LO, 2, ext_kib);
        put(CMOS_EXT_MEM2_LO, 2, ext_kib);
        let above_16m = (mem_below_4g.saturating_sub(16 * MIB) >> 16).min(0xffff);
        put(CMOS_MEM_ABOVE_16M_LO, 2, above_16m);
        put(CMOS_MEM_ABOVE_4G, 3, (mem_above_4g >> 16).min(0xff_ffff));
        let mut cmos = Cmos {
            index: 0,
            data,
            offset_secs: 0,
            clock,
            irq,
            irq_level: false,
            flags: 0,
            last_update: 0,
            last_periodic: 0,
            bad_time_logged: false,
        };
        cmos.last_update = cmos.rtc_now().0;
        cmos.last_periodic = cmos.periodic_index().unwrap_or(0);
        cmos
    }

    /// Host time: (seconds since the epoch, nanoseconds).
    fn host_now(&self) -> (i64, u32) {
        match (self.clock)().duration_since(UNIX_EPOCH) {
            Ok(d) => (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                d.subsec_nanos(),
            ),
            Err(_) => (0, 0),
        }
    }

    /// Guest RTC time: (seconds since the epoch, nanoseconds into the second).
    fn rtc_now(&self) -> (i64, u32) {
        let (secs, nanos) = self.host_now();
        (secs.saturating_add(self.offset_secs), nanos)
    }

    fn reg(&self, r: u8) -> u8 {
        self.data[usize::from(r)]
    }

    fn mode(&self) -> Mode {
        Mode(self.reg(RTC_REG_B))
    }

    /// Updates happen once a second unless SET holds them or the divider is in reset.
    fn running(&self) -> bool {
        self.reg(RTC_REG_B) & REG_B_SET == 0
            && self.reg(RTC_REG_A) & REG_A_DV_RESET != REG_A_DV_RESET
    }

    fn is_clock_register(r: u8) -> bool {
        matches!(
            r,
            RTC_SECONDS
                | RTC_MINUTES
                | RTC_HOURS
                | RTC_DAY_OF_WEEK
                | RTC_DAY_OF_MONTH
                | RTC_MONTH
                | RTC_YEAR
                | RTC_CENTURY
        )
    }

    /// The clock register `r` for time `t`, encoded in `mode`.
    fn clock_field(t: &DateTime, r: u8, mode: Mode) -> u8 {
        match r {
            RTC_SECONDS => mode.encode(t.second),
            RTC_MINUTES => mode.encode(t.minute),
            RTC_HOURS => mode.encode_hour(t.hour),
            RTC_DAY_OF_WEEK => mode.encode(t.weekday),
            RTC_DAY_OF_MONTH => mode.encode(t.day),
            RTC_MONTH => mode.encode(t.month),
            RTC_YEAR => mode.encode(t.year.rem_euclid(100) as u8),
            RTC_CENTURY => mode.encode(t.year.div_euclid(100).rem_euclid(100) as u8),
            _ => 0,
        }
    }

    /// Copy the running clock into the clock registers (SET rising, or a write while running).
    fn freeze(&mut self, mode: Mode) {
        let t = DateTime::from_unix(self.rtc_now().0);
        for r in [
            RTC_SECONDS,
            RTC_MINUTES,
            RTC_HOURS,
            RTC_DAY_OF_WEEK,
            RTC_DAY_OF_MONTH,
            RTC_MONTH,
            RTC_YEAR,
            RTC_CENTURY,
        ] {
            self.data[usize::from(r)] = Self::clock_field(&t, r, mode);
        }
    }

    /// Run the clock from the time in the clock registers, read in `mode`.
    fn thaw(&mut self, mode: Mode) {
        let decoded = (|| {
            let year = mode.decode(self.reg(RTC_YEAR)).filter(|&y| y < 100)?;
            let century = mode.decode(self.reg(RTC_CENTURY)).filter(|&c| c < 100)?;
            Some(DateTime {
                year: i64::from(century) * 100 + i64::from(year),
                month: mode
                    .decode(self.reg(RTC_MONTH))
                    .filter(|m| (1..=12).contains(m))?,
                day: mode
                    .decode(self.reg(RTC_DAY_OF_MONTH))
                    .filter(|d| (1..=31).contains(d))?,
                hour: mode.decode_hour(self.reg(RTC_HOURS))?,
                minute: mode.decode(self.reg(RTC_MINUTES)).filter(|&m| m < 60)?,
                second: mode.decode(self.reg(RTC_SECONDS)).filter(|&s| s < 60)?,
                weekday: 0,
            })
        })();
        match decoded {
            Some(t) => {
                self.offset_secs = t.to_unix().saturating_sub(self.host_now().0);
                self.last_update = self.rtc_now().0;
            }
            None => {
                if !self.bad_time_logged {
                    self.bad_time_logged = true;
                    debug!("cmos: guest wrote an invalid time; keeping the clock (logged once)");
                }
            }
        }
    }

    /// The current periodic-interrupt period number, if the periodic rate is not "none".
    fn periodic_index(&self) -> Option<u128> {
        let ticks = Self::periodic_ticks(self.reg(RTC_REG_A))?;
        let (secs, nanos) = self.host_now();
        let ns = u128::try_from(secs).unwrap_or(0) * 1_000_000_000 + u128::from(nanos);
        Some(ns * TIME_BASE_HZ / (ticks * 1_000_000_000))
    }

    /// Periodic interrupt period in time-base ticks (MC146818A Table 3; 32.768 kHz base).
    fn periodic_ticks(reg_a: u8) -> Option<u128> {
        match reg_a & REG_A_RS {
            0 => None,
            rs @ (1 | 2) => Some(1 << (rs + 6)),
            rs => Some(1 << (rs - 1)),
        }
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let t = DateTime::from_unix(secs);
        let mode = self.mode();
        [
            (RTC_SECONDS_ALARM, mode.encode(t.second)),
            (RTC_MINUTES_ALARM, mode.encode(t.minute)),
            (RTC_HOURS_ALARM, mode.encode_hour(t.hour)),
        ]
        .iter()
        .all(|&(r, v)| self.reg(r) >= ALARM_DONT_CARE || self.reg(r) == v)
    }

    /// Account for updates and periodic ticks up to now, then drive IRQ 8.
    fn update_flags(&mut self) {
        let now = self.rtc_now().0;
        if self.running() {
            if now > self.last_update {
                self.flags |= REG_C_UF;
                // The alarm can only match once a day: look at no more than a day of seconds.
                let first = self.last_update.saturating_add(1).max(now - 86_399);
                if (first..=now).any(|s| self.alarm_matches(s)) {
                    self.flags |= REG_C_AF;
                }
            }
            if let Some(index) = self.periodic_index() {
                if index != self.last_periodic {
                    self.flags |= REG_C_PF;
                    self.last_periodic = index;
                }
            }
        }
        self.last_update = now;
        self.update_irq();
    }

    fn irqf(&self) -> bool {
        let enabled = self.reg(RTC_REG_B) & (REG_B_PIE | REG_B_AIE | REG_B_UIE);
        // PF/AF/UF line up with PIE/AIE/UIE.
        self.flags & enabled != 0
    }

    fn update_irq(&mut self) {
        let level = self.irqf();
        if level != self.irq_level {
            self.irq_level = level;
            if let Some(irq) = &self.irq {
                irq.set_level(level);
            }
        }
    }

    /// Bring status C up to date and raise IRQ 8 if an enabled event happened. The VMM
    /// calls this at [`Cmos::next_deadline`].
    pub fn tick(&mut self) {
        self.update_flags();
    }

    /// When the next enabled interrupt event is due, if one can happen (no IRQ line, nothing
    /// enabled, or IRQ 8 still waiting for the guest to read status C: `None`).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.irq.is_none() || self.irq_level || !self.running() {
            return None;
        }
        let b = self.reg(RTC_REG_B);
        let (secs, nanos) = self.host_now();
        let mut next: Option<Duration> = None;
        if b & (REG_B_UIE | REG_B_AIE) != 0 {
            next = Some(Duration::from_nanos(u64::from(1_000_000_000 - nanos)));
        }
        if b & REG_B_PIE != 0 {
            if let Some(ticks) = Self::periodic_ticks(self.reg(RTC_REG_A)) {
                let ns = u128::try_from(secs).unwrap_or(0) * 1_000_000_000 + u128::from(nanos);
                let period = ticks * 1_000_000_000;
                // ns * 32768 rounded up to the next period boundary, back in ns.
                let boundary = (ns * TIME_BASE_HZ / period + 1) * period;
                let wait = boundary.div_ceil(TIME_BASE_HZ).saturating_sub(ns);
                let wait = Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX));
                next = Some(next.map_or(wait, |n| n.min(wait)));
            }
        }
        next.map(|d| Instant::now() + d)
    }

    fn read_data(&mut self) -> u8 {
        let r = self.index;
        match r {
            RTC_REG_A => {
                let uip = self.running() && self.rtc_now().1 >= 1_000_000_000 - UIP_WINDOW_NS;
                self.reg(RTC_REG_A) | if uip { REG_A_UIP } else { 0 }
            }
            RTC_REG_C => {
                self.update_flags();
                let value = self.flags | if self.irqf() { REG_C_IRQF } else { 0 };
                self.flags = 0;
                self.update_irq();
                value
            }
            RTC_REG_D => REG_D_VRT,
            _ if Self::is_clock_register(r) && self.reg(RTC_REG_B) & REG_B_SET == 0 => {
                Self::clock_field(&DateTime::from_unix(self.rtc_now().0), r, self.mode())
            }
            _ => self.reg(r),
        }
    }

    fn write_data(&mut self, value: u8) {
        let r = self.index;
        match r {
            RTC_REG_A => {
                let old = self.reg(RTC_REG_A);
                self.update_flags();
                self.data[usize::from(RTC_REG_A)] = value & !REG_A_UIP;
                if (old ^ value) & (REG_A_RS | REG_A_DV) != 0 {
                    self.last_periodic = self.periodic_index().unwrap_or(0);
                    self.last_update = self.rtc_now().0;
                }
            }
            RTC_REG_B => {
                self.update_flags();
                let old = self.reg(RTC_REG_B);
                // SET also clears UIE (MC146818A status B, bit 7).
                let value = if value & REG_B_SET != 0 {
                    value & !REG_B_UIE
                } else {
                    value
                };
                if value & REG_B_SET != 0 && old & REG_B_SET == 0 {
                    self.freeze(Mode(value));
                } else if value & REG_B_SET == 0 && old & REG_B_SET != 0 {
                    self.thaw(Mode(old));
                }
                self.data[usize::from(RTC_REG_B)] = value;
                self.update_irq();
            }
            RTC_REG_C | RTC_REG_D => {}
            _ if Self::is_clock_register(r) => {
                if self.reg(RTC_REG_B) & REG_B_SET != 0 {
                    self.data[usize::from(r)] = value;
                } else {
                    // Setting one field of a running clock: the others keep their time.
                    let mode = self.mode();
                    self.freeze(mode);
                    self.data[usize::from(r)] = value;
                    self.thaw(mode);
                }
            }
            _ => self.data[usize::from(r)] = value,
        }
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        match offset {
            // The index register is write-only on a PC; reads float.
            DATA_OFFSET => self.read_data(),
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            // Bit 7 is the NMI mask (not emulated); 128 bytes of RAM.
            INDEX_OFFSET => self.index = value & 0x7f,
            DATA_OFFSET => self.write_data(value),
            _ => {}
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| self.read_register(o));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |o, v| self.write_register(o, v));
    }

    fn name(&self) -> &'static str {
        "cmos"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::test_util::{hammer, FakeIrq};

    /// A host clock the test moves by hand.
    #[derive(Clone)]
    struct TestClock(Arc<Mutex<SystemTime>>);

    impl TestClock {
        fn at(unix: u64, nanos: u32) -> Self {
            TestClock(Arc::new(Mutex::new(
                UNIX_EPOCH + Duration::new(unix, nanos),
            )))
        }
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
        fn boxed(&self) -> Clock {
            let c = self.0.clone();
            Box::new(move || *c.lock().unwrap())
        }
    }

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_EVE: u64 = 1_709_251_198;

    fn cmos_at(clock: &TestClock) -> Cmos {
        Cmos::with_clock(256 * MIB, 0, None, clock.boxed())
    }

    fn get(c: &mut Cmos, r: u8) -> u8 {
        c.write(INDEX_OFFSET, &[r]);
        let mut d = [0];
        c.read(DATA_OFFSET, &mut d);
        d[0]
    }

    fn set(c: &mut Cmos, r: u8, v: u8) {
        c.write(INDEX_OFFSET, &[r]);
        c.write(DATA_OFFSET, &[v]);
    }

    fn time_regs(c: &mut Cmos) -> [u8; 8] {
        [
            RTC_CENTURY,
            RTC_YEAR,
            RTC_MONTH,
            RTC_DAY_OF_MONTH,
            RTC_HOURS,
            RTC_MINUTES,
            RTC_SECONDS,
            RTC_DAY_OF_WEEK,
        ]
        .map(|r| get(c, r))
    }

    #[test]
    fn civil_conversions_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in (-800_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let t = DateTime::from_unix(LEAP_EVE as i64);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2024, 2, 29, 23, 59, 58, 5)
        );
        assert_eq!(t.to_unix(), LEAP_EVE as i64);
    }

    #[test]
    fn bcd_conversion() {
        assert_eq!(bin_to_bcd(0), 0x00);
        assert_eq!(bin_to_bcd(59), 0x59);
        assert_eq!(bin_to_bcd(99), 0x99);
        assert_eq!(bcd_to_bin(0x42), Some(42));
        assert_eq!(bcd_to_bin(0x1a), None);
        assert_eq!(bcd_to_bin(0xa1), None);
        for v in 0..100 {
            assert_eq!(bcd_to_bin(bin_to_bcd(v)), Some(v));
        }
    }

    #[test]
    fn reads_host_utc_in_bcd_by_default_and_binary_with_dm() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = cmos_at(&clock);
        assert_eq!(
            time_regs(&mut c),
            [0x20, 0x24, 0x02, 0x29, 0x23, 0x59, 0x58, 0x05]
        );
        set(&mut c, RTC_REG_B, REG_B_24H | REG_B_DM);
        assert_eq!(time_regs(&mut c), [20, 24, 2, 29, 23, 59, 58, 5]);
        // Two seconds later it is March 1st, a Friday.
        clock.advance(Duration::from_secs(2));
        assert_eq!(time_regs(&mut c), [20, 24, 3, 1, 0, 0, 0, 6]);
    }

    #[test]
    fn twelve_hour_mode() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = cmos_at(&clock);
        set(&mut c, RTC_REG_B, 0); // BCD, 12 h
        assert_eq!(get(&mut c, RTC_HOURS), HOUR_PM | 0x11); // 23:xx = 11 PM
        clock.advance(Duration::from_secs(2));
        assert_eq!(get(&mut c, RTC_HOURS), 0x12); // midnight = 12 AM
        clock.advance(Duration::from_secs(12 * 3600));
        assert_eq!(get(&mut c, RTC_HOURS), HOUR_PM | 0x12); // noon = 12 PM
        set(&mut c, RTC_REG_B, REG_B_DM); // binary, 12 h
        assert_eq!(get(&mut c, RTC_HOURS), HOUR_PM | 12);
        assert_eq!(Mode(0).decode_hour(0x12), Some(0));
        assert_eq!(Mode(0).decode_hour(HOUR_PM | 0x12), Some(12));
        assert_eq!(Mode(0).decode_hour(HOUR_PM | 0x01), Some(13));
        assert_eq!(Mode(0).decode_hour(0x13), None);
        assert_eq!(Mode(0).decode_hour(0x00), None);
    }

    #[test]
    fn written_time_sticks_and_advances() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = cmos_at(&clock);
        // What Linux's mc146818_set_time does: SET, divider reset, write, restore.
        let b = get(&mut c, RTC_REG_B);
        set(&mut c, RTC_REG_B, b | REG_B_SET);
        let a = get(&mut c, RTC_REG_A);
        set(&mut c, RTC_REG_A, a | 0x70);
        for (r, v) in [
            (RTC_SECONDS, 0x30),
            (RTC_MINUTES, 0x15),
            (RTC_HOURS, 0x10),
            (RTC_DAY_OF_MONTH, 0x04),
            (RTC_MONTH, 0x07),
            (RTC_YEAR, 0x99),
            (RTC_CENTURY, 0x19),
        ] {
            set(&mut c, r, v);
        }
        // Frozen while SET holds.
        clock.advance(Duration::from_secs(5));
        assert_eq!(get(&mut c, RTC_SECONDS), 0x30);
        set(&mut c, RTC_REG_B, b);
        set(&mut c, RTC_REG_A, a);
        assert_eq!(
            time_regs(&mut c),
            [0x19, 0x99, 0x07, 0x04, 0x10, 0x15, 0x30, 0x01]
        );
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            time_regs(&mut c),
            [0x19, 0x99, 0x07, 0x04, 0x10, 0x16, 0x31, 0x01]
        );
        // Writing one field of the running clock keeps the others.
        set(&mut c, RTC_HOURS, 0x08);
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            time_regs(&mut c),
            [0x19, 0x99, 0x07, 0x04, 0x08, 0x16, 0x32, 0x01]
        );
    }

    #[test]
    fn invalid_written_time_is_ignored() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = cmos_at(&clock);
        set(&mut c, RTC_REG_B, REG_B_24H | REG_B_SET);
        set(&mut c, RTC_MONTH, 0x13);
        set(&mut c, RTC_REG_B, REG_B_24H);
        assert_eq!(get(&mut c, RTC_MONTH), 0x02);
        set(&mut c, RTC_SECONDS, 0x7a); // not BCD
        assert_eq!(get(&mut c, RTC_SECONDS), 0x58);
        assert!(c.bad_time_logged);
    }

    #[test]
    fn status_registers() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = cmos_at(&clock);
        assert_eq!(get(&mut c, RTC_REG_A), REG_A_DEFAULT);
        assert_eq!(get(&mut c, RTC_REG_B), REG_B_DEFAULT);
        assert_eq!(get(&mut c, RTC_REG_D), REG_D_VRT);
        set(&mut c, RTC_REG_D, 0);
        assert_eq!(get(&mut c, RTC_REG_D), REG_D_VRT);
        // UIP only just before the second rolls over.
        clock.advance(Duration::from_nanos(999_800_000));
        assert_eq!(get(&mut c, RTC_REG_A), REG_A_UIP | REG_A_DEFAULT);
        clock.advance(Duration::from_nanos(300_000));
        assert_eq!(get(&mut c, RTC_REG_A), REG_A_DEFAULT);
        set(&mut c, RTC_REG_A, 0xff);
        assert_eq!(get(&mut c, RTC_REG_A), 0x7f, "UIP is read-only");
        // SET clears UIE.
        set(&mut c, RTC_REG_B, REG_B_SET | REG_B_UIE | REG_B_24H);
        assert_eq!(get(&mut c, RTC_REG_B), REG_B_SET | REG_B_24H);
    }

    #[test]
    fn index_masks_to_seven_bits_and_nvram_is_storage() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = cmos_at(&clock);
        set(&mut c, 0x7f, 0xa5);
        assert_eq!(get(&mut c, 0xff), 0xa5, "index 0xff is 0x7f");
        set(&mut c, 0x80 | 0x40, 0x5a); // NMI-mask bit set
        assert_eq!(get(&mut c, 0x40), 0x5a);
        for r in 0x0e..0x80u8 {
            if r == RTC_CENTURY {
                continue;
            }
            set(&mut c, r, r ^ 0x3c);
            assert_eq!(get(&mut c, r), r ^ 0x3c);
        }
        // Offsets past the data port float; reads of the index port too.
        let mut d = [0];
        c.read(2, &mut d);
        assert_eq!(d, [0xff]);
        c.read(INDEX_OFFSET, &mut d);
        assert_eq!(d, [0xff]);
        // A 16-bit OUT to 0x70 writes index then data.
        c.write(INDEX_OFFSET, &[0x41, 0x77]);
        assert_eq!(get(&mut c, 0x41), 0x77);
    }

    #[test]
    fn memory_size_registers() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = Cmos::with_clock(3 << 30, 5 << 30, None, clock.boxed());
        let word = |c: &mut Cmos, r: u8| u32::from(get(c, r)) | u32::from(get(c, r + 1)) << 8;
        assert_eq!(word(&mut c, 0x15), 640);
        assert_eq!(word(&mut c, 0x17), 0xffff);
        assert_eq!(word(&mut c, 0x30), 0xffff);
        assert_eq!(word(&mut c, 0x34), ((3 << 30) - (16 << 20)) >> 16);
        let above = word(&mut c, 0x5b) | u32::from(get(&mut c, 0x5d)) << 16;
        assert_eq!(above, 0x1_4000); // 5 GiB in 64 KiB units
        let mut small = Cmos::with_clock(32 * MIB, 0, None, clock.boxed());
        assert_eq!(word(&mut small, 0x17), 31 * 1024);
        assert_eq!(word(&mut small, 0x34), 16 * 16);
        assert_eq!(word(&mut small, 0x5b), 0);
        let tiny = Cmos::with_clock(0, u64::MAX, None, clock.boxed());
        assert_eq!(&tiny.data[0x17..0x19], &[0, 0]);
        assert_eq!(&tiny.data[0x5b..0x5e], &[0xff, 0xff, 0xff]);
    }

    #[test]
    fn update_and_alarm_flags_and_irq() {
        let clock = TestClock::at(LEAP_EVE, 500_000_000);
        let irq = Arc::new(FakeIrq::default());
        let mut c = Cmos::with_clock(256 * MIB, 0, Some(irq.clone()), clock.boxed());
        // No periodic rate: PF would be set too (it is, whether or not PIE is).
        set(&mut c, RTC_REG_A, 0x20);
        assert_eq!(get(&mut c, RTC_REG_C), 0);
        assert!(c.next_deadline().is_none(), "nothing enabled");
        // Alarm at 00:00:00, update interrupts on.
        set(&mut c, RTC_HOURS_ALARM, 0x00);
        set(&mut c, RTC_MINUTES_ALARM, 0x00);
        set(&mut c, RTC_SECONDS_ALARM, 0x00);
        set(&mut c, RTC_REG_B, REG_B_24H | REG_B_UIE | REG_B_AIE);
        let deadline = c.next_deadline().unwrap();
        assert!(deadline <= Instant::now() + Duration::from_millis(500));
        clock.advance(Duration::from_secs(1)); // 23:59:59.5
        c.tick();
        assert!(irq.is_high());
        assert!(c.next_deadline().is_none(), "waiting for the guest");
        assert_eq!(get(&mut c, RTC_REG_C), REG_C_IRQF | REG_C_UF);
        assert!(!irq.is_high());
        clock.advance(Duration::from_secs(1)); // 00:00:00.5
        assert_eq!(get(&mut c, RTC_REG_C), REG_C_IRQF | REG_C_UF | REG_C_AF);
        assert_eq!(irq.edges(), 2);
        // Flags without their enable bits set no IRQF.
        set(&mut c, RTC_REG_B, REG_B_24H);
        clock.advance(Duration::from_secs(1));
        assert_eq!(get(&mut c, RTC_REG_C), REG_C_UF);
        assert_eq!(irq.edges(), 2);
    }

    #[test]
    fn periodic_flag_and_no_updates_while_set() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let irq = Arc::new(FakeIrq::default());
        let mut c = Cmos::with_clock(256 * MIB, 0, Some(irq.clone()), clock.boxed());
        set(&mut c, RTC_REG_B, REG_B_24H | REG_B_PIE);
        get(&mut c, RTC_REG_C);
        // 1024 Hz: the next period ends within ~1 ms.
        let wait = c.next_deadline().unwrap() - Instant::now();
        assert!(wait <= Duration::from_micros(977), "{wait:?}");
        clock.advance(Duration::from_micros(100));
        c.tick();
        assert!(!irq.is_high());
        clock.advance(Duration::from_micros(900));
        c.tick();
        assert!(irq.is_high());
        assert_eq!(get(&mut c, RTC_REG_C), REG_C_IRQF | REG_C_PF);
        // SET stops updates: no flags, no deadline.
        set(&mut c, RTC_REG_B, REG_B_24H | REG_B_SET | REG_B_PIE);
        clock.advance(Duration::from_secs(3));
        assert_eq!(get(&mut c, RTC_REG_C), 0);
        assert!(c.next_deadline().is_none());
        assert_eq!(get(&mut c, RTC_REG_A) & REG_A_UIP, 0);
        // Releasing SET does not replay the missed seconds.
        set(&mut c, RTC_REG_B, REG_B_24H);
        assert_eq!(get(&mut c, RTC_REG_C) & REG_C_UF, 0);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let clock = TestClock::at(LEAP_EVE, 0);
        let mut c = Cmos::with_clock(
            256 * MIB,
            0,
            Some(Arc::new(FakeIrq::default())),
            clock.boxed(),
        );
        hammer(&mut c, CMOS_LEN + 2, 100_000, 0xc305);
        let mut real = Cmos::new(1 << 30, 0).with_irq(Arc::new(FakeIrq::default()));
        hammer(&mut real, CMOS_LEN + 2, 20_000, 0x1234);
        // Extreme host clocks.
        for t in [
            UNIX_EPOCH - Duration::from_secs(5),
            UNIX_EPOCH + Duration::from_secs(1 << 40),
        ] {
            let mut c = Cmos::with_clock(0, 0, None, Box::new(move || t));
            hammer(&mut c, CMOS_LEN, 10_000, 7);
            let _ = c.next_deadline();
        }
    }

    #[test]
    fn state_round_trips_and_keeps_the_guest_offset() {
        let clock = TestClock::at(1_700_000_000, 0);
        let mut a = cmos_at(&clock);
        a.write(INDEX_OFFSET, &[0x40]);
        a.write(DATA_OFFSET, &[0x99]);
        a.offset_secs = -3600;
        let st = a.state();
        let mut b = cmos_at(&clock);
        b.restore(&st).unwrap();
        assert_eq!(b.state(), st);
        let mut v = [0u8];
        b.read(DATA_OFFSET, &mut v);
        assert_eq!(v[0], 0x99);
        let mut bad = st;
        bad.data.pop();
        assert!(b.restore(&bad).is_err());
    }
}
