//! A minimal QMP client (QEMU Machine Protocol: one JSON object per line), enough for the
//! benchmarks that drive QEMU: connect, negotiate capabilities, run commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A QMP connection in command mode.
pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connect to the QMP socket at `path` (retrying for 30 s while QEMU starts), read the
    /// greeting and enter command mode (`qmp_capabilities`).
    pub fn connect(path: &Path) -> Option<Qmp> {
        let start = Instant::now();
        let s = loop {
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().ok()?),
            w: s,
        };
        q.line()?; // greeting
        q.exec("qmp_capabilities", "")?;
        Some(q)
    }

    /// The next line QEMU sends (None at the end of the stream).
    pub fn line(&mut self) -> Option<String> {
        let mut l = String::new();
        self.r.read_line(&mut l).ok()?;
        (!l.is_empty()).then_some(l)
    }

    /// Run `cmd` with `args` (a JSON object, or empty for none); returns its `return` or
    /// `error` line (events in between are skipped).
    pub fn exec(&mut self, cmd: &str, args: &str) -> Option<String> {
        let msg = if args.is_empty() {
            format!("{{\"execute\":\"{cmd}\"}}\n")
        } else {
            format!("{{\"execute\":\"{cmd}\",\"arguments\":{args}}}\n")
        };
        self.w.write_all(msg.as_bytes()).ok()?;
        loop {
            let l = self.line()?;
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return Some(l);
            }
        }
    }
}
