//! Live migration, pre-copy over TCP (the algorithm of Xen's live migration, Clark et al.,
//! NSDI 2005):
//!
//! 1. the source sends every page of RAM while the guest runs (`source.rs`);
//! 2. then, in rounds, the pages written meanwhile — by the vCPUs (the backend's dirty log,
//!    `Vm::take_dirty_log`) and by the VMM itself (virtio DMA, in the memory's bitmap,
//!    `vireo_hv::take_vmm_dirty`);
//! 3. until the pages left fit the allowed downtime at the bandwidth measured in the last
//!    round (or a maximum of rounds is reached); when the guest dirties memory faster than
//!    the link carries it, auto-converge throttles the vCPUs step by step;
//! 4. the source pauses the guest, flushes and hands over its disks (shared storage);
//! 5. sends the last dirty pages and
//! 6. the machine state (the snapshot's [`crate::snapshot::MachineState`]);
//! 7. the destination rebuilds the machine (`dest.rs`) and, told to commit, runs it;
//! 8. the source tears its copy down.
//!
//! The commit point is the destination reading `Commit`: it runs the guest only after that,
//! and drops its copy on any failure before it. So the source resumes the guest after any
//! failure before it sends `Commit`, or when the destination answers the commit with a
//! refusal; once `Commit` is sent and the link fails before `Running` comes back, the source
//! cannot know which side has the guest and keeps it paused ([`MigrateError::InDoubt`]):
//! never two running copies (split brain: both writing the shared disks), at the price of a
//! paused guest an operator resumes after checking the destination. The whole protocol is
//! in `docs/architecture.md` ("Live migration"). Wire format: `proto.rs`.

pub(crate) mod dest;
pub(crate) mod proto;
pub(crate) mod source;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Errors of a migration, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("protocol version mismatch: this vireo speaks version {ours}, the peer {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error("the peer refused: {0}")]
    Peer(String),
    #[error("{0}")]
    Vmm(String),
    /// The commit was sent and no answer came back: the destination may run the guest or
    /// may have dropped it; nothing here can tell. The guest stays paused at the source.
    #[error(
        "in doubt after the commit ({0}): the destination may be running the guest; it stays \
         paused here: resume it here only if the destination does not run it"
    )]
    InDoubt(String),
}

/// A migration to start at the source (`PUT /vm/migrate`, `vireo ctl migrate`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination, `ADDR:PORT` (a `vireo migrate receive --listen`).
    pub to: String,
    /// The longest pause allowed for the switch, in milliseconds [default: 300].
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Cap on the link use, in MiB/s [default: none].
    #[serde(default)]
    pub bandwidth_mbps: Option<u64>,
    /// Pre-copy rounds before the switch happens anyway [default: 30].
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// Throttle the vCPUs when memory is dirtied faster than it is sent [default: true].
    #[serde(default)]
    pub auto_converge: Option<bool>,
}

pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// A destination waiting for a VM (`PUT /vm/receive-migration`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// Where to listen, `ADDR:PORT`.
    pub listen: String,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    Connecting,
    /// Pre-copy rounds, the guest running.
    Copying,
    /// The guest paused: last pages, state, switch.
    StopAndCopy,
    /// The guest runs at the destination.
    Completed,
    /// The guest runs on here; `error` says why the migration failed.
    Failed,
}

/// Per-round statistics of a migration, as it goes (`GET /vm/migration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    pub destination: String,
    /// The round in progress, or the last one (1: the full copy).
    pub round: u32,
    /// Bytes of guest RAM.
    pub ram_bytes: u64,
    /// Pages sent in all (zero pages after the first round count too).
    pub pages_sent: u64,
    /// Bytes put on the wire.
    pub bytes_sent: u64,
    /// Pages sent in the last round.
    pub last_round_pages: u64,
    /// Pages dirty now, waiting for the next round.
    pub dirty_pages: u64,
    /// Pages the guest dirtied per second during the last round.
    pub dirty_rate_pages_per_sec: u64,
    /// Throughput of the last round, MiB/s.
    pub bandwidth_mbps: u64,
    /// Time to send what is dirty now at that throughput, in milliseconds.
    pub estimated_downtime_ms: u64,
    /// Auto-converge's throttle, percent of vCPU time taken away.
    pub throttle_percent: u32,
    pub elapsed_ms: u64,
    /// The pause the guest saw at the switch (once completed), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MigrationProgress {
    pub(crate) fn new(destination: &str, ram_bytes: u64) -> Self {
        MigrationProgress {
            phase: MigrationPhase::Connecting,
            destination: destination.to_string(),
            round: 0,
            ram_bytes,
            pages_sent: 0,
            bytes_sent: 0,
            last_round_pages: 0,
            dirty_pages: 0,
            dirty_rate_pages_per_sec: 0,
            bandwidth_mbps: 0,
            estimated_downtime_ms: 0,
            throttle_percent: 0,
            elapsed_ms: 0,
            downtime_ms: None,
            error: None,
        }
    }
}

/// The first frame: what the destination must build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Offer {
    pub config: VmConfig,
    /// The backend running the VM: the destination must have the same.
    pub backend: String,
    /// RAM regions (guest-physical start, length), in order.
    pub regions: Vec<(u64, u64)>,
}

/// Or `b` into `a` (bitmaps of the same regions).
pub(crate) fn merge(a: &mut [Vec<u64>], b: &[Vec<u64>]) {
    for (x, y) in a.iter_mut().zip(b) {
        for (p, q) in x.iter_mut().zip(y) {
            *p |= q;
        }
    }
}

pub(crate) fn count(bm: &[Vec<u64>]) -> u64 {
    bm.iter()
        .flat_map(|r| r.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_merge_and_count() {
        let mut a = vec![vec![0b1010u64, 0], vec![1]];
        merge(&mut a, &[vec![0b0110, 1 << 63], vec![2]]);
        assert_eq!(a, vec![vec![0b1110, 1 << 63], vec![3]]);
        assert_eq!(count(&a), 6);
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let r: MigrateRequest =
            serde_json::from_str(r#"{"to":"10.0.0.2:7000","max_downtime_ms":20}"#).unwrap();
        assert_eq!(r.max_downtime_ms, Some(20));
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"to":"x","downtime":1}"#).is_err());
        assert!(serde_json::from_str::<ReceiveRequest>(r#"{}"#).is_err());
    }
}
