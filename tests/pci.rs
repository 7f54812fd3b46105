//! PCI and virtio with probe guests, on the emulator and on KVM: the bus as the guest enumerates it (configuration
//! mechanism #1 and ECAM), BAR sizing, and whole virtio devices driven by a tiny driver —
//! which exercises the KVM plumbing (ioeventfd for notifications, GSI routing and irqfd for
//! MSI-X) that Linux cannot reach on a KVM-PVM host.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::{run, vireo, TempDir};
use vireo_guests::probe::{build, Probe, BLK_PROBE_PATTERN};

const TIMEOUT: Duration = Duration::from_secs(60);

fn run_probe(accel: &str, dir: &TempDir, probe: &Probe, extra: &[&str]) -> common::Outcome {
    let path = dir.path().join("probe.elf");
    std::fs::write(&path, build(probe)).unwrap();
    let mut cmd = vireo();
    cmd.arg("run")
        .arg("--kernel")
        .arg(&path)
        .args(["--accel", accel])
        .args(extra);
    let o = run(cmd, TIMEOUT, None);
    o.assert_clean();
    o
}

/// A disk image of `size` bytes whose sector 0 starts with bytes 0, 1, 2, ... 15.
fn disk(dir: &TempDir, name: &str, size: u64) -> String {
    let path = dir.path().join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&(0..16u8).collect::<Vec<_>>(), 0).unwrap();
    path.to_str().unwrap().to_string()
}

/// `path` as a `--disk` value: commas doubled.
fn opt(path: &str) -> String {
    path.replace(',', ",,")
}

/// `bar 00:SS.F N kind addr=A size=S` → (addr, size).
fn bar(stdout: &str, bdf: &str, index: u32) -> Option<(String, u64, u64)> {
    let prefix = format!("bar {bdf} {index} ");
    let line = stdout.lines().find(|l| l.starts_with(&prefix))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let addr = u64::from_str_radix(f[4].strip_prefix("addr=")?, 16).ok()?;
    let size = u64::from_str_radix(f[5].strip_prefix("size=")?, 16).ok()?;
    Some((f[3].to_string(), addr, size))
}

#[test]
fn pci_scan_shows_the_host_bridge_and_virtio_functions() {
    for accel in common::probe_backends("pci_scan_shows_the_host_bridge_and_virtio_functions") {
        pci_scan_shows_the_host_bridge_and_virtio_functions_on(accel);
    }
}

fn pci_scan_shows_the_host_bridge_and_virtio_functions_on(accel: &str) {
    let dir = TempDir::new("pciscan");
    let img = disk(&dir, "a.img", 8 << 20);
    let o = run_probe(
        accel,
        &dir,
        &Probe::PciScan,
        &["--disk", &format!("path={},serial=scan", opt(&img))],
    );
    assert_eq!(o.code(), Some(0), "{o}");
    let pci: Vec<&str> = o.stdout.lines().filter(|l| l.starts_with("pci ")).collect();
    assert_eq!(
        pci,
        vec![
            "pci 00:00.0 1b36:0008 class 060000",
            "pci 00:01.0 1af4:1042 class 018000",
            "pci 00:02.0 1af4:1044 class ff0000",
        ],
        "{o}"
    );
    // Five virtio vendor capabilities and MSI-X on each virtio function.
    for bdf in ["00:01.0", "00:02.0"] {
        assert!(
            o.stdout
                .contains(&format!("caps {bdf} 09 09 09 09 09 11\n")),
            "{bdf}: {o}"
        );
        let (kind, addr, size) = bar(&o.stdout, bdf, 0).unwrap_or_else(|| panic!("{o}"));
        assert_eq!(kind, "mem64");
        assert_eq!(size, 0x8000);
        // In the 64-bit window above RAM (256 MiB of RAM: the window starts at 4 GiB).
        assert!(
            addr >= 1 << 32 && addr % size == 0,
            "{bdf} BAR at {addr:#x}"
        );
        assert!(bar(&o.stdout, bdf, 2).is_none(), "{o}");
    }
    assert!(o.stdout.ends_with("ecam ok\n"), "{o}");
}

#[test]
fn disks_come_first_in_order_and_rng_can_be_disabled() {
    for accel in common::probe_backends("disks_come_first_in_order_and_rng_can_be_disabled") {
        disks_come_first_in_order_and_rng_can_be_disabled_on(accel);
    }
}

fn disks_come_first_in_order_and_rng_can_be_disabled_on(accel: &str) {
    let dir = TempDir::new("pciscan2");
    let a = disk(&dir, "a.img", 1 << 20);
    let b = disk(&dir, "b.img", 1 << 20);
    let o = run_probe(
        accel,
        &dir,
        &Probe::PciScan,
        &[
            "--disk",
            &opt(&a),
            "--disk",
            &format!("path={},readonly=on", opt(&b)),
            "--no-rng",
            "--memory",
            "5G",
        ],
    );
    assert_eq!(o.code(), Some(0), "{o}");
    let pci: Vec<&str> = o.stdout.lines().filter(|l| l.starts_with("pci ")).collect();
    assert_eq!(pci.len(), 3, "{o}");
    assert!(
        pci[1].contains("1af4:1042") && pci[2].contains("1af4:1042"),
        "{o}"
    );
    // With 5 GiB of RAM (3 GiB below the hole, 2 GiB from 4 GiB on) the 64-bit window
    // starts at 6 GiB.
    let (_, addr, _) = bar(&o.stdout, "00:01.0", 0).unwrap();
    assert!(addr >= 6 << 30, "{addr:#x}");
    assert!(o.stdout.ends_with("ecam ok\n"), "{o}");
}

#[test]
fn virtio_rng_interrupts_through_msix() {
    for accel in common::probe_backends("virtio_rng_interrupts_through_msix") {
        virtio_rng_interrupts_through_msix_on(accel);
    }
}

fn virtio_rng_interrupts_through_msix_on(accel: &str) {
    let dir = TempDir::new("virtiorng");
    let o = run_probe(accel, &dir, &Probe::VirtioRng, &[]);
    assert_eq!(o.code(), Some(0), "{o}");
    assert_eq!(
        o.stdout,
        "virtio-rng: found at 00:01.0\n\
         virtio-rng: features-ok status=0b\n\
         virtio-rng: driver-ok status=0f vector=0001\n\
         virtio-rng: irq=1 timeout=0 used=1 len=64 random=yes\n",
        "{o}"
    );
    // Without the device the probe says so.
    let o = run_probe(accel, &dir, &Probe::VirtioRng, &["--no-rng"]);
    assert_eq!(o.stdout, "virtio-rng: not found\n", "{o}");
}

fn sector(path: &str, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, n * 512)
        .unwrap();
    b
}

#[test]
fn virtio_blk_reads_writes_flushes_and_reports_its_serial() {
    for accel in common::probe_backends("virtio_blk_reads_writes_flushes_and_reports_its_serial") {
        virtio_blk_reads_writes_flushes_and_reports_its_serial_on(accel);
    }
}

fn virtio_blk_reads_writes_flushes_and_reports_its_serial_on(accel: &str) {
    let dir = TempDir::new("virtioblk");
    let img = disk(&dir, "a.img", 1 << 20);
    let o = run_probe(
        accel,
        &dir,
        &Probe::VirtioBlk,
        &["--disk", &format!("path={},serial=vireo-disk-0", opt(&img))],
    );
    assert_eq!(o.code(), Some(0), "{o}");
    let want = "virtio-blk: found at 00:01.0\n\
                virtio-blk: features-ok status=0b\n\
                virtio-blk: driver-ok status=0f vector=0001\n\
                virtio-blk: get-id irq=1 timeout=0 used=1 len=21 status=00 serial=vireo-disk-0\n\
                virtio-blk: read irq=2 timeout=0 used=2 len=513 status=00 \
                data=000102030405060708090a0b0c0d0e0f\n\
                virtio-blk: write irq=3 timeout=0 used=3 len=1 status=00\n\
                virtio-blk: flush irq=4 timeout=0 used=4 len=1 status=00\n";
    assert_eq!(o.stdout, want, "{o}");
    assert_eq!(sector(&img, 1), BLK_PROBE_PATTERN.repeat(32));
}

#[test]
fn a_read_only_disk_refuses_the_guests_write() {
    for accel in common::probe_backends("a_read_only_disk_refuses_the_guests_write") {
        a_read_only_disk_refuses_the_guests_write_on(accel);
    }
}

fn a_read_only_disk_refuses_the_guests_write_on(accel: &str) {
    let dir = TempDir::new("virtioblk-ro");
    let img = disk(&dir, "ro.img", 1 << 20);
    let o = run_probe(
        accel,
        &dir,
        &Probe::VirtioBlk,
        &["--disk", &format!("path={},readonly=on", opt(&img))],
    );
    assert_eq!(o.code(), Some(0), "{o}");
    // VIRTIO_BLK_S_IOERR (1) for the write (virtio 1.2 §5.2.6.2); reads and flushes work.
    assert!(
        o.stdout
            .contains("virtio-blk: write irq=3 timeout=0 used=3 len=1 status=01\n"),
        "{o}"
    );
    assert!(
        o.stdout.contains("data=000102030405060708090a0b0c0d0e0f"),
        "{o}"
    );
    assert!(
        o.stdout
            .contains("flush irq=4 timeout=0 used=4 len=1 status=00"),
        "{o}"
    );
    assert_eq!(sector(&img, 1), vec![0u8; 512]);
}

#[test]
fn a_disk_in_use_elsewhere_is_refused_before_boot() {
    for accel in common::probe_backends("a_disk_in_use_elsewhere_is_refused_before_boot") {
        a_disk_in_use_elsewhere_is_refused_before_boot_on(accel);
    }
}

fn a_disk_in_use_elsewhere_is_refused_before_boot_on(accel: &str) {
    let dir = TempDir::new("disk-lock");
    let img = disk(&dir, "locked.img", 1 << 20);
    // Another process holding the image read-write (as a running vireo does).
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    holder.try_lock().unwrap();
    let kernel = dir.path().join("probe.elf");
    std::fs::write(&kernel, build(&Probe::Hello)).unwrap();
    for spec in [opt(&img), format!("path={},readonly=on", opt(&img))] {
        let mut cmd = vireo();
        cmd.arg("run")
            .arg("--kernel")
            .arg(&kernel)
            .args(["--accel", accel, "--disk", &spec]);
        let o = run(cmd, TIMEOUT, None);
        assert_eq!(o.code(), Some(1), "{o}");
        assert!(o.stderr.contains("in use by another process"), "{o}");
        assert!(o.stderr.contains("locked.img"), "{o}");
        assert!(o.stdout.is_empty(), "{o}");
    }
    drop(holder);
    assert!(Path::new(&img).exists());
}

#[test]
fn bad_disk_options_are_explained() {
    for accel in common::probe_backends("bad_disk_options_are_explained") {
        bad_disk_options_are_explained_on(accel);
    }
}

fn bad_disk_options_are_explained_on(accel: &str) {
    let dir = TempDir::new("disk-opts");
    let kernel = dir.path().join("probe.elf");
    std::fs::write(&kernel, build(&Probe::Hello)).unwrap();
    for (spec, says) in [
        ("path=/nonexistent/x.img", "/nonexistent/x.img"),
        ("path=/tmp/x,cache=none", "unknown option"),
        ("path=/tmp/x,readonly=perhaps", "readonly=on"),
        ("readonly=on", "path=FILE"),
    ] {
        let mut cmd = vireo();
        cmd.arg("run")
            .arg("--kernel")
            .arg(&kernel)
            .args(["--accel", accel, "--disk", spec]);
        let o = run(cmd, TIMEOUT, None);
        assert_ne!(o.code(), Some(0), "{spec}: {o}");
        assert!(o.stderr.contains(says), "{spec}: {o}");
    }
}
