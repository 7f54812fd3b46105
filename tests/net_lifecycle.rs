//! virtio-net and virtio-vsock across the VM lifecycle (root only, inside a network namespace
//! the test creates and removes): bulk TCP crosses the device as large (TSO/GSO) segments both
//! ways (the device's counters over the API), a paused guest neither answers nor is answered for, a
//! resumed one is, and a snapshot restored in a new vireo process opens its TAP again by name
//! (recreating it), answers pings, and takes new vsock connections (the old ones are reset:
//! the guest gets a transport-reset event). The default Linux guest on the emulator.

mod common;
mod netutil;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use netutil::{default_guest, initrd_with_vtool, net_unavailable, ping, random_bytes, Netns, Vm};

const BOOT: Duration = Duration::from_secs(300);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// `vireo ctl --api-socket S ARGS...`, which must succeed; returns its output.
fn ctl(socket: &Path, args: &[&str]) -> String {
    let (ok, text) = common::running::ctl(socket, args);
    assert!(ok, "vireo ctl {args:?}: {text}");
    text
}

fn wait_path(p: &Path, vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(
            Instant::now() < deadline,
            "no {}\n{}",
            p.display(),
            vm.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connect to guest port `port` through vireo's vsock socket and echo `n` bytes.
fn vsock_echo(socket: &Path, port: u32, n: usize) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s.try_clone().map_err(|e| e.to_string())?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if !line.starts_with("OK ") {
        return Err(format!("answer {line:?}"));
    }
    let data = random_bytes(n, n as u64);
    s.write_all(&data).map_err(|e| e.to_string())?;
    let mut back = vec![0u8; n];
    s.read_exact(&mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err("echo differs".into());
    }
    Ok(s)
}

/// Ping the guest until it answers (ARP settles first after a restore).
fn pings_within(ns: &Netns, tries: u32) -> bool {
    (0..tries).any(|_| ns.run(|| ping(GUEST, 1)) == 1)
}

#[test]
fn net_and_vsock_across_pause_resume_snapshot_restore() {
    let test = "net_and_vsock_across_pause_resume_snapshot_restore";
    if let Some(why) = net_unavailable() {
        common::skip(test, &why);
        return;
    }
    if default_guest(test).is_none() {
        return;
    }
    let Some(initrd) = initrd_with_vtool(test) else {
        return;
    };
    let t0 = Instant::now();
    let ns = Netns::new("life");
    let dir = common::TempDir::new("net-life");
    let api = dir.path().join("api.sock");
    let vsock = dir.path().join("v.sock");
    let mut c = ns.command(env!("CARGO_BIN_EXE_vireo"));
    c.args(["run", "--accel", "emu", "--initrd"])
        .arg(&initrd)
        .args(["--net", "tap=vt0,host-ip=10.0.0.1/24,ip=10.0.0.2/24"])
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", vsock.display()))
        .arg("--api-socket")
        .arg(&api)
        .args([
            "--",
            "sh",
            "-c",
            "vtool vsock-echo 1234 & vtool tcp-sink 5004 & \
             until vtool tcp-source 10.0.0.1:5003 8388608; do sleep 1; done; \
             while true; do sleep 1; done",
        ]);
    let mut vm = Vm::spawn(c);
    assert!(vm.wait_for("vsock-echo listening", BOOT), "{}", vm.report());
    wait_path(&api, &vm);
    assert!(pings_within(&ns, 3), "no ping\n{}", vm.report());
    vsock_echo(&vsock, 1234, 64 << 10).unwrap_or_else(|e| panic!("{e}\n{}", vm.report()));

    // Bulk TCP both ways crosses the device as large segments (TSO/GSO with the TAP), not
    // 1500-byte frames: the device's counters give the mean frame size each way.
    let (got, sent) = ns.run(|| {
        let l = TcpListener::bind("10.0.0.1:5003").expect("bind");
        let (mut c, _) = l.accept().expect("the guest connects");
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("read");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut s = loop {
            match TcpStream::connect("10.0.0.2:5004") {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let data = vec![0x5au8; 8 << 20];
        s.write_all(&data).expect("send");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (got.len(), data.len())
    });
    assert_eq!(got, 8 << 20, "guest → host\n{}", vm.report());
    let counters = ctl(&api, &["counters"]);
    let line = counters
        .lines()
        .find(|l| l.contains("virtio-net"))
        .unwrap_or_else(|| panic!("no virtio-net counters\n{counters}"));
    let num = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")[..]))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    let (rxb, rxf, txb, txf) = (
        num("rx_bytes"),
        num("rx_frames"),
        num("tx_bytes"),
        num("tx_frames"),
    );
    assert!(rxb >= sent as u64 && txb >= 8 << 20, "{line}");
    assert!(
        rxb / rxf > 3000 && txb / txf > 3000,
        "bulk TCP went as small frames: {line}"
    );
    eprintln!(
        "{test}: mean frame host→guest {} B, guest→host {} B",
        rxb / rxf,
        txb / txf
    );

    // Paused: the device leaves the TAP alone, so nothing answers.
    ctl(&api, &["pause"]);
    assert_eq!(ns.run(|| ping(GUEST, 1)), 0, "a paused guest answered");
    ctl(&api, &["resume"]);
    assert!(
        pings_within(&ns, 3),
        "no ping after resume\n{}",
        vm.report()
    );

    // A connection open across the snapshot.
    let mut held = vsock_echo(&vsock, 1234, 4096).unwrap_or_else(|e| panic!("{e}"));
    ctl(&api, &["pause"]);
    let snap = dir.path().join("snap");
    ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    ctl(&api, &["power-off"]);
    let o = vm.finish(Duration::from_secs(60));
    assert_eq!(o.code(), Some(0), "{o}");
    // The VM is gone: so is the host end of the connection.
    let mut b = [0u8; 1];
    assert!(matches!(held.read(&mut b), Ok(0) | Err(_)));

    // Restore in a new process: the TAP (gone with the old process) is created again with
    // its host address, the guest answers and takes new vsock connections.
    let api2 = dir.path().join("api2.sock");
    let mut c = ns.command(env!("CARGO_BIN_EXE_vireo"));
    c.arg("restore")
        .arg("--snapshot")
        .arg(&snap)
        .arg("--api-socket")
        .arg(&api2);
    let vm = Vm::spawn(c);
    wait_path(&api2, &vm);
    assert!(
        pings_within(&ns, 6),
        "no ping after restore\n{}",
        vm.report()
    );
    vsock_echo(&vsock, 1234, 64 << 10)
        .unwrap_or_else(|e| panic!("vsock after restore: {e}\n{}", vm.report()));
    ctl(&api2, &["power-off"]);
    let o = vm.finish(Duration::from_secs(60));
    assert_eq!(o.code(), Some(0), "{o}");
    o.assert_clean();
    eprintln!("{test}: {:.1} s", t0.elapsed().as_secs_f64());
}
