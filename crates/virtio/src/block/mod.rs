//! virtio-blk (virtio 1.2 §5.2): one request queue served on a device thread, on a
//! [`DiskImage`].
//!
//! Requests (§5.2.6): a 16-byte header (type, reserved, sector) in device-readable memory,
//! the data (device-readable for writes, device-writable for reads), and a status byte, the
//! last device-writable byte. Framing is free (§2.6.4): the header, data and status may be
//! split across buffers in any way. Supported: IN, OUT, FLUSH, GET_ID, DISCARD,
//! WRITE_ZEROES. A read-only disk answers every write with VIRTIO_BLK_S_IOERR (§5.2.6.2).
//!
//! The device thread: every wake-up (a queue notification or finished transfers) makes one
//! pass — reap the finished transfers, write their status bytes and used elements, interrupt
//! once (§2.7.10), then take the new requests (a request alone is done synchronously, the
//! others are submitted to Linux AIO one by one as they are taken). While the driver is
//! expected to answer the interrupt it may poll for a short adaptive window (module `poll`);
//! then it enables notifications again, serves whatever raced in and sleeps. One wake-up
//! serves for at most 2 ms before going back through the event loop.

mod aio;
mod disk;
mod poll;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

pub use disk::{DiskImage, DiskOptions, DIRECT_ALIGN, SECTOR_SIZE, SERIAL_LEN};

use crate::queue::{read_bytes, serve_available, write_bytes, Buffer, Chain};
use crate::worker::{positions, QueueHandler, QueuePosition, Shared, Worker};
use crate::{
    Activation, ActiveQueue, DeviceState, Error, LogOnce, Result, VirtioDevice, VirtioInterrupt,
    VIRTIO_ID_BLOCK,
};
use aio::{Aio, Pending};
use poll::PollWindow;
use vireo_hv::GuestMemory;

/// Feature bits (§5.2.3).
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types (§5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status values (§5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The unmap flag of a discard / write-zeroes segment (§5.2.6).
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Queue size (one queue).
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (§5.2.4 `seg_max`): the queue size minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Discard / write-zeroes limits (`max_discard_sectors`, `max_discard_seg`, ...).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 32;
/// Header bytes of a request and of a discard / write-zeroes segment.
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
/// Buffers a request may have: data segments plus header and status, with room for drivers
/// that split the header.
const MAX_BUFFERS: usize = SEG_MAX as usize + 4;
/// Size of the configuration space (§5.2.4, up to `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;
/// Longest the device thread polls for the driver's answer to an interrupt (module `poll`):
/// a driver woken on an idle CPU answers within 5-20 µs here; one that takes longer is not
/// worth a polling CPU.
pub const POLL_MAX: std::time::Duration = std::time::Duration::from_micros(50);
/// Longest one wake-up of the device thread keeps serving before it goes back to its event
/// loop (which then checks for a stop and comes straight back if work is left).
const BUSY_MAX: std::time::Duration = std::time::Duration::from_millis(2);

/// What a request needs once checked.
enum Plan {
    /// Done: reply with `status`, `written` bytes of data in the chain.
    Reply { status: u8, written: u64 },
    /// Move `len` bytes between the guest ranges and the disk at `offset`.
    Transfer { write: bool, offset: u64, len: u64 },
}

/// Queue index the worker uses for the AIO completion eventfd.
const AIO_EVENT: usize = usize::MAX - 1;

/// What went wrong, for the once-per-kind log.
#[derive(Clone, Copy)]
enum Problem {
    NoStatus = 0,
    BufferFault,
    ShortHeader,
    BadLength,
    OutOfBounds,
    ReadOnly,
    HostIo,
    Unsupported,
    BadSegment,
    QueueBroken,
}

/// Requests and bytes served, for the user.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Everything else: flush, get-id, discard, write-zeroes, bad requests.
    pub other: AtomicU64,
}

/// A virtio block device.
pub struct Block {
    disk: Arc<DiskImage>,
    index: usize,
    config: [u8; CONFIG_LEN],
    log: Arc<LogOnce>,
    worker: Option<Worker>,
    /// The queues and their server while active (also while paused).
    handler: Option<Arc<Mutex<BlockQueues>>>,
    /// Clones of the notification eventfds the thread waits on (to start it again).
    notifiers: Vec<(usize, vireo_hv::EventFd)>,
    counters: Arc<BlockCounters>,
}

impl Block {
    /// A device on `disk`; `index` names its thread (`virtio-blk<index>`).
    pub fn new(disk: Arc<DiskImage>, index: usize) -> Self {
        let mut c = [0u8; CONFIG_LEN];
        let put32 = |c: &mut [u8; CONFIG_LEN], at: usize, v: u32| {
            c[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        c[0..8].copy_from_slice(&disk.sectors().to_le_bytes()); // capacity
        put32(&mut c, 8, SIZE_MAX);
        put32(&mut c, 12, SEG_MAX);
        put32(&mut c, 20, disk.block_size());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        put32(&mut c, 36, MAX_DISCARD_SECTORS);
        put32(&mut c, 40, MAX_DISCARD_SEG);
        put32(&mut c, 44, disk.block_size() / SECTOR_SIZE as u32); // discard_sector_alignment
        put32(&mut c, 48, MAX_DISCARD_SECTORS); // max_write_zeroes_sectors
        put32(&mut c, 52, MAX_DISCARD_SEG);
        c[56] = 1; // write_zeroes_may_unmap
        Block {
            disk,
            index,
            config: c,
            log: Arc::new(LogOnce::new()),
            worker: None,
            handler: None,
            notifiers: Vec::new(),
            counters: Arc::new(BlockCounters::default()),
        }
    }

    pub fn disk(&self) -> &Arc<DiskImage> {
        &self.disk
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
            format!("virtio-blk{}", self.index),
            notifiers,
            Shared(h.clone()),
        )?);
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn pci_class(&self) -> u32 {
        0x01_80_00 // mass storage, other
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if self.disk.readonly() {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config.get(at).copied())
                .unwrap_or(0);
        }
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
        let mut notifiers = notifiers;
        // O_DIRECT disks keep many transfers in flight with Linux AIO.
        let aio = if self.disk.direct() {
            match Aio::new(usize::from(QUEUE_SIZE) * a.queues.len().max(1)) {
                Ok(aio) => {
                    let fd = aio.event.try_clone().map_err(|e| Error::io("eventfd", e))?;
                    notifiers.push((AIO_EVENT, fd));
                    Some(aio)
                }
                Err(e) => {
                    tracing::warn!(
                        "virtio-blk {}: no Linux AIO ({e}); serving requests one at a time",
                        self.disk.path().display()
                    );
                    None
                }
            }
        } else {
            None
        };
        let handler = BlockQueues {
            server: RequestServer {
                disk: self.disk.clone(),
                features: a.features,
                log: self.log.clone(),
                ranges: Vec::new(),
                counters: self.counters.clone(),
            },
            broken: vec![false; a.queues.len()],
            queues: a.queues,
            mem: a.mem,
            interrupt: a.interrupt,
            chain: Chain::new(),
            aio,
            completions: Vec::new(),
            interrupts: 0,
            reaped_since_reset: false,
            poll: PollWindow::new(POLL_MAX),
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
            device_type: VIRTIO_ID_BLOCK,
            config: self.config.to_vec(),
            active: self.handler.is_some(),
            extra: Vec::new(),
        }
    }

    fn pause(&mut self) -> Result<Vec<QueuePosition>> {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        let Some(h) = &self.handler else {
            return Ok(Vec::new());
        };
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        h.drain();
        Ok(positions(&h.queues))
    }

    fn resume(&mut self) -> Result<()> {
        if self.worker.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("reads", c.reads.load(Ordering::Relaxed)),
            ("read_bytes", c.read_bytes.load(Ordering::Relaxed)),
            ("writes", c.writes.load(Ordering::Relaxed)),
            ("write_bytes", c.write_bytes.load(Ordering::Relaxed)),
            ("other_requests", c.other.load(Ordering::Relaxed)),
        ]
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

/// The device thread's state: the queues and how to serve a request.
struct BlockQueues {
    server: RequestServer,
    queues: Vec<ActiveQueue>,
    broken: Vec<bool>,
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    chain: Chain,
    /// Asynchronous transfers (O_DIRECT disks). Declared after `mem`... and dropped before the
    /// thread ends: its Drop waits for the kernel to finish with guest memory.
    aio: Option<Aio>,
    completions: Vec<(Pending, bool)>,
    poll: PollWindow,
    /// Interrupts sent (to tell whether a pass sent one).
    interrupts: u64,
    /// Transfers were reaped since the completion eventfd was last reset.
    reaped_since_reset: bool,
}

impl BlockQueues {
    /// Wait for every asynchronous transfer and report it (a pause: afterwards every request
    /// the device took is in the used ring).
    fn drain(&mut self) {
        self.submit();
        while self.aio.as_ref().is_some_and(Aio::busy) {
            let before = self.aio.as_ref().map_or(0, Aio::in_flight);
            self.complete_with(true);
            if self.aio.as_ref().map_or(0, Aio::in_flight) >= before {
                break; // waiting failed (logged): do not spin
            }
        }
    }

    fn broke(&mut self, pos: usize, e: &dyn std::fmt::Display) {
        self.broken[pos] = true;
        if self.server.log.first(Problem::QueueBroken as u32) {
            tracing::warn!(
                "virtio-blk {}: queue {}: {e}; the device needs a reset",
                self.server.disk.path().display(),
                self.queues[pos].index
            );
        }
        self.interrupt.set_needs_reset();
    }

    /// Report finished asynchronous transfers: status byte, used ring, then one interrupt per
    /// queue (if the driver wants it, §2.7.10). Returns how many it reported.
    fn complete(&mut self) -> usize {
        self.complete_with(false)
    }

    /// [`BlockQueues::complete`], first waiting for a completion when `wait`.
    fn complete_with(&mut self, wait: bool) -> usize {
        let Some(aio) = self.aio.as_mut() else {
            return 0;
        };
        let mut done = std::mem::take(&mut self.completions);
        if wait {
            aio.reap_wait(&mut done);
        } else if aio.in_flight() > 0 {
            aio.reap(&mut done);
        }
        let count = done.len();
        if count == 0 {
            self.completions = done;
            return 0;
        }
        self.reaped_since_reset = true;
        let mut touched = vec![false; self.queues.len()];
        for (p, ok) in done.drain(..) {
            if self.broken.get(p.queue).copied().unwrap_or(true) {
                continue;
            }
            let status = if ok {
                VIRTIO_BLK_S_OK
            } else {
                self.server.problem(
                    Problem::HostIo,
                    format_args!("asynchronous transfer failed"),
                );
                VIRTIO_BLK_S_IOERR
            };
            let _ = vm_memory::Bytes::write_obj(&self.mem, status, p.status);
            let len = if ok { p.used_len } else { 1 };
            match self.queues[p.queue].queue.add_used(&self.mem, p.head, len) {
                Ok(()) => touched[p.queue] = true,
                Err(e) => self.broke(p.queue, &e),
            }
        }
        self.completions = done;
        for (pos, t) in touched.into_iter().enumerate() {
            if t && !self.broken[pos] {
                let q = &mut self.queues[pos];
                if q.queue.needs_notification(&self.mem).unwrap_or(true) {
                    self.interrupt.notify_queue(q.index);
                    self.interrupts += 1;
                }
            }
        }
        count
    }

    /// Submit the batched transfers; fail those the kernel refuses.
    fn submit(&mut self) {
        let Some(aio) = self.aio.as_mut() else {
            return;
        };
        if aio.batched() == 0 {
            return;
        }
        let refused = aio.submit();
        if !refused.is_empty() {
            self.completions
                .extend(refused.into_iter().map(|p| (p, false)));
            self.complete();
        }
    }
}

impl BlockQueues {
    /// Serve what the driver made available on the queue at `pos`, at most one queue's worth
    /// (so a driver that keeps adding requests cannot hold the thread): asynchronous
    /// transfers are submitted as they come, and one interrupt covers those done
    /// synchronously. Notifications are left as they are: [`BlockQueues::settle`] enables
    /// them before the thread sleeps.
    fn serve_avail(&mut self, pos: usize) {
        let server = &mut self.server;
        let mem = &self.mem;
        let chain = &mut self.chain;
        let mut aio = self.aio.as_mut();
        let q = &mut self.queues[pos].queue;
        let poll = &mut self.poll;
        let mut answered = false;
        let mut used_any = false;
        let mut refused = Vec::new();
        let r = serve_available(q, mem, chain, MAX_BUFFERS, &mut used_any, |chain, more| {
            if !answered {
                // The driver answered (before the time serving it takes).
                poll.answered(Instant::now());
                answered = true;
            }
            // Asynchronous only when it buys parallelism: a request alone (queue depth 1) is
            // done right here, saving the completion's trip through the eventfd.
            let engine = aio
                .as_deref_mut()
                .filter(|a| more > 0 || a.busy())
                .map(|a| (a, pos));
            let used = server.serve_with(mem, chain, engine);
            // Each transfer goes to the kernel at once, as fio does: io_submit plugs the block
            // queue for more than two control blocks (fs/aio.c), so in a batch the first
            // transfer would wait until the last one is prepared.
            if let Some(a) = aio.as_deref_mut().filter(|a| a.batched() > 0) {
                refused.extend(a.submit());
            }
            used
        });
        if !refused.is_empty() {
            // Failed at once (IOERR), like transfers that fail in the kernel.
            self.completions
                .extend(refused.into_iter().map(|p| (p, false)));
            self.complete();
        }
        if let Err(e) = r {
            self.broke(pos, &e);
            return;
        }
        let q = &mut self.queues[pos];
        if used_any && q.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.notify_queue(q.index);
            self.interrupts += 1;
        }
    }

    /// One pass over everything: report finished transfers, then serve every queue (new
    /// requests are submitted in the same wake-up as the completions that made room for
    /// them); tell the polling window whether the driver was interrupted.
    fn pass(&mut self) {
        let interrupts = self.interrupts;
        self.complete();
        for pos in 0..self.queues.len() {
            if !self.broken[pos] {
                self.serve_avail(pos);
            }
        }
        if self.interrupts != interrupts {
            self.poll.interrupted(Instant::now());
        }
    }

    /// While the driver is expected to answer an interrupt soon, keep passing over the rings
    /// (yielding between passes) until it does, the window closes, the thread loses its CPU or `deadline`.
    /// The cost is this thread's CPU for at most the window per interrupt; while a driver
    /// keeps answering in time and nothing else wants the CPU, that can be a whole CPU (as
    /// QEMU's polling iothreads).
    fn poll(&mut self, deadline: Instant) {
        let mut looked = Instant::now();
        while let Some(until) = self.poll.poll_until() {
            let now = Instant::now();
            if now.saturating_duration_since(looked) >= PollWindow::PREEMPTED {
                // Descheduled between two looks: the CPU is wanted elsewhere.
                self.poll.contended(now);
                return;
            }
            if now >= until {
                self.poll.expired();
                return;
            }
            if now >= deadline {
                return;
            }
            // Yield rather than spin: a driver thread woken onto this CPU runs at once
            // (a spinning thread would keep it waiting until the window closes), and
            // anything else runnable here takes the CPU, which `contended` then sees.
            std::thread::yield_now();
            self.pass();
            looked = Instant::now();
        }
    }

    /// Before sleeping: reset the completion eventfd and report what completed, then ask for
    /// notifications again (§2.7.10: avail_event, or clear VIRTQ_USED_F_NO_NOTIFY). True when
    /// nothing is left to do (the thread may sleep); false when requests or completions raced
    /// in.
    fn settle(&mut self) -> bool {
        if let Some(aio) = self.aio.as_ref().filter(|_| self.reaped_since_reset) {
            // Completions reaped since the last reset left counts on the eventfd: without
            // this the thread would wake for them again. Non-blocking; completions after this
            // signal it again.
            let _ = aio.event.read();
            self.reaped_since_reset = false;
        }
        let interrupts = self.interrupts;
        let mut more = self.complete() > 0;
        if self.interrupts != interrupts {
            self.poll.interrupted(Instant::now());
        }
        for pos in 0..self.queues.len() {
            if self.broken[pos] {
                continue;
            }
            match self.queues[pos].queue.enable_notification(&self.mem) {
                Ok(pending) => more |= pending,
                Err(e) => self.broke(pos, &e),
            }
        }
        !more
    }

    fn disable_notifications(&mut self) {
        for pos in 0..self.queues.len() {
            if self.broken[pos] {
                continue;
            }
            if let Err(e) = self.queues[pos].queue.disable_notification(&self.mem) {
                self.broke(pos, &e);
            }
        }
    }
}

impl QueueHandler for BlockQueues {
    /// Any wake-up (a queue notification or finished transfers) does the same: pass over
    /// every queue and the completions, poll for more while it pays off, settle, sleep.
    fn queue_notified(&mut self, _index: usize) {
        let deadline = Instant::now() + BUSY_MAX;
        loop {
            self.disable_notifications();
            self.pass();
            self.poll(deadline);
            if self.settle() {
                return;
            }
            if Instant::now() >= deadline {
                // Work keeps coming: back through the event loop (which checks for a stop),
                // straight here again.
                for q in &self.queues {
                    let _ = q.notify.write(1);
                }
                return;
            }
        }
    }
}

/// Serves single requests (separate from the queues so tests can drive it directly).
pub struct RequestServer {
    disk: Arc<DiskImage>,
    features: u64,
    log: Arc<LogOnce>,
    ranges: Vec<(GuestAddress, usize)>,
    counters: Arc<BlockCounters>,
}

impl RequestServer {
    /// A server for `disk` with the negotiated `features`.
    pub fn new(disk: Arc<DiskImage>, features: u64) -> Self {
        RequestServer {
            disk,
            features,
            log: Arc::new(LogOnce::new()),
            ranges: Vec::new(),
            counters: Arc::new(BlockCounters::default()),
        }
    }

    fn problem(&self, p: Problem, what: std::fmt::Arguments<'_>) {
        if self.log.first(p as u32) {
            tracing::warn!(
                "virtio-blk {}: {what} (logged once)",
                self.disk.path().display()
            );
        }
    }

    /// Serve one request synchronously: do it, write the status byte, return the used length.
    pub fn serve(&mut self, mem: &GuestMemory, chain: &Chain) -> u32 {
        self.serve_with(mem, chain, None).unwrap_or(0)
    }

    /// Serve one request; with `aio` (the engine and this queue's position), a data transfer
    /// may go asynchronous: then `None` is returned and the completion reports it.
    fn serve_with(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        aio: Option<(&mut Aio, usize)>,
    ) -> Option<u32> {
        let wlen = chain.writable_len();
        if wlen == 0 {
            self.problem(
                Problem::NoStatus,
                format_args!("request without a status byte"),
            );
            return Some(0);
        }
        let status_at = wlen - 1;
        let (status, written) = match self.plan(mem, chain, status_at) {
            Plan::Reply { status, written } => {
                self.counters.other.fetch_add(1, Ordering::Relaxed);
                (status, written)
            }
            Plan::Transfer { write, offset, len } => {
                let (n, bytes) = if write {
                    (&self.counters.writes, &self.counters.write_bytes)
                } else {
                    (&self.counters.reads, &self.counters.read_bytes)
                };
                n.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(len, Ordering::Relaxed);
                if let Some((aio, queue)) = aio {
                    let mut at = Vec::with_capacity(1);
                    let status_addr = crate::queue::gather(&chain.writable, status_at, 1, &mut at)
                        .then(|| at.first().map(|&(a, _)| a))
                        .flatten();
                    if let Some(status) = status_addr {
                        let p = Pending {
                            queue,
                            head: chain.head,
                            status,
                            expected: len,
                            used_len: if write { 1 } else { (len + 1) as u32 },
                        };
                        if aio.queue(self.disk.file(), mem, &self.ranges, offset, write, p) {
                            return None;
                        }
                    }
                }
                let st = self.transfer(mem, write, offset);
                (
                    st,
                    if write || st != VIRTIO_BLK_S_OK {
                        0
                    } else {
                        len
                    },
                )
            }
        };
        if !write_bytes(mem, &chain.writable, status_at, &[status]) {
            self.problem(Problem::NoStatus, format_args!("status byte outside RAM"));
            return Some(0);
        }
        Some((written + 1).min(u64::from(u32::MAX)) as u32)
    }

    /// Decide what a request needs: an immediate reply (everything but a data transfer is done
    /// here), or a transfer of the guest ranges now in `self.ranges`.
    fn plan(&mut self, mem: &GuestMemory, chain: &Chain, data_len: u64) -> Plan {
        let reply = |status: u8, written: u64| Plan::Reply { status, written };
        if let Some(f) = chain.fault {
            self.problem(Problem::BufferFault, format_args!("{f}"));
            return reply(VIRTIO_BLK_S_IOERR, 0);
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        if chain.readable_len() < HEADER_LEN || !read_bytes(mem, &chain.readable, 0, &mut hdr) {
            self.problem(Problem::ShortHeader, format_args!("request header short"));
            return reply(VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let out_len = chain.readable_len() - HEADER_LEN;
        match kind {
            VIRTIO_BLK_T_IN => match self.prepare(&chain.writable, 0, data_len, sector) {
                Ok(offset) if data_len > 0 => Plan::Transfer {
                    write: false,
                    offset,
                    len: data_len,
                },
                Ok(_) => reply(VIRTIO_BLK_S_OK, 0),
                Err(s) => reply(s, 0),
            },
            VIRTIO_BLK_T_OUT => {
                if self.disk.readonly() {
                    self.problem(Problem::ReadOnly, format_args!("write to a read-only disk"));
                    return reply(VIRTIO_BLK_S_IOERR, 0);
                }
                match self.prepare(&chain.readable, HEADER_LEN, out_len, sector) {
                    Ok(offset) if out_len > 0 => Plan::Transfer {
                        write: true,
                        offset,
                        len: out_len,
                    },
                    Ok(_) => reply(VIRTIO_BLK_S_OK, 0),
                    Err(s) => reply(s, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH if self.has(VIRTIO_BLK_F_FLUSH) => match self.disk.flush() {
                Ok(()) => reply(VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    self.problem(Problem::HostIo, format_args!("flush: {e}"));
                    reply(VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = data_len.min(SERIAL_LEN as u64) as usize;
                let serial = *self.disk.serial();
                if write_bytes(mem, &chain.writable, 0, &serial[..n]) {
                    reply(VIRTIO_BLK_S_OK, n as u64)
                } else {
                    reply(VIRTIO_BLK_S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                reply(self.discard_or_zero(mem, chain, kind, out_len), 0)
            }
            other => {
                self.problem(
                    Problem::Unsupported,
                    format_args!("request type {other} unsupported or not negotiated"),
                );
                reply(VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// Check a transfer of `len` bytes of `bufs` (from byte `start`) at `sector`, and put its
    /// guest ranges in `self.ranges`. Returns the disk offset.
    fn prepare(
        &mut self,
        bufs: &[Buffer],
        start: u64,
        len: u64,
        sector: u64,
    ) -> std::result::Result<u64, u8> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            self.problem(
                Problem::BadLength,
                format_args!("data length {len} is not a multiple of {SECTOR_SIZE}"),
            );
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let Some(offset) = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|&o| self.disk.in_bounds(o, len))
        else {
            self.problem(
                Problem::OutOfBounds,
                format_args!("sector {sector} + {len} bytes is past the end of the disk"),
            );
            return Err(VIRTIO_BLK_S_IOERR);
        };
        self.ranges.clear();
        if !crate::queue::gather(bufs, start, len, &mut self.ranges) {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        Ok(offset)
    }

    /// Do the transfer `prepare` set up, now.
    fn transfer(&mut self, mem: &GuestMemory, write: bool, offset: u64) -> u8 {
        let r = if write {
            self.disk.write_from(mem, &self.ranges, offset)
        } else {
            self.disk.read_into(mem, &self.ranges, offset)
        };
        match r {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                self.problem(
                    Problem::HostIo,
                    format_args!("{} at {offset}: {e}", if write { "write" } else { "read" }),
                );
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// DISCARD / WRITE_ZEROES: `len` bytes of 16-byte segments after the header.
    fn discard_or_zero(&mut self, mem: &GuestMemory, chain: &Chain, kind: u32, len: u64) -> u8 {
        let discard = kind == VIRTIO_BLK_T_DISCARD;
        let feature = if discard {
            VIRTIO_BLK_F_DISCARD
        } else {
            VIRTIO_BLK_F_WRITE_ZEROES
        };
        if self.disk.readonly() {
            self.problem(Problem::ReadOnly, format_args!("write to a read-only disk"));
            return VIRTIO_BLK_S_IOERR;
        }
        if !self.has(feature) {
            return VIRTIO_BLK_S_UNSUPP;
        }
        let count = len / SEGMENT_LEN;
        if !len.is_multiple_of(SEGMENT_LEN) || count == 0 || count > u64::from(MAX_DISCARD_SEG) {
            self.problem(
                Problem::BadSegment,
                format_args!("discard/write-zeroes with {len} bytes of segments"),
            );
            return VIRTIO_BLK_S_IOERR;
        }
        for i in 0..count {
            let mut seg = [0u8; SEGMENT_LEN as usize];
            if !read_bytes(mem, &chain.readable, HEADER_LEN + i * SEGMENT_LEN, &mut seg) {
                return VIRTIO_BLK_S_IOERR;
            }
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Unknown flags, and unmap on a discard, are UNSUPP (§5.2.6.2).
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
                return VIRTIO_BLK_S_UNSUPP;
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = sector
                .checked_mul(SECTOR_SIZE)
                .filter(|&o| sectors <= MAX_DISCARD_SECTORS && self.disk.in_bounds(o, bytes))
            else {
                self.problem(
                    Problem::OutOfBounds,
                    format_args!("discard/write-zeroes of {sectors} sectors at {sector}"),
                );
                return VIRTIO_BLK_S_IOERR;
            };
            if bytes == 0 {
                continue;
            }
            let r = if discard {
                self.disk.discard(offset, bytes)
            } else {
                self.disk.write_zeroes(
                    offset,
                    bytes,
                    flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                )
            };
            if let Err(e) = r {
                self.problem(Problem::HostIo, format_args!("discard/write-zeroes: {e}"));
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }
}

/// Virtio-blk state as data (beyond [`DeviceState`]): which file backs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: std::path::PathBuf,
    pub readonly: bool,
    pub sectors: u64,
}

impl Block {
    /// The disk behind the device, as data.
    pub fn block_state(&self) -> BlockState {
        BlockState {
            path: self.disk.path().to_path_buf(),
            readonly: self.disk.readonly(),
            sectors: self.disk.sectors(),
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
