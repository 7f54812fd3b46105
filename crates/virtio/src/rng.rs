//! virtio-rng, the entropy device (virtio 1.2 §5.4): one queue of device-writable buffers,
//! filled from the host kernel's random number generator (`getrandom(2)`). No rate limit, but
//! each request gets at most [`MAX_BYTES_PER_REQUEST`] bytes, so a guest asking for
//! gigabytes costs the host no more than that per buffer it hands over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::queue::{gather, serve_queue, Chain};
use crate::worker::{positions, QueueHandler, QueuePosition, Shared, Worker};
use crate::{
    sys, Activation, ActiveQueue, DeviceState, Error, LogOnce, Result, VirtioDevice,
    VirtioInterrupt, VIRTIO_ID_RNG,
};
use vireo_hv::GuestMemory;
use vm_memory::Bytes;

/// Queue size.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes one request receives.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;
/// Buffers a request may have.
const MAX_BUFFERS: usize = QUEUE_SIZE as usize;

/// The entropy device.
pub struct Rng {
    log: Arc<LogOnce>,
    worker: Option<Worker>,
    handler: Option<Arc<Mutex<RngQueues>>>,
    notifiers: Vec<(usize, vireo_hv::EventFd)>,
    /// Requests served and bytes given.
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Rng {
    pub fn new() -> Self {
        Rng {
            log: Arc::new(LogOnce::new()),
            worker: None,
            handler: None,
            notifiers: Vec::new(),
            requests: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let Some(h) = &self.handler else {
            return Ok(());
        };
        let notifiers = self
            .notifiers
            .iter()
            .map(|(i, fd)| Ok((*i, fd.try_clone().map_err(|e| Error::io("eventfd", e))?)))
            .collect::<Result<Vec<_>>>()?;
        self.worker = Some(Worker::spawn(
            "virtio-rng".into(),
            notifiers,
            Shared(h.clone()),
        )?);
        Ok(())
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    /// No configuration space (§5.4.4).
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<()> {
        self.reset();
        let notifiers = a
            .queues
            .iter()
            .map(|q| {
                Ok((
                    q.index,
                    q.notify.try_clone().map_err(|e| Error::io("eventfd", e))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let handler = RngQueues {
            broken: vec![false; a.queues.len()],
            queues: a.queues,
            mem: a.mem,
            interrupt: a.interrupt,
            chain: Chain::new(),
            buf: vec![0u8; MAX_BYTES_PER_REQUEST],
            ranges: Vec::new(),
            log: self.log.clone(),
            requests: self.requests.clone(),
            bytes: self.bytes.clone(),
        };
        self.handler = Some(Arc::new(Mutex::new(handler)));
        self.notifiers = notifiers;
        self.spawn()
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.handler = None;
        self.notifiers.clear();
    }

    fn state(&self) -> DeviceState {
        DeviceState {
            device_type: VIRTIO_ID_RNG,
            config: Vec::new(),
            active: self.handler.is_some(),
            extra: Vec::new(),
        }
    }

    /// Requests are served synchronously on the device thread: once it stops, none is in
    /// flight.
    fn pause(&mut self) -> Result<Vec<QueuePosition>> {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        Ok(self
            .handler
            .as_ref()
            .map(|h| positions(&h.lock().unwrap_or_else(|e| e.into_inner()).queues))
            .unwrap_or_default())
    }

    fn resume(&mut self) -> Result<()> {
        if self.worker.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("requests", self.requests.load(Ordering::Relaxed)),
            ("bytes", self.bytes.load(Ordering::Relaxed)),
        ]
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.reset();
    }
}

struct RngQueues {
    queues: Vec<ActiveQueue>,
    broken: Vec<bool>,
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    chain: Chain,
    buf: Vec<u8>,
    ranges: Vec<(vm_memory::GuestAddress, usize)>,
    log: Arc<LogOnce>,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

/// Fill the device-writable buffers of `chain` (up to the per-request bound) with random
/// bytes; returns the number written. Readable buffers are ignored (§5.4.6.1: the driver
/// gives only writable ones).
fn fill(
    mem: &GuestMemory,
    chain: &Chain,
    buf: &mut [u8],
    ranges: &mut Vec<(vm_memory::GuestAddress, usize)>,
    log: &LogOnce,
) -> u32 {
    if chain.fault.is_some() {
        if log.first(0) {
            tracing::warn!("virtio-rng: request with a buffer outside RAM (logged once)");
        }
        return 0;
    }
    let want = chain.writable_len().min(buf.len() as u64) as usize;
    if want == 0 {
        return 0;
    }
    if let Err(e) = sys::getrandom(&mut buf[..want]) {
        if log.first(1) {
            tracing::warn!("virtio-rng: getrandom: {e} (logged once)");
        }
        return 0;
    }
    ranges.clear();
    if !gather(&chain.writable, 0, want as u64, ranges) {
        return 0;
    }
    let mut at = 0;
    for &(addr, len) in ranges.iter() {
        if mem.write_slice(&buf[at..at + len], addr).is_err() {
            return at as u32;
        }
        at += len;
    }
    want as u32
}

impl QueueHandler for RngQueues {
    fn queue_notified(&mut self, index: usize) {
        let Some(pos) = self.queues.iter().position(|q| q.index == index) else {
            return;
        };
        if self.broken[pos] {
            return;
        }
        let (buf, ranges, log, mem) = (&mut self.buf, &mut self.ranges, &self.log, &self.mem);
        let (requests, bytes) = (&self.requests, &self.bytes);
        let r = serve_queue(
            &mut self.queues[pos],
            mem,
            self.interrupt.as_ref(),
            &mut self.chain,
            MAX_BUFFERS,
            |chain, _| {
                let n = fill(mem, chain, buf, ranges, log);
                requests.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(u64::from(n), Ordering::Relaxed);
                Some(n)
            },
        );
        if let Err(e) = r {
            self.broken[pos] = true;
            if self.log.first(2) {
                tracing::warn!("virtio-rng: {e}; the device needs a reset");
            }
            self.interrupt.set_needs_reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Desc, SplitQueueDriver};
    use crate::test_util::*;
    use std::time::{Duration, Instant};
    use vireo_hv::EventFd;
    use vm_memory::GuestAddress;

    struct Setup {
        mem: GuestMemory,
        driver: SplitQueueDriver,
        notify: EventFd,
        irq: Arc<RecordingInterrupt>,
        rng: Rng,
    }

    fn setup() -> Setup {
        let mem = guest_memory();
        let driver = SplitQueueDriver::new(&mem, QUEUE_BASE, QUEUE_SIZE);
        let notify = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let mut rng = Rng::new();
        rng.activate(Activation {
            mem: mem.clone(),
            features: crate::TRANSPORT_FEATURES,
            queues: vec![ActiveQueue {
                index: 0,
                queue: driver.queue().unwrap(),
                notify: notify.try_clone().unwrap(),
            }],
            interrupt: irq.clone(),
        })
        .unwrap();
        Setup {
            mem,
            driver,
            notify,
            irq,
            rng,
        }
    }

    fn wait_used(s: &mut Setup) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = s.driver.pop_used(&s.mem) {
                return u;
            }
            assert!(Instant::now() < deadline, "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn fills_buffers_with_random_bytes() {
        let mut s = setup();
        s.driver
            .add(&s.mem, &[Desc::w(DATA, 100), Desc::w(DATA + 0x1000, 28)])
            .unwrap();
        s.notify.write(1).unwrap();
        let (_, len) = wait_used(&mut s);
        assert_eq!(len, 128);
        let mut a = [0u8; 100];
        s.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        assert_ne!(a, [0u8; 100]);
        let mut b = [0u8; 28];
        s.mem
            .read_slice(&mut b, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_ne!(b, [0u8; 28]);
        assert!(s.irq.queue_interrupts() >= 1);
        // Two requests get different bytes.
        s.driver.add(&s.mem, &[Desc::w(DATA, 100)]).unwrap();
        s.notify.write(1).unwrap();
        wait_used(&mut s);
        let mut c = [0u8; 100];
        s.mem.read_slice(&mut c, GuestAddress(DATA)).unwrap();
        assert_ne!(a, c);
        s.rng.reset();
        assert!(!s.rng.state().active);
    }

    #[test]
    fn huge_requests_are_bounded_and_bad_ones_harmless() {
        let mut s = setup();
        // 8 MiB asked: 64 KiB given.
        s.driver.add(&s.mem, &[Desc::w(DATA, 8 << 20)]).unwrap();
        s.notify.write(1).unwrap();
        assert_eq!(wait_used(&mut s).1, MAX_BYTES_PER_REQUEST as u32);
        // Outside RAM: nothing written, request returned.
        s.driver
            .add(&s.mem, &[Desc::w(MEM_SIZE - 10, 100)])
            .unwrap();
        s.notify.write(1).unwrap();
        assert_eq!(wait_used(&mut s).1, 0);
        // Readable-only: nothing written.
        s.driver.add(&s.mem, &[Desc::r(DATA, 100)]).unwrap();
        s.notify.write(1).unwrap();
        assert_eq!(wait_used(&mut s).1, 0);
        assert!(!s.irq.reset_requested());
        // A bogus available index: the device needs a reset and stops.
        let idx = 1000;
        s.driver.set_avail_idx(&s.mem, idx);
        s.notify.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.irq.reset_requested() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
