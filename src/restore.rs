//! `vireo restore`: a VM from a snapshot directory, running on this terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use vireo_vmm::config::DiskConfig;
use vireo_vmm::{RestoreRequest, Vmm};

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot directory (written by `vireo ctl snapshot`).
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Serve the REST API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Replacement disks, in the snapshot's order (as many as it has, of the same sizes);
    /// by default the snapshot's own paths.
    #[arg(
        long = "disk",
        value_name = "path=FILE[,readonly=on][,serial=STR][,direct=on]"
    )]
    disks: Vec<DiskConfig>,
    /// Leave the VM paused (resume it with `vireo ctl resume`).
    #[arg(long)]
    paused: bool,
}

pub fn restore(args: RestoreArgs) -> Result<ExitCode> {
    let req = RestoreRequest {
        snapshot: args.snapshot,
        disks: (!args.disks.is_empty()).then_some(args.disks),
        paused: args.paused,
    };
    // Reads and checks the snapshot before anything is created.
    let vmm = Vmm::from_snapshot(&req, Box::new(std::io::stdout()))?;
    crate::run::serve(vmm, args.api_socket.as_deref())
}
