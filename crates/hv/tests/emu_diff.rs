//! Differential tests: every implemented non-privileged instruction form runs natively on the
//! host CPU (in this process, from an mmap'd executable page) and in the emulator, over random
//! and edge-case operands; registers, the defined flags and memory must match.
//!
//! Adding a form is one line in a `forms!` list: a name, the instruction (code_asm), which
//! flags the SDM leaves undefined, and how to generate inputs.

mod emu_common;

use emu_common::*;
use iced_x86::code_asm::*;
use iced_x86::IcedError;
use vireo_hv::{MpState, Regs, Vcpu};

const CF: u64 = 1;
const PF: u64 = 4;
const AF: u64 = 0x10;
const ZF: u64 = 0x40;
const SF: u64 = 0x80;
const DF: u64 = 0x400;
const OF: u64 = 0x800;
const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// Bytes of scratch memory; R15 points into its middle.
const MEM: usize = 1024;
const MID: u64 = 512;

/// Register state exchanged with the native trampoline: RAX..R15 in encoding order, RFLAGS.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct St {
    r: [u64; 16],
    f: u64,
}

#[derive(Clone)]
struct Case {
    st: St,
    mem: Vec<u8>,
}

type Body = fn(&mut CodeAssembler) -> Result<(), IcedError>;
type Undef = Box<dyn Fn(&St) -> u64>;

#[derive(Clone, Copy)]
enum Gen {
    /// Any values (R15 points at the scratch memory).
    Any,
    /// CL is a shift count in 0..=max.
    Count(u64),
    /// DIV/IDIV of `size` bytes by the r/m operand (RBX or memory): no #DE.
    Div(u8, bool),
    /// RBX holds a signed bit offset that stays inside the scratch memory.
    BitOff,
    /// RSI/RDI point into the scratch memory, RCX is a small count, DF random.
    Str,
}

struct Form {
    name: &'static str,
    body: Body,
    /// What the host executes, when it differs (TZCNT on a BMI1 host vs our BSF).
    native: Option<Body>,
    undef: Undef,
    gen: Gen,
}

fn def() -> Undef {
    Box::new(|_| 0)
}
fn undef(mask: u64) -> Undef {
    Box::new(move |_| mask)
}
/// SHL/SHR/SAR/SAL by CL or an immediate (`imm`, None = CL) on a `bits`-wide operand.
fn shift_undef(bits: u32, imm: Option<u64>, cf_undef_at_width: bool) -> Undef {
    Box::new(move |s: &St| {
        let raw = imm.unwrap_or(s.r[1]);
        let c = raw & if bits == 64 { 63 } else { 31 };
        if c == 0 {
            return 0;
        }
        let mut u = AF;
        if c != 1 {
            u |= OF;
        }
        if cf_undef_at_width && c >= bits as u64 {
            u |= CF;
        }
        u
    })
}
/// ROL/ROR/RCL/RCR: OF is undefined unless the masked count is 1.
fn rot_undef(bits: u32, imm: Option<u64>) -> Undef {
    Box::new(move |s: &St| {
        let raw = imm.unwrap_or(s.r[1]);
        let c = raw & if bits == 64 { 63 } else { 31 };
        if c == 0 || c == 1 {
            0
        } else {
            OF
        }
    })
}

macro_rules! forms {
    ($($name:literal, $body:expr, $undef:expr, $gen:expr;)*) => {
        vec![$(Form { name: $name, body: $body, native: None, undef: $undef, gen: $gen }),*]
    };
}

// ---- native execution -----------------------------------------------------------------------------

struct Native {
    page: *mut u8,
    len: usize,
}

impl Native {
    fn new() -> Native {
        let len = 1 << 16;
        // SAFETY: an anonymous private mapping; checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Native {
            page: p as *mut u8,
            len,
        }
    }

    /// Assemble the trampoline around `body` into the page.
    fn load(&mut self, body: Body) {
        let base = self.page as u64;
        let mut a = CodeAssembler::new(64).unwrap();
        let mut l_state = a.create_label();
        let mut l_tmp = a.create_label();
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r).unwrap();
        }
        a.mov(qword_ptr(l_state), rdi).unwrap();
        a.push(qword_ptr(rdi + 128)).unwrap();
        a.popfq().unwrap();
        let regs = [
            rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
        ];
        for (i, r) in regs.iter().enumerate() {
            if i != 4 && i != 7 {
                a.mov(*r, qword_ptr(rdi + 8 * i)).unwrap();
            }
        }
        a.mov(rdi, qword_ptr(rdi + 56)).unwrap();
        body(&mut a).unwrap();
        a.pushfq().unwrap();
        a.mov(qword_ptr(l_tmp), rax).unwrap();
        a.mov(rax, qword_ptr(l_state)).unwrap();
        for (i, r) in regs.iter().enumerate() {
            if i != 0 && i != 4 {
                a.mov(qword_ptr(rax + 8 * i), *r).unwrap();
            }
        }
        a.mov(rcx, qword_ptr(l_tmp)).unwrap();
        a.mov(qword_ptr(rax), rcx).unwrap();
        a.pop(rcx).unwrap();
        a.mov(qword_ptr(rax + 128), rcx).unwrap();
        a.cld().unwrap();
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r).unwrap();
        }
        a.ret().unwrap();
        a.set_label(&mut l_state).unwrap();
        a.dq(&[0]).unwrap();
        a.set_label(&mut l_tmp).unwrap();
        a.dq(&[0]).unwrap();
        let code = a.assemble(base).unwrap();
        assert!(code.len() <= self.len);
        // SAFETY: the page is ours, writable, and large enough (checked above).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.page, code.len()) };
    }

    fn run(&mut self, st: &mut St) {
        // SAFETY: the page holds the trampoline assembled by `load`, which follows the C ABI:
        // it saves and restores the callee-saved registers, leaves RSP balanced and DF clear.
        let f: extern "C" fn(*mut St) = unsafe { std::mem::transmute(self.page) };
        f(st);
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`.
        unsafe { libc::munmap(self.page as *mut libc::c_void, self.len) };
    }
}

// ---- input generation -------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const EDGES: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
    0x8000_0000_0000_0001,
];

fn value(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => EDGES[rng.below(EDGES.len() as u64) as usize],
        1 => rng.next() & 0xff,
        _ => rng.next(),
    }
}

fn gen_case(rng: &mut Rng, gen: Gen) -> Case {
    let mut st = St::default();
    for r in st.r.iter_mut() {
        *r = value(rng);
    }
    st.r[4] = 0;
    st.r[15] = MID;
    st.f = 2 | (rng.next() & ARITH);
    let mut mem = vec![0u8; MEM];
    for chunk in mem.chunks_mut(8) {
        let v = value(rng).to_le_bytes();
        chunk.copy_from_slice(&v);
    }
    match gen {
        Gen::Any => {}
        Gen::Count(max) => st.r[1] = rng.below(max + 1) | (rng.next() & !0xff),
        Gen::Div(size, signed) => loop {
            let bits = size as u32 * 8;
            let m = if size == 8 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let d = value(rng) & m;
            if d == 0 {
                continue;
            }
            let (lo, hi) = (st.r[0] & m, st.r[2] & m);
            let hi = if size == 1 { (st.r[0] >> 8) & 0xff } else { hi };
            let ok = if signed {
                let sx = |v: u64, b: u32| ((v << (64 - b)) as i64 >> (64 - b)) as i128;
                let n = ((sx(hi, bits) as u128) << bits | lo as u128) as i128;
                let n = n << (128 - 2 * bits) >> (128 - 2 * bits);
                let dd = sx(d, bits);
                let q = n.checked_div(dd);
                q.is_some_and(|q| q >= -(1i128 << (bits - 1)) && q < (1i128 << (bits - 1)))
            } else {
                hi < d
            };
            if ok {
                st.r[3] = (st.r[3] & !m) | d;
                mem[MID as usize..MID as usize + size as usize]
                    .copy_from_slice(&d.to_le_bytes()[..size as usize]);
                break;
            }
            st.r[0] = value(rng);
            st.r[2] = value(rng);
        },
        Gen::BitOff => st.r[3] = (rng.below(8 * 800) as i64 - 8 * 400) as u64,
        Gen::Str => {
            st.r[1] = rng.below(17);
            st.r[15] = rng.next();
            st.r[6] = MID - 200 + rng.below(400);
            st.r[7] = MID - 200 + rng.below(400);
            if rng.below(2) == 1 {
                st.f |= DF;
            }
        }
    }
    Case { st, mem }
}

/// Registers holding pointers into the scratch memory (offsets from its start).
fn pointer_regs(gen: Gen) -> &'static [usize] {
    match gen {
        Gen::Str => &[6, 7, 15],
        _ => &[15],
    }
}

// ---- running both sides -------------------------------------------------------------------------------

struct Emu {
    m: Machine,
    v: Box<dyn Vcpu>,
}

impl Emu {
    fn new(jit: bool) -> Emu {
        let m = Machine::with_jit(jit, 1);
        let mut v = m.vcpu(0);
        m.load_long(v.as_mut(), &[0xf4], CODE);
        Emu { m, v }
    }

    fn load(&mut self, body: Body) {
        let code = asm64(CODE, |a| {
            body(a).unwrap();
            exit(a);
        });
        self.m.write(CODE, &code);
    }

    fn run(&mut self, c: &Case, ptrs: &[usize]) -> (St, Vec<u8>) {
        let mut r = c.st.r;
        for &p in ptrs {
            r[p] = r[p].wrapping_add(DATA);
        }
        self.m.write(DATA, &c.mem);
        self.v
            .set_regs(&Regs {
                rax: r[0],
                rcx: r[1],
                rdx: r[2],
                rbx: r[3],
                rsp: STACK_TOP,
                rbp: r[5],
                rsi: r[6],
                rdi: r[7],
                r8: r[8],
                r9: r[9],
                r10: r[10],
                r11: r[11],
                r12: r[12],
                r13: r[13],
                r14: r[14],
                r15: r[15],
                rip: CODE,
                rflags: c.st.f,
            })
            .unwrap();
        self.v.set_mp_state(MpState::Runnable).unwrap();
        let exit = self.v.run(self.m.io.as_ref()).unwrap();
        assert_eq!(exit, vireo_hv::VmExit::Interrupted);
        let g = self.v.regs().unwrap();
        let mut out = St {
            r: [
                g.rax, g.rcx, g.rdx, g.rbx, 0, g.rbp, g.rsi, g.rdi, g.r8, g.r9, g.r10, g.r11,
                g.r12, g.r13, g.r14, g.r15,
            ],
            f: g.rflags,
        };
        for &p in ptrs {
            out.r[p] = out.r[p].wrapping_sub(DATA);
        }
        (out, self.m.read(DATA, MEM))
    }
}

fn native_run(n: &mut Native, c: &Case, ptrs: &[usize]) -> (St, Vec<u8>) {
    let mut mem = c.mem.clone();
    let base = mem.as_mut_ptr() as u64;
    let mut st = c.st;
    for &p in ptrs {
        st.r[p] = st.r[p].wrapping_add(base);
    }
    n.run(&mut st);
    for &p in ptrs {
        st.r[p] = st.r[p].wrapping_sub(base);
    }
    st.r[4] = 0;
    (st, mem)
}

/// Every form against the host CPU, on the interpreter and on the JIT (which translates a
/// form's block once it has run `HOT` times, so most cases run translated).
fn check(forms: Vec<Form>, cases: usize, seed: u64) {
    check_on(&forms, cases, seed, false);
    check_on(&forms, cases, seed, true);
}

fn check_on(forms: &[Form], cases: usize, seed: u64, jit: bool) {
    let mut native = Native::new();
    let mut emu = Emu::new(jit);
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    for form in forms {
        native.load(form.native.unwrap_or(form.body));
        emu.load(form.body);
        let ptrs = pointer_regs(form.gen);
        let mut bad = 0;
        for _ in 0..cases {
            let c = gen_case(&mut rng, form.gen);
            let (host_st, host_mem) = native_run(&mut native, &c, ptrs);
            let (emu_st, emu_mem) = emu.run(&c, ptrs);
            let defined = (ARITH | DF) & !(form.undef)(&c.st);
            let mut diffs = Vec::new();
            for i in 0..16 {
                if host_st.r[i] != emu_st.r[i] {
                    diffs.push(format!(
                        "r{i}: host {:#x} emu {:#x}",
                        host_st.r[i], emu_st.r[i]
                    ));
                }
            }
            if (host_st.f ^ emu_st.f) & defined != 0 {
                diffs.push(format!(
                    "flags: host {:#x} emu {:#x} (defined {:#x})",
                    host_st.f & defined,
                    emu_st.f & defined,
                    defined
                ));
            }
            if host_mem != emu_mem {
                let at = host_mem
                    .iter()
                    .zip(&emu_mem)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                diffs.push(format!("memory differs at scratch+{at}"));
            }
            if !diffs.is_empty() {
                bad += 1;
                if bad <= 3 {
                    failures.push(format!(
                        "{} (jit {jit}): input r={:x?} f={:#x}: {}",
                        form.name,
                        c.st.r,
                        c.st.f,
                        diffs.join("; ")
                    ));
                }
            }
        }
        if bad > 3 {
            failures.push(format!("{}: {bad} of {cases} cases differ", form.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

const CASES: usize = 600;

#[test]
fn diff_alu() {
    let forms = forms![
        "add r64,r64", |a| a.add(rax, rbx), def(), Gen::Any;
        "add r32,r32", |a| a.add(eax, ebx), def(), Gen::Any;
        "add r16,r16", |a| a.add(ax, bx), def(), Gen::Any;
        "add r8,r8", |a| a.add(al, bl), def(), Gen::Any;
        "add ah,bh", |a| a.add(ah, bh), def(), Gen::Any;
        "add r64,imm8", |a| a.add(rax, -3), def(), Gen::Any;
        "add r32,imm32", |a| a.add(ecx, 0x1234_5678), def(), Gen::Any;
        "add m64,r64", |a| a.add(qword_ptr(r15 + 8), rbx), def(), Gen::Any;
        "add m32,r32", |a| a.add(dword_ptr(r15 + 4), ecx), def(), Gen::Any;
        "add m32,imm32", |a| a.add(dword_ptr(r15 + 12), 0x7654_3210), def(), Gen::Any;
        "sub m64,imm8", |a| a.sub(qword_ptr(r15 + 16), 7), def(), Gen::Any;
        "sub m32,r32", |a| a.sub(dword_ptr(r15), edx), def(), Gen::Any;
        "xor m64,r64", |a| a.xor(qword_ptr(r15 + 24), rsi), undef(AF), Gen::Any;
        "and m32,imm8", |a| a.and(dword_ptr(r15 + 8), -16), undef(AF), Gen::Any;
        "cmp m64,imm8", |a| a.cmp(qword_ptr(r15 + 8), 3), def(), Gen::Any;
        "cmp m32,r32", |a| a.cmp(dword_ptr(r15 + 4), ebx), def(), Gen::Any;
        "test m64,imm32", |a| a.test(qword_ptr(r15), 0x8000_0001u32 as i32), undef(AF), Gen::Any;
        "add r32,m32", |a| a.add(edx, dword_ptr(r15 - 12)), def(), Gen::Any;
        "add m8,imm8", |a| a.add(byte_ptr(r15 + 3), 0x7f), def(), Gen::Any;
        "add m16,imm16", |a| a.add(word_ptr(r15 + 1), 0x7fff), def(), Gen::Any;
        "adc r64,r64", |a| a.adc(rax, rbx), def(), Gen::Any;
        "adc r32,r32", |a| a.adc(eax, ebx), def(), Gen::Any;
        "adc r16,r16", |a| a.adc(ax, bx), def(), Gen::Any;
        "adc r8,r8", |a| a.adc(al, bl), def(), Gen::Any;
        "adc m32,imm8", |a| a.adc(dword_ptr(r15), -1), def(), Gen::Any;
        "sub r64,r64", |a| a.sub(rax, rbx), def(), Gen::Any;
        "sub r32,r32", |a| a.sub(eax, ebx), def(), Gen::Any;
        "sub r16,m16", |a| a.sub(cx, word_ptr(r15 + 2)), def(), Gen::Any;
        "sub r8,imm8", |a| a.sub(dl, 0x80), def(), Gen::Any;
        "sbb r64,r64", |a| a.sbb(rax, rbx), def(), Gen::Any;
        "sbb r32,r32", |a| a.sbb(eax, ebx), def(), Gen::Any;
        "sbb r16,r16", |a| a.sbb(ax, bx), def(), Gen::Any;
        "sbb r8,r8", |a| a.sbb(al, bl), def(), Gen::Any;
        "sbb m64,imm32", |a| a.sbb(qword_ptr(r15 + 16), 0x7fff_ffff), def(), Gen::Any;
        "cmp r64,r64", |a| a.cmp(rax, rbx), def(), Gen::Any;
        "cmp r32,imm8", |a| a.cmp(eax, 5), def(), Gen::Any;
        "cmp m8,r8", |a| a.cmp(byte_ptr(r15 + 7), bl), def(), Gen::Any;
        "cmp r16,r16", |a| a.cmp(ax, bx), def(), Gen::Any;
        "and r64,r64", |a| a.and(rax, rbx), undef(AF), Gen::Any;
        "and r32,imm32", |a| a.and(eax, 0x8000_00ff_u32 as i32), undef(AF), Gen::Any;
        "and m16,r16", |a| a.and(word_ptr(r15 + 4), bx), undef(AF), Gen::Any;
        "or r64,r64", |a| a.or(rax, rbx), undef(AF), Gen::Any;
        "or r8,r8", |a| a.or(al, bl), undef(AF), Gen::Any;
        "or m64,imm8", |a| a.or(qword_ptr(r15 + 8), -128), undef(AF), Gen::Any;
        "xor r64,r64", |a| a.xor(rax, rbx), undef(AF), Gen::Any;
        "xor r32,r32 (zero)", |a| a.xor(eax, eax), undef(AF), Gen::Any;
        "xor r16,imm16", |a| a.xor(si, 0x5555), undef(AF), Gen::Any;
        "test r64,r64", |a| a.test(rax, rbx), undef(AF), Gen::Any;
        "test r8,imm8", |a| a.test(al, 0x81), undef(AF), Gen::Any;
        "test m32,r32", |a| a.test(dword_ptr(r15), ebx), undef(AF), Gen::Any;
        "inc r64", |a| a.inc(rax), def(), Gen::Any;
        "inc r32", |a| a.inc(eax), def(), Gen::Any;
        "inc r8", |a| a.inc(bh), def(), Gen::Any;
        "inc m16", |a| a.inc(word_ptr(r15 + 6)), def(), Gen::Any;
        "dec r64", |a| a.dec(rax), def(), Gen::Any;
        "dec r16", |a| a.dec(ax), def(), Gen::Any;
        "dec m8", |a| a.dec(byte_ptr(r15 - 1)), def(), Gen::Any;
        "neg r64", |a| a.neg(rax), def(), Gen::Any;
        "neg r32", |a| a.neg(eax), def(), Gen::Any;
        "neg r8", |a| a.neg(al), def(), Gen::Any;
        "neg m16", |a| a.neg(word_ptr(r15)), def(), Gen::Any;
        "not r64", |a| a.not(rax), def(), Gen::Any;
        "not r32", |a| a.not(eax), def(), Gen::Any;
        "not m8", |a| a.not(byte_ptr(r15 + 9)), def(), Gen::Any;
        "adc chain", |a| { a.add(rax, rbx)?; a.adc(rcx, rdx)?; a.adc(r8, r9) }, def(), Gen::Any;
        // The carry in from the host's CF after BT, and computed after a store (which leaves
        // the host's flags the TLB look's).
        "bt; adc", |a| { a.bt(rax, 5)?; a.adc(rcx, rdx) }, def(), Gen::Any;
        "add; store; adc r,imm", |a| {
            a.add(rax, qword_ptr(r15 + 8))?; a.mov(qword_ptr(r15 + 16), rax)?; a.adc(rcx, 0)
        }, def(), Gen::Any;
        "adc r64,m64", |a| a.adc(rbx, qword_ptr(r15 + 8)), def(), Gen::Any;
        "add; adc r,m", |a| { a.add(rax, rbx)?; a.adc(rcx, qword_ptr(r15 + 8)) }, def(), Gen::Any;
        "sbb m32,r32", |a| a.sbb(dword_ptr(r15 + 4), ecx), def(), Gen::Any;
        "adc ah,bh", |a| a.adc(ah, bh), def(), Gen::Any;
        "inc; sbb r16,imm", |a| { a.inc(rdx)?; a.sbb(si, 0x1234) }, def(), Gen::Any;
        "sub r64,r64; cmovb", |a| { a.sub(rax, rbx)?; a.cmovb(rcx, rdx) }, def(), Gen::Any;
        "add r32,imm; cmovo", |a| { a.add(eax, 0x7fff_0000)?; a.cmovo(ecx, edx) }, def(), Gen::Any;
        "cmp r64,r64; cmovl", |a| { a.cmp(rsi, rdi)?; a.cmovl(r8, r9) }, def(), Gen::Any;
        "cmp r32,m32; cmovg", |a| { a.cmp(esi, dword_ptr(r15 + 4))?; a.cmovg(r8d, r9d) }, def(), Gen::Any;
        "and r32,r32; cmove", |a| { a.and(eax, ebx)?; a.cmove(ecx, edx) }, undef(AF), Gen::Any;
        "xor r64,r64; cmovs", |a| { a.xor(rax, rbx)?; a.cmovs(rcx, rdx) }, undef(AF), Gen::Any;
        "test r32,r32; cmovp", |a| { a.test(eax, ebx)?; a.cmovp(ecx, edx) }, undef(AF), Gen::Any;
        "sub r64,imm; cmovbe", |a| { a.sub(rax, 3)?; a.cmovbe(rcx, rdx) }, def(), Gen::Any;
        "sbb chain", |a| { a.sub(rax, rbx)?; a.sbb(rcx, rdx)?; a.sbb(r8d, r9d) }, def(), Gen::Any;
    ];
    check(forms, CASES, 0x1234_5678_9abc_def1);
}

/// The same instructions when the block overwrites their flags before anything reads them: the
/// emulator then runs handlers that skip the flags (`decode::flags_needed`). The trailing CMP
/// overwrites every flag and touches no other register.
#[test]
fn diff_flags_skipped() {
    let forms = forms![
        "add r64,r64; cmp", |a| { a.add(rax, rbx)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "add r32,imm; cmp", |a| { a.add(ecx, 0x1234_5678)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "add r8,m8; cmp", |a| { a.add(bl, byte_ptr(r15 + 3))?; a.cmp(r14, r13) }, def(), Gen::Any;
        "adc r64,r64; cmp", |a| { a.adc(rax, rbx)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "adc r16,imm; cmp", |a| { a.adc(ax, -2)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "sbb r32,m32; cmp", |a| { a.sbb(edx, dword_ptr(r15 - 12))?; a.cmp(r14, r13) }, def(), Gen::Any;
        "sbb r8,r8; cmp", |a| { a.sbb(al, bl)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "sub r16,r16; cmp", |a| { a.sub(ax, bx)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "and r32,r32; cmp", |a| { a.and(eax, ebx)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "or r64,imm; cmp", |a| { a.or(rax, -128)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "xor r8,r8; cmp", |a| { a.xor(ah, bl)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "cmp r32,m32; cmp", |a| { a.cmp(eax, dword_ptr(r15))?; a.cmp(r14, r13) }, def(), Gen::Any;
        "test r64,r64; cmp", |a| { a.test(rax, rbx)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "inc r32; cmp", |a| { a.inc(eax)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "dec r16; cmp", |a| { a.dec(si)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "neg r8; cmp", |a| { a.neg(ch)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "neg r64; cmp", |a| { a.neg(rdx)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "shl r64,cl; cmp", |a| { a.shl(rax, cl)?; a.cmp(r14, r13) }, def(), Gen::Count(70);
        "shr r32,cl; cmp", |a| { a.shr(eax, cl)?; a.cmp(r14, r13) }, def(), Gen::Count(40);
        "sar r64,cl; cmp", |a| { a.sar(rdx, cl)?; a.cmp(r14, r13) }, def(), Gen::Count(70);
        "sar r16,imm; cmp", |a| { a.sar(ax, 9)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "shl r64,imm; cmp", |a| { a.shl(rax, 13)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "shr r32,imm; cmp", |a| { a.shr(ecx, 7)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "sar r32,imm; cmp", |a| { a.sar(edx, 31)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "sar r64,imm; cmp", |a| { a.sar(rsi, 63)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "shl r32,0; cmp", |a| { a.shl(edi, 32)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "add r64,m64; cmp", |a| { a.add(rax, qword_ptr(r15 + 8))?; a.cmp(r14, r13) }, def(), Gen::Any;
        "add m32,imm8; cmp", |a| { a.add(dword_ptr(r15 + 4), 1)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "or m64,r64; cmp", |a| { a.or(qword_ptr(r15 + 8), rcx)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "xor r32,m32; cmp", |a| { a.xor(ebx, dword_ptr(r15 - 4))?; a.cmp(r14, r13) }, def(), Gen::Any;
        "sub r64,m64; setc", |a| { a.sub(rcx, qword_ptr(r15 + 16))?; a.setc(dl)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "lea r32; mov m,imm", |a| {
            a.lea(eax, ptr(rbx + rcx * 4 + 0x7fff_fff0))?;
            a.mov(qword_ptr(r15 + 24), -3)?;
            a.mov(dword_ptr(r15 + 40), 0x8765_4321u32)?;
            a.cmp(r14, r13)
        }, def(), Gen::Any;
        "rol r32,imm; cmp", |a| { a.rol(esi, 7)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "ror r64,cl; cmp", |a| { a.ror(rax, cl)?; a.cmp(r14, r13) }, def(), Gen::Count(70);
        "ror r8,imm; cmp", |a| { a.ror(bl, 3)?; a.cmp(r14, r13) }, def(), Gen::Any;
        "rcl r32,cl; cmp", |a| { a.rcl(eax, cl)?; a.cmp(r14, r13) }, def(), Gen::Count(40);
        "rcr r8,cl; cmp", |a| { a.rcr(al, cl)?; a.cmp(r14, r13) }, def(), Gen::Count(20);
        "rcr r16,1; cmp", |a| { a.rcr(dx, 1)?; a.cmp(r14, r13) }, def(), Gen::Any;
        // CF passes through INC into ADC, which alone skips flags.
        "sub; inc; adc; cmp", |a| { a.sub(rax, rbx)?; a.inc(rcx)?; a.adc(rdx, 0)?; a.cmp(r14, r13) }, def(), Gen::Any;
        // A shift by a zero CL leaves the ADD's carry for SETC.
        "add; shl cl; setc; cmp", |a| { a.add(rax, rbx)?; a.shl(rdx, cl)?; a.setc(sil)?; a.cmp(r14, r13) }, def(), Gen::Count(3);
        "sha256-like", |a| {
            a.mov(edx, esi)?; a.ror(edx, 6)?; a.ror(esi, 11)?; a.xor(edx, esi)?;
            a.rol(esi, 7)?; a.xor(edx, esi)?; a.not(ebx)?; a.and(ebx, edi)?; a.add(edx, ebx)?;
            a.cmp(r14, r13)
        }, def(), Gen::Any;
    ];
    check(forms, CASES, 0x0bad_cafe_f00d_0001);
}

#[test]
fn diff_shifts() {
    let forms = vec![
        f(
            "shl r64,cl",
            |a| a.shl(rax, cl),
            shift_undef(64, None, true),
            Gen::Count(70),
        ),
        f(
            "shl r32,cl",
            |a| a.shl(eax, cl),
            shift_undef(32, None, true),
            Gen::Count(40),
        ),
        f(
            "shl r16,cl",
            |a| a.shl(ax, cl),
            shift_undef(16, None, true),
            Gen::Count(40),
        ),
        f(
            "shl r8,cl",
            |a| a.shl(al, cl),
            shift_undef(8, None, true),
            Gen::Count(40),
        ),
        f(
            "shl r64,1",
            |a| a.shl(rax, 1),
            shift_undef(64, Some(1), true),
            Gen::Any,
        ),
        f(
            "shl r32,imm",
            |a| a.shl(ebx, 7),
            shift_undef(32, Some(7), true),
            Gen::Any,
        ),
        f(
            "shr r64,imm",
            |a| a.shr(rdx, 13),
            shift_undef(64, Some(13), true),
            Gen::Any,
        ),
        f(
            "sar r32,imm",
            |a| a.sar(esi, 5),
            shift_undef(32, Some(5), true),
            Gen::Any,
        ),
        f(
            "sar r64,imm",
            |a| a.sar(r9, 63),
            shift_undef(64, Some(63), true),
            Gen::Any,
        ),
        f(
            "shl m16,imm",
            |a| a.shl(word_ptr(r15), 3),
            shift_undef(16, Some(3), true),
            Gen::Any,
        ),
        f(
            "shr r64,cl",
            |a| a.shr(rax, cl),
            shift_undef(64, None, true),
            Gen::Count(70),
        ),
        f(
            "shr r32,cl",
            |a| a.shr(eax, cl),
            shift_undef(32, None, true),
            Gen::Count(40),
        ),
        f(
            "shr r16,cl",
            |a| a.shr(ax, cl),
            shift_undef(16, None, true),
            Gen::Count(40),
        ),
        f(
            "shr r8,cl",
            |a| a.shr(al, cl),
            shift_undef(8, None, true),
            Gen::Count(40),
        ),
        f(
            "shr r32,1",
            |a| a.shr(edx, 1),
            shift_undef(32, Some(1), true),
            Gen::Any,
        ),
        f(
            "shr m64,cl",
            |a| a.shr(qword_ptr(r15 + 8), cl),
            shift_undef(64, None, true),
            Gen::Count(70),
        ),
        f(
            "sar r64,cl",
            |a| a.sar(rax, cl),
            shift_undef(64, None, false),
            Gen::Count(70),
        ),
        f(
            "sar r32,cl",
            |a| a.sar(eax, cl),
            shift_undef(32, None, false),
            Gen::Count(40),
        ),
        f(
            "sar r16,cl",
            |a| a.sar(ax, cl),
            shift_undef(16, None, false),
            Gen::Count(40),
        ),
        f(
            "sar r8,cl",
            |a| a.sar(al, cl),
            shift_undef(8, None, false),
            Gen::Count(40),
        ),
        f(
            "sar r64,1",
            |a| a.sar(rax, 1),
            shift_undef(64, Some(1), false),
            Gen::Any,
        ),
        f(
            "sar m8,imm",
            |a| a.sar(byte_ptr(r15 + 1), 5),
            shift_undef(8, Some(5), false),
            Gen::Any,
        ),
        f(
            "rol r64,cl",
            |a| a.rol(rax, cl),
            rot_undef(64, None),
            Gen::Count(70),
        ),
        f(
            "rol r32,cl",
            |a| a.rol(eax, cl),
            rot_undef(32, None),
            Gen::Count(40),
        ),
        f(
            "rol r16,cl",
            |a| a.rol(ax, cl),
            rot_undef(16, None),
            Gen::Count(40),
        ),
        f(
            "rol r8,cl",
            |a| a.rol(al, cl),
            rot_undef(8, None),
            Gen::Count(40),
        ),
        f(
            "rol r8,1",
            |a| a.rol(bl, 1),
            rot_undef(8, Some(1)),
            Gen::Any,
        ),
        f(
            "ror r64,cl",
            |a| a.ror(rax, cl),
            rot_undef(64, None),
            Gen::Count(70),
        ),
        f(
            "ror r32,cl",
            |a| a.ror(eax, cl),
            rot_undef(32, None),
            Gen::Count(40),
        ),
        f(
            "ror r16,cl",
            |a| a.ror(ax, cl),
            rot_undef(16, None),
            Gen::Count(40),
        ),
        f(
            "ror r8,cl",
            |a| a.ror(al, cl),
            rot_undef(8, None),
            Gen::Count(40),
        ),
        f(
            "ror m32,1",
            |a| a.ror(dword_ptr(r15), 1),
            rot_undef(32, Some(1)),
            Gen::Any,
        ),
        f(
            "rcl r64,cl",
            |a| a.rcl(rax, cl),
            rot_undef(64, None),
            Gen::Count(70),
        ),
        f(
            "rcl r32,cl",
            |a| a.rcl(eax, cl),
            rot_undef(32, None),
            Gen::Count(40),
        ),
        f(
            "rcl r16,cl",
            |a| a.rcl(ax, cl),
            rot_undef(16, None),
            Gen::Count(40),
        ),
        f(
            "rcl r8,cl",
            |a| a.rcl(al, cl),
            rot_undef(8, None),
            Gen::Count(40),
        ),
        f(
            "rcl r32,1",
            |a| a.rcl(esi, 1),
            rot_undef(32, Some(1)),
            Gen::Any,
        ),
        f(
            "rcr r64,cl",
            |a| a.rcr(rax, cl),
            rot_undef(64, None),
            Gen::Count(70),
        ),
        f(
            "rcr r32,cl",
            |a| a.rcr(eax, cl),
            rot_undef(32, None),
            Gen::Count(40),
        ),
        f(
            "rcr r16,cl",
            |a| a.rcr(ax, cl),
            rot_undef(16, None),
            Gen::Count(40),
        ),
        f(
            "rcr r8,cl",
            |a| a.rcr(al, cl),
            rot_undef(8, None),
            Gen::Count(40),
        ),
        f(
            "rcr m16,1",
            |a| a.rcr(word_ptr(r15 + 2), 1),
            rot_undef(16, Some(1)),
            Gen::Any,
        ),
        f(
            "shld r64,r64,cl",
            |a| a.shld(rax, rbx, cl),
            shift_undef(64, None, false),
            Gen::Count(70),
        ),
        f(
            "shld r32,r32,cl",
            |a| a.shld(eax, ebx, cl),
            shift_undef(32, None, false),
            Gen::Count(40),
        ),
        f(
            "shld r16,r16,cl",
            |a| a.shld(ax, bx, cl),
            shift_undef(16, None, false),
            Gen::Count(16),
        ),
        f(
            "shld r32,r32,imm",
            |a| a.shld(edx, esi, 9),
            shift_undef(32, Some(9), false),
            Gen::Any,
        ),
        f(
            "shld m64,r64,imm",
            |a| a.shld(qword_ptr(r15), rbx, 1),
            shift_undef(64, Some(1), false),
            Gen::Any,
        ),
        f(
            "shrd r64,r64,cl",
            |a| a.shrd(rax, rbx, cl),
            shift_undef(64, None, false),
            Gen::Count(70),
        ),
        f(
            "shrd r32,r32,cl",
            |a| a.shrd(eax, ebx, cl),
            shift_undef(32, None, false),
            Gen::Count(40),
        ),
        f(
            "shrd r16,r16,cl",
            |a| a.shrd(ax, bx, cl),
            shift_undef(16, None, false),
            Gen::Count(16),
        ),
        f(
            "shrd m32,r32,imm",
            |a| a.shrd(dword_ptr(r15 + 4), ebx, 31),
            shift_undef(32, Some(31), false),
            Gen::Any,
        ),
    ];
    check(forms, CASES, 0x2345_6789_abcd_ef12);
}

fn f(name: &'static str, body: Body, undef: Undef, gen: Gen) -> Form {
    Form {
        name,
        body,
        native: None,
        undef,
        gen,
    }
}

/// Runs of PUSHes and POPs (translated as one stack access each), also across a page of the
/// guest's stack (its RSP starts page-aligned: 0xff0 below it, three slots cross a page).
/// R15 is the harness's pointer register: nothing pops into it.
#[test]
fn diff_push_and_pop_runs() {
    let forms = forms![
        "push3 pop3", |a| {
            a.push(rax)?; a.push(rbx)?; a.push(rcx)?;
            a.pop(rdx)?; a.pop(rsi)?; a.pop(rdi)
        }, def(), Gen::Any;
        "push2 pop2 swap", |a| {
            a.push(rax)?; a.push(r9)?; a.pop(rax)?; a.pop(r9)
        }, def(), Gen::Any;
        "RSP after a run", |a| {
            a.push(rax)?; a.push(rbx)?; a.push(rcx)?;
            a.pop(rdx)?; a.pop(rsi)?;
            a.mov(rdi, qword_ptr(rsp))?;
            a.push(r8)?; a.push(r9)?;
            a.mov(r10, qword_ptr(rsp + 16))?;
            a.pop(r11)?; a.pop(r12)?; a.pop(r13)
        }, def(), Gen::Any;
        "a run below a pushed canary", |a| {
            a.push(0x1234)?;
            a.push(rax)?; a.push(rbx)?;
            a.pop(rcx)?; a.pop(rdx)?; a.pop(rsi)
        }, def(), Gen::Any;
        "pop into one register twice", |a| {
            a.push(rax)?; a.push(rbx)?; a.pop(rcx)?; a.pop(rcx)
        }, def(), Gen::Any;
        "push8 pop8", |a| {
            for r in [rax, rbx, rcx, rdx, rsi, rdi, r8, r9] { a.push(r)?; }
            for r in [r10, r11, r12, r13, r14, rbp, rdx, rcx] { a.pop(r)?; }
            Ok(())
        }, def(), Gen::Any;
        "push3 pop3 across a page", |a| {
            a.lea(rsp, qword_ptr(rsp - 0xff0))?;
            a.push(rax)?; a.push(rbx)?; a.push(rcx)?;
            a.pop(rdx)?; a.pop(rsi)?; a.pop(rdi)?;
            a.lea(rsp, qword_ptr(rsp + 0xff0))
        }, def(), Gen::Any;
    ];
    check(forms, CASES, 0x4567_89ab_cdef_0123);
}

#[test]
fn diff_muldiv() {
    let mul = SF | ZF | AF | PF;
    let forms = forms![
        "mul r64", |a| a.mul(rbx), undef(mul), Gen::Any;
        "mul r32", |a| a.mul(ebx), undef(mul), Gen::Any;
        "mul r16", |a| a.mul(bx), undef(mul), Gen::Any;
        "mul r8", |a| a.mul(bl), undef(mul), Gen::Any;
        "mul m32", |a| a.mul(dword_ptr(r15)), undef(mul), Gen::Any;
        "imul r64", |a| a.imul(rbx), undef(mul), Gen::Any;
        "imul r32", |a| a.imul(ebx), undef(mul), Gen::Any;
        "imul r16", |a| a.imul(bx), undef(mul), Gen::Any;
        "imul r8", |a| a.imul(bl), undef(mul), Gen::Any;
        "imul r64,r64", |a| a.imul_2(rax, rbx), undef(mul), Gen::Any;
        "imul r32,m32", |a| a.imul_2(eax, dword_ptr(r15 + 4)), undef(mul), Gen::Any;
        "imul r16,r16", |a| a.imul_2(ax, bx), undef(mul), Gen::Any;
        "imul r64,r64,imm32", |a| a.imul_3(rax, rbx, -100_000), undef(mul), Gen::Any;
        "imul r32,r32,imm8", |a| a.imul_3(ecx, edx, 7), undef(mul), Gen::Any;
        "imul r16,m16,imm16", |a| a.imul_3(cx, word_ptr(r15), 0x1234), undef(mul), Gen::Any;
        "div r64", |a| a.div(rbx), undef(ARITH), Gen::Div(8, false);
        "div r32", |a| a.div(ebx), undef(ARITH), Gen::Div(4, false);
        "div r16", |a| a.div(bx), undef(ARITH), Gen::Div(2, false);
        "div r8", |a| a.div(bl), undef(ARITH), Gen::Div(1, false);
        "div m32", |a| a.div(dword_ptr(r15)), undef(ARITH), Gen::Div(4, false);
        "idiv r64", |a| a.idiv(rbx), undef(ARITH), Gen::Div(8, true);
        "idiv r32", |a| a.idiv(ebx), undef(ARITH), Gen::Div(4, true);
        "idiv r16", |a| a.idiv(bx), undef(ARITH), Gen::Div(2, true);
        "idiv r8", |a| a.idiv(bl), undef(ARITH), Gen::Div(1, true);
        "idiv m64", |a| a.idiv(qword_ptr(r15)), undef(ARITH), Gen::Div(8, true);
    ];
    check(forms, CASES, 0x3456_789a_bcde_f123);
}

#[test]
fn diff_bits_and_moves() {
    let bs = CF | OF | SF | AF | PF;
    let bt = OF | SF | AF | PF;
    let mut forms = forms![
        "bt r64,r64", |a| a.bt(rax, rbx), undef(bt), Gen::Any;
        "bt r32,imm", |a| a.bt(eax, 17), undef(bt), Gen::Any;
        "bts r64,r64", |a| a.bts(rax, rbx), undef(bt), Gen::Any;
        "btr r32,r32", |a| a.btr(eax, ebx), undef(bt), Gen::Any;
        "btc r16,r16", |a| a.btc(ax, bx), undef(bt), Gen::Any;
        "bt m64,r64 (bit string)", |a| a.bt(qword_ptr(r15), rbx), undef(bt), Gen::BitOff;
        "bts m32,r32 (bit string)", |a| a.bts(dword_ptr(r15), ebx), undef(bt), Gen::BitOff;
        "btr m16,r16 (bit string)", |a| a.btr(word_ptr(r15), bx), undef(bt), Gen::BitOff;
        "btc m64,imm", |a| a.btc(qword_ptr(r15 + 8), 63), undef(bt), Gen::Any;
        "lock bts m32,imm", |a| a.lock().bts(dword_ptr(r15 + 4), 9), undef(bt), Gen::Any;
        "lock btr m16,imm", |a| a.lock().btr(word_ptr(r15 + 2), 15), undef(bt), Gen::Any;
        "bt m32,imm; jb", |a| {
            a.bt(dword_ptr(r15 + 12), 3)?;
            over_marker(a, |a, l| a.jb(l))
        }, undef(bt), Gen::Any;
        "bt r32,imm; je (ZF from before the BT)", |a| {
            a.bt(ecx, 5)?;
            over_marker(a, |a, l| a.je(l))
        }, undef(bt), Gen::Any;
        "bts r64,imm; jae; btr r32,r32; setb; cmovb", |a| {
            a.bts(rax, 40)?;
            over_marker(a, |a, l| a.jae(l))?;
            a.btr(ecx, edx)?;
            a.setb(r9b)?;
            a.cmovb(r10, r11)
        }, undef(bt), Gen::Any;
        "bsf r64,r64", |a| a.bsf(rax, rbx), undef(bs), Gen::Any;
        "bsf r32,r32", |a| a.bsf(eax, ebx), undef(bs), Gen::Any;
        "bsf r16,m16", |a| a.bsf(ax, word_ptr(r15)), undef(bs), Gen::Any;
        "bsr r64,r64", |a| a.bsr(rax, rbx), undef(bs), Gen::Any;
        "bsr r32,r32", |a| a.bsr(eax, ebx), undef(bs), Gen::Any;
        "popcnt r64,r64", |a| a.popcnt(rax, rbx), def(), Gen::Any;
        "popcnt r16,r16", |a| a.popcnt(ax, bx), def(), Gen::Any;
        "bswap r64", |a| a.bswap(rax), def(), Gen::Any;
        "bswap r32", |a| a.bswap(ebx), def(), Gen::Any;
        "mov r64,r64", |a| a.mov(rax, rbx), def(), Gen::Any;
        "mov r32,r32", |a| a.mov(eax, ebx), def(), Gen::Any;
        "mov r16,r16", |a| a.mov(ax, bx), def(), Gen::Any;
        "mov r8,r8", |a| a.mov(ah, bl), def(), Gen::Any;
        "mov r8,r8 (rex)", |a| a.mov(sil, r9b), def(), Gen::Any;
        "mov r64,imm64", |a| a.mov(rax, 0x1234_5678_9abc_def0_u64), def(), Gen::Any;
        "mov r32,imm32", |a| a.mov(r10d, 0x8765_4321_u32), def(), Gen::Any;
        "mov r64,simm32", |a| a.mov(rcx, -5i64), def(), Gen::Any;
        "mov m64,r64", |a| a.mov(qword_ptr(r15 + 3), rbx), def(), Gen::Any;
        "mov r32,m32", |a| a.mov(edx, dword_ptr(r15 + 5)), def(), Gen::Any;
        "mov m16,imm", |a| a.mov(word_ptr(r15 - 2), 0x1234), def(), Gen::Any;
        "mov m8,r8", |a| a.mov(byte_ptr(r15 + 1), bl), def(), Gen::Any;
        "movzx r32,r8", |a| a.movzx(eax, bl), def(), Gen::Any;
        "movzx r64,m16", |a| a.movzx(rax, word_ptr(r15)), def(), Gen::Any;
        "movzx r16,r8", |a| a.movzx(ax, bh), def(), Gen::Any;
        "movsx r64,r8", |a| a.movsx(rax, bl), def(), Gen::Any;
        "movsx r32,m16", |a| a.movsx(eax, word_ptr(r15 + 2)), def(), Gen::Any;
        "movsx r16,r8", |a| a.movsx(cx, dl), def(), Gen::Any;
        "movsxd r64,r32", |a| a.movsxd(rax, ebx), def(), Gen::Any;
        "movsxd r64,m32", |a| a.movsxd(rdx, dword_ptr(r15 + 8)), def(), Gen::Any;
        "lea r64", |a| a.lea(rax, qword_ptr(rbx + rcx * 4 + 0x1234)), def(), Gen::Any;
        "lea r32", |a| a.lea(eax, dword_ptr(rbx + rcx * 8 - 1)), def(), Gen::Any;
        "lea r16", |a| a.lea(ax, word_ptr(rbx + rdx)), def(), Gen::Any;
        "lea r64 addr32", |a| a.lea(rax, qword_ptr(ebx + ecx * 2 + 7)), def(), Gen::Any;
        "xchg r64,r64", |a| a.xchg(rax, rbx), def(), Gen::Any;
        "xchg r32,r32", |a| a.xchg(ecx, edx), def(), Gen::Any;
        "xchg m16,r16", |a| a.xchg(word_ptr(r15), bx), def(), Gen::Any;
        "xchg r8,r8", |a| a.xchg(ah, bl), def(), Gen::Any;
        "cbw", |a| a.cbw(), def(), Gen::Any;
        "cwde", |a| a.cwde(), def(), Gen::Any;
        "cdqe", |a| a.cdqe(), def(), Gen::Any;
        "cwd", |a| a.cwd(), def(), Gen::Any;
        "cdq", |a| a.cdq(), def(), Gen::Any;
        "cqo", |a| a.cqo(), def(), Gen::Any;
        "lahf", |a| a.lahf(), def(), Gen::Any;
        "sahf", |a| a.sahf(), def(), Gen::Any;
        "clc/cmc/stc", |a| { a.clc()?; a.cmc()?; a.adc(eax, 0)?; a.stc()?; a.adc(ebx, 0) }, def(), Gen::Any;
        "xadd r64,r64", |a| a.xadd(rax, rbx), def(), Gen::Any;
        "xadd m32,r32", |a| a.xadd(dword_ptr(r15), ebx), def(), Gen::Any;
        "xadd r8,r8", |a| a.xadd(al, bl), def(), Gen::Any;
        "cmpxchg r64,r64", |a| a.cmpxchg(rbx, rcx), def(), Gen::Any;
        "cmpxchg r32,r32", |a| a.cmpxchg(ebx, ecx), def(), Gen::Any;
        "cmpxchg r32,r32 (eq)", |a| { a.mov(eax, ebx)?; a.cmpxchg(ebx, ecx) }, def(), Gen::Any;
        "cmpxchg m16,r16", |a| a.cmpxchg(word_ptr(r15), cx), def(), Gen::Any;
        "cmpxchg m64,r64 (eq)", |a| { a.mov(rax, qword_ptr(r15))?; a.cmpxchg(qword_ptr(r15), rcx) }, def(), Gen::Any;
        "cmpxchg8b", |a| a.cmpxchg8b(qword_ptr(r15)), def(), Gen::Any;
        "cmpxchg8b (eq)", |a| { a.mov(eax, dword_ptr(r15))?; a.mov(edx, dword_ptr(r15 + 4))?; a.cmpxchg8b(qword_ptr(r15)) }, def(), Gen::Any;
        "cmpxchg16b (eq)", |a| { a.mov(rax, qword_ptr(r15 - 32))?; a.mov(rdx, qword_ptr(r15 - 24))?; a.cmpxchg16b(xmmword_ptr(r15 - 32)) }, def(), Gen::Any;
        "cmpxchg16b", |a| a.cmpxchg16b(xmmword_ptr(r15 + 16)), def(), Gen::Any;
        "lock add m64,r64", |a| a.lock().add(qword_ptr(r15), rbx), def(), Gen::Any;
        "lock sub m8,imm", |a| a.lock().sub(byte_ptr(r15 + 3), 7), def(), Gen::Any;
        "lock adc m32,r32", |a| a.lock().adc(dword_ptr(r15 + 4), ebx), def(), Gen::Any;
        "lock and m16,r16", |a| a.lock().and(word_ptr(r15 + 2), bx), undef(AF), Gen::Any;
        "lock or m64,imm8", |a| a.lock().or(qword_ptr(r15 + 8), 3), undef(AF), Gen::Any;
        "lock xor m32,r32", |a| a.lock().xor(dword_ptr(r15), ebx), undef(AF), Gen::Any;
        "lock inc m64", |a| a.lock().inc(qword_ptr(r15)), def(), Gen::Any;
        "lock dec m32", |a| a.lock().dec(dword_ptr(r15 + 4)), def(), Gen::Any;
        "lock neg m16", |a| a.lock().neg(word_ptr(r15)), def(), Gen::Any;
        "lock not m8", |a| a.lock().not(byte_ptr(r15)), def(), Gen::Any;
        "lock xadd m64,r64", |a| a.lock().xadd(qword_ptr(r15), rbx), def(), Gen::Any;
        "lock cmpxchg m32,r32", |a| a.lock().cmpxchg(dword_ptr(r15), ebx), def(), Gen::Any;
        "lock bts m64,r64", |a| a.lock().bts(qword_ptr(r15), rbx), undef(bt), Gen::BitOff;
        "lock btr m32,imm", |a| a.lock().btr(dword_ptr(r15), 9), undef(bt), Gen::Any;
        "lock add unaligned", |a| a.lock().add(dword_ptr(r15 + 1), ebx), def(), Gen::Any;
    ];
    // TZCNT/LZCNT encodings must behave as BSF/BSR (no BMI1/LZCNT advertised); the host has
    // BMI1, so it runs the plain BSF/BSR for comparison.
    forms.push(Form {
        name: "rep bsf r64,r64",
        body: |a| a.tzcnt(rax, rbx),
        native: Some(|a| a.bsf(rax, rbx)),
        undef: undef(bs),
        gen: Gen::Any,
    });
    forms.push(Form {
        name: "rep bsr r32,r32",
        body: |a| a.lzcnt(eax, ebx),
        native: Some(|a| a.bsr(eax, ebx)),
        undef: undef(bs),
        gen: Gen::Any,
    });
    for cc in 0..16u8 {
        forms.push(cond_form(cc));
    }
    check(forms, CASES, 0x4567_89ab_cdef_1234);
}

/// SETcc, CMOVcc and Jcc for condition `cc`, after a CMP that sets all flags.
fn cond_form(cc: u8) -> Form {
    macro_rules! per_cc {
        ($($n:literal => $set:ident, $cmov:ident, $j:ident;)*) => {
            match cc {
                $($n => |a: &mut CodeAssembler| {
                    a.cmp(rax, rbx)?;
                    a.$set(cl)?;
                    a.$cmov(edx, esi)?;
                    let mut l = a.create_label();
                    a.$j(l)?;
                    a.mov(r8, 1u64)?;
                    a.set_label(&mut l)?;
                    // Also from flags set by POPF-like eager paths: SAHF/AND.
                    a.and(r9, r10)?;
                    a.$set(r11b)?;
                    Ok(())
                },)*
                _ => unreachable!(),
            }
        };
    }
    let body: Body = per_cc! {
        0 => seto, cmovo, jo; 1 => setno, cmovno, jno; 2 => setb, cmovb, jb;
        3 => setae, cmovae, jae; 4 => sete, cmove, je; 5 => setne, cmovne, jne;
        6 => setbe, cmovbe, jbe; 7 => seta, cmova, ja; 8 => sets, cmovs, js;
        9 => setns, cmovns, jns; 10 => setp, cmovp, jp; 11 => setnp, cmovnp, jnp;
        12 => setl, cmovl, jl; 13 => setge, cmovge, jge; 14 => setle, cmovle, jle;
        15 => setg, cmovg, jg;
    };
    Form {
        name: [
            "seto", "setno", "setb", "setae", "sete", "setne", "setbe", "seta", "sets", "setns",
            "setp", "setnp", "setl", "setge", "setle", "setg",
        ][cc as usize],
        body,
        native: None,
        undef: undef(AF),
        gen: Gen::Any,
    }
}

/// A `Body` for condition code `$cc`: `$body`, in which `$skip(a, r)` is a Jcc of that
/// condition over a marker `mov r, 1`.
macro_rules! cc_body {
    ($cc:expr, |$a:ident, $skip:ident| $body:block) => {
        cc_body!(@arms $cc, $a, $skip, $body;
            0 => jo; 1 => jno; 2 => jb; 3 => jae; 4 => je; 5 => jne; 6 => jbe; 7 => ja;
            8 => js; 9 => jns; 10 => jp; 11 => jnp; 12 => jl; 13 => jge; 14 => jle; 15 => jg;)
    };
    (@arms $cc:expr, $a:ident, $skip:ident, $body:block; $($n:literal => $j:ident;)*) => {
        match $cc {
            $($n => |$a: &mut CodeAssembler| {
                let $skip = |a: &mut CodeAssembler, r: AsmRegister64| {
                    let mut l = a.create_label();
                    a.$j(l)?;
                    a.mov(r, 1u64)?;
                    a.set_label(&mut l)
                };
                $body
            },)*
            _ => unreachable!(),
        }
    };
}

/// `jump` (a Jcc to the label it is given) over a marker `mov r8, 1`.
fn over_marker(
    a: &mut CodeAssembler,
    jump: impl FnOnce(&mut CodeAssembler, CodeLabel) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut l = a.create_label();
    jump(a, l)?;
    a.mov(r8, 1u64)?;
    a.set_label(&mut l)?;
    a.nop()
}

/// A form named `what+j<cc>` for condition code `cc`.
fn cc_form(cc: u8, what: &str, body: Body) -> Form {
    const CC: [&str; 16] = [
        "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g",
    ];
    Form {
        name: Box::leak(format!("{what}+j{}", CC[cc as usize]).into_boxed_str()),
        body,
        native: None,
        undef: undef(AF),
        gen: Gen::Any,
    }
}

/// CMP/TEST immediately followed by a Jcc (one fused op in the emulator) in every operand form
/// and size the JIT translates, for condition `cc`; each branch skips a marker MOV.
fn fused_form(cc: u8) -> Form {
    let body: Body = cc_body!(cc, |a, skip| {
        a.cmp(rax, rbx)?;
        skip(a, r8)?;
        a.test(ecx, edx)?;
        skip(a, r9)?;
        a.cmp(byte_ptr(r15 + 3), 0x40)?;
        skip(a, r10)?;
        a.cmp(dword_ptr(r15 + 8), esi)?;
        skip(a, r11)?;
        a.cmp(rdi, qword_ptr(r15 + 16))?;
        skip(a, r12)?;
        a.test(al, 0x81)?;
        skip(a, r13)?;
        a.cmp(bl, dl)?;
        skip(a, r14)?;
        a.cmp(qword_ptr(r15 + 24), -5)?;
        skip(a, rbp)
    });
    cc_form(cc, "cmp", body)
}

/// An ALU op immediately followed by a Jcc (the JIT branches on the host's flags of the ALU
/// op), for condition `cc`, in register, immediate and memory forms; each branch skips a
/// marker MOV.
fn alu_jcc_form(cc: u8) -> Form {
    let body: Body = cc_body!(cc, |a, skip| {
        a.add(rax, rbx)?;
        skip(a, r10)?;
        a.sub(ecx, edx)?;
        skip(a, r11)?;
        a.and(rsi, rdi)?;
        skip(a, r12)?;
        a.or(dword_ptr(r15 + 8), esi)?;
        skip(a, r13)?;
        a.xor(rdx, 0x55)?;
        skip(a, r14)?;
        a.sub(qword_ptr(r15 + 16), 3)?;
        skip(a, rbp)
    });
    cc_form(cc, "alu", body)
}

/// Narrow ALU ops, INC/DEC/NEG and the atomic forms immediately followed by a Jcc, for
/// condition `cc` (the JIT branches on the host's flags, except for a CF condition after
/// INC/DEC, which keep the guest's CF); each branch skips a marker MOV.
fn narrow_jcc_form(cc: u8) -> Form {
    let body: Body = cc_body!(cc, |a, skip| {
        a.add(al, bl)?;
        skip(a, r10)?;
        a.sub(cx, word_ptr(r15 + 2))?;
        skip(a, r11)?;
        a.inc(esi)?;
        skip(a, r12)?;
        a.dec(qword_ptr(r15 + 8))?;
        skip(a, r13)?;
        a.neg(dl)?;
        skip(a, r14)?;
        a.lock().sub(dword_ptr(r15 + 16), edi)?;
        skip(a, rbp)?;
        a.lock().xadd(qword_ptr(r15 + 24), r8)?;
        skip(a, r9)?;
        a.test(bh, 0x81)?;
        skip(a, rax)
    });
    cc_form(cc, "narrow", body)
}

#[test]
fn diff_alu_then_branch() {
    check(
        (0..16).map(alu_jcc_form).collect(),
        CASES,
        0x3456_789a_bcde_f012,
    );
}

#[test]
fn diff_narrow_and_atomic_ops_then_branch() {
    check(
        (0..16).map(narrow_jcc_form).collect(),
        CASES,
        0x4567_89ab_cdef_0123,
    );
}

/// LOCK-prefixed read-modify-write ops, CMPXCHG and XADD (translated to the host's locked
/// instructions), narrow MOVs and SETcc (a host SETcc on the flags of the op before).
#[test]
fn diff_atomics_narrow_moves_and_setcc() {
    let forms = forms![
        "lock add m32,r32", |a| a.lock().add(dword_ptr(r15 + 4), ecx), def(), Gen::Any;
        "lock or m8,imm8", |a| a.lock().or(byte_ptr(r15 + 3), 0x41), undef(AF), Gen::Any;
        "lock and m16,r16", |a| a.lock().and(word_ptr(r15 + 6), bx), undef(AF), Gen::Any;
        "lock sub m64,imm8", |a| a.lock().sub(qword_ptr(r15 + 8), 7), def(), Gen::Any;
        "lock xor m32,imm32", |a| a.lock().xor(dword_ptr(r15), 0x1234_5678), undef(AF), Gen::Any;
        "lock inc m32", |a| a.lock().inc(dword_ptr(r15 + 12)), def(), Gen::Any;
        "lock dec m64", |a| a.lock().dec(qword_ptr(r15 + 16)), def(), Gen::Any;
        "lock neg m16", |a| a.lock().neg(word_ptr(r15 + 2)), def(), Gen::Any;
        "lock not m8", |a| a.lock().not(byte_ptr(r15 + 5)), def(), Gen::Any;
        "inc m8; dec r16", |a| { a.inc(byte_ptr(r15 + 1))?; a.dec(dx) }, def(), Gen::Any;
        "not r32; neg m64", |a| { a.not(ecx)?; a.neg(qword_ptr(r15 + 8)) }, def(), Gen::Any;
        "lock cmpxchg m64,r64", |a| a.lock().cmpxchg(qword_ptr(r15 + 8), rbx), def(), Gen::Any;
        "cmpxchg m32,r32", |a| a.cmpxchg(dword_ptr(r15 + 4), ecx), def(), Gen::Any;
        "lock cmpxchg m8,r8", |a| a.lock().cmpxchg(byte_ptr(r15 + 1), dl), def(), Gen::Any;
        "lock cmpxchg m16,r16", |a| a.lock().cmpxchg(word_ptr(r15 + 2), si), def(), Gen::Any;
        "matching lock cmpxchg m32", |a| {
            a.mov(eax, dword_ptr(r15 + 4))?;
            a.lock().cmpxchg(dword_ptr(r15 + 4), ecx)
        }, def(), Gen::Any;
        "matching cmpxchg m64", |a| {
            a.mov(rax, qword_ptr(r15 + 16))?;
            a.cmpxchg(qword_ptr(r15 + 16), rdi)
        }, def(), Gen::Any;
        "lock xadd m64,r64", |a| a.lock().xadd(qword_ptr(r15 + 8), rbx), def(), Gen::Any;
        "xadd m32,r32", |a| a.xadd(dword_ptr(r15 + 4), ecx), def(), Gen::Any;
        "lock xadd m16,r16", |a| a.lock().xadd(word_ptr(r15 + 2), si), def(), Gen::Any;
        "lock xadd m8,r8", |a| a.lock().xadd(byte_ptr(r15 + 1), dl), def(), Gen::Any;
        "mov r8,m8; mov m16,r16", |a| {
            a.mov(sil, byte_ptr(r15 + 3))?;
            a.mov(word_ptr(r15 + 6), di)
        }, def(), Gen::Any;
        "mov m8,imm8; mov r16,imm16", |a| {
            a.mov(byte_ptr(r15 + 9), 0x9a)?;
            a.mov(r9w, 0x8765)
        }, def(), Gen::Any;
        "mov r8,r8; mov r16,m16; mov m8,r8", |a| {
            a.mov(bl, dil)?;
            a.mov(cx, word_ptr(r15 + 12))?;
            a.mov(byte_ptr(r15 + 2), r8b)
        }, def(), Gen::Any;
        "sub r32,r32; setb", |a| { a.sub(eax, ebx)?; a.setb(cl) }, def(), Gen::Any;
        "test r8,r8; sete; setl", |a| { a.test(al, bl)?; a.sete(dl)?; a.setl(sil) }, undef(AF), Gen::Any;
        "inc r64; setle; seto", |a| { a.inc(rax)?; a.setle(r9b)?; a.seto(cl) }, def(), Gen::Any;
        "dec r32; setbe", |a| { a.dec(eax)?; a.setbe(cl) }, def(), Gen::Any;
        "cmp r16,r16; seta; cmovg", |a| { a.cmp(ax, bx)?; a.seta(cl)?; a.cmovg(rdx, rsi) }, def(), Gen::Any;
        "mov ah,bh; mov ch,0x5a; add dh,1; setne bh", |a| {
            a.mov(ah, bh)?;
            a.mov(ch, 0x5a)?;
            a.add(dh, 1)?;
            a.setne(bh)
        }, def(), Gen::Any;
        "add ah,dl; sub bh,ch; movzx esi,ah", |a| {
            a.add(ah, dl)?;
            a.sub(bh, ch)?;
            a.movzx(esi, ah)
        }, def(), Gen::Any;
        "inc ch; dec ah; neg bh; not dh", |a| { a.inc(ch)?; a.dec(ah)?; a.neg(bh)?; a.not(dh) }, def(), Gen::Any;
        "call r64", |a| {
            let mut t = a.create_label();
            let mut done = a.create_label();
            a.lea(rax, ptr(t))?;
            a.call(rax)?;
            a.jmp(done)?;
            a.set_label(&mut t)?;
            a.add(rbx, 5)?;
            a.ret()?;
            a.set_label(&mut done)?;
            // The code's address differs between the host and the guest.
            a.mov(eax, 0)?;
            a.add(rbx, rcx)
        }, def(), Gen::Any;
        "jmp r64", |a| {
            let mut t = a.create_label();
            a.lea(rcx, ptr(t))?;
            a.jmp(rcx)?;
            a.add(rbx, 1)?;
            a.set_label(&mut t)?;
            a.mov(ecx, 0)?;
            a.add(rbx, 3)
        }, def(), Gen::Any;
    ];
    check(forms, CASES, 0x5678_9abc_def0_1234);
}

#[test]
fn diff_fused_compare_and_branch() {
    check(
        (0..16).map(fused_form).collect(),
        CASES,
        0x6789_abcd_ef12_3456,
    );
}

#[test]
fn diff_strings() {
    let forms = forms![
        "movsb", |a| a.movsb(), def(), Gen::Str;
        "movsq", |a| a.movsq(), def(), Gen::Str;
        "rep movsb", |a| a.rep().movsb(), def(), Gen::Str;
        "rep movsw", |a| a.rep().movsw(), def(), Gen::Str;
        "rep movsd", |a| a.rep().movsd(), def(), Gen::Str;
        "rep movsq", |a| a.rep().movsq(), def(), Gen::Str;
        "rep stosb", |a| a.rep().stosb(), def(), Gen::Str;
        "rep stosw", |a| a.rep().stosw(), def(), Gen::Str;
        "rep stosd", |a| a.rep().stosd(), def(), Gen::Str;
        "rep stosq", |a| a.rep().stosq(), def(), Gen::Str;
        "lodsb", |a| a.lodsb(), def(), Gen::Str;
        "lodsd", |a| a.lodsd(), def(), Gen::Str;
        "stosw", |a| a.stosw(), def(), Gen::Str;
        "cmpsb", |a| a.cmpsb(), def(), Gen::Str;
        "repe cmpsb", |a| a.repe().cmpsb(), def(), Gen::Str;
        "repne cmpsw", |a| a.repne().cmpsw(), def(), Gen::Str;
        "repe cmpsq", |a| a.repe().cmpsq(), def(), Gen::Str;
        "scasb", |a| a.scasb(), def(), Gen::Str;
        "repne scasb", |a| a.repne().scasb(), def(), Gen::Str;
        "repe scasd", |a| a.repe().scasd(), def(), Gen::Str;
        "repne scasq", |a| a.repne().scasq(), def(), Gen::Str;
        "rep movsb (overlapping, forward)", |a| { a.lea(rdi, qword_ptr(rsi + 3))?; a.cld()?; a.rep().movsb() }, def(), Gen::Str;
        "rep movsd (overlapping, backward)", |a| { a.lea(rdi, qword_ptr(rsi - 5))?; a.std()?; a.rep().movsd()?; a.cld() }, def(), Gen::Str;
    ];
    check(forms, CASES, 0x5678_9abc_def1_2345);
}

/// The harness itself must catch a wrong result and a wrong flag.
#[test]
fn harness_detects_differences() {
    let wrong_result = vec![Form {
        name: "add vs sub",
        body: |a| a.add(rax, rbx),
        native: Some(|a| a.sub(rax, rbx)),
        undef: def(),
        gen: Gen::Any,
    }];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(wrong_result, 50, 1)));
    assert!(r.is_err());
    let wrong_flag = vec![Form {
        name: "stc vs clc",
        body: |a| a.stc(),
        native: Some(|a| a.clc()),
        undef: def(),
        gen: Gen::Any,
    }];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(wrong_flag, 50, 1)));
    assert!(r.is_err());
    let wrong_memory = vec![Form {
        name: "mov imm",
        body: |a| a.mov(dword_ptr(r15), 1),
        native: Some(|a| a.mov(dword_ptr(r15), 2)),
        undef: def(),
        gen: Gen::Any,
    }];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(wrong_memory, 50, 1)));
    assert!(r.is_err());
}
/// SETcc and CMOVcc right after a fused CMP+Jcc that was not taken: the JIT reads the host's
/// flags, which the fused op's fall-through leaves as the compare set them.
#[test]
fn diff_flags_after_a_fused_compare() {
    let forms = forms![
        "cmp+jne; setl; cmovg (flags after a fused compare)", |a| {
            a.cmp(rax, rbx)?;
            over_marker(a, |a, l| a.jne(l))?;
            let mut m = a.create_label();
            a.cmp(ecx, edx)?;
            a.je(m)?;
            a.setl(r9b)?;
            a.cmovg(r10, r11)?;
            a.set_label(&mut m)?;
            a.nop()
        }, def(), Gen::Any;
    ];
    check(forms, CASES, 0x5678_9abc_def0_1234);
}
