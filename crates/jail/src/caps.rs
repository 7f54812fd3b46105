//! Capabilities (capabilities(7)): names, and dropping every capability a jailed process is not
//! given from all five sets (bounding, permitted, effective, inheritable, ambient).

use std::io;

use crate::sys;

/// Capability names in number order (linux/capability.h), without the `CAP_` prefix.
const NAMES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// `CAP_SETPCAP`: needed to shrink the bounding set.
const CAP_SETPCAP: u32 = 8;

/// A set of capabilities as a bit mask (bit N = capability N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// No capabilities.
    pub const EMPTY: CapSet = CapSet(0);

    /// Parses `NET_BIND_SERVICE`, `cap_net_bind_service` or `CAP_NET_BIND_SERVICE`.
    pub fn add_name(&mut self, name: &str) -> Result<(), String> {
        let upper = name.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        match NAMES.iter().position(|n| *n == bare) {
            Some(bit) => {
                self.0 |= 1 << bit;
                Ok(())
            }
            None => Err(format!(
                "unknown capability '{name}' (capabilities(7) names, like NET_BIND_SERVICE)"
            )),
        }
    }

    /// Whether capability number `cap` is in the set.
    pub fn contains(self, cap: u32) -> bool {
        cap < 64 && self.0 & (1 << cap) != 0
    }

    /// The names in the set.
    pub fn names(self) -> Vec<&'static str> {
        (0..NAMES.len() as u32)
            .filter(|&c| self.contains(c))
            .map(|c| NAMES[c as usize])
            .collect()
    }
}

/// The highest capability number the running kernel knows (`/proc/sys/kernel/cap_last_cap`).
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u32| n < 64)
        .unwrap_or(NAMES.len() as u32 - 1)
}

/// Removes every capability not in `keep` from the bounding set (needs `CAP_SETPCAP`, so this
/// runs before the effective set is reduced). Allocation-free.
pub(crate) fn drop_bounding(keep: CapSet, last_cap: u32) -> io::Result<()> {
    for cap in 0..=last_cap {
        if keep.contains(cap) {
            continue;
        }
        match sys::prctl(libc::PR_CAPBSET_DROP, cap.into(), 0) {
            Ok(_) => {}
            // A capability the kernel does not know (cap_last_cap raced): nothing to drop.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sets permitted, effective and inheritable to `keep`, clears the ambient set and, when the
/// process will not be root, raises `keep` as ambient so it survives `execve`. Allocation-free.
pub(crate) fn set_sets(keep: CapSet, uid: u32) -> io::Result<()> {
    let lo = keep.0 as u32;
    let hi = (keep.0 >> 32) as u32;
    let data = [
        sys::CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        sys::CapData {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    sys::capset(&data)?;
    sys::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    )?;
    if uid != 0 {
        for cap in 0..64 {
            if keep.contains(cap) {
                sys::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap.into(),
                )?;
            }
        }
    }
    Ok(())
}

/// Whether the calling thread may shrink the bounding set (has `CAP_SETPCAP`).
pub fn can_drop_bounding() -> bool {
    sys::capget()
        .map(|d| d[0].effective & (1 << CAP_SETPCAP) != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_in_any_spelling() {
        let mut s = CapSet::EMPTY;
        s.add_name("NET_BIND_SERVICE").unwrap();
        s.add_name("cap_sys_admin").unwrap();
        s.add_name("CAP_CHOWN").unwrap();
        assert!(s.contains(10) && s.contains(21) && s.contains(0));
        assert!(!s.contains(1));
        assert_eq!(s.names(), ["CHOWN", "NET_BIND_SERVICE", "SYS_ADMIN"]);
        let e = s.add_name("FLY").unwrap_err();
        assert!(e.contains("unknown capability 'FLY'"), "{e}");
        assert_eq!(NAMES.len(), 41);
        assert_eq!(NAMES[40], "CHECKPOINT_RESTORE");
    }

    #[test]
    fn last_cap_is_sane() {
        let n = last_cap();
        assert!((37..64).contains(&n), "{n}");
    }
}
