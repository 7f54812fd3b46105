//! virtio 1.2: the PCI transport (§4.1), split virtqueues handled with `virtio-queue`, and the
//! devices with their host back ends: network (§5.1) on a TAP device, block (§5.2) on a raw
//! file or block device, entropy (§5.4) from the host's `getrandom`, socket (vsock, §5.10) to
//! Unix sockets on the host.
//!
//! One transport serves every device: a device implements [`VirtioDevice`] (its type, features,
//! configuration space, what to do with its queues) and [`VirtioPciDevice`] does the rest —
//! capabilities, feature negotiation, status and reset, queue set-up, MSI-X, notifications.
//! Devices serve their queues on their own thread ([`worker`]), woken by the queue's eventfd
//! (a KVM ioeventfd, or written by the transport when the backend has none), and interrupt
//! the guest through [`VirtioInterrupt`].
//!
//! The guest is hostile: a malformed request gets an error status when the device can report
//! one; a broken queue (bad ring index, descriptors outside RAM, loops) puts the device into
//! `DEVICE_NEEDS_RESET` (§2.1.2) and the device stops using it until the driver resets it.

pub mod block;
pub mod driver;
pub mod net;
pub mod queue;
pub mod rng;
mod sys;
pub mod transport;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vireo_hv::{EventFd, GuestMemory};
use virtio_queue::Queue;

pub use block::{Block, DiskImage, DiskOptions};
pub use net::{MacAddr, Net, NetBackend, NetControl, Tap, TapError};
pub use rng::Rng;
pub use transport::{VirtioPciDevice, VirtioPciState};
pub use vsock::{Vsock, VsockBackend, VsockControl};
pub use worker::{set_worker_start_hook, start_thread_spawner, QueuePosition};

/// Device types (§5).
pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_ID_RNG: u32 = 4;
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Reserved feature bits (§6).
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The features the transport offers for every device.
pub const TRANSPORT_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC;

/// "No MSI-X vector" (§4.1.4.3).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hv(#[from] vireo_hv::Error),
    #[error(transparent)]
    Pci(#[from] vireo_devices::pci::PciError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Disk(String),
    #[error("activating the device: {0}")]
    Activate(String),
    #[error(transparent)]
    Tap(#[from] net::TapError),
    #[error("vsock: {0}")]
    Vsock(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// How a device signals the driver. The transport implements it over MSI-X; the device calls
/// it from its own thread.
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue` and the driver wants to know (§2.7.10).
    fn notify_queue(&self, queue: usize);
    /// The device configuration space changed (§4.1.4.5).
    fn notify_config(&self);
    /// The device met an error it cannot recover from: set DEVICE_NEEDS_RESET (§2.1.2) and
    /// send a configuration-change interrupt. The device stops using its queues.
    fn set_needs_reset(&self);
}

/// A queue the driver enabled, handed to the device on activation.
pub struct ActiveQueue {
    /// Index of the queue in the device.
    pub index: usize,
    /// The queue, validated: size a power of two within the maximum, rings aligned and inside
    /// guest RAM; EVENT_IDX set as negotiated.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notify: EventFd,
}

/// Everything a device needs to run once the driver set DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemory,
    /// The features the driver accepted.
    pub features: u64,
    /// The enabled queues, by index.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// A device's own state, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub device_type: u32,
    /// The device configuration space as the driver reads it.
    pub config: Vec<u8>,
    /// True while the device runs (activated and not reset).
    pub active: bool,
    /// What the driver set that the configuration space does not show, by name (virtio-net:
    /// `queue_pairs`, the pairs in use after VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET). Applied by
    /// [`VirtioDevice::restore_extra`] once a restored device runs again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(String, u64)>,
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// The device type (§5), e.g. [`VIRTIO_ID_BLOCK`].
    fn device_type(&self) -> u32;
    /// Short name for logs and threads.
    fn name(&self) -> &'static str;
    /// PCI class code (`0xCCSSPP`) of the function.
    fn pci_class(&self) -> u32 {
        0xff_00_00
    }
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits offered (the transport adds [`TRANSPORT_FEATURES`]).
    fn features(&self) -> u64;
    /// Read the device configuration space (§4.1.4.6); beyond its end reads zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start serving the queues. An error leaves the device inactive and sets
    /// DEVICE_NEEDS_RESET.
    fn activate(&mut self, activation: Activation) -> Result<()>;
    /// Stop using the queues (wait for any request in flight) and return to the initial state.
    fn reset(&mut self);
    /// The device's state as data.
    fn state(&self) -> DeviceState;
    /// Stop serving the queues after completing every request in flight (their buffers are
    /// in the used rings), keeping the device active; returns where each queue stands.
    /// [`VirtioDevice::resume`] goes on. Only called while active. A device that cannot
    /// (the default) makes snapshots of its VM fail rather than lose requests.
    fn pause(&mut self) -> Result<Vec<worker::QueuePosition>> {
        Err(Error::Activate(format!(
            "{} cannot be paused for a snapshot",
            self.name()
        )))
    }
    /// Re-apply [`DeviceState::extra`] to a restored device, after its queues have been
    /// started at their saved positions. Unknown names are ignored.
    fn restore_extra(&mut self, _extra: &[(String, u64)]) -> Result<()> {
        Ok(())
    }
    /// Serve the queues again after [`VirtioDevice::pause`].
    fn resume(&mut self) -> Result<()> {
        Ok(())
    }
    /// Counters for the user (requests, bytes), by name.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Log `msg` once per (device, kind) for the life of the process: a guest repeating a bad
/// request must not flood the log.
pub(crate) struct LogOnce {
    seen: std::sync::Mutex<u64>,
}

impl LogOnce {
    pub(crate) const fn new() -> Self {
        LogOnce {
            seen: std::sync::Mutex::new(0),
        }
    }

    /// True the first time `kind` (0-63) is seen.
    pub(crate) fn first(&self, kind: u32) -> bool {
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let bit = 1u64 << (kind % 64);
        let first = *s & bit == 0;
        *s |= bit;
        first
    }
}

#[cfg(test)]
pub(crate) mod test_util;
