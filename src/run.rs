//! `vireo run`: flags → `VmConfig` → a running VM on this terminal.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use vireo_vmm::config::{Accel, ByteSize, DiskConfig, VmConfig};
use vireo_vmm::net::{NetConfig, VsockConfig};
use vireo_vmm::{ExitReason, StopReason, Vmm};

use crate::{console, signals};

/// Exit status when the guest kernel panics.
pub const EXIT_GUEST_PANIC: u8 = 2;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest kernel: a bzImage or an ELF vmlinux. Without it, vireo boots its default guest
    /// (Debian's cloud kernel and a busybox initramfs, built on first use).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (initramfs) for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default guest's).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs (1 to 254), each a host thread [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest RAM, like 256M or 2G (a bare number means MiB) [default: 256M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<ByteSize>,
    /// Accelerator: kvm (hardware-assisted), emu (vireo's x86-64 emulator), or auto (KVM when
    /// it is usable and hardware-backed, else the emulator) [default: auto].
    #[arg(long, value_name = "ACCEL")]
    accel: Option<Accel>,
    /// Exit (status 0) when the guest reboots instead of restarting it.
    #[arg(long)]
    no_reboot: bool,
    /// Run the VMM in a jail: new namespaces, a root holding only the kernel, initrd and
    /// /dev/kvm, no capabilities, an unprivileged uid/gid and per-thread seccomp filters
    /// (needs root).
    #[arg(long)]
    jail: bool,
    #[command(flatten)]
    ids: crate::jail::JailArgs,
    /// With --jail: a directory the jailed VMM may write snapshots under (bind-mounted
    /// writable at the same path; `vireo ctl snapshot DIR/NAME`). It must be writable by
    /// --uid/--gid.
    #[arg(long, value_name = "DIR", requires = "jail")]
    snapshot_dir: Option<PathBuf>,
    /// A virtio-blk disk: a raw image file or a block device. Repeatable: the first is the
    /// guest's /dev/vda, the second /dev/vdb, ... `readonly=on` refuses the guest's writes;
    /// `serial=STR` (up to 20 bytes) is the disk's ID; `direct=on` bypasses the host page
    /// cache. A disk another process has open read-write is refused.
    #[arg(
        long = "disk",
        value_name = "path=FILE[,readonly=on][,serial=STR][,direct=on]"
    )]
    disks: Vec<DiskConfig>,
    /// With the default guest: boot from an ext4 root disk at PATH (`root=/dev/vda`) instead
    /// of staying in the initramfs. A missing PATH is created as a fresh copy of the default
    /// root image (busybox tree); an existing one is used as it is, so its contents persist.
    #[arg(long, value_name = "PATH")]
    root_disk: Option<PathBuf>,
    /// No virtio-rng entropy device (by default the guest gets one, fed from the host's
    /// getrandom).
    #[arg(long)]
    no_rng: bool,
    /// A virtio-net NIC on host TAP device NAME, opened if it exists, else created (needs
    /// CAP_NET_ADMIN). Repeatable: the first is the guest's eth0. `mac=` sets its address
    /// (random otherwise), `queues=N` gives N queue pairs on a multi-queue TAP, `host-ip=`
    /// addresses the TAP on the host and brings it up; with the default guest, `ip=` and `gw=`
    /// configure the guest's interface.
    #[arg(
        long = "net",
        value_name = "tap=NAME[,mac=MAC][,queues=N][,host-ip=A/P][,ip=A/P][,gw=A]"
    )]
    nets: Vec<NetConfig>,
    /// A virtio-vsock device with guest context ID N; the host side is the Unix socket PATH:
    /// connect to it and write `CONNECT <port>\n` to reach a guest port; the guest's
    /// connections to host port P go to the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<VsockConfig>,
    /// Serve the REST API on this Unix socket (`vireo ctl --api-socket PATH ...`). Given
    /// alone, vireo boots nothing and waits for a configuration over the API.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// The VM's configuration as a JSON file (the API's VmConfig); no other VM flag may be
    /// given with it.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "accel", "no_reboot", "disks",
        "root_disk", "no_rng", "nets", "vsock", "command",
    ])]
    config: Option<PathBuf>,
    /// With the default guest: run this command in the guest instead of a shell, then power
    /// off (e.g. `vireo run -- uname -a`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

pub fn parse_limits(s: &str) -> std::result::Result<vireo_jail::Limits, String> {
    vireo_jail::Limits::parse_list(s)
}

impl RunArgs {
    /// True when no flag describes a VM (only, perhaps, an API socket).
    fn describes_no_vm(&self) -> bool {
        self.kernel.is_none()
            && self.initrd.is_none()
            && self.cmdline.is_none()
            && self.cpus.is_none()
            && self.memory.is_none()
            && self.accel.is_none()
            && !self.no_reboot
            && self.disks.is_empty()
            && self.root_disk.is_none()
            && !self.no_rng
            && self.nets.is_empty()
            && self.vsock.is_none()
            && self.command.is_empty()
            && self.config.is_none()
    }
}

/// Read a VmConfig from a JSON file; errors name the file and the field.
pub fn read_config_file(path: &std::path::Path) -> Result<VmConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("configuration {}", path.display()))
}

/// Build the configuration: the default guest unless a kernel was given.
fn config_from(args: &RunArgs) -> Result<VmConfig> {
    if let Some(path) = &args.config {
        return read_config_file(path);
    }
    let mut config = match &args.kernel {
        Some(kernel) => {
            if !args.command.is_empty() {
                bail!("a command after `--` runs in the default guest; drop --kernel to use it");
            }
            if let Some(n) = args.nets.iter().find(|n| n.ip.is_some()) {
                bail!(
                    "--net tap={},ip=... configures the default guest; with --kernel, configure \
                     the address inside your guest",
                    n.tap
                );
            }
            if args.root_disk.is_some() {
                bail!("--root-disk is the default guest's root disk; drop --kernel to use it, or pass your disk with --disk");
            }
            let mut c = VmConfig::new(kernel);
            c.initrd = args.initrd.clone();
            c.cmdline = args
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 panic=-1".to_string());
            c
        }
        None => {
            use vireo_guests::default_guest;
            let cache = default_guest::cache_dir().context("locating the cache directory")?;
            let guest = default_guest::ensure(&cache, &default_guest::Options::default())
                .context("preparing the default guest")?;
            let mut c = VmConfig::new(&guest.kernel);
            c.initrd = Some(args.initrd.clone().unwrap_or(guest.initrd.clone()));
            c.cmdline = args.cmdline.clone().unwrap_or(guest.cmdline.clone());
            for (i, n) in args.nets.iter().enumerate() {
                if let Some(p) = n.guest_param(i) {
                    c.cmdline.push(' ');
                    c.cmdline.push_str(&p);
                }
            }
            if let Some(path) = &args.root_disk {
                let created = !path.exists();
                default_guest::root_disk(&cache, &guest, path)
                    .with_context(|| format!("preparing the root disk {}", path.display()))?;
                // A root disk made just now for a jailed VMM belongs to the jail's ids (an
                // existing one is left as it is: vireo checks it is usable before starting).
                if created && args.jail {
                    std::os::unix::fs::chown(path, Some(args.ids.uid), Some(args.ids.gid))
                        .with_context(|| format!("handing {} to the jail", path.display()))?;
                }
                c.disks.push(DiskConfig::new(path));
                c.cmdline.push_str(" root=/dev/vda");
            }
            if !args.command.is_empty() {
                let param = default_guest::command_param(&args.command)
                    .context("passing the command to the guest")?;
                c.cmdline.push(' ');
                c.cmdline.push_str(&param);
            }
            c
        }
    };
    config.cpus = args.cpus.unwrap_or(1);
    config.memory = args.memory.unwrap_or(ByteSize(256 << 20));
    config.accel = args.accel.unwrap_or_default();
    config.no_reboot = args.no_reboot;
    config.disks.extend(args.disks.iter().cloned());
    config.rng = !args.no_rng;
    config.nets = args.nets.clone();
    config.vsock = args.vsock.clone();
    Ok(config)
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let api_socket = args.api_socket.clone();
    if api_socket.is_some() && args.describes_no_vm() {
        if args.jail {
            bail!(
                "--jail needs the VM on the command line or in --config: a VM configured later \
                 over the API would name files the jail does not hold"
            );
        }
        return serve(
            Vmm::waiting(Box::new(std::io::stdout())),
            api_socket.as_deref(),
        );
    }
    let config = config_from(&args)?;
    config.validate(vireo_vmm::config::host_memory())?;
    vireo_arch::loader::check_kernel(&config.kernel)?;
    if args.jail {
        // TAPs and the vsock socket are opened outside the jail and handed in (src/jail.rs).
        let snapshot_dir = match &args.snapshot_dir {
            Some(d) => Some(
                std::fs::canonicalize(d)
                    .with_context(|| format!("--snapshot-dir {}", d.display()))?,
            ),
            None => None,
        };
        let opts = args.ids.options(api_socket, snapshot_dir);
        return crate::jail::run_jailed(config, &opts);
    }
    let backend = vireo_vmm::select_hypervisor(config.accel)?;
    if let Some(note) = &backend.note {
        eprintln!("vireo: {note}");
    }
    let vmm = Vmm::new(config, backend.hypervisor, Box::new(std::io::stdout()))?;
    serve(vmm, api_socket.as_deref())
}

/// The VMM inside a jail (`vireo run --jail`): every thread installs its seccomp filter, and
/// the API (if any) serves on `api`, a socket bound outside the jail. Returns the exit status.
pub fn run_jailed_vmm(config: VmConfig, api: Option<UnixListener>) -> Result<u8> {
    vireo_vmm::seccomp::enable()?;
    let backend = vireo_vmm::select_hypervisor(config.accel)?;
    if let Some(note) = &backend.note {
        eprintln!("vireo: {note}");
    }
    let vmm = Vmm::new(config, backend.hypervisor, Box::new(std::io::stdout()))?;
    let api = match api {
        Some(listener) => Some(
            vireo_api::server::ApiServer::from_listener(listener, vmm.handle())
                .context("starting the API")?,
        ),
        None => None,
    };
    serve_status(vmm, api)
}

/// Run `vmm` on this terminal (signals, console) with the API on `api_socket` if given, and
/// turn how it ended into the exit status.
pub fn serve(vmm: Vmm, api_socket: Option<&std::path::Path>) -> Result<ExitCode> {
    // The API runs only when asked for: without a socket no runtime or thread is started.
    let api = match api_socket {
        Some(path) => Some(
            vireo_api::server::ApiServer::start(path, vmm.handle()).context("starting the API")?,
        ),
        None => None,
    };
    serve_status(vmm, api).map(ExitCode::from)
}

/// [`serve`] with the API already started, returning the exit status as a number. In a
/// jailed VMM (after `seccomp::enable`) each thread installs its seccomp filter.
pub fn serve_status(vmm: Vmm, mut api: Option<vireo_api::server::ApiServer>) -> Result<u8> {
    use vireo_vmm::seccomp::{self, ThreadKind};
    let handle = vmm.handle();
    // SIGINT/SIGTERM stop the VM: the handler only records the signal and wakes a thread.
    let signals = signals::install().context("installing signal handlers")?;
    {
        let handle = handle.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Err(e) = seccomp::apply(ThreadKind::Console) {
                    handle.stop(StopReason::Failure(e.to_string()));
                    return;
                }
                if let Some(sig) = signals.wait() {
                    handle.stop(StopReason::Signal(sig));
                }
            })
            .context("starting the signal thread")?;
    }

    console::enter_raw_mode();
    {
        let handle = handle.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                if let Err(e) = seccomp::apply(ThreadKind::Console) {
                    handle.stop(StopReason::Failure(e.to_string()));
                    return;
                }
                let quit = handle.clone();
                console::input_loop(
                    |bytes| handle.console_input(bytes),
                    move || quit.stop(StopReason::ConsoleQuit),
                );
            })
            .context("starting the console thread")?;
    }

    // The main thread's filter goes on last: the threads above are not bound by it, the vCPU
    // threads it starts are (their lists are subsets of its list).
    seccomp::apply(ThreadKind::Vmm)?;
    let result = vmm.run();
    console::restore_terminal();
    if let Some(api) = api.as_mut() {
        api.stop();
    }
    match result? {
        ExitReason::PowerOff
        | ExitReason::Reset
        | ExitReason::ConsoleQuit
        | ExitReason::Exit
        | ExitReason::Migrated => Ok(0),
        ExitReason::Panic => {
            eprintln!("vireo: the guest kernel panicked");
            Ok(EXIT_GUEST_PANIC)
        }
        ExitReason::Signal(sig) => Ok(128u8.wrapping_add(sig as u8)),
    }
}
