//! The serial console on the user's terminal: raw mode (restored on every exit path), the
//! QEMU-style escape `Ctrl-A x` to quit, `Ctrl-A Ctrl-A` to send a literal Ctrl-A.

use std::io::{IsTerminal, Read};
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::terminal::Terminal;

/// Whether this process put the terminal in raw mode (and must restore it).
static RAW: AtomicBool = AtomicBool::new(false);

const CTRL_A: u8 = 0x01;

/// Put stdin in raw mode (no line editing, echo or signal keys) if it is a terminal.
pub fn enter_raw_mode() {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return;
    }
    if stdin.lock().set_raw_mode().is_ok() {
        RAW.store(true, Ordering::SeqCst);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    }
}

/// Undo `enter_raw_mode` (idempotent).
pub fn restore_terminal() {
    if RAW.swap(false, Ordering::SeqCst) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// What the console input loop saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Bytes for the guest.
    Data(Vec<u8>),
    /// The user typed the quit sequence.
    Quit,
}

/// Escape-sequence filter for terminal input (only used when stdin is a terminal).
#[derive(Default)]
pub struct EscapeFilter {
    pending_escape: bool,
}

impl EscapeFilter {
    /// Filter one chunk of input; stops at a quit sequence.
    pub fn feed(&mut self, bytes: &[u8]) -> Input {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    b'x' | b'X' => return Input::Quit,
                    CTRL_A => out.push(CTRL_A),
                    // Unknown escape: pass both through, as QEMU does for most keys.
                    other => {
                        out.push(CTRL_A);
                        out.push(other);
                    }
                }
            } else if b == CTRL_A {
                self.pending_escape = true;
            } else {
                out.push(b);
            }
        }
        Input::Data(out)
    }
}

/// Read stdin until EOF, handing guest-bound bytes to `deliver` and calling `quit` on Ctrl-A x.
pub fn input_loop(deliver: impl Fn(&[u8]), quit: impl Fn()) {
    let tty = std::io::stdin().is_terminal();
    let mut filter = EscapeFilter::default();
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if !tty {
            deliver(&buf[..n]);
            continue;
        }
        match filter.feed(&buf[..n]) {
            Input::Data(d) => deliver(&d),
            Input::Quit => {
                quit();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ls\r"), Input::Data(b"ls\r".to_vec()));
        assert_eq!(f.feed(&[CTRL_A]), Input::Data(vec![]));
        assert_eq!(f.feed(b"x"), Input::Quit);
    }

    #[test]
    fn double_ctrl_a_sends_one() {
        let mut f = EscapeFilter::default();
        assert_eq!(
            f.feed(&[b'a', CTRL_A, CTRL_A, b'b']),
            Input::Data(vec![b'a', CTRL_A, b'b'])
        );
    }

    #[test]
    fn other_escapes_pass_through() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(&[CTRL_A, b'c']), Input::Data(vec![CTRL_A, b'c']));
    }
}
