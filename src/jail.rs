//! `vireo run --jail`: the VMM run inside a jail.
//!
//! This process resolves everything that needs the host (the default guest, the accelerator),
//! then forks the VMM into a jail (`vireo_jail::spawn_fn`: the jailed child calls the VMM
//! directly, no `execve`) whose root is an empty tmpfs holding only the files the VM reads and
//! the devices it opens, the files under `/vm`. The jail allows the union of the VMM's
//! per-thread seccomp lists; inside, each thread installs its own. This process stays outside
//! as the jail's parent: it forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT, restores the terminal if
//! the VMM could not, removes the jail's cgroups, and exits with the VMM's status.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use vireo_jail::{Exit, JailSpec, Limits, Mount, Root, SignalForwarding, Violation};
use vireo_vmm::config::{Accel, VmConfig};

/// The uid and gid a jailed VMM runs as by default (`nobody`/`nogroup`).
pub const DEFAULT_ID: u32 = 65534;

/// Where the VM's files appear inside the jail.
const VM_DIR: &str = "/vm";

/// `--jail` options.
pub struct JailOptions {
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
    /// The API socket: bound here, outside the jail, and handed to the jailed VMM (which
    /// can then neither create sockets nor write to the host's file system).
    pub api_socket: Option<PathBuf>,
}

/// The host paths a VM configuration names, each with the path it gets inside the jail, and
/// the configuration rewritten to use the inside paths. New path fields of `VmConfig` (disks,
/// sockets, ...) belong here.
fn expose_paths(config: &VmConfig) -> (VmConfig, Vec<(PathBuf, PathBuf)>) {
    let mut inside = config.clone();
    let mut binds = Vec::new();
    let mut expose = |host: &Path, name: &str| -> PathBuf {
        let target = Path::new(VM_DIR).join(name);
        binds.push((host.to_path_buf(), target.clone()));
        target
    };
    inside.kernel = expose(&config.kernel, "kernel");
    if let Some(initrd) = &config.initrd {
        inside.initrd = Some(expose(initrd, "initrd"));
    }
    for (i, disk) in inside.disks.iter_mut().enumerate() {
        disk.path = expose(&disk.path, &format!("disk{i}"));
    }
    (inside, binds)
}

/// Checks that the jail's uid/gid may open `path` (read, and write unless `read_only`) by its
/// mode bits: the jailed VMM has no capability to override them, and the error is clearer
/// here than from inside.
fn check_access(path: &Path, read_only: bool, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot use {}", path.display()))?;
    let mode = meta.mode();
    let bits = if meta.uid() == uid {
        mode >> 6
    } else if meta.gid() == gid {
        mode >> 3
    } else {
        mode
    } & 0o7;
    let need = if read_only { 0o4 } else { 0o6 };
    if bits & need != need {
        bail!(
            "{} is not {} by uid {uid} / gid {gid}, which the jailed VMM runs as: change its \
             owner or mode, or pick --uid/--gid",
            path.display(),
            if read_only {
                "readable"
            } else {
                "readable and writable"
            }
        );
    }
    Ok(())
}

fn saved_terminal() -> Option<libc::termios> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return None;
    }
    // SAFETY: all-zero is a valid termios; tcgetattr fills it for fd 0.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a termios.
    (unsafe { libc::tcgetattr(0, &mut t) } == 0).then_some(t)
}

fn restore_terminal(t: &libc::termios) {
    // SAFETY: restoring settings read from the same descriptor.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
}

/// The jail for a VMM running `inside` (a configuration already rewritten to inside paths).
pub fn vmm_jail_spec(
    name: &str,
    inside: &VmConfig,
    binds: &[(PathBuf, PathBuf)],
    opts: &JailOptions,
) -> Result<JailSpec> {
    let mut spec = JailSpec::new(name, vec!["vireo-vmm".into()]);
    spec.root = Root::Tmpfs { size: 1 << 20 };
    spec.hostname = "vireo-vmm".into();
    for (host, target) in binds {
        // Disks the guest may write are bind-mounted writable; everything else read-only.
        let writable = inside
            .disks
            .iter()
            .any(|d| &d.path == target && !d.readonly);
        spec.mounts.push(Mount::Bind {
            source: host.clone(),
            target: target.clone(),
            read_only: !writable,
        });
    }
    if inside.accel == Accel::Kvm {
        spec.mounts.push(Mount::Device {
            source: "/dev/kvm".into(),
            target: "/dev/kvm".into(),
        });
    }
    spec.uid = opts.uid;
    spec.gid = opts.gid;
    spec.limits = opts.limits.clone();
    spec.seccomp = Some((vireo_vmm::seccomp::process_list()?, Violation::Trap));
    Ok(spec)
}

pub fn run_jailed(mut config: VmConfig, opts: &JailOptions) -> Result<ExitCode> {
    if !vireo_jail::is_root() {
        bail!("--jail needs root: namespaces, cgroups and pivot_root need CAP_SYS_ADMIN");
    }
    // Decide `auto` out here, where /sys is visible: the jail has no /sys, and `auto` must
    // pick the same backend jailed as not. (An explicit choice is checked inside.)
    if config.accel == Accel::Auto {
        let backend = vireo_vmm::select_hypervisor(config.accel)?;
        if let Some(note) = &backend.note {
            eprintln!("vireo: {note}");
        }
        config.accel = match backend.hypervisor.name() {
            "kvm" => Accel::Kvm,
            _ => Accel::Emu,
        };
    }
    // Every vCPU is a thread; so are main, console, signals and VM creation, each virtio
    // device's worker, and the API's thread and its blocking-task thread.
    let threads = u64::from(config.cpus)
        + 4
        + config.disks.len() as u64
        + u64::from(config.rng)
        + if opts.api_socket.is_some() { 2 } else { 0 };
    if let Some(p) = opts.limits.pids_max {
        if p < threads {
            bail!(
                "--cgroup pids={p} is too low for {} vCPUs: the VMM needs at least {threads} \
                 (one thread per vCPU and per virtio device, plus 4, plus 2 for the API)",
                config.cpus
            );
        }
    }
    if let Some(m) = opts.limits.memory_max {
        if m < config.memory.0 {
            tracing::warn!(
                "the jail's memory limit ({}) is below the guest's memory ({}): the VMM is \
                 killed if the guest uses it all",
                vireo_jail::cgroup::fmt_size(m),
                config.memory
            );
        }
    }
    let (inside, binds) = expose_paths(&config);
    for (host, target) in &binds {
        let read_only = !inside
            .disks
            .iter()
            .any(|d| &d.path == target && !d.readonly);
        check_access(host, read_only, opts.uid, opts.gid)?;
    }
    let name = format!("vm-{}", std::process::id());
    let mut spec = vmm_jail_spec(&name, &inside, &binds, opts)?;
    // The API socket is bound out here and passed in as a descriptor.
    let api = match &opts.api_socket {
        Some(path) => Some(ApiSocket::bind(path)?),
        None => None,
    };

    let terminal = saved_terminal();
    let fwd = SignalForwarding::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT]);
    // The child's copy of the listener keeps its descriptor number through the jail.
    let listener = match &api {
        Some(a) => Some(a.listener.try_clone().context("the API socket")?),
        None => None,
    };
    if let Some(l) = &listener {
        spec.pass_fds.push(l.as_raw_fd());
    }
    let mut child = vireo_jail::spawn_fn(&spec, move || vmm_inside(inside, listener))
        .context("starting the jailed VMM")?;
    tracing::info!(pid = child.pid(), "jailed VMM running");
    let exit = child.wait_forwarding(&fwd)?;
    drop(fwd);
    if let Some(t) = &terminal {
        restore_terminal(t);
    }
    let seccomp_status = vireo_vmm::seccomp::EXIT_SECCOMP;
    match exit {
        Exit::Code(c) if c == seccomp_status => {
            bail!("the jailed VMM was stopped by its seccomp filter (see the line above)")
        }
        Exit::Signal(libc::SIGSYS) => {
            bail!("the jailed VMM made a system call its jail forbids and was killed (SIGSYS)")
        }
        Exit::Signal(libc::SIGKILL)
            if child
                .final_stats()
                .and_then(|s| s.oom_kills)
                .is_some_and(|n| n > 0) =>
        {
            bail!("the jailed VMM was killed by the OOM killer: raise --cgroup mem=")
        }
        other => Ok(ExitCode::from(other.shell_status().clamp(0, 255) as u8)),
    }
}

/// The API socket bound outside the jail: removed when dropped.
struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds `path` like the API server does: a stale socket file is replaced, a live one
    /// refused.
    fn bind(path: &Path) -> Result<ApiSocket> {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "API socket {}: something is already listening there",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("API socket {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("API socket {}", path.display()))?;
        Ok(ApiSocket {
            listener,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The VMM in the jailed child; returns the process's exit status.
fn vmm_inside(config: VmConfig, api: Option<UnixListener>) -> i32 {
    let status = match crate::run::run_jailed_vmm(config, api) {
        Ok(code) => i32::from(code),
        Err(e) => {
            crate::console::restore_terminal();
            eprintln!("vireo: error: {e:#}");
            1
        }
    };
    // The child leaves with _exit: flush what the console wrote.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_paths_move_under_vm_dir() {
        let mut c = VmConfig::new("/boot/vmlinuz-x");
        c.initrd = Some("/tmp/i.cpio".into());
        let (inside, binds) = expose_paths(&c);
        assert_eq!(inside.kernel, PathBuf::from("/vm/kernel"));
        assert_eq!(inside.initrd, Some(PathBuf::from("/vm/initrd")));
        assert_eq!(
            binds,
            [
                (
                    PathBuf::from("/boot/vmlinuz-x"),
                    PathBuf::from("/vm/kernel")
                ),
                (PathBuf::from("/tmp/i.cpio"), PathBuf::from("/vm/initrd")),
            ]
        );
        assert_eq!(inside.cmdline, c.cmdline);
    }

    #[test]
    fn jail_spec_exposes_only_what_the_vm_needs() {
        let mut c = VmConfig::new("/vm/kernel");
        c.accel = Accel::Kvm;
        let binds = vec![(PathBuf::from("/etc/hostname"), PathBuf::from("/vm/kernel"))];
        let opts = JailOptions {
            uid: 1000,
            gid: 1000,
            limits: Limits::default(),
            api_socket: None,
        };
        let s = vmm_jail_spec("vm-test", &c, &binds, &opts).unwrap();
        assert!(matches!(s.root, Root::Tmpfs { .. }));
        let targets: Vec<_> = s.mounts.iter().map(|m| m.target().to_path_buf()).collect();
        assert_eq!(
            targets,
            [PathBuf::from("/vm/kernel"), PathBuf::from("/dev/kvm")]
        );
        assert_eq!((s.uid, s.gid), (1000, 1000));
        assert!(s.keep_caps.names().is_empty());
        let (list, violation) = s.seccomp.as_ref().unwrap();
        assert_eq!(*violation, Violation::Trap);
        assert!(!list.allows("execve", [0; 6]));
        assert!(!list.allows("mount", [0; 6]));
    }
}
