//! MSI vectors and I/O events through the `Vm` trait, on both backends.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vireo_hv::emu::EmuHypervisor;
use vireo_hv::kvm::KvmHypervisor;
use vireo_hv::{
    CpuEvent, Datamatch, EventFd, GuestClock, GuestMemory, Hypervisor, IoEventAddress, Kicker,
    LapicState, MsiMessage, UserIrqChip, VmParams,
};
use vm_memory::GuestAddress;

/// An interrupt controller that records the MSIs it is sent.
#[derive(Default)]
struct RecordingChip {
    msis: Mutex<Vec<MsiMessage>>,
}

impl UserIrqChip for RecordingChip {
    fn clock(&self) -> GuestClock {
        GuestClock::default()
    }
    fn attach_vcpu(&self, _id: u32, _waker: Arc<dyn Kicker>) {}
    fn lapic_read(&self, _id: u32, _offset: u32) -> u32 {
        0
    }
    fn lapic_write(&self, _id: u32, _offset: u32, _value: u32) {}
    fn lapic_write_icr(&self, _id: u32, _value: u64) {}
    fn tsc_deadline(&self, _id: u32) -> u64 {
        0
    }
    fn set_tsc_deadline(&self, _id: u32, _deadline: u64) {}
    fn apic_base(&self, _id: u32) -> u64 {
        0xfee0_0900
    }
    fn set_apic_base(&self, _id: u32, _value: u64) {}
    fn take_event(&self, _id: u32, _interruptible: bool) -> Option<CpuEvent> {
        None
    }
    fn has_interrupt(&self, _id: u32) -> bool {
        false
    }
    fn next_deadline(&self, _id: u32) -> Option<Instant> {
        None
    }
    fn set_irq(&self, _gsi: u32, _level: bool) {}
    fn send_msi(&self, msi: MsiMessage) {
        self.msis.lock().unwrap().push(msi);
    }
    fn lapic_state(&self, _id: u32) -> LapicState {
        LapicState::default()
    }
    fn set_lapic_state(&self, _id: u32, _state: &LapicState) {}
}

fn params(chip: Option<Arc<dyn UserIrqChip>>) -> VmParams {
    VmParams {
        memory: GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        vcpus: 1,
        user_irqchip: chip,
        private_pages: 0xfeff_c000,
    }
}

#[test]
fn emu_vectors_send_their_current_route() {
    let chip = Arc::new(RecordingChip::default());
    let vm = EmuHypervisor::new()
        .create_vm(&params(Some(chip.clone())))
        .unwrap();
    let v = vm.msi_vector().unwrap();
    v.trigger(); // not connected: dropped
    assert!(chip.msis.lock().unwrap().is_empty());
    let m = MsiMessage {
        address: 0xfee0_0000,
        data: 0x31,
    };
    v.set_route(Some(m)).unwrap();
    v.trigger();
    v.trigger();
    v.set_route(None).unwrap();
    v.trigger();
    assert_eq!(*chip.msis.lock().unwrap(), vec![m, m]);
    // The emulator does not take I/O events in the backend: the bus device must signal.
    let fd = EventFd::new(0).unwrap();
    assert!(!vm
        .register_ioevent(IoEventAddress::Mmio(0xc000_3000), Datamatch::Any, &fd)
        .unwrap());
    vm.unregister_ioevent(IoEventAddress::Mmio(0xc000_3000), Datamatch::Any, &fd)
        .unwrap();
}

#[test]
fn kvm_vectors_and_ioevents_are_accepted_by_the_kernel() {
    let Ok(h) = KvmHypervisor::new() else {
        eprintln!("SKIP kvm_vectors_and_ioevents_are_accepted_by_the_kernel: no usable /dev/kvm");
        return;
    };
    let vm = h.create_vm(&params(None)).unwrap();
    // Many vectors, each with its own GSI; routes set, changed and removed.
    let vectors: Vec<_> = (0..40).map(|_| vm.msi_vector().unwrap()).collect();
    for (i, v) in vectors.iter().enumerate() {
        v.set_route(Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x40 + i as u32,
        }))
        .unwrap();
        v.trigger();
    }
    vectors[3].set_route(None).unwrap();
    vectors[3].trigger();
    drop(vectors);
    // The legacy lines still work after the routing table was replaced.
    vm.irq_line(4).unwrap().pulse();
    let v = vm.msi_vector().unwrap();
    v.set_route(Some(MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    }))
    .unwrap();

    let fd = EventFd::new(0).unwrap();
    let addr = IoEventAddress::Mmio(0xc000_3000);
    assert!(vm.register_ioevent(addr, Datamatch::Any, &fd).unwrap());
    // The same registration twice is refused by KVM (EEXIST).
    assert!(vm.register_ioevent(addr, Datamatch::Any, &fd).is_err());
    vm.unregister_ioevent(addr, Datamatch::Any, &fd).unwrap();
    // Unregistering again is harmless.
    vm.unregister_ioevent(addr, Datamatch::Any, &fd).unwrap();
    let pio = IoEventAddress::Pio(0x510);
    assert!(vm.register_ioevent(pio, Datamatch::U16(3), &fd).unwrap());
    vm.unregister_ioevent(pio, Datamatch::U16(3), &fd).unwrap();
}
