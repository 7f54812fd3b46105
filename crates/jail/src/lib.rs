//! `vireo-jail`: OS-level isolation for one process, and containers built on it.
//!
//! [`spawn`] starts a command from a [`JailSpec`]:
//!
//! - in new mount, PID, IPC, UTS, network, cgroup and time namespaces (and a user namespace when
//!   asked), the command being PID 1 with its own hostname;
//! - with `pivot_root` into a new root — a host directory or an empty tmpfs — holding only
//!   what the spec bind-mounts (files, directories, device nodes), a private `/proc`, a minimal
//!   `/dev`, and the old root detached (not a `chroot`, which a root process can leave);
//! - under cgroup limits (memory and swap, pids, CPU weight, CPU max, cpuset) on cgroup v1 or
//!   v2, changeable while it runs;
//! - with every capability not asked for dropped from all sets, `no_new_privs`, the given
//!   uid/gid, and a seccomp allow-list.
//!
//! [`spawn_fn`] does the same but calls a function in the jailed child instead of executing a
//! program (for a single-threaded caller: how `vireo run --jail` runs its VMM).
//!
//! [`container`] runs such jails as named containers with state under
//! `/run/vireo/containers`; [`record`] cleans up after a vireo that was killed. Nothing here
//! knows about virtual machines: a VMM is just code or a command with a few files and devices
//! to expose.

pub mod caps;
pub mod cgroup;
pub mod container;
pub mod net;
pub mod record;
pub mod seccomp;
mod spawn;
pub mod spec;
mod sys;

use std::path::PathBuf;

pub use caps::CapSet;
pub use cgroup::{Cgroup, CpuList, Hierarchies, HostResources, Limits, Stats};
pub use net::{Ipv4Net, NetSpec};
pub use seccomp::{SyscallList, Violation};
pub use spawn::{
    is_root, spawn, spawn_fn, Exit, JailedChild, SignalForwarding, MAX_ARGS, TMPFS_ROOT_DIR,
};
pub use spec::{IdMap, JailSpec, Mount, Root};

/// Errors of the jail, worded for the person running vireo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the root file system {path} does not exist or is not a directory")]
    RootfsMissing { path: PathBuf },
    #[error("{path} does not exist, so it cannot be made visible inside the jail")]
    MountSource { path: PathBuf },
    #[error("jails need root: run vireo as root (namespaces, cgroups and pivot_root need CAP_SYS_ADMIN)")]
    NotRoot,
    #[error(
        "cannot limit {limit}: no cgroup controller '{controller}' is usable on this host \
         (neither mounted as a cgroup v1 hierarchy nor offered by the unified v2 hierarchy)"
    )]
    NoController {
        controller: &'static str,
        limit: &'static str,
    },
    #[error("this host cannot give {what}: {why}")]
    LimitUnavailable { what: String, why: String },
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the jail failed while {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{command}` in the jail (root: {root}): {source}")]
    Exec {
        command: String,
        root: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network: {what}: {source}")]
    Network {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp list {list}, line {line}: {why}")]
    SeccompList {
        list: String,
        line: usize,
        why: String,
    },
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("no running container named '{0}' (see `vireo container list`)")]
    NoSuchContainer(String),
    #[error("a container named '{0}' is already running")]
    ContainerExists(String),
}

impl Error {
    /// For an [`Error::Exec`]: the status a shell would give (127 not found, 126 not
    /// executable).
    pub fn exec_status(&self) -> Option<i32> {
        match self {
            Error::Exec { source, .. } => Some(match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => 127,
                _ => 126,
            }),
            _ => None,
        }
    }
}
