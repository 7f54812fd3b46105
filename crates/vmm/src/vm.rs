//! The VM's lifecycle: a state machine driven by the guest (power-off, reset, panic), the
//! user (signals, the console) and the control plane (commands from the API), all handled on
//! the thread that called [`Vmm::run`].
//!
//! ```text
//!   not-configured ──configure──▶ created ──boot──▶ running ◀──resume── paused
//!                                   ▲  │             │  ▲  ──pause──▶   │
//!                      configure ───┘  └─restore──▶ ─┘  └── reboot ─────┤
//!   (not-configured, created, stopped: restore → paused or running)     │
//!   running, paused ──power-off / guest power-off / failure──▶ stopped ◀┘
//! ```
//!
//! Every other request is refused with [`CommandErrorKind::Conflict`] and a message saying
//! what state the VM is in. `shutdown` presses the ACPI power button (running only): the guest
//! powers off when it has dealt with it. `snapshot` needs a paused VM (pause first; it is
//! refused while running, so a snapshot is always of a VM the caller stopped on purpose).
//!
//! State, configuration and counters are read from shared data without waiting for the main
//! thread or any vCPU: a request never queues behind a busy vCPU. Commands are carried out
//! one at a time on the main thread; a pause waits for the vCPUs (kicked at once) at most
//! ten seconds.

use std::collections::VecDeque;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vireo_devices::legacy::Serial;
use vireo_hv::{Hypervisor, Kicker};

use crate::config::{DiskConfig, VmConfig};
use crate::machine::{
    DeviceCounters, DeviceInfo, Env, Machine, MachineView, VcpuExitCounts, VcpuMsg,
};
use crate::migrate::{
    MigrateError, MigrateRequest, MigrationPhase, MigrationProgress, ReceiveRequest,
};
use crate::snapshot::{self, MachineState};
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
    /// The guest powered off (or was powered off).
    PowerOff,
    /// The guest reset and `no_reboot` was set.
    Reset,
    /// The guest kernel panicked (reported through pvpanic).
    Panic,
    /// SIGINT/SIGTERM.
    Signal(i32),
    /// The user quit from the console.
    ConsoleQuit,
    /// The control plane asked the VMM to exit.
    Exit,
    /// The VM was migrated away: it runs at the destination now.
    Migrated,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    /// Waiting for a configuration (started with only an API socket).
    NotConfigured,
    /// Configured, not booted.
    Created,
    Running,
    Paused,
    /// Powered off, failed, or stopped; with an API, a new configuration may follow.
    Stopped,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::NotConfigured => "not-configured",
            Lifecycle::Created => "created",
            Lifecycle::Running => "running",
            Lifecycle::Paused => "paused",
            Lifecycle::Stopped => "stopped",
        }
    }
}

/// What the control plane may ask.
#[derive(Debug, Clone)]
pub enum Command {
    Configure(Box<VmConfig>),
    Boot,
    Pause,
    Resume,
    /// Press the ACPI power button.
    Shutdown,
    /// Stop at once.
    PowerOff,
    Reboot,
    Snapshot(PathBuf),
    Restore(RestoreRequest),
    /// Live-migrate the running VM to another vireo (`migrate/`).
    Migrate(MigrateRequest),
    /// Wait for a VM migrated from another vireo.
    ReceiveMigration(ReceiveRequest),
    /// Leave `Vmm::run` (the process exits).
    Exit,
}

/// A restore: the snapshot directory and what may differ from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub snapshot: PathBuf,
    /// Replacement disks, in the snapshot's order (same count, same sizes); none: the
    /// snapshot's own paths.
    #[serde(default)]
    pub disks: Option<Vec<DiskConfig>>,
    /// Leave the restored VM paused.
    #[serde(default)]
    pub paused: bool,
}

/// What a finished command reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReply {
    pub state: Lifecycle,
    /// Snapshots: bytes of RAM and bytes written for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<snapshot::MemoryStats>,
    /// Migrations: the final statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
    /// How long the command took, in microseconds.
    pub micros: u64,
}

/// Why a command was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CommandErrorKind {
    /// The request does not fit the VM's state (HTTP 409).
    Conflict,
    /// The request itself is wrong: a bad configuration, a bad snapshot (HTTP 400).
    BadRequest,
    /// Carrying it out failed (HTTP 500).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub kind: CommandErrorKind,
    pub message: String,
}

impl CommandError {
    fn conflict(state: Lifecycle, what: &str, hint: &str) -> Self {
        CommandError {
            kind: CommandErrorKind::Conflict,
            message: format!("cannot {what}: the VM is {}{hint}", state.as_str()),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        CommandError {
            kind: CommandErrorKind::BadRequest,
            message: message.into(),
        }
    }
    fn failed(message: impl Into<String>) -> Self {
        CommandError {
            kind: CommandErrorKind::Failed,
            message: message.into(),
        }
    }
}

/// `info`: state, configuration, vCPUs and devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: Lifecycle,
    pub config: Option<VmConfig>,
    /// The backend running the VM (`kvm`, `emu`), once built.
    pub backend: Option<String>,
    pub vcpus: u32,
    pub devices: Vec<DeviceInfo>,
    /// Boots so far (a guest reboot or `reboot` counts one more).
    pub boots: u64,
    /// Why the VM last stopped, if it did.
    pub stop_reason: Option<String>,
}

/// `counters`: exits by reason per vCPU, accesses, requests and bytes per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub state: Lifecycle,
    pub vcpus: Vec<VcpuExitCounts>,
    pub devices: Vec<DeviceCounters>,
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

type Reply = Sender<Result<CommandReply, CommandError>>;

struct Control {
    reason: Mutex<Option<StopReason>>,
    /// Notified when a stop reason or a command arrives.
    changed: Condvar,
    commands: Mutex<VecDeque<(Command, Reply)>>,
    serial: Mutex<Option<Arc<Mutex<Serial>>>>,
    /// Set once a stop reason is known (or the main thread halts the vCPUs): vCPU threads
    /// leave their loop.
    stopping: AtomicBool,
    /// The running vCPUs, kicked as soon as a stop reason arrives.
    kickers: Mutex<Vec<Arc<dyn Kicker>>>,
    /// Mailboxes of the vCPU threads, told to exit when parked.
    mailboxes: Mutex<Vec<Sender<VcpuMsg>>>,
    lifecycle: Mutex<Lifecycle>,
    config: Mutex<Option<VmConfig>>,
    backend: Mutex<Option<String>>,
    view: Mutex<Option<Arc<MachineView>>>,
    boots: Mutex<u64>,
    last_stop: Mutex<Option<String>>,
    /// `run` returned: commands are refused.
    exited: AtomicBool,
    /// The statistics of the migration in progress, or of the last one.
    migration: Mutex<Option<MigrationProgress>>,
}

/// A thread-safe handle to a VMM: stop it, type into its console, send it commands, read its
/// state.
#[derive(Clone)]
pub struct VmmHandle(Arc<Control>);

impl VmmHandle {
    fn new(lifecycle: Lifecycle, config: Option<VmConfig>) -> Self {
        VmmHandle(Arc::new(Control {
            reason: Mutex::new(None),
            changed: Condvar::new(),
            commands: Mutex::new(VecDeque::new()),
            serial: Mutex::new(None),
            stopping: AtomicBool::new(false),
            kickers: Mutex::new(Vec::new()),
            mailboxes: Mutex::new(Vec::new()),
            lifecycle: Mutex::new(lifecycle),
            config: Mutex::new(config),
            backend: Mutex::new(None),
            view: Mutex::new(None),
            boots: Mutex::new(0),
            last_stop: Mutex::new(None),
            exited: AtomicBool::new(false),
            migration: Mutex::new(None),
        }))
    }

    /// Ask the VM to stop; the first reason given is kept. The vCPUs are kicked right away
    /// (also the calling one, when a device asks from a vCPU thread), so the guest executes
    /// nothing after a power-off or reset write.
    pub fn stop(&self, reason: StopReason) {
        let mut r = lock(&self.0.reason);
        if r.is_none() {
            *r = Some(reason);
            drop(r);
            self.halt_vcpus();
            self.0.changed.notify_all();
        }
    }

    /// Make every vCPU thread leave: running ones are kicked, parked ones told to exit.
    pub(crate) fn halt_vcpus(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
        self.kick_all();
        for m in lock(&self.0.mailboxes).iter() {
            let _ = m.send(VcpuMsg::Exit);
        }
    }

    pub(crate) fn kick_all(&self) {
        for k in lock(&self.0.kickers).iter() {
            k.kick();
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    pub(crate) fn set_kickers(&self, k: Vec<Arc<dyn Kicker>>) {
        *lock(&self.0.kickers) = k;
    }

    pub(crate) fn set_mailboxes(&self, m: Vec<Sender<VcpuMsg>>) {
        *lock(&self.0.mailboxes) = m;
    }

    pub(crate) fn set_serial(&self, s: Option<Arc<Mutex<Serial>>>) {
        *lock(&self.0.serial) = s;
    }

    /// Bytes typed on the console go to the guest's serial port.
    pub fn console_input(&self, bytes: &[u8]) {
        if let Some(serial) = lock(&self.0.serial).as_ref() {
            lock(serial).queue_input(bytes);
        }
    }

    /// Carry out `cmd` on the VMM's main thread and wait for the outcome. While a migration
    /// runs (on the main thread), commands are refused at once instead of waiting for it to
    /// end; `info`, `counters` and the migration's statistics are read without the main
    /// thread and answer throughout.
    pub fn command(&self, cmd: Command) -> Result<CommandReply, CommandError> {
        if let Some(p) = self.migration().filter(|p| {
            matches!(
                p.phase,
                MigrationPhase::Connecting | MigrationPhase::Copying | MigrationPhase::StopAndCopy
            )
        }) {
            return Err(CommandError::conflict(
                self.state(),
                "do that",
                &format!(
                    ": it is being migrated to {} (round {}); wait for the migration to end",
                    p.destination, p.round
                ),
            ));
        }
        let (tx, rx) = mpsc::channel();
        {
            let mut q = lock(&self.0.commands);
            if self.0.exited.load(Ordering::SeqCst) {
                return Err(CommandError::conflict(
                    self.state(),
                    "do that",
                    ": the VMM is exiting",
                ));
            }
            q.push_back((cmd, tx));
        }
        self.0.changed.notify_all();
        rx.recv()
            .unwrap_or_else(|_| Err(CommandError::failed("the VMM stopped before answering")))
    }

    /// The migration in progress (updated after every round), or the last one.
    pub fn migration(&self) -> Option<MigrationProgress> {
        lock(&self.0.migration).clone()
    }

    /// True once a stop reason is known.
    fn stop_pending(&self) -> bool {
        lock(&self.0.reason).is_some()
    }

    /// The lifecycle state now.
    pub fn state(&self) -> Lifecycle {
        *lock(&self.0.lifecycle)
    }

    fn set_state(&self, s: Lifecycle) {
        *lock(&self.0.lifecycle) = s;
    }

    /// State, configuration, vCPUs and devices.
    pub fn info(&self) -> VmInfo {
        let config = lock(&self.0.config).clone();
        let view = lock(&self.0.view).clone();
        VmInfo {
            state: self.state(),
            vcpus: config.as_ref().map_or(0, |c| c.cpus),
            config,
            backend: lock(&self.0.backend).clone(),
            devices: view.map(|v| v.devices()).unwrap_or_default(),
            boots: *lock(&self.0.boots),
            stop_reason: lock(&self.0.last_stop).clone(),
        }
    }

    /// Exits by reason and device counters of the machine now (empty when none runs).
    pub fn counters(&self) -> Counters {
        let view = lock(&self.0.view).clone();
        Counters {
            state: self.state(),
            vcpus: view.as_ref().map(|v| v.vcpu_counts()).unwrap_or_default(),
            devices: view.as_ref().map(|v| v.device_counts()).unwrap_or_default(),
        }
    }

    fn next_event(&self) -> Event {
        let mut q = lock(&self.0.commands);
        loop {
            if let Some(r) = lock(&self.0.reason).clone() {
                return Event::Stop(r);
            }
            if let Some((c, reply)) = q.pop_front() {
                return Event::Command(c, reply);
            }
            q = self
                .0
                .changed
                .wait(q)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Forget the stop reason so a new machine can run.
    fn clear_reason(&self) {
        *lock(&self.0.reason) = None;
        self.0.stopping.store(false, Ordering::SeqCst);
    }

    /// After the main thread halted the vCPUs itself: running is allowed again unless a stop
    /// reason arrived meanwhile.
    fn rearm(&self) {
        let r = lock(&self.0.reason);
        self.0.stopping.store(r.is_some(), Ordering::SeqCst);
    }

    fn finish(&self) {
        let mut q = lock(&self.0.commands);
        self.0.exited.store(true, Ordering::SeqCst);
        for (_, reply) in q.drain(..) {
            let _ = reply.send(Err(CommandError {
                kind: CommandErrorKind::Conflict,
                message: "the VMM is exiting".into(),
            }));
        }
    }
}

enum Event {
    Stop(StopReason),
    Command(Command, Reply),
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

/// What `run` starts with.
enum Start {
    Boot,
    Wait,
    Restore(Box<(MachineState, PathBuf, bool)>),
    /// Wait for incoming migrations on the listener until one succeeds.
    Receive(TcpListener),
}

/// A VMM: one VM over its lifecycle.
pub struct Vmm {
    config: Option<VmConfig>,
    hypervisor: Option<Box<dyn Hypervisor>>,
    output: SharedOutput,
    handle: VmmHandle,
    /// Disk images, open and locked while configured (`crate::pci`).
    disks: Vec<Arc<vireo_virtio::DiskImage>>,
    /// TAP devices and the vsock socket, open while configured (`crate::net`).
    net: crate::net::NetBackends,
    /// Stay in `stopped` (for the API) instead of returning when the VM stops.
    keep_alive: bool,
    start: Start,
    /// The statistics of a migration command just finished, for its reply.
    migration_reply: Option<MigrationProgress>,
    /// The VM left by live migration.
    migrated: bool,
}

/// Open the backend for `config` (`select_hypervisor`) and check the vCPU count.
fn backend_for(config: &VmConfig) -> Result<Box<dyn Hypervisor>, Error> {
    let sel = crate::select_hypervisor(config.accel)?;
    if let Some(note) = &sel.note {
        tracing::info!("{note}");
    }
    Ok(sel.hypervisor)
}

fn check(config: &VmConfig, hypervisor: &dyn Hypervisor) -> Result<(), Error> {
    let max = hypervisor.max_vcpus();
    if config.cpus > max {
        return Err(crate::config::ConfigError::TooManyCpus {
            given: config.cpus,
            max,
            backend: hypervisor.name(),
        }
        .into());
    }
    Ok(())
}

impl Vmm {
    /// A VMM that boots `config` when run (and returns when the VM stops).
    pub fn new(
        mut config: VmConfig,
        hypervisor: Box<dyn Hypervisor>,
        output: Box<dyn Write + Send>,
    ) -> Result<Self, Error> {
        vireo_arch::loader::check_kernel(&config.kernel)?;
        check(&config, hypervisor.as_ref())?;
        let disks = crate::pci::open_disks(&config)?;
        let net = crate::net::NetBackends::open(&mut config)?;
        Ok(Vmm {
            disks,
            net,
            handle: VmmHandle::new(Lifecycle::Created, Some(config.clone())),
            config: Some(config),
            hypervisor: Some(hypervisor),
            output: SharedOutput(Arc::new(Mutex::new(output))),
            keep_alive: false,
            start: Start::Boot,
            migration_reply: None,
            migrated: false,
        })
    }

    /// A VMM that waits for commands (a configuration, a restore) and stays alive when its VM
    /// stops, until told to exit.
    pub fn waiting(output: Box<dyn Write + Send>) -> Self {
        Vmm {
            disks: Vec::new(),
            net: crate::net::NetBackends::default(),
            handle: VmmHandle::new(Lifecycle::NotConfigured, None),
            config: None,
            hypervisor: None,
            output: SharedOutput(Arc::new(Mutex::new(output))),
            keep_alive: true,
            start: Start::Wait,
            migration_reply: None,
            migrated: false,
        }
    }

    /// A VMM that waits for a VM migrated to `listener` (`vireo migrate receive`), runs it,
    /// and returns when it stops. A failed or refused incoming migration is logged and the
    /// next connection is awaited.
    pub fn receiving(listener: TcpListener, output: Box<dyn Write + Send>) -> Self {
        let mut vmm = Vmm::waiting(output);
        vmm.keep_alive = false;
        vmm.start = Start::Receive(listener);
        vmm
    }

    /// A VMM that restores the snapshot in `req.snapshot` when run. The snapshot is read and
    /// checked here, before anything is created: a truncated, corrupted or other-version one
    /// is refused with the reason.
    pub fn from_snapshot(
        req: &RestoreRequest,
        output: Box<dyn Write + Send>,
    ) -> Result<Self, Error> {
        let mut vmm = Vmm::waiting(output);
        vmm.keep_alive = false;
        let (state, hypervisor, disks, net, config) =
            prepare_restore(req).map_err(|e| Error::Snapshot(e.message))?;
        vmm.disks = disks;
        vmm.net = net;
        vmm.hypervisor = Some(hypervisor);
        vmm.config = Some(config.clone());
        *lock(&vmm.handle.0.config) = Some(config);
        vmm.handle.set_state(Lifecycle::Created);
        vmm.start = Start::Restore(Box::new((state, req.snapshot.clone(), req.paused)));
        Ok(vmm)
    }

    pub fn handle(&self) -> VmmHandle {
        self.handle.clone()
    }

    /// Run until the VM stops for good (or, for a waiting VMM, until told to exit).
    pub fn run(mut self) -> Result<ExitReason, Error> {
        let r = self.main_loop();
        self.handle.finish();
        r
    }

    fn main_loop(&mut self) -> Result<ExitReason, Error> {
        let mut machine: Option<Machine> = None;
        match std::mem::replace(&mut self.start, Start::Wait) {
            Start::Boot => machine = Some(self.boot()?),
            Start::Wait => {}
            Start::Restore(r) => {
                let (state, dir, paused) = *r;
                machine = Some(self.restore_machine(&state, &dir, paused)?);
            }
            Start::Receive(listener) => loop {
                match self.accept_migration(&listener) {
                    Ok(m) => {
                        machine = Some(m);
                        break;
                    }
                    Err(e) if self.handle.stop_pending() => {
                        tracing::debug!("incoming migration: {e}");
                        break;
                    }
                    Err(e) => tracing::error!("incoming migration failed: {e}"),
                }
            },
        }
        loop {
            match self.handle.next_event() {
                Event::Stop(reason) => {
                    if let Some(m) = machine.take() {
                        self.retire(m);
                    }
                    let no_reboot = self.config.as_ref().is_some_and(|c| c.no_reboot);
                    if reason == StopReason::Reset && !no_reboot {
                        tracing::info!("guest reset: restarting the VM");
                        self.handle.clear_reason();
                        machine = Some(self.boot()?);
                        continue;
                    }
                    *lock(&self.handle.0.last_stop) = Some(format!("{reason:?}"));
                    self.handle.set_state(crate::vm::Lifecycle::Stopped);
                    let exit = match reason {
                        StopReason::PowerOff => ExitReason::PowerOff,
                        StopReason::Reset => ExitReason::Reset,
                        StopReason::Panic => ExitReason::Panic,
                        StopReason::Signal(s) => return Ok(ExitReason::Signal(s)),
                        StopReason::ConsoleQuit => return Ok(ExitReason::ConsoleQuit),
                        StopReason::Failure(e) if !self.keep_alive => return Err(Error::Guest(e)),
                        StopReason::Failure(e) => {
                            tracing::error!("the VM failed: {e}");
                            ExitReason::PowerOff
                        }
                    };
                    if !self.keep_alive {
                        return Ok(exit);
                    }
                    self.handle.clear_reason();
                }
                Event::Command(cmd, reply) => {
                    let exit = matches!(cmd, Command::Exit);
                    let start = Instant::now();
                    let r = self.command(cmd, &mut machine).map(|memory| CommandReply {
                        state: self.handle.state(),
                        memory,
                        migration: None,
                        micros: start.elapsed().as_micros() as u64,
                    });
                    let r = r.map(|mut reply| {
                        reply.migration = self.migration_reply.take();
                        reply
                    });
                    let _ = reply.send(r);
                    if exit {
                        if let Some(m) = machine.take() {
                            self.retire(m);
                        }
                        return Ok(ExitReason::Exit);
                    }
                    if !self.keep_alive && self.handle.state() == Lifecycle::Stopped {
                        return Ok(if self.migrated {
                            ExitReason::Migrated
                        } else {
                            ExitReason::PowerOff
                        });
                    }
                }
            }
        }
    }

    /// Tear a machine down (its vCPUs are told to stop if they were not).
    fn retire(&self, m: Machine) {
        *lock(&self.handle.0.view) = None;
        m.teardown(&self.handle);
        self.handle.rearm();
    }

    fn env(&self) -> Result<Env<'_>, Error> {
        let config = self
            .config
            .as_ref()
            .ok_or_else(|| Error::Boot("no configuration".into()))?;
        let hypervisor = self
            .hypervisor
            .as_deref()
            .ok_or_else(|| Error::Boot("no backend".into()))?;
        Ok(Env {
            config,
            hypervisor,
            output: Box::new(self.output.clone()),
            handle: &self.handle,
            disks: &self.disks,
            net: &self.net,
        })
    }

    fn publish(&self, m: &Machine) {
        *lock(&self.handle.0.view) = Some(Arc::new(m.view()));
        *lock(&self.handle.0.backend) = self.hypervisor.as_ref().map(|h| h.name().to_string());
        *lock(&self.handle.0.boots) += 1;
        *lock(&self.handle.0.last_stop) = None;
    }

    fn boot(&self) -> Result<Machine, Error> {
        let m = Machine::boot(self.env()?)?;
        self.publish(&m);
        self.handle.set_state(Lifecycle::Running);
        Ok(m)
    }

    fn restore_machine(
        &self,
        state: &MachineState,
        dir: &Path,
        paused: bool,
    ) -> Result<Machine, Error> {
        let mem = snapshot::map_memory(dir, state).map_err(|e| Error::Snapshot(e.to_string()))?;
        let mut m = Machine::restore(self.env()?, state, mem)?;
        self.publish(&m);
        self.handle.set_state(Lifecycle::Paused);
        if !paused {
            m.resume()?;
            self.handle.set_state(Lifecycle::Running);
        }
        tracing::info!(
            "restored from {}: {}",
            dir.display(),
            self.handle.state().as_str()
        );
        Ok(m)
    }

    fn command(
        &mut self,
        cmd: Command,
        machine: &mut Option<Machine>,
    ) -> Result<Option<snapshot::MemoryStats>, CommandError> {
        use Lifecycle::*;
        let state = self.handle.state();
        let failed = |e: Error| CommandError::failed(e.to_string());
        match cmd {
            Command::Configure(config) => {
                if !matches!(state, NotConfigured | Created | Stopped) {
                    return Err(CommandError::conflict(
                        state,
                        "configure",
                        "; power it off first",
                    ));
                }
                config
                    .validate(crate::config::host_memory())
                    .map_err(|e| CommandError::bad(e.to_string()))?;
                vireo_arch::loader::check_kernel(&config.kernel)
                    .map_err(|e| CommandError::bad(e.to_string()))?;
                let hypervisor =
                    backend_for(&config).map_err(|e| CommandError::bad(e.to_string()))?;
                check(&config, hypervisor.as_ref())
                    .map_err(|e| CommandError::bad(e.to_string()))?;
                // The old disks are let go first: the new configuration may name the same.
                self.disks.clear();
                self.net = crate::net::NetBackends::default();
                self.disks = crate::pci::open_disks(&config)
                    .map_err(|e| CommandError::bad(e.to_string()))?;
                let mut config = config;
                self.net = crate::net::NetBackends::open(&mut config)
                    .map_err(|e| CommandError::bad(e.to_string()))?;
                *lock(&self.handle.0.config) = Some((*config).clone());
                self.config = Some(*config);
                self.hypervisor = Some(hypervisor);
                self.handle.set_state(Created);
                Ok(None)
            }
            Command::Boot => {
                if state != Created {
                    return Err(CommandError::conflict(
                        state,
                        "boot",
                        match state {
                            NotConfigured => "; configure it first",
                            Stopped => "; configure it again to boot a new VM",
                            _ => "",
                        },
                    ));
                }
                *machine = Some(self.boot().map_err(failed)?);
                Ok(None)
            }
            Command::Pause => {
                let Some(m) = machine.as_mut().filter(|_| state == Running) else {
                    return Err(CommandError::conflict(state, "pause", ""));
                };
                m.pause(&self.handle).map_err(failed)?;
                self.handle.set_state(Paused);
                Ok(None)
            }
            Command::Resume => {
                let Some(m) = machine.as_mut().filter(|_| state == Paused) else {
                    return Err(CommandError::conflict(state, "resume", ""));
                };
                m.resume().map_err(failed)?;
                self.handle.set_state(Running);
                Ok(None)
            }
            Command::Shutdown => {
                let Some(m) = machine.as_ref().filter(|_| state == Running) else {
                    return Err(CommandError::conflict(
                        state,
                        "press the power button",
                        if state == Paused {
                            "; resume it first"
                        } else {
                            ""
                        },
                    ));
                };
                m.power_button().press();
                Ok(None)
            }
            Command::PowerOff => {
                let Some(m) = machine.take().filter(|_| matches!(state, Running | Paused)) else {
                    return Err(CommandError::conflict(state, "power off", ""));
                };
                self.retire(m);
                *lock(&self.handle.0.last_stop) = Some("PowerOff (requested)".into());
                self.handle.set_state(Stopped);
                Ok(None)
            }
            Command::Reboot => {
                let Some(m) = machine.take().filter(|_| matches!(state, Running | Paused)) else {
                    return Err(CommandError::conflict(state, "reboot", ""));
                };
                self.retire(m);
                match self.boot() {
                    Ok(m) => {
                        *machine = Some(m);
                        Ok(None)
                    }
                    Err(e) => {
                        self.handle.set_state(Stopped);
                        Err(failed(e))
                    }
                }
            }
            Command::Snapshot(dir) => {
                let Some(m) = machine.as_ref().filter(|_| state == Paused) else {
                    return Err(CommandError::conflict(
                        state,
                        "snapshot",
                        if state == Running {
                            "; pause it first"
                        } else {
                            ""
                        },
                    ));
                };
                let (Some(config), Some(h)) = (&self.config, &self.hypervisor) else {
                    return Err(CommandError::failed("no configuration"));
                };
                m.snapshot(&dir, config, h.name()).map(Some).map_err(failed)
            }
            Command::Restore(req) => {
                if !matches!(state, NotConfigured | Created | Stopped) {
                    return Err(CommandError::conflict(
                        state,
                        "restore",
                        "; power it off first",
                    ));
                }
                self.disks.clear();
                self.net = crate::net::NetBackends::default();
                let (ms, hypervisor, disks, net, config) = prepare_restore(&req)?;
                self.disks = disks;
                self.net = net;
                self.hypervisor = Some(hypervisor);
                *lock(&self.handle.0.config) = Some(config.clone());
                self.config = Some(config);
                match self.restore_machine(&ms, &req.snapshot, req.paused) {
                    Ok(m) => {
                        *machine = Some(m);
                        Ok(None)
                    }
                    Err(e) => {
                        self.handle.set_state(Stopped);
                        Err(failed(e))
                    }
                }
            }
            Command::Migrate(req) => {
                let Some(m) = machine.as_mut().filter(|_| state == Running) else {
                    return Err(CommandError::conflict(
                        state,
                        "migrate",
                        if state == Paused {
                            "; resume it first"
                        } else {
                            ""
                        },
                    ));
                };
                let (Some(config), Some(h)) = (&self.config, &self.hypervisor) else {
                    return Err(CommandError::failed("no configuration"));
                };
                let handle = self.handle.clone();
                let progress = move |p: &MigrationProgress| {
                    *lock(&handle.0.migration) = Some(p.clone());
                };
                let r = crate::migrate::source::migrate(
                    crate::migrate::source::Source {
                        machine: m,
                        handle: &self.handle,
                        config,
                        backend: h.name(),
                        disks: &self.disks,
                        progress: &progress,
                    },
                    &req,
                );
                match r {
                    Ok(p) => {
                        tracing::info!(
                            "migrated to {}: {} ms, downtime {} ms",
                            req.to,
                            p.elapsed_ms,
                            p.downtime_ms.unwrap_or(0)
                        );
                        if let Some(m) = machine.take() {
                            self.retire(m);
                        }
                        // The destination holds the disks and the network now: the TAPs
                        // (and the vsock socket) are released at once, not when this
                        // process exits.
                        self.disks.clear();
                        self.net = crate::net::NetBackends::default();
                        *lock(&self.handle.0.last_stop) = Some(format!("migrated to {}", req.to));
                        self.handle.set_state(Stopped);
                        self.migrated = true;
                        self.migration_reply = Some(p);
                        Ok(None)
                    }
                    Err(e @ MigrateError::InDoubt(_)) => {
                        self.handle.set_state(Paused);
                        Err(CommandError::failed(format!(
                            "migration to {}: {e}",
                            req.to
                        )))
                    }
                    Err(e) => Err(CommandError::failed(format!(
                        "migration to {} failed (the VM runs on here): {e}",
                        req.to
                    ))),
                }
            }
            Command::ReceiveMigration(req) => {
                if !matches!(state, NotConfigured | Created | Stopped) {
                    return Err(CommandError::conflict(
                        state,
                        "receive a migration",
                        "; power it off first",
                    ));
                }
                let listener = TcpListener::bind(&req.listen)
                    .map_err(|e| CommandError::bad(format!("listening on {}: {e}", req.listen)))?;
                let m = self
                    .accept_migration(&listener)
                    .map_err(|e| CommandError::failed(format!("incoming migration: {e}")))?;
                *machine = Some(m);
                Ok(None)
            }
            Command::Exit => Ok(None),
        }
    }

    /// Wait for one connection on `listener` (giving up when a stop reason arrives) and
    /// receive the VM it brings.
    fn accept_migration(&mut self, listener: &TcpListener) -> Result<Machine, MigrateError> {
        let io = |what| move |source| MigrateError::Io { what, source };
        listener.set_nonblocking(true).map_err(io("listening"))?;
        let stream = loop {
            match listener.accept() {
                Ok((s, peer)) => {
                    tracing::info!("incoming migration from {peer}");
                    break s;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.handle.stop_pending() {
                        return Err(MigrateError::Vmm("stopped while waiting".into()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(io("accepting")(e)),
            }
        };
        stream.set_nonblocking(false).map_err(io("accepting"))?;
        let before = self.handle.state();
        let mut dest = Incoming { vmm: self, before };
        crate::migrate::dest::receive(stream, &mut dest)
    }
}

/// The VMM as the destination of a migration.
struct Incoming<'a> {
    vmm: &'a mut Vmm,
    before: Lifecycle,
}

impl crate::migrate::dest::Destination for Incoming<'_> {
    fn accept(&mut self, offer: &crate::migrate::Offer) -> Result<vireo_hv::GuestMemory, String> {
        let mut config = offer.config.clone();
        config.accel = match offer.backend.as_str() {
            "kvm" => crate::config::Accel::Kvm,
            "emu" => crate::config::Accel::Emu,
            other => return Err(format!("unknown backend {other:?}")),
        };
        config
            .validate(crate::config::host_memory())
            .map_err(|e| e.to_string())?;
        let hypervisor = backend_for(&config).map_err(|e| e.to_string())?;
        if hypervisor.name() != offer.backend {
            return Err(format!(
                "the VM runs on {}, which is not available here",
                offer.backend
            ));
        }
        check(&config, hypervisor.as_ref()).map_err(|e| e.to_string())?;
        let mem = crate::machine::create_memory(&config).map_err(|e| e.to_string())?;
        self.vmm.disks.clear();
        // The network devices re-attach to the TAPs of the same names in this host's (this
        // process's) network namespace, opened or created, with the migrated MAC addresses
        // and queue counts (`build`). Tried here once, before any page is copied, so that a
        // TAP that cannot be opened (busy, no permission) refuses the offer while the guest
        // still runs at the source; then let go until the source has paused the guest, so
        // that a multi-queue TAP shared with the source on one host does not take frames
        // from the running guest during the copy.
        self.vmm.net = crate::net::NetBackends::default();
        drop(crate::net::NetBackends::open(&mut config).map_err(|e| e.to_string())?);
        self.vmm.hypervisor = Some(hypervisor);
        *lock(&self.vmm.handle.0.config) = Some(config.clone());
        self.vmm.config = Some(config);
        Ok(mem)
    }

    fn build(
        &mut self,
        state: &MachineState,
        mem: vireo_hv::GuestMemory,
    ) -> Result<Machine, String> {
        let mut config = self.vmm.config.clone().ok_or("no configuration")?;
        if state.vcpus.len() != config.cpus as usize || state.config.memory != config.memory {
            return Err("the state does not match the offered configuration".into());
        }
        // The source flushed and released the disks before it sent the state.
        self.vmm.disks = crate::pci::open_disks(&config).map_err(|e| e.to_string())?;
        // The TAPs (see `accept`). The restored virtio-net devices set the offloads the guest
        // negotiated on them and ask the guest to announce itself (`PciDevices::restore`).
        self.vmm.net = crate::net::NetBackends::open(&mut config).map_err(|e| e.to_string())?;
        let m = Machine::restore(self.vmm.env().map_err(|e| e.to_string())?, state, mem)
            .map_err(|e| e.to_string())?;
        self.vmm.publish(&m);
        self.vmm.handle.set_state(Lifecycle::Paused);
        Ok(m)
    }

    fn start(&mut self, m: &mut Machine) -> Result<(), String> {
        m.resume().map_err(|e| e.to_string())?;
        self.vmm.handle.set_state(Lifecycle::Running);
        tracing::info!("migrated VM running");
        Ok(())
    }

    fn discard(&mut self, m: Machine) {
        self.vmm.retire(m);
        self.vmm.disks.clear();
        self.vmm.net = crate::net::NetBackends::default();
        self.vmm.handle.set_state(self.before);
    }

    fn release(&mut self) {
        self.vmm.disks.clear();
        self.vmm.net = crate::net::NetBackends::default();
    }
}

/// A checked snapshot, ready to be built: its state, backend, open disks, configuration.
type Prepared = (
    MachineState,
    Box<dyn Hypervisor>,
    Vec<Arc<vireo_virtio::DiskImage>>,
    crate::net::NetBackends,
    VmConfig,
);

/// Read and check a snapshot, open its disks (or their replacements), its TAPs and vsock
/// socket, and its backend.
fn prepare_restore(req: &RestoreRequest) -> Result<Prepared, CommandError> {
    let bad = |e: &dyn std::fmt::Display| CommandError::bad(e.to_string());
    let state = snapshot::read_state(&req.snapshot).map_err(|e| bad(&e))?;
    // The memory file is checked (header, id, size) before anything is built.
    snapshot::check_memory(&req.snapshot, &state).map_err(|e| bad(&e))?;
    let mut config = state.config.clone();
    if let Some(disks) = &req.disks {
        if disks.len() != config.disks.len() {
            return Err(CommandError::bad(format!(
                "the snapshot has {} disks; {} were given",
                config.disks.len(),
                disks.len()
            )));
        }
        config.disks = disks.clone();
    }
    let accel = match state.backend.as_str() {
        "kvm" => crate::config::Accel::Kvm,
        "emu" => crate::config::Accel::Emu,
        other => {
            return Err(CommandError::bad(format!(
                "unknown backend {other:?} in the snapshot"
            )))
        }
    };
    config.accel = accel;
    let hypervisor = backend_for(&config).map_err(|e| bad(&e))?;
    if hypervisor.name() != state.backend {
        return Err(CommandError::bad(format!(
            "the snapshot is of a VM on {}, which is not available here",
            state.backend
        )));
    }
    check(&config, hypervisor.as_ref()).map_err(|e| bad(&e))?;
    let disks = crate::pci::open_disks(&config).map_err(|e| bad(&e))?;
    // The TAPs are opened again by name (created if gone), with the snapshot's MACs; vsock
    // connections do not survive (the guest is told with a transport reset).
    let net = crate::net::NetBackends::open(&mut config).map_err(|e| bad(&e))?;
    Ok((state, hypervisor, disks, net, config))
}
