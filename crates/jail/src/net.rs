//! Networking for a jail: a veth pair (veth(4)) between the host and the jail's network
//! namespace, configured over rtnetlink (rtnetlink(7)). Messages are built in fixed-size
//! buffers, so the jail's child can bring its own side up without allocating.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::str::FromStr;

use crate::sys;

/// `VETH_INFO_PEER` (linux/veth.h).
const VETH_INFO_PEER: u16 = 1;
/// `NLA_F_NESTED`.
const NLA_F_NESTED: u16 = 1 << 15;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTMSG_LEN: usize = 12;

/// An IPv4 address with its prefix length, written `10.0.0.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Whether `a` is in this network.
    pub fn contains(self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// The network's broadcast address.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// A default address for the host end: the first usable address of the network, or the
    /// second when the first is the jail's own.
    pub fn default_peer(self) -> Option<Ipv4Addr> {
        if self.prefix > 30 {
            return None;
        }
        let net = u32::from(self.addr) & self.mask();
        let first = net + 1;
        let pick = if first == u32::from(self.addr) {
            first + 1
        } else {
            first
        };
        Some(Ipv4Addr::from(pick))
    }
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid address '{s}': use an IPv4 address and prefix like 10.0.0.2/24");
        let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Ipv4Net> for String {
    fn from(n: Ipv4Net) -> String {
        n.to_string()
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A veth pair into the jail: `host_if` stays in the host's namespace with `host_addr`; its
/// peer appears in the jail as `eth0` with `addr`, and a default route via the host end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    /// The jail's address.
    pub addr: Ipv4Net,
    /// The host end's address (same prefix).
    pub host_addr: Ipv4Addr,
    /// The host-side interface name (at most 15 bytes).
    pub host_if: String,
}

impl NetSpec {
    /// Parses `ip=10.0.0.2/24[,host=10.0.0.1]`; the host end defaults to the first other
    /// address of the network.
    pub fn parse(s: &str, host_if: &str) -> Result<NetSpec, String> {
        let mut addr = None;
        let mut host = None;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some(("ip", v)) => addr = Some(v.parse::<Ipv4Net>()?),
                Some(("host", v)) => {
                    host = Some(v.parse::<Ipv4Addr>().map_err(|_| {
                        format!("invalid host address '{v}': use an IPv4 address like 10.0.0.1")
                    })?)
                }
                _ => {
                    return Err(format!(
                        "invalid network option '{item}': use ip=ADDR/PREFIX[,host=ADDR]"
                    ))
                }
            }
        }
        let addr = addr.ok_or("the network option needs ip=ADDR/PREFIX (e.g. ip=10.0.0.2/24)")?;
        let host_addr = match host {
            Some(h) => h,
            None => addr.default_peer().ok_or_else(|| {
                format!("{addr} has no room for a host address: use a prefix of /30 or shorter")
            })?,
        };
        if !addr.contains(host_addr) || host_addr == addr.addr {
            return Err(format!(
                "the host address {host_addr} must be another address in {addr}"
            ));
        }
        if addr.addr == addr.broadcast() || host_addr == addr.broadcast() {
            return Err(format!("{addr}: the broadcast address cannot be used"));
        }
        if host_if.is_empty() || host_if.len() >= libc::IFNAMSIZ {
            return Err(format!("interface name '{host_if}' must be 1 to 15 bytes"));
        }
        Ok(NetSpec {
            addr,
            host_addr,
            host_if: host_if.to_string(),
        })
    }
}

/// A netlink message under construction, in a fixed buffer.
pub(crate) struct Msg {
    buf: [u8; 512],
    len: usize,
    overflow: bool,
}

impl Msg {
    fn new(ty: u16, flags: u16) -> Msg {
        let mut m = Msg {
            buf: [0; 512],
            len: NLMSG_HDRLEN,
            overflow: false,
        };
        m.put_u16_at(4, ty);
        m.put_u16_at(
            6,
            flags | libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16,
        );
        m.put_u32_at(8, 1); // sequence number
        m
    }

    fn put_u16_at(&mut self, at: usize, v: u16) {
        self.buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u32_at(&mut self, at: usize, v: u32) {
        self.buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn bytes(&mut self, data: &[u8]) {
        let end = self.len + data.len();
        let padded = (end + 3) & !3;
        if padded > self.buf.len() {
            self.overflow = true;
            return;
        }
        self.buf[self.len..end].copy_from_slice(data);
        self.buf[end..padded].fill(0);
        self.len = padded;
    }

    /// `struct ifinfomsg`.
    fn ifinfo(&mut self, index: i32, flags: u32, change: u32) {
        let mut h = [0u8; IFINFOMSG_LEN];
        h[0] = libc::AF_UNSPEC as u8;
        h[4..8].copy_from_slice(&index.to_ne_bytes());
        h[8..12].copy_from_slice(&flags.to_ne_bytes());
        h[12..16].copy_from_slice(&change.to_ne_bytes());
        self.bytes(&h);
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        let mut h = [0u8; 4];
        h[..2].copy_from_slice(&len.to_ne_bytes());
        h[2..].copy_from_slice(&ty.to_ne_bytes());
        // The header is 4 bytes, so the data starts aligned; `bytes` pads the end.
        self.bytes(&h);
        self.bytes(data);
    }

    /// A NUL-terminated string attribute.
    fn attr_str(&mut self, ty: u16, s: &[u8]) {
        let mut tmp = [0u8; 64];
        let n = s.len().min(tmp.len() - 1);
        tmp[..n].copy_from_slice(&s[..n]);
        self.attr(ty, &tmp[..=n]);
    }

    /// Starts a nested attribute; returns its offset for [`Msg::end_nest`].
    fn nest(&mut self, ty: u16) -> usize {
        let at = self.len;
        self.attr(ty | NLA_F_NESTED, &[]);
        at
    }

    fn end_nest(&mut self, at: usize) {
        if self.overflow {
            return;
        }
        let len = (self.len - at) as u16;
        self.put_u16_at(at, len);
    }

    fn finish(&mut self) -> io::Result<&[u8]> {
        if self.overflow {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let len = self.len as u32;
        self.put_u32_at(0, len);
        Ok(&self.buf[..self.len])
    }
}

/// An rtnetlink socket in the caller's network namespace.
pub(crate) struct Netlink(OwnedFd);

impl Netlink {
    pub(crate) fn open() -> io::Result<Netlink> {
        sys::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE).map(Netlink)
    }

    /// Sends `msg` and waits for the kernel's acknowledgement.
    fn request(&self, msg: &mut Msg) -> io::Result<()> {
        let fd = self.0.as_raw_fd();
        let data = msg.finish()?;
        // SAFETY: all-zero is a valid sockaddr_nl addressing the kernel (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and address are valid for the lengths passed.
        let rc = unsafe {
            libc::sendto(
                fd,
                data.as_ptr().cast(),
                data.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 1024];
        loop {
            let n = sys::read(fd, &mut reply)?;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = u32::from_ne_bytes([
                    reply[off],
                    reply[off + 1],
                    reply[off + 2],
                    reply[off + 3],
                ]) as usize;
                let ty = u16::from_ne_bytes([reply[off + 4], reply[off + 5]]);
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(io::ErrorKind::InvalidData.into());
                }
                if ty == libc::NLMSG_ERROR as u16 {
                    if len < NLMSG_HDRLEN + 4 {
                        return Err(io::ErrorKind::InvalidData.into());
                    }
                    let b = &reply[off + NLMSG_HDRLEN..off + NLMSG_HDRLEN + 4];
                    let code = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                off += (len + 3) & !3;
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Creates veth `host` here and its peer `peer` directly in the network namespace of
    /// process `peer_pid`.
    pub(crate) fn create_veth(&self, host: &str, peer: &str, peer_pid: i32) -> io::Result<()> {
        let mut m = veth_msg(host.as_bytes(), peer.as_bytes(), peer_pid);
        self.request(&mut m)
    }

    /// Sets link `index` up.
    pub(crate) fn link_up(&self, index: i32) -> io::Result<()> {
        let mut m = Msg::new(libc::RTM_NEWLINK, 0);
        m.ifinfo(index, libc::IFF_UP as u32, libc::IFF_UP as u32);
        self.request(&mut m)
    }

    /// Deletes link `name` (and, for a veth, its peer).
    pub(crate) fn delete_link(&self, name: &str) -> io::Result<()> {
        let mut m = Msg::new(libc::RTM_DELLINK, 0);
        m.ifinfo(0, 0, 0);
        m.attr_str(libc::IFLA_IFNAME, name.as_bytes());
        self.request(&mut m)
    }

    /// Adds `addr` to link `index`.
    pub(crate) fn add_addr(&self, index: i32, addr: Ipv4Net) -> io::Result<()> {
        let mut m = addr_msg(index, addr);
        self.request(&mut m)
    }

    /// Adds a default route via `gateway`.
    pub(crate) fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = route_msg(gateway);
        self.request(&mut m)
    }
}

fn veth_msg(host: &[u8], peer: &[u8], peer_pid: i32) -> Msg {
    let mut m = Msg::new(
        libc::RTM_NEWLINK,
        (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
    );
    m.ifinfo(0, 0, 0);
    m.attr_str(libc::IFLA_IFNAME, host);
    let info = m.nest(libc::IFLA_LINKINFO);
    m.attr_str(libc::IFLA_INFO_KIND, b"veth");
    let data = m.nest(libc::IFLA_INFO_DATA);
    let p = m.nest(VETH_INFO_PEER);
    m.ifinfo(0, 0, 0);
    m.attr_str(libc::IFLA_IFNAME, peer);
    m.attr(libc::IFLA_NET_NS_PID, &(peer_pid as u32).to_ne_bytes());
    m.end_nest(p);
    m.end_nest(data);
    m.end_nest(info);
    m
}

fn addr_msg(index: i32, addr: Ipv4Net) -> Msg {
    let mut m = Msg::new(
        libc::RTM_NEWADDR,
        (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
    );
    let mut h = [0u8; IFADDRMSG_LEN];
    h[0] = libc::AF_INET as u8;
    h[1] = addr.prefix;
    h[3] = libc::RT_SCOPE_UNIVERSE;
    h[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    m.bytes(&h);
    m.attr(libc::IFA_LOCAL, &addr.addr.octets());
    m.attr(libc::IFA_ADDRESS, &addr.addr.octets());
    if addr.prefix < 31 {
        m.attr(libc::IFA_BROADCAST, &addr.broadcast().octets());
    }
    m
}

fn route_msg(gateway: Ipv4Addr) -> Msg {
    let mut m = Msg::new(
        libc::RTM_NEWROUTE,
        (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
    );
    let mut h = [0u8; RTMSG_LEN];
    h[0] = libc::AF_INET as u8;
    h[4] = libc::RT_TABLE_MAIN;
    h[5] = libc::RTPROT_BOOT;
    h[6] = libc::RT_SCOPE_UNIVERSE;
    h[7] = libc::RTN_UNICAST;
    m.bytes(&h);
    m.attr(libc::RTA_GATEWAY, &gateway.octets());
    m
}

/// Creates the veth pair for a jail whose init is `pid` and configures the host end. The
/// returned guard deletes the pair when dropped (the kernel also deletes it when the jail's
/// network namespace goes away).
pub(crate) fn setup_host(spec: &NetSpec, pid: i32) -> io::Result<VethGuard> {
    let nl = Netlink::open()?;
    nl.create_veth(&spec.host_if, PEER_NAME, pid)?;
    let guard = VethGuard(Some(spec.host_if.clone()));
    let index = sys::if_index(spec.host_if.as_bytes())?;
    nl.add_addr(
        index,
        Ipv4Net {
            addr: spec.host_addr,
            prefix: spec.addr.prefix,
        },
    )?;
    nl.link_up(index)?;
    Ok(guard)
}

/// The jail's end of the veth pair.
pub const PEER_NAME: &str = "eth0";

/// The jail's side, run by its child in the new namespace (allocation-free): loopback up and,
/// with `net`, `eth0` addressed and up with a default route via the host end.
pub(crate) fn setup_jail(net: Option<(Ipv4Net, Ipv4Addr)>) -> io::Result<()> {
    let nl = Netlink::open()?;
    // The loopback device is always index 1 (LOOPBACK_IFINDEX).
    nl.link_up(1)?;
    if let Some((addr, gateway)) = net {
        let index = sys::if_index(PEER_NAME.as_bytes())?;
        nl.add_addr(index, addr)?;
        nl.link_up(index)?;
        nl.add_default_route(gateway)?;
    }
    Ok(())
}

/// Deletes a host interface on drop unless disarmed.
#[derive(Debug)]
pub struct VethGuard(Option<String>);

impl VethGuard {
    /// Forget the interface (it is gone, or someone else cleans up).
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for VethGuard {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            let _ = delete_link(&name);
        }
    }
}

/// Deletes host interface `name`; a link that no longer exists is not an error.
pub fn delete_link(name: &str) -> io::Result<()> {
    match Netlink::open()?.delete_link(name) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// Whether host interface `name` exists.
pub fn link_exists(name: &str) -> bool {
    sys::if_index(name.as_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks() {
        let n: Ipv4Net = "10.0.0.2/24".parse().unwrap();
        assert_eq!(n.addr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(n.prefix, 24);
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 0, 0, 255));
        assert_eq!(n.default_peer(), Some(Ipv4Addr::new(10, 0, 0, 1)));
        let one: Ipv4Net = "10.0.0.1/24".parse().unwrap();
        assert_eq!(one.default_peer(), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(n.contains(Ipv4Addr::new(10, 0, 0, 200)));
        assert!(!n.contains(Ipv4Addr::new(10, 0, 1, 1)));
        for bad in ["10.0.0.2", "10.0.0.2/33", "10.0.0/24", "x/24"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        assert_eq!(n.to_string(), "10.0.0.2/24");
    }

    #[test]
    fn net_specs() {
        let s = NetSpec::parse("ip=10.1.2.3/24", "vr-abc").unwrap();
        assert_eq!(s.host_addr, Ipv4Addr::new(10, 1, 2, 1));
        let s = NetSpec::parse("ip=10.1.2.3/24,host=10.1.2.9", "vr-abc").unwrap();
        assert_eq!(s.host_addr, Ipv4Addr::new(10, 1, 2, 9));
        for (bad, why) in [
            ("", "needs ip="),
            ("ip=10.1.2.3/24,host=10.9.9.9", "must be another address"),
            ("ip=10.1.2.3/24,host=10.1.2.3", "must be another address"),
            ("ip=10.1.2.3/32", "no room"),
            ("ip=10.1.2.255/24", "broadcast"),
            ("mtu=9000", "invalid network option"),
        ] {
            let e = NetSpec::parse(bad, "vr-x").unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(NetSpec::parse("ip=10.0.0.2/24", "a-very-long-interface").is_err());
    }

    fn attr_at(buf: &[u8], off: usize) -> (u16, u16) {
        (
            u16::from_ne_bytes([buf[off], buf[off + 1]]),
            u16::from_ne_bytes([buf[off + 2], buf[off + 3]]),
        )
    }

    #[test]
    fn veth_message_layout() {
        let mut m = veth_msg(b"vr-1", b"eth0", 4242);
        let b = m.finish().unwrap().to_vec();
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), libc::RTM_NEWLINK);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        for f in [
            libc::NLM_F_REQUEST,
            libc::NLM_F_ACK,
            libc::NLM_F_CREATE,
            libc::NLM_F_EXCL,
        ] {
            assert_ne!(flags & f as u16, 0);
        }
        // ifinfomsg, then IFLA_IFNAME "vr-1\0" (len 9, padded to 12).
        let off = NLMSG_HDRLEN + IFINFOMSG_LEN;
        assert_eq!(attr_at(&b, off), (9, libc::IFLA_IFNAME));
        assert_eq!(&b[off + 4..off + 9], b"vr-1\0");
        // IFLA_LINKINFO nests to the end of the message.
        let info = off + 12;
        let (len, ty) = attr_at(&b, info);
        assert_eq!(ty, libc::IFLA_LINKINFO | NLA_F_NESTED);
        assert_eq!(info + len as usize, b.len());
        // The peer's namespace PID is the last attribute.
        let pid = u32::from_ne_bytes(b[b.len() - 4..].try_into().unwrap());
        assert_eq!(pid, 4242);
        assert_eq!(attr_at(&b, b.len() - 8), (8, libc::IFLA_NET_NS_PID));
    }

    #[test]
    fn addr_and_route_messages() {
        let mut m = addr_msg(7, "192.168.5.2/24".parse().unwrap());
        let b = m.finish().unwrap().to_vec();
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), libc::RTM_NEWADDR);
        let h = NLMSG_HDRLEN;
        assert_eq!(b[h], libc::AF_INET as u8);
        assert_eq!(b[h + 1], 24);
        assert_eq!(u32::from_ne_bytes(b[h + 4..h + 8].try_into().unwrap()), 7);
        assert_eq!(attr_at(&b, h + 8), (8, libc::IFA_LOCAL));
        assert_eq!(&b[h + 12..h + 16], &[192, 168, 5, 2]);
        assert_eq!(&b[b.len() - 4..], &[192, 168, 5, 255], "broadcast last");
        let mut r = route_msg(Ipv4Addr::new(192, 168, 5, 1));
        let b = r.finish().unwrap().to_vec();
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), libc::RTM_NEWROUTE);
        assert_eq!(b[NLMSG_HDRLEN + 4], libc::RT_TABLE_MAIN);
        assert_eq!(&b[b.len() - 4..], &[192, 168, 5, 1]);
    }

    #[test]
    fn oversized_message_is_refused() {
        let mut m = Msg::new(libc::RTM_NEWLINK, 0);
        for _ in 0..20 {
            m.attr_str(libc::IFLA_IFNAME, &[b'x'; 60]);
        }
        assert!(m.finish().is_err());
    }

    /// Deleting a link that does not exist is fine (clean-up after the kernel did it).
    #[test]
    fn deleting_a_missing_link_is_ok() {
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP deleting_a_missing_link_is_ok: needs root");
            return;
        }
        delete_link("vr-nonexistent").unwrap();
        assert!(!link_exists("vr-nonexistent"));
        assert!(link_exists("lo"));
    }
}
