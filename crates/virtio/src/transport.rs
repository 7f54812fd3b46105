//! The virtio PCI transport, modern interface only (virtio 1.2 §4.1): one PCI function per
//! device (vendor 0x1af4, device 0x1040 + type, revision 1), one 64-bit memory BAR holding
//! the common configuration, ISR, device configuration and notification structures and the
//! MSI-X table and PBA, described by vendor capabilities (§4.1.4), plus the PCI configuration
//! access capability (§4.1.4.9).
//!
//! BAR 0 layout:
//!
//! | offset | structure | size |
//! |---|---|---|
//! | 0x0000 | common configuration (§4.1.4.3) | 0x38 |
//! | 0x1000 | ISR status (§4.1.4.5) | 1 |
//! | 0x2000 | device configuration (§4.1.4.6) | 0x1000 |
//! | 0x3000 | notifications (§4.1.4.4), queue `n` at `n * 4` | 4 per queue |
//! | 0x4000 | MSI-X table | 16 per vector |
//! | 0x6000 | MSI-X PBA | |
//!
//! Queue notifications: each queue has an eventfd, registered with the hypervisor at its
//! notify address while the BAR decodes (a KVM ioeventfd: the guest's write never leaves the
//! kernel); when the backend does not take it, the write reaches [`VirtioPciDevice::write_bar`]
//! and the transport signals the eventfd itself.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use vireo_devices::pci::config::{Bar, BarKind, PciConfiguration, PciHeader};
use vireo_devices::pci::msix::{self, MsixLayout, MsixState, MsixTable};
use vireo_devices::pci::{PciConfigState, PciDevice};
use vireo_hv::{Datamatch, EventFd, GuestMemory, IoEventAddress, Vm};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::worker::QueuePosition;
use crate::{
    Activation, ActiveQueue, DeviceState, Error, LogOnce, Result, VirtioDevice, VirtioInterrupt,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK, TRANSPORT_FEATURES,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR,
};

/// PCI IDs (§4.1.2): Red Hat's virtio vendor ID, modern device IDs 0x1040 + type.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR with every structure, and its size.
pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_SIZE: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`: queue `n` is notified at `NOTIFY_OFFSET + n * 4`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Most queues a device may have (the notify region and MSI-X table must fit).
pub const MAX_QUEUES: usize = 256;

/// `cfg_type` of the vendor capabilities (§4.1.4).
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Vendor-specific capability ID.
const PCI_CAP_ID_VNDR: u8 = 0x09;

/// Common configuration registers (§4.1.4.3): offset and width.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;

    /// (offset, width) of every register.
    pub const REGISTERS: [(u64, u64); 16] = [
        (DEVICE_FEATURE_SELECT, 4),
        (DEVICE_FEATURE, 4),
        (DRIVER_FEATURE_SELECT, 4),
        (DRIVER_FEATURE, 4),
        (CONFIG_MSIX_VECTOR, 2),
        (NUM_QUEUES, 2),
        (DEVICE_STATUS, 1),
        (CONFIG_GENERATION, 1),
        (QUEUE_SELECT, 2),
        (QUEUE_SIZE, 2),
        (QUEUE_MSIX_VECTOR, 2),
        (QUEUE_ENABLE, 2),
        (QUEUE_NOTIFY_OFF, 2),
        (QUEUE_DESC, 8),
        (QUEUE_DRIVER, 8),
        (QUEUE_DEVICE, 8),
    ];
}

/// Kinds of guest mistakes, for the once-per-kind log.
#[derive(Clone, Copy)]
enum Problem {
    BadAccess = 0,
    QueueInvalid,
    Features,
    DriverOkEarly,
    Activate,
    LateQueueWrite,
    IoEvent,
}

/// What the device thread uses to interrupt the guest: MSI-X vectors by queue, the ISR.
struct TransportInterrupt {
    msix: Arc<Mutex<MsixTable>>,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    needs_reset: AtomicBool,
}

/// ISR status bits (§4.1.4.5).
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TransportInterrupt {
    fn signal(&self, vector: u16) {
        if vector != VIRTIO_MSI_NO_VECTOR {
            lock(&self.msix).trigger(usize::from(vector));
        }
    }
}

impl VirtioInterrupt for TransportInterrupt {
    fn notify_queue(&self, queue: usize) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        if let Some(v) = self.queue_vectors.get(queue) {
            self.signal(v.load(Ordering::SeqCst));
        }
    }

    fn notify_config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.signal(self.config_vector.load(Ordering::SeqCst));
    }

    fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.notify_config();
        }
    }
}

/// The driver-visible registers of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// The transport's state as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub pci: PciConfigState,
    pub msix: MsixState,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueRegs>,
    pub queue_vectors: Vec<u16>,
    pub config_vector: u16,
    pub isr: u8,
    pub needs_reset: bool,
    pub device: DeviceState,
    /// Where each active queue stands; filled while the device is paused
    /// ([`VirtioPciDevice::pause`]), which a snapshot requires.
    #[serde(default)]
    pub queue_positions: Vec<QueuePosition>,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    vm: Arc<dyn Vm>,
    msix: Arc<Mutex<MsixTable>>,
    msix_cap: u16,
    cfg_cap: u16,
    irq: Arc<TransportInterrupt>,
    /// One notification eventfd per queue (non-blocking).
    notify: Vec<EventFd>,
    /// Notify addresses registered with the hypervisor, with their queue.
    ioevents: Vec<(usize, IoEventAddress)>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    active: bool,
    /// Paused with the queues at these positions (`pause`); `None` while serving.
    paused: Option<Vec<QueuePosition>>,
    log: LogOnce,
}

impl VirtioPciDevice {
    /// Put `device` behind a PCI transport: MSI-X vectors (one per queue and one for
    /// configuration changes) come from `vm`, which also takes the queue notifications when
    /// it can.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, vm: Arc<dyn Vm>) -> Result<Self> {
        let max_sizes = device.queue_max_sizes().to_vec();
        let nq = max_sizes.len();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(Error::Activate(format!("{} queues", nq)));
        }
        let nvec = nq + 1;
        let vectors = (0..nvec)
            .map(|_| vm.msi_vector())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let table = MsixTable::new(vectors)?;
        let device_id = VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device.device_type() as u16);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            class_code: device.pci_class(),
            revision_id: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x1100,
        });
        config.add_bar(
            BAR_INDEX,
            Bar {
                kind: BarKind::Mem64,
                size: BAR_SIZE,
                prefetchable: false,
            },
        )?;
        let bar = BAR_INDEX as u8;
        let cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
            let mut body = vec![(16 + extra.len()) as u8, cfg_type, bar, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(length as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE,
                &[],
            ),
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                nq as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE,
                &[],
            ),
        )?;
        let cfg_cap =
            config.add_capability(PCI_CAP_ID_VNDR, &cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]))?;
        // bar, offset and length of the access capability are the driver's to set.
        config.set_writable(cfg_cap + 4, &[0xff]);
        config.set_writable(cfg_cap + 8, &[0xff; 8]);
        let msix_cap = msix::add_capability(
            &mut config,
            &MsixLayout {
                vectors: nvec as u16,
                table_bar: bar,
                table_offset: MSIX_TABLE_OFFSET as u32,
                pba_bar: bar,
                pba_offset: MSIX_PBA_OFFSET as u32,
            },
        )?;
        let notify = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e)))
            .collect::<Result<Vec<_>>>()?;
        let msix = Arc::new(Mutex::new(table));
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            vm,
            irq: Arc::new(TransportInterrupt {
                msix: msix.clone(),
                queue_vectors: (0..nq)
                    .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                    .collect(),
                config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
                isr: AtomicU8::new(0),
                needs_reset: AtomicBool::new(false),
            }),
            msix,
            msix_cap,
            cfg_cap,
            notify,
            ioevents: Vec::new(),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: max_sizes.into_iter().map(QueueRegs::new).collect(),
            active: false,
            paused: None,
            log: LogOnce::new(),
        })
    }

    fn problem(&self, p: Problem, what: std::fmt::Arguments<'_>) {
        if self.log.first(p as u32) {
            tracing::warn!("{}: {what} (logged once)", self.device.name());
        }
    }

    /// All features offered.
    fn offered(&self) -> u64 {
        self.device.features() | TRANSPORT_FEATURES
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u8 {
        let mut s = self.status;
        if self.irq.needs_reset.load(Ordering::SeqCst) {
            s |= STATUS_DEVICE_NEEDS_RESET;
        }
        s
    }

    /// The features the driver accepted (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The state as data.
    pub fn state(&self) -> VirtioPciState {
        VirtioPciState {
            pci: self.config.state(),
            msix: lock(&self.msix).state(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            queue_vectors: self
                .irq
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            config_vector: self.irq.config_vector.load(Ordering::SeqCst),
            isr: self.irq.isr.load(Ordering::SeqCst),
            needs_reset: self.irq.needs_reset.load(Ordering::SeqCst),
            device: self.device.state(),
            queue_positions: self.paused.clone().unwrap_or_default(),
        }
    }

    /// Stop the device after its requests in flight complete and record where its queues
    /// stand (a VM pause; what [`VirtioPciDevice::state`] needs for a snapshot). Nothing to do
    /// for an inactive device.
    pub fn pause(&mut self) -> Result<()> {
        if self.active && self.paused.is_none() {
            self.paused = Some(self.device.pause()?);
        }
        Ok(())
    }

    /// Serve the queues again after [`VirtioPciDevice::pause`].
    pub fn resume(&mut self) -> Result<()> {
        if self.paused.take().is_some() {
            self.device.resume()?;
        }
        Ok(())
    }

    /// The device's counters (requests, bytes), by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.device.counters()
    }

    /// Load a state from [`VirtioPciDevice::state`] (taken while paused) into a freshly
    /// created transport for the same kind of device: registers, configuration space, MSI-X
    /// (routes follow), and, when the device was running, its queues at their saved
    /// positions (checked as the driver's would be; the device starts serving them).
    /// A state that does not fit — another device type, queue count or size, a device
    /// configuration that differs (a disk of another size) — is refused.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<()> {
        let bad = |what: String| Err(Error::Activate(format!("restoring: {what}")));
        let own = self.device.state();
        if s.device.device_type != own.device_type {
            return bad(format!(
                "a device of type {} into {}",
                s.device.device_type,
                self.device.name()
            ));
        }
        if s.device.config != own.config {
            return bad(format!(
                "{}: its configuration differs from the snapshot's (another disk size?)",
                self.device.name()
            ));
        }
        if s.queues.len() != self.queues.len()
            || s.queue_vectors.len() != self.queues.len()
            || s.queues
                .iter()
                .zip(&self.queues)
                .any(|(a, b)| a.max_size != b.max_size)
        {
            return bad(format!("{}: queues differ", self.device.name()));
        }
        if s.device.active
            && s.queue_positions.len() != s.queues.iter().filter(|q| q.enabled).count()
        {
            return bad(format!(
                "{}: the state was not taken while paused",
                self.device.name()
            ));
        }
        self.config.restore(&s.pci)?;
        lock(&self.msix).restore(&s.msix)?;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_select = s.queue_select;
        self.queues = s.queues.clone();
        for (v, &saved) in self.irq.queue_vectors.iter().zip(&s.queue_vectors) {
            v.store(self.vector(saved), Ordering::SeqCst);
        }
        let cv = self.vector(s.config_vector);
        self.irq.config_vector.store(cv, Ordering::SeqCst);
        self.irq.isr.store(s.isr, Ordering::SeqCst);
        self.irq.needs_reset.store(s.needs_reset, Ordering::SeqCst);
        if s.device.active {
            self.activate_at(&s.queue_positions);
            if !self.active {
                return bad(format!(
                    "{}: its queues could not be started",
                    self.device.name()
                ));
            }
            self.device.restore_extra(&s.device.extra)?;
        }
        Ok(())
    }

    /// Device reset (§2.4): the device stops, every virtio register returns to its initial
    /// value. MSI-X table contents are PCI state and stay.
    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.paused = None;
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        for v in &self.irq.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        self.irq
            .config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        self.irq.isr.store(0, Ordering::SeqCst);
        self.irq.needs_reset.store(false, Ordering::SeqCst);
        for e in &self.notify {
            let _ = e.read(); // non-blocking: drops a stale notification
        }
    }

    fn set_needs_reset(&self) {
        self.irq.set_needs_reset();
    }

    /// A valid MSI-X vector number, or NO_VECTOR (§4.1.4.3: an invalid vector reads back as
    /// NO_VECTOR).
    fn vector(&self, v: u16) -> u16 {
        if usize::from(v) < lock(&self.msix).len() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn selected(&self) -> Option<usize> {
        let q = usize::from(self.queue_select);
        (q < self.queues.len()).then_some(q)
    }

    /// The value of common configuration register `reg` (offset).
    fn common_value(&self, reg: u64) -> u64 {
        let q = self.selected().map(|i| (i, self.queues[i]));
        match reg {
            common::DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            common::DEVICE_FEATURE => match self.device_feature_select {
                0 => self.offered() & 0xffff_ffff,
                1 => self.offered() >> 32,
                _ => 0,
            },
            common::DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            common::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            common::CONFIG_MSIX_VECTOR => u64::from(self.irq.config_vector.load(Ordering::SeqCst)),
            common::NUM_QUEUES => self.queues.len() as u64,
            common::DEVICE_STATUS => u64::from(self.status()),
            common::CONFIG_GENERATION => 0,
            common::QUEUE_SELECT => u64::from(self.queue_select),
            // A queue that does not exist reads size 0 (§4.1.4.3.1).
            common::QUEUE_SIZE => q.map_or(0, |(_, r)| u64::from(r.size)),
            common::QUEUE_MSIX_VECTOR => q.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |(i, _)| {
                u64::from(self.irq.queue_vectors[i].load(Ordering::SeqCst))
            }),
            common::QUEUE_ENABLE => q.map_or(0, |(_, r)| u64::from(r.enabled)),
            common::QUEUE_NOTIFY_OFF => q.map_or(0, |(i, _)| i as u64),
            common::QUEUE_DESC => q.map_or(0, |(_, r)| r.desc),
            common::QUEUE_DRIVER => q.map_or(0, |(_, r)| r.driver),
            common::QUEUE_DEVICE => q.map_or(0, |(_, r)| r.device),
            _ => 0,
        }
    }

    /// The register holding `[offset, offset + len)`, if the access lies inside one.
    fn common_register(offset: u64, len: usize) -> Option<(u64, u64)> {
        let end = offset.checked_add(len as u64)?;
        common::REGISTERS
            .iter()
            .copied()
            .find(|&(base, width)| offset >= base && end <= base + width)
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((base, _)) = Self::common_register(offset, data.len()) else {
            if !data.is_empty() {
                self.problem(
                    Problem::BadAccess,
                    format_args!("common config read of {} bytes at {offset:#x}", data.len()),
                );
            }
            return;
        };
        let v = self.common_value(base).to_le_bytes();
        let at = (offset - base) as usize;
        data.copy_from_slice(&v[at..at + data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        // Registers are written whole; 64-bit ones also as two 32-bit halves.
        let reg = Self::common_register(offset, data.len()).filter(|&(base, width)| {
            offset == base && data.len() as u64 == width
                || width == 8 && data.len() == 4 && (offset == base || offset == base + 4)
        });
        let Some((base, width)) = reg else {
            self.problem(
                Problem::BadAccess,
                format_args!("common config write of {} bytes at {offset:#x}", data.len()),
            );
            return;
        };
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        match base {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            common::DRIVER_FEATURE => {
                if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
                    self.problem(
                        Problem::Features,
                        format_args!("driver features written after FEATURES_OK"),
                    );
                    return;
                }
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            common::CONFIG_MSIX_VECTOR => {
                let vec = self.vector(v as u16);
                self.irq.config_vector.store(vec, Ordering::SeqCst);
            }
            common::DEVICE_STATUS => self.write_status(v as u8),
            common::QUEUE_SELECT => self.queue_select = v as u16,
            common::QUEUE_MSIX_VECTOR => {
                if let Some(i) = self.selected() {
                    let vec = self.vector(v as u16);
                    self.irq.queue_vectors[i].store(vec, Ordering::SeqCst);
                }
            }
            common::QUEUE_ENABLE if v == 1 => {
                self.enable_queue();
            }
            common::QUEUE_SIZE
            | common::QUEUE_DESC
            | common::QUEUE_DRIVER
            | common::QUEUE_DEVICE => {
                let Some(i) = self.selected() else {
                    return;
                };
                if self.queues[i].enabled {
                    self.problem(
                        Problem::LateQueueWrite,
                        format_args!("queue {i} configuration written while enabled"),
                    );
                    return;
                }
                let q = &mut self.queues[i];
                let field = match base {
                    common::QUEUE_SIZE => {
                        q.size = v as u16;
                        return;
                    }
                    common::QUEUE_DESC => &mut q.desc,
                    common::QUEUE_DRIVER => &mut q.driver,
                    _ => &mut q.device,
                };
                *field = if width == 8 && data.len() == 4 {
                    if offset == base {
                        (*field & !0xffff_ffff) | v
                    } else {
                        (*field & 0xffff_ffff) | (v << 32)
                    }
                } else {
                    v
                };
            }
            // Read-only: device_feature, num_queues, config_generation, queue_notify_off.
            _ => {}
        }
    }

    /// queue_enable = 1: check the queue now, so a bad one is refused when it is enabled.
    fn enable_queue(&mut self) {
        let Some(i) = self.selected() else {
            return;
        };
        if self.queues[i].enabled {
            return;
        }
        match build_queue(&self.queues[i], &self.mem, false) {
            Ok(_) => self.queues[i].enabled = true,
            Err(why) => {
                self.problem(Problem::QueueInvalid, format_args!("queue {i}: {why}"));
                self.set_needs_reset();
            }
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver only ever adds bits (§2.1.1); NEEDS_RESET is the device's.
        let mut new = (v | old) & !STATUS_DEVICE_NEEDS_RESET;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let f = self.driver_features;
            if f & !self.offered() != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                // Not accepted: FEATURES_OK stays clear (§3.1.1 step 6).
                self.problem(
                    Problem::Features,
                    format_args!("feature set {f:#x} refused (offered {:#x})", self.offered()),
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            if new & STATUS_FEATURES_OK == 0 {
                self.problem(
                    Problem::DriverOkEarly,
                    format_args!("DRIVER_OK without FEATURES_OK"),
                );
                self.status = new & !STATUS_DRIVER_OK;
                self.set_needs_reset();
                return;
            }
            self.status = new;
            self.activate();
            return;
        }
        self.status = new;
    }

    fn activate(&mut self) {
        self.activate_at(&[]);
    }

    /// Activate with the queues at `positions` (restore), or at 0 (the driver's DRIVER_OK).
    fn activate_at(&mut self, positions: &[QueuePosition]) {
        if self.irq.needs_reset.load(Ordering::SeqCst) {
            return;
        }
        let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, regs) in self.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let queue = match build_queue(regs, &self.mem, event_idx) {
                Ok(mut q) => {
                    if let Some(p) = positions.iter().find(|p| p.index == i) {
                        q.set_next_avail(p.next_avail);
                        q.set_next_used(p.next_used);
                    }
                    q
                }
                Err(why) => {
                    self.problem(Problem::QueueInvalid, format_args!("queue {i}: {why}"));
                    self.set_needs_reset();
                    return;
                }
            };
            let notify = match self.notify[i].try_clone() {
                Ok(n) => n,
                Err(e) => {
                    self.problem(Problem::Activate, format_args!("eventfd: {e}"));
                    self.set_needs_reset();
                    return;
                }
            };
            queues.push(ActiveQueue {
                index: i,
                queue,
                notify,
            });
        }
        let a = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues,
            interrupt: self.irq.clone(),
        };
        match self.device.activate(a) {
            Ok(()) => self.active = true,
            Err(e) => {
                self.problem(Problem::Activate, format_args!("{e}"));
                self.set_needs_reset();
            }
        }
    }

    /// The notify region: a write to queue `n`'s address notifies it (the data, the queue
    /// index, is not needed: every queue has its own address).
    fn write_notify(&self, offset: u64) {
        let q = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        tracing::trace!("{}: queue {q} notified through the bus", self.device.name());
        if let Some(e) = usize::try_from(q).ok().and_then(|q| self.notify.get(q)) {
            let _ = e.write(1);
        }
    }

    /// Register the queues' notify addresses with the hypervisor at BAR address `base`.
    fn register_ioevents(&mut self, base: u64) {
        for (i, fd) in self.notify.iter().enumerate() {
            let addr = IoEventAddress::Mmio(
                base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
            );
            match self.vm.register_ioevent(addr, Datamatch::Any, fd) {
                Ok(true) => {
                    tracing::debug!(
                        "{}: queue {i} notified at {addr:x?} in the hypervisor",
                        self.device.name()
                    );
                    self.ioevents.push((i, addr))
                }
                Ok(false) => break, // the backend leaves notifications to the bus
                Err(e) => {
                    self.problem(
                        Problem::IoEvent,
                        format_args!("ioeventfd at {addr:x?}: {e}"),
                    );
                }
            }
        }
    }

    fn unregister_ioevents(&mut self) {
        for (i, addr) in std::mem::take(&mut self.ioevents) {
            if let Some(fd) = self.notify.get(i) {
                if let Err(e) = self.vm.unregister_ioevent(addr, Datamatch::Any, fd) {
                    self.problem(
                        Problem::IoEvent,
                        format_args!("ioeventfd at {addr:x?}: {e}"),
                    );
                }
            }
        }
    }

    /// The configuration access capability's window (§4.1.4.9): its BAR, offset, length.
    fn cfg_access(&self) -> Option<(u64, usize)> {
        let c = self.cfg_cap;
        let bar = self.config.u8_at(usize::from(c) + 4);
        let offset = u64::from(self.config.u32_at(c + 8));
        let len = self.config.u32_at(c + 12) as usize;
        let ok = usize::from(bar) == BAR_INDEX
            && matches!(len, 1 | 2 | 4)
            && offset % len as u64 == 0
            && offset + len as u64 <= BAR_SIZE;
        ok.then_some((offset, len))
    }

    fn cfg_data_range(&self) -> std::ops::Range<usize> {
        let start = usize::from(self.cfg_cap) + 16;
        start..start + 4
    }
}

/// Build the `virtio_queue::Queue` for `r`, checking what the driver wrote: size a non-zero
/// power of two within the maximum (§2.7: split queues), ring alignment (§2.7, Table 2.2),
/// and rings inside guest RAM.
fn build_queue(
    r: &QueueRegs,
    mem: &GuestMemory,
    event_idx: bool,
) -> std::result::Result<Queue, String> {
    if r.size == 0 || !r.size.is_power_of_two() || r.size > r.max_size {
        return Err(format!(
            "size {} (must be a power of two, at most {})",
            r.size, r.max_size
        ));
    }
    let mut q = Queue::new(r.max_size).map_err(|e| e.to_string())?;
    q.try_set_size(r.size).map_err(|e| e.to_string())?;
    q.try_set_desc_table_address(GuestAddress(r.desc))
        .map_err(|e| format!("descriptor table {:#x}: {e}", r.desc))?;
    q.try_set_avail_ring_address(GuestAddress(r.driver))
        .map_err(|e| format!("available ring {:#x}: {e}", r.driver))?;
    q.try_set_used_ring_address(GuestAddress(r.device))
        .map_err(|e| format!("used ring {:#x}: {e}", r.device))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err("rings outside guest RAM".into());
    }
    Ok(q)
}

impl PciDevice for VirtioPciDevice {
    fn name(&self) -> &'static str {
        self.device.name()
    }

    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
        let window = self.cfg_data_range();
        let start = usize::from(offset);
        let end = start + data.len();
        if start < window.end && end > window.start {
            // A read of pci_cfg_data: read the BAR through the window.
            let mut buf = [0u8; 4];
            if let Some((bar_off, len)) = self.cfg_access() {
                self.read_bar(BAR_INDEX, bar_off, &mut buf[..len]);
            }
            for (i, b) in data.iter_mut().enumerate() {
                let at = start + i;
                if window.contains(&at) {
                    *b = buf[at - window.start];
                }
            }
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let window = self.cfg_data_range();
        let start = usize::from(offset);
        if start == window.start && !data.is_empty() && data.len() <= 4 {
            if let Some((bar_off, len)) = self.cfg_access() {
                if data.len() >= len {
                    let bytes = data[..len].to_vec();
                    self.write_bar(BAR_INDEX, bar_off, &bytes);
                }
            }
            return;
        }
        self.config.write(offset, data);
        msix::sync_control(&self.config, self.msix_cap, &mut lock(&self.msix));
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR_INDEX {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o < COMMON_CFG_OFFSET + 0x1000
                && o + len <= COMMON_CFG_OFFSET + COMMON_CFG_SIZE =>
            {
                self.read_common(o - COMMON_CFG_OFFSET, data);
            }
            o if (ISR_OFFSET..ISR_OFFSET + 0x1000).contains(&o)
                // Reading the ISR clears it (§4.1.4.5.1).
                && o == ISR_OFFSET && !data.is_empty() =>
            {
                data[0] = self.irq.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.msix).read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o < COMMON_CFG_OFFSET + 0x1000
                && o + len <= COMMON_CFG_OFFSET + COMMON_CFG_SIZE =>
            {
                self.write_common(o - COMMON_CFG_OFFSET, data);
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + 0x1000).contains(&o) => {
                self.write_notify(o - NOTIFY_OFFSET);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).write_table(o - MSIX_TABLE_OFFSET, data);
            }
            // The ISR and the PBA are read-only.
            _ => {}
        }
    }

    fn bar_mapped(&mut self, bar: usize, addr: Option<u64>) {
        if bar != BAR_INDEX {
            return;
        }
        self.unregister_ioevents();
        if let Some(base) = addr {
            self.register_ioevents(base);
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
        self.unregister_ioevents();
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
