//! `bench/migrate`: live migration over loopback, vireo against QEMU on the same guest (the
//! default guest: Debian's kernel and busybox initramfs with a small `/bin/ticker` added, same
//! command line), 1 GiB of RAM: an idle guest and one rewriting memory at 50, 200 and 1000
//! MiB/s (target rates: `dd` of a non-zero file over a 256 MiB working set, paced per second;
//! the emulator may not reach the higher ones, which then means "as fast as it can").
//!
//! For each: total time and downtime as the VMM reports them (vireo: `PUT /vm/migrate`'s
//! statistics, from pause to the destination running; QEMU: `query-migrate`'s `total-time`
//! and `downtime`), and the guest-observed downtime: the guest's `/bin/ticker` reads its
//! monotonic clock (`CLOCK_MONOTONIC`) in a tight loop and prints `gap N` (microseconds)
//! whenever two consecutive readings are 2 ms or more apart, and `t N` every millisecond; the
//! bench reports the largest guest gap around the switch ("guest-gap"), the largest gap
//! between `t` lines as the host receives them (source output, then destination output:
//! "host-gap", which sees a pause even if the guest's clock was stopped during it), and the
//! largest guest gap over as long a window before the migration (the noise floor,
//! "idle-gap").
//!
//! vireo runs the emulator (`--accel emu`) against QEMU TCG; with `--accel kvm`, KVM against
//! QEMU KVM. QEMU gets auto-converge on and the same downtime limit (300 ms).
//!
//! Usage: `cargo build --release --workspace &&
//! target/x86_64-unknown-linux-gnu/release/migrate [--accel emu|kvm] [--rates 0,50,200,1000]
//! [--no-qemu]` (needs `rustc` to build the guest's ticker).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_bench::qmp::Qmp;
use vireo_bench::{fmt, have, qemu_accel, qemu_pc, vireo_binary};
use vireo_guests::default_guest::{cache_dir, command_param, ensure, Options};

const QEMU: &str = "qemu-system-x86_64";
const MEMORY: &str = "1G";
/// How long the guest runs its workload before the migration starts.
const WARMUP: Duration = Duration::from_secs(4);

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The guest's tick loop (built at run time with the host's `rustc` as a static binary):
/// reads the monotonic clock in a tight loop; `gap N` when two readings are 2 ms or more apart
/// (N in microseconds), `t N` (microseconds since it started) every millisecond.
const TICKER_RS: &str = r#"
use std::io::Write;
use std::time::{Duration, Instant};
fn main() {
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "bench-start");
    let (mut last, mut printed) = (start, start);
    loop {
        let now = Instant::now();
        let gap = now - last;
        if gap >= Duration::from_millis(2) {
            let _ = writeln!(out, "gap {}", gap.as_micros());
        }
        if now - printed >= Duration::from_millis(1) {
            let _ = writeln!(out, "t {}", (now - start).as_micros());
            printed = now;
        }
        last = now;
    }
}
"#;

/// Build the ticker and give the default guest's initramfs with `/bin/ticker` appended (the
/// kernel unpacks concatenated newc archives in order).
fn initrd_with_ticker(base: &Path, dir: &Path) -> Result<PathBuf, String> {
    use vireo_guests::default_guest::extra::{build_static_tool, initrd_with_files};
    let src = dir.join("ticker.rs");
    let bin = dir.join("ticker");
    std::fs::write(&src, TICKER_RS).map_err(|e| e.to_string())?;
    build_static_tool(&src, &bin).map_err(|e| format!("building the ticker: {e}"))?;
    let out = dir.join("initrd-ticker.cpio");
    initrd_with_files(base, &[("bin/ticker", &bin)], &out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The guest: a 64 MiB non-zero source file, a dirtier rewriting a 256 MiB file at `rate`
/// MiB/s (none at 0), and the ticker.
fn workload(rate: u32) -> String {
    let dirtier = if rate == 0 {
        String::new()
    } else {
        format!(
            "yes vireo-bench | head -c 67108864 > /tmp/src; \
             (off=0; while true; do dd if=/tmp/src of=/tmp/d bs=1M count={rate} seek=$off \
             conv=notrunc 2>/dev/null; off=$(( (off + {rate}) % 256 )); sleep 1; done) & "
        )
    };
    format!("{dirtier}exec /bin/ticker")
}

/// What the guests print, with the host time each line arrived: `t` lines, and the gaps the
/// guest saw (ms).
#[derive(Default)]
struct Seen {
    ticks: Vec<Instant>,
    gaps: Vec<(Instant, f64)>,
}

type Ticks = Arc<Mutex<Seen>>;

fn watch(child: &mut Child, ticks: &Ticks, started: &Arc<Mutex<Option<Instant>>>) {
    let Some(out) = child.stdout.take() else {
        return;
    };
    let (t, s) = (ticks.clone(), started.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r');
            let now = Instant::now();
            if line.starts_with("t ") {
                if let Ok(mut v) = t.lock() {
                    v.ticks.push(now);
                }
            } else if let Some(us) = line.strip_prefix("gap ") {
                if let (Ok(mut v), Ok(us)) = (t.lock(), us.trim().parse::<f64>()) {
                    v.gaps.push((now, us / 1e3));
                }
            } else if line.contains("bench-start") {
                if let Ok(mut v) = s.lock() {
                    *v = Some(Instant::now());
                }
            }
        }
    });
}

fn wait_started(s: &Arc<Mutex<Option<Instant>>>, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if s.lock().map(|v| v.is_some()).unwrap_or(false) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The longest gap between consecutive ticks arriving inside `[from, to]`, in ms.
fn max_gap(ticks: &[Instant], from: Instant, to: Instant) -> Option<f64> {
    let mut v: Vec<Instant> = ticks
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    v.sort();
    v.windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .reduce(f64::max)
}

/// The longest gap the guest reported inside `[from, to]` (0 when none reached 2 ms), ms.
fn max_guest_gap(gaps: &[(Instant, f64)], from: Instant, to: Instant) -> f64 {
    gaps.iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|(_, g)| *g)
        .fold(0.0, f64::max)
}

/// Fill the gap figures of `r` for a migration from `t0` to `t1` (the second after `t1`
/// included; the window as long before `t0` is the idle baseline).
fn gaps(r: &mut Result_, seen: &Ticks, t0: Instant, t1: Instant) {
    let end = t1 + Duration::from_secs(1);
    if let Ok(s) = seen.lock() {
        r.host_gap_ms = max_gap(&s.ticks, t0, end);
        r.guest_gap_ms = Some(max_guest_gap(&s.gaps, t0, end));
        r.idle_gap_ms = Some(max_guest_gap(&s.gaps, t0 - (end - t0), t0));
    }
}

#[derive(Default)]
struct Result_ {
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    guest_gap_ms: Option<f64>,
    host_gap_ms: Option<f64>,
    idle_gap_ms: Option<f64>,
    rounds: Option<f64>,
    note: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(47000)
}

fn json_number(text: &str, key: &str) -> Option<f64> {
    text.split(&format!("\"{key}\":"))
        .nth(1)?
        .trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

fn wait_path(p: &Path) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
}

fn vireo_case(vireo: &Path, g: &Guest, dir: &Path, accel: &str) -> Result_ {
    let mut r = Result_::default();
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let _ = std::fs::remove_file(&src_sock);
    let _ = std::fs::remove_file(&dst_sock);
    let port = free_port();
    let ticks: Ticks = Arc::default();
    let started = Arc::default();
    let Ok(mut dst) = Command::new(vireo)
        .args([
            "migrate",
            "receive",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--api-socket")
        .arg(&dst_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return r;
    };
    watch(&mut dst, &ticks, &Arc::default());
    let Ok(mut src) = Command::new(vireo)
        .args(["run", "--accel", accel, "--memory", MEMORY, "--kernel"])
        .arg(&g.kernel)
        .arg("--initrd")
        .arg(&g.initrd)
        .arg("--cmdline")
        .arg(&g.cmdline)
        .arg("--api-socket")
        .arg(&src_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        let _ = dst.kill();
        return r;
    };
    watch(&mut src, &ticks, &started);
    if wait_path(&src_sock)
        && wait_path(&dst_sock)
        && wait_started(&started, Duration::from_secs(300))
    {
        std::thread::sleep(WARMUP);
        let t0 = Instant::now();
        let o = Command::new(vireo)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&src_sock)
            .args(["--json", "migrate", "--to", &format!("127.0.0.1:{port}")])
            .output();
        let t1 = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(o) = o {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            if o.status.success() {
                r.total_ms = json_number(&text, "elapsed_ms");
                r.downtime_ms = json_number(&text, "downtime_ms");
                r.rounds = json_number(&text, "round");
                gaps(&mut r, &ticks, t0, t1);
            } else {
                r.note = text.chars().take(120).collect();
            }
        }
    } else {
        r.note = "did not start".into();
    }
    let _ = src.kill();
    let _ = dst.kill();
    let _ = src.wait();
    let _ = dst.wait();
    r
}

fn qemu_cmd(g: &Guest, accel: &str, qmp: &Path) -> Command {
    let mut c = Command::new(QEMU);
    qemu_pc(&mut c, qemu_accel(accel), MEMORY)
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .arg("-append")
        .arg(&g.cmdline)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

fn qemu_case(g: &Guest, dir: &Path, accel: &str) -> Result_ {
    let mut r = Result_::default();
    let (q1, q2) = (dir.join("q1.qmp"), dir.join("q2.qmp"));
    let _ = std::fs::remove_file(&q1);
    let _ = std::fs::remove_file(&q2);
    let port = free_port();
    let ticks: Ticks = Arc::default();
    let started = Arc::default();
    let Ok(mut src) = qemu_cmd(g, accel, &q1).spawn() else {
        return r;
    };
    watch(&mut src, &ticks, &started);
    let mut dc = qemu_cmd(g, accel, &q2);
    dc.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
    let Ok(mut dst) = dc.spawn() else {
        let _ = src.kill();
        return r;
    };
    watch(&mut dst, &ticks, &Arc::default());
    let qs = (Qmp::connect(&q1), Qmp::connect(&q2));
    if let (Some(mut q), Some(_q2)) = qs {
        if wait_started(&started, Duration::from_secs(300)) {
            std::thread::sleep(WARMUP);
            q.exec(
                "migrate-set-capabilities",
                r#"{"capabilities":[{"capability":"auto-converge","state":true}]}"#,
            );
            q.exec("migrate-set-parameters", r#"{"downtime-limit":300}"#);
            let t0 = Instant::now();
            q.exec("migrate", &format!("{{\"uri\":\"tcp:127.0.0.1:{port}\"}}"));
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut done = None;
            while Instant::now() < deadline {
                let Some(l) = q.exec("query-migrate", "") else {
                    break;
                };
                if l.contains("\"completed\"") || l.contains("\"failed\"") {
                    done = Some(l);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let t1 = Instant::now();
            std::thread::sleep(Duration::from_secs(1));
            match done {
                Some(l) if l.contains("\"completed\"") => {
                    r.total_ms = json_number(&l, "total-time");
                    r.downtime_ms = json_number(&l, "downtime");
                    r.rounds = json_number(&l, "dirty-sync-count");
                    gaps(&mut r, &ticks, t0, t1);
                }
                Some(l) => r.note = l.chars().take(120).collect(),
                None => r.note = "did not finish in 600 s".into(),
            }
        } else {
            r.note = "did not start".into();
        }
    }
    let _ = src.kill();
    let _ = dst.kill();
    let _ = src.wait();
    let _ = dst.wait();
    r
}

fn main() {
    let accel = arg("--accel").unwrap_or_else(|| "emu".into());
    let rates: Vec<u32> = arg("--rates")
        .unwrap_or_else(|| "0,50,200,1000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let qemu = !std::env::args().any(|a| a == "--no-qemu") && have(Path::new(QEMU));
    let vireo = vireo_binary();
    let base = match cache_dir().and_then(|c| ensure(&c, &Options::default())) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: the default guest: {e}");
            std::process::exit(1);
        }
    };
    let dir = std::env::temp_dir().join(format!("vireo-bench-mig-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let initrd = match initrd_with_ticker(&base.initrd, &dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "bench/migrate: default guest, {MEMORY}, vireo {accel} vs QEMU {}, loopback (ms)",
        qemu_accel(&accel)
    );
    println!(
        "{:<6} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>7}  note",
        "vmm", "MiB/s", "total", "downtime", "guest-gap", "host-gap", "idle-gap", "rounds"
    );
    for rate in rates {
        let Ok(cmd) = command_param(&["sh".into(), "-c".into(), workload(rate)]) else {
            continue;
        };
        let g = Guest {
            kernel: base.kernel.clone(),
            initrd: initrd.clone(),
            cmdline: format!("{} {cmd}", base.cmdline),
        };
        let mut rows = vec![("vireo", vireo_case(&vireo, &g, &dir, &accel))];
        if qemu {
            rows.push(("qemu", qemu_case(&g, &dir, &accel)));
        }
        for (name, r) in rows {
            println!(
                "{:<6} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>7}  {}",
                name,
                if rate == 0 {
                    "idle".to_string()
                } else {
                    rate.to_string()
                },
                fmt(r.total_ms, 0),
                fmt(r.downtime_ms, 1),
                fmt(r.guest_gap_ms, 1),
                fmt(r.host_gap_ms, 1),
                fmt(r.idle_gap_ms, 1),
                fmt(r.rounds, 0),
                r.note
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
