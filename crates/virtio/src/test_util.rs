//! Fakes shared by the unit tests: guest memory, an interrupt recorder, a VM.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vireo_hv::{
    CpuidEntry, Datamatch, EventFd, GuestMemory, IoEventAddress, IrqLine, MsiMessage, MsiVector,
    Vcpu, Vm,
};
use vm_memory::GuestAddress;

use crate::VirtioInterrupt;

/// Size of the fake guest RAM.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where tests put queues and data.
pub const QUEUE_BASE: u64 = 0x10_0000;
pub const DATA: u64 = 0x40_0000;
/// Descriptor flags for raw chains.
pub const NEXT: u16 = crate::driver::VIRTQ_DESC_F_NEXT;
pub const WRITE: u16 = crate::driver::VIRTQ_DESC_F_WRITE;
pub const INDIRECT: u16 = crate::driver::VIRTQ_DESC_F_INDIRECT;

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Records interrupts per queue, config interrupts and needs-reset.
#[derive(Default)]
pub struct RecordingInterrupt {
    pub queue: Mutex<Vec<usize>>,
    pub config: AtomicUsize,
    pub needs_reset: AtomicBool,
}

impl RecordingInterrupt {
    pub fn queue_interrupts(&self) -> usize {
        self.queue.lock().unwrap().len()
    }
    pub fn reset_requested(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn notify_queue(&self, queue: usize) {
        self.queue.lock().unwrap().push(queue);
    }
    fn notify_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// An MSI vector that records deliveries.
#[derive(Default)]
pub struct FakeVector {
    pub route: Mutex<Option<MsiMessage>>,
    pub delivered: Mutex<Vec<MsiMessage>>,
}

impl MsiVector for FakeVector {
    fn set_route(&self, msg: Option<MsiMessage>) -> vireo_hv::Result<()> {
        *self.route.lock().unwrap() = msg;
        Ok(())
    }
    fn trigger(&self) {
        if let Some(m) = *self.route.lock().unwrap() {
            self.delivered.lock().unwrap().push(m);
        }
    }
}

/// A VM that only hands out MSI vectors and (optionally) takes I/O events "in the kernel".
pub struct FakeVm {
    pub vectors: Mutex<Vec<Arc<FakeVector>>>,
    pub in_kernel: bool,
    pub ioevents: Mutex<Vec<(IoEventAddress, Datamatch)>>,
}

impl FakeVm {
    pub fn new(in_kernel: bool) -> Arc<Self> {
        Arc::new(FakeVm {
            vectors: Mutex::new(Vec::new()),
            in_kernel,
            ioevents: Mutex::new(Vec::new()),
        })
    }
    /// MSIs delivered through vector `v` (in creation order).
    pub fn delivered(&self, v: usize) -> Vec<MsiMessage> {
        self.vectors.lock().unwrap()[v]
            .delivered
            .lock()
            .unwrap()
            .clone()
    }
}

impl Vm for FakeVm {
    fn supported_cpuid(&self) -> vireo_hv::Result<Vec<CpuidEntry>> {
        Ok(Vec::new())
    }
    fn create_vcpu(&self, _id: u32) -> vireo_hv::Result<Box<dyn Vcpu>> {
        Err(vireo_hv::Error::Unsupported("fake".into()))
    }
    fn irq_line(&self, _gsi: u32) -> vireo_hv::Result<Arc<dyn IrqLine>> {
        Err(vireo_hv::Error::Unsupported("fake".into()))
    }
    fn signal_msi(&self, _msi: MsiMessage) -> vireo_hv::Result<()> {
        Ok(())
    }
    fn msi_vector(&self) -> vireo_hv::Result<Arc<dyn MsiVector>> {
        let v = Arc::new(FakeVector::default());
        self.vectors.lock().unwrap().push(v.clone());
        Ok(v)
    }
    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        _fd: &EventFd,
    ) -> vireo_hv::Result<bool> {
        if self.in_kernel {
            self.ioevents.lock().unwrap().push((addr, datamatch));
        }
        Ok(self.in_kernel)
    }
    fn unregister_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        _fd: &EventFd,
    ) -> vireo_hv::Result<()> {
        self.ioevents
            .lock()
            .unwrap()
            .retain(|e| *e != (addr, datamatch));
        Ok(())
    }
}

/// A temporary file removed on drop.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(name: &str, size: u64) -> Self {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "vireo-virtio-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        TempFile(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
