//! Containers: a jail on a root file system directory, with a name and a state directory
//! (`/run/vireo/containers/<id>/state.json`) so that other vireo processes can list, stop and
//! resize it.
//!
//! The name is reserved by a lock file `/run/vireo/containers/.<id>.lock` (created
//! exclusively, naming the owning vireo) for the container's whole life; the state directory
//! is only made for a command still running [`STATE_DELAY`] after it started (or when
//! [`Container::wait`] is called), so a container shows in `list` from then on. A directory
//! gets a block at
//! `mkdir`, and freeing it where `/run` is a disk file system mounted with `discard` (not a
//! tmpfs) is a synchronous discard request on the critical path of every short-lived
//! container; a small file removed before write-back never gets a block.
//!
//! The `vireo container run` process is the container's parent and stays for its whole life:
//! it forwards signals, waits, and removes the cgroups, the veth pair and the state when the
//! command exits. When that process is killed outright, the container's init dies with it
//! (`PR_SET_PDEATHSIG`), the kernel tears down the PID and network namespaces (deleting the
//! veth pair), and the next `vireo container` command removes the empty cgroups and the stale
//! state (see [`crate::record`]).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::caps::CapSet;
use crate::cgroup::{Cgroup, Hierarchies, HostResources, Limits, Stats};
use crate::net::NetSpec;
use crate::record::{self, ProcessId};
use crate::seccomp::{SyscallList, Violation};
use crate::spawn::{spawn, Exit, JailedChild, SignalForwarding};
use crate::spec::{valid_name, IdMap, JailSpec, Mount, Root, DEFAULT_PATH};
use crate::Error;

/// Where container state lives.
pub const STATE_DIR: &str = "/run/vireo/containers";

/// How long a container runs before its state directory is written (see the module doc).
pub const STATE_DELAY: Duration = Duration::from_millis(50);

/// The host uid/gid range a container's ids map to with a user namespace: container root is
/// host uid 100000 (as in `/etc/subuid` defaults).
pub const USERNS_BASE: u32 = 100_000;
/// How many ids the user namespace maps.
pub const USERNS_SIZE: u32 = 65_536;

/// What to run.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The container's name; a random one when `None`.
    pub name: Option<String>,
    /// The root file system directory.
    pub rootfs: PathBuf,
    /// Mount the root file system read-only.
    pub read_only: bool,
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// Extra environment (`KEY=VALUE`), on top of `PATH`, `HOME`, `HOSTNAME` and the caller's
    /// `TERM`.
    pub env: Vec<OsString>,
    /// Working directory inside.
    pub workdir: PathBuf,
    /// Hostname (default: the name).
    pub hostname: Option<String>,
    pub limits: Limits,
    /// `ip=ADDR/PREFIX[,host=ADDR]`: a veth pair into the host.
    pub net: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// Run in a user namespace: root inside is an unprivileged host uid.
    pub userns: bool,
    /// Extra bind mounts.
    pub mounts: Vec<Mount>,
    /// Capabilities to keep (default none).
    pub keep_caps: CapSet,
    /// The seccomp allow-list (violations fail with `EPERM`); `None` runs unconfined.
    pub seccomp: Option<SyscallList>,
}

impl ContainerSpec {
    /// Defaults: root inside with no capabilities, the default seccomp list, no limits.
    pub fn new(rootfs: impl Into<PathBuf>, command: Vec<OsString>) -> Result<ContainerSpec, Error> {
        Ok(ContainerSpec {
            name: None,
            rootfs: rootfs.into(),
            read_only: false,
            command,
            env: Vec::new(),
            workdir: PathBuf::from("/"),
            hostname: None,
            limits: Limits::default(),
            net: None,
            uid: 0,
            gid: 0,
            userns: false,
            mounts: Vec::new(),
            keep_caps: CapSet::EMPTY,
            seccomp: Some(SyscallList::parse(
                "container",
                crate::seccomp::CONTAINER_DEFAULT,
            )?),
        })
    }
}

/// A container's state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    /// The container's init, as a host process.
    pub init: ProcessId,
    /// The `vireo container run` process.
    pub owner: ProcessId,
    pub rootfs: PathBuf,
    pub command: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub cgroup: Option<Cgroup>,
    pub net: Option<NetSpec>,
    pub limits: Limits,
}

/// A listed container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    #[serde(flatten)]
    pub state: State,
    pub stats: Stats,
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit: Exit,
    /// Processes the kernel's OOM killer killed in the container.
    pub oom_kills: u64,
    /// Forks refused at the pid limit.
    pub pids_refused: u64,
}

/// Containers under one state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    dir: PathBuf,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime::new(STATE_DIR)
    }
}

/// A running container (owned by this process). Dropping it kills it and cleans up.
#[derive(Debug)]
pub struct Container {
    child: JailedChild,
    state: State,
    dir: PathBuf,
    /// The name's lock file.
    lock: PathBuf,
    /// Whether `dir` was created.
    state_written: bool,
    /// When the command was started.
    started: Instant,
    /// `dir` is still to be written (the command may be gone before [`STATE_DELAY`]).
    state_pending: bool,
}

impl Container {
    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The jail.
    pub fn child(&self) -> &JailedChild {
        &self.child
    }

    /// Waits for the command to exit, forwarding the signals `fwd` blocked on. Writes the
    /// container's state if it still runs [`STATE_DELAY`] after it started.
    pub fn wait_forwarding(&mut self, fwd: &SignalForwarding) -> Result<Outcome, Error> {
        if self.state_pending {
            let deadline = self.started + STATE_DELAY;
            if let Some(exit) = self.child.wait_forwarding_until(fwd, Some(deadline))? {
                return Ok(self.outcome(exit));
            }
            self.write_state()?;
        }
        let exit = self.child.wait_forwarding(fwd)?;
        Ok(self.outcome(exit))
    }

    /// Waits for the command to exit (its state is written first if it still runs).
    pub fn wait(&mut self) -> Result<Outcome, Error> {
        if self.state_pending && self.child.try_wait()?.is_none() {
            self.write_state()?;
        }
        let exit = self.child.wait()?;
        Ok(self.outcome(exit))
    }

    /// Writes the state directory now.
    fn write_state(&mut self) -> Result<(), Error> {
        self.state_pending = false;
        fs::create_dir(&self.dir).map_err(|e| Error::Io {
            context: format!("creating {}", self.dir.display()),
            source: e,
        })?;
        self.state_written = true;
        write_state_file(&self.dir.join("state.json"), &self.state)
    }

    fn outcome(&mut self, exit: Exit) -> Outcome {
        let stats = self.child.final_stats().cloned().unwrap_or_default();
        self.state_pending = false;
        self.remove_files();
        Outcome {
            exit,
            oom_kills: stats.oom_kills.unwrap_or(0),
            pids_refused: stats.pids_refused.unwrap_or(0),
        }
    }
}

impl Container {
    /// Removes the state directory (if made) and the name's lock, once.
    fn remove_files(&mut self) {
        if self.state_written {
            let _ = fs::remove_dir_all(&self.dir);
            self.state_written = false;
        }
        let _ = fs::remove_file(&self.lock);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // The child's own Drop kills it and removes its cgroups first.
        let _ = self.child.kill(libc::SIGKILL);
        let _ = self.child.wait();
        self.remove_files();
    }
}

/// Writes `s` to `path` atomically (a temporary file, then a rename).
fn write_state_file(path: &Path, s: &State) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(s).map_err(|e| Error::Io {
        context: "encoding the container state".into(),
        source: io::Error::other(e),
    })?;
    fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| Error::Io {
            context: format!("writing {}", path.display()),
            source: e,
        })
}

/// The lock file reserving container name `id` in `dir`.
fn lock_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!(".{id}.lock"))
}

/// The container id a lock file name reserves (`.<id>.lock`).
fn locked_id(file_name: &str) -> Option<&str> {
    file_name
        .strip_prefix('.')?
        .strip_suffix(".lock")
        .filter(|id| valid_name(id))
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n.div_ceil(2)];
    let filled = fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !filled {
        // Fall back to time and PID: unique enough for names, which are checked anyway.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = t ^ u128::from(std::process::id()) << 64;
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .take(n)
        .collect::<String>()[..n]
        .to_string()
}

/// Processes in the PID namespace of `init` (by `/proc/<pid>/ns/pid`).
fn pids_in_namespace_of(init: ProcessId) -> Vec<i32> {
    if !init.alive() {
        return Vec::new();
    }
    let Ok(ns) = fs::read_link(format!("/proc/{}/ns/pid", init.pid)) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| fs::read_link(format!("/proc/{p}/ns/pid")).ok().as_ref() == Some(&ns))
        .collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Runtime {
    pub fn new(dir: impl Into<PathBuf>) -> Runtime {
        Runtime { dir: dir.into() }
    }

    fn state_path(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("state.json")
    }

    fn read_state(&self, id: &str) -> Option<State> {
        let text = fs::read(self.state_path(id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_state(&self, s: &State) -> Result<(), Error> {
        write_state_file(&self.state_path(&s.id), s)
    }

    /// Removes state (and, through the jail records, cgroups and veth pairs) of containers
    /// whose vireo is gone; returns their ids.
    pub fn sweep(&self) -> Vec<String> {
        record::sweep(Path::new(record::RECORD_DIR));
        let mut removed = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return removed;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if locked_id(&id).is_some() {
                // The lock names its vireo; one being written right now names none yet, so
                // an unreadable lock only goes when it is old.
                let owner = fs::read(e.path())
                    .ok()
                    .and_then(|t| serde_json::from_slice::<ProcessId>(&t).ok());
                let stale = match owner {
                    Some(o) => !o.alive(),
                    None => older_than_a_minute(&e),
                };
                if stale {
                    let _ = fs::remove_file(e.path());
                }
                continue;
            }
            if id.starts_with('.') {
                continue;
            }
            let stale = match self.read_state(&id) {
                Some(s) => !s.owner.alive(),
                // No state yet: a container starting right now, or debris. Only remove it
                // when it is old.
                None => older_than_a_minute(&e),
            };
            if stale {
                if let Some(s) = self.read_state(&id) {
                    if s.init.alive() {
                        let _ = crate::sys::kill(s.init.pid, libc::SIGKILL);
                    }
                }
                let _ = fs::remove_dir_all(e.path());
                removed.push(id);
            }
        }
        removed
    }

    /// Starts a container. The caller should have blocked the signals it wants forwarded
    /// ([`SignalForwarding::block`]) before calling this.
    pub fn run(&self, spec: &ContainerSpec) -> Result<Container, Error> {
        if !crate::is_root() {
            return Err(Error::NotRoot);
        }
        self.sweep();
        let id = match &spec.name {
            Some(n) if valid_name(n) && n.len() <= 48 => n.clone(),
            Some(n) => {
                return Err(Error::InvalidSpec(format!(
                    "invalid container name '{n}': use 1 to 48 letters, digits, '-', '_' or '.'"
                )))
            }
            None => random_hex(12),
        };
        if !spec.rootfs.is_dir() {
            return Err(Error::RootfsMissing {
                path: spec.rootfs.clone(),
            });
        }
        fs::create_dir_all(&self.dir).map_err(|e| Error::Io {
            context: format!("creating {}", self.dir.display()),
            source: e,
        })?;
        let dir = self.dir.join(&id);
        let lock = lock_path(&self.dir, &id);
        let owner = ProcessId::current().unwrap_or(ProcessId {
            pid: std::process::id() as i32,
            start: 0,
        });
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(mut f) => {
                let json = serde_json::to_vec(&owner).unwrap_or_default();
                if let Err(e) = io::Write::write_all(&mut f, &json) {
                    let _ = fs::remove_file(&lock);
                    return Err(Error::Io {
                        context: format!("writing {}", lock.display()),
                        source: e,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::ContainerExists(id))
            }
            Err(e) => {
                return Err(Error::Io {
                    context: format!("creating {}", lock.display()),
                    source: e,
                })
            }
        }
        // A state directory without a lock: a container of an older vireo.
        if dir.exists() {
            let _ = fs::remove_file(&lock);
            return Err(Error::ContainerExists(id));
        }
        match self.start(spec, &id, &dir, owner, &lock) {
            Ok(c) => Ok(c),
            Err(e) => {
                let _ = fs::remove_file(&lock);
                Err(e)
            }
        }
    }

    fn start(
        &self,
        spec: &ContainerSpec,
        id: &str,
        dir: &Path,
        owner: ProcessId,
        lock: &Path,
    ) -> Result<Container, Error> {
        let net = match &spec.net {
            Some(text) => Some(
                NetSpec::parse(text, &format!("vr-{}", random_hex(12)))
                    .map_err(Error::InvalidSpec)?,
            ),
            None => None,
        };
        let hostname = spec.hostname.clone().unwrap_or_else(|| id.to_string());
        let mut jail = JailSpec::new(id, spec.command.clone());
        jail.root = Root::Dir {
            path: spec.rootfs.clone(),
            read_only: spec.read_only,
        };
        jail.mounts = spec.mounts.clone();
        if spec.read_only {
            // A writable /tmp, as most programs expect one.
            jail.mounts.push(Mount::Tmpfs {
                target: "/tmp".into(),
                size: 64 << 20,
                mode: 0o1777,
            });
        }
        jail.hostname = hostname.clone();
        jail.limits = spec.limits.clone();
        jail.net = net.clone();
        jail.uid = spec.uid;
        jail.gid = spec.gid;
        jail.keep_caps = spec.keep_caps;
        jail.user_namespace = spec.userns.then_some(IdMap {
            inside: 0,
            outside: USERNS_BASE,
            count: USERNS_SIZE,
        });
        jail.seccomp = spec
            .seccomp
            .clone()
            .map(|l| (l, Violation::Errno(libc::EPERM)));
        jail.cwd = spec.workdir.clone();
        let home = if spec.uid == 0 { "/root" } else { "/" };
        let mut env: Vec<OsString> = vec![
            format!("PATH={DEFAULT_PATH}").into(),
            format!("HOME={home}").into(),
            format!("HOSTNAME={hostname}").into(),
        ];
        if let Some(term) = std::env::var_os("TERM") {
            let mut t = OsString::from("TERM=");
            t.push(term);
            env.push(t);
        }
        env.extend(spec.env.iter().cloned());
        jail.env = env;

        let child = spawn(&jail)?;
        let started = Instant::now();
        let init = ProcessId::of(child.pid()).unwrap_or(ProcessId {
            pid: child.pid(),
            start: 0,
        });
        let state = State {
            id: id.to_string(),
            init,
            owner,
            rootfs: fs::canonicalize(&spec.rootfs).unwrap_or_else(|_| spec.rootfs.clone()),
            command: spec
                .command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            created: now_secs(),
            cgroup: child.cgroup().cloned(),
            net,
            limits: spec.limits.clone(),
        };
        Ok(Container {
            child,
            state,
            dir: dir.to_path_buf(),
            lock: lock.to_path_buf(),
            state_written: false,
            state_pending: true,
            started,
        })
    }

    /// Running containers (stale ones are cleaned up first).
    pub fn list(&self) -> Result<Vec<Info>, Error> {
        self.sweep();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Some(state) = self.read_state(&id) {
                let stats = state.cgroup.as_ref().map(Cgroup::stats).unwrap_or_default();
                out.push(Info { state, stats });
            }
        }
        out.sort_by(|a, b| (a.state.created, &a.state.id).cmp(&(b.state.created, &b.state.id)));
        Ok(out)
    }

    fn running(&self, id: &str) -> Result<State, Error> {
        self.sweep();
        match self.read_state(id) {
            Some(s) if s.owner.alive() => Ok(s),
            _ => Err(Error::NoSuchContainer(id.to_string())),
        }
    }

    /// Stops container `id`: `SIGTERM` to its init, `SIGKILL` after `grace`, then waits for its
    /// vireo to clean up (or cleans up itself if that vireo is gone).
    pub fn stop(&self, id: &str, grace: Duration) -> Result<(), Error> {
        let s = self.running(id)?;
        if s.init.alive() {
            let _ = crate::sys::kill(s.init.pid, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while s.init.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if s.init.alive() {
                let _ = crate::sys::kill(s.init.pid, libc::SIGKILL);
            }
        }
        // Its vireo reaps it and removes the state directory.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.dir.join(id).exists() && Instant::now() < deadline {
            if !s.owner.alive() {
                self.sweep();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.dir.join(id).exists() && s.owner.alive() {
            return Err(Error::Io {
                context: format!(
                    "container {id} was killed but its vireo (pid {}) has not cleaned up",
                    s.owner.pid
                ),
                source: io::ErrorKind::TimedOut.into(),
            });
        }
        Ok(())
    }

    /// Changes the limits of running container `id` (those `update` sets; the others stay).
    pub fn update(&self, id: &str, update: &Limits) -> Result<Limits, Error> {
        let mut s = self.running(id)?;
        let merged = s.limits.merged(update);
        merged.check(&HostResources::probe())?;
        let h = Hierarchies::detect()?;
        let mut cg = s.cgroup.clone().unwrap_or(Cgroup {
            v1: Default::default(),
            v2: None,
            v2_controllers: Vec::new(),
        });
        // Controllers the container did not use yet get its processes moved in: those its
        // v2 directory lists, or else those in its PID namespace.
        let tracking = cg.v2.clone();
        let init = s.init;
        let pids = move || match &tracking {
            Some(dir) => fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect(),
            None => pids_in_namespace_of(init),
        };
        cg.extend(&h, id, update, pids)?;
        s.cgroup = Some(cg);
        s.limits = merged.clone();
        self.write_state(&s)?;
        Ok(merged)
    }
}

/// True for a directory entry last modified over a minute ago: debris, not something being
/// written right now.
fn older_than_a_minute(e: &fs::DirEntry) -> bool {
    e.metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_names() {
        let a = random_hex(12);
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(12));
        assert_eq!(random_hex(3).len(), 3);
    }

    #[test]
    fn lock_names() {
        let p = lock_path(Path::new("/run/x"), "c1");
        assert_eq!(p, Path::new("/run/x/.c1.lock"));
        assert_eq!(locked_id(".c1.lock"), Some("c1"));
        assert_eq!(locked_id("c1"), None);
        assert_eq!(locked_id(".c1.tmp"), None);
        assert_eq!(locked_id("..lock"), None, "an empty name is no container");
    }

    #[test]
    fn state_round_trips_as_json() {
        let s = State {
            id: "c1".into(),
            init: ProcessId { pid: 10, start: 20 },
            owner: ProcessId { pid: 11, start: 21 },
            rootfs: "/srv/root".into(),
            command: vec!["sh".into()],
            created: 1,
            cgroup: None,
            net: Some(NetSpec::parse("ip=10.0.0.2/24", "vr-x").unwrap()),
            limits: Limits::parse_list("mem=64M,cpu=0.5").unwrap(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"10.0.0.2/24\""), "{json}");
        let back: State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn stale_state_is_swept_and_live_state_kept() {
        let dir = std::env::temp_dir().join(format!("vireo-ctr-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let rt = Runtime::new(&dir);
        let me = ProcessId::current().unwrap();
        let mk = |id: &str, owner: ProcessId| {
            fs::create_dir_all(dir.join(id)).unwrap();
            rt.write_state(&State {
                id: id.into(),
                init: ProcessId { pid: -1, start: 0 },
                owner,
                rootfs: "/".into(),
                command: vec![],
                created: 0,
                cgroup: None,
                net: None,
                limits: Limits::default(),
            })
            .unwrap();
        };
        mk("mine", me);
        mk(
            "orphan",
            ProcessId {
                pid: me.pid,
                start: me.start + 1,
            },
        );
        fs::create_dir_all(dir.join("starting")).unwrap();
        // Name locks: one of a live vireo, one of a dead one, one being written (no owner
        // yet, young).
        let lock = |id: &str, owner: Option<ProcessId>| {
            let json = owner
                .map(|o| serde_json::to_vec(&o).unwrap())
                .unwrap_or_default();
            fs::write(lock_path(&dir, id), json).unwrap();
        };
        lock("mine", Some(me));
        lock(
            "gone",
            Some(ProcessId {
                pid: me.pid,
                start: me.start + 1,
            }),
        );
        lock("new", None);
        assert_eq!(rt.sweep(), ["orphan"]);
        assert!(lock_path(&dir, "mine").exists());
        assert!(
            !lock_path(&dir, "gone").exists(),
            "a dead owner's lock is removed"
        );
        assert!(
            lock_path(&dir, "new").exists(),
            "a young lock being written stays"
        );
        assert!(dir.join("mine").exists());
        assert!(
            dir.join("starting").exists(),
            "young directories without state stay"
        );
        let ids: Vec<String> = rt.list().unwrap().into_iter().map(|i| i.state.id).collect();
        assert_eq!(ids, ["mine"]);
        assert!(matches!(
            rt.stop("orphan", Duration::ZERO),
            Err(Error::NoSuchContainer(_))
        ));
        assert!(matches!(
            rt.update("nope", &Limits::default()),
            Err(Error::NoSuchContainer(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
