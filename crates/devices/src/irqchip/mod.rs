//! Userspace interrupt controllers and PIT for a CPU backend without in-kernel ones (the
//! emulator): one local APIC per vCPU ([`lapic`]), an 82093AA IOAPIC ([`ioapic`]), the 8259A
//! pair ([`pic`]) and the 8254 PIT with port 0x61 ([`pit`]), tied together by [`IrqChip`],
//! which implements [`vireo_hv::UserIrqChip`].
//!
//! ## Wiring (the platform the MADT describes)
//!
//! - GSI n < 16 goes to 8259 input n *and* IOAPIC pin n (no interrupt source overrides: ISA
//!   IRQ n is GSI n); GSI 16–23 only to the IOAPIC. GSIs ≥ 24 are ignored.
//! - PIT counter 0's output drives GSI 0 (both paths).
//! - The master 8259's INT goes to LINT0 of vCPU 0 (virtual wire, delivered when LINT0 is
//!   an unmasked ExtINT entry or the APIC is globally disabled).
//! - MSIs (SDM Vol. 3A §11.11) and IPIs go to the local APICs by destination.
//! - A level-triggered vector's EOI at a local APIC is broadcast to the IOAPIC.
//!
//! ## Locking and wake-ups
//!
//! All controllers sit behind one mutex: delivering an IPI, an MSI or an IOAPIC interrupt is
//! one critical section, so vCPUs sending each other IPIs cannot deadlock, and every
//! operation does work bounded by the number of vCPUs (timers catch up arithmetically). Each
//! vCPU also has two atomics published at the end of every critical section: a summary of
//! what is pending (INIT, SIPI, NMI, deliverable interrupt) and the TSC of its next timer
//! (its local APIC timer, and the PIT when its output can reach this vCPU). With them
//! [`UserIrqChip::take_event`], [`UserIrqChip::has_interrupt`] and
//! [`UserIrqChip::next_deadline`] do not lock while nothing is pending and no timer expired.
//!
//! A vCPU's waker is kicked when a critical section leaves it with a kind of event it did not
//! have before, or (when another thread caused the change) with an earlier timer deadline.
//! Nothing else kicks: a second interrupt while one is already pending, or a line raised
//! twice, does not. So the CPU backend must check again by itself after it makes interrupts
//! deliverable (IF 0 → 1, end of an interrupt shadow): [`UserIrqChip::has_interrupt`] is one
//! atomic load. Wakers are kicked after the lock is released, so a waker may take its own
//! locks.

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::debug;
use vireo_hv::{CpuEvent, GuestClock, IrqLine, Kicker, LapicState, MsiMessage, UserIrqChip};

use crate::bus::lock;
use crate::legacy::{read_bytes, write_bytes};
use crate::{BusDevice, BusError, IoBus};

pub use ioapic::{Ioapic, IOAPIC_MMIO_LEN, IOAPIC_NUM_PINS};
pub use lapic::{
    apic_bus_hz, apic_timer_tsc_ratio, cpuid_leaf_0x15, valid_apic_base_transition, Lapic,
};
pub use pic::{Pic, ELCR_BASE, PIC_LEN, PIC_MASTER_BASE, PIC_SLAVE_BASE};
pub use pit::{Pit, PIT_BASE, PIT_HZ, PIT_LEN, PORT61_BASE, PORT61_LEN};

use lapic::{Action, DeliveryMode, Dest, Message, BROADCAST, EV_INIT, EV_INTR, EV_NMI, EV_SIPI};

/// Guest-physical address of the IOAPIC (MADT: IOAPIC id 0, GSI base 0).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The MSI address window (SDM Vol. 3A §11.11.1): bits 31:20 are 0xfee.
const MSI_ADDRESS_MASK: u64 = 0xffff_ffff_fff0_0000;
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
/// MSI address bit 2: destination mode logical.
const MSI_DEST_LOGICAL: u64 = 1 << 2;
/// A deadline that never comes.
const NEVER: u64 = u64::MAX;
/// The longest [`UserIrqChip::next_deadline`] lets a vCPU sleep, in seconds: a guest-chosen
/// deadline centuries away is reported as this far, so host `Instant` arithmetic stays small.
const MAX_SLEEP_SECS: u64 = 3600;

/// Where guest time comes from.
enum Time {
    Clock,
    /// Tests: a TSC value set by hand.
    #[cfg(test)]
    Manual(AtomicU64),
}

/// The local APICs and the bookkeeping of which vCPUs to republish.
struct Cpus {
    lapics: Vec<Lapic>,
    dirty: Vec<bool>,
    dirty_list: Vec<usize>,
}

impl Cpus {
    fn mark(&mut self, id: usize) {
        if let Some(d) = self.dirty.get_mut(id) {
            if !*d {
                *d = true;
                self.dirty_list.push(id);
            }
        }
    }

    fn mark_all(&mut self) {
        for id in 0..self.lapics.len() {
            self.mark(id);
        }
    }

    /// Does `dest` select local APIC `id` (SDM Vol. 3A §11.6.2)?
    fn selects(&self, id: usize, dest: Dest) -> bool {
        let Some(l) = self.lapics.get(id) else {
            return false;
        };
        let idx = id as u32;
        match dest {
            Dest::Physical(d) => l.matches_physical(d),
            Dest::Logical(mda) => l.matches_logical(mda),
            Dest::Only(s) => idx == s && l.hw_enabled(),
            Dest::All => l.hw_enabled(),
            Dest::AllBut(s) => idx != s && l.hw_enabled(),
        }
    }

    /// Deliver a message to every local APIC it selects; lowest-priority delivery picks the
    /// enabled one with the lowest arbitration priority (ties: lowest index, §11.6.2.4).
    fn deliver(&mut self, msg: Message) {
        let n = self.lapics.len();
        if msg.mode == DeliveryMode::LowestPriority {
            let target = (0..n)
                .filter(|&i| self.selects(i, msg.dest))
                .min_by_key(|&i| (!self.lapics[i].sw_enabled(), self.lapics[i].apr(), i));
            if let Some(i) = target {
                if self.lapics[i].accept(msg.mode, msg.vector, msg.level_triggered) {
                    self.mark(i);
                }
            }
            return;
        }
        for i in 0..n {
            if self.selects(i, msg.dest)
                && self.lapics[i].accept(msg.mode, msg.vector, msg.level_triggered)
            {
                self.mark(i);
            }
        }
    }
}

/// Everything behind the chip's mutex.
struct State {
    cpus: Cpus,
    ioapic: Ioapic,
    pic: Pic,
    pit: Pit,
}

impl State {
    /// Drive GSI `gsi`: the 8259 (ISA IRQs) and the IOAPIC pin.
    fn set_irq(&mut self, gsi: u32, level: bool) {
        if gsi < 16 {
            self.pic.set_irq(gsi, level);
            self.cpus.mark(0);
        }
        let cpus = &mut self.cpus;
        self.ioapic
            .set_irq(gsi as usize, level, &mut |m| cpus.deliver(m));
    }

    /// Carry out what a local APIC register write asked for.
    fn apply(&mut self, action: Action) {
        match action {
            Action::None => {}
            Action::Send(msg) => self.cpus.deliver(msg),
            Action::Eoi(vector) => {
                let cpus = &mut self.cpus;
                self.ioapic.eoi(vector, &mut |m| cpus.deliver(m));
            }
        }
    }

    /// Fire PIT counter 0's pending output edge (coalesced) into GSI 0.
    fn poll_pit(&mut self, now: u64) {
        if self.pit.next_irq0().is_some_and(|t| t <= now) && self.pit.poll_irq0(now) {
            self.set_irq(0, true);
            self.set_irq(0, false);
            // The PIT's next edge moved for every vCPU whose deadline includes it.
            self.cpus.mark_all();
        }
    }

    /// Fire the expired timers that can deliver to vCPU `id`.
    fn poll(&mut self, id: usize, now: u64) {
        if let Some(l) = self.cpus.lapics.get_mut(id) {
            if l.poll_timer(now) {
                self.cpus.mark(id);
            }
        }
        self.poll_pit(now);
    }

    /// Does the 8259 deliver to vCPU `id` (only vCPU 0's LINT0 is wired)?
    fn pic_reaches(&self, id: usize) -> bool {
        id == 0 && self.cpus.lapics.first().is_some_and(Lapic::accepts_pic)
    }

    /// Can PIT counter 0's output (GSI 0) reach vCPU `id`?
    fn pit_reaches(&self, id: usize) -> bool {
        if self.pic_reaches(id) && self.pic.unmasked(0) {
            return true;
        }
        self.ioapic
            .routed(0)
            .is_some_and(|m| self.cpus.selects(id, m.dest))
    }

    fn summary(&self, id: usize) -> u8 {
        let mut s = self.cpus.lapics[id].summary();
        if self.pic_reaches(id) && self.pic.output() {
            s |= EV_INTR;
        }
        s
    }

    fn deadline(&self, id: usize) -> u64 {
        let lapic = self.cpus.lapics[id].next_timer().unwrap_or(NEVER);
        let pit = if self.pit_reaches(id) {
            self.pit.next_irq0().unwrap_or(NEVER)
        } else {
            NEVER
        };
        lapic.min(pit)
    }

    /// The highest-priority event for vCPU `id` (SDM Vol. 3A §6.9).
    fn take_event(&mut self, id: usize, interruptible: bool) -> Option<CpuEvent> {
        self.cpus.mark(id);
        let l = &mut self.cpus.lapics[id];
        if l.take_init() {
            l.init_reset();
            return Some(CpuEvent::Init);
        }
        if let Some(v) = l.take_sipi() {
            return Some(CpuEvent::Sipi(v));
        }
        if l.take_nmi() {
            return Some(CpuEvent::Nmi);
        }
        if !interruptible {
            return None;
        }
        if self.pic_reaches(id) && self.pic.output() {
            return Some(CpuEvent::Interrupt(self.pic.acknowledge()));
        }
        let l = &mut self.cpus.lapics[id];
        if l.take_extint() {
            // An ExtINT message: the vector comes from the 8259's INTA cycle.
            return Some(CpuEvent::Interrupt(self.pic.acknowledge()));
        }
        l.ack().map(CpuEvent::Interrupt)
    }
}

/// Everything the controllers hold, as data (snapshots, migration). Times are guest TSC
/// values of the chip's [`GuestClock`], so a restored VM whose clock continues from the
/// snapshot's finds its timers where they were.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IrqChipState {
    pub lapics: Vec<Lapic>,
    pub ioapic: Ioapic,
    pub pic: Pic,
    pub pit: Pit,
}

/// What is published per vCPU for the lock-free paths.
struct Slot {
    summary: AtomicU8,
    deadline: AtomicU64,
    kick: AtomicBool,
    waker: Mutex<Option<Arc<dyn Kicker>>>,
}

/// One of the chip's register ranges, for the VMM to put on a [`crate::Bus`].
pub struct DeviceRange {
    pub base: u64,
    pub len: u64,
    pub device: Arc<Mutex<dyn BusDevice>>,
}

/// The userspace interrupt controllers of a VM with `vcpus` vCPUs (APIC ID = index).
pub struct IrqChip {
    clock: GuestClock,
    time: Time,
    state: Mutex<State>,
    slots: Vec<Slot>,
}

impl IrqChip {
    /// Controllers for `vcpus` vCPUs whose timers run on `clock`.
    pub fn new(vcpus: u32, clock: GuestClock) -> Arc<Self> {
        Arc::new(Self::build(vcpus, clock, Time::Clock))
    }

    fn build(vcpus: u32, clock: GuestClock, time: Time) -> Self {
        let n = vcpus as usize;
        let ratio = apic_timer_tsc_ratio(clock.tsc_hz());
        let tsc_hz = clock.tsc_hz();
        IrqChip {
            clock,
            time,
            state: Mutex::new(State {
                cpus: Cpus {
                    lapics: (0..vcpus).map(|i| Lapic::new(i, ratio)).collect(),
                    dirty: vec![false; n],
                    dirty_list: Vec::with_capacity(n),
                },
                ioapic: Ioapic::new(),
                pic: Pic::new(),
                pit: Pit::new(tsc_hz),
            }),
            slots: (0..n)
                .map(|_| Slot {
                    summary: AtomicU8::new(0),
                    deadline: AtomicU64::new(NEVER),
                    kick: AtomicBool::new(false),
                    waker: Mutex::new(None),
                })
                .collect(),
        }
    }

    /// The state of every controller.
    pub fn state(&self) -> IrqChipState {
        let st = lock(&self.state);
        IrqChipState {
            lapics: st.cpus.lapics.clone(),
            ioapic: st.ioapic.clone(),
            pic: st.pic.clone(),
            pit: st.pit.clone(),
        }
    }

    /// Load a state from [`IrqChip::state`] of a chip with as many vCPUs and the same clock
    /// rate; anything else is refused and nothing changes. Wakes the vCPUs that have events.
    pub fn restore(&self, s: &IrqChipState) -> Result<(), String> {
        if s.lapics.len() != self.slots.len() {
            return Err(format!(
                "{} local APICs in the state, {} vCPUs here",
                s.lapics.len(),
                self.slots.len()
            ));
        }
        let ratio = apic_timer_tsc_ratio(self.clock.tsc_hz());
        for (i, l) in s.lapics.iter().enumerate() {
            if l.identity() != (i as u32, ratio) {
                return Err(format!("local APIC {i} does not belong to vCPU {i}"));
            }
        }
        if s.pit.tsc_hz() != self.clock.tsc_hz() {
            return Err("the PIT was timed against another TSC rate".into());
        }
        self.locked(None, |st, _| {
            st.cpus.lapics = s.lapics.clone();
            st.ioapic = s.ioapic.clone();
            st.pic = s.pic.clone();
            st.pit = s.pit.clone();
            st.cpus.mark_all();
        });
        Ok(())
    }

    /// Number of vCPUs (local APICs).
    pub fn vcpus(&self) -> u32 {
        self.slots.len() as u32
    }

    fn now(&self) -> u64 {
        match &self.time {
            Time::Clock => self.clock.tsc(),
            #[cfg(test)]
            Time::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Run `f` on the locked state at the current guest TSC, then publish what changed and
    /// kick the wakers that need it. `origin` is the vCPU doing the call, if any (its own
    /// deadline changes do not kick it).
    fn locked<R>(&self, origin: Option<usize>, f: impl FnOnce(&mut State, u64) -> R) -> R {
        let mut st = lock(&self.state);
        let now = self.now();
        let r = f(&mut st, now);
        let kick = self.publish(&mut st, origin);
        drop(st);
        if kick {
            self.run_kicks();
        }
        r
    }

    /// Like [`IrqChip::locked`] for vCPU `id`'s own call, after firing its expired timers;
    /// `default` for an unknown vCPU.
    fn on_vcpu<R>(&self, id: u32, default: R, f: impl FnOnce(&mut State, usize, u64) -> R) -> R {
        let i = id as usize;
        if i >= self.slots.len() {
            debug!(vcpu = id, "irqchip: no such vCPU");
            return default;
        }
        self.locked(Some(i), |st, now| {
            st.poll(i, now);
            st.cpus.mark(i);
            f(st, i, now)
        })
    }

    fn publish(&self, st: &mut State, origin: Option<usize>) -> bool {
        let mut kick = false;
        while let Some(id) = st.cpus.dirty_list.pop() {
            st.cpus.dirty[id] = false;
            let summary = st.summary(id);
            let deadline = st.deadline(id);
            let slot = &self.slots[id];
            let old_summary = slot.summary.swap(summary, Ordering::SeqCst);
            let old_deadline = slot.deadline.swap(deadline, Ordering::SeqCst);
            if summary & !old_summary != 0 || (deadline < old_deadline && origin != Some(id)) {
                slot.kick.store(true, Ordering::SeqCst);
                kick = true;
            }
        }
        kick
    }

    fn run_kicks(&self) {
        for slot in &self.slots {
            if slot.kick.swap(false, Ordering::SeqCst) {
                let waker = lock(&slot.waker).clone();
                if let Some(w) = waker {
                    w.kick();
                }
            }
        }
    }

    /// True when vCPU `id` may have something to do: an event pending or a timer expired.
    fn needs_lock(&self, slot: &Slot, interruptible: bool) -> bool {
        let s = slot.summary.load(Ordering::SeqCst);
        if s & (EV_INIT | EV_SIPI | EV_NMI) != 0 || (interruptible && s & EV_INTR != 0) {
            return true;
        }
        let d = slot.deadline.load(Ordering::SeqCst);
        d != NEVER && self.now() >= d
    }

    /// An [`IrqLine`] driving GSI `gsi` (for `Vm::irq_line` of a backend using this chip).
    pub fn irq_line(self: &Arc<Self>, gsi: u32) -> Arc<dyn IrqLine> {
        Arc::new(ChipIrqLine {
            chip: self.clone(),
            gsi,
        })
    }

    fn device(self: &Arc<Self>, port: Port, base: u64, len: u64) -> DeviceRange {
        DeviceRange {
            base,
            len,
            device: Arc::new(Mutex::new(ChipDevice {
                chip: self.clone(),
                port,
            })),
        }
    }

    /// The IOAPIC's MMIO page, at [`IOAPIC_BASE`].
    pub fn mmio_devices(self: &Arc<Self>) -> Vec<DeviceRange> {
        vec![self.device(Port::Ioapic, IOAPIC_BASE, IOAPIC_MMIO_LEN)]
    }

    /// The port-I/O ranges: 8259 master (0x20) and slave (0xa0), ELCR (0x4d0), PIT (0x40)
    /// and port 0x61.
    pub fn pio_devices(self: &Arc<Self>) -> Vec<DeviceRange> {
        vec![
            self.device(Port::PicMaster, PIC_MASTER_BASE, PIC_LEN),
            self.device(Port::PicSlave, PIC_SLAVE_BASE, PIC_LEN),
            self.device(Port::Elcr, ELCR_BASE, PIC_LEN),
            self.device(Port::Pit, PIT_BASE, PIT_LEN),
            self.device(Port::Port61, PORT61_BASE, PORT61_LEN),
        ]
    }

    /// Put every range of [`IrqChip::pio_devices`] and [`IrqChip::mmio_devices`] on `io`.
    pub fn register(self: &Arc<Self>, io: &mut IoBus) -> Result<(), BusError> {
        for r in self.pio_devices() {
            io.pio.insert(r.base, r.len, r.device)?;
        }
        for r in self.mmio_devices() {
            io.mmio.insert(r.base, r.len, r.device)?;
        }
        Ok(())
    }

    fn device_read(&self, port: Port, offset: u64, data: &mut [u8]) {
        self.locked(None, |st, now| match port {
            Port::Ioapic => st.ioapic.mmio_read(offset, data),
            Port::PicMaster | Port::PicSlave => {
                let chip = usize::from(port == Port::PicSlave);
                // Reading the command port in poll mode acknowledges.
                read_bytes(offset, data, |o| st.pic.read(chip, o));
                st.cpus.mark(0);
            }
            Port::Elcr => read_bytes(offset, data, |o| st.pic.read_elcr(o)),
            Port::Pit => {
                st.poll_pit(now);
                read_bytes(offset, data, |o| st.pit.read(o, now));
            }
            Port::Port61 => read_bytes(offset, data, |o| {
                if o == 0 {
                    st.pit.read_port61(now)
                } else {
                    0xff
                }
            }),
        });
    }

    fn device_write(&self, port: Port, offset: u64, data: &[u8]) {
        self.locked(None, |st, now| {
            // Edges due before a routing or timer change go out under the old programming.
            st.poll_pit(now);
            match port {
                Port::Ioapic => {
                    let cpus = &mut st.cpus;
                    st.ioapic.mmio_write(offset, data, &mut |m| cpus.deliver(m));
                    st.cpus.mark_all();
                }
                Port::PicMaster | Port::PicSlave => {
                    let chip = usize::from(port == Port::PicSlave);
                    write_bytes(offset, data, |o, b| st.pic.write(chip, o, b));
                    st.cpus.mark(0);
                }
                Port::Elcr => {
                    write_bytes(offset, data, |o, b| st.pic.write_elcr(o, b));
                    st.cpus.mark(0);
                }
                Port::Pit => {
                    write_bytes(offset, data, |o, b| st.pit.write(o, b, now));
                    st.cpus.mark_all();
                }
                Port::Port61 => write_bytes(offset, data, |o, b| {
                    if o == 0 {
                        st.pit.write_port61(b, now);
                    }
                }),
            }
        });
    }
}

/// Decode an MSI (SDM Vol. 3A §11.11.1–2). Outside the 0xfee0_0000 window: `None`. MSIs are
/// edge-triggered whatever the trigger bit says; destination 0xff is the broadcast.
fn decode_msi(msi: MsiMessage) -> Option<Message> {
    if msi.address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
        return None;
    }
    let dest = match ((msi.address >> 12) & 0xff) as u32 {
        0xff => BROADCAST,
        d => d,
    };
    let mode = DeliveryMode::from_bits(msi.data >> 8);
    if matches!(
        mode,
        DeliveryMode::StartUp | DeliveryMode::Smi | DeliveryMode::Reserved
    ) {
        return None;
    }
    Some(Message {
        vector: msi.data as u8,
        mode,
        dest: if msi.address & MSI_DEST_LOGICAL != 0 {
            Dest::Logical(dest)
        } else {
            Dest::Physical(dest)
        },
        level_triggered: false,
    })
}

impl UserIrqChip for IrqChip {
    fn clock(&self) -> GuestClock {
        self.clock.clone()
    }

    fn attach_vcpu(&self, id: u32, waker: Arc<dyn Kicker>) {
        let Some(slot) = self.slots.get(id as usize) else {
            debug!(vcpu = id, "irqchip: attach of an unknown vCPU");
            return;
        };
        *lock(&slot.waker) = Some(waker.clone());
        if slot.summary.load(Ordering::SeqCst) != 0 {
            waker.kick();
        }
    }

    fn lapic_read(&self, id: u32, offset: u32) -> u32 {
        self.on_vcpu(id, 0, |st, i, now| st.cpus.lapics[i].read(offset, now))
    }

    fn lapic_write(&self, id: u32, offset: u32, value: u32) {
        self.on_vcpu(id, (), |st, i, now| {
            let action = st.cpus.lapics[i].write(offset, value, now);
            st.apply(action);
        })
    }

    fn lapic_write_icr(&self, id: u32, value: u64) {
        self.on_vcpu(id, (), |st, i, _| {
            let action = st.cpus.lapics[i].write_icr(value);
            st.apply(action);
        })
    }

    fn tsc_deadline(&self, id: u32) -> u64 {
        self.on_vcpu(id, 0, |st, i, _| st.cpus.lapics[i].tsc_deadline())
    }

    fn set_tsc_deadline(&self, id: u32, deadline: u64) {
        self.on_vcpu(id, (), |st, i, now| {
            st.cpus.lapics[i].set_tsc_deadline(deadline);
            // A deadline already in the past fires at once.
            st.poll(i, now);
        })
    }

    fn apic_base(&self, id: u32) -> u64 {
        self.on_vcpu(id, 0, |st, i, _| st.cpus.lapics[i].apic_base())
    }

    fn set_apic_base(&self, id: u32, value: u64) {
        self.on_vcpu(id, (), |st, i, _| {
            st.cpus.lapics[i].set_apic_base(value);
        })
    }

    fn take_event(&self, id: u32, interruptible: bool) -> Option<CpuEvent> {
        let slot = self.slots.get(id as usize)?;
        if !self.needs_lock(slot, interruptible) {
            return None;
        }
        self.on_vcpu(id, None, |st, i, _| st.take_event(i, interruptible))
    }

    fn has_interrupt(&self, id: u32) -> bool {
        let Some(slot) = self.slots.get(id as usize) else {
            return false;
        };
        let d = slot.deadline.load(Ordering::SeqCst);
        if d != NEVER && self.now() >= d {
            self.on_vcpu(id, (), |_, _, _| {});
        }
        slot.summary.load(Ordering::SeqCst) & EV_INTR != 0
    }

    fn next_deadline(&self, id: u32) -> Option<Instant> {
        let slot = self.slots.get(id as usize)?;
        let mut d = slot.deadline.load(Ordering::SeqCst);
        if d != NEVER && self.now() >= d {
            self.on_vcpu(id, (), |_, _, _| {});
            d = slot.deadline.load(Ordering::SeqCst);
        }
        if d == NEVER {
            return None;
        }
        let cap = self
            .now()
            .saturating_add(self.clock.tsc_hz().saturating_mul(MAX_SLEEP_SECS));
        Some(self.clock.instant_of(d.min(cap)))
    }

    fn set_irq(&self, gsi: u32, level: bool) {
        if gsi as usize >= IOAPIC_NUM_PINS {
            debug!(gsi, "irqchip: no such GSI");
            return;
        }
        self.locked(None, |st, _| st.set_irq(gsi, level));
    }

    fn send_msi(&self, msi: MsiMessage) {
        match decode_msi(msi) {
            Some(m) => self.locked(None, |st, _| st.cpus.deliver(m)),
            None => debug!(
                address = msi.address,
                data = msi.data,
                "irqchip: MSI outside the APIC window or with a reserved mode; dropped"
            ),
        }
    }

    fn lapic_state(&self, id: u32) -> LapicState {
        self.on_vcpu(id, LapicState::default(), |st, i, now| {
            st.cpus.lapics[i].state(now)
        })
    }

    fn set_lapic_state(&self, id: u32, state: &LapicState) {
        self.on_vcpu(id, (), |st, i, now| st.cpus.lapics[i].set_state(state, now))
    }
}

/// Which register range a [`ChipDevice`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Ioapic,
    PicMaster,
    PicSlave,
    Elcr,
    Pit,
    Port61,
}

/// A [`BusDevice`] view of one of the chip's register ranges; all of them share the chip.
struct ChipDevice {
    chip: Arc<IrqChip>,
    port: Port,
}

impl BusDevice for ChipDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.chip.device_read(self.port, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.chip.device_write(self.port, offset, data);
    }

    fn name(&self) -> &'static str {
        match self.port {
            Port::Ioapic => "ioapic",
            Port::PicMaster => "pic-master",
            Port::PicSlave => "pic-slave",
            Port::Elcr => "elcr",
            Port::Pit => "pit",
            Port::Port61 => "port61",
        }
    }
}

/// A GSI of the chip as an [`IrqLine`].
struct ChipIrqLine {
    chip: Arc<IrqChip>,
    gsi: u32,
}

impl IrqLine for ChipIrqLine {
    fn set_level(&self, level: bool) {
        self.chip.set_irq(self.gsi, level);
    }
}

#[cfg(test)]
mod tests;
