//! Bare-metal probe guests assembled in Rust.
//!
//! A probe is a tiny x86-64 program (a few KiB) packaged as an ELF64 executable that exercises
//! one exit path of a VMM and reports over COM1 in fixed, parseable lines (each ending in `\n`).
//! It has two entries reaching the same code:
//! - `e_entry`, the 64-bit entry (Linux boot protocol style, what vireo uses): long mode, paging
//!   with an identity map of at least the first 1 GiB, flat 64-bit CS, interrupts off; no stack
//!   needed (RSI = zero page is ignored);
//! - the PVH entry from the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note (QEMU `-kernel`, Firecracker,
//!   Cloud Hypervisor): 32-bit protected mode, paging off.
//!
//! Either way the probe installs its own page tables (identity map of 4 GiB in 2 MiB pages, the
//! MMIO hole uncached), GDT, IDT (every exception prints
//! `vireo-probe: exception <vector> error=<hex> rip=<hex>` and powers off) and stack.
//!
//! Output of each probe ([`Probe`]); numbers are decimal unless marked hex (lower case,
//! zero-padded to the width shown):
//!
//! | probe | lines |
//! |---|---|
//! | `Hello` | `vireo-probe: hello` |
//! | `FirstByte` | `!` before anything else at either entry, then as `Hello` |
//! | `UnknownIo` | `unknown-io: pio8=ff pio16=ffff pio32=ffffffff mmio32=ffffffff` (what was read) |
//! | `PowerOff` | `poweroff` |
//! | `AcpiReset` / `I8042Reset` | `acpi-reset` / `i8042-reset`, then `still-running` if no reset |
//! | `Smp` | `cpu <apic id> bsp`, per AP `cpu <cpuid apic id> <lapic apic id>`, `cpus <n>` |
//! | `CmosTime` | `rtc: 2026-11-29 09:19:20` |
//! | `UserMode` | `user: cpl=3 result=<16 hex digits>`, `user: back in ring 0` |
//! | `PioLoop` etc. | `S`, then `n` accesses, `E` |
//! | `PciScan` | per function `pci 00:SS.F VVVV:DDDD class CCCCCC` and `caps 00:SS.F II II ...`, then per BAR `bar 00:SS.F N io|mem32|mem64 addr=<16 hex> size=<16 hex>`, then `ecam ok` (or `ecam mismatch <n>`) |
//! | `VirtioBlk` | the `found`/`features-ok`/`driver-ok` lines, then `virtio-blk: get-id irq=1 timeout=0 used=1 len=<n> status=00 serial=<text>`, `virtio-blk: read ... data=<32 hex>`, `virtio-blk: write ... status=00`, `virtio-blk: flush ... status=00` |
//! | `Counter` | `count 0`, `count 1`, ... every 100 ms, forever |
//! | `VirtioRng` | `virtio-rng: found at 00:SS.F`, `virtio-rng: features-ok status=0b`, `virtio-rng: driver-ok status=0f vector=0001`, `virtio-rng: irq=<n> timeout=<0/1> used=<n> len=<n> random=yes/no` |
//!
//! After its output a probe powers off the [`Platform`]'s way (except the reset probes, which
//! halt if the reset did not happen), then halts with interrupts off.

mod asm;
mod boot;
mod elf;
mod memory;
mod pci;
mod probes;

pub use memory::LOAD_ADDR;

/// The line of the `Hello` and `FirstByte` probes.
pub const HELLO_LINE: &str = "vireo-probe: hello\n";
/// The byte `FirstByte` writes first.
pub const FIRST_BYTE: u8 = b'!';
/// Port the `UnknownIo` probe reads (and writes).
pub const UNKNOWN_IO_PORT: u16 = probes::UNKNOWN_PORT;
/// MMIO address the `UnknownIo` probe reads (and writes), 32 bits wide.
pub const UNKNOWN_IO_MMIO_ADDR: u64 = probes::UNKNOWN_MMIO_ADDR;

/// Start value and multiplier of the user-mode probe's loop (see [`user_mode_expected`]).
const USER_MODE_SEED: u64 = 0x243f_6a88_85a3_08d3;
const USER_MODE_MULTIPLIER: u64 = 0x5851_f42d_4c95_7f2d;

/// A probe guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Probe {
    /// Prints [`HELLO_LINE`] and powers off.
    Hello,
    /// For the start-up benchmark: writes [`FIRST_BYTE`] to COM1 as the very first instruction
    /// at both entries, then behaves as `Hello`.
    FirstByte,
    /// Reads port 0x1234 (8/16/32-bit) and 32-bit MMIO at 0xd000_0000, writes both, prints what
    /// it read.
    UnknownIo,
    /// Prints `poweroff` and powers off.
    PowerOff,
    /// Prints `acpi-reset` and writes the platform's ACPI reset register.
    AcpiReset,
    /// Prints `i8042-reset` and pulses the CPU reset line through the i8042 (command 0xfe).
    I8042Reset,
    /// Starts all APs with INIT-SIPI-SIPI; every CPU reports its APIC IDs.
    Smp,
    /// Reads the CMOS RTC.
    CmosTime,
    /// Runs `n` iterations of a loop in ring 3 and returns to ring 0 through the #GP of a ring-3 `hlt`.
    UserMode { n: u32 },
    /// `n` times `out dx, al` to `port` between the `S` and `E` lines.
    PioLoop { n: u32, port: u16 },
    /// `n` times `in al, dx` from `port`.
    PioReadLoop { n: u32, port: u16 },
    /// `n` times a 32-bit write to `addr` (must be below 4 GiB, the probe's identity map; other
    /// addresses fault and the probe reports the exception).
    MmioLoop { n: u32, addr: u64 },
    /// `n` times a 32-bit read from `addr` (below 4 GiB).
    MmioReadLoop { n: u32, addr: u64 },
    /// Enumerates bus 0 through ports 0xCF8/0xCFC (and checks the IDs through ECAM), then
    /// sizes every BAR with decoding off, as an OS does.
    PciScan,
    /// Finds the virtio-rng function (1af4:1044), moves its BAR to 0xc100_0000, initialises
    /// it (VERSION_1 only), routes the queue's MSI-X vector to the boot CPU, offers one
    /// 64-byte buffer, notifies, and waits (at most about two seconds of LAPIC timer) for the
    /// interrupt.
    VirtioRng,
    /// Counts forever: a periodic local APIC timer (vector 0x30, every 10 ms at a 1 GHz APIC
    /// bus) interrupts a `sti; hlt` loop, and every 10 ticks the probe prints `count <n>`
    /// with `n` = 0, 1, 2, ... (kept in R12). For snapshot tests: a restored probe goes on
    /// counting from where it was, which needs its registers, IDT, LAPIC timer and pending
    /// interrupts back.
    Counter,
    /// Finds the first virtio-blk function (1af4:1042) and sets it up as `VirtioRng` does
    /// (accepting VIRTIO_BLK_F_FLUSH too), then, one request at a time: GET_ID (prints the serial), IN of sector 0 (prints its
    /// first 16 bytes in hex), OUT of sector 1 ([`BLK_PROBE_PATTERN`] repeated), FLUSH.
    VirtioBlk,
}

/// What the `VirtioBlk` probe writes to sector 1 of the disk: these 16 bytes, 32 times.
pub const BLK_PROBE_PATTERN: &[u8; 16] = pci::BLK_PROBE_PATTERN;

/// How a probe powers off and resets: the registers differ between VMMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Platform {
    /// vireo (and Cloud Hypervisor): ACPI hardware-reduced sleep control register at 0x600
    /// (S5 = `0x34`), reset register 0x602 (`vireo_arch::layout`).
    #[default]
    Vireo,
    /// QEMU `-M q35`: ICH9 PM1a_CNT at 0x604 (SLP_TYP 0, SLP_EN), reset control register 0xcf9.
    QemuQ35,
    /// Firecracker: no ACPI power-off; powering off is an i8042 reset, which ends the VMM.
    Firecracker,
}

/// Why a probe could not be built. Every probe is built by the unit tests, so these mean a bug
/// in this module.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("assembling the probe failed: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    #[error("the probe image is {size} bytes, more than the {max} its layout allows")]
    TooLarge { size: usize, max: usize },
    #[error("the probe's layout did not converge")]
    Layout,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Builds `probe` for `platform` as ELF64 bytes.
pub fn try_build_for(probe: &Probe, platform: Platform) -> Result<Vec<u8>, ProbeError> {
    let image = boot::build_image(probe, platform)?;
    tracing::debug!(?probe, ?platform, bytes = image.len(), "built probe");
    Ok(image)
}

/// Builds `probe` for `platform`.
///
/// # Panics
/// Only on a bug in the probe assembler (every probe variant is built by the unit tests); use
/// [`try_build_for`] to get the error instead.
pub fn build_for(probe: &Probe, platform: Platform) -> Vec<u8> {
    match try_build_for(probe, platform) {
        Ok(image) => image,
        Err(e) => panic!("probe {probe:?} failed to build: {e}"),
    }
}

/// Builds `probe` for vireo ([`Platform::Vireo`]) as ELF64 bytes.
///
/// # Panics
/// As [`build_for`].
pub fn build(probe: &Probe) -> Vec<u8> {
    build_for(probe, Platform::Vireo)
}

/// The `result` the `UserMode { n }` probe prints: `n` rounds, counting `i` down from `n` to 1,
/// of `x = x * M + i; x ^= x >> 29` (wrapping) from a fixed seed.
pub fn user_mode_expected(n: u32) -> u64 {
    let mut x = USER_MODE_SEED;
    for i in (1..=u64::from(n)).rev() {
        x = x.wrapping_mul(USER_MODE_MULTIPLIER).wrapping_add(i);
        x ^= x >> 29;
    }
    x
}

#[cfg(test)]
mod tests;
