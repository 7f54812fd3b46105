//! The VMM: builds a VM from a [`config::VmConfig`] and runs it until the guest powers off,
//! resets (restart, or exit with `no_reboot`) or the user stops it. Nothing here parses flags
//! or HTTP, and nothing names a hypervisor backend's own types.

pub mod backend;
pub mod config;
mod machine;
pub mod migrate;
pub mod net;
mod pci;
pub mod seccomp;
pub mod snapshot;
mod vm;

pub use backend::{prepare_emulator, select_hypervisor, Selected};
pub use machine::{DeviceCounters, DeviceInfo, VcpuExitCounts};
pub use migrate::{MigrateRequest, MigrationPhase, MigrationProgress, ReceiveRequest};
pub use vm::{
    Command, CommandError, CommandErrorKind, CommandReply, Counters, ExitReason, Lifecycle,
    RestoreRequest, StopReason, VmInfo, Vmm, VmmHandle,
};

/// Errors building or running a VM, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Hv(#[from] vireo_hv::Error),
    #[error(transparent)]
    Kernel(#[from] vireo_arch::loader::Error),
    #[error("boot set-up: {0}")]
    Boot(String),
    #[error("cannot allocate {size} of guest memory: {reason}")]
    Memory {
        size: config::ByteSize,
        reason: String,
    },
    #[error("device set-up: {0}")]
    Devices(String),
    #[error("{0}")]
    Disk(String),
    #[error("{0}")]
    Net(String),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("the guest stopped with an error: {0}")]
    Guest(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
}
