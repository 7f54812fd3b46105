//! Control groups: resource limits for a jail on cgroup v2 (Documentation/admin-guide/
//! cgroup-v2.rst) and on hosts that still mount v1 controllers (cgroup-v1/*.rst), detected per
//! controller from `/proc/self/mountinfo`.
//!
//! Each jail gets one directory per hierarchy, `<mount>/vireo/<name>`: on v1 one per
//! controller it uses, on v2 one directory with the controllers it uses enabled from the root
//! down. On a hybrid host (v1 controllers plus a unified hierarchy) the jail also gets a v2
//! directory without controllers, which tracks its processes and can kill them all at once
//! (`cgroup.kill`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The directory under each hierarchy's root that holds vireo's cgroups.
pub const PARENT: &str = "vireo";

/// The CFS period used for CPU max (cgroup v2 default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The smallest memory limit accepted: less cannot even start a shell.
pub const MIN_MEMORY: u64 = 4 << 20;

/// A controller a limit needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    Cpuset,
}

impl Controller {
    pub const ALL: [Controller; 4] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Cpuset,
    ];

    /// The kernel's name of the controller.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuset => "cpuset",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A list of CPU numbers, written like `0-3,6` (the cpuset list format).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CpuList(pub Vec<u32>);

impl FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid CPU list '{s}': use numbers and ranges like 0-3,6");
        let mut cpus = Vec::new();
        for part in s.trim().split(',').filter(|p| !p.trim().is_empty()) {
            let part = part.trim();
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let a: u32 = a.trim().parse().map_err(|_| bad())?;
            let b: u32 = b.trim().parse().map_err(|_| bad())?;
            if a > b || b >= 8192 {
                return Err(bad());
            }
            cpus.extend(a..=b);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }
}

impl TryFrom<String> for CpuList {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<CpuList> for String {
    fn from(c: CpuList) -> String {
        c.to_string()
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Resource limits. `None` leaves the kernel's default (no limit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (anonymous + page cache + kernel) in bytes: v2 `memory.max`, v1
    /// `memory.limit_in_bytes`. The kernel reclaims, then OOM-kills inside the group.
    pub memory_max: Option<u64>,
    /// Swap the group may use on top of `memory_max`: v2 `memory.swap.max`, v1
    /// `memory.memsw.limit_in_bytes` (= memory + swap). Needs swap accounting.
    pub memory_swap_max: Option<u64>,
    /// Processes and threads: `pids.max`. `fork`/`clone` fail with `EAGAIN` beyond it.
    pub pids_max: Option<u64>,
    /// Relative CPU share when CPUs are contended, 1 to 10000 (default 100): v2 `cpu.weight`,
    /// v1 `cpu.shares` (weight × 1024 / 100). Alone it is "uncapped": idle CPU time is used.
    pub cpu_weight: Option<u32>,
    /// CPU time cap in CPUs (0.5 = half of one CPU per period; "capped"): v2 `cpu.max`, v1
    /// `cpu.cfs_quota_us`/`cpu.cfs_period_us`, with a 100 ms period.
    pub cpu_max: Option<f64>,
    /// CPUs the group may run on: `cpuset.cpus`.
    pub cpuset_cpus: Option<CpuList>,
}

impl Limits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// `self` with every limit `update` sets replaced.
    pub fn merged(&self, update: &Limits) -> Limits {
        Limits {
            memory_max: update.memory_max.or(self.memory_max),
            memory_swap_max: update.memory_swap_max.or(self.memory_swap_max),
            pids_max: update.pids_max.or(self.pids_max),
            cpu_weight: update.cpu_weight.or(self.cpu_weight),
            cpu_max: update.cpu_max.or(self.cpu_max),
            cpuset_cpus: update.cpuset_cpus.clone().or(self.cpuset_cpus.clone()),
        }
    }

    /// The controllers these limits need, each with the flag that asked for it.
    pub fn needed(&self) -> Vec<(Controller, &'static str)> {
        let mut v = Vec::new();
        if self.memory_max.is_some() || self.memory_swap_max.is_some() {
            v.push((Controller::Memory, "memory"));
        }
        if self.pids_max.is_some() {
            v.push((Controller::Pids, "pids"));
        }
        if self.cpu_weight.is_some() || self.cpu_max.is_some() {
            v.push((Controller::Cpu, "cpu"));
        }
        if self.cpuset_cpus.is_some() {
            v.push((Controller::Cpuset, "cpuset"));
        }
        v
    }

    /// Parses `mem=512M,swap=0,pids=64,cpu=0.5,weight=200,cpuset=0-1` (any subset, any order;
    /// `memory=` is the same as `mem=`).
    pub fn parse_list(s: &str) -> Result<Limits, String> {
        let mut l = Limits::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("'{item}' is not KEY=VALUE"))?;
            match key.trim() {
                "mem" | "memory" => l.memory_max = Some(parse_size(value)?),
                "swap" => l.memory_swap_max = Some(parse_size(value)?),
                "pids" => l.pids_max = Some(parse_pids(value)?),
                "cpu" | "cpus" => l.cpu_max = Some(parse_cpus(value)?),
                "weight" => l.cpu_weight = Some(parse_weight(value)?),
                "cpuset" => l.cpuset_cpus = Some(value.parse()?),
                other => {
                    return Err(format!(
                        "unknown limit '{other}': use mem, swap, pids, cpu, weight or cpuset"
                    ))
                }
            }
        }
        Ok(l)
    }

    /// Checks the limits against what this host can give; the error says what to change.
    pub fn check(&self, host: &HostResources) -> Result<(), Error> {
        let unavailable = |what: String, why: String| Err(Error::LimitUnavailable { what, why });
        if let Some(m) = self.memory_max {
            if m < MIN_MEMORY {
                return unavailable(
                    format!("memory limit {}", fmt_size(m)),
                    format!("it is below the minimum of {}", fmt_size(MIN_MEMORY)),
                );
            }
            if host.memory > 0 && m > host.memory {
                return unavailable(
                    format!("memory limit {}", fmt_size(m)),
                    format!("this host has only {} of memory", fmt_size(host.memory)),
                );
            }
        }
        if self.memory_swap_max.is_some() && self.memory_max.is_none() {
            return unavailable(
                "a swap limit".into(),
                "it needs a memory limit too (mem=...)".into(),
            );
        }
        if let Some(c) = self.cpu_max {
            let n = host.cpus.0.len() as f64;
            if !(c.is_finite() && c > 0.0) {
                return unavailable(format!("CPU max {c}"), "it must be above 0".into());
            }
            if c * CPU_PERIOD_US as f64 + 0.5 < 1000.0 {
                return unavailable(
                    format!("CPU max {c}"),
                    "the kernel's smallest quota is 0.01 CPU (1 ms per 100 ms)".into(),
                );
            }
            if n > 0.0 && c > n {
                return unavailable(
                    format!("CPU max {c}"),
                    format!("this host has {n} CPUs ({})", host.cpus),
                );
            }
        }
        if let Some(set) = &self.cpuset_cpus {
            if set.0.is_empty() {
                return unavailable("an empty CPU set".into(), "name at least one CPU".into());
            }
            if let Some(bad) = set.0.iter().find(|c| !host.cpus.0.contains(c)) {
                return unavailable(
                    format!("CPU set {set}"),
                    format!("CPU {bad} is not available here (CPUs: {})", host.cpus),
                );
            }
        }
        Ok(())
    }
}

fn parse_pids(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "invalid process limit '{s}': use a whole number of at least 1"
        )),
    }
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(c) if c.is_finite() && c > 0.0 => Ok(c),
        _ => Err(format!(
            "invalid CPU amount '{s}': use a number of CPUs like 0.5 or 2"
        )),
    }
}

fn parse_weight(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(w) if (1..=10_000).contains(&w) => Ok(w),
        _ => Err(format!(
            "invalid CPU weight '{s}': use 1 to 10000 (default 100)"
        )),
    }
}

/// Parses a process limit (public for the CLI).
pub fn parse_pids_arg(s: &str) -> Result<u64, String> {
    parse_pids(s)
}

/// Parses a CPU amount (public for the CLI).
pub fn parse_cpus_arg(s: &str) -> Result<f64, String> {
    parse_cpus(s)
}

/// Parses a CPU weight (public for the CLI).
pub fn parse_weight_arg(s: &str) -> Result<u32, String> {
    parse_weight(s)
}

/// Parses `256M`, `2G`, `512K`, `100B`, `1073741824` (bytes when there is no unit; `max` is
/// not accepted: leave the limit out instead).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_with_default_shift(s, 0)
}

/// [`parse_size`] where a bare number is in units of `1 << default_shift` bytes (20: MiB, as
/// QEMU's `-m`).
pub fn parse_size_with_default_shift(s: &str, default_shift: u32) -> Result<u64, String> {
    let bad = || format!("invalid size '{s}': use a number with a unit, like 256M or 2G");
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, default_shift),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// `268435456` → `256M`.
pub fn fmt_size(b: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{}{unit}", b >> shift);
        }
    }
    if b >= 10 << 20 {
        return format!("{:.1}M", b as f64 / f64::from(1 << 20));
    }
    format!("{b}B")
}

/// What the host has, for [`Limits::check`].
#[derive(Debug, Clone, Default)]
pub struct HostResources {
    /// Physical memory in bytes (`MemTotal`), 0 if unknown.
    pub memory: u64,
    /// CPUs this process may use.
    pub cpus: CpuList,
}

impl HostResources {
    /// Reads `/proc/meminfo` and the calling thread's CPU affinity.
    pub fn probe() -> HostResources {
        let memory = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let kb = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
                    kb.trim().parse::<u64>().ok()
                })
            })
            .map_or(0, |kb| kb * 1024);
        let cpus = affinity().unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            CpuList((0..n).collect())
        });
        HostResources { memory, cpus }
    }
}

fn affinity() -> Option<CpuList> {
    // SAFETY: all-zero is a valid cpu_set_t; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size matches the set passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return None;
    }
    let cpus: Vec<u32> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, the bound CPU_ISSET requires.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .map(|i| i as u32)
        .collect();
    (!cpus.is_empty()).then_some(CpuList(cpus))
}

/// Where each controller lives on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hierarchies {
    /// Controllers mounted as cgroup v1: controller → mount point.
    pub v1: BTreeMap<Controller, PathBuf>,
    /// The cgroup v2 (unified) mount, if any.
    pub v2: Option<PathBuf>,
    /// Controllers the v2 root offers (`cgroup.controllers`).
    pub v2_controllers: Vec<Controller>,
}

impl Hierarchies {
    /// Reads `/proc/self/mountinfo` and the v2 root's `cgroup.controllers`.
    pub fn detect() -> Result<Hierarchies, Error> {
        let text = fs::read_to_string("/proc/self/mountinfo").map_err(|e| Error::Io {
            context: "reading /proc/self/mountinfo".into(),
            source: e,
        })?;
        Ok(Self::from_mountinfo(&text, |p| {
            fs::read_to_string(p.join("cgroup.controllers")).ok()
        }))
    }

    /// Parses mountinfo text (proc(5)); `controllers` reads a v2 mount's `cgroup.controllers`.
    pub fn from_mountinfo(text: &str, controllers: impl Fn(&Path) -> Option<String>) -> Self {
        let mut h = Hierarchies::default();
        for line in text.lines() {
            // Fields: id parent major:minor root mountpoint options [optional...] - fstype src super
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(mountpoint), Some(fstype)) = (left.get(4), right.first()) else {
                continue;
            };
            // Only whole hierarchies (root "/"): a bind of a sub-cgroup is not a place to
            // create ours.
            if left.get(3) != Some(&"/") {
                continue;
            }
            let mountpoint = PathBuf::from(unescape_mountinfo(mountpoint));
            match *fstype {
                "cgroup2" if h.v2.is_none() => {
                    h.v2_controllers = controllers(&mountpoint)
                        .map(|t| {
                            t.split_whitespace()
                                .filter_map(|c| Controller::ALL.into_iter().find(|k| k.name() == c))
                                .collect()
                        })
                        .unwrap_or_default();
                    h.v2 = Some(mountpoint);
                }
                "cgroup" => {
                    let opts = right.get(2).copied().unwrap_or("");
                    for c in Controller::ALL {
                        if opts.split(',').any(|o| o == c.name()) {
                            h.v1.entry(c).or_insert_with(|| mountpoint.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        // A controller bound to a v1 hierarchy is not usable in v2.
        let v1 = h.v1.clone();
        h.v2_controllers.retain(|c| !v1.contains_key(c));
        h
    }

    /// Where `c` is used: v1 first (a controller can only be in one hierarchy), then v2.
    pub fn locate(&self, c: Controller) -> Option<Version> {
        if self.v1.contains_key(&c) {
            Some(Version::V1)
        } else if self.v2.is_some() && self.v2_controllers.contains(&c) {
            Some(Version::V2)
        } else {
            None
        }
    }
}

/// Which cgroup version a controller is used through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Usage figures of a cgroup (what the host's files report; `None` where unavailable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub oom_kills: Option<u64>,
    pub pids_current: Option<u64>,
    /// How often a fork was refused at the pid limit.
    pub pids_refused: Option<u64>,
}

/// One jail's cgroups. Serializable, so that a later process (`container stop`, the clean-up
/// of a killed vireo) can find and remove them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    /// v1 directories, one per controller.
    pub v1: BTreeMap<Controller, PathBuf>,
    /// The v2 directory, if the host has a unified hierarchy.
    pub v2: Option<PathBuf>,
    /// Controllers used through `v2`.
    pub v2_controllers: Vec<Controller>,
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

impl Cgroup {
    /// Creates `<hierarchy>/vireo/<name>` for every controller `limits` needs, and, when the
    /// host has a unified hierarchy, a v2 directory that tracks the jail's processes (with the
    /// controllers that live on v2 enabled); then applies `limits`. A limit whose controller
    /// the host does not have is an error naming it. On error nothing is left behind.
    ///
    /// Controllers nobody asked for are not used: moving a process into a v1 cgroup waits
    /// for an RCU grace period (milliseconds), while the v2 directory is entered for free at
    /// `clone3(CLONE_INTO_CGROUP)`. [`Cgroup::extend`] adds controllers later.
    pub fn create(h: &Hierarchies, name: &str, limits: &Limits) -> Result<Cgroup, Error> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::InvalidSpec(format!("invalid cgroup name '{name}'")));
        }
        let mut cg = Cgroup {
            v1: BTreeMap::new(),
            v2: None,
            v2_controllers: Vec::new(),
        };
        if let Err(e) = cg.add_dirs(h, name, limits, true) {
            let _ = cg.clone().remove();
            return Err(e);
        }
        if let Err(e) = cg.apply(limits) {
            let _ = cg.clone().remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Creates the directories `limits` needs that the group lacks (and the v2 directory if
    /// `with_v2`); returns the new v1 directories.
    fn add_dirs(
        &mut self,
        h: &Hierarchies,
        name: &str,
        limits: &Limits,
        with_v2: bool,
    ) -> Result<Vec<PathBuf>, Error> {
        let mut wanted = Vec::new();
        for (c, flag) in limits.needed() {
            if h.locate(c).is_none() {
                return Err(Error::NoController {
                    controller: c.name(),
                    limit: flag,
                });
            }
            if !wanted.contains(&c) {
                wanted.push(c);
            }
        }
        let mut new_v1 = Vec::new();
        for c in &wanted {
            let Some(mount) = h.v1.get(c) else { continue };
            if self.v1.contains_key(c) {
                continue;
            }
            let parent = mount.join(PARENT);
            let dir = parent.join(name);
            mkdir_with_parent(&parent, &dir)?;
            self.v1.insert(*c, dir.clone());
            if *c == Controller::Cpuset {
                init_cpuset(mount, &parent)?;
                init_cpuset(&parent, &dir)?;
            }
            new_v1.push(dir);
        }
        if let Some(root) = &h.v2 {
            let parent = root.join(PARENT);
            let dir = parent.join(name);
            if self.v2.is_none() && with_v2 {
                mkdir_with_parent(&parent, &dir)?;
                self.v2 = Some(dir);
            }
            let enable: Vec<Controller> = wanted
                .iter()
                .copied()
                .filter(|c| h.locate(*c) == Some(Version::V2) && !self.v2_controllers.contains(c))
                .collect();
            if !enable.is_empty() && self.v2.is_some() {
                let text: String = enable
                    .iter()
                    .map(|c| format!("+{}", c.name()))
                    .collect::<Vec<_>>()
                    .join(" ");
                for level in [root.as_path(), parent.as_path()] {
                    let f = level.join("cgroup.subtree_control");
                    write_file(&f, &text).map_err(|e| Error::LimitUnavailable {
                        what: format!("cgroup v2 controllers {text}"),
                        why: format!("cannot enable them in {}: {e}", f.display()),
                    })?;
                }
                self.v2_controllers.extend(enable);
            }
        }
        Ok(new_v1)
    }

    /// Adds the controllers `limits` needs that the running group lacks, moving the group's
    /// processes (`pids` lists them; it is called until no new process turns up, so children
    /// forked meanwhile follow) into the new directories, then applies `limits`.
    pub fn extend(
        &mut self,
        h: &Hierarchies,
        name: &str,
        limits: &Limits,
        pids: impl Fn() -> Vec<i32>,
    ) -> Result<(), Error> {
        let new_dirs = self.add_dirs(h, name, limits, false)?;
        if !new_dirs.is_empty() {
            let mut moved = std::collections::BTreeSet::new();
            for _ in 0..50 {
                let fresh: Vec<i32> = pids().into_iter().filter(|p| !moved.contains(p)).collect();
                if fresh.is_empty() {
                    break;
                }
                for p in fresh {
                    for d in &new_dirs {
                        // A process that exited meanwhile: ESRCH, nothing to move.
                        let _ = write_file(&d.join("cgroup.procs"), &p.to_string());
                    }
                    moved.insert(p);
                }
            }
        }
        self.apply(limits)
    }

    /// Removes `<hierarchy>/vireo/<name>` in every hierarchy of the host (whoever created them:
    /// `vireo container update` may have added controllers to a running container).
    pub fn remove_named(h: &Hierarchies, name: &str) -> Result<(), Error> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Ok(());
        }
        let v1: BTreeMap<Controller, PathBuf> =
            h.v1.iter()
                .map(|(c, m)| (*c, m.join(PARENT).join(name)))
                .filter(|(_, d)| d.exists())
                .collect();
        let v2 =
            h.v2.as_ref()
                .map(|m| m.join(PARENT).join(name))
                .filter(|d| d.exists());
        Cgroup {
            v1,
            v2,
            v2_controllers: Vec::new(),
        }
        .remove()
    }

    /// Puts process `pid` (and its threads) into every directory of the group.
    pub fn add(&self, pid: i32) -> Result<(), Error> {
        self.add_to(pid, &self.dirs())
    }

    /// Puts process `pid` into the group's v1 directories only (it was cloned into the v2 one).
    pub fn add_v1(&self, pid: i32) -> Result<(), Error> {
        let dirs: Vec<&Path> = self.v1.values().map(PathBuf::as_path).collect();
        self.add_to(pid, &dirs)
    }

    fn add_to(&self, pid: i32, dirs: &[&Path]) -> Result<(), Error> {
        for dir in dirs {
            let f = dir.join("cgroup.procs");
            write_file(&f, &pid.to_string())
                .map_err(io_err(format!("moving process {pid} into {}", f.display())))?;
        }
        Ok(())
    }

    /// Every directory of the group.
    pub fn dirs(&self) -> Vec<&Path> {
        self.v1
            .values()
            .map(PathBuf::as_path)
            .chain(self.v2.as_deref())
            .collect()
    }

    fn dir_of(&self, c: Controller) -> Option<(&Path, Version)> {
        if let Some(d) = self.v1.get(&c) {
            return Some((d, Version::V1));
        }
        if self.v2_controllers.contains(&c) {
            return self.v2.as_deref().map(|d| (d, Version::V2));
        }
        None
    }

    /// The files and values that set `limits` on `version`, in the order they must be
    /// written (`current` is what is in force, for ordering v1's memory and swap limits).
    pub fn limit_writes(
        limits: &Limits,
        version: Version,
        current_memory: Option<u64>,
    ) -> Vec<(Controller, &'static str, String)> {
        let mut w = Vec::new();
        match version {
            Version::V2 => {
                if let Some(m) = limits.memory_max {
                    w.push((Controller::Memory, "memory.max", m.to_string()));
                }
                if let Some(s) = limits.memory_swap_max {
                    w.push((Controller::Memory, "memory.swap.max", s.to_string()));
                }
                if let Some(p) = limits.pids_max {
                    w.push((Controller::Pids, "pids.max", p.to_string()));
                }
                if let Some(wt) = limits.cpu_weight {
                    w.push((Controller::Cpu, "cpu.weight", wt.to_string()));
                }
                if let Some(c) = limits.cpu_max {
                    w.push((
                        Controller::Cpu,
                        "cpu.max",
                        format!("{} {CPU_PERIOD_US}", quota_us(c)),
                    ));
                }
                if let Some(set) = &limits.cpuset_cpus {
                    w.push((Controller::Cpuset, "cpuset.cpus", set.to_string()));
                }
            }
            Version::V1 => {
                if let Some(m) = limits.memory_max {
                    let mem = (Controller::Memory, "memory.limit_in_bytes", m.to_string());
                    match limits.memory_swap_max {
                        Some(s) => {
                            // memsw must stay >= the memory limit at every step.
                            let memsw = (
                                Controller::Memory,
                                "memory.memsw.limit_in_bytes",
                                m.saturating_add(s).to_string(),
                            );
                            if current_memory.is_some_and(|cur| m > cur) {
                                w.push(memsw);
                                w.push(mem);
                            } else {
                                w.push(mem);
                                w.push(memsw);
                            }
                        }
                        None => w.push(mem),
                    }
                }
                if let Some(p) = limits.pids_max {
                    w.push((Controller::Pids, "pids.max", p.to_string()));
                }
                if let Some(wt) = limits.cpu_weight {
                    let shares = (u64::from(wt) * 1024 / 100).clamp(2, 262_144);
                    w.push((Controller::Cpu, "cpu.shares", shares.to_string()));
                }
                if let Some(c) = limits.cpu_max {
                    w.push((
                        Controller::Cpu,
                        "cpu.cfs_period_us",
                        CPU_PERIOD_US.to_string(),
                    ));
                    w.push((Controller::Cpu, "cpu.cfs_quota_us", quota_us(c).to_string()));
                }
                if let Some(set) = &limits.cpuset_cpus {
                    w.push((Controller::Cpuset, "cpuset.cpus", set.to_string()));
                }
            }
        }
        w
    }

    /// Applies `limits` (at creation, or later to a running group: memory can shrink below
    /// current use, in which case the kernel reclaims or refuses with a clear error).
    pub fn apply(&self, limits: &Limits) -> Result<(), Error> {
        for (c, flag) in limits.needed() {
            if self.dir_of(c).is_none() {
                return Err(Error::NoController {
                    controller: c.name(),
                    limit: flag,
                });
            }
        }
        for version in [Version::V1, Version::V2] {
            let current = self
                .dir_of(Controller::Memory)
                .filter(|(_, v)| *v == Version::V1)
                .and_then(|(d, _)| read_u64(&d.join("memory.limit_in_bytes")));
            for (c, file, value) in Self::limit_writes(limits, version, current) {
                let Some((dir, v)) = self.dir_of(c) else {
                    continue;
                };
                if v != version {
                    continue;
                }
                let path = dir.join(file);
                if let Err(e) = write_file(&path, &value) {
                    let why = match e.raw_os_error() {
                        Some(libc::ENOENT) if file.contains("swap") || file.contains("memsw") => {
                            "the kernel has no swap accounting (boot with swapaccount=1)".into()
                        }
                        Some(libc::EBUSY) => {
                            format!("the group already uses more ({}: {e})", path.display())
                        }
                        _ => format!("{}: {e}", path.display()),
                    };
                    return Err(Error::LimitUnavailable {
                        what: format!("{file} = {value}"),
                        why,
                    });
                }
            }
        }
        Ok(())
    }

    /// Current usage.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        if let Some((d, v)) = self.dir_of(Controller::Memory) {
            match v {
                Version::V1 => {
                    s.memory_current = read_u64(&d.join("memory.usage_in_bytes"));
                    s.memory_peak = read_u64(&d.join("memory.max_usage_in_bytes"));
                    s.oom_kills = read_key(&d.join("memory.oom_control"), "oom_kill");
                }
                Version::V2 => {
                    s.memory_current = read_u64(&d.join("memory.current"));
                    s.memory_peak = read_u64(&d.join("memory.peak"));
                    s.oom_kills = read_key(&d.join("memory.events"), "oom_kill");
                }
            }
        }
        if let Some((d, _)) = self.dir_of(Controller::Pids) {
            s.pids_current = read_u64(&d.join("pids.current"));
            s.pids_refused = read_key(&d.join("pids.events"), "max");
        }
        s
    }

    /// The PIDs in the group (from every directory, deduplicated).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs()
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process in the group: through `cgroup.kill` where the kernel has it,
    /// otherwise one by one until the group is empty (bounded).
    pub fn kill_all(&self) {
        if let Some(d) = &self.v2 {
            if write_file(&d.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for p in pids {
                // SAFETY: kill(2) with integer arguments.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the group's directories (waiting up to two seconds for exiting processes to
    /// leave them). The shared `vireo` parents stay, empty, for the next jail: creating and
    /// removing a cgroup each cost kernfs and RCU work on every start and exit (as the
    /// `docker` or `system.slice` groups of other managers stay).
    pub fn remove(self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut first_err = None;
        for dir in self.dirs() {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), "cannot remove cgroup: {e}");
                        first_err.get_or_insert(Error::Io {
                            context: format!("removing cgroup {}", dir.display()),
                            source: e,
                        });
                        break;
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Removes the group's directories if they are empty, without waiting; false (and the
    /// group left for [`Cgroup::remove`]) if one still holds a process.
    pub fn try_remove(&self) -> bool {
        self.dirs()
            .into_iter()
            .all(|dir| match fs::remove_dir(dir) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            })
    }

    /// Whether any of the directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }

    /// Checks that a group read back from a state file only names directories `vireo/<name>`
    /// under cgroup mounts of this host (so a damaged file cannot make us remove others).
    pub fn validate(&self, h: &Hierarchies) -> bool {
        let ok = |dir: &Path, mount: &Path| {
            dir.parent() == Some(&mount.join(PARENT))
                && dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.is_empty() && !n.starts_with('.'))
        };
        self.v1
            .iter()
            .all(|(c, d)| h.v1.get(c).is_some_and(|m| ok(d, m)))
            && self
                .v2
                .as_ref()
                .is_none_or(|d| h.v2.as_ref().is_some_and(|m| ok(d, m)))
    }
}

/// `quota` in microseconds per [`CPU_PERIOD_US`] for `cpus` CPUs.
fn quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

fn mkdir_with_parent(parent: &Path, dir: &Path) -> Result<(), Error> {
    // Another vireo may remove an empty parent between the two mkdirs: retry once.
    for attempt in 0..2 {
        match fs::create_dir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("creating cgroup {}", parent.display()))(e)),
        }
        match fs::create_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => continue,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::InvalidSpec(format!(
                    "cgroup {} already exists: is a jail of that name running?",
                    dir.display()
                )))
            }
            Err(e) => return Err(io_err(format!("creating cgroup {}", dir.display()))(e)),
        }
    }
    Err(Error::InvalidSpec(format!(
        "cgroup {} keeps disappearing",
        parent.display()
    )))
}

/// v1 cpuset: a new group has no CPUs or memory nodes; copy the parent's where empty.
fn init_cpuset(from: &Path, to: &Path) -> Result<(), Error> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let target = to.join(file);
        let have = fs::read_to_string(&target).unwrap_or_default();
        if !have.trim().is_empty() {
            continue;
        }
        let value = fs::read_to_string(from.join(file))
            .map_err(io_err(format!("reading {}", from.join(file).display())))?;
        write_file(&target, value.trim())
            .map_err(io_err(format!("writing {}", target.display())))?;
    }
    Ok(())
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key N` in a flat-keyed file (`memory.events`, `memory.oom_control`, `pids.events`).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn detects_hybrid_host() {
        let h = Hierarchies::from_mountinfo(HYBRID, |_| Some("hugetlb memory\n".into()));
        assert_eq!(h.v1.len(), 4);
        assert_eq!(
            h.v1[&Controller::Memory],
            PathBuf::from("/sys/fs/cgroup/memory")
        );
        assert_eq!(h.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        // memory is bound to v1, so the unified hierarchy cannot use it.
        assert!(h.v2_controllers.is_empty());
        assert_eq!(h.locate(Controller::Pids), Some(Version::V1));
    }

    #[test]
    fn detects_pure_v2_host() {
        let text = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                    31 30 0:26 /sub /mnt/sub rw - cgroup2 cgroup2 rw\n";
        let h = Hierarchies::from_mountinfo(text, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup"));
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".into())
        });
        assert!(h.v1.is_empty());
        assert_eq!(h.v2, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(h.v2_controllers.len(), 4);
        for c in Controller::ALL {
            assert_eq!(h.locate(c), Some(Version::V2), "{c}");
        }
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), "/x\\y");
        assert_eq!(unescape_mountinfo(r"/x\011y"), "/x\ty");
        assert_eq!(unescape_mountinfo(r"/trail\04"), r"/trail\04");
    }

    #[test]
    fn cpu_lists() {
        let c: CpuList = "0-3,6, 8-9,2".parse().unwrap();
        assert_eq!(c.0, [0, 1, 2, 3, 6, 8, 9]);
        assert_eq!(c.to_string(), "0-3,6,8-9");
        assert_eq!("5".parse::<CpuList>().unwrap().to_string(), "5");
        assert!("3-1".parse::<CpuList>().is_err());
        assert!("x".parse::<CpuList>().is_err());
        assert!("99999".parse::<CpuList>().is_err());
        assert_eq!("".parse::<CpuList>().unwrap().0, Vec::<u32>::new());
    }

    #[test]
    fn parses_limit_lists() {
        let l =
            Limits::parse_list("mem=512M,swap=0,pids=64,cpu=0.5,weight=200,cpuset=0-1").unwrap();
        assert_eq!(l.memory_max, Some(512 << 20));
        assert_eq!(l.memory_swap_max, Some(0));
        assert_eq!(l.pids_max, Some(64));
        assert_eq!(l.cpu_max, Some(0.5));
        assert_eq!(l.cpu_weight, Some(200));
        assert_eq!(l.cpuset_cpus, Some(CpuList(vec![0, 1])));
        assert!(Limits::parse_list("").unwrap().is_empty());
        for bad in [
            "mem",
            "mem=lots",
            "pids=0",
            "cpu=-1",
            "cpu=nan",
            "weight=0",
            "weight=10001",
            "disk=1G",
        ] {
            assert!(Limits::parse_list(bad).is_err(), "{bad}");
        }
        let e = Limits::parse_list("disk=1G").unwrap_err();
        assert!(e.contains("unknown limit 'disk'"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("1P").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(fmt_size(256 << 20), "256M");
        assert_eq!(fmt_size(3), "3B");
    }

    #[test]
    fn host_checks_name_the_problem() {
        let host = HostResources {
            memory: 1 << 30,
            cpus: CpuList(vec![0, 1]),
        };
        let check = |s: &str| Limits::parse_list(s).unwrap().check(&host);
        assert!(check("mem=512M,cpu=1.5,cpuset=1,pids=10").is_ok());
        let msg = |s: &str| check(s).unwrap_err().to_string();
        assert!(
            msg("mem=2G").contains("only 1G of memory"),
            "{}",
            msg("mem=2G")
        );
        assert!(msg("mem=1M").contains("minimum"));
        assert!(msg("cpu=3").contains("2 CPUs"));
        assert!(msg("cpu=0.001").contains("0.01"));
        assert!(msg("cpuset=0-3").contains("CPU 2 is not available"));
        assert!(msg("swap=1G").contains("memory limit too"));
    }

    #[test]
    fn v1_and_v2_file_values() {
        let l = Limits::parse_list("mem=64M,swap=16M,pids=10,cpu=0.2,weight=50,cpuset=1").unwrap();
        let v2 = Cgroup::limit_writes(&l, Version::V2, None);
        let f2: Vec<(&str, &str)> = v2.iter().map(|(_, f, v)| (*f, v.as_str())).collect();
        assert_eq!(
            f2,
            [
                ("memory.max", "67108864"),
                ("memory.swap.max", "16777216"),
                ("pids.max", "10"),
                ("cpu.weight", "50"),
                ("cpu.max", "20000 100000"),
                ("cpuset.cpus", "1"),
            ]
        );
        let v1 = Cgroup::limit_writes(&l, Version::V1, Some(u64::MAX));
        let f1: Vec<(&str, &str)> = v1.iter().map(|(_, f, v)| (*f, v.as_str())).collect();
        assert_eq!(
            f1,
            [
                ("memory.limit_in_bytes", "67108864"),
                ("memory.memsw.limit_in_bytes", "83886080"),
                ("pids.max", "10"),
                ("cpu.shares", "512"),
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "20000"),
                ("cpuset.cpus", "1"),
            ]
        );
        // Raising memory above the current limit: memsw first, so memsw >= memory holds.
        let v1 = Cgroup::limit_writes(&l, Version::V1, Some(32 << 20));
        assert_eq!(v1[0].1, "memory.memsw.limit_in_bytes");
        assert_eq!(v1[1].1, "memory.limit_in_bytes");
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vireo-cg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn try_remove_takes_only_empty_groups() {
        let root = scratch("tryrm");
        let (a, b) = (root.join("a"), root.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let mut v1 = BTreeMap::new();
        v1.insert(Controller::Memory, a.clone());
        let cg = Cgroup {
            v1,
            v2: Some(b.clone()),
            v2_controllers: Vec::new(),
        };
        // Something inside `b` (a process, on a real cgroupfs): not removed, reported.
        fs::write(b.join("busy"), "").unwrap();
        assert!(!cg.try_remove());
        assert!(b.exists());
        fs::remove_file(b.join("busy")).unwrap();
        assert!(cg.try_remove(), "empty and already-removed groups");
        assert!(!a.exists() && !b.exists());
        assert!(root.exists(), "the parent stays");
        fs::remove_dir_all(&root).unwrap();
    }

    /// The v2 code path against a fake cgroupfs (this build host cannot enable v2 controllers:
    /// they are bound to v1 hierarchies).
    #[test]
    fn v2_group_in_a_fake_cgroupfs() {
        let root = scratch("v2");
        fs::write(root.join("cgroup.controllers"), "cpuset cpu memory pids\n").unwrap();
        let h = Hierarchies {
            v1: BTreeMap::new(),
            v2: Some(root.clone()),
            v2_controllers: Controller::ALL.to_vec(),
        };
        let limits = Limits::parse_list("mem=64M,pids=10,cpu=0.5,weight=300,cpuset=0").unwrap();
        let cg = Cgroup::create(&h, "c1", &limits).unwrap();
        let dir = root.join("vireo/c1");
        assert_eq!(cg.v2.as_deref(), Some(dir.as_path()));
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&root.join("cgroup.subtree_control")),
            "+memory +pids +cpu +cpuset"
        );
        assert_eq!(
            read(&root.join("vireo/cgroup.subtree_control")),
            "+memory +pids +cpu +cpuset"
        );
        assert_eq!(read(&dir.join("memory.max")), "67108864");
        assert_eq!(read(&dir.join("pids.max")), "10");
        assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
        assert_eq!(read(&dir.join("cpu.weight")), "300");
        assert_eq!(read(&dir.join("cpuset.cpus")), "0");
        // Changed while running.
        cg.apply(&Limits::parse_list("mem=128M,cpu=0.25").unwrap())
            .unwrap();
        assert_eq!(read(&dir.join("memory.max")), "134217728");
        assert_eq!(read(&dir.join("cpu.max")), "25000 100000");
        cg.add(12345).unwrap();
        assert_eq!(read(&dir.join("cgroup.procs")), "12345");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        let s = cg.stats();
        assert_eq!(s.oom_kills, Some(1));
        assert_eq!(s.memory_current, Some(4096));
        assert!(cg.validate(&h));
        // A fake cgroupfs has regular files inside; a real one removes them with the dir.
        for f in fs::read_dir(&dir).unwrap() {
            fs::remove_file(f.unwrap().path()).unwrap();
        }
        cg.remove().unwrap();
        assert!(!dir.exists());
        fs::remove_dir_all(&root).unwrap();
    }

    /// The v1 code path against a fake hierarchy per controller, including cpuset set-up.
    #[test]
    fn v1_groups_in_a_fake_cgroupfs() {
        let root = scratch("v1");
        let mut v1 = BTreeMap::new();
        for c in Controller::ALL {
            let m = root.join(c.name());
            fs::create_dir_all(&m).unwrap();
            v1.insert(c, m);
        }
        fs::write(root.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        let h = Hierarchies {
            v1,
            v2: None,
            v2_controllers: vec![],
        };
        let limits = Limits::parse_list("mem=32M,pids=5,cpu=0.2,cpuset=1").unwrap();
        let cg = Cgroup::create(&h, "c2", &limits).unwrap();
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("memory/vireo/c2/memory.limit_in_bytes"), "33554432");
        assert_eq!(read("pids/vireo/c2/pids.max"), "5");
        assert_eq!(read("cpu/vireo/c2/cpu.cfs_quota_us"), "20000");
        assert_eq!(read("cpuset/vireo/cpuset.cpus"), "0-1");
        assert_eq!(read("cpuset/vireo/c2/cpuset.cpus"), "1");
        assert_eq!(read("cpuset/vireo/c2/cpuset.mems"), "0");
        assert!(cg.validate(&h));
        let mut forged = cg.clone();
        forged
            .v1
            .insert(Controller::Memory, root.join("memory/elsewhere"));
        assert!(!forged.validate(&h));
        fs::remove_dir_all(&root).unwrap();
    }

    /// Adding a controller to a running group creates its directory and moves the group's
    /// processes, asking for them until no new one turns up.
    #[test]
    fn extend_moves_processes_into_new_controllers() {
        let root = scratch("extend");
        let mut v1 = BTreeMap::new();
        for c in [Controller::Memory, Controller::Pids] {
            let m = root.join(c.name());
            fs::create_dir_all(&m).unwrap();
            v1.insert(c, m);
        }
        let h = Hierarchies {
            v1,
            v2: None,
            v2_controllers: vec![],
        };
        let mut cg = Cgroup::create(&h, "c3", &Limits::default()).unwrap();
        assert!(cg.dirs().is_empty(), "no limits, no v2: no directories");
        let calls = std::cell::Cell::new(0);
        cg.extend(&h, "c3", &Limits::parse_list("pids=9").unwrap(), || {
            calls.set(calls.get() + 1);
            // A second pass finds a child forked meanwhile; the third nothing new.
            match calls.get() {
                1 => vec![100],
                2 => vec![100, 101],
                _ => vec![100, 101],
            }
        })
        .unwrap();
        assert_eq!(calls.get(), 3);
        let dir = root.join("pids/vireo/c3");
        assert_eq!(cg.v1.get(&Controller::Pids), Some(&dir));
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "9");
        // The fake file keeps only the last write; a real one accumulates.
        assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), "101");
        assert!(
            !root.join("memory/vireo/c3").exists(),
            "memory was not asked for"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_controller_is_a_clear_error() {
        let h = Hierarchies::default();
        let e = Cgroup::create(&h, "x", &Limits::parse_list("pids=5").unwrap()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("'pids'"), "{msg}");
        // No limits and no hierarchies: nothing to do, no error.
        let cg = Cgroup::create(&h, "x", &Limits::default()).unwrap();
        assert!(cg.dirs().is_empty());
    }

    /// The real hierarchies of this host (root only): create, join, limit, remove.
    #[test]
    fn real_cgroup_round_trip() {
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP real_cgroup_round_trip: needs root");
            return;
        }
        let h = Hierarchies::detect().unwrap();
        let name = format!("unit-{}", std::process::id());
        let mut limits = Limits::default();
        if h.locate(Controller::Pids).is_some() {
            limits.pids_max = Some(7);
        }
        if h.locate(Controller::Memory).is_some() {
            limits.memory_max = Some(64 << 20);
        }
        let cg = Cgroup::create(&h, &name, &limits).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        cg.add(child.id() as i32).unwrap();
        assert_eq!(cg.pids(), [child.id() as i32]);
        if limits.pids_max.is_some() {
            assert_eq!(cg.stats().pids_current, Some(1));
        }
        cg.apply(&Limits {
            pids_max: limits.pids_max.map(|_| 9),
            ..Default::default()
        })
        .unwrap();
        cg.kill_all();
        let status = child.wait().unwrap();
        assert!(!status.success());
        cg.clone().remove().unwrap();
        assert!(!cg.exists());
    }
}
