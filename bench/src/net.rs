//! `bench/net`: vireo's virtio-net (and virtio-vsock), two views. Root only: everything runs
//! in a network namespace the benchmark creates and removes.
//!
//! 1. **The device model against the TAP alone.** A host-side driver
//!    (`vireo_virtio::driver::SplitQueueDriver`) posts transmit frames / receive buffers in a
//!    guest-memory region and kicks vireo's `Net` device on a TAP — no guest CPU involved. The
//!    other end of the TAP is a host process's `AF_PACKET` socket on the interface, sending or
//!    counting frames of a private EtherType. The same process reading/writing the TAP's file
//!    descriptor itself is the reference ("TAP alone"). Frames/s and Gbit/s for 64-byte and
//!    1514-byte frames, both directions.
//! 2. **Side by side with QEMU.** The default guest (with the `vtool` helper from
//!    tests/guest/vtool.rs) on vireo's emulator and on QEMU TCG with `virtio-net-pci` on a TAP
//!    with `vhost=off`: ping round trip, TCP host→guest and guest→host throughput, and per
//!    MiB moved the guest's virtio-net interrupts (from its `/proc/interrupts`, receive and
//!    transmit queues) and the CPU time of the VMM's vCPU thread. On vireo also vsock:
//!    throughput both ways and connections per second.
//!
//! Runs are interleaved (TAP alone / device, vireo / QEMU); medians and ratios are printed.
//!
//! Usage: `target/x86_64-unknown-linux-gnu/release/net [--runs N] [--seconds S] [--mib M]
//! [--part device|guest|all]`

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_bench::{fmt, have, median, qemu_pc, vireo_binary};
use vireo_virtio::driver::{need_event, Desc, EventInterrupt, SplitQueueDriver};
use vireo_virtio::net::features::VIRTIO_NET_F_MRG_RXBUF;
use vireo_virtio::net::tap::{iovec_mut, readv, writev, NetBackend};
use vireo_virtio::{
    Activation, ActiveQueue, MacAddr, Net, Tap, VirtioDevice, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type GuestMemory = vireo_hv::GuestMemory;

const QEMU: &str = "qemu-system-x86_64";
/// Private EtherType (IEEE 802 local experimental) of the device-model frames.
const ETHERTYPE: u16 = 0x88b5;
const HDR: usize = 12;

#[derive(Clone, Copy, PartialEq)]
enum Part {
    Device,
    Guest,
    All,
}

struct Args {
    runs: usize,
    seconds: f64,
    mib: u64,
    part: Part,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 5,
        seconds: 1.0,
        mib: 200,
        part: Part::All,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = val()?.parse().map_err(|e| format!("{e}"))?,
            "--seconds" => a.seconds = val()?.parse().map_err(|e| format!("{e}"))?,
            "--mib" => a.mib = val()?.parse().map_err(|e| format!("{e}"))?,
            "--part" => {
                a.part = match val()?.as_str() {
                    "device" => Part::Device,
                    "guest" => Part::Guest,
                    "all" => Part::All,
                    p => return Err(format!("--part {p}: use device, guest or all")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("error: bench/net needs root (network namespaces, TAP devices)");
        std::process::exit(1);
    }
    if args.part != Part::Guest {
        device_part(&args);
    }
    if args.part != Part::Device {
        guest_part(&args);
    }
}

// ---------------------------------------------------------------- namespaces

/// A network namespace removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("vireo-bench-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "ip netns add {name}");
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let o = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("ip");
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Run `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("namespace thread")
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

fn enter(path: &str) {
    let f = std::fs::File::open(path).expect("namespace file");
    // SAFETY: setns(2) on a namespace file; changes only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

// ---------------------------------------------------------------- part 1: device model

/// An AF_PACKET socket on one interface for one EtherType: the TAP's other end.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn bind(ifname: &str) -> PacketSocket {
        let proto = ETHERTYPE.to_be() as i32;
        // SAFETY: socket(2) with constant arguments; checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).expect("name");
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: a zeroed sockaddr_ll is valid; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETHERTYPE.to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: a valid sockaddr_ll for the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        let size: libc::c_int = 16 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: an int option value valid for the call.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    4,
                )
            };
        }
        PacketSocket { fd }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An Ethernet frame of `len` bytes with our EtherType.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Count frames arriving on `fd` (each `read` one frame) until `stop`; returns (frames, bytes).
fn count_frames(fd: RawFd, stop: &AtomicBool, hdr: usize) -> (u64, u64) {
    let mut buf = vec![0u8; 70000];
    let (mut n, mut bytes) = (0u64, 0u64);
    loop {
        let iov = [iovec_mut(&mut buf)];
        match readv(fd, &iov) {
            Ok(k) => {
                n += 1;
                bytes += k.saturating_sub(hdr) as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) {
                    return (n, bytes);
                }
                poll_in(fd, 10);
            }
            Err(_) => return (n, bytes),
        }
    }
}

/// Send `frame` through `fd` as fast as it goes for `secs`; `hdr` zero bytes go first.
fn blast(fd: RawFd, frame: &[u8], hdr: usize, secs: f64) {
    let mut h = vec![0u8; hdr];
    let mut f = frame.to_vec();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            let iov = [iovec_mut(&mut h), iovec_mut(&mut f)];
            let _ = writev(fd, &iov[if hdr == 0 { 1 } else { 0 }..]);
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl(2) flag changes on a descriptor we hold.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// One measurement: frames per second and Gbit/s at the receiving end.
#[derive(Default, Clone, Copy)]
struct Rate {
    pps: f64,
    gbps: f64,
}

fn rate(frames: u64, bytes: u64, secs: f64) -> Rate {
    Rate {
        pps: frames as f64 / secs,
        gbps: bytes as f64 * 8.0 / secs / 1e9,
    }
}

/// TAP alone, transmit: write frames into the TAP, count them at the packet socket.
fn tap_tx(tap: &Tap, peer: &PacketSocket, size: usize, secs: f64) -> Rate {
    let stop = Arc::new(AtomicBool::new(false));
    let (pfd, s2) = (peer.raw(), stop.clone());
    let counter = std::thread::spawn(move || count_frames(pfd, &s2, 0));
    let f = frame(size);
    let t = Instant::now();
    blast(tap.queue_fd(0), &f, HDR, secs);
    let elapsed = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (n, b) = counter.join().expect("counter");
    rate(n, b, elapsed)
}

/// TAP alone, receive: the packet socket sends, the process reads the TAP.
fn tap_rx(tap: &Tap, peer: &PacketSocket, size: usize, secs: f64) -> Rate {
    let stop = Arc::new(AtomicBool::new(false));
    let (tfd, s2) = (tap.queue_fd(0), stop.clone());
    let counter = std::thread::spawn(move || count_frames(tfd, &s2, HDR));
    let f = frame(size);
    let t = Instant::now();
    blast(peer.raw(), &f, 0, secs);
    let elapsed = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (n, b) = counter.join().expect("counter");
    rate(n, b, elapsed)
}

const QSIZE: u16 = 256;
const SLOT: u64 = 0x1_0000;
const RX_BASE: u64 = 0x100_0000;
const TX_BASE: u64 = 0x200_0000;

/// vireo's device on the TAP, driven by a host-side driver that, like Linux's, uses
/// EVENT_IDX to skip notifications the device does not need and interrupts it does not want.
struct DeviceRig {
    mem: GuestMemory,
    net: Net,
    rx: SplitQueueDriver,
    tx: SplitQueueDriver,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<EventInterrupt>,
    /// Chains published and used entries seen, per queue (rx, tx).
    published: [u16; 2],
    seen: [u16; 2],
}

impl DeviceRig {
    fn queue(d: &SplitQueueDriver) -> virtio_queue::Queue {
        let mut q = d.queue().expect("queue");
        q.set_event_idx(true);
        q
    }

    /// Publish accounting and a notification if the device wants one.
    fn published(&mut self, q: usize, n: u16) {
        let old = self.published[q];
        self.published[q] = old.wrapping_add(n);
        let (d, kick) = if q == 0 {
            (&self.rx, &self.rx_kick)
        } else {
            (&self.tx, &self.tx_kick)
        };
        if n > 0 && need_event(d.avail_event(&self.mem), self.published[q], old) {
            let _ = kick.write(1);
        }
    }

    fn new(tap: Arc<Tap>) -> DeviceRig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("memory");
        let rx = SplitQueueDriver::new(&mem, 0x1_0000, QSIZE);
        let tx = SplitQueueDriver::new(&mem, 0x2_0000, QSIZE);
        let rx_kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let tx_kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let irq = Arc::new(EventInterrupt::new().expect("eventfd"));
        let mut net = Net::new(tap, MacAddr([2, 0, 0, 0, 0, 2]), 0);
        net.activate(Activation {
            mem: mem.clone(),
            features: VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_NET_F_MRG_RXBUF,
            queues: vec![
                ActiveQueue {
                    index: 0,
                    queue: Self::queue(&rx),
                    notify: rx_kick.try_clone().expect("eventfd"),
                },
                ActiveQueue {
                    index: 1,
                    queue: Self::queue(&tx),
                    notify: tx_kick.try_clone().expect("eventfd"),
                },
            ],
            interrupt: irq.clone(),
        })
        .expect("activate");
        DeviceRig {
            mem,
            net,
            rx,
            tx,
            rx_kick,
            tx_kick,
            irq,
            published: [0; 2],
            seen: [0; 2],
        }
    }

    /// Transmit `size`-byte frames for `secs`, keeping the queue full.
    fn tx(&mut self, peer: &PacketSocket, size: usize, secs: f64) -> Rate {
        let f = frame(size);
        for i in 0..u64::from(QSIZE) {
            let at = TX_BASE + i * SLOT;
            self.mem
                .write_slice(&[0u8; HDR], GuestAddress(at))
                .expect("write");
            self.mem
                .write_slice(&f, GuestAddress(at + HDR as u64))
                .expect("write");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (pfd, s2) = (peer.raw(), stop.clone());
        let counter = std::thread::spawn(move || count_frames(pfd, &s2, 0));
        let mut free: Vec<u64> = (0..u64::from(QSIZE)).collect();
        let mut slot_of = std::collections::HashMap::new();
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < secs {
            while let Some((head, _)) = self.tx.pop_used(&self.mem) {
                self.seen[1] = self.seen[1].wrapping_add(1);
                if let Some(s) = slot_of.remove(&head) {
                    free.push(s);
                }
            }
            let mut added = 0u16;
            while let Some(s) = free.pop() {
                let at = TX_BASE + s * SLOT;
                match self.tx.add(&self.mem, &[Desc::r(at, (HDR + size) as u32)]) {
                    Some(h) => {
                        slot_of.insert(h, s);
                        added += 1;
                    }
                    None => {
                        free.push(s);
                        break;
                    }
                }
            }
            if added > 0 {
                self.published(1, added);
            } else {
                // Ring full: ask for an interrupt once three quarters are done (Linux's
                // virtqueue_enable_cb_delayed), then wait for it.
                let outstanding = self.published[1].wrapping_sub(self.seen[1]);
                self.tx
                    .set_used_event(&self.mem, self.seen[1].wrapping_add(outstanding * 3 / 4));
                if self.tx.used_idx(&self.mem) == self.seen[1]
                    && poll_in(self.irq.queue.as_raw_fd(), 10)
                {
                    let _ = self.irq.queue.read();
                }
            }
        }
        let elapsed = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        let (n, b) = counter.join().expect("counter");
        rate(n, b, elapsed)
    }

    /// Receive what the packet socket sends for `secs`, recycling buffers as they fill.
    fn rx(&mut self, peer: &PacketSocket, size: usize, secs: f64) -> Rate {
        let mut slot_of = std::collections::HashMap::new();
        let mut n0 = 0;
        for i in 0..u64::from(QSIZE) {
            let at = RX_BASE + i * 0x1000;
            if let Some(h) = self.rx.add(&self.mem, &[Desc::w(at, 4096)]) {
                slot_of.insert(h, at);
                n0 += 1;
            }
        }
        let _ = self.rx_kick.write(1);
        self.published[0] = self.published[0].wrapping_add(n0);
        let stop = Arc::new(AtomicBool::new(false));
        let (pfd, s2) = (peer.raw(), stop.clone());
        let f = frame(size);
        let sender = std::thread::spawn(move || {
            blast(pfd, &f, 0, secs);
            s2.store(true, Ordering::SeqCst);
        });
        let t = Instant::now();
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut quiet_since: Option<Instant> = None;
        loop {
            let mut got = 0u16;
            while let Some((head, len)) = self.rx.pop_used(&self.mem) {
                got += 1;
                self.seen[0] = self.seen[0].wrapping_add(1);
                n += 1;
                bytes += u64::from(len).saturating_sub(HDR as u64);
                if let Some(&at) = slot_of.get(&head) {
                    slot_of.remove(&head);
                    if let Some(h) = self.rx.add(&self.mem, &[Desc::w(at, 4096)]) {
                        slot_of.insert(h, at);
                    }
                }
            }
            // Interrupt me at the next used buffer.
            self.rx.set_used_event(&self.mem, self.seen[0]);
            if got > 0 {
                self.published(0, got);
                quiet_since = None;
                continue;
            } else if stop.load(Ordering::SeqCst) {
                let q = *quiet_since.get_or_insert_with(Instant::now);
                if q.elapsed() > Duration::from_millis(200) {
                    break;
                }
            }
            if self.rx.used_idx(&self.mem) == self.seen[0]
                && poll_in(self.irq.queue.as_raw_fd(), 10)
            {
                let _ = self.irq.queue.read();
            }
        }
        sender.join().expect("sender");
        let _ = t;
        rate(n, bytes, secs)
    }
}

impl Drop for DeviceRig {
    fn drop(&mut self) {
        self.net.reset();
    }
}

fn device_part(args: &Args) {
    let ns = Netns::new("dev");
    let (runs, secs) = (args.runs, args.seconds);
    let rows = ns.run(move || {
        let tap = Arc::new(Tap::open("vb0", 1).expect("TAP"));
        tap.set_up().expect("TAP up");
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/vb0/disable_ipv6", "1");
        let peer = PacketSocket::bind("vb0");
        set_nonblocking(peer.raw());
        let mut rows = Vec::new();
        for size in [64usize, 1514] {
            for dir in ["tx", "rx"] {
                let (mut alone, mut dev) = (Vec::new(), Vec::new());
                for _ in 0..runs {
                    alone.push(if dir == "tx" {
                        tap_tx(&tap, &peer, size, secs)
                    } else {
                        tap_rx(&tap, &peer, size, secs)
                    });
                    let mut rig = DeviceRig::new(tap.clone());
                    dev.push(if dir == "tx" {
                        rig.tx(&peer, size, secs)
                    } else {
                        rig.rx(&peer, size, secs)
                    });
                    drop(rig);
                    // Drain what is left on both ends.
                    let stop = AtomicBool::new(true);
                    count_frames(tap.queue_fd(0), &stop, HDR);
                    count_frames(peer.raw(), &stop, 0);
                }
                rows.push((size, dir, alone, dev));
            }
        }
        rows
    });
    println!(
        "bench/net part 1: the virtio-net device model (host-side driver, no guest CPU) against \
         the TAP alone; AF_PACKET peer; {runs} runs of {secs} s, medians"
    );
    println!();
    println!("| frame | direction | TAP alone (Mpps) | device (Mpps) | TAP alone (Gbit/s) | device (Gbit/s) | device/TAP |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for (size, dir, alone, dev) in rows {
        let m = |v: &[Rate], f: fn(&Rate) -> f64| median(v.iter().map(f).collect());
        let (ap, dp) = (m(&alone, |r| r.pps), m(&dev, |r| r.pps));
        let (ag, dg) = (m(&alone, |r| r.gbps), m(&dev, |r| r.gbps));
        let ratio = match (dp, ap) {
            (Some(d), Some(a)) if a > 0.0 => Some(d / a),
            _ => None,
        };
        let dir = if dir == "tx" {
            "guest → host (TX)"
        } else {
            "host → guest (RX)"
        };
        println!(
            "| {size} B | {dir} | {} | {} | {} | {} | {} |",
            fmt(ap.map(|x| x / 1e6), 3),
            fmt(dp.map(|x| x / 1e6), 3),
            fmt(ag, 2),
            fmt(dg, 2),
            fmt(ratio, 2)
        );
    }
    println!();
}

// ---------------------------------------------------------------- part 2: guests

/// Build vtool (tests/guest/vtool.rs) and the default guest's initramfs with it appended.
fn initrd_with_vtool(guest_initrd: &Path, dir: &Path) -> Result<PathBuf, String> {
    use vireo_guests::default_guest::extra::{build_static_tool, initrd_with_files};
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/vtool.rs");
    let tool = dir.join("vtool");
    build_static_tool(&src, &tool).map_err(|e| e.to_string())?;
    let out = dir.join("initrd-vtool.cpio");
    initrd_with_files(guest_initrd, &[("bin/vtool", &tool)], &out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A VMM process whose console is collected.
struct Console {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Console {
    fn spawn(mut cmd: Command) -> Console {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn the VMM");
        let out = Arc::new(Mutex::new(String::new()));
        let (o, stdout) = (out.clone(), child.stdout.take().expect("stdout"));
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                o.lock().expect("console").push_str(&line);
                line.clear();
            }
        });
        Console { child, out }
    }

    /// The first console line containing `pat` (and not "listening"), waiting up to
    /// `timeout`; None also when the VMM exits first.
    fn wait_for(&mut self, pat: &str, timeout: Duration) -> Option<String> {
        let t = Instant::now();
        loop {
            let text = self.out.lock().expect("console").clone();
            if let Some(l) = text.lines().find(|l| {
                l.contains(pat) && (pat.contains("listening") || !l.contains("listening"))
            }) {
                return Some(l.to_string());
            }
            if t.elapsed() > timeout || matches!(self.child.try_wait(), Ok(Some(_))) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One guest run's figures.
#[derive(Default)]
struct GuestRun {
    rtt_ms: Option<f64>,
    h2g_mbs: Option<f64>,
    g2h_mbs: Option<f64>,
    vsock_h2g_mbs: Option<f64>,
    vsock_g2h_mbs: Option<f64>,
    vsock_conn_s: Option<f64>,
    /// Per transfer (host→guest, guest→host): the guest's virtio-net interrupts.
    irqs: [Option<Irqs>; 2],
    /// Per transfer: CPU time of the VMM's vCPU thread (ms).
    vcpu_ms: [Option<f64>; 2],
}

/// Guest interrupts of the virtio-net queues during one transfer (`/proc/interrupts`).
#[derive(Clone, Copy, Default)]
struct Irqs {
    rx: u64,
    tx: u64,
}

/// Shell function of the guest script: `irq TAG` prints `IRQ TAG <count> <name>` for each
/// virtio-net queue interrupt line of `/proc/interrupts` (one vCPU: one count column).
const IRQ_FN: &str = "irq(){ grep -E -- '-(input|output)[.]' /proc/interrupts | \
     while read n c r; do echo \"IRQ $1 $c ${r##* }\"; done; }; ";

/// Sum of the receive and transmit queues' interrupt counts at `tag` in the console text.
fn irq_counts(console: &str, tag: &str) -> Option<Irqs> {
    let mut out = Irqs::default();
    let mut seen = false;
    for l in console.lines() {
        let mut f = l.split_whitespace();
        if f.next() != Some("IRQ") || f.next() != Some(tag) {
            continue;
        }
        let (Some(Ok(n)), Some(name)) = (f.next().map(str::parse::<u64>), f.next()) else {
            continue;
        };
        seen = true;
        if name.contains("-input.") {
            out.rx += n;
        } else if name.contains("-output.") {
            out.tx += n;
        }
    }
    seen.then_some(out)
}

fn irq_delta(console: &str, from: &str, to: &str) -> Option<Irqs> {
    let (a, b) = (irq_counts(console, from)?, irq_counts(console, to)?);
    Some(Irqs {
        rx: b.rx.saturating_sub(a.rx),
        tx: b.tx.saturating_sub(a.tx),
    })
}

/// CPU time (ms) the VMM `pid`'s vCPU thread has used: vireo's `vcpu0`, QEMU's `CPU 0/TCG`
/// (or `ALL CPUs/TCG` when TCG runs all vCPUs on one thread) (`/proc/PID/task/TID/schedstat`,
/// first field in ns).
fn vcpu_cpu_ms(pid: u32) -> Option<f64> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = t.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm == "vcpu0" || comm.starts_with("CPU 0/") || comm.starts_with("ALL CPUs/") {
            let s = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
            return Some(ns / 1e6);
        }
    }
    None
}

fn number_after(line: &str, key: &str, index: usize) -> Option<f64> {
    line.split(key)
        .nth(1)?
        .split_whitespace()
        .nth(index)?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// Accept one TCP connection in the namespace and read it to EOF: MB/s.
fn tcp_sink_thread(path: String, addr: &'static str) -> std::thread::JoinHandle<Option<f64>> {
    std::thread::spawn(move || {
        enter(&path);
        // Any address: the TAP's host address may not exist yet.
        let l = std::net::TcpListener::bind(addr).ok()?;
        l.set_nonblocking(true).ok()?;
        let c = accept_within(|| l.accept().map(|(c, _)| c), Duration::from_secs(600))?;
        c.set_nonblocking(false).ok()?;
        let t = Instant::now();
        let n = sink(c);
        Some(n as f64 / t.elapsed().as_secs_f64() / 1e6)
    })
}

/// Accept with a deadline (`accept` on a non-blocking listener).
fn accept_within<T>(
    mut accept: impl FnMut() -> std::io::Result<T>,
    timeout: Duration,
) -> Option<T> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        match accept() {
            Ok(c) => return Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => return None,
        }
    }
    None
}

fn sink(mut c: impl Read) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    while let Ok(k) = c.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n
}

fn guest_run(
    ns: &Netns,
    vmm: &str,
    kernel: &Path,
    initrd: &Path,
    base_cmdline: &str,
    mib: u64,
    dir: &Path,
) -> GuestRun {
    let bytes = mib << 20;
    let vsock = vmm == "vireo";
    let mut script = format!(
        "{IRQ_FN}ping -c 20 -i 0.2 -W 2 10.0.0.1 | tail -1; irq a; vtool tcp-sink 5001; \
         irq b; vtool tcp-source 10.0.0.1:5002 {bytes}; irq c"
    );
    if vsock {
        script.push_str(&format!(
            "; vtool vsock-sink 1234; vtool vsock-source 2 5000 {bytes}; \
             vtool vsock-connects 2 5001 200"
        ));
    }
    script.push_str("; echo BENCH-DONE");
    let param = vireo_guests::default_guest::command_param(&["sh".into(), "-c".into(), script])
        .expect("command");
    let cmdline = format!("{base_cmdline} vireo.ip=eth0:10.0.0.2/24 {param}");
    let sock = dir.join("v.sock");
    let _ = std::fs::remove_file(&sock);
    let nspath = format!("/run/netns/{}", ns.0);
    let g2h = tcp_sink_thread(nspath.clone(), "0.0.0.0:5002");
    let mut cmd = if vmm == "vireo" {
        let mut c = ns.command(vireo_binary());
        c.args(["run", "--accel", "emu", "--memory", "256M", "--kernel"])
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd)
            .arg("--cmdline")
            .arg(&cmdline)
            .args(["--net", "tap=vb1,host-ip=10.0.0.1/24"])
            .arg("--vsock")
            .arg(format!("cid=3,socket={}", sock.display()));
        c
    } else {
        ns.ip(&["tuntap", "add", "vb1", "mode", "tap", "vnet_hdr"]);
        ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "vb1"]);
        ns.ip(&["link", "set", "vb1", "up"]);
        let mut c = ns.command(QEMU);
        qemu_pc(&mut c, "tcg", "256M")
            .args([
                // Thread names, to find the vCPU thread's CPU time.
                "-name",
                "debug-threads=on",
                "-netdev",
                "tap,id=n0,ifname=vb1,script=no,downscript=no,vhost=off",
                "-device",
                "virtio-net-pci,netdev=n0",
                "-kernel",
            ])
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(&cmdline);
        c
    };
    cmd.env_remove("VIREO_LOG");
    let mut vm = Console::spawn(cmd);
    let pid = vm.child.id();
    let mut r = GuestRun::default();
    let mut cpu = [None; 3];
    let t = Duration::from_secs(600);
    if let Some(l) = vm.wait_for("round-trip", t) {
        // round-trip min/avg/max = 0.9/1.2/2.0 ms
        r.rtt_ms = l
            .split('=')
            .nth(1)
            .and_then(|v| v.trim().split('/').nth(1))
            .and_then(|v| v.parse().ok());
    }
    if vm.wait_for("tcp-sink listening", t).is_some() {
        cpu[0] = vcpu_cpu_ms(pid);
        let p = nspath.clone();
        std::thread::spawn(move || {
            enter(&p);
            if let Ok(mut c) = std::net::TcpStream::connect("10.0.0.2:5001") {
                let buf = vec![0x5au8; 1 << 20];
                for _ in 0..mib {
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
            }
        });
        if let Some(l) = vm
            .wait_for("tcp-sink ", t)
            .filter(|l| !l.contains("listening"))
        {
            let n = number_after(&l, "tcp-sink", 0);
            let s = number_after(&l, "tcp-sink", 1);
            if let (Some(n), Some(s)) = (n, s) {
                r.h2g_mbs = Some(n / s / 1e6);
            }
        }
        cpu[1] = vcpu_cpu_ms(pid);
    }
    let _ = vm.wait_for("tcp-source", t);
    cpu[2] = vcpu_cpu_ms(pid);
    r.g2h_mbs = g2h.join().ok().flatten();
    for i in 0..2 {
        if let (Some(a), Some(b)) = (cpu[i], cpu[i + 1]) {
            r.vcpu_ms[i] = Some(b - a);
        }
    }
    if vsock {
        // Guest → host listeners: a sink on port 5000, a one-byte echo on 5001.
        let l5000 = UnixListener::bind(dir.join("v.sock_5000")).ok();
        let l5001 = UnixListener::bind(dir.join("v.sock_5001")).ok();
        let g2h_vsock = l5000.map(|l| {
            std::thread::spawn(move || {
                l.set_nonblocking(true).ok()?;
                let c = accept_within(|| l.accept().map(|(c, _)| c), Duration::from_secs(600))?;
                c.set_nonblocking(false).ok()?;
                let t = Instant::now();
                let n = sink(c);
                Some(n as f64 / t.elapsed().as_secs_f64() / 1e6)
            })
        });
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        if let Some(l) = l5001 {
            let (stop, served) = (stop.clone(), served.clone());
            let _ = l.set_nonblocking(true);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let mut b = [0u8; 1];
                            if c.read_exact(&mut b).is_ok() {
                                let _ = c.write_all(&b);
                            }
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            });
        }
        if vm.wait_for("vsock-sink listening", t).is_some() {
            if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&sock) {
                let _ = c.write_all(b"CONNECT 1234\n");
                let mut ok = [0u8; 1];
                // Skip the "OK <port>\n" line.
                while c.read_exact(&mut ok).is_ok() && ok[0] != b'\n' {}
                let buf = vec![0x5au8; 1 << 20];
                for _ in 0..mib {
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
            }
            if let Some(l) = vm
                .wait_for("vsock-sink ", t)
                .filter(|l| !l.contains("listening"))
            {
                if let (Some(n), Some(s)) = (
                    number_after(&l, "vsock-sink", 0),
                    number_after(&l, "vsock-sink", 1),
                ) {
                    r.vsock_h2g_mbs = Some(n / s / 1e6);
                }
            }
        }
        r.vsock_g2h_mbs = g2h_vsock.and_then(|h| h.join().ok().flatten());
        if let Some(l) = vm.wait_for("vsock-connects", t) {
            if let (Some(n), Some(s)) = (
                number_after(&l, "vsock-connects", 0),
                number_after(&l, "vsock-connects", 1),
            ) {
                r.vsock_conn_s = Some(n / s);
            }
        }
        stop.store(true, Ordering::SeqCst);
    }
    let _ = vm.wait_for("BENCH-DONE", t);
    {
        let text = vm.out.lock().expect("console");
        r.irqs = [irq_delta(&text, "a", "b"), irq_delta(&text, "b", "c")];
    }
    drop(vm);
    if vmm != "vireo" {
        ns.ip(&["link", "del", "vb1"]);
    }
    r
}

fn guest_part(args: &Args) {
    use vireo_guests::default_guest::{cache_dir, ensure, Options};
    let guest = match cache_dir().and_then(|c| ensure(&c, &Options::default())) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: the default guest: {e}");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("vireo-bench-net-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let initrd = match initrd_with_vtool(&guest.initrd, &dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: building vtool: {e}");
            return;
        }
    };
    let qemu = have(Path::new(QEMU));
    if !qemu {
        eprintln!("note: {QEMU} not found (apt-get install qemu-system-x86): vireo only");
    }
    let ns = Netns::new("guest");
    let mut vireo_runs = Vec::new();
    let mut qemu_runs = Vec::new();
    for _ in 0..args.runs {
        vireo_runs.push(guest_run(
            &ns,
            "vireo",
            &guest.kernel,
            &initrd,
            &guest.cmdline,
            args.mib,
            &dir,
        ));
        if qemu {
            qemu_runs.push(guest_run(
                &ns,
                "qemu",
                &guest.kernel,
                &initrd,
                &guest.cmdline,
                args.mib,
                &dir,
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let med = |runs: &[GuestRun], f: fn(&GuestRun) -> Option<f64>| {
        median(runs.iter().filter_map(f).collect())
    };
    println!(
        "bench/net part 2: default guest, 1 vCPU, 256 MiB; vireo --accel emu vs QEMU TCG \
         (pc, virtio-net-pci, tap vhost=off); {} runs, {} MiB per transfer, medians",
        args.runs, args.mib
    );
    println!();
    println!("| | ping RTT (ms) | TCP host→guest (MB/s) | TCP guest→host (MB/s) |");
    println!("|---|---:|---:|---:|");
    let cols: [fn(&GuestRun) -> Option<f64>; 3] = [|r| r.rtt_ms, |r| r.h2g_mbs, |r| r.g2h_mbs];
    let v: Vec<Option<f64>> = cols.iter().map(|f| med(&vireo_runs, *f)).collect();
    let q: Vec<Option<f64>> = cols.iter().map(|f| med(&qemu_runs, *f)).collect();
    println!(
        "| vireo emu | {} | {} | {} |",
        fmt(v[0], 2),
        fmt(v[1], 1),
        fmt(v[2], 1)
    );
    if qemu {
        println!(
            "| qemu tcg | {} | {} | {} |",
            fmt(q[0], 2),
            fmt(q[1], 1),
            fmt(q[2], 1)
        );
        let ratio = |i: usize, inverse: bool| match (v[i], q[i]) {
            (Some(a), Some(b)) if a > 0.0 && b > 0.0 => Some(if inverse { b / a } else { a / b }),
            _ => None,
        };
        println!(
            "| vireo/qemu (higher is better) | {} | {} | {} |",
            fmt(ratio(0, true), 2),
            fmt(ratio(1, false), 2),
            fmt(ratio(2, false), 2)
        );
    }
    println!();
    println!(
        "Per MiB moved (medians): the guest's virtio-net interrupts (receive queue, transmit \
         queue) and the vCPU thread's CPU time"
    );
    println!();
    println!("| | h→g rx irq | h→g tx irq | h→g vCPU ms | g→h rx irq | g→h tx irq | g→h vCPU ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let per_mib = |runs: &[GuestRun], f: &dyn Fn(&GuestRun) -> Option<f64>| {
        median(runs.iter().filter_map(f).collect()).map(|x| x / args.mib as f64)
    };
    let mut rows = vec![("vireo emu", &vireo_runs)];
    if qemu {
        rows.push(("qemu tcg", &qemu_runs));
    }
    for (name, runs) in rows {
        let mut cells = Vec::new();
        for d in 0..2 {
            cells.push(fmt(per_mib(runs, &|r| r.irqs[d].map(|i| i.rx as f64)), 2));
            cells.push(fmt(per_mib(runs, &|r| r.irqs[d].map(|i| i.tx as f64)), 2));
            cells.push(fmt(per_mib(runs, &|r| r.vcpu_ms[d]), 2));
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!();
    println!("vsock on vireo (guest helper vtool; host side through vireo's Unix socket):");
    println!();
    println!("| host→guest (MB/s) | guest→host (MB/s) | guest connections/s (connect, 1 byte each way, close) |");
    println!("|---:|---:|---:|");
    println!(
        "| {} | {} | {} |",
        fmt(med(&vireo_runs, |r| r.vsock_h2g_mbs), 1),
        fmt(med(&vireo_runs, |r| r.vsock_g2h_mbs), 1),
        fmt(med(&vireo_runs, |r| r.vsock_conn_s), 0)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_counts_are_summed_per_queue_kind_and_differenced() {
        let console = "IRQ a 10 virtio1-input.0\nIRQ a 4 virtio1-output.0\n\
                       noise IRQ a 99 virtio1-input.0\n\
                       IRQ b 25 virtio1-input.0\nIRQ b 9 virtio1-output.0\n\
                       IRQ b 3 virtio1-input.1\n";
        let d = irq_delta(console, "a", "b").unwrap();
        assert_eq!((d.rx, d.tx), (18, 5));
        assert!(irq_counts(console, "c").is_none());
    }
}
