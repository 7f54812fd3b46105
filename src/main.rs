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

/// `vireo run`, parsed without the other subcommands' parsers: the start-up of a VM is
/// benchmarked (docs/benchmarks.md, bench/vmm), and building clap's whole command tree costs
/// resident pages and time. Anything else, and any error or help, goes through [`Cli`].
#[derive(Parser)]
#[command(name = "vireo", version)]
struct RunOnly {
    #[command(subcommand)]
    command: RunCommand,
}

#[derive(Subcommand)]
enum RunCommand {
    Run(Box<run::RunArgs>),
}

fn parse() -> Command {
    if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        if let Ok(RunOnly {
            command: RunCommand::Run(args),
        }) = RunOnly::try_parse()
        {
            return Command::Run(args);
        }
    }
    Cli::parse().command
}

fn main() -> ExitCode {
    let command = parse();
    init_logging();
    if matches!(
        command,
        Command::Run(_) | Command::Restore(_) | Command::Migrate(_)
    ) {
        // Before any seccomp filter: they refuse executable mappings.
        vireo_vmm::prepare_emulator();
    }
    let result = match command {
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

/// Logs go to stderr; `VIREO_LOG` takes a list of `[target=]level` directives such as
/// `debug` or `vireo_virtio=trace,warn` (default: warnings and errors). A plain target filter
/// rather than `EnvFilter`: no regular-expression engine in the binary or at start-up.
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let targets = match std::env::var("VIREO_LOG") {
        Ok(s) => s.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("vireo: warning: ignoring VIREO_LOG={s:?} ({e}); logging warnings");
            Targets::new().with_default(LevelFilter::WARN)
        }),
        Err(_) => Targets::new().with_default(LevelFilter::WARN),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .without_time(),
        )
        .with(targets)
        .init();
}
