//! vCPU state at the Linux 64-bit entry point (boot protocol "64-bit boot protocol"): a GDT
//! with flat `__BOOT_CS`/`__BOOT_DS`, identity page tables, long mode, RSI = zero page.

use vireo_hv::GuestMemory;
use vireo_hv::{DescriptorTable, FpuState, LapicState, Msr, Regs, Segment, Sregs, Vcpu};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;

/// Boot GDT selectors: the boot protocol wants `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

// Control register and EFER bits (Intel SDM Vol. 3A §2.5, §2.2.1).
pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

// MSR numbers (Intel SDM Vol. 4).
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;

// Local APIC LVT registers and delivery modes (SDM Vol. 3A §11.5.1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing boot structures to guest memory: {0}")]
    Memory(String),
    #[error("setting vCPU state: {0}")]
    Vcpu(#[from] vireo_hv::Error),
}

/// A segment descriptor (SDM Vol. 3A §3.4.5): `flags` holds the access byte (bits 0-7) and the
/// G/DB/L/AVL nibble (bits 12-15), as in the usual `GDT_ENTRY(flags, base, limit)` notation.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, unused, `__BOOT_CS` (64-bit code), `__BOOT_DS` (flat data), and a
/// 64-bit TSS descriptor (two slots) so TR holds a valid busy TSS.
pub const BOOT_GDT: [u64; 6] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    0,
];

/// The hidden part of a segment register loaded from descriptor `entry` with `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> Segment {
    let g = (entry >> 55) & 1 == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    Segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: (entry >> 47) & 1 == 1,
        dpl: ((entry >> 45) & 3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g,
        avl: (entry >> 52) & 1 == 1,
        unusable: false,
    }
}

/// Write the boot GDT, an empty IDT and the identity-mapping page tables (first 1 GiB, 2 MiB
/// pages) into guest memory.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), Error> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    for (i, e) in BOOT_GDT.iter().enumerate() {
        w(layout::BOOT_GDT_START + i as u64 * 8, *e)?;
    }
    w(layout::BOOT_IDT_START, 0)?;
    w(
        layout::PML4_START,
        layout::PDPTE_START | PTE_PRESENT | PTE_WRITE,
    )?;
    for pd in 0..layout::BOOT_PD_COUNT {
        let pd_addr = layout::PDE_START + pd * 0x1000;
        w(
            layout::PDPTE_START + pd * 8,
            pd_addr | PTE_PRESENT | PTE_WRITE,
        )?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            w(pd_addr + i * 8, phys | PTE_PRESENT | PTE_WRITE | PTE_PS)?;
        }
    }
    Ok(())
}

/// Special registers for the 64-bit entry, starting from the vCPU's reset state `base`.
pub fn boot_sregs(base: &Sregs) -> Sregs {
    let code = segment_from_gdt(BOOT_GDT[(BOOT_CS >> 3) as usize], BOOT_CS);
    let data = segment_from_gdt(BOOT_GDT[(BOOT_DS >> 3) as usize], BOOT_DS);
    let tss = segment_from_gdt(BOOT_GDT[(BOOT_TSS >> 3) as usize], BOOT_TSS);
    Sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        gdt: DescriptorTable {
            base: layout::BOOT_GDT_START,
            limit: (std::mem::size_of_val(&BOOT_GDT) - 1) as u16,
        },
        idt: DescriptorTable {
            base: layout::BOOT_IDT_START,
            limit: 7,
        },
        cr0: (base.cr0 | CR0_PE | CR0_PG | CR0_ET | CR0_NE | CR0_MP) & !(1 << 30 | 1 << 29),
        cr3: layout::PML4_START,
        cr4: base.cr4 | CR4_PAE,
        efer: base.efer | EFER_LME | EFER_LMA,
        ..*base
    }
}

/// General registers at the 64-bit entry: RIP = entry, RSI = zero page.
pub fn boot_regs(entry: u64) -> Regs {
    Regs {
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87/SSE state after FNINIT with the default MXCSR.
pub fn boot_fpu() -> FpuState {
    FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with. `mtrr` says whether CPUID advertises MTRRs.
pub fn boot_msrs(mtrr: bool) -> Vec<Msr> {
    let mut msrs = vec![
        Msr::new(MSR_IA32_SYSENTER_CS, 0),
        Msr::new(MSR_IA32_SYSENTER_ESP, 0),
        Msr::new(MSR_IA32_SYSENTER_EIP, 0),
        Msr::new(MSR_STAR, 0),
        Msr::new(MSR_CSTAR, 0),
        Msr::new(MSR_KERNEL_GS_BASE, 0),
        Msr::new(MSR_SYSCALL_MASK, 0),
        Msr::new(MSR_LSTAR, 0),
        Msr::new(MSR_IA32_TSC, 0),
        Msr::new(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    if mtrr {
        msrs.push(Msr::new(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB));
    }
    msrs
}

/// Local APIC in virtual-wire mode: LINT0 delivers ExtINT (the 8259), LINT1 NMI
/// (MP Spec 1.4 §3.6.2.2).
pub fn set_lint(lapic: &mut LapicState) {
    let lint0 = lapic.reg(APIC_LVT_LINT0);
    lapic.set_reg(APIC_LVT_LINT0, (lint0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lint1 = lapic.reg(APIC_LVT_LINT1);
    lapic.set_reg(APIC_LVT_LINT1, (lint1 & !0x700) | (APIC_MODE_NMI << 8));
}

/// Put the boot vCPU in the state the 64-bit boot protocol asks for.
pub fn setup_boot_vcpu(vcpu: &mut dyn Vcpu, entry: u64) -> Result<(), Error> {
    let sregs = boot_sregs(&vcpu.sregs()?);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&boot_regs(entry))?;
    vcpu.set_fpu(&boot_fpu())?;
    Ok(())
}

/// Set-up common to every vCPU (boot CPU and application processors).
pub fn setup_vcpu_common(vcpu: &mut dyn Vcpu, mtrr: bool) -> Result<(), Error> {
    vcpu.set_msrs(&boot_msrs(mtrr))?;
    let mut lapic = vcpu.lapic()?;
    set_lint(&mut lapic);
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let cs = segment_from_gdt(BOOT_GDT[2], BOOT_CS);
        assert!(cs.l && cs.present && cs.s && cs.g && !cs.db);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
        let ds = segment_from_gdt(BOOT_GDT[3], BOOT_DS);
        assert!(ds.db && !ds.l);
        assert_eq!(ds.type_, 0x3);
        let tss = segment_from_gdt(BOOT_GDT[4], BOOT_TSS);
        assert!(!tss.s);
        assert_eq!(tss.type_, 0xb);
    }

    #[test]
    fn gdt_entry_matches_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_1g() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        // Walk a few addresses by hand.
        for &va in &[0u64, 0x20_0000, 0x100_0000, 0x3fff_ffff] {
            let pml4e: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
            let pdpt = pml4e & !0xfff;
            let pdpte: u64 = mem
                .read_obj(GuestAddress(pdpt + ((va >> 30) & 511) * 8))
                .unwrap();
            let pd = pdpte & !0xfff;
            let pde: u64 = mem
                .read_obj(GuestAddress(pd + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_ne!(pde & PTE_PS, 0);
            assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        }
    }

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(&Sregs::default());
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.ss.selector, BOOT_DS);
    }

    #[test]
    fn lint_virtual_wire() {
        let mut l = LapicState::default();
        set_lint(&mut l);
        assert_eq!((l.reg(0x350) >> 8) & 7, 7);
        assert_eq!((l.reg(0x360) >> 8) & 7, 4);
    }
}
