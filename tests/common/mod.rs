//! Helpers shared by the integration tests: run the `vireo` binary with a deadline, watch its
//! serial output, and tell when a test must skip.

#![allow(dead_code)]

pub mod running;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `vireo` binary under test.
pub fn vireo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vireo"));
    c.stdin(Stdio::null());
    c
}

/// Why KVM cannot run our tests here, or None when it can.
pub fn kvm_unusable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable ({e})")),
    }
}

/// True when the host's KVM is KVM-PVM (guest kernels are impractically slow).
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Say that (part of) a test is skipped and why. Written straight to stderr so that the test
/// harness's output capture does not hide it.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// Skip (return true, printing why) unless KVM is usable.
pub fn skip_without_kvm(test: &str) -> bool {
    if let Some(why) = kvm_unusable() {
        skip(test, &why);
        return true;
    }
    false
}

/// Backends that run probe guests: the emulator always, KVM when /dev/kvm works (probes are
/// small enough even on KVM-PVM). Every probe must give the same output on both.
pub fn probe_backends(test: &str) -> Vec<&'static str> {
    let mut b = vec!["emu"];
    if !skip_without_kvm(test) {
        b.push("kvm");
    }
    b
}

/// Skip unless KVM is hardware-backed (not PVM), or `VIREO_TEST_FULL_KVM=1` forces the test.
pub fn skip_without_full_kvm(test: &str) -> bool {
    if skip_without_kvm(test) {
        return true;
    }
    if kvm_is_pvm() && std::env::var("VIREO_TEST_FULL_KVM").as_deref() != Ok("1") {
        skip(
            test,
            "this host's KVM is KVM-PVM, where guest kernels take minutes; \
             set VIREO_TEST_FULL_KVM=1 to run it on KVM anyway",
        );
        return true;
    }
    false
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vireo-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished (or killed) run produced.
#[derive(Debug)]
pub struct Outcome {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
    /// Assert no panic message and no timeout.
    pub fn assert_clean(&self) {
        assert!(!self.timed_out, "timed out\n{self}");
        assert!(
            !self.stderr.contains("panicked at"),
            "vireo panicked\n{self}"
        );
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {:?} (timed out: {}, {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.timed_out, self.elapsed, self.stdout, self.stderr
        )
    }
}

fn reader(mut r: impl Read + Send + 'static, tx: mpsc::Sender<(bool, Vec<u8>)>, is_out: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((is_out, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Run `cmd` until it exits or `timeout` passes (then kill it). If `stop_when` is given, the
/// process is killed (SIGKILL) as soon as stdout contains that text.
pub fn run(mut cmd: Command, timeout: Duration, stop_when: Option<&str>) -> Outcome {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child: Child = cmd.spawn().expect("spawn vireo");
    let (tx, rx) = mpsc::channel();
    reader(child.stdout.take().unwrap(), tx.clone(), true);
    reader(child.stderr.take().unwrap(), tx, false);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut timed_out = false;
    let status;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((true, b)) => out.extend_from_slice(&b),
            Ok((false, b)) => err.extend_from_slice(&b),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                status = child.wait().ok();
                break;
            }
        }
        if let Some(pat) = stop_when {
            if String::from_utf8_lossy(&out).contains(pat) {
                let _ = child.kill();
                status = child.wait().ok();
                break;
            }
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            status = child.wait().ok();
            break;
        }
    }
    // Drain what is left.
    while let Ok((is_out, b)) = rx.recv_timeout(Duration::from_millis(100)) {
        if is_out {
            out.extend_from_slice(&b)
        } else {
            err.extend_from_slice(&b)
        }
    }
    Outcome {
        status,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        timed_out,
        elapsed: start.elapsed(),
    }
}

/// Skip (return true, printing why) unless running as root (jails and containers need it).
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root (namespaces, cgroups, pivot_root)");
        return true;
    }
    false
}

/// A busybox root file system (the default guest's static busybox) in a fresh directory.
pub fn busybox_rootfs(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let cache = vireo_guests::default_guest::cache_dir().expect("cache dir");
    vireo_guests::default_guest::busybox::busybox_rootfs(&cache, dir.path())
        .expect("building the busybox root file system");
    dir
}

// ---- Linux guests ------------------------------------------------------------------------

/// The default guest's files, building them on first use (skip when that is impossible).
pub fn default_guest(test: &str) -> Option<vireo_guests::default_guest::DefaultGuest> {
    use vireo_guests::default_guest::{cache_dir, ensure, Options};
    let cache = cache_dir().ok()?;
    match ensure(&cache, &Options::default()) {
        Ok(g) => Some(g),
        Err(e) => {
            skip(test, &format!("cannot build the default guest: {e}"));
            None
        }
    }
}

/// Backends that boot Linux to init in reasonable time here: the emulator everywhere, KVM
/// where it is hardware-backed.
pub fn full_backends(test: &str) -> Vec<&'static str> {
    let mut v = vec!["emu"];
    if !skip_without_full_kvm(test) {
        v.push("kvm");
    }
    v
}

/// The number after `key` printed by the guest (kernel messages may share the console, so
/// look for the key anywhere in a line and take the digits after it).
pub fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        let rest = l[l.find(key)? + key.len()..].trim_start();
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        (end > 0).then(|| &rest[..end])
    })
}
