//! The PCI root complex: a host bridge at 00:00.0 and up to 31 single-function devices on
//! bus 0, reached through configuration mechanism #1 (ports 0xCF8/0xCFC, PCI Local Bus
//! Specification 3.0 §3.2.2.3.2) and PCIe ECAM (PCI Express Base Specification §7.2.2).
//!
//! [`PciRoot`] places each device's BARs at start-up (as firmware would, with `vm-allocator`
//! in the windows the ACPI tables describe) and enables decode. Afterwards the guest owns
//! them: it may size, move, disable and re-enable BARs, and the root keeps the device's ranges
//! on the [`IoBus`] equal to what the configuration space decodes. A BAR the guest puts
//! outside the host bridge's windows, or on top of another range, is not mapped (logged once
//! per BAR) until it is moved somewhere valid: a hostile guest cannot make a device shadow
//! RAM, the interrupt controllers or another device.
//!
//! No function has an interrupt pin: devices interrupt through MSI-X ([`msix`]).

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex, Weak};

use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::bus::lock;
use crate::{BusDevice, BusError, IoBus};
use config::{BarKind, BarMapping, PciConfiguration, PciHeader, NUM_BARS};

pub use config::{Bar, PciConfigState};
pub use msix::{MsixLayout, MsixState, MsixTable};

/// Errors of the PCI layer.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("BAR {0} is taken, out of range, or the upper half of a 64-bit BAR")]
    BarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two in the allowed range")]
    BarSize(u64),
    #[error("BAR address {0:#x} does not fit the BAR")]
    BarAddress(u64),
    #[error("no room left for capabilities in configuration space")]
    CapabilitySpace,
    #[error("MSI-X table of {0} vectors (1 to 2048 allowed)")]
    MsixSize(usize),
    #[error("MSI-X table or PBA in a bad place")]
    MsixLayout,
    #[error("bus 0 is full (31 devices)")]
    NoSlot,
    #[error("no room for a {size:#x}-byte {kind:?} BAR in its window")]
    Allocate { kind: BarKind, size: u64 },
    #[error("bad PCI window: {0}")]
    Window(String),
    #[error("state does not fit this device: {0}")]
    State(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A bus/device/function address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A PCI function on the root bus.
///
/// The root routes configuration cycles and BAR accesses to it; the device keeps its own
/// [`PciConfiguration`] and may interpret capability registers in
/// [`PciDevice::write_config`].
pub trait PciDevice: Send {
    /// Short name for logs and bus statistics.
    fn name(&self) -> &'static str;
    /// The configuration space.
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// A configuration read (`offset` < 4096, any size).
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A configuration write. The default applies it to the configuration space.
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// A read of `data.len()` bytes at `offset` into BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write into BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now decodes at `addr` (`Some`) or no longer decodes (`None`); a device with
    /// I/O events (queue notifications) moves them here.
    fn bar_mapped(&mut self, _bar: usize, _addr: Option<u64>) {}
}

/// An address window of the host bridge (what its ACPI `_CRS` advertises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub size: u64,
}

impl Window {
    /// True when `[addr, addr + len)` lies inside the window.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        match (addr.checked_add(len), self.start.checked_add(self.size)) {
            (Some(end), Some(wend)) => addr >= self.start && end <= wend,
            _ => false,
        }
    }
}

/// The host bridge's windows: where BARs may decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciWindows {
    /// Port I/O (I/O BARs).
    pub io: Window,
    /// 32-bit memory (32-bit BARs; 64-bit BARs may be moved here by the guest).
    pub mmio32: Window,
    /// 64-bit memory above RAM (64-bit BARs).
    pub mmio64: Window,
}

/// The PCI host bridge at 00:00.0 (class 06/00/00). IDs: Red Hat's generic PCIe host bridge
/// (1b36:0008), which guests bind no special driver to.
pub struct HostBridge {
    config: PciConfiguration,
}

/// PCI IDs of the host bridge.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class_code: 0x06_00_00,
                revision_id: 0,
                subsystem_vendor_id: HOST_BRIDGE_VENDOR_ID,
                subsystem_id: 0x1100,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &'static str {
        "pci-host-bridge"
    }
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// The bus side of one BAR: accesses in its range go to the device with the BAR's index.
struct BarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
    name: &'static str,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
    fn name(&self) -> &'static str {
        self.name
    }
}

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    name: &'static str,
    /// Where each BAR is on the bus now.
    mapped: [Option<BarMapping>; NUM_BARS],
    regions: [Option<Arc<Mutex<dyn BusDevice>>>; NUM_BARS],
    /// BARs whose refused placement was logged (once each).
    refused_logged: [bool; NUM_BARS],
}

/// Devices on bus 0, their BAR placement and their ranges on the bus.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    windows: PciWindows,
    io: AddressAllocator,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    /// The bus BARs are mapped on; none until [`PciRoot::attach`].
    bus: Option<Weak<IoBus>>,
}

/// Devices per bus (§3.2.2.3.1).
const SLOTS: usize = 32;
/// Smallest placement of a memory BAR: a page, so no two devices share one (and each can
/// have its own ioeventfds and mappings).
const MIN_MEM_BAR_ALIGN: u64 = 0x1000;

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new(windows: PciWindows) -> Result<Self, PciError> {
        let alloc = |w: Window, what: &str| {
            AddressAllocator::new(w.start, w.size)
                .map_err(|e| PciError::Window(format!("{what} window {w:x?}: {e}")))
        };
        if windows.io.start.saturating_add(windows.io.size) > 0x1_0000 {
            return Err(PciError::Window("I/O window beyond port 0xffff".into()));
        }
        let mut root = PciRoot {
            slots: (0..SLOTS).map(|_| None).collect(),
            windows,
            io: alloc(windows.io, "I/O")?,
            mmio32: alloc(windows.mmio32, "32-bit memory")?,
            mmio64: alloc(windows.mmio64, "64-bit memory")?,
            bus: None,
        };
        root.insert(0, Arc::new(Mutex::new(HostBridge::new())))?;
        Ok(root)
    }

    /// The windows BARs may decode in.
    pub fn windows(&self) -> PciWindows {
        self.windows
    }

    /// Put `device` in the next free slot: its BARs get addresses in the windows (64-bit
    /// BARs above RAM, the others below 4 GiB) and decode is enabled, as firmware leaves a
    /// device. Returns its address.
    pub fn add_device(
        &mut self,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<PciAddress, PciError> {
        let slot = (1..SLOTS)
            .find(|&s| self.slots[s].is_none())
            .ok_or(PciError::NoSlot)?;
        self.place_bars(&device)?;
        self.insert(slot, device)?;
        Ok(PciAddress {
            bus: 0,
            device: slot as u8,
            function: 0,
        })
    }

    fn place_bars(&mut self, device: &Arc<Mutex<dyn PciDevice>>) -> Result<(), PciError> {
        let mut dev = lock(device);
        let mut command = 0;
        for index in 0..NUM_BARS {
            let Some(bar) = dev.config().bar(index) else {
                continue;
            };
            let (alloc, align) = match bar.kind {
                BarKind::Io => {
                    command |= config::COMMAND_IO_SPACE;
                    (&mut self.io, bar.size)
                }
                BarKind::Mem32 => {
                    command |= config::COMMAND_MEMORY_SPACE;
                    (&mut self.mmio32, bar.size.max(MIN_MEM_BAR_ALIGN))
                }
                BarKind::Mem64 => {
                    command |= config::COMMAND_MEMORY_SPACE;
                    (&mut self.mmio64, bar.size.max(MIN_MEM_BAR_ALIGN))
                }
            };
            let range = alloc
                .allocate(bar.size.max(align), align, AllocPolicy::FirstMatch)
                .map_err(|_| PciError::Allocate {
                    kind: bar.kind,
                    size: bar.size,
                })?;
            dev.config_mut().set_bar_addr(index, range.start())?;
        }
        let cmd = dev.config().command() | command;
        dev.config_mut().set_command(cmd);
        Ok(())
    }

    fn insert(&mut self, slot: usize, device: Arc<Mutex<dyn PciDevice>>) -> Result<(), PciError> {
        let (name, declared) = {
            let d = lock(&device);
            (
                d.name(),
                std::array::from_fn::<_, NUM_BARS, _>(|i| d.config().bar(i)),
            )
        };
        let regions: [Option<Arc<Mutex<dyn BusDevice>>>; NUM_BARS] = std::array::from_fn(|bar| {
            declared[bar].map(|_| {
                let r: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(BarRegion {
                    device: device.clone(),
                    bar,
                    name,
                }));
                r
            })
        });
        self.slots[slot] = Some(Slot {
            device,
            name,
            mapped: [None; NUM_BARS],
            regions,
            refused_logged: [false; NUM_BARS],
        });
        self.sync(slot);
        Ok(())
    }

    /// Start decoding: BARs are mapped on `bus` from now on (and at once, for those enabled).
    pub fn attach(&mut self, bus: &Arc<IoBus>) {
        self.bus = Some(Arc::downgrade(bus));
        for slot in 0..SLOTS {
            self.sync(slot);
        }
    }

    /// The devices and where their BARs decode now, for logs and tests.
    pub fn devices(&self) -> Vec<(PciAddress, &'static str, [Option<BarMapping>; NUM_BARS])> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref().map(|s| {
                    (
                        PciAddress {
                            bus: 0,
                            device: i as u8,
                            function: 0,
                        },
                        s.name,
                        s.mapped,
                    )
                })
            })
            .collect()
    }

    fn slot_of(&self, a: PciAddress) -> Option<usize> {
        let i = usize::from(a.device);
        (a.bus == 0 && a.function == 0 && i < SLOTS && self.slots[i].is_some()).then_some(i)
    }

    /// A configuration read; a function that does not exist reads all-ones (a master abort).
    pub fn config_read(&mut self, a: PciAddress, offset: u16, data: &mut [u8]) {
        match self.slot_of(a).and_then(|i| self.slots[i].as_ref()) {
            Some(s) => lock(&s.device).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; then the bus follows what the BARs decode.
    pub fn config_write(&mut self, a: PciAddress, offset: u16, data: &[u8]) {
        let Some(i) = self.slot_of(a) else {
            return;
        };
        if let Some(s) = &self.slots[i] {
            lock(&s.device).write_config(offset, data);
        }
        self.sync(i);
    }

    /// Bring the bus in line with what slot `i`'s BARs decode.
    fn sync(&mut self, i: usize) {
        let Some(bus) = self.bus.as_ref().and_then(Weak::upgrade) else {
            return;
        };
        let windows = self.windows;
        let Some(slot) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let decoded = lock(&slot.device).config().decoded_bars();
        for (bar, &want) in decoded.iter().enumerate() {
            if want == slot.mapped[bar] {
                continue;
            }
            if let Some(old) = slot.mapped[bar].take() {
                bus_of(&bus, old.kind).unmap(old.addr);
                lock(&slot.device).bar_mapped(bar, None);
            }
            let Some(m) = want else {
                continue;
            };
            let in_window = match m.kind {
                BarKind::Io => windows.io.contains(m.addr, m.size),
                BarKind::Mem32 => windows.mmio32.contains(m.addr, m.size),
                BarKind::Mem64 => {
                    windows.mmio32.contains(m.addr, m.size)
                        || windows.mmio64.contains(m.addr, m.size)
                }
            };
            let region = slot.regions[bar].clone();
            let result = match (in_window, region) {
                (true, Some(region)) => bus_of(&bus, m.kind)
                    .map_named(m.addr, m.size, slot.name, region)
                    .map_err(|e| e.to_string()),
                (true, None) => Err("no region".to_string()),
                (false, _) => Err("outside the host bridge's windows".to_string()),
            };
            match result {
                Ok(()) => {
                    slot.mapped[bar] = Some(m);
                    slot.refused_logged[bar] = false;
                    lock(&slot.device).bar_mapped(bar, Some(m.addr));
                }
                Err(why) => {
                    if !slot.refused_logged[bar] {
                        slot.refused_logged[bar] = true;
                        tracing::warn!(
                            "PCI 00:{i:02x}.0 ({}): BAR {bar} at {:#x} ({:#x} bytes) not mapped: {why}",
                            slot.name,
                            m.addr,
                            m.size
                        );
                    }
                }
            }
        }
    }
}

fn bus_of(bus: &IoBus, kind: BarKind) -> &crate::Bus {
    match kind {
        BarKind::Io => &bus.pio,
        BarKind::Mem32 | BarKind::Mem64 => &bus.mmio,
    }
}

/// Configuration mechanism #1 (PCI 3.0 §3.2.2.3.2): CONFIG_ADDRESS at 0xCF8 (dword accesses
/// only), CONFIG_DATA at 0xCFC-0xCFF. Insert it at 0xCF8 with length 8.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

/// CONFIG_ADDRESS: enable bit, and the bits that hold bus, device, function and register.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The function and register CONFIG_ADDRESS selects, if enabled.
    fn target(&self, data_offset: u64) -> Option<(PciAddress, u16)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        Some((
            PciAddress {
                bus: (a >> 16) as u8,
                device: ((a >> 11) & 0x1f) as u8,
                function: ((a >> 8) & 0x7) as u8,
            },
            (a & 0xfc) as u16 + data_offset as u16,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((a, reg)) => lock(&self.root).config_read(a, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address = v & CONFIG_ADDRESS_MASK;
            }
            4..=7 => {
                if let Some((a, reg)) = self.target(offset - 4) {
                    lock(&self.root).config_write(a, reg, data);
                }
            }
            _ => {}
        }
    }

    fn name(&self) -> &'static str {
        "pci-config-io"
    }
}

/// PCIe ECAM (PCI Express Base Specification §7.2.2): 4 KiB of configuration space per
/// function at `bus << 20 | device << 15 | function << 12`. Insert it at the MCFG base.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn decode(offset: u64) -> (PciAddress, u16) {
        (
            PciAddress {
                bus: ((offset >> 20) & 0xff) as u8,
                device: ((offset >> 15) & 0x1f) as u8,
                function: ((offset >> 12) & 0x7) as u8,
            },
            (offset & 0xfff) as u16,
        )
    }

    /// An access must stay inside one function's 4 KiB.
    fn in_one_function(offset: u64, len: usize) -> bool {
        (offset & 0xfff) + len as u64 <= 0x1000
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !Self::in_one_function(offset, data.len()) || offset >> 28 != 0 {
            data.fill(0xff);
            return;
        }
        let (a, reg) = Self::decode(offset);
        lock(&self.root).config_read(a, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !Self::in_one_function(offset, data.len()) || offset >> 28 != 0 {
            return;
        }
        let (a, reg) = Self::decode(offset);
        lock(&self.root).config_write(a, reg, data);
    }

    fn name(&self) -> &'static str {
        "pci-ecam"
    }
}

#[cfg(test)]
mod tests;
