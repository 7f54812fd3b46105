//! Descriptor chains as a device sees them (§2.7.5, §2.7.6 message framing): the buffers of a
//! chain, checked against guest RAM, split into the device-readable and device-writable parts,
//! and the loop that serves a queue.
//!
//! `virtio-queue` walks the chain (indirect tables included) and stops on anything it cannot
//! follow: a loop (the chain is longer than the queue or table), a `next` index out of range,
//! a descriptor table outside RAM, a bad indirect table. It reports none of that, so a chain
//! whose last buffer still has the NEXT flag is a broken chain here.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _};

use crate::{ActiveQueue, VirtioInterrupt};
use vireo_hv::GuestMemory;

/// Why a chain cannot be served at all (the device then needs a reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "broken descriptor chain (a loop, a next index out of range, a bad indirect table or a \
         descriptor outside RAM)"
    )]
    Broken,
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor chain of more than {0} buffers")]
    TooLong(usize),
}

/// A problem with one request that the device reports in its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufferFault {
    #[error("a buffer lies outside guest RAM")]
    OutOfRange,
    #[error("a device-readable buffer follows a device-writable one")]
    Misordered,
}

/// Errors serving a queue; each puts the device in DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("virtqueue: {0}")]
    Ring(#[from] virtio_queue::Error),
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The buffers of one chain, readable part then writable part. Reused across requests so
/// serving a queue does not allocate.
#[derive(Debug, Default)]
pub struct Chain {
    /// Head index, for the used ring.
    pub head: u16,
    pub readable: Vec<Buffer>,
    pub writable: Vec<Buffer>,
    /// Set when a buffer breaks the rules; the request gets an error reply.
    pub fault: Option<BufferFault>,
}

impl Chain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the buffers of `chain` (at most `max_buffers`). Buffers outside RAM and readable
    /// buffers after writable ones are recorded in `fault`; a chain that cannot be followed is
    /// an error.
    pub fn load(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
        max_buffers: usize,
    ) -> Result<(), ChainError> {
        self.head = chain.head_index();
        self.readable.clear();
        self.writable.clear();
        self.fault = None;
        let mut last: Option<Descriptor> = None;
        let mut count = 0usize;
        for d in chain {
            count += 1;
            if count > max_buffers {
                return Err(ChainError::TooLong(max_buffers));
            }
            let b = Buffer {
                addr: d.addr(),
                len: d.len(),
            };
            if !in_ram(mem, b) {
                self.fault.get_or_insert(BufferFault::OutOfRange);
            }
            if d.is_write_only() {
                self.writable.push(b);
            } else {
                if !self.writable.is_empty() {
                    self.fault.get_or_insert(BufferFault::Misordered);
                }
                self.readable.push(b);
            }
            last = Some(d);
        }
        match last {
            None => Err(ChainError::Empty),
            Some(d) if d.has_next() => Err(ChainError::Broken),
            Some(_) => Ok(()),
        }
    }

    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }
}

fn in_ram(mem: &GuestMemory, b: Buffer) -> bool {
    b.len == 0 || mem.check_range(b.addr, b.len as usize)
}

/// Total bytes of `bufs`.
pub fn total(bufs: &[Buffer]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// The guest ranges that hold bytes `[offset, offset + len)` of the concatenation of `bufs`,
/// appended to `out`. False (and `out` unspecified) when the buffers are shorter.
pub fn gather(
    bufs: &[Buffer],
    offset: u64,
    len: u64,
    out: &mut Vec<(GuestAddress, usize)>,
) -> bool {
    let mut skip = offset;
    let mut left = len;
    for b in bufs {
        if left == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(left);
        let Some(addr) = b.addr.checked_add(skip) else {
            return false;
        };
        out.push((addr, take as usize));
        left -= take;
        skip = 0;
    }
    left == 0
}

/// Copy bytes `[offset, offset + dst.len())` of `bufs` out of guest memory.
pub fn read_bytes(mem: &GuestMemory, bufs: &[Buffer], offset: u64, dst: &mut [u8]) -> bool {
    let mut ranges = Vec::with_capacity(2);
    if !gather(bufs, offset, dst.len() as u64, &mut ranges) {
        return false;
    }
    let mut at = 0;
    for (addr, len) in ranges {
        if mem.read_slice(&mut dst[at..at + len], addr).is_err() {
            return false;
        }
        at += len;
    }
    true
}

/// Copy `src` into bytes `[offset, offset + src.len())` of `bufs` in guest memory.
pub fn write_bytes(mem: &GuestMemory, bufs: &[Buffer], offset: u64, src: &[u8]) -> bool {
    let mut ranges = Vec::with_capacity(2);
    if !gather(bufs, offset, src.len() as u64, &mut ranges) {
        return false;
    }
    let mut at = 0;
    for (addr, len) in ranges {
        if mem.write_slice(&src[at..at + len], addr).is_err() {
            return false;
        }
        at += len;
    }
    true
}

/// Serve the chains available on `q`, at most one queue's worth (so a driver that keeps adding
/// chains cannot keep the device thread here forever without yielding to other queues), as
/// [`serve_queue`] does but leaving notifications and interrupts to the caller. `used_any` is
/// set when a chain went to the used ring (also when an error stops the loop later). True
/// when the queue ran out of chains before the budget did.
pub fn serve_available(
    q: &mut virtio_queue::Queue,
    mem: &GuestMemory,
    chain: &mut Chain,
    max_buffers: usize,
    used_any: &mut bool,
    mut serve: impl FnMut(&mut Chain, u16) -> Option<u32>,
) -> Result<bool, QueueError> {
    for _ in 0..q.size() {
        let next = q.iter(mem)?.next();
        let Some(c) = next else {
            return Ok(true);
        };
        // Chains left after this one (a hint: a wrong index fails the next `iter`).
        let avail = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
        let more = avail.0.wrapping_sub(q.next_avail()).min(q.size());
        chain.load(mem, c, max_buffers)?;
        if let Some(used) = serve(chain, more) {
            q.add_used(mem, chain.head, used)?;
            *used_any = true;
        }
    }
    Ok(false)
}

/// Serve every chain the driver made available on `q`: `serve` gets the chain and how many
/// more chains are waiting behind it, fills in the reply and returns the number of bytes it
/// wrote into the chain's writable buffers (the used length), or `None` when the request
/// completes later (the device then puts it in the used ring itself). Then interrupt the
/// driver if it asked for it (EVENT_IDX or the avail flags, §2.7.7, §2.7.10).
///
/// Errors are structural (a bad ring index, a broken chain, rings outside RAM): the caller sets
/// DEVICE_NEEDS_RESET and stops using the queue.
pub fn serve_queue(
    q: &mut ActiveQueue,
    mem: &GuestMemory,
    interrupt: &dyn VirtioInterrupt,
    chain: &mut Chain,
    max_buffers: usize,
    mut serve: impl FnMut(&mut Chain, u16) -> Option<u32>,
) -> Result<(), QueueError> {
    let mut used_any = false;
    let result = (|| loop {
        q.queue.disable_notification(mem)?;
        let all = serve_available(
            &mut q.queue,
            mem,
            chain,
            max_buffers,
            &mut used_any,
            &mut serve,
        )?;
        if !all || !q.queue.enable_notification(mem)? {
            return Ok::<(), QueueError>(());
        }
    })();
    if used_any && q.queue.needs_notification(mem).unwrap_or(true) {
        interrupt.notify_queue(q.index);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Desc, SplitQueueDriver};
    use crate::test_util::*;

    #[test]
    fn gather_splits_across_buffers() {
        let bufs = [
            Buffer {
                addr: GuestAddress(0x1000),
                len: 16,
            },
            Buffer {
                addr: GuestAddress(0x3000),
                len: 0,
            },
            Buffer {
                addr: GuestAddress(0x2000),
                len: 512,
            },
        ];
        let mut out = Vec::new();
        assert!(gather(&bufs, 10, 20, &mut out));
        assert_eq!(
            out,
            vec![(GuestAddress(0x100a), 6), (GuestAddress(0x2000), 14)]
        );
        out.clear();
        assert!(gather(&bufs, 527, 1, &mut out));
        assert_eq!(out, vec![(GuestAddress(0x21ff), 1)]);
        assert!(!gather(&bufs, 527, 2, &mut Vec::new()));
        assert!(!gather(&bufs, u64::MAX, 1, &mut Vec::new()));
        assert!(gather(&bufs, 0, 0, &mut Vec::new()));
        assert_eq!(total(&bufs), 528);
    }

    #[test]
    fn chains_load_with_faults_and_errors() {
        let mem = guest_memory();
        let mut d = SplitQueueDriver::new(&mem, QUEUE_BASE, 16);
        let mut q = d.queue().unwrap();
        let mut c = Chain::new();
        // A good chain.
        d.add(&mem, &[Desc::r(DATA, 16), Desc::w(DATA + 0x100, 1)]);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        c.load(&mem, chain, 64).unwrap();
        assert_eq!((c.readable.len(), c.writable.len(), c.fault), (1, 1, None));
        // Out of RAM and misordered: loaded, with a fault.
        d.add(
            &mem,
            &[
                Desc::w(DATA, 4),
                Desc::r(MEM_SIZE - 8, 16),
                Desc::w(DATA, 1),
            ],
        );
        let chain = q.iter(&mem).unwrap().next().unwrap();
        c.load(&mem, chain, 64).unwrap();
        assert_eq!(c.fault, Some(BufferFault::OutOfRange));
        d.add(&mem, &[Desc::w(DATA, 4), Desc::r(DATA, 16)]);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        c.load(&mem, chain, 64).unwrap();
        assert_eq!(c.fault, Some(BufferFault::Misordered));
        // Too long.
        d.add(&mem, &[Desc::r(DATA, 1); 5]);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(c.load(&mem, chain, 4), Err(ChainError::TooLong(4)));
        // A loop: descriptor pointing at itself.
        let head = d.add_raw(&mem, &[(DATA, 16, NEXT, 0)], true);
        d.set_next(&mem, head, head);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(c.load(&mem, chain, 1000), Err(ChainError::Broken));
        // next out of range.
        let head = d.add_raw(&mem, &[(DATA, 16, NEXT, 0)], true);
        d.set_next(&mem, head, 200);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(c.load(&mem, chain, 1000), Err(ChainError::Broken));
    }
}
