//! `bench/snapshot`: pause and resume latency, time to snapshot, and time from starting
//! `vireo restore` to the guest running again, for 256 MiB and 2 GiB guests; beside it QEMU's
//! migrate-to-file (`migrate exec:cat > FILE`, the form `savevm` is built on) and restore
//! (`-incoming exec:cat FILE`, then `cont`) on the same guest.
//!
//! The guest is the counting probe (`Probe::Counter`, a periodic LAPIC timer and `hlt`), on
//! KVM (or `--accel emu`; QEMU then uses TCG). Pause/resume/snapshot times are what the
//! server measures for the command (QEMU: the QMP command's round trip, and `migrate` until
//! `query-migrate` says completed); restore→run is from spawning the process to the VMM saying
//! the guest runs (vireo's `restored ...: running` log line; QEMU: `cont` after the incoming
//! migration, until `query-status` says running).
//!
//! Usage: `cargo build --release --workspace && target/x86_64-unknown-linux-gnu/release/snapshot
//! [--runs N] [--accel kvm|emu] [--no-qemu]`

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_bench::qmp::Qmp;
use vireo_bench::{fmt, have, median, vireo_binary, QEMU_BARE, QEMU_MICROVM};
use vireo_guests::probe::{build, Probe};

const QEMU: &str = "qemu-system-x86_64";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Run `vireo ctl` and return the server-measured time of the command in ms.
fn ctl(vireo: &Path, sock: &Path, args: &[&str]) -> Option<f64> {
    let o = Command::new(vireo)
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .arg("--json")
        .args(args)
        .output()
        .ok()?;
    if !o.status.success() {
        eprintln!("vireo ctl {args:?}: {}", String::from_utf8_lossy(&o.stdout));
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let micros = text
        .split("\"micros\":")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse::<f64>()
        .ok()?;
    Some(micros / 1000.0)
}

fn wait_for_path(p: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Wait until the child's stderr has a line containing `marker`; the time since `start`.
fn stderr_marker(
    child: &mut Child,
    marker: &str,
    start: Instant,
    timeout: Duration,
) -> Option<f64> {
    let err = child.stderr.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if line.contains(&marker) {
                let _ = tx.send(start.elapsed());
            }
        }
    });
    rx.recv_timeout(timeout)
        .ok()
        .map(|d| d.as_secs_f64() * 1000.0)
}

/// Mean of all samples of a stat: (pause, resume, snapshot, restore-to-running), in ms, and
/// the bytes the memory file takes on disk.
#[derive(Default)]
struct Stats {
    pause: Vec<f64>,
    resume: Vec<f64>,
    snapshot: Vec<f64>,
    restore: Vec<f64>,
    disk_mib: Vec<f64>,
}

fn allocated_mib(p: &Path) -> f64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| (m.blocks() * 512) as f64 / (1 << 20) as f64)
        .unwrap_or(0.0)
}

fn vireo_run(vireo: &Path, dir: &Path, accel: &str, memory: &str, runs: usize) -> Stats {
    let kernel = dir.join("counter.elf");
    std::fs::write(&kernel, build(&Probe::Counter)).expect("write probe");
    let mut s = Stats::default();
    for run in 0..runs {
        let sock = dir.join(format!("run{run}.sock"));
        let mut vm = Command::new(vireo)
            .args(["run", "--accel", accel, "--memory", memory, "--kernel"])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vireo");
        if !wait_for_path(&sock, Duration::from_secs(30)) {
            let _ = vm.kill();
            continue;
        }
        std::thread::sleep(Duration::from_millis(300));
        s.pause.extend(ctl(vireo, &sock, &["pause"]));
        s.resume.extend(ctl(vireo, &sock, &["resume"]));
        ctl(vireo, &sock, &["pause"]);
        let snap = dir.join(format!("snap-{memory}"));
        let _ = std::fs::remove_dir_all(&snap);
        s.snapshot.extend(ctl(
            vireo,
            &sock,
            &["snapshot", snap.to_str().unwrap_or("")],
        ));
        s.disk_mib.push(allocated_mib(&snap.join("memory")));
        ctl(vireo, &sock, &["power-off"]);
        let _ = vm.wait();
        // Restore: from spawn to the VMM's "running" line.
        let start = Instant::now();
        let mut r = Command::new(vireo)
            .arg("restore")
            .arg("--snapshot")
            .arg(&snap)
            .env("VIREO_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vireo restore");
        s.restore.extend(stderr_marker(
            &mut r,
            ": running",
            start,
            Duration::from_secs(30),
        ));
        let _ = r.kill();
        let _ = r.wait();
        // Let the killed VM's memory and KVM objects go before the next run.
        std::thread::sleep(Duration::from_millis(300));
    }
    s
}

/// Wait (2 min at most) for the migration QEMU runs to complete.
fn wait_migration(q: &mut Qmp) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        let Some(l) = q.exec("query-migrate", "") else {
            return false;
        };
        if l.contains("\"completed\"") {
            return true;
        }
        if l.contains("\"failed\"") {
            eprintln!("qemu migration failed: {l}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn qemu_cmd(kernel: &Path, memory: &str, qmp: &Path, accel: &str) -> Command {
    let mut c = Command::new(QEMU);
    c.args([
        "-M",
        QEMU_MICROVM,
        "-accel",
        vireo_bench::qemu_accel(accel),
        "-m",
        memory,
    ])
    .args(QEMU_BARE)
    .args(["-serial", "null", "-qmp"])
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .arg("-kernel")
    .arg(kernel)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if accel == "kvm" {
        c.args(["-cpu", "host"]);
    }
    c
}

fn qemu_run(dir: &Path, accel: &str, memory: &str, runs: usize) -> Stats {
    let kernel = dir.join("counter-qemu.elf");
    std::fs::write(&kernel, build(&Probe::Counter)).expect("write probe");
    let mut s = Stats::default();
    for run in 0..runs {
        let qmp = dir.join(format!("q{run}.qmp"));
        let Ok(mut vm) = qemu_cmd(&kernel, memory, &qmp, accel).spawn() else {
            return s;
        };
        let Some(mut q) = Qmp::connect(&qmp) else {
            let _ = vm.kill();
            let mut e = String::new();
            if let Some(mut err) = vm.stderr.take() {
                let _ = err.read_to_string(&mut e);
            }
            eprintln!("qemu did not start: {e}");
            return s;
        };
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        q.exec("stop", "");
        s.pause.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        q.exec("cont", "");
        s.resume.push(t.elapsed().as_secs_f64() * 1000.0);
        q.exec("stop", "");
        let file = dir.join(format!("qemu-{memory}.mig"));
        let t = Instant::now();
        q.exec(
            "migrate",
            &format!("{{\"uri\":\"exec:cat > {}\"}}", file.display()),
        );
        if wait_migration(&mut q) {
            s.snapshot.push(t.elapsed().as_secs_f64() * 1000.0);
            s.disk_mib.push(allocated_mib(&file));
        }
        q.exec("quit", "");
        let _ = vm.wait();
        // Restore: spawn with -incoming, wait for the migration, `cont`, until running.
        let qmp2 = dir.join(format!("r{run}.qmp"));
        let start = Instant::now();
        let mut c = qemu_cmd(&kernel, memory, &qmp2, accel);
        c.arg("-incoming")
            .arg(format!("exec:cat {}", file.display()));
        let Ok(mut r) = c.spawn() else { return s };
        if let Some(mut q) = Qmp::connect(&qmp2) {
            if wait_migration(&mut q) {
                q.exec("cont", "");
                loop {
                    match q.exec("query-status", "") {
                        Some(l) if l.contains("\"running\"") && l.contains("true") => {
                            s.restore.push(start.elapsed().as_secs_f64() * 1000.0);
                            break;
                        }
                        Some(_) if start.elapsed() < Duration::from_secs(60) => {}
                        _ => break,
                    }
                }
            }
            q.exec("quit", "");
        }
        let _ = r.kill();
        let _ = r.wait();
    }
    s
}

fn main() {
    let runs: usize = arg("--runs").and_then(|v| v.parse().ok()).unwrap_or(5);
    let accel = arg("--accel").unwrap_or_else(|| "kvm".into());
    let vireo = vireo_binary();
    if !have(&vireo) {
        eprintln!(
            "no vireo binary at {} (build it, or set VIREO)",
            vireo.display()
        );
        std::process::exit(1);
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vireo-bench-snap-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let qemu = !flag("--no-qemu") && have(Path::new(QEMU));
    println!("bench/snapshot: counting probe, {accel}, {runs} runs, medians (ms)");
    println!(
        "{:<6} {:>6} {:>9} {:>9} {:>10} {:>9} {:>12}",
        "vmm", "memory", "pause", "resume", "snapshot", "file MiB", "restore→run"
    );
    for memory in ["256M", "2G"] {
        let mut rows = vec![("vireo", vireo_run(&vireo, &dir, &accel, memory, runs))];
        if qemu {
            rows.push(("qemu", qemu_run(&dir, &accel, memory, runs)));
        }
        for (name, s) in &rows {
            println!(
                "{:<6} {:>6} {:>9} {:>9} {:>10} {:>9} {:>12}",
                name,
                memory,
                fmt(median(s.pause.clone()), 3),
                fmt(median(s.resume.clone()), 3),
                fmt(median(s.snapshot.clone()), 1),
                fmt(median(s.disk_mib.clone()), 1),
                fmt(median(s.restore.clone()), 2),
            );
        }
        if rows.len() == 2 {
            let ratio = |f: fn(&Stats) -> &Vec<f64>| match (
                median(f(&rows[0].1).clone()),
                median(f(&rows[1].1).clone()),
            ) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                _ => "n/a".into(),
            };
            println!(
                "{:<6} {:>6} {:>9} {:>9} {:>10} {:>9} {:>12}",
                "ratio",
                memory,
                ratio(|s| &s.pause),
                ratio(|s| &s.resume),
                ratio(|s| &s.snapshot),
                ratio(|s| &s.disk_mib),
                ratio(|s| &s.restore),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
