//! One built VM — memory, backend VM, devices, vCPU threads — from boot (or restore) to tear
//! down. The lifecycle around it (which commands are allowed when, reboots) is `vm.rs`'s.
//!
//! vCPU threads can be parked: [`Machine::pause`] raises a flag and kicks every vCPU; each
//! thread leaves `Vcpu::run`, counts itself parked and waits on its mailbox, where it serves
//! state requests (a snapshot reads every vCPU on its own thread) until told to resume or to
//! exit. Then the devices stop after finishing their requests in flight and the guest clock
//! stops, so a paused VM changes nothing, not even its memory.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use vireo_arch::{acpi, boot, cpu, cpuid, layout, loader};
use vireo_devices::irqchip::IrqChip;
use vireo_devices::legacy::{AcpiPm, Cmos, PowerButton, PvPanic, Serial, I8042};
use vireo_devices::{BusDevice, EventSink, IoBus, Offset, PlatformEvent};
use vireo_hv::{
    GuestClock, GuestMemory, Hypervisor, IoHandler, Vcpu, VcpuState, Vm, VmExit, VmParams,
};
use vm_memory::GuestAddress;

use crate::config::VmConfig;
use crate::snapshot::{self, DevicesState, MachineState, MemoryStats};
use crate::vm::{lock, StopReason, VmmHandle};
use crate::Error;

/// The period of auto-converge's kicks: a vCPU throttled at `t` percent sleeps `t` percent of
/// it after each kick.
pub(crate) const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// How long a pause waits for every vCPU to leave guest code.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Exits and accesses of one vCPU, counted as they happen (relaxed atomics, no locks).
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub pio_read: AtomicU64,
    pub pio_write: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    pub interrupted: AtomicU64,
    pub shutdown: AtomicU64,
    pub reset: AtomicU64,
    pub power_off: AtomicU64,
}

/// A [`VcpuCounters`] read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VcpuExitCounts {
    pub vcpu: u32,
    pub pio_read: u64,
    pub pio_write: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub interrupted: u64,
    pub shutdown: u64,
    pub reset: u64,
    pub power_off: u64,
}

impl VcpuCounters {
    fn read(&self, vcpu: u32) -> VcpuExitCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VcpuExitCounts {
            vcpu,
            pio_read: l(&self.pio_read),
            pio_write: l(&self.pio_write),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            hlt: l(&self.hlt),
            interrupted: l(&self.interrupted),
            shutdown: l(&self.shutdown),
            reset: l(&self.reset),
            power_off: l(&self.power_off),
        }
    }
}

/// The device bus as a vCPU sees it, counting each access.
struct CountingIo<'a> {
    bus: &'a IoBus,
    c: &'a VcpuCounters,
}

impl IoHandler for CountingIo<'_> {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.c.pio_read.fetch_add(1, Ordering::Relaxed);
        self.bus.pio_read(port, data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.c.pio_write.fetch_add(1, Ordering::Relaxed);
        self.bus.pio_write(port, data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.c.mmio_read.fetch_add(1, Ordering::Relaxed);
        self.bus.mmio_read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.c.mmio_write.fetch_add(1, Ordering::Relaxed);
        self.bus.mmio_write(addr, data);
    }
}

/// What a parked vCPU thread is told.
pub(crate) enum VcpuMsg {
    /// Run again (after the pause of this epoch).
    Resume(u64),
    /// Send your state.
    Save(Sender<vireo_hv::Result<VcpuState>>),
    /// Leave the thread.
    Exit,
}

/// Pause bookkeeping shared by the vCPU threads of one machine.
struct Park {
    pause: AtomicBool,
    /// Bumped by every pause; a resume for an older one is stale.
    epoch: AtomicU64,
    parked: Mutex<usize>,
    changed: Condvar,
    /// Auto-converge (live migration): the share of time, in percent, each vCPU sleeps after
    /// a kick instead of running guest code.
    throttle: AtomicU32,
}

/// A device of the machine, for `info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// `pci 00:01.0` or `pio 0x3f8`.
    pub address: String,
    pub name: String,
}

/// A device's counters, for `counters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceCounters {
    pub address: String,
    pub name: String,
    /// Guest accesses to its registers (port I/O or MMIO).
    pub accesses: u64,
    /// The device's own counters (requests, bytes).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// What `info` and `counters` read without going through the main thread.
pub(crate) struct MachineView {
    pub bus: Arc<IoBus>,
    pub vcpus: Vec<Arc<VcpuCounters>>,
    pub virtio: Vec<(String, Arc<Mutex<vireo_virtio::VirtioPciDevice>>)>,
    pub power_button: Arc<PowerButton>,
    pub serial_bytes: Arc<AtomicU64>,
}

impl MachineView {
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let mut v: Vec<DeviceInfo> = [
            (layout::COM1_PORT, "serial"),
            (layout::I8042_DATA_PORT, "i8042"),
            (layout::CMOS_PORT, "cmos"),
            (layout::PVPANIC_PORT, "pvpanic"),
            (layout::ACPI_SLEEP_CONTROL_PORT, "acpi-pm"),
        ]
        .iter()
        .map(|(port, name)| DeviceInfo {
            address: format!("pio {port:#x}"),
            name: (*name).into(),
        })
        .collect();
        v.push(DeviceInfo {
            address: format!("gsi {}", layout::GED_IRQ),
            name: "power-button".into(),
        });
        v.extend(self.virtio.iter().map(|(addr, d)| DeviceInfo {
            address: format!("pci {addr}"),
            name: lock(d).device().name().into(),
        }));
        v
    }

    pub fn vcpu_counts(&self) -> Vec<VcpuExitCounts> {
        self.vcpus
            .iter()
            .enumerate()
            .map(|(i, c)| c.read(i as u32))
            .collect()
    }

    pub fn device_counts(&self) -> Vec<DeviceCounters> {
        let stats = self.bus.stats();
        let accesses = |name: &str| -> u64 {
            stats
                .pio
                .devices
                .iter()
                .chain(stats.mmio.devices.iter())
                .filter(|d| d.name == name)
                .map(|d| d.accesses)
                .sum()
        };
        let mut out = vec![
            DeviceCounters {
                address: format!("pio {:#x}", layout::COM1_PORT),
                name: "serial".into(),
                accesses: accesses("serial"),
                counters: [(
                    "output_bytes".to_string(),
                    self.serial_bytes.load(Ordering::Relaxed),
                )]
                .into(),
            },
            DeviceCounters {
                address: format!("gsi {}", layout::GED_IRQ),
                name: "power-button".into(),
                accesses: 0,
                counters: [("presses".to_string(), self.power_button.presses())].into(),
            },
        ];
        for (addr, d) in &self.virtio {
            let d = lock(d);
            let name = d.device().name();
            out.push(DeviceCounters {
                address: format!("pci {addr}"),
                name: name.into(),
                accesses: 0,
                counters: d
                    .counters()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            });
        }
        // BAR accesses are counted by the bus under the device's name; split evenly is
        // wrong, so report them per name only when the name is unique.
        for c in out.iter_mut().skip(2) {
            let same = self.virtio.len() == 1
                || self
                    .virtio
                    .iter()
                    .filter(|(_, d)| lock(d).device().name() == c.name)
                    .count()
                    == 1;
            if same {
                c.accesses = accesses(&c.name);
            }
        }
        out
    }
}

/// Counts serial output bytes on their way to the console.
struct CountingWriter {
    inner: Box<dyn Write + Send>,
    bytes: Arc<AtomicU64>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A built VM.
pub(crate) struct Machine {
    mem: GuestMemory,
    vm: Arc<dyn Vm>,
    bus: Arc<IoBus>,
    pci: crate::pci::PciDevices,
    irqchip: Option<Arc<IrqChip>>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    power_button: Arc<PowerButton>,
    serial_bytes: Arc<AtomicU64>,
    park: Arc<Park>,
    mailboxes: Vec<Sender<VcpuMsg>>,
    threads: Vec<JoinHandle<()>>,
    counters: Vec<Arc<VcpuCounters>>,
    paused: bool,
}

/// What the main thread needs to build a machine.
pub(crate) struct Env<'a> {
    pub config: &'a VmConfig,
    pub hypervisor: &'a dyn Hypervisor,
    pub output: Box<dyn Write + Send>,
    pub handle: &'a VmmHandle,
    pub disks: &'a [Arc<vireo_virtio::DiskImage>],
    pub net: &'a crate::net::NetBackends,
}

fn dev_err(e: &dyn std::fmt::Display) -> Error {
    Error::Devices(e.to_string())
}

/// Legacy devices, created fresh or from a snapshot's state.
struct Legacy {
    bus: IoBus,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    power_button: Arc<PowerButton>,
    serial_bytes: Arc<AtomicU64>,
}

fn create_devices(
    env: &mut Env<'_>,
    vm: &dyn Vm,
    saved: Option<&DevicesState>,
) -> Result<Legacy, Error> {
    let handle = env.handle.clone();
    let events: EventSink = Arc::new(move |e| {
        handle.stop(match e {
            PlatformEvent::PowerOff => StopReason::PowerOff,
            PlatformEvent::Reset => StopReason::Reset,
            PlatformEvent::Panic => StopReason::Panic,
        })
    });
    let mut bus = IoBus::new();
    let serial_bytes = Arc::new(AtomicU64::new(0));
    let out: Box<dyn Write + Send> = Box::new(CountingWriter {
        inner: std::mem::replace(&mut env.output, Box::new(std::io::sink())),
        bytes: serial_bytes.clone(),
    });
    let irq = vm.irq_line(layout::COM1_IRQ)?;
    let serial = match saved {
        Some(s) => Serial::from_state(&s.serial, irq, out).map_err(|e| dev_err(&e))?,
        None => Serial::new(irq, out),
    };
    let serial = Arc::new(Mutex::new(serial));
    bus.pio
        .insert(layout::COM1_PORT as u64, 8, serial.clone())
        .map_err(|e| dev_err(&e))?;
    let mut i8042 = I8042::new(events.clone())
        .with_kbd_irq(vm.irq_line(layout::KBD_IRQ)?)
        .with_aux_irq(vm.irq_line(layout::AUX_IRQ)?);
    if let Some(s) = saved {
        i8042.restore(&s.i8042).map_err(|e| dev_err(&e))?;
    }
    let i8042 = Arc::new(Mutex::new(i8042));
    // The i8042's data and command ports, leaving port 0x61 (PIT channel 2) free.
    for port in [layout::I8042_DATA_PORT, layout::I8042_COMMAND_PORT] {
        let offset = u64::from(port - layout::I8042_DATA_PORT);
        let dev: Arc<Mutex<dyn BusDevice>> = i8042.clone();
        bus.pio
            .insert(
                port as u64,
                1,
                Arc::new(Mutex::new(Offset::new(dev, offset))),
            )
            .map_err(|e| dev_err(&e))?;
    }
    let mem = env.config.memory.0;
    let mut cmos = Cmos::new(
        layout::low_ram_end(mem),
        mem.saturating_sub(layout::MMIO_HOLE_START),
    );
    if let Some(s) = saved {
        cmos.restore(&s.cmos).map_err(|e| dev_err(&e))?;
    }
    let cmos = Arc::new(Mutex::new(cmos));
    bus.pio
        .insert(layout::CMOS_PORT as u64, 2, cmos.clone())
        .map_err(|e| dev_err(&e))?;
    bus.pio
        .insert(
            layout::ACPI_SLEEP_CONTROL_PORT as u64,
            3,
            Arc::new(Mutex::new(AcpiPm::new(
                events.clone(),
                layout::ACPI_S5_SLP_TYP,
                layout::ACPI_RESET_VALUE,
            ))),
        )
        .map_err(|e| dev_err(&e))?;
    bus.pio
        .insert(
            layout::PVPANIC_PORT as u64,
            1,
            Arc::new(Mutex::new(PvPanic::new(events))),
        )
        .map_err(|e| dev_err(&e))?;
    let power_button = Arc::new(PowerButton::new(vm.irq_line(layout::GED_IRQ)?));
    Ok(Legacy {
        bus,
        serial,
        i8042,
        cmos,
        power_button,
        serial_bytes,
    })
}

pub(crate) fn create_memory(cfg: &VmConfig) -> Result<GuestMemory, Error> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(cfg.memory.0)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| Error::Memory {
        size: cfg.memory,
        reason: e.to_string(),
    })?;
    vireo_hv::advise_huge_pages(&mem);
    Ok(mem)
}

/// Kernel, initrd, ACPI tables, boot page tables and zero page. Returns the entry point.
fn load_guest(cfg: &VmConfig, mem: &GuestMemory) -> Result<u64, Error> {
    let boot_err = |e: &dyn std::fmt::Display| Error::Boot(e.to_string());
    let kernel = loader::load_kernel(mem, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(path) => Some(loader::load_initrd(mem, path, cfg.memory.0, &kernel)?),
        None => None,
    };
    let rsdp = acpi::write_tables(mem, cfg.cpus, &acpi::LegacyDevices::default())
        .map_err(|e| boot_err(&e))?;
    cpu::write_boot_tables(mem).map_err(|e| boot_err(&e))?;
    boot::write_zero_page(
        mem,
        &boot::ZeroPage {
            mem_size: cfg.memory.0,
            cmdline: &cfg.cmdline,
            setup_header: kernel.setup_header,
            initrd,
            rsdp,
        },
    )
    .map_err(|e| boot_err(&e))?;
    Ok(kernel.entry)
}

fn create_vcpus(cfg: &VmConfig, vm: &dyn Vm, entry: u64) -> Result<Vec<Box<dyn Vcpu>>, Error> {
    let boot_err = |e: &dyn std::fmt::Display| Error::Boot(e.to_string());
    let supported = vm.supported_cpuid()?;
    let mtrr = cpuid::has_mtrr(&supported);
    let mut vcpus = Vec::with_capacity(cfg.cpus as usize);
    for id in 0..cfg.cpus {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&cpuid::vcpu_cpuid(&supported, id, cfg.cpus))?;
        cpu::setup_vcpu_common(vcpu.as_mut(), mtrr).map_err(|e| boot_err(&e))?;
        if id == 0 {
            cpu::setup_boot_vcpu(vcpu.as_mut(), entry).map_err(|e| boot_err(&e))?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Create the backend VM on a helper thread (it waits on the kernel) while `meanwhile` runs.
fn create_vm<T>(
    hypervisor: &dyn Hypervisor,
    params: &VmParams,
    meanwhile: impl FnOnce() -> Result<T, Error>,
) -> Result<(Arc<dyn Vm>, T), Error> {
    std::thread::scope(|s| {
        let creating = std::thread::Builder::new()
            .name("create-vm".into())
            .spawn_scoped(s, || hypervisor.create_vm(params))
            .map_err(Error::Thread)?;
        let other = meanwhile();
        let vm = creating
            .join()
            .unwrap_or_else(|_| Err(vireo_hv::Error::Unsupported("VM creation".into())))?;
        Ok((vm, other?))
    })
}

impl Machine {
    /// Build the VM of `env.config` and start its vCPUs.
    pub fn boot(mut env: Env<'_>) -> Result<Machine, Error> {
        let cfg = env.config;
        let mem = create_memory(cfg)?;
        let irqchip = env
            .hypervisor
            .needs_user_irqchip()
            .then(|| IrqChip::new(cfg.cpus, GuestClock::default()));
        let params = VmParams {
            memory: mem.clone(),
            vcpus: cfg.cpus,
            user_irqchip: irqchip.clone().map(|c| c as Arc<dyn vireo_hv::UserIrqChip>),
            private_pages: layout::HV_PRIVATE_START,
        };
        // Creating the VM waits on the kernel (milliseconds on some hosts); load the guest
        // into memory meanwhile.
        let (vm, entry) = create_vm(env.hypervisor, &params, || load_guest(cfg, &mem))?;
        let vcpus = create_vcpus(cfg, vm.as_ref(), entry)?;
        Self::assemble(&mut env, mem, vm, irqchip, None, vcpus, false)
    }

    /// Rebuild the VM of a snapshot around `mem` (mapped from it) and restore every vCPU
    /// and device; the vCPUs stay parked (and the clock stopped) until [`Machine::resume`].
    pub fn restore(
        mut env: Env<'_>,
        state: &MachineState,
        mem: GuestMemory,
    ) -> Result<Machine, Error> {
        let cfg = env.config;
        let restore_err = |what: &str, e: &dyn std::fmt::Display| {
            Error::Devices(format!("restoring {what}: {e}"))
        };
        if state.vcpus.len() != cfg.cpus as usize {
            return Err(restore_err("vCPUs", &"the state's vCPU count differs"));
        }
        let irqchip = env
            .hypervisor
            .needs_user_irqchip()
            .then(|| IrqChip::new(cfg.cpus, GuestClock::default()));
        let params = VmParams {
            memory: mem.clone(),
            vcpus: cfg.cpus,
            user_irqchip: irqchip.clone().map(|c| c as Arc<dyn vireo_hv::UserIrqChip>),
            private_pages: layout::HV_PRIVATE_START,
        };
        let (vm, ()) = create_vm(env.hypervisor, &params, || Ok(()))?;
        vm.restore_state(&state.vm)?;
        match (&irqchip, &state.devices.irqchip) {
            (Some(chip), Some(s)) => chip.restore(s).map_err(|e| restore_err("irqchip", &e))?,
            (None, None) => {}
            _ => {
                return Err(restore_err(
                    "irqchip",
                    &"the snapshot is from another kind of backend",
                ))
            }
        }
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (id, s) in state.vcpus.iter().enumerate() {
            let mut v = vm.create_vcpu(id as u32)?;
            v.restore_state(s)?;
            vcpus.push(v);
        }
        Self::assemble(
            &mut env,
            mem,
            vm,
            irqchip,
            Some(&state.devices),
            vcpus,
            true,
        )
    }

    fn assemble(
        env: &mut Env<'_>,
        mem: GuestMemory,
        vm: Arc<dyn Vm>,
        irqchip: Option<Arc<IrqChip>>,
        saved: Option<&DevicesState>,
        vcpus: Vec<Box<dyn Vcpu>>,
        paused: bool,
    ) -> Result<Machine, Error> {
        let legacy = create_devices(env, vm.as_ref(), saved)?;
        let mut bus = legacy.bus;
        if let Some(chip) = &irqchip {
            chip.register(&mut bus).map_err(|e| dev_err(&e))?;
        }
        let backends = crate::pci::Backends {
            disks: env.disks,
            nets: &env.net.nets,
            vsock: env.net.vsock.as_ref(),
            emulated_cpu: env.hypervisor.emulated_cpu(),
        };
        let pci = crate::pci::PciDevices::create(&vm, &mem, env.config, &backends, &mut bus)?;
        if let Some(s) = saved {
            pci.restore(&s.virtio)?;
        }
        let bus = Arc::new(bus);
        pci.attach(&bus);
        env.handle.set_serial(Some(legacy.serial.clone()));
        let mut m = Machine {
            mem,
            vm,
            bus,
            pci,
            irqchip,
            serial: legacy.serial,
            i8042: legacy.i8042,
            cmos: legacy.cmos,
            power_button: legacy.power_button,
            serial_bytes: legacy.serial_bytes,
            park: Arc::new(Park {
                pause: AtomicBool::new(paused),
                epoch: AtomicU64::new(0),
                parked: Mutex::new(0),
                changed: Condvar::new(),
                throttle: AtomicU32::new(0),
            }),
            mailboxes: Vec::new(),
            threads: Vec::new(),
            counters: Vec::new(),
            paused,
        };
        m.start(vcpus, env.handle)?;
        if paused {
            m.wait_parked()?;
        }
        Ok(m)
    }

    /// Run every vCPU on its own thread.
    fn start(&mut self, vcpus: Vec<Box<dyn Vcpu>>, handle: &VmmHandle) -> Result<(), Error> {
        handle.set_kickers(vcpus.iter().map(|v| v.kicker()).collect());
        for vcpu in vcpus {
            let id = vcpu.id();
            let (tx, rx) = mpsc::channel();
            let counters = Arc::new(VcpuCounters::default());
            let (bus, handle2, park, c) = (
                self.bus.clone(),
                handle.clone(),
                self.park.clone(),
                counters.clone(),
            );
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A jailed VMM's vCPU threads run under their own seccomp filter.
                    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
                        handle2.stop(StopReason::Failure(e.to_string()));
                        return;
                    }
                    vcpu_loop(vcpu, &bus, &handle2, &park, &rx, &c)
                }) {
                Ok(t) => {
                    self.threads.push(t);
                    self.mailboxes.push(tx);
                    self.counters.push(counters);
                }
                Err(e) => {
                    handle.stop(StopReason::Failure("vCPU thread".into()));
                    return Err(Error::Thread(e));
                }
            }
        }
        handle.set_mailboxes(self.mailboxes.clone());
        Ok(())
    }

    /// What `info` and `counters` read.
    pub fn view(&self) -> MachineView {
        MachineView {
            bus: self.bus.clone(),
            vcpus: self.counters.clone(),
            virtio: self.pci.transports(),
            power_button: self.power_button.clone(),
            serial_bytes: self.serial_bytes.clone(),
        }
    }

    pub fn power_button(&self) -> &PowerButton {
        &self.power_button
    }

    fn wait_parked(&self) -> Result<(), Error> {
        let n = self.threads.len();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut parked = lock(&self.park.parked);
        while *parked < n {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Guest(format!(
                    "{} of {n} vCPUs did not stop within {PAUSE_TIMEOUT:?}",
                    n - *parked
                )));
            }
            parked = self
                .park
                .changed
                .wait_timeout(parked, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    fn send_resume(&self) {
        let epoch = self.park.epoch.load(Ordering::SeqCst);
        self.park.pause.store(false, Ordering::SeqCst);
        for m in &self.mailboxes {
            let _ = m.send(VcpuMsg::Resume(epoch));
        }
    }

    /// Stop the vCPUs, then the devices (after their requests in flight), then the clock.
    pub fn pause(&mut self, handle: &VmmHandle) -> Result<(), Error> {
        if self.paused {
            return Ok(());
        }
        self.park.epoch.fetch_add(1, Ordering::SeqCst);
        self.park.pause.store(true, Ordering::SeqCst);
        handle.kick_all();
        if let Err(e) = self.wait_parked() {
            self.send_resume();
            return Err(e);
        }
        if let Err(e) = self.pci.pause() {
            let _ = self.pci.resume();
            self.send_resume();
            return Err(e);
        }
        self.vm.pause_clock()?;
        self.paused = true;
        Ok(())
    }

    /// Undo [`Machine::pause`] (also the start of a restored machine).
    pub fn resume(&mut self) -> Result<(), Error> {
        if !self.paused {
            return Ok(());
        }
        self.vm.resume_clock()?;
        self.pci.resume()?;
        self.send_resume();
        self.paused = false;
        Ok(())
    }

    /// Everything but RAM, of this (paused) machine: every vCPU (read on its own thread),
    /// the backend's VM state and every device. `memory` is left empty for the caller.
    pub fn machine_state(&self, config: &VmConfig, backend: &str) -> Result<MachineState, Error> {
        if !self.paused {
            return Err(Error::Guest("the VM must be paused".into()));
        }
        let mut vcpus = Vec::with_capacity(self.mailboxes.len());
        for m in &self.mailboxes {
            let (tx, rx) = mpsc::channel();
            m.send(VcpuMsg::Save(tx))
                .map_err(|_| Error::Guest("a vCPU thread is gone".into()))?;
            let s = rx
                .recv_timeout(PAUSE_TIMEOUT)
                .map_err(|_| Error::Guest("a vCPU did not give its state".into()))??;
            vcpus.push(s);
        }
        let vm = self.vm.save_state()?;
        let devices = DevicesState {
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            cmos: lock(&self.cmos).state(),
            irqchip: self.irqchip.as_ref().map(|c| c.state()),
            virtio: self.pci.states(),
        };
        Ok(MachineState {
            id: snapshot::new_id(),
            config: config.clone(),
            backend: backend.to_string(),
            memory: Vec::new(),
            vm,
            vcpus,
            devices,
        })
    }

    /// Write a snapshot of this (paused) machine into `dir`.
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        config: &VmConfig,
        backend: &str,
    ) -> Result<MemoryStats, Error> {
        let mut state = self.machine_state(config, backend)?;
        let snap_err = |e: snapshot::SnapshotError| Error::Snapshot(e.to_string());
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Snapshot(format!("{}: {e}", dir.display())))?;
        let (memory, stats) =
            snapshot::write_memory(dir, &self.mem, &state.id).map_err(snap_err)?;
        state.memory = memory;
        snapshot::write_state(dir, &state).map_err(snap_err)?;
        Ok(stats)
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The backend's VM (dirty-page log).
    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    /// Auto-converge: make every vCPU sleep `percent` of each [`THROTTLE_PERIOD`] (the caller
    /// kicks them every period); 0 lets them run freely.
    pub fn set_throttle(&self, percent: u32) {
        self.park.throttle.store(percent.min(99), Ordering::Relaxed);
    }

    /// Stop every vCPU thread and wait for them; the devices' threads and the VM go with
    /// `self` (tear-down order: vCPUs, devices, VM, memory).
    pub fn teardown(mut self, handle: &VmmHandle) {
        handle.halt_vcpus();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        handle.set_kickers(Vec::new());
        handle.set_mailboxes(Vec::new());
        handle.set_serial(None);
        let Machine {
            mem, vm, pci, bus, ..
        } = self;
        drop(pci);
        drop(bus);
        drop(vm);
        drop(mem);
    }
}

fn vcpu_loop(
    mut vcpu: Box<dyn Vcpu>,
    bus: &IoBus,
    handle: &VmmHandle,
    park: &Park,
    mailbox: &Receiver<VcpuMsg>,
    c: &VcpuCounters,
) {
    let io = CountingIo { bus, c };
    loop {
        if handle.stopping() {
            return;
        }
        if park.pause.load(Ordering::SeqCst) {
            let epoch = park.epoch.load(Ordering::SeqCst);
            {
                let mut p = lock(&park.parked);
                *p += 1;
                park.changed.notify_all();
            }
            let go_on = loop {
                match mailbox.recv() {
                    Ok(VcpuMsg::Resume(e)) if e >= epoch => break true,
                    Ok(VcpuMsg::Resume(_)) => {}
                    Ok(VcpuMsg::Save(tx)) => {
                        let _ = tx.send(vcpu.save_state());
                    }
                    Ok(VcpuMsg::Exit) | Err(_) => break false,
                }
            };
            {
                let mut p = lock(&park.parked);
                *p -= 1;
                park.changed.notify_all();
            }
            if !go_on {
                return;
            }
            continue;
        }
        match vcpu.run(&io) {
            Ok(VmExit::Interrupted) => {
                c.interrupted.fetch_add(1, Ordering::Relaxed);
                let t = park.throttle.load(Ordering::Relaxed).min(99);
                if t > 0 && !park.pause.load(Ordering::SeqCst) && !handle.stopping() {
                    // Throttled (auto-converge): the throttler kicks every THROTTLE_PERIOD.
                    std::thread::sleep(THROTTLE_PERIOD * t / 100);
                }
            }
            Ok(VmExit::Hlt) => {
                c.hlt.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VmExit::Shutdown) => {
                c.shutdown.fetch_add(1, Ordering::Relaxed);
                tracing::info!("vCPU {}: triple fault, resetting", vcpu.id());
                handle.stop(StopReason::Reset);
            }
            Ok(VmExit::Reset) => {
                c.reset.fetch_add(1, Ordering::Relaxed);
                handle.stop(StopReason::Reset)
            }
            Ok(VmExit::PowerOff) => {
                c.power_off.fetch_add(1, Ordering::Relaxed);
                handle.stop(StopReason::PowerOff)
            }
            Err(e) => {
                handle.stop(StopReason::Failure(e.to_string()));
                return;
            }
        }
    }
}
