//! The console on a real terminal: raw mode while the VM runs, `Ctrl-A x` quits with status
//! 0, and the terminal settings are restored afterwards.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{vireo, TempDir};
use vireo_guests::probe::{build, Probe};

/// A pseudo-terminal pair (master, slave).
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the locals; null name/termios/winsize.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal descriptor.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    let dir = TempDir::new("console");
    let kernel = dir.path().join("loop.elf");
    // A guest that keeps running (a long port-I/O loop) until we quit.
    std::fs::write(
        &kernel,
        build(&Probe::PioLoop {
            n: u32::MAX,
            port: 0x510,
        }),
    )
    .unwrap();
    let (master, slave) = openpty();
    let before = lflag(&slave);
    assert_ne!(before & libc::ICANON, 0, "pty starts in canonical mode");
    let mut cmd = vireo();
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--accel", "emu"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut m = std::fs::File::from(master);
    // Wait for the guest's first output, then check raw mode and quit.
    let mut buf = [0u8; 64];
    let n = m.read(&mut buf).unwrap();
    assert!(n > 0 && buf[0] == b'S', "{:?}", &buf[..n]);
    assert_eq!(
        lflag(&slave) & (libc::ICANON | libc::ECHO),
        0,
        "not in raw mode"
    );
    m.write_all(&[0x01, b'x']).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Ctrl-A x did not quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let after = lflag(&slave);
    assert_ne!(after & libc::ICANON, 0, "terminal left in raw mode");
    assert_ne!(after & libc::ECHO, 0, "terminal left without echo");
}
