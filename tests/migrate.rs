//! Live migration between vireo processes (`vireo ctl migrate` → `vireo migrate receive`),
//! checked by what the guest prints:
//!
//! - the counting probe goes back and forth ten times, on every backend that runs probes
//!   (KVM included: its in-kernel irqchip, timer and MSI plumbing are rebuilt at each
//!   destination); strangers, corrupted streams and other protocol versions are refused by a
//!   waiting destination, which keeps waiting;
//! - the default Linux guest, counting, dirtying memory, writing its disk and checking a
//!   checksum of a block of its memory, over loopback (where a destination killed in the
//!   middle of the copy leaves the guest running at the source) and between two network
//!   namespaces (root only).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{vireo, TempDir};
use vireo_guests::probe::{build, Probe};

/// A vireo process with its stdout and stderr collected as they come.
struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    socket: PathBuf,
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

impl Running {
    fn start(mut cmd: Command, socket: &Path) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vireo");
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        let r = Running {
            child,
            out,
            err,
            socket: socket.to_path_buf(),
        };
        r.wait_for("the API socket", Duration::from_secs(30), |_| {
            socket.exists()
        });
        r
    }

    fn out(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn err(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.out();
            if f(&out) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- stdout ---\n{out}\n--- stderr ---\n{}",
                self.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let o = vireo()
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("vireo ctl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctl(args);
        assert!(
            ok,
            "vireo ctl {args:?} failed: {out}\n--- stderr of the VM ---\n{}",
            self.err()
        );
        out
    }

    fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return (st.code(), self.out());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vireo did not exit\n{}", self.out());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Numbers after `key ` in `out`, in order.
fn numbers(out: &str, key: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            let rest = &l[l.find(key)? + key.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn last(out: &str, key: &str) -> Option<u64> {
    numbers(out, key).last().copied()
}

/// A TCP port free right now on `ip`.
fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `vireo migrate receive --listen ADDR --api-socket SOCK`, optionally inside a network
/// namespace; returns once the API socket exists (the port is bound before it).
fn receiver(listen: &str, sock: &Path, netns: Option<&str>) -> Running {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vireo")]);
            c.stdin(Stdio::null());
            c
        }
        None => vireo(),
    };
    cmd.env("VIREO_LOG", "info")
        .args(["migrate", "receive", "--listen", listen, "--api-socket"])
        .arg(sock);
    Running::start(cmd, sock)
}

/// Connections a destination must refuse without giving up its wait: a stranger, another
/// protocol version, a stream whose first frame is corrupted.
fn refused_connections(addr: &str, dest: &Running) {
    // Not vireo at all.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b);
    dest.wait_for("", Duration::from_secs(10), |_| {
        dest.err().contains("not a vireo migration source")
    });
    // Another version: refused in the handshake (answer byte 0).
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"VIREOMIG").unwrap();
    s.write_all(&999u32.to_le_bytes()).unwrap();
    let mut answer = [0u8; 13];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer[..8], b"VIREOMIG");
    assert_eq!(answer[12], 0, "version 999 accepted");
    dest.wait_for("", Duration::from_secs(10), |_| {
        dest.err().contains("version mismatch")
    });
    // The right handshake, then a frame with a bad checksum.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"VIREOMIG").unwrap();
    s.write_all(&1u32.to_le_bytes()).unwrap();
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[12], 1);
    let mut frame = [0u8; 24 + 2];
    frame[0] = 1; // an offer
    frame[4] = 2; // of two bytes
    frame[16..20].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    frame[24..].copy_from_slice(b"{}");
    s.write_all(&frame).unwrap();
    let _ = s.read_to_end(&mut b);
    dest.wait_for("", Duration::from_secs(10), |_| {
        dest.err().contains("checksum mismatch")
    });
    let info = dest.ctl_ok(&["info"]);
    assert!(info.contains("state: not-configured"), "{info}");
}

/// The counting probe, migrated ten times between fresh destination processes: the count
/// goes on by one at every hop, and each source process exits once its VM left.
#[test]
fn probe_counter_migrates_back_and_forth_ten_times() {
    for accel in common::probe_backends("probe_counter_migrates_back_and_forth_ten_times") {
        let dir = TempDir::new(&format!("mig-probe-{accel}"));
        let kernel = dir.path().join("counter.elf");
        std::fs::write(&kernel, build(&Probe::Counter)).unwrap();
        let sock = dir.path().join("0.sock");
        let mut cmd = vireo();
        cmd.args(["run", "--accel", accel, "--memory", "128M", "--kernel"])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&sock);
        let mut src = Running::start(cmd, &sock);
        src.wait_for("count 2", Duration::from_secs(60), |o| {
            last(o, "count ").is_some_and(|n| n >= 2)
        });
        for hop in 1..=10 {
            let port = free_port("127.0.0.1");
            let addr = format!("127.0.0.1:{port}");
            let dsock = dir.path().join(format!("{hop}.sock"));
            let dst = receiver(&addr, &dsock, None);
            if hop == 1 {
                refused_connections(&addr, &dst);
            }
            let said = src.ctl_ok(&["migrate", "--to", &addr, "--quiet"]);
            assert!(said.contains("migrated to"), "{said}");
            let before = last(&src.out(), "count ").unwrap();
            let (code, _) = src.wait_exit(Duration::from_secs(30));
            assert_eq!(code, Some(0), "{accel} hop {hop}: the source must exit 0");
            let out = dst.wait_for(
                "counting at the destination",
                Duration::from_secs(30),
                |o| numbers(o, "count ").len() >= 2,
            );
            let seen = numbers(&out, "count ");
            assert_eq!(
                seen[0],
                before + 1,
                "{accel} hop {hop}: the count must go on\n{out}"
            );
            assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{out}");
            let info = dst.ctl_ok(&["info"]);
            assert!(info.contains("state: running"), "{info}");
            assert!(info.contains(&format!("backend: {accel}")), "{info}");
            let stats = dst.ctl_ok(&["counters"]);
            assert!(stats.contains("state: running"), "{stats}");
            src = dst;
        }
        src.ctl_ok(&["power-off"]);
        assert_eq!(src.wait_exit(Duration::from_secs(30)).0, Some(0));
    }
}

/// The guest: a 2 MiB block of random data whose SHA-256 it checks every round against the
/// one taken at the start (memory written before the migration, read after it), 512 KiB of
/// fresh random data per round (memory dirtied while the pages are copied), its round number
/// written to the disk.
const SCRIPT: &str = "dd if=/dev/urandom of=/tmp/blob bs=64k count=32 2>/dev/null; \
     ref=$(sha256sum < /tmp/blob); i=0; while true; do i=$((i+1)); \
     dd if=/dev/urandom of=/tmp/churn bs=64k count=8 2>/dev/null; \
     echo \"disk $i\" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; \
     now=$(sha256sum < /tmp/blob); \
     if [ \"$now\" = \"$ref\" ]; then echo \"count $i sum-ok\"; else echo \"count $i sum-BAD\"; fi; \
     done";

fn read_disk_count(disk: &Path) -> u64 {
    let mut b = vec![0u8; 512];
    std::fs::File::open(disk)
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    numbers(&String::from_utf8_lossy(&b), "disk ")
        .first()
        .copied()
        .unwrap_or(0)
}

/// Boot the Linux guest running [`SCRIPT`] (inside `netns` if given).
fn linux_source(dir: &TempDir, accel: &str, netns: Option<&str>) -> (Running, PathBuf) {
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("src.sock");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vireo")]);
            c.stdin(Stdio::null());
            c
        }
        None => vireo(),
    };
    cmd.args(["run", "--accel", accel, "--disk"])
        .arg(format!("path={}", disk.display()))
        .arg("--api-socket")
        .arg(&sock)
        .args(["--", "sh", "-c", SCRIPT]);
    let vm = Running::start(cmd, &sock);
    vm.wait_for("count 3", Duration::from_secs(300), |o| {
        last(o, "count ").is_some_and(|n| n >= 3)
    });
    (vm, disk)
}

/// After a migration: the count goes on from the source's, the memory checksum still
/// matches, and the disk (paused) holds a count the guest printed.
fn check_linux_destination(accel: &str, src_out: &str, dst: &Running, disk: &Path) {
    let before = last(src_out, "count ").unwrap();
    let out = dst.wait_for(
        "counting at the destination",
        Duration::from_secs(120),
        |o| numbers(o, "count ").len() >= 3,
    );
    let seen = numbers(&out, "count ");
    assert!(
        seen[0] == before + 1 || seen[0] == before,
        "{accel}: the count must go on from {before}\n{out}"
    );
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{out}");
    assert!(!out.contains("sum-BAD"), "{accel}: memory damaged\n{out}");
    assert!(
        src_out.contains("sum-ok") && out.contains("sum-ok"),
        "{out}"
    );
    dst.ctl_ok(&["pause"]);
    let printed = numbers(&dst.out(), "count ");
    let last_printed = *printed.last().unwrap();
    let on_disk = read_disk_count(disk);
    assert!(
        on_disk == last_printed || on_disk == last_printed + 1,
        "{accel}: disk has {on_disk}, guest printed up to {last_printed}"
    );
    dst.ctl_ok(&["power-off"]);
}

/// Loopback: first a destination killed in the middle of the copy (the guest runs on at the
/// source, which says why), then a real migration.
#[test]
fn linux_guest_migrates_over_loopback_and_survives_a_dead_destination() {
    let test = "linux_guest_migrates_over_loopback_and_survives_a_dead_destination";
    if common::default_guest(test).is_none() {
        return;
    }
    for accel in common::full_backends(test) {
        let dir = TempDir::new(&format!("mig-linux-{accel}"));
        let (src, disk) = linux_source(&dir, accel, None);

        // A destination that dies mid-copy (the copy slowed to 4 MiB/s to give it time).
        let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let mut doomed = receiver(&addr, &dir.path().join("doomed.sock"), None);
        let sock = src.socket.clone();
        let a2 = addr.clone();
        let migrating = std::thread::spawn(move || {
            let o = vireo()
                .args(["ctl", "--api-socket"])
                .arg(&sock)
                .args(["migrate", "--quiet", "--bandwidth", "4", "--to", &a2])
                .output()
                .unwrap();
            (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            )
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, p) = src.ctl(&["migration"]);
            if p.contains("copying") {
                break;
            }
            assert!(Instant::now() < deadline, "the copy never started: {p}");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        doomed.kill();
        let (ok, said) = migrating.join().unwrap();
        assert!(!ok, "the migration to a dead destination succeeded: {said}");
        assert!(said.contains("runs on here"), "{said}");
        let (_, status) = src.ctl(&["migration"]);
        assert!(status.contains("failed"), "{status}");
        let n = last(&src.out(), "count ").unwrap();
        src.wait_for("counting on at the source", Duration::from_secs(60), |o| {
            last(o, "count ").is_some_and(|m| m >= n + 2)
        });
        assert!(src.ctl_ok(&["info"]).contains("state: running"));

        // Now a good one.
        let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let dst = receiver(&addr, &dir.path().join("dst.sock"), None);
        let said = src.ctl_ok(&["migrate", "--to", &addr, "--max-downtime", "100"]);
        assert!(said.contains("migrated to"), "{said}");
        let status = dst.ctl_ok(&["info"]);
        assert!(status.contains("state: running"), "{status}");
        let src_out = src.out();
        let (code, _) = src.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(0));
        check_linux_destination(accel, &src_out, &dst, &disk);
        assert_eq!(dst.wait_exit(Duration::from_secs(30)).0, Some(0));
    }
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    fn create(tag: &str) -> Option<NetnsPair> {
        let id = std::process::id();
        let a = format!("vmig{tag}{id}a");
        let b = format!("vmig{tag}{id}b");
        let pair = NetnsPair {
            a: a.clone(),
            b: b.clone(),
        };
        let va = format!("vm{id}a");
        let vb = format!("vm{id}b");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &a],
            vec!["netns", "add", &b],
            vec![
                "link", "add", &va, "netns", &a, "type", "veth", "peer", &vb, "netns", &b,
            ],
            vec!["-n", &a, "addr", "add", "10.213.7.1/24", "dev", &va],
            vec!["-n", &b, "addr", "add", "10.213.7.2/24", "dev", &vb],
            vec!["-n", &a, "link", "set", &va, "up"],
            vec!["-n", &b, "link", "set", &vb, "up"],
            vec!["-n", &a, "link", "set", "lo", "up"],
            vec!["-n", &b, "link", "set", "lo", "up"],
        ];
        for s in steps {
            let st = Command::new("ip").args(&s).status().ok()?;
            if !st.success() {
                return None;
            }
        }
        Some(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The Linux guest migrated from one network namespace to another over a veth link.
#[test]
fn linux_guest_migrates_between_network_namespaces() {
    let test = "linux_guest_migrates_between_network_namespaces";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(test, "creating network namespaces needs root");
        return;
    }
    if common::default_guest(test).is_none() {
        return;
    }
    let Some(ns) = NetnsPair::create("l") else {
        common::skip(test, "cannot create network namespaces (`ip netns`)");
        return;
    };
    for accel in common::full_backends(test) {
        let dir = TempDir::new(&format!("mig-netns-{accel}"));
        let (src, disk) = linux_source(&dir, accel, Some(&ns.a));
        let addr = "10.213.7.2:7070";
        let dst = receiver(addr, &dir.path().join("dst.sock"), Some(&ns.b));
        let said = src.ctl_ok(&["migrate", "--to", addr]);
        assert!(said.contains("migrated to"), "{said}");
        let src_out = src.out();
        assert_eq!(src.wait_exit(Duration::from_secs(30)).0, Some(0));
        check_linux_destination(accel, &src_out, &dst, &disk);
        assert_eq!(dst.wait_exit(Duration::from_secs(30)).0, Some(0));
    }
}
