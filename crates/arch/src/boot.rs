//! The zero page (`struct boot_params`) with its e820 map and command line (Linux boot
//! protocol, `Documentation/arch/x86/zero-page.rst` and `boot.rst`).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vireo_hv::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::layout;

/// e820 address-range types (ACPI 6.4 §15, "System Address Map Interfaces").
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader`: 0xff, "undefined" — no registered loader ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const LOADFLAG_LOADED_HIGH: u8 = 1 << 0;
const LOADFLAG_CAN_USE_HEAP: u8 = 1 << 7;
/// Default command line limit (COMMAND_LINE_SIZE on x86) when there is no setup header.
const DEFAULT_CMDLINE_SIZE: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing the zero page: {0}")]
    Write(String),
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map of a machine with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::BIOS_END - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = layout::low_ram_end(mem_size);
    if low_end > layout::BIOS_END {
        map.push(E820Entry {
            addr: layout::BIOS_END,
            size: low_end - layout::BIOS_END,
            kind: E820_RAM,
        });
    }
    // ECAM must be e820-reserved or Linux refuses MMCONFIG.
    map.push(E820Entry {
        addr: layout::PCI_ECAM_START,
        size: layout::PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map.push(E820Entry {
        addr: layout::HV_PRIVATE_START,
        size: layout::HV_PRIVATE_SIZE,
        kind: E820_RESERVED,
    });
    if mem_size > layout::MMIO_HOLE_START {
        map.push(E820Entry {
            addr: layout::HIGH_RAM_START,
            size: mem_size - layout::MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

/// What goes into the zero page.
pub struct ZeroPage<'a> {
    pub mem_size: u64,
    pub cmdline: &'a str,
    /// The kernel's own setup header (bzImage), if any.
    pub setup_header: Option<setup_header>,
    /// (address, size) of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// Guest-physical address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Write the command line and the zero page into guest memory.
pub fn write_zero_page(mem: &GuestMemory, zp: &ZeroPage) -> Result<(), Error> {
    let mut params = boot_params::default();
    let mut hdr = zp.setup_header.unwrap_or_default();
    let max_cmdline = match zp.setup_header {
        Some(h) if h.version >= 0x206 && h.cmdline_size > 0 => {
            (h.cmdline_size as usize).min(layout::CMDLINE_MAX_SIZE - 1)
        }
        _ => DEFAULT_CMDLINE_SIZE - 1,
    };
    if zp.cmdline.len() > max_cmdline {
        return Err(Error::CmdlineTooLong {
            len: zp.cmdline.len(),
            max: max_cmdline,
        });
    }
    if zp.cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }
    let mut cmdline = zp.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| Error::Write(e.to_string()))?;

    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = 0x100_0000;
    }
    if let Some((addr, size)) = zp.initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = zp.rsdp;

    let map = e820_map(zp.mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|e| Error::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_exactly() {
        for &size in &[32u64 << 20, 256 << 20, 3 << 30, 5 << 30] {
            let ram: u64 = e820_map(size)
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            // Everything but the EBDA/BIOS area is usable RAM.
            assert_eq!(
                ram,
                size - (layout::BIOS_END - layout::EBDA_START),
                "{size}"
            );
        }
    }

    #[test]
    fn e820_entries_are_sorted_and_disjoint() {
        let map = e820_map(5 << 30);
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:?}");
        }
        assert_eq!(map.last().unwrap().addr, layout::HIGH_RAM_START);
    }

    #[test]
    fn zero_page_fields() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let zp = ZeroPage {
            mem_size: 64 << 20,
            cmdline: "console=ttyS0",
            setup_header: None,
            initrd: Some((0x300_0000, 0x1234)),
            rsdp: layout::ACPI_START,
        };
        write_zero_page(&mem, &zp).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!(p.e820_entries as usize, e820_map(64 << 20).len());
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let long = "x".repeat(5000);
        let zp = ZeroPage {
            mem_size: 64 << 20,
            cmdline: &long,
            setup_header: None,
            initrd: None,
            rsdp: 0,
        };
        assert!(matches!(
            write_zero_page(&mem, &zp),
            Err(Error::CmdlineTooLong { .. })
        ));
    }
}
