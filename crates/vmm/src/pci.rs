//! The PCI side of a VM: the root complex (configuration ports 0xCF8-0xCFF, ECAM) and the
//! virtio devices on it — the disks in the order given (the first is the guest's
//! `/dev/vda`), the entropy device, the network devices in the order given (the first is the
//! guest's `eth0`), then the vsock device. Disks, TAPs and the vsock socket are opened once
//! per configuration and reused across guest reboots; the devices and their threads live for
//! one boot. A restore opens the TAPs again by name and tells the guest its vsock connections
//! were reset.

use std::sync::{Arc, Mutex};

use vireo_arch::layout;
use vireo_devices::pci::{
    PciAddress, PciConfigIo, PciConfigMmio, PciDevice, PciRoot, PciWindows, Window,
};
use vireo_devices::IoBus;
use vireo_hv::{GuestMemory, Vm};
use vireo_virtio::{
    Block, DiskImage, DiskOptions, Net, NetControl, Rng, VirtioPciDevice, Vsock, VsockControl,
};

use crate::config::VmConfig;
use crate::net::OpenNet;
use crate::Error;

/// Open and lock every disk of `cfg`, in order.
pub(crate) fn open_disks(cfg: &VmConfig) -> Result<Vec<Arc<DiskImage>>, Error> {
    cfg.disks
        .iter()
        .map(|d| {
            DiskImage::open(&DiskOptions {
                path: d.path.clone(),
                readonly: d.readonly,
                serial: d.serial.clone(),
                direct: d.direct,
            })
            .map(Arc::new)
            .map_err(|e| Error::Disk(e.to_string()))
        })
        .collect()
}

/// The host bridge's windows for a VM with `mem_size` bytes of RAM (what the DSDT's `_CRS`
/// says, `arch::acpi`).
pub(crate) fn windows(mem_size: u64) -> PciWindows {
    PciWindows {
        io: Window {
            start: layout::PCI_IO_START,
            size: layout::PCI_IO_SIZE,
        },
        mmio32: Window {
            start: layout::PCI_MMIO32_START,
            size: layout::PCI_MMIO32_SIZE,
        },
        mmio64: Window {
            start: layout::pci_mmio64_start(mem_size),
            size: layout::PCI_MMIO64_SIZE,
        },
    }
}

/// Host back ends that outlive a boot: disks, TAPs, the vsock socket.
pub(crate) struct Backends<'a> {
    pub(crate) disks: &'a [Arc<DiskImage>],
    pub(crate) nets: &'a [OpenNet],
    pub(crate) vsock: Option<&'a Arc<vireo_virtio::VsockBackend>>,
    /// The guest CPU is interpreted (`Hypervisor::emulated_cpu`): network devices moderate
    /// their interrupts (`vireo_virtio::net::EMULATED_IRQ_GAP`).
    pub(crate) emulated_cpu: bool,
}

/// The PCI devices of one boot.
pub(crate) struct PciDevices {
    root: Arc<Mutex<PciRoot>>,
    /// Link status, announcements and counters of the network devices, in order.
    nets: Vec<NetControl>,
    /// Transport resets of the vsock device.
    vsock: Option<VsockControl>,
    /// The virtio functions in slot order, with their addresses.
    virtio: Vec<(PciAddress, Arc<Mutex<VirtioPciDevice>>)>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciDevices {
    /// Build the root complex and the virtio devices, and put the configuration mechanisms on
    /// `bus`. BARs start decoding at [`PciDevices::attach`].
    pub(crate) fn create(
        vm: &Arc<dyn Vm>,
        mem: &GuestMemory,
        cfg: &VmConfig,
        backends: &Backends<'_>,
        bus: &mut IoBus,
    ) -> Result<Self, Error> {
        let dev_err = |e: &dyn std::fmt::Display| Error::Devices(e.to_string());
        let mut root = PciRoot::new(windows(cfg.memory.0)).map_err(|e| dev_err(&e))?;
        let mut virtio = Vec::new();
        let mut add = |dev: VirtioPciDevice| -> Result<(), Error> {
            let typed = Arc::new(Mutex::new(dev));
            let dev: Arc<Mutex<dyn PciDevice>> = typed.clone();
            let name = lock(&typed).name();
            let at = root.add_device(dev).map_err(|e| dev_err(&e))?;
            tracing::debug!("PCI {at}: {name}");
            virtio.push((at, typed));
            Ok(())
        };
        for (i, disk) in backends.disks.iter().enumerate() {
            let blk = Block::new(disk.clone(), i);
            add(VirtioPciDevice::new(Box::new(blk), mem.clone(), vm.clone())
                .map_err(|e| dev_err(&e))?)?;
        }
        if cfg.rng {
            add(
                VirtioPciDevice::new(Box::new(Rng::new()), mem.clone(), vm.clone())
                    .map_err(|e| dev_err(&e))?,
            )?;
        }
        let mut nets = Vec::new();
        for (i, n) in backends.nets.iter().enumerate() {
            let mut net = Net::new(n.tap.clone(), n.mac, i);
            if backends.emulated_cpu {
                net.set_interrupt_moderation(vireo_virtio::net::EMULATED_IRQ_GAP);
            }
            nets.push(net.control());
            add(VirtioPciDevice::new(Box::new(net), mem.clone(), vm.clone())
                .map_err(|e| dev_err(&e))?)?;
        }
        let mut vsock = None;
        if let (Some(v), Some(backend)) = (&cfg.vsock, backends.vsock) {
            let dev = Vsock::new(u64::from(v.cid), backend.clone());
            vsock = Some(dev.control());
            add(VirtioPciDevice::new(Box::new(dev), mem.clone(), vm.clone())
                .map_err(|e| dev_err(&e))?)?;
        }
        let root = Arc::new(Mutex::new(root));
        bus.pio
            .insert(
                u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
                8,
                Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            )
            .map_err(|e| dev_err(&e))?;
        bus.mmio
            .insert(
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_SIZE,
                Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            )
            .map_err(|e| dev_err(&e))?;
        Ok(PciDevices {
            root,
            nets,
            vsock,
            virtio,
        })
    }

    /// The virtio functions, by address (`00:01.0`).
    pub(crate) fn transports(&self) -> Vec<(String, Arc<Mutex<VirtioPciDevice>>)> {
        self.virtio
            .iter()
            .map(|(a, d)| (a.to_string(), d.clone()))
            .collect()
    }

    /// Pause every device (their requests in flight complete first).
    pub(crate) fn pause(&self) -> Result<(), Error> {
        for (a, d) in &self.virtio {
            lock(d)
                .pause()
                .map_err(|e| Error::Devices(format!("pausing PCI {a}: {e}")))?;
        }
        Ok(())
    }

    pub(crate) fn resume(&self) -> Result<(), Error> {
        for (a, d) in &self.virtio {
            lock(d)
                .resume()
                .map_err(|e| Error::Devices(format!("resuming PCI {a}: {e}")))?;
        }
        Ok(())
    }

    /// Every function's state, in slot order (the devices must be paused).
    pub(crate) fn states(&self) -> Vec<(String, vireo_virtio::VirtioPciState)> {
        self.virtio
            .iter()
            .map(|(_, d)| {
                let d = lock(d);
                (d.device().name().to_string(), d.state())
            })
            .collect()
    }

    /// Load states from [`PciDevices::states`] into the functions of the same configuration.
    pub(crate) fn restore(
        &self,
        states: &[(String, vireo_virtio::VirtioPciState)],
    ) -> Result<(), Error> {
        if states.len() != self.virtio.len() {
            return Err(Error::Devices(format!(
                "the snapshot has {} PCI devices, this configuration {}",
                states.len(),
                self.virtio.len()
            )));
        }
        for ((a, d), (name, s)) in self.virtio.iter().zip(states) {
            let mut d = lock(d);
            if d.device().name() != name {
                return Err(Error::Devices(format!(
                    "PCI {a} is {} here and {name} in the snapshot",
                    d.device().name()
                )));
            }
            d.restore(s)
                .map_err(|e| Error::Devices(format!("PCI {a}: {e}")))?;
        }
        // A restored machine starts paused: its devices too, until `resume`.
        self.pause()?;
        // What the host side of the network devices did not keep: the guest is told its vsock
        // connections are gone (their host sockets were not in the snapshot) and asked to
        // announce its addresses (its NICs may now be on another host's bridge).
        if let Some(v) = &self.vsock {
            v.transport_reset();
        }
        for n in &self.nets {
            n.announce();
        }
        Ok(())
    }

    /// Map the BARs on `bus` (now shared with the vCPUs); from here on the guest moves them.
    pub(crate) fn attach(&self, bus: &Arc<IoBus>) {
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attach(bus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    #[test]
    fn windows_follow_memory_and_layout() {
        let w = windows(5 << 30);
        assert_eq!(w.mmio64.start, 6 << 30);
        assert_eq!(w.mmio32.start, layout::PCI_MMIO32_START);
        assert_eq!(w.io.start + w.io.size, 0x1_0000);
    }

    #[test]
    fn disks_open_in_order_and_lock() {
        let dir = std::env::temp_dir().join(format!("vireo-vmm-pci-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.img");
        let b = dir.join("b.img");
        std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
        std::fs::File::create(&b).unwrap().set_len(2 << 20).unwrap();
        let mut cfg = VmConfig::new("/k");
        cfg.disks = vec![
            DiskConfig {
                path: a.clone(),
                readonly: false,
                serial: None,
                direct: false,
            },
            DiskConfig {
                path: b.clone(),
                readonly: true,
                serial: Some("b".into()),
                direct: false,
            },
        ];
        let disks = open_disks(&cfg).unwrap();
        assert_eq!(disks[0].sectors(), 2048);
        assert_eq!(disks[1].sectors(), 4096);
        // A second VMM on the same configuration is refused, naming the file.
        let e = open_disks(&cfg).unwrap_err().to_string();
        assert!(e.contains("a.img") && e.contains("in use"), "{e}");
        drop(disks);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
