//! virtio-net with Linux guests on TAP devices, each test inside a network namespace it
//! creates and always removes (root only; skipped otherwise): ping both ways, 100 MiB of TCP
//! each way with matching checksums (MD5) (busybox `nc` receives in the guest, the `vtool`
//! helper sends the file back), two VMs on a bridge, and a
//! multi-queue device. The guests run on the emulator (KVM-PVM hosts cannot boot Linux in
//! reasonable time) and also on KVM where it is hardware-backed.

mod common;
mod netutil;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use netutil::{
    default_guest, initrd_with_vtool, md5_hex, net_unavailable, ping, random_bytes, Netns, Vm,
};

const BOOT: Duration = Duration::from_secs(300);
const LONG: Duration = Duration::from_secs(900);

/// Skip unless root with `ip` and TAP, and the default guest builds.
fn prerequisites(test: &str) -> bool {
    if let Some(why) = net_unavailable() {
        common::skip(test, &why);
        return false;
    }
    default_guest(test).is_some()
}

/// Backends that boot Linux in reasonable time here.
fn backends(test: &str) -> Vec<&'static str> {
    let mut v = vec!["emu"];
    if !common::skip_without_full_kvm(test) {
        v.push("kvm");
    }
    v
}

/// `vireo run` inside `ns` with the default guest running `script`.
fn vireo_in(ns: &Netns, accel: &str, extra: &[&str], script: &str) -> Vm {
    let mut c = ns.command(env!("CARGO_BIN_EXE_vireo"));
    c.args(["run", "--accel", accel])
        .args(extra)
        .args(["--", "sh", "-c", script]);
    Vm::spawn(c)
}

#[test]
fn net_ping_host_to_guest_and_back() {
    let test = "net_ping_host_to_guest_and_back";
    if !prerequisites(test) {
        return;
    }
    for accel in backends(test) {
        let ns = Netns::new("ping");
        // vireo creates the TAP, addresses its host side and the guest's eth0.
        let mut vm = vireo_in(
            &ns,
            accel,
            &["--net", "tap=vt0,host-ip=10.0.0.1/24,ip=10.0.0.2/24"],
            "ping -c 3 -W 10 10.0.0.1 && echo GUEST-PING-OK; \
             cat /sys/class/net/eth0/address; nc -l -p 7000 >/dev/null; echo DONE",
        );
        assert!(
            vm.wait_for("GUEST-PING-OK", BOOT),
            "{accel}: {}",
            vm.report()
        );
        let replies = ns.run(|| ping(Ipv4Addr::new(10, 0, 0, 2), 3));
        assert_eq!(replies, 3, "{accel}: host ping\n{}", vm.report());
        // Tell the guest to finish.
        ns.run(|| connect_retry("10.0.0.2:7000").map(drop));
        let o = vm.finish(BOOT);
        o.assert_clean();
        assert_eq!(o.code(), Some(0), "{o}");
        assert!(o.stdout.contains("DONE"), "{o}");
        // A random MAC: locally administered unicast.
        let mac = o
            .stdout
            .lines()
            .find(|l| l.trim().len() == 17 && l.matches(':').count() == 5)
            .unwrap_or_else(|| panic!("no MAC\n{o}"));
        let first = u8::from_str_radix(&mac.trim()[..2], 16).unwrap();
        assert_eq!(first & 3, 2, "{mac}");
    }
}

/// `vireo run --jail --net`: the TAP is opened (created, addressed) by the outer vireo and
/// handed to the jailed VMM, which runs as an unprivileged uid with no capabilities and its
/// own (empty) network namespace; the guest pings the host and answers the host's pings, on
/// two queue pairs whose threads run under their own seccomp filter.
#[test]
fn net_jailed_vm_answers_pings() {
    let test = "net_jailed_vm_answers_pings";
    if !prerequisites(test) {
        return;
    }
    for accel in backends(test) {
        let ns = Netns::new("jping");
        let mut vm = vireo_in(
            &ns,
            accel,
            &[
                "--jail",
                "--cpus",
                "2",
                "--net",
                "tap=vt0,queues=2,host-ip=10.0.0.1/24,ip=10.0.0.2/24",
            ],
            "ls /sys/class/net/eth0/queues; ping -c 3 -W 10 10.0.0.1 && echo GUEST-PING-OK; \
             nc -l -p 7000 >/dev/null; echo DONE",
        );
        assert!(
            vm.wait_for("GUEST-PING-OK", BOOT),
            "{accel}: {}",
            vm.report()
        );
        let replies = ns.run(|| ping(Ipv4Addr::new(10, 0, 0, 2), 3));
        assert_eq!(replies, 3, "{accel}: host ping\n{}", vm.report());
        // Both pairs' threads run, unprivileged, each under the jail's filter and its own only
        // (the device-thread spawner starts them, not the vCPU that set DRIVER_OK).
        let outer = vm.pid().expect("running");
        for pair in ["virtio-net0-0", "virtio-net0-1"] {
            let t = netutil::wait_for_jailed_thread(outer, pair)
                .unwrap_or_else(|| panic!("{accel}: no {pair} thread\n{}", vm.report()));
            assert!(t.uid.starts_with("65534"), "{accel}: {t:?}");
            assert_eq!(t.seccomp_filters, 2, "{accel}: {t:?}");
        }
        ns.run(|| connect_retry("10.0.0.2:7000").map(drop));
        let o = vm.finish(BOOT);
        o.assert_clean();
        assert_eq!(o.code(), Some(0), "{o}");
        assert!(
            o.stdout.contains("rx-1") && o.stdout.contains("tx-1"),
            "{o}"
        );
        assert!(o.stdout.contains("DONE"), "{o}");
        // The TAP vireo created went away with the VMM.
        let links = ns
            .command("ip")
            .args(["link", "show", "vt0"])
            .output()
            .unwrap();
        assert!(!links.status.success(), "{accel}: vt0 left behind");
    }
}

/// Connect to `addr`, retrying while the guest's listener is not up yet.
fn connect_retry(addr: &str) -> Option<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(s) = TcpStream::connect(addr) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn net_tcp_100mib_each_way_with_matching_checksums() {
    let test = "net_tcp_100mib_each_way_with_matching_checksums";
    if !prerequisites(test) {
        return;
    }
    const SIZE: usize = 100 << 20;
    let data = random_bytes(SIZE, 0x5eed);
    let want = md5_hex(&data);
    let data = std::sync::Arc::new(data);
    let Some(initrd) = initrd_with_vtool(test) else {
        return;
    };
    let initrd = initrd.to_str().expect("a UTF-8 path").to_string();
    for accel in backends(test) {
        let ns = Netns::new("tcp");
        // The guest receives 100 MiB into tmpfs (busybox nc), reports its MD5, then sends it
        // back (vtool: busybox nc moves 1 KiB per poll/read/write round, a minute of emulated
        // guest time for 100 MiB).
        let mut vm = vireo_in(
            &ns,
            accel,
            &[
                "--memory",
                "512M",
                "--initrd",
                &initrd,
                "--net",
                "tap=vt0,host-ip=10.0.0.1/24,ip=10.0.0.2/24",
            ],
            "nc -l -p 5001 > /tmp/f; echo \"RX-MD5 $(md5sum < /tmp/f)\"; \
             vtool tcp-send-file 10.0.0.1:5002 /tmp/f; echo TX-DONE",
        );
        assert!(
            vm.wait_for("vireo-guest: init ready", BOOT),
            "{accel}: {}",
            vm.report()
        );
        let d = data.clone();
        let t0 = Instant::now();
        let (to_guest, from_guest) = ns.run(move || {
            let back = TcpListener::bind("10.0.0.1:5002").expect("bind 10.0.0.1:5002");
            let mut s = connect_retry("10.0.0.2:5001").expect("connect to the guest");
            let t = Instant::now();
            s.write_all(&d).expect("send to the guest");
            drop(s);
            let to_guest = t.elapsed();
            let (mut c, _) = back.accept().expect("the guest connects back");
            let t = Instant::now();
            let mut got = Vec::with_capacity(d.len());
            let mut buf = vec![0u8; 1 << 20];
            // busybox nc may keep its end open after its input ends: stop at the size.
            while got.len() < d.len() {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            (to_guest, (got, t.elapsed()))
        });
        let (got, back_time) = from_guest;
        let o = vm.finish(LONG);
        o.assert_clean();
        let rx = o
            .stdout
            .lines()
            .find_map(|l| l.split("RX-MD5 ").nth(1))
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("{accel}: no guest checksum\n{o}"));
        assert_eq!(rx, want, "{accel}: host → guest checksum\n{o}");
        assert_eq!(got.len(), SIZE, "{accel}: guest → host length");
        assert_eq!(md5_hex(&got), want, "{accel}: guest → host checksum");
        assert_eq!(o.code(), Some(0), "{o}");
        eprintln!(
            "{test} [{accel}]: 100 MiB host→guest {:.1} s, guest→host {:.1} s, total {:.1} s",
            to_guest.as_secs_f64(),
            back_time.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn net_two_vms_on_a_bridge_reach_each_other() {
    let test = "net_two_vms_on_a_bridge_reach_each_other";
    if !prerequisites(test) {
        return;
    }
    for accel in backends(test) {
        let ns = Netns::new("bridge");
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        for tap in ["vt1", "vt2"] {
            ns.ip(&["tuntap", "add", tap, "mode", "tap"]);
            ns.ip(&["link", "set", tap, "master", "br0"]);
        }
        let wait_peer = |peer: &str| {
            format!(
                "i=0; until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do \
                 i=$((i+1)); [ $i -gt 120 ] && break; done"
            )
        };
        // B listens, pings A, waits for A's goodbye; A pings B, then says goodbye.
        let mut b = vireo_in(
            &ns,
            accel,
            &["--net", "tap=vt2,mac=52:54:00:00:00:03,ip=10.0.0.3/24"],
            &format!(
                "nc -l -p 7000 > /tmp/bye & {}; ping -c 3 10.0.0.2 && echo B-PING-OK; \
                 wait; echo \"B-GOT $(cat /tmp/bye)\"",
                wait_peer("10.0.0.2")
            ),
        );
        let mut a = vireo_in(
            &ns,
            accel,
            &["--net", "tap=vt1,mac=52:54:00:00:00:02,ip=10.0.0.2/24"],
            &format!(
                "{}; ping -c 3 10.0.0.3 && echo A-PING-OK; \
                 i=0; until echo bye | nc 10.0.0.3 7000; do sleep 1; i=$((i+1)); \
                 [ $i -gt 60 ] && break; done; echo A-DONE",
                wait_peer("10.0.0.3")
            ),
        );
        assert!(a.wait_for("A-DONE", LONG), "{accel} A: {}", a.report());
        assert!(b.wait_for("B-GOT", LONG), "{accel} B: {}", b.report());
        let (oa, ob) = (a.finish(BOOT), b.finish(BOOT));
        oa.assert_clean();
        ob.assert_clean();
        assert!(oa.stdout.contains("A-PING-OK"), "{oa}");
        assert!(ob.stdout.contains("B-PING-OK"), "{ob}");
        assert!(ob.stdout.contains("B-GOT bye"), "{ob}");
    }
}

#[test]
fn net_multiqueue_guest_sees_n_queues() {
    let test = "net_multiqueue_guest_sees_n_queues";
    if !prerequisites(test) {
        return;
    }
    for accel in backends(test) {
        let ns = Netns::new("mq");
        let mut vm = vireo_in(
            &ns,
            accel,
            &[
                "--cpus",
                "2",
                "--net",
                "tap=vt0,queues=2,host-ip=10.0.0.1/24,ip=10.0.0.2/24",
                // `--net` is repeatable: a second NIC is eth1.
                "--net",
                "tap=vt1,mac=52:54:00:00:00:09",
            ],
            "echo QUEUES $(ls /sys/class/net/eth0/queues); \
             grep -c virtio1-input /proc/interrupts | sed 's/^/RXIRQS /'; \
             echo NICS $(ls /sys/class/net) $(cat /sys/class/net/eth1/address); \
             ping -c 3 -W 10 10.0.0.1 && echo PING-OK",
        );
        assert!(vm.wait_for("PING-OK", LONG), "{accel}: {}", vm.report());
        let o = vm.finish(BOOT);
        o.assert_clean();
        let q = o
            .stdout
            .lines()
            .find_map(|l| l.split("QUEUES ").nth(1))
            .unwrap_or_else(|| panic!("{o}"))
            .trim()
            .to_string();
        assert_eq!(q, "rx-0 rx-1 tx-0 tx-1", "{accel}\n{o}");
        // One MSI-X vector per receive queue.
        assert!(
            o.stdout.lines().any(|l| l.trim() == "RXIRQS 2"),
            "{accel}\n{o}"
        );
        assert!(
            o.stdout.contains("NICS eth0 eth1 lo 52:54:00:00:00:09"),
            "{accel}\n{o}"
        );
        assert_eq!(o.code(), Some(0), "{o}");
    }
}

/// Bad `--net` / `--vsock` values are refused before anything starts (no privileges needed).
#[test]
fn net_bad_configurations_are_refused_clearly() {
    let dir = common::TempDir::new("netcfg");
    let k = dir.path().join("k");
    std::fs::write(&k, b"not a kernel").unwrap();
    for (args, want) in [
        (vec!["--net", "tap=a/b"], "interface name"),
        (vec!["--net", "tap=t0,queues=99"], "queue pairs"),
        (vec!["--net", "tap=t0,mac=01:00:00:00:00:01"], "unicast"),
        (vec!["--net", "ip=10.0.0.2/24"], "tap=NAME"),
        (vec!["--vsock", "cid=2,socket=/tmp/x"], "out of range"),
        (vec!["--vsock", "cid=3"], "socket="),
    ] {
        let mut c = common::vireo();
        c.arg("run").args(["--kernel"]).arg(&k).args(&args);
        let o = common::run(c, Duration::from_secs(30), None);
        assert_eq!(o.code(), Some(2), "{args:?}: {o}");
        assert!(o.stderr.contains(want), "{args:?}: {o}");
    }
    // With --jail (root only) the vsock socket's directory is bound into the jail: not /
    // (the socket bound outside is removed again).
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let probe = dir.path().join("probe.elf");
    std::fs::write(
        &probe,
        vireo_guests::probe::build(&vireo_guests::probe::Probe::Counter),
    )
    .unwrap();
    let sock = std::path::PathBuf::from(format!("/vireo-test-{}.sock", std::process::id()));
    let mut c = common::vireo();
    c.arg("run")
        .arg("--kernel")
        .arg(&probe)
        .args(["--accel", "emu", "--jail", "--vsock"])
        .arg(format!("cid=3,socket={}", sock.display()));
    let o = common::run(c, Duration::from_secs(30), None);
    assert_ne!(o.code(), Some(0), "{o}");
    assert!(o.stderr.contains("not in /"), "{o}");
    assert!(!sock.exists(), "{o}");
}

/// A jailed VM with a NIC (a probe guest: fast on both backends) snapshots into its
/// `--snapshot-dir`; `vireo restore --jail` and a plain `vireo restore` of it both open the
/// TAP again (outside the jail for the jailed one, with its host address) and run on.
#[test]
fn net_jailed_snapshot_restores_with_its_tap() {
    let test = "net_jailed_snapshot_restores_with_its_tap";
    if let Some(why) = net_unavailable() {
        common::skip(test, &why);
        return;
    }
    for accel in common::probe_backends(test) {
        let ns = Netns::new("jsnap");
        let dir = common::TempDir::new("net-jail-snap");
        let kernel = dir.path().join("probe.elf");
        std::fs::write(
            &kernel,
            vireo_guests::probe::build(&vireo_guests::probe::Probe::Counter),
        )
        .unwrap();
        let api = dir.path().join("api.sock");
        let snaps = dir.path().join("snaps");
        std::fs::create_dir(&snaps).unwrap();
        std::os::unix::fs::chown(&snaps, Some(65534), Some(65534)).unwrap();
        let ctl = |args: &[&str]| {
            let mut c = common::vireo();
            c.arg("ctl").arg("--api-socket").arg(&api).args(args);
            let o = common::run(c, Duration::from_secs(60), None);
            assert_eq!(o.code(), Some(0), "{accel}: ctl {args:?}: {o}");
        };
        let mut c = ns.command(env!("CARGO_BIN_EXE_vireo"));
        c.args(["run", "--jail", "--accel", accel, "--kernel"])
            .arg(&kernel)
            .args(["--net", "tap=vt0,host-ip=10.0.0.1/24"])
            .arg("--api-socket")
            .arg(&api)
            .arg("--snapshot-dir")
            .arg(&snaps);
        let mut vm = Vm::spawn(c);
        assert!(vm.wait_for("count 1\n", BOOT), "{accel}: {}", vm.report());
        ctl(&["pause"]);
        let snap = snaps.join("s");
        ctl(&["snapshot", snap.to_str().unwrap()]);
        ctl(&["power-off"]);
        let o = vm.finish(BOOT);
        assert_eq!(o.code(), Some(0), "{accel}: {o}");
        let addr = || {
            let o = ns
                .command("ip")
                .args(["-4", "addr", "show", "vt0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        assert!(addr().is_empty(), "{accel}: vt0 is gone with its VMM");
        for jail in [true, false] {
            let mut c = ns.command(env!("CARGO_BIN_EXE_vireo"));
            c.arg("restore");
            if jail {
                c.arg("--jail");
            }
            c.arg("--snapshot").arg(&snap).arg("--api-socket").arg(&api);
            let mut vm = Vm::spawn(c);
            assert!(
                vm.wait_for("count 3\n", BOOT),
                "{accel} jail={jail}: {}",
                vm.report()
            );
            assert!(
                addr().contains("inet 10.0.0.1/24"),
                "{accel} jail={jail}: {}",
                addr()
            );
            ctl(&["power-off"]);
            let o = vm.finish(BOOT);
            o.assert_clean();
            assert_eq!(o.code(), Some(0), "{accel} jail={jail}: {o}");
        }
    }
}
