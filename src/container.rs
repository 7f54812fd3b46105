//! `vireo container run|list|stop|update`: OS-level containers on a root file system directory.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use vireo_jail::cgroup::{self, fmt_size};
use vireo_jail::container::{ContainerSpec, Runtime};
use vireo_jail::{CapSet, CpuList, Exit, Limits, Mount, SignalForwarding, SyscallList};

/// Exit status when vireo cannot start the container (the command's own statuses pass
/// through; 126/127 when it cannot be executed or found, as in a shell).
pub const EXIT_SETUP: u8 = 125;

#[derive(Subcommand, Debug)]
pub enum ContainerCommand {
    /// Run a command in a new container, attached to this terminal; exits with its status.
    Run(Box<RunArgs>),
    /// List running containers.
    List(ListArgs),
    /// Stop a running container: SIGTERM to its init, SIGKILL after a grace period.
    Stop(StopArgs),
    /// Change the limits of a running container.
    Update(UpdateArgs),
}

/// cgroup limits as flags.
#[derive(Args, Debug, Default, Clone)]
pub struct LimitArgs {
    /// Memory limit, like 256M or 2G (the kernel OOM-kills inside the container beyond it).
    #[arg(long, value_name = "SIZE", value_parser = cgroup::parse_size)]
    memory: Option<u64>,
    /// Swap allowed on top of --memory.
    #[arg(long, value_name = "SIZE", value_parser = cgroup::parse_size)]
    memory_swap: Option<u64>,
    /// Most processes and threads (fork fails beyond it).
    #[arg(long, value_name = "N", value_parser = cgroup::parse_pids_arg)]
    pids: Option<u64>,
    /// CPU cap in CPUs, like 0.5 (capped: never more, even when the host is idle).
    #[arg(long, value_name = "CPUS", value_parser = cgroup::parse_cpus_arg)]
    cpus: Option<f64>,
    /// Relative CPU weight, 1 to 10000 (default 100; uncapped: idle CPU time is used).
    #[arg(long, value_name = "W", value_parser = cgroup::parse_weight_arg)]
    cpu_weight: Option<u32>,
    /// CPUs to run on, like 0-1 or 0,2.
    #[arg(long, value_name = "LIST")]
    cpuset: Option<CpuList>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            memory_max: self.memory,
            memory_swap_max: self.memory_swap,
            pids_max: self.pids,
            cpu_weight: self.cpu_weight,
            cpu_max: self.cpus,
            cpuset_cpus: self.cpuset.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The root file system: a directory holding the container's files.
    #[arg(long, value_name = "DIR")]
    rootfs: PathBuf,
    /// The container's name (default: random); see `vireo container list`.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Hostname inside (default: the name).
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// A veth pair into the host: ip=ADDR/PREFIX[,host=ADDR] (the host end gets the first
    /// other address of the network unless host= is given).
    #[arg(long, value_name = "SPEC")]
    net: Option<String>,
    /// uid[:gid] to run as inside (default 0:0, with no capabilities).
    #[arg(long, value_name = "UID[:GID]", value_parser = parse_user)]
    user: Option<(u32, u32)>,
    /// Run in a user namespace: root inside is uid 100000 on the host.
    #[arg(long)]
    userns: bool,
    /// Mount the root file system read-only (with a tmpfs on /tmp).
    #[arg(long)]
    read_only: bool,
    /// Bind-mount a host path: SRC:DST[:ro].
    #[arg(long = "bind", value_name = "SRC:DST[:ro]", value_parser = parse_bind)]
    binds: Vec<Mount>,
    /// Set an environment variable inside: KEY=VALUE.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside.
    #[arg(long, value_name = "DIR", default_value = "/")]
    workdir: PathBuf,
    /// Keep a capability (capabilities(7) name, like NET_BIND_SERVICE); all others are dropped.
    #[arg(long = "cap-add", value_name = "CAP")]
    cap_add: Vec<String>,
    /// Seccomp allow-list: `default`, `unconfined`, or a file in vireo's list format.
    #[arg(long, value_name = "PROFILE", default_value = "default")]
    seccomp: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The container's name.
    name: String,
    /// Seconds to wait after SIGTERM before SIGKILL (PID 1 ignores SIGTERM unless it
    /// handles it).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    time: u64,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The container's name.
    name: String,
    #[command(flatten)]
    limits: LimitArgs,
}

fn parse_user(s: &str) -> std::result::Result<(u32, u32), String> {
    let bad = || format!("invalid user '{s}': use UID or UID:GID (numbers)");
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn parse_bind(s: &str) -> std::result::Result<Mount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (src, dst, ro) = match parts.as_slice() {
        [src, dst] => (src, dst, false),
        [src, dst, "ro"] => (src, dst, true),
        [src, dst, "rw"] => (src, dst, false),
        _ => return Err(format!("invalid bind '{s}': use SRC:DST or SRC:DST:ro")),
    };
    if !dst.starts_with('/') {
        return Err(format!("bind target '{dst}' must be an absolute path"));
    }
    Ok(Mount::Bind {
        source: PathBuf::from(src),
        target: PathBuf::from(dst),
        read_only: ro,
    })
}

pub fn run(cmd: ContainerCommand) -> Result<ExitCode> {
    match cmd {
        ContainerCommand::Run(a) => Ok(run_container(*a)),
        ContainerCommand::List(a) => list(a),
        ContainerCommand::Stop(a) => {
            Runtime::default().stop(&a.name, Duration::from_secs(a.time))?;
            Ok(ExitCode::SUCCESS)
        }
        ContainerCommand::Update(a) => {
            let l = a.limits.limits();
            if l.is_empty() {
                anyhow::bail!("nothing to change: give --memory, --pids, --cpus, ...");
            }
            let now = Runtime::default().update(&a.name, &l)?;
            eprintln!("vireo: {}: {}", a.name, describe(&now));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn describe(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(m) = l.memory_max {
        parts.push(format!("memory {}", fmt_size(m)));
    }
    if let Some(s) = l.memory_swap_max {
        parts.push(format!("swap {}", fmt_size(s)));
    }
    if let Some(p) = l.pids_max {
        parts.push(format!("pids {p}"));
    }
    if let Some(c) = l.cpu_max {
        parts.push(format!("cpus {c}"));
    }
    if let Some(w) = l.cpu_weight {
        parts.push(format!("cpu weight {w}"));
    }
    if let Some(s) = &l.cpuset_cpus {
        parts.push(format!("cpuset {s}"));
    }
    if parts.is_empty() {
        "no limits".into()
    } else {
        parts.join(", ")
    }
}

fn spec_from(a: RunArgs) -> Result<ContainerSpec> {
    let mut spec = ContainerSpec::new(&a.rootfs, a.command)?;
    spec.name = a.name;
    spec.hostname = a.hostname;
    spec.limits = a.limits.limits();
    spec.net = a.net;
    if let Some((u, g)) = a.user {
        spec.uid = u;
        spec.gid = g;
    }
    spec.userns = a.userns;
    spec.read_only = a.read_only;
    spec.mounts = a.binds;
    spec.workdir = a.workdir;
    for e in a.env {
        if !e.contains('=') {
            anyhow::bail!("invalid --env '{e}': use KEY=VALUE");
        }
        spec.env.push(e.into());
    }
    let mut caps = CapSet::EMPTY;
    for c in &a.cap_add {
        caps.add_name(c).map_err(anyhow::Error::msg)?;
    }
    spec.keep_caps = caps;
    spec.seccomp = match a.seccomp.as_str() {
        "default" => spec.seccomp,
        "unconfined" => None,
        file => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading seccomp profile {file}"))?;
            Some(SyscallList::parse(file, &text)?)
        }
    };
    Ok(spec)
}

fn run_container(a: RunArgs) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display, code: u8| {
        eprintln!("vireo: error: {e}");
        ExitCode::from(code)
    };
    let spec = match spec_from(a) {
        Ok(s) => s,
        Err(e) => return fail(&format!("{e:#}"), EXIT_SETUP),
    };
    let limits = spec.limits.clone();
    // Block the signals to forward before the container exists, so none is lost.
    let fwd = SignalForwarding::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT]);
    let mut container = match Runtime::default().run(&spec) {
        Ok(c) => c,
        Err(e) => {
            let code = e.exec_status().map_or(EXIT_SETUP, |c| c as u8);
            return fail(&e, code);
        }
    };
    tracing::info!(
        id = container.id(),
        pid = container.child().pid(),
        "container running"
    );
    let outcome = match container.wait_forwarding(&fwd) {
        Ok(o) => o,
        Err(e) => return fail(&e, EXIT_SETUP),
    };
    if outcome.oom_kills > 0 {
        eprintln!(
            "vireo: the container's memory limit ({}) was reached: the kernel killed {} \
             process(es) in it",
            limits.memory_max.map_or("?".into(), fmt_size),
            outcome.oom_kills
        );
    }
    if outcome.pids_refused > 0 {
        eprintln!(
            "vireo: the container's process limit ({}) refused {} fork(s)",
            limits.pids_max.map_or("?".into(), |p| p.to_string()),
            outcome.pids_refused
        );
    }
    match outcome.exit {
        Exit::Code(c) => ExitCode::from(c.clamp(0, 255) as u8),
        Exit::Signal(s) => ExitCode::from((128 + s).clamp(0, 255) as u8),
    }
}

fn list(a: ListArgs) -> Result<ExitCode> {
    let all = Runtime::default().list()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:>8} {:>10} {:>6} {:<18} COMMAND",
        "NAME", "PID", "MEMORY", "PIDS", "ADDRESS"
    );
    for c in all {
        let s = &c.state;
        let mem = c.stats.memory_current.map_or("-".into(), |m| {
            format!("{:.1}M", m as f64 / f64::from(1 << 20))
        });
        let pids = c.stats.pids_current.map_or("-".into(), |p| p.to_string());
        let addr = s.net.as_ref().map_or("-".into(), |n| n.addr.to_string());
        println!(
            "{:<16} {:>8} {:>10} {:>6} {:<18} {}",
            s.id,
            s.init.pid,
            mem,
            pids,
            addr,
            s.command.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_binds() {
        assert_eq!(parse_user("1000").unwrap(), (1000, 1000));
        assert_eq!(parse_user("1000:50").unwrap(), (1000, 50));
        assert!(parse_user("bob").is_err());
        match parse_bind("/srv/data:/data:ro").unwrap() {
            Mount::Bind {
                source,
                target,
                read_only,
            } => {
                assert_eq!(source, PathBuf::from("/srv/data"));
                assert_eq!(target, PathBuf::from("/data"));
                assert!(read_only);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_bind("/a:rel").is_err());
        assert!(parse_bind("/a").is_err());
        assert!(parse_bind("/a:/b:rx").is_err());
    }

    #[test]
    fn limit_descriptions() {
        let l = Limits::parse_list("mem=64M,pids=10,cpu=0.5").unwrap();
        assert_eq!(describe(&l), "memory 64M, pids 10, cpus 0.5");
        assert_eq!(describe(&Limits::default()), "no limits");
    }
}
