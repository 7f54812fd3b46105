//! Network and vsock configuration (`--net`, `--vsock`), and opening their host back ends once
//! per VMM: TAP devices (kept open across guest reboots, like disks) and the vsock Unix
//! socket.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vireo_virtio::net::tap::MAX_TAP_QUEUES;
use vireo_virtio::{MacAddr, Tap, VsockBackend};

use crate::config::split_options;
use crate::Error;

/// An IPv4 address with a prefix length: `10.0.2.15/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid address '{s}': use ADDR/PREFIX, like 10.0.2.15/24");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(Ipv4Net);

/// A MAC address as configuration text (`52:54:00:12:34:56`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub MacAddr);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let m: MacAddr = s.parse()?;
        if !m.is_unicast() {
            return Err(format!(
                "MAC address {m} is multicast or zero; a NIC needs a unicast address \
                 (first octet even), e.g. 52:54:00:12:34:56"
            ));
        }
        Ok(Mac(m))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
serde_as_string!(Mac);

/// One virtio-net device on a host TAP:
/// `tap=NAME[,mac=MAC][,queues=N][,host-ip=ADDR/PREFIX][,ip=ADDR/PREFIX][,gw=GW]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP device, opened if it exists, created otherwise.
    pub tap: String,
    /// The guest's MAC address; random (locally administered) when not given.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// Queue pairs (a multi-queue TAP when more than 1).
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Address vireo gives the host side of the TAP (and brings it up); needs CAP_NET_ADMIN.
    #[serde(default, rename = "host-ip")]
    pub host_ip: Option<Ipv4Net>,
    /// The guest's address, for the default guest's init (kernel parameter `vireo.ip=`).
    #[serde(default)]
    pub ip: Option<Ipv4Net>,
    /// The guest's default gateway, with `ip`.
    #[serde(default)]
    pub gw: Option<Ipv4Addr>,
}

fn default_queues() -> u16 {
    1
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            "use tap=NAME[,mac=MAC][,queues=N][,host-ip=ADDR/PREFIX][,ip=ADDR/PREFIX][,gw=ADDR]";
        let mut n = NetConfig {
            tap: String::new(),
            mac: None,
            queues: 1,
            host_ip: None,
            ip: None,
            gw: None,
        };
        for part in split_options(s) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("--net: unknown option '{part}': {usage}"));
            };
            let err = |e: String| format!("--net {k}={v}: {e}");
            match k {
                "tap" => {
                    if !vireo_virtio::net::tap::valid_ifname(v) {
                        return Err(err(
                            "an interface name is 1 to 15 characters without '/', ':' or spaces"
                                .into(),
                        ));
                    }
                    n.tap = v.to_string();
                }
                "mac" => n.mac = Some(v.parse().map_err(err)?),
                "queues" => {
                    let q: u16 = v.parse().map_err(|_| err("not a number".into()))?;
                    if q == 0 || usize::from(q) > MAX_TAP_QUEUES {
                        return Err(err(format!("use 1 to {MAX_TAP_QUEUES} queue pairs")));
                    }
                    n.queues = q;
                }
                "host-ip" => n.host_ip = Some(v.parse().map_err(err)?),
                "ip" => n.ip = Some(v.parse().map_err(err)?),
                "gw" => n.gw = Some(v.parse().map_err(|_| err("not an IPv4 address".into()))?),
                _ => return Err(format!("--net: unknown option '{part}': {usage}")),
            }
        }
        if n.tap.is_empty() {
            return Err(format!("--net needs tap=NAME: {usage}"));
        }
        if n.gw.is_some() && n.ip.is_none() {
            return Err("--net gw= needs ip=ADDR/PREFIX too".into());
        }
        Ok(n)
    }
}

impl NetConfig {
    /// What `--net` checks, for configurations from elsewhere (a JSON file, the API).
    pub fn validate(&self) -> Result<(), String> {
        if !vireo_virtio::net::tap::valid_ifname(&self.tap) {
            return Err(format!(
                "net tap {:?}: an interface name is 1 to 15 characters without '/', ':' or \
                 spaces",
                self.tap
            ));
        }
        if self.queues == 0 || usize::from(self.queues) > MAX_TAP_QUEUES {
            return Err(format!(
                "net tap {}: queues {}: use 1 to {MAX_TAP_QUEUES} queue pairs",
                self.tap, self.queues
            ));
        }
        if self.gw.is_some() && self.ip.is_none() {
            return Err(format!("net tap {}: gw needs ip too", self.tap));
        }
        Ok(())
    }

    /// The default guest's kernel parameter for the `index`-th interface (`eth<index>`), when
    /// an address is configured: `vireo.ip=ethN:ADDR/PREFIX[,gw=GW]` (the format the guest's
    /// init reads, `vireo_guests::default_guest::init`).
    pub fn guest_param(&self, index: usize) -> Option<String> {
        let ip = self.ip?;
        let mut p = format!("vireo.ip=eth{index}:{ip}");
        if let Some(gw) = self.gw {
            p.push_str(&format!(",gw={gw}"));
        }
        Some(p)
    }
}

/// Lowest guest context ID (0-2 are the hypervisor, local and host; virtio 1.2 §5.10.4).
pub const MIN_GUEST_CID: u32 = 3;

/// The vsock device: `cid=N,socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 to 0xfffffffe).
    pub cid: u32,
    /// The host's Unix socket: host programs connect here (`CONNECT <port>\n`); the guest's
    /// connections to host port P go to `PATH_P`.
    pub socket: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use cid=N,socket=PATH (N from 3 to 4294967294)";
        let mut cid = None;
        let mut socket = None;
        for part in split_options(s) {
            match part.split_once('=') {
                Some(("cid", v)) => {
                    let c: u32 = v
                        .parse()
                        .map_err(|_| format!("--vsock cid={v}: not a number; {usage}"))?;
                    if c < MIN_GUEST_CID || c == u32::MAX {
                        return Err(format!("--vsock cid={v}: out of range; {usage}"));
                    }
                    cid = Some(c);
                }
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => return Err(format!("--vsock: unknown option '{part}': {usage}")),
            }
        }
        match (cid, socket) {
            (Some(cid), Some(socket)) => Ok(VsockConfig { cid, socket }),
            _ => Err(format!("--vsock needs both cid= and socket=: {usage}")),
        }
    }
}

impl VsockConfig {
    /// What `--vsock` checks, for configurations from elsewhere (a JSON file, the API).
    pub fn validate(&self) -> Result<(), String> {
        if self.cid < MIN_GUEST_CID || self.cid == u32::MAX {
            return Err(format!(
                "vsock cid {}: use 3 to 4294967294 (0-2 are reserved)",
                self.cid
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err("vsock socket: empty path".into());
        }
        Ok(())
    }
}

/// A TAP opened for one `--net`, with the MAC address the guest gets on every boot.
pub(crate) struct OpenNet {
    pub(crate) tap: Arc<Tap>,
    pub(crate) mac: MacAddr,
}

/// Open every TAP of `nets`, in order; configure the host side as asked.
pub(crate) fn open_nets(nets: &[NetConfig]) -> Result<Vec<OpenNet>, Error> {
    let mut seen = std::collections::HashSet::new();
    nets.iter()
        .map(|n| {
            if !seen.insert(n.tap.as_str()) {
                return Err(Error::Net(format!(
                    "TAP {} is given twice; use queues=N for several queues on one device",
                    n.tap
                )));
            }
            let tap =
                Tap::open(&n.tap, usize::from(n.queues)).map_err(|e| Error::Net(e.to_string()))?;
            match n.host_ip {
                Some(net) => tap
                    .set_ipv4(net.addr, net.prefix)
                    .map_err(|e| Error::Net(e.to_string()))?,
                None => {
                    if let Err(e) = tap.set_up() {
                        tracing::warn!("{e}; bring it up yourself (ip link set {} up)", n.tap);
                    }
                }
            }
            Ok(OpenNet {
                tap: Arc::new(tap),
                mac: n.mac.map(|m| m.0).unwrap_or_else(MacAddr::random),
            })
        })
        .collect()
}

/// The host ends of a configuration's network devices: its TAPs and its vsock socket, open
/// while the VMM holds the configuration (across guest reboots, pauses and snapshots).
#[derive(Default)]
pub(crate) struct NetBackends {
    pub(crate) nets: Vec<OpenNet>,
    pub(crate) vsock: Option<Arc<VsockBackend>>,
}

impl NetBackends {
    /// Open every TAP of `config` and bind its vsock socket. A MAC address chosen at random
    /// is written back into `config`, so that every boot, and a snapshot's restore, gives
    /// the guest the same one.
    pub(crate) fn open(config: &mut crate::config::VmConfig) -> Result<Self, Error> {
        for n in &config.nets {
            n.validate().map_err(Error::Net)?;
        }
        if let Some(v) = &config.vsock {
            v.validate().map_err(Error::Net)?;
        }
        let nets = open_nets(&config.nets)?;
        for (c, n) in config.nets.iter_mut().zip(&nets) {
            c.mac = Some(Mac(n.mac));
        }
        let vsock = config.vsock.as_ref().map(open_vsock).transpose()?;
        Ok(NetBackends { nets, vsock })
    }
}

/// Bind the vsock device's Unix socket.
pub(crate) fn open_vsock(v: &VsockConfig) -> Result<Arc<VsockBackend>, Error> {
    VsockBackend::bind(&v.socket)
        .map(Arc::new)
        .map_err(|e| Error::Net(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.queues, 1);
        assert_eq!(n.guest_param(0), None);
        let n: NetConfig =
            "tap=vt1,mac=52:54:00:00:00:01,queues=4,host-ip=10.0.0.1/24,ip=10.0.0.2/24,gw=10.0.0.1"
                .parse()
                .unwrap();
        assert_eq!(n.queues, 4);
        assert_eq!(n.mac.unwrap().0 .0, [0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(n.host_ip.unwrap().to_string(), "10.0.0.1/24");
        assert_eq!(
            n.guest_param(1).unwrap(),
            "vireo.ip=eth1:10.0.0.2/24,gw=10.0.0.1"
        );
        for bad in [
            "",
            "tap0",
            "mac=52:54:00:00:00:01",
            "tap=",
            "tap=a/b",
            "tap=t,queues=0",
            "tap=t,queues=17",
            "tap=t,queues=x",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=52:54",
            "tap=t,ip=10.0.0.2",
            "tap=t,ip=10.0.0.2/33",
            "tap=t,ip=10.0.0.256/24",
            "tap=t,gw=10.0.0.1",
            "tap=t,ip=10.0.0.2/24,gw=x",
            "tap=t,speed=10",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn net_config_json_round_trip() {
        let n: NetConfig = "tap=t,mac=52:54:00:00:00:01,ip=10.1.2.3/8,host-ip=10.0.0.1/8"
            .parse()
            .unwrap();
        let j = serde_json::to_string(&n).unwrap();
        assert!(
            j.contains("\"52:54:00:00:00:01\"") && j.contains("\"host-ip\""),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<NetConfig>(&j).unwrap(), n);
        let d: NetConfig = serde_json::from_str(r#"{"tap":"x"}"#).unwrap();
        assert_eq!(d.queues, 1);
    }

    #[test]
    fn configurations_from_json_are_checked_like_flags() {
        let n: NetConfig = serde_json::from_str(r#"{"tap":"vt0","queues":0}"#).unwrap();
        assert!(n.validate().unwrap_err().contains("queues"));
        let n: NetConfig = serde_json::from_str(r#"{"tap":"a/b"}"#).unwrap();
        assert!(n.validate().is_err());
        let n: NetConfig = serde_json::from_str(r#"{"tap":"vt0","gw":"10.0.0.1"}"#).unwrap();
        assert!(n.validate().is_err());
        let n: NetConfig = serde_json::from_str(r#"{"tap":"vt0","queues":4}"#).unwrap();
        assert_eq!(n.validate(), Ok(()));
        let v: VsockConfig = serde_json::from_str(r#"{"cid":2,"socket":"/s"}"#).unwrap();
        assert!(v.validate().is_err());
        let v: VsockConfig = serde_json::from_str(r#"{"cid":3,"socket":"/s"}"#).unwrap();
        assert_eq!(v.validate(), Ok(()));
        // Refused before anything is opened.
        let mut c = crate::config::VmConfig::new("/k");
        c.vsock = Some(VsockConfig {
            cid: 1,
            socket: "/nonexistent/dir/s".into(),
        });
        assert!(NetBackends::open(&mut c).is_err());
    }

    #[test]
    fn vsock_options_parse() {
        let v: VsockConfig = "cid=3,socket=/run/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        assert_eq!(v.socket, PathBuf::from("/run/v.sock"));
        let v: VsockConfig = "socket=/a,,b,cid=4294967294".parse().unwrap();
        assert_eq!(v.socket, PathBuf::from("/a,b"));
        for bad in [
            "",
            "cid=3",
            "socket=/x",
            "cid=2,socket=/x",
            "cid=4294967295,socket=/x",
            "cid=-1,socket=/x",
            "cid=3,socket=",
            "cid=3,socket=/x,port=5",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }
}
