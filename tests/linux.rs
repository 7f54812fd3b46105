//! Linux guests: the default Debian guest booted by vireo, checked by what the guest reports.
//!
//! On a KVM-PVM host only the banner smoke test runs on KVM (stock kernels take minutes
//! there); the full matrix runs on every backend listed by `full_backends`.

mod common;

use std::time::Duration;

use common::{default_guest, field, full_backends, run, vireo};

/// The kernel's own ELF `vmlinux`, unpacked from the bzImage into `dir`.
fn extract_vmlinux(bzimage: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    use vireo_arch::loader::{parse_setup_header, unpack_payload};
    let image = std::fs::read(bzimage).unwrap();
    let header = parse_setup_header(&image).expect("bzImage header");
    let elf = unpack_payload(&image, &header, "kernel")
        .unwrap()
        .expect("LZ4 or gzip payload");
    let path = dir.join("vmlinux");
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn kvm_smoke_linux_banner_on_serial() {
    let test = "kvm_smoke_linux_banner_on_serial";
    if common::skip_without_kvm(test) {
        return;
    }
    let Some(g) = default_guest(test) else { return };
    let dir = common::TempDir::new("vmlinux");
    let vmlinux = extract_vmlinux(&g.kernel, dir.path());
    // The bzImage (unpacked by vireo) and the ELF vmlinux given directly.
    for kernel in [&g.kernel, &vmlinux] {
        let mut cmd = vireo();
        cmd.args(["run", "--accel", "kvm", "--memory", "256M", "--kernel"])
            .arg(kernel)
            .arg("--initrd")
            .arg(&g.initrd)
            .args([
                "--cmdline",
                "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
            ]);
        // On KVM-PVM the banner takes ~10 s; allow minutes.
        let o = run(cmd, Duration::from_secs(240), Some("ACPI: RSDP"));
        assert!(
            !o.timed_out,
            "no banner in time from {}\n{o}",
            kernel.display()
        );
        assert!(o.stdout.contains("Linux version 6."), "{o}");
        assert!(o.stdout.contains("Command line: console=ttyS0"), "{o}");
        assert!(o.stdout.contains("BIOS-e820"), "{o}");
        o.assert_clean();
    }
}

fn boot_and_run(accel: &str, cpus: u32, memory: &str, command: &[&str]) -> common::Outcome {
    let mut cmd = vireo();
    cmd.args([
        "run",
        "--accel",
        accel,
        "--cpus",
        &cpus.to_string(),
        "--memory",
        memory,
        "--",
    ])
    .args(command);
    let o = run(cmd, Duration::from_secs(600), None);
    o.assert_clean();
    o
}

#[test]
fn boots_to_init_and_reports_cpus_memory_and_time() {
    let test = "boots_to_init_and_reports_cpus_memory_and_time";
    if default_guest(test).is_none() {
        return;
    }
    for accel in full_backends(test) {
        // 96 MiB is about the least Debian's cloud kernel boots in (its image alone takes
        // ~46 MiB; at 64 MiB it runs out of memory during boot, under QEMU too).
        for (cpus, memory, mib) in [(1u32, "96M", 96u64), (2, "256M", 256), (4, "5G", 5120)] {
            let o = boot_and_run(
                accel,
                cpus,
                memory,
                &[
                    "sh",
                    "-c",
                    "echo nproc: $(nproc); echo memtotal: $(sed -n 's/MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo); echo date: $(date +%s)",
                ],
            );
            assert_eq!(o.code(), Some(0), "{accel} {cpus} {memory}: {o}");
            assert_eq!(
                field(&o.stdout, "nproc:"),
                Some(cpus.to_string().as_str()),
                "{o}"
            );
            let kib: u64 = field(&o.stdout, "memtotal:")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no memtotal\n{o}"));
            // MemTotal excludes the kernel image (~46 MiB for Debian's cloud kernel), the page
            // structures (~1.6% of RAM) and reserved areas.
            assert!(
                kib <= mib * 1024 && kib + 64 * 1024 >= mib * 1024 * 9 / 10,
                "{kib} KiB of {memory}\n{o}"
            );
            let guest: i64 = field(&o.stdout, "date:")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no date\n{o}"));
            let host = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            assert!(
                (host - guest).abs() < 300,
                "guest time {guest} vs host {host}\n{o}"
            );
        }
    }
}

#[test]
fn poweroff_reboot_and_panic_end_the_run() {
    let test = "poweroff_reboot_and_panic_end_the_run";
    if default_guest(test).is_none() {
        return;
    }
    for accel in full_backends(test) {
        // The command ends, init powers off: status 0.
        let o = boot_and_run(accel, 1, "128M", &["true"]);
        assert_eq!(o.code(), Some(0), "{accel} poweroff: {o}");

        // A reboot with --no-reboot ends the run with status 0, without a second boot.
        let mut cmd = vireo();
        cmd.args(["run", "--accel", accel, "--no-reboot", "--", "reboot", "-f"]);
        let o = run(cmd, Duration::from_secs(600), None);
        o.assert_clean();
        assert_eq!(o.code(), Some(0), "{accel} reboot: {o}");
        assert_eq!(
            o.stdout.matches("vireo-guest: init ready").count(),
            1,
            "{o}"
        );

        // A kernel panic ends the run with status 2 and says so.
        let o = boot_and_run(
            accel,
            1,
            "128M",
            &["sh", "-c", "echo c > /proc/sysrq-trigger"],
        );
        assert_eq!(o.code(), Some(2), "{accel} panic: {o}");
        assert!(o.stderr.contains("panicked"), "{o}");
    }
}
