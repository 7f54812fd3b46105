//! `vireo`: the command-line front end. It parses flags into a `VmConfig`, sets up the
//! terminal and signals, and hands over to `vireo-vmm` (directly, or inside a jail); and it
//! runs containers with `vireo-jail`.

mod console;
mod container;
mod ctl;
mod jail;
mod migrate;
mod restore;
mod run;
mod signals;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vireo: a small hypervisor for Linux guests (KVM or software emulation).
#[derive(Parser)]
#[command(name = "vireo", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM with its serial console on this terminal (or, with only --api-socket, wait
    /// for a configuration over the API).
    Run(Box<run::RunArgs>),
    /// OS-level containers: run a command in namespaces and cgroups on a root directory.
    #[command(subcommand)]
    Container(container::ContainerCommand),
    /// Restore a VM from a snapshot directory and run it on this terminal.
    Restore(restore::RestoreArgs),
    /// Control a running vireo through its API socket.
    Ctl(ctl::CtlArgs),
    /// Live migration: `vireo migrate receive --listen ADDR:PORT` waits for a VM (send one
    /// with `vireo ctl --api-socket PATH migrate --to ADDR:PORT`).
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Container(cmd) => container::run(cmd),
        Command::Restore(args) => restore::restore(args),
        Command::Ctl(args) => ctl::ctl(args),
        Command::Migrate(args) => migrate::migrate(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            console::restore_terminal();
            eprintln!("vireo: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr; `VIREO_LOG` takes a `tracing` filter (default: warnings and errors).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
