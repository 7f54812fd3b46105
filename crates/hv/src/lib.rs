//! The hypervisor interface: `Hypervisor` → `Vm` → `Vcpu::run()` → `VmExit`.
//!
//! Everything above this crate (boot code, devices, the VMM) talks to these traits and to the
//! backend-neutral state types in [`state`]; no KVM type leaves this crate. Backends:
//! [`kvm`] (hardware-assisted, VT-x / AMD-V through `/dev/kvm`).

pub mod emu;
pub mod halt_poll;
pub mod host;
pub mod irqchip;
pub mod kvm;
mod kvm_state;
pub mod state;

use std::sync::Arc;

pub use irqchip::{CpuEvent, GuestClock, UserIrqChip};
pub use state::{
    CpuidEntry, DebugRegs, DescriptorTable, FpuState, IoapicState, LapicState, MpState, Msr,
    PicState, PitChannelState, PitState, Regs, Segment, Sregs, VcpuEvents, VcpuState, VmState, Xcr,
};
/// The eventfd type of [`MsiVector`] and [`Vm::register_ioevent`] (a Linux `eventfd(2)`).
pub use vmm_sys_util::eventfd::EventFd;

/// Guest physical memory as every backend and device sees it. Each region carries a dirty
/// bitmap (`vm-memory`'s `AtomicBitmap`, one bit per 4 KiB page) that every write made
/// through `vm-memory` marks: the VMM's own writes (virtio DMA, the loader), which neither
/// KVM's dirty log nor the emulator sees. Live migration reads and clears it
/// ([`take_vmm_dirty`]).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A dirty-page bitmap of one RAM region: bit `i % 64` of word `i / 64` is page `i` of the
/// region (4 KiB pages), the layout of `KVM_GET_DIRTY_LOG`.
pub type DirtyBitmap = Vec<u64>;

/// Page size of the dirty logs.
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// Read and clear the pages written through `vm-memory` (by the VMM, not by vCPUs) since the
/// last call, one bitmap per region in `mem`'s order.
pub fn take_vmm_dirty(mem: &GuestMemory) -> Vec<DirtyBitmap> {
    use vm_memory::GuestMemoryBackend;
    mem.iter()
        .map(|r| {
            let region: &vm_memory::MmapRegion<_> = r;
            region.bitmap().get_and_reset()
        })
        .collect()
}

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend is not available on this host (e.g. no `/dev/kvm`); the text says how to fix it.
    #[error("{0}")]
    Unavailable(String),
    /// A hypervisor call failed.
    #[error("{op}: {source}")]
    Call {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The guest stopped in a way the backend cannot continue from.
    #[error("vCPU {vcpu}: {reason}")]
    GuestFailure { vcpu: u32, reason: String },
    /// A request the backend does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn call(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        Error::Call {
            op,
            source: e.into(),
        }
    }
}

/// Where a vCPU's port-I/O and MMIO accesses go. The VMM's device bus implements this; a
/// backend calls it from inside [`Vcpu::run`] for every access that leaves the CPU.
pub trait IoHandler: Sync {
    /// An `IN` from `port`; `data.len()` is the access size (1, 2 or 4).
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// An `OUT` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A read of guest-physical `addr` that is not RAM.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A write of guest-physical `addr` that is not RAM.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned. Port I/O and MMIO do not appear here: they are handled through
/// the [`IoHandler`] while the vCPU runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The vCPU executed `HLT` and the backend does not wait for interrupts itself.
    Hlt,
    /// Triple fault or equivalent: the platform resets (SDM Vol. 3A §6.15, "shutdown").
    Shutdown,
    /// The guest asked the platform for a reset through a hypervisor system event.
    Reset,
    /// The guest asked the platform to power off through a hypervisor system event.
    PowerOff,
    /// [`Kicker::kick`] was called (or a signal arrived): the caller decides what to do next.
    Interrupted,
}

/// What a VM is created with.
#[derive(Clone)]
pub struct VmParams {
    /// Guest RAM. The backend makes it visible to the guest as part of creating the VM (on
    /// KVM before the in-kernel devices: that order is several milliseconds faster).
    pub memory: GuestMemory,
    /// Number of vCPUs that will be created.
    pub vcpus: u32,
    /// The userspace interrupt controllers, for backends that have none in the kernel
    /// ([`Hypervisor::needs_user_irqchip`]); `None` otherwise.
    pub user_irqchip: Option<Arc<dyn UserIrqChip>>,
    /// Guest-physical base of four reserved, non-RAM pages that the backend may use for itself
    /// (KVM on Intel: the real-mode TSS and the identity-map page). `arch` picks the address.
    pub private_pages: u64,
}

/// A hypervisor backend.
pub trait Hypervisor: Send + Sync {
    /// Short name, as given to `--accel`.
    fn name(&self) -> &'static str;
    /// The largest number of vCPUs a VM may have on this backend.
    fn max_vcpus(&self) -> u32;
    /// True when the VMM must supply the interrupt controllers, PIT included, as devices
    /// (`VmParams::user_irqchip`); false when the backend has them built in.
    fn needs_user_irqchip(&self) -> bool {
        false
    }
    /// True when guest instructions are emulated in software, interpreted or translated (a
    /// guest CPU several times slower than the host's): devices may then trade a little
    /// latency for fewer interrupts.
    fn emulated_cpu(&self) -> bool {
        false
    }
    /// Create an empty VM with its interrupt controllers and timer.
    fn create_vm(&self, params: &VmParams) -> Result<Arc<dyn Vm>>;
}

/// An MSI message (PCI Local Bus Spec 3.0 §6.8; Intel SDM Vol. 3A §11.11).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// A guest address whose writes signal an eventfd (a queue notification, virtio 1.2 §4.1.4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoEventAddress {
    /// A port.
    Pio(u16),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// Which writes to an [`IoEventAddress`] signal the eventfd: any write (of any width), or only
/// a write of exactly this width and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Datamatch {
    Any,
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
}

impl Datamatch {
    /// True when a write of `data` (little-endian, its length is the access width) matches.
    pub fn matches(&self, data: &[u8]) -> bool {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(v);
        match *self {
            Datamatch::Any => true,
            Datamatch::U8(x) => data.len() == 1 && value == u64::from(x),
            Datamatch::U16(x) => data.len() == 2 && value == u64::from(x),
            Datamatch::U32(x) => data.len() == 4 && value == u64::from(x),
            Datamatch::U64(x) => data.len() == 8 && value == x,
        }
    }
}

/// One MSI a device owns (an MSI-X table entry, PCI Local Bus Spec 3.0 §6.8.2). The device
/// points it at a message when the guest programs and unmasks the entry, and triggers it from
/// any thread; the backend delivers it without the device naming the backend: on KVM a GSI of
/// its own, routed with `KVM_SET_GSI_ROUTING` and fired through an irqfd; on the emulator the
/// userspace interrupt controller's `send_msi`.
pub trait MsiVector: Send + Sync {
    /// Point the vector at `msg`, or disconnect it (`None`: later triggers are dropped). The
    /// message is what the guest wrote: a bad address or data is delivered as the
    /// interrupt controller would treat it, never refused here.
    fn set_route(&self, msg: Option<MsiMessage>) -> Result<()>;
    /// Send the MSI the route names now (nothing when disconnected). Never blocks on the guest.
    fn trigger(&self);
}

/// A virtual machine: memory, interrupt routing, vCPUs.
pub trait Vm: Send + Sync {
    /// CPUID leaves the backend can offer (before per-vCPU adjustment by `arch`).
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    /// Create vCPU `id` (also its initial APIC ID).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// An interrupt line into the interrupt controllers (a GSI: ISA IRQ 0–15, IOAPIC 16–23).
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;
    /// Deliver an MSI.
    fn signal_msi(&self, msi: MsiMessage) -> Result<()>;
    /// A new MSI vector, disconnected until [`MsiVector::set_route`]. Dropping it frees what
    /// the backend allocated for it (a GSI and an irqfd on KVM).
    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>> {
        Err(Error::Unsupported("MSI vectors".into()))
    }
    /// Ask the backend to signal `fd` on guest writes to `addr` that match `datamatch`, without
    /// going through the [`IoHandler`]. Returns true when the backend does so (KVM:
    /// ioeventfd, the write never leaves the kernel); false when it does not (the emulator),
    /// in which case the write still reaches the `IoHandler` and the device signals `fd`
    /// itself. Either way the device must handle such a write arriving through the bus.
    fn register_ioevent(
        &self,
        _addr: IoEventAddress,
        _datamatch: Datamatch,
        _fd: &EventFd,
    ) -> Result<bool> {
        Ok(false)
    }
    /// Undo [`Vm::register_ioevent`] with the same arguments (a moved BAR, a reset device).
    /// Unregistering what is not registered is not an error.
    fn unregister_ioevent(
        &self,
        _addr: IoEventAddress,
        _datamatch: Datamatch,
        _fd: &EventFd,
    ) -> Result<()> {
        Ok(())
    }
    /// The backend's VM-wide state: the guest clock, and the interrupt controllers and PIT
    /// when the backend has them built in. Call with every vCPU stopped.
    fn save_state(&self) -> Result<VmState> {
        Err(Error::Unsupported("saving VM state".into()))
    }
    /// Load what [`Vm::save_state`] gave (before the vCPUs' state is restored). The clock
    /// then stands at the saved value until [`Vm::resume_clock`].
    fn restore_state(&self, _state: &VmState) -> Result<()> {
        Err(Error::Unsupported("restoring VM state".into()))
    }
    /// Stop the guest clock while the VM is paused, so the guest does not see the pause as
    /// time passing (KVM: kvmclock is held with KVM_GET/SET_CLOCK).
    fn pause_clock(&self) -> Result<()> {
        Ok(())
    }
    /// Let the guest clock run again from where [`Vm::pause_clock`] stopped it.
    fn resume_clock(&self) -> Result<()> {
        Ok(())
    }
    /// Start logging the pages the vCPUs write (KVM: `KVM_MEM_LOG_DIRTY_PAGES` on every
    /// memory slot; the emulator write-protects its pages in software). The log starts empty.
    fn enable_dirty_log(&self) -> Result<()> {
        Err(Error::Unsupported("dirty-page logging".into()))
    }
    /// Stop logging (and forget the log).
    fn disable_dirty_log(&self) -> Result<()> {
        Ok(())
    }
    /// The pages the vCPUs wrote since logging started or since the last call, one bitmap per
    /// RAM region in the order of `VmParams::memory`; the log restarts empty. When this
    /// returns, every write counted in it is visible in guest memory, and every later write
    /// is counted in the next call (KVM: `KVM_GET_DIRTY_LOG`).
    fn take_dirty_log(&self) -> Result<Vec<DirtyBitmap>> {
        Err(Error::Unsupported("dirty-page logging".into()))
    }
}

/// One interrupt input pin, as a device sees it.
pub trait IrqLine: Send + Sync {
    /// Drive the line high or low.
    fn set_level(&self, level: bool);
    /// An edge: raise and lower the line.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// Makes a running [`Vcpu::run`] return [`VmExit::Interrupted`] soon; callable from any thread.
pub trait Kicker: Send + Sync {
    fn kick(&self);
}

/// A virtual CPU. `run` executes guest code until something the caller must see happens.
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    /// Run the guest; port I/O and MMIO go to `io`.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VmExit>;
    /// A handle that interrupts `run` from another thread.
    fn kicker(&self) -> Arc<dyn Kicker>;

    fn regs(&self) -> Result<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    fn sregs(&self) -> Result<Sregs>;
    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()>;
    fn fpu(&self) -> Result<FpuState>;
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()>;
    /// Read the MSRs named by `indices`; absent ones are left out of the answer.
    fn msrs(&self, indices: &[u32]) -> Result<Vec<Msr>>;
    fn set_msrs(&mut self, msrs: &[Msr]) -> Result<()>;
    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()>;
    fn lapic(&self) -> Result<LapicState>;
    fn set_lapic(&mut self, lapic: &LapicState) -> Result<()>;
    fn mp_state(&self) -> Result<MpState>;
    fn set_mp_state(&mut self, state: MpState) -> Result<()>;
    /// Everything about this vCPU (registers, FPU/XSAVE, MSRs, LAPIC, pending events, MP
    /// state, CPUID), for snapshots and migration. Call from the thread that runs the vCPU,
    /// while it is not running.
    fn save_state(&mut self) -> Result<VcpuState> {
        Err(Error::Unsupported("saving vCPU state".into()))
    }
    /// Load what [`Vcpu::save_state`] gave (on the same backend).
    fn restore_state(&mut self, _state: &VcpuState) -> Result<()> {
        Err(Error::Unsupported("restoring vCPU state".into()))
    }
}

/// Ask the host kernel for transparent huge pages behind guest RAM (`MADV_HUGEPAGE`), as
/// QEMU and Cloud Hypervisor (`thp=on`) do: fewer host TLB misses for vCPUs, the emulator
/// and devices copying into guest memory. Advisory: a host without THP keeps 4 KiB pages.
pub fn advise_huge_pages(mem: &GuestMemory) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        let Ok(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: the range is exactly one mapping `mem` owns; MADV_HUGEPAGE changes only how
        // the kernel backs it, never its contents or whether it is mapped.
        let rc = unsafe { libc::madvise(host.cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                "madvise(MADV_HUGEPAGE): {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The `VmFlags` of the mapping that holds host address `at` (`/proc/self/smaps`), for tests
/// of `madvise`.
#[cfg(test)]
fn vm_flags_of(at: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut holds = false;
    for l in smaps.lines() {
        if let Some(flags) = l.strip_prefix("VmFlags:") {
            if holds {
                return Some(flags.to_string());
            }
        } else if let Some((a, rest)) = l.split_once('-') {
            let b = rest.split_whitespace().next().unwrap_or("");
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                holds = (a..b).contains(&at);
            }
        }
    }
    None
}

/// Assert that the mapping holding host address `at` carries MADV_HUGEPAGE (`hg` in its
/// `VmFlags`), on a host kernel with transparent huge pages (else it says it skips).
#[cfg(test)]
pub(crate) fn assert_advised_huge(at: usize) {
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        eprintln!("skipped: this host kernel has no transparent huge pages");
        return;
    }
    let flags = vm_flags_of(at).unwrap_or_else(|| panic!("no mapping holds {at:#x}"));
    assert!(
        flags.split_whitespace().any(|f| f == "hg"),
        "{at:#x}: {flags}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    /// The kernel records MADV_HUGEPAGE as the `hg` flag of the mapping that holds each
    /// region (`/proc/self/smaps`).
    #[test]
    fn guest_ram_is_advised_huge_pages() {
        let mem = GuestMemory::from_ranges(&[
            (vm_memory::GuestAddress(0), 4 << 20),
            (vm_memory::GuestAddress(1 << 32), 4 << 20),
        ])
        .unwrap();
        advise_huge_pages(&mem);
        for r in mem.iter() {
            let at = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap() as usize;
            assert_advised_huge(at);
        }
    }
}
