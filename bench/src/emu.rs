//! `bench/emu`: vireo's emulator against QEMU TCG on the default guest (same kernel,
//! initramfs, command line, memory and vCPUs): boot to init (wall time, and the guest's own
//! uptime when init starts the command) and a user-space CPU workload timed inside the guest
//! (`sha256sum` of 64 MiB). Medians and vireo/QEMU ratios.
//!
//! Usage: `cargo build --release --workspace && target/x86_64-unknown-linux-gnu/release/emu [--runs N]`

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vireo_bench::{fmt, have, measure, median, qemu_pc, vireo_binary};
use vireo_guests::default_guest::{cache_dir, command_param, ensure, Options, READY_LINE};

const QEMU: &str = "qemu-system-x86_64";

/// The guest command: its uptime when it starts, then the sha256 workload timed with the
/// guest's own clock.
const WORKLOAD: &str = "read up _ < /proc/uptime; echo \"uptime-at-init: $up\"; \
    dd if=/dev/zero of=/tmp/f bs=1M count=64 2>/dev/null; \
    read a _ < /proc/uptime; sha256sum /tmp/f >/dev/null; read b _ < /proc/uptime; \
    echo \"sha256-seconds: $(awk \"BEGIN{print $b-$a}\")\"; echo bench-done";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Value after `key` in the guest's output.
fn field(out: &str, key: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

struct Runs {
    to_init_ms: Vec<f64>,
    uptime_s: Vec<f64>,
    sha_s: Vec<f64>,
}

impl Runs {
    fn new() -> Self {
        Runs {
            to_init_ms: Vec::new(),
            uptime_s: Vec::new(),
            sha_s: Vec::new(),
        }
    }

    fn add(&mut self, cmd: &mut Command) {
        let Ok(s) = measure_output(cmd) else {
            return;
        };
        self.to_init_ms.extend(s.0);
        self.uptime_s.extend(field(&s.1, "uptime-at-init:"));
        match field(&s.1, "sha256-seconds:") {
            Some(v) => self.sha_s.push(v),
            None => {
                let tail: String =
                    s.1.chars()
                        .rev()
                        .take(600)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                eprintln!("note: a run printed no sha256 time; its output ends with:\n{tail}");
            }
        }
    }
}

/// Time to the ready line, and the whole output up to the workload's last line.
fn measure_output(cmd: &mut Command) -> std::io::Result<(Option<f64>, String)> {
    let c = clone_command(cmd);
    let s = measure(c, &[READY_LINE, "bench-done"], Duration::from_secs(600))?;
    Ok((
        s.markers[0].map(|d| d.as_secs_f64() * 1e3),
        s.output.clone(),
    ))
}

fn clone_command(c: &Command) -> Command {
    let mut n = Command::new(c.get_program());
    n.args(c.get_args());
    n
}

fn main() {
    let runs = arg("--runs", 5);
    let guest = match cache_dir().and_then(|c| ensure(&c, &Options::default())) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: the default guest: {e}");
            std::process::exit(1);
        }
    };
    let cmd = command_param(&["sh".into(), "-c".into(), WORKLOAD.into()]).expect("command");
    let cmdline = format!("{} {cmd}", guest.cmdline);

    let bin = vireo_binary();
    let mut vireo = Command::new(&bin);
    vireo
        .args(["run", "--accel", "emu", "--memory", "256M", "--kernel"])
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .arg("--cmdline")
        .arg(&cmdline);
    let mut cmds = vec![("vireo emu", vireo)];
    if have(Path::new(QEMU)) {
        let mut q = Command::new(QEMU);
        qemu_pc(&mut q, "tcg", "256M")
            .arg("-kernel")
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .arg("-append")
            .arg(&cmdline);
        cmds.push(("qemu tcg", q));
    } else {
        eprintln!("note: {QEMU} not found (apt-get install qemu-system-x86): vireo only");
    }
    // Interleave the VMMs run by run so machine noise hits both alike.
    let mut rows: Vec<(&str, Runs)> = cmds.iter().map(|(n, _)| (*n, Runs::new())).collect();
    for _ in 0..runs {
        for ((_, cmd), (_, r)) in cmds.iter_mut().zip(rows.iter_mut()) {
            r.add(cmd);
        }
    }

    println!("bench/emu: default guest, 1 vCPU, 256 MiB, {runs} runs each");
    println!();
    println!(
        "| | boot to init, wall (ms) | guest uptime at init (s) | sha256 of 64 MiB in guest (s) |"
    );
    println!("|---|---:|---:|---:|");
    let med: Vec<[Option<f64>; 3]> = rows
        .iter()
        .map(|(_, r)| {
            [
                median(r.to_init_ms.clone()),
                median(r.uptime_s.clone()),
                median(r.sha_s.clone()),
            ]
        })
        .collect();
    for ((name, _), m) in rows.iter().zip(&med) {
        println!(
            "| {name} | {} | {} | {} |",
            fmt(m[0], 0),
            fmt(m[1], 2),
            fmt(m[2], 2)
        );
    }
    if med.len() == 2 {
        let ratio = |i: usize| match (med[0][i], med[1][i]) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        println!(
            "| vireo/qemu | {} | {} | {} |",
            fmt(ratio(0), 2),
            fmt(ratio(1), 2),
            fmt(ratio(2), 2)
        );
    }
}
