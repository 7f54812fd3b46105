//! Lifecycle, snapshot and restore through `vireo run --api-socket`, `vireo ctl` and
//! `vireo restore`, checked by what the guest prints: a counting probe on every backend that
//! runs probes (KVM included), the default Linux guest on the backends that boot Linux.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::running::{last, numbers, start_counting_linux, Running};
use common::{vireo, TempDir};
use vireo_guests::probe::{build, Probe};

fn counter_probe(dir: &TempDir) -> PathBuf {
    let p = dir.path().join("counter.elf");
    std::fs::write(&p, build(&Probe::Counter)).unwrap();
    p
}

fn restore_cmd(snapshot: &Path, socket: &Path) -> Command {
    let mut c = vireo();
    c.arg("restore")
        .arg("--snapshot")
        .arg(snapshot)
        .arg("--api-socket")
        .arg(socket);
    c
}

/// Boot the counting probe, snapshot it paused, restore it (twice) in new processes: the
/// count goes on from where it was each time. Then damaged snapshots are refused.
#[test]
fn probe_counter_survives_snapshot_and_restore_on_every_backend() {
    for accel in common::probe_backends("probe_counter_survives_snapshot_and_restore") {
        let dir = TempDir::new(&format!("snap-probe-{accel}"));
        let kernel = counter_probe(&dir);
        let sock = dir.path().join("a.sock");
        let mut cmd = vireo();
        cmd.args(["run", "--accel", accel, "--memory", "128M", "--kernel"])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&sock);
        let vm = Running::start(cmd, &sock);
        vm.wait_for("count 3", Duration::from_secs(60), |o| {
            last(o, "count ").is_some_and(|n| n >= 3)
        });
        vm.ctl_ok(&["pause"]);
        let at_pause = last(&vm.out(), "count ").unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            last(&vm.out(), "count "),
            Some(at_pause),
            "{accel}: counted while paused"
        );
        let snap = dir.path().join("snap");
        let said = vm.ctl_ok(&["snapshot", snap.to_str().unwrap()]);
        assert!(said.contains("snapshot written"), "{said}");
        // Paused snapshot state: the running VM resumes and goes on.
        vm.ctl_ok(&["resume"]);
        vm.wait_for("counting after resume", Duration::from_secs(30), |o| {
            last(o, "count ").is_some_and(|n| n > at_pause + 1)
        });
        let (code, _) = {
            vm.ctl_ok(&["power-off"]);
            vm.wait_exit(Duration::from_secs(30))
        };
        assert_eq!(code, Some(0), "{accel}");

        for round in 0..2 {
            let sock2 = dir.path().join(format!("r{round}.sock"));
            let r = Running::start(restore_cmd(&snap, &sock2), &sock2);
            let out = r.wait_for("counting after restore", Duration::from_secs(60), |o| {
                numbers(o, "count ").len() >= 3
            });
            let seen = numbers(&out, "count ");
            assert_eq!(
                seen[0],
                at_pause + 1,
                "{accel} round {round}: the count must go on from the snapshot\n{out}"
            );
            assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{out}");
            let info = r.ctl_ok(&["info"]);
            assert!(info.contains("state: running"), "{info}");
            assert!(info.contains(&format!("backend: {accel}")), "{info}");
            r.ctl_ok(&["power-off"]);
            assert_eq!(r.wait_exit(Duration::from_secs(30)).0, Some(0));
        }

        // A flipped byte in the state file, a truncated memory file, another format
        // version: refused before anything runs, with the reason.
        let state = snap.join("state");
        let good = std::fs::read(&state).unwrap();
        let mut bad = good.clone();
        let i = good.len() / 2;
        bad[i] ^= 1;
        std::fs::write(&state, &bad).unwrap();
        let o = vireo()
            .args(["restore", "--snapshot"])
            .arg(&snap)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("corrupted"), "{err}");
        assert!(o.stdout.is_empty(), "the guest ran: {:?}", o.stdout);
        let mut v2 = good.clone();
        v2[8] = 9;
        std::fs::write(&state, &v2).unwrap();
        let o = vireo()
            .args(["restore", "--snapshot"])
            .arg(&snap)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&o.stderr).contains("format version 9"));
        std::fs::write(&state, &good).unwrap();
        let mem = snap.join("memory");
        let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        f.set_len(64 << 20).unwrap();
        let o = vireo()
            .args(["restore", "--snapshot"])
            .arg(&snap)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("truncated"));
    }
}

/// The default Linux guest: the clock stops while paused; a guest counting and writing its
/// count to a disk goes on after a restore in a new process (twice), and the disk keeps up;
/// the power button shuts it down cleanly.
#[test]
fn linux_pause_snapshot_restore_and_power_button() {
    let test = "linux_pause_snapshot_restore_and_power_button";
    if common::default_guest(test).is_none() {
        return;
    }
    for accel in common::full_backends(test) {
        let dir = TempDir::new(&format!("snap-linux-{accel}"));
        let disk = dir.path().join("disk.img");
        let sock = dir.path().join("l.sock");
        let script = "i=0; while true; do i=$((i+1)); \
             echo \"count $i up $(cut -d' ' -f1 /proc/uptime)\"; \
             echo \"disk $i\" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; \
             sleep 0.3; done";
        let vm = start_counting_linux(vireo(), accel, &disk, &sock, script);

        // The guest's clock does not advance while paused.
        vm.ctl_ok(&["pause"]);
        let paused_at = Instant::now();
        let out = vm.out();
        let (n0, up0) = last_count_and_uptime(&out);
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(last(&vm.out(), "count "), Some(n0));
        vm.ctl_ok(&["resume"]);
        let out = vm.wait_for("a count after resume", Duration::from_secs(60), |o| {
            last(o, "count ").is_some_and(|n| n > n0)
        });
        let wall = paused_at.elapsed().as_secs_f64();
        let (_, up1) = last_count_and_uptime(&out);
        assert!(
            up1 - up0 < wall - 2.0,
            "{accel}: the guest's uptime advanced {:.2} s over {wall:.2} s with 3 s paused\n{out}",
            up1 - up0
        );

        // Snapshot while counting and writing.
        vm.wait_for("count +2", Duration::from_secs(60), |o| {
            last(o, "count ").is_some_and(|n| n > n0 + 2)
        });
        vm.ctl_ok(&["pause"]);
        let at_snap = last(&vm.out(), "count ").unwrap();
        let snap = dir.path().join("snap");
        vm.ctl_ok(&["snapshot", snap.to_str().unwrap()]);
        vm.ctl_ok(&["power-off"]);
        assert_eq!(vm.wait_exit(Duration::from_secs(30)).0, Some(0));

        for round in 0..2 {
            let sock2 = dir.path().join(format!("r{round}.sock"));
            let r = Running::start(restore_cmd(&snap, &sock2), &sock2);
            let out = r.wait_for("counting after restore", Duration::from_secs(120), |o| {
                numbers(o, "count ").len() >= 4
            });
            let seen = numbers(&out, "count ");
            assert_eq!(seen[0], at_snap + 1, "{accel} round {round}\n{out}");
            assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{out}");
            // Stop it between writes is not guaranteed: pause first, then the disk holds a
            // count the guest printed (the last or the one before).
            r.ctl_ok(&["pause"]);
            let printed = numbers(&r.out(), "count ");
            let on_disk = read_disk_count(&disk);
            let last_printed = *printed.last().unwrap();
            assert!(
                on_disk == last_printed || on_disk + 1 == last_printed,
                "{accel} round {round}: disk has {on_disk}, guest printed up to {last_printed}"
            );
            r.ctl_ok(&["power-off"]);
            assert_eq!(r.wait_exit(Duration::from_secs(30)).0, Some(0));
        }

        // The power button: the guest's acpid shuts it down, vireo exits 0.
        let sock3 = dir.path().join("b.sock");
        let r = Running::start(restore_cmd(&snap, &sock3), &sock3);
        r.wait_for("counting", Duration::from_secs(120), |o| {
            !numbers(o, "count ").is_empty()
        });
        let said = r.ctl_ok(&["shutdown"]);
        assert!(said.contains("power button pressed"), "{said}");
        let (code, out) = r.wait_exit(Duration::from_secs(120));
        assert!(out.contains("vireo-guest: power button pressed"), "{out}");
        assert_eq!(code, Some(0), "{out}");
    }
}

fn last_count_and_uptime(out: &str) -> (u64, f64) {
    // The last complete line (output read while the guest prints can end in half a line).
    let line = out
        .split_inclusive('\n')
        .rev()
        .filter(|l| l.ends_with('\n'))
        .find(|l| l.contains("count ") && l.contains(" up "))
        .expect("a count line");
    let n = numbers(line, "count ")[0];
    let up: f64 = line[line.find(" up ").unwrap() + 4..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (n, up)
}

fn read_disk_count(disk: &Path) -> u64 {
    let mut b = vec![0u8; 512];
    std::fs::File::open(disk)
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    let text = String::from_utf8_lossy(&b);
    numbers(&text, "disk ").first().copied().unwrap_or(0)
}

/// `vireo run --api-socket PATH` alone waits for a configuration; `vireo ctl` configures,
/// boots and reads it; `exit` ends the process. `vireo run --config FILE` boots the same file.
#[test]
fn waiting_vireo_is_configured_over_the_api_and_config_files_boot() {
    let dir = TempDir::new("api-wait");
    let kernel = counter_probe(&dir);
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"kernel":"{}","memory":"64M","accel":"emu","cmdline":"console=ttyS0"}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let sock = dir.path().join("w.sock");
    let mut cmd = vireo();
    cmd.arg("run").arg("--api-socket").arg(&sock);
    let vm = Running::start(cmd, &sock);
    let info = vm.ctl_ok(&["info"]);
    assert!(info.contains("state: not-configured"), "{info}");
    let (ok, out) = vm.ctl(&["boot"]);
    assert!(
        !ok && out.contains("configure it first") && out.contains("409"),
        "{out}"
    );
    vm.ctl_ok(&["config", config.to_str().unwrap()]);
    assert!(vm.ctl_ok(&["boot"]).contains("state: running"));
    vm.wait_for("count 1", Duration::from_secs(30), |o| {
        last(o, "count ").is_some_and(|n| n >= 1)
    });
    let counters = vm.ctl_ok(&["counters"]);
    assert!(counters.contains("output_bytes="), "{counters}");
    let json = vm.ctl_ok(&["--json", "info"]);
    assert!(
        json.trim_start().starts_with('{') && json.contains("\"backend\":\"emu\""),
        "{json}"
    );
    // A stop keeps the waiting process; `exit` ends it.
    vm.ctl_ok(&["power-off"]);
    assert!(vm.ctl_ok(&["info"]).contains("state: stopped"));
    vm.ctl_ok(&["exit"]);
    assert_eq!(vm.wait_exit(Duration::from_secs(30)).0, Some(0));
    assert!(!sock.exists(), "the socket is removed at exit");

    // The same file on the command line.
    let mut cmd = vireo();
    cmd.arg("run").arg("--config").arg(&config);
    let o = common::run(cmd, Duration::from_secs(30), Some("count 2"));
    assert!(o.stdout.contains("count 0"), "{o}");
    // Flags that describe a VM cannot be mixed with a file.
    let o = vireo()
        .args(["run", "--memory", "1G", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!o.status.success());
}
