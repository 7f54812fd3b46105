//! Write every probe guest as an ELF file into a directory (for trying them by hand).
fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    use vireo_guests::probe::{build, Probe};
    let probes = [
        ("hello", Probe::Hello),
        ("first-byte", Probe::FirstByte),
        ("unknown-io", Probe::UnknownIo),
        ("poweroff", Probe::PowerOff),
        ("acpi-reset", Probe::AcpiReset),
        ("i8042-reset", Probe::I8042Reset),
        ("smp", Probe::Smp),
        ("cmos-time", Probe::CmosTime),
        ("counter", Probe::Counter),
        ("user-mode", Probe::UserMode { n: 1_000_000 }),
        (
            "pio-loop",
            Probe::PioLoop {
                n: 10_000,
                port: 0x510,
            },
        ),
        (
            "mmio-loop",
            Probe::MmioLoop {
                n: 10_000,
                addr: 0xd000_0000,
            },
        ),
    ];
    for (name, p) in probes {
        let path = std::path::Path::new(&dir).join(format!("{name}.elf"));
        std::fs::write(&path, build(&p)).expect("write probe");
        println!("{}", path.display());
    }
}
