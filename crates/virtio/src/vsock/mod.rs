//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host programs, with
//! the host side as Unix sockets (the convention Firecracker uses):
//!
//! - **host → guest**: a host program connects to the Unix socket `PATH` and writes
//!   `CONNECT <port>\n`; the device opens a connection to guest port `<port>` from a host
//!   port of its own (2^30 and up) and, once the guest accepts, writes `OK <host port>\n`; from
//!   then on the socket carries the stream. If the guest refuses (nothing listens) or does not
//!   answer within 2 s, the socket is closed.
//! - **guest → host**: a guest connection to CID 2 (the host), port `P`, is connected to the
//!   Unix socket `PATH_P` (e.g. `/run/vm.sock_5000`), which a host program listens on; if
//!   nothing listens there, the guest's connect fails (RST).
//!
//! Queues: receive (0), transmit (1), event (2). Configuration space: `guest_cid` (§5.10.4).
//! One device thread ([`muxer`]) serves the queues and every socket. Closing either side's
//! socket shuts the stream down as the other side sees it (SHUTDOWN, then RST when both
//! directions are done).

pub mod conn;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vireo_hv::EventFd;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::worker::QueuePosition;
use crate::{Activation, DeviceState, Error, LogOnce, Result, VirtioDevice, VIRTIO_ID_VSOCK};

/// Queue sizes: receive, transmit, event.
pub const QUEUE_SIZES: [u16; 3] = [256, 256, 64];

/// The host side: the listening Unix socket host programs connect to, and the path prefix of
/// the sockets guest connections go to. Bound once per VMM; the socket file is removed when
/// it is dropped.
#[derive(Debug)]
pub struct VsockBackend {
    path: PathBuf,
    listener: UnixListener,
    /// Bound by this process, which removes the socket file when done (not one
    /// [handed over](VsockBackend::hand_over): its binder removes it).
    owns_path: bool,
}

/// Listening sockets bound before this process lost the right to (a jailed VMM, whose parent
/// binds them outside the jail and passes the descriptors in), by path.
static HANDED_OVER: std::sync::Mutex<Vec<(PathBuf, UnixListener)>> =
    std::sync::Mutex::new(Vec::new());

impl VsockBackend {
    /// Make `listener`, bound at `path` by another process or before privileges were
    /// dropped, what [`VsockBackend::bind`] of `path` uses from now on in this process. The
    /// socket file stays when the backend is dropped: whoever bound it removes it.
    pub fn hand_over(path: &Path, listener: UnixListener) {
        let mut list = HANDED_OVER.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|(p, _)| p != path);
        list.push((path.to_path_buf(), listener));
    }

    /// Listen on `path`. A stale socket file there (nobody listening) is replaced; anything
    /// else at that path is an error. A listener [handed over](VsockBackend::hand_over) for
    /// `path` is used as it is.
    pub fn bind(path: &Path) -> Result<Self> {
        if let Some(listener) = Self::handed_over(path) {
            let listener = listener.map_err(|e| {
                Error::Vsock(format!(
                    "the socket handed over for {}: {e}",
                    path.display()
                ))
            })?;
            return Ok(VsockBackend {
                path: path.to_path_buf(),
                listener,
                owns_path: false,
            });
        }
        let err =
            |what: &str, e: io::Error| Error::Vsock(format!("{what} {}: {e}", path.display()));
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(Error::Vsock(format!(
                        "{} is in use: another process listens on it; choose another socket= \
                         path",
                        path.display()
                    )));
                }
                std::fs::remove_file(path).map_err(|e| err("removing the stale socket", e))?;
            }
            Ok(_) => {
                return Err(Error::Vsock(format!(
                    "{} exists and is not a socket; choose another socket= path",
                    path.display()
                )))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| err("cannot listen on", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err("listening on", e))?;
        Ok(VsockBackend {
            path: path.to_path_buf(),
            listener,
            owns_path: true,
        })
    }

    /// A non-blocking copy of the listener handed over for `path`, if there is one.
    fn handed_over(path: &Path) -> Option<io::Result<UnixListener>> {
        let list = HANDED_OVER.lock().unwrap_or_else(|e| e.into_inner());
        let (_, l) = list.iter().find(|(p, _)| p == path)?;
        Some(l.try_clone().and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        }))
    }

    /// The socket host programs connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket (to pass it to another process).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl Drop for VsockBackend {
    fn drop(&mut self) {
        if self.owns_path {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A handle on a vsock device for the VMM.
#[derive(Clone)]
pub struct VsockControl {
    reset_pending: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
}

impl VsockControl {
    /// Tell the driver the transport was reset (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    /// §5.10.6.7): its connections are gone (as after a restore, where the host sockets did
    /// not survive). Sent in the next event buffer while the device runs.
    pub fn transport_reset(&self) {
        self.reset_pending.store(true, Ordering::SeqCst);
    }

    /// True until the driver has been sent a requested transport reset.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending.load(Ordering::SeqCst)
    }

    /// Connections open (as of the device thread's last pass).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// The device thread, or its state while paused.
enum Thread {
    Running(EventFd, JoinHandle<muxer::Muxer>),
    Paused(EventFd, Box<muxer::Muxer>),
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    backend: Arc<VsockBackend>,
    log: Arc<LogOnce>,
    connections: Arc<AtomicUsize>,
    reset_pending: Arc<AtomicBool>,
    thread: Option<Thread>,
}

fn spawn(mut m: muxer::Muxer) -> Result<JoinHandle<muxer::Muxer>> {
    crate::worker::spawn_device_thread("virtio-vsock".into(), move || {
        // The device filter of a jailed VMM, as for every device thread.
        if crate::worker::run_start_hook("virtio-vsock") {
            m.run();
        }
        m
    })
    .map_err(|e| Error::io("starting the vsock thread", e))
}

impl Vsock {
    /// A device giving the guest context ID `cid`, its host side on `backend`.
    pub fn new(cid: u64, backend: Arc<VsockBackend>) -> Self {
        Vsock {
            cid,
            backend,
            log: Arc::new(LogOnce::new()),
            connections: Arc::new(AtomicUsize::new(0)),
            reset_pending: Arc::new(AtomicBool::new(false)),
            thread: None,
        }
    }

    /// A handle for transport resets and the connection count.
    pub fn control(&self) -> VsockControl {
        VsockControl {
            reset_pending: self.reset_pending.clone(),
            connections: self.connections.clone(),
        }
    }

    /// Connections open (as of the device thread's last pass).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// A counter of open connections that outlives borrows of the device.
    pub fn connection_counter(&self) -> Arc<AtomicUsize> {
        self.connections.clone()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn pci_class(&self) -> u32 {
        0x07_80_00 // communication controller, other
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    /// `guest_cid`, le64 (§5.10.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| c.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<()> {
        self.reset();
        let mut queues = muxer::Queues::default();
        for q in a.queues {
            match q.index {
                0 => queues.rx = Some(q),
                1 => queues.tx = Some(q),
                2 => queues.event = Some(q),
                _ => {}
            }
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        let ctx = muxer::MuxContext {
            guest_cid: self.cid,
            mem: a.mem,
            interrupt: a.interrupt,
            backend: self.backend.clone(),
            log: self.log.clone(),
            stop: stop.try_clone().map_err(|e| Error::io("eventfd", e))?,
            connections: self.connections.clone(),
            reset_pending: self.reset_pending.clone(),
        };
        let m = muxer::Muxer::new(ctx, queues).map_err(|e| Error::io("epoll", e))?;
        self.thread = Some(Thread::Running(stop, spawn(m)?));
        Ok(())
    }

    /// Stop: every connection ends (its host socket closes).
    fn reset(&mut self) {
        match self.thread.take() {
            Some(Thread::Running(stop, t)) => {
                if let Err(e) = stop.write(1) {
                    tracing::error!("stopping the vsock thread: {e}");
                }
                let _ = t.join();
            }
            Some(Thread::Paused(..)) | None => {}
        }
        self.connections.store(0, Ordering::Relaxed);
        self.reset_pending.store(false, Ordering::SeqCst);
    }

    /// Stop the thread after its current pass; connections stay open (their host sockets
    /// are not read, so host programs see back-pressure) and guest memory is not touched
    /// until [`VirtioDevice::resume`]. Every packet is handled synchronously, so the
    /// positions are exact. A snapshot does not keep connections: see [`VsockControl::transport_reset`].
    fn pause(&mut self) -> Result<Vec<QueuePosition>> {
        match self.thread.take() {
            Some(Thread::Running(stop, t)) => {
                stop.write(1).map_err(|e| Error::io("eventfd", e))?;
                let m = t.join().map_err(|_| {
                    Error::Activate("the vsock thread ended abnormally; cannot pause".into())
                })?;
                let _ = stop.read();
                let pos = m.positions();
                self.thread = Some(Thread::Paused(stop, Box::new(m)));
                Ok(pos)
            }
            Some(Thread::Paused(stop, m)) => {
                let pos = m.positions();
                self.thread = Some(Thread::Paused(stop, m));
                Ok(pos)
            }
            None => Ok(Vec::new()),
        }
    }

    fn resume(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(Thread::Paused(stop, m)) => {
                self.thread = Some(Thread::Running(stop, spawn(*m)?));
            }
            other => self.thread = other,
        }
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("connections", self.connections() as u64)]
    }

    fn state(&self) -> DeviceState {
        DeviceState {
            device_type: VIRTIO_ID_VSOCK,
            config: self.cid.to_le_bytes().to_vec(),
            active: self.thread.is_some(),
            extra: Vec::new(),
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hand_over_tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A listener handed over is what `bind` of its path uses (no new socket: a host
    /// connection to the path reaches it), and dropping the backend leaves the file to whoever
    /// bound it.
    #[test]
    fn a_handed_over_listener_is_used_and_its_file_kept() {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-ho-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let outside = UnixListener::bind(&path).unwrap();
        VsockBackend::hand_over(&path, outside.try_clone().unwrap());
        let b = VsockBackend::bind(&path).unwrap();
        assert_eq!(b.path(), path);
        let mut host = UnixStream::connect(&path).unwrap();
        let (mut inside, _) = b.listener.accept().unwrap();
        std::io::Write::write_all(&mut inside, b"hi").unwrap();
        let mut got = [0u8; 2];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        // Non-blocking, as the device thread needs.
        let e = b.listener.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(b);
        assert!(path.exists(), "the binder removes it, not the backend");
        // Another path is bound as usual.
        let other = VsockBackend::bind(&dir.join("w.sock")).unwrap();
        assert!(other.owns_path);
        drop(other);
        assert!(!dir.join("w.sock").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
