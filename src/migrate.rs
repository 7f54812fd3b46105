//! `vireo migrate receive`: wait for a VM migrated from another vireo and run it on this
//! terminal. (The sending side is `vireo ctl --api-socket PATH migrate --to ADDR:PORT`.)

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use vireo_vmm::Vmm;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[command(subcommand)]
    verb: MigrateVerb,
}

#[derive(Subcommand, Debug)]
enum MigrateVerb {
    /// Wait for an incoming VM on ADDR:PORT, then run it here (a refused or failed incoming
    /// migration is logged and the next one awaited).
    Receive {
        /// Where to listen, like 0.0.0.0:7000.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// Serve the REST API on this Unix socket.
        #[arg(long, value_name = "PATH")]
        api_socket: Option<std::path::PathBuf>,
    },
}

pub fn migrate(args: MigrateArgs) -> Result<ExitCode> {
    match args.verb {
        MigrateVerb::Receive { listen, api_socket } => {
            // Bound before the API socket appears: once it does, sources may connect.
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("listening on {listen}"))?;
            tracing::info!("waiting for a migrated VM on {listen}");
            crate::run::serve(
                Vmm::receiving(listener, Box::new(std::io::stdout())),
                api_socket.as_deref(),
            )
        }
    }
}
