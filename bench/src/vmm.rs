//! `bench/vmm`: the VMM itself on a probe guest, vireo against QEMU (`-M microvm -accel kvm`),
//! in one run: (a) process start to first serial byte, (b) round trip of a port-I/O and an MMIO
//! exit, (c) peak RSS with a 64 MiB guest. Medians of many runs and vireo/QEMU ratios.
//!
//! Usage: `cargo build --release && target/release/vmm [--runs N] [--exits N]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vireo_bench::{fmt, have, measure, median, vireo_binary, Sample, QEMU_BARE, QEMU_MICROVM};
use vireo_guests::probe::{build_for, Platform, Probe};

const QEMU: &str = "qemu-system-x86_64";
/// A port no device of either VMM claims.
const FREE_PORT: u16 = 0x440;
/// An address in the 32-bit hole no device of either VMM claims.
const FREE_MMIO: u64 = 0xd000_0000;

/// Builds the command that boots `kernel` with `memory` of RAM.
type CommandFn = Box<dyn Fn(&Path, &str) -> Command>;

struct Vmm {
    name: &'static str,
    command: CommandFn,
}

fn vireo(bin: PathBuf) -> Vmm {
    Vmm {
        name: "vireo",
        command: Box::new(move |kernel, memory| {
            let mut c = Command::new(&bin);
            c.args(["run", "--accel", "kvm", "--memory", memory, "--kernel"])
                .arg(kernel);
            c
        }),
    }
}

fn qemu() -> Vmm {
    Vmm {
        name: "qemu",
        command: Box::new(|kernel, memory| {
            let mut c = Command::new(QEMU);
            c.args([
                "-M",
                QEMU_MICROVM,
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                memory,
            ])
            .args(QEMU_BARE)
            .args(["-serial", "stdio", "-kernel"])
            .arg(kernel);
            c
        }),
    }
}

struct Row {
    name: &'static str,
    first_ms: Option<f64>,
    rss_mib: Option<f64>,
    pio_us: Option<f64>,
    mmio_us: Option<f64>,
}

fn write_probe(dir: &Path, name: &str, probe: &Probe) -> PathBuf {
    let p = dir.join(format!("{name}.elf"));
    std::fs::write(&p, build_for(probe, Platform::Vireo)).expect("write probe");
    p
}

fn samples(vmm: &Vmm, kernel: &Path, markers: &[&str], runs: usize) -> Vec<Sample> {
    (0..runs)
        .filter_map(|_| {
            measure(
                (vmm.command)(kernel, "64M"),
                markers,
                Duration::from_secs(60),
            )
            .ok()
        })
        .collect()
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1e3)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runs = arg("--runs", 30);
    let exits = arg("--exits", 20_000) as u32;
    let dir = std::env::temp_dir().join(format!("vireo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let bin = vireo_binary();
    if !bin.exists() {
        eprintln!(
            "error: no vireo binary at {}: run `cargo build --release --workspace` first",
            bin.display()
        );
        std::process::exit(1);
    }
    let mut vmms = vec![vireo(bin)];
    if have(Path::new(QEMU)) {
        vmms.push(qemu());
    } else {
        eprintln!("note: {QEMU} not found (apt-get install qemu-system-x86): vireo only");
    }
    println!(
        "bench/vmm: {runs} start-up runs, {exits} exits per loop, host KVM{}",
        if Path::new("/sys/module/kvm_pvm").exists() {
            " (KVM-PVM)"
        } else {
            ""
        }
    );

    let first = write_probe(&dir, "first-byte", &Probe::FirstByte);
    let pio = write_probe(
        &dir,
        "pio",
        &Probe::PioLoop {
            n: exits,
            port: FREE_PORT,
        },
    );
    let mmio = write_probe(
        &dir,
        "mmio",
        &Probe::MmioLoop {
            n: exits,
            addr: FREE_MMIO,
        },
    );

    let mut rows = Vec::new();
    // Interleave the VMMs run by run so machine noise hits both alike.
    let mut start: Vec<Vec<Sample>> = vec![Vec::new(); vmms.len()];
    for _ in 0..runs {
        for (i, v) in vmms.iter().enumerate() {
            start[i].extend(samples(v, &first, &["hello\n"], 1));
        }
    }
    for (i, v) in vmms.iter().enumerate() {
        let loop_cost = |kernel: &Path| {
            let s = samples(v, kernel, &["S\n", "E\n"], runs.div_ceil(6).max(3));
            median(
                s.iter()
                    .filter_map(|s| match (s.markers[0], s.markers[1]) {
                        (Some(a), Some(b)) => Some((b - a).as_secs_f64() * 1e6 / exits as f64),
                        _ => None,
                    })
                    .collect(),
            )
        };
        rows.push(Row {
            name: v.name,
            first_ms: median(start[i].iter().filter_map(|s| ms(s.first_byte)).collect()),
            rss_mib: median(
                start[i]
                    .iter()
                    .filter_map(|s| s.max_rss_kib.map(|k| k as f64 / 1024.0))
                    .collect(),
            ),
            pio_us: loop_cost(&pio),
            mmio_us: loop_cost(&mmio),
        });
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!("| VMM | first serial byte (ms) | peak RSS (MiB) | PIO exit (µs) | MMIO exit (µs) |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.name,
            fmt(r.first_ms, 2),
            fmt(r.rss_mib, 2),
            fmt(r.pio_us, 2),
            fmt(r.mmio_us, 2)
        );
    }
    if rows.len() == 2 {
        print_ratio_row(&rows);
    }
    boot_default_guest(&vmms, runs.div_ceil(6).max(3));
}

fn print_ratio_row(rows: &[Row]) {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    println!(
        "| vireo/qemu | {} | {} | {} | {} |",
        fmt(ratio(rows[0].first_ms, rows[1].first_ms), 3),
        fmt(ratio(rows[0].rss_mib, rows[1].rss_mib), 3),
        fmt(ratio(rows[0].pio_us, rows[1].pio_us), 3),
        fmt(ratio(rows[0].mmio_us, rows[1].mmio_us), 3)
    );
}

/// With hardware KVM: boot the default guest to init on both VMMs (same kernel, initramfs and
/// command line) and compare the time to the init's ready line.
fn boot_default_guest(vmms: &[Vmm], runs: usize) {
    if Path::new("/sys/module/kvm_pvm").exists() {
        println!("\ndefault guest to init: skipped (KVM-PVM host: stock kernels do not boot on KVM here)");
        return;
    }
    use vireo_guests::default_guest::{cache_dir, command_param, ensure, Options, READY_LINE};
    let guest = match cache_dir().and_then(|c| ensure(&c, &Options::default())) {
        Ok(g) => g,
        Err(e) => {
            println!("\ndefault guest to init: skipped ({e})");
            return;
        }
    };
    let cmd = command_param(&["true".to_string()]).expect("command");
    let cmdline = format!("{} {cmd}", guest.cmdline);
    println!("\n| VMM | default guest to init (ms) |\n|---|---:|");
    let mut medians = Vec::new();
    for v in vmms {
        let mut times = Vec::new();
        for _ in 0..runs {
            let mut c = (v.command)(&guest.kernel, "256M");
            c.arg(if v.name == "vireo" {
                "--initrd"
            } else {
                "-initrd"
            })
            .arg(&guest.initrd)
            .arg(if v.name == "vireo" {
                "--cmdline"
            } else {
                "-append"
            })
            .arg(&cmdline);
            if let Ok(s) = measure(c, &[READY_LINE], Duration::from_secs(120)) {
                times.extend(ms(s.markers[0]));
            }
        }
        let m = median(times);
        println!("| {} | {} |", v.name, fmt(m, 1));
        medians.push(m);
    }
    if let [Some(a), Some(b)] = medians[..] {
        println!("| vireo/qemu | {:.3} |", a / b);
    }
}
