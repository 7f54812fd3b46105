//! Host back ends of virtio-net: a Linux TAP device (one file descriptor per queue pair,
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` for several pairs; see the
//! kernel's `Documentation/networking/tuntap.rst`), and a datagram socket pair with the same
//! framing for tests and benchmarks. Both carry one frame per `read`/`write`, preceded by the
//! 12-byte virtio-net header ([`super::hdr::VnetHeader`]).

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::hdr::VNET_HDR_LEN;

/// Longest interface name (IFNAMSIZ - 1).
pub const IFNAMSIZ: usize = 16;

/// What the device needs from a host back end: one frame-preserving file descriptor per
/// queue pair, and the knobs the driver's features turn.
pub trait NetBackend: Send + Sync {
    /// For logs.
    fn name(&self) -> &str;
    /// Queue pairs (file descriptors).
    fn queues(&self) -> usize;
    /// The non-blocking descriptor of queue pair `i`: `readv` gives one frame with its
    /// virtio-net header, `writev` sends one.
    fn queue_fd(&self, i: usize) -> RawFd;
    /// Offloads the host may use on frames it delivers (`TUN_F_*`).
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// Let the host deliver frames to queue pair `i` or not (multi-queue TAP attach/detach).
    fn set_queue_enabled(&self, i: usize, enabled: bool) -> io::Result<()>;
}

/// Why a TAP device cannot be used; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "invalid TAP name '{0}': use 1 to 15 characters without '/', ':', spaces or control \
         characters"
    )]
    BadName(String),
    #[error("TAP {name}: queues={queues} is out of range (1 to {max})")]
    BadQueues {
        name: String,
        queues: usize,
        max: usize,
    },
    #[error("cannot open /dev/net/tun: {0}; load the tun module (modprobe tun)")]
    NoTun(#[source] io::Error),
    #[error(
        "cannot open or create TAP {name}: permission denied; run vireo with CAP_NET_ADMIN, or \
         create the device beforehand: ip tuntap add {name} mode tap user $USER{mq}"
    )]
    Permission { name: String, mq: &'static str },
    #[error(
        "TAP {name} exists without multi_queue, which queues={queues} needs; recreate it with \
         `ip tuntap add {name} mode tap multi_queue` or use queues=1"
    )]
    NotMultiQueue { name: String, queues: usize },
    #[error("TAP {name} is in use by another process (busy)")]
    Busy { name: String },
    #[error("TAP {name}: {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Most queue pairs a TAP may be opened with (the kernel's MAX_TAP_QUEUES is 256).
pub const MAX_TAP_QUEUES: usize = 16;

/// `struct ifreq` (netdevice(7)): the interface name and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    /// `ifr_addr` as a `struct sockaddr_in`.
    fn set_inet(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }
}

fn ioctl_ifreq(fd: RawFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `req` is a valid, writable `struct ifreq` for the whole call; each request used
    // here (TUNSETIFF, TUNSETQUEUE, SIOC[GS]IF*) reads and writes at most sizeof(struct ifreq).
    let rc = unsafe { libc::ioctl(fd, request as _, req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_int(fd: RawFd, request: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd, request as _, value as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_int_ptr(fd: RawFd, request: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
    let v = value;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd, request as _, &v as *const libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A valid interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// A TAP device opened for virtio-net.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    multi_queue: bool,
    /// Opened and configured on the host by another process (a jailed VMM's parent) and
    /// handed over ([`hand_over`]): its host side is not this process's to configure.
    handed_over: bool,
}

/// TAPs opened before this process lost the right to open them (a jailed VMM, whose
/// parent opens them with CAP_NET_ADMIN in the host's network namespace and passes the
/// descriptors in), by interface name. [`Tap::open`] of one of these names uses them.
static HANDED_OVER: std::sync::Mutex<Vec<Tap>> = std::sync::Mutex::new(Vec::new());

/// Make `tap` (opened and configured by someone with the rights to) what [`Tap::open`] of its
/// name returns from now on in this process: a copy of its descriptors, whose host-side
/// configuration ([`Tap::set_up`], [`Tap::set_ipv4`]) is left alone. A second TAP of the same
/// name replaces the first.
pub fn hand_over(tap: Tap) {
    let mut list = HANDED_OVER.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|t| t.name != tap.name);
    list.push(tap);
}

/// A copy of the handed-over TAP `name`, if there is one; it must have `queues` queue pairs.
fn handed_over(name: &str, queues: usize) -> Option<Result<Tap, TapError>> {
    let list = HANDED_OVER.lock().unwrap_or_else(|e| e.into_inner());
    let tap = list.iter().find(|t| t.name == name)?;
    if tap.queues.len() != queues {
        return Some(Err(TapError::BadQueues {
            name: name.into(),
            queues,
            max: tap.queues.len(),
        }));
    }
    Some(tap.try_clone().map(|mut t| {
        t.handed_over = true;
        t
    }))
}

impl Tap {
    /// Open TAP `name` with `queues` queue pairs, creating it when it does not exist (that
    /// needs CAP_NET_ADMIN; a device vireo creates disappears when vireo exits). The header
    /// size is set to 12 bytes and offloads off until a driver negotiates them. A TAP of that
    /// name [handed over](hand_over) to this process is used instead of /dev/net/tun.
    pub fn open(name: &str, queues: usize) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        if queues == 0 || queues > MAX_TAP_QUEUES {
            return Err(TapError::BadQueues {
                name: name.into(),
                queues,
                max: MAX_TAP_QUEUES,
            });
        }
        if let Some(tap) = handed_over(name, queues) {
            let tap = tap?;
            tap.set_offload(0)
                .map_err(|e| tap.io("setting offloads", e))?;
            tracing::debug!(tap = name, queues, "using the TAP handed over");
            return Ok(tap);
        }
        let mut multi_queue = queues > 1;
        let mut files = Vec::with_capacity(queues);
        while files.len() < queues {
            let f = open_tun()?;
            let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            if multi_queue {
                flags |= libc::IFF_MULTI_QUEUE;
            }
            let mut req = IfReq::new(name);
            req.set_short(flags as i16);
            match ioctl_ifreq(f.as_raw_fd(), libc::TUNSETIFF as libc::c_ulong, &mut req) {
                Ok(()) => files.push(f),
                // An existing multi-queue device opened for one queue: attach as multi-queue.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !multi_queue => {
                    multi_queue = true;
                }
                Err(e) => return Err(tap_error(name, queues, e)),
            }
        }
        let tap = Tap {
            name: name.to_string(),
            queues: files,
            multi_queue,
            handed_over: false,
        };
        let fd = tap.queues[0].as_raw_fd();
        ioctl_int_ptr(
            fd,
            libc::TUNSETVNETHDRSZ as libc::c_ulong,
            VNET_HDR_LEN as i32,
        )
        .map_err(|e| tap.io("setting the vnet header size", e))?;
        tap.set_offload(0)
            .map_err(|e| tap.io("setting offloads", e))?;
        Ok(tap)
    }

    fn io(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Io {
            name: self.name.clone(),
            what,
            source,
        }
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.name
    }

    /// True when the device is a multi-queue TAP.
    pub fn multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// The same device on duplicated descriptors (`dup(2)` of each queue's).
    pub fn try_clone(&self) -> Result<Tap, TapError> {
        let queues = self
            .queues
            .iter()
            .map(|f| {
                f.try_clone()
                    .map_err(|e| self.io("duplicating a descriptor", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tap {
            name: self.name.clone(),
            queues,
            multi_queue: self.multi_queue,
            handed_over: self.handed_over,
        })
    }

    /// True when the TAP was [handed over](hand_over) by the process that opened it.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over
    }

    /// The descriptors of its queues, in order (to pass them to another process).
    pub fn queue_fds(&self) -> Vec<RawFd> {
        self.queues.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Bring the interface up on the host (`IFF_UP`), as `ip link set NAME up` does. Nothing
    /// to do on a handed-over TAP: the process that opened it configured it (this one may
    /// have neither the capability nor the network namespace to).
    pub fn set_up(&self) -> Result<(), TapError> {
        if self.handed_over {
            return Ok(());
        }
        let s = inet_socket().map_err(|e| self.io("socket", e))?;
        let mut req = IfReq::new(&self.name);
        ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFFLAGS as libc::c_ulong, &mut req)
            .map_err(|e| self.io("reading the interface flags", e))?;
        let flags = req.short() | libc::IFF_UP as i16;
        req.set_short(flags);
        ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFFLAGS as libc::c_ulong, &mut req)
            .map_err(|e| self.io("bringing the interface up", e))
    }

    /// Give the host side of the TAP an IPv4 address (`ip addr add ADDR/PREFIX dev NAME`,
    /// through SIOCSIFADDR and SIOCSIFNETMASK) and bring it up. Nothing to do on a
    /// handed-over TAP (see [`Tap::set_up`]).
    pub fn set_ipv4(&self, addr: Ipv4Addr, prefix: u8) -> Result<(), TapError> {
        if self.handed_over {
            return Ok(());
        }
        let s = inet_socket().map_err(|e| self.io("socket", e))?;
        let mut req = IfReq::new(&self.name);
        req.set_inet(addr);
        ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFADDR as libc::c_ulong, &mut req)
            .map_err(|e| self.io("setting the host address", e))?;
        let mut req = IfReq::new(&self.name);
        req.set_inet(Ipv4Addr::from(prefix_mask(prefix)));
        ioctl_ifreq(
            s.as_raw_fd(),
            libc::SIOCSIFNETMASK as libc::c_ulong,
            &mut req,
        )
        .map_err(|e| self.io("setting the host netmask", e))?;
        self.set_up()
    }
}

/// The netmask of an IPv4 prefix length (at most 32).
pub fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

fn open_tun() -> Result<File, TapError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::NoTun)
}

fn tap_error(name: &str, queues: usize, e: io::Error) -> TapError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
            name: name.into(),
            mq: if queues > 1 { " multi_queue" } else { "" },
        },
        Some(libc::EINVAL) => TapError::NotMultiQueue {
            name: name.into(),
            queues,
        },
        Some(libc::EBUSY) => TapError::Busy { name: name.into() },
        _ => TapError::Io {
            name: name.into(),
            what: "TUNSETIFF",
            source: e,
        },
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn queues(&self) -> usize {
        self.queues.len()
    }

    fn queue_fd(&self, i: usize) -> RawFd {
        self.queues.get(i).map(|f| f.as_raw_fd()).unwrap_or(-1)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        ioctl_int(
            self.queues[0].as_raw_fd(),
            libc::TUNSETOFFLOAD as libc::c_ulong,
            flags as libc::c_int,
        )
    }

    fn set_queue_enabled(&self, i: usize, enabled: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let Some(f) = self.queues.get(i) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mut req = IfReq::new("");
        req.set_short(if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        } as i16);
        match ioctl_ifreq(f.as_raw_fd(), libc::TUNSETQUEUE as libc::c_ulong, &mut req) {
            Ok(()) => Ok(()),
            // Already in that state.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A back end made of `SOCK_DGRAM` Unix socket pairs, one per queue pair: the device keeps
/// one end, [`SocketPairBackend::peers`] the other. Each datagram is a virtio-net header and a
/// frame, as on a TAP. For tests and the device-model benchmark.
pub struct SocketPairBackend {
    ours: Vec<OwnedFd>,
    peers: Vec<OwnedFd>,
    offload: std::sync::atomic::AtomicU32,
    enabled: Vec<std::sync::atomic::AtomicBool>,
}

impl SocketPairBackend {
    pub fn new(queues: usize) -> io::Result<Self> {
        let mut ours = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..queues {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
            let rc = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created and are owned here.
            unsafe {
                ours.push(OwnedFd::from_raw_fd(fds[0]));
                peers.push(OwnedFd::from_raw_fd(fds[1]));
            }
        }
        Ok(SocketPairBackend {
            ours,
            enabled: (0..queues)
                .map(|_| std::sync::atomic::AtomicBool::new(true))
                .collect(),
            peers,
            offload: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// The other ends: what a test or benchmark reads the guest's frames from and writes
    /// frames for the guest to.
    pub fn peers(&self) -> &[OwnedFd] {
        &self.peers
    }

    /// The offloads last set by the device.
    pub fn offload(&self) -> u32 {
        self.offload.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether queue pair `i` is enabled.
    pub fn queue_enabled(&self, i: usize) -> bool {
        self.enabled
            .get(i)
            .is_some_and(|e| e.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl NetBackend for SocketPairBackend {
    fn name(&self) -> &str {
        "socketpair"
    }
    fn queues(&self) -> usize {
        self.ours.len()
    }
    fn queue_fd(&self, i: usize) -> RawFd {
        self.ours.get(i).map(|f| f.as_raw_fd()).unwrap_or(-1)
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.offload
            .store(flags, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn set_queue_enabled(&self, i: usize, enabled: bool) -> io::Result<()> {
        if let Some(e) = self.enabled.get(i) {
            e.store(enabled, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Most iovecs one call takes (Linux UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// An iovec for host memory.
pub fn iovec_mut(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// An iovec for a slice of guest memory.
pub fn iovec_guest<B: BitmapSlice>(s: &VolatileSlice<'_, B>) -> libc::iovec {
    libc::iovec {
        iov_base: s.ptr_guard_mut().as_ptr().cast(),
        iov_len: s.len(),
    }
}

/// `readv(2)` of one frame into `iov` (at most [`IOV_MAX`] entries). The caller guarantees
/// every entry describes memory that stays valid and writable for the call: host buffers it
/// borrows, or guest memory (which stays mapped while the device runs).
pub fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let n = iov.len().min(IOV_MAX);
    // SAFETY: per this function's contract every iovec is valid writable memory; the kernel
    // writes at most iov_len bytes to each. Guest memory may be raced by the guest, which only
    // changes data the guest owns.
    let r = unsafe { libc::readv(fd, iov.as_ptr(), n as libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// `writev(2)` of one frame from `iov` (at most [`IOV_MAX`] entries); same contract as
/// [`readv`] but the memory is only read.
pub fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let n = iov.len().min(IOV_MAX);
    // SAFETY: as in `readv`; the kernel only reads the described memory.
    let r = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["tap0", "vireo-tap.1", "a", "012345678901234"] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a:b",
            "0123456789012345",
            "tab\t",
            "é",
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
        assert!(matches!(Tap::open("a/b", 1), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("tapx", 0),
            Err(TapError::BadQueues { .. })
        ));
        assert!(matches!(
            Tap::open("tapx", MAX_TAP_QUEUES + 1),
            Err(TapError::BadQueues { .. })
        ));
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(prefix_mask(200), u32::MAX);
    }

    #[test]
    fn socket_pairs_keep_frames() {
        let b = SocketPairBackend::new(2).unwrap();
        let frame = [7u8; 100];
        let mut iov = [libc::iovec {
            iov_base: frame.as_ptr() as *mut _,
            iov_len: frame.len(),
        }];
        assert_eq!(writev(b.queue_fd(1), &iov).unwrap(), 100);
        let mut got = [0u8; 200];
        iov[0] = iovec_mut(&mut got);
        assert_eq!(readv(b.peers()[1].as_raw_fd(), &iov).unwrap(), 100);
        assert_eq!(&got[..100], &frame[..]);
        let e = readv(b.queue_fd(0), &iov).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        b.set_queue_enabled(1, false).unwrap();
        assert!(!b.queue_enabled(1) && b.queue_enabled(0));
    }

    /// Run `f` on a thread of its own in a new, empty network namespace (root only).
    pub(crate) fn in_private_netns(test: &str, f: impl FnOnce() + Send + 'static) {
        let test = test.to_string();
        std::thread::spawn(move || {
            // SAFETY: unshare(2) with a constant flag; it only changes this thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "SKIP {test}: no private network namespace ({})",
                    io::Error::last_os_error()
                );
                return;
            }
            f()
        })
        .join()
        .unwrap();
    }

    fn if_flags(name: &str) -> Option<i16> {
        let s = inet_socket().ok()?;
        let mut req = IfReq::new(name);
        ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFFLAGS as libc::c_ulong, &mut req).ok()?;
        Some(req.short())
    }

    /// Root only, in a private network namespace: a TAP is created, configured and seen by the
    /// kernel, then disappears when closed (it is not persistent).
    #[test]
    fn tap_create_configure_and_vanish() {
        in_private_netns("tap_create_configure_and_vanish", || {
            let name = "vtap0";
            let tap = match Tap::open(name, 2) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("SKIP tap_create_configure_and_vanish: {e}");
                    return;
                }
            };
            assert!(tap.multi_queue());
            assert_eq!(tap.queues(), 2);
            let flags = if_flags(name).expect("the TAP exists");
            assert_eq!(flags & libc::IFF_UP as i16, 0);
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
                .unwrap();
            tap.set_queue_enabled(1, false).unwrap();
            tap.set_queue_enabled(1, true).unwrap();
            tap.set_ipv4(Ipv4Addr::new(10, 99, 0, 1), 24).unwrap();
            assert_ne!(if_flags(name).unwrap() & libc::IFF_UP as i16, 0);
            // A single-queue open of the multi-queue device attaches as multi-queue.
            let again = Tap::open(name, 1).unwrap();
            assert!(again.multi_queue());
            drop(again);
            drop(tap);
            assert_eq!(if_flags(name), None);
            // A single-queue device refuses a multi-queue open, with advice.
            let single = Tap::open("vtap1", 1).unwrap();
            assert!(!single.multi_queue());
            // Opened twice without multi-queue: the kernel says busy.
            let e = Tap::open("vtap1", 1).unwrap_err();
            assert!(matches!(e, TapError::Busy { .. }), "{e}");
            drop(single);
        });
    }

    /// Root only, in a private network namespace: a TAP handed over is what `Tap::open` of
    /// its name returns (its descriptors, not a new open), with the queue count it has, and
    /// its host side is left as the opener configured it.
    #[test]
    fn a_handed_over_tap_is_reused_not_reopened() {
        in_private_netns("a_handed_over_tap_is_reused_not_reopened", || {
            let name = "vtaph0";
            let tap = match Tap::open(name, 2) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("SKIP a_handed_over_tap_is_reused_not_reopened: {e}");
                    return;
                }
            };
            assert!(!tap.is_handed_over());
            let fds = tap.queue_fds();
            assert_eq!(fds.len(), 2);
            hand_over(tap);
            let e = Tap::open(name, 1).unwrap_err();
            assert!(
                matches!(
                    e,
                    TapError::BadQueues {
                        queues: 1,
                        max: 2,
                        ..
                    }
                ),
                "{e}"
            );
            let t = Tap::open(name, 2).unwrap();
            assert!(t.is_handed_over() && t.multi_queue());
            // Copies of the handed-over descriptors, attached to the device.
            assert!(t.queue_fds().iter().all(|fd| !fds.contains(fd)));
            for fd in t.queue_fds() {
                let mut req = IfReq::new("");
                ioctl_ifreq(fd, libc::TUNGETIFF as libc::c_ulong, &mut req).unwrap();
                assert_eq!(&req.name[..7], b"vtaph0\0");
            }
            // The host side is not touched: still down after set_ipv4.
            t.set_ipv4(Ipv4Addr::new(10, 99, 1, 1), 24).unwrap();
            assert_eq!(if_flags(name).unwrap() & libc::IFF_UP as i16, 0);
            t.set_offload(libc::TUN_F_CSUM).unwrap();
            t.set_queue_enabled(1, false).unwrap();
            drop(t);
            // The device lives while the handed-over copy does.
            assert!(if_flags(name).is_some());
            HANDED_OVER.lock().unwrap().retain(|t| t.name != name);
            assert_eq!(if_flags(name), None);
        });
    }
}
