//! `bench/disk`, part 2: the default guest on vireo and on QEMU, same kind of CPU backend
//! (vireo's emulator against QEMU TCG here; `--accel kvm` against `-accel kvm` with hardware
//! KVM), same image and cache mode (the host page cache: vireo's default, QEMU's
//! `cache=writeback`): busybox `dd` with `iflag=direct` / `oflag=direct` inside the guest,
//! timed with the guest's own clock. Medians of interleaved runs and vireo/QEMU ratios.
//!
//! Usage: `cargo build --release --workspace && target/x86_64-unknown-linux-gnu/release/disk_guest [--runs N] [--mib N] [--accel emu|kvm]`

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vireo_bench::{fmt, have, measure, median, qemu_accel, qemu_pc, vireo_binary};
use vireo_guests::default_guest::{cache_dir, command_param, ensure, Options};

const QEMU: &str = "qemu-system-x86_64";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn value(out: &str, key: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.split_once(key).map(|(_, r)| r))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn main() {
    let runs: usize = arg("--runs", "3").parse().unwrap_or(3);
    // The guest times each dd with its monotonic clock in nanoseconds (the "now at" line of
    // /proc/timer_list; /proc/uptime has 10 ms steps, 12% of a 256 MiB read at 3 GiB/s).
    let mib: u64 = arg("--mib", "256").parse().unwrap_or(256);
    let accel = arg("--accel", "emu");
    let guest = match cache_dir().and_then(|c| ensure(&c, &Options::default())) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: the default guest: {e}");
            std::process::exit(1);
        }
    };
    let dir = std::env::temp_dir().join(format!("vireo-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; (mib << 20) as usize]).expect("image");
    // Time each dd with the guest's monotonic clock; MiB/s = mib / seconds.
    let script = format!(
        "t() {{ head -3 /proc/timer_list | sed -n 's/^now at \\([0-9]*\\) nsecs/\\1/p'; }}; \
         a=$(t); dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null; \
         b=$(t); dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null; \
         c=$(t); \
         echo \"read-mibs: $(awk \"BEGIN{{print {mib}*1e9/($b-$a)}}\")\"; \
         echo \"write-mibs: $(awk \"BEGIN{{print {mib}*1e9/($c-$b)}}\")\"; echo bench-done"
    );
    let cmd = command_param(&["sh".into(), "-c".into(), script]).expect("command");
    let cmdline = format!("{} {cmd}", guest.cmdline);

    let mut vireo = Command::new(vireo_binary());
    vireo
        .args(["run", "--accel", &accel, "--memory", "256M", "--kernel"])
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .arg("--cmdline")
        .arg(&cmdline)
        .arg("--disk")
        .arg(format!("path={}", image.display()));
    let mut vmms = vec![("vireo", vireo)];
    if have(Path::new(QEMU)) {
        let mut q = Command::new(QEMU);
        // One vCPU, as QEMU's default.
        qemu_pc(&mut q, qemu_accel(&accel), "256M")
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=d0,cache=writeback",
                image.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0", "-kernel"])
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .arg("-append")
            .arg(&cmdline);
        vmms.push(("qemu", q));
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); vmms.len()];
    for _ in 0..runs {
        for (i, (_, cmd)) in vmms.iter().enumerate() {
            let mut c = Command::new(cmd.get_program());
            c.args(cmd.get_args());
            if let Ok(s) = measure(c, &["bench-done"], Duration::from_secs(600)) {
                results[i].0.extend(value(&s.output, "read-mibs:"));
                results[i].1.extend(value(&s.output, "write-mibs:"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("bench/disk (guest view): default guest, {accel}, {mib} MiB, dd with O_DIRECT in the guest, {runs} runs");
    println!();
    println!("| VMM | read MiB/s | write MiB/s |\n|---|---:|---:|");
    let med: Vec<(Option<f64>, Option<f64>)> = results
        .iter()
        .map(|(r, w)| (median(r.clone()), median(w.clone())))
        .collect();
    for ((name, _), (r, w)) in vmms.iter().zip(&med) {
        println!("| {name} | {} | {} |", fmt(*r, 1), fmt(*w, 1));
    }
    if let [(Some(vr), Some(vw)), (Some(qr), Some(qw))] = med[..] {
        println!("| vireo/qemu | {:.2} | {:.2} |", vr / qr, vw / qw);
    }
    // Every run, in the order run (vireo and QEMU alternate).
    println!();
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for ((name, _), (r, w)) in vmms.iter().zip(&results) {
        println!("{name} runs: read {}; write {}", list(r), list(w));
    }
}
