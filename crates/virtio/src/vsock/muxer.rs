//! The vsock device's thread: one epoll loop over the three queues' eventfds, the host's
//! listening Unix socket, host sockets waiting to say which guest port they want, and every
//! connection's host socket. It moves packets between the guest's queues and the host
//! sockets and runs each connection's state machine (§5.10.6): REQUEST/RESPONSE set-up,
//! RW data within the credit each side grants, SHUTDOWN (either direction), RST.
//!
//! Packets for the guest wait for receive buffers in two places only, both bounded: flags on
//! each connection (a connection is in the send queue at most once) and a queue of RSTs for
//! packets that matched no connection ([`MAX_PENDING_RSTS`], further ones are dropped). Data
//! from a host socket is read straight into a receive buffer, never ahead of it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{Conn, ConnState};
use super::packet::*;
use super::VsockBackend;
use crate::net::tap::{iovec_guest, readv, IOV_MAX};
use crate::queue::{gather, read_bytes, serve_queue, write_bytes, Chain, QueueError};
use crate::{ActiveQueue, LogOnce, VirtioInterrupt};
use vireo_hv::{EventFd, GuestMemory};

/// Most connections at once (each may hold up to `CONN_BUF_ALLOC` bytes from the guest).
pub const MAX_CONNECTIONS: usize = 512;
/// Most host sockets accepted but not yet past their `CONNECT` line.
pub const MAX_PENDING_HOST: usize = 64;
/// Most RSTs waiting for receive buffers.
pub const MAX_PENDING_RSTS: usize = 256;
/// How long a host socket has to send its `CONNECT <port>\n` line, and the guest to answer a
/// REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection the guest closed may take to flush its data to the host.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First port of those given to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Buffers a packet's chain may have.
const MAX_BUFFERS: usize = 64;

const T_STOP: u64 = 0;
const T_RX: u64 = 1;
const T_TX: u64 = 2;
const T_EVENT: u64 = 3;
const T_LISTEN: u64 = 4;
const FIRST_TOKEN: u64 = 16;

/// Kinds of problems, for the once-per-kind log.
#[derive(Clone, Copy)]
enum Problem {
    BadPacket = 0,
    BadChain,
    CreditLie,
    Accept,
    Connect,
    HostIo,
    Broken,
    Protocol,
    Limit,
}

/// The queues: receive (0), transmit (1), event (2).
#[derive(Default)]
pub(crate) struct Queues {
    pub(crate) rx: Option<ActiveQueue>,
    pub(crate) tx: Option<ActiveQueue>,
    pub(crate) event: Option<ActiveQueue>,
}

/// What the thread gets.
pub(crate) struct MuxContext {
    pub(crate) guest_cid: u64,
    pub(crate) mem: GuestMemory,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) backend: Arc<VsockBackend>,
    pub(crate) log: Arc<LogOnce>,
    pub(crate) stop: EventFd,
    pub(crate) connections: Arc<AtomicUsize>,
    /// Set when the driver must be told of a transport reset (after a restore); cleared once
    /// the event is in the event queue.
    pub(crate) reset_pending: Arc<AtomicBool>,
}

/// A host socket accepted on the listening socket, before its `CONNECT` line.
struct PendingHost {
    stream: UnixStream,
    deadline: Instant,
}

type Key = (u32, u32);

/// Everything but the queues (so a queue and the connections can be borrowed together).
struct Core {
    ctx: MuxContext,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    pending: HashMap<u64, PendingHost>,
    sendq: VecDeque<Key>,
    rsts: VecDeque<Header>,
    next_token: u64,
    next_port: u32,
    /// Earliest deadline of a pending socket or connection (a hint: recomputed when it
    /// passes).
    next_deadline: Option<Instant>,
    ranges: Vec<(GuestAddress, usize)>,
    /// The listening socket is in the epoll set (not while at the connection limits).
    listening: bool,
}

pub(crate) struct Muxer {
    core: Core,
    queues: Queues,
    chain: Chain,
    broken: bool,
}

impl Muxer {
    pub(crate) fn new(ctx: MuxContext, queues: Queues) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, t: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, t))
        };
        add(ctx.stop.as_raw_fd(), T_STOP)?;
        if let Some(q) = &queues.rx {
            add(q.notify.as_raw_fd(), T_RX)?;
        }
        if let Some(q) = &queues.tx {
            add(q.notify.as_raw_fd(), T_TX)?;
        }
        if let Some(q) = &queues.event {
            add(q.notify.as_raw_fd(), T_EVENT)?;
        }
        add(ctx.backend.listener.as_raw_fd(), T_LISTEN)?;
        Ok(Muxer {
            core: Core {
                ctx,
                epoll,
                conns: HashMap::new(),
                tokens: HashMap::new(),
                pending: HashMap::new(),
                sendq: VecDeque::new(),
                rsts: VecDeque::new(),
                next_token: FIRST_TOKEN,
                next_port: FIRST_HOST_PORT,
                next_deadline: None,
                ranges: Vec::new(),
                listening: true,
            },
            queues,
            chain: Chain::new(),
            broken: false,
        })
    }

    pub(crate) fn run(&mut self) {
        self.events();
        self.tx();
        self.core.accept_all();
        self.rx();
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout = match self.core.next_deadline {
                Some(d) => {
                    d.saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(10_000) as i32
                        + 1
                }
                None => -1,
            };
            let n = match self.core.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    T_STOP => return,
                    T_RX => {
                        if let Some(q) = &self.queues.rx {
                            let _ = q.notify.read();
                        }
                    }
                    T_TX => {
                        if let Some(q) = &self.queues.tx {
                            let _ = q.notify.read();
                        }
                        self.tx();
                    }
                    T_EVENT => {
                        // Event buffers stay available until an event is due.
                        if let Some(q) = &self.queues.event {
                            let _ = q.notify.read();
                        }
                        self.events();
                    }
                    T_LISTEN => self.core.accept_all(),
                    t => self.core.socket_event(t, ev.event_set()),
                }
            }
            self.core.expire();
            self.core.update_listening();
            self.rx();
            self.core
                .ctx
                .connections
                .store(self.core.conns.len(), Ordering::Relaxed);
        }
    }

    fn broke(&mut self, e: &dyn std::fmt::Display) {
        self.broken = true;
        self.core.problem(
            Problem::Broken,
            format_args!("{e}; the device needs a reset"),
        );
        self.core.ctx.interrupt.set_needs_reset();
    }

    /// Post a due transport reset (§5.10.6.7) in an event buffer, if the driver gave one.
    fn events(&mut self) {
        if self.broken || !self.core.ctx.reset_pending.load(Ordering::SeqCst) {
            return;
        }
        let Some(q) = self.queues.event.as_mut() else {
            return;
        };
        let mem = self.core.ctx.mem.clone();
        let mut used = false;
        let mut sent = false;
        let mut serve = || -> Result<(), QueueError> {
            // Bounded: every pass uses a chain or ends.
            for _ in 0..q.queue.size() {
                let next = q.queue.iter(&mem)?.next();
                let Some(c) = next else {
                    return Ok(());
                };
                self.chain.load(&mem, c, MAX_BUFFERS)?;
                let ev = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
                let ok = self.chain.fault.is_none()
                    && self.chain.readable.is_empty()
                    && write_bytes(&mem, &self.chain.writable, 0, &ev);
                if !ok {
                    self.core.problem(
                        Problem::BadChain,
                        format_args!("event chain unusable (readable, outside RAM or short)"),
                    );
                }
                q.queue
                    .add_used(&mem, self.chain.head, if ok { EVENT_LEN as u32 } else { 0 })?;
                used = true;
                if ok {
                    sent = true;
                    return Ok(());
                }
            }
            Ok(())
        };
        let r = serve();
        if used && q.queue.needs_notification(&mem).unwrap_or(true) {
            self.core.ctx.interrupt.notify_queue(q.index);
        }
        if sent {
            self.core.ctx.reset_pending.store(false, Ordering::SeqCst);
            tracing::debug!("virtio-vsock: transport reset sent to the driver");
        }
        if let Err(e) = r {
            self.broke(&e);
        }
    }

    /// Where the queues stand (for a snapshot, taken while the thread is stopped).
    pub(crate) fn positions(&self) -> Vec<crate::worker::QueuePosition> {
        [&self.queues.rx, &self.queues.tx, &self.queues.event]
            .into_iter()
            .flatten()
            .map(|q| crate::worker::QueuePosition {
                index: q.index,
                next_avail: q.queue.next_avail(),
                next_used: q.queue.next_used(),
            })
            .collect()
    }

    /// Serve the transmit queue: every packet the guest sent.
    fn tx(&mut self) {
        if self.broken {
            return;
        }
        let Some(q) = self.queues.tx.as_mut() else {
            return;
        };
        let core = &mut self.core;
        let mem = core.ctx.mem.clone();
        let interrupt = core.ctx.interrupt.clone();
        let r = serve_queue(
            q,
            &mem,
            interrupt.as_ref(),
            &mut self.chain,
            MAX_BUFFERS,
            |chain, _| {
                core.packet_from_guest(chain);
                Some(0)
            },
        );
        match r {
            Ok(()) => crate::net::pair::rearm(q, &mem),
            Err(e) => self.broke(&e),
        }
    }

    /// Fill receive buffers with what is waiting for the guest.
    fn rx(&mut self) {
        if self.broken {
            return;
        }
        let mut used = false;
        let r = self.rx_packets(&mut used);
        if let Some(q) = self.queues.rx.as_mut() {
            if used
                && q.queue
                    .needs_notification(&self.core.ctx.mem)
                    .unwrap_or(true)
            {
                self.core.ctx.interrupt.notify_queue(q.index);
            }
        }
        if let Err(e) = r {
            self.broke(&e);
        }
    }

    fn rx_packets(&mut self, used: &mut bool) -> Result<(), QueueError> {
        let Some(q) = self.queues.rx.as_mut() else {
            return Ok(());
        };
        let core = &mut self.core;
        let mem = core.ctx.mem.clone();
        // Bounded: each pass sends a packet or drops an item; at most a queue's worth.
        for _ in 0..usize::from(q.queue.size()) * 2 {
            // What goes next: RSTs first, then connections in turn.
            let item = if core.rsts.is_empty() {
                loop {
                    match core.sendq.front().copied() {
                        None => break None,
                        Some(key) => match core.conns.get_mut(&key) {
                            Some(c) if c.has_control() || c.wants_data() => break Some(key),
                            Some(c) => {
                                c.queued = false;
                                core.sendq.pop_front();
                                core.touch(key);
                            }
                            None => {
                                core.sendq.pop_front();
                            }
                        },
                    }
                }
            } else {
                Some((0, 0))
            };
            let Some(key) = item else {
                return Ok(());
            };
            let next = q.queue.iter(&mem)?.next();
            let Some(c) = next else {
                if q.queue.enable_notification(&mem)? {
                    continue;
                }
                return Ok(());
            };
            self.chain.load(&mem, c, MAX_BUFFERS)?;
            let cap = self.chain.writable_len();
            if self.chain.fault.is_some() || !self.chain.readable.is_empty() || cap < HDR_LEN as u64
            {
                core.problem(
                    Problem::BadChain,
                    format_args!("receive chain unusable (readable, outside RAM or short)"),
                );
                q.queue.add_used(&mem, self.chain.head, 0)?;
                *used = true;
                continue;
            }
            let len = if core.rsts.is_empty() {
                match core.fill_packet(key, &self.chain) {
                    Some(len) => len,
                    None => {
                        // Nothing after all (the host socket had no data): the chain goes
                        // back for the next packet.
                        q.queue.go_to_previous_position();
                        continue;
                    }
                }
            } else {
                let Some(h) = core.rsts.pop_front() else {
                    continue;
                };
                write_bytes(&mem, &self.chain.writable, 0, &h.to_bytes());
                HDR_LEN as u32
            };
            q.queue.add_used(&mem, self.chain.head, len)?;
            *used = true;
        }
        // Stopped at the bound with work left: come back after the other sources.
        let _ = q.notify.write(1);
        Ok(())
    }
}

impl Core {
    fn problem(&self, p: Problem, what: std::fmt::Arguments<'_>) {
        if self.ctx.log.first(p as u32) {
            tracing::warn!(
                "virtio-vsock {}: {what} (logged once)",
                self.ctx.backend.path.display()
            );
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_TOKEN);
        t
    }

    /// Queue an RST answering `h` (a packet that matched no connection).
    fn rst_reply(&mut self, h: &Header) {
        if h.op == VIRTIO_VSOCK_OP_RST {
            return;
        }
        self.push_rst(Header {
            src_cid: VMADDR_CID_HOST,
            dst_cid: self.ctx.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op: VIRTIO_VSOCK_OP_RST,
            ..Default::default()
        });
    }

    fn push_rst(&mut self, h: Header) {
        if self.rsts.len() < MAX_PENDING_RSTS {
            self.rsts.push_back(h);
        } else {
            self.problem(
                Problem::Limit,
                format_args!("{MAX_PENDING_RSTS} RSTs wait for receive buffers; dropping more"),
            );
        }
    }

    /// End connection `key`: its host socket closes; with `rst` the guest is told.
    fn close(&mut self, key: Key, rst: bool) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        if c.interest != 0 {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.remove(&c.token);
        if rst {
            self.push_rst(Header {
                src_cid: VMADDR_CID_HOST,
                dst_cid: self.ctx.guest_cid,
                src_port: c.local_port,
                dst_port: c.peer_port,
                type_: VIRTIO_VSOCK_TYPE_STREAM,
                op: VIRTIO_VSOCK_OP_RST,
                ..Default::default()
            });
        }
    }

    /// After anything changed on a connection: end it when both directions are done, keep its
    /// epoll interest right, and put it in the send queue when it has something for the guest.
    fn touch(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let guest_done = c.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0 && c.buf.is_empty();
        let host_done = c.host_eof && c.shutdown_sent & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0;
        if (c.peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_ALL && c.buf.is_empty())
            || (guest_done && host_done)
        {
            self.close(key, true);
            return;
        }
        if c.buf.capacity() > 64 << 10 && c.buf.is_empty() {
            c.buf.shrink_to_fit();
        }
        let mut want = 0u32;
        if !c.hup {
            if c.wants_input() {
                want |= EventSet::IN.bits();
            }
            if !c.buf.is_empty() {
                want |= EventSet::OUT.bits();
            }
        }
        if want != c.interest {
            let fd = c.stream.as_raw_fd();
            let ev = EpollEvent::new(EventSet::from_bits_truncate(want), c.token);
            let r = match (c.interest, want) {
                (0, _) => self.epoll.ctl(ControlOperation::Add, fd, ev),
                (_, 0) => self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
                _ => self.epoll.ctl(ControlOperation::Modify, fd, ev),
            };
            match r {
                Ok(()) => c.interest = want,
                Err(e) => {
                    self.problem(Problem::HostIo, format_args!("epoll_ctl: {e}"));
                    self.close(key, true);
                    return;
                }
            }
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if !c.queued && (c.has_control() || c.wants_data()) {
            c.queued = true;
            self.sendq.push_back(key);
        }
    }

    // ---- host side ----

    fn at_limit(&self) -> bool {
        self.pending.len() >= MAX_PENDING_HOST || self.conns.len() >= MAX_CONNECTIONS
    }

    /// Keep the listening socket in the epoll set exactly while more host connections can
    /// be taken; when it comes back, take what waits.
    fn update_listening(&mut self) {
        let want = !self.at_limit();
        if want == self.listening {
            return;
        }
        let fd = self.ctx.backend.listener.as_raw_fd();
        let r = if want {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, T_LISTEN),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match r {
            Ok(()) => {
                self.listening = want;
                if want {
                    self.accept_all();
                }
            }
            Err(e) => self.problem(Problem::Accept, format_args!("epoll_ctl: {e}")),
        }
    }

    fn accept_all(&mut self) {
        loop {
            if self.at_limit() {
                // Leave the rest in the listening socket's backlog (the kernel bounds it, and
                // host programs wait in connect): taken once there is room again.
                tracing::debug!(
                    "virtio-vsock: {} host connections before their CONNECT line, {} open: \
                     further ones wait in the backlog",
                    self.pending.len(),
                    self.conns.len()
                );
                return;
            }
            match self.ctx.backend.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let t = self.token();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            stream.as_raw_fd(),
                            EpollEvent::new(EventSet::IN, t),
                        )
                        .is_err()
                    {
                        continue;
                    }
                    let deadline = Instant::now() + CONNECT_TIMEOUT;
                    self.next_deadline =
                        Some(self.next_deadline.map_or(deadline, |d| d.min(deadline)));
                    self.pending.insert(t, PendingHost { stream, deadline });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.problem(Problem::Accept, format_args!("accept: {e}"));
                    return;
                }
            }
        }
    }

    fn socket_event(&mut self, token: u64, events: EventSet) {
        if self.pending.contains_key(&token) {
            self.connect_line(token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::IN) {
            c.readable = true;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // No more readiness will come: leave the epoll set, read what is left when the
            // guest has room.
            c.hup = true;
            c.readable = true;
        }
        if events.contains(EventSet::OUT) || c.hup {
            self.flush(key);
        }
        self.touch(key);
    }

    /// A pending host socket is readable: its `CONNECT <port>\n` line, complete or not.
    fn connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut peek = [0u8; MAX_CONNECT_LINE];
        let n = match recv(p.stream.as_raw_fd(), &mut peek, libc::MSG_PEEK) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => 0,
        };
        let line_end = peek[..n].iter().position(|&b| b == b'\n');
        let port = match line_end {
            None if n > 0 && n < MAX_CONNECT_LINE => return, // wait for the rest
            None => None,
            Some(end) => {
                let mut line = vec![0u8; end + 1];
                match p.stream.read_exact(&mut line) {
                    Ok(()) => parse_connect(&line[..end]),
                    Err(_) => None,
                }
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let Some(port) = port else {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            return; // closes the socket
        };
        // The socket stays registered under the same token, for input, until the guest
        // answers: then `touch` sets the interest it needs.
        let mut local = self.next_port;
        while self.conns.contains_key(&(local, port)) {
            local = local.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_port = local.wrapping_add(1).max(FIRST_HOST_PORT);
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        self.next_deadline = Some(self.next_deadline.map_or(deadline, |d| d.min(deadline)));
        let mut c = Conn::new(
            p.stream,
            token,
            local,
            port,
            ConnState::Connecting { deadline },
        );
        c.interest = EventSet::IN.bits();
        c.send_request = true;
        let key = (local, port);
        self.conns.insert(key, c);
        self.tokens.insert(token, key);
        self.touch(key);
    }

    /// Write what the guest sent and the host socket has not taken yet.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.buf.is_empty() {
            let (a, _) = c.buf.as_slices();
            match send(c.stream.as_raw_fd(), a) {
                Ok(n) => {
                    c.buf.drain(..n);
                    c.credit.forwarded(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key, true);
                    return;
                }
            }
        }
        if c.credit.update_needed() {
            c.send_credit_update = true;
        }
        if c.buf.is_empty() && c.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Close what timed out: host sockets that never sent their line, connections the guest
    /// did not answer, closing connections that could not flush.
    fn expire(&mut self) {
        let now = Instant::now();
        match self.next_deadline {
            Some(d) if d <= now => {}
            _ => return,
        }
        let mut next: Option<Instant> = None;
        let mut note = |d: Instant| next = Some(next.map_or(d, |n| n.min(d)));
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            if let Some(p) = self.pending.remove(&t) {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    p.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        for p in self.pending.values() {
            note(p.deadline);
        }
        let mut late = Vec::new();
        for (key, c) in &self.conns {
            match c.state {
                ConnState::Connecting { deadline } | ConnState::Closing { deadline } => {
                    if deadline <= now {
                        late.push(*key);
                    } else {
                        note(deadline);
                    }
                }
                ConnState::Established => {}
            }
        }
        for key in late {
            self.close(key, true);
        }
        self.next_deadline = next;
    }

    // ---- guest side ----

    /// One packet from the transmit queue.
    fn packet_from_guest(&mut self, chain: &Chain) {
        let mem = self.ctx.mem.clone();
        let total = chain.readable_len();
        let mut raw = [0u8; HDR_LEN];
        if chain.fault.is_some()
            || total < HDR_LEN as u64
            || !read_bytes(&mem, &chain.readable, 0, &mut raw)
        {
            self.problem(
                Problem::BadPacket,
                format_args!("packet outside RAM or shorter than its header dropped"),
            );
            return;
        }
        let h = Header::from_bytes(&raw);
        if let Err(e) = h.check_tx(self.ctx.guest_cid, total - HDR_LEN as u64) {
            self.problem(Problem::BadPacket, format_args!("packet dropped: {e}"));
            // Answer what looks like a connection attempt or data so the guest's socket does
            // not wait forever; never answer a packet claiming another source.
            if h.src_cid == self.ctx.guest_cid && h.dst_cid == VMADDR_CID_HOST {
                self.rst_reply(&h);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == VIRTIO_VSOCK_OP_REQUEST {
            self.guest_connect(&h);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_reply(&h);
            return;
        };
        c.credit.peer_update(h.buf_alloc, h.fwd_cnt);
        match h.op {
            VIRTIO_VSOCK_OP_RESPONSE => {
                if !matches!(c.state, ConnState::Connecting { .. }) {
                    self.problem(Problem::Protocol, format_args!("unexpected RESPONSE"));
                    self.close(key, true);
                    return;
                }
                c.state = ConnState::Established;
                let line = format!("OK {}\n", c.local_port);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.close(key, true);
                    return;
                }
            }
            VIRTIO_VSOCK_OP_RST => {
                self.close(key, false);
                return;
            }
            VIRTIO_VSOCK_OP_SHUTDOWN => {
                c.peer_shutdown |= h.flags & VIRTIO_VSOCK_SHUTDOWN_ALL;
                if c.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Read);
                }
                if c.peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_ALL {
                    c.state = ConnState::Closing {
                        deadline: Instant::now() + CLOSE_TIMEOUT,
                    };
                    let d = Instant::now() + CLOSE_TIMEOUT;
                    self.next_deadline = Some(self.next_deadline.map_or(d, |n| n.min(d)));
                }
                self.flush(key);
            }
            VIRTIO_VSOCK_OP_RW => {
                if c.state != ConnState::Established
                    || c.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0
                {
                    self.problem(
                        Problem::Protocol,
                        format_args!("data on a connection not open for it"),
                    );
                    self.close(key, true);
                    return;
                }
                if !c.credit.receive(h.len) {
                    let granted = c.credit.buf_alloc.saturating_sub(c.credit.buffered());
                    self.problem(
                        Problem::CreditLie,
                        format_args!(
                            "the guest sent {} bytes beyond the {granted} it was granted; \
                             connection reset",
                            h.len
                        ),
                    );
                    self.close(key, true);
                    return;
                }
                self.guest_data(key, chain, h.len);
            }
            VIRTIO_VSOCK_OP_CREDIT_UPDATE => {}
            VIRTIO_VSOCK_OP_CREDIT_REQUEST => c.send_credit_update = true,
            _ => {}
        }
        self.touch(key);
    }

    /// REQUEST from the guest: connect to the host listener `PATH_<port>`.
    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) {
            self.problem(
                Problem::Protocol,
                format_args!("REQUEST for a connection that exists"),
            );
            self.close(key, true);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.problem(
                Problem::Limit,
                format_args!("{MAX_CONNECTIONS} connections open; refusing more"),
            );
            self.rst_reply(h);
            return;
        }
        let path = self.ctx.backend.port_path(h.dst_port);
        let stream = match connect_unix(&path) {
            Ok(s) => s,
            Err(e) => {
                if self.ctx.log.first(Problem::Connect as u32) {
                    tracing::info!(
                        "virtio-vsock: guest connection to port {} refused: {}: {e} (logged \
                         once)",
                        h.dst_port,
                        path.display()
                    );
                }
                self.rst_reply(h);
                return;
            }
        };
        let t = self.token();
        let mut c = Conn::new(stream, t, h.dst_port, h.src_port, ConnState::Established);
        c.credit.peer_update(h.buf_alloc, h.fwd_cnt);
        c.send_response = true;
        self.conns.insert(key, c);
        self.tokens.insert(t, key);
        self.touch(key);
    }

    /// `len` bytes of payload of a RW packet (already within the window): to the host socket,
    /// straight from guest memory when nothing is waiting before them, the rest into the
    /// connection's buffer.
    fn guest_data(&mut self, key: Key, chain: &Chain, len: u32) {
        let mem = self.ctx.mem.clone();
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let len = len as usize;
        let mut sent = 0usize;
        if c.buf.is_empty() && len > 0 {
            self.ranges.clear();
            let mut iov = Vec::with_capacity(self.ranges.capacity().max(4));
            if gather(
                &chain.readable,
                HDR_LEN as u64,
                len as u64,
                &mut self.ranges,
            ) {
                guest_iovecs(&mem, &self.ranges, &mut iov);
                match sendv(c.stream.as_raw_fd(), &iov) {
                    Ok(n) => sent = n.min(len),
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.close(key, true);
                        return;
                    }
                }
            }
        }
        c.credit.forwarded(sent as u32);
        if sent < len {
            let mut rest = vec![0u8; len - sent];
            if !read_bytes(&mem, &chain.readable, (HDR_LEN + sent) as u64, &mut rest) {
                self.close(key, true);
                return;
            }
            c.buf.extend(rest);
        }
        if c.credit.update_needed() {
            c.send_credit_update = true;
        }
    }

    /// Fill `chain` with the next packet of connection `key`; returns the used length, or
    /// None when there was nothing to send after all (the chain was not touched).
    fn fill_packet(&mut self, key: Key, chain: &Chain) -> Option<u32> {
        let mem = self.ctx.mem.clone();
        let cid = self.ctx.guest_cid;
        if self.sendq.front() == Some(&key) {
            self.sendq.pop_front();
        }
        let c = self.conns.get_mut(&key)?;
        c.queued = false;
        let mut flags = 0;
        let op = if c.send_request {
            c.send_request = false;
            VIRTIO_VSOCK_OP_REQUEST
        } else if c.send_response {
            c.send_response = false;
            VIRTIO_VSOCK_OP_RESPONSE
        } else if c.send_shutdown & !c.shutdown_sent != 0 {
            flags = c.send_shutdown & !c.shutdown_sent;
            VIRTIO_VSOCK_OP_SHUTDOWN
        } else if c.wants_data() {
            VIRTIO_VSOCK_OP_RW
        } else if c.send_credit_update {
            VIRTIO_VSOCK_OP_CREDIT_UPDATE
        } else {
            self.touch(key);
            return None;
        };
        let mut payload = 0usize;
        let mut op = op;
        if op == VIRTIO_VSOCK_OP_RW {
            let room = (chain.writable_len() - HDR_LEN as u64).min(MAX_PAYLOAD as u64);
            let want = room.min(u64::from(c.credit.peer_credit())) as usize;
            self.ranges.clear();
            let mut iov = Vec::with_capacity(4);
            if want > 0
                && gather(
                    &chain.writable,
                    HDR_LEN as u64,
                    want as u64,
                    &mut self.ranges,
                )
            {
                guest_iovecs(&mem, &self.ranges, &mut iov);
            }
            let r = if iov.is_empty() {
                Err(io::Error::from(io::ErrorKind::WouldBlock))
            } else {
                readv(c.stream.as_raw_fd(), &iov)
            };
            drop(iov);
            match r {
                Ok(0) => {
                    // End of file: the host sends no more.
                    c.host_eof = true;
                    c.send_shutdown |= VIRTIO_VSOCK_SHUTDOWN_F_SEND;
                    flags = c.send_shutdown & !c.shutdown_sent;
                    op = VIRTIO_VSOCK_OP_SHUTDOWN;
                }
                Ok(n) => {
                    // The kernel wrote guest memory behind vm-memory's back.
                    crate::sys::mark_filled_ranges(&mem, &self.ranges, n);
                    payload = n;
                    c.credit.sent(n as u32);
                    // A full read: there may be more.
                    c.readable = c.hup || n == want;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    c.readable = false;
                    if c.hup {
                        // Hung up and drained: that is the end of its data.
                        c.host_eof = true;
                        c.send_shutdown |= VIRTIO_VSOCK_SHUTDOWN_F_SEND;
                    }
                    self.touch(key);
                    return None;
                }
                Err(_) => {
                    let rst = header(cid, c, VIRTIO_VSOCK_OP_RST);
                    self.close(key, false);
                    write_bytes(&mem, &chain.writable, 0, &rst.to_bytes());
                    return Some(HDR_LEN as u32);
                }
            }
        }
        if op == VIRTIO_VSOCK_OP_SHUTDOWN {
            c.shutdown_sent |= flags;
        }
        let mut h = header(cid, c, op);
        h.flags = flags;
        h.len = payload as u32;
        write_bytes(&mem, &chain.writable, 0, &h.to_bytes());
        self.touch(key);
        Some((HDR_LEN + payload) as u32)
    }
}

/// The header of a packet from the host side of `c` to the guest `cid`, carrying our credit
/// (which the guest then knows: no separate credit update is owed).
fn header(cid: u64, c: &mut Conn, op: u16) -> Header {
    let (buf_alloc, fwd_cnt) = c.credit.stamp();
    c.send_credit_update = false;
    Header {
        src_cid: VMADDR_CID_HOST,
        dst_cid: cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len: 0,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// Parse `CONNECT <port>` (Firecracker's host-side protocol).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// `recv(2)` with `flags`.
fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid writable memory of `buf.len()` bytes for the call.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `send(2)` without SIGPIPE.
fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid readable memory of `buf.len()` bytes for the call.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `sendmsg(2)` of `iov` (guest memory) without SIGPIPE.
fn sendv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len().min(IOV_MAX) as _;
    // SAFETY: every iovec describes guest memory that stays mapped while the device runs; the
    // kernel only reads it.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Connect to the Unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (EAGAIN) instead of stalling the device.
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket owned from here on (closed on every path by UnixStream).
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un for the call; the length covers the family and
    // the path with its terminating NUL.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl VsockBackend {
    /// The host listener for guest connections to `port`: `PATH_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }
}

/// Appends the iovecs of guest `ranges` of `mem` to `iov`, up to [`IOV_MAX`] in all; stops at
/// the first range not in guest memory (what came before stays, a prefix).
fn guest_iovecs(mem: &GuestMemory, ranges: &[(GuestAddress, usize)], iov: &mut Vec<libc::iovec>) {
    for &(addr, l) in ranges {
        for s in mem.get_slices(addr, l) {
            let Ok(s) = s else { return };
            if iov.len() >= IOV_MAX {
                return;
            }
            iov.push(iovec_guest(&s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b""[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"connect 5",
            b"CONNECT 5 6",
            b"CONNECT \xff",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }
}
