//! `vireo restore`: a VM from a snapshot directory, running on this terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use std::os::unix::net::UnixListener;

use anyhow::{Context, Result};
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
    /// Run the VMM in a jail, as `vireo run --jail` does (needs root); the snapshot, kernel,
    /// initrd and disks appear in it at their host paths.
    #[arg(long)]
    jail: bool,
    #[command(flatten)]
    ids: crate::jail::JailArgs,
}

pub fn restore(args: RestoreArgs) -> Result<ExitCode> {
    let req = RestoreRequest {
        snapshot: args.snapshot,
        disks: (!args.disks.is_empty()).then_some(args.disks),
        paused: args.paused,
    };
    if args.jail {
        let opts = args.ids.options(args.api_socket, None);
        return crate::jail::restore_jailed(req, &opts);
    }
    // Reads and checks the snapshot before anything is created.
    let vmm = Vmm::from_snapshot(&req, Box::new(std::io::stdout()))?;
    crate::run::serve(vmm, args.api_socket.as_deref())
}

/// The restored VMM inside a jail (`vireo restore --jail`); see `run::run_jailed_vmm`.
pub fn restore_jailed_vmm(req: &RestoreRequest, api: Option<UnixListener>) -> Result<u8> {
    vireo_vmm::seccomp::enable()?;
    let vmm = Vmm::from_snapshot(req, Box::new(std::io::stdout()))?;
    let api = match api {
        Some(listener) => Some(
            vireo_api::server::ApiServer::from_listener(listener, vmm.handle())
                .context("starting the API")?,
        ),
        None => None,
    };
    crate::run::serve_status(vmm, api)
}
