//! Per-vCPU CPUID: the backend's supported leaves adjusted for vireo's topology — one socket,
//! one thread per core, N cores, APIC ID = vCPU index (Intel SDM Vol. 2A, CPUID; Vol. 3A §8.9
//! "Programming considerations for hardware multi-threading capable processors").

use vireo_hv::state::CPUID_FLAG_SIGNIFICANT_INDEX;
use vireo_hv::CpuidEntry;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_ADDR_SIZE: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Topology level types in leaf 0xB ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn is_amd(entries: &[CpuidEntry]) -> bool {
    entries
        .iter()
        .any(|e| e.function == 0 && e.ebx == u32::from_le_bytes(*b"Auth"))
}

/// The CPUID table vCPU `id` of `count` sees.
pub fn vcpu_cpuid(supported: &[CpuidEntry], id: u32, count: u32) -> Vec<CpuidEntry> {
    let amd = is_amd(supported);
    let shift = id_bits(count);
    let mut out: Vec<CpuidEntry> = supported
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    for e in &mut out {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (id << 24) | (count.min(255) << 16) | (e.ebx & 0xffff);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | (sharing.min(0xfff) << 14) | ((count - 1).min(63) << 26);
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_ADDR_SIZE if amd => {
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (shift << 12);
            }
            _ => {}
        }
    }
    // Leaf 0xB: SMT level (1 thread per core), core level (`count` cores), then the end.
    let topo = |index: u32, eax: u32, ebx: u32, level: u32| CpuidEntry {
        function: LEAF_TOPOLOGY,
        index,
        flags: CPUID_FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx: index | (level << 8),
        edx: id,
    };
    let max_basic = out
        .iter()
        .find(|e| e.function == 0)
        .map(|e| e.eax)
        .unwrap_or(0);
    if max_basic >= LEAF_TOPOLOGY {
        out.push(topo(0, 0, 1, LEVEL_SMT));
        out.push(topo(1, shift, count, LEVEL_CORE));
        out.push(topo(2, 0, 0, 0));
    }
    out
}

/// Whether the table advertises MTRRs (leaf 1 EDX bit 12).
pub fn has_mtrr(entries: &[CpuidEntry]) -> bool {
    entries
        .iter()
        .any(|e| e.function == LEAF_FEATURES && e.edx & (1 << 12) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 0,
                eax: 0x1f,
                ebx: u32::from_le_bytes(*b"Genu"),
                ..Default::default()
            },
            CpuidEntry {
                function: 1,
                ebx: 0x0008_0800,
                edx: 1 << 12,
                ..Default::default()
            },
            CpuidEntry {
                function: 4,
                index: 3,
                flags: 1,
                eax: 0x163,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xb,
                index: 0,
                eax: 9,
                ..Default::default()
            },
            CpuidEntry {
                function: 0x1f,
                index: 0,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn apic_ids_and_counts() {
        for count in [1u32, 2, 3, 4, 32] {
            for id in 0..count {
                let t = vcpu_cpuid(&base(), id, count);
                let l1 = t.iter().find(|e| e.function == 1).unwrap();
                assert_eq!(l1.ebx >> 24, id);
                assert_eq!((l1.ebx >> 16) & 0xff, count);
                assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
                assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
                assert_eq!(l1.edx & EDX_HTT != 0, count > 1);
                let topo: Vec<_> = t.iter().filter(|e| e.function == 0xb).collect();
                assert_eq!(topo.len(), 3);
                assert!(topo.iter().all(|e| e.edx == id));
                assert_eq!(topo[1].ebx, count);
                assert!(1u32 << topo[1].eax >= count);
                assert!(t.iter().all(|e| e.function != 0x1f));
            }
        }
    }

    #[test]
    fn cache_leaf_sharing() {
        let t = vcpu_cpuid(&base(), 0, 4);
        let l3 = t.iter().find(|e| e.function == 4).unwrap();
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax >> 26, 3);
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(32), 5);
    }

    #[test]
    fn mtrr_bit() {
        assert!(has_mtrr(&base()));
    }
}
