//! The KVM backend (hardware-assisted virtualization through `/dev/kvm`, VT-x / AMD-V).
//!
//! The in-kernel irqchip (8259 PIC pair, IOAPIC, per-vCPU LAPIC) and PIT are created with the VM.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError};

use kvm_bindings::{
    kvm_fpu, kvm_irq_routing_entry, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_config,
    kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_userspace_memory_region, CpuId, KvmIrqRouting,
    Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::state::*;
use crate::{
    Datamatch, DirtyBitmap, Error, GuestMemory, Hypervisor, IoEventAddress, IoHandler, IrqLine,
    Kicker, MsiMessage, MsiVector, Result, Vcpu, Vm, VmExit, VmParams,
};

/// The KVM hypervisor (`/dev/kvm`).
pub struct KvmHypervisor {
    kvm: Arc<Kvm>,
}

impl KvmHypervisor {
    /// Open `/dev/kvm`. The error says how to fix a missing or inaccessible device.
    pub fn new() -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(crate::host::KVM_PATH)
            .map_err(|e| Error::Unavailable(kvm_open_hint(&e)))?;
        // SAFETY: `file` is an open /dev/kvm descriptor whose ownership passes to `Kvm`.
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::Unavailable(format!(
                "/dev/kvm speaks KVM API version {version}, vireo needs 12"
            )));
        }
        Ok(KvmHypervisor { kvm: Arc::new(kvm) })
    }
}

fn kvm_open_hint(e: &std::io::Error) -> String {
    let path = crate::host::KVM_PATH;
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => format!(
            "{path} does not exist: enable virtualization in the firmware and load the KVM \
             module (`modprobe kvm_intel` or `modprobe kvm_amd`), or use `--accel emu`"
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "no permission to open {path}: add your user to its group \
             (`sudo usermod -aG kvm $USER`, then log in again) or use `--accel emu`"
        ),
        _ => format!("cannot open {path}: {e}"),
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus().min(255) as u32
    }

    fn create_vm(&self, params: &VmParams) -> Result<Arc<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::call("KVM_CREATE_VM", e))?;
        // Memory first: once the irqchip and PIT exist, every memslot change waits for an
        // SRCU grace period.
        register_memory(&fd, &params.memory)?;
        fd.set_tss_address(params.private_pages as usize + 0x1000)
            .map_err(|e| Error::call("KVM_SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(params.private_pages)
            .map_err(|e| Error::call("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| Error::call("KVM_CREATE_IRQCHIP", e))?;
        // A dummy speaker port (0x61) lets the guest gate PIT channel 2 to calibrate its TSC.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| Error::call("KVM_CREATE_PIT2", e))?;
        Ok(Arc::new(KvmVm {
            _memory: params.memory.clone(),
            fd: Arc::new(fd),
            kvm: self.kvm.clone(),
            routing: Arc::new(Mutex::new(GsiRouting::new())),
            paused_clock: Mutex::new(None),
            msr_list: OnceLock::new(),
        }))
    }
}

fn register_memory(fd: &VmFd, mem: &GuestMemory) -> Result<()> {
    set_memory_flags(fd, mem, 0)
}

/// (Re-)register every RAM region as a memory slot with `flags` (0, or
/// `KVM_MEM_LOG_DIRTY_PAGES` to log the slot's dirty pages: Linux
/// `Documentation/virt/kvm/api.rst`, 4.35 KVM_SET_USER_MEMORY_REGION).
fn set_memory_flags(fd: &VmFd, mem: &GuestMemory, flags: u32) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`; the VM keeps a clone of `mem`, so
        // the mapping outlives the memslot. KVM only accesses it on the guest's behalf.
        unsafe { fd.set_user_memory_region(region_desc) }
            .map_err(|e| Error::call("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// A KVM virtual machine.
pub struct KvmVm {
    /// Keeps the guest RAM mapped for as long as KVM may touch it.
    _memory: GuestMemory,
    fd: Arc<VmFd>,
    /// The system fd, for KVM_GET_SUPPORTED_CPUID (asked when needed: it takes about a
    /// millisecond, and the VMM overlaps it with memory registration).
    kvm: Arc<Kvm>,
    /// The GSI routing table, shared with the MSI vectors that change it.
    routing: Arc<Mutex<GsiRouting>>,
    /// kvmclock while the VM is paused (`Vm::pause_clock`).
    paused_clock: Mutex<Option<u64>>,
    /// The MSRs a snapshot saves: KVM_GET_MSR_INDEX_LIST, asked once.
    msr_list: OnceLock<Arc<Vec<u32>>>,
}

impl KvmVm {
    fn msr_list(&self) -> Arc<Vec<u32>> {
        self.msr_list
            .get_or_init(|| {
                let mut list: Vec<u32> = match self.kvm.get_msr_index_list() {
                    Ok(l) => l.as_slice().to_vec(),
                    Err(e) => {
                        tracing::warn!("KVM_GET_MSR_INDEX_LIST: {e}; saving no MSRs");
                        Vec::new()
                    }
                };
                // The TSC first: KVM takes later TSC-relative MSRs (TSC_DEADLINE) against it.
                list.sort_by_key(|&i| i != IA32_TSC);
                Arc::new(list)
            })
            .clone()
    }
}

/// IA32_TIME_STAMP_COUNTER.
const IA32_TSC: u32 = 0x10;

impl Vm for KvmVm {
    fn enable_dirty_log(&self) -> Result<()> {
        set_memory_flags(
            &self.fd,
            &self._memory,
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        )?;
        // The log starts now: drop what the flag change may have collected.
        self.take_dirty_log().map(|_| ())
    }

    fn disable_dirty_log(&self) -> Result<()> {
        set_memory_flags(&self.fd, &self._memory, 0)
    }

    /// `KVM_GET_DIRTY_LOG` on every slot (api.rst 4.8): KVM returns the slot's bitmap and
    /// write-protects the pages again, flushing the TLBs before the ioctl returns.
    fn take_dirty_log(&self) -> Result<Vec<DirtyBitmap>> {
        self._memory
            .iter()
            .enumerate()
            .map(|(slot, r)| {
                self.fd
                    .get_dirty_log(slot as u32, r.len() as usize)
                    .map_err(|e| Error::call("KVM_GET_DIRTY_LOG", e))
            })
            .collect()
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::call("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid.as_slice().iter().map(cpuid_from_kvm).collect())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(|e| Error::call("KVM_CREATE_VCPU", e))?;
        install_kick_handler()?;
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            kicker: Arc::new(KvmKicker::default()),
            msr_list: self.msr_list(),
        }))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        Ok(Arc::new(KvmIrqLine {
            vm: self.fd.clone(),
            gsi,
        }))
    }

    fn signal_msi(&self, msi: MsiMessage) -> Result<()> {
        let m = kvm_bindings::kvm_msi {
            address_lo: msi.address as u32,
            address_hi: (msi.address >> 32) as u32,
            data: msi.data,
            ..Default::default()
        };
        self.fd
            .signal_msi(m)
            .map(|_| ())
            .map_err(|e| Error::call("KVM_SIGNAL_MSI", e))
    }

    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>> {
        let gsi = lock(&self.routing).allocate()?;
        let event = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(e) => {
                lock(&self.routing).release(gsi);
                return Err(Error::call("eventfd", e));
            }
        };
        if let Err(e) = self.fd.register_irqfd(&event, gsi) {
            lock(&self.routing).release(gsi);
            return Err(Error::call("KVM_IRQFD", e));
        }
        Ok(Arc::new(KvmMsiVector {
            vm: self.fd.clone(),
            routing: self.routing.clone(),
            gsi,
            event,
        }))
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> Result<bool> {
        let addr = kvm_ioevent_address(addr);
        let r = match datamatch {
            Datamatch::Any => self.fd.register_ioevent(fd, &addr, NoDatamatch),
            Datamatch::U8(v) => self.fd.register_ioevent(fd, &addr, v),
            Datamatch::U16(v) => self.fd.register_ioevent(fd, &addr, v),
            Datamatch::U32(v) => self.fd.register_ioevent(fd, &addr, v),
            Datamatch::U64(v) => self.fd.register_ioevent(fd, &addr, v),
        };
        r.map(|_| true).map_err(|e| Error::call("KVM_IOEVENTFD", e))
    }

    fn save_state(&self) -> Result<VmState> {
        let (pic, ioapic, pit) = crate::kvm_state::get_irqchips(&self.fd)?;
        let clock_ns = match *lock(&self.paused_clock) {
            Some(ns) => ns,
            None => crate::kvm_state::get_clock(&self.fd)?,
        };
        Ok(VmState {
            clock_ns,
            pic: Some(pic),
            ioapic: Some(ioapic),
            pit: Some(pit),
        })
    }

    /// The clock is held at the saved value until [`Vm::resume_clock`].
    fn restore_state(&self, state: &VmState) -> Result<()> {
        match (&state.pic, &state.ioapic, &state.pit) {
            (Some(pic), Some(ioapic), Some(pit)) => {
                crate::kvm_state::set_irqchips(&self.fd, pic, ioapic, pit)?
            }
            _ => {
                return Err(Error::Unsupported(
                    "the state has no in-kernel interrupt controllers (it is not from KVM)".into(),
                ))
            }
        }
        // Held until `resume_clock`, as after `pause_clock`.
        *lock(&self.paused_clock) = Some(state.clock_ns);
        Ok(())
    }

    fn pause_clock(&self) -> Result<()> {
        let mut p = lock(&self.paused_clock);
        if p.is_none() {
            *p = Some(crate::kvm_state::get_clock(&self.fd)?);
        }
        Ok(())
    }

    fn resume_clock(&self) -> Result<()> {
        let mut p = lock(&self.paused_clock);
        if let Some(ns) = *p {
            crate::kvm_state::set_clock(&self.fd, ns)?;
            *p = None;
        }
        Ok(())
    }

    fn unregister_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> Result<()> {
        let addr = kvm_ioevent_address(addr);
        let r = match datamatch {
            Datamatch::Any => self.fd.unregister_ioevent(fd, &addr, NoDatamatch),
            Datamatch::U8(v) => self.fd.unregister_ioevent(fd, &addr, v),
            Datamatch::U16(v) => self.fd.unregister_ioevent(fd, &addr, v),
            Datamatch::U32(v) => self.fd.unregister_ioevent(fd, &addr, v),
            Datamatch::U64(v) => self.fd.unregister_ioevent(fd, &addr, v),
        };
        match r {
            // Not registered (ENOENT): nothing to undo.
            Err(e) if e.errno() == libc::ENOENT => Ok(()),
            r => r.map_err(|e| Error::call("KVM_IOEVENTFD (deassign)", e)),
        }
    }
}

fn kvm_ioevent_address(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(port) => kvm_ioctls::IoEventAddress::Pio(u64::from(port)),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---- GSI routing and MSI vectors ---------------------------------------------------------------

/// GSIs of the in-kernel IOAPIC's pins; KVM routes 0-15 to the PIC pair as well.
const IOAPIC_PINS: u32 = 24;
/// The first GSI handed to MSI vectors, and one past the last (KVM_MAX_IRQ_ROUTES is 4096;
/// GSI numbers must stay below it).
const MSI_GSI_BASE: u32 = IOAPIC_PINS;
const MSI_GSI_END: u32 = 4096;

/// vireo's copy of the VM's GSI routing table. `KVM_SET_GSI_ROUTING` replaces the whole table,
/// so it always carries KVM's default routes for GSIs 0-23 (what `KVM_CREATE_IRQCHIP` sets
/// up: GSI n to IOAPIC pin n, and for n < 16 also to PIC pin n % 8 of the master or slave)
/// followed by one MSI route per connected vector.
struct GsiRouting {
    /// Connected MSI vectors: GSI → message.
    msi: BTreeMap<u32, MsiMessage>,
    /// GSIs owned by live vectors (connected or not).
    used: std::collections::BTreeSet<u32>,
}

impl GsiRouting {
    fn new() -> Self {
        GsiRouting {
            msi: BTreeMap::new(),
            used: std::collections::BTreeSet::new(),
        }
    }

    /// The lowest free GSI for an MSI vector.
    fn allocate(&mut self) -> Result<u32> {
        let gsi = (MSI_GSI_BASE..MSI_GSI_END)
            .find(|g| !self.used.contains(g))
            .ok_or_else(|| Error::Unsupported("no free GSI for another MSI vector".into()))?;
        self.used.insert(gsi);
        Ok(gsi)
    }

    fn release(&mut self, gsi: u32) {
        self.used.remove(&gsi);
        self.msi.remove(&gsi);
    }

    /// The routing table as KVM takes it.
    fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::with_capacity(IOAPIC_PINS as usize + 16 + self.msi.len());
        for gsi in 0..IOAPIC_PINS {
            v.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 {
                v.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                v.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        for (&gsi, msg) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            v.push(e);
        }
        v
    }

    /// Hand the table to KVM.
    fn commit(&self, vm: &VmFd) -> Result<()> {
        let entries = self.entries();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| Error::Unsupported(format!("GSI routing table: {e:?}")))?;
        vm.set_gsi_routing(&table)
            .map_err(|e| Error::call("KVM_SET_GSI_ROUTING", e))
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

/// An MSI vector on KVM: its own GSI, an MSI route when connected, and an irqfd on that GSI.
struct KvmMsiVector {
    vm: Arc<VmFd>,
    routing: Arc<Mutex<GsiRouting>>,
    gsi: u32,
    event: EventFd,
}

impl MsiVector for KvmMsiVector {
    fn set_route(&self, msg: Option<MsiMessage>) -> Result<()> {
        let mut r = lock(&self.routing);
        let old = r.msi.get(&self.gsi).copied();
        if old == msg {
            return Ok(());
        }
        match msg {
            Some(m) => r.msi.insert(self.gsi, m),
            None => r.msi.remove(&self.gsi),
        };
        let result = r.commit(&self.vm);
        if result.is_err() {
            // Keep our copy equal to what KVM has.
            match old {
                Some(m) => r.msi.insert(self.gsi, m),
                None => r.msi.remove(&self.gsi),
            };
        }
        result
    }

    fn trigger(&self) {
        // The counter saturates only after 2^64 - 2 unread writes; EAGAIN then means an
        // interrupt is already pending, which is what the caller wants anyway.
        if let Err(e) = self.event.write(1) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::warn!("irqfd of GSI {}: {e}", self.gsi);
            }
        }
    }
}

impl Drop for KvmMsiVector {
    fn drop(&mut self) {
        if let Err(e) = self.vm.unregister_irqfd(&self.event, self.gsi) {
            tracing::warn!("KVM_IRQFD (deassign) GSI {}: {e}", self.gsi);
        }
        let mut r = lock(&self.routing);
        let connected = r.msi.contains_key(&self.gsi);
        r.release(self.gsi);
        if connected {
            if let Err(e) = r.commit(&self.vm) {
                tracing::warn!("removing the route of GSI {}: {e}", self.gsi);
            }
        }
    }
}

struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, level: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, level) {
            tracing::warn!("KVM_IRQ_LINE gsi {}: {e}", self.gsi);
        }
    }
}

// ---- kicking a running vCPU -------------------------------------------------------------------

thread_local! {
    /// The `kvm_run` area of the vCPU this thread is running right now (null between runs).
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = RUNNING.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` is the mmap'd kvm_run of the vCPU this thread is inside KVM_RUN for (it
        // is cleared before `run()` returns); setting immediate_exit makes KVM_RUN return EINTR
        // even if the signal arrived just before the ioctl.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| Error::call("sigaction", std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

#[derive(Default)]
struct KvmKicker {
    kicked: AtomicBool,
    /// pthread_t of the thread that last entered `run` (0: none yet).
    thread: AtomicU64,
}

impl Kicker for KvmKicker {
    fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        let t = self.thread.load(Ordering::SeqCst);
        if t != 0 {
            // SAFETY: pthread_kill with a thread id recorded by the vCPU thread; the kick signal
            // has a handler installed, so it cannot terminate the process.
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }
}

// ---- vCPU -------------------------------------------------------------------------------------

/// A KVM vCPU.
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    kicker: Arc<KvmKicker>,
    /// The MSRs `save_state` reads.
    msr_list: Arc<Vec<u32>>,
}

enum Step {
    Exit(VmExit),
    PortIo,
    Continue,
}

impl KvmVcpu {
    /// Complete a KVM_EXIT_IO, which may be a string instruction with `count` elements.
    fn port_io(&mut self, io: &dyn IoHandler) {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the active union member.
        let pio = unsafe { run.__bindgen_anon_1.io };
        let size = pio.size as usize;
        let total = size * pio.count as usize;
        let base = run as *mut kvm_run as *mut u8;
        // SAFETY: the kernel places `count * size` data bytes at `data_offset` inside the kvm_run
        // mapping (which is at least one page and fully mapped for the vCPU's lifetime).
        let data =
            unsafe { std::slice::from_raw_parts_mut(base.add(pio.data_offset as usize), total) };
        for chunk in data.chunks_mut(size.max(1)) {
            if pio.direction as u32 == kvm_bindings::KVM_EXIT_IO_IN {
                io.pio_read(pio.port, chunk);
            } else {
                io.pio_write(pio.port, chunk);
            }
        }
    }

    /// Describe a KVM_EXIT_INTERNAL_ERROR: its suberror and where the guest was.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event failure",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "?".into());
        format!(
            "KVM_EXIT_INTERNAL_ERROR (suberror {}: {what}) at RIP {rip}",
            internal.suberror
        )
    }

    fn step(&mut self, io: &dyn IoHandler) -> Result<Step> {
        let id = self.id;
        let failure = |reason: String| Error::GuestFailure { vcpu: id, reason };
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => Step::PortIo,
                VcpuExit::MmioRead(addr, data) => {
                    io.mmio_read(addr, data);
                    Step::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    io.mmio_write(addr, data);
                    Step::Continue
                }
                VcpuExit::Hlt => Step::Exit(VmExit::Hlt),
                VcpuExit::Shutdown => Step::Exit(VmExit::Shutdown),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Step::Exit(VmExit::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => Step::Exit(VmExit::Reset),
                    other => return Err(failure(format!("unexpected system event {other}"))),
                },
                VcpuExit::Intr => Step::Exit(VmExit::Interrupted),
                VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => Step::Continue,
                VcpuExit::InternalError => return Err(failure(self.internal_error())),
                VcpuExit::FailEntry(reason, cpu) => {
                    return Err(failure(format!(
                        "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on host CPU {cpu}"
                    )))
                }
                other => return Err(failure(format!("unexpected exit {other:?}"))),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Step::Exit(VmExit::Interrupted))
            }
            Err(e) => Err(Error::call(
                "KVM_RUN",
                std::io::Error::from_raw_os_error(e.errno()),
            )),
        }
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VmExit> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        self.kicker.thread.store(me, Ordering::SeqCst);
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        RUNNING.with(|r| r.set(run_ptr));
        let result = loop {
            if self.kicker.kicked.swap(false, Ordering::SeqCst) {
                break Ok(VmExit::Interrupted);
            }
            match self.step(io) {
                Ok(Step::PortIo) => self.port_io(io),
                Ok(Step::Continue) => {}
                Ok(Step::Exit(exit)) => break Ok(exit),
                Err(e) => break Err(e),
            }
        };
        RUNNING.with(|r| r.set(ptr::null_mut()));
        self.fd.set_kvm_immediate_exit(0);
        if matches!(result, Ok(VmExit::Interrupted)) {
            self.kicker.kicked.store(false, Ordering::SeqCst);
        }
        result
    }

    fn kicker(&self) -> Arc<dyn Kicker> {
        self.kicker.clone()
    }

    fn regs(&self) -> Result<Regs> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| Error::call("KVM_GET_REGS", e))?;
        Ok(regs_from_kvm(&r))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&regs_to_kvm(regs))
            .map_err(|e| Error::call("KVM_SET_REGS", e))
    }

    fn sregs(&self) -> Result<Sregs> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", e))?;
        Ok(sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()> {
        // Keep KVM's pending-interrupt bitmap: only the architectural registers change.
        let mut s = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", e))?;
        sregs_to_kvm(sregs, &mut s);
        self.fd
            .set_sregs(&s)
            .map_err(|e| Error::call("KVM_SET_SREGS", e))
    }

    fn fpu(&self) -> Result<FpuState> {
        let f = self
            .fd
            .get_fpu()
            .map_err(|e| Error::call("KVM_GET_FPU", e))?;
        Ok(FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        })
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        let f = kvm_fpu {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd
            .set_fpu(&f)
            .map_err(|e| Error::call("KVM_SET_FPU", e))
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<Msr>> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::Unsupported(format!("MSRs: {e:?}")))?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::call("KVM_GET_MSRS", e))?;
        Ok(msrs.as_slice()[..n]
            .iter()
            .map(|e| Msr::new(e.index, e.data))
            .collect())
    }

    fn set_msrs(&mut self, msrs: &[Msr]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let k =
            Msrs::from_entries(&entries).map_err(|e| Error::Unsupported(format!("MSRs: {e:?}")))?;
        let n = self
            .fd
            .set_msrs(&k)
            .map_err(|e| Error::call("KVM_SET_MSRS", e))?;
        if n != entries.len() {
            let bad = entries.get(n).map(|e| e.index).unwrap_or(0);
            return Err(Error::Unsupported(format!("KVM refused MSR {bad:#x}")));
        }
        Ok(())
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()> {
        let k: Vec<kvm_bindings::kvm_cpuid_entry2> = entries.iter().map(cpuid_to_kvm).collect();
        let cpuid =
            CpuId::from_entries(&k).map_err(|e| Error::Unsupported(format!("CPUID: {e:?}")))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::call("KVM_SET_CPUID2", e))
    }

    fn lapic(&self) -> Result<LapicState> {
        let l = self
            .fd
            .get_lapic()
            .map_err(|e| Error::call("KVM_GET_LAPIC", e))?;
        Ok(LapicState {
            regs: l.regs.iter().map(|&b| b as u8).collect(),
        })
    }

    fn set_lapic(&mut self, lapic: &LapicState) -> Result<()> {
        let mut l = kvm_lapic_state::default();
        for (dst, src) in l.regs.iter_mut().zip(lapic.regs.iter()) {
            *dst = *src as _;
        }
        self.fd
            .set_lapic(&l)
            .map_err(|e| Error::call("KVM_SET_LAPIC", e))
    }

    fn mp_state(&self) -> Result<MpState> {
        let s = self
            .fd
            .get_mp_state()
            .map_err(|e| Error::call("KVM_GET_MP_STATE", e))?;
        Ok(match s.mp_state {
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
            kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            kvm_bindings::KVM_MP_STATE_HALTED => MpState::Halted,
            kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            _ => MpState::Runnable,
        })
    }

    fn set_mp_state(&mut self, state: MpState) -> Result<()> {
        let mp_state = match state {
            MpState::Runnable => kvm_bindings::KVM_MP_STATE_RUNNABLE,
            MpState::Uninitialized => kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            MpState::InitReceived => kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
            MpState::Halted => kvm_bindings::KVM_MP_STATE_HALTED,
            MpState::SipiReceived => kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED,
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(|e| Error::call("KVM_SET_MP_STATE", e))
    }

    fn save_state(&mut self) -> Result<VcpuState> {
        use crate::kvm_state as ks;
        let mp_state = self.mp_state()?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = self.fpu()?;
        let xsave = Some(ks::get_xsave(&self.fd)?);
        let xcrs = ks::get_xcrs(&self.fd)?;
        let debug = ks::get_debug(&self.fd)?;
        let lapic = self.lapic()?;
        let cpuid = ks::get_cpuid(&self.fd)?;
        let msrs = ks::get_msrs(&self.fd, &self.msr_list)?;
        let events = ks::get_events(&self.fd)?;
        Ok(VcpuState {
            id: self.id,
            regs,
            sregs,
            fpu,
            msrs,
            lapic,
            mp_state,
            cpuid,
            events,
            debug,
            xcrs,
            xsave,
        })
    }

    fn restore_state(&mut self, s: &VcpuState) -> Result<()> {
        use crate::kvm_state as ks;
        // The order KVM needs: CPUID before anything that depends on it, the LAPIC before
        // MSRs such as TSC_DEADLINE, events last.
        if !s.cpuid.is_empty() {
            self.set_cpuid(&s.cpuid)?;
        }
        self.set_mp_state(s.mp_state)?;
        self.set_regs(&s.regs)?;
        let mut k = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", e))?;
        sregs_to_kvm(&s.sregs, &mut k);
        // Pending external interrupts are carried by the events, not the sregs bitmap.
        k.interrupt_bitmap = [0; 4];
        self.fd
            .set_sregs(&k)
            .map_err(|e| Error::call("KVM_SET_SREGS", e))?;
        match &s.xsave {
            Some(x) => ks::set_xsave(&self.fd, x)?,
            None => self.set_fpu(&s.fpu)?,
        }
        ks::set_xcrs(&self.fd, &s.xcrs)?;
        ks::set_debug(&self.fd, &s.debug)?;
        self.set_lapic(&s.lapic)?;
        ks::set_msrs_lenient(&self.fd, &s.msrs)?;
        self.fd
            .set_vcpu_events(&ks::events_to_kvm(&s.events))
            .map_err(|e| Error::call("KVM_SET_VCPU_EVENTS", e))
    }
}

// ---- conversions ------------------------------------------------------------------------------

fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: s.avl as u8,
        unusable: s.unusable as u8,
        padding: 0,
    }
}

fn sregs_from_kvm(s: &kvm_sregs) -> Sregs {
    Sregs {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

fn sregs_to_kvm(s: &Sregs, k: &mut kvm_sregs) {
    k.cs = seg_to_kvm(&s.cs);
    k.ds = seg_to_kvm(&s.ds);
    k.es = seg_to_kvm(&s.es);
    k.fs = seg_to_kvm(&s.fs);
    k.gs = seg_to_kvm(&s.gs);
    k.ss = seg_to_kvm(&s.ss);
    k.tr = seg_to_kvm(&s.tr);
    k.ldt = seg_to_kvm(&s.ldt);
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

pub(crate) fn cpuid_from_kvm(e: &kvm_bindings::kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn cpuid_to_kvm(e: &CpuidEntry) -> kvm_bindings::kvm_cpuid_entry2 {
    kvm_bindings::kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: if e.flags & CPUID_FLAG_SIGNIFICANT_INDEX != 0 {
            kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_round_trip() {
        let s = Segment {
            base: 0x1234,
            limit: 0xfffff,
            selector: 0x10,
            type_: 11,
            present: true,
            dpl: 3,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        assert_eq!(seg_from_kvm(&seg_to_kvm(&s)), s);
    }

    #[test]
    fn routing_table_keeps_the_default_routes() {
        let mut r = GsiRouting::new();
        let a = r.allocate().unwrap();
        let b = r.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        r.msi.insert(
            b,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        let e = r.entries();
        // 24 IOAPIC routes + 16 PIC routes + one MSI route.
        assert_eq!(e.len(), 24 + 16 + 1);
        let pic: Vec<_> = e
            .iter()
            .filter(|x| x.type_ == KVM_IRQ_ROUTING_IRQCHIP && x.gsi == 9)
            .map(unsafe_free_irqchip)
            .collect();
        assert_eq!(
            pic,
            vec![(KVM_IRQCHIP_IOAPIC, 9), (KVM_IRQCHIP_PIC_SLAVE, 1)]
        );
        let msi = e.iter().find(|x| x.type_ == KVM_IRQ_ROUTING_MSI).unwrap();
        assert_eq!(msi.gsi, 25);
        // SAFETY: type_ is KVM_IRQ_ROUTING_MSI, so `msi` is the active member (test only).
        let m = unsafe { msi.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
        // A released GSI is handed out again, lowest first.
        r.release(a);
        assert_eq!(r.allocate().unwrap(), 24);
        assert_eq!(r.allocate().unwrap(), 26);
    }

    fn unsafe_free_irqchip(e: &kvm_irq_routing_entry) -> (u32, u32) {
        // SAFETY: the caller filtered on KVM_IRQ_ROUTING_IRQCHIP, so `irqchip` is active.
        let c = unsafe { e.u.irqchip };
        (c.irqchip, c.pin)
    }

    #[test]
    fn datamatch_compares_width_and_value() {
        assert!(Datamatch::Any.matches(&[1, 2, 3]));
        assert!(Datamatch::U16(0x0201).matches(&[1, 2]));
        assert!(!Datamatch::U16(0x0201).matches(&[1, 2, 0, 0]));
        assert!(!Datamatch::U32(5).matches(&[6, 0, 0, 0]));
        assert!(Datamatch::U64(u64::MAX).matches(&[0xff; 8]));
        assert!(!Datamatch::U8(0).matches(&[]));
    }

    #[test]
    fn open_hints_name_the_fix() {
        let e = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(kvm_open_hint(&e).contains("usermod"));
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert!(kvm_open_hint(&e).contains("modprobe"));
    }
}
