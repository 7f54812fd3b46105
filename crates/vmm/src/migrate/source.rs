//! The sending side: pre-copy rounds, convergence, auto-converge, the switch.

use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_hv::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::proto::{self, Kind, MAX_FRAME_PAGES, PAGE};
use super::{count, merge, MigrateError, MigrateRequest, MigrationPhase, MigrationProgress, Offer};
use crate::config::VmConfig;
use crate::machine::{Machine, THROTTLE_PERIOD};
use crate::snapshot::{self, PageMap};
use crate::vm::VmmHandle;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the source waits for an answer (the destination rebuilding the machine).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Auto-converge: the first throttle and each further step, in percent.
const THROTTLE_INITIAL: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;
/// A further round is worth it while it leaves less than this share of the dirty pages.
const SHRINK: f64 = 0.75;
/// An estimated downtime this short ends the rounds at once.
const TINY_DOWNTIME_MS: u64 = 5;
/// How often the statistics are published in the middle of a round.
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// What the source works with.
pub(crate) struct Source<'a> {
    pub machine: &'a mut Machine,
    pub handle: &'a VmmHandle,
    pub config: &'a VmConfig,
    pub backend: &'a str,
    pub disks: &'a [Arc<vireo_virtio::DiskImage>],
    /// Called with the statistics after every round and phase change.
    pub progress: &'a dyn Fn(&MigrationProgress),
}

fn vmm_err(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Vmm(e.to_string())
}

/// The sending end of the connection, counting bytes and keeping to a bandwidth cap.
struct Link {
    w: BufWriter<TcpStream>,
    r: TcpStream,
    buf: Vec<u8>,
    sent: u64,
    start: Instant,
    /// Bytes per second at most.
    limit: Option<u64>,
    /// Time spent sending pages (for the bandwidth estimate).
    busy: Duration,
}

impl Link {
    fn frame(&mut self, kind: Kind, arg: u64, payload: &[u8]) -> Result<(), MigrateError> {
        proto::write_frame(&mut self.w, kind, arg, payload)?;
        self.sent += 24 + payload.len() as u64;
        if let Some(limit) = self.limit {
            let due = Duration::from_secs_f64(self.sent as f64 / limit as f64);
            let now = self.start.elapsed();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MigrateError> {
        self.w.flush().map_err(|source| MigrateError::Io {
            what: "sending",
            source,
        })
    }

    fn expect(&mut self, want: Kind) -> Result<u64, MigrateError> {
        proto::expect(&mut self.r, &mut self.buf, want)
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().fold(0u8, |a, &b| a | b) == 0
}

/// Every page of each region that may hold data: populated pages of anonymous memory
/// (`/proc/self/pagemap`), every page of memory mapped from a file.
fn populated(mem: &GuestMemory) -> Vec<Vec<u64>> {
    let pm = PageMap::open();
    let mut flags = Vec::new();
    mem.iter()
        .map(|r| {
            let pages = r.len().div_ceil(PAGE) as usize;
            let mut bm = vec![0u64; pages.div_ceil(64)];
            let from_file = r.file_offset().is_some();
            let host = r.as_ptr() as u64 / PAGE;
            const CHUNK: usize = 4096;
            let mut at = 0;
            while at < pages {
                let n = (pages - at).min(CHUNK);
                if from_file {
                    flags.clear();
                    flags.resize(n, true);
                } else {
                    pm.populated(host + at as u64, n, &mut flags);
                }
                for (i, &f) in flags.iter().enumerate() {
                    if f {
                        let p = at + i;
                        bm[p / 64] |= 1 << (p % 64);
                    }
                }
                at += n;
            }
            bm
        })
        .collect()
}

/// Send the pages set in `bm` (one bitmap per region). Zero pages are sent as `Zeros`
/// frames, or skipped on the first round (`skip_zero`: the destination's RAM starts zeroed).
/// Returns the number of pages covered.
fn send_pages(
    link: &mut Link,
    mem: &GuestMemory,
    bm: &[Vec<u64>],
    skip_zero: bool,
    stop: &dyn Fn() -> bool,
    report: &mut dyn FnMut(u64, u64),
) -> Result<u64, MigrateError> {
    let t0 = Instant::now();
    let mut reported = t0;
    let mut buf = vec![0u8; (MAX_FRAME_PAGES * PAGE) as usize];
    let mut total = 0;
    for (r, words) in mem.iter().zip(bm) {
        let base = r.start_addr().0;
        let pages = r.len() / PAGE;
        let mut p = 0u64;
        while p < pages {
            let w = words.get((p / 64) as usize).copied().unwrap_or(0);
            if w == 0 && p.is_multiple_of(64) {
                p += 64;
                continue;
            }
            if w & (1 << (p % 64)) == 0 {
                p += 1;
                continue;
            }
            // A run of set pages, at most one frame long.
            let first = p;
            while p < pages
                && p - first < MAX_FRAME_PAGES
                && words.get((p / 64) as usize).copied().unwrap_or(0) & (1 << (p % 64)) != 0
            {
                p += 1;
            }
            let n = p - first;
            total += n;
            let data = &mut buf[..(n * PAGE) as usize];
            mem.read_slice(data, GuestAddress(base + first * PAGE))
                .map_err(vmm_err)?;
            // Split into runs of zero and non-zero pages.
            let mut i = 0usize;
            while i < n as usize {
                let zero = is_zero(&data[i * PAGE as usize..(i + 1) * PAGE as usize]);
                let s = i;
                while i < n as usize
                    && is_zero(&data[i * PAGE as usize..(i + 1) * PAGE as usize]) == zero
                {
                    i += 1;
                }
                let addr = base + (first + s as u64) * PAGE;
                if !zero {
                    link.frame(
                        Kind::Pages,
                        addr,
                        &data[s * PAGE as usize..i * PAGE as usize],
                    )?;
                } else if !skip_zero {
                    link.frame(Kind::Zeros, (i - s) as u64, &addr.to_le_bytes())?;
                }
            }
            if reported.elapsed() >= REPORT_EVERY {
                reported = Instant::now();
                report(total, link.sent);
                if stop() {
                    return Err(MigrateError::Vmm(
                        "the guest stopped during the migration".into(),
                    ));
                }
            }
        }
        if stop() {
            return Err(MigrateError::Vmm(
                "the guest stopped during the migration".into(),
            ));
        }
    }
    link.busy += t0.elapsed();
    Ok(total)
}

/// The vCPUs' and the VMM's writes since the last call.
fn take_dirty(m: &Machine) -> Result<Vec<Vec<u64>>, MigrateError> {
    let mut bm = m.vm().take_dirty_log().map_err(vmm_err)?;
    merge(&mut bm, &vireo_hv::take_vmm_dirty(m.memory()));
    Ok(bm)
}

/// Kicks the vCPUs every [`THROTTLE_PERIOD`] while auto-converge throttles them.
struct Throttler {
    percent: Arc<AtomicU32>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttler {
    fn start(handle: &VmmHandle) -> Throttler {
        let percent = Arc::new(AtomicU32::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (p, d, h) = (percent.clone(), done.clone(), handle.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || {
                while !d.load(Ordering::SeqCst) {
                    std::thread::sleep(THROTTLE_PERIOD);
                    if p.load(Ordering::Relaxed) > 0 {
                        h.kick_all();
                    }
                }
            })
            .ok();
        Throttler {
            percent,
            done,
            thread,
        }
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect(to: &str) -> Result<TcpStream, MigrateError> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|source| MigrateError::Io {
            what: "resolving the destination",
            source,
        })?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(MigrateError::Io {
        what: "connecting to the destination",
        source: last.unwrap_or_else(|| std::io::Error::other(format!("{to}: no address"))),
    })
}

/// Migrate the running machine. On success the guest runs at the destination (the caller
/// tears this copy down); on failure it runs here, resumed if it had been paused.
pub(crate) fn migrate(
    src: Source<'_>,
    req: &MigrateRequest,
) -> Result<MigrationProgress, MigrateError> {
    let ram: u64 = src.machine.memory().iter().map(|r| r.len()).sum();
    let mut p = MigrationProgress::new(&req.to, ram);
    let start = Instant::now();
    (src.progress)(&p);
    let Source {
        machine,
        handle,
        config,
        backend,
        disks,
        progress,
    } = src;
    let r = run(
        machine, handle, config, backend, disks, progress, req, &mut p, start,
    );
    p.elapsed_ms = start.elapsed().as_millis() as u64;
    match r {
        Ok(()) => {
            p.phase = MigrationPhase::Completed;
            progress(&p);
            Ok(p)
        }
        Err(e) => {
            p.phase = MigrationPhase::Failed;
            p.error = Some(e.to_string());
            progress(&p);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    machine: &mut Machine,
    handle: &VmmHandle,
    config: &VmConfig,
    backend: &str,
    disks: &[Arc<vireo_virtio::DiskImage>],
    progress: &dyn Fn(&MigrationProgress),
    req: &MigrateRequest,
    p: &mut MigrationProgress,
    start: Instant,
) -> Result<(), MigrateError> {
    let stream = connect(&req.to)?;
    let setup = |e| MigrateError::Io {
        what: "socket set-up",
        source: e,
    };
    stream.set_nodelay(true).map_err(setup)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(setup)?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(setup)?;
    let mut s = stream.try_clone().map_err(setup)?;
    proto::hello_client(&mut s)?;
    let mut link = Link {
        w: BufWriter::with_capacity(1 << 20, stream),
        r: s,
        buf: Vec::new(),
        sent: 0,
        start: Instant::now(),
        limit: req.bandwidth_mbps.filter(|&b| b > 0).map(|b| b << 20),
        busy: Duration::ZERO,
    };
    let mem = machine.memory().clone();
    let offer = Offer {
        config: config.clone(),
        backend: backend.to_string(),
        regions: mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
    };
    let offer = serde_json::to_vec(&offer).map_err(vmm_err)?;
    link.frame(Kind::Offer, 0, &offer)?;
    link.flush()?;
    link.expect(Kind::Ready)?;

    // Pre-copy, the guest running.
    machine.vm().enable_dirty_log().map_err(vmm_err)?;
    let _ = vireo_hv::take_vmm_dirty(&mem);
    let throttler = Throttler::start(handle);
    let r = precopy(
        machine, handle, &mut link, &mem, req, p, start, progress, &throttler,
    );
    machine.set_throttle(0);
    drop(throttler);
    let remaining = match r {
        Ok(bm) => bm,
        Err(e) => {
            let _ = machine.vm().disable_dirty_log();
            abort(&mut link, &e);
            return Err(e);
        }
    };

    // Stop and copy.
    p.phase = MigrationPhase::StopAndCopy;
    progress(p);
    let paused_at = Instant::now();
    if let Err(e) = machine.pause(handle) {
        let _ = machine.vm().disable_dirty_log();
        let e = vmm_err(format!("pausing the guest: {e}"));
        abort(&mut link, &e);
        return Err(e);
    }
    let r = switch(
        machine, config, backend, disks, &mut link, &mem, remaining, p, paused_at,
    );
    // The guest runs at the destination from here (on success): what follows here is not
    // downtime (turning the dirty log off over 1 GiB takes the emulator ~10 ms).
    let downtime = paused_at.elapsed();
    let _ = machine.vm().disable_dirty_log();
    match r {
        Ok(()) => {
            p.downtime_ms = Some(downtime.as_millis() as u64);
            Ok(())
        }
        Err(e @ MigrateError::InDoubt(_)) => {
            // Not resumed, no `Abort` (the destination may be running the guest). The disks
            // are locked again where possible: a destination that runs the guest holds them.
            for d in disks {
                if let Err(e) = d.relock() {
                    tracing::error!(
                        "migration in doubt; {} (held by the destination?): {e}",
                        d.path().display()
                    );
                }
            }
            tracing::error!("migration to {}: {e}", req.to);
            Err(e)
        }
        Err(e) => {
            abort(&mut link, &e);
            for d in disks {
                if let Err(e) = d.relock() {
                    tracing::error!("migration failed; {}: {e}", d.path().display());
                }
            }
            machine
                .resume()
                .map_err(|r| vmm_err(format!("{e}; and resuming the guest failed: {r}")))?;
            Err(e)
        }
    }
}

/// Tell the destination why we give up (best effort: the link may be what failed).
fn abort(link: &mut Link, e: &MigrateError) {
    let _ = link.frame(Kind::Abort, 0, e.to_string().as_bytes());
    let _ = link.flush();
}

/// The rounds: the full copy, then dirty pages until they fit the downtime. Returns what is
/// dirty at the end.
#[allow(clippy::too_many_arguments)]
fn precopy(
    machine: &Machine,
    handle: &VmmHandle,
    link: &mut Link,
    mem: &GuestMemory,
    req: &MigrateRequest,
    p: &mut MigrationProgress,
    start: Instant,
    progress: &dyn Fn(&MigrationProgress),
    throttler: &Throttler,
) -> Result<Vec<Vec<u64>>, MigrateError> {
    let max_downtime = req
        .max_downtime_ms
        .unwrap_or(super::DEFAULT_MAX_DOWNTIME_MS);
    let max_rounds = req.max_rounds.unwrap_or(super::DEFAULT_MAX_ROUNDS).max(1);
    let auto_converge = req.auto_converge.unwrap_or(true);
    let stop = || handle.stopping();
    p.phase = MigrationPhase::Copying;
    let mut pending = populated(mem);
    let mut last_take = Instant::now();
    let mut throttle = 0u32;
    let mut prev_dirty = u64::MAX;
    progress(p);
    loop {
        p.round += 1;
        let first = p.round == 1;
        let sent_before = p.pages_sent;
        let n = send_pages(link, mem, &pending, first, &stop, &mut |pages, bytes| {
            p.pages_sent = sent_before + pages;
            p.bytes_sent = bytes;
            p.elapsed_ms = start.elapsed().as_millis() as u64;
            progress(p);
        })?;
        p.pages_sent = sent_before;
        link.flush()?;
        p.pages_sent += n;
        p.last_round_pages = n;
        pending = take_dirty(machine)?;
        let dt = last_take.elapsed().as_secs_f64().max(1e-6);
        last_take = Instant::now();
        let dirty = count(&pending);
        // Throughput over all rounds so far: steadier than one short round.
        let bw = link.sent as f64 / link.busy.as_secs_f64().max(1e-6);
        let bw = match link.limit {
            Some(l) => bw.min(l as f64),
            None => bw,
        }
        .max(1.0);
        let rate = dirty as f64 / dt;
        p.bytes_sent = link.sent;
        p.dirty_pages = dirty;
        p.dirty_rate_pages_per_sec = rate as u64;
        p.bandwidth_mbps = (bw / (1 << 20) as f64) as u64;
        p.estimated_downtime_ms = (dirty as f64 * PAGE as f64 / bw * 1000.0) as u64;
        p.elapsed_ms = start.elapsed().as_millis() as u64;
        p.throttle_percent = throttle;
        progress(p);
        tracing::debug!(
            "migration round {}: {n} pages, {dirty} dirty, {:.0} MiB/s, {} ms estimated downtime",
            p.round,
            bw / (1 << 20) as f64,
            p.estimated_downtime_ms
        );
        if stop() {
            return Err(MigrateError::Vmm(
                "the guest stopped during the migration".into(),
            ));
        }
        // The switch: once the rest fits the allowed downtime, go on while a round still
        // shrinks the dirty set by a quarter (each round then buys a shorter pause), unless it
        // is already tiny; or when rounds run out.
        let fits = p.estimated_downtime_ms <= max_downtime;
        let shrinking = (dirty as f64) < prev_dirty as f64 * SHRINK;
        let tiny = p.estimated_downtime_ms <= TINY_DOWNTIME_MS;
        if (fits && (tiny || !shrinking)) || p.round >= max_rounds {
            return Ok(pending);
        }
        prev_dirty = dirty;
        // Not converging: the guest dirties more than half of what the link carries.
        if auto_converge && !first && rate * PAGE as f64 > bw / 2.0 {
            throttle = if throttle == 0 {
                THROTTLE_INITIAL
            } else {
                (throttle + THROTTLE_STEP).min(THROTTLE_MAX)
            };
            machine.set_throttle(throttle);
            throttler.percent.store(throttle, Ordering::Relaxed);
            p.throttle_percent = throttle;
        }
    }
}

/// With the guest paused: the disks, the last pages, the state, the commit.
#[allow(clippy::too_many_arguments)]
fn switch(
    machine: &Machine,
    config: &VmConfig,
    backend: &str,
    disks: &[Arc<vireo_virtio::DiskImage>],
    link: &mut Link,
    mem: &GuestMemory,
    mut remaining: Vec<Vec<u64>>,
    p: &mut MigrationProgress,
    paused_at: Instant,
) -> Result<(), MigrateError> {
    // Where the downtime goes, for the log: (step, time it ended).
    let t0 = paused_at;
    let mut marks: Vec<(&str, Instant)> = Vec::with_capacity(7);
    marks.push(("pause", Instant::now()));
    merge(&mut remaining, &take_dirty(machine)?);
    marks.push(("dirty log", Instant::now()));
    // Shared storage: everything the guest wrote is on disk before the destination opens it.
    for d in disks {
        d.flush()
            .map_err(|e| vmm_err(format!("flushing {}: {e}", d.path().display())))?;
    }
    for d in disks {
        d.unlock()
            .map_err(|e| vmm_err(format!("unlocking {}: {e}", d.path().display())))?;
    }
    marks.push(("disks", Instant::now()));
    let n = send_pages(link, mem, &remaining, false, &|| false, &mut |_, _| {})?;
    marks.push(("last pages", Instant::now()));
    p.pages_sent += n;
    p.last_round_pages = n;
    p.dirty_pages = 0;
    let mut state = machine.machine_state(config, backend).map_err(vmm_err)?;
    state.memory = mem
        .iter()
        .map(|r| snapshot::MemoryRegion {
            guest_addr: r.start_addr().0,
            len: r.len(),
            file_offset: 0,
        })
        .collect();
    let bytes = snapshot::encode_state(&state).map_err(vmm_err)?;
    link.frame(Kind::State, 0, &bytes)?;
    link.flush()?;
    marks.push(("state", Instant::now()));
    p.bytes_sent = link.sent;
    link.expect(Kind::Restored)?;
    marks.push(("destination rebuild", Instant::now()));
    // The commit point: from the moment `Commit` may have reached the destination, the
    // guest must not run here unless the destination says it does not run it there.
    let sent = link.frame(Kind::Commit, 0, &[]).and_then(|()| link.flush());
    match sent.and_then(|()| link.expect(Kind::Running)) {
        Ok(_) => {
            marks.push(("commit", Instant::now()));
            let mut from = t0;
            let steps: Vec<String> = marks
                .iter()
                .map(|&(what, at)| {
                    let d = at - from;
                    from = at;
                    format!("{what} {:.1} ms", d.as_secs_f64() * 1e3)
                })
                .collect();
            tracing::info!(
                "migration switch ({n} pages, {} KiB of state): {}",
                bytes.len() / 1024,
                steps.join(", ")
            );
            Ok(())
        }
        // A definite answer: the destination refused the commit (and dropped its copy).
        Err(e @ MigrateError::Peer(_)) => Err(e),
        // A broken link, a timeout, garbage: the destination may or may not run it.
        Err(e) => Err(MigrateError::InDoubt(e.to_string())),
    }
}

/// A name for the stream in state-decoding errors.
pub(crate) fn stream_path() -> &'static Path {
    Path::new("the migration stream")
}
