//! `VmConfig`: the one description of a VM, shared by the CLI, config files and the API.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most vCPUs vireo gives a VM (APIC IDs must fit the xAPIC's 8 bits and the MADT's
/// processor entries).
pub const MAX_VCPUS: u32 = 254;

/// Which `hv` backend runs the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware-assisted virtualization through `/dev/kvm`.
    Kvm,
    /// vireo's software x86-64 CPU.
    Emu,
    /// KVM when it is usable and hardware-backed, otherwise the emulator.
    #[default]
    Auto,
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "emu" => Ok(Accel::Emu),
            "auto" => Ok(Accel::Auto),
            other => Err(format!(
                "unknown accelerator '{other}': use kvm, emu or auto"
            )),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Emu => "emu",
            Accel::Auto => "auto",
        })
    }
}

/// A size in bytes, written like `256M`, `2G`, `512K` or `1073741824B`; a bare number means
/// MiB (as QEMU's `-m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        vireo_jail::cgroup::parse_size_with_default_shift(s, 20).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if b >= 1 << shift && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: bzImage or ELF.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest RAM.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    #[serde(default)]
    pub accel: Accel,
    /// On a guest reset, exit instead of restarting the VM.
    #[serde(default)]
    pub no_reboot: bool,
    /// virtio-blk disks, in PCI order (the first is the guest's `/dev/vda`).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device fed from the host's `getrandom`.
    #[serde(default = "default_rng")]
    pub rng: bool,
    /// virtio-net devices on host TAPs, in PCI order (the first is the guest's `eth0`).
    #[serde(default)]
    pub nets: Vec<crate::net::NetConfig>,
    /// A virtio-vsock device whose host side is a Unix socket.
    #[serde(default)]
    pub vsock: Option<crate::net::VsockConfig>,
}

fn default_rng() -> bool {
    true
}

/// Split `a=1,b=2` at single commas; `,,` is a literal comma (as in QEMU's options), so any
/// path can be given.
pub(crate) fn split_options(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            }
            ',' => parts.push(String::new()),
            c => {
                if let Some(p) = parts.last_mut() {
                    p.push(c);
                }
            }
        }
    }
    parts
}

/// One virtio-blk disk: `path=FILE[,readonly=on][,serial=STR][,direct=on]` on the command
/// line (a bare `FILE` is the path; write a comma in a value as `,,`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A raw image file or a block device.
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// Up to 20 bytes, the guest's `/sys/block/vdX/serial`.
    #[serde(default)]
    pub serial: Option<String>,
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
}

impl DiskConfig {
    /// A read-write disk at `path` with default options.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            readonly: false,
            serial: None,
            direct: false,
        }
    }
}

impl FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            serial: None,
            direct: false,
        };
        let on_off = |key: &str, v: &str| match v {
            "on" | "true" | "yes" => Ok(true),
            "off" | "false" | "no" => Ok(false),
            _ => Err(format!("--disk {key}={v}: use {key}=on or {key}=off")),
        };
        for (i, part) in split_options(s).iter().map(String::as_str).enumerate() {
            match part.split_once('=') {
                Some(("path", v)) => disk.path = PathBuf::from(v),
                Some(("readonly", v)) => disk.readonly = on_off("readonly", v)?,
                Some(("direct", v)) => disk.direct = on_off("direct", v)?,
                Some(("serial", v)) => {
                    if v.len() > 20 {
                        return Err(format!("--disk serial={v}: a serial is at most 20 bytes"));
                    }
                    disk.serial = Some(v.to_string());
                }
                None if i == 0 && !part.is_empty() => disk.path = PathBuf::from(part),
                _ => {
                    return Err(format!(
                        "--disk: unknown option '{part}': use \
                         path=FILE[,readonly=on][,serial=STR][,direct=on]"
                    ))
                }
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err("--disk needs path=FILE".to_string());
        }
        Ok(disk)
    }
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> ByteSize {
    ByteSize(256 << 20)
}

/// A configuration that cannot work, with what to do about it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {given} is more than {max}, the most this host's {backend} backend supports")]
    TooManyCpus {
        given: u32,
        max: u32,
        backend: &'static str,
    },
    #[error("--memory {given} is less than the minimum of {min}")]
    TooLittleMemory { given: ByteSize, min: ByteSize },
    #[error("--memory {given} is more than this host's {host} of RAM; use a smaller size")]
    TooMuchMemory { given: ByteSize, host: ByteSize },
}

impl VmConfig {
    /// The configuration with every file path it names (kernel, initrd, disks, the vsock
    /// socket) passed through `map`; paths `map` returns `None` for stay as they are. A jailed
    /// VMM sees its files at other paths than the host does: this turns one set into the
    /// other.
    pub fn with_paths_mapped(&self, map: impl Fn(&Path) -> Option<PathBuf>) -> VmConfig {
        let m = |p: &Path| map(p).unwrap_or_else(|| p.to_path_buf());
        let mut c = self.clone();
        c.kernel = m(&self.kernel);
        c.initrd = self.initrd.as_deref().map(m);
        for d in &mut c.disks {
            d.path = m(&d.path);
        }
        if let Some(v) = &mut c.vsock {
            v.socket = m(&v.socket);
        }
        c
    }

    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: default_cpus(),
            memory: default_memory(),
            accel: Accel::default(),
            no_reboot: false,
            disks: Vec::new(),
            rng: default_rng(),
            nets: Vec::new(),
            vsock: None,
        }
    }

    /// Check the values that do not depend on the backend.
    pub fn validate(&self, host_memory: u64) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        if self.cpus > MAX_VCPUS {
            return Err(ConfigError::TooManyCpus {
                given: self.cpus,
                max: MAX_VCPUS,
                backend: "vireo",
            });
        }
        let min = vireo_arch::layout::MIN_MEMORY;
        if self.memory.0 < min {
            return Err(ConfigError::TooLittleMemory {
                given: self.memory,
                min: ByteSize(min),
            });
        }
        if host_memory > 0 && self.memory.0 > host_memory {
            return Err(ConfigError::TooMuchMemory {
                given: self.memory,
                host: ByteSize(host_memory & !((1 << 20) - 1)),
            });
        }
        Ok(())
    }
}

/// Total RAM of the host (`MemTotal` in /proc/meminfo); 0 if unknown.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| parse_meminfo_total(&m))
        .unwrap_or(0)
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!("256M".parse::<ByteSize>().unwrap(), ByteSize(256 << 20));
        assert_eq!("2G".parse::<ByteSize>().unwrap(), ByteSize(2 << 30));
        assert_eq!("2g".parse::<ByteSize>().unwrap(), ByteSize(2 << 30));
        assert_eq!("512K".parse::<ByteSize>().unwrap(), ByteSize(512 << 10));
        assert_eq!("1GiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 30));
        assert_eq!("4096B".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("128".parse::<ByteSize>().unwrap(), ByteSize(128 << 20));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for s in [
            "",
            "M",
            "12X",
            "-5M",
            "1.5G",
            "abc",
            "99999999999999999999G",
            "5 M",
        ] {
            let e = s.parse::<ByteSize>().unwrap_err();
            assert!(e.contains(s) || e.contains("too large"), "{s}: {e}");
        }
    }

    #[test]
    fn sizes_display_round_trip() {
        for s in ["256M", "2G", "5G", "512K", "1T", "1000B"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn config_json_round_trip_and_unknown_fields() {
        let mut c = VmConfig::new("/k");
        c.cpus = 4;
        c.memory = ByteSize(5 << 30);
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("\"5G\""));
        assert_eq!(serde_json::from_str::<VmConfig>(&j).unwrap(), c);
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","cpu":2}"#).unwrap_err();
        assert!(e.to_string().contains("cpu"));
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k");
        assert!(c.validate(1 << 34).is_ok());
        c.cpus = 0;
        assert_eq!(c.validate(1 << 34), Err(ConfigError::NoCpus));
        c.cpus = 300;
        assert!(matches!(
            c.validate(1 << 34),
            Err(ConfigError::TooManyCpus { .. })
        ));
        c.cpus = 1;
        c.memory = ByteSize(1 << 20);
        assert!(matches!(
            c.validate(1 << 34),
            Err(ConfigError::TooLittleMemory { .. })
        ));
        c.memory = ByteSize(1 << 40);
        let e = c.validate(1 << 34).unwrap_err();
        assert!(e.to_string().contains("16G"), "{e}");
    }

    #[test]
    fn disk_options_parse() {
        let d: DiskConfig = "path=/img,readonly=on,serial=abc".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                readonly: true,
                serial: Some("abc".into()),
                direct: false,
            }
        );
        let d: DiskConfig = "/some/file.raw".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/some/file.raw"));
        assert!(!d.readonly);
        let d: DiskConfig = "path=/a,direct=on,readonly=off".parse().unwrap();
        assert!(d.direct && !d.readonly);
        let d: DiskConfig = "path=/a,,b,,,serial=x,,y".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/a,b,"));
        assert_eq!(d.serial.as_deref(), Some("x,y"));
        for bad in [
            "",
            "readonly=on",
            "path=/a,readonly=maybe",
            "path=/a,cache=none",
            "path=/a,serial=123456789012345678901",
            "path=/a,,,",
            "path=/a,",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn disks_and_rng_in_json() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
        assert!(c.rng);
        assert!(c.disks.is_empty());
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","rng":false,"disks":[{"path":"/d","readonly":true}]}"#,
        )
        .unwrap();
        assert!(!c.rng);
        assert!(c.disks[0].readonly);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&j).unwrap(), c);
    }

    #[test]
    fn accel_names() {
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert!("xen"
            .parse::<Accel>()
            .unwrap_err()
            .contains("kvm, emu or auto"));
    }

    #[test]
    fn meminfo_parse() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       24531200 kB\nMemFree: 1 kB\n"),
            Some(24531200 * 1024)
        );
        assert_eq!(parse_meminfo_total("nothing"), None);
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory() > 0);
    }
}
