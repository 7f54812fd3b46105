//! A `vireo` process driven through its API socket (`vireo ctl`), with its stdout and stderr
//! collected as they come, and the counters guests print (`count N`): shared by the snapshot
//! and migration tests.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::vireo;

/// A vireo process with its stdout and stderr collected as they come; killed when dropped.
pub struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    pub socket: PathBuf,
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

impl Running {
    /// Spawn `cmd` and wait (30 s at most) for its API socket to appear.
    pub fn start(mut cmd: Command, socket: &Path) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vireo");
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        let r = Running {
            child,
            out,
            err,
            socket: socket.to_path_buf(),
        };
        r.wait_for("the API socket", Duration::from_secs(30), |_| {
            socket.exists()
        });
        r
    }

    /// The console output so far.
    pub fn out(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// The log (stderr) so far.
    pub fn err(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Wait until `f` holds on the console output (which is returned); fail the test, with
    /// both outputs, after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.out();
            if f(&out) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- stdout ---\n{out}\n--- stderr ---\n{}",
                self.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vireo ctl --api-socket SOCKET ARGS...`: (success, stdout and stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        ctl(&self.socket, args)
    }

    /// [`Running::ctl`], failing the test (with the VM's log) unless it succeeds.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctl(args);
        assert!(
            ok,
            "vireo ctl {args:?} failed: {out}\n--- stderr of the VM ---\n{}",
            self.err()
        );
        out
    }

    /// Wait for the process to exit (killing it and failing after `timeout`): its exit code
    /// and console output.
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return (st.code(), self.out());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vireo did not exit\n{}", self.out());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process ID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `vireo ctl --api-socket SOCKET ARGS...`: (success, stdout and stderr).
pub fn ctl(socket: &Path, args: &[&str]) -> (bool, String) {
    let o = vireo()
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("vireo ctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Boots, with `cmd` (`vireo`, or `vireo` inside a network namespace), the Linux guest on
/// `accel` running `script`, which prints `count N` lines: a fresh 8 MiB disk at `disk`, the
/// API on `sock`. Returns once the guest has counted to 3.
pub fn start_counting_linux(
    mut cmd: Command,
    accel: &str,
    disk: &Path,
    sock: &Path,
    script: &str,
) -> Running {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    cmd.args(["run", "--accel", accel, "--disk"])
        .arg(format!("path={}", disk.display()))
        .arg("--api-socket")
        .arg(sock)
        .args(["--", "sh", "-c", script]);
    let vm = Running::start(cmd, sock);
    vm.wait_for("count 3", Duration::from_secs(300), |o| {
        last(o, "count ").is_some_and(|n| n >= 3)
    });
    vm
}

/// Numbers after `key` in `out` (anywhere in a line), in order. Only complete lines count:
/// output read while the guest prints can end in half a line (`count 2` of `count 21`).
pub fn numbers(out: &str, key: &str) -> Vec<u64> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let rest = &l[l.find(key)? + key.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The last number after `key` in `out`.
pub fn last(out: &str, key: &str) -> Option<u64> {
    numbers(out, key).last().copied()
}
