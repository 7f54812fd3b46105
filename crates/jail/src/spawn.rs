//! Starting a jailed process.
//!
//! The parent turns a [`JailSpec`] into a [`Plan`]: every path, string, BPF program and
//! mount step prepared in memory. Then `clone(2)` creates the child in new mount, PID, IPC, UTS
//! and network namespaces (and a user namespace when asked). The child runs [`child_main`],
//! which only makes system calls on the prepared data: it must not allocate, because the
//! parent may have other threads holding allocator locks at the time of the clone.
//!
//! Parent and child synchronise over two pipes:
//!
//! 1. the child waits on `sync` while the parent writes the user-namespace id maps, puts the
//!    child into its cgroups and creates the veth pair into its network namespace;
//! 2. the parent writes one byte; the child sets itself up (hostname, network, mounts,
//!    `pivot_root`, credentials, capabilities, `no_new_privs`, seccomp) and `execve`s;
//! 3. `error` is close-on-exec: the parent reads EOF when the exec succeeded, or a
//!    [`ChildError`] naming the step that failed.
//!
//! The child asks for `SIGKILL` when its parent dies (`PR_SET_PDEATHSIG`, set again after the
//! uid change, which clears it) and checks the parent is still there afterwards, so a killed
//! vireo never leaves a jail running: the jail's init dies, and with it its PID namespace.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;

use crate::caps::{self, CapSet};
use crate::cgroup::{Cgroup, Hierarchies, HostResources, Limits, Stats};
use crate::net::{self, Ipv4Net, VethGuard};
use crate::record::{self, ProcessId};
use crate::spec::{inside_components, JailSpec, Mount, Root};
use crate::{sys, Error};

/// Where a tmpfs root is mounted in the child's private mount namespace. The host only ever
/// sees an empty directory.
pub const TMPFS_ROOT_DIR: &str = "/run/vireo/jail-root";

const MNT_NOSUID: libc::c_ulong = libc::MS_NOSUID;
const MNT_NODEV: libc::c_ulong = libc::MS_NODEV;
const MNT_NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// A path inside the new root, as components.
struct Target {
    comps: Vec<CString>,
}

/// How to treat the last component of a [`Target`] when walking to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    /// A directory, created if missing.
    Dir,
    /// A regular file, created empty if missing (a bind-mount point for a file).
    File,
    /// Whatever is there; missing is `ENOENT`.
    Existing,
}

enum Op {
    Bind {
        src: CString,
        dst: Target,
        file: bool,
        read_only: bool,
        flags: libc::c_ulong,
    },
    Tmpfs {
        dst: Target,
        data: CString,
        flags: libc::c_ulong,
    },
    Proc {
        dst: Target,
    },
    Node {
        dst: Target,
        mode: libc::mode_t,
        rdev: libc::dev_t,
        uid: u32,
        gid: u32,
    },
    Symlink {
        target: CString,
        dst: Target,
    },
    /// Bind `/dev/null` of the host over a file, if it exists.
    MaskFile {
        dst: Target,
    },
    /// Make an existing path read-only (bind onto itself, remount).
    ReadOnly {
        dst: Target,
    },
}

/// Declares [`Stage`] and the table that decodes it, from one list.
macro_rules! stages {
    ($($name:ident),* $(,)?) => {
        /// Where the child failed, sent to the parent over the error pipe.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Stage {
            $($name),*
        }

        impl Stage {
            const ALL: &'static [Stage] = &[$(Stage::$name),*];
        }
    };
}

stages![
    Sync,
    Session,
    Namespaces,
    Hostname,
    Network,
    MakePrivate,
    RootMount,
    Op,
    RootReadOnly,
    PivotRoot,
    Cwd,
    Groups,
    Bounding,
    Ids,
    Caps,
    NoNewPrivs,
    ParentDied,
    Fds,
    Seccomp,
    Exec,
];

impl Stage {
    /// The stage's number in a report (from 1, so that an all-zero report names none).
    fn code(self) -> u32 {
        self as u32 + 1
    }

    fn from_code(v: u32) -> Option<Stage> {
        Self::ALL.get(v.checked_sub(1)? as usize).copied()
    }
}

/// `{stage, index, errno}` as three native-endian u32s.
const CHILD_ERROR_LEN: usize = 12;

/// Everything the child needs, prepared by the parent.
struct Plan {
    root: CString,
    root_tmpfs: Option<CString>,
    root_read_only: bool,
    ops: Vec<Op>,
    /// What each op does, for error messages (parent side).
    op_desc: Vec<String>,
    hostname: Vec<u8>,
    net: Option<(Ipv4Net, std::net::Ipv4Addr)>,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    set_groups: bool,
    keep_caps: CapSet,
    last_cap: u32,
    drop_bounding: bool,
    seccomp: Vec<BpfProgram>,
    argv: Vec<CString>,
    env: Vec<CString>,
    exec_paths: Vec<CString>,
    cwd: CString,
    late_unshare: libc::c_int,
    stdio: [Option<RawFd>; 3],
    /// `spec.pass_fds`, sorted, without duplicates.
    pass_fds: Vec<RawFd>,
    userns: bool,
    /// Leave vireo's session (`setsid`): vireo has a controlling terminal that the jail must
    /// not reach. Without one, a process group of its own is enough (`setpgid`), and the
    /// jail stays in vireo's scheduler autogroup (each new session gets one of its own,
    /// which costs the jail milliseconds of CPU share on a loaded host).
    new_session: bool,
}

fn cstring(s: &OsStr, what: &str) -> Result<CString, Error> {
    CString::new(s.as_bytes())
        .map_err(|_| Error::InvalidSpec(format!("{what} contains a NUL byte")))
}

fn target(p: &Path) -> Result<Target, Error> {
    let comps = inside_components(p)?
        .iter()
        .map(|c| cstring(c, "a path"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Target { comps })
}

fn t(p: &str) -> Target {
    Target {
        comps: p
            .split('/')
            .filter(|c| !c.is_empty())
            .filter_map(|c| CString::new(c).ok())
            .collect(),
    }
}

/// The character devices of a minimal `/dev` (devices.txt: mem major 1, tty major 5).
const DEV_NODES: &[(&str, u32, u32, u32)] = &[
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("tty", 5, 0, 0o666),
];

/// `/proc` files that expose kernel memory or state: hidden behind `/dev/null`.
const PROC_MASKED: &[&str] = &[
    "proc/kcore",
    "proc/keys",
    "proc/timer_list",
    "proc/sched_debug",
    "proc/kallsyms",
];

/// `/proc` entries a root process could write to change the host: read-only.
const PROC_READ_ONLY: &[&str] = &[
    "proc/sys",
    "proc/sysrq-trigger",
    "proc/irq",
    "proc/bus",
    "proc/fs",
];

impl Plan {
    fn new(spec: &JailSpec, userns: bool) -> Result<Plan, Error> {
        let mut ops = Vec::new();
        let mut desc = Vec::new();
        let (root, root_tmpfs, root_read_only) = match &spec.root {
            Root::Dir { path, read_only } => {
                let abs = std::fs::canonicalize(path)
                    .map_err(|_| Error::RootfsMissing { path: path.clone() })?;
                (cstring(abs.as_os_str(), "the root path")?, None, *read_only)
            }
            Root::Tmpfs { size } => {
                std::fs::create_dir_all(TMPFS_ROOT_DIR).map_err(|e| Error::Io {
                    context: format!("creating {TMPFS_ROOT_DIR}"),
                    source: e,
                })?;
                (
                    cstring(OsStr::new(TMPFS_ROOT_DIR), "")?,
                    Some(cstring(OsStr::new(&format!("mode=0755,size={size}")), "")?),
                    false,
                )
            }
        };
        if spec.dev {
            ops.push(Op::Tmpfs {
                dst: t("dev"),
                data: CString::new("mode=0755,size=65536").unwrap_or_default(),
                flags: MNT_NOSUID | MNT_NOEXEC,
            });
            desc.push("mounting a tmpfs on /dev".to_string());
            for (name, major, minor, mode) in DEV_NODES {
                let host = format!("/dev/{name}");
                if userns {
                    ops.push(Op::Bind {
                        src: CString::new(host.clone()).unwrap_or_default(),
                        dst: t(&format!("dev/{name}")),
                        file: true,
                        read_only: false,
                        flags: 0,
                    });
                } else {
                    ops.push(Op::Node {
                        dst: t(&format!("dev/{name}")),
                        mode: libc::S_IFCHR | mode,
                        rdev: libc::makedev(*major, *minor),
                        uid: 0,
                        gid: 0,
                    });
                }
                desc.push(format!("creating {host}"));
            }
            for (name, to) in [
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
            ] {
                ops.push(Op::Symlink {
                    target: CString::new(to).unwrap_or_default(),
                    dst: t(&format!("dev/{name}")),
                });
                desc.push(format!("linking /dev/{name}"));
            }
            ops.push(Op::Tmpfs {
                dst: t("dev/shm"),
                data: CString::new("mode=1777,size=67108864").unwrap_or_default(),
                flags: MNT_NOSUID | MNT_NODEV | MNT_NOEXEC,
            });
            desc.push("mounting a tmpfs on /dev/shm".to_string());
        }
        for m in &spec.mounts {
            match m {
                Mount::Bind {
                    source,
                    target: dst,
                    read_only,
                } => {
                    let meta = std::fs::metadata(source).map_err(|_| Error::MountSource {
                        path: source.clone(),
                    })?;
                    ops.push(Op::Bind {
                        src: cstring(source.as_os_str(), "a mount source")?,
                        dst: target(dst)?,
                        file: !meta.is_dir(),
                        read_only: *read_only,
                        flags: 0,
                    });
                    desc.push(format!(
                        "bind-mounting {} at {}",
                        source.display(),
                        dst.display()
                    ));
                }
                Mount::Device {
                    source,
                    target: dst,
                } => {
                    use std::os::unix::fs::{FileTypeExt, MetadataExt};
                    let meta = std::fs::metadata(source).map_err(|_| Error::MountSource {
                        path: source.clone(),
                    })?;
                    if !meta.file_type().is_char_device() {
                        return Err(Error::InvalidSpec(format!(
                            "{} is not a character device",
                            source.display()
                        )));
                    }
                    if userns {
                        ops.push(Op::Bind {
                            src: cstring(source.as_os_str(), "a device path")?,
                            dst: target(dst)?,
                            file: true,
                            read_only: false,
                            flags: 0,
                        });
                    } else {
                        ops.push(Op::Node {
                            dst: target(dst)?,
                            mode: libc::S_IFCHR | 0o600,
                            rdev: meta.rdev() as libc::dev_t,
                            uid: spec.uid,
                            gid: spec.gid,
                        });
                    }
                    desc.push(format!(
                        "making device {} at {}",
                        source.display(),
                        dst.display()
                    ));
                }
                Mount::Tmpfs {
                    target: dst,
                    size,
                    mode,
                } => {
                    ops.push(Op::Tmpfs {
                        dst: target(dst)?,
                        data: CString::new(format!("mode={mode:o},size={size}"))
                            .unwrap_or_default(),
                        flags: MNT_NOSUID | MNT_NODEV,
                    });
                    desc.push(format!("mounting a tmpfs on {}", dst.display()));
                }
            }
        }
        ops.push(Op::Proc { dst: t("proc") });
        desc.push("mounting /proc".to_string());
        if spec.mask_proc {
            for p in PROC_MASKED {
                ops.push(Op::MaskFile { dst: t(p) });
                desc.push(format!("hiding /{p}"));
            }
            for p in PROC_READ_ONLY {
                ops.push(Op::ReadOnly { dst: t(p) });
                desc.push(format!("making /{p} read-only"));
            }
        }

        let argv = spec
            .argv
            .iter()
            .map(|a| cstring(a, "an argument"))
            .collect::<Result<Vec<_>, _>>()?;
        let env = spec
            .env
            .iter()
            .map(|e| cstring(e, "an environment variable"))
            .collect::<Result<Vec<_>, _>>()?;
        if spec.argv.len() > MAX_ARGS || spec.env.len() > MAX_ARGS {
            return Err(Error::InvalidSpec(format!(
                "more than {MAX_ARGS} arguments or environment variables"
            )));
        }
        let exec_paths = exec_candidates(&spec.argv[0], &spec.env)?;
        let seccomp = match &spec.seccomp {
            Some((list, violation)) => list.compile(*violation)?,
            None => Vec::new(),
        };
        let mut late_unshare = libc::CLONE_NEWCGROUP;
        if Path::new("/proc/self/ns/time").exists() {
            late_unshare |= libc::CLONE_NEWTIME;
        }
        Ok(Plan {
            root,
            root_tmpfs,
            root_read_only,
            ops,
            op_desc: desc,
            hostname: spec.hostname.as_bytes().to_vec(),
            net: spec.net.as_ref().map(|n| (n.addr, n.host_addr)),
            uid: spec.uid,
            gid: spec.gid,
            groups: spec.groups.clone(),
            set_groups: true,
            keep_caps: spec.keep_caps,
            last_cap: caps::last_cap(),
            drop_bounding: caps::can_drop_bounding(),
            seccomp,
            argv,
            env,
            exec_paths,
            cwd: cstring(spec.cwd.as_os_str(), "the working directory")?,
            late_unshare,
            stdio: spec.stdio,
            pass_fds: {
                let mut v = spec.pass_fds.clone();
                v.sort_unstable();
                v.dedup();
                v
            },
            userns,
            new_session: has_controlling_terminal(),
        })
    }
}

/// Whether this process has a controlling terminal: `/dev/tty` opens only then (tty(4)).
fn has_controlling_terminal() -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open("/dev/tty")
        .is_ok()
}

/// Where `execve` looks for `argv0`: itself when it has a `/`, else each `PATH` entry.
fn exec_candidates(argv0: &OsStr, env: &[OsString]) -> Result<Vec<CString>, Error> {
    if argv0.as_bytes().contains(&b'/') {
        return Ok(vec![cstring(argv0, "the command")?]);
    }
    let path = env
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="))
        .unwrap_or(crate::spec::DEFAULT_PATH.as_bytes());
    let mut out = Vec::new();
    for dir in path.split(|&b| b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        let mut p = dir.to_vec();
        p.push(b'/');
        p.extend_from_slice(argv0.as_bytes());
        out.push(cstring(OsStr::from_bytes(&p), "the command")?);
    }
    Ok(out)
}

/// How a jailed process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    fn from_wait(status: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }

    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Signals blocked on the calling thread (so none is lost between spawning a jail and waiting
/// for it), for [`JailedChild::wait_forwarding`]. Restores the mask when dropped. Blocked
/// signals are process-directed: the calling thread should be the only one, or all threads
/// should block them.
pub struct SignalForwarding {
    signals: Vec<libc::c_int>,
}

impl SignalForwarding {
    /// Blocks `signals` and `SIGCHLD`.
    pub fn block(signals: &[libc::c_int]) -> SignalForwarding {
        let mut all = signals.to_vec();
        all.push(libc::SIGCHLD);
        sys::set_signal_mask(&all, libc::SIG_BLOCK);
        SignalForwarding {
            signals: signals.to_vec(),
        }
    }
}

impl Drop for SignalForwarding {
    fn drop(&mut self) {
        let mut all = self.signals.clone();
        all.push(libc::SIGCHLD);
        sys::set_signal_mask(&all, libc::SIG_UNBLOCK);
    }
}

/// A running jailed process. Dropping it kills the process (and so its whole PID namespace)
/// and removes its cgroups and veth pair.
#[derive(Debug)]
pub struct JailedChild {
    pid: libc::pid_t,
    name: String,
    cgroup: Option<Cgroup>,
    veth: Option<VethGuard>,
    host_if: Option<String>,
    exit: Option<Exit>,
    final_stats: Option<Stats>,
    recorded: bool,
    /// The host's cgroup hierarchies as found at spawn (mounts do not move while a jail
    /// runs), so that clean-up does not parse `/proc/self/mountinfo` again.
    hierarchies: Hierarchies,
}

impl JailedChild {
    /// The jail's init, as a host PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The name given in the spec.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The jail's cgroups.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// The host end of the veth pair.
    pub fn host_interface(&self) -> Option<&str> {
        self.host_if.as_deref()
    }

    /// Current cgroup usage.
    pub fn stats(&self) -> Stats {
        self.cgroup.as_ref().map(Cgroup::stats).unwrap_or_default()
    }

    /// Changes limits while the process runs.
    pub fn update_limits(&self, limits: &Limits) -> Result<(), Error> {
        limits.check(&HostResources::probe())?;
        match &self.cgroup {
            Some(cg) => cg.apply(limits),
            None if limits.is_empty() => Ok(()),
            None => Err(Error::NoController {
                controller: limits.needed().first().map_or("memory", |c| c.0.name()),
                limit: limits.needed().first().map_or("memory", |c| c.1),
            }),
        }
    }

    /// Sends `sig` to the jail's init (PID 1 inside only receives signals it handles, and
    /// `SIGKILL`).
    pub fn kill(&self, sig: i32) -> Result<(), Error> {
        if self.exit.is_some() {
            return Ok(());
        }
        sys::kill(self.pid, sig).map_err(|e| Error::Io {
            context: format!("signalling jail {}", self.name),
            source: e,
        })
    }

    /// Whether it has exited (reaps it and cleans up if so).
    pub fn try_wait(&mut self) -> Result<Option<Exit>, Error> {
        if let Some(e) = self.exit {
            return Ok(Some(e));
        }
        match sys::waitpid(self.pid, libc::WNOHANG) {
            Ok(Some(status)) => Ok(Some(self.finished(Exit::from_wait(status)))),
            Ok(None) => Ok(None),
            Err(e) => Err(Error::Io {
                context: format!("waiting for jail {}", self.name),
                source: e,
            }),
        }
    }

    /// Waits for it to exit, then cleans up.
    pub fn wait(&mut self) -> Result<Exit, Error> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        match sys::waitpid(self.pid, 0) {
            Ok(Some(status)) => Ok(self.finished(Exit::from_wait(status))),
            Ok(None) => Err(Error::Io {
                context: "waitpid returned nothing".into(),
                source: io::ErrorKind::Other.into(),
            }),
            Err(e) => Err(Error::Io {
                context: format!("waiting for jail {}", self.name),
                source: e,
            }),
        }
    }

    /// Waits for it to exit, passing the signals `fwd` blocked on to the jail's init.
    pub fn wait_forwarding(&mut self, fwd: &SignalForwarding) -> Result<Exit, Error> {
        loop {
            if let Some(e) = self.wait_forwarding_until(fwd, None)? {
                return Ok(e);
            }
        }
    }

    /// Like [`JailedChild::wait_forwarding`], but gives up at `deadline` (`None`: the
    /// process still runs).
    pub fn wait_forwarding_until(
        &mut self,
        fwd: &SignalForwarding,
        deadline: Option<Instant>,
    ) -> Result<Option<Exit>, Error> {
        let mut watch = fwd.signals.clone();
        watch.push(libc::SIGCHLD);
        let poll = Duration::from_millis(200);
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(Some(e));
            }
            let timeout = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(poll),
                    _ => return Ok(None),
                },
                None => poll,
            };
            match sys::sigtimedwait(&watch, timeout) {
                Some(libc::SIGCHLD) | None => {}
                Some(sig) => {
                    tracing::debug!(sig, jail = %self.name, "forwarding signal");
                    let _ = self.kill(sig);
                }
            }
        }
    }

    fn finished(&mut self, exit: Exit) -> Exit {
        self.exit = Some(exit);
        self.final_stats = self.cgroup.as_ref().map(Cgroup::stats);
        self.cleanup();
        exit
    }

    /// The cgroup figures read when the process exited (before its cgroups were removed):
    /// how much memory it peaked at, whether the OOM killer struck, ...
    pub fn final_stats(&self) -> Option<&Stats> {
        self.final_stats.as_ref()
    }

    /// Removes cgroups and the veth pair (once the process is gone).
    fn cleanup(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            // The PID namespace died with its init (the kernel kills and reaps every process
            // in it before the init's exit completes), so the groups are empty: remove them
            // directly. Only if one is not (a process put there from outside) kill and wait.
            if !cg.try_remove() {
                cg.kill_all();
                if let Err(e) = cg.remove() {
                    tracing::warn!(jail = %self.name, "clean-up: {e}");
                }
            }
            // Directories another vireo added while it ran (`container update`).
            if let Err(e) = Cgroup::remove_named(&self.hierarchies, &self.name) {
                tracing::warn!(jail = %self.name, "clean-up: {e}");
            }
        }
        // Dropping the guard deletes the host end (already gone with the namespace, usually).
        self.veth.take();
        if self.recorded {
            record::remove(Path::new(record::RECORD_DIR), &self.name);
            self.recorded = false;
        }
    }
}

impl Drop for JailedChild {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = sys::kill(self.pid, libc::SIGKILL);
            if let Ok(Some(status)) = sys::waitpid(self.pid, 0) {
                self.exit = Some(Exit::from_wait(status));
            }
        }
        self.cleanup();
    }
}

/// Closes every descriptor from 3 up but those in `keep` (sorted) and `extra`, without
/// allocating (this runs in the forked child).
fn close_all_but(keep: &[RawFd], extra: RawFd) -> io::Result<()> {
    let mut next: u32 = 3;
    let mut close_below = |fd: RawFd| -> io::Result<()> {
        let Ok(fd) = u32::try_from(fd) else {
            return Ok(());
        };
        if fd > next {
            sys::close_range(next, fd - 1, 0)?;
        }
        next = next.max(fd.saturating_add(1));
        Ok(())
    };
    let mut extra_done = false;
    for &fd in keep {
        if !extra_done && extra < fd {
            close_below(extra)?;
            extra_done = true;
        }
        close_below(fd)?;
    }
    if !extra_done {
        close_below(extra)?;
    }
    sys::close_range(next, u32::MAX, 0)
}

/// Whether this process can create jails (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Starts `spec`'s command in a new jail. Returns once the command is running (its `execve`
/// succeeded) or with an error naming the step that failed; nothing is left behind on error.
pub fn spawn(spec: &JailSpec) -> Result<JailedChild, Error> {
    spawn_entry(spec, Entry::Exec)
}

/// Like [`spawn`], but instead of executing `spec.argv` the jailed child calls `f` (after
/// every step of the jail, the seccomp filter included) and exits with its return value.
/// Saves an `execve` and the program's start-up. The calling process must be
/// single-threaded (the child is a copy of it and runs arbitrary code); `spec.argv` only
/// names the jail in errors.
pub fn spawn_fn<'a>(spec: &JailSpec, f: impl FnOnce() -> i32 + 'a) -> Result<JailedChild, Error> {
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().to_string()))
        });
    if threads.as_deref() != Some("1") {
        return Err(Error::InvalidSpec(format!(
            "spawn_fn needs a single-threaded process (this one has {} threads)",
            threads.as_deref().unwrap_or("?")
        )));
    }
    spawn_entry(spec, Entry::Call(Box::new(f)))
}

fn spawn_entry(spec: &JailSpec, entry: Entry) -> Result<JailedChild, Error> {
    spec.validate()?;
    if !is_root() {
        return Err(Error::NotRoot);
    }
    if !spec.limits.is_empty() {
        spec.limits.check(&HostResources::probe())?;
    }
    let plan = Plan::new(spec, spec.user_namespace.is_some())?;
    let records = Path::new(record::RECORD_DIR);
    record::sweep(records);
    let owner = ProcessId::current().ok_or_else(|| Error::Io {
        context: "reading /proc/self/stat".into(),
        source: io::ErrorKind::NotFound.into(),
    })?;
    let hierarchies = Hierarchies::detect()?;
    let cgroup = if hierarchies.v1.is_empty() && hierarchies.v2.is_none() {
        if !spec.limits.is_empty() {
            let (c, limit) = spec.limits.needed()[0];
            return Err(Error::NoController {
                controller: c.name(),
                limit,
            });
        }
        None
    } else {
        Some(Cgroup::create(&hierarchies, &spec.name, &spec.limits)?)
    };
    let rec = record::Record {
        name: spec.name.clone(),
        owner,
        cgroup: cgroup.clone(),
        host_if: spec.net.as_ref().map(|n| n.host_if.clone()),
    };
    if let Err(e) = record::write(records, &rec) {
        if let Some(cg) = cgroup {
            let _ = cg.remove();
        }
        return Err(Error::Io {
            context: format!("writing {}", records.display()),
            source: e,
        });
    }
    // From here on, `child` owns the clean-up (its Drop kills and removes).
    let (sync_r, sync_w) = sys::pipe().map_err(io_err("creating a pipe"))?;
    let (err_r, err_w) = sys::pipe().map_err(io_err("creating a pipe"))?;
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET;
    if spec.user_namespace.is_some() {
        flags |= libc::CLONE_NEWUSER;
    }
    // Into the v2 directory at clone time where the kernel can (no migration cost), else
    // clone and move.
    let v2_fd = cgroup
        .as_ref()
        .and_then(|cg| cg.v2.as_ref())
        .and_then(|d| std::fs::File::open(d).ok());
    // Whether the parent has work between the clone and the child's set-up (then the child
    // waits for it): id maps, joining cgroups the clone did not enter, the veth pair.
    let base_work = spec.user_namespace.is_some() || spec.net.is_some();
    let work_in_v2 = base_work || cgroup.as_ref().is_some_and(|cg| !cg.v1.is_empty());
    let work_forked = base_work || cgroup.as_ref().is_some_and(|cg| !cg.dirs().is_empty());
    let v2_raw = v2_fd.as_ref().map(|f| f.as_raw_fd());
    // Fast path: a command to execute and nothing for the parent to do. The child shares
    // this process's memory (no page-table copy, no copy-on-write faults) and this thread
    // sleeps until it has executed the command or failed (CLONE_VFORK): one wake-up, and
    // the error pipe then holds the child's report, if any. `entry` is `Exec`, which the
    // child re-creates (it owns nothing).
    let mut cloned = None;
    let exec = matches!(entry, Entry::Exec);
    let shared_ok = exec
        && !(if v2_raw.is_some() {
            work_in_v2
        } else {
            work_forked
        });
    if shared_ok {
        let stack = sys::ChildStack::new(CHILD_STACK).map_err(io_err("mapping a stack"))?;
        let args = SharedChild {
            plan: &plan,
            sync_r: sync_r.as_raw_fd(),
            sync_w: sync_w.as_raw_fd(),
            err_r: err_r.as_raw_fd(),
            err_w: err_w.as_raw_fd(),
        };
        // SAFETY: `shared_child` only runs `child_main` on `args` (alive in this frame,
        // which is suspended until the child is gone), which reads `plan`, writes only its
        // own stack, never allocates, takes locks or returns, and ends in execve or _exit.
        let r = unsafe {
            sys::clone3_vfork(
                flags,
                v2_raw,
                &stack,
                shared_child,
                &args as *const SharedChild as *mut libc::c_void,
            )
        };
        match r {
            // A kernel without clone3 or CLONE_INTO_CGROUP: the copying path below.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EINVAL)
                ) => {}
            other => cloned = Some(other.map(|p| (p, v2_raw.is_some(), false))),
        }
    }
    // SAFETY: the child only runs `child_main`, which makes system calls on `plan` (prepared
    // above) and never allocates, takes locks or returns.
    let cloned = cloned.unwrap_or_else(|| match v2_raw {
        Some(fd) => match unsafe { sys::clone3_into_cgroup(flags, fd) } {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::E2BIG)) => {
                // SAFETY: as above.
                unsafe { sys::clone_fork(flags) }.map(|p| (p, false, work_forked))
            }
            other => other.map(|p| (p, true, work_in_v2)),
        },
        // SAFETY: as above.
        None => unsafe { sys::clone_fork(flags) }.map(|p| (p, false, work_forked)),
    });
    let (pid, in_v2, sync) = match cloned {
        Ok((0, _, sync)) => {
            drop(sync_w);
            drop(err_r);
            child_main(&plan, sync_r.as_raw_fd(), err_w.as_raw_fd(), entry, sync)
        }
        Ok(p) => p,
        Err(e) => {
            if let Some(cg) = cgroup {
                let _ = cg.remove();
            }
            record::remove(records, &spec.name);
            return Err(clone_error(e, spec));
        }
    };
    drop(v2_fd);
    drop(sync_r);
    drop(err_w);
    let mut child = JailedChild {
        pid,
        name: spec.name.clone(),
        cgroup,
        veth: None,
        host_if: spec.net.as_ref().map(|n| n.host_if.clone()),
        exit: None,
        final_stats: None,
        recorded: true,
        hierarchies,
    };
    tracing::debug!(jail = %spec.name, pid, "jail cloned");

    if let Err(e) = parent_steps(
        spec,
        &mut child,
        pid,
        in_v2,
        sync.then_some(sync_w.as_raw_fd()),
    ) {
        // The child may have failed first (building its root does not wait for us): its
        // report says more than our failure to talk to it.
        let _ = child.kill(libc::SIGKILL);
        return Err(match read_report(err_r.as_raw_fd()) {
            Ok(Some(report)) => {
                let _ = child.wait();
                report_error(report, spec, &plan)
            }
            _ => e,
        });
    }
    let report = read_report(err_r.as_raw_fd()).map_err(io_err("reading the jail's status"))?;
    drop(sync_w);
    match report {
        None => {
            tracing::debug!(jail = %spec.name, pid, "jail running");
            Ok(child)
        }
        Some(report) => {
            let _ = child.wait();
            Err(report_error(report, spec, &plan))
        }
    }
}

/// What the parent does between the clone and letting the child go (`sync_w`: the child
/// waits for a byte there; `None` when there is nothing to do and it does not wait).
fn parent_steps(
    spec: &JailSpec,
    child: &mut JailedChild,
    pid: libc::pid_t,
    in_v2: bool,
    sync_w: Option<RawFd>,
) -> Result<(), Error> {
    if let Some(map) = &spec.user_namespace {
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(
                &path,
                format!("{} {} {}\n", map.inside, map.outside, map.count),
            )
            .map_err(io_err(&format!("writing {path}")))?;
        }
    }
    if let Some(cg) = &child.cgroup {
        if in_v2 {
            cg.add_v1(pid)?;
        } else {
            cg.add(pid)?;
        }
    }
    if let Some(n) = &spec.net {
        let guard = net::setup_host(n, pid).map_err(|e| Error::Network {
            what: format!("creating veth {} for {}", n.host_if, n.addr),
            source: e,
        })?;
        child.veth = Some(guard);
    }
    match sync_w {
        Some(fd) => sys::write_all(fd, b"G").map_err(io_err("starting the jail")),
        None => Ok(()),
    }
}

/// Stack of a child that shares vireo's memory: `child_main` needs about 20 KiB (the
/// `execve` pointer arrays); only touched pages are backed.
const CHILD_STACK: usize = 256 << 10;

/// What [`shared_child`] gets: the plan and the raw pipe ends (it closes the parent's).
struct SharedChild<'a> {
    plan: &'a Plan,
    sync_r: RawFd,
    sync_w: RawFd,
    err_r: RawFd,
    err_w: RawFd,
}

/// Entry point of a child started by [`sys::clone3_vfork`].
extern "C" fn shared_child(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` is the `SharedChild` in `spawn_entry`'s frame, which stays suspended
    // (CLONE_VFORK) until this child has executed its command or exited.
    let a = unsafe { &*(arg as *const SharedChild) };
    // The parent's ends, copied into this process's descriptor table: close them raw (the
    // owning objects live on in the parent).
    sys::close(a.sync_w);
    sys::close(a.err_r);
    child_main(a.plan, a.sync_r, a.err_w, Entry::Exec, false)
}

/// Reads the child's report: `None` at EOF without one (the exec happened).
fn read_report(err_r: RawFd) -> io::Result<Option<[u8; CHILD_ERROR_LEN]>> {
    let mut report = [0u8; CHILD_ERROR_LEN];
    let mut got = 0;
    while got < report.len() {
        match sys::read(err_r, &mut report[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok((got == CHILD_ERROR_LEN).then_some(report))
}

fn report_error(report: [u8; CHILD_ERROR_LEN], spec: &JailSpec, plan: &Plan) -> Error {
    let word =
        |i: usize| u32::from_ne_bytes([report[i], report[i + 1], report[i + 2], report[i + 3]]);
    let (stage, index, errno) = (word(0), word(4) as usize, word(8) as i32);
    child_error(
        Stage::from_code(stage),
        index,
        io::Error::from_raw_os_error(errno),
        spec,
        plan,
    )
}

fn io_err(context: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: context.to_string(),
        source,
    }
}

fn clone_error(e: io::Error, spec: &JailSpec) -> Error {
    let why = match e.raw_os_error() {
        Some(libc::EPERM) => "not permitted (is vireo root, and are namespaces allowed here?)",
        Some(libc::ENOSPC) => "too many namespaces (see /proc/sys/user/max_*_namespaces)",
        Some(libc::EINVAL) => "the kernel lacks a namespace type vireo needs",
        _ => "",
    };
    Error::Setup {
        step: format!(
            "creating namespaces for {}{}{why}",
            spec.name,
            if why.is_empty() { "" } else { ": " }
        ),
        source: e,
    }
}

fn child_error(
    stage: Option<Stage>,
    index: usize,
    e: io::Error,
    spec: &JailSpec,
    plan: &Plan,
) -> Error {
    let root = match &spec.root {
        Root::Dir { path, .. } => path.display().to_string(),
        Root::Tmpfs { .. } => "a tmpfs".to_string(),
    };
    let step = match stage {
        Some(Stage::Exec) => {
            return Error::Exec {
                command: spec.argv[0].to_string_lossy().into_owned(),
                root,
                source: e,
            }
        }
        Some(Stage::Op) => plan
            .op_desc
            .get(index)
            .cloned()
            .unwrap_or_else(|| "a mount".into()),
        Some(Stage::Sync) => "waiting for vireo".into(),
        Some(Stage::Session) => "starting a new session".into(),
        Some(Stage::Namespaces) => "creating the cgroup and time namespaces".into(),
        Some(Stage::Hostname) => format!("setting the hostname to {}", spec.hostname),
        Some(Stage::Network) => "configuring the network inside".into(),
        Some(Stage::MakePrivate) => "making mounts private".into(),
        Some(Stage::RootMount) => format!("mounting the root ({root})"),
        Some(Stage::RootReadOnly) => "making the root read-only".into(),
        Some(Stage::PivotRoot) => format!("pivot_root into {root}"),
        Some(Stage::Cwd) => format!("changing to {}", spec.cwd.display()),
        Some(Stage::Groups) => "setting supplementary groups".into(),
        Some(Stage::Bounding) => "dropping capabilities from the bounding set".into(),
        Some(Stage::Ids) => format!("switching to uid {} gid {}", spec.uid, spec.gid),
        Some(Stage::Caps) => "dropping capabilities".into(),
        Some(Stage::NoNewPrivs) => "setting no_new_privs".into(),
        Some(Stage::ParentDied) => "vireo exited while the jail started".into(),
        Some(Stage::Fds) => "closing inherited file descriptors".into(),
        Some(Stage::Seccomp) => "installing the seccomp filter".into(),
        None => "setting up (unknown step)".into(),
    };
    let hint = match (stage, e.raw_os_error()) {
        (Some(Stage::Op), Some(libc::ELOOP)) | (Some(Stage::Op), Some(libc::ENOTDIR)) => {
            " (the root file system has a symlink or file where a directory or mount point \
             is needed; vireo does not follow symlinks there)"
        }
        (Some(Stage::Op), Some(libc::EROFS)) => {
            " (the root file system is read-only and lacks this mount point)"
        }
        _ => "",
    };
    Error::Setup {
        step: format!("{step}{hint}"),
        source: e,
    }
}

// ---------------------------------------------------------------------------------------------
// The child. Nothing below allocates.

/// Reports `stage` (and `index`, `e`) to the parent and exits.
fn fail(err_fd: RawFd, stage: Stage, index: usize, e: &io::Error) -> ! {
    let mut buf = [0u8; CHILD_ERROR_LEN];
    buf[0..4].copy_from_slice(&stage.code().to_ne_bytes());
    buf[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    buf[8..12].copy_from_slice(&(e.raw_os_error().unwrap_or(libc::EIO) as u32).to_ne_bytes());
    let _ = sys::write_all(err_fd, &buf);
    sys::exit_now(125)
}

/// What the child runs once jailed.
enum Entry<'a> {
    /// `execve` the spec's command.
    Exec,
    /// Call this function in the child (the caller was single-threaded at the clone) and
    /// exit with what it returns.
    Call(Box<dyn FnOnce() -> i32 + 'a>),
}

/// The child after `clone`. With `sync`, it waits for the parent's go-ahead (one byte on
/// `sync_fd`) before it uses what the parent sets up (id maps, cgroups, the veth pair);
/// without, the parent has nothing to do and the child does not wait.
fn child_main(plan: &Plan, sync_fd: RawFd, err_fd: RawFd, entry: Entry, sync: bool) -> ! {
    let step = |stage: Stage, r: io::Result<()>| {
        if let Err(e) = r {
            fail(err_fd, stage, 0, &e)
        }
    };
    // Die with vireo. Cleared by the uid change below, so set again there.
    step(
        Stage::Sync,
        sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0).map(drop),
    );
    // The new root does not depend on what the parent does meanwhile (cgroups, veth), so it
    // is built while the parent works — unless the user namespace's id maps are needed
    // first (without them this process cannot create files).
    if !plan.userns {
        build_root(plan, err_fd);
    }
    if sync {
        let mut go = [0u8; 1];
        match sys::read(sync_fd, &mut go) {
            Ok(1) => {}
            // vireo gave up (or died): leave quietly.
            _ => sys::exit_now(125),
        }
    }
    if plan.userns {
        // The id maps are written: become root of the user namespace (until now this
        // process had the unmapped ids it was cloned with, and could not create files).
        step(Stage::Ids, sys::setresgid(0));
        step(Stage::Ids, sys::setresuid(0));
        build_root(plan, err_fd);
    }

    // A session of its own, without a controlling terminal: the jail keeps the terminal as
    // stdio but cannot push input into it for the shell outside (TIOCSTI needs it to be the
    // controlling terminal) nor receive its job-control signals (vireo forwards them). When
    // vireo has no controlling terminal there is none to protect: a process group of its
    // own (signals to vireo's group do not reach it) without a new scheduler autogroup.
    if plan.new_session {
        step(Stage::Session, sys::setsid());
    } else {
        step(Stage::Session, sys::setpgid_self());
    }
    // The cgroup namespace after the parent moved us into our cgroups, so they are our root;
    // the time namespace applies from exec on.
    if let Err(e) = sys::unshare(plan.late_unshare) {
        // A kernel without time namespaces: the cgroup namespace alone.
        let retry = if e.raw_os_error() == Some(libc::EINVAL) {
            sys::unshare(libc::CLONE_NEWCGROUP)
        } else {
            Err(e)
        };
        step(Stage::Namespaces, retry);
    }
    step(Stage::Hostname, sys::sethostname(&plan.hostname));
    step(Stage::Hostname, sys::setdomainname(b"(none)"));
    step(Stage::Network, net::setup_jail(plan.net));
    step(Stage::Cwd, sys::chdir(&plan.cwd));

    // Credentials and capabilities.
    if plan.set_groups {
        step(Stage::Groups, sys::setgroups(&plan.groups));
    }
    if plan.drop_bounding {
        step(
            Stage::Bounding,
            caps::drop_bounding(plan.keep_caps, plan.last_cap),
        );
    }
    step(
        Stage::Ids,
        sys::prctl(libc::PR_SET_KEEPCAPS, 1, 0).map(drop),
    );
    step(Stage::Ids, sys::setresgid(plan.gid));
    step(Stage::Ids, sys::setresuid(plan.uid));
    step(Stage::Caps, caps::set_sets(plan.keep_caps, plan.uid));
    step(
        Stage::Caps,
        sys::prctl(libc::PR_SET_KEEPCAPS, 0, 0).map(drop),
    );
    step(
        Stage::NoNewPrivs,
        sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map(drop),
    );
    step(
        Stage::ParentDied,
        sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0).map(drop),
    );
    if parent_gone(sync_fd) {
        sys::exit_now(125);
    }

    for (target, fd) in plan.stdio.iter().enumerate() {
        if let Some(fd) = fd {
            step(Stage::Fds, sys::dup2(*fd, target as RawFd));
        }
    }
    sys::reset_signals();
    if let Entry::Call(f) = entry {
        // Nothing inherited but stdio: close every other descriptor but the error pipe,
        // filter, then close the error pipe too (which tells the parent the jail is up) and
        // run.
        step(Stage::Fds, close_all_but(&plan.pass_fds, err_fd));
        for p in &plan.seccomp {
            step(Stage::Seccomp, crate::seccomp::apply_raw(p));
        }
        sys::close(err_fd);
        let code = f();
        sys::exit_now(code);
    }
    // Nothing inherited but stdio: every other descriptor closes at exec.
    step(
        Stage::Fds,
        sys::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC),
    );
    for &fd in &plan.pass_fds {
        step(Stage::Fds, sys::dup2(fd, fd));
    }
    for p in &plan.seccomp {
        step(Stage::Seccomp, crate::seccomp::apply_raw(p));
    }

    // argv/envp pointer arrays on the stack (bounded; the parent checked the counts).
    let mut argv = [std::ptr::null::<libc::c_char>(); MAX_ARGS + 1];
    let mut envp = [std::ptr::null::<libc::c_char>(); MAX_ARGS + 1];
    for (slot, a) in argv.iter_mut().zip(&plan.argv) {
        *slot = a.as_ptr();
    }
    for (slot, e) in envp.iter_mut().zip(&plan.env) {
        *slot = e.as_ptr();
    }
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    let mut denied = None;
    for path in &plan.exec_paths {
        let e = sys::execve(path, &argv, &envp);
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => {}
            Some(libc::EACCES) => denied = Some(e),
            _ => {
                last = e;
                break;
            }
        }
    }
    let e = denied.unwrap_or(last);
    fail(err_fd, Stage::Exec, 0, &e)
}

/// Mounts the new root, everything in it, and pivots into it (the old root detached).
fn build_root(plan: &Plan, err_fd: RawFd) {
    let step = |stage: Stage, r: io::Result<()>| {
        if let Err(e) = r {
            fail(err_fd, stage, 0, &e)
        }
    };
    // Mounts: nothing propagates back to the host.
    step(
        Stage::MakePrivate,
        sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None),
    );
    let root_mount = match &plan.root_tmpfs {
        Some(data) => sys::mount(
            Some(c"tmpfs"),
            &plan.root,
            Some(c"tmpfs"),
            MNT_NOSUID | MNT_NODEV,
            Some(data),
        ),
        None => sys::mount(
            Some(&plan.root),
            &plan.root,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        ),
    };
    step(Stage::RootMount, root_mount);
    let root = match sys::openat(
        libc::AT_FDCWD,
        &plan.root,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    ) {
        Ok(fd) => fd,
        Err(e) => fail(err_fd, Stage::RootMount, 0, &e),
    };
    for (i, op) in plan.ops.iter().enumerate() {
        if let Err(e) = run_op(root.as_raw_fd(), op) {
            fail(err_fd, Stage::Op, i, &e);
        }
    }
    if plan.root_read_only {
        step(Stage::RootReadOnly, remount_read_only(root.as_raw_fd()));
    }
    step(Stage::PivotRoot, pivot(root));
}

/// The most arguments (and environment entries) a jailed command may get.
pub const MAX_ARGS: usize = 1024;

/// True when the parent's end of `sync` is closed (it died).
fn parent_gone(sync_fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: sync_fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0 && p.revents & (libc::POLLHUP | libc::POLLIN) != 0
}

fn pivot(root: OwnedFd) -> io::Result<()> {
    // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only the
    // new root (pivot_root(2), "NOTES").
    sys::fchdir(root.as_raw_fd())?;
    drop(root);
    sys::pivot_root(c".", c".")?;
    sys::umount2(c".", libc::MNT_DETACH)?;
    sys::chdir(c"/")
}

/// Opens `dst` below `root` one component at a time, never following a symlink, creating
/// directories (and, with [`Last::File`], the final file) as needed.
fn walk(root: RawFd, dst: &Target, last: Last) -> io::Result<OwnedFd> {
    walk_comps(root, &dst.comps, last)
}

fn walk_comps(root: RawFd, comps: &[CString], last: Last) -> io::Result<OwnedFd> {
    let mut cur: Option<OwnedFd> = None;
    let n = comps.len();
    if n == 0 {
        return sys::openat(root, c".", libc::O_PATH | libc::O_DIRECTORY, 0);
    }
    // Existing paths are only looked up; the others get missing directories created.
    let create = last != Last::Existing;
    let dir_flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY;
    for (i, c) in comps.iter().enumerate() {
        let dir = cur.as_ref().map_or(root, |f| f.as_raw_fd());
        let is_last = i + 1 == n;
        let next = if !is_last || last == Last::Dir {
            match sys::openat(dir, c, dir_flags, 0) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    match sys::mkdirat(dir, c, 0o755) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(e),
                    }
                    sys::openat(dir, c, dir_flags, 0)?
                }
                other => other?,
            }
        } else {
            let f = match sys::openat(dir, c, libc::O_PATH | libc::O_NOFOLLOW, 0) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && last == Last::File => {
                    drop(sys::openat(
                        dir,
                        c,
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                        0o644,
                    )?);
                    sys::openat(dir, c, libc::O_PATH | libc::O_NOFOLLOW, 0)?
                }
                other => other?,
            };
            // O_PATH|O_NOFOLLOW opens a symlink itself: refuse to mount on one.
            let st = sys::fstat(f.as_raw_fd())?;
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            f
        };
        cur = Some(next);
    }
    cur.ok_or_else(|| io::ErrorKind::InvalidInput.into())
}

/// The directory holding `dst`'s last component (created), and that component.
fn walk_parent(root: RawFd, dst: &Target) -> io::Result<(OwnedFd, &CString)> {
    let (name, parents) = dst
        .comps
        .split_last()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dir = walk_comps(root, parents, Last::Dir)?;
    Ok((dir, name))
}

fn remount_read_only(fd: RawFd) -> io::Result<()> {
    // Keep the flags the mount has (a user namespace may not clear locked ones).
    let st = sys::mount_flags(fd)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    let mut buf = [0u8; 32];
    sys::mount(None, sys::fd_path(fd, &mut buf), None, flags, None)
}

fn run_op(root: RawFd, op: &Op) -> io::Result<()> {
    let mut buf = [0u8; 32];
    match op {
        Op::Bind {
            src,
            dst,
            file,
            read_only,
            flags,
        } => {
            let kind = if *file { Last::File } else { Last::Dir };
            let fd = walk(root, dst, kind)?;
            sys::mount(
                Some(src),
                sys::fd_path(fd.as_raw_fd(), &mut buf),
                None,
                libc::MS_BIND | libc::MS_REC | flags,
                None,
            )?;
            if *read_only {
                // Walk again: the new descriptor is on the bind mount, not below it.
                let fd = walk(root, dst, Last::Existing)?;
                remount_read_only(fd.as_raw_fd())?;
            }
            Ok(())
        }
        Op::Tmpfs { dst, data, flags } => {
            let fd = walk(root, dst, Last::Dir)?;
            sys::mount(
                Some(c"tmpfs"),
                sys::fd_path(fd.as_raw_fd(), &mut buf),
                Some(c"tmpfs"),
                *flags,
                Some(data),
            )
        }
        Op::Proc { dst } => {
            let fd = walk(root, dst, Last::Dir)?;
            sys::mount(
                Some(c"proc"),
                sys::fd_path(fd.as_raw_fd(), &mut buf),
                Some(c"proc"),
                MNT_NOSUID | MNT_NODEV | MNT_NOEXEC,
                None,
            )
        }
        Op::Node {
            dst,
            mode,
            rdev,
            uid,
            gid,
        } => {
            let (dir, name) = walk_parent(root, dst)?;
            sys::mknodat(dir.as_raw_fd(), name, *mode, *rdev)?;
            // mknod applies the umask; set the mode exactly.
            sys::fchmodat(dir.as_raw_fd(), name, *mode & 0o7777)?;
            if *uid != 0 || *gid != 0 {
                sys::fchownat(dir.as_raw_fd(), name, *uid, *gid)?;
            }
            Ok(())
        }
        Op::Symlink { target, dst } => {
            let (dir, name) = walk_parent(root, dst)?;
            match sys::symlinkat(target, dir.as_raw_fd(), name) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                other => other,
            }
        }
        Op::MaskFile { dst } => match walk(root, dst, Last::Existing) {
            Ok(fd) => {
                if sys::fstat(fd.as_raw_fd())?.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    // A directory: cover it with an empty read-only tmpfs.
                    return sys::mount(
                        Some(c"tmpfs"),
                        sys::fd_path(fd.as_raw_fd(), &mut buf),
                        Some(c"tmpfs"),
                        libc::MS_RDONLY | MNT_NOSUID | MNT_NODEV | MNT_NOEXEC,
                        Some(c"size=0"),
                    );
                }
                sys::mount(
                    Some(c"/dev/null"),
                    sys::fd_path(fd.as_raw_fd(), &mut buf),
                    None,
                    libc::MS_BIND,
                    None,
                )
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        },
        Op::ReadOnly { dst } => match walk(root, dst, Last::Existing) {
            Ok(fd) => {
                sys::mount(
                    Some(sys::fd_path(fd.as_raw_fd(), &mut [0u8; 32])),
                    sys::fd_path(fd.as_raw_fd(), &mut buf),
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                )?;
                let fd = walk(root, dst, Last::Existing)?;
                remount_read_only(fd.as_raw_fd())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_codes_round_trip() {
        for (i, s) in Stage::ALL.iter().enumerate() {
            assert_eq!(s.code(), i as u32 + 1);
            assert_eq!(Stage::from_code(s.code()), Some(*s));
        }
        assert_eq!(
            Stage::from_code(0),
            None,
            "an all-zero report names no stage"
        );
        assert_eq!(Stage::from_code(Stage::ALL.len() as u32 + 1), None);
        assert_eq!(Stage::from_code(1), Some(Stage::Sync));
        assert_eq!(Stage::from_code(Stage::ALL.len() as u32), Some(Stage::Exec));
    }

    #[test]
    fn exec_candidates_follow_path() {
        let env = [OsString::from("PATH=/a:/b")];
        let c = exec_candidates(OsStr::new("sh"), &env).unwrap();
        assert_eq!(c, [c"/a/sh".to_owned(), c"/b/sh".to_owned()]);
        let c = exec_candidates(OsStr::new("/bin/sh"), &env).unwrap();
        assert_eq!(c, [c"/bin/sh".to_owned()]);
    }
}
