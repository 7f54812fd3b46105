//! Asynchronous data transfers for `direct=on` disks: Linux AIO (`io_submit(2)` with
//! `IOCB_CMD_PREADV`/`PWRITEV`, completion signalled on an eventfd), so one device thread keeps
//! many requests in flight, as a driver at queue depth 32 expects. Without O_DIRECT the kernel
//! performs AIO synchronously, so buffered disks do not use this.

use std::os::unix::io::AsRawFd;

use vireo_hv::{EventFd, GuestMemory};
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::aio::{
    IoContext, IoControlBlock, IoEvent, IOCB_CMD_PREADV, IOCB_CMD_PWRITEV, IOCB_FLAG_RESFD,
};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::disk::DIRECT_ALIGN;

/// `struct iovec` as the kernel reads it (x86-64: a pointer and a length, 8 bytes each), kept
/// as integers so the device thread's state stays `Send`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

const _: () = assert!(std::mem::size_of::<IoVec>() == std::mem::size_of::<libc::iovec>());

/// A transfer in flight: what to tell the driver when it completes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    /// Position of the queue in the device's queue list.
    pub queue: usize,
    pub head: u16,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Bytes the transfer must move.
    pub expected: u64,
    /// Used length to report on success.
    pub used_len: u32,
}

pub(crate) struct Aio {
    ctx: IoContext,
    /// Signalled by the kernel for every completion.
    pub event: EventFd,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Control blocks and their iovec arrays waiting for the next `submit`.
    batch: Vec<IoControlBlock>,
    iovecs: Vec<Vec<IoVec>>,
    events: Vec<IoEvent>,
    in_flight: usize,
}

impl Aio {
    /// An AIO context for up to `capacity` transfers in flight.
    pub fn new(capacity: usize) -> std::io::Result<Aio> {
        Ok(Aio {
            ctx: IoContext::new(capacity as u32)?,
            event: EventFd::new(EFD_NONBLOCK)?,
            slots: vec![None; capacity],
            free: (0..capacity).rev().collect(),
            batch: Vec::with_capacity(capacity),
            iovecs: Vec::with_capacity(capacity),
            events: vec![IoEvent::default(); capacity],
            in_flight: 0,
        })
    }

    /// Queue a transfer of the guest `ranges` at `offset` of `file` (for the next
    /// [`Aio::submit`]). False when it cannot go asynchronously (no free slot, or buffers
    /// O_DIRECT cannot use): the caller does it synchronously.
    pub fn queue(
        &mut self,
        file: &impl AsRawFd,
        mem: &GuestMemory,
        ranges: &[(GuestAddress, usize)],
        offset: u64,
        write: bool,
        p: Pending,
    ) -> bool {
        if !offset.is_multiple_of(DIRECT_ALIGN) || self.free.is_empty() {
            return false;
        }
        let mut iov = Vec::with_capacity(ranges.len());
        for &(addr, len) in ranges {
            for s in mem.get_slices(addr, len) {
                let Ok(s) = s else {
                    return false;
                };
                let ptr = s.ptr_guard_mut().as_ptr();
                if !(ptr as u64).is_multiple_of(DIRECT_ALIGN)
                    || !(s.len() as u64).is_multiple_of(DIRECT_ALIGN)
                {
                    return false;
                }
                if write {
                    // Nothing to mark: the kernel only reads guest memory.
                } else {
                    s.bitmap().mark_dirty(0, s.len());
                }
                iov.push(IoVec {
                    base: ptr as u64,
                    len: s.len() as u64,
                });
            }
        }
        if iov.is_empty() || iov.len() > crate::sys::IOV_MAX {
            return false;
        }
        let Some(slot) = self.free.pop() else {
            return false;
        };
        self.slots[slot] = Some(p);
        // The iovec array is read by io_submit; the buffers it names are guest memory, which
        // stays mapped while the device holds its `GuestMemory` (the device thread waits for
        // every transfer before it lets go of it, see Drop).
        self.batch.push(IoControlBlock {
            aio_data: slot as u64,
            aio_lio_opcode: if write {
                IOCB_CMD_PWRITEV
            } else {
                IOCB_CMD_PREADV
            } as u16,
            aio_fildes: file.as_raw_fd() as u32,
            aio_buf: iov.as_ptr() as u64,
            aio_nbytes: iov.len() as u64,
            aio_offset: offset as i64,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.event.as_raw_fd() as u32,
            ..Default::default()
        });
        self.iovecs.push(iov);
        true
    }

    /// Hand the queued transfers to the kernel. Those it refuses are returned (the caller
    /// fails them).
    pub fn submit(&mut self) -> Vec<Pending> {
        let mut refused = Vec::new();
        let mut start = 0;
        while start < self.batch.len() {
            let refs: Vec<&mut IoControlBlock> = self.batch[start..].iter_mut().collect();
            match self.ctx.submit(&refs[..]) {
                Ok(0) | Err(_) => {
                    // Refused: release the rest.
                    for cb in &self.batch[start..] {
                        let slot = cb.aio_data as usize;
                        if let Some(p) = self.slots.get_mut(slot).and_then(Option::take) {
                            refused.push(p);
                            self.free.push(slot);
                        }
                    }
                    break;
                }
                Ok(n) => {
                    self.in_flight += n;
                    start += n;
                }
            }
        }
        self.batch.clear();
        self.iovecs.clear();
        refused
    }

    /// Transfers queued but not submitted yet.
    pub fn batched(&self) -> usize {
        self.batch.len()
    }

    /// Transfers submitted and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// True while transfers are queued or in flight.
    pub fn busy(&self) -> bool {
        self.in_flight > 0 || !self.batch.is_empty()
    }

    /// Like [`Aio::reap`], but first wait for at least one completion when transfers are in
    /// flight (draining the device for a pause).
    pub fn reap_wait(&mut self, out: &mut Vec<(Pending, bool)>) {
        while self.in_flight > 0 {
            match self.ctx.get_events(1, &mut self.events, None) {
                Ok(n) => {
                    self.take(n, out);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("io_getevents: {e}");
                    return;
                }
            }
        }
        self.reap(out);
    }

    fn take(&mut self, n: usize, out: &mut Vec<(Pending, bool)>) {
        for i in 0..n.min(self.events.len()) {
            let ev = self.events[i];
            let slot = ev.data as usize;
            if let Some(p) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                self.in_flight -= 1;
                out.push((p, ev.res >= 0 && ev.res as u64 == p.expected));
            }
        }
    }

    /// Completed transfers (without waiting): each with `true` when it moved every byte.
    pub fn reap(&mut self, out: &mut Vec<(Pending, bool)>) {
        while self.in_flight > 0 {
            let n = match self
                .ctx
                .get_events(0, &mut self.events, Some(&mut zero_timeout()))
            {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("io_getevents: {e}");
                    return;
                }
            };
            self.take(n, out);
            // Fewer than asked for: that was everything (saves a system call that would
            // return nothing).
            if n < self.events.len() {
                return;
            }
        }
    }
}

fn zero_timeout() -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    }
}

impl Drop for Aio {
    /// Wait for every transfer in flight: the kernel must be done with guest memory before
    /// the device lets go of it (a reset, or the VM going away).
    fn drop(&mut self) {
        while self.in_flight > 0 {
            match self.ctx.get_events(1, &mut self.events, None) {
                Ok(n) => self.in_flight = self.in_flight.saturating_sub(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("io_getevents while draining: {e}");
                    return;
                }
            }
        }
    }
}
