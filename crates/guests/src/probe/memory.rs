//! Where a probe keeps things in guest-physical memory, and the descriptors it loads.
//!
//! ```text
//! 0x0000_8000               AP start-up trampoline (real mode, copied there by the BSP; SIPI vector 8)
//! 0x0020_0000               the ELF image: ELF header, program headers, PVH note, code, data
//! 0x0021_0000 - 0x0021_5fff page tables: PML4, PDPT, four PDs (identity map of 4 GiB, 2 MiB pages)
//! 0x0021_6000               IDT
//! 0x0021_7000 - 0x0021_8fff BSP stack
//! 0x0021_9000 - 0x0021_9fff ring-0 stack for interrupts from ring 3 (TSS.RSP0)
//! 0x0021_a000 - 0x0021_afff ring-3 stack
//! 0x0021_b000 - 0x0021_bfff AP stack (used only while holding the print lock)
//! 0x0021_c000               64-bit TSS
//! ```
//!
//! Everything from 0x21_0000 on is the ELF segment's zero-fill (`p_memsz > p_filesz`), so the file
//! stays a few KiB. The probe never relies on that memory being zero: it writes every byte it reads.

/// Guest-physical (= virtual) address of the image; the ELF headers are loaded here too.
pub const LOAD_ADDR: u64 = 0x20_0000;
/// File offset (and offset from [`LOAD_ADDR`]) of the first instruction (the 64-bit entry).
pub(crate) const CODE_OFFSET: u64 = 0x100;
/// Largest file the layout allows: the zero-fill area starts right after it.
pub(crate) const MAX_IMAGE_SIZE: u64 = 0x1_0000;

pub(crate) const BSS_START: u64 = LOAD_ADDR + MAX_IMAGE_SIZE;
pub(crate) const PML4: u64 = BSS_START;
pub(crate) const PDPT: u64 = BSS_START + 0x1000;
/// Four page directories, one per GiB, contiguous.
pub(crate) const PD: u64 = BSS_START + 0x2000;
pub(crate) const IDT: u64 = BSS_START + 0x6000;
pub(crate) const BSP_STACK_TOP: u64 = BSS_START + 0x9000;
pub(crate) const RSP0_STACK_TOP: u64 = BSS_START + 0xa000;
pub(crate) const USER_STACK_TOP: u64 = BSS_START + 0xb000;
pub(crate) const AP_STACK_TOP: u64 = BSS_START + 0xc000;
pub(crate) const TSS: u64 = BSS_START + 0xc000;
/// Size of a 64-bit TSS without an I/O permission bitmap (SDM Vol. 3A §7.7, Figure 7-11).
pub(crate) const TSS_SIZE: u64 = 104;
pub(crate) const BSS_END: u64 = BSS_START + 0xd000;

/// Page the AP trampoline is copied to; the SIPI vector is its page number.
pub(crate) const TRAMPOLINE: u64 = 0x8000;
pub(crate) const SIPI_VECTOR: u8 = (TRAMPOLINE >> 12) as u8;
/// Offset inside the trampoline where the BSP stores its GDTR (`sgdt`) for the APs' `lgdt`.
pub(crate) const TRAMPOLINE_GDTR: u64 = 0x40;
/// Bytes the BSP copies (code up to the GDTR; the GDTR itself is written by `sgdt`).
pub(crate) const TRAMPOLINE_CODE_MAX: usize = TRAMPOLINE_GDTR as usize;

/// Page-table entry bits (SDM Vol. 3A §4.5, Tables 4-15 to 4-19).
pub(crate) const PTE_P: u64 = 1 << 0;
pub(crate) const PTE_RW: u64 = 1 << 1;
pub(crate) const PTE_US: u64 = 1 << 2;
pub(crate) const PTE_PWT: u64 = 1 << 3;
pub(crate) const PTE_PCD: u64 = 1 << 4;
pub(crate) const PTE_PS: u64 = 1 << 7;
/// PML4 and PDPT entries: present, writable, user (ring 3 may use every page: the user-mode
/// probe runs its loop and prints from ring 3).
pub(crate) const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US;
/// 2 MiB pages below 3 GiB: write-back RAM.
pub(crate) const PAGE_2M_FLAGS: u64 = PTE_P | PTE_RW | PTE_US | PTE_PS;
/// 2 MiB pages of the fourth GiB (the MMIO hole: PCI BARs, IOAPIC, LAPIC): uncached.
pub(crate) const PAGE_2M_UC_FLAGS: u64 = PAGE_2M_FLAGS | PTE_PWT | PTE_PCD;
/// Page directories mapped write-back (GiB 0..3); the fourth is uncached.
pub(crate) const WB_PDS: u32 = 3;

/// Control-register values (SDM Vol. 3A §2.5).
pub(crate) const CR0_PE: u32 = 1 << 0;
pub(crate) const CR0_ET: u32 = 1 << 4;
pub(crate) const CR0_NE: u32 = 1 << 5;
pub(crate) const CR0_WP: u32 = 1 << 16;
pub(crate) const CR0_PG: u32 = 1 << 31;
/// CR0 in long mode: caches on (CD = NW = 0), paging, protection.
pub(crate) const CR0_LONG: u32 = CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_PE;
/// CR4 in long mode: PAE only (no SMEP/SMAP: ring 0 runs on user pages; no PGE/PCID).
pub(crate) const CR4_PAE: u32 = 1 << 5;
/// IA32_EFER and its LME bit (SDM Vol. 3A §2.2.1).
pub(crate) const MSR_EFER: u32 = 0xc000_0080;
pub(crate) const EFER_LME: u32 = 1 << 8;

/// RFLAGS for ring 3: IOPL 0, reserved bit 1, interrupts off.
pub(crate) const USER_RFLAGS: u32 = 1 << 1;

/// GDT selectors.
pub(crate) const SEL_CODE64: u16 = 0x08;
pub(crate) const SEL_DATA: u16 = 0x10;
pub(crate) const SEL_CODE32: u16 = 0x18;
pub(crate) const SEL_USER_DATA: u16 = 0x20 | 3;
pub(crate) const SEL_USER_CODE64: u16 = 0x28 | 3;
pub(crate) const SEL_TSS: u16 = 0x30;

/// A flat code or data segment descriptor: base 0, limit 0xfffff (SDM Vol. 3A §3.4.5).
/// `access` is the P/DPL/S/type byte, `flags` the G, D/B, L, AVL nibble.
const fn flat_segment(access: u8, flags: u8) -> u64 {
    0xffff | (0xf << 48) | ((access as u64) << 40) | (((flags & 0xf) as u64) << 52)
}

/// A 64-bit available-TSS descriptor, 16 bytes (SDM Vol. 3A §7.2.3, Figure 7-4).
const fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The probe's GDT, indexed by the selectors above.
pub(crate) fn gdt() -> [u64; 8] {
    let tss = tss_descriptor(TSS, TSS_SIZE - 1);
    [
        0,
        flat_segment(0x9a, 0xa), // 0x08: ring-0 64-bit code (L = 1)
        flat_segment(0x92, 0xc), // 0x10: ring-0 data
        flat_segment(0x9a, 0xc), // 0x18: ring-0 32-bit code (APs leaving real mode)
        flat_segment(0xf2, 0xc), // 0x20: ring-3 data
        flat_segment(0xfa, 0xa), // 0x28: ring-3 64-bit code
        tss[0],                  // 0x30: TSS
        tss[1],
    ]
}

// The layout, checked when compiling: regions in order and disjoint, tables page-aligned,
// everything below 1 GiB (inside the identity map a VMM's 64-bit boot provides), the
// trampoline in conventional memory below the image.
const _: () = {
    assert!(LOAD_ADDR + CODE_OFFSET < BSS_START);
    assert!(PML4 & 0xfff == 0 && PDPT == PML4 + 0x1000 && PD == PDPT + 0x1000);
    assert!(PD + 4 * 0x1000 <= IDT);
    assert!(IDT + 0x1000 <= BSP_STACK_TOP - 0x2000);
    assert!(BSP_STACK_TOP <= RSP0_STACK_TOP - 0x1000);
    assert!(RSP0_STACK_TOP <= USER_STACK_TOP - 0x1000);
    assert!(USER_STACK_TOP <= AP_STACK_TOP - 0x1000);
    assert!(AP_STACK_TOP <= TSS && TSS + TSS_SIZE <= BSS_END);
    assert!(BSS_END < 1 << 30);
    assert!(TRAMPOLINE & 0xfff == 0 && TRAMPOLINE + 0x1000 <= LOAD_ADDR);
    assert!(SIPI_VECTOR as u64 * 0x1000 == TRAMPOLINE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_well_known_encodings() {
        let g = gdt();
        assert_eq!(g[(SEL_CODE64 >> 3) as usize], 0x00af_9a00_0000_ffff);
        assert_eq!(g[(SEL_DATA >> 3) as usize], 0x00cf_9200_0000_ffff);
        assert_eq!(g[(SEL_CODE32 >> 3) as usize], 0x00cf_9a00_0000_ffff);
        assert_eq!(g[(SEL_USER_DATA >> 3) as usize], 0x00cf_f200_0000_ffff);
        assert_eq!(g[(SEL_USER_CODE64 >> 3) as usize], 0x00af_fa00_0000_ffff);
        // TSS at 0x21c000, limit 0x67, type 9, present.
        assert_eq!(g[6], 0x0000_8921_c000_0067);
        assert_eq!(g[7], 0);
    }
}
