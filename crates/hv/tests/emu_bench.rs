//! Throughput of the interpreter on small guest loops shaped like the hot code of a Linux boot
//! and of user-space work. Prints MIPS (guest instructions per second of the vCPU thread's CPU
//! time); run with `cargo test --release -p vireo-hv --test emu_bench -- --nocapture`.
//! `EMU_BENCH_SCALE=0.05` shortens every loop and `EMU_BENCH_ONLY=name` runs one (for
//! `valgrind --tool=callgrind`, see `scripts/emu-callgrind`).

mod emu_common;

use emu_common::*;
use iced_x86::code_asm::*;

fn scale(n: u32) -> u32 {
    let s: f64 = std::env::var("EMU_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * s) as u32).max(1)
}

/// Run `body` (a loop of `per_iter` instructions that counts ECX down, `iters` times) and return
/// MIPS. `check` looks at the final registers.
fn mips(
    name: &str,
    iters: u32,
    per_iter: u64,
    setup: impl FnOnce(&Machine),
    body: impl FnOnce(&mut CodeAssembler),
) -> (f64, vireo_hv::Regs) {
    if std::env::var("EMU_BENCH_ONLY").is_ok_and(|o| o != name) {
        return (f64::NAN, vireo_hv::Regs::default());
    }
    let iters = scale(iters);
    let m = Machine::new(1);
    setup(&m);
    let mut v = m.vcpu(0);
    let code = asm64(CODE, |a| {
        a.mov(ecx, iters).unwrap();
        body(a);
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    let start = thread_cpu_time();
    run_to_exit(v.as_mut(), &m.io);
    let secs = (thread_cpu_time() - start).as_secs_f64();
    let n = iters as u64 * per_iter;
    let mips = n as f64 / secs / 1e6;
    println!("{name:>16}: {n:>10} instructions in {secs:.3} s = {mips:7.1} MIPS");
    let r = v.regs().unwrap();
    assert_eq!(r.rcx, 0, "{name}: loop counter");
    (mips, r)
}

#[test]
fn loop_mips() {
    let n = 20_000_000;
    let mut all = Vec::new();
    // add / xor / dec / jnz: a 4-instruction block per iteration.
    let only = std::env::var("EMU_BENCH_ONLY").is_ok();
    let (a, r) = mips(
        "alu",
        n,
        4,
        |_| {},
        |a| {
            let mut l = a.create_label();
            a.set_label(&mut l).unwrap();
            a.add(rax, rcx).unwrap();
            a.xor(rdx, rax).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l).unwrap();
        },
    );
    assert!(only || r.rax != 0);
    all.push(a);

    // Loads, stores, compares and a call/ret per iteration.
    let (b, _) = mips(
        "memory/call",
        n / 2,
        10,
        |_| {},
        |a| {
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
        },
    );
    all.push(b);

    // One SHA-256 round as gcc compiles busybox's (rotates, and/xor/not, two table loads).
    let (c, r) = mips(
        "sha256 round",
        n / 4,
        26,
        |m| {
            for i in 0..64u64 {
                m.w32(DATA + i * 8 + 4, (i as u32).wrapping_mul(0x9e37_79b9));
                m.w32(DATA + 0x1000 + i * 4, (i as u32) ^ 0x5a5a_5a5a);
            }
        },
        |a| {
            let mut l = a.create_label();
            a.mov(r14, DATA).unwrap();
            a.mov(rsp, DATA + 0x1000 - 0x28).unwrap();
            a.mov(esi, 0x6a09_e667u32).unwrap();
            a.mov(edi, 0xbb67_ae85u32).unwrap();
            a.set_label(&mut l).unwrap();
            a.mov(r10d, ecx).unwrap();
            a.and(r10d, 63).unwrap();
            a.mov(edx, esi).unwrap();
            a.mov(r15d, esi).unwrap();
            a.ror(edx, 6).unwrap();
            a.ror(esi, 11).unwrap();
            a.and(r15d, ebp).unwrap();
            a.xor(edx, esi).unwrap();
            a.rol(esi, 7).unwrap();
            a.xor(edx, esi).unwrap();
            a.add(edx, dword_ptr(r14 + r10 * 8 + 4)).unwrap();
            a.add(edx, dword_ptr(rsp + r10 * 4 + 0x28)).unwrap();
            a.not(ebx).unwrap();
            a.and(ebx, edi).unwrap();
            a.xor(ebx, r15d).unwrap();
            a.add(edx, ebx).unwrap();
            a.mov(r11d, edi).unwrap();
            a.ror(r11d, 2).unwrap();
            a.xor(r11d, edx).unwrap();
            a.lea(r15d, dword_ptr(rdx + r13)).unwrap();
            a.mov(r13d, r8d).unwrap();
            a.add(r11d, edx).unwrap();
            a.mov(esi, r15d).unwrap();
            a.mov(edi, r11d).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l).unwrap();
        },
    );
    assert!(only || r.rsi != 0);
    all.push(c);

    // Multi-precision multiply-accumulate (the kernel's mpihelp_addmul_1: mul, add/adc
    // chains) over 32 limbs.
    let (d, _) = mips(
        "bignum addmul",
        n / 32,
        32 * 11 + 6,
        |_| {},
        |a| {
            let mut outer = a.create_label();
            let mut inner = a.create_label();
            a.mov(rbx, 0x9e37_79b9_7f4a_7c15u64).unwrap();
            a.mov(r9, rcx).unwrap();
            a.set_label(&mut outer).unwrap();
            a.mov(rsi, DATA).unwrap();
            a.mov(rdi, DATA + 0x1000).unwrap();
            a.mov(rcx, -32i64).unwrap();
            a.xor(r8d, r8d).unwrap();
            a.set_label(&mut inner).unwrap();
            a.mov(rax, qword_ptr(rsi + rcx * 8 + 256)).unwrap();
            a.mul(rbx).unwrap();
            a.add(rax, r8).unwrap();
            a.adc(rdx, 0).unwrap();
            a.add(rax, qword_ptr(rdi + rcx * 8 + 256)).unwrap();
            a.adc(rdx, 0).unwrap();
            a.mov(qword_ptr(rdi + rcx * 8 + 256), rax).unwrap();
            a.mov(r8, rdx).unwrap();
            a.add(rbx, 1).unwrap();
            a.inc(rcx).unwrap();
            a.jnz(inner).unwrap();
            a.dec(r9).unwrap();
            a.jnz(outer).unwrap();
            a.xor(ecx, ecx).unwrap();
        },
    );
    all.push(d);

    // Short blocks and taken branches, as in kernel code: a call, a compare chain, a store.
    let (e, _) = mips(
        "branchy",
        n / 2,
        12,
        |_| {},
        |a| {
            let mut l = a.create_label();
            let mut f = a.create_label();
            let mut f2 = a.create_label();
            let mut odd = a.create_label();
            let mut skip = a.create_label();
            a.mov(rdi, DATA).unwrap();
            a.set_label(&mut l).unwrap();
            a.mov(eax, ecx).unwrap();
            a.call(f).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l).unwrap();
            a.jmp(skip).unwrap();
            a.set_label(&mut f).unwrap();
            a.test(al, 1).unwrap();
            a.jnz(odd).unwrap();
            a.mov(qword_ptr(rdi), rax).unwrap();
            a.jmp(f2).unwrap();
            a.set_label(&mut odd).unwrap();
            a.mov(qword_ptr(rdi + 8), rax).unwrap();
            a.set_label(&mut f2).unwrap();
            a.cmp(eax, 100).unwrap();
            a.ret().unwrap();
            a.set_label(&mut skip).unwrap();
        },
    );
    all.push(e);

    // REP MOVSB of 4 KiB and REP STOSQ of 4 KiB (counted as one instruction per element).
    let (f, _) = mips(
        "rep movs/stos",
        n / 100,
        4096 + 512 + 7,
        |_| {},
        |a| {
            let mut l = a.create_label();
            a.mov(r9, rcx).unwrap();
            a.set_label(&mut l).unwrap();
            a.mov(rsi, DATA).unwrap();
            a.mov(rdi, DATA + 0x2000).unwrap();
            a.mov(ecx, 4096).unwrap();
            a.rep().movsb().unwrap();
            a.mov(ecx, 512).unwrap();
            a.rep().stosq().unwrap();
            a.dec(r9).unwrap();
            a.jnz(l).unwrap();
        },
    );
    all.push(f);

    all.retain(|m| !m.is_nan());
    let geo = all.iter().map(|m| m.ln()).sum::<f64>() / all.len() as f64;
    println!("{:>16}: {:7.1} MIPS", "geometric mean", geo.exp());
    // (Under valgrind nothing reaches 1 MIPS.)
    assert!(std::env::var("EMU_BENCH_SCALE").is_ok() || all.iter().all(|&m| m > 1.0));
}
