use super::elf::parse::{phdrs, pvh_entry, u16_at, u64_at};
use super::memory::{BSS_END, CODE_OFFSET, SEL_CODE32, TRAMPOLINE_CODE_MAX};
use super::*;
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

fn all_probes() -> Vec<Probe> {
    vec![
        Probe::Hello,
        Probe::FirstByte,
        Probe::UnknownIo,
        Probe::PowerOff,
        Probe::AcpiReset,
        Probe::I8042Reset,
        Probe::Smp,
        Probe::CmosTime,
        Probe::UserMode { n: 0 },
        Probe::UserMode { n: u32::MAX },
        Probe::PioLoop { n: 0, port: 0 },
        Probe::PioLoop {
            n: u32::MAX,
            port: u16::MAX,
        },
        Probe::PioReadLoop { n: 1, port: 0x80 },
        Probe::MmioLoop { n: 1, addr: 0 },
        Probe::MmioLoop {
            n: 7,
            addr: u64::MAX,
        },
        Probe::MmioReadLoop {
            n: 1000,
            addr: 0xd000_0000,
        },
        Probe::PciScan,
        Probe::VirtioRng,
        Probe::VirtioBlk,
    ]
}

const PLATFORMS: [Platform; 3] = [Platform::Vireo, Platform::QemuQ35, Platform::Firecracker];

/// The code of an image (file offset CODE_OFFSET on) and its guest address.
fn code(image: &[u8]) -> (&[u8], u64) {
    (&image[CODE_OFFSET as usize..], LOAD_ADDR + CODE_OFFSET)
}

/// Decodes `bytes` at `ip` (`bitness`) until `count` instructions or the end.
fn decode(bitness: u32, bytes: &[u8], ip: u64, count: usize) -> Vec<Instruction> {
    let mut d = Decoder::with_ip(bitness, bytes, ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() && out.len() < count {
        out.push(d.decode());
    }
    out
}

/// Decodes the 64-bit unit (from e_entry up to the PVH entry, where the 32-bit unit starts).
fn decode_main(image: &[u8]) -> Vec<Instruction> {
    let (bytes, ip) = code(image);
    let pvh = u64::from(pvh_entry(image).unwrap());
    decode(64, &bytes[..(pvh - ip) as usize], ip, usize::MAX)
}

/// True if `insns` holds `mov edx, port; mov al, value; out dx, al` in a row.
fn has_out8(insns: &[Instruction], port: u32, value: u8) -> bool {
    insns.windows(3).any(|w| {
        w[0].code() == Code::Mov_r32_imm32
            && w[0].op0_register() == Register::EDX
            && w[0].immediate32() == port
            && w[1].code() == Code::Mov_r8_imm8
            && w[1].op0_register() == Register::AL
            && w[1].immediate8() == value
            && w[2].code() == Code::Out_DX_AL
    })
}

#[test]
fn every_probe_builds_small_and_deterministic() {
    for probe in all_probes() {
        for platform in PLATFORMS {
            let image = try_build_for(&probe, platform).unwrap();
            // The block probe drives four requests through a whole virtio device.
            let max = if probe == Probe::VirtioBlk {
                8192
            } else {
                4096
            };
            assert!(image.len() < max, "{probe:?} is {} bytes", image.len());
            assert_eq!(
                image,
                build_for(&probe, platform),
                "{probe:?} build is not deterministic"
            );
        }
    }
    assert_eq!(
        build(&Probe::Hello),
        build_for(&Probe::Hello, Platform::Vireo)
    );
}

#[test]
fn elf_headers_and_pvh_note_are_consistent() {
    for probe in all_probes() {
        let image = build(&probe);
        assert_eq!(&image[..4], b"\x7fELF");
        assert_eq!(u16_at(&image, 0x12), 62, "EM_X86_64");
        let entry = u64_at(&image, 0x18);
        assert_eq!(entry, LOAD_ADDR + CODE_OFFSET);
        let ph = phdrs(&image);
        let load = ph.iter().find(|p| p.p_type == 1).unwrap();
        assert_eq!(load.paddr, load.vaddr);
        assert!(load.paddr >= 1 << 20);
        assert_eq!(load.filesz as usize, image.len());
        assert_eq!(load.paddr + load.memsz, BSS_END);
        let pvh = u64::from(pvh_entry(&image).expect("PVH note"));
        assert!(
            pvh > entry && pvh < LOAD_ADDR + image.len() as u64,
            "{probe:?}: PVH entry {pvh:#x}"
        );
        assert_eq!(pvh % 16, 0);
    }
}

#[test]
fn linux_loader_loads_the_image_and_finds_the_pvh_entry() {
    use linux_loader::loader::{elf::Elf, KernelLoader, PvhBootCapability};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    for probe in [Probe::Hello, Probe::Smp, Probe::UserMode { n: 5 }] {
        let image = build(&probe);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut file = std::io::Cursor::new(image.clone());
        let result = Elf::load(&mem, None, &mut file, Some(GuestAddress(1 << 20))).unwrap();
        assert_eq!(result.kernel_load, GuestAddress(LOAD_ADDR + CODE_OFFSET));
        assert_eq!(result.kernel_end, BSS_END);
        let pvh = u64::from(pvh_entry(&image).unwrap());
        assert_eq!(
            result.pvh_boot_cap,
            PvhBootCapability::PvhEntryPresent(GuestAddress(pvh))
        );
        let mut loaded = vec![0u8; image.len()];
        mem.read_slice(&mut loaded, GuestAddress(LOAD_ADDR))
            .unwrap();
        assert_eq!(loaded, image);
    }
}

#[test]
fn first_byte_is_the_first_instruction_at_both_entries() {
    let image = build(&Probe::FirstByte);
    let (bytes, ip) = code(&image);
    let at64 = decode(64, bytes, ip, 3);
    assert!(has_out8(&at64, 0x3f8, b'!'), "64-bit entry starts {at64:?}");
    let pvh = u64::from(pvh_entry(&image).unwrap());
    let at32 = decode(32, &bytes[(pvh - ip) as usize..], pvh, 3);
    assert!(has_out8(&at32, 0x3f8, b'!'), "PVH entry starts {at32:?}");
    // Hello does not write it.
    let hello = build(&Probe::Hello);
    let (bytes, ip) = code(&hello);
    assert!(!has_out8(&decode(64, bytes, ip, 3), 0x3f8, b'!'));
}

#[test]
fn power_off_and_reset_follow_the_platform() {
    let vireo = decode_main(&build_for(&Probe::Hello, Platform::Vireo));
    assert!(
        has_out8(&vireo, 0x600, 0x34),
        "ACPI S5 to the sleep control register"
    );
    let q35 = decode_main(&build_for(&Probe::Hello, Platform::QemuQ35));
    assert!(!has_out8(&q35, 0x600, 0x34));
    assert!(q35.iter().any(|i| i.code() == Code::Out_DX_AX));
    let fc = decode_main(&build_for(&Probe::Hello, Platform::Firecracker));
    assert!(
        has_out8(&fc, 0x64, 0xfe),
        "Firecracker powers off with an i8042 reset"
    );

    assert!(has_out8(&decode_main(&build(&Probe::AcpiReset)), 0x602, 1));
    assert!(has_out8(
        &decode_main(&build_for(&Probe::AcpiReset, Platform::QemuQ35)),
        0xcf9,
        6
    ));
    assert!(has_out8(
        &decode_main(&build(&Probe::I8042Reset)),
        0x64,
        0xfe
    ));
}

#[test]
fn loop_probes_carry_their_parameters() {
    let insns = decode_main(&build(&Probe::PioLoop {
        n: 123_456,
        port: 0x1f0,
    }));
    let imm32 = |r: Register, v: u32| {
        insns.iter().any(|i| {
            i.code() == Code::Mov_r32_imm32 && i.op0_register() == r && i.immediate32() == v
        })
    };
    assert!(imm32(Register::ECX, 123_456));
    assert!(imm32(Register::EDX, 0x1f0));
    assert!(insns.iter().any(|i| i.code() == Code::Out_DX_AL));

    let insns = decode_main(&build(&Probe::MmioReadLoop {
        n: 9,
        addr: 0xfeed_0000,
    }));
    assert!(insns.iter().any(|i| i.op0_register() == Register::RBX
        && i.op1_kind() == OpKind::Immediate64
        && i.immediate64() == 0xfeed_0000));
    assert!(insns.iter().any(|i| i.code() == Code::Mov_r32_rm32
        && i.op0_register() == Register::EAX
        && i.memory_base() == Register::RBX));
}

#[test]
fn ap_trampoline_enters_protected_mode_and_jumps_to_the_32_bit_code() {
    let bytes = boot::trampoline(0x20_1234).unwrap();
    assert!(bytes.len() <= TRAMPOLINE_CODE_MAX);
    let insns = decode(16, &bytes, 0, usize::MAX);
    assert_eq!(insns[0].code(), Code::Cli);
    let lgdt = insns
        .iter()
        .find(|i| i.code() == Code::Lgdt_m1632)
        .expect("o32 lgdt");
    assert_eq!(lgdt.memory_displacement64(), memory::TRAMPOLINE_GDTR);
    assert!(insns
        .iter()
        .any(|i| i.code() == Code::Mov_cr_r32 && i.op0_register() == Register::CR0));
    let jmp = insns.last().unwrap();
    assert_eq!(jmp.code(), Code::Jmp_ptr1632);
    assert_eq!(jmp.far_branch_selector(), SEL_CODE32);
    assert_eq!(jmp.far_branch32(), 0x20_1234);
    assert_eq!(
        insns.iter().map(|i| i.len()).sum::<usize>(),
        bytes.len(),
        "no undecodable bytes"
    );
}

#[test]
fn smp_trampoline_in_the_image_targets_the_ap_entry() {
    // The 32-bit unit follows the 64-bit one; its AP part ends with a far jump into 64-bit code,
    // and the embedded trampoline's far jump points into the 32-bit unit.
    let image = build(&Probe::Smp);
    let (bytes, ip) = code(&image);
    let pvh = u64::from(pvh_entry(&image).unwrap());
    let boot32 = decode(32, &bytes[(pvh - ip) as usize..], pvh, usize::MAX);
    let far: Vec<_> = boot32
        .iter()
        .filter(|i| i.code() == Code::Jmp_ptr1632)
        .collect();
    assert_eq!(far.len(), 2, "PVH and AP far jumps");
    let ap32 = far[0].next_ip();
    assert!(far
        .iter()
        .all(|j| j.far_branch_selector() == memory::SEL_CODE64));
    let tramp = boot::trampoline(ap32).unwrap();
    assert!(
        image.windows(tramp.len()).any(|w| w == tramp.as_slice()),
        "trampoline to {ap32:#x} embedded"
    );
}

#[test]
fn user_mode_expected_follows_the_documented_recurrence() {
    assert_eq!(user_mode_expected(0), USER_MODE_SEED);
    let one = USER_MODE_SEED
        .wrapping_mul(USER_MODE_MULTIPLIER)
        .wrapping_add(1);
    assert_eq!(user_mode_expected(1), one ^ (one >> 29));
    let mut x = USER_MODE_SEED;
    for i in [3u64, 2, 1] {
        x = x.wrapping_mul(USER_MODE_MULTIPLIER).wrapping_add(i);
        x ^= x >> 29;
    }
    assert_eq!(user_mode_expected(3), x);
    assert_ne!(user_mode_expected(1000), user_mode_expected(1001));
}

#[test]
fn user_mode_loop_count_is_in_the_code() {
    let insns = decode_main(&build(&Probe::UserMode { n: 4242 }));
    assert!(insns.iter().any(|i| i.code() == Code::Iretq));
    assert!(insns.iter().any(|i| i.code() == Code::Hlt));
    assert!(insns.iter().any(|i| i.code() == Code::Mov_r32_imm32
        && i.op0_register() == Register::ECX
        && i.immediate32() == 4242));
}
