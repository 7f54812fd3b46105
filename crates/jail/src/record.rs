//! Clean-up records: every jail writes `/run/vireo/jails/<name>.json` naming the process that
//! owns it (vireo, by PID and start time) and what must be removed when it is gone (cgroups,
//! the host end of a veth pair). The owner removes the record when it cleans up. If the owner
//! was killed (`SIGKILL` cannot be caught), the jail itself is already dead — its init had
//! `PR_SET_PDEATHSIG` — and the next vireo that starts a jail, or lists or stops containers,
//! removes what the record names ([`sweep`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroup, Hierarchies};
use crate::net;

/// Where clean-up records live.
pub const RECORD_DIR: &str = "/run/vireo/jails";

/// A process identity that survives PID reuse: PID and start time (clock ticks after boot,
/// field 22 of `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start: u64,
}

impl ProcessId {
    /// The calling process.
    pub fn current() -> Option<ProcessId> {
        Self::of(std::process::id() as i32)
    }

    /// Process `pid`, if it exists.
    pub fn of(pid: i32) -> Option<ProcessId> {
        start_time(pid).map(|start| ProcessId { pid, start })
    }

    /// Whether this very process (not a later one with the same PID) is still running.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`; `None` if there is no such process or it is
/// a zombie being reaped.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: skip past the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// What a dead owner leaves to clean up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub owner: ProcessId,
    pub cgroup: Option<Cgroup>,
    pub host_if: Option<String>,
}

fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Writes the record (atomically: temporary file, then rename).
pub fn write(dir: &Path, r: &Record) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", r.name));
    let json = serde_json::to_vec(r).map_err(io::Error::other)?;
    fs::write(&tmp, json)?;
    fs::rename(&tmp, path_of(dir, &r.name))
}

/// Removes `name`'s record.
pub fn remove(dir: &Path, name: &str) {
    let _ = fs::remove_file(path_of(dir, name));
}

/// Removes what dead owners left behind; returns the names cleaned up.
pub fn sweep(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut hierarchies = None;
    let mut cleaned = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = fs::read(&path) else { continue };
        let Ok(r) = serde_json::from_slice::<Record>(&text) else {
            tracing::warn!(file = %path.display(), "unreadable jail record; removing it");
            let _ = fs::remove_file(&path);
            continue;
        };
        if r.owner.alive() {
            continue;
        }
        tracing::info!(jail = %r.name, owner = r.owner.pid, "cleaning up after a vireo that is gone");
        let h = hierarchies.get_or_insert_with(|| Hierarchies::detect().unwrap_or_default());
        if let Some(cg) = &r.cgroup {
            if cg.validate(h) {
                cg.kill_all();
            } else {
                tracing::warn!(jail = %r.name, "record names cgroups outside vireo's; not touching them");
            }
        }
        // All of `vireo/<name>`, also what was added after the record was written.
        if crate::spec::valid_name(&r.name) {
            if let Err(e) = Cgroup::remove_named(h, &r.name) {
                tracing::warn!(jail = %r.name, "stale cgroup: {e}");
                continue;
            }
        }
        if let Some(i) = &r.host_if {
            if i.starts_with("vr-") {
                let _ = net::delete_link(i);
            }
        }
        let _ = fs::remove_file(&path);
        cleaned.push(r.name);
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let me = ProcessId::current().unwrap();
        assert!(me.alive());
        assert_eq!(ProcessId::current(), Some(me));
        let fake = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!fake.alive(), "same PID, other start time: another process");
        assert!(ProcessId::of(-1).is_none());
    }

    #[test]
    fn sweep_removes_only_dead_owners() {
        let dir = std::env::temp_dir().join(format!("vireo-rec-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let me = ProcessId::current().unwrap();
        let live = Record {
            name: "live".into(),
            owner: me,
            cgroup: None,
            host_if: None,
        };
        // Our PID with another start time: a process that is gone.
        let dead = Record {
            name: "dead".into(),
            owner: ProcessId {
                pid: me.pid,
                start: me.start + 1,
            },
            cgroup: None,
            host_if: None,
        };
        write(&dir, &live).unwrap();
        write(&dir, &dead).unwrap();
        fs::write(dir.join("junk.json"), b"{").unwrap();
        assert_eq!(sweep(&dir), ["dead"]);
        assert!(path_of(&dir, "live").exists());
        assert!(!path_of(&dir, "dead").exists());
        assert!(!dir.join("junk.json").exists());
        remove(&dir, "live");
        assert!(!path_of(&dir, "live").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
