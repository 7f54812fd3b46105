//! Helpers for the networking tests: network namespaces the test creates and always removes,
//! host-side sockets inside them, a running VM whose console is watched while the test acts,
//! ICMP echo, and the default guest's initramfs with the `vtool` helper added.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::common;

/// Why networking tests cannot run here (they need root, `ip` and /dev/net/tun), or None.
pub fn net_unavailable() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces and TAP devices)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no `ip` command (package iproute2)".into()),
    }
}

/// The default guest, built on first use (outside any namespace: it may need the network).
pub fn default_guest(test: &str) -> Option<vireo_guests::default_guest::DefaultGuest> {
    use vireo_guests::default_guest::{cache_dir, ensure, Options};
    let cache = cache_dir().ok()?;
    match ensure(&cache, &Options::default()) {
        Ok(g) => Some(g),
        Err(e) => {
            common::skip(test, &format!("cannot build the default guest: {e}"));
            None
        }
    }
}

/// A network namespace, deleted (with everything in it) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vireo-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = Netns { name };
        ns.cmd(&["netns", "add", &ns.name.clone()], false);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn cmd(&self, args: &[&str], inside: bool) {
        let mut c = Command::new("ip");
        if inside {
            c.args(["-n", &self.name]);
        }
        let o = c.args(args).output().expect("run ip");
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) {
        self.cmd(args, true);
    }

    /// Run `f` on a thread inside the namespace (sockets it creates live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns(2) on a namespace file this thread opened; it changes only this
            // thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A running VM whose console output is collected while the test goes on; killed if dropped
/// before it ends.
pub struct Vm {
    child: Option<Child>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    start: Instant,
}

fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

impl Vm {
    pub fn spawn(mut cmd: Command) -> Vm {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vireo");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), out.clone());
        collect(child.stderr.take().unwrap(), err.clone());
        Vm {
            child: Some(child),
            out,
            err,
            start: Instant::now(),
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Wait until the console shows `pat` (true), the VM exits or `timeout` passes (false).
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(pat) {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited {
                std::thread::sleep(Duration::from_millis(100));
                return self.stdout().contains(pat);
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the VM to end (killing it after `timeout`).
    pub fn finish(mut self, timeout: Duration) -> common::Outcome {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("running");
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait().ok();
                }
            }
        };
        std::thread::sleep(Duration::from_millis(100));
        common::Outcome {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            timed_out,
            elapsed: self.start.elapsed(),
        }
    }

    /// The process id of the vireo started (the outer one, with `--jail`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What happened so far, for assertion messages.
    pub fn report(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// RFC 1071 Internet checksum.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]);
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Set `SO_RCVTIMEO` of socket `fd` to `t`.
pub fn recv_timeout(fd: i32, t: Duration) {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid timeval for SO_RCVTIMEO on a socket the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}

/// A raw ICMP socket that sends echo requests (RFC 792) with identifier `id` and reads the
/// replies to them. Open it inside a namespace thread.
pub struct IcmpEcho {
    sock: std::fs::File,
    id: u16,
}

impl IcmpEcho {
    /// A socket whose reads give up after `timeout`.
    pub fn open(id: u16, timeout: Duration) -> IcmpEcho {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is ours; the File closes it.
        let sock = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        recv_timeout(fd, timeout);
        IcmpEcho { sock, id }
    }

    /// Send echo request `seq` carrying `payload` to `dst`.
    pub fn send(&self, dst: Ipv4Addr, seq: u16, payload: &[u8]) {
        let mut p = vec![8u8, 0, 0, 0];
        p.extend_from_slice(&self.id.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(payload);
        let c = inet_checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and sockaddr_in for the call.
        unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
    }

    /// Read one packet: the sequence number when it is an echo reply with our identifier,
    /// None for anything else or when the read times out.
    pub fn reply(&self) -> Option<u16> {
        let mut buf = [0u8; 1500];
        let n = (&self.sock).read(&mut buf).unwrap_or(0);
        if n < 28 {
            return None;
        }
        let ihl = usize::from(buf[0] & 0xf) * 4;
        let icmp = &buf[ihl.min(n)..n];
        (icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == self.id.to_be_bytes())
            .then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
    }
}

/// Send `count` ICMP echo requests to `dst` (RFC 792) from a raw socket; returns the number
/// of matching replies. Call inside a namespace thread.
pub fn ping(dst: Ipv4Addr, count: u16) -> u16 {
    let echo = IcmpEcho::open(
        (std::process::id() & 0xffff) as u16,
        Duration::from_millis(200),
    );
    let mut replies = 0;
    for seq in 0..count {
        echo.send(dst, seq, b"vireo ping payload 0123456789abcdef");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if echo.reply() == Some(seq) {
                replies += 1;
                break;
            }
        }
    }
    replies
}

/// `n` bytes of a reproducible pseudo-random stream (xorshift64*).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// MD5 (hex) of `data`, by the host's `md5sum` (the guest's busybox computes the same; MD5
/// checks integrity here, not authenticity, and costs the emulated guest a fifth of SHA-256).
pub fn md5_hex(data: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum (coreutils)");
    let mut stdin = c.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let o = c.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The guest's `/bin/vtool` (tests/guest/vtool.rs), built once per test process with the
/// toolchain's `rustc` as a static x86-64 Linux binary.
pub fn vtool() -> Option<PathBuf> {
    static TOOL: OnceLock<Option<PathBuf>> = OnceLock::new();
    TOOL.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/vtool.rs");
        let out =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vtool-{}", std::process::id()));
        if let Err(e) = vireo_guests::default_guest::extra::build_static_tool(&src, &out) {
            eprintln!("building vtool: {e}");
            return None;
        }
        Some(out)
    })
    .clone()
}

/// The default guest's initramfs with `/bin/vtool` appended (the kernel unpacks concatenated
/// newc archives in order).
pub fn initrd_with_vtool(test: &str) -> Option<PathBuf> {
    static INITRD: OnceLock<Option<PathBuf>> = OnceLock::new();
    let r = INITRD
        .get_or_init(|| {
            let g = default_guest("initrd_with_vtool")?;
            let tool = vtool()?;
            let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("initrd-vtool-{}.cpio", std::process::id()));
            vireo_guests::default_guest::extra::initrd_with_files(
                &g.initrd,
                &[("bin/vtool", &tool)],
                &out,
            )
            .ok()?;
            Some(out)
        })
        .clone();
    if r.is_none() {
        common::skip(test, "cannot build the guest's vtool (rustc, static glibc)");
    }
    r
}

/// A thread of a jailed VMM: its name, uid and how many seccomp filters it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailedThread {
    pub name: String,
    pub uid: String,
    pub seccomp_filters: u32,
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The threads of the jailed VMM under the outer vireo `outer` (its only child); empty if it
/// has none (not jailed, or gone).
pub fn jailed_threads(outer: u32) -> Vec<JailedThread> {
    let children =
        std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap_or_default();
    let Some(inner) = children.split_whitespace().next() else {
        return Vec::new();
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{inner}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            Some(JailedThread {
                name: status_field(&status, "Name"),
                uid: status_field(&status, "Uid"),
                seccomp_filters: status_field(&status, "Seccomp_filters")
                    .parse()
                    .unwrap_or(0),
            })
        })
        .collect()
}

/// Waits (up to 20 s) until the jailed VMM under `outer` has a thread whose name starts with
/// `prefix`, and returns it.
pub fn wait_for_jailed_thread(outer: u32, prefix: &str) -> Option<JailedThread> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(t) = jailed_threads(outer)
            .into_iter()
            .find(|t| t.name.starts_with(prefix))
        {
            return Some(t);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
