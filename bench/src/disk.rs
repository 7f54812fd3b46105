//! `bench/disk`, part 1: vireo's virtio-blk device model against the host's own I/O on the
//! same file. A host-side driver (`vireo_virtio::driver`) fills the device's queue in a guest
//! memory region and kicks it — no guest CPU involved. It behaves like Linux's virtio-blk
//! driver: VIRTIO_F_RING_EVENT_IDX, a kick only when avail_event asks, an interrupt asked for
//! (used_event) only when it has nothing left to take, and each completion replaced at once
//! (as fio keeps its queue full). The host's figures come from `dd`
//! (sequential, 1 MiB blocks) and `fio` (4 KiB random reads, queue depth 1 and 32), all with
//! O_DIRECT (the device with `direct=on`). Runs are interleaved; medians and device/host
//! ratios are printed.
//!
//! Usage: `target/release/disk [--file PATH] [--size-mib N] [--runs N] [--seconds S]
//! [--only seqr,seqw,qd1,qd32] [--overhead] [--driver-poll-us N]`
//!
//! Besides throughput, each row reports CPU time per request (or per MiB): the host's from
//! `getrusage(RUSAGE_CHILDREN)` around `dd`/`fio`, the device's from `getrusage(RUSAGE_SELF)`
//! around its run (this process: the driver thread, which plays the guest, and the device
//! thread).
//!
//! Waiting for a completion, the driver thread sleeps on the device's interrupt eventfd at
//! once by default, so each request at queue depth 1 costs two thread wake-ups (the disk's
//! completion wakes the device thread, whose interrupt wakes the driver) where `fio` has one.
//! In a VM on KVM the second is mostly absorbed by KVM's halt polling (a halted vCPU polls
//! for a while before it sleeps). `--driver-poll-us N` models that: the driver polls the used
//! ring for up to N µs (a window that adapts as KVM's does, see [`HaltPoll`]) before it
//! sleeps; 0 (the default) does not poll. The polling's CPU time is in the device's CPU
//! column (it is this process's user time), and a line after the table says how many waits
//! the polling ended.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_bench::{fmt, median};
use vireo_hv::halt_poll::HaltPoll;
use vireo_virtio::block::{
    Block, DiskImage, DiskOptions, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vireo_virtio::driver::{Desc, EventInterrupt, SplitQueueDriver};
use vireo_virtio::{
    Activation, ActiveQueue, VirtioDevice, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type GuestMemory = vireo_hv::GuestMemory;

struct Args {
    file: PathBuf,
    size_mib: u64,
    runs: usize,
    seconds: f64,
    /// Only the device, on the page cache (no O_DIRECT): its own cost per request.
    overhead: bool,
    /// Which rows to measure (all by default).
    only: [bool; 4],
    /// Longest halt-polling window of the driver, µs (0: sleep at once).
    driver_poll_us: u64,
}

/// Row names for `--only`, in table order.
const ROWS: [&str; 4] = ["seqr", "seqw", "qd1", "qd32"];

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        file: PathBuf::from("/var/tmp/vireo-bench-disk.img"),
        size_mib: 1024,
        runs: 5,
        seconds: 3.0,
        overhead: false,
        only: [true; 4],
        driver_poll_us: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--file" => a.file = PathBuf::from(val()?),
            "--size-mib" => a.size_mib = val()?.parse().map_err(|e| format!("{e}"))?,
            "--runs" => a.runs = val()?.parse().map_err(|e| format!("{e}"))?,
            "--seconds" => a.seconds = val()?.parse().map_err(|e| format!("{e}"))?,
            "--overhead" => a.overhead = true,
            "--driver-poll-us" => a.driver_poll_us = val()?.parse().map_err(|e| format!("{e}"))?,
            "--only" => {
                let list = val()?;
                a.only = [false; 4];
                for name in list.split(',') {
                    let i = ROWS
                        .iter()
                        .position(|r| *r == name)
                        .ok_or(format!("--only: unknown row {name} (rows: {ROWS:?})"))?;
                    a.only[i] = true;
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// Create the file with non-zero contents (no holes), unless it has the right size.
fn prepare(path: &Path, size: u64) -> std::io::Result<()> {
    if std::fs::metadata(path)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let f = std::fs::File::create(path)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        f.write_all_at(&chunk, i << 20)?;
    }
    f.sync_all()
}

// ---- the host ---------------------------------------------------------------------------------

/// `dd` with O_DIRECT over `mib` MiB: MiB/s from wall time.
fn host_dd(file: &Path, mib: u64, write: bool) -> Option<f64> {
    let f = file.to_str()?;
    let mut c = Command::new("dd");
    if write {
        c.args([
            "if=/dev/zero",
            &format!("of={f}"),
            "oflag=direct",
            "conv=notrunc",
        ]);
    } else {
        c.args([&format!("if={f}"), "of=/dev/null", "iflag=direct"]);
    }
    c.args(["bs=1M", &format!("count={mib}"), "status=none"]);
    let t = Instant::now();
    let ok = c.status().ok()?.success();
    ok.then(|| mib as f64 / t.elapsed().as_secs_f64())
}

/// `fio` 4 KiB random reads with O_DIRECT at `depth` (libaio) for `secs`: IOPS.
fn host_fio(file: &Path, depth: u32, secs: f64) -> Option<f64> {
    let out = Command::new("fio")
        .args([
            "--name=randread",
            &format!("--filename={}", file.to_str()?),
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            &format!("--iodepth={depth}"),
            &format!("--runtime={secs}"),
            "--time_based",
            "--output-format=terse",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Terse v3: field 8 (1-based) is read IOPS.
    text.lines().next()?.split(';').nth(7)?.parse().ok()
}

// ---- the device -------------------------------------------------------------------------------

/// Guest memory layout of the benchmark: the queue, then per-slot request areas.
const QUEUE_BASE: u64 = 0x10_0000;
const SLOTS_BASE: u64 = 0x20_0000;
/// Per slot: header at +0, status at +0x100, data from +0x1000 (4 KiB aligned for O_DIRECT).
const SLOT_SIZE: u64 = 0x1000 + (1 << 20);
const MAX_DEPTH: u64 = 32;
const MEM_SIZE: u64 = SLOTS_BASE + MAX_DEPTH * SLOT_SIZE;

struct Device {
    mem: GuestMemory,
    driver: SplitQueueDriver,
    notify: EventFd,
    irq: Arc<EventInterrupt>,
    _blk: Block,
    sectors: u64,
    /// Slot of each chain in flight, by head.
    slot_of: std::collections::HashMap<u16, u64>,
    /// Polling before sleeping on the interrupt (`--driver-poll-us`).
    poll: HaltPoll,
}

impl Device {
    fn new(file: &Path, direct: bool, poll_us: u64) -> Result<Device, String> {
        let disk = DiskImage::open(&DiskOptions {
            direct,
            ..DiskOptions::new(file)
        })
        .map_err(|e| e.to_string())?;
        let sectors = disk.sectors();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .map_err(|e| e.to_string())?;
        let mut driver = SplitQueueDriver::new(&mem, QUEUE_BASE, vireo_virtio::block::QUEUE_SIZE);
        // As Linux does: notifications and interrupts suppressed with avail_event/used_event.
        driver.set_event_idx(true);
        let notify = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let irq = Arc::new(EventInterrupt::new().map_err(|e| e.to_string())?);
        let mut blk = Block::new(Arc::new(disk), 0);
        blk.activate(Activation {
            mem: mem.clone(),
            features: VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_BLK_F_FLUSH,
            queues: vec![ActiveQueue {
                index: 0,
                queue: driver.queue().map_err(|e| e.to_string())?,
                notify: notify.try_clone().map_err(|e| e.to_string())?,
            }],
            interrupt: irq.clone(),
        })
        .map_err(|e| e.to_string())?;
        Ok(Device {
            mem,
            driver,
            notify,
            irq,
            _blk: blk,
            sectors,
            slot_of: std::collections::HashMap::new(),
            poll: HaltPoll::new(Duration::from_micros(poll_us)),
        })
    }

    /// Queue a request in slot `slot`: `len` bytes at `sector`.
    fn submit(&mut self, slot: u64, write: bool, sector: u64, len: u32) -> Result<(), String> {
        let base = SLOTS_BASE + slot * SLOT_SIZE;
        let mut hdr = [0u8; 16];
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&hdr, GuestAddress(base))
            .map_err(|e| e.to_string())?;
        let data = Desc {
            addr: base + 0x1000,
            len,
            write: !write,
        };
        let head = self
            .driver
            .add(
                &self.mem,
                &[Desc::r(base, 16), data, Desc::w(base + 0x100, 1)],
            )
            .ok_or("queue full")?;
        // The head tells which slot completed.
        self.slot_of.insert(head, slot);
        Ok(())
    }

    /// Notify the device of the requests queued since the last kick, if it asked for it
    /// (avail_event; Linux `virtqueue_kick`).
    fn kick(&mut self) -> Result<(), String> {
        if self.driver.kick_needed(&self.mem) {
            self.notify.write(1).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The next completed request's slot (status checked), waiting for one if none is there.
    /// Like Linux's `virtblk_done`: take used requests while there are any, and only when
    /// there are none ask for the next interrupt (used_event) and halt: poll for up to the
    /// [`HaltPoll`] window (none by default), then sleep.
    ///
    /// A completion the polling finds still raises its interrupt (used_event asked for it),
    /// so the eventfd keeps a count nobody read. That is harmless: the count only makes the
    /// next sleep's `read` return at once (and take the count to zero), and the loop checks
    /// the ring again and goes back to sleep if it is empty. Only the first halt of a call
    /// polls, so such a stale wake-up does not poll a second window either.
    fn next_done(&mut self) -> Result<u64, String> {
        // When this call began to halt, and whether the polling found the completion.
        let mut halted: Option<Instant> = None;
        let mut hit = false;
        let (head, _len) = loop {
            if let Some(used) = self.driver.pop_used(&self.mem) {
                break used;
            }
            if self.driver.enable_interrupts(&self.mem) {
                continue; // completions raced in
            }
            if self
                .irq
                .needs_reset
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err("the device needs a reset".into());
            }
            if self.poll.enabled() && halted.is_none() {
                let start = Instant::now();
                halted = Some(start);
                // `pop_used` takes nothing while the used ring is empty: it is the check.
                let (driver, mem) = (&mut self.driver, &self.mem);
                if let Some(used) = self.poll.poll_window(start, None, || driver.pop_used(mem)) {
                    hit = true;
                    break used;
                }
            }
            // Blocks until the device interrupts (a non-blocking eventfd would spin: this one
            // is blocking).
            self.irq.queue.read().map_err(|e| e.to_string())?;
        };
        if let Some(start) = halted {
            self.poll.adapt(start.elapsed(), hit);
        }
        let slot = self.slot_of.remove(&head).ok_or("unknown head")?;
        let status: u8 = self
            .mem
            .read_obj(GuestAddress(SLOTS_BASE + slot * SLOT_SIZE + 0x100))
            .map_err(|e| e.to_string())?;
        if status != VIRTIO_BLK_S_OK {
            return Err(format!("request failed with status {status}"));
        }
        Ok(slot)
    }
}

/// Sequential 1 MiB requests over `mib` MiB at queue depth 1: MiB/s.
fn device_seq(d: &mut Device, mib: u64, write: bool) -> Result<f64, String> {
    let t = Instant::now();
    for i in 0..mib {
        d.submit(0, write, i * 2048, 1 << 20)?;
        d.kick()?;
        d.next_done()?;
    }
    Ok(mib as f64 / t.elapsed().as_secs_f64())
}

/// 4 KiB random reads at `depth` for `secs`: IOPS and the number of requests.
fn device_rand(d: &mut Device, depth: u64, secs: f64) -> Result<(f64, u64), String> {
    let blocks = d.sectors / 8;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ depth;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % blocks
    };
    for slot in 0..depth {
        d.submit(slot, false, next() * 8, 4096)?;
    }
    d.kick()?;
    let t = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    let mut ios = 0u64;
    let mut inflight = depth;
    // As fio does with its own queue: each completion is replaced at once.
    while inflight > 0 {
        let slot = d.next_done()?;
        ios += 1;
        inflight -= 1;
        if t.elapsed() < deadline {
            d.submit(slot, false, next() * 8, 4096)?;
            inflight += 1;
            d.kick()?;
        }
    }
    Ok((ios as f64 / t.elapsed().as_secs_f64(), ios))
}

/// The device on a page-cached file: requests per second it serves when the disk costs
/// (almost) nothing, i.e. its own overhead per request.
fn overhead(a: &Args) -> Result<(), String> {
    let mut dev = Device::new(&a.file, false, a.driver_poll_us)?;
    // Warm the page cache.
    device_seq(&mut dev, a.size_mib, false)?;
    let mut qd1 = Vec::new();
    let mut qd32 = Vec::new();
    for _ in 0..a.runs {
        qd1.push(device_rand(&mut dev, 1, a.seconds)?.0);
        qd32.push(device_rand(&mut dev, 32, a.seconds)?.0);
    }
    let (q1, q32) = (median(qd1), median(qd32));
    if dev.poll.enabled() {
        println!(
            "driver polling up to {} µs: {} of {} waits ended by polling",
            a.driver_poll_us,
            dev.poll.counts().1,
            dev.poll.counts().0
        );
    }
    println!(
        "device on the page cache, 4 KiB random reads: QD1 {} IOPS ({} µs per request), QD32 {} IOPS ({} µs per request)",
        fmt(q1, 0),
        fmt(q1.map(|x| 1e6 / x), 1),
        fmt(q32, 0),
        fmt(q32.map(|x| 1e6 / x), 1)
    );
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("disk: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("disk: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), String> {
    let size = a.size_mib << 20;
    prepare(&a.file, size).map_err(|e| format!("{}: {e}", a.file.display()))?;
    if a.overhead {
        return overhead(a);
    }
    let have_fio = Command::new("fio").arg("--version").output().is_ok();
    if !have_fio {
        eprintln!("note: fio is not installed (apt-get install fio): no host figures for the random reads");
    }
    let mut dev = Device::new(&a.file, true, a.driver_poll_us)?;
    let seq_mib = a.size_mib.min(512);
    // [host, device] samples of: seq read, seq write, rand QD1, rand QD32; each (rate, CPU
    // seconds per unit).
    let mut s: [[Vec<(f64, f64)>; 2]; 4] = Default::default();
    // Per row: the driver's waits, and how many of them its polling ended.
    let mut polled = [(0u64, 0u64); 4];
    let mut count_polls = |i: usize, dev: &Device, before: (u64, u64)| {
        polled[i].0 += dev.poll.counts().0 - before.0;
        polled[i].1 += dev.poll.counts().1 - before.1;
    };
    for run in 0..a.runs {
        eprint!("run {}/{}\r", run + 1, a.runs);
        let _ = std::io::stderr().flush();
        for (i, write) in [(0, false), (1, true)] {
            if !a.only[i] {
                continue;
            }
            let c = children_cpu();
            if let Some(v) = host_dd(&a.file, seq_mib, write) {
                s[i][0].push((v, (children_cpu() - c) / seq_mib as f64));
            }
            let (c, p) = (own_cpu(), dev.poll.counts());
            let v = device_seq(&mut dev, seq_mib, write)?;
            s[i][1].push((v, (own_cpu() - c) / seq_mib as f64));
            count_polls(i, &dev, p);
        }
        for (i, depth) in [(2, 1u32), (3, 32)] {
            if !a.only[i] {
                continue;
            }
            if have_fio {
                let c = children_cpu();
                if let Some(v) = host_fio(&a.file, depth, a.seconds) {
                    s[i][0].push((v, (children_cpu() - c) / (v * a.seconds)));
                }
            }
            let (c, p) = (own_cpu(), dev.poll.counts());
            let (v, ios) = device_rand(&mut dev, u64::from(depth), a.seconds)?;
            s[i][1].push((v, (own_cpu() - c) / ios.max(1) as f64));
            count_polls(i, &dev, p);
        }
    }
    eprintln!();
    println!(
        "file {} ({} MiB), {} runs, O_DIRECT on both sides; medians; driver polling {}",
        a.file.display(),
        a.size_mib,
        a.runs,
        if a.driver_poll_us == 0 {
            "off".to_string()
        } else {
            format!(
                "up to {} µs (adaptive, as KVM's halt polling)",
                a.driver_poll_us
            )
        }
    );
    println!("| test | host | vireo device | device/host | CPU µs per unit: host | device |");
    println!("|---|---:|---:|---:|---:|---:|");
    let names = [
        "sequential read, 1 MiB, QD1 (MiB/s)",
        "sequential write, 1 MiB, QD1 (MiB/s)",
        "random read, 4 KiB, QD1 (IOPS)",
        "random read, 4 KiB, QD32 (IOPS)",
    ];
    for (i, name) in names.iter().enumerate() {
        if !a.only[i] {
            continue;
        }
        let col = |side: usize, f: fn(&(f64, f64)) -> f64| {
            median(s[i][side].iter().map(f).collect::<Vec<_>>())
        };
        let host = col(0, |x| x.0);
        let dev = col(1, |x| x.0);
        let ratio = host.zip(dev).map(|(h, d)| d / h);
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            fmt(host, 0),
            fmt(dev, 0),
            fmt(ratio, 2),
            fmt(col(0, |x| x.1 * 1e6), 1),
            fmt(col(1, |x| x.1 * 1e6), 1),
        );
    }
    if a.driver_poll_us != 0 {
        for (i, name) in names.iter().enumerate() {
            let (waits, hits) = polled[i];
            if a.only[i] && waits > 0 {
                println!(
                    "driver polling, {name}: {hits} of {waits} waits ended by polling ({:.1}%)",
                    100.0 * hits as f64 / waits as f64
                );
            }
        }
    }
    Ok(())
}

/// CPU seconds (user + system) of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`).
fn rusage_cpu(who: libc::c_int) -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value (integers and timevals).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given, which lives for the call.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of the children waited for so far (`dd`, `fio`).
fn children_cpu() -> f64 {
    rusage_cpu(libc::RUSAGE_CHILDREN)
}

/// CPU seconds of this process (the driver thread and the device thread).
fn own_cpu() -> f64 {
    rusage_cpu(libc::RUSAGE_SELF)
}
