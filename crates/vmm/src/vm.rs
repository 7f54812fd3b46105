//! One VM's life: build, run the vCPU threads, wait for a stop reason, tear down; repeat on a
//! guest reset unless `no_reboot`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use vireo_arch::{acpi, boot, cpu, cpuid, layout, loader};
use vireo_devices::legacy::{AcpiPm, Cmos, PvPanic, Serial, I8042};
use vireo_devices::{EventSink, IoBus, PlatformEvent};
use vireo_hv::{GuestMemory, Hypervisor, Kicker, Vcpu, Vm, VmExit, VmParams};
use vm_memory::GuestAddress;

use crate::config::VmConfig;
use crate::Error;

/// Why a VM stops (the first reason wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    PowerOff,
    Reset,
    Panic,
    Signal(i32),
    ConsoleQuit,
    Failure(String),
}

/// How `Vmm::run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest reset and `no_reboot` was set.
    Reset,
    /// The guest kernel panicked (reported through pvpanic).
    Panic,
    /// SIGINT/SIGTERM.
    Signal(i32),
    /// The user quit from the console.
    ConsoleQuit,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Control {
    reason: Mutex<Option<StopReason>>,
    changed: Condvar,
    serial: Mutex<Option<Arc<Mutex<Serial>>>>,
    /// Set once a stop reason is known: vCPU threads leave their loop.
    stopping: AtomicBool,
    /// The running vCPUs, kicked as soon as a stop reason arrives.
    kickers: Mutex<Vec<Arc<dyn Kicker>>>,
}

/// A thread-safe handle to a running VMM: stop it, type into its console.
#[derive(Clone)]
pub struct VmmHandle(Arc<Control>);

impl VmmHandle {
    /// Ask the VM to stop; the first reason given is kept. The vCPUs are kicked right away
    /// (also the calling one, when a device asks from a vCPU thread), so the guest executes
    /// nothing after a power-off or reset write.
    pub fn stop(&self, reason: StopReason) {
        let mut r = lock(&self.0.reason);
        if r.is_none() {
            *r = Some(reason);
            self.0.stopping.store(true, Ordering::SeqCst);
            for k in lock(&self.0.kickers).iter() {
                k.kick();
            }
            self.0.changed.notify_all();
        }
    }

    /// Bytes typed on the console go to the guest's serial port.
    pub fn console_input(&self, bytes: &[u8]) {
        if let Some(serial) = lock(&self.0.serial).as_ref() {
            lock(serial).queue_input(bytes);
        }
    }

    fn wait(&self) -> StopReason {
        let mut r = lock(&self.0.reason);
        loop {
            if let Some(reason) = r.as_ref() {
                return reason.clone();
            }
            r = self
                .0
                .changed
                .wait(r)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Forget a `Reset` so the next boot can run (other reasons stay and stop it at once).
    fn clear_reset(&self) {
        let mut r = lock(&self.0.reason);
        if *r == Some(StopReason::Reset) {
            *r = None;
            self.0.stopping.store(false, Ordering::SeqCst);
        }
    }
}

/// Serial output that outlives each boot (a reboot builds a new UART on the same sink).
#[derive(Clone)]
struct SharedOutput(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// A VMM for one VM configuration.
pub struct Vmm {
    config: VmConfig,
    hypervisor: Box<dyn Hypervisor>,
    output: SharedOutput,
    handle: VmmHandle,
}

impl Vmm {
    /// Check `config` against the backend; nothing is created yet.
    pub fn new(
        config: VmConfig,
        hypervisor: Box<dyn Hypervisor>,
        output: Box<dyn Write + Send>,
    ) -> Result<Self, Error> {
        loader::check_kernel(&config.kernel)?;
        let max = hypervisor.max_vcpus();
        if config.cpus > max {
            return Err(crate::config::ConfigError::TooManyCpus {
                given: config.cpus,
                max,
                backend: hypervisor.name(),
            }
            .into());
        }
        Ok(Vmm {
            config,
            hypervisor,
            output: SharedOutput(Arc::new(Mutex::new(output))),
            handle: VmmHandle(Arc::new(Control {
                reason: Mutex::new(None),
                changed: Condvar::new(),
                serial: Mutex::new(None),
                stopping: AtomicBool::new(false),
                kickers: Mutex::new(Vec::new()),
            })),
        })
    }

    pub fn handle(&self) -> VmmHandle {
        self.handle.clone()
    }

    /// Boot and run until the VM stops for good.
    pub fn run(self) -> Result<ExitReason, Error> {
        loop {
            let reason = self.boot_once()?;
            match reason {
                StopReason::PowerOff => return Ok(ExitReason::PowerOff),
                StopReason::Reset if self.config.no_reboot => return Ok(ExitReason::Reset),
                StopReason::Reset => {
                    tracing::info!("guest reset: restarting the VM");
                    self.handle.clear_reset();
                }
                StopReason::Panic => return Ok(ExitReason::Panic),
                StopReason::Signal(s) => return Ok(ExitReason::Signal(s)),
                StopReason::ConsoleQuit => return Ok(ExitReason::ConsoleQuit),
                StopReason::Failure(e) => return Err(Error::Guest(e)),
            }
        }
    }

    fn boot_once(&self) -> Result<StopReason, Error> {
        let cfg = &self.config;
        let mem = create_memory(cfg)?;
        let params = VmParams {
            memory: mem.clone(),
            vcpus: cfg.cpus,
            user_irqchip: None,
            private_pages: layout::HV_PRIVATE_START,
        };
        // Creating the VM waits on the kernel (milliseconds on some hosts); load the guest
        // into memory meanwhile.
        let (vm, entry) = std::thread::scope(|s| {
            let creating = std::thread::Builder::new()
                .name("create-vm".into())
                .spawn_scoped(s, || self.hypervisor.create_vm(&params))
                .map_err(Error::Thread)?;
            let entry = load_guest(cfg, &mem);
            let vm = creating
                .join()
                .unwrap_or_else(|_| Err(vireo_hv::Error::Unsupported("VM creation".into())))?;
            Ok::<_, Error>((vm, entry?))
        })?;
        let bus = self.create_devices(vm.as_ref())?;
        let vcpus = create_vcpus(cfg, vm.as_ref(), entry)?;
        let reason = self.run_vcpus(vcpus, Arc::new(bus));
        *lock(&self.handle.0.serial) = None;
        // Tear-down order: vCPUs (joined in run_vcpus), then the VM, then guest memory.
        drop(vm);
        drop(mem);
        reason
    }

    fn create_devices(&self, vm: &dyn Vm) -> Result<IoBus, Error> {
        let dev_err = |e: &dyn std::fmt::Display| Error::Devices(e.to_string());
        let handle = self.handle.clone();
        let events: EventSink = Arc::new(move |e| {
            handle.stop(match e {
                PlatformEvent::PowerOff => StopReason::PowerOff,
                PlatformEvent::Reset => StopReason::Reset,
                PlatformEvent::Panic => StopReason::Panic,
            })
        });
        let mut bus = IoBus::new();
        let serial = Arc::new(Mutex::new(Serial::new(
            vm.irq_line(layout::COM1_IRQ)?,
            Box::new(self.output.clone()),
        )));
        bus.pio
            .insert(layout::COM1_PORT as u64, 8, serial.clone())
            .map_err(|e| dev_err(&e))?;
        *lock(&self.handle.0.serial) = Some(serial);
        bus.pio
            .insert(
                layout::I8042_DATA_PORT as u64,
                5,
                Arc::new(Mutex::new(
                    I8042::new(events.clone())
                        .with_kbd_irq(vm.irq_line(layout::KBD_IRQ)?)
                        .with_aux_irq(vm.irq_line(layout::AUX_IRQ)?),
                )),
            )
            .map_err(|e| dev_err(&e))?;
        let mem = self.config.memory.0;
        bus.pio
            .insert(
                layout::CMOS_PORT as u64,
                2,
                Arc::new(Mutex::new(Cmos::new(
                    layout::low_ram_end(mem),
                    mem.saturating_sub(layout::MMIO_HOLE_START),
                ))),
            )
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
        Ok(bus)
    }

    /// Run every vCPU on its own thread until a stop reason arrives, then stop and join them.
    fn run_vcpus(&self, vcpus: Vec<Box<dyn Vcpu>>, bus: Arc<IoBus>) -> Result<StopReason, Error> {
        let control = &self.handle.0;
        *lock(&control.kickers) = vcpus.iter().map(|v| v.kicker()).collect();
        let mut threads = Vec::with_capacity(vcpus.len());
        let mut spawn_error = None;
        for vcpu in vcpus {
            let id = vcpu.id();
            let (bus, handle) = (bus.clone(), self.handle.clone());
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A jailed VMM's vCPU threads run under their own seccomp filter.
                    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
                        handle.stop(StopReason::Failure(e.to_string()));
                        return;
                    }
                    vcpu_loop(vcpu, &bus, &handle)
                }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    self.handle.stop(StopReason::Failure("vCPU thread".into()));
                    break;
                }
            }
        }
        let reason = self.handle.wait();
        for t in threads {
            let _ = t.join();
        }
        lock(&control.kickers).clear();
        match spawn_error {
            Some(e) => Err(Error::Thread(e)),
            None => Ok(reason),
        }
    }
}

fn vcpu_loop(mut vcpu: Box<dyn Vcpu>, bus: &IoBus, handle: &VmmHandle) {
    while !handle.0.stopping.load(Ordering::SeqCst) {
        match vcpu.run(bus) {
            Ok(VmExit::Interrupted) | Ok(VmExit::Hlt) => {}
            Ok(VmExit::Shutdown) => {
                tracing::info!("vCPU {}: triple fault, resetting", vcpu.id());
                handle.stop(StopReason::Reset);
            }
            Ok(VmExit::Reset) => handle.stop(StopReason::Reset),
            Ok(VmExit::PowerOff) => handle.stop(StopReason::PowerOff),
            Err(e) => {
                handle.stop(StopReason::Failure(e.to_string()));
                return;
            }
        }
    }
}

fn create_memory(cfg: &VmConfig) -> Result<GuestMemory, Error> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(cfg.memory.0)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| Error::Memory {
        size: cfg.memory,
        reason: e.to_string(),
    })
}

/// Kernel, initrd, ACPI tables, boot page tables and zero page. Returns the entry point.
fn load_guest(cfg: &VmConfig, mem: &GuestMemory) -> Result<u64, Error> {
    let boot_err = |e: &dyn std::fmt::Display| Error::Boot(e.to_string());
    let kernel = loader::load_kernel(mem, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(path) => Some(loader::load_initrd(
            mem,
            path,
            cfg.memory.0,
            kernel.end,
            kernel.setup_header.as_ref(),
        )?),
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
