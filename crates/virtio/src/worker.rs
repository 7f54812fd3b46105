//! A device thread: waits (epoll) on the eventfds of a device's queues and serves a queue
//! when its eventfd fires. One thread per active device; it exists from DRIVER_OK to reset.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vireo_hv::EventFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::{Error, Result};

/// What a device thread runs.
pub trait QueueHandler: Send + 'static {
    /// Queue `index` was notified (also called once per queue when the thread starts, for
    /// buffers made available before it ran).
    fn queue_notified(&mut self, index: usize);
}

/// A handler shared between the device and its thread, so the device keeps it (and its
/// queues) when the thread stops for a pause and can start a new thread on it later. The
/// thread locks it once per notification; nobody else does while the thread runs.
pub struct Shared<H>(pub Arc<Mutex<H>>);

impl<H: QueueHandler> QueueHandler for Shared<H> {
    fn queue_notified(&mut self, index: usize) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_notified(index);
    }
}

/// Where a queue stands (virtio 1.2 §2.7): the next available-ring entry the device will
/// take and the next used-ring entry it will fill. What a snapshot needs besides the ring
/// addresses, which are in the transport's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    pub index: usize,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The positions of `queues` now.
pub fn positions(queues: &[crate::ActiveQueue]) -> Vec<QueuePosition> {
    use virtio_queue::QueueT;
    queues
        .iter()
        .map(|q| QueuePosition {
            index: q.index,
            next_avail: q.queue.next_avail(),
            next_used: q.queue.next_used(),
        })
        .collect()
}

/// What every worker thread runs first (a VMM installs its seccomp filter for device threads
/// here); an error stops the thread before it serves anything.
static START_HOOK: std::sync::OnceLock<fn() -> std::result::Result<(), String>> =
    std::sync::OnceLock::new();

/// Sets the function every device thread calls first thing (once per process; later calls
/// are ignored).
pub fn set_worker_start_hook(hook: fn() -> std::result::Result<(), String>) {
    let _ = START_HOOK.set(hook);
}

/// Runs the start hook (if one is set) on the calling thread; `false` (logged) if it failed
/// and the thread must stop before serving anything. For device threads that are not a
/// [`Worker`] (virtio-net queue pairs, vsock).
pub(crate) fn run_start_hook(name: &str) -> bool {
    match START_HOOK.get() {
        Some(hook) => match hook() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{name}: {e}; the device does not run");
                false
            }
        },
        None => true,
    }
}

/// A job for the device-thread spawner: it starts one thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// The spawner's queue, once [`start_thread_spawner`] ran.
static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnJob>>> =
    std::sync::OnceLock::new();

/// Starts the thread that starts every device thread from now on (once per process). A
/// device starts its threads when the guest sets DRIVER_OK (virtio 1.2 §3.1.1), on the vCPU
/// thread that wrote the status; a thread inherits its creator's seccomp filter, so without
/// this a vCPU's filter would have to allow everything its device threads do. The spawner is
/// started before any thread filter and only ever runs `thread::Builder::spawn`.
pub fn start_thread_spawner() -> std::io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
    std::thread::Builder::new()
        .name("device-spawner".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        })?;
    let _ = SPAWNER.set(std::sync::Mutex::new(tx));
    Ok(())
}

/// Starts device thread `name` running `f`: through the spawner when there is one
/// ([`start_thread_spawner`]), else from the calling thread.
pub(crate) fn spawn_device_thread<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let builder = std::thread::Builder::new().name(name);
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(f);
    };
    let gone = || std::io::Error::other("the device-thread spawner has stopped");
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
    let job: SpawnJob = Box::new(move || {
        let _ = done_tx.send(builder.spawn(f));
    });
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    done_rx.recv().map_err(|_| gone())?
}

/// epoll data of the stop eventfd (queue indices are small).
const STOP: u64 = u64::MAX;

/// A running device thread; stopping it (or dropping it) waits for the request in flight.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start thread `name` serving `handler`; `queues` are the (index, notification eventfd)
    /// pairs to wait on (the thread keeps these handles; pass clones).
    pub fn spawn<H: QueueHandler>(
        name: String,
        queues: Vec<(usize, EventFd)>,
        mut handler: H,
    ) -> Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        let stop_fd = stop.try_clone().map_err(|e| Error::io("eventfd", e))?;
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create", e))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop_fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(|e| Error::io("epoll_ctl", e))?;
        for (index, fd) in &queues {
            let index = *index;
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, index as u64),
                )
                .map_err(|e| Error::io("epoll_ctl", e))?;
        }
        let thread = spawn_device_thread(name.clone(), move || {
            if !run_start_hook(&name) {
                return;
            }
            for (index, _) in &queues {
                handler.queue_notified(*index);
            }
            run(&name, &epoll, &queues, &mut handler);
            drop(stop_fd);
        })
        .map_err(|e| Error::io("starting a device thread", e))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("stopping a device thread: {e}");
            }
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(name: &str, epoll: &Epoll, queues: &[(usize, EventFd)], handler: &mut impl QueueHandler) {
    let mut events = vec![EpollEvent::default(); queues.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("{name}: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let index = ev.data();
            if index == STOP {
                return;
            }
            // Take the notification count (it is non-zero: epoll said readable, and only
            // this thread reads it).
            if let Some((_, fd)) = queues.iter().find(|(i, _)| *i as u64 == index) {
                let _ = fd.read();
            }
            handler.queue_notified(index as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    struct Echo(mpsc::Sender<usize>);

    impl QueueHandler for Echo {
        fn queue_notified(&mut self, index: usize) {
            let _ = self.0.send(index);
        }
    }

    #[test]
    fn notifications_reach_the_handler_and_stop_joins() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut w = Worker::spawn(
            "test-worker".into(),
            vec![(0, a.try_clone().unwrap()), (3, b.try_clone().unwrap())],
            Echo(tx),
        )
        .unwrap();
        let mut start: Vec<usize> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        start.sort();
        assert_eq!(start, vec![0, 3]);
        b.write(5).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        // The count was consumed: no second wake-up.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        a.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        w.stop();
        b.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
