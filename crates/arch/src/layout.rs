//! The guest-physical and port-I/O map of a vireo machine: the one place it is written down.
//!
//! ```text
//! guest-physical                      what
//! 0x0000_0000 - 0x0000_0fff           real-mode IVT / BDA (RAM, left zero)
//! 0x0000_0500                         boot GDT (64-bit entry)
//! 0x0000_0520                         boot IDT (empty)
//! 0x0000_7000                         zero page (struct boot_params)
//! 0x0000_9000 - 0x0000_efff           boot page tables: PML4, PDPT, PD (identity, first 1 GiB)
//! 0x0002_0000                         kernel command line (up to 64 KiB)
//! 0x0009_fc00 - 0x000f_ffff           reserved: EBDA, VGA hole, BIOS area
//! 0x000e_0000                           RSDP and the other ACPI tables (inside the reserved area)
//! 0x0010_0000 - RAM below the hole    kernel, initrd (top of low RAM), free RAM
//! 0xc000_0000 - 0xffff_ffff           32-bit MMIO hole (1 GiB):
//!   0xc000_0000 - 0xdfff_ffff           32-bit PCI BAR window
//!   0xe000_0000 - 0xefff_ffff           PCIe ECAM (256 buses)
//!   0xfec0_0000                         IOAPIC
//!   0xfee0_0000                         local APICs
//!   0xfeff_c000 - 0xfeff_ffff           hypervisor-private pages (KVM TSS + identity map)
//! 0x1_0000_0000 - ...                 RAM above the hole (when RAM > 3 GiB)
//! after RAM, 1 GiB aligned            64-bit PCI BAR window (32 GiB)
//! ```
//!
//! Port I/O: 0x3f8 COM1 (IRQ 4), 0x60/0x64 i8042, 0x70/0x71 CMOS/RTC (IRQ 8), 0x40-0x43 and
//! 0x61 PIT, 0x20/0xa0 PIC, 0x505 pvpanic, 0x600-0x602 ACPI sleep control/status and reset
//! registers,
//! 0xcf8/0xcfc PCI configuration mechanism #1, 0x1000-0xffff PCI I/O BAR window.

/// Start of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`, Linux boot protocol).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot page tables: PML4, then PDPT, then `BOOT_PD_COUNT` page directories.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Page directories of 2 MiB pages: identity-map the first 1 GiB (enough for the 64-bit
/// entry; the kernel builds its own tables at once). More costs start-up time on shadow-paging
/// hosts such as KVM-PVM, which populate the whole map on the first entry.
pub const BOOT_PD_COUNT: u64 = 1;
/// Initial stack pointer for the boot CPU (grows down below the zero page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line we pass (the kernel's COMMAND_LINE_SIZE on x86-64 is 2048; newer
/// kernels take more, `cmdline_size` in the setup header says how much).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Start of the EBDA; RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables live in the BIOS area, where the RSDP search also looks.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where a bzImage's protected-mode kernel is loaded (the boot protocol's default).
pub const KERNEL_START: u64 = 0x10_0000;
/// The lowest size of RAM vireo accepts.
pub const MIN_MEMORY: u64 = 32 << 20;

/// The 32-bit MMIO hole: everything from here to 4 GiB is not RAM.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// 32-bit PCI memory BAR window.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe enhanced configuration access (ECAM), 1 MiB per bus.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// The last bus number the ECAM region covers (buses 0 to this).
pub const PCI_ECAM_LAST_BUS: u8 = ((PCI_ECAM_SIZE >> 20) - 1) as u8;
/// Size of the 64-bit PCI BAR window (above RAM, see [`pci_mmio64_start`]).
pub const PCI_MMIO64_SIZE: u64 = 32 << 30;
/// PCI I/O BAR window: the ports above the legacy devices' (all below 0x1000).
pub const PCI_IO_START: u64 = 0x1000;
pub const PCI_IO_SIZE: u64 = 0x1_0000 - PCI_IO_START;
/// IOAPIC MMIO registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO registers (default APIC base).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Four pages the hypervisor backend may use for itself (`hv::VmParams::private_pages`).
pub const HV_PRIVATE_START: u64 = 0xfeff_c000;
pub const HV_PRIVATE_SIZE: u64 = 0x4000;
/// RAM above the hole starts here.
pub const HIGH_RAM_START: u64 = MMIO_HOLE_END;

/// COM1 base port and interrupt.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 keyboard and auxiliary (mouse) interrupts.
pub const KBD_IRQ: u32 = 1;
pub const AUX_IRQ: u32 = 12;
/// CMOS/RTC index and data ports.
pub const CMOS_PORT: u16 = 0x70;
pub const RTC_IRQ: u32 = 8;
/// ACPI hardware-reduced sleep control register (ACPI 6.4 §4.8.3.7), sleep status register
/// and reset register (§4.8.3.6), one byte each.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// SLP_TYP of the S5 (soft-off) state, as given by the DSDT's `\_S5` package.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// SLP_EN bit of the sleep control register.
pub const ACPI_SLP_EN: u8 = 1 << 5;
/// The interrupt of the ACPI Generic Event Device (`ACPI0013`) that reports the power
/// button (an ISA IRQ no other device uses; edge, active high).
pub const GED_IRQ: u32 = 5;
/// pvpanic port (ACPI `QEMU0001`).
pub const PVPANIC_PORT: u16 = 0x505;
/// PCI configuration mechanism #1 address and data ports.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_DATA_PORT: u16 = 0xcfc;

/// The guest RAM ranges (start, length) for `mem_size` bytes of RAM.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if mem_size > MMIO_HOLE_START {
        ranges.push((HIGH_RAM_START, mem_size - MMIO_HOLE_START));
    }
    ranges
}

/// End (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// Start of the 64-bit PCI BAR window: above all RAM, 1 GiB aligned.
pub fn pci_mmio64_start(mem_size: u64) -> u64 {
    let ram_end = ram_ranges(mem_size)
        .last()
        .map(|&(s, l)| s + l)
        .unwrap_or(0)
        .max(MMIO_HOLE_END);
    ram_end.next_multiple_of(1 << 30)
}

/// Total RAM described by `ram_ranges`-style regions (start, length).
pub fn ram_size_of(regions: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    regions.into_iter().map(|(_, len)| len).sum()
}

// The fixed regions must not overlap: checked at compile time.
const _: () = {
    assert!(PCI_ECAM_SIZE == 256 << 20);
    assert!((PCI_CONFIG_ADDRESS_PORT as u64) < PCI_IO_START);
    assert!((PVPANIC_PORT as u64) < PCI_IO_START && (ACPI_RESET_PORT as u64) < PCI_IO_START);
    assert!(ZERO_PAGE_START + 0x1000 <= PML4_START);
    assert!(PDE_START + BOOT_PD_COUNT * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
    assert!(LAPIC_START + 0x1000 <= HV_PRIVATE_START);
    assert!(HV_PRIVATE_START + HV_PRIVATE_SIZE <= MMIO_HOLE_END);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let r = ram_ranges(5 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(pci_mmio64_start(5 << 30), 6 << 30);
        assert_eq!(pci_mmio64_start(256 << 20), 4 << 30);
        assert_eq!(ram_size_of(r), 5 << 30);
    }
}
