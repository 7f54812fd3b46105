//! virtio-vsock driven by the host-side driver: connection set-up both ways, data, credit,
//! shutdown and reset, and what a hostile driver can do.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_hv::{EventFd, GuestMemory};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::conn::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::driver::{Desc, SplitQueueDriver};
use crate::test_util::*;
use crate::ActiveQueue;

const CID: u64 = 3;
/// Receive buffers: 64 of (header + 4 KiB) here.
const RXBUF: u64 = DATA;
const RX_LEN: u32 = (HDR_LEN + 4096) as u32;
/// Transmit packets are built here, 64 KiB + header apart.
const TXBUF: u64 = DATA + (4 << 20);

struct Setup {
    mem: GuestMemory,
    dir: TempDir,
    backend: Arc<VsockBackend>,
    dev: Vsock,
    irq: Arc<RecordingInterrupt>,
    rx: SplitQueueDriver,
    rx_kick: EventFd,
    tx: SplitQueueDriver,
    tx_kick: EventFd,
    ev: SplitQueueDriver,
    ev_kick: EventFd,
    rx_slot: u64,
    tx_slot: u64,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "vireo-vsock-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

impl Setup {
    fn new(name: &str) -> Setup {
        let mem = guest_memory();
        let dir = temp_dir(name);
        let backend = Arc::new(VsockBackend::bind(&dir.0.join("v.sock")).unwrap());
        let mut dev = Vsock::new(CID, backend.clone());
        let rx = SplitQueueDriver::new(&mem, QUEUE_BASE, 256);
        let tx = SplitQueueDriver::new(&mem, QUEUE_BASE + 0x10000, 256);
        let ev = SplitQueueDriver::new(&mem, QUEUE_BASE + 0x20000, 64);
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let irq = Arc::new(RecordingInterrupt::default());
        dev.activate(crate::Activation {
            mem: mem.clone(),
            features: crate::TRANSPORT_FEATURES,
            queues: vec![
                ActiveQueue {
                    index: 0,
                    queue: rx.queue().unwrap(),
                    notify: kicks[0].try_clone().unwrap(),
                },
                ActiveQueue {
                    index: 1,
                    queue: tx.queue().unwrap(),
                    notify: kicks[1].try_clone().unwrap(),
                },
                ActiveQueue {
                    index: 2,
                    queue: ev.queue().unwrap(),
                    notify: kicks[2].try_clone().unwrap(),
                },
            ],
            interrupt: irq.clone(),
        })
        .unwrap();
        Setup {
            mem,
            dir,
            backend,
            dev,
            irq,
            rx,
            rx_kick: kicks[0].try_clone().unwrap(),
            tx,
            tx_kick: kicks[1].try_clone().unwrap(),
            ev,
            ev_kick: kicks[2].try_clone().unwrap(),
            rx_slot: 0,
            tx_slot: 0,
        }
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RXBUF + (self.rx_slot % 128) * 0x2000;
            self.rx_slot += 1;
            self.rx.add(&self.mem, &[Desc::w(addr, RX_LEN)]).unwrap();
        }
        self.rx_kick.write(1).unwrap();
    }

    /// The next packet the device sent the guest.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(Duration::from_secs(5))
            .expect("a packet for the guest")
    }

    fn try_recv(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some((head, len)) = self.rx.pop_used(&self.mem) {
                // Chains were posted in order with one buffer each: find its address.
                let addr = self.chain_addr(head);
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                let mut h = [0u8; HDR_LEN];
                h.copy_from_slice(&b[..HDR_LEN]);
                return Some((Header::from_bytes(&h), b[HDR_LEN..].to_vec()));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn chain_addr(&self, head: u16) -> u64 {
        let (desc, _, _) = self.rx.addresses();
        self.mem
            .read_obj::<u64>(GuestAddress(desc + 16 * u64::from(head)))
            .unwrap()
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        let at = TXBUF + (self.tx_slot % 32) * 0x2_0000;
        self.tx_slot += 1;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + 0x100))
            .unwrap();
        let mut d = vec![Desc::r(at, HDR_LEN as u32)];
        if !payload.is_empty() {
            d.push(Desc::r(at + 0x100, payload.len() as u32));
        }
        // Reclaim transmit chains as the device finishes them.
        while self.tx.pop_used(&self.mem).is_some() {}
        self.tx.add(&self.mem, &d).unwrap();
        self.tx_kick.write(1).unwrap();
    }

    fn wait_tx_done(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.tx.free_descriptors() < 256 {
            while self.tx.pop_used(&self.mem).is_some() {}
            assert!(Instant::now() < deadline, "transmit queue not served");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn guest(&self, op: u16, guest_port: u32, host_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: VMADDR_CID_HOST,
            src_port: guest_port,
            dst_port: host_port,
            len: 0,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    /// Host connects to guest port `port` and the guest accepts: returns the host stream and
    /// the host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(self.backend.path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.recv();
        assert_eq!(req.op, VIRTIO_VSOCK_OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (VMADDR_CID_HOST, CID));
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= 1 << 30);
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        self.send(
            self.guest(VIRTIO_VSOCK_OP_RESPONSE, port, req.src_port),
            &[],
        );
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(
            String::from_utf8(line).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        (s, req.src_port)
    }

    fn connections(&self) -> usize {
        // The thread updates the count after each pass: give it one.
        std::thread::sleep(Duration::from_millis(30));
        self.dev.connections()
    }
}

#[test]
fn config_space_is_the_cid() {
    let dir = temp_dir("cfg");
    let b = Arc::new(VsockBackend::bind(&dir.0.join("s")).unwrap());
    let v = Vsock::new(0x1_0000_0005, b);
    let mut c = [0xffu8; 12];
    v.read_config(0, &mut c);
    assert_eq!(c, [5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(v.device_type(), crate::VIRTIO_ID_VSOCK);
    assert_eq!(v.queue_max_sizes().len(), 3);
}

#[test]
fn backend_socket_paths() {
    let dir = temp_dir("paths");
    let path = dir.0.join("vm.sock");
    let b = VsockBackend::bind(&path).unwrap();
    assert_eq!(b.port_path(5000), dir.0.join("vm.sock_5000"));
    // In use: refused while it listens.
    let e = VsockBackend::bind(&path).unwrap_err().to_string();
    assert!(e.contains("in use"), "{e}");
    drop(b);
    assert!(!path.exists(), "removed when dropped");
    // A stale socket file is replaced; a regular file is not.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let b = VsockBackend::bind(&path).unwrap();
    drop(b);
    std::fs::write(&path, b"x").unwrap();
    assert!(VsockBackend::bind(&path).is_err());
}

#[test]
fn host_connects_to_the_guest_and_both_talk() {
    let mut s = Setup::new("h2g");
    s.post_rx(64);
    let (mut host, hport) = s.host_connect(1234);
    assert_eq!(s.connections(), 1);
    // Host → guest.
    host.write_all(b"hello guest").unwrap();
    let (h, data) = s.recv();
    assert_eq!((h.op, h.len), (VIRTIO_VSOCK_OP_RW, 11));
    assert_eq!((h.src_port, h.dst_port), (hport, 1234));
    assert_eq!(data, b"hello guest");
    // Guest → host.
    let mut rw = s.guest(VIRTIO_VSOCK_OP_RW, 1234, hport);
    rw.len = 10;
    s.send(rw, b"hello host");
    let mut b = [0u8; 10];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");
    // The host closes its sending side: the guest hears SHUTDOWN(SEND).
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = s.recv();
    assert_eq!(
        (h.op, h.flags),
        (VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_F_SEND)
    );
    // The guest still sends, then closes entirely: the host reads the data and EOF, the guest
    // gets the final RST.
    let mut rw = s.guest(VIRTIO_VSOCK_OP_RW, 1234, hport);
    rw.len = 3;
    s.send(rw, b"bye");
    let mut sd = s.guest(VIRTIO_VSOCK_OP_SHUTDOWN, 1234, hport);
    sd.flags = VIRTIO_VSOCK_SHUTDOWN_ALL;
    s.send(sd, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let (h, _) = s.recv();
    assert_eq!(h.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!(s.connections(), 0);
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut s = Setup::new("g2h");
    s.post_rx(64);
    let listener = UnixListener::bind(s.backend.port_path(5000)).unwrap();
    s.send(s.guest(VIRTIO_VSOCK_OP_REQUEST, 40000, 5000), &[]);
    let (h, _) = s.recv();
    assert_eq!(h.op, VIRTIO_VSOCK_OP_RESPONSE);
    assert_eq!((h.src_port, h.dst_port), (5000, 40000));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rw = s.guest(VIRTIO_VSOCK_OP_RW, 40000, 5000);
    rw.len = 4;
    s.send(rw, b"ping");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    host.write_all(b"pong").unwrap();
    let (h, d) = s.recv();
    assert_eq!((h.op, d.as_slice()), (VIRTIO_VSOCK_OP_RW, &b"pong"[..]));
    // The host closes: SHUTDOWN(SEND), then the guest's RST ends it.
    drop(host);
    let (h, _) = s.recv();
    assert_eq!(h.op, VIRTIO_VSOCK_OP_SHUTDOWN);
    s.send(s.guest(VIRTIO_VSOCK_OP_RST, 40000, 5000), &[]);
    assert_eq!(s.connections(), 0);
    // Nobody listens on port 5001: refused.
    s.send(s.guest(VIRTIO_VSOCK_OP_REQUEST, 40001, 5001), &[]);
    let (h, _) = s.recv();
    assert_eq!((h.op, h.dst_port), (VIRTIO_VSOCK_OP_RST, 40001));
}

#[test]
fn the_guest_credit_limits_what_it_receives() {
    let mut s = Setup::new("credit");
    s.post_rx(64);
    let mut host = UnixStream::connect(s.backend.path()).unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    let (req, _) = s.recv();
    let mut resp = s.guest(VIRTIO_VSOCK_OP_RESPONSE, 7, req.src_port);
    resp.buf_alloc = 100;
    s.send(resp, &[]);
    let mut ok = [0u8; 3];
    host.read_exact(&mut ok).unwrap();
    host.write_all(&[9u8; 1000]).unwrap();
    let mut got = 0;
    while let Some((h, d)) = s.try_recv(Duration::from_millis(300)) {
        if h.op == VIRTIO_VSOCK_OP_RW {
            got += d.len();
        }
    }
    assert_eq!(got, 100, "no more than the guest's buffer");
    // The guest consumed 100 bytes: 100 more.
    let mut cu = s.guest(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 7, req.src_port);
    cu.buf_alloc = 100;
    cu.fwd_cnt = 100;
    s.send(cu, &[]);
    let (h, d) = s.recv();
    assert_eq!((h.op, d.len()), (VIRTIO_VSOCK_OP_RW, 100));
    // A credit lie (forwarded more than it was sent) gives nothing.
    let mut lie = s.guest(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 7, req.src_port);
    lie.buf_alloc = 100;
    lie.fwd_cnt = 100_000;
    s.send(lie, &[]);
    assert!(s.try_recv(Duration::from_millis(200)).is_none());
    // A credit request (still no room on the guest's side) is answered with our counters.
    let mut cr = s.guest(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 7, req.src_port);
    cr.buf_alloc = 100;
    cr.fwd_cnt = 100;
    s.send(cr, &[]);
    let (h, _) = s.recv();
    assert_eq!(
        (h.op, h.buf_alloc, h.fwd_cnt),
        (VIRTIO_VSOCK_OP_CREDIT_UPDATE, CONN_BUF_ALLOC, 0)
    );
}

#[test]
fn a_guest_sending_beyond_its_credit_is_reset_and_buffering_is_bounded() {
    let mut s = Setup::new("lie");
    s.post_rx(64);
    let (host, hport) = s.host_connect(9);
    // The host never reads: the kernel's socket buffer fills, then ours, up to the window.
    let chunk = vec![0x5au8; MAX_PAYLOAD];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..64 {
        let mut rw = s.guest(VIRTIO_VSOCK_OP_RW, 9, hport);
        rw.len = MAX_PAYLOAD as u32;
        s.send(rw, &chunk);
        sent += MAX_PAYLOAD;
        if let Some((h, _)) = s.try_recv(Duration::from_millis(20)) {
            if h.op == VIRTIO_VSOCK_OP_RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "reset after {sent} bytes");
    assert!(sent <= 4 << 20);
    assert_eq!(s.connections(), 0);
    drop(host);
}

#[test]
fn hostile_packets_are_dropped_or_refused() {
    let mut s = Setup::new("hostile");
    s.post_rx(64);
    // Wrong source CID: dropped silently.
    let mut h = s.guest(VIRTIO_VSOCK_OP_REQUEST, 1, 2);
    h.src_cid = 99;
    s.send(h, &[]);
    // Wrong destination: dropped.
    let mut h = s.guest(VIRTIO_VSOCK_OP_REQUEST, 1, 2);
    h.dst_cid = 7;
    s.send(h, &[]);
    assert!(s.try_recv(Duration::from_millis(100)).is_none());
    // A length beyond the buffers, an unknown op, data for no connection: RST.
    let mut h = s.guest(VIRTIO_VSOCK_OP_RW, 10, 20);
    h.len = 1 << 30;
    s.send(h, &[1, 2, 3]);
    let (r, _) = s.recv();
    assert_eq!(
        (r.op, r.src_port, r.dst_port),
        (VIRTIO_VSOCK_OP_RST, 20, 10)
    );
    let mut h = s.guest(99, 11, 20);
    h.op = 99;
    s.send(h, &[]);
    assert_eq!(s.recv().0.op, VIRTIO_VSOCK_OP_RST);
    let mut h = s.guest(VIRTIO_VSOCK_OP_RW, 12, 20);
    h.len = 2;
    s.send(h, &[1, 2]);
    assert_eq!(s.recv().0.op, VIRTIO_VSOCK_OP_RST);
    // An RST for nothing gets no answer.
    s.send(s.guest(VIRTIO_VSOCK_OP_RST, 13, 20), &[]);
    assert!(s.try_recv(Duration::from_millis(100)).is_none());
    // A chain shorter than a header, one outside RAM: dropped.
    s.tx.add(&s.mem, &[Desc::r(TXBUF, 10)]).unwrap();
    s.tx.add(&s.mem, &[Desc::r(MEM_SIZE - 4, 44)]).unwrap();
    s.tx_kick.write(1).unwrap();
    s.wait_tx_done();
    assert!(s.try_recv(Duration::from_millis(100)).is_none());
    // Receive chains the device cannot use come back empty; the device keeps going.
    s.rx.add(&s.mem, &[Desc::r(RXBUF, RX_LEN)]).unwrap();
    s.rx.add(&s.mem, &[Desc::w(RXBUF, 8)]).unwrap();
    s.rx_kick.write(1).unwrap();
    assert!(!s.irq.reset_requested());
    // A bad available index breaks the device.
    s.tx.set_avail_idx(&s.mem, 3000);
    s.tx_kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.irq.reset_requested() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_guest_without_receive_buffers_cannot_make_the_device_grow() {
    let mut s = Setup::new("norx");
    // No receive buffers at all; thousands of packets that each want an answer.
    for i in 0..2000u32 {
        let mut h = s.guest(VIRTIO_VSOCK_OP_RW, 100 + i, 20);
        h.len = 0;
        s.send(h, &[]);
        if i % 200 == 0 {
            s.wait_tx_done();
        }
    }
    s.wait_tx_done();
    // At most MAX_PENDING_RSTS answers wait; they come once buffers do.
    s.post_rx(256);
    let mut n = 0;
    while s.try_recv(Duration::from_millis(200)).is_some() {
        n += 1;
    }
    assert_eq!(n, muxer::MAX_PENDING_RSTS);
}

#[test]
fn host_side_protocol_errors_and_timeouts() {
    let mut s = Setup::new("hostproto");
    s.post_rx(64);
    // A bad line: the socket is closed.
    let mut bad = UnixStream::connect(s.backend.path()).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    let mut b = [0u8; 8];
    assert_eq!(bad.read(&mut b).unwrap(), 0);
    // No line at all: closed after the timeout.
    let mut silent = UnixStream::connect(s.backend.path()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(silent.read(&mut b).unwrap(), 0);
    // The guest never answers a REQUEST: closed after the timeout, the guest told (RST).
    let mut unanswered = UnixStream::connect(s.backend.path()).unwrap();
    unanswered
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    unanswered.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = s.recv();
    assert_eq!(req.op, VIRTIO_VSOCK_OP_REQUEST);
    assert_eq!(unanswered.read(&mut b).unwrap(), 0);
    let (rst, _) = s.recv();
    assert_eq!((rst.op, rst.src_port), (VIRTIO_VSOCK_OP_RST, req.src_port));
    // The guest refuses: closed at once.
    let mut refused = UnixStream::connect(s.backend.path()).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    refused.write_all(b"CONNECT 78\n").unwrap();
    let (req, _) = s.recv();
    s.send(s.guest(VIRTIO_VSOCK_OP_RST, 78, req.src_port), &[]);
    assert_eq!(refused.read(&mut b).unwrap(), 0);
    assert_eq!(s.connections(), 0);
}

#[test]
fn reset_closes_every_connection() {
    let mut s = Setup::new("reset");
    s.post_rx(64);
    let (mut a, _) = s.host_connect(1);
    let (mut b, _) = s.host_connect(2);
    assert_eq!(s.connections(), 2);
    s.dev.reset();
    let mut buf = [0u8; 4];
    assert_eq!(a.read(&mut buf).unwrap(), 0);
    assert_eq!(b.read(&mut buf).unwrap(), 0);
    assert!(!s.dev.state().active);
    let _ = (&s.dir, &s.irq);
}

#[test]
fn a_paused_device_leaves_guest_memory_alone_and_keeps_its_connections() {
    let mut s = Setup::new("pause");
    s.post_rx(8);
    let (mut host, hport) = s.host_connect(7);
    let pos = s.dev.pause().unwrap();
    // Where the queues stand: the transmit queue served everything, the receive queue
    // handed out exactly the REQUEST.
    let at = |i: usize| pos.iter().find(|p| p.index == i).copied().unwrap();
    assert_eq!((at(0).next_avail, at(0).next_used), (1, 1));
    assert_eq!((at(1).next_avail, at(1).next_used), (1, 1));
    assert_eq!(at(2).next_avail, 0);
    // Paused: data from the host and a packet from the guest wait.
    host.write_all(b"while paused").unwrap();
    let mut rw = s.guest(VIRTIO_VSOCK_OP_RW, 7, hport);
    rw.len = 2;
    s.send(rw, b"hi");
    assert!(s.try_recv(Duration::from_millis(200)).is_none());
    assert_eq!(s.tx.pop_used(&s.mem), None, "transmit chain untouched");
    // A second pause is harmless and reports the same positions.
    assert_eq!(s.dev.pause().unwrap(), pos);
    s.dev.resume().unwrap();
    let (h, d) = s.recv();
    assert_eq!(
        (h.op, d.as_slice()),
        (VIRTIO_VSOCK_OP_RW, &b"while paused"[..])
    );
    let mut b = [0u8; 2];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi");
    assert_eq!(s.connections(), 1);
}

#[test]
fn a_transport_reset_goes_out_in_an_event_buffer() {
    let mut s = Setup::new("event");
    let ctl = s.dev.control();
    ctl.transport_reset();
    // No event buffer yet: it waits.
    s.dev.pause().unwrap();
    s.dev.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(ctl.reset_pending());
    assert_eq!(s.ev.pop_used(&s.mem), None);
    // The driver posts one (a readable one first, which is refused unused).
    let at = DATA + (10 << 20);
    s.mem.write_obj(0xffff_ffffu32, GuestAddress(at)).unwrap();
    s.ev.add(&s.mem, &[Desc::r(at + 0x100, 4)]).unwrap();
    s.ev.add(&s.mem, &[Desc::w(at, 4)]).unwrap();
    s.ev_kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut used = Vec::new();
    while used.len() < 2 {
        if let Some(u) = s.ev.pop_used(&s.mem) {
            used.push(u);
        }
        assert!(Instant::now() < deadline, "no event");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!((used[0].1, used[1].1), (0, EVENT_LEN as u32));
    let id: u32 = s.mem.read_obj(GuestAddress(at)).unwrap();
    assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    assert!(!ctl.reset_pending());
    assert!(s.irq.queue.lock().unwrap().contains(&2));
}

#[test]
fn host_connections_beyond_the_pending_limit_wait_in_the_backlog() {
    let mut s = Setup::new("backlog");
    s.post_rx(200);
    let n = super::muxer::MAX_PENDING_HOST + 6;
    // All connect before any says which port: the device takes MAX_PENDING_HOST of them.
    let mut streams: Vec<UnixStream> = (0..n)
        .map(|_| UnixStream::connect(s.backend.path()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    for (i, st) in streams.iter_mut().enumerate() {
        st.write_all(format!("CONNECT {}\n", 100 + i).as_bytes())
            .unwrap();
    }
    // Every one of them reaches the guest as a REQUEST, none is refused.
    let mut ports: Vec<u32> = (0..n)
        .map(|_| {
            let (h, _) = s.recv();
            assert_eq!(h.op, VIRTIO_VSOCK_OP_REQUEST);
            h.dst_port
        })
        .collect();
    ports.sort();
    assert_eq!(ports, (100..100 + n as u32).collect::<Vec<_>>());
}

/// Data from a host socket is read straight into guest memory (`readv`): live migration and
/// the emulator's code check learn of it from vm-memory's bitmap of VMM writes.
#[test]
fn received_data_is_in_the_bitmap_of_vmm_writes() {
    let mut s = Setup::new("bitmap");
    s.post_rx(1);
    // The connection request takes the first buffer; the data goes to the second.
    let (mut host, _) = s.host_connect(1234);
    s.post_rx(1);
    let base = RXBUF + 0x2000;
    let page = |a: u64| (a / 4096) as usize;
    let dirty = |bm: &[u64], p: usize| bm[p / 64] & (1 << (p % 64)) != 0;
    let _ = vireo_hv::take_vmm_dirty(&s.mem);
    // Header plus 4096 bytes: the payload's tail is on the buffer's second page, which only
    // the readv writes.
    let last = base + (HDR_LEN + 4096) as u64 - 1;
    assert_eq!(page(last), page(base) + 1);
    host.write_all(&[0x5a; 4096]).unwrap();
    let (h, data) = s.recv();
    assert_eq!((h.op, data.len()), (VIRTIO_VSOCK_OP_RW, 4096));
    let after = vireo_hv::take_vmm_dirty(&s.mem);
    assert!(dirty(&after[0], page(last)), "the payload's last page");
    assert!(!dirty(&after[0], page(last) + 1), "past the payload");
}
