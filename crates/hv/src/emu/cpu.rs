//! Architectural state of one emulated x86-64 CPU and the derived mode bits.

use std::sync::Arc;
use std::time::Instant;

use super::flags::{self, Lazy, ARITH, EAGER, FIXED1};
use super::mmu::Mmu;
use super::msr::MsrFile;
use super::VmShared;
use crate::state::{CpuidEntry, DescriptorTable, FpuState, MpState, Segment};

/// General-purpose register numbers (the x86 encoding order).
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSP: usize = 4;
pub const RBP: usize = 5;
pub const RSI: usize = 6;
pub const RDI: usize = 7;

/// Segment register numbers (the x86 encoding order).
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// CR0 bits (SDM Vol. 3A §2.5).
pub const CR0_PE: u64 = 1 << 0;
#[allow(dead_code)] // used by stage 2 (x87/SSE) and snapshots
pub const CR0_MP: u64 = 1 << 1;
#[allow(dead_code)] // used by stage 2 (x87/SSE) and snapshots
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
#[allow(dead_code)] // used by stage 2 (x87/SSE) and snapshots
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
#[allow(dead_code)] // used by stage 2 (x87/SSE) and snapshots
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;

/// CR4 bits.
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// The CR4 bits this CPU implements; setting any other bit is #GP(0).
pub const CR4_VALID: u64 = CR4_TSD
    | CR4_DE
    | CR4_PSE
    | CR4_PAE
    | CR4_MCE
    | CR4_PGE
    | CR4_PCE
    | CR4_OSFXSR
    | CR4_OSXMMEXCPT;

/// IA32_EFER bits (SDM Vol. 3A §2.2.1).
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Segment descriptor type bits (SDM Vol. 3A §3.4.5.1).
pub const SEG_TYPE_ACCESSED: u8 = 1;
pub const SEG_TYPE_WRITE_READ: u8 = 2;
pub const SEG_TYPE_CONFORMING: u8 = 4;
pub const SEG_TYPE_CODE: u8 = 8;

/// Exception vectors (SDM Vol. 3A Table 6-1).
pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const NMI: u8 = 2;
pub const BP: u8 = 3;
pub const OF_VEC: u8 = 4;
pub const UD: u8 = 6;
#[allow(dead_code)] // used by stage 2 (x87/SSE) and snapshots
pub const NM: u8 = 7;
pub const DF_VEC: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS_VEC: u8 = 12;
pub const GP: u8 = 13;
pub const PF_VEC: u8 = 14;

/// How an instruction stopped being executed normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exc {
    /// A fault: RIP goes back to the start of the instruction, then the exception is delivered.
    /// Error codes are 16 bits wide in every exception that has one (SDM Vol. 3A §6.13), which
    /// keeps `R` small enough to be returned in a register.
    Fault { vector: u8, code: Option<u16> },
    /// A software interrupt (INT n, INT3, INTO, INT1): RIP already points after the instruction.
    SoftInt { vector: u8, kind: SoftKind },
    /// HLT: RIP points after the instruction; the CPU sleeps until an event.
    Halt,
    /// Stop executing the current block; the architectural state is complete and consistent.
    Stop,
    /// Triple fault or an unsupported CPU state: the platform must reset.
    Shutdown,
}

/// The flavour of a software interrupt, which decides the IDT gate DPL check and EXT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftKind {
    /// `INT n` (and INT3, INTO): gate DPL is checked against CPL.
    Int,
    /// `INT1` (ICEBP): delivered like a hardware #DB, no DPL check.
    Icebp,
}

/// Result of executing (part of) an instruction.
pub type R<T = ()> = Result<T, Exc>;

/// Shorthand constructors for faults.
#[inline]
pub fn fault(vector: u8, code: u32) -> Exc {
    Exc::Fault {
        vector,
        code: Some(code as u16),
    }
}
#[inline]
pub fn gp0() -> Exc {
    fault(GP, 0)
}
#[inline]
pub fn ud() -> Exc {
    Exc::Fault {
        vector: UD,
        code: None,
    }
}

/// A segment register and its hidden part, as the interface describes it.
pub type SegCache = Segment;

/// The state of one CPU.
pub struct Cpu {
    pub gpr: [u64; 16],
    pub rip: u64,
    /// RFLAGS; the arithmetic bits are valid only when `lazy.op == EAGER`.
    pub flags: u64,
    pub lazy: Lazy,
    pub seg: [SegCache; 6],
    pub tr: SegCache,
    pub ldt: SegCache,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    /// Current privilege level.
    pub cpl: u8,
    /// Default operand/address size of the code segment: 16, 32 or 64.
    pub bitness: u8,
    /// Linear addresses are 64-bit in 64-bit mode, 32-bit otherwise.
    pub lin_mask: u64,
    /// Stack pointer width: RSP, ESP or SP.
    pub sp_mask: u64,
    /// Which TLB data accesses use: 0 supervisor, 1 user (CPL 3).
    pub tlb_user: usize,
    pub msr: MsrFile,
    pub fpu: FpuState,
    pub mmu: Mmu,
    /// An STI / MOV SS / POP SS interrupt shadow covers the next instruction.
    pub shadow: bool,
    /// NMIs are blocked until the next IRET (SDM Vol. 3A §6.7.1).
    pub nmi_blocked: bool,
    /// An NMI arrived while blocked.
    pub nmi_pending: bool,
    pub mp_state: MpState,
    /// Ask the interrupt controller for events at the next instruction boundary.
    pub poll: bool,
    /// A store hit the bytes of the block being executed: leave the block after this
    /// instruction (self-modifying code).
    pub smc: bool,
    /// Host address and length of the bytes of the block being executed.
    pub blk_host: usize,
    pub blk_len: usize,
    /// This vCPU's code epoch: a block stamped with another value has its bytes checked
    /// before it runs (`block.rs`). Moves when `VmShared::code_epoch` moves and on
    /// serializing instructions.
    pub epoch: u64,
    /// The last value of `VmShared::code_epoch` this vCPU has seen.
    pub seen_epoch: u64,
    /// The last value of `VmShared::hard_epoch` this vCPU has seen.
    pub seen_hard: u64,
    /// The value of `epoch` when a change other than an I/O exit was last seen: a block
    /// stamped at this epoch or later has only missed I/O exits (`BlockCache::revalidate`).
    pub hard_floor: u64,
    /// When this vCPU next looks for device writes nobody announced (a device writing guest
    /// code without an interrupt, the guest polling memory for it): they are seen within
    /// [`EPOCH_REFRESH`].
    pub epoch_refresh: Instant,
    /// When the epoch next moves unconditionally ([`EPOCH_REFRESH_ALL`]).
    pub epoch_refresh_all: Instant,
    pub id: u32,
    pub vm: Arc<VmShared>,
    /// The CPUID table the guest sees.
    pub cpuid: Vec<CpuidEntry>,
    /// Physical address width (CPUID 0x80000008 EAX[7:0]).
    pub maxphy: u8,
    /// IA32_APIC_BASE, cached from the interrupt controller.
    pub apic_base: u64,
    /// The next timer deadline of this CPU's local APIC, cached.
    pub deadline: Option<Instant>,
    /// Guest RIP samples (`VIREO_EMU_PROFILE`).
    pub profile: Option<Box<crate::emu::profile::Profile>>,
    /// Instructions retired (approximately: counted per executed op).
    pub icount: u64,
    /// Translated blocks entered from the block loop, and blocks they chained to
    /// (statistics).
    pub jit_entered: u64,
    pub jit_chained: u64,
    /// PAUSE instructions executed (to yield the host thread now and then).
    pub pauses: u64,
}

/// The longest a vCPU runs blocks without looking for device writes into code pages
/// (`CodePages::vmm_wrote_code`).
pub const EPOCH_REFRESH: std::time::Duration = std::time::Duration::from_millis(10);
/// The longest a vCPU runs blocks without checking their bytes against guest memory: a
/// backstop for a writer that neither the vCPUs nor `vm-memory`'s bitmap see.
pub const EPOCH_REFRESH_ALL: std::time::Duration = std::time::Duration::from_secs(1);

/// IA32_APIC_BASE bits (SDM Vol. 3A §11.4.4).
#[allow(dead_code)] // used by stage 2 (x87/SSE) and snapshots
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_EN: u64 = 1 << 11;

/// A real-mode segment with `selector` (base = selector << 4, 64 KiB limit).
pub fn real_mode_seg(selector: u16, code: bool) -> SegCache {
    SegCache {
        base: (selector as u64) << 4,
        limit: 0xffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 0,
        db: false,
        s: true,
        l: false,
        g: false,
        avl: false,
        unusable: false,
    }
}

impl Cpu {
    pub fn new(id: u32, vm: Arc<VmShared>, cpuid: Vec<CpuidEntry>) -> Cpu {
        let mut cpu = Cpu {
            gpr: [0; 16],
            rip: 0,
            flags: FIXED1,
            lazy: Lazy::default(),
            seg: [SegCache::default(); 6],
            tr: SegCache::default(),
            ldt: SegCache::default(),
            gdt: DescriptorTable::default(),
            idt: DescriptorTable::default(),
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            dr: [0; 8],
            cpl: 0,
            bitness: 16,
            lin_mask: 0xffff_ffff,
            sp_mask: 0xffff,
            tlb_user: 0,
            msr: MsrFile::default(),
            fpu: FpuState::default(),
            mmu: Mmu::new(),
            shadow: false,
            nmi_blocked: false,
            nmi_pending: false,
            mp_state: if id == 0 {
                MpState::Runnable
            } else {
                MpState::Uninitialized
            },
            poll: true,
            smc: false,
            blk_host: 0,
            blk_len: 0,
            epoch: 1,
            seen_epoch: 0,
            seen_hard: 0,
            hard_floor: 1,
            epoch_refresh: Instant::now() + EPOCH_REFRESH,
            epoch_refresh_all: Instant::now() + EPOCH_REFRESH_ALL,
            id,
            vm,
            cpuid,
            maxphy: super::cpuid::DEFAULT_MAXPHYADDR,
            apic_base: 0,
            deadline: None,
            profile: crate::emu::profile::Profile::from_env(),
            icount: 0,
            jit_entered: 0,
            jit_chained: 0,
            pauses: 0,
        };
        cpu.reset();
        cpu.update_maxphy();
        cpu
    }

    /// The power-up / INIT state (SDM Vol. 3A §9.1.1, Table 9-1). x87/SSE state, the MSRs
    /// that INIT leaves alone and the APIC are not touched here.
    pub fn reset(&mut self) {
        self.gpr = [0; 16];
        self.gpr[RDX] = super::cpuid::SIGNATURE as u64;
        self.rip = 0xfff0;
        self.flags = FIXED1;
        self.lazy = Lazy::default();
        for s in self.seg.iter_mut() {
            *s = real_mode_seg(0, false);
        }
        self.seg[CS] = SegCache {
            base: 0xffff_0000,
            ..real_mode_seg(0xf000, true)
        };
        self.tr = SegCache {
            limit: 0xffff,
            type_: 0xb,
            present: true,
            ..SegCache::default()
        };
        self.ldt = SegCache {
            limit: 0xffff,
            type_: 0x2,
            present: true,
            ..SegCache::default()
        };
        self.gdt = DescriptorTable {
            base: 0,
            limit: 0xffff,
        };
        self.idt = DescriptorTable {
            base: 0,
            limit: 0xffff,
        };
        self.cr0 = CR0_ET | CR0_NW | CR0_CD;
        self.cr2 = 0;
        self.cr3 = 0;
        self.cr4 = 0;
        self.efer = 0;
        self.dr = [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400];
        self.shadow = false;
        self.nmi_blocked = false;
        self.nmi_pending = false;
        self.msr.reset_on_init();
        self.update_mode();
        self.mmu.flush_all();
    }

    /// Recompute CPL-independent mode bits after CR0, EFER, CS or SS changed.
    pub fn update_mode(&mut self) {
        let pe = self.cr0 & CR0_PE != 0;
        let lma = self.efer & EFER_LMA != 0;
        if !pe {
            self.cpl = 0;
            self.bitness = 16;
        } else if lma && self.seg[CS].l {
            self.bitness = 64;
        } else {
            self.bitness = if self.seg[CS].db { 32 } else { 16 };
        }
        self.lin_mask = if self.bitness == 64 {
            u64::MAX
        } else {
            0xffff_ffff
        };
        self.sp_mask = if self.bitness == 64 {
            u64::MAX
        } else if self.seg[SS].db {
            0xffff_ffff
        } else {
            0xffff
        };
        self.tlb_user = (self.cpl == 3) as usize;
    }

    /// Protected mode (CR0.PE).
    #[inline]
    pub fn protected(&self) -> bool {
        self.cr0 & CR0_PE != 0
    }

    /// IA-32e mode active (EFER.LMA).
    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    /// Recompute the physical-address width from the CPUID table.
    pub fn update_maxphy(&mut self) {
        let w = super::cpuid::lookup(&self.cpuid, 0x8000_0008, 0)
            .map(|e| (e.eax & 0xff) as u8)
            .unwrap_or(super::cpuid::DEFAULT_MAXPHYADDR);
        self.maxphy = w.clamp(32, 52);
    }

    /// Full RFLAGS.
    #[inline]
    pub fn rflags(&self) -> u64 {
        if self.lazy.op == EAGER {
            self.flags | FIXED1
        } else {
            (self.flags & !ARITH) | self.lazy.arith(self.flags) | FIXED1
        }
    }

    /// Replace RFLAGS wholesale (no privilege checks).
    #[inline]
    pub fn set_rflags(&mut self, v: u64) {
        let old_if = self.flags & flags::IF;
        self.flags = (v & 0x3f_7fd5) | FIXED1;
        self.lazy.op = EAGER;
        if old_if == 0 && self.flags & flags::IF != 0 {
            self.poll = true;
        }
    }

    /// Replace the arithmetic flags selected by `which` with `value`.
    #[inline]
    pub fn set_arith(&mut self, which: u64, value: u64) {
        let f = self.rflags();
        self.flags = (f & !which) | (value & which);
        self.lazy.op = EAGER;
    }

    /// CF as a bool.
    #[inline(always)]
    pub fn cf(&self) -> bool {
        self.lazy.cf(self.flags)
    }

    /// Evaluate condition code `cc`.
    #[inline(always)]
    pub fn cond(&self, cc: u8) -> bool {
        self.lazy.cond(cc, self.flags)
    }

    /// Record a lazily evaluated flag-setting operation.
    #[inline(always)]
    pub fn set_lazy(&mut self, op: u8, size: u8, res: u64, a: u64, b: u64) {
        if op == flags::INC || op == flags::DEC {
            // INC and DEC keep CF: freeze it in `flags` first.
            let cf = self.cf();
            self.flags = (self.flags & !flags::CF) | cf as u64;
        }
        self.lazy = Lazy {
            op,
            size,
            res,
            a,
            b,
        };
    }

    /// Catch up with the VM-wide code epoch (once per block).
    #[inline(always)]
    pub fn sync_epoch(&mut self) {
        let g = self
            .vm
            .code_epoch
            .load(std::sync::atomic::Ordering::Acquire);
        if g != self.seen_epoch {
            self.seen_epoch = g;
            self.epoch += 1;
            // `hard_epoch` moves before `code_epoch`: the load above made it visible.
            let h = self
                .vm
                .hard_epoch
                .load(std::sync::atomic::Ordering::Acquire);
            if h != self.seen_hard {
                self.seen_hard = h;
                self.hard_floor = self.epoch;
            }
        }
    }

    /// A serializing instruction (SDM Vol. 3A §8.3): code written by another vCPU must be seen
    /// from now on, so every block is checked again before it runs.
    ///
    /// With one vCPU there is no other vCPU whose store could have raced with a code-page
    /// flag being set (`block.rs`): this vCPU's own stores check the flags, device DMA moves
    /// the VM-wide epoch, so nothing is left for a serializing instruction to catch.
    #[inline]
    pub fn serialize(&mut self) {
        if self.vm.vcpus > 1 {
            self.epoch += 1;
            self.hard_floor = self.epoch;
        }
    }

    /// Move this vCPU's code epoch unconditionally (the periodic `EPOCH_REFRESH`).
    #[inline]
    pub fn refresh_epoch(&mut self) {
        self.epoch += 1;
        self.hard_floor = self.epoch;
    }

    /// IOPL field of RFLAGS.
    #[inline]
    pub fn iopl(&self) -> u8 {
        ((self.flags >> 12) & 3) as u8
    }

    /// Interrupts may be delivered now (RFLAGS.IF and no interrupt shadow).
    #[inline]
    pub fn interruptible(&self) -> bool {
        self.flags & flags::IF != 0 && !self.shadow
    }

    /// Canonical in the 48-bit linear address space (SDM Vol. 1 §3.3.7.1).
    #[inline(always)]
    pub fn canonical(addr: u64) -> bool {
        ((addr as i64) << 16 >> 16) as u64 == addr
    }

    // ---- register access by operand size -----------------------------------------------------

    /// Read register `r` (0-15; 16-19 are AH, CH, DH, BH) as `size` bytes.
    #[inline(always)]
    pub fn reg(&self, r: u8, size: u8) -> u64 {
        match size {
            1 => {
                if r < 16 {
                    self.gpr[r as usize & 15] & 0xff
                } else {
                    (self.gpr[r as usize & 3] >> 8) & 0xff
                }
            }
            2 => self.gpr[r as usize & 15] & 0xffff,
            4 => self.gpr[r as usize & 15] & 0xffff_ffff,
            _ => self.gpr[r as usize & 15],
        }
    }

    /// Write register `r` with `size` bytes: 8/16-bit writes merge, 32-bit writes zero-extend
    /// (SDM Vol. 1 §3.4.1.1).
    #[inline(always)]
    pub fn set_reg(&mut self, r: u8, size: u8, v: u64) {
        match size {
            1 => {
                if r < 16 {
                    let g = &mut self.gpr[r as usize & 15];
                    *g = (*g & !0xff) | (v & 0xff);
                } else {
                    let g = &mut self.gpr[r as usize & 3];
                    *g = (*g & !0xff00) | ((v & 0xff) << 8);
                }
            }
            2 => {
                let g = &mut self.gpr[r as usize & 15];
                *g = (*g & !0xffff) | (v & 0xffff);
            }
            4 => self.gpr[r as usize & 15] = v & 0xffff_ffff,
            _ => self.gpr[r as usize & 15] = v,
        }
    }

    /// Advance a string/stack register by `delta` under address-size mask `m`.
    #[inline(always)]
    pub fn add_masked(&mut self, r: usize, delta: u64, m: u64) {
        let g = &mut self.gpr[r & 15];
        *g = (*g & !m) | (g.wrapping_add(delta) & m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Cpu {
        Cpu::new(0, super::super::tests::dummy_vm(), Vec::new())
    }

    #[test]
    fn serializing_moves_the_code_epoch_only_with_other_vcpus() {
        let mut one = cpu();
        let e = one.epoch;
        one.serialize();
        assert_eq!(one.epoch, e, "nothing to catch with one vCPU");
        one.refresh_epoch();
        assert_eq!(one.epoch, e + 1);

        let mut two = Cpu::new(0, super::super::tests::dummy_vm_with(2), Vec::new());
        let e = two.epoch;
        two.serialize();
        assert_eq!(two.epoch, e + 1);
    }

    #[test]
    fn register_widths() {
        let mut c = cpu();
        c.gpr[RAX] = 0x1122_3344_5566_7788;
        c.set_reg(0, 1, 0xaa);
        assert_eq!(c.gpr[RAX], 0x1122_3344_5566_77aa);
        c.set_reg(16, 1, 0xbb); // AH
        assert_eq!(c.gpr[RAX], 0x1122_3344_5566_bbaa);
        assert_eq!(c.reg(16, 1), 0xbb);
        c.set_reg(0, 2, 0x1234);
        assert_eq!(c.gpr[RAX], 0x1122_3344_5566_1234);
        c.set_reg(0, 4, 0xdead_beef);
        assert_eq!(c.gpr[RAX], 0xdead_beef);
    }

    #[test]
    fn reset_state_matches_sdm() {
        let c = cpu();
        assert_eq!(c.rip, 0xfff0);
        assert_eq!(c.seg[CS].base, 0xffff_0000);
        assert_eq!(c.seg[CS].selector, 0xf000);
        assert_eq!(c.cr0, 0x6000_0010);
        assert_eq!(c.rflags(), 2);
        assert_eq!(c.bitness, 16);
        assert_eq!(c.dr[7], 0x400);
    }

    #[test]
    fn results_fit_in_a_register() {
        // Handlers return `R` on every instruction: it must come back in RAX, not memory.
        assert!(std::mem::size_of::<R>() <= 8);
    }

    #[test]
    fn canonical_addresses() {
        assert!(Cpu::canonical(0x0000_7fff_ffff_ffff));
        assert!(Cpu::canonical(0xffff_8000_0000_0000));
        assert!(!Cpu::canonical(0x0000_8000_0000_0000));
    }
}
