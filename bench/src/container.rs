//! `bench/container`: OS-level isolation, vireo against its peers, in one run.
//!
//! 1. Start a container on a busybox root file system and run `/bin/true` in it, process
//!    spawn to exit: `vireo container run`; the peers `unshare` + `chroot` (util-linux) with
//!    the namespaces vireo creates (mount, UTS, IPC, network, PID, cgroup, time) and a
//!    `/proc` for the new PID namespace, and `crun run` (OCI runtime, when installed); for
//!    reference (not a peer: fewer namespaces, no `/proc`), the bare `unshare -m -u -i -n -p
//!    -f chroot`.
//! 2. The jail's cost on VM start: `vireo run` of a probe guest that prints a line and powers
//!    off, with and without `--jail` (KVM).
//!
//! Medians of interleaved runs, with a pause between runs so the kernel's deferred clean-up
//! of one run (network namespaces, RCU callbacks) does not land in the next.
//!
//! Usage: `cargo build --release --workspace && target/x86_64-unknown-linux-gnu/release/container
//! [--runs N] [--only containers|vm] [--baseline VIREO]` (as root). `--baseline` adds rows
//! for another vireo binary, interleaved with the others: a before/after comparison under
//! the same load.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_bench::{fmt, median, vireo_binary};
use vireo_guests::probe::{build, Probe};

const PAUSE: Duration = Duration::from_millis(200);

fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Wall time of one run to its exit, in ms; `None` if it failed.
fn time_once(mut cmd: Command) -> Option<f64> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t = Instant::now();
    let status = cmd.status().ok()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    status.success().then_some(ms)
}

type CommandFn = Box<dyn Fn() -> Command>;

struct Contender {
    name: String,
    command: CommandFn,
    times: Vec<f64>,
    failures: usize,
    /// A peer vireo is compared with (the ratios are to the fastest peer).
    peer: bool,
}

fn contender(name: impl Into<String>, command: CommandFn) -> Contender {
    Contender {
        name: name.into(),
        command,
        times: Vec::new(),
        failures: 0,
        peer: false,
    }
}

fn peer(name: impl Into<String>, command: CommandFn) -> Contender {
    Contender {
        peer: true,
        ..contender(name, command)
    }
}

/// `vireo container run` of `/bin/true` on `rootfs` with the binary `bin`.
fn vireo_container(name: String, bin: &Path, rootfs: &Path) -> Contender {
    let (bin, rootfs) = (bin.to_path_buf(), rootfs.to_path_buf());
    contender(
        name,
        Box::new(move || {
            let mut c = Command::new(&bin);
            c.args(["container", "run", "--rootfs"])
                .arg(&rootfs)
                .args(["--", "/bin/true"]);
            c
        }),
    )
}

/// A process holding a private mount namespace with the unified cgroup hierarchy unmounted:
/// crun refuses to run on a hybrid host whose v2 hierarchy offers a controller ("cgroups in
/// hybrid mode not supported"); crun runs are started inside this namespace (`setns`), so
/// the host is untouched and the one-time unmount is not timed.
struct HiddenUnified {
    helper: Child,
    ns: OwnedFd,
}

impl HiddenUnified {
    fn start() -> Option<HiddenUnified> {
        let helper = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg("umount /sys/fs/cgroup/unified 2>/dev/null; echo ready; exec sleep 100000")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut helper = helper;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(helper.stdout.take()?),
            &mut line,
        )
        .ok()?;
        let ns = fs::File::open(format!("/proc/{}/ns/mnt", helper.id())).ok()?;
        Some(HiddenUnified {
            helper,
            ns: ns.into(),
        })
    }
}

impl Drop for HiddenUnified {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

/// A crun bundle for `/bin/true` on `rootfs`: the namespaces of the other contenders, no
/// terminal, no cgroups (see `HiddenUnified`).
fn crun_bundle(dir: &Path, rootfs: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    fs::create_dir_all(&bundle).expect("bundle dir");
    let config = format!(
        r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "terminal": false,
    "user": {{ "uid": 0, "gid": 0 }},
    "args": ["/bin/true"],
    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
    "cwd": "/",
    "capabilities": {{ "bounding": [], "effective": [], "permitted": [] }},
    "noNewPrivileges": true
  }},
  "root": {{ "path": "{}", "readonly": true }},
  "hostname": "bench",
  "mounts": [
    {{ "destination": "/proc", "type": "proc", "source": "proc" }},
    {{ "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
       "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] }}
  ],
  "linux": {{
    "namespaces": [
      {{ "type": "pid" }}, {{ "type": "network" }}, {{ "type": "ipc" }},
      {{ "type": "uts" }}, {{ "type": "mount" }}
    ]
  }}
}}"#,
        rootfs.display()
    );
    fs::write(bundle.join("config.json"), config).expect("config.json");
    bundle
}

fn main() {
    let runs = arg("--runs", 30);
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("error: bench/container needs root (namespaces, cgroups)");
        std::process::exit(1);
    }
    let bin = vireo_binary();
    if !bin.exists() {
        eprintln!(
            "error: no vireo binary at {}: run `cargo build --release --workspace` first",
            bin.display()
        );
        std::process::exit(1);
    }
    let dir = std::env::temp_dir().join(format!("vireo-bench-ct-{}", std::process::id()));
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs).expect("temp dir");
    let cache = vireo_guests::default_guest::cache_dir().expect("cache dir");
    vireo_guests::default_guest::busybox::busybox_rootfs(&cache, &rootfs)
        .expect("busybox root file system");

    let baseline = arg_str("--baseline").map(PathBuf::from);
    let only = arg_str("--only");
    if only.as_deref().is_none_or(|o| o == "containers") {
        containers(&bin, baseline.as_deref(), &dir, &rootfs, runs);
    }
    if only.as_deref().is_none_or(|o| o == "vm") {
        vm_start(&bin, baseline.as_deref(), &dir, runs);
    }
    let _ = fs::remove_dir_all(&dir);
}

/// Part 1: `/bin/true` in a container, vireo against its peers.
fn containers(bin: &Path, baseline: Option<&Path>, dir: &Path, rootfs: &Path, runs: usize) {
    let mut rows = vec![vireo_container("vireo container run".into(), bin, rootfs)];
    if let Some(b) = baseline {
        rows.push(vireo_container(
            format!("vireo container run ({})", b.display()),
            b,
            rootfs,
        ));
    }
    {
        let rootfs = rootfs.to_path_buf();
        rows.push(peer(
            "unshare + chroot (7 namespaces, /proc)",
            Box::new(move || {
                let mut c = Command::new("unshare");
                c.args(["-m", "-u", "-i", "-n", "-p", "-f", "-C", "-T"])
                    .arg(format!("--mount-proc={}", rootfs.join("proc").display()))
                    .arg("chroot")
                    .arg(&rootfs)
                    .arg("/bin/true");
                c
            }),
        ));
    }
    {
        let rootfs = rootfs.to_path_buf();
        rows.push(contender(
            "unshare + chroot (5 namespaces; reference)",
            Box::new(move || {
                let mut c = Command::new("unshare");
                c.args(["-m", "-u", "-i", "-n", "-p", "-f", "chroot"])
                    .arg(&rootfs)
                    .arg("/bin/true");
                c
            }),
        ));
    }
    let crun_ok = Command::new("crun")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let hidden = if crun_ok {
        HiddenUnified::start()
    } else {
        None
    };
    let crun_note;
    if let Some(h) = &hidden {
        let bundle = crun_bundle(dir, rootfs);
        let ns = h.ns.as_raw_fd();
        let counter = std::cell::Cell::new(0u32);
        rows.push(peer(
            "crun run",
            Box::new(move || {
                counter.set(counter.get() + 1);
                let mut c = Command::new("crun");
                c.args(["--cgroup-manager=disabled", "run", "--bundle"])
                    .arg(&bundle)
                    .arg(format!("bench-{}-{}", std::process::id(), counter.get()));
                // SAFETY: setns(2) only, between fork and exec.
                unsafe {
                    c.pre_exec(move || {
                        if libc::setns(ns, libc::CLONE_NEWNS) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                c
            }),
        ));
        crun_note = "crun: --cgroup-manager=disabled, started in a mount namespace without the \
                     unified hierarchy (crun refuses hybrid hosts)";
    } else {
        crun_note = "crun: not installed (apt-get install crun)";
    }

    println!(
        "bench/container: {runs} runs each, interleaved (the order rotating every round), \
         {PAUSE:?} between runs"
    );
    run_rounds(&mut rows, runs);
    let medians: Vec<Option<f64>> = rows.iter().map(|r| median(r.times.clone())).collect();
    let fastest = rows
        .iter()
        .zip(&medians)
        .filter(|(r, _)| r.peer)
        .filter_map(|(_, m)| *m)
        .fold(f64::INFINITY, f64::min);
    let p25s: Vec<Option<f64>> = rows.iter().map(|r| quartile(&r.times)).collect();
    let fastest_p25 = rows
        .iter()
        .zip(&p25s)
        .filter(|(r, _)| r.peer)
        .filter_map(|(_, q)| *q)
        .fold(f64::INFINITY, f64::min);
    println!();
    println!(
        "| start to `/bin/true` exited | median (ms) | / fastest peer | 25th pct (ms) | / fastest peer | failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for ((r, m), q) in rows.iter().zip(&medians).zip(&p25s) {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            fmt(*m, 2),
            fmt(m.map(|m| m / fastest).filter(|x| x.is_finite()), 2),
            fmt(*q, 2),
            fmt(q.map(|q| q / fastest_p25).filter(|x| x.is_finite()), 2),
            r.failures
        );
    }
    println!("\n{crun_note}");
    drop(hidden);
}

/// The 25th percentile (less disturbed by other work on the machine than the median).
fn quartile(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 4).copied()
}

/// `runs` rounds; each runs every contender once, starting with a different one each round,
/// so that no contender always follows the same one (whose deferred kernel clean-up could
/// land in its time).
fn run_rounds(rows: &mut [Contender], runs: usize) {
    let n = rows.len();
    for round in 0..runs {
        for k in 0..n {
            let r = &mut rows[(round + k) % n];
            match time_once((r.command)()) {
                Some(ms) => r.times.push(ms),
                None => r.failures += 1,
            }
            std::thread::sleep(PAUSE);
        }
    }
}

/// `vireo run` of the Hello probe to its exit, jailed and not (and the same with the
/// baseline binary).
fn vm_start(bin: &Path, baseline: Option<&Path>, dir: &Path, runs: usize) {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("\nVM start: skipped (no usable /dev/kvm)");
        return;
    }
    let kernel = dir.join("hello.elf");
    fs::write(&kernel, build(&Probe::Hello)).expect("probe");
    let mut bins = vec![(bin.to_path_buf(), String::new())];
    if let Some(b) = baseline {
        bins.push((b.to_path_buf(), format!(" ({})", b.display())));
    }
    let mut rows: Vec<Contender> = bins
        .iter()
        .flat_map(|(b, label)| {
            [
                (b.clone(), label.clone(), false),
                (b.clone(), label.clone(), true),
            ]
        })
        .map(|(bin, label, jail)| {
            let kernel = kernel.clone();
            contender(
                if jail {
                    format!("vireo run --jail{label}")
                } else {
                    format!("vireo run{label}")
                },
                Box::new(move || {
                    let mut c = Command::new(&bin);
                    c.arg("run");
                    if jail {
                        c.arg("--jail");
                    }
                    c.args(["--accel", "kvm", "--kernel"]).arg(&kernel);
                    c
                }),
            )
        })
        .collect();
    run_rounds(&mut rows, runs);
    let m: Vec<Option<f64>> = rows.iter().map(|r| median(r.times.clone())).collect();
    let q: Vec<Option<f64>> = rows.iter().map(|r| quartile(&r.times)).collect();
    println!("\n| probe guest start to power-off (KVM) | median (ms) | 25th pct (ms) | failures |");
    println!("|---|---:|---:|---:|");
    for ((r, m), q) in rows.iter().zip(&m).zip(&q) {
        println!(
            "| {} | {} | {} | {} |",
            r.name,
            fmt(*m, 2),
            fmt(*q, 2),
            r.failures
        );
    }
    for (i, (_, label)) in bins.iter().enumerate() {
        let (j, k) = (2 * i, 2 * i + 1);
        if let (Some(a), Some(b), Some(qa), Some(qb)) = (m[j], m[k], q[j], q[k]) {
            println!(
                "| jail overhead{label} | {:.2} ({:.2}x) | {:.2} ({:.2}x) | |",
                b - a,
                b / a,
                qb - qa,
                qb / qa
            );
        }
    }
}
