//! virtio-net (virtio 1.2 §5.1) on a host back end ([`NetBackend`]: a TAP device, or a
//! socket pair in tests and benchmarks).
//!
//! Queues: receiveq*i* = 2*i*, transmitq*i* = 2*i*+1 for each of the N queue pairs, then the
//! control queue (index 2N with VIRTIO_NET_F_MQ negotiated, 2 without, §5.1.2). Each queue
//! pair is served by a thread of its own ([`pair`]), paired with one file descriptor of the
//! back end (one queue of a multi-queue TAP), so N pairs move frames on N host CPUs; the
//! control queue is served by the first pair's thread.
//!
//! Offered features: MAC, STATUS (link up/down, [`NetControl::set_link`]), MRG_RXBUF, CSUM and
//! GUEST_CSUM, TSO4/TSO6/ECN/UFO both ways, CTRL_VQ, GUEST_ANNOUNCE ([`NetControl::announce`],
//! the hook a migration uses so the guest announces itself from its new home), and MQ when the
//! back end has more than one queue pair. What the driver accepts for receiving is passed to
//! the TAP (`TUNSETOFFLOAD`), so a bulk TCP stream crosses the host as 64 KiB segments both
//! ways instead of 1500-byte frames.

pub mod features;
pub mod hdr;
pub(crate) mod pair;
pub mod tap;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vireo_hv::EventFd;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::worker::QueuePosition;
use crate::{
    Activation, DeviceState, Error, LogOnce, Result, VirtioDevice, VirtioInterrupt, VIRTIO_ID_NET,
};
use features::*;
pub use tap::{NetBackend, SocketPairBackend, Tap, TapError};

/// Size of each receive and transmit queue.
pub const QUEUE_SIZE: u16 = 256;
/// Interrupt moderation for a guest on the emulator ([`Net::set_interrupt_moderation`]): at
/// most one interrupt per millisecond per queue for completions of transmitted data and for
/// received frames no larger than a TCP acknowledgement. On an emulated CPU each interrupt
/// costs the guest tens of microseconds of kernel work and a bulk transfer completes frames
/// faster than the guest's NAPI re-enables interrupts; with this gap a guest→host stream took
/// ~11 interrupts per MiB instead of ~31 and ~10% less vCPU time per MiB (bench/net). The first
/// interrupt after a quiet spell goes out at once (a lone ping is not delayed), and neither
/// received data nor the completions of the guest's own acknowledgements are held back (a
/// guest waiting for data would sit idle: held, they halved a host→guest stream).
pub const EMULATED_IRQ_GAP: std::time::Duration = std::time::Duration::from_micros(1000);

/// Size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// [`DeviceState::extra`] name of the queue pairs in use.
const EXTRA_QUEUE_PAIRS: &str = "queue_pairs";

/// Bytes of configuration space: mac, status, max_virtqueue_pairs, mtu (§5.1.4).
const CONFIG_LEN: usize = 12;

/// The features this device offers besides the transport's.
pub const OFFERED_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_GUEST_UFO
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_HOST_UFO
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_CTRL_VQ
    | VIRTIO_NET_F_GUEST_ANNOUNCE;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address (IEEE 802: bit 1 of the first octet set,
    /// bit 0 clear).
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        if crate::sys::getrandom(&mut b).is_err() {
            // Not cryptographic, only distinct: time and process ID.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ u64::from(std::process::id()) << 24;
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfc) | 0x02;
        MacAddr(b)
    }

    /// A unicast address (bit 0 of the first octet clear) that is not all zeroes.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("invalid MAC address '{s}': use six hex pairs like 52:54:00:12:34:56");
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut b = [0u8; 6];
        for (o, p) in b.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(b))
    }
}

/// Frame and byte counters of one device, both directions (from the guest's point of view:
/// rx is host → guest).
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

/// What the device, its threads and outside handles share.
pub(crate) struct Shared {
    /// `status` of the configuration space.
    status: AtomicU16,
    /// The negotiated features while the device runs.
    features: AtomicU64,
    /// The interrupt of the running device (for configuration changes from outside).
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    stats: NetStats,
    /// Queue pairs the driver uses (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; 1 until then).
    active_pairs: AtomicU16,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A handle on a virtio-net device for the VMM: link status, announcements, counters.
#[derive(Clone)]
pub struct NetControl(Arc<Shared>);

impl NetControl {
    /// Report the link up or down (VIRTIO_NET_S_LINK_UP, §5.1.4) and tell the driver.
    pub fn set_link(&self, up: bool) {
        let old = if up {
            self.0
                .status
                .fetch_or(VIRTIO_NET_S_LINK_UP, Ordering::SeqCst)
        } else {
            self.0
                .status
                .fetch_and(!VIRTIO_NET_S_LINK_UP, Ordering::SeqCst)
        };
        if (old & VIRTIO_NET_S_LINK_UP != 0) != up {
            self.notify_config();
        }
    }

    /// True while the link is reported up.
    pub fn link_up(&self) -> bool {
        self.0.status.load(Ordering::SeqCst) & VIRTIO_NET_S_LINK_UP != 0
    }

    /// Ask the guest to announce itself (gratuitous ARP / unsolicited neighbour
    /// advertisements), as after a migration (VIRTIO_NET_S_ANNOUNCE, §5.1.6.5.3). Returns
    /// false when the running driver did not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE.
    pub fn announce(&self) -> bool {
        let f = self.0.features.load(Ordering::SeqCst);
        if f & VIRTIO_NET_F_GUEST_ANNOUNCE == 0 || f & VIRTIO_NET_F_CTRL_VQ == 0 {
            return false;
        }
        self.0
            .status
            .fetch_or(VIRTIO_NET_S_ANNOUNCE, Ordering::SeqCst);
        self.notify_config();
        true
    }

    /// True until the driver acknowledges an announcement.
    pub fn announce_pending(&self) -> bool {
        self.0.status.load(Ordering::SeqCst) & VIRTIO_NET_S_ANNOUNCE != 0
    }

    /// Queue pairs the driver has enabled.
    pub fn active_pairs(&self) -> u16 {
        self.0.active_pairs.load(Ordering::SeqCst)
    }

    pub fn counters(&self) -> NetCounters {
        let s = &self.0.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCounters {
            rx_frames: g(&s.rx_frames),
            rx_bytes: g(&s.rx_bytes),
            rx_dropped: g(&s.rx_dropped),
            tx_frames: g(&s.tx_frames),
            tx_bytes: g(&s.tx_bytes),
            tx_dropped: g(&s.tx_dropped),
        }
    }

    fn notify_config(&self) {
        if let Some(i) = lock(&self.0.interrupt).as_ref() {
            i.notify_config();
        }
    }
}

/// State of a queue pair that the control queue changes: enabled or not, and the eventfd
/// that tells its thread.
pub(crate) struct PairSwitch {
    pub(crate) enabled: Vec<AtomicBool>,
    pub(crate) wake: Vec<EventFd>,
}

/// A virtio-net device.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    index: usize,
    mac: MacAddr,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    threads: Vec<pair::PairThread>,
    /// The pairs while paused ([`VirtioDevice::pause`]): threads stopped, state kept.
    parked: Vec<pair::ParkedPair>,
    stop: Option<EventFd>,
    /// Which pairs receive, shared with the pair threads while active.
    switch: Option<Arc<PairSwitch>>,
    log: Arc<LogOnce>,
    /// Shortest time between two interrupts of one queue.
    irq_gap: std::time::Duration,
}

impl Net {
    /// A device on `backend` (one queue pair per back-end queue) with address `mac`; `index`
    /// names its threads (`virtio-net<index>-<pair>`).
    pub fn new(backend: Arc<dyn NetBackend>, mac: MacAddr, index: usize) -> Self {
        let pairs = backend
            .queues()
            .clamp(1, crate::transport::MAX_QUEUES / 2 - 1);
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs];
        queue_sizes.push(CTRL_QUEUE_SIZE);
        Net {
            backend,
            index,
            mac,
            queue_sizes,
            shared: Arc::new(Shared {
                status: AtomicU16::new(VIRTIO_NET_S_LINK_UP),
                features: AtomicU64::new(0),
                interrupt: Mutex::new(None),
                stats: NetStats::default(),
                active_pairs: AtomicU16::new(1),
            }),
            threads: Vec::new(),
            parked: Vec::new(),
            stop: None,
            switch: None,
            log: Arc::new(LogOnce::new()),
            irq_gap: std::time::Duration::ZERO,
        }
    }

    /// Interrupt moderation (off until set): at most one interrupt per `gap` on each receive
    /// and transmit queue ([`EMULATED_IRQ_GAP`] for a guest on the emulator). An interrupt
    /// the driver asks for inside the gap is held back until the gap has passed; the first
    /// after a quiet spell goes out at once, and received data never waits. Not for a guest
    /// at hardware speed: Linux frees transmitted buffers on the completion interrupt and TCP
    /// small queues let a socket have only about a millisecond of data in flight until then,
    /// so a held-back completion would cap its rate. Takes effect at the next activation.
    pub fn set_interrupt_moderation(&mut self, gap: std::time::Duration) {
        self.irq_gap = gap;
    }

    /// Queue pairs the device offers.
    pub fn pairs(&self) -> usize {
        self.queue_sizes.len() / 2
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// A handle for link status, announcements and counters.
    pub fn control(&self) -> NetControl {
        NetControl(self.shared.clone())
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&self.shared.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn pci_class(&self) -> u32 {
        0x02_00_00 // network controller, Ethernet
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = OFFERED_FEATURES;
        if self.pairs() > 1 {
            f |= VIRTIO_NET_F_MQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| c.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<()> {
        self.reset();
        let features = a.features;
        let pairs = self.pairs();
        let used_pairs = if features & VIRTIO_NET_F_MQ != 0 {
            pairs
        } else {
            1
        };
        let ctrl_index = 2 * used_pairs;
        if let Err(e) = self.backend.set_offload(hdr::tap_offloads(features)) {
            if self.log.first(0) {
                tracing::warn!(
                    "virtio-net {}: setting offloads: {e} (logged once)",
                    self.backend.name()
                );
            }
        }
        // Only the first pair receives until the driver asks for more (§5.1.6.5.5).
        for i in 0..pairs {
            if let Err(e) = self.backend.set_queue_enabled(i, i == 0) {
                if self.log.first(1) {
                    tracing::warn!(
                        "virtio-net {}: queue {i}: {e} (logged once)",
                        self.backend.name()
                    );
                }
            }
        }
        self.shared.active_pairs.store(1, Ordering::SeqCst);
        self.shared.features.store(features, Ordering::SeqCst);
        self.shared
            .status
            .fetch_and(!VIRTIO_NET_S_ANNOUNCE, Ordering::SeqCst);
        *lock(&self.shared.interrupt) = Some(a.interrupt.clone());

        let switch = Arc::new(PairSwitch {
            enabled: (0..pairs).map(|i| AtomicBool::new(i == 0)).collect(),
            wake: (0..pairs)
                .map(|_| EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e)))
                .collect::<Result<Vec<_>>>()?,
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        let mut per_pair: Vec<pair::PairQueues> = (0..used_pairs)
            .map(|_| pair::PairQueues::default())
            .collect();
        for q in a.queues {
            let i = q.index;
            if i == ctrl_index {
                if features & VIRTIO_NET_F_CTRL_VQ != 0 {
                    per_pair[0].ctrl = Some(q);
                }
            } else if i < ctrl_index {
                let p = &mut per_pair[i / 2];
                if i % 2 == 0 {
                    p.rx = Some(q);
                } else {
                    p.tx = Some(q);
                }
            }
        }
        for (i, queues) in per_pair.into_iter().enumerate() {
            if queues.is_empty() {
                continue;
            }
            let t = pair::PairThread::spawn(
                format!("virtio-net{}-{i}", self.index),
                pair::PairContext {
                    pair: i,
                    queues,
                    mem: a.mem.clone(),
                    features,
                    interrupt: a.interrupt.clone(),
                    backend: self.backend.clone(),
                    shared: self.shared.clone(),
                    switch: switch.clone(),
                    log: self.log.clone(),
                    stop: stop.try_clone().map_err(|e| Error::io("eventfd", e))?,
                    irq_gap: self.irq_gap,
                },
            );
            match t {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    self.stop = Some(stop);
                    self.reset();
                    return Err(e);
                }
            }
        }
        self.stop = Some(stop);
        self.switch = Some(switch);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(stop) = self.stop.take() {
            if let Err(e) = stop.write(1) {
                tracing::error!("stopping virtio-net threads: {e}");
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.parked.clear();
        self.switch = None;
        *lock(&self.shared.interrupt) = None;
        self.shared.features.store(0, Ordering::SeqCst);
        self.shared
            .status
            .fetch_and(!VIRTIO_NET_S_ANNOUNCE, Ordering::SeqCst);
        let _ = self.backend.set_offload(0);
    }

    /// The configuration space, with `status` as a fresh device reports it (link up, no
    /// announcement pending): link status is the host's, not the guest's, and a restored
    /// device starts with the link up (and the VMM asks the guest to announce itself).
    fn state(&self) -> DeviceState {
        let mut config = self.config();
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        let active = !self.threads.is_empty() || !self.parked.is_empty();
        let pairs = self.shared.active_pairs.load(Ordering::SeqCst);
        DeviceState {
            device_type: VIRTIO_ID_NET,
            config: config.to_vec(),
            active,
            extra: if active && pairs > 1 {
                vec![(EXTRA_QUEUE_PAIRS.to_string(), u64::from(pairs))]
            } else {
                Vec::new()
            },
        }
    }

    /// A restored device receives on the pairs the driver had enabled, not only the first
    /// (the driver sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET once, after feature negotiation).
    fn restore_extra(&mut self, extra: &[(String, u64)]) -> Result<()> {
        let Some(&(_, n)) = extra.iter().find(|(k, _)| k == EXTRA_QUEUE_PAIRS) else {
            return Ok(());
        };
        let (Some(switch), Ok(n)) = (&self.switch, u16::try_from(n)) else {
            return Err(Error::Activate(format!("restoring {n} queue pairs")));
        };
        let features = self.shared.features.load(Ordering::SeqCst);
        match pair::set_pairs(features, &*self.backend, switch, &self.shared, &self.log, n) {
            VIRTIO_NET_OK => Ok(()),
            _ => Err(Error::Activate(format!(
                "restoring {n} queue pairs of {}",
                self.pairs()
            ))),
        }
    }

    /// Stop the pair threads: each finishes the pass it is in (transmit and control requests
    /// complete synchronously), then neither guest memory nor the back end is touched until
    /// [`VirtioDevice::resume`]. Receive chains the device holds stay held (and are counted
    /// as not yet taken in the positions, so a restored device takes them again); frames
    /// arriving meanwhile wait in the back end (the TAP's queue, which drops beyond its
    /// length).
    fn pause(&mut self) -> Result<Vec<QueuePosition>> {
        if !self.threads.is_empty() {
            if let Some(stop) = &self.stop {
                stop.write(1).map_err(|e| Error::io("eventfd", e))?;
            }
            let mut lost = false;
            for t in self.threads.drain(..) {
                match t.join() {
                    Some(p) => self.parked.push(p),
                    None => lost = true,
                }
            }
            if let Some(stop) = &self.stop {
                // Consume the stop signal so resumed threads do not see it.
                let _ = stop.read();
            }
            if lost {
                return Err(Error::Activate(
                    "a virtio-net thread ended abnormally; the device cannot be paused".into(),
                ));
            }
        }
        Ok(self.parked.iter().flat_map(|p| p.positions()).collect())
    }

    fn resume(&mut self) -> Result<()> {
        for p in std::mem::take(&mut self.parked) {
            self.threads.push(p.resume()?);
        }
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.control().counters();
        vec![
            ("rx_frames", c.rx_frames),
            ("rx_bytes", c.rx_bytes),
            ("rx_dropped", c.rx_dropped),
            ("tx_frames", c.tx_frames),
            ("tx_bytes", c.tx_bytes),
            ("tx_dropped", c.tx_dropped),
        ]
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
