//! `vireo run`: flags → `VmConfig` → a running VM on this terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use vireo_vmm::config::{Accel, ByteSize, VmConfig};
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
    /// Number of vCPUs (1 to 254), each a host thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest RAM, like 256M or 2G (a bare number means MiB).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: ByteSize,
    /// Accelerator: kvm (hardware-assisted), emu (vireo's x86-64 emulator), or auto (KVM when
    /// it is usable and hardware-backed, else the emulator).
    #[arg(long, value_name = "ACCEL", default_value = "auto")]
    accel: Accel,
    /// Exit (status 0) when the guest reboots instead of restarting it.
    #[arg(long)]
    no_reboot: bool,
    /// Run the VMM in a jail: new namespaces, a root holding only the kernel, initrd and
    /// /dev/kvm, no capabilities, an unprivileged uid/gid and per-thread seccomp filters
    /// (needs root).
    #[arg(long)]
    jail: bool,
    /// With --jail: the uid the VMM runs as.
    #[arg(long, value_name = "UID", default_value_t = crate::jail::DEFAULT_ID, requires = "jail")]
    uid: u32,
    /// With --jail: the gid the VMM runs as.
    #[arg(long, value_name = "GID", default_value_t = crate::jail::DEFAULT_ID, requires = "jail")]
    gid: u32,
    /// With --jail: cgroup limits for the VMM process, like mem=512M,pids=64,cpu=0.5
    /// (also swap=, weight=, cpuset=).
    #[arg(long, value_name = "LIMITS", requires = "jail", value_parser = parse_limits)]
    cgroup: Option<vireo_jail::Limits>,
    /// With the default guest: run this command in the guest instead of a shell, then power
    /// off (e.g. `vireo run -- uname -a`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_limits(s: &str) -> std::result::Result<vireo_jail::Limits, String> {
    vireo_jail::Limits::parse_list(s)
}

/// Build the configuration: the default guest unless a kernel was given.
fn config_from(args: &RunArgs) -> Result<VmConfig> {
    let mut config = match &args.kernel {
        Some(kernel) => {
            if !args.command.is_empty() {
                bail!("a command after `--` runs in the default guest; drop --kernel to use it");
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
            if !args.command.is_empty() {
                let param = default_guest::command_param(&args.command)
                    .context("passing the command to the guest")?;
                c.cmdline.push(' ');
                c.cmdline.push_str(&param);
            }
            c
        }
    };
    config.cpus = args.cpus;
    config.memory = args.memory;
    config.accel = args.accel;
    config.no_reboot = args.no_reboot;
    Ok(config)
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let config = config_from(&args)?;
    config.validate(vireo_vmm::config::host_memory())?;
    vireo_arch::loader::check_kernel(&config.kernel)?;
    if args.jail {
        let opts = crate::jail::JailOptions {
            uid: args.uid,
            gid: args.gid,
            limits: args.cgroup.unwrap_or_default(),
        };
        return crate::jail::run_jailed(config, &opts);
    }
    run_vm(config, false)
}

/// Run the VM of `config` on this terminal until it stops.
pub fn run_vm(config: VmConfig, jailed: bool) -> Result<ExitCode> {
    run_vm_status(config, jailed).map(ExitCode::from)
}

/// [`run_vm`] returning the exit status as a number. `jailed`: this process is the VMM inside
/// a jail (`vireo run --jail`); every thread installs its seccomp filter.
pub fn run_vm_status(config: VmConfig, jailed: bool) -> Result<u8> {
    use vireo_vmm::seccomp::{self, ThreadKind};
    if jailed {
        seccomp::enable()?;
    }
    let backend = vireo_vmm::select_hypervisor(config.accel)?;
    if let Some(note) = &backend.note {
        eprintln!("vireo: {note}");
    }
    let vmm = Vmm::new(config, backend.hypervisor, Box::new(std::io::stdout()))?;
    let handle = vmm.handle();

    // SIGINT/SIGTERM stop the VM: the handler only records the signal and wakes a thread.
    let signals = signals::install().context("installing signal handlers")?;
    {
        let handle = handle.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Err(e) = seccomp::apply(ThreadKind::Device) {
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
                if let Err(e) = seccomp::apply(ThreadKind::Device) {
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
    match result? {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::ConsoleQuit => Ok(0),
        ExitReason::Panic => {
            eprintln!("vireo: the guest kernel panicked");
            Ok(EXIT_GUEST_PANIC)
        }
        ExitReason::Signal(sig) => Ok(128u8.wrapping_add(sig as u8)),
    }
}
