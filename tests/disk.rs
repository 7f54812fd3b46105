//! virtio-blk and virtio-rng seen from a Linux guest (the default guest, on every backend that
//! boots Linux here): data written in the guest reaches the image file, survives a reboot,
//! read-only disks refuse writes, disks keep their order and serials, the RNG gives bytes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{default_guest, field, full_backends, run, vireo, Outcome, TempDir};

const TIMEOUT: Duration = Duration::from_secs(600);

fn guest(accel: &str, extra: &[String], command: &str) -> Outcome {
    let mut cmd = vireo();
    cmd.args(["run", "--accel", accel, "--memory", "256M"])
        .args(extra)
        .args(["--", "sh", "-c", command]);
    let o = run(cmd, TIMEOUT, None);
    o.assert_clean();
    assert_eq!(o.code(), Some(0), "{o}");
    o
}

fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A file of `len` pseudo-random bytes (seeded: reproducible), and its content.
fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// The value printed after `key` as a word (a hex digest).
fn word<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.split_once(key).map(|(_, rest)| rest))
        .and_then(|r| r.split_whitespace().next())
}

#[test]
fn data_written_in_the_guest_is_durable_and_survives_a_reboot() {
    let test = "data_written_in_the_guest_is_durable_and_survives_a_reboot";
    if default_guest(test).is_none() {
        return;
    }
    for accel in full_backends(test) {
        let dir = TempDir::new("disk-durable");
        let root = dir.path().join("root.img");
        let src = dir.path().join("source.img");
        let data = random_file(&src, 1 << 20, 0x5eed);
        let want = sha256_hex(&data);
        let args = vec![
            "--root-disk".to_string(),
            root.display().to_string(),
            "--disk".to_string(),
            format!("path={},readonly=on", src.display()),
        ];
        // One vireo run, two boots: the first copies 1 MiB from the raw disk into a file on
        // the ext4 root, syncs and reboots the guest (the VM restarts in the same process,
        // same disks); the second finds the file, prints its checksum and powers off.
        let o = guest(
            accel,
            &args,
            "grep ' / ' /proc/mounts; \
             if [ -f /data.bin ]; then echo after-reboot: $(sha256sum /data.bin); \
             else dd if=/dev/vdb of=/data.bin bs=64k count=16 2>/dev/null; sync; \
             echo before-reboot: $(sha256sum /data.bin); reboot -f; fi",
        );
        assert!(
            o.stdout.contains("/dev/vda / ext4"),
            "root is not the disk\n{o}"
        );
        assert_eq!(
            word(&o.stdout, "before-reboot:"),
            Some(want.as_str()),
            "{o}"
        );
        assert_eq!(word(&o.stdout, "after-reboot:"), Some(want.as_str()), "{o}");
        assert_eq!(
            o.stdout.matches("vireo-guest: init ready").count(),
            2,
            "{o}"
        );
        // The host reads the file straight out of the image.
        let out = Command::new("debugfs")
            .args(["-R", "cat /data.bin"])
            .arg(&root)
            .output()
            .expect("debugfs (e2fsprogs)");
        assert_eq!(sha256_hex(&out.stdout), want, "host sees other data");
        // A new vireo process with the same disk: the file is still there.
        let o = guest(accel, &args, "echo guest-sha: $(sha256sum /data.bin)");
        assert_eq!(word(&o.stdout, "guest-sha:"), Some(want.as_str()), "{o}");
    }
}

#[test]
fn read_only_disk_refuses_writes_in_the_guest() {
    let test = "read_only_disk_refuses_writes_in_the_guest";
    if default_guest(test).is_none() {
        return;
    }
    for accel in full_backends(test) {
        let dir = TempDir::new("disk-ro");
        let img = dir.path().join("ro.img");
        let data = random_file(&img, 1 << 20, 7);
        let o = guest(
            accel,
            &[
                "--disk".into(),
                format!("path={},readonly=on", img.display()),
            ],
            "echo ro: $(cat /sys/block/vda/ro); \
             if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null; \
             then echo write: ok; else echo write: refused; fi",
        );
        assert_eq!(field(&o.stdout, "ro:"), Some("1"), "{o}");
        assert!(o.stdout.contains("write: refused"), "{o}");
        assert_eq!(std::fs::read(&img).unwrap(), data, "the image changed");
    }
}

#[test]
fn two_disks_in_order_with_serials_and_the_rng_gives_bytes() {
    let test = "two_disks_in_order_with_serials_and_the_rng_gives_bytes";
    if default_guest(test).is_none() {
        return;
    }
    for accel in full_backends(test) {
        let dir = TempDir::new("disk-two");
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        std::fs::write(&a, vec![0u8; 4 << 20]).unwrap();
        std::fs::write(&b, vec![0u8; 8 << 20]).unwrap();
        let o = guest(
            accel,
            &[
                "--disk".into(),
                format!("path={},serial=first-disk", a.display()),
                "--disk".into(),
                format!("path={},serial=second-disk", b.display()),
            ],
            "echo vda: $(cat /sys/block/vda/serial) $(cat /sys/block/vda/size); \
             echo vdb: $(cat /sys/block/vdb/serial) $(cat /sys/block/vdb/size); \
             echo rng: $(cat /sys/class/misc/hw_random/rng_current); \
             echo rngbytes: $(head -c 64 /dev/hwrng | wc -c)",
        );
        assert!(o.stdout.contains("vda: first-disk 8192"), "{o}");
        assert!(o.stdout.contains("vdb: second-disk 16384"), "{o}");
        assert!(o.stdout.contains("rng: virtio_rng"), "{o}");
        assert_eq!(field(&o.stdout, "rngbytes:"), Some("64"), "{o}");
    }
}
