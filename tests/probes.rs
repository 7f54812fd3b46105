//! Bare-metal probe guests on every backend that can run them here: the exit paths of the
//! VMM (serial, unknown I/O, ACPI power-off and reset, i8042 reset, CMOS time, SMP start-up,
//! ring 3) checked by what the guest itself prints.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{run, vireo, TempDir};
use vireo_guests::probe::{build, user_mode_expected, Probe};

const TIMEOUT: Duration = Duration::from_secs(60);

fn probe_file(dir: &TempDir, probe: &Probe) -> PathBuf {
    let path = dir.path().join("probe.elf");
    std::fs::write(&path, build(probe)).unwrap();
    path
}

fn run_probe(probe: &Probe, accel: &str, extra: &[&str]) -> common::Outcome {
    let dir = TempDir::new("probe");
    let path = probe_file(&dir, probe);
    let mut cmd = vireo();
    cmd.arg("run")
        .arg("--kernel")
        .arg(&path)
        .args(["--accel", accel])
        .args(extra);
    let o = run(cmd, TIMEOUT, None);
    assert!(
        !o.timed_out,
        "{probe:?} on {accel} with {extra:?} timed out\n{o}"
    );
    o.assert_clean();
    o
}

#[test]
fn hello_prints_and_powers_off() {
    for accel in common::probe_backends("hello_prints_and_powers_off") {
        let o = run_probe(&Probe::Hello, accel, &[]);
        assert_eq!(o.stdout, "vireo-probe: hello\n", "{accel}: {o}");
        assert_eq!(o.code(), Some(0), "{accel}: {o}");
    }
}

#[test]
fn memory_sizes_from_32m_to_above_4g() {
    for accel in common::probe_backends("memory_sizes_from_32m_to_above_4g") {
        for mem in ["32M", "256M", "3G", "5G"] {
            let o = run_probe(&Probe::Hello, accel, &["--memory", mem]);
            assert_eq!(o.stdout, "vireo-probe: hello\n", "{accel} {mem}: {o}");
            assert_eq!(o.code(), Some(0), "{accel} {mem}: {o}");
        }
    }
}

#[test]
fn unknown_ports_and_mmio_read_all_ones() {
    for accel in common::probe_backends("unknown_ports_and_mmio_read_all_ones") {
        let o = run_probe(&Probe::UnknownIo, accel, &[]);
        assert_eq!(
            o.stdout, "unknown-io: pio8=ff pio16=ffff pio32=ffffffff mmio32=ffffffff\n",
            "{accel}: {o}"
        );
        assert_eq!(o.code(), Some(0));
    }
}

#[test]
fn acpi_power_off_exits_zero() {
    for accel in common::probe_backends("acpi_power_off_exits_zero") {
        let o = run_probe(&Probe::PowerOff, accel, &[]);
        assert_eq!(o.stdout, "poweroff\n", "{accel}: {o}");
        assert_eq!(o.code(), Some(0));
    }
}

#[test]
fn resets_stop_at_once_with_no_reboot() {
    for accel in common::probe_backends("resets_stop_at_once_with_no_reboot") {
        for (probe, line) in [
            (Probe::AcpiReset, "acpi-reset\n"),
            (Probe::I8042Reset, "i8042-reset\n"),
        ] {
            let o = run_probe(&probe, accel, &["--no-reboot"]);
            // Nothing after the reset write: the guest must not print "still-running".
            assert_eq!(o.stdout, line, "{accel}: {o}");
            assert_eq!(o.code(), Some(0), "{accel}: {o}");
        }
    }
}

#[test]
fn reset_restarts_the_vm() {
    for accel in common::probe_backends("reset_restarts_the_vm") {
        let dir = TempDir::new("reboot");
        let path = probe_file(&dir, &Probe::I8042Reset);
        let mut cmd = vireo();
        cmd.arg("run")
            .arg("--kernel")
            .arg(&path)
            .args(["--accel", accel]);
        // Three boots in a row prove the restart; then stop it.
        let o = run(
            cmd,
            TIMEOUT,
            Some("i8042-reset\ni8042-reset\ni8042-reset\n"),
        );
        assert!(!o.timed_out, "{accel}: {o}");
        assert!(!o.stdout.contains("still-running"), "{accel}: {o}");
    }
}

#[test]
fn smp_every_vcpu_reports_its_apic_id() {
    for accel in common::probe_backends("smp_every_vcpu_reports_its_apic_id") {
        for cpus in [1u32, 2, 4] {
            let o = run_probe(&Probe::Smp, accel, &["--cpus", &cpus.to_string()]);
            assert_eq!(o.code(), Some(0), "{accel} {cpus}: {o}");
            let lines: Vec<&str> = o.stdout.lines().collect();
            assert_eq!(lines.first(), Some(&"cpu 0 bsp"), "{accel} {cpus}: {o}");
            assert_eq!(lines.last(), Some(&format!("cpus {cpus}").as_str()), "{o}");
            let mut aps: Vec<u32> = lines[1..lines.len() - 1]
                .iter()
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    assert_eq!(f.len(), 3, "{l}");
                    assert_eq!(f[1], f[2], "CPUID and LAPIC APIC IDs differ: {l}");
                    f[1].parse().unwrap()
                })
                .collect();
            aps.sort();
            assert_eq!(aps, (1..cpus).collect::<Vec<_>>(), "{accel} {cpus}: {o}");
        }
    }
}

#[test]
fn cmos_reports_host_utc() {
    for accel in common::probe_backends("cmos_reports_host_utc") {
        let o = run_probe(&Probe::CmosTime, accel, &[]);
        let line = o.stdout.trim();
        let t = line.strip_prefix("rtc: ").unwrap_or_else(|| panic!("{o}"));
        let guest = parse_utc(t).unwrap_or_else(|| panic!("bad time {t}"));
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((host - guest).abs() < 120, "guest {t} vs host {host}");
    }
}

/// "YYYY-MM-DD HH:MM:SS" (UTC) to seconds since the epoch.
fn parse_utc(s: &str) -> Option<i64> {
    let (date, time) = s.split_once(' ')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + t[0] * 3600 + t[1] * 60 + t[2])
}

#[test]
fn user_mode_loop_runs_at_cpl3() {
    for accel in common::probe_backends("user_mode_loop_runs_at_cpl3") {
        let n = 100_000;
        let o = run_probe(&Probe::UserMode { n }, accel, &[]);
        let expected = format!(
            "user: cpl=3 result={:016x}\nuser: back in ring 0\n",
            user_mode_expected(n)
        );
        assert_eq!(o.stdout, expected, "{accel}: {o}");
        assert_eq!(o.code(), Some(0));
    }
}

/// Start a VM that keeps running, send it `signal` once the guest has printed, and check the
/// exit status is 128 + the signal.
fn signal_stops_a_running_vm(test: &str, signal: &str, number: i32) {
    for accel in common::probe_backends(test) {
        let dir = TempDir::new("signal");
        let path = probe_file(
            &dir,
            &Probe::PioLoop {
                n: u32::MAX,
                port: 0x510,
            },
        );
        let mut cmd = vireo();
        cmd.arg("run")
            .arg("--kernel")
            .arg(&path)
            .args(["--accel", accel]);
        cmd.stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
        assert_eq!(&first, b"S");
        let st = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + number), "{accel}: {status:?}");
    }
}

#[test]
fn sigterm_stops_a_running_vm_with_non_zero_status() {
    signal_stops_a_running_vm("sigterm_stops_a_running_vm", "-TERM", 15);
}

#[test]
fn sigint_stops_a_running_vm() {
    signal_stops_a_running_vm("sigint_stops_a_running_vm", "-INT", 2);
}

#[test]
fn thirty_two_vcpus_all_start() {
    for accel in common::probe_backends("thirty_two_vcpus_all_start") {
        let o = run_probe(&Probe::Smp, accel, &["--cpus", "32"]);
        assert_eq!(o.code(), Some(0), "{accel}: {o}");
        assert!(o.stdout.ends_with("cpus 32\n"), "{accel}: {o}");
    }
}
