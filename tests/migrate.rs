//! Live migration between vireo processes (`vireo ctl migrate` → `vireo migrate receive`),
//! checked by what the guest prints:
//!
//! - the counting probe goes back and forth ten times, on every backend that runs probes
//!   (KVM included: its in-kernel irqchip, timer and MSI plumbing are rebuilt at each
//!   destination); strangers, corrupted streams and other protocol versions are refused by a
//!   waiting destination, which keeps waiting;
//! - the default Linux guest, counting, dirtying memory, writing its disk and checking a
//!   checksum of a block of its memory, over loopback (where a destination killed in the
//!   middle of the copy leaves the guest running at the source, and the API answers during
//!   the copy) and between two network namespaces (root only);
//! - the network hand-over (root only): a guest on a bridged TAP moves to a TAP of the same
//!   name in another namespace, announces itself, and answers pings again within a second;
//! - a destination hanging up around the commit: before it, the guest runs on at the source;
//!   after it, the source keeps the guest paused (in doubt) rather than risk two copies.

mod common;
mod netutil;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::running::{last, numbers, start_counting_linux, Running};
use common::{vireo, TempDir};
use netutil::{recv_timeout, IcmpEcho};
use vireo_guests::probe::{build, Probe};

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
            let (code, src_out) = src.wait_exit(Duration::from_secs(30));
            assert_eq!(code, Some(0), "{accel} hop {hop}: the source must exit 0");
            let out = dst.wait_for(
                "counting at the destination",
                Duration::from_secs(30),
                |o| numbers(o, "count ").len() >= 2,
            );
            // The guest may have been paused in the middle of a line: the source printed its
            // start, the destination prints the rest. Read both as one console.
            let joined = format!("{src_out}{out}");
            let seen = numbers(&joined, "count ");
            assert!(
                seen.len() >= numbers(&src_out, "count ").len() + 2,
                "{accel} hop {hop}: the destination does not count\n{joined}"
            );
            assert!(
                seen.windows(2).all(|w| w[1] == w[0] + 1),
                "{accel} hop {hop}: the count must go on by one\n{joined}"
            );
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
    let sock = dir.path().join("src.sock");
    let cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vireo")]);
            c.stdin(Stdio::null());
            c
        }
        None => vireo(),
    };
    let vm = start_counting_linux(cmd, accel, &disk, &sock, SCRIPT);
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
        // The API answers during the copy (which runs on the VMM's main thread): `info` at
        // once, a command that needs the main thread is refused at once, not queued.
        let t = Instant::now();
        let info = src.ctl_ok(&["info"]);
        assert!(info.contains("state: running"), "{info}");
        let (ok, said) = src.ctl(&["pause"]);
        assert!(!ok && said.contains("being migrated"), "{said}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the API took {:?} during a migration",
            t.elapsed()
        );
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

/// Run `f` on a new thread inside the network namespace `ns` (the sockets it opens live
/// there).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns(2) on a namespace file this thread opened; it moves only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// A continuous pinger (ICMP echo, RFC 792) inside a namespace, one request every `every`;
/// [`Pinger::finish`] gives the times the replies arrived.
struct Pinger {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Instant>>,
}

impl Pinger {
    fn start(ns: &str, dst: Ipv4Addr, every: Duration) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = in_netns(ns, move || {
            let echo = IcmpEcho::open(
                (std::process::id() & 0xffff) as u16 ^ 0x5a5a,
                Duration::from_millis(5),
            );
            let mut replies = Vec::new();
            let mut seq = 0u16;
            let mut next = Instant::now();
            while !s.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    next += every;
                    seq = seq.wrapping_add(1);
                    echo.send(dst, seq, b"vireo migration ping");
                }
                if echo.reply().is_some() {
                    replies.push(Instant::now());
                }
            }
            replies
        });
        Pinger { stop, thread }
    }

    fn finish(self) -> Vec<Instant> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("pinger")
    }
}

/// Gratuitous ARP requests (sender address = target address = `ip`, RFC 5227 §3) arriving
/// on interface `ifname` of namespace `ns` (frames the interface sends are not counted), with
/// the time they arrived and the sender's MAC address.
struct ArpWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, [u8; 6])>>,
}

impl ArpWatch {
    fn start(ns: &str, ifname: &str, ip: Ipv4Addr) -> ArpWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ifname = std::ffi::CString::new(ifname).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_netns(ns, move || {
            // ETH_P_ALL: a bridge port hands its frames to the bridge before protocol
            // handlers run; only taps for every protocol see them.
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2) with constant arguments; the result is checked.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `fd` is ours; the File closes it.
            let _sock = unsafe { std::fs::File::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert!(index != 0, "no interface {ifname:?}");
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            recv_timeout(fd, Duration::from_millis(20));
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            let mut buf = [0u8; 1600];
            while !s.load(Ordering::SeqCst) {
                // SAFETY: all-zero is a valid sockaddr_ll.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: valid buffer, address and length for recvfrom(2).
                let n = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                // Ethernet header (14) + ARP for IPv4 over Ethernet (28).
                if n < 42
                    || from.sll_pkttype == libc::PACKET_OUTGOING
                    || buf[12..14] != [0x08, 0x06]
                {
                    continue;
                }
                let arp = &buf[14..42];
                let (spa, tpa) = (&arp[14..18], &arp[24..28]);
                if arp[0..2] == [0, 1] && spa == ip.octets() && tpa == ip.octets() {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&arp[8..14]);
                    seen.push((Instant::now(), mac));
                }
            }
            seen
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the ARP watch did not start");
        ArpWatch { stop, thread }
    }

    fn finish(self) -> Vec<(Instant, [u8; 6])> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("ARP watch")
    }
}

/// How many tun files process `pid` has attached to the TAP `name` (`iff:` in fdinfo).
fn tap_queues(pid: u32, name: &str) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| {
            info.lines()
                .any(|l| l.strip_prefix("iff:").map(str::trim) == Some(name))
        })
        .count()
}

/// One L2 segment over two network namespaces: in each, a bridge `br0` holding a TAP named
/// `vmtap` (persistent, left to the VMM to attach to) and one end of a veth pair joining the
/// bridges. The bridges have addresses [`SEG_A`] and [`SEG_B`] (the migration runs over the
/// same segment). Removed on drop.
struct Segment {
    a: String,
    b: String,
    veth_a: String,
}

const SEG_A: Ipv4Addr = Ipv4Addr::new(10, 213, 9, 1);
const SEG_B: Ipv4Addr = Ipv4Addr::new(10, 213, 9, 2);
const SEG_GUEST: Ipv4Addr = Ipv4Addr::new(10, 213, 9, 10);
const SEG_TAP: &str = "vmtap";

impl Segment {
    fn create() -> Result<Segment, String> {
        let id = std::process::id();
        let seg = Segment {
            a: format!("vmh{id}a"),
            b: format!("vmh{id}b"),
            veth_a: format!("vh{id}a"),
        };
        let vb = format!("vh{id}b");
        let (a, b, va) = (seg.a.as_str(), seg.b.as_str(), seg.veth_a.as_str());
        let mut steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), a.into()],
            vec!["netns".into(), "add".into(), b.into()],
        ];
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        steps.push(s(&[
            "link", "add", va, "netns", a, "type", "veth", "peer", &vb, "netns", b,
        ]));
        for (ns, veth, addr) in [(a, va, SEG_A), (b, vb.as_str(), SEG_B)] {
            let cidr = format!("{addr}/24");
            for step in [
                s(&["-n", ns, "link", "set", "lo", "up"]),
                s(&["-n", ns, "link", "add", "br0", "type", "bridge"]),
                s(&[
                    "-n",
                    ns,
                    "tuntap",
                    "add",
                    "dev",
                    SEG_TAP,
                    "mode",
                    "tap",
                    "multi_queue",
                ]),
                s(&["-n", ns, "link", "set", SEG_TAP, "master", "br0"]),
                s(&["-n", ns, "link", "set", veth, "master", "br0"]),
                s(&["-n", ns, "link", "set", SEG_TAP, "up"]),
                s(&["-n", ns, "link", "set", veth, "up"]),
                s(&["-n", ns, "link", "set", "br0", "up"]),
                s(&["-n", ns, "addr", "add", &cidr, "dev", "br0"]),
            ] {
                steps.push(step);
            }
        }
        for st in steps {
            let o = Command::new("ip")
                .args(&st)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    st.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
        }
        Ok(seg)
    }

    /// `ip -n NS link show vmtap`.
    fn tap(&self, ns: &str) -> String {
        let o = Command::new("ip")
            .args(["-n", ns, "link", "show", SEG_TAP])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The network hand-over: a guest on the two-queue TAP `vmtap` of a bridge in namespace A
/// migrates to a destination in namespace B, which re-attaches to B's `vmtap` (the TAP named
/// in the migrated configuration, both queues, the guest's MAC address). A pinger on A's
/// bridge pings the guest every 20 ms throughout: the replies resume within a second of the
/// destination running the guest, the guest announced itself (a gratuitous ARP from its MAC
/// arrives at A's bridge over the veth from B), its MAC is the same, and A's TAP is released.
#[test]
fn linux_guest_network_follows_it_to_another_namespace() {
    let test = "linux_guest_network_follows_it_to_another_namespace";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(test, "network namespaces, bridges and TAPs need root");
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        common::skip(test, "no /dev/net/tun");
        return;
    }
    if common::default_guest(test).is_none() {
        return;
    }
    for accel in common::full_backends(test) {
        let seg = match Segment::create() {
            Ok(s) => s,
            Err(e) => {
                common::skip(test, &format!("cannot build the test network: {e}"));
                return;
            }
        };
        let dir = TempDir::new(&format!("mig-handover-{accel}"));
        let sock = dir.path().join("src.sock");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &seg.a, env!("CARGO_BIN_EXE_vireo")])
            .stdin(Stdio::null())
            .args(["run", "--accel", accel, "--net"])
            .arg(format!("tap={SEG_TAP},queues=2,ip={SEG_GUEST}/24"))
            .arg("--api-socket")
            .arg(&sock)
            .args([
                "--",
                "sh",
                "-c",
                "i=0; while true; do i=$((i+1)); \
                 echo \"count $i mac $(cat /sys/class/net/eth0/address)\"; sleep 1; done",
            ]);
        let src = Running::start(cmd, &sock);
        src.wait_for("count 2", Duration::from_secs(300), |o| {
            last(o, "count ").is_some_and(|n| n >= 2)
        });
        let mac_line = |out: &str| {
            out.lines()
                .rev()
                .find_map(|l| l.split(" mac ").nth(1))
                .map(|m| m.trim().to_string())
        };
        let mac = mac_line(&src.out()).expect("the guest's MAC");
        let pinger = Pinger::start(&seg.a, SEG_GUEST, Duration::from_millis(20));
        // Replies flow before the migration.
        let t_ping = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let arp = ArpWatch::start(&seg.a, &seg.veth_a, SEG_GUEST);

        let addr = format!("{SEG_B}:7071");
        let dst = receiver(&addr, &dir.path().join("dst.sock"), Some(&seg.b));
        let t_migrate = Instant::now();
        let said = src.ctl_ok(&["migrate", "--quiet", "--to", &addr]);
        // The source hears `Running` from the destination, tears down and answers: the
        // guest runs at the destination from (slightly before) here.
        let t_running = Instant::now();
        assert!(said.contains("migrated to"), "{said}");
        let released = seg.tap(&seg.a);
        std::thread::sleep(Duration::from_secs(3));
        let replies = pinger.finish();
        let garps = arp.finish();
        let src_out = src.out();
        assert_eq!(src.wait_exit(Duration::from_secs(30)).0, Some(0));

        let before = replies
            .iter()
            .filter(|&&t| t > t_ping && t < t_migrate)
            .count();
        assert!(
            before > 20,
            "{accel}: {before} replies before the migration"
        );
        let first_after = replies.iter().find(|&&t| t > t_running).copied();
        let Some(first_after) = first_after else {
            panic!(
                "{accel}: no ping reply after the migration\n--- destination ---\n{}\n{}",
                dst.out(),
                dst.err()
            );
        };
        let outage = replies
            .windows(2)
            .filter(|w| w[1] > t_migrate)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        eprintln!(
            "{accel}: first reply {:?} after the destination runs; longest gap between \
             replies {outage:?}; gratuitous ARPs {:?} after it runs",
            first_after - t_running,
            garps
                .iter()
                .map(|(t, _)| t.saturating_duration_since(t_running))
                .collect::<Vec<_>>()
        );
        assert!(
            first_after - t_running < Duration::from_secs(1),
            "{accel}: the guest answered {:?} after the destination ran it",
            first_after - t_running
        );
        // The guest announced itself from its new place: a gratuitous ARP from its MAC came
        // to A's bridge over the veth from B.
        let want: Vec<u8> = mac
            .split(':')
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect();
        assert!(
            garps
                .iter()
                .any(|(t, m)| *t > t_migrate && m[..] == want[..]),
            "{accel}: no gratuitous ARP from {mac} over the veth: {garps:?}\n--- destination ---\n{}",
            dst.err()
        );
        // The source let go of its TAP (no process attached: no carrier).
        assert!(released.contains("NO-CARRIER"), "{released}");
        assert!(
            !seg.tap(&seg.b).contains("NO-CARRIER"),
            "{}",
            seg.tap(&seg.b)
        );
        // The destination attached both queues of B's TAP (one tun file each).
        assert_eq!(tap_queues(dst.id(), SEG_TAP), 2, "{accel}");
        // Same MAC at the destination, and the count goes on.
        let before_n = last(&src_out, "count ").unwrap();
        let out = dst.wait_for(
            "counting at the destination",
            Duration::from_secs(60),
            |o| numbers(o, "count ").len() >= 2,
        );
        assert!(numbers(&out, "count ")[0] <= before_n + 1, "{out}");
        assert_eq!(mac_line(&out).as_deref(), Some(mac.as_str()), "{out}");
        dst.ctl_ok(&["power-off"]);
        assert_eq!(dst.wait_exit(Duration::from_secs(30)).0, Some(0));
    }
}

/// CRC-32 (IEEE 802.3, reflected), the frame checksum of the migration protocol.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for p in parts {
        for &b in *p {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xedb8_8320
                } else {
                    c >> 1
                };
            }
        }
    }
    !c
}

/// A frame of the migration protocol (`crates/vmm/src/migrate/proto.rs`).
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 24];
    h[0] = kind;
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32(&[&h[..16], payload]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(payload);
    h
}

/// Where a [`fake_destination`] hangs up.
#[derive(Clone, Copy, Debug, PartialEq)]
enum HangUp {
    /// Once the state arrived, before answering `Restored`.
    BeforeRestored,
    /// Once the commit arrived, before answering `Running`.
    AfterCommit,
}

/// A destination that speaks the protocol until `hang_up`, then closes the connection.
/// Returns the kinds of the frames it received.
fn fake_destination(listener: TcpListener, hang_up: HangUp) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 12];
        s.read_exact(&mut hello).unwrap();
        let mut answer = b"VIREOMIG".to_vec();
        answer.extend_from_slice(&hello[8..12]);
        answer.push(1);
        s.write_all(&answer).unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut kinds = Vec::new();
        let mut payload = Vec::new();
        loop {
            let mut h = [0u8; 24];
            if r.read_exact(&mut h).is_err() {
                return kinds;
            }
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            payload.resize(len, 0);
            r.read_exact(&mut payload).unwrap();
            kinds.push(h[0]);
            match (h[0], hang_up) {
                (1, _) => s.write_all(&frame(0x81, &[])).unwrap(), // Offer → Ready
                (4, HangUp::BeforeRestored) | (5, HangUp::AfterCommit) => return kinds,
                (4, _) => s.write_all(&frame(0x82, &[])).unwrap(), // State → Restored
                _ => {}
            }
        }
    })
}

/// The window around the commit, with a destination that hangs up: before it answers the
/// state, the source resumes the guest by itself (the destination never ran it); after it
/// read the commit, the source cannot know whether the guest runs there and keeps it paused
/// (never two running copies), saying so, until told to resume.
#[test]
fn a_link_lost_around_the_commit_never_runs_two_copies() {
    let dir = TempDir::new("mig-commit");
    let kernel = dir.path().join("counter.elf");
    std::fs::write(&kernel, build(&Probe::Counter)).unwrap();
    let sock = dir.path().join("src.sock");
    let mut cmd = vireo();
    cmd.args(["run", "--accel", "emu", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&sock);
    let src = Running::start(cmd, &sock);
    src.wait_for("count 2", Duration::from_secs(60), |o| {
        last(o, "count ").is_some_and(|n| n >= 2)
    });
    let counting_on = |from: u64| {
        src.wait_for("counting on at the source", Duration::from_secs(30), |o| {
            last(o, "count ").is_some_and(|n| n >= from + 2)
        });
    };

    // Hung up before `Restored`: the guest runs on here at once.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = fake_destination(l, HangUp::BeforeRestored);
    let (ok, said) = src.ctl(&["migrate", "--quiet", "--to", &addr]);
    let kinds = fake.join().unwrap();
    assert!(!ok, "{said}");
    assert!(said.contains("runs on here"), "{said}");
    assert_eq!(kinds.first(), Some(&1), "{kinds:?}");
    assert_eq!(
        kinds.last(),
        Some(&4),
        "the state is the last frame: {kinds:?}"
    );
    assert!(src.ctl_ok(&["info"]).contains("state: running"));
    counting_on(last(&src.out(), "count ").unwrap());

    // Hung up after the commit: in doubt, paused, not resumed by itself.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = fake_destination(l, HangUp::AfterCommit);
    let (ok, said) = src.ctl(&["migrate", "--quiet", "--to", &addr]);
    let kinds = fake.join().unwrap();
    assert!(!ok, "{said}");
    assert!(said.contains("in doubt"), "{said}");
    assert_eq!(kinds.last(), Some(&5), "the commit was sent: {kinds:?}");
    let info = src.ctl_ok(&["info"]);
    assert!(info.contains("state: paused"), "{info}");
    let (_, status) = src.ctl(&["migration"]);
    assert!(
        status.contains("failed") && status.contains("in doubt"),
        "{status}"
    );
    let frozen = last(&src.out(), "count ").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(last(&src.out(), "count "), Some(frozen), "the guest ran on");
    // The operator, having checked the destination, resumes it here.
    src.ctl_ok(&["resume"]);
    counting_on(frozen);
    src.ctl_ok(&["power-off"]);
    assert_eq!(src.wait_exit(Duration::from_secs(30)).0, Some(0));
}
