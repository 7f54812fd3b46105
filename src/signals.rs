//! SIGINT and SIGTERM: the handler stores the signal number and writes an eventfd; a thread
//! waiting on `Signals::wait` turns that into a VM stop.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::EventFd;

static LAST: AtomicI32 = AtomicI32::new(0);
static WAKE: OnceLock<EventFd> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST.store(sig, Ordering::SeqCst);
    if let Some(fd) = WAKE.get() {
        // write(2) on an eventfd is async-signal-safe.
        let _ = fd.write(1);
    }
}

pub struct Signals(&'static EventFd);

impl Signals {
    /// Block until SIGINT or SIGTERM arrives; returns its number.
    pub fn wait(&self) -> Option<i32> {
        loop {
            match self.0.read() {
                Ok(_) => return Some(LAST.load(Ordering::SeqCst)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Install the handlers (once per process).
pub fn install() -> std::io::Result<Signals> {
    let fd = match WAKE.get() {
        Some(fd) => fd,
        None => {
            let fd = EventFd::new(libc::EFD_CLOEXEC)?;
            WAKE.get_or_init(|| fd)
        }
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(Signals(fd))
}
