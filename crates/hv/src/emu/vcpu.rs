//! The emulated vCPU: `Vcpu::run`, event handling (interrupts, NMI, INIT/SIPI), HLT sleeping
//! and kicking, and the state accessors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::block::BlockCache;
use super::cpu::*;
use super::exec::{run_blocks, Exec, Stop};
use super::interrupt::{self, Event};
use super::VmShared;
use crate::halt_poll::HaltPoll;
use crate::irqchip::CpuEvent;
use crate::state::*;
use crate::{Error, IoHandler, Kicker, Result, Vcpu, VmExit};

/// What other threads use to get a vCPU's attention.
pub struct VcpuShared {
    /// Something happened: an event for the interrupt controller, or a kick. Checked by the
    /// block loop once per block (a relaxed load).
    pub attention: AtomicBool,
    /// `Kicker::kick` was called: `run` must return `Interrupted`.
    kicked: AtomicBool,
    /// Inside `Vcpu::run` (executing guest code or waiting in HLT).
    pub(crate) in_run: AtomicBool,
    /// Times `attention` was taken (a SeqCst read-modify-write: a full barrier), for
    /// `EmuVm::sync_vcpus`.
    pub(crate) acks: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl VcpuShared {
    fn new() -> VcpuShared {
        VcpuShared {
            attention: AtomicBool::new(true),
            kicked: AtomicBool::new(false),
            in_run: AtomicBool::new(false),
            acks: AtomicU64::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn wake(&self) {
        self.attention.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// Sleep until `attention` is set or `deadline` passes (no busy waiting).
    fn sleep_until(&self, deadline: Option<Instant>) {
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.attention.load(Ordering::SeqCst) {
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return;
                    }
                    g = self
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// Given to the interrupt controller (`attach_vcpu`): an event became pending.
struct EventWaker(Arc<VcpuShared>);

impl Kicker for EventWaker {
    fn kick(&self) {
        self.0.wake();
    }
}

/// The `Vcpu::kicker` handle.
struct EmuKicker(Arc<VcpuShared>);

impl Kicker for EmuKicker {
    fn kick(&self) {
        self.0.kicked.store(true, Ordering::SeqCst);
        self.0.wake();
    }
}

/// One emulated vCPU.
pub struct EmuVcpu {
    cpu: Cpu,
    cache: BlockCache,
    shared: Arc<VcpuShared>,
    kicker: Arc<EmuKicker>,
    /// Polling before sleeping in HLT, as a KVM vCPU does.
    halt_poll: HaltPoll,
}

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        if let Some(p) = &self.cpu.profile {
            p.write(self.cpu.id);
        }
        tracing::debug!(
            vcpu = self.cpu.id,
            instructions = self.cpu.icount,
            blocks_built = self.cache.built,
            blocks_stale = self.cache.stale,
            blocks_revalidated = self.cache.revalidated,
            blocks_revalidated_by_bitmap = self.cache.revalidated_soft,
            page_straddling_reused = self.cache.cross_hits,
            jit_blocks = self.cache.jit.as_ref().map_or(0, |j| j.translated),
            jit_native_ops = self.cache.jit.as_ref().map_or(0, |j| j.native_ops),
            jit_entered = self.cpu.jit_entered,
            jit_chained = self.cpu.jit_chained,
            halts = self.halt_poll.counts().0,
            halts_polled = self.halt_poll.counts().1,
            code_pages_watched = self.cpu.mmu.code().watched(),
            "emu: block cache statistics"
        );
    }
}

impl EmuVcpu {
    pub(crate) fn new(id: u32, vm: Arc<VmShared>) -> EmuVcpu {
        let table = super::cpuid::table(id, vm.vcpus, vm.clock.tsc_hz());
        let shared = Arc::new(VcpuShared::new());
        vm.vcpu_shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shared.clone());
        vm.irqchip
            .attach_vcpu(id, Arc::new(EventWaker(shared.clone())));
        let mut v = EmuVcpu {
            halt_poll: HaltPoll::new(vm.halt_poll),
            cpu: Cpu::new(id, vm, table),
            cache: BlockCache::new(),
            kicker: Arc::new(EmuKicker(shared.clone())),
            shared,
        };
        if let Some(jit) = v.cpu.vm.jit.as_ref().and_then(super::jit::Jit::new) {
            v.cache.enable_jit(jit);
        }
        v.sync_memory();
        v.cpu.refresh_apic_base();
        v
    }

    /// Pick up a new `Vm::set_memory`.
    fn sync_memory(&mut self) {
        let gen = self.cpu.vm.mem_gen.load(Ordering::Acquire);
        if gen == self.cpu.mmu.mem_gen {
            return;
        }
        let mem = self
            .cpu
            .vm
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(m) = mem {
            self.cpu.mmu.set_memory(m.mem, m.code, gen);
            self.cache.clear();
        }
    }

    /// Instructions executed so far (one per executed op).
    pub fn instructions(&self) -> u64 {
        self.cpu.icount
    }

    /// Blocks decoded so far, and how many of those replaced a block whose bytes had changed.
    pub fn block_stats(&self) -> (u64, u64) {
        (self.cache.built, self.cache.stale)
    }

    /// Times a block's bytes were compared with guest memory after the code epoch moved and
    /// found unchanged.
    pub fn blocks_revalidated(&self) -> u64 {
        self.cache.revalidated
    }

    fn run_inner(&mut self, io: &dyn IoHandler) -> Result<VmExit> {
        // The VMM may have written guest memory (a loader, a test) since the last exit.
        self.cpu.vm.code_changed();
        self.sync_memory();
        self.cpu.refresh_apic_base();
        self.cpu.poll = true;
        loop {
            if self.shared.kicked.swap(false, Ordering::SeqCst) {
                return Ok(VmExit::Interrupted);
            }
            if self.service_events(io).is_err() {
                return Ok(VmExit::Shutdown);
            }
            if self.shared.kicked.load(Ordering::SeqCst) {
                continue;
            }
            if self.cpu.mp_state != MpState::Runnable {
                self.wait();
                continue;
            }
            let mut x = Exec {
                cpu: &mut self.cpu,
                io,
            };
            match run_blocks(&mut x, &mut self.cache, &self.shared.attention) {
                Stop::Attention => {}
                Stop::Halt => {
                    self.cpu.mp_state = MpState::Halted;
                    self.cpu.poll = true;
                }
                Stop::Shutdown => return Ok(VmExit::Shutdown),
                Stop::Failure(reason) => {
                    return Err(Error::GuestFailure {
                        vcpu: self.cpu.id,
                        reason,
                    })
                }
            }
        }
    }

    /// Take and act on what the interrupt controller has for this vCPU. `Err(())`: triple
    /// fault while delivering.
    fn service_events(&mut self, io: &dyn IoHandler) -> std::result::Result<(), ()> {
        let attention = self.shared.attention.swap(false, Ordering::SeqCst);
        if attention {
            self.shared.acks.fetch_add(1, Ordering::SeqCst);
        }
        if !attention && !self.cpu.poll {
            return Ok(());
        }
        self.cpu.poll = false;
        let chip = self.cpu.vm.irqchip.clone();
        let id = self.cpu.id;
        for _ in 0..8 {
            let waiting = matches!(
                self.cpu.mp_state,
                MpState::Uninitialized | MpState::InitReceived | MpState::SipiReceived
            );
            if !waiting && self.cpu.nmi_pending && !self.cpu.nmi_blocked && !self.cpu.shadow {
                self.cpu.nmi_pending = false;
                self.deliver(io, Event::nmi())?;
                continue;
            }
            let interruptible = !waiting && self.cpu.interruptible();
            let Some(ev) = chip.take_event(id, interruptible) else {
                break;
            };
            match ev {
                CpuEvent::Init => {
                    self.cpu.reset();
                    self.cpu.mp_state = MpState::InitReceived;
                }
                CpuEvent::Sipi(v) => {
                    if waiting {
                        let sel = (v as u16) << 8;
                        self.cpu.seg[CS] = real_mode_seg(sel, true);
                        self.cpu.rip = 0;
                        self.cpu.mp_state = MpState::Runnable;
                        self.cpu.update_mode();
                    }
                }
                CpuEvent::Nmi => {
                    if waiting {
                        continue;
                    }
                    if self.cpu.nmi_blocked || self.cpu.shadow {
                        self.cpu.nmi_pending = true;
                    } else {
                        self.deliver(io, Event::nmi())?;
                    }
                }
                CpuEvent::Interrupt(v) => {
                    self.deliver(io, Event::external(v))?;
                    // One maskable interrupt per instruction boundary; look again after it.
                    self.cpu.poll = true;
                    break;
                }
            }
        }
        self.cpu.deadline = chip.next_deadline(id);
        Ok(())
    }

    fn deliver(&mut self, io: &dyn IoHandler, ev: Event) -> std::result::Result<(), ()> {
        if self.cpu.mp_state == MpState::Halted {
            self.cpu.mp_state = MpState::Runnable;
        }
        let mut x = Exec {
            cpu: &mut self.cpu,
            io,
        };
        interrupt::deliver(&mut x, ev)
    }

    /// Sleep while halted or waiting for SIPI, until an event, the timer or a kick. A halt
    /// first polls for the wake-up for up to the [`HaltPoll`] window, as KVM's
    /// `kvm_vcpu_halt` does: an interrupt that comes within it (a disk's completion) finds
    /// the vCPU running rather than asleep.
    fn wait(&mut self) {
        let halted = self.cpu.mp_state == MpState::Halted;
        let deadline = if halted {
            self.cpu.vm.irqchip.next_deadline(self.cpu.id)
        } else {
            None
        };
        // A deadline that is already due but produced no event must not make us spin.
        let deadline = deadline.map(|d| d.max(Instant::now() + Duration::from_micros(200)));
        if halted && self.halt_poll.enabled() {
            let start = Instant::now();
            let attention = &self.shared.attention;
            let hit = self
                .halt_poll
                .poll_window(start, deadline, || {
                    attention.load(Ordering::SeqCst).then_some(())
                })
                .is_some();
            if !hit {
                self.shared.sleep_until(deadline);
            }
            self.halt_poll.adapt(start.elapsed(), hit);
        } else {
            self.shared.sleep_until(deadline);
        }
        self.cpu.poll = true;
    }
}

impl Vcpu for EmuVcpu {
    fn id(&self) -> u32 {
        self.cpu.id
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VmExit> {
        self.shared.in_run.store(true, Ordering::SeqCst);
        let r = self.run_inner(io);
        self.shared.in_run.store(false, Ordering::SeqCst);
        r
    }

    fn kicker(&self) -> Arc<dyn Kicker> {
        self.kicker.clone()
    }
    fn regs(&self) -> Result<Regs> {
        let g = &self.cpu.gpr;
        Ok(Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.cpu.rip,
            rflags: self.cpu.rflags(),
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        self.cpu.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.cpu.rip = r.rip;
        self.cpu.set_rflags(r.rflags);
        Ok(())
    }

    fn sregs(&self) -> Result<Sregs> {
        let c = &self.cpu;
        let chip = &c.vm.irqchip;
        Ok(Sregs {
            es: c.seg[ES],
            cs: c.seg[CS],
            ss: c.seg[SS],
            ds: c.seg[DS],
            fs: c.seg[FS],
            gs: c.seg[GS],
            tr: c.tr,
            ldt: c.ldt,
            gdt: c.gdt,
            idt: c.idt,
            cr0: c.cr0,
            cr2: c.cr2,
            cr3: c.cr3,
            cr4: c.cr4,
            cr8: (chip.lapic_read(c.id, 0x80) >> 4) as u64 & 0xf,
            efer: c.efer,
            apic_base: chip.apic_base(c.id),
        })
    }

    fn set_sregs(&mut self, s: &Sregs) -> Result<()> {
        let c = &mut self.cpu;
        c.seg = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs];
        c.tr = s.tr;
        c.ldt = s.ldt;
        c.gdt = s.gdt;
        c.idt = s.idt;
        c.cr0 = s.cr0;
        c.cr2 = s.cr2;
        c.cr3 = s.cr3;
        c.cr4 = s.cr4;
        c.efer = s.efer;
        // As on VMX, the CPL is the DPL of SS (0 in real mode).
        c.cpl = if c.cr0 & CR0_PE != 0 { s.ss.dpl & 3 } else { 0 };
        c.update_mode();
        c.mmu.flush_all();
        let chip = c.vm.irqchip.clone();
        let tpr = (s.cr8 as u32 & 0xf) << 4;
        if chip.lapic_read(c.id, 0x80) & 0xf0 != tpr {
            chip.lapic_write(c.id, 0x80, tpr);
        }
        if s.apic_base != 0 && s.apic_base != chip.apic_base(c.id) {
            chip.set_apic_base(c.id, s.apic_base);
        }
        c.refresh_apic_base();
        c.poll = true;
        Ok(())
    }

    fn fpu(&self) -> Result<FpuState> {
        Ok(self.cpu.fpu)
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        self.cpu.fpu = *fpu;
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<Msr>> {
        // The guest's RDMSR path logs unknown indices; the VMM's reads just leave them out.
        let c = &self.cpu;
        let chip = &c.vm.irqchip;
        Ok(indices
            .iter()
            .filter_map(|&i| {
                use super::msr::*;
                let v = match i {
                    IA32_TIME_STAMP_COUNTER => c.guest_tsc(),
                    IA32_APIC_BASE => chip.apic_base(c.id),
                    IA32_SYSENTER_CS => c.msr.sysenter_cs,
                    IA32_SYSENTER_ESP => c.msr.sysenter_esp,
                    IA32_SYSENTER_EIP => c.msr.sysenter_eip,
                    IA32_MISC_ENABLE => c.msr.misc_enable,
                    IA32_PAT => c.msr.pat,
                    IA32_EFER => c.efer,
                    IA32_STAR => c.msr.star,
                    IA32_LSTAR => c.msr.lstar,
                    IA32_CSTAR => c.msr.cstar,
                    IA32_FMASK => c.msr.fmask,
                    IA32_FS_BASE => c.seg[FS].base,
                    IA32_GS_BASE => c.seg[GS].base,
                    IA32_KERNEL_GS_BASE => c.msr.kernel_gs_base,
                    IA32_TSC_AUX => c.msr.tsc_aux,
                    IA32_BIOS_SIGN_ID => c.msr.bios_sign_id,
                    MSR_KVM_WALL_CLOCK_NEW => c.msr.kvm_wall_clock,
                    MSR_KVM_SYSTEM_TIME_NEW => c.msr.kvm_system_time,
                    _ => return None,
                };
                Some(Msr::new(i, v))
            })
            .collect())
    }

    fn set_msrs(&mut self, msrs: &[Msr]) -> Result<()> {
        for m in msrs {
            if !self.cpu.wrmsr(m.index, m.data, true) {
                return Err(Error::Unsupported(format!(
                    "emu: MSR {:#x} is not implemented",
                    m.index
                )));
            }
        }
        Ok(())
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()> {
        self.cpu.cpuid = entries.to_vec();
        self.cpu.update_maxphy();
        self.cpu.mmu.flush_all();
        Ok(())
    }

    fn lapic(&self) -> Result<LapicState> {
        Ok(self.cpu.vm.irqchip.lapic_state(self.cpu.id))
    }

    fn set_lapic(&mut self, lapic: &LapicState) -> Result<()> {
        self.cpu.vm.irqchip.set_lapic_state(self.cpu.id, lapic);
        self.cpu.refresh_apic_base();
        self.cpu.lapic_changed();
        Ok(())
    }

    fn mp_state(&self) -> Result<MpState> {
        Ok(self.cpu.mp_state)
    }

    fn set_mp_state(&mut self, state: MpState) -> Result<()> {
        self.cpu.mp_state = state;
        self.cpu.poll = true;
        Ok(())
    }

    fn save_state(&mut self) -> Result<VcpuState> {
        let c = &self.cpu;
        Ok(VcpuState {
            id: c.id,
            regs: self.regs()?,
            sregs: self.sregs()?,
            fpu: c.fpu,
            msrs: self.msrs(super::SAVED_MSRS)?,
            lapic: self.lapic()?,
            mp_state: c.mp_state,
            cpuid: c.cpuid.clone(),
            events: VcpuEvents {
                interrupt_shadow: u8::from(c.shadow),
                nmi_pending: c.nmi_pending,
                nmi_masked: c.nmi_blocked,
                ..Default::default()
            },
            debug: DebugRegs {
                db: [c.dr[0], c.dr[1], c.dr[2], c.dr[3]],
                dr6: c.dr[6],
                dr7: c.dr[7],
            },
            xcrs: Vec::new(),
            xsave: None,
        })
    }

    /// Everything but the local APIC, which lives in the userspace interrupt controller and
    /// is restored with it (before the vCPUs, after the VM clock: the TSC MSR is taken
    /// relative to the clock).
    fn restore_state(&mut self, s: &VcpuState) -> Result<()> {
        if s.xsave.is_some() {
            return Err(Error::Unsupported(
                "emu: an XSAVE area (the state is from KVM)".into(),
            ));
        }
        if !s.cpuid.is_empty() {
            self.set_cpuid(&s.cpuid)?;
        }
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs)?;
        self.set_fpu(&s.fpu)?;
        self.set_msrs(&s.msrs)?;
        let c = &mut self.cpu;
        c.mp_state = s.mp_state;
        c.shadow = s.events.interrupt_shadow != 0;
        c.nmi_pending = s.events.nmi_pending;
        c.nmi_blocked = s.events.nmi_masked;
        c.dr = [
            s.debug.db[0],
            s.debug.db[1],
            s.debug.db[2],
            s.debug.db[3],
            0xffff_0ff0,
            0x400,
            s.debug.dr6,
            s.debug.dr7,
        ];
        c.refresh_apic_base();
        c.poll = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::tests::dummy_vm;

    #[test]
    fn a_halt_polls_for_its_wake_up_and_the_window_adapts() {
        let mut v = EmuVcpu::new(0, dummy_vm());
        // The dummy VM does not poll; give this vCPU KVM's limit and a 10 µs window.
        v.halt_poll = HaltPoll::new(Duration::from_micros(200));
        v.halt_poll.adapt(Duration::from_micros(50), false);
        assert_eq!(v.halt_poll.window(), HaltPoll::GROW_START);

        // A wake-up already there ends the halt in the polling, without sleeping.
        v.cpu.mp_state = MpState::Halted;
        v.shared.attention.store(true, Ordering::SeqCst);
        v.wait();
        assert_eq!(v.halt_poll.counts(), (2, 1));
        assert!(v.cpu.poll);

        // One that comes long after the window ends the sleep; the long halt shrinks the
        // window (10 µs halves to nothing).
        v.shared.attention.store(false, Ordering::SeqCst);
        let shared = v.shared.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            shared.wake();
        });
        v.wait();
        waker.join().unwrap();
        assert_eq!(v.halt_poll.counts(), (3, 1));
        assert_eq!(v.halt_poll.window(), Duration::ZERO);

        // Waiting for SIPI never polls.
        v.cpu.mp_state = MpState::InitReceived;
        v.halt_poll.adapt(Duration::from_micros(50), false);
        v.wait();
        assert_eq!(v.halt_poll.counts(), (4, 1));
    }

    #[test]
    fn state_round_trips_through_a_fresh_vcpu() {
        let mut a = EmuVcpu::new(0, dummy_vm());
        let mut regs = a.regs().unwrap();
        regs.rax = 0x1234;
        regs.r15 = u64::MAX;
        regs.rip = 0x10_0000;
        regs.rflags = 0x202;
        a.set_regs(&regs).unwrap();
        let mut fpu = a.fpu().unwrap();
        fpu.xmm[3] = [7; 16];
        fpu.mxcsr = 0x1f80;
        a.set_fpu(&fpu).unwrap();
        a.cpu.nmi_blocked = true;
        a.cpu.shadow = true;
        a.cpu.dr[7] = 0x401;
        a.set_msrs(&[Msr::new(0xc000_0082, 0xffff_ffff_8100_0000)])
            .unwrap();
        let saved = a.save_state().unwrap();
        assert!(saved.events.nmi_masked && saved.events.interrupt_shadow == 1);

        let mut b = EmuVcpu::new(0, dummy_vm());
        b.restore_state(&saved).unwrap();
        let again = b.save_state().unwrap();
        // The TSC moves on between the two saves; everything else is equal.
        let no_tsc = |s: &VcpuState| {
            let mut s = s.clone();
            s.msrs.retain(|m| m.index != 0x10);
            s
        };
        assert_eq!(no_tsc(&again), no_tsc(&saved));
        let mut kvm_state = saved;
        kvm_state.xsave = Some(vec![0; 1024]);
        assert!(b.restore_state(&kvm_state).is_err());
    }
}
