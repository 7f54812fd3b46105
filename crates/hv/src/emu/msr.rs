//! Model-specific registers (Intel SDM Vol. 4) and the KVM paravirtual clock.
//!
//! Implemented: TSC, APIC_BASE and the x2APIC range (forwarded to the interrupt controller),
//! FEATURE_CONTROL (locked, no VMX), BIOS_SIGN_ID, ARCH_CAPABILITIES, SYSENTER_*,
//! MISC_ENABLE, PAT, EFER, STAR/LSTAR/CSTAR/FMASK, FS/GS/KERNEL_GS_BASE, TSC_AUX and the
//! kvmclock MSRs. Any other index is #GP(0) for the guest (logged once per index).
//!
//! kvmclock (Linux `Documentation/virt/kvm/x86/msr.rst`, pvclock ABI): the guest gives the
//! physical address of a `pvclock_vcpu_time_info`; we fill it once with a (TSC, ns) pair and a
//! scale, marked stable, since our TSC is a fixed-rate function of host monotonic time.

use std::sync::atomic::{fence, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use vm_memory::{Bytes, GuestAddress};

use super::cpu::*;
use super::mmu::PAGE_MASK;
use super::{log_once, LogOnce};

pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE (SDM Vol. 3A §11.5.4.1), forwarded to the interrupt controller.
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_BIOS_UPDT_TRIG: u32 = 0x79;
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_PAT: u32 = 0x277;
pub const X2APIC_FIRST: u32 = 0x800;
pub const X2APIC_LAST: u32 = 0x8ff;
pub const X2APIC_ICR: u32 = 0x830;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_STAR: u32 = 0xc000_0081;
pub const IA32_LSTAR: u32 = 0xc000_0082;
pub const IA32_CSTAR: u32 = 0xc000_0083;
pub const IA32_FMASK: u32 = 0xc000_0084;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Power-up PAT (SDM Vol. 3A §11.12.4).
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
/// MISC_ENABLE: fast strings, BTS and PEBS unavailable.
const MISC_ENABLE_DEFAULT: u64 = 1 | (1 << 11) | (1 << 12);
/// ARCH_CAPABILITIES: an interpreter does not speculate — RDCL_NO, SKIP_L1DFL_VMENTRY, SSB_NO,
/// MDS_NO, PSCHANGE_MC_NO, TAA_NO, SBDR_SSDP_NO, FBSDP_NO, PSDP_NO, BHI_NO, PBRSB_NO, GDS_NO,
/// RFDS_NO, ITS_NO.
const ARCH_CAPABILITIES_VALUE: u64 = (1 << 0)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 20)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 62);
/// pvclock `flags`: PVCLOCK_TSC_STABLE_BIT.
const PVCLOCK_TSC_STABLE_BIT: u8 = 1;

/// The MSRs that are plain storage.
#[derive(Debug, Clone, Default)]
pub struct MsrFile {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    /// Guest TSC minus the clock's TSC.
    pub tsc_offset: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub bios_sign_id: u64,
    pub kvm_system_time: u64,
    pub kvm_wall_clock: u64,
    pvclock_version: u32,
}

impl MsrFile {
    /// Values after INIT (SDM Vol. 3A Table 9-1); the TSC keeps running.
    pub fn reset_on_init(&mut self) {
        let tsc_offset = self.tsc_offset;
        *self = MsrFile {
            tsc_offset,
            pat: PAT_DEFAULT,
            misc_enable: MISC_ENABLE_DEFAULT,
            ..MsrFile::default()
        };
    }
}

/// The MSR indices `msrs()` reports when asked for "everything" (snapshots).
pub const SAVED_MSRS: &[u32] = &[
    IA32_TIME_STAMP_COUNTER,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_ESP,
    IA32_SYSENTER_EIP,
    IA32_MISC_ENABLE,
    IA32_PAT,
    IA32_EFER,
    IA32_STAR,
    IA32_LSTAR,
    IA32_CSTAR,
    IA32_FMASK,
    IA32_FS_BASE,
    IA32_GS_BASE,
    IA32_KERNEL_GS_BASE,
    IA32_TSC_AUX,
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_SYSTEM_TIME_NEW,
];

/// (mul, shift) with `ns = ((tsc << shift) * mul) >> 32` (negative shift: right shift) for a
/// TSC of `hz` (pvclock `tsc_to_system_mul` / `tsc_shift`).
pub fn pvclock_scale(hz: u64) -> (u32, i8) {
    let hz = hz.max(1) as u128;
    let mul_at = |shift: i32| -> u128 {
        let num = 1_000_000_000u128 << 32;
        if shift >= 0 {
            num / (hz << shift)
        } else {
            (num << -shift) / hz
        }
    };
    let mut shift = 0i32;
    while mul_at(shift) > u32::MAX as u128 && shift < 63 {
        shift += 1;
    }
    while mul_at(shift - 1) <= u32::MAX as u128 && shift > -31 {
        shift -= 1;
    }
    (mul_at(shift).min(u32::MAX as u128) as u32, shift as i8)
}

fn pat_valid(v: u64) -> bool {
    v.to_le_bytes()
        .iter()
        .all(|&b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

impl Cpu {
    /// Guest TSC now.
    pub fn guest_tsc(&self) -> u64 {
        self.vm.clock.tsc().wrapping_add(self.msr.tsc_offset)
    }

    fn x2apic_enabled(&self) -> bool {
        self.apic_base & (APIC_BASE_EN | APIC_BASE_EXTD) == (APIC_BASE_EN | APIC_BASE_EXTD)
    }

    /// RDMSR. `None`: not implemented (the guest gets #GP(0)).
    pub fn rdmsr(&mut self, idx: u32) -> Option<u64> {
        let m = &self.msr;
        Some(match idx {
            IA32_TIME_STAMP_COUNTER => self.guest_tsc(),
            IA32_APIC_BASE => {
                let v = self.vm.irqchip.apic_base(self.id);
                self.apic_base = v;
                v
            }
            IA32_TSC_DEADLINE => match self.vm.irqchip.tsc_deadline(self.id) {
                0 => 0,
                d => d.wrapping_add(m.tsc_offset),
            },
            IA32_FEATURE_CONTROL => 1,
            IA32_BIOS_SIGN_ID => m.bios_sign_id,
            IA32_ARCH_CAPABILITIES => ARCH_CAPABILITIES_VALUE,
            IA32_SYSENTER_CS => m.sysenter_cs,
            IA32_SYSENTER_ESP => m.sysenter_esp,
            IA32_SYSENTER_EIP => m.sysenter_eip,
            IA32_MISC_ENABLE => m.misc_enable,
            IA32_PAT => m.pat,
            IA32_EFER => self.efer,
            IA32_STAR => m.star,
            IA32_LSTAR => m.lstar,
            IA32_CSTAR => m.cstar,
            IA32_FMASK => m.fmask,
            IA32_FS_BASE => self.seg[FS].base,
            IA32_GS_BASE => self.seg[GS].base,
            IA32_KERNEL_GS_BASE => m.kernel_gs_base,
            IA32_TSC_AUX => m.tsc_aux,
            MSR_KVM_WALL_CLOCK_NEW => m.kvm_wall_clock,
            MSR_KVM_SYSTEM_TIME_NEW => m.kvm_system_time,
            X2APIC_FIRST..=X2APIC_LAST if self.x2apic_enabled() => {
                let chip = &self.vm.irqchip;
                let n = idx - X2APIC_FIRST;
                if idx == X2APIC_ICR {
                    chip.lapic_read(self.id, 0x300) as u64
                        | (chip.lapic_read(self.id, 0x310) as u64) << 32
                } else {
                    chip.lapic_read(self.id, n << 4) as u64
                }
            }
            _ => {
                log_once(
                    LogOnce::Msr(idx),
                    format_args!("vCPU {}: RDMSR of unknown MSR {idx:#x}", self.id),
                );
                return None;
            }
        })
    }

    /// WRMSR. `false`: not implemented or an invalid value (the guest gets #GP(0)).
    /// `host`: the VMM sets state (`Vcpu::set_msrs`), which skips the guest-only checks.
    pub fn wrmsr(&mut self, idx: u32, v: u64, host: bool) -> bool {
        let canon = Cpu::canonical(v) || host;
        match idx {
            IA32_TIME_STAMP_COUNTER => {
                self.msr.tsc_offset = v.wrapping_sub(self.vm.clock.tsc());
                self.kvmclock_publish();
            }
            IA32_APIC_BASE => {
                let rsvd = 0xff | (1 << 9) | !((1u64 << self.maxphy) - 1);
                if !host && v & rsvd != 0 {
                    return false;
                }
                if !host && v & APIC_BASE_EXTD != 0 && v & APIC_BASE_EN == 0 {
                    return false;
                }
                self.vm.irqchip.set_apic_base(self.id, v);
                self.refresh_apic_base();
            }
            IA32_TSC_DEADLINE => {
                // The guest's TSC is the shared clock plus `tsc_offset` (modulo 2^64).
                let d = match v {
                    0 => 0,
                    v => v.wrapping_sub(self.msr.tsc_offset).max(1),
                };
                self.vm.irqchip.set_tsc_deadline(self.id, d);
            }
            IA32_BIOS_UPDT_TRIG => {}
            IA32_BIOS_SIGN_ID => self.msr.bios_sign_id = v,
            IA32_SYSENTER_CS => self.msr.sysenter_cs = v & 0xffff_ffff,
            IA32_SYSENTER_ESP if canon => self.msr.sysenter_esp = v,
            IA32_SYSENTER_EIP if canon => self.msr.sysenter_eip = v,
            IA32_MISC_ENABLE => self.msr.misc_enable = v,
            IA32_PAT if host || pat_valid(v) => self.msr.pat = v,
            IA32_EFER => return self.write_efer(v, host),
            IA32_STAR => self.msr.star = v,
            IA32_LSTAR if canon => self.msr.lstar = v,
            IA32_CSTAR if canon => self.msr.cstar = v,
            IA32_FMASK => self.msr.fmask = v & 0xffff_ffff,
            IA32_FS_BASE if canon => self.seg[FS].base = v,
            IA32_GS_BASE if canon => self.seg[GS].base = v,
            IA32_KERNEL_GS_BASE if canon => self.msr.kernel_gs_base = v,
            IA32_TSC_AUX if host || v >> 32 == 0 => self.msr.tsc_aux = v,
            MSR_KVM_WALL_CLOCK_NEW => {
                self.msr.kvm_wall_clock = v;
                self.publish_wall_clock(v);
            }
            MSR_KVM_SYSTEM_TIME_NEW => {
                self.msr.kvm_system_time = v;
                self.kvmclock_publish();
            }
            X2APIC_FIRST..=X2APIC_LAST if self.x2apic_enabled() || host => {
                let chip = self.vm.irqchip.clone();
                if idx == X2APIC_ICR {
                    chip.lapic_write_icr(self.id, v);
                } else {
                    if !host && v >> 32 != 0 {
                        return false;
                    }
                    chip.lapic_write(self.id, (idx - X2APIC_FIRST) << 4, v as u32);
                }
                self.lapic_changed();
            }
            _ => {
                log_once(
                    LogOnce::Msr(idx),
                    format_args!(
                        "vCPU {}: WRMSR of unknown MSR {idx:#x} (value {v:#x})",
                        self.id
                    ),
                );
                return false;
            }
        }
        true
    }

    /// EFER (SDM Vol. 3A §2.2.1, §9.8.5): only SCE, LME, LMA and NXE exist; LME may not change
    /// while paging is on; LMA is read-only for the guest.
    fn write_efer(&mut self, v: u64, host: bool) -> bool {
        let valid = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
        if !host {
            if v & !valid != 0 {
                return false;
            }
            if self.cr0 & CR0_PG != 0 && (v ^ self.efer) & EFER_LME != 0 {
                return false;
            }
        }
        let new = if host {
            v & valid
        } else {
            (v & !EFER_LMA) | (self.efer & EFER_LMA)
        };
        if (new ^ self.efer) & (EFER_NXE | EFER_LMA) != 0 {
            self.mmu.flush_all();
        }
        self.efer = new;
        self.update_mode();
        true
    }

    /// Re-read IA32_APIC_BASE from the interrupt controller and map the xAPIC page.
    pub fn refresh_apic_base(&mut self) {
        let v = self.vm.irqchip.apic_base(self.id);
        self.apic_base = v;
        let page = if v & APIC_BASE_EN != 0 && v & APIC_BASE_EXTD == 0 {
            v & PAGE_MASK & ((1u64 << self.maxphy) - 1)
        } else {
            u64::MAX
        };
        self.mmu.set_apic_page(page);
    }

    /// This vCPU wrote `len` bytes of guest-physical memory at `gpa` through `vm-memory`:
    /// tell the block caches if that was code (the write does not serialize on its own).
    fn wrote_guest(&mut self, gpa: u64, len: usize) {
        if let Some(h) = self.mmu.host_range(gpa, len as u64) {
            self.wrote_host(h, len);
        }
    }

    /// Fill the guest's `pvclock_vcpu_time_info` if kvmclock is enabled.
    pub fn kvmclock_publish(&mut self) {
        let v = self.msr.kvm_system_time;
        if v & 1 == 0 {
            return;
        }
        let gpa = v & !1;
        let clock = self.vm.clock.clone();
        let raw = clock.tsc();
        let ns = (raw as u128 * 1_000_000_000 / clock.tsc_hz() as u128) as u64;
        let (mul, shift) = pvclock_scale(clock.tsc_hz());
        let mut body = [0u8; 32];
        body[8..16].copy_from_slice(&raw.wrapping_add(self.msr.tsc_offset).to_le_bytes());
        body[16..24].copy_from_slice(&ns.to_le_bytes());
        body[24..28].copy_from_slice(&mul.to_le_bytes());
        body[28] = shift as u8;
        body[29] = PVCLOCK_TSC_STABLE_BIT;
        let Some(mem) = self.mmu.memory() else {
            return;
        };
        let ver = self.msr.pvclock_version.wrapping_add(1) | 1;
        let ok = mem
            .write_slice(&ver.to_le_bytes(), GuestAddress(gpa))
            .is_ok();
        fence(Ordering::SeqCst);
        let ok = ok
            && mem
                .write_slice(&body[4..], GuestAddress(gpa.wrapping_add(4)))
                .is_ok();
        fence(Ordering::SeqCst);
        let ver = ver.wrapping_add(1);
        let ok = ok
            && mem
                .write_slice(&ver.to_le_bytes(), GuestAddress(gpa))
                .is_ok();
        self.msr.pvclock_version = ver;
        self.wrote_guest(gpa, 32);
        if !ok {
            log_once(
                LogOnce::Kvmclock,
                format_args!("vCPU {}: kvmclock area {gpa:#x} is not RAM", self.id),
            );
        }
    }

    /// Fill the guest's `pvclock_wall_clock` at `gpa`: the host's UTC time at guest time 0.
    fn publish_wall_clock(&mut self, gpa: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let boot = now.saturating_sub(self.vm.clock.nanos() as u128);
        let sec = (boot / 1_000_000_000) as u32;
        let nsec = (boot % 1_000_000_000) as u32;
        let Some(mem) = self.mmu.memory() else {
            return;
        };
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&2u32.to_le_bytes());
        b[4..8].copy_from_slice(&sec.to_le_bytes());
        b[8..12].copy_from_slice(&nsec.to_le_bytes());
        let ok = mem.write_slice(&b, GuestAddress(gpa)).is_ok();
        self.wrote_guest(gpa, b.len());
        if !ok {
            log_once(
                LogOnce::Kvmclock,
                format_args!("vCPU {}: kvmclock wall clock {gpa:#x} is not RAM", self.id),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::block::CodePages;
    use crate::GuestMemory;
    use std::sync::Arc;

    /// The kvmclock area is written by this vCPU behind the block cache's back; with one vCPU
    /// the WRMSR does not move the code epoch by serializing, so the write itself must.
    #[test]
    fn kvmclock_area_in_a_code_page_invalidates_its_blocks() {
        let mut c = Cpu::new(0, crate::emu::tests::dummy_vm(), Vec::new());
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let code = Arc::new(CodePages::new(&mem));
        c.mmu.set_memory(mem, code.clone(), 1);
        let (code_page, data_page) = (0x5000u64, 0x8000u64);
        let idx = |pa: u64| code.region_base(0) + (pa / 4096) as usize;
        code.set(idx(code_page));
        let vm = c.vm.clone();
        let epoch = || vm.code_epoch.load(Ordering::Relaxed);

        let before = epoch();
        assert!(c.wrmsr(MSR_KVM_SYSTEM_TIME_NEW, data_page | 1, false));
        assert_eq!(epoch(), before, "a data page is not code");

        assert!(c.wrmsr(MSR_KVM_SYSTEM_TIME_NEW, code_page | 1, false));
        assert!(!code.is_code(idx(code_page)));
        assert!(epoch() > before);

        code.set(idx(code_page));
        let before = epoch();
        assert!(c.wrmsr(MSR_KVM_WALL_CLOCK_NEW, code_page + 0x40, false));
        assert!(!code.is_code(idx(code_page)));
        assert!(epoch() > before);
    }

    fn ns_of(tsc: u64, mul: u32, shift: i8) -> u64 {
        let t = if shift >= 0 {
            tsc << shift
        } else {
            tsc >> -shift
        };
        ((t as u128 * mul as u128) >> 32) as u64
    }

    #[test]
    fn pvclock_scale_converts_tsc_to_ns() {
        for hz in [1_000_000_000u64, 2_500_000_000, 3_000_000, 100_000_000_000] {
            let (mul, shift) = pvclock_scale(hz);
            let tsc = hz * 3; // three seconds
            let ns = ns_of(tsc, mul, shift);
            let err = (ns as i64 - 3_000_000_000).abs();
            assert!(err < 1_000, "hz {hz}: {ns} ns (mul {mul}, shift {shift})");
            assert!(mul >= 1 << 31, "full precision for hz {hz}");
        }
    }

    #[test]
    fn pat_validation() {
        assert!(pat_valid(PAT_DEFAULT));
        assert!(!pat_valid(0x0000_0000_0000_0002));
    }
}
