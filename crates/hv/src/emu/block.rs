//! The decoded-block cache.
//!
//! A block is a run of up to [`MAX_OPS`] instructions inside one 4 KiB page that ends at the
//! first control transfer or state-changing system instruction. Blocks are keyed by the
//! guest-physical address of their first byte plus the decoding mode (16/32/64-bit), so one
//! block serves every linear mapping of the page. Each block keeps a copy of the bytes it was
//! decoded from; before a block runs, those bytes are compared with guest memory, so a block
//! never executes stale code, whoever changed it (this CPU, another vCPU, or a device writing
//! through `vm-memory`). A store into the block that is running ends it after the storing
//! instruction (see `Exec::note_store`).
//!
//! Storage is three arenas (blocks, ops, bytes) and a direct-mapped index; when an arena is
//! full everything is dropped and rebuilt on demand.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};
use vm_memory::{Bytes, GuestAddress};

use super::cpu::{Exc, R};
use super::decode;
use super::exec::{fetch_cross, Exec, Op};
use super::mmu::{load, PAGE_SIZE};

/// Most instructions in one block.
pub const MAX_OPS: usize = 32;
/// Most bytes decoded for one block.
const MAX_BYTES: usize = 32 * 15;
const INDEX_BITS: u32 = 14;
const MAX_TOTAL_OPS: usize = 1 << 19;
const MAX_TOTAL_BYTES: usize = 1 << 22;
/// Block number of the one-instruction block used for an instruction that crosses a page.
const TMP_BLOCK: u32 = u32::MAX;

/// The iced decoder options: `F3 0F BC`/`F3 0F BD` are BSF/BSR on a CPU without BMI1/LZCNT.
pub const DECODER_OPTIONS: u32 = DecoderOptions::NO_MPFX_0FBC | DecoderOptions::NO_MPFX_0FBD;

#[derive(Debug, Clone, Copy)]
struct Block {
    key: u64,
    op_start: u32,
    op_len: u16,
    byte_start: u32,
    byte_len: u16,
}

pub struct BlockCache {
    /// Direct-mapped: slot → block number (`u32::MAX`: empty); the block holds its key.
    index: Vec<u32>,
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
            index: vec![u32::MAX; 1 << INDEX_BITS],
            all: HashMap::default(),
            blocks: Vec::new(),
            ops: Vec::new(),
            bytes: Vec::new(),
            tmp: Vec::new(),
            built: 0,
            stale: 0,
        }
    }

    /// Drop every block.
    pub fn clear(&mut self) {
        self.index.fill(u32::MAX);
        self.all.clear();
        self.blocks.clear();
        self.ops.clear();
        self.bytes.clear();
    }

    /// The block for `key` whose bytes still match guest memory at host address `host`.
    #[inline(always)]
    pub fn find(&mut self, key: u64, host: usize) -> Option<u32> {
        let s = slot(key);
        let mut b = self.index[s];
        if self.blocks.get(b as usize).is_none_or(|blk| blk.key != key) {
            // Evicted from the direct-mapped index (or never built): look in the full map
            // before decoding again.
            b = *self.all.get(&key)?;
            self.index[s] = b;
        }
        let blk = self.blocks.get(b as usize)?;
        let want = self
            .bytes
            .get(blk.byte_start as usize..blk.byte_start as usize + blk.byte_len as usize)?;
        if same_bytes(want, host) {
            Some(b)
        } else {
            self.stale += 1;
            None
        }
    }

    #[inline(always)]
    pub fn ops(&self, b: u32) -> &[Op] {
        if b == TMP_BLOCK {
            return &self.tmp;
        }
        match self.blocks.get(b as usize) {
            Some(blk) => self
                .ops
                .get(blk.op_start as usize..blk.op_start as usize + blk.op_len as usize)
                .unwrap_or(&[]),
            None => &[],
        }
    }

    #[inline(always)]
    pub fn byte_len(&self, b: u32) -> usize {
        self.blocks
            .get(b as usize)
            .map(|b| b.byte_len as usize)
            .unwrap_or(0)
    }

    /// Decode a new block at linear `lin` (host address `host`, the physical address is in
    /// `key`) and insert it.
    pub fn build(&mut self, x: &mut Exec<'_>, key: u64, lin: u64, host: usize) -> R<u32> {
        let bitness = x.cpu.bitness as u32;
        let rip = x.cpu.rip;
        let phys = key >> 2;
        let avail = ((PAGE_SIZE - (phys & 0xfff)) as usize).min(MAX_BYTES);
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
        let mut instr = Instruction::default();
        let mut used = 0usize;
        while self.ops.len() - op_start < MAX_OPS {
            decoder.decode_out(&mut instr);
            if instr.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
                break;
            }
            let (op, ends) = decode::translate(&instr, bitness);
            self.ops.push(op);
            used += instr.len();
            if ends {
                break;
            }
        }
        if self.ops.len() == op_start {
            // The first instruction crosses into the next page.
            return self.build_cross(x, lin, bitness, rip);
        }
        let byte_start = self.bytes.len();
        self.bytes.extend_from_slice(&buf[..used]);
        let b = self.blocks.len() as u32;
        self.blocks.push(Block {
            key,
            op_start: op_start as u32,
            op_len: (self.ops.len() - op_start) as u16,
            byte_start: byte_start as u32,
            byte_len: used as u16,
        });
        self.index[slot(key)] = b;
        self.all.insert(key, b);
        self.built += 1;
        Ok(b)
    }

    /// One instruction that straddles two pages: decoded every time, never cached.
    fn build_cross(&mut self, x: &mut Exec<'_>, lin: u64, bitness: u32, rip: u64) -> R<u32> {
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
        let (op, _) = decode::translate(&instr, bitness);
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
