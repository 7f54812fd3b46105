//! ACPI tables (ACPI 6.4): RSDP → XSDT → FADT (hardware-reduced, with sleep control/status and
//! reset registers), DSDT, MADT, MCFG. Built with `acpi_tables` and written into the BIOS area.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vireo_hv::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;

const OEM_ID: [u8; 6] = *b"VIREO ";
const OEM_TABLE_ID: [u8; 8] = *b"VIREOVM ";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags (ACPI 6.4 §5.2.9.3): legacy devices, 8042, no VGA.
const IAPC_BOOT_ARCH: u16 = (1 << 0) | (1 << 1) | (1 << 2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables need {0} bytes, more than the space reserved for them")]
    TooLarge(usize),
    #[error("writing ACPI tables: {0}")]
    Write(String),
}

/// A platform device described in the DSDT.
pub struct LegacyDevices {
    pub serial: bool,
    pub i8042: bool,
    pub rtc: bool,
    pub pvpanic: bool,
    /// The power button: a Generic Event Device and a control-method power button.
    pub power_button: bool,
}

impl Default for LegacyDevices {
    fn default() -> Self {
        LegacyDevices {
            serial: true,
            i8042: true,
            rtc: true,
            pvpanic: true,
            power_button: true,
        }
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The PCI host bridge `\_SB.PCI0` (ACPI 6.4 §6.1.5 `_HID` PNP0A08 with `_CID` PNP0A03, PCI
/// Firmware Spec 3.2 §4.1): segment 0, buses 0 to the last the ECAM covers, and in `_CRS` the
/// bus range, the configuration ports 0xCF8-0xCFF, and the I/O, 32-bit and 64-bit windows BARs
/// live in. There is no `_PRT`: no function has an INTx pin; devices use MSI-X. A
/// motherboard-resources device (PNP0C02) reserves the ECAM region named by the MCFG.
fn pci_host_bridge(body: &mut Vec<u8>, mem_size: u64) {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_cid = aml::Name::new("_CID".into(), &cid);
    let name_adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let name_seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let name_bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let buses = aml::AddressSpace::new_bus_number(0u16, u16::from(layout::PCI_ECAM_LAST_BUS));
    let config_ports = aml::IO::new(
        layout::PCI_CONFIG_ADDRESS_PORT,
        layout::PCI_CONFIG_ADDRESS_PORT,
        1,
        8,
    );
    let io_window = aml::AddressSpace::new_io(
        layout::PCI_IO_START as u16,
        (layout::PCI_IO_START + layout::PCI_IO_SIZE - 1) as u16,
        None,
    );
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64_start = layout::pci_mmio64_start(mem_size);
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + layout::PCI_MMIO64_SIZE - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &config_ports, &io_window, &mmio32, &mmio64]);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(
        "PCI0".into(),
        vec![
            &name_hid, &name_cid, &name_adr, &name_seg, &name_uid, &name_bbn, &name_crs,
        ],
    )
    .to_aml_bytes(body);

    let res_hid = aml::EISAName::new("PNP0C02");
    let res_name_hid = aml::Name::new("_HID".into(), &res_hid);
    let res_name_uid = aml::Name::new("_UID".into(), &aml::ONE);
    let ecam = aml::Memory32Fixed::new(
        false,
        layout::PCI_ECAM_START as u32,
        layout::PCI_ECAM_SIZE as u32,
    );
    let res_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let res_name_crs = aml::Name::new("_CRS".into(), &res_crs);
    aml::Device::new(
        "MRES".into(),
        vec![&res_name_hid, &res_name_uid, &res_name_crs],
    )
    .to_aml_bytes(body);
}

/// The power button (ACPI 6.4 §4.8.2.2.1.2): `\_SB.PWRB`, a control-method power button
/// (`PNP0C0C`), and `\_SB.GED_`, a Generic Event Device (§5.6.9, `ACPI0013`) with one
/// edge-triggered interrupt, [`layout::GED_IRQ`], whose `_EVT` notifies `PWRB` with 0x80
/// ("button pressed", §5.6.6). A hardware-reduced platform has no fixed power button; this is
/// how it reports one.
fn power_button(body: &mut Vec<u8>) {
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let pwrb_name_hid = aml::Name::new("_HID".into(), &pwrb_hid);
    let pwrb_name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("PWRB".into(), vec![&pwrb_name_hid, &pwrb_name_uid]).to_aml_bytes(body);

    let ged_hid = "ACPI0013";
    let ged_name_hid = aml::Name::new("_HID".into(), &ged_hid);
    let ged_name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, layout::GED_IRQ);
    let ged_crs = aml::ResourceTemplate::new(vec![&irq]);
    let ged_name_crs = aml::Name::new("_CRS".into(), &ged_crs);
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let pressed = 0x80u8;
    let notify = aml::Notify::new(&pwrb_path, &pressed);
    let gsi = layout::GED_IRQ;
    let is_button = aml::Equal::new(&aml::Arg(0), &gsi);
    let when = aml::If::new(&is_button, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    aml::Device::new(
        "GED_".into(),
        vec![&ged_name_hid, &ged_name_uid, &ged_name_crs, &evt],
    )
    .to_aml_bytes(body);
}

/// The MCFG (PCI Firmware Spec 3.2 §4.1.2): one ECAM region for segment 0.
pub fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(layout::PCI_ECAM_START, 0, 0, layout::PCI_ECAM_LAST_BUS);
    bytes_of(&m)
}

/// The DSDT: `\_S5`, the legacy devices with their resources (so the guest finds them by PNP
/// ID) and the PCI host bridge, whose 64-bit window follows RAM (`mem_size` bytes).
pub fn dsdt(devices: &LegacyDevices, mem_size: u64) -> Vec<u8> {
    let mut body: Vec<u8> = Vec::new();
    // \_S5: SLP_TYPa, SLP_TYPb, reserved, reserved (ACPI 6.4 §7.4.2).
    let s5 = layout::ACPI_S5_SLP_TYP;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5, &s5, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let com1_io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_name_hid = aml::Name::new("_HID".into(), &com1_hid);
    let com1_name_uid = aml::Name::new("_UID".into(), &1u8);
    let com1_name_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_name_hid, &com1_name_uid, &com1_name_crs],
    );

    let kbd_data = aml::IO::new(layout::I8042_DATA_PORT, layout::I8042_DATA_PORT, 1, 1);
    let kbd_cmd = aml::IO::new(layout::I8042_COMMAND_PORT, layout::I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, layout::KBD_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    let kbd_name_hid = aml::Name::new("_HID".into(), &kbd_hid);
    let kbd_name_crs = aml::Name::new("_CRS".into(), &kbd_crs);
    let kbd = aml::Device::new("PS2K".into(), vec![&kbd_name_hid, &kbd_name_crs]);

    let rtc_io = aml::IO::new(layout::CMOS_PORT, layout::CMOS_PORT, 1, 2);
    let rtc_irq = aml::Interrupt::new(true, true, false, false, layout::RTC_IRQ);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_name_hid = aml::Name::new("_HID".into(), &rtc_hid);
    let rtc_name_crs = aml::Name::new("_CRS".into(), &rtc_crs);
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_name_hid, &rtc_name_crs]);

    let pvp_io = aml::IO::new(layout::PVPANIC_PORT, layout::PVPANIC_PORT, 1, 1);
    let pvp_crs = aml::ResourceTemplate::new(vec![&pvp_io]);
    let pvp_hid = "QEMU0001";
    let pvp_name_hid = aml::Name::new("_HID".into(), &pvp_hid);
    let pvp_name_crs = aml::Name::new("_CRS".into(), &pvp_crs);
    let pvp = aml::Device::new("PEVT".into(), vec![&pvp_name_hid, &pvp_name_crs]);

    let mut children: Vec<&dyn Aml> = Vec::new();
    if devices.serial {
        children.push(&com1);
    }
    if devices.i8042 {
        children.push(&kbd);
    }
    if devices.rtc {
        children.push(&rtc);
    }
    if devices.pvpanic {
        children.push(&pvp);
    }
    let mut sb = Vec::new();
    for c in children {
        c.to_aml_bytes(&mut sb);
    }
    if devices.power_button {
        power_button(&mut sb);
    }
    pci_host_bridge(&mut sb, mem_size);
    body.extend_from_slice(&aml::Scope::raw("\\_SB_".into(), sb));

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// The FADT of a hardware-reduced platform.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port as u64,
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = io_byte(layout::ACPI_RESET_PORT);
    b.reset_value = layout::ACPI_RESET_VALUE;
    b.sleep_control_reg = io_byte(layout::ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_byte(layout::ACPI_SLEEP_STATUS_PORT);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"VIREOVMM").into();
    bytes_of(&b.finalize())
}

/// The MADT: one enabled local APIC per vCPU (APIC ID = vCPU index), one IOAPIC at GSI 0.
pub fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    bytes_of(&madt)
}

/// Build all tables and write them at `layout::ACPI_START`; returns the RSDP address.
pub fn write_tables(mem: &GuestMemory, vcpus: u32, devices: &LegacyDevices) -> Result<u64, Error> {
    let rsdp_addr = layout::ACPI_START;
    let mut next = rsdp_addr + Rsdp::len() as u64;
    let mut place = |len: usize| {
        let at = next.next_multiple_of(16);
        next = at + len as u64;
        at
    };
    let mem_size = layout::ram_size_of(mem.iter().map(|r| (r.start_addr().0, r.len())));
    let dsdt = dsdt(devices, mem_size);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(vcpus);
    let madt_addr = place(madt.len());
    let mcfg = mcfg();
    let mcfg_addr = place(mcfg.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    if next > layout::BIOS_END {
        return Err(Error::TooLarge((next - rsdp_addr) as usize));
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Write(e.to_string()))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
    }

    fn table_at(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_chain_and_checksum() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let rsdp_addr = write_tables(&mem, 4, &LegacyDevices::default()).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]));
        assert!(checksum_ok(&rsdp));
        let xsdt = table_at(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let fadt = table_at(&mem, u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        // Flags at offset 112: hardware-reduced and reset register supported.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        // Reset register GAS at 116: I/O space, port 0x602; value at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(&fadt, 120), layout::ACPI_RESET_PORT as u64);
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        // X_DSDT at 140.
        let dsdt = table_at(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let madt = table_at(&mem, u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Count local APIC structures (type 0, length 8) after the 44-byte header.
        let mut off = 44;
        let mut lapics = 0;
        while off + 2 <= madt.len() {
            if madt[off] == 0 {
                lapics += 1;
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(lapics, 4);
    }

    #[test]
    fn dsdt_names_s5_and_devices() {
        let d = dsdt(&LegacyDevices::default(), 256 << 20);
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        assert!(has(b"_S5_"));
        assert!(has(b"COM1"));
        assert!(has(b"PS2K"));
        assert!(has(b"RTC_"));
        assert!(has(b"QEMU0001"));
        for name in [b"PCI0", b"_SEG", b"_BBN", b"_CID", b"MRES"] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        // EISA IDs are compressed (ACPI 6.4 §19.3.4): PNP0A08, PNP0A03, PNP0C02.
        for id in [0x080a_d041u32, 0x030a_d041, 0x020c_d041] {
            assert!(has(&id.to_le_bytes()), "{id:#x}");
        }
    }

    #[test]
    fn dsdt_has_the_power_button_and_its_event_device() {
        let d = dsdt(&LegacyDevices::default(), 256 << 20);
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        assert!(has(b"ACPI0013") && has(b"GED_") && has(b"PWRB") && has(b"_EVT"));
        // PNP0C0C, compressed.
        assert!(has(&0x0c0c_d041u32.to_le_bytes()));
        // The GED's extended interrupt descriptor: consumer, edge, active high, GED_IRQ.
        let mut irq = vec![0x89, 6, 0, 0b11, 1];
        irq.extend_from_slice(&layout::GED_IRQ.to_le_bytes());
        assert!(has(&irq));
        // Notify (\_SB_.PWRB, 0x80): NotifyOp, root path, 0x80 as a byte constant.
        assert!(has(&[
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80
        ]));
        let without = dsdt(
            &LegacyDevices {
                power_button: false,
                ..Default::default()
            },
            256 << 20,
        );
        assert!(!without.windows(8).any(|w| w == b"ACPI0013"));
    }

    /// Find a QWord/DWord/Word address space descriptor of `kind` (0 memory, 1 I/O, 2 bus)
    /// in `t` and return its (min, max).
    fn address_space(t: &[u8], tag: u8, kind: u8) -> Option<(u64, u64)> {
        let width = match tag {
            0x8a => 8,
            0x87 => 4,
            0x88 => 2,
            _ => return None,
        };
        let field = |b: &[u8]| {
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(&b[..width]);
            u64::from_le_bytes(v)
        };
        (0..t.len().saturating_sub(6 + 5 * width)).find_map(|i| {
            let len = u16::from_le_bytes([t[i + 1], t[i + 2]]) as usize;
            (t[i] == tag && len == 3 + 5 * width && t[i + 3] == kind).then(|| {
                let f = &t[i + 6..];
                (field(&f[width..]), field(&f[2 * width..]))
            })
        })
    }

    #[test]
    fn pci_root_bridge_windows() {
        let d = dsdt(&LegacyDevices::default(), 5 << 30);
        assert_eq!(address_space(&d, 0x88, 2), Some((0, 255)));
        assert_eq!(address_space(&d, 0x88, 1), Some((0x1000, 0xffff)));
        assert_eq!(address_space(&d, 0x87, 0), Some((0xc000_0000, 0xdfff_ffff)));
        assert_eq!(
            address_space(&d, 0x8a, 0),
            Some((6 << 30, (6 << 30) + layout::PCI_MMIO64_SIZE - 1))
        );
        // Memory32Fixed (0x86) with the ECAM base and size.
        let ecam = [
            &[0x86u8, 9, 0, 0][..],
            &(layout::PCI_ECAM_START as u32).to_le_bytes(),
            &(layout::PCI_ECAM_SIZE as u32).to_le_bytes(),
        ]
        .concat();
        assert!(d.windows(ecam.len()).any(|w| w == ecam.as_slice()));
    }

    #[test]
    fn mcfg_describes_the_ecam() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let rsdp_addr = write_tables(&mem, 1, &LegacyDevices::default()).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        let xsdt = table_at(&mem, u64_at(&rsdp, 24));
        assert_eq!(xsdt.len(), 36 + 3 * 8);
        let mcfg = table_at(&mem, u64_at(&xsdt, 52));
        assert_eq!(&mcfg[..4], b"MCFG");
        assert!(checksum_ok(&mcfg));
        // Header (36) + reserved (8), then base, segment, start and end bus.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(&mcfg, 44), layout::PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 255]);
    }

    #[test]
    fn many_vcpus_fit() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_tables(&mem, 255, &LegacyDevices::default()).unwrap();
    }
}
