//! Linear → physical → host translation: 4-level paging (Intel SDM Vol. 3A §4.5), a software
//! TLB, and the guest-memory access paths the instructions use.
//!
//! The TLB is direct-mapped, one array for supervisor and one for user accesses. An entry holds
//! one tag per access kind (read / write / execute); a tag is the linear page address when that
//! access is allowed without a page walk, `TAG_INVALID` otherwise, with `TAG_IO` or-ed in when
//! the page is not RAM (then the fast path misses and the slow path sends the access to the
//! interrupt controller or the [`IoHandler`](crate::IoHandler)). The write tag is set only once
//! the leaf entry's dirty bit is set, so the first write to a clean page walks and sets D.
//! Large pages are cached as their 4 KiB pieces; `INVLPG` on a TLB that holds any piece of a
//! large page flushes everything.
//!
//! Guest RAM is reached through host pointers taken from `vm-memory` (`get_host_address` on
//! each region, once, when the memory is set). The `Mmu` keeps a clone of the `GuestMemory`, so
//! the mappings outlive every pointer derived from them.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::block::{self, CodePages};
use super::cpu::*;
use super::exec::Exec;
use super::huge::HugeSlice;
use crate::GuestMemory;

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_MASK: u64 = !0xfff;
/// Entries per privilege level. 2048 rather than 512: code and data pages of the kernel's I/O
/// paths evicted each other at 512 (page walks fell by half).
pub const TLB_SIZE: usize = 2048;
/// A tag that never equals a page address.
pub const TAG_INVALID: u64 = 1;
/// Or-ed into a tag of a page that is not RAM.
pub const TAG_IO: u64 = 2;

/// Page-table entry bits (SDM Vol. 3A §4.5, Tables 4-14 to 4-20).
pub const PTE_P: u64 = 1 << 0;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_US: u64 = 1 << 2;
pub const PTE_A: u64 = 1 << 5;
pub const PTE_D: u64 = 1 << 6;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_G: u64 = 1 << 8;
pub const PTE_XD: u64 = 1 << 63;

/// Page-fault error code bits (SDM Vol. 3A §4.7).
pub const PFEC_P: u32 = 1 << 0;
pub const PFEC_W: u32 = 1 << 1;
pub const PFEC_U: u32 = 1 << 2;
pub const PFEC_RSVD: u32 = 1 << 3;
pub const PFEC_I: u32 = 1 << 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

/// Where a physical access goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Host address of the byte in guest RAM.
    Ram(usize),
    /// Guest-physical address that is not RAM (MMIO or the local APIC page).
    Io(u64),
}

#[derive(Debug, Clone, Copy)]
pub struct TlbEntry {
    pub tag_r: u64,
    pub tag_w: u64,
    pub tag_x: u64,
    /// Host address of the page minus its linear address.
    pub addend: usize,
    /// Physical address of the page.
    pub phys: u64,
    /// Index of the page's flag in [`CodePages`] (0: not RAM).
    pub code: u32,
    pub global: bool,
}

impl TlbEntry {
    const EMPTY: TlbEntry = TlbEntry {
        tag_r: TAG_INVALID,
        tag_w: TAG_INVALID,
        tag_x: TAG_INVALID,
        addend: 0,
        phys: 0,
        code: 0,
        global: false,
    };
}

#[derive(Debug, Clone, Copy)]
struct RamRegion {
    start: u64,
    len: u64,
    host: usize,
    /// Index of the region's first page in [`CodePages`].
    code_base: usize,
}

/// The result of a successful page walk.
#[derive(Debug, Clone, Copy)]
struct Walked {
    phys: u64,
    write_ok: bool,
    exec_ok: bool,
    global: bool,
    large: bool,
}

pub struct Mmu {
    pub tlb: HugeSlice<[TlbEntry; TLB_SIZE]>,
    ram: Vec<RamRegion>,
    mem: Option<GuestMemory>,
    /// The VM's code-page flags for this memory map.
    code: Arc<CodePages>,
    /// Generation of the VM's memory this MMU has loaded.
    pub mem_gen: u64,
    has_large: bool,
    /// Physical page of the xAPIC MMIO window (`u64::MAX`: none).
    pub apic_page: u64,
}

#[inline(always)]
pub fn tlb_index(lin: u64) -> usize {
    (lin >> 12) as usize & (TLB_SIZE - 1)
}

impl Mmu {
    pub fn new() -> Mmu {
        Mmu {
            tlb: HugeSlice::new(2, |_| [TlbEntry::EMPTY; TLB_SIZE]),
            ram: Vec::new(),
            mem: None,
            code: Arc::new(CodePages::new(&GuestMemory::default())),
            mem_gen: 0,
            has_large: false,
            apic_page: u64::MAX,
        }
    }

    /// Use `mem` as guest RAM, with the VM's code-page flags `code` (built for `mem`).
    pub fn set_memory(&mut self, mem: GuestMemory, code: Arc<CodePages>, gen: u64) {
        self.ram = mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(RamRegion {
                    start: r.start_addr().0,
                    len: r.len(),
                    host: host as usize,
                    code_base: code.region_base(r.start_addr().0),
                })
            })
            .collect();
        self.mem = Some(mem);
        self.code = code;
        self.mem_gen = gen;
        self.flush_all();
    }

    pub fn memory(&self) -> Option<&GuestMemory> {
        self.mem.as_ref()
    }

    #[inline(always)]
    pub fn code(&self) -> &CodePages {
        &self.code
    }

    /// Code-page index of guest-physical page `page` (0 when it is not RAM).
    fn code_index(&self, page: u64) -> usize {
        self.ram
            .iter()
            .find_map(|r| {
                let off = page.checked_sub(r.start)?;
                (off < r.len).then(|| r.code_base + (off / PAGE_SIZE) as usize)
            })
            .unwrap_or(0)
    }

    /// Code-page index of the page holding host address `p` of guest RAM (0 when none).
    fn code_index_of_host(&self, p: usize) -> usize {
        self.ram
            .iter()
            .find_map(|r| {
                let off = p.checked_sub(r.host)? as u64;
                (off < r.len).then(|| r.code_base + (off / PAGE_SIZE) as usize)
            })
            .unwrap_or(0)
    }

    /// Host address of guest-physical `pa` when `pa..pa+len` is RAM in one region.
    #[inline]
    pub fn host_range(&self, pa: u64, len: u64) -> Option<usize> {
        self.ram.iter().find_map(|r| {
            let off = pa.checked_sub(r.start)?;
            (off.checked_add(len)? <= r.len).then_some(r.host + off as usize)
        })
    }

    /// Host address of the 4 KiB physical page `page` if it is entirely RAM and not the APIC.
    #[inline]
    pub fn host_of_page(&self, page: u64) -> Option<usize> {
        if page == self.apic_page {
            return None;
        }
        self.host_range(page, PAGE_SIZE)
    }

    pub fn flush_all(&mut self) {
        for t in self.tlb.iter_mut() {
            t.fill(TlbEntry::EMPTY);
        }
        self.has_large = false;
    }

    /// Flush everything but global translations (a CR3 write, SDM Vol. 3A §4.10.4.1).
    pub fn flush_nonglobal(&mut self) {
        for t in self.tlb.iter_mut() {
            for e in t.iter_mut() {
                if !e.global {
                    *e = TlbEntry::EMPTY;
                }
            }
        }
    }

    /// INVLPG.
    pub fn flush_page(&mut self, lin: u64) {
        if self.has_large {
            self.flush_all();
            return;
        }
        let page = lin & PAGE_MASK;
        for t in self.tlb.iter_mut() {
            let e = &mut t[tlb_index(lin)];
            if (e.tag_r & PAGE_MASK == page && e.tag_r != TAG_INVALID)
                || (e.tag_w & PAGE_MASK == page && e.tag_w != TAG_INVALID)
                || (e.tag_x & PAGE_MASK == page && e.tag_x != TAG_INVALID)
            {
                *e = TlbEntry::EMPTY;
            }
        }
    }

    /// Set the xAPIC page; any change flushes the TLB, which may hold the page as RAM or IO.
    pub fn set_apic_page(&mut self, page: u64) {
        if page != self.apic_page {
            self.apic_page = page;
            self.flush_all();
        }
    }
}

impl Default for Mmu {
    fn default() -> Self {
        Self::new()
    }
}

// ---- raw accesses to guest RAM ------------------------------------------------------------------

/// Load `size` (1, 2, 4, 8) bytes at host address `p`.
///
/// # Safety
/// `p..p+size` must lie inside a guest RAM mapping that stays mapped for the call.
#[inline(always)]
pub unsafe fn load(p: usize, size: u8) -> u64 {
    // Aligned accesses are single atomic loads, as on x86; others are plain unaligned loads.
    // SAFETY: the caller guarantees the range is mapped; atomics need natural alignment, which
    // is checked.
    unsafe {
        match size {
            1 => AtomicU8::from_ptr(p as *mut u8).load(Ordering::Relaxed) as u64,
            2 if p & 1 == 0 => AtomicU16::from_ptr(p as *mut u16).load(Ordering::Relaxed) as u64,
            4 if p & 3 == 0 => AtomicU32::from_ptr(p as *mut u32).load(Ordering::Relaxed) as u64,
            8 if p & 7 == 0 => AtomicU64::from_ptr(p as *mut u64).load(Ordering::Relaxed),
            2 => std::ptr::read_unaligned(p as *const u16) as u64,
            4 => std::ptr::read_unaligned(p as *const u32) as u64,
            _ => std::ptr::read_unaligned(p as *const u64),
        }
    }
}

/// Store `size` (1, 2, 4, 8) bytes at host address `p`.
///
/// # Safety
/// `p..p+size` must lie inside a guest RAM mapping that stays mapped for the call.
#[inline(always)]
pub unsafe fn store(p: usize, size: u8, v: u64) {
    // SAFETY: as for `load`.
    unsafe {
        match size {
            1 => AtomicU8::from_ptr(p as *mut u8).store(v as u8, Ordering::Relaxed),
            2 if p & 1 == 0 => {
                AtomicU16::from_ptr(p as *mut u16).store(v as u16, Ordering::Relaxed)
            }
            4 if p & 3 == 0 => {
                AtomicU32::from_ptr(p as *mut u32).store(v as u32, Ordering::Relaxed)
            }
            8 if p & 7 == 0 => AtomicU64::from_ptr(p as *mut u64).store(v, Ordering::Relaxed),
            2 => std::ptr::write_unaligned(p as *mut u16, v as u16),
            4 => std::ptr::write_unaligned(p as *mut u32, v as u32),
            _ => std::ptr::write_unaligned(p as *mut u64, v),
        }
    }
}

// ---- page walk ------------------------------------------------------------------------------------

impl Cpu {
    /// Raise #PF for `lin` with error code `code` (CR2 is written now, SDM Vol. 3A §4.7).
    fn page_fault(&mut self, lin: u64, code: u32) -> Exc {
        self.cr2 = lin;
        fault(PF_VEC, code)
    }

    /// Walk the 4-level page tables for `lin` (SDM Vol. 3A §4.5.4), check the access, set the
    /// accessed and dirty bits atomically.
    fn walk(&mut self, lin: u64, acc: Access, user: bool) -> R<Walked> {
        if self.cr0 & CR0_PG == 0 {
            return Ok(Walked {
                phys: lin & 0xffff_ffff,
                write_ok: true,
                exec_ok: true,
                global: false,
                large: false,
            });
        }
        if !self.long_mode() {
            tracing::error!(
                "vCPU {}: 32-bit / PAE paging without long mode is not supported",
                self.id
            );
            return Err(Exc::Shutdown);
        }
        let nxe = self.efer & EFER_NXE != 0;
        let addr_mask = ((1u64 << self.maxphy) - 1) & PAGE_MASK;
        let rsvd_hi =
            (!((1u64 << self.maxphy) - 1) & ((1u64 << 52) - 1)) | if nxe { 0 } else { PTE_XD };
        let mut code = 0u32;
        if acc == Access::Write {
            code |= PFEC_W;
        }
        if user {
            code |= PFEC_U;
        }
        if acc == Access::Exec && nxe {
            code |= PFEC_I;
        }
        'retry: for _attempt in 0..4 {
            let mut table = self.cr3 & addr_mask;
            let mut rw = true;
            let mut us = true;
            let mut xd = false;
            let mut path: [(usize, u64); 4] = [(0, 0); 4];
            let mut n = 0;
            let mut level = 3u32;
            let (phys, large, global) = loop {
                let pa = table + ((lin >> (12 + 9 * level)) & 511) * 8;
                let Some(host) = self.mmu.host_range(pa, 8) else {
                    // Page tables outside RAM read as not present.
                    return Err(self.page_fault(lin, code));
                };
                // SAFETY: `host` is an 8-byte aligned address inside a RAM mapping kept alive
                // by `self.mmu` (table bases are page aligned, regions are mmap'd pages).
                let pte = unsafe { AtomicU64::from_ptr(host as *mut u64) }.load(Ordering::Acquire);
                if pte & PTE_P == 0 {
                    return Err(self.page_fault(lin, code));
                }
                let mut rsvd = rsvd_hi;
                let leaf = level == 0 || (level <= 2 && pte & PTE_PS != 0);
                if level == 3 {
                    rsvd |= PTE_PS;
                } else if level == 2 && leaf {
                    rsvd |= 0x3fff_e000;
                } else if level == 1 && leaf {
                    rsvd |= 0x1f_e000;
                }
                if pte & rsvd != 0 {
                    return Err(self.page_fault(lin, code | PFEC_P | PFEC_RSVD));
                }
                rw &= pte & PTE_RW != 0;
                us &= pte & PTE_US != 0;
                xd |= nxe && pte & PTE_XD != 0;
                path[n] = (host, pte);
                n += 1;
                if leaf {
                    let span = (1u64 << (12 + 9 * level)) - 1;
                    let g = pte & PTE_G != 0 && self.cr4 & CR4_PGE != 0;
                    break ((pte & addr_mask & !span) | (lin & span), level > 0, g);
                }
                table = pte & addr_mask;
                level -= 1;
            };
            let wp = self.cr0 & CR0_WP != 0;
            let write_allowed = if user { us && rw } else { rw || !wp };
            let denied = match acc {
                Access::Read => user && !us,
                Access::Write => !write_allowed,
                Access::Exec => (user && !us) || xd,
            };
            if denied {
                return Err(self.page_fault(lin, code | PFEC_P));
            }
            // Accessed bits on every level, dirty on the leaf for a write; like the hardware's
            // locked update, restart the walk if an entry changed under us.
            let mut dirty = false;
            for (i, &(host, pte)) in path[..n].iter().enumerate() {
                let is_leaf = i + 1 == n;
                let mut want = pte | PTE_A;
                if is_leaf && acc == Access::Write {
                    want |= PTE_D;
                }
                if is_leaf {
                    dirty = want & PTE_D != 0;
                }
                if want != pte {
                    // SAFETY: as above; `host` is an aligned PTE inside guest RAM.
                    let a = unsafe { AtomicU64::from_ptr(host as *mut u64) };
                    if a.compare_exchange(pte, want, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue 'retry;
                    }
                    // Page tables are data, but nothing stops a guest from running them.
                    self.wrote_host(host, 8);
                }
            }
            return Ok(Walked {
                phys,
                write_ok: write_allowed && dirty,
                exec_ok: !xd && (!user || us),
                global,
                large,
            });
        }
        // The tables kept changing: translate without the A/D update (still correct data).
        Err(self.page_fault(lin, code))
    }

    /// Translate `lin` for `acc` with user (`true`) or supervisor privilege, through the TLB.
    pub fn translate(&mut self, lin: u64, acc: Access, user: bool) -> R<Target> {
        let idx = tlb_index(lin);
        let page = lin & PAGE_MASK;
        let e = &self.mmu.tlb[user as usize][idx];
        let tag = match acc {
            Access::Read => e.tag_r,
            Access::Write => e.tag_w,
            Access::Exec => e.tag_x,
        };
        if tag & PAGE_MASK == page && tag & TAG_INVALID == 0 {
            return Ok(if tag & TAG_IO != 0 {
                Target::Io(e.phys | (lin & 0xfff))
            } else {
                Target::Ram(e.addend.wrapping_add(lin as usize))
            });
        }
        if self.long_mode() && !Cpu::canonical(lin) {
            return Err(gp0());
        }
        let w = self.walk(lin, acc, user)?;
        let phys_page = w.phys & PAGE_MASK;
        let host = self.mmu.host_of_page(phys_page);
        let io = if host.is_none() { TAG_IO } else { 0 };
        let code_idx = if host.is_some() {
            self.mmu.code_index(phys_page)
        } else {
            0
        };
        if w.large {
            self.mmu.has_large = true;
        }
        if acc == Access::Exec && code_idx != 0 && self.mmu.code().vmm_wrote_page(code_idx) {
            // A device wrote a code page that is (newly) mapped for execution: blocks decoded
            // from its old bytes must not run (see `block.rs`).
            self.device_wrote_code();
        }
        let e = &mut self.mmu.tlb[user as usize][idx];
        // A new page replaces the entry; the same page only gains permissions.
        let same = e.phys == phys_page && e.tag_r & PAGE_MASK == page && e.tag_r != TAG_INVALID;
        e.tag_r = page | io;
        e.tag_w = if w.write_ok {
            page | io
        } else if same {
            e.tag_w
        } else {
            TAG_INVALID
        };
        e.tag_x = if w.exec_ok { page | io } else { TAG_INVALID };
        e.addend = host.unwrap_or(0).wrapping_sub(page as usize);
        e.phys = phys_page;
        e.global = w.global;
        e.code = code_idx as u32;
        Ok(match host {
            Some(h) => Target::Ram(h + (lin & 0xfff) as usize),
            None => Target::Io(w.phys),
        })
    }
}

// ---- accesses by instructions ---------------------------------------------------------------------

impl Exec<'_> {
    /// Read `size` bytes at linear `lin` with the current privilege.
    #[inline(always)]
    pub fn read(&mut self, lin: u64, size: u8) -> R<u64> {
        let u = self.cpu.tlb_user;
        let e = &self.cpu.mmu.tlb[u & 1][tlb_index(lin)];
        if e.tag_r == lin & PAGE_MASK && (lin & 0xfff) + size as u64 <= PAGE_SIZE {
            let p = e.addend.wrapping_add(lin as usize);
            // SAFETY: a read tag equal to the page means `p` is in a mapped RAM page and the
            // access does not leave it.
            return Ok(unsafe { load(p, size) });
        }
        self.read_slow(lin, size, u != 0)
    }

    /// Write `size` bytes at linear `lin` with the current privilege.
    #[inline(always)]
    pub fn write(&mut self, lin: u64, size: u8, v: u64) -> R<()> {
        let u = self.cpu.tlb_user;
        let e = &self.cpu.mmu.tlb[u & 1][tlb_index(lin)];
        if e.tag_w == lin & PAGE_MASK && (lin & 0xfff) + size as u64 <= PAGE_SIZE {
            let p = e.addend.wrapping_add(lin as usize);
            let code = e.code as usize;
            // SAFETY: a write tag equal to the page means `p` is in a mapped, writable RAM page
            // and the access does not leave it.
            unsafe { store(p, size, v) };
            if self.cpu.mmu.code().is_code(code) {
                self.cpu.code_written(code, p, size as usize);
            }
            return Ok(());
        }
        let bytes = v.to_le_bytes();
        self.write_bytes(lin, &bytes[..size as usize & 15], u != 0)
    }

    /// Supervisor-privilege read (descriptor tables, TSS, IDT: SDM Vol. 3A §5.5 implicit
    /// accesses).
    pub fn read_sys(&mut self, lin: u64, size: u8) -> R<u64> {
        self.read_slow(lin, size, false)
    }

    pub fn write_sys(&mut self, lin: u64, size: u8, v: u64) -> R<()> {
        let bytes = v.to_le_bytes();
        self.write_bytes(lin, &bytes[..size as usize & 15], false)
    }

    #[inline(never)]
    fn read_slow(&mut self, lin: u64, size: u8, user: bool) -> R<u64> {
        let mut buf = [0u8; 8];
        self.read_bytes(lin, &mut buf[..(size as usize).min(8)], user)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Read `out.len()` bytes at `lin`. Every page is translated before any byte is read.
    pub fn read_bytes(&mut self, lin: u64, out: &mut [u8], user: bool) -> R<()> {
        let first = (PAGE_SIZE - (lin & 0xfff)) as usize;
        if out.len() <= first {
            let t = self.cpu.translate(lin, Access::Read, user)?;
            self.read_target(t, out);
            return Ok(());
        }
        if out.len() > first + PAGE_SIZE as usize {
            // Longer than two pages: page by page (only used for bulk copies).
            let mut done = 0;
            while done < out.len() {
                let l = lin.wrapping_add(done as u64) & self.cpu.lin_mask;
                let n = ((PAGE_SIZE - (l & 0xfff)) as usize).min(out.len() - done);
                let t = self.cpu.translate(l, Access::Read, user)?;
                self.read_target(t, &mut out[done..done + n]);
                done += n;
            }
            return Ok(());
        }
        let lin2 = lin.wrapping_add(first as u64) & self.cpu.lin_mask;
        let t1 = self.cpu.translate(lin, Access::Read, user)?;
        let t2 = self.cpu.translate(lin2, Access::Read, user)?;
        let (a, b) = out.split_at_mut(first);
        self.read_target(t1, a);
        self.read_target(t2, b);
        Ok(())
    }

    /// Write `data` at `lin`. Every page is translated before any byte is written.
    pub fn write_bytes(&mut self, lin: u64, data: &[u8], user: bool) -> R<()> {
        let first = (PAGE_SIZE - (lin & 0xfff)) as usize;
        if data.len() <= first {
            let t = self.cpu.translate(lin, Access::Write, user)?;
            self.write_target(t, data);
            return Ok(());
        }
        let lin2 = lin.wrapping_add(first as u64) & self.cpu.lin_mask;
        if data.len() > first + PAGE_SIZE as usize {
            let mut done = 0;
            while done < data.len() {
                let l = lin.wrapping_add(done as u64) & self.cpu.lin_mask;
                self.cpu.translate(l, Access::Write, user)?;
                let n = ((PAGE_SIZE - (l & 0xfff)) as usize).min(data.len() - done);
                done += n;
            }
            let mut done = 0;
            while done < data.len() {
                let l = lin.wrapping_add(done as u64) & self.cpu.lin_mask;
                let n = ((PAGE_SIZE - (l & 0xfff)) as usize).min(data.len() - done);
                let t = self.cpu.translate(l, Access::Write, user)?;
                self.write_target(t, &data[done..done + n]);
                done += n;
            }
            return Ok(());
        }
        let t1 = self.cpu.translate(lin, Access::Write, user)?;
        let t2 = self.cpu.translate(lin2, Access::Write, user)?;
        let (a, b) = data.split_at(first);
        self.write_target(t1, a);
        self.write_target(t2, b);
        Ok(())
    }

    /// Copy from a translated target (which does not cross a page) into `out`.
    pub fn read_target(&mut self, t: Target, out: &mut [u8]) {
        match t {
            Target::Ram(p) => {
                if let 1 | 2 | 4 | 8 = out.len() {
                    // SAFETY: `p` comes from a translation of a RAM page and the range does not
                    // cross the page.
                    let v = unsafe { load(p, out.len() as u8) };
                    out.copy_from_slice(&v.to_le_bytes()[..out.len()]);
                } else {
                    for (i, b) in out.iter_mut().enumerate() {
                        // SAFETY: as above, byte by byte.
                        *b = unsafe { load(p + i, 1) } as u8;
                    }
                }
            }
            Target::Io(pa) => self.io_read(pa, out),
        }
    }

    /// Copy `data` to a translated target (which does not cross a page).
    pub fn write_target(&mut self, t: Target, data: &[u8]) {
        match t {
            Target::Ram(p) => {
                if let 1 | 2 | 4 | 8 = data.len() {
                    let mut b = [0u8; 8];
                    b[..data.len()].copy_from_slice(data);
                    // SAFETY: `p` comes from a write translation of a RAM page and the range
                    // does not cross the page.
                    unsafe { store(p, data.len() as u8, u64::from_le_bytes(b)) };
                } else {
                    for (i, &b) in data.iter().enumerate() {
                        // SAFETY: as above, byte by byte.
                        unsafe { store(p + i, 1, b as u64) };
                    }
                }
                self.cpu.wrote_host(p, data.len());
            }
            Target::Io(pa) => self.io_write(pa, data),
        }
    }

    /// A read of a non-RAM physical address: the local APIC page or MMIO.
    pub fn io_read(&mut self, pa: u64, out: &mut [u8]) {
        if pa & PAGE_MASK == self.cpu.mmu.apic_page {
            let off = (pa & 0xfff) as u32;
            let v = self.cpu.vm.irqchip.lapic_read(self.cpu.id, off & !3);
            let bytes = (v as u64).to_le_bytes();
            let s = (off & 3) as usize;
            for (i, b) in out.iter_mut().enumerate() {
                *b = bytes.get(s + i).copied().unwrap_or(0);
            }
            return;
        }
        self.io.mmio_read(pa, out);
        // A device may have written guest memory (see `block.rs`).
        self.cpu.vm.io_exit();
    }

    /// A write of a non-RAM physical address: the local APIC page or MMIO.
    pub fn io_write(&mut self, pa: u64, data: &[u8]) {
        if pa & PAGE_MASK == self.cpu.mmu.apic_page {
            let off = (pa & 0xfff) as u32;
            if data.len() == 4 && off & 3 == 0 {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.cpu.vm.irqchip.lapic_write(self.cpu.id, off, v);
                self.cpu.lapic_changed();
            } else {
                super::log_once(
                    super::LogOnce::ApicWidth,
                    format_args!(
                        "vCPU {}: ignored {}-byte xAPIC write",
                        self.cpu.id,
                        data.len()
                    ),
                );
            }
            return;
        }
        self.io.mmio_write(pa, data);
        self.cpu.vm.io_exit();
    }

    /// Translate `lin` for a locked read-modify-write of `size` bytes: the host address when the
    /// operand is RAM, naturally aligned and inside one page; `None` otherwise (the caller then
    /// falls back to a serialized read and write).
    pub fn rmw_host(&mut self, lin: u64, size: u8) -> R<Option<usize>> {
        let user = self.cpu.tlb_user != 0;
        if (lin & 0xfff) + size as u64 > PAGE_SIZE {
            // Check both pages for write before anything happens.
            let first = PAGE_SIZE - (lin & 0xfff);
            self.cpu.translate(lin, Access::Write, user)?;
            self.cpu.translate(
                lin.wrapping_add(first) & self.cpu.lin_mask,
                Access::Write,
                user,
            )?;
            return Ok(None);
        }
        match self.cpu.translate(lin, Access::Write, user)? {
            // A code page takes the read-and-write path, which tells the block caches after
            // the store.
            Target::Ram(p)
                if p % size as usize == 0
                    && !self
                        .cpu
                        .mmu
                        .code()
                        .is_code(self.cpu.mmu.code_index_of_host(p)) =>
            {
                Ok(Some(p))
            }
            _ => Ok(None),
        }
    }
}

impl Cpu {
    /// A store of `len` bytes at host address `p` hit code page `code` (already written):
    /// unflag the page, end the running block if the store overlaps it, and tell every vCPU
    /// (see `block.rs`).
    #[cold]
    #[inline(never)]
    pub fn code_written(&mut self, code: usize, p: usize, len: usize) {
        let old = self.mmu.code().store_hit(code);
        if old == block::ARMED {
            // Only the dirty log's trap: the page holds no code.
            return;
        }
        self.note_store(p, len);
        self.vm.code_changed();
    }

    /// Look for device writes into code pages and, when there are, move the code epoch and
    /// catch up with it at once (the caller may be about to look up a block).
    #[cold]
    #[inline(never)]
    pub fn device_wrote_code(&mut self) {
        let code = self.mmu.code();
        if code.logging() || code.vmm_wrote_code() {
            self.vm.code_changed();
            self.sync_epoch();
        }
    }

    /// A store of `len` bytes at host address `p` of guest RAM (not through the inline fast
    /// path, possibly crossing pages) has been done: check the code-page flags it covers.
    pub fn wrote_host(&mut self, p: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = self.mmu.code_index_of_host(p);
        let last = self.mmu.code_index_of_host(p + len - 1);
        let mut hit = false;
        for i in [first, last] {
            hit |= self.mmu.code().clear(i);
        }
        if hit {
            self.note_store(p, len);
            self.vm.code_changed();
        }
    }

    /// A store to host address `p`: detect writes into the block being executed.
    #[inline(always)]
    pub fn note_store(&mut self, p: usize, len: usize) {
        // Overlap of [p, p+len) and [blk_host, blk_host+blk_len), in one unsigned compare.
        let d = p.wrapping_add(len).wrapping_sub(self.blk_host);
        if d.wrapping_sub(1) < (self.blk_len + len).wrapping_sub(1) {
            self.smc = true;
        }
    }

    /// The guest touched its local APIC: interrupts may be deliverable now and the timer may
    /// have moved.
    pub fn lapic_changed(&mut self) {
        self.poll = true;
        self.deadline = self.vm.irqchip.next_deadline(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn cpu_with_memory() -> Cpu {
        let mut c = Cpu::new(0, crate::emu::tests::dummy_vm(), Vec::new());
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let code = Arc::new(CodePages::new(&mem));
        c.mmu.set_memory(mem, code, 1);
        c
    }

    #[test]
    fn host_range_stays_inside_a_region() {
        let c = cpu_with_memory();
        assert!(c.mmu.host_range(0, 4096).is_some());
        assert!(c.mmu.host_range((4 << 20) - 8, 8).is_some());
        assert!(c.mmu.host_range((4 << 20) - 4, 8).is_none());
        assert!(c.mmu.host_range(u64::MAX - 2, 8).is_none());
    }

    /// Long mode with one 2 MiB page at 0 (user, writable, dirty clear) and one 4 KiB page.
    fn paged_cpu() -> Cpu {
        let mut c = cpu_with_memory();
        let mem = c.mmu.memory().unwrap().clone();
        use vm_memory::Bytes;
        mem.write_obj(0x2000u64 | 7, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3000u64 | 7, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x87u64, GuestAddress(0x3000)).unwrap(); // PD[0]: 2 MiB page at 0
        mem.write_obj(0x4000u64 | 7, GuestAddress(0x3008)).unwrap(); // PD[1] → PT
        mem.write_obj(0x20_0000u64 | 7, GuestAddress(0x4000))
            .unwrap(); // 4 KiB page
        c.cr0 = CR0_PE | CR0_PG | CR0_WP;
        c.cr3 = 0x1000;
        c.cr4 = CR4_PAE;
        c.efer = EFER_LME | EFER_LMA;
        c.update_mode();
        c
    }

    #[test]
    fn write_tag_needs_the_dirty_bit() {
        let mut c = paged_cpu();
        let t = c.translate(0x20_0010, Access::Read, false).unwrap();
        assert!(matches!(t, Target::Ram(_)));
        let e = c.mmu.tlb[0][tlb_index(0x20_0010)];
        assert_eq!(e.tag_r, 0x20_0000);
        assert_eq!(e.tag_w, TAG_INVALID, "D not set yet: writes must walk");
        c.translate(0x20_0010, Access::Write, false).unwrap();
        assert_eq!(c.mmu.tlb[0][tlb_index(0x20_0010)].tag_w, 0x20_0000);
    }

    #[test]
    fn invlpg_and_large_pages() {
        let mut c = paged_cpu();
        c.translate(0x20_0000, Access::Read, false).unwrap();
        c.mmu.flush_page(0x20_0000);
        assert_eq!(c.mmu.tlb[0][tlb_index(0x20_0000)].tag_r, TAG_INVALID);
        // A piece of the 2 MiB page makes INVLPG of any address flush everything.
        c.translate(0x1000, Access::Read, false).unwrap();
        c.translate(0x20_0000, Access::Read, false).unwrap();
        c.mmu.flush_page(0x5000);
        assert_eq!(c.mmu.tlb[0][tlb_index(0x1000)].tag_r, TAG_INVALID);
        assert_eq!(c.mmu.tlb[0][tlb_index(0x20_0000)].tag_r, TAG_INVALID);
    }

    #[test]
    fn non_canonical_is_gp_and_not_cached() {
        let mut c = paged_cpu();
        assert_eq!(
            c.translate(0x0000_8000_0000_0000, Access::Read, false),
            Err(gp0())
        );
        assert_eq!(
            c.translate(0x40_0000_0000, Access::Read, false),
            Err(fault(PF_VEC, 0))
        );
        assert_eq!(c.cr2, 0x40_0000_0000);
    }

    #[test]
    fn executing_a_code_page_a_device_wrote_moves_the_code_epoch() {
        let mut c = paged_cpu();
        let mem = c.mmu.memory().unwrap().clone();
        let page = 0x20_0000;
        // A block was decoded from the page.
        c.mmu.code().set(c.mmu.code_index(page));
        let e0 = c.epoch;
        c.translate(page, Access::Exec, false).unwrap();
        assert_eq!(c.epoch, e0, "nothing written");
        // A device writes it (DMA through vm-memory); the guest maps it again and runs it.
        use vm_memory::Bytes;
        mem.write_slice(&[0xcc], GuestAddress(page + 8)).unwrap();
        c.mmu.flush_all();
        c.translate(page, Access::Exec, false).unwrap();
        assert!(c.epoch > e0, "blocks of the page must be checked");
        // Seen once: the next translation does not move it again.
        let e1 = c.epoch;
        c.mmu.flush_all();
        c.translate(page, Access::Exec, false).unwrap();
        assert_eq!(c.epoch, e1);
        // A data page the device wrote moves nothing.
        mem.write_slice(&[0xcc], GuestAddress(0x10_0000)).unwrap();
        c.translate(0x10_0000, Access::Exec, false).unwrap();
        assert_eq!(c.epoch, e1);
    }
}
