//! The decoded-block cache.
//!
//! A block is a run of up to [`MAX_OPS`] instructions inside one 4 KiB page that ends at the
//! first control transfer other than a conditional jump, or at a state-changing system
//! instruction. A taken conditional jump leaves the block early (a superblock: one entry,
//! side exits). Blocks are keyed by the
//! guest-physical address of their first byte plus the decoding mode (16/32/64-bit), so one
//! block serves every linear mapping of the page.
//!
//! Self-modifying code: every block keeps a copy of the bytes it was decoded from and the code
//! epoch (`Cpu::epoch`) at which those bytes were last seen in guest memory. A block runs
//! without a check while its epoch is current; otherwise its bytes are compared with guest
//! memory first (and the block is rebuilt if they differ). The epoch moves whenever code may
//! have changed behind the cache's back:
//!
//! - a store by any vCPU into a *code page* (a page some block was decoded from or validated
//!   in, flagged in the VM-wide [`CodePages`]): stores check the flag (one load) and the first
//!   store clears it and bumps the VM-wide epoch (`VmShared::code_changed`);
//! - an I/O exit (port I/O, MMIO): device DMA through `vm-memory` does not go through the
//!   emulator, and a guest only runs code a device wrote after it learned of the transfer, by
//!   an interrupt or by polling after its request (made by an I/O exit): every block not run
//!   between the exit and the transfer is checked;
//! - a device interrupt (`IrqLine`, MSI), *when a device wrote a code page*: `vm-memory` marks
//!   every VMM write in its bitmap, and [`CodePages::vmm_wrote_code`] looks at the bits of the
//!   code pages (a page's bit is cleared when it becomes a code page); only a set bit moves
//!   the epoch. Disk reads and received frames land in data pages, so their completions no
//!   longer cost a check of every block. A transfer completed after the interrupt and found
//!   by the guest's interrupt handler polling the ring is caught by the next interrupt, I/O
//!   exit or refresh (below), and before any of those when its page is newly mapped for
//!   execution: an execute translation of a code page the VMM wrote does the same look
//!   (`Cpu::translate`);
//! - the VMM entering `Vcpu::run` or replacing the memory map;
//! - serializing instructions on this vCPU (IRET, CPUID, MOV to CR, WRMSR, INVLPG, ...), as
//!   the SDM requires of cross-modifying code (Vol. 3A §8.1.3): this covers a store by another
//!   vCPU that raced with the flag being set. With a single vCPU there is no such store and
//!   serializing instructions leave the epoch alone (they were most of the bumps: every IRET);
//! - every `EPOCH_REFRESH` (10 ms) the same look at the code pages' bits, for a device store
//!   nobody announced (the guest polling memory), and every `EPOCH_REFRESH_ALL` (1 s)
//!   unconditionally, for a writer neither the vCPUs nor the bitmap see.
//!
//! A store into the block that is running ends it after the storing instruction
//! (`Cpu::note_store`, on the code-page path).
//!
//! Storage is three arenas (blocks, ops, bytes) and a two-way set-associative index (the
//! most recently inserted block of a set in way 0) backed by a map of every block; when an
//! arena is full everything is dropped and rebuilt on demand. Each block also remembers its
//! last two successors, so the block loop usually finds the next block without touching the
//! index (a link is a hint: the block it names is checked by key and epoch like an index
//! hit). After an epoch move the check of a block's bytes starts from the block loop's
//! execute-TLB hit, without a page walk.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::cpu::{Exc, R};
use super::decode;
use super::exec::{fetch_cross, Exec, Op};
use super::jit::{self, Jit};
use super::mmu::{load, PAGE_MASK, PAGE_SIZE};
use crate::GuestMemory;

/// One flag per 4 KiB page of guest RAM, shared by all vCPUs: set while decoded blocks may
/// exist for the page (see the module comment). Index 0 stands for "not RAM" and is never set.
pub struct CodePages {
    flags: Box<[AtomicU8]>,
    /// (guest-physical start, length, index of the region's first page).
    regions: Vec<(u64, u64, usize)>,
    /// The dirty log (`Vm::take_dirty_log`): one bit per page, indexed like `flags`.
    dirty: Box<[AtomicU64]>,
    /// Dirty logging is on: clean pages carry [`ARMED`].
    logging: AtomicBool,
    /// Guest RAM: its regions carry `vm-memory`'s bitmap of the VMM's writes (device DMA),
    /// which [`vmm_wrote_code`](Self::vmm_wrote_code) reads for the code pages.
    mem: GuestMemory,
    /// The pages flagged as code since the last scan dropped them (indices into `flags`).
    watched: Mutex<Vec<u32>>,
    /// One bit per page: the page is in `watched`.
    listed: Box<[AtomicU64]>,
}

/// Flag bit: blocks may have been decoded from the page.
const CODE: u8 = 1;
/// Flag bit: dirty logging is on and the page is clean; the next store logs it. Stores check
/// the flag byte already (for code), so logging costs the fast path nothing: the first store
/// to a page per round takes the slow path once, like a write-protection fault.
pub(crate) const ARMED: u8 = 2;

impl CodePages {
    pub fn new(mem: &GuestMemory) -> CodePages {
        let mut regions = Vec::new();
        let mut next = 1usize;
        for r in mem.iter() {
            let len = r.len();
            regions.push((r.start_addr().0, len, next));
            next = next.saturating_add(len.div_ceil(PAGE_SIZE) as usize);
        }
        CodePages {
            flags: (0..next).map(|_| AtomicU8::new(0)).collect(),
            regions,
            dirty: (0..next.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
            mem: mem.clone(),
            watched: Mutex::new(Vec::new()),
            listed: (0..next.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The bitmap of VMM writes and the bit of page `i` in it.
    fn vmm_bit(&self, i: usize) -> Option<(&AtomicBitmap, usize)> {
        let r = self.regions.iter().position(|&(_, len, base)| {
            i >= base && ((i - base) as u64) < len.div_ceil(PAGE_SIZE)
        })?;
        let base = self.regions.get(r)?.2;
        let region: &MmapRegion<AtomicBitmap> = self.mem.iter().nth(r)?;
        Some((region.bitmap(), i - base))
    }

    /// Clear page `i`'s bit in the bitmap of VMM writes; true when it was set. The write is
    /// not lost for live migration: with dirty logging on it moves into this log (which the
    /// migration merges with the VMM's bitmap), and before logging starts the migration
    /// copies every page anyway.
    fn take_vmm_bit(&self, i: usize) -> bool {
        let Some((bm, j)) = self.vmm_bit(i) else {
            return false;
        };
        if !bm.is_bit_set(j) {
            return false;
        }
        bm.reset_bit(j);
        if self.logging.load(Ordering::SeqCst) {
            if let Some(w) = self.dirty.get(i / 64) {
                w.fetch_or(1 << (i % 64), Ordering::SeqCst);
            }
        }
        true
    }

    /// Page `i` just became a code page: forget earlier VMM writes to it (its bytes are read
    /// after this) and watch it for later ones.
    fn watch(&self, i: usize) {
        self.take_vmm_bit(i);
        let Some(w) = self.listed.get(i / 64) else {
            return;
        };
        let bit = 1u64 << (i % 64);
        if w.fetch_or(bit, Ordering::SeqCst) & bit == 0 {
            self.watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(i as u32);
        }
    }

    /// Did the VMM (a device, through `vm-memory`) write a code page since the last call?
    /// Called where the code epoch used to move unconditionally (a device interrupt, the
    /// periodic refresh): only a `true` here moves it now, so device DMA into data pages (disk
    /// reads, received frames) no longer makes every vCPU check every block again. Costs one
    /// flag load and one bitmap load per code page.
    pub fn vmm_wrote_code(&self) -> bool {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let mut hit = false;
        watched.retain(|&i| {
            let i = i as usize;
            let is_code = |c: &Self| {
                c.flags
                    .get(i)
                    .is_some_and(|f| f.load(Ordering::SeqCst) & CODE != 0)
            };
            if !is_code(self) {
                // Unlist it, then look again: a vCPU flagging it meanwhile either sees the
                // cleared bit (and lists it again, after this scan) or is seen here.
                if let Some(w) = self.listed.get(i / 64) {
                    w.fetch_and(!(1u64 << (i % 64)), Ordering::SeqCst);
                }
                if !is_code(self) {
                    return false;
                }
                if let Some(w) = self.listed.get(i / 64) {
                    w.fetch_or(1u64 << (i % 64), Ordering::SeqCst);
                }
            }
            hit |= self.take_vmm_bit(i);
            true
        });
        hit
    }

    /// Dirty logging is on. The migration then reads and clears the bitmap of VMM writes
    /// (`take_vmm_dirty`), so it cannot tell of device writes into code: device interrupts
    /// and I/O exits move the code epoch unconditionally and blocks are checked by their
    /// bytes, as before the bitmap was used.
    #[inline]
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Relaxed)
    }

    /// The flag behind [`logging`](Self::logging), for translated code.
    pub fn logging_flag(&self) -> *const AtomicBool {
        &self.logging
    }

    /// The VMM wrote page `i` since its bit was last taken (page 0, not RAM: true).
    #[inline]
    pub fn vmm_bit_set(&self, i: usize) -> bool {
        self.vmm_bit(i).is_none_or(|(bm, j)| bm.is_bit_set(j))
    }

    /// Page `i` holds code and the VMM wrote it since it was last looked at (one page of
    /// [`vmm_wrote_code`](Self::vmm_wrote_code), without taking anything).
    pub fn vmm_wrote_page(&self, i: usize) -> bool {
        self.flags
            .get(i)
            .is_some_and(|f| f.load(Ordering::Relaxed) & CODE != 0)
            && self.vmm_bit(i).is_some_and(|(bm, j)| bm.is_bit_set(j))
    }

    /// Pages watched by [`vmm_wrote_code`](Self::vmm_wrote_code) (statistics, tests).
    pub fn watched(&self) -> usize {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Index of the first page of the region starting at guest-physical `start`.
    pub fn region_base(&self, start: u64) -> usize {
        self.regions
            .iter()
            .find(|r| r.0 == start)
            .map(|r| r.2)
            .unwrap_or(0)
    }

    /// True when a store to page `i` must take the slow path (code, or a clean page while
    /// dirty logging is on).
    #[inline(always)]
    pub fn is_code(&self, i: usize) -> bool {
        self.flags
            .get(i)
            .is_some_and(|f| f.load(Ordering::Relaxed) != 0)
    }

    /// The flag bytes (one per page, nonzero: a store must take the slow path) for translated
    /// code, which reads them with plain loads (atomic on x86).
    pub fn flags_raw(&self) -> (*const u8, usize) {
        (self.flags.as_ptr() as *const u8, self.flags.len())
    }

    /// Flag page `i` as holding decoded code; stores into it check in from now on.
    ///
    /// A flag that is already set needs no fence: a store that races with the caller's read
    /// of the bytes either finds the flag still set (and moves the epoch) or finds it cleared
    /// by another store, which moved the epoch itself.
    #[inline]
    pub(super) fn set(&self, i: usize) {
        if i != 0 {
            if let Some(f) = self.flags.get(i) {
                if f.load(Ordering::Relaxed) & CODE != 0 {
                    return;
                }
                f.fetch_or(CODE, Ordering::SeqCst);
                self.watch(i);
            }
        }
        // The flag must be visible to other vCPUs' stores before the bytes are read.
        fence(Ordering::SeqCst);
    }

    /// A store hit page `i`: unflag it and log it dirty if logging armed it. True when it was
    /// flagged as code.
    #[inline]
    pub fn clear(&self, i: usize) -> bool {
        self.store_hit(i) & CODE != 0
    }

    /// A store hit page `i`: clear its flags, log it when [`ARMED`]; returns the old flags.
    #[inline(always)]
    pub fn store_hit(&self, i: usize) -> u8 {
        match self.flags.get(i) {
            // Most stores on this path hit unflagged pages: no locked exchange then.
            Some(f) if f.load(Ordering::Relaxed) != 0 => self.take_flags(i, f),
            _ => 0,
        }
    }

    #[cold]
    #[inline(never)]
    fn take_flags(&self, i: usize, f: &AtomicU8) -> u8 {
        let old = f.swap(0, Ordering::Relaxed);
        if old & ARMED != 0 {
            if let Some(w) = self.dirty.get(i / 64) {
                w.fetch_or(1 << (i % 64), Ordering::Relaxed);
            }
        }
        old
    }

    /// Start dirty logging: every page is armed, the log is empty.
    pub fn enable_dirty_log(&self) {
        for w in self.dirty.iter() {
            w.store(0, Ordering::Relaxed);
        }
        self.logging.store(true, Ordering::SeqCst);
        for f in self.flags.iter().skip(1) {
            f.fetch_or(ARMED, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }

    /// Stop dirty logging: no page is armed any more.
    pub fn disable_dirty_log(&self) {
        self.logging.store(false, Ordering::SeqCst);
        for f in self.flags.iter() {
            f.fetch_and(!ARMED, Ordering::Relaxed);
        }
    }

    /// Take the log (one bitmap per region, in memory order) and arm the logged pages again.
    /// The caller must then make every vCPU pass a barrier (`EmuVm::sync_vcpus`) before it
    /// reads the pages: a store that raced with the re-arming is then visible.
    pub fn take_dirty_log(&self) -> Vec<Vec<u64>> {
        let logging = self.logging.load(Ordering::SeqCst);
        let mut out = Vec::with_capacity(self.regions.len());
        for &(_, len, base) in &self.regions {
            let pages = len.div_ceil(PAGE_SIZE) as usize;
            let mut bm = vec![0u64; pages.div_ceil(64)];
            for (k, word) in bm.iter_mut().enumerate() {
                // Global page indices base + 64k .. base + 64k + 63, from up to two words.
                let first = base + 64 * k;
                let n = (pages - 64 * k).min(64);
                let mut v = 0u64;
                for j in 0..n {
                    let i = first + j;
                    let Some(w) = self.dirty.get(i / 64) else {
                        break;
                    };
                    let bit = 1u64 << (i % 64);
                    if w.load(Ordering::Relaxed) & bit != 0
                        && w.fetch_and(!bit, Ordering::Relaxed) & bit != 0
                    {
                        v |= 1 << j;
                        if logging {
                            if let Some(f) = self.flags.get(i) {
                                f.fetch_or(ARMED, Ordering::Relaxed);
                            }
                        }
                    }
                }
                *word = v;
            }
            out.push(bm);
        }
        fence(Ordering::SeqCst);
        out
    }
}

/// Most instructions in one block.
pub const MAX_OPS: usize = 32;
/// Most bytes decoded for one block.
const MAX_BYTES: usize = 32 * 15;
const INDEX_BITS: u32 = 14;
const MAX_TOTAL_OPS: usize = 1 << 19;
const MAX_TOTAL_BYTES: usize = 1 << 22;
/// Block number of the one-instruction block used for an instruction that crosses a page.
const TMP_BLOCK: u32 = u32::MAX;
/// No block (an empty index way or successor link).
pub const NO_BLOCK: u32 = u32::MAX;
/// The key of an empty successor link (no block key has 127 in its mode bits).
const NO_KEY: u64 = u64::MAX;

/// The iced decoder options: `F3 0F BC`/`F3 0F BD` are BSF/BSR on a CPU without BMI1/LZCNT.
pub const DECODER_OPTIONS: u32 = DecoderOptions::NO_MPFX_0FBC | DecoderOptions::NO_MPFX_0FBD;

#[derive(Debug, Clone, Copy)]
struct Block {
    key: u64,
    /// The code epoch at which the bytes were last checked against guest memory.
    epoch: u64,
    op_start: u32,
    op_len: u16,
    byte_start: u32,
    byte_len: u16,
    /// Runs so far, up to [`jit::HOT`] (then translated, or not translatable).
    heat: u16,
    /// Entry of the block's translation (0: none).
    native: usize,
    /// The last two blocks that ran after this one (keys and block numbers, most recent
    /// first): the next lookup usually finds its block here without touching the index.
    /// Only a hint: the block found is checked like an index hit.
    next_key: [u64; 2],
    next: [u32; 2],
}

pub struct BlockCache {
    /// Two-way set-associative: set → two block numbers (`u32::MAX`: empty); the block holds
    /// its key.
    index: Vec<[u32; 2]>,
    /// Every block built since the last clear, by key (the index only remembers one per slot).
    all: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    blocks: Vec<Block>,
    ops: Vec<Op>,
    bytes: Vec<u8>,
    tmp: Vec<Op>,
    /// Blocks built (statistics).
    pub built: u64,
    /// Blocks found stale (their bytes changed) and rebuilt.
    pub stale: u64,
    /// Byte comparisons that found a block unchanged after the epoch moved.
    pub revalidated: u64,
    /// Blocks found unchanged after I/O exits by their page's bit in the bitmap of VMM writes.
    pub revalidated_soft: u64,
    /// Instructions that straddle two pages, decoded once and found again by their bytes
    /// (direct-mapped by the key of their first byte). They never join the index: both pages
    /// must be translated each time, and a block is checked against one page only.
    cross: Vec<Option<Cross>>,
    /// Page-straddling instructions taken from `cross` instead of being decoded (statistics).
    pub cross_hits: u64,
    /// The translator of hot blocks, when the VM has the JIT on.
    pub jit: Option<Jit>,
    /// Pages whose bit was found clear, and the epoch then (direct-mapped by page): the
    /// page's other blocks at that epoch need no second look. Only blocks that missed I/O
    /// exits alone use it (stamped at `floor` or later), never while dirty logging is on.
    soft_memo: [(usize, u64); SOFT_MEMO],
}

/// Entries of [`BlockCache::soft_memo`].
const SOFT_MEMO: usize = 64;
/// Entries of [`BlockCache::cross`].
const CROSS_SLOTS: usize = 64;

/// A decoded instruction that straddles two pages: its op depends only on its bytes and the
/// decoding mode (ops are position-independent), so equal bytes under the same key reuse it.
#[derive(Clone, Copy)]
struct Cross {
    key: u64,
    len: usize,
    bytes: [u8; 15],
    op: Op,
}

/// The cache key of a block: the guest-physical address of its first byte and the decoding
/// mode (16, 32 or 64).
#[inline(always)]
pub fn block_key(phys: u64, bitness: u8) -> u64 {
    (phys << 7) | bitness as u64
}

#[inline(always)]
fn slot(key: u64) -> usize {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - INDEX_BITS)) as usize
}

/// A hasher for block keys (guest-physical address and mode): one multiply.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    pub fn new() -> BlockCache {
        BlockCache {
            index: vec![[u32::MAX; 2]; 1 << INDEX_BITS],
            all: HashMap::default(),
            blocks: Vec::new(),
            ops: Vec::new(),
            bytes: Vec::new(),
            tmp: Vec::new(),
            built: 0,
            stale: 0,
            revalidated: 0,
            revalidated_soft: 0,
            cross: vec![None; CROSS_SLOTS],
            cross_hits: 0,
            jit: None,
            soft_memo: [(0, 0); SOFT_MEMO],
        }
    }

    /// Drop every block.
    pub fn clear(&mut self) {
        self.index.fill([u32::MAX; 2]);
        self.all.clear();
        self.blocks.clear();
        self.ops.clear();
        self.bytes.clear();
        self.cross.fill(None);
        if let Some(j) = self.jit.as_mut() {
            j.reset();
        }
    }

    /// Translate hot 64-bit blocks with `jit`. Translated code calls handlers with pointers
    /// into `ops`, so its storage is reserved for `MAX_TOTAL_OPS` now and never moves: `build`
    /// clears the cache (and the translations) before it would grow past that.
    pub fn enable_jit(&mut self, jit: Jit) {
        self.clear();
        self.ops.reserve_exact(MAX_TOTAL_OPS);
        self.jit = Some(jit);
    }

    /// The translation of block `b`, made on its [`jit::HOT`]th run (64-bit blocks, JIT on).
    /// A translated block is about to run at RIP `rip`, checked at code epoch `epoch`: the
    /// JIT's chain stub may find it there from now on.
    #[inline(always)]
    pub fn native(&mut self, b: u32, rip: u64, epoch: u64) -> Option<usize> {
        let jit = self.jit.as_mut()?;
        let blk = self.blocks.get_mut(b as usize)?;
        if blk.native == 0 {
            debug_assert!(self.ops.capacity() >= MAX_TOTAL_OPS);
            match Self::translate(jit, &self.ops, blk) {
                Some(code) => blk.native = code,
                None if jit.full => {
                    // Start over rather than interpret hot blocks from now on: block `b` is
                    // gone (the block loop runs nothing and finds RIP's block again).
                    self.clear();
                    return None;
                }
                None => return None,
            }
        }
        let (n, l) = (blk.op_len as usize, blk.byte_len as usize);
        jit.remember(rip, blk.key >> 7, epoch, blk.native, b, n, l);
        Some(blk.native)
    }

    /// The jump cache of the JIT's chain stub (empty without a JIT).
    pub fn links(&mut self) -> &mut [jit::Link] {
        self.jit.as_mut().map_or(&mut [], |j| j.links())
    }

    /// Count a run of untranslated block `blk`; translate it on its [`jit::HOT`]th.
    fn translate(jit: &mut Jit, ops: &[Op], blk: &mut Block) -> Option<usize> {
        if blk.heat >= jit::HOT {
            return None;
        }
        blk.heat += 1;
        if blk.heat < jit::HOT || blk.key & 0x7f != 64 {
            return None;
        }
        let ops = ops.get(blk.op_start as usize..blk.op_start as usize + blk.op_len as usize)?;
        let place = jit::Place {
            page_off: (blk.key >> 7) as u32 & (PAGE_SIZE as u32 - 1),
            phys_page: (blk.key >> 7) & PAGE_MASK,
        };
        jit.translate(ops, place)
    }

    /// The ops and byte length of the block for `key`, if it is in the index and valid at code
    /// epoch `epoch` (the block loop uses [`find_after`](Self::find_after)).
    #[cfg(test)]
    pub fn find(&self, key: u64, epoch: u64) -> Option<(&[Op], usize)> {
        let b = self.indexed(key)?;
        if self.blocks.get(b as usize)?.epoch != epoch {
            return None;
        }
        Some(self.get(b))
    }

    /// The block for `key` if it is valid at code epoch `epoch`, looked up among the recent
    /// successors of block `prev` first, then in the index; an index hit becomes `prev`'s most
    /// recent successor. `Err(b)`: not valid, but block `b` (from a link, or `NO_BLOCK`) has
    /// the key and only needs [`revalidate`](Self::revalidate) — after an epoch
    /// move this spares the index lookup, which misses the host's caches.
    #[inline(always)]
    pub fn find_after(&mut self, prev: u32, key: u64, epoch: u64) -> Result<u32, u32> {
        let has_key = |c: &Self, b: u32| c.blocks.get(b as usize).is_some_and(|blk| blk.key == key);
        let fresh = |c: &Self, b: u32| {
            c.blocks
                .get(b as usize)
                .is_some_and(|blk| blk.epoch == epoch)
        };
        if let Some(p) = self.blocks.get(prev as usize) {
            let b = if p.next_key[0] == key {
                p.next[0]
            } else if p.next_key[1] == key {
                p.next[1]
            } else {
                NO_BLOCK
            };
            if has_key(self, b) {
                return if fresh(self, b) { Ok(b) } else { Err(b) };
            }
        }
        let Some(b) = self.indexed(key) else {
            return Err(NO_BLOCK);
        };
        if !fresh(self, b) {
            return Err(NO_BLOCK);
        }
        if let Some(p) = self.blocks.get_mut(prev as usize) {
            p.next_key = [key, p.next_key[0]];
            p.next = [b, p.next[0]];
        }
        Ok(b)
    }

    /// The block for `key` in its index set, if either way holds it.
    #[inline(always)]
    fn indexed(&self, key: u64) -> Option<u32> {
        let set = self.index.get(slot(key))?;
        set.iter().copied().find(|&b| {
            self.blocks
                .get(b as usize)
                .is_some_and(|blk| blk.key == key)
        })
    }

    /// Stamp block `b` as checked at code epoch `epoch`; returns it.
    fn stamp(&mut self, b: u32, epoch: u64) -> Option<u32> {
        if let Some(blk) = self.blocks.get_mut(b as usize) {
            blk.epoch = epoch;
        }
        Some(b)
    }

    /// The ops and byte length of block `b` (from `revalidate` or `build`).
    #[inline(always)]
    pub fn get(&self, b: u32) -> (&[Op], usize) {
        match self.blocks.get(b as usize) {
            Some(blk) => (
                self.ops
                    .get(blk.op_start as usize..blk.op_start as usize + blk.op_len as usize)
                    .unwrap_or(&[]),
                blk.byte_len as usize,
            ),
            None if b == TMP_BLOCK => (&self.tmp, 0),
            None => (&[], 0),
        }
    }

    /// The slow half of [`find`](Self::find): a block for `key` that is not in the index or
    /// whose epoch is old. Its bytes are compared with guest memory at host address `host`
    /// (page flag `code_idx` in `code`); if they still match the block is stamped with `epoch`.
    /// A block stamped at `floor` or later has only missed I/O exits (`VmShared::io_exit`):
    /// while the VMM has not written its page since the page became a code page (its bit in
    /// `vm-memory`'s bitmap is clear) it is stamped without the comparison (`(epoch, floor)`
    /// are the second argument). `found`: the block
    /// for `key` when the caller has it already (from a successor link), else `NO_BLOCK`.
    pub fn revalidate(
        &mut self,
        key: u64,
        found: u32,
        (epoch, floor): (u64, u64),
        host: usize,
        code: &CodePages,
        code_idx: usize,
    ) -> Option<u32> {
        let b = if found != NO_BLOCK {
            found
        } else if let Some(b) = self.indexed(key) {
            b
        } else {
            // Evicted from the index (or never built): look in the full map before decoding
            // again.
            let b = *self.all.get(&key)?;
            self.insert(key, b);
            b
        };
        let blk = self.blocks.get(b as usize)?;
        if blk.epoch == epoch {
            return Some(b);
        }
        let memo = self
            .soft_memo
            .get(code_idx % SOFT_MEMO)
            .filter(|_| blk.epoch >= floor && !code.logging());
        if memo.is_some_and(|m| *m == (code_idx, epoch)) {
            // Another block of this page passed the look below at this epoch.
            self.revalidated_soft += 1;
            return self.stamp(b, epoch);
        }
        code.set(code_idx);
        if blk.epoch >= floor && !code.logging() && !code.vmm_bit_set(code_idx) {
            self.revalidated_soft += 1;
            if let Some(m) = self.soft_memo.get_mut(code_idx % SOFT_MEMO) {
                *m = (code_idx, epoch);
            }
            return self.stamp(b, epoch);
        }
        let want = self
            .bytes
            .get(blk.byte_start as usize..blk.byte_start as usize + blk.byte_len as usize)?;
        if same_bytes(want, host) {
            self.revalidated += 1;
            self.stamp(b, epoch)
        } else {
            self.stale += 1;
            None
        }
    }

    /// Put block `b` (key `key`) in way 0 of its set; way 0's block moves to way 1 unless it
    /// is an older block for the same key (a rebuilt stale block), which is dropped.
    #[inline]
    fn insert(&mut self, key: u64, b: u32) {
        let Some(set) = self.index.get_mut(slot(key)) else {
            return;
        };
        let same = self
            .blocks
            .get(set[0] as usize)
            .is_some_and(|blk| blk.key == key);
        *set = if same { [b, set[1]] } else { [b, set[0]] };
    }

    /// Decode a new block at linear `lin` (host address `host`, page flag `code_idx`, the
    /// physical address is in `key`) and insert it, valid at the current epoch.
    pub fn build(
        &mut self,
        x: &mut Exec<'_>,
        key: u64,
        lin: u64,
        host: usize,
        code_idx: usize,
    ) -> R<u32> {
        x.cpu.mmu.code().set(code_idx);
        let bitness = x.cpu.bitness as u32;
        let rip = x.cpu.rip;
        let phys = key >> 7;
        let avail = ((PAGE_SIZE - (phys & 0xfff)) as usize).min(MAX_BYTES);
        if avail < 15 {
            if let Some(found) = self.find_cross(x, key, lin, host, avail) {
                return found;
            }
        }
        let mut buf = [0u8; MAX_BYTES];
        let got = match x.cpu.mmu.memory() {
            Some(m) => m.read_slice(&mut buf[..avail], GuestAddress(phys)).is_ok(),
            None => false,
        };
        if !got {
            // Not readable through vm-memory (cannot happen for a RAM page): read by pointer.
            for (i, b) in buf[..avail].iter_mut().enumerate() {
                // SAFETY: `host` maps a RAM page and `avail` stops at its end.
                *b = unsafe { load(host + i, 1) } as u8;
            }
        }

        if self.ops.len() + MAX_OPS > MAX_TOTAL_OPS
            || self.bytes.len() + MAX_BYTES > MAX_TOTAL_BYTES
        {
            self.clear();
        }
        let op_start = self.ops.len();
        let mut decoder = Decoder::with_ip(bitness, &buf[..avail], rip, DECODER_OPTIONS);
        let mut insts = [Instruction::default(); MAX_OPS];
        let mut n = 0;
        let mut used = 0usize;
        while n < MAX_OPS {
            let instr = &mut insts[n];
            decoder.decode_out(instr);
            if instr.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
                break;
            }
            let (op, ends) = decode::translate(instr, bitness, true);
            let jcc = instr.is_jcc_short_or_near();
            self.ops.push(op);
            used += instr.len();
            n += 1;
            // A Jcc ends the block only when taken (its handler stops the block then): the
            // fall-through path goes on in the same block.
            if ends && !jcc {
                break;
            }
        }
        // Instructions whose flags nobody looks at get handlers that skip them.
        let mut need = [true; MAX_OPS];
        decode::flags_needed(&insts[..n], &mut need[..n]);
        for (i, instr) in insts[..n].iter().enumerate() {
            if !need[i] {
                self.ops[op_start + i] = decode::translate(instr, bitness, false).0;
            }
        }
        if bitness == 64 {
            self.fuse(op_start, &insts[..n]);
        }
        if self.ops.len() == op_start {
            // The first instruction crosses into the next page.
            return self.build_cross(x, Some(key), lin, bitness, rip);
        }
        let byte_start = self.bytes.len();
        self.bytes.extend_from_slice(&buf[..used]);
        let b = self.blocks.len() as u32;
        self.blocks.push(Block {
            key,
            epoch: x.cpu.epoch,
            op_start: op_start as u32,
            op_len: (self.ops.len() - op_start) as u16,
            byte_start: byte_start as u32,
            byte_len: used as u16,
            heat: 0,
            native: 0,
            next_key: [NO_KEY; 2],
            next: [NO_BLOCK; 2],
        });
        self.insert(key, b);
        self.all.insert(key, b);
        self.built += 1;
        Ok(b)
    }

    /// Replace each CMP/TEST + Jcc pair among the ops from `op_start` (decoded from `insts`)
    /// by one fused op (`decode::fuse_cmp_jcc`).
    fn fuse(&mut self, op_start: usize, insts: &[Instruction]) {
        let mut out = op_start;
        let mut i = 0;
        while i < insts.len() {
            let (a, j) = (op_start + i, op_start + i + 1);
            let fused = match (insts.get(i + 1), self.ops.get(j)) {
                (Some(next), Some(jop)) => decode::fuse_cmp_jcc(next, &self.ops[a], jop),
                _ => None,
            };
            self.ops[out] = fused.unwrap_or(self.ops[a]);
            i += if fused.is_some() { 2 } else { 1 };
            out += 1;
        }
        self.ops.truncate(out);
    }

    /// The instruction at `lin` (key `key`, host address `host`, `avail` bytes left in its
    /// page) from [`cross`](Self::cross) when the one decoded there last time had the same
    /// bytes. The bytes in the first page are compared before the second page is translated:
    /// equal bytes there and a longer instruction mean it does straddle the pages, so the
    /// translation (and a fault it raises) is the instruction's own.
    fn find_cross(
        &mut self,
        x: &mut Exec<'_>,
        key: u64,
        lin: u64,
        host: usize,
        avail: usize,
    ) -> Option<R<u32>> {
        let c = self.cross.get(slot(key) % CROSS_SLOTS).copied().flatten()?;
        if c.key != key || c.len <= avail {
            return None;
        }
        for (i, want) in c.bytes[..avail].iter().enumerate() {
            // SAFETY: `host` is the translation of `lin` (a RAM page) and `avail` stops at the
            // end of the page.
            if unsafe { load(host + i, 1) } as u8 != *want {
                return None;
            }
        }
        let mut buf = [0u8; 15];
        if let Err(e) = fetch_cross(x, lin, &mut buf[..c.len]) {
            return Some(Err(e));
        }
        if buf[..c.len] != c.bytes[..c.len] {
            return None;
        }
        self.cross_hits += 1;
        self.tmp.clear();
        self.tmp.push(c.op);
        Some(Ok(TMP_BLOCK))
    }

    /// One instruction that straddles two pages: decoded, and kept in
    /// [`cross`](Self::cross) under `key` for the next time (never in the index).
    fn build_cross(
        &mut self,
        x: &mut Exec<'_>,
        key: Option<u64>,
        lin: u64,
        bitness: u32,
        rip: u64,
    ) -> R<u32> {
        let mut buf = [0u8; 15];
        fetch_cross(x, lin, &mut buf)?;
        let mut decoder = Decoder::with_ip(bitness, &buf, rip, DECODER_OPTIONS);
        let instr = decoder.decode();
        if instr.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
            return Err(Exc::Fault {
                vector: super::cpu::GP,
                code: Some(0),
            });
        }
        let (op, _) = decode::translate(&instr, bitness, true);
        if let Some(key) = key {
            if let Some(c) = self.cross.get_mut(slot(key) % CROSS_SLOTS) {
                *c = Some(Cross {
                    key,
                    len: instr.len(),
                    bytes: buf,
                    op,
                });
            }
        }
        self.tmp.clear();
        self.tmp.push(op);
        Ok(TMP_BLOCK)
    }

    /// The instruction at linear `lin` (host address `host`) alone, with every flag computed:
    /// for single-stepping (TF, an interrupt shadow) when the cached block's first op skips
    /// flags that the block's later instructions would have overwritten.
    pub fn build_single(&mut self, x: &mut Exec<'_>, lin: u64, host: usize) -> R<u32> {
        let bitness = x.cpu.bitness as u32;
        let rip = x.cpu.rip;
        let avail = ((PAGE_SIZE - (lin & 0xfff)) as usize).min(15);
        let mut buf = [0u8; 15];
        for (i, b) in buf[..avail].iter_mut().enumerate() {
            // SAFETY: `host` is the translation of `lin` (a RAM page) and `avail` stops at the
            // end of the page.
            *b = unsafe { load(host + i, 1) } as u8;
        }
        let mut decoder = Decoder::with_ip(bitness, &buf[..avail], rip, DECODER_OPTIONS);
        let instr = decoder.decode();
        if instr.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
            return self.build_cross(x, None, lin, bitness, rip);
        }
        let (op, _) = decode::translate(&instr, bitness, true);
        self.tmp.clear();
        self.tmp.push(op);
        Ok(TMP_BLOCK)
    }
}

/// Compare `want` with guest memory at host address `host`, 8 bytes at a time.
#[inline(always)]
fn same_bytes(want: &[u8], host: usize) -> bool {
    let mut i = 0;
    while i + 8 <= want.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&want[i..i + 8]);
        // SAFETY: the block's bytes lie inside the RAM page `host` belongs to (blocks never
        // cross a page and `host` comes from a translation of the block's first byte).
        if unsafe { load(host + i, 8) } != u64::from_le_bytes(w) {
            return false;
        }
        i += 8;
    }
    while i < want.len() {
        // SAFETY: as above.
        if unsafe { load(host + i, 1) } as u8 != want[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::exec::system::ud_op;

    /// A one-op block for `key` whose bytes are `bytes`, stamped with `epoch`, as `build`
    /// inserts it.
    fn add(c: &mut BlockCache, key: u64, epoch: u64, bytes: &[u8]) -> u32 {
        let b = c.blocks.len() as u32;
        c.blocks.push(Block {
            key,
            epoch,
            op_start: c.ops.len() as u32,
            op_len: 1,
            byte_start: c.bytes.len() as u32,
            byte_len: bytes.len() as u16,
            heat: 0,
            native: 0,
            next_key: [NO_KEY; 2],
            next: [NO_BLOCK; 2],
        });
        c.ops.push(Op::new(ud_op, bytes.len() as u8));
        c.bytes.extend_from_slice(bytes);
        c.insert(key, b);
        c.all.insert(key, b);
        b
    }

    /// Three keys of one index set.
    fn colliding() -> [u64; 3] {
        let first = block_key(0x1000, 64);
        let mut keys = vec![first];
        let mut phys = 0x1000u64;
        while keys.len() < 3 {
            phys += 1;
            let k = block_key(phys, 64);
            if slot(k) == slot(first) {
                keys.push(k);
            }
        }
        [keys[0], keys[1], keys[2]]
    }

    #[test]
    fn two_blocks_of_one_set_stay_in_the_index() {
        let mut c = BlockCache::new();
        let [a, b, d] = colliding();
        add(&mut c, a, 1, &[0x90]);
        add(&mut c, b, 1, &[0x90]);
        assert!(c.find(a, 1).is_some() && c.find(b, 1).is_some());
        assert!(c.find(a, 2).is_none(), "another epoch needs a check");
        // A third block pushes out the oldest; the full map still has it.
        add(&mut c, d, 1, &[0x90]);
        assert!(c.find(a, 1).is_none());
        assert!(c.find(b, 1).is_some() && c.find(d, 1).is_some());
        let code = CodePages::new(&GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        let mem = [0x90u8; 8];
        let host = mem.as_ptr() as usize;
        assert_eq!(
            c.revalidate(a, NO_BLOCK, (1, u64::MAX), host, &code, 0),
            Some(0)
        );
        assert!(c.find(a, 1).is_some(), "back in the index");
    }

    #[test]
    fn a_rebuilt_block_replaces_its_stale_copy() {
        let mut c = BlockCache::new();
        let [a, b, _] = colliding();
        add(&mut c, b, 1, &[0x90]);
        add(&mut c, a, 1, &[0x90]);
        let code = CodePages::new(&GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        // The bytes changed: the old block is stale at epoch 2 ...
        let mem = [0xccu8; 8];
        assert_eq!(
            c.revalidate(a, NO_BLOCK, (2, u64::MAX), mem.as_ptr() as usize, &code, 0),
            None
        );
        assert_eq!(c.stale, 1);
        // ... and its rebuild takes its way without pushing out the other block of the set.
        let new = add(&mut c, a, 2, &[0xcc]);
        assert_eq!(c.index[slot(a)], [new, 0]);
        assert!(c.find(a, 2).is_some());
        assert!(c.find(b, 1).is_some());
        // Bytes that still match are stamped with the new epoch.
        let same = [0x90u8; 8];
        assert_eq!(
            c.revalidate(b, NO_BLOCK, (3, u64::MAX), same.as_ptr() as usize, &code, 0),
            Some(0)
        );
        assert!(c.find(b, 3).is_some());
        assert_eq!(c.revalidated, 1);
    }

    #[test]
    fn successor_links_are_hints_checked_like_index_hits() {
        let mut c = BlockCache::new();
        let [a, b, d] = colliding();
        let pa = add(&mut c, a, 1, &[0x90]);
        let pb = add(&mut c, b, 1, &[0x90]);
        // The index finds b after a, and a remembers it.
        assert_eq!(c.find_after(pa, b, 1), Ok(pb));
        assert_eq!(c.blocks[pa as usize].next, [pb, NO_BLOCK]);
        assert_eq!(c.find_after(pb, a, 1), Ok(pa));
        // A third block of the set pushes a out of the index; b's link still finds it.
        let pd = add(&mut c, d, 1, &[0x90]);
        assert!(c.find(a, 1).is_none());
        assert_eq!(c.find_after(pa, b, 1), Ok(pb));
        assert_eq!(c.find_after(pb, a, 1), Ok(pa));
        // A link to a block checked at an older epoch is not taken, but handed back for a
        // look at its bytes.
        assert_eq!(c.find_after(pa, b, 2), Err(pb));
        // Nor is a link for another key.
        assert_eq!(c.find_after(pa, block_key(0x2000, 64), 1), Err(NO_BLOCK));
        // No previous block: the index alone.
        assert_eq!(c.find_after(NO_BLOCK, d, 1), Ok(pd));
        // A stale index hit is left to `revalidate`.
        assert_eq!(c.find_after(NO_BLOCK, d, 2), Err(NO_BLOCK));
    }

    #[test]
    fn after_io_exits_only_a_page_the_vmm_wrote_has_its_blocks_compared() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let code = CodePages::new(&mem);
        let mut c = BlockCache::new();
        let [a, _, _] = colliding();
        add(&mut c, a, 1, &[0x90]);
        code.set(1);
        // Bytes that differ (the comparison would fail) show which check ran.
        let other = [0xccu8; 8];
        let host = other.as_ptr() as usize;
        // Only I/O exits since epoch 1 (floor 1) and the page's bit is clear: no comparison.
        assert_eq!(c.revalidate(a, NO_BLOCK, (2, 1), host, &code, 1), Some(0));
        assert_eq!((c.revalidated_soft, c.stale), (1, 0));
        // Another change (floor 3): the bytes are compared.
        assert_eq!(c.revalidate(a, NO_BLOCK, (3, 3), host, &code, 1), None);
        assert_eq!(c.stale, 1);
        // A device wrote the page: compared even after exits only.
        let mut c = BlockCache::new();
        add(&mut c, a, 1, &[0x90]);
        mem.write_slice(&[0xcc], GuestAddress(0x10)).unwrap();
        assert_eq!(c.revalidate(a, NO_BLOCK, (2, 1), host, &code, 1), None);
        // While dirty logging is on the migration owns the bitmap: compared too.
        let mut c = BlockCache::new();
        add(&mut c, a, 1, &[0x90]);
        assert!(code.vmm_wrote_code(), "takes the bit");
        code.enable_dirty_log();
        assert_eq!(c.revalidate(a, NO_BLOCK, (2, 1), host, &code, 1), None);
    }

    #[test]
    fn a_page_found_clean_after_io_exits_spares_its_other_blocks_the_look() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let code = CodePages::new(&mem);
        let mut c = BlockCache::new();
        let [a, b, d] = colliding();
        let (pa, pb, pd) = (
            add(&mut c, a, 1, &[0x90]),
            add(&mut c, b, 1, &[0x90]),
            add(&mut c, d, 1, &[0x90]),
        );
        code.set(1);
        let other = [0xccu8; 8];
        let host = other.as_ptr() as usize;
        // The first block of page 1 at epoch 2 looks at the page's bit.
        assert_eq!(c.revalidate(a, pa, (2, 1), host, &code, 1), Some(pa));
        // A device writes the page now: the page was found clean at epoch 2, so another
        // block of it at epoch 2 is stamped like the first (the write is seen at the next
        // interrupt, I/O exit or refresh, which move the epoch)...
        mem.write_slice(&[0xcc], GuestAddress(0x10)).unwrap();
        assert_eq!(c.revalidate(b, pb, (2, 1), host, &code, 1), Some(pb));
        assert_eq!((c.revalidated_soft, c.stale), (2, 0));
        // ... and at the next epoch the page's bit is looked at again: bytes compared.
        assert_eq!(c.revalidate(d, pd, (3, 1), host, &code, 1), None);
        assert_eq!(c.stale, 1);
    }

    #[test]
    fn only_device_writes_into_code_pages_are_reported() {
        // Two regions: indices 1..=4 are 0x0-0x4000, 5..=6 are 0x10000-0x12000.
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x2000)])
                .unwrap();
        let code = CodePages::new(&mem);
        // The loader wrote the page before it held code: forgotten when it is flagged.
        mem.write_slice(&[1, 2, 3], GuestAddress(0x1000)).unwrap();
        code.set(2);
        code.set(6);
        assert_eq!(code.watched(), 2);
        assert!(!code.vmm_wrote_code(), "the write came before the code");
        // A device writes a data page of each region: nothing to report.
        mem.write_slice(&[9; 64], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[9; 64], GuestAddress(0x10000)).unwrap();
        assert!(!code.vmm_wrote_code());
        // A write into a code page (of the second region) is reported once.
        mem.write_slice(&[0xcc], GuestAddress(0x11ff0)).unwrap();
        assert!(code.vmm_wrote_code());
        assert!(!code.vmm_wrote_code(), "reported once");
        // A page a vCPU store unflagged leaves the watch list at the next scan.
        assert!(code.clear(2));
        mem.write_slice(&[0xcc], GuestAddress(0x1000)).unwrap();
        assert!(!code.vmm_wrote_code(), "no longer code");
        assert_eq!(code.watched(), 1);
        // Flagged again, it is watched again.
        code.set(2);
        mem.write_slice(&[0xcc], GuestAddress(0x1001)).unwrap();
        assert!(code.vmm_wrote_code());
    }

    #[test]
    fn a_device_write_taken_from_the_vmm_bitmap_stays_in_the_dirty_log() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let code = CodePages::new(&mem);
        code.set(3);
        code.enable_dirty_log();
        mem.write_slice(&[0xcc], GuestAddress(0x2000)).unwrap();
        assert!(code.vmm_wrote_code());
        // The VMM bitmap no longer has it; the emulator's log does.
        assert_eq!(crate::take_vmm_dirty(&mem), vec![vec![0]]);
        assert_eq!(code.take_dirty_log(), vec![vec![1 << 2]]);
    }
}
