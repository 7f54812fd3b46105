//! virtio-net driven by the host-side driver over a socket-pair back end: frames both ways,
//! mergeable buffers, the bounce path, offload checks, the control queue, link status, and
//! what a hostile driver can do.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_hv::{EventFd, GuestMemory};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::hdr::*;
use super::tap::{iovec_mut, readv, writev};
use super::*;
use crate::driver::{Desc, SplitQueueDriver};
use crate::test_util::*;
use crate::{ActiveQueue, TRANSPORT_FEATURES};

const BASE_FEATURES: u64 = TRANSPORT_FEATURES
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_CTRL_VQ
    | VIRTIO_NET_F_GUEST_ANNOUNCE;

/// Buffers for received frames start here, 64 KiB apart.
const RXBUF: u64 = DATA;
/// Transmit frames are built here.
const TXBUF: u64 = DATA + (8 << 20);

struct Setup {
    mem: GuestMemory,
    backend: Arc<SocketPairBackend>,
    net: Net,
    irq: Arc<RecordingInterrupt>,
    /// Per queue index: driver and notify eventfd.
    queues: Vec<(SplitQueueDriver, EventFd)>,
    features: u64,
}

impl Setup {
    fn new(pairs: usize, features: u64) -> Setup {
        Self::with_size(pairs, features, QUEUE_SIZE)
    }

    fn with_size(pairs: usize, features: u64, size: u16) -> Setup {
        Self::build(pairs, features, size, Duration::ZERO)
    }

    /// With interrupt moderation `gap`.
    fn with_gap(features: u64, gap: Duration) -> Setup {
        Self::build(1, features, QUEUE_SIZE, gap)
    }

    fn build(pairs: usize, features: u64, size: u16, gap: Duration) -> Setup {
        let event_idx = features & crate::VIRTIO_F_RING_EVENT_IDX != 0;
        let mem = guest_memory();
        let backend = Arc::new(SocketPairBackend::new(pairs).unwrap());
        let mut net = Net::new(backend.clone(), MacAddr([0x52, 0x54, 0, 1, 2, 3]), 0);
        let nq = if features & VIRTIO_NET_F_MQ != 0 {
            2 * pairs + 1
        } else {
            3
        };
        let mut queues = Vec::new();
        let mut active = Vec::new();
        for i in 0..nq {
            let d = SplitQueueDriver::new(&mem, QUEUE_BASE + i as u64 * 0x10000, size);
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            active.push(ActiveQueue {
                index: i,
                queue: {
                    let mut q = d.queue().unwrap();
                    virtio_queue::QueueT::set_event_idx(&mut q, event_idx);
                    q
                },
                notify: e.try_clone().unwrap(),
            });
            queues.push((d, e));
        }
        let irq = Arc::new(RecordingInterrupt::default());
        net.set_interrupt_moderation(gap);
        net.activate(crate::Activation {
            mem: mem.clone(),
            features,
            queues: active,
            interrupt: irq.clone(),
        })
        .unwrap();
        Setup {
            mem,
            backend,
            net,
            irq,
            queues,
            features,
        }
    }

    fn ctrl_index(&self) -> usize {
        self.queues.len() - 1
    }

    fn peer(&self, pair: usize) -> RawFd {
        self.backend.peers()[pair].as_raw_fd()
    }

    /// Post `n` receive chains of `len` bytes on queue `q`.
    fn post_rx(&mut self, q: usize, n: usize, len: u32) -> Vec<u16> {
        let mut heads = Vec::new();
        for _ in 0..n {
            let (d, _) = &mut self.queues[q];
            let slot = d.size() - d.free_descriptors() as u16;
            let _ = slot;
            let addr = RXBUF + heads.len() as u64 * 0x1_0000 % (4 << 20);
            heads.push(d.add(&self.mem, &[Desc::w(addr, len)]).unwrap());
        }
        self.queues[q].1.write(1).unwrap();
        heads
    }

    fn wait_used(&mut self, q: usize) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = self.queues[q].0.pop_used(&self.mem) {
                return u;
            }
            assert!(Instant::now() < deadline, "queue {q}: nothing used");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn no_used(&mut self, q: usize) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(self.queues[q].0.pop_used(&self.mem), None);
    }

    /// Send `hdr` + `frame` as the host would.
    fn host_send(&self, pair: usize, hdr: VnetHeader, frame: &[u8]) {
        let mut h = hdr.to_bytes();
        let mut f = frame.to_vec();
        let iov = [iovec_mut(&mut h), iovec_mut(&mut f)];
        writev(self.peer(pair), &iov).unwrap();
    }

    /// Receive what the device sent to the host (header, frame), waiting up to 5 s.
    fn host_recv(&self, pair: usize) -> Option<(VnetHeader, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70000];
        loop {
            let iov = [iovec_mut(&mut buf)];
            match readv(self.peer(pair), &iov) {
                Ok(n) => {
                    let mut h = [0u8; VNET_HDR_LEN];
                    h.copy_from_slice(&buf[..VNET_HDR_LEN]);
                    return Some((VnetHeader::from_bytes(&h), buf[VNET_HDR_LEN..n].to_vec()));
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => return None,
            }
        }
    }

    fn read_rx(&self, addr: u64, len: usize) -> (VnetHeader, Vec<u8>) {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        let mut h = [0u8; VNET_HDR_LEN];
        h.copy_from_slice(&b[..VNET_HDR_LEN]);
        (VnetHeader::from_bytes(&h), b[VNET_HDR_LEN..].to_vec())
    }

    /// Transmit `hdr` + `frame` from the guest on pair 0 (header and frame in separate
    /// buffers, as Linux does).
    fn guest_send(&mut self, hdr: VnetHeader, frame: &[u8]) -> u16 {
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TXBUF))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(TXBUF + 0x100))
            .unwrap();
        let (d, e) = &mut self.queues[1];
        let h = d
            .add(
                &self.mem,
                &[
                    Desc::r(TXBUF, VNET_HDR_LEN as u32),
                    Desc::r(TXBUF + 0x100, frame.len() as u32),
                ],
            )
            .unwrap();
        e.write(1).unwrap();
        h
    }

    /// Send a control command; returns the ack byte.
    fn control(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let at = TXBUF + 0x20_0000;
        let mut b = vec![class, cmd];
        b.extend_from_slice(data);
        self.mem.write_slice(&b, GuestAddress(at)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(at + 0x100))
            .unwrap();
        let c = self.ctrl_index();
        let (d, e) = &mut self.queues[c];
        d.add(
            &self.mem,
            &[Desc::r(at, b.len() as u32), Desc::w(at + 0x100, 1)],
        )
        .unwrap();
        e.write(1).unwrap();
        let (_, len) = self.wait_used(c);
        assert_eq!(len, 1);
        self.mem.read_obj(GuestAddress(at + 0x100)).unwrap()
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
    f
}

fn config(net: &Net) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    net.read_config(0, &mut c);
    c
}

#[test]
fn config_space_and_features() {
    let be = Arc::new(SocketPairBackend::new(1).unwrap());
    let net = Net::new(be, MacAddr([2, 0, 0, 0, 0, 9]), 0);
    assert_eq!(net.device_type(), crate::VIRTIO_ID_NET);
    assert_eq!(net.queue_max_sizes(), &[256, 256, 64]);
    assert_eq!(net.features() & VIRTIO_NET_F_MQ, 0);
    assert_ne!(net.features() & VIRTIO_NET_F_MRG_RXBUF, 0);
    let c = config(&net);
    assert_eq!(&c[..6], &[2, 0, 0, 0, 0, 9]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
    assert_eq!(&c[12..], &[0; 4], "beyond the config space reads zero");
    let mut far = [0xffu8; 4];
    net.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    let be = Arc::new(SocketPairBackend::new(4).unwrap());
    let net = Net::new(be, MacAddr::random(), 0);
    assert_eq!(net.queue_max_sizes().len(), 9);
    assert_ne!(net.features() & VIRTIO_NET_F_MQ, 0);
    assert_eq!(config(&net)[8], 4);
    assert!(net.mac().is_unicast());
    assert_eq!(net.mac().0[0] & 2, 2, "locally administered");
}

#[test]
fn mac_addresses_parse_and_print() {
    let m: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
    assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
    assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
    assert_eq!("52-54-00-ab-cd-0f".parse::<MacAddr>().unwrap(), m);
    for bad in [
        "",
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:0f:00",
        "5:54:00:ab:cd:0f",
        "zz:54:00:ab:cd:0f",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
    assert!(!MacAddr([1, 0, 0, 0, 0, 0]).is_unicast());
    assert!(!MacAddr([0; 6]).is_unicast());
}

#[test]
fn frames_both_ways_with_offloads() {
    let mut s = Setup::new(1, BASE_FEATURES);
    assert_eq!(
        s.backend.offload(),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4,
        "the TAP learns what the driver takes"
    );
    // Host → guest: one frame in one 2 KiB chain.
    s.post_rx(0, 1, 2048);
    let f = frame(1000, 1);
    s.host_send(
        0,
        VnetHeader {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..Default::default()
        },
        &f,
    );
    let (_, len) = s.wait_used(0);
    assert_eq!(len as usize, VNET_HDR_LEN + 1000);
    let (h, got) = s.read_rx(RXBUF, len as usize);
    assert_eq!(h.num_buffers, 1);
    assert_eq!(h.flags, VIRTIO_NET_HDR_F_DATA_VALID);
    assert_eq!(got, f);
    assert!(s.irq.queue.lock().unwrap().contains(&0));

    // Guest → host: a TSO frame, header checked and passed on.
    let big = frame(30000, 2);
    let tso = VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 99,
    };
    s.guest_send(tso, &big);
    let (h, got) = s.host_recv(0).expect("frame on the back end");
    assert_eq!(got, big);
    assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
    assert_eq!(h.num_buffers, 0);
    assert_eq!(s.wait_used(1).1, 0);
    let c = s.net.control().counters();
    assert_eq!((c.rx_frames, c.rx_bytes), (1, 1000));
    assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped), (1, 30000, 0));
}

#[test]
fn received_frames_are_in_the_bitmap_of_vmm_writes() {
    // The device reads frames straight into guest memory (readv): live migration and the
    // emulator's code check learn of it from vm-memory's bitmap.
    let mut s = Setup::new(1, BASE_FEATURES);
    s.post_rx(0, 1, 3 * 4096);
    let page = |a: u64| (a / 4096) as usize;
    let dirty = |bm: &[u64], p: usize| bm[p / 64] & (1 << (p % 64)) != 0;
    let before = vireo_hv::take_vmm_dirty(&s.mem);
    assert!(!dirty(&before[0], page(RXBUF) + 1));
    // Header and 8000 bytes: the buffer's first two pages; the second only readv writes.
    s.host_send(0, VnetHeader::default(), &frame(8000, 3));
    let (_, len) = s.wait_used(0);
    assert_eq!(len as usize, VNET_HDR_LEN + 8000);
    let after = vireo_hv::take_vmm_dirty(&s.mem);
    assert!(dirty(&after[0], page(RXBUF)));
    assert!(dirty(&after[0], page(RXBUF) + 1));
    assert!(!dirty(&after[0], page(RXBUF) + 2), "past the frame");
}

#[test]
fn mergeable_buffers_span_chains() {
    let mut s = Setup::new(1, BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    // Room for the largest frame: 70 chains of 1 KiB.
    let heads = s.post_rx(0, 70, 1024);
    let f = frame(3000, 3);
    s.host_send(0, VnetHeader::default(), &f);
    let used: Vec<(u16, u32)> = (0..3).map(|_| s.wait_used(0)).collect();
    assert_eq!(
        used,
        vec![(heads[0], 1024), (heads[1], 1024), (heads[2], 3012 - 2048)]
    );
    let (h, first) = s.read_rx(RXBUF, 1024);
    assert_eq!(h.num_buffers, 3);
    let mut got = first;
    for (i, &(_, len)) in used.iter().enumerate().skip(1) {
        let mut b = vec![0u8; len as usize];
        s.mem
            .read_slice(&mut b, GuestAddress(RXBUF + i as u64 * 0x1_0000))
            .unwrap();
        got.extend_from_slice(&b);
    }
    assert_eq!(got, f);
    // A frame larger than anything the back end may deliver is dropped by the kernel's rules,
    // a short one by ours.
    s.host_send(0, VnetHeader::default(), &[0u8; 4]);
    s.no_used(0);
    assert_eq!(s.net.control().counters().rx_dropped, 1);
}

#[test]
fn few_buffers_take_the_bounce_path_and_wait_for_room() {
    let mut s = Setup::new(1, BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    // 4 KiB of room in all: less than the largest frame, so frames go through the bounce
    // buffer; a 3000-byte frame fits.
    let heads = s.post_rx(0, 4, 1024);
    let f = frame(3000, 4);
    s.host_send(0, VnetHeader::default(), &f);
    for h in &heads[..3] {
        assert_eq!(s.wait_used(0).0, *h);
    }
    // The next frame needs 5 chains, only 1 is left: it waits, and so does everything behind
    // it.
    let g = frame(5000, 5);
    s.host_send(0, VnetHeader::default(), &g);
    s.host_send(0, VnetHeader::default(), &frame(100, 6));
    s.no_used(0);
    let more = s.post_rx(0, 5, 1024);
    let used: Vec<(u16, u32)> = (0..5).map(|_| s.wait_used(0)).collect();
    assert_eq!(used[0].0, heads[3]);
    assert_eq!(used[4], (more[3], 5012 - 4 * 1024));
    // The small frame follows in the last chain.
    let last = s.wait_used(0);
    assert_eq!(last, (more[4], 112));
    assert_eq!(s.net.control().counters().rx_frames, 3);
    assert_eq!(s.net.control().counters().rx_dropped, 0);
}

#[test]
fn without_mergeable_buffers_a_frame_too_big_is_dropped() {
    let mut s = Setup::new(1, BASE_FEATURES);
    let heads = s.post_rx(0, 1, 1526);
    s.host_send(0, VnetHeader::default(), &frame(2000, 7));
    s.no_used(0);
    assert_eq!(s.net.control().counters().rx_dropped, 1);
    // The chain is still there for the next frame.
    s.host_send(0, VnetHeader::default(), &frame(1514, 8));
    assert_eq!(s.wait_used(0), (heads[0], 1526));
}

#[test]
fn rx_offloads_the_driver_did_not_accept_are_dropped() {
    // No GUEST_CSUM: partial checksums and GSO cannot go in; DATA_VALID is cleared.
    let mut s = Setup::new(1, TRANSPORT_FEATURES | VIRTIO_NET_F_MAC);
    assert_eq!(s.backend.offload(), 0);
    s.post_rx(0, 2, 2048);
    s.host_send(
        0,
        VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        },
        &frame(100, 9),
    );
    s.host_send(
        0,
        VnetHeader {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..Default::default()
        },
        &frame(100, 10),
    );
    let (_, len) = s.wait_used(0);
    assert_eq!(len, 112);
    // The first chain was reused for the second frame.
    let (h, got) = s.read_rx(RXBUF, 112);
    assert_eq!(h.flags, 0);
    assert_eq!(got, frame(100, 10));
    assert_eq!(s.net.control().counters().rx_dropped, 1);
}

#[test]
fn hostile_transmit_frames_are_dropped() {
    let mut s = Setup::new(1, BASE_FEATURES & !VIRTIO_NET_F_HOST_TSO4);
    let cases = [
        // Checksum offset far outside the frame.
        VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 0xfff0,
            csum_offset: 0xfff0,
            ..Default::default()
        },
        // GSO that was not negotiated.
        VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        },
        // Unknown GSO type.
        VnetHeader {
            gso_type: 0x42,
            ..Default::default()
        },
    ];
    for h in cases {
        s.guest_send(h, &frame(200, 11));
        assert_eq!(s.wait_used(1).1, 0);
    }
    // A chain shorter than a header, one outside RAM, a runt frame.
    let (d, e) = &mut s.queues[1];
    d.add(&s.mem, &[Desc::r(TXBUF, 5)]).unwrap();
    d.add(&s.mem, &[Desc::r(MEM_SIZE - 8, 100)]).unwrap();
    d.add(&s.mem, &[Desc::r(TXBUF, 20)]).unwrap();
    e.write(1).unwrap();
    for _ in 0..3 {
        assert_eq!(s.wait_used(1).1, 0);
    }
    // A frame larger than 64 KiB of IP, in buffers that exist.
    let (d, e) = &mut s.queues[1];
    d.add(
        &s.mem,
        &[Desc::r(TXBUF, VNET_HDR_LEN as u32), Desc::r(TXBUF, 70000)],
    )
    .unwrap();
    e.write(1).unwrap();
    assert_eq!(s.wait_used(1).1, 0);
    assert!(s.host_recv_nothing());
    assert_eq!(s.net.control().counters().tx_dropped, 7);
    assert!(!s.irq.reset_requested());
    // A good frame still goes through.
    s.guest_send(VnetHeader::default(), &frame(60, 12));
    assert_eq!(s.host_recv(0).unwrap().1, frame(60, 12));
}

impl Setup {
    fn host_recv_nothing(&self) -> bool {
        std::thread::sleep(Duration::from_millis(30));
        let mut buf = [0u8; 16];
        let iov = [iovec_mut(&mut buf)];
        readv(self.peer(0), &iov).is_err()
    }
}

#[test]
fn hostile_receive_chains() {
    let mut s = Setup::new(1, BASE_FEATURES);
    let (d, e) = &mut s.queues[0];
    // A readable buffer, a buffer outside RAM, a chain smaller than a header: returned empty.
    let a = d.add(&s.mem, &[Desc::r(RXBUF, 2048)]).unwrap();
    let b = d.add(&s.mem, &[Desc::w(MEM_SIZE - 16, 2048)]).unwrap();
    let c = d.add(&s.mem, &[Desc::w(RXBUF, 8)]).unwrap();
    let good = d.add(&s.mem, &[Desc::w(RXBUF, 2048)]).unwrap();
    e.write(1).unwrap();
    s.host_send(0, VnetHeader::default(), &frame(64, 13));
    assert_eq!(s.wait_used(0), (a, 0));
    assert_eq!(s.wait_used(0), (b, 0));
    assert_eq!(s.wait_used(0), (c, 0));
    assert_eq!(s.wait_used(0), (good, 76));
    // A bogus available index: the device needs a reset and stops.
    s.queues[0].0.set_avail_idx(&s.mem, 4000);
    s.queues[0].1.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.irq.reset_requested() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    s.net.reset();
    assert!(!s.net.state().active);
}

#[test]
fn a_guest_that_never_reads_costs_nothing() {
    // No receive buffers: the device does not read the back end at all, so the host's queue
    // (bounded by the kernel: here the socket buffer) fills and the sender sees EAGAIN.
    let s = Setup::new(1, BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    let mut sent = 0usize;
    let f = frame(1500, 14);
    for _ in 0..100_000 {
        let mut h = VnetHeader::default().to_bytes();
        let mut ff = f.clone();
        let iov = [iovec_mut(&mut h), iovec_mut(&mut ff)];
        match writev(s.peer(0), &iov) {
            Ok(_) => sent += 1,
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                break;
            }
        }
    }
    assert!(sent < 100_000, "the back end's queue is bounded");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.net.control().counters().rx_frames, 0);
}

#[test]
fn control_queue_multiqueue_and_announce() {
    let mut s = Setup::new(3, BASE_FEATURES | VIRTIO_NET_F_MQ | VIRTIO_NET_F_MRG_RXBUF);
    assert_eq!(s.ctrl_index(), 6);
    assert!(s.backend.queue_enabled(0));
    assert!(!s.backend.queue_enabled(1) && !s.backend.queue_enabled(2));
    assert_eq!(
        s.control(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &3u16.to_le_bytes()
        ),
        VIRTIO_NET_OK
    );
    assert!(s.backend.queue_enabled(2));
    assert_eq!(s.net.control().active_pairs(), 3);
    // Pair 2 now receives.
    s.post_rx(4, 70, 1024);
    s.host_send(2, VnetHeader::default(), &frame(500, 15));
    assert_eq!(s.wait_used(4).1, 512);
    // ... and transmits.
    s.mem
        .write_slice(&VnetHeader::default().to_bytes(), GuestAddress(TXBUF))
        .unwrap();
    s.mem
        .write_slice(&frame(80, 16), GuestAddress(TXBUF + 0x100))
        .unwrap();
    let (d, e) = &mut s.queues[5];
    d.add(&s.mem, &[Desc::r(TXBUF, 12), Desc::r(TXBUF + 0x100, 80)])
        .unwrap();
    e.write(1).unwrap();
    assert_eq!(s.host_recv(2).unwrap().1, frame(80, 16));
    // Out of range, short, unknown.
    for n in [0u16, 4, 0x8001] {
        assert_eq!(
            s.control(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &n.to_le_bytes()
            ),
            VIRTIO_NET_ERR,
            "{n}"
        );
    }
    assert_eq!(
        s.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &[1]),
        VIRTIO_NET_ERR
    );
    assert_eq!(s.control(0x7f, 0x7f, &[]), VIRTIO_NET_ERR);
    assert_eq!(
        s.control(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &1u16.to_le_bytes()
        ),
        VIRTIO_NET_OK
    );
    assert!(!s.backend.queue_enabled(1));
    // Announce: status bit and a configuration interrupt; the driver's ack clears it.
    let ctl = s.net.control();
    let before = s.irq.config.load(std::sync::atomic::Ordering::SeqCst);
    assert!(ctl.announce());
    assert!(ctl.announce_pending());
    assert_eq!(config(&s.net)[6] & VIRTIO_NET_S_ANNOUNCE as u8, 2);
    assert_eq!(
        s.irq.config.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
    assert_eq!(
        s.control(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]),
        VIRTIO_NET_OK
    );
    assert!(!ctl.announce_pending());
    let _ = s.features;
}

#[test]
fn link_status_changes_interrupt_the_driver() {
    let s = Setup::new(1, BASE_FEATURES);
    let ctl = s.net.control();
    assert!(ctl.link_up());
    ctl.set_link(false);
    assert_eq!(config(&s.net)[6], 0);
    assert_eq!(s.irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    ctl.set_link(false); // no change, no interrupt
    assert_eq!(s.irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    ctl.set_link(true);
    assert_eq!(config(&s.net)[6], 1);
    assert_eq!(s.irq.config.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Without GUEST_ANNOUNCE there is nothing to announce.
    let s2 = Setup::new(1, TRANSPORT_FEATURES);
    assert!(!s2.net.control().announce());
}

#[test]
fn reset_stops_threads_and_offloads() {
    let mut s = Setup::new(1, BASE_FEATURES);
    assert!(s.net.state().active);
    s.net.reset();
    assert!(!s.net.state().active);
    assert_eq!(s.backend.offload(), 0);
    // Frames sent now are not taken.
    s.post_rx(0, 1, 2048);
    s.host_send(0, VnetHeader::default(), &frame(60, 17));
    s.no_used(0);
}

#[test]
fn event_idx_transmit_keeps_asking_for_notifications() {
    // A driver that honours avail_event (§2.7.10) must be asked for a notification after the
    // device consumed a whole queue's worth in one pass, or it would never notify again.
    let features = (BASE_FEATURES | crate::VIRTIO_F_RING_EVENT_IDX) & !VIRTIO_NET_F_MRG_RXBUF;
    let mut s = Setup::new(1, features);
    let f = frame(60, 18);
    s.mem
        .write_slice(&VnetHeader::default().to_bytes(), GuestAddress(TXBUF))
        .unwrap();
    s.mem.write_slice(&f, GuestAddress(TXBUF + 12)).unwrap();
    for round in 1..=3u16 {
        let (d, e) = &mut s.queues[1];
        for _ in 0..QUEUE_SIZE {
            d.add(&s.mem, &[Desc::r(TXBUF, 72)]).unwrap();
        }
        e.write(1).unwrap();
        for _ in 0..QUEUE_SIZE {
            s.wait_used(1);
        }
        // Drain the frames on the host side.
        for _ in 0..QUEUE_SIZE {
            assert!(s.host_recv(0).is_some());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.queues[1].0.avail_event(&s.mem) != round.wrapping_mul(QUEUE_SIZE) {
            assert!(Instant::now() < deadline, "avail_event not re-armed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn a_receive_pass_stopped_at_its_budget_comes_back() {
    // Every frame goes through the bounce buffer (less room than the largest frame): one
    // iteration reads it, the next delivers it. A bad frame first shifts that by one, so the
    // pass's last iteration reads the last frame aside and the back end is then empty: only
    // the device's own re-arm brings it back to deliver that frame.
    let mut s = Setup::new(1, BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    // One frame first, so the thread is surely past its start and waiting for buffers
    // (with no notification of ours pending) when the real ones are posted.
    s.post_rx(0, 1, 1024);
    s.host_send(0, VnetHeader::default(), &frame(60, 99));
    assert_eq!(s.wait_used(0).1, 72);
    std::thread::sleep(Duration::from_millis(50));
    s.host_send(0, VnetHeader::default(), &[0u8; 4]);
    let frames = super::pair::RX_BUDGET / 2;
    for i in 0..frames {
        s.host_send(0, VnetHeader::default(), &frame(100, i as u8));
    }
    s.post_rx(0, frames + 8, 1024);
    for _ in 0..frames {
        assert_eq!(s.wait_used(0).1, 112);
    }
    let c = s.net.control().counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (frames as u64 + 1, 1));
}

#[test]
fn a_paused_device_leaves_guest_memory_and_the_back_end_alone() {
    let mut s = Setup::new(1, BASE_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
    let heads = s.post_rx(0, 4, 2048);
    s.host_send(0, VnetHeader::default(), &frame(100, 30));
    assert_eq!(s.wait_used(0), (heads[0], 112));
    let pos = s.net.pause().unwrap();
    let at = |i: usize| pos.iter().find(|p| p.index == i).copied().unwrap();
    // The device holds the three other chains, but they count as not taken: a device
    // restored from these positions takes them again.
    assert_eq!((at(0).next_avail, at(0).next_used), (1, 1));
    assert_eq!((at(1).next_avail, at(1).next_used), (0, 0));
    assert_eq!(at(2).next_avail, 0);
    assert!(s.net.state().active);
    // Paused: nothing moves either way.
    s.host_send(0, VnetHeader::default(), &frame(200, 31));
    s.guest_send(VnetHeader::default(), &frame(60, 32));
    s.no_used(0);
    s.no_used(1);
    assert!(s.host_recv_nothing());
    assert_eq!(s.net.pause().unwrap(), pos);
    // Resumed: both frames go through, into the chains held before the pause.
    s.net.resume().unwrap();
    assert_eq!(s.wait_used(0), (heads[1], 212));
    assert_eq!(s.host_recv(0).unwrap().1, frame(60, 32));
    s.wait_used(1);
    // The snapshot's view of the configuration: the link as a fresh device reports it.
    s.net.control().set_link(false);
    assert_eq!(
        &s.net.state().config[6..8],
        &VIRTIO_NET_S_LINK_UP.to_le_bytes()
    );
}

/// A snapshot keeps the queue pairs the driver enabled; a restored device receives on all of
/// them again (the driver does not repeat VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
#[test]
fn restored_device_keeps_the_queue_pairs_in_use() {
    let mut s = Setup::new(3, BASE_FEATURES | VIRTIO_NET_F_MQ | VIRTIO_NET_F_MRG_RXBUF);
    assert!(s.net.state().extra.is_empty(), "one pair: nothing to keep");
    assert_eq!(
        s.control(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &2u16.to_le_bytes()
        ),
        VIRTIO_NET_OK
    );
    s.net.pause().unwrap();
    let extra = s.net.state().extra;
    assert_eq!(extra, vec![("queue_pairs".to_string(), 2)]);

    let mut r = Setup::new(3, BASE_FEATURES | VIRTIO_NET_F_MQ | VIRTIO_NET_F_MRG_RXBUF);
    assert!(!r.backend.queue_enabled(1));
    r.net.restore_extra(&extra).unwrap();
    assert!(r.backend.queue_enabled(1) && !r.backend.queue_enabled(2));
    assert_eq!(r.net.control().active_pairs(), 2);
    r.post_rx(2, 4, 1024);
    r.host_send(1, VnetHeader::default(), &frame(300, 7));
    assert_eq!(r.wait_used(2).1, 312);
    // A state naming more pairs than the device has is refused, not applied.
    assert!(r
        .net
        .restore_extra(&[("queue_pairs".to_string(), 9)])
        .is_err());
    assert_eq!(r.net.control().active_pairs(), 2);
}

/// Waits until `irq` has recorded `n` queue interrupts (or fails after 5 s).
fn wait_interrupts(irq: &RecordingInterrupt, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while irq.queue_interrupts() < n {
        assert!(Instant::now() < deadline, "{n} interrupts expected");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A device with moderation gap `gap` that has sent one receive interrupt and holds back the
/// one for a second, acknowledgement-sized frame the driver asked for (sent at the instant
/// returned).
fn receive_interrupt_held_back(gap: Duration) -> (Setup, Instant) {
    let features = BASE_FEATURES | crate::VIRTIO_F_RING_EVENT_IDX | VIRTIO_NET_F_MRG_RXBUF;
    let mut s = Setup::with_gap(features, gap);
    s.post_rx(0, 8, 2048);
    // The first interrupt after a quiet spell goes out at once.
    s.host_send(0, VnetHeader::default(), &frame(60, 1));
    s.wait_used(0);
    wait_interrupts(&s.irq, 1);
    // The driver consumed it and wants to hear of the next entry (used_event = 1).
    s.queues[0].0.set_used_event(&s.mem, 1);
    let t = Instant::now();
    s.host_send(0, VnetHeader::default(), &frame(60, 2));
    s.wait_used(0);
    // Used at once, the interrupt held back.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.irq.queue_interrupts(), 1);
    (s, t)
}

#[test]
fn interrupts_inside_the_moderation_gap_are_held_back_then_sent() {
    let gap = Duration::from_millis(300);
    let (mut s, t) = receive_interrupt_held_back(gap);
    // The held-back interrupt goes out when the gap has passed, not much later.
    wait_interrupts(&s.irq, 2);
    let waited = t.elapsed();
    assert!(waited >= gap - Duration::from_millis(60), "{waited:?}");
    assert!(waited < gap + Duration::from_millis(500), "{waited:?}");
    assert_eq!(s.irq.queue.lock().unwrap()[..], [0, 0]);
    // Completions of transmitted data the same way: the first at once, the next after the
    // gap.
    s.guest_send(VnetHeader::default(), &frame(1000, 3));
    s.wait_used(1);
    wait_interrupts(&s.irq, 3);
    s.queues[1].0.set_used_event(&s.mem, 1);
    s.guest_send(VnetHeader::default(), &frame(1000, 4));
    s.wait_used(1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.irq.queue_interrupts(), 3);
    wait_interrupts(&s.irq, 4);
    assert_eq!(s.irq.queue.lock().unwrap()[2..], [1, 1]);
}

#[test]
fn completions_of_acknowledgements_are_not_held_back() {
    // A guest receiving a stream sends acknowledgements; holding their completions back
    // halved a host→guest TCP stream on the emulator (bench/net, 2026-11-30).
    let (mut s, _) = receive_interrupt_held_back(Duration::from_secs(60));
    s.guest_send(VnetHeader::default(), &frame(60, 3));
    s.wait_used(1);
    // The transmit queue's first interrupt, and the held-back receive one stays held.
    wait_interrupts(&s.irq, 2);
    s.queues[1].0.set_used_event(&s.mem, 1);
    s.guest_send(VnetHeader::default(), &frame(60, 4));
    s.wait_used(1);
    // Inside the gap, and still at once.
    wait_interrupts(&s.irq, 3);
    assert_eq!(s.irq.queue.lock().unwrap()[1..], [1, 1]);
}

#[test]
fn a_held_back_interrupt_the_driver_no_longer_wants_is_not_sent() {
    let gap = Duration::from_millis(200);
    let (mut s, _) = receive_interrupt_held_back(gap);
    // The driver polled the entry itself and now waits for the one after it.
    s.queues[0].0.set_used_event(&s.mem, 2);
    std::thread::sleep(gap * 2);
    assert_eq!(s.irq.queue_interrupts(), 1);
    // The next entry after the gap interrupts at once.
    s.host_send(0, VnetHeader::default(), &frame(60, 3));
    s.wait_used(0);
    wait_interrupts(&s.irq, 2);
}

#[test]
fn a_pause_sends_the_held_back_interrupts() {
    let (mut s, _) = receive_interrupt_held_back(Duration::from_secs(60));
    s.net.pause().unwrap();
    assert_eq!(s.irq.queue_interrupts(), 2);
}

#[test]
fn a_data_frame_is_not_held_back_and_takes_a_held_back_interrupt_along() {
    // An acknowledgement-sized frame waits for the gap ...
    let (mut s, _) = receive_interrupt_held_back(Duration::from_secs(60));
    // ... a frame with data does not, and one interrupt covers both.
    s.host_send(0, VnetHeader::default(), &frame(1000, 3));
    s.wait_used(0);
    wait_interrupts(&s.irq, 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.irq.queue_interrupts(), 2);
}
