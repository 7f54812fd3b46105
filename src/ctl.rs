//! `vireo ctl`: one API request per invocation, human output or `--json`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vireo_api::client::{Client, Response};
use vireo_api::{ErrorBody, Method, SnapshotRequest};
use vireo_vmm::config::DiskConfig;
use vireo_vmm::{CommandReply, Counters, RestoreRequest, VmInfo};

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
        Verb::Exit => (Method::Put, "/vmm/exit", None),
    };
    let resp = client.request(method, path, body.as_deref())?;
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
