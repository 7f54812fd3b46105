//! What a jail is made of: [`JailSpec`].

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Component, Path, PathBuf};

use crate::caps::CapSet;
use crate::cgroup::Limits;
use crate::net::NetSpec;
use crate::seccomp::{SyscallList, Violation};
use crate::Error;

/// The new root file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// A directory of the host becomes `/` (a container's root file system).
    Dir { path: PathBuf, read_only: bool },
    /// An empty tmpfs becomes `/`; only what [`JailSpec::mounts`] adds is in it.
    Tmpfs { size: u64 },
}

/// Something made visible inside the jail, at an absolute path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A host file or directory, bind-mounted (with what is mounted below it).
    Bind {
        source: PathBuf,
        target: PathBuf,
        read_only: bool,
    },
    /// A host character device: a node with the same number, owned by the jail's uid/gid with
    /// mode 0600 (with a user namespace, where nodes cannot be made, the device is
    /// bind-mounted instead).
    Device { source: PathBuf, target: PathBuf },
    /// An empty tmpfs (`nosuid,nodev`).
    Tmpfs {
        target: PathBuf,
        size: u64,
        mode: u32,
    },
}

impl Mount {
    /// The path inside the jail.
    pub fn target(&self) -> &Path {
        match self {
            Mount::Bind { target, .. }
            | Mount::Device { target, .. }
            | Mount::Tmpfs { target, .. } => target,
        }
    }
}

/// Ids inside a user namespace and the host ids they stand for (`user_namespaces(7)`); the
/// same map is used for uids and gids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// Everything about one jailed process.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// A unique name (letters, digits, `-`, `_`, `.`): the cgroup directory's name.
    pub name: String,
    /// The new root.
    pub root: Root,
    /// A minimal `/dev` on a tmpfs: `null`, `zero`, `full`, `random`, `urandom`, `tty`,
    /// `fd`/`stdin`/`stdout`/`stderr` links and a `shm` tmpfs.
    pub dev: bool,
    /// Hide kernel information in `/proc` (`kcore`, `keys`, `timer_list`, ... behind
    /// `/dev/null`) and make `/proc/sys`, `/proc/sysrq-trigger`, `/proc/irq`, `/proc/bus`
    /// read-only. Needs `dev` or a `/dev/null` bind.
    pub mask_proc: bool,
    /// Mounts, applied in order after `/dev` and before `/proc`.
    pub mounts: Vec<Mount>,
    /// Hostname in the new UTS namespace.
    pub hostname: String,
    /// A new user namespace with this id map (root in the jail is `outside` on the host).
    pub user_namespace: Option<IdMap>,
    /// cgroup limits.
    pub limits: Limits,
    /// A veth pair into the host; without it the jail's network namespace has only `lo`.
    pub net: Option<NetSpec>,
    /// The uid and gid the command runs as (inside ids with a user namespace).
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (empty: none).
    pub groups: Vec<u32>,
    /// Capabilities kept (all others are dropped from every set).
    pub keep_caps: CapSet,
    /// The seccomp allow-list and what a violation does; `None`: no filter.
    pub seccomp: Option<(SyscallList, Violation)>,
    /// The command and its arguments; a name without `/` is looked up in `PATH` inside.
    pub argv: Vec<OsString>,
    /// The environment, `KEY=VALUE` entries.
    pub env: Vec<OsString>,
    /// The working directory inside.
    pub cwd: PathBuf,
    /// Descriptors to become the command's stdin, stdout and stderr (`None`: inherit this
    /// process's). They must stay open until [`crate::spawn`] returns.
    pub stdio: [Option<RawFd>; 3],
    /// Other descriptors the command inherits, under the same numbers (3 or above; e.g. a
    /// listening socket bound outside). Every descriptor not listed here or in `stdio` is
    /// closed. They must stay open until [`crate::spawn`] returns.
    pub pass_fds: Vec<RawFd>,
}

/// `PATH` for commands when the environment sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl JailSpec {
    /// A spec with everything closed: a tmpfs root, no mounts, no limits, uid/gid 0 with no
    /// capabilities, no seccomp filter (set one!), hostname `name`.
    pub fn new(name: &str, argv: Vec<OsString>) -> JailSpec {
        JailSpec {
            name: name.to_string(),
            root: Root::Tmpfs { size: 16 << 20 },
            dev: true,
            mask_proc: true,
            mounts: Vec::new(),
            hostname: name.chars().take(64).collect(),
            user_namespace: None,
            limits: Limits::default(),
            net: None,
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            keep_caps: CapSet::EMPTY,
            seccomp: None,
            argv,
            env: vec![OsString::from(format!("PATH={DEFAULT_PATH}"))],
            cwd: PathBuf::from("/"),
            stdio: [None; 3],
            pass_fds: Vec::new(),
        }
    }

    /// Checks what can be checked before anything is created; errors are worded for users.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |m: String| Err(Error::InvalidSpec(m));
        if !valid_name(&self.name) {
            return invalid(format!(
                "invalid name '{}': use 1 to 64 letters, digits, '-', '_' or '.' (not first)",
                self.name
            ));
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return invalid(format!(
                "invalid hostname '{}': 1 to 64 bytes",
                self.hostname
            ));
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return invalid("no command to run".into());
        }
        if let Root::Dir { path, .. } = &self.root {
            if !path.is_dir() {
                return Err(Error::RootfsMissing { path: path.clone() });
            }
        }
        for m in &self.mounts {
            inside_components(m.target())?;
            match m {
                Mount::Bind { source, .. } | Mount::Device { source, .. } => {
                    if std::fs::symlink_metadata(source).is_err() && !source.exists() {
                        return Err(Error::MountSource {
                            path: source.clone(),
                        });
                    }
                }
                Mount::Tmpfs { .. } => {}
            }
        }
        inside_components(&self.cwd)?;
        if let Some(fd) = self.pass_fds.iter().find(|&&fd| fd < 3) {
            return invalid(format!(
                "descriptor {fd} cannot be passed: stdio (0 to 2) is set with `stdio`"
            ));
        }
        if let Some(map) = &self.user_namespace {
            if map.count == 0
                || map.inside.checked_add(map.count).is_none()
                || map.outside.checked_add(map.count).is_none()
            {
                return invalid("the user-namespace id map is empty or overflows".into());
            }
            let inside = map.inside..map.inside + map.count;
            if !inside.contains(&self.uid) || !inside.contains(&self.gid) {
                return invalid(format!(
                    "uid {} / gid {} are not mapped by the user namespace ({}..{})",
                    self.uid, self.gid, inside.start, inside.end
                ));
            }
        }
        Ok(())
    }
}

/// `[A-Za-z0-9_.-]{1,64}`, not starting with `.` or `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The components of an absolute path inside the jail; `.`/`..`, relative paths and empty
/// names are refused (a path inside must not be able to climb out).
pub fn inside_components(p: &Path) -> Result<Vec<OsString>, Error> {
    let bad = |why: &str| {
        Err(Error::InvalidSpec(format!(
            "path '{}' inside the jail {why}",
            p.display()
        )))
    };
    if !p.is_absolute() {
        return bad("must be absolute");
    }
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n.to_os_string()),
            _ => return bad("must not contain '.' or '..'"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("web-1"));
        assert!(valid_name("a.b_c"));
        for bad in ["", ".x", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn inside_paths() {
        assert_eq!(
            inside_components(Path::new("/dev/kvm")).unwrap(),
            [OsString::from("dev"), OsString::from("kvm")]
        );
        assert!(inside_components(Path::new("/")).unwrap().is_empty());
        assert!(inside_components(Path::new("/a/../b")).is_err());
        assert!(inside_components(Path::new("rel")).is_err());
        // `Path` drops interior `.` components; still no way up.
        assert_eq!(inside_components(Path::new("/a/./b")).unwrap().len(), 2);
    }

    #[test]
    fn validation_errors_are_worded_for_users() {
        let mut s = JailSpec::new("t1", vec!["/bin/true".into()]);
        assert!(s.validate().is_ok());
        s.root = Root::Dir {
            path: "/nonexistent/rootfs".into(),
            read_only: false,
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/rootfs") && e.contains("does not exist"),
            "{e}"
        );
        s.root = Root::Tmpfs { size: 1 << 20 };
        s.mounts.push(Mount::Bind {
            source: "/nonexistent/kernel".into(),
            target: "/vm/kernel".into(),
            read_only: true,
        });
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/kernel"), "{e}");
        s.mounts.clear();
        s.argv.clear();
        assert!(s.validate().unwrap_err().to_string().contains("no command"));
        let mut u = JailSpec::new("t2", vec!["x".into()]);
        u.user_namespace = Some(IdMap {
            inside: 0,
            outside: 100_000,
            count: 10,
        });
        u.uid = 50;
        assert!(u.validate().unwrap_err().to_string().contains("not mapped"));
    }
}
