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
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use vireo_jail::{Exit, JailSpec, Limits, Mount, Root, SignalForwarding, Violation};
use vireo_virtio::{Tap, VsockBackend};
use vireo_vmm::config::{Accel, VmConfig};
use vireo_vmm::RestoreRequest;

/// The uid and gid a jailed VMM runs as by default (`nobody`/`nogroup`).
pub const DEFAULT_ID: u32 = 65534;

/// Where the VM's files appear inside the jail.
const VM_DIR: &str = "/vm";

/// `--jail` options.
/// `--uid`, `--gid` and `--cgroup`, shared by `vireo run --jail` and `vireo restore --jail`.
#[derive(clap::Args, Debug, Clone)]
pub struct JailArgs {
    /// With --jail: the uid the VMM runs as.
    #[arg(long, value_name = "UID", default_value_t = DEFAULT_ID, requires = "jail")]
    pub uid: u32,
    /// With --jail: the gid the VMM runs as.
    #[arg(long, value_name = "GID", default_value_t = DEFAULT_ID, requires = "jail")]
    pub gid: u32,
    /// With --jail: cgroup limits for the VMM process, like mem=512M,pids=64,cpu=0.5
    /// (also swap=, weight=, cpuset=).
    #[arg(long, value_name = "LIMITS", requires = "jail", value_parser = crate::run::parse_limits)]
    pub cgroup: Option<Limits>,
}

impl JailArgs {
    /// The jail's options, with the API socket to hand in and the snapshot directory.
    pub fn options(
        &self,
        api_socket: Option<PathBuf>,
        snapshot_dir: Option<PathBuf>,
    ) -> JailOptions {
        JailOptions {
            uid: self.uid,
            gid: self.gid,
            limits: self.cgroup.clone().unwrap_or_default(),
            api_socket,
            snapshot_dir,
        }
    }
}

pub struct JailOptions {
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
    /// The API socket: bound here, outside the jail, and handed to the jailed VMM (which
    /// can then neither create sockets nor write to the host's file system).
    pub api_socket: Option<PathBuf>,
    /// A host directory bind-mounted writable at the same path inside the jail, so that
    /// `vireo ctl snapshot DIR/NAME` can write a snapshot from the jailed VMM (the jail's
    /// root is otherwise read-only to it). Absolute and canonical.
    pub snapshot_dir: Option<PathBuf>,
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

/// The rwx bits of `path` that apply to `uid`/`gid` (owner, group or other; no capability
/// overrides them inside the jail).
fn access_bits(path: &Path, uid: u32, gid: u32) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot use {}", path.display()))?;
    let mode = meta.mode();
    Ok(if meta.uid() == uid {
        mode >> 6
    } else if meta.gid() == gid {
        mode >> 3
    } else {
        mode
    } & 0o7)
}

/// Checks that the jail's uid/gid may open `path` (read, and write unless `read_only`) by its
/// mode bits: the jailed VMM has no capability to override them, and the error is clearer
/// here than from inside.
fn check_access(path: &Path, read_only: bool, uid: u32, gid: u32) -> Result<()> {
    let bits = access_bits(path, uid, gid)?;
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

/// Checks that `dir` is a directory in which the jail's uid/gid may create files (write and
/// search bits), for `--snapshot-dir`.
fn check_dir_writable(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot use {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mode = meta.mode();
    let bits = if meta.uid() == uid {
        mode >> 6
    } else if meta.gid() == gid {
        mode >> 3
    } else {
        mode
    } & 0o7;
    if bits & 0o3 != 0o3 {
        bail!(
            "{} is not writable by uid {uid} / gid {gid}, which the jailed VMM runs as: change \
             its owner or mode, or pick --uid/--gid",
            dir.display()
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

/// A host file the jailed VMM uses, and where it appears inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: PathBuf,
    pub target: PathBuf,
    /// Bind-mounted writable (disks the guest may write); everything else is read-only.
    pub writable: bool,
}

/// What a jailed VMM needs from the host.
pub struct VmmNeeds {
    pub binds: Vec<Bind>,
    /// `/dev/kvm` (the KVM backend).
    pub kvm: bool,
    /// vCPUs, virtio devices and whether an API runs: the threads the VMM will have.
    pub cpus: u32,
    pub devices: u64,
    /// Guest RAM, for a warning when the memory limit is below it.
    pub memory: u64,
    /// Descriptors the jailed VMM inherits (TAP queues, the vsock listener).
    pub pass_fds: Vec<RawFd>,
}

/// The device threads a VMM running `config` has: one per disk, one for the rng, one per
/// queue pair of each NIC, one for vsock.
fn device_threads(config: &VmConfig, disks: usize) -> u64 {
    disks as u64
        + u64::from(config.rng)
        + config.nets.iter().map(|n| u64::from(n.queues)).sum::<u64>()
        + u64::from(config.vsock.is_some())
}

impl VmmNeeds {
    /// The needs of a VMM running `inside` (a configuration rewritten by [`expose_paths`]).
    fn of(inside: &VmConfig, binds: Vec<(PathBuf, PathBuf)>) -> VmmNeeds {
        let binds = binds
            .into_iter()
            .map(|(host, target)| {
                let writable = inside.disks.iter().any(|d| d.path == target && !d.readonly);
                Bind {
                    host,
                    target,
                    writable,
                }
            })
            .collect();
        VmmNeeds {
            binds,
            kvm: inside.accel == Accel::Kvm,
            cpus: inside.cpus,
            devices: device_threads(inside, inside.disks.len()),
            memory: inside.memory.0,
            pass_fds: Vec::new(),
        }
    }
}

/// The host ends of a jailed VMM's network devices, opened out here — with the caller's
/// privileges, in the caller's network namespace — and handed to the VMM as descriptors, so
/// that inside the jail it needs neither `/dev/net/tun` nor CAP_NET_ADMIN nor the right to
/// bind sockets. Dropping it (when vireo exits) removes the vsock socket file; a TAP vireo
/// created disappears with the VMM's last descriptor.
struct HostNet {
    taps: Vec<Tap>,
    vsock: Option<VsockBackend>,
}

impl HostNet {
    /// Opens (or creates) every TAP of `config` and configures its host side as `host-ip=`
    /// asks (or brings it up), as an unjailed VMM does; binds the vsock socket.
    fn open(config: &VmConfig) -> Result<HostNet> {
        let mut taps = Vec::new();
        for n in &config.nets {
            n.validate().map_err(anyhow::Error::msg)?;
            let tap = Tap::open(&n.tap, usize::from(n.queues))?;
            match n.host_ip {
                Some(net) => tap.set_ipv4(net.addr, net.prefix)?,
                None => {
                    if let Err(e) = tap.set_up() {
                        tracing::warn!("{e}; bring it up yourself (ip link set {} up)", n.tap);
                    }
                }
            }
            taps.push(tap);
        }
        let vsock = match &config.vsock {
            Some(v) => {
                v.validate().map_err(anyhow::Error::msg)?;
                Some(VsockBackend::bind(&v.socket)?)
            }
            None => None,
        };
        Ok(HostNet { taps, vsock })
    }

    /// Copies of the descriptors, for the jailed child to [hand over](HandOver::apply) to
    /// the VMM.
    fn hand_over(&self) -> Result<HandOver> {
        let vsock = match &self.vsock {
            Some(v) => Some((
                v.path().to_path_buf(),
                v.listener().try_clone().context("the vsock socket")?,
            )),
            None => None,
        };
        Ok(HandOver {
            taps: self
                .taps
                .iter()
                .map(Tap::try_clone)
                .collect::<Result<_, _>>()?,
            vsock,
            host_paths: Vec::new(),
        })
    }
}

/// What the jailed child gives the VMM before it starts: the TAPs and vsock listener opened
/// outside, and where its files are on the host (for snapshots).
struct HandOver {
    taps: Vec<Tap>,
    vsock: Option<(PathBuf, UnixListener)>,
    /// (inside, host) path pairs.
    host_paths: Vec<(PathBuf, PathBuf)>,
}

impl HandOver {
    /// The descriptors the jailed VMM inherits.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.taps.iter().flat_map(|t| t.queue_fds()).collect();
        fds.extend(self.vsock.iter().map(|(_, l)| l.as_raw_fd()));
        fds
    }

    fn apply(self) {
        for tap in self.taps {
            vireo_virtio::net::tap::hand_over(tap);
        }
        if let Some((path, listener)) = self.vsock {
            VsockBackend::hand_over(&path, listener);
        }
        vireo_vmm::snapshot::set_host_paths(self.host_paths);
    }
}

/// `path` made absolute (its directory resolved), so that it names the same file inside
/// the jail, where it is bound at the same path.
fn absolute_socket_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("vsock socket {}: not a file path", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("the directory of the vsock socket {}", path.display()))?;
    Ok(dir.join(name))
}

/// The jail for a VMM with `needs`.
pub fn vmm_jail_spec(name: &str, needs: &VmmNeeds, opts: &JailOptions) -> Result<JailSpec> {
    let mut spec = JailSpec::new(name, vec!["vireo-vmm".into()]);
    spec.root = Root::Tmpfs { size: 1 << 20 };
    spec.hostname = "vireo-vmm".into();
    for b in &needs.binds {
        spec.mounts.push(Mount::Bind {
            source: b.host.clone(),
            target: b.target.clone(),
            read_only: !b.writable,
        });
    }
    if let Some(dir) = &opts.snapshot_dir {
        spec.mounts.push(Mount::Bind {
            source: dir.clone(),
            target: dir.clone(),
            read_only: false,
        });
    }
    if needs.kvm {
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

fn need_root() -> Result<()> {
    if !vireo_jail::is_root() {
        bail!("--jail needs root: namespaces, cgroups and pivot_root need CAP_SYS_ADMIN");
    }
    Ok(())
}

/// What a VMM whose network back ends are `net` needs: the vsock socket's directory at its
/// host path, read-only (guest connections to host port P reach the host's `PATH_P` socket
/// there; connecting needs no write access to the directory), and the descriptors of
/// `hand_over` to inherit.
fn add_host_net(needs: &mut VmmNeeds, net: &HostNet, hand_over: &HandOver) -> Result<()> {
    if let Some(dir) = net.vsock.as_ref().and_then(|v| v.path().parent()) {
        if dir.parent().is_none() {
            bail!(
                "the vsock socket's directory appears in the jail: put the socket in a \
                 directory of its own, not in /"
            );
        }
        needs.binds.push(Bind {
            host: dir.to_path_buf(),
            target: dir.to_path_buf(),
            writable: false,
        });
    }
    needs.pass_fds.extend(hand_over.fds());
    Ok(())
}

/// Checks that the jail's uid/gid may reach files in `dir` (the search bit), for the vsock
/// socket's directory.
fn check_dir_searchable(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    let bits = access_bits(dir, uid, gid)?;
    if bits & 0o1 == 0 {
        bail!(
            "{} is not searchable by uid {uid} / gid {gid}, which the jailed VMM runs as, so \
             it cannot reach the vsock sockets there: change its mode, or pick --uid/--gid",
            dir.display()
        );
    }
    Ok(())
}

pub fn run_jailed(mut config: VmConfig, opts: &JailOptions) -> Result<ExitCode> {
    need_root()?;
    if let Some(v) = &mut config.vsock {
        v.socket = absolute_socket_path(&v.socket)?;
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
    let (inside, binds) = expose_paths(&config);
    let host_paths = binds.iter().map(|(h, t)| (t.clone(), h.clone())).collect();
    let mut needs = VmmNeeds::of(&inside, binds);
    let net = HostNet::open(&config)?;
    let mut hand_over = net.hand_over()?;
    add_host_net(&mut needs, &net, &hand_over)?;
    hand_over.host_paths = host_paths;
    let status = run_in_jail(&needs, opts, move |api| {
        hand_over.apply();
        crate::run::run_jailed_vmm(inside, api)
    });
    drop(net);
    status
}

/// `vireo restore --jail`: the snapshot directory, the kernel, initrd and disks its VM was
/// built from (or the replacement disks) appear in the jail at their host paths, so the
/// snapshot's configuration needs no rewriting and a guest reboot after the restore finds its
/// kernel.
pub fn restore_jailed(req: RestoreRequest, opts: &JailOptions) -> Result<ExitCode> {
    need_root()?;
    let snapshot = std::fs::canonicalize(&req.snapshot)
        .with_context(|| format!("snapshot {}", req.snapshot.display()))?;
    let state = vireo_vmm::snapshot::read_state(&snapshot)?;
    let config = &state.config;
    let disks = req.disks.clone().unwrap_or_else(|| config.disks.clone());
    let mut binds = vec![Bind {
        host: snapshot.clone(),
        target: snapshot.clone(),
        writable: false,
    }];
    let mut file = |path: &Path, writable: bool| -> Result<()> {
        if !path.is_absolute() {
            bail!(
                "the snapshot names {} by a relative path: a jailed restore needs absolute \
                 paths",
                path.display()
            );
        }
        binds.push(Bind {
            host: path.to_path_buf(),
            target: path.to_path_buf(),
            writable,
        });
        Ok(())
    };
    file(&config.kernel, false)?;
    if let Some(initrd) = &config.initrd {
        file(initrd, false)?;
    }
    for d in &disks {
        file(&d.path, !d.readonly)?;
    }
    if let Some(v) = &config.vsock {
        if !v.socket.is_absolute() {
            bail!(
                "the snapshot names its vsock socket {} by a relative path: a jailed restore \
                 needs absolute paths",
                v.socket.display()
            );
        }
    }
    let mut needs = VmmNeeds {
        binds,
        kvm: state.backend == "kvm",
        cpus: config.cpus,
        devices: device_threads(config, disks.len()),
        memory: config.memory.0,
        pass_fds: Vec::new(),
    };
    let net = HostNet::open(config)?;
    let hand_over = net.hand_over()?;
    add_host_net(&mut needs, &net, &hand_over)?;
    let req = RestoreRequest {
        snapshot,
        disks: req.disks,
        paused: req.paused,
    };
    let status = run_in_jail(&needs, opts, move |api| {
        hand_over.apply();
        crate::restore::restore_jailed_vmm(&req, api)
    });
    drop(net);
    status
}

/// Forks a VMM into a jail holding `needs`, where it runs `vmm` (given the API listener, if
/// any), and waits for it.
fn run_in_jail(
    needs: &VmmNeeds,
    opts: &JailOptions,
    vmm: impl FnOnce(Option<UnixListener>) -> Result<u8>,
) -> Result<ExitCode> {
    // Every vCPU is a thread; so are main, console, signals, VM creation and the device
    // thread spawner, each virtio device's worker (each NIC queue pair's), and the API's
    // thread and its blocking-task thread.
    let threads =
        u64::from(needs.cpus) + 5 + needs.devices + if opts.api_socket.is_some() { 2 } else { 0 };
    if let Some(p) = opts.limits.pids_max {
        if p < threads {
            bail!(
                "--cgroup pids={p} is too low for {} vCPUs: the VMM needs at least {threads} \
                 (one thread per vCPU, per virtio device and per NIC queue pair, plus 5, plus \
                 2 for the API)",
                needs.cpus
            );
        }
    }
    if let Some(m) = opts.limits.memory_max {
        if m < needs.memory {
            tracing::warn!(
                "the jail's memory limit ({}) is below the guest's memory ({}): the VMM is \
                 killed if the guest uses it all",
                vireo_jail::cgroup::fmt_size(m),
                vireo_jail::cgroup::fmt_size(needs.memory)
            );
        }
    }
    for b in &needs.binds {
        if b.host.is_dir() {
            check_dir_searchable(&b.host, opts.uid, opts.gid)?;
        } else if b.host.is_file() || !b.host.exists() {
            check_access(&b.host, !b.writable, opts.uid, opts.gid)?;
        }
    }
    if let Some(dir) = &opts.snapshot_dir {
        check_dir_writable(dir, opts.uid, opts.gid)?;
    }
    let name = format!("vm-{}", std::process::id());
    let mut spec = vmm_jail_spec(&name, needs, opts)?;
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
    spec.pass_fds.extend(&needs.pass_fds);
    let mut child = vireo_jail::spawn_fn(&spec, move || vmm_inside(vmm, listener))
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
fn vmm_inside(
    vmm: impl FnOnce(Option<UnixListener>) -> Result<u8>,
    api: Option<UnixListener>,
) -> i32 {
    let status = match vmm(api) {
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
        let mut c = VmConfig::new("/boot/vmlinuz");
        c.accel = Accel::Kvm;
        c.disks = vec![
            "path=/srv/rw.img".parse().unwrap(),
            "path=/srv/ro.img,readonly=on".parse().unwrap(),
        ];
        let (inside, binds) = expose_paths(&c);
        let needs = VmmNeeds::of(&inside, binds);
        assert_eq!((needs.cpus, needs.devices), (1, 3), "two disks and the rng");
        let opts = JailOptions {
            uid: 1000,
            gid: 1000,
            limits: Limits::default(),
            api_socket: None,
            snapshot_dir: None,
        };
        let s = vmm_jail_spec("vm-test", &needs, &opts).unwrap();
        assert!(matches!(s.root, Root::Tmpfs { .. }));
        let mounts: Vec<_> = s
            .mounts
            .iter()
            .map(|m| match m {
                Mount::Bind {
                    target, read_only, ..
                } => (target.display().to_string(), *read_only),
                other => (other.target().display().to_string(), false),
            })
            .collect();
        let want: Vec<(String, bool)> = [
            ("/vm/kernel", true),
            ("/vm/disk0", false),
            ("/vm/disk1", true),
            ("/dev/kvm", false),
        ]
        .iter()
        .map(|(t, ro)| (t.to_string(), *ro))
        .collect();
        assert_eq!(mounts, want);
        assert_eq!((s.uid, s.gid), (1000, 1000));
        assert!(s.keep_caps.names().is_empty());
        let (list, violation) = s.seccomp.as_ref().unwrap();
        assert_eq!(*violation, Violation::Trap);
        assert!(!list.allows("execve", [0; 6]));
        assert!(!list.allows("mount", [0; 6]));
        assert!(!list.allows("socket", [0; 6]));
        // The emulator gets no /dev/kvm.
        let mut emu = needs;
        emu.kvm = false;
        let s = vmm_jail_spec("vm-test", &emu, &opts).unwrap();
        assert!(s.mounts.iter().all(|m| m.target() != Path::new("/dev/kvm")));
        // --snapshot-dir: the one writable directory, at its host path.
        let snaps = JailOptions {
            snapshot_dir: Some(PathBuf::from("/srv/snaps")),
            ..opts
        };
        let s = vmm_jail_spec("vm-test", &emu, &snaps).unwrap();
        assert!(s.mounts.iter().any(|m| matches!(m,
            Mount::Bind { source, target, read_only: false }
                if source == Path::new("/srv/snaps") && target == Path::new("/srv/snaps"))));
    }

    #[test]
    fn net_and_vsock_threads_count_and_the_socket_dir_is_bound_read_only() {
        let mut c = VmConfig::new("/boot/vmlinuz");
        c.nets = vec![
            "tap=vt0,queues=2".parse().unwrap(),
            "tap=vt1".parse().unwrap(),
        ];
        let dir = std::env::temp_dir().join(format!("vireo-jail-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        c.vsock = Some(
            format!("cid=3,socket={}/v.sock", dir.display())
                .parse()
                .unwrap(),
        );
        let (inside, binds) = expose_paths(&c);
        let mut needs = VmmNeeds::of(&inside, binds);
        assert_eq!(needs.devices, 1 + 3 + 1, "rng, three queue pairs, vsock");
        // No TAP here (that needs root and a network namespace): the vsock socket only.
        let mut vsock_only = c.clone();
        vsock_only.nets.clear();
        let net = HostNet::open(&vsock_only).unwrap();
        let hand_over = net.hand_over().unwrap();
        add_host_net(&mut needs, &net, &hand_over).unwrap();
        assert!(needs.binds.contains(&Bind {
            host: dir.clone(),
            target: dir.clone(),
            writable: false
        }));
        assert_eq!(needs.pass_fds, hand_over.fds());
        assert_eq!(needs.pass_fds.len(), 1);
        let (path, listener) = hand_over.vsock.as_ref().unwrap();
        assert_eq!(path, &dir.join("v.sock"));
        assert_ne!(
            listener.as_raw_fd(),
            net.vsock.as_ref().unwrap().listener().as_raw_fd()
        );
        drop(hand_over);
        drop(net);
        assert!(!dir.join("v.sock").exists(), "removed by the outer vireo");
        // Relative socket paths are made absolute; a socket in / is refused.
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(
            absolute_socket_path(Path::new("v.sock")).unwrap(),
            cwd.join("v.sock")
        );
        assert!(absolute_socket_path(Path::new("/nonexistent-vireo/v.sock")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_dir_access_is_checked_by_mode_bits() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("vireo-jail-snapdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = std::fs::metadata(&dir).unwrap();
        let (uid, gid) = (m.uid(), m.gid());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_dir_writable(&dir, uid, gid).is_ok(), "owner rwx");
        let e = check_dir_writable(&dir, uid + 1, gid + 1).unwrap_err();
        assert!(e.to_string().contains("not writable"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(check_dir_writable(&dir, uid + 1, gid).is_ok(), "group rwx");
        let f = dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        let e = check_dir_writable(&f, uid, gid).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(check_dir_writable(&dir.join("missing"), uid, gid).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disk_access_is_checked_by_mode_bits() {
        let dir = std::env::temp_dir().join(format!("vireo-jail-acc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("d.img");
        std::fs::write(&f, b"x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (uid, gid) = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&f).unwrap();
            (m.uid(), m.gid())
        };
        // Owner: rw; others: read only.
        assert!(check_access(&f, false, uid, gid).is_ok());
        assert!(check_access(&f, true, uid + 1, gid + 1).is_ok());
        let e = check_access(&f, false, uid + 1, gid + 1).unwrap_err();
        assert!(e.to_string().contains("not readable and writable"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(check_access(&f, false, uid + 1, gid).is_ok(), "group rw");
        assert!(check_access(&f, true, uid + 1, gid + 1).is_err());
        assert!(check_access(&dir.join("missing"), true, uid, gid).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
