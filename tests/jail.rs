//! `vireo run --jail`: the VMM in a jail behaves as unjailed (probe guests, console,
//! reboot/poweroff, signals) while it runs confined: own namespaces, a root with only what
//! the VM needs, an unprivileged uid, no capabilities, per-thread seccomp filters, cgroup
//! limits; and nothing is left when it ends, also when killed. Needs root and KVM.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{run, vireo, Outcome, TempDir};
use vireo_guests::probe::{build, Probe};

const TIMEOUT: Duration = Duration::from_secs(60);

fn skip(test: &str) -> bool {
    common::skip_unless_root(test) || common::skip_without_kvm(test)
}

fn probe_file(dir: &TempDir, probe: &Probe) -> PathBuf {
    let path = dir.path().join("probe.elf");
    std::fs::write(&path, build(probe)).unwrap();
    path
}

fn run_probe(probe: &Probe, jail: bool, extra: &[&str]) -> Outcome {
    let dir = TempDir::new("jail-probe");
    let path = probe_file(&dir, probe);
    let mut cmd = vireo();
    cmd.arg("run");
    if jail {
        cmd.arg("--jail");
    }
    cmd.arg("--kernel")
        .arg(&path)
        .args(["--accel", "kvm"])
        .args(extra);
    let o = run(cmd, TIMEOUT, None);
    o.assert_clean();
    o
}

/// Kills a background vireo on drop and lets a later vireo sweep what it left.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = vireo().args(["container", "list"]).output();
    }
}

/// Reads `out` into `seen` until `done(seen)`; end of file first fails the test, naming
/// `what`.
fn read_until(out: &mut impl Read, seen: &mut String, what: &str, done: impl Fn(&str) -> bool) {
    let mut buf = [0u8; 4096];
    while !done(seen) {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "{what}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// `vireo restore [--jail] --snapshot SNAP --api-socket SOCKET` of a counter probe: waits for
/// `lines` counter lines and returns the VM with the first count it printed.
fn restore_counting(
    snap: &Path,
    socket: &Path,
    jail: bool,
    lines: usize,
    what: &str,
) -> (Background, u32) {
    let mut cmd = vireo();
    cmd.arg("restore");
    if jail {
        cmd.arg("--jail");
    }
    cmd.arg("--snapshot")
        .arg(snap)
        .arg("--api-socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut vm = Background(cmd.spawn().unwrap());
    let mut out = vm.0.stdout.take().unwrap();
    let mut after = String::new();
    read_until(&mut out, &mut after, &format!("{what} jail={jail}"), |o| {
        o.lines().filter(|l| l.starts_with("count ")).count() >= lines
    });
    let first = after
        .lines()
        .find_map(|l| l.strip_prefix("count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    (vm, first)
}

/// A jailed VMM running a guest that loops forever after printing `S`; returns once the
/// guest runs.
fn start_looping(dir: &TempDir, extra: &[&str]) -> Background {
    let path = probe_file(
        dir,
        &Probe::PioLoop {
            n: u32::MAX,
            port: 0x510,
        },
    );
    let mut cmd = vireo();
    cmd.args(["run", "--jail", "--accel", "kvm", "--kernel"])
        .arg(&path)
        .args(extra)
        // A pipe that stays open keeps the console thread reading.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Background(cmd.spawn().unwrap());
    let mut first = [0u8; 1];
    child
        .0
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"S");
    child
}

/// The jailed VMM: the child of the outer vireo.
fn inner_pid(outer: u32) -> i32 {
    let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
    let pids: Vec<i32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "outer vireo has children {pids:?}");
    pids[0]
}

fn status_field(path: &Path, key: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {}", path.display()))
        .trim()
        .to_string()
}

fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn jail_cgroups(outer: u32) -> Vec<PathBuf> {
    let name = format!("vm-{outer}");
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("vireo").join(&name))
        .filter(|d| d.exists())
        .collect()
}

#[test]
fn probe_guests_behave_the_same_jailed() {
    let test = "probe_guests_behave_the_same_jailed";
    if skip(test) {
        return;
    }
    let cases: Vec<(Probe, Vec<&str>)> = vec![
        (Probe::Hello, vec![]),
        (Probe::PowerOff, vec![]),
        (Probe::UnknownIo, vec![]),
        (Probe::AcpiReset, vec!["--no-reboot"]),
        (Probe::I8042Reset, vec!["--no-reboot"]),
        (Probe::UserMode { n: 10_000 }, vec![]),
        (Probe::Smp, vec!["--cpus", "2"]),
    ];
    for (probe, extra) in cases {
        let plain = run_probe(&probe, false, &extra);
        let jailed = run_probe(&probe, true, &extra);
        assert_eq!(plain.code(), Some(0), "{probe:?} unjailed: {plain}");
        assert_eq!(jailed.code(), Some(0), "{probe:?} jailed: {jailed}");
        if probe == Probe::Smp {
            // vCPUs report in any order.
            let mut a: Vec<&str> = plain.stdout.lines().collect();
            let mut b: Vec<&str> = jailed.stdout.lines().collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "{probe:?}");
        } else {
            assert_eq!(plain.stdout, jailed.stdout, "{probe:?}");
        }
        assert!(!jailed.stderr.contains("seccomp"), "{jailed}");
    }
}

#[test]
fn a_jailed_guest_reset_restarts_the_vm() {
    let test = "a_jailed_guest_reset_restarts_the_vm";
    if skip(test) {
        return;
    }
    let dir = TempDir::new("jail-reboot");
    let path = probe_file(&dir, &Probe::I8042Reset);
    let mut cmd = vireo();
    cmd.args(["run", "--jail", "--accel", "kvm", "--kernel"])
        .arg(&path);
    let o = run(
        cmd,
        TIMEOUT,
        Some("i8042-reset\ni8042-reset\ni8042-reset\n"),
    );
    assert!(!o.timed_out, "{o}");
    assert!(!o.stderr.contains("seccomp"), "{o}");
}

#[test]
fn signals_reach_the_jailed_vmm() {
    let test = "signals_reach_the_jailed_vmm";
    if skip(test) {
        return;
    }
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let dir = TempDir::new("jail-signal");
        let mut vm = start_looping(&dir, &[]);
        let outer = vm.0.id();
        let inner = inner_pid(outer);
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(outer as i32, sig) }, 0);
        let status = vm.0.wait().unwrap();
        assert_eq!(status.code(), Some(code), "signal {sig}");
        assert!(gone(inner));
        assert!(jail_cgroups(outer).is_empty(), "cgroups left");
    }
}

#[test]
fn the_jailed_vmm_is_confined() {
    let test = "the_jailed_vmm_is_confined";
    if skip(test) {
        return;
    }
    let dir = TempDir::new("jail-confined");
    let vm = start_looping(
        &dir,
        &[
            "--cpus",
            "2",
            "--uid",
            "4242",
            "--gid",
            "4343",
            "--cgroup",
            "mem=512M,pids=32,cpu=1.5",
        ],
    );
    let outer = vm.0.id();
    let inner = inner_pid(outer);
    let status = PathBuf::from(format!("/proc/{inner}/status"));
    assert_eq!(status_field(&status, "Uid"), "4242\t4242\t4242\t4242");
    assert_eq!(status_field(&status, "Gid"), "4343\t4343\t4343\t4343");
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    assert_eq!(status_field(&status, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(&status, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "Seccomp"), "2");
    // Per thread: the jail's filter, plus the main thread's, plus the thread's own. A thread
    // installs its own filter first thing, but may not have run yet: wait for every vCPU.
    let read_filters = || {
        let mut filters = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{inner}/task"))
            .unwrap()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let n: u32 = status_field(&t.path().join("status"), "Seccomp_filters")
                .parse()
                .unwrap_or(0);
            filters.push((comm.trim().to_string(), n));
        }
        filters.sort();
        filters
    };
    let mut filters = read_filters();
    wait_until("both vCPU threads filtered", || {
        filters = read_filters();
        filters
            .iter()
            .filter(|(c, n)| c.starts_with("vcpu") && *n == 3)
            .count()
            == 2
    });
    let count = |name: &str| filters.iter().find(|(c, _)| c == name).map(|(_, n)| *n);
    assert_eq!(count("vireo"), Some(2), "main: jail + vmm; {filters:?}");
    assert_eq!(
        count("vcpu0"),
        Some(3),
        "vcpu: jail + vmm + vcpu; {filters:?}"
    );
    assert_eq!(count("vcpu1"), Some(3), "{filters:?}");
    assert_eq!(
        count("console"),
        Some(2),
        "console: jail + device; {filters:?}"
    );
    assert_eq!(count("signals"), Some(2), "{filters:?}");
    // Namespaces: all new but the user namespace.
    for ns in ["mnt", "pid", "ipc", "uts", "net", "cgroup"] {
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let jailed = std::fs::read_link(format!("/proc/{inner}/ns/{ns}")).unwrap();
        assert_ne!(host, jailed, "{ns}");
    }
    // Its root holds the kernel, /dev (with kvm) and /proc: nothing else.
    let root = PathBuf::from(format!("/proc/{inner}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["dev", "proc", "vm"]);
    let vm_files: Vec<String> = std::fs::read_dir(root.join("vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(vm_files, ["kernel"]);
    use std::os::unix::fs::MetadataExt;
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
        (4242, 4343, 0o600)
    );
    // The cgroup limits are in force.
    let cgroups = jail_cgroups(outer);
    assert!(!cgroups.is_empty());
    let mut seen = 0;
    for d in &cgroups {
        for (file, want) in [
            ("pids.max", "32"),
            ("memory.limit_in_bytes", "536870912"),
            ("memory.max", "536870912"),
            ("cpu.cfs_quota_us", "150000"),
            ("cpu.max", "150000 100000"),
        ] {
            if let Ok(v) = std::fs::read_to_string(d.join(file)) {
                assert_eq!(v.trim(), want, "{}", d.join(file).display());
                seen += 1;
            }
        }
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            assert!(
                procs.lines().any(|p| p == inner.to_string()),
                "{}",
                d.display()
            );
        }
    }
    assert!(seen >= 3, "limits found in {cgroups:?}");
    // Killing the outer vireo ends the jailed VMM through its parent-death signal, which
    // the kernel delivers after the outer one is reaped: wait for it.
    drop(vm);
    wait_until("the jailed VMM to die with its parent", || gone(inner));
}

#[test]
fn killing_vireo_kills_the_jailed_vmm() {
    let test = "killing_vireo_kills_the_jailed_vmm";
    if skip(test) {
        return;
    }
    let dir = TempDir::new("jail-kill");
    let mut vm = start_looping(&dir, &["--cgroup", "pids=16"]);
    let outer = vm.0.id();
    let inner = inner_pid(outer);
    vm.0.kill().unwrap();
    vm.0.wait().unwrap();
    wait_until("the jailed VMM to die with its parent", || gone(inner));
    // The next vireo removes the cgroups the killed one left.
    let o = run(
        {
            let mut c = vireo();
            c.args(["container", "list"]);
            c
        },
        TIMEOUT,
        None,
    );
    assert_eq!(o.code(), Some(0), "{o}");
    assert!(jail_cgroups(outer).is_empty(), "{:?}", jail_cgroups(outer));
    assert!(!Path::new(vireo_jail::record::RECORD_DIR)
        .join(format!("vm-{outer}.json"))
        .exists());
}

#[test]
fn jail_options_are_checked() {
    let test = "jail_options_are_checked";
    if skip(test) {
        return;
    }
    let dir = TempDir::new("jail-bad");
    let path = probe_file(&dir, &Probe::Hello);
    let expect = |args: &[&str], needle: &str, code: i32| {
        let mut cmd = vireo();
        cmd.args(["run", "--accel", "kvm", "--kernel"])
            .arg(&path)
            .args(args);
        let o = run(cmd, TIMEOUT, None);
        o.assert_clean();
        assert_eq!(o.code(), Some(code), "{args:?}: {o}");
        assert!(
            o.stderr.contains(needle),
            "{args:?}: expected {needle:?}\n{o}"
        );
    };
    expect(
        &["--jail", "--cgroup", "cpuset=0-4095"],
        "is not available here",
        1,
    );
    expect(
        &["--jail", "--cgroup", "pids=3", "--cpus", "2"],
        "too low for 2 vCPUs",
        1,
    );
    expect(&["--jail", "--cgroup", "mem=1M"], "minimum", 1);
    expect(
        &["--jail", "--cgroup", "disk=1G"],
        "unknown limit 'disk'",
        2,
    );
    expect(&["--uid", "1000"], "--jail", 2);
    // The vsock socket is bound outside the jail, its directory bound in: errors come from
    // out here.
    expect(
        &[
            "--jail",
            "--vsock",
            "cid=3,socket=/nonexistent-vireo-dir/v.sock",
        ],
        "the directory of the vsock socket",
        1,
    );
    let locked = TempDir::new("jail-vsock-dir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(locked.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let vsock = format!("cid=3,socket={}/v.sock", locked.path().display());
    expect(
        &["--jail", "--vsock", &vsock],
        "is not searchable by uid 65534",
        1,
    );
    assert!(
        !locked.path().join("v.sock").exists(),
        "the socket is removed when the jail is refused"
    );
    expect(&["--snapshot-dir", "/tmp"], "--jail", 2);
    expect(
        &["--jail", "--snapshot-dir", "/nonexistent-vireo-dir"],
        "--snapshot-dir",
        1,
    );
}

/// The serial console on a terminal works from inside the jail: raw mode, Ctrl-A x, and
/// the terminal restored afterwards.
#[test]
fn jailed_console_on_a_terminal() {
    let test = "jailed_console_on_a_terminal";
    if skip(test) {
        return;
    }
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two new descriptors; null name/termios/winsize.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    let lflag = |fd: &OwnedFd| {
        // SAFETY: termios is plain data filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer.
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t.c_lflag
    };
    let dir = TempDir::new("jail-console");
    let kernel = probe_file(
        &dir,
        &Probe::PioLoop {
            n: u32::MAX,
            port: 0x510,
        },
    );
    let mut cmd = vireo();
    cmd.args(["run", "--jail", "--accel", "kvm", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::null());
    let child = Background(cmd.spawn().unwrap());
    let mut m = std::fs::File::from(master);
    let mut buf = [0u8; 64];
    let n = m.read(&mut buf).unwrap();
    assert!(n > 0 && buf[0] == b'S', "{:?}", &buf[..n]);
    assert_eq!(
        lflag(&slave) & (libc::ICANON | libc::ECHO),
        0,
        "not in raw mode"
    );
    m.write_all(&[0x01, b'x']).unwrap();
    let mut child = child;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Ctrl-A x did not quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let after = lflag(&slave);
    assert_ne!(after & libc::ICANON, 0, "terminal left in raw mode");
}

/// A disk image of 1 MiB whose sector 0 starts with bytes 0..16, owned by the jailed VMM's
/// default uid/gid (it has no capability to override file modes).
fn jail_disk(dir: &TempDir, name: &str) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.path().join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&(0..16u8).collect::<Vec<_>>(), 0).unwrap();
    std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    path
}

fn sector(path: &Path, n: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; 512];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, n * 512)
        .unwrap();
    b
}

/// A jailed VMM's disk works on both backends: the virtio-blk probe reads sector 0, writes
/// sector 1 and flushes, through the device worker thread (started from the vCPU thread at
/// DRIVER_OK, under the vCPU and device filters).
#[test]
fn jailed_virtio_blk_probe_on_both_backends() {
    let test = "jailed_virtio_blk_probe_on_both_backends";
    if common::skip_unless_root(test) {
        return;
    }
    for accel in common::probe_backends(test) {
        for direct in [false, true] {
            let dir = TempDir::new("jail-blk");
            let img = jail_disk(&dir, "a.img");
            let kernel = probe_file(&dir, &Probe::VirtioBlk);
            let mut cmd = vireo();
            cmd.args(["run", "--jail", "--accel", accel, "--kernel"])
                .arg(&kernel)
                .arg("--disk")
                .arg(format!(
                    "path={},serial=jailed{}",
                    img.display(),
                    if direct { ",direct=on" } else { "" }
                ));
            let o = run(cmd, TIMEOUT, None);
            o.assert_clean();
            assert_eq!(o.code(), Some(0), "{accel} direct={direct}: {o}");
            for want in [
                "virtio-blk: driver-ok status=0f",
                "status=00 serial=jailed",
                "status=00 data=000102030405060708090a0b0c0d0e0f",
                "virtio-blk: write irq=3 timeout=0 used=3 len=1 status=00",
                "virtio-blk: flush irq=4 timeout=0 used=4 len=1 status=00",
            ] {
                assert!(
                    o.stdout.contains(want),
                    "{accel} direct={direct}: {want}\n{o}"
                );
            }
            assert_eq!(
                sector(&img, 1),
                vireo_guests::probe::BLK_PROBE_PATTERN.repeat(32),
                "{accel} direct={direct}"
            );
        }
    }
}

/// The default Linux guest on the emulator, jailed, writes its disk; the host reads the data.
#[test]
fn jailed_linux_guest_on_the_emulator_writes_its_disk() {
    let test = "jailed_linux_guest_on_the_emulator_writes_its_disk";
    if common::skip_unless_root(test) || common::default_guest(test).is_none() {
        return;
    }
    let dir = TempDir::new("jail-linux-disk");
    let img = jail_disk(&dir, "d.img");
    let mut cmd = vireo();
    cmd.args(["run", "--jail", "--accel", "emu", "--disk"])
        .arg(format!("path={}", img.display()))
        .args([
            "--",
            "sh",
            "-c",
            "echo written-by-a-jailed-guest | dd of=/dev/vda bs=512 seek=2 conv=sync \
             oflag=direct 2>/dev/null; echo id: $(id -u) host: $(hostname)",
        ]);
    let o = run(cmd, Duration::from_secs(300), None);
    o.assert_clean();
    assert_eq!(o.code(), Some(0), "{o}");
    assert!(o.stdout.contains("vireo-guest: exit status 0"), "{o}");
    assert!(
        sector(&img, 2).starts_with(b"written-by-a-jailed-guest\n"),
        "{o}"
    ); // A root disk vireo creates for a jailed run belongs to the jail's ids: the guest boots
       // from it and writes to it.
    let root = dir.path().join("root.img");
    let mut cmd = vireo();
    cmd.args(["run", "--jail", "--accel", "emu", "--root-disk"])
        .arg(&root)
        .args([
            "--",
            "sh",
            "-c",
            "grep ' / ' /proc/mounts; echo kept > /jailed; sync",
        ]);
    let o = run(cmd, Duration::from_secs(300), None);
    o.assert_clean();
    assert_eq!(o.code(), Some(0), "{o}");
    assert!(o.stdout.contains("/dev/vda / ext4 rw"), "{o}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /jailed"])
        .arg(&root)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
}

/// Files the jailed VMM's uid cannot open are refused before anything starts, with a message
/// that says what to do.
#[test]
fn a_disk_the_jail_uid_cannot_write_is_refused() {
    let test = "a_disk_the_jail_uid_cannot_write_is_refused";
    if common::skip_unless_root(test) {
        return;
    }
    let dir = TempDir::new("jail-disk-perm");
    let img = jail_disk(&dir, "a.img");
    std::os::unix::fs::chown(&img, Some(0), Some(0)).unwrap();
    let kernel = probe_file(&dir, &Probe::VirtioBlk);
    let mut cmd = vireo();
    cmd.args(["run", "--jail", "--accel", "emu", "--kernel"])
        .arg(&kernel)
        .arg("--disk")
        .arg(format!("path={}", img.display()));
    let o = run(cmd, TIMEOUT, None);
    o.assert_clean();
    assert_eq!(o.code(), Some(1), "{o}");
    assert!(
        o.stderr
            .contains("is not readable and writable by uid 65534 / gid 65534"),
        "{o}"
    );
    // Read-only is enough for a read-only disk (the file is world-readable).
    let mut cmd = vireo();
    cmd.args(["run", "--jail", "--accel", "emu", "--kernel"])
        .arg(&kernel)
        .arg("--disk")
        .arg(format!("path={},readonly=on", img.display()));
    let o = run(cmd, TIMEOUT, None);
    o.assert_clean();
    assert_eq!(o.code(), Some(0), "{o}");
    assert!(
        o.stdout
            .contains("write irq=3 timeout=0 used=3 len=1 status=01"),
        "{o}"
    );
}

fn ctl(socket: &Path, args: &[&str]) -> Outcome {
    let mut cmd = vireo();
    cmd.arg("ctl").arg("--api-socket").arg(socket).args(args);
    let o = run(cmd, TIMEOUT, None);
    o.assert_clean();
    o
}

/// A jailed VMM serves the API on a socket bound outside the jail: queries, pause/resume, a
/// snapshot refused with an error (the jail holds no writable directory) rather than a
/// seccomp kill, power-off; the socket is removed afterwards. The API thread runs under its
/// own filter.
#[test]
fn jailed_vmm_serves_the_api() {
    let test = "jailed_vmm_serves_the_api";
    if common::skip_unless_root(test) {
        return;
    }
    for accel in common::probe_backends(test) {
        let dir = TempDir::new("jail-api");
        let kernel = probe_file(&dir, &Probe::Counter);
        let socket = dir.path().join("api.sock");
        let mut cmd = vireo();
        cmd.args(["run", "--jail", "--accel", accel, "--kernel"])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut vm = Background(cmd.spawn().unwrap());
        let mut first = [0u8; 7];
        vm.0.stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        assert_eq!(&first, b"count 0");
        let o = ctl(&socket, &["info"]);
        assert!(o.stdout.contains("state: running"), "{accel}: {o}");
        assert!(
            o.stdout.contains(&format!("backend: {accel}")),
            "{accel}: {o}"
        );
        assert!(ctl(&socket, &["pause"]).stdout.contains("state: paused"));
        let snap = dir.path().join("snap");
        let o = ctl(&socket, &["snapshot", snap.to_str().unwrap()]);
        assert_ne!(o.code(), Some(0), "{accel}: {o}");
        assert!(o.stderr.contains("Permission denied"), "{accel}: {o}");
        assert!(ctl(&socket, &["resume"]).stdout.contains("state: running"));
        // The API thread starts before the main thread's filter: it has the jail's and its
        // own.
        let inner = inner_pid(vm.0.id());
        let api_filters = std::fs::read_dir(format!("/proc/{inner}/task"))
            .unwrap()
            .flatten()
            .find(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default() == "api\n")
            .map(|t| status_field(&t.path().join("status"), "Seccomp_filters"));
        assert_eq!(api_filters.as_deref(), Some("2"), "{accel}");
        let o = ctl(&socket, &["power-off"]);
        assert_eq!(o.code(), Some(0), "{accel}: {o}");
        let status = vm.0.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{accel}");
        assert!(!socket.exists(), "{accel}: socket left behind");
    }
}

/// `vireo restore --jail`: a snapshot taken by an unjailed vireo resumes in a jail (the
/// snapshot, kernel and disks appear at their host paths) and keeps counting where it
/// stopped; its API works and powers it off.
#[test]
fn jailed_restore_continues_a_snapshot() {
    let test = "jailed_restore_continues_a_snapshot";
    if common::skip_unless_root(test) {
        return;
    }
    for accel in common::probe_backends(test) {
        let dir = TempDir::new("jail-restore");
        let kernel = probe_file(&dir, &Probe::Counter);
        let socket = dir.path().join("api.sock");
        let snap = dir.path().join("snap");
        let mut cmd = vireo();
        cmd.args(["run", "--accel", accel, "--kernel"])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut vm = Background(cmd.spawn().unwrap());
        let mut out = vm.0.stdout.take().unwrap();
        let mut seen = String::new();
        read_until(&mut out, &mut seen, accel, |o| o.contains("count 2\n"));
        assert_eq!(ctl(&socket, &["pause"]).code(), Some(0));
        let o = ctl(&socket, &["snapshot", snap.to_str().unwrap()]);
        assert_eq!(o.code(), Some(0), "{accel}: {o}");
        assert_eq!(ctl(&socket, &["power-off"]).code(), Some(0));
        assert!(vm.0.wait().unwrap().success());
        std::io::Read::read_to_string(&mut out, &mut seen).unwrap();
        let last: u32 = seen
            .lines()
            .filter_map(|l| l.strip_prefix("count "))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap();

        let (mut vm, first) = restore_counting(&snap, &socket, true, 3, accel);
        assert_eq!(
            first,
            last + 1,
            "{accel}: counting resumes where it stopped"
        );
        // It runs in the jail: the VMM is the outer vireo's only child, in its own PID
        // namespace, as uid 65534.
        let inner = inner_pid(vm.0.id());
        let status = PathBuf::from(format!("/proc/{inner}/status"));
        assert_eq!(status_field(&status, "Uid"), "65534\t65534\t65534\t65534");
        assert_eq!(status_field(&status, "NSpid").split('\t').nth(1), Some("1"));
        assert!(ctl(&socket, &["info"]).stdout.contains("state: running"));
        assert_eq!(ctl(&socket, &["power-off"]).code(), Some(0));
        let status = vm.0.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{accel}");
    }
}

/// `vireo run --jail --snapshot-dir DIR`: the jailed VMM writes a snapshot under DIR (bound
/// writable at its host path, owned by the jail's uid); a snapshot outside DIR is still
/// refused. The snapshot names the kernel by its host path, not the jail's `/vm/kernel`, so an
/// unjailed `vireo restore` continues the VM (and so does a jailed one).
#[test]
fn jailed_vmm_snapshots_into_its_snapshot_dir() {
    let test = "jailed_vmm_snapshots_into_its_snapshot_dir";
    if common::skip_unless_root(test) {
        return;
    }
    for accel in common::probe_backends(test) {
        let dir = TempDir::new("jail-snapdir");
        let kernel = probe_file(&dir, &Probe::Counter);
        let socket = dir.path().join("api.sock");
        let snaps = dir.path().join("snaps");
        std::fs::create_dir(&snaps).unwrap();
        std::os::unix::fs::chown(&snaps, Some(65534), Some(65534)).unwrap();
        // A vsock device too (idle: the probe has no driver), whose socket the outer vireo
        // binds, in every run below.
        let vsock = dir.path().join("v.sock");
        let mut cmd = vireo();
        cmd.args(["run", "--jail", "--accel", accel, "--kernel"])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--vsock")
            .arg(format!("cid=3,socket={}", vsock.display()))
            .arg("--snapshot-dir")
            .arg(&snaps)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut vm = Background(cmd.spawn().unwrap());
        let mut out = vm.0.stdout.take().unwrap();
        let mut seen = String::new();
        read_until(&mut out, &mut seen, accel, |o| o.contains("count 1\n"));
        assert_eq!(ctl(&socket, &["pause"]).code(), Some(0));
        let outside = dir.path().join("outside");
        let o = ctl(&socket, &["snapshot", outside.to_str().unwrap()]);
        assert_ne!(o.code(), Some(0), "{accel}: {o}");
        let snap = snaps.join("s1");
        let o = ctl(&socket, &["snapshot", snap.to_str().unwrap()]);
        assert_eq!(o.code(), Some(0), "{accel}: {o}");
        assert!(
            snap.join("state").is_file() && snap.join("memory").is_file(),
            "{accel}"
        );
        assert!(!outside.exists(), "{accel}");
        assert_eq!(ctl(&socket, &["power-off"]).code(), Some(0));
        assert!(vm.0.wait().unwrap().success(), "{accel}");
        std::io::Read::read_to_string(&mut out, &mut seen).unwrap();
        let last: u32 = seen
            .lines()
            .filter_map(|l| l.strip_prefix("count "))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap();
        let state = vireo_vmm::snapshot::read_state(&snap).unwrap();
        assert_eq!(state.config.kernel, kernel, "{accel}: the host's path");
        assert_eq!(
            state.config.vsock.as_ref().unwrap().socket,
            vsock,
            "{accel}"
        );
        assert!(!vsock.exists(), "{accel}: the socket is removed");

        // Restored outside the jail, then in one: it counts on from where it stopped.
        for jail in [false, true] {
            let (mut vm, first) = restore_counting(&snap, &socket, jail, 2, accel);
            assert_eq!(first, last + 1, "{accel} jail={jail}: counting resumes");
            // The vsock socket listens (bound outside the jail for the jailed restore).
            assert!(
                std::os::unix::net::UnixStream::connect(&vsock).is_ok(),
                "{accel} jail={jail}"
            );
            assert_eq!(ctl(&socket, &["power-off"]).code(), Some(0));
            assert!(vm.0.wait().unwrap().success(), "{accel} jail={jail}");
            assert!(
                !vsock.exists(),
                "{accel} jail={jail}: the socket is removed"
            );
        }
    }
}
