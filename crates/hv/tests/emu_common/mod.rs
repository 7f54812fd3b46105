//! Shared support for the emulator's integration tests: a fake interrupt controller, a
//! recording I/O handler, and a small "machine" (memory, page tables, GDT, TSS, IDT) that puts
//! a vCPU in 64-bit mode through the public `Vcpu` setters, as the VMM does.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::CodeAssembler;
use vireo_hv::emu::EmuHypervisor;
use vireo_hv::irqchip::{CpuEvent, GuestClock, UserIrqChip};
use vireo_hv::{
    DescriptorTable, GuestMemory, Hypervisor, IoHandler, Kicker, LapicState, MsiMessage, Regs,
    Segment, Sregs, Vcpu, Vm, VmExit, VmParams,
};
use vm_memory::{Bytes, GuestAddress};

// ---- fake interrupt controller ----------------------------------------------------------------

#[derive(Default)]
struct ChipVcpu {
    events: VecDeque<CpuEvent>,
    waker: Option<Arc<dyn Kicker>>,
    regs: HashMap<u32, u32>,
    apic_base: u64,
    tsc_deadline: u64,
    deadline: Option<(Instant, u8)>,
}

/// A scripted interrupt controller: tests push events; `take_event` hands them out with the
/// usual rules (maskable interrupts only when interruptible). A deadline can be armed to
/// deliver an interrupt vector when it expires (inside `take_event`, like an APIC timer).
pub struct FakeChip {
    clock: GuestClock,
    vcpus: Mutex<HashMap<u32, ChipVcpu>>,
    pub lapic_writes: Mutex<Vec<(u32, u32, u32)>>,
    pub irqs: Mutex<Vec<(u32, bool)>>,
    pub lapic_states: Mutex<Vec<(u32, LapicState)>>,
}

impl FakeChip {
    pub fn new() -> Arc<FakeChip> {
        Arc::new(FakeChip {
            clock: GuestClock::default(),
            vcpus: Mutex::new(HashMap::new()),
            lapic_writes: Mutex::new(Vec::new()),
            irqs: Mutex::new(Vec::new()),
            lapic_states: Mutex::new(Vec::new()),
        })
    }

    /// Queue `ev` for vCPU `id` and wake it.
    pub fn push(&self, id: u32, ev: CpuEvent) {
        let waker = {
            let mut v = self.vcpus.lock().unwrap();
            let c = v.entry(id).or_default();
            c.events.push_back(ev);
            c.waker.clone()
        };
        if let Some(w) = waker {
            w.kick();
        }
    }

    /// Deliver `vector` to vCPU `id` once `at` has passed.
    pub fn arm_timer(&self, id: u32, at: Instant, vector: u8) {
        self.vcpus.lock().unwrap().entry(id).or_default().deadline = Some((at, vector));
    }

    pub fn set_reg(&self, id: u32, offset: u32, v: u32) {
        self.vcpus
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .regs
            .insert(offset, v);
    }
}

impl UserIrqChip for FakeChip {
    fn clock(&self) -> GuestClock {
        self.clock.clone()
    }
    fn attach_vcpu(&self, id: u32, waker: Arc<dyn Kicker>) {
        let mut v = self.vcpus.lock().unwrap();
        let c = v.entry(id).or_default();
        c.waker = Some(waker);
        c.apic_base = 0xfee0_0800 | if id == 0 { 0x100 } else { 0 };
    }
    fn lapic_read(&self, id: u32, offset: u32) -> u32 {
        let v = self.vcpus.lock().unwrap();
        v.get(&id)
            .and_then(|c| c.regs.get(&offset).copied())
            .unwrap_or(if offset == 0x20 { id << 24 } else { 0 })
    }
    fn lapic_write(&self, id: u32, offset: u32, value: u32) {
        self.lapic_writes.lock().unwrap().push((id, offset, value));
        self.set_reg(id, offset, value);
    }
    fn lapic_write_icr(&self, id: u32, value: u64) {
        self.lapic_writes
            .lock()
            .unwrap()
            .push((id, 0x300, value as u32));
    }
    fn apic_base(&self, id: u32) -> u64 {
        self.vcpus
            .lock()
            .unwrap()
            .get(&id)
            .map(|c| c.apic_base)
            .unwrap_or(0xfee0_0800)
    }
    fn set_apic_base(&self, id: u32, value: u64) {
        self.vcpus.lock().unwrap().entry(id).or_default().apic_base = value;
    }
    fn tsc_deadline(&self, id: u32) -> u64 {
        self.vcpus
            .lock()
            .unwrap()
            .get(&id)
            .map(|c| c.tsc_deadline)
            .unwrap_or(0)
    }
    fn set_tsc_deadline(&self, id: u32, deadline: u64) {
        self.vcpus
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .tsc_deadline = deadline;
    }
    fn take_event(&self, id: u32, interruptible: bool) -> Option<CpuEvent> {
        let mut v = self.vcpus.lock().unwrap();
        let c = v.entry(id).or_default();
        if let Some((at, vec)) = c.deadline {
            if Instant::now() >= at {
                c.deadline = None;
                c.events.push_back(CpuEvent::Interrupt(vec));
            }
        }
        let pos = c
            .events
            .iter()
            .position(|e| interruptible || !matches!(e, CpuEvent::Interrupt(_)))?;
        c.events.remove(pos)
    }
    fn has_interrupt(&self, id: u32) -> bool {
        let v = self.vcpus.lock().unwrap();
        v.get(&id)
            .is_some_and(|c| c.events.iter().any(|e| matches!(e, CpuEvent::Interrupt(_))))
    }
    fn next_deadline(&self, id: u32) -> Option<Instant> {
        self.vcpus
            .lock()
            .unwrap()
            .get(&id)
            .and_then(|c| c.deadline.map(|d| d.0))
    }
    fn set_irq(&self, gsi: u32, level: bool) {
        self.irqs.lock().unwrap().push((gsi, level));
    }
    fn send_msi(&self, _msi: MsiMessage) {}
    fn lapic_state(&self, _id: u32) -> LapicState {
        LapicState::default()
    }
    fn set_lapic_state(&self, id: u32, state: &LapicState) {
        self.lapic_states.lock().unwrap().push((id, state.clone()));
    }
}

// ---- recording I/O handler ----------------------------------------------------------------------

/// The port a test program writes to when it is done (like QEMU's isa-debug-exit).
pub const EXIT_PORT: u16 = 0xf4;

/// A device model run synchronously on a port write (`TestIo::on_pio_write`).
pub type PioHook = Box<dyn Fn(&[u8]) + Send>;

/// Records port and MMIO writes; `OUT` to [`EXIT_PORT`] kicks the registered vCPUs so `run`
/// returns. MMIO reads return `0x5a` bytes, port reads `0xa5` bytes unless scripted.
#[derive(Default)]
pub struct TestIo {
    pub pio: Mutex<Vec<(u16, Vec<u8>)>>,
    pub mmio: Mutex<Vec<(u64, Vec<u8>)>>,
    pub mmio_reads: Mutex<Vec<(u64, usize)>>,
    pub pio_in: Mutex<HashMap<u16, VecDeque<u8>>>,
    pub kickers: Mutex<Vec<Arc<dyn Kicker>>>,
    pub pio_hooks: Mutex<HashMap<u16, PioHook>>,
}

impl TestIo {
    pub fn new() -> Arc<TestIo> {
        Arc::new(TestIo::default())
    }

    /// Run `hook` (a device) whenever the guest writes to `port`, inside the `OUT`.
    pub fn on_pio_write(&self, port: u16, hook: impl Fn(&[u8]) + Send + 'static) {
        self.pio_hooks.lock().unwrap().insert(port, Box::new(hook));
    }

    pub fn exit_value(&self) -> Option<u8> {
        self.pio
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(p, _)| *p == EXIT_PORT)
            .map(|(_, d)| d[0])
    }
}

impl IoHandler for TestIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let mut q = self.pio_in.lock().unwrap();
        for b in data.iter_mut() {
            *b = q.get_mut(&port).and_then(|q| q.pop_front()).unwrap_or(0xa5);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.lock().unwrap().push((port, data.to_vec()));
        if let Some(h) = self.pio_hooks.lock().unwrap().get(&port) {
            h(data);
        }
        if port == EXIT_PORT {
            for k in self.kickers.lock().unwrap().iter() {
                k.kick();
            }
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio_reads.lock().unwrap().push((addr, data.len()));
        data.fill(0x5a);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.lock().unwrap().push((addr, data.to_vec()));
    }
}

// ---- a small 64-bit machine ---------------------------------------------------------------------

pub const MEM_SIZE: usize = 64 << 20;
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
pub const GDT: u64 = 0x4000;
pub const TSS: u64 = 0x5000;
pub const IDT: u64 = 0x6000;
/// A page table for 4 KiB mappings of the second 2 MiB (0x200000-0x3fffff).
pub const PT: u64 = 0x7000;
pub const CODE: u64 = 0x10000;
pub const STACK_TOP: u64 = 0x80000;
pub const RSP0_TOP: u64 = 0x90000;
pub const IST1_TOP: u64 = 0xa0000;
pub const DATA: u64 = 0x100000;

/// Selectors (the Linux GDT layout).
pub const KERNEL32_CS: u16 = 0x08;
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER32_CS: u16 = 0x23;
pub const USER_DS: u16 = 0x2b;
pub const USER_CS: u16 = 0x33;
pub const TSS_SEL: u16 = 0x40;

pub struct Machine {
    pub chip: Arc<FakeChip>,
    pub io: Arc<TestIo>,
    pub mem: GuestMemory,
    pub vm: Arc<dyn Vm>,
}

pub fn seg64(selector: u16, code: bool, dpl: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl,
        db: !code,
        s: true,
        l: code,
        g: true,
        avl: false,
        unusable: false,
    }
}

impl Machine {
    /// A machine with the JIT on, as vireo runs by default.
    pub fn new(vcpus: u32) -> Machine {
        Machine::with(EmuHypervisor::with_jit(true), vcpus)
    }

    /// A machine whose emulator translates hot blocks (`jit`) or only interprets.
    #[allow(dead_code)]
    pub fn with_jit(jit: bool, vcpus: u32) -> Machine {
        Machine::with(EmuHypervisor::with_jit(jit), vcpus)
    }

    fn with(h: EmuHypervisor, vcpus: u32) -> Machine {
        let chip = FakeChip::new();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let params = VmParams {
            memory: mem.clone(),
            vcpus,
            user_irqchip: Some(chip.clone()),
            private_pages: 0xfeff_c000,
        };
        let vm = h.create_vm(&params).unwrap();
        let m = Machine {
            chip,
            io: TestIo::new(),
            mem,
            vm,
        };
        m.build_tables();
        m
    }

    pub fn w64(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }
    pub fn r64(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
    pub fn w32(&self, addr: u64, v: u32) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }
    pub fn r32(&self, addr: u64) -> u32 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
    pub fn write(&self, addr: u64, b: &[u8]) {
        self.mem.write_slice(b, GuestAddress(addr)).unwrap();
    }
    pub fn read(&self, addr: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Identity map of the first GiB with 2 MiB user-accessible pages, except 0x200000-0x3fffff
    /// which is mapped by 4 KiB pages through `PT` (for fault tests); GDT, TSS.
    fn build_tables(&self) {
        self.w64(PML4, PDPT | 7);
        self.w64(PDPT, PD | 7);
        for i in 0..512u64 {
            self.w64(PD + i * 8, (i << 21) | 0x87);
        }
        self.w64(PD + 8, PT | 7);
        for i in 0..512u64 {
            self.w64(PT + i * 8, (0x20_0000 + (i << 12)) | 7);
        }
        let gdt: [u64; 10] = [
            0,
            0x00cf_9b00_0000_ffff, // 0x08 kernel 32-bit code
            0x00af_9b00_0000_ffff, // 0x10 kernel 64-bit code
            0x00cf_9300_0000_ffff, // 0x18 kernel data
            0x00cf_fb00_0000_ffff, // 0x20 user 32-bit code
            0x00cf_f300_0000_ffff, // 0x28 user data
            0x00af_fb00_0000_ffff, // 0x30 user 64-bit code
            0,
            // 0x40 64-bit TSS (16 bytes), base TSS, limit 0x67, available.
            0x0000_8900_0000_0067 | ((TSS & 0xff_ffff) << 16) | ((TSS >> 24) << 56),
            TSS >> 32,
        ];
        for (i, d) in gdt.iter().enumerate() {
            self.w64(GDT + i as u64 * 8, *d);
        }
        self.w64(TSS + 4, RSP0_TOP);
        self.w64(TSS + 0x24, IST1_TOP);
    }

    /// Point IDT vector `v` at `handler` (64-bit interrupt gate, or trap gate), DPL `dpl`, IST.
    pub fn set_gate(&self, v: u8, handler: u64, trap: bool, dpl: u8, ist: u8) {
        let typ: u64 = if trap { 0xf } else { 0xe };
        let lo = (handler & 0xffff)
            | ((KERNEL_CS as u64) << 16)
            | ((ist as u64 & 7) << 32)
            | (typ << 40)
            | ((dpl as u64) << 45)
            | (1 << 47)
            | ((handler >> 16) & 0xffff) << 48;
        self.w64(IDT + v as u64 * 16, lo);
        self.w64(IDT + v as u64 * 16 + 8, handler >> 32);
    }

    pub fn vcpu(&self, id: u32) -> Box<dyn Vcpu> {
        let v = self.vm.create_vcpu(id).unwrap();
        self.io.kickers.lock().unwrap().push(v.kicker());
        v
    }

    /// Long-mode sregs as a VMM sets them for a 64-bit entry point.
    pub fn long_sregs() -> Sregs {
        let data = seg64(KERNEL_DS, false, 0);
        Sregs {
            cs: seg64(KERNEL_CS, true, 0),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment {
                base: TSS,
                limit: 0x67,
                selector: TSS_SEL,
                type_: 0xb,
                present: true,
                ..Segment::default()
            },
            ldt: Segment {
                unusable: true,
                ..Segment::default()
            },
            gdt: DescriptorTable {
                base: GDT,
                limit: 10 * 8 - 1,
            },
            idt: DescriptorTable {
                base: IDT,
                limit: 256 * 16 - 1,
            },
            cr0: 0x8005_0033,
            cr2: 0,
            cr3: PML4,
            cr4: 0x20 | 0x80 | 0x200 | 0x400,
            cr8: 0,
            efer: 0xd01,
            apic_base: 0,
        }
    }

    /// Put `code` at `at` and make `vcpu` ready to run it in 64-bit mode, CPL 0.
    pub fn load_long(&self, vcpu: &mut dyn Vcpu, code: &[u8], at: u64) {
        self.write(at, code);
        vcpu.set_sregs(&Self::long_sregs()).unwrap();
        vcpu.set_regs(&Regs {
            rip: at,
            rsp: STACK_TOP,
            rflags: 2,
            ..Regs::default()
        })
        .unwrap();
        vcpu.set_mp_state(vireo_hv::MpState::Runnable).unwrap();
    }
}

/// Assemble 64-bit code at `ip`.
pub fn asm64(ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// Assemble code of `bits` bits at `ip`.
pub fn asm(bits: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// `out EXIT_PORT, al; hlt` (the end of every test program).
pub fn exit(a: &mut CodeAssembler) {
    use iced_x86::code_asm::*;
    a.out(EXIT_PORT as i32, al).unwrap();
    a.hlt().unwrap();
}

/// Run `vcpu` until it stops, with a watchdog that kicks it after `limit`.
pub fn run_for(vcpu: &mut dyn Vcpu, io: &TestIo, limit: Duration) -> VmExit {
    let k = vcpu.kicker();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if d2.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        k.kick();
        true
    });
    let r = vcpu.run(io).unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let fired = watchdog.join().unwrap();
    assert!(
        !fired || io.exit_value().is_some(),
        "watchdog fired: guest did not finish"
    );
    r
}

/// Run until the program writes to `EXIT_PORT`; returns the value written.
pub fn run_to_exit(vcpu: &mut dyn Vcpu, io: &TestIo) -> u8 {
    let n = io.pio.lock().unwrap().len();
    let exit = run_for(vcpu, io, Duration::from_secs(20));
    assert_eq!(exit, VmExit::Interrupted);
    let pio = io.pio.lock().unwrap();
    pio[n..]
        .iter()
        .rev()
        .find(|(p, _)| *p == EXIT_PORT)
        .map(|(_, d)| d[0])
        .expect("the guest never wrote the exit port")
}

/// CPU time used by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
