//! virtio-vsock with the default Linux guest and its `vtool` helper (tests/guest/vtool.rs,
//! a static binary appended to the initramfs): a host program connects to a guest listener
//! and echoes 1 MiB, 100 parallel connections all complete, and the guest connects to a host
//! listener. The host side is vireo's Unix socket (`CONNECT <port>\n` / `OK <port>\n`, and
//! `PATH_<port>` for guest-initiated connections).

mod common;
mod netutil;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use netutil::{default_guest, initrd_with_vtool, random_bytes, wait_for_jailed_thread, Vm};

const BOOT: Duration = Duration::from_secs(300);

fn backends(test: &str) -> Vec<&'static str> {
    let mut v = vec!["emu"];
    if !common::skip_without_full_kvm(test) {
        v.push("kvm");
    }
    v
}

fn vireo_vsock(accel: &str, initrd: &Path, socket: &Path, script: &str) -> Vm {
    vireo_vsock_with(accel, &[], initrd, socket, script)
}

fn vireo_vsock_with(accel: &str, extra: &[&str], initrd: &Path, socket: &Path, script: &str) -> Vm {
    let mut c = common::vireo();
    c.args(["run", "--accel", accel])
        .args(extra)
        .arg("--initrd")
        .arg(initrd)
        .arg("--vsock")
        .arg(format!(
            "cid=3,socket={}",
            socket.display().to_string().replace(',', ",,")
        ))
        .args(["--", "sh", "-c", script]);
    Vm::spawn(c)
}

/// Connect to guest port `port` through vireo's socket; returns the stream after `OK`.
fn connect_guest(socket: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("OK ") || !line.ends_with('\n') {
        return Err(std::io::Error::other(format!("answer {line:?}")));
    }
    // The reader may have buffered nothing beyond the line: the guest sends nothing first.
    Ok(s)
}

/// Send `data` while reading the echo; returns what came back.
fn echo_through(mut s: UnixStream, data: &[u8]) -> Vec<u8> {
    let mut r = s.try_clone().unwrap();
    let n = data.len();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(n);
        let mut buf = vec![0u8; 64 << 10];
        while got.len() < n {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got.extend_from_slice(&buf[..k]),
            }
        }
        got
    });
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    reader.join().unwrap()
}

#[test]
fn vsock_host_connects_to_the_guest_echo_1mib_and_100_parallel() {
    let test = "vsock_host_connects_to_the_guest_echo_1mib_and_100_parallel";
    if default_guest(test).is_none() {
        return;
    }
    let Some(initrd) = initrd_with_vtool(test) else {
        return;
    };
    for accel in backends(test) {
        let dir = common::TempDir::new("vsock-h2g");
        let sock = dir.path().join("v.sock");
        // 1 connection of 1 MiB, then 100 at once: 101 in all.
        let mut vm = vireo_vsock(accel, &initrd, &sock, "vtool vsock-echo 1234 101");
        assert!(
            vm.wait_for("vsock-echo listening", BOOT),
            "{accel}: {}",
            vm.report()
        );
        let t = Instant::now();
        let data = random_bytes(1 << 20, 1);
        let s = connect_guest(&sock, 1234).unwrap_or_else(|e| panic!("{e}\n{}", vm.report()));
        let back = echo_through(s, &data);
        assert_eq!(back.len(), data.len(), "{accel}: echo length");
        assert!(back == data, "{accel}: echo differs");
        let one = t.elapsed();

        let t = Instant::now();
        let threads: Vec<_> = (0..100u64)
            .map(|i| {
                let sock = sock.clone();
                std::thread::spawn(move || {
                    let data = random_bytes(16 << 10, i + 2);
                    let s = connect_guest(&sock, 1234).map_err(|e| format!("{i}: {e}"))?;
                    let back = echo_through(s, &data);
                    if back == data {
                        Ok(())
                    } else {
                        Err(format!("{i}: {} of {} bytes back", back.len(), data.len()))
                    }
                })
            })
            .collect();
        let errors: Vec<String> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap().err())
            .collect();
        assert!(errors.is_empty(), "{accel}: {errors:?}\n{}", vm.report());
        let many = t.elapsed();
        assert!(vm.wait_for("vsock-echo done", BOOT), "{}", vm.report());
        let o = vm.finish(BOOT);
        o.assert_clean();
        assert_eq!(o.code(), Some(0), "{o}");
        assert!(!sock.exists(), "vireo removes its socket");
        eprintln!(
            "{test} [{accel}]: 1 MiB echo {:.2} s, 100 parallel 16 KiB echoes {:.2} s",
            one.as_secs_f64(),
            many.as_secs_f64()
        );
    }
}

#[test]
fn vsock_guest_connects_to_a_host_listener() {
    let test = "vsock_guest_connects_to_a_host_listener";
    if default_guest(test).is_none() {
        return;
    }
    let Some(initrd) = initrd_with_vtool(test) else {
        return;
    };
    for accel in backends(test) {
        let dir = common::TempDir::new("vsock-g2h");
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        let server = std::thread::spawn(move || {
            // Echo every connection until EOF; two connections expected.
            for _ in 0..2 {
                let Ok((mut c, _)) = listener.accept() else {
                    return;
                };
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        // Port 5001 has no listener: the guest's connect must fail.
        let mut vm = vireo_vsock(
            accel,
            &initrd,
            &sock,
            "vtool vsock-send 2 5000 1048576 && vtool vsock-send 2 5000 100; \
             vtool vsock-send 2 5001 1 || echo REFUSED-OK",
        );
        assert!(vm.wait_for("REFUSED-OK", BOOT), "{accel}: {}", vm.report());
        let o = vm.finish(BOOT);
        o.assert_clean();
        assert!(o.stdout.contains("vsock-send ok 1048576"), "{accel}: {o}");
        assert!(o.stdout.contains("vsock-send ok 100 "), "{accel}: {o}");
        server.join().unwrap();
    }
}

/// `vireo run --jail --vsock`: the outer vireo binds the socket and hands it to the jailed
/// VMM; the socket's directory is bound read-only into the jail at its host path, so the
/// guest reaches a host listener there (`PATH_5000`, connectable by the jail's uid), and the
/// host reaches a guest listener through the socket. The vsock thread runs under its own
/// filter; the socket is removed afterwards.
#[test]
fn vsock_jailed_vm_both_ways() {
    let test = "vsock_jailed_vm_both_ways";
    if common::skip_unless_root(test) || default_guest(test).is_none() {
        return;
    }
    let Some(initrd) = initrd_with_vtool(test) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    for accel in backends(test) {
        let dir = common::TempDir::new("vsock-jail");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.path().join("v.sock");
        let host_port = dir.path().join("v.sock_5000");
        let listener = UnixListener::bind(&host_port).unwrap();
        // The jailed VMM runs as uid 65534: it must be allowed to connect.
        std::fs::set_permissions(&host_port, std::fs::Permissions::from_mode(0o777)).unwrap();
        let server = std::thread::spawn(move || {
            let Ok((mut c, _)) = listener.accept() else {
                return 0;
            };
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0;
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n;
                        if c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            total
        });
        let mut vm = vireo_vsock_with(
            accel,
            &["--jail"],
            &initrd,
            &sock,
            "vtool vsock-send 2 5000 65536 && echo G2H-OK; vtool vsock-echo 1234 1",
        );
        assert!(vm.wait_for("G2H-OK", BOOT), "{accel}: {}", vm.report());
        assert_eq!(server.join().unwrap(), 65536, "{accel}: guest → host bytes");
        assert!(
            vm.wait_for("vsock-echo listening", BOOT),
            "{accel}: {}",
            vm.report()
        );
        let data = random_bytes(256 << 10, 7);
        let s = connect_guest(&sock, 1234).unwrap_or_else(|e| panic!("{e}\n{}", vm.report()));
        let back = echo_through(s, &data);
        assert!(back == data, "{accel}: echo differs ({} bytes)", back.len());
        let t = wait_for_jailed_thread(vm.pid().expect("running"), "virtio-vsock")
            .unwrap_or_else(|| panic!("{accel}: no vsock thread\n{}", vm.report()));
        assert!(t.uid.starts_with("65534"), "{accel}: {t:?}");
        assert_eq!(t.seccomp_filters, 2, "{accel}: {t:?}");
        assert!(vm.wait_for("vsock-echo done", BOOT), "{}", vm.report());
        let o = vm.finish(BOOT);
        o.assert_clean();
        assert_eq!(o.code(), Some(0), "{o}");
        assert!(o.stdout.contains("vsock-send ok 65536"), "{accel}: {o}");
        assert!(!sock.exists(), "{accel}: vireo removes its socket");
    }
}
