//! Tests of the whole chip: routing between the controllers, the `UserIrqChip` contract,
//! wake-ups, and hostile callers.

use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use vireo_hv::IoHandler;

use super::lapic::{
    APIC_DFR, APIC_EOI, APIC_ESR, APIC_ICR_HIGH, APIC_ICR_LOW, APIC_ID, APIC_LDR, APIC_LVT_TIMER,
    APIC_SELF_IPI, APIC_SVR, APIC_TIMER_DIVIDE, APIC_TIMER_INITIAL, APIC_TMR, APIC_TPR,
};
use super::*;
use crate::test_util::{hammer, Rng};

use CpuEvent::{Init, Interrupt, Nmi, Sipi};

/// A chip whose guest TSC only moves by `set_time` (1 GHz: TSC = nanoseconds).
fn manual(vcpus: u32) -> Arc<IrqChip> {
    Arc::new(IrqChip::build(
        vcpus,
        GuestClock::default(),
        Time::Manual(AtomicU64::new(0)),
    ))
}

impl IrqChip {
    fn set_time(&self, tsc: u64) {
        if let Time::Manual(t) = &self.time {
            t.store(tsc, Ordering::SeqCst);
        }
    }

    fn published_deadline(&self, id: usize) -> u64 {
        self.slots[id].deadline.load(Ordering::SeqCst)
    }
}

fn enable_all(chip: &IrqChip) {
    for i in 0..chip.vcpus() {
        chip.lapic_write(i, APIC_SVR, 0x1ff);
    }
}

#[derive(Default)]
struct CountingKicker(AtomicUsize);

impl CountingKicker {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Kicker for CountingKicker {
    fn kick(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Take one event, EOI'ing an interrupt at once.
fn take(chip: &IrqChip, id: u32) -> Option<CpuEvent> {
    let ev = chip.take_event(id, true);
    if let Some(Interrupt(_)) = ev {
        chip.lapic_write(id, APIC_EOI, 0);
    }
    ev
}

fn drain(chip: &IrqChip, id: u32) -> Vec<CpuEvent> {
    let mut v = Vec::new();
    while let Some(e) = take(chip, id) {
        v.push(e);
        assert!(v.len() < 100, "event storm");
    }
    v
}

/// Which vCPUs got exactly `Interrupt(vector)`.
fn receivers(chip: &IrqChip, vector: u8) -> Vec<u32> {
    (0..chip.vcpus())
        .filter(|&i| {
            let e = drain(chip, i);
            assert!(e.len() <= 1, "vCPU {i}: {e:?}");
            e == vec![Interrupt(vector)]
        })
        .collect()
}

fn bus(chip: &Arc<IrqChip>) -> IoBus {
    let mut io = IoBus::new();
    chip.register(&mut io).unwrap();
    io
}

fn ioapic_write(io: &IoBus, index: u32, value: u32) {
    io.mmio_write(IOAPIC_BASE, &index.to_le_bytes());
    io.mmio_write(IOAPIC_BASE + 0x10, &value.to_le_bytes());
}

fn msi(chip: &IrqChip, address: u64, data: u32) {
    chip.send_msi(MsiMessage { address, data });
}

/// The TSC (1 GHz) at which PIT tick `tick` begins.
fn pit_tsc(tick: u64) -> u64 {
    (u128::from(tick) * 1_000_000_000).div_ceil(u128::from(PIT_HZ)) as u64
}

#[test]
fn msi_decoding_and_delivery() {
    let chip = manual(4);
    enable_all(&chip);
    // Physical destination 2, fixed.
    msi(&chip, 0xfee0_2000, 0x41);
    assert_eq!(receivers(&chip, 0x41), vec![2]);
    // Logical (flat): vCPU i has LDR bit i; destination 0b0101.
    for i in 0..4 {
        chip.lapic_write(i, APIC_LDR, 1 << (24 + i));
    }
    msi(&chip, 0xfee0_5004, 0x42);
    assert_eq!(receivers(&chip, 0x42), vec![0, 2]);
    // Destination 0xff: broadcast.
    msi(&chip, 0xfeef_f000, 0x43);
    assert_eq!(receivers(&chip, 0x43), vec![0, 1, 2, 3]);
    // NMI.
    msi(&chip, 0xfee0_1000, 0x400);
    assert_eq!(chip.take_event(1, false), Some(Nmi));
    // Outside the window, above 4 GiB, or start-up/SMI/reserved modes: dropped.
    msi(&chip, 0xfed0_0000, 0x44);
    msi(&chip, 0x1_fee0_0000, 0x44);
    msi(&chip, 0xfee0_0000, 0x644);
    msi(&chip, 0xfee0_0000, 0x244);
    msi(&chip, 0xfee0_0000, 0x344);
    assert!((0..4).all(|i| drain(&chip, i).is_empty()));
    // Lowest priority among 0b1111: the vCPU with the lowest TPR.
    for (i, tpr) in [0x20, 0x10, 0x30, 0x40].into_iter().enumerate() {
        chip.lapic_write(i as u32, APIC_TPR, tpr);
    }
    msi(&chip, 0xfee0_f004, 0x145);
    assert_eq!(receivers(&chip, 0x45), vec![1]);
    // The trigger-mode bit does not make an MSI level-triggered.
    msi(&chip, 0xfee0_0000, 0xc050);
    assert_eq!(chip.lapic_read(0, APIC_TMR + 0x20) & (1 << 0x10), 0);
    // An ExtINT MSI takes its vector from the 8259 (nothing pending: spurious IRQ 7).
    msi(&chip, 0xfee0_0000, 0x700);
    assert_eq!(chip.take_event(0, true), Some(Interrupt(7)));
}

#[test]
fn ipis_for_every_shorthand_and_destination_mode() {
    let chip = manual(4);
    enable_all(&chip);
    let ipi = |from: u32, high: u32, low: u32| {
        chip.lapic_write(from, APIC_ICR_HIGH, high);
        chip.lapic_write(from, APIC_ICR_LOW, low);
    };
    ipi(1, 3 << 24, 0x50);
    assert_eq!(receivers(&chip, 0x50), vec![3], "physical");
    ipi(1, 0xff << 24, 0x51);
    assert_eq!(
        receivers(&chip, 0x51),
        vec![0, 1, 2, 3],
        "physical broadcast"
    );
    ipi(1, 0, 0x4_0052);
    assert_eq!(receivers(&chip, 0x52), vec![1], "self");
    ipi(1, 0, 0x8_0053);
    assert_eq!(
        receivers(&chip, 0x53),
        vec![0, 1, 2, 3],
        "all including self"
    );
    ipi(1, 0, 0xc_0054);
    assert_eq!(receivers(&chip, 0x54), vec![0, 2, 3], "all excluding self");
    for i in 0..4 {
        chip.lapic_write(i, APIC_LDR, 1 << (24 + i));
    }
    ipi(1, 0x0a << 24, 0x855);
    assert_eq!(receivers(&chip, 0x55), vec![1, 3], "logical flat");
    for i in 0..4 {
        chip.lapic_write(i, APIC_DFR, 0x0fff_ffff);
        chip.lapic_write(i, APIC_LDR, (0x10 | (1 << i)) << 24);
    }
    ipi(0, 0x16 << 24, 0x856);
    assert_eq!(receivers(&chip, 0x56), vec![1, 2], "logical cluster");
    ipi(0, 0x26 << 24, 0x857);
    assert_eq!(receivers(&chip, 0x57), Vec::<u32>::new(), "another cluster");
    ipi(0, 2 << 24, 0x400);
    assert_eq!(chip.take_event(2, false), Some(Nmi));
    // An illegal vector is not sent and sets the sender's ESR.
    ipi(0, 2 << 24, 0x05);
    assert!((0..4).all(|i| drain(&chip, i).is_empty()));
    chip.lapic_write(0, APIC_ESR, 0);
    assert_eq!(chip.lapic_read(0, APIC_ESR), 0x20);
    // A level-triggered fixed IPI sets TMR at the receiver.
    ipi(0, 2 << 24, 0xc060);
    assert_ne!(chip.lapic_read(2, APIC_TMR + 0x30), 0);
}

#[test]
fn x2apic_ipis() {
    let chip = manual(3);
    enable_all(&chip);
    for i in 0..3 {
        chip.set_apic_base(i, 0xfee0_0000 | (1 << 11) | (1 << 10));
    }
    assert_eq!(chip.lapic_read(2, APIC_ID), 2);
    assert_eq!(chip.apic_base(0), 0xfee0_0d00, "BSP flag kept");
    chip.lapic_write_icr(0, (2u64 << 32) | 0x60);
    assert_eq!(receivers(&chip, 0x60), vec![2]);
    chip.lapic_write_icr(0, (0xffu64 << 32) | 0x61);
    assert_eq!(
        receivers(&chip, 0x61),
        Vec::<u32>::new(),
        "0xff is an ID in x2APIC"
    );
    chip.lapic_write_icr(0, (0xffff_ffffu64 << 32) | 0x62);
    assert_eq!(receivers(&chip, 0x62), vec![0, 1, 2]);
    chip.lapic_write_icr(0, (0b101u64 << 32) | 0x863);
    assert_eq!(
        receivers(&chip, 0x63),
        vec![0, 2],
        "logical: cluster 0, bits 0 and 2"
    );
    chip.lapic_write(1, APIC_SELF_IPI, 0x64);
    assert_eq!(receivers(&chip, 0x64), vec![1]);
    // x2APIC → xAPIC is refused.
    chip.set_apic_base(1, 0xfee0_0800);
    assert_ne!(chip.apic_base(1) & (1 << 10), 0);
}

#[test]
fn init_and_startup_ipis_as_linux_sends_them() {
    let chip = manual(2);
    enable_all(&chip);
    let k = Arc::new(CountingKicker::default());
    chip.attach_vcpu(1, k.clone());
    chip.lapic_write(1, APIC_TPR, 0x30);
    chip.lapic_write(0, APIC_ICR_HIGH, 1 << 24);
    chip.lapic_write(0, APIC_ICR_LOW, 0xc500); // INIT, level, assert
    assert_eq!(k.count(), 1);
    chip.lapic_write(0, APIC_ICR_LOW, 0x8500); // INIT level de-assert
    chip.lapic_write(0, APIC_ESR, 0);
    assert_eq!(chip.lapic_read(0, APIC_ESR) & 0xef, 0);
    chip.lapic_write(0, APIC_ICR_LOW, 0x0698); // start-up, vector 0x98
    assert_eq!(k.count(), 2);
    assert!(!chip.has_interrupt(1));
    assert_eq!(chip.take_event(1, false), Some(Init));
    assert_eq!(chip.lapic_read(1, APIC_TPR), 0, "INIT reset the local APIC");
    assert_eq!(chip.take_event(1, false), Some(Sipi(0x98)));
    assert_eq!(chip.take_event(1, false), None);
    chip.lapic_write(0, APIC_ICR_LOW, 0x0698);
    assert_eq!(chip.take_event(1, true), Some(Sipi(0x98)));
}

#[test]
fn pic_delivers_through_lint0_of_the_bsp() {
    let chip = manual(2);
    let io = bus(&chip);
    let out = |port: u16, v: u8| io.pio_write(port, &[v]);
    // Linux's init_8259A, then IRQ 4 and the cascade unmasked.
    for (port, v) in [
        (0x21, 0xff),
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xeb),
        (0xa1, 0xff),
    ] {
        out(port, v);
    }
    let mut imr = [0u8];
    io.pio_read(0x21, &mut imr);
    assert_eq!(imr, [0xeb]);
    let k0 = Arc::new(CountingKicker::default());
    chip.attach_vcpu(0, k0.clone());
    chip.set_irq(4, true);
    assert_eq!(k0.count(), 1);
    assert!(chip.has_interrupt(0));
    assert!(!chip.has_interrupt(1), "only the BSP's LINT0 is wired");
    assert_eq!(chip.take_event(0, false), None);
    assert_eq!(chip.take_event(0, true), Some(Interrupt(0x34)));
    assert!(!chip.has_interrupt(0));
    out(0x20, 0x20);
    chip.set_irq(4, false);
    chip.set_irq(4, true);
    // LINT0 masked by a software disable, as Linux's setup_local_APIC does first.
    chip.lapic_write(0, APIC_SVR, 0xff);
    assert!(!chip.has_interrupt(0));
    // A globally disabled APIC passes INTR straight to the core.
    chip.set_apic_base(0, 0xfee0_0000);
    assert!(chip.has_interrupt(0));
    assert_eq!(chip.take_event(0, true), Some(Interrupt(0x34)));
}

#[test]
fn level_triggered_ioapic_interrupt_and_eoi_broadcast() {
    let chip = manual(2);
    enable_all(&chip);
    let io = bus(&chip);
    // Pin 10: level, active low, vector 0x51, physical destination 1.
    ioapic_write(&io, 0x11 + 20, 1 << 24);
    ioapic_write(&io, 0x10 + 20, 0xa051);
    chip.set_irq(10, true);
    assert_eq!(chip.take_event(1, true), Some(Interrupt(0x51)));
    assert_ne!(chip.lapic_read(1, APIC_TMR + 0x20) & (1 << 0x11), 0);
    chip.set_irq(10, true);
    assert_eq!(chip.take_event(1, true), None);
    chip.lapic_write(1, APIC_EOI, 0);
    assert_eq!(
        chip.take_event(1, true),
        Some(Interrupt(0x51)),
        "still asserted at EOI: delivered again"
    );
    chip.set_irq(10, false);
    chip.lapic_write(1, APIC_EOI, 0);
    assert_eq!(chip.take_event(1, true), None);
    // GSIs 16-23 are IOAPIC only; 24 and up are ignored.
    ioapic_write(&io, 0x10 + 2 * 20, 0x0052);
    chip.set_irq(20, true);
    assert_eq!(drain(&chip, 0), vec![Interrupt(0x52)]);
    chip.set_irq(24, true);
    chip.set_irq(u32::MAX, true);
    assert!(drain(&chip, 0).is_empty());
}

#[test]
fn pit_irq0_reaches_and_wakes_only_its_target() {
    let chip = manual(2);
    enable_all(&chip);
    let io = bus(&chip);
    // IOAPIC pin 0 → vCPU 1, vector 0x30, edge.
    ioapic_write(&io, 0x11, 1 << 24);
    ioapic_write(&io, 0x10, 0x30);
    let k0 = Arc::new(CountingKicker::default());
    let k1 = Arc::new(CountingKicker::default());
    chip.attach_vcpu(0, k0.clone());
    chip.attach_vcpu(1, k1.clone());
    assert_eq!(chip.next_deadline(1), None);
    // Counter 0, mode 2, 11932 (100 Hz), as Linux's PIT clockevent programs it.
    io.pio_write(0x43, &[0x34]);
    io.pio_write(0x40, &[0x9c]);
    io.pio_write(0x40, &[0x2e]);
    let period = pit_tsc(11932);
    assert_eq!(chip.published_deadline(1), period);
    assert_eq!(
        chip.published_deadline(0),
        NEVER,
        "the PIC is masked: not vCPU 0's"
    );
    assert_eq!(chip.next_deadline(0), None);
    assert_eq!(chip.next_deadline(1), Some(chip.clock().instant_of(period)));
    assert_eq!(
        k1.count(),
        1,
        "a new, earlier deadline wakes the halted vCPU 1"
    );
    assert_eq!(k0.count(), 0);
    chip.set_time(period - 1);
    assert_eq!(chip.take_event(1, true), None);
    chip.set_time(period);
    assert!(chip.has_interrupt(1));
    assert_eq!(take(&chip, 1), Some(Interrupt(0x30)));
    assert_eq!(chip.take_event(0, true), None);
    // A thousand missed periods: one interrupt, next deadline one period ahead.
    chip.set_time(pit_tsc(1000 * 11932) + 1);
    assert_eq!(drain(&chip, 1), vec![Interrupt(0x30)]);
    assert_eq!(chip.published_deadline(1), pit_tsc(1001 * 11932));
    // Reading the counter through the bus: latch, LSB, MSB.
    io.pio_write(0x43, &[0x00]);
    let mut b = [0u8; 2];
    io.pio_read(0x40, &mut b[..1]);
    io.pio_read(0x40, &mut b[1..]);
    assert_eq!(u16::from_le_bytes(b), 11932, "a period just began");
    // Routed to the PIC instead (unmasked IRQ 0): vCPU 0's deadline includes the PIT.
    ioapic_write(&io, 0x10, 0x1_0030);
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfe),
    ] {
        io.pio_write(port, &[v]);
    }
    assert_eq!(chip.published_deadline(0), pit_tsc(1001 * 11932));
    assert_eq!(chip.published_deadline(1), NEVER);
    chip.set_time(pit_tsc(1001 * 11932));
    assert_eq!(chip.take_event(0, true), Some(Interrupt(0x30)));
}

#[test]
fn lapic_timers_through_the_chip_are_bounded() {
    let chip = manual(1);
    enable_all(&chip);
    chip.lapic_write(0, APIC_TIMER_DIVIDE, 0xb);
    chip.lapic_write(0, APIC_LVT_TIMER, (1 << 17) | 0xec);
    chip.lapic_write(0, APIC_TIMER_INITIAL, 1);
    let now = 1u64 << 40;
    chip.set_time(now);
    let start = Instant::now();
    assert_eq!(take(&chip, 0), Some(Interrupt(0xec)));
    assert_eq!(chip.take_event(0, true), None);
    assert!(start.elapsed() < Duration::from_millis(100));
    assert_eq!(
        chip.next_deadline(0),
        Some(chip.clock().instant_of(now + 1))
    );
    // TSC-deadline mode.
    chip.lapic_write(0, APIC_LVT_TIMER, (2 << 17) | 0xed);
    chip.set_tsc_deadline(0, now + 500);
    assert_eq!(chip.tsc_deadline(0), now + 500);
    assert_eq!(
        chip.next_deadline(0),
        Some(chip.clock().instant_of(now + 500))
    );
    chip.set_time(now + 500);
    assert_eq!(chip.tsc_deadline(0), 0, "fired and disarmed");
    assert_eq!(take(&chip, 0), Some(Interrupt(0xed)));
    assert_eq!(chip.next_deadline(0), None);
    // A deadline centuries away is reported as at most an hour away.
    chip.set_tsc_deadline(0, u64::MAX - 1);
    let far = chip.next_deadline(0).unwrap();
    assert_eq!(
        far,
        chip.clock().instant_of(now + 500 + 3600 * 1_000_000_000)
    );
    // A deadline in the past fires at once.
    chip.set_tsc_deadline(0, 1);
    assert!(chip.has_interrupt(0));
}

#[test]
fn wakers_are_kicked_once_per_new_kind_of_event() {
    let chip = manual(2);
    enable_all(&chip);
    let k = Arc::new(CountingKicker::default());
    chip.attach_vcpu(1, k.clone());
    msi(&chip, 0xfee0_1000, 0x41);
    assert_eq!(k.count(), 1);
    msi(&chip, 0xfee0_1000, 0x42);
    assert_eq!(k.count(), 1, "an interrupt was already pending");
    msi(&chip, 0xfee0_1000, 0x400);
    assert_eq!(k.count(), 2, "NMI is a new kind of event");
    assert_eq!(chip.take_event(1, false), Some(Nmi));
    assert_eq!(chip.take_event(1, true), Some(Interrupt(0x42)));
    assert_eq!(k.count(), 2, "0x41 is blocked by 0x42 in service");
    chip.lapic_write(1, APIC_EOI, 0);
    assert_eq!(k.count(), 3, "the EOI makes 0x41 deliverable: one kick");
    assert_eq!(drain(&chip, 1), vec![Interrupt(0x41)]);
    assert_eq!(k.count(), 3);
    msi(&chip, 0xfee0_1000, 0x41);
    assert_eq!(k.count(), 4);
    drain(&chip, 1);
    // An edge line held high delivers (and kicks) once.
    let io = bus(&chip);
    ioapic_write(&io, 0x11 + 10, 1 << 24);
    ioapic_write(&io, 0x10 + 10, 0x0044);
    for _ in 0..3 {
        chip.set_irq(5, true);
    }
    assert_eq!(k.count(), 5);
    // Attaching while something is pending kicks at once.
    let k2 = Arc::new(CountingKicker::default());
    chip.attach_vcpu(1, k2.clone());
    assert_eq!(k2.count(), 1);
    // Unknown vCPUs are ignored.
    chip.attach_vcpu(7, k2.clone());
    assert_eq!(k2.count(), 1);
}

#[test]
fn lapic_state_round_trip_through_the_chip() {
    let chip = manual(2);
    enable_all(&chip);
    chip.lapic_write(1, APIC_TPR, 0x20);
    msi(&chip, 0xfee0_1000, 0x71);
    let s = chip.lapic_state(1);
    assert_eq!(s.reg(0x80), 0x20);
    assert_eq!(s.reg(0x230), 1 << 0x11, "IRR of vector 0x71");
    let other = manual(2);
    other.set_lapic_state(1, &s);
    assert_eq!(other.lapic_state(1), s);
    assert!(other.has_interrupt(1), "the restored IRR is published");
    assert_eq!(chip.lapic_state(9), LapicState::default());
}

#[test]
fn concurrent_ipis_do_not_deadlock() {
    let chip = IrqChip::new(2, GuestClock::default());
    enable_all(&chip);
    let workers: Vec<_> = (0..2u32)
        .map(|me| {
            let chip = chip.clone();
            std::thread::spawn(move || {
                let other = 1 - me;
                let mut got = 0;
                for i in 0..20_000u32 {
                    chip.lapic_write(me, APIC_ICR_HIGH, other << 24);
                    chip.lapic_write(me, APIC_ICR_LOW, 0x40 + (i % 16));
                    while let Some(Interrupt(_)) = chip.take_event(me, true) {
                        chip.lapic_write(me, APIC_EOI, 0);
                        got += 1;
                    }
                }
                got
            })
        })
        .collect();
    let device = {
        let chip = chip.clone();
        std::thread::spawn(move || {
            for i in 0..20_000u32 {
                chip.set_irq(i % 24, i % 2 == 0);
                msi(&chip, 0xfeef_f000, 0x80 + (i % 16));
            }
        })
    };
    device.join().unwrap();
    let got: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(got > 0);
}

#[test]
fn hostile_callers_never_panic() {
    let chip = manual(2);
    let mut rng = Rng::new(99);
    let mut now = 0u64;
    for _ in 0..100_000 {
        now = match rng.below(100) {
            0 => rng.next(),
            _ => now.saturating_add(rng.below(10_000)),
        };
        chip.set_time(now);
        let id = rng.below(4) as u32;
        let v = rng.next();
        match rng.below(14) {
            0 => {
                chip.lapic_read(id, v as u32 & 0xfff);
            }
            1 | 2 => chip.lapic_write(id, (v as u32) & 0x3f0, (v >> 32) as u32),
            3 => chip.lapic_write_icr(id, v),
            4 => chip.set_tsc_deadline(id, v),
            5 => chip.set_apic_base(id, v),
            6 => {
                chip.take_event(id, v & 1 != 0);
            }
            7 => {
                chip.has_interrupt(id);
                chip.next_deadline(id);
                chip.tsc_deadline(id);
            }
            8 => chip.set_irq(v as u32 % 30, v & 1 << 40 != 0),
            9 => msi(&chip, 0xfee0_0000 | (v & 0xff00c), (v >> 32) as u32),
            10 => msi(&chip, v, (v >> 7) as u32),
            11 => {
                let s = LapicState {
                    regs: (0..rng.below(1100)).map(|_| rng.next() as u8).collect(),
                };
                chip.set_lapic_state(id, &s);
            }
            _ => {
                chip.lapic_state(id);
            }
        }
    }
    for (seed, r) in chip
        .pio_devices()
        .into_iter()
        .chain(chip.mmio_devices())
        .enumerate()
    {
        let mut dev = r.device.lock().unwrap();
        hammer(&mut *dev, r.len, 50_000, seed as u64 + 1);
    }
    for id in 0..2 {
        drain(&chip, id);
    }
}

#[test]
fn register_maps_every_range() {
    let chip = manual(1);
    let io = bus(&chip);
    let names: Vec<_> = io
        .pio
        .stats()
        .devices
        .iter()
        .map(|d| (d.name, d.base, d.len))
        .collect();
    assert_eq!(
        names,
        vec![
            ("pic-master", 0x20, 2),
            ("pit", 0x40, 4),
            ("port61", 0x61, 1),
            ("pic-slave", 0xa0, 2),
            ("elcr", 0x4d0, 2)
        ]
    );
    let m = &io.mmio.stats().devices[0];
    assert_eq!((m.name, m.base, m.len), ("ioapic", 0xfec0_0000, 0x1000));
    let mut v = [0u8; 4];
    io.mmio_write(IOAPIC_BASE, &[1, 0, 0, 0]);
    io.mmio_read(IOAPIC_BASE + 0x10, &mut v);
    assert_eq!(u32::from_le_bytes(v), 0x0017_0011);
    // The line adapter drives the same GSI.
    let line = chip.irq_line(4);
    line.pulse();
}

#[test]
fn state_moves_to_a_new_chip_with_timers_and_pending_interrupts() {
    let a = manual(2);
    enable_all(&a);
    // A one-shot timer on vCPU 1 due at TSC 5000, and an interrupt pending on vCPU 0.
    a.lapic_write(1, APIC_LVT_TIMER, 0x41);
    a.lapic_write(1, APIC_TIMER_DIVIDE, 0xb);
    a.lapic_write(1, APIC_TIMER_INITIAL, 5000);
    a.lapic_write(0, APIC_SELF_IPI, 0x55);
    a.send_msi(MsiMessage {
        address: 0xfee0_0000,
        data: 0x66,
    });
    let state = a.state();
    let json = serde_json::to_string(&state).unwrap();

    let b = manual(2);
    b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(serde_json::to_string(&b.state()).unwrap(), json);
    assert_eq!(b.take_event(0, true), Some(Interrupt(0x66)));
    assert_eq!(b.take_event(1, true), None);
    b.set_time(5000);
    assert_eq!(b.take_event(1, true), Some(Interrupt(0x41)));

    // A state for another number of vCPUs is refused and changes nothing.
    let c = manual(3);
    let before = serde_json::to_string(&c.state()).unwrap();
    assert!(c.restore(&state).unwrap_err().contains("vCPUs"));
    assert_eq!(serde_json::to_string(&c.state()).unwrap(), before);
}
