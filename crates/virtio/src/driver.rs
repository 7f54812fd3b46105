//! A host-side virtio driver for split virtqueues (§2.7): it lays out a queue in guest
//! memory, writes descriptor chains, publishes them in the available ring and reads the used
//! ring back. The unit tests drive devices with it (also with chains no real driver would
//! write), and `bench/disk` drives a block device with it without any guest CPU.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use vireo_hv::{EventFd, GuestMemory};

use crate::VirtioInterrupt;

/// Descriptor flags (§2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Avail ring flag: "do not interrupt me" (§2.7.7).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: "do not notify me" (§2.7.8).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// `vring_need_event` (§2.7.10): with EVENT_IDX, notify when the other side's event index is
/// among the entries just published (from `old` to `new`).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One buffer of a chain to add: guest address, length, device-writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    /// A device-readable buffer.
    pub const fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }
    /// A device-writable buffer.
    pub const fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

/// The driver side of one split virtqueue in guest memory.
#[derive(Debug)]
pub struct SplitQueueDriver {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head.
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated: notifications and interrupts are suppressed with
    /// avail_event / used_event rather than the ring flags (§2.7.7, §2.7.10).
    event_idx: bool,
    /// The available index when the driver last decided whether to notify.
    notified_avail: u16,
}

impl SplitQueueDriver {
    /// Bytes the rings of a queue of `size` take from their base (descriptor table, available
    /// ring with used_event, used ring with avail_event; §2.7 alignment).
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let avail = 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        used + 6 + 8 * n
    }

    /// Lay out a queue of `size` entries at `base` (16-byte aligned) and zero its rings.
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = GuestAddress(base);
        let avail = GuestAddress(base + 16 * n);
        let used = GuestAddress((base + 16 * n + 6 + 2 * n).next_multiple_of(4));
        let zero = vec![0u8; Self::footprint(size) as usize];
        let _ = mem.write_slice(&zero, desc);
        SplitQueueDriver {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            event_idx: false,
            notified_avail: 0,
        }
    }

    /// Drive the queue with VIRTIO_F_RING_EVENT_IDX (also set on the queue [`Self::queue`]
    /// builds).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Whether the device must be notified of the chains published since the last call
    /// (§2.7.13.4 / Linux `virtqueue_kick_prepare`): with EVENT_IDX when the available index
    /// passed avail_event, otherwise unless the device set VIRTQ_USED_F_NO_NOTIFY.
    pub fn kick_needed(&mut self, mem: &GuestMemory) -> bool {
        // The index store must be visible before the device's suppression is read.
        fence(Ordering::SeqCst);
        let old = self.notified_avail;
        let new = self.avail_idx;
        self.notified_avail = new;
        if old == new {
            return false;
        }
        if self.event_idx {
            need_event(self.avail_event(mem), new, old)
        } else {
            let flags: u16 = mem.read_obj(self.used).unwrap_or(0);
            flags & VIRTQ_USED_F_NO_NOTIFY == 0
        }
    }

    /// Ask for an interrupt when the device uses the next chain (§2.7.10: used_event = the
    /// next used index to read, or clear VIRTQ_AVAIL_F_NO_INTERRUPT). Returns true when used
    /// chains are already waiting: read them before sleeping, or the interrupt for them may
    /// never come.
    pub fn enable_interrupts(&self, mem: &GuestMemory) -> bool {
        if self.event_idx {
            self.set_used_event(mem, self.last_used);
        } else {
            self.set_avail_flags(mem, 0);
        }
        fence(Ordering::SeqCst);
        self.used_idx(mem) != self.last_used
    }

    /// Ask for no interrupts (without EVENT_IDX: VIRTQ_AVAIL_F_NO_INTERRUPT; with it, the
    /// device interrupts at most once past the used_event set by
    /// [`Self::enable_interrupts`], so nothing needs writing).
    pub fn disable_interrupts(&self, mem: &GuestMemory) {
        if !self.event_idx {
            self.set_avail_flags(mem, VIRTQ_AVAIL_F_NO_INTERRUPT);
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the descriptor table, available ring and used ring (what a driver
    /// writes to queue_desc, queue_driver and queue_device).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc.0, self.avail.0, self.used.0)
    }

    /// A ready `virtio_queue::Queue` on these rings, as the transport would build it.
    pub fn queue(&self) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.size)?;
        q.try_set_size(self.size)?;
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_event_idx(self.event_idx);
        q.set_ready(true);
        Ok(q)
    }

    /// Free descriptors left.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    fn write_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc.unchecked_add(16 * u64::from(index));
        let _ = mem.write_slice(&d, at);
    }

    /// Write `descs` as one chain and make it available. Returns the head, or None when there
    /// are not enough free descriptors.
    pub fn add(&mut self, mem: &GuestMemory, descs: &[Desc]) -> Option<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..descs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = idx.get(i + 1).copied().unwrap_or(0);
            if i + 1 < descs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(mem, idx[i], d.addr, d.len, flags, next);
        }
        let head = idx[0];
        self.chains.insert(head, idx);
        self.publish(mem, head);
        Some(head)
    }

    /// Write `descs` as an indirect table at `table` (§2.7.5.3) and make a one-descriptor
    /// chain pointing at it available.
    pub fn add_indirect(&mut self, mem: &GuestMemory, table: u64, descs: &[Desc]) -> Option<u16> {
        let head = self.free.pop()?;
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            let _ = mem.write_slice(&raw, GuestAddress(table + 16 * i as u64));
        }
        self.write_desc(
            mem,
            head,
            table,
            (16 * descs.len()) as u32,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        self.chains.insert(head, vec![head]);
        self.publish(mem, head);
        Some(head)
    }

    /// Write raw descriptors `(addr, len, flags, next)` at the next free indices, exactly as
    /// given (no NEXT flags or next indices are filled in); publish the first if `publish`.
    /// For chains no correct driver writes.
    pub fn add_raw(
        &mut self,
        mem: &GuestMemory,
        raw: &[(u64, u32, u16, u16)],
        publish: bool,
    ) -> u16 {
        let idx: Vec<u16> = (0..raw.len()).filter_map(|_| self.free.pop()).collect();
        for (i, &(addr, len, flags, next)) in raw.iter().enumerate() {
            if let Some(&at) = idx.get(i) {
                self.write_desc(mem, at, addr, len, flags, next);
            }
        }
        let head = idx.first().copied().unwrap_or(0);
        self.chains.insert(head, idx);
        if publish {
            self.publish(mem, head);
        }
        head
    }

    /// Overwrite the `next` field of descriptor `index`.
    pub fn set_next(&self, mem: &GuestMemory, index: u16, next: u16) {
        let at = self.desc.unchecked_add(16 * u64::from(index) + 14);
        let _ = mem.write_obj(next, at);
    }

    /// Overwrite the flags of descriptor `index`.
    pub fn set_flags(&self, mem: &GuestMemory, index: u16, flags: u16) {
        let at = self.desc.unchecked_add(16 * u64::from(index) + 12);
        let _ = mem.write_obj(flags, at);
    }

    /// Put `head` in the available ring and bump its index (release order, §2.7.13).
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail_idx % self.size;
        let _ = mem.write_obj(head, self.avail.unchecked_add(4 + 2 * u64::from(slot)));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        let _ = mem.write_obj(self.avail_idx, self.avail.unchecked_add(2));
    }

    /// Set the available ring's index to anything (a hostile driver).
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx, self.avail.unchecked_add(2));
    }

    /// Set the available ring's flags.
    pub fn set_avail_flags(&self, mem: &GuestMemory, flags: u16) {
        let _ = mem.write_obj(flags, self.avail);
    }

    /// Set used_event (with EVENT_IDX: interrupt me when the used index passes this).
    pub fn set_used_event(&self, mem: &GuestMemory, event: u16) {
        let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        let _ = mem.write_obj(event, at);
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        fence(Ordering::Acquire);
        mem.read_obj(self.used.unchecked_add(2)).unwrap_or(0)
    }

    /// avail_event, written by the device with EVENT_IDX.
    pub fn avail_event(&self, mem: &GuestMemory) -> u16 {
        let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        mem.read_obj(at).unwrap_or(0)
    }

    /// Take the next used element `(head, len)`, freeing the chain's descriptors.
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        if self.used_idx(mem) == self.last_used {
            return None;
        }
        let slot = self.last_used % self.size;
        let at = self.used.unchecked_add(4 + 8 * u64::from(slot));
        let id: u32 = mem.read_obj(at).ok()?;
        let len: u32 = mem.read_obj(at.unchecked_add(4)).ok()?;
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        if let Some(idx) = self.chains.remove(&head) {
            self.free.extend(idx);
        }
        Some((head, len))
    }
}

/// A [`VirtioInterrupt`] that signals an eventfd per queue interrupt (and records resets):
/// for host-side drivers such as the disk benchmark.
#[derive(Debug)]
pub struct EventInterrupt {
    pub queue: EventFd,
    pub needs_reset: std::sync::atomic::AtomicBool,
}

impl EventInterrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(EventInterrupt {
            queue: EventFd::new(0)?,
            needs_reset: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl VirtioInterrupt for EventInterrupt {
    fn notify_queue(&self, _queue: usize) {
        let _ = self.queue.write(1);
    }
    fn notify_config(&self) {}
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        let _ = self.queue.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use virtio_queue::QueueOwnedT;

    #[test]
    fn chains_round_trip_through_virtio_queue() {
        let mem = guest_memory();
        let mut d = SplitQueueDriver::new(&mem, QUEUE_BASE, 8);
        let mut q = d.queue().unwrap();
        assert!(q.is_valid(&mem));
        let h = d
            .add(&mem, &[Desc::r(DATA, 16), Desc::w(DATA + 16, 4)])
            .unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(chain.head_index(), h);
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 2);
        assert!(descs[1].is_write_only());
        q.add_used(&mem, h, 4).unwrap();
        assert_eq!(d.pop_used(&mem), Some((h, 4)));
        assert_eq!(d.pop_used(&mem), None);
        assert_eq!(d.free_descriptors(), 8);
        // Indirect.
        let h = d
            .add_indirect(&mem, DATA + 0x1000, &[Desc::r(DATA, 8), Desc::w(DATA, 8)])
            .unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(chain.head_index(), h);
        assert_eq!(chain.count(), 2);
        assert!(SplitQueueDriver::footprint(256) < 0x3000);
    }

    #[test]
    fn event_idx_suppresses_kicks_and_interrupts_both_ways() {
        let mem = guest_memory();
        let mut d = SplitQueueDriver::new(&mem, QUEUE_BASE, 8);
        d.set_event_idx(true);
        let mut q = d.queue().unwrap();
        let chain = [Desc::r(DATA, 16), Desc::w(DATA + 16, 1)];
        // The device waits at avail index 0: the first chain needs a kick, a second one
        // before the device looked again does not.
        assert!(!q.enable_notification(&mem).unwrap());
        let h1 = d.add(&mem, &chain).unwrap();
        assert!(d.kick_needed(&mem));
        let h2 = d.add(&mem, &chain).unwrap();
        assert!(!d.kick_needed(&mem));
        assert!(!d.kick_needed(&mem), "nothing new, no kick");
        let heads: Vec<u16> = q.iter(&mem).unwrap().map(|c| c.head_index()).collect();
        assert_eq!(heads, vec![h1, h2]);
        // The device waits again (avail_event 2): the next chain kicks.
        assert!(!q.enable_notification(&mem).unwrap());
        let h3 = d.add(&mem, &chain).unwrap();
        assert!(d.kick_needed(&mem));
        // Interrupts: asked for at used index 0, so once for the first used chain, then
        // not again until the driver asks.
        assert!(!d.enable_interrupts(&mem));
        d.disable_interrupts(&mem);
        q.add_used(&mem, h1, 1).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
        q.add_used(&mem, h2, 1).unwrap();
        assert!(!q.needs_notification(&mem).unwrap());
        // Asking again with used chains unread says so.
        assert!(d.enable_interrupts(&mem));
        assert_eq!(d.pop_used(&mem), Some((h1, 1)));
        assert_eq!(d.pop_used(&mem), Some((h2, 1)));
        assert!(!d.enable_interrupts(&mem));
        q.iter(&mem).unwrap().for_each(drop);
        q.add_used(&mem, h3, 1).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
    }

    #[test]
    fn without_event_idx_the_used_flags_suppress_kicks() {
        let mem = guest_memory();
        let mut d = SplitQueueDriver::new(&mem, QUEUE_BASE, 8);
        let mut q = d.queue().unwrap();
        let chain = [Desc::r(DATA, 16), Desc::w(DATA + 16, 1)];
        q.disable_notification(&mem).unwrap();
        d.add(&mem, &chain).unwrap();
        assert!(!d.kick_needed(&mem));
        assert!(q.enable_notification(&mem).unwrap(), "a chain is waiting");
        d.add(&mem, &chain).unwrap();
        assert!(d.kick_needed(&mem));
        d.disable_interrupts(&mem);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(d.addresses().1)).unwrap(),
            VIRTQ_AVAIL_F_NO_INTERRUPT
        );
        assert!(!d.enable_interrupts(&mem));
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(d.addresses().1)).unwrap(),
            0
        );
    }
}
