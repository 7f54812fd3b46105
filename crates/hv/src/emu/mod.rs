//! The software x86-64 CPU backend: an interpreter behind the same `Hypervisor` / `Vm` /
//! `Vcpu` traits as KVM. See `README.md` in this directory for the design (decoded-block
//! cache, op form, TLB, interrupt polling, self-modifying code).
//!
//! Module map: [`vcpu`] runs a vCPU and handles events; `exec/` executes ops (one module per
//! instruction family); `decode` turns iced-x86 instructions into ops; `block` caches decoded
//! blocks; `mmu` translates addresses and accesses guest memory; `interrupt` delivers
//! exceptions and interrupts; `seg` loads segments; `msr` and `cpuid` describe the CPU.

mod block;
mod cpu;
mod cpuid;
mod decode;
mod exec;
mod flags;
mod huge;
mod interrupt;
mod jit;
mod mmu;
mod msr;
mod profile;
mod seg;
mod vcpu;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use block::CodePages;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::halt_poll::DEFAULT_HALT_POLL;
use crate::irqchip::{GuestClock, UserIrqChip};
use crate::state::CpuidEntry;
use crate::{
    Error, GuestMemory, Hypervisor, IrqLine, MsiMessage, MsiVector, Result, Vcpu, Vm, VmParams,
};

pub use msr::SAVED_MSRS;
pub use vcpu::EmuVcpu;

/// Map code memory for the emulator's JIT (unless `VIREO_EMU_JIT=0`): first thing in the VMM,
/// before seccomp filters refuse executable mappings. Backends created later use it.
pub fn prepare_jit() {
    jit::prepare();
}

/// The most vCPUs an emulated VM may have (APIC IDs fit in 8 bits).
pub const MAX_VCPUS: u32 = 64;

/// The software CPU backend (`--accel emu`).
#[derive(Debug)]
pub struct EmuHypervisor {
    /// Code memory for translating hot blocks to host code (`jit`), when on. Mapped here, as
    /// the VMM starts and before its seccomp filters, which refuse executable mappings.
    jit: Option<Arc<jit::Pool>>,
    /// The limit of a halted vCPU's polling for a wake-up ([`crate::halt_poll::HaltPoll`]).
    halt_poll: Duration,
}

impl EmuHypervisor {
    /// The backend, with its JIT when [`prepare_jit`] mapped code memory for it, and halt
    /// polling up to KVM's default 200 µs (`VIREO_EMU_HALT_POLL_US=N` sets it, 0 turns it
    /// off).
    pub fn new() -> EmuHypervisor {
        EmuHypervisor {
            jit: jit::prepared(),
            halt_poll: halt_poll_from_env(),
        }
    }

    /// The backend with its JIT on (its own code memory) or off, whatever the environment
    /// says (tests; call it before any seccomp filter).
    pub fn with_jit(on: bool) -> EmuHypervisor {
        EmuHypervisor {
            jit: if on { jit::pool() } else { None },
            halt_poll: halt_poll_from_env(),
        }
    }
}

impl Default for EmuHypervisor {
    /// As [`EmuHypervisor::new`].
    fn default() -> EmuHypervisor {
        EmuHypervisor::new()
    }
}

/// `VIREO_EMU_HALT_POLL_US` (µs), else KVM's default.
fn halt_poll_from_env() -> Duration {
    let Ok(v) = std::env::var("VIREO_EMU_HALT_POLL_US") else {
        return DEFAULT_HALT_POLL;
    };
    v.parse().map(Duration::from_micros).unwrap_or_else(|_| {
        tracing::warn!(
            "VIREO_EMU_HALT_POLL_US={v:?} is not a number of µs: using {}",
            DEFAULT_HALT_POLL.as_micros()
        );
        DEFAULT_HALT_POLL
    })
}

impl Hypervisor for EmuHypervisor {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    fn needs_user_irqchip(&self) -> bool {
        true
    }

    fn emulated_cpu(&self) -> bool {
        true
    }

    fn create_vm(&self, params: &VmParams) -> Result<Arc<dyn Vm>> {
        let irqchip = params.user_irqchip.clone().ok_or_else(|| {
            Error::Unsupported("the emu backend needs VmParams::user_irqchip".to_string())
        })?;
        if params.vcpus == 0 || params.vcpus > MAX_VCPUS {
            return Err(Error::Unsupported(format!(
                "emu: {} vCPUs (1 to {MAX_VCPUS} supported)",
                params.vcpus
            )));
        }
        Ok(Arc::new(EmuVm {
            shared: Arc::new(VmShared {
                clock: irqchip.clock(),
                irqchip,
                mem: RwLock::new(Some(MemMap::new(&params.memory))),
                mem_gen: AtomicU64::new(1),
                code_epoch: AtomicU64::new(0),
                hard_epoch: AtomicU64::new(0),
                vcpus: params.vcpus,
                vcpu_shared: Mutex::new(Vec::new()),
                jit: self.jit.clone(),
                halt_poll: self.halt_poll,
            }),
        }))
    }
}

/// Guest RAM and the code-page flags that go with it.
#[derive(Clone)]
pub(crate) struct MemMap {
    pub mem: GuestMemory,
    pub code: Arc<CodePages>,
}

impl MemMap {
    fn new(mem: &GuestMemory) -> MemMap {
        MemMap {
            mem: mem.clone(),
            code: Arc::new(CodePages::new(mem)),
        }
    }
}

/// What all vCPUs of one VM share.
pub struct VmShared {
    pub(crate) irqchip: Arc<dyn UserIrqChip>,
    pub(crate) clock: GuestClock,
    mem: RwLock<Option<MemMap>>,
    /// Bumped whenever the memory map changes; vCPUs reload their map when it does.
    mem_gen: AtomicU64,
    /// The VM-wide code epoch: bumped whenever guest code may have changed behind the back of
    /// the vCPUs' block caches (a store into a code page, an I/O exit, a device write into a
    /// code page seen at a device interrupt or a translation for execution, a VMM re-entering
    /// `run`). A vCPU revalidates every block it runs after a bump (`block.rs`).
    pub(crate) code_epoch: AtomicU64,
    /// Bumped (before `code_epoch`) on every change but an I/O exit: a block checked since the
    /// last of these needs only a look at its page's bit in the bitmap of VMM writes after
    /// an I/O exit, not a comparison of its bytes (`BlockCache::revalidate`).
    pub(crate) hard_epoch: AtomicU64,
    vcpus: u32,
    /// Every vCPU's shared half, for [`EmuVm::sync_vcpus`].
    pub(crate) vcpu_shared: Mutex<Vec<Arc<vcpu::VcpuShared>>>,
    /// Code memory when vCPUs translate hot blocks to host code.
    pub(crate) jit: Option<Arc<jit::Pool>>,
    /// Each vCPU's halt-polling limit.
    pub(crate) halt_poll: Duration,
}

impl VmShared {
    /// Code may have changed: every vCPU revalidates its blocks before running them again.
    #[inline]
    pub(crate) fn code_changed(&self) {
        self.hard_epoch.fetch_add(1, Ordering::AcqRel);
        self.code_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// An I/O exit: the request made there may be answered by DMA the guest then polls for,
    /// without an interrupt. Every block not run since is checked before it runs again, as
    /// for [`code_changed`](Self::code_changed), but the check is the page's bit in the bitmap
    /// of VMM writes (its bytes are compared only when the bit is set).
    pub(crate) fn io_exit(&self) {
        self.code_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// A device raised an interrupt: it may announce DMA into guest memory. Moves the code
    /// epoch only when a device wrote a page that holds decoded code
    /// ([`CodePages::vmm_wrote_code`]). (I/O exits still move it unconditionally: the request
    /// made there may be answered by DMA the guest then polls for, without an interrupt.)
    pub(crate) fn device_event(&self) {
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner());
        if mem
            .as_ref()
            .is_none_or(|m| m.code.logging() || m.code.vmm_wrote_code())
        {
            self.code_changed();
        }
    }
}

/// An emulated VM.
pub struct EmuVm {
    shared: Arc<VmShared>,
}

impl EmuVm {
    /// Replace the guest memory map (memory hotplug, tests); vCPUs pick it up at their next
    /// block boundary.
    pub fn set_memory(&self, mem: &GuestMemory) {
        *self.shared.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(MemMap::new(mem));
        self.shared.mem_gen.fetch_add(1, Ordering::AcqRel);
        self.shared.code_changed();
    }

    fn code_pages(&self) -> Option<Arc<CodePages>> {
        self.shared
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.code.clone())
    }

    /// Make every vCPU inside `Vcpu::run` pass a full barrier (take its attention flag) and
    /// wait for it, so a store that raced with a change of the page flags is visible here
    /// and every later store sees the new flags (the software form of the TLB shootdown that
    /// follows write-protection). A vCPU outside `run` stores nothing and counts as synced.
    fn sync_vcpus(&self) -> Result<()> {
        let vcpus = self
            .shared
            .vcpu_shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for v in vcpus {
            let before = v.acks.load(Ordering::SeqCst);
            v.wake();
            while v.in_run.load(Ordering::SeqCst) && v.acks.load(Ordering::SeqCst) == before {
                if std::time::Instant::now() > deadline {
                    return Err(Error::Unsupported(
                        "emu: a vCPU did not answer the dirty-log barrier in 10 s".into(),
                    ));
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }
}

impl Vm for EmuVm {
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(cpuid::table(
            0,
            self.shared.vcpus,
            self.shared.clock.tsc_hz(),
        ))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        if id >= self.shared.vcpus {
            return Err(Error::Unsupported(format!(
                "emu: vCPU {id} of a {}-vCPU VM",
                self.shared.vcpus
            )));
        }
        Ok(Box::new(EmuVcpu::new(id, self.shared.clone())))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        Ok(Arc::new(EmuIrqLine {
            vm: self.shared.clone(),
            gsi,
        }))
    }

    fn signal_msi(&self, msi: MsiMessage) -> Result<()> {
        // A device interrupt may announce DMA into guest code (see `VmShared::code_epoch`).
        self.shared.device_event();
        self.shared.irqchip.send_msi(msi);
        Ok(())
    }

    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>> {
        Ok(Arc::new(EmuMsiVector {
            vm: self.shared.clone(),
            route: Mutex::new(None),
        }))
    }

    // register_ioevent: the trait's default (not handled here: the device's notify region
    // signals the eventfd when the write reaches the bus).

    /// Only the clock: the interrupt controllers and PIT are the VMM's (`UserIrqChip`).
    fn save_state(&self) -> Result<crate::VmState> {
        Ok(crate::VmState {
            clock_ns: self.shared.clock.nanos(),
            ..Default::default()
        })
    }

    /// Sets the clock, paused until [`Vm::resume_clock`].
    fn restore_state(&self, state: &crate::VmState) -> Result<()> {
        if state.pic.is_some() || state.ioapic.is_some() || state.pit.is_some() {
            return Err(Error::Unsupported(
                "the state has in-kernel interrupt controllers (it is from KVM)".into(),
            ));
        }
        self.shared.clock.set_nanos(state.clock_ns);
        Ok(())
    }

    fn pause_clock(&self) -> Result<()> {
        self.shared.clock.pause();
        Ok(())
    }

    fn resume_clock(&self) -> Result<()> {
        self.shared.clock.resume();
        Ok(())
    }

    /// Arms every page: the first store to each takes the slow path and logs it.
    fn enable_dirty_log(&self) -> Result<()> {
        if let Some(c) = self.code_pages() {
            c.enable_dirty_log();
        }
        self.sync_vcpus()
    }

    fn disable_dirty_log(&self) -> Result<()> {
        if let Some(c) = self.code_pages() {
            c.disable_dirty_log();
        }
        // While logging, the migration took bits of the VMM's bitmap that may have told of
        // device writes into code (`CodePages::logging`): check every block once.
        self.shared.code_changed();
        Ok(())
    }

    fn take_dirty_log(&self) -> Result<Vec<crate::DirtyBitmap>> {
        let Some(c) = self.code_pages() else {
            return Ok(Vec::new());
        };
        let log = c.take_dirty_log();
        self.sync_vcpus()?;
        Ok(log)
    }
}

/// An MSI vector: `trigger` sends the current route to the userspace interrupt controllers.
/// Device interrupts bump the code epoch: they may announce DMA into guest code.
struct EmuMsiVector {
    vm: Arc<VmShared>,
    route: Mutex<Option<MsiMessage>>,
}

impl MsiVector for EmuMsiVector {
    fn set_route(&self, msg: Option<MsiMessage>) -> Result<()> {
        *self.route.lock().unwrap_or_else(|e| e.into_inner()) = msg;
        Ok(())
    }

    fn trigger(&self) {
        let route = *self.route.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(msg) = route {
            self.vm.device_event();
            self.vm.irqchip.send_msi(msg);
        }
    }
}

/// An interrupt line into the userspace interrupt controllers (bumps the code epoch like
/// [`EmuMsiVector`]).
struct EmuIrqLine {
    vm: Arc<VmShared>,
    gsi: u32,
}

impl IrqLine for EmuIrqLine {
    fn set_level(&self, level: bool) {
        if level {
            self.vm.device_event();
        }
        self.vm.irqchip.set_irq(self.gsi, level);
    }
}

/// Things worth one log line per process, not one per occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LogOnce {
    /// An unimplemented MSR index.
    Msr(u32),
    /// An unimplemented instruction (iced `Code`).
    Insn(u32),
    /// Gates, task switches, virtual-8086 mode.
    Gate,
    /// An xAPIC access that is not a 32-bit aligned access.
    ApicWidth,
    /// The kvmclock area is not RAM.
    Kvmclock,
}

/// Log `msg` the first time `key` is seen (bounded: a guest probing every MSR cannot grow the
/// set without limit).
pub(crate) fn log_once(key: LogOnce, msg: fmt::Arguments<'_>) {
    static SEEN: Mutex<Option<HashSet<LogOnce>>> = Mutex::new(None);
    let mut g = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let set = g.get_or_insert_with(HashSet::new);
    if set.len() < 4096 && set.insert(key) {
        match key {
            // Guests probe MSRs with `rdmsr_safe` all the time: the #GP is the answer.
            LogOnce::Msr(_) => tracing::debug!("{msg}"),
            _ => tracing::warn!("{msg}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::irqchip::CpuEvent;
    use crate::{Kicker, LapicState};
    use std::time::Instant;

    /// An interrupt controller with nothing in it.
    pub struct NullChip;

    impl UserIrqChip for NullChip {
        fn clock(&self) -> GuestClock {
            GuestClock::default()
        }
        fn attach_vcpu(&self, _id: u32, _waker: Arc<dyn Kicker>) {}
        fn lapic_read(&self, _id: u32, _offset: u32) -> u32 {
            0
        }
        fn lapic_write(&self, _id: u32, _offset: u32, _value: u32) {}
        fn lapic_write_icr(&self, _id: u32, _value: u64) {}
        fn apic_base(&self, _id: u32) -> u64 {
            0xfee0_0900
        }
        fn set_apic_base(&self, _id: u32, _value: u64) {}
        fn tsc_deadline(&self, _id: u32) -> u64 {
            0
        }
        fn set_tsc_deadline(&self, _id: u32, _deadline: u64) {}
        fn take_event(&self, _id: u32, _interruptible: bool) -> Option<CpuEvent> {
            None
        }
        fn has_interrupt(&self, _id: u32) -> bool {
            false
        }
        fn next_deadline(&self, _id: u32) -> Option<Instant> {
            None
        }
        fn set_irq(&self, _gsi: u32, _level: bool) {}
        fn send_msi(&self, _msi: MsiMessage) {}
        fn lapic_state(&self, _id: u32) -> LapicState {
            LapicState::default()
        }
        fn set_lapic_state(&self, _id: u32, _state: &LapicState) {}
    }

    pub fn dummy_vm() -> Arc<VmShared> {
        dummy_vm_with(1)
    }

    /// A VM with `vcpus` vCPUs, no memory and a do-nothing interrupt controller.
    pub fn dummy_vm_with(vcpus: u32) -> Arc<VmShared> {
        let chip: Arc<dyn UserIrqChip> = Arc::new(NullChip);
        Arc::new(VmShared {
            clock: chip.clock(),
            irqchip: chip,
            mem: RwLock::new(None),
            mem_gen: AtomicU64::new(0),
            code_epoch: AtomicU64::new(0),
            hard_epoch: AtomicU64::new(0),
            vcpus,
            vcpu_shared: Mutex::new(Vec::new()),
            jit: None,
            halt_poll: Duration::ZERO,
        })
    }

    #[test]
    fn create_vm_requires_irqchip() {
        let h = EmuHypervisor::new();
        assert!(h.needs_user_irqchip());
        let p = VmParams {
            memory: GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap(),
            vcpus: 1,
            user_irqchip: None,
            private_pages: 0,
        };
        assert!(h.create_vm(&p).is_err());
        let p = VmParams {
            user_irqchip: Some(Arc::new(NullChip)),
            ..p
        };
        let vm = h.create_vm(&p).unwrap();
        assert!(vm.create_vcpu(0).is_ok());
        assert!(vm.create_vcpu(1).is_err());
    }
}
