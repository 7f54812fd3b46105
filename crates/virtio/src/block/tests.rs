//! virtio-blk against a fake guest memory: every request type, the read-only disk, and the
//! malformed requests a hostile guest can send.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::*;
use crate::driver::{Desc, SplitQueueDriver};
use crate::test_util::*;
use crate::TRANSPORT_FEATURES;
use vireo_hv::EventFd;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x800;
const ALL_BLK: u64 = TRANSPORT_FEATURES
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_SIZE_MAX
    | VIRTIO_BLK_F_BLK_SIZE;

struct Dev {
    mem: GuestMemory,
    driver: SplitQueueDriver,
    notify: EventFd,
    irq: Arc<RecordingInterrupt>,
    blk: Block,
    file: TempFile,
}

fn device(size: u64, opts: impl FnOnce(DiskOptions) -> DiskOptions, features: u64) -> Dev {
    let file = TempFile::new("blk", size);
    let disk = Arc::new(DiskImage::open(&opts(DiskOptions::new(file.path()))).unwrap());
    let mem = guest_memory();
    let mut driver = SplitQueueDriver::new(&mem, QUEUE_BASE, QUEUE_SIZE);
    driver.set_event_idx(features & crate::VIRTIO_F_RING_EVENT_IDX != 0);
    let notify = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(RecordingInterrupt::default());
    let mut blk = Block::new(disk, 0);
    blk.activate(Activation {
        mem: mem.clone(),
        features,
        queues: vec![ActiveQueue {
            index: 0,
            queue: driver.queue().unwrap(),
            notify: notify.try_clone().unwrap(),
        }],
        interrupt: irq.clone(),
    })
    .unwrap();
    Dev {
        mem,
        driver,
        notify,
        irq,
        blk,
        file,
    }
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

impl Dev {
    /// Submit `descs` and wait for the reply: (used length, status byte at STATUS).
    fn submit(&mut self, descs: &[Desc]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.driver.add(&self.mem, descs).unwrap();
        self.notify.write(1).unwrap();
        let (_, len) = self.wait_used();
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }
    fn wait_used(&mut self) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = self.driver.pop_used(&self.mem) {
                return u;
            }
            assert!(Instant::now() < deadline, "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn request(&mut self, kind: u32, sector: u64, data: Option<Desc>) -> (u32, u8) {
        self.mem
            .write_slice(&header(kind, sector), GuestAddress(HDR))
            .unwrap();
        let mut d = vec![Desc::r(HDR, 16)];
        d.extend(data);
        d.push(Desc::w(STATUS, 1));
        self.submit(&d)
    }
    fn file_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(self.file.path()).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, at).unwrap();
        b
    }
    fn guest_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn config_space_and_features() {
    let d = device(1 << 20, |o| o, ALL_BLK);
    let mut c = [0u8; CONFIG_LEN];
    d.blk.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(c[56], 1);
    let mut beyond = [0xffu8; 8];
    d.blk.read_config(CONFIG_LEN as u64 - 2, &mut beyond);
    assert_eq!(beyond, [0; 8]);
    d.blk.read_config(u64::MAX, &mut beyond);
    let f = d.blk.features();
    assert_ne!(f & VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    let ro = device(
        1 << 20,
        |o| DiskOptions {
            readonly: true,
            ..o
        },
        ALL_BLK,
    );
    let f = ro.blk.features();
    assert_ne!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn write_then_read_multi_segment() {
    let mut d = device(1 << 20, |o| o, ALL_BLK);
    let data = pattern(8192, 3);
    d.mem.write_slice(&data[..512], GuestAddress(BUF)).unwrap();
    d.mem
        .write_slice(&data[512..], GuestAddress(BUF + 0x10000))
        .unwrap();
    d.mem
        .write_slice(&header(VIRTIO_BLK_T_OUT, 7), GuestAddress(HDR))
        .unwrap();
    let (len, st) = d.submit(&[
        Desc::r(HDR, 16),
        Desc::r(BUF, 512),
        Desc::r(BUF + 0x10000, 7680),
        Desc::w(STATUS, 1),
    ]);
    assert_eq!((len, st), (1, VIRTIO_BLK_S_OK));
    assert_eq!(d.file_bytes(7 * 512, 8192), data);
    // Read it back into three segments, header split over two buffers.
    d.mem
        .write_slice(&header(VIRTIO_BLK_T_IN, 7), GuestAddress(HDR))
        .unwrap();
    let (len, st) = d.submit(&[
        Desc::r(HDR, 5),
        Desc::r(HDR + 5, 11),
        Desc::w(BUF + 0x20000, 1000),
        Desc::w(BUF + 0x30000, 7192),
        Desc::w(STATUS, 1),
    ]);
    assert_eq!((len, st), (8193, VIRTIO_BLK_S_OK));
    let mut got = d.guest_bytes(BUF + 0x20000, 1000);
    got.extend(d.guest_bytes(BUF + 0x30000, 7192));
    assert_eq!(got, data);
    // Data and status in one buffer (free framing).
    let (len, st) = {
        d.mem
            .write_slice(&header(VIRTIO_BLK_T_IN, 7), GuestAddress(HDR))
            .unwrap();
        d.driver
            .add(&d.mem, &[Desc::r(HDR, 16), Desc::w(BUF + 0x40000, 513)])
            .unwrap();
        d.notify.write(1).unwrap();
        let (_, len) = d.wait_used();
        (len, d.guest_bytes(BUF + 0x40000 + 512, 1)[0])
    };
    assert_eq!((len, st), (513, VIRTIO_BLK_S_OK));
    assert_eq!(d.guest_bytes(BUF + 0x40000, 512), data[..512]);
    assert!(d.irq.queue_interrupts() > 0);
}

#[test]
fn indirect_descriptors() {
    let mut d = device(1 << 20, |o| o, ALL_BLK);
    d.file.path();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.file.path())
        .unwrap()
        .write_all_at(&pattern(512, 9), 512)
        .unwrap();
    d.mem
        .write_slice(&header(VIRTIO_BLK_T_IN, 1), GuestAddress(HDR))
        .unwrap();
    d.driver
        .add_indirect(
            &d.mem,
            DATA + 0x8000,
            &[Desc::r(HDR, 16), Desc::w(BUF, 512), Desc::w(STATUS, 1)],
        )
        .unwrap();
    d.notify.write(1).unwrap();
    assert_eq!(d.wait_used().1, 513);
    assert_eq!(d.guest_bytes(BUF, 512), pattern(512, 9));
    assert_eq!(d.guest_bytes(STATUS, 1), [VIRTIO_BLK_S_OK]);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let mut d = device(
        1 << 20,
        |o| DiskOptions {
            serial: Some("vireo-serial-0001".into()),
            ..o
        },
        ALL_BLK,
    );
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, None), (1, VIRTIO_BLK_S_OK));
    let (len, st) = d.request(VIRTIO_BLK_T_GET_ID, 0, Some(Desc::w(BUF, 20)));
    assert_eq!((len, st), (21, VIRTIO_BLK_S_OK));
    let mut want = b"vireo-serial-0001".to_vec();
    want.resize(20, 0);
    assert_eq!(d.guest_bytes(BUF, 20), want);
    // A short ID buffer gets what fits.
    let (len, _) = d.request(VIRTIO_BLK_T_GET_ID, 0, Some(Desc::w(BUF, 5)));
    assert_eq!(len, 6);
    // Discard and write-zeroes (one with unmap) over written data.
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.file.path())
        .unwrap()
        .write_all_at(&[0x55; 65536], 0)
        .unwrap();
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    };
    let mut segs = seg(8, 8, 0).to_vec();
    segs.extend(seg(32, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
    d.mem.write_slice(&segs, GuestAddress(BUF)).unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some(Desc::r(BUF, 32))),
        (1, VIRTIO_BLK_S_OK)
    );
    let f = d.file_bytes(0, 65536);
    assert!(f[4096..8192].iter().all(|&b| b == 0));
    assert!(f[16384..20480].iter().all(|&b| b == 0));
    assert!(f[..4096].iter().all(|&b| b == 0x55));
    assert!(f[8192..16384].iter().all(|&b| b == 0x55));
    d.mem
        .write_slice(&seg(64, 8, 0), GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::r(BUF, 16))),
        (1, VIRTIO_BLK_S_OK)
    );
    // Discard with the unmap flag, or unknown flags: UNSUPP (§5.2.6.2).
    d.mem
        .write_slice(&seg(64, 8, 1), GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::r(BUF, 16))).1,
        VIRTIO_BLK_S_UNSUPP
    );
    d.mem
        .write_slice(&seg(64, 8, 6), GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some(Desc::r(BUF, 16)))
            .1,
        VIRTIO_BLK_S_UNSUPP
    );
    // Past the end, too many sectors, bad segment sizes: IOERR.
    for (s, n) in [
        (2047u64, 2u32),
        (u64::MAX / 512, 1),
        (0, MAX_DISCARD_SECTORS + 1),
    ] {
        d.mem.write_slice(&seg(s, n, 0), GuestAddress(BUF)).unwrap();
        assert_eq!(
            d.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::r(BUF, 16))).1,
            VIRTIO_BLK_S_IOERR,
            "{s} {n}"
        );
    }
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::r(BUF, 15))).1,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, None).1,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(
            VIRTIO_BLK_T_DISCARD,
            0,
            Some(Desc::r(BUF, 16 * (MAX_DISCARD_SEG + 1)))
        )
        .1,
        VIRTIO_BLK_S_IOERR
    );
}

#[test]
fn unnegotiated_and_unknown_requests_are_unsupp() {
    let mut d = device(1 << 20, |o| o, TRANSPORT_FEATURES);
    assert_eq!(
        d.request(VIRTIO_BLK_T_FLUSH, 0, None).1,
        VIRTIO_BLK_S_UNSUPP
    );
    d.mem.write_slice(&[0u8; 16], GuestAddress(BUF)).unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::r(BUF, 16))).1,
        VIRTIO_BLK_S_UNSUPP
    );
    for kind in [2u32, 3, 99, u32::MAX] {
        assert_eq!(d.request(kind, 0, None).1, VIRTIO_BLK_S_UNSUPP, "{kind}");
    }
}

#[test]
fn read_only_disks_refuse_writes_with_ioerr() {
    let mut d = device(
        1 << 20,
        |o| DiskOptions {
            readonly: true,
            ..o
        },
        ALL_BLK,
    );
    std::fs::write(d.file.path(), pattern(1 << 20, 1)).unwrap_or(());
    d.mem.write_slice(&[0xee; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, 0, Some(Desc::r(BUF, 512))),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_ne!(d.file_bytes(0, 512), vec![0xee; 512]);
    d.mem.write_slice(&[0u8; 16], GuestAddress(BUF)).unwrap();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        assert_eq!(
            d.request(kind, 0, Some(Desc::r(BUF, 16))).1,
            VIRTIO_BLK_S_IOERR
        );
    }
    // Reads and flushes work.
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 0, Some(Desc::w(BUF, 512))).1,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, None).1, VIRTIO_BLK_S_OK);
}

#[test]
fn malformed_requests_get_error_statuses() {
    let mut d = device(1 << 20, |o| o, ALL_BLK);
    // Past the end of the disk, and sector numbers that overflow.
    for sector in [2048u64, 2047, u64::MAX, u64::MAX / 512] {
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, sector, Some(Desc::w(BUF, 1024)))
                .1,
            VIRTIO_BLK_S_IOERR,
            "{sector}"
        );
    }
    // Lengths that are not whole sectors.
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 0, Some(Desc::w(BUF, 100))).1,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, 0, Some(Desc::r(BUF, 513))).1,
        VIRTIO_BLK_S_IOERR
    );
    // Wrong direction: a read whose data buffer is device-readable (no data area).
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 0, Some(Desc::r(BUF, 512))),
        (1, VIRTIO_BLK_S_OK)
    );
    // ... and a write whose data buffer is device-writable: no data, the writable part is
    // data+status, so the status lands at its end.
    d.mem.write_obj(0xffu8, GuestAddress(BUF + 512)).unwrap();
    d.mem
        .write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
        .unwrap();
    d.driver
        .add(&d.mem, &[Desc::r(HDR, 16), Desc::w(BUF, 513)])
        .unwrap();
    d.notify.write(1).unwrap();
    d.wait_used();
    assert_eq!(d.guest_bytes(BUF + 512, 1), [VIRTIO_BLK_S_OK]);
    // Short header.
    let (_, st) = d.submit(&[Desc::r(HDR, 8), Desc::w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // Misordered (readable after writable).
    let (_, st) = d.submit(&[Desc::w(BUF, 512), Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // A data buffer outside RAM, and one of absurd length.
    let (_, st) = d.submit(&[Desc::r(HDR, 16), Desc::w(MEM_SIZE, 512), Desc::w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let (_, st) = d.submit(&[
        Desc::r(HDR, 16),
        Desc::w(BUF, u32::MAX - 1024),
        Desc::w(STATUS, 1),
    ]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // No status byte at all: returned with length 0, the device carries on.
    d.driver.add(&d.mem, &[Desc::r(HDR, 16)]).unwrap();
    d.notify.write(1).unwrap();
    assert_eq!(d.wait_used().1, 0);
    // The device still works and never asked for a reset.
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 0, Some(Desc::w(BUF, 512))).1,
        VIRTIO_BLK_S_OK
    );
    assert!(!d.irq.reset_requested());
}

#[test]
fn broken_chains_put_the_device_in_needs_reset() {
    type Spoil = fn(&mut Dev);
    let cases: [(&str, Spoil); 5] = [
        ("loop", |d| {
            let h = d.driver.add_raw(
                &d.mem,
                &[(HDR, 16, NEXT, 0), (STATUS, 1, WRITE | NEXT, 0)],
                false,
            );
            d.driver.set_next(&d.mem, h, h + 1);
            d.driver.set_next(&d.mem, h + 1, h);
            d.driver.publish(&d.mem, h);
        }),
        ("next out of range", |d| {
            let h = d.driver.add_raw(&d.mem, &[(HDR, 16, NEXT, 0)], false);
            d.driver.set_next(&d.mem, h, 4000);
            d.driver.publish(&d.mem, h);
        }),
        ("avail index far ahead", |d| {
            d.driver.set_avail_idx(&d.mem, 0x8000);
        }),
        ("head index out of range", |d| {
            // Publish a head index past the queue size.
            d.driver.publish(&d.mem, 999);
        }),
        ("indirect table of bad length", |d| {
            let h = d
                .driver
                .add_raw(&d.mem, &[(DATA + 0x8000, 17, INDIRECT, 0)], false);
            d.driver.publish(&d.mem, h);
        }),
    ];
    for (what, spoil) in cases {
        let mut d = device(1 << 20, |o| o, ALL_BLK);
        spoil(&mut d);
        d.notify.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !d.irq.reset_requested() {
            assert!(Instant::now() < deadline, "{what}: no reset requested");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Reset (stop) and activate again: works.
        d.blk.reset();
        assert!(!d.blk.state().active);
    }
}

/// Random headers and chains of up to 6 buffers with random addresses, lengths and
/// directions: each gets a reply, or (a chain longer than 4 GiB in total, which
/// `virtio-queue` will not follow) puts the device in needs-reset; never a panic or a hang.
#[test]
fn random_chains_never_panic_or_hang() {
    let mut d = device(1 << 20, |o| o, ALL_BLK);
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut replies, mut resets) = (0, 0);
    for _ in 0..400 {
        let h = next();
        d.mem
            .write_slice(&header((h % 16) as u32, next() % 4096), GuestAddress(HDR))
            .unwrap();
        let n = 1 + (next() % 6) as usize;
        let descs: Vec<Desc> = (0..n)
            .map(|_| {
                let addr = match next() % 4 {
                    0 => next(),
                    _ => DATA + next() % 0x80000,
                };
                let len = match next() % 4 {
                    0 => next() as u32,
                    1 => 512,
                    _ => (next() % 4096) as u32,
                };
                Desc {
                    addr,
                    len,
                    write: next() % 2 == 0,
                }
            })
            .collect();
        d.driver.add(&d.mem, &descs).unwrap();
        d.notify.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if d.driver.pop_used(&d.mem).is_some() {
                replies += 1;
                break;
            }
            if d.irq.reset_requested() {
                resets += 1;
                let total: u64 = descs.iter().map(|x| u64::from(x.len)).sum();
                assert!(total > u64::from(u32::MAX), "reset for {descs:x?}");
                d = device(1 << 20, |o| o, ALL_BLK);
                break;
            }
            assert!(Instant::now() < deadline, "no reply for {descs:x?}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert!(
        replies > 300 && resets > 0,
        "{replies} replies, {resets} resets"
    );
}

#[test]
fn request_server_serves_without_a_thread() {
    let file = TempFile::new("srv", 4096);
    let disk = Arc::new(DiskImage::open(&DiskOptions::new(file.path())).unwrap());
    let mem = guest_memory();
    let mut s = RequestServer::new(disk, ALL_BLK);
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .unwrap();
    let chain = Chain {
        head: 0,
        readable: vec![Buffer {
            addr: GuestAddress(HDR),
            len: 16,
        }],
        writable: vec![
            Buffer {
                addr: GuestAddress(BUF),
                len: 4096,
            },
            Buffer {
                addr: GuestAddress(STATUS),
                len: 1,
            },
        ],
        fault: None,
    };
    assert_eq!(s.serve(&mem, &chain), 4097);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
}

#[test]
fn direct_disks_keep_many_requests_in_flight() {
    let mut d = device(4 << 20, |o| DiskOptions { direct: true, ..o }, ALL_BLK);
    let content: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.file.path())
        .unwrap()
        .write_all_at(&content, 0)
        .unwrap();
    // 48 reads of 4 KiB at scattered sectors, aligned buffers (asynchronous), plus a few with
    // unaligned buffers (bounced, synchronous) in between; one notification for all.
    let mut expect = Vec::new();
    for i in 0..48u64 {
        let slot = DATA + i * 0x2000;
        let block = (i * 37) % 1024;
        d.mem
            .write_slice(&header(VIRTIO_BLK_T_IN, block * 8), GuestAddress(slot))
            .unwrap();
        d.mem.write_obj(0xffu8, GuestAddress(slot + 16)).unwrap();
        let buf = if i % 10 == 3 {
            slot + 0x200
        } else {
            slot + 0x1000
        };
        let head = d
            .driver
            .add(
                &d.mem,
                &[Desc::r(slot, 16), Desc::w(buf, 4096), Desc::w(slot + 16, 1)],
            )
            .unwrap();
        expect.push((head, slot, buf, block));
    }
    d.notify.write(1).unwrap();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < expect.len() {
        let (head, len) = d.wait_used();
        assert_eq!(len, 4097);
        assert!(seen.insert(head));
    }
    for (_, slot, buf, block) in expect {
        assert_eq!(d.guest_bytes(slot + 16, 1), [VIRTIO_BLK_S_OK]);
        let at = (block * 4096) as usize;
        assert_eq!(
            d.guest_bytes(buf, 4096),
            content[at..at + 4096],
            "block {block}"
        );
    }
    // Writes go the same way.
    d.mem.write_slice(&[0x5a; 4096], GuestAddress(BUF)).unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, 16, Some(Desc::r(BUF, 4096))),
        (1, VIRTIO_BLK_S_OK)
    );
    assert_eq!(d.file_bytes(16 * 512, 4096), vec![0x5a; 4096]);
    // A disk offset that is not 4 KiB aligned goes the synchronous way (the host decides
    // whether O_DIRECT takes it: a 512-byte device does).
    let st = d.request(VIRTIO_BLK_T_IN, 1, Some(Desc::w(BUF, 4096))).1;
    assert!(st == VIRTIO_BLK_S_OK || st == VIRTIO_BLK_S_IOERR);
    assert!(!d.irq.reset_requested());
}

#[test]
fn reset_waits_for_transfers_in_flight() {
    let mut d = device(8 << 20, |o| DiskOptions { direct: true, ..o }, ALL_BLK);
    for i in 0..80u64 {
        let slot = DATA + i * 0x3000;
        d.mem
            .write_slice(&header(VIRTIO_BLK_T_IN, (i % 2000) * 8), GuestAddress(slot))
            .unwrap();
        d.driver
            .add(
                &d.mem,
                &[
                    Desc::r(slot, 16),
                    Desc::w(slot + 0x1000, 8192),
                    Desc::w(slot + 16, 1),
                ],
            )
            .unwrap();
    }
    d.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_micros(300));
    d.blk.reset();
    assert!(!d.blk.state().active);
}

#[test]
fn pause_completes_every_transfer_in_flight_and_resume_serves_on() {
    let mut d = device(8 << 20, |o| DiskOptions { direct: true, ..o }, ALL_BLK);
    let n = 80u64;
    for i in 0..n {
        let slot = DATA + i * 0x3000;
        d.mem
            .write_slice(&header(VIRTIO_BLK_T_IN, (i % 2000) * 8), GuestAddress(slot))
            .unwrap();
        d.mem.write_obj(0xffu8, GuestAddress(slot + 16)).unwrap();
        d.driver
            .add(
                &d.mem,
                &[
                    Desc::r(slot, 16),
                    Desc::w(slot + 0x1000, 8192),
                    Desc::w(slot + 16, 1),
                ],
            )
            .unwrap();
    }
    d.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_micros(300));
    let positions = d.blk.pause().unwrap();
    // Everything the device took is in the used ring with its status: nothing in flight.
    let p = positions[0];
    assert_eq!(p.next_avail, p.next_used, "{p:?}");
    assert_eq!(d.driver.used_idx(&d.mem), p.next_used);
    for i in 0..u64::from(p.next_used) {
        assert_eq!(d.guest_bytes(DATA + i * 0x3000 + 16, 1), [VIRTIO_BLK_S_OK]);
    }
    // Still active while paused; a resume serves whatever is left.
    assert!(d.blk.state().active);
    d.blk.resume().unwrap();
    d.notify.write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.driver.used_idx(&d.mem) < n as u16 {
        assert!(std::time::Instant::now() < deadline, "not all served");
        std::thread::sleep(Duration::from_millis(1));
    }
    let c: std::collections::HashMap<_, _> = d.blk.counters().into_iter().collect();
    assert_eq!(c["reads"], n);
    assert_eq!(c["read_bytes"], n * 8192);
}

/// A driver that, like Linux, kicks only when avail_event asks (§2.7.10) and never asks for
/// another interrupt after the first (used_event stays 0) is never left waiting: the device
/// re-arms notifications before it sleeps and serves what raced in. Exactly one interrupt
/// comes for the whole run. Buffered (synchronous) and direct (asynchronous) disks, queue
/// depth 1 and 8.
#[test]
fn event_idx_drivers_that_kick_only_when_asked_are_never_stranded() {
    for (direct, depth) in [(false, 1usize), (false, 8), (true, 1), (true, 8)] {
        let mut d = device(4 << 20, |o| DiskOptions { direct, ..o }, ALL_BLK);
        let total = 400usize;
        let mut slots: Vec<u64> = (0..depth as u64).collect();
        let mut slot_of = std::collections::HashMap::new();
        let (mut submitted, mut done, mut kicks) = (0usize, 0usize, 0usize);
        let deadline = Instant::now() + Duration::from_secs(20);
        while done < total {
            while submitted < total {
                let Some(slot) = slots.pop() else { break };
                let at = DATA + slot * 0x3000;
                let sector = (submitted as u64 * 8) % 8000;
                d.mem
                    .write_slice(&header(VIRTIO_BLK_T_IN, sector), GuestAddress(at))
                    .unwrap();
                d.mem.write_obj(0xffu8, GuestAddress(at + 16)).unwrap();
                let head = d
                    .driver
                    .add(
                        &d.mem,
                        &[
                            Desc::r(at, 16),
                            Desc::w(at + 0x1000, 4096),
                            Desc::w(at + 16, 1),
                        ],
                    )
                    .unwrap();
                slot_of.insert(head, slot);
                submitted += 1;
            }
            if d.driver.kick_needed(&d.mem) {
                d.notify.write(1).unwrap();
                kicks += 1;
            }
            while let Some((head, len)) = d.driver.pop_used(&d.mem) {
                let slot = slot_of.remove(&head).unwrap();
                assert_eq!(len, 4097);
                assert_eq!(
                    d.guest_bytes(DATA + slot * 0x3000 + 16, 1),
                    [VIRTIO_BLK_S_OK]
                );
                slots.push(slot);
                done += 1;
            }
            assert!(
                Instant::now() < deadline,
                "stranded: direct={direct} depth={depth}: {done} of {submitted} done"
            );
            std::thread::yield_now();
        }
        assert!(kicks >= 1 && kicks <= total, "{kicks} kicks");
        assert_eq!(
            d.irq.queue_interrupts(),
            1,
            "direct={direct} depth={depth}: used_event 0 asks for one interrupt"
        );
        assert!(!d.irq.reset_requested());
    }
}
