//! The root complex driven the way a guest drives it: configuration cycles through
//! 0xCF8/0xCFC and ECAM, BAR sizing, moves (valid and hostile), decode enable.

use super::config::*;
use super::*;
use crate::IoBus;

/// A function with an I/O BAR (0), a 32-bit memory BAR (1) and a 64-bit memory BAR (2-3);
/// BAR reads return the BAR index, writes are recorded, and so are mapping changes.
struct TestDevice {
    config: PciConfiguration,
    writes: Vec<(usize, u64, Vec<u8>)>,
    mapped: Vec<(usize, Option<u64>)>,
}

impl TestDevice {
    fn new() -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class_code: 0xff_00_00,
            revision_id: 2,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        config
            .add_bar(
                0,
                Bar {
                    kind: BarKind::Io,
                    size: 0x40,
                    prefetchable: false,
                },
            )
            .unwrap();
        config
            .add_bar(
                1,
                Bar {
                    kind: BarKind::Mem32,
                    size: 0x2000,
                    prefetchable: false,
                },
            )
            .unwrap();
        config
            .add_bar(
                2,
                Bar {
                    kind: BarKind::Mem64,
                    size: 0x10_0000,
                    prefetchable: true,
                },
            )
            .unwrap();
        TestDevice {
            config,
            writes: Vec::new(),
            mapped: Vec::new(),
        }
    }
}

impl PciDevice for TestDevice {
    fn name(&self) -> &'static str {
        "test-device"
    }
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(bar as u8);
    }
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.writes.push((bar, offset, data.to_vec()));
    }
    fn bar_mapped(&mut self, bar: usize, addr: Option<u64>) {
        self.mapped.push((bar, addr));
    }
}

const MMIO32: Window = Window {
    start: 0xc000_0000,
    size: 0x2000_0000,
};
const MMIO64: Window = Window {
    start: 0x1_0000_0000,
    size: 0x10_0000_0000,
};
const IO: Window = Window {
    start: 0x1000,
    size: 0xf000,
};
const ECAM: u64 = 0xe000_0000;

struct Machine {
    bus: Arc<IoBus>,
    root: Arc<Mutex<PciRoot>>,
    dev: Arc<Mutex<TestDevice>>,
}

fn machine() -> Machine {
    let mut root = PciRoot::new(PciWindows {
        io: IO,
        mmio32: MMIO32,
        mmio64: MMIO64,
    })
    .unwrap();
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let addr = root.add_device(dev.clone()).unwrap();
    assert_eq!(addr.to_string(), "00:01.0");
    let root = Arc::new(Mutex::new(root));
    let mut bus = IoBus::new();
    bus.pio
        .insert(
            0xcf8,
            8,
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        )
        .unwrap();
    bus.mmio
        .insert(
            ECAM,
            0x1000_0000,
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        )
        .unwrap();
    let bus = Arc::new(bus);
    root.lock().unwrap().attach(&bus);
    Machine { bus, root, dev }
}

impl Machine {
    fn cf8(&self, dev: u8, reg: u16) {
        let a = 0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(reg & 0xfc);
        self.bus.pio.write(0xcf8, &a.to_le_bytes());
    }
    /// Mechanism #1 read of `len` bytes.
    fn io_read(&self, dev: u8, reg: u16, len: usize) -> u32 {
        self.cf8(dev, reg);
        let mut d = [0u8; 4];
        self.bus.pio.read(0xcfc + u64::from(reg & 3), &mut d[..len]);
        u32::from_le_bytes(d)
    }
    fn io_write(&self, dev: u8, reg: u16, value: u32, len: usize) {
        self.cf8(dev, reg);
        self.bus
            .pio
            .write(0xcfc + u64::from(reg & 3), &value.to_le_bytes()[..len]);
    }
    fn ecam_read(&self, dev: u8, reg: u16, len: usize) -> u32 {
        let mut d = [0u8; 4];
        self.bus.mmio.read(
            ECAM + (u64::from(dev) << 15) + u64::from(reg),
            &mut d[..len],
        );
        u32::from_le_bytes(d)
    }
    fn ecam_write(&self, dev: u8, reg: u16, value: u32) {
        self.bus.mmio.write(
            ECAM + (u64::from(dev) << 15) + u64::from(reg),
            &value.to_le_bytes(),
        );
    }
    fn mmio_byte(&self, addr: u64) -> u8 {
        let mut d = [0u8];
        self.bus.mmio.read(addr, &mut d);
        d[0]
    }
    fn bar_addr(&self, bar: usize) -> u64 {
        self.dev.lock().unwrap().config.bar_addr(bar).unwrap()
    }
}

#[test]
fn enumeration_finds_the_host_bridge_and_the_device() {
    let m = machine();
    assert_eq!(m.io_read(0, 0, 4), 0x0008_1b36);
    assert_eq!(m.io_read(0, 8, 4) >> 8, 0x06_00_00);
    assert_eq!(m.io_read(1, 0, 4), 0x5678_1234);
    assert_eq!(m.io_read(1, 0x0e, 1), 0); // header type 0, single function
    for dev in 2..32 {
        assert_eq!(m.io_read(dev, 0, 4), 0xffff_ffff, "slot {dev}");
    }
    // Functions other than 0 and other buses do not exist.
    m.bus.pio.write(
        0xcf8,
        &(0x8000_0000u32 | (1 << 11) | (1 << 8)).to_le_bytes(),
    );
    let mut d = [0u8; 4];
    m.bus.pio.read(0xcfc, &mut d);
    assert_eq!(d, [0xff; 4]);
    m.bus
        .pio
        .write(0xcf8, &(0x8000_0000u32 | (1 << 16)).to_le_bytes());
    m.bus.pio.read(0xcfc, &mut d);
    assert_eq!(d, [0xff; 4]);
    // With the enable bit clear, data reads all-ones.
    m.bus.pio.write(0xcf8, &0u32.to_le_bytes());
    m.bus.pio.read(0xcfc, &mut d);
    assert_eq!(d, [0xff; 4]);
    // CONFIG_ADDRESS reads back (reserved bits and bits 1:0 as zero).
    m.bus.pio.write(0xcf8, &0xffff_ffffu32.to_le_bytes());
    m.bus.pio.read(0xcf8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
    // Byte writes to 0xcf8-0xcfb do not change CONFIG_ADDRESS.
    m.bus.pio.write(0xcf9, &[0x06]);
    m.bus.pio.read(0xcf8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
}

#[test]
fn mechanism_one_and_ecam_agree() {
    let m = machine();
    for dev in [0u8, 1, 2, 31] {
        for reg in (0..0x100u16).step_by(4) {
            assert_eq!(
                m.io_read(dev, reg, 4),
                m.ecam_read(dev, reg, 4),
                "{dev:02x} reg {reg:#x}"
            );
            for sub in 0..4 {
                assert_eq!(m.io_read(dev, reg + sub, 1), m.ecam_read(dev, reg + sub, 1));
            }
            assert_eq!(m.io_read(dev, reg + 2, 2), m.ecam_read(dev, reg + 2, 2));
        }
    }
    // A write through one is seen through the other.
    m.ecam_write(1, INTERRUPT_LINE, 0x0b);
    assert_eq!(m.io_read(1, INTERRUPT_LINE, 1), 0x0b);
    m.io_write(1, INTERRUPT_LINE, 0x0a, 1);
    assert_eq!(m.ecam_read(1, INTERRUPT_LINE, 1), 0x0a);
    // ECAM's extended space reads zero for an existing conventional function.
    assert_eq!(m.ecam_read(1, 0x100, 4), 0);
    assert_eq!(m.ecam_read(3, 0x100, 4), 0xffff_ffff);
    // An ECAM access crossing into the next function is dropped.
    let mut d = [0u8; 4];
    m.bus.mmio.read(ECAM + (1 << 15) + 0xffe, &mut d);
    assert_eq!(d, [0xff; 4]);
}

#[test]
fn bars_are_placed_in_their_windows_and_decode() {
    let m = machine();
    let io = m.bar_addr(0);
    let mem32 = m.bar_addr(1);
    let mem64 = m.bar_addr(2);
    assert!(IO.contains(io, 0x40) && io.is_multiple_of(0x40), "{io:#x}");
    assert!(MMIO32.contains(mem32, 0x2000) && mem32.is_multiple_of(0x2000));
    assert!(MMIO64.contains(mem64, 0x10_0000) && mem64.is_multiple_of(0x10_0000));
    assert_eq!(
        m.io_read(1, COMMAND, 2) as u16 & 3,
        COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE
    );
    // Accesses reach the device with the BAR index.
    let mut d = [0u8; 2];
    assert!(m.bus.pio.read(io + 2, &mut d));
    assert_eq!(d, [0, 0]);
    assert_eq!(m.mmio_byte(mem32 + 0x1fff), 1);
    assert_eq!(m.mmio_byte(mem64 + 0xf_ffff), 2);
    m.bus.mmio.write(mem64 + 8, &[7]);
    assert_eq!(m.dev.lock().unwrap().writes, vec![(2, 8, vec![7])]);
    let mapped = m.dev.lock().unwrap().mapped.clone();
    assert_eq!(mapped.len(), 3);
    assert!(mapped.contains(&(2, Some(mem64))));
}

/// Sizing as Linux does it (`__pci_read_base`): decode off, all-ones, read, restore, decode on.
#[test]
fn guest_sizing_probe_round_trip() {
    let m = machine();
    let mem64 = m.bar_addr(2);
    let cmd = m.io_read(1, COMMAND, 2);
    m.io_write(1, COMMAND, cmd & !3, 2);
    assert_eq!(m.mmio_byte(mem64), 0xff, "decode off unmaps");
    let mut sizes = Vec::new();
    for bar in 0..6u16 {
        let reg = BAR0 + 4 * bar;
        let old = m.io_read(1, reg, 4);
        m.io_write(1, reg, 0xffff_ffff, 4);
        sizes.push(m.io_read(1, reg, 4));
        m.io_write(1, reg, old, 4);
    }
    assert_eq!(
        sizes,
        vec![0xffff_ffc1, 0xffff_e000, 0xfff0_000c, 0xffff_ffff, 0, 0]
    );
    m.io_write(1, COMMAND, cmd, 2);
    assert_eq!(m.bar_addr(2), mem64);
    assert_eq!(m.mmio_byte(mem64), 2, "decode on maps again");
    let mapped = m.dev.lock().unwrap().mapped.clone();
    assert!(mapped.contains(&(2, None)));
    assert_eq!(
        mapped.iter().rev().find(|(b, _)| *b == 2),
        Some(&(2, Some(mem64)))
    );
}

#[test]
fn the_guest_may_move_a_bar_within_the_windows() {
    let m = machine();
    let old = m.bar_addr(1);
    let new = 0xd000_0000u64;
    m.io_write(1, BAR0 + 4, new as u32, 4);
    assert_eq!(m.bar_addr(1), new);
    assert_eq!(m.mmio_byte(old), 0xff);
    assert_eq!(m.mmio_byte(new), 1);
    assert_eq!(m.dev.lock().unwrap().mapped.last(), Some(&(1, Some(new))));
    // A 64-bit BAR may be moved below 4 GiB (into the 32-bit window) and back up.
    m.io_write(1, BAR0 + 12, 0, 4);
    m.io_write(1, BAR0 + 8, 0xd010_0000, 4);
    assert_eq!(m.mmio_byte(0xd010_0000), 2);
    m.io_write(1, BAR0 + 12, 0x2, 4);
    assert_eq!(m.bar_addr(2), 0x2_d010_0000);
    assert_eq!(m.mmio_byte(0x2_d010_0000), 2);
    assert_eq!(m.mmio_byte(0xd010_0000), 0xff);
    // I/O BAR to another port.
    m.io_write(1, BAR0, 0x2000, 4);
    let mut d = [0u8];
    assert!(m.bus.pio.read(0x2000, &mut d));
    let devs = m.root.lock().unwrap().devices();
    assert_eq!(devs.len(), 2);
    assert_eq!(devs[1].2[0].map(|b| b.addr), Some(0x2000));
}

#[test]
fn hostile_bar_moves_are_refused_without_damage() {
    let m = machine();
    let mem32 = m.bar_addr(1);
    // Onto RAM (below the window), onto the ECAM, onto the LAPIC: not mapped.
    for bad in [0x10_0000u32, ECAM as u32, 0xfee0_0000] {
        m.io_write(1, BAR0 + 4, bad, 4);
        assert_eq!(
            m.mmio_byte(u64::from(bad)),
            if u64::from(bad) == ECAM { 0x36 } else { 0xff }
        );
        assert_eq!(m.mmio_byte(mem32), 0xff);
    }
    // The ECAM still works (the device's BAR did not shadow it).
    assert_eq!(m.ecam_read(1, 0, 4), 0x5678_1234);
    // Onto the other BAR of the same device: refused, the other BAR keeps working.
    let mem64 = m.bar_addr(2);
    m.io_write(1, BAR0 + 12, 0, 4);
    m.io_write(1, BAR0 + 8, 0xd000_0000, 4);
    assert_eq!(m.mmio_byte(0xd000_0000), 2);
    m.io_write(1, BAR0 + 4, 0xd000_0000, 4);
    assert_eq!(m.mmio_byte(0xd000_0000), 2);
    let devs = m.root.lock().unwrap().devices();
    assert_eq!(devs[1].2[1], None);
    // Moved somewhere free, it maps again.
    m.io_write(1, BAR0 + 4, 0xc800_0000, 4);
    assert_eq!(m.mmio_byte(0xc800_0000), 1);
    // I/O BAR on the configuration ports, and past 0xffff: refused.
    m.io_write(1, BAR0, 0xcc0, 4);
    let mut d = [0u8; 4];
    m.bus.pio.read(0xcf8, &mut d);
    assert_eq!(u32::from_le_bytes(d) & 0x8000_0000, 0x8000_0000);
    m.io_write(1, BAR0, 0xffc0, 4);
    m.io_write(1, BAR0, 0x1_0000, 4);
    assert_eq!(m.root.lock().unwrap().devices()[1].2[0], None);
    let _ = mem64;
}

#[test]
fn random_config_traffic_never_panics_and_keeps_the_bus_consistent() {
    let m = machine();
    let mut rng = crate::test_util::Rng::new(99);
    for _ in 0..20_000 {
        let dev = rng.below(3) as u8;
        let reg = match rng.below(4) {
            0 => COMMAND,
            1 => BAR0 + 4 * rng.below(6) as u16,
            _ => rng.below(0x1000) as u16,
        };
        let value = match rng.below(4) {
            0 => 0xffff_ffff,
            1 => 0xc000_0000 + (rng.below(0x4000) << 16) as u32,
            _ => rng.next() as u32,
        };
        let len = [1usize, 2, 4][rng.below(3) as usize];
        if rng.below(2) == 0 {
            m.io_write(dev, reg, value, len);
        } else {
            m.ecam_write(dev, reg & !3, value);
        }
    }
    // Whatever is mapped is what the device decodes, inside a window, without overlaps.
    let devs = m.root.lock().unwrap().devices();
    let decoded = m.dev.lock().unwrap().config.decoded_bars();
    for (bar, mapped) in devs[1].2.iter().enumerate() {
        if let Some(b) = mapped {
            assert_eq!(Some(*b), decoded[bar]);
        }
    }
    assert_eq!(m.io_read(0, 0, 4), 0x0008_1b36);
}

#[test]
fn bus_zero_fills_up() {
    let mut root = PciRoot::new(PciWindows {
        io: IO,
        mmio32: MMIO32,
        mmio64: MMIO64,
    })
    .unwrap();
    for i in 1..32 {
        let a = root
            .add_device(Arc::new(Mutex::new(TestDevice::new())))
            .unwrap();
        assert_eq!(a.device, i);
    }
    assert!(matches!(
        root.add_device(Arc::new(Mutex::new(TestDevice::new()))),
        Err(PciError::NoSlot)
    ));
}

#[test]
fn windows_too_small_for_a_bar_fail_cleanly() {
    let mut root = PciRoot::new(PciWindows {
        io: IO,
        mmio32: Window {
            start: 0xc000_0000,
            size: 0x1000,
        },
        mmio64: MMIO64,
    })
    .unwrap();
    assert!(matches!(
        root.add_device(Arc::new(Mutex::new(TestDevice::new()))),
        Err(PciError::Allocate { .. })
    ));
    assert!(PciRoot::new(PciWindows {
        io: Window {
            start: 0xf000,
            size: 0x2000
        },
        mmio32: MMIO32,
        mmio64: MMIO64,
    })
    .is_err());
}
