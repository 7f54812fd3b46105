//! Shared benchmark plumbing: start a VMM process, time its serial output, read its peak RSS,
//! and summarise samples as medians.

pub mod qmp;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One process run: when each watched marker appeared, and the peak RSS.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Time from spawn to the first byte on stdout.
    pub first_byte: Option<Duration>,
    /// Time from spawn to each marker's first appearance, in the order given.
    pub markers: Vec<Option<Duration>>,
    /// Peak resident set size in KiB (ru_maxrss).
    pub max_rss_kib: Option<u64>,
    /// Everything read from stdout.
    pub output: String,
}

/// Spawn `cmd`, read stdout until every marker has been seen (or the process ends or `timeout`
/// passes), then kill it if still running and collect its rusage.
pub fn measure(mut cmd: Command, markers: &[&str], timeout: Duration) -> std::io::Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let mut sample = Sample {
        markers: vec![None; markers.len()],
        ..Default::default()
    };
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = start.elapsed();
        if sample.first_byte.is_none() {
            sample.first_byte = Some(now);
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        for (slot, m) in sample.markers.iter_mut().zip(markers) {
            if slot.is_none() && text.contains(m) {
                *slot = Some(now);
            }
        }
        if sample.markers.iter().all(Option::is_some) {
            break;
        }
    }
    let _ = child.kill();
    sample.max_rss_kib = wait_rusage(&mut child);
    sample.output = String::from_utf8_lossy(&seen).into_owned();
    Ok(sample)
}

/// Reap `child` and return its peak RSS in KiB.
fn wait_rusage(child: &mut Child) -> Option<u64> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is a plain C struct; wait4 fills it for our own child, which std has not
    // reaped (we never called wait on it).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our child.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    (r == pid).then_some(ru.ru_maxrss as u64)
}

/// Median of the samples (None when empty).
pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

/// The vireo binary next to this benchmark (target/release/vireo), or $VIREO.
pub fn vireo_binary() -> PathBuf {
    if let Ok(p) = std::env::var("VIREO") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("exe dir").join("vireo")
}

/// True when `bin` can be executed (found on PATH or as a path).
pub fn have(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Format an optional number with `digits` decimals, or "n/a".
pub fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "n/a".to_string())
}

/// `accel` as QEMU's `-accel` names it: `kvm`, or `tcg` for vireo's emulator.
pub fn qemu_accel(accel: &str) -> &'static str {
    if accel == "kvm" {
        "kvm"
    } else {
        "tcg"
    }
}

/// QEMU's microvm machine as the VMM-level benchmarks run it: no option ROMs, an ISA serial
/// port, no RTC, PIT or PIC.
pub const QEMU_MICROVM: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=off,pic=off";

/// QEMU with no default devices, no user configuration and no display.
pub const QEMU_BARE: [&str; 4] = ["-nodefaults", "-no-user-config", "-display", "none"];

/// Adds the PC machine the guest-level benchmarks compare against: `-M pc` on `accel`
/// (`tcg` or `kvm`) with `memory`, one vCPU, no default devices or user config, no display,
/// the serial port on stdio, and exit instead of reboot.
pub fn qemu_pc<'c>(c: &'c mut Command, accel: &str, memory: &str) -> &'c mut Command {
    c.args(["-M", "pc", "-accel", accel, "-m", memory, "-smp", "1"])
        .args(QEMU_BARE)
        .args(["-serial", "stdio", "-no-reboot"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn measure_sees_markers() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "printf 'S\\n'; sleep 0.05; printf 'E\\n'"]);
        let s = measure(cmd, &["S\n", "E\n"], Duration::from_secs(5)).unwrap();
        let (a, b) = (s.markers[0].unwrap(), s.markers[1].unwrap());
        assert!(b > a);
        assert!(s.first_byte.unwrap() <= a);
        assert!(s.max_rss_kib.unwrap() > 0);
    }
}
