//! System-level tests of the emulator through the public `Vcpu` interface: modes, paging,
//! exceptions and interrupts, privilege changes, MSRs, HLT/kick, self-modifying code, SMP.

mod emu_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use emu_common::*;
use iced_x86::code_asm::*;
use vireo_hv::irqchip::CpuEvent;
use vireo_hv::{CpuidEntry, GuestMemory, MpState, Regs, Segment, Sregs, UserIrqChip, Vcpu, VmExit};
use vm_memory::GuestAddress;

/// Where exception handlers record what they saw.
const REC: u64 = DATA + 0x800;
const HANDLERS: u64 = 0x20000;
const USER_CODE: u64 = 0x30000;
const USER_STACK: u64 = 0x70000;

/// A handler for vector `v` that stores CR2, the error code (if `err`), and the interrupt
/// frame (RIP, CS, RFLAGS, RSP, SS) plus its own RSP at `REC`, then exits with `v`.
fn recorder(m: &Machine, v: u8, err: bool) -> u64 {
    let at = HANDLERS + v as u64 * 0x100;
    let code = asm64(at, |a| {
        a.mov(qword_ptr(REC + 0x40), rsp).unwrap();
        if err {
            a.pop(rax).unwrap();
        } else {
            a.mov(rax, -1i64).unwrap();
        }
        a.mov(qword_ptr(REC), rax).unwrap();
        a.mov(rax, cr2).unwrap();
        a.mov(qword_ptr(REC + 0x38), rax).unwrap();
        for i in 0..5 {
            a.mov(rax, qword_ptr(rsp + 8 * i)).unwrap();
            a.mov(qword_ptr(REC + 8 + 8 * i as u64), rax).unwrap();
        }
        a.mov(al, v as u32).unwrap();
        exit(a);
    });
    m.write(at, &code);
    m.set_gate(v, at, false, 0, 0);
    at
}

struct Frame {
    err: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
    cr2: u64,
    handler_rsp: u64,
}

fn frame(m: &Machine) -> Frame {
    Frame {
        err: m.r64(REC),
        rip: m.r64(REC + 8),
        cs: m.r64(REC + 16),
        rflags: m.r64(REC + 24),
        rsp: m.r64(REC + 32),
        ss: m.r64(REC + 40),
        cr2: m.r64(REC + 0x38),
        handler_rsp: m.r64(REC + 0x40),
    }
}

/// Segments for CPL 3 in 64-bit mode.
fn user_sregs() -> Sregs {
    let mut s = Machine::long_sregs();
    s.cs = seg64(USER_CS, true, 3);
    s.ss = seg64(USER_DS, false, 3);
    s.ds = s.ss;
    s.es = s.ss;
    s
}

fn start_user(m: &Machine, v: &mut dyn Vcpu, code: &[u8]) {
    m.write(USER_CODE, code);
    v.set_sregs(&user_sregs()).unwrap();
    v.set_regs(&Regs {
        rip: USER_CODE,
        rsp: USER_STACK,
        rflags: 2,
        ..Regs::default()
    })
    .unwrap();
    v.set_mp_state(MpState::Runnable).unwrap();
}

#[test]
fn long_mode_arithmetic_and_exit() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        a.mov(rax, 40u64).unwrap();
        a.mov(rcx, 2u64).unwrap();
        a.add(rax, rcx).unwrap();
        a.mov(qword_ptr(DATA), rax).unwrap();
        a.push(rax).unwrap();
        a.pop(rdx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r64(DATA), 42);
    let r = v.regs().unwrap();
    assert_eq!(r.rax, 42);
    assert_eq!(r.rdx, 42);
    assert_eq!(r.rsp, STACK_TOP);
}

/// An AP woken by INIT + SIPI goes from real mode through 32-bit protected mode to long mode,
/// as the Linux SMP trampoline does.
#[test]
fn sipi_real_to_protected_to_long_mode() {
    let m = Machine::new(2);
    let _bsp = m.vcpu(0);
    let mut ap = m.vcpu(1);
    assert_eq!(ap.mp_state().unwrap(), MpState::Uninitialized);
    let gdtr = 0x8300u64;
    m.write(gdtr, &((10 * 8 - 1) as u16).to_le_bytes());
    m.write(gdtr + 2, &(GDT as u32).to_le_bytes());
    let real = asm(16, 0x8000, |a| {
        a.cli().unwrap();
        a.lgdt(dword_ptr(gdtr as u32)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        // jmp dword KERNEL32_CS:0x8040
        a.db(&[0x66, 0xea, 0x00, 0x81, 0, 0, KERNEL32_CS as u8, 0])
            .unwrap();
    });
    assert!(real.len() <= 0x100);
    m.write(0x8000, &real);
    let prot = asm(32, 0x8100, |a| {
        a.mov(ax, KERNEL_DS as u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(es, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(esp, 0x7000).unwrap();
        a.push(0x1234).unwrap();
        a.pop(ebx).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PML4 as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32 as i32).unwrap();
        a.mov(cr0, eax).unwrap();
        // jmp KERNEL_CS:0x8080
        a.db(&[0xea, 0x00, 0x82, 0, 0, KERNEL_CS as u8, 0]).unwrap();
    });
    assert!(prot.len() <= 0x100);
    m.write(0x8100, &prot);
    let long = asm64(0x8200, |a| {
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.mov(qword_ptr(DATA), rax).unwrap();
        a.mov(qword_ptr(DATA + 8), rbx).unwrap();
        a.mov(al, 0x64).unwrap();
        exit(a);
    });
    m.write(0x8200, &long);

    let chip = m.chip.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        chip.push(1, CpuEvent::Init);
        chip.push(1, CpuEvent::Sipi(0x08));
    });
    assert_eq!(run_to_exit(ap.as_mut(), &m.io), 0x64);
    t.join().unwrap();
    assert_eq!(m.r64(DATA), 0x1122_3344_5566_7788);
    assert_eq!(m.r64(DATA + 8) & 0xffff_ffff, 0x1234);
    let s = ap.sregs().unwrap();
    assert_eq!(s.efer & 0x500, 0x500, "LME and LMA");
    assert_eq!(s.cs.selector, KERNEL_CS);
    assert!(s.cs.l);
}

#[test]
fn page_faults_have_exact_error_codes_and_cr2() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 14, true);
    // 0x201000 not present; 0x202000 read-only; 0x203000 supervisor-only; 0x204000 NX;
    // 0x205000 has a reserved bit set.
    m.w64(PT + 8, 0);
    m.w64(PT + 2 * 8, 0x20_2000 | 0x5);
    m.w64(PT + 3 * 8, 0x20_3000 | 0x3);
    m.w64(PT + 4 * 8, 0x20_4000 | 0x7 | (1 << 63));
    m.w64(PT + 5 * 8, 0x20_5000 | 0x7 | (1 << 51));
    m.write(0x20_4000, &[0xc3]);

    let cases: Vec<(&str, Vec<u8>, u64, u64)> = vec![
        (
            "read not present",
            asm64(CODE, |a| a.mov(rax, qword_ptr(0x20_1008)).unwrap()),
            0x20_1008,
            0,
        ),
        (
            "write read-only (WP)",
            asm64(CODE, |a| a.mov(byte_ptr(0x20_2010), 1).unwrap()),
            0x20_2010,
            3,
        ),
        (
            "execute NX",
            asm64(CODE, |a| a.call(0x20_4000).unwrap()),
            0x20_4000,
            0x11,
        ),
        (
            "reserved bit",
            asm64(CODE, |a| a.mov(eax, dword_ptr(0x20_5004)).unwrap()),
            0x20_5004,
            9,
        ),
        (
            "write crossing into not-present page",
            asm64(CODE, |a| a.mov(qword_ptr(0x20_0ffc), rax).unwrap()),
            0x20_1000,
            2,
        ),
    ];
    for (name, code, want_cr2, err) in cases {
        m.load_long(v.as_mut(), &code, CODE);
        assert_eq!(run_to_exit(v.as_mut(), &m.io), 14, "{name}");
        let f = frame(&m);
        assert_eq!(f.cr2, want_cr2, "{name}: CR2");
        assert_eq!(f.err, err, "{name}: error code");
        let fault_rip = if name == "execute NX" {
            0x20_4000
        } else {
            CODE
        };
        assert_eq!(f.rip, fault_rip, "{name}: RIP of the faulting instruction");
    }
    // The crossing write must not have written its first half.
    assert_eq!(m.r32(0x20_0ffc), 0);

    // From CPL 3: read a supervisor page, write a not-present page.
    for (code, want_cr2, err) in [
        (
            asm64(USER_CODE, |a| a.mov(eax, dword_ptr(0x20_3000)).unwrap()),
            0x20_3000,
            5,
        ),
        (
            asm64(USER_CODE, |a| a.mov(dword_ptr(0x20_1000), eax).unwrap()),
            0x20_1000,
            6,
        ),
    ] {
        start_user(&m, v.as_mut(), &code);
        assert_eq!(run_to_exit(v.as_mut(), &m.io), 14);
        let f = frame(&m);
        assert_eq!((f.cr2, f.err), (want_cr2, err));
        assert_eq!(f.cs, USER_CS as u64);
        assert_eq!(f.ss, USER_DS as u64);
        assert_eq!(f.rsp, USER_STACK);
        assert_eq!(f.handler_rsp, RSP0_TOP - 48, "stack switched to TSS.RSP0");
    }
}

#[test]
fn accessed_and_dirty_bits() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        a.mov(rax, qword_ptr(0x20_6000)).unwrap();
        a.mov(qword_ptr(0x20_7000), rax).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r64(PT + 6 * 8) & 0x60, 0x20, "read: A only");
    assert_eq!(m.r64(PT + 7 * 8) & 0x60, 0x60, "write: A and D");
    assert_ne!(m.r64(PD + 8) & 0x20, 0, "A on the PDE");
    // After INVLPG, a cleared D bit is set again by the next write.
    m.w64(PT + 7 * 8, 0x20_7000 | 7);
    let code = asm64(CODE, |a| {
        a.mov(rax, 0x20_7000u64).unwrap();
        a.invlpg(byte_ptr(rax)).unwrap();
        a.mov(qword_ptr(rax), rax).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r64(PT + 7 * 8) & 0x60, 0x60);
}

#[test]
fn interrupt_gates_switch_stacks_on_privilege_change_and_ist() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    // Vector 0x80: DPL 3 gate, no IST.
    recorder(&m, 0x80, false);
    m.set_gate(0x80, HANDLERS + 0x80 * 0x100, false, 3, 0);
    let code = asm64(USER_CODE, |a| {
        a.mov(rax, 7u64).unwrap();
        a.int(0x80).unwrap();
    });
    start_user(&m, v.as_mut(), &code);
    v.set_regs(&Regs {
        rip: USER_CODE,
        rsp: USER_STACK - 8,
        rflags: 0x202,
        ..Regs::default()
    })
    .unwrap();
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x80);
    let f = frame(&m);
    assert_eq!(
        f.rip,
        USER_CODE + code.len() as u64,
        "INT n pushes the next RIP"
    );
    assert_eq!(f.cs, USER_CS as u64);
    assert_eq!(f.rsp, USER_STACK - 8);
    assert_eq!(f.ss, USER_DS as u64);
    assert_eq!(f.rflags & 0x200, 0x200);
    assert_eq!(f.handler_rsp, RSP0_TOP - 40);
    let s = v.sregs().unwrap();
    assert_eq!(s.cs.selector, KERNEL_CS);
    assert_eq!(
        s.ss.selector, 0,
        "SS is the null selector after a 64-bit privilege change"
    );
    assert_eq!(
        v.regs().unwrap().rflags & 0x200,
        0,
        "interrupt gate cleared IF"
    );

    // Vector 0x81 with IST 1, from CPL 0: the stack is IST1 (16-byte aligned) even without a
    // privilege change.
    recorder(&m, 0x81, false);
    m.set_gate(0x81, HANDLERS + 0x81 * 0x100, false, 0, 1);
    let code = asm64(CODE, |a| a.int(0x81).unwrap());
    m.load_long(v.as_mut(), &code, CODE);
    v.set_regs(&Regs {
        rip: CODE,
        rsp: STACK_TOP - 4,
        rflags: 2,
        ..Regs::default()
    })
    .unwrap();
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x81);
    let f = frame(&m);
    assert_eq!(f.handler_rsp, IST1_TOP - 40);
    assert_eq!(f.rsp, STACK_TOP - 4);
    assert_eq!(f.ss, KERNEL_DS as u64);

    // INT to a DPL-0 gate from CPL 3: #GP with the IDT error code.
    recorder(&m, 13, true);
    m.set_gate(0x82, HANDLERS, false, 0, 0);
    let code = asm64(USER_CODE, |a| a.int(0x82).unwrap());
    start_user(&m, v.as_mut(), &code);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 13);
    let f = frame(&m);
    assert_eq!(f.err, 0x82 * 8 + 2);
    assert_eq!(f.rip, USER_CODE);
}

#[test]
fn syscall_and_sysret() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let star = ((USER32_CS as u64) << 48) | ((KERNEL_CS as u64) << 32);
    let entry = HANDLERS;
    let handler = asm64(entry, |a| {
        a.mov(qword_ptr(REC), rcx).unwrap();
        a.mov(qword_ptr(REC + 8), r11).unwrap();
        a.mov(ax, cs).unwrap();
        a.mov(word_ptr(REC + 16), ax).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(word_ptr(REC + 24), ax).unwrap();
        a.pushfq().unwrap();
        a.pop(rax).unwrap();
        a.mov(qword_ptr(REC + 32), rax).unwrap();
        a.mov(al, 0x55).unwrap();
        exit(a);
    });
    m.write(entry, &handler);
    let user = asm64(USER_CODE, |a| {
        a.mov(ax, cs).unwrap();
        a.mov(word_ptr(REC + 40), ax).unwrap();
        a.mov(eax, 42).unwrap();
        a.syscall().unwrap();
    });
    m.write(USER_CODE, &user);
    let kernel = asm64(CODE, |a| {
        for (msr, val) in [
            (0xc000_0081u32, star),
            (0xc000_0082, entry),
            (0xc000_0084, 0x200),
        ] {
            a.mov(ecx, msr).unwrap();
            a.mov(eax, val as u32).unwrap();
            a.mov(edx, (val >> 32) as u32).unwrap();
            a.wrmsr().unwrap();
        }
        a.mov(rcx, USER_CODE).unwrap();
        a.mov(r11, 0x202u64).unwrap();
        a.mov(rsp, USER_STACK).unwrap();
        a.sysretq().unwrap();
    });
    m.load_long(v.as_mut(), &kernel, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x55);
    assert_eq!(
        m.r64(REC + 40) & 0xffff,
        USER_CS as u64,
        "SYSRET entered CPL 3"
    );
    assert_eq!(
        m.r64(REC),
        USER_CODE + user.len() as u64,
        "RCX = return RIP"
    );
    assert_eq!(m.r64(REC + 8) & 0x200, 0x200, "R11 = user RFLAGS");
    assert_eq!(m.r64(REC + 16) & 0xffff, KERNEL_CS as u64);
    assert_eq!(m.r64(REC + 24) & 0xffff, KERNEL_DS as u64);
    assert_eq!(m.r64(REC + 32) & 0x200, 0, "FMASK cleared IF");
    assert_eq!(v.regs().unwrap().rax & 0xff, 0x55);
}

#[test]
fn iretq_to_user_and_back() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 0x80, false);
    m.set_gate(0x80, HANDLERS + 0x80 * 0x100, false, 3, 0);
    let user = asm64(USER_CODE, |a| {
        a.pushfq().unwrap();
        a.pop(rbx).unwrap();
        a.int(0x80).unwrap();
    });
    m.write(USER_CODE, &user);
    let kernel = asm64(CODE, |a| {
        a.push(USER_DS as i32).unwrap();
        a.push(USER_STACK as i32).unwrap();
        a.push(0x3202).unwrap(); // IF and IOPL 3
        a.push(USER_CS as i32).unwrap();
        a.push(USER_CODE as i32).unwrap();
        a.iretq().unwrap();
    });
    m.load_long(v.as_mut(), &kernel, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x80);
    let f = frame(&m);
    assert_eq!(f.cs, USER_CS as u64);
    assert_eq!(f.ss, USER_DS as u64);
    assert_eq!(f.rsp, USER_STACK);
    assert_eq!(
        v.regs().unwrap().rbx & 0x3200,
        0x3200,
        "user saw IF and IOPL"
    );

    // IRETQ from the handler back to user mode, which then exits (IOPL 3 allows OUT).
    let user2 = asm64(USER_CODE, |a| {
        a.mov(al, 0x33).unwrap();
        exit(a);
    });
    m.write(USER_CODE + 0x100, &user2);
    let kernel = asm64(CODE, |a| {
        a.push(USER_DS as i32).unwrap();
        a.push(USER_STACK as i32).unwrap();
        a.push(0x3002).unwrap();
        a.push(USER_CS as i32).unwrap();
        a.push((USER_CODE + 0x100) as i32).unwrap();
        a.iretq().unwrap();
    });
    m.load_long(v.as_mut(), &kernel, CODE);
    // `hlt` at CPL 3 is #GP: the recorder for 13 exits with 13 after the OUT of 0x33.
    recorder(&m, 13, true);
    run_to_exit(v.as_mut(), &m.io);
    assert!(m
        .io
        .pio
        .lock()
        .unwrap()
        .iter()
        .any(|(p, d)| *p == EXIT_PORT && d[0] == 0x33));
    assert_eq!(frame(&m).cs, USER_CS as u64);
}

#[test]
fn triple_fault_is_shutdown() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| a.ud2().unwrap());
    m.load_long(v.as_mut(), &code, CODE);
    let mut s = Machine::long_sregs();
    s.idt.limit = 0;
    v.set_sregs(&s).unwrap();
    assert_eq!(
        run_for(v.as_mut(), &m.io, Duration::from_secs(5)),
        VmExit::Shutdown
    );
}

#[test]
fn fault_while_delivering_page_fault_is_double_fault() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 8, true);
    // IDT[14] is not present: delivering #PF raises #NP, which makes #DF.
    m.w64(IDT + 14 * 16, 0);
    let code = asm64(CODE, |a| a.mov(rax, qword_ptr(0x20_1000)).unwrap());
    m.w64(PT + 8, 0);
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 8);
    assert_eq!(frame(&m).err, 0);
    assert_eq!(frame(&m).rip, CODE);
}

#[test]
fn unknown_msr_raises_gp() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 13, true);
    let code = asm64(CODE, |a| {
        a.mov(ecx, 0x1234_5678).unwrap();
        a.rdmsr().unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 13);
    let f = frame(&m);
    assert_eq!(f.err, 0);
    assert_eq!(f.rip, CODE + 5, "RIP of the RDMSR");
    // A known MSR works: LSTAR round trip, and a non-canonical LSTAR is #GP.
    let code = asm64(CODE, |a| {
        a.mov(ecx, 0xc000_0082u32).unwrap();
        a.mov(eax, 0x1234_5000).unwrap();
        a.mov(edx, 0xffff_8000u32).unwrap();
        a.wrmsr().unwrap();
        a.xor(eax, eax).unwrap();
        a.xor(edx, edx).unwrap();
        a.rdmsr().unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        a.mov(dword_ptr(DATA + 4), edx).unwrap();
        a.mov(edx, 0x0000_8000).unwrap();
        a.wrmsr().unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 13);
    assert_eq!(m.r64(DATA), 0xffff_8000_1234_5000);
}

#[test]
fn hlt_sleeps_until_an_interrupt_without_spinning() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let h = asm64(HANDLERS, |a| {
        a.mov(al, 0x40).unwrap();
        exit(a);
    });
    m.write(HANDLERS, &h);
    m.set_gate(0x40, HANDLERS, false, 0, 0);
    let code = asm64(CODE, |a| {
        a.sti().unwrap();
        a.hlt().unwrap();
        a.jmp(CODE).unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    let chip = m.chip.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        chip.push(0, CpuEvent::Interrupt(0x40));
    });
    let cpu0 = thread_cpu_time();
    let wall = Instant::now();
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x40);
    let cpu = thread_cpu_time() - cpu0;
    t.join().unwrap();
    assert!(wall.elapsed() >= Duration::from_millis(190));
    assert!(
        cpu < Duration::from_millis(60),
        "halted vCPU used {cpu:?} of CPU"
    );

    // The APIC timer (a deadline in the interrupt controller) wakes HLT too.
    m.load_long(v.as_mut(), &code, CODE);
    m.chip
        .arm_timer(0, Instant::now() + Duration::from_millis(100), 0x40);
    let cpu0 = thread_cpu_time();
    let wall = Instant::now();
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x40);
    assert!(wall.elapsed() >= Duration::from_millis(95));
    assert!(thread_cpu_time() - cpu0 < Duration::from_millis(60));
}

#[test]
fn kick_ends_hlt_and_endless_loops() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    let k = v.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        k.kick();
    });
    let cpu0 = thread_cpu_time();
    assert_eq!(v.run(m.io.as_ref()).unwrap(), VmExit::Interrupted);
    assert!(thread_cpu_time() - cpu0 < Duration::from_millis(50));
    t.join().unwrap();
    assert_eq!(v.mp_state().unwrap(), MpState::Halted);

    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.inc(rax).unwrap();
        a.jmp(l).unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    let k = v.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        k.kick();
    });
    let start = Instant::now();
    assert_eq!(v.run(m.io.as_ref()).unwrap(), VmExit::Interrupted);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(v.regs().unwrap().rax > 1000);
    t.join().unwrap();
    // A kick before `run` makes the next `run` return at once.
    v.kicker().kick();
    assert_eq!(v.run(m.io.as_ref()).unwrap(), VmExit::Interrupted);
}

#[test]
fn self_modifying_code_by_the_cpu() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    // `mov byte [target+1], 42` (8 bytes) then `target: mov eax, 0x11111111`.
    let target = CODE + 8;
    let code = asm64(CODE, |a| {
        a.mov(byte_ptr(target + 1), 42).unwrap();
        a.mov(eax, 0x1111_1111).unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        exit(a);
    });
    assert_eq!(code[8], 0xb8);
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 0x1111_112a);
    // Running it again executes the patched bytes from the start (cached block rebuilt).
    m.load_long(v.as_mut(), &m.read(CODE, code.len()), CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 0x1111_112a);
}

#[test]
fn self_modifying_code_by_a_device_write() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        a.mov(eax, 1).unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 1);
    // A "DMA" write through vm-memory replaces the immediate between runs.
    m.write(CODE + 1, &2u32.to_le_bytes());
    m.load_long(v.as_mut(), &m.read(CODE, code.len()), CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 2);

    // ... and while the guest is spinning on that code.
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.mov(eax, 0).unwrap();
        a.test(eax, eax).unwrap();
        a.jz(l).unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    let mem = m.mem.clone();
    let t = std::thread::spawn(move || {
        use vm_memory::Bytes;
        std::thread::sleep(Duration::from_millis(50));
        mem.write_slice(&7u32.to_le_bytes(), vm_memory::GuestAddress(CODE + 1))
            .unwrap();
    });
    run_to_exit(v.as_mut(), &m.io);
    t.join().unwrap();
    assert_eq!(m.r32(DATA), 7);
}

/// Run `code` at CODE with `target: mov eax, 0x11111111; ret` placed after it; the dword the
/// code stored at DATA.
fn run_with_target(m: &Machine, v: &mut dyn Vcpu, code: &[u8], target: u64) -> u32 {
    assert!(CODE + code.len() as u64 <= target);
    let t = asm64(target, |a| {
        a.mov(eax, 0x1111_1111).unwrap();
        a.ret().unwrap();
    });
    m.write(target, &t);
    m.load_long(v, code, CODE);
    run_to_exit(v, &m.io);
    m.r32(DATA)
}

/// `call target` twice with a store into `target`'s immediate in between (`target: mov eax,
/// imm32; ret` at `target`, a block of its own, cached by the first call).
fn patch_between_calls(target: u64) -> u32 {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        // A first store to the page (no code there yet) lets the patch below take the fast
        // path of stores.
        a.mov(byte_ptr(target + 0x10), 0).unwrap();
        a.mov(ecx, 2).unwrap();
        a.set_label(&mut l).unwrap();
        a.call(target).unwrap();
        a.mov(byte_ptr(target + 1), 42).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        exit(a);
    });
    run_with_target(&m, v.as_mut(), &code, target)
}

#[test]
fn self_modifying_code_in_another_block_of_the_page() {
    assert_eq!(patch_between_calls(CODE + 0x100), 0x1111_112a);
}

#[test]
fn self_modifying_code_in_another_page() {
    assert_eq!(patch_between_calls(CODE + 0x1000), 0x1111_112a);
    // The patched instruction straddles two pages.
    assert_eq!(patch_between_calls(CODE + 0x1ffe), 0x1111_112a);
}

/// `call target` four times (`target: mov eax, imm32; ret`), summing EAX, with a store of 42
/// at `target + off` after the second call.
fn patch_after_two_calls(target: u64, off: u64) -> u32 {
    patch_after_calls(target, off, 4, 2)
}

/// `call target` `calls` times, summing EAX, with a one-byte store of 42 at `target + off`
/// after call `after`; the sum the code stored at DATA.
fn patch_after_calls(target: u64, off: u64, calls: u32, after: u32) -> u32 {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = calls_with_a_patch(
        target,
        calls,
        after,
        |_| {},
        |a| {
            a.mov(byte_ptr(target + off), 42).unwrap();
        },
    );
    run_with_target(&m, v.as_mut(), &code, target)
}

/// Code that calls `target` `calls` times, summing EAX, runs `every` after each call and
/// `patch` after call `after`; it stores the sum at DATA.
fn calls_with_a_patch(
    target: u64,
    calls: u32,
    after: u32,
    every: impl FnOnce(&mut CodeAssembler),
    patch: impl FnOnce(&mut CodeAssembler),
) -> Vec<u8> {
    asm64(CODE, |a| {
        let mut l = a.create_label();
        let mut skip = a.create_label();
        // A first store to the page (no code there yet) lets a patching store take the fast
        // path of stores.
        a.mov(byte_ptr(target + 0x10), 0).unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(ecx, calls).unwrap();
        a.set_label(&mut l).unwrap();
        a.call(target).unwrap();
        a.add(edx, eax).unwrap();
        every(a);
        a.cmp(ecx, calls - after + 1).unwrap();
        a.jne(skip).unwrap();
        patch(a);
        a.set_label(&mut skip).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(l).unwrap();
        a.mov(dword_ptr(DATA), edx).unwrap();
        exit(a);
    })
}

#[test]
fn a_page_straddling_instruction_is_reused_until_either_page_changes() {
    // `mov eax, imm32` at two bytes before a page end: opcode and imm byte 0 in the first
    // page, imm bytes 1-3 in the second. Calls 2 and 4 reuse the decoded instruction.
    let sum = |patched: u32| {
        0x1111_1111u32
            .wrapping_mul(2)
            .wrapping_add(patched.wrapping_mul(2))
    };
    assert_eq!(patch_after_two_calls(CODE + 0x1ffe, 1), sum(0x1111_112a));
    assert_eq!(patch_after_two_calls(CODE + 0x1ffe, 3), sum(0x112a_1111));
    assert_eq!(patch_after_two_calls(CODE + 0x1ffe, 0x10), sum(0x1111_1111));
}

/// The guest runs `target: mov eax, imm32; mov [DATA], eax; ret` (caching it), lets `device`
/// rewrite the immediate to 7, waits for the flag at DATA + 8 without exits and runs `target`
/// again. The device starts on an `OUT` to port 0x80 (`by_port`), or, with no exit at all, on
/// its own thread once the guest stores 1 at DATA + 16.
fn patch_by_device(
    by_port: bool,
    device: impl Fn(GuestMemory, Arc<dyn vireo_hv::IrqLine>) + Send + Sync + 'static,
) -> u32 {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let target = PATCH_TARGET;
    let flag = DATA + 8;
    let code = asm64(CODE, |a| {
        let mut spin = a.create_label();
        a.call(target).unwrap();
        if by_port {
            a.out(0x80, al).unwrap();
        } else {
            a.mov(dword_ptr(DATA + 16), 1).unwrap();
        }
        a.set_label(&mut spin).unwrap();
        a.cmp(dword_ptr(flag), 0).unwrap();
        a.je(spin).unwrap();
        a.call(target).unwrap();
        exit(a);
    });
    let t = asm64(target, |a| {
        a.mov(eax, 1).unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        a.ret().unwrap();
    });
    m.write(target, &t);
    let mem = m.mem.clone();
    let line = m.vm.irq_line(5).unwrap();
    if by_port {
        let device = Arc::new(device);
        m.io.on_pio_write(0x80, move |_| device(mem.clone(), line.clone()));
    } else {
        std::thread::spawn(move || {
            use vm_memory::Bytes;
            while mem.read_obj::<u32>(GuestAddress(DATA + 16)).unwrap() == 0 {
                std::hint::spin_loop();
            }
            device(mem, line);
        });
    }
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    m.r32(DATA)
}

const PATCH_TARGET: u64 = CODE + 0x200;

fn write_patch(mem: &GuestMemory) {
    use vm_memory::Bytes;
    mem.write_slice(&7u32.to_le_bytes(), GuestAddress(PATCH_TARGET + 1))
        .unwrap();
}

fn set_flag(mem: &GuestMemory) {
    use vm_memory::Bytes;
    mem.write_obj(1u32, GuestAddress(DATA + 8)).unwrap();
}

#[test]
fn dma_into_code_during_an_io_exit() {
    // The device writes the code and the flag before the OUT returns.
    let got = patch_by_device(true, |mem, _| {
        write_patch(&mem);
        set_flag(&mem);
    });
    assert_eq!(got, 7);
}

#[test]
fn dma_into_code_after_an_io_exit() {
    // A device thread does the transfer later; the guest polls for its completion.
    let got = patch_by_device(true, |mem, _| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            write_patch(&mem);
            set_flag(&mem);
        });
    });
    assert_eq!(got, 7);
}

#[test]
fn dma_into_code_announced_by_an_interrupt() {
    // The transfer is announced by an interrupt line, and the guest sees the flag the device
    // writes after raising it.
    let got = patch_by_device(false, |mem, line| {
        write_patch(&mem);
        line.set_level(true);
        set_flag(&mem);
    });
    assert_eq!(got, 7);
}

#[test]
fn code_patched_by_another_vcpu() {
    // vCPU 0 runs `target`, waits for vCPU 1 to patch it and raise a flag, runs it again.
    let m = Machine::new(2);
    let target = CODE + 0x200;
    let flag = DATA + 8;
    // vCPU 1 is running (and its TLB holds the page of `target` as writable, so the patch
    // takes the fast path of stores) before vCPU 0 first runs `target`.
    let c0 = asm64(CODE, |a| {
        let mut ready = a.create_label();
        let mut spin = a.create_label();
        a.set_label(&mut ready).unwrap();
        a.cmp(dword_ptr(DATA + 32), 0).unwrap();
        a.je(ready).unwrap();
        a.call(target).unwrap();
        a.mov(dword_ptr(DATA + 16), 1).unwrap();
        a.set_label(&mut spin).unwrap();
        a.cmp(dword_ptr(flag), 0).unwrap();
        a.je(spin).unwrap();
        a.call(target).unwrap();
        a.mov(byte_ptr(DATA + 24), 1).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let c1 = asm64(CODE + 0x1000, |a| {
        let mut wait = a.create_label();
        a.mov(byte_ptr(target + 0x100), 0).unwrap();
        a.mov(dword_ptr(DATA + 32), 1).unwrap();
        a.set_label(&mut wait).unwrap();
        a.cmp(dword_ptr(DATA + 16), 0).unwrap();
        a.je(wait).unwrap();
        a.mov(dword_ptr(target + 1), 7).unwrap();
        a.mov(dword_ptr(flag), 1).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let t = asm64(target, |a| {
        a.mov(eax, 1).unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        a.ret().unwrap();
    });
    m.write(CODE, &c0);
    m.write(CODE + 0x1000, &c1);
    m.write(target, &t);
    let mut handles = Vec::new();
    let mut kickers = Vec::new();
    for id in 0..2u32 {
        let mut v = m.vm.create_vcpu(id).unwrap();
        v.set_sregs(&Machine::long_sregs()).unwrap();
        v.set_regs(&Regs {
            rip: CODE + id as u64 * 0x1000,
            rsp: STACK_TOP - id as u64 * 0x1000,
            rflags: 2,
            ..Regs::default()
        })
        .unwrap();
        v.set_mp_state(MpState::Runnable).unwrap();
        kickers.push(v.kicker());
        let io = m.io.clone();
        handles.push(std::thread::spawn(move || v.run(io.as_ref()).unwrap()));
    }
    let start = Instant::now();
    while m.read(DATA + 24, 1) != [1] {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "vCPU 0 did not finish"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for k in &kickers {
        k.kick();
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(m.r32(DATA), 7);
}

/// RFLAGS (arithmetic bits) after `mov eax, 0x7fffffff; add eax, 1`.
const ADD_FLAGS: u64 = 0x800 | 0x80 | 0x10 | 0x4; // OF SF AF PF

/// An instruction whose flags the rest of its block overwrites skips them, but they must be
/// exact wherever the CPU can stop after it: an exception, a single-step trap, an interrupt
/// after an interrupt shadow.
#[test]
fn skipped_flags_are_exact_at_a_fault() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 14, true);
    m.w64(PT + 8, 0); // 0x201000 not present
    let code = asm64(CODE, |a| {
        a.mov(eax, 0x7fff_ffff).unwrap();
        a.add(eax, 1).unwrap();
        a.mov(ecx, dword_ptr(0x20_1008)).unwrap();
        a.sub(ecx, ecx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 14);
    assert_eq!(frame(&m).rflags & 0x8d5, ADD_FLAGS);
}

#[test]
fn skipped_flags_are_exact_at_a_single_step_trap() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 1, false);
    let code = asm64(CODE, |a| {
        a.mov(eax, 0x7fff_ffff).unwrap();
        a.pushfq().unwrap();
        a.or(qword_ptr(rsp), 0x100).unwrap();
        a.popfq().unwrap();
        // The trap comes after the ADD; the SUB (same block) would overwrite its flags.
        a.add(eax, 1).unwrap();
        a.sub(ecx, ecx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 1);
    let f = frame(&m);
    assert_eq!(f.rflags & 0x8d5, ADD_FLAGS);
    assert_ne!(f.rflags & 0x100, 0, "TF");
}

#[test]
fn skipped_flags_are_exact_after_an_interrupt_shadow() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 0x40, false);
    let code = asm64(CODE, |a| {
        a.mov(eax, 0x7fff_ffff).unwrap();
        // The interrupt waiting since the start is taken after STI's shadow: after the ADD.
        a.sti().unwrap();
        a.add(eax, 1).unwrap();
        a.sub(ecx, ecx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    m.chip.push(0, CpuEvent::Interrupt(0x40));
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x40);
    let f = frame(&m);
    let add = asm64(0, |a| a.add(eax, 1).unwrap()).len() as u64;
    assert_eq!(f.rip, CODE + 5 + 1 + add, "after the ADD");
    assert_eq!(f.rflags & 0x8d5, ADD_FLAGS);
}

#[test]
fn locked_increments_from_two_vcpus_are_atomic() {
    let m = Machine::new(2);
    const N: u32 = 1_000_000;
    let counter = DATA;
    let lock = DATA + 64;
    let plain = DATA + 128;
    let done = DATA + 192;
    for id in 0..2u64 {
        let at = CODE + id * 0x1000;
        let code = asm64(at, |a| {
            let mut l = a.create_label();
            let mut spin = a.create_label();
            let mut got = a.create_label();
            a.mov(ecx, N).unwrap();
            a.set_label(&mut l).unwrap();
            a.lock().inc(qword_ptr(counter)).unwrap();
            // A spinlock (LOCK CMPXCHG) protecting a plain increment.
            a.set_label(&mut spin).unwrap();
            a.xor(eax, eax).unwrap();
            a.mov(edx, 1).unwrap();
            a.lock().cmpxchg(dword_ptr(lock), edx).unwrap();
            a.jz(got).unwrap();
            a.pause().unwrap();
            a.jmp(spin).unwrap();
            a.set_label(&mut got).unwrap();
            a.inc(qword_ptr(plain)).unwrap();
            a.mov(dword_ptr(lock), 0).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l).unwrap();
            a.mov(byte_ptr(done + id), 1).unwrap();
            a.cli().unwrap();
            a.hlt().unwrap();
        });
        m.write(at, &code);
    }
    let mut handles = Vec::new();
    let mut kickers = Vec::new();
    for id in 0..2u32 {
        let mut v = m.vm.create_vcpu(id).unwrap();
        v.set_sregs(&Machine::long_sregs()).unwrap();
        v.set_regs(&Regs {
            rip: CODE + id as u64 * 0x1000,
            rsp: STACK_TOP - id as u64 * 0x1000,
            rflags: 2,
            ..Regs::default()
        })
        .unwrap();
        v.set_mp_state(MpState::Runnable).unwrap();
        kickers.push(v.kicker());
        let io = m.io.clone();
        handles.push(std::thread::spawn(move || v.run(io.as_ref()).unwrap()));
    }
    let start = Instant::now();
    while m.read(done, 2) != [1, 1] {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "vCPUs did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for k in &kickers {
        k.kick();
    }
    for h in handles {
        assert_eq!(h.join().unwrap(), VmExit::Interrupted);
    }
    assert_eq!(m.r64(counter), 2 * N as u64);
    assert_eq!(m.r64(plain), 2 * N as u64);
}

#[test]
fn kvmclock_and_tsc() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let area = DATA + 0x40;
    let wall = DATA + 0x80;
    let code = asm64(CODE, |a| {
        a.mov(ecx, 0x4b56_4d01u32).unwrap();
        a.mov(eax, (area | 1) as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x4b56_4d00u32).unwrap();
        a.mov(eax, wall as u32).unwrap();
        a.wrmsr().unwrap();
        a.rdtsc().unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        a.mov(dword_ptr(DATA + 4), edx).unwrap();
        a.rdtsc().unwrap();
        a.mov(dword_ptr(DATA + 8), eax).unwrap();
        a.mov(dword_ptr(DATA + 12), edx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    let (t0, t1) = (m.r64(DATA), m.r64(DATA + 8));
    assert!(t1 > t0, "TSC advances");
    let version = m.r32(area);
    assert_eq!(version % 2, 0, "version is even after the update");
    let tsc_ts = m.r64(area + 8);
    let sys = m.r64(area + 16);
    let mul = m.r32(area + 24);
    let shift = m.read(area + 28, 1)[0] as i8;
    let flags = m.read(area + 29, 1)[0];
    assert_eq!(flags & 1, 1, "PVCLOCK_TSC_STABLE_BIT");
    assert!(tsc_ts <= t0);
    // Guest time at the TSC read, per the pvclock formula, is close to system_time.
    let delta = t0 - tsc_ts;
    let d = if shift >= 0 {
        delta << shift
    } else {
        delta >> -shift
    };
    let ns = sys + ((d as u128 * mul as u128) >> 32) as u64;
    assert!(ns >= sys && ns - sys < 1_000_000_000);
    let sec = m.r32(wall + 4) as u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(sec) < 60, "wall clock {sec} vs host {now}");
}

#[test]
fn real_mode_interrupt_through_the_ivt() {
    let m = Machine::new(2);
    let _bsp = m.vcpu(0);
    let mut ap = m.vcpu(1);
    // IVT[0x21] = 0000:9000
    m.write(0x21 * 4, &[0x00, 0x90, 0x00, 0x00]);
    let h = asm(16, 0x9000, |a| {
        a.mov(bl, 0x77).unwrap();
        a.iret().unwrap();
    });
    m.write(0x9000, &h);
    let code = asm(16, 0x8000, |a| {
        a.mov(sp, 0x7000).unwrap();
        a.int(0x21).unwrap();
        a.mov(al, bl).unwrap();
        a.out(EXIT_PORT as i32, al).unwrap();
        a.hlt().unwrap();
    });
    m.write(0x8000, &code);
    m.chip.push(1, CpuEvent::Sipi(0x08));
    assert_eq!(run_to_exit(ap.as_mut(), &m.io), 0x77);
    assert_eq!(ap.regs().unwrap().rsp & 0xffff, 0x7000);
}

#[test]
fn mmio_and_local_apic_accesses() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    // Map 0xc0000000-0xffffffff with one 1 GiB page.
    m.w64(PDPT + 3 * 8, 0xc000_0000 | 0x83);
    let code = asm64(CODE, |a| {
        a.mov(rbx, 0xd000_0000u64).unwrap();
        a.mov(eax, dword_ptr(rbx + 0x10)).unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        a.mov(dword_ptr(rbx + 0x20), 0x1234_5678).unwrap();
        a.mov(word_ptr(rbx + 0xffe), 0x4321).unwrap();
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(eax, dword_ptr(rbx + 0x20)).unwrap();
        a.mov(dword_ptr(DATA + 4), eax).unwrap();
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 0x5a5a_5a5a);
    assert!(m.io.mmio_reads.lock().unwrap().contains(&(0xd000_0010, 4)));
    let w = m.io.mmio.lock().unwrap().clone();
    assert!(w.contains(&(0xd000_0020, 0x1234_5678u32.to_le_bytes().to_vec())));
    assert!(w.contains(&(0xd000_0ffe, vec![0x21, 0x43])));
    assert_eq!(m.r32(DATA + 4), 0, "APIC ID register of vCPU 0");
    assert!(m.chip.lapic_writes.lock().unwrap().contains(&(0, 0xb0, 0)));
    assert!(
        !w.iter().any(|(a, _)| *a >= 0xfee0_0000),
        "APIC accesses bypass the bus"
    );
}

#[test]
fn x2apic_msrs_go_to_the_interrupt_controller() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 13, true);
    let code = asm64(CODE, |a| {
        // Enable x2APIC mode (EN | EXTD | BSP).
        a.mov(ecx, 0x1b).unwrap();
        a.mov(eax, 0xfee0_0d00u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x80b).unwrap();
        a.xor(eax, eax).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x830).unwrap();
        a.mov(eax, 0x4030).unwrap();
        a.mov(edx, 1).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x802).unwrap();
        a.rdmsr().unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0);
    let w = m.chip.lapic_writes.lock().unwrap().clone();
    assert!(w.contains(&(0, 0xb0, 0)), "EOI");
    assert!(w.contains(&(0, 0x300, 0x4030)), "ICR");
    assert_eq!(v.sregs().unwrap().apic_base & 0xc00, 0xc00);
}

#[test]
fn cpuid_reports_the_table_and_set_cpuid_overrides_it() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        a.xor(eax, eax).unwrap();
        a.cpuid().unwrap();
        a.mov(dword_ptr(DATA), ebx).unwrap();
        a.mov(dword_ptr(DATA + 4), edx).unwrap();
        a.mov(dword_ptr(DATA + 8), ecx).unwrap();
        a.mov(eax, 0x4000_0000).unwrap();
        a.cpuid().unwrap();
        a.mov(dword_ptr(DATA + 12), ebx).unwrap();
        a.mov(eax, 0x12).unwrap();
        a.cpuid().unwrap();
        a.mov(dword_ptr(DATA + 16), eax).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(&m.read(DATA, 12), b"GenuineIntel");
    assert_eq!(&m.read(DATA + 12, 4), b"KVMK");
    let mut table = m.vm.supported_cpuid().unwrap();
    table.push(CpuidEntry {
        function: 0x12,
        eax: 0xabcd,
        ..CpuidEntry::default()
    });
    v.set_cpuid(&table).unwrap();
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA + 16), 0xabcd);
}

#[test]
fn extensions_not_in_cpuid_are_ud() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 6, false);
    // SSE3 is not advertised, so HADDPS must fault.
    let code = asm64(CODE, |a| a.haddps(xmm0, xmm1).unwrap());
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 6);
    assert_eq!(frame(&m).rip, CODE);
}

#[test]
fn lock_prefix_on_nop_is_ud() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 6, false);
    m.load_long(v.as_mut(), &[0xf0, 0x90], CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 6);
    assert_eq!(frame(&m).rip, CODE);
}

#[test]
fn string_io_and_port_io() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    m.io.pio_in
        .lock()
        .unwrap()
        .insert(0x60, (1..=8u8).collect());
    let code = asm64(CODE, |a| {
        a.mov(dx, 0x60).unwrap();
        a.mov(rdi, DATA).unwrap();
        a.mov(ecx, 4).unwrap();
        a.rep().insw().unwrap();
        a.mov(rsi, DATA).unwrap();
        a.mov(dx, 0x3f8).unwrap();
        a.mov(ecx, 3).unwrap();
        a.rep().outsb().unwrap();
        a.in_(al, 0x61).unwrap();
        a.mov(byte_ptr(DATA + 16), al).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.read(DATA, 8), (1..=8u8).collect::<Vec<_>>());
    assert_eq!(m.read(DATA + 16, 1), [0xa5]);
    let out: Vec<u8> =
        m.io.pio
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == 0x3f8)
            .map(|(_, d)| d[0])
            .collect();
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn rep_movs_across_pages_and_huge_counts_stay_kickable() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let src = DATA + 0x1000 - 13;
    let pattern: Vec<u8> = (0..10000u32).map(|i| (i * 7 + 3) as u8).collect();
    m.write(src, &pattern);
    let code = asm64(CODE, |a| {
        a.mov(rsi, src).unwrap();
        a.mov(rdi, DATA + 0x10000 + 5).unwrap();
        a.mov(ecx, 10000).unwrap();
        a.rep().movsb().unwrap();
        a.mov(rdi, DATA + 0x20000).unwrap();
        a.mov(rax, 0x0102_0304_0506_0708u64).unwrap();
        a.mov(ecx, 1000).unwrap();
        a.rep().stosq().unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.read(DATA + 0x10000 + 5, 10000), pattern);
    assert_eq!(m.r64(DATA + 0x20000 + 999 * 8), 0x0102_0304_0506_0708);
    assert_eq!(m.r64(DATA + 0x20000 + 1000 * 8), 0);
    let r = v.regs().unwrap();
    assert_eq!(r.rcx, 0);
    assert_eq!(r.rdi, DATA + 0x20000 + 8000);

    // rep stosb over (almost) all of RAM, kicked before it finishes: RCX shows progress and
    // the instruction resumes where it stopped.
    let code = asm64(CODE, |a| {
        a.mov(rdi, 0x40_0000u64).unwrap();
        a.mov(rcx, (MEM_SIZE as u64 - 0x40_0000) * 64).unwrap();
        a.xor(eax, eax).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.mov(rdi, 0x40_0000u64).unwrap();
        a.rep().stosb().unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    let k = v.kicker();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        k.kick();
        s2.store(true, Ordering::SeqCst);
    });
    assert_eq!(v.run(m.io.as_ref()).unwrap(), VmExit::Interrupted);
    t.join().unwrap();
    assert!(stop.load(Ordering::SeqCst));
    let r = v.regs().unwrap();
    assert!(r.rcx > 0);
}

#[test]
fn segment_loads_and_far_return_in_long_mode() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 13, true);
    let code = asm64(CODE, |a| {
        a.mov(ax, KERNEL_DS as u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(fs, ax).unwrap();
        // lretq to the next instruction through KERNEL_CS.
        a.push(KERNEL_CS as i32).unwrap();
        let mut back = a.create_label();
        a.lea(rax, qword_ptr(back)).unwrap();
        a.push(rax).unwrap();
        a.db(&[0x48, 0xcb]).unwrap(); // retfq
        a.set_label(&mut back).unwrap();
        a.mov(ax, 0x50).unwrap(); // beyond the GDT limit
        a.mov(ds, ax).unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 13);
    let f = frame(&m);
    assert_eq!(f.err, 0x50);
    assert_eq!(v.sregs().unwrap().ds.selector, KERNEL_DS);
    let s = Sregs {
        fs: Segment {
            base: 0x1234,
            ..seg64(0, false, 0)
        },
        ..Machine::long_sregs()
    };
    let code = asm64(CODE, |a| {
        a.mov(rax, qword_ptr(0)).unwrap();
        a.db(&[0x64]).unwrap(); // fs:
        a.mov(rbx, qword_ptr(0x10)).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    v.set_sregs(&s).unwrap();
    m.w64(0x1244, 0xfeed);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(
        v.regs().unwrap().rbx,
        0xfeed,
        "FS base applies in 64-bit mode"
    );
}

/// 32-bit protected mode (no paging): INT through a 32-bit interrupt gate, IRETD, and #GP
/// with a selector error code.
#[test]
fn protected_mode_idt_and_iretd() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let idt32 = 0x6800u64;
    let gate = |vec: u64, handler: u64| {
        let d = (handler & 0xffff)
            | ((KERNEL32_CS as u64) << 16)
            | (0x8e << 40)
            | ((handler >> 16) << 48);
        m.w64(idt32 + vec * 8, d);
    };
    let h30 = asm(32, 0x20000, |a| {
        a.mov(eax, dword_ptr(esp)).unwrap();
        a.mov(dword_ptr(DATA as u32), eax).unwrap();
        a.mov(eax, dword_ptr(esp + 4)).unwrap();
        a.mov(dword_ptr(DATA as u32 + 4), eax).unwrap();
        a.iretd().unwrap();
    });
    m.write(0x20000, &h30);
    gate(0x30, 0x20000);
    let h13 = asm(32, 0x20100, |a| {
        a.pop(eax).unwrap();
        a.mov(dword_ptr(DATA as u32 + 12), eax).unwrap();
        a.mov(al, 13).unwrap();
        exit(a);
    });
    m.write(0x20100, &h13);
    gate(13, 0x20100);
    let code = asm(32, CODE, |a| {
        a.int(0x30).unwrap();
        a.mov(byte_ptr(DATA as u32 + 8), 1).unwrap();
        a.mov(ax, 0x50).unwrap();
        a.mov(ds, ax).unwrap();
    });
    m.write(CODE, &code);
    let flat = |sel: u16, code: bool| Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        db: true,
        s: true,
        g: true,
        ..Segment::default()
    };
    let mut s = Machine::long_sregs();
    s.cs = flat(KERNEL32_CS, true);
    s.ds = flat(KERNEL_DS, false);
    s.es = s.ds;
    s.ss = s.ds;
    s.cr0 = 0x11;
    s.cr4 = 0;
    s.efer = 0;
    s.idt = vireo_hv::DescriptorTable {
        base: idt32,
        limit: 256 * 8 - 1,
    };
    v.set_sregs(&s).unwrap();
    v.set_regs(&Regs {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: 2,
        ..Regs::default()
    })
    .unwrap();
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 13);
    assert_eq!(m.r32(DATA), CODE as u32 + 2, "EIP after INT");
    assert_eq!(m.r32(DATA + 4), KERNEL32_CS as u32);
    assert_eq!(m.read(DATA + 8, 1), [1], "IRETD returned");
    assert_eq!(m.r32(DATA + 12), 0x50, "#GP(selector)");
}

/// NMIs are taken with IF = 0 and blocked until the handler's IRET.
#[test]
fn nmi_is_blocked_until_iret() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let h = asm64(HANDLERS, |a| {
        a.inc(qword_ptr(DATA)).unwrap();
        a.cmp(qword_ptr(DATA), 1).unwrap();
        let mut out = a.create_label();
        a.jne(out).unwrap();
        // The second NMI must not nest into the first handler.
        a.mov(ecx, 100_000).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.cmp(qword_ptr(DATA), 1).unwrap();
        a.jne(HANDLERS + 0x80).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
        a.set_label(&mut out).unwrap();
        a.iretq().unwrap();
    });
    m.write(HANDLERS, &h);
    let bad = asm64(HANDLERS + 0x80, |a| {
        a.mov(al, 0xee).unwrap();
        exit(a);
    });
    m.write(HANDLERS + 0x80, &bad);
    m.set_gate(2, HANDLERS, false, 0, 0);
    let code = asm64(CODE, |a| {
        a.cli().unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.cmp(qword_ptr(DATA), 2).unwrap();
        a.jne(l).unwrap();
        a.mov(al, 2).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    m.chip.push(0, CpuEvent::Nmi);
    m.chip.push(0, CpuEvent::Nmi);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 2);
    assert_eq!(m.r64(DATA), 2);
}

/// A timer that expires while the guest computes interrupts it (no HLT needed).
#[test]
fn timer_interrupts_a_running_guest() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let h = asm64(HANDLERS, |a| {
        a.mov(al, 0x41).unwrap();
        exit(a);
    });
    m.write(HANDLERS, &h);
    m.set_gate(0x41, HANDLERS, false, 0, 0);
    let code = asm64(CODE, |a| {
        a.sti().unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.inc(rax).unwrap();
        a.jmp(l).unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    let start = Instant::now();
    m.chip.arm_timer(0, start + Duration::from_millis(50), 0x41);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x41);
    let t = start.elapsed();
    assert!(
        t >= Duration::from_millis(50) && t < Duration::from_millis(1000),
        "{t:?}"
    );
    assert!(v.regs().unwrap().rax > 0);
}

/// SYSRET to compatibility mode runs 32-bit code under 64-bit paging; INT 0x80 returns to
/// 64-bit CPL 0.
#[test]
fn compatibility_mode_user_code() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 0x80, false);
    m.set_gate(0x80, HANDLERS + 0x80 * 0x100, false, 3, 0);
    let user = asm(32, USER_CODE, |a| {
        a.mov(eax, 5).unwrap();
        a.add(eax, 0x7fff_fffe).unwrap();
        a.push(eax).unwrap();
        a.pop(ebx).unwrap();
        a.int(0x80).unwrap();
    });
    m.write(USER_CODE, &user);
    let star = ((USER32_CS as u64) << 48) | ((KERNEL_CS as u64) << 32);
    let kernel = asm64(CODE, |a| {
        a.mov(ecx, 0xc000_0081u32).unwrap();
        a.mov(eax, star as u32).unwrap();
        a.mov(edx, (star >> 32) as u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, USER_CODE as u32).unwrap();
        a.mov(r11d, 0x2).unwrap();
        a.mov(rsp, USER_STACK).unwrap();
        a.sysret().unwrap();
    });
    m.load_long(v.as_mut(), &kernel, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x80);
    let f = frame(&m);
    assert_eq!(f.cs, USER32_CS as u64);
    assert_eq!(f.ss, USER_DS as u64);
    assert_eq!(f.rip, USER_CODE + user.len() as u64);
    assert_eq!(f.rsp, USER_STACK);
    assert_eq!(v.regs().unwrap().rbx, 0x8000_0003);
}

#[test]
fn state_round_trips_through_the_interface() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    m.load_long(v.as_mut(), &[0xf4], CODE);
    let regs = Regs {
        rax: 1,
        rbx: 2,
        r15: 0xffff_ffff_ffff_fff0,
        rip: 0x1234,
        rsp: 0x8000,
        rflags: 0x8d7,
        ..Regs::default()
    };
    v.set_regs(&regs).unwrap();
    assert_eq!(v.regs().unwrap(), regs);
    let s = v.sregs().unwrap();
    let want = Machine::long_sregs();
    assert_eq!(
        (s.cs, s.ss, s.tr, s.gdt, s.idt),
        (want.cs, want.ss, want.tr, want.gdt, want.idt)
    );
    assert_eq!(
        (s.cr0, s.cr3, s.cr4, s.efer),
        (want.cr0, want.cr3, want.cr4, want.efer)
    );
    use vireo_hv::Msr;
    let msrs = [
        Msr::new(0xc000_0082, 0xffff_ffff_8100_0000),
        Msr::new(0xc000_0102, 0x1234),
        Msr::new(0x277, 0x0007_0406_0007_0406),
    ];
    v.set_msrs(&msrs).unwrap();
    assert_eq!(
        v.msrs(&[0xc000_0082, 0xc000_0102, 0x277, 0xdead]).unwrap(),
        msrs.to_vec()
    );
    assert!(v.set_msrs(&[Msr::new(0xdead, 1)]).is_err());
    let mut fpu = vireo_hv::FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fpu.xmm[3][5] = 9;
    v.set_fpu(&fpu).unwrap();
    assert_eq!(v.fpu().unwrap(), fpu);
    let mut l = vireo_hv::LapicState::default();
    l.set_reg(0x80, 0x20);
    v.set_lapic(&l).unwrap();
    assert_eq!(m.chip.lapic_states.lock().unwrap().last().unwrap(), &(0, l));
    v.set_mp_state(MpState::Halted).unwrap();
    assert_eq!(v.mp_state().unwrap(), MpState::Halted);
}

/// INT3 patching as Linux's text_poke_bp does: an INT3 handler that skips the patched site.
#[test]
fn int3_breakpoint_handler() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let h = asm64(HANDLERS, |a| {
        // Return past the 5-byte instruction the INT3 replaced (RIP points after the INT3).
        a.add(qword_ptr(rsp), 4).unwrap();
        a.inc(rbx).unwrap();
        a.iretq().unwrap();
    });
    m.write(HANDLERS, &h);
    m.set_gate(3, HANDLERS, false, 0, 0);
    let code = asm64(CODE, |a| {
        a.mov(eax, 0x1111_1111).unwrap();
        a.mov(ecx, 3).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    m.write(CODE, &[0xcc]);
    run_to_exit(v.as_mut(), &m.io);
    let r = v.regs().unwrap();
    assert_eq!((r.rbx, r.rcx), (1, 3));
}

/// IA32_TSC_DEADLINE reaches the interrupt controller in the shared clock's units, also when
/// the guest TSC was set back (the VMM writes IA32_TSC = 0 at boot): a regression test for a
/// deadline that came out as "already expired" and stormed the guest with timer interrupts.
#[test]
fn tsc_deadline_follows_a_reset_tsc() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    std::thread::sleep(std::time::Duration::from_millis(5));
    v.set_msrs(&[vireo_hv::Msr::new(0x10, 0)]).unwrap();
    let code = asm64(CODE, |a| {
        a.rdtsc().unwrap();
        a.shl(rdx, 32).unwrap();
        a.or(rax, rdx).unwrap();
        a.add(rax, 50_000_000).unwrap();
        a.mov(rdx, rax).unwrap();
        a.shr(rdx, 32).unwrap();
        a.mov(ecx, 0x6e0u32).unwrap();
        a.wrmsr().unwrap();
        a.rdmsr().unwrap();
        a.mov(dword_ptr(DATA), eax).unwrap();
        a.mov(dword_ptr(DATA + 4), edx).unwrap();
        a.rdtsc().unwrap();
        a.mov(dword_ptr(DATA + 8), eax).unwrap();
        a.mov(dword_ptr(DATA + 12), edx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    let (guest_deadline, guest_now) = (m.r64(DATA), m.r64(DATA + 8));
    // The guest reads back what it wrote: about 50 ms ahead of its TSC.
    assert!(
        guest_deadline > guest_now,
        "{guest_deadline} vs {guest_now}"
    );
    assert!(guest_deadline - guest_now < 60_000_000);
    // The chip holds it in shared-clock units: in the future there too.
    let chip_deadline = m.chip.tsc_deadline(0);
    let clock_now = m.chip.clock().tsc();
    assert!(
        chip_deadline > clock_now + 30_000_000,
        "{chip_deadline} vs {clock_now}"
    );
}

/// CMP/TEST + Jcc pairs become one op and a block goes on past a Jcc that is not taken: every
/// operand form (register, immediate, memory, RIP-relative memory), taken and not taken, in
/// the middle of a block and at its end, with the flags of the last compare left for PUSHF.
#[test]
fn fused_compare_and_branch_in_superblocks() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    m.w64(DATA, 7);
    let code = asm64(CODE, |a| {
        let mut fail = a.create_label();
        let mut skip = a.create_label();
        let mut done = a.create_label();
        let mut seven = a.create_label();
        a.mov(rax, 5u64).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.cmp(rax, 5).unwrap();
        a.jne(fail).unwrap(); // not taken: the block goes on
        a.cmp(qword_ptr(DATA), 7).unwrap();
        a.jne(fail).unwrap();
        a.cmp(qword_ptr(seven), 7).unwrap(); // RIP-relative
        a.jne(fail).unwrap();
        a.mov(rcx, 7u64).unwrap();
        a.cmp(rcx, qword_ptr(seven)).unwrap();
        a.jne(fail).unwrap();
        a.cmp(qword_ptr(seven), rcx).unwrap();
        a.jb(fail).unwrap();
        a.test(eax, 4).unwrap();
        a.jz(fail).unwrap();
        a.test(al, al).unwrap();
        a.js(fail).unwrap();
        a.inc(rbx).unwrap();
        a.cmp(eax, 3).unwrap();
        a.ja(skip).unwrap(); // taken in the middle of a block: the MOV is skipped
        a.mov(rbx, 99u64).unwrap();
        a.set_label(&mut skip).unwrap();
        a.add(rbx, 10).unwrap();
        a.cmp(rbx, 12).unwrap();
        a.jl(done).unwrap(); // taken at the end of a block
        a.set_label(&mut fail).unwrap();
        a.mov(rbx, 0xdeadu64).unwrap();
        a.set_label(&mut done).unwrap();
        a.pushfq().unwrap();
        a.pop(rdx).unwrap();
        exit(a);
        a.set_label(&mut seven).unwrap();
        a.dq(&[7]).unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    let r = v.regs().unwrap();
    assert_eq!(r.rbx, 11);
    // CMP 11, 12 gives -1: CF, PF, AF (the low nibble borrows) and SF.
    assert_eq!(r.rdx & 0x8d5, 0x95, "CF SF AF PF of CMP 11, 12");
}

/// A single step over a fused CMP + Jcc traps after the CMP, with RIP at the Jcc.
#[test]
fn single_step_splits_a_fused_compare_and_branch() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 1, false);
    let cmp_len = asm64(0, |a| a.cmp(eax, 1).unwrap()).len() as u64;
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        a.mov(eax, 1).unwrap();
        a.pushfq().unwrap();
        a.or(qword_ptr(rsp), 0x100).unwrap();
        a.popfq().unwrap();
        a.cmp(eax, 1).unwrap();
        a.je(l).unwrap();
        a.nop().unwrap();
        a.set_label(&mut l).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 1);
    let pre = asm64(0, |a| {
        a.mov(eax, 1).unwrap();
        a.pushfq().unwrap();
        a.or(qword_ptr(rsp), 0x100).unwrap();
        a.popfq().unwrap();
    })
    .len() as u64;
    let f = frame(&m);
    assert_eq!(f.rip, CODE + pre + cmp_len, "at the JE");
    assert_eq!(f.rflags & 0x8d5, 0x44, "ZF PF of CMP 1, 1");
}

/// The 64-bit PUSH/POP/CALL/RET handlers leave RSP alone when they fault: PUSH and CALL onto
/// a read-only stack page and POP from a page that is not present (#PF), RET to a
/// non-canonical address (#GP). The handlers run on IST 1, so the frame lands elsewhere.
#[test]
fn stack_instructions_that_fault_leave_rsp_alone() {
    const RO_PAGE: u64 = 0x20_3000;
    const ABSENT_PAGE: u64 = 0x20_4000;
    let cases = [
        (
            "push",
            14u8,
            asm64(CODE, |a| a.push(rax).unwrap()),
            RO_PAGE + 0x800,
        ),
        (
            "call",
            14,
            asm64(CODE, |a| a.call(CODE + 0x40).unwrap()),
            RO_PAGE + 0x800,
        ),
        (
            "pop",
            14,
            asm64(CODE, |a| a.pop(rax).unwrap()),
            ABSENT_PAGE + 0x800,
        ),
        (
            "ret",
            13,
            asm64(CODE, |a| a.ret().unwrap()),
            STACK_TOP - 0x100,
        ),
    ];
    for (name, vector, code, stack) in cases {
        let m = Machine::new(1);
        let mut v = m.vcpu(0);
        recorder(&m, vector, true);
        m.set_gate(vector, HANDLERS + vector as u64 * 0x100, false, 0, 1);
        m.w64(PT + 3 * 8, RO_PAGE | 0x1); // present, read-only
        m.w64(PT + 4 * 8, 0); // not present
        m.w64(STACK_TOP - 0x100, 0x8000_0000_0000_0000); // RET's target: not canonical
        m.load_long(v.as_mut(), &code, CODE);
        let mut r = v.regs().unwrap();
        r.rsp = stack;
        v.set_regs(&r).unwrap();
        assert_eq!(run_to_exit(v.as_mut(), &m.io), vector, "{name}");
        let f = frame(&m);
        assert_eq!(f.rip, CODE, "{name}: RIP at the instruction");
        assert_eq!(f.rsp, stack, "{name}: RSP unchanged");
    }
}

#[test]
fn chained_translated_code_runs_a_patched_block() {
    let want = 0x1111_1111u32
        .wrapping_mul(60)
        .wrapping_add(0x1111_112au32.wrapping_mul(40));
    // 100 calls of a target translated after its first runs and reached by chaining from
    // translated code; calls 61-100 must run the patched code.
    assert_eq!(
        patch_after_calls(CODE + 0x100, 1, 100, 60),
        want,
        "same page"
    );
    assert_eq!(
        patch_after_calls(CODE + 0x1000, 1, 100, 60),
        want,
        "other page"
    );
}

/// As [`chained_translated_code_runs_a_patched_block`], but the patch is a device's write
/// (through `vm-memory`) during an `OUT`. Only an I/O exit moved the code epoch since the
/// target's translation was last checked, so the chain stub checks the entry again itself
/// (`relink`): the page's bit in the bitmap of VMM writes must send it back to the block loop,
/// which finds the bytes changed.
#[test]
fn chained_translated_code_runs_a_block_a_device_patched_during_an_io_exit() {
    let want = 0x1111_1111u32
        .wrapping_mul(60)
        .wrapping_add(0x1111_112au32.wrapping_mul(40));
    // With an I/O exit after every call too (port 0x81, no device): the stub then checks
    // the entries after each, and `relink` notes the pages it found clean at that epoch; the
    // note must not outlive the epoch.
    for (target, name, every) in [
        (CODE + 0x100, "same page", false),
        (CODE + 0x1000, "other page", false),
        (CODE + 0x100, "same page, an I/O exit every turn", true),
        (CODE + 0x1000, "other page, an I/O exit every turn", true),
        // 16 pages on: the loop's page and the target's share a `Ctx::clean` entry.
        (CODE + 0x10000, "16 pages on, an I/O exit every turn", true),
    ] {
        let m = Machine::new(1);
        let mut v = m.vcpu(0);
        let mem = m.mem.clone();
        m.io.on_pio_write(0x80, move |_| {
            use vm_memory::Bytes;
            mem.write_slice(&[42], GuestAddress(target + 1)).unwrap();
        });
        let code = calls_with_a_patch(
            target,
            100,
            60,
            |a| {
                if every {
                    a.out(0x81, al).unwrap();
                }
            },
            |a| a.out(0x80, al).unwrap(),
        );
        assert_eq!(
            run_with_target(&m, v.as_mut(), &code, target),
            want,
            "{name}"
        );
    }
}

/// A hot loop of SYSCALLs whose kernel side reads a supervisor-only page and SYSRETs: user
/// code must not go on with the kernel's TLB (translated code chains blocks only at the same
/// privilege), so the user read of that page after the loop faults.
#[test]
fn chained_translated_code_stops_at_a_privilege_change() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 14, true);
    m.w64(PT + 3 * 8, 0x20_3000 | 0x3);
    let star = ((USER32_CS as u64) << 48) | ((KERNEL_CS as u64) << 32);
    let entry = HANDLERS;
    let handler = asm64(entry, |a| {
        let mut bad = a.create_label();
        a.cmp(ebx, 0xdead).unwrap();
        a.je(bad).unwrap();
        // In the SYSRET's block: a block of handler calls only is not translated.
        a.mov(rax, qword_ptr(0x20_3000)).unwrap();
        a.sysretq().unwrap();
        a.set_label(&mut bad).unwrap();
        a.mov(al, 0x77).unwrap();
        exit(a);
    });
    m.write(entry, &handler);
    // The read is in the loop (hot, translated) and reaches the supervisor page in the last
    // iteration.
    let user = asm64(USER_CODE, |a| {
        let mut l = a.create_label();
        let mut skip = a.create_label();
        a.mov(ebx, 100).unwrap();
        a.mov(esi, DATA as u32).unwrap();
        a.set_label(&mut l).unwrap();
        a.syscall().unwrap();
        a.cmp(ebx, 1).unwrap();
        a.jne(skip).unwrap();
        a.mov(esi, 0x20_3008).unwrap();
        a.set_label(&mut skip).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.sub(ebx, 1).unwrap();
        a.jnz(l).unwrap();
        a.mov(ebx, 0xdead).unwrap();
        a.syscall().unwrap();
    });
    m.write(USER_CODE, &user);
    // The kernel runs code in the user page too (no SMEP here), so its TLB has the page for
    // execution: only the privilege check keeps the user code off the kernel's TLB.
    m.write(USER_CODE + 0x800, &[0xc3]);
    let kernel = asm64(CODE, |a| {
        for (msr, val) in [
            (0xc000_0081u32, star),
            (0xc000_0082, entry),
            // IF stays clear throughout: no interrupt-window poll ends the blocks.
            (0xc000_0084, 0),
        ] {
            a.mov(ecx, msr).unwrap();
            a.mov(eax, val as u32).unwrap();
            a.mov(edx, (val >> 32) as u32).unwrap();
            a.wrmsr().unwrap();
        }
        a.mov(rax, USER_CODE + 0x800).unwrap();
        a.call(rax).unwrap();
        a.mov(rcx, USER_CODE).unwrap();
        a.mov(r11, 0x2u64).unwrap();
        a.mov(rsp, USER_STACK).unwrap();
        a.sysretq().unwrap();
    });
    m.load_long(v.as_mut(), &kernel, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 14, "the user read faults");
    let f = frame(&m);
    assert_eq!(f.cr2, 0x20_3008);
    assert_eq!(f.err, 5, "user read of a present page");
    assert_eq!(
        v.regs().unwrap().rbx,
        1,
        "the fault is in the last iteration"
    );
}

/// A hot loop calls linear page 0x206000, which the loop remaps (PTE store and INVLPG) from
/// code returning 1 to code returning 2 after call 50, then reads through the new mapping
/// (refilling the TLB entry) before calling again: translated code must not chain to the
/// block of the old physical page.
#[test]
fn chained_translated_code_follows_a_remapped_page() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let (lin, p1, p2) = (0x20_6000u64, 0x20_7000u64, 0x20_8000u64);
    m.w64(PT + 6 * 8, p1 | 0x7);
    m.write(
        p1,
        &asm64(lin, |a| {
            a.mov(eax, 1).unwrap();
            a.ret().unwrap();
        }),
    );
    m.write(
        p2,
        &asm64(lin, |a| {
            a.mov(eax, 2).unwrap();
            a.ret().unwrap();
        }),
    );
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        let mut skip = a.create_label();
        a.xor(edx, edx).unwrap();
        a.mov(ecx, 100).unwrap();
        a.set_label(&mut l).unwrap();
        a.call(lin).unwrap();
        a.add(edx, eax).unwrap();
        a.cmp(ecx, 51).unwrap();
        a.jne(skip).unwrap();
        a.mov(rax, p2 | 0x7).unwrap();
        a.mov(qword_ptr(PT + 6 * 8), rax).unwrap();
        a.invlpg(byte_ptr(lin)).unwrap();
        a.mov(rax, qword_ptr(lin)).unwrap();
        a.set_label(&mut skip).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(l).unwrap();
        a.mov(dword_ptr(DATA), edx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 50 + 2 * 50);
}

/// A page with a hot loop whose blocks chain inside the page (the exits' memos) is mapped to
/// one physical page, then another with different code, then the first again: each phase runs
/// its own page's code. Translations are kept for both pages, so in the third phase the first
/// page's blocks find memos naming the jump-cache entry last made for the second page's code:
/// the exit's check of the entry's physical page must send them to the stub.
#[test]
fn chained_translated_code_in_a_remapped_page_runs_that_pages_code() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let (lin, p1, p2) = (0x20_9000u64, 0x20_a000u64, 0x20_b000u64);
    // 40 turns of a loop of two blocks, `jmp` and `jnz` both to targets in the page; each
    // block adds `val` to EDX.
    let looped = |val: u32| {
        asm64(lin, |a| {
            let (mut top, mut t) = (a.create_label(), a.create_label());
            a.mov(ecx, 40).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(edx, val).unwrap();
            a.jmp(t).unwrap();
            a.set_label(&mut t).unwrap();
            a.add(edx, val).unwrap();
            a.sub(ecx, 1).unwrap();
            a.jnz(top).unwrap();
            a.ret().unwrap();
        })
    };
    m.write(p1, &looped(1));
    m.write(p2, &looped(1000));
    m.w64(PT + 9 * 8, p1 | 0x7);
    let code = asm64(CODE, |a| {
        a.xor(edx, edx).unwrap();
        for p in [p1, p2, p1] {
            a.mov(rax, p | 0x7).unwrap();
            a.mov(qword_ptr(PT + 9 * 8), rax).unwrap();
            a.invlpg(byte_ptr(lin)).unwrap();
            for _ in 0..3 {
                a.call(lin).unwrap();
            }
        }
        a.mov(dword_ptr(DATA), edx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 240 + 240 * 1000 + 240);
}

/// A block entered through an exit's memo stores into its own later instruction: the store
/// must end the block (the exit moved the running block's bounds on, as the stub does), so
/// the patched instruction runs in that very turn. The exit's block lies more than a block's
/// length away, so bounds left at it would miss the store.
#[test]
fn chained_translated_code_sees_a_store_into_the_block_it_chained_to() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        let (mut top, mut skip, mut tail) = (a.create_label(), a.create_label(), a.create_label());
        a.xor(edx, edx).unwrap();
        a.mov(ecx, 100).unwrap();
        a.set_label(&mut top).unwrap();
        a.cmp(ecx, 40).unwrap();
        a.jne(skip).unwrap();
        // The immediate of the MOV below (its opcode is one byte, B8).
        a.mov(byte_ptr(CODE + 0x15), 0x2a).unwrap();
        a.set_label(&mut skip).unwrap();
        a.mov(eax, 0x1111_1111).unwrap();
        a.add(edx, eax).unwrap();
        let mut w = a.create_label();
        a.jmp(w).unwrap();
        for _ in 0..0x100 {
            a.int3().unwrap();
        }
        // A block with a handler call (PAUSE): it goes on to the tail through the stub, which
        // sets the bounds to the tail's; the tail has translated ops only, so its exit to
        // `top` uses its memo.
        a.set_label(&mut w).unwrap();
        a.pause().unwrap();
        a.jmp(tail).unwrap();
        let mut finish = a.create_label();
        a.set_label(&mut tail).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(top).unwrap();
        a.jmp(finish).unwrap();
        a.set_label(&mut finish).unwrap();
        a.mov(dword_ptr(DATA), edx).unwrap();
        exit(a);
    });
    assert_eq!(
        &code[0x14..0x16],
        &[0xb8, 0x11],
        "the MOV's immediate is at CODE + 0x15"
    );
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    let want = 0x1111_1111u32
        .wrapping_mul(60)
        .wrapping_add(0x1111_112au32.wrapping_mul(40));
    assert_eq!(m.r32(DATA), want);
}

/// An exit's memo names a jump-cache entry; another RIP that hashes to the same entry, in a
/// second mapping of the same physical page (so the entry's page and epoch still match),
/// takes it over. The exit must see that the entry is not its target's and go through the
/// stub, not run the other RIP's block.
#[test]
fn an_exit_memo_whose_entry_another_rip_took_over_is_not_taken() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    // One physical page, mapped at `l1` and `l2`: `l1 + 0x10` and `l2 + 0x14` share a
    // jump-cache entry (`link_slot`: the page numbers differ in bit 2 only).
    let (l1, l2, p) = (0x20_9000u64, 0x20_d000u64, 0x20_e000u64);
    m.w64(PT + 9 * 8, p | 0x7);
    m.w64(PT + 13 * 8, p | 0x7);
    // 0x00: mov ecx, 4; 0x05 (top): add edx, 1; jmp 0x10
    m.write(p, &[0xb9, 4, 0, 0, 0, 0x83, 0xc2, 0x01, 0xeb, 0x06]);
    // 0x10: jmp 0x30; nop; nop; 0x14: mov eax, 0x5555; ret
    m.write(
        p + 0x10,
        &[0xeb, 0x1e, 0x90, 0x90, 0xb8, 0x55, 0x55, 0, 0, 0xc3],
    );
    // 0x30: sub ecx, 1; jnz top; ret
    m.write(p + 0x30, &[0x83, 0xe9, 0x01, 0x75, 0xd0, 0xc3]);
    // 40 calls at `l1` (every block there hot and chaining through memos), 40 at `l2 + 0x14`
    // (its block takes the entry over), one at `l1`: its first block's exit finds the memo.
    let code = asm64(CODE, |a| {
        let (mut l, mut k) = (a.create_label(), a.create_label());
        a.xor(edx, edx).unwrap();
        a.mov(esi, 40).unwrap();
        a.set_label(&mut k).unwrap();
        a.call(l1).unwrap();
        a.sub(esi, 1).unwrap();
        a.jnz(k).unwrap();
        a.mov(esi, 40).unwrap();
        a.set_label(&mut l).unwrap();
        a.call(l2 + 0x14).unwrap();
        a.sub(esi, 1).unwrap();
        a.jnz(l).unwrap();
        a.call(l1).unwrap();
        a.mov(dword_ptr(DATA), edx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r32(DATA), 41 * 4);
}

/// Translated loads and stores that cross from one page into the next, which maps to a
/// physical page that is not the next one: both halves come from (go to) the right pages.
#[test]
fn translated_accesses_that_cross_a_page_use_both_translations() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    // Linear 0x20_9000 → physical 0x20_b000, linear 0x20_a000 → physical 0x20_9000.
    let (lin, lo, hi) = (0x20_9000u64, 0x20_b000u64, 0x20_9000u64);
    m.w64(PT + 9 * 8, lo | 0x7);
    m.w64(PT + 10 * 8, hi | 0x7);
    m.write(lo + 0xffc, &[1, 2, 3, 4]);
    m.write(hi, &[5, 6, 7, 8]);
    // What an access that stayed in the first page would find.
    m.write(lo + 0x1000, &[0xee; 4]);
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        a.xor(edx, edx).unwrap();
        a.mov(ecx, 100).unwrap();
        a.mov(rbx, 0x1122_3344_5566_7788u64).unwrap();
        a.set_label(&mut l).unwrap();
        a.mov(rax, qword_ptr(lin + 0xffc)).unwrap();
        a.add(rdx, rax).unwrap();
        a.mov(qword_ptr(lin + 0xffa), rbx).unwrap();
        a.mov(word_ptr(lin + 0xfff), bx).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(l).unwrap();
        a.mov(qword_ptr(DATA), rdx).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    // The first pass reads the original bytes, the later ones what the stores left.
    assert_eq!(m.read(lo + 0xffa, 6), [0x88, 0x77, 0x66, 0x55, 0x44, 0x88]);
    assert_eq!(m.read(hi, 4), [0x77, 0x11, 0x07, 0x08]);
    assert_eq!(
        m.read(lo + 0x1000, 4),
        [0xee; 4],
        "nothing written past the first page"
    );
    let first = u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
    let last = u64::from_le_bytes([0x66, 0x55, 0x44, 0x88, 0x77, 0x11, 0x07, 0x08]);
    assert_eq!(m.r64(DATA), first.wrapping_add(last.wrapping_mul(99)));
}

/// A hot loop of PUSH and POP runs (each translated as one stack access) on a stack that
/// crosses from one page into the next, which maps to a physical page that is not the next
/// one: each slot lands in its own page.
#[test]
fn translated_push_and_pop_runs_across_a_page_use_both_translations() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let (lin, lo, hi) = (0x20_9000u64, 0x20_b000u64, 0x20_9000u64);
    m.w64(PT + 9 * 8, lo | 0x7);
    m.w64(PT + 10 * 8, hi | 0x7);
    m.write(lo + 0x1000, &[0xee; 8]);
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        a.mov(rsp, lin + 0x1008).unwrap();
        a.xor(r8d, r8d).unwrap();
        a.mov(ecx, 100).unwrap();
        a.mov(rax, 0x1111u64).unwrap();
        a.mov(rbx, 0x2222u64).unwrap();
        a.set_label(&mut l).unwrap();
        a.push(rax).unwrap();
        a.push(rbx).unwrap();
        a.push(rcx).unwrap();
        // The POPs in a block of their own: the PUSH run's block goes to the interpreter at
        // the run (it crosses the page), this one must too.
        let mut pops = a.create_label();
        a.jmp(pops).unwrap();
        a.set_label(&mut pops).unwrap();
        a.pop(rdx).unwrap();
        a.pop(rsi).unwrap();
        a.pop(rdi).unwrap();
        a.add(r8, rdx).unwrap();
        a.add(r8, rsi).unwrap();
        a.add(r8, rdi).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(l).unwrap();
        a.mov(qword_ptr(DATA), r8).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    assert_eq!(m.r64(hi), 0x1111, "the first slot, in the second page");
    assert_eq!(m.r64(lo + 0xff8), 0x2222);
    assert_eq!(m.r64(lo + 0xff0), 1, "RCX of the last turn");
    assert_eq!(
        m.read(lo + 0x1000, 8),
        [0xee; 8],
        "nothing past the first page"
    );
    assert_eq!(m.r64(DATA), 100 * (0x1111 + 0x2222) + 5050);
}

/// A hot translated loop whose handler-run op (a byte store) faults in its last iteration:
/// the fault has the op's RIP, and the ops before it in the block ran.
#[test]
fn a_handler_op_faults_in_a_hot_translated_block() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    recorder(&m, 14, true);
    m.w64(PT + 8, 0);
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        let mut skip = a.create_label();
        a.mov(ecx, 100).unwrap();
        a.mov(esi, DATA as u32).unwrap();
        a.set_label(&mut l).unwrap();
        a.cmp(ecx, 1).unwrap();
        a.jne(skip).unwrap();
        a.mov(esi, 0x20_1010).unwrap();
        a.set_label(&mut skip).unwrap();
        a.add(edx, 3).unwrap();
        a.mov(byte_ptr(rsi), cl).unwrap();
        a.add(edx, 5).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(l).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 14);
    let f = frame(&m);
    assert_eq!(f.cr2, 0x20_1010);
    assert_eq!(f.err, 2, "write to a not-present page");
    // The store's RIP: decode the code to find it.
    let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, iced_x86::DecoderOptions::NONE);
    let is_store = |i: &iced_x86::Instruction| {
        i.mnemonic() == iced_x86::Mnemonic::Mov && i.op0_kind() == iced_x86::OpKind::Memory
    };
    let store_rip = d.iter().find(is_store).unwrap().ip();
    assert_eq!(f.rip, store_rip);
    let r = v.regs().unwrap();
    assert_eq!(
        r.rdx & 0xffff_ffff,
        99 * 8 + 3,
        "the ADD before the store ran, the one after not"
    );
    assert_eq!(r.rcx, 1);
}

/// GS- and FS-relative loads, stores and ALU ops in a hot translated loop, with the GS base
/// moved by WRMSR halfway: translated code adds the base at run time.
#[test]
fn fs_and_gs_relative_operands_in_translated_code() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let (gs1, gs2, fs_base) = (DATA + 0x1000, DATA + 0x2000, DATA + 0x3000);
    m.w64(gs1 + 8, 1);
    m.w64(gs2 + 8, 1000);
    m.w32(fs_base + 4, 7);
    let code = asm64(CODE, |a| {
        let mut l = a.create_label();
        let mut skip = a.create_label();
        for (msr, val) in [(0xc000_0100u32, fs_base), (0xc000_0101, gs1)] {
            a.mov(ecx, msr).unwrap();
            a.mov(eax, val as u32).unwrap();
            a.xor(edx, edx).unwrap();
            a.wrmsr().unwrap();
        }
        a.xor(ebx, ebx).unwrap();
        a.mov(ecx, 100).unwrap();
        a.set_label(&mut l).unwrap();
        // The page at linear 0 in the TLB: a load that forgot the base would hit it.
        a.mov(rdx, qword_ptr(8)).unwrap();
        // RBX += gs:[8] + fs:[4]; gs:[16] = RBX.
        a.mov(rax, qword_ptr(8).gs()).unwrap();
        a.add(rbx, rax).unwrap();
        a.add(ebx, dword_ptr(4).fs()).unwrap();
        a.mov(qword_ptr(16).gs(), rbx).unwrap();
        a.cmp(ecx, 51).unwrap();
        a.jne(skip).unwrap();
        a.push(rcx).unwrap();
        a.mov(ecx, 0xc000_0101u32).unwrap();
        a.mov(eax, gs2 as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.pop(rcx).unwrap();
        a.set_label(&mut skip).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jnz(l).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    run_to_exit(v.as_mut(), &m.io);
    let want = 50 * (1 + 7) + 50 * (1000 + 7);
    assert_eq!(v.regs().unwrap().rbx, want);
    assert_eq!(
        m.r64(gs2 + 16),
        want,
        "the last store went through the new base"
    );
    assert_eq!(
        m.r64(gs1 + 16),
        50 * 8,
        "the last store through the old base"
    );
}
