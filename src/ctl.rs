//! `vireo ctl`: one API request per invocation, human output or `--json`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vireo_api::client::{Client, Response};
use vireo_api::{ErrorBody, Method, SnapshotRequest};
use vireo_vmm::config::DiskConfig;
use vireo_vmm::{
    CommandReply, Counters, MigrateRequest, MigrationPhase, MigrationProgress, ReceiveRequest,
    RestoreRequest, VmInfo,
};

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The API socket of the vireo to control.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// State, configuration, vCPUs and devices.
    Info,
    /// Exits by reason per vCPU; accesses, requests and bytes per device.
    Counters,
    /// Configure the VM from a JSON file (VmConfig).
    Config {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Boot the configured VM.
    Boot,
    /// Pause the VM (vCPUs, devices and the guest clock stop).
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Press the ACPI power button: the guest shuts down cleanly.
    Shutdown,
    /// Power the VM off at once.
    PowerOff,
    /// Reboot the VM (built again from its configuration).
    Reboot,
    /// Snapshot the paused VM into a directory.
    Snapshot {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Restore a snapshot (into a vireo waiting with `vireo run --api-socket` alone, or one
    /// whose VM stopped).
    Restore {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Replacement disks, in the snapshot's order.
        #[arg(long = "disk", value_name = "path=FILE[,...]")]
        disks: Vec<DiskConfig>,
        /// Leave the restored VM paused.
        #[arg(long)]
        paused: bool,
    },
    /// Live-migrate the running VM to a `vireo migrate receive --listen ADDR:PORT`, with a
    /// progress bar (rounds, pages, dirty rate, bandwidth, estimated downtime, throttle).
    Migrate {
        /// The destination.
        #[arg(long, value_name = "ADDR:PORT")]
        to: String,
        /// The longest pause allowed for the switch, in milliseconds [default: 300].
        #[arg(long, value_name = "MS")]
        max_downtime: Option<u64>,
        /// Cap on the link use, in MiB/s [default: none].
        #[arg(long, value_name = "MBPS")]
        bandwidth: Option<u64>,
        /// Pre-copy rounds before the switch happens anyway [default: 30].
        #[arg(long, value_name = "N")]
        max_rounds: Option<u32>,
        /// Never throttle the vCPUs (by default they are, step by step, when the guest
        /// dirties memory faster than the link carries it).
        #[arg(long)]
        no_auto_converge: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// The statistics of the migration in progress, or of the last one.
    Migration,
    /// Wait for a VM migrated to ADDR:PORT (into a vireo waiting with `--api-socket` alone).
    ReceiveMigration {
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
    },
    /// Make the vireo process exit (its VM is powered off).
    Exit,
}

fn body<T: serde::Serialize>(v: &T) -> Result<Option<String>> {
    Ok(Some(serde_json::to_string(v)?))
}

pub fn ctl(args: CtlArgs) -> Result<ExitCode> {
    let client = Client::new(&args.api_socket);
    let (method, path, body) = match &args.verb {
        Verb::Info => (Method::Get, "/vm", None),
        Verb::Counters => (Method::Get, "/vm/counters", None),
        Verb::Config { file } => {
            let config = crate::run::read_config_file(file)?;
            (Method::Put, "/vm/config", body(&config)?)
        }
        Verb::Boot => (Method::Put, "/vm/boot", None),
        Verb::Pause => (Method::Put, "/vm/pause", None),
        Verb::Resume => (Method::Put, "/vm/resume", None),
        Verb::Shutdown => (Method::Put, "/vm/shutdown", None),
        Verb::PowerOff => (Method::Put, "/vm/power-off", None),
        Verb::Reboot => (Method::Put, "/vm/reboot", None),
        Verb::Snapshot { dir } => {
            let destination = std::path::absolute(dir).context("the snapshot directory")?;
            (
                Method::Put,
                "/vm/snapshot",
                body(&SnapshotRequest { destination })?,
            )
        }
        Verb::Restore { dir, disks, paused } => {
            let snapshot = std::path::absolute(dir).context("the snapshot directory")?;
            let req = RestoreRequest {
                snapshot,
                disks: (!disks.is_empty()).then(|| disks.clone()),
                paused: *paused,
            };
            (Method::Put, "/vm/restore", body(&req)?)
        }
        Verb::Migrate {
            to,
            max_downtime,
            bandwidth,
            max_rounds,
            no_auto_converge,
            ..
        } => {
            let req = MigrateRequest {
                to: to.clone(),
                max_downtime_ms: *max_downtime,
                bandwidth_mbps: *bandwidth,
                max_rounds: *max_rounds,
                auto_converge: Some(!no_auto_converge),
            };
            (Method::Put, "/vm/migrate", body(&req)?)
        }
        Verb::Migration => (Method::Get, "/vm/migration", None),
        Verb::ReceiveMigration { listen } => (
            Method::Put,
            "/vm/receive-migration",
            body(&ReceiveRequest {
                listen: listen.clone(),
            })?,
        ),
        Verb::Exit => (Method::Put, "/vmm/exit", None),
    };
    let resp = match &args.verb {
        Verb::Migrate { quiet: false, .. } if !args.json => {
            with_progress(&args.api_socket, || {
                client.request(method, path, body.as_deref())
            })??
        }
        _ => client.request(method, path, body.as_deref())?,
    };
    if args.json {
        println!("{}", resp.body);
        return Ok(if resp.status < 300 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if resp.status >= 300 {
        let msg = serde_json::from_str::<ErrorBody>(&resp.body)
            .map(|e| e.error)
            .unwrap_or(resp.body.clone());
        bail!("{msg} (HTTP {})", resp.status);
    }
    print!("{}", human(&args.verb, &resp)?);
    Ok(ExitCode::SUCCESS)
}

/// Run `request` (a migration) while drawing its progress on stderr from `GET /vm/migration`.
fn with_progress<T: Send>(
    socket: &std::path::Path,
    request: impl FnOnce() -> T + Send,
) -> Result<T> {
    let done = std::sync::atomic::AtomicBool::new(false);
    let poll = Client::new(socket).with_timeout(std::time::Duration::from_secs(5));
    let r = std::thread::scope(|s| {
        let drawer = s.spawn(|| {
            let mut drawn = false;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                if let Ok(r) = poll.request(Method::Get, "/vm/migration", None) {
                    if let Ok(p) = serde_json::from_str::<MigrationProgress>(&r.body) {
                        if p.phase != MigrationPhase::Completed && p.phase != MigrationPhase::Failed
                        {
                            eprint!("\r{}\x1b[K", progress_line(&p));
                            drawn = true;
                        }
                    }
                }
            }
            if drawn {
                eprintln!();
            }
        });
        let r = request();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = drawer.join();
        r
    });
    Ok(r)
}

/// One line of the progress bar.
pub fn progress_line(p: &MigrationProgress) -> String {
    let ram_pages = (p.ram_bytes / 4096).max(1);
    let frac = match p.phase {
        MigrationPhase::Connecting => 0.0,
        MigrationPhase::Copying => (p.pages_sent as f64 / ram_pages as f64).min(0.99),
        _ => 1.0,
    };
    const WIDTH: usize = 24;
    let filled = (frac * WIDTH as f64) as usize;
    format!(
        "[{}{}] {:>3.0}% {:<13} round {:>2}  sent {} MiB  dirty {} pages @ {}/s  {} MiB/s  est. downtime {} ms  throttle {}%",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        frac * 100.0,
        format!("{:?}", p.phase).to_lowercase(),
        p.round,
        p.bytes_sent >> 20,
        p.dirty_pages,
        p.dirty_rate_pages_per_sec,
        p.bandwidth_mbps,
        p.estimated_downtime_ms,
        p.throttle_percent
    )
}

/// The text `vireo ctl` prints for a successful answer.
fn human(verb: &Verb, resp: &Response) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    match verb {
        Verb::Info => {
            let i: VmInfo = serde_json::from_str(&resp.body)?;
            writeln!(out, "state: {}", i.state.as_str())?;
            if let Some(b) = &i.backend {
                writeln!(out, "backend: {b}")?;
            }
            if let Some(c) = &i.config {
                writeln!(out, "vcpus: {}", c.cpus)?;
                writeln!(out, "memory: {}", c.memory)?;
                writeln!(out, "kernel: {}", c.kernel.display())?;
                if !c.cmdline.is_empty() {
                    writeln!(out, "cmdline: {}", c.cmdline)?;
                }
                for (n, d) in c.disks.iter().enumerate() {
                    let ro = if d.readonly { " (read-only)" } else { "" };
                    writeln!(out, "disk {n}: {}{ro}", d.path.display())?;
                }
            }
            writeln!(out, "boots: {}", i.boots)?;
            if let Some(r) = &i.stop_reason {
                writeln!(out, "stopped: {r}")?;
            }
            if !i.devices.is_empty() {
                writeln!(out, "devices:")?;
                for d in &i.devices {
                    writeln!(out, "  {:<14} {}", d.address, d.name)?;
                }
            }
        }
        Verb::Counters => {
            let c: Counters = serde_json::from_str(&resp.body)?;
            writeln!(out, "state: {}", c.state.as_str())?;
            writeln!(
                out,
                "{:<5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
                "vcpu", "pio-in", "pio-out", "mmio-rd", "mmio-wr", "hlt", "kicks"
            )?;
            for v in &c.vcpus {
                writeln!(
                    out,
                    "{:<5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
                    v.vcpu,
                    v.pio_read,
                    v.pio_write,
                    v.mmio_read,
                    v.mmio_write,
                    v.hlt,
                    v.interrupted
                )?;
            }
            for d in &c.devices {
                let mut line = format!("{:<14} {:<12} accesses={}", d.address, d.name, d.accesses);
                for (k, v) in &d.counters {
                    write!(line, " {k}={v}")?;
                }
                writeln!(out, "{line}")?;
            }
        }
        Verb::Migration => {
            let p: MigrationProgress = serde_json::from_str(&resp.body)?;
            writeln!(out, "{}", progress_line(&p))?;
            if let Some(d) = p.downtime_ms {
                writeln!(out, "downtime: {d} ms, total {} ms", p.elapsed_ms)?;
            }
            if let Some(e) = &p.error {
                writeln!(out, "failed: {e}")?;
            }
        }
        Verb::Migrate { to, .. } => {
            let r: CommandReply = serde_json::from_str(&resp.body)?;
            match r.migration {
                Some(p) => writeln!(
                    out,
                    "migrated to {to} in {} ms ({} rounds, {} MiB sent, downtime {} ms, throttle {}%); state here: {}",
                    p.elapsed_ms,
                    p.round,
                    p.bytes_sent >> 20,
                    p.downtime_ms.unwrap_or(0),
                    p.throttle_percent,
                    r.state.as_str()
                )?,
                None => writeln!(out, "state: {}", r.state.as_str())?,
            }
        }
        _ => {
            let r: CommandReply = serde_json::from_str(&resp.body)?;
            let ms = r.micros as f64 / 1000.0;
            match (verb, r.memory) {
                (Verb::Snapshot { dir }, Some(m)) => writeln!(
                    out,
                    "snapshot written to {}: {} MiB of RAM, {} MiB of it written ({ms:.1} ms)",
                    dir.display(),
                    m.ram >> 20,
                    m.written >> 20
                )?,
                (Verb::Shutdown, _) => writeln!(
                    out,
                    "power button pressed; the guest is shutting down (state: {})",
                    r.state.as_str()
                )?,
                _ => writeln!(out, "state: {} ({ms:.1} ms)", r.state.as_str())?,
            }
        }
    }
    Ok(out)
}
