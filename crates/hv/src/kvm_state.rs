//! Saving and loading KVM vCPU and VM state (KVM API: KVM_GET/SET_REGS, SREGS, XSAVE, XCRS,
//! DEBUGREGS, LAPIC, MSRS, VCPU_EVENTS, MP_STATE, CPUID2; KVM_GET/SET_IRQCHIP, PIT2, CLOCK),
//! converted to and from vireo's own state types at this boundary.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_msr_entry, kvm_pic_state, kvm_pit_state2,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SIPI_VECTOR, KVM_VCPUEVENT_VALID_SMM,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::state::*;
use crate::{Error, Result};

/// MSRs read and written one batch at a time.
const MSR_BATCH: usize = 64;

/// Read `indices`; an MSR KVM refuses is left out (logged at debug level).
pub(crate) fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<Msr>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::Unsupported(format!("MSRs: {e:?}")))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::call("KVM_GET_MSRS", e))?;
        out.extend(
            msrs.as_slice()[..n.min(chunk.len())]
                .iter()
                .map(|e| Msr::new(e.index, e.data)),
        );
        if n < chunk.len() {
            tracing::debug!("KVM_GET_MSRS: MSR {:#x} not readable; skipped", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// Write `msrs`; one KVM refuses is skipped with a warning (a snapshot from a host whose KVM
/// knows more MSRs), the others are still written.
pub(crate) fn set_msrs_lenient(fd: &VcpuFd, msrs: &[Msr]) -> Result<()> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let k =
            Msrs::from_entries(&entries).map_err(|e| Error::Unsupported(format!("MSRs: {e:?}")))?;
        let n = fd
            .set_msrs(&k)
            .map_err(|e| Error::call("KVM_SET_MSRS", e))?;
        if n < chunk.len() {
            tracing::warn!(
                "KVM_SET_MSRS: MSR {:#x} = {:#x} refused; skipped",
                chunk[n].index,
                chunk[n].data
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(())
}

pub(crate) fn get_cpuid(fd: &VcpuFd) -> Result<Vec<CpuidEntry>> {
    let c = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::call("KVM_GET_CPUID2", e))?;
    Ok(c.as_slice()
        .iter()
        .map(super::kvm::cpuid_from_kvm)
        .collect())
}

pub(crate) fn get_events(fd: &VcpuFd) -> Result<VcpuEvents> {
    let e = fd
        .get_vcpu_events()
        .map_err(|e| Error::call("KVM_GET_VCPU_EVENTS", e))?;
    Ok(events_from_kvm(&e))
}

pub(crate) fn events_from_kvm(e: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected != 0,
        exception_pending: e.exception.pending != 0,
        exception_nr: e.exception.nr,
        exception_has_error_code: e.exception.has_error_code != 0,
        exception_error_code: e.exception.error_code,
        exception_has_payload: e.exception_has_payload != 0,
        exception_payload: e.exception_payload,
        interrupt_injected: e.interrupt.injected != 0,
        interrupt_nr: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft != 0,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected != 0,
        nmi_pending: e.nmi.pending != 0,
        nmi_masked: e.nmi.masked != 0,
        sipi_vector: e.sipi_vector,
        smm: e.smi.smm != 0,
        smi_pending: e.smi.pending != 0,
        smm_inside_nmi: e.smi.smm_inside_nmi != 0,
        latched_init: e.smi.latched_init != 0,
        triple_fault_pending: e.triple_fault.pending != 0,
    }
}

pub(crate) fn events_to_kvm(v: &VcpuEvents) -> kvm_vcpu_events {
    let mut e = kvm_vcpu_events::default();
    e.exception.injected = v.exception_injected.into();
    e.exception.pending = v.exception_pending.into();
    e.exception.nr = v.exception_nr;
    e.exception.has_error_code = v.exception_has_error_code.into();
    e.exception.error_code = v.exception_error_code;
    e.interrupt.injected = v.interrupt_injected.into();
    e.interrupt.nr = v.interrupt_nr;
    e.interrupt.soft = v.interrupt_soft.into();
    e.interrupt.shadow = v.interrupt_shadow;
    e.nmi.injected = v.nmi_injected.into();
    e.nmi.pending = v.nmi_pending.into();
    e.nmi.masked = v.nmi_masked.into();
    e.sipi_vector = v.sipi_vector;
    e.smi.smm = v.smm.into();
    e.smi.pending = v.smi_pending.into();
    e.smi.smm_inside_nmi = v.smm_inside_nmi.into();
    e.smi.latched_init = v.latched_init.into();
    // Payload and triple-fault fields need capabilities vireo does not enable; without them
    // KVM keeps exceptions in the legacy form (already reflected in `exception_*`).
    e.flags = KVM_VCPUEVENT_VALID_NMI_PENDING
        | KVM_VCPUEVENT_VALID_SIPI_VECTOR
        | KVM_VCPUEVENT_VALID_SHADOW
        | KVM_VCPUEVENT_VALID_SMM;
    e
}

pub(crate) fn get_debug(fd: &VcpuFd) -> Result<DebugRegs> {
    let d = fd
        .get_debug_regs()
        .map_err(|e| Error::call("KVM_GET_DEBUGREGS", e))?;
    Ok(DebugRegs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
    })
}

pub(crate) fn set_debug(fd: &VcpuFd, d: &DebugRegs) -> Result<()> {
    let k = kvm_debugregs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        ..Default::default()
    };
    fd.set_debug_regs(&k)
        .map_err(|e| Error::call("KVM_SET_DEBUGREGS", e))
}

pub(crate) fn get_xcrs(fd: &VcpuFd) -> Result<Vec<Xcr>> {
    let x = fd.get_xcrs().map_err(|e| Error::call("KVM_GET_XCRS", e))?;
    Ok(x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
        .iter()
        .map(|c| Xcr {
            index: c.xcr,
            value: c.value,
        })
        .collect())
}

pub(crate) fn set_xcrs(fd: &VcpuFd, xcrs: &[Xcr]) -> Result<()> {
    if xcrs.is_empty() {
        return Ok(());
    }
    let mut k = kvm_xcrs::default();
    let n = xcrs.len().min(k.xcrs.len());
    for (dst, src) in k.xcrs.iter_mut().zip(xcrs) {
        dst.xcr = src.index;
        dst.value = src.value;
    }
    k.nr_xcrs = n as u32;
    fd.set_xcrs(&k).map_err(|e| Error::call("KVM_SET_XCRS", e))
}

pub(crate) fn get_xsave(fd: &VcpuFd) -> Result<Vec<u32>> {
    let x = fd
        .get_xsave()
        .map_err(|e| Error::call("KVM_GET_XSAVE", e))?;
    Ok(x.region.to_vec())
}

pub(crate) fn set_xsave(fd: &VcpuFd, words: &[u32]) -> Result<()> {
    let mut k = kvm_xsave::default();
    if words.len() != k.region.len() {
        return Err(Error::Unsupported(format!(
            "XSAVE area of {} words (KVM_SET_XSAVE takes {})",
            words.len(),
            k.region.len()
        )));
    }
    k.region.copy_from_slice(words);
    // SAFETY: `k` is a complete legacy `kvm_xsave` (4 KiB region, no `extra` words); vireo
    // never enables KVM_CAP_XSAVE2, so the kernel reads exactly this much.
    unsafe { fd.set_xsave(&k) }.map_err(|e| Error::call("KVM_SET_XSAVE", e))
}

// ---- VM ---------------------------------------------------------------------------------------

fn pic_from_kvm(p: &kvm_pic_state) -> PicState {
    PicState {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

fn pic_to_kvm(p: &PicState) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

fn get_chip(fd: &VmFd, id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c)
        .map_err(|e| Error::call("KVM_GET_IRQCHIP", e))?;
    Ok(c)
}

/// The in-kernel PIC pair, IOAPIC and PIT.
pub(crate) fn get_irqchips(fd: &VmFd) -> Result<([PicState; 2], IoapicState, PitState)> {
    let master = get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?;
    let slave = get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?;
    let io = get_chip(fd, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: chip_id selects the union member KVM filled: `pic` for the PIC chips, `ioapic`
    // for the IOAPIC.
    let (m, s, a) = unsafe { (master.chip.pic, slave.chip.pic, io.chip.ioapic) };
    let ioapic = IoapicState {
        base_address: a.base_address,
        ioregsel: a.ioregsel,
        id: a.id,
        irr: a.irr,
        // SAFETY: `bits` is the whole 64-bit redirection entry (the other member is a view).
        redirtbl: a.redirtbl.iter().map(|r| unsafe { r.bits }).collect(),
    };
    let p = fd.get_pit2().map_err(|e| Error::call("KVM_GET_PIT2", e))?;
    let pit = PitState {
        channels: p
            .channels
            .iter()
            .map(|c| PitChannelState {
                count: c.count,
                latched_count: c.latched_count,
                count_latched: c.count_latched,
                status_latched: c.status_latched,
                status: c.status,
                read_state: c.read_state,
                write_state: c.write_state,
                write_latch: c.write_latch,
                rw_mode: c.rw_mode,
                mode: c.mode,
                bcd: c.bcd,
                gate: c.gate,
                count_load_time: c.count_load_time,
            })
            .collect(),
        flags: p.flags,
    };
    Ok(([pic_from_kvm(&m), pic_from_kvm(&s)], ioapic, pit))
}

pub(crate) fn set_irqchips(
    fd: &VmFd,
    pic: &[PicState; 2],
    ioapic: &IoapicState,
    pit: &PitState,
) -> Result<()> {
    for (id, p) in [
        (KVM_IRQCHIP_PIC_MASTER, &pic[0]),
        (KVM_IRQCHIP_PIC_SLAVE, &pic[1]),
    ] {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        c.chip.pic = pic_to_kvm(p);
        fd.set_irqchip(&c)
            .map_err(|e| Error::call("KVM_SET_IRQCHIP", e))?;
    }
    let mut c = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    // SAFETY: writing the `ioapic` member of a zeroed union that KVM reads as an IOAPIC
    // (chip_id); every field is plain data.
    unsafe {
        c.chip.ioapic.base_address = ioapic.base_address;
        c.chip.ioapic.ioregsel = ioapic.ioregsel;
        c.chip.ioapic.id = ioapic.id;
        c.chip.ioapic.irr = ioapic.irr;
        for (dst, src) in c.chip.ioapic.redirtbl.iter_mut().zip(&ioapic.redirtbl) {
            dst.bits = *src;
        }
    }
    fd.set_irqchip(&c)
        .map_err(|e| Error::call("KVM_SET_IRQCHIP", e))?;
    let mut p = kvm_pit_state2 {
        flags: pit.flags,
        ..Default::default()
    };
    for (dst, c) in p.channels.iter_mut().zip(&pit.channels) {
        dst.count = c.count;
        dst.latched_count = c.latched_count;
        dst.count_latched = c.count_latched;
        dst.status_latched = c.status_latched;
        dst.status = c.status;
        dst.read_state = c.read_state;
        dst.write_state = c.write_state;
        dst.write_latch = c.write_latch;
        dst.rw_mode = c.rw_mode;
        dst.mode = c.mode;
        dst.bcd = c.bcd;
        dst.gate = c.gate;
        dst.count_load_time = c.count_load_time;
    }
    fd.set_pit2(&p).map_err(|e| Error::call("KVM_SET_PIT2", e))
}

pub(crate) fn get_clock(fd: &VmFd) -> Result<u64> {
    Ok(fd
        .get_clock()
        .map_err(|e| Error::call("KVM_GET_CLOCK", e))?
        .clock)
}

pub(crate) fn set_clock(fd: &VmFd, ns: u64) -> Result<()> {
    let c = kvm_clock_data {
        clock: ns,
        ..Default::default()
    };
    fd.set_clock(&c)
        .map_err(|e| Error::call("KVM_SET_CLOCK", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let v = VcpuEvents {
            exception_injected: true,
            exception_nr: 14,
            exception_has_error_code: true,
            exception_error_code: 2,
            interrupt_injected: true,
            interrupt_nr: 0x30,
            interrupt_shadow: 1,
            nmi_pending: true,
            nmi_masked: true,
            sipi_vector: 0x9a,
            ..Default::default()
        };
        assert_eq!(events_from_kvm(&events_to_kvm(&v)), v);
        assert_ne!(events_to_kvm(&v).flags & KVM_VCPUEVENT_VALID_SHADOW, 0);
    }

    #[test]
    fn pic_round_trip() {
        let p = PicState {
            irr: 1,
            imr: 0xfb,
            irq_base: 0x20,
            elcr: 0x0c,
            elcr_mask: 0xf8,
            init4: 1,
            ..Default::default()
        };
        assert_eq!(pic_from_kvm(&pic_to_kvm(&p)), p);
    }
}
