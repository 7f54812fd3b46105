//! The transport driven as a guest driver drives it (Linux's virtio_pci_modern order of
//! operations), and as a hostile guest might.

use std::time::{Duration, Instant};

use super::*;
use crate::driver::{Desc, SplitQueueDriver};
use crate::test_util::*;
use crate::{Rng, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FAILED, VIRTIO_F_RING_INDIRECT_DESC};
use vireo_hv::MsiMessage;
use vm_memory::Bytes;

const BAR: u64 = 0x8_0000_0000;

struct Guest {
    dev: VirtioPciDevice,
    vm: Arc<FakeVm>,
    mem: GuestMemory,
}

fn rng_device(in_kernel: bool) -> Guest {
    let mem = guest_memory();
    let vm = FakeVm::new(in_kernel);
    let dev = VirtioPciDevice::new(Box::new(Rng::new()), mem.clone(), vm.clone()).unwrap();
    Guest { dev, vm, mem }
}

impl Guest {
    fn r(&mut self, offset: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        self.dev.read_bar(0, offset, &mut d[..len]);
        u64::from_le_bytes(d)
    }
    fn w(&mut self, offset: u64, len: usize, v: u64) {
        self.dev.write_bar(0, offset, &v.to_le_bytes()[..len]);
    }
    fn status(&mut self) -> u8 {
        self.r(common::DEVICE_STATUS, 1) as u8
    }
    fn set_status(&mut self, s: u8) {
        self.w(common::DEVICE_STATUS, 1, u64::from(s));
    }
    fn features(&mut self) -> u64 {
        self.w(common::DEVICE_FEATURE_SELECT, 4, 0);
        let lo = self.r(common::DEVICE_FEATURE, 4);
        self.w(common::DEVICE_FEATURE_SELECT, 4, 1);
        let hi = self.r(common::DEVICE_FEATURE, 4);
        lo | (hi << 32)
    }
    fn set_driver_features(&mut self, f: u64) {
        self.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        self.w(common::DRIVER_FEATURE, 4, f & 0xffff_ffff);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.w(common::DRIVER_FEATURE, 4, f >> 32);
    }
    /// Configure queue `q` on `d` and enable it.
    fn setup_queue(&mut self, q: u16, d: &SplitQueueDriver, vector: u16) {
        self.w(common::QUEUE_SELECT, 2, u64::from(q));
        self.w(common::QUEUE_SIZE, 2, u64::from(d.size()));
        let (desc, avail, used) = d.addresses();
        self.w(common::QUEUE_DESC, 4, desc & 0xffff_ffff);
        self.w(common::QUEUE_DESC + 4, 4, desc >> 32);
        self.w(common::QUEUE_DRIVER, 8, avail);
        self.w(common::QUEUE_DEVICE, 8, used);
        self.w(common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        self.w(common::QUEUE_ENABLE, 2, 1);
    }
    /// Program MSI-X entry `v` unmasked with `data`, and enable MSI-X.
    fn msix(&mut self, v: u64, data: u32) {
        let e = MSIX_TABLE_OFFSET + 16 * v;
        self.w(e, 8, 0xfee0_0000);
        self.w(e + 8, 4, u64::from(data));
        self.w(e + 12, 4, 0);
        let cap = self.dev.msix_cap;
        self.dev.write_config(cap + 2, &0x8000u16.to_le_bytes());
    }
    /// The whole initialisation of §3.1.1 with `features`; returns the final status.
    fn init(&mut self, d: &SplitQueueDriver, features: u64) -> u8 {
        self.set_status(0);
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.set_driver_features(features);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return self.status();
        }
        self.msix(0, 0x40);
        self.msix(1, 0x41);
        self.w(common::CONFIG_MSIX_VECTOR, 2, 0);
        self.setup_queue(0, d, 1);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        self.status()
    }
    fn wait_used(&self, d: &mut SplitQueueDriver) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = d.pop_used(&self.mem) {
                return u;
            }
            assert!(Instant::now() < deadline, "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn wait_for(&self, what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

const ALL: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC;

/// Walk the capability list; returns (offset, cfg_type or cap id) of each capability.
fn capabilities(dev: &mut VirtioPciDevice) -> Vec<(u16, u8, u8)> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    dev.read_config(0x34, &mut b);
    let mut at = u16::from(b[0]);
    for _ in 0..48 {
        if at == 0 {
            break;
        }
        let mut hdr = [0u8; 4];
        dev.read_config(at, &mut hdr);
        out.push((at, hdr[0], hdr[3]));
        at = u16::from(hdr[1]);
    }
    out
}

#[test]
fn pci_identity_bar_and_capabilities() {
    let mut g = rng_device(false);
    let mut id = [0u8; 4];
    g.dev.read_config(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
    let mut rev = [0u8; 1];
    g.dev.read_config(8, &mut rev);
    assert_eq!(rev[0], 1);
    // 64-bit memory BAR of BAR_SIZE.
    g.dev.write_config(0x10, &[0xff; 4]);
    g.dev.write_config(0x14, &[0xff; 4]);
    let mut lo = [0u8; 4];
    let mut hi = [0u8; 4];
    g.dev.read_config(0x10, &mut lo);
    g.dev.read_config(0x14, &mut hi);
    let v = (u64::from(u32::from_le_bytes(hi)) << 32) | u64::from(u32::from_le_bytes(lo) & !0xf);
    assert_eq!(!v + 1, BAR_SIZE);
    assert_eq!(u32::from_le_bytes(lo) & 0xf, 0b0100);
    let caps = capabilities(&mut g.dev);
    let vendor: Vec<u8> = caps.iter().filter(|c| c.1 == 9).map(|c| c.2).collect();
    assert_eq!(vendor, vec![1, 2, 3, 4, 5]);
    assert!(caps.iter().any(|c| c.1 == 0x11));
    // The notify capability: offset, length, multiplier.
    let notify = caps.iter().find(|c| c.1 == 9 && c.2 == 2).unwrap().0;
    let mut n = [0u8; 20];
    g.dev.read_config(notify, &mut n);
    assert_eq!(n[2], 20);
    assert_eq!(n[4], 0);
    assert_eq!(
        u32::from_le_bytes(n[8..12].try_into().unwrap()),
        NOTIFY_OFFSET as u32
    );
    assert_eq!(u32::from_le_bytes(n[12..16].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(n[16..20].try_into().unwrap()), 4);
    // No INTx pin.
    let mut pin = [0u8; 1];
    g.dev.read_config(0x3d, &mut pin);
    assert_eq!(pin[0], 0);
}

#[test]
fn feature_negotiation() {
    let mut g = rng_device(false);
    assert_eq!(g.features(), ALL);
    // Without VERSION_1: refused.
    g.set_driver_features(VIRTIO_F_RING_EVENT_IDX);
    g.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(g.status() & STATUS_FEATURES_OK, 0);
    // A bit not offered: refused.
    g.set_status(0);
    g.set_driver_features(VIRTIO_F_VERSION_1 | 1);
    g.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(g.status() & STATUS_FEATURES_OK, 0);
    // A subset with VERSION_1: accepted; later feature writes are ignored.
    g.set_status(0);
    g.set_driver_features(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC);
    g.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_ne!(g.status() & STATUS_FEATURES_OK, 0);
    g.set_driver_features(ALL);
    assert_eq!(
        g.dev.driver_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC
    );
    // Feature selects beyond 1 read zero.
    g.w(common::DEVICE_FEATURE_SELECT, 4, 7);
    assert_eq!(g.r(common::DEVICE_FEATURE, 4), 0);
}

#[test]
fn rng_end_to_end_with_bus_notifications_and_msix() {
    let mut g = rng_device(false);
    let mut d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    let s = g.init(&d, ALL);
    assert_eq!(s, 0x0f, "status {s:#x}");
    assert!(g.dev.state().device.active);
    d.add(&g.mem, &[Desc::w(DATA, 32)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0); // queue 0
    let (_, len) = g.wait_used(&mut d);
    assert_eq!(len, 32);
    // The queue's vector (1) fired with its message.
    let vm = g.vm.clone();
    g.wait_for("MSI", || !vm.delivered(1).is_empty());
    assert_eq!(
        vm.delivered(1)[0],
        MsiMessage {
            address: 0xfee0_0000,
            data: 0x41
        }
    );
    assert!(vm.delivered(0).is_empty());
    // ISR shows a queue interrupt and clears on read.
    assert_eq!(g.r(ISR_OFFSET, 1), 1);
    assert_eq!(g.r(ISR_OFFSET, 1), 0);
    // Reset stops the device and clears the registers.
    g.set_status(0);
    assert_eq!(g.status(), 0);
    assert!(!g.dev.state().device.active);
    g.w(common::QUEUE_SELECT, 2, 0);
    assert_eq!(g.r(common::QUEUE_ENABLE, 2), 0);
    assert_eq!(g.r(common::QUEUE_SIZE, 2), 64);
    assert_eq!(
        g.r(common::QUEUE_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    // And it comes back after a new initialisation.
    let mut d = SplitQueueDriver::new(&g.mem, QUEUE_BASE + 0x10000, 16);
    assert_eq!(g.init(&d, VIRTIO_F_VERSION_1), 0x0f);
    d.add(&g.mem, &[Desc::w(DATA, 8)]).unwrap();
    g.w(NOTIFY_OFFSET, 4, 0);
    assert_eq!(g.wait_used(&mut d).1, 8);
}

#[test]
fn masked_vectors_leave_pending_bits_until_unmasked() {
    let mut g = rng_device(false);
    let mut d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    assert_eq!(g.init(&d, ALL), 0x0f);
    // Mask entry 1 (the queue's), then make the device interrupt.
    g.w(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    d.add(&g.mem, &[Desc::w(DATA, 16)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0);
    g.wait_used(&mut d);
    let pending = |g: &mut Guest| g.r(MSIX_PBA_OFFSET, 8);
    g.wait_for("pending bit", || {
        let mut b = [0u8; 8];
        lock(&g.dev.msix).read_pba(0, &mut b);
        u64::from_le_bytes(b) == 0b10
    });
    assert_eq!(pending(&mut g), 0b10);
    assert!(g.vm.delivered(1).is_empty());
    // Unmask: delivered, pending cleared.
    g.w(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    assert_eq!(g.vm.delivered(1).len(), 1);
    assert_eq!(pending(&mut g), 0);
    // The function mask works the same way. (With EVENT_IDX the driver asks for the next
    // interrupt by moving used_event.)
    let cap = g.dev.msix_cap;
    g.dev.write_config(cap + 2, &0xc000u16.to_le_bytes());
    d.set_used_event(&g.mem, 1);
    d.add(&g.mem, &[Desc::w(DATA, 16)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0);
    g.wait_used(&mut d);
    g.wait_for("pending bit", || {
        let mut b = [0u8; 8];
        lock(&g.dev.msix).read_pba(0, &mut b);
        u64::from_le_bytes(b) == 0b10
    });
    g.dev.write_config(cap + 2, &0x8000u16.to_le_bytes());
    assert_eq!(g.vm.delivered(1).len(), 2);
}

#[test]
fn in_kernel_notifications_follow_the_bar() {
    let mut g = rng_device(true);
    g.dev.bar_mapped(0, Some(BAR));
    assert_eq!(
        *g.vm.ioevents.lock().unwrap(),
        vec![(IoEventAddress::Mmio(BAR + NOTIFY_OFFSET), Datamatch::Any)]
    );
    g.dev.bar_mapped(0, None);
    assert!(g.vm.ioevents.lock().unwrap().is_empty());
    g.dev.bar_mapped(0, Some(BAR + 0x10_0000));
    assert_eq!(
        g.vm.ioevents.lock().unwrap()[0].0,
        IoEventAddress::Mmio(BAR + 0x10_0000 + NOTIFY_OFFSET)
    );
    drop(g.dev);
    assert!(g.vm.ioevents.lock().unwrap().is_empty());
}

#[test]
fn bad_queues_are_refused_with_needs_reset() {
    type Case = (&'static str, fn(&mut Guest));
    let cases: [Case; 7] = [
        ("size not a power of two", |g| {
            g.w(common::QUEUE_SIZE, 2, 48)
        }),
        ("size zero", |g| g.w(common::QUEUE_SIZE, 2, 0)),
        ("size above the maximum", |g| {
            g.w(common::QUEUE_SIZE, 2, 128)
        }),
        ("misaligned descriptor table", |g| {
            g.w(common::QUEUE_DESC, 8, QUEUE_BASE + 8)
        }),
        ("misaligned used ring", |g| {
            g.w(common::QUEUE_DEVICE, 8, QUEUE_BASE + 0x2002)
        }),
        ("descriptor table outside RAM", |g| {
            g.w(common::QUEUE_DESC, 8, MEM_SIZE - 0x100)
        }),
        ("used ring above 4 GiB", |g| {
            g.w(common::QUEUE_DEVICE, 8, 0x1_0000_0000)
        }),
    ];
    for (what, spoil) in cases {
        let mut g = rng_device(false);
        let d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
        g.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        g.set_driver_features(VIRTIO_F_VERSION_1);
        g.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        g.w(common::QUEUE_SELECT, 2, 0);
        let (desc, avail, used) = d.addresses();
        g.w(common::QUEUE_DESC, 8, desc);
        g.w(common::QUEUE_DRIVER, 8, avail);
        g.w(common::QUEUE_DEVICE, 8, used);
        spoil(&mut g);
        g.w(common::QUEUE_ENABLE, 2, 1);
        assert_eq!(g.r(common::QUEUE_ENABLE, 2), 0, "{what}");
        assert_ne!(g.status() & STATUS_DEVICE_NEEDS_RESET, 0, "{what}");
        // DRIVER_OK does not activate a device that needs a reset.
        g.set_status(0x0f);
        assert!(!g.dev.state().device.active, "{what}");
        // A reset clears it.
        g.set_status(0);
        assert_eq!(g.status(), 0, "{what}");
    }
}

#[test]
fn protocol_violations_are_contained() {
    let mut g = rng_device(false);
    // DRIVER_OK without FEATURES_OK.
    g.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
    assert_eq!(g.status() & STATUS_DRIVER_OK, 0);
    assert_ne!(g.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(!g.dev.state().device.active);
    g.set_status(0);
    // The driver cannot set NEEDS_RESET itself, nor clear bits.
    g.set_status(STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(g.status(), STATUS_ACKNOWLEDGE);
    g.set_status(STATUS_DRIVER);
    assert_eq!(g.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    g.set_status(STATUS_FAILED);
    assert_ne!(g.status() & STATUS_FAILED, 0);
    g.set_status(0);
    // Notifying a queue that is not ready, or one that does not exist: nothing happens.
    g.w(NOTIFY_OFFSET, 2, 0);
    g.w(NOTIFY_OFFSET + 4, 2, 1);
    g.w(NOTIFY_OFFSET + 0xffc, 4, 7);
    // Selecting a queue that does not exist: size 0, writes ignored.
    g.w(common::QUEUE_SELECT, 2, 5);
    assert_eq!(g.r(common::QUEUE_SIZE, 2), 0);
    g.w(common::QUEUE_SIZE, 2, 8);
    g.w(common::QUEUE_ENABLE, 2, 1);
    assert_eq!(g.r(common::QUEUE_ENABLE, 2), 0);
    // Out-of-range MSI-X vectors read back as NO_VECTOR.
    g.w(common::CONFIG_MSIX_VECTOR, 2, 2);
    assert_eq!(g.r(common::CONFIG_MSIX_VECTOR, 2), 0xffff);
    g.w(common::QUEUE_SELECT, 2, 0);
    g.w(common::QUEUE_MSIX_VECTOR, 2, 1);
    assert_eq!(g.r(common::QUEUE_MSIX_VECTOR, 2), 1);
    g.w(common::QUEUE_MSIX_VECTOR, 2, 99);
    assert_eq!(g.r(common::QUEUE_MSIX_VECTOR, 2), 0xffff);
    // Odd-sized and straddling accesses read zero and are ignored.
    assert_eq!(g.r(common::QUEUE_SIZE - 1, 2), 0);
    g.w(common::DEVICE_STATUS, 2, 0xffff);
    assert_eq!(g.status(), 0);
    // Read-only registers.
    g.w(common::NUM_QUEUES, 2, 9);
    assert_eq!(g.r(common::NUM_QUEUES, 2), 1);
    // Queue registers cannot change once the queue is enabled.
    let d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    g.init(&d, VIRTIO_F_VERSION_1);
    g.w(common::QUEUE_SELECT, 2, 0);
    g.w(common::QUEUE_DESC, 8, 0x1234_5000);
    assert_eq!(g.r(common::QUEUE_DESC, 8), d.addresses().0);
    g.w(common::QUEUE_SIZE, 2, 2);
    assert_eq!(g.r(common::QUEUE_SIZE, 2), 64);
}

#[test]
fn a_broken_ring_sets_needs_reset_and_a_config_interrupt() {
    let mut g = rng_device(false);
    let mut d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    assert_eq!(g.init(&d, ALL), 0x0f);
    d.set_avail_idx(&g.mem, 500);
    g.w(NOTIFY_OFFSET, 2, 0);
    g.wait_for("NEEDS_RESET", || {
        g.dev.irq.needs_reset.load(Ordering::SeqCst)
    });
    assert_ne!(g.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    // Config vector (0) fired; ISR has the config bit.
    assert_eq!(g.vm.delivered(0).len(), 1);
    assert_eq!(g.r(ISR_OFFSET, 1) & 2, 2);
    // Further notifications are ignored (the device stopped using the queue).
    g.w(NOTIFY_OFFSET, 2, 0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(g.vm.delivered(0).len(), 1);
    // The driver resets and starts over.
    let d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    assert_eq!(g.init(&d, ALL), 0x0f);
}

#[test]
fn config_access_capability_reads_and_writes_the_bar() {
    let mut g = rng_device(false);
    let cap = g.dev.cfg_cap;
    // bar 0, offset of num_queues, length 2.
    g.dev.write_config(cap + 4, &[0]);
    g.dev
        .write_config(cap + 8, &(common::NUM_QUEUES as u32).to_le_bytes());
    g.dev.write_config(cap + 12, &2u32.to_le_bytes());
    let mut d = [0u8; 4];
    g.dev.read_config(cap + 16, &mut d);
    assert_eq!(u16::from_le_bytes([d[0], d[1]]), 1);
    // Write the status through the window.
    g.dev
        .write_config(cap + 8, &(common::DEVICE_STATUS as u32).to_le_bytes());
    g.dev.write_config(cap + 12, &1u32.to_le_bytes());
    g.dev.write_config(cap + 16, &[STATUS_ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(g.status(), STATUS_ACKNOWLEDGE);
    // Bad windows do nothing.
    g.dev.write_config(cap + 12, &3u32.to_le_bytes());
    g.dev.write_config(cap + 16, &[0, 0, 0, 0]);
    assert_eq!(g.status(), STATUS_ACKNOWLEDGE);
    g.dev
        .write_config(cap + 8, &(BAR_SIZE as u32).to_le_bytes());
    g.dev.write_config(cap + 12, &4u32.to_le_bytes());
    g.dev.read_config(cap + 16, &mut d);
    assert_eq!(d, [0; 4]);
}

#[test]
fn random_guest_traffic_never_panics() {
    let mut g = rng_device(false);
    let d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..30_000 {
        if round % 5000 == 0 {
            g.init(&d, ALL);
        }
        let r = next();
        let len = [0usize, 1, 2, 3, 4, 8][(r % 6) as usize];
        let offset = match (r >> 8) % 5 {
            0 => (r >> 16) % 0x40,
            1 => NOTIFY_OFFSET + (r >> 16) % 0x20,
            2 => MSIX_TABLE_OFFSET + (r >> 16) % 0x40,
            3 => (r >> 16) % BAR_SIZE,
            _ => r >> 16,
        };
        let v = next();
        let mut buf = v.to_le_bytes();
        match (r >> 40) % 4 {
            0 => g.dev.read_bar(0, offset, &mut buf[..len]),
            1 => g.dev.write_bar(0, offset, &buf[..len]),
            2 => g
                .dev
                .write_config((offset % 0x1000) as u16, &buf[..len.min(4)]),
            _ => g
                .dev
                .read_config((offset % 0x1000) as u16, &mut buf[..len.min(4)]),
        }
    }
    // Still a working device afterwards.
    let mut d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    g.dev.write_config(4, &[0x06, 0]);
    assert_eq!(g.init(&d, ALL), 0x0f);
    d.add(&g.mem, &[Desc::w(DATA, 4)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0);
    assert_eq!(g.wait_used(&mut d).1, 4);
    let mut b = [0u8; 4];
    g.mem
        .read_slice(&mut b, vm_memory::GuestAddress(DATA))
        .unwrap();
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut g = rng_device(false);
    let mut d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    assert_eq!(g.init(&d, ALL), 0x0f);
    // used_event = 0: interrupt when the used index passes 0, i.e. after the first buffer.
    d.add(&g.mem, &[Desc::w(DATA, 8)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0);
    g.wait_used(&mut d);
    let vm = g.vm.clone();
    g.wait_for("first MSI", || vm.delivered(1).len() == 1);
    // The driver does not move used_event: no interrupt for the second buffer.
    d.add(&g.mem, &[Desc::w(DATA, 8)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0);
    g.wait_used(&mut d);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vm.delivered(1).len(), 1);
    // It asks for the next one.
    d.set_used_event(&g.mem, 2);
    d.add(&g.mem, &[Desc::w(DATA, 8)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0);
    g.wait_used(&mut d);
    g.wait_for("second MSI", || vm.delivered(1).len() == 2);
    // And the device published avail_event for the driver's notification suppression.
    assert_eq!(d.avail_event(&g.mem), 3);
}

#[test]
fn pause_state_and_restore_continue_the_queue_in_a_new_transport() {
    let mut g = rng_device(false);
    let mut d = SplitQueueDriver::new(&g.mem, QUEUE_BASE, 64);
    assert_eq!(g.init(&d, ALL), 0x0f);
    for _ in 0..3 {
        d.add(&g.mem, &[Desc::w(DATA, 16)]).unwrap();
        g.w(NOTIFY_OFFSET, 2, 0);
        g.wait_used(&mut d);
    }
    // A request made available while paused waits for the resume (or the restore).
    g.dev.pause().unwrap();
    d.add(&g.mem, &[Desc::w(DATA, 16)]).unwrap();
    g.w(NOTIFY_OFFSET, 2, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(d.pop_used(&g.mem).is_none(), "served while paused");
    let state = g.dev.state();
    assert_eq!(
        state.queue_positions,
        vec![QueuePosition {
            index: 0,
            next_avail: 3,
            next_used: 3
        }]
    );
    assert_eq!(g.dev.counters()[0], ("requests", 3));
    let json = serde_json::to_string(&state).unwrap();
    drop(g.dev);

    // A new transport on the same memory takes the state and serves the waiting request.
    let mut h = Guest {
        dev: VirtioPciDevice::new(Box::new(Rng::new()), g.mem.clone(), g.vm.clone()).unwrap(),
        vm: g.vm.clone(),
        mem: g.mem.clone(),
    };
    h.dev
        .restore(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(h.status(), 0x0f);
    assert_eq!(h.wait_used(&mut d).1, 16);
    d.add(&h.mem, &[Desc::w(DATA, 8)]).unwrap();
    h.w(NOTIFY_OFFSET, 2, 0);
    assert_eq!(h.wait_used(&mut d).1, 8);
    assert_eq!(d.used_idx(&h.mem), 5);

    // States that do not fit are refused.
    let mut other = rng_device(false);
    let mut bad: VirtioPciState = serde_json::from_str(&json).unwrap();
    bad.device.device_type = crate::VIRTIO_ID_BLOCK;
    assert!(other.dev.restore(&bad).is_err());
    let mut bad: VirtioPciState = serde_json::from_str(&json).unwrap();
    bad.queue_positions.clear();
    assert!(other
        .dev
        .restore(&bad)
        .unwrap_err()
        .to_string()
        .contains("paused"));
}
