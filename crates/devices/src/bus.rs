//! The device bus: guest port-I/O and MMIO addresses → devices.
//!
//! A [`Bus`] maps non-overlapping ranges `[base, base + len)` to devices; a device sees the
//! offset of an access into its range. [`IoBus`] holds one bus per address space and is what a
//! vCPU's [`IoHandler`] calls on every exit, so lookups are O(log n) and allocation-free.
//!
//! Accesses that hit no device, or straddle the end of a device's range, behave like an
//! unclaimed bus cycle on a PC: reads return all-ones and writes are dropped. Each such address
//! is logged once; after [`UNKNOWN_LOG_LIMIT`] distinct addresses the bus stops remembering.
//!
//! Ranges may also be added and removed while vCPUs run ([`Bus::map`], [`Bus::unmap`]: a guest
//! moving a PCI BAR). The map is behind a read-write lock that an access holds only to find its
//! device, never while the device runs, so a device may remap ranges from inside an access.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Serialize;
use tracing::{debug, warn};
use vireo_hv::IoHandler;

/// How many distinct unknown addresses a bus remembers (and logs) before it stops logging.
pub const UNKNOWN_LOG_LIMIT: usize = 1024;

/// A device on a [`Bus`]. `offset` is relative to the base the device was inserted at.
///
/// The guest controls offsets, sizes and values: implementations must accept any of them
/// (the bus only guarantees that `offset + data.len()` stays inside the device's range; a
/// direct caller may pass anything), including sizes of 0 or odd sizes from MMIO.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`; fill all of `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// A short name for logs and statistics.
    fn name(&self) -> &'static str {
        "device"
    }
}

/// Errors of [`Bus::insert`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{bus} bus: zero-length range at {base:#x}")]
    ZeroLength { bus: &'static str, base: u64 },
    #[error(
        "{bus} bus: range at {base:#x} of {len:#x} bytes runs past the end of the address space"
    )]
    Overflow {
        bus: &'static str,
        base: u64,
        len: u64,
    },
    #[error(
        "{bus} bus: range at {base:#x} of {len:#x} bytes overlaps {other} at {other_base:#x} of {other_len:#x} bytes"
    )]
    Overlap {
        bus: &'static str,
        base: u64,
        len: u64,
        other: &'static str,
        other_base: u64,
        other_len: u64,
    },
}

/// Access statistics of one device range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStats {
    pub name: &'static str,
    pub base: u64,
    pub len: u64,
    /// Reads and writes routed to the device.
    pub accesses: u64,
}

/// Access statistics of one bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BusStats {
    /// One entry per device range, by ascending base.
    pub devices: Vec<DeviceStats>,
    /// Accesses that hit no device or straddled the end of a range.
    pub unknown: u64,
}

struct Entry {
    /// Last address of the range (inclusive), so a range may end at the top of the space.
    last: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
    accesses: Arc<AtomicU64>,
}

impl Entry {
    fn len(&self, base: u64) -> u64 {
        // Cannot overflow: `insert` takes a u64 length, so no range covers all of u64.
        self.last - base + 1
    }
}

/// Why an access was not routed to a device.
#[derive(Clone, Copy)]
enum Miss {
    Unmapped,
    Straddle,
}

/// Remembers which unknown addresses were already logged.
struct UnknownLog {
    seen: HashSet<u64>,
    full: bool,
}

/// Lock a mutex, recovering the guard when another thread panicked while holding it: a vCPU
/// thread must not die because a device once panicked.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Non-overlapping address ranges mapped to devices.
pub struct Bus {
    name: &'static str,
    ranges: RwLock<BTreeMap<u64, Entry>>,
    unknown: AtomicU64,
    log: Mutex<UnknownLog>,
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Bus {
    /// An empty bus; `name` (e.g. "pio", "mmio") appears in logs and errors.
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            ranges: RwLock::new(BTreeMap::new()),
            unknown: AtomicU64::new(0),
            log: Mutex::new(UnknownLog {
                // Sized up front so the unknown-access path never allocates.
                seen: HashSet::with_capacity(UNKNOWN_LOG_LIMIT),
                full: false,
            }),
        }
    }

    /// Map `[base, base + len)` to `device`. Fails on a zero length, a range past the end of
    /// the address space, or an overlap with an existing range.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let name = lock(&device).name();
        let bus = self.name;
        let ranges = self
            .ranges
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        Self::insert_into(ranges, bus, base, len, name, device)
    }

    /// [`Bus::insert`] on a bus that vCPUs may be using. Call it without holding the lock of a
    /// device that is on this bus's path to `device` (it locks `device` to learn its name).
    pub fn map(
        &self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let name = lock(&device).name();
        Self::insert_into(
            &mut write_lock(&self.ranges),
            self.name,
            base,
            len,
            name,
            device,
        )
    }

    /// [`Bus::map`] with the device's name given, for a caller that holds the device's lock.
    pub fn map_named(
        &self,
        base: u64,
        len: u64,
        name: &'static str,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        Self::insert_into(
            &mut write_lock(&self.ranges),
            self.name,
            base,
            len,
            name,
            device,
        )
    }

    /// [`Bus::remove`] on a bus that vCPUs may be using. An access already routed to the
    /// device may still complete after this returns.
    pub fn unmap(&self, base: u64) -> Option<Arc<Mutex<dyn BusDevice>>> {
        write_lock(&self.ranges).remove(&base).map(|e| e.device)
    }

    fn insert_into(
        ranges: &mut BTreeMap<u64, Entry>,
        bus: &'static str,
        base: u64,
        len: u64,
        name: &'static str,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { bus, base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { bus, base, len })?;
        let below = ranges.range(..=base).next_back();
        let above = ranges.range(base..).next();
        for (&other_base, other) in below.into_iter().chain(above) {
            if other_base <= last && base <= other.last {
                return Err(BusError::Overlap {
                    bus,
                    base,
                    len,
                    other: other.name,
                    other_base,
                    other_len: other.len(other_base),
                });
            }
        }
        ranges.insert(
            base,
            Entry {
                last,
                name,
                device,
                accesses: Arc::new(AtomicU64::new(0)),
            },
        );
        Ok(())
    }

    /// Unmap the range that starts at `base`, returning its device.
    pub fn remove(&mut self, base: u64) -> Option<Arc<Mutex<dyn BusDevice>>> {
        self.ranges
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&base)
            .map(|e| e.device)
    }

    /// Number of mapped ranges.
    pub fn len(&self) -> usize {
        read_lock(&self.ranges).len()
    }

    pub fn is_empty(&self) -> bool {
        read_lock(&self.ranges).is_empty()
    }

    /// The device whose range contains all of `[addr, addr + size)`, and the offset of `addr`.
    /// The map's lock is released before the device is called.
    fn resolve(&self, addr: u64, size: usize) -> Result<(Arc<Mutex<dyn BusDevice>>, u64), Miss> {
        let ranges = read_lock(&self.ranges);
        let (&base, entry) = ranges.range(..=addr).next_back().ok_or(Miss::Unmapped)?;
        if addr > entry.last {
            return Err(Miss::Unmapped);
        }
        let offset = addr - base;
        // Room left in the range from `addr` on, minus one (cannot overflow).
        let room = entry.last - addr;
        if size as u64 > room.saturating_add(1) {
            return Err(Miss::Straddle);
        }
        entry.accesses.fetch_add(1, Ordering::Relaxed);
        Ok((entry.device.clone(), offset))
    }

    /// Route a read; returns false (and fills `data` with all-ones) when no device took it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Ok((device, offset)) => {
                lock(&device).read(offset, data);
                true
            }
            Err(miss) => {
                data.fill(0xff);
                self.unknown_access(miss, "read", addr, data.len());
                false
            }
        }
    }

    /// Route a write; returns false (dropping it) when no device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Ok((device, offset)) => {
                lock(&device).write(offset, data);
                true
            }
            Err(miss) => {
                self.unknown_access(miss, "write", addr, data.len());
                false
            }
        }
    }

    fn unknown_access(&self, miss: Miss, kind: &str, addr: u64, size: usize) {
        self.unknown.fetch_add(1, Ordering::Relaxed);
        let mut log = lock(&self.log);
        if log.full || log.seen.contains(&addr) {
            return;
        }
        if log.seen.len() >= UNKNOWN_LOG_LIMIT {
            log.full = true;
            warn!(
                bus = self.name,
                "more than {UNKNOWN_LOG_LIMIT} distinct unknown addresses; no longer logging them"
            );
            return;
        }
        log.seen.insert(addr);
        drop(log);
        match miss {
            Miss::Unmapped => debug!(
                bus = self.name,
                "{kind} of {size} bytes at {addr:#x}: no device (logged once per address)"
            ),
            Miss::Straddle => warn!(
                bus = self.name,
                "{kind} of {size} bytes at {addr:#x} runs past the end of a device (logged once per address)"
            ),
        }
    }

    /// Access counts per device and of unknown accesses.
    pub fn stats(&self) -> BusStats {
        BusStats {
            devices: read_lock(&self.ranges)
                .iter()
                .map(|(&base, e)| DeviceStats {
                    name: e.name,
                    base,
                    len: e.len(base),
                    accesses: e.accesses.load(Ordering::Relaxed),
                })
                .collect(),
            unknown: self.unknown.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (&base, e) in read_lock(&self.ranges).iter() {
            m.entry(&format_args!("{base:#x}..={:#x}", e.last), &e.name);
        }
        m.finish()
    }
}

/// Maps a range at an offset into another device's range: a device whose registers are not
/// contiguous (the i8042 at ports 0x60 and 0x64) is inserted once per register with the
/// offset each register has inside the device.
pub struct Offset {
    device: Arc<Mutex<dyn BusDevice>>,
    offset: u64,
}

impl Offset {
    pub fn new(device: Arc<Mutex<dyn BusDevice>>, offset: u64) -> Self {
        Offset { device, offset }
    }
}

impl BusDevice for Offset {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read(offset.saturating_add(self.offset), data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write(offset.saturating_add(self.offset), data);
    }
    fn name(&self) -> &'static str {
        lock(&self.device).name()
    }
}

/// Access statistics of both buses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IoBusStats {
    pub pio: BusStats,
    pub mmio: BusStats,
}

/// The port-I/O and MMIO buses of a VM: what a vCPU's exits are routed through.
#[derive(Debug)]
pub struct IoBus {
    pub pio: Bus,
    pub mmio: Bus,
}

impl IoBus {
    pub fn new() -> Self {
        IoBus {
            pio: Bus::new("pio"),
            mmio: Bus::new("mmio"),
        }
    }

    pub fn stats(&self) -> IoBusStats {
        IoBusStats {
            pio: self.pio.stats(),
            mmio: self.mmio.stats(),
        }
    }
}

impl Default for IoBus {
    fn default() -> Self {
        Self::new()
    }
}

impl IoHandler for IoBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers every access; reads return the low byte of offset + i.
    #[derive(Default)]
    struct Recorder {
        log: Vec<(bool, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset.wrapping_add(i as u64) as u8;
            }
            self.log.push((false, offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.push((true, offset, data.to_vec()));
        }
        fn name(&self) -> &'static str {
            "recorder"
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_rejects_overlap_zero_length_and_overflow() {
        let mut bus = Bus::new("test");
        bus.insert(0x100, 0x10, recorder()).unwrap();
        bus.insert(0x110, 0x10, recorder()).unwrap(); // adjacent above
        bus.insert(0xf0, 0x10, recorder()).unwrap(); // adjacent below
        for (base, len) in [
            (0x100, 1),
            (0x10f, 2),
            (0xff, 2),
            (0x80, 0x200),
            (0x105, 0x1),
            (0x11f, 0x10),
        ] {
            assert!(
                matches!(
                    bus.insert(base, len, recorder()),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x} should overlap"
            );
        }
        assert_eq!(
            bus.insert(0x1000, 0, recorder()),
            Err(BusError::ZeroLength {
                bus: "test",
                base: 0x1000
            })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, recorder()),
            Err(BusError::Overflow { .. })
        ));
        // A range may end exactly at the top of the address space.
        bus.insert(u64::MAX - 3, 4, recorder()).unwrap();
        assert_eq!(bus.len(), 4);
    }

    #[test]
    fn routes_offsets_to_the_right_device() {
        let mut bus = Bus::new("test");
        let a = recorder();
        let b = recorder();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x400, 4, b.clone()).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2, 3]);
        assert!(bus.write(0x403, &[9]));
        assert_eq!(a.lock().unwrap().log, vec![(false, 2, vec![2, 3])]);
        assert_eq!(b.lock().unwrap().log, vec![(true, 3, vec![9])]);
        let stats = bus.stats();
        assert_eq!(stats.devices[0].accesses, 1);
        assert_eq!(stats.devices[1].accesses, 1);
        assert_eq!(stats.devices[0].name, "recorder");
        assert_eq!(stats.unknown, 0);
    }

    #[test]
    fn unknown_and_straddling_reads_are_all_ones_and_writes_dropped() {
        let mut bus = Bus::new("test");
        let a = recorder();
        bus.insert(0x60, 5, a.clone()).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x50, &mut data));
        assert_eq!(data, [0xff; 4]);
        data = [0; 4];
        // 0x63..0x67 runs past 0x64, the last byte of the device.
        assert!(!bus.read(0x63, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x64, &[1, 2]));
        assert!(!bus.write(0x65, &[1]));
        assert!(a.lock().unwrap().log.is_empty());
        // The last byte exactly still works.
        assert!(bus.read(0x64, &mut data[..1]));
        assert_eq!(bus.stats().unknown, 4);
        // At the very top of the address space nothing overflows.
        let mut big = [0u8; 8];
        assert!(!bus.read(u64::MAX, &mut big));
        assert_eq!(big, [0xff; 8]);
    }

    #[test]
    fn straddle_at_the_top_of_the_space() {
        let mut bus = Bus::new("test");
        bus.insert(u64::MAX - 3, 4, recorder()).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(u64::MAX - 3, &mut data));
        assert!(!bus.read(u64::MAX - 2, &mut data));
        assert!(bus.read(u64::MAX, &mut data[..1]));
    }

    #[test]
    fn unknown_addresses_are_remembered_up_to_the_limit() {
        let bus = Bus::new("test");
        let mut data = [0u8; 1];
        for addr in 0..(UNKNOWN_LOG_LIMIT as u64 + 100) {
            bus.read(addr, &mut data);
            bus.write(addr, &data); // same address: no second entry
        }
        let log = bus.log.lock().unwrap();
        assert_eq!(log.seen.len(), UNKNOWN_LOG_LIMIT);
        assert!(log.full);
        assert!(log.seen.contains(&0));
        assert!(!log.seen.contains(&(UNKNOWN_LOG_LIMIT as u64)));
        drop(log);
        assert_eq!(bus.stats().unknown, 2 * (UNKNOWN_LOG_LIMIT as u64 + 100));
    }

    #[test]
    fn offset_shifts_into_the_inner_device() {
        let dev = recorder();
        let mut bus = Bus::new("pio");
        bus.insert(0x60, 1, Arc::new(Mutex::new(Offset::new(dev.clone(), 0))))
            .unwrap();
        bus.insert(0x64, 1, Arc::new(Mutex::new(Offset::new(dev.clone(), 4))))
            .unwrap();
        assert!(bus.write(0x64, &[0xfe]));
        assert!(bus.write(0x60, &[0x01]));
        assert!(!bus.write(0x61, &[0x02]), "0x61 stays free");
        let l = &dev.lock().unwrap().log;
        assert_eq!(l[l.len() - 2], (true, 4, vec![0xfe]));
        assert_eq!(l[l.len() - 1], (true, 0, vec![0x01]));
    }

    #[test]
    fn remove_unmaps() {
        let mut bus = Bus::new("test");
        bus.insert(0x10, 1, recorder()).unwrap();
        assert!(bus.remove(0x10).is_some());
        assert!(bus.remove(0x10).is_none());
        let mut d = [0u8];
        assert!(!bus.read(0x10, &mut d));
        bus.insert(0x10, 1, recorder()).unwrap();
    }

    #[test]
    fn poisoned_device_does_not_panic_the_caller() {
        let mut bus = Bus::new("test");
        let a = recorder();
        bus.insert(0, 4, a.clone()).unwrap();
        let poisoner = a.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("device thread dies holding the lock");
        })
        .join();
        assert!(a.is_poisoned());
        let mut d = [0u8; 2];
        assert!(bus.read(1, &mut d));
        assert_eq!(d, [1, 2]);
        assert!(bus.write(0, &[5]));
    }

    #[test]
    fn io_bus_dispatches_pio_and_mmio_separately() {
        let mut io = IoBus::new();
        let port = recorder();
        let mmio = recorder();
        io.pio.insert(0x70, 2, port.clone()).unwrap();
        io.mmio.insert(0xd000_0000, 0x1000, mmio.clone()).unwrap();
        let handler: &dyn IoHandler = &io;
        let mut d = [0u8; 1];
        handler.pio_write(0x70, &[0x8f]);
        handler.pio_read(0x71, &mut d);
        assert_eq!(d, [1]);
        let mut w = [0u8; 4];
        handler.mmio_read(0xd000_0010, &mut w);
        assert_eq!(w, [0x10, 0x11, 0x12, 0x13]);
        handler.mmio_write(0xd000_0ffc, &[1, 2, 3, 4]);
        // Port 0x70 is not an MMIO address and vice versa.
        handler.mmio_read(0x70, &mut d);
        assert_eq!(d, [0xff]);
        handler.pio_write(0xffff, &[1, 2, 3, 4]);
        assert_eq!(
            port.lock().unwrap().log,
            vec![(true, 0, vec![0x8f]), (false, 1, vec![1])]
        );
        assert_eq!(
            mmio.lock().unwrap().log,
            vec![
                (false, 0x10, vec![0x10, 0x11, 0x12, 0x13]),
                (true, 0xffc, vec![1, 2, 3, 4])
            ]
        );
        let stats = io.stats();
        assert_eq!(stats.pio.unknown, 1);
        assert_eq!(stats.mmio.unknown, 1);
        assert_eq!(stats.pio.devices[0].accesses, 2);
    }

    #[test]
    fn map_and_unmap_while_shared() {
        let bus = Arc::new(Bus::new("test"));
        let a = recorder();
        bus.map(0x1000, 0x100, a.clone()).unwrap();
        assert!(matches!(
            bus.map(0x10ff, 1, recorder()),
            Err(BusError::Overlap { .. })
        ));
        let mut d = [0u8; 4];
        assert!(bus.read(0x1004, &mut d));
        assert!(bus.unmap(0x1000).is_some());
        assert!(!bus.read(0x1004, &mut d));
        bus.map_named(0x2000, 0x100, "moved", a.clone()).unwrap();
        assert!(bus.read(0x2004, &mut d));
        assert_eq!(d, [4, 5, 6, 7]);
        assert_eq!(bus.stats().devices[0].name, "moved");
        // Threads reading while another remaps: no deadlock, every read sees one device or none.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (bus, stop) = (bus.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut d = [0u8; 1];
                    while !stop.load(Ordering::Relaxed) {
                        bus.read(0x2000, &mut d);
                    }
                })
            })
            .collect();
        for _ in 0..1000 {
            bus.unmap(0x2000).unwrap();
            bus.map(0x2000, 0x100, a.clone()).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }

    /// A device that remaps itself from inside an access (a guest moving a BAR through a
    /// register of the same device) must not deadlock the bus.
    struct SelfMover {
        bus: std::sync::Weak<Bus>,
        me: Option<Arc<Mutex<dyn BusDevice>>>,
        base: u64,
    }

    impl BusDevice for SelfMover {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            let (Some(bus), Some(me)) = (self.bus.upgrade(), self.me.clone()) else {
                return;
            };
            bus.unmap(self.base);
            self.base += 0x100;
            bus.map_named(self.base, 0x10, "mover", me).unwrap();
        }
    }

    #[test]
    fn a_device_may_remap_itself_during_an_access() {
        let bus = Arc::new(Bus::new("test"));
        let dev = Arc::new(Mutex::new(SelfMover {
            bus: Arc::downgrade(&bus),
            me: None,
            base: 0x100,
        }));
        let as_dyn: Arc<Mutex<dyn BusDevice>> = dev.clone();
        dev.lock().unwrap().me = Some(as_dyn.clone());
        bus.map(0x100, 0x10, as_dyn).unwrap();
        assert!(bus.write(0x100, &[1]));
        let mut d = [0u8];
        assert!(!bus.read(0x100, &mut d));
        assert!(bus.read(0x200, &mut d));
        assert_eq!(d, [0x5a]);
        dev.lock().unwrap().me = None; // break the cycle
    }

    #[test]
    fn zero_sized_accesses_reach_the_device_harmlessly() {
        let mut bus = Bus::new("test");
        let a = recorder();
        bus.insert(0x10, 4, a.clone()).unwrap();
        assert!(bus.read(0x13, &mut []));
        assert!(bus.write(0x13, &[]));
        assert!(!bus.read(0x14, &mut []));
        assert_eq!(a.lock().unwrap().log.len(), 2);
    }
}
