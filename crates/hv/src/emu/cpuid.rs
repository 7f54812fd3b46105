//! The CPUID table the emulated CPU offers (Intel SDM Vol. 2A "CPUID"). It advertises exactly
//! what the emulator implements: no AVX/XSAVE/PCID/INVPCID/FSGSBASE/RDRAND/SMEP/SMAP, no
//! MTRR/MCE, and the KVM paravirtual leaves for kvmclock.

use crate::state::{CpuidEntry, CPUID_FLAG_SIGNIFICANT_INDEX};

/// Family 6, model 0x3a (extended model 3), stepping 9: EAX of leaf 1, also EDX after reset.
pub const SIGNATURE: u32 = (3 << 16) | (6 << 8) | (0xa << 4) | 9;
/// Physical address width reported in leaf 0x8000_0008.
pub const DEFAULT_MAXPHYADDR: u8 = 40;
/// Linear address width.
const LINEAR_BITS: u32 = 48;

/// Leaf 1 EDX bits.
mod edx1 {
    pub const FPU: u32 = 1 << 0;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const CLFSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    pub const HTT: u32 = 1 << 28;
}

/// Leaf 1 ECX bits.
mod ecx1 {
    pub const CX16: u32 = 1 << 13;
    pub const X2APIC: u32 = 1 << 21;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// Leaf 7 EBX bit 9: enhanced REP MOVSB/STOSB (a performance hint; REP MOVS/STOS are fast
/// here because they copy whole pages).
const ERMS: u32 = 1 << 9;
/// Leaf 7 EDX bit 4: fast short REP MOVSB.
const FSRM: u32 = 1 << 4;
/// Leaf 7 EDX bit 29: IA32_ARCH_CAPABILITIES exists.
const ARCH_CAPABILITIES: u32 = 1 << 29;

/// KVM paravirtual features (Linux `Documentation/virt/kvm/x86/cpuid.rst`).
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    CpuidEntry {
        function,
        index,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
    }
}

fn indexed(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    CpuidEntry {
        flags: CPUID_FLAG_SIGNIFICANT_INDEX,
        ..entry(function, index, eax, ebx, ecx, edx)
    }
}

fn str4(s: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(s) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

/// The CPUID leaves of vCPU `id` of a `vcpus`-vCPU VM whose TSC runs at `tsc_hz`.
pub fn table(id: u32, vcpus: u32, tsc_hz: u64) -> Vec<CpuidEntry> {
    let mut t = Vec::new();
    let vcpus = vcpus.max(1);
    t.push(entry(
        0,
        0,
        0x16,
        str4(b"Genu"),
        str4(b"ntel"),
        str4(b"ineI"),
    ));
    let edx = edx1::FPU
        | edx1::PSE
        | edx1::TSC
        | edx1::MSR
        | edx1::PAE
        | edx1::CX8
        | edx1::APIC
        | edx1::PGE
        | edx1::CMOV
        | edx1::PAT
        | edx1::CLFSH
        | edx1::MMX
        | edx1::FXSR
        | edx1::SSE
        | edx1::SSE2
        | if vcpus > 1 { edx1::HTT } else { 0 };
    let ecx = ecx1::CX16 | ecx1::X2APIC | ecx1::POPCNT | ecx1::TSC_DEADLINE | ecx1::HYPERVISOR;
    let ebx = (8 << 8) | (vcpus.min(255) << 16) | (id.min(255) << 24);
    t.push(entry(1, 0, SIGNATURE, ebx, ecx, edx));
    t.push(entry(2, 0, 1, 0, 0, 0));
    t.push(indexed(4, 0, 0, 0, 0, 0));
    t.push(indexed(7, 0, 0, ERMS, 0, FSRM | ARCH_CAPABILITIES));
    // Topology (SDM Vol. 3A §8.9.4): one thread per core, `vcpus` cores per package.
    let core_bits = 32 - (vcpus - 1).leading_zeros();
    t.push(indexed(0xb, 0, 0, 1, 1 << 8, id));
    t.push(indexed(0xb, 1, core_bits, vcpus, 1 | (2 << 8), id));
    t.push(indexed(0xb, 2, 0, 0, 2, id));
    // TSC frequency (SDM Vol. 2A leaves 15H/16H): crystal = TSC, ratio 1/1.
    let (den, num, crystal) = if tsc_hz <= u32::MAX as u64 {
        (1, 1, tsc_hz as u32)
    } else {
        (1, (tsc_hz / 1_000_000) as u32, 1_000_000)
    };
    t.push(entry(0x15, 0, den, num, crystal, 0));
    let mhz = (tsc_hz / 1_000_000).min(0xffff) as u32;
    t.push(entry(0x16, 0, mhz, mhz, 100, 0));
    t.push(entry(
        0x4000_0000,
        0,
        0x4000_0001,
        str4(b"KVMK"),
        str4(b"VMKV"),
        str4(b"M\0\0\0"),
    ));
    t.push(entry(
        0x4000_0001,
        0,
        KVM_FEATURE_NOP_IO_DELAY | KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
        0,
        0,
        0,
    ));
    t.push(entry(0x8000_0000, 0, 0x8000_0008, 0, 0, 0));
    // LAHF/SAHF in 64-bit mode; SYSCALL, NX, 1 GiB pages, RDTSCP, LM.
    t.push(entry(
        0x8000_0001,
        0,
        0,
        0,
        1,
        (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29),
    ));
    let brand = *b"vireo emulated x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    for (i, chunk) in brand.chunks(16).enumerate() {
        let w = |j: usize| str4(&chunk[j * 4..j * 4 + 4]);
        t.push(entry(0x8000_0002 + i as u32, 0, w(0), w(1), w(2), w(3)));
    }
    // Invariant TSC.
    t.push(entry(0x8000_0007, 0, 0, 0, 0, 1 << 8));
    t.push(entry(
        0x8000_0008,
        0,
        DEFAULT_MAXPHYADDR as u32 | (LINEAR_BITS << 8),
        0,
        0,
        0,
    ));
    t
}

/// Find leaf `function`/`index` in `table`.
pub fn lookup(table: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    table.iter().find(|e| {
        e.function == function && (e.flags & CPUID_FLAG_SIGNIFICANT_INDEX == 0 || e.index == index)
    })
}

/// What the CPUID instruction returns for EAX = `function`, ECX = `index`: the entry, or
/// zeros for a leaf that is not in the table.
pub fn query(table: &[CpuidEntry], function: u32, index: u32) -> [u32; 4] {
    match lookup(table, function, index) {
        Some(e) => [e.eax, e.ebx, e.ecx, e.edx],
        None => {
            // Leaf 0xB returns the subleaf number in ECX and the x2APIC ID in EDX for any
            // subleaf past the last level.
            if function == 0xb {
                let id = lookup(table, 0xb, 0).map(|e| e.edx).unwrap_or(0);
                [0, 0, index & 0xff, id]
            } else {
                [0; 4]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_features() {
        let t = table(1, 2, 1_000_000_000);
        let [_, b, c, d] = query(&t, 0, 0);
        let mut v = Vec::new();
        for r in [b, d, c] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&v, b"GenuineIntel");
        let [_, ebx, ecx, edx] = query(&t, 1, 0);
        assert_eq!(ebx >> 24, 1, "APIC ID of vCPU 1");
        assert_ne!(ecx & ecx1::HYPERVISOR, 0);
        assert_eq!(ecx & (1 << 26), 0, "no XSAVE");
        assert_eq!(ecx & (1 << 28), 0, "no AVX");
        assert_ne!(edx & edx1::PAE, 0);
        let [_, ebx7, _, _] = query(&t, 7, 0);
        assert_eq!(ebx7 & (1 << 0), 0, "no FSGSBASE");
        assert_eq!(ebx7 & (1 << 10), 0, "no INVPCID");
    }

    #[test]
    fn kvm_leaves_and_tsc() {
        let t = table(0, 1, 2_500_000_000);
        let [eax, b, c, d] = query(&t, 0x4000_0000, 0);
        assert_eq!(eax, 0x4000_0001);
        let mut v = Vec::new();
        for r in [b, c, d] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&v, b"KVMKVMKVM\0\0\0");
        let [f, ..] = query(&t, 0x4000_0001, 0);
        assert_ne!(f & KVM_FEATURE_CLOCKSOURCE2, 0);
        assert_ne!(f & KVM_FEATURE_CLOCKSOURCE_STABLE_BIT, 0);
        let [den, num, crystal, _] = query(&t, 0x15, 0);
        assert_eq!(crystal as u64 * num as u64 / den as u64, 2_500_000_000);
    }

    #[test]
    fn topology_subleaves() {
        let t = table(3, 4, 1_000_000_000);
        assert_eq!(query(&t, 0xb, 0)[3], 3);
        let l1 = query(&t, 0xb, 1);
        assert_eq!(l1[0], 2, "two bits of core ID for 4 vCPUs");
        assert_eq!(l1[1], 4);
        assert_eq!(query(&t, 0xb, 5), [0, 0, 5, 3]);
    }
}
