//! One queue pair's thread: an epoll loop over the receive and transmit queues' eventfds, the
//! back end's descriptor for this pair (when the guest has receive buffers for it), the
//! control queue (first pair only), a wake-up eventfd (the control queue enabled or disabled
//! this pair) and the device's stop eventfd. Nothing polls: the thread sleeps until one of
//! these is ready.
//!
//! Receive (§5.1.6.3, §5.1.6.4): the device holds receive chains it took from the available
//! ring (parsed once) until a frame fills them. A frame is read with one `readv` straight into
//! the guest's buffers: into the first chain without VIRTIO_NET_F_MRG_RXBUF, or across as many
//! chains as the largest frame needs with it (`num_buffers` says how many were used). When the
//! guest has fewer buffers than the largest frame needs, one frame is read into a bounce
//! buffer and delivered once the guest has posted room for it; until then the back end is not
//! read, so its own queue (bounded by the kernel) absorbs or drops what comes — the device
//! never buffers more than one frame. Without buffers at all the back end's descriptor leaves
//! the epoll set until the driver posts some.
//!
//! Transmit (§5.1.6.2): each chain is a header and a frame; the header is checked
//! ([`VnetHeader::check_tx`]) and a clean copy is written in front of the guest's frame with
//! one `writev` from guest memory. Bad frames are dropped and counted.
//!
//! Interrupts (§2.7.10): each pass publishes its used entries, then interrupts once if the
//! driver asked for it (EVENT_IDX). Interrupt moderation ([`Moderation`]) holds an interrupt
//! for completions of transmitted data or for small received frames (acknowledgements) back
//! until the queue's gap since its previous interrupt has passed; the loop's wait is bounded
//! by that deadline, and a stopping thread sends what it held back.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address as _, Bytes as _, GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::features::*;
use super::hdr::{VnetHeader, ETH_HLEN, MAX_FRAME_LEN, VNET_HDR_LEN};
use super::tap::{iovec_guest, iovec_mut, readv, writev, NetBackend, IOV_MAX};
use super::{PairSwitch, Shared};
use crate::queue::{gather, read_bytes, serve_queue, write_bytes, Buffer, Chain, QueueError};
use crate::worker::QueuePosition;
use crate::{ActiveQueue, Error, LogOnce, Result, VirtioInterrupt};
use vireo_hv::{EventFd, GuestMemory};

/// Largest receive: header and frame.
const MAX_RX: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Frames up to this size (without the virtio-net header) are acknowledgement-sized: pure
/// TCP acknowledgements (66-100 bytes with options), ARP ([`acknowledgement_sized`]).
const SMALL_FRAME: usize = 128;

/// Whether a frame of `len` bytes (without the virtio-net header) is acknowledgement-sized.
/// The interrupt moderation holds back the interrupt of a receive pass of such frames only,
/// and that of a transmit pass of anything larger (see [`Worker::signal`]).
fn acknowledgement_sized(len: usize) -> bool {
    len <= SMALL_FRAME
}
/// Frames received per pass before the loop looks at its other sources.
pub(crate) const RX_BUDGET: usize = 64;
/// Buffers a transmit or control chain may have.
const MAX_BUFFERS: usize = super::QUEUE_SIZE as usize;

/// epoll tokens.
const T_STOP: u64 = 0;
const T_RX: u64 = 1;
const T_TX: u64 = 2;
const T_CTRL: u64 = 3;
const T_WAKE: u64 = 4;
const T_BACKEND: u64 = 5;

/// Kinds of problems, for the device's once-per-kind log.
#[derive(Clone, Copy)]
enum Problem {
    TxHeader = 8,
    TxWrite,
    TxShort,
    RxChain,
    RxRead,
    RxTooBig,
    RxHeader,
    Broken,
    Ctrl,
    TxFault,
}

/// The queues of one pair (any may be missing: the driver did not enable it).
#[derive(Default)]
pub(crate) struct PairQueues {
    pub(crate) rx: Option<ActiveQueue>,
    pub(crate) tx: Option<ActiveQueue>,
    pub(crate) ctrl: Option<ActiveQueue>,
}

impl PairQueues {
    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_none() && self.tx.is_none() && self.ctrl.is_none()
    }
}

/// Everything a pair's thread gets.
pub(crate) struct PairContext {
    pub(crate) pair: usize,
    pub(crate) queues: PairQueues,
    pub(crate) mem: GuestMemory,
    pub(crate) features: u64,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) backend: Arc<dyn NetBackend>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) switch: Arc<PairSwitch>,
    pub(crate) log: Arc<LogOnce>,
    pub(crate) stop: EventFd,
    /// Interrupt moderation gap ([`Moderation`]).
    pub(crate) irq_gap: Duration,
}

/// A running pair thread. It ends when the device's stop eventfd fires and hands its state
/// back ([`PairThread::join`]), so a pause keeps every chain the device holds.
pub(crate) struct PairThread {
    name: String,
    handle: JoinHandle<Worker>,
}

impl PairThread {
    pub(crate) fn spawn(name: String, mut ctx: PairContext) -> Result<PairThread> {
        let queues = std::mem::take(&mut ctx.queues);
        let epoll = epoll_for(&ctx, &queues)?;
        Self::start(name, Worker::new(ctx, queues, epoll), true)
    }

    fn start(name: String, mut w: Worker, fresh: bool) -> Result<PairThread> {
        let thread_name = name.clone();
        let handle = crate::worker::spawn_device_thread(name.clone(), move || {
            // The device filter of a jailed VMM, as for every device thread.
            if crate::worker::run_start_hook(&thread_name) {
                w.run(fresh);
            }
            w
        })
        .map_err(|e| Error::io("starting a virtio-net thread", e))?;
        Ok(PairThread { name, handle })
    }

    /// Wait for the thread (its stop eventfd must have fired); `None` if it panicked.
    pub(crate) fn join(self) -> Option<ParkedPair> {
        let name = self.name;
        self.handle
            .join()
            .ok()
            .map(|worker| ParkedPair { name, worker })
    }
}

/// A pair whose thread stopped for a pause: it touches neither guest memory nor the back
/// end until [`ParkedPair::resume`].
pub(crate) struct ParkedPair {
    name: String,
    worker: Worker,
}

impl ParkedPair {
    /// Where the pair's queues stand, for a snapshot (§2.7). Receive chains the device took
    /// but has not filled are not consumed: the receive queue's position is that of the
    /// first of them, so a device restored from it takes them again.
    pub(crate) fn positions(&self) -> Vec<QueuePosition> {
        let w = &self.worker;
        let mut out = Vec::new();
        for q in [&w.rxq, &w.txq, &w.ctrlq].into_iter().flatten() {
            let mut next_avail = q.queue.next_avail();
            if Some(q.index) == w.rxq.as_ref().map(|r| r.index) {
                if let Some(first) = w.held.front() {
                    next_avail = first.avail_idx;
                }
            }
            out.push(QueuePosition {
                index: q.index,
                next_avail,
                next_used: q.queue.next_used(),
            });
        }
        out
    }

    /// Start the thread again; it first serves whatever the driver posted meanwhile.
    pub(crate) fn resume(self) -> Result<PairThread> {
        PairThread::start(self.name, self.worker, false)
    }
}

/// A receive chain the device holds: its writable buffers and their total size.
#[derive(Default)]
struct RxChain {
    head: u16,
    /// Its position in the available ring (what `next_avail` was when it was taken).
    avail_idx: u16,
    bufs: Vec<Buffer>,
    cap: usize,
}

struct Worker {
    ctx: PairContext,
    rxq: Option<ActiveQueue>,
    txq: Option<ActiveQueue>,
    ctrlq: Option<ActiveQueue>,
    epoll: Epoll,
    fd: RawFd,
    /// The back end's descriptor is in the epoll set.
    registered: bool,
    /// Reading the back end failed: it leaves the epoll set for a second.
    backend_failed: bool,
    /// Waiting for receive buffers (the driver gets a notification request).
    parked: bool,
    broken: bool,
    mrg: bool,
    held: VecDeque<RxChain>,
    held_cap: usize,
    spare: Vec<RxChain>,
    /// A frame read into `bounce` that waits for room in the guest.
    pending: Option<usize>,
    bounce: Vec<u8>,
    chain: Chain,
    ranges: Vec<(GuestAddress, usize)>,
    /// Interrupt moderation of the receive and transmit queues.
    rx_irq: Moderation,
    tx_irq: Moderation,
    /// Largest frame (with its header) delivered in the current receive pass.
    rx_largest: usize,
}

/// The epoll set of a pair: stop, its queues, its wake-up eventfd (the back end's descriptor
/// comes and goes).
fn epoll_for(ctx: &PairContext, queues: &PairQueues) -> Result<Epoll> {
    let epoll = Epoll::new().map_err(|e| Error::io("epoll_create", e))?;
    let add = |fd: RawFd, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| Error::io("epoll_ctl", e))
    };
    add(ctx.stop.as_raw_fd(), T_STOP)?;
    if let Some(q) = &queues.rx {
        add(q.notify.as_raw_fd(), T_RX)?;
    }
    if let Some(q) = &queues.tx {
        add(q.notify.as_raw_fd(), T_TX)?;
    }
    if let Some(q) = &queues.ctrl {
        add(q.notify.as_raw_fd(), T_CTRL)?;
    }
    if let Some(w) = ctx.switch.wake.get(ctx.pair) {
        add(w.as_raw_fd(), T_WAKE)?;
    }
    Ok(epoll)
}

impl Worker {
    fn new(ctx: PairContext, queues: PairQueues, epoll: Epoll) -> Self {
        let fd = ctx.backend.queue_fd(ctx.pair);
        let mrg = ctx.features & VIRTIO_NET_F_MRG_RXBUF != 0;
        Worker {
            rxq: queues.rx,
            txq: queues.tx,
            ctrlq: queues.ctrl,
            fd,
            epoll,
            registered: false,
            backend_failed: false,
            parked: false,
            broken: false,
            mrg,
            held: VecDeque::new(),
            held_cap: 0,
            spare: Vec::new(),
            pending: None,
            bounce: vec![0u8; MAX_RX],
            chain: Chain::new(),
            ranges: Vec::new(),
            rx_irq: Moderation::new(ctx.irq_gap),
            tx_irq: Moderation::new(ctx.irq_gap),
            rx_largest: 0,
            ctx,
        }
    }

    /// Count a received frame as dropped and log why (once per kind).
    fn drop_received(&self, p: Problem, what: std::fmt::Arguments<'_>) {
        self.ctx
            .shared
            .stats
            .rx_dropped
            .fetch_add(1, Ordering::Relaxed);
        self.problem(p, what);
    }

    fn problem(&self, p: Problem, what: std::fmt::Arguments<'_>) {
        if self.ctx.log.first(p as u32) {
            tracing::warn!(
                "virtio-net {} pair {}: {what} (logged once)",
                self.ctx.backend.name(),
                self.ctx.pair
            );
        }
    }

    fn enabled(&self) -> bool {
        self.ctx
            .switch
            .enabled
            .get(self.ctx.pair)
            .is_some_and(|e| e.load(Ordering::SeqCst))
    }

    /// Serve until the stop eventfd fires. `fresh`: the first run after activation (a
    /// resumed run also looks at the queues first: notifications may have come meanwhile).
    fn run(&mut self, fresh: bool) {
        if !fresh {
            // Parked for lack of buffers: the driver may have posted some while paused.
            self.parked = false;
        }
        // iovec scratch of this thread (raw pointers: not kept in the worker, which moves
        // between threads across a pause).
        let iov = &mut Vec::with_capacity(64);
        // Buffers made available before the thread started.
        self.tx(iov);
        self.ctrl();
        self.rx(iov);
        self.update_registration();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            self.deliver_interrupts(false);
            // A back end that failed is tried again after a second (no busy loop meanwhile).
            let mut timeout = if self.backend_failed { 1000 } else { -1 };
            if let Some(due) = self.rx_irq.due().into_iter().chain(self.tx_irq.due()).min() {
                // A held-back interrupt: wait no longer than until it is due (epoll counts
                // whole milliseconds; a shorter wait sleeps below when nothing is ready).
                let left = due.saturating_duration_since(Instant::now());
                if left < Duration::from_millis(1) {
                    timeout = 0;
                } else {
                    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
                    timeout = if timeout < 0 { ms } else { timeout.min(ms) };
                }
            }
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll_wait: {e}");
                    self.deliver_interrupts(true);
                    return;
                }
            };
            if n == 0 && timeout == 0 {
                // Nothing ready and an interrupt due within a millisecond: wait for it.
                self.sleep_until_due();
                continue;
            }
            if n == 0 && self.backend_failed {
                self.backend_failed = false;
                self.rx(iov);
            }
            for ev in &events[..n] {
                match ev.data() {
                    T_STOP => {
                        // Nothing the driver was promised stays behind in a stopped thread.
                        self.deliver_interrupts(true);
                        return;
                    }
                    T_RX => {
                        if let Some(q) = &self.rxq {
                            let _ = q.notify.read();
                        }
                        self.parked = false;
                        self.rx(iov);
                    }
                    T_TX => {
                        if let Some(q) = &self.txq {
                            let _ = q.notify.read();
                        }
                        self.tx(iov);
                    }
                    T_CTRL => {
                        if let Some(q) = &self.ctrlq {
                            let _ = q.notify.read();
                        }
                        self.ctrl();
                    }
                    T_WAKE => {
                        if let Some(w) = self.ctx.switch.wake.get(self.ctx.pair) {
                            let _ = w.read();
                        }
                        self.backend_failed = false;
                        self.rx(iov);
                    }
                    T_BACKEND => self.rx(iov),
                    _ => {}
                }
            }
            self.update_registration();
        }
    }

    /// Keep the back end's descriptor in the epoll set exactly while frames can be received.
    fn update_registration(&mut self) {
        let want = !self.broken
            && !self.parked
            && !self.backend_failed
            && self.rxq.is_some()
            && self.enabled();
        if want == self.registered {
            return;
        }
        let r = if want {
            self.epoll.ctl(
                ControlOperation::Add,
                self.fd,
                EpollEvent::new(EventSet::IN, T_BACKEND),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, self.fd, EpollEvent::default())
        };
        match r {
            Ok(()) => self.registered = want,
            Err(e) => {
                self.problem(
                    Problem::RxRead,
                    format_args!("epoll_ctl on the back end: {e}"),
                );
                self.backend_failed = true;
                self.registered = false;
            }
        }
    }

    fn broke(&mut self, e: &dyn std::fmt::Display) {
        self.broken = true;
        self.problem(
            Problem::Broken,
            format_args!("{e}; the device needs a reset"),
        );
        self.ctx.interrupt.set_needs_reset();
    }

    // ---- interrupts ----

    /// Used entries were added to queue `d`; `wanted`: the driver asked for an interrupt
    /// (§2.7.10). It goes out now, or when the queue's moderation gap since its last
    /// interrupt has passed; with `urgent`, now, together with any held back.
    fn signal(&mut self, d: Dir, wanted: bool, urgent: bool) {
        let now = Instant::now();
        let (m, q) = match d {
            Dir::Rx => (&mut self.rx_irq, &self.rxq),
            Dir::Tx => (&mut self.tx_irq, &self.txq),
        };
        let Some(q) = q else { return };
        let send = if urgent {
            // A held-back one is still wanted unless the driver has caught up since.
            let held = m.take_due(now, true);
            if wanted || (held && still_wanted(&q.queue, &self.ctx.mem)) {
                m.sent(now);
                true
            } else {
                false
            }
        } else {
            wanted && m.owe(now)
        };
        if send {
            self.ctx.interrupt.notify_queue(q.index);
        }
    }

    /// Send the held-back interrupts that are due (all of them with `all`). One the driver
    /// no longer wants is dropped: with EVENT_IDX, a driver that has since consumed every
    /// used entry and moved `used_event` past them reads the ring itself after re-enabling
    /// interrupts (§2.7.10), so the interrupt would find nothing.
    fn deliver_interrupts(&mut self, all: bool) {
        let now = Instant::now();
        for d in [Dir::Rx, Dir::Tx] {
            let (m, q) = match d {
                Dir::Rx => (&mut self.rx_irq, &self.rxq),
                Dir::Tx => (&mut self.tx_irq, &self.txq),
            };
            if !m.take_due(now, all) {
                continue;
            }
            let Some(q) = q else { continue };
            if still_wanted(&q.queue, &self.ctx.mem) {
                m.sent(now);
                self.ctx.interrupt.notify_queue(q.index);
            }
        }
    }

    /// Sleep until the earliest held-back interrupt is due (less than a millisecond).
    fn sleep_until_due(&mut self) {
        if let Some(due) = self.rx_irq.due().into_iter().chain(self.tx_irq.due()).min() {
            let left = due.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                std::thread::sleep(left.min(Duration::from_millis(1)));
            }
        }
    }

    // ---- transmit ----

    fn tx(&mut self, iov: &mut Vec<libc::iovec>) {
        if self.broken {
            return;
        }
        let Some(q) = self.txq.as_mut() else {
            return;
        };
        let ctx = &self.ctx;
        let (ranges, fd) = (&mut self.ranges, self.fd);
        // serve_queue decides whether the driver wants an interrupt (EVENT_IDX); when it
        // comes is up to the moderation.
        let wanted = Wanted::default();
        let mut largest = 0;
        let r = serve_queue(
            q,
            &ctx.mem,
            &wanted,
            &mut self.chain,
            MAX_BUFFERS,
            |chain, _| {
                match send_frame(&ctx.mem, chain, ctx.features, fd, ranges, iov) {
                    Ok(len) => {
                        largest = largest.max(len);
                        ctx.shared.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        ctx.shared
                            .stats
                            .tx_bytes
                            .fetch_add(len as u64, Ordering::Relaxed);
                    }
                    Err(why) => {
                        ctx.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        let p = match why {
                            TxDrop::Header(_) => Problem::TxHeader,
                            TxDrop::Write(_) => Problem::TxWrite,
                            TxDrop::Fault => Problem::TxFault,
                            TxDrop::Short => Problem::TxShort,
                        };
                        if ctx.log.first(p as u32) {
                            tracing::warn!(
                                "virtio-net {}: transmit frame dropped: {why} (logged once)",
                                ctx.backend.name()
                            );
                        }
                    }
                }
                Some(0)
            },
        );
        match r {
            Ok(()) => rearm(q, &ctx.mem),
            Err(e) => self.broke(&e),
        }
        if wanted.0.load(Ordering::Relaxed) {
            // Completions of small frames only (the guest's acknowledgements of data it
            // receives) go out at once: held back, they halved a host→guest stream.
            self.signal(Dir::Tx, true, acknowledgement_sized(largest));
        }
    }

    // ---- control ----

    fn ctrl(&mut self) {
        if self.broken {
            return;
        }
        let Some(q) = self.ctrlq.as_mut() else {
            return;
        };
        let ctx = &self.ctx;
        let r = serve_queue(
            q,
            &ctx.mem,
            ctx.interrupt.as_ref(),
            &mut self.chain,
            MAX_BUFFERS,
            |chain, _| Some(control_command(ctx, chain)),
        );
        match r {
            Ok(()) => rearm(q, &ctx.mem),
            Err(e) => self.broke(&e),
        }
    }

    // ---- receive ----

    /// Take available receive chains until the device holds room for the largest frame
    /// (one chain without MRG_RXBUF). Returns true when the available ring ran dry first.
    fn refill(&mut self) -> std::result::Result<bool, QueueError> {
        let Some(q) = self.rxq.as_mut() else {
            return Ok(true);
        };
        let mem = &self.ctx.mem;
        loop {
            let enough = if self.mrg {
                self.held_cap >= MAX_RX
            } else {
                !self.held.is_empty()
            };
            if enough || self.held.len() >= usize::from(q.queue.size()) {
                return Ok(false);
            }
            let avail_idx = q.queue.next_avail();
            let next = q.queue.iter(mem)?.next();
            let Some(c) = next else {
                return Ok(true);
            };
            self.chain.load(mem, c, MAX_BUFFERS)?;
            let cap = self.chain.writable_len();
            let bad = self.chain.fault.is_some()
                || !self.chain.readable.is_empty()
                || cap < VNET_HDR_LEN as u64;
            if bad {
                // A chain nobody can receive into: give it back empty (§5.1.6.3.1).
                if self.ctx.log.first(Problem::RxChain as u32) {
                    tracing::warn!(
                        "virtio-net {}: receive chain with readable, out-of-RAM or too small \
                         buffers returned unused (logged once)",
                        self.ctx.backend.name()
                    );
                }
                q.queue.add_used(mem, self.chain.head, 0)?;
                continue;
            }
            let mut held = self.spare.pop().unwrap_or_default();
            held.head = self.chain.head;
            held.avail_idx = avail_idx;
            held.bufs.clear();
            held.bufs.extend_from_slice(&self.chain.writable);
            held.cap = cap.min(MAX_RX as u64 * 2) as usize;
            self.held_cap += held.cap;
            self.held.push_back(held);
        }
    }

    fn rx(&mut self, iov: &mut Vec<libc::iovec>) {
        if self.broken || self.rxq.is_none() || !self.enabled() {
            return;
        }
        let mut delivered = false;
        self.rx_largest = 0;
        let r = self.rx_frames(&mut delivered, iov);
        if let Some(q) = self.rxq.as_mut() {
            if delivered {
                let wanted = q.queue.needs_notification(&self.ctx.mem).unwrap_or(true);
                // Only small frames (acknowledgements of what the guest sends) wait for the
                // moderation gap: a guest waiting for data would sit idle meanwhile.
                let urgent = !acknowledgement_sized(self.rx_largest.saturating_sub(VNET_HDR_LEN));
                self.signal(Dir::Rx, wanted, urgent);
            }
        }
        if let Err(e) = r {
            self.broke(&e);
        }
    }

    fn rx_frames(
        &mut self,
        delivered: &mut bool,
        iov: &mut Vec<libc::iovec>,
    ) -> std::result::Result<(), QueueError> {
        for _ in 0..RX_BUDGET {
            let exhausted = self.refill()?;
            if let Some(len) = self.pending {
                if !self.deliver_bounce(len)? {
                    return self.park();
                }
                self.pending = None;
                *delivered = true;
                continue;
            }
            if self.held.is_empty() {
                return self.park();
            }
            if self.mrg && self.held_cap < MAX_RX && exhausted {
                // Not room for the largest frame: take one frame aside and wait for room.
                let iov = [iovec_mut(&mut self.bounce)];
                match readv(self.fd, &iov) {
                    Ok(n) => {
                        if self.check_len(n) {
                            self.pending = Some(n);
                        }
                    }
                    Err(e) => return self.read_error(e),
                }
                continue;
            }
            match self.read_in_place(iov) {
                Ok(Some(true)) => *delivered = true,
                Ok(Some(false)) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // Stopped at the budget with frames perhaps left (in the back end, or one taken
        // aside in `pending`, which no back-end readiness would bring back): come back to
        // them after the loop's other sources.
        if let Some(q) = &self.rxq {
            let _ = q.notify.write(1);
        }
        Ok(())
    }

    /// Wait for receive buffers: ask the driver for a notification (unless buffers arrived
    /// meanwhile) and leave the back end alone.
    fn park(&mut self) -> std::result::Result<(), QueueError> {
        if let Some(q) = self.rxq.as_mut() {
            if q.queue.enable_notification(&self.ctx.mem)? {
                // More chains came in: try again on the next loop turn.
                let _ = q.notify.write(1);
                return Ok(());
            }
        }
        self.parked = true;
        Ok(())
    }

    fn read_error(&mut self, e: std::io::Error) -> std::result::Result<(), QueueError> {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            self.problem(Problem::RxRead, format_args!("read: {e}"));
            self.backend_failed = true;
        }
        Ok(())
    }

    /// A frame of `n` bytes (header included) worth delivering?
    fn check_len(&self, n: usize) -> bool {
        if !(VNET_HDR_LEN + ETH_HLEN..=MAX_RX).contains(&n) {
            self.drop_received(
                Problem::RxTooBig,
                format_args!("received frame of {n} bytes dropped"),
            );
            return false;
        }
        true
    }

    /// Read one frame straight into the held chains. `Some(delivered)`, or `None` when the
    /// back end had nothing.
    fn read_in_place(
        &mut self,
        iov: &mut Vec<libc::iovec>,
    ) -> std::result::Result<Option<bool>, QueueError> {
        iov.clear();
        // The guest ranges behind `iov`, to mark in the bitmap of VMM writes afterwards.
        let ranges = &mut self.ranges;
        ranges.clear();
        // The guest's room, chain after chain: each chain contributes exactly `cap` bytes so
        // that byte k of the frame is in the chain `complete` attributes it to; a problem
        // ends the list there (it stays a prefix).
        let mut guest_iov_cap = 0usize;
        let mut chains = 0usize;
        'chains: for c in &self.held {
            if guest_iov_cap >= MAX_RX || (!self.mrg && chains == 1) {
                break;
            }
            let mut want = c.cap;
            for b in &c.bufs {
                let take = (b.len as usize).min(want);
                if take == 0 {
                    continue;
                }
                let mut at = b.addr;
                for s in self.ctx.mem.get_slices(b.addr, take) {
                    let Ok(s) = s else { break 'chains };
                    if iov.len() >= IOV_MAX - 1 {
                        break 'chains;
                    }
                    guest_iov_cap += s.len();
                    iov.push(iovec_guest(&s));
                    ranges.push((at, s.len()));
                    at = at.unchecked_add(s.len() as u64);
                }
                want -= take;
            }
            chains += 1;
        }
        // Anything past the guest's room lands here and marks the frame too big.
        iov.push(iovec_mut(&mut self.bounce));
        let r = readv(self.fd, iov);
        iov.clear();
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                self.read_error(e)?;
                return Ok(None);
            }
        };
        // The kernel wrote guest memory behind vm-memory's back, as `sys::preadv` does.
        crate::sys::mark_filled_ranges(&self.ctx.mem, &self.ranges, n);
        if !self.check_len(n) {
            return Ok(Some(false));
        }
        if n > guest_iov_cap {
            self.drop_received(
                Problem::RxTooBig,
                format_args!("frame of {n} bytes larger than the guest's receive buffers"),
            );
            return Ok(Some(false));
        }
        self.complete(n, None)
    }

    /// Deliver the frame waiting in the bounce buffer if the held chains have room.
    fn deliver_bounce(&mut self, len: usize) -> std::result::Result<bool, QueueError> {
        if self.held_cap < len {
            return Ok(false);
        }
        self.complete(len, Some(len)).map(|_| true)
    }

    /// A frame of `n` bytes is in the first chains (or, with `from_bounce`, in the bounce
    /// buffer): fix its header, hand the chains to the driver.
    fn complete(
        &mut self,
        n: usize,
        from_bounce: Option<usize>,
    ) -> std::result::Result<Option<bool>, QueueError> {
        let mem = &self.ctx.mem;
        // Chains the frame spans.
        let mut left = n;
        let mut count = 0usize;
        for c in &self.held {
            if left == 0 {
                break;
            }
            left -= left.min(c.cap);
            count += 1;
        }
        let Some(first) = self.held.front() else {
            return Ok(Some(false));
        };
        let mut raw = [0u8; VNET_HDR_LEN];
        match from_bounce {
            Some(_) => raw.copy_from_slice(&self.bounce[..VNET_HDR_LEN]),
            None => {
                if !read_bytes(mem, &first.bufs, 0, &mut raw) {
                    return Ok(Some(false));
                }
            }
        }
        let Some(h) = VnetHeader::from_bytes(&raw).for_rx(self.ctx.features, count as u16) else {
            self.drop_received(
                Problem::RxHeader,
                format_args!("received frame with offloads the driver did not accept dropped"),
            );
            return Ok(Some(false));
        };
        let hb = h.to_bytes();
        if from_bounce.is_some() {
            self.bounce[..VNET_HDR_LEN].copy_from_slice(&hb);
        }
        let Some(q) = self.rxq.as_mut() else {
            return Ok(Some(false));
        };
        let mut at = 0usize;
        for i in 0..count {
            let Some(c) = self.held.pop_front() else {
                break;
            };
            self.held_cap -= c.cap;
            let len = (n - at).min(c.cap);
            if from_bounce.is_some() {
                write_bytes(mem, &c.bufs, 0, &self.bounce[at..at + len]);
            } else if i == 0 {
                write_bytes(mem, &c.bufs, 0, &hb);
            }
            q.queue.add_used(mem, c.head, len as u32)?;
            at += len;
            self.spare.push(c);
        }
        self.rx_largest = self.rx_largest.max(n);
        let stats = &self.ctx.shared.stats;
        stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        stats
            .rx_bytes
            .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Ok(Some(true))
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Rx,
    Tx,
}

/// Interrupt moderation of one queue: at most one interrupt per `gap`. An interrupt the
/// driver asked for inside the gap is held back until the gap has passed, never longer.
#[derive(Debug)]
pub(crate) struct Moderation {
    gap: Duration,
    last: Option<Instant>,
    owed: bool,
}

impl Moderation {
    pub(crate) fn new(gap: Duration) -> Self {
        Moderation {
            gap,
            last: None,
            owed: false,
        }
    }

    /// The driver wants an interrupt at `now`: true when it goes out at once (then counted
    /// as sent), false when it is held back until [`Moderation::due`].
    pub(crate) fn owe(&mut self, now: Instant) -> bool {
        if self.owed {
            return false;
        }
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.gap => {
                self.owed = true;
                false
            }
            _ => {
                self.last = Some(now);
                true
            }
        }
    }

    /// When the held-back interrupt is due.
    pub(crate) fn due(&self) -> Option<Instant> {
        if !self.owed {
            return None;
        }
        Some(self.last.map_or(Instant::now(), |t| t + self.gap))
    }

    /// A held-back interrupt that is due at `now` (any, with `all`), no longer held.
    pub(crate) fn take_due(&mut self, now: Instant, all: bool) -> bool {
        let due = self.due().is_some_and(|d| all || d <= now);
        if due {
            self.owed = false;
        }
        due
    }

    pub(crate) fn sent(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

/// With EVENT_IDX, whether the driver still wants an interrupt for the used entries published
/// so far: `used_event` (after the available ring, §2.7.6) lies before the used index. A
/// driver that set it to its own last seen index after catching up waits for new entries.
/// Without EVENT_IDX, or when the field cannot be read, it does.
fn still_wanted(q: &virtio_queue::Queue, mem: &GuestMemory) -> bool {
    if !q.event_idx_enabled() {
        return true;
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    let at = GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(q.size()));
    let Some(Ok(used_event)) = at.map(|a| mem.read_obj::<u16>(a)) else {
        return true;
    };
    let used_event = u16::from_le(used_event);
    q.next_used().wrapping_sub(used_event).wrapping_sub(1) < 0x8000
}

/// Records that `serve_queue` found the driver wants an interrupt, instead of sending it.
#[derive(Default)]
struct Wanted(std::sync::atomic::AtomicBool);

impl VirtioInterrupt for Wanted {
    fn notify_queue(&self, _queue: usize) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn notify_config(&self) {}
    fn set_needs_reset(&self) {}
}

/// `queue::serve_queue` stops after a queue's worth of chains without asking the driver for a
/// notification, and with EVENT_IDX a driver then sees no reason to notify again (its
/// `avail_event` is stale). So after each pass ask for one (§2.7.10), and when chains are
/// already waiting signal our own eventfd so the loop comes back to them after its other
/// sources.
pub(crate) fn rearm(q: &mut ActiveQueue, mem: &GuestMemory) {
    if q.queue.enable_notification(mem).unwrap_or(true) {
        let _ = q.notify.write(1);
    }
}

/// Why a transmitted frame was dropped.
#[derive(Debug, thiserror::Error)]
enum TxDrop {
    #[error("a buffer lies outside guest RAM or the chain is misordered")]
    Fault,
    #[error("chain shorter than a virtio-net header")]
    Short,
    #[error(transparent)]
    Header(#[from] super::hdr::TxHeaderError),
    #[error("writing to the back end: {0}")]
    Write(std::io::Error),
}

/// Send the frame of one transmit chain; returns the frame's length.
fn send_frame(
    mem: &GuestMemory,
    chain: &Chain,
    features: u64,
    fd: RawFd,
    ranges: &mut Vec<(GuestAddress, usize)>,
    iov: &mut Vec<libc::iovec>,
) -> std::result::Result<usize, TxDrop> {
    if chain.fault.is_some() {
        return Err(TxDrop::Fault);
    }
    let total = chain.readable_len();
    if total < VNET_HDR_LEN as u64 {
        return Err(TxDrop::Short);
    }
    let frame_len = usize::try_from(total - VNET_HDR_LEN as u64).unwrap_or(usize::MAX);
    let mut raw = [0u8; VNET_HDR_LEN];
    if !read_bytes(mem, &chain.readable, 0, &mut raw) {
        return Err(TxDrop::Fault);
    }
    let mut hdr = VnetHeader::from_bytes(&raw)
        .check_tx(frame_len, features)?
        .to_bytes();
    ranges.clear();
    if !gather(
        &chain.readable,
        VNET_HDR_LEN as u64,
        frame_len as u64,
        ranges,
    ) {
        return Err(TxDrop::Fault);
    }
    iov.clear();
    // The checked copy of the header, not the guest's (which it may change meanwhile).
    iov.push(iovec_mut(&mut hdr));
    for &(addr, len) in ranges.iter() {
        for s in mem.get_slices(addr, len) {
            let s = s.map_err(|_| TxDrop::Fault)?;
            if iov.len() >= IOV_MAX {
                return Err(TxDrop::Fault);
            }
            iov.push(iovec_guest(&s));
        }
    }
    let r = writev(fd, iov);
    iov.clear();
    r.map_err(TxDrop::Write)?;
    Ok(frame_len)
}

/// Serve one control command (§5.1.6.5): class, command, data, then the ack byte the device
/// writes. Returns the used length.
fn control_command(ctx: &PairContext, chain: &Chain) -> u32 {
    let mem = &ctx.mem;
    let wlen = chain.writable_len();
    if chain.fault.is_some() || wlen == 0 {
        if ctx.log.first(Problem::Ctrl as u32) {
            tracing::warn!("virtio-net: malformed control command (logged once)");
        }
        return 0;
    }
    let mut head = [0u8; 2];
    let ack = if read_bytes(mem, &chain.readable, 0, &mut head) {
        let data_len = chain.readable_len() - 2;
        match (head[0], head[1]) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if data_len >= 2 => {
                let mut b = [0u8; 2];
                if read_bytes(mem, &chain.readable, 2, &mut b) {
                    set_pairs(
                        ctx.features,
                        &*ctx.backend,
                        &ctx.switch,
                        &ctx.shared,
                        &ctx.log,
                        u16::from_le_bytes(b),
                    )
                } else {
                    VIRTIO_NET_ERR
                }
            }
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)
                if ctx.features & VIRTIO_NET_F_GUEST_ANNOUNCE != 0 =>
            {
                ctx.shared
                    .status
                    .fetch_and(!VIRTIO_NET_S_ANNOUNCE, Ordering::SeqCst);
                VIRTIO_NET_OK
            }
            (class, cmd) => {
                if ctx.log.first(Problem::Ctrl as u32) {
                    tracing::warn!(
                        "virtio-net: control command {class}/{cmd} not supported (logged once)"
                    );
                }
                VIRTIO_NET_ERR
            }
        }
    } else {
        VIRTIO_NET_ERR
    };
    if write_bytes(mem, &chain.writable, wlen - 1, &[ack]) {
        1
    } else {
        0
    }
}

/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: use the first `n` pairs (§5.1.6.5.5). The back end stops
/// delivering to the others before the command completes.
pub(crate) fn set_pairs(
    features: u64,
    backend: &dyn NetBackend,
    switch: &PairSwitch,
    shared: &Shared,
    log: &LogOnce,
    n: u16,
) -> u8 {
    let pairs = switch.enabled.len();
    if features & VIRTIO_NET_F_MQ == 0
        || !(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN..=VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).contains(&n)
        || usize::from(n) > pairs
    {
        return VIRTIO_NET_ERR;
    }
    let n = usize::from(n);
    for i in 0..pairs {
        let on = i < n;
        if let Err(e) = backend.set_queue_enabled(i, on) {
            if log.first(Problem::Ctrl as u32) {
                tracing::warn!(
                    "virtio-net {}: queue {i}: {e} (logged once)",
                    backend.name()
                );
            }
            return VIRTIO_NET_ERR;
        }
        let was = switch.enabled[i].swap(on, Ordering::SeqCst);
        if was != on {
            if let Some(w) = switch.wake.get(i) {
                let _ = w.write(1);
            }
        }
    }
    shared.active_pairs.store(n as u16, Ordering::SeqCst);
    VIRTIO_NET_OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::SplitQueueDriver;
    use crate::test_util::*;

    #[test]
    fn acknowledgement_sized_counts_the_frame_without_its_header() {
        // A 66-byte pure ACK and the limit are; one byte more is not, on either queue (the
        // receive side passes the length without the header it read).
        assert!(acknowledgement_sized(66));
        assert!(acknowledgement_sized(SMALL_FRAME));
        assert!(!acknowledgement_sized(SMALL_FRAME + 1));
        assert!(!acknowledgement_sized(SMALL_FRAME + VNET_HDR_LEN));
    }

    #[test]
    fn moderation_holds_back_inside_the_gap_only() {
        let gap = Duration::from_micros(500);
        let t0 = Instant::now();
        let mut m = Moderation::new(gap);
        assert!(m.owe(t0), "the first goes out at once");
        assert!(m.due().is_none());
        let t1 = t0 + Duration::from_micros(100);
        assert!(!m.owe(t1), "inside the gap: held back");
        assert!(!m.owe(t1), "already owed: still one");
        assert_eq!(m.due(), Some(t0 + gap));
        assert!(!m.take_due(t1, false));
        assert!(m.take_due(t0 + gap, false));
        assert!(m.due().is_none());
        m.sent(t0 + gap);
        // After the gap a new one goes out at once.
        assert!(m.owe(t0 + gap * 2));
        assert!(!m.owe(t0 + gap * 2 + Duration::from_micros(1)));
        assert!(m.take_due(t0, true), "all: taken whatever the time");
        // No gap: every one at once.
        let mut z = Moderation::new(Duration::ZERO);
        assert!(z.owe(t0) && z.owe(t0) && z.owe(t0));
    }

    #[test]
    fn used_event_says_whether_an_interrupt_is_still_wanted() {
        let mem = guest_memory();
        let d = SplitQueueDriver::new(&mem, QUEUE_BASE, 16);
        let mut q = d.queue().unwrap();
        q.set_next_used(5);
        // Without EVENT_IDX: always.
        assert!(still_wanted(&q, &mem));
        q.set_event_idx(true);
        for (used_event, wanted) in [(4, true), (0, true), (5, false), (9, false)] {
            d.set_used_event(&mem, used_event);
            assert_eq!(still_wanted(&q, &mem), wanted, "used_event {used_event}");
        }
        // Across the wrap of the 16-bit indices.
        q.set_next_used(2);
        d.set_used_event(&mem, 0xfffe);
        assert!(still_wanted(&q, &mem));
        d.set_used_event(&mem, 2);
        assert!(!still_wanted(&q, &mem));
    }
}
