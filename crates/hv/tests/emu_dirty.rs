//! The emulator's dirty-page log (`Vm::enable_dirty_log` / `take_dirty_log`): stores through
//! every path are logged once per round, a page written by a running vCPU while the log is
//! taken is never lost, and the VMM's own writes through `vm-memory` are in the memory's
//! bitmap (`take_vmm_dirty`).

mod emu_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use emu_common::*;
use iced_x86::code_asm::*;
use vireo_hv::take_vmm_dirty;
use vm_memory::{Bytes, GuestAddress};

fn dirty_pages(log: &[Vec<u64>]) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, word) in log[0].iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.push((w * 64 + b) as u64);
            }
        }
    }
    out
}

#[test]
fn stores_of_every_kind_are_logged_once_per_round() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    // A plain store, a string store over two pages, a locked add, a push (stack page).
    let code = asm64(CODE, |a| {
        a.mov(rax, 0x1234u64).unwrap();
        a.mov(qword_ptr(DATA), rax).unwrap();
        a.mov(rdi, DATA + 0x3ff0).unwrap();
        a.mov(rcx, 32u64).unwrap();
        a.rep().stosb().unwrap();
        a.lock().add(qword_ptr(DATA + 0x8000), 1).unwrap();
        a.push(rax).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    // Before logging starts nothing is recorded.
    m.vm.enable_dirty_log().unwrap();
    assert!(dirty_pages(&m.vm.take_dirty_log().unwrap()).is_empty());
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x34);
    let pages = dirty_pages(&m.vm.take_dirty_log().unwrap());
    let want = |a: u64| a / 4096;
    for p in [
        want(DATA),
        want(DATA + 0x3000),
        want(DATA + 0x4000),
        want(DATA + 0x8000),
        want(STACK_TOP - 8),
    ] {
        assert!(pages.contains(&p), "page {p:#x} not logged: {pages:x?}");
    }
    assert!(!pages.contains(&want(DATA + 0x1000)), "{pages:x?}");
    // The next round starts empty; running the same stores again logs them again.
    assert!(dirty_pages(&m.vm.take_dirty_log().unwrap()).is_empty());
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x34);
    let again = dirty_pages(&m.vm.take_dirty_log().unwrap());
    assert!(again.contains(&want(DATA)), "{again:x?}");
    // Disabled: nothing more is logged.
    m.vm.disable_dirty_log().unwrap();
    m.load_long(v.as_mut(), &code, CODE);
    assert_eq!(run_to_exit(v.as_mut(), &m.io), 0x34);
    assert!(dirty_pages(&m.vm.take_dirty_log().unwrap()).is_empty());
}

/// A vCPU increments a counter in one of 256 pages, round-robin, forever; rounds of the log
/// are taken while it runs, and after each round the pages it logged are copied. When the
/// vCPU stops, a last round is taken: the copy must then equal guest memory exactly (the
/// pre-copy invariant live migration relies on).
#[test]
fn concurrent_rounds_lose_no_write() {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    const PAGES: u64 = 256;
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.xor(rbx, rbx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, rbx).unwrap();
        a.and(rax, (PAGES - 1) as i32).unwrap();
        a.shl(rax, 12).unwrap();
        a.mov(rdx, DATA).unwrap();
        a.add(rax, rdx).unwrap();
        a.inc(qword_ptr(rax)).unwrap();
        a.inc(rbx).unwrap();
        a.jmp(top).unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    m.vm.enable_dirty_log().unwrap();
    let base = DATA / 4096;
    let mut copy = vec![0u64; PAGES as usize];
    let read_all = |copy: &mut Vec<u64>, pages: &[u64]| {
        for &p in pages {
            if (base..base + PAGES).contains(&p) {
                copy[(p - base) as usize] = m.r64(p * 4096);
            }
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let kicker = v.kicker();
    let io = m.io.clone();
    let runner = std::thread::spawn(move || {
        let r = v.run(io.as_ref());
        (v, r)
    });
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(2));
        let pages = dirty_pages(&m.vm.take_dirty_log().unwrap());
        read_all(&mut copy, &pages);
    }
    stop.store(true, Ordering::SeqCst);
    kicker.kick();
    let (_v, r) = runner.join().unwrap();
    r.unwrap();
    let pages = dirty_pages(&m.vm.take_dirty_log().unwrap());
    read_all(&mut copy, &pages);
    let mut total = 0;
    for i in 0..PAGES {
        let real = m.r64(DATA + i * 4096);
        assert_eq!(copy[i as usize], real, "page {i}: copy is stale");
        total += real;
    }
    assert!(total > 1000, "the guest barely ran ({total} increments)");
}

#[test]
fn vmm_writes_are_in_the_memory_bitmap() {
    let m = Machine::new(1);
    let _ = take_vmm_dirty(&m.mem);
    m.mem.write_obj(7u32, GuestAddress(0x5_3000)).unwrap();
    m.mem
        .write_slice(&[1u8; 8192], GuestAddress(0x6_0800))
        .unwrap();
    let log = take_vmm_dirty(&m.mem);
    let pages = dirty_pages(&log);
    assert_eq!(pages, vec![0x53, 0x60, 0x61, 0x62]);
    assert!(dirty_pages(&take_vmm_dirty(&m.mem)).is_empty());
}
