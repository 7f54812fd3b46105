//! Throughput of the interpreter on simple integer loops. Prints MIPS; run with
//! `cargo test --release -p vireo-hv --test emu_bench -- --nocapture`.

mod emu_common;

use std::time::Instant;

use emu_common::*;
use iced_x86::code_asm::*;

/// Run `body` (a loop of `per_iter` instructions, `iters` times) and return MIPS.
fn mips(name: &str, iters: u32, per_iter: u64, body: impl FnOnce(&mut CodeAssembler)) -> f64 {
    let m = Machine::new(1);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        a.mov(ecx, iters).unwrap();
        body(a);
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    let start = Instant::now();
    run_to_exit(v.as_mut(), &m.io);
    let secs = start.elapsed().as_secs_f64();
    let mips = (iters as u64 * per_iter) as f64 / secs / 1e6;
    println!(
        "{name}: {:.0} M instructions in {secs:.3} s = {mips:.1} MIPS",
        (iters as u64 * per_iter) as f64 / 1e6
    );
    assert_eq!(v.regs().unwrap().rcx, 0);
    mips
}

#[test]
fn loop_mips() {
    let n = 20_000_000;
    // add / xor / dec / jnz: a 4-instruction block per iteration.
    let a = mips("alu loop", n, 4, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.add(rax, rcx).unwrap();
        a.xor(rdx, rax).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
    });
    // Loads, stores, compares and a call/ret per iteration.
    let b = mips("memory/call loop", n / 2, 10, |a| {
        let mut l = a.create_label();
        let mut f = a.create_label();
        let mut skip = a.create_label();
        a.mov(rsi, DATA).unwrap();
        a.set_label(&mut l).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.add(rax, 3).unwrap();
        a.mov(qword_ptr(rsi + 8), rax).unwrap();
        a.cmp(rax, rcx).unwrap();
        a.call(f).unwrap();
        a.lea(rbx, qword_ptr(rbx + rax * 2)).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
        a.jmp(skip).unwrap();
        a.set_label(&mut f).unwrap();
        a.inc(rdx).unwrap();
        a.ret().unwrap();
        a.set_label(&mut skip).unwrap();
    });
    assert!(a > 1.0 && b > 1.0);
}
